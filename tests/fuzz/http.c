/*
 * tests/fuzz/http.c: the whole request path of the front-ends, through
 * http_serve_cgi (CGI parameters from an array, the body from memory, the
 * CGI response into a buffer): parameter reading, Content-Length, routing,
 * every route, the response writer.
 *
 * Input, one parameter a line, then an empty line, then the body:
 *
 *     REQUEST_METHOD=POST
 *     PATH_INFO=/events
 *     CONTENT_TYPE=application/json
 *     CONTENT_LENGTH=${len}
 *     HTTP_X_REMARKET_SIGNATURE=${sig}
 *
 *     {"type":"cart", ...}
 *
 * A line is passed as it is, so the fuzzer decides which parameters are
 * present, empty, repeated or odd (a line without '=' names nothing).
 * Placeholders make valid credentials, so inputs get past the checks:
 * ${tok:K:N} a token of kind K (r, u, d, o) for subject N valid for a day,
 * ${xtok:K:N} the same but expired, ${ltok:N:URL} a tracked link's token
 * (kind l) for message N bound to URL (give it, URL-escaped, as u= in
 * QUERY_STRING), ${tsig} the X-Twilio-Signature of the final body
 * posted to /rm/sms/inbound, ${sig} the hook signature of the final
 * body at the fixed clock, ${len} the final body's length. The tick token
 * is FZ_TICK_TOKEN ("Bearer tick-fuzz-token"; Basic Zjp0aWNrLWZ1enotdG9rZW4=).
 *
 * Checks: no crash, hang, leak or undefined behaviour; the response is a
 * CGI response ("Status: " first) whose header lines end in CRLF with no
 * bare CR or LF in them (nothing from the request can split a header).
 */
#include "fuzz.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	fz_start_world();
	return 0;
}

/* Appends S[0..n) to OUT with the placeholders replaced (not ${sig} and
 * ${len} when FINAL is 0: they need the finished body). */
static void expand(struct buf *out, const char *s, size_t n,
		   const struct buf *body, int final)
{
	for (size_t i = 0; i < n;) {
		const char *p = s + i;
		size_t left = n - i;
		char tok[TOK_MAXLEN + 8], kind, url[256];
		long long subj;
		int used = 0, exp = 0;
		if (left > 7 && !strncmp(p, "${ltok:", 7) &&
		    sscanf(p, "${ltok:%lld:%255[^}]}%n", &subj, url, &used) == 2 &&
		    used > 0 && (size_t)used <= left) {
			if (tok_sign_for(fz_key, TOK_LINK, subj, FZ_NOW + 86400, url,
					 strlen(url), tok, sizeof tok) == 0)
				buf_adds(out, tok);
			i += (size_t)used;
		} else if (left > 6 && !strncmp(p, "${", 2) &&
		    (sscanf(p, "${tok:%c:%lld}%n", &kind, &subj, &used) == 2 ||
		     (exp = sscanf(p, "${xtok:%c:%lld}%n", &kind, &subj, &used)) == 2) &&
		    used > 0 && (size_t)used <= left) {
			rm_time until = exp ? FZ_NOW - 60 : FZ_NOW + 86400;
			if (tok_sign(fz_key, kind, subj, until, tok, sizeof tok) == 0)
				buf_adds(out, tok);
			i += (size_t)used;
		} else if (final && left >= 6 && !strncmp(p, "${sig}", 6)) {
			char sig[128];
			if (hook_sign(FZ_HOOK_SECRET, FZ_NOW, body->data ? body->data : "",
				      body->len, sig, sizeof sig) == 0)
				buf_adds(out, sig);
			i += 6;
		} else if (final && left >= 7 && !strncmp(p, "${tsig}", 7)) {
			char sig[64];
			if (sms_twilio_signature(FZ_TWILIO_TOKEN, "https://shop.example.com"
						 "/rm/sms/inbound", body->data ? body->data : "",
						 body->len, sig, sizeof sig) == 0)
				buf_adds(out, sig);
			i += 7;
		} else if (final && left >= 6 && !strncmp(p, "${len}", 6)) {
			buf_addf(out, "%zu", body->len);
			i += 6;
		} else {
			buf_add(out, p, 1);
			i++;
		}
	}
}

/* Headers end at the first CRLFCRLF; before it, CR and LF come in pairs. */
static void check_response(const struct buf *out)
{
	const char *d = out->data;
	if (!d || out->len < 8 || strncmp(d, "Status: ", 8) != 0)
		abort();
	const char *end = memmem(d, out->len, "\r\n\r\n", 4);
	if (!end)
		abort();
	for (const char *p = d; p < end; p++)
		if ((*p == '\r' && p[1] != '\n') ||
		    (*p == '\n' && (p == d || p[-1] != '\r')))
			abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len)
{
	char *in = fz_str(data, len); /* sscanf needs the NUL */
	const char *s = in;
	const char *sep = memmem(s, len, "\n\n", 2);
	size_t hlen = sep ? (size_t)(sep - s) + 1 : len;
	const char *rawbody = sep ? sep + 2 : s + len;
	size_t blen = sep ? len - hlen - 1 : 0;
	struct buf body = {0}, hdr = {0}, out = {0};
	char *env[64];
	int nenv = 0;

	expand(&body, rawbody, blen, &body, 0);
	/* ${sig} and ${len} in the body itself stay as they are */
	for (size_t i = 0; i < hlen && nenv < 63;) {
		const char *nl = memchr(s + i, '\n', hlen - i);
		size_t n = nl ? (size_t)(nl - (s + i)) : hlen - i;
		hdr.len = 0;
		expand(&hdr, s + i, n, &body, 1);
		if (hdr.len && !memchr(hdr.data, '\0', hdr.len)) {
			env[nenv] = strdup(hdr.data);
			if (!env[nenv])
				abort();
			nenv++;
		}
		i += n + 1;
	}
	env[nenv] = NULL;
	http_serve_cgi(&fz_app, (const char *const *)env, body.data, body.len, &out);
	check_response(&out);
	if (getenv("FZ_PRINT")) /* FZ_PRINT=1 ./http FILE shows the answer */
		fprintf(stderr, "%.*s\n", (int)(out.len < 400 ? out.len : 400),
			out.data);
	for (int i = 0; i < nenv; i++)
		free(env[i]);
	buf_free(&body), buf_free(&hdr), buf_free(&out);
	free(in);
	fz_reset();
	return 0;
}
