/*
 * remarket: a self-hosted remarketing engine for online stores.
 *
 * One program, three forms: a threaded FastCGI responder mounted by the
 * store's web server, a plain CGI program, and the operator's command
 * line. It records cart, order and product events; finds abandoned carts,
 * lapsed customers and new orders; runs them through multi-step email
 * flows (with holdouts, A/B variants and segment-targeted steps); signs
 * every link it sends; and reports what the flows earned. SQLite is the
 * only store; libcurl speaks SMTP; libsodium makes every signature and
 * every random code.
 *
 * Sections, in file order. Each opens with a banner that puts its name
 * after four equals signs: search for "==== " and the name as below
 * (without its number) to land on it.
 *   1. Buffers and small helpers
 *   2. Configuration
 *   3. Storage: connection, migrations, named statements
 *   4. The application object
 *   5. Validators
 *   6. Signed tokens and hook signatures
 *   7. Templates
 *   8. Events: validation and state (contacts, carts, orders)
 *   9. Discount codes
 *  10. Catalog and order imports (CSV)
 *  11. Segments
 *  12. Recommendations
 *  13. Mail: rendering and RFC 5322 building
 *  14. Transports: SMTP and outbox
 *  15. Web push: VAPID and RFC 8291 encryption
 *  16. The message context
 *  17. SMS: text, segments, providers
 *  18. The flow engine: detect, claim, send, record
 *  19. Tick runs
 *  20. Feedback: bounces, complaints, unsubscribes by mail
 *  21. Checks before sending and status
 *  22. Backtest
 *  23. The report
 *  24. HTTP routes
 *  25. FastCGI and CGI front-ends
 *  26. Command line
 *  27. Main
 */
#define _GNU_SOURCE
#include "remarket.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

#include <curl/curl.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <fcgiapp.h>
#include <sodium.h>
#include <sqlite3.h>

#include "sql_migrations.h" /* made from sql/NNN_*.sql by the Makefile */

#ifndef RM_SHAREDIR
#define RM_SHAREDIR "/usr/local/share/remarket"
#endif

/* ==== Buffers and small helpers ======================================= */
/*
 * A growable, always NUL-terminated byte buffer is the only string
 * builder in the program: no strcat, no sprintf into fixed arrays.
 * Its error is sticky, as in SQLite's StrAccum: an append that cannot be
 * done (out of memory, or a size past SIZE_MAX) sets b->failed, and
 * every later append does nothing and returns -1. So a builder appends
 * without checking each call and asks buf_failed once before it returns
 * success; a buffer that failed is never sent, written or stored as if
 * whole. Per-call checks remain only where a failure changes what
 * happens next (a loop that must stop, a value read back at once).
 * Also here: time parsing and the one clock, IP addresses and CIDR
 * lists, and the few file helpers (read, mkdir -p, atomic write).
 */

/* Makes room for n more bytes plus the terminating NUL; on failure sets
 * the sticky error. */
static int buf_reserve(struct buf *b, size_t n)
{
	if (b->failed)
		return -1;
	if (n > SIZE_MAX - b->len - 1)
		goto fail;
	if (b->len + n + 1 <= b->cap)
		return 0;
	size_t cap = b->cap ? b->cap : 256;
	while (cap < b->len + n + 1) {
		if (cap > SIZE_MAX / 2)
			goto fail;
		cap *= 2;
	}
	char *d = realloc(b->data, cap);
	if (!d)
		goto fail;
	b->data = d;
	b->cap = cap;
	return 0;
fail:
	b->failed = 1;
	return -1;
}

int buf_add(struct buf *b, const void *p, size_t n)
{
	if (buf_reserve(b, n) < 0)
		return -1;
	if (n)
		memcpy(b->data + b->len, p, n);
	b->len += n;
	b->data[b->len] = '\0';
	return 0;
}

int buf_adds(struct buf *b, const char *s)
{
	return buf_add(b, s, strlen(s));
}

int buf_addf(struct buf *b, const char *fmt, ...)
{
	va_list ap;
	if (b->failed)
		return -1;
	va_start(ap, fmt);
	int n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0)
		b->failed = 1;
	if (n < 0 || buf_reserve(b, (size_t)n) < 0)
		return -1;
	va_start(ap, fmt);
	vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
	return 0;
}

int buf_failed(const struct buf *b)
{
	return b->failed != 0;
}

/* Empties the buffer for reuse; the error concerned the text discarded. */
void buf_reset(struct buf *b)
{
	b->len = 0;
	if (b->data)
		b->data[0] = '\0';
	b->failed = 0;
}

void buf_free(struct buf *b)
{
	free(b->data);
	b->data = NULL;
	b->len = b->cap = 0;
	b->failed = 0;
}

static const char *buf_str(const struct buf *b)
{
	return b->data ? b->data : "";
}

/* Copies at most n-1 bytes and always terminates; 0 if it fit. */
static int copy_str(char *dst, size_t n, const char *src)
{
	int w = snprintf(dst, n, "%s", src ? src : "");
	return (w < 0 || (size_t)w >= n) ? -1 : 0;
}

/* The latest time anything accepts: 9999-12-31T23:59:59Z. Every time
 * from outside is checked against it, so sums of times never overflow. */
#define RM_TIME_MAX ((rm_time)253402300799LL)

/* Unix seconds, ISO 8601 (UTC, or with fractions of a second and a
 * Z or +hh:mm offset, as exports write it) or +N[smhd]/-N[smhd] from
 * BASE; -1 when S is none of them or falls outside 1970..9999. */
static rm_time parse_time(const char *s, rm_time base)
{
	char *end;
	if (!s || !*s)
		return -1;
	if (*s == '+' || *s == '-') { /* relative: +90s, +2h, -30d */
		if (!isdigit((unsigned char)s[1]) || base < 0 || base > RM_TIME_MAX)
			return -1;
		errno = 0;
		long long v = strtoll(s + 1, &end, 10);
		long long mul = 1;
		switch (*end) {
		case 'd': mul = 86400; end++; break;
		case 'h': mul = 3600; end++; break;
		case 'm': mul = 60; end++; break;
		case 's': end++; break;
		default: break;
		}
		if (errno || *end || v < 0 || v > 100LL * 365 * 86400)
			return -1;
		/* |v * mul| <= 2.8e14 and base <= RM_TIME_MAX: no overflow */
		rm_time t = *s == '-' ? base - v * mul : base + v * mul;
		return t >= 0 && t <= RM_TIME_MAX ? t : -1;
	}
	errno = 0;
	long long v = strtoll(s, &end, 10);
	if (!*end && end != s)
		return !errno && v >= 0 && v <= RM_TIME_MAX ? v : -1;
	struct tm tm = {0};
	end = strptime(s, "%Y-%m-%dT%H:%M:%S", &tm);
	if (!end) { /* a plain date is its midnight, UTC */
		memset(&tm, 0, sizeof tm);
		end = strptime(s, "%Y-%m-%d", &tm);
	}
	long off = 0; /* seconds east of UTC */
	if (end && *end == '.' && isdigit((unsigned char)end[1]))
		for (end++; isdigit((unsigned char)*end); end++)
			; /* fractions of a second: the second is enough */
	if (end && (*end == '+' || *end == '-') && isdigit((unsigned char)end[1]) &&
	    isdigit((unsigned char)end[2]) && end[3] == ':' &&
	    isdigit((unsigned char)end[4]) && isdigit((unsigned char)end[5]) &&
	    !end[6]) {
		long h = (end[1] - '0') * 10 + (end[2] - '0');
		long m = (end[4] - '0') * 10 + (end[5] - '0');
		if (h > 23 || m > 59)
			return -1;
		off = (h * 3600 + m * 60) * (*end == '-' ? -1 : 1);
		end += 6;
	}
	if (!end || (*end && strcmp(end, "Z") != 0) || tm.tm_year < 70 ||
	    tm.tm_year > 9999 - 1900)
		return -1;
	rm_time t = (rm_time)timegm(&tm) - off;
	return t >= 0 && t <= RM_TIME_MAX ? t : -1;
}

/* Seconds the demo's clock is ahead of the real one: a whole number in
 * the file $REMARKET_CLOCK_FILE (demo/backend.py writes it when its +1 h
 * buttons move time), read at each call so a running `remarket serve`
 * follows; 0 without the variable or a readable number, or when the file
 * is not this user's own or group or others may write it. */
static rm_time clock_offset(void)
{
	const char *path = getenv("REMARKET_CLOCK_FILE");
	char line[32], *end;
	FILE *f = path && *path ? fopen(path, "r") : NULL;
	struct stat st;
	/* a file others may write would let them move every deadline */
	if (f && (fstat(fileno(f), &st) != 0 || (st.st_mode & 022) ||
		  st.st_uid != geteuid())) {
		fclose(f);
		f = NULL;
	}
	if (!f)
		return 0;
	long long off = fgets(line, sizeof line, f) ? strtoll(line, &end, 10) : 0;
	fclose(f);
	return off > 0 && off <= 10LL * 366 * 86400 ? (rm_time)off : 0;
}

/* Where "now" comes from: the real clock, or $REMARKET_NOW, or the real
 * clock moved by the demo's clock file (clock_offset). Everything
 * that decides about the data takes "now" as an argument; besides this,
 * the real clock is read only by the tick's own bookkeeping: flow_tick,
 * lease_keep and out_of_budget measure elapsed seconds, and tick runs
 * (tick_begin, tick_end, tick_alive) record when a process started and
 * ended, to tell a running tick from a lost one. */
static rm_time clock_now(void)
{
	rm_time real = (rm_time)time(NULL);
	const char *o = getenv("REMARKET_NOW");
	rm_time t = o ? parse_time(o, real) : -1;
	return t >= 0 ? t : real + clock_offset();
}

/* An IPv4 or IPv6 address; "::ffff:1.2.3.4" is the IPv4 1.2.3.4. */
struct ipaddr {
	int v6;
	unsigned char b[16];
};

static int ip_parse(const char *s, struct ipaddr *a)
{
	static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
						 0xff, 0xff};
	memset(a, 0, sizeof *a);
	if (inet_pton(AF_INET, s, a->b) == 1)
		return 0;
	if (inet_pton(AF_INET6, s, a->b) != 1)
		return -1;
	a->v6 = 1;
	if (!memcmp(a->b, mapped, sizeof mapped)) {
		memmove(a->b, a->b + 12, 4);
		memset(a->b + 4, 0, 12);
		a->v6 = 0;
	}
	return 0;
}

/* The address in its usual text form, for use as a key. */
static void ip_format(const struct ipaddr *a, char *out, size_t n)
{
	if (!inet_ntop(a->v6 ? AF_INET6 : AF_INET, a->b, out, (socklen_t)n))
		copy_str(out, n, "");
}

/* SPEC is "10.0.0.0/8", "::1" or "192.0.2.7" (its length within n bytes).
 * Returns 1 if A is in it, 0 if not, -1 if SPEC is not an address. */
static int cidr_match(const char *spec, size_t n, const struct ipaddr *a)
{
	char addr[64];
	struct ipaddr net;
	const char *slash = memchr(spec, '/', n);
	size_t alen = slash ? (size_t)(slash - spec) : n;
	if (alen >= sizeof addr)
		return -1;
	memcpy(addr, spec, alen);
	addr[alen] = '\0';
	if (ip_parse(addr, &net) < 0)
		return -1;
	long bits = net.v6 ? 128 : 32;
	if (slash) {
		const char *p = slash + 1, *end = spec + n;
		if (p == end || end - p > 3)
			return -1;
		bits = 0;
		for (; p < end; p++) {
			if (!isdigit((unsigned char)*p))
				return -1;
			bits = bits * 10 + (*p - '0');
		}
		if (bits > (net.v6 ? 128 : 32))
			return -1;
	}
	if (a->v6 != net.v6)
		return 0;
	for (long i = 0; i < bits; i++) {
		unsigned mask = 0x80u >> (i % 8);
		if ((a->b[i / 8] & mask) != (net.b[i / 8] & mask))
			return 0;
	}
	return 1;
}

/* 1 if A is in the comma- or space-separated LIST of addresses and CIDRs,
 * 0 if not, -1 if an entry of LIST is not one (BAD, BADLEN: which). */
static int ip_in_list(const char *list, const struct ipaddr *a,
		      const char **bad, size_t *badlen)
{
	int found = 0;
	for (const char *p = list; *p;) {
		p += strspn(p, ", \t");
		size_t n = strcspn(p, ", \t");
		if (!n)
			break;
		int m = cidr_match(p, n, a);
		if (m < 0) {
			if (bad)
				*bad = p, *badlen = n;
			return -1;
		}
		found |= m;
		p += n;
	}
	return found;
}

static int mkdir_p(const char *path, mode_t mode)
{
	char tmp[PATH_MAX];
	if (copy_str(tmp, sizeof tmp, path) < 0)
		return -1;
	for (char *p = tmp + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(tmp, mode) < 0 && errno != EEXIST)
			return -1;
		*p = '/';
	}
	if (mkdir(tmp, mode) < 0 && errno != EEXIST)
		return -1;
	return 0;
}

static int mkdir_parent(const char *file)
{
	char dir[PATH_MAX];
	if (copy_str(dir, sizeof dir, file) < 0)
		return -1;
	char *slash = strrchr(dir, '/');
	if (!slash || slash == dir)
		return 0;
	*slash = '\0';
	return mkdir_p(dir, 0700);
}

static int read_file(const char *path, struct buf *out, size_t max)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return -1;
	char chunk[8192];
	size_t n;
	int rc = 0;
	while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) {
		if (out->len + n > max || buf_add(out, chunk, n) < 0) {
			rc = -1;
			break;
		}
	}
	if (ferror(f))
		rc = -1;
	fclose(f);
	if (rc == 0 && !out->data)
		rc = buf_add(out, "", 0);
	return rc < 0 || buf_failed(out) ? -1 : 0;
}

/* A tick's sender thread keeps the template files it has read (the
 * flow engine sets tpl_cache while it sends, and empties it after): each
 * file is read once a tick, not once a mail, and an edit is seen by the
 * next tick. NULL elsewhere: every read goes to the file. */
#define TPL_CACHE_MAX 32
struct tpl_cache {
	struct { char *path; struct buf text; int missing; } f[TPL_CACHE_MAX];
	int n;
};
static _Thread_local struct tpl_cache *tpl_cache;

static void tpl_cache_free(struct tpl_cache *c)
{
	for (int i = 0; i < c->n; i++) {
		free(c->f[i].path);
		buf_free(&c->f[i].text);
	}
	c->n = 0;
}

/* A template file, its CRs dropped (an editor on Windows saves CRLF). */
static int template_read(const char *path, struct buf *out)
{
	struct tpl_cache *c = tpl_cache;
	for (int i = 0; c && i < c->n; i++)
		if (!strcmp(c->f[i].path, path)) {
			if (c->f[i].missing)
				return -1;
			buf_add(out, c->f[i].text.data, c->f[i].text.len);
			return buf_failed(out) ? -1 : 0;
		}
	size_t from = out->len;
	int rc = read_file(path, out, 1 << 20);
	if (rc == 0) {
		size_t w = from;
		for (size_t r = from; r < out->len; r++)
			if (out->data[r] != '\r')
				out->data[w++] = out->data[r];
		out->len = w;
		out->data[w] = '\0';
	}
	if (c && c->n < TPL_CACHE_MAX && (c->f[c->n].path = strdup(path))) {
		c->f[c->n].missing = rc < 0;
		if (rc == 0)
			buf_add(&c->f[c->n].text, out->data + from, out->len - from);
		if (buf_failed(&c->f[c->n].text)) {
			free(c->f[c->n].path);
			buf_free(&c->f[c->n].text);
		} else {
			c->n++;
		}
	}
	return rc;
}

/* Writes a file atomically: a reader sees the old file or the new one.
 * The temporary file is made anew (no link followed); run as root, the
 * new file keeps the old one's owner (keygen --rotate under sudo); the
 * directory is synced after the rename. */
static int write_file_atomic(const char *path, const char *data, size_t n,
			     mode_t mode)
{
	char tmp[PATH_MAX];
	if (snprintf(tmp, sizeof tmp, "%s.tmp%ld", path, (long)getpid()) >=
	    (int)sizeof tmp)
		return -1;
	/* a new file of ours: never through a link planted at the guessable
	 * name, never into a file someone else holds open */
	unlink(tmp);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, mode);
	if (fd < 0)
		return -1;
	struct stat old;
	int keep_owner = geteuid() == 0 && lstat(path, &old) == 0 && S_ISREG(old.st_mode);
	if (fchmod(fd, mode) < 0 || /* the mode asked for, whatever the umask */
	    (keep_owner && fchown(fd, old.st_uid, old.st_gid) < 0)) {
		close(fd);
		unlink(tmp);
		return -1;
	}
	size_t off = 0;
	while (off < n) {
		ssize_t w = write(fd, data + off, n - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			close(fd);
			unlink(tmp);
			return -1;
		}
		off += (size_t)w;
	}
	if (fsync(fd) < 0 || close(fd) < 0 || rename(tmp, path) < 0) {
		unlink(tmp);
		return -1;
	}
	/* the rename itself survives a power cut once its directory is synced */
	char dir[PATH_MAX];
	copy_str(dir, sizeof dir, path);
	char *slash = strrchr(dir, '/');
	if (slash)
		*(slash == dir ? slash + 1 : slash) = '\0';
	int dfd = open(slash ? dir : ".", O_RDONLY | O_DIRECTORY);
	if (dfd >= 0) {
		fsync(dfd);
		close(dfd);
	}
	return 0;
}

/* ==== Configuration =================================================== */
/*
 * One table says every key, its type and its default. Values come from
 * the defaults, then the file, then REMARKET_<KEY> variables, so an
 * operator can run with no file at all. Unknown keys in the file are an
 * error: a typo must not silently fall back to a default.
 */

#define CFG_STR(name, def) {#name, offsetof(struct config, name), 0, def}
#define CFG_LONG(name, def) {#name, offsetof(struct config, name), 1, def}
static const struct cfg_key {
	const char *name;
	size_t off;
	int is_long;
	const char *def;
} cfg_keys[] = {
	CFG_STR(db, "./var/remarket.db"),
	CFG_STR(key_file, "./var/remarket.key"),
	CFG_STR(base_url, "http://127.0.0.1:8080/rm"),
	CFG_STR(store_url, "http://127.0.0.1:8080"),
	CFG_STR(cart_url, "http://127.0.0.1:8080/cart?restore={cart}&code={code}"),
	CFG_STR(smtp_url, ""),
	CFG_STR(smtp_user, ""),
	CFG_STR(smtp_password, ""),
	CFG_LONG(smtp_connect_timeout, "10"),
	CFG_LONG(smtp_reply_timeout, "30"),
	CFG_LONG(smtp_connections, "4"),
	CFG_STR(outbox, "./var/outbox"),
	CFG_STR(from, "Maison Demo <shop@example.com>"),
	CFG_STR(tick_token, ""),
	CFG_STR(hook_secret, ""),
	CFG_STR(postal_address, "Maison Demo, 1 Example Street, 75001 Paris, France"),
	CFG_STR(templates, "./templates"),
	CFG_STR(unsubscribe_mailto, ""),
	CFG_STR(bounce_address, ""),
	CFG_STR(mailgun_signing_key, ""),
	CFG_STR(postmark_webhook_auth, ""),
	CFG_STR(sms_provider, ""),
	CFG_STR(sms_from, ""),
	CFG_STR(twilio_account_sid, ""),
	CFG_STR(twilio_auth_token, ""),
	CFG_STR(twilio_api_url, "https://api.twilio.com"),
	CFG_STR(sms_url, ""),
	CFG_STR(sms_secret, ""),
	CFG_STR(store_origin, ""),
	CFG_STR(static_dir, "./static"),
	CFG_STR(vapid_key_file, "./var/vapid.pem"),
	CFG_STR(vapid_subject, ""),
	CFG_STR(log_pii, "no"),
	CFG_LONG(rate_ip_per_min, "120"),
	CFG_LONG(rate_visitor_per_min, "60"),
	CFG_STR(trusted_proxies, ""),
	CFG_LONG(browser_new_contacts_per_hour, "200"),
	CFG_STR(browser_consent, "checkbox"),
	CFG_LONG(attribution_click_days, "5"),
	CFG_LONG(attribution_view_hours, "24"),
	CFG_LONG(conversion_days, "7"),
	CFG_STR(winback_after, "90"),
	CFG_LONG(winback_cooldown_days, "180"),
	CFG_STR(winback_max_idle_days, "auto"),
	CFG_LONG(winback_daily_max, "500"),
	CFG_STR(allow_insecure_links, "no"),
	CFG_STR(code_prefix, "RM"),
	CFG_STR(store_name, ""),
	CFG_STR(store_tagline, ""),
	CFG_STR(logo_url, ""),
	CFG_STR(brand_color, "#3d5a4a"),
	CFG_STR(currency, ""),
	CFG_STR(locale, "en"),
	CFG_STR(timezone, "UTC"),
	CFG_STR(reply_to, ""),
	CFG_LONG(idle_minutes, "60"),
	CFG_LONG(browse_idle_minutes, "120"),
	CFG_LONG(max_body, "65536"),
	CFG_LONG(threads, "4"),
	CFG_STR(socket_group, ""),
	CFG_LONG(max_lateness_hours, "24"),
	CFG_LONG(min_gap_hours, "16"),
	CFG_STR(quiet_hours_email, ""),
	CFG_STR(quiet_hours_sms, "21-9"),
	CFG_STR(quiet_hours_push, "21-9"),
	CFG_LONG(retention_days, "0"),
	CFG_LONG(lease_seconds, "300"),
	CFG_LONG(tick_budget_seconds, "50"),
	CFG_LONG(max_items, "100"),
	CFG_LONG(max_qty, "1000"),
	CFG_LONG(import_max_qty, "100000"),
	CFG_LONG(import_max_items, "1000"),
};
#define NKEYS (sizeof cfg_keys / sizeof cfg_keys[0])

static int iso_currency(const char *cur); /* in Validators */
static int is_ascii(const char *s); /* in Mail */

static int cfg_set(struct config *cfg, const struct cfg_key *k, const char *v,
		   char *err, size_t errlen)
{
	char *base = (char *)cfg;
	if (k->is_long) {
		char *end;
		errno = 0;
		long n = strtol(v, &end, 10);
		if (errno || end == v || *end || n < 0) {
			snprintf(err, errlen, "%s: '%s' is not a number >= 0",
				 k->name, v);
			return -1;
		}
		*(long *)(base + k->off) = n;
		return 0;
	}
	char **slot = (char **)(base + k->off);
	char *copy = strdup(v);
	if (!copy)
		return -1;
	free(*slot);
	*slot = copy;
	return 0;
}

static char *trim(char *s)
{
	while (isspace((unsigned char)*s))
		s++;
	char *e = s + strlen(s);
	while (e > s && isspace((unsigned char)e[-1]))
		*--e = '\0';
	return s;
}

static const struct cfg_key *cfg_find(const char *name)
{
	for (size_t i = 0; i < NKEYS; i++)
		if (strcmp(cfg_keys[i].name, name) == 0)
			return &cfg_keys[i];
	return NULL;
}

/* Reads the key = value lines of the config file PATH into CFG; a line
 * that is not key = value, or names an unknown key, is an error naming the
 * file and the line. */
static int cfg_read_file(struct config *cfg, const char *path, char *err,
			 size_t errlen)
{
	FILE *f = fopen(path, "r");
	if (!f) {
		snprintf(err, errlen, "%s: %s", path, strerror(errno));
		return -1;
	}
	char line[4096];
	int lineno = 0, rc = 0;
	while (rc == 0 && fgets(line, sizeof line, f)) {
		lineno++;
		char *s = trim(line);
		if (!*s || *s == '#')
			continue;
		char *eq = strchr(s, '=');
		if (!eq) {
			snprintf(err, errlen, "%s:%d: expected 'key = value'",
				 path, lineno);
			rc = -1;
			break;
		}
		*eq = '\0';
		const struct cfg_key *k = cfg_find(trim(s));
		if (!k) {
			snprintf(err, errlen, "%s:%d: unknown key '%s'", path,
				 lineno, trim(s));
			rc = -1;
			break;
		}
		rc = cfg_set(cfg, k, trim(eq + 1), err, errlen);
	}
	fclose(f);
	return rc;
}

/* Unquotes a display name in place: "\"Maison Demo, Paris\"" gives
 * Maison Demo, Paris (a backslash keeps the character after it). */
static void mailbox_unquote(char *s)
{
	size_t n = strlen(s);
	if (n < 2 || s[0] != '"' || s[n - 1] != '"')
		return;
	char *o = s;
	for (const char *p = s + 1; p < s + n - 1; p++) {
		if (*p == '\\' && p + 1 < s + n - 1)
			p++;
		*o++ = *p;
	}
	*o = '\0';
}

int cfg_mailbox(const char *mb, char *name, size_t nlen, char *addr,
		size_t alen)
{
	char tmp[512];
	if (copy_str(tmp, sizeof tmp, mb) < 0)
		return -1;
	char *lt = strrchr(tmp, '<'), *gt = lt ? strchr(lt, '>') : NULL;
	const char *a = tmp;
	if (lt && gt) {
		*lt = '\0';
		*gt = '\0';
		a = lt + 1;
	}
	if (copy_str(addr, alen, a) < 0)
		return -1;
	char *t = trim(addr);
	memmove(addr, t, strlen(t) + 1);
	char *nm = lt && gt ? trim(tmp) : tmp + strlen(tmp);
	mailbox_unquote(nm);
	return copy_str(name, nlen, nm) < 0 || !*addr ? -1 : 0;
}

/* "Maison Demo <shop@example.com>" gives "Maison Demo". */
static void cfg_derive_store_name(struct config *cfg)
{
	if (cfg->store_name && *cfg->store_name)
		return;
	char name[256] = "", addr[256];
	cfg_mailbox(cfg->from, name, sizeof name, addr, sizeof addr);
	free(cfg->store_name);
	cfg->store_name = strdup(*name ? name : "our store");
}

/* A mailbox key (from, reply_to): a plain ASCII address (the Message-ID
 * is made of its domain; SMTPUTF8 is not spoken) and a printable name. */
static int cfg_check_mailbox(const char *key, const char *v, char *err,
			     size_t errlen)
{
	char name[256], addr[256];
	if (cfg_mailbox(v, name, sizeof name, addr, sizeof addr) < 0 ||
	    !is_ascii(addr) || !val_email(addr) ||
	    !val_utf8(name, strlen(name)) || !val_text(name, 200)) {
		snprintf(err, errlen, "%s: '%s' is not a mailbox with an ASCII "
			 "address (want e.g. Maison Demo <shop@example.com>)",
			 key, v);
		return -1;
	}
	return 0;
}

int cfg_timezone(const char *name)
{
	char path[PATH_MAX];
	const char *dir = getenv("TZDIR");
	size_t n = strlen(name);
	if (!n || n > 64 || name[0] == '/' || strstr(name, ".."))
		return -1;
	for (const char *p = name; *p; p++)
		if (!isalnum((unsigned char)*p) && !strchr("/_+-", *p))
			return -1;
	snprintf(path, sizeof path, "%s/%s", dir && *dir ? dir :
		 "/usr/share/zoneinfo", name);
	if (strcmp(name, "UTC") != 0 && access(path, R_OK) != 0)
		return -1;
	const char *now = getenv("TZ");
	if (now && !strcmp(now, name))
		return 0; /* unchanged: no setenv under a running thread */
	/* process-wide: set before threads start, read by localtime_r */
	if (setenv("TZ", name, 1) < 0)
		return -1;
	tzset();
	return 0;
}

/* Quiet hours: "FROM-TO" in whole hours (0-23) of the contact's local
 * time, across midnight when FROM > TO ("21-9": 21:00 to 08:59); "" is
 * none. Writes -1 to both for none; -1 if SPEC is not of that form. */
int quiet_parse(const char *spec, int *from, int *to)
{
	char *end;
	*from = *to = -1;
	if (!*spec)
		return 0;
	if (!isdigit((unsigned char)*spec))
		return -1;
	long a = strtol(spec, &end, 10);
	if (*end != '-' || !isdigit((unsigned char)end[1]))
		return -1;
	long b = strtol(end + 1, &end, 10);
	if (*end || a > 23 || b > 23 || a == b)
		return -1;
	*from = (int)a;
	*to = (int)b;
	return 0;
}

static int cfg_check_quiet(const struct config *cfg, char *err, size_t errlen)
{
	const char *names[] = {"quiet_hours_email", "quiet_hours_sms",
			       "quiet_hours_push"};
	const char *v[] = {cfg->quiet_hours_email, cfg->quiet_hours_sms,
			   cfg->quiet_hours_push};
	int a, b;
	for (int i = 0; i < 3; i++)
		if (quiet_parse(v[i], &a, &b) < 0) {
			snprintf(err, errlen, "%s: '%s' is not FROM-TO in whole "
				 "hours 0-23, FROM != TO (e.g. 21-9), or empty "
				 "for none", names[i], v[i]);
			return -1;
		}
	return 0;
}

/*
 * Contacts' time zones. The process has one zone (cfg_timezone, set
 * before any thread starts) and localtime_r reads only that one; setting
 * TZ per message would race every thread's dates. So a contact's zone is
 * read once from the system's tz database (a TZif file, RFC 8536: the
 * transitions and their UTC offsets, 64-bit section when present) into a
 * cache shared under a mutex, and its offset looked up there. Times past
 * the last transition keep the last offset: the database as Debian ships
 * it lists transitions until 2037, its POSIX rule string is not read.
 */
#define ZONES_MAX 1024 /* the tz database has some 600 names */
struct zone {
	char name[65];
	int n;           /* transitions */
	int64_t *at;     /* their times, ascending */
	int32_t *off;    /* the UTC offset from each on */
	int32_t off0;    /* before the first */
};
static struct zone zones[ZONES_MAX];
static int nzones;
static pthread_mutex_t zones_lock = PTHREAD_MUTEX_INITIALIZER;

static uint32_t be32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
	       (uint32_t)p[2] << 8 | p[3];
}

/* Reads the TZif data B (N bytes) into Z; -1 if it is not TZif. */
static int tzif_parse(const unsigned char *b, size_t n, struct zone *z)
{
	size_t tsz = 4, at = 0;
	for (int pass = 0; pass < 2; pass++) {
		if (n - at < 44 || memcmp(b + at, "TZif", 4))
			return -1;
		uint32_t c[6]; /* isut, isstd, leap, time, type, char */
		for (int i = 0; i < 6; i++)
			c[i] = be32(b + at + 20 + 4 * i);
		if (c[3] > 100000 || c[4] == 0 || c[4] > 256 || c[5] > 65536 ||
		    c[2] > 10000 || c[0] > 256 || c[1] > 256)
			return -1;
		size_t times = at + 44, idx = times + c[3] * tsz,
		       types = idx + c[3],
		       end = types + c[4] * 6 + c[5] + c[2] * (tsz + 4) + c[1] + c[0];
		if (end > n)
			return -1;
		if (pass == 0 && b[at + 4] >= '2') { /* the 64-bit section follows */
			at = end;
			tsz = 8;
			continue;
		}
		z->n = (int)c[3];
		z->at = calloc(c[3] + 1, sizeof *z->at);
		z->off = calloc(c[3] + 1, sizeof *z->off);
		if (!z->at || !z->off)
			return -1;
		z->off0 = (int32_t)be32(b + types);
		for (uint32_t i = 0; i < c[3]; i++) {
			const unsigned char *t = b + times + i * tsz;
			z->at[i] = tsz == 8 ? (int64_t)((uint64_t)be32(t) << 32 |
							be32(t + 4))
					    : (int32_t)be32(t);
			if (b[idx + i] >= c[4])
				return -1;
			z->off[i] = (int32_t)be32(b + types + b[idx + i] * 6);
		}
		return 0;
	}
	return -1;
}

/* The cached zone NAME, read on first use; NULL if unknown. Under the lock. */
static const struct zone *zone_get(const char *name)
{
	for (int i = 0; i < nzones; i++)
		if (!strcmp(zones[i].name, name))
			return &zones[i];
	if (nzones == ZONES_MAX)
		return NULL;
	char path[PATH_MAX];
	const char *dir = getenv("TZDIR");
	struct buf b = {0};
	struct zone z = {0};
	snprintf(path, sizeof path, "%s/%s", dir && *dir ? dir :
		 "/usr/share/zoneinfo", name);
	copy_str(z.name, sizeof z.name, name);
	int rc = read_file(path, &b, 1 << 20) < 0 ? -1 :
		 tzif_parse((const unsigned char *)b.data, b.len, &z);
	buf_free(&b);
	if (rc < 0) {
		free(z.at);
		free(z.off);
		return NULL;
	}
	zones[nzones] = z;
	return &zones[nzones++];
}

/* 1 if NAME may name a zone: the charset and length of cfg_timezone. */
static int tz_name_ok(const char *name)
{
	size_t n = strlen(name);
	if (!n || n > 64 || name[0] == '/' || strstr(name, ".."))
		return 0;
	for (const char *p = name; *p; p++)
		if (!isalnum((unsigned char)*p) && !strchr("/_+-", *p))
			return 0;
	return 1;
}

int tz_offset(const char *zone, rm_time t, long *off)
{
	if (!zone || !*zone) { /* the store's: the process's zone */
		struct tm tm;
		time_t tt = (time_t)t;
		if (!localtime_r(&tt, &tm))
			return -1;
		*off = tm.tm_gmtoff;
		return 0;
	}
	if (!strcmp(zone, "UTC")) {
		*off = 0;
		return 0;
	}
	if (!tz_name_ok(zone))
		return -1;
	pthread_mutex_lock(&zones_lock);
	const struct zone *z = zone_get(zone);
	if (z) {
		int lo = 0, hi = z->n; /* the first transition after t */
		while (lo < hi) {
			int mid = lo + (hi - lo) / 2;
			if (z->at[mid] <= (int64_t)t)
				lo = mid + 1;
			else
				hi = mid;
		}
		*off = lo ? z->off[lo - 1] : z->off0;
	}
	pthread_mutex_unlock(&zones_lock);
	return z ? 0 : -1;
}

int tz_known(const char *zone)
{
	long off;
	return zone && *zone && tz_offset(zone, 0, &off) == 0;
}

/* The quiet hours of CHANNEL ("email", "sms", "push"; others have none). */
static const char *quiet_spec(const struct config *cfg, const char *channel)
{
	if (!strcmp(channel, "email"))
		return cfg->quiet_hours_email;
	if (!strcmp(channel, "sms"))
		return cfg->quiet_hours_sms;
	if (!strcmp(channel, "push"))
		return cfg->quiet_hours_push;
	return "";
}

/* ZONE's offset at T, else the store's, else UTC's. */
static long zone_offset(const char *zone, rm_time t)
{
	long off;
	if (tz_offset(zone, t, &off) < 0 && tz_offset(NULL, t, &off) < 0)
		off = 0;
	return off;
}

rm_time quiet_next(const struct config *cfg, const char *channel,
		   const char *zone, rm_time now)
{
	int from, to;
	long off;
	if (quiet_parse(quiet_spec(cfg, channel), &from, &to) < 0 || from < 0)
		return now;
	rm_time t = now;
	for (int i = 0; i < 3; i++) {
		off = zone_offset(zone, t);
		int64_t local = (int64_t)t + off;
		int64_t sod = ((local % 86400) + 86400) % 86400;
		int m = (int)(sod / 60);
		int quiet = from < to ? m >= from * 60 && m < to * 60
				      : m >= from * 60 || m < to * 60;
		if (!quiet)
			return t;
		t = t - sod % 60 + (rm_time)(((to * 60 - m + 1440) % 1440) * 60);
		/* the end of the window is in local time: a change of offset
		 * (DST) inside it moves it by that much */
		t -= zone_offset(zone, t) - off;
	}
	return t;
}

/* "https://shop.example/some/path" gives the origin "https://shop.example". */
static void cfg_derive_origin(struct config *cfg)
{
	CURLU *u = curl_url();
	char *scheme = NULL, *host = NULL, *port = NULL;
	if (u && curl_url_set(u, CURLUPART_URL, cfg->store_url, 0) == CURLUE_OK &&
	    curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
	    curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK) {
		curl_url_get(u, CURLUPART_PORT, &port, 0);
		char origin[512];
		snprintf(origin, sizeof origin, "%s://%s%s%s", scheme, host,
			 port ? ":" : "", port ? port : "");
		free(cfg->store_origin);
		cfg->store_origin = strdup(origin);
	}
	curl_free(scheme);
	curl_free(host);
	curl_free(port);
	curl_url_cleanup(u);
}

/* The keys of what a mail says and how: from, reply_to, locale, timezone. */
static int cfg_check_mail(struct config *cfg, char *err, size_t errlen)
{
	if (cfg_check_mailbox("from", cfg->from, err, errlen) < 0 ||
	    (*cfg->reply_to &&
	     cfg_check_mailbox("reply_to", cfg->reply_to, err, errlen) < 0))
		return -1;
	if (!mail_locale_known(cfg->locale)) {
		snprintf(err, errlen, "locale: '%s' is not one remarket writes (want "
			 "e.g. en, en_GB, en_US, fr_FR, de_DE, es_ES, it_IT, "
			 "nl_NL; README, Configuration)", cfg->locale);
		return -1;
	}
	if (cfg_timezone(cfg->timezone) < 0) {
		snprintf(err, errlen, "timezone: '%s' is not a zone of the system's "
			 "tz database (want e.g. Europe/Paris, America/New_York, "
			 "UTC; is tzdata installed?)", cfg->timezone);
		return -1;
	}
	return 0;
}

/* 1 if S is a colour as every mail client reads it: #rrggbb. */
static int cfg_hex_color(const char *s)
{
	if (strlen(s) != 7 || s[0] != '#')
		return 0;
	for (int i = 1; i < 7; i++)
		if (!isxdigit((unsigned char)s[i]))
			return 0;
	return 1;
}

/* 1 if S is an absolute http or https URL (curl_url parses it). */
static int cfg_web_url(const char *s)
{
	CURLU *u = curl_url();
	char *scheme = NULL;
	int ok = u && !strpbrk(s, " \t\r\n\"<>") &&
		 curl_url_set(u, CURLUPART_URL, s, 0) == CURLUE_OK &&
		 curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
		 (!strcmp(scheme, "http") || !strcmp(scheme, "https"));
	curl_free(scheme);
	curl_url_cleanup(u);
	return ok;
}

/* smtp_url may carry the relay's password (smtp://user:pw@host): no
 * message, log line, tick summary or stored error may print it, so every
 * one that names the URL prints this instead. curl_url parses it as
 * libcurl will; the user name stays, it helps and is no secret. */
void url_shown(const char *url, char *out, size_t n)
{
	CURLU *u = curl_url();
	char *shown = NULL;
	unsigned flags = CURLU_NON_SUPPORT_SCHEME;
	if (u && curl_url_set(u, CURLUPART_URL, url, flags) == CURLUE_OK &&
	    curl_url_set(u, CURLUPART_PASSWORD, NULL, 0) == CURLUE_OK &&
	    curl_url_get(u, CURLUPART_URL, &shown, 0) == CURLUE_OK) {
		size_t k = strlen(shown), l = strlen(url);
		if (k && shown[k - 1] == '/' && l && url[l - 1] != '/')
			shown[k - 1] = '\0'; /* the path curl adds, not the operator */
		copy_str(out, n, shown);
	} else
		copy_str(out, n, "(smtp_url: not a URL)");
	curl_free(shown);
	curl_url_cleanup(u);
}

/* The whole configuration: defaults, then the file, then REMARKET_<KEY>
 * variables, then the derived values and the checks across keys. */
static int cfg_load_all(struct config *cfg, const char *file, char *err,
			size_t errlen)
{
	for (size_t i = 0; i < NKEYS; i++)
		if (cfg_set(cfg, &cfg_keys[i], cfg_keys[i].def, err, errlen))
			return -1;
	if (!file)
		file = getenv("REMARKET_CONFIG");
	if (!file && access("./remarket.conf", R_OK) == 0)
		file = "./remarket.conf";
	if (file && cfg_read_file(cfg, file, err, errlen) < 0)
		return -1;
	for (size_t i = 0; i < NKEYS; i++) {
		char var[64] = "REMARKET_";
		size_t at = strlen(var);
		for (const char *p = cfg_keys[i].name; *p && at < 63; p++)
			var[at++] = (char)toupper((unsigned char)*p);
		var[at] = '\0';
		const char *v = getenv(var);
		if (v && cfg_set(cfg, &cfg_keys[i], v, err, errlen) < 0)
			return -1;
	}
	cfg_derive_store_name(cfg);
	if (cfg_check_quiet(cfg, err, errlen) < 0)
		return -1;
	if (strcmp(cfg->browser_consent, "checkbox") &&
	    strcmp(cfg->browser_consent, "confirm")) {
		snprintf(err, errlen, "browser_consent: '%s' is not checkbox or "
			 "confirm", cfg->browser_consent);
		return -1;
	}
	/* an installed remarket finds its files where make install put them */
	struct stat st;
	if (!strcmp(cfg->templates, "./templates") && stat(cfg->templates, &st) != 0) {
		free(cfg->templates);
		cfg->templates = strdup(RM_SHAREDIR "/templates");
	}
	if (!strcmp(cfg->static_dir, "./static") && stat(cfg->static_dir, &st) != 0) {
		free(cfg->static_dir);
		cfg->static_dir = strdup(RM_SHAREDIR "/static");
	}
	if (!*cfg->store_origin)
		cfg_derive_origin(cfg);
	const char *bad = NULL;
	size_t badlen = 0;
	struct ipaddr any = {0};
	if (ip_in_list(cfg->trusted_proxies, &any, &bad, &badlen) < 0) {
		snprintf(err, errlen, "trusted_proxies: '%.*s' is not an address or "
			 "CIDR (want e.g. 127.0.0.1, ::1, 10.0.0.0/8)", (int)badlen,
			 bad);
		return -1;
	}
	if (cfg->threads < 1 || cfg->threads > 64)
		cfg->threads = 4;
	/* 0 would mean libcurl's own (minutes-long) defaults */
	if (cfg->smtp_connect_timeout < 1)
		cfg->smtp_connect_timeout = 1;
	if (cfg->smtp_reply_timeout < 1)
		cfg->smtp_reply_timeout = 1;
	if (cfg->smtp_connect_timeout > 3600)
		cfg->smtp_connect_timeout = 3600;
	if (cfg->smtp_reply_timeout > 3600)
		cfg->smtp_reply_timeout = 3600;
	if (cfg->smtp_connections < 1 || cfg->smtp_connections > RM_MAX_CONNECTIONS) {
		snprintf(err, errlen, "smtp_connections: %ld must be 1 to %d (the "
			 "SMTP connections a tick sends on at once)",
			 cfg->smtp_connections, RM_MAX_CONNECTIONS);
		return -1;
	}
	if (strcmp(cfg->log_pii, "yes") != 0 && strcmp(cfg->log_pii, "no") != 0) {
		snprintf(err, errlen, "log_pii: '%s' must be yes or no", cfg->log_pii);
		return -1;
	}
	/* bounces+<tag>@domain is made from it: one '@', no '+' of its own */
	if (*cfg->bounce_address && (!val_email(cfg->bounce_address) ||
				     strchr(cfg->bounce_address, '+'))) {
		snprintf(err, errlen, "bounce_address: '%s' must be a plain address "
			 "without '+' (e.g. bounces@shop.example): each message's "
			 "envelope sender is bounces+<tag>@shop.example",
			 cfg->bounce_address);
		return -1;
	}
	if (strcmp(cfg->allow_insecure_links, "yes") &&
	    strcmp(cfg->allow_insecure_links, "no")) {
		snprintf(err, errlen, "allow_insecure_links: '%s' must be yes or no",
			 cfg->allow_insecure_links);
		return -1;
	}
	/* the JWT's "sub" is written as it is: no quote, no escape */
	if (*cfg->vapid_subject && ((strncmp(cfg->vapid_subject, "mailto:", 7) &&
				     strncmp(cfg->vapid_subject, "https:", 6)) ||
				    !val_text(cfg->vapid_subject, 200) ||
				    strpbrk(cfg->vapid_subject, "\"\\"))) {
		snprintf(err, errlen, "vapid_subject: '%s' must be a mailto: or "
			 "https: URL (e.g. mailto:shop@example.com)",
			 cfg->vapid_subject);
		return -1;
	}
	if (!cfg_hex_color(cfg->brand_color)) {
		snprintf(err, errlen, "brand_color: '%s' is not a colour as #rrggbb "
			 "(e.g. #3d5a4a)", cfg->brand_color);
		return -1;
	}
	if (*cfg->logo_url && !cfg_web_url(cfg->logo_url)) {
		snprintf(err, errlen, "logo_url: '%s' is not an http(s) URL (want "
			 "e.g. https://shop.example/logo.png, or nothing)",
			 cfg->logo_url);
		return -1;
	}
	if (*cfg->currency && !iso_currency(cfg->currency)) {
		snprintf(err, errlen, "currency: '%s' is not an ISO 4217 code (want "
			 "e.g. EUR, GBP, USD, or nothing)", cfg->currency);
		return -1;
	}
	return cfg_check_mail(cfg, err, errlen);
}

/* On failure nothing is left allocated. */
int cfg_load(struct config *cfg, const char *file, char *err, size_t errlen)
{
	memset(cfg, 0, sizeof *cfg);
	if (cfg_load_all(cfg, file, err, errlen) == 0)
		return 0;
	cfg_free(cfg);
	return -1;
}

void cfg_free(struct config *cfg)
{
	for (size_t i = 0; i < NKEYS; i++)
		if (!cfg_keys[i].is_long)
			free(*(char **)((char *)cfg + cfg_keys[i].off));
	memset(cfg, 0, sizeof *cfg);
}

/* ==== Storage: connection, migrations, named statements =============== */
/*
 * Every SQL text the program runs (besides the migrations in sql/) is in
 * the STATEMENTS table below, prepared once per connection on first use.
 * Values are always bound, never glued into the text. Each thread owns
 * its connection; SQLite in WAL mode lets readers run beside one writer,
 * and busy_timeout makes a second writer wait instead of failing.
 */

/* What a mail calls catalog product P: its name, else "Brand · category"
 * (a catalog of brands and categories names no product), else NULL. */
#define SQL_LABEL(p)                                                           \
	"coalesce(nullif(" p ".name, ''), nullif(coalesce(" p ".brand, '') || " \
	"CASE WHEN " p ".brand <> '' AND " p ".category <> '' THEN ' · ' "     \
	"ELSE '' END || coalesce(" p ".category, ''), ''))"

/* JSON item arrays A and B differ in their (sku, qty) pairs. */
#define ITEMS_DIFFER(a, b)                                                     \
	"(EXISTS (SELECT json_extract(value, '$.sku'), "                       \
	"coalesce(json_extract(value, '$.qty'), 1) FROM json_each(" a ") "    \
	"EXCEPT SELECT json_extract(value, '$.sku'), "                        \
	"coalesce(json_extract(value, '$.qty'), 1) FROM json_each(" b ")) "   \
	"OR EXISTS (SELECT json_extract(value, '$.sku'), "                    \
	"coalesce(json_extract(value, '$.qty'), 1) FROM json_each(" b ") "    \
	"EXCEPT SELECT json_extract(value, '$.sku'), "                        \
	"coalesce(json_extract(value, '$.qty'), 1) FROM json_each(" a ")))"

/* Message M is about an earlier generation of cart CART: its enrollment's
 * cart is "<CART's key>#<n>" (no cart id holds a GLOB character). */
#define GEN_EARLIER(m, cart)                                                   \
	"EXISTS (SELECT 1 FROM enrollments ge JOIN carts gk ON gk.id = "      \
	"ge.cart_id WHERE ge.id = " m ".enrollment_id AND gk.cart_key GLOB "  \
	"(SELECT cart_key FROM carts WHERE id = " cart ") || '#*')"

/* A win-back's eligibility, shared by LAPSE_ENROLL and the waiting list
 * (LAPSE_WAIT_*): lapsed (no order for the threshold ?2, two thirds of it
 * for the at-risk), idle no longer than ?6 (0: no limit), consenting, and
 * not enrolled since the last order nor within the cool-down ?3. */
#define LAPSE_ELIGIBLE                                                         \
	"c.consent = 1 AND c.unsubscribed_at IS NULL "                         \
	"AND c.suppressed_at IS NULL AND sg.last_order <= ?1 - CASE "          \
	"WHEN sg.segment = 'at_risk' THEN ?2 * 2 / 3 ELSE ?2 END "             \
	"AND (?6 = 0 OR sg.last_order > ?1 - ?6) "                             \
	"AND NOT EXISTS (SELECT 1 FROM enrollments e WHERE e.flow_id = f.id "   \
	"AND e.contact_id = c.id AND (e.created >= sg.last_order "             \
	"OR e.created > ?1 - ?3))"

#define STATEMENTS(X)                                                          \
	/* -- Storage: connection, migrations, named statements -- */          \
	X(BEGIN, "BEGIN IMMEDIATE")                                            \
	X(COMMIT, "COMMIT")                                                    \
	X(ROLLBACK, "ROLLBACK")                                                \
	/* one request's events inside a batch's transaction (ev_store) */     \
	X(SAVEPOINT, "SAVEPOINT ev")                                           \
	X(RELEASE, "RELEASE ev")                                               \
	X(ROLLBACK_TO, "ROLLBACK TO ev")                                       \
	/* -- Events: validation and state (contacts, carts, orders) -- */     \
	X(BODY_SHAPE, "SELECT json_valid(?1), json_type(?1)")                   \
	X(ARRAY_EACH, "SELECT value, type FROM json_each(?1)")                 \
	X(OBJECT_EACH, "SELECT key, type, atom, value FROM json_each(?1)")     \
	X(EVENT_INSERT,                                                        \
	  "INSERT INTO events (ts, received, source, type, body) "             \
	  "VALUES (?1, ?2, ?3, ?4, json(?5))")                                 \
	X(CONTACT_UPSERT,                                                      \
	  "INSERT INTO contacts (email, name, consent, created, updated, signed) " \
	  "VALUES (?1, coalesce(?2, ''), coalesce(?3, 0), ?4, ?4, 1) "         \
	  "ON CONFLICT (email) DO UPDATE SET "                                 \
	  "name = CASE WHEN ?2 IS NOT NULL AND ?2 <> '' THEN ?2 ELSE name END, " \
	  "consent = coalesce(?3, consent), updated = ?4, signed = 1, "        \
	  "consent_vid = CASE WHEN ?3 IS NULL THEN consent_vid END, "          \
	  "consent_pending = CASE WHEN ?3 IS NULL THEN consent_pending ELSE 0 END " \
	  "RETURNING id")                                                      \
	/* an address `remarket forget` erased (see sql/016_people.sql) */    \
	/* a signed event's phone and SMS consent: a consent said is kept     \
	 * with its source and time when it changes; a new number without a   \
	 * consent said loses the old number's consent */                     \
	X(CONTACT_SMS,                                                         \
	  "UPDATE contacts SET phone = coalesce(?2, phone), "                  \
	  "sms_consent = CASE WHEN ?3 IS NOT NULL THEN ?3 WHEN ?2 IS NOT NULL " \
	  "AND ?2 IS NOT phone THEN 0 ELSE sms_consent END, "                  \
	  "sms_consent_source = CASE WHEN ?3 IS NOT NULL AND ?3 <> sms_consent " \
	  "THEN ?4 WHEN ?3 IS NULL AND ?2 IS NOT NULL AND ?2 IS NOT phone "    \
	  "AND sms_consent THEN ?4 || ' (new number)' ELSE sms_consent_source END, " \
	  "sms_consent_at = CASE WHEN (?3 IS NOT NULL AND ?3 <> sms_consent) " \
	  "OR (?3 IS NULL AND ?2 IS NOT NULL AND ?2 IS NOT phone "             \
	  "AND sms_consent) THEN ?5 ELSE sms_consent_at END WHERE id = ?1")    \
	X(FORGOTTEN_HAS, "SELECT 1 FROM forgotten WHERE hash = ?1")           \
	X(FORGOTTEN_DEL, "DELETE FROM forgotten WHERE hash = ?1")             \
	/* the browser's door to contacts: an address, never a name; new      \
	 * browser-only contacts past the hourly cap are held (not mailed);   \
	 * consent given by a checkbox, taken back only by the same visitor;  \
	 * ?5 = 1 (browser_consent = confirm): a consent given in a browser   \
	 * waits for the double opt-in */                                     \
	X(BROWSER_RECENT,                                                      \
	  "SELECT count(*) FROM (SELECT 1 FROM contacts WHERE signed = 0 "     \
	  "AND created > ?1 - 3600 AND created <= ?1 LIMIT ?2)")               \
	/* a held contact seen again an hour on is let in if the hour has     \
	 * room; let in now, it takes a place under this hour's cap */        \
	X(BROWSER_RELEASE,                                                     \
	  "UPDATE contacts SET held_at = NULL, created = ?2 WHERE id = ?1 "    \
	  "AND signed = 0 AND held_at <= ?2 - 3600 AND (SELECT count(*) "      \
	  "FROM (SELECT 1 FROM contacts WHERE signed = 0 "                     \
	  "AND created > ?2 - 3600 AND created <= ?2 LIMIT ?3)) < ?3")         \
	X(CONTACT_NEW_BROWSER,                                                 \
	  "INSERT INTO contacts (email, created, updated, held_at) "           \
	  "VALUES (?1, ?2, ?2, ?3) RETURNING id")                              \
	X(CONTACT_TZ_SET, "UPDATE contacts SET tz = ?2 WHERE id = ?1")         \
	X(CONTACT_CONSENT_BROWSER,                                             \
	  "UPDATE contacts SET updated = ?4, consent = CASE "                  \
	  "WHEN ?2 = 1 AND consent = 0 AND NOT ?5 THEN 1 "                     \
	  "WHEN ?2 = 0 AND consent_vid = ?3 THEN 0 ELSE consent END, "         \
	  "consent_pending = CASE WHEN ?2 = 1 AND consent = 0 AND ?5 THEN 1 "  \
	  "WHEN ?2 = 0 AND consent_vid = ?3 THEN 0 "                           \
	  "ELSE consent_pending END, consent_vid = CASE WHEN ?2 = 1 "          \
	  "AND consent = 0 AND consent_pending = 0 THEN ?3 "                   \
	  "ELSE consent_vid END WHERE id = ?1") /* a pending one is kept */    \
	X(VISITOR_CONTACT, "SELECT contact_id FROM visitors WHERE vid = ?1")   \
	X(VISITOR_UPSERT,                                                      \
	  "INSERT INTO visitors (vid, contact_id, first_seen, last_seen) "     \
	  "VALUES (?1, ?2, ?3, ?3) ON CONFLICT (vid) DO UPDATE SET "           \
	  "contact_id = coalesce(?2, contact_id), last_seen = ?3, "            \
	  "verified = CASE WHEN ?2 IS NOT contact_id AND ?2 IS NOT NULL "      \
	  "THEN 0 ELSE verified END") /* a typed address proves nothing */     \
	X(VISITOR_CARTS,                                                       \
	  "UPDATE carts SET contact_id = ?2 "                                  \
	  "WHERE visitor_id = ?1 AND contact_id IS NULL")                      \
	/* an item change after the order, with a later ts, starts the next  \
	 * generation of the cart id: the ordered one moves to "<key>#<n>"    \
	 * (the same row, id, orders and enrollments) and CART_UPSERT makes   \
	 * the new row; an equal item list (a resent cart) starts nothing */  \
	X(CART_NEXT_GEN,                                                       \
	  "UPDATE carts SET cart_key = cart_key || '#' || generation "         \
	  "WHERE cart_key = ?1 AND status = 'ordered' AND ordered_at < ?2 "    \
	  "AND ?3 > 0 AND " ITEMS_DIFFER("?4", "carts.items") " "              \
	  "RETURNING generation, contact_id, visitor_id")                      \
	X(CART_GEN_SET,                                                        \
	  "UPDATE carts SET generation = ?2 + 1, started = ?3, "               \
	  "contact_id = coalesce(contact_id, ?4), "                            \
	  "visitor_id = coalesce(visitor_id, ?5) WHERE id = ?1")               \
	X(CART_UPSERT,                                                         \
	  "INSERT INTO carts (cart_key, contact_id, visitor_id, currency, total, " \
	  "items, item_count, status, updated) VALUES (?1, ?2, ?3, ?4, ?5, "   \
	  "json(?6), ?7, CASE WHEN ?7 = 0 THEN 'empty' ELSE 'open' END, ?8) "  \
	  "ON CONFLICT (cart_key) DO UPDATE SET "                              \
	  "contact_id = coalesce(?2, contact_id), "                            \
	  "visitor_id = coalesce(?3, visitor_id), currency = ?4, total = ?5, " \
	  "items = json(?6), item_count = ?7, "                                \
	  "status = CASE WHEN status = 'ordered' THEN 'ordered' "              \
	  "WHEN ?7 = 0 THEN 'empty' ELSE 'open' END, updated = ?8 "            \
	  "RETURNING id, status")                                              \
	/* a known contact's view of a product, for browse abandonment (the  \
	 * tick reads and deletes these rows: detect_browse) */              \
	X(BROWSE_VIEW,                                                         \
	  "INSERT INTO browse_views (contact_id, sku, first, last, views, "    \
	  "max_seconds) SELECT ?1, ?2, ?3, ?3, 1, max(?4, 0) FROM contacts "   \
	  "WHERE id = ?1 AND email IS NOT NULL ON CONFLICT DO UPDATE SET "     \
	  "last = max(last, excluded.last), views = views + 1, "               \
	  "max_seconds = max(max_seconds, excluded.max_seconds)")              \
	X(CART_TOUCH,                                                          \
	  "UPDATE carts SET updated = ?2, contact_id = coalesce(?3, contact_id), " \
	  "status = CASE WHEN status = 'abandoned' THEN 'open' ELSE status END " \
	  "WHERE cart_key = ?1 AND status <> 'ordered'")                       \
	/* an order's cart: the generation its ts falls in (a late order of \
	 * the generation before stays with that one) */                      \
	X(CART_FOR_ORDER,                                                      \
	  "SELECT coalesce((SELECT p.id FROM carts p WHERE c.started > ?2 "    \
	  "AND p.cart_key = c.cart_key || '#' || (c.generation - 1)), c.id) "  \
	  "FROM carts c WHERE c.cart_key = ?1")                                \
	/* a browser's cart item: sku and qty only; the total from the       \
	 * catalog's prices */                                                \
	X(ITEMS_BARE,                                                          \
	  "SELECT json_group_array(json_object('sku', "                        \
	  "json_extract(value, '$.sku'), 'qty', "                              \
	  "coalesce(json_extract(value, '$.qty'), 1))), "                      \
	  "total(coalesce(json_extract(value, '$.qty'), 1) * p.price) "        \
	  "FROM json_each(?1) LEFT JOIN products p "                           \
	  "ON p.sku = json_extract(value, '$.sku')")                           \
	/* a signed order for cart_id X ends the browsers' carts "X/<vid>" */ \
	X(SCOPED_EXIT,                                                         \
	  "UPDATE enrollments SET status = 'exited', exit_reason = 'order' "   \
	  "WHERE status = 'active' AND cart_id IN (SELECT id FROM carts "      \
	  "WHERE cart_key >= ?1 || '/' AND cart_key < ?1 || '0')")             \
	X(SCOPED_ORDERED,                                                      \
	  "UPDATE carts SET status = 'ordered', ordered_at = ?2 "              \
	  "WHERE cart_key >= ?1 || '/' AND cart_key < ?1 || '0' "              \
	  "AND +status IN ('open', 'abandoned')") /* by key, not status */     \
	/* a signed cart X supersedes the browsers' copies "X/<vid>" */       \
	X(SCOPED_SUPERSEDE,                                                    \
	  "UPDATE enrollments SET status = 'exited', exit_reason = 'superseded' " \
	  "WHERE status = 'active' AND cart_id IN (SELECT id FROM carts "      \
	  "WHERE cart_key >= ?1 || '/' AND cart_key < ?1 || '0')")             \
	X(CART_OWNER,                                                          \
	  "SELECT count(*) FROM carts WHERE cart_key = ?1 "                    \
	  "AND visitor_id IS NOT ?2")                                          \
	X(CART_ORDERED,                                                        \
	  "UPDATE carts SET status = 'ordered', ordered_at = ?3 "              \
	  "WHERE (id = ?1 OR (?1 IS NULL AND contact_id = ?2 AND updated <= ?3)) " \
	  "AND status IN ('open', 'abandoned')")                               \
	/* a delayed order hook: the cart it just ordered had changed after  \
	 * the order's ts to other items than the order's; those are the next \
	 * generation (as if the hook had come in time): the ordered row      \
	 * takes the order's items and moves to "<key>#<n>", a new row keeps  \
	 * the cart as it stands */                                           \
	X(CART_AFTER_ORDER,                                                    \
	  "SELECT cart_key, items, total, item_count FROM carts WHERE id = ?1 " \
	  "AND updated > ?2 AND item_count > 0 AND ?4 > 0 AND "                \
	  ITEMS_DIFFER("?3", "carts.items"))                                   \
	X(CART_ARCHIVE_AS,                                                     \
	  "UPDATE carts SET cart_key = cart_key || '#' || generation, "        \
	  "items = json(?2), item_count = ?3, total = ?4 WHERE id = ?1")       \
	X(CART_GEN_COPY,                                                       \
	  "INSERT INTO carts (cart_key, contact_id, visitor_id, currency, "    \
	  "total, items, item_count, status, updated, generation, started) "   \
	  "SELECT ?2, contact_id, visitor_id, currency, ?3, json(?4), ?5, "    \
	  "'open', updated, generation + 1, updated FROM carts WHERE id = ?1") \
	X(EXIT_CART,                                                           \
	  "UPDATE enrollments SET status = 'exited', exit_reason = ?2 "        \
	  "WHERE cart_id = ?1 AND status = 'active'")                          \
	X(ORDER_INSERT,                                                        \
	  "INSERT INTO orders (order_key, contact_id, cart_id, total, currency, " \
	  "items, discount_code, ts) VALUES (?1, ?2, ?3, ?4, ?5, json(?6), ?7, ?8) " \
	  "ON CONFLICT (order_key) DO NOTHING")                                \
	/* a refund: once per refund_key (?1), never past the order's total;  \
	 * its customer's segment is counted again (SEG_AGG) */              \
	X(REFUND_ORDER, "SELECT id FROM orders WHERE order_key = ?1")          \
	X(REFUND_INSERT,                                                       \
	  "INSERT INTO refunds (refund_key, order_id, amount, ts) "            \
	  "SELECT ?1, id, max(0, min(?3, total - refunded)), ?4 FROM orders "  \
	  "WHERE id = ?2 ON CONFLICT (refund_key) DO NOTHING")                 \
	X(REFUND_APPLY,                                                        \
	  "UPDATE orders SET refunded = refunded + (SELECT amount FROM refunds " \
	  "WHERE id = ?2) WHERE id = ?1")                                      \
	/* an imported cancellation's order: the customer's latest order up  \
	 * to its date with a line of that SKU */                            \
	X(REFUND_MATCH,                                                        \
	  "SELECT o.order_key FROM contacts c JOIN order_lines l "             \
	  "ON l.contact_id = c.id JOIN orders o ON o.id = l.order_id "         \
	  "WHERE c.email = ?1 AND l.sku = ?2 AND l.ts <= ?3 "                  \
	  "ORDER BY l.ts DESC LIMIT 1")                                        \
	X(REFUND_DIRTY,                                                        \
	  "INSERT OR IGNORE INTO segment_dirty (contact_id) SELECT contact_id " \
	  "FROM orders WHERE id = ?1 AND contact_id IS NOT NULL")              \
	X(CART_CONTACT, "SELECT contact_id FROM carts WHERE id = ?1")          \
	X(CONTACT_ID, "SELECT id FROM contacts WHERE email = ?1")              \
	/* the last message the order redeemed the code of, or that the       \
	 * contact clicked within the click window before ordering; a click   \
	 * or a view of a mail about an earlier generation of the order's     \
	 * cart ?5 (its own order is that generation's) earns nothing */      \
	X(ATTRIBUTE_CLICK,                                                     \
	  "SELECT m.id, CASE WHEN m.id = (SELECT message FROM discounts "      \
	  "WHERE code = ?3) THEN 'code' ELSE 'click' END FROM messages m "     \
	  "WHERE m.status = 'sent' AND (m.id = (SELECT message FROM discounts " \
	  "WHERE code = ?3) OR (m.contact_id = ?1 AND m.sent_at >= ?2 - ?4 "   \
	  "AND EXISTS (SELECT 1 FROM interactions i WHERE i.message = m.id "   \
	  "AND i.kind IN ('click', 'discount') AND i.ts BETWEEN ?2 - ?4 AND ?2) " \
	  "AND NOT " GEN_EARLIER("m", "?5") ")) "                              \
	  "ORDER BY m.sent_at DESC, m.id DESC LIMIT 1")                        \
	X(ATTRIBUTE_VIEW,                                                      \
	  "SELECT id FROM messages m WHERE contact_id = ?1 AND status = 'sent' " \
	  "AND sent_at BETWEEN ?2 - ?3 AND ?2 AND NOT " GEN_EARLIER("m", "?4") \
	  " ORDER BY sent_at DESC, id DESC LIMIT 1")                           \
	X(ORDER_ATTRIBUTE,                                                     \
	  "UPDATE orders SET message = ?2, attribution = ?3 WHERE order_key = ?1") \
	X(ORDER_LINES,                                                         \
	  "INSERT INTO order_lines (order_id, contact_id, sku, qty, price, ts) " \
	  "SELECT ?1, ?2, json_extract(value, '$.sku'), "                      \
	  "coalesce(json_extract(value, '$.qty'), 1), "                        \
	  "json_extract(value, '$.price'), ?3 FROM json_each(?4) "             \
	  "WHERE json_extract(value, '$.sku') IS NOT NULL")                    \
	X(EXIT_ORDERED,                                                        \
	  "UPDATE enrollments SET status = 'exited', exit_reason = 'order' "   \
	  "WHERE contact_id = ?1 AND status = 'active' AND created <= ?2 "     \
	  "AND flow_id IN (SELECT id FROM flows "                              \
	  "WHERE trigger IN ('cart_abandoned', 'customer_lapsed'))")           \
	/* a new product's kind is ?8, else guessed; an update keeps it      \
	 * unless ?8 says; RETURNING the kind before and after */              \
	X(PRODUCT_UPSERT,                                                      \
	  "INSERT INTO products (sku, name, price, url, image, category, updated, " \
	  "kind, brand) VALUES (?1, coalesce(?2, ''), ?3, ?4, ?5, ?6, ?7, "   \
	  "coalesce(?8, CASE WHEN rm_service(?1, ?2) THEN 'service' "          \
	  "ELSE 'product' END), ?9) "                                          \
	  "ON CONFLICT (sku) DO UPDATE SET "                                   \
	  "name = coalesce(?2, name), price = coalesce(?3, price), "           \
	  "url = coalesce(?4, url), "                                          \
	  "image = coalesce(?5, image), category = coalesce(?6, category), "   \
	  "updated = ?7, kind = coalesce(?8, kind), brand = coalesce(?9, brand)") \
	X(PRODUCT_KIND_OF,                                                     \
	  "SELECT coalesce((SELECT kind FROM products WHERE sku = ?1), 'product')") \
	/* an order's service lines (postage, fees) not yet in the catalog    \
	 * get a row there, so they are never counted as products */          \
	X(ORDER_SERVICES,                                                      \
	  "INSERT INTO products (sku, name, kind, updated) "                   \
	  "SELECT json_extract(value, '$.sku'), "                              \
	  "coalesce(json_extract(value, '$.name'), ''), 'service', ?2 "        \
	  "FROM json_each(?1) WHERE rm_service(json_extract(value, '$.sku'), " \
	  "json_extract(value, '$.name')) ON CONFLICT DO NOTHING")             \
	X(REVIEW_INSERT,                                                       \
	  "INSERT OR IGNORE INTO reviews (sku, author, rating, text, ts) "     \
	  "VALUES (?1, ?2, ?3, ?4, ?5)")                                       \
	X(DISCOUNT_GET,                                                        \
	  "SELECT percent, min_spend, expires, redeemed_at FROM discounts "    \
	  "WHERE code = ?1")                                                   \
	/* an order redeems a code once, and only before it expires */       \
	X(DISCOUNT_REDEEM,                                                     \
	  "UPDATE discounts SET redeemed_at = ?2, order_key = ?3 "             \
	  "WHERE code = ?1 AND redeemed_at IS NULL AND expires >= ?2")         \
	X(ORDER_CODE_STATUS,                                                   \
	  "UPDATE orders SET code_status = ?2 WHERE order_key = ?1")           \
	/* -- Discount codes -- */                                             \
	X(DISCOUNT_INSERT,                                                     \
	  "INSERT INTO discounts (code, percent, min_spend, contact_id, message, " \
	  "created, expires) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")             \
	/* -- Catalog and order imports (CSV) -- */                            \
	X(IMP_CREATE,                                                          \
	  "CREATE TEMP TABLE IF NOT EXISTS imp (n INTEGER PRIMARY KEY, "       \
	  "order_id TEXT, email TEXT, ts INTEGER, sku TEXT, name TEXT, "       \
	  "price REAL, qty INTEGER, currency TEXT, consent INTEGER, "           \
	  "plain INTEGER, customer_id TEXT, line INTEGER)")                    \
	/* plain: see imp_line_plain; line: the file's, for messages */        \
	/* the lines go to the temp database only: no lock on the store's */  \
	X(IMP_BEGIN, "BEGIN")                                                  \
	/* 8 MiB of page cache (2 by default) for the import's connection:  \
	 * order_lines' sku and contact indexes take a line anywhere in      \
	 * them, and a page that must be read back again costs the most */    \
	X(IMP_CACHE, "PRAGMA cache_size = -8192")                              \
	X(IMP_INSERT,                                                          \
	  "INSERT INTO temp.imp (order_id, email, ts, sku, name, price, qty, " \
	  "currency, consent, plain, customer_id, line) VALUES (?1, ?2, ?3, "  \
	  "?4, ?5, ?6, coalesce(?7, 1), ?8, ?9, ?10, ?11, ?12)")               \
	X(IMP_INDEX,                                                           \
	  "CREATE INDEX IF NOT EXISTS temp.imp_order ON imp (order_id, n)")    \
	/* the orders in the order they are ingested: by date, then as the   \
	 * file has them */                                                   \
	X(IMP_LIST_CREATE,                                                     \
	  "CREATE TEMP TABLE IF NOT EXISTS imp_o (seq INTEGER PRIMARY KEY, "   \
	  "order_id TEXT)")                                                    \
	X(IMP_LIST,                                                            \
	  "INSERT INTO temp.imp_o (order_id) SELECT order_id FROM temp.imp "   \
	  "GROUP BY order_id ORDER BY min(ts), min(n)")                        \
	/* order number ?1: its id, its order event (the lines in file       \
	 * order), and the event's fields as values for the direct path; an   \
	 * empty column is left out of its item, as an event leaves it out    \
	 * (a line without a name is taken, as /events takes it) */           \
	X(IMP_ORDER,                                                           \
	  "SELECT id, json_patch('{}', json_object('type', 'order', "          \
	  "'order_id', id, 'email', email, 'customer_id', customer_id, "       \
	  "'ts', ts, 'currency', currency, "                                   \
	  "'consent', CASE WHEN consent IS NULL THEN NULL WHEN consent "       \
	  "THEN json('true') ELSE json('false') END, 'total', total, "         \
	  "'items', json(items))), email, ts, currency, consent, total, "      \
	  "items, lines, plain, customer_id FROM (SELECT o.order_id AS id, "   \
	  "min(i.email) AS email, min(i.customer_id) AS customer_id, "         \
	  "min(i.ts) AS ts, "                                                  \
	  "coalesce(min(i.currency), 'EUR') AS currency, "                     \
	  "max(i.consent) AS consent, "                                        \
	  "round(total(i.price * i.qty), 2) AS total, "                        \
	  "json_group_array(json_patch('{}', json_object('sku', i.sku, "       \
	  "'name', i.name, 'price', i.price, 'qty', i.qty))) AS items, "       \
	  "count(*) AS lines, "                                                \
	  "min(i.plain) AS plain FROM temp.imp_o o JOIN temp.imp i "           \
	  "ON i.order_id IS o.order_id WHERE o.seq = ?1)")                     \
	/* the lines of order ?1 as the file had them, for --rejects */       \
	X(IMP_ORDER_LINES,                                                     \
	  "SELECT i.order_id, i.sku, i.name, i.qty, i.price, i.ts, "           \
	  "i.customer_id, i.line FROM temp.imp_o o JOIN temp.imp i "           \
	  "ON i.order_id IS o.order_id WHERE o.seq = ?1 ORDER BY i.n")         \
	X(IMP_CLEAR, "DELETE FROM temp.imp")                                   \
	X(IMP_LIST_CLEAR, "DELETE FROM temp.imp_o")                            \
	X(IMP_PRODUCT,                                                         \
	  "SELECT json_patch('{}', json_object('type', 'product', 'sku', ?1, " \
	  "'name', ?2, 'price', ?3, 'url', ?4, 'image', ?5, 'category', ?6, "  \
	  "'brand', ?11, "                                                     \
	  "'review', CASE WHEN ?7 IS NOT NULL THEN json_object('author', ?7, " \
	  "'rating', ?8, 'text', ?9) END, 'kind', ?10))")                      \
	/* -- Segments -- */                                                   \
	/* gaps between a customer's consecutive orders: count and the 90th  \
	 * percentile, from which winback_after = auto is derived */          \
	X(LAPSE_GAPS,                                                          \
	  "WITH g AS (SELECT ts - lag(ts) OVER (PARTITION BY contact_id "      \
	  "ORDER BY ts) AS gap FROM orders WHERE contact_id IS NOT NULL), "    \
	  "v AS (SELECT gap FROM g WHERE gap > 0) SELECT (SELECT count(*) "    \
	  "FROM v), (SELECT gap FROM v ORDER BY gap LIMIT 1 OFFSET "           \
	  "(SELECT CAST(count(*) * 0.9 AS INTEGER) FROM v))")                  \
	X(SEGMENTS_CLEAR, "DELETE FROM segments")                              \
	X(SEGMENTS_FILL,                                                       \
	  "INSERT INTO segments (contact_id, r, f, m, orders, spent, "         \
	  "last_order, segment) WITH c AS (SELECT contact_id, count(*) AS n, " \
	  "total(total - refunded) AS spent, max(ts) AS last FROM orders "                \
	  "WHERE contact_id IS NOT NULL AND ts <= ?1 GROUP BY contact_id), "   \
	  "s AS (SELECT *, ntile(5) OVER (ORDER BY last, contact_id) AS r, "   \
	  "ntile(5) OVER (ORDER BY n, contact_id) AS f, "                      \
	  "ntile(5) OVER (ORDER BY spent, contact_id) AS m FROM c) "           \
	  "SELECT contact_id, r, f, m, n, spent, last, CASE "                  \
	  "WHEN last <= ?1 - 2 * ?2 THEN 'lost' WHEN last <= ?1 - ?2 THEN 'lapsed' " \
	  "WHEN n = 1 AND last > ?1 - 30 * 86400 THEN 'new' "                  \
	  "WHEN f = 5 AND m >= 4 THEN 'vip' "                                  \
	  "WHEN r <= 2 AND n >= 2 THEN 'at_risk' ELSE 'active' END FROM s")    \
	X(SEGMENT_COUNTS,                                                      \
	  "SELECT segment, count(*) FROM segments GROUP BY segment")          \
	/* incremental segments (see the Segments banner): the bookkeeping   \
	 * row, new orders and due future ones mark customers dirty, the     \
	 * dirty are recounted, then rescored and checked for win-back in    \
	 * chunks of contact ids (lo, hi] */                                 \
	X(SEG_STATE,                                                           \
	  "SELECT orders_seen, now, lapse, cuts_at, cuts_stale, customers, "   \
	  "coalesce(cuts_key, ''), coalesce(flows, ''), "                      \
	  "(SELECT coalesce(max(id), 0) FROM orders), "                        \
	  "coalesce(lapse_why GLOB 'winback_after = auto*', 0) "               \
	  "FROM segment_state WHERE id = 1")                                   \
	X(SEG_RESET,                                                           \
	  "INSERT INTO segment_state (id, orders_seen, now) VALUES (1, 0, ?1) " \
	  "ON CONFLICT (id) DO UPDATE SET orders_seen = 0, now = ?1, lapse = NULL, " \
	  "lapse_why = NULL, cuts_at = NULL, cuts_stale = 1, cuts_key = NULL, " \
	  "flows = NULL")                                                      \
	X(SEG_MARK_ORDERS,                                                     \
	  "INSERT OR IGNORE INTO segment_dirty (contact_id) SELECT contact_id " \
	  "FROM orders WHERE id > ?1 AND id <= ?2 AND contact_id IS NOT NULL") \
	X(SEG_SEEN,                                                            \
	  "UPDATE segment_state SET orders_seen = ?1, cuts_stale = cuts_stale + 1 " \
	  "WHERE id = 1")                                                      \
	/* cuts_stale counts changes, so a refresh forgets only those it saw  \
	 * (an overlapping tick may add more meanwhile) */                    \
	X(SEG_STALE,                                                           \
	  "UPDATE segment_state SET cuts_stale = cuts_stale + 1 WHERE id = 1") \
	X(SEG_NTH,                                                             \
	  "SELECT max(contact_id) FROM (SELECT contact_id FROM segments "      \
	  "WHERE contact_id > ?1 ORDER BY contact_id LIMIT ?2)")               \
	X(SEG_MARK_RANGE,                                                      \
	  "INSERT OR IGNORE INTO segment_dirty (contact_id) SELECT contact_id " \
	  "FROM segments WHERE contact_id > ?1 AND contact_id <= ?2")          \
	X(SEG_PENDING_ANY,                                                     \
	  "SELECT EXISTS (SELECT 1 FROM segment_pending WHERE ts <= ?1)")      \
	X(SEG_PENDING_MARK,                                                    \
	  "INSERT OR IGNORE INTO segment_dirty (contact_id) SELECT contact_id " \
	  "FROM segment_pending WHERE ts <= ?1")                               \
	X(SEG_PENDING_DONE, "DELETE FROM segment_pending WHERE ts <= ?1")      \
	X(SEG_DIRTY_NTH,                                                       \
	  "SELECT max(contact_id) FROM (SELECT contact_id FROM segment_dirty " \
	  "WHERE contact_id > ?1 ORDER BY contact_id LIMIT ?2)")               \
	/* a dirty customer's orders up to now, counted as SEGMENTS_FILL     \
	 * counts them; the scores come after (SEG_RESCORE) */               \
	X(SEG_AGG,                                                             \
	  "INSERT INTO segments (contact_id, r, f, m, orders, spent, last_order, " \
	  "segment) SELECT contact_id, 0, 0, 0, count(*), total(total - refunded), " \
	  "max(ts), " \
	  "'active' FROM orders WHERE contact_id IN (SELECT contact_id FROM "  \
	  "segment_dirty WHERE contact_id > ?1 AND contact_id <= ?2) AND ts <= ?3 " \
	  "GROUP BY contact_id ON CONFLICT (contact_id) DO UPDATE SET "        \
	  "orders = excluded.orders, spent = excluded.spent, "                 \
	  "last_order = excluded.last_order WHERE (orders, spent, last_order) " \
	  "IS NOT (excluded.orders, excluded.spent, excluded.last_order)")     \
	X(SEG_DROP,                                                            \
	  "DELETE FROM segments WHERE contact_id IN (SELECT contact_id FROM "  \
	  "segment_dirty WHERE contact_id > ?1 AND contact_id <= ?2) "         \
	  "AND NOT EXISTS (SELECT 1 FROM orders o WHERE "                      \
	  "o.contact_id = segments.contact_id AND o.ts <= ?3)")                \
	X(SEG_PENDING_SET,                                                     \
	  "INSERT INTO segment_pending (contact_id, ts) SELECT contact_id, min(ts) " \
	  "FROM orders WHERE contact_id IN (SELECT contact_id FROM segment_dirty " \
	  "WHERE contact_id > ?1 AND contact_id <= ?2) AND ts > ?3 "           \
	  "GROUP BY contact_id ON CONFLICT (contact_id) DO UPDATE SET "        \
	  "ts = excluded.ts WHERE ts IS NOT excluded.ts")                      \
	/* the quintile cut points: the first customer of quintiles 2-5 by    \
	 * each ntile order of SEGMENTS_FILL (an index walk, in a read) */    \
	X(SEG_COUNT, "SELECT count(*) FROM segments")                          \
	X(SEG_CUT_R,                                                           \
	  "SELECT last_order, contact_id FROM segments "                       \
	  "ORDER BY last_order, contact_id LIMIT 1 OFFSET ?1")                 \
	X(SEG_CUT_F,                                                           \
	  "SELECT orders, contact_id FROM segments "                           \
	  "ORDER BY orders, contact_id LIMIT 1 OFFSET ?1")                     \
	X(SEG_CUT_M,                                                           \
	  "SELECT spent, contact_id FROM segments "                            \
	  "ORDER BY spent, contact_id LIMIT 1 OFFSET ?1")                      \
	X(SEG_CUTS_SET,                                                        \
	  "UPDATE segment_state SET cuts_at = ?1, customers = ?2, "            \
	  "cuts_stale = max(cuts_stale - ?30, 0), "                            \
	  "lapse = ?3, lapse_why = ?4, cuts_key = ?5, flows = CASE WHEN "      \
	  "cuts_key IS ?5 AND lapse IS ?3 THEN flows END, "                    \
	  "r1 = ?6, r1c = ?7, r2 = ?8, r2c = ?9, r3 = ?10, r3c = ?11, r4 = ?12, r4c = ?13, " \
	  "f1 = ?14, f1c = ?15, f2 = ?16, f2c = ?17, f3 = ?18, f3c = ?19, f4 = ?20, f4c = ?21, " \
	  "m1 = ?22, m1c = ?23, m2 = ?24, m2c = ?25, m3 = ?26, m3c = ?27, m4 = ?28, m4c = ?29 " \
	  "WHERE id = 1")                                                      \
	X(SEG_LAPSE_SET,                                                       \
	  "UPDATE segment_state SET lapse = ?1, lapse_why = ?2, flows = NULL " \
	  "WHERE id = 1")                                                      \
	X(SEG_FLOWS,                                                           \
	  "SELECT coalesce(group_concat(id || ':' || enabled || ':' || "       \
	  "holdout_pct, ','), '') FROM (SELECT id, enabled, holdout_pct FROM " \
	  "flows WHERE trigger = 'customer_lapsed' ORDER BY id)")              \
	/* flows is NULL from a change of the cuts or the threshold until     \
	 * every customer has been marked dirty for it */                     \
	X(SEG_FLOWS_SET, "UPDATE segment_state SET flows = ?1 WHERE id = 1")   \
	/* crossed since PREV (?1) until NOW (?2): lost (?3 = 2 x lapse),     \
	 * lapsed (?4), at risk of lapsing (?5), no longer new (30 days), a   \
	 * win-back cool-down ended (?6) */                                   \
	X(SEG_CROSSED,                                                         \
	  "INSERT OR IGNORE INTO segment_dirty (contact_id) "                  \
	  "SELECT contact_id FROM segments WHERE last_order > ?1 - ?3 AND last_order <= ?2 - ?3 " \
	  "UNION ALL SELECT contact_id FROM segments WHERE last_order > ?1 - ?4 AND last_order <= ?2 - ?4 " \
	  "UNION ALL SELECT contact_id FROM segments WHERE last_order > ?1 - ?5 AND last_order <= ?2 - ?5 " \
	  "UNION ALL SELECT contact_id FROM segments WHERE last_order > ?1 - 2592000 " \
	  "AND last_order <= ?2 - 2592000 AND +orders = 1 "                    \
	  "UNION ALL SELECT e.contact_id FROM enrollments e WHERE e.created > ?1 - ?6 " \
	  "AND e.created <= ?2 - ?6 AND e.flow_id IN (SELECT id FROM flows "   \
	  "WHERE trigger = 'customer_lapsed')")                                \
	/* the dirty of (?1, ?2] scored with the stored cut points at NOW ?3  \
	 * and threshold ?4, as SEGMENTS_FILL would; only changes written */  \
	X(SEG_RESCORE,                                                         \
	  "WITH k AS (SELECT * FROM segment_state WHERE id = 1), "             \
	  "s AS (SELECT g.contact_id, g.orders AS n, g.last_order AS last, "   \
	  "1 + coalesce((g.last_order, g.contact_id) >= (k.r1, k.r1c), 0) "    \
	  "+ coalesce((g.last_order, g.contact_id) >= (k.r2, k.r2c), 0) "      \
	  "+ coalesce((g.last_order, g.contact_id) >= (k.r3, k.r3c), 0) "      \
	  "+ coalesce((g.last_order, g.contact_id) >= (k.r4, k.r4c), 0) AS r, " \
	  "1 + coalesce((g.orders, g.contact_id) >= (k.f1, k.f1c), 0) "        \
	  "+ coalesce((g.orders, g.contact_id) >= (k.f2, k.f2c), 0) "          \
	  "+ coalesce((g.orders, g.contact_id) >= (k.f3, k.f3c), 0) "          \
	  "+ coalesce((g.orders, g.contact_id) >= (k.f4, k.f4c), 0) AS f, "    \
	  "1 + coalesce((g.spent, g.contact_id) >= (k.m1, k.m1c), 0) "         \
	  "+ coalesce((g.spent, g.contact_id) >= (k.m2, k.m2c), 0) "           \
	  "+ coalesce((g.spent, g.contact_id) >= (k.m3, k.m3c), 0) "           \
	  "+ coalesce((g.spent, g.contact_id) >= (k.m4, k.m4c), 0) AS m "      \
	  "FROM segment_dirty d CROSS JOIN segments g "                         \
	  "ON g.contact_id = d.contact_id CROSS JOIN k "                       \
	  "WHERE d.contact_id > ?1 AND d.contact_id <= ?2), "                  \
	  "n AS MATERIALIZED (SELECT contact_id, r, f, m, CASE "               \
	  "WHEN last <= ?3 - 2 * ?4 THEN 'lost' WHEN last <= ?3 - ?4 THEN 'lapsed' " \
	  "WHEN n = 1 AND last > ?3 - 30 * 86400 THEN 'new' "                  \
	  "WHEN f = 5 AND m >= 4 THEN 'vip' "                                  \
	  "WHEN r <= 2 AND n >= 2 THEN 'at_risk' ELSE 'active' END AS seg FROM s) " \
	  "UPDATE segments SET r = n.r, f = n.f, m = n.m, segment = n.seg FROM n " \
	  "WHERE segments.contact_id = n.contact_id AND (segments.r, segments.f, " \
	  "segments.m, segments.segment) IS NOT (n.r, n.f, n.m, n.seg)")       \
	X(SEG_DIRTY_DONE,                                                      \
	  "DELETE FROM segment_dirty WHERE contact_id > ?1 AND contact_id <= ?2") \
	X(SEG_NOW, "UPDATE segment_state SET now = ?1 WHERE id = 1 AND now IS NOT ?1") \
	/* -- Recommendations -- */                                            \
	/* recommendations: products bought with what this one bought more   \
	 * often than they are bought at all (lift > 1: P(b | a) > P(b)),     \
	 * each pair seen in at least ?3 orders, from reco_pairs and the last \
	 * 20 products they bought; then best sellers of their favourite      \
	 * category; then of the store. Never what they own, never a service. \
	 * The cost is their own lines and those products' partners, not the \
	 * store's history. */                                                \
	X(RECO_COOCCUR,                                                        \
	  "WITH mine AS (SELECT sku FROM order_lines WHERE contact_id = ?1 "   \
	  "GROUP BY sku ORDER BY max(ts) DESC, sku LIMIT 20), "                \
	  "n AS (SELECT max(orders, 1) AS n FROM reco_state), "                \
	  "c AS (SELECT r.other AS sku, max(r.orders * n.n * 1.0 / "           \
	  "(a.orders * b.orders)) AS lift, sum(r.orders) AS support "          \
	  "FROM mine JOIN reco_pairs r ON r.sku = mine.sku "                   \
	  "JOIN reco_items a ON a.sku = r.sku "                                \
	  "JOIN reco_items b ON b.sku = r.other, n WHERE r.orders >= ?3 "      \
	  "GROUP BY r.other) "                                                 \
	  "SELECT p.sku, coalesce(" SQL_LABEL("p") ", ''), p.price, "          \
	  "coalesce(p.url, ''), coalesce(p.image, ''), coalesce(p.brand, ''), " \
	  "coalesce(p.category, '') FROM c JOIN products p ON p.sku = c.sku "     \
	  "WHERE c.lift > 1 AND p.kind = 'product' AND p.sku NOT IN "          \
	  "(SELECT sku FROM order_lines WHERE contact_id = ?1) "               \
	  "ORDER BY c.lift DESC, c.support DESC, p.sku LIMIT ?2")              \
	X(RECO_CATEGORY,                                                       \
	  "WITH fav AS (SELECT p.category FROM order_lines l JOIN products p " \
	  "ON p.sku = l.sku WHERE l.contact_id = ?1 AND p.category IS NOT NULL " \
	  "AND p.kind = 'product' "                                            \
	  "GROUP BY p.category ORDER BY sum(l.qty) DESC, p.category LIMIT 1) " \
	  "SELECT p.sku, coalesce(" SQL_LABEL("p") ", ''), p.price, "          \
	  "coalesce(p.url, ''), coalesce(p.image, ''), coalesce(p.brand, ''), " \
	  "coalesce(p.category, '') FROM products p JOIN fav "                    \
	  "ON p.category = fav.category LEFT JOIN reco_items i ON i.sku = p.sku " \
	  "WHERE p.kind = 'product' AND p.sku NOT IN "                         \
	  "(SELECT sku FROM order_lines WHERE contact_id = ?1) "               \
	  "ORDER BY coalesce(i.orders, 0) DESC, p.sku LIMIT ?2")               \
	X(RECO_BEST,                                                           \
	  "SELECT p.sku, coalesce(" SQL_LABEL("p") ", ''), p.price, "          \
	  "coalesce(p.url, ''), coalesce(p.image, ''), coalesce(p.brand, ''), " \
	  "coalesce(p.category, '') FROM products p "                             \
	  "LEFT JOIN reco_items i ON i.sku = p.sku WHERE p.kind = 'product' "  \
	  "AND p.sku NOT IN (SELECT sku FROM order_lines WHERE contact_id = ?1) " \
	  "ORDER BY coalesce(i.orders, 0) DESC, p.sku LIMIT ?2")               \
	/* the item-to-item table, brought forward one chunk at a time: the   \
	 * orders after last_order up to the one holding the ?2-th line after \
	 * it; services never counted; pairs only in orders of at most 100    \
	 * SKUs */                                                            \
	X(RECO_STATE, "SELECT last_order, orders FROM reco_state")             \
	X(RECO_BOUND,                                                          \
	  "SELECT max(order_id) FROM (SELECT order_id FROM order_lines "       \
	  "WHERE order_id > ?1 ORDER BY order_id LIMIT ?2)")                   \
	X(RECO_ITEMS_ADD,                                                      \
	  "INSERT INTO reco_items (sku, orders) SELECT sku, "                  \
	  "count(DISTINCT order_id) FROM order_lines l WHERE order_id > ?1 "   \
	  "AND order_id <= ?2 AND NOT EXISTS (SELECT 1 FROM products p "       \
	  "WHERE p.sku = l.sku AND p.kind = 'service') GROUP BY sku "          \
	  "ON CONFLICT (sku) DO UPDATE SET orders = orders + excluded.orders")  \
	X(RECO_PAIRS_ADD,                                                      \
	  "WITH o AS (SELECT order_id FROM order_lines WHERE order_id > ?1 "   \
	  "AND order_id <= ?2 GROUP BY order_id "                              \
	  "HAVING count(DISTINCT sku) <= 100), "                               \
	  "l AS (SELECT DISTINCT x.order_id, x.sku FROM o "                    \
	  "JOIN order_lines x ON x.order_id = o.order_id WHERE NOT EXISTS "    \
	  "(SELECT 1 FROM products p WHERE p.sku = x.sku "                     \
	  "AND p.kind = 'service')) "                                          \
	  "INSERT INTO reco_pairs (sku, other, orders) SELECT a.sku, b.sku, "  \
	  "count(*) FROM l a JOIN l b ON b.order_id = a.order_id "             \
	  "AND b.sku <> a.sku GROUP BY a.sku, b.sku "                          \
	  "ON CONFLICT (sku, other) DO UPDATE SET "                            \
	  "orders = orders + excluded.orders")                                 \
	X(RECO_STATE_SET,                                                      \
	  "UPDATE reco_state SET last_order = ?2, orders = orders + "          \
	  "(SELECT count(DISTINCT order_id) FROM order_lines "                 \
	  "WHERE order_id > ?1 AND order_id <= ?2)")                           \
	/* a product that became a service leaves the table; one that became  \
	 * a product is counted over the orders already counted (?2) */       \
	X(RECO_DROP_PARTNERS,                                                  \
	  "DELETE FROM reco_pairs WHERE other = ?1 AND sku IN "                \
	  "(SELECT other FROM reco_pairs WHERE sku = ?1)")                     \
	X(RECO_DROP_PAIRS, "DELETE FROM reco_pairs WHERE sku = ?1")            \
	X(RECO_DROP_ITEM, "DELETE FROM reco_items WHERE sku = ?1")             \
	X(RECO_ITEM_COUNT,                                                     \
	  "INSERT INTO reco_items (sku, orders) SELECT ?1, "                   \
	  "count(DISTINCT order_id) FROM order_lines WHERE sku = ?1 "          \
	  "AND order_id <= ?2 HAVING count(*) > 0")                            \
	X(RECO_PAIRS_OF,                                                       \
	  "WITH o AS (SELECT DISTINCT order_id FROM order_lines WHERE sku = ?1 " \
	  "AND order_id <= ?2 AND (SELECT count(DISTINCT sku) FROM order_lines " \
	  "x WHERE x.order_id = order_lines.order_id) <= 100) "                \
	  "INSERT INTO reco_pairs (sku, other, orders) SELECT ?1, x.sku, "     \
	  "count(DISTINCT x.order_id) FROM o JOIN order_lines x "              \
	  "ON x.order_id = o.order_id WHERE x.sku <> ?1 AND NOT EXISTS "       \
	  "(SELECT 1 FROM products p WHERE p.sku = x.sku "                     \
	  "AND p.kind = 'service') GROUP BY x.sku")                            \
	X(RECO_PAIRS_MIRROR,                                                   \
	  "INSERT INTO reco_pairs (sku, other, orders) SELECT other, sku, "    \
	  "orders FROM reco_pairs WHERE sku = ?1")                             \
	X(PRODUCT_KIND_SET,                                                    \
	  "UPDATE products SET kind = ?2 WHERE sku = ?1")                      \
	/* -- Web push: VAPID and RFC 8291 encryption -- */                    \
	X(PUSH_SUB_GET,                                                        \
	  "SELECT endpoint, p256dh, auth FROM push_subscriptions WHERE id = ?1") \
	X(PUSH_SUB_GONE, "DELETE FROM push_subscriptions WHERE id = ?1")       \
	X(PUSH_SUB_SENT,                                                       \
	  "UPDATE push_subscriptions SET last_sent = ?2, last_status = ?3 "    \
	  "WHERE id = ?1")                                                     \
	X(PUSH_PAYLOAD,                                                        \
	  "SELECT json_object('title', ?1, 'body', ?2, 'url', ?3, 'icon', ?4)") \
	/* a contact's subscriptions: named, or made by one of its browsers */ \
	X(PUSH_CONTACT_SUBS,                                                   \
	  "SELECT s.id FROM push_subscriptions s, contacts c "                 \
	  "WHERE c.email = ?1 AND (s.contact_id = c.id OR s.visitor_id IN "    \
	  "(SELECT vid FROM visitors WHERE contact_id = c.id)) ORDER BY s.id")  \
	X(PUSH_FORGET,                                                         \
	  "DELETE FROM push_subscriptions WHERE contact_id = ?1 OR visitor_id " \
	  "IN (SELECT vid FROM visitors WHERE contact_id = ?1)")               \
	/* -- The message context -- */                                        \
	/* the median order of contact ?1 (NULL: none), by orders_contact;  \
	 * of two middle orders their mean */                                 \
	X(MEDIAN_CONTACT,                                                      \
	  "WITH t AS (SELECT total FROM orders WHERE contact_id = ?1 AND total > 0), " \
	  "n AS (SELECT count(*) AS c FROM t) SELECT avg(total) FROM (SELECT " \
	  "total FROM t ORDER BY total LIMIT 2 - (SELECT c FROM n) % 2 "       \
	  "OFFSET max(((SELECT c FROM n) - 1) / 2, 0))")                      \
	/* the store's median order (0: none); a sort of every order, read  \
	 * at most hourly (app->store_median) */                            \
	X(MEDIAN_STORE,                                                        \
	  "WITH n AS (SELECT count(*) AS c FROM orders WHERE total > 0) "      \
	  "SELECT coalesce(avg(total), 0) FROM (SELECT total FROM orders "     \
	  "WHERE total > 0 ORDER BY total LIMIT 2 - (SELECT c FROM n) % 2 "    \
	  "OFFSET max(((SELECT c FROM n) - 1) / 2, 0))")                      \
	X(ENROLLMENT_CODE,                                                     \
	  "SELECT discount_code FROM messages WHERE enrollment_id = ?1 "       \
	  "AND discount_code IS NOT NULL ORDER BY step DESC LIMIT 1")          \
	X(ORDER_OF,                                                            \
	  "SELECT order_key, items, total, currency FROM orders WHERE id = ?1") \
	X(MESSAGE_LOAD,                                                        \
	  "SELECT m.step, m.attempts, m.message_id, m.discount_code, "         \
	  "e.id, e.status, c.id, c.email, c.name, c.unsubscribed_at, "         \
	  "c.suppressed_at, k.cart_key, k.status, coalesce(k.items, "          \
	  "CASE WHEN e.sku IS NOT NULL THEN json_array(json_object('sku', "    \
	  "e.sku, 'qty', 1)) END), k.total, k.currency, "                      \
	  "CASE WHEN m.variant = 'B' THEN coalesce(v.template, s.template) "   \
	  "ELSE s.template END, CASE WHEN m.variant = 'B' THEN "               \
	  "coalesce(v.discount_pct, s.discount_pct) ELSE s.discount_pct END, " \
	  "CASE WHEN m.variant = 'B' THEN coalesce(v.discount_valid, "         \
	  "s.discount_valid) ELSE s.discount_valid END, s.min_spend, "         \
	  "f.trigger, coalesce(s.segment, ''), CASE WHEN sg.f = 5 AND "        \
	  "sg.m >= 4 THEN 'vip' ELSE coalesce(sg.segment, '') END, "           \
	  "EXISTS (SELECT 1 FROM orders o WHERE o.contact_id = e.contact_id "  \
	  "AND o.ts > e.created), coalesce(e.order_id, 0), f.name, m.variant, " \
	  "c.consent, "                                                        \
	  /* 28: when the step was due; 29: how long after it the next one  \
	   * (with a later delay) is */                                      \
	  "e.anchor + CASE WHEN m.variant = 'B' THEN coalesce(v.delay_s, "     \
	  "s.delay_s) ELSE s.delay_s END, (SELECT min(n.delay_s) FROM steps n " \
	  "WHERE n.flow_id = e.flow_id AND n.position > m.step "               \
	  "AND n.delay_s > s.delay_s) - s.delay_s, "                           \
	  /* 30-32: the step's channels, the contact's phone and SMS consent */ \
	  "coalesce(s.channels, 'email'), coalesce(c.phone, ''), c.sms_consent " \
	  "FROM messages m JOIN enrollments e ON e.id = m.enrollment_id "      \
	  "JOIN flows f ON f.id = e.flow_id "                                  \
	  "LEFT JOIN segments sg ON sg.contact_id = m.contact_id "             \
	  "JOIN contacts c ON c.id = m.contact_id "                            \
	  "LEFT JOIN carts k ON k.id = e.cart_id "                             \
	  "LEFT JOIN steps s ON s.flow_id = e.flow_id AND s.position = m.step " \
	  "LEFT JOIN step_variants v ON v.flow_id = e.flow_id "                \
	  "AND v.position = m.step WHERE m.id = ?1")                           \
	X(MESSAGE_SET_CODE,                                                    \
	  "UPDATE messages SET discount_code = ?2 WHERE id = ?1 "              \
	  "AND discount_code IS NULL")                                         \
	X(BEST_REVIEW,                                                         \
	  "SELECT r.author, r.rating, r.text, coalesce(" SQL_LABEL("p") ", '') " \
	  "FROM reviews r "                                                    \
	  "JOIN products p ON p.sku = r.sku WHERE r.sku IN "                   \
	  "(SELECT json_extract(value, '$.sku') FROM json_each(?1)) "          \
	  "ORDER BY r.rating DESC, length(r.text) DESC, r.id LIMIT 1")         \
	/* what a mail prints of items: a signed hook's own words, else the  \
	 * catalog's (a browser's items are sku and qty only): its name, or   \
	 * "Brand · category"; an item known to neither is not printed */     \
	X(ITEMS_EACH,                                                          \
	  "SELECT coalesce(nullif(json_extract(value,'$.name'), ''), "         \
	  SQL_LABEL("p") "), json_extract(value,'$.sku'), "                    \
	  "coalesce(json_extract(value,'$.qty'), 1), "                         \
	  "coalesce(json_extract(value,'$.price'), p.price), "                 \
	  "coalesce(json_extract(value,'$.url'), p.url, ''), "                 \
	  "coalesce(json_extract(value,'$.image'), p.image, ''), "             \
	  "coalesce(p.brand, ''), "                                            \
	  "coalesce(json_extract(value,'$.category'), p.category, '') "        \
	  "FROM json_each(?1) LEFT JOIN products p "                           \
	  "ON p.sku = json_extract(value,'$.sku') "                            \
	  "WHERE coalesce(nullif(json_extract(value,'$.name'), ''), "          \
	  SQL_LABEL("p") ") IS NOT NULL ORDER BY json_each.key")              \
	/* printable items, items from a browser, and their catalog total */  \
	X(ITEMS_TRUST,                                                         \
	  "SELECT coalesce(sum(n <> ''), 0), coalesce(sum(bare), 0), "         \
	  "total(CASE WHEN n <> '' THEN qty * price END) FROM (SELECT "        \
	  "coalesce(nullif(json_extract(value,'$.name'), ''), "                \
	  SQL_LABEL("p") ", '') AS n, "                                        \
	  "json_extract(value,'$.name') IS NULL AS bare, "                     \
	  "coalesce(json_extract(value,'$.qty'), 1) AS qty, "                  \
	  "coalesce(json_extract(value,'$.price'), p.price, 0) AS price "      \
	  "FROM json_each(?1) LEFT JOIN products p "                           \
	  "ON p.sku = json_extract(value,'$.sku'))")                           \
	/* remarket preview: the step that sends template ?1 (enabled flows  \
	 * first) and the discount its mail shows: its own, else the one an  \
	 * earlier step of its flow issued (a reminder of that code) */      \
	X(PREVIEW_STEP,                                                        \
	  "WITH t AS (SELECT flow_id, position FROM steps WHERE template = ?1 " \
	  "UNION SELECT flow_id, position FROM step_variants "                 \
	  "WHERE template = ?1) SELECT f.trigger, f.name, t.position, "        \
	  "coalesce(d.discount_pct, 0), coalesce(d.discount_valid, 0), "       \
	  "coalesce(d.min_spend, 0) FROM t JOIN flows f ON f.id = t.flow_id "  \
	  "LEFT JOIN steps d ON d.flow_id = t.flow_id AND d.discount_pct > 0 " \
	  "AND d.position <= t.position ORDER BY f.enabled DESC, t.flow_id, "  \
	  "t.position, d.position DESC LIMIT 1")                               \
	X(PREVIEW_CONTACT, "SELECT id, email, name FROM contacts WHERE email = ?1") \
	/* a contact's latest cart and latest order, as a preview shows them */ \
	X(PREVIEW_CART,                                                        \
	  "SELECT cart_key, items, total, currency FROM carts "                \
	  "WHERE contact_id = ?1 AND status <> 'empty' "                       \
	  "ORDER BY updated DESC, id DESC LIMIT 1")                            \
	X(PREVIEW_ORDER,                                                       \
	  "SELECT id, currency FROM orders WHERE contact_id = ?1 "             \
	  "ORDER BY ts DESC, id DESC LIMIT 1")                                 \
	/* a sample contact's cart or order: two products of the catalog    \
	 * (ITEMS_EACH prints their catalog names and prices) */              \
	X(PREVIEW_SAMPLE_ITEMS,                                                \
	  "SELECT json_group_array(json_object('sku', sku, 'qty', 1)) FROM "   \
	  "(SELECT sku FROM products p WHERE kind = 'product' AND price > 0 "  \
	  "AND " SQL_LABEL("p") " IS NOT NULL ORDER BY updated DESC, sku "     \
	  "LIMIT 2)")                                                          \
	/* -- The flow engine: detect, claim, send, record -- */               \
	X(JSON_TICK,                                                           \
	  "SELECT json_patch(json_object('now',?1,'abandoned',?2,'enrolled',?3," \
	  "'held_out',?12,'sent',?4,'retry',?5,'failed',?6,'exited',?7,"       \
	  "'skipped',?8,'stale',?9,'winback_waiting',?11,"                     \
	  "'deferred',?15,'deferred_skipped',?16,"                             \
	  "'problems',json(?13)), json_object('stopped',?10,"                  \
	  "'problems_more',nullif(?14,0)))")                                   \
	/* appends the text ?2 to the JSON array ?1 */                        \
	X(JSON_ARRAY_ADD, "SELECT json_insert(?1, '$[#]', ?2)")                \
	/* the enrollments after id ?1 held out: a tick's held_out */          \
	X(ENROLL_LAST, "SELECT coalesce(max(id), 0) FROM enrollments")         \
	X(ENROLL_HELD_SINCE,                                                   \
	  "SELECT count(*) FROM enrollments WHERE id > ?1 AND holdout = 1")    \
	/* double opt-in: the confirmation mails to send (not to the held:    \
	 * the hourly cap limits these mails too), and the click */          \
	X(CONFIRM_DUE,                                                         \
	  "SELECT id, email FROM contacts WHERE consent_pending = 1 "          \
	  "AND confirm_sent_at IS NULL AND unsubscribed_at IS NULL "           \
	  "AND suppressed_at IS NULL AND (held_at IS NULL OR signed = 1) "     \
	  "ORDER BY id LIMIT ?1")                                              \
	X(CONFIRM_CLAIM,                                                       \
	  "UPDATE contacts SET confirm_sent_at = ?2 WHERE id = ?1 "            \
	  "AND consent_pending = 1 AND confirm_sent_at IS NULL")               \
	X(CONFIRM_UNCLAIM,                                                     \
	  "UPDATE contacts SET confirm_sent_at = NULL WHERE id = ?1")          \
	X(EXIT_CONTACT,                                                        \
	  "UPDATE enrollments SET status = 'exited', exit_reason = ?2 "        \
	  "WHERE contact_id = ?1 AND status = 'active'")                       \
	/* lapsed: no order for the threshold (two thirds of it for the at-   \
	 * risk), consenting, and not enrolled since their last order nor     \
	 * within the cool-down: once per lapse. Only the dirty customers of  \
	 * (?4, ?5]: the others' eligibility has not changed since they were  \
	 * last looked at (see the Segments banner) */                        \
	/* the eligibility of a win-back: ?1 now, ?2 threshold, ?3 cool-down, \
	 * ?6 max idle (0: none); sg, c, f the customer's segment, contact,   \
	 * flow. Written once, used to find the lapsed and to enroll them    \
	 * from winback_waiting (still eligible then) */                     \
	X(LAPSE_ENROLL,                                                        \
	  "INSERT OR IGNORE INTO winback_waiting (flow_id, contact_id, last_order) " \
	  "SELECT f.id, c.id, sg.last_order FROM segments sg "                 \
	  "JOIN contacts c ON c.id = sg.contact_id "                           \
	  "JOIN flows f ON f.trigger = 'customer_lapsed' AND f.enabled = 1 "   \
	  "WHERE " LAPSE_ELIGIBLE " AND sg.contact_id IN (SELECT contact_id "  \
	  "FROM segment_dirty WHERE contact_id > ?4 AND contact_id <= ?5)")    \
	/* the waiting, most recently lapsed first, up to ?7 (the daily cap's \
	 * rest); ?4, ?5 unused */                                            \
	X(LAPSE_WAIT_ENROLL,                                                   \
	  "INSERT INTO enrollments (flow_id, contact_id, anchor, created, holdout) " \
	  "SELECT f.id, c.id, ?1, ?1, rm_bucket('holdout:' || f.id || ':' || " \
	  "lower(c.email)) < f.holdout_pct * 100 FROM winback_waiting w "      \
	  "JOIN segments sg ON sg.contact_id = w.contact_id "                  \
	  "JOIN contacts c ON c.id = w.contact_id "                            \
	  "JOIN flows f ON f.id = w.flow_id AND f.trigger = 'customer_lapsed' " \
	  "AND f.enabled = 1 WHERE " LAPSE_ELIGIBLE " AND ?4 IS ?5 "           \
	  "ORDER BY w.last_order DESC, w.contact_id LIMIT ?7")                 \
	/* the waiting no longer eligible (just enrolled, ordered again, ...) \
	 * leave; ?4, ?5, ?7 unused */                                        \
	X(LAPSE_WAIT_PRUNE,                                                    \
	  "DELETE FROM winback_waiting WHERE (flow_id, contact_id) NOT IN "    \
	  "(SELECT f.id, c.id FROM winback_waiting w "                         \
	  "JOIN segments sg ON sg.contact_id = w.contact_id "                  \
	  "JOIN contacts c ON c.id = w.contact_id "                            \
	  "JOIN flows f ON f.id = w.flow_id AND f.trigger = 'customer_lapsed' " \
	  "AND f.enabled = 1 WHERE " LAPSE_ELIGIBLE " AND ?4 IS ?5 AND ?7 IS ?7)") \
	X(LAPSE_WAITING, "SELECT count(*) FROM winback_waiting")               \
	X(LAPSE_ANY_WAITING, "SELECT EXISTS (SELECT 1 FROM winback_waiting)")  \
	/* win-back enrollments in the 24 h before ?1 (the daily cap) */      \
	X(LAPSE_TODAY,                                                         \
	  "SELECT count(*) FROM enrollments WHERE flow_id IN (SELECT id FROM " \
	  "flows WHERE trigger = 'customer_lapsed') AND created > ?1 - 86400") \
	X(ORDER_ENROLL,                                                        \
	  "INSERT INTO enrollments (flow_id, contact_id, order_id, anchor, "   \
	  "created, holdout) SELECT f.id, o.contact_id, o.id, o.ts, ?1, "      \
	  "rm_bucket('holdout:' || f.id || ':' || lower(c.email)) "            \
	  "< f.holdout_pct * 100 FROM orders o "                               \
	  "JOIN contacts c ON c.id = o.contact_id "                            \
	  "JOIN flows f ON f.trigger = 'order_placed' AND f.enabled = 1 "      \
	  "WHERE o.ts > ?1 - 2 * 86400 AND o.ts <= ?1 AND c.consent = 1 "      \
	  "AND c.unsubscribed_at IS NULL AND c.suppressed_at IS NULL "         \
	  "ON CONFLICT DO NOTHING")                                            \
	/* browse abandonment: views idle since ?2 (two, or one of 60 s),   \
	 * of a consenting known contact, a product in the catalog, no cart  \
	 * of theirs touched since the first view, no cart sequence of       \
	 * theirs running, the product not sent in 30 days before ?1 */      \
	X(BROWSE_ENROLL,                                                       \
	  "INSERT INTO enrollments (flow_id, contact_id, sku, anchor, created, " \
	  "holdout) SELECT f.id, b.contact_id, b.sku, ?1, ?1, "                \
	  "rm_bucket('holdout:' || f.id || ':' || lower(c.email)) "            \
	  "< f.holdout_pct * 100 FROM browse_views b "                         \
	  "JOIN contacts c ON c.id = b.contact_id "                            \
	  "JOIN flows f ON f.trigger = 'browse_abandoned' AND f.enabled = 1 "  \
	  "WHERE b.last <= ?2 AND (b.views >= 2 OR b.max_seconds >= 60) "      \
	  "AND c.email IS NOT NULL AND c.consent = 1 "                         \
	  "AND c.unsubscribed_at IS NULL AND c.suppressed_at IS NULL "         \
	  "AND EXISTS (SELECT 1 FROM products p WHERE p.sku = b.sku) "         \
	  "AND NOT EXISTS (SELECT 1 FROM carts k WHERE k.contact_id = "        \
	  "b.contact_id AND k.updated >= b.first) "                            \
	  "AND NOT EXISTS (SELECT 1 FROM enrollments e JOIN flows g ON "       \
	  "g.id = e.flow_id AND g.trigger = 'cart_abandoned' "                 \
	  "WHERE e.contact_id = b.contact_id AND e.status = 'active') "        \
	  "AND NOT EXISTS (SELECT 1 FROM enrollments e WHERE e.contact_id = "  \
	  "b.contact_id AND e.sku = b.sku AND e.created > ?1 - 30 * 86400)")   \
	/* the views read by BROWSE_ENROLL (enrolled or not) */               \
	X(BROWSE_DONE, "DELETE FROM browse_views WHERE last <= ?1")            \
	X(ABANDON,                                                             \
	  "UPDATE carts SET status = 'abandoned', abandoned_at = ?1 "          \
	  "WHERE status = 'open' AND item_count > 0 AND updated <= ?2 "        \
	  "AND EXISTS (SELECT 1 FROM contacts WHERE id = carts.contact_id "    \
	  "AND consent = 1 AND unsubscribed_at IS NULL "                       \
	  "AND suppressed_at IS NULL)")                                        \
	/* a browser-only contact (never named by a signed hook): not held by \
	 * the hourly cap, one cart a tick, one sequence in 30 days; a cart   \
	 * a browser made ("<cart_id>/<vid>", "v:<vid>") the same whoever it  \
	 * names, and never when the backend signed cart <cart_id> */         \
	X(ENROLL,                                                              \
	  "INSERT INTO enrollments (flow_id, contact_id, cart_id, anchor, created, " \
	  "holdout) SELECT f.id, c.contact_id, c.id, c.updated, ?1, "          \
	  "rm_bucket('holdout:' || f.id || ':' || lower(ct.email)) "           \
	  "< f.holdout_pct * 100 FROM carts c "                                \
	  "JOIN contacts ct ON ct.id = c.contact_id "                          \
	  "JOIN flows f ON f.trigger = 'cart_abandoned' AND f.enabled = 1 "    \
	  "WHERE c.status = 'abandoned' AND c.abandoned_at = ?1 "              \
	  "AND NOT EXISTS (SELECT 1 FROM carts b WHERE instr(c.cart_key, '/') " \
	  "AND b.cart_key = substr(c.cart_key, 1, instr(c.cart_key, '/') - 1)) " \
	  "AND ((ct.signed = 1 AND instr(c.cart_key, '/') = 0 "                \
	  "AND c.cart_key NOT GLOB 'v:*') "                                    \
	  "OR ((ct.held_at IS NULL OR ct.signed = 1) AND c.id = (SELECT "      \
	  "max(c2.id) FROM carts c2 WHERE c2.contact_id = ct.id "              \
	  "AND c2.status = 'abandoned' AND c2.abandoned_at = ?1) "             \
	  "AND NOT EXISTS (SELECT 1 FROM enrollments x WHERE "                 \
	  "x.contact_id = ct.id AND x.created > ?1 - 30 * 86400))) "           \
	  "ON CONFLICT (flow_id, cart_id) DO NOTHING")                         \
	/* the held-out get nothing; variant B (if the step has one) goes to  \
	 * a stable share of contacts and may change the step's delay */      \
	X(QUEUE_DUE,                                                           \
	  "WITH due AS (SELECT e.id AS eid, e.next_step AS step, "             \
	  "e.contact_id AS cid, e.anchor AS anchor, s.delay_s AS delay_a, "    \
	  "v.delay_s AS delay_b, v.flow_id IS NOT NULL AND rm_bucket('ab:' || " \
	  "e.flow_id || ':' || e.next_step || ':' || lower(ct.email)) "        \
	  "< v.share * 100 AS isb FROM enrollments e "                         \
	  "JOIN steps s ON s.flow_id = e.flow_id AND s.position = e.next_step " \
	  "LEFT JOIN carts c ON c.id = e.cart_id "                             \
	  "JOIN contacts ct ON ct.id = e.contact_id "                          \
	  "LEFT JOIN step_variants v ON v.flow_id = e.flow_id "                \
	  "AND v.position = e.next_step "                                      \
	  "WHERE e.status = 'active' AND e.holdout = 0 "                       \
	  "AND (e.cart_id IS NULL OR c.status = 'abandoned')), "               \
	  "timed AS (SELECT eid, step, cid, isb, anchor + CASE WHEN isb AND "  \
	  "delay_b IS NOT NULL THEN delay_b ELSE delay_a END AS at FROM due) " \
	  "INSERT INTO messages (enrollment_id, step, contact_id, next_try, "  \
	  "created, variant) SELECT eid, step, cid, at, ?1, "                  \
	  "CASE WHEN isb THEN 'B' ELSE 'A' END FROM timed WHERE at <= ?1 "     \
	  "ON CONFLICT (enrollment_id, step) DO NOTHING")                      \
	X(CLAIM_GIVE_UP,                                                       \
	  "UPDATE messages SET status = 'failed', lease_until = NULL, "        \
	  "error = 'given up: the tick died ' || crashes || ' times while "    \
	  "preparing it (does it crash the tick?)' WHERE status = 'sending' "  \
	  "AND lease_until <= ?1 AND crashes >= ?2")                           \
	/* ... and their sequences end (a sequence never waits on a message  \
	 * that will not go) */                                               \
	X(CLAIM_GIVE_UP_EXIT,                                                  \
	  "UPDATE enrollments SET status = 'exited', exit_reason = 'failed' "  \
	  "WHERE status = 'active' AND EXISTS (SELECT 1 FROM messages m "      \
	  "WHERE m.enrollment_id = enrollments.id AND m.step = "               \
	  "enrollments.next_step AND m.status = 'failed')")                    \
	/* no attempt is counted here: only for the message being sent; the  \
	 * messages of a paused step wait */                                  \
	X(CLAIM,                                                               \
	  "UPDATE messages SET status = 'sending', lease_until = ?1 + ?2, "    \
	  "lease_owner = ?4 WHERE id IN (SELECT id FROM messages "             \
	  "WHERE ((status = 'queued' AND next_try <= ?1) "                     \
	  "OR (status = 'sending' AND lease_until <= ?1)) AND NOT EXISTS "     \
	  "(SELECT 1 FROM enrollments e JOIN steps s ON s.flow_id = e.flow_id " \
	  "AND s.position = messages.step WHERE e.id = messages.enrollment_id " \
	  "AND s.paused_at IS NOT NULL) "                                      \
	  "ORDER BY next_try, id LIMIT ?3) RETURNING id")                      \
	/* before the rendering: a death from here on is this message's */    \
	X(MESSAGE_START,                                                       \
	  "UPDATE messages SET crashes = crashes + 1 WHERE id = ?1 "           \
	  "AND lease_owner = ?2 AND status = 'sending'")                       \
	/* a death of the tick while preparing it was counted */              \
	X(MESSAGE_CRASHES, "SELECT crashes FROM messages WHERE id = ?1")       \
	/* the durable "sending" state, written before the hand-over: one     \
	 * attempt, and every byte the outcome needs, so that recording the   \
	 * outcome only flips small numbers */                                \
	/* the channel a message goes by, written with its attempt */        \
	X(MESSAGE_CHANNEL,                                                     \
	  "UPDATE messages SET channel = ?3 WHERE id = ?1 AND lease_owner = ?2") \
	/* an SMS the provider refused for its number: this message fails,  \
	 * the sequence goes on (mail is not suppressed for a phone's fault) */ \
	X(SMS_JSON,                                                            \
	  "SELECT json_object('to', ?1, 'from', ?2, 'text', ?3, "              \
	  "'message', ?4)")                                                    \
	X(SMS_ANSWER,                                                          \
	  "SELECT CASE WHEN json_valid(?1) THEN json_extract(?1, '$.code') END, " \
	  "CASE WHEN json_valid(?1) THEN json_extract(?1, '$.message') END")   \
	/* an inbound STOP or START: every contact of the number */          \
	X(SMS_CONSENT_SET,                                                     \
	  "UPDATE contacts SET sms_consent = ?2, sms_consent_source = ?3, "    \
	  "sms_consent_at = ?4, updated = ?4 WHERE phone = ?1 "                \
	  "AND sms_consent <> ?2")                                             \
	X(MESSAGE_ATTEMPT,                                                     \
	  "UPDATE messages SET attempts = attempts + 1, crashes = 0, "         \
	  "message_id = ?3 WHERE id = ?1 AND lease_owner = ?2 "                \
	  "AND status = 'sending'")                                            \
	X(STEP_PAUSE,                                                          \
	  "UPDATE steps SET paused_at = ?3, paused_reason = ?4 WHERE flow_id = " \
	  "(SELECT flow_id FROM enrollments WHERE id = ?1) AND position = ?2 " \
	  "AND paused_at IS NULL")                                             \
	X(LEASE_RENEW,                                                         \
	  "UPDATE messages SET lease_until = ?2 WHERE lease_owner = ?1 "       \
	  "AND status = 'sending'")                                            \
	X(LEASE_RELEASE,                                                       \
	  "UPDATE messages SET status = 'queued', lease_until = NULL "         \
	  "WHERE lease_owner = ?1 AND status = 'sending'")                     \
	X(LEASE_HELD,                                                          \
	  "SELECT count(*) FROM messages WHERE id = ?1 AND lease_owner = ?2 "  \
	  "AND status = 'sending'")                                            \
	X(MESSAGE_SENT,                                                        \
	  "UPDATE messages SET status = 'sent', sent_at = ?2, lease_until = NULL, " \
	  "error = NULL, message_id = ?3 WHERE id = ?1 AND lease_owner = ?4")  \
	X(MESSAGE_RETRY,                                                       \
	  "UPDATE messages SET status = 'queued', next_try = ?2, "             \
	  "lease_until = NULL, error = ?3 WHERE id = ?1 AND lease_owner = ?4") \
	X(MESSAGE_DEFER,                                                        \
	  "UPDATE messages SET status = 'queued', next_try = ?2, "             \
	  "lease_until = NULL, attempts = max(attempts - ?5, 0), crashes = 0, " \
	  "error = ?3 WHERE id = ?1 AND lease_owner = ?4")                     \
	/* -- timing rules (smart sending, quiet hours): see msg_gate -- */  \
	/* the latest message contact ?1 got since ?2, or ?4 (now) if one    \
	 * is on its way past the gate; ?3 is the message asking. Both read  \
	 * a window of one contact's rows by index, not the history */       \
	X(GATE_GAP,                                                            \
	  "SELECT max(t) FROM (SELECT max(sent_at) AS t FROM messages "        \
	  "WHERE contact_id = ?1 AND sent_at > ?2 AND id != ?3 UNION ALL "     \
	  "SELECT max(?4) FROM messages WHERE contact_id = ?1 AND gate_at > ?2 " \
	  "AND id != ?3 AND status = 'sending' AND lease_until > ?4)")         \
	/* an open (active, messaged) cart sequence of contact ?1 */          \
	X(GATE_CART,                                                           \
	  "SELECT EXISTS (SELECT 1 FROM enrollments e JOIN flows f "           \
	  "ON f.id = e.flow_id WHERE e.contact_id = ?1 AND e.status = 'active' " \
	  "AND e.holdout = 0 AND f.trigger = 'cart_abandoned')")               \
	X(GATE_PASS,                                                           \
	  "UPDATE messages SET gate_at = ?2 WHERE id = ?1 AND lease_owner = ?3 " \
	  "AND status = 'sending'")                                            \
	X(MESSAGE_HOLD,                                                        \
	  "UPDATE messages SET status = 'queued', next_try = ?2, "             \
	  "lease_until = NULL, gate_at = NULL, error = ?3, deferred_by = ?5 "  \
	  "WHERE id = ?1 AND lease_owner = ?4")                                \
	X(MESSAGE_HELD_BY, "UPDATE messages SET deferred_by = ?2 WHERE id = ?1") \
	X(MESSAGE_WAS_HELD,                                                    \
	  "SELECT deferred_by IS NOT NULL FROM messages WHERE id = ?1")        \
	X(CONTACT_TZ, "SELECT coalesce(tz, '') FROM contacts WHERE id = ?1")   \
	X(MESSAGE_END,                                                         \
	  "UPDATE messages SET status = ?2, lease_until = NULL, error = ?3 "   \
	  "WHERE id = ?1 AND lease_owner = ?4")                                \
	X(ENROLL_ADVANCE,                                                      \
	  "UPDATE enrollments SET next_step = ?2 + 1, status = CASE WHEN "     \
	  "EXISTS (SELECT 1 FROM steps s WHERE s.flow_id = enrollments.flow_id " \
	  "AND s.position = ?2 + 1) THEN status ELSE 'done' END "              \
	  "WHERE id = ?1 AND next_step = ?2 AND status = 'active'")            \
	X(ENROLL_EXIT,                                                         \
	  "UPDATE enrollments SET status = 'exited', exit_reason = ?2 "        \
	  "WHERE id = ?1 AND status = 'active'")                               \
	X(ENROLL_DONE,                                                         \
	  "UPDATE enrollments SET status = 'done' WHERE id = ?1 AND status = 'active'") \
	X(SUPPRESS,                                                            \
	  "UPDATE contacts SET suppressed_at = ?2, suppress_reason = ?3 "      \
	  "WHERE id = ?1 AND suppressed_at IS NULL")                           \
	/* -- Tick runs -- */                                                  \
	X(JSON_ERROR, "SELECT json_object('error', ?1)")                       \
	X(JSON_PATCH, "SELECT json_patch(?1, ?2)")                             \
	X(TICK_OPEN,                                                           \
	  "SELECT id, pid, started_real FROM ticks "                           \
	  "WHERE finished_real IS NULL ORDER BY id DESC LIMIT 8")              \
	X(TICK_INSERT,                                                         \
	  "INSERT INTO ticks (now, source, pid, started_real) "                \
	  "VALUES (?1, ?2, ?3, ?4) RETURNING id")                              \
	X(TICK_PRUNE, "DELETE FROM ticks WHERE id <= ?1 - 10000")              \
	X(TICK_FINISH,                                                         \
	  "UPDATE ticks SET finished_real = ?2, "                              \
	  "summary = json_set(?3, '$.tick', ?1, '$.budget_spent', json(?4)) "  \
	  "WHERE id = ?1 RETURNING summary")                                   \
	X(TICK_GET,                                                            \
	  "SELECT id, pid, started_real, finished_real, summary, now FROM ticks " \
	  "WHERE id = coalesce(?1, (SELECT max(id) FROM ticks))")              \
	X(JSON_TICK_STATE,                                                     \
	  "SELECT json_patch(json_object('tick', ?1, 'state', "               \
	  "CASE WHEN json_extract(?4, '$.error') IS NOT NULL THEN 'failed' "   \
	  "ELSE ?2 END, 'now', ?3), coalesce(?4, '{}'))")                      \
	/* -- Feedback: bounces, complaints, unsubscribes by mail -- */        \
	X(FB_MESSAGE, "SELECT id, contact_id FROM messages WHERE id = ?1")     \
	X(FB_MESSAGE_ID,                                                       \
	  "SELECT id, contact_id FROM messages WHERE message_id = ?1")         \
	/* an address alone (a signed webhook): the contact, and the last     \
	 * message it was sent, which the report counts the event against */ \
	X(FB_CONTACT,                                                          \
	  "SELECT c.id, coalesce((SELECT m.id FROM messages m WHERE "          \
	  "m.contact_id = c.id AND m.status = 'sent' ORDER BY m.sent_at DESC " \
	  "LIMIT 1), 0) FROM contacts c WHERE c.email = ?1")                   \
	X(FB_RECORD,                                                           \
	  "INSERT OR IGNORE INTO feedback (message, contact_id, kind, status, " \
	  "source, ts) VALUES (nullif(?1, 0), ?2, ?3, ?4, ?5, ?6)")            \
	X(FB_SOFT_COUNT,                                                       \
	  "SELECT count(*) FROM feedback WHERE contact_id = ?1 "               \
	  "AND kind = 'soft' AND ts > ?2")                                     \
	/* message ?1's step: its sends since ?2 and how many of them drew a  \
	 * complaint (both variants: the step is paused as a whole) */       \
	X(FB_STEP_RATE,                                                        \
	  "SELECT x.enrollment_id, x.step, count(*), coalesce(sum(EXISTS "     \
	  "(SELECT 1 FROM feedback f WHERE f.message = m.id "                  \
	  "AND f.kind = 'complaint')), 0) FROM messages x "                    \
	  "JOIN enrollments xe ON xe.id = x.enrollment_id "                    \
	  "JOIN enrollments e ON e.flow_id = xe.flow_id "                      \
	  "JOIN messages m ON m.enrollment_id = e.id AND m.step = x.step "     \
	  "WHERE x.id = ?1 AND m.status = 'sent' AND m.sent_at >= ?2")         \
	X(FB_TOKEN_PURGE, "DELETE FROM webhook_tokens WHERE ts < ?1")        \
	X(FB_TOKEN_SEEN,                                                       \
	  "INSERT OR IGNORE INTO webhook_tokens (token, ts) VALUES (?1, ?2)")  \
	/* the steps whose complaints passed 0.1 % of their sends since ?1 */ \
	X(FB_WARNINGS,                                                         \
	  "SELECT f.name, m.step, count(*) AS n, coalesce(sum(EXISTS "         \
	  "(SELECT 1 FROM feedback k WHERE k.message = m.id "                  \
	  "AND k.kind = 'complaint')), 0) AS c, s.paused_at IS NOT NULL "      \
	  "FROM messages m JOIN enrollments e ON e.id = m.enrollment_id "      \
	  "JOIN flows f ON f.id = e.flow_id JOIN steps s ON s.flow_id = "      \
	  "e.flow_id AND s.position = m.step WHERE m.status = 'sent' "         \
	  "AND m.sent_at >= ?1 GROUP BY e.flow_id, m.step "                    \
	  "HAVING c * 1000 > n ORDER BY e.flow_id, m.step")                    \
	/* -- Checks before sending and status -- */                          \
	/* the templates of the enabled steps and their B variants, each with \
	 * the steps that send it */                                         \
	/* the enabled steps whose channels name sms, with their template */ \
	X(CHECK_SMS_STEPS,                                                     \
	  "SELECT s.template, f.name || ' step ' || s.position FROM steps s "  \
	  "JOIN flows f ON f.id = s.flow_id WHERE f.enabled = 1 "              \
	  "AND instr(',' || s.channels || ',', ',sms,') > 0 "                  \
	  "ORDER BY f.id, s.position")                                         \
	/* the enabled steps whose channels name push, with their template */ \
	X(CHECK_PUSH_STEPS,                                                    \
	  "SELECT s.template, f.name || ' step ' || s.position FROM steps s "  \
	  "JOIN flows f ON f.id = s.flow_id WHERE f.enabled = 1 "              \
	  "AND instr(',' || s.channels || ',', ',push,') > 0 "                 \
	  "ORDER BY f.id, s.position")                                         \
	X(CHECK_TEMPLATES,                                                     \
	  "SELECT t, group_concat(w, ', ') FROM (SELECT s.template AS t, "     \
	  "f.name || ' step ' || s.position AS w FROM steps s JOIN flows f "   \
	  "ON f.id = s.flow_id WHERE f.enabled = 1 UNION ALL SELECT "          \
	  "v.template, f.name || ' step ' || v.position || ' (B)' "            \
	  "FROM step_variants v JOIN flows f ON f.id = v.flow_id "             \
	  "WHERE f.enabled = 1 AND v.template IS NOT NULL) GROUP BY t ORDER BY t") \
	/* the last tick's state ?1 (JSON_TICK_STATE): id, state, sent,       \
	 * retry, problems, started (real), the first problem */              \
	X(CHECK_TICK,                                                          \
	  "SELECT json_extract(?1, '$.tick'), json_extract(?1, '$.state'), "   \
	  "coalesce(json_extract(?1, '$.sent'), 0), "                          \
	  "coalesce(json_extract(?1, '$.retry'), 0), "                         \
	  "coalesce(json_array_length(?1, '$.problems'), 0) + "                \
	  "(json_extract(?1, '$.error') IS NOT NULL), (SELECT started_real "   \
	  "FROM ticks WHERE id = json_extract(?1, '$.tick')), "                \
	  "coalesce(json_extract(?1, '$.problems[0]'), "                       \
	  "json_extract(?1, '$.error'), '')")                                  \
	/* due at ?1 and not sent: queued rows (an index range), and steps    \
	 * due whose row a tick has not made yet (no tick ran) */             \
	X(CHECK_BACKLOG,                                                       \
	  "SELECT q.n + w.n, max(q.late, w.late), q.retrying, json_object("    \
	  "'due', q.n + w.n, 'queued', q.n, 'not_queued', w.n, 'retrying', "   \
	  "q.retrying, 'oldest_due', nullif(?1 - max(q.late, w.late), ?1)) "   \
	  "FROM (SELECT count(*) AS n, coalesce(?1 - min(next_try), 0) AS late, " \
	  "coalesce(sum(attempts > 0), 0) AS retrying FROM messages "          \
	  "WHERE status = 'queued' AND next_try <= ?1) q, (SELECT count(*) AS n, " \
	  "coalesce(?1 - min(e.anchor + s.delay_s), 0) AS late "               \
	  "FROM enrollments e JOIN steps s ON s.flow_id = e.flow_id "          \
	  "AND s.position = e.next_step LEFT JOIN carts c ON c.id = e.cart_id " \
	  "WHERE e.status = 'active' AND e.holdout = 0 "                       \
	  "AND e.anchor + s.delay_s <= ?1 "                                    \
	  "AND (e.cart_id IS NULL OR c.status = 'abandoned') "                 \
	  "AND NOT EXISTS (SELECT 1 FROM messages m WHERE "                    \
	  "m.enrollment_id = e.id AND m.step = e.next_step)) w")               \
	/* failed messages since ?1, by reason */                             \
	X(CHECK_FAILURES,                                                      \
	  "SELECT coalesce(substr(error, 1, 160), '(no reason recorded)') AS r, " \
	  "count(*) FROM messages WHERE status = 'failed' AND created >= ?1 "  \
	  "GROUP BY r ORDER BY 2 DESC, 1 LIMIT 8")                             \
	X(CHECK_FAILURES_JSON,                                                 \
	  "SELECT json_group_object(r, n) FROM (SELECT coalesce(substr(error, " \
	  "1, 160), '(no reason recorded)') AS r, count(*) AS n FROM messages " \
	  "WHERE status = 'failed' AND created >= ?1 GROUP BY r "              \
	  "ORDER BY 2 DESC, 1 LIMIT 8)")                                       \
	X(CHECK_JSON_ADD,                                                      \
	  "SELECT json_insert(?1, '$[#]', json_object('name', ?2, 'level', ?3, " \
	  "'message', ?4, 'problems', json(?5), 'data', json(?6)))")           \
	X(CHECK_JSON,                                                          \
	  "SELECT json_object('status', ?1, 'exit', ?2, 'now', ?3, "           \
	  "'version', '" RM_VERSION "', 'checks', json(?4))")                  \
	/* -- Backtest -- */                                                   \
	/* the copy (a new file; VACUUM INTO writes a consistent snapshot    \
	 * without holding the store's write lock) */                       \
	X(BT_COPY, "VACUUM INTO ?1")                                           \
	X(BT_FAST, "PRAGMA synchronous = OFF")                                 \
	X(BT_MMAP, "PRAGMA mmap_size = 1073741824")                            \
	X(BT_JOURNAL, "PRAGMA journal_mode = MEMORY")                          \
	/* on the copy, in one transaction: no flow has run yet, and the     \
	 * orders after FROM (?1) are gone, to come back on their day; a     \
	 * cart that was abandoned, or ordered after FROM, is open again */  \
	X(BT_CLEAR_ORDER_MSG, "UPDATE orders SET message = NULL WHERE message IS NOT NULL") \
	X(BT_CLEAR_INTERACTIONS, "DELETE FROM interactions")                   \
	X(BT_CLEAR_DISCOUNTS, "DELETE FROM discounts")                         \
	X(BT_CLEAR_MESSAGES, "DELETE FROM messages")                           \
	X(BT_CLEAR_WAITING, "DELETE FROM winback_waiting")                     \
	X(BT_CLEAR_ENROLLMENTS, "DELETE FROM enrollments")                     \
	X(BT_CLEAR_REFUNDS,                                                    \
	  "DELETE FROM refunds WHERE ts > ?1 OR order_id IN "                  \
	  "(SELECT id FROM orders WHERE ts > ?1)")                             \
	X(BT_REFUNDED,                                                         \
	  "UPDATE orders SET refunded = (SELECT total(amount) FROM refunds r " \
	  "WHERE r.order_id = orders.id) WHERE refunded <> 0")                 \
	X(BT_CLEAR_LINES,                                                      \
	  "DELETE FROM order_lines WHERE order_id IN "                         \
	  "(SELECT id FROM orders WHERE ts > ?1)")                             \
	X(BT_CLEAR_ORDERS, "DELETE FROM orders WHERE ts > ?1")                 \
	X(BT_CARTS_OPEN,                                                       \
	  "UPDATE carts SET status = 'open', abandoned_at = NULL, "            \
	  "ordered_at = NULL WHERE status = 'abandoned' "                      \
	  "OR (status = 'ordered' AND ordered_at > ?1)")                       \
	X(BT_CLEAR_SEGMENTS, "DELETE FROM segments")                           \
	X(BT_CLEAR_DIRTY, "DELETE FROM segment_dirty")                         \
	X(BT_CLEAR_PENDING, "DELETE FROM segment_pending")                     \
	X(BT_CLEAR_SEGSTATE, "DELETE FROM segment_state")                      \
	/* read from the store's database: the orders and refunds of        \
	 * (?1, ?2], in time order, as the replay applies them */           \
	X(BT_ORDERS_IN,                                                        \
	  "SELECT o.order_key, c.email, k.cart_key, o.total, o.currency, "     \
	  "o.items, o.discount_code, o.ts, json_array_length(o.items) "        \
	  "FROM orders o LEFT JOIN contacts c ON c.id = o.contact_id "         \
	  "LEFT JOIN carts k ON k.id = o.cart_id "                             \
	  "WHERE o.ts > ?1 AND o.ts <= ?2 ORDER BY o.ts, o.id")                \
	X(BT_REFUNDS_IN,                                                       \
	  "SELECT r.refund_key, o.order_key, r.amount, r.ts FROM refunds r "   \
	  "JOIN orders o ON o.id = r.order_id "                                \
	  "WHERE r.ts > ?1 AND r.ts <= ?2 ORDER BY r.ts, r.id")                \
	X(BT_HISTORY_END, "SELECT coalesce(max(ts), 0) FROM orders")           \
	/* per flow on the copy: enrolled, of them held out, first and last  \
	 * enrollment, mails that would have gone, enrollments whose window  \
	 * (?1: 30 days for a win-back, else conversion_days) ended by the   \
	 * history's end ?2, of those who ordered within it with no mail,    \
	 * and who ordered within it at all */                               \
	X(BT_FLOWS,                                                            \
	  "WITH w AS (SELECT e.id, e.flow_id, e.contact_id, e.holdout, "       \
	  "e.created, e.created + CASE WHEN f.trigger = 'customer_lapsed' "    \
	  "THEN 30 * 86400 ELSE ?1 END AS until FROM enrollments e "           \
	  "JOIN flows f ON f.id = e.flow_id), r AS (SELECT w.*, EXISTS "       \
	  "(SELECT 1 FROM orders o WHERE o.contact_id = w.contact_id "         \
	  "AND o.ts > w.created AND o.ts <= w.until) AS back FROM w) "         \
	  "SELECT f.name, f.trigger, count(r.id), total(r.holdout), "          \
	  "coalesce(date(min(r.created), 'unixepoch'), ''), "                  \
	  "coalesce(date(max(r.created), 'unixepoch'), ''), "                  \
	  "(SELECT count(*) FROM messages m JOIN enrollments x "               \
	  "ON x.id = m.enrollment_id WHERE x.flow_id = f.id "                  \
	  "AND m.status = 'sent'), total(r.until <= ?2), "                     \
	  "total(r.until <= ?2 AND r.back), total(r.back), "                   \
	  "CASE WHEN f.trigger = 'customer_lapsed' THEN 30 ELSE ?1 / 86400 END " \
	  "FROM flows f LEFT JOIN r ON r.flow_id = f.id "                      \
	  "WHERE f.enabled = 1 OR r.id IS NOT NULL GROUP BY f.id ORDER BY f.id") \
	/* per flow and day: enrollments, and mails by when they were due */  \
	X(BT_DAYS,                                                             \
	  "SELECT f.name, date(t, 'unixepoch') AS d, "                         \
	  "date(t, 'unixepoch', 'weekday 0', '-6 days'), sum(enr), sum(mail) " \
	  "FROM (SELECT flow_id, created AS t, 1 AS enr, 0 AS mail "           \
	  "FROM enrollments UNION ALL SELECT e.flow_id, m.next_try, 0, 1 "     \
	  "FROM messages m JOIN enrollments e ON e.id = m.enrollment_id "      \
	  "WHERE m.status = 'sent') JOIN flows f ON f.id = flow_id "           \
	  "GROUP BY f.id, d ORDER BY f.id, d")                                 \
	/* -- The report -- */                                                 \
	/* win-back: the lapsed, and the customers whose first mail of a      \
	 * win-back (its first step sent, not a later one) went in the        \
	 * period, as WINBACK_HELD counts its baseline, and those who ordered \
	 * within 30 days of it */                                            \
	X(WINBACK_REPORT,                                                      \
	  "SELECT (SELECT count(*) FROM segments WHERE segment IN ('lapsed', 'lost')), " \
	  "count(*), coalesce(sum(EXISTS (SELECT 1 FROM orders o "             \
	  "WHERE o.contact_id = x.contact_id AND o.ts > x.first "              \
	  "AND o.ts <= x.first + 30 * 86400)), 0) FROM (SELECT contact_id, "   \
	  "min(first) AS first FROM (SELECT m.contact_id, "                    \
	  "min(m.sent_at) AS first FROM messages m "                           \
	  "JOIN enrollments e ON e.id = m.enrollment_id "                      \
	  "JOIN flows f ON f.id = e.flow_id WHERE f.trigger = 'customer_lapsed' " \
	  "AND m.status = 'sent' AND m.enrollment_id IN (SELECT enrollment_id " \
	  "FROM messages WHERE status = 'sent' AND sent_at >= ?1 "             \
	  "AND sent_at < ?2) GROUP BY m.enrollment_id) "                       \
	  "WHERE first >= ?1 AND first < ?2 GROUP BY contact_id) x")           \
	/* its baseline: held-out win-back customers whose first mail would   \
	 * have gone (anchor + the first step's delay) in the period, and     \
	 * those who ordered within 30 days of it anyway */                   \
	X(WINBACK_HELD,                                                        \
	  "SELECT count(*), coalesce(sum(EXISTS (SELECT 1 FROM orders o "      \
	  "WHERE o.contact_id = x.contact_id AND o.ts > x.first "              \
	  "AND o.ts <= x.first + 30 * 86400)), 0) FROM (SELECT contact_id, "   \
	  "min(due) AS first FROM (SELECT e.contact_id, e.anchor + coalesce(" \
	  "(SELECT min(s.delay_s) FROM steps s WHERE s.flow_id = e.flow_id), 0) " \
	  "AS due FROM enrollments e JOIN flows f ON f.id = e.flow_id "        \
	  "WHERE f.trigger = 'customer_lapsed' AND e.holdout = 1) "            \
	  "WHERE due >= ?1 AND due < ?2 GROUP BY contact_id) x")               \
	X(REP_CURRENCY,                                                        \
	  "SELECT currency FROM orders GROUP BY currency "                     \
	  "ORDER BY count(*) DESC LIMIT 1")                                    \
	X(REP_ORDERS,                                                          \
	  "SELECT count(*), total(total - refunded), "                         \
	  "coalesce(sum(attribution IN ('click', 'code')), 0), "               \
	  "coalesce(sum(attribution = 'influenced'), 0), "                     \
	  "total(CASE WHEN attribution = 'influenced' THEN total - refunded END), " \
	  "total(CASE WHEN attribution IN ('click', 'code') "                  \
	  "THEN total - refunded END) FROM orders WHERE ts >= ?1 AND ts < ?2") \
	X(REP_ORDERS_NO_CART,                                                  \
	  "SELECT count(*) FROM orders WHERE cart_id IS NULL "                 \
	  "AND ts >= ?1 AND ts < ?2")                                          \
	X(REP_RECOVERED,                                                       \
	  "SELECT count(*), coalesce(sum(k.status = 'ordered' AND "            \
	  "k.ordered_at >= e.created AND k.ordered_at < e.created + ?3), 0) "  \
	  "FROM enrollments e JOIN flows f ON f.id = e.flow_id "               \
	  "JOIN carts k ON k.id = e.cart_id WHERE f.trigger = 'cart_abandoned' " \
	  "AND e.holdout = 0 AND e.created >= ?1 AND e.created < ?2")          \
	X(REP_RECOVERED_HELD,                                                  \
	  "SELECT count(*), coalesce(sum(k.status = 'ordered' AND "            \
	  "k.ordered_at >= e.created AND k.ordered_at < e.created + ?3), 0) "  \
	  "FROM enrollments e JOIN flows f ON f.id = e.flow_id "               \
	  "JOIN carts k ON k.id = e.cart_id WHERE f.trigger = 'cart_abandoned' " \
	  "AND e.holdout = 1 AND e.created >= ?1 AND e.created < ?2")          \
	/* the revenue of the carts REP_RECOVERED counts as recovered: each   \
	 * order that ordered one (naming it, or naming no cart: then it      \
	 * ordered its contact's carts at its ts, CART_ORDERED), once */      \
	X(REP_RECOVERED_REVENUE,                                               \
	  "SELECT total(total - refunded) FROM orders WHERE id IN (SELECT o.id " \
	  "FROM flows f JOIN enrollments e ON e.flow_id = f.id "               \
	  "JOIN carts k ON k.id = e.cart_id JOIN orders o ON o.cart_id = k.id " \
	  "OR (o.cart_id IS NULL AND o.contact_id = k.contact_id "             \
	  "AND o.ts = k.ordered_at) WHERE f.trigger = 'cart_abandoned' "       \
	  "AND e.holdout = 0 AND e.created >= ?1 AND e.created < ?2 "          \
	  "AND +k.status = 'ordered' AND k.ordered_at >= e.created "           \
	  "AND k.ordered_at < e.created + ?3)")                                \
	X(REP_MESSAGES,                                                        \
	  "SELECT coalesce(sum(m.status = 'sent'), 0), "                       \
	  "coalesce(sum(m.status = 'failed'), 0), "                            \
	  "coalesce(sum(m.status = 'sent' AND EXISTS (SELECT 1 FROM "          \
	  "interactions i WHERE i.message = m.id AND i.kind = 'open')), 0), "  \
	  "coalesce(sum(m.status = 'sent' AND EXISTS (SELECT 1 FROM "          \
	  "interactions i WHERE i.message = m.id "                             \
	  "AND i.kind IN ('click', 'discount'))), 0), "                        \
	  "coalesce(sum(EXISTS (SELECT 1 FROM interactions i "                 \
	  "WHERE i.message = m.id AND i.kind = 'unsubscribe')), 0) "           \
	  "FROM messages m WHERE coalesce(m.sent_at, m.created) >= ?1 "        \
	  "AND coalesce(m.sent_at, m.created) < ?2")                           \
	/* stale steps; messages held back by a timing rule (deferred_by),  \
	 * and of those the ones skipped as stale in the end */              \
	X(REP_STALE,                                                           \
	  "SELECT coalesce(sum(status = 'skipped' AND error LIKE 'stale%'), 0), " \
	  "coalesce(sum(deferred_by IS NOT NULL), 0), "                        \
	  "coalesce(sum(deferred_by IS NOT NULL AND status = 'skipped' "       \
	  "AND error LIKE 'stale%'), 0) "                                      \
	  "FROM messages WHERE created >= ?1 AND created < ?2")                \
	X(REP_DISCOUNTS,                                                       \
	  "SELECT (SELECT count(*) FROM discounts WHERE created >= ?1 "        \
	  "AND created < ?2), (SELECT count(*) FROM discounts "                \
	  "WHERE redeemed_at >= ?1 AND redeemed_at < ?2), "                    \
	  "(SELECT total(o.total * d.percent / (100.0 - d.percent)) "          \
	  "FROM orders o JOIN discounts d ON d.code = o.discount_code "        \
	  "WHERE o.ts >= ?1 AND o.ts < ?2)")                                   \
	X(REP_CODE_FLAGS,                                                      \
	  "SELECT coalesce(sum(code_status = 'reused'), 0), "                  \
	  "coalesce(sum(code_status = 'expired'), 0) FROM orders "             \
	  "WHERE code_status IS NOT NULL AND ts >= ?1 AND ts < ?2")            \
	/* the first enrollment of the period: a flow's (?1), or of every     \
	 * cart flow (?1 NULL); enrollments per day count from there */       \
	X(REP_FIRST_ENROLLED,                                                  \
	  "SELECT min(e.created) FROM flows f JOIN enrollments e "             \
	  "ON e.flow_id = f.id WHERE (f.id = ?1 OR (?1 IS NULL "               \
	  "AND f.trigger = 'cart_abandoned')) AND e.created >= ?2 "            \
	  "AND e.created < ?3")                                                \
	X(REP_FLOWS,                                                           \
	  "SELECT id, name, holdout_pct, enabled FROM flows ORDER BY id")      \
	/* a step's name: its template (variant B's own, if it has one) and   \
	 * delay, as the flow defines them now */                             \
	X(REP_STEP_NAME,                                                       \
	  "SELECT coalesce(CASE WHEN ?3 = 'B' THEN v.template END, s.template), " \
	  "coalesce(CASE WHEN ?3 = 'B' THEN v.delay_s END, s.delay_s) "        \
	  "FROM steps s LEFT JOIN step_variants v ON v.flow_id = s.flow_id "   \
	  "AND v.position = s.position WHERE s.flow_id = ?1 AND s.position = ?2") \
	X(REP_BROWSER_HELD,                                                    \
	  "SELECT count(*) FROM contacts WHERE held_at >= ?1 AND held_at < ?2 " \
	  "AND +signed = 0")                                                   \
	/* converted: a cart enrollment's cart was ordered; one without a     \
	 * cart (win-back, post-purchase), its contact placed an order (not   \
	 * the one it hangs on) -- within conversion_days (?4) of enrolling */ \
	X(REP_FLOW_CONV,                                                       \
	  "SELECT e.holdout, count(*), coalesce(sum(CASE WHEN e.cart_id IS NOT NULL " \
	  "THEN k.status = 'ordered' AND k.ordered_at >= e.created "           \
	  "AND k.ordered_at < e.created + ?4 ELSE EXISTS (SELECT 1 FROM orders o " \
	  "WHERE o.contact_id = e.contact_id AND o.ts >= e.created "           \
	  "AND o.ts < e.created + ?4 AND o.id IS NOT e.order_id) END), 0) "    \
	  "FROM enrollments e LEFT JOIN carts k ON k.id = e.cart_id "          \
	  "WHERE e.flow_id = ?1 AND e.created >= ?2 AND e.created < ?3 "       \
	  "GROUP BY e.holdout")                                                \
	X(REP_STEPS,                                                           \
	  "SELECT m.step, m.variant, count(*), "                               \
	  "coalesce(sum(EXISTS (SELECT 1 FROM interactions i "                 \
	  "WHERE i.message = m.id AND i.kind = 'open')), 0), "                 \
	  "coalesce(sum(EXISTS (SELECT 1 FROM interactions i WHERE "           \
	  "i.message = m.id AND i.kind IN ('click', 'discount'))), 0), "       \
	  "coalesce(sum(o.n), 0), total(o.rev), "                              \
	  "coalesce(sum(CASE WHEN e.cart_id IS NOT NULL THEN "                 \
	  "k.status = 'ordered' AND k.ordered_at >= m.sent_at "                \
	  "AND k.ordered_at < m.sent_at + ?4 ELSE EXISTS (SELECT 1 FROM orders x " \
	  "WHERE x.contact_id = e.contact_id AND x.ts >= m.sent_at "           \
	  "AND x.ts < m.sent_at + ?4 AND x.id IS NOT e.order_id) END), 0), "   \
	  "coalesce(sum(EXISTS (SELECT 1 FROM feedback f WHERE f.message = m.id " \
	  "AND f.kind IN ('hard', 'soft'))), 0), "                             \
	  "coalesce(sum(EXISTS (SELECT 1 FROM feedback f WHERE f.message = m.id " \
	  "AND f.kind = 'complaint')), 0) "                                    \
	  "FROM messages m JOIN enrollments e ON e.id = m.enrollment_id "      \
	  "LEFT JOIN carts k ON k.id = e.cart_id "                             \
	  "LEFT JOIN (SELECT message, count(*) AS n, total(total - refunded) AS rev " \
	  "FROM orders WHERE attribution IN ('click', 'code') GROUP BY message) o " \
	  "ON o.message = m.id WHERE e.flow_id = ?1 AND m.status = 'sent' "    \
	  "AND m.sent_at >= ?2 AND m.sent_at < ?3 "                            \
	  "GROUP BY m.step, m.variant ORDER BY m.step, m.variant")             \
	/* per channel: sent in the period, clicked, opted out (an           \
	 * unsubscribe link; for SMS also a STOP in the period), and the      \
	 * orders attributed to them */                                        \
	X(REP_CHANNELS,                                                        \
	  "SELECT m.channel, count(*), "                                       \
	  "coalesce(sum(EXISTS (SELECT 1 FROM interactions i WHERE "           \
	  "i.message = m.id AND i.kind IN ('click', 'discount'))), 0), "       \
	  "coalesce(sum(EXISTS (SELECT 1 FROM interactions i WHERE "           \
	  "i.message = m.id AND i.kind = 'unsubscribe')), 0) + "               \
	  "CASE WHEN m.channel = 'sms' THEN (SELECT count(*) FROM contacts "   \
	  "WHERE sms_consent = 0 AND sms_consent_source = 'sms STOP' "         \
	  "AND sms_consent_at >= ?1 AND sms_consent_at < ?2) ELSE 0 END, "     \
	  "coalesce(sum(o.n), 0), total(o.rev) FROM messages m "               \
	  "LEFT JOIN (SELECT message, count(*) AS n, total(total - refunded) AS rev " \
	  "FROM orders WHERE attribution IN ('click', 'code') GROUP BY message) o " \
	  "ON o.message = m.id WHERE m.status = 'sent' AND m.sent_at >= ?1 "   \
	  "AND m.sent_at < ?2 GROUP BY m.channel ORDER BY m.channel")          \
	X(REP_MONTHS,                                                          \
	  "SELECT strftime('%Y-%m', ts, 'unixepoch'), count(*), "              \
	  "coalesce(sum(attribution IN ('click', 'code')), 0), "               \
	  "total(CASE WHEN attribution IN ('click', 'code') THEN total - refunded " \
	  "END) FROM orders WHERE ts >= ?1 AND ts < ?2 GROUP BY 1 ORDER BY 1 DESC " \
	  "LIMIT 24")                                                          \
	X(REP_DAILY,                                                           \
	  "SELECT (ts - ?1) / 86400, total(total - refunded) FROM orders "     \
	  "WHERE attribution IN ('click', 'code') AND ts >= ?1 AND ts < ?2 "   \
	  "GROUP BY 1")                                                        \
	/* the activity list: abandoned carts, newest first, a page at a time, \
	 * each with its person, its cart flow enrollment and its orders */   \
	X(ACT_COUNT,                                                           \
	  "SELECT count(*) FROM carts WHERE abandoned_at IS NOT NULL")         \
	X(ACT_CARTS,                                                           \
	  "SELECT k.cart_key, k.contact_id, coalesce(c.email, ''), "           \
	  "coalesce(c.name, ''), k.total, k.currency, k.abandoned_at, "        \
	  "e.id, e.flow_id, e.holdout, coalesce(e.status, ''), "               \
	  "count(o.id), total(o.total - o.refunded), k.ordered_at, "           \
	  "max(o.attribution) "                                                \
	  "FROM (SELECT * FROM carts WHERE abandoned_at IS NOT NULL "          \
	  "ORDER BY abandoned_at DESC, id DESC LIMIT ?1 OFFSET ?2) k "         \
	  "LEFT JOIN contacts c ON c.id = k.contact_id "                       \
	  "LEFT JOIN enrollments e ON e.id = (SELECT min(x.id) FROM "          \
	  "enrollments x WHERE x.flow_id IN (SELECT id FROM flows "            \
	  "WHERE trigger = 'cart_abandoned') AND x.cart_id = k.id) "           \
	  "LEFT JOIN orders o ON k.status = 'ordered' AND (o.cart_id = k.id "  \
	  "OR (o.cart_id IS NULL AND o.contact_id = k.contact_id "             \
	  "AND o.ts = k.ordered_at)) "                                         \
	  "GROUP BY k.id ORDER BY k.abandoned_at DESC, k.id DESC")             \
	X(ACT_MESSAGES,                                                        \
	  "SELECT m.step, m.variant, m.status, EXISTS (SELECT 1 FROM "         \
	  "interactions i WHERE i.message = m.id AND i.kind = 'open'), "       \
	  "EXISTS (SELECT 1 FROM interactions i WHERE i.message = m.id "       \
	  "AND i.kind IN ('click', 'discount')) FROM messages m "              \
	  "WHERE m.enrollment_id = ?1 ORDER BY m.step")                        \
	X(CONTACT_EMAIL, "SELECT email FROM contacts WHERE id = ?1")           \
	/* -- HTTP routes -- */                                                \
	/* POST /feedback: the events of a body, each as (type, email,       \
	 * message_id, status[, signature fields]); FB_JSON_OK first, as     \
	 * json_type fails on a body that is not JSON */                     \
	X(FB_JSON_OK,                                                          \
	  "SELECT CASE WHEN json_valid(?1) THEN json_type(?1) "                \
	  "IN ('object', 'array') ELSE 0 END")                                 \
	X(FB_JSON_REMARKET,                                                    \
	  "SELECT coalesce(json_extract(value, '$.type'), ''), "               \
	  "coalesce(json_extract(value, '$.email'), ''), "                     \
	  "coalesce(json_extract(value, '$.message_id'), ''), "                \
	  "coalesce(json_extract(value, '$.status'), ''), json_type(value) "   \
	  "FROM json_each(CASE json_type(?1) WHEN 'array' THEN ?1 "            \
	  "ELSE json_array(json(?1)) END)")                                    \
	/* Mailgun's event webhook: failed (permanent or temporary),         \
	 * complained, unsubscribed; the rest is not ours to act on */       \
	X(FB_JSON_MAILGUN,                                                     \
	  "SELECT CASE json_extract(?1, '$.\"event-data\".event') "            \
	  "WHEN 'failed' THEN CASE json_extract(?1, '$.\"event-data\".severity') " \
	  "WHEN 'permanent' THEN 'hard_bounce' ELSE 'soft_bounce' END "        \
	  "WHEN 'complained' THEN 'complaint' "                                \
	  "WHEN 'unsubscribed' THEN 'unsubscribe' ELSE '' END, "               \
	  "coalesce(json_extract(?1, '$.\"event-data\".recipient'), ''), "     \
	  "coalesce(json_extract(?1, '$.\"event-data\".message.headers.\"message-id\"'), ''), " \
	  "coalesce(json_extract(?1, '$.\"event-data\".\"delivery-status\".code'), " \
	  "json_extract(?1, '$.\"event-data\".severity'), ''), 'object', "     \
	  "coalesce(json_extract(?1, '$.signature.timestamp'), ''), "          \
	  "coalesce(json_extract(?1, '$.signature.token'), ''), "              \
	  "coalesce(json_extract(?1, '$.signature.signature'), '')")           \
	/* Postmark's bounce and spam complaint webhooks */                   \
	X(FB_JSON_POSTMARK,                                                    \
	  "SELECT CASE WHEN json_extract(?1, '$.RecordType') = 'SpamComplaint' " \
	  "OR json_extract(?1, '$.Type') = 'SpamComplaint' THEN 'complaint' "  \
	  "WHEN json_extract(?1, '$.RecordType') = 'Bounce' THEN "             \
	  "CASE json_extract(?1, '$.Type') WHEN 'HardBounce' THEN 'hard_bounce' " \
	  "WHEN 'BadEmailAddress' THEN 'hard_bounce' "                         \
	  "WHEN 'ManuallyDeactivated' THEN 'hard_bounce' "                     \
	  "WHEN 'SoftBounce' THEN 'soft_bounce' WHEN 'Transient' THEN 'soft_bounce' " \
	  "WHEN 'DnsError' THEN 'soft_bounce' WHEN 'Unsubscribe' THEN 'unsubscribe' " \
	  "ELSE '' END ELSE '' END, coalesce(json_extract(?1, '$.Email'), ''), " \
	  "'', coalesce(json_extract(?1, '$.Type'), ''), 'object'")            \
	X(JSON_ACCEPTED, "SELECT json_object('accepted', ?1, 'duplicates', ?2)") \
	X(JSON_DISCOUNT,                                                       \
	  "SELECT json_object('valid', json(?1), 'percent', ?2, 'reason', ?3, " \
	  "'min_spend', ?4, 'expires', ?5)")                                   \
	X(JSON_DISCOUNT_HELD,                                                  \
	  "SELECT json_object('valid', json(?1), 'percent', ?2, 'reason', ?3, " \
	  "'min_spend', ?4, 'expires', ?5, 'reserved_until', ?6)")             \
	/* consent confirmed by mail is no browser's: the mail's links end it */ \
	X(CONFIRM_DONE,                                                        \
	  "UPDATE contacts SET consent = 1, consent_pending = 0, "             \
	  "consent_vid = NULL, "                                               \
	  "confirmed_at = ?2, updated = ?2 WHERE id = ?1 AND consent_pending = 1") \
	X(CONFIRM_DECLINE,                                                     \
	  "UPDATE contacts SET consent_pending = 0, updated = ?2 "             \
	  "WHERE id = ?1 AND consent_pending = 1")                             \
	X(CONFIRM_STATE,                                                       \
	  "SELECT consent_pending, consent FROM contacts WHERE id = ?1")       \
	/* a hold of another cart (?3) on the code, still running at ?2 */   \
	X(DISCOUNT_HELD,                                                       \
	  "SELECT reserved_until FROM discounts WHERE code = ?1 "              \
	  "AND reserved_until >= ?2 AND reserved_cart IS NOT ?3")              \
	X(DISCOUNT_RESERVE,                                                    \
	  "UPDATE discounts SET reserved_cart = ?2, reserved_until = ?3 "      \
	  "WHERE code = ?1 AND redeemed_at IS NULL AND (reserved_until IS NULL " \
	  "OR reserved_until < ?4 OR reserved_cart = ?2)")                     \
	X(UNSUBSCRIBE,                                                         \
	  "UPDATE contacts SET unsubscribed_at = ?2 "                          \
	  "WHERE id = ?1 AND unsubscribed_at IS NULL")                         \
	/* people (remarket contact/export/suppress/forget): one person's   \
	 * rows as one JSON document; ?2 = 1 adds the events' bodies. Events \
	 * name an address in their body only, so finding them reads the     \
	 * events (one person, on the operator's request: not a tick's path) */ \
	X(PERSON_JSON,                                                         \
	  "SELECT json_object('email', c.email, 'name', c.name, "              \
	  "'consent', c.consent, 'signed', c.signed, "                         \
	  "'consent_pending', c.consent_pending, 'consent_vid', c.consent_vid, " \
	  "'confirm_sent_at', c.confirm_sent_at, 'confirmed_at', c.confirmed_at, " \
	  "'unsubscribed_at', c.unsubscribed_at, 'suppressed_at', c.suppressed_at, " \
	  "'suppress_reason', c.suppress_reason, 'held_at', c.held_at, "       \
	  "'phone', c.phone, 'sms_consent', c.sms_consent, "                   \
	  "'sms_consent_source', c.sms_consent_source, "                       \
	  "'sms_consent_at', c.sms_consent_at, "                               \
	  "'created', c.created, 'updated', c.updated, "                       \
	  "'visitors', (SELECT json_group_array(json_object('vid', vid, "      \
	  "'first_seen', first_seen, 'last_seen', last_seen)) FROM visitors "  \
	  "WHERE contact_id = c.id), "                                         \
	  "'events', (SELECT json_group_array(json_object('id', id, 'type', type, " \
	  "'ts', ts, 'source', source, 'body', CASE WHEN ?2 THEN json(body) END)) " \
	  "FROM events WHERE instr(lower(body), lower(c.email)) > 0), "        \
	  "'carts', (SELECT json_group_array(json_object('cart', cart_key, "   \
	  "'status', status, 'total', total, 'currency', currency, "           \
	  "'items', json(items), 'updated', updated, 'abandoned_at', abandoned_at, " \
	  "'ordered_at', ordered_at)) FROM carts WHERE contact_id = c.id), "   \
	  "'orders', (SELECT json_group_array(json_object('order', order_key, " \
	  "'total', total, 'currency', currency, 'items', json(items), "       \
	  "'discount_code', discount_code, 'ts', ts)) FROM orders "            \
	  "WHERE contact_id = c.id), "                                         \
	  "'messages', (SELECT json_group_array(json_object('id', m.id, "      \
	  "'flow', f.name, 'step', m.step, 'variant', m.variant, "             \
	  "'channel', m.channel, "                                             \
	  "'status', m.status, 'created', m.created, 'sent_at', m.sent_at, "   \
	  "'discount_code', m.discount_code, 'error', m.error, "               \
	  "'interactions', (SELECT json_group_array(json_object('kind', i.kind, " \
	  "'ts', i.ts)) FROM interactions i WHERE i.message = m.id))) "        \
	  "FROM messages m JOIN enrollments e ON e.id = m.enrollment_id "      \
	  "JOIN flows f ON f.id = e.flow_id WHERE m.contact_id = c.id), "      \
	  "'discounts', (SELECT json_group_array(json_object('code', code, "   \
	  "'percent', percent, 'expires', expires, 'redeemed_at', redeemed_at)) " \
	  "FROM discounts WHERE contact_id = c.id)) "                          \
	  "FROM contacts c WHERE c.email = ?1")                                \
	/* the readable form of PERSON_JSON: one "path  value" line a leaf */ \
	X(PERSON_LINES,                                                        \
	  "SELECT substr(fullkey, 3), coalesce(atom, 'null') FROM json_tree(?1) " \
	  "WHERE type NOT IN ('object', 'array')")                             \
	X(UNSUPPRESS,                                                          \
	  "UPDATE contacts SET suppressed_at = NULL, suppress_reason = NULL "  \
	  "WHERE id = ?1")                                                     \
	X(SUPPRESSED_LIST,                                                     \
	  "SELECT email, suppressed_at, coalesce(suppress_reason, '') "        \
	  "FROM contacts WHERE suppressed_at IS NOT NULL "                     \
	  "AND email NOT LIKE '#%' ORDER BY suppressed_at, id")                \
	/* forget: the contact row keeps its id (orders, messages and the     \
	 * report's counts point at it) and loses everything personal; its    \
	 * address becomes '#forgotten-ID', which no valid address matches */ \
	X(FORGET_CONTACT,                                                      \
	  "UPDATE contacts SET email = '#forgotten-' || id, name = '', "       \
	  "consent = 0, consent_vid = NULL, consent_pending = 0, "             \
	  "phone = NULL, sms_consent = 0, sms_consent_source = NULL, "         \
	  "sms_consent_at = NULL, "                                            \
	  "suppressed_at = coalesce(suppressed_at, ?2), "                      \
	  "suppress_reason = 'forgotten', updated = ?2 WHERE id = ?1")         \
	X(EVENTS_EXPIRE,                                                       \
	  "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id " \
	  "LIMIT ?2) AND received < ?1")                                       \
	X(FORGET_EVENTS,                                                       \
	  "UPDATE events SET body = '{}' "                                     \
	  "WHERE instr(lower(body), lower(?1)) > 0")                           \
	X(FORGET_VISITORS, "DELETE FROM visitors WHERE contact_id = ?1")     \
	X(FORGET_CARTS,                                                        \
	  "UPDATE carts SET visitor_id = NULL WHERE contact_id = ?1")          \
	X(FORGET_MESSAGES,                                                     \
	  "UPDATE messages SET error = NULL WHERE contact_id = ?1 "            \
	  "RETURNING id")                                                      \
	X(FORGET_SEGMENTS, "DELETE FROM segments WHERE contact_id = ?1")     \
	X(FORGET_PENDING, "DELETE FROM segment_pending WHERE contact_id = ?1") \
	X(FORGET_DIRTY, "DELETE FROM segment_dirty WHERE contact_id = ?1")   \
	X(FORGET_BROWSE, "DELETE FROM browse_views WHERE contact_id = ?1")   \
	X(FORGOTTEN_ADD,                                                       \
	  "INSERT OR IGNORE INTO forgotten (hash, ts) VALUES (?1, ?2)")        \
	X(MESSAGE_TARGET,                                                      \
	  "SELECT m.contact_id, k.cart_key, coalesce(m.discount_code, "        \
	  "(SELECT x.discount_code FROM messages x WHERE x.enrollment_id = "   \
	  "m.enrollment_id AND x.discount_code IS NOT NULL "                   \
	  "ORDER BY x.step DESC LIMIT 1)) FROM messages m "                    \
	  "JOIN enrollments e ON e.id = m.enrollment_id "                      \
	  "LEFT JOIN carts k ON k.id = e.cart_id WHERE m.id = ?1")             \
	X(INTERACTION, "INSERT INTO interactions (message, kind, ts) VALUES (?1, ?2, ?3)") \
	X(PIXEL_EVENT,                                                         \
	  "SELECT json_patch('{}', json_object('type', ?1, 'sku', ?2, "        \
	  "'url', ?3, 'visitor_id', ?4, 'email', ?5))")                        \
	X(VISITOR_VERIFIED,                                                    \
	  "INSERT INTO visitors (vid, contact_id, first_seen, last_seen, verified) " \
	  "VALUES (?1, ?2, ?3, ?3, 1) ON CONFLICT (vid) DO UPDATE SET "        \
	  "contact_id = ?2, last_seen = ?3, verified = 1")                     \
	X(ONSITE_CART,                                                         \
	  "SELECT c.cart_key, c.item_count FROM visitors v JOIN carts c "      \
	  "ON c.visitor_id = v.vid OR (v.verified = 1 "                        \
	  "AND c.contact_id = v.contact_id) WHERE v.vid = ?1 "                 \
	  "AND c.status = 'abandoned' ORDER BY c.updated DESC LIMIT 1")        \
	X(JSON_PUSH_KEY, "SELECT json_object('key', ?1)")                      \
	/* a PushSubscription's parts, each a string, or no row */             \
	X(PUSH_SUB_PARSE,                                                      \
	  "SELECT json_extract(?1, '$.endpoint'), "                            \
	  "json_extract(?1, '$.keys.p256dh'), json_extract(?1, '$.keys.auth') " \
	  "WHERE json_valid(?1) AND json_type(?1, '$.endpoint') = 'text' "     \
	  "AND json_type(?1, '$.keys.p256dh') = 'text' "                       \
	  "AND json_type(?1, '$.keys.auth') = 'text'")                         \
	/* a browser subscribing again (new keys, or another visitor on the  \
	 * same browser) replaces its row: one endpoint, one row */            \
	X(PUSH_SUB_ADD,                                                        \
	  "INSERT INTO push_subscriptions (endpoint, p256dh, auth, visitor_id, " \
	  "contact_id, created) VALUES (?1, ?2, ?3, ?4, (SELECT contact_id "   \
	  "FROM visitors WHERE vid = ?4), ?5) ON CONFLICT (endpoint) DO UPDATE " \
	  "SET p256dh = excluded.p256dh, auth = excluded.auth, "               \
	  "visitor_id = excluded.visitor_id, contact_id = excluded.contact_id") \
	X(JSON_ONSITE,                                                         \
	  "SELECT json_object('message', ?1, 'cart_url', ?2, 'items', ?3)")    \
	X(VALIDATE_FIELDS,                                                     \
	  "SELECT json_type(?1, '$.code'), json_extract(?1, '$.code'), "       \
	  "json_type(?1, '$.total'), json_extract(?1, '$.total')")             \
	X(VALIDATE_RESERVE,                                                    \
	  "SELECT json_type(?1, '$.reserve'), json_type(?1, '$.cart_id'), "    \
	  "json_extract(?1, '$.cart_id')")                                     \
	/* -- FastCGI and CGI front-ends -- */                                 \
	X(TICK_PID, "UPDATE ticks SET pid = ?2 WHERE id = ?1")                 \
	/* -- Command line -- */                                               \
	X(STEP_RESUME,                                                         \
	  "UPDATE steps SET paused_at = NULL, paused_reason = NULL WHERE "     \
	  "flow_id = (SELECT id FROM flows WHERE name = ?1) AND position = ?2 " \
	  "AND paused_at IS NOT NULL")                                         \
	X(STEPS_PAUSED,                                                        \
	  "SELECT f.name, s.position, s.paused_at, s.paused_reason FROM steps s " \
	  "JOIN flows f ON f.id = s.flow_id WHERE s.paused_at IS NOT NULL "    \
	  "ORDER BY f.id, s.position")                                         \
	/* mails whose links were signed with the key file's keys: the      \
	 * messages and the confirmation mails (browser_consent = confirm) */ \
	X(KEY_SIGNED,                                                          \
	  "SELECT (SELECT count(*) FROM messages "                             \
	  "WHERE sent_at IS NOT NULL OR status = 'sending') + "                \
	  "(SELECT count(*) FROM contacts WHERE confirm_sent_at IS NOT NULL)") \
	X(FLOWS_LIST,                                                          \
	  "SELECT f.name, f.enabled, s.position, s.delay_s, s.template, "      \
	  "coalesce(s.discount_pct, 0), coalesce(s.discount_valid, 172800), s.min_spend, " \
	  "f.holdout_pct, coalesce(s.segment, ''), s.channels " \
	  "FROM flows f JOIN steps s ON s.flow_id = f.id ORDER BY f.id, s.position") \
	X(STEP_SET, /* named parameters: flows_apply binds them by name */  \
	  "UPDATE steps SET delay_s = coalesce(:delay, delay_s), "             \
	  "template = coalesce(:template, template), "                        \
	  "discount_pct = CASE WHEN :discount IS NULL THEN discount_pct "      \
	  "WHEN :discount = 0 THEN NULL ELSE :discount END, "                  \
	  "discount_valid = coalesce(:valid, discount_valid), "                \
	  "min_spend = coalesce(:min_spend, min_spend), "                      \
	  "segment = CASE WHEN :segment IS NULL THEN segment "                 \
	  "WHEN :segment = '' THEN NULL ELSE :segment END, "                   \
	  "channels = coalesce(:channel, channels) "                           \
	  "WHERE flow_id = (SELECT id FROM flows WHERE name = :flow) "         \
	  "AND position = :step")                                              \
	X(FLOW_ENABLE, "UPDATE flows SET enabled = ?2 WHERE name = ?1")        \
	/* a step's template and discount, or (?3 = 1) its B variant's */     \
	X(STEP_OFFER,                                                          \
	  "SELECT CASE WHEN ?3 THEN coalesce(v.template, s.template) "         \
	  "ELSE s.template END, CASE WHEN ?3 THEN coalesce(v.discount_pct, "   \
	  "s.discount_pct, 0) ELSE coalesce(s.discount_pct, 0) END "           \
	  "FROM steps s JOIN flows f ON f.id = s.flow_id LEFT JOIN "           \
	  "step_variants v ON v.flow_id = s.flow_id AND v.position = s.position " \
	  "WHERE f.name = ?1 AND s.position = ?2")                             \
	X(FLOW_HOLDOUT, "UPDATE flows SET holdout_pct = ?2 WHERE name = ?1")   \
	X(VARIANT_SET, /* named parameters, as STEP_SET */                   \
	  "INSERT INTO step_variants (flow_id, position, template, delay_s, "  \
	  "discount_pct, discount_valid, share) SELECT s.flow_id, s.position, " \
	  ":template, :delay, :discount, :valid, coalesce(:share, 50) "        \
	  "FROM steps s JOIN flows f "                                         \
	  "ON f.id = s.flow_id WHERE f.name = :flow AND s.position = :step "   \
	  "ON CONFLICT (flow_id, position) DO UPDATE SET "                     \
	  "template = coalesce(:template, template), "                         \
	  "delay_s = coalesce(:delay, delay_s), "                              \
	  "discount_pct = coalesce(:discount, discount_pct), "                 \
	  "discount_valid = coalesce(:valid, discount_valid), "                \
	  "share = coalesce(:share, share)")                                   \
	X(VARIANT_OFF,                                                         \
	  "DELETE FROM step_variants WHERE position = ?2 AND flow_id = "       \
	  "(SELECT id FROM flows WHERE name = ?1)")                            \
	X(VARIANTS_LIST,                                                       \
	  "SELECT v.position, coalesce(v.template, ''), coalesce(v.delay_s, -1), " \
	  "coalesce(v.discount_pct, -1), v.share FROM step_variants v "        \
	  "JOIN flows f ON f.id = v.flow_id WHERE f.name = ?1 ORDER BY v.position")

#define STMT_ENUM(name, sql) ST_##name,
#define STMT_TEXT(name, sql) sql,
enum stmt_id { STATEMENTS(STMT_ENUM) ST__COUNT };
static const char *const stmt_sql[ST__COUNT] = {STATEMENTS(STMT_TEXT)};

struct db {
	sqlite3 *h;
	sqlite3_stmt *st[ST__COUNT];
	int in_turn; /* holds write_turn (see db_begin) */
};

/* Returns the named statement, reset and with the values bound.
 * fmt: one letter a value: t text (NULL binds NULL), i int64, d double,
 * n NULL, b "t" with an explicit length (char *, int). */
static sqlite3_stmt *q(struct db *db, enum stmt_id id, const char *fmt, ...)
{
	sqlite3_stmt *s = db->st[id];
	if (!s) {
		if (sqlite3_prepare_v3(db->h, stmt_sql[id], -1,
				       SQLITE_PREPARE_PERSISTENT, &db->st[id],
				       NULL) != SQLITE_OK) {
			fprintf(stderr, "remarket: statement %d: %s\n", (int)id,
				sqlite3_errmsg(db->h));
			abort(); /* a broken statement table is our own bug */
		}
		s = db->st[id];
	}
	sqlite3_reset(s);
	sqlite3_clear_bindings(s);
	if (fmt && (int)strlen(fmt) > sqlite3_bind_parameter_count(s))
		abort(); /* more values than the statement takes: our bug */
	va_list ap;
	va_start(ap, fmt);
	for (int i = 1; fmt && *fmt; fmt++, i++) {
		switch (*fmt) {
		case 't': {
			const char *v = va_arg(ap, const char *);
			if (v)
				sqlite3_bind_text(s, i, v, -1, SQLITE_TRANSIENT);
			break;
		}
		case 'b': {
			const char *v = va_arg(ap, const char *);
			int n = va_arg(ap, int);
			sqlite3_bind_text(s, i, v, n, SQLITE_TRANSIENT);
			break;
		}
		case 'i': sqlite3_bind_int64(s, i, va_arg(ap, int64_t)); break;
		case 'd': sqlite3_bind_double(s, i, va_arg(ap, double)); break;
		case 'n': break;
		default: abort();
		}
	}
	va_end(ap);
	return s;
}

/* Steps a statement to completion; SQLITE_DONE/ROW count as success. */
static int q_exec(struct db *db, sqlite3_stmt *s)
{
	int rc;
	while ((rc = sqlite3_step(s)) == SQLITE_ROW)
		;
	sqlite3_reset(s);
	if (rc != SQLITE_DONE) {
		fprintf(stderr, "remarket: sqlite: %s\n", sqlite3_errmsg(db->h));
		return -1;
	}
	return 0;
}

/*
 * Write transactions of one process take turns on a mutex before SQLite's
 * own lock: SQLite's busy handler waits by sleeping (1, 2, 5 ms...), which
 * under a few concurrent writers costs more than the writes themselves.
 * Other processes (a CLI tick beside the server) still meet busy_timeout.
 */
static pthread_mutex_t write_turn = PTHREAD_MUTEX_INITIALIZER;

static void db_unlock(struct db *db)
{
	if (db->in_turn) {
		db->in_turn = 0;
		pthread_mutex_unlock(&write_turn);
	}
}

static int db_begin(struct db *db)
{
	pthread_mutex_lock(&write_turn);
	db->in_turn = 1;
	int rc = q_exec(db, q(db, ST_BEGIN, NULL));
	if (rc)
		db_unlock(db);
	return rc;
}

static int db_commit(struct db *db)
{
	int rc = q_exec(db, q(db, ST_COMMIT, NULL));
	if (rc == 0)
		db_unlock(db);
	return rc; /* on failure the caller rolls back, which unlocks */
}

static void db_rollback(struct db *db)
{
	if (!sqlite3_get_autocommit(db->h))
		q_exec(db, q(db, ST_ROLLBACK, NULL));
	db_unlock(db);
}

/* Takes this process's write turn for writes outside a transaction of
 * ours (a tick's sender threads would otherwise meet in SQLite's busy
 * handler, which sleeps); nothing if the turn is held already. Returns
 * 1 if it took it: give it back with db_unlock. */
static int db_turn(struct db *db)
{
	if (db->in_turn)
		return 0;
	pthread_mutex_lock(&write_turn);
	db->in_turn = 1;
	return 1;
}

/* One write statement outside a transaction, in this process's turn. */
static int q_write(struct db *db, sqlite3_stmt *s)
{
	int took = db_turn(db);
	int rc = q_exec(db, s);
	if (took)
		db_unlock(db);
	return rc;
}

/* Steps S once and reads its first row into pointers: fmt has one letter
 * a column, l (long), d (double). Returns 1 if there was a row, else 0
 * and the outputs untouched. The statement is reset either way. */
static int q_row(sqlite3_stmt *s, const char *fmt, ...)
{
	int row = sqlite3_step(s) == SQLITE_ROW;
	va_list ap;
	va_start(ap, fmt);
	for (int i = 0; row && fmt[i]; i++) {
		if (fmt[i] == 'l')
			*va_arg(ap, long *) = (long)sqlite3_column_int64(s, i);
		else
			*va_arg(ap, double *) = sqlite3_column_double(s, i);
	}
	va_end(ap);
	sqlite3_reset(s);
	return row;
}

static const char *col_text(sqlite3_stmt *s, int i)
{
	const unsigned char *t = sqlite3_column_text(s, i);
	return t ? (const char *)t : "";
}

/* A stable number in [0, 10000) for a text: holdout and A/B assignment
 * depend on nothing but the flow, the step and the email, so they are the
 * same on every run and every machine. Unkeyed BLAKE2b is enough: the
 * point is spread, not secrecy. */
int rm_bucket(const char *text)
{
	unsigned char h[8];
	crypto_generichash(h, sizeof h, (const unsigned char *)text, strlen(text),
			   NULL, 0);
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = (v << 8) | h[i];
	return (int)(v % 10000);
}

static void sql_bucket(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	(void)argc;
	const unsigned char *t = sqlite3_value_text(argv[0]);
	sqlite3_result_int(ctx, rm_bucket(t ? (const char *)t : ""));
}

/* 1 if a catalog line looks like a service rather than a product: the
 * SKUs stores use for postage, carriage, fees, bank charges and manual
 * adjustments (POST, DOT, C2, M, CRUK, BANK CHARGES, AMAZONFEE), or a
 * name with the word POSTAGE, CARRIAGE, FEE(S), CHARGES or ADJUST (whole
 * words: not COFFEE). A guess: the operator corrects it with `remarket
 * products kind`. */
int rm_service(const char *sku, const char *name)
{
	static const char *const skus[] = {"POST", "DOT", "C2", "M", "CRUK",
					   "BANK CHARGES", "AMAZONFEE"};
	static const char *const words[] = {"POSTAGE", "CARRIAGE", "FEE", "FEES",
					    "CHARGES", "ADJUST"};
	for (size_t i = 0; sku && i < sizeof skus / sizeof skus[0]; i++)
		if (!strcasecmp(sku, skus[i]))
			return 1;
	for (const char *p = name; p && *p;) {
		while (*p && !isalnum((unsigned char)*p))
			p++;
		size_t n = 0;
		while (isalnum((unsigned char)p[n]))
			n++;
		for (size_t i = 0; n && i < sizeof words / sizeof words[0]; i++)
			if (strlen(words[i]) == n && !strncasecmp(p, words[i], n))
				return 1;
		p += n;
	}
	return 0;
}

static void sql_service(sqlite3_context *ctx, int argc, sqlite3_value **argv)
{
	(void)argc;
	const unsigned char *sku = sqlite3_value_text(argv[0]);
	const unsigned char *name = sqlite3_value_text(argv[1]);
	sqlite3_result_int(ctx, rm_service((const char *)sku, (const char *)name));
}

/* Opens one connection to the database at PATH (a new file made 0600, its
 * directory created): WAL, foreign keys, rm_bucket(), rm_service(), the
 * busy timeout. */
int db_open(struct db **out, const char *path, char *err, size_t errlen)
{
	struct db *db = calloc(1, sizeof *db);
	if (!db)
		return -1;
	if (mkdir_parent(path) < 0) {
		snprintf(err, errlen, "db %s: cannot create its directory: %s",
			 path, strerror(errno));
		free(db);
		return -1;
	}
	/* SQLite would create the file 0644 less the umask, and its -wal and
	 * -shm with the database file's mode: a new database is made 0600
	 * here first, whatever the umask. O_EXCL: never open (and close) an
	 * existing database, as closing any descriptor of a file drops every
	 * POSIX lock this process holds on it (the other threads' locks). */
	if (strcmp(path, ":memory:") != 0 && strncmp(path, "file:", 5) != 0) {
		int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
		if (fd >= 0) {
			(void)fchmod(fd, 0600);
			close(fd);
		}
	}
	int rc = sqlite3_open_v2(path, &db->h,
				 SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
					 SQLITE_OPEN_NOMUTEX, NULL);
	if (rc == SQLITE_OK)
		rc = sqlite3_create_function(db->h, "rm_bucket", 1, SQLITE_UTF8 |
					     SQLITE_DETERMINISTIC | SQLITE_INNOCUOUS,
					     NULL, sql_bucket, NULL, NULL);
	if (rc == SQLITE_OK)
		rc = sqlite3_create_function(db->h, "rm_service", 2, SQLITE_UTF8 |
					     SQLITE_DETERMINISTIC | SQLITE_INNOCUOUS,
					     NULL, sql_service, NULL, NULL);
	if (rc == SQLITE_OK)
		rc = sqlite3_exec(db->h,
				  "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
				  "PRAGMA foreign_keys=ON;", NULL, NULL, NULL);
	if (rc != SQLITE_OK) {
		snprintf(err, errlen, "db %s: %s", path, sqlite3_errmsg(db->h));
		db_close(db);
		return -1;
	}
	sqlite3_busy_timeout(db->h, 10000);
	*out = db;
	return 0;
}

void db_close(struct db *db)
{
	if (!db)
		return;
	for (int i = 0; i < ST__COUNT; i++)
		sqlite3_finalize(db->st[i]);
	sqlite3_close(db->h);
	free(db);
}

int db_user_version(struct db *db)
{
	sqlite3_stmt *s;
	int v = -1;
	if (sqlite3_prepare_v2(db->h, "PRAGMA user_version", -1, &s, NULL))
		return -1;
	if (sqlite3_step(s) == SQLITE_ROW)
		v = sqlite3_column_int(s, 0);
	sqlite3_finalize(s);
	return v;
}

long long db_scalar(struct db *db, const char *sql)
{
	sqlite3_stmt *s;
	long long v = -1;
	if (sqlite3_prepare_v2(db->h, sql, -1, &s, NULL))
		return -1;
	if (sqlite3_step(s) == SQLITE_ROW)
		v = sqlite3_column_int64(s, 0);
	sqlite3_finalize(s);
	return v;
}

/* Runs each migration above user_version in a transaction of its own. */
int db_migrate(struct db *db, char *err, size_t errlen)
{
	int have = db_user_version(db);
	int want = (int)(sizeof migrations / sizeof migrations[0]);
	if (have > want) {
		snprintf(err, errlen, "database schema %d is newer than this "
			 "remarket (%d): upgrade remarket", have, want);
		return -1;
	}
	/* foreign keys off while a migration rebuilds a table (SQLite's own
	 * procedure); checked again before each commit */
	sqlite3_exec(db->h, "PRAGMA foreign_keys=OFF", NULL, NULL, NULL);
	for (int v = have; v < want; v++) {
		char pragma[64];
		snprintf(pragma, sizeof pragma, "PRAGMA user_version=%d;", v + 1);
		char *msg = NULL;
		if (sqlite3_exec(db->h, "BEGIN IMMEDIATE", NULL, NULL, &msg) ||
		    sqlite3_exec(db->h, migrations[v], NULL, NULL, &msg) ||
		    sqlite3_exec(db->h, pragma, NULL, NULL, &msg) ||
		    db_scalar(db, "SELECT count(*) FROM pragma_foreign_key_check") != 0 ||
		    sqlite3_exec(db->h, "COMMIT", NULL, NULL, &msg)) {
			snprintf(err, errlen, "migration %d: %s", v + 1,
				 msg ? msg : "failed");
			sqlite3_free(msg);
			sqlite3_exec(db->h, "ROLLBACK", NULL, NULL, NULL);
			sqlite3_exec(db->h, "PRAGMA foreign_keys=ON", NULL, NULL, NULL);
			return -1;
		}
	}
	sqlite3_exec(db->h, "PRAGMA foreign_keys=ON", NULL, NULL, NULL);
	return 0;
}

/* A JSON document made by one of the JSON_* statements. */
static int json_from(struct db *db, sqlite3_stmt *s, struct buf *out)
{
	int rc = -1;
	if (sqlite3_step(s) == SQLITE_ROW)
		rc = buf_adds(out, col_text(s, 0));
	sqlite3_reset(s);
	(void)db;
	return rc;
}

/* ==== The application object ========================================== */
/*
 * struct app is what every command and every FastCGI worker holds: the
 * configuration, its own database connection (at the schema this binary
 * needs), the key ring and a libcurl handle. app_open makes one and
 * app_close ends it; no connection or key is shared between two apps,
 * and none may cross a fork (serve_cgi closes its app before a tick's
 * child is detached). The key file must hold whole keys: a missing or
 * short one is an error naming the file and `remarket init` / `remarket
 * keygen`, never a default key. Keys are wiped when the app closes.
 */

/*
 * The key file is a key ring: one or more 32-byte keys, raw, oldest first.
 * The last one signs; every one verifies, so that `remarket keygen
 * --rotate` (which appends a key) breaks no link already mailed. A file of
 * one key, as every remarket before the ring wrote, is a ring of one.
 */
static int load_keys(const char *path, struct buf *b, char *err,
		     size_t errlen)
{
	errno = 0;
	int rc = read_file(path, b, RM_MAXKEYS * RM_KEYBYTES);
	if (rc < 0 || b->len == 0 || b->len % RM_KEYBYTES) {
		snprintf(err, errlen, "key_file %s: %s — a new install: run "
			 "'remarket init'; a key file lost or damaged: restore it "
			 "from a backup (the links already mailed need it), or see "
			 "'remarket init --new-key' to start over", path,
			 rc < 0 && errno ? strerror(errno) :
			 "must hold one or more 32-byte keys (at most 16)");
		if (b->data)
			sodium_memzero(b->data, b->len);
		buf_free(b);
		return -1;
	}
	return 0;
}

static int load_key(struct app *app, const char *path, char *err,
		    size_t errlen)
{
	struct buf b = {0};
	if (load_keys(path, &b, err, errlen) < 0)
		return -1;
	int n = (int)(b.len / RM_KEYBYTES);
	memcpy(app->key, b.data + (size_t)(n - 1) * RM_KEYBYTES, RM_KEYBYTES);
	app->nold = n - 1;
	for (int i = 0; i < app->nold; i++) /* newest first */
		memcpy(app->old_keys[i],
		       b.data + (size_t)(n - 2 - i) * RM_KEYBYTES, RM_KEYBYTES);
	sodium_memzero(b.data, b.len);
	buf_free(&b);
	return 0;
}

/* As app_open; with KEYLESS set, a key ring that cannot be read is no
 * error: the app is opened for a command that signs nothing (`flows`,
 * `report`, `contact`...), which an operator without the key may run.
 * app->nokey says so, and its signing key is random: a token made with it
 * by mistake would verify nowhere. */
int app_open_keyless(struct app *app, struct config *cfg, int keyless,
		     char *err, size_t errlen)
{
	memset(app, 0, sizeof *app);
	app->cfg = cfg;
	if (load_key(app, cfg->key_file, err, errlen) < 0) {
		/* no key and no database: a new install, which the key's
		 * message tells to run init (opening would make the file) */
		if (!keyless || access(cfg->db, F_OK) != 0)
			return -1;
		app->nokey = 1;
		randombytes_buf(app->key, sizeof app->key);
	}
	if (db_open(&app->db, cfg->db, err, errlen) < 0)
		return -1;
	int have = db_user_version(app->db);
	int want = (int)(sizeof migrations / sizeof migrations[0]);
	if (have != want) {
		snprintf(err, errlen, "db %s is at schema %d, this remarket needs %d:"
			 " run 'remarket init'", cfg->db, have, want);
		app_close(app);
		return -1;
	}
	app->curl = curl_easy_init();
	if (!app->curl) {
		snprintf(err, errlen, "libcurl: cannot create a handle");
		app_close(app);
		return -1;
	}
	return 0;
}

int app_open(struct app *app, struct config *cfg, char *err, size_t errlen)
{
	return app_open_keyless(app, cfg, 0, err, errlen);
}

void app_close(struct app *app)
{
	db_close(app->db);
	if (app->curl)
		curl_easy_cleanup(app->curl);
	sodium_memzero(app->key, sizeof app->key);
	sodium_memzero(app->old_keys, sizeof app->old_keys);
	app->db = NULL;
	app->curl = NULL;
}

/* ==== Validators ====================================================== */
/*
 * Named validators for every field that comes from outside. Each answers
 * 1 (valid) or 0 and never modifies its input. Nothing else in the
 * program looks at a field before one of these has accepted it.
 */

/* 1 if the N bytes at STR are well-formed UTF-8 (no overlong forms, no
 * surrogates, nothing past U+10FFFF). */
int val_utf8(const char *str, size_t n)
{
	const unsigned char *s = (const unsigned char *)str;
	size_t i = 0;
	while (i < n) {
		unsigned c = s[i];
		size_t len;
		unsigned min;
		if (c < 0x80) {
			i++;
			continue;
		} else if ((c & 0xE0) == 0xC0) {
			len = 2, min = 0x80, c &= 0x1F;
		} else if ((c & 0xF0) == 0xE0) {
			len = 3, min = 0x800, c &= 0x0F;
		} else if ((c & 0xF8) == 0xF0) {
			len = 4, min = 0x10000, c &= 0x07;
		} else {
			return 0;
		}
		if (n - i < len)
			return 0;
		for (size_t k = 1; k < len; k++) {
			if ((s[i + k] & 0xC0) != 0x80)
				return 0;
			c = (c << 6) | (s[i + k] & 0x3F);
		}
		if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
			return 0; /* overlong, out of range, or a surrogate */
		i += len;
	}
	return 1;
}

/* Characters (code points) in valid UTF-8: the bytes that start one. */
static size_t utf8_chars(const char *s, size_t n)
{
	size_t chars = 0;
	for (size_t i = 0; i < n; i++)
		chars += ((unsigned char)s[i] & 0xC0) != 0x80;
	return chars;
}

/* maxlen counts characters, not bytes: "é" x 100 is 100 characters. */
int val_text(const char *s, size_t maxlen)
{
	size_t n = strlen(s);
	if (!val_utf8(s, n) || utf8_chars(s, n) > maxlen)
		return 0;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c < 0x20 || c == 0x7F)
			return 0; /* CR, LF, tab and the rest never pass */
		if (c == 0xC2 && i + 1 < n && (unsigned char)s[i + 1] <= 0x9F)
			return 0; /* C1 controls U+0080-U+009F: NEL, CSI... */
	}
	return 1;
}

/* A SKU as stores write them ("BANK CHARGES", "85123A"): 1 to 64
 * printable characters, no control character (val_text). */
int val_sku(const char *s)
{
	return *s && val_text(s, 64);
}

int val_ident(const char *s, size_t maxlen)
{
	size_t n = strlen(s);
	if (n == 0 || n > maxlen)
		return 0;
	for (size_t i = 0; i < n; i++)
		if (!isalnum((unsigned char)s[i]) && !strchr("._:-", s[i]))
			return 0;
	return 1;
}

static int email_local_ok(const char *s, size_t n)
{
	if (n == 0 || n > 64 || s[0] == '.' || s[n - 1] == '.')
		return 0;
	for (size_t i = 0; i < n; i++) {
		if (s[i] == '.' && s[i + 1] == '.')
			return 0;
		if (!isalnum((unsigned char)s[i]) &&
		    !strchr(".!#$%&'*+/=?^_`{|}~-", s[i]))
			return 0;
	}
	return 1;
}

static int email_domain_ok(const char *s)
{
	size_t label = 0, labels = 0;
	for (const char *p = s;; p++) {
		if (*p == '.' || *p == '\0') {
			if (label == 0 || label > 63 || p[-1] == '-')
				return 0;
			labels++;
			label = 0;
			if (*p == '\0')
				break;
			continue;
		}
		if (!isalnum((unsigned char)*p) && *p != '-')
			return 0;
		if (label == 0 && *p == '-')
			return 0;
		label++;
	}
	return labels >= 2;
}

int val_email(const char *s)
{
	size_t n = strlen(s);
	const char *at = strchr(s, '@');
	if (n < 3 || n > 254 || !at || strchr(at + 1, '@'))
		return 0;
	return email_local_ok(s, (size_t)(at - s)) && email_domain_ok(at + 1);
}

int val_url(const char *s)
{
	if (strlen(s) > 2048 || !val_text(s, 2048))
		return 0;
	CURLU *u = curl_url();
	char *scheme = NULL, *host = NULL;
	int ok = u && curl_url_set(u, CURLUPART_URL, s, 0) == CURLUE_OK &&
		 curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
		 curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK &&
		 (strcmp(scheme, "http") == 0 || strcmp(scheme, "https") == 0) &&
		 *host;
	curl_free(scheme);
	curl_free(host);
	curl_url_cleanup(u);
	return ok;
}

/* A mobile number as SMS providers take it: E.164, '+' then 8 to 15
 * digits, the country code never starting with 0. Spaces, dashes and
 * brackets are the store's to strip: a number is stored as sent. */
int val_phone(const char *s)
{
	size_t n = strlen(s);
	if (n < 9 || n > 16 || s[0] != '+' || s[1] == '0')
		return 0;
	for (size_t i = 1; i < n; i++)
		if (s[i] < '0' || s[i] > '9')
			return 0;
	return 1;
}

/* The channels a step may name, in no order. */
static const char *const channel_names[] = {"email", "sms", "push"};

int channels_ok(const char *v)
{
	char list[64], *save = NULL;
	const char *seen[8];
	size_t n = 0;
	if (!*v || copy_str(list, sizeof list, v) < 0 || strstr(v, ",,") ||
	    *v == ',' || v[strlen(v) - 1] == ',')
		return 0;
	for (char *w = strtok_r(list, ",", &save); w; w = strtok_r(NULL, ",", &save)) {
		int known = 0;
		for (size_t i = 0; i < sizeof channel_names / sizeof *channel_names; i++)
			known |= !strcmp(w, channel_names[i]);
		for (size_t i = 0; i < n; i++)
			known &= strcmp(w, seen[i]) != 0;
		if (!known || n == sizeof seen / sizeof *seen)
			return 0;
		seen[n++] = w;
	}
	return 1;
}

/* ==== Signed tokens and hook signatures =============================== */
/*
 * A token is base64url(kind | subject | expires | mac) where mac is a
 * 128-bit keyed BLAKE2b (crypto_generichash) over the first 17 bytes.
 * The MAC is checked before anything in the token is believed, in
 * constant time. Tokens hold no personal data: the subject is a row id.
 * A tracked link's token (kind l) also puts its target URL under the MAC
 * (tok_sign_for), so the link cannot be pointed anywhere else.
 * The app signs with the newest key of its key ring and verifies with
 * each (app_tok_verify, at the end of this section), so a rotation
 * breaks no link. Server hooks use HMAC-SHA256 over "<t>.<body>" as the
 * README's "From the store backend (signed)" documents.
 */

#define TOK_PAYLOAD 17
#define TOK_MACLEN 16

static void put_be64(unsigned char *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = (unsigned char)(v & 0xFF);
}

static uint64_t get_be64(const unsigned char *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = (v << 8) | p[i];
	return v;
}

/* The MAC of a token's payload and of BOUND, data the link carries
 * beside the token (a tracked link's target). With no BOUND it is the
 * one-shot keyed BLAKE2b of the payload, as tokens always were. */
static void tok_mac(const unsigned char key[RM_KEYBYTES],
		    const unsigned char *raw, const char *bound, size_t n,
		    unsigned char mac[TOK_MACLEN])
{
	crypto_generichash_state st;
	crypto_generichash_init(&st, key, RM_KEYBYTES, TOK_MACLEN);
	crypto_generichash_update(&st, raw, TOK_PAYLOAD);
	if (bound && n)
		crypto_generichash_update(&st, (const unsigned char *)bound, n);
	crypto_generichash_final(&st, mac, TOK_MACLEN);
}

int tok_sign_for(const unsigned char key[RM_KEYBYTES], char kind,
		 int64_t subject, rm_time expires, const char *bound, size_t n,
		 char *out, size_t outlen)
{
	unsigned char raw[TOK_PAYLOAD + TOK_MACLEN];
	raw[0] = (unsigned char)kind;
	put_be64(raw + 1, (uint64_t)subject);
	put_be64(raw + 9, (uint64_t)expires);
	tok_mac(key, raw, bound, n, raw + TOK_PAYLOAD);
	size_t need = sodium_base64_ENCODED_LEN(sizeof raw,
			sodium_base64_VARIANT_URLSAFE_NO_PADDING);
	if (outlen < need)
		return -1;
	sodium_bin2base64(out, outlen, raw, sizeof raw,
			  sodium_base64_VARIANT_URLSAFE_NO_PADDING);
	return 0;
}

int tok_sign(const unsigned char key[RM_KEYBYTES], char kind, int64_t subject,
	     rm_time expires, char *out, size_t outlen)
{
	return tok_sign_for(key, kind, subject, expires, NULL, 0, out, outlen);
}

int tok_verify_for(const unsigned char key[RM_KEYBYTES], const char *tok,
		   char kind, const char *bound, size_t n, rm_time now,
		   int64_t *subject)
{
	unsigned char raw[TOK_PAYLOAD + TOK_MACLEN], mac[TOK_MACLEN];
	size_t len = 0;
	if (!tok || strlen(tok) > TOK_MAXLEN ||
	    sodium_base642bin(raw, sizeof raw, tok, strlen(tok), NULL, &len,
			      NULL, sodium_base64_VARIANT_URLSAFE_NO_PADDING) ||
	    len != sizeof raw)
		return TOK_MALFORMED;
	tok_mac(key, raw, bound, n, mac);
	if (sodium_memcmp(mac, raw + TOK_PAYLOAD, TOK_MACLEN) != 0)
		return TOK_FORGED;
	if (raw[0] != (unsigned char)kind)
		return TOK_WRONG_KIND;
	if ((rm_time)get_be64(raw + 9) < now)
		return TOK_EXPIRED;
	*subject = (int64_t)get_be64(raw + 1);
	return TOK_OK;
}

int tok_verify(const unsigned char key[RM_KEYBYTES], const char *tok,
	       char kind, rm_time now, int64_t *subject)
{
	return tok_verify_for(key, tok, kind, NULL, 0, now, subject);
}

const char *tok_strerror(int status)
{
	switch (status) {
	case TOK_OK: return "valid";
	case TOK_MALFORMED: return "This link is incomplete or damaged.";
	case TOK_FORGED: return "This link is not one we sent.";
	case TOK_EXPIRED: return "This link has expired.";
	case TOK_WRONG_KIND: return "This link is not valid here.";
	}
	return "This link is not valid.";
}

static void hook_mac(const char *secret, const char *t, const char *body,
		     size_t len, unsigned char mac[crypto_auth_hmacsha256_BYTES])
{
	crypto_auth_hmacsha256_state st;
	crypto_auth_hmacsha256_init(&st, (const unsigned char *)secret,
				    strlen(secret));
	crypto_auth_hmacsha256_update(&st, (const unsigned char *)t, strlen(t));
	crypto_auth_hmacsha256_update(&st, (const unsigned char *)".", 1);
	crypto_auth_hmacsha256_update(&st, (const unsigned char *)body, len);
	crypto_auth_hmacsha256_final(&st, mac);
}

int hook_sign(const char *secret, rm_time t, const char *body, size_t len,
	      char *out, size_t outlen)
{
	unsigned char mac[crypto_auth_hmacsha256_BYTES];
	char ts[24], hex[2 * sizeof mac + 1];
	snprintf(ts, sizeof ts, "%lld", (long long)t);
	hook_mac(secret, ts, body, len, mac);
	sodium_bin2hex(hex, sizeof hex, mac, sizeof mac);
	int n = snprintf(out, outlen, "t=%s,v1=%s", ts, hex);
	return (n < 0 || (size_t)n >= outlen) ? -1 : 0;
}

/* header: "t=<unix>,v1=<hex>[,v1=<hex>]" (several v1 during key rotation) */
int hook_verify(const char *secret, const char *header, const char *body,
		size_t len, rm_time now, const char **why)
{
	char h[512], ts[24] = "";
	*why = "missing X-Remarket-Signature header";
	if (!header || !*header)
		return -1;
	*why = "malformed X-Remarket-Signature header (want t=<unix>,v1=<hex>)";
	if (copy_str(h, sizeof h, header) < 0)
		return -1;
	unsigned char mac[crypto_auth_hmacsha256_BYTES];
	int have_mac = 0, match = 0;
	for (char *save = NULL, *part = strtok_r(h, ",", &save); part;
	     part = strtok_r(NULL, ",", &save)) {
		part = trim(part);
		if (strncmp(part, "t=", 2) == 0 && !*ts) {
			if (copy_str(ts, sizeof ts, part + 2) < 0)
				return -1;
			hook_mac(secret, ts, body, len, mac);
			have_mac = 1;
		} else if (strncmp(part, "v1=", 3) == 0 && have_mac) {
			unsigned char got[sizeof mac];
			size_t n = 0;
			if (sodium_hex2bin(got, sizeof got, part + 3,
					   strlen(part + 3), NULL, &n, NULL) ||
			    n != sizeof got)
				return -1;
			match |= sodium_memcmp(got, mac, sizeof mac) == 0;
		}
	}
	char *end;
	long long t = strtoll(ts, &end, 10);
	if (!*ts || *end || !have_mac)
		return -1;
	*why = "signature does not match the body (check hook_secret)";
	if (!match)
		return -1;
	*why = "signature timestamp is more than 5 minutes away from now";
	if (t < now - 300 || t > now + 300)
		return -1;
	return 0;
}

int app_tok_verify_for(const struct app *app, const char *tok, char kind,
		       const char *bound, rm_time now, int64_t *subject)
{
	size_t n = bound ? strlen(bound) : 0;
	int st = tok_verify_for(app->key, tok, kind, bound, n, now, subject);
	for (int i = 0; st == TOK_FORGED && i < app->nold; i++)
		st = tok_verify_for(app->old_keys[i], tok, kind, bound, n, now,
				    subject);
	return st;
}

int app_tok_verify(const struct app *app, const char *tok, char kind,
		   rm_time now, int64_t *subject)
{
	return app_tok_verify_for(app, tok, kind, NULL, now, subject);
}

/* ==== Templates ======================================================= */
/*
 * A small mustache subset: {{var}}, {{#section}}...{{/section}} (a list
 * repeats, a non-empty scalar shows), {{^section}} (shows when empty),
 * {{>partial}}. In TPL_HTML mode every variable is HTML-escaped: there is
 * no raw form, so a template can never inject a shopper's name as markup.
 * Owners edit the files; an unbalanced tag is reported, never guessed.
 */

int html_escape(struct buf *out, const char *s)
{
	for (; *s; s++) {
		const char *e = NULL;
		switch (*s) {
		case '&': e = "&amp;"; break;
		case '<': e = "&lt;"; break;
		case '>': e = "&gt;"; break;
		case '"': e = "&quot;"; break;
		case '\'': e = "&#39;"; break;
		}
		if (e)
			buf_adds(out, e);
		else
			buf_add(out, s, 1);
	}
	return buf_failed(out) ? -1 : 0;
}

static const struct tvar *tpl_lookup(const struct tctx *ctx, const char *name,
				     size_t n)
{
	for (; ctx; ctx = ctx->parent)
		for (size_t i = 0; i < ctx->nvars; i++)
			if (strlen(ctx->vars[i].name) == n &&
			    memcmp(ctx->vars[i].name, name, n) == 0)
				return &ctx->vars[i];
	return NULL;
}

struct tpl_run {
	enum tpl_mode mode;
	const char *dir, *ext;
	struct buf *out;
	char *err;
	size_t errlen;
	int depth;
	const char *file; /* the file being rendered, for messages, or NULL */
	const char *text; /* its start: a message's line is counted from it */
};

/* The line of P in the text that starts at TEXT, from 1. */
static int tpl_line(const char *text, const char *p)
{
	int line = 1;
	for (; text < p; text++)
		line += *text == '\n';
	return line;
}

/* An error at P of the text TEXT, said the way compilers say it:
 * "templates/cart_reminder.html:12: '{{#first_name}}' is never closed"
 * (FILE NULL: "line 12: ..."), so that an owner finds the spot. */
static void tpl_error(char *err, size_t errlen, const char *file,
		      const char *text, const char *p, const char *fmt, ...)
	__attribute__((format(printf, 6, 7)));
static void tpl_error(char *err, size_t errlen, const char *file,
		      const char *text, const char *p, const char *fmt, ...)
{
	char what[300];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(what, sizeof what, fmt, ap);
	va_end(ap);
	if (file)
		snprintf(err, errlen, "%s:%d: %s", file, tpl_line(text, p), what);
	else
		snprintf(err, errlen, "line %d: %s", tpl_line(text, p), what);
}

static int tpl_check(const char *s, const char *file, char *err, size_t errlen);

static int tpl_block(struct tpl_run *r, const char *s, const char *end,
		     const struct tctx *ctx);

/* Finds the {{/name}} closing the section that starts at s. */
static const char *tpl_close(const char *s, const char *end, const char *name,
			     size_t n, const char **after)
{
	int depth = 1;
	while (s < end) {
		const char *open = strstr(s, "{{");
		if (!open || open >= end)
			return NULL;
		const char *close = strstr(open, "}}");
		if (!close || close >= end)
			return NULL;
		const char *tag = open + 2;
		char kind = *tag;
		if ((kind == '#' || kind == '^' || kind == '/') &&
		    (size_t)(close - tag - 1) == n &&
		    memcmp(tag + 1, name, n) == 0) {
			depth += kind == '/' ? -1 : 1;
			if (depth == 0) {
				*after = close + 2;
				return open;
			}
		}
		s = close + 2;
	}
	return NULL;
}

static int tpl_partial(struct tpl_run *r, const char *name, size_t n,
		       const struct tctx *ctx)
{
	char nm[64], path[PATH_MAX];
	if (n >= sizeof nm) {
		snprintf(r->err, r->errlen, "partial not allowed: its name is "
			 "longer than 63 bytes");
		return -1;
	}
	memcpy(nm, name, n);
	nm[n] = '\0';
	if (!val_ident(nm, 63) || strchr(nm, '.') || r->depth > 4 ||
	    snprintf(path, sizeof path, "%s/%s%s", r->dir, nm, r->ext) >=
		    (int)sizeof path) {
		snprintf(r->err, r->errlen, "partial '%s' not allowed", nm);
		return -1;
	}
	struct buf b = {0};
	if (template_read(path, &b) < 0) {
		snprintf(r->err, r->errlen, "partial %s: %s", path,
			 strerror(errno));
		buf_free(&b);
		return -1;
	}
	const char *file = r->file, *text = r->text;
	int rc = tpl_check(buf_str(&b), path, r->err, r->errlen);
	r->depth++;
	r->file = path, r->text = buf_str(&b);
	if (rc == 0)
		rc = tpl_block(r, b.data, b.data + b.len, ctx);
	r->file = file, r->text = text;
	r->depth--;
	buf_free(&b);
	return rc;
}

static int tpl_section(struct tpl_run *r, char kind, const char *name,
		       size_t n, const char *body, const char *body_end,
		       const struct tctx *ctx)
{
	const struct tvar *v = tpl_lookup(ctx, name, n);
	int truthy = v && (v->value ? *v->value != '\0' : v->nlist > 0);
	if (kind == '^')
		return truthy ? 0 : tpl_block(r, body, body_end, ctx);
	if (!truthy)
		return 0;
	if (v->value)
		return tpl_block(r, body, body_end, ctx);
	for (size_t i = 0; i < v->nlist; i++) {
		struct tctx item = v->list[i];
		item.parent = ctx;
		if (tpl_block(r, body, body_end, &item) < 0)
			return -1;
	}
	return 0;
}

/* Renders the template text from S to END in context CTX: variables,
 * sections, inverted sections and partials, in order. */
static int tpl_block(struct tpl_run *r, const char *s, const char *end,
		     const struct tctx *ctx)
{
	while (s < end) {
		const char *open = strstr(s, "{{");
		if (!open || open >= end)
			return buf_add(r->out, s, (size_t)(end - s));
		if (buf_add(r->out, s, (size_t)(open - s)) < 0)
			return -1;
		const char *close = strstr(open + 2, "}}");
		if (!close || close >= end) {
			tpl_error(r->err, r->errlen, r->file, r->text, open,
				  "unclosed '{{'");
			return -1;
		}
		const char *tag = open + 2;
		char kind = *tag;
		const char *name = strchr("#^/>", kind) ? tag + 1 : tag;
		size_t n = (size_t)(close - name);
		s = close + 2;
		if (kind == '/') {
			tpl_error(r->err, r->errlen, r->file, r->text, open,
				  "'{{/%.*s}}' closes nothing", (int)n, name);
			return -1;
		}
		if (kind == '>') {
			if (tpl_partial(r, name, n, ctx) < 0)
				return -1;
			continue;
		}
		if (kind == '#' || kind == '^') {
			const char *after, *body_end = tpl_close(s, end, name, n, &after);
			if (!body_end) {
				tpl_error(r->err, r->errlen, r->file, r->text, open,
					  "'{{%c%.*s}}' is never closed", kind,
					  (int)n, name);
				return -1;
			}
			if (tpl_section(r, kind, name, n, s, body_end, ctx) < 0)
				return -1;
			s = after;
			continue;
		}
		const struct tvar *v = tpl_lookup(ctx, name, n);
		const char *val = v && v->value ? v->value : "";
		if (r->mode == TPL_HTML ? html_escape(r->out, val)
					: buf_adds(r->out, val))
			return -1;
	}
	return 0;
}

/* Checks that every tag of the whole template is closed and every section
 * closed in order, before rendering: a broken tag inside a section that
 * this shopper's data skips must fail for every shopper, not some. FILE
 * names the template in the message (NULL: the line alone). */
static int tpl_check(const char *s, const char *file, char *err, size_t errlen)
{
	const char *text = s, *stack[16];
	size_t lens[16], depth = 0;
	for (const char *open; (open = strstr(s, "{{"));) {
		const char *close = strstr(open + 2, "}}");
		if (!close) {
			tpl_error(err, errlen, file, text, open, "unclosed '{{'");
			return -1;
		}
		char kind = open[2];
		const char *name = open + 3;
		size_t n = (size_t)(close - name);
		s = close + 2;
		if (kind == '#' || kind == '^') {
			if (depth == 16) {
				tpl_error(err, errlen, file, text, open,
					  "sections nested too deep");
				return -1;
			}
			stack[depth] = open, lens[depth++] = n;
		} else if (kind == '/') {
			if (!depth || lens[depth - 1] != n ||
			    memcmp(stack[depth - 1] + 3, name, n) != 0) {
				tpl_error(err, errlen, file, text, open,
					  "'{{/%.*s}}' closes no open section",
					  (int)n, name);
				return -1;
			}
			depth--;
		}
	}
	if (depth) {
		const char *open = stack[depth - 1];
		tpl_error(err, errlen, file, text, open, "'{{%.*s}}' is never closed",
			  (int)lens[depth - 1] + 1, open + 2);
		return -1;
	}
	return 0;
}

/* As tpl_render, FILE naming the template in an error message. */
static int tpl_render_file(const char *tpl, const char *file,
			   const struct tctx *ctx, enum tpl_mode mode,
			   const char *dir, const char *ext, struct buf *out,
			   char *err, size_t errlen)
{
	struct tpl_run r = {mode, dir, ext, out, err, errlen, 0, file, tpl};
	if (tpl_check(tpl, file, err, errlen) < 0)
		return -1;
	int rc = tpl_block(&r, tpl, tpl + strlen(tpl), ctx);
	if (rc == 0 && !out->data)
		rc = buf_add(out, "", 0);
	if (buf_failed(out)) {
		snprintf(err, errlen, "out of memory rendering the template");
		return -1;
	}
	return rc;
}

/* Checks template file PATH and, four deep, the partials it names (read
 * from DIR with extension EXT) without rendering: every tag closed, every
 * partial there. For the checks before sending (init, serve, tick,
 * status) and `flows set`; the error names the file and the line. */
static int tpl_lint(const char *path, const char *dir, const char *ext,
		    int depth, char *err, size_t errlen)
{
	struct buf b = {0};
	errno = 0;
	if (template_read(path, &b) < 0) {
		snprintf(err, errlen, "%s: %s", path, errno ? strerror(errno) :
			 "cannot read it");
		buf_free(&b);
		return -1;
	}
	const char *text = buf_str(&b);
	int rc = tpl_check(text, path, err, errlen);
	for (const char *t = text; rc == 0 && (t = strstr(t, "{{>")); t += 3) {
		const char *name = t + 3, *end = strstr(name, "}}");
		size_t n = end ? (size_t)(end - name) : 0;
		char nm[64], sub[PATH_MAX];
		if (n >= sizeof nm || depth >= 4) {
			tpl_error(err, errlen, path, text, t, "partial not allowed "
				  "(a name longer than 63 bytes, or nested more "
				  "than four deep)");
			rc = -1;
			break;
		}
		memcpy(nm, name, n);
		nm[n] = '\0';
		int w = snprintf(sub, sizeof sub, "%s/%s%s", dir, nm, ext);
		if (!val_ident(nm, 63) || strchr(nm, '.') || w < 0 ||
		    (size_t)w >= sizeof sub) {
			tpl_error(err, errlen, path, text, t, "partial '%s' not "
				  "allowed", nm);
			rc = -1;
		} else if (access(sub, R_OK) != 0) {
			tpl_error(err, errlen, path, text, t, "partial %s: %s", sub,
				  strerror(errno));
			rc = -1;
		} else {
			rc = tpl_lint(sub, dir, ext, depth + 1, err, errlen);
		}
	}
	buf_free(&b);
	return rc;
}

int tpl_render(const char *tpl, const struct tctx *ctx, enum tpl_mode mode,
	       const char *dir, const char *ext, struct buf *out, char *err,
	       size_t errlen)
{
	return tpl_render_file(tpl, NULL, ctx, mode, dir, ext, out, err, errlen);
}

/* ==== Events: validation and state (contacts, carts, orders) ========== */
/*
 * ev_ingest is the only door for facts. It checks a whole body first
 * (UTF-8, JSON shape via SQLite's JSON1, every field through a named
 * validator), then, in one transaction, stores each event as it arrived
 * and brings contacts, visitors, carts, orders and the catalog up to
 * date. A body with one bad event stores nothing at all (unless it is
 * sent with ?partial=1: ev_ingest_partial leaves the bad ones out and
 * lists them). A refund takes its amount off an order (ev_refund).
 * Unknown fields are ignored; browser events can never place an order
 * (nor refund one). The browser
 * names an address, skus and quantities, never anything a mail prints
 * (a name, an item's text or price): see contact_from_browser, ev_cart.
 * A cart id lives on after its order: an item change with a later ts
 * starts its next generation, a row of its own (ev_cart; cart_split when
 * the order hook comes late); an order goes to the generation its ts
 * falls in. An empty batch is 0 events, no error.
 */

#define EV_MAX_BATCH 1000
#define EV_MAX_BROWSER 20 /* a page has no business sending more at once */

struct event {
	char type[16];
	char *email, *name, *cart_id, *currency, *visitor_id, *order_id;
	char *refund_id; /* a refund's own id: the same refund sent twice counts once */
	char *code, *sku, *category, *url, *image, *items, *review, *text;
	char *kind;      /* a product's: 'product' or 'service' */
	char *brand;
	char *customer_id; /* the store's own customer number, kept as said */
	char *tz;        /* the contact's IANA time zone (a browser's), checked */
	long seconds;    /* a view's time on the page, -1: not said */
	char *phone;     /* E.164 (val_phone): a signed event's only */
	int consent;     /* -1: not said */
	int has_sms_consent, sms_consent; /* its own, never the email's */
	int has_total, has_price, has_amount;
	double total, price, amount; /* amount: a refund's */
	rm_time ts;
	long nitems;
	size_t at; /* its index in the request's array */
};

enum fcheck { FC_TYPE, FC_EMAIL, FC_TEXT, FC_IDENT, FC_SKU, FC_URL, FC_CURRENCY, FC_CODE,
	      FC_PHONE };
static const struct efield {
	const char *key;
	size_t off;
	enum fcheck check;
	size_t maxlen;
} efields[] = {
	{"email", offsetof(struct event, email), FC_EMAIL, 254},
	{"name", offsetof(struct event, name), FC_TEXT, 100},
	{"cart_id", offsetof(struct event, cart_id), FC_IDENT, 64},
	{"currency", offsetof(struct event, currency), FC_CURRENCY, 3},
	{"visitor_id", offsetof(struct event, visitor_id), FC_IDENT, 64},
	{"order_id", offsetof(struct event, order_id), FC_IDENT, 64},
	{"customer_id", offsetof(struct event, customer_id), FC_IDENT, 64},
	{"refund_id", offsetof(struct event, refund_id), FC_IDENT, 64},
	{"discount_code", offsetof(struct event, code), FC_CODE, 32},
	{"sku", offsetof(struct event, sku), FC_SKU, 64},
	{"category", offsetof(struct event, category), FC_TEXT, 64},
	{"kind", offsetof(struct event, kind), FC_TEXT, 16},
	{"brand", offsetof(struct event, brand), FC_TEXT, 64},
	{"url", offsetof(struct event, url), FC_URL, 2048},
	{"image", offsetof(struct event, image), FC_URL, 2048},
	{"phone", offsetof(struct event, phone), FC_PHONE, 16},
};

static int fail(struct ev_error *err, int status, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static int fail(struct ev_error *err, int status, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(err->msg, sizeof err->msg, fmt, ap);
	va_end(ap);
	err->status = status;
	return -1;
}

static int check_field(enum fcheck c, const char *v, size_t maxlen)
{
	switch (c) {
	case FC_EMAIL: return val_email(v);
	case FC_TEXT: return val_text(v, maxlen);
	case FC_IDENT: return val_ident(v, maxlen);
	case FC_SKU: return val_sku(v);
	case FC_URL: return val_url(v);
	case FC_CURRENCY:
		return strlen(v) == 3 && isupper((unsigned char)v[0]) &&
		       isupper((unsigned char)v[1]) && isupper((unsigned char)v[2]);
	case FC_CODE: return val_ident(v, maxlen);
	case FC_PHONE: return val_phone(v);
	case FC_TYPE: return 1;
	}
	return 0;
}

static const char *check_hint(enum fcheck c)
{
	switch (c) {
	case FC_EMAIL: return "must be an email address like ann@example.com";
	case FC_TEXT: return "must be text without control characters (no CR/LF)";
	case FC_IDENT: return "must be 1-64 characters of A-Z a-z 0-9 . _ : -";
	case FC_SKU: return "must be 1-64 printable characters (no CR/LF)";
	case FC_URL: return "must be an http(s) URL";
	case FC_CURRENCY: return "must be a 3-letter currency code like EUR";
	case FC_CODE: return "must be a discount code like RM-7QK2-X9PD";
	case FC_PHONE: return "must be an E.164 number like +14155550100 "
			      "('+' and 8-15 digits, no spaces)";
	case FC_TYPE: break;
	}
	return "is not valid";
}

static void ev_free(struct event *e)
{
	for (size_t i = 0; i < sizeof efields / sizeof efields[0]; i++)
		free(*(char **)((char *)e + efields[i].off));
	free(e->items);
	free(e->review);
	free(e->text);
	free(e->tz);
	memset(e, 0, sizeof *e);
}

/* JSON may carry \u0000 inside a string. SQLite's JSON1 (3.40) cuts the
 * decoded string there, so the validators would pass a value that is not
 * the one stored in the event: such a body is refused outright. An escape
 * is a backslash preceded by an even run of backslashes. */
static int has_nul_escape(const char *s, size_t n)
{
	for (size_t i = 0; i + 6 <= n; i++) {
		if (s[i] != '\\' || memcmp(s + i + 1, "u0000", 5) != 0)
			continue;
		size_t run = 0;
		while (run < i && s[i - run - 1] == '\\')
			run++;
		if (run % 2 == 0)
			return 1;
	}
	return 0;
}

/* The same, for a value SQLite did return with its NUL (newer versions). */
static int has_nul(sqlite3_stmt *s, int col)
{
	const char *t = (const char *)sqlite3_column_text(s, col);
	return t && (size_t)sqlite3_column_bytes(s, col) != strlen(t);
}

static int is_number(const char *jtype)
{
	return strcmp(jtype, "integer") == 0 || strcmp(jtype, "real") == 0;
}

/* One number field: finite, within [lo, hi], an integer when asked. */
static int ev_number(sqlite3_stmt *s, const char *key, const char *jt,
		     double lo, double hi, int integer, double *out,
		     struct ev_error *err)
{
	if (!is_number(jt) || (integer && strcmp(jt, "integer") != 0))
		return fail(err, 400, "%s: must be %s", key,
			    integer ? "an integer" : "a number");
	double v = sqlite3_column_double(s, 2);
	if (!isfinite(v) || v < lo || v > hi)
		return fail(err, 400, "%s: must be between %g and %g", key, lo, hi);
	*out = v;
	return 0;
}

static int ev_string(struct event *e, const char *key, const char *jt,
		     const char *atom, struct ev_error *err)
{
	for (size_t i = 0; i < sizeof efields / sizeof efields[0]; i++) {
		const struct efield *f = &efields[i];
		if (strcmp(f->key, key) != 0)
			continue;
		if (strcmp(jt, "text") == 0 && f->check == FC_TEXT &&
		    val_utf8(atom, strlen(atom)) &&
		    utf8_chars(atom, strlen(atom)) > f->maxlen)
			return fail(err, 400, "%s: at most %zu characters", key,
				    f->maxlen);
		if (strcmp(jt, "text") != 0 || !check_field(f->check, atom, f->maxlen))
			return fail(err, 400, "%s: %s", key, check_hint(f->check));
		char **slot = (char **)((char *)e + f->off);
		free(*slot);
		*slot = strdup(atom);
		return *slot ? 0 : fail(err, 500, "out of memory");
	}
	return 0; /* unknown fields are ignored */
}

/* Takes one top-level field of an event (one json_each row): checks it with
 * its validator and stores it in E; unknown keys are ignored. */
static int ev_field(struct event *e, sqlite3_stmt *s, rm_time now,
		    struct ev_error *err)
{
	const char *key = col_text(s, 0), *jt = col_text(s, 1);
	const char *atom = col_text(s, 2);
	double d;
	if (has_nul(s, 0) || has_nul(s, 2))
		return fail(err, 400, "%.40s: contains a NUL character", key);
	if (strcmp(jt, "null") == 0)
		return 0; /* null means "not given"; required fields are checked after */
	if (strcmp(key, "type") == 0) {
		if (strcmp(jt, "text") != 0 || copy_str(e->type, sizeof e->type, atom))
			return fail(err, 400, "type: unknown event type");
		return 0;
	}
	if (strcmp(key, "consent") == 0) {
		if (strcmp(jt, "true") && strcmp(jt, "false"))
			return fail(err, 400, "consent: must be true or false");
		e->consent = strcmp(jt, "true") == 0;
		return 0;
	}
	if (strcmp(key, "sms_consent") == 0) { /* never implied by consent */
		if (strcmp(jt, "true") && strcmp(jt, "false"))
			return fail(err, 400, "sms_consent: must be true or false");
		e->sms_consent = strcmp(jt, "true") == 0;
		e->has_sms_consent = 1;
		return 0;
	}
	if (strcmp(key, "amount") == 0) {
		if (ev_number(s, key, jt, 0, 1e9, 0, &d, err))
			return -1;
		e->amount = d, e->has_amount = 1;
		return 0;
	}
	if (strcmp(key, "total") == 0 || strcmp(key, "price") == 0) {
		if (ev_number(s, key, jt, 0, 1e9, 0, &d, err))
			return -1;
		if (*key == 't')
			e->total = d, e->has_total = 1;
		else
			e->price = d, e->has_price = 1;
		return 0;
	}
	if (strcmp(key, "ts") == 0) {
		if (ev_number(s, key, jt, 0, (double)now + 300, 1, &d, err))
			return -1;
		e->ts = (rm_time)d;
		return 0;
	}
	if (strcmp(key, "seconds") == 0) { /* a view's time on the page */
		if (ev_number(s, key, jt, 0, 86400, 1, &d, err))
			return -1;
		e->seconds = (long)d;
		return 0;
	}
	if (strcmp(key, "tz") == 0) { /* quiet hours are in the contact's zone */
		if (strcmp(jt, "text") || !tz_name_ok(atom))
			return fail(err, 400, "tz: not an IANA time zone name "
				    "(e.g. Europe/Paris)");
		/* a zone this system's tz database lacks (newer than it) is
		 * no fault of the browser's: the event counts, without it */
		if (!tz_known(atom))
			return 0;
		free(e->tz);
		e->tz = strdup(atom);
		return e->tz ? 0 : fail(err, 500, "out of memory");
	}
	if (strcmp(key, "items") == 0 || strcmp(key, "review") == 0) {
		int items = *key == 'i';
		if (strcmp(jt, items ? "array" : "object") != 0)
			return fail(err, 400, "%s: must be %s", key,
				    items ? "an array" : "an object");
		char **slot = items ? &e->items : &e->review;
		free(*slot);
		*slot = strdup(col_text(s, 3));
		return *slot ? 0 : fail(err, 500, "out of memory");
	}
	return ev_string(e, key, jt, atom, err);
}

/* One field of a cart item: 0 if valid, -1 with err filled in. */
/* 1 if URL is on ORIGIN ("https://shop.example"), or ORIGIN is NULL. */
static int on_origin(const char *url, const char *origin)
{
	size_t n = origin ? strlen(origin) : 0;
	return !origin || (!strncmp(url, origin, n) && url[n] == '/');
}

/* Checks one field of items[IDX] (sku, qty, price, name, url, image) with
 * its validator; records what was seen, the price and the quantity. */
static int ev_item_field(sqlite3_stmt *s, size_t idx, double *price,
			 double *qty, unsigned *seen, const char *origin,
			 long qty_cap, struct ev_error *err)
{
	const char *k = col_text(s, 0), *jt = col_text(s, 1);
	const char *atom = col_text(s, 2);
	int text = strcmp(jt, "text") == 0, ok = 1;
	size_t max = 0; /* characters, for the message */
	char key[48];
	snprintf(key, sizeof key, "items[%zu].%.16s", idx, k);
	if (has_nul(s, 0) || has_nul(s, 2))
		return fail(err, 400, "%s: contains a NUL character", key);
	if (strcmp(k, "sku") == 0) {
		ok = text && val_sku(atom);
		*seen |= 1;
	} else if (strcmp(k, "name") == 0) {
		ok = text && val_text(atom, max = 200) && *atom;
		*seen |= 2;
	} else if (strcmp(k, "url") == 0 || strcmp(k, "image") == 0) {
		/* from a browser, links must stay on the shop: an email must not
		 * carry a link a stranger typed into someone else's cart */
		ok = text && val_url(atom);
		if (ok && !on_origin(atom, origin))
			return fail(err, 400, "%s: from a browser, links must be on %s",
				    key, origin);
	} else if (strcmp(k, "category") == 0) {
		ok = text && val_text(atom, max = 64);
	} else if (strcmp(k, "price") == 0) {
		*seen |= 4;
		return ev_number(s, key, jt, 0, 1e7, 0, price, err);
	} else if (strcmp(k, "qty") == 0) {
		return ev_number(s, key, jt, 1, (double)qty_cap, 1, qty, err);
	}
	if (!ok && max && text && val_utf8(atom, strlen(atom)) &&
	    utf8_chars(atom, strlen(atom)) > max)
		return fail(err, 400, "%s: at most %zu characters", key, max);
	return ok ? 0 : fail(err, 400, "%s: invalid value", key);
}

/* Checks every field of one item object with OBJECT_EACH. */
static int ev_item(struct db *db, const char *obj, size_t idx, double *sum,
		   const char *origin, long qty_cap, struct ev_error *err)
{
	sqlite3_stmt *s = q(db, ST_OBJECT_EACH, "t", obj);
	double price = 0, qty = 1;
	unsigned seen = 0;
	int rc = 0;
	while (rc == 0 && sqlite3_step(s) == SQLITE_ROW)
		rc = ev_item_field(s, idx, &price, &qty, &seen, origin, qty_cap,
				   err);
	sqlite3_reset(s);
	/* a browser's item needs only its sku (origin is set for browsers):
	 * its name, price and links are never kept, the catalog's are used;
	 * a signed one may lack a name (a catalog of brands and categories):
	 * a mail then names it from the catalog */
	if (rc == 0 && origin && !(seen & 1))
		rc = fail(err, 400, "items[%zu]: needs sku", idx);
	else if (rc == 0 && !origin && (seen & 5) != 5)
		rc = fail(err, 400, "items[%zu]: needs sku and price", idx);
	if (rc == 0)
		*sum += price * qty;
	return rc;
}

/* While import_orders runs, a line's quantity may reach import_max_qty
 * (a wholesale order) rather than max_qty, and an order may have
 * import_max_items lines rather than max_items: set by import_orders only,
 * read by ev_items; 0 otherwise. */
static long imp_qty_cap;

/* Checks every element of E's items array (count, shape, each field) and
 * totals the items when the event gave no total. */
static int ev_items(struct app *app, struct event *e, const char *origin,
		    struct ev_error *err)
{
	sqlite3_stmt *s = q(app->db, ST_ARRAY_EACH, "t", e->items);
	double sum = 0;
	size_t n = 0;
	int rc = 0;
	/* copy the elements out first: ev_item needs OBJECT_EACH for each */
	struct buf all = {0};
	while (rc == 0 && sqlite3_step(s) == SQLITE_ROW) {
		long most = imp_qty_cap ? app->cfg->import_max_items :
				app->cfg->max_items;
		if (++n > (size_t)most) {
			rc = fail(err, 400, "items: at most %ld items", most);
			break;
		}
		if (strcmp(col_text(s, 1), "object") != 0) {
			rc = fail(err, 400, "items[%zu]: must be an object", n - 1);
			break;
		}
		if (buf_adds(&all, col_text(s, 0)) || buf_add(&all, "", 1))
			rc = fail(err, 500, "out of memory"); /* NUL-separated list */
	}
	sqlite3_reset(s);
	for (size_t i = 0, off = 0; rc == 0 && i < n; i++) {
		const char *item = all.data + off;
		off += strlen(item) + 1;
		rc = ev_item(app->db, item, i, &sum, origin,
			     imp_qty_cap ? imp_qty_cap : app->cfg->max_qty, err);
	}
	buf_free(&all);
	e->nitems = (long)n;
	if (rc == 0 && !e->has_total)
		e->total = sum, e->has_total = 1;
	return rc;
}

static int ev_review(struct app *app, const char *obj, struct ev_error *err)
{
	sqlite3_stmt *s = q(app->db, ST_OBJECT_EACH, "t", obj);
	unsigned seen = 0;
	int ok = 1;
	while (sqlite3_step(s) == SQLITE_ROW) {
		const char *k = col_text(s, 0), *jt = col_text(s, 1);
		const char *atom = col_text(s, 2);
		int text = strcmp(jt, "text") == 0;
		ok &= !has_nul(s, 2);
		if (strcmp(k, "author") == 0) {
			seen |= 1;
			ok &= text && *atom && val_text(atom, 100);
		} else if (strcmp(k, "text") == 0) {
			seen |= 2;
			ok &= text && *atom && val_text(atom, 2000);
		} else if (strcmp(k, "rating") == 0) {
			int r = sqlite3_column_int(s, 2);
			seen |= 4;
			ok &= strcmp(jt, "integer") == 0 && r >= 1 && r <= 5;
		}
	}
	sqlite3_reset(s);
	if (!ok || seen != 7)
		return fail(err, 400, "review: needs author, text (no control "
			    "characters) and an integer rating 1-5");
	return 0;
}

/* 1 if CUR is an ISO 4217 currency code: a browser's currency is printed
 * in mails, so it may be one of these and never three letters of its own */
static int iso_currency(const char *cur)
{
	static const char codes[] =
		"AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF "
		"BMD BND BOB BRL BSD BTN BWP BYN BZD CAD CDF CHF CLP CNY COP CRC "
		"CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS "
		"GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD "
		"JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL "
		"LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD "
		"NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD "
		"RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD SSP STN SVC "
		"SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS "
		"VES VND VUV WST XAF XCD XOF XPF YER ZAR ZMW ZWL";
	if (strlen(cur) != 3)
		return 0;
	for (size_t i = 0; i + 3 < sizeof codes; i += 4) /* "XXX " each */
		if (!strncmp(codes + i, cur, 3))
			return 1;
	return 0;
}

/* The event types, listed once, each with whether a browser (/collect,
 * the pixel) may send it; the others come signed from the store backend. */
static const struct {
	const char *name;
	int browser;
} ev_types[] = {
	{"identify", 1}, {"cart", 1},  {"view", 1},
	{"checkout", 0}, {"order", 0}, {"product", 0}, {"refund", 0},
};

/* After the fields: the event type is known and allowed from SRC, and the
 * fields its type needs are present. */
static int ev_require(const struct event *e, enum ev_source src,
		      const char *visitor, struct ev_error *err)
{
	const char *t = e->type;
	int browser = src == EV_BROWSER || src == EV_PIXEL;
	size_t k = 0, ntypes = sizeof ev_types / sizeof ev_types[0];
	if (!*t)
		return fail(err, 400, "type: missing");
	while (k < ntypes && strcmp(t, ev_types[k].name))
		k++;
	if (k == ntypes)
		return fail(err, 400, "type: unknown event type '%s'", t);
	if (browser && !ev_types[k].browser)
		return fail(err, 403, "type: '%s' events must be sent signed to "
			    "/events by the store backend", t);
	if (src == EV_PIXEL && strcmp(t, "view"))
		return fail(err, 403, "type: the pixel records views only; "
			    "'%s' goes to /collect", t);
	if (browser && e->currency && !iso_currency(e->currency))
		return fail(err, 400, "currency: from a browser, an ISO 4217 code "
			    "like EUR");
	if (browser && !strcmp(t, "cart") && !visitor && !e->visitor_id)
		return fail(err, 400, "visitor_id: a browser's cart needs the "
			    "rm_vid cookie or a visitor_id");
	if (!strcmp(t, "identify") && !e->email)
		return fail(err, 400, "email: required for identify");
	if (e->seconds >= 0 && strcmp(t, "view"))
		return fail(err, 400, "seconds: only a view has seconds (its time "
			    "on the page)");
	if (!strcmp(t, "cart") && !e->items)
		return fail(err, 400, "items: required for cart (use [] to empty it)");
	if (!strcmp(t, "cart") && !e->cart_id && !visitor && !e->visitor_id)
		return fail(err, 400, "cart_id: required for cart");
	if (!strcmp(t, "checkout") && !e->cart_id)
		return fail(err, 400, "cart_id: required for checkout");
	if (!strcmp(t, "order") && !e->order_id)
		return fail(err, 400, "order_id: required for order");
	/* an order with neither email nor cart_id is a guest's: recorded
	 * without a contact (no flow), it still counts for the products */
	if (!strcmp(t, "refund") && (!e->order_id || !e->has_amount))
		return fail(err, 400, "refund: needs order_id (of an order sent "
			    "before) and amount (what was refunded, > 0)");
	/* a catalog of brands and categories may name no product */
	if (!strcmp(t, "product") && (!e->sku || (!e->name && !e->brand &&
						  !e->category)))
		return fail(err, 400, "product: needs sku and a name (or a "
			    "brand or category to name it by)");
	if (e->kind && strcmp(e->kind, "product") && strcmp(e->kind, "service"))
		return fail(err, 400, "kind: 'product' or 'service'");
	return 0;
}

/* Parses and validates one event object; writes nothing. */
static int ev_parse(struct app *app, const char *obj, enum ev_source src,
		    const char *visitor, rm_time now, struct event *e,
		    struct ev_error *err)
{
	memset(e, 0, sizeof *e);
	e->consent = -1;
	e->ts = -1;
	e->seconds = -1;
	e->text = strdup(obj);
	if (!e->text)
		return fail(err, 500, "out of memory");
	sqlite3_stmt *s = q(app->db, ST_OBJECT_EACH, "t", obj);
	int rc = 0;
	while (rc == 0 && sqlite3_step(s) == SQLITE_ROW)
		rc = ev_field(e, s, now, err);
	sqlite3_reset(s);
	if (rc == 0)
		rc = ev_require(e, src, visitor, err);
	int browser = src == EV_BROWSER || src == EV_PIXEL;
	if (rc == 0 && e->items)
		rc = ev_items(app, e, browser ? app->cfg->store_origin : NULL, err);
	if (rc == 0 && e->review)
		rc = ev_review(app, e->review, err);
	for (char *p = e->code; p && *p; p++) /* codes are stored upper-case */
		*p = (char)toupper((unsigned char)*p);
	if (src == EV_PIXEL) { /* a pixel never names anyone */
		free(e->email);
		e->email = NULL;
	}
	/* browsers' clocks are not trusted; servers may backdate */
	if (src == EV_BROWSER || src == EV_PIXEL || e->ts < 0)
		e->ts = now;
	return rc;
}

static int64_t scalar_id(struct db *db, sqlite3_stmt *s);
static long long db_scalar_stmt(sqlite3_stmt *s);

/* The browser names an address and nothing else: it never writes a name;
 * a new address is "browser-only" (held, not mailed, past the store's
 * hourly cap, until it comes back in an hour with room); its checkbox gives consent (in confirm mode the consent
 * waits for the double opt-in), and only the visitor whose checkbox gave
 * it may take it back. */
static int64_t contact_from_browser(struct app *app, const struct event *e,
				    const char *vid, rm_time now)
{
	struct db *db = app->db;
	int64_t id = scalar_id(db, q(db, ST_CONTACT_ID, "t", e->email));
	long cap = app->cfg->browser_new_contacts_per_hour;
	if (id && q_exec(db, q(db, ST_BROWSER_RELEASE, "iii", id, (int64_t)now,
			       (int64_t)cap)) < 0)
		return -1;
	if (!id) {
		int held = db_scalar_stmt(q(db, ST_BROWSER_RECENT, "ii",
					    (int64_t)now, (int64_t)cap)) >= cap;
		sqlite3_stmt *s = q(db, ST_CONTACT_NEW_BROWSER, "tin", e->email,
				    (int64_t)now);
		if (held)
			sqlite3_bind_int64(s, 3, now);
		id = scalar_id(db, s);
		if (!id)
			return -1;
		if (held)
			fprintf(stderr, "remarket: contact %lld: more than %ld new "
				"browser-only contacts this hour "
				"(browser_new_contacts_per_hour): recorded, not mailed\n",
				(long long)id, cap);
	}
	sqlite3_stmt *s = q(db, ST_CONTACT_CONSENT_BROWSER, "intii", id, vid,
			    (int64_t)now,
			    (int64_t)!strcmp(app->cfg->browser_consent, "confirm"));
	if (e->consent >= 0)
		sqlite3_bind_int(s, 2, e->consent);
	return q_exec(db, s) < 0 ? -1 : id;
}

/* HEX: the keyed hash `remarket forget` keeps of an address (lower-cased:
 * addresses match without case, as contacts.email does), by key K of the
 * ring (0: the newest, which forget uses; 1..nold: the older ones, so a
 * hash made before `keygen --rotate` is still found). */
static void forgotten_hash(const struct app *app, const char *email, int k,
			   char hex[2 * 32 + 1])
{
	unsigned char low[320], h[32];
	size_t n = 0;
	for (; email[n] && n < sizeof low; n++)
		low[n] = (unsigned char)tolower((unsigned char)email[n]);
	crypto_generichash(h, sizeof h, low, n,
			   k ? app->old_keys[k - 1] : app->key, RM_KEYBYTES);
	sodium_bin2hex(hex, 2 * 32 + 1, h, sizeof h);
}

/* A contact whose address was forgotten and comes back (an import, a hook)
 * starts suppressed ('forgotten'), whatever consent the event carries:
 * only `remarket suppress remove EMAIL` lifts it. 0, or -1 on error. */
static int forgotten_suppress(struct app *app, int64_t id, const char *email,
			      rm_time now)
{
	char hex[2 * 32 + 1];
	struct db *db = app->db;
	int k = 0;
	for (; id && k <= app->nold; k++) {
		forgotten_hash(app, email, k, hex);
		if (db_scalar_stmt(q(db, ST_FORGOTTEN_HAS, "t", hex)) == 1)
			break;
	}
	if (!id || k > app->nold)
		return 0;
	return q_exec(db, q(db, ST_SUPPRESS, "iit", id, (int64_t)now,
			    "forgotten")) ||
	       q_exec(db, q(db, ST_EXIT_CONTACT, "it", id, "forgotten")) ? -1 : 0;
}

/* The contact an event names (upserted from a signed event, limited from a
 * browser) and its visitor linked; a signed event's phone and SMS consent
 * are kept with SOURCE (a browser's are ignored: see the trust table in
 * the README). The contact id, 0 if none, -1 on error. */
static int64_t ev_contact(struct app *app, const struct event *e,
			  const char *vid, int browser, const char *source,
			  rm_time now)
{
	struct db *db = app->db;
	int64_t id = 0;
	if (e->email && browser) {
		if ((id = contact_from_browser(app, e, vid, now)) < 0)
			return -1;
	} else if (e->email) {
		sqlite3_stmt *s = q(db, ST_CONTACT_UPSERT, "ttni", e->email,
				    e->name, (int64_t)now);
		if (e->consent >= 0)
			sqlite3_bind_int(s, 3, e->consent);
		if (sqlite3_step(s) == SQLITE_ROW)
			id = sqlite3_column_int64(s, 0);
		sqlite3_reset(s);
		if (!id)
			return -1;
	}
	if (e->email && !browser && (e->phone || e->has_sms_consent)) {
		sqlite3_stmt *s = q(db, ST_CONTACT_SMS, "itnti", id, e->phone,
				    source, (int64_t)now);
		if (e->has_sms_consent)
			sqlite3_bind_int(s, 3, e->sms_consent);
		if (q_exec(db, s) < 0)
			return -1;
	}
	if (e->email && forgotten_suppress(app, id, e->email, now) < 0)
		return -1;
	if (!e->email && vid) {
		sqlite3_stmt *s = q(db, ST_VISITOR_CONTACT, "t", vid);
		if (sqlite3_step(s) == SQLITE_ROW)
			id = sqlite3_column_int64(s, 0);
		sqlite3_reset(s);
	}
	if (vid) {
		sqlite3_stmt *s = q(db, ST_VISITOR_UPSERT, "tni", vid, (int64_t)now);
		if (id)
			sqlite3_bind_int64(s, 2, id);
		if (q_exec(db, s) < 0)
			return -1;
		if (id && q_exec(db, q(db, ST_VISITOR_CARTS, "ti", vid, id)) < 0)
			return -1;
	}
	if (id > 0 && e->tz && q_exec(db, q(db, ST_CONTACT_TZ_SET, "it", id,
					    e->tz)) < 0)
		return -1;
	return id;
}

/* Stores the cart of a cart event under its key (a browser's cart is its
 * own, priced by the catalog); an emptied cart ends its sequence. */
static int ev_cart(struct app *app, const struct event *e, const char *vid,
		   int browser, int64_t contact)
{
	struct db *db = app->db;
	char key[160];
	const char *items = e->items;
	double total = e->total;
	struct buf bare = {0};
	/* a browser's cart id is its own: "<cart_id>/<vid>" can never be the
	 * backend's cart of the same id ('/' is not in a cart id) */
	if (e->cart_id && browser)
		snprintf(key, sizeof key, "%s/%s", e->cart_id, vid ? vid : "");
	else if (e->cart_id)
		copy_str(key, sizeof key, e->cart_id);
	else
		snprintf(key, sizeof key, "v:%s", vid);
	if (browser) { /* skus and quantities only, priced by the catalog */
		sqlite3_stmt *b = q(db, ST_ITEMS_BARE, "t", e->items);
		if (sqlite3_step(b) == SQLITE_ROW &&
		    buf_adds(&bare, col_text(b, 0)) == 0) {
			items = bare.data;
			total = sqlite3_column_double(b, 1);
		}
		sqlite3_reset(b);
		if (items != bare.data)
			return -1;
	}
	/* an item change after the order (a later ts) starts the next
	 * generation: the ordered one keeps its row under "<key>#<n>" */
	int64_t gen = 0, gen_contact = 0;
	char gen_vid[80] = "";
	sqlite3_stmt *g = q(db, ST_CART_NEXT_GEN, "tiit", key, (int64_t)e->ts,
			    (int64_t)e->nitems, items);
	int grc = sqlite3_step(g);
	if (grc == SQLITE_ROW) {
		gen = sqlite3_column_int64(g, 0);
		gen_contact = sqlite3_column_int64(g, 1);
		copy_str(gen_vid, sizeof gen_vid, col_text(g, 2));
		grc = SQLITE_DONE;
	}
	sqlite3_reset(g);
	sqlite3_stmt *s = q(db, ST_CART_UPSERT, "tnttdtii", key, vid,
			    e->currency ? e->currency : "EUR", total,
			    items, (int64_t)e->nitems, (int64_t)e->ts);
	buf_free(&bare); /* bound as a transient copy by q() */
	if (grc != SQLITE_DONE)
		return -1;
	if (contact)
		sqlite3_bind_int64(s, 2, contact);
	int64_t id = 0;
	if (sqlite3_step(s) == SQLITE_ROW)
		id = sqlite3_column_int64(s, 0);
	sqlite3_reset(s);
	if (!id)
		return -1;
	if (gen) { /* the new generation: who the cart was, since when */
		sqlite3_stmt *n = q(db, ST_CART_GEN_SET, "iiinn", id, gen,
				    (int64_t)e->ts);
		if (gen_contact)
			sqlite3_bind_int64(n, 4, gen_contact);
		if (*gen_vid)
			sqlite3_bind_text(n, 5, gen_vid, -1, SQLITE_TRANSIENT);
		if (q_exec(db, n) < 0)
			return -1;
	}
	/* the backend's signed cart ends the browsers' copies of it */
	if (!browser && e->cart_id &&
	    q_exec(db, q(db, ST_SCOPED_SUPERSEDE, "t", e->cart_id)) < 0)
		return -1;
	if (e->nitems == 0) /* an emptied cart ends its sequence at once */
		return q_exec(db, q(db, ST_EXIT_CART, "it", id, "empty"));
	return 0;
}

static int64_t scalar_id(struct db *db, sqlite3_stmt *s);
static int ev_attribute(struct app *app, const struct event *e, int64_t contact,
			int64_t cart, const char *code);

/* The generation of cart KEY that an order at TS belongs to. */
static int64_t cart_of_order(struct db *db, const char *key, rm_time ts)
{
	return scalar_id(db, q(db, ST_CART_FOR_ORDER, "ti", key, (int64_t)ts));
}

/* The first column of a statement's first row, or -1. */
static long long db_scalar_stmt(sqlite3_stmt *s)
{
	long long v = -1;
	if (sqlite3_step(s) == SQLITE_ROW)
		v = sqlite3_column_int64(s, 0);
	sqlite3_reset(s);
	return v;
}

static int64_t scalar_id(struct db *db, sqlite3_stmt *s)
{
	int64_t id = 0;
	(void)db;
	if (sqlite3_step(s) == SQLITE_ROW)
		id = sqlite3_column_int64(s, 0);
	sqlite3_reset(s);
	return id;
}

/* Attributes a new order once, to the last qualifying message: one whose
 * code it redeemed or that was clicked within attribution_click_days;
 * else, as "influenced", the last one sent within attribution_view_hours.
 * A mail about an earlier generation of CART had its own order: passed
 * over (its code, redeemed here, still counts). */
static int ev_attribute(struct app *app, const struct event *e, int64_t contact,
			int64_t cart, const char *code)
{
	struct db *db = app->db;
	int64_t click = app->cfg->attribution_click_days * 86400;
	int64_t view = app->cfg->attribution_view_hours * 3600;
	int64_t msg = 0;
	char how[16] = "influenced";
	sqlite3_stmt *s = q(db, ST_ATTRIBUTE_CLICK, "iitii", contact, (int64_t)e->ts,
			    code ? code : "", click, cart);
	if (sqlite3_step(s) == SQLITE_ROW) {
		msg = sqlite3_column_int64(s, 0);
		copy_str(how, sizeof how, col_text(s, 1));
	}
	sqlite3_reset(s);
	if (!msg && contact)
		msg = scalar_id(db, q(db, ST_ATTRIBUTE_VIEW, "iiii", contact,
				      (int64_t)e->ts, view, cart));
	if (!msg)
		return 0;
	return q_exec(db, q(db, ST_ORDER_ATTRIBUTE, "tit", e->order_id, msg, how));
}

/* A new order's discount code: redeemed when it is the code's first order
 * before its expiry, else flagged 'reused' or 'expired' on the order (a
 * code remarket did not issue is left alone). *redeemed says which. */
static int code_redeem(struct app *app, const struct event *e, int *redeemed)
{
	struct db *db = app->db;
	if (q_exec(db, q(db, ST_DISCOUNT_REDEEM, "tit", e->code, (int64_t)e->ts,
			 e->order_id)) < 0)
		return -1;
	*redeemed = sqlite3_changes(db->h) == 1;
	const char *status = *redeemed ? "redeemed" : NULL;
	sqlite3_stmt *s = q(db, ST_DISCOUNT_GET, "t", e->code);
	if (!status && sqlite3_step(s) == SQLITE_ROW)
		status = sqlite3_column_type(s, 3) != SQLITE_NULL ? "reused" : "expired";
	sqlite3_reset(s);
	if (!status)
		return 0;
	return q_exec(db, q(db, ST_ORDER_CODE_STATUS, "tt", e->order_id, status));
}

/* After a delayed order hook ordered CART: items changed after the
 * order's ts start the next generation (see CART_AFTER_ORDER). */
static int cart_split(struct db *db, int64_t cart, const struct event *e)
{
	char key[160] = "";
	struct buf items = {0};
	double total = 0;
	int64_t n = 0;
	sqlite3_stmt *s = q(db, ST_CART_AFTER_ORDER, "iiti", cart, (int64_t)e->ts,
			    e->items ? e->items : "[]", (int64_t)e->nitems);
	int rc = sqlite3_step(s);
	if (rc == SQLITE_ROW) {
		copy_str(key, sizeof key, col_text(s, 0));
		buf_adds(&items, col_text(s, 1));
		total = sqlite3_column_double(s, 2);
		n = sqlite3_column_int64(s, 3);
	}
	sqlite3_reset(s);
	if (rc == SQLITE_DONE)
		return 0;
	if (rc != SQLITE_ROW || buf_failed(&items) ||
	    q_exec(db, q(db, ST_CART_ARCHIVE_AS, "itid", cart, e->items,
			 (int64_t)e->nitems, e->total)) < 0 ||
	    q_exec(db, q(db, ST_CART_GEN_COPY, "itdti", cart, key, total,
			 items.data, n)) < 0)
		rc = -1;
	else
		rc = 0;
	buf_free(&items);
	return rc;
}

/* Returns 1 when the order was already recorded (a webhook retry). */
static int ev_order(struct app *app, const struct event *e, int64_t contact)
{
	struct db *db = app->db;
	int64_t cart = e->cart_id ? cart_of_order(db, e->cart_id, e->ts) : 0;
	sqlite3_stmt *s = q(db, ST_ORDER_INSERT, "tnndttti", e->order_id,
			    e->total, e->currency ? e->currency : "EUR",
			    e->items ? e->items : "[]", e->code, (int64_t)e->ts);
	if (contact)
		sqlite3_bind_int64(s, 2, contact);
	if (cart)
		sqlite3_bind_int64(s, 3, cart);
	if (q_exec(db, s) < 0)
		return -1;
	if (sqlite3_changes(db->h) == 0)
		return 1;
	int64_t order = sqlite3_last_insert_rowid(db->h);
	s = q(db, ST_ORDER_LINES, "init", order, (int64_t)e->ts, e->items ? e->items : "[]");
	if (contact)
		sqlite3_bind_int64(s, 2, contact);
	if (q_exec(db, s) < 0 || q_exec(db, q(db, ST_ORDER_SERVICES, "ti",
					      e->items ? e->items : "[]",
					      (int64_t)e->ts)) < 0)
		return -1;
	s = q(db, ST_CART_ORDERED, "nni", (int64_t)e->ts);
	if (cart)
		sqlite3_bind_int64(s, 1, cart);
	if (contact)
		sqlite3_bind_int64(s, 2, contact);
	if (q_exec(db, s) < 0)
		return -1;
	int ordered_now = cart && sqlite3_changes(db->h) == 1;
	/* a purchase ends every sequence of this person and this cart, and
	 * of the browsers' own copies of the cart id */
	if (cart && q_exec(db, q(db, ST_EXIT_CART, "it", cart, "order")) < 0)
		return -1;
	if (ordered_now && cart_split(db, cart, e) < 0)
		return -1;
	if (e->cart_id &&
	    (q_exec(db, q(db, ST_SCOPED_EXIT, "t", e->cart_id)) < 0 ||
	     q_exec(db, q(db, ST_SCOPED_ORDERED, "ti", e->cart_id,
			  (int64_t)e->ts)) < 0))
		return -1;
	/* a purchase ends cart and win-back sequences begun before it (an
	 * imported old order ends nothing newer) */
	if (contact && q_exec(db, q(db, ST_EXIT_ORDERED, "ii", contact,
				    (int64_t)e->ts)) < 0)
		return -1;
	int redeemed = 0;
	if (e->code && code_redeem(app, e, &redeemed) < 0)
		return -1;
	if (!contact && cart)
		contact = scalar_id(db, q(db, ST_CART_CONTACT, "i", cart));
	return ev_attribute(app, e, contact, cart, redeemed ? e->code : NULL);
}

/* A refund or cancellation: takes AMOUNT off the order's revenue (never
 * below 0), once per refund (refund_id, or order_id@ts:amount), and marks
 * its customer for SEG_AGG: an update of an old order moves no orders
 * watermark. 1: the same refund again; -3: no such order. */
static int ev_refund(struct app *app, const struct event *e)
{
	struct db *db = app->db;
	int64_t order = scalar_id(db, q(db, ST_REFUND_ORDER, "t", e->order_id));
	if (order <= 0)
		return order < 0 ? -1 : -3;
	char key[160];
	if (e->refund_id)
		copy_str(key, sizeof key, e->refund_id);
	else if (snprintf(key, sizeof key, "%s@%lld:%.2f", e->order_id,
			  (long long)e->ts, e->amount) >= (int)sizeof key)
		return -1;
	if (q_exec(db, q(db, ST_REFUND_INSERT, "tidi", key, order, e->amount,
			 (int64_t)e->ts)) < 0)
		return -1;
	if (sqlite3_changes(db->h) == 0)
		return 1;
	int64_t refund = sqlite3_last_insert_rowid(db->h);
	return q_exec(db, q(db, ST_REFUND_APPLY, "ii", order, refund)) < 0 ||
	       q_exec(db, q(db, ST_REFUND_DIRTY, "i", order)) < 0 ? -1 : 0;
}

static int reco_kind_changed(struct db *db, const char *sku, const char *was);

/* A product event: the catalog row, its kind (guessed when new: a
 * service's lines leave the recommendation counts) and its review. */
static int ev_product(struct app *app, const struct event *e)
{
	struct db *db = app->db;
	char was[16];
	sqlite3_stmt *s = q(db, ST_PRODUCT_KIND_OF, "t", e->sku);
	copy_str(was, sizeof was, sqlite3_step(s) == SQLITE_ROW ? col_text(s, 0) : "");
	sqlite3_reset(s);
	s = q(db, ST_PRODUCT_UPSERT, "ttntttitt", e->sku, e->name, e->url,
	      e->image, e->category, (int64_t)e->ts, e->kind, e->brand);
	if (e->has_price)
		sqlite3_bind_double(s, 3, e->price);
	if (q_exec(db, s) < 0 || reco_kind_changed(db, e->sku, was) < 0)
		return -1;
	if (!e->review)
		return 0;
	s = q(db, ST_REVIEW_INSERT, "t", e->sku);
	/* the review object was validated; JSON1 extracts its fields */
	sqlite3_stmt *f = q(db, ST_OBJECT_EACH, "t", e->review);
	while (sqlite3_step(f) == SQLITE_ROW) {
		const char *k = col_text(f, 0);
		int col = !strcmp(k, "author") ? 2 : !strcmp(k, "rating") ? 3 :
			  !strcmp(k, "text") ? 4 : 0;
		if (col == 3)
			sqlite3_bind_int(s, 3, sqlite3_column_int(f, 2));
		else if (col)
			sqlite3_bind_text(s, col, col_text(f, 2), -1,
					  SQLITE_TRANSIENT);
	}
	sqlite3_reset(f);
	sqlite3_bind_int64(s, 5, e->ts);
	return q_exec(db, s);
}

static int ev_checkout(struct app *app, const struct event *e, int64_t contact)
{
	sqlite3_stmt *s = q(app->db, ST_CART_TOUCH, "tin", e->cart_id,
			    (int64_t)e->ts);
	if (contact)
		sqlite3_bind_int64(s, 3, contact);
	return q_exec(app->db, s);
}

/* Applies one validated event; *dup is set for a repeated order. */
static int ev_apply(struct app *app, const struct event *e, enum ev_source src,
		    const char *visitor, rm_time now, int *dup)
{
	static const char *const src_name[] = {"hook", "browser", "cli", "pixel"};
	int browser = src == EV_BROWSER || src == EV_PIXEL;
	/* a browser is who its cookie says; the body may name a visitor only
	 * where there is no cookie (first visit, cookies blocked) */
	const char *vid = browser && visitor ? visitor :
			  e->visitor_id ? e->visitor_id : visitor;
	*dup = 0;
	/* a browser may fill its own carts, not one the store's backend or
	 * another visitor made */
	if (browser && !strcmp(e->type, "cart") && e->cart_id &&
	    db_scalar_stmt(q(app->db, ST_CART_OWNER, "tt", e->cart_id, vid)) > 0)
		return -2;
	int64_t contact = ev_contact(app, e, vid, browser, src_name[src], now);
	int rc = contact < 0 ? -1 : 0;
	if (rc == 0 && !strcmp(e->type, "cart"))
		rc = ev_cart(app, e, vid, browser, contact);
	else if (rc == 0 && !strcmp(e->type, "checkout"))
		rc = ev_checkout(app, e, contact);
	else if (rc == 0 && !strcmp(e->type, "order"))
		rc = ev_order(app, e, contact);
	else if (rc == 0 && !strcmp(e->type, "product"))
		rc = ev_product(app, e);
	else if (rc == 0 && !strcmp(e->type, "refund"))
		rc = ev_refund(app, e);
	else if (rc == 0 && !strcmp(e->type, "view") && contact > 0 && e->sku)
		rc = q_exec(app->db, q(app->db, ST_BROWSE_VIEW, "itii", contact,
				       e->sku, (int64_t)e->ts,
				       (int64_t)e->seconds));
	if (rc == 1) {
		*dup = 1;
		return 0;
	}
	if (rc < 0)
		return rc == -3 ? -3 : -1; /* -3: a refund of no order */
	return q_exec(app->db, q(app->db, ST_EVENT_INSERT, "iitt" "t",
				 (int64_t)e->ts, (int64_t)now, src_name[src],
				 e->type, e->text));
}

/*
 * Storing is done in batches: one transaction holds the events of one or
 * more requests, each request's inside its own savepoint, so that a
 * request that fails rolls back its own events only and gets its own
 * error, and the others are committed. `remarket serve` hands every
 * request's events to one writer thread (ev_handoff, set by the FastCGI
 * front-end), which stores whatever requests are waiting as one batch:
 * one commit for many requests (group commit). CGI mode and the command
 * line store their one request directly, with the same ev_store.
 */
struct ev_job {
	const struct event *evs;
	size_t n;
	enum ev_source src;
	const char *visitor;
	rm_time now;
	struct ev_error *err;
	int rc;       /* 0, or -1 with err filled in */
	int accepted; /* events stored (repeated orders are not) */
	int done;     /* set by the writer once rc is final */
	pthread_cond_t *wake; /* the waiting worker's, signalled when done */
	struct ev_job *next;
	struct buf *refused; /* ?partial=1: a refund of no order is listed
			      * here and left out, not the whole request */
	int left_out; /* such refunds */
};

/* Set by `remarket serve`: waits until the writer has stored JOB (0), or
 * -1 when there is no writer (then the caller stores it itself). */
static int (*ev_handoff)(struct ev_job *job);

static void json_str(struct buf *b, const char *s); /* in The report */

#define EV_NO_ORDER "order_id: a refund of an order remarket has not " \
	"recorded (send the order first)"

/* Applies event E of JOB. In a partial request, a refund of an order
 * not recorded is undone alone (its own savepoint: its contact too) and
 * listed in job->refused: 1. Else ev_apply's result. */
static int ev_store_event(struct app *app, struct ev_job *job,
			  const struct event *e, int *dup)
{
	struct db *db = app->db;
	int alone = job->refused && !strcmp(e->type, "refund");
	if (alone && q_exec(db, q(db, ST_SAVEPOINT, NULL)) < 0)
		return -1;
	int rc = ev_apply(app, e, job->src, job->visitor, job->now, dup);
	if (!alone)
		return rc;
	if ((rc == -3 && q_exec(db, q(db, ST_ROLLBACK_TO, NULL)) < 0) ||
	    q_exec(db, q(db, ST_RELEASE, NULL)) < 0)
		return -1;
	if (rc != -3)
		return rc;
	struct buf *r = job->refused;
	buf_addf(r, "%s{\"index\":%zu,\"error\":", r->len > 1 ? "," : "", e->at);
	json_str(r, EV_NO_ORDER);
	buf_adds(r, "}");
	return 1;
}

/* Applies one request's events inside the open transaction, in a
 * savepoint; on failure only this request's events are undone. */
static void ev_store_one(struct app *app, struct ev_job *job)
{
	struct db *db = app->db;
	int rc = q_exec(db, q(db, ST_SAVEPOINT, NULL));
	if (rc < 0)
		fail(job->err, 500, "database error while recording the event");
	for (size_t i = 0; rc == 0 && i < job->n; i++) {
		int dup;
		rc = ev_store_event(app, job, &job->evs[i], &dup);
		if (rc == 1) { /* refused alone (partial) */
			rc = 0;
			job->left_out++;
			continue;
		}
		if (rc == -2)
			fail(job->err, 403, "cart_id: that cart is not this visitor's");
		else if (rc == -3)
			fail(job->err, 400, EV_NO_ORDER);
		else if (rc < 0)
			fail(job->err, 500, "database error while recording the event");
		job->accepted += !dup;
	}
	if (rc == 0 && q_exec(db, q(db, ST_RELEASE, NULL)) < 0)
		rc = fail(job->err, 500, "database error while recording the event");
	if (rc < 0 && !sqlite3_get_autocommit(db->h)) {
		q_exec(db, q(db, ST_ROLLBACK_TO, NULL));
		q_exec(db, q(db, ST_RELEASE, NULL));
	}
	job->rc = rc < 0 ? -1 : 0;
}

/* Stores the K requests of JOBS in one transaction: each gets rc 0 once
 * the commit is done, or its own error. If the transaction itself fails
 * (no lock, a commit refused, SQLite rolling it back after an I/O error),
 * every request not already refused gets that error: none is answered as
 * stored unless its events are committed. */
static void ev_store(struct app *app, struct ev_job *const *jobs, size_t k)
{
	int status = 503;
	const char *msg = "database busy, try again";
	for (size_t i = 0; i < k; i++)
		jobs[i]->rc = jobs[i]->accepted = jobs[i]->left_out = 0;
	if (db_begin(app->db) == 0) {
		status = 500;
		msg = "database error while recording the event";
		size_t i = 0;
		for (; i < k && !sqlite3_get_autocommit(app->db->h); i++)
			ev_store_one(app, jobs[i]);
		if (i == k && !sqlite3_get_autocommit(app->db->h) &&
		    db_commit(app->db) == 0)
			return;
		db_rollback(app->db);
	}
	for (size_t i = 0; i < k; i++)
		if (jobs[i]->rc == 0) {
			jobs[i]->rc = fail(jobs[i]->err, status, "%s", msg);
			jobs[i]->accepted = 0;
		}
}

/* Splits the body into event objects (NUL-separated in out). */
static int ev_split(struct app *app, const char *json, size_t len,
		    size_t max, struct buf *out, size_t *n, struct ev_error *err)
{
	struct db *db = app->db;
	sqlite3_stmt *s = q(db, ST_BODY_SHAPE, "b", json, (int)len);
	int valid = 0;
	char type[16] = "";
	if (sqlite3_step(s) == SQLITE_ROW) {
		valid = sqlite3_column_int(s, 0);
		copy_str(type, sizeof type, col_text(s, 1));
	}
	sqlite3_reset(s);
	if (!valid)
		return fail(err, 400, "body: not valid JSON");
	*n = 0;
	if (strcmp(type, "object") == 0) {
		*n = 1;
		return buf_add(out, json, len) || buf_add(out, "", 1) ?
			fail(err, 500, "out of memory") : 0;
	}
	if (strcmp(type, "array") != 0)
		return fail(err, 400, "body: must be an event object or an array "
			    "of them");
	s = q(db, ST_ARRAY_EACH, "b", json, (int)len);
	int rc = 0;
	while (rc == 0 && sqlite3_step(s) == SQLITE_ROW) {
		if (++*n > max)
			rc = fail(err, 413, "body: at most %zu events at once", max);
		else if (strcmp(col_text(s, 1), "object") != 0)
			rc = fail(err, 400, "[%zu]: must be an event object", *n - 1);
		else if (buf_adds(out, col_text(s, 0)) || buf_add(out, "", 1))
			rc = fail(err, 500, "out of memory");
	}
	sqlite3_reset(s); /* [] is a batch of nothing: accepted, 0 events */
	return rc;
}


/* The door for facts: checks the whole body, then stores every event and
 * its state changes in one transaction (or nothing). With REFUSED (a
 * batch sent with ?partial=1), an event that fails validation is left
 * out instead of refusing the batch, and REFUSED gets its index and
 * reason; this is decided here, before the hand-off, so the writer only
 * ever sees good events. */
static int ev_ingest_batch(struct app *app, enum ev_source src,
			   const char *json, size_t len, const char *visitor,
			   rm_time now, struct ev_error *err, struct buf *refused)
{
	err->status = err->duplicates = 0;
	err->msg[0] = '\0';
	/* requests are capped; the operator's imports are not */
	if (src != EV_CLI && len > (size_t)app->cfg->max_body)
		return fail(err, 413, "body: larger than %ld bytes",
			    app->cfg->max_body);
	if (len == 0)
		return fail(err, 400, "body: empty");
	if (!val_utf8(json, len) || memchr(json, '\0', len))
		return fail(err, 400, "body: not valid UTF-8 text");
	if (has_nul_escape(json, len))
		return fail(err, 400, "body: \\u0000 (NUL) is not allowed in text");
	if (visitor && !val_ident(visitor, 64))
		visitor = NULL; /* a bad cookie is ignored, not trusted */
	struct buf objs = {0};
	size_t n = 0;
	struct event *evs = NULL;
	size_t max = src == EV_CLI ? SIZE_MAX :
		     src == EV_BROWSER || src == EV_PIXEL ? EV_MAX_BROWSER : EV_MAX_BATCH;
	int rc = ev_split(app, json, len, max, &objs, &n, err);
	if (rc == 0 && n == 0) { /* a feeder's quiet ten minutes */
		buf_free(&objs);
		return 0;
	}
	if (rc == 0 && !(evs = calloc(n, sizeof *evs)))
		rc = fail(err, 500, "out of memory");
	const char *p = objs.data;
	size_t good = 0, all = n;
	if (refused)
		buf_adds(refused, "[");
	for (size_t i = 0; rc == 0 && i < all; i++, p += strlen(p) + 1) {
		rc = ev_parse(app, p, src, visitor, now, &evs[good], err);
		if (rc < 0 && refused && err->status >= 400 && err->status < 500) {
			buf_addf(refused, "%s{\"index\":%zu,\"error\":",
				 refused->len > 1 ? "," : "", i);
			json_str(refused, err->msg);
			buf_adds(refused, "}");
			ev_free(&evs[good]);
			err->status = 0;
			err->msg[0] = '\0';
			rc = 0;
			continue;
		}
		evs[good].at = i;
		if (rc < 0 && n > 1) { /* say which event of the batch */
			char msg[sizeof err->msg];
			snprintf(msg, sizeof msg, "[%zu].%s", i, err->msg);
			copy_str(err->msg, sizeof err->msg, msg);
		}
		good++;
	}
	n = rc == 0 ? good : n;
	struct ev_job job = {evs, n, src, visitor, now, err, 0, 0, 0, NULL, NULL,
			     refused, 0};
	struct ev_job *one = &job;
	if (rc == 0 && (!ev_handoff || ev_handoff(&job) < 0))
		ev_store(app, &one, 1);
	int accepted = job.accepted;
	if (rc == 0)
		rc = job.rc;
	if (refused)
		buf_adds(refused, "]");
	if (rc == 0 && refused && buf_failed(refused))
		rc = fail(err, 500, "out of memory");
	for (size_t i = 0; evs && i < n; i++)
		ev_free(&evs[i]);
	free(evs);
	buf_free(&objs);
	err->duplicates = rc < 0 ? 0 : (int)(n - (size_t)accepted -
					     (size_t)job.left_out);
	return rc < 0 ? -1 : accepted;
}

int ev_ingest(struct app *app, enum ev_source src, const char *json,
	      size_t len, const char *visitor, rm_time now,
	      struct ev_error *err)
{
	return ev_ingest_batch(app, src, json, len, visitor, now, err, NULL);
}

int ev_ingest_partial(struct app *app, enum ev_source src, const char *json,
		      size_t len, const char *visitor, rm_time now,
		      struct ev_error *err, struct buf *refused)
{
	return ev_ingest_batch(app, src, json, len, visitor, now, err, refused);
}

/* The checks of ev_ingest for the operator's JSON, storing nothing: 0 if
 * it would be accepted, else -1 with ERR filled in. `import --dry-run`
 * asks it; what only storing can refuse (a full disk) it cannot foresee. */
static int ev_check(struct app *app, const char *json, size_t len, rm_time now,
		    struct ev_error *err)
{
	err->status = err->duplicates = 0;
	err->msg[0] = '\0';
	if (len == 0)
		return fail(err, 400, "body: empty");
	if (!val_utf8(json, len) || memchr(json, '\0', len))
		return fail(err, 400, "body: not valid UTF-8 text");
	if (has_nul_escape(json, len))
		return fail(err, 400, "body: \\u0000 (NUL) is not allowed in text");
	struct buf objs = {0};
	size_t n = 0;
	int rc = ev_split(app, json, len, SIZE_MAX, &objs, &n, err);
	const char *p = objs.data;
	for (size_t i = 0; rc == 0 && i < n; i++, p += strlen(p) + 1) {
		struct event e;
		rc = ev_parse(app, p, EV_CLI, NULL, now, &e, err);
		ev_free(&e);
	}
	buf_free(&objs);
	return rc < 0 ? -1 : 0;
}

/* ==== Discount codes ================================================== */
/*
 * Codes are PREFIX-XXXX-XXXX from an alphabet without look-alikes (no 0,
 * O, 1, I), drawn with randombytes_uniform: 40 bits, unguessable in the
 * number of tries a checkout allows. The code is the primary key, so a
 * collision is a failed insert, retried with a new draw.
 * A code is single-use: a checkout may hold it for its cart for 15
 * minutes (/discounts/validate with "reserve"), and the first order that
 * carries it before it expires redeems it (code_redeem, in the events
 * section); a later or late use is stored and flagged on the order, never
 * attributed.
 */

static const char code_alphabet[] = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ";
#define CODE_HOLD_SECONDS (15 * 60) /* a checkout's reservation */

static void code_new(const char *prefix, char *out, size_t outlen)
{
	char g[10];
	for (int i = 0; i < 9; i++)
		g[i] = i == 4 ? '-' :
		       code_alphabet[randombytes_uniform(sizeof code_alphabet - 1)];
	g[9] = '\0';
	snprintf(out, outlen, "%s-%s", prefix, g);
}

static int code_issue(struct app *app, int64_t message, int64_t contact,
		      int percent, double min_spend, rm_time expires,
		      rm_time now, char *out, size_t outlen)
{
	for (int tries = 0; tries < 5; tries++) {
		code_new(app->cfg->code_prefix, out, outlen);
		sqlite3_stmt *s = q(app->db, ST_DISCOUNT_INSERT, "tidiiii", out,
				    (int64_t)percent, min_spend, contact,
				    message, (int64_t)now, (int64_t)expires);
		if (sqlite3_step(s) == SQLITE_DONE) {
			sqlite3_reset(s);
			return 0;
		}
		sqlite3_reset(s);
	}
	return -1;
}

/* Answers the checkout's question: may this code be used on this total? */
static const char *code_check(struct app *app, const char *code, double total,
			      rm_time now, int *percent, double *min_spend,
			      rm_time *expires)
{
	sqlite3_stmt *s = q(app->db, ST_DISCOUNT_GET, "t", code);
	const char *why = "unknown";
	if (sqlite3_step(s) == SQLITE_ROW) {
		*percent = sqlite3_column_int(s, 0);
		*min_spend = sqlite3_column_double(s, 1);
		*expires = sqlite3_column_int64(s, 2);
		if (sqlite3_column_type(s, 3) != SQLITE_NULL)
			why = "already_used";
		else if (*expires < now)
			why = "expired";
		else if (total >= 0 && total < *min_spend)
			why = "below_minimum";
		else
			why = "ok";
	}
	sqlite3_reset(s);
	return why;
}

/* ==== Catalog and order imports (CSV) ================================= */
/*
 * `remarket import products|orders FILE [--rejects R] [--dry-run]`: RFC
 * 4180 records (quoted fields, doubled quotes, CRLF or LF, newlines
 * inside quotes), separated by ',', ';' or tabs as the header line is,
 * after a UTF-8 byte order mark or not (what Excel saves). Neither
 * SQLite's library nor the others here parse CSV, so this small reader
 * is ours. The first record must name the columns, checked against one
 * {name, kind, need, param} table per import; a file without it imports
 * nothing. A refusal is said with the file's line and the column as
 * the header names it, never as the JSON path of the event the line
 * became (csv_reason). Each row becomes an event
 * built by SQLite's json_object and goes through ev_ingest, the same
 * validation as every other door. One shortcut, for speed: an order whose
 * every line passes imp_line_plain (the same validators, applied to the
 * CSV's values) is handed to ev_apply without its JSON being parsed
 * back, in transactions short enough that hooks keep answering. Either
 * way the store's tables are written by the event path's statements only;
 * the importer itself writes its scratch tables in the temp database.
 */

#define CSV_FIELDS 256 /* a shop's export may have seventy columns */

/* A CSV file as it is read: the separator its header line uses, and the
 * line each record begins on, for messages. */
struct csv {
	FILE *f;
	int sep;           /* ',', ';' or '\t' */
	long line;         /* the line the last record began on (1: the header) */
	long next;         /* the line the next record begins on */
	const char *error; /* why csv_record returned -1 */
};

/* Reads one record; fields point into B. Returns the field count, 0 at
 * the end of the file, -1 for a record that is no CSV (c->error says why:
 * a quote never closed, a NUL byte, too many fields). Reading goes on
 * after it: after the record, or, for a quote never closed (or one that
 * spans lines only to close inside a field), on the line after the one
 * it opened on (c->line), so that one stray quote does not swallow the
 * rest of the file (a file that cannot seek, a pipe, stops there). */
static int csv_record(struct csv *c, struct buf *b, const char **fields)
{
	size_t starts[CSV_FIELDS];
	int n = 0, ch, quoted = 0, any = 0;
	long qline = 0, resume = -1; /* where a quote opened; the line after */
	const char *bad = NULL;
	c->error = NULL;
	c->line = c->next;
	buf_reset(b);
	starts[n++] = 0;
	while ((ch = getc(c->f)) != EOF) {
		any = 1;
		if (ch == '\0') {
			bad = "a NUL byte"; /* it would cut the field short unseen */
		} else if (quoted) { /* all is text, up to the closing quote */
			if (ch == '"') {
				int d = getc(c->f);
				/* a quote that spans lines and ends inside a
				 * field closes nothing: it paired with a stray
				 * quote lines below */
				if (d != '"' && d != EOF && d != c->sep && d != '\n' &&
				    d != '\r' && resume >= 0)
					break;
				if (d != '"') {
					quoted = 0;
					if (d != EOF)
						ungetc(d, c->f);
					continue;
				}
			} else if (ch == '\n') {
				c->next++;
				if (resume < 0)
					resume = ftell(c->f);
			}
		} else if (ch == '"' && b->len == starts[n - 1]) {
			/* only a field's first character opens a quote (RFC
			 * 4180); one inside a field is text: TV 55" screen */
			quoted = 1, qline = c->next, resume = -1;
			continue;
		} else if (ch == c->sep) {
			if (n == CSV_FIELDS) {
				bad = "more than 256 fields";
				continue;
			}
			buf_add(b, "", 1);
			starts[n++] = b->len;
			continue;
		} else if (ch == '\n') {
			c->next++;
			break;
		} else if (ch == '\r') {
			continue;
		}
		buf_add(b, &(char){(char)ch}, 1);
	}
	if (quoted) {
		c->line = qline;
		c->error = "a quote (\") opened on this line is never closed";
		if (resume >= 0 && fseek(c->f, resume, SEEK_SET) == 0)
			c->next = qline + 1;
		return -1;
	}
	if (!any)
		return 0;
	buf_add(b, "", 1);
	if (!bad && buf_failed(b))
		bad = "out of memory"; /* no field may point into a buffer that lost bytes */
	if (bad) {
		c->error = bad;
		return -1;
	}
	for (int i = 0; i < n; i++)
		fields[i] = b->data + starts[i];
	return n;
}

/* The separator of a header line: the most frequent of ',', ';' and tab
 * outside quotes (Excel writes ';' where the decimal mark is a comma),
 * ',' when it has none. */
static int csv_sep(const char *line, size_t len)
{
	static const char seps[] = ",;\t";
	size_t count[3] = {0, 0, 0};
	int quoted = 0;
	for (size_t i = 0; i < len && line[i] != '\n'; i++) {
		const char *at = strchr(seps, line[i]);
		if (line[i] == '"')
			quoted = !quoted;
		else if (!quoted && line[i] && at)
			count[at - seps]++;
	}
	int best = 0;
	for (int k = 1; k < 3; k++)
		if (count[k] > count[best])
			best = k;
	return seps[best];
}

/* Starts reading F: skips a UTF-8 byte order mark (Excel's "CSV UTF-8"
 * begins with one), takes the separator from the header line and reads
 * the header into HB and HDR. Returns its field count, 0 for an empty
 * file, -1 (c->error) for a header that is no CSV. */
static int csv_open(struct csv *c, FILE *f, struct buf *hb, const char **hdr)
{
	char *line = NULL;
	size_t cap = 0;
	ssize_t len = getline(&line, &cap, f);
	*c = (struct csv){f, ',', 1, 1, NULL};
	if (len <= 0) {
		free(line);
		return 0;
	}
	size_t bom = len >= 3 && !memcmp(line, "\xEF\xBB\xBF", 3) ? 3 : 0;
	c->sep = csv_sep(line + bom, (size_t)len - bom);
	/* the header is read from its own line: a file read from a pipe
	 * cannot be read twice */
	FILE *h = len > (ssize_t)bom ? fmemopen(line + bom, (size_t)len - bom, "r")
				     : NULL;
	int nh = 0;
	if (h) {
		c->f = h;
		nh = csv_record(c, hb, hdr);
		fclose(h);
		c->f = f;
	}
	free(line);
	c->line = 1, c->next = 2;
	return nh;
}

/* The index of column NAME in the header, or -1. */
static int csv_col(const char **hdr, int n, const char *name)
{
	for (int i = 0; i < n; i++)
		if (!strcasecmp(trim((char *)hdr[i]), name))
			return i;
	return -1;
}

static const char *csv_val(const char **row, int n, int col)
{
	return col >= 0 && col < n && *row[col] ? row[col] : NULL;
}

static void bind_num(sqlite3_stmt *s, int i, const char *v, int integer)
{
	char *end;
	double d = v ? strtod(v, &end) : 0;
	if (v && !*end && isfinite(d)) {
		if (integer)
			sqlite3_bind_int64(s, i, (int64_t)d);
		else
			sqlite3_bind_double(s, i, d);
	} else if (v) {
		sqlite3_bind_text(s, i, v, -1, SQLITE_TRANSIENT); /* refused later */
	}
}

/* The columns of an import, described once: the header name, how the
 * value is converted, whether the header must name it, and the import
 * statement's parameter it binds. A column the file lacks, or an empty
 * value, binds NULL; the event built from the row then goes through
 * ev_ingest, which refuses what is missing or malformed. */
enum csv_kind {
	CSV_TEXT,   /* bound as it is */
	CSV_IDENT,  /* an id (sku, order_id): bound as it is, val_ident later */
	CSV_NUMBER, /* a decimal; anything else is bound as text, refused later */
	CSV_INT,    /* a whole number, likewise */
	CSV_TIME,   /* ISO 8601 or Unix seconds; else the row is refused here */
	CSV_FLAG,   /* 1, true or yes (any case): 1; anything else: 0 */
};
enum csv_need {
	CSV_MUST, /* the header must name it */
	CSV_WANT, /* expected: the synopsis lists it, the header may lack it */
	CSV_MAY,  /* optional */
};
struct csv_column {
	const char *name;
	enum csv_kind kind;
	enum csv_need need;
	int param; /* ?N of the import statement */
	const char *alias; /* the name a common export gives it, or NULL */
};

static const struct csv_column product_columns[] = {
	{"sku", CSV_IDENT, CSV_MUST, 1, NULL},
	{"name", CSV_TEXT, CSV_WANT, 2, NULL},
	{"price", CSV_NUMBER, CSV_WANT, 3, NULL},
	{"url", CSV_TEXT, CSV_WANT, 4, NULL},
	{"image", CSV_TEXT, CSV_WANT, 5, NULL},
	{"category", CSV_TEXT, CSV_WANT, 6, NULL},
	{"review_author", CSV_TEXT, CSV_MAY, 7, NULL},
	{"review_rating", CSV_INT, CSV_MAY, 8, NULL},
	{"review_text", CSV_TEXT, CSV_MAY, 9, NULL},
	{"kind", CSV_TEXT, CSV_MAY, 10, NULL}, /* product or service */
	{"brand", CSV_TEXT, CSV_MAY, 11, NULL},
};
#define PRODUCT_COLUMNS (sizeof product_columns / sizeof product_columns[0])

/* The aliases are the columns of the usual "online retail" export
 * (InvoiceNo, StockCode, Description, Quantity, InvoiceDate, UnitPrice,
 * CustomerID, Country; Country is not used). */
static const struct csv_column order_columns[] = {
	{"order_id", CSV_IDENT, CSV_MUST, 1, "InvoiceNo"},
	{"email", CSV_TEXT, CSV_WANT, 2, NULL},
	{"date", CSV_TIME, CSV_MUST, 3, "InvoiceDate"},
	{"sku", CSV_IDENT, CSV_MUST, 4, "StockCode"},
	{"name", CSV_TEXT, CSV_WANT, 5, "Description"},
	{"price", CSV_NUMBER, CSV_WANT, 6, "UnitPrice"},
	{"qty", CSV_INT, CSV_WANT, 7, "Quantity"},
	{"currency", CSV_TEXT, CSV_MAY, 8, NULL},
	{"consent", CSV_FLAG, CSV_MAY, 9, NULL},
	{"customer_id", CSV_IDENT, CSV_MAY, 11, "CustomerID"},
};
#define ORDER_COLUMNS (sizeof order_columns / sizeof order_columns[0])

/* "a,b,c[,d,e]": the columns a header names, the optional in brackets. */
static void csv_synopsis(const struct csv_column *cols, size_t ncols,
			 struct buf *out)
{
	int first = 1, opt = 0;
	for (size_t i = 0; i < ncols; i++)
		if (cols[i].need != CSV_MAY) {
			buf_addf(out, "%s%s", first ? "" : ",", cols[i].name);
			first = 0;
		}
	for (size_t i = 0; i < ncols; i++)
		if (cols[i].need == CSV_MAY)
			buf_addf(out, "%s%s", opt++ ? "," : "[,", cols[i].name);
	if (opt)
		buf_adds(out, "]");
}

/* What an import is told: the file's name for its messages (NULL: "CSV"),
 * where refused order lines go, whether it only checks. */
struct import_opts {
	const char *name;
	FILE *rejects;
	int dry_run;
};

static const char *imp_name(const struct import_opts *o)
{
	return o && o->name ? o->name : "CSV";
}

/* Finds each column in the header: AT[i] is its field, or -1. Returns 0;
 * or says what is wrong, with the columns the first line must name, and
 * returns -1: an empty file, a header that is no CSV, one that names
 * none of the columns (a file without its header: its first line of data
 * must not be taken for one), a CSV_MUST column missing. */
static int csv_header(const struct csv_column *cols, size_t ncols,
		      const struct csv *c, const char **hdr, int nh, int *at,
		      const char *file)
{
	int found = 0, rc = 0;
	for (size_t i = 0; i < ncols; i++) {
		at[i] = nh > 0 ? csv_col(hdr, nh, cols[i].name) : -1;
		if (at[i] < 0 && nh > 0 && cols[i].alias)
			at[i] = csv_col(hdr, nh, cols[i].alias);
		found += at[i] >= 0;
	}
	if (nh < 0)
		fprintf(stderr, "remarket import: %s line 1: %s\n", file, c->error);
	else if (nh == 0)
		fprintf(stderr, "remarket import: %s: empty\n", file);
	else if (!found)
		fprintf(stderr, "remarket import: %s: line 1 names none of the "
			"columns: a file without its header line?\n", file);
	for (size_t i = 0; found && i < ncols; i++)
		if (at[i] < 0 && cols[i].need == CSV_MUST) {
			fprintf(stderr, "remarket import: %s: missing column '%s'%s%s%s\n",
				file, cols[i].name, cols[i].alias ? " (or its alias '" : "",
				cols[i].alias ? cols[i].alias : "",
				cols[i].alias ? "')" : "");
			rc = -1;
		}
	if (found && !rc)
		return 0;
	struct buf syn = {0};
	csv_synopsis(cols, ncols, &syn);
	fprintf(stderr, "remarket import: %s: the first line must name the "
		"columns, separated by ',', ';' or tabs: %s\n", file, buf_str(&syn));
	buf_free(&syn);
	return -1;
}

/* An event's refusal in the words of the CSV: "items[2].qty: must be..."
 * becomes "Quantity: must be..." (the header's name of the column) with
 * *ITEM = 2, the line of the order it is about (-1: the order, its first
 * line); "ts" is the date column, "review" the review_ ones, "items"
 * and "total" the order's. */
static void csv_reason(const char *msg, const struct csv_column *cols,
		       size_t ncols, const char **hdr, const int *at, char *out,
		       size_t n, long *item)
{
	const char *rest = msg;
	char *end;
	*item = -1;
	if (!strncmp(msg, "items[", 6) && isdigit((unsigned char)msg[6])) {
		long k = strtol(msg + 6, &end, 10);
		if (*end == ']' && (end[1] == '.' || end[1] == ':')) {
			*item = k;
			rest = end + 1 + (end[1] == '.');
			if (*rest == ':') { /* "items[0]: needs sku and price" */
				copy_str(out, n, rest + 1 + (rest[1] == ' '));
				return;
			}
		}
	}
	size_t k = strcspn(rest, ":");
	const char *key = !strncmp(rest, "ts", k) && k == 2 ? "date" : NULL;
	if (!strncmp(rest, "body", k) && k == 4 && strstr(rest, "UTF-8")) {
		copy_str(out, n, "not UTF-8 text: save the file as \"CSV UTF-8\"");
		return;
	}
	static const char *const whole[][2] = { /* no one column's */
		{"review", "review_author, review_rating, review_text"},
		{"items", "the order's lines"},
		{"total", "the order's total (price x qty)"},
	};
	for (size_t i = 0; i < sizeof whole / sizeof whole[0]; i++)
		if (strlen(whole[i][0]) == k && !strncmp(rest, whole[i][0], k)) {
			snprintf(out, n, "%s%s", whole[i][1], rest + k);
			return;
		}
	for (size_t i = 0; i < ncols; i++)
		if (key ? !strcmp(cols[i].name, key) :
			  strlen(cols[i].name) == k && !strncmp(cols[i].name, rest, k)) {
			char col[64];
			copy_str(col, sizeof col, at[i] >= 0 ? hdr[at[i]] : cols[i].name);
			snprintf(out, n, "%s%s", trim(col), rest + k);
			return;
		}
	copy_str(out, n, rest);
}

/* Binds one row's values to S by the table. Returns -1 before binding
 * anything if a CSV_TIME value is missing or no time (the column's index
 * in *BAD), else 0. */
static int csv_bind(sqlite3_stmt *s, const struct csv_column *cols,
		    size_t ncols, const int *at, const char **row, int n,
		    rm_time now, size_t *bad)
{
	for (size_t i = 0; i < ncols; i++) {
		const char *v = csv_val(row, n, at[i]);
		if (cols[i].kind == CSV_TIME && (!v || parse_time(v, now) < 0)) {
			/* never "now": an old order must not pass for a new one */
			*bad = i;
			return -1;
		}
	}
	for (size_t i = 0; i < ncols; i++) {
		const char *v = csv_val(row, n, at[i]);
		int p = cols[i].param;
		if (!v)
			continue;
		switch (cols[i].kind) {
		case CSV_NUMBER:
		case CSV_INT:
			bind_num(s, p, v, cols[i].kind == CSV_INT);
			break;
		case CSV_TIME:
			sqlite3_bind_int64(s, p, parse_time(v, now));
			break;
		case CSV_FLAG:
			sqlite3_bind_int(s, p, !strcasecmp(v, "1") ||
						      !strcasecmp(v, "true") ||
						      !strcasecmp(v, "yes"));
			break;
		case CSV_TEXT:
		case CSV_IDENT:
			sqlite3_bind_text(s, p, v, -1, SQLITE_TRANSIENT);
			break;
		}
	}
	return 0;
}

/* What an import refused, by reason (the first IMP_REASONS reasons;
 * the rest under "other"): lines, orders and their revenue, and every
 * refused order line written to REJECTS (CSV) when set. */
#define IMP_REASONS 24
struct imp_refusals {
	FILE *rejects;
	/* what imp_one_slow needs to say a refusal in the CSV's words */
	const char *file, **hdr;
	const int *at;
	int dry_run;
	size_t n;
	struct {
		char why[160], last[65]; /* LAST: the order last counted */
		long lines, orders;
		double revenue;
	} r[IMP_REASONS];
};

/* Set by import_orders while it runs (imp_one_slow reads it, through the
 * batch retries), NULL otherwise. */
static struct imp_refusals *imp_rf;

static void csv_put(FILE *f, const char *v, int last)
{
	if (v && v[strcspn(v, ",\"\r\n")]) {
		fputc('"', f);
		for (; *v; v++) {
			if (*v == '"')
				fputc('"', f);
			fputc(*v, f);
		}
		fputc('"', f);
	} else if (v) {
		fputs(v, f);
	}
	fputc(last ? '\n' : ',', f);
}

/* Counts one refused line of order ID (its revenue QTY x PRICE) under
 * WHY, and writes it to the rejects file. */
static void imp_refuse(struct imp_refusals *rf, const char *why,
		       const char *id, const char *sku, const char *name,
		       const char *qty, const char *price, const char *date,
		       const char *cid)
{
	size_t i = 0;
	while (i < rf->n && strcmp(rf->r[i].why, why) &&
	       strcmp(rf->r[i].why, "other"))
		i++;
	if (i == rf->n) {
		if (rf->n == IMP_REASONS)
			i = rf->n - 1; /* full: the last slot became "other" */
		else {
			i = rf->n++;
			copy_str(rf->r[i].why, sizeof rf->r[i].why,
				 rf->n == IMP_REASONS ? "other" : why);
		}
	}
	rf->r[i].lines++;
	if (!id || strcmp(rf->r[i].last, id)) {
		rf->r[i].orders++;
		copy_str(rf->r[i].last, sizeof rf->r[i].last, id ? id : "");
	}
	if (qty && price)
		rf->r[i].revenue += strtod(qty, NULL) * strtod(price, NULL);
	if (!rf->rejects)
		return;
	const char *v[] = {id, sku, name, qty, price, date, cid};
	for (size_t k = 0; k < sizeof v / sizeof v[0]; k++)
		csv_put(rf->rejects, v[k], 0);
	csv_put(rf->rejects, why, 1);
}

/* The refusals by reason, on stderr: for orders with the orders and
 * revenue they cost. */
static void imp_summary(const struct imp_refusals *rf, int orders)
{
	for (size_t i = 0; i < rf->n; i++)
		if (orders)
			fprintf(stderr, "remarket import: refused: %ld line%s, %ld "
				"order%s, revenue %.2f: %s\n", rf->r[i].lines,
				rf->r[i].lines == 1 ? "" : "s", rf->r[i].orders,
				rf->r[i].orders == 1 ? "" : "s", rf->r[i].revenue,
				rf->r[i].why);
		else
			fprintf(stderr, "remarket import: refused: %ld line%s: %s\n",
				rf->r[i].lines, rf->r[i].lines == 1 ? "" : "s",
				rf->r[i].why);
}

/* The counts on stdout: what was imported, or would be (--dry-run). */
static void imp_counts(const struct import_opts *o, long ok, long bad)
{
	if (o->dry_run)
		printf("{\"dry_run\":true,\"would_import\":%ld,\"refused\":%ld}\n",
		       ok, bad);
	else
		printf("{\"imported\":%ld,\"refused\":%ld}\n", ok, bad);
}

/* One product row, as an event through ev_ingest (only its checks, for a
 * dry run); 0, or -1 with why it was refused, in the CSV's words, in WHY. */
static int import_product(struct app *app, const struct import_opts *o,
			  const char **hdr, const int *at, const char **row,
			  int n, rm_time now, struct buf *ev, char *why,
			  size_t whylen)
{
	struct ev_error err;
	size_t badcol;
	long item;
	sqlite3_stmt *s = q(app->db, ST_IMP_PRODUCT, NULL);
	csv_bind(s, product_columns, PRODUCT_COLUMNS, at, row, n, now,
		 &badcol); /* no time column: never refuses */
	buf_reset(ev);
	if (json_from(app->db, s, ev) < 0) {
		copy_str(why, whylen, "out of memory");
		return -1;
	}
	int rc = o->dry_run ? ev_check(app, ev->data, ev->len, now, &err) :
			      ev_ingest(app, EV_CLI, ev->data, ev->len, NULL, now, &err);
	if (rc >= 0)
		return 0;
	csv_reason(err.msg, product_columns, PRODUCT_COLUMNS, hdr, at, why,
		   whylen, &item);
	return -1;
}

static int import_products_csv(struct app *app, FILE *f, rm_time now,
			       const struct import_opts *o)
{
	const char *hdr[CSV_FIELDS], *row[CSV_FIELDS], *file = imp_name(o);
	struct buf hb = {0}, rb = {0}, ev = {0};
	struct csv c;
	int nh = csv_open(&c, f, &hb, hdr), at[PRODUCT_COLUMNS];
	if (csv_header(product_columns, PRODUCT_COLUMNS, &c, hdr, nh, at, file) < 0) {
		buf_free(&hb);
		return 1;
	}
	struct imp_refusals *rf = calloc(1, sizeof *rf);
	long ok = 0, bad = 0;
	for (int n; rf && (n = csv_record(&c, &rb, row)) != 0;) {
		char why[160];
		if (n == 1 && !*row[0])
			continue; /* a blank line */
		if (n > 0 && import_product(app, o, hdr, at, row, n, now, &ev, why,
					    sizeof why) == 0) {
			ok++;
			continue;
		}
		if (n < 0)
			copy_str(why, sizeof why, c.error);
		if (++bad <= 20)
			fprintf(stderr, "remarket import: %s line %ld: %s\n", file,
				c.line, why);
		imp_refuse(rf, why, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
	}
	if (rf)
		imp_summary(rf, 0);
	else
		fprintf(stderr, "remarket import: out of memory\n"), bad++;
	imp_counts(o, ok, bad);
	free(rf);
	buf_free(&hb), buf_free(&rb), buf_free(&ev);
	return bad ? 1 : 0;
}

int import_products(struct app *app, FILE *f, rm_time now)
{
	struct import_opts o = {NULL, NULL, 0};
	return import_products_csv(app, f, now, &o);
}

/* 1 when every value of an order line certainly passes ev_parse's checks
 * of an order event (its fields and its item), so the order may take the
 * direct path of import_orders; 0 when in doubt. The checks are
 * ev_field's and ev_item_field's, with the same validators; a change of
 * what an order event may carry must be made here too (a line that says 0
 * loses nothing: its order goes through ev_ingest, which says what is
 * wrong). */
static int imp_line_plain(const int *at, const char **row, int n,
			  long qty_cap)
{
	const char *id = csv_val(row, n, at[0]), *email = csv_val(row, n, at[1]);
	const char *sku = csv_val(row, n, at[3]), *name = csv_val(row, n, at[4]);
	const char *price = csv_val(row, n, at[5]), *qty = csv_val(row, n, at[6]);
	const char *cur = csv_val(row, n, at[7]), *cid = csv_val(row, n, at[9]);
	const char *text[] = {id, email, sku, name, cur, cid};
	for (size_t i = 0; i < sizeof text / sizeof text[0]; i++)
		if (text[i] && !val_utf8(text[i], strlen(text[i])))
			return 0; /* ev_ingest: "body: not valid UTF-8 text" */
	if (!id || !check_field(FC_IDENT, id, 64) ||
	    (email && !check_field(FC_EMAIL, email, 254)) ||
	    (cur && !check_field(FC_CURRENCY, cur, 3)) ||
	    (cid && !check_field(FC_IDENT, cid, 64)) ||
	    !sku || !val_sku(sku) || (name && !val_text(name, 200)) || !price)
		return 0;
	char *end;
	double d = strtod(price, &end); /* as bind_num converts it */
	if (*end || !isfinite(d) || d < 0 || d > 1e7)
		return 0;
	if (qty) { /* a missing qty is 1; bind_num keeps the whole part */
		d = strtod(qty, &end);
		if (*end || !isfinite(d) || d < 1 || d >= (double)qty_cap + 1)
			return 0;
	}
	return 1;
}

void (*import_committed)(struct app *app, long orders);

/* The cancellation lines of an order import ('C' invoices: a negative
 * qty), kept aside and applied after the orders as refunds. */
struct imp_cancel {
	char id[72], email[256], sku[72];
	double amount;
	rm_time ts;
	int orphan; /* no order of that customer and SKU to refund */
};
struct imp_cancels {
	struct imp_cancel *v;
	size_t n, cap;
};

/* 1 if the row is a cancellation line (a negative qty): kept in C for
 * imp_cancellations, not imported as an order line; else 0. */
static int imp_cancellation(const int *at, const char **row, int n,
			    rm_time now, struct imp_cancels *c)
{
	const char *qty = csv_val(row, n, at[6]), *price = csv_val(row, n, at[5]);
	const char *date = csv_val(row, n, at[2]);
	char *end;
	double q = qty ? strtod(qty, &end) : 0;
	if (!qty || *end || !(q < 0))
		return 0;
	if (c->n == c->cap) {
		size_t cap = c->cap ? 2 * c->cap : 64;
		struct imp_cancel *v = realloc(c->v, cap * sizeof *v);
		if (!v)
			return 0; /* refused as an order line, as before */
		c->v = v, c->cap = cap;
	}
	struct imp_cancel *x = &c->v[c->n++];
	x->orphan = 0;
	copy_str(x->id, sizeof x->id, csv_val(row, n, at[0]) ? csv_val(row, n, at[0]) : "");
	copy_str(x->email, sizeof x->email, csv_val(row, n, at[1]) ? csv_val(row, n, at[1]) : "");
	copy_str(x->sku, sizeof x->sku, csv_val(row, n, at[3]) ? csv_val(row, n, at[3]) : "");
	double p = price ? strtod(price, &end) : 0;
	x->amount = isfinite(p) && isfinite(q) ? fabs(p * q) : 0;
	x->ts = date ? parse_time(date, now) : now;
	return 1;
}

/* Applies the cancellation lines as refunds of the customer's order of
 * that SKU (ev_refund: once per line, so a re-import changes nothing);
 * a line with no such order is counted, and said. */
static void imp_cancellations(struct app *app, struct imp_cancels *c,
			      rm_time now)
{
	long refunds = 0, orphans = 0;
	for (size_t i = 0; i < c->n; i++) {
		struct imp_cancel *x = &c->v[i];
		char order[72] = "", rid[160];
		sqlite3_stmt *s = q(app->db, ST_REFUND_MATCH, "tti", x->email,
				    x->sku, (int64_t)(x->ts < 0 ? now : x->ts));
		if (sqlite3_step(s) == SQLITE_ROW)
			copy_str(order, sizeof order, col_text(s, 0));
		sqlite3_reset(s);
		snprintf(rid, sizeof rid, "%s:%s", x->id, x->sku);
		struct event e = {0};
		copy_str(e.type, sizeof e.type, "refund");
		e.order_id = order, e.refund_id = rid;
		e.amount = x->amount, e.has_amount = 1;
		e.ts = x->ts < 0 ? now : x->ts;
		if (!*order || db_begin(app->db) < 0) {
			orphans++;
			x->orphan = 1;
			continue;
		}
		int rc = ev_refund(app, &e);
		if (rc < 0 || db_commit(app->db) < 0) {
			db_rollback(app->db);
			orphans++;
			x->orphan = 1;
		} else {
			refunds += rc == 0;
		}
	}
	if (c->n)
		fprintf(stderr, "remarket import: %zu cancellation lines: %ld "
			"refunds of their orders, %ld cancellation: no matching "
			"order\n", c->n, refunds, orphans);
}

/* A write transaction of import_orders: its first order's number, the
 * orders it imported, when it began (monotonic microseconds). */
struct imp_batch {
	int open;
	int64_t first;
	long ok;
	int64_t began;
};

#define IMP_BATCH_ORDERS 500  /* orders a transaction at most, */
#define IMP_BATCH_US 10000    /* or 10 ms, whichever comes first; */
#define IMP_YIELD_PCT 50      /* then the lock is left free half as long */

static int64_t mono_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

/* Every line of order number SEQ, refused with WHY. */
static void imp_refuse_order(struct app *app, int64_t seq, const char *why)
{
	if (!imp_rf)
		return;
	sqlite3_stmt *s = q(app->db, ST_IMP_ORDER_LINES, "i", seq);
	while (sqlite3_step(s) == SQLITE_ROW) {
		char date[32] = "";
		time_t t = (time_t)sqlite3_column_int64(s, 5);
		struct tm tm;
		if (gmtime_r(&t, &tm))
			strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", &tm);
		const char *cid = sqlite3_column_type(s, 6) == SQLITE_NULL ? NULL :
				  col_text(s, 6);
		imp_refuse(imp_rf, why, col_text(s, 0), col_text(s, 1),
			   col_text(s, 2), col_text(s, 3), col_text(s, 4), date, cid);
	}
	sqlite3_reset(s);
}

/* The file's line of line ITEM (0: the first) of order number SEQ, or of
 * its first line if ITEM < 0. */
static long imp_order_line(struct app *app, int64_t seq, long item)
{
	sqlite3_stmt *s = q(app->db, ST_IMP_ORDER_LINES, "i", seq);
	long line = 0;
	for (long k = 0; sqlite3_step(s) == SQLITE_ROW; k++)
		if (k == (item < 0 ? 0 : item)) {
			line = (long)sqlite3_column_int64(s, 7);
			break;
		}
	sqlite3_reset(s);
	return line;
}

/* Order number SEQ through ev_ingest, in a transaction of its own, as
 * any event: the path for an order in doubt, and the retry of a batch
 * that failed. Returns 0, or 1 past the last order. */
static int imp_one_slow(struct app *app, int64_t seq, rm_time now,
			struct buf *tmp, long *ok, long *bad)
{
	sqlite3_stmt *s = q(app->db, ST_IMP_ORDER, "i", seq);
	int end = sqlite3_step(s) != SQLITE_ROW || sqlite3_column_int64(s, 8) == 0;
	char what[96];
	snprintf(what, sizeof what, "order %.64s", col_text(s, 0));
	buf_reset(tmp);
	buf_adds(tmp, col_text(s, 1)); /* copied out: ingest writes */
	sqlite3_reset(s);
	if (end)
		return 1;
	if (buf_failed(tmp)) {
		if (++*bad <= 20)
			fprintf(stderr, "remarket import: %s: out of memory\n", what);
		return 0;
	}
	struct ev_error err;
	int dry = imp_rf && imp_rf->dry_run;
	if ((dry ? ev_check(app, tmp->data, tmp->len, now, &err) :
		   ev_ingest(app, EV_CLI, tmp->data, tmp->len, NULL, now, &err)) >= 0) {
		(*ok)++;
		return 0;
	}
	char why[sizeof err.msg];
	long item = -1;
	if (imp_rf) /* "items[1].qty" is the column qty of the order's 2nd line */
		csv_reason(err.msg, order_columns, ORDER_COLUMNS, imp_rf->hdr,
			   imp_rf->at, why, sizeof why, &item);
	else
		copy_str(why, sizeof why, err.msg);
	if (++*bad <= 20)
		fprintf(stderr, "remarket import: %s line %ld: %s (%s)\n",
			imp_rf ? imp_rf->file : "CSV", imp_order_line(app, seq, item),
			why, what);
	imp_refuse_order(app, seq, why);
	return 0;
}

/* Ends the open batch: commits it, or, if that fails, imports its
 * orders again one by one through ev_ingest, which says what failed. */
static void imp_batch_end(struct app *app, struct imp_batch *b, int64_t last,
			  rm_time now, struct buf *tmp, long *ok, long *bad)
{
	if (!b->open)
		return;
	b->open = 0;
	if (db_commit(app->db) < 0) {
		db_rollback(app->db);
		*ok -= b->ok;
		for (int64_t k = b->first; k <= last; k++)
			imp_one_slow(app, k, now, tmp, ok, bad);
	}
	if (import_committed)
		import_committed(app, *ok);
	/* a hook that found the database busy sleeps and tries again (SQLite's
	 * busy handler: 1, 2, 5, 10 ms... apart); were the lock taken again at
	 * once it would rarely find it free. So the import leaves it free
	 * for a while, in proportion to how long it held it. */
	int64_t held = mono_us() - b->began;
	struct timespec gap = {0, (long)(held * IMP_YIELD_PCT / 100 * 1000)};
	if (gap.tv_nsec > 0 && gap.tv_nsec < 1000000000L)
		nanosleep(&gap, NULL);
}

/* The order event of the row of IMP_ORDER in S, for ev_apply: its strings
 * copied into ARENA (the row is reset before the order is applied). */
static int imp_event(sqlite3_stmt *s, struct buf *arena, struct event *e)
{
	/* id email currency items text customer_id */
	static const int cols[] = {0, 2, 4, 7, 1, 10};
	size_t off[6];
	buf_reset(arena);
	for (size_t i = 0; i < 6; i++) {
		off[i] = arena->len;
		buf_adds(arena, col_text(s, cols[i]));
		buf_add(arena, "", 1);
	}
	if (buf_failed(arena))
		return -1;
	memset(e, 0, sizeof *e);
	copy_str(e->type, sizeof e->type, "order");
	e->order_id = arena->data + off[0];
	/* no email: a guest's order, no contact (ev_contact) */
	e->email = sqlite3_column_type(s, 2) == SQLITE_NULL ? NULL :
		   arena->data + off[1];
	e->customer_id = sqlite3_column_type(s, 10) == SQLITE_NULL ? NULL :
			 arena->data + off[5];
	e->currency = arena->data + off[2];
	e->items = arena->data + off[3];
	e->text = arena->data + off[4];
	e->ts = sqlite3_column_int64(s, 3);
	e->consent = sqlite3_column_type(s, 5) == SQLITE_NULL ? -1 :
		     sqlite3_column_int(s, 5) != 0;
	e->total = sqlite3_column_double(s, 6);
	e->has_total = 1;
	e->nitems = (long)sqlite3_column_int64(s, 8);
	return 0;
}

/* `remarket import orders`: checks the header against order_columns, puts
 * the rows in a scratch table (in the temp database: the store's stays
 * free), then ingests one order event per order_id, by date.
 *
 * Fast, and never in the way of the hooks: an order whose every line
 * passed imp_line_plain (nearly all of them) is not turned into JSON and
 * parsed back: its event is applied by ev_apply, the same statements as
 * an order that came to /events, in transactions of at most
 * IMP_BATCH_ORDERS orders or IMP_BATCH_US, after each of which the lock
 * is left free a while (IMP_YIELD_PCT) so that a waiting hook gets in.
 * Any other order goes through ev_ingest on its own, so its refusal
 * reads as it always did. A
 * re-import changes nothing: an order already recorded is a duplicate. */
static int import_orders_csv(struct app *app, FILE *f, rm_time now,
			     const struct import_opts *o);
int import_orders(struct app *app, FILE *f, rm_time now)
{
	struct import_opts o = {NULL, NULL, 0};
	return import_orders_csv(app, f, now, &o);
}

/* A line refused before its order is built: a cancellation invoice whose
 * line is not one (a negative qty is a refund: imp_cancellation took it
 * before), a quantity past import_max_qty. The rest of its order is
 * imported; the summary and REJECTS say what was left out. */
static const char *imp_line_refused(const int *at, const char **row, int n,
				    long cap, char *why, size_t whylen)
{
	const char *id = csv_val(row, n, at[0]), *qty = csv_val(row, n, at[6]);
	double d = qty ? strtod(qty, NULL) : 1;
	if (id && (*id == 'C' || *id == 'c') && isdigit((unsigned char)id[1]))
		return "cancellation: a C invoice line with a positive quantity";
	if (d > (double)cap) {
		snprintf(why, whylen, "qty: more than import_max_qty (%ld)", cap);
		return why;
	}
	return NULL;
}

/* Counts one line of the file refused before its order is built (WHY),
 * and says it with its line, for the first 20. */
static void imp_refuse_line(struct imp_refusals *rf, const struct csv *c,
			    const char *why, const char *say, const int *at,
			    const char **row, int n, long *bad)
{
	if (++*bad <= 20 && say)
		fprintf(stderr, "remarket import: %s line %ld: %s\n", rf->file,
			c->line, say);
	imp_refuse(rf, why, csv_val(row, n, at[0]), csv_val(row, n, at[3]),
		   csv_val(row, n, at[4]), csv_val(row, n, at[6]),
		   csv_val(row, n, at[5]), csv_val(row, n, at[2]),
		   csv_val(row, n, at[9]));
}

/* Reads the order lines of the file into temp.imp (with their line
 * numbers), in one transaction of the temp database; cancellation lines
 * go to CANCELS, and the lines refused here (no CSV, a bad date, a
 * C invoice line or a quantity past the cap) to RF. */
static void imp_read_lines(struct app *app, struct csv *c, const int *at,
			   rm_time now, struct imp_cancels *cancels,
			   struct imp_refusals *rf, long *bad)
{
	const char *row[CSV_FIELDS];
	struct buf rb = {0};
	struct db *db = app->db;
	long cap = app->cfg->import_max_qty;
	q_exec(db, q(db, ST_IMP_BEGIN, NULL)); /* one transaction of temp rows */
	for (int n; (n = csv_record(c, &rb, row)) != 0;) {
		if (n < 0) { /* a line that is no CSV: its own, the rest goes on */
			imp_refuse_line(rf, c, c->error, c->error, at, row, 0, bad);
			continue;
		}
		if (n == 1 && !*row[0])
			continue; /* a blank line */
		if (at[4] >= 0 && at[4] < n) { /* "RED " as exports pad names */
			char *nm = (char *)row[at[4]];
			for (size_t l = strlen(nm); l && nm[l - 1] == ' '; l--)
				nm[l - 1] = '\0';
		}
		if (imp_cancellation(at, row, n, now, cancels))
			continue; /* a refund, once the orders are in */
		char whyb[64], say[200];
		const char *why = imp_line_refused(at, row, n, cap, whyb, sizeof whyb);
		if (why) {
			imp_refuse_line(rf, c, why, NULL, at, row, n, bad);
			continue;
		}
		sqlite3_stmt *s = q(db, ST_IMP_INSERT, NULL);
		size_t k;
		if (csv_bind(s, order_columns, ORDER_COLUMNS, at, row, n, now, &k) < 0) {
			const char *v = csv_val(row, n, at[k]);
			snprintf(say, sizeof say, "%s: '%.40s' is not ISO 8601 "
				 "(2026-06-20T10:00:00Z, 2026-06-20T10:00:00+02:00) or "
				 "Unix seconds", rf->hdr[at[k] >= 0 ? at[k] : 0], v ? v : "");
			imp_refuse_line(rf, c, "date: not ISO 8601 or Unix seconds",
					at[k] >= 0 ? say : "no date", at, row, n, bad);
			continue;
		}
		sqlite3_bind_int(s, 10, imp_line_plain(at, row, n, cap));
		sqlite3_bind_int64(s, 12, c->line);
		q_exec(db, s);
	}
	q_exec(db, q(db, ST_IMP_INDEX, NULL));
	q_exec(db, q(db, ST_IMP_LIST_CREATE, NULL));
	q_exec(db, q(db, ST_IMP_LIST_CLEAR, NULL));
	q_exec(db, q(db, ST_IMP_LIST, NULL));
	q_exec(db, q(db, ST_COMMIT, NULL));
	buf_free(&rb);
}

/* Ingests the orders of temp.imp, by date: the direct path in batches,
 * the others one by one (see import_orders). A dry run applies nothing:
 * an order of the direct path passes every check; the others are
 * checked by ev_check. */
static void imp_apply(struct app *app, rm_time now, int dry_run, long *ok,
		      long *bad)
{
	struct db *db = app->db;
	struct buf arena = {0}, tmp = {0};
	struct imp_batch b = {0};
	int64_t seq = 1;
	for (;; seq++) {
		sqlite3_stmt *s = q(db, ST_IMP_ORDER, "i", seq);
		if (sqlite3_step(s) != SQLITE_ROW || sqlite3_column_int64(s, 8) == 0) {
			sqlite3_reset(s);
			break; /* past the last order */
		}
		struct event e;
		int direct = sqlite3_column_int(s, 9) == 1 &&
			     sqlite3_column_int64(s, 8) <= app->cfg->import_max_items &&
			     sqlite3_column_int64(s, 3) <= (int64_t)now + 300 &&
			     sqlite3_column_double(s, 6) <= 1e9 &&
			     imp_event(s, &arena, &e) == 0;
		sqlite3_reset(s);
		if (direct && dry_run) {
			(*ok)++;
			continue;
		}
		if (direct && !b.open) {
			if (db_begin(db) == 0)
				b = (struct imp_batch){1, seq, 0, mono_us()};
			else
				direct = 0; /* busy: ev_ingest waits and says so */
		}
		int dup;
		if (direct && ev_apply(app, &e, EV_CLI, NULL, now, &dup) < 0) {
			db_rollback(db); /* this batch again, the slow way */
			b.open = 0;
			*ok -= b.ok;
			for (int64_t k = b.first; k <= seq; k++)
				imp_one_slow(app, k, now, &tmp, ok, bad);
			continue;
		}
		if (!direct) {
			imp_batch_end(app, &b, seq - 1, now, &tmp, ok, bad);
			imp_one_slow(app, seq, now, &tmp, ok, bad);
			continue;
		}
		(*ok)++, b.ok++;
		if (b.ok >= IMP_BATCH_ORDERS || mono_us() - b.began >= IMP_BATCH_US)
			imp_batch_end(app, &b, seq, now, &tmp, ok, bad);
	}
	imp_batch_end(app, &b, seq - 1, now, &tmp, ok, bad);
	q_exec(db, q(db, ST_IMP_CLEAR, NULL));
	q_exec(db, q(db, ST_IMP_LIST_CLEAR, NULL));
	buf_free(&arena), buf_free(&tmp);
}

/* import_orders with O: the file's name for messages, every refused line
 * with its reason to O->rejects (CSV) when set, a dry run; a summary by
 * reason to stderr. */
static int import_orders_csv(struct app *app, FILE *f, rm_time now,
			     const struct import_opts *o)
{
	const char *hdr[CSV_FIELDS];
	struct buf hb = {0};
	struct csv c;
	int nh = csv_open(&c, f, &hb, hdr), at[ORDER_COLUMNS];
	if (csv_header(order_columns, ORDER_COLUMNS, &c, hdr, nh, at,
		       imp_name(o)) < 0) {
		buf_free(&hb);
		return 1;
	}
	long ok = 0, bad = 0;
	static struct imp_refusals rf;
	memset(&rf, 0, sizeof rf);
	rf.rejects = o->rejects;
	rf.file = imp_name(o), rf.hdr = hdr, rf.at = at, rf.dry_run = o->dry_run;
	if (o->rejects)
		fputs("order_id,sku,name,qty,price,date,customer_id,reason\n",
		      o->rejects);
	imp_rf = &rf;
	imp_qty_cap = app->cfg->import_max_qty;
	struct imp_cancels cancels = {0};
	q_exec(app->db, q(app->db, ST_IMP_CACHE, NULL));
	q_exec(app->db, q(app->db, ST_IMP_CREATE, NULL));
	q_exec(app->db, q(app->db, ST_IMP_CLEAR, NULL));
	imp_read_lines(app, &c, at, now, &cancels, &rf, &bad);
	imp_apply(app, now, o->dry_run, &ok, &bad);
	if (o->dry_run && cancels.n) /* their orders are not in: nothing to match */
		fprintf(stderr, "remarket import: %zu cancellation lines: refunds "
			"of their orders, matched when imported\n", cancels.n);
	else
		imp_cancellations(app, &cancels, now);
	/* a cancellation that refunds nothing is a refused line like any
	 * other: counted, summed by reason and written to --rejects */
	for (size_t i = 0; i < cancels.n; i++) {
		const struct imp_cancel *x = &cancels.v[i];
		char amt[32];
		if (!x->orphan)
			continue;
		snprintf(amt, sizeof amt, "%.2f", x->amount);
		imp_refuse(&rf, "cancellation: no matching order", x->id, x->sku,
			   "", "-1", amt, "", "");
		bad++;
	}
	free(cancels.v);
	imp_rf = NULL, imp_qty_cap = 0;
	imp_summary(&rf, 1);
	imp_counts(o, ok, bad);
	buf_free(&hb);
	return bad ? 1 : 0;
}

int import_orders_rejects(struct app *app, FILE *f, rm_time now,
			  FILE *rejects)
{
	struct import_opts o = {NULL, rejects, 0};
	return import_orders_csv(app, f, now, &o);
}

/* `remarket import products|orders FILE`, as the command line gives it. */
int import_file(struct app *app, int orders, FILE *f, rm_time now,
		const char *name, FILE *rejects, int dry_run)
{
	struct import_opts o = {name, rejects, dry_run};
	return orders ? import_orders_csv(app, f, now, &o)
		      : import_products_csv(app, f, now, &o);
}

/* ==== Segments ======================================================== */
/*
 * RFM segments (new, active, vip, at_risk, lapsed, lost), one name array
 * in enum segment's order. The win-back threshold comes from
 * winback_after, or is learned from repeat purchases (flow_lapse_days). A
 * step targets "", a segment, or "!" and one (segment_matches).
 * Segments are derived data: the table always holds what the reference
 * ST_SEGMENTS_FILL would write (flow_segments_full, kept for the tests).
 *
 * They are kept incrementally, because a tick must cost what changed,
 * not what the store has ever sold (seg_update; the bookkeeping is
 * segment_state, see sql/010_scale.sql). A segment is a function of the
 * customer's aggregates (orders, spent, last order), the quintile cut
 * points, the threshold and the clock, so it needs recomputing only for
 * the customers in segment_dirty: those with orders past the watermark
 * orders_seen, a future-dated order the clock has reached, a refund
 * (ev_refund), consent given back (a trigger), or a time boundary crossed since the last update
 * that found work (30 days for 'new'; at-risk, lapse and lost
 * thresholds; a win-back cool-down ending): index ranges on
 * segments.last_order and enrollments.created, empty on most ticks. The
 * cut points, and with winback_after = auto the threshold, are computed
 * outside any write transaction when the customers' orders changed; up
 * to SEG_EXACT_MAX customers at once (the scores are exactly ntile's),
 * above it once a day (scores may lag a day's orders). When a cut, the
 * threshold or the win-back flows change, every customer becomes dirty.
 * All writes go in chunks of about SEG_TXN_MS (struct pace), so the first
 * tick on a big store, or a daily refresh, never holds the lock long.
 * A tick with nothing changed reads a few index ranges and writes
 * nothing.
 */

/* A step's segment: "" (everyone), "vip" (only), "!vip" (all but). The
 * contact's is their named segment, except that a customer in the top
 * fifth by frequency and the top two by money counts as "vip" however
 * long they have been away: a lapsed VIP is still a VIP to a win-back. */
static int segment_matches(const char *want, const char *have)
{
	if (!*want)
		return 1;
	if (*want == '!')
		return strcmp(want + 1, have) != 0;
	return strcmp(want, have) == 0;
}

long flow_lapse_days(struct app *app, char *why, size_t whylen)
{
	const char *w = app->cfg->winback_after;
	if (strcmp(w, "auto") != 0) {
		long d = atol(w);
		if (d < 1)
			d = 90;
		snprintf(why, whylen, "set by winback_after = %ld", d);
		return d;
	}
	long gaps = 0;
	double p90 = 0;
	q_row(q(app->db, ST_LAPSE_GAPS, NULL), "ld", &gaps, &p90);
	if (gaps < 20) {
		snprintf(why, whylen, "winback_after = auto, but only %ld repeat "
			 "purchases to learn from (20 needed): the default 90", gaps);
		return 90;
	}
	long d = (long)(p90 / 86400 + 0.5);
	long clamped = d < 60 ? 60 : d > 180 ? 180 : d;
	snprintf(why, whylen, "winback_after = auto: 90 %% of %ld repeat purchases "
		 "came within %ld days%s", gaps, d,
		 clamped != d ? (d < 60 ? ", raised to the minimum of 60" :
				 ", lowered to the maximum of 180") : "");
	return clamped;
}

/* The reference recomputation of every customer's segment, as each tick
 * did before segments became incremental: one transaction, every order
 * read (ST_SEGMENTS_FILL). Kept for the tests, which hold the incremental
 * update to it; the bookkeeping (segment_state) is left as it is, since
 * the result is the same. */
int flow_segments_full(struct app *app, rm_time now)
{
	char why[200];
	int64_t lapse = (int64_t)flow_lapse_days(app, why, sizeof why) * 86400;
	if (db_begin(app->db) < 0)
		return -1;
	if (q_exec(app->db, q(app->db, ST_SEGMENTS_CLEAR, NULL)) ||
	    q_exec(app->db, q(app->db, ST_SEGMENTS_FILL, "ii", (int64_t)now, lapse)) ||
	    db_commit(app->db)) {
		db_rollback(app->db);
		return -1;
	}
	return 0;
}

#define SEG_EXACT_MAX 20000   /* up to this many customers, cuts stay exact */
#define SEG_CUTS_EVERY 86400  /* above it, cuts are refreshed once a day */
#define SEG_TXN_MS 10         /* what a chunk's write transaction aims at */

/* The size of the next chunk (customers, or orders when marking), from
 * how long the last one held the write lock: halved past SEG_TXN_MS,
 * doubled well under it, so a transaction stays near SEG_TXN_MS whatever
 * the machine and the cache. After a chunk that took a while, the tick
 * rests as long as the chunk took: a hook waiting in SQLite's busy
 * handler finds the lock free half of the time, not never. */
struct pace {
	int64_t n;
	struct timespec t0;
};

static void pace_start(struct pace *p)
{
	if (p->n < 16)
		p->n = 256;
	clock_gettime(CLOCK_MONOTONIC, &p->t0);
}

static void pace_end(struct pace *p)
{
	struct timespec t1;
	clock_gettime(CLOCK_MONOTONIC, &t1);
	int64_t us = (int64_t)(t1.tv_sec - p->t0.tv_sec) * 1000000 +
		     (t1.tv_nsec - p->t0.tv_nsec) / 1000;
	if (us > SEG_TXN_MS * 1000 && p->n > 16)
		p->n /= 2;
	else if (us < SEG_TXN_MS * 300 && p->n < 65536)
		p->n *= 2;
	struct timespec rest = {0, (long)(us < 50000 ? us : 50000) * 1000};
	if (us > 2000) /* a chunk of a large job, not a tick's few rows */
		nanosleep(&rest, NULL);
}

struct segstate {
	int have;
	int64_t orders_seen, now, lapse, cuts_at, customers, orders_max;
	int now_null, lapse_null, cuts_null, lapse_learned;
	int64_t stale; /* changes to the customers since the cuts */
	char cuts_key[512], flows[512];
};

static void seg_state(struct db *db, struct segstate *st)
{
	memset(st, 0, sizeof *st);
	sqlite3_stmt *s = q(db, ST_SEG_STATE, NULL);
	if (sqlite3_step(s) == SQLITE_ROW) {
		st->have = 1;
		st->orders_seen = sqlite3_column_int64(s, 0);
		st->now_null = sqlite3_column_type(s, 1) == SQLITE_NULL;
		st->now = sqlite3_column_int64(s, 1);
		st->lapse_null = sqlite3_column_type(s, 2) == SQLITE_NULL;
		st->lapse = sqlite3_column_int64(s, 2);
		st->cuts_null = sqlite3_column_type(s, 3) == SQLITE_NULL;
		st->cuts_at = sqlite3_column_int64(s, 3);
		st->stale = sqlite3_column_int64(s, 4);
		st->customers = sqlite3_column_int64(s, 5);
		copy_str(st->cuts_key, sizeof st->cuts_key, col_text(s, 6));
		copy_str(st->flows, sizeof st->flows, col_text(s, 7));
		st->orders_max = sqlite3_column_int64(s, 8);
		st->lapse_learned = sqlite3_column_int(s, 9);
	}
	sqlite3_reset(s);
}

/* Runs STMT(a, b), and SEG_STALE too if it changed rows, in a transaction
 * of its own; *CHANGED gets the rows changed. */
static int seg_write(struct db *db, sqlite3_stmt *s, int stale, long *changed)
{
	if (db_begin(db) < 0)
		return -1;
	int rc = q_exec(db, s);
	long n = rc ? 0 : (long)sqlite3_changes(db->h);
	rc = rc || (stale && n > 0 && q_exec(db, q(db, ST_SEG_STALE, NULL)));
	if (rc || db_commit(db)) {
		db_rollback(db);
		return -1;
	}
	if (changed)
		*changed += n;
	return 0;
}

/* Every customer with a row becomes dirty, a chunk at a time. */
static int seg_mark_all(struct db *db)
{
	struct pace p = {0};
	for (int64_t lo = 0;;) {
		pace_start(&p);
		sqlite3_stmt *s = q(db, ST_SEG_NTH, "ii", lo, p.n);
		int row = sqlite3_step(s) == SQLITE_ROW &&
			  sqlite3_column_type(s, 0) != SQLITE_NULL;
		int64_t hi = row ? sqlite3_column_int64(s, 0) : 0;
		sqlite3_reset(s);
		if (!row)
			return 0;
		if (seg_write(db, q(db, ST_SEG_MARK_RANGE, "ii", lo, hi), 0, NULL))
			return -1;
		pace_end(&p);
		lo = hi;
	}
}

/* The next chunk of N dirty customers after LO: its last id in *HI, 0
 * when none is left. */
static int seg_dirty_next(struct db *db, int64_t lo, int64_t n, int64_t *hi)
{
	sqlite3_stmt *s = q(db, ST_SEG_DIRTY_NTH, "ii", lo, n);
	int row = sqlite3_step(s) == SQLITE_ROW &&
		  sqlite3_column_type(s, 0) != SQLITE_NULL;
	*hi = row ? sqlite3_column_int64(s, 0) : 0;
	sqlite3_reset(s);
	return row;
}

/* New orders (past the watermark) and future orders now due make their
 * customers dirty; the dirty are recounted from their orders. */
static int seg_count_dirty(struct db *db, rm_time now, struct segstate *st)
{
	struct pace p = {0};
	for (int64_t wm = st->orders_seen; wm < st->orders_max;) {
		pace_start(&p);
		int64_t to = st->orders_max - wm > 4 * p.n ? wm + 4 * p.n :
							    st->orders_max;
		if (db_begin(db) < 0)
			return -1;
		if (q_exec(db, q(db, ST_SEG_MARK_ORDERS, "ii", wm, to)) ||
		    q_exec(db, q(db, ST_SEG_SEEN, "i", to)) || db_commit(db)) {
			db_rollback(db);
			return -1;
		}
		if (to < st->orders_max)
			pace_end(&p);
		wm = to;
	}
	if (db_scalar_stmt(q(db, ST_SEG_PENDING_ANY, "i", (int64_t)now)) == 1) {
		if (db_begin(db) < 0)
			return -1;
		if (q_exec(db, q(db, ST_SEG_PENDING_MARK, "i", (int64_t)now)) ||
		    q_exec(db, q(db, ST_SEG_PENDING_DONE, "i", (int64_t)now)) ||
		    db_commit(db)) {
			db_rollback(db);
			return -1;
		}
	}
	int64_t lo = 0, hi;
	for (pace_start(&p); seg_dirty_next(db, lo, p.n, &hi); pace_start(&p)) {
		long n = 0;
		if (db_begin(db) < 0)
			return -1;
		int rc = q_exec(db, q(db, ST_SEG_AGG, "iii", lo, hi, (int64_t)now));
		n += rc ? 0 : (long)sqlite3_changes(db->h);
		rc = rc || q_exec(db, q(db, ST_SEG_DROP, "iii", lo, hi, (int64_t)now));
		n += rc ? 0 : (long)sqlite3_changes(db->h);
		rc = rc || q_exec(db, q(db, ST_SEG_PENDING_SET, "iii", lo, hi,
					(int64_t)now));
		rc = rc || (n > 0 && q_exec(db, q(db, ST_SEG_STALE, NULL)));
		if (rc || db_commit(db)) {
			db_rollback(db);
			return -1;
		}
		pace_end(&p);
		lo = hi;
	}
	return 0;
}

/* The quintile cut points and the threshold, computed outside any write
 * transaction (index walks; with winback_after = auto a scan of every
 * order), then stored. *MOVED: a cut or the threshold changed, so every
 * customer is rescored. */
static int seg_cuts(struct app *app, rm_time now, struct segstate *st,
		    int64_t lapse, const char *why, int *moved)
{
	struct db *db = app->db;
	const enum stmt_id cut[3] = {ST_SEG_CUT_R, ST_SEG_CUT_F, ST_SEG_CUT_M};
	sqlite3_value *v[24] = {0};
	struct buf key = {0};
	int64_t n = db_scalar_stmt(q(db, ST_SEG_COUNT, NULL));
	int64_t qn = n / 5, rmd = n % 5;
	int rc = -1;
	for (int d = 0; d < 3; d++)
		for (int t = 1; t <= 4; t++) {
			int64_t off = t * qn + (t < rmd ? t : rmd);
			sqlite3_stmt *s = q(db, cut[d], "i", off);
			int i = d * 8 + (t - 1) * 2;
			if (sqlite3_step(s) == SQLITE_ROW) {
				v[i] = sqlite3_value_dup(sqlite3_column_value(s, 0));
				v[i + 1] = sqlite3_value_dup(sqlite3_column_value(s, 1));
				buf_addf(&key, "%s,%s;", (const char *)sqlite3_column_text(s, 0),
					 (const char *)sqlite3_column_text(s, 1));
			} else {
				buf_addf(&key, "-;");
			}
			sqlite3_reset(s);
		}
	if (buf_failed(&key))
		goto out;
	*moved = strcmp(key.data, st->cuts_key) != 0 || st->lapse_null ||
		 st->lapse != lapse;
	sqlite3_stmt *s = q(db, ST_SEG_CUTS_SET, "iiitt", (int64_t)now, n, lapse,
			    why, key.data);
	for (int i = 0; i < 24; i++)
		if (v[i])
			sqlite3_bind_value(s, 6 + i, v[i]);
	sqlite3_bind_int64(s, 30, st->stale);
	if (db_begin(db) < 0)
		goto out;
	if (q_exec(db, s) || db_commit(db)) {
		db_rollback(db);
		goto out;
	}
	rc = 0;
out:
	for (int i = 0; i < 24; i++)
		sqlite3_value_free(v[i]);
	buf_free(&key);
	return rc;
}

/* The dirty customers, a chunk a transaction: rescored, and (for a
 * tick: ENROLL) checked for win-back (the lapsed join winback_waiting),
 * then no longer dirty. Without
 * ENROLL (remarket segments) they stay dirty for the next tick. */
/* winback_max_idle_days in seconds for threshold LAPSE (seconds): "auto"
 * (or not a number) is twice the threshold, 0 no limit. Customers idle
 * longer are not mailed by the normal win-back (years-old customers of
 * an imported history). */
static int64_t winback_max_idle(struct app *app, int64_t lapse)
{
	const char *v = app->cfg->winback_max_idle_days;
	char *end;
	long d = strtol(v, &end, 10);
	if (end == v || *end || d < 0)
		return 2 * lapse;
	return (int64_t)d * 86400;
}

static int seg_rescore(struct app *app, rm_time now, int64_t lapse, int enroll)
{
	struct db *db = app->db;
	int64_t cool = (int64_t)app->cfg->winback_cooldown_days * 86400;
	int64_t idle = winback_max_idle(app, lapse);
	int64_t lo = 0, hi;
	struct pace p = {0};
	for (pace_start(&p); seg_dirty_next(db, lo, p.n, &hi); pace_start(&p)) {
		if (db_begin(db) < 0)
			return -1;
		int rc = q_exec(db, q(db, ST_SEG_RESCORE, "iiii", lo, hi,
				      (int64_t)now, lapse));
		if (enroll) {
			/* the lapsed wait; lapse_drain enrolls them */
			rc = rc || q_exec(db, q(db, ST_LAPSE_ENROLL, "iiiiii",
						(int64_t)now, lapse, cool, lo, hi, idle));
			rc = rc || q_exec(db, q(db, ST_SEG_DIRTY_DONE, "ii", lo, hi)) ||
			     q_exec(db, q(db, ST_SEG_NOW, "i", (int64_t)now));
		}
		if (rc || db_commit(db)) {
			db_rollback(db);
			return -1;
		}
		pace_end(&p);
		lo = hi;
	}
	return 0;
}

/* Enrolls the waiting lapsed (winback_waiting), most recently lapsed
 * first, up to winback_daily_max win-back enrollments in the 24 h before
 * NOW; the rest wait for a later tick, and leave the list only when
 * enrolled or no longer eligible. Nothing waiting: one index read. */
static int lapse_drain(struct app *app, rm_time now, int64_t lapse,
		       struct tick_summary *sum)
{
	struct db *db = app->db;
	if (db_scalar_stmt(q(db, ST_LAPSE_ANY_WAITING, NULL)) != 1)
		return 0;
	int64_t cool = (int64_t)app->cfg->winback_cooldown_days * 86400;
	int64_t idle = winback_max_idle(app, lapse);
	int64_t room = (int64_t)app->cfg->winback_daily_max -
		       db_scalar_stmt(q(db, ST_LAPSE_TODAY, "i", (int64_t)now));
	if (db_begin(db) < 0)
		return -1;
	int rc = 0;
	if (room > 0) {
		rc = q_exec(db, q(db, ST_LAPSE_WAIT_ENROLL, "iiiiiii", (int64_t)now,
				  lapse, cool, (int64_t)0, (int64_t)0, idle, room));
		if (!rc && sum)
			sum->enrolled += sqlite3_changes(db->h);
	}
	rc = rc || q_exec(db, q(db, ST_LAPSE_WAIT_PRUNE, "iiiiiii", (int64_t)now,
				lapse, cool, (int64_t)0, (int64_t)0, idle, (int64_t)0));
	if (rc || db_commit(db)) {
		db_rollback(db);
		return -1;
	}
	if (sum)
		sum->winback_waiting = db_scalar_stmt(q(db, ST_LAPSE_WAITING, NULL));
	return 0;
}

/* Brings the segments table up to NOW incrementally (the Segments
 * banner says how); with ENROLL (the tick) lapsed customers are enrolled
 * in win-back on the way. Every write is a short transaction. */
static int seg_update(struct app *app, rm_time now, int enroll,
		      struct tick_summary *sum)
{
	struct db *db = app->db;
	struct segstate st;
	seg_state(db, &st);
	if (!st.have || (!st.now_null && now < st.now)) {
		/* the first time, or the clock went back: count everyone again
		 * (the reset last: a crash before it comes back here) */
		if (seg_mark_all(db) ||
		    seg_write(db, q(db, ST_SEG_RESET, "i", (int64_t)now), 0, NULL))
			return -1;
		seg_state(db, &st);
	}
	if (seg_count_dirty(db, now, &st))
		return -1;
	seg_state(db, &st);
	int moved = 0;
	int auto_lapse = !strcmp(app->cfg->winback_after, "auto");
	int64_t lapse = st.lapse;
	/* winback_after = auto since the threshold was cached: learn it now */
	int unlearned = auto_lapse && !st.lapse_learned;
	if (st.cuts_null || unlearned ||
	    (st.stale && (st.customers <= SEG_EXACT_MAX ||
			  now - st.cuts_at >= SEG_CUTS_EVERY || now < st.cuts_at))) {
		char why[200];
		lapse = (int64_t)flow_lapse_days(app, why, sizeof why) * 86400;
		if (seg_cuts(app, now, &st, lapse, why, &moved))
			return -1;
	} else if (!auto_lapse || st.lapse_null) {
		char why[200];
		lapse = (int64_t)flow_lapse_days(app, why, sizeof why) * 86400;
		if (st.lapse_null || lapse != st.lapse) {
			moved = 1;
			if (seg_write(db, q(db, ST_SEG_LAPSE_SET, "it", lapse, why),
				      0, NULL))
				return -1;
		}
	}
	/* what win-back eligibility depends on besides the customer */
	char flows[512];
	sqlite3_stmt *s = q(db, ST_SEG_FLOWS, NULL);
	int n = snprintf(flows, sizeof flows, "%s|%lld|%ld|%lld",
			 sqlite3_step(s) == SQLITE_ROW ? col_text(s, 0) : "",
			 (long long)lapse, (long)app->cfg->winback_cooldown_days,
			 (long long)winback_max_idle(app, lapse));
	sqlite3_reset(s);
	if (n < 0 || n >= (int)sizeof flows)
		return -1;
	moved = moved || (enroll && strcmp(flows, st.flows));
	if (moved) {
		/* flows is set once everyone is marked: until then (a crash) it
		 * differs, and the next tick marks everyone again */
		if (seg_mark_all(db) ||
		    (enroll && seg_write(db, q(db, ST_SEG_FLOWS_SET, "t", flows), 0, NULL)))
			return -1;
	} else if (!st.now_null && now > st.now) {
		int64_t cool = (int64_t)app->cfg->winback_cooldown_days * 86400;
		if (seg_write(db, q(db, ST_SEG_CROSSED, "iiiiii", st.now, (int64_t)now,
				    2 * lapse, lapse, lapse * 2 / 3, cool), 0, NULL))
			return -1;
	}
	if (seg_rescore(app, now, lapse, enroll))
		return -1;
	return enroll ? lapse_drain(app, now, lapse, sum) : 0;
}

int flow_segments(struct app *app, rm_time now)
{
	return seg_update(app, now, 0, NULL);
}

/* The one list of segment names, in enum segment's order; SEGMENTS_FILL
 * writes the same names (a unit test holds the two together). */
const char *const segment_names[SEG__MAX] = {
	[SEG_NEW] = "new",	   [SEG_ACTIVE] = "active", [SEG_VIP] = "vip",
	[SEG_AT_RISK] = "at_risk", [SEG_LAPSED] = "lapsed", [SEG_LOST] = "lost",
};

/* The enum segment of NAME, or -1. */
static int segment_find(const char *name)
{
	for (int i = 0; i < SEG__MAX; i++)
		if (!strcmp(name, segment_names[i]))
			return i;
	return -1;
}

/* Customers per segment, from the last flow_segments. */
static void segment_counts(struct app *app, long n[SEG__MAX])
{
	for (int i = 0; i < SEG__MAX; i++)
		n[i] = 0;
	sqlite3_stmt *s = q(app->db, ST_SEGMENT_COUNTS, NULL);
	while (sqlite3_step(s) == SQLITE_ROW) {
		int i = segment_find(col_text(s, 0));
		if (i >= 0)
			n[i] = (long)sqlite3_column_int64(s, 1);
	}
	sqlite3_reset(s);
}

/* "" (everyone), a segment name, or "!" and one. */
static int segment_name_ok(const char *v)
{
	return !*v || segment_find(v + (*v == '!')) >= 0;
}

/* ==== Recommendations ================================================= */
/*
 * Products a contact may like, in tiers of preference: products bought
 * together with what they bought more often than they are bought at all
 * (lift: P(b | a) / P(b) > 1, from a pair seen in at least
 * RECO_MIN_SUPPORT orders, so one shared order is no evidence and "bought
 * by everyone" is not "bought together"); then best sellers of their
 * favourite category; then of the store. Never one they own, never a
 * service (postage, fees: products.kind), never one twice.
 * The counts live in reco_items / reco_pairs, which reco_refresh brings
 * forward from a watermark (the last order id counted) in short
 * transactions, called before a mail that shows recommendations (a tick
 * with none due does nothing) and by `remarket recommend`; a mail then
 * reads a few indexed rows, and its cost does not grow with the store's
 * history. There are no triggers on order writes. reco_walk only reads; the message context
 * turns its rows into the {{#recommendations}} list, `remarket recommend`
 * prints them.
 */

#define RECO_MIN_SUPPORT 2
/* the table is brought forward up to 500 order lines a transaction,
 * fewer when that took over 25 ms (a hook waits at most that), for at
 * most 250 ms a mail (the
 * first mails after a big import catch it up; later ones find it current
 * at the cost of two indexed reads) */
#define RECO_CHUNK_LINES 500
#define RECO_CHUNK_MS 25
#define RECO_MAIL_MS 250

/* One chunk: the orders after the watermark up to the one holding its
 * CHUNK-th line, counted in one transaction. Returns the rows written
 * (at least 1), 0 when the table is already current, or -1. */
static long reco_chunk(struct db *db, long chunk)
{
	long last = 0, orders = 0, bound = 0;
	/* nothing new (the common case): known without the write lock */
	q_row(q(db, ST_RECO_STATE, NULL), "ll", &last, &orders);
	q_row(q(db, ST_RECO_BOUND, "ii", (int64_t)last, (int64_t)1), "l", &bound);
	if (bound <= last)
		return 0;
	if (db_begin(db) < 0)
		return -1;
	q_row(q(db, ST_RECO_STATE, NULL), "ll", &last, &orders);
	q_row(q(db, ST_RECO_BOUND, "ii", (int64_t)last, (int64_t)chunk), "l", &bound);
	if (bound <= last) { /* another process counted them meanwhile */
		db_rollback(db);
		return 0;
	}
	long lines = sqlite3_total_changes(db->h);
	if (q_exec(db, q(db, ST_RECO_ITEMS_ADD, "ii", (int64_t)last, (int64_t)bound)) ||
	    q_exec(db, q(db, ST_RECO_PAIRS_ADD, "ii", (int64_t)last, (int64_t)bound)) ||
	    q_exec(db, q(db, ST_RECO_STATE_SET, "ii", (int64_t)last, (int64_t)bound)) ||
	    db_commit(db)) {
		db_rollback(db);
		return -1;
	}
	lines = sqlite3_total_changes(db->h) - lines;
	return lines > 0 ? lines : 1;
}

long reco_refresh(struct app *app, long chunk, long budget_ms)
{
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	long total = 0, lines = chunk > 0 ? chunk : RECO_CHUNK_LINES;
	for (;;) {
		struct timespec c0;
		clock_gettime(CLOCK_MONOTONIC, &c0);
		long n = reco_chunk(app->db, lines);
		if (n < 0)
			return -1;
		if (n == 0)
			return total;
		total += n;
		clock_gettime(CLOCK_MONOTONIC, &t1);
		long ms = (t1.tv_sec - t0.tv_sec) * 1000 +
			  (t1.tv_nsec - t0.tv_nsec) / 1000000;
		long cms = (t1.tv_sec - c0.tv_sec) * 1000 +
			   (t1.tv_nsec - c0.tv_nsec) / 1000000;
		/* a transaction of about RECO_CHUNK_MS: fewer lines when orders
		 * are long (pairs grow as the square of an order's lines) */
		if (cms > RECO_CHUNK_MS && lines > 20)
			lines /= 2;
		else if (cms < RECO_CHUNK_MS / 3 && lines < chunk)
			lines *= 2;
		if (budget_ms > 0 && ms >= budget_ms)
			return total;
	}
}

/* SKU is now of KIND: the table forgets it, or counts it over the orders
 * already counted, as a full rebuild would. Inside the caller's
 * transaction. */
static int reco_kind_fix(struct db *db, const char *sku, const char *kind)
{
	long last = 0, orders = 0;
	q_row(q(db, ST_RECO_STATE, NULL), "ll", &last, &orders);
	if (q_exec(db, q(db, ST_RECO_DROP_PARTNERS, "t", sku)) ||
	    q_exec(db, q(db, ST_RECO_DROP_PAIRS, "t", sku)) ||
	    q_exec(db, q(db, ST_RECO_DROP_ITEM, "t", sku)))
		return -1;
	if (strcmp(kind, "product"))
		return 0;
	return q_exec(db, q(db, ST_RECO_ITEM_COUNT, "ti", sku, (int64_t)last)) ||
	       q_exec(db, q(db, ST_RECO_PAIRS_OF, "ti", sku, (int64_t)last)) ||
	       q_exec(db, q(db, ST_RECO_PAIRS_MIRROR, "t", sku)) ? -1 : 0;
}

/* After a product event: if SKU's kind is no longer WAS (a product not
 * yet in the catalog counts as one), the table follows. */
static int reco_kind_changed(struct db *db, const char *sku, const char *was)
{
	char now[16];
	sqlite3_stmt *s = q(db, ST_PRODUCT_KIND_OF, "t", sku);
	copy_str(now, sizeof now, sqlite3_step(s) == SQLITE_ROW ? col_text(s, 0) : "");
	sqlite3_reset(s);
	return strcmp(now, was) ? reco_kind_fix(db, sku, now) : 0;
}

int reco_set_kind(struct app *app, const char *sku, const char *kind)
{
	struct db *db = app->db;
	if (strcmp(kind, "product") && strcmp(kind, "service"))
		return -1;
	if (db_begin(db) < 0)
		return -1;
	if (q_exec(db, q(db, ST_PRODUCT_KIND_SET, "tt", sku, kind)) ||
	    sqlite3_changes(db->h) != 1 || reco_kind_fix(db, sku, kind) ||
	    db_commit(db)) {
		db_rollback(db);
		return -1;
	}
	return 0;
}

/* Runs the recommendation statements in order of preference until N
 * distinct products are found; calls add() for each, best first. */
static int reco_walk(struct app *app, int64_t contact, int n,
		     int (*add)(void *arg, sqlite3_stmt *row), void *arg)
{
	static const enum stmt_id tiers[] = {ST_RECO_COOCCUR, ST_RECO_CATEGORY,
					     ST_RECO_BEST};
	char seen[16][65];
	int found = 0;
	if (n > 16)
		n = 16;
	for (size_t t = 0; t < 3 && found < n; t++) {
		sqlite3_stmt *s = q(app->db, tiers[t], t ? "ii" : "iii", contact,
				    (int64_t)n + found, (int64_t)RECO_MIN_SUPPORT);
		while (found < n && sqlite3_step(s) == SQLITE_ROW) {
			int dup = 0;
			for (int i = 0; i < found; i++)
				dup |= !strcmp(seen[i], col_text(s, 0));
			if (dup)
				continue;
			copy_str(seen[found++], 65, col_text(s, 0));
			if (add(arg, s) < 0) {
				sqlite3_reset(s);
				return -1;
			}
		}
		sqlite3_reset(s);
	}
	return found;
}

struct reco_out {
	char (*skus)[65];
	int n;
};

static int reco_sku(void *arg, sqlite3_stmt *row)
{
	struct reco_out *o = arg;
	copy_str(o->skus[o->n++], 65, col_text(row, 0));
	return 0;
}

int reco_for(struct app *app, int64_t contact, char (*out)[65], int n)
{
	struct reco_out o = {out, 0};
	/* the item-to-item table as of now, as a tick would leave it */
	if (reco_refresh(app, RECO_CHUNK_LINES, 0) < 0)
		return -1;
	return reco_walk(app, contact, n, reco_sku, &o);
}

/* ==== Mail: rendering and RFC 5322 building =========================== */
/*
 * A message is rendered from the owner's template files (text and HTML),
 * then built into one RFC 5322 byte string that both transports use, so
 * the outbox holds exactly what SMTP would have carried. libcurl's
 * curl_mime cannot write a message to a file, which is why the MIME
 * layout (multipart/alternative, quoted-printable parts) is built here;
 * it is small and covered by tests that parse it with a real MIME parser.
 * Header values are checked for CR and LF before anything is written;
 * display names are quoted or encoded, never written bare. Money and
 * dates are written by a small table of locales (not setlocale, which is
 * process-wide) in the one time zone of the process (cfg_timezone).
 */

/* ---- money and dates as the store's locale writes them ----
 * A small table, not setlocale(3): the locale is process-wide and not
 * thread-safe, the host may lack the store's locale, and a mail needs
 * only a decimal mark, a grouping mark, where the symbol goes and the
 * names of days and months. */

struct mail_lang {
	const char *days[7], *months[12];
};
static const struct mail_lang lang_en = {
	{"Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
	 "Saturday"},
	{"January", "February", "March", "April", "May", "June", "July",
	 "August", "September", "October", "November", "December"}};
static const struct mail_lang lang_fr = {
	{"dimanche", "lundi", "mardi", "mercredi", "jeudi", "vendredi",
	 "samedi"},
	{"janvier", "février", "mars", "avril", "mai", "juin", "juillet",
	 "août", "septembre", "octobre", "novembre", "décembre"}};
static const struct mail_lang lang_de = {
	{"Sonntag", "Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag",
	 "Samstag"},
	{"Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August",
	 "September", "Oktober", "November", "Dezember"}};
static const struct mail_lang lang_es = {
	{"domingo", "lunes", "martes", "miércoles", "jueves", "viernes",
	 "sábado"},
	{"enero", "febrero", "marzo", "abril", "mayo", "junio", "julio",
	 "agosto", "septiembre", "octubre", "noviembre", "diciembre"}};
static const struct mail_lang lang_it = {
	{"domenica", "lunedì", "martedì", "mercoledì", "giovedì", "venerdì",
	 "sabato"},
	{"gennaio", "febbraio", "marzo", "aprile", "maggio", "giugno", "luglio",
	 "agosto", "settembre", "ottobre", "novembre", "dicembre"}};
static const struct mail_lang lang_nl = {
	{"zondag", "maandag", "dinsdag", "woensdag", "donderdag", "vrijdag",
	 "zaterdag"},
	{"januari", "februari", "maart", "april", "mei", "juni", "juli",
	 "augustus", "september", "oktober", "november", "december"}};
static const struct mail_lang lang_pt = {
	{"domingo", "segunda-feira", "terça-feira", "quarta-feira",
	 "quinta-feira", "sexta-feira", "sábado"},
	{"janeiro", "fevereiro", "março", "abril", "maio", "junho", "julho",
	 "agosto", "setembro", "outubro", "novembro", "dezembro"}};

#define NBSP "\xc2\xa0"   /* U+00A0: "22,00 €" never breaks */
#define NNBSP "\xe2\x80\xaf" /* U+202F: French digit groups */
enum sym_pos { SYM_BEFORE, SYM_BEFORE_SPACE, SYM_AFTER };
static const struct mail_locale {
	const char *name, *dec, *group;
	enum sym_pos sym;
	const struct mail_lang *lang;
	/* W weekday, D day, M month, H 14:00, h 2:00 PM; the rest as is */
	const char *date;
} mail_locales[] = {
	{"en", ".", ",", SYM_BEFORE, &lang_en, "W D M, H"},
	{"en_GB", ".", ",", SYM_BEFORE, &lang_en, "W D M, H"},
	{"en_IE", ".", ",", SYM_BEFORE, &lang_en, "W D M, H"},
	{"en_AU", ".", ",", SYM_BEFORE, &lang_en, "W D M, h"},
	{"en_CA", ".", ",", SYM_BEFORE, &lang_en, "W, M D, h"},
	{"en_US", ".", ",", SYM_BEFORE, &lang_en, "W, M D, h"},
	{"fr", ",", NNBSP, SYM_AFTER, &lang_fr, "W D M, H"},
	{"fr_FR", ",", NNBSP, SYM_AFTER, &lang_fr, "W D M, H"},
	{"fr_BE", ",", NNBSP, SYM_AFTER, &lang_fr, "W D M, H"},
	{"fr_CA", ",", NBSP, SYM_AFTER, &lang_fr, "W D M, H"},
	{"fr_CH", ",", NNBSP, SYM_AFTER, &lang_fr, "W D M, H"},
	{"de", ",", ".", SYM_AFTER, &lang_de, "W, D. M, H"},
	{"de_DE", ",", ".", SYM_AFTER, &lang_de, "W, D. M, H"},
	{"de_AT", ",", NBSP, SYM_BEFORE_SPACE, &lang_de, "W, D. M, H"},
	{"de_CH", ".", "’", SYM_BEFORE_SPACE, &lang_de, "W, D. M, H"},
	{"es", ",", ".", SYM_AFTER, &lang_es, "W, D de M, H"},
	{"es_ES", ",", ".", SYM_AFTER, &lang_es, "W, D de M, H"},
	{"it", ",", ".", SYM_AFTER, &lang_it, "W D M, H"},
	{"it_IT", ",", ".", SYM_AFTER, &lang_it, "W D M, H"},
	{"nl", ",", ".", SYM_BEFORE_SPACE, &lang_nl, "W D M, H"},
	{"nl_NL", ",", ".", SYM_BEFORE_SPACE, &lang_nl, "W D M, H"},
	{"nl_BE", ",", ".", SYM_AFTER, &lang_nl, "W D M, H"},
	{"pt", ",", NBSP, SYM_AFTER, &lang_pt, "W, D de M, H"},
	{"pt_PT", ",", NBSP, SYM_AFTER, &lang_pt, "W, D de M, H"},
	{"pt_BR", ",", ".", SYM_BEFORE_SPACE, &lang_pt, "W, D de M, H"},
};

static const struct mail_locale *mail_locale(const char *name)
{
	for (size_t i = 0; i < sizeof mail_locales / sizeof mail_locales[0]; i++)
		if (name && !strcmp(mail_locales[i].name, name))
			return &mail_locales[i];
	return &mail_locales[0]; /* cfg_load refuses a name not above */
}

int mail_locale_known(const char *locale)
{
	return locale && (mail_locale(locale) != &mail_locales[0] ||
			  !strcmp(locale, "en"));
}

/* The symbol a shopper knows for CUR and its decimals; else the code. */
static const char *currency_symbol(const char *cur, int *decimals)
{
	static const char *const sym[][2] = {
		{"EUR", "€"}, {"GBP", "£"}, {"USD", "$"}, {"JPY", "¥"},
		{"CHF", "CHF"}, {"SEK", "kr"}, {"NOK", "kr"}, {"DKK", "kr."},
		{"PLN", "zł"}, {"CZK", "Kč"}, {"CAD", "CA$"}, {"AUD", "A$"},
		{"NZD", "NZ$"}, {"BRL", "R$"}, {"INR", "₹"}, {"KRW", "₩"}};
	*decimals = !strcmp(cur, "JPY") || !strcmp(cur, "KRW") ? 0 : 2;
	for (size_t i = 0; i < sizeof sym / sizeof sym[0]; i++)
		if (!strcmp(sym[i][0], cur))
			return sym[i][1];
	return cur;
}

/* The digits of |V| with LOC's marks: 1234.5 -> "1,234.50". */
static void money_digits(struct buf *b, double v, int decimals,
			 const struct mail_locale *loc)
{
	char num[64];
	snprintf(num, sizeof num, "%.*f", decimals, fabs(v));
	size_t whole = strcspn(num, ".");
	for (size_t i = 0; i < whole; i++) {
		if (i && (whole - i) % 3 == 0)
			buf_adds(b, loc->group);
		buf_add(b, num + i, 1);
	}
	if (num[whole])
		buf_addf(b, "%s%s", loc->dec, num + whole + 1);
}

void mail_money(char *out, size_t n, double v, const char *cur,
		const char *locale, int whole)
{
	const struct mail_locale *loc = mail_locale(locale);
	int decimals = 2;
	const char *sym = cur && *cur ? currency_symbol(cur, &decimals) : "";
	if (whole && fabs(v - round(v)) < 0.005)
		decimals = 0;
	struct buf b = {0}, d = {0};
	money_digits(&d, v, decimals, loc);
	/* a symbol of letters ("CHF", "kr") is spaced even where "£" is not */
	int letters = *sym && isalpha((unsigned char)sym[0]);
	const char *neg = v < 0 && round(v * 100) != 0 ? "-" : "";
	if (!*sym)
		buf_addf(&b, "%s%s", neg, buf_str(&d));
	else if (loc->sym == SYM_AFTER)
		buf_addf(&b, "%s%s" NBSP "%s", neg, buf_str(&d), sym);
	else
		buf_addf(&b, "%s%s%s%s", neg, sym, loc->sym == SYM_BEFORE_SPACE ||
			 letters ? NBSP : "", buf_str(&d));
	copy_str(out, n, buf_failed(&b) ? "" : buf_str(&b));
	buf_free(&b);
	buf_free(&d);
}

void mail_date(char *out, size_t n, rm_time t, const char *locale)
{
	const struct mail_locale *loc = mail_locale(locale);
	struct tm tm;
	time_t tt = (time_t)t;
	struct buf b = {0};
	if (!localtime_r(&tt, &tm)) {
		copy_str(out, n, "");
		return;
	}
	for (const char *p = loc->date; *p; p++) {
		if (*p == 'W')
			buf_adds(&b, loc->lang->days[tm.tm_wday]);
		else if (*p == 'D')
			buf_addf(&b, "%d", tm.tm_mday);
		else if (*p == 'M')
			buf_adds(&b, loc->lang->months[tm.tm_mon]);
		else if (*p == 'H')
			buf_addf(&b, "%02d:%02d", tm.tm_hour, tm.tm_min);
		else if (*p == 'h')
			buf_addf(&b, "%d:%02d" NBSP "%s", (tm.tm_hour + 11) % 12 + 1,
				 tm.tm_min, tm.tm_hour < 12 ? "AM" : "PM");
		else
			buf_add(&b, p, 1);
	}
	copy_str(out, n, buf_failed(&b) ? "" : buf_str(&b));
	buf_free(&b);
}

/* Quoted-printable (RFC 2045): lines of at most 76 characters, soft
 * breaks, LF made CRLF. The worst case is reserved once, then written
 * directly: this runs over every byte of every message. */
static int qp_encode(struct buf *out, const char *s)
{
	static const char hex[] = "0123456789ABCDEF";
	size_t n = strlen(s);
	/* each byte as =XX, a soft break per 25 of those, a CR per LF */
	if (n > SIZE_MAX / 8 || buf_reserve(out, n * 3 + (n / 25 + 1) * 3 + n) < 0)
		return -1;
	char *o = out->data + out->len;
	size_t col = 0;
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p == '\r')
			continue;
		if (*p == '\n') {
			*o++ = '\r', *o++ = '\n';
			col = 0;
			continue;
		}
		int at_eol = p[1] == '\n' || p[1] == '\r' || p[1] == '\0';
		int plain = (*p >= 33 && *p <= 126 && *p != '=') ||
			    (*p == ' ' && !at_eol);
		size_t w = plain ? 1 : 3;
		if (col + w > 75) { /* soft line break keeps lines <= 76 */
			*o++ = '=', *o++ = '\r', *o++ = '\n';
			col = 0;
		}
		if (plain) {
			*o++ = (char)*p;
		} else {
			*o++ = '=', *o++ = hex[*p >> 4], *o++ = hex[*p & 15];
		}
		col += w;
	}
	*o = '\0';
	out->len = (size_t)(o - out->data);
	return 0;
}

static int is_ascii(const char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s >= 0x80)
			return 0;
	return 1;
}

/* RFC 2047: non-ASCII header text as =?UTF-8?B?...?= words of <= 75 chars,
 * cut at character boundaries and folded. */
static int hdr_encode(struct buf *out, const char *s)
{
	if (is_ascii(s) && !strstr(s, "=?"))
		return buf_adds(out, s);
	size_t n = strlen(s), i = 0;
	while (i < n) {
		/* 39 bytes make 52 base64 characters: with "Subject: " and the
		 * =?UTF-8?B?...?= wrapping, a line stays within 76 (RFC 2047) */
		size_t take = n - i > 39 ? 39 : n - i;
		while (take > 1 && i + take < n &&
		       ((unsigned char)s[i + take] & 0xC0) == 0x80)
			take--; /* never split a UTF-8 sequence */
		char b64[sodium_base64_ENCODED_LEN(39, sodium_base64_VARIANT_ORIGINAL)];
		sodium_bin2base64(b64, sizeof b64, (const unsigned char *)s + i,
				  take, sodium_base64_VARIANT_ORIGINAL);
		buf_addf(out, "%s=?UTF-8?B?%s?=", i ? "\r\n " : "", b64);
		i += take;
	}
	return buf_failed(out) ? -1 : 0;
}

static int has_crlf(const char *s)
{
	return s && strpbrk(s, "\r\n") != NULL;
}

/* "Name <addr>" or "addr" gives addr. */
static void addr_spec(const char *from, char *out, size_t n)
{
	const char *lt = strrchr(from, '<'), *gt = lt ? strchr(lt, '>') : NULL;
	if (lt && gt && (size_t)(gt - lt - 1) < n) {
		memcpy(out, lt + 1, (size_t)(gt - lt - 1));
		out[gt - lt - 1] = '\0';
	} else {
		copy_str(out, n, from);
	}
}

/* 1 if NAME can stand in a header as it is: atext and spaces only (RFC
 * 5322 3.2.3); a comma, a dot, a quote or '<' would change the address
 * list a reader sees, so such a name is quoted. */
static int name_is_atoms(const char *name)
{
	for (const char *p = name; *p; p++)
		if (!isalnum((unsigned char)*p) && !strchr(" !#$%&'*+-/=?^_`{|}~", *p))
			return 0;
	return 1;
}

int mail_mailbox(struct buf *out, const char *name, const char *addr)
{
	if (!name || !*name)
		return buf_adds(out, addr);
	if (!is_ascii(name) || strstr(name, "=?")) {
		hdr_encode(out, name);
	} else if (name_is_atoms(name)) {
		buf_adds(out, name);
	} else { /* quoted-string: a quote and a backslash are escaped */
		buf_adds(out, "\"");
		for (const char *p = name; *p; p++)
			buf_addf(out, "%s%c", *p == '"' || *p == '\\' ? "\\" : "", *p);
		buf_adds(out, "\"");
	}
	buf_addf(out, " <%s>", addr);
	return buf_failed(out) ? -1 : 0;
}

/* "Header: NAME <addr>\r\n" from a config mailbox ("from", "reply_to"). */
static int hdr_mailbox(struct buf *out, const char *header, const char *mb)
{
	char name[256] = "", addr[256] = "";
	if (cfg_mailbox(mb, name, sizeof name, addr, sizeof addr) < 0)
		return buf_addf(out, "%s: %s\r\n", header, mb); /* as given */
	buf_addf(out, "%s: ", header);
	mail_mailbox(out, name, addr);
	return buf_adds(out, "\r\n");
}

/* Builds the RFC 5322 message of M (headers checked for CR/LF, text and
 * HTML as multipart/alternative, quoted-printable) into OUT. */
int mail_build(const struct mail *m, struct buf *out, char *err, size_t errlen)
{
	const char *vals[] = {m->from, m->to, m->subject, m->message_id,
			      m->list_unsub, m->feedback_id ? m->feedback_id : "",
			      m->to_name ? m->to_name : "",
			      m->reply_to ? m->reply_to : ""};
	const char *names[] = {"From", "To", "Subject", "Message-ID",
			       "List-Unsubscribe", "Feedback-ID", "To",
			       "Reply-To"};
	for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++)
		if (!vals[i] || has_crlf(vals[i])) {
			snprintf(err, errlen, "header %s: %s", names[i],
				 vals[i] ? "contains CR or LF, refused" : "missing");
			return -1;
		}
	char date[64], boundary[40], rnd[17], fbl[200] = "";
	if (m->feedback_id && *m->feedback_id) {
		/* a cut here would leave a bare CR and swallow the next header */
		int n = snprintf(fbl, sizeof fbl, "Feedback-ID: %s\r\n", m->feedback_id);
		if (n < 0 || (size_t)n >= sizeof fbl) {
			snprintf(err, errlen, "header Feedback-ID: longer than %zu "
				 "bytes, refused (shorten the flow's name)",
				 sizeof fbl - 16);
			return -1;
		}
	}
	struct tm tm;
	time_t t = (time_t)m->date;
	gmtime_r(&t, &tm);
	strftime(date, sizeof date, "%a, %d %b %Y %H:%M:%S +0000", &tm);
	unsigned char r[8];
	randombytes_buf(r, sizeof r);
	sodium_bin2hex(rnd, sizeof rnd, r, sizeof r);
	/* "=_" can never occur in quoted-printable text */
	snprintf(boundary, sizeof boundary, "=_rm_%s", rnd);
	hdr_mailbox(out, "From", m->from);
	if (m->reply_to && *m->reply_to)
		hdr_mailbox(out, "Reply-To", m->reply_to);
	buf_adds(out, "To: ");
	mail_mailbox(out, m->to_name, m->to);
	buf_adds(out, "\r\nSubject: ");
	hdr_encode(out, m->subject);
	buf_addf(out, "\r\nDate: %s\r\nMessage-ID: %s\r\n"
		 "MIME-Version: 1.0\r\n"
		 "List-Unsubscribe: %s\r\n"
		 "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
		 "%s"
		 /* RFC 3834: an auto-responder must not answer it */
		 "Auto-Submitted: auto-generated\r\n"
		 "Content-Type: multipart/alternative; boundary=\"%s\"\r\n"
		 "\r\n"
		 "This is a multi-part message in MIME format.\r\n"
		 "--%s\r\n"
		 "Content-Type: text/plain; charset=UTF-8\r\n"
		 "Content-Transfer-Encoding: quoted-printable\r\n\r\n",
		 date, m->message_id, m->list_unsub, fbl, boundary, boundary);
	qp_encode(out, m->text);
	buf_addf(out, "\r\n--%s\r\n"
		 "Content-Type: text/html; charset=UTF-8\r\n"
		 "Content-Transfer-Encoding: quoted-printable\r\n\r\n",
		 boundary);
	qp_encode(out, m->html);
	buf_addf(out, "\r\n--%s--\r\n", boundary);
	if (buf_failed(out)) {
		snprintf(err, errlen, "out of memory building the message");
		return -1;
	}
	return 0;
}

/* Reads templates/NAME.txt ("Subject: ..." line, blank line, body) and
 * templates/NAME.html, and renders both with the same context (the HTML
 * with the rendered subject as {{subject}} too). */
static int mail_render(struct app *app, const char *name,
		       const struct tctx *ctx, struct buf *subject,
		       struct buf *text, struct buf *html, char *err,
		       size_t errlen)
{
	const char *dir = app->cfg->templates;
	char path[PATH_MAX];
	struct buf tpl = {0}, txt = {0};
	int rc = -1;
	if (!val_ident(name, 64) ||
	    snprintf(path, sizeof path, "%s/%s.txt", dir, name) >= (int)sizeof path ||
	    template_read(path, &tpl) < 0) {
		snprintf(err, errlen, "template %s/%s.txt: cannot read it — "
			 "check the templates key", dir, name);
		goto out;
	}
	if (tpl_render_file(tpl.data, path, ctx, TPL_TEXT, dir, ".txt", &txt, err,
			    errlen))
		goto out;
	const char *body = strstr(txt.data, "\n\n");
	if (strncmp(txt.data, "Subject:", 8) != 0 || !body) {
		snprintf(err, errlen, "template %s: must start with 'Subject: ...' "
			 "and a blank line", path);
		goto out;
	}
	buf_add(subject, txt.data + 8, (size_t)(body - txt.data - 8));
	buf_adds(text, body + 2);
	if (buf_failed(subject) || buf_failed(text)) {
		snprintf(err, errlen, "out of memory rendering template %s", name);
		goto out;
	}
	char *s = trim(subject->data);
	memmove(subject->data, s, strlen(s) + 1);
	subject->len = strlen(subject->data);
	buf_reset(&tpl);
	if (snprintf(path, sizeof path, "%s/%s.html", dir, name) >= (int)sizeof path ||
	    template_read(path, &tpl) < 0) {
		snprintf(err, errlen, "template %s: cannot read it", path);
		goto out;
	}
	/* the subject is written once, in the .txt; the HTML shows it as
	 * {{subject}} (its <title>) */
	struct tvar sv = {"subject", subject->data, NULL, 0};
	struct tctx hctx = {&sv, 1, ctx};
	rc = tpl_render_file(tpl.data, path, &hctx, TPL_HTML, dir, ".html", html,
			     err, errlen);
	if (rc == 0 && !(val_utf8(subject->data, subject->len) &&
			 val_utf8(text->data, text->len) &&
			 val_utf8(html->data, html->len))) {
		snprintf(err, errlen, "template %s: not valid UTF-8", name);
		rc = -1;
	}
out:
	buf_free(&tpl);
	buf_free(&txt);
	return rc;
}

/* ==== Transports: SMTP and outbox ===================================== */
/*
 * mail_send() hands a built message to the configured transport and says
 * whether it went out (SEND_OK), may go later (SEND_TEMP: a 4xx answer
 * or a time-out after the greeting; SEND_DOWN: the relay unavailable, a
 * refused connection, a time-out or a 4xx before or at its greeting,
 * which stops the tick), never will to this recipient
 * (SEND_PERM: a 5xx to RCPT with 5.1.x or 5.2.x), the relay refuses us
 * (SEND_CONFIG: a 5xx to the greeting, EHLO, AUTH or MAIL FROM, or to
 * RCPT with 5.3.x, 5.5.x or 5.7.x; login, TLS), refused the recipient
 * without saying why (SEND_RCPT: a 5xx to RCPT with no enhanced status
 * code, which the tick reads as this recipient's, or as ours when it
 * repeats), or refused the content (SEND_CONTENT: a 5xx at the end of
 * DATA, which the tick reads as this recipient's, or as everyone's when
 * it repeats).
 * The outbox is the embedded default: one file per message, named by the
 * message row, written atomically, so a repeated attempt replaces the
 * file instead of adding a second one.
 */

struct upload {
	const char *data;
	size_t len, off;
};

static size_t upload_read(char *dst, size_t size, size_t nmemb, void *arg)
{
	struct upload *u = arg;
	size_t room = size * nmemb, left = u->len - u->off;
	size_t n = left < room ? left : room;
	memcpy(dst, u->data + u->off, n);
	u->off += n;
	return n;
}

/* Which step of the SMTP dialogue the relay answered last: the verb of
 * the last command we sent ("greeting" before any), or "end of DATA"
 * once the relay took the content (354). libcurl's error codes alone do
 * not tell a 554 greeting from a 554 to the content. */
struct smtp_trace {
	char stage[16];
	char reply[160]; /* the relay's last reply line, for the log */
	int quit;        /* QUIT sent: its answer is not the one to report */
};

static int smtp_debug(CURL *c, curl_infotype type, char *data, size_t n,
		      void *arg)
{
	struct smtp_trace *tr = arg;
	(void)c;
	if (type == CURLINFO_HEADER_OUT) {
		size_t k = 0;
		while (k < n && k + 1 < sizeof tr->stage && isalpha((unsigned char)data[k]))
			k++;
		/* QUIT and RSET follow a failure: they must not hide its stage */
		int after = k == 4 && (!strncmp(data, "QUIT", 4) || !strncmp(data, "RSET", 4));
		tr->quit |= after;
		if (k && !after) {
			memcpy(tr->stage, data, k);
			tr->stage[k] = '\0';
		}
	} else if (type == CURLINFO_HEADER_IN && n >= 3 && !tr->quit) {
		size_t k = strcspn(data, "\r\n");
		if (k > n)
			k = n;
		if (k >= sizeof tr->reply)
			k = sizeof tr->reply - 1;
		memcpy(tr->reply, data, k);
		tr->reply[k] = '\0';
		if (!memcmp(data, "354", 3) && !strcmp(tr->stage, "DATA"))
			copy_str(tr->stage, sizeof tr->stage, "end of DATA");
	}
	return 0;
}

/* The class of the enhanced status code (RFC 3463) of a reply line
 * "550 5.1.1 ..." or "550-5.1.1 ...": the subject digit after "5.", or 0
 * when the reply has none. */
static int smtp_enhanced(const char *reply)
{
	const char *p = reply;
	for (int k = 0; k < 3; k++, p++)
		if (!isdigit((unsigned char)*p))
			return 0;
	if (*p != ' ' && *p != '-')
		return 0;
	p++;
	if (p[0] != '5' || p[1] != '.' || !isdigit((unsigned char)p[2]))
		return 0;
	size_t k = 3;
	while (isdigit((unsigned char)p[k]))
		k++;
	if (p[k] != '.' || !isdigit((unsigned char)p[k + 1]))
		return 0;
	return k == 3 ? p[2] : 0; /* the subject classes are one digit */
}

/* The outcome of a failed SMTP transaction, by where it failed: before
 * RCPT the relay refuses us (nobody's address is at fault); at RCPT the
 * enhanced code says whose: 5.1.x (bad mailbox) and 5.2.x (mailbox full
 * or disabled) this recipient's, 5.3.x, 5.5.x and 5.7.x (policy: a
 * blocked client, relay denied, a sender not allowed) ours, none or
 * another is decided by the tick (see refusal_add); a 5xx to the content
 * is decided by the tick (one recipient, or the content for everyone:
 * see flow_send). REPLY is the relay's last reply line. */
static enum send_result smtp_classify(CURLcode rc, long code, const char *stage,
				      const char *reply)
{
	int perm = code >= 500 && code < 600;
	if (rc == CURLE_LOGIN_DENIED || rc == CURLE_USE_SSL_FAILED ||
	    rc == CURLE_SSL_CONNECT_ERROR || rc == CURLE_PEER_FAILED_VERIFICATION ||
	    rc == CURLE_REMOTE_ACCESS_DENIED)
		return SEND_CONFIG;
	if (!perm && !strcmp(stage, "greeting"))
		return SEND_DOWN; /* refused, a time-out, a 4xx: no relay to talk to */
	if (!perm)
		return SEND_TEMP; /* a 4xx, a time-out */
	if (!strcmp(stage, "RCPT")) {
		int cls = smtp_enhanced(reply);
		return cls == '1' || cls == '2' ? SEND_PERM :
		       cls == '3' || cls == '5' || cls == '7' ? SEND_CONFIG : SEND_RCPT;
	}
	if (!strcmp(stage, "end of DATA"))
		return SEND_CONTENT;
	return SEND_CONFIG; /* greeting, EHLO/HELO, STARTTLS, AUTH, MAIL, DATA */
}

/* Replaces every address in S (a relay's reply: "550 5.1.1
 * <ann@example.com>: user unknown") by "<recipient>", in place: the
 * reply reaches the log, the tick's "stopped" and messages.error, which
 * name no address unless log_pii = yes. A word is an address when it
 * holds an '@'; the brackets around it go with it. */
static void redact_addrs(char *s, size_t n)
{
	static const char delim[] = " \t<>\"'(),;:[]";
	char out[512];
	size_t o = 0;
	for (const char *p = s; *p && o + 1 < sizeof out;) {
		size_t k = strcspn(p, delim);
		if (!k) {
			out[o++] = *p++;
			continue;
		}
		if (memchr(p, '@', k)) {
			if (o && out[o - 1] == '<')
				o--;
			p += k + (p[k] == '>');
			int w = snprintf(out + o, sizeof out - o, "<recipient>");
			o = w < 0 || (size_t)w >= sizeof out - o ? sizeof out - 1 : o + (size_t)w;
		} else {
			size_t m = k < sizeof out - 1 - o ? k : sizeof out - 1 - o;
			memcpy(out + o, p, m);
			o += m;
			p += k;
		}
	}
	out[o] = '\0';
	copy_str(s, n, out);
}

/* smtp+starttls://host:587 means smtp:// with STARTTLS required. */
static int smtp_url(const char *url, char *out, size_t n, int *starttls)
{
	*starttls = strncmp(url, "smtp+starttls://", 16) == 0;
	if (*starttls)
		return snprintf(out, n, "smtp://%s", url + 16) >= (int)n ? -1 : 0;
	return copy_str(out, n, url);
}

/* ---- the envelope sender: VERP ---- */
/*
 * With bounce_address set, each message leaves with its own envelope
 * sender, bounces+<tag>@domain, where the tag is the message's row id and
 * a MAC of it (libsodium crypto_auth, keyed by the key ring, cut to 8
 * bytes): "bounces+42.9f86d081884c7d65@shop.example". A bounce comes back
 * to that address, so it names its message without any parsing of the
 * bounce's text, and nobody can make one up for a message of their
 * choosing. Hex, not base64: relays may change the case of a local part.
 * Without bounce_address the envelope sender is the from address, as
 * before: an address nobody set up to receive bounces would only lose
 * them (and relays that verify senders would refuse it).
 */
#define VERP_MACBYTES 8

static void verp_mac(const unsigned char key[RM_KEYBYTES], int64_t id,
		     unsigned char mac[VERP_MACBYTES])
{
	unsigned char in[13], full[crypto_auth_BYTES];
	memcpy(in, "verp:", 5);
	for (int i = 0; i < 8; i++)
		in[5 + i] = (unsigned char)((uint64_t)id >> (56 - 8 * i));
	crypto_auth(full, in, sizeof in, key);
	memcpy(mac, full, VERP_MACBYTES);
}

int verp_sender(const struct app *app, int64_t message, char *out, size_t n)
{
	char addr[256], hex[2 * VERP_MACBYTES + 1];
	unsigned char mac[VERP_MACBYTES];
	const char *ba = app->cfg->bounce_address;
	if (!*ba || message <= 0) {
		addr_spec(app->cfg->from, addr, sizeof addr);
		return copy_str(out, n, addr);
	}
	const char *at = strrchr(ba, '@');
	verp_mac(app->key, message, mac);
	sodium_bin2hex(hex, sizeof hex, mac, sizeof mac);
	int w = snprintf(out, n, "%.*s+%lld.%s%s", (int)(at - ba), ba,
			 (long long)message, hex, at);
	return w < 0 || (size_t)w >= n ? -1 : 0;
}

/* The message of a tag "<id>.<hex>", checked with each key of the ring;
 * -1 if it is malformed or forged. */
static int verp_tag_check(const struct app *app, const char *tag, size_t len,
			  int64_t *message)
{
	char t[64], *end;
	unsigned char got[VERP_MACBYTES], mac[VERP_MACBYTES];
	size_t n = 0;
	if (len >= sizeof t || !len || !isdigit((unsigned char)tag[0]))
		return -1;
	memcpy(t, tag, len);
	t[len] = '\0';
	errno = 0;
	long long id = strtoll(t, &end, 10);
	if (errno || id <= 0 || *end != '.' ||
	    sodium_hex2bin(got, sizeof got, end + 1, strlen(end + 1), NULL, &n,
			   NULL) || n != sizeof got || strlen(end + 1) != 2 * n)
		return -1;
	for (int k = -1; k < app->nold; k++) {
		verp_mac(k < 0 ? app->key : app->old_keys[k], id, mac);
		if (sodium_memcmp(got, mac, sizeof mac) == 0) {
			*message = id;
			return 0;
		}
	}
	return -1;
}

int verp_parse(const struct app *app, const char *addr, int64_t *message)
{
	char a[320];
	const char *ba = app->cfg->bounce_address;
	const char *bat = strrchr(ba, '@');
	if (!*ba || !addr || copy_str(a, sizeof a, addr) < 0)
		return -1;
	addr_spec(addr, a, sizeof a);
	char *at = strrchr(a, '@'), *plus = strchr(a, '+');
	size_t local = (size_t)(bat - ba);
	if (!at || !plus || plus > at || (size_t)(plus - a) != local ||
	    strncasecmp(a, ba, local) || strcasecmp(at, bat))
		return -1;
	return verp_tag_check(app, plus + 1, (size_t)(at - plus - 1), message);
}

/* libcurl hands the answer to NOOP here: nothing in it is needed. */
static size_t discard(char *p, size_t size, size_t nmemb, void *arg)
{
	(void)p, (void)arg;
	return size * nmemb;
}

/* The options every conversation with the relay shares: the URL, TLS,
 * login, the time-outs, the trace. */
static void smtp_setup(CURL *c, const struct config *cfg, const char *url,
		       int starttls, char *cerr, struct smtp_trace *tr)
{
	curl_easy_reset(c);
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_ERRORBUFFER, cerr);
	curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, cfg->smtp_connect_timeout);
	curl_easy_setopt(c, CURLOPT_SERVER_RESPONSE_TIMEOUT, cfg->smtp_reply_timeout);
	curl_easy_setopt(c, CURLOPT_TIMEOUT, cfg->smtp_connect_timeout +
					     8 * cfg->smtp_reply_timeout);
	curl_easy_setopt(c, CURLOPT_DEBUGFUNCTION, smtp_debug);
	curl_easy_setopt(c, CURLOPT_DEBUGDATA, tr);
	curl_easy_setopt(c, CURLOPT_VERBOSE, 1L);
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	if (starttls)
		curl_easy_setopt(c, CURLOPT_USE_SSL, (long)CURLUSESSL_ALL);
	if (*cfg->smtp_user) {
		curl_easy_setopt(c, CURLOPT_USERNAME, cfg->smtp_user);
		curl_easy_setopt(c, CURLOPT_PASSWORD, cfg->smtp_password);
	}
}

/* Whether the relay would take mail from us, sending none: connect, the
 * greeting, EHLO, STARTTLS and AUTH as a real send does them (the same
 * options), then NOOP instead of MAIL FROM, then QUIT. Not CONNECT_ONLY
 * and a hand-written EHLO: libcurl's own conversation checks the TLS and
 * the login too, which are what a wrong configuration gets wrong. Returns
 * SEND_OK, or SEND_DOWN / SEND_CONFIG / SEND_TEMP with the reason. */
static enum send_result smtp_probe(struct app *app, char *err, size_t errlen)
{
	struct config *cfg = app->cfg;
	char url[1024], shown[1024], cerr[CURL_ERROR_SIZE] = "";
	int starttls;
	struct smtp_trace tr = {"greeting", "", 0};
	if (smtp_url(cfg->smtp_url, url, sizeof url, &starttls) < 0) {
		snprintf(err, errlen, "smtp_url: too long");
		return SEND_CONFIG;
	}
	url_shown(cfg->smtp_url, shown, sizeof shown);
	CURL *c = app->curl;
	smtp_setup(c, cfg, url, starttls, cerr, &tr);
	curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, "NOOP");
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
	CURLcode rc = curl_easy_perform(c);
	long code = 0;
	curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
	curl_easy_reset(c); /* nothing of the probe is left for a send */
	if (rc == CURLE_OK) {
		snprintf(err, errlen, "%s answers (EHLO%s%s, no mail sent)", shown,
			 starttls ? ", STARTTLS" : "", *cfg->smtp_user ? ", AUTH" : "");
		return SEND_OK;
	}
	enum send_result r = smtp_classify(rc, code, tr.stage, tr.reply);
	if (r == SEND_TEMP && !strcmp(tr.stage, "greeting"))
		r = SEND_DOWN;
	snprintf(err, errlen, "%s: %s%s%s%s (at %s) — %s", shown,
		 *cerr ? cerr : curl_easy_strerror(rc),
		 *tr.reply ? ": \"" : "", tr.reply, *tr.reply ? "\"" : "",
		 tr.stage,
		 r == SEND_CONFIG ? "the relay refuses us: check smtp_user, "
				    "smtp_password and TLS, and whether the relay "
				    "blocks this host" :
		 rc == CURLE_COULDNT_CONNECT ? "is the relay running? (smtp_url)" :
		 "the relay is unavailable or slow (smtp_url, "
		 "smtp_connect_timeout, smtp_reply_timeout)");
	return r == SEND_OK ? SEND_TEMP : r;
}

/* Sends one built message to TO over the configured SMTP relay with
 * libcurl, with the envelope sender FROM, and classifies the outcome as
 * a send_result. */
static enum send_result smtp_send(struct app *app, const char *from,
				  const char *to, const struct buf *msg,
				  char *err, size_t errlen)
{
	struct config *cfg = app->cfg;
	CURL *c = app->curl;
	char url[1024];
	int starttls;
	if (smtp_url(cfg->smtp_url, url, sizeof url, &starttls) < 0) {
		snprintf(err, errlen, "smtp_url: too long");
		return SEND_TEMP;
	}
	struct curl_slist *rcpt = curl_slist_append(NULL, to);
	struct upload up = {msg->data, msg->len, 0};
	char cerr[CURL_ERROR_SIZE] = "";
	struct smtp_trace tr = {"greeting", "", 0};
	/* a stalled relay costs at most smtp_reply_timeout per stage:
	 * connecting, then each reply (greeting, EHLO, MAIL, RCPT, DATA, end
	 * of data); the whole conversation is capped as a last resort */
	smtp_setup(c, cfg, url, starttls, cerr, &tr);
	curl_easy_setopt(c, CURLOPT_MAIL_FROM, from);
	curl_easy_setopt(c, CURLOPT_MAIL_RCPT, rcpt);
	curl_easy_setopt(c, CURLOPT_READFUNCTION, upload_read);
	curl_easy_setopt(c, CURLOPT_READDATA, &up);
	curl_easy_setopt(c, CURLOPT_UPLOAD, 1L);
	curl_easy_setopt(c, CURLOPT_INFILESIZE_LARGE, (curl_off_t)msg->len);
	CURLcode rc = curl_easy_perform(c);
	long code = 0;
	curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
	curl_slist_free_all(rcpt);
	if (rc == CURLE_OK)
		return SEND_OK;
	enum send_result r = smtp_classify(rc, code, tr.stage, tr.reply);
	if (strcmp(cfg->log_pii, "yes") != 0)
		redact_addrs(tr.reply, sizeof tr.reply);
	char shown[512];
	url_shown(cfg->smtp_url, shown, sizeof shown);
	snprintf(err, errlen, "smtp_url %s: %s%s%s%s (at %s)%s", shown,
		 *cerr ? cerr : curl_easy_strerror(rc),
		 *tr.reply ? ": \"" : "", tr.reply, *tr.reply ? "\"" : "",
		 tr.stage,
		 r == SEND_CONFIG ? " — the relay refuses us: check smtp_user, "
				    "smtp_password, from and TLS, and whether "
				    "the relay blocks this host; nothing more is "
				    "sent this tick" :
		 r == SEND_DOWN ? " — the relay is unavailable (is it running? "
				  "smtp_url, smtp_connect_timeout, smtp_reply_timeout); "
				  "no attempt counted, nothing more is sent this tick" :
		 rc == CURLE_COULDNT_CONNECT ? " — is the relay running?" :
		 rc == CURLE_OPERATION_TIMEDOUT ? " — the relay did not answer in "
		 "time (smtp_connect_timeout, smtp_reply_timeout); tried again later" : "");
	return r;
}

static enum send_result outbox_write(struct app *app, int64_t id,
				     const struct buf *msg, char *err,
				     size_t errlen)
{
	char path[PATH_MAX];
	if (mkdir_p(app->cfg->outbox, 0700) < 0 ||
	    snprintf(path, sizeof path, "%s/m%06lld.eml", app->cfg->outbox,
		     (long long)id) >= (int)sizeof path ||
	    write_file_atomic(path, msg->data, msg->len, 0600) < 0) {
		snprintf(err, errlen, "outbox %s: %s", app->cfg->outbox,
			 strerror(errno));
		return SEND_TEMP;
	}
	return SEND_OK;
}

static enum send_result mail_send(struct app *app, int64_t id, const char *to,
				  const struct buf *msg, char *err, size_t errlen)
{
	if (buf_failed(msg)) { /* never a message cut short */
		snprintf(err, errlen, "out of memory building the message");
		return SEND_TEMP;
	}
	char from[320];
	if (!*app->cfg->smtp_url)
		return outbox_write(app, id, msg, err, errlen);
	if (verp_sender(app, id, from, sizeof from) < 0) {
		snprintf(err, errlen, "bounce_address: too long for an envelope sender");
		return SEND_CONFIG;
	}
	return smtp_send(app, from, to, msg, err, errlen);
}

/* ==== Web push: VAPID and RFC 8291 encryption ========================= */
/*
 * A notification goes to the endpoint a browser's push service gave it
 * (RFC 8030), encrypted to that browser's P-256 key and auth secret (RFC
 * 8291: ECDH, an HKDF key schedule, one aes128gcm record of RFC 8188),
 * and signed for the push service with the store's VAPID key (RFC 8292:
 * an ES256 JWT). libsodium has no P-256: ECDH, ECDSA and AES-128-GCM come
 * from OpenSSL's libcrypto; HMAC-SHA-256 (HKDF's one primitive) and
 * base64url from libsodium. Nothing here is hand-rolled beyond the RFC's
 * key schedule. The VAPID private key lives in vapid_key_file (PEM,
 * 0600) and is read per send. A 404 or 410 from the push service means
 * the browser unsubscribed: the subscription is deleted.
 */

/* HMAC-SHA-256(KEY, A || B): HKDF-Extract is HMAC(salt, IKM), and an
 * HKDF-Expand of at most 32 bytes is HMAC(PRK, info || 0x01) cut short. */
static void hmac256(const unsigned char *key, size_t klen,
		    const unsigned char *a, size_t alen,
		    const unsigned char *b, size_t blen, unsigned char out[32])
{
	crypto_auth_hmacsha256_state st;
	crypto_auth_hmacsha256_init(&st, key, klen);
	crypto_auth_hmacsha256_update(&st, a, alen);
	crypto_auth_hmacsha256_update(&st, b, blen);
	crypto_auth_hmacsha256_final(&st, out);
	sodium_memzero(&st, sizeof st);
}

static void hkdf_expand1(const unsigned char prk[32], const void *info,
			 size_t n, unsigned char out[32])
{
	static const unsigned char one = 1;
	hmac256(prk, 32, info, n, &one, 1, out);
}

/* A P-256 key from its raw parts: the uncompressed point PUB, and the
 * scalar PRIV (NULL: a public key only). NULL if the point is not one
 * of the curve's (libcrypto checks it). */
static EVP_PKEY *ec_key_raw(const unsigned char *priv,
			    const unsigned char pub[65])
{
	OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
	EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
	BIGNUM *d = priv ? BN_bin2bn(priv, 32, NULL) : NULL;
	OSSL_PARAM *params = NULL;
	EVP_PKEY *key = NULL;
	if (pub[0] != 4 || !bld || !ctx || (priv && !d) ||
	    !OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME,
					     "prime256v1", 0) ||
	    !OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY,
					      pub, 65) ||
	    (d && !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_PRIV_KEY, d)) ||
	    !(params = OSSL_PARAM_BLD_to_param(bld)) ||
	    EVP_PKEY_fromdata_init(ctx) <= 0 ||
	    EVP_PKEY_fromdata(ctx, &key, d ? EVP_PKEY_KEYPAIR
					  : EVP_PKEY_PUBLIC_KEY, params) <= 0) {
		EVP_PKEY_free(key);
		key = NULL;
	}
	OSSL_PARAM_free(params);
	OSSL_PARAM_BLD_free(bld);
	BN_clear_free(d);
	EVP_PKEY_CTX_free(ctx);
	return key;
}

/* The uncompressed point of KEY's public half. */
static int ec_pub_raw(EVP_PKEY *key, unsigned char pub[65])
{
	size_t n = 0;
	return EVP_PKEY_get_octet_string_param(key, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY,
					       pub, 65, &n) > 0 && n == 65 &&
			       pub[0] == 4 ? 0 : -1;
}

static int ecdh_p256(EVP_PKEY *mine, EVP_PKEY *peer, unsigned char out[32])
{
	EVP_PKEY_CTX *c = EVP_PKEY_CTX_new(mine, NULL);
	size_t n = 32;
	int rc = c && EVP_PKEY_derive_init(c) > 0 &&
		 EVP_PKEY_derive_set_peer(c, peer) > 0 &&
		 EVP_PKEY_derive(c, out, &n) > 0 && n == 32 ? 0 : -1;
	EVP_PKEY_CTX_free(c);
	return rc;
}

/* One last record of RFC 8188: MSG, the delimiter 0x02 (no padding), and
 * the 16-byte tag, AES-128-GCM under KEY and IV; appended to OUT. */
static int gcm_seal(const unsigned char key[16], const unsigned char iv[12],
		    const void *msg, size_t n, struct buf *out)
{
	static const unsigned char last = 2;
	EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
	int a = 0, b = 0, f = 0, rc = -1;
	if (!c || n > PUSH_MAX_PAYLOAD || buf_reserve(out, n + 1 + 16) < 0)
		goto out;
	unsigned char *p = (unsigned char *)out->data + out->len;
	if (EVP_EncryptInit_ex(c, EVP_aes_128_gcm(), NULL, key, iv) <= 0 ||
	    EVP_EncryptUpdate(c, p, &a, msg, (int)n) <= 0 ||
	    EVP_EncryptUpdate(c, p + a, &b, &last, 1) <= 0 ||
	    EVP_EncryptFinal_ex(c, p + a + b, &f) <= 0 ||
	    (size_t)(a + b + f) != n + 1 ||
	    EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, 16, p + n + 1) <= 0)
		goto out;
	out->len += n + 1 + 16;
	out->data[out->len] = '\0';
	rc = 0;
out:
	EVP_CIPHER_CTX_free(c);
	return rc;
}

int push_encrypt_with(const unsigned char ua_pub[65],
		      const unsigned char auth[16],
		      const unsigned char as_priv[32],
		      const unsigned char as_pub[65],
		      const unsigned char salt[16], const void *msg, size_t n,
		      struct buf *out)
{
	EVP_PKEY *me = ec_key_raw(as_priv, as_pub), *ua = ec_key_raw(NULL, ua_pub);
	unsigned char secret[32], prk_key[32], ikm[32], prk[32], cek[32], nonce[32];
	unsigned char info[14 + 65 + 65], head[16 + 4 + 1 + 65];
	int rc = -1;
	if (!me || !ua || n > PUSH_MAX_PAYLOAD || ecdh_p256(me, ua, secret) < 0)
		goto out;
	/* RFC 8291 section 3.4 */
	hmac256(auth, 16, secret, 32, NULL, 0, prk_key);
	memcpy(info, "WebPush: info", 14); /* with its NUL */
	memcpy(info + 14, ua_pub, 65);
	memcpy(info + 79, as_pub, 65);
	hkdf_expand1(prk_key, info, sizeof info, ikm);
	hmac256(salt, 16, ikm, 32, NULL, 0, prk);
	hkdf_expand1(prk, "Content-Encoding: aes128gcm", 28, cek);
	hkdf_expand1(prk, "Content-Encoding: nonce", 24, nonce);
	/* RFC 8188 header: salt, record size 4096, the key id = as_pub */
	memcpy(head, salt, 16);
	memcpy(head + 16, "\0\0\x10\0", 4);
	head[20] = 65;
	memcpy(head + 21, as_pub, 65);
	size_t at = out->len;
	if (buf_add(out, head, sizeof head) < 0 || gcm_seal(cek, nonce, msg, n,
							   out) < 0) {
		if (!out->failed && out->len >= at)
			out->len = at;
		goto out;
	}
	rc = 0;
out:
	sodium_memzero(secret, sizeof secret);
	sodium_memzero(prk_key, sizeof prk_key);
	sodium_memzero(ikm, sizeof ikm);
	sodium_memzero(prk, sizeof prk);
	sodium_memzero(cek, sizeof cek);
	EVP_PKEY_free(me);
	EVP_PKEY_free(ua);
	return rc;
}

int push_encrypt(const unsigned char ua_pub[65], const unsigned char auth[16],
		 const void *msg, size_t n, struct buf *out)
{
	EVP_PKEY *k = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
	BIGNUM *d = NULL;
	unsigned char priv[32], pub[65], salt[16];
	int rc = -1;
	if (k && ec_pub_raw(k, pub) == 0 &&
	    EVP_PKEY_get_bn_param(k, OSSL_PKEY_PARAM_PRIV_KEY, &d) > 0 &&
	    BN_bn2binpad(d, priv, 32) == 32) {
		randombytes_buf(salt, sizeof salt);
		rc = push_encrypt_with(ua_pub, auth, priv, pub, salt, msg, n, out);
	}
	sodium_memzero(priv, sizeof priv);
	BN_clear_free(d);
	EVP_PKEY_free(k);
	return rc;
}

static void b64url(const unsigned char *p, size_t n, char *out, size_t outlen)
{
	sodium_bin2base64(out, outlen, p, n,
			  sodium_base64_VARIANT_URLSAFE_NO_PADDING);
}

/* The VAPID key in PATH; NULL and ERR if it cannot be read. */
static EVP_PKEY *vapid_load(const char *path, char *err, size_t errlen)
{
	FILE *f = fopen(path, "r");
	if (!f) {
		snprintf(err, errlen, "vapid_key_file %s: %s — run 'remarket keygen "
			 "--vapid'", path, strerror(errno));
		return NULL;
	}
	EVP_PKEY *k = PEM_read_PrivateKey(f, NULL, NULL, NULL);
	fclose(f);
	unsigned char pub[65];
	if (!k || !EVP_PKEY_is_a(k, "EC") || ec_pub_raw(k, pub) < 0) {
		snprintf(err, errlen, "vapid_key_file %s: not a P-256 private key "
			 "in PEM (made by 'remarket keygen --vapid')", path);
		EVP_PKEY_free(k);
		return NULL;
	}
	return k;
}

static int vapid_pub_b64(EVP_PKEY *k, char *pub, size_t publen)
{
	unsigned char raw[65];
	if (publen < 88 || ec_pub_raw(k, raw) < 0)
		return -1;
	b64url(raw, sizeof raw, pub, publen);
	return 0;
}

int vapid_public(const char *path, char *pub, size_t publen, char *err,
		 size_t errlen)
{
	EVP_PKEY *k = vapid_load(path, err, errlen);
	int rc = k ? vapid_pub_b64(k, pub, publen) : -1;
	EVP_PKEY_free(k);
	return rc;
}

int vapid_keygen(const char *path, char *pub, size_t publen, char *err,
		 size_t errlen)
{
	EVP_PKEY *k = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
	BIO *mem = BIO_new(BIO_s_mem());
	char *pem = NULL;
	long n = 0;
	int rc = -1;
	if (!k || !mem || !PEM_write_bio_PrivateKey(mem, k, NULL, NULL, 0, NULL,
						    NULL) ||
	    (n = BIO_get_mem_data(mem, &pem)) <= 0 || vapid_pub_b64(k, pub, publen) < 0) {
		snprintf(err, errlen, "cannot make a P-256 key (libcrypto)");
		goto out;
	}
	if (access(path, F_OK) == 0) {
		snprintf(err, errlen, "vapid_key_file %s exists: a new key would "
			 "orphan every subscription; remove it first to start over",
			 path);
		goto out;
	}
	if (mkdir_parent(path) < 0 ||
	    write_file_atomic(path, pem, (size_t)n, 0600) < 0) {
		snprintf(err, errlen, "vapid_key_file %s: %s", path, strerror(errno));
		goto out;
	}
	rc = 0;
out:
	if (pem && n > 0)
		OPENSSL_cleanse(pem, (size_t)n);
	BIO_free(mem);
	EVP_PKEY_free(k);
	return rc;
}

/* ES256 signature of DATA as JWS wants it: r || s, 32 bytes each (the
 * DER of libcrypto, converted). */
static int es256_sign(EVP_PKEY *k, const char *data, size_t n,
		      unsigned char sig[64])
{
	EVP_MD_CTX *md = EVP_MD_CTX_new();
	unsigned char der[80];
	size_t dlen = sizeof der;
	const unsigned char *p = der;
	ECDSA_SIG *s = NULL;
	int rc = -1;
	if (md && EVP_DigestSignInit(md, NULL, EVP_sha256(), NULL, k) > 0 &&
	    EVP_DigestSign(md, der, &dlen, (const unsigned char *)data, n) > 0 &&
	    (s = d2i_ECDSA_SIG(NULL, &p, (long)dlen)) &&
	    BN_bn2binpad(ECDSA_SIG_get0_r(s), sig, 32) == 32 &&
	    BN_bn2binpad(ECDSA_SIG_get0_s(s), sig + 32, 32) == 32)
		rc = 0;
	ECDSA_SIG_free(s);
	EVP_MD_CTX_free(md);
	return rc;
}

static int vapid_jwt_key(EVP_PKEY *k, const char *aud, rm_time exp,
			 const char *sub, struct buf *out)
{
	/* aud is an origin made by curl_url and sub was checked by cfg_load:
	 * neither holds a character JSON would escape */
	if (strpbrk(aud, "\"\\") || strpbrk(sub, "\"\\"))
		return -1;
	struct buf claims = {0};
	char enc[512];
	unsigned char sig[64];
	buf_addf(&claims, "{\"aud\":\"%s\",\"exp\":%lld,\"sub\":\"%s\"}", aud,
		 (long long)exp, sub);
	size_t at = out->len;
	int rc = -1;
	if (buf_failed(&claims) || claims.len > 350)
		goto out;
	/* {"typ":"JWT","alg":"ES256"} */
	buf_adds(out, "eyJ0eXAiOiJKV1QiLCJhbGciOiJFUzI1NiJ9.");
	b64url((unsigned char *)claims.data, claims.len, enc, sizeof enc);
	buf_adds(out, enc);
	if (buf_failed(out) || es256_sign(k, out->data + at, out->len - at, sig) < 0)
		goto out;
	b64url(sig, sizeof sig, enc, sizeof enc);
	buf_addf(out, ".%s", enc);
	rc = buf_failed(out) ? -1 : 0;
out:
	buf_free(&claims);
	return rc;
}

int vapid_jwt(const char *path, const char *aud, rm_time exp, const char *sub,
	      struct buf *out, char *err, size_t errlen)
{
	EVP_PKEY *k = vapid_load(path, err, errlen);
	if (!k)
		return -1;
	int rc = vapid_jwt_key(k, aud, exp, sub, out);
	if (rc < 0)
		snprintf(err, errlen, "cannot sign the VAPID token");
	EVP_PKEY_free(k);
	return rc;
}

/* The origin (the JWT's audience) of a push endpoint; -1 unless it is an
 * https URL (http too with allow_insecure_links = yes: tests, staging). */
static int push_origin(const struct config *cfg, const char *url, char *aud,
		       size_t n)
{
	CURLU *u = curl_url();
	char *scheme = NULL, *host = NULL, *port = NULL;
	int rc = -1;
	if (u && strlen(url) <= 1024 && !has_crlf(url) &&
	    curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
	    curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
	    curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK && *host &&
	    (!strcmp(scheme, "https") || (!strcmp(scheme, "http") &&
					  !strcmp(cfg->allow_insecure_links, "yes")))) {
		curl_url_get(u, CURLUPART_PORT, &port, 0); /* only if written */
		int w = snprintf(aud, n, "%s://%s%s%s", scheme, host, port ? ":" : "",
				 port ? port : "");
		rc = w > 0 && (size_t)w < n ? 0 : -1;
	}
	curl_free(scheme);
	curl_free(host);
	curl_free(port);
	curl_url_cleanup(u);
	return rc;
}

/* A browser's keys from the base64url of its PushSubscription (padded
 * or not): a point of P-256 and a 16-byte auth secret. */
static int push_keys(const char *p256dh, const char *auth,
		     unsigned char ua[65], unsigned char secret[16])
{
	size_t n = 0, m = 0;
	const char *end;
	if (!p256dh || !auth ||
	    sodium_base642bin(ua, 65, p256dh, strlen(p256dh), "=", &n, &end,
			      sodium_base64_VARIANT_URLSAFE_NO_PADDING) < 0 ||
	    *end || n != 65 ||
	    sodium_base642bin(secret, 16, auth, strlen(auth), "=", &m, &end,
			      sodium_base64_VARIANT_URLSAFE_NO_PADDING) < 0 ||
	    *end || m != 16)
		return -1;
	EVP_PKEY *k = ec_key_raw(NULL, ua);
	EVP_PKEY_free(k);
	return k ? 0 : -1;
}

/* The encrypted notification and its headers for subscription ID. */
static int push_build(struct app *app, int64_t id, const char *title,
		      const char *body, const char *url, char *endpoint,
		      size_t elen, struct buf *msg, struct curl_slist **hdrs,
		      char *err, size_t errlen)
{
	const struct config *cfg = app->cfg;
	unsigned char ua[65], auth[16];
	char aud[600], pub[100];
	struct buf payload = {0}, line = {0};
	EVP_PKEY *k = NULL;
	int rc = -1, found = 0;
	sqlite3_stmt *s = q(app->db, ST_PUSH_SUB_GET, "i", id);
	if (sqlite3_step(s) == SQLITE_ROW) {
		found = copy_str(endpoint, elen, col_text(s, 0)) == 0 &&
			push_keys(col_text(s, 1), col_text(s, 2), ua, auth) == 0;
		found = found ? 1 : -1;
	}
	sqlite3_reset(s);
	if (found <= 0) {
		snprintf(err, errlen, found ? "push subscription %lld: bad endpoint "
			 "or keys" : "no push subscription %lld", (long long)id);
		goto out;
	}
	if (!*cfg->vapid_subject) {
		snprintf(err, errlen, "vapid_subject: not set — the push service "
			 "wants a contact (mailto:you@shop.example or https://...)");
		goto out;
	}
	if (push_origin(cfg, endpoint, aud, sizeof aud) < 0) {
		snprintf(err, errlen, "push subscription %lld: endpoint is not an "
			 "https URL", (long long)id);
		goto out;
	}
	if (!(k = vapid_load(cfg->vapid_key_file, err, errlen)))
		goto out;
	json_from(app->db, q(app->db, ST_PUSH_PAYLOAD, "tttt", title, body,
			     url, *cfg->logo_url ? cfg->logo_url : NULL), &payload);
	if (buf_failed(&payload) || !payload.len ||
	    payload.len > PUSH_MAX_PAYLOAD) {
		snprintf(err, errlen, "push message: too long (%zu bytes of JSON, "
			 "%d at most)", payload.len, PUSH_MAX_PAYLOAD);
		goto out;
	}
	/* 12 hours, half of RFC 8292's day at most, on the real clock */
	buf_adds(&line, "Authorization: vapid t=");
	if (vapid_jwt_key(k, aud, (rm_time)time(NULL) + 12 * 3600,
			  cfg->vapid_subject, &line) < 0 ||
	    vapid_pub_b64(k, pub, sizeof pub) < 0 ||
	    push_encrypt(ua, auth, payload.data, payload.len, msg) < 0) {
		snprintf(err, errlen, "push message: cannot sign or encrypt it");
		goto out;
	}
	buf_addf(&line, ", k=%s", pub);
	const char *fixed[] = {"Content-Type: application/octet-stream",
			       "Content-Encoding: aes128gcm", "TTL: 86400",
			       "Urgency: normal", buf_str(&line)};
	for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) {
		struct curl_slist *h = curl_slist_append(*hdrs, fixed[i]);
		if (!h)
			goto out;
		*hdrs = h;
	}
	rc = buf_failed(&line) || buf_failed(msg) ? -1 : 0;
out:
	EVP_PKEY_free(k);
	buf_free(&payload);
	buf_free(&line);
	return rc;
}

int push_send(struct app *app, int64_t id, const char *title,
	      const char *body, const char *url, char *err, size_t errlen)
{
	char endpoint[1100];
	struct buf msg = {0};
	struct curl_slist *hdrs = NULL;
	CURL *c = NULL;
	long status = 0;
	int rc = -1;
	if (push_build(app, id, title, body, url, endpoint, sizeof endpoint, &msg,
		       &hdrs, err, errlen) < 0)
		goto out;
	if (!(c = curl_easy_init())) {
		snprintf(err, errlen, "out of memory");
		goto out;
	}
	curl_easy_setopt(c, CURLOPT_URL, endpoint);
	curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "https,http");
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 10L);
	curl_easy_setopt(c, CURLOPT_TIMEOUT, 30L);
	curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdrs);
	curl_easy_setopt(c, CURLOPT_POSTFIELDS, msg.data);
	curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long)msg.len);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
	CURLcode cc = curl_easy_perform(c);
	if (cc != CURLE_OK) {
		snprintf(err, errlen, "push service %s: %s", endpoint,
			 curl_easy_strerror(cc));
		goto out;
	}
	curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
	if (status == 404 || status == 410) {
		/* the browser unsubscribed or the subscription expired */
		q_exec(app->db, q(app->db, ST_PUSH_SUB_GONE, "i", id));
		snprintf(err, errlen, "push service: %ld — the browser left; "
			 "subscription %lld deleted", status, (long long)id);
		rc = -2;
		goto out;
	}
	q_exec(app->db, q(app->db, ST_PUSH_SUB_SENT, "iii", id,
			  (int64_t)time(NULL), (int64_t)status));
	if (status < 200 || status > 299) {
		snprintf(err, errlen, "push service %s: HTTP %ld", endpoint, status);
		goto out;
	}
	rc = 0;
out:
	curl_easy_cleanup(c);
	curl_slist_free_all(hdrs);
	buf_free(&msg);
	return rc;
}

/* 1 if a flow step may send by push: the VAPID key readable and
 * vapid_subject set (push_send refuses to sign without either). */
int push_ready(const struct config *cfg)
{
	return *cfg->vapid_subject && access(cfg->vapid_key_file, R_OK) == 0;
}

/* ==== The message context ============================================= */
/*
 * One claimed message, from its row to its bytes: msg_load reads the
 * row (struct msgrow) with its contact, cart and step; msg_exit_reason
 * says whether it must not go out; msg_prepare fixes its Message-ID and
 * discount code at the first attempt (the only rows written here), so
 * that every attempt sends the same message; mc_build fills the template
 * variables (names, items, recommendations, review links, the discount,
 * the signed links) and msg_compose renders and builds it. This section
 * records nothing about the message's outcome (the flow engine does) and
 * sends nothing.
 */

/* One message as the tick sees it: its row, its enrollment, step,
 * contact and cart, read at send time by msg_load. */
struct msgrow {
	int64_t id, enrollment, contact;
	int step, attempts, pct, has_step, unsub, suppressed, consent;
	long valid;
	double total, min_spend;
	char message_id[160], code[40], estatus[16], email[256], name[128];
	char cart_key[80], cart_status[16], currency[8], tpl[80];
	char trigger[20], step_segment[16], segment[16], flow[64];
	char variant;
	int64_t owner; /* the lease this tick holds on the message */
	int ordered_since;
	int64_t order;
	char *items;
	int64_t due, next_gap; /* when the step was due; to the next one, or 0 */
	int printable; /* cart items a mail may print (signed or in the catalog) */
	char channels[64]; /* the step's: "email", "sms,email", ... */
	char phone[20];
	int sms_consent;
};

/* Reads message ID with its enrollment, flow, step, contact and cart into M;
 * -1 if the row is gone. */
static int msg_load(struct app *app, int64_t id, struct msgrow *m)
{
	sqlite3_stmt *s = q(app->db, ST_MESSAGE_LOAD, "i", id);
	memset(m, 0, sizeof *m);
	if (sqlite3_step(s) != SQLITE_ROW) {
		sqlite3_reset(s);
		return -1;
	}
	m->id = id;
	m->step = sqlite3_column_int(s, 0);
	m->attempts = sqlite3_column_int(s, 1);
	copy_str(m->message_id, sizeof m->message_id, col_text(s, 2));
	copy_str(m->code, sizeof m->code, col_text(s, 3));
	m->enrollment = sqlite3_column_int64(s, 4);
	copy_str(m->estatus, sizeof m->estatus, col_text(s, 5));
	m->contact = sqlite3_column_int64(s, 6);
	copy_str(m->email, sizeof m->email, col_text(s, 7));
	copy_str(m->name, sizeof m->name, col_text(s, 8));
	m->unsub = sqlite3_column_type(s, 9) != SQLITE_NULL;
	m->suppressed = sqlite3_column_type(s, 10) != SQLITE_NULL;
	copy_str(m->cart_key, sizeof m->cart_key, col_text(s, 11));
	copy_str(m->cart_status, sizeof m->cart_status, col_text(s, 12));
	m->items = strdup(col_text(s, 13));
	m->total = sqlite3_column_double(s, 14);
	copy_str(m->currency, sizeof m->currency, col_text(s, 15));
	m->has_step = sqlite3_column_type(s, 16) != SQLITE_NULL;
	copy_str(m->tpl, sizeof m->tpl, col_text(s, 16));
	m->pct = sqlite3_column_int(s, 17);
	m->valid = (long)sqlite3_column_int64(s, 18);
	m->min_spend = sqlite3_column_double(s, 19);
	if (m->pct > 0 && m->valid <= 0)
		m->valid = 48 * 3600; /* a step with a discount but no valid= */
	copy_str(m->trigger, sizeof m->trigger, col_text(s, 20));
	copy_str(m->step_segment, sizeof m->step_segment, col_text(s, 21));
	copy_str(m->segment, sizeof m->segment, col_text(s, 22));
	m->ordered_since = sqlite3_column_int(s, 23);
	m->order = sqlite3_column_int64(s, 24);
	copy_str(m->flow, sizeof m->flow, col_text(s, 25));
	m->variant = col_text(s, 26)[0];
	m->consent = sqlite3_column_int(s, 27);
	m->due = sqlite3_column_int64(s, 28);
	m->next_gap = sqlite3_column_int64(s, 29);
	copy_str(m->channels, sizeof m->channels, col_text(s, 30));
	copy_str(m->phone, sizeof m->phone, col_text(s, 31));
	m->sms_consent = sqlite3_column_int(s, 32);
	sqlite3_reset(s);
	/* a mail with no cart (win-back, post-purchase) prints its amounts in
	 * the order's currency when it is about one, else the store's */
	if (!*m->currency && m->order) {
		sqlite3_stmt *o = q(app->db, ST_ORDER_OF, "i", m->order);
		if (sqlite3_step(o) == SQLITE_ROW)
			copy_str(m->currency, sizeof m->currency, col_text(o, 3));
		sqlite3_reset(o);
	}
	if (!*m->currency)
		copy_str(m->currency, sizeof m->currency, app->cfg->currency);
	if (m->items && *m->cart_key) { /* a browser's cart is priced now */
		sqlite3_stmt *t = q(app->db, ST_ITEMS_TRUST, "t", m->items);
		if (sqlite3_step(t) == SQLITE_ROW) {
			m->printable = sqlite3_column_int(t, 0);
			if (sqlite3_column_int(t, 1) > 0)
				m->total = sqlite3_column_double(t, 2);
		}
		sqlite3_reset(t);
	}
	return m->items ? 0 : -1;
}

/* Why this message must not go out, or NULL. "" means: not now. */
static const char *msg_exit_reason(const struct msgrow *m)
{
	if (strcmp(m->estatus, "active") != 0)
		return "enrollment ended";
	if (m->unsub)
		return "unsubscribe";
	if (!m->consent)
		return "consent withdrawn";
	if (m->suppressed)
		return "bounce";
	int cart = !strcmp(m->trigger, "cart_abandoned");
	if (cart && !strcmp(m->cart_status, "ordered"))
		return "order";
	if (cart && !strcmp(m->cart_status, "empty"))
		return "empty";
	if (cart && !m->printable) /* a browser's cart of unknown skus */
		return "no known item";
	if (!strcmp(m->trigger, "customer_lapsed") && m->ordered_since)
		return "order"; /* they came back: the win-back is done */
	if (!m->has_step)
		return "step removed";
	if (!segment_matches(m->step_segment, m->segment))
		return "segment";
	if (cart && !strcmp(m->cart_status, "open"))
		return ""; /* the shopper is back: wait until idle again */
	return NULL;
}

/* ---- the rendering context of one message ---- */

#define MC_VARS 48
#define MC_LISTS 3
struct item_vars {
	char *name, *sku, *url, *image, *brand, *category;
	char qty[16], price[48], line[48];
	struct tvar v[9];
};
struct mlist { /* a list variable: items, order_items, recommendations */
	struct item_vars *items;
	struct tctx *ctx;
	size_t n;
};
struct msgctx {
	struct tvar v[MC_VARS];
	size_t n;
	char *owned[MC_VARS];
	size_t nowned;
	struct mlist lists[MC_LISTS];
	int nlists;
	struct tctx ctx;
};

static void mc_set(struct msgctx *mc, const char *name, const char *value)
{
	if (mc->n >= MC_VARS || mc->nowned >= MC_VARS)
		abort(); /* MC_VARS is sized for the fixed set below */
	char *v = strdup(value ? value : "");
	if (!v)
		abort();
	mc->owned[mc->nowned++] = v;
	mc->v[mc->n++] = (struct tvar){name, v, NULL, 0};
}

/* How long a mail's cart link works: `flows set` refuses a step later
 * than this after its trigger, whose earlier mails' links are dead. */
#define RECOVER_LINK_DAYS 30

static void mc_url(struct msgctx *mc, struct app *app, const char *name,
		   char kind, int64_t subject, rm_time expires, const char *ext)
{
	char tok[TOK_MAXLEN + 1], url[1200];
	tok_sign(app->key, kind, subject, expires, tok, sizeof tok);
	snprintf(url, sizeof url, "%s/%c/%s%s", app->cfg->base_url, kind, tok,
		 ext);
	mc_set(mc, name, url);
}

/* The host of URL if it is http(s), else NULL (free with curl_free).
 * A URL that browsers and libcurl could read apart is refused: a
 * backslash (a browser's '/': "https://evil\\@shop/" is evil's there and
 * shop's here), a space or a control character, or a user name. */
static char *url_web_host(const char *url)
{
	for (const char *c = url; *c; c++)
		if (*c == '\\' || (unsigned char)*c <= ' ' || *c == 0x7f)
			return NULL;
	CURLU *u = curl_url();
	char *scheme = NULL, *host = NULL, *user = NULL;
	if (!u || curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
	    curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_OK ||
	    curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
	    (strcmp(scheme, "http") && strcmp(scheme, "https")) ||
	    curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK) {
		curl_free(host);
		host = NULL;
	}
	curl_free(user);
	curl_free(scheme);
	curl_url_cleanup(u);
	return host;
}

int link_on_store(const struct config *cfg, const char *url)
{
	char *want = url_web_host(cfg->store_url), *got = url_web_host(url);
	int ok = want && got && !strcasecmp(want, got);
	curl_free(want);
	curl_free(got);
	return ok;
}

int mc_link(struct app *app, int64_t msg, const char *target,
	    rm_time expires, struct buf *out)
{
	char tok[TOK_MAXLEN + 1];
	if (!*target || !link_on_store(app->cfg, target))
		return buf_adds(out, target) < 0 ? -1 : 0; /* /l/ would refuse it */
	char *esc = curl_easy_escape(NULL, target, 0);
	if (!esc || tok_sign_for(app->key, TOK_LINK, msg, expires, target,
				 strlen(target), tok, sizeof tok) < 0) {
		curl_free(esc);
		return -1;
	}
	buf_addf(out, "%s/l/%s?u=%s", app->cfg->base_url, tok, esc);
	curl_free(esc);
	return buf_failed(out) ? -1 : 1;
}

/* Appends one element to list L; strings are copied. BC: its brand and
 * category from the catalog ("" when unknown). */
static int list_add(struct mlist *l, const char *name, const char *sku,
		    int qty, double price, const char *url, const char *image,
		    const char *const bc[2], const char *cur, const char *locale)
{
	struct item_vars *iv = realloc(l->items, (l->n + 1) * sizeof *iv);
	if (!iv)
		return -1;
	l->items = iv;
	iv = &l->items[l->n++];
	memset(iv, 0, sizeof *iv);
	iv->name = strdup(name);
	iv->sku = strdup(sku);
	iv->url = strdup(url);
	iv->image = strdup(image);
	iv->brand = strdup(bc[0]);
	iv->category = strdup(bc[1]);
	snprintf(iv->qty, sizeof iv->qty, "%d", qty);
	mail_money(iv->price, sizeof iv->price, price, cur, locale, 0);
	mail_money(iv->line, sizeof iv->line, price * qty, cur, locale, 0);
	return iv->name && iv->sku && iv->url && iv->image && iv->brand &&
	       iv->category ? 0 : -1;
}

/* Makes list L visible to templates as NAME. */
static int list_publish(struct msgctx *mc, struct mlist *l, const char *name)
{
	static const char *const names[] = {"name", "sku", "url", "image", "qty",
					    "price", "line_total", "brand",
					    "category"};
	l->ctx = calloc(l->n ? l->n : 1, sizeof *l->ctx);
	if (!l->ctx || mc->n >= MC_VARS)
		return -1;
	for (size_t i = 0; i < l->n; i++) {
		struct item_vars *iv = &l->items[i];
		const char *vals[] = {iv->name, iv->sku, iv->url, iv->image,
				      iv->qty, iv->price, iv->line, iv->brand,
				      iv->category};
		for (int k = 0; k < 9; k++)
			iv->v[k] = (struct tvar){names[k], vals[k], NULL, 0};
		l->ctx[i] = (struct tctx){iv->v, 9, NULL};
	}
	mc->v[mc->n++] = (struct tvar){name, NULL, l->ctx, l->n};
	return 0;
}

static struct mlist *mc_list(struct msgctx *mc)
{
	if (mc->nlists >= MC_LISTS)
		abort(); /* sized for the lists a message can have */
	return &mc->lists[mc->nlists++];
}

/* A JSON items array (of a cart or an order) as the list NAME. */
static int mc_items(struct msgctx *mc, struct app *app, const char *name,
		    const char *items, const char *cur)
{
	struct mlist *l = mc_list(mc);
	sqlite3_stmt *s = q(app->db, ST_ITEMS_EACH, "t", items);
	int rc = 0;
	while (rc == 0 && sqlite3_step(s) == SQLITE_ROW &&
	       l->n < (size_t)app->cfg->max_items) {
		const char *bc[2] = {col_text(s, 6), col_text(s, 7)};
		rc = list_add(l, col_text(s, 0), col_text(s, 1),
			      sqlite3_column_int(s, 2), sqlite3_column_double(s, 3),
			      col_text(s, 4), col_text(s, 5), bc, cur,
			      app->cfg->locale);
	}
	sqlite3_reset(s);
	return rc ? rc : list_publish(mc, l, name);
}

/* 1 if template NAME (its .txt or .html, or a partial they include, four
 * deep as tpl_partial allows) has a tag for VAR: {{VAR}}, {{#VAR}} or
 * {{^VAR}}. The recommendation queries run only for such a template. A
 * file that cannot be read counts as using it (rendering will say why). */
static int mc_tpl_uses(const char *dir, const char *name, size_t n,
		       const char *ext, const char *var, int depth)
{
	char path[PATH_MAX];
	struct buf b = {0};
	int w = snprintf(path, sizeof path, "%s/%.*s%s", dir, (int)n, name, ext);
	if (w < 0 || (size_t)w >= sizeof path || template_read(path, &b) < 0) {
		buf_free(&b);
		return 1;
	}
	int uses = 0;
	size_t vl = strlen(var);
	for (const char *t = b.data; !uses && (t = strstr(t, "{{")); t += 2) {
		const char *tag = t + 2, *end = strstr(tag, "}}");
		if (!end)
			break;
		char kind = *tag;
		if (strchr("#^/>", kind))
			tag++;
		size_t tl = (size_t)(end - tag);
		int plain = tl > 0 && tl < 64;
		for (size_t i = 0; plain && i < tl; i++)
			plain = isalnum((unsigned char)tag[i]) || tag[i] == '_' ||
				tag[i] == '-';
		if (kind == '>' && depth < 4 && plain)
			uses = mc_tpl_uses(dir, tag, tl, ext, var, depth + 1);
		else if (kind != '/' && kind != '>')
			uses = tl == vl && !memcmp(tag, var, vl);
	}
	buf_free(&b);
	return uses;
}

int mc_template_uses(struct app *app, const char *tpl, const char *var)
{
	const char *dir = app->cfg->templates;
	return mc_tpl_uses(dir, tpl, strlen(tpl), ".txt", var, 0) ||
	       mc_tpl_uses(dir, tpl, strlen(tpl), ".html", var, 0);
}

struct reco_list {
	struct mlist *l;
	const char *cur, *locale;
	const char *except; /* a browse mail's product: shown above, not here */
	int left;           /* how many more to list */
};

static int reco_item(void *arg, sqlite3_stmt *row)
{
	struct reco_list *r = arg;
	if (r->left <= 0 || (r->except && !strcmp(r->except, col_text(row, 0))))
		return 0;
	r->left--;
	const char *bc[2] = {col_text(row, 5), col_text(row, 6)};
	return list_add(r->l, col_text(row, 1), col_text(row, 0), 1,
			sqlite3_column_double(row, 2), col_text(row, 3),
			col_text(row, 4), bc, r->cur, r->locale);
}

/* N recommendations for CONTACT, never the product EXCEPT (NULL: none):
 * one more is asked for, in case it is among them. */
static int mc_recos(struct msgctx *mc, struct app *app, int64_t contact,
		    const char *cur, const char *except, int n)
{
	struct reco_list r = {mc_list(mc), cur, app->cfg->locale, except, n};
	if (reco_refresh(app, RECO_CHUNK_LINES, RECO_MAIL_MS) < 0)
		return -1;
	if (reco_walk(app, contact, except ? n + 1 : n, reco_item, &r) < 0)
		return -1;
	return list_publish(mc, r.l, "recommendations");
}

static void mc_review(struct msgctx *mc, struct app *app, const char *items)
{
	sqlite3_stmt *s = q(app->db, ST_BEST_REVIEW, "t", items);
	if (sqlite3_step(s) == SQLITE_ROW) {
		static const char *const stars[] = {"", "★☆☆☆☆", "★★☆☆☆",
						    "★★★☆☆", "★★★★☆", "★★★★★"};
		int r = sqlite3_column_int(s, 1);
		mc_set(mc, "has_review", "1");
		mc_set(mc, "review_author", col_text(s, 0));
		mc_set(mc, "review_rating", col_text(s, 1));
		mc_set(mc, "review_stars", stars[r >= 1 && r <= 5 ? r : 0]);
		mc_set(mc, "review_text", col_text(s, 2));
		mc_set(mc, "review_product", col_text(s, 3));
	}
	sqlite3_reset(s);
}

static void mc_discount(struct msgctx *mc, struct app *app,
			const struct msgrow *m, rm_time expires)
{
	char pct[16], when[80];
	/* in the store's time zone and words: "Sunday 6 December, 14:00" */
	mail_date(when, sizeof when, expires, app->cfg->locale);
	snprintf(pct, sizeof pct, "%d", m->pct);
	char min[48] = "";
	if (m->min_spend > 0) /* "£95", as min_spend_nice rounds it */
		mail_money(min, sizeof min, m->min_spend, m->currency,
			   app->cfg->locale, 1);
	mc_set(mc, "discount_code", m->code);
	mc_set(mc, "discount_percent", pct);
	mc_set(mc, "discount_min_spend", min);
	mc_set(mc, "discount_expires", when[0] ? when : "");
	mc_url(mc, app, "discount_url", TOK_DISCOUNT, m->id, expires + 30 * 86400,
	       "");
}

static void mc_free(struct msgctx *mc)
{
	for (size_t i = 0; i < mc->nowned; i++)
		free(mc->owned[i]);
	for (int k = 0; k < mc->nlists; k++) {
		struct mlist *l = &mc->lists[k];
		for (size_t i = 0; i < l->n; i++) {
			free(l->items[i].name);
			free(l->items[i].sku);
			free(l->items[i].url);
			free(l->items[i].image);
			free(l->items[i].brand);
			free(l->items[i].category);
		}
		free(l->items);
		free(l->ctx);
	}
}

/* The footer's sentence: why this person gets this email. */
/* A browse mail: the product viewed (items, from the catalog) and two
 * recommendations that are not it. */
static int mc_browse(struct msgctx *mc, struct app *app, const struct msgrow *m)
{
	if (mc_items(mc, app, "items", m->items, m->currency) < 0)
		return -1;
	const char *sku = mc->lists[mc->nlists - 1].n ?
			  mc->lists[mc->nlists - 1].items[0].sku : NULL;
	return mc_recos(mc, app, m->contact, m->currency, sku, 2);
}

static void mc_reason(struct msgctx *mc, const struct config *cfg,
		      const char *trigger)
{
	char r[300];
	snprintf(r, sizeof r, "You are receiving this because %s %s.",
		 !strcmp(trigger, "cart_abandoned") ? "you left items in your cart at" :
		 !strcmp(trigger, "order_placed") ? "you ordered from" :
		 !strcmp(trigger, "browse_abandoned") ? "you looked at a product at" :
		 "you are a customer of", cfg->store_name);
	mc_set(mc, "reason", r);
}

/* The order a post-purchase message is about: order_id, order_items,
 * order_total. A preview's sample order (m->order < 0) is m's items,
 * total and currency. */
static int mc_order(struct msgctx *mc, struct app *app, const struct msgrow *m)
{
	char key[80] = "", cur[8], total[48];
	copy_str(cur, sizeof cur, app->cfg->currency);
	struct buf items = {0};
	double sum = 0;
	if (m->order < 0) {
		copy_str(key, sizeof key, "SAMPLE-1001");
		buf_adds(&items, m->items);
		sum = m->total;
		copy_str(cur, sizeof cur, m->currency);
	}
	sqlite3_stmt *s = q(app->db, ST_ORDER_OF, "i", m->order);
	if (m->order > 0 && sqlite3_step(s) == SQLITE_ROW) {
		copy_str(key, sizeof key, col_text(s, 0));
		buf_adds(&items, col_text(s, 1));
		sum = sqlite3_column_double(s, 2);
		copy_str(cur, sizeof cur, col_text(s, 3));
	}
	sqlite3_reset(s);
	mail_money(total, sizeof total, sum, cur, app->cfg->locale, 0);
	mc_set(mc, "order_id", key);
	mc_set(mc, "order_total", total);
	int rc = buf_failed(&items) ? -1 :
		 mc_items(mc, app, "order_items", items.data ? items.data : "[]", cur);
	buf_free(&items);
	return rc;
}

/* Every store and product link of message M through /l/, so that its
 * clicks count and attribute orders as the recovery link's do: store_url
 * and each list's url (store_home keeps the plain address, for text). */
static int mc_track(struct msgctx *mc, struct app *app, const struct msgrow *m,
		    rm_time now)
{
	rm_time until = now + 400 * 86400;
	struct buf b = {0};
	int rc = mc_link(app, m->id, app->cfg->store_url, until, &b) < 0 ? -1 : 0;
	if (rc == 0)
		mc_set(mc, "store_url", buf_str(&b));
	mc_set(mc, "store_home", app->cfg->store_url);
	for (int k = 0; rc == 0 && k < mc->nlists; k++)
		for (size_t i = 0; rc == 0 && i < mc->lists[k].n; i++) {
			struct item_vars *iv = &mc->lists[k].items[i];
			buf_reset(&b);
			char *u = NULL;
			if (mc_link(app, m->id, iv->url, until, &b) < 0 ||
			    !(u = strdup(buf_str(&b)))) {
				rc = -1;
				break;
			}
			free(iv->url);
			iv->url = u;
			iv->v[2].value = u; /* list_publish set it: "url" */
		}
	buf_free(&b);
	return rc;
}

/* Fills the template variables of message M: names, items, order, review
 * and recommendation lists, the discount code and every signed link. */
static int mc_build(struct msgctx *mc, struct app *app, const struct msgrow *m,
		    rm_time now, rm_time code_expires)
{
	struct config *cfg = app->cfg;
	char first[128], total[48], count[16], year[8];
	copy_str(first, sizeof first, m->name);
	first[strcspn(first, " ")] = '\0';
	mail_money(total, sizeof total, m->total, m->currency, cfg->locale, 0);
	struct tm tm;
	time_t t = (time_t)now;
	localtime_r(&t, &tm);
	snprintf(year, sizeof year, "%d", tm.tm_year + 1900);
	mc_set(mc, "store_name", cfg->store_name);
	mc_set(mc, "store_tagline", cfg->store_tagline);
	mc_set(mc, "logo_url", cfg->logo_url);
	mc_set(mc, "brand_color", cfg->brand_color);
	mc_set(mc, "postal_address", cfg->postal_address);
	mc_set(mc, "name", m->name);
	mc_set(mc, "first_name", first);
	mc_set(mc, "email", m->email);
	mc_set(mc, "year", year);
	if (*m->cart_key)
		mc_set(mc, "total", total);
	mc_url(mc, app, "recovery_url", TOK_RECOVER, m->id,
	       now + RECOVER_LINK_DAYS * 86400, "");
	mc_url(mc, app, "unsubscribe_url", TOK_UNSUB, m->id, now + 400 * 86400, "");
	mc_url(mc, app, "open_url", TOK_OPEN, m->id, now + 400 * 86400, ".gif");
	if (*m->code)
		mc_discount(mc, app, m, code_expires);
	if (!strcmp(m->trigger, "cart_abandoned")) {
		mc_review(mc, app, m->items);
		if (mc_items(mc, app, "items", m->items, m->currency) < 0)
			return -1;
		snprintf(count, sizeof count, "%zu", mc->lists[mc->nlists - 1].n);
		mc_set(mc, "item_count", count);
	} else if (!strcmp(m->trigger, "browse_abandoned")) {
		if (mc_browse(mc, app, m) < 0)
			return -1;
	} else if ((mc_template_uses(app, m->tpl, "recommendations") &&
		    mc_recos(mc, app, m->contact, m->currency, NULL, 3) < 0) ||
		   (m->order && mc_order(mc, app, m) < 0)) {
		return -1;
	}
	/* the catalog's word for what the mail is about, for copy that fits
	 * any store: the first category among the items (an order's before
	 * its recommendations) */
	const char *cat = "";
	for (int k = mc->nlists - 1; k >= 0 && !*cat; k--)
		for (size_t i = 0; i < mc->lists[k].n && !*cat; i++)
			cat = mc->lists[k].items[i].category;
	mc_set(mc, "category", cat);
	mc_reason(mc, cfg, m->trigger);
	if (mc_track(mc, app, m, now) < 0)
		return -1;
	mc->ctx = (struct tctx){mc->v, mc->n, NULL};
	return 0;
}

/* A minimum spend as a person would write it, never above V (so a
 * customer's own typical order stays within reach): below 20 a whole
 * number, below 100 a multiple of 5, below 1000 of 10, below 10000 of
 * 50, then of 500, for currencies of large numbers (40 -> 40, 47.5 -> 45,
 * 303 -> 300, 461 -> 460, 1234 -> 1200, 12345 -> 12000). */
double min_spend_nice(double v)
{
	double step = v < 20 ? 1 : v < 100 ? 5 : v < 1000 ? 10 : v < 10000 ? 50 : 500;
	if (v < 1)
		return v > 0 ? v : 0;
	return floor(v / step + 1e-9) * step;
}

/* CONTACT's median order, else the store's: the store's is a sort of
 * every order, so it is read only for a customer with none, and kept for
 * an hour of the clock. */
double median_order(struct app *app, int64_t contact, rm_time now)
{
	double own = -1;
	sqlite3_stmt *s = q(app->db, ST_MEDIAN_CONTACT, "i", contact);
	if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_type(s, 0) != SQLITE_NULL)
		own = sqlite3_column_double(s, 0);
	sqlite3_reset(s);
	if (own > 0)
		return own;
	if (!app->median_at || now < app->median_at || now - app->median_at >= 3600) {
		q_row(q(app->db, ST_MEDIAN_STORE, NULL), "d", &app->store_median);
		app->median_at = now;
	}
	return app->store_median;
}

/* Fixes the Message-ID and the discount code at the first attempt, so
 * every later attempt sends the same message. */
static int msg_prepare(struct app *app, struct msgrow *m, rm_time now,
		       rm_time *code_expires)
{
	struct db *db = app->db;
	if (!*m->message_id) {
		/* derived from the row and the key, not drawn: every attempt of
		 * this message, before or after a crash, carries the same ID
		 * (written with the "sending" state, before the hand-over) */
		unsigned char h[8];
		char hex[17], dom[256];
		crypto_generichash(h, sizeof h, (const unsigned char *)&m->id,
				   sizeof m->id, app->key, RM_KEYBYTES);
		sodium_bin2hex(hex, sizeof hex, h, sizeof h);
		addr_spec(app->cfg->from, dom, sizeof dom);
		char *at = strchr(dom, '@');
		snprintf(m->message_id, sizeof m->message_id, "<rm.%lld.%s@%s>",
			 (long long)m->id, hex, at ? at + 1 : "localhost");
	}
	*code_expires = 0;
	if (m->pct > 0 && !*m->code) {
		/* -1: the customer's median order, else the store's, as a
		 * price a person writes */
		double min = m->min_spend;
		if (min < 0)
			min = min_spend_nice(median_order(app, m->contact, now));
		if (code_issue(app, m->id, m->contact, m->pct, min, now + m->valid,
			       now, m->code, sizeof m->code) ||
		    q_exec(db, q(db, ST_MESSAGE_SET_CODE, "it", m->id, m->code)))
			return -1;
	}
	if (!*m->code) { /* a later step reminds of an earlier step's code */
		sqlite3_stmt *s = q(db, ST_ENROLLMENT_CODE, "i", m->enrollment);
		if (sqlite3_step(s) == SQLITE_ROW)
			copy_str(m->code, sizeof m->code, col_text(s, 0));
		sqlite3_reset(s);
	}
	if (*m->code) /* the code's own terms, whichever step issued it */
		code_check(app, m->code, -1, now, &m->pct, &m->min_spend,
			   code_expires);
	return 0;
}

/* Puts PREFIX ("[TEST] ") before a rendered SUBJECT: the mail's subject
 * only, not the <title> the HTML already shows. */
static void subject_mark(struct buf *subject, const char *prefix)
{
	if (!*prefix)
		return;
	struct buf marked = {0};
	buf_adds(&marked, prefix);
	buf_adds(&marked, subject->data ? subject->data : "");
	if (buf_failed(&marked)) { /* mail_build then refuses the subject */
		buf_free(&marked);
		buf_free(subject);
		return;
	}
	buf_free(subject);
	*subject = marked;
}

/* Renders template m->tpl for message M (its code and Message-ID already
 * fixed) and builds it into OUT: the one path from a message to its
 * bytes, for the tick and for `remarket preview` and `send-test` alike.
 * SUBJECT_PREFIX goes before the subject ("[TEST] " for a test, else "");
 * TEXT and HTML receive the rendered parts. */
static int msg_build(struct app *app, const struct msgrow *m, rm_time now,
		     rm_time code_expires, const char *subject_prefix,
		     struct buf *text, struct buf *html, struct buf *out,
		     char *err, size_t errlen)
{
	struct msgctx mc = {0};
	struct buf subject = {0};
	int rc = -1;
	if (mc_build(&mc, app, m, now, code_expires) < 0) {
		snprintf(err, errlen, "out of memory");
		goto out;
	}
	if (mail_render(app, m->tpl, &mc.ctx, &subject, text, html, err, errlen))
		goto out;
	subject_mark(&subject, subject_prefix);
	char unsub[1300];
	const char *u = NULL;
	for (size_t i = 0; i < mc.n; i++)
		if (!strcmp(mc.v[i].name, "unsubscribe_url"))
			u = mc.v[i].value;
	if (*app->cfg->unsubscribe_mailto)
		snprintf(unsub, sizeof unsub, "<%s>, <mailto:%s?subject=unsubscribe>",
			 u ? u : "", app->cfg->unsubscribe_mailto);
	else
		snprintf(unsub, sizeof unsub, "<%s>", u ? u : "");
	/* Gmail's feedback loop groups complaints by these fields */
	char fbl[120];
	snprintf(fbl, sizeof fbl, "%s:%d%c:remarket", m->flow, m->step,
		 m->variant ? m->variant : 'A');
	struct mail mail = {app->cfg->from, m->email, subject.data, m->message_id,
			    unsub, text->data, html->data, now, fbl, m->name,
			    app->cfg->reply_to};
	rc = mail_build(&mail, out, err, errlen);
out:
	mc_free(&mc);
	buf_free(&subject);
	return rc;
}

/* Renders and builds message M (subject, text, HTML) into OUT; fails with a
 * message in ERR when a template is missing or broken. */
static int msg_compose(struct app *app, struct msgrow *m, rm_time now,
		       struct buf *out, char *err, size_t errlen)
{
	rm_time code_expires;
	struct buf text = {0}, html = {0};
	int rc = -1;
	if (msg_prepare(app, m, now, &code_expires) < 0)
		snprintf(err, errlen, "database error preparing message %lld",
			 (long long)m->id);
	else
		rc = msg_build(app, m, now, code_expires, "", &text, &html, out,
			       err, errlen);
	buf_free(&text);
	buf_free(&html);
	return rc;
}

/* ---- previews: a message that is never recorded ---- */
/*
 * `remarket preview` and `remarket send-test` render a template through
 * msg_build, as the tick does, for a real contact (their latest cart or
 * order, their recommendations) or a sample one. The row is made in
 * memory: no message, enrollment, attempt or code is written. Its id is
 * 0, so its signed links (unsubscribe, cart, discount, open) name no
 * message and change nothing when followed; a discount shows a code
 * that is visibly not one.
 */
/* The step that sends M->tpl: its trigger, flow, position and discount. */
static void preview_step(struct app *app, struct msgrow *m)
{
	sqlite3_stmt *s = q(app->db, ST_PREVIEW_STEP, "t", m->tpl);
	if (sqlite3_step(s) == SQLITE_ROW) {
		copy_str(m->trigger, sizeof m->trigger, col_text(s, 0));
		copy_str(m->flow, sizeof m->flow, col_text(s, 1));
		m->step = sqlite3_column_int(s, 2);
		m->pct = sqlite3_column_int(s, 3);
		m->valid = (long)sqlite3_column_int64(s, 4);
		m->min_spend = sqlite3_column_double(s, 5);
	}
	sqlite3_reset(s);
}

/* The contact of EMAIL into M, or a sample one when EMAIL is NULL. */
static int preview_contact(struct app *app, const char *email,
			   struct msgrow *m, char *err, size_t errlen)
{
	if (!email) {
		copy_str(m->email, sizeof m->email, "sample@example.com");
		copy_str(m->name, sizeof m->name, "Sample Customer");
		return 0;
	}
	sqlite3_stmt *s = q(app->db, ST_PREVIEW_CONTACT, "t", email);
	int found = sqlite3_step(s) == SQLITE_ROW;
	if (found) {
		m->contact = sqlite3_column_int64(s, 0);
		copy_str(m->email, sizeof m->email, col_text(s, 1));
		copy_str(m->name, sizeof m->name, col_text(s, 2));
	}
	sqlite3_reset(s);
	if (!found)
		snprintf(err, errlen, "no contact '%s' (an address seen in an "
			 "event or an import); leave out --email for a sample",
			 email);
	return found ? 0 : -1;
}

/* What the mail is about, as the trigger wants: the contact's latest cart
 * or order, or two catalog products for a sample contact. */
static int preview_about(struct app *app, struct msgrow *m, char *err,
			   size_t errlen)
{
	int cart = !strcmp(m->trigger, "cart_abandoned");
	int order = !strcmp(m->trigger, "order_placed");
	/* a browse mail: catalog products, as for a sample (whoever it is for) */
	int browse = !strcmp(m->trigger, "browse_abandoned");
	sqlite3_stmt *s;
	if (m->contact && cart) {
		s = q(app->db, ST_PREVIEW_CART, "i", m->contact);
		if (sqlite3_step(s) == SQLITE_ROW) {
			copy_str(m->cart_key, sizeof m->cart_key, col_text(s, 0));
			m->items = strdup(col_text(s, 1));
			m->total = sqlite3_column_double(s, 2);
			copy_str(m->currency, sizeof m->currency, col_text(s, 3));
		}
		sqlite3_reset(s);
	} else if (m->contact && order) {
		s = q(app->db, ST_PREVIEW_ORDER, "i", m->contact);
		if (sqlite3_step(s) == SQLITE_ROW) {
			m->order = sqlite3_column_int64(s, 0);
			copy_str(m->currency, sizeof m->currency, col_text(s, 1));
		}
		sqlite3_reset(s);
	} else if (cart || order || browse) { /* a sample: the catalog, else made up */
		s = q(app->db, ST_PREVIEW_SAMPLE_ITEMS, NULL);
		const char *j = sqlite3_step(s) == SQLITE_ROW ? col_text(s, 0) : "[]";
		m->items = strdup(strcmp(j, "[]") ? j :
			"[{\"sku\":\"SAMPLE-1\",\"name\":\"Sample product\","
			"\"qty\":2,\"price\":24.5},{\"sku\":\"SAMPLE-2\","
			"\"name\":\"Another sample product\",\"qty\":1,"
			"\"price\":39}]");
		sqlite3_reset(s);
		if (cart)
			copy_str(m->cart_key, sizeof m->cart_key, "sample-cart");
		else if (order)
			m->order = -1; /* mc_order: m's items are the order */
	}
	if ((cart && !*m->cart_key) || (order && !m->order)) {
		snprintf(err, errlen, "%s has no %s to show; leave out --email "
			 "for a sample", m->email, cart ? "cart" : "order");
		return -1;
	}
	if (!*m->currency)
		copy_str(m->currency, sizeof m->currency,
			 *app->cfg->currency ? app->cfg->currency : "EUR");
	if (!m->items)
		m->items = strdup("[]");
	if (m->items && (m->cart_key[0] || m->order < 0)) {
		s = q(app->db, ST_ITEMS_TRUST, "t", m->items); /* as msg_load */
		if (sqlite3_step(s) == SQLITE_ROW) {
			m->printable = sqlite3_column_int(s, 0);
			/* a sample's total is its items' */
			if (sqlite3_column_int(s, 1) > 0 || !m->contact)
				m->total = sqlite3_column_double(s, 2);
		}
		sqlite3_reset(s);
	}
	if (!m->items)
		snprintf(err, errlen, "out of memory");
	return m->items ? 0 : -1;
}

/* Fills M (m->items to free) for a preview of template TPL for the contact
 * of EMAIL (NULL: a sample), as the step that sends TPL would; TRIGGER
 * (NULL: the step's) says which kind of mail a template of no step is. */
static int msg_preview_load(struct app *app, const char *tpl,
			    const char *trigger, const char *email, rm_time now,
			    struct msgrow *m, rm_time *code_expires, char *err,
			    size_t errlen)
{
	memset(m, 0, sizeof *m);
	*code_expires = 0;
	copy_str(m->tpl, sizeof m->tpl, tpl);
	m->variant = 'A';
	preview_step(app, m);
	if (trigger)
		copy_str(m->trigger, sizeof m->trigger, trigger);
	if (strcmp(m->trigger, "cart_abandoned") &&
	    strcmp(m->trigger, "customer_lapsed") &&
	    strcmp(m->trigger, "order_placed") &&
	    strcmp(m->trigger, "browse_abandoned")) {
		snprintf(err, errlen, "%s: %s; say which mail it is with --trigger "
			 "cart_abandoned, customer_lapsed, order_placed or "
			 "browse_abandoned", tpl,
			 *m->trigger ? "not a trigger" : "no flow step sends it");
		return -1;
	}
	if (!*m->flow)
		copy_str(m->flow, sizeof m->flow, "preview");
	if (preview_contact(app, email, m, err, errlen) < 0 ||
	    preview_about(app, m, err, errlen) < 0)
		return -1;
	unsigned char r[8];
	char hex[17], dom[256];
	randombytes_buf(r, sizeof r);
	sodium_bin2hex(hex, sizeof hex, r, sizeof r);
	addr_spec(app->cfg->from, dom, sizeof dom);
	char *at = strchr(dom, '@');
	snprintf(m->message_id, sizeof m->message_id, "<rm.preview.%s@%s>", hex,
		 at ? at + 1 : "localhost");
	if (m->pct > 0) { /* the terms msg_prepare would give the code */
		copy_str(m->code, sizeof m->code, PREVIEW_CODE);
		*code_expires = now + (m->valid > 0 ? m->valid : 48 * 3600);
		if (m->min_spend < 0)
			m->min_spend = min_spend_nice(median_order(app, m->contact, now));
	}
	return 0;
}

/* Reads NAME.EXT of message M's step and renders it as text into TXT
 * with M's variables, left in MC (the caller frees both); NEED says
 * what such a template must hold, for the error. 0, or -1 with ERR. */
static int channel_render(struct app *app, const struct msgrow *m, rm_time now,
			  rm_time code_expires, const char *ext, const char *need,
			  struct msgctx *mc, struct buf *txt, char *path,
			  char *err, size_t errlen)
{
	const char *dir = app->cfg->templates;
	struct buf tpl = {0};
	int rc = -1;
	if (!val_ident(m->tpl, 64) ||
	    snprintf(path, PATH_MAX, "%s/%s%s", dir, m->tpl, ext) >= PATH_MAX ||
	    template_read(path, &tpl) < 0)
		snprintf(err, errlen, "template %s/%s%s: cannot read it — %s", dir,
			 m->tpl, ext, need);
	else if (mc_build(mc, app, m, now, code_expires) < 0)
		snprintf(err, errlen, "out of memory");
	else
		rc = tpl_render_file(tpl.data, path, &mc->ctx, TPL_TEXT, dir, ext,
				     txt, err, errlen) ? -1 : 0;
	buf_free(&tpl);
	return rc;
}

/* A push notification of message M: NAME.push rendered with the mail's
 * context, its first line the title and its second the body; the URL is
 * the signed cart link for a cart, else the tracked store link. */
struct push_text {
	char title[200], body[600], url[1200];
};

static int push_build_text(struct app *app, const struct msgrow *m,
			   rm_time now, rm_time code_expires,
			   struct push_text *pt, char *err, size_t errlen)
{
	char path[PATH_MAX];
	struct msgctx mc = {0};
	struct buf txt = {0};
	int rc = -1;
	if (channel_render(app, m, now, code_expires, ".push", "a push step needs "
			   "one (title line, body line)", &mc, &txt, path, err,
			   errlen) < 0)
		goto out;
	const char *t = buf_str(&txt), *nl = strchr(t, '\n');
	const char *b = nl ? nl + 1 : "";
	size_t tl = nl ? (size_t)(nl - t) : strlen(t), bl = strcspn(b, "\n");
	const char *key = !strcmp(m->trigger, "cart_abandoned") ? "recovery_url" :
			  "store_url";
	const struct tvar *u = tpl_lookup(&mc.ctx, key, strlen(key));
	if (!tl || tl >= sizeof pt->title || bl >= sizeof pt->body ||
	    !u || !u->value || copy_str(pt->url, sizeof pt->url, u->value) < 0) {
		snprintf(err, errlen, "%s: the title (first line, 1 to %zu bytes) "
			 "or the body (second line, under %zu) does not fit", path,
			 sizeof pt->title - 1, sizeof pt->body);
		goto out;
	}
	memcpy(pt->title, t, tl), pt->title[tl] = '\0';
	memcpy(pt->body, b, bl), pt->body[bl] = '\0';
	rc = 0;
out:
	mc_free(&mc);
	buf_free(&txt);
	return rc;
}

/* As msg_compose, for a push notification. */
static int push_compose(struct app *app, struct msgrow *m, rm_time now,
			struct push_text *pt, char *err, size_t errlen)
{
	rm_time code_expires;
	if (msg_prepare(app, m, now, &code_expires) < 0) {
		snprintf(err, errlen, "database error preparing message %lld",
			 (long long)m->id);
		return -1;
	}
	return push_build_text(app, m, now, code_expires, pt, err, errlen);
}

/* ==== SMS: text, segments, providers ================================== */
/*
 * A step whose channels name sms (see step_channel in the flow engine)
 * sends one line of text instead of a mail. Its template is NAME.sms,
 * rendered by the same engine and context as NAME.txt; the line always
 * carries the store's name and "STOP to opt out" (added when the
 * template does not say them), and its links are the same signed short
 * /r/ tokens as a mail's. It goes out through the provider's HTTP API
 * with libcurl: Twilio's form API (or any that copies it), or a JSON
 * webhook signed like the store's hooks (X-Remarket-Signature). An answer
 * is classified as SMTP's are: 2xx sent; a 4xx about the number fails
 * that message only (never the contact's mail); 401/403/404 and other
 * refusals are our configuration (the message waits); 408, 429, 5xx and
 * time-outs are retried with the same back-off as mail. Inbound STOP,
 * START and HELP are in HTTP routes (route_sms_inbound).
 */

#define SMS_ANSWER_MAX 65536

/* The next code point of valid UTF-8 at *P (val_utf8 has checked it). */
static uint32_t utf8_next(const unsigned char **p)
{
	const unsigned char *s = *p;
	uint32_t c = s[0];
	int n = c < 0x80 ? 0 : c < 0xE0 ? 1 : c < 0xF0 ? 2 : 3;
	if (n)
		c &= 0x3F >> n;
	for (int i = 1; i <= n && s[i]; i++)
		c = (c << 6) | (s[i] & 0x3F);
	for (int i = 0; i <= n && **p; i++)
		(*p)++;
	return c;
}

/* 1 if code point C is in STR (UTF-8). */
static int in_utf8(const char *str, uint32_t c)
{
	for (const unsigned char *p = (const unsigned char *)str; *p;)
		if (utf8_next(&p) == c)
			return 1;
	return 0;
}

/* GSM 03.38: the default alphabet (one septet each; the escape 0x1B
 * left out) and its extension table (two septets each). */
static const char gsm7_basic[] =
	"@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
	"¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
static const char gsm7_ext[] = "^{}\\[~]|€\f";

int sms_segments(const char *text, struct sms_count *c)
{
	size_t septets = 0, units = 0;
	int ucs2 = 0;
	memset(c, 0, sizeof *c);
	if (!val_utf8(text, strlen(text)))
		return -1;
	for (const unsigned char *p = (const unsigned char *)text; *p;) {
		uint32_t cp = utf8_next(&p);
		units += cp > 0xFFFF ? 2 : 1; /* UTF-16 code units */
		if (in_utf8(gsm7_basic, cp))
			septets++;
		else if (in_utf8(gsm7_ext, cp))
			septets += 2;
		else
			ucs2 = 1;
	}
	c->ucs2 = ucs2;
	c->units = ucs2 ? units : septets;
	size_t one = ucs2 ? 70 : 160, many = ucs2 ? 67 : 153;
	c->segments = c->units == 0 ? 0 : c->units <= one ? 1 :
		      (int)((c->units + many - 1) / many);
	return c->segments;
}

int sms_finish(const char *store, const char *text, struct buf *out)
{
	struct buf line = {0};
	int space = 0;
	for (const char *p = text; *p; p++) { /* one line, single spaces */
		if (isspace((unsigned char)*p)) {
			space = line.len > 0;
			continue;
		}
		if (space)
			buf_adds(&line, " ");
		space = 0;
		buf_add(&line, p, 1);
	}
	const char *l = line.data ? line.data : "";
	if (*store && !strstr(l, store))
		buf_addf(out, "%s: ", store);
	buf_adds(out, l);
	if (!strstr(l, "STOP to opt out"))
		buf_adds(out, *l ? " Reply STOP to opt out." :
			 "Reply STOP to opt out.");
	buf_free(&line);
	return buf_failed(out) ? -1 : 0;
}

/* Renders M->tpl.sms for message M (its code fixed) into OUT, finished
 * by sms_finish. */
static int sms_build(struct app *app, const struct msgrow *m, rm_time now,
		     rm_time code_expires, struct buf *out, char *err,
		     size_t errlen)
{
	char path[PATH_MAX];
	struct msgctx mc = {0};
	struct buf txt = {0};
	int rc = -1;
	if (channel_render(app, m, now, code_expires, ".sms", "an SMS step needs "
			   "one (a line of text with {{...}})", &mc, &txt, path,
			   err, errlen) < 0)
		goto out;
	if (sms_finish(app->cfg->store_name, buf_str(&txt), out) < 0) {
		snprintf(err, errlen, "out of memory rendering %s", path);
		goto out;
	}
	rc = 0;
out:
	mc_free(&mc);
	buf_free(&txt);
	return rc;
}

/* As msg_compose, for an SMS. */
static int sms_compose(struct app *app, struct msgrow *m, rm_time now,
		       struct buf *out, char *err, size_t errlen)
{
	rm_time code_expires;
	if (msg_prepare(app, m, now, &code_expires) < 0) {
		snprintf(err, errlen, "database error preparing message %lld",
			 (long long)m->id);
		return -1;
	}
	return sms_build(app, m, now, code_expires, out, err, errlen);
}

int sms_preview(struct app *app, const char *tpl, const char *trigger,
		const char *email, rm_time now, struct buf *out, char *err,
		size_t errlen)
{
	struct msgrow m;
	rm_time code_expires;
	int rc = msg_preview_load(app, tpl, trigger, email, now, &m,
				  &code_expires, err, errlen);
	if (rc == 0)
		rc = sms_build(app, &m, now, code_expires, out, err, errlen);
	free(m.items);
	return rc;
}

enum send_result sms_classify(const char *provider, long status, long code)
{
	/* Twilio's codes for a number that cannot take this message:
	 * invalid, unreachable, not a mobile, opted out (21610), ... */
	static const long number[] = {21211, 21214, 21217, 21407, 21408,
				      21610, 21612, 21614, 21635};
	if (status >= 200 && status < 300)
		return SEND_OK;
	if (status == 408 || status == 429 || status >= 500 || status == 0)
		return SEND_TEMP;
	if (status == 401 || status == 403 || status == 404)
		return SEND_CONFIG;
	if (!strcmp(provider, "twilio")) {
		for (size_t i = 0; i < sizeof number / sizeof *number; i++)
			if (code == number[i])
				return SEND_PERM;
		return SEND_CONFIG; /* a 400 about our request (From, Body) */
	}
	return status >= 400 && status < 500 ? SEND_PERM : SEND_TEMP;
}

static size_t sms_collect(char *p, size_t size, size_t n, void *ud)
{
	struct buf *b = ud;
	if (size && n > SMS_ANSWER_MAX / size)
		return 0;
	if (b->len + size * n > SMS_ANSWER_MAX || buf_add(b, p, size * n) < 0)
		return 0;
	return size * n;
}

/* POSTs BODY to URL; the HTTP status into *STATUS (0: no answer) and the
 * answer's body into ANSWER. -1 with ERR when nothing was answered. */
static int sms_post(const char *url, const char *userpwd,
		    struct curl_slist *hdr, const char *body, long *status,
		    struct buf *answer, char *err, size_t errlen)
{
	CURL *c = curl_easy_init();
	*status = 0;
	if (!c) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
	curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdr);
	curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 10L);
	curl_easy_setopt(c, CURLOPT_TIMEOUT, 30L);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, sms_collect);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, answer);
	if (userpwd) {
		curl_easy_setopt(c, CURLOPT_HTTPAUTH, (long)CURLAUTH_BASIC);
		curl_easy_setopt(c, CURLOPT_USERPWD, userpwd);
	}
	CURLcode rc = curl_easy_perform(c);
	curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, status);
	curl_easy_cleanup(c);
	if (rc != CURLE_OK && !*status) {
		char shown[512];
		url_shown(url, shown, sizeof shown);
		snprintf(err, errlen, "SMS provider %s: %s", shown,
			 curl_easy_strerror(rc));
		return -1;
	}
	return 0;
}

/* Twilio's Messages API: a form with To, From and Body, Basic auth with
 * the account SID and auth token. */
static int sms_twilio(struct app *app, const char *to, const char *text,
		      long *status, struct buf *answer, char *err, size_t errlen)
{
	const struct config *cfg = app->cfg;
	struct buf url = {0}, body = {0}, auth = {0};
	char *sid = curl_easy_escape(NULL, cfg->twilio_account_sid, 0);
	char *eto = curl_easy_escape(NULL, to, 0);
	char *efrom = curl_easy_escape(NULL, cfg->sms_from, 0);
	char *etext = curl_easy_escape(NULL, text, 0);
	int rc = -1;
	if (!sid || !eto || !efrom || !etext)
		goto out;
	buf_addf(&url, "%s/2010-04-01/Accounts/%s/Messages.json",
		 cfg->twilio_api_url, sid);
	buf_addf(&body, "To=%s&From=%s&Body=%s", eto, efrom, etext);
	buf_addf(&auth, "%s:%s", cfg->twilio_account_sid, cfg->twilio_auth_token);
	if (buf_failed(&url) || buf_failed(&body) || buf_failed(&auth))
		goto out;
	rc = sms_post(url.data, auth.data, NULL, body.data, status, answer, err,
		      errlen);
out:
	if (rc < 0 && !*err)
		snprintf(err, errlen, "out of memory");
	curl_free(sid), curl_free(eto), curl_free(efrom), curl_free(etext);
	buf_free(&url), buf_free(&body);
	if (auth.data) /* the token is a secret: not left in freed memory */
		sodium_memzero(auth.data, auth.len);
	buf_free(&auth);
	return rc;
}

/* The generic webhook: {"to","from","text","message"} as JSON, signed
 * with sms_secret as the store's hooks are (X-Remarket-Signature). */
static int sms_webhook(struct app *app, int64_t id, const char *to,
		       const char *text, rm_time now, long *status,
		       struct buf *answer, char *err, size_t errlen)
{
	const struct config *cfg = app->cfg;
	struct buf body = {0};
	char sig[160], hsig[200];
	struct curl_slist *hdr = NULL, *h2;
	int rc = -1;
	sqlite3_stmt *s = q(app->db, ST_SMS_JSON, "ttti", to, cfg->sms_from, text,
			    id);
	if (sqlite3_step(s) == SQLITE_ROW)
		buf_adds(&body, col_text(s, 0));
	sqlite3_reset(s);
	if (buf_failed(&body) || !body.len ||
	    hook_sign(cfg->sms_secret, now, body.data, body.len, sig, sizeof sig) < 0)
		goto out;
	snprintf(hsig, sizeof hsig, "X-Remarket-Signature: %s", sig);
	if (!(h2 = curl_slist_append(hdr, "Content-Type: application/json")))
		goto out;
	hdr = h2;
	if (!(h2 = curl_slist_append(hdr, hsig)))
		goto out;
	hdr = h2;
	rc = sms_post(cfg->sms_url, NULL, hdr, body.data, status, answer, err,
		      errlen);
out:
	if (rc < 0 && !*err)
		snprintf(err, errlen, "out of memory building the SMS webhook body");
	curl_slist_free_all(hdr);
	buf_free(&body);
	return rc;
}

/* 1 if the SMS settings are there for the provider named: a step's sms
 * is chosen only then. */
int sms_ready(const struct config *cfg)
{
	if (!strcmp(cfg->sms_provider, "twilio"))
		return *cfg->twilio_account_sid && *cfg->twilio_auth_token &&
		       *cfg->sms_from && *cfg->twilio_api_url;
	if (!strcmp(cfg->sms_provider, "webhook"))
		return *cfg->sms_url && *cfg->sms_secret;
	return 0;
}

/* Sends TEXT to TO for message ID through the provider; ERR says why
 * not. */
static enum send_result sms_send(struct app *app, int64_t id, const char *to,
				 const char *text, rm_time now, long *pcode,
				 char *err, size_t errlen)
{
	const struct config *cfg = app->cfg;
	struct buf answer = {0};
	long status = 0, code = 0;
	int twilio = !strcmp(cfg->sms_provider, "twilio");
	*err = '\0';
	if (!sms_ready(cfg)) {
		snprintf(err, errlen, "sms_provider '%s': not set up (twilio: "
			 "twilio_account_sid, twilio_auth_token, sms_from; "
			 "webhook: sms_url, sms_secret)", cfg->sms_provider);
		return SEND_CONFIG;
	}
	int rc = twilio ? sms_twilio(app, to, text, &status, &answer, err, errlen) :
		 sms_webhook(app, id, to, text, now, &status, &answer, err, errlen);
	if (rc < 0) {
		buf_free(&answer);
		return SEND_TEMP;
	}
	char said[200] = "";
	sqlite3_stmt *s = q(app->db, ST_SMS_ANSWER, "t", buf_str(&answer));
	if (sqlite3_step(s) == SQLITE_ROW) {
		code = (long)sqlite3_column_int64(s, 0);
		copy_str(said, sizeof said, col_text(s, 1));
	}
	sqlite3_reset(s);
	buf_free(&answer);
	enum send_result r = sms_classify(cfg->sms_provider, status, code);
	*pcode = code;
	if (r != SEND_OK)
		snprintf(err, errlen, "SMS provider (%s) answered %ld%s%.0ld%s%s",
			 cfg->sms_provider, status, code ? ", code " : "", code,
			 *said ? ": " : "", said);
	return r;
}

/* ---- inbound: Twilio's signature and form ---- */
/*
 * A reply to our number arrives as Twilio's form POST, signed in
 * X-Twilio-Signature: base64(HMAC-SHA1(auth token, the full URL it
 * called + every POST parameter sorted by name, as name then value)).
 * libsodium has no HMAC-SHA1: OpenSSL's libcrypto makes it.
 */
#define FORM_MAX 64
struct form {
	char *k[FORM_MAX], *v[FORM_MAX];
	int n;
};

static void form_free(struct form *f)
{
	for (int i = 0; i < f->n; i++)
		curl_free(f->k[i]), curl_free(f->v[i]);
	f->n = 0;
}

/* Decodes "a=1&b=x+y" ('+' a space, %XX by libcurl); -1 if more than
 * FORM_MAX parameters or out of memory. */
static int form_parse(const char *body, size_t len, struct form *f)
{
	memset(f, 0, sizeof *f);
	char *copy = strndup(body ? body : "", len);
	if (!copy)
		return -1;
	for (char *p = copy; *p; p++)
		if (*p == '+')
			*p = ' ';
	int rc = 0;
	char *save = NULL;
	for (char *w = strtok_r(copy, "&", &save); w && rc == 0;
	     w = strtok_r(NULL, "&", &save)) {
		char *eq = strchr(w, '=');
		if (f->n == FORM_MAX) {
			rc = -1;
			break;
		}
		if (eq)
			*eq = '\0';
		f->k[f->n] = curl_easy_unescape(NULL, w, 0, NULL);
		f->v[f->n] = curl_easy_unescape(NULL, eq ? eq + 1 : "", 0, NULL);
		if (!f->k[f->n] || !f->v[f->n]) {
			curl_free(f->k[f->n]), curl_free(f->v[f->n]);
			rc = -1;
			break;
		}
		f->n++;
	}
	free(copy);
	if (rc)
		form_free(f);
	return rc;
}

static const char *form_get(const struct form *f, const char *name)
{
	for (int i = 0; i < f->n; i++)
		if (!strcmp(f->k[i], name))
			return f->v[i];
	return NULL;
}

int sms_twilio_signature(const char *token, const char *url, const char *form,
			 size_t len, char *out, size_t outlen)
{
	struct form f;
	struct buf data = {0};
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;
	int order[FORM_MAX], rc = -1;
	if (form_parse(form, len, &f) < 0)
		return -1;
	for (int i = 0; i < f.n; i++) { /* by name, then value: stable */
		int j = i;
		for (; j > 0; j--) {
			int c = strcmp(f.k[order[j - 1]], f.k[i]);
			if (c < 0 || (c == 0 && strcmp(f.v[order[j - 1]], f.v[i]) <= 0))
				break;
			order[j] = order[j - 1];
		}
		order[j] = i;
	}
	buf_adds(&data, url);
	for (int i = 0; i < f.n; i++)
		buf_adds(&data, f.k[order[i]]), buf_adds(&data, f.v[order[i]]);
	if (!buf_failed(&data) && outlen >= sodium_base64_ENCODED_LEN(20,
					sodium_base64_VARIANT_ORIGINAL) &&
	    HMAC(EVP_sha1(), token, (int)strlen(token),
		 (const unsigned char *)data.data, data.len, md, &mdlen) &&
	    mdlen == 20) {
		sodium_bin2base64(out, outlen, md, mdlen,
				  sodium_base64_VARIANT_ORIGINAL);
		rc = 0;
	}
	form_free(&f);
	buf_free(&data);
	return rc;
}

/* What a reply asks, by its first word (case aside): STOP and the words
 * carriers treat as it, START and its like, HELP; 0 for anything else. */
int sms_keyword(const char *body)
{
	static const char *const stop[] = {"STOP", "STOPALL", "UNSUBSCRIBE",
					   "CANCEL", "END", "QUIT", NULL};
	static const char *const start[] = {"START", "YES", "UNSTOP", NULL};
	static const char *const help[] = {"HELP", "INFO", NULL};
	static const char *const *const sets[] = {stop, start, help};
	char w[16];
	size_t n = 0;
	while (body && isspace((unsigned char)*body))
		body++;
	while (body && *body && !isspace((unsigned char)*body) && n + 1 < sizeof w)
		w[n++] = (char)toupper((unsigned char)*body++);
	w[n] = '\0';
	if (body && *body && !isspace((unsigned char)*body))
		return 0; /* a longer word */
	for (int s = 0; s < 3; s++)
		for (int i = 0; sets[s][i]; i++)
			if (!strcmp(w, sets[s][i]))
				return s + 1; /* SMS_STOP, SMS_START, SMS_HELP */
	return 0;
}

/* ==== The flow engine: detect, claim, send, record ==================== */
/*
 * A tick runs in three short phases and never holds a write lock while it
 * talks to an SMTP server:
 *   1. detect (short transactions, each idempotent): idle carts of
 *      reachable contacts become abandoned and are enrolled; segments are
 *      brought up to date incrementally and lapsed customers enrolled, in
 *      chunks (see the Segments banner: a tick with nothing due costs
 *      the same at 1 M customers as at 1 k); new orders enrolled in their
 *      flows (the held-out share of each flow is marked and never
 *      messaged); every step now due gets its message row (UNIQUE per
 *      enrollment and step, so never two), with its A/B variant;
 *   2. claim: UPDATE ... RETURNING takes due messages with a lease, so an
 *      overlapping tick cannot take the same ones; a lease left by a
 *      crashed tick expires and the message is taken again, with the same
 *      Message-ID and code, so the outbox replaces and a receiving MTA
 *      can recognise a repeat;
 *   3. per message: check the exit conditions (order, unsubscribe, bounce,
 *      emptied cart) and lateness (a stale step is recorded, not sent) at
 *      send time, render, write the "sending" state (one attempt, for
 *      this message only), send, and record the outcome. A claim counts
 *      no attempt, so a tick killed mid-batch costs its batch nothing.
 * Phases 2 and 3 run on smtp_connections senders at once, each with its
 * own database connection and SMTP connection, under the same lease
 * (see struct sendpool).
 */

#define TICK_BATCH 50
#define TICK_MAX 20000
#define RETRY_MAX 8
#define CRASH_MAX 5        /* deaths of the tick while preparing one message */
#define REFUSALS_IN_A_ROW 3 /* content refused for this many recipients */
#define REFUSALS_HELD 16

static void fault(const char *where)
{
	const char *f = getenv("REMARKET_FAULT");
	if (f && strcmp(f, where) == 0)
		_exit(70); /* fault injection for the crash tests */
}

/* The same for one message: WHERE, or "WHERE:ID" for message ID only. */
static void fault_msg(const char *where, int64_t id)
{
	const char *f = getenv("REMARKET_FAULT");
	size_t n = strlen(where);
	if (f && !strncmp(f, where, n) && f[n] == ':' &&
	    strtoll(f + n + 1, NULL, 10) == id)
		_exit(70);
	fault(where);
}

static int msg_exit(struct app *app, const struct msgrow *m, const char *why,
		    struct tick_summary *sum)
{
	struct db *db = app->db;
	/* not this contact's step, or too late for it: go on with the next
	 * one, which keeps its own schedule */
	int stale = !strncmp(why, "stale", 5);
	int next = !strcmp(why, "segment") || stale ||
		   !strncmp(why, "channel", 7);
	int done = !strcmp(why, "step removed");
	int rc = db_begin(db) ||
		 q_exec(db, q(db, ST_MESSAGE_END, "itti", m->id, "skipped", why, m->owner)) ||
		 (next ? q_exec(db, q(db, ST_ENROLL_ADVANCE, "ii", m->enrollment,
				     (int64_t)m->step)) :
		  done ? q_exec(db, q(db, ST_ENROLL_DONE, "i", m->enrollment)) :
			 q_exec(db, q(db, ST_ENROLL_EXIT, "it", m->enrollment, why))) ||
		 db_commit(db);
	if (rc)
		db_rollback(db);
	sum->skipped += !stale;
	sum->stale += stale;
	sum->exited += !next && !done;
	return rc ? -1 : 0;
}

/* Records the outcome R of sending M: sent (and the enrollment advanced),
 * retried later with back-off, or failed (a 5xx also suppresses). */
static int msg_record(struct app *app, const struct msgrow *m,
		      enum send_result r, const char *err, rm_time now,
		      struct tick_summary *sum)
{
	struct db *db = app->db;
	int rc;
	if (r == SEND_OK) {
		rc = db_begin(db) ||
		     q_exec(db, q(db, ST_MESSAGE_SENT, "iiti", m->id, (int64_t)now,
				  m->message_id, m->owner)) ||
		     q_exec(db, q(db, ST_ENROLL_ADVANCE, "ii", m->enrollment,
				  (int64_t)m->step)) ||
		     db_commit(db);
		sum->sent++;
	} else if (r == SEND_TEMP && m->attempts < RETRY_MAX) {
		int64_t wait = 300LL << (m->attempts > 7 ? 7 : m->attempts - 1);
		if (wait > 6 * 3600)
			wait = 6 * 3600;
		rc = q_write(db, q(db, ST_MESSAGE_RETRY, "iiti", m->id,
				   (int64_t)now + wait, err, m->owner));
		sum->retry++;
	} else {
		/* a 5xx, or too many temporary failures: never again; a 5xx
		 * ends the contact's sequences (bounce), the give-up this one
		 * (failed): a sequence never waits on a message that will not go */
		rc = db_begin(db) ||
		     q_exec(db, q(db, ST_MESSAGE_END, "itti", m->id, "failed", err,
				  m->owner)) ||
		     (r == SEND_PERM ?
		      (q_exec(db, q(db, ST_SUPPRESS, "iit", m->contact, (int64_t)now,
				    err)) ||
		       q_exec(db, q(db, ST_EXIT_CONTACT, "it", m->contact, "bounce"))) :
		      q_exec(db, q(db, ST_ENROLL_EXIT, "it", m->enrollment, "failed"))) ||
		     db_commit(db);
		sum->failed++;
	}
	if (rc)
		db_rollback(db);
	return rc ? -1 : 0;
}

/* Puts a message back for later without counting an attempt: the shopper
 * is active again, a template is broken, or the relay refuses us. UNDO
 * gives back the attempt counted by msg_mark(ST_MESSAGE_ATTEMPT). */
static int msg_defer(struct app *app, const struct msgrow *m, rm_time when,
		     const char *why, int undo)
{
	return q_write(app->db, q(app->db, ST_MESSAGE_DEFER, "iitii", m->id,
				  (int64_t)when, why, m->owner, (int64_t)undo));
}

/* Writes ST_MESSAGE_START or ST_MESSAGE_ATTEMPT for M. Returns 0, 1 when
 * the lease was lost to another tick, -1 when the database refused. */
static int msg_mark(struct app *app, const struct msgrow *m, enum stmt_id id)
{
	sqlite3_stmt *s = id == ST_MESSAGE_ATTEMPT ?
		q(app->db, id, "iit", m->id, m->owner, m->message_id) :
		q(app->db, id, "ii", m->id, m->owner);
	if (q_write(app->db, s) < 0)
		return -1;
	return sqlite3_changes(app->db->h) == 1 ? 0 : 1;
}

/* Too late to send: more than max_lateness_hours after the step was due,
 * or more than half the way to the next step if that is sooner. Then
 * writes "stale: ..." to WHY and returns 1. */
static int msg_stale(const struct config *cfg, const struct msgrow *m,
		     rm_time now, char *why, size_t n)
{
	long hours = cfg->max_lateness_hours;
	if (hours <= 0 || m->due <= 0 || !m->has_step)
		return 0;
	int64_t limit = (int64_t)(hours < 1000000 ? hours : 1000000) * 3600;
	if (m->next_gap > 0 && m->next_gap / 2 < limit)
		limit = m->next_gap / 2;
	int64_t late = (int64_t)now - m->due;
	if (late <= limit)
		return 0;
	snprintf(why, n, "stale: due %.1f h ago, later than this step's limit "
		 "of %.1f h (max_lateness_hours, or half the gap to the next step)",
		 (double)late / 3600, (double)limit / 3600);
	return 1;
}

/*
 * Timing rules, checked when a claimed message is about to go (after its
 * exit conditions and its staleness): the channel's quiet hours in the
 * contact's time zone; a win-back waits while the contact's cart sequence
 * runs (the cart matters more); and smart sending: at most one message a
 * contact per min_gap_hours across flows (and channels). A message held
 * back is deferred (queued again for when the rule lets it go, its
 * attempt not counted), never dropped, unless it would then be stale:
 * then it is skipped as stale now. Unlike Klaviyo's smart sending, which
 * skips at once, the step keeps its chance within its lateness limit.
 * The gap check and the mark that the message passed it (gate_at) are
 * one write transaction, so two senders of one tick, or two ticks, never
 * both pass for one contact.
 */

/* 0: M may go now (gate_at written); 1: not before *UNTIL, for the
 * rule *KIND ("quiet", "cart", "gap"); -1 on a database error. */
static int msg_gate(struct app *app, const struct msgrow *m,
		    const char *channel, rm_time now, rm_time *until,
		    const char **kind)
{
	struct db *db = app->db;
	char tz[80] = "";
	sqlite3_stmt *s = q(db, ST_CONTACT_TZ, "i", m->contact);
	if (sqlite3_step(s) == SQLITE_ROW)
		copy_str(tz, sizeof tz, col_text(s, 0));
	sqlite3_reset(s);
	*until = quiet_next(app->cfg, channel, *tz ? tz : NULL, now);
	*kind = "quiet";
	if (*until > now)
		return 1;
	*until = now + 3600; /* looked at again in an hour */
	*kind = "cart";
	if ((!strcmp(m->trigger, "customer_lapsed") ||
	     !strcmp(m->trigger, "browse_abandoned")) &&
	    db_scalar_stmt(q(db, ST_GATE_CART, "i", m->contact)) == 1)
		return 1;
	long hours = app->cfg->min_gap_hours;
	if (hours <= 0)
		return 0;
	int64_t gap = (int64_t)(hours < 100000 ? hours : 100000) * 3600;
	if (db_begin(db))
		return -1;
	long long last = db_scalar_stmt(q(db, ST_GATE_GAP, "iiii", m->contact,
					  (int64_t)now - gap, m->id,
					  (int64_t)now));
	int rc = last < 0 ? -1 : last > 0 ? 1 :
		 q_exec(db, q(db, ST_GATE_PASS, "iii", m->id, (int64_t)now,
			      m->owner));
	if (rc < 0 || db_commit(db)) {
		db_rollback(db);
		return -1;
	}
	*until = (rm_time)(last + gap);
	*kind = "gap";
	return rc;
}

/* M was held back by rule KIND until UNTIL: deferred, or skipped as stale
 * if it would be too late by then. */
static int msg_hold(struct app *app, const struct msgrow *m, rm_time until,
		    const char *kind, struct tick_summary *sum)
{
	char why[300], stale[200];
	const char *rule = !strcmp(kind, "gap") ? "smart sending: a message "
			   "reached this contact within min_gap_hours" :
			   !strcmp(kind, "cart") ? "the contact's cart sequence "
			   "goes first" : "quiet hours of the channel";
	if (msg_stale(app->cfg, m, until, stale, sizeof stale)) {
		snprintf(why, sizeof why, "stale: held back (%s) past this "
			 "step's limit", rule);
		sum->deferred_skipped++;
		if (q_write(app->db, q(app->db, ST_MESSAGE_HELD_BY, "it", m->id,
				       kind)) < 0)
			return -1;
		return msg_exit(app, m, why, sum);
	}
	snprintf(why, sizeof why, "deferred: %s", rule);
	sum->deferred++;
	return q_write(app->db, q(app->db, ST_MESSAGE_HOLD, "iitit", m->id,
				  (int64_t)until, why, m->owner, kind));
}

/*
 * 5xx answers to the content (end of DATA). One alone is about its
 * recipient; the same content refused for REFUSALS_IN_A_ROW different
 * recipients in a row is about the content or the sender, and then
 * nobody may be suppressed. So such a message is held (still leased,
 * nothing recorded) until the tick knows: the relay accepts the same
 * step from someone else (the held ones were the recipients': failed
 * and suppressed), the row is complete (the step is paused, the held
 * ones wait for it, nobody is suppressed, the tick stops), or the tick
 * ends first (retried later like a 4xx).
 */
/* A 5xx to RCPT without an enhanced code (SEND_RCPT) is held the same
 * way, whatever its content: the relay accepting anyone next makes it
 * the recipient's; REFUSALS_IN_A_ROW different recipients refused in a
 * row make it ours (the messages wait, nobody is suppressed, the tick
 * stops). */
/* With several connections (smtp_connections) "next" and "in a row"
 * are in the order the relay answered: the list is shared by the tick's
 * sender threads under LOCK, and an acceptance of the same content (at
 * RCPT: of anyone) answered while a refused message was on its way
 * settles that refusal as its recipient's, as one answered after it
 * would. Once a row is complete, a refusal of the same kind still on its
 * way when the tick stopped waits like the row's (nobody suppressed, no
 * attempt counted). With one connection all of this is as before. */
#define REFUSALS_OK 32 /* contents whose last acceptance is remembered */
struct refusals {
	struct msgrow held[REFUSALS_HELD];
	char err[REFUSALS_HELD][512];
	int rcpt[REFUSALS_HELD]; /* held for a refusal at RCPT */
	int n;
	pthread_mutex_t lock;
	long seq;    /* acceptances so far: a message's send starts at one */
	long ok_any; /* the seq of the last acceptance */
	struct { char flow[64]; int step; char variant; long seq; } ok[REFUSALS_OK];
	int nok;
	struct msgrow paused; /* the content of a row complete (has_step 1) */
	char paused_why[400], ours_why[400]; /* a row complete: why */
};

static int same_content(const struct msgrow *a, const struct msgrow *b)
{
	return !strcmp(a->flow, b->flow) && a->step == b->step &&
	       a->variant == b->variant;
}

/* Drops held message K from the list, keeping the others in order. */
static void refusal_drop(struct refusals *rf, int k)
{
	rf->n--;
	memmove(&rf->held[k], &rf->held[k + 1], (size_t)(rf->n - k) * sizeof rf->held[0]);
	memmove(rf->err[k], rf->err[k + 1], (size_t)(rf->n - k) * sizeof rf->err[0]);
	memmove(&rf->rcpt[k], &rf->rcpt[k + 1], (size_t)(rf->n - k) * sizeof rf->rcpt[0]);
}

/* Records held message K as R and drops it from the list. */
static int refusal_settle(struct app *app, struct refusals *rf, int k,
			  enum send_result r, rm_time now,
			  struct tick_summary *sum)
{
	int rc = msg_record(app, &rf->held[k], r, rf->err[k], now, sum);
	refusal_drop(rf, k);
	return rc;
}

/* Settles every held message like M's content, and every one held for
 * a refusal at RCPT (all of them if M is NULL), as R. */
static int refusals_settle(struct app *app, struct refusals *rf,
			   const struct msgrow *m, enum send_result r,
			   rm_time now, struct tick_summary *sum)
{
	int rc = 0;
	for (int k = 0; k < rf->n;)
		if (!m || rf->rcpt[k] || same_content(&rf->held[k], m))
			rc |= refusal_settle(app, rf, k, r, now, sum);
		else
			k++;
	return rc ? -1 : 0;
}

/* The held refusals at RCPT of REFUSALS_IN_A_ROW different recipients
 * in a row: the relay refuses us. They wait with no attempt counted,
 * nobody is suppressed, the tick stops. Returns 1 or -1. */
static int refusals_ours(struct app *app, struct refusals *rf, int distinct,
			 const char *err, rm_time now, struct tick_summary *sum)
{
	char why[sizeof sum->stopped];
	const char *reply = strchr(err, '"'); /* the relay's own words */
	snprintf(why, sizeof why, "the relay refused %d different recipients "
		 "in a row at RCPT without an enhanced status code — the relay "
		 "refuses us: check smtp_user, from, and whether the relay blocks "
		 "this host; nobody was suppressed, nothing more is sent this "
		 "tick (relay: %.100s)", distinct, reply ? reply : err);
	struct db *db = app->db;
	int rc = db_begin(db);
	for (int k = 0; !rc && k < rf->n; k++)
		if (rf->rcpt[k])
			rc = msg_defer(app, &rf->held[k], now + 900, why, 1);
	rc = rc || db_commit(db);
	if (rc) {
		db_rollback(db);
		return -1;
	}
	for (int k = 0; k < rf->n;)
		if (rf->rcpt[k]) {
			sum->retry++;
			refusal_drop(rf, k);
		} else {
			k++;
		}
	fprintf(stderr, "remarket: %s\n", why);
	copy_str(sum->stopped, sizeof sum->stopped, why);
	copy_str(rf->ours_why, sizeof rf->ours_why, why);
	return 1;
}

/* The relay accepted M (under rf->lock): remembered for the refusals
 * of other connections that were on their way meanwhile. */
static void refusal_accepted(struct refusals *rf, const struct msgrow *m)
{
	int k = 0;
	rf->ok_any = ++rf->seq;
	while (k < rf->nok && !(!strcmp(rf->ok[k].flow, m->flow) &&
				rf->ok[k].step == m->step &&
				rf->ok[k].variant == m->variant))
		k++;
	if (k == REFUSALS_OK) { /* forget the oldest */
		memmove(&rf->ok[0], &rf->ok[1], (REFUSALS_OK - 1) * sizeof rf->ok[0]);
		k = REFUSALS_OK - 1;
	} else if (k == rf->nok) {
		rf->nok++;
	}
	copy_str(rf->ok[k].flow, sizeof rf->ok[k].flow, m->flow);
	rf->ok[k].step = m->step;
	rf->ok[k].variant = m->variant;
	rf->ok[k].seq = rf->seq;
}

/* A refusal of M (RCPT: at RCPT) whose send began at acceptance
 * STARTED, decided without holding it (under rf->lock): the relay took
 * the same content (RCPT: anyone's) meanwhile, so it is M's recipient's
 * (recorded, returns 0); or a row of its kind is complete already, so it
 * waits like the row's (returns 1: the tick stops). Otherwise -2: hold
 * it (refusal_add). -1 on a database failure. */
static int refusal_late(struct app *app, struct refusals *rf,
			const struct msgrow *m, const char *err, int rcpt,
			long started, rm_time now, struct tick_summary *sum)
{
	if (rcpt && *rf->ours_why) {
		sum->retry++;
		return msg_defer(app, m, now + 900, rf->ours_why, 1) ? -1 : 1;
	}
	if (!rcpt && *rf->paused_why && same_content(&rf->paused, m))
		return msg_defer(app, m, now, rf->paused_why, 1) ? -1 : 1;
	long ok = rcpt ? rf->ok_any : 0;
	for (int k = 0; !rcpt && k < rf->nok; k++)
		if (!strcmp(rf->ok[k].flow, m->flow) && rf->ok[k].step == m->step &&
		    rf->ok[k].variant == m->variant)
			ok = rf->ok[k].seq;
	if (ok > started)
		return msg_record(app, m, SEND_PERM, err, now, sum);
	return -2;
}

/* M's content was refused (RCPT: M's recipient, without saying why).
 * Returns 0 (held), 1 (the row is complete: the step is paused, or the
 * relay refuses us; stop the tick) or -1. */
static int refusal_add(struct app *app, struct refusals *rf,
		       const struct msgrow *m, const char *err, int rcpt,
		       rm_time now, struct tick_summary *sum)
{
	if (rf->n == REFUSALS_HELD && refusal_settle(app, rf, 0, SEND_TEMP, now, sum) < 0)
		return -1;
	rf->held[rf->n] = *m;
	rf->held[rf->n].items = NULL;
	copy_str(rf->err[rf->n], sizeof rf->err[0], err);
	rf->rcpt[rf->n] = rcpt;
	rf->n++;
	int distinct = 0;
	for (int k = 0; k < rf->n; k++) {
		int seen = 0;
		for (int j = 0; j < k; j++)
			seen |= rf->rcpt[j] == rf->rcpt[k] &&
				(rcpt || same_content(&rf->held[j], &rf->held[k])) &&
				rf->held[j].contact == rf->held[k].contact;
		distinct += !seen && rf->rcpt[k] == rcpt &&
			    (rcpt || same_content(&rf->held[k], m));
	}
	if (distinct < REFUSALS_IN_A_ROW)
		return 0;
	if (rcpt)
		return refusals_ours(app, rf, distinct, err, now, sum);
	char why[sizeof sum->stopped];
	const char *reply = strchr(err, '"'); /* the relay's own words */
	snprintf(why, sizeof why, "%s step %d paused: the relay refused its "
		 "content for %d different recipients in a row; nobody was "
		 "suppressed. Fix the template or the sender, then: remarket "
		 "flows resume %s %d (relay: %.100s)", m->flow, m->step, distinct,
		 m->flow, m->step, reply ? reply : err);
	struct db *db = app->db;
	int rc = db_begin(db) ||
		 q_exec(db, q(db, ST_STEP_PAUSE, "iiit", m->enrollment,
			      (int64_t)m->step, (int64_t)now, why));
	for (int k = 0; !rc && k < rf->n; k++)
		if (!rf->rcpt[k] && same_content(&rf->held[k], m))
			rc = msg_defer(app, &rf->held[k], now, why, 1);
	rc = rc || db_commit(db);
	if (rc) {
		db_rollback(db);
		return -1;
	}
	for (int k = 0; k < rf->n;)
		if (!rf->rcpt[k] && same_content(&rf->held[k], m))
			refusal_drop(rf, k);
		else
			k++;
	fprintf(stderr, "remarket: %s\n", why);
	copy_str(sum->stopped, sizeof sum->stopped, why);
	rf->paused = *m;
	rf->paused.items = NULL;
	copy_str(rf->paused_why, sizeof rf->paused_why, why);
	return 1;
}

/* 1 if contact EMAIL has a push subscription (its own, or one of its
 * browsers'); -1 on a database error. */
static int push_subscribed(struct app *app, const char *email)
{
	sqlite3_stmt *s = q(app->db, ST_PUSH_CONTACT_SUBS, "t", email);
	int rc = sqlite3_step(s);
	sqlite3_reset(s);
	return rc == SQLITE_ROW ? 1 : rc == SQLITE_DONE ? 0 : -1;
}

/* The channel message M goes by: the first of its step's channels the
 * contact consented to ("email": the mail checks of msg_exit_reason
 * passed; "sms": a phone, its own consent, and a provider set up;
 * "push": a push subscription, the browser's own consent, and a VAPID
 * key), or NULL. One case a channel, here and in flow_send_other. */
static const char *step_channel(struct app *app, const struct msgrow *m)
{
	const struct config *cfg = app->cfg;
	char list[64], *save = NULL;
	copy_str(list, sizeof list, *m->channels ? m->channels : "email");
	for (char *w = strtok_r(list, ",", &save); w; w = strtok_r(NULL, ",", &save)) {
		if (!strcmp(w, "email"))
			return "email";
		if (!strcmp(w, "sms") && *m->phone && m->sms_consent && sms_ready(cfg))
			return "sms";
		if (!strcmp(w, "push") && push_ready(cfg) &&
		    push_subscribed(app, m->email) == 1)
			return "push";
	}
	return NULL;
}

/* Sends notification PT to each push subscription of M's contact (a
 * phone and a laptop both show it): sent if one service took it; failed
 * for good when every browser has left (each subscription deleted);
 * else retried with the mail's back-off. */
static enum send_result push_deliver(struct app *app, const struct msgrow *m,
				     const struct push_text *pt, char *err,
				     size_t errlen)
{
	int64_t ids[16];
	int n = 0, ok = 0, gone = 0;
	sqlite3_stmt *s = q(app->db, ST_PUSH_CONTACT_SUBS, "t", m->email);
	while (n < 16 && sqlite3_step(s) == SQLITE_ROW)
		ids[n++] = sqlite3_column_int64(s, 0);
	sqlite3_reset(s);
	snprintf(err, errlen, "no push subscription left");
	for (int i = 0; i < n; i++) {
		char e[1200] = "";
		int rc = push_send(app, ids[i], pt->title, pt->body, pt->url, e,
				   sizeof e);
		ok += rc == 0;
		gone += rc == -2;
		if (rc != 0)
			snprintf(err, errlen, "%s", e);
	}
	if (ok)
		*err = '\0';
	return ok ? SEND_OK : gone == n ? SEND_PERM : SEND_TEMP;
}

/* Sends message M by CHAN (not email): marked, composed, marked sending,
 * sent and recorded as a mail is. A refusal about the number fails this
 * message and the sequence goes on (the contact's mail is not
 * suppressed for it); our configuration refused keeps it waiting. */
static int flow_send_other(struct app *app, struct msgrow *m,
			   const char *chan, rm_time now, struct tick_summary *sum)
{
	char err[512] = "";
	struct buf text = {0};
	struct push_text pt;
	int rc, push = !strcmp(chan, "push");
	if ((rc = msg_mark(app, m, ST_MESSAGE_START)) != 0)
		return rc < 0 ? -1 : 0;
	if ((push ? push_compose(app, m, now, &pt, err, sizeof err) :
	     sms_compose(app, m, now, &text, err, sizeof err)) < 0) {
		problem_add(&sum->problems, "%s (%s step %d: its messages wait, "
			    "retried every 15 min)", err, m->flow, m->step);
		rc = msg_defer(app, m, now + 900, err, 0);
		sum->retry++;
		goto out;
	}
	if ((rc = msg_mark(app, m, ST_MESSAGE_ATTEMPT)) != 0) {
		rc = rc < 0 ? -1 : 0;
		goto out;
	}
	m->attempts++;
	long code = 0;
	enum send_result r = push ? push_deliver(app, m, &pt, err, sizeof err) :
			     sms_send(app, m->id, m->phone, text.data, now, &code,
				      err, sizeof err);
	if (r != SEND_OK)
		fprintf(stderr, "remarket: message %lld (%s): %s\n",
			(long long)m->id, chan, err);
	if (r == SEND_CONFIG) {
		problem_add(&sum->problems, "%s", err);
		rc = msg_defer(app, m, now + 900, err, 1);
		sum->retry++;
	} else if (r == SEND_PERM) {
		struct db *db = app->db;
		rc = db_begin(db) ||
		     q_exec(db, q(db, ST_MESSAGE_END, "itti", m->id, "failed", err,
				  m->owner)) ||
		     q_exec(db, q(db, ST_ENROLL_ADVANCE, "ii", m->enrollment,
				  (int64_t)m->step)) ||
		     db_commit(db) ? -1 : 0;
		if (rc)
			db_rollback(db);
		/* Twilio 21610: the number sent STOP to the provider, which
		 * refuses it from now on: so does remarket (no reply reached us) */
		if (rc == 0 && code == 21610 &&
		    q_write(db, q(db, ST_SMS_CONSENT_SET, "titi", m->phone,
				  (int64_t)0, "provider: opted out (21610)",
				  (int64_t)now)) < 0)
			rc = -1;
		sum->failed++;
	} else {
		rc = msg_record(app, m, r, err, now, sum);
	}
out:
	buf_free(&text);
	return rc;
}

/* Sends one claimed message. Returns 0, -1 on a database failure (the
 * tick stops), or 1 when the relay refuses us or a step was paused: the
 * tick should stop. PREP: with several senders, their preparations
 * (START to ATTEMPT) share it, and a message that was being prepared
 * when a tick died is prepared alone (see CRASH_MAX); NULL with one. */
static int flow_send(struct app *app, int64_t id, rm_time now, int64_t owner,
		     struct tick_summary *sum, struct refusals *rf,
		     pthread_rwlock_t *prep)
{
	struct msgrow m;
	char err[512] = "", stale[200];
	struct buf msg = {0};
	pthread_rwlock_t *held = NULL;
	if (msg_load(app, id, &m) < 0)
		return -1;
	m.owner = owner;
	int rc = 0;
	const char *why = msg_exit_reason(&m);
	/* taken over by another tick after our lease ran out: not ours */
	if (db_scalar_stmt(q(app->db, ST_LEASE_HELD, "ii", id, owner)) != 1) {
		fprintf(stderr, "remarket: message %lld: lease lost to another tick, "
			"left to it\n", (long long)id);
		goto out;
	}
	if (why && !*why) { /* shopper active again: look again later */
		rc = msg_defer(app, &m, now + app->cfg->idle_minutes * 60,
			       "cart active again", 0);
		goto out;
	}
	if (!why && msg_stale(app->cfg, &m, now, stale, sizeof stale)) {
		why = stale;
		sum->deferred_skipped +=
			db_scalar_stmt(q(app->db, ST_MESSAGE_WAS_HELD, "i", id)) == 1;
	}
	if (why) {
		rc = msg_exit(app, &m, why, sum);
		goto out;
	}
	const char *chan = step_channel(app, &m);
	if (!chan) { /* this step is not for this contact: the next one is */
		snprintf(stale, sizeof stale, "channel: %s (none the contact "
			 "consented to, or not set up)", m.channels);
		rc = msg_exit(app, &m, stale, sum);
		goto out;
	}
	/* the gap, the cart first, and the quiet hours of that channel */
	rm_time until;
	const char *kind;
	int g = msg_gate(app, &m, chan, now, &until, &kind);
	if (g != 0) {
		rc = g < 0 ? -1 : msg_hold(app, &m, until, kind, sum);
		goto out;
	}
	/* chosen again at each attempt (a push retried may go by mail when
	 * the browser has left): the row says the latest */
	if ((rc = q_write(app->db, q(app->db, ST_MESSAGE_CHANNEL, "iit", id, owner,
				     chan))) != 0) {
		rc = rc < 0 ? -1 : 0;
		goto out;
	}
	if (app->cfg->dry_run) { /* a backtest: it would have gone now */
		rc = msg_record(app, &m, SEND_OK, "", now, sum);
		goto out;
	}
	if (strcmp(chan, "email") != 0) {
		rc = flow_send_other(app, &m, chan, now, sum);
		goto out;
	}
	/* from here until the hand-over, a death of the tick is this
	 * message's: CRASH_MAX of them and it is given up (ST_CLAIM_GIVE_UP).
	 * Every message being prepared when the tick dies is charged: one
	 * charged before is prepared alone, so that a message that kills the
	 * tick every time is given up alone, as with one sender */
	if (prep) {
		held = prep;
		if (db_scalar_stmt(q(app->db, ST_MESSAGE_CRASHES, "i", id)) > 0)
			pthread_rwlock_wrlock(prep);
		else
			pthread_rwlock_rdlock(prep);
	}
	if ((rc = msg_mark(app, &m, ST_MESSAGE_START)) != 0) {
		rc = rc < 0 ? -1 : 0;
		goto out;
	}
	fault_msg("crash_while_preparing", id);
	if (msg_compose(app, &m, now, &msg, err, sizeof err) < 0) {
		fprintf(stderr, "remarket: message %lld: %s (retried in 15 min)\n",
			(long long)id, err);
		problem_add(&sum->problems, "%s (%s step %d: its messages wait, "
			    "retried every 15 min)", err, m.flow, m.step);
		rc = msg_defer(app, &m, now + 900, err, 0);
		sum->retry++;
		goto out;
	}
	/* the durable "sending" state: if it cannot be written (a full
	 * disk), nothing is sent, since the outcome could not be either */
	if ((rc = msg_mark(app, &m, ST_MESSAGE_ATTEMPT)) != 0) {
		if (rc < 0) {
			fprintf(stderr, "remarket: message %lld: not sent: the database "
				"%s cannot be written (%s) — is the disk full? The "
				"tick stops; the message goes once it can be written\n",
				(long long)id, app->cfg->db, sqlite3_errmsg(app->db->h));
			problem_add(&sum->problems, "db %s cannot be written (%s) — "
				    "is the disk full? Nothing more is sent until "
				    "it can be", app->cfg->db,
				    sqlite3_errmsg(app->db->h));
		}
		rc = rc < 0 ? -1 : 0;
		goto out;
	}
	m.attempts++;
	if (held)
		pthread_rwlock_unlock(held);
	held = NULL;
	pthread_mutex_lock(&rf->lock);
	long started = rf->seq;
	pthread_mutex_unlock(&rf->lock);
	enum send_result r = mail_send(app, m.id, m.email, &msg, err, sizeof err);
	if (r == SEND_OK) {
		pthread_mutex_lock(&rf->lock);
		refusal_accepted(rf, &m);
		pthread_mutex_unlock(&rf->lock);
	}
	if (r == SEND_CONFIG || r == SEND_DOWN) {
		fprintf(stderr, "remarket: %s\n", err);
		copy_str(sum->stopped, sizeof sum->stopped, err);
		problem_add(&sum->problems, "%s", err);
		rc = msg_defer(app, &m, now + (r == SEND_DOWN ? 300 : 900), err, 1);
		sum->retry++;
		rc = rc ? rc : 1;
		goto out;
	}
	if (r == SEND_CONTENT || r == SEND_RCPT) {
		fprintf(stderr, "remarket: message %lld: %s\n", (long long)id, err);
		pthread_mutex_lock(&rf->lock);
		rc = refusal_late(app, rf, &m, err, r == SEND_RCPT, started, now, sum);
		if (rc == -2)
			rc = refusal_add(app, rf, &m, err, r == SEND_RCPT, now, sum);
		pthread_mutex_unlock(&rf->lock);
		goto out;
	}
	if (r != SEND_OK) { /* an address only with log_pii = yes */
		int pii = !strcmp(app->cfg->log_pii, "yes");
		fprintf(stderr, "remarket: message %lld%s%s: %s\n", (long long)id,
			pii ? " to " : "", pii ? m.email : "", err);
		if (!*app->cfg->smtp_url) /* the outbox: a disk, not a person */
			problem_add(&sum->problems, "%s", err);
	}
	else
		fault("crash_after_send");
	struct tick_summary before = *sum;
	rc = msg_record(app, &m, r, err, now, sum);
	/* An outcome lost is a message sent twice: on a full disk, try again
	 * after a checkpoint, which lets the next write reuse the WAL's
	 * space from its start, and after the space the failed write grew */
	for (int i = 0; rc < 0 && i < 3; i++) {
		*sum = before;
		sqlite3_wal_checkpoint_v2(app->db->h, NULL, SQLITE_CHECKPOINT_PASSIVE,
					  NULL, NULL);
		nanosleep(&(struct timespec){0, 100000000L << i}, NULL);
		rc = msg_record(app, &m, r, err, now, sum);
	}
	if (rc < 0 && r == SEND_OK) {
		fprintf(stderr, "remarket: message %lld was sent, but the database "
			"%s refused to record it — is the disk full? The tick "
			"stops\n", (long long)id, app->cfg->db);
		problem_add(&sum->problems, "db %s: message %lld was sent but "
			    "could not be recorded — is the disk full?",
			    app->cfg->db, (long long)id);
	}
	/* the relay took this content from someone: the held refusals of
	 * the same step, and those at RCPT, were about their recipients */
	if (rc == 0 && r == SEND_OK) {
		pthread_mutex_lock(&rf->lock);
		rc = refusals_settle(app, rf, &m, SEND_PERM, now, sum);
		pthread_mutex_unlock(&rf->lock);
	}
out:
	if (held)
		pthread_rwlock_unlock(held);
	free(m.items);
	buf_free(&msg);
	return rc;
}

/* browser_consent = confirm: the double opt-in mail of one contact, with
 * a signed link (30 days) to the confirm page, built into MSG (its text
 * and HTML parts into TEXT and HTML). SUBJECT_PREFIX: as msg_build. */
static int confirm_build(struct app *app, int64_t contact, const char *email,
			 rm_time now, const char *subject_prefix,
			 struct buf *text, struct buf *html, struct buf *msg,
			 char *err, size_t errlen)
{
	char url[1200], tok[TOK_MAXLEN + 1], year[8], mid[200], dom[256];
	struct tm tm;
	time_t t = (time_t)now;
	gmtime_r(&t, &tm);
	snprintf(year, sizeof year, "%d", tm.tm_year + 1900);
	if (tok_sign(app->key, TOK_CONFIRM, contact, now + 30 * 86400, tok,
		     sizeof tok) < 0 ||
	    snprintf(url, sizeof url, "%s/c/%s", app->cfg->base_url, tok) >=
		    (int)sizeof url) {
		snprintf(err, errlen, "base_url: too long for a confirm link");
		return -1;
	}
	struct tvar v[] = {
		{"store_name", app->cfg->store_name, NULL, 0},
		{"store_url", app->cfg->store_url, NULL, 0},
		{"logo_url", app->cfg->logo_url, NULL, 0},
		{"brand_color", app->cfg->brand_color, NULL, 0},
		{"postal_address", app->cfg->postal_address, NULL, 0},
		{"email", email, NULL, 0},
		{"year", year, NULL, 0},
		{"confirm_url", url, NULL, 0},
	};
	struct tctx ctx = {v, sizeof v / sizeof v[0], NULL};
	struct buf subject = {0};
	addr_spec(app->cfg->from, dom, sizeof dom);
	char *at = strchr(dom, '@');
	snprintf(mid, sizeof mid, "<rm.confirm.%lld.%lld@%s>", (long long)contact,
		 (long long)now, at ? at + 1 : "localhost");
	/* a one-click "unsubscribe" of this mail declines (see route_confirm) */
	char unsub[1300];
	snprintf(unsub, sizeof unsub, "<%s>", url);
	int rc = -1;
	if (mail_render(app, "confirm", &ctx, &subject, text, html, err, errlen))
		goto out;
	subject_mark(&subject, subject_prefix);
	struct mail m = {app->cfg->from, email, subject.data, mid, unsub,
			 text->data, html->data, now, "confirm:remarket", NULL,
			 app->cfg->reply_to};
	rc = mail_build(&m, msg, err, errlen);
out:
	buf_free(&subject);
	return rc;
}

/* Builds and sends the confirmation mail of CONTACT. */
static int confirm_mail(struct app *app, int64_t contact, const char *email,
			rm_time now, char *err, size_t errlen)
{
	struct buf text = {0}, html = {0}, msg = {0};
	int rc = -1;
	if (confirm_build(app, contact, email, now, "", &text, &html, &msg, err,
			  errlen) == 0) {
		/* the outbox names it m-NNNNN.eml (minus the contact id), apart
		 * from the messages' mNNNNNN.eml; a refused address is not
		 * tried again */
		enum send_result r = mail_send(app, -contact, email, &msg, err,
					       errlen);
		rc = r == SEND_OK ? 0 : r == SEND_PERM ? -2 : -1;
	}
	buf_free(&text);
	buf_free(&html);
	buf_free(&msg);
	return rc;
}

/* `remarket preview` and `send-test`: template TPL for the contact of
 * EMAIL (NULL: a sample) built into MSG, its parts into TEXT and HTML,
 * addressed to TO (NULL: the contact), through the tick's own code:
 * msg_build (see "previews" in The message context), or confirm_build
 * for the double opt-in mail. Nothing is written to the database. */
int mail_preview(struct app *app, const char *tpl, const char *trigger,
		 const char *email, const char *to, rm_time now,
		 const char *prefix, struct buf *text, struct buf *html,
		 struct buf *msg, char *err, size_t errlen)
{
	if (!strcmp(tpl, "confirm")) {
		const char *addr = to ? to : email ? email : "sample@example.com";
		return confirm_build(app, 0, addr, now, prefix, text, html, msg,
				     err, errlen);
	}
	struct msgrow m;
	rm_time code_expires;
	int rc = msg_preview_load(app, tpl, trigger, email, now, &m,
				  &code_expires, err, errlen);
	if (rc == 0 && to)
		copy_str(m.email, sizeof m.email, to);
	if (rc == 0)
		rc = msg_build(app, &m, now, code_expires, prefix, text, html, msg,
			       err, errlen);
	free(m.items);
	return rc;
}

/* Sends the confirmation mails due. Each is marked sent before it goes:
 * a crash loses a confirmation (the shopper may ask again), never sends
 * one twice; a failure to render or send is unmarked for the next tick.
 * The tick's budget (real seconds since STARTED) is checked before each:
 * the rest wait for the next tick. */
static int confirm_send(struct app *app, rm_time now, time_t started,
			struct tick_summary *sum)
{
	struct db *db = app->db;
	for (int round = 0; round < TICK_MAX / TICK_BATCH; round++) {
		int64_t ids[TICK_BATCH];
		char (*emails)[256] = calloc(TICK_BATCH, 256);
		int n = 0;
		if (!emails)
			return -1;
		sqlite3_stmt *s = q(db, ST_CONFIRM_DUE, "i", (int64_t)TICK_BATCH);
		while (n < TICK_BATCH && sqlite3_step(s) == SQLITE_ROW) {
			ids[n] = sqlite3_column_int64(s, 0);
			copy_str(emails[n++], 256, col_text(s, 1));
		}
		sqlite3_reset(s);
		for (int i = 0; i < n; i++) {
			char err[512] = "";
			if (time(NULL) - started >= app->cfg->tick_budget_seconds) {
				sum->budget_spent = 1;
				free(emails);
				return 0;
			}
			if (q_exec(db, q(db, ST_CONFIRM_CLAIM, "ii", ids[i],
					 (int64_t)now)) < 0) {
				free(emails);
				return -1;
			}
			if (sqlite3_changes(db->h) != 1)
				continue;
			int rc = confirm_mail(app, ids[i], emails[i], now, err,
					      sizeof err);
			if (rc < 0)
				fprintf(stderr, "remarket: confirmation mail to "
					"contact %lld: %s%s\n", (long long)ids[i], err,
					rc == -1 ? " (tried again at the next tick)" : "");
			/* a template or relay failure: the next tick tries again,
			 * and this one sends no more confirmations */
			if (rc == -1) {
				q_exec(db, q(db, ST_CONFIRM_UNCLAIM, "i", ids[i]));
				free(emails);
				return 0;
			}
		}
		free(emails);
		if (n < TICK_BATCH)
			break;
	}
	return 0;
}

/* Lapsed customers (with the segments, in chunks: seg_update), new
 * orders and idle product views become enrollments of their flows. */
static int detect_lifecycle(struct app *app, rm_time now,
			    struct tick_summary *sum)
{
	struct db *db = app->db;
	if (seg_update(app, now, 1, sum) || db_begin(db) < 0)
		return -1;
	int rc = q_exec(db, q(db, ST_ORDER_ENROLL, "i", (int64_t)now));
	sum->enrolled += rc ? 0 : sqlite3_changes(db->h);
	rm_time browse_before = now - app->cfg->browse_idle_minutes * 60;
	rc = rc || q_exec(db, q(db, ST_BROWSE_ENROLL, "ii", (int64_t)now,
				(int64_t)browse_before));
	sum->enrolled += rc ? 0 : sqlite3_changes(db->h);
	rc = rc || q_exec(db, q(db, ST_BROWSE_DONE, "i", (int64_t)browse_before));
	rc = rc || q_exec(db, q(db, ST_QUEUE_DUE, "i", (int64_t)now));
	rc = rc || db_commit(db);
	if (rc)
		db_rollback(db);
	return rc ? -1 : 0;
}

/* Several short transactions, not one: carts; the segments and win-back
 * in chunks; new orders and the steps now due. Each is idempotent (the
 * UNIQUE keys of enrollments and messages, the dirty set kept until it
 * is done), so an overlapping tick or a crash between two is harmless. */
int flow_detect(struct app *app, rm_time now, struct tick_summary *sum)
{
	struct db *db = app->db;
	rm_time idle_before = now - app->cfg->idle_minutes * 60;
	/* the enrollments made below are those after this id: how many of
	 * them are held out is read at the end (an index range) */
	int64_t last = db_scalar_stmt(q(db, ST_ENROLL_LAST, NULL));
	if (db_begin(db) < 0)
		return -1;
	int rc = q_exec(db, q(db, ST_ABANDON, "ii", (int64_t)now,
			      (int64_t)idle_before));
	sum->abandoned += rc ? 0 : sqlite3_changes(db->h);
	rc = rc || q_exec(db, q(db, ST_ENROLL, "i", (int64_t)now));
	sum->enrolled += rc ? 0 : sqlite3_changes(db->h);
	rc = rc || db_commit(db);
	if (rc) {
		db_rollback(db);
		return -1;
	}
	if (detect_lifecycle(app, now, sum) < 0)
		return -1;
	sum->held_out += db_scalar_stmt(q(db, ST_ENROLL_HELD_SINCE, "i", last));
	return 0;
}

/* Claims up to LIMIT due messages for OWNER. SPENT is the real seconds
 * the tick has run: the lease runs lease_seconds from the claim, not
 * from the tick's (injected) start, as lease_keep renews it. */
static int claim_as(struct app *app, rm_time now, int64_t owner, int64_t *ids,
		    int limit, int64_t spent)
{
	int took = db_turn(app->db), n = 0, rc = SQLITE_ERROR;
	if (q_exec(app->db, q(app->db, ST_CLAIM_GIVE_UP, "ii", (int64_t)now,
			      (int64_t)CRASH_MAX)) < 0 ||
	    (sqlite3_changes(app->db->h) > 0 &&
	     q_exec(app->db, q(app->db, ST_CLAIM_GIVE_UP_EXIT, "")) < 0))
		goto out;
	sqlite3_stmt *s = q(app->db, ST_CLAIM, "iiii", (int64_t)now,
			    (int64_t)app->cfg->lease_seconds + (spent > 0 ? spent : 0),
			    (int64_t)limit, owner);
	while ((rc = sqlite3_step(s)) == SQLITE_ROW)
		if (n < limit)
			ids[n++] = sqlite3_column_int64(s, 0);
	sqlite3_reset(s);
out:
	if (took)
		db_unlock(app->db);
	return rc == SQLITE_DONE ? n : -1;
}

static int64_t lease_owner_new(void)
{
	int64_t o;
	randombytes_buf(&o, sizeof o);
	return o & INT64_MAX; /* positive, never 0 in practice */
}

int flow_claim(struct app *app, rm_time now, int64_t *ids, int limit)
{
	return claim_as(app, now, lease_owner_new(), ids, limit, 0);
}

static int flow_queue(struct app *app, rm_time now)
{
	struct db *db = app->db;
	if (db_begin(db) < 0)
		return -1;
	if (q_exec(db, q(db, ST_QUEUE_DUE, "i", (int64_t)now)) || db_commit(db)) {
		db_rollback(db);
		return -1;
	}
	return 0;
}

/* Keeps this tick's leases alive while it runs: "now" is the tick's
 * (injected) time plus the real seconds it has spent, so a slow relay
 * never lets a lease lapse under a tick that is still working on it. */
struct lease {
	int64_t owner;
	time_t started, renewed;
};

static void lease_keep(struct app *app, rm_time now, struct lease *l)
{
	time_t real = time(NULL);
	if (real - l->renewed < app->cfg->lease_seconds / 3)
		return;
	rm_time tick_now = now + (rm_time)(real - l->started);
	q_write(app->db, q(app->db, ST_LEASE_RENEW, "ii", l->owner,
			   (int64_t)(tick_now + app->cfg->lease_seconds)));
	l->renewed = real;
}

/* The tick's time budget (real seconds since it started) is spent. */
static int out_of_budget(struct app *app, const struct lease *l)
{
	return time(NULL) - l->started >= app->cfg->tick_budget_seconds;
}

/*
 * Sending on several SMTP connections at once (smtp_connections; one
 * with the outbox). Each sender is a thread with its own database
 * connection and its own curl handle, so its connection to the relay
 * stays open across messages; sender 0 is the tick's own thread and app.
 * They share one claim-and-send loop (struct sendpool, under its lock):
 * whichever sender runs out of messages claims the next batch with the
 * tick's lease, so each claimed message is sent by exactly one of them,
 * and an overlapping tick is kept away by the lease as before. Each
 * counts into a summary of its own, added to the tick's once the round
 * is over (each message exactly once); the held refusals are shared
 * (struct refusals). A send that stops the tick (the relay refuses us or
 * is unavailable, a step paused, a database failure) or the budget spent
 * stops every sender after the message it is on; the messages claimed
 * and not tried are given back only once all have stopped, never under
 * one still sending.
 */
struct sendpool {
	pthread_mutex_t lock;
	rm_time now;
	struct lease *l;
	struct refusals *rf;
	pthread_rwlock_t *prep; /* the preparations (flow_send), or NULL */
	int64_t ids[TICK_BATCH];
	int n, pos;
	int empty;  /* a claim found nothing due */
	int stop;   /* a sender stopped the tick, or the budget is spent */
	int budget; /* the budget is spent */
	int rc;     /* -1 (database) or 1 (stop) from a sender, else 0 */
	long claimed;
};

struct sender {
	struct sendpool *p;
	struct app *app;
	struct app own; /* a sender thread's: its connection and curl handle */
	struct tick_summary sum;
	pthread_t th;
	int open, running;
	int64_t first; /* a message taken for it before it started, or 0 */
};

/* The next message for sender S in *ID: 0, or 1 when there is none (no
 * more due, the tick stops, the budget is spent). */
static int pool_next(struct sender *s, int64_t *id)
{
	struct sendpool *p = s->p;
	int rc = 1;
	pthread_mutex_lock(&p->lock);
	/* each message done renews the lease of those still on their way */
	lease_keep(s->app, p->now, p->l);
	while (!p->stop) {
		if (out_of_budget(s->app, p->l)) {
			p->stop = p->budget = 1;
			break;
		}
		if (p->pos < p->n) {
			*id = p->ids[p->pos++];
			rc = 0;
			break;
		}
		if (p->empty)
			break;
		int n = claim_as(s->app, p->now, p->l->owner, p->ids, TICK_BATCH,
				 (int64_t)(time(NULL) - p->l->started));
		if (n < 0)
			p->rc = -1, p->stop = 1;
		p->empty = n == 0;
		p->n = n > 0 ? n : 0;
		p->pos = 0;
		p->claimed += p->n;
		if (n > 0)
			fault("crash_after_claim");
	}
	pthread_mutex_unlock(&p->lock);
	return rc;
}

static void *sender_loop(void *arg)
{
	struct sender *s = arg;
	struct sendpool *p = s->p;
	int64_t id = s->first;
	struct tpl_cache cache = {0};
	s->first = 0;
	tpl_cache = &cache; /* the templates are read once a round */
	while (id || pool_next(s, &id) == 0) {
		int rc = flow_send(s->app, id, p->now, p->l->owner, &s->sum, p->rf,
				   p->prep);
		id = 0;
		if (rc != 0) {
			pthread_mutex_lock(&p->lock);
			if (p->rc >= 0)
				p->rc = rc;
			p->stop = 1;
			pthread_mutex_unlock(&p->lock);
			break;
		}
	}
	tpl_cache = NULL;
	tpl_cache_free(&cache);
	return NULL;
}

/* Opens sender S's own connection and curl handle, with the tick's keys. */
static int sender_open(struct sender *s, struct app *app)
{
	char err[256];
	struct app *o = &s->own;
	memset(o, 0, sizeof *o);
	o->cfg = app->cfg;
	memcpy(o->key, app->key, sizeof o->key);
	memcpy(o->old_keys, app->old_keys, sizeof o->old_keys);
	o->nold = app->nold;
	if (db_open(&o->db, app->cfg->db, err, sizeof err) < 0 ||
	    !(o->curl = curl_easy_init())) {
		fprintf(stderr, "remarket: a second SMTP connection: %s; sending "
			"on fewer (smtp_connections)\n",
			o->db ? "libcurl cannot create a handle" : err);
		app_close(o);
		return -1;
	}
	s->app = o;
	s->open = 1;
	return 0;
}

void problem_add(struct problems *p, const char *fmt, ...)
{
	char line[sizeof p->line[0]];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	for (int i = 0; i < p->n; i++)
		if (!strcmp(p->line[i], line))
			return;
	if (p->n == RM_PROBLEMS) {
		p->more++;
		return;
	}
	copy_str(p->line[p->n++], sizeof p->line[0], line);
}

/* Adds a sender's counts to the tick's, and empties them. */
static void sum_add(struct tick_summary *to, struct tick_summary *from)
{
	to->abandoned += from->abandoned, to->enrolled += from->enrolled;
	to->sent += from->sent, to->retry += from->retry;
	to->failed += from->failed, to->exited += from->exited;
	to->skipped += from->skipped, to->stale += from->stale;
	to->deferred += from->deferred;
	to->deferred_skipped += from->deferred_skipped;
	if (!*to->stopped)
		copy_str(to->stopped, sizeof to->stopped, from->stopped);
	for (int i = 0; i < from->problems.n; i++)
		problem_add(&to->problems, "%s", from->problems.line[i]);
	to->problems.more += from->problems.more;
	memset(from, 0, sizeof *from);
}

/* One round of claiming and sending on up to NS senders (S[0] the tick's
 * own thread), until nothing is due, the budget is spent or a send stops
 * the tick. The others are opened and started once a claim found more
 * than one message. Returns 0, 1 (stop) or -1. */
static int send_round(struct sender *s, int ns, struct app *app, rm_time now,
		      struct lease *l, struct tick_summary *sum,
		      struct refusals *rf, long *claimed)
{
	pthread_rwlock_t prep;
	pthread_rwlockattr_t attr;
	pthread_rwlockattr_init(&attr); /* one prepared alone waits for no crowd */
	pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	pthread_rwlock_init(&prep, &attr);
	pthread_rwlockattr_destroy(&attr);
	struct sendpool p = {.now = now, .l = l, .rf = rf, .prep = ns > 1 ? &prep : NULL};
	pthread_mutex_init(&p.lock, NULL);
	s[0].p = &p;
	s[0].app = app;
	int64_t id = 0;
	if (pool_next(&s[0], &id) == 0 && p.n > 1) {
		for (int k = 1; k < ns; k++) {
			if (!s[k].open && sender_open(&s[k], app) < 0)
				break;
			s[k].p = &p;
			s[k].running = pthread_create(&s[k].th, NULL, sender_loop,
						      &s[k]) == 0;
			if (!s[k].running)
				break;
		}
	}
	s[0].first = id;
	if (id)
		sender_loop(&s[0]);
	/* while the others finish their messages, keep the lease alive for
	 * them (a relay may answer several connections one after another) */
	for (int k = 1; k < ns; k++)
		while (s[k].running) {
			struct timespec ts;
			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_sec += 1;
			int e = pthread_timedjoin_np(s[k].th, NULL, &ts);
			if (e != ETIMEDOUT) {
				if (e != 0)
					pthread_join(s[k].th, NULL);
				s[k].running = 0;
				sum_add(sum, &s[k].sum);
				break;
			}
			pthread_mutex_lock(&p.lock);
			lease_keep(app, now, l);
			pthread_mutex_unlock(&p.lock);
		}
	pthread_mutex_destroy(&p.lock);
	pthread_rwlock_destroy(&prep);
	*claimed += p.claimed;
	if (p.budget) { /* what was claimed and not tried goes back */
		q_write(app->db, q(app->db, ST_LEASE_RELEASE, "i", l->owner));
		sum->budget_spent = 1;
	}
	return p.rc;
}

/* The claim-and-send loop of one tick: rounds of leased messages until
 * none is due, the budget is spent or a send stops the tick. */
static int flow_rounds(struct app *app, rm_time now, struct lease *l,
		       struct tick_summary *sum, struct refusals *rf)
{
	int ns = *app->cfg->smtp_url ? (int)app->cfg->smtp_connections : 1;
	struct sender *s = calloc((size_t)ns, sizeof *s);
	if (!s)
		return -1;
	int rc = 0;
	long total = 0;
	/* a step skipped for its segment (or stale) makes the next one due
	 * at once: queue again, a few rounds at most */
	for (int round = 0; round < 4 && total < TICK_MAX; round++) {
		long skipped = sum->skipped + sum->stale;
		if (round > 0 && flow_queue(app, now) < 0) {
			rc = -1;
			break;
		}
		s[0].sum = *sum;
		rc = send_round(s, ns, app, now, l, &s[0].sum, rf, &total);
		*sum = s[0].sum;
		if (rc != 0 || sum->budget_spent ||
		    sum->skipped + sum->stale == skipped)
			break;
	}
	for (int k = 1; k < ns; k++)
		if (s[k].open)
			app_close(&s[k].own);
	free(s);
	return rc;
}

int flow_tick(struct app *app, rm_time now, struct tick_summary *sum)
{
	memset(sum, 0, sizeof *sum);
	time_t started = time(NULL);
	if (flow_detect(app, now, sum) < 0)
		return -1;
	if (!strcmp(app->cfg->browser_consent, "confirm") &&
	    confirm_send(app, now, started, sum) < 0)
		return -1;
	struct lease l = {lease_owner_new(), started, time(NULL)};
	struct refusals *rf = calloc(1, sizeof *rf);
	if (!rf)
		return -1;
	pthread_mutex_init(&rf->lock, NULL);
	int rc = flow_rounds(app, now, &l, sum, rf);
	/* refusals not settled by the end: like a 4xx, tried again later */
	if (refusals_settle(app, rf, NULL, SEND_TEMP, now, sum) < 0)
		rc = -1;
	pthread_mutex_destroy(&rf->lock);
	free(rf);
	if (*sum->stopped) /* a step paused, the relay refusing us */
		problem_add(&sum->problems, "%s", sum->stopped);
	if (rc > 0) { /* the relay refuses us, or a step was paused: give the
		       * rest back */
		q_write(app->db, q(app->db, ST_LEASE_RELEASE, "i", l.owner));
		return 0;
	}
	return rc;
}

/* The lines of P as a JSON array of strings, appended to OUT. */
static int problems_json(struct db *db, const struct problems *p,
			 struct buf *out)
{
	struct buf a = {0};
	buf_adds(&a, "[]");
	for (int i = 0; i < p->n && !buf_failed(&a); i++) {
		sqlite3_stmt *s = q(db, ST_JSON_ARRAY_ADD, "tt", buf_str(&a),
				    p->line[i]);
		buf_reset(&a);
		json_from(db, s, &a);
	}
	int rc = buf_failed(&a) ? -1 : buf_adds(out, buf_str(&a));
	buf_free(&a);
	return rc;
}

int tick_json(struct app *app, const struct tick_summary *s, rm_time now,
	      struct buf *out)
{
	struct buf pj = {0};
	int rc = problems_json(app->db, &s->problems, &pj);
	if (rc == 0)
		rc = json_from(app->db, q(app->db, ST_JSON_TICK, "iiiiiiiiitiitiii",
					  (int64_t)now, (int64_t)s->abandoned,
					  (int64_t)s->enrolled, (int64_t)s->sent,
					  (int64_t)s->retry, (int64_t)s->failed,
					  (int64_t)s->exited, (int64_t)s->skipped,
					  (int64_t)s->stale,
					  *s->stopped ? s->stopped : NULL,
					  (int64_t)s->winback_waiting,
					  (int64_t)s->held_out, buf_str(&pj),
					  (int64_t)s->problems.more,
					  (int64_t)s->deferred,
					  (int64_t)s->deferred_skipped),
			       out);
	buf_free(&pj);
	return rc;
}

/* ==== Tick runs ======================================================= */
/*
 * Tick runs (table ticks). POST /tick starts a run and answers at once; a
 * sender outside the request (the FastCGI server's background thread, or
 * a detached process in CGI mode) does the work and records how it
 * ended; `remarket tick` records its runs the same way. A run without an
 * end is running while its process lives and it is younger than the
 * longest a tick can take (its budget, then one last message with every
 * SMTP time-out spent, and a minute of slack); otherwise it was lost to a
 * crash or a restart, and its messages go again once their lease ends.
 * This section records runs and hands each to flow_tick; the run's
 * messages are the flow engine's business, never this section's.
 */

static int tick_alive(struct app *app, int64_t pid, int64_t started_real)
{
	const struct config *c = app->cfg;
	int64_t most = (int64_t)c->tick_budget_seconds + c->smtp_connect_timeout +
		       8 * (int64_t)c->smtp_reply_timeout + 60;
	if ((int64_t)time(NULL) - started_real > most || pid <= 0 || pid > INT_MAX)
		return 0;
	return kill((pid_t)pid, 0) == 0 || errno == EPERM;
}

/* The running tick's id in *id (*running = 1), or a new run recorded for
 * this process (*running = 0), in one transaction: two requests at once
 * never start two ticks. ALWAYS: record a new run even beside a running
 * one (the CLI's). */
static int tick_begin(struct app *app, rm_time now, const char *source,
		      int always, int64_t *id, int *running)
{
	struct db *db = app->db;
	*id = 0;
	*running = 0;
	if (db_begin(db) < 0)
		return -1;
	sqlite3_stmt *s = q(db, ST_TICK_OPEN, NULL);
	while (!always && !*running && sqlite3_step(s) == SQLITE_ROW)
		if (tick_alive(app, sqlite3_column_int64(s, 1),
			       sqlite3_column_int64(s, 2))) {
			*id = sqlite3_column_int64(s, 0);
			*running = 1;
		}
	sqlite3_reset(s);
	if (!*running) {
		s = q(db, ST_TICK_INSERT, "itii", (int64_t)now, source,
		      (int64_t)getpid(), (int64_t)time(NULL));
		if (sqlite3_step(s) == SQLITE_ROW)
			*id = sqlite3_column_int64(s, 0);
		sqlite3_reset(s);
		if (!*id || q_exec(db, q(db, ST_TICK_PRUNE, "i", *id))) {
			db_rollback(db);
			return -1;
		}
	}
	if (db_commit(db)) {
		db_rollback(db);
		return -1;
	}
	return 0;
}

/* Records how run ID ended: the summary (with its id and budget_spent),
 * with "error": WHY if the tick failed (SUM NULL: the error alone). The
 * summary as recorded is appended to OUT. */
static int tick_end(struct app *app, int64_t id, const struct tick_summary *sum,
		    rm_time now, const char *why, struct buf *out)
{
	struct buf js = {0}, e = {0};
	int rc = why ? json_from(app->db, q(app->db, ST_JSON_ERROR, "t", why), &e)
		     : 0;
	if (rc == 0 && sum)
		rc = tick_json(app, sum, now, &js);
	if (rc == 0 && why && sum) { /* what the tick did before it failed */
		sqlite3_stmt *s = q(app->db, ST_JSON_PATCH, "tt", buf_str(&js),
				    buf_str(&e));
		buf_reset(&js);
		rc = json_from(app->db, s, &js);
	} else if (rc == 0 && why) {
		rc = buf_adds(&js, buf_str(&e));
	}
	buf_free(&e);
	sqlite3_stmt *s = q(app->db, ST_TICK_FINISH, "iitt", id,
			    (int64_t)time(NULL), rc ? "{}" : buf_str(&js),
			    sum && sum->budget_spent ? "true" : "false");
	rc = sqlite3_step(s) == SQLITE_ROW ? 0 : -1;
	if (rc == 0 && out)
		rc = buf_adds(out, col_text(s, 0));
	sqlite3_reset(s);
	buf_free(&js);
	return rc;
}

/* Runs tick ID (made by tick_begin) and records its end. */
/* retention_days: the raw events (the only copy of their bodies; nothing
 * reads them back) older than that go, oldest first, in chunks of 500 rows
 * taken from the start of the rowid (an index range, never a scan), each
 * its own short write; at most 20 chunks a tick, the rest next tick.
 * Errors only delay it: the tick goes on. */
static void events_expire(struct app *app, rm_time now)
{
	long days = app->cfg->retention_days;
	struct db *db = app->db;
	for (int i = 0; days > 0 && i < 20; i++) {
		if (db_begin(db) ||
		    q_exec(db, q(db, ST_EVENTS_EXPIRE, "ii",
				 (int64_t)now - (int64_t)days * 86400, (int64_t)500))) {
			db_rollback(db);
			return;
		}
		int n = sqlite3_changes(db->h);
		if (db_commit(db)) {
			db_rollback(db);
			return;
		}
		if (n < 500)
			return;
	}
}

/* Returns 0, 1 when something kept mail from going (the summary's
 * problems: the checks before sending refused, a template failed, the
 * relay refused us or was down, a disk could not be written), or -1. */
static int tick_run(struct app *app, int64_t id, rm_time now, struct buf *out)
{
	struct tick_summary sum;
	memset(&sum, 0, sizeof sum);
	/* a tick that would send wrong mail (a broken template, the demo
	 * sender, links a shopper cannot open) sends none and says why */
	if (check_run(app, now, CHECK_TICK, NULL, &sum.problems, NULL) ==
	    CHECK_STOP) {
		copy_str(sum.stopped, sizeof sum.stopped, "the checks before "
			 "sending failed: nothing was sent (see problems, and "
			 "remarket status)");
		for (int i = 0; i < sum.problems.n; i++)
			fprintf(stderr, "remarket: tick refused: %s\n",
				sum.problems.line[i]);
		return tick_end(app, id, &sum, now, NULL, out) < 0 ? -1 : 1;
	}
	events_expire(app, now);
	if (flow_tick(app, now, &sum) < 0) {
		tick_end(app, id, &sum, now, "tick failed: database busy or broken, "
			 "see the server log", out);
		return -1;
	}
	if (tick_end(app, id, &sum, now, NULL, out) < 0)
		return -1;
	return sum.problems.n ? 1 : 0;
}

/* {"tick": id, "state": "running" | "finished" | "failed" | "lost", ...}
 * and the recorded summary; ID 0: the latest run. 0, or -1 if none. */
static int tick_state_json(struct app *app, int64_t id, struct buf *out)
{
	sqlite3_stmt *s = q(app->db, ST_TICK_GET, id ? "i" : "n", id);
	if (sqlite3_step(s) != SQLITE_ROW) {
		sqlite3_reset(s);
		return -1;
	}
	id = sqlite3_column_int64(s, 0);
	const char *state =
		sqlite3_column_type(s, 3) != SQLITE_NULL ? "finished" :
		tick_alive(app, sqlite3_column_int64(s, 1),
			   sqlite3_column_int64(s, 2)) ? "running" : "lost";
	struct buf summary = {0};
	int has = sqlite3_column_type(s, 4) != SQLITE_NULL;
	if (has)
		buf_adds(&summary, col_text(s, 4));
	int64_t tnow = sqlite3_column_int64(s, 5);
	sqlite3_reset(s);
	int rc = buf_failed(&summary) ? -1 :
		 json_from(app->db, q(app->db, ST_JSON_TICK_STATE, "itit", id,
				      state, tnow, has ? buf_str(&summary) : NULL),
			   out);
	buf_free(&summary);
	return rc;
}

/* ==== Feedback: bounces, complaints, unsubscribes by mail ============= */
/*
 * What comes back after a message left: a delivery status notification
 * (RFC 3464), a spam complaint (an ARF report, RFC 5965), a mail to
 * unsubscribe_mailto, or the same events from a sending service's
 * webhook (POST /feedback, in HTTP routes). fb_mail_parse reads one mail
 * into a struct fb_event; fb_apply finds the message and acts: a hard
 * bounce (5.x.x) suppresses, a third soft bounce (4.x.x) within 14 days
 * suppresses, a complaint unsubscribes, suppresses, is counted and pauses
 * its step once complaints pass 0.3 % of the step's sends in 7 days; a
 * mailed unsubscribe unsubscribes. Each is recorded once per message
 * (table feedback), so a report delivered twice counts once.
 *
 * No dependency of ours reads MIME (curl_mime only writes it), so the
 * reader here is the least those reports need, and strict: a header
 * block, one level of multipart by its boundary, 7bit/8bit or base64
 * parts, and the field groups of message/delivery-status and
 * message/feedback-report. It never allocates but for a base64 part,
 * never reads past the length it is given, and is fuzzed
 * (tests/fuzz/feedback.c).
 * Trust: a mail anyone can send suppresses only the message it proves,
 * by its VERP tag (signed) or by a Message-ID of ours (seen only by its
 * recipient); an address alone in such a mail never suppresses anybody.
 * A mailed unsubscribe goes by its From, as every mailto unsubscribe
 * does, and can only unsubscribe. Webhooks are signed: their address is
 * enough.
 */

#define FB_SOFT_LIMIT 3           /* soft bounces ... */
#define FB_SOFT_WINDOW (14 * 86400) /* ... within this suppress */
#define FB_RATE_WINDOW (7 * 86400)  /* complaint rates count these sends */
#define FB_WEBHOOK_FRESH 300      /* a Mailgun signature is this fresh */

struct mime_part {
	const char *head, *body; /* not NUL-terminated */
	size_t headlen, bodylen;
};

/* Splits S into its header block and its body at the first empty line;
 * without one it is all header. */
static void mime_split(const char *s, size_t n, struct mime_part *p)
{
	*p = (struct mime_part){s, s + n, n, 0};
	for (size_t ls = 0; ls < n;) {
		const char *nl = memchr(s + ls, '\n', n - ls);
		size_t le = nl ? (size_t)(nl - s) : n, len = le - ls;
		if (len && s[le - 1] == '\r')
			len--;
		if (!len) {
			p->headlen = ls;
			p->body = nl ? nl + 1 : s + n;
			p->bodylen = n - (size_t)(p->body - s);
			return;
		}
		ls = le + 1;
	}
}

/* The unfolded value of the first header NAME of P, trimmed, cut to fit
 * OUT; 1 if there is one, else 0 and "". */
static int mime_header(const struct mime_part *p, const char *name,
		       char *out, size_t outlen)
{
	size_t nl = strlen(name), o = 0;
	const char *s = p->head, *end = p->head + p->headlen;
	out[0] = '\0';
	while (s < end) {
		const char *eol = memchr(s, '\n', (size_t)(end - s));
		const char *next = eol ? eol + 1 : end;
		if ((size_t)(end - s) <= nl || strncasecmp(s, name, nl) ||
		    s[nl] != ':') {
			s = next;
			continue;
		}
		for (const char *v = s + nl + 1;;) {
			for (const char *le = eol ? eol : end; v < le; v++) {
				while (!o && v < le && (*v == ' ' || *v == '\t'))
					v++;
				/* a NUL or a bare CR never joins two pieces into
				 * one word: each stands for a character */
				if (v < le && o + 1 < outlen &&
				    !(*v == '\r' && v + 1 == le))
					out[o++] = *v == '\t' || *v == '\r' ? ' ' :
						   *v ? *v : '?';
			}
			if (next >= end || (*next != ' ' && *next != '\t'))
				break;
			v = next; /* a folded line goes on */
			eol = memchr(v, '\n', (size_t)(end - v));
			next = eol ? eol + 1 : end;
		}
		while (o && (out[o - 1] == ' '))
			o--;
		out[o] = '\0';
		return 1;
	}
	return 0;
}

/* The media type of a Content-Type value, lower case ("" if none). */
static void mime_type(const char *v, char *out, size_t n)
{
	size_t o = 0;
	for (; *v && *v != ';' && *v != ' ' && o + 1 < n; v++)
		out[o++] = (char)tolower((unsigned char)*v);
	out[o] = '\0';
}

/* Parameter NAME of a Content-Type value (token or quoted-string);
 * 1 if found non-empty and it fits OUT. */
static int mime_param(const char *v, const char *name, char *out, size_t n)
{
	size_t nl = strlen(name);
	int quoted = 0;
	for (const char *p = v; *p; p++) {
		if (*p == '"')
			quoted = !quoted;
		else if (*p == '\\' && quoted && p[1])
			p++;
		if (quoted || *p != ';')
			continue;
		const char *k = p + 1;
		while (*k == ' ' || *k == '\t')
			k++;
		if (strncasecmp(k, name, nl) || k[nl] != '=')
			continue;
		size_t o = 0;
		const char *q = k + nl + 1;
		if (*q == '"') {
			for (q++; *q && *q != '"'; q++) {
				if (*q == '\\' && q[1])
					q++;
				if (o + 1 >= n)
					return 0;
				out[o++] = *q;
			}
			if (*q != '"')
				return 0;
		} else {
			for (; *q && *q != ';' && *q != ' ' && *q != '\t'; q++) {
				if (o + 1 >= n)
					return 0;
				out[o++] = *q;
			}
		}
		out[o] = '\0';
		return o > 0;
	}
	return 0;
}

/* 1 if S[a..b) is only transport padding (blanks, a CR). */
static int mime_blank(const char *s, size_t a, size_t b)
{
	for (; a < b; a++)
		if (s[a] != ' ' && s[a] != '\t' && s[a] != '\r')
			return 0;
	return 1;
}

/* The body parts of a multipart body S, up to MAX: what lies between the
 * "--BOUNDARY" lines (the CRLF before a delimiter belongs to it). A mail
 * cut before its closing delimiter keeps its last part as it is. */
static int mime_parts(const char *s, size_t n, const char *boundary,
		      struct mime_part *parts, int max)
{
	size_t bl = strlen(boundary);
	const char *start = NULL;
	int np = 0;
	for (size_t ls = 0; ls < n;) {
		const char *nl = memchr(s + ls, '\n', n - ls);
		size_t le = nl ? (size_t)(nl - s) : n;
		if (le - ls >= 2 + bl && s[ls] == '-' && s[ls + 1] == '-' &&
		    !memcmp(s + ls + 2, boundary, bl)) {
			size_t r = ls + 2 + bl;
			int close = le - r >= 2 && s[r] == '-' && s[r + 1] == '-';
			if (mime_blank(s, r + (close ? 2 : 0), le)) {
				if (start && np < max) {
					size_t a = (size_t)(start - s), e = ls;
					if (e > a && s[e - 1] == '\n')
						e--;
					if (e > a && s[e - 1] == '\r')
						e--;
					mime_split(start, e - a, &parts[np++]);
				}
				if (close)
					return np;
				start = nl ? nl + 1 : s + n;
			}
		}
		ls = le + 1;
	}
	if (start && np < max)
		mime_split(start, n - (size_t)(start - s), &parts[np++]);
	return np;
}

/* P's body as sent: base64 decoded into DEC, else as it is (7bit, 8bit,
 * binary; quoted-printable is left as it is: the fields read here are
 * ASCII). -1 if the base64 is broken. */
static int mime_body(const struct mime_part *p, struct buf *dec,
		     const char **b, size_t *n)
{
	char cte[32];
	*b = p->body;
	*n = p->bodylen;
	mime_header(p, "Content-Transfer-Encoding", cte, sizeof cte);
	if (strcasecmp(cte, "base64"))
		return 0;
	buf_reset(dec);
	size_t got = 0;
	if (buf_reserve(dec, p->bodylen) < 0 ||
	    sodium_base642bin((unsigned char *)dec->data, p->bodylen + 1,
			      p->body, p->bodylen, " \t\r\n", &got, NULL,
			      sodium_base64_VARIANT_ORIGINAL) < 0)
		return -1;
	dec->len = got;
	dec->data[got] = '\0';
	*b = dec->data;
	*n = got;
	return 0;
}

/* The field groups of a message/delivery-status or feedback-report
 * body: runs of header lines between empty lines, up to MAX. */
static int mime_groups(const char *s, size_t n, struct mime_part *g, int max)
{
	int ng = 0;
	while (n && ng < max) {
		struct mime_part p;
		mime_split(s, n, &p);
		if (p.headlen)
			g[ng++] = p;
		if (p.bodylen >= n)
			break; /* nothing was consumed: cannot happen, but never loop */
		s = p.body;
		n = p.bodylen;
	}
	return ng;
}

/* The part of type TYPE (or ALT) among PARTS, or NULL. */
static const struct mime_part *mime_find(const struct mime_part *parts,
					 int np, const char *type,
					 const char *alt)
{
	char ct[256], mt[128];
	for (int i = 0; i < np; i++) {
		mime_header(&parts[i], "Content-Type", ct, sizeof ct);
		mime_type(ct, mt, sizeof mt);
		if (!strcmp(mt, type) || (alt && !strcmp(mt, alt)))
			return &parts[i];
	}
	return NULL;
}

/* "rfc822; a@b" (a DSN's or an ARF's address field) -> "a@b"; "<m@x>" ->
 * the address. */
static void fb_addr(const char *v, char *out, size_t n)
{
	const char *semi = strchr(v, ';');
	char tmp[320];
	copy_str(tmp, sizeof tmp, semi ? semi + 1 : v);
	addr_spec(trim(tmp), out, n);
	char *t = trim(out);
	memmove(out, t, strlen(t) + 1);
}

/* A Message-ID's <...>, angle brackets included ("" if none). */
static void fb_msgid(const char *v, char *out, size_t n)
{
	const char *lt = strchr(v, '<'), *gt = lt ? strchr(lt, '>') : NULL;
	out[0] = '\0';
	if (lt && gt && (size_t)(gt - lt + 1) < n) {
		memcpy(out, lt, (size_t)(gt - lt + 1));
		out[gt - lt + 1] = '\0';
	}
}

/* 1 if S is an RFC 3463 status code, class.subject.detail. */
static int fb_status_ok(const char *s)
{
	if (!strchr("245", s[0]) || !s[0] || s[1] != '.')
		return 0;
	size_t a = strspn(s + 2, "0123456789");
	if (a < 1 || a > 3 || s[2 + a] != '.')
		return 0;
	size_t b = strspn(s + 3 + a, "0123456789");
	return b >= 1 && b <= 3 && !s[3 + a + b];
}

/* Takes the VERP tag of ADDR if it proves a message and none is known. */
static void fb_verp(const struct app *app, const char *addr,
		    struct fb_event *ev)
{
	int64_t id;
	if (!ev->message && *addr && verp_parse(app, addr, &id) == 0)
		ev->message = id;
}

/* The Message-ID (and Return-Path's VERP tag) of the returned message or
 * headers of a report. */
static void fb_returned(const struct app *app, const struct mime_part *ret,
			struct buf *dec, struct fb_event *ev)
{
	const char *b;
	size_t n;
	char v[512];
	struct mime_part orig;
	if (!ret || mime_body(ret, dec, &b, &n) < 0)
		return;
	mime_split(b, n, &orig);
	if (mime_header(&orig, "Message-ID", v, sizeof v))
		fb_msgid(v, ev->message_id, sizeof ev->message_id);
	if (mime_header(&orig, "Return-Path", v, sizeof v))
		fb_verp(app, v, ev);
}

/* A DSN: the first recipient group that failed. */
static void fb_dsn(const struct mime_part *ds, struct buf *dec,
		   struct fb_event *ev, char *why, size_t whylen)
{
	struct mime_part g[16];
	char action[64], status[64], rcpt[320];
	const char *b;
	size_t n;
	if (mime_body(ds, dec, &b, &n) < 0) {
		snprintf(why, whylen, "the delivery status is broken base64");
		return;
	}
	int ng = mime_groups(b, n, g, 16);
	snprintf(why, whylen, "the delivery status names no recipient");
	for (int i = 1; i < ng; i++) { /* group 0 is the per-message fields */
		if (!mime_header(&g[i], "Action", action, sizeof action))
			continue;
		mime_header(&g[i], "Status", status, sizeof status);
		char *st = trim(status);
		st[strcspn(st, " (")] = '\0';
		if (strcasecmp(action, "failed")) {
			snprintf(why, whylen, "a DSN with Action: %.40s, not failed "
				 "(a delay warning or a delivery notice)", action);
			continue;
		}
		if (!fb_status_ok(st) || st[0] == '2') {
			snprintf(why, whylen, "a failed DSN without a 4.x.x or 5.x.x "
				 "Status");
			continue;
		}
		if (mime_header(&g[i], "Final-Recipient", rcpt, sizeof rcpt) ||
		    mime_header(&g[i], "Original-Recipient", rcpt, sizeof rcpt))
			fb_addr(rcpt, ev->email, sizeof ev->email);
		copy_str(ev->status, sizeof ev->status, st);
		ev->kind = st[0] == '5' ? FB_HARD : FB_SOFT;
		return;
	}
}

/* An ARF report: abuse and fraud are complaints; not-spam, virus,
 * auth-failure and the rest are not. */
static void fb_arf(const struct app *app, const struct mime_part *fr,
		   struct buf *dec, struct fb_event *ev, char *why,
		   size_t whylen)
{
	struct mime_part g;
	char type[64], v[320];
	const char *b;
	size_t n;
	if (mime_body(fr, dec, &b, &n) < 0) {
		snprintf(why, whylen, "the feedback report is broken base64");
		return;
	}
	mime_split(b, n, &g);
	if (!mime_header(&g, "Feedback-Type", type, sizeof type)) {
		snprintf(why, whylen, "a feedback report without Feedback-Type");
		return;
	}
	if (strcasecmp(type, "abuse") && strcasecmp(type, "fraud")) {
		snprintf(why, whylen, "Feedback-Type: %.40s is not a complaint", type);
		return;
	}
	if (mime_header(&g, "Original-Mail-From", v, sizeof v))
		fb_verp(app, v, ev);
	if (mime_header(&g, "Original-Rcpt-To", v, sizeof v))
		fb_addr(v, ev->email, sizeof ev->email);
	copy_str(ev->status, sizeof ev->status, type);
	for (char *c = ev->status; *c; c++)
		*c = (char)tolower((unsigned char)*c);
	ev->kind = FB_COMPLAINT;
}

/* 1 if ADDR is unsubscribe_mailto's address, with or without a +tag. */
static int fb_is_mailto(const struct app *app, const char *addr)
{
	char a[320], want[320];
	if (!*app->cfg->unsubscribe_mailto || !*addr)
		return 0;
	addr_spec(addr, a, sizeof a);
	addr_spec(app->cfg->unsubscribe_mailto, want, sizeof want);
	char *at = strrchr(a, '@'), *wat = strrchr(want, '@');
	if (!at || !wat || strcasecmp(at, wat))
		return 0;
	size_t local = (size_t)(at - a), wl = (size_t)(wat - want);
	char *plus = memchr(a, '+', local);
	if (plus)
		local = (size_t)(plus - a);
	return local == wl && !strncasecmp(a, want, wl);
}

/* A mail to unsubscribe_mailto: its sender unsubscribes. Automatic mail
 * (an out-of-office reply, a bounce of its own) does not. */
static void fb_mailto(const struct mime_part *top, struct fb_event *ev,
		      char *why, size_t whylen)
{
	char v[320];
	if (mime_header(top, "Auto-Submitted", v, sizeof v) &&
	    strcasecmp(v, "no")) {
		snprintf(why, whylen, "an automatic reply (Auto-Submitted: %.40s) "
			 "to unsubscribe_mailto", v);
		return;
	}
	mime_header(top, "From", v, sizeof v);
	fb_addr(v, ev->email, sizeof ev->email);
	if (!val_email(ev->email)) {
		snprintf(why, whylen, "a mail to unsubscribe_mailto without a "
			 "From address");
		return;
	}
	ev->by_email = 1;
	copy_str(ev->status, sizeof ev->status, "mailto");
	ev->kind = FB_UNSUB;
}

enum fb_kind fb_mail_parse(const struct app *app, const char *mail,
			   size_t len, const char *rcpt, struct fb_event *ev,
			   char *why, size_t whylen)
{
	static const char *const to_hdrs[] = {"Delivered-To", "X-Original-To",
					      "To"};
	struct mime_part top, parts[8] = {{0}};
	struct buf dec = {0};
	char ct[512], type[128], report[64], boundary[128], v[320];
	memset(ev, 0, sizeof *ev);
	ev->source = "mail";
	snprintf(why, whylen, "not a delivery status notification, a feedback "
		 "report or a mail to unsubscribe_mailto");
	mime_split(mail, len, &top);
	fb_verp(app, rcpt ? rcpt : "", ev);
	for (size_t i = 0; i < sizeof to_hdrs / sizeof to_hdrs[0]; i++)
		if (mime_header(&top, to_hdrs[i], v, sizeof v))
			fb_verp(app, v, ev);
	mime_header(&top, "Content-Type", ct, sizeof ct);
	mime_type(ct, type, sizeof type);
	if (!strcmp(type, "multipart/report") &&
	    mime_param(ct, "report-type", report, sizeof report) &&
	    mime_param(ct, "boundary", boundary, sizeof boundary)) {
		int np = mime_parts(top.body, top.bodylen, boundary, parts, 8);
		const struct mime_part *ret = mime_find(parts, np, "message/rfc822",
							"text/rfc822-headers");
		if (!ret)
			ret = mime_find(parts, np, "message/global",
					"message/global-headers");
		const struct mime_part *ds = mime_find(
			parts, np, "message/delivery-status",
			"message/global-delivery-status");
		const struct mime_part *fr = mime_find(parts, np,
						       "message/feedback-report", NULL);
		if (!strcasecmp(report, "delivery-status") && ds)
			fb_dsn(ds, &dec, ev, why, whylen);
		else if (!strcasecmp(report, "feedback-report") && fr)
			fb_arf(app, fr, &dec, ev, why, whylen);
		else
			snprintf(why, whylen, "a report of type %.40s without its "
				 "status part", report);
		if (ev->kind != FB_NONE)
			fb_returned(app, ret, &dec, ev);
	} else {
		int to_us = rcpt && *rcpt ? fb_is_mailto(app, rcpt) : 0;
		for (size_t i = 0; !to_us && !(rcpt && *rcpt) &&
				   i < sizeof to_hdrs / sizeof to_hdrs[0]; i++)
			to_us = mime_header(&top, to_hdrs[i], v, sizeof v) &&
				fb_is_mailto(app, v);
		if (to_us)
			fb_mailto(&top, ev, why, whylen);
	}
	buf_free(&dec);
	return ev->kind;
}

/* The message and contact EV is about: its VERP tag, our Message-ID, or
 * (where the source may name one by address) the contact and its last
 * message. 0 if found, 1 if not (WHY says), -1 on a database error. */
static int fb_find(struct app *app, const struct fb_event *ev, int64_t *msg,
		   int64_t *contact, char *why, size_t whylen)
{
	struct db *db = app->db;
	long m = 0, c = 0;
	if (ev->message &&
	    q_row(q(db, ST_FB_MESSAGE, "i", ev->message), "ll", &m, &c)) {
	} else if (*ev->message_id &&
		   q_row(q(db, ST_FB_MESSAGE_ID, "t", ev->message_id), "ll", &m, &c)) {
	} else if (ev->by_email && *ev->email &&
		   q_row(q(db, ST_FB_CONTACT, "t", ev->email), "ll", &c, &m)) {
	} else {
		snprintf(why, whylen, "%s", ev->by_email ?
			 "no contact has that address" :
			 "it names no message of ours (no VERP tag that verifies, "
			 "no Message-ID of ours); an address alone is not trusted");
		return 1;
	}
	*msg = m;
	*contact = c;
	return 0;
}

/* After a complaint: pauses the step of message MSG once its complaints
 * pass 0.3 % of its sends of the last 7 days. */
static int fb_step_check(struct app *app, int64_t msg, rm_time now,
			 char *what, size_t whatlen)
{
	struct db *db = app->db;
	sqlite3_stmt *s = q(db, ST_FB_STEP_RATE, "ii", msg,
			    (int64_t)(now - FB_RATE_WINDOW));
	int64_t enr = 0, sends = 0, compl = 0;
	int step = 0;
	if (sqlite3_step(s) == SQLITE_ROW) {
		enr = sqlite3_column_int64(s, 0);
		step = sqlite3_column_int(s, 1);
		sends = sqlite3_column_int64(s, 2);
		compl = sqlite3_column_int64(s, 3);
	}
	sqlite3_reset(s);
	if (!sends || compl * 1000 <= sends * 3)
		return 0;
	char reason[160];
	snprintf(reason, sizeof reason, "complaints: %lld of %lld sends in 7 "
		 "days (%.2f %%, over 0.3 %%)", (long long)compl,
		 (long long)sends, 100.0 * (double)compl / (double)sends);
	size_t k = strlen(what);
	snprintf(what + k, whatlen - k, "; step %d paused (%s)", step, reason);
	return q_exec(db, q(db, ST_STEP_PAUSE, "iiit", enr, (int64_t)step,
			    (int64_t)now, reason));
}

/* What EV does to contact C (message M), inside fb_apply's transaction. */
static int fb_act(struct app *app, const struct fb_event *ev, int64_t m,
		  int64_t c, rm_time now, char *what, size_t whatlen)
{
	struct db *db = app->db;
	char reason[80];
	long soft = 0;
	switch (ev->kind) {
	case FB_HARD:
		snprintf(reason, sizeof reason, "bounce %s", ev->status);
		snprintf(what, whatlen, "hard bounce %s: contact %lld suppressed",
			 ev->status, (long long)c);
		return q_exec(db, q(db, ST_SUPPRESS, "iit", c, (int64_t)now, reason)) ||
		       q_exec(db, q(db, ST_EXIT_CONTACT, "it", c, "bounce"));
	case FB_SOFT:
		q_row(q(db, ST_FB_SOFT_COUNT, "ii", c,
			(int64_t)(now - FB_SOFT_WINDOW)), "l", &soft);
		snprintf(what, whatlen, "soft bounce %s: contact %lld has %ld in "
			 "14 days%s", ev->status, (long long)c, soft,
			 soft >= FB_SOFT_LIMIT ? ": suppressed" : "");
		if (soft < FB_SOFT_LIMIT)
			return 0;
		snprintf(reason, sizeof reason, "%ld soft bounces in 14 days (last %s)",
			 soft, ev->status);
		return q_exec(db, q(db, ST_SUPPRESS, "iit", c, (int64_t)now, reason)) ||
		       q_exec(db, q(db, ST_EXIT_CONTACT, "it", c, "bounce"));
	case FB_COMPLAINT:
		snprintf(what, whatlen, "complaint (%s): contact %lld unsubscribed "
			 "and suppressed", ev->status, (long long)c);
		return q_exec(db, q(db, ST_UNSUBSCRIBE, "ii", c, (int64_t)now)) ||
		       q_exec(db, q(db, ST_SUPPRESS, "iit", c, (int64_t)now,
				    "complaint")) ||
		       q_exec(db, q(db, ST_EXIT_CONTACT, "it", c, "complaint")) ||
		       (m && fb_step_check(app, m, now, what, whatlen));
	case FB_UNSUB:
		snprintf(what, whatlen, "unsubscribe by %s: contact %lld "
			 "unsubscribed", ev->status, (long long)c);
		return q_exec(db, q(db, ST_UNSUBSCRIBE, "ii", c, (int64_t)now)) ||
		       q_exec(db, q(db, ST_EXIT_CONTACT, "it", c, "unsubscribe")) ||
		       (m && q_exec(db, q(db, ST_INTERACTION, "iti", m,
					  "unsubscribe", (int64_t)now)));
	case FB_NONE:
		break;
	}
	return 0;
}

int fb_apply(struct app *app, const struct fb_event *ev, rm_time now,
	     char *what, size_t whatlen)
{
	static const char *const kinds[] = {"", "hard", "soft", "complaint",
					    "unsubscribe"};
	struct db *db = app->db;
	int64_t m = 0, c = 0;
	if (ev->kind == FB_NONE) {
		snprintf(what, whatlen, "nothing to do");
		return 1;
	}
	int found = fb_find(app, ev, &m, &c, what, whatlen);
	if (found)
		return found;
	if (db_begin(db) ||
	    q_exec(db, q(db, ST_FB_RECORD, "iittti", m, c, kinds[ev->kind],
			 ev->status, ev->source, (int64_t)now)))
		goto fail;
	if (m && sqlite3_changes(db->h) == 0) {
		snprintf(what, whatlen, "already recorded for message %lld",
			 (long long)m);
		return db_commit(db) ? (db_rollback(db), -1) : 1;
	}
	if (fb_act(app, ev, m, c, now, what, whatlen) || db_commit(db))
		goto fail;
	if (m) {
		size_t k = strlen(what);
		snprintf(what + k, whatlen - k, " (message %lld)", (long long)m);
	}
	return 0;
fail:
	db_rollback(db);
	snprintf(what, whatlen, "database busy or broken");
	return -1;
}

int feedback_complaint_warnings(struct app *app, rm_time now, struct buf *out)
{
	sqlite3_stmt *s = q(app->db, ST_FB_WARNINGS, "i",
			    (int64_t)(now - FB_RATE_WINDOW));
	int n = 0;
	while (sqlite3_step(s) == SQLITE_ROW) {
		double sends = sqlite3_column_double(s, 2);
		double compl = sqlite3_column_double(s, 3);
		buf_addf(out, "flow %s step %d: %.0f complaints of %.0f sends in 7 "
			 "days (%.2f %%, warning over 0.1 %%, paused over 0.3 %%)%s\n",
			 col_text(s, 0), sqlite3_column_int(s, 1), compl, sends,
			 100 * compl / sends,
			 sqlite3_column_int(s, 4) ? ": paused" : "");
		n++;
	}
	sqlite3_reset(s);
	return buf_failed(out) ? -1 : n;
}

/* ==== Checks before sending and status ================================ */
/*
 * One table of checks (checks[] below), each a function that looks at
 * one thing and says ok, warn or stop, with one line and, for the JSON
 * form, its numbers. `remarket status` and GET /rm/health (for the
 * operator) run them all; init and serve run those marked CHECK_START
 * and refuse to start on a stop; a tick runs those marked CHECK_TICK
 * and sends nothing on a stop, its summary listing each problem. This
 * section reads and never writes: the key is never printed, smtp_url
 * only without its password, and a check that needs the database or
 * the key says "not checked" when it is missing. A new check is one
 * function and one row.
 */

/* The sample sender and address of a new install: real mail must not
 * go out under them (a stranger's shop, a fake postal address). */
#define DEMO_MARK "Maison Demo"

struct check_out {
	enum check_level level;
	char msg[400];         /* one line: what was found */
	struct problems lines; /* a line each (a template's error, a step) */
	struct buf data;       /* a JSON value for the JSON form, or empty */
};
struct check_ctx {
	struct app *app;
	rm_time now;
	int when;  /* the CHECK_* bit of who runs the checks */
	int db_ok; /* app->db is there at this binary's schema */
};
typedef void check_fn(const struct check_ctx *c, struct check_out *o);

static void check_say(struct check_out *o, enum check_level level,
		      const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void check_say(struct check_out *o, enum check_level level,
		      const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(o->msg, sizeof o->msg, fmt, ap);
	va_end(ap);
	if (level > o->level)
		o->level = level;
}

static void check_key(const struct check_ctx *c, struct check_out *o)
{
	struct buf b = {0};
	char err[512];
	if (load_keys(c->app->cfg->key_file, &b, err, sizeof err) < 0) {
		check_say(o, CHECK_STOP, "%s", err);
		return;
	}
	size_t n = b.len / RM_KEYBYTES;
	sodium_memzero(b.data, b.len);
	buf_free(&b);
	check_say(o, CHECK_OK, "key_file %s: %zu key%s (not shown)",
		  c->app->cfg->key_file, n, n == 1 ? "" : "s");
}

static void check_db(const struct check_ctx *c, struct check_out *o)
{
	const char *path = c->app->cfg->db;
	int want = (int)(sizeof migrations / sizeof migrations[0]);
	if (!c->app->db)
		check_say(o, CHECK_STOP, "db %s: cannot open it (not there? run "
			  "'remarket init')", path);
	else if (!c->db_ok)
		check_say(o, CHECK_STOP, "db %s is at schema %d, this remarket "
			  "needs %d: run 'remarket init'", path,
			  db_user_version(c->app->db), want);
	else
		check_say(o, CHECK_OK, "db %s at schema %d", path, want);
}

/* Template NAME's two files and their partials; a line a problem. */
static void check_template(const char *dir, const char *name, const char *used,
			   struct check_out *o)
{
	static const char *const ext[] = {".txt", ".html"};
	for (int i = 0; i < 2; i++) {
		char path[PATH_MAX], err[400];
		struct buf b = {0};
		int w = snprintf(path, sizeof path, "%s/%s%s", dir, name, ext[i]);
		if (!val_ident(name, 64) || w < 0 || (size_t)w >= sizeof path)
			problem_add(&o->lines, "template '%s' (%s): not a template "
				    "name", name, used);
		else if (tpl_lint(path, dir, ext[i], 0, err, sizeof err) < 0)
			problem_add(&o->lines, "%s (%s)", err, used);
		else if (i == 0 && (template_read(path, &b) < 0 ||
				    strncmp(buf_str(&b), "Subject:", 8) ||
				    !strstr(buf_str(&b), "\n\n")))
			problem_add(&o->lines, "%s:1: must start with 'Subject: "
				    "...' and a blank line (%s)", path, used);
		buf_free(&b);
	}
}

/* Every template an enabled step (or its B variant) sends, with the
 * partials they name, and the confirmation mail's under double opt-in. */
static void check_templates(const struct check_ctx *c, struct check_out *o)
{
	const struct config *cfg = c->app->cfg;
	if (!c->db_ok) {
		check_say(o, CHECK_WARN, "not checked: no database at this "
			  "schema (the flows name the templates)");
		return;
	}
	int n = 0, bad = 0;
	long before = 0;
	sqlite3_stmt *s = q(c->app->db, ST_CHECK_TEMPLATES, NULL);
	for (int confirm = 0; confirm < 2; confirm++) {
		while (!confirm && sqlite3_step(s) == SQLITE_ROW) {
			check_template(cfg->templates, col_text(s, 0),
				       col_text(s, 1), o);
			n++;
			bad += o->lines.n + o->lines.more > before;
			before = o->lines.n + o->lines.more;
		}
		if (confirm && !strcmp(cfg->browser_consent, "confirm")) {
			check_template(cfg->templates, "confirm", "browser_consent "
				       "= confirm", o);
			n++;
			bad += o->lines.n + o->lines.more > before;
		}
	}
	sqlite3_reset(s);
	if (bad)
		check_say(o, CHECK_STOP, "%d template%s of %d cannot be used "
			  "(templates = %s): nothing is sent until fixed", bad,
			  bad == 1 ? "" : "s", n, cfg->templates);
	else
		check_say(o, CHECK_OK, "the %d templates of the enabled steps and "
			  "their partials parse (%s)", n, cfg->templates);
}

/* SMS steps: the provider set up, and each step's NAME.sms there and
 * parsing. A warning, not a stop: mail goes on; an SMS step without a
 * provider goes by its next channel or is skipped, one without its .sms
 * waits (retried every 15 minutes). */
static void check_sms(const struct check_ctx *c, struct check_out *o)
{
	const struct config *cfg = c->app->cfg;
	if (!c->db_ok) {
		check_say(o, CHECK_WARN, "not checked: no database at this schema");
		return;
	}
	int n = 0;
	sqlite3_stmt *s = q(c->app->db, ST_CHECK_SMS_STEPS, NULL);
	while (sqlite3_step(s) == SQLITE_ROW) {
		char path[PATH_MAX], err[400];
		int w = snprintf(path, sizeof path, "%s/%s.sms", cfg->templates,
				 col_text(s, 0));
		n++;
		if (w < 0 || (size_t)w >= sizeof path ||
		    tpl_lint(path, cfg->templates, ".sms", 0, err, sizeof err) < 0)
			problem_add(&o->lines, "%s (%s: its SMS wait)",
				    w < 0 || (size_t)w >= sizeof path ? "path too long" :
				    err, col_text(s, 1));
	}
	sqlite3_reset(s);
	if (n && !sms_ready(cfg))
		check_say(o, CHECK_WARN, "%d step%s can go by SMS, but sms_provider "
			  "'%s' is not set up (twilio: twilio_account_sid, "
			  "twilio_auth_token, sms_from; webhook: sms_url, "
			  "sms_secret): they go by their next channel or are "
			  "skipped", n, n == 1 ? "" : "s", cfg->sms_provider);
	else if (o->lines.n)
		check_say(o, CHECK_WARN, "%d SMS template%s cannot be used",
			  o->lines.n, o->lines.n == 1 ? "" : "s");
	else if (n)
		check_say(o, CHECK_OK, "%d step%s can go by SMS (%s, from %s)", n,
			  n == 1 ? "" : "s", cfg->sms_provider, cfg->sms_from);
	else
		check_say(o, CHECK_OK, "no step goes by SMS");
}

/* Push steps: push set up (the VAPID key and vapid_subject), and each
 * step's NAME.push there and parsing. A warning, as for SMS: without
 * push a step goes by its next channel; without its .push it waits. */
static void check_push(const struct check_ctx *c, struct check_out *o)
{
	const struct config *cfg = c->app->cfg;
	if (!c->db_ok) {
		check_say(o, CHECK_WARN, "not checked: no database at this schema");
		return;
	}
	int n = 0;
	sqlite3_stmt *s = q(c->app->db, ST_CHECK_PUSH_STEPS, NULL);
	while (sqlite3_step(s) == SQLITE_ROW) {
		char path[PATH_MAX], err[400];
		int w = snprintf(path, sizeof path, "%s/%s.push", cfg->templates,
				 col_text(s, 0));
		n++;
		if (w < 0 || (size_t)w >= sizeof path ||
		    tpl_lint(path, cfg->templates, ".push", 0, err, sizeof err) < 0)
			problem_add(&o->lines, "%s (%s: its push messages wait)",
				    w < 0 || (size_t)w >= sizeof path ? "path too long" :
				    err, col_text(s, 1));
	}
	sqlite3_reset(s);
	if (n && !push_ready(cfg))
		check_say(o, CHECK_WARN, "%d step%s can go by push, but push is not "
			  "set up (remarket keygen --vapid; vapid_subject): they go "
			  "by their next channel or are skipped", n, n == 1 ? "" : "s");
	else if (o->lines.n)
		check_say(o, CHECK_WARN, "%d push template%s cannot be used",
			  o->lines.n, o->lines.n == 1 ? "" : "s");
	else if (n)
		check_say(o, CHECK_OK, "%d step%s can go by push", n, n == 1 ? "" : "s");
	else
		check_say(o, CHECK_OK, "no step goes by push");
}

/* The storefront's script, which `remarket serve` hands out. */
static void check_static(const struct check_ctx *c, struct check_out *o)
{
	char path[PATH_MAX];
	struct buf b = {0};
	snprintf(path, sizeof path, "%s/remarket.js", c->app->cfg->static_dir);
	errno = 0;
	int rc = read_file(path, &b, 1 << 20);
	if (rc < 0 || b.len == 0 || !val_utf8(b.data, b.len))
		check_say(o, CHECK_STOP, "%s: %s — set static_dir to the folder "
			  "of remarket.js (make install puts it in %s/static)",
			  path, rc < 0 && errno ? strerror(errno) : rc < 0 ?
			  "cannot read it" : b.len == 0 ? "empty" :
			  "not UTF-8 text", RM_SHAREDIR);
	else
		check_say(o, CHECK_OK, "%s (%zu bytes)", path, b.len);
	buf_free(&b);
}

/* The relay answers (status only: a tick finds out by sending), or the
 * outbox can be written. */
static void check_relay(const struct check_ctx *c, struct check_out *o)
{
	const struct config *cfg = c->app->cfg;
	char msg[700];
	if (!*cfg->smtp_url) {
		if (access(cfg->outbox, F_OK) == 0 && access(cfg->outbox, W_OK) != 0)
			check_say(o, CHECK_STOP, "no relay (smtp_url empty): mail "
				  "goes to outbox %s, which cannot be written: %s",
				  cfg->outbox, strerror(errno));
		else
			check_say(o, CHECK_OK, "no relay (smtp_url empty): mail goes "
				  "to outbox %s, nobody receives it", cfg->outbox);
		return;
	}
	if (!(c->when & CHECK_STATUS) || !c->app->curl) {
		url_shown(cfg->smtp_url, msg, sizeof msg);
		check_say(o, CHECK_OK, "%s (not probed)", msg);
		return;
	}
	enum send_result r = smtp_probe(c->app, msg, sizeof msg);
	check_say(o, r == SEND_OK ? CHECK_OK : CHECK_STOP, "%s", msg);
}

/* 1 if URL's host is this machine: no shopper can open such a link. */
static int host_loopback(const char *host)
{
	char h[256];
	size_t n = strlen(host);
	if (n >= sizeof h)
		return 0;
	copy_str(h, sizeof h, host[0] == '[' ? host + 1 : host); /* [::1] */
	if (h[0] && h[strlen(h) - 1] == ']')
		h[strlen(h) - 1] = '\0';
	size_t k = strlen(h);
	struct ipaddr a;
	if (!strcasecmp(h, "localhost") ||
	    (k > 10 && !strcasecmp(h + k - 10, ".localhost")))
		return 1;
	return ip_parse(h, &a) == 0 &&
	       ip_in_list("127.0.0.0/8 ::1 0.0.0.0 ::", &a, NULL, NULL) == 1;
}

/* Why URL (config key KEY) cannot go in a real mail, or NULL. */
static const char *link_unfit(const char *url, char *why, size_t n,
			      const char *key)
{
	CURLU *u = curl_url();
	char *scheme = NULL, *host = NULL;
	int ok = u && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
		 curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
		 curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK;
	const char *r = NULL;
	if (!ok)
		snprintf(why, n, "%s %s: not a URL", key, url), r = why;
	else if (strcmp(scheme, "https") != 0)
		snprintf(why, n, "%s %s: not https", key, url), r = why;
	else if (host_loopback(host))
		snprintf(why, n, "%s %s: points at this machine (%s)", key, url,
			 host), r = why;
	curl_free(scheme);
	curl_free(host);
	curl_url_cleanup(u);
	return r;
}

/* With a real relay the links must open for a shopper: https, not this
 * machine (allow_insecure_links = yes: for tests and staging). */
static void check_links(const struct check_ctx *c, struct check_out *o)
{
	const struct config *cfg = c->app->cfg;
	const char *keys[] = {"base_url", "cart_url"};
	const char *urls[] = {cfg->base_url, cfg->cart_url};
	char why[600];
	if (!*cfg->smtp_url) {
		check_say(o, CHECK_OK, "mail goes to the outbox: links not checked");
		return;
	}
	int allowed = !strcmp(cfg->allow_insecure_links, "yes");
	for (int i = 0; i < 2; i++)
		if (link_unfit(urls[i], why, sizeof why, keys[i]))
			problem_add(&o->lines, "%s", why);
	if (!o->lines.n)
		check_say(o, CHECK_OK, "base_url and cart_url are https links to "
			  "a public host");
	else if (allowed)
		check_say(o, CHECK_WARN, "links a shopper may not open go to a "
			  "real relay (allow_insecure_links = yes)");
	else
		check_say(o, CHECK_STOP, "mail to a real relay must carry https "
			  "links a shopper can open: fix base_url / cart_url, or "
			  "set allow_insecure_links = yes (tests, staging)");
}

/* Real mail under the sample shop's name and address: refused. */
static void check_sender(const struct check_ctx *c, struct check_out *o)
{
	const struct config *cfg = c->app->cfg;
	if (!*cfg->smtp_url) {
		check_say(o, CHECK_OK, "mail goes to the outbox: sender not checked");
		return;
	}
	if (strstr(cfg->from, DEMO_MARK))
		problem_add(&o->lines, "from is the demo's (%s): set your store's "
			    "sender", cfg->from);
	if (strstr(cfg->postal_address, DEMO_MARK))
		problem_add(&o->lines, "postal_address is the demo's (%s): set "
			    "your store's postal address (marketing mail must "
			    "carry it)", cfg->postal_address);
	if (o->lines.n)
		check_say(o, CHECK_STOP, "no real mail under the sample shop's "
			  "name or address: set from and postal_address");
	else
		check_say(o, CHECK_OK, "from %s", cfg->from);
}

/* The last tick run: when, how it ended, what it sent. */
static void check_last_tick(const struct check_ctx *c, struct check_out *o)
{
	struct app *app = c->app;
	if (!c->db_ok) {
		check_say(o, CHECK_WARN, "not checked: no database");
		return;
	}
	if (tick_state_json(app, 0, &o->data) < 0) {
		buf_reset(&o->data);
		check_say(o, CHECK_WARN, "no tick has run yet: run 'remarket tick' "
			  "from cron every minute (or POST /rm/tick)");
		return;
	}
	sqlite3_stmt *s = q(app->db, ST_CHECK_TICK, "t", buf_str(&o->data));
	if (sqlite3_step(s) == SQLITE_ROW) {
		int64_t ago = (int64_t)time(NULL) - sqlite3_column_int64(s, 5);
		const char *state = col_text(s, 1);
		long nprob = (long)sqlite3_column_int64(s, 4);
		int bad = strcmp(state, "finished") && strcmp(state, "running");
		check_say(o, bad || nprob || ago > 3600 ? CHECK_WARN : CHECK_OK,
			  "tick %lld %s %lld min ago: sent %lld, retry %lld%s%s%s",
			  (long long)sqlite3_column_int64(s, 0), state,
			  (long long)(ago / 60), (long long)sqlite3_column_int64(s, 2),
			  (long long)sqlite3_column_int64(s, 3),
			  nprob ? "; problems: " : "", nprob ? col_text(s, 6) : "",
			  ago > 3600 ? " — is the tick's cron job running?" : "");
	}
	sqlite3_reset(s);
}

/* Messages due now and not sent: a tick that falls behind, or none. */
static void check_backlog(const struct check_ctx *c, struct check_out *o)
{
	if (!c->db_ok) {
		check_say(o, CHECK_WARN, "not checked: no database");
		return;
	}
	sqlite3_stmt *s = q(c->app->db, ST_CHECK_BACKLOG, "i", (int64_t)c->now);
	if (sqlite3_step(s) == SQLITE_ROW) {
		long due = (long)sqlite3_column_int64(s, 0);
		int64_t late = sqlite3_column_int64(s, 1);
		buf_adds(&o->data, col_text(s, 3));
		check_say(o, due && late > 3600 ? CHECK_WARN : CHECK_OK,
			  "%ld message%s due (%lld retrying)%s", due,
			  due == 1 ? "" : "s", (long long)sqlite3_column_int64(s, 2),
			  due && late > 3600 ? ", the oldest due over an hour ago: "
			  "ticks do not keep up or do not run" : "");
	}
	sqlite3_reset(s);
}

/* Failed messages of the last 7 days, by their reason. */
static void check_failures(const struct check_ctx *c, struct check_out *o)
{
	if (!c->db_ok) {
		check_say(o, CHECK_WARN, "not checked: no database");
		return;
	}
	long total = 0;
	sqlite3_stmt *s = q(c->app->db, ST_CHECK_FAILURES, "i",
			    (int64_t)c->now - 7 * 86400);
	while (sqlite3_step(s) == SQLITE_ROW) {
		total += (long)sqlite3_column_int64(s, 1);
		problem_add(&o->lines, "%lld × %s",
			    (long long)sqlite3_column_int64(s, 1), col_text(s, 0));
	}
	sqlite3_reset(s);
	json_from(c->app->db, q(c->app->db, ST_CHECK_FAILURES_JSON, "i",
				(int64_t)c->now - 7 * 86400), &o->data);
	check_say(o, CHECK_OK, "%ld message%s failed in 7 days%s", total,
		  total == 1 ? "" : "s", total ? ", by reason:" : "");
}

/* Steps paused because the relay refused their content. */
static void check_paused(const struct check_ctx *c, struct check_out *o)
{
	if (!c->db_ok) {
		check_say(o, CHECK_WARN, "not checked: no database");
		return;
	}
	sqlite3_stmt *s = q(c->app->db, ST_STEPS_PAUSED, NULL);
	while (sqlite3_step(s) == SQLITE_ROW)
		problem_add(&o->lines, "%s step %lld: %s", col_text(s, 0),
			    (long long)sqlite3_column_int64(s, 1), col_text(s, 3));
	sqlite3_reset(s);
	if (o->lines.n)
		check_say(o, CHECK_WARN, "%d step%s paused, their messages wait "
			  "(remarket flows resume FLOW STEP):", o->lines.n,
			  o->lines.n == 1 ? "" : "s");
	else
		check_say(o, CHECK_OK, "no step paused");
}

/* New browser-only contacts past browser_new_contacts_per_hour. */
static void check_browser_cap(const struct check_ctx *c, struct check_out *o)
{
	if (!c->db_ok) {
		check_say(o, CHECK_WARN, "not checked: no database");
		return;
	}
	long held = (long)db_scalar_stmt(q(c->app->db, ST_REP_BROWSER_HELD, "ii",
					   (int64_t)c->now - 86400,
					   (int64_t)c->now + 1));
	buf_addf(&o->data, "%ld", held);
	check_say(o, held ? CHECK_WARN : CHECK_OK, "%ld new browser-only "
		  "contact%s in 24 h past the cap of %ld an hour (recorded, not "
		  "mailed)%s", held, held == 1 ? "" : "s",
		  c->app->cfg->browser_new_contacts_per_hour,
		  held ? ": a bot, or raise browser_new_contacts_per_hour" : "");
}

/* Lapsed customers waiting for room under winback_daily_max. */
static void check_winback_waiting(const struct check_ctx *c, struct check_out *o)
{
	if (!c->db_ok) {
		check_say(o, CHECK_WARN, "not checked: no database");
		return;
	}
	long n = (long)db_scalar_stmt(q(c->app->db, ST_LAPSE_WAITING, NULL));
	buf_addf(&o->data, "%ld", n);
	check_say(o, CHECK_OK, "%ld lapsed customer%s wait%s for the daily cap "
		  "(winback_daily_max = %ld)", n, n == 1 ? "" : "s",
		  n == 1 ? "s" : "", c->app->cfg->winback_daily_max);
}

/* Steps whose spam complaints passed 0.1 % of their sends in 7 days (the
 * Gmail and Yahoo line is 0.3 %, where the step pauses itself). */
static void check_complaints(const struct check_ctx *c, struct check_out *o)
{
	if (!c->db_ok) {
		check_say(o, CHECK_WARN, "not checked: no database");
		return;
	}
	struct buf b = {0};
	int n = feedback_complaint_warnings(c->app, c->now, &b);
	for (char *line = b.data, *nl; n > 0 && line && *line; line = nl + 1) {
		if (!(nl = strchr(line, '\n')))
			break;
		*nl = '\0';
		problem_add(&o->lines, "%s", line);
	}
	buf_free(&b);
	buf_addf(&o->data, "%d", n < 0 ? 0 : n);
	if (n < 0)
		check_say(o, CHECK_WARN, "not checked: the database failed");
	else if (n)
		check_say(o, CHECK_WARN, "%d step%s drew spam complaints over 0.1 %% "
			  "of their sends in 7 days (see the report):", n,
			  n == 1 ? "" : "s");
	else
		check_say(o, CHECK_OK, "spam complaints under 0.1 %% of every "
			  "step's sends in 7 days");
}

static const struct check {
	const char *name;
	int when; /* CHECK_* bits: who runs it */
	check_fn *fn;
} checks[] = {
	{"key", CHECK_STATUS, check_key},
	{"database", CHECK_STATUS, check_db},
	{"templates", CHECK_START | CHECK_TICK | CHECK_STATUS, check_templates},
	{"static", CHECK_START | CHECK_TICK | CHECK_STATUS, check_static},
	{"relay", CHECK_TICK | CHECK_STATUS, check_relay},
	{"links", CHECK_TICK | CHECK_STATUS, check_links},
	{"sender", CHECK_TICK | CHECK_STATUS, check_sender},
	{"last_tick", CHECK_STATUS, check_last_tick},
	{"backlog", CHECK_STATUS, check_backlog},
	{"failures", CHECK_STATUS, check_failures},
	{"paused", CHECK_STATUS, check_paused},
	{"browser_cap", CHECK_STATUS, check_browser_cap},
	{"winback_waiting", CHECK_STATUS, check_winback_waiting},
	{"complaints", CHECK_STATUS, check_complaints},
	{"sms", CHECK_STATUS, check_sms},
	{"push", CHECK_STATUS, check_push},
};

static const char *const level_names[] = {"ok", "warn", "stop"};

/* One check's result appended to the JSON array ARR and to TEXT. */
static int check_report(struct db *db, const char *name,
			const struct check_out *o, struct buf *arr,
			struct buf *text)
{
	if (text) {
		buf_addf(text, "%-5s %-16s %s\n", o->level == CHECK_STOP ? "STOP" :
			 level_names[o->level], name, o->msg);
		for (int i = 0; i < o->lines.n; i++)
			buf_addf(text, "%23s%s\n", "", o->lines.line[i]);
		if (o->lines.more)
			buf_addf(text, "%23s(and %ld more)\n", "", o->lines.more);
	}
	if (!arr)
		return 0;
	struct buf pj = {0};
	int rc = problems_json(db, &o->lines, &pj);
	if (rc == 0) {
		sqlite3_stmt *s = q(db, ST_CHECK_JSON_ADD, "tttttt", buf_str(arr),
				    name, level_names[o->level], o->msg,
				    buf_str(&pj), o->data.len ? buf_str(&o->data)
							      : NULL);
		buf_reset(arr);
		rc = json_from(db, s, arr);
	}
	buf_free(&pj);
	return rc;
}

int check_run(struct app *app, rm_time now, int when, struct buf *json,
	      struct problems *problems, struct buf *text)
{
	struct check_ctx c = {app, now, when, 0};
	struct db *jdb = app->db, *own = NULL;
	char err[256];
	int want = (int)(sizeof migrations / sizeof migrations[0]);
	c.db_ok = app->db && db_user_version(app->db) == want;
	/* the JSON is made by SQLite: without the store, in memory */
	if (!jdb && json && db_open(&own, ":memory:", err, sizeof err) < 0)
		return -1;
	if (!jdb)
		jdb = own;
	struct buf arr = {0};
	buf_adds(&arr, "[]");
	int worst = CHECK_OK, rc = 0;
	for (size_t i = 0; i < sizeof checks / sizeof checks[0]; i++) {
		if (!(checks[i].when & when))
			continue;
		struct check_out o;
		memset(&o, 0, sizeof o);
		checks[i].fn(&c, &o);
		if ((int)o.level > worst)
			worst = (int)o.level;
		if (o.level == CHECK_STOP && problems) {
			if (!o.lines.n)
				problem_add(problems, "%s", o.msg);
			for (int k = 0; k < o.lines.n; k++)
				problem_add(problems, "%s", o.lines.line[k]);
		}
		rc |= check_report(jdb, checks[i].name, &o, json ? &arr : NULL,
				   text);
		buf_free(&o.data);
	}
	if (json && rc == 0)
		rc = json_from(jdb, q(jdb, ST_CHECK_JSON, "tiit", level_names[worst],
				      (int64_t)(worst == CHECK_STOP ? 1 :
						worst == CHECK_WARN ? 3 : 0),
				      (int64_t)now, buf_str(&arr)), json);
	if (text)
		buf_addf(text, "%s\n", worst == CHECK_STOP ? "result: a problem "
			 "stops sending (exit 1)" : worst == CHECK_WARN ?
			 "result: sending works; warnings above (exit 3)" :
			 "result: all good (exit 0)");
	buf_free(&arr);
	db_close(own);
	if (rc || (json && buf_failed(json)) || (text && buf_failed(text)))
		return -1;
	return worst;
}

/* ==== Backtest ======================================================== */
/*
 * `remarket backtest --from D --to D [--json]`: what the flows would have
 * done over the store's own history, with nothing sent. The store's
 * database is copied (VACUUM INTO a new temporary file: a snapshot,
 * taken without the write lock) and only read from then on. On the copy
 * no flow has run yet and the orders after FROM are taken out (bt_reset).
 * Then the clock walks from FROM to TO, one tick a day: each day's orders
 * and refunds come back from the store's database through ev_apply, as
 * the importer applies them, and flow_tick runs with cfg->dry_run, so
 * detection, enrollment, the daily cap, holdouts, exits and
 * segment-targeted steps are the tick's own code; only a due message is
 * recorded as sent instead of being rendered and sent. After TO the
 * orders of 30 more days come back (no tick), and every enrollee who
 * ordered within the flow's window (30 days for a win-back, else
 * conversion_days) came back on their own, since nothing was sent: the
 * baseline a holdout will be compared with. The copy is removed.
 * Carts replay from their last state: an abandoned cart (or one ordered
 * after FROM) is open again, and is abandoned idle_minutes after its last
 * change unless its order comes first. Contacts are as they are now: an
 * unsubscribe or a bounce counts from FROM on.
 */

#define BT_AFTER_DAYS 30 /* orders re-applied after TO: the last windows */

/* Copies the store's database into a new temporary file PATH (0600). */
static int bt_copy(struct app *app, char *path, size_t n, char *err,
		   size_t errlen)
{
	const char *dir = getenv("TMPDIR");
	int k = snprintf(path, n, "%s/remarket-backtest-XXXXXX",
			 dir && *dir ? dir : "/tmp");
	if (k < 0 || (size_t)k >= n) {
		snprintf(err, errlen, "TMPDIR: the path is too long");
		return -1;
	}
	int fd = mkstemp(path);
	if (fd < 0) {
		snprintf(err, errlen, "%s: %s (set TMPDIR to a writable directory)",
			 path, strerror(errno));
		return -1;
	}
	close(fd);
	if (q_exec(app->db, q(app->db, ST_BT_COPY, "t", path)) < 0) {
		snprintf(err, errlen, "cannot copy db %s to %s: %s (is there room "
			 "in TMPDIR?)", app->cfg->db, path, sqlite3_errmsg(app->db->h));
		unlink(path);
		return -1;
	}
	return 0;
}

static void bt_unlink(const char *path)
{
	static const char *const sfx[] = {"", "-wal", "-shm", "-journal"};
	char p[PATH_MAX];
	for (size_t i = 0; i < sizeof sfx / sizeof sfx[0]; i++)
		if (snprintf(p, sizeof p, "%s%s", path, sfx[i]) < (int)sizeof p)
			unlink(p);
}

/* The copy as of FROM, before any flow: no enrollment, message or code;
 * no order (nor refund) after FROM; segments counted again by the first
 * tick. In the order the foreign keys want. */
static int bt_reset(struct db *db, rm_time from)
{
	static const struct { enum stmt_id id; int dated; } steps[] = {
		{ST_BT_CLEAR_ORDER_MSG, 0}, {ST_BT_CLEAR_INTERACTIONS, 0},
		{ST_BT_CLEAR_DISCOUNTS, 0}, {ST_BT_CLEAR_MESSAGES, 0},
		{ST_BT_CLEAR_WAITING, 0},   {ST_BT_CLEAR_ENROLLMENTS, 0},
		{ST_BT_CLEAR_REFUNDS, 1},   {ST_BT_REFUNDED, 0},
		{ST_BT_CLEAR_LINES, 1},     {ST_BT_CLEAR_ORDERS, 1},
		{ST_BT_CARTS_OPEN, 1},      {ST_BT_CLEAR_SEGMENTS, 0},
		{ST_BT_CLEAR_DIRTY, 0},     {ST_BT_CLEAR_PENDING, 0},
		{ST_BT_CLEAR_SEGSTATE, 0},
	};
	/* a throwaway file with one connection: a crash loses nothing
	 * worth an fsync, pages are read through a mapping, not a read()
	 * each, and written once at commit (no WAL to copy them from) */
	if (q_exec(db, q(db, ST_BT_FAST, NULL)) < 0 ||
	    q_exec(db, q(db, ST_BT_MMAP, NULL)) < 0 ||
	    q_exec(db, q(db, ST_BT_JOURNAL, NULL)) < 0 || db_begin(db) < 0)
		return -1;
	int rc = 0;
	for (size_t i = 0; rc == 0 && i < sizeof steps / sizeof steps[0]; i++)
		rc = q_exec(db, steps[i].dated ?
				q(db, steps[i].id, "i", (int64_t)from) :
				q(db, steps[i].id, NULL));
	if (rc || db_commit(db)) {
		db_rollback(db);
		return -1;
	}
	return 0;
}

static char *col_or_null(sqlite3_stmt *s, int i)
{
	return sqlite3_column_type(s, i) == SQLITE_NULL ? NULL :
	       (char *)sqlite3_column_text(s, i);
}

/* The orders, then the refunds, of (A, B] in the store's database LIVE,
 * applied to the copy by ev_apply, as the importer applies them. */
static int bt_apply(struct app *live, struct app *bt, rm_time a, rm_time b,
		    struct backtest *r)
{
	static char text[] = "{\"backtest\":true}";
	struct db *db = bt->db;
	int rc = 0, st, dup;
	if (db_begin(db) < 0)
		return -1;
	sqlite3_stmt *s = q(live->db, ST_BT_ORDERS_IN, "ii", (int64_t)a, (int64_t)b);
	while (rc == 0 && (st = sqlite3_step(s)) == SQLITE_ROW) {
		struct event e;
		memset(&e, 0, sizeof e);
		copy_str(e.type, sizeof e.type, "order");
		e.order_id = col_or_null(s, 0);
		e.email = col_or_null(s, 1); /* NULL: a guest's */
		e.cart_id = col_or_null(s, 2);
		e.total = sqlite3_column_double(s, 3);
		e.has_total = 1;
		e.currency = col_or_null(s, 4);
		e.items = col_or_null(s, 5);
		e.code = col_or_null(s, 6);
		e.ts = sqlite3_column_int64(s, 7);
		e.nitems = (long)sqlite3_column_int64(s, 8);
		e.consent = -1; /* as the contact is */
		e.text = text;
		rc = ev_apply(bt, &e, EV_CLI, NULL, e.ts, &dup) < 0 ? -1 : 0;
		r->orders += !dup;
	}
	if (rc == 0 && st != SQLITE_DONE)
		rc = -1;
	sqlite3_reset(s);
	s = q(live->db, ST_BT_REFUNDS_IN, "ii", (int64_t)a, (int64_t)b);
	while (rc == 0 && (st = sqlite3_step(s)) == SQLITE_ROW) {
		struct event e;
		memset(&e, 0, sizeof e);
		copy_str(e.type, sizeof e.type, "refund");
		e.refund_id = col_or_null(s, 0);
		e.order_id = col_or_null(s, 1);
		e.amount = sqlite3_column_double(s, 2);
		e.has_amount = 1;
		e.ts = sqlite3_column_int64(s, 3);
		e.consent = -1;
		e.text = text;
		int k = ev_apply(bt, &e, EV_CLI, NULL, e.ts, &dup);
		rc = k == -1 ? -1 : 0; /* -3: its order is not in the copy */
		r->refunds += k == 0 && !dup;
	}
	if (rc == 0 && st != SQLITE_DONE)
		rc = -1;
	sqlite3_reset(s);
	if (rc || db_commit(db)) {
		db_rollback(db);
		return -1;
	}
	return 0;
}

static int bt_flow_index(const struct backtest *r, const char *name)
{
	for (int i = 0; i < r->nflows; i++)
		if (!strcmp(r->flows[i].name, name))
			return i;
	return -1;
}

/* The results, read from the copy: per flow, then per flow and day.
 * END is where the history ends (a window past it is not complete). */
static int bt_results(struct app *bt, rm_time end, struct backtest *r)
{
	struct db *db = bt->db;
	sqlite3_stmt *s = q(db, ST_BT_FLOWS, "ii",
			    (int64_t)bt->cfg->conversion_days * 86400, (int64_t)end);
	while (sqlite3_step(s) == SQLITE_ROW &&
	       r->nflows < (int)(sizeof r->flows / sizeof r->flows[0])) {
		struct bt_flow *f = &r->flows[r->nflows++];
		copy_str(f->name, sizeof f->name, col_text(s, 0));
		copy_str(f->trigger, sizeof f->trigger, col_text(s, 1));
		f->enrolled = (long)sqlite3_column_int64(s, 2);
		f->held_out = (long)sqlite3_column_int64(s, 3);
		copy_str(f->first, sizeof f->first, col_text(s, 4));
		copy_str(f->last, sizeof f->last, col_text(s, 5));
		f->mails = (long)sqlite3_column_int64(s, 6);
		f->complete = (long)sqlite3_column_int64(s, 7);
		f->back_complete = (long)sqlite3_column_int64(s, 8);
		f->back = (long)sqlite3_column_int64(s, 9);
		f->window_days = (long)sqlite3_column_int64(s, 10);
	}
	sqlite3_reset(s);
	s = q(db, ST_BT_DAYS, NULL);
	int rc;
	while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
		int k = bt_flow_index(r, col_text(s, 0));
		if (k < 0)
			continue;
		struct bt_day *d = realloc(r->per_day, (r->ndays + 1) * sizeof *d);
		if (!d)
			break;
		r->per_day = d;
		d += r->ndays++;
		d->flow = k;
		copy_str(d->date, sizeof d->date, col_text(s, 1));
		copy_str(d->week, sizeof d->week, col_text(s, 2));
		d->enrolled = (long)sqlite3_column_int64(s, 3);
		d->mails = (long)sqlite3_column_int64(s, 4);
		struct bt_flow *f = &r->flows[k];
		if (d->mails > f->peak_mails) {
			f->peak_mails = d->mails;
			copy_str(f->peak_day, sizeof f->peak_day, d->date);
		}
	}
	sqlite3_reset(s);
	return rc == SQLITE_DONE ? 0 : -1;
}

/* The replay on the open copy BT: a tick a day from FROM to TO, the
 * orders of each day applied before its tick, then those of the 30
 * days after TO. */
static int bt_replay(struct app *app, struct app *bt, struct backtest *r)
{
	struct tick_summary sum;
	for (rm_time prev = r->from, t = r->from;;) {
		if (bt_apply(app, bt, prev, t, r) < 0 || flow_tick(bt, t, &sum) < 0)
			return -1;
		r->days++;
		if (t >= r->to)
			break;
		prev = t;
		t = r->to - t > 86400 ? t + 86400 : r->to;
	}
	r->lapse_days = flow_lapse_days(bt, r->lapse_why, sizeof r->lapse_why);
	long after = bt->cfg->conversion_days > BT_AFTER_DAYS ?
		     bt->cfg->conversion_days : BT_AFTER_DAYS;
	long orders = r->orders, refunds = r->refunds;
	rm_time end = r->to + after * 86400;
	if (bt_apply(app, bt, r->to, end, r) < 0)
		return -1;
	r->orders = orders, r->refunds = refunds; /* counted: the replayed */
	rm_time last = db_scalar_stmt(q(app->db, ST_BT_HISTORY_END, NULL));
	return bt_results(bt, last < end ? last : end, r);
}

int backtest_run(struct app *app, rm_time from, rm_time to,
		 struct backtest *r, char *err, size_t errlen)
{
	static char empty[] = "", checkbox[] = "checkbox";
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	memset(r, 0, sizeof *r);
	r->from = from, r->to = to;
	if (from < 0 || to < from) {
		snprintf(err, errlen, "--from must not be after --to");
		return -1;
	}
	char path[PATH_MAX];
	if (bt_copy(app, path, sizeof path, err, errlen) < 0)
		return -1;
	/* the copy's settings: the store's, but nothing leaves the machine
	 * and a step due between two daily ticks is not stale */
	struct config cfg = *app->cfg;
	cfg.db = path;
	cfg.smtp_url = empty;
	cfg.browser_consent = checkbox;
	cfg.dry_run = 1;
	cfg.max_lateness_hours = 0;
	cfg.tick_budget_seconds = LONG_MAX / 4;
	struct app bt;
	int rc = -1;
	if (app_open(&bt, &cfg, err, errlen) < 0)
		goto out;
	if (bt_reset(bt.db, from) < 0 || bt_replay(app, &bt, r) < 0)
		snprintf(err, errlen, "the replay failed on the copy %s: %s", path,
			 sqlite3_errmsg(bt.db->h));
	else
		rc = 0;
	app_close(&bt);
out:
	bt_unlink(path);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	r->seconds = (double)(t1.tv_sec - t0.tv_sec) +
		     (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
	return rc;
}

void backtest_free(struct backtest *r)
{
	free(r->per_day);
	r->per_day = NULL;
	r->ndays = 0;
}

static void bt_date(rm_time t, char out[11])
{
	time_t tt = (time_t)t;
	struct tm tm;
	if (!gmtime_r(&tt, &tm) || !strftime(out, 11, "%Y-%m-%d", &tm))
		copy_str(out, 11, "?");
}

/* What the flow enrolls, in words. */
static const char *bt_noun(const char *trigger)
{
	return !strcmp(trigger, "cart_abandoned") ? "carts" :
	       !strcmp(trigger, "order_placed") ? "orders" : "customers";
}

int backtest_json(const struct backtest *r, struct buf *out)
{
	char from[11], to[11];
	bt_date(r->from, from);
	bt_date(r->to, to);
	buf_addf(out, "{\"from\":\"%s\",\"to\":\"%s\",\"days\":%ld,\"orders\":%ld,"
		 "\"refunds\":%ld,\"seconds\":%.3f,\"lapse_days\":%ld,\"lapse_why\":",
		 from, to, r->days, r->orders, r->refunds, r->seconds, r->lapse_days);
	json_str(out, r->lapse_why);
	buf_adds(out, ",\"flows\":[");
	for (int i = 0; i < r->nflows; i++) {
		const struct bt_flow *f = &r->flows[i];
		buf_adds(out, i ? ",{\"name\":" : "{\"name\":");
		json_str(out, f->name);
		buf_adds(out, ",\"trigger\":");
		json_str(out, f->trigger);
		buf_addf(out, ",\"enrolled\":%ld,\"held_out\":%ld,\"first\":",
			 f->enrolled, f->held_out);
		if (*f->first)
			buf_addf(out, "\"%s\",\"last\":\"%s\"", f->first, f->last);
		else
			buf_adds(out, "null,\"last\":null");
		buf_addf(out, ",\"mails\":%ld,\"peak_day\":", f->mails);
		if (*f->peak_day)
			buf_addf(out, "\"%s\"", f->peak_day);
		else
			buf_adds(out, "null");
		buf_addf(out, ",\"peak_mails\":%ld,\"window_days\":%ld,"
			 "\"complete\":%ld,\"came_back\":%ld,"
			 "\"came_back_complete\":%ld,\"organic_rate\":",
			 f->peak_mails, f->window_days, f->complete, f->back,
			 f->back_complete);
		if (f->complete)
			buf_addf(out, "%.4f", (double)f->back_complete / f->complete);
		else
			buf_adds(out, "null");
		buf_adds(out, ",\"per_day\":[");
		int n = 0;
		for (size_t k = 0; k < r->ndays; k++)
			if (r->per_day[k].flow == i)
				buf_addf(out, "%s{\"date\":\"%s\",\"enrolled\":%ld,"
					 "\"mails\":%ld}", n++ ? "," : "",
					 r->per_day[k].date, r->per_day[k].enrolled,
					 r->per_day[k].mails);
		buf_adds(out, "]}");
	}
	buf_adds(out, "]}\n");
	return buf_failed(out) ? -1 : 0;
}

/* Flow I's mails per week (Monday's date), from the days in order. */
static void bt_weeks(const struct backtest *r, int i, struct buf *out)
{
	const char *wk = NULL;
	long mails = 0;
	int n = 0;
	for (size_t k = 0; k <= r->ndays; k++) {
		const struct bt_day *d = k < r->ndays ? &r->per_day[k] : NULL;
		if (d && d->flow != i)
			continue;
		if (wk && (!d || strcmp(d->week, wk))) {
			buf_addf(out, "%s%s %ld", n++ % 6 ? ", " : "\n    ", wk, mails);
			mails = 0;
		}
		if (!d)
			break;
		wk = d->week;
		mails += d->mails;
	}
	buf_adds(out, "\n");
}

int backtest_text(const struct backtest *r, struct buf *out)
{
	char from[11], to[11];
	bt_date(r->from, from);
	bt_date(r->to, to);
	buf_addf(out, "backtest %s to %s: %ld ticks, one a day, nothing sent "
		 "(%.1f s)\n%ld orders and %ld refunds re-applied on their day; "
		 "lapsed after %ld days (%s)\n", from, to, r->days, r->seconds,
		 r->orders, r->refunds, r->lapse_days, r->lapse_why);
	for (int i = 0; i < r->nflows; i++) {
		const struct bt_flow *f = &r->flows[i];
		const char *noun = bt_noun(f->trigger);
		if (!f->enrolled) {
			buf_addf(out, "%s: no %s enrolled\n", f->name, noun);
			continue;
		}
		buf_addf(out, "%s: %ld %s enrolled from %s to %s, %ld of them held "
			 "out (no mail)\n", f->name, f->enrolled, noun, f->first,
			 f->last, f->held_out);
		buf_addf(out, "  %ld mails would have gone", f->mails);
		if (f->peak_mails)
			buf_addf(out, "; peak day %s: %ld", f->peak_day, f->peak_mails);
		buf_addf(out, "\n  ordered within %ld days with no mail (the "
			 "baseline): %ld of the %ld whose %ld days ended in the "
			 "history", f->window_days, f->back_complete, f->complete,
			 f->window_days);
		if (f->complete)
			buf_addf(out, " (%.1f %%)", 100.0 * f->back_complete / f->complete);
		buf_addf(out, "; %ld of all %ld\n  mails a week (from Monday):",
			 f->back, f->enrolled);
		bt_weeks(r, i, out);
	}
	return buf_failed(out) ? -1 : 0;
}

/* ==== The report ====================================================== */
/*
 * report_build fills one struct report from indexed queries (never from
 * the events table, which grows fastest); report_json, report_html and
 * report_text (`remarket report`) render that same struct from one
 * description of its numbers (rep_nums, rep_flow_nums, rep_step_nums:
 * key, field, kind, label, where shown), so they cannot disagree.
 * One definition of "recovered", used by the page, the JSON, the text and
 * the README: a cart is recovered when it was enrolled in a cart flow, not
 * held out, and ordered within conversion_days of enrolling (whether or
 * not a mail was clicked: the held-out carts are counted the same way, so
 * the two compare); recovered revenue is what those carts' orders brought.
 * Attributed revenue is another number, named so: orders attributed (a
 * click or a code) to a message of any flow. Incremental revenue is the
 * part remarket caused: the lift over the held out x the carts messaged x
 * the period's average order, with the lift's 95 % interval carried
 * through (stat_incremental); stat_more_needed says when the verdict will
 * be known at the current effect and enrollment rate.
 * Every rate beside a flow (recovered, reactivated within 30 days, a
 * flow's conversion) is shown with the same rate of its held-out group
 * and their difference with a 95 % interval (stat_lift); only that
 * difference is called "caused by remarket": people come back without
 * mail too. A flow without a cart (win-back, post-purchase) converts
 * when its contact orders again, not by a cart.
 */

void stat_lift(long x1, long n1, long x2, long n2, struct lift *out)
{
	memset(out, 0, sizeof *out);
	out->p1 = n1 > 0 ? (double)x1 / (double)n1 : 0;
	out->p2 = n2 > 0 ? (double)x2 / (double)n2 : 0;
	out->diff = out->p1 - out->p2;
	double var = (n1 > 0 ? out->p1 * (1 - out->p1) / (double)n1 : 0) +
		     (n2 > 0 ? out->p2 * (1 - out->p2) / (double)n2 : 0);
	double half = 1.959964 * sqrt(var);
	out->lo = out->diff - half;
	out->hi = out->diff + half;
	out->too_small = n1 < 30 || n2 < 30 || x1 + x2 < 5;
}

void stat_incremental(const struct lift *l, long messaged, double aov,
		      struct incremental *out)
{
	double k = (double)messaged * aov;
	out->value = l->diff * k;
	out->lo = l->lo * k;
	out->hi = l->hi * k;
}

/* With the current rates p1, p2 and the held-out share h kept, the
 * interval's half width at N enrollments is 1.96 sqrt(v / N), v =
 * p1(1-p1)/(1-h) + p2(1-p2)/h: it excludes zero once N > 1.96^2 v / diff^2.
 * stat_lift's floor (30 a group, 5 conversions) is a second bound. */
long stat_more_needed(const struct lift *l, long n1, long n2)
{
	if (n1 <= 0 || n2 <= 0 || l->diff == 0)
		return -1;
	if (!l->too_small && (l->lo > 0 || l->hi < 0))
		return 0;
	double n = (double)n1 + (double)n2, h = (double)n2 / n;
	double v = l->p1 * (1 - l->p1) / (1 - h) + l->p2 * (1 - l->p2) / h;
	double need = 1.959964 * 1.959964 * v / (l->diff * l->diff);
	double conv = (1 - h) * l->p1 + h * l->p2; /* > 0: diff != 0 */
	need = fmax(need, fmax(30 / h, 30 / (1 - h)));
	need = fmax(need, 5 / conv);
	if (!(need < 1e12))
		return -1;
	double more = ceil(need) - n;
	return more >= 1 ? (long)more : 1;
}

double stat_days_needed(long more, double per_day)
{
	if (more < 0 || (more > 0 && !(per_day > 0)))
		return -1;
	return more ? (double)more / per_day : 0;
}

static const char *lift_verdict(const struct lift *l)
{
	if (l->too_small)
		return "Too few people yet to tell (each group needs 30, and 5 "
		       "conversions in all).";
	if (l->lo > 0)
		return "The difference is real: the whole 95 % interval is above zero.";
	if (l->hi < 0)
		return "It does worse: the whole 95 % interval is below zero.";
	return "No clear difference yet: the 95 % interval includes zero.";
}

/* "+1 h", "+3 d", "+30 min", "at once": a step's delay as its name says it. */
static void delay_words(char *out, size_t n, int64_t d)
{
	int w;
	if (d <= 0)
		w = snprintf(out, n, "at once");
	else if (d % 86400 == 0 && d >= 7 * 86400)
		w = snprintf(out, n, "+%lld d", (long long)(d / 86400));
	else if (d % 3600 == 0)
		w = snprintf(out, n, "+%lld h", (long long)(d / 3600));
	else
		w = snprintf(out, n, "+%lld min", (long long)((d + 59) / 60));
	if (w < 0 || (size_t)w >= n)
		out[0] = '\0';
}

/* A step's name for people: "Cart reminder · +1 h", from its template
 * (underscores as spaces, the first letter capital) and its delay; a step
 * the flow no longer has is "Step N". */
static void step_name(struct app *app, int64_t flow, int pos, char variant,
		      char *out, size_t n)
{
	char v[2] = {variant, '\0'}, delay[32];
	sqlite3_stmt *s = q(app->db, ST_REP_STEP_NAME, "iit", flow, (int64_t)pos, v);
	int w;
	if (sqlite3_step(s) == SQLITE_ROW) {
		delay_words(delay, sizeof delay, sqlite3_column_int64(s, 1));
		w = snprintf(out, n, "%s \xc2\xb7 %s", col_text(s, 0), delay);
		for (char *p = out; *p && p < out + n; p++)
			if (*p == '_')
				*p = ' ';
		if (w > 0)
			out[0] = (char)toupper((unsigned char)out[0]);
	} else {
		w = snprintf(out, n, "Step %d", pos);
	}
	sqlite3_reset(s);
	if (w < 0 || (size_t)w >= n)
		snprintf(out, n, "Step %d", pos);
}

static void rep_steps(struct app *app, int64_t flow, const struct report *r,
		      struct flow_report *f)
{
	int64_t conv = app->cfg->conversion_days * 86400;
	sqlite3_stmt *s = q(app->db, ST_REP_STEPS, "iiii", flow, (int64_t)r->since,
			    (int64_t)r->until, conv);
	while (sqlite3_step(s) == SQLITE_ROW && f->nsteps < REPORT_STEPS) {
		struct step_report *st = &f->steps[f->nsteps++];
		st->position = sqlite3_column_int(s, 0);
		st->variant = col_text(s, 1)[0];
		st->sent = sqlite3_column_int64(s, 2);
		st->opened = sqlite3_column_int64(s, 3);
		st->clicked = sqlite3_column_int64(s, 4);
		st->orders = sqlite3_column_int64(s, 5);
		st->revenue = sqlite3_column_double(s, 6);
		st->converted = sqlite3_column_int64(s, 7);
		st->bounced = sqlite3_column_int64(s, 8);
		st->complained = sqlite3_column_int64(s, 9);
		st->bounce_rate = st->sent ? (double)st->bounced / (double)st->sent : 0;
		st->complaint_rate = st->sent ? (double)st->complained /
						(double)st->sent : 0;
		f->sent += st->sent;
		f->bounced += st->bounced;
		f->complained += st->complained;
	}
	sqlite3_reset(s);
	f->bounce_rate = f->sent ? (double)f->bounced / (double)f->sent : 0;
	f->complaint_rate = f->sent ? (double)f->complained / (double)f->sent : 0;
	for (int i = 0; i < f->nsteps; i++)
		step_name(app, flow, f->steps[i].position, f->steps[i].variant,
			  f->steps[i].name, sizeof f->steps[i].name);
	/* a B row is compared with the A row of the same step just before it */
	for (int i = 1; i < f->nsteps; i++) {
		struct step_report *a = &f->steps[i - 1], *b = &f->steps[i];
		if (b->variant == 'B' && a->position == b->position)
			stat_lift(b->converted, b->sent, a->converted, a->sent, &b->ab);
	}
}

/* N enrollments of the report's period as a rate per day, counted from
 * the first of them (FLOW's, or every cart flow's when FLOW is 0), so a
 * flow started last week is not diluted over a month. */
static double rep_per_day(struct app *app, const struct report *r, int64_t flow,
			  long n)
{
	sqlite3_stmt *s = q(app->db, ST_REP_FIRST_ENROLLED, "nii", (int64_t)r->since,
			    (int64_t)r->until);
	if (flow)
		sqlite3_bind_int64(s, 1, flow);
	rm_time first = r->since;
	if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_type(s, 0) != SQLITE_NULL)
		first = (rm_time)sqlite3_column_int64(s, 0);
	sqlite3_reset(s);
	double days = (double)(r->until - (first > r->since ? first : r->since)) / 86400;
	return (double)n / (days > 1 ? days : 1);
}

static void rep_flows(struct app *app, struct report *r)
{
	int64_t conv = app->cfg->conversion_days * 86400;
	int64_t ids[REPORT_FLOWS];
	sqlite3_stmt *s = q(app->db, ST_REP_FLOWS, NULL);
	while (sqlite3_step(s) == SQLITE_ROW && r->nflows < REPORT_FLOWS) {
		struct flow_report *f = &r->flows[r->nflows];
		ids[r->nflows++] = sqlite3_column_int64(s, 0);
		copy_str(f->name, sizeof f->name, col_text(s, 1));
		f->holdout_pct = sqlite3_column_int(s, 2);
		f->enabled = sqlite3_column_int(s, 3);
	}
	sqlite3_reset(s);
	for (int i = 0; i < r->nflows; i++) {
		struct flow_report *f = &r->flows[i];
		s = q(app->db, ST_REP_FLOW_CONV, "iiii", ids[i], (int64_t)r->since,
		      (int64_t)r->until, conv);
		while (sqlite3_step(s) == SQLITE_ROW) {
			int held = sqlite3_column_int(s, 0);
			*(held ? &f->held_out : &f->enrolled) = sqlite3_column_int64(s, 1);
			*(held ? &f->held_converted : &f->converted) =
				sqlite3_column_int64(s, 2);
		}
		sqlite3_reset(s);
		stat_lift(f->converted, f->enrolled, f->held_converted, f->held_out,
			  &f->lift);
		stat_incremental(&f->lift, f->enrolled, r->aov, &f->incr);
		f->more_needed = stat_more_needed(&f->lift, f->enrolled, f->held_out);
		f->days_needed = stat_days_needed(f->more_needed,
						  rep_per_day(app, r, ids[i],
							      f->enrolled + f->held_out));
		rep_steps(app, ids[i], r, f);
	}
}

/* The messages sent in the period by channel. */
static void rep_channels(struct app *app, struct report *r)
{
	sqlite3_stmt *s = q(app->db, ST_REP_CHANNELS, "ii", (int64_t)r->since,
			    (int64_t)r->until);
	while (sqlite3_step(s) == SQLITE_ROW && r->nchannels < REPORT_CHANNELS) {
		struct channel_report *c = &r->channels[r->nchannels++];
		copy_str(c->name, sizeof c->name, col_text(s, 0));
		c->sent = sqlite3_column_int64(s, 1);
		c->clicked = sqlite3_column_int64(s, 2);
		c->unsubscribed = sqlite3_column_int64(s, 3);
		c->orders = sqlite3_column_int64(s, 4);
		c->revenue = sqlite3_column_double(s, 5);
	}
	sqlite3_reset(s);
}

/* The report's time series: orders, attributed orders and revenue per
 * month (oldest first), and recovered revenue per day for the chart. */
static void rep_series(struct app *app, struct report *r)
{
	sqlite3_stmt *s = q(app->db, ST_REP_MONTHS, "ii", (int64_t)r->since,
			    (int64_t)r->until);
	while (sqlite3_step(s) == SQLITE_ROW && r->nmonths < REPORT_MONTHS) {
		copy_str(r->months[r->nmonths].month, 8, col_text(s, 0));
		r->months[r->nmonths].orders = sqlite3_column_int64(s, 1);
		r->months[r->nmonths].attributed = sqlite3_column_int64(s, 2);
		r->months[r->nmonths++].revenue = sqlite3_column_double(s, 3);
	}
	sqlite3_reset(s);
	for (int i = 0; i < r->nmonths / 2; i++) { /* oldest first */
		__typeof__(r->months[0]) t = r->months[i];
		r->months[i] = r->months[r->nmonths - 1 - i];
		r->months[r->nmonths - 1 - i] = t;
	}
	rm_time start = r->until - (rm_time)REPORT_DAYS * 86400;
	if (start < r->since)
		start = r->since;
	r->first_day = start - start % 86400;
	r->ndays = (int)((r->until - r->first_day + 86399) / 86400);
	if (r->ndays > REPORT_DAYS)
		r->ndays = REPORT_DAYS;
	s = q(app->db, ST_REP_DAILY, "ii", (int64_t)r->first_day, (int64_t)r->until);
	while (sqlite3_step(s) == SQLITE_ROW) {
		int64_t d = sqlite3_column_int64(s, 0);
		if (d >= 0 && d < r->ndays)
			r->daily[d] = sqlite3_column_double(s, 1);
	}
	sqlite3_reset(s);
}

static void rep_lifecycle(struct app *app, struct report *r)
{
	r->lapse_days = flow_lapse_days(app, r->lapse_why, sizeof r->lapse_why);
	q_row(q(app->db, ST_WINBACK_REPORT, "ii", (int64_t)r->since, (int64_t)r->until),
	      "lll", &r->lapsed, &r->contacted, &r->reactivated);
	r->reactivation_rate = r->contacted ? (double)r->reactivated /
						      (double)r->contacted : 0;
	q_row(q(app->db, ST_WINBACK_HELD, "ii", (int64_t)r->since, (int64_t)r->until),
	      "ll", &r->held_contacted, &r->held_reactivated);
	stat_lift(r->reactivated, r->contacted, r->held_reactivated,
		  r->held_contacted, &r->reactivation_lift);
	segment_counts(app, r->segments);
}

/* Fills R with every number of the report from SINCE to UNTIL, from
 * indexed queries. */
int report_build(struct app *app, rm_time since, rm_time until, struct report *r)
{
	struct db *db = app->db;
	memset(r, 0, sizeof *r);
	r->since = since;
	r->until = until;
	r->conversion_days = app->cfg->conversion_days;
	copy_str(r->currency, sizeof r->currency, "EUR");
	sqlite3_stmt *s = q(db, ST_REP_CURRENCY, NULL);
	if (sqlite3_step(s) == SQLITE_ROW)
		copy_str(r->currency, sizeof r->currency, col_text(s, 0));
	sqlite3_reset(s);
	int64_t a = since, b = until, conv = app->cfg->conversion_days * 86400;
	q_row(q(db, ST_REP_ORDERS, "ii", a, b), "ldlldd", &r->orders, &r->revenue,
	      &r->attributed, &r->influenced, &r->influenced_revenue,
	      &r->attributed_revenue);
	r->aov = r->orders ? r->revenue / (double)r->orders : 0;
	q_row(q(db, ST_REP_ORDERS_NO_CART, "ii", a, b), "l", &r->orders_no_cart);
	q_row(q(db, ST_REP_RECOVERED, "iii", a, b, conv), "ll", &r->abandoned,
	      &r->recovered);
	q_row(q(db, ST_REP_RECOVERED_HELD, "iii", a, b, conv), "ll",
	      &r->held_abandoned, &r->held_recovered);
	q_row(q(db, ST_REP_RECOVERED_REVENUE, "iii", a, b, conv), "d",
	      &r->recovered_revenue);
	q_row(q(db, ST_REP_MESSAGES, "ii", a, b), "lllll", &r->sent, &r->bounced,
	      &r->opened, &r->clicked, &r->unsubscribed);
	q_row(q(db, ST_REP_STALE, "ii", a, b), "lll", &r->stale, &r->deferred,
	      &r->deferred_skipped);
	q_row(q(db, ST_REP_DISCOUNTS, "ii", a, b), "lld", &r->codes_issued,
	      &r->codes_redeemed, &r->discount_cost);
	q_row(q(db, ST_REP_CODE_FLAGS, "ii", a, b), "ll", &r->codes_reused,
	      &r->codes_expired);
	r->recovery_rate = r->abandoned ? (double)r->recovered / (double)r->abandoned : 0;
	stat_lift(r->recovered, r->abandoned, r->held_recovered, r->held_abandoned,
		  &r->recovery_lift);
	stat_incremental(&r->recovery_lift, r->abandoned, r->aov, &r->incr);
	r->more_needed = stat_more_needed(&r->recovery_lift, r->abandoned,
					  r->held_abandoned);
	r->days_needed = stat_days_needed(r->more_needed, rep_per_day(app, r, 0,
					  r->abandoned + r->held_abandoned));
	r->unsubscribe_rate = r->sent ? (double)r->unsubscribed / (double)r->sent : 0;
	q_row(q(db, ST_REP_BROWSER_HELD, "ii", a, b), "l", &r->browser_held);
	rep_flows(app, r);
	rep_channels(app, r);
	rep_series(app, r);
	rep_lifecycle(app, r);
	return 0;
}

/* ---- the numbers, described once ---- */

/* How a number is stored and shown. A count is a long; the others are
 * doubles. JSON: counts as integers, money with 2 decimals, rates as
 * fractions with 4; the page and the text show money with the currency
 * and rates in percent. */
enum rep_kind {
	RK_COUNT,
	RK_MONEY,
	RK_PERCENT,   /* a rate shown as "12.3 %" */
	RK_PERCENT2,  /* a small rate shown as "0.12 %" (per email) */
	RK_POINTS,    /* a difference of rates: a fraction in JSON, shown as
		       * "+1.2 points" */
	RK_CI,        /* two doubles (lo, hi): [lo,hi] in JSON, shown as
		       * "-1.0 to +3.4 points" */
	RK_MONEY_CI,  /* two amounts (lo, hi): [lo,hi] in JSON, shown as
		       * "-12.00 to 340.00 EUR" */
	RK_DAYS,      /* a double, 1 decimal in JSON, shown as "12 days" */
};

/* Which way is good, for a card's colour: more is better (green when
 * above zero), less is better (never green: amber when above zero), a
 * lift (green when its whole interval, the two doubles after it in a
 * struct lift or struct incremental, is above zero, red when below), or
 * neither (a number rep_dirs does not name). */
enum rep_dir { RD_NONE, RD_UP, RD_DOWN, RD_LIFT };

/* Where a number appears besides report.json. */
enum { RW_JSON_TAIL = 1, /* in the JSON after the segments, not up front */
       RW_TEXT = 2 };    /* a part of `remarket report`'s text */

/* One headline number. key is its JSON path (a dot opens an object) and
 * the page's data-k; card is its place among the page's cards (0: no
 * card), label the card's caption, and a card with `of` (a second
 * count) shows "n / of".
 * In the text, line starts a new line (NULL: continues the one before)
 * and words follow the number. The table is in the order of the text;
 * the JSON keeps that order within its two runs. */
struct rep_num {
	const char *key;
	size_t off;
	enum rep_kind kind;
	int where, card;
	const char *label;
	size_t of;
	const char *line, *words;
};

#define RN(f) offsetof(struct report, f)
static const struct rep_num rep_nums[] = {
	{"abandoned_carts", RN(abandoned), RK_COUNT, RW_TEXT, 0, NULL, 0,
	 "abandoned carts    ", " (held out not counted)"},
	{"recovered_carts", RN(recovered), RK_COUNT, RW_TEXT, 7,
	 "carts recovered / abandoned", RN(abandoned), "recovered carts    ", " ("},
	{"recovery_rate", RN(recovery_rate), RK_PERCENT, RW_TEXT, 4,
	 "of abandoned carts recovered", 0, NULL, ")"},
	{"holdout_recovered_carts", RN(held_recovered), RK_COUNT, RW_TEXT, 0,
	 NULL, 0, "held-out carts     ", " ordered anyway of "},
	{"holdout_abandoned_carts", RN(held_abandoned), RK_COUNT, RW_TEXT, 0,
	 NULL, 0, NULL, " ("},
	{"holdout_recovery_rate", RN(recovery_lift.p2), RK_PERCENT, RW_TEXT, 5,
	 "of held-out carts ordered anyway", 0, NULL,
	 "): caused by remarket "},
	{"recovery_lift", RN(recovery_lift.diff), RK_POINTS, RW_TEXT, 6,
	 "recovered carts caused by remarket (messaged &minus; held out)", 0,
	 NULL, " (95 % interval "},
	{"recovery_lift_ci95", RN(recovery_lift.lo), RK_CI, RW_TEXT, 0, NULL, 0,
	 NULL, ")"},
	{"recovered_revenue", RN(recovered_revenue), RK_MONEY, RW_TEXT, 1,
	 "recovered revenue", 0, "recovered revenue  ", ""},
	{"incremental_revenue", RN(incr.value), RK_MONEY, RW_TEXT, 2,
	 "incremental revenue: caused by remarket", 0, "incremental revenue ",
	 " (95 % interval "},
	{"incremental_revenue_ci95", RN(incr.lo), RK_MONEY_CI, RW_TEXT, 0, NULL,
	 0, NULL, "; recovery lift x abandoned carts messaged x average order "},
	{"average_order", RN(aov), RK_MONEY, RW_TEXT, 0, NULL, 0, NULL, ")"},
	{"attributed_revenue", RN(attributed_revenue), RK_MONEY, RW_TEXT, 3,
	 "attributed revenue (a click or a code, every flow)", 0,
	 "attributed revenue ", ""},
	{"verdict_more_enrollments", RN(more_needed), RK_COUNT, RW_JSON_TAIL, 0,
	 NULL, 0, NULL, NULL},
	{"verdict_days", RN(days_needed), RK_DAYS, RW_JSON_TAIL, 0, NULL, 0, NULL,
	 NULL},
	{"orders", RN(orders), RK_COUNT, RW_TEXT, 0, NULL, 0,
	 "orders             ", " ("},
	{"revenue", RN(revenue), RK_MONEY, 0, 0, NULL, 0, NULL, NULL},
	{"attributed_orders", RN(attributed), RK_COUNT, RW_TEXT, 0, NULL, 0, NULL,
	 " attributed, "},
	{"influenced_orders", RN(influenced), RK_COUNT, RW_TEXT, 0, NULL, 0, NULL,
	 " influenced)"},
	{"influenced_revenue", RN(influenced_revenue), RK_MONEY, 0, 0, NULL, 0,
	 NULL, NULL},
	{"orders_without_cart", RN(orders_no_cart), RK_COUNT, RW_TEXT, 0, NULL, 0,
	 "orders, no cart    ", " (placed without a cart: attributed by contact)"},
	{"sent", RN(sent), RK_COUNT, RW_TEXT, 8, "emails sent", 0,
	 "emails             ", " sent, "},
	{"opened", RN(opened), RK_COUNT, RW_TEXT, 0, NULL, 0, NULL, " opened, "},
	{"clicked", RN(clicked), RK_COUNT, RW_TEXT, 0, NULL, 0, NULL, " clicked, "},
	{"unsubscribed", RN(unsubscribed), RK_COUNT, RW_TEXT, 0, NULL, 0, NULL,
	 " unsubscribed, "},
	{"unsubscribe_rate", RN(unsubscribe_rate), RK_PERCENT2, 0, 9,
	 "unsubscribed per email", 0, NULL, NULL},
	{"bounced", RN(bounced), RK_COUNT, RW_TEXT, 0, NULL, 0, NULL, " bounced"},
	{"stale_steps", RN(stale), RK_COUNT, RW_JSON_TAIL | RW_TEXT, 0, NULL, 0,
	 "stale steps        ", " (too late to send: recorded, not sent)"},
	{"deferred", RN(deferred), RK_COUNT, RW_JSON_TAIL | RW_TEXT, 0, NULL, 0,
	 "deferred           ", " held back (smart sending, a cart first, quiet "
	 "hours), "},
	{"deferred_skipped", RN(deferred_skipped), RK_COUNT,
	 RW_JSON_TAIL | RW_TEXT, 0, NULL, 0, NULL, " of them skipped as stale"},
	{"codes_issued", RN(codes_issued), RK_COUNT, RW_TEXT, 0, NULL, 0,
	 "discount codes     ", " issued, "},
	{"codes_redeemed", RN(codes_redeemed), RK_COUNT, RW_TEXT, 0, NULL, 0, NULL,
	 " redeemed, cost "},
	{"discount_cost", RN(discount_cost), RK_MONEY, RW_TEXT, 10,
	 "cost of discounts redeemed", 0, NULL, ""},
	{"codes_flagged.reused", RN(codes_reused), RK_COUNT,
	 RW_JSON_TAIL | RW_TEXT, 11, "orders with a code used before / expired",
	 RN(codes_expired), "flagged codes      ",
	 " orders with a code used before, "},
	{"codes_flagged.expired", RN(codes_expired), RK_COUNT,
	 RW_JSON_TAIL | RW_TEXT, 0, NULL, 0, NULL,
	 " with an expired code (not attributed to it)"},
};
#undef RN

/* The cards' directions, by key (a new card without one stays plain). */
static const struct {
	const char *key;
	enum rep_dir dir;
} rep_dirs[] = {
	{"recovered_revenue", RD_UP}, {"incremental_revenue", RD_LIFT},
	{"attributed_revenue", RD_UP}, {"recovery_rate", RD_UP},
	{"recovery_lift", RD_LIFT}, {"recovered_carts", RD_UP},
	{"unsubscribe_rate", RD_DOWN}, {"discount_cost", RD_DOWN},
	{"codes_flagged.reused", RD_DOWN},
};

/* One number of a flow or of a step's row: in the JSON always; on the
 * page's step table and in the text's step line where shown is set (the
 * text prints key before the number). A flow's numbers are shown in
 * sentences, not rows: the page and the text write those by hand. */
struct rep_row_num {
	const char *key;
	size_t off;
	enum rep_kind kind;
	int shown;
};

#define RF(f) offsetof(struct flow_report, f)
static const struct rep_row_num rep_flow_nums[] = {
	{"enrolled", RF(enrolled), RK_COUNT, 0},
	{"holdout", RF(held_out), RK_COUNT, 0},
	{"converted", RF(converted), RK_COUNT, 0},
	{"holdout_converted", RF(held_converted), RK_COUNT, 0},
	{"conversion", RF(lift.p1), RK_PERCENT, 0},
	{"holdout_conversion", RF(lift.p2), RK_PERCENT, 0},
	{"sent", RF(sent), RK_COUNT, 0},
	{"bounced", RF(bounced), RK_COUNT, 0},
	{"complained", RF(complained), RK_COUNT, 0},
	{"bounce_rate", RF(bounce_rate), RK_PERCENT2, 0},
	{"complaint_rate", RF(complaint_rate), RK_PERCENT2, 0},
};
/* ... and, after the lift, what it is worth and when its verdict is known */
static const struct rep_row_num rep_flow_worth[] = {
	{"incremental_revenue", RF(incr.value), RK_MONEY, 0},
	{"incremental_revenue_ci95", RF(incr.lo), RK_MONEY_CI, 0},
	{"verdict_more_enrollments", RF(more_needed), RK_COUNT, 0},
	{"verdict_days", RF(days_needed), RK_DAYS, 0},
};
#undef RF

#define RS(f) offsetof(struct step_report, f)
static const struct rep_row_num rep_step_nums[] = {
	{"sent", RS(sent), RK_COUNT, 1},
	{"opened", RS(opened), RK_COUNT, 1},
	{"clicked", RS(clicked), RK_COUNT, 1},
	{"orders", RS(orders), RK_COUNT, 1},
	{"revenue", RS(revenue), RK_MONEY, 1},
	{"converted", RS(converted), RK_COUNT, 0},
	{"bounced", RS(bounced), RK_COUNT, 0},
	{"complained", RS(complained), RK_COUNT, 0},
	{"bounce_rate", RS(bounce_rate), RK_PERCENT2, 1},
	{"complaint_rate", RS(complaint_rate), RK_PERCENT2, 1},
};

#define RC(f) offsetof(struct channel_report, f)
static const struct rep_row_num rep_channel_nums[] = {
	{"sent", RC(sent), RK_COUNT, 1},
	{"clicked", RC(clicked), RK_COUNT, 1},
	{"unsubscribed", RC(unsubscribed), RK_COUNT, 1},
	{"orders", RC(orders), RK_COUNT, 1},
	{"revenue", RC(revenue), RK_MONEY, 1},
};
#define NCHANNEL_NUMS (sizeof rep_channel_nums / sizeof rep_channel_nums[0])
#undef RS

static long rep_long(const void *base, size_t off)
{
	long v;
	memcpy(&v, (const char *)base + off, sizeof v);
	return v;
}

static double rep_double(const void *base, size_t off)
{
	double v;
	memcpy(&v, (const char *)base + off, sizeof v);
	return v;
}

/* The number at off in base, as a double (for data-v), rounded as the
 * JSON writes it. */
static double rep_value(enum rep_kind kind, const void *base, size_t off)
{
	if (kind == RK_COUNT)
		return (double)rep_long(base, off);
	double v = rep_double(base, off);
	if (kind == RK_MONEY || kind == RK_MONEY_CI)
		return round(v * 100) / 100;
	return kind == RK_DAYS ? round(v * 10) / 10 : v;
}

/* The number as JSON writes it. */
static void rep_json_value(struct buf *b, enum rep_kind kind, const void *base,
			   size_t off)
{
	if (kind == RK_COUNT)
		buf_addf(b, "%ld", rep_long(base, off));
	else if (kind == RK_CI || kind == RK_MONEY_CI)
		buf_addf(b, kind == RK_CI ? "[%.4f,%.4f]" : "[%.2f,%.2f]",
			 rep_double(base, off), rep_double(base, off + sizeof(double)));
	else
		buf_addf(b, kind == RK_MONEY ? "%.2f" : kind == RK_DAYS ? "%.1f" : "%.4f",
			 rep_double(base, off));
}

/* The n numbers of a row as JSON members, each after a comma. */
static void json_row(struct buf *b, const struct rep_row_num *nums, size_t n,
		     const void *base)
{
	for (size_t i = 0; i < n; i++) {
		buf_addf(b, ",\"%s\":", nums[i].key);
		rep_json_value(b, nums[i].kind, base, nums[i].off);
	}
}

/* The number as a person reads it into out (empty if it does not fit);
 * money carries the currency cur unless cur is NULL. */
static void rep_shown(char *out, size_t n, enum rep_kind kind, const void *base,
		      size_t off, const char *cur)
{
	int w;
	if (kind == RK_COUNT)
		w = snprintf(out, n, "%ld", rep_long(base, off));
	else if (kind == RK_MONEY && cur)
		w = snprintf(out, n, "%.2f %s", rep_double(base, off), cur);
	else if (kind == RK_MONEY)
		w = snprintf(out, n, "%.2f", rep_double(base, off));
	else if (kind == RK_PERCENT)
		w = snprintf(out, n, "%.1f %%", 100 * rep_double(base, off));
	else if (kind == RK_POINTS)
		w = snprintf(out, n, "%+.1f points", 100 * rep_double(base, off));
	else if (kind == RK_CI)
		w = snprintf(out, n, "%+.1f to %+.1f points",
			     100 * rep_double(base, off),
			     100 * rep_double(base, off + sizeof(double)));
	else if (kind == RK_MONEY_CI)
		w = snprintf(out, n, "%.2f to %.2f%s%s", rep_double(base, off),
			     rep_double(base, off + sizeof(double)), cur ? " " : "",
			     cur ? cur : "");
	else if (kind == RK_DAYS)
		w = snprintf(out, n, "%.0f days", rep_double(base, off));
	else
		w = snprintf(out, n, "%.2f %%", 100 * rep_double(base, off));
	if (w < 0 || (size_t)w >= n)
		out[0] = '\0';
}

/* The headline numbers of one JSON run (tail or not), each after a comma;
 * a key "a.b" puts b into an object a shared with its neighbours. */
static void json_nums(struct buf *b, const struct report *r, int tail)
{
	const char *open = NULL; /* the object being filled, up to its dot */
	size_t openlen = 0;
	for (size_t i = 0; i < sizeof rep_nums / sizeof rep_nums[0]; i++) {
		const struct rep_num *n = &rep_nums[i];
		if (!(n->where & RW_JSON_TAIL) != !tail)
			continue;
		const char *dot = strchr(n->key, '.'), *name = n->key;
		if (open && (!dot || (size_t)(dot - n->key) != openlen ||
			     strncmp(n->key, open, openlen))) {
			buf_adds(b, "}");
			open = NULL;
		}
		if (dot && !open) {
			open = n->key;
			openlen = (size_t)(dot - n->key);
			buf_addf(b, ",\"%.*s\":{", (int)openlen, open);
		} else {
			buf_adds(b, ",");
		}
		if (dot)
			name = dot + 1;
		buf_addf(b, "\"%s\":", name);
		rep_json_value(b, n->kind, r, n->off);
	}
	if (open)
		buf_adds(b, "}");
}

static void json_str(struct buf *b, const char *s)
{
	buf_add(b, "\"", 1);
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			buf_addf(b, "\\%c", c);
		else if (c < 0x20)
			buf_addf(b, "\\u%04x", c);
		else
			buf_add(b, s, 1);
	}
	buf_add(b, "\"", 1);
}

static void json_lift(struct buf *b, const struct lift *l)
{
	buf_addf(b, "\"lift\":%.4f,\"lift_ci95\":[%.4f,%.4f],\"too_small\":%s,"
		 "\"verdict\":", l->diff, l->lo, l->hi, l->too_small ? "true" : "false");
	json_str(b, lift_verdict(l));
}

static void json_flow(struct buf *b, const struct flow_report *f)
{
	buf_adds(b, "{\"name\":");
	json_str(b, f->name);
	buf_addf(b, ",\"holdout_pct\":%d", f->holdout_pct);
	json_row(b, rep_flow_nums, sizeof rep_flow_nums / sizeof rep_flow_nums[0], f);
	buf_adds(b, ",");
	json_lift(b, &f->lift);
	json_row(b, rep_flow_worth, sizeof rep_flow_worth / sizeof rep_flow_worth[0], f);
	buf_addf(b, ",\"enabled\":%s", f->enabled ? "true" : "false");
	buf_adds(b, ",\"steps\":[");
	for (int i = 0; i < f->nsteps; i++) {
		const struct step_report *s = &f->steps[i];
		buf_addf(b, "%s{\"position\":%d,\"variant\":\"%c\"", i ? "," : "",
			 s->position, s->variant);
		json_row(b, rep_step_nums, sizeof rep_step_nums / sizeof rep_step_nums[0], s);
		buf_adds(b, ",\"name\":");
		json_str(b, s->name);
		if (s->variant == 'B') {
			buf_adds(b, ",\"versus_a\":{");
			json_lift(b, &s->ab);
			buf_adds(b, "}");
		}
		buf_adds(b, "}");
	}
	buf_adds(b, "]}");
}

/* The report as JSON, from the same number tables as the HTML and text. */
int report_json(const struct report *r, struct buf *out)
{
	buf_addf(out, "{\"since\":%lld,\"until\":%lld,\"currency\":", (long long)r->since,
		 (long long)r->until);
	json_str(out, r->currency);
	buf_addf(out, ",\"browser_held\":%ld,\"warnings\":[", r->browser_held);
	if (r->browser_held)
		buf_addf(out, "\"%ld new browser-only contacts recorded but not "
			 "mailed: over browser_new_contacts_per_hour\"",
			 r->browser_held);
	buf_adds(out, "]");
	json_nums(out, r, 0);
	buf_adds(out, ",\"flows\":[");
	for (int i = 0; i < r->nflows; i++) {
		if (i)
			buf_adds(out, ",");
		json_flow(out, &r->flows[i]);
	}
	buf_adds(out, "],\"channels\":[");
	for (int i = 0; i < r->nchannels; i++) {
		buf_adds(out, i ? ",{\"name\":" : "{\"name\":");
		json_str(out, r->channels[i].name);
		json_row(out, rep_channel_nums, NCHANNEL_NUMS, &r->channels[i]);
		buf_adds(out, "}");
	}
	buf_adds(out, "],\"orders_per_month\":[");
	for (int i = 0; i < r->nmonths; i++)
		buf_addf(out, "%s{\"month\":\"%s\",\"orders\":%ld,\"attributed\":%ld,"
			 "\"revenue\":%.2f}", i ? "," : "", r->months[i].month,
			 r->months[i].orders, r->months[i].attributed,
			 r->months[i].revenue);
	buf_addf(out, "],\"revenue_by_day\":{\"first_day\":%lld,\"values\":[",
		 (long long)r->first_day);
	for (int i = 0; i < r->ndays; i++)
		buf_addf(out, "%s%.2f", i ? "," : "", r->daily[i]);
	buf_addf(out, "]},\"winback\":{\"threshold_days\":%ld,\"threshold_source\":",
		 r->lapse_days);
	json_str(out, r->lapse_why);
	const struct lift *wl = &r->reactivation_lift;
	buf_addf(out, ",\"lapsed\":%ld,\"contacted\":%ld,\"reactivated_30d\":%ld,"
		 "\"rate\":%.4f,\"held_out\":%ld,\"held_out_reactivated_30d\":%ld,"
		 "\"held_out_rate\":%.4f,\"caused_by_remarket\":%.4f,"
		 "\"caused_ci95\":[%.4f,%.4f],\"too_small\":%s},\"segments\":{",
		 r->lapsed, r->contacted, r->reactivated, r->reactivation_rate,
		 r->held_contacted, r->held_reactivated, wl->p2, wl->diff, wl->lo,
		 wl->hi, wl->too_small ? "true" : "false");
	for (int i = 0; i < SEG__MAX; i++)
		buf_addf(out, "%s\"%s\":%ld", i ? "," : "", segment_names[i],
			 r->segments[i]);
	buf_adds(out, "}");
	json_nums(out, r, 1);
	buf_adds(out, "}");
	return buf_failed(out) ? -1 : 0;
}

/* ---- the HTML page: numbers carry data-k/data-v for checking ---- */

static void html_num(struct buf *b, const char *key, double v, const char *shown)
{
	buf_addf(b, "<span data-k=\"%s\" data-v=\"%.4f\">", key, v);
	html_escape(b, shown);
	buf_adds(b, "</span>");
}

static void html_count(struct buf *b, const char *key, long n)
{
	char v[24];
	snprintf(v, sizeof v, "%ld", n);
	html_num(b, key, (double)n, v);
}

/* An amount with its currency (none if cur is NULL). */
static void html_money(struct buf *b, const char *key, double v, const char *cur)
{
	char shown[64];
	int w = snprintf(shown, sizeof shown, "%.2f%s%s", v, cur ? " " : "",
			 cur ? cur : "");
	html_num(b, key, round(v * 100) / 100,
		 w > 0 && (size_t)w < sizeof shown ? shown : "");
}

/* When the verdict will be known (stat_more_needed, stat_days_needed),
 * as a sentence after the verdict; nothing once it is known. */
static void html_eta(struct buf *b, const char *kmore, const char *kdays,
		     long more, double days)
{
	char v[32];
	if (more == 0)
		return;
	if (more < 0) {
		buf_adds(b, " No estimate yet of when it will be known: that needs "
			 "a held-out group and a difference between the groups.");
		return;
	}
	buf_adds(b, " If the difference stays as it is, about ");
	html_count(b, kmore, more);
	buf_adds(b, " more enrollments will tell");
	if (days < 0) {
		buf_adds(b, " (none came in this period, so no date).");
		return;
	}
	snprintf(v, sizeof v, "%.0f days", days);
	buf_adds(b, ": about ");
	html_num(b, kdays, round(days * 10) / 10, v);
	buf_adds(b, " at this period's rate.");
}

static void html_card(struct buf *b, const char *label, const char *key,
		      double v, const char *shown, const char *tone)
{
	buf_addf(b, "<div class=card><div class=\"big %s\">", tone);
	html_num(b, key, v, shown);
	buf_addf(b, "</div><div class=label>%s</div></div>", label);
}

/* A card's colour class by its number's direction (enum rep_dir): good
 * (green), watch (amber), bad (red) or flat. Both lifts on the cards are
 * the carts' recovery lift, so "too few to tell" keeps them flat. */
static const char *card_tone(const struct rep_num *n, const struct report *r)
{
	enum rep_dir dir = RD_NONE;
	for (size_t i = 0; i < sizeof rep_dirs / sizeof rep_dirs[0]; i++)
		if (!strcmp(rep_dirs[i].key, n->key))
			dir = rep_dirs[i].dir;
	double v = rep_value(n->kind, r, n->off);
	if (dir == RD_UP)
		return v > 0 ? "good" : "flat";
	if (dir == RD_DOWN)
		return v > 0 ? "watch" : "flat";
	if (dir != RD_LIFT || r->recovery_lift.too_small)
		return "flat";
	double lo = rep_double(r, n->off + sizeof(double)),
	       hi = rep_double(r, n->off + 2 * sizeof(double));
	return lo > 0 ? "good" : hi < 0 ? "bad" : "flat";
}

/* The cards, in their places: each a rep_nums number with a label. */
static void html_cards(struct buf *b, const struct report *r)
{
	char v[64];
	const size_t nn = sizeof rep_nums / sizeof rep_nums[0];
	for (int place = 1;; place++) {
		size_t i = 0;
		while (i < nn && rep_nums[i].card != place)
			i++;
		if (i == nn)
			return;
		const struct rep_num *n = &rep_nums[i];
		if (n->of) {
			int w = snprintf(v, sizeof v, "%ld / %ld", rep_long(r, n->off),
					 rep_long(r, n->of));
			if (w < 0 || (size_t)w >= sizeof v)
				v[0] = '\0';
		} else {
			rep_shown(v, sizeof v, n->kind, r, n->off, r->currency);
		}
		html_card(b, n->label, n->key, rep_value(n->kind, r, n->off), v,
			  card_tone(n, r));
	}
}

static void html_chart(struct buf *b, const struct report *r)
{
	double max = 0;
	for (int i = 0; i < r->ndays; i++)
		if (r->daily[i] > max)
			max = r->daily[i];
	int w = 720, h = 160, n = r->ndays > 0 ? r->ndays : 1;
	double bw = (double)w / n;
	buf_addf(b, "<svg viewBox=\"0 0 %d %d\" role=img aria-label=\"Recovered "
		 "revenue by day\" class=chart><line x1=0 y1=%d x2=%d y2=%d "
		 "stroke=\"#ccc\"/>", w, h + 20, h, w, h);
	for (int i = 0; i < r->ndays; i++) {
		double bh = max > 0 ? r->daily[i] / max * h : 0;
		char day[16];
		time_t t = (time_t)(r->first_day + (rm_time)i * 86400);
		struct tm tm;
		gmtime_r(&t, &tm);
		strftime(day, sizeof day, "%Y-%m-%d", &tm);
		buf_addf(b, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" "
			 "fill=\"#2f6f4f\"><title>%s: %.2f</title></rect>", i * bw,
			 h - bh, bw > 2 ? bw - 1 : bw, bh, day, r->daily[i]);
	}
	/* the axis: the first, middle and last day under their bars */
	static const char *const anchor[] = {"start", "middle", "end"};
	int at[] = {0, (r->ndays - 1) / 2, r->ndays - 1};
	for (int j = 0; j < 3 && r->ndays > 0; j++) {
		if (j && at[j] == at[j - 1])
			continue;
		char day[16];
		time_t t = (time_t)(r->first_day + (rm_time)at[j] * 86400);
		struct tm tm;
		gmtime_r(&t, &tm);
		strftime(day, sizeof day, "%Y-%m-%d", &tm);
		double x = j == 0 ? 0 : j == 2 ? w : (at[j] + 0.5) * bw;
		buf_addf(b, "<line x1=\"%.1f\" y1=%d x2=\"%.1f\" y2=%d stroke=\"#999\"/>"
			 "<text x=\"%.1f\" y=%d font-size=11 text-anchor=%s "
			 "class=day>%s</text>", (at[j] + 0.5) * bw, h, (at[j] + 0.5) * bw,
			 h + 4, x, h + 16, anchor[j], day);
	}
	buf_addf(b, "<text x=%d y=11 font-size=11 text-anchor=end>max %.2f %s/day"
		 "</text></svg>", w, max, r->currency);
}

/* One flow's section of the HTML report: its steps, variants, holdout and
 * lift. */
static void html_flow(struct buf *b, const struct flow_report *f, int idx,
		      const char *cur)
{
	char k[64], v[64];
	buf_adds(b, "<section><h2>Flow: ");
	html_escape(b, f->name);
	buf_addf(b, "</h2><table><tr><th>Step</th><th>Sent</th><th>Opened</th>"
		 "<th>Clicked</th><th>Orders</th><th>Revenue</th><th>Bounced</th>"
		 "<th>Complaints</th><th>Funnel</th></tr>");
	for (int i = 0; i < f->nsteps; i++) {
		const struct step_report *s = &f->steps[i];
		double pc = s->sent ? 100.0 * (double)s->clicked / (double)s->sent : 0;
		double po = s->sent ? 100.0 * (double)s->opened / (double)s->sent : 0;
		buf_addf(b, "<tr><td title=\"step %d%s\">", s->position,
			 s->variant == 'B' ? ", variant B" : "");
		html_escape(b, s->name);
		buf_adds(b, s->variant == 'B' ? " (B)</td>" : "</td>");
		for (size_t j = 0; j < sizeof rep_step_nums / sizeof rep_step_nums[0]; j++) {
			const struct rep_row_num *n = &rep_step_nums[j];
			if (!n->shown)
				continue;
			snprintf(k, sizeof k, "flows.%d.steps.%d.%s", idx, i, n->key);
			rep_shown(v, sizeof v, n->kind, s, n->off, cur);
			buf_adds(b, "<td>");
			html_num(b, k, rep_value(n->kind, s, n->off), v);
			buf_adds(b, "</td>");
		}
		buf_addf(b, "<td><div class=bar><i style=\"width:%.0f%%\"></i>"
			 "<b style=\"width:%.0f%%\"></b></div></td></tr>", po, pc);
	}
	buf_adds(b, "</table>");
	for (int i = 0; i < f->nsteps; i++) {
		const struct step_report *s = &f->steps[i];
		if (s->variant != 'B')
			continue;
		buf_adds(b, "<p>");
		html_escape(b, s->name);
		buf_addf(b, ", variant B against A: %.1f %% against %.1f %% "
			 "converted, ", 100 * s->ab.p1, 100 * s->ab.p2);
		snprintf(k, sizeof k, "flows.%d.steps.%d.versus_a.lift", idx, i);
		snprintf(v, sizeof v, "%+.1f points", 100 * s->ab.diff);
		html_num(b, k, s->ab.diff, v);
		buf_addf(b, " (95 %% interval %+.1f to %+.1f). ", 100 * s->ab.lo,
			 100 * s->ab.hi);
		html_escape(b, lift_verdict(&s->ab));
		buf_adds(b, "</p>");
	}
	buf_adds(b, "<p class=legend>Bars: opened (light) and clicked "
		 "(dark) as a share of sent. Opens are inflated by mail privacy "
		 "proxies; trust clicks and orders more.</p>");
	const struct lift *l = &f->lift;
	buf_adds(b, "<div class=lift><h3>Holdout</h3><p>");
	snprintf(k, sizeof k, "flows.%d.conversion", idx);
	snprintf(v, sizeof v, "%.1f %%", 100 * l->p1);
	html_num(b, k, l->p1, v);
	buf_addf(b, " of %ld enrollees who got messages ordered, against ", f->enrolled);
	snprintf(k, sizeof k, "flows.%d.holdout_conversion", idx);
	snprintf(v, sizeof v, "%.1f %%", 100 * l->p2);
	html_num(b, k, l->p2, v);
	buf_addf(b, " of %ld held out (%d %%) who got none. Caused by remarket: ",
		 f->held_out, f->holdout_pct);
	snprintf(k, sizeof k, "flows.%d.lift", idx);
	snprintf(v, sizeof v, "%+.1f points", 100 * l->diff);
	html_num(b, k, l->diff, v);
	buf_addf(b, " (95 %% interval %+.1f to %+.1f): ", 100 * l->lo, 100 * l->hi);
	snprintf(k, sizeof k, "flows.%d.incremental_revenue", idx);
	html_money(b, k, f->incr.value, cur);
	buf_adds(b, " of incremental revenue (95 % interval ");
	snprintf(k, sizeof k, "flows.%d.incremental_revenue_ci95.0", idx);
	html_money(b, k, f->incr.lo, NULL);
	buf_adds(b, " to ");
	snprintf(k, sizeof k, "flows.%d.incremental_revenue_ci95.1", idx);
	html_money(b, k, f->incr.hi, cur);
	buf_adds(b, ").</p><p class=verdict>");
	html_escape(b, lift_verdict(l));
	snprintf(k, sizeof k, "flows.%d.verdict_more_enrollments", idx);
	snprintf(v, sizeof v, "flows.%d.verdict_days", idx);
	html_eta(b, k, v, f->more_needed, f->days_needed);
	buf_adds(b, "</p></div></section>");
}

/* Flows the page shows open: enabled, with enrollments or sends in the
 * period. The others are folded into one line. */
static int flow_active(const struct flow_report *f)
{
	return f->enabled && (f->enrolled + f->held_out > 0 || f->nsteps > 0);
}

/* The messages sent by each channel: a small table, when any was sent. */
static void html_channels(struct buf *b, const struct report *r)
{
	char v[64];
	if (!r->nchannels)
		return;
	buf_adds(b, "<section><h2>By channel</h2><table><tr><th>Channel</th>");
	for (size_t k = 0; k < NCHANNEL_NUMS; k++)
		buf_addf(b, "<th>%c%s</th>", toupper((unsigned char)rep_channel_nums[k].key[0]),
			 rep_channel_nums[k].key + 1);
	buf_adds(b, "</tr>");
	for (int i = 0; i < r->nchannels; i++) {
		buf_adds(b, "<tr><td>");
		html_escape(b, r->channels[i].name);
		buf_adds(b, "</td>");
		for (size_t k = 0; k < NCHANNEL_NUMS; k++) {
			rep_shown(v, sizeof v, rep_channel_nums[k].kind, &r->channels[i],
				  rep_channel_nums[k].off, r->currency);
			buf_addf(b, "<td>%s</td>", v);
		}
		buf_adds(b, "</tr>");
	}
	buf_adds(b, "</table><p class=note>Messages sent in the period by the "
		 "channel each went by (a step's first channel the contact "
		 "consented to); orders are those attributed to them.</p></section>");
}

static void html_flows(struct buf *b, const struct report *r)
{
	int folded = 0;
	for (int i = 0; i < r->nflows; i++) {
		if (flow_active(&r->flows[i]))
			html_flow(b, &r->flows[i], i, r->currency);
		else
			folded++;
	}
	if (!folded)
		return;
	buf_addf(b, "<details class=folded><summary>%d flow%s without activity "
		 "in this period or disabled: ", folded, folded == 1 ? "" : "s");
	for (int i = 0, n = 0; i < r->nflows; i++) {
		const struct flow_report *f = &r->flows[i];
		if (flow_active(f))
			continue;
		buf_adds(b, n++ ? ", " : "");
		html_escape(b, f->name);
		buf_adds(b, f->enabled ? "" : " (disabled)");
	}
	buf_adds(b, "</summary>");
	for (int i = 0; i < r->nflows; i++)
		if (!flow_active(&r->flows[i]))
			html_flow(b, &r->flows[i], i, r->currency);
	buf_adds(b, "</details>");
}

/* The win-back and segments sections of the HTML report. */
static void html_lifecycle(struct buf *b, const struct report *r)
{
	char k[48], v[48];
	buf_adds(b, "<section><h2>Win-back</h2><p>");
	html_count(b, "winback.lapsed", r->lapsed);
	buf_addf(b, " customers are lapsed or lost (no order for %ld days: ",
		 r->lapse_days);
	html_escape(b, r->lapse_why);
	buf_adds(b, "). ");
	html_count(b, "winback.contacted", r->contacted);
	buf_adds(b, " were contacted in this period; ");
	html_count(b, "winback.reactivated_30d", r->reactivated);
	buf_adds(b, " ordered again within 30 days (");
	snprintf(v, sizeof v, "%.1f %%", 100 * r->reactivation_rate);
	html_num(b, "winback.rate", r->reactivation_rate, v);
	buf_adds(b, "). Of ");
	const struct lift *l = &r->reactivation_lift;
	html_count(b, "winback.held_out", r->held_contacted);
	buf_adds(b, " held out (sent nothing), ");
	html_count(b, "winback.held_out_reactivated_30d", r->held_reactivated);
	buf_adds(b, " ordered again within 30 days anyway (");
	snprintf(v, sizeof v, "%.1f %%", 100 * l->p2);
	html_num(b, "winback.held_out_rate", l->p2, v);
	buf_adds(b, ").</p><p class=verdict>Caused by remarket: ");
	snprintf(v, sizeof v, "%+.1f points", 100 * l->diff);
	html_num(b, "winback.caused_by_remarket", l->diff, v);
	buf_addf(b, " (95 %% interval %+.1f to %+.1f). ", 100 * l->lo, 100 * l->hi);
	html_escape(b, lift_verdict(l));
	buf_adds(b, "</p></section><section><h2>Segments</h2><table><tr>");
	for (int i = 0; i < SEG__MAX; i++)
		buf_addf(b, "<th>%s</th>", segment_names[i]);
	buf_adds(b, "</tr><tr>");
	for (int i = 0; i < SEG__MAX; i++) {
		snprintf(k, sizeof k, "segments.%s", segment_names[i]);
		buf_adds(b, "<td>");
		html_count(b, k, r->segments[i]);
		buf_adds(b, "</td>");
	}
	buf_adds(b, "</tr></table><p class=legend>RFM: recency, frequency and "
		 "money in quintiles over all customers. VIP: the top fifth by "
		 "frequency, the top two by money; at risk: bought twice or more, "
		 "not lately."
		 "</p></section>");
}

/* "Is it real?": the one definition of recovered, the incremental revenue
 * with its interval and how it is computed, the verdict and when it will
 * be known. */
static void html_real(struct buf *b, const struct report *r)
{
	const struct lift *l = &r->recovery_lift;
	char v[64];
	buf_addf(b, "<section class=real><h2>How much did this make, and is it "
		 "real?</h2><p>A cart is <b>recovered</b> when it was ordered within "
		 "%ld days of entering a cart flow. Of ", r->conversion_days);
	html_count(b, "abandoned_carts", r->abandoned);
	buf_adds(b, " abandoned carts that were messaged, ");
	html_count(b, "recovered_carts", r->recovered);
	buf_adds(b, " were recovered, bringing ");
	html_money(b, "recovered_revenue", r->recovered_revenue, r->currency);
	buf_adds(b, ". Of ");
	html_count(b, "holdout_abandoned_carts", r->held_abandoned);
	buf_adds(b, " held out (sent nothing), ");
	html_count(b, "holdout_recovered_carts", r->held_recovered);
	buf_adds(b, " were ordered anyway.</p><p>Caused by remarket: ");
	snprintf(v, sizeof v, "%+.1f points", 100 * l->diff);
	html_num(b, "recovery_lift", l->diff, v);
	buf_addf(b, " (95 %% interval %+.1f to %+.1f) &times; %ld carts messaged "
		 "&times; an average order of ", 100 * l->lo, 100 * l->hi, r->abandoned);
	html_money(b, "average_order", r->aov, r->currency);
	buf_adds(b, " = <b>");
	html_money(b, "incremental_revenue", r->incr.value, r->currency);
	buf_adds(b, "</b> of incremental revenue (95 % interval ");
	html_money(b, "incremental_revenue_ci95.0", r->incr.lo, NULL);
	buf_adds(b, " to ");
	html_money(b, "incremental_revenue_ci95.1", r->incr.hi, r->currency);
	buf_adds(b, "). Attributed revenue, orders after a click or with a code "
		 "from any flow, is ");
	html_money(b, "attributed_revenue", r->attributed_revenue, r->currency);
	buf_adds(b, ": it counts orders that would have come anyway.</p>"
		 "<p class=verdict>");
	html_escape(b, lift_verdict(l));
	html_eta(b, "verdict_more_enrollments", "verdict_days", r->more_needed,
		 r->days_needed);
	buf_adds(b, "</p></section>");
}

/* The date range form: since and until as dates, the report link's token
 * kept (tok, already checked: letters, digits, - and _), so the page
 * reloads with the same access. */
static void html_range(struct buf *b, const struct report *r, const char *tok)
{
	char since[16], until[16];
	struct tm tm;
	time_t t = (time_t)r->since;
	gmtime_r(&t, &tm);
	strftime(since, sizeof since, "%Y-%m-%d", &tm);
	t = (time_t)(r->until > r->since ? r->until - 1 : r->until);
	gmtime_r(&t, &tm);
	strftime(until, sizeof until, "%Y-%m-%d", &tm);
	buf_addf(b, "<form class=range method=get action=report>"
		 "<label>From <input type=date name=since value=%s></label> "
		 "<label>to <input type=date name=until value=%s></label> ", since, until);
	if (tok && *tok) {
		buf_adds(b, "<input type=hidden name=t value=\"");
		html_escape(b, tok);
		buf_adds(b, "\">");
	}
	buf_adds(b, "<button>Show</button> <a href=\"report/carts");
	if (tok && *tok) {
		buf_adds(b, "?t=");
		html_escape(b, tok);
	}
	buf_adds(b, "\">Abandoned carts, one by one &rarr;</a></form>");
}

/* The page's style, shared by the report, the activity list and the
 * contact page. */
static const char report_css[] =
	"body{font:15px/1.45 system-ui,sans-serif;margin:0;background:#f6f4ef;color:#222}"
	"main{max-width:820px;margin:auto;padding:20px}h1{font-size:22px}"
	".cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;"
	"border-radius:8px;padding:12px 16px;flex:1 1 150px}.big{font-size:24px;"
	"font-weight:600;color:#333}.big.good{color:#2f6f4f}.big.watch{color:#a15c00}"
	".big.bad{color:#b3261e}.label{color:#666;font-size:13px}"
	"section{background:#fff;border-radius:8px;padding:12px 16px;margin:14px 0}"
	"table{border-collapse:collapse;width:100%}td,th{padding:4px 6px;"
	"text-align:right;border-bottom:1px solid #eee}td:first-child,"
	"th:first-child{text-align:left}.bar{position:relative;height:10px;"
	"background:#eee;min-width:80px}.bar i,.bar b{position:absolute;left:0;"
	"top:0;bottom:0}.bar i{background:#b9d3c4}.bar b{background:#2f6f4f}"
	".chart{width:100%;height:auto}.legend,.note{color:#666;font-size:13px}"
	".verdict{font-weight:600}.range{margin:8px 0}.range a{margin-left:12px}"
	"details.folded{margin:14px 0;color:#555}details.folded summary{cursor:pointer}"
	"td.l,th.l{text-align:left}.held{color:#666;font-style:italic}";

/* The report page with the report link's token (or NULL) carried by its
 * form and links. */
static int report_page(const struct report *r, const char *store,
		       const char *tok, struct buf *b)
{
	char since[32], until[32];
	struct tm tm;
	time_t t = (time_t)r->since;
	gmtime_r(&t, &tm);
	strftime(since, sizeof since, "%Y-%m-%d", &tm);
	t = (time_t)r->until;
	gmtime_r(&t, &tm);
	strftime(until, sizeof until, "%Y-%m-%d %H:%M UTC", &tm);
	buf_addf(b, "<!doctype html><html lang=en><head><meta charset=utf-8>"
		 "<meta name=viewport content=\"width=device-width,initial-scale=1\">"
		 "<title>remarket report</title><style>%s</style></head><body><main>"
		 "<h1>", report_css);
	html_escape(b, store);
	buf_addf(b, ": what remarket earned</h1><p class=note>From %s to %s.</p>",
		 since, until);
	html_range(b, r, tok);
	buf_adds(b, "<div class=cards>");
	if (r->browser_held) /* a warning above the cards, before any number */
		buf_addf(b, "</div><p class=warning role=alert><b>Warning:</b> %ld "
			 "new browser-only contacts were recorded but not mailed: "
			 "more arrived in an hour than browser_new_contacts_per_hour "
			 "allows (a bot typing addresses, or raise the limit).</p>"
			 "<div class=cards>", r->browser_held);
	html_cards(b, r);
	buf_adds(b, "</div>");
	html_real(b, r);
	buf_adds(b, "<section><h2>Attributed revenue by day</h2>");
	html_chart(b, r);
	buf_addf(b, "<p class=note>%ld orders in all; %ld attributed to a click or a "
		 "code, %ld more influenced (sent within the view window, no click)."
		 "</p></section>", r->orders, r->attributed, r->influenced);
	if (r->stale)
		buf_addf(b, "<p class=note>%ld steps were too late to send (more than "
			 "max_lateness_hours after they were due) and were skipped as "
			 "stale.</p>", r->stale);
	html_flows(b, r);
	html_channels(b, r);
	html_lifecycle(b, r);
	buf_adds(b, "<section><h2>Orders per month</h2><table><tr><th>Month</th>"
		 "<th>Orders</th><th>Attributed</th><th>Revenue</th></tr>");
	for (int i = 0; i < r->nmonths; i++)
		buf_addf(b, "<tr><td>%s</td><td>%ld</td><td>%ld</td><td>%.2f</td></tr>",
			 r->months[i].month, r->months[i].orders, r->months[i].attributed,
			 r->months[i].revenue);
	buf_adds(b, "</table></section><p class=note>Same numbers as JSON: "
		 "report.json.</p></main></body></html>\n");
	return buf_failed(b) ? -1 : 0;
}

/* The whole HTML report page: cards, chart, flows, win-back, months. */
int report_html(const struct report *r, const char *store, struct buf *b)
{
	return report_page(r, store, NULL, b);
}

/* The page's html_eta, as an indented line of text. */
static void text_eta(long more, double days)
{
	if (more < 0)
		printf("  No estimate yet of when it will be known: that needs a "
		       "held-out group and a difference between the groups.\n");
	else if (more > 0 && days < 0)
		printf("  If the difference stays as it is, about %ld more "
		       "enrollments will tell (none came in this period, so no "
		       "date).\n", more);
	else if (more > 0)
		printf("  If the difference stays as it is, about %ld more "
		       "enrollments will tell: about %.0f days at this period's "
		       "rate.\n", more, days);
}

/* `remarket report`: the same numbers as the page, as lines of text. */
static void report_text(const struct report *r)
{
	if (r->browser_held)
		printf("WARNING: %ld new browser-only contacts recorded but not "
		       "mailed (over browser_new_contacts_per_hour)\n",
		       r->browser_held);
	char v[64];
	int lines = 0;
	for (size_t i = 0; i < sizeof rep_nums / sizeof rep_nums[0]; i++) {
		const struct rep_num *n = &rep_nums[i];
		if (!(n->where & RW_TEXT))
			continue;
		if (n->line)
			printf("%s%s", lines++ ? "\n" : "", n->line);
		rep_shown(v, sizeof v, n->kind, r, n->off, r->currency);
		printf("%s%s", v, n->words);
	}
	printf("\nrecovery verdict   %s\n", lift_verdict(&r->recovery_lift));
	text_eta(r->more_needed, r->days_needed);
	const struct lift *wl = &r->reactivation_lift;
	printf("win-back           %ld lapsed (after %ld days: %s), %ld contacted, "
	       "%ld reactivated within 30 days (%.1f %%)\n", r->lapsed, r->lapse_days,
	       r->lapse_why, r->contacted, r->reactivated, 100 * r->reactivation_rate);
	printf("win-back held out  %ld, %ld ordered again within 30 days anyway "
	       "(%.1f %%): caused by remarket %+.1f points (95 %% interval %+.1f "
	       "to %+.1f)\n  %s\n", r->held_contacted, r->held_reactivated,
	       100 * wl->p2, 100 * wl->diff, 100 * wl->lo, 100 * wl->hi,
	       lift_verdict(wl));
	for (int i = 0; i < r->nchannels; i++) {
		printf("channel %-10s", r->channels[i].name);
		for (size_t k = 0; k < NCHANNEL_NUMS; k++) {
			rep_shown(v, sizeof v, rep_channel_nums[k].kind, &r->channels[i],
				  rep_channel_nums[k].off, r->currency);
			printf("  %s %s", rep_channel_nums[k].key, v);
		}
		printf("\n");
	}
	printf("segments          ");
	for (int i = 0; i < SEG__MAX; i++)
		printf(" %s %ld", segment_names[i], r->segments[i]);
	printf("\n");
	for (int i = 0; i < r->nflows; i++) {
		const struct flow_report *f = &r->flows[i];
		printf("flow %s: %ld enrolled, %ld held out; converted %.1f %% "
		       "messaged vs %.1f %% held out: caused by remarket %+.1f "
		       "points (95 %% interval %+.1f to %+.1f)\n  %s\n",
		       f->name, f->enrolled, f->held_out, 100 * f->lift.p1,
		       100 * f->lift.p2, 100 * f->lift.diff, 100 * f->lift.lo,
		       100 * f->lift.hi, lift_verdict(&f->lift));
		printf("  incremental revenue %.2f %s (95 %% interval %.2f to %.2f)\n",
		       f->incr.value, r->currency, f->incr.lo, f->incr.hi);
		text_eta(f->more_needed, f->days_needed);
		for (int j = 0; j < f->nsteps; j++) {
			const struct step_report *s = &f->steps[j];
			printf("  step %d%s %s", s->position, s->variant == 'B' ? "B" : " ",
			       *s->name ? s->name : "(unnamed)");
			for (size_t k = 0; k < sizeof rep_step_nums / sizeof rep_step_nums[0];
			     k++) {
				const struct rep_row_num *n = &rep_step_nums[k];
				if (!n->shown)
					continue;
				rep_shown(v, sizeof v, n->kind, s, n->off, NULL);
				printf("  %s %s", n->key, v);
			}
			printf("\n");
		}
	}
}

/* ---- the activity list and the contact page behind it ---- */
/*
 * Like a shop's "abandoned checkouts": every abandoned cart, newest first,
 * ACT_PAGE a page, with its person, value, what was sent (each step by
 * name, with opened and clicked), and what was ordered. A person links to
 * the contact page: what `remarket contact` prints, as a table. Both are
 * the operator's (the routes check), and carry the report link's token
 * TOK (letters, digits, - and _; or NULL) in their links.
 */
#define ACT_PAGE 50

static void html_date(struct buf *b, int64_t t, const char *fmt)
{
	char s[40];
	time_t tt = (time_t)t;
	struct tm tm;
	if (!gmtime_r(&tt, &tm) || !strftime(s, sizeof s, fmt, &tm))
		s[0] = '\0';
	html_escape(b, s);
}

/* The head of an operator's page, with the style of the report. */
static void html_head(struct buf *b, const char *title)
{
	buf_addf(b, "<!doctype html><html lang=en><head><meta charset=utf-8>"
		 "<meta name=viewport content=\"width=device-width,initial-scale=1\">"
		 "<title>%s</title><style>%s</style></head><body><main>", title,
		 report_css);
}

/* "?t=TOK" or "&t=TOK" after a link's path, when there is a token. */
static void html_tok(struct buf *b, const char *tok, int first)
{
	if (!tok || !*tok)
		return;
	buf_adds(b, first ? "?t=" : "&amp;t=");
	html_escape(b, tok);
}

/* What an enrollment's messages did: each step by name, how far it got. */
static void act_messages(struct app *app, int64_t enrollment, int64_t flow,
			 struct buf *b)
{
	char name[80];
	int n = 0;
	sqlite3_stmt *s = q(app->db, ST_ACT_MESSAGES, "i", enrollment);
	while (sqlite3_step(s) == SQLITE_ROW) {
		const char *st = col_text(s, 2);
		step_name(app, flow, sqlite3_column_int(s, 0), col_text(s, 1)[0], name,
			  sizeof name);
		buf_adds(b, n++ ? "<br>" : "");
		html_escape(b, name);
		if (strcmp(st, "sent")) {
			buf_adds(b, " <span class=held>(");
			html_escape(b, !strcmp(st, "queued") ? "waiting" : st);
			buf_adds(b, ")</span>");
		} else if (sqlite3_column_int(s, 4)) {
			buf_adds(b, " &middot; <b>clicked</b>");
		} else if (sqlite3_column_int(s, 3)) {
			buf_adds(b, " &middot; opened");
		}
	}
	sqlite3_reset(s);
	if (!n)
		buf_adds(b, "&mdash;");
}

/* One abandoned cart's row. */
static void act_row(struct app *app, sqlite3_stmt *s, const char *tok,
		    struct buf *b)
{
	int64_t contact = sqlite3_column_int64(s, 1);
	buf_adds(b, "<tr><td class=l>");
	html_date(b, sqlite3_column_int64(s, 6), "%Y-%m-%d %H:%M");
	buf_adds(b, "</td><td class=l>");
	if (contact) {
		buf_addf(b, "<a href=\"contact?c=%lld", (long long)contact);
		html_tok(b, tok, 0);
		buf_adds(b, "\">");
		html_escape(b, *col_text(s, 3) ? col_text(s, 3) : col_text(s, 2));
		buf_adds(b, "</a><br><span class=note>");
		html_escape(b, col_text(s, 2));
		buf_adds(b, "</span>");
	} else {
		buf_adds(b, "<span class=held>anonymous</span>");
	}
	buf_addf(b, "</td><td>%.2f ", sqlite3_column_double(s, 4));
	html_escape(b, col_text(s, 5));
	buf_adds(b, "</td><td class=l>");
	if (sqlite3_column_type(s, 7) == SQLITE_NULL)
		buf_adds(b, "<span class=held>not enrolled</span>");
	else if (sqlite3_column_int(s, 9))
		buf_adds(b, "<span class=held>held out: sent nothing</span>");
	else
		act_messages(app, sqlite3_column_int64(s, 7), sqlite3_column_int64(s, 8),
			     b);
	buf_adds(b, "</td><td class=l>");
	if (sqlite3_column_int64(s, 11) > 0) {
		buf_addf(b, "%.2f ", sqlite3_column_double(s, 12));
		html_escape(b, col_text(s, 5));
		buf_adds(b, "<br><span class=note>");
		html_date(b, sqlite3_column_int64(s, 13), "%Y-%m-%d %H:%M");
		const char *how = col_text(s, 14);
		buf_adds(b, !strcmp(how, "click") ? ", after a click"
			 : !strcmp(how, "code") ? ", with a code"
			 : !strcmp(how, "influenced") ? ", after a mail, no click"
			 : "");
		buf_adds(b, "</span>");
	} else {
		buf_adds(b, "&mdash;");
	}
	buf_adds(b, "</td></tr>");
}

/* The activity list, page PAGE (from 1). */
static int activity_html(struct app *app, long page, const char *tok,
			 struct buf *b)
{
	long total = 0;
	q_row(q(app->db, ST_ACT_COUNT, NULL), "l", &total);
	long pages = total ? (total + ACT_PAGE - 1) / ACT_PAGE : 1;
	html_head(b, "Abandoned carts &middot; remarket");
	buf_adds(b, "<h1>Abandoned carts</h1><p class=note><a href=\"../report");
	html_tok(b, tok, 1);
	buf_addf(b, "\">&larr; the report</a> &middot; %ld carts, newest first, "
		 "page %ld of %ld.</p><section><table><tr><th class=l>Abandoned"
		 "</th><th class=l>Person</th><th>Value</th><th class=l>Sent</th>"
		 "<th class=l>Ordered</th></tr>", total, page, pages);
	sqlite3_stmt *s = q(app->db, ST_ACT_CARTS, "ii", (int64_t)ACT_PAGE,
			    (int64_t)(page - 1) * ACT_PAGE);
	while (sqlite3_step(s) == SQLITE_ROW)
		act_row(app, s, tok, b);
	sqlite3_reset(s);
	buf_adds(b, "</table></section><p class=note>");
	if (page > 1) {
		buf_addf(b, "<a rel=prev href=\"carts?page=%ld", page - 1);
		html_tok(b, tok, 0);
		buf_adds(b, "\">&larr; newer</a> ");
	}
	if (page < pages) {
		buf_addf(b, "<a rel=next href=\"carts?page=%ld", page + 1);
		html_tok(b, tok, 0);
		buf_adds(b, "\">older &rarr;</a>");
	}
	buf_adds(b, "</p></main></body></html>\n");
	return buf_failed(b) ? -1 : 0;
}

/* A value of `remarket contact` as a person reads it: a time (a key
 * ending in ts, _at, created, updated, _seen or expires) gets its date. */
static void contact_value(struct buf *b, const char *path, const char *v)
{
	static const char *const ends[] = {"ts", "_at", "created", "updated",
					   "_seen", "expires"};
	html_escape(b, v);
	size_t n = strlen(path);
	if (n && path[n - 1] == '"') /* json_tree quotes a key with a '_' */
		n--;
	char *end;
	long long t = strtoll(v, &end, 10);
	if (*end || end == v || t <= 0)
		return;
	for (size_t i = 0; i < sizeof ends / sizeof ends[0]; i++) {
		size_t m = strlen(ends[i]);
		if (n >= m && !strncmp(path + n - m, ends[i], m)) {
			buf_adds(b, " <span class=note>");
			html_date(b, t, "%Y-%m-%d %H:%M UTC");
			buf_adds(b, "</span>");
			return;
		}
	}
}

/* The contact page: `remarket contact` (PERSON_JSON read by PERSON_LINES)
 * as a table, a heading row for each part (carts, orders, messages...).
 * Returns 1 when there is no such contact. */
static int contact_html(struct app *app, int64_t id, const char *tok,
			struct buf *b)
{
	struct db *db = app->db;
	char *email = NULL;
	sqlite3_stmt *s = q(db, ST_CONTACT_EMAIL, "i", id);
	if (sqlite3_step(s) == SQLITE_ROW)
		email = strdup(col_text(s, 0));
	sqlite3_reset(s);
	if (!email)
		return 1;
	s = q(db, ST_PERSON_JSON, "ti", email, (int64_t)0);
	char *json = sqlite3_step(s) == SQLITE_ROW ? strdup(col_text(s, 0)) : NULL;
	sqlite3_reset(s);
	html_head(b, "Contact &middot; remarket");
	buf_adds(b, "<h1>");
	html_escape(b, email);
	buf_adds(b, "</h1><p class=note><a href=\"carts");
	html_tok(b, tok, 1);
	buf_adds(b, "\">&larr; abandoned carts</a> &middot; what <code>remarket "
		 "contact</code> prints, as a table.</p><section><table>");
	char part[32] = "";
	s = q(db, ST_PERSON_LINES, "t", json ? json : "{}");
	while (sqlite3_step(s) == SQLITE_ROW) {
		const char *path = col_text(s, 0);
		size_t n = strcspn(path, ".[");
		if (path[n] && n < sizeof part &&
		    (strlen(part) != n || strncmp(part, path, n))) {
			memcpy(part, path, n);
			part[n] = '\0';
			buf_adds(b, "<tr><th class=l colspan=2>");
			html_escape(b, part);
			buf_adds(b, "</th></tr>");
		}
		buf_adds(b, "<tr><td class=l>");
		html_escape(b, path);
		buf_adds(b, "</td><td class=l>");
		contact_value(b, path, col_text(s, 1));
		buf_adds(b, "</td></tr>");
	}
	sqlite3_reset(s);
	buf_adds(b, "</table></section></main></body></html>\n");
	free(json);
	free(email);
	return buf_failed(b) ? -1 : 0;
}

/* ==== HTTP routes ===================================================== */
/*
 * http_handle maps (method, path) to one route function and always fills
 * a response: JSON errors for machines ({"error": "..."} with a 4xx that
 * says what to fix), small HTML pages for shoppers, a GIF for pixels. It
 * knows nothing of FastCGI or CGI; the front-ends below fill http_req.
 */

static const unsigned char gif1x1[] = {
	0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00,
	0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00,
	0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01, 0x00,
	0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b};

static const char *status_text(int status)
{
	switch (status) {
	case 200: return "OK";
	case 202: return "Accepted";
	case 204: return "No Content";
	case 302: return "Found";
	case 400: return "Bad Request";
	case 401: return "Unauthorized";
	case 403: return "Forbidden";
	case 404: return "Not Found";
	case 405: return "Method Not Allowed";
	case 413: return "Payload Too Large";
	case 415: return "Unsupported Media Type";
	case 429: return "Too Many Requests";
	case 500: return "Internal Server Error";
	case 503: return "Service Unavailable";
	}
	return "Unknown";
}

void http_resp_free(struct http_resp *rs)
{
	buf_free(&rs->headers);
	buf_free(&rs->body);
}

static void resp_json_error(struct app *app, struct http_resp *rs, int status,
			    const char *msg)
{
	rs->status = status;
	rs->content_type = "application/json";
	buf_reset(&rs->body);
	if (json_from(app->db, q(app->db, ST_JSON_ERROR, "t", msg), &rs->body))
		buf_adds(&rs->body, "{\"error\":\"internal error\"}");
}

static void resp_gif(struct http_resp *rs)
{
	rs->status = 200;
	rs->content_type = "image/gif";
	buf_add(&rs->body, gif1x1, sizeof gif1x1);
	buf_adds(&rs->headers, "Cache-Control: no-store\r\n");
}

/* A page for a shopper, from templates/page.html (built-in if missing). */
static void resp_page(struct app *app, struct http_resp *rs, int status,
		      const char *title, const char *message,
		      const char *action_url, const char *action_label)
{
	struct tvar v[] = {
		{"title", title, NULL, 0},
		{"message", message, NULL, 0},
		{"store_name", app->cfg->store_name, NULL, 0},
		{"store_url", app->cfg->store_url, NULL, 0},
		{"action_url", action_url ? action_url : "", NULL, 0},
		{"action_label", action_label ? action_label : "", NULL, 0},
	};
	struct tctx ctx = {v, sizeof v / sizeof v[0], NULL};
	struct buf tpl = {0};
	char path[PATH_MAX], err[200];
	rs->status = status;
	rs->content_type = "text/html; charset=utf-8";
	buf_adds(&rs->headers, "Cache-Control: no-store\r\n"
		 "Referrer-Policy: no-referrer\r\n");
	snprintf(path, sizeof path, "%s/page.html", app->cfg->templates);
	if (template_read(path, &tpl) < 0 ||
	    tpl_render(tpl.data, &ctx, TPL_HTML, app->cfg->templates, ".html",
		       &rs->body, err, sizeof err) < 0) {
		buf_reset(&rs->body);
		tpl_render("<!doctype html><meta charset=utf-8><meta name=viewport "
			   "content=\"width=device-width\"><title>{{title}}</title>"
			   "<h1>{{title}}</h1><p>{{message}}</p>{{#action_url}}"
			   "<form method=post action=\"{{action_url}}\"><button>"
			   "{{action_label}}</button></form>{{/action_url}}",
			   &ctx, TPL_HTML, ".", ".html", &rs->body, err, sizeof err);
	}
	buf_free(&tpl);
}

static void resp_redirect(struct http_resp *rs, const char *url)
{
	rs->status = 302;
	rs->content_type = "text/plain; charset=utf-8";
	if (has_crlf(url))
		url = "/";
	buf_addf(&rs->headers, "Location: %s\r\nCache-Control: no-store\r\n"
		 "Referrer-Policy: no-referrer\r\n", url);
	buf_addf(&rs->body, "Redirecting to %s\n", url);
}

/* cart_url with {cart} and {code} replaced by URL-escaped values. */
static int cart_location(struct app *app, const char *cart, const char *code,
			 struct buf *out)
{
	char shop[80]; /* a browser's "<cart_id>/<vid>": the shop knows cart_id */
	/* and an ordered generation's "<cart_id>#<n>": the shop keeps one
	 * cart per id, so an old mail's link restores the current cart */
	snprintf(shop, sizeof shop, "%.*s", (int)strcspn(cart, "/#"), cart);
	for (const char *p = app->cfg->cart_url; *p;) {
		const char *val = NULL;
		if (!strncmp(p, "{cart}", 6))
			val = shop;
		else if (!strncmp(p, "{code}", 6))
			val = code;
		if (!val) {
			buf_add(out, p++, 1);
			continue;
		}
		char *esc = curl_easy_escape(NULL, val, 0);
		if (!esc)
			out->failed = 1; /* a value left out is a wrong link */
		buf_adds(out, esc ? esc : "");
		curl_free(esc);
		p += 6;
	}
	return buf_failed(out) ? -1 : 0;
}

static int content_type_is(const struct http_req *rq, const char *want)
{
	const char *ct = rq->content_type ? rq->content_type : "";
	size_t n = strlen(want);
	return strncasecmp(ct, want, n) == 0 && (ct[n] == '\0' || ct[n] == ';' ||
						  ct[n] == ' ');
}

static int bearer_ok(const struct http_req *rq, const char *token)
{
	const char *a = rq->authorization;
	if (!*token || !a || strncmp(a, "Bearer ", 7) != 0)
		return 0;
	a += 7;
	size_t n = strlen(token);
	return strlen(a) == n && sodium_memcmp(a, token, n) == 0;
}

/* The rm_vid cookie, if it looks like one of ours. */
static void cookie_vid(const struct http_req *rq, char *out, size_t n)
{
	out[0] = '\0';
	for (const char *c = rq->cookie; c && (c = strstr(c, "rm_vid=")); c += 7) {
		if (c != rq->cookie && c[-1] != ' ' && c[-1] != ';')
			continue;
		size_t len = strcspn(c + 7, "; ");
		if (len < n) {
			memcpy(out, c + 7, len);
			out[len] = '\0';
		}
		if (!val_ident(out, 64))
			out[0] = '\0';
		return;
	}
}

typedef void route_fn(struct app *, const struct http_req *,
		      struct http_resp *, const char *, rm_time);

static int operator_ok(struct app *app, const struct http_req *rq, rm_time now);

/* GET /health: "ok" to anyone (the process answers: a load balancer's
 * liveness probe); to the operator (the tick token or a report link, as
 * /report) the checks of `remarket status --json`, 503 when one stops
 * sending. */
static void route_health(struct app *app, const struct http_req *rq,
			 struct http_resp *rs, const char *arg, rm_time now)
{
	(void)arg;
	if (!operator_ok(app, rq, now)) {
		rs->status = 200;
		rs->content_type = "text/plain; charset=utf-8";
		buf_adds(&rs->body, "ok\n");
		return;
	}
	int level = check_run(app, now, CHECK_STATUS, &rs->body, NULL, NULL);
	if (level < 0)
		return resp_json_error(app, rs, 500, "status failed");
	rs->status = level == CHECK_STOP ? 503 : 200;
	rs->content_type = "application/json";
	buf_adds(&rs->headers, "Cache-Control: no-store\r\n"
		 "Referrer-Policy: no-referrer\r\n");
}

static void ingest_answer(struct app *app, struct http_resp *rs, int n,
			  const struct ev_error *err, int ok_status)
{
	if (n < 0) {
		resp_json_error(app, rs, err->status, err->msg);
		return;
	}
	rs->status = ok_status;
	if (ok_status == 204)
		return;
	rs->content_type = "application/json";
	json_from(app->db, q(app->db, ST_JSON_ACCEPTED, "ii", (int64_t)n,
			     (int64_t)err->duplicates), &rs->body);
}

static char *query_param(const char *query, const char *name);

static void route_events(struct app *app, const struct http_req *rq,
			 struct http_resp *rs, const char *arg, rm_time now)
{
	(void)arg;
	const char *why;
	struct ev_error err;
	if (rq->body_too_large)
		return resp_json_error(app, rs, 413, "body: too large");
	if (!content_type_is(rq, "application/json"))
		return resp_json_error(app, rs, 415, "Content-Type must be "
				       "application/json");
	if (!*app->cfg->hook_secret)
		return resp_json_error(app, rs, 401, "hook_secret is not set on "
				       "the server: signed events are refused");
	if (hook_verify(app->cfg->hook_secret, rq->signature, rq->body,
			rq->body_len, now, &why) < 0)
		return resp_json_error(app, rs, 401, why);
	char *partial = query_param(rq->query, "partial");
	int bad = partial && strcmp(partial, "1") && strcmp(partial, "0");
	int part = partial && !strcmp(partial, "1");
	free(partial);
	if (bad)
		return resp_json_error(app, rs, 400, "partial: must be 1 (store "
				       "the good events of a batch) or 0");
	if (!part) {
		int n = ev_ingest(app, EV_HOOK, rq->body, rq->body_len, NULL, now, &err);
		return ingest_answer(app, rs, n, &err, 202);
	}
	struct buf refused = {0};
	int n = ev_ingest_partial(app, EV_HOOK, rq->body, rq->body_len, NULL, now,
				  &err, &refused);
	if (n < 0) {
		buf_free(&refused);
		return resp_json_error(app, rs, err.status, err.msg);
	}
	rs->status = 202;
	rs->content_type = "application/json";
	buf_addf(&rs->body, "{\"accepted\":%d,\"duplicates\":%d,\"refused\":%s}",
		 n, err.duplicates, buf_str(&refused));
	buf_free(&refused);
}

/* ---- POST /feedback: bounces and complaints from sending services ---- */
/*
 * The same events as `remarket feedback`, from a webhook: /feedback in
 * remarket's own format, signed as /events (X-Remarket-Signature), and
 * the native webhooks of Mailgun (/feedback/mailgun, HMAC-SHA256 of
 * timestamp and token with mailgun_signing_key) and Postmark
 * (/feedback/postmark, Basic auth with postmark_webhook_auth). A signed
 * webhook may name the contact by address alone. Missing credentials
 * answer 401, wrong ones 403; events of other kinds (a delivery, an
 * open) are answered 200 and left alone, so the service does not retry.
 */

/* One row of an FB_JSON_* statement (type, email, message_id, status,
 * JSON type) as an event; -1 with WHY if it is not a valid one. */
static int fb_from_row(sqlite3_stmt *s, const char *source, int strict,
		       struct fb_event *ev, char *why, size_t whylen)
{
	static const char *const types[] = {"", "hard_bounce", "soft_bounce",
					    "complaint", "unsubscribe"};
	const char *type = col_text(s, 0), *email = col_text(s, 1);
	const char *mid = col_text(s, 2), *status = col_text(s, 3);
	memset(ev, 0, sizeof *ev);
	ev->source = source;
	ev->by_email = 1;
	if (strcmp(col_text(s, 4), "object")) {
		snprintf(why, whylen, "each event must be an object");
		return -1;
	}
	for (int k = 1; k < 5; k++)
		if (!strcmp(type, types[k]))
			ev->kind = (enum fb_kind)k;
	if (strict && ev->kind == FB_NONE) {
		snprintf(why, whylen, "type: must be hard_bounce, soft_bounce, "
			 "complaint or unsubscribe");
		return -1;
	}
	if (ev->kind == FB_NONE)
		return 0;
	if ((*email && !val_email(email)) || strlen(email) >= sizeof ev->email) {
		snprintf(why, whylen, "email: not an address");
		return -1;
	}
	if (!val_text(mid, 250) || !val_text(status, sizeof ev->status - 1)) {
		snprintf(why, whylen, "message_id, status: too long or not text");
		return -1;
	}
	if (!*email && !*mid) {
		snprintf(why, whylen, "an event needs email or message_id");
		return -1;
	}
	copy_str(ev->email, sizeof ev->email, email);
	copy_str(ev->status, sizeof ev->status, status);
	if (*mid) /* Mailgun gives it without its angle brackets */
		snprintf(ev->message_id, sizeof ev->message_id, "%s%s%s",
			 *mid == '<' ? "" : "<", mid, *mid == '<' ? "" : ">");
	return 0;
}

/* Mailgun signs hex(HMAC-SHA256(signing key, timestamp || token)). */
static int fb_mailgun_ok(const char *key, const char *ts, const char *token,
			 const char *sig)
{
	unsigned char mac[crypto_auth_hmacsha256_BYTES], got[sizeof mac];
	crypto_auth_hmacsha256_state st;
	size_t n = 0;
	crypto_auth_hmacsha256_init(&st, (const unsigned char *)key, strlen(key));
	crypto_auth_hmacsha256_update(&st, (const unsigned char *)ts, strlen(ts));
	crypto_auth_hmacsha256_update(&st, (const unsigned char *)token,
				      strlen(token));
	crypto_auth_hmacsha256_final(&st, mac);
	return !sodium_hex2bin(got, sizeof got, sig, strlen(sig), NULL, &n, NULL) &&
	       n == sizeof got && strlen(sig) == 2 * n &&
	       sodium_memcmp(got, mac, sizeof mac) == 0;
}

/* Postmark: "Authorization: Basic base64(user:password)" against
 * postmark_webhook_auth. 0 ok, 401 missing, 403 wrong. */
static int fb_postmark_auth(const char *want, const char *auth)
{
	unsigned char got[512];
	size_t n = 0;
	if (!auth || strncasecmp(auth, "Basic ", 6))
		return 401;
	if (sodium_base642bin(got, sizeof got, auth + 6, strlen(auth + 6), " ",
			      &n, NULL, sodium_base64_VARIANT_ORIGINAL) < 0)
		return 401;
	return n == strlen(want) && sodium_memcmp(got, want, n) == 0 ? 0 : 403;
}

/* Reads every event of the body with statement ID, then applies them:
 * nothing is applied when one is invalid (400). */
static void fb_route_apply(struct app *app, struct http_resp *rs,
			   enum stmt_id id, const char *body, size_t len,
			   const char *source, rm_time now)
{
	struct fb_event *evs = NULL;
	char why[300];
	int n = 0, applied = 0, left = 0, bad = 0;
	sqlite3_stmt *s = q(app->db, id, "b", body, (int)len);
	while (!bad && sqlite3_step(s) == SQLITE_ROW) {
		struct fb_event *more = realloc(evs, (size_t)(n + 1) * sizeof *evs);
		if (!more) {
			bad = 500;
			break;
		}
		evs = more;
		if (fb_from_row(s, source, id == ST_FB_JSON_REMARKET, &evs[n], why,
				sizeof why) < 0) {
			char msg[360];
			snprintf(msg, sizeof msg, "events[%d]: %s", n, why);
			copy_str(why, sizeof why, msg);
			bad = 400;
		}
		n++;
	}
	sqlite3_reset(s);
	for (int i = 0; !bad && i < n; i++) {
		if (evs[i].kind == FB_NONE)
			continue; /* a delivery, an open: not ours to act on */
		int rc = fb_apply(app, &evs[i], now, why, sizeof why);
		if (rc < 0)
			bad = 503;
		*(rc == 0 ? &applied : &left) += rc >= 0;
	}
	free(evs);
	if (bad)
		return resp_json_error(app, rs, bad, bad == 400 ? why : "database "
				       "busy or out of memory: try again later");
	rs->status = 200;
	rs->content_type = "application/json";
	buf_addf(&rs->body, "{\"applied\":%d,\"left_alone\":%d}", applied, left);
}

static void route_feedback(struct app *app, const struct http_req *rq,
			   struct http_resp *rs, const char *arg, rm_time now)
{
	struct config *cfg = app->cfg;
	const char *why;
	if (*arg == '/')
		arg = ""; /* the exact route passes its path */
	if (*arg && strcmp(arg, "mailgun") && strcmp(arg, "postmark"))
		return resp_json_error(app, rs, 404, "no such endpoint (feedback, "
				       "feedback/mailgun, feedback/postmark)");
	if (rq->body_too_large)
		return resp_json_error(app, rs, 413, "body: too large");
	if (!content_type_is(rq, "application/json"))
		return resp_json_error(app, rs, 415, "Content-Type must be "
				       "application/json");
	const char *body = rq->body ? rq->body : "";
	long okjson = 0;
	q_row(q(app->db, ST_FB_JSON_OK, "b", body, (int)rq->body_len), "l", &okjson);
	if (!*arg) {
		if (!*cfg->hook_secret)
			return resp_json_error(app, rs, 401, "hook_secret is not set "
					       "on the server: signed feedback is refused");
		if (hook_verify(cfg->hook_secret, rq->signature, body, rq->body_len,
				now, &why) < 0)
			return resp_json_error(app, rs, 401, why);
		if (!okjson)
			return resp_json_error(app, rs, 400, "body: want a JSON object "
					       "or array of objects");
		return fb_route_apply(app, rs, ST_FB_JSON_REMARKET, body,
				      rq->body_len, "remarket", now);
	}
	if (!strcmp(arg, "postmark")) {
		int st = *cfg->postmark_webhook_auth ?
			 fb_postmark_auth(cfg->postmark_webhook_auth, rq->authorization) : 401;
		if (st == 401)
			buf_adds(&rs->headers, "WWW-Authenticate: Basic realm=\"remarket\"\r\n");
		if (st)
			return resp_json_error(app, rs, st, *cfg->postmark_webhook_auth ?
					       "Basic auth: missing or wrong (postmark_webhook_auth)" :
					       "postmark_webhook_auth is not set on the server");
		if (!okjson)
			return resp_json_error(app, rs, 400, "body: want a JSON object");
		return fb_route_apply(app, rs, ST_FB_JSON_POSTMARK, body,
				      rq->body_len, "postmark", now);
	}
	if (!*cfg->mailgun_signing_key)
		return resp_json_error(app, rs, 401, "mailgun_signing_key is not set "
				       "on the server");
	if (!okjson)
		return resp_json_error(app, rs, 400, "body: want a JSON object");
	sqlite3_stmt *s = q(app->db, ST_FB_JSON_MAILGUN, "b", body, (int)rq->body_len);
	int st = 401;
	char token[256] = "";
	long long ts = 0;
	if (sqlite3_step(s) == SQLITE_ROW && *col_text(s, 5) && *col_text(s, 6) &&
	    *col_text(s, 7)) {
		st = fb_mailgun_ok(cfg->mailgun_signing_key, col_text(s, 5),
				   col_text(s, 6), col_text(s, 7)) ? 0 : 403;
		ts = strtoll(col_text(s, 5), NULL, 10);
		copy_str(token, sizeof token, col_text(s, 6));
	}
	sqlite3_reset(s);
	if (st)
		return resp_json_error(app, rs, st, st == 401 ? "signature: missing "
				       "(want signature.timestamp, token, signature)" :
				       "signature: does not match (check "
				       "mailgun_signing_key)");
	/* the signature covers timestamp and token, not the event: a signed
	 * pair is taken once, and only while it is fresh, so that one seen
	 * in a log cannot carry events of someone else's choosing */
	if (ts < now - FB_WEBHOOK_FRESH || ts > now + FB_WEBHOOK_FRESH)
		return resp_json_error(app, rs, 403, "signature: timestamp more than "
				       "5 minutes from now (a replay, or a clock "
				       "that is wrong)");
	q_write(app->db, q(app->db, ST_FB_TOKEN_PURGE, "i",
			   (int64_t)(now - 2 * FB_WEBHOOK_FRESH)));
	if (q_write(app->db, q(app->db, ST_FB_TOKEN_SEEN, "ti", token, (int64_t)ts)) ||
	    sqlite3_changes(app->db->h) == 0)
		return resp_json_error(app, rs, 403, "signature: this token was "
				       "used before (a replay)");
	fb_route_apply(app, rs, ST_FB_JSON_MAILGUN, body, rq->body_len, "mailgun",
		       now);
}

/* ---- browser-facing: CORS and rate limits ---- */
/*
 * Browser endpoints answer only the configured store origin (a request
 * without an Origin header is same-origin or not from a browser). Rate
 * limits are kept in memory per process, in fixed one-minute windows per
 * client address and per visitor id: cheap enough for the hot path, and
 * enough to stop one client from flooding the event table.
 */

#define RATE_SLOTS 4096
struct rate_slot {
	uint64_t key;
	int64_t window;
	long count;
};
/* One table per kind: a visitor id (chosen by the client) must never be
 * able to reset an address's counter by landing in its slot. */
static struct rate_slot rate_ip[RATE_SLOTS], rate_vid[RATE_SLOTS];
static pthread_mutex_t rate_lock = PTHREAD_MUTEX_INITIALIZER;

/* 1 when KIND ('i' address, 'v' visitor):ID has made more than LIMIT
 * calls in this minute. Per process: CGI mode has no memory, no limit. */
static int rate_exceeded(char kind, const char *id, rm_time now, long limit)
{
	if (!id || !*id || limit <= 0)
		return 0;
	uint64_t h = 1469598103934665603ULL; /* FNV-1a */
	for (const char *p = id; *p; p++)
		h = (h ^ (unsigned char)*p) * 1099511628211ULL;
	struct rate_slot *s = &(kind == 'i' ? rate_ip : rate_vid)[h % RATE_SLOTS];
	pthread_mutex_lock(&rate_lock);
	if (s->key != h || s->window != now / 60)
		*s = (struct rate_slot){h, now / 60, 0};
	long n = ++s->count;
	pthread_mutex_unlock(&rate_lock);
	return n > limit;
}

/* Adds the CORS headers; 0 if the origin may call, -1 after a 403. */
static int cors(struct app *app, const struct http_req *rq, struct http_resp *rs)
{
	if (!rq->origin || !*rq->origin)
		return 0;
	if (strcmp(rq->origin, app->cfg->store_origin) != 0) {
		resp_json_error(app, rs, 403, "Origin not allowed: set store_origin "
				"to the shop's scheme://host[:port]");
		return -1;
	}
	buf_addf(&rs->headers, "Access-Control-Allow-Origin: %s\r\n"
		 "Access-Control-Allow-Credentials: true\r\nVary: Origin\r\n",
		 app->cfg->store_origin);
	return 0;
}

/* OPTIONS preflight of a browser endpoint. */
static int preflight(struct app *app, const struct http_req *rq,
		     struct http_resp *rs)
{
	if (strcmp(rq->method, "OPTIONS") != 0)
		return 0;
	if (cors(app, rq, rs) == 0) {
		rs->status = 204;
		buf_adds(&rs->headers, "Access-Control-Allow-Methods: GET, POST\r\n"
			 "Access-Control-Allow-Headers: Content-Type\r\n"
			 "Access-Control-Max-Age: 86400\r\n");
	}
	return 1;
}

static int rate_limited(struct app *app, const struct http_req *rq,
			const char *vid, rm_time now, struct http_resp *rs)
{
	char msg[160];
	const char *who = NULL;
	if (rate_exceeded('i', rq->remote_addr, now, app->cfg->rate_ip_per_min))
		who = "address";
	else if (rate_exceeded('v', vid, now, app->cfg->rate_visitor_per_min))
		who = "visitor";
	if (!who)
		return 0;
	snprintf(msg, sizeof msg, "rate limit: too many events from this %s, "
		 "try again in a minute", who);
	resp_json_error(app, rs, 429, msg);
	buf_addf(&rs->headers, "Retry-After: %lld\r\n", (long long)(60 - now % 60));
	return 1;
}

static void route_collect(struct app *app, const struct http_req *rq,
			  struct http_resp *rs, const char *arg, rm_time now)
{
	(void)arg;
	char vid[80];
	struct ev_error err;
	if (preflight(app, rq, rs) || cors(app, rq, rs) < 0)
		return;
	cookie_vid(rq, vid, sizeof vid);
	if (rate_limited(app, rq, vid, now, rs))
		return;
	if (rq->body_too_large)
		return resp_json_error(app, rs, 413, "body: too large");
	/* sendBeacon posts text/plain; fetch posts application/json */
	if (!content_type_is(rq, "application/json") &&
	    !content_type_is(rq, "text/plain"))
		return resp_json_error(app, rs, 415, "Content-Type must be "
				       "application/json or text/plain");
	int n = ev_ingest(app, EV_BROWSER, rq->body, rq->body_len,
			  *vid ? vid : NULL, now, &err);
	ingest_answer(app, rs, n, &err, 204);
}

/* A returning visitor with an abandoned cart gets a message to show. */
static void route_onsite(struct app *app, const struct http_req *rq,
			 struct http_resp *rs, const char *arg, rm_time now)
{
	(void)arg, (void)now;
	char vid[80], cart[80] = "", msg[120];
	long items = 0;
	if (preflight(app, rq, rs) || cors(app, rq, rs) < 0)
		return;
	/* the cookie only: a visitor id in a URL could be anyone's */
	cookie_vid(rq, vid, sizeof vid);
	sqlite3_stmt *s = q(app->db, ST_ONSITE_CART, "t", vid);
	if (*vid && sqlite3_step(s) == SQLITE_ROW) {
		copy_str(cart, sizeof cart, col_text(s, 0));
		items = sqlite3_column_int(s, 1);
	}
	sqlite3_reset(s);
	buf_adds(&rs->headers, "Cache-Control: no-store\r\n");
	if (!*cart) {
		rs->status = 204;
		return;
	}
	struct buf url = {0};
	if (cart_location(app, cart, "", &url) < 0) {
		buf_free(&url);
		return resp_json_error(app, rs, 500, "out of memory");
	}
	snprintf(msg, sizeof msg, "Your cart is saved — %ld item%s", items,
		 items == 1 ? "" : "s");
	rs->status = 200;
	rs->content_type = "application/json";
	json_from(app->db, q(app->db, ST_JSON_ONSITE, "tti", msg, buf_str(&url),
			     (int64_t)items), &rs->body);
	buf_free(&url);
}

/* Answers static_dir/NAME as JavaScript with HEADERS, or 404. */
static void static_js(struct app *app, struct http_resp *rs, const char *name,
		      const char *headers)
{
	char path[PATH_MAX], msg[96];
	snprintf(path, sizeof path, "%s/%s", app->cfg->static_dir, name);
	if (read_file(path, &rs->body, 1 << 20) < 0) {
		buf_reset(&rs->body);
		snprintf(msg, sizeof msg, "%s not found: check static_dir", name);
		return resp_json_error(app, rs, 404, msg);
	}
	rs->status = 200;
	rs->content_type = "application/javascript; charset=utf-8";
	buf_adds(&rs->headers, headers);
}

static void route_script(struct app *app, const struct http_req *rq,
			 struct http_resp *rs, const char *arg, rm_time now)
{
	(void)rq, (void)arg, (void)now;
	static_js(app, rs, "remarket.js", "Cache-Control: public, max-age=3600\r\n");
}

/* GET /push/key: the VAPID public key remarket.js subscribes with. */
static void route_push_key(struct app *app, const struct http_req *rq,
			   struct http_resp *rs, const char *arg, rm_time now)
{
	(void)arg, (void)now;
	char pub[100], err[600];
	if (preflight(app, rq, rs) || cors(app, rq, rs) < 0)
		return;
	if (vapid_public(app->cfg->vapid_key_file, pub, sizeof pub, err,
			 sizeof err) < 0) {
		fprintf(stderr, "remarket: web push: %s\n", err);
		return resp_json_error(app, rs, 404, "web push is not set up: no "
				       "VAPID key (remarket keygen --vapid)");
	}
	rs->status = 200;
	rs->content_type = "application/json";
	buf_adds(&rs->headers, "Cache-Control: public, max-age=3600\r\n");
	json_from(app->db, q(app->db, ST_JSON_PUSH_KEY, "t", pub), &rs->body);
}

/* POST /push/subscribe: a browser's PushSubscription ({endpoint, keys:
 * {p256dh, auth}}, as JSON.stringify gives it), stored for the contact
 * its rm_vid cookie is (or becomes). The cookie only, as /onsite: an id
 * in the body could be anyone's. */
static void route_push_subscribe(struct app *app, const struct http_req *rq,
				 struct http_resp *rs, const char *arg,
				 rm_time now)
{
	(void)arg;
	char vid[80], endpoint[1100] = "", p256dh[100] = "", secret[40] = "";
	char aud[600];
	unsigned char ua[65], auth[16];
	int keys = -1;
	if (preflight(app, rq, rs) || cors(app, rq, rs) < 0)
		return;
	cookie_vid(rq, vid, sizeof vid);
	if (rate_limited(app, rq, vid, now, rs))
		return;
	if (rq->body_too_large)
		return resp_json_error(app, rs, 413, "body: too large");
	if (!content_type_is(rq, "application/json") &&
	    !content_type_is(rq, "text/plain"))
		return resp_json_error(app, rs, 415, "Content-Type must be "
				       "application/json or text/plain");
	if (!*vid)
		return resp_json_error(app, rs, 400, "no rm_vid cookie: call "
				       "remarket('pushPrompt') on a page that "
				       "loads remarket.js");
	sqlite3_stmt *s = q(app->db, ST_PUSH_SUB_PARSE, "b", rq->body ? rq->body : "",
			    (int)rq->body_len);
	if (sqlite3_step(s) == SQLITE_ROW &&
	    copy_str(endpoint, sizeof endpoint, col_text(s, 0)) == 0 &&
	    copy_str(p256dh, sizeof p256dh, col_text(s, 1)) == 0 &&
	    copy_str(secret, sizeof secret, col_text(s, 2)) == 0)
		keys = push_keys(p256dh, secret, ua, auth);
	sqlite3_reset(s);
	if (keys < 0)
		return resp_json_error(app, rs, 400, "subscription: want the "
				       "PushSubscription's JSON {endpoint, keys: "
				       "{p256dh, auth}} with a P-256 key and a "
				       "16-byte auth secret");
	if (push_origin(app->cfg, endpoint, aud, sizeof aud) < 0)
		return resp_json_error(app, rs, 400, "subscription: endpoint must "
				       "be an https URL");
	if (q_exec(app->db, q(app->db, ST_PUSH_SUB_ADD, "tttti", endpoint,
			      p256dh, secret, vid, (int64_t)now)))
		return resp_json_error(app, rs, 503, "could not store the "
				       "subscription: try again");
	rs->status = 204;
	buf_adds(&rs->headers, "Cache-Control: no-store\r\n");
}

/* GET /sw.js: the service worker that shows remarket's notifications.
 * Service-Worker-Allowed: / lets the store register it with scope "/"
 * although it is served under remarket's path (/rm/sw.js). */
static void route_sw(struct app *app, const struct http_req *rq,
		     struct http_resp *rs, const char *arg, rm_time now)
{
	(void)rq, (void)arg, (void)now;
	/* browsers check a worker for updates: never cached for long */
	static_js(app, rs, "sw.js", "Service-Worker-Allowed: /\r\n"
		  "Cache-Control: no-cache\r\n");
}

/* Splits a query string and decodes one parameter with libcurl. */
static char *query_param(const char *query, const char *name)
{
	size_t n = strlen(name);
	for (const char *p = query; p && *p;) {
		size_t len = strcspn(p, "&");
		if (len > n && p[n] == '=' && strncmp(p, name, n) == 0) {
			int outlen = 0;
			char *v = curl_easy_unescape(NULL, p + n + 1,
						     (int)(len - n - 1), &outlen);
			char *copy = v ? strndup(v, (size_t)outlen) : NULL;
			curl_free(v);
			return copy;
		}
		p += len + (p[len] == '&');
	}
	return NULL;
}

static void route_pixel(struct app *app, const struct http_req *rq,
			struct http_resp *rs, const char *arg, rm_time now)
{
	(void)arg;
	char vid[80];
	char *type = query_param(rq->query, "type"), *sku = query_param(rq->query, "sku");
	char *url = query_param(rq->query, "url"), *qvid = query_param(rq->query, "vid");
	char *email = query_param(rq->query, "email");
	cookie_vid(rq, vid, sizeof vid);
	struct buf ev = {0};
	struct ev_error err;
	int limited = rate_exceeded('i', rq->remote_addr, now,
				    app->cfg->rate_ip_per_min);
	sqlite3_stmt *s = q(app->db, ST_PIXEL_EVENT, "ttttt", type ? type : "view",
			    sku, url, qvid ? qvid : (*vid ? vid : NULL), email);
	/* the pixel never answers with an error image: bad input is dropped */
	if (!limited && json_from(app->db, s, &ev) == 0)
		ev_ingest(app, EV_PIXEL, ev.data, ev.len, NULL, now, &err);
	free(type), free(sku), free(url), free(qvid), free(email);
	buf_free(&ev);
	resp_gif(rs);
}

/* How POST /tick hands a new run to its sender: set once by the
 * front-end before it serves (the FastCGI server's background thread, or
 * a process detached after the CGI answer). NULL (http_serve_cgi in the
 * unit tests and the fuzz target): the run happens in the request.
 * Returns 0 when the sender has taken the run. */
static int (*tick_handoff)(struct app *app, int64_t id, rm_time now);

static int tick_auth(struct app *app, const struct http_req *rq,
		     struct http_resp *rs)
{
	if (!*app->cfg->tick_token) {
		resp_json_error(app, rs, 401, "tick_token is not set on the "
				"server: /tick is disabled");
		return -1;
	}
	if (!bearer_ok(rq, app->cfg->tick_token)) {
		resp_json_error(app, rs, 401, "Authorization: Bearer "
				"<tick_token> required");
		return -1;
	}
	return 0;
}

/* POST /tick answers at once, 202 with the run's id and state: a new run
 * handed to the sender, or the one already running (never a second). */
static void route_tick(struct app *app, const struct http_req *rq,
		       struct http_resp *rs, const char *arg, rm_time now)
{
	(void)arg;
	int64_t id;
	int running;
	if (tick_auth(app, rq, rs))
		return;
	if (tick_begin(app, now, "http", 0, &id, &running) < 0)
		return resp_json_error(app, rs, 503, "tick failed: database busy or "
				       "broken, see the server log");
	if (!running && !tick_handoff) {
		tick_run(app, id, now, NULL);
	} else if (!running && tick_handoff(app, id, now) < 0) {
		tick_end(app, id, NULL, now, "the background sender is not "
			 "running, see the server log", NULL);
		return resp_json_error(app, rs, 503, "the background sender is not "
				       "running, see the server log");
	}
	rs->status = 202;
	rs->content_type = "application/json";
	tick_state_json(app, id, &rs->body);
}

/* GET /tick/<id> (or /tick/latest): how that run stands or ended. */
static void route_tick_state(struct app *app, const struct http_req *rq,
			     struct http_resp *rs, const char *arg, rm_time now)
{
	(void)now;
	int64_t id = 0;
	if (tick_auth(app, rq, rs))
		return;
	if (strcmp(arg, "latest") != 0) {
		char *end;
		errno = 0;
		long long n = strtoll(arg, &end, 10);
		if (!isdigit((unsigned char)*arg) || *end || errno || n < 1)
			return resp_json_error(app, rs, 400, "/tick/<id>: id must be "
					       "a tick number (from POST /tick) or "
					       "latest");
		id = (int64_t)n;
	}
	rs->content_type = "application/json";
	buf_adds(&rs->headers, "Cache-Control: no-store\r\n");
	if (tick_state_json(app, id, &rs->body) < 0 && !buf_failed(&rs->body))
		return resp_json_error(app, rs, 404, "no such tick");
	rs->status = 200;
}

/* Verifies a link token; on failure answers the shopper's page. */
static int link_target(struct app *app, const char *tok, char kind,
		       rm_time now, struct http_resp *rs, int64_t *msg,
		       int64_t *contact, char *cart, char *code)
{
	int st = app_tok_verify(app, tok, kind, now, msg);
	int found = 0;
	if (st == TOK_OK) {
		sqlite3_stmt *s = q(app->db, ST_MESSAGE_TARGET, "i", *msg);
		if (sqlite3_step(s) == SQLITE_ROW) {
			found = 1;
			*contact = sqlite3_column_int64(s, 0);
			copy_str(cart, 80, col_text(s, 1));
			copy_str(code, 40, col_text(s, 2));
		}
		sqlite3_reset(s);
	}
	if (st == TOK_OK && found)
		return 0;
	resp_page(app, rs, 400, "This link does not work",
		  st == TOK_OK ? "This link points to a message we no longer have."
			       : tok_strerror(st), NULL, NULL);
	return -1;
}

static void record(struct app *app, int64_t msg, const char *kind, rm_time now)
{
	q_exec(app->db, q(app->db, ST_INTERACTION, "iti", msg, kind, (int64_t)now));
}

/* Adds the query of cart_url (LOC, its {cart} and {code} filled in) to
 * the link's target U, so the page it opens restores the cart too. */
static void link_restore(CURLU *u, const char *loc)
{
	CURLU *c = curl_url();
	char *query = NULL;
	if (c && curl_url_set(c, CURLUPART_URL, loc, 0) == CURLUE_OK &&
	    curl_url_get(c, CURLUPART_QUERY, &query, 0) == CURLUE_OK && *query)
		curl_url_set(u, CURLUPART_QUERY, query, CURLU_APPENDQUERY);
	curl_free(query);
	curl_url_cleanup(c);
}

/* Joins this browser to the contact: its rm_vid cookie if that id is
 * already the contact's, else a new random id (never one of the contact's
 * other browsers), is linked as verified and set for a year. A link is a
 * bearer token anyone can forward or make a browser follow: it never
 * re-owns an id that is nobody's or someone else's. */
static void visitor_cookie(struct app *app, const struct http_req *rq,
			   int64_t contact, rm_time now, struct http_resp *rs)
{
	char vid[80];
	cookie_vid(rq, vid, sizeof vid);
	if (*vid && scalar_id(app->db, q(app->db, ST_VISITOR_CONTACT, "t",
					 vid)) != contact)
		*vid = '\0'; /* the old id stays as it was */
	if (!*vid) { /* a new browser gets a new id, never someone else's */
		unsigned char r[16];
		randombytes_buf(r, sizeof r);
		vid[0] = 'v';
		sodium_bin2base64(vid + 1, sizeof vid - 1, r, sizeof r,
				  sodium_base64_VARIANT_URLSAFE_NO_PADDING);
		for (char *p = vid; *p; p++) /* keep to val_ident's alphabet */
			if (*p == '_')
				*p = '.';
	}
	/* the click proves this browser reads the contact's mail */
	q_exec(app->db, q(app->db, ST_VISITOR_VERIFIED, "tii", vid, contact,
			  (int64_t)now));
	buf_addf(&rs->headers, "Set-Cookie: rm_vid=%s; Path=/; Max-Age=31536000; "
		 "SameSite=Lax\r\n", vid);
}

/* A link from an email to the cart: /r/ (recovery, which also joins this
 * browser to the contact) and /d/ (the same, with the discount code). */
static void cart_link(struct app *app, const struct http_req *rq,
		      struct http_resp *rs, const char *tok, char kind, rm_time now)
{
	int64_t msg, contact;
	char cart[80], code[40];
	struct buf loc = {0};
	if (link_target(app, tok, kind, now, rs, &msg, &contact, cart, code))
		return;
	record(app, msg, kind == TOK_RECOVER ? "click" : "discount", now);
	if (kind == TOK_RECOVER)
		visitor_cookie(app, rq, contact, now, rs);
	if (cart_location(app, cart, kind == TOK_DISCOUNT ? code : "", &loc) < 0)
		resp_page(app, rs, 500, "Something went wrong",
			  "Please try this link again in a minute.", NULL, NULL);
	else
		resp_redirect(rs, buf_str(&loc));
	buf_free(&loc);
}

static void route_recover(struct app *app, const struct http_req *rq,
			  struct http_resp *rs, const char *tok, rm_time now)
{
	cart_link(app, rq, rs, tok, TOK_RECOVER, now);
}

static void route_discount(struct app *app, const struct http_req *rq,
			   struct http_resp *rs, const char *tok, rm_time now)
{
	cart_link(app, rq, rs, tok, TOK_DISCOUNT, now);
}

/* A tracked store or product link of a mail: /l/<token>?u=<target>. The
 * token's MAC covers the target, and the target must be on store_url's
 * host, so the route redirects nowhere else. A valid one records a click
 * (which attributes orders as /r/'s does) and joins this browser to the
 * contact; in a cart mail it also carries cart_url's query (restore=...)
 * to the page, so the shop restores the cart there. An expired link
 * still leads to the shop, recording nothing. */
static void route_link(struct app *app, const struct http_req *rq,
		       struct http_resp *rs, const char *tok, rm_time now)
{
	int64_t msg = 0, contact = 0;
	char cart[80] = "";
	char *target = query_param(rq->query, "u");
	int st = target ? app_tok_verify_for(app, tok, TOK_LINK, target, now, &msg)
			: TOK_MALFORMED;
	if ((st != TOK_OK && st != TOK_EXPIRED) || !link_on_store(app->cfg, target)) {
		resp_page(app, rs, 403, "This link does not work",
			  st == TOK_OK || st == TOK_EXPIRED ?
			  "This link does not lead to our shop." : tok_strerror(st),
			  NULL, NULL);
		free(target);
		return;
	}
	CURLU *u = curl_url();
	char *loc = NULL;
	struct buf restore = {0};
	if (st == TOK_OK) {
		sqlite3_stmt *s = q(app->db, ST_MESSAGE_TARGET, "i", msg);
		int found = sqlite3_step(s) == SQLITE_ROW;
		if (found) {
			contact = sqlite3_column_int64(s, 0);
			copy_str(cart, sizeof cart, col_text(s, 1));
		}
		sqlite3_reset(s);
		if (found) {
			record(app, msg, "click", now);
			visitor_cookie(app, rq, contact, now, rs);
		}
	}
	if (u && curl_url_set(u, CURLUPART_URL, target, 0) == CURLUE_OK &&
	    *cart && cart_location(app, cart, "", &restore) == 0)
		link_restore(u, buf_str(&restore));
	if (u && curl_url_get(u, CURLUPART_URL, &loc, 0) == CURLUE_OK)
		resp_redirect(rs, loc);
	else
		resp_redirect(rs, target);
	curl_free(loc);
	curl_url_cleanup(u);
	buf_free(&restore);
	free(target);
}

static void route_unsub(struct app *app, const struct http_req *rq,
			struct http_resp *rs, const char *tok, rm_time now)
{
	int64_t msg, contact;
	char cart[80], code[40], action[1200];
	if (link_target(app, tok, TOK_UNSUB, now, rs, &msg, &contact, cart, code))
		return;
	if (strcmp(rq->method, "POST") != 0) {
		/* GET only asks: link scanners must not unsubscribe anyone */
		snprintf(action, sizeof action, "%s/u/%s", app->cfg->base_url, tok);
		return resp_page(app, rs, 200, "Unsubscribe?",
				 "Press the button and we will stop sending you "
				 "these emails.", action, "Unsubscribe");
	}
	struct db *db = app->db;
	int rc = db_begin(db) ||
		 q_exec(db, q(db, ST_UNSUBSCRIBE, "ii", contact, (int64_t)now)) ||
		 q_exec(db, q(db, ST_EXIT_CONTACT, "it", contact, "unsubscribe")) ||
		 q_exec(db, q(db, ST_INTERACTION, "iti", msg, "unsubscribe",
			      (int64_t)now)) ||
		 db_commit(db);
	if (rc) {
		db_rollback(db);
		return resp_page(app, rs, 503, "Please try again",
				 "We could not record your request just now.",
				 NULL, NULL);
	}
	resp_page(app, rs, 200, "You are unsubscribed",
		  "You will not receive these emails any more.", NULL, NULL);
}

/* The double opt-in link: GET asks (link scanners follow GETs), POST
 * confirms; the mail client's one-click List-Unsubscribe POST declines. */
static void route_confirm(struct app *app, const struct http_req *rq,
			  struct http_resp *rs, const char *tok, rm_time now)
{
	int64_t contact;
	char action[1200];
	int st = app_tok_verify(app, tok, TOK_CONFIRM, now, &contact);
	if (st != TOK_OK)
		return resp_page(app, rs, 400, "This link does not work",
				 tok_strerror(st), NULL, NULL);
	int pending = 0, consent = 0;
	sqlite3_stmt *s = q(app->db, ST_CONFIRM_STATE, "i", contact);
	if (sqlite3_step(s) == SQLITE_ROW) {
		pending = sqlite3_column_int(s, 0);
		consent = sqlite3_column_int(s, 1);
	}
	sqlite3_reset(s);
	if (!rq->method || strcmp(rq->method, "POST") != 0) {
		if (consent && !pending)
			return resp_page(app, rs, 200, "Confirmed",
					 "Your address is confirmed.", NULL, NULL);
		snprintf(action, sizeof action, "%s/c/%s", app->cfg->base_url, tok);
		return resp_page(app, rs, 200, "Confirm your email address?",
				 "Press the button and we may email you about "
				 "your cart and our shop. If you did not ask, "
				 "just close this page.", action, "Confirm");
	}
	int decline = rq->body && rq->body_len &&
		      memmem(rq->body, rq->body_len, "List-Unsubscribe=One-Click", 26);
	if (q_exec(app->db, q(app->db, decline ? ST_CONFIRM_DECLINE : ST_CONFIRM_DONE,
			      "ii", contact, (int64_t)now)) < 0)
		return resp_page(app, rs, 503, "Please try again",
				 "We could not record your answer just now.",
				 NULL, NULL);
	if (decline)
		return resp_page(app, rs, 200, "Not confirmed",
				 "We will not email this address.", NULL, NULL);
	resp_page(app, rs, 200, "Confirmed", consent || pending ?
		  "Thank you: your address is confirmed." :
		  "This address is not waiting for a confirmation.", NULL, NULL);
}

static void route_open(struct app *app, const struct http_req *rq,
		       struct http_resp *rs, const char *arg, rm_time now)
{
	(void)rq;
	char tok[TOK_MAXLEN + 8];
	int64_t msg;
	if (copy_str(tok, sizeof tok, arg) == 0) {
		char *dot = strstr(tok, ".gif");
		if (dot)
			*dot = '\0';
		/* message 0: a preview or test mail, recorded nowhere */
		if (app_tok_verify(app, tok, TOK_OPEN, now, &msg) == TOK_OK &&
		    msg > 0)
			record(app, msg, "open", now);
	}
	resp_gif(rs);
}

/* POST /discounts/validate: whether a code applies to a total, and with
 * "reserve" a hold of it for one cart for 15 minutes. */
/* POST /sms/inbound: a reply to the store's number, as Twilio posts it
 * (a form with From and Body), signed in X-Twilio-Signature over
 * base_url + "/sms/inbound" (and its query). STOP ends the number's SMS
 * consent at once (its mail is another consent, untouched), START gives
 * it back, HELP is answered with the store's name; the answer is TwiML.
 * 403 for a missing or wrong signature, before the body is believed. */
static void route_sms_inbound(struct app *app, const struct http_req *rq,
			      struct http_resp *rs, const char *arg, rm_time now)
{
	(void)arg;
	const struct config *cfg = app->cfg;
	struct buf url = {0};
	struct form f = {0};
	char sig[64];
	if (strcmp(cfg->sms_provider, "twilio") || !*cfg->twilio_auth_token)
		return resp_json_error(app, rs, 403, "sms inbound: sms_provider = "
				       "twilio and twilio_auth_token are not set "
				       "on the server");
	if (rq->body_too_large)
		return resp_json_error(app, rs, 413, "body: too large");
	buf_addf(&url, "%s/sms/inbound%s%s", cfg->base_url,
		 rq->query && *rq->query ? "?" : "", rq->query ? rq->query : "");
	int good = !buf_failed(&url) && rq->twilio_signature &&
		   sms_twilio_signature(cfg->twilio_auth_token, url.data, rq->body,
					rq->body_len, sig, sizeof sig) == 0 &&
		   strlen(sig) == strlen(rq->twilio_signature) &&
		   sodium_memcmp(sig, rq->twilio_signature, strlen(sig)) == 0;
	buf_free(&url);
	if (!good)
		return resp_json_error(app, rs, 403, "X-Twilio-Signature: missing "
				       "or wrong (twilio_auth_token, base_url)");
	if (form_parse(rq->body, rq->body_len, &f) < 0)
		return resp_json_error(app, rs, 400, "body: want a form "
				       "(at most 64 parameters)");
	const char *from = form_get(&f, "From");
	int kw = sms_keyword(form_get(&f, "Body"));
	if (!from || !val_phone(from)) {
		form_free(&f);
		return resp_json_error(app, rs, 400, "From: want an E.164 number");
	}
	if ((kw == SMS_STOP || kw == SMS_START) &&
	    q_write(app->db, q(app->db, ST_SMS_CONSENT_SET, "titi", from,
			       (int64_t)(kw == SMS_START),
			       kw == SMS_START ? "sms START" : "sms STOP",
			       (int64_t)now)) < 0) {
		form_free(&f);
		return resp_json_error(app, rs, 503, "database busy: try again");
	}
	form_free(&f);
	rs->status = 200;
	rs->content_type = "text/xml; charset=utf-8";
	buf_adds(&rs->body, "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response>");
	if (kw == SMS_HELP || kw == SMS_START) {
		buf_adds(&rs->body, "<Message>");
		html_escape(&rs->body, *cfg->store_name ? cfg->store_name : "remarket");
		buf_adds(&rs->body, kw == SMS_HELP ?
			 ": texts about your cart and orders. Reply STOP to opt "
			 "out, START to opt back in." :
			 ": you will get our texts again. Reply STOP to opt out.");
		buf_adds(&rs->body, "</Message>");
	}
	buf_adds(&rs->body, "</Response>");
}

static void route_validate(struct app *app, const struct http_req *rq,
			   struct http_resp *rs, const char *arg, rm_time now)
{
	(void)arg;
	/* each answer tells whether a code exists: no guessing at speed */
	if (rate_limited(app, rq, NULL, now, rs))
		return;
	if (rq->body_too_large)
		return resp_json_error(app, rs, 413, "body: too large");
	if (!rq->body_len || !val_utf8(rq->body, rq->body_len))
		return resp_json_error(app, rs, 400, "body: JSON object with code "
				       "and total expected");
	sqlite3_stmt *s = q(app->db, ST_VALIDATE_FIELDS, "b", rq->body,
			    (int)rq->body_len);
	char code[40] = "";
	double total = -1;
	int ok = 0;
	if (sqlite3_step(s) == SQLITE_ROW) {
		ok = !strcmp(col_text(s, 0), "text") &&
		     copy_str(code, sizeof code, col_text(s, 1)) == 0 &&
		     val_ident(code, 32);
		if (is_number(col_text(s, 2)))
			total = sqlite3_column_double(s, 3);
		else if (sqlite3_column_type(s, 2) != SQLITE_NULL)
			ok = 0;
	}
	sqlite3_reset(s);
	if (!ok || !isfinite(total))
		return resp_json_error(app, rs, 400, "body: {\"code\": \"RM-XXXX-XXXX\", "
				       "\"total\": 42.0} expected");
	/* "reserve": true holds the code for "cart_id" for 15 minutes */
	int reserve = 0;
	char cart[72] = "";
	s = q(app->db, ST_VALIDATE_RESERVE, "b", rq->body, (int)rq->body_len);
	if (sqlite3_step(s) == SQLITE_ROW) {
		const char *rt = col_text(s, 0), *ct = col_text(s, 1);
		reserve = !strcmp(rt, "true");
		if (*rt && strcmp(rt, "true") && strcmp(rt, "false"))
			ok = 0;
		if (*ct && (strcmp(ct, "text") ||
			    copy_str(cart, sizeof cart, col_text(s, 2)) < 0 ||
			    !val_ident(cart, 64)))
			ok = 0;
	}
	sqlite3_reset(s);
	if (!ok)
		return resp_json_error(app, rs, 400, "body: \"reserve\" must be "
				       "true or false, \"cart_id\" the cart's id "
				       "([A-Za-z0-9._:-], at most 64)");
	if (reserve && !*cart)
		return resp_json_error(app, rs, 400, "cart_id: required with "
				       "\"reserve\": true (the code is held for "
				       "that cart)");
	int pct = 0;
	double min = 0;
	rm_time exp = 0;
	for (char *p = code; *p; p++)
		*p = (char)toupper((unsigned char)*p);
	const char *why = code_check(app, code, total, now, &pct, &min, &exp);
	long long held = -1;
	if (!strcmp(why, "ok")) {
		held = db_scalar_stmt(q(app->db, ST_DISCOUNT_HELD, "tit", code,
					(int64_t)now, cart));
		if (held >= 0)
			why = "reserved";
	}
	if (reserve && !strcmp(why, "ok")) {
		held = now + CODE_HOLD_SECONDS;
		if (q_exec(app->db, q(app->db, ST_DISCOUNT_RESERVE, "ttii", code,
				      cart, (int64_t)held, (int64_t)now)) < 0)
			return resp_json_error(app, rs, 503, "database busy: try "
					       "again");
		if (sqlite3_changes(app->db->h) == 0) { /* another cart won */
			why = "reserved";
			held = -1;
		}
	}
	rs->status = 200;
	rs->content_type = "application/json";
	if (!reserve && held < 0) {
		json_from(app->db, q(app->db, ST_JSON_DISCOUNT, "titdi",
				     strcmp(why, "ok") ? "false" : "true", (int64_t)pct,
				     why, min, (int64_t)exp), &rs->body);
		return;
	}
	s = q(app->db, ST_JSON_DISCOUNT_HELD, "titdin",
	      strcmp(why, "ok") ? "false" : "true", (int64_t)pct, why, min,
	      (int64_t)exp);
	if (held >= 0)
		sqlite3_bind_int64(s, 6, held);
	json_from(app->db, s, &rs->body);
}

/* The subject of report links: 63 bits of a hash of the tick token, so
 * that changing tick_token revokes every report link given out. */
static int64_t report_subject(const struct config *cfg)
{
	unsigned char h[8];
	crypto_generichash(h, sizeof h, (const unsigned char *)"remarket report",
			   15, (const unsigned char *)cfg->tick_token,
			   strlen(cfg->tick_token));
	return (int64_t)(get_be64(h) >> 1);
}

/* The operator's pages: with the tick token as a bearer token or as the
 * password of HTTP Basic auth (so a browser asks for it), or with a
 * report link (?t=, from `remarket report --link`). Never by address: a
 * tunnel or a TLS terminator on this host makes every client loopback.
 * A request with ?t= is judged by the link alone: the web server examples
 * let any ?t= through from outside, and that must not open the door to
 * guesses of the tick token. */
static int operator_ok(struct app *app, const struct http_req *rq, rm_time now)
{
	char *t = query_param(rq->query, "t");
	int64_t subject = 0;
	int st = t ? app_tok_verify(app, t, TOK_REPORT, now, &subject) : TOK_MALFORMED;
	if (t) {
		free(t);
		return st == TOK_OK && subject == report_subject(app->cfg);
	}
	if (bearer_ok(rq, app->cfg->tick_token))
		return 1;
	const char *a = rq->authorization;
	if (!*app->cfg->tick_token || !a || strncmp(a, "Basic ", 6) != 0)
		return 0;
	char plain[256];
	size_t n = 0;
	if (sodium_base642bin((unsigned char *)plain, sizeof plain - 1, a + 6,
			      strlen(a + 6), NULL, &n, NULL,
			      sodium_base64_VARIANT_ORIGINAL) != 0)
		return 0;
	plain[n] = '\0';
	const char *pw = strchr(plain, ':');
	size_t len = strlen(app->cfg->tick_token);
	return pw && strlen(pw + 1) == len &&
	       sodium_memcmp(pw + 1, app->cfg->tick_token, len) == 0;
}

/* ?since=&until= (dates, Unix seconds or -30d); default: the last 30 days.
 * An until given as a date includes that day. */
static int report_window(const struct http_req *rq, rm_time now, rm_time *since,
			 rm_time *until)
{
	char *a = query_param(rq->query, "since"), *b = query_param(rq->query, "until");
	*until = b ? parse_time(b, now) : now;
	if (b && *until >= 0 && strlen(b) == 10 && b[4] == '-' && b[7] == '-')
		/* a date (the page's form sends dates): the whole day */
		*until += 86400;
	*since = a ? parse_time(a, *until) : *until - 30 * 86400;
	free(a);
	free(b);
	return *since < 0 || *until < 0 || *since > *until ? -1 : 0;
}

/* The operator's pages answer 401 without the token or a report link
 * (and ask the browser for it, as Basic auth). */
static int operator_refused(struct app *app, const struct http_req *rq,
			    struct http_resp *rs, rm_time now)
{
	if (operator_ok(app, rq, now))
		return 0;
	resp_json_error(app, rs, 401, "the report needs the tick_token "
			"(Authorization: Bearer, or as the Basic password) "
			"or a link from 'remarket report --link'");
	buf_adds(&rs->headers, "WWW-Authenticate: Basic realm=\"remarket\"\r\n");
	return 1;
}

/* The report link's token of the query, for the page's own links: only
 * when it is made of a token's letters (operator_ok has checked it). */
static void operator_tok(const struct http_req *rq, char *out, size_t n)
{
	char *t = query_param(rq->query, "t");
	out[0] = '\0';
	if (t && strlen(t) < n && strlen(t) <= TOK_MAXLEN &&
	    strspn(t, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
		   "0123456789-_") == strlen(t))
		copy_str(out, n, t);
	free(t);
}

/* A whole number from 1 to max in the query, or def when it is absent;
 * -1 when it is there and not such a number. */
static long query_count(const struct http_req *rq, const char *name, long def,
			long max)
{
	char *v = query_param(rq->query, name), *end;
	if (!v)
		return def;
	long n = *v >= '0' && *v <= '9' ? strtol(v, &end, 10) : -1;
	if (n >= 0 && *end)
		n = -1;
	free(v);
	return n >= 1 && n <= max ? n : -1;
}

/* GET /report/carts?page=N: the activity list (abandoned carts). */
static void route_report_carts(struct app *app, const struct http_req *rq,
			       struct http_resp *rs, const char *arg, rm_time now)
{
	(void)arg;
	char tok[TOK_MAXLEN + 1];
	if (operator_refused(app, rq, rs, now))
		return;
	long page = query_count(rq, "page", 1, 1000000);
	if (page < 0)
		return resp_json_error(app, rs, 400, "page: want a page number from 1");
	operator_tok(rq, tok, sizeof tok);
	rs->status = 200;
	rs->content_type = "text/html; charset=utf-8";
	buf_adds(&rs->headers, "Cache-Control: no-store\r\n"
		 "Referrer-Policy: no-referrer\r\n");
	activity_html(app, page, tok, &rs->body);
}

/* GET /report/contact?c=ID: one person, as `remarket contact` shows them. */
static void route_report_contact(struct app *app, const struct http_req *rq,
				 struct http_resp *rs, const char *arg, rm_time now)
{
	(void)arg;
	char tok[TOK_MAXLEN + 1];
	if (operator_refused(app, rq, rs, now))
		return;
	long id = query_count(rq, "c", -1, LONG_MAX);
	if (id < 0)
		return resp_json_error(app, rs, 400, "c: want a contact's number");
	operator_tok(rq, tok, sizeof tok);
	rs->status = 200;
	rs->content_type = "text/html; charset=utf-8";
	buf_adds(&rs->headers, "Cache-Control: no-store\r\n"
		 "Referrer-Policy: no-referrer\r\n");
	if (contact_html(app, id, tok, &rs->body) == 1) {
		buf_reset(&rs->headers);
		resp_json_error(app, rs, 404, "no such contact");
	}
}

/* GET /report and /report.json for the operator (tick_token required). */
static void route_report(struct app *app, const struct http_req *rq,
			 struct http_resp *rs, const char *arg, rm_time now)
{
	int json = !strcmp(arg, "/report.json"); /* exact routes get the path */
	char tok[TOK_MAXLEN + 1];
	if (operator_refused(app, rq, rs, now))
		return;
	operator_tok(rq, tok, sizeof tok);
	rm_time since, until;
	if (report_window(rq, now, &since, &until) < 0)
		return resp_json_error(app, rs, 400, "since/until: want 2026-11-01, "
				       "Unix seconds or -30d, since before until");
	struct report *r = malloc(sizeof *r);
	if (!r || report_build(app, since, until, r) < 0) {
		free(r);
		return resp_json_error(app, rs, 500, "report failed");
	}
	rs->status = 200;
	rs->content_type = json ? "application/json" : "text/html; charset=utf-8";
	/* a report link must not leak through a Referer */
	buf_adds(&rs->headers, "Cache-Control: no-store\r\n"
		 "Referrer-Policy: no-referrer\r\n");
	if (json)
		report_json(r, &rs->body);
	else
		report_page(r, app->cfg->store_name, tok, &rs->body);
	free(r);
}

static const struct route {
	const char *path;
	int prefix; /* path is a prefix; the rest is passed as the argument */
	const char *methods;
	route_fn *fn;
} routes[] = {
	{"/health", 0, "GET HEAD", route_health},
	{"/events", 0, "POST", route_events},
	{"/feedback", 0, "POST", route_feedback},
	{"/feedback/", 1, "POST", route_feedback},
	{"/sms/inbound", 0, "POST", route_sms_inbound},
	{"/collect", 0, "POST OPTIONS", route_collect},
	{"/onsite", 0, "GET HEAD OPTIONS", route_onsite},
	{"/remarket.js", 0, "GET HEAD", route_script},
	{"/sw.js", 0, "GET HEAD", route_sw},
	{"/push/key", 0, "GET HEAD OPTIONS", route_push_key},
	{"/push/subscribe", 0, "POST OPTIONS", route_push_subscribe},
	{"/p.gif", 0, "GET HEAD", route_pixel},
	{"/tick", 0, "POST", route_tick},
	{"/tick/", 1, "GET HEAD", route_tick_state},
	{"/r/", 1, "GET HEAD", route_recover},
	{"/u/", 1, "GET HEAD POST", route_unsub},
	{"/d/", 1, "GET HEAD", route_discount},
	{"/c/", 1, "GET HEAD POST", route_confirm},
	{"/l/", 1, "GET HEAD", route_link},
	{"/o/", 1, "GET HEAD", route_open},
	{"/discounts/validate", 0, "POST", route_validate},
	{"/report", 0, "GET HEAD", route_report},
	{"/report.json", 0, "GET HEAD", route_report},
	{"/report/carts", 0, "GET HEAD", route_report_carts},
	{"/report/contact", 0, "GET HEAD", route_report_contact},
};

static int method_allowed(const char *methods, const char *m)
{
	size_t n = strlen(m);
	if (!n)
		return 0; /* strstr(p, "") would match forever */
	for (const char *p = methods; (p = strstr(p, m)); p += n)
		if ((p == methods || p[-1] == ' ') && (p[n] == ' ' || !p[n]))
			return 1;
	return 0;
}

static void http_route(struct app *app, const struct http_req *req,
		       struct http_resp *rs, rm_time now)
{
	/* the routes may rely on a method and a path (the front-ends have
	 * validated both; a direct caller may leave them out) */
	struct http_req r1 = *req;
	const struct http_req *rq = &r1;
	const char *path = r1.path = req->path && *req->path ? req->path : "/";
	const char *method = r1.method = req->method && *req->method ? req->method
								     : "GET";
	for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++) {
		const struct route *r = &routes[i];
		size_t n = strlen(r->path);
		if (r->prefix ? strncmp(path, r->path, n) != 0 || !path[n]
			      : strcmp(path, r->path) != 0)
			continue;
		if (!method_allowed(r->methods, method)) {
			buf_adds(&rs->headers, "Allow: ");
			for (const char *m = r->methods; *m; m++)
				buf_adds(&rs->headers, *m == ' ' ? ", " : (char[]){*m, 0});
			buf_adds(&rs->headers, "\r\n");
			return resp_json_error(app, rs, 405, "method not allowed "
					       "here");
		}
		return r->fn(app, rq, rs, path + (r->prefix ? n : 0), now);
	}
	resp_json_error(app, rs, 404, "no such endpoint");
}

/* Routes append to the response without checking each append; a
 * response with a failed buffer is checked here, once, and never sent
 * cut short: it becomes a 500. */
void http_handle(struct app *app, const struct http_req *req,
		 struct http_resp *rs, rm_time now)
{
	http_route(app, req, rs, now);
	if (!buf_failed(&rs->headers) && !buf_failed(&rs->body))
		return;
	fprintf(stderr, "remarket: out of memory building a response; "
		"answered 500\n");
	buf_free(&rs->headers);
	buf_free(&rs->body);
	rs->status = 500;
	rs->content_type = "application/json";
	buf_adds(&rs->body, "{\"error\":\"out of memory\"}");
}

/* ==== FastCGI and CGI front-ends ====================================== */
/*
 * Both front-ends turn a request into struct http_req through the same
 * function, given a way to read parameters and the body. The body is
 * read up to max_body; anything longer is drained and answered 413, so a
 * kept-alive FastCGI connection stays in step. Neither runs a tick on a
 * request: POST /tick hands its run to the background sender (FastCGI)
 * or to a child detached once the answer is out (CGI). In FastCGI mode
 * one writer thread stores the events of every request (group commit,
 * see "The writer" below); a CGI request stores its own.
 */

struct io {
	const char *(*param)(void *ctx, const char *name);
	int (*read)(void *ctx, char *buf, int n);
	void (*write)(void *ctx, const char *data, size_t n);
	void *ctx;
};

static const char *env_param(void *ctx, const char *name)
{
	(void)ctx;
	return getenv(name);
}

static int stdin_read(void *ctx, char *buf, int n)
{
	(void)ctx;
	return (int)fread(buf, 1, (size_t)n, stdin);
}

static void stdout_write(void *ctx, const char *data, size_t n)
{
	(void)ctx;
	fwrite(data, 1, n, stdout);
}

static const char *fcgi_param(void *ctx, const char *name)
{
	return FCGX_GetParam(name, ((FCGX_Request *)ctx)->envp);
}

static int fcgi_read(void *ctx, char *buf, int n)
{
	return FCGX_GetStr(buf, n, ((FCGX_Request *)ctx)->in);
}

static void fcgi_write(void *ctx, const char *data, size_t n)
{
	FCGX_PutStr(data, (int)n, ((FCGX_Request *)ctx)->out);
}

/* ---- the parameters: validated before anything reads them ---- */
/*
 * A CGI/FastCGI parameter is input like a body: anyone who reaches the
 * socket writes them, and any may be missing, empty or hostile. Each one
 * the program reads has a named validator below; serve_one runs them all
 * first and answers 400 with the parameter's name. Parameters not in the
 * table are never read.
 */

/* The methods HTTP defines; the routes then answer 405 for the others. */
static const char *const cgi_methods[] = {"GET", "HEAD", "POST", "OPTIONS",
					  "PUT", "DELETE", "PATCH"};

static int cgi_method_ok(const char *v)
{
	for (size_t i = 0; i < sizeof cgi_methods / sizeof cgi_methods[0]; i++)
		if (!strcmp(v, cgi_methods[i]))
			return 1;
	return 0;
}

/* Empty means "/"; otherwise a path from "/", text, no control chars. */
static int cgi_path_ok(const char *v, size_t max)
{
	return !*v || (*v == '/' && strlen(v) <= max && val_text(v, max));
}

/* A whole number of bytes: digits only, at most 18 of them. */
static int cgi_length_ok(const char *v, size_t max)
{
	size_t n = strspn(v, "0123456789");
	return !v[n] && n <= max;
}

static int cgi_addr_ok(const char *v)
{
	struct ipaddr a;
	return ip_parse(v, &a) == 0;
}

static int cgi_text_ok(const char *v, size_t max)
{
	return strlen(v) <= max && val_text(v, max);
}

enum cgi_check { CGI_METHOD, CGI_PATH, CGI_LENGTH, CGI_ADDR, CGI_TEXT };
static const struct cgi_param {
	const char *name;
	enum cgi_check check;
	size_t max;   /* bytes */
	int required; /* else missing and empty are fine */
	const char *want;
} cgi_params[] = {
	{"REQUEST_METHOD", CGI_METHOD, 7, 1,
	 "one of GET, HEAD, POST, OPTIONS, PUT, DELETE, PATCH"},
	{"PATH_INFO", CGI_PATH, 1024, 0,
	 "a path from / of at most 1024 bytes, no control characters"},
	{"QUERY_STRING", CGI_TEXT, 8192, 0,
	 "at most 8192 bytes of UTF-8 without control characters"},
	{"CONTENT_LENGTH", CGI_LENGTH, 18, 0, "a whole number of bytes"},
	{"CONTENT_TYPE", CGI_TEXT, 256, 0,
	 "at most 256 bytes without control characters"},
	{"REMOTE_ADDR", CGI_ADDR, 64, 0, "an IPv4 or IPv6 address"},
	{"HTTP_X_FORWARDED_FOR", CGI_TEXT, 2048, 0,
	 "at most 2048 bytes without control characters"},
	{"HTTP_AUTHORIZATION", CGI_TEXT, 1024, 0,
	 "at most 1024 bytes without control characters"},
	{"HTTP_X_REMARKET_SIGNATURE", CGI_TEXT, 1024, 0,
	 "at most 1024 bytes without control characters"},
	{"HTTP_X_TWILIO_SIGNATURE", CGI_TEXT, 256, 0,
	 "at most 256 bytes without control characters"},
	{"HTTP_COOKIE", CGI_TEXT, 16384, 0,
	 "at most 16384 bytes without control characters"},
	{"HTTP_ORIGIN", CGI_TEXT, 2048, 0,
	 "at most 2048 bytes without control characters"},
};

static int cgi_param_ok(const struct cgi_param *p, const char *v)
{
	if (!v || !*v)
		return !p->required;
	switch (p->check) {
	case CGI_METHOD: return cgi_method_ok(v);
	case CGI_PATH: return cgi_path_ok(v, p->max);
	case CGI_LENGTH: return cgi_length_ok(v, p->max);
	case CGI_ADDR: return strlen(v) <= p->max && cgi_addr_ok(v);
	case CGI_TEXT: return cgi_text_ok(v, p->max);
	}
	return 0;
}

/* 0 if every parameter passes, else -1 with the message in MSG. */
static int cgi_validate(const struct io *io, char *msg, size_t n)
{
	for (size_t i = 0; i < sizeof cgi_params / sizeof cgi_params[0]; i++) {
		const struct cgi_param *p = &cgi_params[i];
		const char *v = io->param(io->ctx, p->name);
		if (cgi_param_ok(p, v))
			continue;
		snprintf(msg, n, "%s: %s; want %s", p->name,
			 !v ? "missing" : !*v ? "empty" : "invalid", p->want);
		return -1;
	}
	return 0;
}

/* The client's address: REMOTE_ADDR, unless that is one of
 * trusted_proxies; then the right-most address of X-Forwarded-For that is
 * not a trusted proxy (the left-most if all are). Anything to the left of
 * that was written by the client itself and is never believed. */
static void client_addr(const struct config *cfg, const char *remote,
			const char *xff, char *out, size_t n)
{
	struct ipaddr a;
	copy_str(out, n, "unknown"); /* one bucket for "no address given" */
	if (!remote || !*remote || ip_parse(remote, &a) < 0)
		return;
	ip_format(&a, out, n);
	if (!xff || ip_in_list(cfg->trusted_proxies, &a, NULL, NULL) != 1)
		return;
	for (size_t end = strlen(xff); end > 0;) {
		size_t start = end;
		while (start > 0 && xff[start - 1] != ',')
			start--;
		char hop[64];
		const char *p = xff + start;
		size_t len = end - start;
		while (len && (*p == ' ' || *p == '\t'))
			p++, len--;
		while (len && (p[len - 1] == ' ' || p[len - 1] == '\t'))
			len--;
		end = start ? start - 1 : 0;
		if (len >= sizeof hop)
			return; /* not an address: stop at the last proxy */
		memcpy(hop, p, len);
		hop[len] = '\0';
		if (ip_parse(hop, &a) < 0)
			return;
		ip_format(&a, out, n);
		if (ip_in_list(cfg->trusted_proxies, &a, NULL, NULL) != 1)
			return;
	}
}

static int read_body(struct app *app, const struct io *io, struct buf *body,
		     int *too_large)
{
	const char *cl = io->param(io->ctx, "CONTENT_LENGTH");
	long long want = cl && *cl ? strtoll(cl, NULL, 10) : 0;
	long long max = app->cfg->max_body;
	char chunk[16384];
	*too_large = want > max;
	if (want < 0)
		return -1;
	while (want > 0) {
		int n = io->read(io->ctx, chunk, want < (long long)sizeof chunk ?
						   (int)want : (int)sizeof chunk);
		if (n <= 0)
			break;
		want -= n;
		if (!*too_large && buf_add(body, chunk, (size_t)n) < 0)
			return -1;
	}
	return 0;
}

static void write_response(const struct io *io, const struct http_resp *rs,
			   int head_only)
{
	static const char oom_head[] =
		"Status: 500 Internal Server Error\r\n"
		"Content-Type: application/json\r\nContent-Length: 25\r\n"
		"X-Content-Type-Options: nosniff\r\n\r\n",
		oom_body[] = "{\"error\":\"out of memory\"}";
	struct buf h = {0};
	buf_addf(&h, "Status: %d %s\r\n", rs->status, status_text(rs->status));
	if (rs->content_type)
		buf_addf(&h, "Content-Type: %s\r\n", rs->content_type);
	buf_addf(&h, "Content-Length: %zu\r\nX-Content-Type-Options: nosniff\r\n"
		 "%s\r\n", rs->body.len, buf_str(&rs->headers));
	if (buf_failed(&h) || buf_failed(&rs->headers) || buf_failed(&rs->body)) {
		/* nothing allocated: this is what is left when memory is not */
		io->write(io->ctx, oom_head, sizeof oom_head - 1);
		if (!head_only)
			io->write(io->ctx, oom_body, sizeof oom_body - 1);
		buf_free(&h);
		return;
	}
	io->write(io->ctx, h.data, h.len);
	if (!head_only && rs->body.len)
		io->write(io->ctx, rs->body.data, rs->body.len);
	buf_free(&h);
}

/* One request through either front-end: validate the CGI parameters, fill
 * http_req, read the body, route, write the response. */
static void serve_one(struct app *app, const struct io *io)
{
	struct http_req rq = {0};
	struct http_resp rs = {0};
	struct buf body = {0};
	char msg[200], client[64];
	if (cgi_validate(io, msg, sizeof msg) < 0) {
		resp_json_error(app, &rs, 400, msg);
		write_response(io, &rs, 0);
		http_resp_free(&rs);
		return;
	}
	const char *path = io->param(io->ctx, "PATH_INFO");
	rq.method = io->param(io->ctx, "REQUEST_METHOD");
	rq.path = path && *path ? path : "/";
	rq.query = io->param(io->ctx, "QUERY_STRING");
	rq.content_type = io->param(io->ctx, "CONTENT_TYPE");
	rq.authorization = io->param(io->ctx, "HTTP_AUTHORIZATION");
	rq.signature = io->param(io->ctx, "HTTP_X_REMARKET_SIGNATURE");
	rq.twilio_signature = io->param(io->ctx, "HTTP_X_TWILIO_SIGNATURE");
	rq.cookie = io->param(io->ctx, "HTTP_COOKIE");
	rq.origin = io->param(io->ctx, "HTTP_ORIGIN");
	client_addr(app->cfg, io->param(io->ctx, "REMOTE_ADDR"),
		    io->param(io->ctx, "HTTP_X_FORWARDED_FOR"), client,
		    sizeof client);
	rq.remote_addr = client;
	if (read_body(app, io, &body, &rq.body_too_large) < 0) {
		resp_json_error(app, &rs, 400, "body: bad Content-Length");
	} else {
		rq.body = body.data ? body.data : "";
		rq.body_len = body.len;
		http_handle(app, &rq, &rs, clock_now());
	}
	write_response(io, &rs, rq.method && !strcmp(rq.method, "HEAD"));
	http_resp_free(&rs);
	buf_free(&body);
}

/* The parameters come from a NULL-terminated "NAME=value" array, the body
 * from memory, the response goes to a buffer: the fuzz target and the
 * boundary tests drive the front-end's whole path with this. */
struct mem_io {
	const char *const *env;
	const char *body;
	size_t len, off;
	struct buf *out;
};

static const char *mem_param(void *ctx, const char *name)
{
	const struct mem_io *m = ctx;
	size_t n = strlen(name);
	for (const char *const *e = m->env; e && *e; e++)
		if (!strncmp(*e, name, n) && (*e)[n] == '=')
			return *e + n + 1;
	return NULL;
}

static int mem_read(void *ctx, char *buf, int n)
{
	struct mem_io *m = ctx;
	size_t left = m->len - m->off;
	size_t k = (size_t)n < left ? (size_t)n : left;
	memcpy(buf, m->body + m->off, k);
	m->off += k;
	return (int)k;
}

static void mem_write(void *ctx, const char *data, size_t n)
{
	buf_add(((struct mem_io *)ctx)->out, data, n);
}

void http_serve_cgi(struct app *app, const char *const *env, const char *body,
		    size_t len, struct buf *out)
{
	struct mem_io m = {env, body ? body : "", body ? len : 0, 0, out};
	struct io io = {mem_param, mem_read, mem_write, &m};
	serve_one(app, &io);
}

/*
 * The writer: one thread of the FastCGI server, with its own connection,
 * stores the events of every request (group commit). A worker validates
 * its request, queues the events (ev_handoff) and sleeps until the writer
 * has committed them; the writer takes whatever is queued when it wakes
 * (up to WRITER_MAX_REQUESTS requests and about WRITER_MAX_EVENTS
 * events), stores it with ev_store in one transaction and wakes the
 * workers. It never waits for company: one request alone is committed
 * at once, and under load the requests that arrive during a commit make
 * the next batch. A request is answered only after its batch's commit,
 * so an answered event is on disk (WAL) as before.
 */
#define WRITER_MAX_REQUESTS 64
#define WRITER_MAX_EVENTS 1000 /* a batch's transaction stays short */

static struct {
	pthread_mutex_t lock;
	pthread_cond_t wake;
	struct ev_job *head, **tail;
	int state; /* 0 not running, 1 running, 2 draining before a stop */
	long queued, storing, requests, batches;
	pthread_t th;
	struct app app;
} writer = {.lock = PTHREAD_MUTEX_INITIALIZER,
	    .wake = PTHREAD_COND_INITIALIZER};

static int writer_take(struct ev_job *job)
{
	pthread_mutex_lock(&writer.lock);
	if (writer.state != 1) {
		pthread_mutex_unlock(&writer.lock);
		return -1;
	}
	/* a condition of its own: the writer wakes only the workers whose
	 * requests it stored, not every worker waiting */
	pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
	job->wake = &wake;
	job->next = NULL;
	*writer.tail = job;
	writer.tail = &job->next;
	writer.queued++;
	pthread_cond_signal(&writer.wake);
	while (!job->done)
		pthread_cond_wait(&wake, &writer.lock);
	pthread_mutex_unlock(&writer.lock);
	pthread_cond_destroy(&wake);
	return 0;
}

static void *writer_main(void *arg)
{
	(void)arg;
	struct ev_job *batch[WRITER_MAX_REQUESTS];
	pthread_mutex_lock(&writer.lock);
	for (;;) {
		while (!writer.head && writer.state == 1)
			pthread_cond_wait(&writer.wake, &writer.lock);
		if (!writer.head)
			break; /* stopping, and nothing is left to store */
		size_t k = 0, events = 0;
		while (writer.head && k < WRITER_MAX_REQUESTS &&
		       (k == 0 || events + writer.head->n <= WRITER_MAX_EVENTS)) {
			events += writer.head->n;
			batch[k++] = writer.head;
			writer.head = writer.head->next;
		}
		if (!writer.head)
			writer.tail = &writer.head;
		writer.queued -= (long)k;
		writer.storing = (long)k;
		pthread_mutex_unlock(&writer.lock);
		ev_store(&writer.app, batch, k);
		pthread_mutex_lock(&writer.lock);
		for (size_t i = 0; i < k; i++) {
			batch[i]->done = 1;
			pthread_cond_signal(batch[i]->wake);
		}
		writer.storing = 0;
		writer.requests += (long)k;
		writer.batches++;
	}
	pthread_mutex_unlock(&writer.lock);
	return NULL;
}

int ev_writer_start(struct config *cfg, char *err, size_t errlen)
{
	if (writer.state != 0) {
		snprintf(err, errlen, "the event writer is already running");
		return -1;
	}
	if (app_open(&writer.app, cfg, err, errlen) < 0)
		return -1;
	writer.head = NULL;
	writer.tail = &writer.head;
	writer.state = 1;
	if (pthread_create(&writer.th, NULL, writer_main, NULL) != 0) {
		writer.state = 0;
		app_close(&writer.app);
		snprintf(err, errlen, "cannot start the event writer thread");
		return -1;
	}
	ev_handoff = writer_take;
	return 0;
}

void ev_writer_stop(void)
{
	pthread_mutex_lock(&writer.lock);
	int running = writer.state == 1;
	if (running) {
		writer.state = 2; /* new requests store their own events */
		pthread_cond_signal(&writer.wake);
	}
	pthread_mutex_unlock(&writer.lock);
	if (!running)
		return;
	pthread_join(writer.th, NULL); /* after it stored what was queued */
	app_close(&writer.app);
	pthread_mutex_lock(&writer.lock);
	writer.state = 0;
	pthread_mutex_unlock(&writer.lock);
}

void ev_writer_stats(struct ev_writer_stats *st)
{
	pthread_mutex_lock(&writer.lock);
	st->queued = writer.queued;
	st->storing = writer.storing;
	st->requests = writer.requests;
	st->batches = writer.batches;
	pthread_mutex_unlock(&writer.lock);
}

static pthread_mutex_t accept_lock = PTHREAD_MUTEX_INITIALIZER;
static const char *socket_path;

/* Requests accepted and not yet finished: SIGTERM waits for them. */
static struct {
	pthread_mutex_t lock;
	pthread_cond_t idle;
	long busy;
	int stopping;
} inflight = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};

struct worker {
	pthread_t th;
	struct config *cfg;
	int fd;
};

/*
 * Ends a request without libfcgi's lingering close: FCGX_Finish_r shuts
 * the connection down for writing and then waits for the web server to
 * close it, which under load holds a worker for as long as the web server
 * takes to get to it (0.4 ms a request through nginx in bench/run.sh).
 * Read to the end of the request first (its empty stdin record), so that
 * nothing unread is left to turn the close into a reset; then the answer
 * is flushed and the connection closed at once (FCGX_Detach: close
 * without the wait). A kept-alive connection stays open as before.
 */
static void fcgi_finish(FCGX_Request *r)
{
	char rest[512];
	while (FCGX_GetStr(rest, (int)sizeof rest, r->in) > 0)
		;
	FCGX_Detach(r);
	FCGX_Finish_r(r);
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct app app;
	char err[512];
	if (app_open(&app, w->cfg, err, sizeof err) < 0) {
		fprintf(stderr, "remarket: %s\n", err);
		return NULL;
	}
	FCGX_Request r;
	FCGX_InitRequest(&r, w->fd, 0);
	struct io io = {fcgi_param, fcgi_read, fcgi_write, &r};
	for (;;) {
		pthread_mutex_lock(&accept_lock);
		int rc = FCGX_Accept_r(&r);
		if (rc >= 0) { /* counted before on_term can take accept_lock */
			pthread_mutex_lock(&inflight.lock);
			inflight.busy++;
			pthread_mutex_unlock(&inflight.lock);
		}
		pthread_mutex_unlock(&accept_lock);
		if (rc < 0)
			break;
		serve_one(&app, &io);
		fcgi_finish(&r);
		pthread_mutex_lock(&inflight.lock);
		if (--inflight.busy == 0)
			pthread_cond_broadcast(&inflight.idle);
		pthread_mutex_unlock(&inflight.lock);
	}
	app_close(&app);
	return NULL;
}

/*
 * The background sender: one thread of the FastCGI server, with its own
 * connection, runs the ticks that POST /tick starts, so that no request
 * thread ever waits for an SMTP server. It holds at most one run waiting
 * behind the one it is doing; a newer run replaces a waiting one.
 */
static struct {
	pthread_mutex_t lock;
	pthread_cond_t wake;
	int ready;     /* 1: the thread has its connection; -1: it has none */
	int64_t id;    /* the run waiting, or 0 */
	rm_time now;
} sender = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0};

static int sender_take(struct app *app, int64_t id, rm_time now)
{
	pthread_mutex_lock(&sender.lock);
	int ready = sender.ready == 1;
	int64_t replaced = ready ? sender.id : 0;
	if (ready) {
		sender.id = id;
		sender.now = now;
		pthread_cond_broadcast(&sender.wake);
	}
	pthread_mutex_unlock(&sender.lock);
	if (replaced)
		tick_end(app, replaced, NULL, now, "replaced by a later tick before "
			 "it started", NULL);
	return ready ? 0 : -1;
}

static void *sender_main(void *arg)
{
	struct app app;
	char err[512];
	int rc = app_open(&app, arg, err, sizeof err);
	if (rc < 0)
		fprintf(stderr, "remarket: background sender: %s; POST /tick "
			"answers 503\n", err);
	pthread_mutex_lock(&sender.lock);
	sender.ready = rc < 0 ? -1 : 1;
	pthread_cond_broadcast(&sender.wake); /* serve_fd waits for this */
	if (rc < 0) {
		pthread_mutex_unlock(&sender.lock);
		return NULL;
	}
	for (;;) {
		while (!sender.id)
			pthread_cond_wait(&sender.wake, &sender.lock);
		int64_t id = sender.id;
		rm_time now = sender.now;
		sender.id = 0;
		pthread_mutex_unlock(&sender.lock);
		tick_run(&app, id, now, NULL);
		pthread_mutex_lock(&sender.lock);
	}
	return NULL; /* not reached: the server ends with the process */
}

/*
 * SIGTERM and SIGINT are taken by this thread (blocked in all the others):
 * it stops accepting (the listening socket is shut down, so that no new
 * request starts), waits up to 2 s for the requests being answered, and
 * so for their events to be committed by the writer, then ends the
 * process. A run of the background sender is cut short, as it always
 * was: its leases expire and a later tick sends what it had claimed.
 */
struct term_arg {
	sigset_t set;
	int fd; /* the listening socket */
};

static void *on_term(void *arg)
{
	struct term_arg *t = arg;
	int sig = 0;
	sigwait(&t->set, &sig);
	pthread_mutex_lock(&inflight.lock);
	inflight.stopping = 1;
	pthread_mutex_unlock(&inflight.lock);
	if (socket_path)
		unlink(socket_path);
	shutdown(t->fd, SHUT_RDWR); /* wakes the worker blocked in accept */
	pthread_mutex_lock(&accept_lock); /* every accepted request counted */
	pthread_mutex_unlock(&accept_lock);
	struct timespec until;
	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += 2;
	pthread_mutex_lock(&inflight.lock);
	while (inflight.busy > 0 &&
	       pthread_cond_timedwait(&inflight.idle, &inflight.lock, &until) == 0)
		;
	long left = inflight.busy;
	pthread_mutex_unlock(&inflight.lock);
	struct ev_writer_stats st;
	ev_writer_stats(&st);
	fprintf(stderr, "remarket: stopping: ingest stored %ld requests in %ld "
		"commits%s\n", st.requests, st.batches,
		left ? "; requests still running were cut short" : "");
	_exit(0);
}

/* Serves FastCGI on fd (a listening socket) with cfg->threads workers. */
static int serve_fd(struct config *cfg, int fd)
{
	long n = cfg->threads;
	struct worker *w = calloc((size_t)n, sizeof *w);
	if (!w)
		return 1;
	signal(SIGPIPE, SIG_IGN);
	static struct term_arg term;
	sigemptyset(&term.set);
	sigaddset(&term.set, SIGTERM);
	sigaddset(&term.set, SIGINT);
	term.fd = fd;
	pthread_sigmask(SIG_BLOCK, &term.set, NULL); /* every thread inherits */
	pthread_t bg, sig;
	if (pthread_create(&sig, NULL, on_term, &term) != 0) {
		fprintf(stderr, "remarket: cannot start the signal thread\n");
		return 1;
	}
	char err[512];
	if (ev_writer_start(cfg, err, sizeof err) < 0) {
		fprintf(stderr, "remarket: event writer: %s\n", err);
		return 1;
	}
	if (pthread_create(&bg, NULL, sender_main, cfg) != 0) {
		fprintf(stderr, "remarket: cannot start the background sender\n");
		return 1;
	}
	pthread_detach(bg);
	pthread_mutex_lock(&sender.lock); /* no POST /tick before it is ready */
	while (!sender.ready)
		pthread_cond_wait(&sender.wake, &sender.lock);
	pthread_mutex_unlock(&sender.lock);
	tick_handoff = sender_take;
	for (long i = 0; i < n; i++) {
		w[i] = (struct worker){0, cfg, fd};
		if (pthread_create(&w[i].th, NULL, worker_main, &w[i]) != 0) {
			fprintf(stderr, "remarket: cannot start thread %ld\n", i);
			return 1;
		}
	}
	for (long i = 0; i < n; i++)
		pthread_join(w[i].th, NULL);
	free(w);
	pthread_mutex_lock(&inflight.lock);
	int stopping = inflight.stopping;
	pthread_mutex_unlock(&inflight.lock);
	if (stopping) /* SIGTERM shut the socket: on_term ends the process */
		pthread_join(sig, NULL);
	return 1; /* workers only stop when something broke */
}

/* In CGI mode POST /tick leaves its run here; it starts once the answer
 * is written and the request's connection closed. */
static struct {
	int64_t id;
	rm_time now;
} cgi_tick;

static int cgi_tick_take(struct app *app, int64_t id, rm_time now)
{
	(void)app;
	cgi_tick.id = id;
	cgi_tick.now = now;
	return 0;
}

/* Runs the waiting tick in a child detached from the web server (its own
 * session, no pipe of the server's held open, so the server finishes the
 * request now). The parent waits only until the child has written its
 * pid on the run, so that a POST meanwhile sees the run as running. */
static void cgi_tick_detach(struct config *cfg)
{
	int ready[2];
	fflush(stdout);
	if (pipe(ready) < 0)
		return;
	pid_t pid = fork();
	if (pid != 0) {
		close(ready[1]);
		char c;
		if (pid > 0)
			while (read(ready[0], &c, 1) < 0 && errno == EINTR)
				;
		close(ready[0]);
		return; /* on failure the run is lost, and says so */
	}
	close(ready[0]);
	setsid();
	int null = open("/dev/null", O_RDWR);
	if (null >= 0) {
		dup2(null, 0), dup2(null, 1), dup2(null, 2);
		if (null > 2)
			close(null);
	}
	struct app app;
	char err[512];
	if (app_open(&app, cfg, err, sizeof err) == 0) {
		q_exec(app.db, q(app.db, ST_TICK_PID, "ii", cgi_tick.id,
				 (int64_t)getpid()));
		close(ready[1]);
		tick_run(&app, cgi_tick.id, cgi_tick.now, NULL);
		app_close(&app);
	}
	_exit(0);
}

static int serve_cgi(struct config *cfg)
{
	struct app app;
	char err[512];
	if (app_open(&app, cfg, err, sizeof err) < 0) {
		printf("Status: 503 Service Unavailable\r\nContent-Type: text/plain"
		       "\r\n\r\nremarket: %s\n", err);
		return 1;
	}
	struct io io = {env_param, stdin_read, stdout_write, NULL};
	tick_handoff = cgi_tick_take;
	serve_one(&app, &io);
	/* no database connection may cross the fork */
	app_close(&app);
	if (cgi_tick.id)
		cgi_tick_detach(cfg);
	return 0;
}

/* ==== Command line ==================================================== */
/*
 * The operator's commands, one row each in the command table below
 * (commands[]: name, whether it needs the app, arity, function, usage):
 * init, keygen, serve, tick, event, report, flows, import, recommend,
 * products, segments, status, backtest, preview, send-test, feedback,
 * help, version. The table also makes usage(), `help CMD` and `CMD
 * --help`, the options each command takes, and the man
 * app opens its own, so every command, like every FastCGI thread, has
 * its own database connection; one that signs nothing (CMD_READ) opens
 * it without the key when the key cannot be read. Exit codes: 0, 1 for a
 * failure, 2 for a usage error (remarket.8, EXIT STATUS). No output
 * prints smtp_url's password (url_shown).
 */

static int cmd_usage(const char *name);

/* Makes the operator's files private, whatever the umask they were made
 * under: the database and its -wal and -shm, the key file. */
static void init_private_files(const struct config *cfg)
{
	const char *sfx[] = {"", "-wal", "-shm"};
	char path[PATH_MAX];
	for (size_t i = 0; i < sizeof sfx / sizeof sfx[0]; i++) {
		int n = snprintf(path, sizeof path, "%s%s", cfg->db, sfx[i]);
		if (n > 0 && (size_t)n < sizeof path && access(path, F_OK) == 0)
			(void)chmod(path, 0600);
	}
	if (access(cfg->key_file, F_OK) == 0)
		(void)chmod(cfg->key_file, 0600);
}

/* The checks before starting (CHECK_START: the templates of the enabled
 * steps, remarket.js) on DB: -1, each problem said on stderr, when one
 * stops sending. */
static int refuse_to_start(const char *cmd, struct config *cfg, struct db *db)
{
	struct app a;
	struct problems p;
	memset(&a, 0, sizeof a);
	memset(&p, 0, sizeof p);
	a.cfg = cfg;
	a.db = db;
	if (check_run(&a, clock_now(), CHECK_START, NULL, &p, NULL) != CHECK_STOP)
		return 0;
	for (int i = 0; i < p.n; i++)
		fprintf(stderr, "remarket %s: %s\n", cmd, p.line[i]);
	if (p.more)
		fprintf(stderr, "remarket %s: (and %ld more)\n", cmd, p.more);
	fprintf(stderr, "remarket %s: refused to start: fix the above (the "
		"templates and static_dir keys say where the files are; "
		"'remarket status' checks everything)\n", cmd);
	return -1;
}

/* `remarket init`: creates or migrates the database and makes the key file,
 * refusing a new key while sent mails hold links signed with the old one. */
static int cmd_init(struct app *app, struct config *cfg, rm_time now, int argc,
		    char **argv)
{
	(void)app, (void)now; /* no key, no app: init makes them */
	char err[512];
	struct db *db = NULL;
	int new_key = 0;
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--new-key") != 0) {
			fprintf(stderr, "usage: remarket init [--new-key]\n");
			return 2;
		}
		new_key = 1;
	}
	if (db_open(&db, cfg->db, err, sizeof err) < 0 ||
	    db_migrate(db, err, sizeof err) < 0) {
		fprintf(stderr, "remarket init: %s\n", err);
		db_close(db);
		return 1;
	}
	int v = db_user_version(db);
	long long signed_mails = db_scalar_stmt(q(db, ST_KEY_SIGNED, ""));
	if (refuse_to_start("init", cfg, db) < 0) {
		db_close(db);
		return 1;
	}
	db_close(db);
	if (access(cfg->key_file, F_OK) != 0 && signed_mails > 0 && !new_key) {
		fprintf(stderr, "remarket init: key_file %s is missing, but db %s "
			"holds %lld sent mails (messages and confirmation mails) "
			"whose unsubscribe, cart, discount and confirm links were "
			"signed with it. Restore the key file "
			"from a backup (the links keep working), or run 'remarket "
			"init --new-key' to make a new key, knowing that every link "
			"already mailed stops working.\n", cfg->key_file, cfg->db,
			signed_mails);
		return 1;
	}
	if (access(cfg->key_file, F_OK) != 0) {
		unsigned char key[RM_KEYBYTES];
		randombytes_buf(key, sizeof key);
		if (mkdir_parent(cfg->key_file) < 0 ||
		    write_file_atomic(cfg->key_file, (char *)key, sizeof key,
				      0600) < 0) {
			fprintf(stderr, "remarket init: key_file %s: %s\n",
				cfg->key_file, strerror(errno));
			return 1;
		}
		sodium_memzero(key, sizeof key);
		printf("remarket: new signing key in %s (mode 0600)\n", cfg->key_file);
	} else if (new_key) {
		fprintf(stderr, "remarket init: key_file %s exists: --new-key only "
			"replaces a lost key; to add a key, run 'remarket keygen "
			"--rotate'\n", cfg->key_file);
		return 1;
	}
	init_private_files(cfg);
	if (!*cfg->smtp_url && mkdir_p(cfg->outbox, 0700) < 0) {
		fprintf(stderr, "remarket init: outbox %s: %s\n", cfg->outbox,
			strerror(errno));
		return 1;
	}
	char shown[512];
	url_shown(cfg->smtp_url, shown, sizeof shown);
	printf("remarket: database %s at schema %d; mail goes to %s\n", cfg->db, v,
	       *cfg->smtp_url ? shown : cfg->outbox);
	return 0;
}

/* keygen --vapid: the web push key pair in vapid_key_file; its public
 * key alone on stdout (a script may keep it), the rest on stderr. */
static int keygen_vapid(const struct config *cfg)
{
	char pub[100], err[600];
	if (vapid_keygen(cfg->vapid_key_file, pub, sizeof pub, err,
			 sizeof err) < 0) {
		fprintf(stderr, "remarket keygen --vapid: %s\n", err);
		return 1;
	}
	printf("%s\n", pub);
	fprintf(stderr, "remarket: VAPID key pair in %s (mode 0600); the public "
		"key above is served at base_url/push/key for remarket.js%s\n",
		cfg->vapid_key_file, *cfg->vapid_subject ? "" : ". Set vapid_subject "
		"(mailto:you@shop.example) before sending");
	return 0;
}

/* keygen: a new raw key on stdout. keygen --rotate: a new key appended to
 * key_file's ring; it signs from now on, the older ones still verify. */
static int cmd_keygen(struct app *app, struct config *cfg, rm_time now,
		      int argc, char **argv)
{
	(void)app, (void)now;
	unsigned char key[RM_KEYBYTES];
	int rotate = argc == 2 && !strcmp(argv[1], "--rotate");
	if (argc == 2 && !strcmp(argv[1], "--vapid"))
		return keygen_vapid(cfg);
	if (argc > 1 && !rotate) {
		fprintf(stderr, "usage: remarket keygen [--rotate | --vapid]\n");
		return 2;
	}
	randombytes_buf(key, sizeof key);
	if (!rotate) {
		int rc = fwrite(key, 1, sizeof key, stdout) == sizeof key ? 0 : 1;
		sodium_memzero(key, sizeof key);
		return rc;
	}
	char err[512];
	struct buf ring = {0};
	if (load_keys(cfg->key_file, &ring, err, sizeof err) < 0) {
		sodium_memzero(key, sizeof key);
		fprintf(stderr, "remarket keygen --rotate: %s\n", err);
		return 1;
	}
	size_t drop = 0; /* a full ring forgets its oldest key */
	if (ring.len / RM_KEYBYTES >= RM_MAXKEYS)
		drop = ring.len - (RM_MAXKEYS - 1) * RM_KEYBYTES;
	int rc = buf_add(&ring, key, sizeof key);
	sodium_memzero(key, sizeof key);
	if (rc == 0)
		rc = write_file_atomic(cfg->key_file, ring.data + drop,
				       ring.len - drop, 0600);
	size_t n = (ring.len - drop) / RM_KEYBYTES;
	sodium_memzero(ring.data, ring.len);
	buf_free(&ring);
	if (rc < 0) {
		fprintf(stderr, "remarket keygen --rotate: key_file %s: %s — the "
			"old key ring is unchanged\n", cfg->key_file, strerror(errno));
		return 1;
	}
	printf("remarket: key_file %s now holds %zu keys; the new one signs, "
	       "the older ones still verify%s. Restart 'remarket serve'.\n",
	       cfg->key_file, n, drop ? " (the oldest was dropped: the ring "
	       "holds 16)" : "");
	return 0;
}

/* Makes the socket at PATH mode 0660 and of socket_group: only the web
 * server (a member of that group) may send requests, and with them the
 * parameters (REMOTE_ADDR...) remarket believes. With socket_group empty,
 * the group is www-data if it exists, else the group remarket runs as.
 * The group's name goes to GROUP. */
static int socket_give(const struct config *cfg, const char *path, char *group,
		       size_t n)
{
	const char *name = *cfg->socket_group ? cfg->socket_group : "www-data";
	struct group *g = getgrnam(name);
	if (!g && *cfg->socket_group) {
		fprintf(stderr, "remarket serve: socket_group '%s': no such group — "
			"name the web server's group (www-data, nginx, apache)\n", name);
		return -1;
	}
	if (g && chown(path, (uid_t)-1, g->gr_gid) < 0) {
		if (*cfg->socket_group) {
			fprintf(stderr, "remarket serve: socket_group '%s': cannot give "
				"%s to it: %s — run remarket as a member of that "
				"group, or as root\n", name, path, strerror(errno));
			return -1;
		}
		g = NULL; /* the default is only a guess: keep our own group */
	}
	if (!g)
		g = getgrgid(getegid());
	copy_str(group, n, g ? g->gr_name : "?");
	if (chmod(path, 0660) < 0) {
		fprintf(stderr, "remarket serve: chmod 0660 %s: %s\n", path,
			strerror(errno));
		return -1;
	}
	return 0;
}

/* `remarket serve ADDR`: checks the app opens, then runs the FastCGI server
 * on a unix socket or host:port. */
static int cmd_serve(struct app *app, struct config *cfg, rm_time now, int argc,
		     char **argv)
{
	(void)app, (void)now, (void)argc; /* each thread opens its own app */
	const char *addr = argv[1];
	char err[512];
	struct app probe; /* fail fast, with a message, before listening */
	if (app_open(&probe, cfg, err, sizeof err) < 0) {
		fprintf(stderr, "remarket serve: %s\n", err);
		return 1;
	}
	int refused = refuse_to_start("serve", cfg, probe.db);
	app_close(&probe);
	if (refused)
		return 1;
	if (FCGX_Init() != 0) {
		fprintf(stderr, "remarket serve: FCGX_Init failed\n");
		return 1;
	}
	int unix_socket = strchr(addr, ':') == NULL; /* as FCGX_OpenSocket decides */
	/* born 0660 (no window in which others may connect), then given to
	 * socket_group */
	mode_t old = umask(0117);
	int fd = FCGX_OpenSocket(addr, 128);
	umask(old);
	if (fd < 0) {
		fprintf(stderr, "remarket serve: cannot listen on %s: %s\n", addr,
			strerror(errno));
		return 1;
	}
	char group[64] = "";
	if (unix_socket) {
		socket_path = addr;
		if (socket_give(cfg, addr, group, sizeof group) < 0) {
			unlink(addr);
			return 1;
		}
	}
	fprintf(stderr, "remarket: FastCGI on %s%s%s%s, %ld threads\n", addr,
		unix_socket ? " (mode 0660, group " : "", group,
		unix_socket ? ")" : "", cfg->threads);
	return serve_fd(cfg, fd);
}

static rm_time now_arg(int argc, char **argv)
{
	for (int i = 0; i + 1 < argc; i++)
		if (!strcmp(argv[i], "--now"))
			return parse_time(argv[i + 1], clock_now());
	return clock_now();
}

static int cmd_tick(struct app *app, struct config *cfg, rm_time now, int argc,
		    char **argv)
{
	(void)cfg, (void)argc, (void)argv;
	struct buf out = {0};
	int64_t id;
	int running;
	/* the CLI always runs its tick, beside any other: leases keep them
	 * apart; the run is recorded like the HTTP ones */
	if (tick_begin(app, now, "cli", 1, &id, &running) < 0) {
		fprintf(stderr, "remarket tick: failed (database busy or broken)\n");
		return 1;
	}
	int rc = tick_run(app, id, now, &out);
	if (out.len) /* the summary, with its problems, even when it failed */
		printf("%s\n", buf_str(&out));
	if (rc < 0)
		fprintf(stderr, "remarket tick: failed (database busy or broken)\n");
	buf_free(&out);
	return rc == 0 ? 0 : 1;
}

static int cmd_event(struct app *app, struct config *cfg, rm_time now, int argc,
		     char **argv)
{
	(void)cfg, (void)argc, (void)argv;
	struct buf in = {0};
	char chunk[65536];
	size_t n;
	while ((n = fread(chunk, 1, sizeof chunk, stdin)) > 0)
		if (buf_add(&in, chunk, n) < 0)
			break;
	if (buf_failed(&in)) { /* never record a part of what was sent */
		fprintf(stderr, "remarket: event: out of memory reading stdin\n");
		buf_free(&in);
		return 1;
	}
	struct ev_error err;
	struct buf refused = {0};
	int partial = 0;
	for (int i = 1; i < argc; i++)
		partial |= !strcmp(argv[i], "--partial");
	int rc = partial ? ev_ingest_partial(app, EV_CLI, buf_str(&in), in.len,
					     NULL, now, &err, &refused) :
			   ev_ingest(app, EV_CLI, buf_str(&in), in.len, NULL, now, &err);
	buf_free(&in);
	if (rc < 0) {
		buf_free(&refused);
		fprintf(stderr, "remarket event: %s\n", err.msg);
		return 1;
	}
	if (partial)
		printf("{\"accepted\":%d,\"duplicates\":%d,\"refused\":%s}\n", rc,
		       err.duplicates, buf_str(&refused));
	else
		printf("{\"accepted\":%d,\"duplicates\":%d}\n", rc, err.duplicates);
	buf_free(&refused);
	return 0;
}

static const char *arg_value(int argc, char **argv, const char *name)
{
	for (int i = 0; i + 1 < argc; i++)
		if (!strcmp(argv[i], name))
			return argv[i + 1];
	return NULL;
}

/* remarket report --link [--days N]: a URL that opens the report in a
 * browser for N days (default 7), until tick_token changes. */
static int report_link(struct app *app, rm_time now, int argc, char **argv)
{
	const char *d = arg_value(argc, argv, "--days");
	char *end = NULL, tok[TOK_MAXLEN + 1];
	long days = d ? strtol(d, &end, 10) : 7;
	if ((d && (!isdigit((unsigned char)*d) || *end)) || days < 1 || days > 366) {
		fprintf(stderr, "remarket report --link: --days: want 1 to 366\n");
		return 2;
	}
	if (app->nokey) { /* the one form of report that signs */
		fprintf(stderr, "remarket report --link: the link is signed with "
			"the key in key_file %s, which cannot be read: run this as "
			"the user remarket runs as\n", app->cfg->key_file);
		return 1;
	}
	if (tok_sign(app->key, TOK_REPORT, report_subject(app->cfg),
		     now + days * 86400, tok, sizeof tok) < 0)
		return 1;
	printf("%s/report?t=%s\n", app->cfg->base_url, tok);
	return 0;
}

/* `remarket report`: the report as text or JSON, or with --link a signed
 * URL that opens it in a browser. */
static int cmd_report(struct app *app, struct config *cfg, rm_time now,
		      int argc, char **argv)
{
	(void)cfg;
	int link = 0, json = 0, rc = 0;
	for (int i = 1; i < argc; i++)
		link |= !strcmp(argv[i], "--link"), json |= !strcmp(argv[i], "--json");
	const char *a = arg_value(argc, argv, "--since");
	if (link ? json || a : arg_value(argc, argv, "--days") != NULL)
		return cmd_usage(argv[0]); /* the options of the other form */
	if (link)
		return report_link(app, now, argc, argv);
	rm_time since = a ? parse_time(a, now) : now - 30 * 86400;
	if (since < 0 || since > now) {
		fprintf(stderr, "remarket report: --since: want 2026-11-01, Unix "
			"seconds or -30d, before --now\n");
		return 2;
	}
	struct report *r = malloc(sizeof *r);
	struct buf out = {0};
	if (!r || report_build(app, since, now, r) < 0) {
		free(r);
		return 1;
	}
	if (json && report_json(r, &out) < 0) {
		fprintf(stderr, "remarket: out of memory writing the report\n");
		rc = 1;
	} else if (json) {
		printf("%s\n", buf_str(&out));
	} else {
		report_text(r);
	}
	buf_free(&out);
	free(r);
	return rc;
}

static void fmt_delay(char *out, size_t n, long s)
{
	if (s % 86400 == 0 && s)
		snprintf(out, n, "+%ldd", s / 86400);
	else if (s % 3600 == 0 && s)
		snprintf(out, n, "+%ldh", s / 3600);
	else
		snprintf(out, n, "+%lds", s);
}

static void flows_variants(struct app *app, const char *flow)
{
	/* a second statement: FLOWS_LIST is being stepped by the caller */
	sqlite3_stmt *s = q(app->db, ST_VARIANTS_LIST, "t", flow);
	char d[32];
	while (sqlite3_step(s) == SQLITE_ROW) {
		printf("  variant B of step %d for %d %% of contacts:",
		       sqlite3_column_int(s, 0), sqlite3_column_int(s, 4));
		if (*col_text(s, 1))
			printf(" template %s", col_text(s, 1));
		if (sqlite3_column_int64(s, 2) >= 0) {
			fmt_delay(d, sizeof d, (long)sqlite3_column_int64(s, 2));
			printf(" delay %s", d);
		}
		if (sqlite3_column_int(s, 3) >= 0)
			printf(" discount %d%%", sqlite3_column_int(s, 3));
		printf("\n");
	}
	sqlite3_reset(s);
}

/* Steps paused by a tick (the relay refused their content), and why. */
static int flows_paused(struct app *app)
{
	sqlite3_stmt *s = q(app->db, ST_STEPS_PAUSED, NULL);
	while (sqlite3_step(s) == SQLITE_ROW)
		printf("PAUSED %s step %d since %lld: %s\n", col_text(s, 0),
		       sqlite3_column_int(s, 1),
		       (long long)sqlite3_column_int64(s, 2), col_text(s, 3));
	sqlite3_reset(s);
	return 0;
}

/* `remarket flows`: every flow with its steps, variants and state. */
static int flows_list(struct app *app)
{
	sqlite3_stmt *s = q(app->db, ST_FLOWS_LIST, NULL);
	char last[64] = "", d[32], v[32];
	while (sqlite3_step(s) == SQLITE_ROW) {
		if (strcmp(last, col_text(s, 0)) != 0) {
			copy_str(last, sizeof last, col_text(s, 0));
			printf("%s (%s, %d %% held out)\n", last,
			       sqlite3_column_int(s, 1) ? "enabled" : "disabled",
			       sqlite3_column_int(s, 8));
			flows_variants(app, last);
		}
		fmt_delay(d, sizeof d, (long)sqlite3_column_int64(s, 3));
		printf("  step %d  %-5s  %-16s", sqlite3_column_int(s, 2), d,
		       col_text(s, 4));
		if (sqlite3_column_int(s, 5)) {
			double min = sqlite3_column_double(s, 7);
			fmt_delay(v, sizeof v, (long)sqlite3_column_int64(s, 6));
			printf("  %d%% off, valid %s, min spend ", sqlite3_column_int(s, 5),
			       v + 1);
			if (min < 0)
				printf("the customer's median order (else the "
				       "store's), rounded down to a round price");
			else
				printf("%.2f", min);
		}
		const char *seg = col_text(s, 9);
		if (*seg)
			printf("  %s %s", *seg == '!' ? "not for" : "only for",
			       seg + (*seg == '!'));
		if (strcmp(col_text(s, 10), "email") != 0)
			printf("  by %s", col_text(s, 10));
		printf("\n");
	}
	sqlite3_reset(s);
	return flows_paused(app);
}

/* The key=value settings of `flows set` and `flows variant`: each key is
 * also the name of the statement parameter it binds (":delay"), and has a
 * kind that says how its value is checked. */
enum set_kind { SET_DELAY, SET_SPAN, SET_TEMPLATE, SET_PCT, SET_SHARE,
		SET_MONEY, SET_SEGMENT, SET_CHANNELS };
struct setting {
	const char *key;
	enum set_kind kind;
};

/* The index of the statement's parameter ":NAME", 0 if it has none. */
static int param_index(sqlite3_stmt *s, const char *name)
{
	char p[64];
	int n = snprintf(p, sizeof p, ":%s", name);
	if (n < 0 || (size_t)n >= sizeof p)
		return 0;
	return sqlite3_bind_parameter_index(s, p);
}

/* Binds the value V of one `flows set` setting to its named parameter,
 * checked by its kind; -1 if the value is bad. */
static int bind_setting(sqlite3_stmt *s, const struct setting *st, const char *v)
{
	int param = param_index(s, st->key);
	if (!param)
		abort(); /* a setting the statement does not take: our bug */
	char plus[64];
	snprintf(plus, sizeof plus, "+%s", v); /* 24h, 2d, 3600 */
	rm_time t = parse_time(plus, 0);
	char *end;
	double d = strtod(v, &end);
	int num = *v && !*end && isfinite(d);
	switch (st->kind) {
	case SET_DELAY:
	case SET_SPAN:
		if (t < 0 || (st->kind == SET_SPAN && t == 0))
			return -1;
		return sqlite3_bind_int64(s, param, t);
	case SET_TEMPLATE:
		return val_ident(v, 64) ? sqlite3_bind_text(s, param, v, -1,
							  SQLITE_TRANSIENT) : -1;
	case SET_PCT:
	case SET_SHARE:
		if (!num || d != (int)d || d < (st->kind == SET_PCT ? 0 : 1) ||
		    d > (st->kind == SET_PCT ? 90 : 99))
			return -1;
		return sqlite3_bind_int(s, param, (int)d);
	case SET_MONEY:
		return num && d >= 0 ? sqlite3_bind_double(s, param, d) : -1;
	case SET_SEGMENT:
		return segment_name_ok(v) ? sqlite3_bind_text(s, param, v, -1,
							     SQLITE_TRANSIENT) : -1;
	case SET_CHANNELS:
		return channels_ok(v) ? sqlite3_bind_text(s, param, v, -1,
							  SQLITE_TRANSIENT) : -1;
	}
	return -1;
}

/* The checks of a `flows set` value beyond its form: a template that
 * is there and parses, a delay within the links' life. 0, or 1 with the
 * reason said. */
static int setting_refused(struct app *app, const char *what,
			   const struct setting *st, const char *v)
{
	if (st->kind == SET_TEMPLATE && val_ident(v, 64)) {
		struct check_out o;
		memset(&o, 0, sizeof o);
		check_template(app->cfg->templates, v, "flows set", &o);
		for (int i = 0; i < o.lines.n; i++)
			fprintf(stderr, "remarket flows %s: template=%s: %s\n", what,
				v, o.lines.line[i]);
		return o.lines.n > 0;
	}
	char plus[64];
	snprintf(plus, sizeof plus, "+%s", v);
	rm_time t = parse_time(plus, 0);
	if (st->kind == SET_DELAY && t > (rm_time)RECOVER_LINK_DAYS * 86400) {
		fprintf(stderr, "remarket flows %s: delay=%s: longer than the "
			"links live (%d days): the sequence's earlier mails would "
			"hold dead links by then\n", what, v, RECOVER_LINK_DAYS);
		return 1;
	}
	return 0;
}

/* After a change: a step with a discount whose template never shows
 * the code is said (a warning: the link may still apply it). */
static void discount_shown(struct app *app, const char *what, const char *flow,
			   int step, int variant)
{
	sqlite3_stmt *s = q(app->db, ST_STEP_OFFER, "tii", flow, (int64_t)step,
			    (int64_t)variant);
	if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_int(s, 1) > 0 &&
	    !mc_template_uses(app, col_text(s, 0), "discount_code"))
		fprintf(stderr, "remarket flows %s: warning: %s step %d gives %d %% "
			"off, but template %s shows no {{discount_code}}: the "
			"shopper never sees the code\n", what, flow, step,
			sqlite3_column_int(s, 1), col_text(s, 0));
	sqlite3_reset(s);
}

/* Binds FLOW and STEP, then each key=value; runs the statement, which
 * must change one row. */
static int flows_apply(struct app *app, enum stmt_id id, const char *what,
		       const struct setting *set, size_t nset, const char *help,
		       int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: remarket flows %s FLOW STEP %s\n", what, help);
		return 2;
	}
	for (int i = 2; i < argc; i++) { /* before anything is bound */
		const char *eq = strchr(argv[i], '=');
		for (size_t k = 0; eq && k < nset; k++)
			if (strlen(set[k].key) == (size_t)(eq - argv[i]) &&
			    !strncmp(argv[i], set[k].key, (size_t)(eq - argv[i])) &&
			    setting_refused(app, what, &set[k], eq + 1))
				return 1;
	}
	sqlite3_stmt *s = q(app->db, id, NULL);
	sqlite3_bind_text(s, param_index(s, "flow"), argv[0], -1,
			  SQLITE_TRANSIENT);
	sqlite3_bind_int64(s, param_index(s, "step"), atoi(argv[1]));
	for (int i = 2; i < argc; i++) {
		const char *eq = strchr(argv[i], '=');
		const struct setting *st = NULL;
		for (size_t k = 0; eq && k < nset; k++)
			if (strlen(set[k].key) == (size_t)(eq - argv[i]) &&
			    !strncmp(argv[i], set[k].key, (size_t)(eq - argv[i])))
				st = &set[k];
		if (!st || bind_setting(s, st, eq + 1) != SQLITE_OK) {
			fprintf(stderr, "remarket flows %s: bad setting '%s' (%s)\n",
				what, argv[i], help);
			sqlite3_reset(s);
			return 2;
		}
	}
	if (q_exec(app->db, s) < 0 || sqlite3_changes(app->db->h) != 1) {
		fprintf(stderr, "remarket flows %s: no step %s of flow %s\n", what,
			argv[1], argv[0]);
		return 1;
	}
	discount_shown(app, what, argv[0], atoi(argv[1]), id == ST_VARIANT_SET);
	return flows_list(app);
}

/* remarket flows set FLOW STEP delay=24h template=x discount=15 valid=48h
 * min_spend=50 segment=vip channel=sms,email */
static int flows_set(struct app *app, int argc, char **argv)
{
	static const struct setting set[] = {
		{"delay", SET_DELAY}, {"template", SET_TEMPLATE},
		{"discount", SET_PCT}, {"valid", SET_SPAN},
		{"min_spend", SET_MONEY}, {"segment", SET_SEGMENT},
		{"channel", SET_CHANNELS},
	};
	return flows_apply(app, ST_STEP_SET, "set", set, sizeof set / sizeof set[0],
			   "delay=24h template=NAME discount=0-90 valid=48h "
			   "min_spend=N segment=vip|!vip|... (empty: all) "
			   "channel=email|sms|sms,email", argc, argv);
}

/* remarket flows variant FLOW STEP template=x delay=2h discount=15
 * valid=48h share=50 | off */
static int flows_variant(struct app *app, int argc, char **argv)
{
	static const struct setting set[] = {
		{"template", SET_TEMPLATE}, {"delay", SET_DELAY},
		{"discount", SET_PCT}, {"valid", SET_SPAN},
		{"share", SET_SHARE},
	};
	if (argc == 3 && !strcmp(argv[2], "off")) {
		if (q_exec(app->db, q(app->db, ST_VARIANT_OFF, "ti", argv[0],
				      (int64_t)atoi(argv[1]))) < 0)
			return 1;
		return flows_list(app);
	}
	return flows_apply(app, ST_VARIANT_SET, "variant", set,
			   sizeof set / sizeof set[0], "template=NAME delay=2h "
			   "discount=0-90 valid=48h share=1-99 | off", argc, argv);
}

/* `remarket flows ...`: lists the flows, or changes one (set, enable,
 * disable, holdout, variant, resume). */
static int cmd_flows(struct app *app, struct config *cfg, rm_time now, int argc,
		     char **argv)
{
	(void)cfg, (void)now;
	argc--, argv++; /* the words after "flows" */
	if (argc == 0)
		return flows_list(app);
	if (!strcmp(argv[0], "variant"))
		return flows_variant(app, argc - 1, argv + 1);
	if (!strcmp(argv[0], "holdout") && argc == 3) {
		char *end;
		long pct = strtol(argv[2], &end, 10);
		if (!isdigit((unsigned char)*argv[2]) || *end || pct > 50 ||
		    q_exec(app->db, q(app->db, ST_FLOW_HOLDOUT, "ti", argv[1],
				      (int64_t)pct)) < 0 ||
		    sqlite3_changes(app->db->h) != 1) {
			fprintf(stderr, "remarket flows holdout: want a flow name and "
				"0-50 (percent)\n");
			return 1;
		}
		return flows_list(app);
	}
	if (!strcmp(argv[0], "set"))
		return flows_set(app, argc - 1, argv + 1);
	if (!strcmp(argv[0], "resume") && argc == 3) {
		if (q_exec(app->db, q(app->db, ST_STEP_RESUME, "ti", argv[1],
				      (int64_t)atoi(argv[2]))) < 0 ||
		    sqlite3_changes(app->db->h) != 1) {
			fprintf(stderr, "remarket flows resume: %s step %s is not "
				"paused (remarket flows lists the paused steps)\n",
				argv[1], argv[2]);
			return 1;
		}
		return flows_list(app);
	}
	if ((!strcmp(argv[0], "enable") || !strcmp(argv[0], "disable")) && argc == 2) {
		if (q_exec(app->db, q(app->db, ST_FLOW_ENABLE, "ti", argv[1],
				      (int64_t)(argv[0][0] == 'e'))) < 0 ||
		    sqlite3_changes(app->db->h) != 1) {
			fprintf(stderr, "remarket flows: no flow %s\n", argv[1]);
			return 1;
		}
		return flows_list(app);
	}
	fprintf(stderr, "usage: remarket flows [set FLOW STEP k=v... | enable F | "
		"disable F | holdout F PCT | variant F STEP k=v... | variant F STEP off |\n"
		"        resume F STEP]\n");
	return 2;
}

static int cmd_import(struct app *app, struct config *cfg, rm_time now,
		      int argc, char **argv)
{
	(void)cfg;
	FILE *rej = NULL;
	const char *rejname = arg_value(argc, argv, "--rejects");
	int dry = 0;
	for (int i = 3; i < argc; i++) /* cmd_run put the options after */
		dry |= !strcmp(argv[i], "--dry-run");
	if (argc < 3 || (strcmp(argv[1], "products") && strcmp(argv[1], "orders")) ||
	    (rejname && strcmp(argv[1], "orders")))
		return cmd_usage(argv[0]);
	if (rejname && !(rej = fopen(rejname, "w"))) {
		fprintf(stderr, "remarket import: %s: %s\n", rejname, strerror(errno));
		return 1;
	}
	FILE *f = fopen(argv[2], "r");
	if (!f) {
		fprintf(stderr, "remarket import: %s: %s\n", argv[2], strerror(errno));
		if (rej)
			fclose(rej);
		return 1;
	}
	int rc = import_file(app, argv[1][0] == 'o', f, now, argv[2], rej, dry);
	fclose(f);
	if (rej && fclose(rej) != 0) {
		fprintf(stderr, "remarket import: %s: %s\n", rejname, strerror(errno));
		rc = 1;
	}
	return rc;
}

static int cmd_recommend(struct app *app, struct config *cfg, rm_time now,
			 int argc, char **argv)
{
	(void)cfg, (void)now;
	char skus[16][65], *end = NULL;
	long want = argc > 2 ? strtol(argv[2], &end, 10) : 3;
	if (argc < 2 || !val_email(argv[1]) || (end && *end) || want < 1 ||
	    want > 16)
		return cmd_usage(argv[0]);
	sqlite3_stmt *s = q(app->db, ST_CONTACT_ID, "t", argv[1]);
	int64_t contact = scalar_id(app->db, s);
	int n = reco_for(app, contact, skus, (int)want);
	for (int i = 0; i < n; i++)
		printf("%s\n", skus[i]);
	return n < 0;
}

/* ---- preview and send-test: a template as a person will see it ---- */

/* The options of preview and send-test after their fixed words: --email
 * ADDR, --trigger T, --out DIR (preview only) and --now T (read by
 * cmd_run). 0, or the exit code of a wrong command line. */
struct preview_opts {
	const char *email, *trigger, *out;
};
static int preview_args(int argc, char **argv, int first, int out_ok,
			struct preview_opts *o)
{
	for (int i = first; i < argc; i += 2) {
		const char *a = argv[i];
		const char **slot = !strcmp(a, "--email") ? &o->email :
				    !strcmp(a, "--trigger") ? &o->trigger :
				    !strcmp(a, "--out") && out_ok ? &o->out : NULL;
		if (!strcmp(a, "--now") && i + 1 < argc)
			continue;
		if (!slot || i + 1 >= argc)
			return cmd_usage(argv[0]);
		*slot = argv[i + 1];
	}
	return 0;
}

/* Writes DIR/NAME.EXT (0600; the directory 0700: a preview may hold a
 * real person's cart). */
static int preview_write(const char *dir, const char *name, const char *ext,
			 const struct buf *b)
{
	char path[PATH_MAX];
	int n = snprintf(path, sizeof path, "%s/%s.%s", dir, name, ext);
	if (n < 0 || (size_t)n >= sizeof path || mkdir_p(dir, 0700) < 0 ||
	    write_file_atomic(path, b->data, b->len, 0600) < 0) {
		fprintf(stderr, "remarket preview: %s/%s.%s: %s\n", dir, name, ext,
			n < 0 || (size_t)n >= sizeof path ? "path too long" :
			strerror(errno));
		return -1;
	}
	return 0;
}

/* remarket preview TEMPLATE [--email ADDR] [--trigger T] [--out DIR]:
 * DIR/TEMPLATE.eml (the whole message) and DIR/TEMPLATE.html (its HTML
 * part, to open in a browser); the text part on stdout. */
/* remarket preview NAME.sms: the line as it would go, then how it
 * travels (GSM-7 or UCS-2, its length and segments: each one is billed). */
static int preview_sms(struct app *app, const char *file,
		       const struct preview_opts *o, rm_time now)
{
	char tpl[80], err[512];
	struct buf text = {0};
	struct sms_count c;
	snprintf(tpl, sizeof tpl, "%.*s", (int)(strlen(file) - 4), file);
	int rc = 1;
	if (sms_preview(app, tpl, o->trigger, o->email, now, &text, err,
			sizeof err) < 0)
		fprintf(stderr, "remarket preview: %s\n", err);
	else if (sms_segments(buf_str(&text), &c) < 0)
		fprintf(stderr, "remarket preview: %s.sms: not UTF-8\n", tpl);
	else {
		printf("%s\n", buf_str(&text));
		printf("-- %s: %zu %s, %d segment%s (%s a segment, %s each when "
		       "several)\n", c.ucs2 ? "UCS-2" : "GSM-7", c.units,
		       c.ucs2 ? "UTF-16 units" : "septets", c.segments,
		       c.segments == 1 ? "" : "s", c.ucs2 ? "70" : "160",
		       c.ucs2 ? "67" : "153");
		rc = 0;
	}
	buf_free(&text);
	return rc;
}

static int cmd_preview(struct app *app, struct config *cfg, rm_time now,
		       int argc, char **argv)
{
	(void)cfg;
	struct preview_opts o = {NULL, NULL, "./remarket-preview"};
	int rc = preview_args(argc, argv, 2, 1, &o);
	if (rc)
		return rc;
	const char *tpl = argv[1];
	struct buf text = {0}, html = {0}, msg = {0};
	char err[512];
	size_t tn = strlen(tpl);
	if (tn > 4 && !strcmp(tpl + tn - 4, ".sms"))
		return preview_sms(app, tpl, &o, now);
	rc = 1;
	if (mail_preview(app, tpl, o.trigger, o.email, NULL, now, "", &text,
			 &html, &msg, err, sizeof err) < 0)
		fprintf(stderr, "remarket preview: %s\n", err);
	else if (preview_write(o.out, tpl, "eml", &msg) == 0 &&
		 preview_write(o.out, tpl, "html", &html) == 0) {
		fputs(text.data, stdout);
		fprintf(stderr, "remarket preview: %s/%s.eml and %s/%s.html "
			"(for %s)\n", o.out, tpl, o.out, tpl,
			o.email ? o.email : "a sample contact");
		rc = 0;
	}
	buf_free(&text);
	buf_free(&html);
	buf_free(&msg);
	return rc;
}

/* Hands a test mail to the relay, or writes it to the outbox as
 * test-TEMPLATE-NOW.eml (never mNNNNNN.eml: no message has its number). */
static int send_test_deliver(struct app *app, const char *tpl, const char *to,
			     rm_time now, const struct buf *msg, char *err,
			     size_t errlen)
{
	char from[320];
	if (*app->cfg->smtp_url) /* a test has no message: the from address */
		return verp_sender(app, 0, from, sizeof from) == 0 &&
		       smtp_send(app, from, to, msg, err, errlen) == SEND_OK ? 0 : -1;
	char path[PATH_MAX];
	int n = snprintf(path, sizeof path, "%s/test-%s-%lld.eml",
			 app->cfg->outbox, tpl, (long long)now);
	if (n < 0 || (size_t)n >= sizeof path || mkdir_p(app->cfg->outbox, 0700) < 0 ||
	    write_file_atomic(path, msg->data, msg->len, 0600) < 0) {
		snprintf(err, errlen, "outbox %s: %s", app->cfg->outbox,
			 n < 0 || (size_t)n >= sizeof path ? "path too long" :
			 strerror(errno));
		return -1;
	}
	return 0;
}

/* push-test EMAIL: a "[TEST]" notification to each of the contact's push
 * subscriptions (a browser gone is deleted, as when a flow sends). */
static int cmd_push_test(struct app *app, struct config *cfg, rm_time now,
			 int argc, char **argv)
{
	(void)now, (void)argc;
	int64_t ids[64];
	int n = 0, sent = 0;
	sqlite3_stmt *s = q(app->db, ST_PUSH_CONTACT_SUBS, "t", argv[1]);
	while (n < 64 && sqlite3_step(s) == SQLITE_ROW)
		ids[n++] = sqlite3_column_int64(s, 0);
	sqlite3_reset(s);
	if (!n) {
		fprintf(stderr, "remarket push-test: %s has no push subscription "
			"(the store calls remarket('pushPrompt') after an "
			"add-to-cart)\n", argv[1]);
		return 1;
	}
	char title[200];
	snprintf(title, sizeof title, "[TEST] %s", *cfg->store_name ?
		 cfg->store_name : "remarket");
	for (int i = 0; i < n; i++) {
		char err[1200] = "";
		int rc = push_send(app, ids[i], title, "Web push works: this is "
				   "how the store's notifications look.",
				   cfg->store_url, err, sizeof err);
		if (rc == 0)
			sent++;
		printf("subscription %lld: %s\n", (long long)ids[i],
		       rc == 0 ? "sent" : err);
	}
	return sent ? 0 : 1;
}

/* remarket send-test TEMPLATE ADDR [--email CONTACT] [--trigger T]: one
 * mail through the relay (or the outbox), "[TEST] " before its subject
 * and X-Remarket-Test: yes among its headers, recorded nowhere. */
static int cmd_send_test(struct app *app, struct config *cfg, rm_time now,
			 int argc, char **argv)
{
	struct preview_opts o = {NULL, NULL, NULL};
	int rc = preview_args(argc, argv, 3, 0, &o);
	if (rc)
		return rc;
	const char *tpl = argv[1], *to = argv[2];
	if (!val_email(to)) {
		fprintf(stderr, "remarket send-test: '%s' is not an email address\n",
			to);
		return 2;
	}
	struct buf text = {0}, html = {0}, built = {0}, msg = {0};
	char err[1024];
	rc = 1;
	if (mail_preview(app, tpl, o.trigger, o.email, to, now, "[TEST] ", &text,
			 &html, &built, err, sizeof err) < 0) {
		fprintf(stderr, "remarket send-test: %s\n", err);
		goto out;
	}
	/* a header of its own, before mail_build's: filters can sort tests */
	buf_adds(&msg, "X-Remarket-Test: yes\r\n");
	buf_add(&msg, built.data, built.len);
	if (buf_failed(&msg))
		fprintf(stderr, "remarket send-test: out of memory\n");
	else if (send_test_deliver(app, tpl, to, now, &msg, err, sizeof err) < 0)
		fprintf(stderr, "remarket send-test: %s\n", err);
	else {
		printf("remarket: test of %s sent to %s %s %s\n", tpl, to,
		       *cfg->smtp_url ? "through" : "into the outbox",
		       *cfg->smtp_url ? "the relay" : cfg->outbox);
		rc = 0;
	}
out:
	buf_free(&text);
	buf_free(&html);
	buf_free(&built);
	buf_free(&msg);
	return rc;
}

/* People and personal data. `contact` and `export` print one person's rows
 * (PERSON_JSON; export adds the events' bodies); `unsubscribe` does what
 * the mail's link does; `suppress` stops or allows mail to an address;
 * `forget` erases a person (see cmd_forget). */
static int person_id(struct app *app, const char *cmd, const char *email,
		     int64_t *id)
{
	*id = val_email(email) ? scalar_id(app->db, q(app->db, ST_CONTACT_ID, "t",
						      email)) : 0;
	if (!*id)
		fprintf(stderr, "remarket %s: no contact '%s' (an address seen in "
			"an event or an import)\n", cmd, email);
	return *id ? 0 : 1;
}

static int cmd_contact(struct app *app, struct config *cfg, rm_time now,
		       int argc, char **argv)
{
	(void)cfg, (void)now;
	/* cmd_run put the address first, the options after it */
	int export = !strcmp(argv[0], "export");
	int json = export || (argc == 3 && !strcmp(argv[2], "--json"));
	const char *email = argv[1];
	(void)argc;
	int64_t id;
	if (person_id(app, argv[0], email, &id))
		return 1;
	struct db *db = app->db;
	sqlite3_stmt *s = q(db, ST_PERSON_JSON, "ti", email, (int64_t)export);
	if (sqlite3_step(s) != SQLITE_ROW) {
		sqlite3_reset(s);
		fprintf(stderr, "remarket %s: %s\n", argv[0], sqlite3_errmsg(db->h));
		return 1;
	}
	if (json) {
		printf("%s\n", (const char *)sqlite3_column_text(s, 0));
		sqlite3_reset(s);
		return 0;
	}
	sqlite3_stmt *l = q(db, ST_PERSON_LINES, "t",
			    (const char *)sqlite3_column_text(s, 0));
	sqlite3_reset(s);
	while (sqlite3_step(l) == SQLITE_ROW)
		printf("%-28s %s\n", (const char *)sqlite3_column_text(l, 0),
		       (const char *)sqlite3_column_text(l, 1));
	sqlite3_reset(l);
	return 0;
}

static int cmd_unsubscribe(struct app *app, struct config *cfg, rm_time now,
			   int argc, char **argv)
{
	(void)cfg, (void)argc;
	int64_t id;
	if (person_id(app, argv[0], argv[1], &id))
		return 1;
	struct db *db = app->db;
	if (db_begin(db) ||
	    q_exec(db, q(db, ST_UNSUBSCRIBE, "ii", id, (int64_t)now)) ||
	    q_exec(db, q(db, ST_EXIT_CONTACT, "it", id, "unsubscribe")) ||
	    db_commit(db)) {
		db_rollback(db);
		return 1;
	}
	printf("%s: unsubscribed\n", argv[1]);
	return 0;
}

/* The largest mail `remarket feedback` reads: the report's parts come
 * first, so a longer mail loses only the tail of the returned message. */
#define FB_MAX_MAIL (4 << 20)

/* One mail on stdin: a bounce, a complaint or a mailed unsubscribe. Its
 * exit codes are a mail delivery agent's: 0 done or left alone (a line
 * says which), 75 (EX_TEMPFAIL) when it could not be stored, so that
 * Postfix or fetchmail keeps the mail and tries again. */
static int cmd_feedback(struct app *app, struct config *cfg, rm_time now,
			int argc, char **argv)
{
	(void)cfg;
	const char *rcpt = getenv("RECIPIENT"); /* Postfix local(8) sets it */
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--now"))
			i++;
		else
			rcpt = argv[i];
	}
	struct buf mail = {0};
	char chunk[65536], why[400];
	size_t n;
	while ((n = fread(chunk, 1, sizeof chunk, stdin)) > 0) /* read it all */
		if (mail.len < FB_MAX_MAIL)
			buf_add(&mail, chunk, n < FB_MAX_MAIL - mail.len ? n :
					      FB_MAX_MAIL - mail.len);
	if (ferror(stdin) || buf_failed(&mail)) {
		fprintf(stderr, "remarket feedback: could not read the mail on "
			"stdin; try again later\n");
		buf_free(&mail);
		return 75;
	}
	struct fb_event ev;
	fb_mail_parse(app, mail.data ? mail.data : "", mail.len, rcpt, &ev, why,
		      sizeof why);
	buf_free(&mail);
	if (ev.kind == FB_NONE) {
		printf("remarket feedback: left alone: %s\n", why);
		return 0;
	}
	int rc = fb_apply(app, &ev, now, why, sizeof why);
	if (rc < 0) {
		fprintf(stderr, "remarket feedback: %s; try again later\n", why);
		return 75;
	}
	printf("remarket feedback: %s%s\n", rc ? "left alone: " : "", why);
	return 0;
}

static int cmd_suppress(struct app *app, struct config *cfg, rm_time now,
			int argc, char **argv)
{
	(void)cfg;
	struct db *db = app->db;
	if (argc == 2 && !strcmp(argv[1], "list")) {
		sqlite3_stmt *s = q(db, ST_SUPPRESSED_LIST, NULL);
		while (sqlite3_step(s) == SQLITE_ROW)
			printf("%s\t%lld\t%s\n", (const char *)sqlite3_column_text(s, 0),
			       (long long)sqlite3_column_int64(s, 1),
			       (const char *)sqlite3_column_text(s, 2));
		sqlite3_reset(s);
		return 0;
	}
	int add = argc == 3 && !strcmp(argv[1], "add");
	if (!add && !(argc == 3 && !strcmp(argv[1], "remove")))
		return cmd_usage(argv[0]);
	int64_t id;
	if (person_id(app, argv[0], argv[2], &id))
		return 1;
	/* remove is the explicit act that lifts a forgotten address too */
	int rc = db_begin(db);
	for (int k = 0; !add && !rc && k <= app->nold; k++) {
		char hex[2 * 32 + 1];
		forgotten_hash(app, argv[2], k, hex);
		rc = q_exec(db, q(db, ST_FORGOTTEN_DEL, "t", hex));
	}
	rc = rc ||
		 (add ? q_exec(db, q(db, ST_SUPPRESS, "iit", id, (int64_t)now,
				     "manual")) ||
			q_exec(db, q(db, ST_EXIT_CONTACT, "it", id, "suppressed"))
		      : q_exec(db, q(db, ST_UNSUPPRESS, "i", id))) ||
		 db_commit(db);
	if (rc) {
		db_rollback(db);
		return 1;
	}
	printf("%s: %s\n", argv[2], add ? "suppressed" : "no longer suppressed");
	return 0;
}

/* `remarket forget EMAIL`: in one transaction the contact row keeps its id
 * (orders and messages point at it, so the report's counts and revenue stay
 * right) and loses its address, name and consent; events naming the
 * address lose their bodies; its visitors (cookies) go; carts lose their
 * browser; messages their errors; it leaves the segments; the outbox files
 * of its messages are deleted; and the keyed hash of the address is kept
 * (see forgotten_suppress). */
static int cmd_forget(struct app *app, struct config *cfg, rm_time now,
		      int argc, char **argv)
{
	(void)argc;
	int64_t id;
	if (person_id(app, argv[0], argv[1], &id))
		return 1;
	struct db *db = app->db;
	char hex[2 * 32 + 1];
	forgotten_hash(app, argv[1], 0, hex);
	struct buf files = {0};
	int rc = db_begin(db) ||
		 q_exec(db, q(db, ST_FORGET_EVENTS, "t", argv[1])) ||
		 q_exec(db, q(db, ST_PUSH_FORGET, "i", id)) ||
		 q_exec(db, q(db, ST_FORGET_VISITORS, "i", id)) ||
		 q_exec(db, q(db, ST_FORGET_CARTS, "i", id)) ||
		 q_exec(db, q(db, ST_EXIT_CONTACT, "it", id, "forgotten")) ||
		 q_exec(db, q(db, ST_FORGET_SEGMENTS, "i", id)) ||
		 q_exec(db, q(db, ST_FORGET_PENDING, "i", id)) ||
		 q_exec(db, q(db, ST_FORGET_DIRTY, "i", id)) ||
		 q_exec(db, q(db, ST_FORGET_BROWSE, "i", id)) ||
		 q_exec(db, q(db, ST_FORGET_CONTACT, "ii", id, (int64_t)now)) ||
		 q_exec(db, q(db, ST_FORGOTTEN_ADD, "ti", hex, (int64_t)now));
	if (!rc) {
		sqlite3_stmt *s = q(db, ST_FORGET_MESSAGES, "i", id);
		while (sqlite3_step(s) == SQLITE_ROW)
			buf_addf(&files, "%s/m%06lld.eml", cfg->outbox,
				 (long long)sqlite3_column_int64(s, 0)),
				buf_add(&files, "", 1);
		rc = sqlite3_reset(s) != SQLITE_OK || buf_failed(&files) ||
		     db_commit(db);
	}
	if (rc) {
		db_rollback(db);
		buf_free(&files);
		fprintf(stderr, "remarket forget: nothing was changed\n");
		return 1;
	}
	/* after the commit: a file left by a crash here is named by no row */
	for (size_t at = 0; at < files.len; at += strlen(files.data + at) + 1)
		if (unlink(files.data + at) < 0 && errno != ENOENT)
			fprintf(stderr, "remarket forget: %s: %s\n", files.data + at,
				strerror(errno));
	buf_free(&files);
	printf("%s: forgotten\n", argv[1]);
	return 0;
}

/* `remarket products kind SKU product|service`: corrects the catalog's
 * guess; a service is never recommended nor counted as a product. */
static int cmd_products(struct app *app, struct config *cfg, rm_time now,
			int argc, char **argv)
{
	(void)cfg, (void)now;
	if (argc != 4 || strcmp(argv[1], "kind") ||
	    (strcmp(argv[3], "product") && strcmp(argv[3], "service"))) {
		fprintf(stderr, "usage: remarket products kind SKU product|service\n");
		return 2;
	}
	if (reco_set_kind(app, argv[2], argv[3]) < 0) {
		fprintf(stderr, "remarket products: no product '%s' in the catalog "
			"(import it first: remarket import products FILE.csv)\n",
			argv[2]);
		return 1;
	}
	printf("%s: %s\n", argv[2], argv[3]);
	return 0;
}

static int cmd_segments(struct app *app, struct config *cfg, rm_time now,
			int argc, char **argv)
{
	(void)cfg, (void)argc, (void)argv;
	char why[200];
	long days = flow_lapse_days(app, why, sizeof why);
	if (flow_segments(app, now) < 0) {
		fprintf(stderr, "remarket segments: failed\n");
		return 1;
	}
	printf("lapsed after %ld days (%s)\n", days, why);
	long n[SEG__MAX];
	segment_counts(app, n);
	for (int i = 0; i < SEG__MAX; i++)
		if (n[i]) /* the segments that have customers, as before */
			printf("  %-8s %ld\n", segment_names[i], n[i]);
	return 0;
}

/* `remarket status [--json]`: every check (see "Checks before sending
 * and status"). Reads only; works without the key (it says so) and
 * without a database. Exit 0 all good, 1 a problem stops sending, 3
 * warnings only (sending works), 2 a wrong command line. */
static int cmd_status(struct app *unused, struct config *cfg, rm_time now,
		      int argc, char **argv)
{
	(void)unused;
	int json = 0;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--json"))
			json = 1;
		else
			return cmd_usage("status");
	}
	struct app app;
	char err[512];
	memset(&app, 0, sizeof app);
	app.cfg = cfg;
	if (access(cfg->db, F_OK) == 0 && db_open(&app.db, cfg->db, err,
						  sizeof err) < 0)
		fprintf(stderr, "remarket status: %s\n", err);
	app.curl = curl_easy_init();
	struct buf out = {0};
	int level = check_run(&app, now, CHECK_STATUS, json ? &out : NULL, NULL,
			      json ? NULL : &out);
	if (level >= 0)
		printf("%s%s", buf_str(&out), json ? "\n" : "");
	else
		fprintf(stderr, "remarket status: out of memory\n");
	buf_free(&out);
	app_close(&app);
	return level < 0 || level == CHECK_STOP ? 1 : level == CHECK_WARN ? 3 : 0;
}

/* `remarket backtest --from D [--to D] [--json]`: the flows over the
 * store's own history, nothing sent (see the Backtest banner). */
static int cmd_backtest(struct app *app, struct config *cfg, rm_time now,
			int argc, char **argv)
{
	(void)cfg;
	rm_time from = -1, to = now;
	int json = 0;
	for (int i = 1; i < argc; i++) {
		int val = i + 1 < argc;
		if (!strcmp(argv[i], "--json")) {
			json = 1;
		} else if (!strcmp(argv[i], "--from") && val) {
			from = parse_time(argv[++i], now);
			if (from < 0)
				goto bad_time;
		} else if (!strcmp(argv[i], "--to") && val) {
			to = parse_time(argv[++i], now);
			if (to < 0)
				goto bad_time;
		} else if (!strcmp(argv[i], "--now") && val) {
			i++; /* taken by cmd_run */
		} else {
			return cmd_usage(argv[0]);
		}
	}
	if (from < 0)
		return cmd_usage(argv[0]);
	if (to < from || to - from > 3660LL * 86400) {
		fprintf(stderr, "remarket backtest: --from must come before --to, "
			"at most 10 years before it\n");
		return 2;
	}
	struct backtest r;
	struct buf out = {0};
	char err[600];
	int rc = 0;
	if (backtest_run(app, from, to, &r, err, sizeof err) < 0) {
		fprintf(stderr, "remarket backtest: %s\n", err);
		rc = 1;
	} else if ((json ? backtest_json(&r, &out) : backtest_text(&r, &out)) < 0) {
		fprintf(stderr, "remarket backtest: out of memory\n");
		rc = 1;
	} else {
		fputs(out.data, stdout);
	}
	buf_free(&out);
	backtest_free(&r);
	return rc;
bad_time:
	fprintf(stderr, "remarket backtest: want a date (2011-06-01), Unix "
		"seconds or -90d\n");
	return 2;
}

static int cmd_help(struct app *app, struct config *cfg, rm_time now, int argc,
		    char **argv);
static int cmd_version(struct app *app, struct config *cfg, rm_time now,
		       int argc, char **argv);

/* ---- The command table ---- */
/*
 * Every command, as routes[] is every URL: its name, whether it needs the
 * application (the key ring and the database, opened before it runs and
 * closed after), how many words may follow its name, its function, and
 * its usage line. usage(), `remarket help --man` (the man page's
 * SYNOPSIS, compared with remarket.8 by tests/46-commands.t) and the
 * dispatch in run() are all made from it. A command may have several
 * rows, one per form; the first row of a name dispatches. A row without
 * an args string is an alias, left out of the usage.
 *
 * The usage line is also the list of options: each "--word" in the args
 * of a command's rows is one, and takes a value when the usage gives it
 * one ("[--since D]", not "[--json]"); --now T is every command's that
 * opens the app. cmd_run refuses any other word that starts with '-',
 * counts the rest against min_args and max_args, and answers --help.
 *
 * Every cmd_* has the same signature. argv[0] is the command's name,
 * then the words that are no option, in their order, then the options
 * with their values, less --now; app is NULL when the row does not need
 * it, and now is the --now of the command line (or the real clock) when
 * it does.
 */
typedef int cmd_fn(struct app *app, struct config *cfg, rm_time now, int argc,
		   char **argv);
enum cmd_needs {
	CMD_ALONE, /* the config only: init, keygen, serve, help, version */
	CMD_APP,   /* the key ring and the database, opened before it runs */
	CMD_READ,  /* the database, and the key ring if it can be read: a
		    * command that signs nothing works without the key */
};
struct command {
	const char *name;
	enum cmd_needs needs;
	int min_args, max_args; /* words after the name, less the options and
				 * their values; max -1: any */
	cmd_fn *fn;
	const char *args;       /* usage: what follows the name ("\n" wraps) */
	const char *help;       /* usage: what it does ("\n" wraps) */
};

static const struct command commands[] = {
	{"init", CMD_ALONE, 0, 0, cmd_init, "[--new-key]",
	 "create or migrate the database, make the key"},
	{"keygen", CMD_ALONE, 0, 0, cmd_keygen, "[--rotate]",
	 "print a new 32-byte key (raw) on stdout, or\n"
	 "add one to key_file (old links stay valid)"},
	{"keygen", CMD_ALONE, 0, 0, cmd_keygen, "--vapid",
	 "make the web push key pair (vapid_key_file)\n"
	 "and print its public key"},
	{"serve", CMD_ALONE, 1, 1, cmd_serve, "ADDR",
	 "FastCGI on a unix socket path or host:port"},
	{"tick", CMD_APP, 0, 0, cmd_tick, "[--now T]",
	 "run one tick, print a JSON summary"},
	{"event", CMD_APP, 0, 0, cmd_event, "[--now T] [--partial]",
	 "record JSON event(s) read on stdin"},
	{"report", CMD_READ, 0, 0, cmd_report, "[--json] [--since D]",
	 "results since D (default -30d)"},
	{"report", CMD_READ, 0, 0, cmd_report, "--link [--days N]",
	 "a URL that opens the report in a\nbrowser for N days (default 7;\n"
	 "signed: needs the key)"},
	{"flows", CMD_READ, 0, -1, cmd_flows,
	 "[set F N k=v | enable F | disable F | holdout F PCT |\n"
	 "variant F N k=v | variant F N off | resume F N]",
	 "list the flows, or change one"},
	{"segments", CMD_READ, 0, 0, cmd_segments, "[--now T]",
	 "RFM segments and the lapse threshold"},
	{"status", CMD_ALONE, 0, 0, cmd_status, "[--json] [--now T]",
	 "is everything ready to send? (exit 0 ok,\n1 a problem stops sending, 3 warnings)"},
	{"backtest", CMD_APP, 0, 0, cmd_backtest,
	 "--from D [--to D] [--json]",
	 "what the flows would have done over the\nimported history (nothing sent)"},
	{"recommend", CMD_READ, 1, 2, cmd_recommend, "EMAIL [N]",
	 "the products win-back would recommend\n(N: 1 to 16, default 3)"},
	{"products", CMD_APP, 3, 3, cmd_products, "kind SKU product|service",
	 "mark a catalog line a product or a service\n(postage, fees: never recommended)"},
	{"preview", CMD_APP, 1, 1, cmd_preview,
	 "TEMPLATE [--email ADDR] [--trigger T] [--out DIR]",
	 "render a mail as the tick would (for ADDR's\ncart or order, or a sample) into DIR\n"
	 "(./remarket-preview): .eml, .html; text on stdout"},
	{"push-test", CMD_APP, 1, 1, cmd_push_test, "EMAIL",
	 "send a test notification to each browser\nof EMAIL subscribed to web push"},
	{"send-test", CMD_APP, 2, 2, cmd_send_test,
	 "TEMPLATE ADDR [--email CONTACT] [--trigger T]",
	 "send one \"[TEST]\" mail to ADDR, recorded nowhere"},
	{"import", CMD_APP, 2, 2, cmd_import,
	 "products|orders FILE.csv [--rejects REJECTS.csv]\n[--dry-run]",
	 "fill the catalog, load past orders;\n"
	 "--dry-run: say what would be imported"},
	{"contact", CMD_READ, 1, 1, cmd_contact, "[--json] EMAIL",
	 "everything known of a person and sent to them"},
	{"unsubscribe", CMD_APP, 1, 1, cmd_unsubscribe, "EMAIL",
	 "as the mail's link: every flow stops"},
	{"suppress", CMD_APP, 1, 2, cmd_suppress, "add|remove EMAIL | list",
	 "stop (or allow again) all mail to an address"},
	{"feedback", CMD_APP, 0, 1, cmd_feedback, "[--now T] [RECIPIENT] < MAIL",
	 "act on a bounce, a spam complaint or a\nmailed unsubscribe"},
	{"export", CMD_READ, 1, 1, cmd_contact, "EMAIL",
	 "a person's data as JSON (GDPR access)"},
	{"forget", CMD_APP, 1, 1, cmd_forget, "EMAIL",
	 "erase a person (GDPR); keeps a keyed hash\nso they are never mailed again"},
	{"help", CMD_ALONE, 0, 1, cmd_help, "[COMMAND | --man]",
	 "this list, or one command's; --man: the man\npage's SYNOPSIS"},
	{"version", CMD_ALONE, 0, 0, cmd_version, "", "print the version"},
	{"--help", CMD_ALONE, 0, -1, cmd_help, NULL, NULL},
	{"--version", CMD_ALONE, 0, -1, cmd_version, NULL, NULL},
};
#define NCOMMANDS (sizeof commands / sizeof commands[0])

/* Prints TEXT, each line after a "\n" indented by INDENT spaces. */
static void print_wrapped(FILE *f, const char *text, int indent)
{
	for (const char *p = text; *p; p++) {
		fputc(*p, f);
		if (*p == '\n')
			fprintf(f, "%*s", indent, "");
	}
}

static void usage(FILE *f)
{
	fprintf(f, "usage: remarket [-c FILE] COMMAND\n");
	for (size_t i = 0; i < NCOMMANDS; i++) {
		const struct command *c = &commands[i];
		if (!c->args)
			continue;
		int w = fprintf(f, "  %s%s", c->name, *c->args ? " " : "");
		print_wrapped(f, c->args, w);
		const char *nl = strrchr(c->args, '\n');
		int col = nl ? w + (int)strlen(nl + 1)
			     : w + (int)strlen(c->args);
		if (col < 23) {
			fprintf(f, "%*s", 23 - col, "");
		} else {
			fprintf(f, "\n%*s", 23, "");
		}
		print_wrapped(f, c->help, 23);
		fputc('\n', f);
	}
	fprintf(f, "T is Unix seconds, 2026-11-24T10:00:00Z, or +90m/+2h/+3d "
		"from now.\n");
}

/* The usage lines of command NAME, on stderr; returns 2, the exit code
 * of a command line that is wrong. */
static int cmd_usage(const char *name)
{
	for (size_t i = 0; i < NCOMMANDS; i++) {
		const struct command *c = &commands[i];
		if (strcmp(c->name, name) || !c->args)
			continue;
		int w = fprintf(stderr, "usage: remarket %s%s", c->name,
				*c->args ? " " : "");
		print_wrapped(stderr, c->args, w);
		fputc('\n', stderr);
	}
	return 2;
}

/* Prints S for roff: '-' as "\-", '\' as "\e". */
static void man_text(const char *s)
{
	for (; *s; s++) {
		if (*s == '-')
			fputs("\\-", stdout);
		else if (*s == '\\')
			fputs("\\e", stdout);
		else
			putchar(*s);
	}
}

/* The SYNOPSIS section of remarket.8, made from the command table. */
static void man_synopsis(void)
{
	printf(".SH SYNOPSIS\n"
	       ".B remarket\n.RB [ \\-c\n.IR file ]\n.I command\n.RI [ args ]\n"
	       ".br\n");
	for (size_t i = 0; i < NCOMMANDS; i++) {
		const struct command *c = &commands[i];
		if (!c->args)
			continue;
		printf(".B remarket %s\n", c->name);
		if (*c->args) {
			man_text(c->args);
			putchar('\n');
		}
		printf(".br\n");
	}
	printf(".B remarket\n"
	       "(as a CGI program or on a FastCGI listening socket)\n");
}

static const struct command *cmd_find(const char *name);

/* `remarket help CMD`, `remarket CMD --help`: the command's usage lines
 * and what each form does, and what it needs, on stdout. */
static void cmd_describe(const struct command *c)
{
	const char *needs = "";
	for (size_t i = 0; i < NCOMMANDS; i++) {
		const struct command *r = &commands[i];
		if (strcmp(r->name, c->name) || !r->args)
			continue;
		int w = printf("usage: remarket %s%s", r->name, *r->args ? " " : "");
		print_wrapped(stdout, r->args, w);
		printf("\n  ");
		print_wrapped(stdout, r->help, 2);
		putchar('\n');
	}
	if (c->needs == CMD_APP)
		needs = "Opens the database and needs the key (key_file).\n";
	else if (c->needs == CMD_READ)
		needs = "Opens the database; works without the key (key_file).\n";
	printf("%s", needs);
	if (c->needs != CMD_ALONE)
		printf("--now T runs it at time T: Unix seconds, "
		       "2026-11-24T10:00:00Z, or +90m/+2h/+3d from now.\n");
}

static int cmd_help(struct app *app, struct config *cfg, rm_time now, int argc,
		    char **argv)
{
	(void)app, (void)cfg, (void)now;
	const struct command *c = argc == 2 ? cmd_find(argv[1]) : NULL;
	if (argc == 2 && !strcmp(argv[1], "--man")) {
		man_synopsis();
	} else if (argc == 2 && (!c || !c->args)) {
		fprintf(stderr, "remarket: unknown command '%s' (see remarket "
			"help)\n", argv[1]);
		return 2;
	} else if (c) {
		cmd_describe(c);
	} else {
		usage(stdout);
	}
	return 0;
}

static int cmd_version(struct app *app, struct config *cfg, rm_time now,
		       int argc, char **argv)
{
	(void)app, (void)cfg, (void)now, (void)argc, (void)argv;
	printf("remarket %s\n", RM_VERSION);
	return 0;
}

static const struct command *cmd_find(const char *name)
{
	for (size_t i = 0; i < NCOMMANDS; i++)
		if (!strcmp(commands[i].name, name))
			return &commands[i];
	return NULL;
}

/* 1 if WORD is an option of USAGE (a row's args): "--since" of
 * "[--json] [--since D]"; *VALUE is 1 if the usage gives it a value (a
 * word after it that opens no bracket and is no option nor '|'). */
static int usage_opt(const char *usage, const char *word, int *value)
{
	static const char sep[] = " \n[]|";
	size_t n = strlen(word);
	for (const char *p = usage; *p;) {
		size_t k = strcspn(p, sep);
		if (k == n && !strncmp(p, word, n)) {
			const char *v = p + k;
			while (*v == ' ' || *v == '\n')
				v++;
			*value = p[k] == ' ' && *v && !strchr("[]|-", *v);
			return 1;
		}
		p += k ? k : 1;
	}
	return 0;
}

/* 1 if WORD is one of command C's options (any of its rows'); *VALUE
 * says whether it takes one. --now is every app command's. */
static int cmd_opt(const struct command *c, const char *word, int *value)
{
	*value = 1;
	if (c->needs != CMD_ALONE && !strcmp(word, "--now"))
		return 1;
	if (strncmp(word, "--", 2) || !word[2])
		return 0;
	for (size_t i = 0; i < NCOMMANDS; i++)
		if (!strcmp(commands[i].name, c->name) && commands[i].args &&
		    usage_opt(commands[i].args, word, value))
			return 1;
	return 0;
}

/* Checks the words after C's name against its options and arity (see
 * struct command) and puts them in AV for the command: its name, the
 * other words in their order, then the options with their values, less
 * --now (the caller has read it). Returns 0, or 2 with the usage said. */
static int cmd_words(const struct command *c, int argc, char **argv, char **av,
		     int *avc)
{
	int words = 0, n = 1;
	av[0] = argv[0];
	for (int i = 1; i < argc; i++) { /* the words that are no option */
		int value;
		if (argv[i][0] != '-' || !argv[i][1]) {
			av[n++] = argv[i], words++;
		} else if (!cmd_opt(c, argv[i], &value)) {
			fprintf(stderr, "remarket %s: unknown option '%s'\n", c->name,
				argv[i]);
			return cmd_usage(c->name);
		} else if (value && ++i == argc) {
			fprintf(stderr, "remarket %s: %s needs a value\n", c->name,
				argv[i - 1]);
			return cmd_usage(c->name);
		}
	}
	for (int i = 1; i < argc; i++) { /* then the options */
		int value;
		if (argv[i][0] != '-' || !argv[i][1] || !cmd_opt(c, argv[i], &value))
			continue;
		if (strcmp(argv[i], "--now"))
			av[n++] = argv[i];
		if (value && strcmp(argv[i++], "--now"))
			av[n++] = argv[i];
	}
	if (words < c->min_args || (c->max_args >= 0 && words > c->max_args))
		return cmd_usage(c->name);
	av[n] = NULL;
	*avc = n;
	return 0;
}

/* Answers --help, checks the words, opens the app if the command needs
 * it (CMD_READ: without the key if it cannot be read), runs it. */
static int cmd_run(const struct command *c, struct config *cfg, int argc,
		   char **argv)
{
	for (int i = 1; i < argc; i++)
		if (!strcmp(argv[i], "--help")) {
			cmd_describe(c);
			return 0;
		}
	rm_time now = now_arg(argc, argv);
	char **av = malloc(((size_t)argc + 1) * sizeof *av);
	int avc = 0, rc = 2;
	if (!av) {
		fprintf(stderr, "remarket: out of memory\n");
		return 1;
	}
	if (cmd_words(c, argc, argv, av, &avc)) {
		free(av);
		return 2;
	}
	if (c->needs == CMD_ALONE) { /* status reads --now; the rest ignore it */
		if (now < 0)
			fprintf(stderr, "remarket: --now: want Unix seconds, ISO 8601 "
				"or +N[smhd]\n");
		else
			rc = c->fn(NULL, cfg, now, avc, av);
		free(av);
		return rc;
	}
	struct app app;
	char err[512];
	if (app_open_keyless(&app, cfg, c->needs == CMD_READ, err, sizeof err) < 0) {
		fprintf(stderr, "remarket %s: %s\n", argv[0], err);
		free(av);
		return 1;
	}
	if (now < 0)
		fprintf(stderr, "remarket: --now: want Unix seconds, ISO 8601 or "
			"+N[smhd]\n");
	else
		rc = c->fn(&app, cfg, now, avc, av);
	app_close(&app);
	free(av);
	return rc;
}

/* ==== Main ============================================================ */
/*
 * One binary, three forms: with a command it runs the command; started
 * without one by a web server, it answers as CGI (a request in the
 * environment) or as a FastCGI server on the socket it was given.
 */

static int run(int argc, char **argv)
{
	const char *file = NULL;
	if (argc > 2 && !strcmp(argv[1], "-c")) {
		file = argv[2];
		argc -= 2, argv += 2;
	}
	struct config cfg;
	char err[512];
	if (cfg_load(&cfg, file, err, sizeof err) < 0) {
		fprintf(stderr, "remarket: config: %s\n", err);
		return 1;
	}
	int rc;
	const char *cmd = argc > 1 ? argv[1] : NULL;
	const struct command *c = cmd ? cmd_find(cmd) : NULL;
	if (!cmd && getenv("GATEWAY_INTERFACE"))
		rc = serve_cgi(&cfg);
	else if (!cmd && !FCGX_IsCGI()) /* stdin is a listening socket */
		rc = serve_fd(&cfg, 0);
	else if (!cmd)
		usage(stderr), rc = 2;
	else if (!c)
		fprintf(stderr, "remarket: unknown command '%s' (see remarket "
			"help)\n", cmd), rc = 2;
	else
		rc = cmd_run(c, &cfg, argc - 1, argv + 1);
	cfg_free(&cfg);
	return rc;
}

/* The unit tests bring their own main(); this one is kept, renamed, so
 * that every function stays compiled and warning-checked in their build. */
#ifdef RM_NO_MAIN
#define main remarket_main
int remarket_main(int argc, char **argv);
#endif
int main(int argc, char **argv)
{
	if (sodium_init() < 0 || curl_global_init(CURL_GLOBAL_DEFAULT) != 0) {
		fprintf(stderr, "remarket: libsodium or libcurl failed to start\n");
		return 1;
	}
	int rc = run(argc, argv);
	curl_global_cleanup();
	return rc;
}
