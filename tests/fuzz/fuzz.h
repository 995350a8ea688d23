/*
 * tests/fuzz/fuzz.h: what every libFuzzer target of remarket shares.
 *
 * Each target is one tests/fuzz/NAME.c linked against remarket.c built
 * with -DRM_NO_MAIN (like tests/unit.c) and -fsanitize=fuzzer,address,
 * undefined. LLVMFuzzerInitialize opens one real application per process:
 * a config loaded by cfg_load from REMARKET_* variables, a fixed key, a
 * migrated SQLite file and an outbox, all in a mkdtemp directory under
 * $TMPDIR (default /tmp) that is removed at exit. The clock is fixed
 * (FZ_NOW, also $REMARKET_NOW for the front-end), so an input behaves the
 * same on every run; fz_baseline() fills a small world (a catalog, carts,
 * sent mails, an order) and fz_reset() puts it back after each input, so
 * one input never depends on the ones before it.
 *
 * Build and run: make fuzz (see the Makefile); corpora are in
 * tests/fuzz/corpus/NAME/, replayed by tests/15-fuzz-replay.t.
 */
#ifndef RM_FUZZ_H
#define RM_FUZZ_H

#define _GNU_SOURCE
#include "remarket.h"

#include <ftw.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <curl/curl.h>
#include <sodium.h>
#include <sqlite3.h>

#define FZ_NOW ((rm_time)1795000000) /* 2026-11-18T11:06:40Z, as the unit tests */
#define FZ_HOOK_SECRET "whsec_fuzz"
#define FZ_TICK_TOKEN "tick-fuzz-token"
#define FZ_TWILIO_TOKEN "twilio-fuzz-token"

static char fz_dir[PATH_MAX];
static struct config fz_cfg;
static struct app fz_app;
static unsigned char fz_key[RM_KEYBYTES];

static int fz_rm_entry(const char *path, const struct stat *st, int flag,
		       struct FTW *ftw)
{
	(void)st, (void)flag, (void)ftw;
	return remove(path);
}

static void fz_cleanup(void)
{
	app_close(&fz_app);
	cfg_free(&fz_cfg);
	if (*fz_dir)
		nftw(fz_dir, fz_rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void fz_die(const char *what)
{
	fprintf(stderr, "fuzz setup: %s\n", what);
	exit(1);
}

__attribute__((unused)) static void fz_write(const char *name, const void *data, size_t len)
{
	char path[PATH_MAX + 64];
	snprintf(path, sizeof path, "%s/%s", fz_dir, name);
	FILE *f = fopen(path, "wb");
	if (!f || fwrite(data, 1, len, f) != len || fclose(f) != 0)
		fz_die(path);
}

/* The repository's templates: $RM_TEMPLATES, else the directory the
 * Makefile names (FZ_TEMPLATES), else ./templates. */
#ifndef FZ_TEMPLATES
#define FZ_TEMPLATES "templates"
#endif
static void fz_templates(char *out, size_t len)
{
	const char *t = getenv("RM_TEMPLATES");
	snprintf(out, len, "%s", t && *t ? t : FZ_TEMPLATES);
}

/* One application for the whole process. */
static void fz_open(void)
{
	char path[PATH_MAX + 64], tpl[PATH_MAX], err[512] = "";
	const char *tmp = getenv("TMPDIR");
	struct db *d = NULL;
	if (sodium_init() < 0 || curl_global_init(CURL_GLOBAL_DEFAULT) != 0)
		fz_die("libsodium or libcurl failed to start");
	snprintf(fz_dir, sizeof fz_dir, "%s/rm-fuzz-XXXXXX",
		 tmp && *tmp ? tmp : "/tmp");
	if (!mkdtemp(fz_dir))
		fz_die("mkdtemp");
	atexit(fz_cleanup);
	for (int i = 0; i < RM_KEYBYTES; i++)
		fz_key[i] = (unsigned char)(i * 7 + 3);
	fz_write("key", fz_key, sizeof fz_key);
	fz_write("empty.conf", "", 0);
	fz_templates(tpl, sizeof tpl);
#define FZ_SET(var, fmt) do { \
		snprintf(path, sizeof path, fmt, fz_dir); \
		setenv(var, path, 1); \
	} while (0)
	FZ_SET("REMARKET_CONFIG", "%s/empty.conf");
	FZ_SET("REMARKET_KEY_FILE", "%s/key");
	FZ_SET("REMARKET_DB", "%s/fuzz.db");
	FZ_SET("REMARKET_OUTBOX", "%s/outbox");
#undef FZ_SET
	setenv("REMARKET_TEMPLATES", tpl, 1);
	setenv("REMARKET_SMTP_URL", "", 1);
	setenv("REMARKET_HOOK_SECRET", FZ_HOOK_SECRET, 1);
	setenv("REMARKET_TICK_TOKEN", FZ_TICK_TOKEN, 1);
	setenv("REMARKET_SMS_PROVIDER", "twilio", 1); /* /sms/inbound parses */
	setenv("REMARKET_TWILIO_AUTH_TOKEN", FZ_TWILIO_TOKEN, 1);
	setenv("REMARKET_STORE_ORIGIN", "https://shop.example.com", 1);
	setenv("REMARKET_BASE_URL", "https://shop.example.com/rm", 1);
	/* inputs share one clock and one address: no rate limit may bite */
	setenv("REMARKET_RATE_IP_PER_MIN", "1000000000", 1);
	setenv("REMARKET_RATE_VISITOR_PER_MIN", "1000000000", 1);
	setenv("REMARKET_NOW", "1795000000", 1);
	if (cfg_load(&fz_cfg, NULL, err, sizeof err) < 0 ||
	    db_open(&d, fz_cfg.db, err, sizeof err) < 0 ||
	    db_migrate(d, err, sizeof err) < 0) {
		db_close(d);
		fz_die(err);
	}
	db_close(d);
	if (app_open(&fz_app, &fz_cfg, err, sizeof err) < 0)
		fz_die(err);
	db_scalar(fz_app.db, "PRAGMA synchronous=OFF");
}

/* The tables that inputs write; flows and steps stay as migrated. */
static const char *const fz_tables[] = {
	"feedback", "interactions", "discounts", "messages", "enrollments", "order_lines",
	"segments", "reviews", "products", "orders", "carts", "visitors",
	"contacts", "events"};
#define FZ_NTABLES (sizeof fz_tables / sizeof fz_tables[0])
static int fz_have_base;

/* A small world that every input starts from, so that links, codes and
 * reports have something to find: a catalog, two contacts, Ann's cart
 * abandoned four days ago and its three mails sent (messages 1 to 3, the
 * third with a discount code), an order of Bob's. Each input may change
 * it; fz_reset puts it back from a copy in TEMP tables. */
__attribute__((unused)) static void fz_baseline(void)
{
	static const char *const ev =
		"[{\"type\":\"product\",\"sku\":\"LAMP-1\",\"name\":\"Lamp\",\"price\":49.5,"
		"\"url\":\"https://shop.example.com/p/lamp\",\"image\":\"https://shop."
		"example.com/i/lamp.jpg\",\"category\":\"home\",\"review\":{\"author\":"
		"\"Eve\",\"rating\":5,\"text\":\"Lovely\"}},"
		"{\"type\":\"product\",\"sku\":\"MUG-2\",\"name\":\"Mug\",\"price\":8},"
		"{\"type\":\"cart\",\"cart_id\":\"c1\",\"email\":\"ann@example.com\","
		"\"name\":\"Ann\",\"consent\":true,\"currency\":\"EUR\",\"items\":[{\"sku\":"
		"\"LAMP-1\",\"name\":\"Lamp\",\"price\":49.5,\"qty\":2}]},"
		"{\"type\":\"order\",\"order_id\":\"o-1\",\"email\":\"bob@example.com\","
		"\"name\":\"Bob\",\"consent\":true,\"total\":8,\"currency\":\"EUR\","
		"\"items\":[{\"sku\":\"MUG-2\",\"name\":\"Mug\",\"price\":8,\"qty\":1}]}]";
	static const rm_time ticks[] = {4 * 86400 - 3600, 3 * 86400, 86400 - 60, 60};
	struct ev_error err;
	struct tick_summary sum;
	rm_time t0 = FZ_NOW - 4 * 86400;
	db_scalar(fz_app.db, "UPDATE flows SET holdout_pct = 0"); /* Ann is mailed */
	if (ev_ingest(&fz_app, EV_HOOK, ev, strlen(ev), NULL, t0, &err) < 0)
		fz_die(err.msg);
	for (size_t i = 0; i < sizeof ticks / sizeof ticks[0]; i++) {
		memset(&sum, 0, sizeof sum);
		if (flow_tick(&fz_app, FZ_NOW - ticks[i], &sum) < 0)
			fz_die("baseline: flow_tick failed");
	}
	if (db_scalar(fz_app.db, "SELECT count(*) FROM messages") < 3)
		fz_die("baseline: the cart's three mails were not sent");
	fz_have_base = 1;
}

/* Resets go through a connection of the harness's own, its statements
 * prepared once (a reset is then ~0.1 ms, not the 4 ms of preparing 28
 * statements per input), with foreign keys off. The baseline's copy is in
 * its TEMP tables. PRAGMA data_version tells whether anyone wrote since
 * the last reset: most inputs are refused and change nothing. */
static sqlite3 *fz_h;
static sqlite3_stmt *fz_st[2 * FZ_NTABLES + 3];
static sqlite3_int64 fz_version;

static void fz_run(sqlite3_stmt *s)
{
	int rc;
	while ((rc = sqlite3_step(s)) == SQLITE_ROW)
		;
	sqlite3_reset(s);
	if (rc != SQLITE_DONE)
		fz_die(sqlite3_errmsg(fz_h));
}

static sqlite3_stmt *fz_prep(const char *fmt, const char *table)
{
	char sql[160];
	sqlite3_stmt *s = NULL;
	snprintf(sql, sizeof sql, fmt, table, table);
	if (sqlite3_prepare_v2(fz_h, sql, -1, &s, NULL) != SQLITE_OK)
		fz_die(sqlite3_errmsg(fz_h));
	return s;
}

static void fz_close_reset(void)
{
	for (size_t i = 0; i < sizeof fz_st / sizeof fz_st[0]; i++)
		sqlite3_finalize(fz_st[i]);
	sqlite3_close(fz_h);
}

static sqlite3_int64 fz_data_version(void)
{
	sqlite3_stmt *v = fz_st[2 * FZ_NTABLES + 2];
	sqlite3_int64 n = sqlite3_step(v) == SQLITE_ROW ? sqlite3_column_int64(v, 0) : -1;
	sqlite3_reset(v);
	return n;
}

/* Puts the tables back as they were after fz_open (and fz_baseline). */
__attribute__((unused)) static void fz_reset(void)
{
	if (!fz_h) {
		if (sqlite3_open(fz_cfg.db, &fz_h) != SQLITE_OK)
			fz_die("cannot open the database for resets");
		sqlite3_busy_timeout(fz_h, 10000);
		for (size_t i = 0; i < FZ_NTABLES; i++) {
			if (fz_have_base) {
				sqlite3_stmt *c = fz_prep("CREATE TEMP TABLE fz_base_%s AS "
							  "SELECT * FROM main.%s", fz_tables[i]);
				fz_run(c);
				sqlite3_finalize(c);
			}
			fz_st[2 * i] = fz_prep("DELETE FROM main.%s", fz_tables[i]);
			fz_st[2 * i + 1] = fz_prep(fz_have_base ? "INSERT INTO main.%s "
						   "SELECT * FROM fz_base_%s" : "SELECT 1",
						   fz_tables[i]);
		}
		fz_st[2 * FZ_NTABLES] = fz_prep("BEGIN", "");
		fz_st[2 * FZ_NTABLES + 1] = fz_prep("COMMIT", "");
		fz_st[2 * FZ_NTABLES + 2] = fz_prep("PRAGMA data_version", "");
		fz_version = fz_data_version();
		atexit(fz_close_reset);
		return; /* the first call comes before the first input */
	}
	sqlite3_int64 v = fz_data_version();
	if (v == fz_version)
		return;
	fz_run(fz_st[2 * FZ_NTABLES]);
	for (size_t i = 0; i < 2 * FZ_NTABLES; i++)
		fz_run(fz_st[i]);
	fz_run(fz_st[2 * FZ_NTABLES + 1]);
	fz_version = fz_data_version();
}

/* The input as a NUL-terminated string (inputs may hold NULs: the copy
 * keeps them, and callers choose whether to pass the length or not). */
__attribute__((unused)) static char *fz_str(const uint8_t *data, size_t len)
{
	char *s = malloc(len + 1);
	if (!s)
		abort();
	memcpy(s, data, len);
	s[len] = '\0';
	return s;
}


/* The start of a target that writes: a world, and the copy it goes back to
 * after each input. */
__attribute__((unused)) static void fz_start_world(void)
{
	fz_open();
	fz_baseline();
	fz_reset(); /* takes the baseline's copy */
}
#endif
