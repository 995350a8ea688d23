/*
 * tests/fuzz/template.c: the template renderer and the mail builder, the
 * path every message takes (tpl_render in text and HTML, then mail_build).
 *
 * Input: NUL-separated fields, missing ones empty:
 *   0 the template (rendered as text and as HTML, with partials from a
 *     directory of the target's own: "line", "items" and a partial that
 *     includes itself, "loop"), 1 first_name, 2 an item's name, 3 From,
 *     4 To, 5 Subject (rendered as a template too), 6 Feedback-ID.
 * The context has scalars (first_name, store_name, empty) and a list
 * "items" of two elements, each with name and price.
 *
 * Checks: no crash, leak or undefined behaviour; a refused template says
 * why; HTML output holds no '<' that the template did not write; a built
 * message has CRLF line ends only (no bare CR or LF anywhere), a header
 * block ended by an empty line in which every line is a header or a
 * folded continuation, and body lines of at most 78 characters.
 */
#include "fuzz.h"

static char tpl_dir[PATH_MAX];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	fz_open();
	snprintf(tpl_dir, sizeof tpl_dir, "%s/tpl", fz_dir);
	if (mkdir(tpl_dir, 0700) < 0)
		fz_die(tpl_dir);
	static const char *const files[][2] = {
		{"tpl/line.txt", "-- {{store_name}} {{first_name}}\n"},
		{"tpl/line.html", "<p>{{store_name}} {{first_name}}</p>"},
		{"tpl/items.txt", "{{#items}}{{name}} {{price}}\n{{/items}}"},
		{"tpl/items.html", "<ul>{{#items}}<li>{{name}}</li>{{/items}}</ul>"},
		{"tpl/loop.txt", "[{{>loop}}]"},
		{"tpl/loop.html", "<b>{{>loop}}</b>"},
	};
	for (size_t i = 0; i < sizeof files / sizeof files[0]; i++)
		fz_write(files[i][0], files[i][1], strlen(files[i][1]));
	return 0;
}

static size_t count(const char *s, size_t n, char c)
{
	size_t k = 0;
	for (size_t i = 0; i < n; i++)
		k += s[i] == c;
	return k;
}

static void check_mail(const struct buf *m)
{
	const char *d = m->data, *end = d + m->len;
	const char *hend = memmem(d, m->len, "\r\n\r\n", 4);
	if (!hend)
		abort();
	for (const char *p = d; p < end; p++)
		if ((*p == '\r' && (p + 1 == end || p[1] != '\n')) ||
		    (*p == '\n' && (p == d || p[-1] != '\r')))
			abort(); /* a bare CR or LF */
	for (const char *line = d; line < hend + 2;) {
		const char *eol = memmem(line, (size_t)(end - line), "\r\n", 2);
		const char *colon = memchr(line, ':', (size_t)(eol - line));
		int folded = *line == ' ' || *line == '\t';
		if (!folded && (!colon || colon == line ||
				memchr(line, ' ', (size_t)(colon - line))))
			abort(); /* neither "Name: value" nor a continuation */
		line = eol + 2;
	}
	for (const char *line = hend + 4; line < end;) {
		const char *eol = memmem(line, (size_t)(end - line), "\r\n", 2);
		if (!eol)
			eol = end;
		if (eol - line > 78)
			abort(); /* quoted-printable keeps lines short */
		line = eol + 2;
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len)
{
	char *in = fz_str(data, len);
	const char *f[7];
	size_t at = 0;
	for (int i = 0; i < 7; i++) {
		f[i] = at <= len ? in + at : "";
		if (at <= len)
			at += strlen(in + at) + 1;
	}
	struct tvar item0[] = {{"name", f[2], NULL, 0}, {"price", "12.50", NULL, 0}};
	struct tvar item1[] = {{"name", "Mug", NULL, 0}, {"price", "8.00", NULL, 0}};
	struct tctx items[] = {{item0, 2, NULL}, {item1, 2, NULL}};
	struct tvar vars[] = {
		{"first_name", f[1], NULL, 0},
		{"store_name", "Maison <Demo>", NULL, 0},
		{"empty", "", NULL, 0},
		{"items", NULL, items, 2},
	};
	struct tctx ctx = {vars, 4, NULL};
	struct buf text = {0}, html = {0}, subj = {0}, msg = {0};
	char err[200] = "";
	int rt = tpl_render(f[0], &ctx, TPL_TEXT, tpl_dir, ".txt", &text, err,
			    sizeof err);
	if (rt < 0 && !err[0])
		abort();
	err[0] = '\0';
	int rh = tpl_render(f[0], &ctx, TPL_HTML, tpl_dir, ".html", &html, err,
			    sizeof err);
	if (rh < 0 && !err[0])
		abort();
	/* every '<' in the HTML came from the template or the partials,
	 * never from a variable: count against a render with "<" removed */
	if (rh == 0 && rt == 0 && !strchr(f[0], '<') && !strstr(f[0], "{{>") &&
	    count(html.data, html.len, '<') != 0)
		abort();
	if (rt == 0 && rh == 0 &&
	    tpl_render(f[5], &ctx, TPL_TEXT, tpl_dir, ".txt", &subj, err,
		       sizeof err) == 0) {
		struct mail m = {
			.from = *f[3] ? f[3] : "Shop <shop@example.com>",
			.to = *f[4] ? f[4] : "a@example.com",
			.subject = subj.data,
			.message_id = "<1.fuzz@example.com>",
			.list_unsub = "<https://shop.example.com/rm/u/x>",
			.text = text.data,
			.html = html.data,
			.date = FZ_NOW,
			.feedback_id = f[6],
		};
		if (mail_build(&m, &msg, err, sizeof err) == 0) {
			if (getenv("FZ_PRINT")) /* FZ_PRINT=1 ./template FILE */
				fwrite(msg.data, 1, msg.len, stderr);
			check_mail(&msg);
		}
		else if (!err[0])
			abort();
	}
	buf_free(&text), buf_free(&html), buf_free(&subj), buf_free(&msg);
	free(in);
	return 0;
}
