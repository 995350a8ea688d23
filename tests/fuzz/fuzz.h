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
 * same on every run; fz_reset() empties the tables that inputs write, so
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

#define FZ_NOW ((rm_time)1795000000) /* 2026-11-18T11:06:40Z, as the unit tests */
#define FZ_HOOK_SECRET "whsec_fuzz"
#define FZ_TICK_TOKEN "tick-fuzz-token"

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

/* The repository's templates: $RM_TEMPLATES, else from __FILE__. */
static void fz_templates(char *out, size_t len)
{
	const char *t = getenv("RM_TEMPLATES");
	if (t && *t) {
		snprintf(out, len, "%s", t);
		return;
	}
	snprintf(out, len, "%s", __FILE__);
	char *slash = strstr(out, "tests/fuzz/fuzz.h");
	if (slash)
		snprintf(slash, len - (size_t)(slash - out), "templates");
	else
		snprintf(out, len, "templates");
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

/* Empties what inputs write; flows and steps stay as migrated. */
__attribute__((unused)) static void fz_reset(void)
{
	static const char *const tables[] = {
		"interactions", "discounts", "messages", "enrollments",
		"order_lines", "segments", "reviews", "products", "orders",
		"carts", "visitors", "contacts", "events"};
	char sql[64];
	db_scalar(fz_app.db, "PRAGMA foreign_keys=OFF");
	for (size_t i = 0; i < sizeof tables / sizeof tables[0]; i++) {
		snprintf(sql, sizeof sql, "DELETE FROM %s", tables[i]);
		db_scalar(fz_app.db, sql);
	}
	db_scalar(fz_app.db, "PRAGMA foreign_keys=ON");
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

#endif
