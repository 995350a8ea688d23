/*
 * tests/fuzz/token.c: signed tokens and hook signatures, the two checks
 * that guard every link and every server hook.
 *
 * Input: line 1 is a token, checked as each of the four kinds at the
 * fixed clock; line 2 is an X-Remarket-Signature header, checked against
 * the rest of the input as the body. Then two round trips: a token signed
 * for a subject and expiry taken from the input's first 16 bytes verifies
 * to that subject (or is expired, exactly when the expiry has passed), and
 * the input's own signature verifies, with the body changed it does not.
 * A tracked link's token (kind l) bound to the body verifies with it and
 * is forged with one byte less; line 1 is also checked as one.
 *
 * Checks: no crash or undefined behaviour; statuses are from the enum; a
 * token the fuzzer made up is never accepted (it would need the key).
 */
#include "fuzz.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	fz_open();
	return 0;
}

static uint64_t be64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = (v << 8) | p[i];
	return v;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len)
{
	char *in = fz_str(data, len);
	char *nl = strchr(in, '\n');
	char *hdr = nl ? nl + 1 : in + strlen(in);
	char *nl2 = nl ? strchr(hdr, '\n') : NULL;
	const char *body = nl2 ? nl2 + 1 : "";
	size_t blen = nl2 ? len - (size_t)(body - in) : 0;
	if (nl)
		*nl = '\0';
	if (nl2)
		*nl2 = '\0';
	static const char kinds[] = {TOK_RECOVER, TOK_UNSUB, TOK_DISCOUNT, TOK_OPEN};
	for (int k = 0; k < 4; k++) {
		int64_t subject = 0;
		int st = tok_verify(fz_key, in, kinds[k], FZ_NOW, &subject);
		if (st > TOK_OK || st < TOK_WRONG_KIND || !tok_strerror(st))
			abort();
		if (st == TOK_OK) { /* only a real signature passes */
			char again[TOK_MAXLEN + 1];
			if (tok_sign(fz_key, kinds[k], subject, FZ_NOW + 1, again,
				     sizeof again) < 0)
				abort();
		}
	}
	int64_t lsubj = 0;
	int lst = tok_verify_for(fz_key, in, TOK_LINK, body, blen, FZ_NOW, &lsubj);
	if (lst > TOK_OK || lst < TOK_WRONG_KIND)
		abort();
	const char *why = NULL;
	int hv = hook_verify(FZ_HOOK_SECRET, hdr, body, blen, FZ_NOW, &why);
	if (hv < 0 && (!why || !*why))
		abort();

	/* round trips */
	if (len >= 17) {
		int64_t subj = (int64_t)be64(data), got = -1;
		rm_time exp = (rm_time)be64(data + 8);
		char kind = (char)kinds[data[16] % 4];
		char tok[TOK_MAXLEN + 1];
		if (tok_sign(fz_key, kind, subj, exp, tok, sizeof tok) < 0)
			abort();
		int st = tok_verify(fz_key, tok, kind, FZ_NOW, &got);
		if (exp < FZ_NOW ? st != TOK_EXPIRED : (st != TOK_OK || got != subj))
			abort();
		if (tok_verify(fz_key, tok, kind == TOK_OPEN ? TOK_UNSUB : TOK_OPEN,
			       FZ_NOW, &got) != TOK_WRONG_KIND)
			abort();
		char ltok[TOK_MAXLEN + 1];
		if (tok_sign_for(fz_key, TOK_LINK, subj, exp, body, blen, ltok,
				 sizeof ltok) < 0)
			abort();
		st = tok_verify_for(fz_key, ltok, TOK_LINK, body, blen, FZ_NOW, &got);
		if (exp < FZ_NOW ? st != TOK_EXPIRED : (st != TOK_OK || got != subj))
			abort();
		if (blen && tok_verify_for(fz_key, ltok, TOK_LINK, body, blen - 1,
					   FZ_NOW, &got) != TOK_FORGED)
			abort();
		tok[data[16] % strlen(tok)] ^= 1; /* one character off: refused */
		st = tok_verify(fz_key, tok, kind, FZ_NOW, &got);
		if (st == TOK_OK)
			abort();
	}
	char sig[128];
	if (hook_sign(FZ_HOOK_SECRET, FZ_NOW, body, blen, sig, sizeof sig) < 0 ||
	    hook_verify(FZ_HOOK_SECRET, sig, body, blen, FZ_NOW, &why) != 0)
		abort();
	if (blen && hook_verify(FZ_HOOK_SECRET, sig, body, blen - 1, FZ_NOW,
				&why) == 0)
		abort();
	free(in);
	return 0;
}
