/*
 * tests/unit.c: unit tests of remarket's internal API (remarket.h).
 *
 * Every area gets one static function below, grouped under the names and
 * in the order of remarket.c's sections (search "==== Name" in both), after
 * the helpers the groups share; main() runs them in the order the areas
 * were added, which the TAP numbering keeps.
 * The tests run against real applications ("worlds": a config loaded by
 * cfg_load from REMARKET_* variables, a key file, a migrated SQLite file,
 * the repository's templates and an outbox directory), all inside one
 * mkdtemp directory under /tmp that is removed at the end. Time never
 * comes from the system clock: every call is given "now" as T0 plus an
 * offset, so flows that span days run in milliseconds.
 *
 * Output is TAP (tests/tap.h). Build and run: make build/san/unit &&
 * ./build/san/unit, or through prove (tests/10-unit.t, 11-valgrind.t).
 * The templates directory is $RM_TEMPLATES, else found from __FILE__,
 * else ./templates.
 */
#define _GNU_SOURCE
#include "remarket.h"
#include "tap.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <pthread.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <sodium.h>
#include <sqlite3.h>

#define T0 ((rm_time)1795000000) /* 2026-11-18T11:06:40Z, a Wednesday */
#define MIN 60
#define HOUR 3600
#define DAY 86400

#define HOOK_SECRET "whsec_unit_test"
#define TICK_TOKEN "tick-unit-token"
#define CART_URL "https://shop.example.com/cart?restore={cart}&code={code}"
#define BASE_URL "https://shop.example.com/rm"

static char tmpdir[PATH_MAX];    /* mkdtemp; removed at the end */
static char templates[PATH_MAX]; /* the repository's templates/, absolute */

/* ==== Helpers shared by the tests ===================================== */

/* A printable form of S for test names: control bytes and non-ASCII as
 * \xNN, long strings cut. Eight rotating buffers. */
static const char *vis(const char *s)
{
	static char ring[8][120];
	static int at;
	char *o = ring[at++ % 8];
	size_t n = 0;
	if (!s)
		return "NULL";
	for (; *s && n < 100; s++) {
		unsigned char c = (unsigned char)*s;
		if (c < 0x20 || c >= 0x7F)
			n += (size_t)snprintf(o + n, 120 - n, "\\x%02X", c);
		else
			o[n++] = (char)c;
	}
	if (*s)
		n += (size_t)snprintf(o + n, 120 - n, "...");
	o[n] = '\0';
	return o;
}

static int contains(const char *hay, const char *needle)
{
	return hay && needle && strstr(hay, needle) != NULL;
}

static int count_of(const char *hay, const char *needle)
{
	int n = 0;
	for (const char *p = hay; p && (p = strstr(p, needle)); p += strlen(needle))
		n++;
	return n;
}

static char *repeat(const char *unit, size_t n)
{
	struct buf b = {0};
	for (size_t i = 0; i < n; i++)
		buf_adds(&b, unit);
	buf_add(&b, "", 0);
	return b.data;
}

static int write_file(const char *path, const void *data, size_t n)
{
	FILE *f = fopen(path, "wb");
	if (!f)
		return -1;
	int rc = fwrite(data, 1, n, f) == n ? 0 : -1;
	return fclose(f) || rc ? -1 : 0;
}

static int rm_entry(const char *path, const struct stat *st, int flag,
		    struct FTW *ftw)
{
	(void)st, (void)flag, (void)ftw;
	return remove(path);
}

/* Quoted-printable decoding, for reading back what mail_build wrote. */
static void qp_decode(const char *s, size_t n, struct buf *out)
{
	const char *end = s + n;
	while (s < end) {
		if (s[0] == '=' && end - s >= 3 && s[1] == '\r' && s[2] == '\n') {
			s += 3;
		} else if (s[0] == '=' && end - s >= 3 &&
			   isxdigit((unsigned char)s[1]) &&
			   isxdigit((unsigned char)s[2])) {
			char hex[3] = {s[1], s[2], 0};
			char c = (char)strtol(hex, NULL, 16);
			buf_add(out, &c, 1);
			s += 3;
		} else if (s[0] == '\r' && end - s >= 2 && s[1] == '\n') {
			buf_add(out, "\n", 1);
			s += 2;
		} else {
			buf_add(out, s++, 1);
		}
	}
	buf_add(out, "", 0);
}

/* The longest line of S, not counting its CRLF. */
static size_t longest_line(const char *s)
{
	size_t max = 0;
	while (*s) {
		size_t n = strcspn(s, "\r\n");
		if (n > max)
			max = n;
		s += n;
		s += strspn(s, "\r\n") > 2 ? 2 : strspn(s, "\r\n");
	}
	return max;
}

/* 1 if every LF is preceded by CR and every CR followed by LF. */
static int all_crlf(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (s[i] == '\n' && (i == 0 || s[i - 1] != '\r'))
			return 0;
		if (s[i] == '\r' && (i + 1 >= n || s[i + 1] != '\n'))
			return 0;
	}
	return 1;
}

/* The value of header NAME in a header block (unfolded), or "". */
static const char *header_of(const char *msg, const char *name)
{
	static char val[2048];
	size_t n = strlen(name);
	val[0] = '\0';
	for (const char *p = msg; p && *p;) {
		if (!strncmp(p, "\r\n", 2))
			break; /* end of the header block */
		if (!strncasecmp(p, name, n) && p[n] == ':') {
			const char *v = p + n + 1;
			size_t o = 0;
			while (*v == ' ')
				v++;
			while (*v && o + 1 < sizeof val) {
				if (!strncmp(v, "\r\n", 2) && (v[2] == ' ' || v[2] == '\t'))
					v += 2; /* folded: keep the whitespace */
				else if (!strncmp(v, "\r\n", 2))
					break;
				else
					val[o++] = *v++;
			}
			val[o] = '\0';
			return val;
		}
		p = strstr(p, "\r\n");
		if (p)
			p += 2;
	}
	return val;
}

static void set_cfg(char **slot, const char *v);

/* ---- worlds: a real app in the temp dir ---- */

struct world {
	struct config cfg;
	struct app app;
	char name[32];
	char outbox[PATH_MAX];
};

static int world_open(struct world *w, const char *name)
{
	char db[PATH_MAX], err[512] = "";
	struct db *d = NULL;
	memset(w, 0, sizeof *w);
	snprintf(w->name, sizeof w->name, "%s", name);
	snprintf(db, sizeof db, "%s/%s.db", tmpdir, name);
	snprintf(w->outbox, sizeof w->outbox, "%s/%s-outbox", tmpdir, name);
	setenv("REMARKET_DB", db, 1);
	setenv("REMARKET_OUTBOX", w->outbox, 1);
	if (cfg_load(&w->cfg, NULL, err, sizeof err) < 0 ||
	    db_open(&d, w->cfg.db, err, sizeof err) < 0 ||
	    db_migrate(d, err, sizeof err) < 0) {
		diag("world %s: %s", name, err);
		db_close(d);
		cfg_free(&w->cfg);
		return -1;
	}
	db_close(d);
	if (app_open(&w->app, &w->cfg, err, sizeof err) < 0) {
		diag("world %s: %s", name, err);
		cfg_free(&w->cfg);
		return -1;
	}
	/* these worlds expect every enrollee to be messaged: the default 10 %
	 * holdout is switched off here and tested in test_measurement */
	db_scalar(w->app.db, "UPDATE flows SET holdout_pct = 0");
	return 0;
}

static void world_close(struct world *w)
{
	app_close(&w->app);
	cfg_free(&w->cfg);
}

static long long sq(struct world *w, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static long long sq(struct world *w, const char *fmt, ...)
{
	char sql[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(sql, sizeof sql, fmt, ap);
	va_end(ap);
	return db_scalar(w->app.db, sql);
}

/* The first column of the first row as text (malloc'd, or NULL), read
 * through a connection of the test's own: db_scalar only gives numbers. */
static char *sq_text(struct world *w, const char *sql)
{
	sqlite3 *h = NULL;
	sqlite3_stmt *s = NULL;
	char *v = NULL;
	if (sqlite3_open_v2(w->cfg.db, &h, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
	    sqlite3_prepare_v2(h, sql, -1, &s, NULL) == SQLITE_OK &&
	    sqlite3_step(s) == SQLITE_ROW && sqlite3_column_text(s, 0))
		v = strdup((const char *)sqlite3_column_text(s, 0));
	sqlite3_finalize(s);
	sqlite3_close(h);
	return v;
}

static int ingest(struct world *w, enum ev_source src, const char *json,
		  rm_time now, struct ev_error *err)
{
	return ev_ingest(&w->app, src, json, strlen(json), NULL, now, err);
}

static int outbox_count(struct world *w)
{
	DIR *d = opendir(w->outbox);
	int n = 0;
	if (!d)
		return 0;
	for (struct dirent *e; (e = readdir(d));) {
		size_t l = strlen(e->d_name);
		n += l > 4 && !strcmp(e->d_name + l - 4, ".eml");
	}
	closedir(d);
	return n;
}

/* The outbox file of message row ID, or -1. */
static int outbox_read(struct world *w, long long id, struct buf *out)
{
	char path[PATH_MAX + 32];
	snprintf(path, sizeof path, "%s/m%06lld.eml", w->outbox, id);
	FILE *f = fopen(path, "rb");
	if (!f)
		return -1;
	char chunk[4096];
	size_t n;
	while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
		buf_add(out, chunk, n);
	fclose(f);
	return buf_add(out, "", 0);
}

/* A cart event of one consenting (or not) shopper, at now. */
static int cart_event(struct world *w, const char *email, const char *name,
		      const char *cart, int consent, rm_time now)
{
	struct buf b = {0};
	struct ev_error err;
	buf_addf(&b, "{\"type\":\"cart\",\"email\":\"%s\",\"name\":\"%s\","
		 "\"consent\":%s,\"cart_id\":\"%s\",\"currency\":\"EUR\","
		 "\"items\":[{\"sku\":\"LAMP-1\",\"name\":\"Linen lamp\","
		 "\"price\":49.5,\"qty\":2,\"url\":\"https://shop.example.com/p/lamp\"},"
		 "{\"sku\":\"RUG-2\",\"name\":\"Wool rug\",\"price\":120}]}",
		 email, name, consent ? "true" : "false", cart);
	int rc = ingest(w, EV_HOOK, b.data, now, &err);
	if (rc != 1)
		diag("cart event for %s: %d %d %s", email, rc, err.status, err.msg);
	buf_free(&b);
	return rc;
}

static int tick(struct world *w, rm_time now, struct tick_summary *sum)
{
	int rc = flow_tick(&w->app, now, sum);
	if (rc < 0)
		diag("flow_tick at T0%+lld failed", (long long)(now - T0));
	return rc;
}

/* An HTTP request straight into http_handle. */
static void http(struct world *w, const char *method, const char *path,
		 const char *body, const char *sig, const char *auth,
		 rm_time now, struct http_resp *rs)
{
	struct http_req rq = {0};
	rq.method = method;
	rq.path = path;
	rq.content_type = body ? "application/json" : NULL;
	rq.signature = sig;
	rq.authorization = auth;
	rq.remote_addr = "127.0.0.1";
	rq.body = body;
	rq.body_len = body ? strlen(body) : 0;
	memset(rs, 0, sizeof *rs);
	http_handle(&w->app, &rq, rs, now);
}

static const char *resp_header(const struct http_resp *rs, const char *name)
{
	static char val[2048];
	size_t n = strlen(name);
	val[0] = '\0';
	for (const char *p = rs->headers.data; p && *p;) {
		size_t len = strcspn(p, "\r\n");
		if (len > n + 1 && !strncasecmp(p, name, n) && p[n] == ':') {
			snprintf(val, sizeof val, "%.*s", (int)(len - n - 2), p + n + 2);
			return val;
		}
		p += len;
		p += strspn(p, "\r\n");
	}
	return val;
}

static const char *buf_str_or(const struct buf *b)
{
	return b->data ? b->data : "";
}

static int render(const char *tpl, const struct tctx *ctx, enum tpl_mode mode,
		  const char *dir, const char *ext, struct buf *out, char *err,
		  size_t errlen)
{
	out->len = 0;
	if (out->data)
		out->data[0] = '\0';
	err[0] = '\0';
	return tpl_render(tpl, ctx, mode, dir ? dir : tmpdir, ext ? ext : ".txt",
			  out, err, errlen);
}

/* The decoded text of an RFC 2047 header value (=?UTF-8?B?...?= words). */
static int rfc2047_decode(const char *v, struct buf *out)
{
	while (*v) {
		while (*v == ' ' || *v == '\t')
			v++;
		if (strncmp(v, "=?UTF-8?B?", 10) != 0)
			return buf_adds(out, v), 0; /* plain text */
		v += 10;
		const char *e = strstr(v, "?=");
		if (!e)
			return -1;
		unsigned char bin[256];
		size_t n = 0;
		if (sodium_base642bin(bin, sizeof bin, v, (size_t)(e - v), NULL, &n, NULL,
				      sodium_base64_VARIANT_ORIGINAL))
			return -1;
		buf_add(out, bin, n);
		v = e + 2;
	}
	return buf_add(out, "", 0);
}

/* The decoded body of the MIME part with Content-Type CTYPE. */
static int mime_part(const char *msg, const char *ctype, struct buf *out)
{
	char bnd[128], delim[140];
	const char *b = strstr(msg, "boundary=\"");
	if (!b || sscanf(b + 10, "%127[^\"]", bnd) != 1)
		return -1;
	snprintf(delim, sizeof delim, "\r\n--%s", bnd);
	const char *p = strstr(msg, ctype);
	const char *body = p ? strstr(p, "\r\n\r\n") : NULL;
	const char *end = body ? strstr(body + 4, delim) : NULL;
	if (!end)
		return -1;
	qp_decode(body + 4, (size_t)(end - body - 4), out);
	return 0;
}

struct counts {
	long long events, contacts, carts, orders, visitors, products;
};

static struct counts counts_of(struct world *w)
{
	struct counts c = {
		sq(w, "SELECT count(*) FROM events"),
		sq(w, "SELECT count(*) FROM contacts"),
		sq(w, "SELECT count(*) FROM carts"),
		sq(w, "SELECT count(*) FROM orders"),
		sq(w, "SELECT count(*) FROM visitors"),
		sq(w, "SELECT count(*) FROM products"),
	};
	return c;
}

static int same_counts(struct counts a, struct counts b)
{
	return !memcmp(&a, &b, sizeof a);
}

/* A cart event with N items. */
static char *items_cart(const char *cart, int n)
{
	struct buf b = {0};
	buf_addf(&b, "{\"type\":\"cart\",\"cart_id\":\"%s\",\"items\":[", cart);
	for (int i = 0; i < n; i++)
		buf_addf(&b, "%s{\"sku\":\"S%d\",\"name\":\"N\",\"price\":1}", i ? "," : "", i);
	buf_adds(&b, "]}");
	return b.data;
}

static int sum_is(const struct tick_summary *s, long ab, long en, long se)
{
	return s->abandoned == ab && s->enrolled == en && s->sent == se &&
	       s->failed == 0;
}

static void show_sum(const char *what, const struct tick_summary *s)
{
	diag("  %s: abandoned %ld enrolled %ld sent %ld retry %ld failed %ld "
	     "exited %ld skipped %ld", what, s->abandoned, s->enrolled, s->sent,
	     s->retry, s->failed, s->exited, s->skipped);
}

/* One shopper's flow up to step 1, for the exit tests. */
static int exit_world(struct world *w, const char *name)
{
	struct tick_summary s;
	if (world_open(w, name) < 0)
		return -1;
	if (cart_event(w, "ann@example.com", "Ann", "a1", 1, T0) != 1 ||
	    tick(w, T0 + HOUR, &s) < 0 || s.sent != 1) {
		world_close(w);
		return -1;
	}
	return 0;
}

/* After an exit: no more mail at +24 h and +72 h. */
static void no_more_mail(struct world *w, const char *why)
{
	struct tick_summary s1, s2;
	ok(tick(w, T0 + DAY, &s1) == 0 && s1.sent == 0 && tick(w, T0 + 3 * DAY, &s2) == 0 &&
		   s2.sent == 0, "%s: steps 2 and 3 never sent", why);
	is_int(outbox_count(w), 1, "... the outbox holds only step 1");
	is_int(sq(w, "SELECT count(*) FROM enrollments WHERE status='exited' AND exit_reason='%s'", why), 1,
	       "... the enrollment exited with the reason");
}

struct claimer {
	struct app *app;
	rm_time now;
	pthread_barrier_t *start;
	int64_t got[256];
	int n, err;
};

static void *claim_loop(void *arg)
{
	struct claimer *c = arg;
	pthread_barrier_wait(c->start);
	for (;;) {
		int64_t ids[1];
		int n = flow_claim(c->app, c->now, ids, 1);
		if (n < 0) {
			c->err = 1;
			break;
		}
		if (n == 0)
			break;
		for (int i = 0; i < n && c->n < 256; i++)
			c->got[c->n++] = ids[i];
		/* a tick works between claims: let the other writer in */
		nanosleep(&(struct timespec){0, 200 * 1000}, NULL);
	}
	return NULL;
}

/* cart_url with {cart} and {code} replaced (values here need no escaping). */
static void expand_cart_url(const char *url, const char *cart, const char *code, struct buf *out)
{
	while (*url) {
		if (!strncmp(url, "{cart}", 6))
			buf_adds(out, cart), url += 6;
		else if (!strncmp(url, "{code}", 6))
			buf_adds(out, code), url += 6;
		else
			buf_add(out, url++, 1);
	}
}

static int near(double got, double want, double tol, const char *name)
{
	int r = ok(fabs(got - want) <= tol, "%s", name);
	if (!r)
		diag("got %.6f, want %.6f (+- %g)", got, want, tol);
	return r;
}

/* Clicks the recovery link of message ID at NOW. */
static int click(struct world *w, long long id, rm_time now)
{
	char tok[TOK_MAXLEN + 1], path[128];
	struct http_resp rs;
	tok_sign(w->app.key, TOK_RECOVER, id, now + DAY, tok, sizeof tok);
	snprintf(path, sizeof path, "/r/%s", tok);
	http(w, "GET", path, NULL, NULL, NULL, now, &rs);
	int st = rs.status;
	http_resp_free(&rs);
	return st;
}

static int order(struct world *w, const char *id, const char *email,
		 const char *code, double total, rm_time now)
{
	char body[512];
	struct ev_error err;
	snprintf(body, sizeof body, "{\"type\":\"order\",\"order_id\":\"%s\","
		 "\"email\":\"%s\",\"total\":%.2f,\"currency\":\"EUR\"%s%s%s}", id,
		 email, total, code ? ",\"discount_code\":\"" : "", code ? code : "",
		 code ? "\"" : "");
	int rc = ingest(w, EV_HOOK, body, now, &err);
	if (rc < 0)
		diag("order %s: %d %s", id, rc, err.msg);
	return rc;
}

static char *attribution(struct world *w, const char *order_id, long long *msg)
{
	char q[160];
	snprintf(q, sizeof q, "SELECT coalesce(message, 0) FROM orders WHERE order_key = '%s'",
		 order_id);
	*msg = db_scalar(w->app.db, q);
	snprintf(q, sizeof q, "SELECT coalesce(attribution, 'none') FROM orders "
		 "WHERE order_key = '%s'", order_id);
	return sq_text(w, q);
}

static void is_attr(struct world *w, const char *order_id, const char *how,
		    long long msg, const char *name)
{
	long long got_msg;
	char *got = attribution(w, order_id, &got_msg);
	ok(got && !strcmp(got, how) && got_msg == msg, "%s", name);
	if (!got || strcmp(got, how) || got_msg != msg)
		diag("got %s to message %lld, want %s to %lld", got ? got : "(null)",
		     got_msg, how, msg);
	free(got);
}

static void set_cfg(char **slot, const char *v)
{
	free(*slot);
	*slot = strdup(v);
}

/* An order of one line of SKU by EMAIL (consenting), at TS. */
static int order_line(struct world *w, const char *id, const char *email,
		      const char *sku, double price, rm_time ts, rm_time now)
{
	char body[512];
	struct ev_error err;
	snprintf(body, sizeof body, "{\"type\":\"order\",\"order_id\":\"%s\","
		 "\"email\":\"%s\",\"consent\":true,\"total\":%.2f,\"ts\":%lld,"
		 "\"items\":[{\"sku\":\"%s\",\"name\":\"%s\",\"price\":%.2f}]}",
		 id, email, price, (long long)ts, sku, sku, price);
	int rc = ingest(w, EV_CLI, body, now, &err);
	if (rc < 0)
		diag("order %s: %s", id, err.msg);
	return rc;
}

static void product(struct world *w, const char *sku, const char *cat, rm_time now)
{
	char body[256];
	struct ev_error err;
	snprintf(body, sizeof body, "{\"type\":\"product\",\"sku\":\"%s\",\"name\":"
		 "\"Product %s\",\"price\":10,\"category\":\"%s\",\"url\":"
		 "\"https://shop.example/p/%s\"}", sku, sku, cat, sku);
	ingest(w, EV_CLI, body, now, &err);
}

static long long winback_sent(struct world *w, const char *email, int step)
{
	char q[300];
	snprintf(q, sizeof q, "SELECT count(*) FROM messages m JOIN enrollments e ON "
		 "e.id = m.enrollment_id JOIN contacts c ON c.id = m.contact_id WHERE "
		 "e.flow_id = 2 AND m.status = 'sent' AND c.email = '%s'%s", email,
		 step == 1 ? " AND m.step = 1" : step == 2 ? " AND m.step = 2" :
		 step == 3 ? " AND m.step = 3" : "");
	return db_scalar(w->app.db, q);
}

/* Runs import_orders (ORDERS) or import_products on CSV; what it prints
 * on stdout and stderr goes to OUT and ERR. Returns its result. */
static int csv_run(struct world *w, int orders, const char *csv, char *out,
		   size_t outlen, char *err, size_t errlen)
{
	FILE *f = fmemopen((void *)csv, strlen(csv), "r");
	FILE *co = tmpfile(), *ce = tmpfile();
	int rc = -9, so = dup(1), se = dup(2);
	if (f && co && ce && so >= 0 && se >= 0) {
		fflush(stdout), fflush(stderr);
		dup2(fileno(co), 1), dup2(fileno(ce), 2);
		rc = orders ? import_orders(&w->app, f, T0) : import_products(&w->app, f, T0);
		fflush(stdout), fflush(stderr);
		dup2(so, 1), dup2(se, 2);
	}
	*out = *err = '\0';
	if (co)
		rewind(co), out[fread(out, 1, outlen - 1, co)] = '\0', fclose(co);
	if (ce)
		rewind(ce), err[fread(err, 1, errlen - 1, ce)] = '\0', fclose(ce);
	if (so >= 0)
		close(so);
	if (se >= 0)
		close(se);
	if (f)
		fclose(f);
	return rc;
}

static int browser_req(struct world *w, const char *method, const char *path,
		       const char *origin, const char *ip, const char *cookie,
		       const char *body, rm_time now, struct http_resp *rs)
{
	struct http_req rq = {0};
	char p[256];
	snprintf(p, sizeof p, "%s", path);
	char *query = strchr(p, '?');
	if (query)
		*query++ = '\0';
	rq.method = method;
	rq.path = p;
	rq.query = query;
	rq.content_type = body ? "text/plain;charset=UTF-8" : NULL;
	rq.origin = origin;
	rq.remote_addr = ip;
	rq.cookie = cookie;
	rq.body = body;
	rq.body_len = body ? strlen(body) : 0;
	memset(rs, 0, sizeof *rs);
	http_handle(&w->app, &rq, rs, now);
	return rs->status;
}

/* One request through the front-ends' whole path (http_serve_cgi); ENV is
 * a NULL-terminated "NAME=value" list. Returns the status; the whole CGI
 * answer is left in OUT. */
static int cgi_req(struct world *w, const char *const *env, const char *body,
		   struct buf *out)
{
	out->len = 0;
	http_serve_cgi(&w->app, env, body, body ? strlen(body) : 0, out);
	buf_add(out, "", 0);
	int status = 0;
	if (sscanf(out->data, "Status: %d", &status) != 1)
		status = -1;
	return status;
}

/* The report link's subject, as remarket computes it (pins the format). */
static int64_t report_subject_of(const char *tick_token)
{
	unsigned char h[8];
	crypto_generichash(h, sizeof h, (const unsigned char *)"remarket report",
			   15, (const unsigned char *)tick_token, strlen(tick_token));
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = (v << 8) | h[i];
	return (int64_t)(v >> 1);
}

/* The decoded subject, text and HTML of message row ID, in OUT. */
static int mail_text(struct world *w, long long id, struct buf *out)
{
	struct buf raw = {0};
	int rc = outbox_read(w, id, &raw);
	if (rc == 0) {
		rfc2047_decode(header_of(raw.data, "Subject"), out);
		buf_adds(out, "\n");
		rc = mime_part(raw.data, "text/plain", out) ||
		     mime_part(raw.data, "text/html", out);
	}
	buf_free(&raw);
	return rc;
}

static int collect(struct world *w, const char *cookie, const char *body,
		   rm_time now)
{
	struct http_resp rs;
	int st = browser_req(w, "POST", "/collect", NULL, "10.9.9.9", cookie, body,
			     now, &rs);
	if (st != 204)
		diag("POST /collect %s: %d %s", body, st, rs.body.data ? rs.body.data : "");
	http_resp_free(&rs);
	return st;
}

/* POST /discounts/validate with BODY at NOW: the status, the answer in OUT. */
static int validate(struct world *w, const char *body, rm_time now, struct buf *out)
{
	struct http_resp rs;
	http(w, "POST", "/discounts/validate", body, NULL, NULL, now, &rs);
	int st = rs.status;
	out->len = 0;
	buf_adds(out, rs.body.data ? rs.body.data : "");
	http_resp_free(&rs);
	return st;
}

/* A signed-hook cart of one consenting shopper, dated TS, arriving at NOW. */
static int cart_dated(struct world *w, const char *email, const char *cart,
		      rm_time ts, rm_time now)
{
	char json[512];
	struct ev_error err;
	snprintf(json, sizeof json, "{\"type\":\"cart\",\"email\":\"%s\",\"consent\":true,"
		 "\"cart_id\":\"%s\",\"ts\":%lld,\"currency\":\"EUR\",\"items\":"
		 "[{\"sku\":\"LAMP-1\",\"name\":\"Linen lamp\",\"price\":49.5}]}",
		 email, cart, (long long)ts);
	int rc = ingest(w, EV_HOOK, json, now, &err);
	if (rc != 1)
		diag("cart %s: %d %s", cart, rc, err.msg);
	return rc;
}

/* ==== Buffers and small helpers ======================================= */

static void test_buffers(void)
{
	/* buf: growth, NUL termination, embedded NULs, printf, free */
	struct buf b = {0};
	ok(buf_add(&b, "", 0) == 0 && b.data && b.len == 0 && b.data[0] == '\0',
	   "buf_add of nothing gives an allocated empty string");
	ok(buf_adds(&b, "abc") == 0 && buf_add(&b, "d\0e", 3) == 0,
	   "buf_adds and buf_add succeed");
	is_int((long long)b.len, 6, "buf len counts embedded NUL bytes");
	ok(memcmp(b.data, "abcd\0e", 7) == 0, "bytes kept in order and NUL-terminated");
	b.len = 0;
	ok(buf_addf(&b, "%s-%d-%05.1f", "x", 42, 3.14159) == 0, "buf_addf succeeds");
	is_str(b.data, "x-42-003.1", "buf_addf formats like printf");
	for (int i = 0; i < 2000; i++)
		buf_addf(&b, "%08d", i);
	is_int((long long)b.len, 10 + 2000 * 8, "buf grows over many appends");
	ok(b.cap > b.len && b.data[b.len] == '\0', "buf keeps room for the NUL");
	is_str(b.data + b.len - 8, "00001999", "last append is intact");
	buf_free(&b);
	ok(!b.data && !b.len && !b.cap, "buf_free resets the buffer");
	buf_free(&b); /* twice is harmless */

	/* html_escape */
	ok(html_escape(&b, "<a href=\"x\">Tom & Jerry's</a>") == 0, "html_escape succeeds");
	is_str(b.data, "&lt;a href=&quot;x&quot;&gt;Tom &amp; Jerry&#39;s&lt;/a&gt;",
	       "html_escape escapes < > & \" '");
	buf_free(&b);
}

/* buf: the sticky error; builders given a failed buffer fail */
static void test_buffer_errors(void)
{
	char err[256];
	struct buf b = {0};
	buf_adds(&b, "abc");
	ok(!buf_failed(&b), "buf_failed: a buffer starts without error");
	ok(buf_add(&b, "x", SIZE_MAX) < 0 && buf_failed(&b),
	   "buf_add of SIZE_MAX bytes fails and sets the sticky error");
	ok(buf_adds(&b, "def") < 0 && buf_addf(&b, "%d", 42) < 0 &&
	   buf_add(&b, "g", 1) < 0 && html_escape(&b, "<") < 0,
	   "once failed, every append returns -1");
	ok(b.len == 3 && !strcmp(b.data, "abc") && buf_failed(&b),
	   "once failed, appends change nothing and the error stays");
	buf_reset(&b);
	ok(!buf_failed(&b) && b.len == 0 && b.data && !*b.data,
	   "buf_reset empties the buffer and clears the error");
	ok(buf_adds(&b, "ok") == 0 && !strcmp(b.data, "ok"),
	   "after buf_reset appends work again");
	buf_add(&b, "", SIZE_MAX - 1);
	ok(buf_failed(&b), "a size past SIZE_MAX - len sets the error");
	buf_free(&b);
	ok(!buf_failed(&b) && !b.data, "buf_free clears the error");
	buf_addf(&b, "%s", "");
	ok(buf_add(&b, "", SIZE_MAX) < 0 && buf_failed(&b) && b.len == 0,
	   "the error is set on an allocated empty buffer too");

	/* tpl_render into a failed buffer: -1 and a reason */
	struct tvar v[] = {{"name", "Ann", NULL, 0}};
	struct tctx ctx = {v, 1, NULL};
	err[0] = '\0';
	ok(tpl_render("Hi {{name}}", &ctx, TPL_TEXT, tmpdir, ".txt", &b, err,
		      sizeof err) < 0, "tpl_render into a failed buffer returns -1");
	is_str(err, "out of memory rendering the template",
	       "... and says out of memory");
	ok(tpl_render("Hi {{name}}", &ctx, TPL_HTML, tmpdir, ".html", &b, err,
		      sizeof err) < 0, "... in HTML mode too");
	buf_free(&b);

	/* mail_build into a failed buffer: -1 and a reason */
	struct mail m = {
		.from = "Maison Démo <shop@example.com>",
		.to = "ann@example.com",
		.subject = "Votre panier vous attend — à bientôt",
		.message_id = "<rm.1.abc@example.com>",
		.list_unsub = "<https://shop.example.com/rm/u/TOKEN>",
		.text = "Hi Ann,\n",
		.html = "<p>Hi Ann,</p>\n",
		.date = T0,
	};
	ok(mail_build(&m, &b, err, sizeof err) == 0 && !buf_failed(&b),
	   "mail_build succeeds into a good buffer");
	buf_reset(&b);
	buf_add(&b, "", SIZE_MAX);
	err[0] = '\0';
	ok(mail_build(&m, &b, err, sizeof err) < 0,
	   "mail_build into a failed buffer returns -1");
	is_str(err, "out of memory building the message", "... and says out of memory");
	ok(b.len == 0, "... and writes nothing");
	buf_free(&b);

	/* http_handle: a response whose buffer failed is answered 500 */
	struct world w;
	if (!ok(world_open(&w, "buferr") == 0, "buffer errors: world opens"))
		return;
	struct http_req rq = {0};
	rq.method = "GET";
	rq.path = "/health";
	rq.remote_addr = "127.0.0.1";
	struct http_resp rs = {0};
	http_handle(&w.app, &rq, &rs, T0);
	ok(rs.status == 200 && !strcmp(buf_str_or(&rs.body), "ok\n"),
	   "GET /health answers ok with good buffers");
	http_resp_free(&rs);
	for (int i = 0; i < 2; i++) {
		memset(&rs, 0, sizeof rs);
		buf_adds(i ? &rs.headers : &rs.body, "partial");
		buf_add(i ? &rs.headers : &rs.body, "", SIZE_MAX);
		http_handle(&w.app, &rq, &rs, T0);
		is_int(rs.status, 500, i ? "a failed header buffer: 500"
					 : "a failed body buffer: 500");
		is_str(buf_str_or(&rs.body), "{\"error\":\"out of memory\"}",
		       "... with a JSON error, nothing of the cut-short response");
		ok(!buf_failed(&rs.body) && !buf_failed(&rs.headers) &&
		   rs.headers.len == 0, "... and clean buffers");
		http_resp_free(&rs);
	}
	world_close(&w);
}

/* ==== The application object ========================================== */

static void test_keyring(void)
{
	char ring_path[PATH_MAX + 32], bad_path[PATH_MAX + 32], tok[TOK_MAXLEN + 1];
	unsigned char ring[2 * RM_KEYBYTES], other[RM_KEYBYTES];
	const char *key_file = getenv("REMARKET_KEY_FILE");
	char saved[PATH_MAX];
	int64_t subj = 0;
	struct world w;
	snprintf(saved, sizeof saved, "%s", key_file ? key_file : "");
	for (int i = 0; i < RM_KEYBYTES; i++) {
		ring[i] = (unsigned char)(i * 13 + 1); /* setup()'s key: the old one */
		ring[RM_KEYBYTES + i] = (unsigned char)(i * 7 + 3);
		other[i] = (unsigned char)(i * 5 + 2);
	}
	snprintf(ring_path, sizeof ring_path, "%s/ring.key", tmpdir);
	write_file(ring_path, ring, sizeof ring);
	setenv("REMARKET_KEY_FILE", ring_path, 1);
	if (ok(world_open(&w, "keyring") == 0, "keyring: a key file of two keys opens")) {
		ok(!memcmp(w.app.key, ring + RM_KEYBYTES, RM_KEYBYTES) && w.app.nold == 1,
		   "keyring: the last key of the file signs, the first is kept to verify");
		tok_sign(ring, TOK_UNSUB, 42, T0 + DAY, tok, sizeof tok);
		ok(app_tok_verify(&w.app, tok, TOK_UNSUB, T0, &subj) == TOK_OK && subj == 42,
		   "keyring: a token of the old key verifies");
		is_int(tok_verify(w.app.key, tok, TOK_UNSUB, T0, &subj), TOK_FORGED,
		       "keyring: ... which the new key alone would call forged");
		tok_sign(w.app.key, TOK_UNSUB, 43, T0 + DAY, tok, sizeof tok);
		ok(app_tok_verify(&w.app, tok, TOK_UNSUB, T0, &subj) == TOK_OK && subj == 43,
		   "keyring: a token of the new key verifies");
		tok_sign(other, TOK_UNSUB, 44, T0 + DAY, tok, sizeof tok);
		is_int(app_tok_verify(&w.app, tok, TOK_UNSUB, T0, &subj), TOK_FORGED,
		       "keyring: a token of a key not in the ring is forged");
		tok_sign(ring, TOK_UNSUB, 45, T0 - 1, tok, sizeof tok);
		is_int(app_tok_verify(&w.app, tok, TOK_UNSUB, T0, &subj), TOK_EXPIRED,
		       "keyring: an expired token of the old key is expired, not forged");
		tok_sign(ring, TOK_RECOVER, 46, T0 + DAY, tok, sizeof tok);
		is_int(app_tok_verify(&w.app, tok, TOK_UNSUB, T0, &subj), TOK_WRONG_KIND,
		       "keyring: an old key's token of another kind is the wrong kind");
		/* a link mailed before the rotation, opened after it */
		struct tick_summary sum;
		struct http_resp rs;
		char path[128];
		cart_event(&w, "ring@example.com", "Ring", "ring1", 1, T0);
		tick(&w, T0 + HOUR, &sum);
		long long m = sq(&w, "SELECT id FROM messages WHERE status = 'sent'");
		tok_sign(ring, TOK_UNSUB, m, T0 + 400 * DAY, tok, sizeof tok);
		snprintf(path, sizeof path, "/u/%s", tok);
		http(&w, "GET", path, NULL, NULL, NULL, T0 + 2 * HOUR, &rs);
		ok(m > 0 && rs.status == 200, "keyring: an unsubscribe link of the old key opens its page (%d)",
		   rs.status);
		http_resp_free(&rs);
		tok_sign(ring, TOK_RECOVER, m, T0 + 30 * DAY, tok, sizeof tok);
		snprintf(path, sizeof path, "/r/%s", tok);
		http(&w, "GET", path, NULL, NULL, NULL, T0 + 2 * HOUR, &rs);
		is_int(rs.status, 302, "keyring: a cart link of the old key restores the cart");
		http_resp_free(&rs);
		world_close(&w);
	}
	/* a key file that is not whole keys is refused, with the fix */
	snprintf(bad_path, sizeof bad_path, "%s/bad.key", tmpdir);
	write_file(bad_path, ring, RM_KEYBYTES + 1);
	setenv("REMARKET_KEY_FILE", bad_path, 1);
	struct config cfg;
	struct app app;
	char err[512] = "";
	if (cfg_load(&cfg, NULL, err, sizeof err) == 0) {
		ok(app_open(&app, &cfg, err, sizeof err) < 0 && contains(err, "32-byte keys") &&
			   contains(err, "bad.key"),
		   "keyring: a key file of 33 bytes is refused, naming the file (%s)", err);
		cfg_free(&cfg);
	}
	setenv("REMARKET_KEY_FILE", saved, 1);
}

/* ==== Validators ====================================================== */

struct vcase {
	const char *s;
	int want;
};

static void test_validators(void)
{
	/* val_utf8 */
	static const struct {
		const char *s;
		size_t n;
		int want;
		const char *what;
	} u[] = {
		{"plain ASCII", 11, 1, "ASCII"},
		{"Zo\xC3\xAB \xE2\x82\xAC \xF0\x9F\x98\x80", 13, 1, "2-, 3- and 4-byte sequences"},
		{"\xEF\xBF\xBF", 3, 1, "U+FFFF"},
		{"\xF4\x8F\xBF\xBF", 4, 1, "U+10FFFF, the last code point"},
		{"a\0b", 3, 1, "an embedded NUL"},
		{"", 0, 1, "empty"},
		{"\xC0\x80", 2, 0, "overlong C0 80"},
		{"\xC1\xBF", 2, 0, "overlong C1 BF"},
		{"\xE0\x80\xAF", 3, 0, "overlong 3-byte slash"},
		{"\xF0\x80\x80\xAF", 4, 0, "overlong 4-byte slash"},
		{"\xED\xA0\x80", 3, 0, "surrogate ED A0 80 (U+D800)"},
		{"\xED\xBF\xBF", 3, 0, "surrogate ED BF BF (U+DFFF)"},
		{"\xE2\x82", 2, 0, "truncated 3-byte sequence"},
		{"abc\xF0\x9F\x98", 6, 0, "truncated 4-byte sequence at the end"},
		{"\xF4\x90\x80\x80", 4, 0, "U+110000, above U+10FFFF"},
		{"\xF5\x80\x80\x80", 4, 0, "lead byte F5"},
		{"\xF8\x88\x80\x80\x80", 5, 0, "5-byte form"},
		{"\x80", 1, 0, "lone continuation byte"},
		{"\xC3\x28", 2, 0, "bad continuation byte"},
		{"\xFF", 1, 0, "byte FF"},
	};
	for (size_t i = 0; i < sizeof u / sizeof u[0]; i++)
		ok(val_utf8(u[i].s, u[i].n) == u[i].want, "val_utf8 %s %s",
		   u[i].want ? "accepts" : "rejects", u[i].what);

	/* val_email */
	char *local64 = repeat("a", 64), *l63 = repeat("b", 63), *l61 = repeat("d", 61);
	char e254[300], e255[300], local65[80];
	snprintf(e254, sizeof e254, "%s@%s.%s.%s", local64, l63, l63, l61);
	snprintf(e255, sizeof e255, "%s@%s.%s.%sd", local64, l63, l63, l61);
	snprintf(local65, sizeof local65, "%sa@example.com", local64);
	ok(strlen(e254) == 254 && strlen(e255) == 255, "built 254- and 255-char addresses");
	const struct vcase em[] = {
		{"ann@example.com", 1},
		{"a.b+tag@sub.example.co.uk", 1},
		{"o'brien@example.ie", 1},
		{"ANN@EXAMPLE.COM", 1},
		{"x@a-b.io", 1},
		{e254, 1},
		{"annexample.com", 0},
		{"ann@@example.com", 0},
		{"a@b@example.com", 0},
		{"ann smith@example.com", 0},
		{"ann@exam ple.com", 0},
		{" ann@example.com", 0},
		{"ann@example.com ", 0},
		{"ann@example.com\r\n", 0},
		{"ann@example.com\rBcc: eve@evil.example", 0},
		{"ann\n@example.com", 0},
		{e255, 0},
		{local65, 0},
		{".ann@example.com", 0},
		{"ann.@example.com", 0},
		{"an..n@example.com", 0},
		{"ann@example..com", 0},
		{"ann@.example.com", 0},
		{"ann@example.com.", 0},
		{"ann@localhost", 0},
		{"ann@", 0},
		{"@example.com", 0},
		{"", 0},
		{"ann@-example.com", 0},
		{"ann@example-.com", 0},
		{"ann@exa_mple.com", 0},
		{"<ann@example.com>", 0},
	};
	for (size_t i = 0; i < sizeof em / sizeof em[0]; i++)
		ok(val_email(em[i].s) == em[i].want, "val_email %s '%s'",
		   em[i].want ? "accepts" : "rejects", vis(em[i].s));
	free(local64), free(l63), free(l61);

	/* val_text */
	const struct vcase tx[] = {
		{"Ann Smith", 1}, {"Zo\xC3\xAB \xE2\x80\x94 caf\xC3\xA9", 1}, {"", 1},
		{"a\rb", 0}, {"a\nb", 0}, {"a\tb", 0}, {"a\x7F", 0},
		{"\x1B[31mred", 0}, {"bell\a", 0}, {"bad \xC3", 0},
		/* C1 controls are control characters too: U+0085 NEL (a line
		 * break to some readers) and U+009B, the 8-bit CSI of terminals */
		{"a\xC2\x85" "b", 0}, {"\xC2\x9B" "31mred", 0},
	};
	for (size_t i = 0; i < sizeof tx / sizeof tx[0]; i++)
		ok(val_text(tx[i].s, 100) == tx[i].want, "val_text %s '%s'",
		   tx[i].want ? "accepts" : "rejects", vis(tx[i].s));
	is_int(val_text("abcd", 4), 1, "val_text accepts exactly maxlen bytes");
	is_int(val_text("abcde", 4), 0, "val_text rejects maxlen + 1 bytes");

	/* val_ident */
	char *id64 = repeat("x", 64), *id65 = repeat("x", 65);
	const struct vcase idc[] = {
		{"cart-123", 1}, {"a.b_c:d-E9", 1}, {id64, 1},
		{"", 0}, {id65, 0}, {"a b", 0}, {"a/b", 0}, {"../x", 0},
		{"caf\xC3\xA9", 0}, {"a;b", 0}, {"a\nb", 0},
	};
	for (size_t i = 0; i < sizeof idc / sizeof idc[0]; i++)
		ok(val_ident(idc[i].s, 64) == idc[i].want, "val_ident %s '%s'",
		   idc[i].want ? "accepts" : "rejects", vis(idc[i].s));
	free(id64), free(id65);

	/* val_url */
	const struct vcase ur[] = {
		{"http://example.com", 1},
		{"https://shop.example.com/p/lamp?x=1&y=2#top", 1},
		{"https://example.com:8443/a", 1},
		{"javascript:alert(1)", 0},
		{"JavaScript:alert(document.cookie)", 0},
		{"ftp://example.com/file", 0},
		{"data:text/html,<b>hi</b>", 0},
		{"http://", 0},
		{"https://", 0},
		{"//example.com/x", 0},
		{"example.com/x", 0},
		{"https://example.com/\r\nSet-Cookie: x=1", 0},
		{"https://exa mple.com/", 0},
		{"", 0},
	};
	for (size_t i = 0; i < sizeof ur / sizeof ur[0]; i++)
		ok(val_url(ur[i].s) == ur[i].want, "val_url %s '%s'",
		   ur[i].want ? "accepts" : "rejects", vis(ur[i].s));
}

/* ==== Signed tokens and hook signatures =============================== */

static void test_tokens(void)
{
	unsigned char k1[RM_KEYBYTES], k2[RM_KEYBYTES];
	char tok[TOK_MAXLEN + 1], other[TOK_MAXLEN + 1];
	int64_t subj;
	for (int i = 0; i < RM_KEYBYTES; i++)
		k1[i] = (unsigned char)(i * 7 + 3), k2[i] = (unsigned char)(255 - i);

	/* round trip for every kind */
	static const char kinds[] = {TOK_RECOVER, TOK_UNSUB, TOK_DISCOUNT, TOK_OPEN};
	for (size_t i = 0; i < sizeof kinds; i++) {
		ok(tok_sign(k1, kinds[i], 1000 + (int64_t)i, T0 + DAY, tok, sizeof tok) == 0,
		   "tok_sign kind '%c'", kinds[i]);
		subj = -1;
		ok(tok_verify(k1, tok, kinds[i], T0, &subj) == TOK_OK &&
			   subj == 1000 + (int64_t)i,
		   "tok_verify kind '%c' round trip gives subject %d", kinds[i], 1000 + (int)i);
	}
	ok(tok_sign(k1, TOK_RECOVER, (int64_t)1 << 40, T0 + DAY, tok, sizeof tok) == 0 &&
		   tok_verify(k1, tok, TOK_RECOVER, T0, &subj) == TOK_OK &&
		   subj == (int64_t)1 << 40,
	   "a 41-bit subject survives the round trip");
	tok_sign(k1, TOK_RECOVER, 42, T0 + DAY, tok, sizeof tok);
	size_t len = strlen(tok);
	ok(len > 0 && len <= TOK_MAXLEN, "token length %zu fits TOK_MAXLEN", len);
	ok(strspn(tok, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
		       "0123456789-_") == len,
	   "token is URL-safe base64 without padding");
	ok(tok_sign(k1, TOK_RECOVER, 42, T0 + DAY, other, 10) < 0,
	   "tok_sign refuses a too-small output buffer");

	/* wrong kind */
	is_int(tok_verify(k1, tok, TOK_UNSUB, T0, &subj), TOK_WRONG_KIND,
	       "a recovery token used as an unsubscribe token -> TOK_WRONG_KIND");
	is_int(tok_verify(k1, tok, TOK_DISCOUNT, T0, &subj), TOK_WRONG_KIND,
	       "a recovery token used as a discount token -> TOK_WRONG_KIND");

	/* every single-character change, at every position */
	static const char alt[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
				  "0123456789-_+/=.~! ";
	for (size_t pos = 0; pos < len; pos++) {
		int bad = 0, tried = 0;
		for (const char *c = alt; *c; c++) {
			if (*c == tok[pos])
				continue;
			snprintf(other, sizeof other, "%s", tok);
			other[pos] = *c;
			tried++;
			if (tok_verify(k1, other, TOK_RECOVER, T0, &subj) == TOK_OK)
				bad++;
		}
		ok(bad == 0, "token changed at position %zu: none of %d variants verifies",
		   pos, tried);
	}
	int bad = 0;
	for (size_t cut = 0; cut < len; cut++) {
		snprintf(other, sizeof other, "%.*s", (int)cut, tok);
		bad += tok_verify(k1, other, TOK_RECOVER, T0, &subj) == TOK_OK;
	}
	ok(bad == 0, "no truncation of a token verifies");
	snprintf(other, sizeof other, "%sA", tok);
	is_int(tok_verify(k1, other, TOK_RECOVER, T0, &subj), TOK_MALFORMED,
	       "a token with one more character -> TOK_MALFORMED");

	/* another key */
	tok_sign(k2, TOK_RECOVER, 42, T0 + DAY, other, sizeof other);
	is_int(tok_verify(k1, other, TOK_RECOVER, T0, &subj), TOK_FORGED,
	       "a token signed with another key -> TOK_FORGED");
	is_int(tok_verify(k2, other, TOK_RECOVER, T0, &subj), TOK_OK,
	       "... and it verifies with its own key");

	/* expiry */
	tok_sign(k1, TOK_OPEN, 7, T0 + 100, tok, sizeof tok);
	is_int(tok_verify(k1, tok, TOK_OPEN, T0 + 99, &subj), TOK_OK, "verify at expires-1 -> TOK_OK");
	is_int(tok_verify(k1, tok, TOK_OPEN, T0 + 100, &subj), TOK_OK, "verify at expires -> TOK_OK");
	is_int(tok_verify(k1, tok, TOK_OPEN, T0 + 101, &subj), TOK_EXPIRED, "verify at expires+1 -> TOK_EXPIRED");
	is_int(tok_verify(k1, tok, TOK_UNSUB, T0 + 101, &subj), TOK_WRONG_KIND,
	       "the kind is checked before the expiry");

	/* garbage */
	char *longtok = repeat("A", TOK_MAXLEN + 1);
	const char *junk[] = {"", "!!!!", "not a token at all", "AAAA",
			      "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", longtok,
			      "../../etc/passwd"};
	for (size_t i = 0; i < sizeof junk / sizeof junk[0]; i++)
		ok(tok_verify(k1, junk[i], TOK_RECOVER, T0, &subj) == TOK_MALFORMED,
		   "token '%s' -> TOK_MALFORMED", vis(junk[i]));
	is_int(tok_verify(k1, NULL, TOK_RECOVER, T0, &subj), TOK_MALFORMED,
	       "a NULL token -> TOK_MALFORMED");
	free(longtok);
	const int sts[] = {TOK_MALFORMED, TOK_FORGED, TOK_EXPIRED, TOK_WRONG_KIND};
	for (size_t i = 0; i < 4; i++)
		ok(tok_strerror(sts[i]) && *tok_strerror(sts[i]) &&
			   strcmp(tok_strerror(sts[i]), tok_strerror(TOK_OK)),
		   "tok_strerror(%d) says something", sts[i]);
}

static void test_hooks(void)
{
	const char *body = "{\"type\":\"identify\",\"email\":\"ann@example.com\"}";
	size_t blen = strlen(body);
	char sig[256], hdr[512], wrong[65], right[65];
	const char *why = NULL;

	/* hook_sign's format, checked against HMAC-SHA256 computed here */
	ok(hook_sign(HOOK_SECRET, T0, body, blen, sig, sizeof sig) == 0, "hook_sign succeeds");
	unsigned char mac[crypto_auth_hmacsha256_BYTES];
	crypto_auth_hmacsha256_state st;
	char ts[32];
	snprintf(ts, sizeof ts, "%lld", (long long)T0);
	crypto_auth_hmacsha256_init(&st, (const unsigned char *)HOOK_SECRET, strlen(HOOK_SECRET));
	crypto_auth_hmacsha256_update(&st, (const unsigned char *)ts, strlen(ts));
	crypto_auth_hmacsha256_update(&st, (const unsigned char *)".", 1);
	crypto_auth_hmacsha256_update(&st, (const unsigned char *)body, blen);
	crypto_auth_hmacsha256_final(&st, mac);
	sodium_bin2hex(right, sizeof right, mac, sizeof mac);
	snprintf(hdr, sizeof hdr, "t=%lld,v1=%s", (long long)T0, right);
	is_str(sig, hdr, "hook_sign gives t=<unix>,v1=hex(HMAC-SHA256(secret, t.body))");
	ok(hook_sign(HOOK_SECRET, T0, body, blen, sig, 20) < 0,
	   "hook_sign refuses a too-small output buffer");
	hook_sign(HOOK_SECRET, T0, body, blen, sig, sizeof sig);

	/* valid, body changed, secret changed */
	is_int(hook_verify(HOOK_SECRET, sig, body, blen, T0, &why), 0, "valid signature accepted");
	is_int(hook_verify(HOOK_SECRET, sig, body, blen - 1, T0, &why), -1, "body cut by one byte -> refused");
	ok(why && contains(why, "does not match"), "... why says the signature does not match");
	char *changed = strdup(body);
	changed[10] ^= 1;
	is_int(hook_verify(HOOK_SECRET, sig, changed, blen, T0, &why), -1, "body changed -> refused");
	free(changed);
	is_int(hook_verify("another-secret", sig, body, blen, T0, &why), -1, "secret changed -> refused");
	is_int(hook_verify(HOOK_SECRET, sig, "", 0, T0, &why), -1, "empty body -> refused");

	/* the 5-minute window */
	is_int(hook_verify(HOOK_SECRET, sig, body, blen, T0 + 299, &why), 0, "t 299 s old -> accepted");
	is_int(hook_verify(HOOK_SECRET, sig, body, blen, T0 + 300, &why), 0, "t 300 s old -> accepted");
	is_int(hook_verify(HOOK_SECRET, sig, body, blen, T0 + 301, &why), -1, "t 301 s old -> refused");
	ok(why && contains(why, "minutes"), "... why speaks of the time window");
	is_int(hook_verify(HOOK_SECRET, sig, body, blen, T0 - 299, &why), 0, "t 299 s in the future -> accepted");
	is_int(hook_verify(HOOK_SECRET, sig, body, blen, T0 - 301, &why), -1, "t 301 s in the future -> refused");

	/* malformed headers */
	memset(wrong, 'a', 64);
	wrong[64] = '\0';
	char only_v1[128], t_abc[160], t_nohex[160];
	snprintf(only_v1, sizeof only_v1, "v1=%s", right);
	snprintf(t_abc, sizeof t_abc, "t=abc,v1=%s", right);
	snprintf(t_nohex, sizeof t_nohex, "t=%lld,v1=%.63s", (long long)T0, right);
	const char *mal[] = {"", "t=", "v1=abc", "t=1,v1=zz", only_v1, t_abc, t_nohex,
			     "garbage", "t=1795000000", "t=1795000000,v1="};
	for (size_t i = 0; i < sizeof mal / sizeof mal[0]; i++) {
		why = NULL;
		ok(hook_verify(HOOK_SECRET, mal[i], body, blen, T0, &why) == -1 && why && *why,
		   "malformed header '%s' refused with a reason", vis(mal[i]));
	}
	why = NULL;
	ok(hook_verify(HOOK_SECRET, NULL, body, blen, T0, &why) == -1 && why && contains(why, "missing"),
	   "no header at all -> refused as missing");

	/* key rotation: several v1 values */
	snprintf(hdr, sizeof hdr, "t=%lld,v1=%s,v1=%s", (long long)T0, wrong, right);
	is_int(hook_verify(HOOK_SECRET, hdr, body, blen, T0, &why), 0, "two v1, the second right -> accepted");
	snprintf(hdr, sizeof hdr, "t=%lld,v1=%s,v1=%s", (long long)T0, right, wrong);
	is_int(hook_verify(HOOK_SECRET, hdr, body, blen, T0, &why), 0, "two v1, the first right -> accepted");
	snprintf(hdr, sizeof hdr, "t=%lld,v1=%s,v1=%s", (long long)T0, wrong, wrong);
	is_int(hook_verify(HOOK_SECRET, hdr, body, blen, T0, &why), -1, "two v1, both wrong -> refused");
	snprintf(hdr, sizeof hdr, "t=%lld, v1=%s", (long long)T0, right);
	is_int(hook_verify(HOOK_SECRET, hdr, body, blen, T0, &why), 0, "a space after the comma is tolerated");
	snprintf(hdr, sizeof hdr, "t=%lld,v1=%s", (long long)(T0 + 1), right);
	is_int(hook_verify(HOOK_SECRET, hdr, body, blen, T0, &why), -1,
	       "the MAC of one t does not verify with another t");

	/* bodies with NUL bytes are signed over their length */
	const char nulbody[] = "a\0b";
	hook_sign(HOOK_SECRET, T0, nulbody, 3, sig, sizeof sig);
	is_int(hook_verify(HOOK_SECRET, sig, nulbody, 3, T0, &why), 0, "a body with a NUL byte verifies over its length");
	is_int(hook_verify(HOOK_SECRET, sig, nulbody, 1, T0, &why), -1, "... and not when cut at the NUL");
}

/* ==== Templates ======================================================= */

static void test_templates(void)
{
	static const struct tvar red[] = {{"t", "red", NULL, 0}};
	static const struct tvar big[] = {{"t", "big", NULL, 0}};
	static const struct tctx tags[] = {{red, 1, NULL}, {big, 1, NULL}};
	static const struct tvar lamp[] = {{"name", "Lamp", NULL, 0},
					   {"tags", NULL, tags, 2}};
	static const struct tvar rug[] = {{"name", "Rug <wool>", NULL, 0}};
	static const struct tctx items[] = {{lamp, 2, NULL}, {rug, 1, NULL}};
	static const struct tvar rootv[] = {
		{"store", "Maison", NULL, 0},
		{"name", "Ann", NULL, 0},
		{"evil", "<b>\"Tom\" & 'Jerry'</b>", NULL, 0},
		{"empty", "", NULL, 0},
		{"items", NULL, items, 2},
		{"none", NULL, NULL, 0},
	};
	static const struct tctx root = {rootv, 6, NULL};
	static const struct {
		const char *tpl;
		enum tpl_mode mode;
		const char *want, *what;
	} ok_cases[] = {
		{"Hello {{name}}!", TPL_TEXT, "Hello Ann!", "a variable"},
		{"{{store}}/{{name}}/{{store}}", TPL_TEXT, "Maison/Ann/Maison", "several variables"},
		{"[{{missing}}]", TPL_TEXT, "[]", "an unknown variable renders empty"},
		{"{{evil}}", TPL_HTML, "&lt;b&gt;&quot;Tom&quot; &amp; &#39;Jerry&#39;&lt;/b&gt;",
		 "TPL_HTML escapes < > & \" '"},
		{"{{evil}}", TPL_TEXT, "<b>\"Tom\" & 'Jerry'</b>", "TPL_TEXT does not escape"},
		{"<p>{{name}}</p>", TPL_HTML, "<p>Ann</p>", "TPL_HTML leaves the template's own markup"},
		{"{{#items}}<{{name}}@{{store}}>{{/items}}", TPL_TEXT,
		 "<Lamp@Maison><Rug <wool>@Maison>", "a list section repeats, outer variables visible"},
		{"{{#items}}{{name}}|{{/items}}", TPL_HTML, "Lamp|Rug &lt;wool&gt;|",
		 "list items are escaped in TPL_HTML"},
		{"{{#name}}Hi {{name}}{{/name}}", TPL_TEXT, "Hi Ann", "a non-empty scalar section shows"},
		{"a{{#empty}}x{{/empty}}b", TPL_TEXT, "ab", "an empty scalar section hides"},
		{"a{{#missing}}x{{/missing}}b", TPL_TEXT, "ab", "a missing section hides"},
		{"a{{#none}}x{{/none}}b", TPL_TEXT, "ab", "an empty list section hides"},
		{"{{^empty}}nothing{{/empty}}", TPL_TEXT, "nothing", "inverted section on empty shows"},
		{"{{^missing}}nothing{{/missing}}", TPL_TEXT, "nothing", "inverted section on missing shows"},
		{"{{^none}}no items{{/none}}", TPL_TEXT, "no items", "inverted section on an empty list shows"},
		{"a{{^name}}x{{/name}}b", TPL_TEXT, "ab", "inverted section on a value hides"},
		{"a{{^items}}x{{/items}}b", TPL_TEXT, "ab", "inverted section on a list hides"},
		{"{{#items}}{{name}}:{{#tags}}{{t}}/{{store}},{{/tags}}{{^tags}}-{{/tags}};{{/items}}",
		 TPL_TEXT, "Lamp:red/Maison,big/Maison,;Rug <wool>:-;",
		 "nested sections see every outer scope"},
		{"{{#name}}{{#name}}x{{/name}}{{/name}}", TPL_TEXT, "x", "a section nested in itself"},
		{"", TPL_TEXT, "", "an empty template"},
		{"no tags at all", TPL_HTML, "no tags at all", "text without tags is copied"},
	};
	struct buf out = {0};
	char err[256];
	for (size_t i = 0; i < sizeof ok_cases / sizeof ok_cases[0]; i++) {
		int rc = render(ok_cases[i].tpl, &root, ok_cases[i].mode, NULL, NULL,
				&out, err, sizeof err);
		if (!ok(rc == 0 && out.data && !strcmp(out.data, ok_cases[i].want),
			"tpl_render: %s", ok_cases[i].what)) {
			diag("  rc %d, err '%s'", rc, err);
			diag("  got: '%s'", out.data ? out.data : "NULL");
			diag(" want: '%s'", ok_cases[i].want);
		}
	}

	/* errors: -1 and a message */
	static const struct {
		const char *tpl, *what;
	} bad[] = {
		{"Hello {{name", "an unclosed tag"},
		{"{{#items}}x", "an unclosed section"},
		{"{{#items}}x{{/item}}", "a section closed by another name"},
		{"x{{/items}}", "a stray close"},
		{"{{#name}}{{/oops}}{{/name}}", "a stray close inside a shown section"},
		{"{{#empty}}{{/oops}}{{/empty}}", "a stray close inside a hidden section"},
		{"{{^name}}{{#oops}}{{/name}}", "an unclosed section inside a hidden inverted section"},
	};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		int rc = render(bad[i].tpl, &root, TPL_TEXT, NULL, NULL, &out, err, sizeof err);
		ok(rc == -1 && *err, "tpl_render refuses %s ('%s')", bad[i].what, bad[i].tpl);
		if (rc != -1)
			diag("  rc %d, rendered '%s'", rc, out.data ? out.data : "");
	}

	/* partials from a directory of our own */
	char dir[PATH_MAX], path[PATH_MAX + 32];
	snprintf(dir, sizeof dir, "%s/partials", tmpdir);
	mkdir(dir, 0700);
	snprintf(path, sizeof path, "%s/greet.txt", dir);
	write_file(path, "Dear {{name}}", 13);
	snprintf(path, sizeof path, "%s/greet.html", dir);
	write_file(path, "<p>{{evil}}</p>", 15);
	snprintf(path, sizeof path, "%s/item.txt", dir);
	write_file(path, "[{{name}}]", 10);
	snprintf(path, sizeof path, "%s/loop.txt", dir);
	write_file(path, "x{{>loop}}", 10);
	snprintf(path, sizeof path, "%s/secret.txt", tmpdir);
	write_file(path, "SECRET", 6);
	int rc = render("{{>greet}}, welcome", &root, TPL_TEXT, dir, ".txt", &out, err, sizeof err);
	ok(rc == 0 && !strcmp(out.data, "Dear Ann, welcome"), "a partial is read from DIR with EXT");
	rc = render("{{>greet}}", &root, TPL_HTML, dir, ".html", &out, err, sizeof err);
	ok(rc == 0 && !strcmp(out.data, "<p>&lt;b&gt;&quot;Tom&quot; &amp; &#39;Jerry&#39;&lt;/b&gt;</p>"),
	   "a partial in TPL_HTML escapes its variables");
	rc = render("{{#items}}{{>item}}{{/items}}", &root, TPL_TEXT, dir, ".txt", &out, err, sizeof err);
	ok(rc == 0 && !strcmp(out.data, "[Lamp][Rug <wool>]"), "a partial in a list sees the item");
	rc = render("a{{>nope}}b", &root, TPL_TEXT, dir, ".txt", &out, err, sizeof err);
	ok(rc == -1 && *err, "a missing partial is an error");
	rc = render("{{>../secret}}", &root, TPL_TEXT, dir, ".txt", &out, err, sizeof err);
	ok(rc == -1 && *err && !contains(out.data, "SECRET"), "a partial name with ../ is refused");
	rc = render("{{>loop}}", &root, TPL_TEXT, dir, ".txt", &out, err, sizeof err);
	ok(rc == -1 && *err, "a partial including itself ends in an error, not a loop");
	buf_free(&out);
}

/* ==== Events: validation and state (contacts, carts, orders) ========== */

static void test_events(void)
{
	struct world w;
	struct ev_error err;
	if (!ok(world_open(&w, "events") == 0, "events: world opens"))
		return;

	/* accepted events: identify, cart, case-insensitive email, CLI, batch */
	is_int(ingest(&w, EV_HOOK, "{\"type\":\"identify\",\"email\":\"ann@example.com\","
		      "\"name\":\"Ann Smith\",\"consent\":true}", T0, &err), 1,
	       "identify accepted (1 event)");
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE email='ann@example.com' "
		  "AND name='Ann Smith' AND consent=1 AND created=%lld", (long long)T0), 1,
	       "identify made the contact, with consent and the injected time");
	is_int(ingest(&w, EV_HOOK, "{\"type\":\"cart\",\"cart_id\":\"c1\",\"email\":\"Ann@Example.com\","
		      "\"currency\":\"EUR\",\"items\":[{\"sku\":\"LAMP-1\",\"name\":\"Lamp\",\"price\":49.5,"
		      "\"qty\":2},{\"sku\":\"RUG-2\",\"name\":\"Rug\",\"price\":120}]}", T0 + 10, &err), 1,
	       "cart accepted");
	is_int(sq(&w, "SELECT count(*) FROM contacts"), 1, "the email matched the contact case-insensitively");
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE cart_key='c1' AND status='open' AND item_count=2 "
		  "AND contact_id=(SELECT id FROM contacts) AND updated=%lld", (long long)(T0 + 10)), 1,
	       "the cart is open, with 2 items, linked to the contact, updated at now");
	is_int(sq(&w, "SELECT round(total*100) FROM carts WHERE cart_key='c1'"), 21900,
	       "the cart total is computed from price * qty");
	is_int(sq(&w, "SELECT count(*) FROM events WHERE source='hook' AND received=%lld",
		  (long long)(T0 + 10)), 1, "the event row keeps its source and arrival time");
	is_int(ingest(&w, EV_CLI, "[{\"type\":\"identify\",\"email\":\"bob@example.com\"},"
		      "{\"type\":\"view\",\"sku\":\"LAMP-1\"}]", T0 + 20, &err), 2,
	       "a batch of two from the CLI accepted (2 events)");
	is_int(sq(&w, "SELECT count(*) FROM events WHERE source='cli'"), 2, "both CLI events stored");
	const char *cy = "{\"type\":\"identify\",\"email\":\"cy@example.com\"}";
	is_int(ev_ingest(&w.app, EV_BROWSER, cy, strlen(cy), "vid-123", T0 + 30, &err), 1,
	       "a browser identify with a visitor id accepted");
	is_int(sq(&w, "SELECT count(*) FROM visitors WHERE vid='vid-123' AND contact_id IS NOT NULL"), 1,
	       "the visitor is linked to the contact");
	is_int(ingest(&w, EV_HOOK, "{\"type\":\"identify\",\"email\":\"dee@example.com\",\"ts\":1795000300}",
		      T0, &err), 1, "ts = now + 300 is accepted");
	is_int(ingest(&w, EV_HOOK, "{\"type\":\"identify\",\"email\":\"eli@example.com\",\"ts\":1700000000}",
		      T0, &err), 1, "a server may backdate ts");
	is_int(sq(&w, "SELECT ts FROM events WHERE body LIKE '%%eli@%%'"), 1700000000,
	       "the backdated ts is stored");

	/* boundaries: 100 items, a body of exactly max_body bytes */
	is_int(w.cfg.max_items, 100, "max_items defaults to 100");
	char *items100 = items_cart("c100", 100), *items101 = items_cart("c101", 101);
	is_int(ingest(&w, EV_HOOK, items100, T0, &err), 1, "a cart of 100 items accepted");
	is_int(sq(&w, "SELECT item_count FROM carts WHERE cart_key='c100'"), 100, "... with its 100 items");
	free(items100);
	long max = w.cfg.max_body;
	char *exact = malloc((size_t)max + 2);
	int head = snprintf(exact, (size_t)max + 2, "{\"type\":\"identify\",\"email\":\"big@example.com\",\"pad\":\"");
	memset(exact + head, 'x', (size_t)max - (size_t)head - 2);
	memcpy(exact + max - 2, "\"}", 3);
	is_int(ev_ingest(&w.app, EV_HOOK, exact, (size_t)max, NULL, T0, &err), 1,
	       "a body of exactly max_body bytes accepted");
	memcpy(exact + max - 2, "x\"}", 4); /* max_body + 1 bytes */

	/* rejections: status, message, and nothing stored */
	const char *neg_price = "{\"type\":\"cart\",\"cart_id\":\"c9\",\"items\":"
				"[{\"sku\":\"S\",\"name\":\"N\",\"price\":-1}]}";
	const char *bad2nd = "[{\"type\":\"identify\",\"email\":\"new@example.com\"},{\"type\":\"cart\","
			     "\"cart_id\":\"c2\",\"items\":[{\"sku\":\"S\",\"name\":\"N\",\"price\":-1}]}]";
	const struct {
		const char *json;
		enum ev_source src;
		int status;
		const char *what;
	} rej[] = {
		{"", EV_HOOK, 400, "an empty body"},
		{"{not json", EV_HOOK, 400, "bad JSON"},
		{"{\"type\":\"identify\",\"email\":\"a@example.com\"", EV_HOOK, 400, "truncated JSON"},
		{"\"identify\"", EV_HOOK, 400, "a string body"},
		{"42", EV_HOOK, 400, "a number body"},
		{"null", EV_HOOK, 400, "null"},
		{"[1,2]", EV_HOOK, 400, "an array of numbers"},
		{"{\"type\":\"teleport\"}", EV_HOOK, 400, "an unknown type"},
		{"{\"email\":\"a@example.com\"}", EV_HOOK, 400, "no type"},
		{"{\"type\":42}", EV_HOOK, 400, "a numeric type"},
		{"{\"type\":\"identify\",\"email\":\"not-an-email\"}", EV_HOOK, 400, "an invalid email"},
		{"{\"type\":\"identify\",\"email\":\"eve@example.com\\r\\nBcc: x@y.z\"}", EV_HOOK, 400,
		 "an email with CRLF"},
		{"{\"type\":\"identify\"}", EV_HOOK, 400, "identify without email"},
		{"{\"type\":\"identify\",\"email\":\"eve@example.com\",\"name\":\"Eve\\r\\nBcc: x@y.z\"}",
		 EV_HOOK, 400, "a name with \\r\\n"},
		{"{\"type\":\"identify\",\"email\":\"eve@example.com\",\"consent\":\"yes\"}", EV_HOOK, 400,
		 "consent \"yes\""},
		{"{\"type\":\"cart\",\"cart_id\":\"c9\",\"items\":{\"sku\":\"S\",\"name\":\"N\",\"price\":1}}",
		 EV_HOOK, 400, "items not an array"},
		{"{\"type\":\"cart\",\"cart_id\":\"c9\"}", EV_HOOK, 400, "a cart without items"},
		{items101, EV_HOOK, 400, "101 items"},
		{neg_price, EV_HOOK, 400, "a negative price"},
		{"{\"type\":\"cart\",\"cart_id\":\"c9\",\"items\":[{\"sku\":\"S\",\"name\":\"N\",\"price\":1,\"qty\":0}]}",
		 EV_HOOK, 400, "qty 0"},
		{"{\"type\":\"cart\",\"cart_id\":\"c9\",\"items\":[{\"sku\":\"S\",\"name\":\"N\",\"price\":1,\"qty\":1.5}]}",
		 EV_HOOK, 400, "qty 1.5"},
		{"{\"type\":\"cart\",\"cart_id\":\"c9\",\"items\":[{\"sku\":\"S\",\"name\":\"N\",\"price\":\"12\"}]}",
		 EV_HOOK, 400, "price \"12\""},
		{"{\"type\":\"cart\",\"cart_id\":\"c9\",\"items\":[{\"sku\":\"S\",\"name\":\"N\"}]}",
		 EV_HOOK, 400, "an item without price"},
		{"{\"type\":\"cart\",\"cart_id\":\"c9\",\"items\":[7]}", EV_HOOK, 400, "an item that is a number"},
		{"{\"type\":\"cart\",\"cart_id\":\"c9\",\"items\":[{\"sku\":\"S\",\"name\":\"N\",\"price\":1,"
		 "\"url\":\"javascript:alert(1)\"}]}", EV_HOOK, 400, "an item url javascript:"},
		{"{\"type\":\"cart\",\"cart_id\":\"c9\",\"currency\":\"eur\",\"items\":[]}", EV_HOOK, 400,
		 "currency \"eur\""},
		{"{\"type\":\"cart\",\"cart_id\":\"bad id!\",\"items\":[]}", EV_HOOK, 400, "a cart_id with a space"},
		{"{\"type\":\"cart\",\"cart_id\":\"c9\",\"total\":\"12\",\"items\":[]}", EV_HOOK, 400,
		 "total \"12\""},
		{"{\"type\":\"identify\",\"email\":\"eve@example.com\",\"ts\":1795000301}", EV_HOOK, 400,
		 "ts > now + 300"},
		{"{\"type\":\"identify\",\"email\":\"eve@example.com\",\"ts\":\"1795000000\"}", EV_HOOK, 400,
		 "ts as a string"},
		{"{\"type\":\"identify\",\"email\":\"eve@example.com\",\"ts\":1795000000.5}", EV_HOOK, 400,
		 "a fractional ts"},
		{"{\"type\":\"identify\",\"email\":\"eve@example.com\",\"name\":\"Ev\xC3\"}", EV_HOOK, 400,
		 "invalid UTF-8 in a string"},
		{"{\"type\":\"identify\",\"email\":\"eve@example.com\",\"name\":\"\xED\xA0\x80\"}", EV_HOOK, 400,
		 "a surrogate in a string"},
		{"{\"type\":\"identify\",\"email\":\"eve@example.com\",\"name\":\"Eve\\u0000x\"}", EV_HOOK, 400,
		 "a \\u0000 escape in a string"},
		{"{\"type\":\"order\",\"order_id\":\"o-9\",\"email\":\"ann@example.com\"}", EV_BROWSER, 403,
		 "an order from the browser"},
		{"{\"type\":\"checkout\",\"cart_id\":\"c1\"}", EV_BROWSER, 403, "a checkout from the browser"},
		{"{\"type\":\"product\",\"sku\":\"X\",\"name\":\"X\"}", EV_BROWSER, 403,
		 "a product from the browser"},
		{"{\"type\":\"order\",\"email\":\"ann@example.com\"}", EV_HOOK, 400, "an order without order_id"},
		{bad2nd, EV_HOOK, 400, "an array whose 2nd event is bad"},
		{"[{\"type\":\"identify\",\"email\":\"new@example.com\"},3]", EV_HOOK, 400,
		 "an array whose 2nd element is not an object"},
		{exact, EV_HOOK, 413, "a body of max_body + 1 bytes"},
	};
	struct counts before = counts_of(&w);
	for (size_t i = 0; i < sizeof rej / sizeof rej[0]; i++) {
		memset(&err, 0x5A, sizeof err);
		int rc = ingest(&w, rej[i].src, rej[i].json, T0, &err);
		ok(rc == -1 && err.status == rej[i].status && err.msg[0] && strlen(err.msg) < sizeof err.msg,
		   "%s -> -1, status %d and a message", rej[i].what, rej[i].status);
		if (rc != -1 || err.status != rej[i].status)
			diag("  rc %d, status %d, msg '%.159s'", rc, err.status, err.msg);
		ok(same_counts(before, counts_of(&w)), "%s -> nothing stored", rej[i].what);
	}
	ingest(&w, EV_HOOK, items101, T0, &err);
	ok(contains(err.msg, "items"), "the 101-item message names the field (%s)", err.msg);
	ingest(&w, EV_HOOK, neg_price, T0, &err);
	ok(contains(err.msg, "price"), "the negative price message names the field (%s)", err.msg);
	ingest(&w, EV_HOOK, bad2nd, T0, &err);
	ok(!strncmp(err.msg, "[1]", 3), "a batch error says which event (%s)", err.msg);
	free(items101);
	free(exact);

	/* orders: idempotent on order_id, end the cart */
	const char *order = "{\"type\":\"order\",\"order_id\":\"o-1\",\"email\":\"ann@example.com\","
			    "\"cart_id\":\"c1\",\"total\":219}";
	before = counts_of(&w);
	is_int(ingest(&w, EV_HOOK, order, T0 + 100, &err), 1, "an order accepted");
	is_int(err.duplicates, 0, "... not a duplicate");
	is_int(ingest(&w, EV_HOOK, order, T0 + 200, &err), 0, "the same order again: 0 accepted");
	is_int(err.duplicates, 1, "... counted as 1 duplicate");
	is_int(sq(&w, "SELECT count(*) FROM orders WHERE order_key='o-1'"), 1, "one order row stored");
	is_int(counts_of(&w).events, before.events + 1, "the repeated order is not stored as an event");
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE cart_key='c1' AND status='ordered' "
		  "AND ordered_at=%lld", (long long)(T0 + 100)), 1, "the order marked the cart ordered");
	const char *twice = "[{\"type\":\"order\",\"order_id\":\"o-2\",\"email\":\"bob@example.com\"},"
			    "{\"type\":\"order\",\"order_id\":\"o-2\",\"email\":\"bob@example.com\"}]";
	is_int(ingest(&w, EV_CLI, twice, T0 + 300, &err), 1, "a batch with one order twice: 1 accepted");
	is_int(err.duplicates, 1, "... and 1 duplicate");
	is_int(sq(&w, "SELECT count(*) FROM orders"), 2, "two order rows in all");
	world_close(&w);
}

/* A database of schema 4 (sql/001-004 from the repository) with a browser
 * cart and a backend's, brought forward by db_migrate: no row lost, the
 * browser's cart keeps skus only under its visitor-scoped key. */
/* ---- group commit (issue 10) ---- */

struct gc_req {
	struct app app;
	const char *json;
	enum ev_source src;
	const char *visitor;
	int rc;
	struct ev_error err;
};

static void *gc_post(void *arg)
{
	struct gc_req *r = arg;
	r->rc = ev_ingest(&r->app, r->src, r->json, strlen(r->json), r->visitor,
			  T0, &r->err);
	return NULL;
}

/* Concurrent requests while another connection holds the database: the
 * writer takes the first, waits for the lock, and finds all the others
 * queued behind it; they must be committed as one batch, each answered
 * for itself. Without group commit each request is its own commit. */
static void test_group_commit(void)
{
	enum { N = 12 }; /* N - 2 good hook requests, one refused at apply
			  * time (403) and one refused by validation (400) */
	struct world w;
	struct gc_req r[N];
	pthread_t th[N];
	char err[512] = "", json[N][200];
	struct ev_writer_stats st0, st;
	sqlite3 *h = NULL;
	if (!ok(world_open(&w, "group") == 0, "group commit: world opens"))
		return;
	cart_event(&w, "shop@example.com", "Shop", "backend-1", 1, T0);
	long long ev0 = sq(&w, "SELECT count(*) FROM events");
	ev_writer_stats(&st0);
	if (!ok(ev_writer_start(&w.cfg, err, sizeof err) == 0, "the event writer starts")) {
		diag("  %s", err);
		world_close(&w);
		return;
	}
	ok(ev_writer_start(&w.cfg, err, sizeof err) < 0 && contains(err, "already running"),
	   "... once");
	/* one request alone is committed at once: no waiting for company */
	const char *one = "{\"type\":\"cart\",\"email\":\"alone@example.com\",\"cart_id\":\"alone\","
			  "\"currency\":\"EUR\",\"items\":[{\"sku\":\"A\",\"name\":\"A\",\"price\":1,"
			  "\"qty\":1}],\"total\":1}";
	struct ev_error e1;
	is_int(ingest(&w, EV_HOOK, one, T0, &e1), 1, "a request alone is stored through the writer");
	ev_writer_stats(&st);
	is_int(st.requests - st0.requests, 1, "... by the writer");
	is_int(st.batches - st0.batches, 1, "... in its own commit");
	is_int(sq(&w, "SELECT count(*) FROM events"), ev0 + 1, "... and is in the database when answered");
	st0 = st;

	/* hold the write lock from a connection of our own */
	if (!ok(sqlite3_open(w.cfg.db, &h) == SQLITE_OK &&
		sqlite3_exec(h, "BEGIN IMMEDIATE", NULL, NULL, NULL) == SQLITE_OK,
		"another connection holds the database")) {
		sqlite3_close(h);
		ev_writer_stop();
		world_close(&w);
		return;
	}
	int started = 0;
	for (int i = 0; i < N; i++) {
		r[i] = (struct gc_req){.src = EV_HOOK};
		if (i < N - 2)
			snprintf(json[i], sizeof json[i], "{\"type\":\"cart\",\"email\":"
				 "\"g%d@example.com\",\"cart_id\":\"g-%d\",\"currency\":\"EUR\","
				 "\"items\":[{\"sku\":\"A\",\"name\":\"A\",\"price\":1,\"qty\":1}],"
				 "\"total\":1}", i, i);
		else if (i == N - 2) { /* a view, then a cart the browser may not touch */
			snprintf(json[i], sizeof json[i], "[{\"type\":\"view\",\"sku\":\"A\"},"
				 "{\"type\":\"cart\",\"cart_id\":\"backend-1\",\"items\":[]}]");
			r[i].src = EV_BROWSER;
			r[i].visitor = "v-evil";
		} else
			snprintf(json[i], sizeof json[i], "{\"type\":\"cart\",\"email\":\"bad\"}");
		r[i].json = json[i];
		if (app_open(&r[i].app, &w.cfg, err, sizeof err) < 0) {
			diag("  app_open: %s", err);
			break;
		}
		if (pthread_create(&th[i], NULL, gc_post, &r[i]) != 0) {
			app_close(&r[i].app);
			break;
		}
		started++;
	}
	is_int(started, N, "12 requests are posted at once");
	/* the writer holds the first and waits for the lock (busy_timeout);
	 * the other N - 2 that pass validation queue up behind it */
	for (int i = 0; i < 5000; i++) {
		ev_writer_stats(&st);
		if (st.queued + st.storing >= N - 1)
			break;
		struct timespec ms = {0, 1000000};
		nanosleep(&ms, NULL);
	}
	is_int(st.queued + st.storing, N - 1,
	       "... the writer holds the first (maybe two) and the other valid ones wait in its queue");
	ok(st.queued > 0, "... some of them queued");
	ok(sqlite3_exec(h, "COMMIT", NULL, NULL, NULL) == SQLITE_OK, "the other connection lets go");
	sqlite3_close(h);
	for (int i = 0; i < started; i++) {
		pthread_join(th[i], NULL);
		app_close(&r[i].app);
	}
	int stored = 0;
	for (int i = 0; i < N - 2; i++)
		stored += r[i].rc == 1;
	is_int(stored, N - 2, "every good request is answered as stored (1 event each)");
	is_int(r[N - 2].rc, -1, "the request with an event the browser may not send is refused");
	is_int(r[N - 2].err.status, 403, "... with its own 403");
	ok(contains(r[N - 2].err.msg, "not this visitor's"), "... and its own message");
	is_int(r[N - 1].rc, -1, "the invalid request is refused");
	is_int(r[N - 1].err.status, 400, "... 400, by validation, before it reaches the writer");
	ev_writer_stats(&st);
	is_int(st.requests - st0.requests, N - 1, "the writer stored the 11 requests that reached it");
	is_int(st.batches - st0.batches, 2,
	       "... in 2 commits: the first, and the ones that waited, together (group commit)");
	if (st.batches - st0.batches != 2)
		diag("  %ld commits", st.batches - st0.batches);
	is_int(sq(&w, "SELECT count(*) FROM events"), ev0 + 1 + N - 2,
	       "every event answered as stored is in the database, and no other");
	is_int(sq(&w, "SELECT count(*) FROM events WHERE type = 'view'"), 0,
	       "... the refused request's first event was rolled back with it (its savepoint)");
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE cart_key LIKE 'g-%%'"), N - 2,
	       "... and the others' carts are there");
	is_int(sq(&w, "SELECT item_count FROM carts WHERE cart_key = 'backend-1'"), 2,
	       "... the backend's cart is intact");

	/* stopped, ev_ingest stores its events itself again */
	ev_writer_stop();
	const char *after = "{\"type\":\"cart\",\"email\":\"after@example.com\",\"cart_id\":\"after\","
			    "\"currency\":\"EUR\",\"items\":[],\"total\":0}";
	is_int(ingest(&w, EV_HOOK, after, T0, &e1), 1, "after ev_writer_stop a request is stored directly");
	ev_writer_stats(&st0);
	is_int(st0.requests, st.requests, "... not through the writer");
	world_close(&w);
}

static void test_browser_migration(void)
{
	char db[PATH_MAX], path[PATH_MAX + 64], err[256] = "";
	snprintf(db, sizeof db, "%s/mig4.db", tmpdir);
	sqlite3 *h = NULL;
	int ok4 = sqlite3_open(db, &h) == SQLITE_OK;
	for (int v = 1; ok4 && v <= 4; v++) {
		static const char *const names[] = {"", "001_init", "002_measure",
						    "003_lifecycle", "004_fencing"};
		struct buf sql = {0};
		snprintf(path, sizeof path, "%s/../sql/%s.sql", templates, names[v]);
		FILE *f = fopen(path, "rb");
		char chunk[4096];
		size_t n;
		while (f && (n = fread(chunk, 1, sizeof chunk, f)) > 0)
			buf_add(&sql, chunk, n);
		if (f)
			fclose(f);
		ok4 = f && sql.data && sqlite3_exec(h, sql.data, NULL, NULL, NULL) == SQLITE_OK;
		buf_free(&sql);
	}
	ok4 = ok4 && sqlite3_exec(h,
		"INSERT INTO contacts (email, name, consent, created, updated) VALUES "
		"('h@example.com', 'H', 1, 1, 1), ('b@example.com', '', 1, 1, 1);"
		"INSERT INTO events (ts, received, source, type, body) VALUES "
		"(1, 1, 'hook', 'cart', '{\"type\":\"cart\",\"email\":\"h@example.com\",\"cart_id\":\"hc\"}'),"
		"(1, 1, 'browser', 'cart', '{\"type\":\"cart\",\"cart_id\":\"bc\"}');"
		"INSERT INTO carts (cart_key, contact_id, visitor_id, items, item_count, updated) VALUES "
		"('hc', 1, NULL, '[{\"sku\":\"A\",\"name\":\"Lamp\",\"price\":5}]', 1, 1),"
		"('bc', 2, 'v-old', '[{\"sku\":\"A\",\"name\":\"SPAM\",\"price\":0.5,\"qty\":3}]', 1, 1);"
		"PRAGMA user_version = 4;", NULL, NULL, NULL) == SQLITE_OK;
	sqlite3_close(h);
	if (!ok(ok4, "migration: a database of schema 4 is made from sql/001-004"))
		return;
	struct db *d = NULL;
	ok(db_open(&d, db, err, sizeof err) == 0 && db_migrate(d, err, sizeof err) == 0,
	   "migration: 006_browser applies (%s)", err);
	is_int(db_scalar(d, "SELECT count(*) FROM contacts") * 10 +
		       db_scalar(d, "SELECT count(*) FROM carts"), 22, "... no row lost");
	is_int(db_scalar(d, "SELECT signed FROM contacts WHERE email = 'h@example.com'") * 10 +
		       db_scalar(d, "SELECT signed FROM contacts WHERE email = 'b@example.com'"), 10,
	       "... the address the backend named is signed, the browser's is not");
	is_int(db_scalar(d, "SELECT count(*) FROM carts WHERE cart_key = 'bc/v-old' AND items = "
			 "'[{\"sku\":\"A\",\"qty\":3}]'"), 1,
	       "... the browser's cart keeps sku and qty, under bc/v-old");
	is_int(db_scalar(d, "SELECT count(*) FROM carts WHERE cart_key = 'hc' AND items LIKE '%Lamp%'"),
	       1, "... the backend's cart is untouched");
	db_close(d);
}

static void test_browser_trust(void)
{
	struct world w;
	struct tick_summary sum;
	struct ev_error err;
	struct http_resp rs;
	if (!ok(world_open(&w, "trust") == 0, "trust: world opens"))
		return;
	w.cfg.rate_ip_per_min = w.cfg.rate_visitor_per_min = 0;
	product(&w, "LAMP-1", "lighting", T0 - DAY);

	/* the attack of issue 8: an anonymous POST (no Origin, no cookie)
	 * names an address with consent and a cart of free text */
	const char *spam =
		"[{\"type\":\"identify\",\"email\":\"victim@example.org\",\"name\":"
		"\"Congratulations-you-won-visit-gift-claim.example\",\"consent\":true},"
		"{\"type\":\"cart\",\"email\":\"victim@example.org\",\"visitor_id\":\"v-atk\","
		"\"cart_id\":\"c-1\",\"total\":0.01,\"items\":[{\"sku\":\"LAMP-1\",\"name\":"
		"\"WIN-A-PRIZE-at-gift-claim.example\",\"price\":0.01,\"qty\":2},"
		"{\"sku\":\"NOPE-9\",\"name\":\"Claim at gift-claim.example\",\"price\":0}]}]";
	is_int(collect(&w, NULL, spam, T0), 204, "trust: the anonymous identify + cart is recorded");
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE email = 'victim@example.org' "
		  "AND name = '' AND signed = 0"), 1,
	       "... the browser named an address, never a name (a browser-only contact)");
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE items LIKE '%%gift-claim%%' "
		  "OR items LIKE '%%PRIZE%%'"), 0, "... no item text is kept from the browser");
	tick(&w, T0 + HOUR + 60, &sum);
	is_int(sum.sent, 1, "trust: +1 h, the reminder goes (a known sku)");
	struct buf mail = {0};
	long long mid = sq(&w, "SELECT max(id) FROM messages WHERE status = 'sent'");
	ok(mail_text(&w, mid, &mail) == 0, "... its text decodes");
	ok(!contains(mail.data, "gift-claim") && !contains(mail.data, "Congratulations") &&
		   !contains(mail.data, "PRIZE"),
	   "... and prints no word the browser typed (subject, text, HTML)");
	ok(contains(mail.data, "Product LAMP-1") && !contains(mail.data, "NOPE-9"),
	   "... the item's name is the catalog's; the unknown sku is not printed");
	ok(contains(mail.data, "€20.00") && !contains(mail.data, "€0.01"),
	   "... priced by the catalog (2 × 10.00 = 20.00), not by the browser");
	if (!contains(mail.data, "€20.00"))
		diag("%s", mail.data);
	buf_free(&mail);

	/* a cart of unknown skus only is never mailed */
	collect(&w, NULL, "{\"type\":\"cart\",\"email\":\"x2@example.org\",\"visitor_id\":"
		"\"v-x2\",\"items\":[{\"sku\":\"NOPE-1\",\"name\":\"Free money\",\"price\":1}]}",
		T0);
	collect(&w, NULL, "{\"type\":\"identify\",\"email\":\"x2@example.org\",\"consent\":true,"
		"\"visitor_id\":\"v-x2\"}", T0);
	tick(&w, T0 + 2 * HOUR, &sum);
	is_int(sum.sent, 0, "trust: a cart with no known item is not mailed");
	is_int(sq(&w, "SELECT count(*) FROM enrollments e JOIN contacts c ON c.id = "
		  "e.contact_id WHERE c.email = 'x2@example.org' AND e.exit_reason = "
		  "'no known item'"), 1, "... its sequence ends saying why");

	const char *cur = "{\"type\":\"cart\",\"visitor_id\":\"v-cur\",\"currency\":\"WIN\","
			  "\"items\":[{\"sku\":\"LAMP-1\"}]}";
	is_int(ev_ingest(&w.app, EV_BROWSER, cur, strlen(cur), NULL, T0, &err), -1,
	       "trust: a browser's currency must be an ISO 4217 code (WIN is not)");
	is_int(err.status, 400, "... 400");

	/* names and consent: a browser never renames; withdraws only its own */
	ingest(&w, EV_HOOK, "{\"type\":\"identify\",\"email\":\"ann@example.com\","
	       "\"name\":\"Ann Smith\",\"consent\":true}", T0, &err);
	collect(&w, "rm_vid=v-stranger", "{\"type\":\"identify\",\"email\":\"ann@example.com\","
		"\"name\":\"You won a prize\",\"consent\":false}", T0 + 60);
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE email = 'ann@example.com' "
		  "AND name = 'Ann Smith' AND consent = 1"), 1,
	       "trust: a browser can neither rename a known contact nor withdraw its consent");
	collect(&w, "rm_vid=v-own", "{\"type\":\"identify\",\"email\":\"own@example.com\","
		"\"consent\":true}", T0);
	collect(&w, "rm_vid=v-other", "{\"type\":\"identify\",\"email\":\"own@example.com\","
		"\"consent\":false}", T0 + 60);
	is_int(sq(&w, "SELECT consent FROM contacts WHERE email = 'own@example.com'"), 1,
	       "... another visitor cannot withdraw the consent this one gave");
	collect(&w, "rm_vid=v-own", "{\"type\":\"identify\",\"email\":\"own@example.com\","
		"\"consent\":false}", T0 + 120);
	is_int(sq(&w, "SELECT consent FROM contacts WHERE email = 'own@example.com'"), 0,
	       "... the visitor who ticked the box may untick it");

	/* the pixel records views; it never identifies */
	is_int(browser_req(&w, "GET", "/p.gif?type=identify&email=pix1%40example.org",
			   NULL, "10.9.9.8", NULL, NULL, T0, &rs), 200, "trust: pixel identify: a GIF");
	http_resp_free(&rs);
	browser_req(&w, "GET", "/p.gif?type=view&sku=LAMP-1&email=pix2%40example.org&vid=v-pix",
		    NULL, "10.9.9.8", NULL, NULL, T0, &rs);
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE email LIKE 'pix%%'"), 0,
	       "... neither an identify nor a view with an email makes a contact");
	is_int(sq(&w, "SELECT count(*) FROM events WHERE source = 'pixel' AND type = 'view'"), 1,
	       "... the view is recorded");
	const char *pid = "{\"type\":\"identify\",\"email\":\"pix3@example.org\"}";
	is_int(ev_ingest(&w.app, EV_PIXEL, pid, strlen(pid), NULL, T0, &err), -1,
	       "... ev_ingest refuses an identify from the pixel");
	is_int(err.status, 403, "... 403");

	/* cart ids are the visitor's own: a guessed id first owns nothing */
	collect(&w, "rm_vid=v-guess", "{\"type\":\"cart\",\"cart_id\":\"shop-9\",\"items\":"
		"[{\"sku\":\"LAMP-1\",\"name\":\"Lamp\",\"price\":1,\"qty\":1}]}", T0);
	cart_event(&w, "carol@example.com", "Carol", "shop-9", 1, T0 + 60);
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE cart_key = 'shop-9' AND visitor_id IS NULL "
		  "AND item_count = 2"), 1,
	       "trust: the backend's cart shop-9 is its own, not the guessing visitor's");
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE cart_key = 'shop-9/v-guess'"), 1,
	       "... the browser's cart is kept apart as shop-9/v-guess");
	tick(&w, T0 + 3 * HOUR, &sum);
	is_int(browser_req(&w, "GET", "/onsite", NULL, "10.9.9.7", "rm_vid=v-guess", NULL,
			   T0 + 3 * HOUR, &rs), 204,
	       "... and /onsite shows the guessing visitor nothing of Carol's cart");
	http_resp_free(&rs);
	ingest(&w, EV_HOOK, "{\"type\":\"order\",\"order_id\":\"o-shop-9\",\"cart_id\":\"shop-9\","
	       "\"total\":10}", T0 + 4 * HOUR, &err);
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE cart_key LIKE 'shop-9%%' "
		  "AND status = 'ordered'"), 2,
	       "... an order for shop-9 ends the browser's copy too");
	world_close(&w);

	/* browser-only addresses: one sequence in 30 days, an hourly cap */
	if (!ok(world_open(&w, "trust-cap") == 0, "trust: cap world opens"))
		return;
	w.cfg.rate_ip_per_min = w.cfg.rate_visitor_per_min = 0;
	w.cfg.browser_new_contacts_per_hour = 3;
	product(&w, "LAMP-1", "lighting", T0 - DAY);
	char body[400], cookie[40];
	for (int i = 0; i < 5; i++) {
		snprintf(body, sizeof body, "[{\"type\":\"identify\",\"email\":\"b%d@example.org\","
			 "\"consent\":true},{\"type\":\"cart\",\"cart_id\":\"k%d\",\"items\":"
			 "[{\"sku\":\"LAMP-1\"}]}]", i, i);
		snprintf(cookie, sizeof cookie, "rm_vid=v-b%d", i);
		collect(&w, cookie, body, T0 + i * 60);
	}
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE held_at IS NOT NULL"), 2,
	       "trust: past browser_new_contacts_per_hour (3), new browser-only contacts are held");
	tick(&w, T0 + 2 * HOUR, &sum);
	is_int(sum.sent, 3, "... the first 3 are mailed, the held 2 are recorded but not mailed");
	struct report *r = calloc(1, sizeof *r);
	report_build(&w.app, T0 - DAY, T0 + DAY, r);
	is_int(r->browser_held, 2, "... the report counts them");
	struct buf out = {0};
	report_json(r, &out);
	ok(contains(out.data, "\"browser_held\":2") &&
		   contains(out.data, "not mailed: over browser_new_contacts_per_hour"),
	   "... and warns in JSON");
	out.len = 0;
	report_html(r, "Shop", &out);
	ok(contains(out.data, "<b>Warning:</b> 2 new browser-only contacts"),
	   "... and in HTML");
	buf_free(&out);
	free(r);
	/* the same browser-only address again within 30 days: no new sequence */
	collect(&w, "rm_vid=v-b0", "{\"type\":\"cart\",\"cart_id\":\"k0b\",\"items\":"
		"[{\"sku\":\"LAMP-1\"}]}", T0 + 5 * DAY);
	tick(&w, T0 + 5 * DAY + 2 * HOUR, &sum);
	is_int(sum.enrolled, 0, "trust: a browser-only address gets one sequence in 30 days");
	collect(&w, "rm_vid=v-b0", "{\"type\":\"cart\",\"cart_id\":\"k0c\",\"items\":"
		"[{\"sku\":\"LAMP-1\"}]}", T0 + 31 * DAY);
	tick(&w, T0 + 31 * DAY + 2 * HOUR, &sum);
	is_int(sum.enrolled, 1, "... and another one after 30 days");
	/* a signed hook naming the address lifts both limits */
	ingest(&w, EV_HOOK, "{\"type\":\"identify\",\"email\":\"b4@example.org\"}", T0 + 32 * DAY, &err);
	collect(&w, "rm_vid=v-b4", "{\"type\":\"cart\",\"cart_id\":\"k4b\",\"items\":"
		"[{\"sku\":\"LAMP-1\"}]}", T0 + 32 * DAY);
	tick(&w, T0 + 32 * DAY + 2 * HOUR, &sum);
	is_int(sum.enrolled, 1, "... a held address named by a signed hook is mailed again");
	world_close(&w);

	/* browser_consent = confirm: a double opt-in first */
	if (!ok(world_open(&w, "trust-confirm") == 0, "trust: confirm world opens"))
		return;
	w.cfg.rate_ip_per_min = w.cfg.rate_visitor_per_min = 0;
	set_cfg(&w.cfg.browser_consent, "confirm");
	product(&w, "LAMP-1", "lighting", T0 - DAY);
	collect(&w, "rm_vid=v-dbl", "[{\"type\":\"identify\",\"email\":\"dbl@example.org\","
		"\"consent\":true},{\"type\":\"cart\",\"cart_id\":\"d1\",\"items\":"
		"[{\"sku\":\"LAMP-1\"}]}]", T0);
	is_int(sq(&w, "SELECT consent_pending * 10 + consent FROM contacts "
		  "WHERE email = 'dbl@example.org'"), 10,
	       "confirm: the checkbox asks; there is no consent yet");
	tick(&w, T0 + 2 * HOUR, &sum);
	is_int(sq(&w, "SELECT count(*) FROM enrollments"), 0, "confirm: no sequence before the click");
	long long cid = sq(&w, "SELECT id FROM contacts WHERE email = 'dbl@example.org'");
	char path[PATH_MAX + 64];
	snprintf(path, sizeof path, "%s/m-%05lld.eml", w.outbox, cid);
	struct buf cm = {0};
	FILE *f = fopen(path, "rb");
	char chunk[4096];
	size_t n;
	while (f && (n = fread(chunk, 1, sizeof chunk, f)) > 0)
		buf_add(&cm, chunk, n);
	if (f)
		fclose(f);
	ok(f && cm.data && contains(cm.data, "To: dbl@example.org"),
	   "confirm: the double opt-in mail went out (%s)", path);
	struct buf ct = {0};
	mime_part(cm.data ? cm.data : "", "text/plain", &ct);
	const char *c = ct.data ? strstr(ct.data, "/c/") : NULL;
	char tok[TOK_MAXLEN + 1] = "";
	if (c)
		snprintf(tok, sizeof tok, "%.*s", (int)strspn(c + 3,
			 "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"), c + 3);
	ok(*tok != '\0', "... with a signed confirm link");
	tick(&w, T0 + 3 * HOUR, &sum);
	is_int(outbox_count(&w), 1, "... sent once, not at every tick");
	snprintf(path, sizeof path, "/c/%s", tok);
	is_int(browser_req(&w, "GET", path, NULL, "10.9.9.6", NULL, NULL, T0 + 3 * HOUR, &rs), 200,
	       "confirm: GET shows a page with a button");
	ok(rs.body.data && contains(rs.body.data, "method=\"post\"") &&
		   contains(rs.body.data, "Confirm"), "... offering to confirm");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT consent FROM contacts WHERE id = %lld", cid), 0,
	       "... a GET (a link scanner) confirms nothing");
	is_int(browser_req(&w, "GET", "/c/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", NULL,
			   "10.9.9.6", NULL, NULL, T0 + 3 * HOUR, &rs), 400,
	       "confirm: a forged link gets 400");
	http_resp_free(&rs);
	is_int(browser_req(&w, "POST", path, NULL, "10.9.9.6", NULL, "", T0 + 3 * HOUR, &rs), 200,
	       "confirm: POST confirms");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT consent FROM contacts WHERE id = %lld AND confirmed_at = %lld",
		  cid, (long long)(T0 + 3 * HOUR)), 1, "... consent is given, with its time");
	tick(&w, T0 + 4 * HOUR, &sum);
	is_int(sum.enrolled, 1, "confirm: the cart's sequence starts after the click");
	/* a customer the backend knows, without consent: the box asks too */
	ingest(&w, EV_HOOK, "{\"type\":\"identify\",\"email\":\"known@example.org\","
	       "\"consent\":false}", T0 + 4 * HOUR, &err);
	collect(&w, "rm_vid=v-kn", "{\"type\":\"identify\",\"email\":\"known@example.org\","
		"\"consent\":true}", T0 + 4 * HOUR);
	is_int(sq(&w, "SELECT consent_pending * 10 + consent FROM contacts "
		  "WHERE email = 'known@example.org'"), 10,
	       "confirm: a known customer's consent from a browser waits for the click too");
	/* a one-click List-Unsubscribe POST declines */
	collect(&w, "rm_vid=v-no", "{\"type\":\"identify\",\"email\":\"no@example.org\","
		"\"consent\":true}", T0 + 4 * HOUR);
	tick(&w, T0 + 4 * HOUR + 60, &sum);
	long long nid = sq(&w, "SELECT id FROM contacts WHERE email = 'no@example.org'");
	tok_sign(w.app.key, TOK_CONFIRM, nid, T0 + 30 * DAY, tok, sizeof tok);
	snprintf(path, sizeof path, "/c/%s", tok);
	browser_req(&w, "POST", path, NULL, "10.9.9.6", NULL, "List-Unsubscribe=One-Click",
		    T0 + 5 * HOUR, &rs);
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT consent_pending * 10 + consent FROM contacts WHERE id = %lld", nid),
	       0, "confirm: the mail client's one-click unsubscribe declines");
	/* a relay that is down: the confirmation waits for the next tick */
	collect(&w, "rm_vid=v-rt", "{\"type\":\"identify\",\"email\":\"rt@example.org\","
		"\"consent\":true}", T0 + 6 * HOUR);
	set_cfg(&w.cfg.smtp_url, "smtp://127.0.0.1:1");
	tick(&w, T0 + 6 * HOUR + 60, &sum);
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE email = 'rt@example.org' "
		  "AND consent_pending = 1 AND confirm_sent_at IS NULL"), 1,
	       "confirm: with the relay down the confirmation is not marked sent");
	set_cfg(&w.cfg.smtp_url, "");
	tick(&w, T0 + 6 * HOUR + 120, &sum);
	is_int(sq(&w, "SELECT confirm_sent_at FROM contacts WHERE email = 'rt@example.org'"),
	       T0 + 6 * HOUR + 120, "... and goes at the next tick");
	buf_free(&cm);
	buf_free(&ct);
	world_close(&w);
	test_browser_migration();
}

/* The review of issue 8, browser side: a link never re-owns a browser, a
 * typed address never inherits a proof, holds and sequences stay bounded. */
static void test_browser_review(void)
{
	struct world w;
	struct tick_summary sum;
	struct http_resp rs;
	char tok[TOK_MAXLEN + 1], path[96], cookie[96];
	if (!ok(world_open(&w, "review-browser") == 0, "review: world opens"))
		return;
	w.cfg.rate_ip_per_min = w.cfg.rate_visitor_per_min = 0;
	product(&w, "LAMP-1", "lighting", T0 - DAY);
	cart_event(&w, "attacker@evil.example", "Eve", "acart", 1, T0);
	cart_event(&w, "victim@example.org", "Vic", "shopcart-77", 1, T0);
	tick(&w, T0 + HOUR + 60, &sum);
	long long am = sq(&w, "SELECT max(m.id) FROM messages m JOIN contacts c ON "
			  "c.id = m.contact_id WHERE c.email = 'attacker@evil.example'");
	tok_sign(w.app.key, TOK_RECOVER, am, T0 + DAY, tok, sizeof tok);
	snprintf(path, sizeof path, "/r/%s", tok);

	/* H2: another site sends a shopper's browser to the attacker's link */
	collect(&w, "rm_vid=v-shopper", "{\"type\":\"view\",\"sku\":\"LAMP-1\"}",
		T0 + 2 * HOUR);
	is_int(browser_req(&w, "GET", path, NULL, "10.9.8.1", "rm_vid=v-shopper", NULL,
			   T0 + 2 * HOUR, &rs), 302, "H2: someone's link forced on a shopper's browser: 302");
	const char *sc = resp_header(&rs, "Set-Cookie");
	ok(sc && !strncmp(sc, "rm_vid=v", 8) && !contains(sc, "v-shopper"),
	   "... the browser gets a fresh visitor id (%s)", sc ? sc : "no Set-Cookie");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT count(*) FROM visitors WHERE vid = 'v-shopper' "
		  "AND contact_id IS NULL AND verified = 0"), 1,
	       "... its old id is joined to nobody, as before");
	collect(&w, "rm_vid=v-shopper", "{\"type\":\"cart\",\"cart_id\":\"shop-991\","
		"\"items\":[{\"sku\":\"LAMP-1\",\"qty\":2}]}", T0 + 2 * HOUR);
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE cart_key = 'shop-991/v-shopper' "
		  "AND contact_id IS NULL"), 1,
	       "... so the shopper's later cart is no one's (never mailed to the link's owner)");
	/* the link's owner in a browser already theirs: the same id, proven */
	collect(&w, "rm_vid=v-eve", "{\"type\":\"identify\",\"email\":"
		"\"attacker@evil.example\"}", T0 + 2 * HOUR);
	browser_req(&w, "GET", path, NULL, "10.9.8.2", "rm_vid=v-eve", NULL, T0 + 2 * HOUR, &rs);
	sc = resp_header(&rs, "Set-Cookie");
	ok(sc && !strncmp(sc, "rm_vid=v-eve;", 13),
	   "H2: a browser joined to the link's own contact keeps its id (%s)", sc ? sc : "none");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT verified FROM visitors WHERE vid = 'v-eve'"), 1, "... and is proven");

	/* H1: a proven browser types another address: the proof does not move */
	browser_req(&w, "GET", path, NULL, "10.9.8.3", NULL, NULL, T0 + 2 * HOUR, &rs);
	sc = resp_header(&rs, "Set-Cookie");
	snprintf(cookie, sizeof cookie, "%.*s", sc ? (int)strcspn(sc, ";") : 0, sc ? sc : "");
	http_resp_free(&rs);
	is_int(browser_req(&w, "GET", "/onsite", NULL, "10.9.8.3", cookie, NULL,
			   T0 + 2 * HOUR, &rs), 200, "H1: the click's browser sees its contact's cart");
	ok(rs.body.data && contains(rs.body.data, "acart"), "... the attacker's own");
	http_resp_free(&rs);
	collect(&w, cookie, "{\"type\":\"identify\",\"email\":\"victim@example.org\"}",
		T0 + 2 * HOUR + 60);
	is_int(browser_req(&w, "GET", "/onsite", NULL, "10.9.8.3", cookie, NULL,
			   T0 + 2 * HOUR + 60, &rs), 204,
	       "... after it types someone else's address, /onsite shows nobody's cart");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT verified FROM visitors v JOIN contacts c ON c.id = v.contact_id "
		  "WHERE c.email = 'victim@example.org'"), 0,
	       "... the browser is joined to the typed address unproven");
	world_close(&w);

	/* H3: in confirm mode the hourly cap holds the confirmation mails too */
	if (!ok(world_open(&w, "review-confirm") == 0, "review: confirm world opens"))
		return;
	w.cfg.rate_ip_per_min = w.cfg.rate_visitor_per_min = 0;
	w.cfg.browser_new_contacts_per_hour = 2;
	set_cfg(&w.cfg.browser_consent, "confirm");
	char body[200];
	for (int i = 1; i <= 5; i++) {
		snprintf(body, sizeof body, "{\"type\":\"identify\",\"email\":"
			 "\"victim%d@example.org\",\"consent\":true}", i);
		snprintf(cookie, sizeof cookie, "rm_vid=v-h3-%d", i);
		collect(&w, cookie, body, T0 + i);
	}
	tick(&w, T0 + 60, &sum);
	is_int(outbox_count(&w), 2, "H3: past the cap (2) the held get no confirmation mail");

	/* M6: a pending consent stays the checkbox of the browser that gave it */
	const char *yes = "{\"type\":\"identify\",\"email\":\"m6@example.org\","
			  "\"consent\":true}";
	collect(&w, "rm_vid=v-m6-own", yes, T0 + 2 * HOUR);
	collect(&w, "rm_vid=v-m6-atk", yes, T0 + 2 * HOUR + 10);
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE email = 'm6@example.org' "
		  "AND consent_vid = 'v-m6-own'"), 1,
	       "M6: another browser ticking the box again does not take the pending consent over");
	long long m6 = sq(&w, "SELECT id FROM contacts WHERE email = 'm6@example.org'");
	tok_sign(w.app.key, TOK_CONFIRM, m6, T0 + 30 * DAY, tok, sizeof tok);
	snprintf(path, sizeof path, "/c/%s", tok);
	is_int(browser_req(&w, "POST", path, NULL, "10.9.8.4", NULL, "", T0 + 3 * HOUR, &rs), 200,
	       "... the owner confirms by mail");
	http_resp_free(&rs);
	collect(&w, "rm_vid=v-m6-atk", "{\"type\":\"identify\",\"email\":\"m6@example.org\","
		"\"consent\":false}", T0 + 3 * HOUR + 10);
	is_int(sq(&w, "SELECT consent FROM contacts WHERE id = %lld", m6), 1,
	       "... and the stranger's browser cannot withdraw it afterwards");
	world_close(&w);

	/* M1: carts a browser made for a known customer: one sequence in 30 days */
	if (!ok(world_open(&w, "review-seq") == 0, "review: sequence world opens"))
		return;
	w.cfg.rate_ip_per_min = w.cfg.rate_visitor_per_min = 0;
	product(&w, "LAMP-1", "lighting", T0 - DAY);
	struct ev_error err;
	ingest(&w, EV_HOOK, "{\"type\":\"identify\",\"email\":\"known@example.org\","
	       "\"consent\":true}", T0 - DAY, &err);
	int enrolled = 0;
	for (int i = 0; i < 4; i++) {
		rm_time t = T0 + (i < 2 ? i : 2) * 3 * HOUR;
		snprintf(body, sizeof body, "[{\"type\":\"identify\",\"email\":"
			 "\"known@example.org\"},{\"type\":\"cart\",\"cart_id\":\"y%d\","
			 "\"items\":[{\"sku\":\"LAMP-1\"}]}]", i);
		snprintf(cookie, sizeof cookie, "rm_vid=v-m1-%d", i);
		collect(&w, cookie, body, t);
		if (i != 2) { /* the last two in the same tick */
			tick(&w, t + 2 * HOUR, &sum);
			enrolled += sum.enrolled;
		}
	}
	is_int(enrolled, 1, "M1: browsers' carts for a known customer start one sequence, not 4");
	cart_event(&w, "known@example.org", "Known", "shop-1", 1, T0 + 10 * HOUR);
	tick(&w, T0 + 12 * HOUR, &sum);
	is_int(sum.enrolled, 1, "... the backend's own cart for them still starts its sequence");

	/* M2: the snippet and the hook both report cart c-19: one sequence */
	collect(&w, "rm_vid=v-ann", "{\"type\":\"cart\",\"email\":\"ann@example.com\","
		"\"consent\":true,\"cart_id\":\"c-19\",\"items\":[{\"sku\":\"LAMP-1\"}]}",
		T0 + 20 * HOUR);
	cart_event(&w, "ann@example.com", "Ann", "c-19", 1, T0 + 20 * HOUR + 1800);
	tick(&w, T0 + 21 * HOUR + 300, &sum);
	enrolled = sum.enrolled;
	tick(&w, T0 + 22 * HOUR, &sum);
	is_int(enrolled + sum.enrolled, 1,
	       "M2: a browser's cart and the backend's of the same id: one sequence");
	is_int(sq(&w, "SELECT count(*) FROM enrollments e JOIN carts k ON k.id = e.cart_id "
		  "WHERE k.cart_key = 'c-19'"), 1, "... the backend's (signed) cart's");
	/* the browser's copy began its sequence first: the signed cart ends it */
	collect(&w, "rm_vid=v-bob", "{\"type\":\"cart\",\"email\":\"bob@example.com\","
		"\"consent\":true,\"cart_id\":\"c-20\",\"items\":[{\"sku\":\"LAMP-1\"}]}",
		T0 + 20 * HOUR);
	tick(&w, T0 + 23 * HOUR, &sum);
	is_int(sum.enrolled, 1, "M2: the browser's copy c-20/v-bob starts its sequence");
	cart_event(&w, "bob@example.com", "Bob", "c-20", 1, T0 + 23 * HOUR + 10);
	is_int(sq(&w, "SELECT count(*) FROM enrollments e JOIN carts k ON k.id = e.cart_id "
		  "WHERE k.cart_key = 'c-20/v-bob' AND e.status = 'exited' "
		  "AND e.exit_reason = 'superseded'"), 1,
	       "... the backend's signed cart c-20 supersedes it");
	tick(&w, T0 + 25 * HOUR, &sum);
	is_int(sq(&w, "SELECT count(*) FROM enrollments e JOIN carts k ON k.id = e.cart_id "
		  "WHERE k.cart_key LIKE 'c-20%%' AND e.status = 'active'"), 1,
	       "... and only the signed cart's sequence runs");
	world_close(&w);

	/* M3: a hold ends when the shopper comes back an hour later, within the cap */
	if (!ok(world_open(&w, "review-hold") == 0, "review: hold world opens"))
		return;
	w.cfg.rate_ip_per_min = w.cfg.rate_visitor_per_min = 0;
	w.cfg.browser_new_contacts_per_hour = 2;
	product(&w, "LAMP-1", "lighting", T0 - DAY);
	const char *shop = "[{\"type\":\"identify\",\"email\":\"real@example.org\","
			   "\"consent\":true},{\"type\":\"cart\",\"cart_id\":\"r1\","
			   "\"items\":[{\"sku\":\"LAMP-1\"}]}]";
	collect(&w, NULL, "[{\"type\":\"identify\",\"email\":\"junk1@example.org\"},"
		"{\"type\":\"identify\",\"email\":\"junk2@example.org\"}]", T0);
	collect(&w, "rm_vid=v-real", shop, T0 + 10);
	for (int i = 3; i <= 5; i++) {
		snprintf(body, sizeof body, "{\"type\":\"identify\",\"email\":"
			 "\"junk%d@example.org\"}", i);
		collect(&w, NULL, body, T0 + 20);
	}
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE held_at IS NOT NULL"), 4,
	       "M3: junk exhausts the hour's cap (2); the real shopper and 3 more are held");
	tick(&w, T0 + 2 * HOUR, &sum);
	is_int(sum.enrolled, 0, "... the held shopper's cart is not mailed that hour");
	collect(&w, "rm_vid=v-real", shop, T0 + 3 * HOUR);
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE email = 'real@example.org' "
		  "AND held_at IS NULL"), 1, "M3: seen again in a later hour with room: the hold ends");
	tick(&w, T0 + 5 * HOUR, &sum);
	is_int(sum.enrolled, 1, "... and the shopper's cart starts its sequence");
	for (int i = 3; i <= 5; i++) {
		snprintf(body, sizeof body, "{\"type\":\"identify\",\"email\":"
			 "\"junk%d@example.org\"}", i);
		collect(&w, NULL, body, T0 + 3 * HOUR + 60);
	}
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE held_at IS NOT NULL"), 2,
	       "... a release takes a place under the cap: 1 more of 3 that come back, not all");
	world_close(&w);
}

/* ==== Discount codes ================================================== */

static void test_codes(void)
{
	struct world w;
	struct tick_summary sum;
	struct buf out = {0};
	char body[256], q[256];
	if (!ok(world_open(&w, "codes") == 0, "codes: world opens"))
		return;
	cart_event(&w, "ann@example.com", "Ann", "c-ann", 1, T0);
	cart_event(&w, "cid@example.com", "Cid", "c-cid", 1, T0);
	tick(&w, T0 + HOUR, &sum);
	tick(&w, T0 + DAY, &sum);
	tick(&w, T0 + 3 * DAY, &sum);
	long long m3 = sq(&w, "SELECT m.id FROM messages m JOIN contacts c ON c.id = m.contact_id "
			  "WHERE c.email = 'ann@example.com' AND m.step = 3");
	char *code = sq_text(&w, "SELECT d.code FROM discounts d JOIN contacts c ON c.id = d.contact_id "
			     "WHERE c.email = 'ann@example.com'");
	char *code2 = sq_text(&w, "SELECT d.code FROM discounts d JOIN contacts c ON c.id = d.contact_id "
			      "WHERE c.email = 'cid@example.com'");
	if (!ok(code && code2 && m3 > 0, "codes: Ann and Cid each got a code in step 3")) {
		free(code);
		free(code2);
		world_close(&w);
		return;
	}
	rm_time now = T0 + 3 * DAY + HOUR;

	/* the reservation */
	snprintf(body, sizeof body, "{\"code\":\"%s\",\"total\":100,\"reserve\":true,"
		 "\"cart_id\":\"cart-A\"}", code);
	is_int(validate(&w, body, now, &out), 200, "validate reserve for cart A: 200");
	snprintf(q, sizeof q, "\"reserved_until\":%lld", (long long)(now + 900));
	ok(contains(out.data, "\"valid\":true") && contains(out.data, "\"reason\":\"ok\"") &&
		   contains(out.data, q),
	   "... valid, held for cart A for 15 minutes (%s)", out.data);
	snprintf(body, sizeof body, "{\"code\":\"%s\",\"total\":100,\"cart_id\":\"cart-B\"}", code);
	validate(&w, body, now + 60, &out);
	ok(contains(out.data, "\"valid\":false") && contains(out.data, "\"reason\":\"reserved\"") &&
		   contains(out.data, q),
	   "validate for cart B meanwhile: not valid, reserved, until when (%s)", out.data);
	snprintf(body, sizeof body, "{\"code\":\"%s\",\"total\":100,\"reserve\":true,"
		 "\"cart_id\":\"cart-B\"}", code);
	validate(&w, body, now + 60, &out);
	ok(contains(out.data, "\"valid\":false") && contains(out.data, "\"reason\":\"reserved\""),
	   "cart B cannot take the hold of cart A (%s)", out.data);
	snprintf(body, sizeof body, "{\"code\":\"%s\",\"total\":100}", code);
	validate(&w, body, now + 60, &out);
	ok(contains(out.data, "\"reason\":\"reserved\""),
	   "validate without a cart while the code is held: reserved (%s)", out.data);
	snprintf(body, sizeof body, "{\"code\":\"%s\",\"total\":100,\"cart_id\":\"cart-A\"}", code);
	validate(&w, body, now + 60, &out);
	ok(contains(out.data, "\"valid\":true"), "validate for cart A itself: valid (%s)", out.data);
	snprintf(body, sizeof body, "{\"code\":\"%s\",\"total\":100,\"reserve\":true,"
		 "\"cart_id\":\"cart-B\"}", code);
	validate(&w, body, now + 901, &out);
	snprintf(q, sizeof q, "\"reserved_until\":%lld", (long long)(now + 901 + 900));
	ok(contains(out.data, "\"valid\":true") && contains(out.data, q),
	   "15 minutes later the hold has lapsed: cart B reserves it (%s)", out.data);
	snprintf(body, sizeof body, "{\"code\":\"%s\",\"total\":100,\"reserve\":true}", code);
	is_int(validate(&w, body, now, &out), 400, "reserve without cart_id: 400");
	ok(contains(out.data, "cart_id"), "... naming cart_id (%s)", out.data);
	snprintf(body, sizeof body, "{\"code\":\"%s\",\"total\":100,\"reserve\":\"yes\","
		 "\"cart_id\":\"c\"}", code);
	is_int(validate(&w, body, now, &out), 400, "reserve that is not a boolean: 400");
	snprintf(body, sizeof body, "{\"code\":\"%s\",\"total\":100,\"cart_id\":7}", code);
	is_int(validate(&w, body, now, &out), 400, "cart_id that is not text: 400");
	snprintf(body, sizeof body, "{\"code\":\"%s\",\"total\":100,\"reserve\":true,"
		 "\"cart_id\":\"a b\"}", code);
	is_int(validate(&w, body, now, &out), 400, "cart_id with a space: 400");

	/* the first order redeems the code and is attributed to its message */
	is_int(order(&w, "o-1", "ann@example.com", code, 90, now + 1000), 1, "order o-1 with Ann's code");
	is_attr(&w, "o-1", "code", m3, "... attributed to the message that carried the code");
	is_int(sq(&w, "SELECT count(*) FROM orders WHERE order_key = 'o-1' AND code_status = 'redeemed'"),
	       1, "... flagged redeemed");
	/* a second order with the same code: stored, flagged, not attributed again */
	is_int(order(&w, "o-2", "zed@example.com", code, 80, now + 2000), 1,
	       "order o-2 with the same code is stored");
	is_int(sq(&w, "SELECT count(*) FROM orders WHERE order_key = 'o-2' AND code_status = 'reused'"),
	       1, "... flagged reused");
	is_attr(&w, "o-2", "none", 0, "... and not attributed to the code's message again");
	is_int(sq(&w, "SELECT count(*) FROM discounts WHERE order_key = 'o-1' AND redeemed_at = %lld",
		  (long long)(now + 1000)), 1, "... the code stays redeemed by o-1");
	is_int(sq(&w, "SELECT count(*) FROM orders WHERE message = %lld", m3), 1,
	       "the code's message has one order");
	/* the same order again (a hook retry) changes nothing */
	order(&w, "o-1", "ann@example.com", code, 90, now + 3000);
	is_int(sq(&w, "SELECT count(*) FROM orders WHERE code_status = 'redeemed'"), 1,
	       "a repeated order event redeems nothing more");
	snprintf(body, sizeof body, "{\"code\":\"%s\",\"total\":100,\"reserve\":true,"
		 "\"cart_id\":\"cart-C\"}", code);
	validate(&w, body, now + 4000, &out);
	ok(contains(out.data, "already_used"), "a redeemed code cannot be reserved (%s)", out.data);

	/* an expired code: stored, flagged, not redeemed, not attributed to it */
	rm_time expires = sq(&w, "SELECT expires FROM discounts WHERE contact_id = "
			     "(SELECT id FROM contacts WHERE email = 'cid@example.com')");
	is_int(order(&w, "o-3", "yan@example.com", code2, 70, expires + 1), 1,
	       "order o-3 with Cid's code after it expired is stored");
	is_int(sq(&w, "SELECT count(*) FROM orders WHERE order_key = 'o-3' AND code_status = 'expired'"),
	       1, "... flagged expired");
	is_int(sq(&w, "SELECT count(*) FROM discounts WHERE redeemed_at IS NOT NULL"), 1,
	       "... and the expired code is not marked redeemed");
	is_attr(&w, "o-3", "none", 0, "... nor attributed to the code's message");
	/* a code remarket never issued is the store's own affair */
	is_int(order(&w, "o-4", "ann@example.com", "SUMMER10", 60, expires + 2), 1,
	       "an order with a store's own code is stored");
	is_int(sq(&w, "SELECT count(*) FROM orders WHERE order_key = 'o-4' AND code_status IS NULL"),
	       1, "... not flagged");

	struct report *r = calloc(1, sizeof *r);
	if (r && report_build(&w.app, T0 - DAY, T0 + 30 * DAY, r) == 0) {
		is_int(r->codes_redeemed, 1, "report: one code redeemed");
		is_int(r->attributed, 1, "report: one order attributed (o-1), not three");
		ok(r->codes_reused == 1 && r->codes_expired == 1,
		   "report: one order with a reused code, one with an expired code");
		struct buf j = {0}, h = {0};
		report_json(r, &j);
		report_html(r, "Test shop", &h);
		ok(contains(j.data, "\"codes_flagged\":{\"reused\":1,\"expired\":1}"),
		   "report JSON: codes_flagged");
		ok(contains(h.data, "data-k=\"codes_flagged.reused\" data-v=\"1.0000\""),
		   "report HTML: the reused codes card");
		buf_free(&j);
		buf_free(&h);
	}
	free(r);
	buf_free(&out);
	free(code);
	free(code2);
	world_close(&w);
}

/* Migration 009 on a database that already holds orders with codes: every
 * row stays, old orders are flagged by the same rules. The database is made
 * "before 009" by undoing 009's and 011's columns (011 is the last
 * migration; 009 and 011 run again). */
static void test_codes_migration(void)
{
	struct world w;
	char err[512] = "";
	if (!ok(world_open(&w, "codes-migration") == 0, "codes migration: world opens"))
		return;
	struct db *db = w.app.db;
	int v = db_user_version(db);
	db_scalar(db, "INSERT INTO discounts (code, percent, created, expires, redeemed_at, order_key) "
		  "VALUES ('RM-AAAA-AAAA', 10, 0, 1000, 500, 'k1'), "
		  "('RM-BBBB-BBBB', 10, 0, 1000, NULL, NULL)");
	db_scalar(db, "INSERT INTO orders (order_key, total, discount_code, ts) VALUES "
		  "('k1', 10, 'RM-AAAA-AAAA', 500), ('k2', 10, 'RM-AAAA-AAAA', 600), "
		  "('k3', 10, 'RM-BBBB-BBBB', 2000), ('k4', 10, 'OWN-CODE', 700), ('k5', 10, NULL, 800)");
	/* 014 and 012 (after 009) are undone too, so that 009 onwards runs again */
	db_scalar(db, "DROP TABLE refunds");
	db_scalar(db, "ALTER TABLE orders DROP COLUMN refunded");
	db_scalar(db, "DROP TABLE reco_items");
	db_scalar(db, "DROP TABLE reco_pairs");
	db_scalar(db, "DROP TABLE reco_state");
	db_scalar(db, "DROP TABLE forgotten"); /* 016, replayed too */
	db_scalar(db, "DROP TABLE feedback"); /* 020 */
	db_scalar(db, "DROP TABLE webhook_tokens");
	db_scalar(db, "DROP TABLE push_subscriptions"); /* 024 */
	db_scalar(db, "DROP TABLE browse_views"); /* 027 */
	db_scalar(db, "DROP INDEX enrollments_contact_sku");
	db_scalar(db, "ALTER TABLE enrollments DROP COLUMN sku");
	db_scalar(db, "DELETE FROM steps WHERE flow_id IN (SELECT id FROM flows "
		  "WHERE name = 'browse_abandonment')");
	db_scalar(db, "DELETE FROM flows WHERE name = 'browse_abandonment'");
	db_scalar(db, "DROP INDEX messages_contact_sent"); /* 025 */
	db_scalar(db, "DROP INDEX messages_contact_gate");
	db_scalar(db, "ALTER TABLE messages DROP COLUMN deferred_by");
	db_scalar(db, "ALTER TABLE messages DROP COLUMN gate_at");
	db_scalar(db, "ALTER TABLE contacts DROP COLUMN tz");
	db_scalar(db, "DROP INDEX messages_message_id");
	db_scalar(db, "DROP INDEX orders_cart"); /* 019, replayed too */
	db_scalar(db, "ALTER TABLE products DROP COLUMN kind");
	db_scalar(db, "DROP INDEX orders_code_status");
	db_scalar(db, "ALTER TABLE orders DROP COLUMN code_status");
	db_scalar(db, "ALTER TABLE discounts DROP COLUMN reserved_cart");
	db_scalar(db, "ALTER TABLE discounts DROP COLUMN reserved_until");
	db_scalar(db, "ALTER TABLE carts DROP COLUMN generation");
	db_scalar(db, "ALTER TABLE carts DROP COLUMN started");
	db_scalar(db, "ALTER TABLE products DROP COLUMN brand");
	db_scalar(db, "DROP INDEX contacts_phone"); /* 023 */
	db_scalar(db, "ALTER TABLE steps DROP COLUMN channels");
	db_scalar(db, "ALTER TABLE messages DROP COLUMN channel");
	db_scalar(db, "ALTER TABLE contacts DROP COLUMN phone");
	db_scalar(db, "ALTER TABLE contacts DROP COLUMN sms_consent");
	db_scalar(db, "ALTER TABLE contacts DROP COLUMN sms_consent_source");
	db_scalar(db, "ALTER TABLE contacts DROP COLUMN sms_consent_at");
	char pragma[64];
	/* 009 is the 8th migration (there is no 005): 009, 010 (idempotent)
	 * and 012 run again */
	snprintf(pragma, sizeof pragma, "PRAGMA user_version = %d", 7);
	db_scalar(db, pragma);
	ok(db_migrate(db, err, sizeof err) == 0 && db_user_version(db) == v,
	   "codes migration: 009 applies to a database with orders (%s)", err);
	is_int(sq(&w, "SELECT count(*) FROM orders"), 5, "codes migration: no order lost");
	is_int(sq(&w, "SELECT count(*) FROM discounts"), 2, "codes migration: no code lost");
	is_int(sq(&w, "SELECT count(*) FROM orders WHERE (order_key = 'k1' AND code_status = 'redeemed') "
		  "OR (order_key = 'k2' AND code_status = 'reused') "
		  "OR (order_key = 'k3' AND code_status = 'expired') "
		  "OR (order_key IN ('k4', 'k5') AND code_status IS NULL)"), 5,
	       "codes migration: old orders flagged redeemed, reused, expired, or not at all");
	world_close(&w);
}

static void test_keys_codes(void)
{
	test_keyring();
	test_codes();
	test_codes_migration();
}

/* ==== Catalog and order imports (CSV) ================================= */

/* The importers' column tables: names in any order and case, each kind
 * converted as before, the header's must-have columns, the messages. */
static void test_csv_columns(void)
{
	struct world w;
	char out[256], err[1024];
	if (!ok(world_open(&w, "csvcols") == 0, "csv columns: world opens"))
		return;
	is_int(csv_run(&w, 1, "email,sku,name\na@example.com,X,Y\n", out, sizeof out,
		       err, sizeof err), 1, "orders: a header without order_id and date: 1");
	is_str(err, "remarket import: CSV: missing column 'order_id' (or its alias "
	       "'InvoiceNo')\nremarket import: CSV: missing column 'date' (or its "
	       "alias 'InvoiceDate')\nremarket import: CSV: the first line must "
	       "name the columns, separated by ',', ';' or tabs: "
	       "order_id,email,date,sku,name,price,qty[,currency,consent,customer_id]\n",
	       "... the message names each missing column and lists the columns, "
	       "the optional ones in brackets");
	is_str(out, "", "... and prints no counts: nothing was read");
	is_int(csv_run(&w, 1, "order_id,date,email\n1,2024-01-15,a@example.com\n", out,
		       sizeof out, err, sizeof err), 1, "orders: a header without sku: 1");
	ok(strstr(err, "missing column 'sku' (or its alias 'StockCode')") != NULL,
	   "... named (%s)", err);
	/* email, name, price, qty named but not present: the header passes */
	is_int(csv_run(&w, 1, " SKU ,Consent,Date,ORDER_ID,qty,Price,Email,Currency,name\n"
		       "K1,Yes,2024-01-15T10:00:00Z,o1,2,9.5,c1@example.com,USD,Kettle\n"
		       "K2,no,1705312800,o2,,4,c2@example.com,,Cup\n"
		       "K3,true,2024-01-15 10:00:00,o3,1,1,c3@example.com,,Pot\n"
		       "K4,,2024-01-16,o4,1,abc,c4@example.com,,Pan\n",
		       out, sizeof out, err, sizeof err), 1,
	       "orders: columns in any order and case; a refused row makes 1");
	is_str(out, "{\"imported\":2,\"refused\":2}\n", "... 2 imported, 2 refused");
	ok(strstr(err, "CSV line 4: Date: '2024-01-15 10:00:00' is not ISO 8601") != NULL,
	   "... a date that is no time refuses its row, named with its line and "
	   "the header's name of the column (%s)", err);
	ok(strstr(err, "CSV line 5: Price: must be a number (order o4)") != NULL,
	   "... a price that is no number is refused by ev_ingest, said in the "
	   "CSV's words (%s)", err);
	is_int(sq(&w, "SELECT ts FROM orders WHERE order_key = 'o1'"), 1705312800,
	       "time: ISO 8601 converted");
	is_int(sq(&w, "SELECT ts FROM orders WHERE order_key = 'o2'"), 1705312800,
	       "time: Unix seconds converted");
	is_int(sq(&w, "SELECT round(total * 100) FROM orders WHERE order_key = 'o1'"), 1900,
	       "number and int: 9.5 x 2 = 19");
	is_int(sq(&w, "SELECT json_extract(items, '$[0].qty') FROM orders "
		  "WHERE order_key = 'o2'"), 1, "int: an empty qty is 1");
	is_int(sq(&w, "SELECT currency = 'USD' FROM orders WHERE order_key = 'o1'"), 1,
	       "text: the currency as given");
	is_int(sq(&w, "SELECT consent FROM contacts WHERE email = 'c1@example.com'"), 1,
	       "flag: Yes gives consent");
	is_int(sq(&w, "SELECT consent FROM contacts WHERE email = 'c2@example.com'"), 0,
	       "flag: no does not");

	is_int(csv_run(&w, 0, "Price,sku,name,review_rating,review_author,review_text,category\n"
		       "12.5,P1,Lamp,4,Ann,Bright,lamps\n"
		       "x,P2,Vase,,,,\n", out, sizeof out, err, sizeof err), 1,
	       "products: columns in any order; a row with a bad price makes 1");
	is_str(out, "{\"imported\":1,\"refused\":1}\n", "... 1 imported, 1 refused");
	ok(strstr(err, "line 3:") != NULL, "... the refused line is named (%s)", err);
	is_int(sq(&w, "SELECT round(price * 10) FROM products WHERE sku = 'P1'"), 125,
	       "products: number converted");
	is_int(sq(&w, "SELECT rating FROM reviews WHERE sku = 'P1'"), 4,
	       "products: the review's rating an integer");
	is_int(sq(&w, "SELECT category = 'lamps' FROM products WHERE sku = 'P1'"), 1,
	       "products: text as given");
	world_close(&w);
}

/* Every row an order makes, as one text: two stores compared by it hold
 * the same orders, lines, events and contacts. */
static char *imp_rows(struct world *w)
{
	return sq_text(w, "SELECT (SELECT group_concat(r, '|') FROM (SELECT "
		       "quote(order_key) || quote(contact_id) || quote(cart_id) || "
		       "quote(total) || quote(currency) || quote(items) || "
		       "quote(discount_code) || quote(ts) || quote(message) || "
		       "quote(attribution) || quote(code_status) AS r FROM orders "
		       "ORDER BY id)) || '#' || (SELECT group_concat(r, '|') FROM "
		       "(SELECT quote(order_id) || quote(contact_id) || quote(sku) || "
		       "quote(qty) || quote(price) || quote(ts) AS r FROM order_lines "
		       "ORDER BY rowid)) || '#' || (SELECT group_concat(r, '|') FROM "
		       "(SELECT quote(ts) || quote(received) || quote(source) || "
		       "quote(type) || quote(body) AS r FROM events ORDER BY id)) "
		       "|| '#' || (SELECT group_concat(r, '|') FROM (SELECT "
		       "quote(email) || quote(name) || quote(consent) || quote(created) "
		       "|| quote(updated) || quote(signed) AS r FROM contacts ORDER BY id))");
}

/* What the import_committed hook saw: how often it was called, and the
 * hook event a test posted through a second connection at the first. */
struct imp_seen {
	int calls, hook_rc;
	long orders_then;
	struct app *other;
};
static struct imp_seen imp_seen;

static void imp_on_commit(struct app *app, long orders)
{
	(void)app;
	if (imp_seen.calls++ == 0 && imp_seen.other) {
		struct ev_error err;
		static const char cart[] =
			"{\"type\":\"cart\",\"cart_id\":\"during-import\","
			"\"email\":\"hook@example.com\",\"items\":[{\"sku\":\"A\","
			"\"name\":\"Lamp\",\"price\":10,\"qty\":1}]}";
		imp_seen.orders_then = orders;
		imp_seen.hook_rc = ev_ingest(imp_seen.other, EV_HOOK, cart,
					     strlen(cart), NULL, T0, &err);
	}
}

/* Files as people have them (issue 11): Excel's "CSV UTF-8" (a byte
 * order mark), ';' and tab separators, a header required, a stray quote
 * that swallows nothing, import_file's --dry-run writing nothing. */
static void test_csv_files(void)
{
	struct world w;
	char out[256], err[2048];
	if (!ok(world_open(&w, "csvfiles") == 0, "csv files: world opens"))
		return;
	is_int(csv_run(&w, 1, "\xEF\xBB\xBForder_id;email;date;sku;name;price;qty\r\n"
		       "b1;bom@example.com;2026-06-20T10:00:00+02:00;K1;Kettle;\"9,5\";1\r\n"
		       "b2;bom@example.com;2026-06-21;K2;\"Cup; big\";4;2\r\n",
		       out, sizeof out, err, sizeof err), 1,
	       "BOM and ';': read (a decimal comma is no number: refused)");
	is_str(out, "{\"imported\":1,\"refused\":1}\n", "... one in, one refused");
	ok(strstr(err, "CSV line 2: price: must be a number (order b1)") != NULL,
	   "... the refusal names the line and the column (%s)", err);
	is_int(sq(&w, "SELECT count(*) FROM orders, json_each(items) WHERE "
		  "value ->> 'name' = 'Cup; big'"), 1,
	       "... a quoted ';' is text; the BOM is not in the first column's name");
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE email = 'bom@example.com'"), 1,
	       "... the contact made");

	is_int(csv_run(&w, 1, "order_id\temail\tdate\tsku\tname\tprice\tqty\n"
		       "t1\ttab@example.com\t2026-06-20T10:00:00+02:00\tK1\tKettle, red\t3\t1\n",
		       out, sizeof out, err, sizeof err), 0, "tab-separated: exit 0");
	is_int(sq(&w, "SELECT ts FROM orders WHERE order_key = 't1'"), 1781942400,
	       "... its date with an offset read as UTC (08:00Z)");
	is_int(sq(&w, "SELECT count(*) FROM orders, json_each(items) WHERE "
		  "value ->> 'name' = 'Kettle, red'"), 1,
	       "... a ',' inside a tab-separated field is text");

	is_int(csv_run(&w, 1, "n1,nohdr@example.com,2026-06-20,K1,Kettle,1,1\n",
		       out, sizeof out, err, sizeof err), 1,
	       "a file without its header: exit 1, not 0");
	ok(strstr(err, "line 1 names none of the columns") != NULL,
	   "... said (%s)", err);
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE email = 'nohdr@example.com'"),
	       0, "... and nothing imported");
	is_int(csv_run(&w, 0, "P9,Lamp,12\n", out, sizeof out, err, sizeof err), 1,
	       "products without a header: exit 1");
	is_int(csv_run(&w, 0, "name,price\nLamp,12\n", out, sizeof out, err, sizeof err), 1,
	       "products without a sku column: exit 1");
	ok(strstr(err, "missing column 'sku'\n") != NULL, "... named (%s)", err);
	is_int(csv_run(&w, 0, "", out, sizeof out, err, sizeof err), 1,
	       "an empty file: exit 1");

	/* inch marks: a quote inside a field is text, so two of them on two
	 * lines never pair up and swallow what lies between (RFC 4180) */
	is_int(csv_run(&w, 1, "order_id,email,date,sku,name,price,qty\n"
		       "i1,a@example.com,2026-06-20,T5,TV 55\" screen,100,1\n"
		       "i2,b@example.com,2026-06-20,T6,TV 65\",200,1\n"
		       "i3,c@example.com,2026-06-20,K1,Kettle,3,1\n",
		       out, sizeof out, err, sizeof err), 0,
	       "two inch marks on two lines: exit 0");
	is_str(out, "{\"imported\":3,\"refused\":0}\n", "... every line imported");
	is_int(sq(&w, "SELECT count(*) FROM orders, json_each(items) WHERE "
		  "value ->> 'name' IN ('TV 55\" screen', 'TV 65\"')"), 2,
	       "... each name with its inch mark");

	/* a stray quote on line 3: lines 4 and 5 are still read */
	is_int(csv_run(&w, 1, "order_id,email,date,sku,name,price,qty\n"
		       "q1,q@example.com,2026-06-20,K1,Kettle,1,1\n"
		       "q2,q@example.com,2026-06-20,K1,\"Kettle,1,1\n"
		       "q3,q@example.com,2026-06-20,K1,\"Cup \"\"big\"\"\",2,1\n"
		       "q4,q@example.com,2026-06-20,K1,\"two\nlines\",2,1\n"
		       "q5,q@example.com,2026-06-20,K1,Pot,2,1\n",
		       out, sizeof out, err, sizeof err), 1, "a stray quote: exit 1");
	is_str(out, "{\"imported\":3,\"refused\":2}\n",
	       "... its line refused, the others read");
	ok(strstr(err, "CSV line 3: a quote (\") opened on this line is never closed")
	   != NULL, "... the line where the quote opened named (%s)", err);
	is_int(sq(&w, "SELECT count(*) FROM orders, json_each(items) WHERE "
		  "value ->> 'name' IN ('Cup \"big\"', 'Pot')"), 2,
	       "... doubled quotes read as one, the line after a field on two "
	       "lines read");
	ok(strstr(err, "CSV line 5: name: invalid value (order q4)") != NULL,
	   "... a field on two lines is one record, named by its first line "
	   "(a name may not hold a newline) (%s)", err);
	is_int(csv_run(&w, 1, "order_id,email,date,sku,name,price,qty\n"
		       "u1,u@example.com,2026-06-20,K1,Kettle,1,1\n"
		       "u2,u@example.com,2026-06-20,K1,\"Kettle,1,1\n",
		       out, sizeof out, err, sizeof err), 1,
	       "a quote never closed on the last line");
	ok(strstr(err, "CSV line 3: a quote") != NULL, "... named (%s)", err);
	is_int(sq(&w, "SELECT count(*) FROM orders WHERE order_key = 'u1'"), 1,
	       "... the line before it imported");

	/* more columns than the 16 of before: a shop's export has ~70 */
	struct buf wide = {0};
	for (int i = 0; i < 60; i++)
		buf_addf(&wide, "extra%d,", i);
	buf_adds(&wide, "order_id,email,date,sku,name,price,qty\n");
	for (int i = 0; i < 60; i++)
		buf_adds(&wide, "x,");
	buf_adds(&wide, "wide1,wide@example.com,2026-06-20,K1,Kettle,1,1\n");
	is_int(csv_run(&w, 1, wide.data, out, sizeof out, err, sizeof err), 0,
	       "67 columns: exit 0");
	is_int(sq(&w, "SELECT count(*) FROM orders WHERE order_key = 'wide1'"), 1,
	       "... imported");
	buf_free(&wide);

	/* --dry-run: the counts and refusals of an import, nothing written */
	long long before = sq(&w, "SELECT (SELECT count(*) FROM orders) * 1000 + "
			      "(SELECT count(*) FROM contacts)");
	static char dry[] = "order_id,email,date,sku,name,price,qty\n"
			    "d1,dry@example.com,2026-06-20,K1,Kettle,1,1\n"
			    "d2,dry2@example.com,2026-06-20,K1,Kettle,x,1\n"
			    "d3,dry3@example.com,2026-06-20,K1,Kettle,1,0\n";
	FILE *f = fmemopen(dry, sizeof dry - 1, "r");
	FILE *co = tmpfile(), *ce = tmpfile();
	int so = dup(1), se = dup(2), rc = -9;
	if (f && co && ce) {
		fflush(stdout), fflush(stderr);
		dup2(fileno(co), 1), dup2(fileno(ce), 2);
		rc = import_file(&w.app, 1, f, T0, "dry.csv", NULL, 1);
		fflush(stdout), fflush(stderr);
		dup2(so, 1), dup2(se, 2);
		rewind(co), out[fread(out, 1, sizeof out - 1, co)] = '\0';
		rewind(ce), err[fread(err, 1, sizeof err - 1, ce)] = '\0';
	}
	close(so), close(se);
	if (f)
		fclose(f);
	if (co)
		fclose(co);
	if (ce)
		fclose(ce);
	is_int(rc, 1, "dry run: exit 1, as the import would");
	is_str(out, "{\"dry_run\":true,\"would_import\":1,\"refused\":2}\n",
	       "... what would be imported");
	ok(strstr(err, "dry.csv line 3: price: must be a number (order d2)") &&
	   strstr(err, "dry.csv line 4: qty: must be between 1 and") &&
	   strstr(err, "refused: 1 line, 1 order, revenue 0.00: qty: must be"),
	   "... each refusal and the summary by reason (%s)", err);
	is_int(sq(&w, "SELECT (SELECT count(*) FROM orders) * 1000 + "
		  "(SELECT count(*) FROM contacts)"), before, "... and nothing written");
	world_close(&w);
}

/* import_orders' direct path: the rows it makes are the rows the same
 * orders make through ev_ingest; a re-import changes nothing; a big
 * import commits in several transactions, and a hook posted between two
 * of them is recorded at once, the import going on after it. */
/* Issue 14: a real export imports as published. The fixture is a sample
 * of the UCI "Online Retail" data set (CC BY 4.0, tests/data/README.md):
 * its own column names, ISO dates with milliseconds, guests (no
 * CustomerID), SKU "BANK CHARGES", a line of 1,824 units, an order of
 * 592 lines, descriptions with trailing spaces, cancellations. */
static void test_import_retail(void)
{
	struct world w;
	char path[PATH_MAX + 64], rej[PATH_MAX + 64], out[256], err[4096];
	if (!ok(world_open(&w, "retail") == 0, "retail import: world opens"))
		return;
	snprintf(path, sizeof path, "%s/../tests/data/online-retail-sample.csv",
		 templates);
	snprintf(rej, sizeof rej, "%s/retail-rejects.csv", tmpdir);
	FILE *f = fopen(path, "r"), *r = fopen(rej, "w");
	FILE *ce = tmpfile(), *co = tmpfile();
	int rc = -9, so = dup(1), se = dup(2);
	if (f && r && ce && co) {
		fflush(stdout), fflush(stderr);
		dup2(fileno(co), 1), dup2(fileno(ce), 2);
		rc = import_orders_rejects(&w.app, f, T0, r);
		fflush(stdout), fflush(stderr);
		dup2(so, 1), dup2(se, 2);
	}
	close(so), close(se);
	*out = *err = '\0';
	if (co)
		rewind(co), out[fread(out, 1, sizeof out - 1, co)] = '\0', fclose(co);
	if (ce)
		rewind(ce), err[fread(err, 1, sizeof err - 1, ce)] = '\0', fclose(ce);
	if (f)
		fclose(f);
	if (r)
		fclose(r);
	is_int(rc, 1, "retail import: exit 1 (cancellations of nothing are refused)");
	is_str(out, "{\"imported\":230,\"refused\":69}\n",
	       "... 230 orders in, the 69 cancellation lines refused");
	is_int(db_scalar(w.app.db, "SELECT count(*) FROM orders"), 230,
	       "... 230 orders recorded");
	is_int(db_scalar(w.app.db, "SELECT count(*) FROM order_lines"), 5682,
	       "... with their 5682 lines");
	is_int(db_scalar(w.app.db, "SELECT count(*) FROM orders WHERE "
			 "contact_id IS NULL"), 230,
	       "... no email column: every order a guest's, no contact");
	is_int(db_scalar(w.app.db, "SELECT count(*) FROM contacts"), 0,
	       "... and no contact made (nothing to mail)");
	is_int(db_scalar(w.app.db, "SELECT count(*) FROM events WHERE type = "
			 "'order' AND json_extract(body, '$.customer_id') "
			 "IS NULL"), 14,
	       "... 14 guest orders without a CustomerID, the rest keep theirs");
	is_int(db_scalar(w.app.db, "SELECT count(*) FROM order_lines WHERE "
			 "sku = 'BANK CHARGES' AND price = 15"), 1,
	       "... the BANK CHARGES line (a SKU with a space)");
	is_int(db_scalar(w.app.db, "SELECT count(*) FROM order_lines WHERE "
			 "sku = '84950' AND qty = 1824"), 1,
	       "... the line of 1,824 units (under import_max_qty)");
	is_int(db_scalar(w.app.db, "SELECT count(*) FROM order_lines l JOIN "
			 "orders o ON o.id = l.order_id WHERE o.order_key = "
			 "'536370'"), 20,
	       "... order 536370 whole");
	is_int(db_scalar(w.app.db, "SELECT ts FROM orders WHERE order_key = "
			 "'536370'"), 1291193100,
	       "... its date 2010-12-01T08:45:00.000Z");
	/* no email column, so no customer's order to refund: each
	 * cancellation line is refused, with its reason */
	ok(strstr(err, "remarket import: refused: 69 lines, 43 orders, revenue "
		  "-1627.75: cancellation: no matching order\n") != NULL,
	   "... the summary by reason (%s)", err);
	char *txt = NULL;
	FILE *rf = fopen(rej, "r");
	if (rf) {
		txt = calloc(1, 1 << 16);
		if (txt)
			txt[fread(txt, 1, (1 << 16) - 1, rf)] = '\0';
		fclose(rf);
	}
	ok(txt && !strncmp(txt, "order_id,sku,name,qty,price,date,customer_id,"
			   "reason\n", 51), "... the rejects file's header");
	int lines = 0;
	for (char *p = txt; p && (p = strchr(p, '\n')); p++)
		lines++;
	is_int(lines, 70, "... and one row per refused line");
	ok(txt && strstr(txt, ",cancellation: no matching order\n") != NULL,
	   "... each with its reason");
	free(txt);

	/* dates with an offset and milliseconds; a line past import_max_qty is
	 * refused alone, the rest of its order imported */
	is_int(csv_run(&w, 1, "order_id,email,date,sku,name,price,qty\n"
		       "z1,ann@example.com,2024-06-20T10:00:00+02:00,BANK CHARGES,Fee,1,1\n"
		       "z2,bob@example.com,2024-06-20T08:00:00.250Z,K1,Kettle,1,5000\n"
		       "z2,bob@example.com,2024-06-20T08:00:00.250Z,K2,Cup,2,200000\n"
		       "z3,cy@example.com,2024-06-20T10:00:00+25:00,K1,Kettle,1,1\n",
		       out, sizeof out, err, sizeof err), 1, "offsets: exit 1");
	is_str(out, "{\"imported\":2,\"refused\":2}\n", "... two orders in, two lines out");
	is_int(db_scalar(w.app.db, "SELECT count(*) FROM orders WHERE order_key "
			 "IN ('z1', 'z2') AND ts = 1718870400"), 2,
	       "... +02:00 and .250Z read as the same UTC second");
	is_int(db_scalar(w.app.db, "SELECT total FROM orders WHERE order_key = 'z2'"),
	       5000, "... z2 without its 200000-unit line");
	ok(strstr(err, "refused: 1 line, 1 order, revenue 400000.00: qty: more "
		  "than import_max_qty (100000)\n") != NULL,
	   "... which the summary names (%s)", err);
	ok(strstr(err, "+25:00") && strstr(err, "refused: 1 line, 1 order, revenue "
		  "1.00: date: not ISO 8601"), "... an offset of 25 h is no date");

	/* events: SKUs as imports take them; max_qty */
	struct ev_error e;
	is_int(ingest(&w, EV_HOOK, "{\"type\":\"order\",\"order_id\":\"e1\","
		      "\"email\":\"dee@example.com\",\"items\":[{\"sku\":"
		      "\"BANK CHARGES\",\"price\":1,\"qty\":1000}]}", T0, &e), 1,
	       "event: a SKU with a space, qty 1000");
	is_int(ingest(&w, EV_HOOK, "{\"type\":\"order\",\"order_id\":\"e2\","
		      "\"email\":\"dee@example.com\",\"items\":[{\"sku\":"
		      "\"A\\nB\",\"price\":1}]}", T0, &e), -1,
	       "event: a SKU with LF refused");
	is_int(ingest(&w, EV_HOOK, "{\"type\":\"order\",\"order_id\":\"e3\","
		      "\"items\":[{\"sku\":\"K1\",\"price\":1,\"qty\":1001}]}",
		      T0, &e), -1, "event: qty 1001 past max_qty refused");
	ok(strstr(e.msg, "qty") != NULL, "... saying so (%s)", e.msg);
	w.cfg.max_qty = 2000;
	is_int(ingest(&w, EV_HOOK, "{\"type\":\"order\",\"order_id\":\"e3\","
		      "\"customer_id\":\"C-17\",\"items\":[{\"sku\":\"K1\","
		      "\"price\":1,\"qty\":1001}]}", T0, &e), 1,
	       "event: with max_qty = 2000 it passes; a guest's order");
	w.cfg.max_qty = 1000;
	/* the choice for an order with a customer_id and no email: a
	 * guest's. No contact (no address to mail), so no flow and no
	 * segment; its lines count in the product statistics; a later
	 * order of the same customer_id with an email is not tied to it
	 * (a customer_id is the store's word, not proof of who ordered) */
	db_scalar(w.app.db, "UPDATE flows SET enabled = 1");
	long long contacts = sq(&w, "SELECT count(*) FROM contacts");
	is_int(ingest(&w, EV_HOOK, "{\"type\":\"order\",\"order_id\":\"g1\","
		      "\"customer_id\":\"C-99\",\"ts\":1700000000,\"items\":[{\"sku\":"
		      "\"G1\",\"name\":\"Glass\",\"price\":3},{\"sku\":\"G2\","
		      "\"name\":\"Jug\",\"price\":5}]}", T0, &e), 1,
	       "guest: an order with a customer_id and no email is stored");
	is_int(sq(&w, "SELECT count(*) FROM contacts") - contacts, 0,
	       "guest: ... with no contact");
	is_int(sq(&w, "SELECT count(*) FROM orders WHERE order_key = 'g1' AND "
		  "contact_id IS NULL"), 1, "guest: ... the order is nobody's");
	reco_refresh(&w.app, 1000, 0);
	is_int(sq(&w, "SELECT orders FROM reco_items WHERE sku = 'G1'") +
	       sq(&w, "SELECT orders FROM reco_pairs WHERE sku = 'G1' AND other = 'G2'"), 2,
	       "guest: ... its lines count in the product statistics");
	struct tick_summary ts;
	memset(&ts, 0, sizeof ts);
	flow_detect(&w.app, T0 + 3600, &ts);
	is_int(sq(&w, "SELECT count(*) FROM enrollments e JOIN orders o ON "
		  "o.id = e.order_id WHERE o.order_key = 'g1'"), 0,
	       "guest: ... no flow (post-purchase enabled)");
	ingest(&w, EV_HOOK, "{\"type\":\"order\",\"order_id\":\"g2\","
	       "\"customer_id\":\"C-99\",\"email\":\"gus@example.com\","
	       "\"items\":[{\"sku\":\"G1\",\"name\":\"Glass\",\"price\":3}]}",
	       T0, &e);
	is_int(sq(&w, "SELECT count(*) FROM orders o JOIN contacts c ON "
		  "c.id = o.contact_id WHERE c.email = 'gus@example.com'"), 1,
	       "guest: a later order with an email is theirs alone, the guest "
	       "order stays a guest's");
	world_close(&w);
}

static void test_import_batches(void)
{
	struct world a, b;
	char out[256], err[2048];
	if (!ok(world_open(&a, "impdirect") == 0, "import: world opens"))
		return;
	if (!ok(world_open(&b, "impevents") == 0, "import: second world opens")) {
		world_close(&a);
		return;
	}
	static const char csv[] =
		"order_id,email,date,sku,name,price,qty,currency,consent\n"
		"d1,ann@example.com,2024-01-15T10:00:00Z,K1,\"Kettle, steel\",9.5,2,USD,yes\n"
		"d1,ann@example.com,2024-01-15T10:00:00Z,K2,Cup,4,,USD,\n"
		"d2,bob@example.com,1705400000,K1,\"Kettle \"\"Duo\"\"\",12.25,1,,no\n"
		"d3,ann@example.com,1705300000,K3,Pot,0,3,,\n";
	imp_seen = (struct imp_seen){0};
	import_committed = imp_on_commit;
	is_int(csv_run(&a, 1, csv, out, sizeof out, err, sizeof err), 0,
	       "import: three orders");
	is_str(out, "{\"imported\":3,\"refused\":0}\n", "... all imported");
	ok(imp_seen.calls >= 1, "... by the direct path (%d commits)", imp_seen.calls);
	/* the same orders as events, as SQLite renders the import's numbers */
	static const char evs[] =
		"[{\"type\":\"order\",\"order_id\":\"d3\",\"email\":\"ann@example.com\","
		"\"ts\":1705300000,\"currency\":\"EUR\",\"total\":0.0,\"items\":[{\"sku\":"
		"\"K3\",\"name\":\"Pot\",\"price\":0.0,\"qty\":3}]},"
		"{\"type\":\"order\",\"order_id\":\"d1\",\"email\":\"ann@example.com\","
		"\"ts\":1705312800,\"currency\":\"USD\",\"consent\":true,\"total\":23.0,"
		"\"items\":[{\"sku\":\"K1\",\"name\":\"Kettle, steel\",\"price\":9.5,"
		"\"qty\":2},{\"sku\":\"K2\",\"name\":\"Cup\",\"price\":4.0,\"qty\":1}]},"
		"{\"type\":\"order\",\"order_id\":\"d2\",\"email\":\"bob@example.com\","
		"\"ts\":1705400000,\"currency\":\"EUR\",\"consent\":false,\"total\":12.25,"
		"\"items\":[{\"sku\":\"K1\",\"name\":\"Kettle \\\"Duo\\\"\",\"price\":12.25,"
		"\"qty\":1}]}]";
	struct ev_error e;
	char *ra = imp_rows(&a), *rb = NULL;
	/* one event at a time, as the import ingests them */
	const char *p = evs + 1;
	for (int i = 0; i < 3; i++) {
		const char *q = strstr(p, "]},{");
		size_t n = q ? (size_t)(q - p) + 2 : strlen(p) - 1;
		char one[1024];
		snprintf(one, sizeof one, "%.*s", (int)n, p);
		ok(ev_ingest(&b.app, EV_CLI, one, strlen(one), NULL, T0, &e) == 1,
		   "events: order %d of 3 recorded (%s)", i + 1, e.msg);
		p = q ? q + 3 : p + n;
	}
	rb = imp_rows(&b);
	ok(ra && rb && !strcmp(ra, rb), "the import's rows are the events' rows");
	if (ra && rb && strcmp(ra, rb))
		diag("import: %s\nevents: %s", ra, rb);
	free(rb);

	is_int(csv_run(&a, 1, csv, out, sizeof out, err, sizeof err), 0,
	       "re-import: exit 0");
	is_str(out, "{\"imported\":3,\"refused\":0}\n", "... the same counts");
	rb = imp_rows(&a);
	ok(ra && rb && !strcmp(ra, rb), "... and not a row changed");
	free(ra), free(rb);

	/* refusals the direct path must leave to ev_ingest */
	a.cfg.max_items = 2;
	a.cfg.import_max_items = 2; /* imports have their own cap (issue 14) */
	is_int(csv_run(&a, 1, "order_id,email,date,sku,name,price,qty\n"
		       "f1,fut@example.com,1795086400,K1,Kettle,1,1\n"
		       "m1,many@example.com,1705300000,K1,Kettle,1,1\n"
		       "m1,many@example.com,1705300000,K2,Cup,1,1\n"
		       "m1,many@example.com,1705300000,K3,Pot,1,1\n"
		       "t1,big@example.com,1705300000,K1,Kettle,9000000,200\n"
		       "g1,,1705300000,K1,Kettle,1,1\n"
		       "ok1,fine@example.com,1705300000,K1,Kettle,1,1\n",
		       out, sizeof out, err, sizeof err), 1, "doubtful orders: exit 1");
	is_str(out, "{\"imported\":2,\"refused\":3}\n",
	       "... two in (one a guest's), three refused");
	ok(strstr(err, "CSV line 2: date: must be between 0 and") &&
	   strstr(err, "(order f1)"),
	   "... a date in the future, by ev_ingest, named by the CSV's column "
	   "and line (%s)", err);
	ok(strstr(err, "CSV line 3: the order's lines: at most 2 items (order m1)") != NULL,
	   "... more items than max_items");
	ok(strstr(err, "CSV line 6: the order's total (price x qty): must be "
		  "between") != NULL, "... a total past 1e9");
	ok(strstr(err, "order g1") == NULL,
	   "... no email: a guest's order, imported (issue 14)");
	a.cfg.max_items = 100;
	a.cfg.import_max_items = 1000;

	/* 1200 orders: several transactions; a hook between two of them */
	struct buf big = {0};
	buf_adds(&big, "order_id,email,date,sku,name,price,qty\n");
	for (int i = 0; i < 1200; i++)
		buf_addf(&big, "B%d,c%d@example.com,%d,S%d,Item,2.5,1\n"
			 "B%d,c%d@example.com,%d,T%d,Other,1,2\n", i, i % 97,
			 1705300000 + i, i % 13, i, i % 97, 1705300000 + i, i % 7);
	struct app other;
	char oerr[256] = "";
	if (ok(app_open(&other, &a.cfg, oerr, sizeof oerr) == 0,
	       "a second connection, as a hook's (%s)", oerr)) {
		imp_seen = (struct imp_seen){0};
		imp_seen.other = &other;
		is_int(csv_run(&a, 1, big.data ? big.data : "", out, sizeof out, err, sizeof err), 0,
		       "big import: exit 0");
		is_str(out, "{\"imported\":1200,\"refused\":0}\n", "... 1200 orders");
		ok(imp_seen.calls >= 3, "... in %d transactions (at most 500 orders each)",
		   imp_seen.calls);
		is_int(imp_seen.hook_rc, 1, "a hook posted after the first one was "
		       "recorded at once, the database free");
		ok(imp_seen.orders_then > 0 && imp_seen.orders_then < 1200,
		   "... while the import was under way (%ld of 1200 orders in)",
		   imp_seen.orders_then);
		is_int(sq(&a, "SELECT count(*) FROM carts WHERE cart_key = 'during-import'"),
		       1, "the hook's cart is there");
		is_int(sq(&a, "SELECT count(*) FROM orders WHERE order_key LIKE 'B%%'"), 1200,
		       "... and every order of the import");
		is_int(sq(&a, "SELECT count(*) FROM order_lines WHERE order_id IN "
			  "(SELECT id FROM orders WHERE order_key LIKE 'B%%')"), 2400,
		       "... with its lines");
		app_close(&other);
	}
	import_committed = NULL;
	buf_free(&big);
	world_close(&b);
	world_close(&a);
}

/* Review: an order line without a name (a catalog of brands and
 * categories) is accepted by /events when the name is left out; the CSV
 * import must accept the same line with its name column empty, by the
 * direct path and by ev_ingest alike, and record the same order. */
static void test_review_import(void)
{
	struct world w;
	char out[256], err[2048];
	if (!ok(world_open(&w, "rv-import") == 0, "review import: world opens"))
		return;
	struct ev_error e;
	const char *ev = "{\"type\":\"order\",\"order_id\":\"ev1\","
		"\"email\":\"ann@example.com\",\"ts\":1705300000,\"items\":"
		"[{\"sku\":\"N1\",\"price\":5}]}";
	ok(ev_ingest(&w.app, EV_CLI, ev, strlen(ev), NULL, T0, &e) >= 0,
	   "review import: /events takes an order line without a name");
	static const char csv[] =
		"order_id,email,date,sku,name,price,qty\n"
		"n1,ann@example.com,1705300000,N1,,5,1\n"          /* direct path */
		"n2,bob@example.com,1705300000,N1,,5,1\n"
		"n2,bob@example.com,1705300000,N2,Cup,abc,1\n";   /* in doubt: ev_ingest */
	csv_run(&w, 1, csv, out, sizeof out, err, sizeof err);
	ok(contains(out, "\"imported\":1,"),
	   "review import: a nameless line is imported as /events takes it (%s%s)",
	   out, err);
	ok(contains(err, "order n2") && contains(err, "price") && !contains(err, "name"),
	   "review import: an order in doubt is refused for its price, not for the "
	   "missing name (%s)", err);
	is_int(sq(&w, "SELECT count(*) FROM order_lines WHERE sku = 'N1'"), 2,
	       "review import: the nameless lines are recorded");
	world_close(&w);
}

/* ==== Segments ======================================================== */

static void test_threshold(void)
{
	struct world w;
	char why[200], id[32], email[64];
	if (!ok(world_open(&w, "threshold") == 0, "threshold: world opens"))
		return;
	long d = flow_lapse_days(&w.app, why, sizeof why);
	is_int(d, 90, "lapse threshold: 90 days by default");
	set_cfg(&w.cfg.winback_after, "auto");
	d = flow_lapse_days(&w.app, why, sizeof why);
	ok(d == 90 && contains(why, "only 0 repeat"), "auto with no repeat buyers: 90 (%s)", why);
	/* 25 customers reorder after 120 days, 5 after 150: p90 = 150 */
	for (int i = 0; i < 30; i++) {
		snprintf(email, sizeof email, "t%d@example.com", i);
		snprintf(id, sizeof id, "t%da", i);
		order_line(&w, id, email, "A", 20, T0 - 400 * DAY, T0);
		snprintf(id, sizeof id, "t%db", i);
		order_line(&w, id, email, "A", 20, T0 - 400 * DAY + (i < 25 ? 120 : 150) * DAY, T0);
	}
	d = flow_lapse_days(&w.app, why, sizeof why);
	ok(d == 150 && contains(why, "30 repeat purchases"),
	   "auto: the 90th percentile of the gaps, 150 days (%s)", why);
	/* a store whose customers come back within 30 days: raised to 60 */
	for (int i = 0; i < 300; i++) {
		snprintf(email, sizeof email, "f%d@example.com", i);
		snprintf(id, sizeof id, "f%da", i);
		order_line(&w, id, email, "A", 20, T0 - 100 * DAY, T0);
		snprintf(id, sizeof id, "f%db", i);
		order_line(&w, id, email, "A", 20, T0 - 70 * DAY, T0);
	}
	d = flow_lapse_days(&w.app, why, sizeof why);
	ok(d == 60 && contains(why, "raised to the minimum of 60"),
	   "auto: clamped to 60 days (%s)", why);
	world_close(&w);
}

static void test_segments(void)
{
	struct world w;
	char id[32], email[64];
	if (!ok(world_open(&w, "segments") == 0, "segments: world opens"))
		return;
	/* ten customers: i orders of 10*i each, the last i days ago * 10 */
	for (int i = 1; i <= 10; i++) {
		snprintf(email, sizeof email, "s%02d@example.com", i);
		for (int k = 0; k < i; k++) {
			snprintf(id, sizeof id, "s%d-%d", i, k);
			order_line(&w, id, email, "A", 10.0 * i, T0 - (11 - i) * 5 * DAY - k * DAY, T0);
		}
	}
	order_line(&w, "new1", "new@example.com", "A", 5, T0 - 2 * DAY, T0);
	order_line(&w, "old1", "gone@example.com", "A", 5, T0 - 400 * DAY, T0);
	order_line(&w, "old2", "gone@example.com", "A", 5, T0 - 300 * DAY, T0);
	order_line(&w, "lap1", "lapsed@example.com", "A", 5, T0 - 100 * DAY, T0);
	ok(flow_segments(&w.app, T0) == 0, "segments computed");
	is_int(sq(&w, "SELECT count(*) FROM segments"), 13, "every customer with an order has a row");
	is_int(sq(&w, "SELECT f FROM segments s JOIN contacts c ON c.id = s.contact_id "
		  "WHERE c.email = 's10@example.com'"), 5, "the most frequent buyer: F = 5");
	is_int(sq(&w, "SELECT r FROM segments s JOIN contacts c ON c.id = s.contact_id "
		  "WHERE c.email = 'gone@example.com'"), 1, "the longest gone: R = 1");
	char *seg = sq_text(&w, "SELECT segment FROM segments s JOIN contacts c ON "
			    "c.id = s.contact_id WHERE c.email = 's10@example.com'");
	is_str(seg, "vip", "10 orders, the most money: vip");
	free(seg);
	seg = sq_text(&w, "SELECT segment FROM segments s JOIN contacts c ON "
		      "c.id = s.contact_id WHERE c.email = 'new@example.com'");
	is_str(seg, "new", "one order 2 days ago: new");
	free(seg);
	seg = sq_text(&w, "SELECT segment FROM segments s JOIN contacts c ON "
		      "c.id = s.contact_id WHERE c.email = 'lapsed@example.com'");
	is_str(seg, "lapsed", "100 days without an order: lapsed");
	free(seg);
	seg = sq_text(&w, "SELECT segment FROM segments s JOIN contacts c ON "
		      "c.id = s.contact_id WHERE c.email = 'gone@example.com'");
	is_str(seg, "lost", "300 days: lost");
	free(seg);

	/* a VIP who lapses gets early access instead of the discount */
	struct tick_summary t;
	tick(&w, T0 + 40 * DAY, &t);   /* s10's last order was T0-5d-9d */
	tick(&w, T0 + 120 * DAY, &t);
	tick(&w, T0 + 127 * DAY, &t);
	is_int(sq(&w, "SELECT count(*) FROM messages m JOIN contacts c ON c.id = m.contact_id "
		  "WHERE c.email = 's10@example.com' AND m.step = 3 AND m.status = 'sent'"), 1,
	       "a lapsed VIP gets the early-access step");
	is_int(sq(&w, "SELECT count(*) FROM messages m JOIN contacts c ON c.id = m.contact_id "
		  "WHERE c.email = 's10@example.com' AND m.step = 2 AND m.status = 'sent'"), 0,
	       "... and not the discount");
	world_close(&w);
}

/* enum segment and segment_names[] against the SQL that writes the
 * names: every name SEGMENTS_FILL writes is in the array, each of the
 * array's names is written for some customer, and the report counts by
 * the array's order. */
static void test_segment_names(void)
{
	struct world w;
	char id[32], email[64];
	if (!ok(world_open(&w, "segnames") == 0, "segment names: world opens"))
		return;
	for (int i = 1; i <= 10; i++) { /* as test_segments: new to vip */
		snprintf(email, sizeof email, "s%02d@example.com", i);
		for (int k = 0; k < i; k++) {
			snprintf(id, sizeof id, "s%d-%d", i, k);
			order_line(&w, id, email, "A", 10.0 * i, T0 - (11 - i) * 5 * DAY - k * DAY, T0);
		}
	}
	order_line(&w, "new1", "new@example.com", "A", 5, T0 - 2 * DAY, T0);
	order_line(&w, "old1", "gone@example.com", "A", 5, T0 - 400 * DAY, T0);
	order_line(&w, "old2", "gone@example.com", "A", 5, T0 - 300 * DAY, T0);
	order_line(&w, "lap1", "lapsed@example.com", "A", 5, T0 - 100 * DAY, T0);
	ok(flow_segments(&w.app, T0) == 0, "segment names: segments computed");
	long long all = sq(&w, "SELECT count(*) FROM segments"), known = 0;
	for (int i = 0; i < SEG__MAX; i++) {
		long long n = sq(&w, "SELECT count(*) FROM segments WHERE segment = '%s'",
				 segment_names[i]);
		ok(n > 0, "the SQL writes segment_names[%d] '%s' (%lld customers)", i,
		   segment_names[i], n);
		known += n;
	}
	is_int(known, all, "every segment the SQL writes is one of segment_names[]");
	struct report *r = calloc(1, sizeof *r);
	if (r && report_build(&w.app, T0 - DAY, T0, r) == 0) {
		for (int i = 0; i < SEG__MAX; i++) {
			char name[64];
			snprintf(name, sizeof name, "report: segments[%d] counts '%s'", i,
				 segment_names[i]);
			is_int(r->segments[i], sq(&w, "SELECT count(*) FROM segments "
						    "WHERE segment = '%s'", segment_names[i]),
			       name);
		}
	} else {
		ok(0, "report_build over the segments world");
	}
	free(r);
	world_close(&w);
}

/* ==== Recommendations ================================================= */

static void test_recommendations(void)
{
	struct world w;
	char out[5][65];
	if (!ok(world_open(&w, "reco") == 0, "reco: world opens"))
		return;
	const char *skus[] = {"A", "B", "C", "D", "E", "F"};
	const char *cats[] = {"lamps", "lamps", "vases", "lamps", "rugs", "rugs"};
	for (int i = 0; i < 6; i++)
		product(&w, skus[i], cats[i], T0);
	struct ev_error err;
	/* x owns A; others bought A+B twice, A+C once; D sells best in lamps
	 * among what x lacks after B; E sells best overall */
	order_line(&w, "x1", "x@example.com", "A", 10, T0 - DAY, T0);
	ingest(&w, EV_CLI, "{\"type\":\"order\",\"order_id\":\"p1\",\"email\":\"p@example.com\","
	       "\"total\":20,\"items\":[{\"sku\":\"A\",\"name\":\"A\",\"price\":10},"
	       "{\"sku\":\"B\",\"name\":\"B\",\"price\":10}]}", T0, &err);
	ingest(&w, EV_CLI, "{\"type\":\"order\",\"order_id\":\"p2\",\"email\":\"q@example.com\","
	       "\"total\":20,\"items\":[{\"sku\":\"A\",\"name\":\"A\",\"price\":10},"
	       "{\"sku\":\"B\",\"name\":\"B\",\"price\":10}]}", T0, &err);
	ingest(&w, EV_CLI, "{\"type\":\"order\",\"order_id\":\"p3\",\"email\":\"r@example.com\","
	       "\"total\":20,\"items\":[{\"sku\":\"A\",\"name\":\"A\",\"price\":10},"
	       "{\"sku\":\"C\",\"name\":\"C\",\"price\":10}]}", T0, &err);
	for (int i = 0; i < 3; i++) {
		char id[16];
		snprintf(id, sizeof id, "d%d", i);
		order_line(&w, id, "s@example.com", "D", 10, T0, T0);
	}
	for (int i = 0; i < 5; i++) {
		char id[16];
		snprintf(id, sizeof id, "e%d", i);
		order_line(&w, id, "t@example.com", "E", 10, T0, T0);
	}
	long long x = sq(&w, "SELECT id FROM contacts WHERE email = 'x@example.com'");
	int n = reco_for(&w.app, x, out, 5);
	is_int(n, 5, "five recommendations for x");
	/* C, bought with A in one order only, is no evidence (minimum
	 * support 2): it comes last, as one of the store's sellers */
	ok(n >= 4 && !strcmp(out[0], "B") && !strcmp(out[1], "D") && !strcmp(out[2], "E") &&
		   !strcmp(out[3], "C"),
	   "order: bought together (B twice; C once is no evidence), then the "
	   "favourite category's best seller (D), then the store's (E, C)");
	int owns = 0;
	for (int i = 0; i < n; i++)
		owns |= !strcmp(out[i], "A");
	ok(!owns, "never what x already owns");
	world_close(&w);
}

/* An order of several lines (SKUS: comma-separated, each also its name). */
static int order_items(struct world *w, const char *id, const char *email,
		       const char *skus, rm_time ts)
{
	struct buf b = {0};
	struct ev_error err;
	char one[64];
	int n = 0;
	buf_addf(&b, "{\"type\":\"order\",\"order_id\":\"%s\",\"email\":\"%s\","
		 "\"consent\":true,\"ts\":%lld,\"items\":[", id, email, (long long)ts);
	for (const char *p = skus; *p;) {
		size_t l = strcspn(p, ",");
		snprintf(one, sizeof one, "%.*s", (int)l, p);
		buf_addf(&b, "%s{\"sku\":\"%s\",\"name\":\"%s\",\"price\":10}",
			 n++ ? "," : "", one, !strcmp(one, "POST") ? "POSTAGE" : one);
		p += l + (p[l] == ',');
	}
	buf_adds(&b, "]}");
	int rc = ingest(w, EV_CLI, b.data, ts, &err);
	if (rc < 0)
		diag("order %s: %s", id, err.msg);
	buf_free(&b);
	return rc;
}

/* The item-to-item table as text: items, pairs, state. */
static char *reco_table(struct world *w)
{
	return sq_text(w, "SELECT (SELECT group_concat(x, ' ') FROM (SELECT sku || ':' "
		       "|| orders AS x FROM reco_items ORDER BY sku)) || ' | ' || "
		       "(SELECT group_concat(x, ' ') FROM (SELECT sku || '>' || other || "
		       "':' || orders AS x FROM reco_pairs ORDER BY sku, other)) || ' | ' || "
		       "(SELECT last_order || '/' || orders FROM reco_state)");
}

/* Issue 14: "bought together" beats "bought by everyone"; services
 * (postage) are never recommended nor counted; the item-to-item table
 * brought forward in chunks equals a full rebuild. */
static void test_reco_ranking(void)
{
	struct world w;
	char out[16][65];
	if (!ok(world_open(&w, "reco-lift") == 0, "reco lift: world opens"))
		return;
	ok(rm_service("POST", NULL) && rm_service("x1", "Postage UK") &&
		   rm_service("AMAZONFEE", "") && rm_service("x2", "Bank charges") &&
		   !rm_service("MUG-1", "Coffee mug") && !rm_service("x3", NULL),
	   "reco: postage, fees and charges look like services; a coffee mug does not");
	const char *skus[] = {"A", "B", "P", "Q"};
	for (int i = 0; i < 4; i++)
		product(&w, skus[i], "home", T0 - DAY);
	/* P is in every order (bought by everyone), B with A twice; every
	 * order pays POST; Q once with A (one order: no evidence) */
	order_items(&w, "o1", "p1@example.com", "A,P,B,POST", T0 - 9 * DAY);
	order_items(&w, "o2", "p2@example.com", "A,P,B,POST", T0 - 8 * DAY);
	order_items(&w, "o3", "p3@example.com", "A,P,Q,POST", T0 - 7 * DAY);
	for (int i = 4; i <= 10; i++) {
		char id[8], em[32];
		snprintf(id, sizeof id, "o%d", i);
		snprintf(em, sizeof em, "p%d@example.com", i);
		order_items(&w, id, em, "P,POST", T0 - 6 * DAY);
	}
	order_items(&w, "ox", "x@example.com", "A,POST", T0 - 5 * DAY);
	order_items(&w, "oq", "q@example.com", "Q", T0 - 5 * DAY);
	char *kind = sq_text(&w, "SELECT kind FROM products WHERE sku = 'POST'");
	ok(kind && !strcmp(kind, "service"),
	   "reco: an order's POSTAGE line enters the catalog as a service (%s)",
	   kind ? kind : "none");
	free(kind);
	ok(reco_refresh(&w.app, 3, 0) > 0, "reco: the table is brought forward in chunks");
	long long x = sq(&w, "SELECT id FROM contacts WHERE email = 'x@example.com'");
	int n = reco_for(&w.app, x, out, 16);
	ok(n >= 1 && !strcmp(out[0], "B"),
	   "reco: B (with A in 2 of A's 4 orders, in 2 of 12) beats P (in 10 of 12) "
	   "for x who bought A (first: %s)", n > 0 ? out[0] : "none");
	int post = 0, own = 0;
	for (int i = 0; i < n; i++)
		post |= !strcmp(out[i], "POST"), own |= !strcmp(out[i], "A");
	ok(!post && !own, "reco: never the postage line, never what x owns (%d products)", n);
	is_int(sq(&w, "SELECT count(*) FROM reco_pairs WHERE sku = 'POST' OR other = 'POST'") +
		       sq(&w, "SELECT count(*) FROM reco_items WHERE sku = 'POST'"), 0,
	       "reco: the postage line is not counted as a product");
	long long thin = sq(&w, "SELECT id FROM contacts WHERE email = 'q@example.com'");
	n = reco_for(&w.app, thin, out, 2);
	ok(n == 2 && !strcmp(out[0], "P") && !strcmp(out[1], "A"),
	   "reco: thin evidence (Q was bought with others once only): the "
	   "category's best sellers (P, A) (%s, %s)", n > 0 ? out[0] : "-",
	   n > 1 ? out[1] : "-");

	/* incremental equals a full rebuild, through new orders, a kind the
	 * operator fixes both ways, and a product event that makes one a
	 * service */
	order_items(&w, "o11", "p11@example.com", "A,B,Q", T0 - 4 * DAY);
	reco_refresh(&w.app, 2, 0);
	ok(reco_set_kind(&w.app, "POST", "product") == 0, "reco: POST made a product");
	order_items(&w, "o12", "p12@example.com", "Q,POST,B", T0 - 3 * DAY);
	reco_refresh(&w.app, 1, 0);
	ok(sq(&w, "SELECT orders FROM reco_pairs WHERE sku = 'POST' AND other = 'A'") == 4,
	   "reco: ... and counted over the orders already counted");
	ingest(&w, EV_CLI, "{\"type\":\"product\",\"sku\":\"Q\",\"name\":\"Q\","
	       "\"kind\":\"service\"}", T0, &(struct ev_error){0});
	ok(reco_set_kind(&w.app, "NOPE", "service") < 0 &&
		   reco_set_kind(&w.app, "A", "gift") < 0,
	   "reco: an unknown SKU or kind is refused");
	char *inc = reco_table(&w);
	db_scalar(w.app.db, "DELETE FROM reco_items");
	db_scalar(w.app.db, "DELETE FROM reco_pairs");
	db_scalar(w.app.db, "UPDATE reco_state SET last_order = 0, orders = 0");
	reco_refresh(&w.app, 100000, 0);
	char *full = reco_table(&w);
	ok(inc && full && !strcmp(inc, full), "reco: the incremental table equals a full rebuild");
	if (!inc || !full || strcmp(inc, full))
		diag("incremental: %s\nfull:        %s", inc ? inc : "-", full ? full : "-");
	free(inc), free(full);
	is_int(reco_refresh(&w.app, 1000, 0), 0, "reco: nothing new: nothing written");
	ok(mc_template_uses(&w.app, "winback_recommend", "recommendations") &&
		   mc_template_uses(&w.app, "cross_sell", "recommendations") &&
		   !mc_template_uses(&w.app, "order_thanks", "recommendations") &&
		   !mc_template_uses(&w.app, "winback_last_chance", "recommendations") &&
		   !mc_template_uses(&w.app, "review_request", "recommendations"),
	   "reco: computed only for a template that shows them");
	world_close(&w);
}

/* Issue 14: the report of a flow without a cart (win-back) counts its
 * enrolled, held out and conversions, and the win-back headline has its
 * held-out baseline. */
static void test_winback_report(void)
{
	struct world w;
	struct tick_summary s;
	struct report *r = calloc(1, sizeof *r);
	struct buf j = {0}, h = {0};
	if (!ok(r && world_open(&w, "wb-report") == 0, "win-back report: world opens")) {
		free(r);
		return;
	}
	db_scalar(w.app.db, "UPDATE flows SET holdout_pct = 50 WHERE name = 'winback'");
	product(&w, "A", "home", T0 - 200 * DAY);
	for (int i = 0; i < 40; i++) {
		char id[16], em[32];
		snprintf(id, sizeof id, "w%d", i);
		snprintf(em, sizeof em, "w%d@example.com", i);
		order_line(&w, id, em, "A", 40, T0 - 100 * DAY, T0 - 100 * DAY);
	}
	tick(&w, T0, &s);
	long long held = sq(&w, "SELECT count(*) FROM enrollments WHERE holdout = 1");
	long long msgd = sq(&w, "SELECT count(*) FROM enrollments WHERE holdout = 0");
	ok(held > 0 && msgd > 0 && held + msgd == 40, "win-back report: %lld held out, "
	   "%lld messaged", held, msgd);
	/* 3 held out and 5 messaged order again 5 days later */
	db_scalar(w.app.db, "CREATE TABLE back AS SELECT c.email, e.holdout FROM "
		  "enrollments e JOIN contacts c ON c.id = e.contact_id WHERE e.holdout = 1 "
		  "ORDER BY c.id LIMIT 3");
	db_scalar(w.app.db, "INSERT INTO back SELECT c.email, e.holdout FROM enrollments e "
		  "JOIN contacts c ON c.id = e.contact_id WHERE e.holdout = 0 ORDER BY c.id LIMIT 5");
	for (int i = 0; i < 8; i++) {
		char sql[96], id[16];
		snprintf(sql, sizeof sql, "SELECT email FROM back LIMIT 1 OFFSET %d", i);
		char *em = sq_text(&w, sql);
		snprintf(id, sizeof id, "back%d", i);
		if (em)
			order_line(&w, id, em, "A", 40, T0 + 5 * DAY, T0 + 5 * DAY);
		free(em);
	}
	tick(&w, T0 + 6 * DAY, &s);
	report_build(&w.app, T0 - DAY, T0 + 40 * DAY, r);
	struct flow_report *f = NULL;
	for (int i = 0; i < r->nflows; i++)
		if (!strcmp(r->flows[i].name, "winback"))
			f = &r->flows[i];
	ok(f && f->enrolled == msgd && f->held_out == held,
	   "win-back report: the flow's enrolled (%ld) and held out (%ld)",
	   f ? f->enrolled : -1, f ? f->held_out : -1);
	ok(f && f->converted == 5 && f->held_converted == 3,
	   "win-back report: converted 5 messaged, 3 held out (%ld, %ld)",
	   f ? f->converted : -1, f ? f->held_converted : -1);
	ok(f && f->nsteps >= 1 && f->steps[0].position == 1 && f->steps[0].converted == 5,
	   "win-back report: step 1 converted 5 (%ld)",
	   f && f->nsteps ? f->steps[0].converted : -1);
	ok(r->contacted == msgd && r->reactivated == 5 && r->held_contacted == held &&
		   r->held_reactivated == 3,
	   "win-back report: reactivated 5 of %ld contacted, 3 of %ld held out "
	   "(%ld of %ld, %ld of %ld)", (long)msgd, (long)held, r->reactivated,
	   r->contacted, r->held_reactivated, r->held_contacted);
	double want = 5.0 / (double)msgd - 3.0 / (double)held;
	ok(fabs(r->reactivation_lift.diff - want) < 1e-9 &&
		   r->reactivation_lift.lo < want && r->reactivation_lift.hi > want,
	   "win-back report: caused by remarket = the difference, with its interval");
	report_json(r, &j);
	char k1[160], k2[160];
	snprintf(k1, sizeof k1, "\"held_out\":%lld,\"held_out_reactivated_30d\":3,"
		 "\"held_out_rate\":%.4f,\"caused_by_remarket\":%.4f,\"caused_ci95\":[",
		 held, 3.0 / (double)held, want);
	snprintf(k2, sizeof k2, "{\"name\":\"winback\",\"holdout_pct\":50,"
		 "\"enrolled\":%lld,\"holdout\":%lld,\"converted\":5,"
		 "\"holdout_converted\":3,", msgd, held);
	ok(contains(j.data, k1) && contains(j.data, k2),
	   "win-back report: the JSON has the held-out baseline and the flow's counts");
	if (!contains(j.data, k1) || !contains(j.data, k2))
		diag("%s\nwant %s\nand %s", j.data ? j.data : "", k1, k2);
	report_html(r, "Shop", &h);
	ok(contains(h.data, "data-k=\"winback.caused_by_remarket\"") &&
		   contains(h.data, "data-k=\"recovery_lift\""),
	   "win-back report: the page shows what remarket caused");
	buf_free(&j), buf_free(&h);
	free(r);
	world_close(&w);
}

/* Review: the win-back report counts a customer in the period of their
 * first win-back mail, as its held-out baseline counts a held-out one in
 * the period their first mail would have gone: a later step's mail (the
 * offer a week on) in the period does not make them "contacted" there. */
static void test_review_winback_period(void)
{
	struct world w;
	struct tick_summary s;
	struct report *r = calloc(1, sizeof *r);
	if (!ok(r && world_open(&w, "rv-wb-period") == 0, "review win-back period: world opens")) {
		free(r);
		return;
	}
	db_scalar(w.app.db, "UPDATE flows SET holdout_pct = 50 WHERE name = 'winback'");
	product(&w, "A", "home", T0 - 200 * DAY);
	for (int i = 0; i < 20; i++) {
		char id[16], em[32];
		snprintf(id, sizeof id, "v%d", i);
		snprintf(em, sizeof em, "v%d@example.com", i);
		order_line(&w, id, em, "A", 40, T0 - 100 * DAY, T0 - 100 * DAY);
	}
	tick(&w, T0, &s);
	tick(&w, T0 + 8 * DAY, &s);
	ok(sq(&w, "SELECT count(*) FROM messages WHERE status = 'sent' AND step = 2") > 0,
	   "review win-back period: the offer (step 2) went a week after the first mail");
	report_build(&w.app, T0 + 2 * DAY, T0 + 40 * DAY, r);
	ok(r->contacted == 0 && r->held_contacted == 0,
	   "review win-back period: nobody's first win-back mail (nor its baseline) "
	   "fell in a period that began after it (contacted %ld, held out %ld)",
	   r->contacted, r->held_contacted);
	report_build(&w.app, T0 - DAY, T0 + 40 * DAY, r);
	ok(r->contacted > 0 && r->held_contacted > 0 &&
	   r->contacted + r->held_contacted == 20,
	   "review win-back period: the period of the first mails counts all 20 "
	   "(%ld contacted, %ld held out)", r->contacted, r->held_contacted);
	free(r);
	world_close(&w);
}

/* ==== Mail: rendering and RFC 5322 building =========================== */

static void test_mail(void)
{
	char err[256];
	struct buf out = {0};
	struct mail m = {
		.from = "Maison Demo <shop@example.com>",
		.to = "ann@example.com",
		.subject = "You left something in your cart",
		.message_id = "<rm.1.abc@example.com>",
		.list_unsub = "<https://shop.example.com/rm/u/TOKEN>",
		.text = "Hi Ann,\n\nYour cart is waiting.\n",
		.html = "<p>Hi Ann,</p>\n",
		.date = T0,
	};

	/* CR or LF in a header -> -1, nothing written */
	static const char *inj[] = {"Hi\r\nBcc: eve@evil.example", "Hi\nBcc: eve@evil.example", "Hi\r"};
	for (size_t i = 0; i < 3; i++) {
		struct mail x = m;
		x.subject = inj[i];
		out.len = 0;
		err[0] = '\0';
		ok(mail_build(&x, &out, err, sizeof err) == -1 && out.len == 0 && *err,
		   "mail_build refuses subject '%s' and writes nothing", vis(inj[i]));
	}
	struct mail x = m;
	x.to = "ann@example.com\nBcc: eve@evil.example";
	ok(mail_build(&x, &out, err, sizeof err) == -1 && out.len == 0, "LF in To -> refused");
	x = m;
	x.to = "ann@example.com\r\nBcc: eve@evil.example";
	ok(mail_build(&x, &out, err, sizeof err) == -1 && out.len == 0, "CRLF in To -> refused");
	x = m;
	x.from = "Shop <shop@example.com>\r\nBcc: eve@evil.example";
	ok(mail_build(&x, &out, err, sizeof err) == -1 && out.len == 0, "CRLF in From -> refused");
	x = m;
	x.from = "Shop\n <shop@example.com>";
	ok(mail_build(&x, &out, err, sizeof err) == -1 && out.len == 0, "LF in From -> refused");
	x = m;
	x.list_unsub = "<https://x.example/u>\r\nBcc: eve@evil.example";
	ok(mail_build(&x, &out, err, sizeof err) == -1 && out.len == 0, "CRLF in List-Unsubscribe -> refused");
	x = m;
	x.message_id = "<a@b>\nBcc: eve@evil.example";
	ok(mail_build(&x, &out, err, sizeof err) == -1 && out.len == 0, "LF in Message-ID -> refused");
	x = m;
	x.subject = NULL;
	ok(mail_build(&x, &out, err, sizeof err) == -1 && out.len == 0, "a missing Subject -> refused");

	/* a normal mail */
	ok(mail_build(&m, &out, err, sizeof err) == 0, "mail_build of a normal mail succeeds");
	const char *msg = out.data ? out.data : "";
	char date[64];
	struct tm tm;
	time_t t = (time_t)T0;
	gmtime_r(&t, &tm);
	strftime(date, sizeof date, "%a, %d %b %Y %H:%M:%S +0000", &tm);
	is_str(header_of(msg, "From"), "Maison Demo <shop@example.com>", "From header");
	is_str(header_of(msg, "To"), "ann@example.com", "To header");
	is_str(header_of(msg, "Subject"), "You left something in your cart", "Subject header");
	is_str(header_of(msg, "Date"), date, "Date header is the given date in RFC 5322 form");
	is_str(header_of(msg, "Message-ID"), "<rm.1.abc@example.com>", "Message-ID header");
	is_str(header_of(msg, "MIME-Version"), "1.0", "MIME-Version header");
	is_str(header_of(msg, "List-Unsubscribe"), "<https://shop.example.com/rm/u/TOKEN>",
	       "List-Unsubscribe header");
	is_str(header_of(msg, "List-Unsubscribe-Post"), "List-Unsubscribe=One-Click",
	       "List-Unsubscribe-Post: List-Unsubscribe=One-Click");
	ok(!strncmp(header_of(msg, "Content-Type"), "multipart/alternative; boundary=", 32),
	   "Content-Type is multipart/alternative with a boundary");
	ok(contains(msg, "\r\nContent-Type: text/plain; charset=UTF-8\r\n"), "a text/plain UTF-8 part");
	ok(contains(msg, "\r\nContent-Type: text/html; charset=UTF-8\r\n"), "a text/html UTF-8 part");
	is_int(count_of(msg, "\r\nContent-Transfer-Encoding: quoted-printable\r\n"), 2,
	       "both parts are quoted-printable");
	ok(out.len > 4 && !strcmp(msg + out.len - 4, "--\r\n"), "the message ends with the closing boundary");
	ok(all_crlf(msg, out.len), "every line of the message ends in CRLF");
	struct buf part = {0};
	ok(mime_part(msg, "text/plain", &part) == 0 && !strcmp(part.data, m.text),
	   "the text part decodes back to the text");
	part.len = 0;
	ok(mime_part(msg, "text/html", &part) == 0 && !strcmp(part.data, m.html),
	   "the HTML part decodes back to the HTML");

	/* long lines, non-ASCII, '=' and trailing spaces in the body */
	struct buf text = {0};
	for (int i = 0; text.len < 500; i++)
		buf_addf(&text, "Caf\xC3\xA9 %d = cr\xC3\xA8me br\xC3\xBBl\xC3\xA9" "e; ", i);
	buf_adds(&text, "end with spaces  \nnext line\n");
	x = m;
	x.text = text.data;
	x.html = text.data;
	out.len = 0;
	ok(mail_build(&x, &out, err, sizeof err) == 0, "mail_build with a 500-char line succeeds");
	msg = out.data;
	const char *body = strstr(msg, "\r\n\r\n");
	size_t longest = body ? longest_line(body) : 999;
	ok(longest <= 78, "no body line is longer than 78 chars (longest %zu)", longest);
	ok(all_crlf(msg, out.len), "lines of the long mail end in CRLF");
	part.len = 0;
	ok(mime_part(msg, "text/plain", &part) == 0 && !strcmp(part.data, text.data),
	   "the long text part decodes back exactly (soft breaks, =3D, =20, UTF-8)");
	part.len = 0;
	ok(mime_part(msg, "text/html", &part) == 0 && !strcmp(part.data, text.data),
	   "the long HTML part decodes back exactly");
	buf_free(&text);

	/* non-ASCII subject and From name: RFC 2047 */
	const char *subj = "Votre panier vous attend \xE2\x80\x94 10 % de r\xC3\xA9" "duction";
	x = m;
	x.subject = subj;
	out.len = 0;
	ok(mail_build(&x, &out, err, sizeof err) == 0, "mail_build with a UTF-8 subject succeeds");
	ok(contains(out.data, "\r\nSubject: =?UTF-8?B?"), "a non-ASCII subject is RFC 2047 encoded");
	part.len = 0;
	ok(rfc2047_decode(header_of(out.data, "Subject"), &part) == 0 && !strcmp(part.data, subj),
	   "the encoded subject decodes back to the original");
	struct buf longsubj = {0};
	for (int i = 0; i < 6; i++)
		buf_adds(&longsubj, "\xC3\x89t\xC3\xA9 \xE2\x80\x94 d\xC3\xA9j\xC3\xA0 vu \xE2\x82\xAC ");
	x.subject = longsubj.data;
	out.len = 0;
	ok(mail_build(&x, &out, err, sizeof err) == 0, "mail_build with a long UTF-8 subject succeeds");
	part.len = 0;
	ok(rfc2047_decode(header_of(out.data, "Subject"), &part) == 0 &&
		   !strcmp(part.data, longsubj.data),
	   "a long encoded subject, folded, decodes back without a split character");
	const char *hdrs_end = strstr(out.data, "\r\n\r\n");
	char *hdrs = strndup(out.data, hdrs_end ? (size_t)(hdrs_end - out.data) : 0);
	longest = longest_line(hdrs);
	ok(longest <= 76, "header lines with encoded words are at most 76 chars "
	   "(RFC 2047 section 2; longest %zu)", longest);
	if (longest > 76)
		diag("  headers:\n%s", hdrs);
	free(hdrs);
	buf_free(&longsubj);
	x = m;
	x.subject = "Price =?in?= euros";
	out.len = 0;
	ok(mail_build(&x, &out, err, sizeof err) == 0 && contains(out.data, "Subject: =?UTF-8?B?"),
	   "an ASCII subject containing =? is encoded too");
	x = m;
	x.from = "Maison D\xC3\xA9" "co <shop@example.com>";
	out.len = 0;
	ok(mail_build(&x, &out, err, sizeof err) == 0 &&
		   contains(out.data, "\r\n") && !strncmp(out.data, "From: =?UTF-8?B?", 16) &&
		   contains(header_of(out.data, "From"), "?= <shop@example.com>"),
	   "a non-ASCII From name is encoded, the address kept plain");
	x = m;
	x.from = "shop@example.com";
	out.len = 0;
	ok(mail_build(&x, &out, err, sizeof err) == 0 &&
		   !strcmp(header_of(out.data, "From"), "shop@example.com"),
	   "a bare From address is kept as it is");
	buf_free(&part);
	buf_free(&out);
}

/* ==== Web push: VAPID and RFC 8291 encryption ========================= */

static size_t b64u_dec(const char *s, unsigned char *out, size_t max)
{
	size_t n = 0;
	if (sodium_base642bin(out, max, s, strlen(s), NULL, &n, NULL,
			      sodium_base64_VARIANT_URLSAFE_NO_PADDING) < 0)
		return 0;
	return n;
}

/* RFC 8291 Appendix A, byte for byte, with its server key pair and salt. */
static void test_push_rfc8291(void)
{
	unsigned char ua[65], auth[16], as_priv[32], as_pub[65], salt[16];
	const char *msg = "When I grow up, I want to be a watermelon";
	const char *want = "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQT"
		"Btkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95"
		"bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN";
	ok(b64u_dec("BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4"
		    "bjyPjs7Vd8pZGH6SRpkNtoIAiw4", ua, sizeof ua) == 65 &&
	   b64u_dec("BTBZMqHH6r4Tts7J_aSIgg", auth, sizeof auth) == 16 &&
	   b64u_dec("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw", as_priv,
		    sizeof as_priv) == 32 &&
	   b64u_dec("BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmY"
		    "WAmS6TlzAC8wEqKK6PBru3jl7A8", as_pub, sizeof as_pub) == 65 &&
	   b64u_dec("DGv6ra1nlYgDCS1FRnbzlw", salt, sizeof salt) == 16,
	   "push: RFC 8291 example keys decode");
	struct buf out = {0};
	char got[512] = "";
	int rc = push_encrypt_with(ua, auth, as_priv, as_pub, salt, msg,
				   strlen(msg), &out);
	if (rc == 0)
		sodium_bin2base64(got, sizeof got, (unsigned char *)out.data, out.len,
				  sodium_base64_VARIANT_URLSAFE_NO_PADDING);
	is_str(got, want, "push: RFC 8291 Appendix A body reproduced exactly");
	/* a random key pair and salt: the same shape, another body */
	buf_reset(&out);
	ok(push_encrypt(ua, auth, msg, strlen(msg), &out) == 0 &&
	   out.len == 86 + strlen(msg) + 1 + 16 &&
	   !memcmp(out.data + 16, "\0\0\x10\0\x41\x04", 6) &&
	   memcmp(out.data, salt, 16) != 0,
	   "push: a new key pair and salt per message (header rs 4096, keyid 65)");
	/* a point off the curve, a message too long: refused */
	unsigned char bad[65];
	memcpy(bad, ua, sizeof bad);
	bad[64] ^= 1;
	buf_reset(&out);
	ok(push_encrypt(bad, auth, msg, strlen(msg), &out) < 0 && out.len == 0,
	   "push: a browser key off the curve is refused");
	char *big = calloc(1, PUSH_MAX_PAYLOAD + 1);
	ok(big && push_encrypt(ua, auth, big, PUSH_MAX_PAYLOAD, &out) == 0 &&
	   out.len == 4096, "push: the largest message fills 4096 bytes");
	buf_reset(&out);
	ok(big && push_encrypt(ua, auth, big, PUSH_MAX_PAYLOAD + 1, &out) < 0,
	   "push: a message over PUSH_MAX_PAYLOAD is refused");
	free(big);
	buf_free(&out);
}

/* The JWT's ES256 signature (raw r || s) checked with the key's public
 * half, the way a push service does. */
static int jwt_verifies(const char *jwt, const char *pub_b64)
{
	unsigned char pub[65], sig[64];
	const char *dot = strrchr(jwt, '.');
	if (!dot || b64u_dec(pub_b64, pub, sizeof pub) != 65 ||
	    b64u_dec(dot + 1, sig, sizeof sig) != 64)
		return 0;
	/* the public key as SubjectPublicKeyInfo: the fixed P-256 prefix */
	static const unsigned char spki[] = {
		0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d,
		0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01,
		0x07, 0x03, 0x42, 0x00};
	unsigned char der[sizeof spki + 65], *sd = NULL;
	memcpy(der, spki, sizeof spki);
	memcpy(der + sizeof spki, pub, 65);
	const unsigned char *p = der;
	EVP_PKEY *k = d2i_PUBKEY(NULL, &p, sizeof der);
	ECDSA_SIG *s = ECDSA_SIG_new();
	EVP_MD_CTX *md = EVP_MD_CTX_new();
	int good = 0;
	if (k && s && md && ECDSA_SIG_set0(s, BN_bin2bn(sig, 32, NULL),
					   BN_bin2bn(sig + 32, 32, NULL))) {
		int n = i2d_ECDSA_SIG(s, &sd);
		good = n > 0 && EVP_DigestVerifyInit(md, NULL, EVP_sha256(), NULL, k) > 0 &&
		       EVP_DigestVerify(md, sd, (size_t)n, (const unsigned char *)jwt,
					(size_t)(dot - jwt)) == 1;
	}
	OPENSSL_free(sd);
	EVP_MD_CTX_free(md);
	ECDSA_SIG_free(s);
	EVP_PKEY_free(k);
	return good;
}

static void test_push_vapid(void)
{
	char path[PATH_MAX], pub[100] = "", pub2[100] = "", err[512] = "";
	struct stat st;
	snprintf(path, sizeof path, "%s/push/vapid.pem", tmpdir);
	ok(vapid_keygen(path, pub, sizeof pub, err, sizeof err) == 0 &&
	   stat(path, &st) == 0 && (st.st_mode & 0777) == 0600,
	   "vapid: keygen writes the key, mode 0600 (%s)", err);
	unsigned char raw[65];
	ok(b64u_dec(pub, raw, sizeof raw) == 65 && raw[0] == 4,
	   "vapid: the public key is an uncompressed point, base64url (%s)", pub);
	ok(vapid_keygen(path, pub2, sizeof pub2, err, sizeof err) < 0 &&
	   strstr(err, "exists"), "vapid: keygen never replaces a key (%s)", err);
	ok(vapid_public(path, pub2, sizeof pub2, err, sizeof err) == 0 &&
	   !strcmp(pub, pub2), "vapid: the file gives the same public key");
	struct buf jwt = {0};
	*err = '\0';
	ok(vapid_jwt(path, "https://push.example.net", T0 + 12 * HOUR,
		     "mailto:shop@example.com", &jwt, err, sizeof err) == 0,
	   "vapid: a JWT is signed (%s)", err);
	const char *jt = jwt.data ? jwt.data : "";
	char claims[256] = "";
	const char *d1 = strchr(jt, '.'), *d2 = d1 ? strchr(d1 + 1, '.') : NULL;
	size_t n = 0;
	if (d2)
		sodium_base642bin((unsigned char *)claims, sizeof claims - 1, d1 + 1,
				  (size_t)(d2 - d1 - 1), NULL, &n, NULL,
				  sodium_base64_VARIANT_URLSAFE_NO_PADDING);
	claims[n] = '\0';
	is_str(claims, "{\"aud\":\"https://push.example.net\",\"exp\":1795043200,"
	       "\"sub\":\"mailto:shop@example.com\"}", "vapid: the JWT's claims");
	ok(jwt_verifies(jt, pub), "vapid: the ES256 signature verifies with the "
	   "public key");
	ok(jwt.len > 20 && (jwt.data[20] ^= 1, !jwt_verifies(jwt.data, pub)),
	   "vapid: a changed JWT does not verify");
	buf_reset(&jwt);
	ok(vapid_jwt(path, "https://x\"y", T0, "mailto:a@b.c", &jwt, err,
		     sizeof err) < 0, "vapid: a quote in a claim is refused");
	snprintf(path, sizeof path, "%s/push/none.pem", tmpdir);
	ok(vapid_public(path, pub2, sizeof pub2, err, sizeof err) < 0 &&
	   strstr(err, "keygen --vapid"), "vapid: a missing key names the fix (%s)",
	   err);
	buf_free(&jwt);
}

/* ==== The flow engine: detect, claim, send, record ==================== */

static void test_flow(void)
{
	struct world w;
	struct tick_summary s;
	if (!ok(world_open(&w, "flow") == 0, "flow: world opens"))
		return;
	is_int(cart_event(&w, "ann@example.com", "Ann Smith", "a1", 1, T0), 1, "ann's cart at T0 (consent)");
	is_int(cart_event(&w, "bob@example.com", "Bob", "b1", 0, T0), 1, "bob's cart at T0 (no consent)");

	/* step 1 at +1 h (idle_minutes 60, delay 3600) */
	is_int(w.cfg.idle_minutes, 60, "idle_minutes defaults to 60");
	ok(tick(&w, T0 + 59 * MIN, &s) == 0 && sum_is(&s, 0, 0, 0), "tick at T0+59min: nothing");
	is_int(outbox_count(&w), 0, "... outbox empty");
	is_int(sq(&w, "SELECT count(*) FROM messages"), 0, "... no message rows");
	if (!ok(tick(&w, T0 + HOUR, &s) == 0 && sum_is(&s, 1, 1, 1),
		"tick at T0+60min: abandoned 1, enrolled 1, sent 1"))
		show_sum("T0+1h", &s);
	is_int(outbox_count(&w), 1, "... one mail in the outbox");
	is_int(sq(&w, "SELECT count(*) FROM messages WHERE status='sent' AND step=1 AND sent_at=%lld",
		  (long long)(T0 + HOUR)), 1, "... message row: step 1 sent at now");
	is_int(sq(&w, "SELECT count(*) FROM enrollments WHERE status='active' AND next_step=2 AND anchor=%lld",
		  (long long)T0), 1, "... enrollment active, next step 2, anchored at the cart's last activity");

	/* the mail itself */
	long long m1 = sq(&w, "SELECT id FROM messages WHERE step=1");
	struct buf mail = {0}, dec = {0};
	ok(outbox_read(&w, m1, &mail) == 0, "the outbox file is named after message %lld", m1);
	const char *msg = mail.data ? mail.data : "";
	is_str(header_of(msg, "To"), "Ann Smith <ann@example.com>", "step 1 mail: To, with the contact's name");
	is_str(header_of(msg, "Subject"), "Ann, you left something in your cart", "step 1 mail: Subject from the template");
	is_str(header_of(msg, "Date"), "Wed, 18 Nov 2026 12:06:40 +0000", "step 1 mail: Date is the injected now");
	char *mid = sq_text(&w, "SELECT message_id FROM messages WHERE step=1");
	is_str(header_of(msg, "Message-ID"), mid ? mid : "(none)", "step 1 mail: Message-ID as recorded");
	free(mid);
	const char *lu = header_of(msg, "List-Unsubscribe");
	char prefix[] = "<" BASE_URL "/u/", tok[TOK_MAXLEN + 1] = "";
	int64_t subj = -1;
	if (!strncmp(lu, prefix, strlen(prefix)))
		snprintf(tok, sizeof tok, "%.*s", (int)strcspn(lu + strlen(prefix), ">"), lu + strlen(prefix));
	ok(*tok && tok_verify(w.app.key, tok, TOK_UNSUB, T0 + HOUR, &subj) == TOK_OK && subj == m1,
	   "step 1 mail: List-Unsubscribe holds an unsubscribe token for this message");
	mime_part(msg, "text/plain", &dec);
	ok(contains(dec.data, "Linen lamp") && contains(dec.data, "Wool rug") &&
		   contains(dec.data, "\xE2\x82\xAC" "219.00") && contains(dec.data, BASE_URL "/r/"),
	   "step 1 mail: the text lists the items, the total and a recovery link");
	buf_free(&mail);
	buf_free(&dec);

	/* no double send, step 2 at +24 h, step 3 at +72 h with a code */
	ok(tick(&w, T0 + HOUR, &s) == 0 && sum_is(&s, 0, 0, 0), "the same tick again: nothing");
	ok(tick(&w, T0 + HOUR + 60, &s) == 0 && sum_is(&s, 0, 0, 0), "a minute later: nothing");
	is_int(outbox_count(&w), 1, "... still one mail");
	ok(tick(&w, T0 + DAY - 1, &s) == 0 && s.sent == 0, "tick at T0+24h-1s: step 2 not yet");
	if (!ok(tick(&w, T0 + DAY, &s) == 0 && sum_is(&s, 0, 0, 1), "tick at T0+24h: step 2 sent"))
		show_sum("T0+24h", &s);
	is_int(outbox_count(&w), 2, "... two mails");
	is_int(sq(&w, "SELECT count(*) FROM discounts"), 0, "... no discount code yet");
	ok(tick(&w, T0 + DAY, &s) == 0 && s.sent == 0, "the T0+24h tick again: nothing");
	if (!ok(tick(&w, T0 + 3 * DAY, &s) == 0 && sum_is(&s, 0, 0, 1), "tick at T0+72h: step 3 sent"))
		show_sum("T0+72h", &s);
	is_int(outbox_count(&w), 3, "... three mails");
	is_int(sq(&w, "SELECT count(*) FROM discounts"), 1, "... one discount code issued");
	long long m3 = sq(&w, "SELECT id FROM messages WHERE step=3");
	is_int(sq(&w, "SELECT count(*) FROM discounts d JOIN messages m ON m.discount_code = d.code "
		  "WHERE m.id=%lld AND d.message=m.id AND d.percent=10 AND d.expires=%lld", m3,
		  (long long)(T0 + 3 * DAY + 2 * DAY)), 1,
	       "... the code is 10 percent off, tied to message 3, valid 48 h");
	char *code = sq_text(&w, "SELECT code FROM discounts");
	ok(code && !strncmp(code, "RM-", 3) && strlen(code) == 12, "... the code looks like RM-XXXX-XXXX (%s)",
	   code ? code : "none");
	outbox_read(&w, m3, &mail);
	mime_part(mail.data ? mail.data : "", "text/plain", &dec);
	ok(code && contains(dec.data, code), "... the step 3 mail carries the code");
	ok(contains(header_of(mail.data ? mail.data : "", "Subject"), "10% off"),
	   "... with the discount in the subject");
	free(code);
	buf_free(&mail);
	buf_free(&dec);
	is_int(sq(&w, "SELECT count(*) FROM enrollments WHERE status='done'"), 1, "the enrollment is done");
	ok(tick(&w, T0 + 30 * DAY, &s) == 0 && sum_is(&s, 0, 0, 0), "tick at T0+30d: nothing more");
	is_int(sq(&w, "SELECT count(*) FROM messages"), 3, "three messages in all");

	/* the code at the checkout: /discounts/validate, then redeemed by an order */
	code = sq_text(&w, "SELECT code FROM discounts");
	if (code) {
		char body[200], lower[40], order[300];
		struct http_resp rs;
		struct ev_error err;
		rm_time expires = T0 + 5 * DAY;
		snprintf(lower, sizeof lower, "%s", code);
		for (char *p = lower; *p; p++)
			*p = (char)tolower((unsigned char)*p);
		snprintf(body, sizeof body, "{\"code\":\"%s\",\"total\":100}", code);
		http(&w, "POST", "/discounts/validate", body, NULL, NULL, T0 + 3 * DAY + HOUR, &rs);
		ok(rs.status == 200 && contains(rs.body.data, "\"valid\":true") &&
			   contains(rs.body.data, "\"percent\":10"),
		   "/discounts/validate: the fresh code is valid, 10 percent (%s)", rs.body.data);
		http_resp_free(&rs);
		snprintf(body, sizeof body, "{\"code\":\"%s\",\"total\":100}", lower);
		http(&w, "POST", "/discounts/validate", body, NULL, NULL, T0 + 3 * DAY + HOUR, &rs);
		ok(rs.status == 200 && contains(rs.body.data, "\"valid\":true"),
		   "/discounts/validate: the code typed in lower case is valid too");
		http_resp_free(&rs);
		http(&w, "POST", "/discounts/validate", "{\"code\":\"RM-2222-2222\",\"total\":100}", NULL,
		     NULL, T0 + 3 * DAY + HOUR, &rs);
		ok(rs.status == 200 && contains(rs.body.data, "\"valid\":false") &&
			   contains(rs.body.data, "unknown"), "/discounts/validate: an unknown code is not valid");
		http_resp_free(&rs);
		snprintf(body, sizeof body, "{\"code\":\"%s\",\"total\":100}", code);
		http(&w, "POST", "/discounts/validate", body, NULL, NULL, expires + 1, &rs);
		ok(contains(rs.body.data, "\"valid\":false") && contains(rs.body.data, "expired"),
		   "/discounts/validate: after 48 h the code has expired");
		http_resp_free(&rs);
		/* the checkout accepted the code as typed and reports the order with it */
		snprintf(order, sizeof order, "{\"type\":\"order\",\"order_id\":\"o-ann\",\"cart_id\":\"a1\","
			 "\"email\":\"ann@example.com\",\"total\":197.1,\"discount_code\":\"%s\"}", lower);
		is_int(ingest(&w, EV_HOOK, order, T0 + 3 * DAY + 2 * HOUR, &err), 1,
		       "an order using the code (typed in lower case) accepted");
		is_int(sq(&w, "SELECT count(*) FROM discounts WHERE redeemed_at IS NOT NULL AND order_key='o-ann'"), 1,
		       "... the code is marked redeemed by that order");
		http(&w, "POST", "/discounts/validate", body, NULL, NULL, T0 + 3 * DAY + 3 * HOUR, &rs);
		ok(contains(rs.body.data, "\"valid\":false") && contains(rs.body.data, "already_used"),
		   "/discounts/validate: a redeemed code is already_used (%s)", rs.body.data);
		http_resp_free(&rs);
		free(code);
	}

	/* no consent -> never enrolled */
	is_int(sq(&w, "SELECT count(*) FROM enrollments e JOIN contacts c ON c.id=e.contact_id "
		  "WHERE c.email='bob@example.com'"), 0, "bob (no consent) was never enrolled");
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE cart_key='b1' AND status='open'"), 1,
	       "bob's cart is still open");

	/* tick_json */
	struct buf j = {0};
	s = (struct tick_summary){.abandoned = 1, .enrolled = 2, .sent = 3, .retry = 4,
				  .failed = 5, .exited = 6, .skipped = 7, .held_out = 8};
	problem_add(&s.problems, "templates/x.html:%d: '{{#a}}' is never closed", 3);
	problem_add(&s.problems, "templates/x.html:%d: '{{#a}}' is never closed", 3);
	ok(tick_json(&w.app, &s, T0, &j) == 0 &&
		   !strcmp(j.data, "{\"now\":1795000000,\"abandoned\":1,\"enrolled\":2,"
			   "\"held_out\":8,\"sent\":3,"
			   "\"retry\":4,\"failed\":5,\"exited\":6,\"skipped\":7,\"stale\":0,"
			   "\"winback_waiting\":0,\"deferred\":0,\"deferred_skipped\":0,"
			   "\"problems\":[\"templates/x.html:3: '{{#a}}' "
			   "is never closed\"]}"),
	   "tick_json reports every counter, the held-out and each problem once");
	buf_free(&j);
	world_close(&w);
}

static void test_flow_exits(void)
{
	struct world w;
	struct ev_error err;
	struct tick_summary s;
	struct http_resp rs;
	char tok[TOK_MAXLEN + 1], path[128];

	/* exit on order */
	if (ok(exit_world(&w, "exit-order") == 0, "exit-order: step 1 sent")) {
		is_int(ingest(&w, EV_HOOK, "{\"type\":\"order\",\"order_id\":\"o-1\",\"cart_id\":\"a1\","
			      "\"email\":\"ann@example.com\"}", T0 + 2 * HOUR, &err), 1,
		       "exit-order: order between step 1 and 2");
		no_more_mail(&w, "order");
		world_close(&w);
	}

	/* exit on unsubscribe, through http_handle */
	if (ok(exit_world(&w, "exit-unsub") == 0, "exit-unsub: step 1 sent")) {
		long long m1 = sq(&w, "SELECT id FROM messages WHERE step=1");
		tok_sign(w.app.key, TOK_UNSUB, m1, T0 + 400 * DAY, tok, sizeof tok);
		snprintf(path, sizeof path, "/u/%s", tok);
		http(&w, "GET", path, NULL, NULL, NULL, T0 + 2 * HOUR, &rs);
		ok(rs.status == 200 && contains(rs.body.data, "<form") && contains(rs.body.data, "method=\"post\""),
		   "exit-unsub: GET /u/<token> answers 200 with a form");
		is_int(sq(&w, "SELECT count(*) FROM contacts WHERE unsubscribed_at IS NOT NULL"), 0,
		       "... and unsubscribes nobody (link scanners)");
		http_resp_free(&rs);
		http(&w, "POST", path, NULL, NULL, NULL, T0 + 2 * HOUR, &rs);
		is_int(rs.status, 200, "exit-unsub: POST /u/<token> answers 200");
		ok(contains(rs.content_type, "text/html"), "... with an HTML page");
		http_resp_free(&rs);
		is_int(sq(&w, "SELECT count(*) FROM contacts WHERE unsubscribed_at=%lld",
			  (long long)(T0 + 2 * HOUR)), 1, "... the contact is unsubscribed at now");
		is_int(sq(&w, "SELECT count(*) FROM interactions WHERE kind='unsubscribe' AND message=%lld", m1), 1,
		       "... the unsubscribe is recorded against the message");
		http(&w, "POST", path, NULL, NULL, NULL, T0 + 3 * HOUR, &rs);
		is_int(rs.status, 200, "exit-unsub: a second POST is harmless (200)");
		http_resp_free(&rs);
		no_more_mail(&w, "unsubscribe");
		cart_event(&w, "ann@example.com", "Ann", "a2", 1, T0 + 4 * DAY);
		ok(tick(&w, T0 + 5 * DAY, &s) == 0 && s.abandoned == 0 && s.sent == 0,
		   "exit-unsub: a new cart of the unsubscribed contact is never abandoned");
		world_close(&w);
	}

	/* exit on an emptied cart */
	if (ok(exit_world(&w, "exit-empty") == 0, "exit-empty: step 1 sent")) {
		is_int(ingest(&w, EV_HOOK, "{\"type\":\"cart\",\"cart_id\":\"a1\",\"items\":[]}",
			      T0 + 2 * HOUR, &err), 1, "exit-empty: cart emptied");
		is_int(sq(&w, "SELECT count(*) FROM carts WHERE status='empty'"), 1, "... the cart is empty");
		no_more_mail(&w, "empty");
		world_close(&w);
	}

	/* an exit that happens after the message was queued: skipped at send time */
	if (ok(exit_world(&w, "exit-late") == 0, "exit-late: step 1 sent")) {
		memset(&s, 0, sizeof s);
		ok(flow_detect(&w.app, T0 + DAY, &s) == 0, "exit-late: detect at T0+24h queues step 2");
		is_int(sq(&w, "SELECT count(*) FROM messages WHERE step=2 AND status='queued'"), 1,
		       "... step 2 queued");
		ingest(&w, EV_HOOK, "{\"type\":\"order\",\"order_id\":\"o-7\",\"email\":\"ann@example.com\"}",
		       T0 + DAY, &err);
		ok(tick(&w, T0 + DAY, &s) == 0 && s.sent == 0 && s.skipped == 1,
		   "exit-late: the order came in between: step 2 skipped, not sent");
		is_int(sq(&w, "SELECT count(*) FROM messages WHERE step=2 AND status='skipped'"), 1,
		       "... the message row says skipped");
		is_int(outbox_count(&w), 1, "... only step 1 in the outbox");
		world_close(&w);
	}

	/* the shopper comes back: wait until the cart is idle again */
	if (ok(exit_world(&w, "back") == 0, "back: step 1 sent")) {
		cart_event(&w, "ann@example.com", "Ann", "a1", 1, T0 + DAY - 10 * MIN);
		is_int(sq(&w, "SELECT count(*) FROM carts WHERE status='open'"), 1, "back: the cart is open again");
		ok(tick(&w, T0 + DAY, &s) == 0 && s.sent == 0,
		   "back: step 2 is due but the cart was active 10 min ago: not sent");
		ok(tick(&w, T0 + DAY - 10 * MIN + HOUR, &s) == 0 && s.sent == 1,
		   "back: idle for an hour again: step 2 sent");
		is_int(sq(&w, "SELECT count(*) FROM messages WHERE status='sent'"), 2, "... two mails in all");
		world_close(&w);
	}

	/* a step already queued waits while the shopper is active */
	if (ok(exit_world(&w, "active") == 0, "active: step 1 sent")) {
		memset(&s, 0, sizeof s);
		flow_detect(&w.app, T0 + DAY, &s);
		is_int(sq(&w, "SELECT count(*) FROM messages WHERE step=2 AND status='queued'"), 1,
		       "active: step 2 queued at T0+24h");
		cart_event(&w, "ann@example.com", "Ann", "a1", 1, T0 + DAY);
		ok(tick(&w, T0 + DAY, &s) == 0 && s.sent == 0 && s.skipped == 0 && s.exited == 0,
		   "active: the shopper is back in the same minute: not sent, not skipped");
		is_int(sq(&w, "SELECT count(*) FROM messages WHERE step=2 AND status='queued' AND next_try=%lld",
			  (long long)(T0 + DAY + HOUR)), 1, "... queued again for when the cart is idle");
		is_int(sq(&w, "SELECT count(*) FROM enrollments WHERE status='active'"), 1, "... still enrolled");
		ok(tick(&w, T0 + DAY + HOUR, &s) == 0 && s.sent == 1, "active: idle an hour later: step 2 sent");
		is_int(outbox_count(&w), 2, "... two mails");
		world_close(&w);
	}

	/* a transport failure is retried, then sent once */
	if (ok(exit_world(&w, "retry") == 0, "retry: step 1 sent")) {
		char blocked[PATH_MAX + 16], *good = w.cfg.outbox;
		snprintf(blocked, sizeof blocked, "%s/retry-file", tmpdir);
		write_file(blocked, "x", 1);
		strcat(blocked, "/outbox"); /* under a regular file: cannot be made */
		w.cfg.outbox = blocked;
		ok(tick(&w, T0 + DAY, &s) == 0 && s.sent == 0 && s.retry == 1,
		   "retry: the outbox cannot be written: retry 1, sent 0");
		is_int(sq(&w, "SELECT count(*) FROM messages WHERE step=2 AND status='queued' AND attempts=1 "
			  "AND next_try > %lld", (long long)(T0 + DAY)), 1, "... queued again for later");
		w.cfg.outbox = good;
		ok(tick(&w, T0 + DAY + 60, &s) == 0 && s.sent == 0, "retry: not before next_try");
		long long next = sq(&w, "SELECT next_try FROM messages WHERE step=2");
		ok(tick(&w, (rm_time)next, &s) == 0 && s.sent == 1, "retry: at next_try it is sent");
		is_int(outbox_count(&w), 2, "... exactly two mails");
		world_close(&w);
	}
}

static void test_leases(void)
{
	struct world w;
	struct tick_summary s = {0};
	int64_t ids[64];
	enum { N = 200 };
	if (!ok(world_open(&w, "lease") == 0, "lease: world opens"))
		return;
	for (int i = 0; i < 3; i++) {
		char email[64], cart[16];
		snprintf(email, sizeof email, "c%d@example.com", i);
		snprintf(cart, sizeof cart, "k%d", i);
		cart_event(&w, email, "C", cart, 1, T0);
	}
	rm_time now = T0 + HOUR;
	long lease = w.cfg.lease_seconds;
	is_int(lease, 300, "lease_seconds defaults to 300");
	ok(flow_detect(&w.app, now, &s) == 0 && s.abandoned == 3 && s.enrolled == 3,
	   "flow_detect: 3 carts abandoned and enrolled");
	is_int(sq(&w, "SELECT count(*) FROM messages WHERE status='queued'"), 3, "... 3 messages queued");
	int n = flow_claim(&w.app, now, ids, 10);
	is_int(n, 3, "flow_claim returns the 3 due messages");
	long long idsum = 0;
	for (int i = 0; i < n; i++)
		idsum += ids[i];
	is_int(idsum, sq(&w, "SELECT sum(id) FROM messages"), "... their ids");
	is_int(sq(&w, "SELECT count(*) FROM messages WHERE status='sending' AND lease_until=%lld AND attempts=0",
		  (long long)(now + lease)), 3, "... leased until now + lease_seconds (no attempt counted by a claim)");
	is_int(flow_claim(&w.app, now, ids, 10), 0, "a second claim at the same now: 0 (leased)");
	is_int(flow_claim(&w.app, now + lease - 1, ids, 10), 0, "at now + lease - 1: still leased");
	is_int(flow_claim(&w.app, now + lease + 1, ids, 10), 3,
	       "at now + lease + 1: the expired leases are claimed again (crashed tick)");
	is_int(sq(&w, "SELECT count(*) FROM messages WHERE attempts=0 AND crashes=0"), 3,
	       "... no attempt counted: only the message actually sent counts one");
	is_int(flow_claim(&w.app, now + lease + 1, ids, 1), 0, "and not a third time");
	world_close(&w);

	/* two connections claiming: never the same id */
	struct world r;
	struct app app2;
	char err[512];
	if (!ok(world_open(&r, "race") == 0, "race: world opens"))
		return;
	for (int i = 0; i < N; i++) {
		char email[64], cart[16];
		snprintf(email, sizeof email, "r%d@example.com", i);
		snprintf(cart, sizeof cart, "r%d", i);
		cart_event(&r, email, "R", cart, 1, T0);
	}
	memset(&s, 0, sizeof s);
	flow_detect(&r.app, now, &s);
	is_int(sq(&r, "SELECT count(*) FROM messages"), N, "race: 200 messages queued");
	if (!ok(app_open(&app2, &r.cfg, err, sizeof err) == 0, "a second app on the same config opens")) {
		diag("  %s", err);
		world_close(&r);
		return;
	}
	int seen[N + 1] = {0}, dup = 0, total = 0, other = 0;
	for (int turn = 0, done = 0; done < 2 && turn < 1000; turn++) {
		struct app *a = turn % 2 ? &app2 : &r.app;
		int k = flow_claim(a, now, ids, 3);
		done = k == 0 ? done + 1 : 0;
		for (int i = 0; i < k; i++) {
			if (ids[i] < 1 || ids[i] > N)
				other++;
			else
				dup += seen[ids[i]]++ > 0;
			total++;
		}
	}
	ok(total == N && dup == 0 && other == 0,
	   "interleaved claims from two apps: every message once (%d claims, %d twice)", total, dup);
	/* all leases expired: both threads race for all N, one at a time */
	pthread_barrier_t start;
	pthread_barrier_init(&start, NULL, 2);
	struct claimer c1 = {&r.app, now + 10 * lease, &start, {0}, 0, 0};
	struct claimer c2 = {&app2, now + 10 * lease, &start, {0}, 0, 0};
	pthread_t t1, t2;
	int started = pthread_create(&t1, NULL, claim_loop, &c1) == 0;
	if (started)
		started += pthread_create(&t2, NULL, claim_loop, &c2) == 0;
	if (ok(started == 2, "two claiming threads started")) {
		pthread_join(t1, NULL);
		pthread_join(t2, NULL);
	} else if (started == 1) {
		pthread_barrier_wait(&start);
		pthread_join(t1, NULL);
	}
	pthread_barrier_destroy(&start);
	memset(seen, 0, sizeof seen);
	dup = other = 0;
	for (int t = 0; t < 2; t++) {
		const struct claimer *c = t ? &c2 : &c1;
		for (int i = 0; i < c->n; i++) {
			int64_t id = c->got[i] >= 1 && c->got[i] <= N ? c->got[i] : 0;
			dup += seen[id]++ > 0 && id;
		}
	}
	ok(!c1.err && !c2.err, "concurrent flow_claim never fails (busy_timeout)");
	ok(c1.n + c2.n == N && dup == 0 && seen[0] == 0,
	   "concurrent claims in two threads: %d + %d of %d, none twice", c1.n, c2.n, N);
	app_close(&app2);
	world_close(&r);
}

static void test_holdout(void)
{
	struct world w;
	struct tick_summary s;
	char email[64], key[96];
	if (!ok(world_open(&w, "holdout") == 0, "holdout: world opens"))
		return;
	db_scalar(w.app.db, "UPDATE flows SET holdout_pct = 10");
	int want = 0;
	for (int i = 0; i < 200; i++) {
		snprintf(email, sizeof email, "h%d@example.com", i);
		char cart[16];
		snprintf(cart, sizeof cart, "h%d", i);
		cart_event(&w, email, "H", cart, 1, T0);
		snprintf(key, sizeof key, "holdout:1:%s", email);
		want += rm_bucket(key) < 1000;
	}
	tick(&w, T0 + HOUR, &s);
	is_int(s.enrolled, 200, "holdout: 200 carts enrolled");
	is_int(sq(&w, "SELECT count(*) FROM enrollments WHERE holdout = 1"), want,
	       "holdout: exactly the contacts whose bucket is under 1000 are held out");
	is_int(s.sent, 200 - want, "holdout: the others, and only they, got step 1");
	is_int(sq(&w, "SELECT count(*) FROM messages m JOIN enrollments e ON e.id = "
		  "m.enrollment_id WHERE e.holdout = 1"), 0, "holdout: no message row for the held out");
	tick(&w, T0 + 4 * DAY, &s);
	is_int(sq(&w, "SELECT count(*) FROM messages m JOIN enrollments e ON e.id = "
		  "m.enrollment_id WHERE e.holdout = 1"), 0, "holdout: still none after 4 days");
	world_close(&w);
}

static void test_variants(void)
{
	struct world w;
	struct tick_summary s;
	char email[64], key[96], cart[16];
	if (!ok(world_open(&w, "variants") == 0, "variants: world opens"))
		return;
	/* B of step 1 waits 2 h instead of 1 h */
	db_scalar(w.app.db, "INSERT INTO step_variants (flow_id, position, delay_s, share) "
		  "VALUES (1, 1, 7200, 50)");
	int b = 0;
	for (int i = 0; i < 100; i++) {
		snprintf(email, sizeof email, "v%d@example.com", i);
		snprintf(cart, sizeof cart, "v%d", i);
		cart_event(&w, email, "V", cart, 1, T0);
		snprintf(key, sizeof key, "ab:1:1:%s", email);
		b += rm_bucket(key) < 5000;
	}
	ok(b > 30 && b < 70, "variants: about half the contacts fall in B (%d)", b);
	tick(&w, T0 + HOUR, &s);
	is_int(s.sent, 100 - b, "variants: at +1 h only A contacts get step 1");
	tick(&w, T0 + 2 * HOUR, &s);
	is_int(s.sent, b, "variants: at +2 h the B contacts get it (the variant's timing)");
	is_int(sq(&w, "SELECT count(*) FROM messages WHERE variant = 'B'"), b,
	       "variants: their messages are recorded as variant B");
	/* sticky: a second cart of a B contact later gets B again */
	int sticky = 1;
	for (int i = 0; i < 100 && sticky; i++) {
		snprintf(key, sizeof key, "ab:1:1:v%d@example.com", i);
		if (rm_bucket(key) >= 5000)
			continue;
		snprintf(email, sizeof email, "v%d@example.com", i);
		cart_event(&w, email, "V", "second", 1, T0 + DAY);
		tick(&w, T0 + DAY + 3 * HOUR, &s);
		sticky = sq(&w, "SELECT count(*) FROM messages m JOIN enrollments e ON "
			    "e.id = m.enrollment_id JOIN carts c ON c.id = e.cart_id WHERE "
			    "c.cart_key = 'second' AND m.variant = 'B'") == 1;
		break;
	}
	ok(sticky, "variants: a contact's second cart gets the same variant");
	world_close(&w);
}

static void test_winback(void)
{
	struct world w;
	struct tick_summary s;
	if (!ok(world_open(&w, "winback") == 0, "winback: world opens"))
		return;
	product(&w, "A", "lighting", T0);
	product(&w, "B", "lighting", T0);
	/* lapsed: last order 91 days ago; active: 89 days; no consent */
	order_line(&w, "o1", "lapsed@example.com", "A", 40, T0 - 91 * DAY, T0);
	order_line(&w, "o2", "recent@example.com", "A", 40, T0 - 89 * DAY, T0);
	order_line(&w, "o3", "quiet@example.com", "A", 40, T0 - 200 * DAY, T0);
	db_scalar(w.app.db, "UPDATE contacts SET consent = 0 WHERE email = 'quiet@example.com'");
	tick(&w, T0, &s);
	is_int(winback_sent(&w, "lapsed@example.com", 1), 1,
	       "a customer 91 days without an order gets win-back step 1 at once");
	is_int(winback_sent(&w, "recent@example.com", 0), 0, "89 days: not yet");
	is_int(winback_sent(&w, "quiet@example.com", 0), 0, "no consent: never");
	long long m = sq(&w, "SELECT max(id) FROM messages");
	struct buf mail = {0}, dec = {0};
	outbox_read(&w, m, &mail);
	mime_part(mail.data ? mail.data : "", "text/plain", &dec);
	ok(contains(dec.data, "Product B") && !contains(dec.data, "Product A"),
	   "step 1 recommends B (a best seller of their category), never what they own");
	buf_free(&mail), buf_free(&dec);

	/* the recent one lapses two days later, and orders before step 2 */
	tick(&w, T0 + 2 * DAY, &s);
	is_int(winback_sent(&w, "recent@example.com", 1), 1, "the other customer lapses at 90 days");
	order_line(&w, "o4", "recent@example.com", "B", 40, T0 + 3 * DAY, T0 + 3 * DAY);
	/* step 2 a week later: a loyalty code, minimum spend = average order */
	tick(&w, T0 + 7 * DAY, &s);
	is_int(winback_sent(&w, "lapsed@example.com", 2), 1, "step 2 at +7 days");
	ok(sq(&w, "SELECT count(*) FROM discounts WHERE percent = 15 AND min_spend = 40") == 1,
	   "a 15 %% code with the average order value (40) as its minimum");
	ok(w.app.median_at == 0,
	   "the store's median (a sort of every order) is not read for customers with orders");
	tick(&w, T0 + 10 * DAY, &s);
	is_int(winback_sent(&w, "recent@example.com", 2), 0, "an order ends the win-back before step 2");
	is_int(sq(&w, "SELECT count(*) FROM enrollments e JOIN contacts c ON c.id = e.contact_id "
		  "WHERE c.email = 'recent@example.com' AND e.exit_reason = 'order'"), 1,
	       "... exit reason 'order'");

	/* last chance 2 days before the code expires (7 + 14 - 2 = 19 days) */
	tick(&w, T0 + 19 * DAY, &s);
	is_int(winback_sent(&w, "lapsed@example.com", 3), 0, "the VIP-only step is skipped for a regular customer");
	is_int(sq(&w, "SELECT count(*) FROM messages m JOIN contacts c ON c.id = m.contact_id "
		  "WHERE c.email = 'lapsed@example.com' AND m.step = 4 AND m.status = 'sent'"), 1,
	       "last chance at +19 days");
	m = sq(&w, "SELECT max(id) FROM messages");
	outbox_read(&w, m, &mail);
	mime_part(mail.data ? mail.data : "", "text/plain", &dec);
	char *code = sq_text(&w, "SELECT code FROM discounts");
	ok(code && contains(dec.data, code), "the last chance repeats the step 2 code");
	free(code);
	buf_free(&mail), buf_free(&dec);

	/* once per lapse: still no order, no second win-back */
	tick(&w, T0 + 100 * DAY, &s);
	is_int(sq(&w, "SELECT count(*) FROM enrollments e JOIN contacts c ON c.id = e.contact_id "
		  "WHERE c.email = 'lapsed@example.com'"), 1, "once per lapse: no second enrollment");
	/* they order at +120 days and lapse again at +210: within the cool-down
	 * (180 days after the first) nothing, then again */
	order_line(&w, "o5", "lapsed@example.com", "B", 40, T0 + 120 * DAY, T0 + 120 * DAY);
	tick(&w, T0 + 175 * DAY, &s);
	is_int(sq(&w, "SELECT count(*) FROM enrollments e JOIN contacts c ON c.id = e.contact_id "
		  "WHERE c.email = 'lapsed@example.com'"), 1, "a lapse within the 180-day cool-down: nothing");
	tick(&w, T0 + 215 * DAY, &s);
	is_int(sq(&w, "SELECT count(*) FROM enrollments e JOIN contacts c ON c.id = e.contact_id "
		  "WHERE c.email = 'lapsed@example.com'"), 2, "after the cool-down, a new lapse: a new win-back");
	world_close(&w);
}

static void test_post_purchase(void)
{
	struct world w;
	struct tick_summary s;
	if (!ok(world_open(&w, "post") == 0, "post-purchase: world opens"))
		return;
	is_int(sq(&w, "SELECT enabled FROM flows WHERE name = 'post_purchase'"), 0,
	       "post-purchase is off by default");
	db_scalar(w.app.db, "UPDATE flows SET enabled = 1 WHERE name = 'post_purchase'");
	order_line(&w, "pp1", "buyer@example.com", "A", 25, T0, T0);
	tick(&w, T0 + 30 * MIN, &s);
	is_int(s.sent, 0, "nothing in the first hour");
	tick(&w, T0 + HOUR, &s);
	is_int(s.sent, 1, "the thank-you at +1 h");
	long long m = sq(&w, "SELECT max(id) FROM messages");
	struct buf mail = {0}, dec = {0};
	outbox_read(&w, m, &mail);
	mime_part(mail.data ? mail.data : "", "text/plain", &dec);
	ok(contains(dec.data, "pp1") && contains(dec.data, "\xE2\x82\xAC" "25.00"),
	   "it shows the order and its total");
	buf_free(&mail), buf_free(&dec);
	tick(&w, T0 + 10 * DAY, &s);
	tick(&w, T0 + 21 * DAY, &s);
	is_int(sq(&w, "SELECT count(*) FROM messages WHERE status = 'sent'"), 3,
	       "review request at +10 days, cross-sell at +21 days");
	is_int(sq(&w, "SELECT count(*) FROM discounts"), 0, "never a discount after a purchase");
	order_line(&w, "old", "history@example.com", "A", 25, T0 - 30 * DAY, T0 + 21 * DAY);
	tick(&w, T0 + 22 * DAY, &s);
	is_int(sq(&w, "SELECT count(*) FROM enrollments WHERE flow_id = 3"), 1,
	       "an imported old order starts no post-purchase flow");
	world_close(&w);
}

/* ---- issue 13: browse abandonment ---- */

static int evf(struct world *w, enum ev_source src, const char *vid, rm_time now,
	       const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* A view of SKU by EMAIL (a signed hook's), SECS on the page (-1: not said). */
static int browse_view(struct world *w, const char *email, const char *sku,
		       long secs, rm_time now)
{
	char body[256], extra[32] = "";
	struct ev_error err;
	if (secs >= 0)
		snprintf(extra, sizeof extra, ",\"seconds\":%ld", secs);
	snprintf(body, sizeof body, "{\"type\":\"view\",\"email\":\"%s\","
		 "\"consent\":true,\"sku\":\"%s\"%s}", email, sku, extra);
	int rc = ingest(w, EV_HOOK, body, now, &err);
	if (rc != 1)
		diag("view by %s: %d %s", email, err.status, err.msg);
	return rc;
}

static long long browse_enrolled(struct world *w, const char *email, const char *sku)
{
	char q[300];
	snprintf(q, sizeof q, "SELECT count(*) FROM enrollments e JOIN contacts c "
		 "ON c.id = e.contact_id JOIN flows f ON f.id = e.flow_id WHERE "
		 "f.name = 'browse_abandonment' AND c.email = '%s' AND e.sku = '%s'",
		 email, sku);
	return sq(w, q);
}

static void test_browse(void)
{
	struct world w;
	struct tick_summary s;
	if (!ok(world_open(&w, "browse") == 0, "browse: world opens"))
		return;
	product(&w, "LAMP-1", "lamps", T0);
	product(&w, "B", "lamps", T0);
	product(&w, "C", "lamps", T0);
	product(&w, "D", "rugs", T0);
	order_line(&w, "o1", "other@example.com", "B", 10, T0 - DAY, T0);
	order_line(&w, "o2", "other2@example.com", "C", 10, T0 - DAY, T0);
	/* off by default: views are kept, nobody enrolled */
	is_int(sq(&w, "SELECT enabled FROM flows WHERE name = 'browse_abandonment'"), 0,
	       "browse: the flow is off by default");
	browse_view(&w, "off@example.com", "LAMP-1", -1, T0);
	browse_view(&w, "off@example.com", "LAMP-1", -1, T0 + MIN);
	tick(&w, T0 + 3 * HOUR, &s);
	is_int(browse_enrolled(&w, "off@example.com", "LAMP-1"), 0,
	       "browse: disabled, two views enroll nobody");
	is_int(sq(&w, "SELECT count(*) FROM browse_views"), 0,
	       "browse: the views read are deleted");
	db_scalar(w.app.db, "UPDATE flows SET enabled = 1, holdout_pct = 0 "
		  "WHERE name = 'browse_abandonment'");
	rm_time t = T0 + 4 * HOUR;
	/* two views: enrolled once 120 minutes have passed since the last */
	browse_view(&w, "two@example.com", "LAMP-1", -1, t);
	browse_view(&w, "two@example.com", "LAMP-1", -1, t + 10 * MIN);
	/* one view of 75 s; one short view (not enough) */
	browse_view(&w, "long@example.com", "LAMP-1", 75, t);
	browse_view(&w, "short@example.com", "LAMP-1", 20, t);
	/* two views, then a cart */
	browse_view(&w, "cart@example.com", "LAMP-1", -1, t);
	browse_view(&w, "cart@example.com", "LAMP-1", -1, t + MIN);
	cart_event(&w, "cart@example.com", "Cara", "c-cart", 1, t + 5 * MIN);
	tick(&w, t + 10 * MIN + 119 * MIN, &s);
	is_int(browse_enrolled(&w, "two@example.com", "LAMP-1"), 0,
	       "browse: not before 120 minutes after the last view");
	is_int(browse_enrolled(&w, "long@example.com", "LAMP-1"), 1,
	       "browse: one view of 75 s, idle 120 minutes: enrolled");
	tick(&w, t + 10 * MIN + 120 * MIN, &s);
	is_int(browse_enrolled(&w, "two@example.com", "LAMP-1"), 1,
	       "browse: two views, idle 120 minutes: enrolled");
	is_int(browse_enrolled(&w, "short@example.com", "LAMP-1"), 0,
	       "browse: one view of 20 s: not enrolled");
	is_int(browse_enrolled(&w, "cart@example.com", "LAMP-1"), 0,
	       "browse: a cart added after the views: not enrolled");
	/* the mail: the product and two others, never the product again */
	long long m = sq(&w, "SELECT max(m.id) FROM messages m JOIN contacts c ON "
			 "c.id = m.contact_id WHERE c.email = 'two@example.com' "
			 "AND m.status = 'sent'");
	struct buf mail = {0}, dec = {0};
	outbox_read(&w, m, &mail);
	mime_part(mail.data ? mail.data : "", "text/plain", &dec);
	const char *txt = dec.data ? dec.data : "";
	const char *also = strstr(txt, "You might also like");
	ok(m > 0 && contains(txt, "Product LAMP-1") && also &&
	   contains(also, "Product B") && contains(also, "Product C") &&
	   !contains(also, "Product LAMP-1"),
	   "browse: the mail shows the product and two related ones");
	buf_free(&mail), buf_free(&dec);
	/* the same product again within 30 days: no; after 30 days: yes */
	t += 5 * HOUR;
	browse_view(&w, "two@example.com", "LAMP-1", 90, t);
	tick(&w, t + 3 * HOUR, &s);
	is_int(browse_enrolled(&w, "two@example.com", "LAMP-1"), 1,
	       "browse: the same product within 30 days: not again");
	t += 31 * DAY;
	browse_view(&w, "two@example.com", "LAMP-1", 90, t);
	tick(&w, t + 3 * HOUR, &s);
	is_int(browse_enrolled(&w, "two@example.com", "LAMP-1"), 2,
	       "browse: ... after 30 days, again");
	/* a cart sequence of theirs running: not enrolled */
	t += DAY;
	cart_event(&w, "seq@example.com", "Seq", "c-seq", 1, t);
	tick(&w, t + 2 * HOUR, &s);
	is_int(sq(&w, "SELECT count(*) FROM enrollments e JOIN contacts c ON "
		  "c.id = e.contact_id WHERE c.email = 'seq@example.com' "
		  "AND e.status = 'active' AND e.cart_id IS NOT NULL"), 1,
	       "browse: seq@ has a cart sequence running");
	browse_view(&w, "seq@example.com", "D", 90, t + 2 * HOUR + MIN);
	tick(&w, t + 5 * HOUR, &s);
	is_int(browse_enrolled(&w, "seq@example.com", "D"), 0,
	       "browse: a cart sequence running: not enrolled");
	/* an unknown product, an anonymous browser: nothing */
	browse_view(&w, "two@example.com", "NOPE", 90, t);
	is_int(evf(&w, EV_BROWSER, "v-anon", t, "{\"type\":\"view\",\"sku\":\"D\","
		   "\"seconds\":90}"), 1, "browse: an anonymous view is accepted");
	tick(&w, t + 8 * HOUR, &s);
	is_int(browse_enrolled(&w, "two@example.com", "NOPE"), 0,
	       "browse: a product not in the catalog: not enrolled");
	is_int(sq(&w, "SELECT count(*) FROM browse_views"), 0,
	       "browse: an anonymous view keeps no row; all read rows deleted");
	/* enrolled, held by quiet hours; a cart sequence starts meanwhile:
	 * the browse mail waits for it (deferred_by 'cart') */
	t += 2 * DAY;
	char quiet[16];
	int h = (int)((t + 3 * HOUR) % DAY / HOUR);
	snprintf(quiet, sizeof quiet, "%d-%d", h, (h + 3) % 24);
	set_cfg(&w.cfg.quiet_hours_email, quiet);
	browse_view(&w, "late@example.com", "D", 90, t);
	tick(&w, t + 3 * HOUR, &s);
	is_int(sq(&w, "SELECT count(*) FROM messages m JOIN contacts c ON c.id = "
		  "m.contact_id WHERE c.email = 'late@example.com' AND m.status = "
		  "'queued' AND m.deferred_by = 'quiet'"), 1,
	       "browse: enrolled, its mail waits for quiet hours");
	cart_event(&w, "late@example.com", "Late", "c-late", 1, t + 3 * HOUR);
	tick(&w, t + 4 * HOUR + MIN, &s);
	set_cfg(&w.cfg.quiet_hours_email, "");
	tick(&w, t + 6 * HOUR, &s); /* both due: the cart's goes */
	is_int(sq(&w, "SELECT count(*) FROM messages m JOIN enrollments e ON e.id = "
		  "m.enrollment_id JOIN contacts c ON c.id = m.contact_id WHERE "
		  "c.email = 'late@example.com' AND e.sku = 'D' AND m.status = "
		  "'queued' AND m.deferred_by = 'cart'"), 1,
	       "browse: a cart sequence started since: the browse mail waits for it");
	world_close(&w);
}

/* ---- issue 14: refunds reduce revenue and spent ---- */

static char *segments_text(struct world *w);

static void test_refunds(void)
{
	struct world w;
	struct tick_summary s;
	struct ev_error err;
	if (!ok(world_open(&w, "refunds") == 0, "refunds: world opens"))
		return;
	order_line(&w, "r1", "ann@example.com", "A", 100, T0 - 2 * DAY, T0);
	order_line(&w, "r2", "ann@example.com", "A", 50, T0 - DAY, T0);
	tick(&w, T0, &s);
	is_int(sq(&w, "SELECT round(spent) FROM segments"), 150, "refunds: spent before");
	const char *rf = "{\"type\":\"refund\",\"order_id\":\"r1\",\"amount\":30,"
			 "\"ts\":1795000100}";
	is_int(ingest(&w, EV_HOOK, rf, T0 + 200, &err), 1, "refunds: a refund event is accepted");
	is_int(ingest(&w, EV_HOOK, rf, T0 + 200, &err), 0, "refunds: the same refund again counts once");
	is_int(err.duplicates, 1, "... as a duplicate");
	is_int(sq(&w, "SELECT round(refunded) FROM orders WHERE order_key = 'r1'"), 30,
	       "refunds: the order's refunded amount");
	is_int(sq(&w, "SELECT count(*) FROM segment_dirty"), 1,
	       "refunds: the customer is marked for a recount");
	tick(&w, T0 + 300, &s);
	is_int(sq(&w, "SELECT round(spent) FROM segments"), 120,
	       "refunds: the segments' spent is the net amount after the next tick");
	char *a = segments_text(&w);
	flow_segments_full(&w.app, T0 + 300);
	char *b = segments_text(&w);
	ok(a && b && !strcmp(a, b), "refunds: incremental segments equal a recompute");
	free(a), free(b);
	/* more than is left of the order: capped at its total */
	const char *all = "{\"type\":\"refund\",\"order_id\":\"r2\",\"amount\":80,"
			  "\"refund_id\":\"ret-7\",\"ts\":1795000200}";
	is_int(ingest(&w, EV_HOOK, all, T0 + 300, &err), 1, "refunds: a whole cancellation");
	is_int(sq(&w, "SELECT round(refunded) FROM orders WHERE order_key = 'r2'"), 50,
	       "refunds: never more than the order's total");
	struct report *r = calloc(1, sizeof *r);
	if (r && report_build(&w.app, T0 - 3 * DAY, T0 + DAY, r) == 0)
		ok(r->revenue > 69.99 && r->revenue < 70.01,
		   "refunds: the report's revenue is net of refunds (150 - 30 - 50)");
	free(r);
	is_int(ingest(&w, EV_HOOK, "{\"type\":\"refund\",\"order_id\":\"nope\","
		      "\"amount\":1}", T0, &err), -1, "refunds: of an unknown order: refused");
	if (!ok(err.status == 400 && contains(err.msg, "order_id"), "... 400 naming order_id"))
		diag("%d %s", err.status, err.msg);
	is_int(ingest(&w, EV_BROWSER, rf, T0, &err), -1, "refunds: never from a browser");

	/* an import's 'C' invoice: a refund of the customer's order of that SKU */
	char out[512], errs[2048];
	const char *csv = "order_id,email,date,sku,name,price,qty\n"
			  "536365,bob@example.com,2026-11-01T10:00:00Z,LAMP,Lamp,10,3\n"
			  "536365,bob@example.com,2026-11-01T10:00:00Z,CUP,Cup,5,2\n"
			  "C536391,bob@example.com,2026-11-02T10:00:00Z,LAMP,Lamp,10,-2\n"
			  "C536392,eve@example.com,2026-11-02T10:00:00Z,CUP,Cup,5,-1\n";
	int rc = csv_run(&w, 1, csv, out, sizeof out, errs, sizeof errs);
	is_int(rc, 1, "refunds: an import with an unmatched cancellation line exits 1");
	is_str(out, "{\"imported\":1,\"refused\":1}\n",
	       "... the order is imported, the cancellation of nothing refused");
	is_int(sq(&w, "SELECT round(refunded) FROM orders WHERE order_key = '536365'"), 20,
	       "refunds: the C invoice's line refunds 2 x 10 of the order");
	ok(contains(errs, "2 cancellation lines: 1 refunds of their orders, 1 "
		    "cancellation: no matching order"),
	   "refunds: the unmatched cancellation is counted and said");
	csv_run(&w, 1, csv, out, sizeof out, errs, sizeof errs);
	is_int(sq(&w, "SELECT round(refunded) FROM orders WHERE order_key = '536365'"), 20,
	       "refunds: a re-import refunds nothing twice");
	world_close(&w);
}

/* ---- issue 14: ?partial=1 stores a batch's good events ---- */

static void test_partial_events(void)
{
	struct world w;
	struct ev_error err;
	struct buf refused = {0};
	if (!ok(world_open(&w, "partial") == 0, "partial: world opens"))
		return;
	const char *batch = "[{\"type\":\"product\",\"sku\":\"A\",\"name\":\"A\","
			    "\"price\":1},{\"type\":\"product\",\"sku\":\"B\"},"
			    "{\"type\":\"product\",\"sku\":\"C\",\"name\":\"C\","
			    "\"price\":1}]";
	is_int(ingest(&w, EV_CLI, batch, T0, &err), -1,
	       "partial: by default one bad event refuses the batch");
	is_int(sq(&w, "SELECT count(*) FROM products"), 0, "... storing nothing");
	int n = ev_ingest_partial(&w.app, EV_CLI, batch, strlen(batch), NULL, T0,
				  &err, &refused);
	is_int(n, 2, "partial: the two good events are stored");
	is_int(sq(&w, "SELECT count(*) FROM products"), 2, "... in the catalog");
	ok(refused.data && !strncmp(refused.data, "[{\"index\":1,\"error\":\"", 21) &&
	   !contains(refused.data, "index\":0") && !contains(refused.data, "index\":2"),
	   "partial: the bad one is listed by its index with its reason");
	buf_free(&refused);
	/* a refund of an order not recorded is known only when it is stored:
	 * refused alone too, its own writes (a contact) undone */
	const char *refunds = "[{\"type\":\"order\",\"order_id\":\"o1\","
		"\"email\":\"a@example.com\",\"total\":40,\"items\":[{\"sku\":"
		"\"A\",\"name\":\"A\",\"price\":40}]},"
		"{\"type\":\"refund\",\"order_id\":\"nope\",\"amount\":5,"
		"\"email\":\"ghost@example.com\"},"
		"{\"type\":\"refund\",\"order_id\":\"o1\",\"amount\":10}]";
	is_int(ingest(&w, EV_CLI, refunds, T0, &err), -1,
	       "partial: by default a refund of no order refuses the batch");
	is_int(sq(&w, "SELECT count(*) FROM orders"), 0, "... storing nothing");
	n = ev_ingest_partial(&w.app, EV_CLI, refunds, strlen(refunds), NULL, T0,
			      &err, &refused);
	is_int(n, 2, "partial: the order and its refund are stored");
	is_int(err.duplicates, 0, "... none counted a duplicate");
	ok(refused.data && !strncmp(refused.data, "[{\"index\":1,\"error\":"
	   "\"order_id: a refund of an order", 48) && !contains(refused.data, "index\":2"),
	   "partial: the refund of no order is listed alone (%s)", refused.data);
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE email = 'ghost@example.com'"), 0,
	       "... and its contact undone");
	ok(sq(&w, "SELECT refunded FROM orders WHERE order_key = 'o1'") == 10,
	   "... the other refund applied");
	buf_free(&refused);
	world_close(&w);
}

/* ---- issue 14: the store's currency where no cart has one ---- */

/* The text part of the last message sent to EMAIL, in OUT. */
static void last_text(struct world *w, const char *email, struct buf *out)
{
	struct buf mail = {0};
	outbox_read(w, sq(w, "SELECT max(m.id) FROM messages m JOIN contacts c ON "
			  "c.id = m.contact_id WHERE m.status = 'sent' AND c.email = '%s'",
			  email), &mail);
	mime_part(mail.data ? mail.data : "", "text/plain", out);
	buf_free(&mail);
}

static void test_store_currency(void)
{
	struct world w;
	struct tick_summary s;
	struct ev_error err;
	struct buf dec = {0};
	setenv("REMARKET_CURRENCY", "GBP", 1);
	int opened = world_open(&w, "currency");
	unsetenv("REMARKET_CURRENCY");
	if (!ok(opened == 0, "currency: world opens"))
		return;
	product(&w, "A", "lighting", T0);
	product(&w, "B", "lighting", T0);
	order_line(&w, "c1", "lapsed@example.com", "A", 40, T0 - 91 * DAY, T0);
	tick(&w, T0, &s);
	tick(&w, T0 + 7 * DAY, &s);
	is_int(winback_sent(&w, "lapsed@example.com", 2), 1, "currency: win-back step 2 sent");
	last_text(&w, "lapsed@example.com", &dec);
	ok(contains(dec.data, "On orders of \xC2\xA3" "40 or more"),
	   "a win-back offer (no cart, no order) prints its minimum in the store's currency, "
	   "as a person writes it");
	buf_free(&dec);

	/* post-purchase: the order's currency (USD), not the store's */
	db_scalar(w.app.db, "UPDATE flows SET enabled = 1 WHERE name = 'post_purchase'");
	int rc = ingest(&w, EV_CLI, "{\"type\":\"order\",\"order_id\":\"u1\",\"email\":"
		  "\"buyer@example.com\",\"consent\":true,\"currency\":\"USD\","
		  "\"total\":30,\"ts\":1800000000,\"items\":[{\"sku\":\"A\","
		  "\"name\":\"A\",\"price\":30}]}", 1800000000, &err);
	if (!ok(rc >= 0, "currency: a USD order is stored"))
		diag("%s", err.msg);
	tick(&w, 1800000000 + HOUR, &s);
	tick(&w, 1800000000 + 10 * DAY, &s);
	tick(&w, 1800000000 + 21 * DAY, &s);
	is_int(sq(&w, "SELECT count(*) FROM messages m JOIN contacts c ON c.id = "
		  "m.contact_id WHERE c.email = 'buyer@example.com' AND m.step = 3 "
		  "AND m.status = 'sent'"), 1, "currency: the cross-sell is sent");
	last_text(&w, "buyer@example.com", &dec);
	ok(contains(dec.data, "$10.00") && !contains(dec.data, "\xC2\xA3"),
	   "a post-purchase cross-sell prints its amounts in the order's currency");
	buf_free(&dec);
	world_close(&w);
}

/* ---- issue 12: mail a strict inbox accepts ---- */

/* "NAME <addr>" as mail_mailbox writes it. */
static const char *mailbox_of(const char *name, const char *addr)
{
	static char out[300];
	struct buf b = {0};
	mail_mailbox(&b, name, addr);
	snprintf(out, sizeof out, "%s", b.data ? b.data : "");
	buf_free(&b);
	return out;
}

static void test_mail_names(void)
{
	char err[256];
	is_str(mailbox_of("Maison Demo, Paris", "shop@example.com"),
	       "\"Maison Demo, Paris\" <shop@example.com>",
	       "a display name with a comma is quoted (one mailbox, not two)");
	is_str(mailbox_of("Say \"hi\"", "a@example.com"),
	       "\"Say \\\"hi\\\"\" <a@example.com>", "... a quote is escaped");
	is_str(mailbox_of("Back\\slash", "a@example.com"),
	       "\"Back\\\\slash\" <a@example.com>", "... a backslash is escaped");
	is_str(mailbox_of("J. Smith", "a@example.com"), "\"J. Smith\" <a@example.com>",
	       "... a dot is quoted");
	is_str(mailbox_of("Ann Smith", "a@example.com"), "Ann Smith <a@example.com>",
	       "... a name of atoms is written as it is");
	is_str(mailbox_of("Zoë Müller", "a@example.com"),
	       "=?UTF-8?B?Wm/DqyBNw7xsbGVy?= <a@example.com>",
	       "... a non-ASCII name is an RFC 2047 encoded-word");
	is_str(mailbox_of("=?UTF-8?B?eA==?=", "a@example.com"),
	       "=?UTF-8?B?PT9VVEYtOD9CP2VBPT0/PQ==?= <a@example.com>",
	       "... a name that looks encoded is encoded, not decoded by readers");
	is_str(mailbox_of("", "a@example.com"), "a@example.com", "... no name: the address");

	struct buf out = {0};
	struct mail m = {
		.from = "Maison Demo, Paris <shop@example.com>",
		.to = "zoe@example.com", .to_name = "Zoë Müller, Lyon",
		.subject = "Hi", .message_id = "<rm.1.abc@example.com>",
		.list_unsub = "<https://shop.example.com/rm/u/T>",
		.text = "Hi\n", .html = "<p>Hi</p>\n", .date = T0,
		.reply_to = "\"Help, Maison Demo\" <help@example.com>",
	};
	ok(mail_build(&m, &out, err, sizeof err) == 0, "mail_build: a comma store name");
	const char *msg = out.data ? out.data : "";
	is_str(header_of(msg, "From"), "\"Maison Demo, Paris\" <shop@example.com>",
	       "From: the store name is quoted");
	is_str(header_of(msg, "Reply-To"), "\"Help, Maison Demo\" <help@example.com>",
	       "Reply-To: reply_to, quoted like From");
	ok(contains(header_of(msg, "To"), "?= <zoe@example.com>") &&
	   contains(header_of(msg, "To"), "=?UTF-8?B?"),
	   "To: the contact's non-ASCII name encoded (%s)", header_of(msg, "To"));
	is_str(header_of(msg, "Auto-Submitted"), "auto-generated",
	       "Auto-Submitted: auto-generated (RFC 3834)");
	static const char *bad[] = {"Eve\r\nBcc: x@evil.example", "Eve\nBcc: x@evil.example"};
	for (size_t i = 0; i < 2; i++) {
		struct mail x = m;
		x.to_name = bad[i];
		buf_reset(&out);
		ok(mail_build(&x, &out, err, sizeof err) < 0 && out.len == 0,
		   "a contact name with CR/LF is refused in To (%s)", vis(bad[i]));
		x = m;
		x.reply_to = bad[i];
		buf_reset(&out);
		ok(mail_build(&x, &out, err, sizeof err) < 0 && out.len == 0,
		   "a reply_to with CR/LF is refused");
	}
	m.reply_to = NULL;
	m.to_name = "";
	buf_reset(&out);
	mail_build(&m, &out, err, sizeof err);
	ok(!contains(out.data, "Reply-To:") &&
	   is_str(header_of(out.data, "To"), "zoe@example.com", "To: no name, the address"),
	   "no reply_to: no Reply-To header");
	buf_free(&out);

	/* the keys: a non-ASCII from address would make an invalid Message-ID */
	static const struct { const char *var, *val, *want; } keys[] = {
		{"REMARKET_FROM", "Shop <shöp@example.com>", "from: "},
		{"REMARKET_FROM", "Shop <shop@exämple.com>", "from: "},
		{"REMARKET_FROM", "Shop", "from: "},
		{"REMARKET_REPLY_TO", "Help <not an address>", "reply_to: "},
		{"REMARKET_LOCALE", "xx_YY", "locale: 'xx_YY'"},
		{"REMARKET_TIMEZONE", "Mars/Olympus_Mons", "timezone: "},
		{"REMARKET_TIMEZONE", "../../etc/passwd", "timezone: "},
	};
	struct config cfg;
	for (size_t i = 0; i < sizeof keys / sizeof *keys; i++) {
		setenv(keys[i].var, keys[i].val, 1);
		err[0] = '\0';
		int rc = cfg_load(&cfg, NULL, err, sizeof err);
		unsetenv(keys[i].var);
		if (rc == 0)
			cfg_free(&cfg);
		ok(rc < 0 && contains(err, keys[i].want), "config %s = '%s' refused (%s)",
		   keys[i].var, keys[i].val, err);
	}
	setenv("REMARKET_FROM", "\"Maison Demo, Paris\" <shop@example.com>", 1);
	setenv("REMARKET_TIMEZONE", "Europe/Paris", 1);
	int rc = cfg_load(&cfg, NULL, err, sizeof err);
	setenv("REMARKET_FROM", "Maison Demo <shop@example.com>", 1); /* main()'s */
	unsetenv("REMARKET_TIMEZONE");
	if (ok(rc == 0, "a quoted from and a timezone load (%s)", rc ? err : "")) {
		is_str(cfg.store_name, "Maison Demo, Paris", "... the store name is unquoted");
		cfg_free(&cfg);
	}
	cfg_timezone("UTC");
}

static void test_money_dates(void)
{
	static const struct {
		double v; const char *cur, *loc; int whole; const char *want;
	} mon[] = {
		{22, "GBP", "en_GB", 0, "£22.00"},
		{22, "EUR", "fr_FR", 0, "22,00\u00a0€"},
		{22, "EUR", "de_DE", 0, "22,00\u00a0€"},
		{1234.5, "EUR", "de_DE", 0, "1.234,50\u00a0€"},
		{1234.5, "EUR", "fr_FR", 0, "1\u202f234,50\u00a0€"},
		{1234567.891, "USD", "en_US", 0, "$1,234,567.89"},
		{22, "EUR", "nl_NL", 0, "€\u00a022,00"},
		{22, "CHF", "en", 0, "CHF\u00a022.00"},
		{22, "CHF", "de_CH", 0, "CHF\u00a022.00"},
		{1234.4, "JPY", "en", 0, "¥1,234"},
		{22, "XAF", "en", 0, "XAF\u00a022.00"},
		{22, "", "en", 0, "22.00"},
		{95, "GBP", "en_GB", 1, "£95"},
		{95.5, "GBP", "en_GB", 1, "£95.50"},
		{95, "EUR", "fr_FR", 1, "95\u00a0€"},
		{-3.5, "EUR", "es_ES", 0, "-3,50\u00a0€"},
		{0.004, "EUR", "en", 0, "€0.00"},
	};
	for (size_t i = 0; i < sizeof mon / sizeof *mon; i++) {
		char got[64], name[120];
		mail_money(got, sizeof got, mon[i].v, mon[i].cur, mon[i].loc, mon[i].whole);
		snprintf(name, sizeof name, "money: %g %s in %s%s is %s", mon[i].v,
			 mon[i].cur, mon[i].loc, mon[i].whole ? " (whole)" : "", mon[i].want);
		is_str(got, mon[i].want, name);
	}
	ok(mail_locale_known("en") && mail_locale_known("fr_FR") &&
	   !mail_locale_known("fr_XX") && !mail_locale_known(""),
	   "the locales known are the table's");

	/* 2026-12-06 13:00 UTC, a Sunday */
	static const struct { const char *tz, *loc, *want; } dates[] = {
		{"Europe/Paris", "en_GB", "Sunday 6 December, 14:00"},
		{"Europe/Paris", "fr_FR", "dimanche 6 décembre, 14:00"},
		{"Europe/Berlin", "de_DE", "Sonntag, 6. Dezember, 14:00"},
		{"America/New_York", "en_US", "Sunday, December 6, 8:00\u00a0AM"},
		{"UTC", "en", "Sunday 6 December, 13:00"},
		{"Asia/Tokyo", "en", "Sunday 6 December, 22:00"},
		{"Pacific/Auckland", "en", "Monday 7 December, 02:00"},
	};
	for (size_t i = 0; i < sizeof dates / sizeof *dates; i++) {
		char got[80], name[160];
		if (!ok(cfg_timezone(dates[i].tz) == 0, "timezone %s is known", dates[i].tz))
			continue;
		mail_date(got, sizeof got, 1796562000, dates[i].loc);
		snprintf(name, sizeof name, "date: %s in %s is %s", dates[i].tz,
			 dates[i].loc, dates[i].want);
		is_str(got, dates[i].want, name);
	}
	/* summer time: 2026-07-01 12:00 UTC is 14:00 in Paris */
	cfg_timezone("Europe/Paris");
	char got[80];
	mail_date(got, sizeof got, 1782907200, "en");
	is_str(got, "Wednesday 1 July, 14:00", "date: summer time in Paris");
	ok(cfg_timezone("Nowhere/Land") < 0 && cfg_timezone("/etc/passwd") < 0 &&
	   cfg_timezone("") < 0, "unknown or path-like zones are refused");
	cfg_timezone("UTC");
}

/* The /l/ link of KIND ("l") in TEXT that leads to TARGET, split into its
 * token and its query: 0 if found. */
static int find_link(const char *text, const char *target, char *tok,
		     size_t toklen, char *query, size_t qlen)
{
	char *esc = curl_easy_escape(NULL, target, 0);
	for (const char *p = text; esc && (p = strstr(p, "/rm/l/")); p += 6) {
		size_t n = strcspn(p + 6, "?");
		const char *qs = p + 6 + n;
		size_t m = strcspn(qs, " \r\n\"<>");
		if (*qs == '?' && !strncmp(qs + 1, "u=", 2) &&
		    !strncmp(qs + 3, esc, strlen(esc)) && m == strlen(esc) + 3 &&
		    n < toklen && m < qlen) {
			snprintf(tok, toklen, "%.*s", (int)n, p + 6);
			snprintf(query, qlen, "%.*s", (int)m - 1, qs + 1);
			curl_free(esc);
			return 0;
		}
	}
	curl_free(esc);
	return -1;
}

static void link_get(struct world *w, const char *tok, const char *query,
		     rm_time now, struct http_resp *rs)
{
	char path[200];
	struct http_req rq = {0};
	snprintf(path, sizeof path, "/l/%s", tok);
	rq.method = "GET";
	rq.path = path;
	rq.query = query;
	rq.remote_addr = "127.0.0.1";
	memset(rs, 0, sizeof *rs);
	http_handle(&w->app, &rq, rs, now);
}

static void test_tracked_links(void)
{
	/* only the store's host, as browsers read it too */
	struct config sc;
	memset(&sc, 0, sizeof sc);
	sc.store_url = "https://shop.example.com";
	ok(link_on_store(&sc, "https://shop.example.com/p/lamp") &&
	   link_on_store(&sc, "http://SHOP.example.com:8443/x?y=1"),
	   "a link on the store's host is the store's (any case, port, scheme)");
	ok(!link_on_store(&sc, "https://evil.example\\@shop.example.com/p") &&
	   !link_on_store(&sc, "https://evil.example\\shop.example.com/p") &&
	   !link_on_store(&sc, "https://user@shop.example.com/p") &&
	   !link_on_store(&sc, "https://shop.example.com/p q") &&
	   !link_on_store(&sc, "https://shop.example.com/p\tq") &&
	   !link_on_store(&sc, "https://shop.example.com.evil.example/") &&
	   !link_on_store(&sc, "javascript://shop.example.com/%0aalert(1)"),
	   "... never one a browser reads elsewhere: a backslash (a browser's "
	   "'/'), a user name, a space or tab, another host, another scheme");
	/* tokens bound to a target */
	unsigned char key[RM_KEYBYTES];
	memset(key, 7, sizeof key);
	char t1[TOK_MAXLEN + 1], t0[TOK_MAXLEN + 1];
	int64_t subj = 0;
	const char *url = "https://shop.example.com/p/lamp";
	tok_sign_for(key, TOK_LINK, 42, T0 + DAY, url, strlen(url), t1, sizeof t1);
	ok(tok_verify_for(key, t1, TOK_LINK, url, strlen(url), T0, &subj) == TOK_OK &&
	   subj == 42, "a link token verifies with its target");
	const char *other = "https://shop.example.com/p/rug";
	is_int(tok_verify_for(key, t1, TOK_LINK, other, strlen(other), T0, &subj),
	       TOK_FORGED, "... and is forged with another target");
	is_int(tok_verify(key, t1, TOK_LINK, T0, &subj), TOK_FORGED,
	       "... and without its target");
	/* a token made the old way (a one-shot MAC of the payload) verifies */
	unsigned char raw[33];
	raw[0] = TOK_UNSUB;
	for (int i = 0; i < 8; i++) {
		raw[1 + i] = (unsigned char)((uint64_t)9 >> (56 - 8 * i));
		raw[9 + i] = (unsigned char)((uint64_t)(T0 + DAY) >> (56 - 8 * i));
	}
	crypto_generichash(raw + 17, 16, raw, 17, key, sizeof key);
	sodium_bin2base64(t0, sizeof t0, raw, sizeof raw,
			  sodium_base64_VARIANT_URLSAFE_NO_PADDING);
	ok(tok_verify(key, t0, TOK_UNSUB, T0, &subj) == TOK_OK && subj == 9,
	   "a token signed before link tokens existed still verifies");

	/* a world whose store is shop.example.com, with a comma in its name */
	setenv("REMARKET_STORE_URL", "https://shop.example.com", 1);
	setenv("REMARKET_BASE_URL", "https://shop.example.com/rm", 1);
	setenv("REMARKET_CART_URL", "https://shop.example.com/cart?restore={cart}&code={code}", 1);
	setenv("REMARKET_FROM", "Maison Demo, Paris <shop@example.com>", 1);
	struct world w;
	int opened = world_open(&w, "links");
	/* back to main()'s settings, which later tests read */
	unsetenv("REMARKET_STORE_URL");
	setenv("REMARKET_BASE_URL", BASE_URL, 1);
	setenv("REMARKET_CART_URL", CART_URL, 1);
	setenv("REMARKET_FROM", "Maison Demo <shop@example.com>", 1);
	if (!ok(opened == 0, "links: world opens"))
		return;
	struct tick_summary s;
	cart_event(&w, "zoe@example.com", "Zoë Müller", "z1", 1, T0);
	tick(&w, T0 + HOUR, &s);
	long long mid = sq(&w, "SELECT max(id) FROM messages WHERE status = 'sent'");
	struct buf mail = {0}, html = {0};
	outbox_read(&w, mid, &mail);
	const char *msg = mail.data ? mail.data : "";
	is_str(header_of(msg, "From"), "\"Maison Demo, Paris\" <shop@example.com>",
	       "links: the cart mail's From is one mailbox");
	mime_part(msg, "text/html", &html);
	char tok[80], query[300], store_tok[80], store_q[300];
	ok(find_link(html.data, "https://shop.example.com/p/lamp", tok, sizeof tok,
		     query, sizeof query) == 0,
	   "links: the cart mail's product link goes through /l/");
	ok(find_link(html.data, "https://shop.example.com", store_tok, sizeof store_tok,
		     store_q, sizeof store_q) == 0,
	   "links: its store link too");
	ok(!contains(html.data, "href=\"https://shop.example.com/p/lamp\""),
	   "links: no plain product link is left");

	struct http_resp rs;
	long long clicks = sq(&w, "SELECT count(*) FROM interactions WHERE kind = 'click'");
	link_get(&w, tok, query, T0 + 2 * HOUR, &rs);
	is_int(rs.status, 302, "links: a product link redirects");
	is_str(resp_header(&rs, "Location"),
	       "https://shop.example.com/p/lamp?restore=z1&code=",
	       "... to the product, restoring the cart");
	ok(contains(resp_header(&rs, "Set-Cookie"), "rm_vid="),
	   "... and joins this browser to the contact");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT count(*) FROM interactions WHERE kind = 'click' AND "
		  "message = %lld", mid), clicks + 1, "... and records a click on the message");

	/* forged, altered, off the store's host, expired */
	char bad[80];
	snprintf(bad, sizeof bad, "%s", tok);
	bad[5] = bad[5] == 'A' ? 'B' : 'A';
	link_get(&w, bad, query, T0 + 2 * HOUR, &rs);
	is_int(rs.status, 403, "links: a forged token is refused (403)");
	ok(rs.headers.data == NULL || !contains(rs.headers.data, "Location:"),
	   "... and redirects nowhere");
	http_resp_free(&rs);
	link_get(&w, tok, "u=https%3A%2F%2Fshop.example.com%2Fp%2Frug", T0 + 2 * HOUR, &rs);
	is_int(rs.status, 403, "links: a token with another target is refused");
	http_resp_free(&rs);
	link_get(&w, tok, "", T0 + 2 * HOUR, &rs);
	is_int(rs.status, 403, "links: a token without its target is refused");
	http_resp_free(&rs);
	const char *evil = "https://evil.example/phish";
	char etok[TOK_MAXLEN + 1], eq[200];
	tok_sign_for(w.app.key, TOK_LINK, mid, T0 + DAY, evil, strlen(evil), etok, sizeof etok);
	snprintf(eq, sizeof eq, "u=https%%3A%%2F%%2Fevil.example%%2Fphish");
	link_get(&w, etok, eq, T0 + 2 * HOUR, &rs);
	is_int(rs.status, 403, "links: even a signed target off store_url's host is refused");
	http_resp_free(&rs);
	ok(mc_link(&w.app, mid, evil, T0 + DAY, &html) == 0,
	   "links: mc_link leaves an off-host URL plain");
	is_int(sq(&w, "SELECT count(*) FROM interactions WHERE kind = 'click'"),
	       clicks + 1, "links: none of these recorded a click");
	link_get(&w, tok, query, T0 + 500 * DAY, &rs);
	is_int(rs.status, 302, "links: an expired link still leads to the shop");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT count(*) FROM interactions WHERE kind = 'click'"),
	       clicks + 1, "... recording nothing");

	/* the click attributes an order, as a recovery link's does */
	struct ev_error err;
	ingest(&w, EV_HOOK, "{\"type\":\"order\",\"order_id\":\"oz1\",\"email\":"
	       "\"zoe@example.com\",\"cart_id\":\"z1\",\"currency\":\"EUR\",\"total\":"
	       "99,\"items\":[{\"sku\":\"LAMP-1\",\"name\":\"Linen lamp\",\"price\":"
	       "49.5,\"qty\":2}]}", T0 + 3 * HOUR, &err);
	is_int(sq(&w, "SELECT count(*) FROM orders WHERE order_key = 'oz1' AND "
		  "attribution = 'click' AND message = %lld", mid), 1,
	       "links: the order after a product click is attributed to it");
	buf_free(&mail);
	buf_free(&html);
	world_close(&w);
}

/* ---- incremental segments (issue 10) ---- */

/* The segments table as one text, to compare two ways of computing it. */
static char *segments_text(struct world *w)
{
	return sq_text(w, "SELECT group_concat(x, ' ') FROM (SELECT contact_id || ':' "
		       "|| r || f || m || ':' || orders || ':' || round(spent, 2) || ':' "
		       "|| last_order || ':' || segment AS x FROM segments ORDER BY contact_id)");
}

/* What flow_detect committed, seen from another connection: PRAGMA
 * data_version moves when another connection commits a change. */
static long long data_version(sqlite3 *h)
{
	sqlite3_stmt *s = NULL;
	long long v = -1;
	if (sqlite3_prepare_v2(h, "PRAGMA data_version", -1, &s, NULL) == SQLITE_OK &&
	    sqlite3_step(s) == SQLITE_ROW)
		v = sqlite3_column_int64(s, 0);
	sqlite3_finalize(s);
	return v;
}

/* After every tick, incremental or not, the segments equal a recompute
 * from scratch (flow_segments_full, the old one-transaction fill), while
 * orders arrive, customers cross the 30-day, at-risk, lapse and lost
 * boundaries, a future-dated order comes due, winback_after changes to
 * auto and the learned threshold moves. */
static void test_segments_incremental(void)
{
	struct world w;
	struct tick_summary s;
	char id[32], email[64];
	if (!ok(world_open(&w, "seg-incr") == 0, "incremental segments: world opens"))
		return;
	set_cfg(&w.cfg.winback_after, "120"); /* then auto (60 days) from the 4th tick */
	product(&w, "A", "lighting", T0);
	for (int i = 0; i < 40; i++) {
		snprintf(email, sizeof email, "c%02d@example.com", i);
		for (int k = 0; k <= i % 5; k++) {
			snprintf(id, sizeof id, "c%d-%d", i, k);
			order_line(&w, id, email, "A", 10 + (i * 7) % 50,
				   T0 - (i * 9 % 400) * DAY - k * (20 + i % 3) * DAY, T0);
		}
	}
	const rm_time at[] = {T0, T0 + HOUR, T0 + DAY, T0 + 7 * DAY, T0 + 31 * DAY,
			      T0 + 45 * DAY, T0 + 61 * DAY, T0 + 95 * DAY,
			      T0 + 200 * DAY, T0 + 400 * DAY};
	int same = 1;
	for (size_t t = 0; t < sizeof at / sizeof at[0]; t++) {
		if (t == 2) { /* two new orders, and one dated 3 weeks ahead */
			order_line(&w, "n1", "c03@example.com", "A", 99, at[t] - HOUR, at[t]);
			order_line(&w, "n2", "new@example.com", "A", 15, at[t] - HOUR, at[t]);
			db_scalar(w.app.db, "INSERT INTO orders (order_key, contact_id, total, ts) "
				  "SELECT 'ahead', id, 500, (SELECT max(ts) FROM orders) + 21 * 86400 "
				  "FROM contacts WHERE email = 'c11@example.com'");
		}
		if (t == 3)
			set_cfg(&w.cfg.winback_after, "auto");
		if (t == 5) /* enough repeat purchases to move the learned threshold */
			for (int i = 0; i < 30; i++) {
				snprintf(id, sizeof id, "r%d", i);
				snprintf(email, sizeof email, "c%02d@example.com", i);
				order_line(&w, id, email, "A", 20, at[t] - 2 * HOUR, at[t]);
			}
		tick(&w, at[t], &s);
		char *inc = segments_text(&w);
		flow_segments_full(&w.app, at[t]);
		char *full = segments_text(&w);
		if (!inc || !full || strcmp(inc, full)) {
			diag("tick at T0%+lld: incremental %s", (long long)(at[t] - T0),
			     inc ? inc : "(null)");
			diag("                 from scratch %s", full ? full : "(null)");
			same = 0;
		}
		free(inc);
		free(full);
	}
	ok(same, "incremental segments: after each of 10 ticks, equal to a recompute from scratch");
	ok(sq(&w, "SELECT count(*) FROM segments WHERE contact_id = (SELECT id FROM "
	       "contacts WHERE email = 'c11@example.com') AND spent >= 500") == 1,
	   "incremental segments: an order dated ahead counts once the clock reaches it");
	world_close(&w);
}

/* A customer crossing the lapse threshold between two ticks is enrolled
 * once; a new order takes a lapsed customer out of 'lapsed' at the next
 * tick; a tick on a store where nothing changed commits nothing. */
static void test_lapse_incremental(void)
{
	struct world w;
	struct tick_summary s;
	if (!ok(world_open(&w, "lapse-incr") == 0, "incremental lapse: world opens"))
		return;
	product(&w, "A", "lighting", T0);
	order_line(&w, "o1", "soon@example.com", "A", 40, T0 - 89 * DAY, T0);
	order_line(&w, "o2", "gone@example.com", "A", 40, T0 - 100 * DAY, T0);
	tick(&w, T0, &s);
	is_int(sq(&w, "SELECT count(*) FROM enrollments e JOIN contacts c ON "
		  "c.id = e.contact_id WHERE c.email = 'soon@example.com'"), 0,
	       "incremental lapse: 89 days, not enrolled");
	tick(&w, T0 + DAY - 60, &s);
	is_int(s.enrolled, 0, "incremental lapse: a minute before 90 days, still not");
	tick(&w, T0 + DAY + 60, &s);
	is_int(s.enrolled, 1, "incremental lapse: the tick after the threshold enrolls them");
	tick(&w, T0 + DAY + 120, &s);
	tick(&w, T0 + 2 * DAY, &s);
	is_int(sq(&w, "SELECT count(*) FROM enrollments e JOIN contacts c ON "
		  "c.id = e.contact_id WHERE c.email = 'soon@example.com'"), 1,
	       "incremental lapse: enrolled exactly once over the next ticks");

	char *seg = sq_text(&w, "SELECT segment FROM segments s JOIN contacts c ON "
			    "c.id = s.contact_id WHERE c.email = 'gone@example.com'");
	is_str(seg, "lapsed", "incremental lapse: 100 days: lapsed");
	free(seg);
	order_line(&w, "o3", "gone@example.com", "A", 40, T0 + 2 * DAY + 30, T0 + 2 * DAY + 30);
	tick(&w, T0 + 2 * DAY + 60, &s);
	seg = sq_text(&w, "SELECT segment FROM segments s JOIN contacts c ON "
		      "c.id = s.contact_id WHERE c.email = 'gone@example.com'");
	ok(seg && strcmp(seg, "lapsed") != 0,
	   "incremental lapse: a new order takes them out of 'lapsed' at the next tick (%s)",
	   seg ? seg : "none");
	free(seg);

	/* nothing changed: the next tick's detection commits nothing */
	tick(&w, T0 + 2 * DAY + 120, &s);
	sqlite3 *h = NULL;
	if (sqlite3_open_v2(w.cfg.db, &h, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK) {
		long long before = data_version(h);
		struct tick_summary d;
		memset(&d, 0, sizeof d);
		ok(flow_detect(&w.app, T0 + 2 * DAY + 180, &d) == 0 &&
		   data_version(h) == before && before >= 0,
		   "incremental lapse: a tick with nothing changed writes nothing");
		/* a contact who gives consent is looked at by the next tick */
		db_scalar(w.app.db, "UPDATE contacts SET consent = 0 WHERE email = 'gone@example.com'");
		order_line(&w, "o4", "late@example.com", "A", 40, T0 - 120 * DAY, T0);
		db_scalar(w.app.db, "UPDATE contacts SET consent = 0 WHERE email = 'late@example.com'");
		tick(&w, T0 + 2 * DAY + 240, &s);
		is_int(s.enrolled, 0, "incremental lapse: no consent, no win-back");
		db_scalar(w.app.db, "UPDATE contacts SET consent = 1 WHERE email = 'late@example.com'");
		tick(&w, T0 + 2 * DAY + 300, &s);
		is_int(s.enrolled, 1, "incremental lapse: consent given later: enrolled at the next tick");
	} else {
		ok(0, "incremental lapse: a second connection opens");
	}
	sqlite3_close(h);
	world_close(&w);
}

/* issue 14: the first campaign after an import is ramped (a daily cap,
 * most recently lapsed first, nobody lost) and skips the long lost */
/* Issue 14: backtest. The replay on a copy with an injected clock: a
 * future order is hidden until its day (so "a", who comes back on day
 * 3, is lapsed on day 0 and enrolled), the tick's own rules enroll and
 * exit, nothing is sent and the store's database is left alone; who
 * came back within 30 days is counted. */
static int bt_day_of(const struct backtest *r, const char *date, long *enrolled,
		     long *mails)
{
	*enrolled = *mails = 0;
	for (size_t i = 0; i < r->ndays; i++)
		if (!strcmp(r->per_day[i].date, date) &&
		    !strcmp(r->flows[r->per_day[i].flow].name, "winback")) {
			*enrolled = r->per_day[i].enrolled;
			*mails = r->per_day[i].mails;
			return 1;
		}
	return 0;
}

static void test_backtest(void)
{
	struct world w;
	struct backtest r;
	char err[600] = "", d0[11], d7[11], d10[11], d17[11], d3[11];
	long en, ma;
	if (!ok(world_open(&w, "backtest") == 0, "backtest: world opens"))
		return;
	rm_time day0 = T0 - T0 % DAY; /* a tick at midnight, as a date */
	rm_time now = day0 + 60 * DAY;
	product(&w, "A", "lighting", day0);
	order_line(&w, "a1", "a@example.com", "A", 40, day0 - 95 * DAY, now);
	order_line(&w, "a2", "a@example.com", "A", 40, day0 + 3 * DAY, now);
	order_line(&w, "b1", "b@example.com", "A", 40, day0 - 80 * DAY, now);
	order_line(&w, "c1", "c@example.com", "A", 40, day0 - 95 * DAY, now);
	order_line(&w, "c2", "c@example.com", "A", 40, day0 + 25 * DAY, now);
	order_line(&w, "z1", "z@example.com", "A", 40, day0 + 60 * DAY, now);
	/* d's cart, idle from day 2 (+5 h), ordered on day 4: abandoned on
	 * day 3's tick, its first reminder (+1 h) counted, the second
	 * (+24 h) not: the order came first */
	char cart[400];
	struct ev_error e;
	snprintf(cart, sizeof cart, "{\"type\":\"cart\",\"email\":\"d@example.com\","
		 "\"consent\":true,\"cart_id\":\"k1\",\"total\":40,\"ts\":%lld,"
		 "\"items\":[{\"sku\":\"A\",\"name\":\"A\",\"price\":40}]}",
		 (long long)(day0 + 2 * DAY + 5 * 3600));
	ingest(&w, EV_HOOK, cart, now, &e);
	snprintf(cart, sizeof cart, "{\"type\":\"order\",\"email\":\"d@example.com\","
		 "\"order_id\":\"d1\",\"cart_id\":\"k1\",\"total\":40,\"ts\":%lld,"
		 "\"items\":[{\"sku\":\"A\",\"name\":\"A\",\"price\":40}]}",
		 (long long)(day0 + 4 * DAY));
	ingest(&w, EV_HOOK, cart, now, &e);
	int rc = backtest_run(&w.app, day0, day0 + 20 * DAY, &r, err, sizeof err);
	if (!ok(rc == 0, "backtest: runs (%s)", err)) {
		world_close(&w);
		return;
	}
	is_int(r.days, 21, "backtest: a tick a day, both ends included");
	is_int(r.orders, 2, "backtest: the orders of those days re-applied (a's, d's)");
	const struct bt_flow *f = NULL, *k = NULL;
	for (int i = 0; i < r.nflows; i++) {
		if (!strcmp(r.flows[i].name, "winback"))
			f = &r.flows[i];
		if (!strcmp(r.flows[i].name, "abandoned_cart"))
			k = &r.flows[i];
	}
	if (ok(k != NULL, "backtest: the cart flow is reported")) {
		is_int(k->enrolled, 1, "backtest: d's cart enrolled");
		is_int(k->mails, 1, "backtest: one reminder, the next one after the order");
		is_int(k->back, 1, "backtest: d ordered within conversion_days");
		is_int(k->window_days, 7, "backtest: a cart's window is conversion_days");
	}
	if (ok(f != NULL, "backtest: the win-back flow is reported")) {
		is_int(f->enrolled, 3, "backtest: a and c enrolled on day 0, b on day 10");
		is_int(f->held_out, 0, "backtest: nobody held out (holdout 0)");
		is_int(f->complete, 3, "backtest: their 30 days are all in the history");
		is_int(f->back_complete, 2, "backtest: a and c came back on their own");
		is_int(f->back, 2, "backtest: ... of all 3");
		is_int(f->window_days, 30, "backtest: a win-back's window is 30 days");
	}
	struct tm tm;
	time_t t;
	char *dates[] = {d0, d3, d7, d10, d17};
	int offs[] = {0, 3, 7, 10, 17};
	for (int i = 0; i < 5; i++) {
		t = (time_t)(day0 + offs[i] * DAY);
		gmtime_r(&t, &tm);
		strftime(dates[i], 11, "%Y-%m-%d", &tm);
	}
	bt_day_of(&r, d0, &en, &ma);
	ok(en == 2 && ma == 2, "backtest: day 0: a and c enrolled, a mail each (%ld, %ld)",
	   en, ma);
	bt_day_of(&r, d3, &en, &ma);
	ok(en == 0 && ma == 0, "backtest: day 3: a orders, nothing due (%ld, %ld)", en, ma);
	bt_day_of(&r, d7, &en, &ma);
	ok(ma == 1, "backtest: day 7: c's second mail only, a's win-back ended with "
	   "their order (%ld)", ma);
	bt_day_of(&r, d10, &en, &ma);
	ok(en == 1 && ma == 1, "backtest: day 10: b lapsed and mailed (%ld, %ld)", en, ma);
	bt_day_of(&r, d17, &en, &ma);
	ok(ma == 1, "backtest: day 17: b's second mail (%ld)", ma);
	is_int(sq(&w, "SELECT count(*) FROM enrollments") + sq(&w, "SELECT count(*) FROM messages"),
	       0, "backtest: the store's database has no enrollment nor message");
	is_int(sq(&w, "SELECT count(*) FROM orders"), 7, "backtest: ... and all its orders");
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE status = 'ordered'"), 1,
	       "backtest: ... its cart as it was");
	ok(access(w.outbox, F_OK) != 0, "backtest: nothing written to the outbox");
	struct buf j = {0};
	ok(backtest_json(&r, &j) == 0 && strstr(j.data, "\"came_back_complete\":2,"
	   "\"organic_rate\":0.6667") != NULL, "backtest: the JSON has the organic rate");
	buf_reset(&j);
	ok(backtest_text(&r, &j) == 0 && strstr(j.data, "winback: 3 customers enrolled"),
	   "backtest: the text too");
	buf_free(&j);
	backtest_free(&r);
	rc = backtest_run(&w.app, day0 + DAY, day0, &r, err, sizeof err);
	ok(rc < 0 && strstr(err, "--from"), "backtest: --from after --to is refused (%s)", err);
	backtest_free(&r);
	world_close(&w);
}

static void test_winback_ramp(void)
{
	struct world w;
	struct tick_summary s;
	char id[32], email[64];
	if (!ok(world_open(&w, "winback-ramp") == 0, "winback ramp: world opens"))
		return;
	product(&w, "A", "lighting", T0);
	/* 510 lapsed, customer i lapsed i minutes before customer 0 */
	for (int i = 0; i < 510; i++) {
		snprintf(id, sizeof id, "r%d", i);
		snprintf(email, sizeof email, "c%d@example.com", i);
		order_line(&w, id, email, "A", 40, T0 - 91 * DAY - i * 60, T0);
	}
	/* idle 200 days: past the default max (2 x 90 days) */
	order_line(&w, "old", "old@example.com", "A", 40, T0 - 200 * DAY, T0);
	memset(&s, 0, sizeof s);
	ok(flow_detect(&w.app, T0, &s) == 0, "winback ramp: detection runs");
	is_int(s.enrolled, 500, "winback ramp: the first tick enrolls winback_daily_max (500)");
	is_int(s.winback_waiting, 10, "winback ramp: the 10 others wait (tick summary)");
	is_int(sq(&w, "SELECT count(*) FROM enrollments e JOIN contacts c ON c.id = e.contact_id "
		  "WHERE c.email IN ('c0@example.com', 'c499@example.com')"), 2,
	       "winback ramp: the most recently lapsed first");
	is_int(sq(&w, "SELECT count(*) FROM enrollments e JOIN contacts c ON c.id = e.contact_id "
		  "WHERE c.email IN ('c500@example.com', 'c509@example.com', 'old@example.com')"), 0,
	       "winback ramp: the longest lapsed wait, the long lost are not enrolled");
	memset(&s, 0, sizeof s);
	flow_detect(&w.app, T0 + 12 * 3600, &s);
	ok(s.enrolled == 0 && s.winback_waiting == 10,
	   "winback ramp: within 24 h nothing more (%ld enrolled, %ld waiting)",
	   s.enrolled, s.winback_waiting);
	/* one of the waiting orders again: no win-back for them */
	order_line(&w, "back", "c509@example.com", "A", 40, T0 + 13 * 3600, T0 + 13 * 3600);
	memset(&s, 0, sizeof s);
	flow_detect(&w.app, T0 + DAY + 60, &s);
	ok(s.enrolled == 9 && s.winback_waiting == 0,
	   "winback ramp: the next day the rest (9) are enrolled, the one who came back is not "
	   "(%ld enrolled, %ld waiting)", s.enrolled, s.winback_waiting);
	is_int(sq(&w, "SELECT count(DISTINCT contact_id) FROM enrollments WHERE flow_id = 2"), 509,
	       "winback ramp: nobody lost, nobody twice");
	memset(&s, 0, sizeof s);
	flow_detect(&w.app, T0 + DAY + 120, &s);
	is_int(s.enrolled, 0, "winback ramp: then nothing waits");
	/* 0: no limit; the long lost are enrolled at the next tick */
	set_cfg(&w.cfg.winback_max_idle_days, "0");
	memset(&s, 0, sizeof s);
	flow_detect(&w.app, T0 + DAY + 180, &s);
	is_int(sq(&w, "SELECT count(*) FROM enrollments e JOIN contacts c ON c.id = e.contact_id "
		  "WHERE c.email = 'old@example.com'"), 1,
	       "winback ramp: winback_max_idle_days = 0: no limit");
	world_close(&w);

	/* the minimum spend: a median, rounded down to a round price */
	static const struct { double v, want; } nice[] = {
		{40, 40}, {0.5, 0.5}, {7.4, 7}, {19.99, 19}, {47.5, 45}, {99, 95},
		{100, 100}, {303, 300}, {461.2, 460}, {999.99, 990}, {1234, 1200},
		{97.18, 95}, {12345, 12000},
	};
	for (size_t i = 0; i < sizeof nice / sizeof *nice; i++)
		ok(min_spend_nice(nice[i].v) == nice[i].want,
		   "min spend: %.2f is written %.2f (%.2f)", nice[i].v, nice[i].want,
		   min_spend_nice(nice[i].v));
	if (!ok(world_open(&w, "winback-median") == 0, "min spend: world opens"))
		return;
	product(&w, "A", "lighting", T0);
	/* the store: mean 146.17, median 80; "big" ordered 120, 137, 500 */
	order_line(&w, "m1", "small@example.com", "A", 40, T0 - 100 * DAY, T0);
	order_line(&w, "m2", "other@example.com", "A", 40, T0 - 10 * DAY, T0);
	order_line(&w, "m3", "more@example.com", "A", 40, T0 - 10 * DAY, T0);
	order_line(&w, "m4", "big@example.com", "A", 120, T0 - 130 * DAY, T0);
	order_line(&w, "m5", "big@example.com", "A", 137, T0 - 120 * DAY, T0);
	order_line(&w, "m6", "big@example.com", "A", 500, T0 - 100 * DAY, T0);
	tick(&w, T0, &s);
	tick(&w, T0 + 7 * DAY, &s);
	is_int(sq(&w, "SELECT min_spend FROM discounts d JOIN contacts c ON c.id = d.contact_id "
		  "WHERE c.email = 'big@example.com'"), 130,
	       "min spend: the customer's own median (137) rounded down (130), not the mean");
	is_int(sq(&w, "SELECT min_spend FROM discounts d JOIN contacts c ON c.id = d.contact_id "
		  "WHERE c.email = 'small@example.com'"), 40,
	       "min spend: a one-order customer: their order (40)");
	double store = median_order(&w.app, 0, T0 + 7 * DAY);
	ok(store == 80 && w.app.store_median == 80 && w.app.median_at == T0 + 7 * DAY,
	   "min spend: a customer without orders gets the store's median (80), cached, "
	   "not the mean (%.2f)", store);
	world_close(&w);
}

static void test_reco_report(void)
{
	test_reco_ranking();
	test_winback_report();
}

static void test_lifecycle(void)
{
	test_threshold();
	test_winback();
	test_segments();
	test_recommendations();
	test_post_purchase();
	test_browse();
}

static void test_sending(void)
{
	struct world w;
	struct tick_summary s;
	struct report r;

	/* a hook cart dated 10 days back: no burst of three steps */
	if (!ok(world_open(&w, "stale") == 0, "stale: world opens"))
		return;
	is_int(w.cfg.max_lateness_hours, 24, "max_lateness_hours defaults to 24");
	rm_time now = T0 + 30 * DAY;
	cart_dated(&w, "old@example.com", "old1", now - 10 * DAY, now);
	long sent = 0, stale = 0;
	for (int i = 0; i < 3; i++) {
		tick(&w, now + i * 60, &s);
		sent += s.sent;
		stale += s.stale;
	}
	is_int(sent, 0, "stale: a cart dated 10 days back gets nothing in three one-minute ticks");
	is_int(stale, 3, "... its three steps are stale");
	is_int(sq(&w, "SELECT count(*) FROM messages WHERE status = 'skipped' AND error LIKE 'stale: %%'"),
	       3, "... recorded (skipped, reason stale), not sent");
	is_int(outbox_count(&w), 0, "... the outbox is empty");
	is_int(sq(&w, "SELECT count(*) FROM enrollments WHERE status = 'done'"), 1,
	       "... the sequence is over");
	memset(&r, 0, sizeof r);
	int built = report_build(&w.app, now - DAY, now + DAY, &r);
	ok(built == 0 && r.stale == 3, "... the report counts 3 stale steps (%ld)", r.stale);
	struct buf j = {0};
	report_json(&r, &j);
	ok(j.data && strstr(j.data, "\"stale_steps\":3"), "... report JSON: stale_steps 3");
	buf_free(&j);
	world_close(&w);

	/* late, but the next step keeps its own schedule */
	if (!ok(world_open(&w, "stale2") == 0, "stale2: world opens"))
		return;
	cart_dated(&w, "late@example.com", "late1", T0, T0);
	tick(&w, T0 + 26 * HOUR, &s);
	ok(s.stale == 1 && s.sent == 1, "stale2: first tick 26 h after the cart: step 1 "
	   "(half the 23 h to step 2 is its limit) stale, step 2 sent (stale %ld, sent %ld)",
	   s.stale, s.sent);
	is_int(sq(&w, "SELECT step FROM messages WHERE status = 'sent'"), 2, "... the one sent is step 2");
	tick(&w, T0 + 72 * HOUR - 60, &s);
	is_int(s.sent, 0, "... step 3 not before its own time");
	tick(&w, T0 + 72 * HOUR + 60, &s);
	is_int(s.sent, 1, "... step 3 sent at 72 h, on time");
	world_close(&w);

	/* a 30-day outage: month-old steps are not sent, a new cart is */
	if (!ok(world_open(&w, "outage") == 0, "outage: world opens"))
		return;
	cart_dated(&w, "before@example.com", "before1", T0, T0);
	tick(&w, T0 + HOUR + 60, &s);
	is_int(s.sent, 1, "outage: step 1 sent before the outage");
	cart_dated(&w, "during@example.com", "during1", T0 + 30 * DAY - 2 * HOUR,
		   T0 + 30 * DAY - 2 * HOUR);
	tick(&w, T0 + 30 * DAY, &s);
	ok(s.sent == 1 && s.stale == 2, "outage: the first tick after 30 days: the "
	   "month-old steps 2 and 3 stale, the new cart's reminder sent (sent %ld, stale %ld)",
	   s.sent, s.stale);
	is_int(sq(&w, "SELECT count(*) FROM messages m JOIN contacts c ON c.id = m.contact_id "
		  "WHERE c.email = 'before@example.com' AND m.status = 'sent'"), 1,
	       "... the old shopper got only the reminder sent on time");
	world_close(&w);

	/* max_lateness_hours = 0: never stale */
	if (!ok(world_open(&w, "nostale") == 0, "nostale: world opens"))
		return;
	w.cfg.max_lateness_hours = 0;
	cart_dated(&w, "old@example.com", "old1", T0, T0 + 10 * DAY);
	tick(&w, T0 + 10 * DAY, &s);
	ok(s.sent == 1 && s.stale == 0, "max_lateness_hours = 0: a 10-day-old step is sent");
	world_close(&w);

	/* the "sending" state cannot be written (a full disk): nothing is sent */
	if (!ok(world_open(&w, "full") == 0, "full: world opens"))
		return;
	cart_dated(&w, "a@example.com", "fa", T0, T0);
	cart_dated(&w, "b@example.com", "fb", T0, T0);
	db_scalar(w.app.db, "CREATE TRIGGER full_before BEFORE UPDATE OF attempts ON messages "
		  "WHEN NEW.attempts > OLD.attempts BEGIN "
		  "SELECT RAISE(ABORT, 'database or disk is full'); END");
	ok(flow_tick(&w.app, T0 + HOUR + 60, &s) < 0,
	   "full: the \"sending\" state cannot be written: the tick stops");
	is_int(outbox_count(&w), 0, "... and nothing was sent");
	is_int(sq(&w, "SELECT count(*) FROM messages WHERE attempts = 0"), 2, "... nor counted");
	db_scalar(w.app.db, "DROP TRIGGER full_before");
	/* the outcome cannot be written: the tick stops after that message */
	db_scalar(w.app.db, "CREATE TRIGGER full_after BEFORE UPDATE OF status ON messages "
		  "WHEN NEW.status = 'sent' BEGIN "
		  "SELECT RAISE(ABORT, 'database or disk is full'); END");
	ok(flow_tick(&w.app, T0 + HOUR + 60 + 301, &s) < 0,
	   "full: the outcome of a sent message cannot be written: the tick stops");
	is_int(outbox_count(&w), 1, "... after that one message, not going on to the next");
	is_int(sq(&w, "SELECT count(*) FROM messages WHERE status = 'sending' AND attempts = 1 "
		  "AND message_id IS NOT NULL"), 1,
	       "... which is known to be in flight, with its Message-ID kept for the repeat");
	db_scalar(w.app.db, "DROP TRIGGER full_after");
	tick(&w, T0 + HOUR + 60 + 602, &s);
	ok(s.sent == 2 && outbox_count(&w) == 2, "full: with room again both are sent, "
	   "one file each (sent %ld)", s.sent);
	world_close(&w);
}

/* The review of issue 8, its sending side (M5, L2, M4). */
/* smtp_connections: 4 by default, 1 to 16, anything else refused with
 * the key's name and range (issue 10: parallel sending) */
static void test_send_connections(void)
{
	struct config cfg;
	char err[512] = "";
	unsetenv("REMARKET_SMTP_CONNECTIONS");
	if (cfg_load(&cfg, NULL, err, sizeof err) == 0) {
		is_int(cfg.smtp_connections, 4, "smtp_connections: 4 by default");
		cfg_free(&cfg);
	}
	const char *bad[] = {"0", "17"};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		setenv("REMARKET_SMTP_CONNECTIONS", bad[i], 1);
		err[0] = '\0';
		int rc = cfg_load(&cfg, NULL, err, sizeof err);
		ok(rc < 0 && contains(err, "smtp_connections") && contains(err, "1 to 16"),
		   "smtp_connections = %s is refused, naming the range (%s)", bad[i], err);
		if (rc == 0)
			cfg_free(&cfg);
	}
	setenv("REMARKET_SMTP_CONNECTIONS", "16", 1);
	if (cfg_load(&cfg, NULL, err, sizeof err) == 0) {
		is_int(cfg.smtp_connections, 16, "smtp_connections = 16 is taken");
		cfg_free(&cfg);
	}
	unsetenv("REMARKET_SMTP_CONNECTIONS");
}

/* url_shown: smtp_url without its password, for every message (issue 11) */
static void test_url_shown(void)
{
	static const char *const cases[][2] = {
		{"smtp://shop:s3cret@relay.example:587", "smtp://shop@relay.example:587"},
		{"smtps://shop:p%40ss@relay.example", "smtps://shop@relay.example"},
		{"smtp+starttls://u:pw@127.0.0.1:2525", "smtp+starttls://u@127.0.0.1:2525"},
		{"smtp://127.0.0.1:25", "smtp://127.0.0.1:25"},
		{"smtp://relay.example/", "smtp://relay.example/"},
		{"smtp://a:b@", "(smtp_url: not a URL)"},
		{"not a url with:pw@", "(smtp_url: not a URL)"},
	};
	char out[256];
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		url_shown(cases[i][0], out, sizeof out);
		ok(!strcmp(out, cases[i][1]), "url_shown(%s) is %s (%s)", cases[i][0],
		   cases[i][1], out);
	}
}

static void test_review_sending(void)
{
	struct world w;
	struct tick_summary s;

	/* M5: confirmation mails keep to the tick's budget */
	if (!ok(world_open(&w, "rs-confirm") == 0, "review sending: confirm world opens"))
		return;
	w.cfg.rate_ip_per_min = w.cfg.rate_visitor_per_min = 0;
	set_cfg(&w.cfg.browser_consent, "confirm");
	for (int i = 0; i < 3; i++) {
		char cookie[32], body[160];
		snprintf(cookie, sizeof cookie, "rm_vid=v-rsc%d", i);
		snprintf(body, sizeof body, "{\"type\":\"identify\",\"email\":"
			 "\"rsc%d@example.org\",\"consent\":true}", i);
		collect(&w, cookie, body, T0);
	}
	w.cfg.tick_budget_seconds = 0;
	ok(flow_tick(&w.app, T0 + 60, &s) == 0 && s.budget_spent == 1,
	   "M5: budget 0: the tick says its budget was spent");
	is_int(outbox_count(&w), 0, "M5: ... and sends no confirmation mail");
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE confirm_sent_at IS NULL "
		  "AND consent_pending = 1"), 3, "M5: ... all three wait, unmarked");
	w.cfg.tick_budget_seconds = 50;
	tick(&w, T0 + 120, &s);
	is_int(outbox_count(&w), 3, "M5: with a budget again the three go");
	world_close(&w);

	/* L4: a link planted at the outbox's temporary name is not followed */
	if (!ok(world_open(&w, "rs-link") == 0, "review sending: link world opens"))
		return;
	cart_dated(&w, "ln@example.com", "ln1", T0, T0);
	char victim[PATH_MAX], tmpname[PATH_MAX + 64], final[PATH_MAX + 64];
	snprintf(victim, sizeof victim, "%s/rs-link-victim", tmpdir);
	snprintf(tmpname, sizeof tmpname, "%s/m000001.eml.tmp%ld", w.outbox, (long)getpid());
	snprintf(final, sizeof final, "%s/m000001.eml", w.outbox);
	FILE *vf = fopen(victim, "w");
	if (vf) {
		fputs("victim", vf);
		fclose(vf);
	}
	mkdir(w.outbox, 0700);
	ok(symlink(victim, tmpname) == 0, "L4: a link planted at the outbox's temporary name");
	tick(&w, T0 + HOUR + 60, &s);
	is_int(s.sent, 1, "L4: the message is sent");
	char vbuf[64] = "";
	vf = fopen(victim, "r");
	if (vf) {
		if (!fgets(vbuf, sizeof vbuf, vf))
			vbuf[0] = '\0';
		fclose(vf);
	}
	is_str(vbuf, "victim", "L4: ... the file the link pointed to is untouched");
	struct stat lst;
	ok(lstat(final, &lst) == 0 && S_ISREG(lst.st_mode),
	   "L4: ... and the message is a file of its own, not the link");
	world_close(&w);
}

/* ==== Tick runs ======================================================= */

/* The tick's time budget and its recorded runs (POST /tick, /tick/<id>). */
static void test_tick_runs(void)
{
	struct world w;
	struct tick_summary s;
	struct http_resp rs;
	char bearer[128], path[64];
	if (!ok(world_open(&w, "tickrun") == 0, "tickrun: world opens"))
		return;
	is_int(w.cfg.smtp_connect_timeout, 10, "smtp_connect_timeout defaults to 10 s");
	is_int(w.cfg.smtp_reply_timeout, 30, "smtp_reply_timeout defaults to 30 s");
	is_int(w.cfg.tick_budget_seconds, 50, "tick_budget_seconds defaults to 50 s");
	for (int i = 0; i < 3; i++) {
		char email[64], cart[16];
		snprintf(email, sizeof email, "t%d@example.com", i);
		snprintf(cart, sizeof cart, "t%d", i);
		cart_event(&w, email, "T", cart, 1, T0);
	}
	rm_time now = T0 + HOUR;

	/* a spent budget: the tick enrolls, claims nothing, says so */
	w.cfg.tick_budget_seconds = 0;
	int rc = flow_tick(&w.app, now, &s);
	ok(rc == 0 && s.enrolled == 3 && s.sent == 0 && s.budget_spent == 1,
	   "budget 0: the tick enrolls 3, sends none, budget_spent (sent %ld, spent %d)",
	   s.sent, s.budget_spent);
	is_int(sq(&w, "SELECT count(*) FROM messages WHERE status='queued' AND attempts=0 "
		  "AND lease_until IS NULL"), 3,
	       "... the 3 messages wait for the next tick, no attempt counted, none claimed");
	w.cfg.tick_budget_seconds = 50;

	/* POST /tick without a sender (the unit tests' http_handle): the run
	 * happens in the request and is recorded */
	snprintf(bearer, sizeof bearer, "Bearer %s", w.cfg.tick_token);
	http(&w, "POST", "/tick", NULL, NULL, bearer, now, &rs);
	is_int(rs.status, 202, "POST /tick -> 202");
	ok(rs.body.data && contains(rs.body.data, "\"tick\":1,") &&
		   contains(rs.body.data, "\"state\":\"finished\"") &&
		   contains(rs.body.data, "\"sent\":3") &&
		   contains(rs.body.data, "\"budget_spent\":false"),
	   "... run 1 finished, sent the 3 that waited (%s)", rs.body.data ? rs.body.data : "");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT count(*) FROM ticks WHERE id=1 AND source='http' AND "
		  "finished_real IS NOT NULL AND json_extract(summary,'$.sent')=3"), 1,
	       "... recorded in ticks with its summary");

	http(&w, "GET", "/tick/1", NULL, NULL, bearer, now, &rs);
	ok(rs.status == 200 && rs.body.data && contains(rs.body.data, "\"state\":\"finished\"") &&
		   contains(rs.body.data, "\"now\":1795003600"),
	   "GET /tick/1 -> 200, finished, with its now (%d %s)", rs.status,
	   rs.body.data ? rs.body.data : "");
	http_resp_free(&rs);
	http(&w, "GET", "/tick/latest", NULL, NULL, bearer, now, &rs);
	ok(rs.status == 200 && rs.body.data && contains(rs.body.data, "\"tick\":1,"),
	   "GET /tick/latest -> run 1");
	http_resp_free(&rs);
	http(&w, "GET", "/tick/1", NULL, NULL, NULL, now, &rs);
	is_int(rs.status, 401, "GET /tick/1 without the bearer -> 401");
	http_resp_free(&rs);
	http(&w, "GET", "/tick/99", NULL, NULL, bearer, now, &rs);
	is_int(rs.status, 404, "GET /tick/99 -> 404");
	http_resp_free(&rs);
	const char *bad[] = {"/tick/x", "/tick/-1", "/tick/0", "/tick/1x",
			     "/tick/99999999999999999999", "/tick/+1"};
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		http(&w, "GET", bad[i], NULL, NULL, bearer, now, &rs);
		ok(rs.status == 400, "GET %s -> 400 (%d)", bad[i], rs.status);
		http_resp_free(&rs);
	}
	http(&w, "POST", "/tick/1", NULL, NULL, bearer, now, &rs);
	is_int(rs.status, 405, "POST /tick/1 -> 405");
	http_resp_free(&rs);

	/* a run of a live process that has not ended is running: a POST gets
	 * its id and starts nothing */
	long long run = sq(&w, "INSERT INTO ticks (now, source, pid, started_real) "
			   "VALUES (%lld, 'http', %lld, %lld) RETURNING id",
			   (long long)now, (long long)getpid(), (long long)time(NULL));
	http(&w, "POST", "/tick", NULL, NULL, bearer, now + 60, &rs);
	snprintf(path, sizeof path, "\"tick\":%lld,", run);
	ok(rs.status == 202 && rs.body.data && contains(rs.body.data, path) &&
		   contains(rs.body.data, "\"state\":\"running\""),
	   "POST /tick while run %lld runs -> 202 with its id (%s)", run,
	   rs.body.data ? rs.body.data : "");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT count(*) FROM ticks"), 2, "... and no second run");

	/* a run whose process is gone, or older than a tick can be, was lost */
	pid_t dead = fork();
	if (dead == 0)
		_exit(0);
	waitpid(dead, NULL, 0);
	sq(&w, "UPDATE ticks SET pid=%lld WHERE id=%lld", (long long)dead, run);
	snprintf(path, sizeof path, "/tick/%lld", run);
	http(&w, "GET", path, NULL, NULL, bearer, now, &rs);
	ok(rs.status == 200 && rs.body.data && contains(rs.body.data, "\"state\":\"lost\""),
	   "a run whose process died -> lost (%s)", rs.body.data ? rs.body.data : "");
	http_resp_free(&rs);
	sq(&w, "UPDATE ticks SET pid=%lld, started_real=%lld WHERE id=%lld",
	   (long long)getpid(), (long long)time(NULL) - 86400, run);
	http(&w, "GET", path, NULL, NULL, bearer, now, &rs);
	ok(rs.status == 200 && rs.body.data && contains(rs.body.data, "\"state\":\"lost\""),
	   "a run older than budget + SMTP time-outs -> lost");
	http_resp_free(&rs);
	http(&w, "POST", "/tick", NULL, NULL, bearer, now + 60, &rs);
	ok(rs.status == 202 && rs.body.data && contains(rs.body.data, "\"tick\":3,") &&
		   contains(rs.body.data, "\"state\":\"finished\""),
	   "POST /tick after a lost run starts run 3 (%s)", rs.body.data ? rs.body.data : "");
	http_resp_free(&rs);

	/* only the last 10000 runs are kept */
	sq(&w, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 10005) "
	   "INSERT INTO ticks (now, source, pid, started_real, finished_real) "
	   "SELECT %lld, 'cli', 1, 1, 1 FROM n", (long long)now);
	http(&w, "POST", "/tick", NULL, NULL, bearer, now + 120, &rs);
	is_int(rs.status, 202, "POST /tick with 10008 runs recorded -> 202");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT count(*) FROM ticks"), 10000, "... the table keeps the last 10000");
	world_close(&w);
}

/* ==== Feedback: bounces, complaints, unsubscribes by mail ============= */

/* A DSN as Postfix writes one (folded Content-Type, a text part, the
 * status, the returned message) to TO about the message MSGID; B64: the
 * delivery status part in base64. */
static void fb_dsn_mail(struct buf *b, const char *to, const char *action,
			const char *status, const char *msgid, int b64)
{
	char ds[600], enc[900];
	snprintf(ds, sizeof ds, "Reporting-MTA: dns; mx.example.net\r\n"
		 "Arrival-Date: Tue,  1 Dec 2026 10:27:39 +0000 (UTC)\r\n\r\n"
		 "Final-Recipient: rfc822; someone@example.net\r\n"
		 "Original-Recipient: rfc822;someone@example.net\r\n"
		 "Action: %s\r\nStatus: %s\r\n"
		 "Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n", action, status);
	if (b64)
		sodium_bin2base64(enc, sizeof enc, (const unsigned char *)ds,
				  strlen(ds), sodium_base64_VARIANT_ORIGINAL);
	buf_reset(b);
	buf_addf(b, "From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\r\n"
		 "Subject: Undelivered Mail Returned to Sender\r\n"
		 "To: %s\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
		 "Content-Type: multipart/report; report-type=delivery-status;\r\n"
		 "\tboundary=\"B1.17/mx.example.net\"\r\n\r\n"
		 "This is a MIME-encapsulated message.\r\n\r\n"
		 "--B1.17/mx.example.net\r\nContent-Type: text/plain\r\n\r\n"
		 "I'm sorry to have to inform you...\r\n\r\n"
		 "--B1.17/mx.example.net\r\nContent-Type: message/delivery-status\r\n"
		 "%s\r\n%s\r\n"
		 "--B1.17/mx.example.net\r\nContent-Type: text/rfc822-headers\r\n\r\n"
		 "From: Maison Demo <shop@example.com>\r\nMessage-ID: %s\r\n"
		 "Subject: Your cart\r\n\r\n--B1.17/mx.example.net--\r\n",
		 to, b64 ? "Content-Transfer-Encoding: base64\r\n" : "",
		 b64 ? enc : ds, msgid);
}

/* An ARF report (RFC 5965's example, with our addresses). */
static void fb_arf_mail(struct buf *b, const char *type, const char *mailfrom,
			const char *msgid)
{
	buf_reset(b);
	buf_addf(b, "From: <abusedesk@example.net>\r\nTo: <fbl@shop.example>\r\n"
		 "Subject: FW: Your cart\r\nMIME-Version: 1.0\r\n"
		 "Content-Type: multipart/report; report-type=feedback-report;\r\n"
		 "     boundary=\"part1_13d.2e68ed54_boundary\"\r\n\r\n"
		 "--part1_13d.2e68ed54_boundary\r\n"
		 "Content-Type: text/plain; charset=\"US-ASCII\"\r\n\r\n"
		 "This is an email abuse report.\r\n\r\n"
		 "--part1_13d.2e68ed54_boundary\r\n"
		 "Content-Type: message/feedback-report\r\n\r\n"
		 "Feedback-Type: %s\r\nUser-Agent: SomeGenerator/1.0\r\nVersion: 1\r\n"
		 "Original-Mail-From: <%s>\r\nOriginal-Rcpt-To: <someone@example.net>\r\n"
		 "Arrival-Date: Thu, 8 Mar 2005 14:00:00 EDT\r\n\r\n"
		 "--part1_13d.2e68ed54_boundary\r\nContent-Type: message/rfc822\r\n"
		 "Content-Disposition: inline\r\n\r\n"
		 "From: Maison Demo <shop@example.com>\r\nMessage-ID: %s\r\n"
		 "Subject: Your cart\r\n\r\nHello\r\n"
		 "--part1_13d.2e68ed54_boundary--\r\n", type, mailfrom, msgid);
}

static enum fb_kind fb_run(struct world *w, const struct buf *mail,
			   const char *rcpt, rm_time now, int *applied,
			   char *what, size_t n)
{
	struct fb_event ev;
	enum fb_kind k = fb_mail_parse(&w->app, mail->data, mail->len, rcpt, &ev,
				       what, n);
	*applied = k == FB_NONE ? -9 : fb_apply(&w->app, &ev, now, what, n);
	return k;
}

static void test_feedback_verp(struct world *w)
{
	char s[320], t[320];
	int64_t id = 0;
	set_cfg(&w->cfg.bounce_address, "");
	ok(verp_sender(&w->app, 42, s, sizeof s) == 0 &&
	   !strcmp(s, "shop@example.com"), "verp: without bounce_address the "
	   "envelope sender is the from address (%s)", s);
	set_cfg(&w->cfg.bounce_address, "bounces@shop.example");
	ok(verp_sender(&w->app, 42, s, sizeof s) == 0 &&
	   !strncmp(s, "bounces+42.", 11) && strlen(s) == 11 + 16 + 13 &&
	   contains(s, "@shop.example"), "verp: bounces+42.<16 hex>@shop.example (%s)", s);
	ok(verp_parse(&w->app, s, &id) == 0 && id == 42, "verp: the tag gives its message");
	for (size_t i = 0; i < strlen(s); i++)
		t[i] = (char)toupper((unsigned char)s[i]);
	t[strlen(s)] = '\0';
	id = 0;
	ok(verp_parse(&w->app, t, &id) == 0 && id == 42,
	   "verp: a relay that upper-cases the address changes nothing");
	snprintf(t, sizeof t, "Bounces <%s>", s);
	ok(verp_parse(&w->app, t, &id) == 0, "verp: in angle brackets too");
	snprintf(t, sizeof t, "%s", s);
	t[20] = t[20] == 'a' ? 'b' : 'a';
	ok(verp_parse(&w->app, t, &id) < 0, "verp: a forged tag is refused");
	snprintf(t, sizeof t, "bounces+43.%s", s + 11);
	ok(verp_parse(&w->app, t, &id) < 0, "verp: another message's id with this MAC is refused");
	snprintf(t, sizeof t, "%.*s@other.example", (int)(strchr(s, '@') - s), s);
	ok(verp_parse(&w->app, t, &id) < 0, "verp: another domain is refused");
	ok(verp_parse(&w->app, "bounces+42@shop.example", &id) < 0 &&
	   verp_parse(&w->app, "bounces@shop.example", &id) < 0 &&
	   verp_parse(&w->app, "", &id) < 0, "verp: no tag, or a tag without MAC, is refused");
	ok(verp_sender(&w->app, -3, s, sizeof s) == 0 && !strcmp(s, "shop@example.com"),
	   "verp: a mail that is no message row (a confirmation) is not tagged");
}

static void test_feedback(void)
{
	struct world w;
	struct tick_summary sum = {0};
	struct buf m = {0};
	char what[400], vs[320], mid[256];
	int applied;
	if (!ok(world_open(&w, "feedback") == 0, "feedback: world opens"))
		return;
	test_feedback_verp(&w);
	/* four carts abandoned; the first step goes to each: messages 1-4 */
	const char *who[] = {"ann@example.net", "bob@example.net", "cy@example.net",
			     "dee@example.net"};
	for (int i = 0; i < 4; i++) {
		char cart[16];
		snprintf(cart, sizeof cart, "fb%d", i);
		cart_event(&w, who[i], "Shopper", cart, 1, T0);
	}
	tick(&w, T0 + 2 * HOUR, &sum);
	is_int(sq(&w, "SELECT count(*) FROM messages WHERE status = 'sent'"), 4,
	       "feedback: four first steps sent");
	long long ann = sq(&w, "SELECT id FROM messages WHERE contact_id = "
			   "(SELECT id FROM contacts WHERE email = 'ann@example.net')");

	/* a hard bounce to the VERP address */
	verp_sender(&w.app, ann, vs, sizeof vs);
	fb_dsn_mail(&m, vs, "failed", "5.1.1", "<unknown@mx>", 0);
	is_int(fb_run(&w, &m, NULL, T0 + 3 * HOUR, &applied, what, sizeof what),
	       FB_HARD, "dsn: Action failed, Status 5.1.1 is a hard bounce");
	is_int(applied, 0, "dsn: applied by its VERP tag");
	ok(contains(what, "hard bounce 5.1.1") && contains(what, "suppressed"),
	   "dsn: says what it did");
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE email = 'ann@example.net' "
		  "AND suppressed_at IS NOT NULL AND suppress_reason = 'bounce 5.1.1'"), 1,
	       "dsn: the contact is suppressed, with the status as the reason");
	fb_run(&w, &m, NULL, T0 + 4 * HOUR, &applied, what, sizeof what);
	is_int(applied, 1, "dsn: the same bounce again is left alone");
	is_int(sq(&w, "SELECT count(*) FROM feedback"), 1, "dsn: and counted once");
	/* the envelope recipient given on the command line counts too */
	fb_dsn_mail(&m, "postmaster@shop.example", "failed", "5.1.1", "<x@y>", 1);
	struct fb_event ev;
	is_int(fb_mail_parse(&w.app, m.data, m.len, vs, &ev, what, sizeof what),
	       FB_HARD, "dsn: a base64 delivery-status part is read");
	is_int(ev.message, ann, "dsn: the recipient argument's VERP tag names the message");
	is_str(ev.email, "someone@example.net", "dsn: Final-Recipient is read");

	/* a forged tag, no Message-ID of ours: nobody is suppressed */
	char forged[320];
	long long bob = ann + 1;
	verp_sender(&w.app, bob, forged, sizeof forged);
	forged[strlen("bounces+") + 3] ^= 1;
	fb_dsn_mail(&m, forged, "failed", "5.1.1", "<not-ours@example.net>", 0);
	fb_run(&w, &m, NULL, T0 + 3 * HOUR, &applied, what, sizeof what);
	is_int(applied, 1, "dsn: a forged tag is left alone");
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE suppressed_at IS NOT NULL"), 1,
	       "dsn: ... and nobody else is suppressed");

	/* soft bounces by our Message-ID: the third in 14 days suppresses */
	char *bmid = sq_text(&w, "SELECT message_id FROM messages WHERE contact_id = "
			     "(SELECT id FROM contacts WHERE email = 'bob@example.net')");
	snprintf(mid, sizeof mid, "%s", bmid ? bmid : "");
	free(bmid);
	fb_dsn_mail(&m, "bounces@shop.example", "delayed", "4.4.1", mid, 0);
	is_int(fb_run(&w, &m, NULL, T0 + 3 * HOUR, &applied, what, sizeof what),
	       FB_NONE, "dsn: a delay warning is not a bounce");
	ok(contains(what, "delayed"), "dsn: ... and says so");
	fb_dsn_mail(&m, "bounces@shop.example", "failed", "4.2.2", mid, 0);
	is_int(fb_run(&w, &m, NULL, T0 + 3 * HOUR, &applied, what, sizeof what),
	       FB_SOFT, "dsn: failed with 4.2.2 is a soft bounce");
	is_int(applied, 0, "dsn: found by our Message-ID in the returned headers");
	/* steps 2 and 3 go out too, then soft bounces of those by their tags */
	tick(&w, T0 + 26 * HOUR, &sum);
	tick(&w, T0 + 74 * HOUR, &sum);
	struct fb_event soft = {.kind = FB_SOFT, .source = "mail"};
	snprintf(soft.status, sizeof soft.status, "4.2.2");
	soft.message = sq(&w, "SELECT m.id FROM messages m JOIN contacts c ON c.id = "
			  "m.contact_id WHERE c.email = 'bob@example.net' AND m.step = 2");
	fb_apply(&w.app, &soft, T0 + 2 * DAY, what, sizeof what);
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE email = 'bob@example.net' "
		  "AND suppressed_at IS NULL"), 1, "soft: two soft bounces do not suppress");
	soft.message = sq(&w, "SELECT m.id FROM messages m JOIN contacts c ON c.id = "
			  "m.contact_id WHERE c.email = 'bob@example.net' AND m.step = 3");
	fb_apply(&w.app, &soft, T0 + 13 * DAY, what, sizeof what);
	ok(contains(what, "has 3 in 14 days: suppressed"),
	   "soft: the third within 14 days suppresses (%s)", what);
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE email = 'bob@example.net' "
		  "AND suppress_reason = '3 soft bounces in 14 days (last 4.2.2)'"), 1,
	       "soft: the reason says so");
	for (int step = 1; step <= 3; step++) {
		soft.message = sq(&w, "SELECT m.id FROM messages m JOIN contacts c ON "
				  "c.id = m.contact_id WHERE c.email = 'dee@example.net' "
				  "AND m.step = %d", step);
		fb_apply(&w.app, &soft, T0 + (step == 1 ? 3 * HOUR : (14 + step) * DAY),
			 what, sizeof what);
	}
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE email = 'dee@example.net' "
		  "AND suppressed_at IS NULL"), 1,
	       "soft: three, the first 16 days before the third, do not suppress");
	is_int(sq(&w, "SELECT count(*) FROM feedback WHERE kind = 'soft'"), 6,
	       "soft: each recorded");

	/* a complaint (ARF) with the VERP tag in Original-Mail-From */
	long long cy = sq(&w, "SELECT id FROM messages WHERE contact_id = "
			  "(SELECT id FROM contacts WHERE email = 'cy@example.net')");
	verp_sender(&w.app, cy, vs, sizeof vs);
	fb_arf_mail(&m, "not-spam", vs, "<x@y>");
	is_int(fb_run(&w, &m, NULL, T0 + 3 * HOUR, &applied, what, sizeof what),
	       FB_NONE, "arf: not-spam is not a complaint");
	fb_arf_mail(&m, "abuse", vs, "<x@y>");
	is_int(fb_run(&w, &m, NULL, T0 + 3 * HOUR, &applied, what, sizeof what),
	       FB_COMPLAINT, "arf: Feedback-Type abuse is a complaint");
	is_int(applied, 0, "arf: applied");
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE email = 'cy@example.net' "
		  "AND unsubscribed_at IS NOT NULL AND suppress_reason = 'complaint'"), 1,
	       "arf: the contact is unsubscribed and suppressed");
	ok(contains(what, "step 1 paused"), "arf: 1 complaint of 4 sends pauses the step");
	is_int(sq(&w, "SELECT count(*) FROM steps WHERE paused_at IS NOT NULL "
		  "AND paused_reason LIKE 'complaints: 1 of 4 sends%%'"), 1,
	       "arf: the step is paused, the reason names the rate");
	struct buf warn = {0};
	is_int(feedback_complaint_warnings(&w.app, T0 + 3 * HOUR, &warn), 1,
	       "warnings: one step over 0.1 %");
	ok(contains(warn.data, "step 1: 1 complaints of 4 sends") &&
	   contains(warn.data, "paused"), "warnings: names the step (%s)", vis(warn.data));
	buf_reset(&warn);
	is_int(feedback_complaint_warnings(&w.app, T0 + 9 * DAY, &warn), 0,
	       "warnings: none once the sends are older than 7 days");
	buf_reset(&warn);
	struct buf stext = {0};
	check_run(&w.app, T0 + 3 * HOUR, CHECK_STATUS, &warn, NULL, &stext);
	ok(contains(warn.data, "{\"name\":\"complaints\",\"level\":\"warn\"") &&
	   contains(stext.data, "1 step drew spam complaints over 0.1 %") &&
	   contains(stext.data, "step 1: 1 complaints of 4 sends"),
	   "status: the complaints check warns and names the step (%s)", vis(stext.data));
	buf_reset(&warn);
	buf_reset(&stext);
	check_run(&w.app, T0 + 9 * DAY, CHECK_STATUS, &warn, NULL, &stext);
	ok(contains(warn.data, "{\"name\":\"complaints\",\"level\":\"ok\""),
	   "status: ... and is ok once the sends are older than 7 days");
	buf_free(&stext);
	buf_free(&warn);

	/* the report: per step bounced and complained, of the sent */
	struct report *r = calloc(1, sizeof *r);
	if (r && report_build(&w.app, T0 - DAY, T0 + DAY, r) == 0 && r->nflows > 0) {
		const struct flow_report *f = &r->flows[0];
		is_int(f->steps[0].bounced, 3, "report: step 1 bounced 3 (ann hard, bob and dee soft)");
		is_int(f->steps[0].complained, 1, "report: step 1 complained 1");
		ok(fabs(f->steps[0].complaint_rate - 0.25) < 1e-9 &&
		   fabs(f->complaint_rate - 0.25) < 1e-9,
		   "report: complaint rate 1 of 4 for the step and the flow");
		struct buf j = {0};
		report_json(r, &j);
		ok(contains(j.data, "\"complaint_rate\":0.2500") &&
		   contains(j.data, "\"bounce_rate\":0.7500"), "report: in the JSON");
		buf_free(&j);
	} else {
		ok(0, "report: builds");
	}
	free(r);

	/* a mail to unsubscribe_mailto */
	set_cfg(&w.cfg.unsubscribe_mailto, "unsubscribe@shop.example");
	buf_reset(&m);
	buf_adds(&m, "From: Dee <DEE@example.net>\r\nTo: unsubscribe@shop.example\r\n"
		 "Subject: unsubscribe\r\n\r\n");
	is_int(fb_run(&w, &m, NULL, T0 + 3 * HOUR, &applied, what, sizeof what),
	       FB_UNSUB, "mailto: a mail to unsubscribe_mailto unsubscribes");
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE email = 'dee@example.net' "
		  "AND unsubscribed_at IS NOT NULL AND suppressed_at IS NULL"), 1,
	       "mailto: its From is unsubscribed, not suppressed");
	buf_reset(&m);
	buf_adds(&m, "From: ann@example.net\r\nTo: unsubscribe@shop.example\r\n"
		 "Auto-Submitted: auto-replied\r\nSubject: Out of office\r\n\r\n");
	is_int(fb_run(&w, &m, NULL, T0 + 3 * HOUR, &applied, what, sizeof what),
	       FB_NONE, "mailto: an automatic reply is left alone");
	buf_reset(&m);
	buf_adds(&m, "From: ann@example.net\r\nTo: someone@shop.example\r\n\r\nhi\r\n");
	is_int(fb_run(&w, &m, NULL, T0, &applied, what, sizeof what), FB_NONE,
	       "other mail is left alone");
	ok(contains(what, "not a delivery status notification"), "... saying why");
	buf_free(&m);
	world_close(&w);
}

/* POST /feedback: remarket's signed format, Mailgun, Postmark. */
static void test_feedback_http(void)
{
	struct world w;
	struct tick_summary sum = {0};
	struct http_resp rs;
	char sig[200], body[1200];
	if (!ok(world_open(&w, "feedback-http") == 0, "feedback http: world opens"))
		return;
	cart_event(&w, "eve@example.net", "Eve", "h1", 1, T0);
	cart_event(&w, "fay@example.net", "Fay", "h2", 1, T0);
	cart_event(&w, "gus@example.net", "Gus", "h3", 1, T0);
	tick(&w, T0 + 2 * HOUR, &sum);
	const char *rb = "[{\"type\":\"hard_bounce\",\"email\":\"eve@example.net\","
			 "\"status\":\"5.1.1\"}]";
	hook_sign(HOOK_SECRET, T0, rb, strlen(rb), sig, sizeof sig);
	http(&w, "POST", "/feedback", rb, "t=1,v1=00", NULL, T0, &rs);
	is_int(rs.status, 401, "feedback http: a forged signature is 401");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT count(*) FROM feedback"), 0, "... and changes nothing");
	http(&w, "POST", "/feedback", rb, sig, NULL, T0, &rs);
	is_int(rs.status, 200, "feedback http: remarket's signed format is 200");
	is_str(rs.body.data, "{\"applied\":1,\"left_alone\":0}", "... one applied");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE email = 'eve@example.net' "
		  "AND suppressed_at IS NOT NULL"), 1, "... eve is suppressed");
	is_int(sq(&w, "SELECT count(*) FROM feedback WHERE source = 'remarket' "
		  "AND message IS NOT NULL"), 1, "... counted against her last message");
	const char *bad = "{\"type\":\"bounced\",\"email\":\"eve@example.net\"}";
	hook_sign(HOOK_SECRET, T0, bad, strlen(bad), sig, sizeof sig);
	http(&w, "POST", "/feedback", bad, sig, NULL, T0, &rs);
	is_int(rs.status, 400, "feedback http: an unknown type is 400");
	ok(contains(rs.body.data, "events[0]: type"), "... naming it");
	http_resp_free(&rs);

	/* Mailgun: HMAC-SHA256(signing key, timestamp token) */
	set_cfg(&w.cfg.mailgun_signing_key, "key-mailgun-test");
	char *fmid = sq_text(&w, "SELECT message_id FROM messages WHERE contact_id = "
			     "(SELECT id FROM contacts WHERE email = 'fay@example.net')");
	unsigned char mac[crypto_auth_hmacsha256_BYTES];
	char hex[2 * sizeof mac + 1];
	crypto_auth_hmacsha256_state st;
	crypto_auth_hmacsha256_init(&st, (const unsigned char *)"key-mailgun-test", 16);
	char signed_part[64];
	snprintf(signed_part, sizeof signed_part, "%lldtok123", (long long)T0);
	crypto_auth_hmacsha256_update(&st, (const unsigned char *)signed_part,
				      strlen(signed_part));
	crypto_auth_hmacsha256_final(&st, mac);
	sodium_bin2hex(hex, sizeof hex, mac, sizeof mac);
	/* Mailgun gives the Message-ID without its angle brackets */
	snprintf(body, sizeof body, "{\"signature\":{\"timestamp\":\"%lld\","
		 "\"token\":\"tok123\",\"signature\":\"%s\"},\"event-data\":{\"event\":"
		 "\"complained\",\"recipient\":\"fay@example.net\",\"message\":"
		 "{\"headers\":{\"message-id\":\"%.*s\"}}}}", (long long)T0, hex,
		 fmid ? (int)strlen(fmid) - 2 : 0, fmid ? fmid + 1 : "");
	free(fmid);
	http(&w, "POST", "/feedback/mailgun", body, NULL, NULL, T0, &rs);
	is_int(rs.status, 200, "mailgun: a signed complaint is 200");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT count(*) FROM feedback f JOIN messages m ON m.id = f.message "
		  "JOIN contacts c ON c.id = m.contact_id WHERE c.email = 'fay@example.net' "
		  "AND f.kind = 'complaint' AND f.source = 'mailgun'"), 1,
	       "mailgun: counted against her message, found by Message-ID");
	http(&w, "POST", "/feedback/mailgun", body, NULL, NULL, T0 + 60, &rs);
	ok(rs.status == 403 && contains(buf_str_or(&rs.body), "used before"),
	   "mailgun: the same signed token again is 403 (its signature does not "
	   "cover the event: a replay could carry anyone's address)");
	http_resp_free(&rs);
	http(&w, "POST", "/feedback/mailgun", body, NULL, NULL, T0 + 301, &rs);
	ok(rs.status == 403 && contains(buf_str_or(&rs.body), "5 minutes"),
	   "mailgun: a signature over 5 minutes old is 403");
	http_resp_free(&rs);
	char *p = strstr(body, hex);
	p[0] = p[0] == '0' ? '1' : '0';
	http(&w, "POST", "/feedback/mailgun", body, NULL, NULL, T0, &rs);
	is_int(rs.status, 403, "mailgun: a forged signature is 403");
	http_resp_free(&rs);
	http(&w, "POST", "/feedback/mailgun", "{\"event-data\":{}}", NULL, NULL, T0, &rs);
	is_int(rs.status, 401, "mailgun: no signature is 401");
	http_resp_free(&rs);

	/* Postmark: Basic auth */
	set_cfg(&w.cfg.postmark_webhook_auth, "pm:s3cret");
	const char *pb = "{\"RecordType\":\"Bounce\",\"Type\":\"SoftBounce\","
			 "\"TypeCode\":4096,\"Email\":\"gus@example.net\"}";
	http(&w, "POST", "/feedback/postmark", pb, NULL, NULL, T0, &rs);
	is_int(rs.status, 401, "postmark: no credentials is 401");
	ok(contains(resp_header(&rs, "WWW-Authenticate"), "Basic"), "... asking for Basic");
	http_resp_free(&rs);
	http(&w, "POST", "/feedback/postmark", pb, NULL, "Basic cG06d3Jvbmc=", T0, &rs);
	is_int(rs.status, 403, "postmark: a wrong password is 403");
	http_resp_free(&rs);
	http(&w, "POST", "/feedback/postmark", pb, NULL, "Basic cG06czNjcmV0", T0, &rs);
	is_int(rs.status, 200, "postmark: the right one is 200");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT count(*) FROM feedback WHERE kind = 'soft' "
		  "AND source = 'postmark' AND status = 'SoftBounce'"), 1,
	       "postmark: a SoftBounce is a soft bounce");
	http(&w, "POST", "/feedback/postmark", "{\"RecordType\":\"Delivery\","
	     "\"Email\":\"gus@example.net\"}", NULL, "Basic cG06czNjcmV0", T0, &rs);
	is_int(rs.status, 200, "postmark: another event is 200 (no retries)");
	is_str(rs.body.data, "{\"applied\":0,\"left_alone\":0}", "... and nothing applied");
	http_resp_free(&rs);
	http(&w, "POST", "/feedback/sendgrid", "{}", NULL, NULL, T0, &rs);
	is_int(rs.status, 404, "feedback http: an unknown service is 404");
	http_resp_free(&rs);
	world_close(&w);
}

/* ==== The report ====================================================== */

static void test_stats(void)
{
	is_int(rm_bucket("holdout:1:ann@example.com"), rm_bucket("holdout:1:ann@example.com"),
	       "rm_bucket is stable");
	ok(rm_bucket("a") >= 0 && rm_bucket("a") < 10000, "rm_bucket is in [0, 10000)");
	int held = 0;
	char key[96];
	for (int i = 0; i < 10000; i++) {
		snprintf(key, sizeof key, "holdout:1:shopper%d@example.com", i);
		held += rm_bucket(key) < 1000;
	}
	ok(held > 1000 - 90 && held < 1000 + 90,
	   "a 10 %% holdout over 10 000 contacts holds out %d (within 3 sigma of 1000)", held);

	/* worked by hand: p1 = 60/500 = .12, p2 = 5/100 = .05, diff .07;
	 * se = sqrt(.12*.88/500 + .05*.95/100) = sqrt(.0006862) = .0261954;
	 * 1.96 se = .0513420: interval .018658 .. .121342 */
	struct lift l;
	stat_lift(60, 500, 5, 100, &l);
	near(l.p1, 0.12, 1e-9, "stat_lift: treated rate");
	near(l.p2, 0.05, 1e-9, "stat_lift: control rate");
	near(l.diff, 0.07, 1e-9, "stat_lift: difference");
	near(l.lo, 0.018658, 1e-5, "stat_lift: lower bound of the 95 % interval");
	near(l.hi, 0.121342, 1e-5, "stat_lift: upper bound of the 95 % interval");
	ok(!l.too_small, "stat_lift: 500 and 100 people are enough");
	stat_lift(3, 29, 1, 100, &l);
	ok(l.too_small, "stat_lift: 29 in a group is too small to tell");
	stat_lift(2, 100, 2, 100, &l);
	ok(l.too_small, "stat_lift: 4 conversions in all is too small to tell");
	stat_lift(0, 0, 0, 0, &l);
	ok(l.too_small && l.diff == 0 && l.lo == 0 && l.hi == 0, "stat_lift: empty groups give zeros");
}

static void test_attribution(void)
{
	struct world w;
	struct tick_summary s;
	if (!ok(world_open(&w, "attribution") == 0, "attribution: world opens"))
		return;
	const char *who[] = {"a@example.com", "b@example.com", "c@example.com",
			     "d@example.com", "e@example.com"};
	const char *carts[] = {"ca", "cb", "cc", "cd", "ce"};
	for (int i = 0; i < 5; i++)
		cart_event(&w, who[i], "X", carts[i], 1, T0);
	tick(&w, T0 + HOUR, &s);       /* step 1 to all five */
	tick(&w, T0 + DAY, &s);        /* step 2 to all five */
	long long m1[5], m2[5];
	char q[200];
	for (int i = 0; i < 5; i++) {
		snprintf(q, sizeof q, "SELECT m.id FROM messages m JOIN contacts c ON "
			 "c.id = m.contact_id WHERE c.email = '%s' AND m.step = 1", who[i]);
		m1[i] = db_scalar(w.app.db, q);
		snprintf(q, sizeof q, "SELECT m.id FROM messages m JOIN contacts c ON "
			 "c.id = m.contact_id WHERE c.email = '%s' AND m.step = 2", who[i]);
		m2[i] = db_scalar(w.app.db, q);
	}
	ok(m1[4] > 0 && m2[4] > 0, "attribution: two messages sent to each of five");

	/* a: click on step 1, order 2 days later: click, to step 1 */
	is_int(click(&w, m1[0], T0 + 2 * HOUR), 302, "a clicks the step 1 link");
	order(&w, "oa", who[0], NULL, 50, T0 + 2 * HOUR + 2 * DAY);
	is_attr(&w, "oa", "click", m1[0], "click then order within 5 days: click, to that message");

	/* b: clicks on both steps: the last qualifying message wins */
	click(&w, m1[1], T0 + 2 * HOUR);
	click(&w, m2[1], T0 + DAY + HOUR);
	order(&w, "ob", who[1], NULL, 60, T0 + DAY + 2 * HOUR);
	is_attr(&w, "ob", "click", m2[1], "two clicked messages: the last one gets the order");

	/* c: no click, order 5 hours after step 2: influenced */
	order(&w, "oc", who[2], NULL, 70, T0 + DAY + 5 * HOUR);
	is_attr(&w, "oc", "influenced", m2[2], "no click, order within 24 h of a send: influenced");

	/* d: click on step 1, order 6 days later, no send in the last 24 h */
	click(&w, m1[3], T0 + 2 * HOUR);
	order(&w, "od", who[3], NULL, 80, T0 + 2 * HOUR + 6 * DAY);
	is_attr(&w, "od", "none", 0, "order outside the click window and the view window: not attributed");

	/* e: step 3 gives a code; an order redeems it without any click */
	tick(&w, T0 + 3 * DAY, &s);
	snprintf(q, sizeof q, "SELECT m.id FROM messages m JOIN contacts c ON "
		 "c.id = m.contact_id WHERE c.email = '%s' AND m.step = 3", who[4]);
	long long m3 = db_scalar(w.app.db, q);
	snprintf(q, sizeof q, "SELECT discount_code FROM messages WHERE id = %lld", m3);
	char *code = sq_text(&w, q);
	ok(code != NULL, "e got a code in step 3");
	order(&w, "oe", "someone-else@example.com", code, 90, T0 + 4 * DAY + 3 * HOUR);
	is_attr(&w, "oe", "code", m3, "a redeemed code attributes the order to its message, even without a click");
	free(code);
	/* the same order again: still attributed once */
	order(&w, "oa", who[0], NULL, 50, T0 + 5 * DAY);
	is_int(sq(&w, "SELECT count(*) FROM orders WHERE order_key = 'oa'"), 1,
	       "a repeated order event is one order, attributed once");

	/* the report over this world */
	struct report *r = calloc(1, sizeof *r);
	struct buf json = {0}, html = {0};
	report_build(&w.app, T0 - DAY, T0 + 7 * DAY, r);
	is_int(r->orders, 5, "report: 5 orders");
	is_int(r->attributed, 3, "report: 3 attributed (click a, click b, code e)");
	is_int(r->influenced, 1, "report: 1 influenced (c)");
	/* recovered: a cart ordered within 7 days of enrolling, clicked or
	 * not (a, b, c, d); e's code went to someone else's order, so her
	 * cart stays abandoned. Attributed: a click or a code (a, b, e). */
	near(r->recovered_revenue, 50 + 60 + 70 + 80, 1e-9,
	     "report: recovered revenue 260 (the carts of a, b, c and d)");
	near(r->attributed_revenue, 50 + 60 + 90, 1e-9,
	     "report: attributed revenue 200 (a and b clicked, e's code)");
	is_int(r->recovered, 4, "report: 4 recovered carts, the same ones");
	is_int(r->abandoned, 5, "report: 5 abandoned carts enrolled");
	/* step 3 went to e only: a-d had ordered (d's order was recorded first) */
	is_int(r->sent, 11, "report: 11 emails sent (5 + 5 + 1)");
	near(r->discount_cost, 90.0 * 10 / 90, 1e-6, "report: discount cost 10 on a 90 order at 10 %");
	report_json(r, &json);
	report_html(r, "Test shop", &html);
	ok(contains(json.data, "\"recovered_revenue\":260.00") &&
		   contains(html.data, "data-k=\"recovered_revenue\" data-v=\"260.0000\"") &&
		   contains(json.data, "\"attributed_revenue\":200.00") &&
		   contains(html.data, "data-k=\"attributed_revenue\" data-v=\"200.0000\""),
	   "report: JSON and HTML carry the same recovered and attributed revenue");
	ok(contains(json.data, "\"orders\":5") && contains(html.data, "<svg"),
	   "report: the HTML has its inline SVG chart");
	buf_free(&json);
	buf_free(&html);
	free(r);
	world_close(&w);
}

static void test_nulls(void)
{
	struct world w;
	struct ev_error err;
	if (!ok(world_open(&w, "nulls") == 0, "nulls: world opens"))
		return;
	is_int(ingest(&w, EV_HOOK, "{\"type\":\"order\",\"order_id\":\"n1\","
		      "\"email\":\"n@example.com\",\"total\":10,\"discount_code\":null,"
		      "\"cart_id\":null,\"items\":null}", T0, &err), 1,
	       "an optional field sent as null is taken as not given");
	is_int(ingest(&w, EV_HOOK, "{\"type\":\"identify\",\"email\":null}", T0, &err), -1,
	       "a required field sent as null is still missing");
	is_int(err.status, 400, "... answered 400");
	world_close(&w);
}

/* Incremental revenue and "when will it be known", against numbers worked
 * out by hand. */
static void test_incremental(void)
{
	struct lift l;
	struct incremental inc;
	/* 30 of 100 messaged ordered, 2 of 20 held out: diff 0.2; SE =
	 * sqrt(.3 * .7 / 100 + .1 * .9 / 20) = sqrt(.0066) = .0812404; half
	 * width 1.959964 * SE = .159228. At an average order of 50, each
	 * point of lift over 100 messaged is worth 100 * 50 = 5000. */
	stat_lift(30, 100, 2, 20, &l);
	stat_incremental(&l, 100, 50, &inc);
	near(inc.value, 1000, 1e-9, "incremental: 0.2 x 100 messaged x 50 = 1000");
	near(inc.lo, (0.2 - 0.159228) * 5000, 0.01, "incremental: low end 203.86");
	near(inc.hi, (0.2 + 0.159228) * 5000, 0.01, "incremental: high end 1796.14");
	/* 20 held out are fewer than 30: at the same 1 in 6 held out, 180
	 * people make 30 held out; the variance alone would need 77
	 * (3.8415 * (.21 / (5/6) + .09 / (1/6)) / .04 = 76.06) */
	is_int(stat_more_needed(&l, 100, 20), 180 - 120,
	       "more needed: 60, to reach 30 held out");
	/* 15 of 100 against 10 of 100: interval -0.041 to +0.141 includes 0;
	 * v = .1275 / .5 + .09 / .5 = .435, N = 3.8415 * .435 / .0025 =
	 * 668.4 -> 669, 200 there already */
	stat_lift(15, 100, 10, 100, &l);
	ok(!l.too_small && l.lo < 0 && l.hi > 0, "more needed: a lift whose interval holds 0");
	is_int(stat_more_needed(&l, 100, 100), 469, "more needed: 469 more enrollments");
	near(stat_days_needed(469, 10), 46.9, 1e-9, "... 46.9 days at 10 a day");
	is_int((long)stat_days_needed(469, 0), -1, "... no date without a rate");
	stat_lift(50, 100, 10, 100, &l);
	is_int(stat_more_needed(&l, 100, 100), 0, "more needed: 0 once the interval excludes 0");
	near(stat_days_needed(0, 0), 0, 0, "... and 0 days");
	is_int(stat_more_needed(&l, 100, 0), -1, "more needed: no estimate without a holdout");
	stat_lift(10, 100, 10, 100, &l);
	is_int(stat_more_needed(&l, 100, 100), -1, "more needed: no estimate without a difference");
}

static void test_measurement(void)
{
	test_incremental();
	test_nulls();
	test_stats();
	test_holdout();
	test_variants();
	test_attribution();
}

/* The report's numbers are described once (key, field, kind): a report
 * filled by hand, no database, must come out of report_json and
 * report_html with each number under its key, in its kind's format. */
static void test_report_numbers(void)
{
	struct report *r = calloc(1, sizeof *r);
	struct buf j = {0}, h = {0};
	sqlite3 *db = NULL;
	if (!ok(r && sqlite3_open(":memory:", &db) == SQLITE_OK,
		"report numbers: a report and a JSON checker"))
		goto out;
	r->since = T0 - DAY;
	r->until = T0;
	snprintf(r->currency, sizeof r->currency, "EUR");
	r->abandoned = 101, r->recovered = 102, r->orders = 103;
	r->attributed = 104, r->influenced = 105, r->sent = 106, r->opened = 107;
	r->clicked = 108, r->unsubscribed = 109, r->bounced = 110;
	r->codes_issued = 111, r->codes_redeemed = 112, r->stale = 113;
	r->codes_reused = 114, r->codes_expired = 115;
	r->recovery_rate = 0.25, r->unsubscribe_rate = 0.0012;
	r->revenue = 1000.5, r->recovered_revenue = 34.5;
	r->influenced_revenue = 20.25, r->discount_cost = 7.75;
	r->nflows = 1;
	struct flow_report *f = &r->flows[0];
	snprintf(f->name, sizeof f->name, "abandoned_cart");
	f->enrolled = 40, f->held_out = 10, f->converted = 8, f->held_converted = 1;
	stat_lift(f->converted, f->enrolled, f->held_converted, f->held_out, &f->lift);
	f->nsteps = 1;
	f->steps[0] = (struct step_report){.position = 1, .variant = 'A', .sent = 31,
		.opened = 32, .clicked = 33, .orders = 34, .converted = 35,
		.revenue = 12.5};
	is_int(report_json(r, &j), 0, "report numbers: report_json");
	is_int(report_html(r, "Shop", &h), 0, "report numbers: report_html");
	sqlite3_stmt *st = NULL;
	int valid = j.data && sqlite3_prepare_v2(db, "SELECT json_valid(?1)", -1,
						  &st, NULL) == SQLITE_OK &&
		    sqlite3_bind_text(st, 1, j.data, -1, SQLITE_STATIC) == SQLITE_OK &&
		    sqlite3_step(st) == SQLITE_ROW && sqlite3_column_int(st, 0) == 1;
	sqlite3_finalize(st);
	ok(valid, "report numbers: the JSON is valid");
	static const char *const json[] = {
		"\"abandoned_carts\":101,", "\"recovered_carts\":102,",
		"\"recovery_rate\":0.2500,", "\"recovered_revenue\":34.50,",
		"\"orders\":103,", "\"revenue\":1000.50,", "\"attributed_orders\":104,",
		"\"influenced_orders\":105,", "\"influenced_revenue\":20.25,",
		"\"sent\":106,", "\"opened\":107,", "\"clicked\":108,",
		"\"unsubscribed\":109,", "\"unsubscribe_rate\":0.0012,",
		"\"bounced\":110,", "\"codes_issued\":111,", "\"codes_redeemed\":112,",
		"\"discount_cost\":7.75,", "\"stale_steps\":113",
		"\"codes_flagged\":{\"reused\":114,\"expired\":115}",
		"\"holdout_pct\":0,\"enrolled\":40,\"holdout\":10,\"converted\":8,"
		"\"holdout_converted\":1,\"conversion\":0.2000,"
		"\"holdout_conversion\":0.1000,\"sent\":0,\"bounced\":0,"
		"\"complained\":0,\"bounce_rate\":0.0000,\"complaint_rate\":0.0000,"
		"\"lift\":0.1000,",
		"{\"position\":1,\"variant\":\"A\",\"sent\":31,\"opened\":32,"
		"\"clicked\":33,\"orders\":34,\"revenue\":12.50,\"converted\":35,"
		"\"bounced\":0,\"complained\":0,\"bounce_rate\":0.0000,"
		"\"complaint_rate\":0.0000,\"name\":\"\"}",
	};
	int bad = 0;
	for (size_t i = 0; i < sizeof json / sizeof json[0]; i++)
		if (!contains(j.data, json[i]) && ++bad)
			diag("report.json lacks %s", json[i]);
	is_int(bad, 0, "report numbers: every JSON number under its key, in its kind's format");
	static const char *const cards[] = {
		"data-k=\"recovered_revenue\" data-v=\"34.5000\">34.50 EUR</span></div>"
		"<div class=label>recovered revenue</div>",
		"data-k=\"recovery_rate\" data-v=\"0.2500\">25.0 %</span></div>"
		"<div class=label>of abandoned carts recovered</div>",
		"data-k=\"recovered_carts\" data-v=\"102.0000\">102 / 101</span></div>"
		"<div class=label>carts recovered / abandoned</div>",
		"data-k=\"sent\" data-v=\"106.0000\">106</span></div>"
		"<div class=label>emails sent</div>",
		"data-k=\"unsubscribe_rate\" data-v=\"0.0012\">0.12 %</span></div>"
		"<div class=label>unsubscribed per email</div>",
		"data-k=\"discount_cost\" data-v=\"7.7500\">7.75 EUR</span></div>"
		"<div class=label>cost of discounts redeemed</div>",
		"data-k=\"codes_flagged.reused\" data-v=\"114.0000\">114 / 115</span>"
		"</div><div class=label>orders with a code used before / expired</div>",
		"<td><span data-k=\"flows.0.steps.0.sent\" data-v=\"31.0000\">31</span>"
		"</td><td><span data-k=\"flows.0.steps.0.opened\" data-v=\"32.0000\">32"
		"</span></td><td><span data-k=\"flows.0.steps.0.clicked\" "
		"data-v=\"33.0000\">33</span></td><td><span data-k=\"flows.0.steps.0."
		"orders\" data-v=\"34.0000\">34</span></td><td><span data-k=\"flows.0."
		"steps.0.revenue\" data-v=\"12.5000\">12.50 EUR</span></td><td>",
	};
	bad = 0;
	const char *at = h.data ? h.data : "";
	for (size_t i = 0; i < sizeof cards / sizeof cards[0]; i++) {
		const char *p = strstr(at, cards[i]);
		if (!p && ++bad)
			diag("report page lacks, or has out of order, %s", cards[i]);
		at = p ? p : at;
	}
	is_int(bad, 0, "report numbers: the page's cards and a step's row, in order, "
	       "with their keys, values, shown text and labels");
out:
	buf_free(&j);
	buf_free(&h);
	sqlite3_close(db);
	free(r);
}

/* ==== HTTP routes ===================================================== */

static void test_http(void)
{
	struct world w;
	struct http_resp rs;
	char sig[256], path[160], tok[TOK_MAXLEN + 1], bearer[128];
	if (!ok(world_open(&w, "http") == 0, "http: world opens"))
		return;
	rm_time now = T0;

	/* routes */
	http(&w, "GET", "/health", NULL, NULL, NULL, now, &rs);
	ok(rs.status == 200 && rs.body.data && !strcmp(rs.body.data, "ok\n"), "GET /health -> 200 ok");
	http_resp_free(&rs);
	http(&w, "GET", "/nope", NULL, NULL, NULL, now, &rs);
	is_int(rs.status, 404, "GET /nope -> 404");
	ok(contains(rs.content_type, "application/json") && contains(rs.body.data, "\"error\""),
	   "... with a JSON body containing \"error\"");
	http_resp_free(&rs);
	http(&w, "GET", "/r/", NULL, NULL, NULL, now, &rs);
	is_int(rs.status, 404, "GET /r/ (no token) -> 404");
	http_resp_free(&rs);
	http(&w, "GET", "/events", NULL, NULL, NULL, now, &rs);
	is_int(rs.status, 405, "GET /events -> 405");
	is_str(resp_header(&rs, "Allow"), "POST", "... with Allow: POST");
	ok(contains(rs.body.data, "\"error\""), "... and a JSON error");
	http_resp_free(&rs);
	http(&w, "DELETE", "/u/abc", NULL, NULL, NULL, now, &rs);
	is_int(rs.status, 405, "DELETE /u/... -> 405");
	is_str(resp_header(&rs, "Allow"), "GET, HEAD, POST", "... with Allow: GET, HEAD, POST");
	http_resp_free(&rs);

	/* /events: signatures */
	const char *ev = "{\"type\":\"cart\",\"email\":\"ann@example.com\",\"name\":\"Ann\",\"consent\":true,"
			 "\"cart_id\":\"c-http\",\"items\":[{\"sku\":\"S1\",\"name\":\"Lamp\",\"price\":10}]}";
	http(&w, "POST", "/events", ev, NULL, NULL, now, &rs);
	is_int(rs.status, 401, "POST /events without a signature -> 401");
	ok(contains(rs.body.data, "\"error\""), "... with a JSON error");
	http_resp_free(&rs);
	hook_sign("not-the-secret", now, ev, strlen(ev), sig, sizeof sig);
	http(&w, "POST", "/events", ev, sig, NULL, now, &rs);
	is_int(rs.status, 401, "POST /events signed with another secret -> 401");
	http_resp_free(&rs);
	hook_sign(w.cfg.hook_secret, now - 301, ev, strlen(ev), sig, sizeof sig);
	http(&w, "POST", "/events", ev, sig, NULL, now, &rs);
	is_int(rs.status, 401, "POST /events signed 301 s ago -> 401");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT count(*) FROM events"), 0, "no event stored by refused requests");
	hook_sign(w.cfg.hook_secret, now, ev, strlen(ev), sig, sizeof sig);
	struct http_req rq = {.method = "POST", .path = "/events", .content_type = "text/plain",
			      .signature = sig, .body = ev, .body_len = strlen(ev)};
	memset(&rs, 0, sizeof rs);
	http_handle(&w.app, &rq, &rs, now);
	is_int(rs.status, 415, "POST /events as text/plain -> 415");
	http_resp_free(&rs);
	rq.content_type = "application/json";
	rq.body_too_large = 1;
	memset(&rs, 0, sizeof rs);
	http_handle(&w.app, &rq, &rs, now);
	is_int(rs.status, 413, "POST /events with body_too_large -> 413");
	http_resp_free(&rs);
	http(&w, "POST", "/events", ev, sig, NULL, now, &rs);
	is_int(rs.status, 202, "POST /events with a valid signature -> 202");
	is_str(rs.body.data, "{\"accepted\":1,\"duplicates\":0}", "... answering what was accepted");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE cart_key='c-http'"), 1, "... the cart is stored");
	http(&w, "POST", "/collect", "{\"type\":\"order\",\"order_id\":\"o-x\",\"email\":\"ann@example.com\"}",
	     NULL, NULL, now, &rs);
	is_int(rs.status, 403, "POST /collect with an order -> 403");
	http_resp_free(&rs);

	/* /tick: bearer */
	now = T0 + HOUR;
	http(&w, "POST", "/tick", NULL, NULL, NULL, now, &rs);
	is_int(rs.status, 401, "POST /tick without a bearer -> 401");
	http_resp_free(&rs);
	http(&w, "POST", "/tick", NULL, NULL, "Bearer wrong-token", now, &rs);
	is_int(rs.status, 401, "POST /tick with a wrong bearer -> 401");
	http_resp_free(&rs);
	snprintf(bearer, sizeof bearer, "Bearer %s", w.cfg.tick_token);
	http(&w, "POST", "/tick", NULL, NULL, bearer, now, &rs);
	is_int(rs.status, 202, "POST /tick with the bearer -> 202 (run in the request here: no sender)");
	ok(contains(rs.content_type, "application/json") && rs.body.data && rs.body.data[0] == '{' &&
		   contains(rs.body.data, "\"sent\":1") && contains(rs.body.data, "\"now\":1795003600"),
	   "... with a JSON summary: the cart's step 1 was sent (%s)", rs.body.data ? rs.body.data : "");
	http_resp_free(&rs);

	/* /r/ links */
	long long m1 = sq(&w, "SELECT id FROM messages WHERE step=1");
	ok(m1 > 0, "a message row to link to");
	tok_sign(w.app.key, TOK_RECOVER, m1, now + 30 * DAY, tok, sizeof tok);
	snprintf(path, sizeof path, "/r/%s", tok);
	http(&w, "GET", path, NULL, NULL, NULL, now, &rs);
	is_int(rs.status, 302, "GET /r/<valid> -> 302");
	struct buf want = {0};
	expand_cart_url(w.cfg.cart_url, "c-http", "", &want);
	is_str(resp_header(&rs, "Location"), want.data, "... Location is cart_url with {cart} expanded");
	buf_free(&want);
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT count(*) FROM interactions WHERE kind='click' AND message=%lld", m1), 1,
	       "... the click is recorded");
	unsigned char other[RM_KEYBYTES];
	memset(other, 0x42, sizeof other);
	tok_sign(other, TOK_RECOVER, m1, now + 30 * DAY, tok, sizeof tok);
	snprintf(path, sizeof path, "/r/%s", tok);
	http(&w, "GET", path, NULL, NULL, NULL, now, &rs);
	is_int(rs.status, 400, "GET /r/<forged> -> 400");
	ok(contains(rs.content_type, "text/html"), "... as a text/html page");
	ok(contains(rs.body.data, "not one we sent"), "... saying the link is not ours");
	http_resp_free(&rs);
	tok_sign(w.app.key, TOK_RECOVER, m1, now - 1, tok, sizeof tok);
	snprintf(path, sizeof path, "/r/%s", tok);
	http(&w, "GET", path, NULL, NULL, NULL, now, &rs);
	ok(rs.status == 400 && contains(rs.body.data, "expired"), "GET /r/<expired> -> 400, expired");
	http_resp_free(&rs);
	tok_sign(w.app.key, TOK_UNSUB, m1, now + DAY, tok, sizeof tok);
	snprintf(path, sizeof path, "/r/%s", tok);
	http(&w, "GET", path, NULL, NULL, NULL, now, &rs);
	is_int(rs.status, 400, "GET /r/<unsubscribe token> -> 400");
	http_resp_free(&rs);
	tok_sign(w.app.key, TOK_RECOVER, 999999, now + DAY, tok, sizeof tok);
	snprintf(path, sizeof path, "/r/%s", tok);
	http(&w, "GET", path, NULL, NULL, NULL, now, &rs);
	is_int(rs.status, 400, "GET /r/<token of a message we do not have> -> 400");
	http_resp_free(&rs);
	http(&w, "GET", "/r/%3Cscript%3E", NULL, NULL, NULL, now, &rs);
	ok(rs.status == 400 && !contains(rs.body.data, "<script>"), "GET /r/<garbage> -> 400, nothing echoed");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT count(*) FROM interactions WHERE kind='click'"), 1, "refused links record nothing");

	/* the open pixel */
	tok_sign(w.app.key, TOK_OPEN, m1, now + DAY, tok, sizeof tok);
	snprintf(path, sizeof path, "/o/%s.gif", tok);
	http(&w, "GET", path, NULL, NULL, NULL, now, &rs);
	ok(rs.status == 200 && contains(rs.content_type, "image/gif") && rs.body.len > 6 &&
		   !memcmp(rs.body.data, "GIF89a", 6), "GET /o/<token>.gif -> 200, a GIF");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT count(*) FROM interactions WHERE kind='open' AND message=%lld", m1), 1,
	       "... the open is recorded");
	world_close(&w);
}

static void test_browser_side(void)
{
	struct world w;
	struct http_resp rs;
	const char *view = "{\"type\":\"view\",\"sku\":\"LAMP-1\"}";
	if (!ok(world_open(&w, "browser") == 0, "browser: world opens"))
		return;
	is_str(w.cfg.store_origin, "http://127.0.0.1:8080", "store_origin derives from store_url");
	is_int(browser_req(&w, "POST", "/collect", "http://127.0.0.1:8080", "10.0.0.1", NULL,
			   view, T0, &rs), 204, "the store's origin may post events");
	is_str(resp_header(&rs, "Access-Control-Allow-Origin"), "http://127.0.0.1:8080",
	       "... and is told so (CORS)");
	http_resp_free(&rs);
	long long before = sq(&w, "SELECT count(*) FROM events");
	is_int(browser_req(&w, "POST", "/collect", "https://evil.example", "10.0.0.1", NULL,
			   view, T0, &rs), 403, "another origin gets 403");
	ok(contains(rs.body.data, "store_origin") && !*resp_header(&rs, "Access-Control-Allow-Origin"),
	   "... with a message naming store_origin and no CORS grant");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT count(*) FROM events"), before, "... and nothing is stored");
	is_int(browser_req(&w, "OPTIONS", "/collect", "http://127.0.0.1:8080", "10.0.0.1", NULL,
			   NULL, T0, &rs), 204, "preflight from the store: 204");
	ok(contains(resp_header(&rs, "Access-Control-Allow-Methods"), "POST"), "... allowing POST");
	http_resp_free(&rs);
	is_int(browser_req(&w, "OPTIONS", "/collect", "https://evil.example", "10.0.0.1", NULL,
			   NULL, T0, &rs), 403, "preflight from elsewhere: 403");
	http_resp_free(&rs);

	/* rate limits: 3 a minute per address, 2 per visitor */
	w.cfg.rate_ip_per_min = 3;
	w.cfg.rate_visitor_per_min = 2;
	rm_time t = T0 + 600 - (T0 + 600) % 60;
	int st[4];
	for (int i = 0; i < 4; i++) {
		st[i] = browser_req(&w, "POST", "/collect", NULL, "10.0.0.2", NULL, view, t, &rs);
		if (i < 3)
			http_resp_free(&rs);
	}
	ok(st[0] == 204 && st[1] == 204 && st[2] == 204 && st[3] == 429,
	   "the 4th event in a minute from one address: 429");
	ok(contains(rs.body.data, "rate limit") && atoi(resp_header(&rs, "Retry-After")) > 0,
	   "... with a clear message and Retry-After");
	http_resp_free(&rs);
	is_int(browser_req(&w, "POST", "/collect", NULL, "10.0.0.2", NULL, view, t + 60, &rs), 204,
	       "the next minute it is accepted again");
	http_resp_free(&rs);
	for (int i = 0; i < 3; i++) {
		char ip[16];
		snprintf(ip, sizeof ip, "10.0.1.%d", i);
		st[i] = browser_req(&w, "POST", "/collect", NULL, ip, "rm_vid=v-rate-1", view, t, &rs);
		http_resp_free(&rs);
	}
	ok(st[0] == 204 && st[1] == 204 && st[2] == 429,
	   "one visitor from changing addresses: the 3rd event in a minute is 429");
	for (int i = 0; i < 4; i++) {
		struct http_req rq = {0};
		rq.method = "POST";
		rq.path = "/discounts/validate";
		rq.remote_addr = "10.0.2.1";
		rq.content_type = "application/json";
		rq.body = "{\"code\":\"RM-AAAA-BBBB\",\"total\":10}";
		rq.body_len = strlen(rq.body);
		memset(&rs, 0, sizeof rs);
		http_handle(&w.app, &rq, &rs, t);
		st[i] = rs.status;
		http_resp_free(&rs);
	}
	ok(st[0] == 200 && st[2] == 200 && st[3] == 429,
	   "guessing discount codes is rate-limited too (4th try in a minute: 429)");
	w.cfg.rate_ip_per_min = w.cfg.rate_visitor_per_min = 0;

	/* on-site: a visitor with the abandoned cart they built */
	struct ev_error err;
	const char *vis = "v-onsite-1";
	const char *ident = "{\"type\":\"identify\",\"email\":\"vis@example.com\","
			    "\"consent\":true}";
	ev_ingest(&w.app, EV_BROWSER, ident, strlen(ident), vis, T0, &err);
	const char *cart = "{\"type\":\"cart\",\"cart_id\":\"vis-cart\",\"items\":["
			   "{\"sku\":\"A\",\"name\":\"Lamp\",\"price\":10,\"qty\":1,"
			   "\"url\":\"http://127.0.0.1:8080/p/a\"},{\"sku\":\"B\",\"name\":"
			   "\"Rug\",\"price\":20}]}";
	is_int(ev_ingest(&w.app, EV_BROWSER, cart, strlen(cart), vis, T0, &err), 1,
	       "the browser builds its cart (a link on the store's origin)");
	is_int(browser_req(&w, "GET", "/onsite", NULL, "10.0.0.3", "rm_vid=v-onsite-1", NULL,
			   T0 + 10, &rs), 204, "on-site: nothing while the cart is open");
	http_resp_free(&rs);
	struct tick_summary sum;
	tick(&w, T0 + HOUR, &sum);
	is_int(browser_req(&w, "GET", "/onsite", NULL, "10.0.0.3", "a=b; rm_vid=v-onsite-1", NULL,
			   T0 + 2 * HOUR, &rs), 200, "on-site: the browser of the abandoned cart gets a message");
	ok(contains(rs.body.data, "Your cart is saved") && contains(rs.body.data, "2 items") &&
		   contains(rs.body.data, "vis-cart"),
	   "... saying the cart is saved, with its 2 items and a link to it");
	http_resp_free(&rs);
	is_int(browser_req(&w, "GET", "/onsite", NULL, "10.0.0.3", "rm_vid=v-stranger", NULL,
			   T0 + 2 * HOUR, &rs), 204, "on-site: a stranger gets nothing");
	http_resp_free(&rs);
	/* a stranger claims the email from another browser: still nothing */
	const char *spy = "{\"type\":\"identify\",\"email\":\"vis@example.com\"}";
	ev_ingest(&w.app, EV_BROWSER, spy, strlen(spy), "v-spy", T0 + 2 * HOUR, &err);
	is_int(browser_req(&w, "GET", "/onsite", NULL, "10.0.0.9", "rm_vid=v-spy", NULL,
			   T0 + 2 * HOUR, &rs), 204,
	       "on-site: typing someone's email into another browser shows their cart to nobody");
	http_resp_free(&rs);
	is_int(browser_req(&w, "GET", "/onsite?vid=v-onsite-1", NULL, "10.0.0.9", NULL, NULL,
			   T0 + 2 * HOUR, &rs), 204, "on-site: a visitor id in the URL is ignored");
	http_resp_free(&rs);

	/* the recovery click on a new phone: a new id, proven, sees the cart */
	long long m = sq(&w, "SELECT max(id) FROM messages");
	char tok[TOK_MAXLEN + 1], path[96], cookie[96];
	tok_sign(w.app.key, TOK_RECOVER, m, T0 + DAY, tok, sizeof tok);
	snprintf(path, sizeof path, "/r/%s", tok);
	is_int(browser_req(&w, "GET", path, NULL, "10.0.0.4", NULL, NULL, T0 + 3 * HOUR, &rs), 302,
	       "recovery link from a new phone: 302");
	const char *sc = resp_header(&rs, "Set-Cookie");
	ok(!strncmp(sc, "rm_vid=v", 8) && !contains(sc, "v-onsite-1") && !contains(sc, "v-spy"),
	   "... the phone gets a new visitor id, never another browser's (%s)", sc);
	snprintf(cookie, sizeof cookie, "%.*s", (int)strcspn(sc, ";"), sc);
	http_resp_free(&rs);
	is_int(browser_req(&w, "GET", "/onsite", NULL, "10.0.0.4", cookie, NULL, T0 + 3 * HOUR, &rs),
	       200, "... and, proven by the click, it sees the contact's saved cart");
	http_resp_free(&rs);

	/* a browser cannot touch a cart the backend made, nor link elsewhere */
	cart_event(&w, "shop@example.com", "Shop", "backend-1", 1, T0);
	const char *take = "{\"type\":\"cart\",\"cart_id\":\"backend-1\",\"items\":[]}";
	is_int(ev_ingest(&w.app, EV_BROWSER, take, strlen(take), "v-evil", T0, &err), -1,
	       "a browser event cannot change a cart it did not make");
	is_int(err.status, 403, "... 403");
	is_int(sq(&w, "SELECT item_count FROM carts WHERE cart_key = 'backend-1'"), 2, "... the cart is intact");
	const char *phish = "{\"type\":\"cart\",\"items\":[{\"sku\":\"X\",\"name\":"
			    "\"Verify your account\",\"price\":0,\"url\":\"https://evil.example/x\"}]}";
	is_int(ev_ingest(&w.app, EV_BROWSER, phish, strlen(phish), "v-evil", T0, &err), -1,
	       "a browser cart linking off the shop is refused");
	ok(err.status == 400 && contains(err.msg, "links must be on http://127.0.0.1:8080"),
	   "... 400, naming the store origin (%s)", err.msg);
	struct buf many = {0};
	buf_adds(&many, "[");
	for (int i = 0; i < 21; i++)
		buf_addf(&many, "%s{\"type\":\"view\",\"sku\":\"A\"}", i ? "," : "");
	buf_adds(&many, "]");
	is_int(ev_ingest(&w.app, EV_BROWSER, many.data, many.len, "v-many", T0, &err), -1,
	       "21 events in one browser request are refused");
	is_int(err.status, 413, "... 413");
	buf_free(&many);
	world_close(&w);
}

/* ==== FastCGI and CGI front-ends ====================================== */

static void test_boundary(void)
{
	struct world w;
	struct buf out = {0};
	char nowvar[64], q[9000], big[2100];
	if (!ok(world_open(&w, "boundary") == 0, "boundary: world opens"))
		return;
	snprintf(nowvar, sizeof nowvar, "%lld", (long long)T0);
	setenv("REMARKET_NOW", nowvar, 1);

	/* REQUEST_METHOD missing or empty: a 400, never a crash or a loop */
	static const char *const paths[] = {"PATH_INFO=/onsite", "PATH_INFO=/collect",
					    "PATH_INFO=/u/abc", "PATH_INFO=/health",
					    "PATH_INFO=/discounts/validate"};
	for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
		const char *missing[] = {paths[i], "REMOTE_ADDR=10.9.0.1", NULL};
		const char *empty[] = {"REQUEST_METHOD=", paths[i], "REMOTE_ADDR=10.9.0.1", NULL};
		is_int(cgi_req(&w, missing, NULL, &out), 400, paths[i]);
		ok(contains(out.data, "REQUEST_METHOD: missing") &&
		   contains(out.data, "application/json"),
		   "... without REQUEST_METHOD: a JSON 400 naming it");
		is_int(cgi_req(&w, empty, NULL, &out), 400, "... with REQUEST_METHOD empty: 400");
		ok(contains(out.data, "REQUEST_METHOD: empty"), "... naming it");
	}
	static const char *const badm[] = {"get", "GET ", "FOO", "G\tET", "GETGETGET", "POST\r\n"};
	for (size_t i = 0; i < sizeof badm / sizeof badm[0]; i++) {
		char m[64];
		snprintf(m, sizeof m, "REQUEST_METHOD=%s", badm[i]);
		const char *env[] = {m, "PATH_INFO=/health", NULL};
		is_int(cgi_req(&w, env, NULL, &out), 400, vis(m));
		ok(contains(out.data, "REQUEST_METHOD: invalid"), "... naming REQUEST_METHOD");
	}
	{
		const char *env[] = {"REQUEST_METHOD=GET", "PATH_INFO=/health", "REMOTE_ADDR=10.9.0.1", NULL};
		is_int(cgi_req(&w, env, NULL, &out), 200, "GET /health through http_serve_cgi -> 200");
		const char *head[] = {"REQUEST_METHOD=HEAD", "PATH_INFO=/health", NULL};
		is_int(cgi_req(&w, head, NULL, &out), 200, "HEAD /health -> 200");
		ok(!contains(out.data, "ok\n"), "... without a body");
		const char *del[] = {"REQUEST_METHOD=DELETE", "PATH_INFO=/health", NULL};
		is_int(cgi_req(&w, del, NULL, &out), 405, "DELETE /health: a known method -> 405");
		const char *nopath[] = {"REQUEST_METHOD=GET", NULL};
		is_int(cgi_req(&w, nopath, NULL, &out), 404, "no PATH_INFO is / -> 404");
	}
	/* the same straight into http_handle: a NULL or empty method */
	static const char *const hpaths[] = {"/onsite", "/collect", "/u/abc", "/report"};
	for (size_t i = 0; i < sizeof hpaths / sizeof hpaths[0]; i++) {
		struct http_resp rs;
		struct http_req rq = {.path = hpaths[i], .remote_addr = "10.9.0.2"};
		memset(&rs, 0, sizeof rs);
		http_handle(&w.app, &rq, &rs, T0);
		ok(rs.status >= 200 && rs.status < 500, "http_handle %s, method NULL -> %d", hpaths[i], rs.status);
		http_resp_free(&rs);
		rq.method = "";
		memset(&rs, 0, sizeof rs);
		http_handle(&w.app, &rq, &rs, T0);
		ok(rs.status >= 200 && rs.status < 500, "http_handle %s, method \"\" -> %d", hpaths[i], rs.status);
		http_resp_free(&rs);
	}

	/* every other parameter: lengths, charsets, numbers */
	memset(q, 'a', sizeof q - 1);
	q[sizeof q - 1] = '\0';
	memcpy(q, "QUERY_STRING=", 13); /* 8986 bytes of value */
	memset(big, 'b', sizeof big - 1);
	big[sizeof big - 1] = '\0';
	char pathlong[1100] = "PATH_INFO=/";
	memset(pathlong + 11, 'p', 1030);
	pathlong[1041] = '\0';
	char cookie[40], auth[1100] = "HTTP_AUTHORIZATION=Bearer ";
	memset(auth + 26, 'x', 1030); /* 1037 bytes of value */
	auth[1056] = '\0';
	snprintf(cookie, sizeof cookie, "HTTP_COOKIE=rm_vid=v1\nX: y");
	char origin[2100];
	snprintf(origin, sizeof origin, "HTTP_ORIGIN=http://%s", big + 20);
	char xff[2200];
	snprintf(xff, sizeof xff, "HTTP_X_FORWARDED_FOR=%s", big);
	static const struct {
		const char *param, *value;
	} bad[] = {
		{"PATH_INFO", "PATH_INFO=health"},
		{"PATH_INFO", "PATH_INFO=/health\x01"},
		{"PATH_INFO", "PATH_INFO=/r/\x7f"},
		{"PATH_INFO", "PATH_INFO=/r/\xff\xfe"},
		{"PATH_INFO", NULL}, /* pathlong */
		{"QUERY_STRING", NULL}, /* q */
		{"QUERY_STRING", "QUERY_STRING=type=view&sku=\x1b[2J"},
		{"CONTENT_LENGTH", "CONTENT_LENGTH=abc"},
		{"CONTENT_LENGTH", "CONTENT_LENGTH=-1"},
		{"CONTENT_LENGTH", "CONTENT_LENGTH=+5"},
		{"CONTENT_LENGTH", "CONTENT_LENGTH= 5"},
		{"CONTENT_LENGTH", "CONTENT_LENGTH=1e3"},
		{"CONTENT_LENGTH", "CONTENT_LENGTH=99999999999999999999"},
		{"CONTENT_TYPE", "CONTENT_TYPE=application/json\r\nX: y"},
		{"REMOTE_ADDR", "REMOTE_ADDR=not-an-address"},
		{"REMOTE_ADDR", "REMOTE_ADDR=10.0.0.256"},
		{"REMOTE_ADDR", "REMOTE_ADDR=unix:"},
		{"HTTP_AUTHORIZATION", NULL}, /* auth */
		{"HTTP_COOKIE", NULL},        /* cookie */
		{"HTTP_ORIGIN", NULL},        /* origin */
		{"HTTP_X_FORWARDED_FOR", NULL}, /* xff */
		{"HTTP_X_REMARKET_SIGNATURE", "HTTP_X_REMARKET_SIGNATURE=t=1,\nv1=00"},
	};
	const char *fill[] = {pathlong, q, auth, cookie, origin, xff};
	size_t nfill = 0;
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		const char *v = bad[i].value ? bad[i].value : fill[nfill++];
		/* the first NAME= counts: the bad one goes first */
		const char *env2[] = {v, "REQUEST_METHOD=POST", "REMOTE_ADDR=10.9.0.3",
				      "PATH_INFO=/collect", "CONTENT_LENGTH=2",
				      "CONTENT_TYPE=text/plain", NULL};
		char want[80];
		snprintf(want, sizeof want, "\"%s: invalid", bad[i].param);
		is_int(cgi_req(&w, env2, "{}", &out), 400, vis(v));
		if (!ok(contains(out.data, want), "... the answer names %s", bad[i].param))
			diag("%s", vis(out.data));
	}
	is_int(sq(&w, "SELECT count(*) FROM events"), 0, "no refused request stored an event");
	{
		const char *env[] = {"REQUEST_METHOD=GET", "PATH_INFO=/health", "REMOTE_ADDR=::ffff:10.9.0.4",
				     "CONTENT_LENGTH=", "QUERY_STRING=", "HTTP_COOKIE=", NULL};
		is_int(cgi_req(&w, env, NULL, &out), 200, "empty optional parameters and a v4-mapped address pass");
	}

	/* the report: never by address, always the token or a signed link */
	static const char *const loop[] = {"REMOTE_ADDR=127.0.0.1", "REMOTE_ADDR=::1"};
	for (int i = 0; i < 2; i++) {
		const char *env[] = {"REQUEST_METHOD=GET", "PATH_INFO=/report.json", loop[i], NULL};
		is_int(cgi_req(&w, env, NULL, &out), 401, "GET /report.json from loopback without a token -> 401");
		ok(contains(out.data, "WWW-Authenticate: Basic"), "... asking for Basic auth");
		const char *env2[] = {"REQUEST_METHOD=GET", "PATH_INFO=/report", loop[i], NULL};
		is_int(cgi_req(&w, env2, NULL, &out), 401, vis(loop[i]));
	}
	{
		const char *bearer[] = {"REQUEST_METHOD=GET", "PATH_INFO=/report.json", "REMOTE_ADDR=127.0.0.1",
					"HTTP_AUTHORIZATION=Bearer " TICK_TOKEN, NULL};
		is_int(cgi_req(&w, bearer, NULL, &out), 200, "... with the tick token as Bearer -> 200");
		char basic[200], b64[120];
		sodium_bin2base64(b64, sizeof b64, (const unsigned char *)"owner:" TICK_TOKEN,
				  strlen("owner:" TICK_TOKEN), sodium_base64_VARIANT_ORIGINAL);
		snprintf(basic, sizeof basic, "HTTP_AUTHORIZATION=Basic %s", b64);
		const char *env[] = {"REQUEST_METHOD=GET", "PATH_INFO=/report", "REMOTE_ADDR=198.51.100.7", basic, NULL};
		is_int(cgi_req(&w, env, NULL, &out), 200, "... with the tick token as the Basic password -> 200");
	}
	{
		char tok[TOK_MAXLEN + 1], qs[120];
		const char *env[] = {"REQUEST_METHOD=GET", "PATH_INFO=/report", "REMOTE_ADDR=198.51.100.8", qs, NULL};
		tok_sign(w.app.key, TOK_REPORT, report_subject_of(TICK_TOKEN), T0 + 7 * DAY, tok, sizeof tok);
		snprintf(qs, sizeof qs, "QUERY_STRING=t=%s", tok);
		is_int(cgi_req(&w, env, NULL, &out), 200, "a report link opens the report");
		ok(contains(out.data, "Referrer-Policy: no-referrer"), "... and keeps itself out of Referer headers");
		snprintf(qs, sizeof qs, "QUERY_STRING=since=-7d&t=%s&until=%lld", tok, (long long)T0);
		is_int(cgi_req(&w, env, NULL, &out), 200, "... with since and until around it");
		const char *json[] = {"REQUEST_METHOD=GET", "PATH_INFO=/report.json", "REMOTE_ADDR=198.51.100.8", qs, NULL};
		is_int(cgi_req(&w, json, NULL, &out), 200, "... and report.json");
		snprintf(nowvar, sizeof nowvar, "%lld", (long long)(T0 + 7 * DAY + 1));
		setenv("REMARKET_NOW", nowvar, 1);
		is_int(cgi_req(&w, env, NULL, &out), 401, "the link expires after its days");
		snprintf(nowvar, sizeof nowvar, "%lld", (long long)T0);
		setenv("REMARKET_NOW", nowvar, 1);
		set_cfg(&w.cfg.tick_token, "a-new-tick-token");
		is_int(cgi_req(&w, env, NULL, &out), 401, "changing tick_token revokes every report link");
		set_cfg(&w.cfg.tick_token, TICK_TOKEN);
		tok_sign(w.app.key, TOK_OPEN, report_subject_of(TICK_TOKEN), T0 + DAY, tok, sizeof tok);
		snprintf(qs, sizeof qs, "QUERY_STRING=t=%s", tok);
		is_int(cgi_req(&w, env, NULL, &out), 401, "a token of another kind is no report link");
		tok_sign(w.app.key, TOK_REPORT, 0, T0 + DAY, tok, sizeof tok);
		snprintf(qs, sizeof qs, "QUERY_STRING=t=%s", tok);
		is_int(cgi_req(&w, env, NULL, &out), 401, "a report token of another subject -> 401");
		unsigned char other[RM_KEYBYTES] = {1};
		tok_sign(other, TOK_REPORT, report_subject_of(TICK_TOKEN), T0 + DAY, tok, sizeof tok);
		snprintf(qs, sizeof qs, "QUERY_STRING=t=%s", tok);
		is_int(cgi_req(&w, env, NULL, &out), 401, "a report link signed with another key -> 401");
	}

	/* parse_time: huge times are a 400, never an overflow */
	static const char *const times[] = {
		"until=9223372036854775807", "since=%2B1d&until=9223372036854775807",
		"since=-1d&until=9223372036854775807", "until=99999999999999999999",
		"until=253402300800", "since=-9223372036854775807d", "since=%2B9223372036854775807s",
		"until=%2B%205", "until=10000-01-01", "since=-%2B5d", "until=-",
	};
	for (size_t i = 0; i < sizeof times / sizeof times[0]; i++) {
		char qs[120];
		snprintf(qs, sizeof qs, "QUERY_STRING=%s", times[i]);
		const char *env[] = {"REQUEST_METHOD=GET", "PATH_INFO=/report.json", "REMOTE_ADDR=10.9.0.5",
				     "HTTP_AUTHORIZATION=Bearer " TICK_TOKEN, qs, NULL};
		is_int(cgi_req(&w, env, NULL, &out), 400, times[i]);
	}
	{
		const char *env[] = {"REQUEST_METHOD=GET", "PATH_INFO=/report.json", "REMOTE_ADDR=10.9.0.5",
				     "HTTP_AUTHORIZATION=Bearer " TICK_TOKEN,
				     "QUERY_STRING=since=2026-01-01&until=%2B30d", NULL};
		is_int(cgi_req(&w, env, NULL, &out), 200, "since=2026-01-01&until=+30d is fine");
	}

	/* length limits count characters, not bytes */
	struct ev_error err;
	char *e51 = repeat("\xc3\xa9", 51), *e101 = repeat("\xc3\xa9", 101);
	char *a100 = repeat("a", 100), *e200 = repeat("\xc3\xa9", 200), *a201 = repeat("a", 201);
	struct buf ev = {0};
	buf_addf(&ev, "{\"type\":\"identify\",\"email\":\"e51@example.com\",\"name\":\"%s\"}", e51);
	is_int(ingest(&w, EV_HOOK, ev.data, T0, &err), 1, "a name of 51 x \"\xc3\xa9\" (102 bytes) is accepted");
	ev.len = 0;
	buf_addf(&ev, "{\"type\":\"identify\",\"email\":\"e101@example.com\",\"name\":\"%s\"}", e101);
	is_int(ingest(&w, EV_HOOK, ev.data, T0, &err), -1, "a name of 101 characters is refused");
	is_str(err.msg, "name: at most 100 characters", "... saying the limit in characters");
	ev.len = 0;
	buf_addf(&ev, "{\"type\":\"identify\",\"email\":\"a100@example.com\",\"name\":\"%s\"}", a100);
	is_int(ingest(&w, EV_HOOK, ev.data, T0, &err), 1, "a name of 100 ASCII characters is accepted");
	ev.len = 0;
	buf_addf(&ev, "{\"type\":\"cart\",\"email\":\"e200@example.com\",\"cart_id\":\"c-e200\","
		 "\"items\":[{\"sku\":\"S1\",\"name\":\"%s\",\"price\":1}]}", e200);
	is_int(ingest(&w, EV_HOOK, ev.data, T0, &err), 1, "an item name of 200 x \"\xc3\xa9\" (400 bytes) is accepted");
	ev.len = 0;
	buf_addf(&ev, "{\"type\":\"cart\",\"email\":\"a201@example.com\",\"cart_id\":\"c-a201\","
		 "\"items\":[{\"sku\":\"S1\",\"name\":\"%s\",\"price\":1}]}", a201);
	is_int(ingest(&w, EV_HOOK, ev.data, T0, &err), -1, "an item name of 201 characters is refused");
	is_str(err.msg, "items[0].name: at most 200 characters", "... saying so");
	ok(val_text("\xc3\xa9\xc3\xa9", 2) && !val_text("\xc3\xa9\xc3\xa9\xc3\xa9", 2),
	   "val_text counts characters");
	free(e51), free(e101), free(a100), free(e200), free(a201);
	buf_free(&ev);

	/* rate limits key on the client, X-Forwarded-For only from a proxy */
	const char *code = "{\"code\":\"RM-AAAA-BBBB\",\"total\":10}";
	rm_time rnow = T0 + 777 * 60; /* a window of its own */
	snprintf(nowvar, sizeof nowvar, "%lld", (long long)rnow);
	setenv("REMARKET_NOW", nowvar, 1);
	w.cfg.rate_ip_per_min = 5;
	set_cfg(&w.cfg.trusted_proxies, "127.0.0.1, 10.0.0.0/8");
	int limited = 0;
	for (int i = 0; i < 8; i++) {
		const char *env[] = {"REQUEST_METHOD=POST", "PATH_INFO=/discounts/validate",
				     "REMOTE_ADDR=127.0.0.1", "HTTP_X_FORWARDED_FOR=203.0.113.5",
				     "CONTENT_TYPE=application/json", "CONTENT_LENGTH=34", NULL};
		limited += cgi_req(&w, env, code, &out) == 429;
	}
	is_int(limited, 3, "a noisy client behind the proxy gets 429 after 5 a minute");
	{
		const char *env[] = {"REQUEST_METHOD=POST", "PATH_INFO=/discounts/validate",
				     "REMOTE_ADDR=127.0.0.1", "HTTP_X_FORWARDED_FOR=203.0.113.6",
				     "CONTENT_TYPE=application/json", "CONTENT_LENGTH=34", NULL};
		is_int(cgi_req(&w, env, code, &out), 200, "another client behind the same proxy is still answered");
		ok(contains(out.data, "\"valid\""), "... with the code's verdict");
		const char *spoof[] = {"REQUEST_METHOD=POST", "PATH_INFO=/discounts/validate",
				       "REMOTE_ADDR=127.0.0.1", "HTTP_X_FORWARDED_FOR=198.51.100.1, 203.0.113.5",
				       "CONTENT_TYPE=application/json", "CONTENT_LENGTH=34", NULL};
		is_int(cgi_req(&w, spoof, code, &out), 429,
		       "the noisy client cannot escape by writing its own X-Forwarded-For");
		const char *chain[] = {"REQUEST_METHOD=POST", "PATH_INFO=/discounts/validate",
				       "REMOTE_ADDR=127.0.0.1", "HTTP_X_FORWARDED_FOR=203.0.113.5, 10.1.2.3",
				       "CONTENT_TYPE=application/json", "CONTENT_LENGTH=34", NULL};
		is_int(cgi_req(&w, chain, code, &out), 429, "... nor behind two trusted proxies (right-most untrusted)");
	}
	limited = 0;
	for (int i = 0; i < 7; i++) {
		char x[80];
		snprintf(x, sizeof x, "HTTP_X_FORWARDED_FOR=192.0.2.%d", i + 1);
		const char *env[] = {"REQUEST_METHOD=POST", "PATH_INFO=/discounts/validate",
				     "REMOTE_ADDR=198.51.100.99", x,
				     "CONTENT_TYPE=application/json", "CONTENT_LENGTH=34", NULL};
		limited += cgi_req(&w, env, code, &out) == 429;
	}
	is_int(limited, 2, "X-Forwarded-For from an untrusted address is ignored: it keys on REMOTE_ADDR");
	set_cfg(&w.cfg.trusted_proxies, "");
	{
		const char *env[] = {"REQUEST_METHOD=POST", "PATH_INFO=/discounts/validate",
				     "REMOTE_ADDR=127.0.0.1", "HTTP_X_FORWARDED_FOR=203.0.113.77",
				     "CONTENT_TYPE=application/json", "CONTENT_LENGTH=34", NULL};
		int n = 0;
		for (int i = 0; i < 6; i++)
			n += cgi_req(&w, env, code, &out) == 429;
		is_int(n, 1, "with trusted_proxies empty, X-Forwarded-For counts for nothing");
	}
	w.cfg.rate_ip_per_min = 120;

	/* trusted_proxies is checked when the configuration loads */
	struct config c;
	char cerr[300] = "";
	setenv("REMARKET_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.300", 1);
	ok(cfg_load(&c, NULL, cerr, sizeof cerr) < 0 && contains(cerr, "trusted_proxies: '10.0.0.300'"),
	   "a bad trusted_proxies entry stops the configuration: %s", cerr);
	cfg_free(&c);
	static const char *const goodp[] = {"127.0.0.1 ::1", "10.0.0.0/8,192.168.0.0/16", "fd00::/8", ""};
	static const char *const badp[] = {"10.0.0.0/33", "::1/129", "10.0.0.0/", "localhost", "10.0.0.0/8x"};
	for (size_t i = 0; i < sizeof goodp / sizeof goodp[0]; i++) {
		setenv("REMARKET_TRUSTED_PROXIES", goodp[i], 1);
		ok(cfg_load(&c, NULL, cerr, sizeof cerr) == 0, "trusted_proxies '%s' loads", goodp[i]);
		cfg_free(&c);
	}
	for (size_t i = 0; i < sizeof badp / sizeof badp[0]; i++) {
		setenv("REMARKET_TRUSTED_PROXIES", badp[i], 1);
		ok(cfg_load(&c, NULL, cerr, sizeof cerr) < 0, "trusted_proxies '%s' is refused", badp[i]);
		cfg_free(&c);
	}
	unsetenv("REMARKET_TRUSTED_PROXIES");
	unsetenv("REMARKET_NOW");
	buf_free(&out);
	world_close(&w);
}

/* ==== Across sections: review and fuzz findings ======================= */

static void test_review_fixes(void)
{
	struct world w;
	struct tick_summary sum;
	struct ev_error err;
	if (!ok(world_open(&w, "fixes") == 0, "fixes: world opens"))
		return;
	cart_event(&w, "cw@example.com", "Cw", "cw1", 1, T0);
	tick(&w, T0 + HOUR, &sum);
	is_int(sum.sent, 1, "consent: step 1 goes");
	ingest(&w, EV_HOOK, "{\"type\":\"identify\",\"email\":\"cw@example.com\",\"consent\":false}",
	       T0 + 2 * HOUR, &err);
	tick(&w, T0 + DAY, &sum);
	is_int(sum.sent, 0, "consent withdrawn: step 2 does not go");
	is_int(sq(&w, "SELECT count(*) FROM enrollments WHERE exit_reason = 'consent withdrawn'"), 1,
	       "... the sequence ends, saying why");

	/* a discount step with no valid= gets 48 h, not an expired code */
	db_scalar(w.app.db, "UPDATE steps SET discount_pct = 10, discount_valid = NULL "
		  "WHERE flow_id = 1 AND position = 1");
	cart_event(&w, "dv@example.com", "Dv", "dv1", 1, T0);
	tick(&w, T0 + HOUR, &sum);
	is_int(sq(&w, "SELECT expires FROM discounts"), T0 + HOUR + 48 * HOUR,
	       "a discount without valid= lasts 48 hours");
	db_scalar(w.app.db, "UPDATE steps SET discount_pct = NULL WHERE flow_id = 1 AND position = 1");

	/* templates saved with CRLF work; invalid UTF-8 is refused, retried */
	char dir[PATH_MAX + 16], path[PATH_MAX + 64];
	snprintf(dir, sizeof dir, "%s/tpl-fixes", tmpdir);
	mkdir(dir, 0755);
	snprintf(path, sizeof path, "%s/crlf.txt", dir);
	FILE *f = fopen(path, "w");
	fputs("Subject: Hello {{first_name}}\r\n\r\nYour cart.\r\n{{>footer}}\r\n", f);
	fclose(f);
	snprintf(path, sizeof path, "%s/crlf.html", dir);
	f = fopen(path, "w");
	fputs("<p>Hello</p>\r\n", f);
	fclose(f);
	snprintf(path, sizeof path, "%s/footer.txt", dir);
	f = fopen(path, "w");
	fputs("-- \r\n{{postal_address}}\r\n", f);
	fclose(f);
	snprintf(path, sizeof path, "%s/bad.txt", dir);
	f = fopen(path, "w");
	fputs("Subject: \x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80"
	      "\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80"
	      "\x80\x80\x80\x80\x80\x80\x80\n\nbody\n", f);
	fclose(f);
	snprintf(path, sizeof path, "%s/bad.html", dir);
	f = fopen(path, "w");
	fputs("<p>x</p>", f);
	fclose(f);
	set_cfg(&w.cfg.templates, dir);
	db_scalar(w.app.db, "UPDATE steps SET template = 'crlf' WHERE flow_id = 1 AND position = 1");
	cart_event(&w, "crlf@example.com", "Cr", "cr1", 1, T0 + 2 * DAY);
	tick(&w, T0 + 2 * DAY + HOUR, &sum);
	is_int(sum.sent, 1, "a template saved with CRLF line ends is sent");
	char *subj = sq_text(&w, "SELECT 1");
	free(subj);
	db_scalar(w.app.db, "UPDATE steps SET template = 'bad' WHERE flow_id = 1 AND position = 1");
	cart_event(&w, "bad@example.com", "Bad", "bad1", 1, T0 + 3 * DAY);
	tick(&w, T0 + 3 * DAY + HOUR, &sum);
	char *why = sq_text(&w, "SELECT m.status || ': ' || m.error FROM messages m JOIN contacts c "
			    "ON c.id = m.contact_id WHERE c.email = 'bad@example.com'");
	ok(why && !strcmp(why, "queued: template bad: not valid UTF-8"),
	   "a template that is not UTF-8 is refused, the message waits (%s)", why ? why : "-");
	free(why);
	is_int(sq(&w, "SELECT attempts FROM messages m JOIN contacts c ON c.id = m.contact_id "
		  "WHERE c.email = 'bad@example.com'"), 0, "... counting no attempt");
	world_close(&w);
}

static void test_fuzz_findings(void)
{
	struct world w;
	char err[200] = "", tpl[128];
	struct buf out = {0};
	struct tctx ctx = {NULL, 0, NULL};
	/* template target: a partial name of 64+ bytes was refused with an
	 * empty message (the renderer returned -1 without saying why) */
	snprintf(tpl, sizeof tpl, "{{>%s}}", "p123456789p123456789p123456789p123456789"
		 "p123456789p123456789p1234");
	is_int(tpl_render(tpl, &ctx, TPL_TEXT, templates, ".txt", &out, err, sizeof err),
	       -1, "fuzz: a partial name of 65 bytes is refused");
	ok(strstr(err, "partial") && strstr(err, "63 bytes"),
	   "... saying which limit (%s)", vis(err));
	buf_free(&out);

	/* template target: a Feedback-ID of 190+ bytes was cut by snprintf
	 * after its CR, and the bare CR glued the next header to it */
	char fid[260];
	memset(fid, 'f', sizeof fid - 1);
	fid[sizeof fid - 1] = '\0';
	struct mail m = {"Shop <shop@example.com>", "a@example.com", "Hi",
			 "<1.u@example.com>", "<https://shop.example.com/rm/u/x>",
			 "text", "<p>html</p>", T0, fid, NULL, NULL};
	int rc = mail_build(&m, &out, err, sizeof err);
	ok(rc == -1 && strstr(err, "Feedback-ID"),
	   "fuzz: mail_build refuses a Feedback-ID it cannot fit (%s)", vis(err));
	ok(!out.len || strstr(out.data, "\r\nContent-Type: multipart/"),
	   "... never gluing the next header to it");
	buf_free(&out);

	/* csv target: import orders with a header lacking order_id leaked
	 * the header's buffer (LeakSanitizer and valgrind catch the leak) */
	if (!ok(world_open(&w, "fuzzfind") == 0, "fuzz: world opens"))
		return;
	static char csv[] = "email,sku\na@example.com,X\n";
	FILE *f = fmemopen(csv, sizeof csv - 1, "r");
	if (ok(f != NULL, "fuzz: fmemopen")) {
		is_int(import_orders(&w.app, f, T0), 1,
		       "fuzz: import orders refuses a header without order_id (1)");
		fclose(f);
	}
	is_int(sq(&w, "SELECT count(*) FROM orders"), 0, "... and stores nothing");
	world_close(&w);
}

/* The checks before sending (check_run) and the template parser's lines:
 * a broken template named by file and line, a missing partial, the
 * links and the sender a real relay refuses, no password shown. */
static void test_status(void)
{
	struct world w;
	char err[300], dir[PATH_MAX], path[PATH_MAX + 32], stat_dir[PATH_MAX + 16];
	struct buf out = {0}, json = {0}, text = {0};
	struct tvar v[] = {{"x", "1", NULL, 0}};
	struct tctx ctx = {v, 1, NULL};
	is_int(render("a\nb\n{{#x}}c", &ctx, TPL_TEXT, NULL, NULL, &out, err, sizeof err),
	       -1, "a section never closed is refused");
	is_str(err, "line 3: '{{#x}}' is never closed", "... naming its line and its tag");
	render("{{#x}}\n{{/y}}", &ctx, TPL_TEXT, NULL, NULL, &out, err, sizeof err);
	is_str(err, "line 2: '{{/y}}' closes no open section", "a stray close: its line");
	buf_free(&out);
	if (world_open(&w, "status") < 0) {
		ok(0, "status world");
		return;
	}
	snprintf(stat_dir, sizeof stat_dir, "%s/../static", templates);
	set_cfg(&w.cfg.static_dir, stat_dir);
	struct problems p = {0};
	int level = check_run(&w.app, T0, CHECK_STATUS, &json, &p, &text);
	is_int(level, CHECK_WARN, "status of a new install: warnings only (no tick yet)");
	ok(strstr(buf_str_or(&json), "{\"name\":\"templates\",\"level\":\"ok\"") &&
	   strstr(buf_str_or(&json), "\"status\":\"warn\",\"exit\":3"),
	   "... its JSON says the templates are ok and exit 3");
	ok(strstr(buf_str_or(&text), "warn  last_tick") != NULL, "... its text names the warning");
	is_int(p.n, 0, "... and no problem stops sending");

	/* one enabled step, its template broken in both parts */
	snprintf(dir, sizeof dir, "%s/tpl-broken", tmpdir);
	mkdir(dir, 0700);
	snprintf(path, sizeof path, "%s/cart_reminder.txt", dir);
	const char *txt = "Subject: Hi\n\nHello\n{{>foot}}\n", *html = "<p>\n\n{{#first_name}}\n";
	write_file(path, txt, strlen(txt));
	snprintf(path, sizeof path, "%s/cart_reminder.html", dir);
	write_file(path, html, strlen(html));
	set_cfg(&w.cfg.templates, dir);
	db_scalar(w.app.db, "UPDATE flows SET enabled = (name = 'abandoned_cart')");
	db_scalar(w.app.db, "DELETE FROM steps WHERE flow_id = 1 AND position > 1");
	memset(&p, 0, sizeof p);
	is_int(check_run(&w.app, T0, CHECK_TICK, NULL, &p, NULL), CHECK_STOP,
	       "a broken template stops a tick");
	char want[PATH_MAX + 200];
	snprintf(want, sizeof want, "%s/cart_reminder.html:3: '{{#first_name}}' is never "
		 "closed (abandoned_cart step 1)", dir);
	int found = 0;
	for (int i = 0; i < p.n; i++)
		found |= !strcmp(p.line[i], want);
	ok(found, "... the problem names the file and the line");
	snprintf(want, sizeof want, "%s/cart_reminder.txt:4: partial %s/foot.txt", dir, dir);
	found = 0;
	for (int i = 0; i < p.n; i++)
		found |= !strncmp(p.line[i], want, strlen(want));
	ok(found, "... and the missing partial, where it is named");
	if (!found)
		for (int i = 0; i < p.n; i++)
			diag("%s", p.line[i]);
	set_cfg(&w.cfg.templates, templates);

	/* a real relay: https links a shopper can open, a real sender */
	set_cfg(&w.cfg.smtp_url, "smtp://127.0.0.1:1");
	set_cfg(&w.cfg.base_url, "http://127.0.0.1:8080/rm");
	memset(&p, 0, sizeof p);
	is_int(check_run(&w.app, T0, CHECK_TICK, NULL, &p, NULL), CHECK_STOP,
	       "a real relay with http links and the demo sender: refused");
	buf_reset(&text);
	for (int i = 0; i < p.n; i++)
		buf_addf(&text, "%s\n", p.line[i]);
	ok(strstr(buf_str_or(&text), "base_url http://127.0.0.1:8080/rm: not https") &&
	   strstr(buf_str_or(&text), "from is the demo's") &&
	   strstr(buf_str_or(&text), "postal_address is the demo's"),
	   "... naming base_url, from and postal_address");
	set_cfg(&w.cfg.from, "Shop <shop@shop.example>");
	set_cfg(&w.cfg.postal_address, "2 Real Road, Lyon");
	set_cfg(&w.cfg.base_url, "https://localhost/rm");
	set_cfg(&w.cfg.cart_url, "https://[::1]/cart?restore={cart}");
	memset(&p, 0, sizeof p);
	is_int(check_run(&w.app, T0, CHECK_TICK, NULL, &p, NULL), CHECK_STOP,
	       "https links to this machine: refused");
	is_int(p.n, 2, "... both (localhost, [::1])");
	set_cfg(&w.cfg.allow_insecure_links, "yes");
	is_int(check_run(&w.app, T0, CHECK_TICK, NULL, NULL, NULL), CHECK_WARN,
	       "... a warning with allow_insecure_links = yes");
	set_cfg(&w.cfg.allow_insecure_links, "no");
	set_cfg(&w.cfg.base_url, "https://shop.example/rm");
	set_cfg(&w.cfg.cart_url, "https://shop.example/cart?restore={cart}&code={code}");
	is_int(check_run(&w.app, T0, CHECK_TICK, NULL, NULL, NULL), CHECK_OK,
	       "https links to a public host and a real sender: ok");

	/* status probes the relay (none on port 1) and never shows a password */
	set_cfg(&w.cfg.smtp_url, "smtp://shop:topsecret@127.0.0.1:1");
	buf_reset(&json);
	buf_reset(&text);
	is_int(check_run(&w.app, T0, CHECK_STATUS, &json, NULL, &text), CHECK_STOP,
	       "status: a relay that does not answer stops sending");
	ok(strstr(buf_str_or(&json), "{\"name\":\"relay\",\"level\":\"stop\"") != NULL,
	   "... the relay check says stop");
	ok(!strstr(buf_str_or(&json), "topsecret") && !strstr(buf_str_or(&text), "topsecret"),
	   "... and the password of smtp_url is never shown");
	ok(strstr(buf_str_or(&text), "smtp://shop@127.0.0.1:1") != NULL,
	   "... the relay named without it");
	buf_free(&json);
	buf_free(&text);
	world_close(&w);
}

/* remarket preview / send-test (mail_preview) and the store's look in
 * every mail: brand_color and logo_url, checked at config load. */
static void test_preview(void)
{
	struct world w;
	char err[512] = "";
	struct config c;
	setenv("REMARKET_BRAND_COLOR", "green", 1);
	int rc = cfg_load(&c, NULL, err, sizeof err);
	ok(rc < 0 && strstr(err, "brand_color"), "brand_color 'green' is refused at load (%s)",
	   vis(err));
	setenv("REMARKET_BRAND_COLOR", "#12345g", 1);
	ok(cfg_load(&c, NULL, err, sizeof err) < 0, "brand_color '#12345g' is refused");
	setenv("REMARKET_BRAND_COLOR", "#AbCdEf", 1);
	setenv("REMARKET_LOGO_URL", "javascript:alert(1)", 1);
	rc = cfg_load(&c, NULL, err, sizeof err);
	ok(rc < 0 && strstr(err, "logo_url"), "logo_url 'javascript:' is refused (%s)", vis(err));
	setenv("REMARKET_LOGO_URL", "https://shop.example.com/logo.png", 1);
	err[0] = '\0';
	rc = cfg_load(&c, NULL, err, sizeof err);
	if (ok(rc == 0, "#AbCdEf and an https logo load (%s)", vis(err))) {
		is_str(c.brand_color, "#AbCdEf", "... brand_color kept");
		cfg_free(&c);
	}
	if (!ok(world_open(&w, "preview") == 0, "preview: world opens"))
		goto env;
	cart_event(&w, "zoe@example.com", "Zoë Ångström", "z1", 1, T0);
	const char *counts = "SELECT (SELECT count(*) FROM messages) * 1000000 + "
			     "(SELECT count(*) FROM enrollments) * 1000 + "
			     "(SELECT count(*) FROM discounts)";
	long long before = sq(&w, "%s", counts);
	struct buf text = {0}, html = {0}, msg = {0};
	err[0] = '\0';
	rc = mail_preview(&w.app, "cart_incentive", NULL, "zoe@example.com", NULL,
			      T0 + DAY, "", &text, &html, &msg, err, sizeof err);
	if (ok(rc == 0, "preview of cart_incentive for a real contact (%s)", vis(err))) {
		ok(contains(text.data, "Hi Zoë,"), "... for that contact, by name");
		ok(contains(text.data, "Wool rug") && contains(text.data, "Linen lamp"),
		   "... with their cart's items");
		ok(contains(text.data, PREVIEW_CODE), "... the discount is a visibly fake code");
		ok(contains(html.data, "<title>Your cart, now 10% off</title>"),
		   "the subject is written once: the .txt's, shown as the HTML's <title>");
		ok(contains(html.data, "#AbCdEf") && contains(html.data, "logo.png\" width=\"200\" height=\"50\""),
		   "... brand_color and logo_url reach the HTML");
		is_str(header_of(msg.data, "To"), "=?UTF-8?B?Wm/DqyDDhW5nc3Ryw7Zt?= <zoe@example.com>",
	       "... addressed to the contact, by name");
	}
	is_int(sq(&w, "%s", counts), before, "a preview writes no message, enrollment or code");
	buf_reset(&text), buf_reset(&html), buf_reset(&msg);
	err[0] = '\0';
	rc = mail_preview(&w.app, "winback_offer", NULL, NULL, "me@example.org", T0 + DAY,
			  "[TEST] ", &text, &html, &msg, err, sizeof err);
	ok(rc == 0 && !strcmp(header_of(msg.data, "Subject"),
			      "[TEST] A thank-you from Maison Demo: 15% off your next order"),
	   "send-test's mail: '[TEST] ' before the subject (%s)", vis(err));
	is_str(header_of(msg.data, "To"), "Sample Customer <me@example.org>",
	       "... to the test address (with the sample's name, as a contact sees it)");
	ok(contains(html.data, "<title>A thank-you from"), "... not before the <title>");
	ok(contains(text.data, "Hi Sample,"), "... for a sample contact without --email");
	buf_reset(&text), buf_reset(&html), buf_reset(&msg);
	err[0] = '\0';
	rc = mail_preview(&w.app, "cart_reminder", NULL, NULL, NULL, T0, "", &text, &html,
			  &msg, err, sizeof err);
	ok(rc == 0 && contains(text.data, "Sample product") &&
	   contains(text.data, "Total: \xE2\x82\xAC" "88.00"),
	   "a sample cart (empty catalog): made-up items, and their total (%s)", vis(err));
	char tok[TOK_MAXLEN + 1] = "";
	const char *u = strstr(html.data ? html.data : "", BASE_URL "/u/");
	int64_t subject = -1;
	for (size_t i = 0; u && i < TOK_MAXLEN; i++) {
		char ch = u[strlen(BASE_URL "/u/") + i];
		if (!isalnum((unsigned char)ch) && ch != '-' && ch != '_')
			break;
		tok[i] = ch, tok[i + 1] = '\0';
	}
	ok(app_tok_verify(&w.app, tok, TOK_UNSUB, T0 + DAY, &subject) == TOK_OK && subject == 0,
	   "its links are signed for message 0 (no message): following them changes nothing");
	buf_reset(&text), buf_reset(&html), buf_reset(&msg);
	err[0] = '\0';
	rc = mail_preview(&w.app, "order_thanks", NULL, "zoe@example.com", NULL, T0 + DAY, "",
			  &text, &html, &msg, err, sizeof err);
	ok(rc == -1 && strstr(err, "no order"), "a contact without an order: post-purchase "
	   "preview refused, saying so (%s)", vis(err));
	err[0] = '\0';
	rc = mail_preview(&w.app, "order_thanks", NULL, NULL, NULL, T0 + DAY, "",
			  &text, &html, &msg, err, sizeof err);
	ok(rc == 0 && contains(text.data, "Order SAMPLE-1001"), "a sample order otherwise (%s)",
	   vis(err));
	err[0] = '\0';
	rc = mail_preview(&w.app, "cart_reminder", NULL, "nobody@example.com", NULL, T0, "",
			  &text, &html, &msg, err, sizeof err);
	ok(rc == -1 && strstr(err, "no contact"), "an unknown --email is refused (%s)", vis(err));
	err[0] = '\0';
	rc = mail_preview(&w.app, "footer", NULL, NULL, NULL, T0, "", &text, &html, &msg,
			  err, sizeof err);
	ok(rc == -1 && strstr(err, "--trigger"), "a template no step sends needs --trigger (%s)",
	   vis(err));
	buf_free(&text), buf_free(&html), buf_free(&msg);
	is_int(sq(&w, "%s", counts), before, "... and still nothing was written");
	world_close(&w);
env:
	unsetenv("REMARKET_BRAND_COLOR");
	unsetenv("REMARKET_LOGO_URL");
}

/* ==== Main ============================================================ */

static int find_templates(void)
{
	char from_file[PATH_MAX], probe[PATH_MAX + 32];
	const char *slash = strrchr(__FILE__, '/');
	snprintf(from_file, sizeof from_file, "%.*s../templates",
		 slash ? (int)(slash - __FILE__ + 1) : 0, __FILE__);
	const char *cands[] = {getenv("RM_TEMPLATES"), from_file, "templates"};
	for (size_t i = 0; i < 3; i++) {
		if (!cands[i] || !realpath(cands[i], templates))
			continue;
		snprintf(probe, sizeof probe, "%s/cart_reminder.txt", templates);
		if (access(probe, R_OK) == 0)
			return 0;
	}
	return -1;
}

/* Only our own REMARKET_* variables: none from the caller's environment. */
static void clear_env(void)
{
	extern char **environ;
	for (int again = 1; again;) {
		again = 0;
		for (char **e = environ; *e; e++) {
			if (strncmp(*e, "REMARKET_", 9) != 0)
				continue;
			char name[128];
			snprintf(name, sizeof name, "%.*s", (int)strcspn(*e, "="), *e);
			unsetenv(name);
			again = 1;
			break;
		}
	}
}

static int setup(void)
{
	char path[PATH_MAX + 32];
	unsigned char key[RM_KEYBYTES];
	snprintf(tmpdir, sizeof tmpdir, "/tmp/rm-unit-XXXXXX");
	if (!mkdtemp(tmpdir)) {
		printf("Bail out! mkdtemp: %s\n", strerror(errno));
		return -1;
	}
	if (find_templates() < 0) {
		printf("Bail out! templates/ not found: set RM_TEMPLATES\n");
		return -1;
	}
	clear_env();
	for (int i = 0; i < RM_KEYBYTES; i++)
		key[i] = (unsigned char)(i * 13 + 1);
	snprintf(path, sizeof path, "%s/key", tmpdir);
	if (write_file(path, key, sizeof key) < 0)
		return -1;
	setenv("REMARKET_KEY_FILE", path, 1);
	snprintf(path, sizeof path, "%s/empty.conf", tmpdir);
	write_file(path, "", 0);
	setenv("REMARKET_CONFIG", path, 1); /* never ./remarket.conf */
	setenv("REMARKET_TEMPLATES", templates, 1);
	setenv("REMARKET_SMTP_URL", "", 1);
	setenv("REMARKET_HOOK_SECRET", HOOK_SECRET, 1);
	setenv("REMARKET_TICK_TOKEN", TICK_TOKEN, 1);
	setenv("REMARKET_CART_URL", CART_URL, 1);
	setenv("REMARKET_BASE_URL", BASE_URL, 1);
	setenv("REMARKET_FROM", "Maison Demo <shop@example.com>", 1);
	return 0;
}

/* ==== Carts as real shops have them (issue 15) ========================== */

/* One event body made from FMT, ingested from SRC at NOW (visitor VID for
 * a browser); the accepted count, or -1 with a diag. */
static int evf(struct world *w, enum ev_source src, const char *vid, rm_time now,
	       const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static int evf(struct world *w, enum ev_source src, const char *vid, rm_time now,
	       const char *fmt, ...)
{
	struct buf b = {0};
	struct ev_error err;
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	char *body = n >= 0 ? malloc((size_t)n + 1) : NULL;
	if (!body)
		return -1;
	va_start(ap, fmt);
	vsnprintf(body, (size_t)n + 1, fmt, ap);
	va_end(ap);
	int rc = ev_ingest(&w->app, src, body, strlen(body), vid, now, &err);
	if (rc < 0)
		diag("event refused (%d %s): %s", err.status, err.msg, body);
	free(body);
	buf_free(&b);
	return rc;
}

/* The text part of message ID's mail, decoded (caller frees). */
static void gen_mail_text(struct world *w, long long id, struct buf *dec)
{
	struct buf mail = {0};
	outbox_read(w, id, &mail);
	mime_part(mail.data ? mail.data : "", "text/plain", dec);
	buf_free(&mail);
}

/* Where message ID's recovery link sends the shopper (its Location). */
static void restore_of(struct world *w, long long id, rm_time now, char *out,
		       size_t n)
{
	char tok[TOK_MAXLEN + 1], path[TOK_MAXLEN + 8];
	struct http_resp rs;
	tok_sign(w->app.key, TOK_RECOVER, id, now + DAY, tok, sizeof tok);
	snprintf(path, sizeof path, "/r/%s", tok);
	http(w, "GET", path, NULL, NULL, NULL, now, &rs);
	snprintf(out, n, "%d %s", rs.status, resp_header(&rs, "Location"));
	http_resp_free(&rs);
}

#define GEN_ITEMS1 "[{\"sku\":\"LAMP-1\",\"name\":\"Linen lamp\",\"price\":49.5}]"
#define GEN_ITEMS2 "[{\"sku\":\"LAMP-1\",\"name\":\"Linen lamp\",\"price\":49.5}," \
		   "{\"sku\":\"VASE-3\",\"name\":\"Stone vase\",\"price\":30}]"

/* The REES46 pattern with signed hooks: cart, reminder, order, an item
 * added after the order, idle an hour, a reminder for the new generation,
 * an order on it; the report counts both. */
static void test_cart_generations(void)
{
	struct world w;
	struct tick_summary s;
	char loc[600];
	if (!ok(world_open(&w, "generations") == 0, "generations: world opens"))
		return;
	w.cfg.min_gap_hours = 0; /* two reminders 3 h apart: no smart sending */
	evf(&w, EV_HOOK, NULL, T0, "{\"type\":\"cart\",\"email\":\"gen@example.com\","
	    "\"name\":\"Gen\",\"consent\":true,\"cart_id\":\"g1\",\"items\":" GEN_ITEMS1 "}");
	ok(tick(&w, T0 + HOUR, &s) == 0 && sum_is(&s, 1, 1, 1),
	   "generation 1: abandoned, enrolled and reminded at +1 h");
	long long old_cart = sq(&w, "SELECT id FROM carts WHERE cart_key = 'g1'");
	long long m1 = sq(&w, "SELECT max(id) FROM messages");
	is_int(evf(&w, EV_HOOK, NULL, T0 + 2 * HOUR, "{\"type\":\"order\",\"order_id\":\"go1\","
		   "\"email\":\"gen@example.com\",\"cart_id\":\"g1\",\"total\":49.5,\"ts\":%lld,"
		   "\"items\":" GEN_ITEMS1 "}", (long long)(T0 + 2 * HOUR)), 1,
	       "order go1 on cart g1 at +2 h");
	/* a late cart event from before the order: no new generation */
	is_int(evf(&w, EV_HOOK, NULL, T0 + 2 * HOUR + 60, "{\"type\":\"cart\",\"cart_id\":\"g1\","
		   "\"ts\":%lld,\"items\":" GEN_ITEMS2 "}", (long long)(T0 + 2 * HOUR - 600)), 1,
	       "a late cart event (ts before the order) is accepted");
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE cart_key GLOB 'g1*'"), 1,
	       "... and starts no generation (one row, still ordered)");
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE cart_key = 'g1' AND status = 'ordered' "
		  "AND generation = 1"), 1, "... the cart stays ordered, generation 1");
	/* the same items sent again after the order: nothing new either */
	evf(&w, EV_HOOK, NULL, T0 + 2 * HOUR + 120, "{\"type\":\"cart\",\"cart_id\":\"g1\","
	    "\"items\":" GEN_ITEMS2 "}");
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE cart_key GLOB 'g1*'"), 1,
	       "a resent cart with the items it had starts no generation");
	/* an item added after the order: generation 2 */
	is_int(evf(&w, EV_HOOK, NULL, T0 + 3 * HOUR, "{\"type\":\"cart\",\"cart_id\":\"g1\","
		   "\"items\":[{\"sku\":\"LAMP-1\",\"name\":\"Linen lamp\",\"price\":49.5},"
		   "{\"sku\":\"VASE-3\",\"name\":\"Stone vase\",\"price\":30},"
		   "{\"sku\":\"RUG-2\",\"name\":\"Wool rug\",\"price\":120}]}"), 1,
	       "an item added after the order (later ts)");
	long long new_cart = sq(&w, "SELECT id FROM carts WHERE cart_key = 'g1'");
	ok(new_cart > old_cart, "... starts a new generation: a new row under the cart id");
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE id = %lld AND cart_key = 'g1#1' "
		  "AND status = 'ordered' AND generation = 1", old_cart), 1,
	       "... the ordered generation keeps its row as g1#1");
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE id = %lld AND status = 'open' AND "
		  "generation = 2 AND started = %lld AND contact_id = (SELECT id FROM contacts "
		  "WHERE email = 'gen@example.com')", new_cart, (long long)(T0 + 3 * HOUR)), 1,
	       "... the new one is open, generation 2, the same contact (the event named none)");
	is_int(sq(&w, "SELECT cart_id FROM orders WHERE order_key = 'go1'"), old_cart,
	       "... order go1 stays with generation 1");
	/* a late order of generation 1 (ts before generation 2 began) */
	evf(&w, EV_HOOK, NULL, T0 + 3 * HOUR + 60, "{\"type\":\"order\",\"order_id\":\"go1b\","
	    "\"email\":\"gen@example.com\",\"cart_id\":\"g1\",\"total\":1,\"ts\":%lld,"
	    "\"items\":" GEN_ITEMS1 "}", (long long)(T0 + 2 * HOUR + 1800));
	is_int(sq(&w, "SELECT cart_id FROM orders WHERE order_key = 'go1b'"), old_cart,
	       "a late order with a ts before generation 2 belongs to generation 1");
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE id = %lld AND status = 'open'", new_cart), 1,
	       "... and leaves generation 2 open");
	ok(tick(&w, T0 + 4 * HOUR - 60, &s) == 0 && sum_is(&s, 0, 0, 0),
	   "generation 2: nothing before it is idle an hour");
	ok(tick(&w, T0 + 4 * HOUR, &s) == 0 && sum_is(&s, 1, 1, 1),
	   "generation 2: abandoned, enrolled again, reminded at +1 h idle");
	long long m2 = sq(&w, "SELECT max(id) FROM messages");
	is_int(sq(&w, "SELECT e.cart_id FROM messages m JOIN enrollments e ON e.id = m.enrollment_id "
		  "WHERE m.id = %lld", m2), new_cart, "... its sequence is the new generation's");
	struct buf dec = {0};
	gen_mail_text(&w, m2, &dec);
	ok(contains(dec.data, "Stone vase") && contains(dec.data, "Wool rug"),
	   "... the reminder shows the new generation's items");
	buf_free(&dec);
	/* the restore links: the shop holds one cart per id, so both the new
	 * and the old generation's link restore the current cart g1 */
	restore_of(&w, m2, T0 + 4 * HOUR + 300, loc, sizeof loc);
	ok(!strncmp(loc, "302 ", 4) && contains(loc, "restore=g1&"),
	   "the new generation's /r/ link restores cart g1 (%s)", loc);
	restore_of(&w, m1, T0 + 4 * HOUR + 300, loc, sizeof loc);
	ok(!strncmp(loc, "302 ", 4) && contains(loc, "restore=g1&") && !contains(loc, "%23"),
	   "the old generation's /r/ link restores the current cart g1, not g1#1 (%s)", loc);
	/* an order on generation 2 ends its sequence only */
	long long e1 = sq(&w, "SELECT e.id FROM messages m JOIN enrollments e ON e.id = m.enrollment_id "
			  "WHERE m.id = %lld", m1);
	char *r1 = sq_text(&w, "SELECT status || '/' || exit_reason FROM enrollments WHERE id = 1");
	evf(&w, EV_HOOK, NULL, T0 + 5 * HOUR, "{\"type\":\"order\",\"order_id\":\"go2\","
	    "\"email\":\"gen@example.com\",\"cart_id\":\"g1\",\"total\":199.5,\"ts\":%lld,"
	    "\"items\":" GEN_ITEMS2 "}", (long long)(T0 + 5 * HOUR));
	is_int(sq(&w, "SELECT cart_id FROM orders WHERE order_key = 'go2'"), new_cart,
	       "order go2 belongs to generation 2");
	is_int(sq(&w, "SELECT count(*) FROM enrollments WHERE cart_id = %lld AND status = 'exited' "
		  "AND exit_reason = 'order'", new_cart), 1, "... and ends generation 2's sequence");
	char *r1b = sq_text(&w, "SELECT status || '/' || exit_reason FROM enrollments WHERE id = 1");
	ok(e1 == 1 && r1 && r1b && !strcmp(r1, r1b) && !strcmp(r1, "exited/order"),
	   "... generation 1's sequence is as go1 left it (%s)", r1b ? r1b : "?");
	free(r1), free(r1b);
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE id = %lld AND status = 'ordered'", new_cart), 1,
	       "... generation 2 is ordered");
	is_int(sq(&w, "SELECT message FROM orders WHERE order_key = 'go1'"), m1,
	       "order go1 stays attributed to generation 1's reminder");
	is_attr(&w, "go2", "click", m2, "order go2 is attributed to generation 2's reminder (clicked)");
	/* generation 3, ordered before any mail about it: the click on
	 * generation 2's mail earned go2, not this order too */
	evf(&w, EV_HOOK, NULL, T0 + 6 * HOUR, "{\"type\":\"cart\",\"cart_id\":\"g1\","
	    "\"items\":" GEN_ITEMS1 "}");
	is_int(sq(&w, "SELECT generation FROM carts WHERE cart_key = 'g1'"), 3,
	       "another item change after go2: generation 3");
	evf(&w, EV_HOOK, NULL, T0 + 6 * HOUR + 600, "{\"type\":\"order\",\"order_id\":\"go3\","
	    "\"email\":\"gen@example.com\",\"cart_id\":\"g1\",\"total\":49.5,"
	    "\"items\":" GEN_ITEMS1 "}");
	is_attr(&w, "go3", "none", 0, "order go3 (generation 3, no mail of its own) is not "
		"attributed to an earlier generation's mail");
	struct report *r = calloc(1, sizeof *r);
	if (r && report_build(&w.app, T0 - DAY, T0 + DAY, r) == 0) {
		is_int(r->abandoned, 2, "report: two abandoned carts (one per generation mailed)");
		is_int(r->recovered, 2, "report: both recovered");
		is_int(r->orders, 4, "report: four orders (go1, go1b, go2, go3)");
		is_int(r->attributed, 1, "report: one attributed by a click (go2)");
		is_int(r->orders_no_cart, 0, "report: none without a cart");
	}
	free(r);
	world_close(&w);
}

/* A browser's cart "<cart_id>/<vid>" goes on after the store's order too. */
static void test_browser_generations(void)
{
	struct world w;
	struct tick_summary s;
	char loc[600];
	if (!ok(world_open(&w, "gen-browser") == 0, "browser generations: world opens"))
		return;
	product(&w, "A", "lighting", T0);
	product(&w, "B", "rugs", T0);
	evf(&w, EV_BROWSER, "v-gen", T0, "{\"type\":\"identify\",\"email\":\"bg@example.com\","
	    "\"consent\":true}");
	evf(&w, EV_BROWSER, "v-gen", T0, "{\"type\":\"cart\",\"cart_id\":\"shop-9\","
	    "\"items\":[{\"sku\":\"A\",\"qty\":1}]}");
	long long old_cart = sq(&w, "SELECT id FROM carts WHERE cart_key = 'shop-9/v-gen'");
	ok(old_cart > 0, "the browser's cart is shop-9/v-gen");
	evf(&w, EV_HOOK, NULL, T0 + 10 * MIN, "{\"type\":\"order\",\"order_id\":\"bo1\","
	    "\"email\":\"bg@example.com\",\"cart_id\":\"shop-9\",\"total\":10,"
	    "\"items\":[{\"sku\":\"A\",\"name\":\"Product A\",\"price\":10}]}");
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE id = %lld AND status = 'ordered'", old_cart), 1,
	       "the store's order of shop-9 orders the browser's copy");
	evf(&w, EV_BROWSER, "v-gen", T0 + 20 * MIN, "{\"type\":\"cart\",\"cart_id\":\"shop-9\","
	    "\"items\":[{\"sku\":\"A\",\"qty\":1},{\"sku\":\"B\",\"qty\":1}]}");
	long long new_cart = sq(&w, "SELECT id FROM carts WHERE cart_key = 'shop-9/v-gen'");
	ok(new_cart > old_cart, "an item added in the browser after the order: generation 2");
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE id = %lld AND cart_key = 'shop-9/v-gen#1'",
		  old_cart), 1, "... the ordered one is shop-9/v-gen#1");
	ok(tick(&w, T0 + 80 * MIN, &s) == 0 && sum_is(&s, 1, 1, 1),
	   "idle an hour: generation 2 abandoned, enrolled, reminded");
	long long m = sq(&w, "SELECT max(id) FROM messages");
	is_int(sq(&w, "SELECT e.cart_id FROM messages m JOIN enrollments e ON e.id = m.enrollment_id "
		  "WHERE m.id = %lld", m), new_cart, "... for generation 2");
	restore_of(&w, m, T0 + 2 * HOUR, loc, sizeof loc);
	ok(contains(loc, "restore=shop-9&"), "... whose link restores the shop's cart shop-9 (%s)", loc);
	evf(&w, EV_HOOK, NULL, T0 + 3 * HOUR, "{\"type\":\"order\",\"order_id\":\"bo2\","
	    "\"email\":\"bg@example.com\",\"cart_id\":\"shop-9\",\"total\":20,"
	    "\"items\":[{\"sku\":\"B\",\"name\":\"Product B\",\"price\":10}]}");
	is_int(sq(&w, "SELECT count(*) FROM enrollments WHERE cart_id = %lld AND exit_reason = 'order'",
		  new_cart), 1, "the store's second order ends generation 2's sequence");
	world_close(&w);
}

/* Orders that name no cart: counted and attributed like any other. */
static void test_orders_without_cart(void)
{
	struct world w;
	struct tick_summary s;
	if (!ok(world_open(&w, "no-cart") == 0, "orders without a cart: world opens"))
		return;
	cart_event(&w, "nc@example.com", "Nc", "nc1", 1, T0);
	tick(&w, T0 + HOUR, &s);
	long long m = sq(&w, "SELECT max(id) FROM messages");
	char loc[600];
	restore_of(&w, m, T0 + 2 * HOUR, loc, sizeof loc); /* the click */
	evf(&w, EV_HOOK, NULL, T0 + 3 * HOUR, "{\"type\":\"order\",\"order_id\":\"nco1\","
	    "\"email\":\"nc@example.com\",\"total\":10,\"items\":[]}");
	evf(&w, EV_HOOK, NULL, T0 + 3 * HOUR, "{\"type\":\"order\",\"order_id\":\"nco2\","
	    "\"email\":\"walkin@example.com\",\"total\":15,\"items\":[]}");
	is_int(sq(&w, "SELECT count(*) FROM orders WHERE cart_id IS NULL"), 2,
	       "two orders without a cart are recorded");
	is_attr(&w, "nco1", "click", m, "an order without a cart is attributed by its contact's click");
	is_attr(&w, "nco2", "none", 0, "an order without a cart or a mail: not attributed");
	struct report *r = calloc(1, sizeof *r);
	struct buf j = {0};
	if (r && report_build(&w.app, T0 - DAY, T0 + DAY, r) == 0) {
		is_int(r->orders, 2, "report: both orders counted");
		is_int(r->attributed, 1, "report: the clicked one attributed");
		is_int(r->orders_no_cart, 2, "report: both counted as orders without a cart");
		report_json(r, &j);
		ok(contains(j.data, "\"orders_without_cart\":2,"), "report JSON: orders_without_cart 2");
	}
	buf_free(&j);
	free(r);
	world_close(&w);
}

/* [] is a batch of nothing: accepted, 0 events, from every door. */
static void test_empty_batch(void)
{
	struct world w;
	struct http_resp rs;
	struct ev_error err;
	char sig[256];
	if (!ok(world_open(&w, "empty-batch") == 0, "empty batch: world opens"))
		return;
	struct counts before = counts_of(&w);
	is_int(ingest(&w, EV_HOOK, "[]", T0, &err), 0, "ev_ingest: [] from a hook accepts 0 events");
	is_int(ingest(&w, EV_CLI, " [ ] ", T0, &err), 0, "ev_ingest: [ ] from the CLI accepts 0 events");
	is_int(ev_ingest(&w.app, EV_BROWSER, "[]", 2, "v-empty", T0, &err), 0,
	       "ev_ingest: [] from a browser accepts 0 events");
	hook_sign(w.cfg.hook_secret, T0, "[]", 2, sig, sizeof sig);
	http(&w, "POST", "/events", "[]", sig, NULL, T0, &rs);
	is_int(rs.status, 202, "POST /events [] -> 202");
	is_str(rs.body.data, "{\"accepted\":0,\"duplicates\":0}", "... {\"accepted\":0,...}");
	http_resp_free(&rs);
	ok(same_counts(before, counts_of(&w)), "... and nothing is stored");
	is_int(ingest(&w, EV_HOOK, "[[]]", T0, &err), -1, "[[]] is still refused");
	world_close(&w);
}

/* Catalogs with only brand and category: mails name the items by them. */
static void test_nameless_items(void)
{
	struct world w;
	struct tick_summary s;
	struct buf dec = {0};
	if (!ok(world_open(&w, "nameless") == 0, "nameless items: world opens"))
		return;
	w.cfg.min_gap_hours = 0; /* cart and post-purchase mails 2 h apart */
	is_int(evf(&w, EV_HOOK, NULL, T0, "{\"type\":\"product\",\"sku\":\"TV-1\",\"brand\":\"Acme\","
		   "\"category\":\"televisions\",\"price\":300}"), 1,
	       "a product with a brand and category, no name, is accepted");
	evf(&w, EV_HOOK, NULL, T0, "{\"type\":\"product\",\"sku\":\"TV-2\",\"brand\":\"Acme\","
	    "\"category\":\"televisions\",\"price\":400}");
	evf(&w, EV_HOOK, NULL, T0, "{\"type\":\"product\",\"sku\":\"CB-1\",\"category\":\"cables\","
	    "\"price\":5}");
	is_int(evf(&w, EV_HOOK, NULL, T0, "{\"type\":\"product\",\"sku\":\"X-1\",\"price\":5}"), -1,
	       "a product with neither name, brand nor category is refused");
	is_int(sq(&w, "SELECT count(*) FROM products WHERE sku = 'TV-1' AND name = '' "
		  "AND brand = 'Acme'"), 1, "... the brand is stored");
	/* a browser's cart of nameless products */
	evf(&w, EV_BROWSER, "v-nl", T0, "{\"type\":\"identify\",\"email\":\"nl@example.com\","
	    "\"consent\":true}");
	evf(&w, EV_BROWSER, "v-nl", T0, "{\"type\":\"cart\",\"cart_id\":\"nl\","
	    "\"items\":[{\"sku\":\"TV-1\",\"qty\":1},{\"sku\":\"CB-1\",\"qty\":2}]}");
	ok(tick(&w, T0 + HOUR, &s) == 0 && sum_is(&s, 1, 1, 1),
	   "a cart of nameless products is reminded (its items are known)");
	gen_mail_text(&w, sq(&w, "SELECT max(id) FROM messages"), &dec);
	ok(contains(dec.data, "- Acme \xC2\xB7 televisions\n") && contains(dec.data, "- cables\n"),
	   "cart mail: the items are named \"Brand · category\" (or the category)");
	ok(!contains(dec.data, "- \n") && !contains(dec.data, "- TV-1") && !contains(dec.data, "- CB-1"),
	   "... never an empty line or a raw id");
	ok(contains(dec.data, "\xE2\x82\xAC" "310.00"), "... and priced from the catalog");
	buf_free(&dec);
	/* a signed order with nameless items: the post-purchase mail */
	db_scalar(w.app.db, "UPDATE flows SET enabled = 1 WHERE name = 'post_purchase'");
	is_int(evf(&w, EV_HOOK, NULL, T0 + 2 * HOUR, "{\"type\":\"order\",\"order_id\":\"nlo\","
		   "\"email\":\"nl@example.com\",\"total\":300,\"ts\":%lld,"
		   "\"items\":[{\"sku\":\"TV-1\",\"price\":300}]}", (long long)(T0 + 2 * HOUR)), 1,
	       "a signed order item needs no name");
	tick(&w, T0 + 3 * HOUR, &s);
	gen_mail_text(&w, sq(&w, "SELECT max(id) FROM messages"), &dec);
	ok(contains(dec.data, "- Acme \xC2\xB7 televisions\n"),
	   "post-purchase mail: the order's item is named \"Brand · category\"");
	buf_free(&dec);
	/* win-back recommendations of nameless products */
	order_line(&w, "wb", "lapsed@example.com", "CB-1", 5, T0 - 91 * DAY, T0);
	tick(&w, T0 + 4 * HOUR, &s);
	long long wb = sq(&w, "SELECT max(m.id) FROM messages m JOIN contacts c ON c.id = m.contact_id "
			  "WHERE c.email = 'lapsed@example.com'");
	ok(wb > 0, "the lapsed customer gets a win-back");
	gen_mail_text(&w, wb, &dec);
	ok(contains(dec.data, "- Acme \xC2\xB7 televisions \xC2\xB7 "),
	   "win-back mail: a recommendation is named \"Brand · category\"");
	ok(!contains(dec.data, "- TV-") && !contains(dec.data, "-  \xC2\xB7"),
	   "... never by a raw id or an empty name");
	buf_free(&dec);
	world_close(&w);
}

/* The default templates fit any store: the store's name and tagline and
 * the catalog's category, never the demo's home decor; the demo keeps its
 * copy in demo/templates. */
static void test_neutral_copy(void)
{
	struct world w;
	struct tick_summary s;
	struct buf dec = {0}, mail = {0};
	char demo[PATH_MAX + 32];
	if (!ok(world_open(&w, "neutral") == 0, "neutral copy: world opens"))
		return;
	set_cfg(&w.cfg.store_name, "Volt Electronics");
	set_cfg(&w.cfg.store_tagline, "Screens and cables since 1999");
	set_cfg(&w.cfg.postal_address, "Volt Electronics, 1 Volt Way, Lyon");
	evf(&w, EV_HOOK, NULL, T0, "{\"type\":\"product\",\"sku\":\"TV-1\",\"name\":\"Acme 55 inch\","
	    "\"brand\":\"Acme\",\"category\":\"televisions\",\"price\":300}");
	evf(&w, EV_HOOK, NULL, T0, "{\"type\":\"cart\",\"email\":\"volt@example.com\",\"consent\":true,"
	    "\"cart_id\":\"v1\",\"items\":[{\"sku\":\"TV-1\",\"name\":\"Acme 55 inch\",\"price\":300}]}");
	evf(&w, EV_HOOK, NULL, T0, "{\"type\":\"cart\",\"email\":\"decor@example.com\",\"consent\":true,"
	    "\"cart_id\":\"v2\",\"items\":[{\"sku\":\"TV-1\",\"name\":\"Acme 55 inch\",\"price\":300}]}");
	/* the second cart's mail comes from the demo's own set */
	db_scalar(w.app.db, "UPDATE carts SET updated = updated + 60 WHERE cart_key = 'v2'");
	ok(tick(&w, T0 + HOUR, &s) == 0 && s.sent == 1, "the default reminder goes out");
	long long m = sq(&w, "SELECT max(id) FROM messages");
	outbox_read(&w, m, &mail);
	mime_part(mail.data ? mail.data : "", "text/plain", &dec);
	ok(contains(dec.data, "shopping for televisions at Volt Electronics"),
	   "default copy: the store's name and the catalog's category");
	ok(contains(dec.data, "The Volt Electronics team\nScreens and cables since 1999\n"),
	   "default copy: signed by the store, with its store_tagline");
	ok(!contains(dec.data, "home") && !contains(dec.data, "pieces") && !contains(dec.data, "Maison"),
	   "default copy: nothing of the demo's home decor");
	buf_free(&dec);
	mime_part(mail.data ? mail.data : "", "text/html", &dec);
	ok(contains(dec.data, "Screens and cables since 1999</span>") &&
		   contains(dec.data, "shopping for televisions at Volt Electronics"),
	   "default HTML: the tagline under the name, the category in the copy");
	buf_free(&dec), buf_free(&mail);
	snprintf(demo, sizeof demo, "%s/../demo/templates", templates);
	set_cfg(&w.cfg.templates, demo);
	ok(tick(&w, T0 + HOUR + 60, &s) == 0 && s.sent == 1, "the demo set's reminder goes out");
	m = sq(&w, "SELECT max(id) FROM messages");
	outbox_read(&w, m, &mail);
	mime_part(mail.data ? mail.data : "", "text/plain", &dec);
	ok(contains(dec.data, "a few things for your home"),
	   "templates = demo/templates: the demo keeps its home-decor copy");
	buf_free(&dec), buf_free(&mail);
	world_close(&w);
}

/* A delayed order hook: the cart changed after the order's ts before the
 * hook arrived; the change is the next generation all the same. */
static void test_delayed_order(void)
{
	struct world w;
	struct tick_summary s;
	if (!ok(world_open(&w, "delayed-order") == 0, "delayed order: world opens"))
		return;
	evf(&w, EV_HOOK, NULL, T0, "{\"type\":\"cart\",\"email\":\"late@example.com\","
	    "\"consent\":true,\"cart_id\":\"d1\",\"items\":" GEN_ITEMS1 "}");
	evf(&w, EV_HOOK, NULL, T0, "{\"type\":\"cart\",\"email\":\"same@example.com\","
	    "\"consent\":true,\"cart_id\":\"d2\",\"items\":" GEN_ITEMS1 "}");
	evf(&w, EV_HOOK, NULL, T0 + 20 * MIN, "{\"type\":\"cart\",\"cart_id\":\"d1\","
	    "\"items\":" GEN_ITEMS2 "}");
	evf(&w, EV_HOOK, NULL, T0 + 20 * MIN, "{\"type\":\"cart\",\"cart_id\":\"d2\","
	    "\"items\":" GEN_ITEMS1 "}");
	long long d1 = sq(&w, "SELECT id FROM carts WHERE cart_key = 'd1'");
	evf(&w, EV_HOOK, NULL, T0 + 25 * MIN, "{\"type\":\"order\",\"order_id\":\"do1\","
	    "\"email\":\"late@example.com\",\"cart_id\":\"d1\",\"ts\":%lld,"
	    "\"items\":" GEN_ITEMS1 "}", (long long)(T0 + 10 * MIN));
	evf(&w, EV_HOOK, NULL, T0 + 25 * MIN, "{\"type\":\"order\",\"order_id\":\"do2\","
	    "\"email\":\"same@example.com\",\"cart_id\":\"d2\",\"ts\":%lld,"
	    "\"items\":" GEN_ITEMS1 "}", (long long)(T0 + 10 * MIN));
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE id = %lld AND cart_key = 'd1#1' AND "
		  "status = 'ordered' AND item_count = 1", d1), 1,
	       "a delayed order hook: the ordered generation keeps the order's items, as d1#1");
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE cart_key = 'd1' AND status = 'open' "
		  "AND generation = 2 AND item_count = 2 AND updated = %lld", (long long)(T0 + 20 * MIN)), 1,
	       "... the change after the order's ts is generation 2, open, as it stands");
	is_int(sq(&w, "SELECT cart_id FROM orders WHERE order_key = 'do1'"), d1,
	       "... the order stays with generation 1");
	is_int(sq(&w, "SELECT count(*) FROM carts WHERE cart_key GLOB 'd2*'"), 1,
	       "a delayed order hook over a cart that did not change: no generation");
	ok(tick(&w, T0 + 80 * MIN, &s) == 0 && sum_is(&s, 1, 1, 1),
	   "generation 2 is abandoned, enrolled and reminded an hour after its change");
	world_close(&w);
}

static void test_carts_as_shops(void)
{
	test_cart_generations();
	test_browser_generations();
	test_delayed_order();
	test_orders_without_cart();
	test_empty_batch();
	test_nameless_items();
	test_neutral_copy();
}

/* ==== Timing rules: quiet hours, smart sending, the cart first ======== */

struct tz_run { const char *zone; rm_time t; long want; int bad; };

static void *tz_thread(void *arg)
{
	struct tz_run *r = arg;
	for (int i = 0; i < 2000; i++) {
		long off = 1;
		if (tz_offset(r->zone, r->t, &off) < 0 || off != r->want)
			r->bad++;
	}
	return NULL;
}

static void test_quiet_hours(void)
{
	struct world w;
	int a, b;
	long off = 1;
	ok(quiet_parse("21-9", &a, &b) == 0 && a == 21 && b == 9, "quiet: 21-9 parses");
	ok(quiet_parse("", &a, &b) == 0 && a == -1 && b == -1, "quiet: empty is none");
	ok(quiet_parse("9-9", &a, &b) < 0 && quiet_parse("24-1", &a, &b) < 0 &&
	   quiet_parse("21", &a, &b) < 0 && quiet_parse("21-9x", &a, &b) < 0 &&
	   quiet_parse("-1-9", &a, &b) < 0 && quiet_parse("a-b", &a, &b) < 0,
	   "quiet: 9-9, 24-1, 21, 21-9x, -1-9, a-b refused");
	ok(tz_offset("America/New_York", T0, &off) == 0 && off == -5 * HOUR,
	   "tz: New York in November is UTC-5");
	ok(tz_offset("America/New_York", T0 - 140 * DAY, &off) == 0 && off == -4 * HOUR,
	   "tz: ... and UTC-4 in July");
	ok(tz_offset("Asia/Kolkata", T0, &off) == 0 && off == 19800, "tz: Kolkata +5:30");
	ok(!tz_known("Mars/Olympus") && !tz_known("../../etc/passwd") && !tz_known("") &&
	   !tz_known("Europe") && !tz_known("/etc/passwd") && tz_known("Europe/Paris"),
	   "tz: unknown names, paths and directories are refused, Europe/Paris known");
	/* four threads at once on the cache: no TZ change, the right offsets */
	struct tz_run r[4] = {{"Europe/Paris", T0, HOUR, 0}, {"America/New_York", T0, -5 * HOUR, 0},
			      {"Australia/Sydney", T0, 11 * HOUR, 0}, {NULL, T0, 0, 0}};
	pthread_t th[4];
	for (int i = 0; i < 4; i++)
		pthread_create(&th[i], NULL, tz_thread, &r[i]);
	for (int i = 0; i < 4; i++)
		pthread_join(th[i], NULL);
	ok(!r[0].bad && !r[1].bad && !r[2].bad && !r[3].bad,
	   "tz: 4 threads x 2000 look-ups, every offset right (%d %d %d %d wrong)",
	   r[0].bad, r[1].bad, r[2].bad, r[3].bad);
	if (!ok(world_open(&w, "quiet") == 0, "quiet: world opens"))
		return;
	struct config *c = &w.cfg;
	/* T0 is 11:06:40Z: 06:06:40 in New York */
	is_int(quiet_next(c, "sms", "America/New_York", T0), T0 + 10400,
	       "sms at 06:06 in New York waits for 09:00 there (14:00Z)");
	is_int(quiet_next(c, "push", "America/New_York", T0), T0 + 10400, "push too");
	is_int(quiet_next(c, "email", "America/New_York", T0), T0, "email has no quiet hours by default");
	is_int(quiet_next(c, "sms", "Asia/Kolkata", T0), T0, "16:36 in Kolkata: sms goes");
	is_int(quiet_next(c, "sms", NULL, T0), T0, "no zone: the store's (UTC), 11:06 goes");
	is_int(quiet_next(c, "sms", NULL, T0 + 10 * HOUR), T0 + 78800,
	       "21:06 in the store's zone waits for 09:00 the next day");
	is_int(quiet_next(c, "sms", "Europe/Paris", 1774735200), 1774767600,
	       "Paris, the night summer time starts: 09:00 CEST (07:00Z)");
	is_int(quiet_next(c, "sms", "Europe/Paris", 1792879200), 1792915200,
	       "Paris, the night it ends: 09:00 CET (08:00Z)");
	set_cfg(&c->quiet_hours_sms, "");
	is_int(quiet_next(c, "sms", "America/New_York", T0), T0, "quiet_hours_sms = (empty): none");
	/* the browser's zone */
	struct ev_error err;
	is_int(evf(&w, EV_BROWSER, "v-tz", T0, "{\"type\":\"identify\",\"email\":\"tz@example.com\","
		   "\"consent\":true,\"tz\":\"America/New_York\"}"), 1, "identify with tz accepted");
	char *z = sq_text(&w, "SELECT tz FROM contacts WHERE email = 'tz@example.com'");
	ok(z && !strcmp(z, "America/New_York"), "... the contact's zone is stored");
	free(z);
	is_int(ingest(&w, EV_BROWSER, "{\"type\":\"identify\",\"email\":\"tz2@example.com\","
		      "\"tz\":\"../../etc/passwd\"}", T0, &err), -1, "a path as tz is refused");
	is_int(err.status, 400, "... 400");
	is_int(evf(&w, EV_BROWSER, "v-tz3", T0, "{\"type\":\"identify\",\"email\":\"tz3@example.com\","
		   "\"tz\":\"Mars/Olympus\"}"), 1, "an unknown but well-formed zone: the event counts");
	is_int(sq(&w, "SELECT count(*) FROM contacts WHERE email = 'tz3@example.com' AND tz IS NULL"), 1,
	       "... without a zone");
	/* a view's time on the page (browse abandonment reads it) */
	is_int(evf(&w, EV_BROWSER, "v-tz", T0, "{\"type\":\"view\",\"sku\":\"LAMP-1\","
		   "\"seconds\":75}"), 1, "a view with seconds 75 is accepted");
	is_int(ingest(&w, EV_BROWSER, "{\"type\":\"view\",\"sku\":\"LAMP-1\",\"seconds\":1.5}",
		      T0, &err), -1, "seconds 1.5 is refused");
	is_int(ingest(&w, EV_BROWSER, "{\"type\":\"view\",\"sku\":\"LAMP-1\",\"seconds\":90000}",
		      T0, &err), -1, "seconds 90000 (past a day) is refused");
	is_int(ingest(&w, EV_BROWSER, "{\"type\":\"identify\",\"email\":\"s@example.com\","
		      "\"seconds\":75}", T0, &err), -1, "seconds on an identify is refused");
	ok(err.status == 400 && contains(err.msg, "only a view has seconds"), "... 400, saying why");
	/* a mail in quiet hours (quiet_hours_email set) in the contact's zone */
	set_cfg(&c->quiet_hours_email, "21-9");
	struct tick_summary s;
	cart_event(&w, "tz@example.com", "Tz", "tzc", 1, T0 - HOUR);
	tick(&w, T0, &s);
	is_int(s.sent, 0, "quiet_hours_email 21-9: a reminder due at 06:06 in New York is not sent");
	is_int(s.deferred, 1, "... it is deferred (tick summary)");
	is_int(sq(&w, "SELECT next_try FROM messages WHERE deferred_by = 'quiet' AND status = 'queued'"),
	       T0 + 10400, "... to 09:00 New York time");
	tick(&w, T0 + 10400, &s);
	is_int(s.sent, 1, "... and sent then");
	/* a step by sms,email: the channel is chosen first, and an SMS keeps
	 * the SMS quiet hours (21-9 by default) in the contact's zone */
	set_cfg(&c->quiet_hours_email, "");
	set_cfg(&c->quiet_hours_sms, "21-9");
	set_cfg(&c->sms_provider, "twilio");
	set_cfg(&c->twilio_account_sid, "AC0");
	set_cfg(&c->twilio_auth_token, "tok");
	set_cfg(&c->sms_from, "+15005550006");
	set_cfg(&c->twilio_api_url, "http://127.0.0.1:1"); /* never reached here */
	db_scalar(w.app.db, "UPDATE steps SET channels = 'sms,email' WHERE position = 1 "
		  "AND flow_id = (SELECT id FROM flows WHERE name = 'abandoned_cart')");
	struct ev_error eerr = {0};
	is_int(ingest(&w, EV_HOOK, "{\"type\":\"identify\",\"email\":\"sq@example.com\","
		      "\"consent\":true,\"phone\":\"+12125550100\",\"sms_consent\":true,"
		      "\"tz\":\"America/New_York\"}", T0 + DAY - 2 * HOUR, &eerr), 1,
	       "sms: a New York contact with a phone and SMS consent");
	cart_event(&w, "sq@example.com", "Sq", "sqc", 1, T0 + DAY - HOUR);
	tick(&w, T0 + DAY, &s);
	is_int(sq(&w, "SELECT count(*) FROM messages m JOIN contacts k ON k.id = m.contact_id "
		  "WHERE k.email = 'sq@example.com' AND m.status = 'sent'"), 0,
	       "sms,email step due at 06:06 in New York: no SMS in quiet hours");
	is_int(sq(&w, "SELECT m.next_try FROM messages m JOIN contacts k ON k.id = m.contact_id "
		  "WHERE k.email = 'sq@example.com' AND m.deferred_by = 'quiet' "
		  "AND m.status = 'queued'"), T0 + DAY + 10400,
	       "... deferred to 09:00 there, as an SMS (mail has no quiet hours here)");
	world_close(&w);
}

static void test_smart_sending(void)
{
	struct world w;
	struct tick_summary s;
	if (!ok(world_open(&w, "gap") == 0, "gap: world opens"))
		return;
	is_int(w.cfg.min_gap_hours, 16, "min_gap_hours defaults to 16");
	cart_event(&w, "gap@example.com", "Gap", "g1", 1, T0);
	cart_event(&w, "gap@example.com", "Gap", "g2", 1, T0 + 30 * MIN);
	tick(&w, T0 + HOUR, &s);
	is_int(s.sent, 1, "cart g1's reminder at +1 h");
	tick(&w, T0 + 90 * MIN, &s);
	is_int(s.sent, 0, "cart g2's, due 30 min later, is not sent (smart sending)");
	is_int(s.deferred_skipped, 1, "... 16 h would be past its limit (11.5 h): skipped as stale");
	is_int(sq(&w, "SELECT count(*) FROM messages WHERE status = 'skipped' "
		  "AND error LIKE 'stale: held back (smart sending%%'"), 1, "... with the reason");
	/* a gap of 4 h: deferred, then sent */
	w.cfg.min_gap_hours = 4;
	cart_event(&w, "gap2@example.com", "Gap", "h1", 1, T0);
	cart_event(&w, "gap2@example.com", "Gap", "h2", 1, T0 + 30 * MIN);
	tick(&w, T0 + HOUR, &s);
	tick(&w, T0 + 90 * MIN, &s);
	is_int(s.deferred, 1, "min_gap_hours = 4: the second reminder is deferred");
	long long id = sq(&w, "SELECT m.id FROM messages m JOIN contacts c ON c.id = m.contact_id "
			  "WHERE c.email = 'gap2@example.com' AND m.status = 'queued' AND deferred_by = 'gap'");
	is_int(sq(&w, "SELECT next_try FROM messages WHERE id = %lld", id), T0 + 5 * HOUR,
	       "... to 4 h after the first was sent");
	tick(&w, T0 + 5 * HOUR - 60, &s);
	is_int(sq(&w, "SELECT status = 'queued' FROM messages WHERE id = %lld", id), 1, "... not before");
	tick(&w, T0 + 5 * HOUR, &s);
	is_int(sq(&w, "SELECT status = 'sent' FROM messages WHERE id = %lld", id), 1, "... sent then");
	is_int(sq(&w, "SELECT attempts FROM messages WHERE id = %lld", id), 1,
	       "... a deferral counts no attempt");
	/* 0: off */
	w.cfg.min_gap_hours = 0;
	cart_event(&w, "gap3@example.com", "Gap", "k1", 1, T0);
	cart_event(&w, "gap3@example.com", "Gap", "k2", 1, T0 + 30 * MIN);
	tick(&w, T0 + HOUR, &s);
	tick(&w, T0 + 90 * MIN, &s);
	is_int(sq(&w, "SELECT count(*) FROM messages m JOIN contacts c ON c.id = m.contact_id "
		  "WHERE c.email = 'gap3@example.com' AND m.status = 'sent'"), 2,
	       "min_gap_hours = 0: both reminders go");
	/* two due in one tick: the first claimed goes, the other waits */
	w.cfg.min_gap_hours = 4;
	cart_event(&w, "gap4@example.com", "Gap", "j1", 1, T0 + 40 * HOUR);
	cart_event(&w, "gap4@example.com", "Gap", "j2", 1, T0 + 40 * HOUR + MIN);
	tick(&w, T0 + 42 * HOUR, &s);
	is_int(sq(&w, "SELECT count(*) FROM messages m JOIN contacts c ON c.id = m.contact_id "
		  "WHERE c.email = 'gap4@example.com' AND m.status = 'sent'"), 1,
	       "two reminders due in one tick: one goes ...");
	is_int(sq(&w, "SELECT count(*) FROM messages m JOIN contacts c ON c.id = m.contact_id "
		  "WHERE c.email = 'gap4@example.com' AND m.status = 'queued' "
		  "AND m.deferred_by = 'gap' AND m.next_try = %lld", (long long)(T0 + 46 * HOUR)), 1,
	       "... the other waits the gap");
	/* the check reads an index window, not the history */
	sqlite3_stmt *p;
	sqlite3 *h = NULL;
	int idx = 0;
	if (sqlite3_open_v2(w.cfg.db, &h, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
	    sqlite3_prepare_v2(h, "EXPLAIN QUERY PLAN SELECT max(t) FROM (SELECT "
			       "max(sent_at) AS t FROM messages WHERE contact_id = 1 AND sent_at > 5 "
			       "AND id != 3 UNION ALL SELECT max(9) FROM messages WHERE contact_id = 1 "
			       "AND gate_at > 5 AND id != 3 AND status = 'sending' AND lease_until > 9)",
			       -1, &p, NULL) == SQLITE_OK) {
		while (sqlite3_step(p) == SQLITE_ROW) {
			const char *d = (const char *)sqlite3_column_text(p, 3);
			idx += d && (strstr(d, "messages_contact_sent (contact_id=? AND sent_at>?)") ||
				     strstr(d, "messages_contact_gate (contact_id=? AND gate_at>?)"));
		}
		sqlite3_finalize(p);
	}
	sqlite3_close(h);
	is_int(idx, 2, "the gap check searches both index windows (contact, time)");
	struct report r;
	memset(&r, 0, sizeof r);
	struct buf j = {0};
	long long held = sq(&w, "SELECT count(*) FROM messages WHERE deferred_by IS NOT NULL");
	int rb = report_build(&w.app, T0 - DAY, T0 + 3 * DAY, &r);
	ok(rb == 0 && held >= 3 && r.deferred == held && r.deferred_skipped == 1,
	   "the report counts every message held back (%lld), 1 skipped as stale", held);
	report_json(&r, &j);
	char want[80];
	snprintf(want, sizeof want, "\"deferred\":%lld,\"deferred_skipped\":1", held);
	ok(j.data && strstr(j.data, want), "... report JSON: %s", want);
	buf_free(&j);
	world_close(&w);
}

static void test_cart_first(void)
{
	struct world w;
	struct tick_summary s;
	if (!ok(world_open(&w, "cartfirst") == 0, "cart first: world opens"))
		return;
	w.cfg.min_gap_hours = 0; /* this rule alone */
	product(&w, "A", "lighting", T0);
	product(&w, "B", "lighting", T0);
	order_line(&w, "o1", "both@example.com", "A", 40, T0 - 91 * DAY, T0);
	cart_event(&w, "both@example.com", "Both", "bc", 1, T0 - HOUR);
	tick(&w, T0, &s);
	is_int(winback_sent(&w, "both@example.com", 1), 0,
	       "a lapsed customer with an open cart sequence: no win-back yet");
	is_int(sq(&w, "SELECT count(*) FROM messages m JOIN enrollments e ON e.id = m.enrollment_id "
		  "JOIN flows f ON f.id = e.flow_id WHERE f.trigger = 'cart_abandoned' "
		  "AND m.status = 'sent'"), 1, "... the cart reminder goes");
	is_int(sq(&w, "SELECT count(*) FROM messages WHERE deferred_by = 'cart' AND status = 'queued' "
		  "AND next_try = %lld", (long long)(T0 + HOUR)), 1,
	       "... the win-back is deferred (looked at again in an hour)");
	tick(&w, T0 + 2 * HOUR, &s);
	is_int(winback_sent(&w, "both@example.com", 1), 0, "... still while the cart sequence runs");
	/* the cart sequence ends (an emptied cart) */
	db_scalar(w.app.db, "UPDATE enrollments SET status = 'exited', exit_reason = 'empty' "
		  "WHERE flow_id = 1");
	tick(&w, T0 + 3 * HOUR, &s);
	is_int(winback_sent(&w, "both@example.com", 1), 1, "once it ends, the win-back goes");
	/* held too long: stale, counted */
	order_line(&w, "o2", "late@example.com", "A", 40, T0 - 91 * DAY, T0);
	cart_event(&w, "late@example.com", "Late", "lc", 1, T0 + 2 * HOUR);
	tick(&w, T0 + 3 * HOUR, &s);
	tick(&w, T0 + 30 * HOUR, &s);
	is_int(winback_sent(&w, "late@example.com", 1), 0, "a win-back held past its limit ...");
	ok(s.deferred_skipped >= 1 && s.stale >= 1, "... is skipped as stale and counted (%ld)",
	   s.deferred_skipped);
	world_close(&w);
}

/* Push as a flow channel (issue 13): a step by push,email goes by push
 * to a contact with a push subscription (and a VAPID key), by mail to
 * one without; no key: mail for both. */
static void test_push_flow(void)
{
	struct world w;
	struct tick_summary s;
	char key[PATH_MAX], pub[100], err[512] = "";
	if (!ok(world_open(&w, "pushflow") == 0, "push flow: world opens"))
		return;
	ok(channels_ok("push") && channels_ok("push,email") &&
	   channels_ok("push,sms,email") && !channels_ok("push,push"),
	   "push flow: channels push, push,email, push,sms,email pass; push,push not");
	snprintf(key, sizeof key, "%s/pushflow-vapid.pem", tmpdir);
	set_cfg(&w.cfg.vapid_key_file, key);
	set_cfg(&w.cfg.vapid_subject, "mailto:ops@shop.example.com");
	set_cfg(&w.cfg.allow_insecure_links, "yes");
	ok(!push_ready(&w.cfg), "push flow: not set up without the key file");
	ok(vapid_keygen(key, pub, sizeof pub, err, sizeof err) == 0 && push_ready(&w.cfg),
	   "push flow: set up with it (%s)", err);
	db_scalar(w.app.db, "UPDATE steps SET channels = 'push,email' WHERE position = 1 "
		  "AND flow_id = (SELECT id FROM flows WHERE name = 'abandoned_cart')");
	cart_event(&w, "pa@example.com", "Pa", "pac", 1, T0);
	cart_event(&w, "pb@example.com", "Pb", "pbc", 1, T0);
	/* a browser of pa's; its push service is down (nothing listens) */
	db_scalar(w.app.db, "INSERT INTO push_subscriptions (endpoint, p256dh, auth, "
		  "contact_id, created) SELECT 'http://127.0.0.1:1/push/a', "
		  "'BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4', "
		  "'BTBZMqHH6r4Tts7J_aSIgg', id, 0 FROM contacts WHERE email = 'pa@example.com'");
	tick(&w, T0 + 2 * HOUR, &s);
	is_int(sq(&w, "SELECT count(*) FROM messages m JOIN contacts k ON k.id = m.contact_id "
		  "WHERE k.email = 'pa@example.com' AND m.channel = 'push'"), 1,
	       "push flow: a contact with a subscription gets the push,email step by push");
	is_int(sq(&w, "SELECT count(*) FROM messages m JOIN contacts k ON k.id = m.contact_id "
		  "WHERE k.email = 'pa@example.com' AND m.status = 'queued' AND m.attempts = 1 "
		  "AND m.error LIKE 'push service%%'"), 1,
	       "... the push service down: retried later, the reason kept");
	is_int(sq(&w, "SELECT count(*) FROM messages m JOIN contacts k ON k.id = m.contact_id "
		  "WHERE k.email = 'pb@example.com' AND m.channel = 'email' AND m.status = 'sent'"),
	       1, "push flow: one without a subscription gets it by mail");
	/* the channel is chosen again at each attempt: the browser gone,
	 * mail is next */
	db_scalar(w.app.db, "DELETE FROM push_subscriptions");
	tick(&w, T0 + 3 * HOUR, &s);
	is_int(sq(&w, "SELECT count(*) FROM messages m JOIN contacts k ON k.id = m.contact_id "
		  "WHERE k.email = 'pa@example.com' AND m.channel = 'email' AND m.status = 'sent'"),
	       1, "push flow: its browser gone, the retry goes by mail");
	/* the report by channel, from rows made by hand: pa's message made a
	 * push one, clicked, with an order attributed to it */
	db_scalar(w.app.db, "UPDATE messages SET channel = 'push' WHERE contact_id = "
		  "(SELECT id FROM contacts WHERE email = 'pa@example.com')");
	db_scalar(w.app.db, "INSERT INTO interactions (message, kind, ts) SELECT id, "
		  "'click', sent_at + 60 FROM messages WHERE channel = 'push'");
	db_scalar(w.app.db, "INSERT INTO orders (order_key, contact_id, total, ts, "
		  "attribution, message) SELECT 'o-push', contact_id, 80, sent_at + 120, "
		  "'click', id FROM messages WHERE channel = 'push'");
	struct report *r = calloc(1, sizeof *r);
	struct buf out = {0};
	if (r && report_build(&w.app, T0 - DAY, T0 + DAY, r) == 0) {
		is_int(r->nchannels, 2, "report: two channels");
		ok(!strcmp(r->channels[0].name, "email") && r->channels[0].sent == 1 &&
		   r->channels[0].clicked == 0 && r->channels[0].orders == 0,
		   "report: email sent 1, no click, no order");
		ok(!strcmp(r->channels[1].name, "push") && r->channels[1].sent == 1 &&
		   r->channels[1].clicked == 1 && r->channels[1].orders == 1 &&
		   r->channels[1].revenue == 80, "report: push sent 1, clicked 1, 1 order of 80");
		report_json(r, &out);
		ok(contains(out.data, "\"channels\":[{\"name\":\"email\",\"sent\":1,"
			    "\"clicked\":0,\"unsubscribed\":0,\"orders\":0,\"revenue\":0.00},"
			    "{\"name\":\"push\",\"sent\":1,\"clicked\":1,\"unsubscribed\":0,"
			    "\"orders\":1,\"revenue\":80.00}]"), "report: the channels in JSON");
		out.len = 0;
		report_html(r, "Shop", &out);
		ok(contains(out.data, "<h2>By channel</h2>") &&
		   contains(out.data, "<tr><td>push</td><td>1</td><td>1</td><td>0</td>"
			    "<td>1</td><td>80.00 EUR</td></tr>"), "report: ... and in HTML");
	}
	/* an SMS and a STOP in the period: the SMS channel's opt-outs */
	db_scalar(w.app.db, "UPDATE messages SET channel = 'sms' WHERE contact_id = "
		  "(SELECT id FROM contacts WHERE email = 'pb@example.com')");
	db_scalar(w.app.db, "UPDATE contacts SET sms_consent = 0, sms_consent_source = "
		  "'sms STOP', sms_consent_at = 1795000000 + 4 * 3600 "
		  "WHERE email = 'pb@example.com'");
	memset(r, 0, sizeof *r);
	if (r && report_build(&w.app, T0 - DAY, T0 + DAY, r) == 0)
		ok(r->nchannels == 2 && !strcmp(r->channels[1].name, "sms") &&
		   r->channels[1].sent == 1 && r->channels[1].unsubscribed == 1,
		   "report: an SMS STOP in the period is the SMS channel's opt-out");
	buf_free(&out);
	free(r);
	world_close(&w);
}

/* SMS (issue 13): the validators of a phone and a step's channels, the
 * GSM-7/UCS-2 segment count, the finished line, the provider answers,
 * Twilio's signature (the documentation's published example), and the
 * inbound route: a forged signature is 403 and changes nothing, a signed
 * STOP ends the number's SMS consent at once (never the mail's), START
 * gives it back, HELP names the store. */
static void test_sms(void)
{
	ok(val_phone("+14155550100") && val_phone("+33612345678"), "sms: E.164 numbers pass");
	ok(!val_phone("0612345678") && !val_phone("+0612345678") &&
	   !val_phone("+1415555") && !val_phone("+1234567890123456") &&
	   !val_phone("+1 415 555 0100") && !val_phone(""), "sms: others are refused");
	ok(channels_ok("email") && channels_ok("sms") && channels_ok("sms,email"),
	   "sms: channels email, sms, sms,email pass");
	ok(!channels_ok("") && !channels_ok("fax") && !channels_ok("sms,sms") &&
	   !channels_ok(",sms") && !channels_ok("sms,") && !channels_ok("sms,,email"),
	   "sms: unknown, repeated or empty channels are refused");

	struct sms_count c;
	char big[400];
	is_int(sms_segments("Hello there", &c), 1, "segments: a short GSM-7 text is 1");
	ok(!c.ucs2 && c.units == 11, "... GSM-7, 11 septets");
	is_int(sms_segments("{€}", &c), 1, "segments: extension characters");
	is_int((long long)c.units, 6, "... count two septets each");
	memset(big, 'a', 160), big[160] = '\0';
	is_int(sms_segments(big, &c), 1, "segments: 160 GSM-7 characters are 1");
	big[160] = 'a', big[161] = '\0';
	is_int(sms_segments(big, &c), 2, "segments: 161 are 2 (153 a segment)");
	memset(big, 'a', 306), big[306] = '\0';
	is_int(sms_segments(big, &c), 2, "segments: 306 are 2");
	big[306] = 'a', big[307] = '\0';
	is_int(sms_segments(big, &c), 3, "segments: 307 are 3");
	is_int(sms_segments("Café, ça va ?", &c), 1, "segments: é is GSM-7 but ç is not...");
	ok(c.ucs2 && c.units == 13, "... so UCS-2, 13 units");
	memset(big, 'a', 70), big[70] = '\0';
	memcpy(big, "\xc5\x82", 2); /* ł: not GSM-7 */
	big[70] = 'a', big[71] = 'a', big[72] = '\0'; /* ł and 70 a */
	is_int(sms_segments(big, &c), 2, "segments: 70 UCS-2 units and one more are 2");
	is_int(sms_segments("\xf0\x9f\x9b\x92 cart", &c), 1, "segments: an emoji...");
	is_int((long long)c.units, 7, "... counts two UTF-16 units");
	is_int(sms_segments("\xff", &c), -1, "segments: not UTF-8 is -1");

	struct buf b = {0};
	sms_finish("Maison", "  Your cart\n is  saved:\thttp://x/r/T  ", &b);
	is_str(b.data, "Maison: Your cart is saved: http://x/r/T Reply STOP to opt out.",
	       "sms_finish: one line, the store's name and STOP added");
	buf_reset(&b);
	sms_finish("Maison", "Maison here. STOP to opt out", &b);
	is_str(b.data, "Maison here. STOP to opt out", "sms_finish: nothing added when said");
	buf_free(&b);

	is_int(sms_classify("twilio", 201, 0), SEND_OK, "classify: 201 sent");
	is_int(sms_classify("twilio", 400, 21211), SEND_PERM, "classify: twilio 21211 is the number's");
	is_int(sms_classify("twilio", 400, 21610), SEND_PERM, "classify: twilio 21610 (opted out) too");
	is_int(sms_classify("twilio", 400, 21606), SEND_CONFIG, "classify: another 400 is ours");
	is_int(sms_classify("twilio", 401, 20003), SEND_CONFIG, "classify: 401 is ours");
	is_int(sms_classify("twilio", 503, 0), SEND_TEMP, "classify: 5xx retried");
	is_int(sms_classify("twilio", 429, 0), SEND_TEMP, "classify: 429 retried");
	is_int(sms_classify("twilio", 0, 0), SEND_TEMP, "classify: no answer retried");
	is_int(sms_classify("webhook", 422, 0), SEND_PERM, "classify: webhook 4xx is the number's");
	is_int(sms_classify("webhook", 403, 0), SEND_CONFIG, "classify: webhook 403 is ours");

	/* Twilio's documentation: this URL, these parameters, token 12345 */
	char sig[64];
	const char *form = "CallSid=CA1234567890ABCDE&Caller=%2B12349013030&Digits=1234"
			   "&From=%2B12349013030&To=%2B18005551212";
	ok(sms_twilio_signature("12345", "https://mycompany.com/myapp.php?foo=1&bar=2",
				form, strlen(form), sig, sizeof sig) == 0,
	   "twilio signature: made");
	is_str(sig, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=", "twilio signature: the documented example");
	const char *shuffled = "To=%2B18005551212&Digits=1234&From=%2B12349013030"
			       "&CallSid=CA1234567890ABCDE&Caller=%2B12349013030";
	sms_twilio_signature("12345", "https://mycompany.com/myapp.php?foo=1&bar=2",
			     shuffled, strlen(shuffled), sig, sizeof sig);
	is_str(sig, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=", "... whatever the parameters' order");

	is_int(sms_keyword("stop"), SMS_STOP, "keyword: stop");
	is_int(sms_keyword("  Unsubscribe please"), SMS_STOP, "keyword: Unsubscribe please");
	is_int(sms_keyword("START"), SMS_START, "keyword: START");
	is_int(sms_keyword("help"), SMS_HELP, "keyword: help");
	is_int(sms_keyword("stopping by later"), 0, "keyword: a longer word is none");
	is_int(sms_keyword(""), 0, "keyword: empty is none");

	struct world w;
	struct http_resp rs;
	if (!ok(world_open(&w, "sms") == 0, "sms: world opens"))
		return;
	struct ev_error eerr = {0};
	ingest(&w, EV_HOOK, "{\"type\":\"identify\",\"email\":\"sam@example.net\","
	       "\"consent\":true,\"phone\":\"+14155550100\",\"sms_consent\":true}", T0,
	       &eerr);
	is_int(sq(&w, "SELECT sms_consent FROM contacts WHERE email = 'sam@example.net'"),
	       1, "sms: a signed event gives SMS consent");
	set_cfg(&w.cfg.sms_provider, "twilio");
	set_cfg(&w.cfg.twilio_auth_token, "tok-test");
	set_cfg(&w.cfg.base_url, "https://shop.example/rm");
	const char *stop = "From=%2B14155550100&To=%2B15005550006&Body=STOP";
	struct http_req rq = {0};
	rq.method = "POST";
	rq.path = "/sms/inbound";
	rq.content_type = "application/x-www-form-urlencoded";
	rq.remote_addr = "127.0.0.1";
	rq.body = stop;
	rq.body_len = strlen(stop);
	rq.twilio_signature = "0/KCTR6DLpKmkAf8muzZqo1nDgQ=";
	memset(&rs, 0, sizeof rs);
	http_handle(&w.app, &rq, &rs, T0 + 10);
	is_int(rs.status, 403, "inbound: a forged signature is 403");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT sms_consent FROM contacts WHERE email = 'sam@example.net'"),
	       1, "... and changes nothing");
	sms_twilio_signature("tok-test", "https://shop.example/rm/sms/inbound", stop,
			     strlen(stop), sig, sizeof sig);
	rq.twilio_signature = sig;
	memset(&rs, 0, sizeof rs);
	http_handle(&w.app, &rq, &rs, T0 + 10);
	is_int(rs.status, 200, "inbound: a signed STOP is 200");
	http_resp_free(&rs);
	is_int(sq(&w, "SELECT sms_consent FROM contacts WHERE email = 'sam@example.net'"),
	       0, "... the SMS consent ends at once");
	is_int(sq(&w, "SELECT sms_consent_at FROM contacts WHERE email = 'sam@example.net' "
		  "AND sms_consent_source = 'sms STOP'"), T0 + 10, "... with its source and time");
	is_int(sq(&w, "SELECT consent FROM contacts WHERE email = 'sam@example.net'"),
	       1, "... the mail consent stays");
	const char *start = "From=%2B14155550100&Body=start";
	sms_twilio_signature("tok-test", "https://shop.example/rm/sms/inbound", start,
			     strlen(start), sig, sizeof sig);
	rq.body = start, rq.body_len = strlen(start);
	memset(&rs, 0, sizeof rs);
	http_handle(&w.app, &rq, &rs, T0 + 20);
	is_int(sq(&w, "SELECT sms_consent FROM contacts WHERE email = 'sam@example.net'"),
	       1, "inbound: START gives it back");
	http_resp_free(&rs);
	set_cfg(&w.cfg.store_name, "Maison & Co");
	const char *help = "From=%2B14155550100&Body=HELP";
	sms_twilio_signature("tok-test", "https://shop.example/rm/sms/inbound", help,
			     strlen(help), sig, sizeof sig);
	rq.body = help, rq.body_len = strlen(help);
	memset(&rs, 0, sizeof rs);
	http_handle(&w.app, &rq, &rs, T0 + 30);
	ok(rs.status == 200 && contains(rs.body.data, "<Message>Maison &amp; Co: "),
	   "inbound: HELP is answered with the store's name (TwiML, escaped)");
	http_resp_free(&rs);
	world_close(&w);
}

int main(void)
{
	if (sodium_init() < 0 || curl_global_init(CURL_GLOBAL_DEFAULT) != 0) {
		printf("Bail out! libsodium or libcurl failed to start\n");
		return 1;
	}
	if (setup() < 0) {
		if (*tmpdir)
			nftw(tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
		curl_global_cleanup();
		return 1;
	}
	test_buffers();
	test_buffer_errors();
	test_validators();
	test_tokens();
	test_hooks();
	test_templates();
	test_mail();
	test_events();
	test_partial_events();
	test_group_commit();
	test_flow();
	test_flow_exits();
	test_leases();
	test_tick_runs();
	test_http();
	test_browser_side();
	test_boundary();
	test_browser_trust();
	test_browser_review();
	test_review_fixes();
	test_measurement();
	test_report_numbers();
	test_lifecycle();
	test_store_currency();
	test_mail_names();
	test_money_dates();
	test_tracked_links();
	test_refunds();
	test_segments_incremental();
	test_lapse_incremental();
	test_winback_ramp();
	test_backtest();
	test_reco_report();
	test_review_winback_period();
	test_segment_names();
	test_csv_columns();
	test_csv_files();
	test_import_batches();
	test_import_retail();
	test_review_import();
	test_keys_codes();
	test_sending();
	test_review_sending();
	test_send_connections();
	test_url_shown();
	test_fuzz_findings();
	test_preview();
	test_carts_as_shops();
	test_feedback();
	test_feedback_http();
	test_status();
	test_push_rfc8291();
	test_push_vapid();
	test_quiet_hours();
	test_smart_sending();
	test_cart_first();
	test_sms();
	test_push_flow();
	int rc = done_testing();
	if (nftw(tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS) != 0)
		diag("could not remove %s", tmpdir);
	curl_global_cleanup();
	return rc;
}
