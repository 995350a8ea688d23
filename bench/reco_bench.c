/*
 * reco_bench: the cost of recommendations on a copy of a store's database
 * (issue 14). Linked with remarket.c (-DRM_NO_MAIN) through remarket.h,
 * so the same file measures today's code and a baseline's.
 *
 *   reco_bench mails N        reco_for() for N customers with orders (every
 *                             (customers / N)-th one): median, p90, max
 *   reco_bench refresh CHUNK  (with -DRECO_TABLE) brings the item-to-item
 *                             table up to date one chunk at a time: total
 *                             time, order lines, time per 1,000 lines,
 *                             the longest chunk (one transaction)
 *
 * The database and key come from REMARKET_DB and REMARKET_KEY_FILE.
 */
#define _GNU_SOURCE
#include "remarket.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	struct config cfg;
	struct app app;
	char err[512];
	if (argc != 3) {
		fprintf(stderr, "usage: reco_bench mails N | refresh CHUNK\n");
		return 2;
	}
	if (cfg_load(&cfg, NULL, err, sizeof err) < 0 ||
	    app_open(&app, &cfg, err, sizeof err) < 0) {
		fprintf(stderr, "reco_bench: %s\n", err);
		return 1;
	}
	long n = atol(argv[2]);
	if (!strcmp(argv[1], "refresh")) {
#ifdef RECO_TABLE
		long long lines = db_scalar(app.db, "SELECT count(*) FROM order_lines "
					    "WHERE order_id > (SELECT last_order FROM reco_state)");
		double t0 = now_ms(), worst = 0;
		long chunks = 0;
		for (;;) {
			double c0 = now_ms();
			long w = reco_refresh(&app, n, 1); /* one chunk a call */
			double c = now_ms() - c0;
			if (w <= 0)
				break;
			chunks++;
			if (c > worst)
				worst = c;
		}
		double total = now_ms() - t0;
		printf("refresh: %lld order lines in %ld chunks of ~%ld: %.2f s, "
		       "%.1f ms per 1000 lines, longest chunk %.1f ms\n", lines, chunks,
		       n, total / 1e3, lines ? total / ((double)lines / 1000) : 0, worst);
#else
		fprintf(stderr, "reco_bench: built without RECO_TABLE\n");
#endif
	} else {
		long long have = db_scalar(app.db, "SELECT count(DISTINCT contact_id) "
					   "FROM orders WHERE contact_id IS NOT NULL");
		long long maxid = db_scalar(app.db, "SELECT max(contact_id) FROM orders");
		double *t = calloc((size_t)n, sizeof *t);
		char out[16][65], sql[160];
		long done = 0;
		for (long i = 0; i < n && t; i++) {
			snprintf(sql, sizeof sql, "SELECT contact_id FROM orders WHERE "
				 "contact_id >= %lld ORDER BY contact_id LIMIT 1",
				 maxid * i / n + 1);
			long long c = db_scalar(app.db, sql);
			double t0 = now_ms();
			int k = reco_for(&app, c, out, 3);
			t[done++] = now_ms() - t0;
			if (i == 0)
				printf("contact %lld: %d products: %s %s %s\n", c, k,
				       k > 0 ? out[0] : "", k > 1 ? out[1] : "",
				       k > 2 ? out[2] : "");
		}
		qsort(t, (size_t)done, sizeof *t, cmp);
		if (done)
			printf("recommendations for %ld of %lld customers: median %.2f ms, "
			       "p90 %.2f ms, max %.2f ms\n", done, have, t[done / 2],
			       t[done * 9 / 10], t[done - 1]);
		free(t);
	}
	app_close(&app);
	cfg_free(&cfg);
	return 0;
}
