/*
 * tests/fuzz/csv.c: both CSV importers (import_products, import_orders),
 * the RFC 4180 reader and every row through ev_ingest.
 *
 * Input: byte 0 picks the importer (even: products, odd: orders) and,
 * with its bit 1, a dry run (import --dry-run: ev_check, nothing
 * written); the rest is the file, read through fmemopen. Their counts on stdout go to
 * /dev/null; their refusals on stderr are silenced by running with
 * -close_fd_mask=2 (as make fuzz and tests/15-fuzz-replay.t do).
 *
 * Checks: no crash, leak or undefined behaviour; the result is 0, 1 or 2.
 */
#include "fuzz.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	fz_start_world();
	if (!freopen("/dev/null", "w", stdout))
		fz_die("/dev/null");
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len)
{
	if (len < 1)
		return 0;
	/* fmemopen of zero bytes fails; an empty file is one byte short */
	char *copy = fz_str(data + 1, len - 1);
	FILE *f = fmemopen(copy, len > 1 ? len - 1 : 1, "r");
	if (!f)
		abort();
	if (len == 1)
		fgetc(f); /* at the end */
	int rc = data[0] & 2 ? import_file(&fz_app, data[0] & 1, f, FZ_NOW,
					   "fuzz.csv", NULL, 1) :
		 data[0] & 1 ? import_orders(&fz_app, f, FZ_NOW)
			     : import_products(&fz_app, f, FZ_NOW);
	if (rc < 0 || rc > 2)
		abort();
	fclose(f);
	free(copy);
	fz_reset();
	return 0;
}
