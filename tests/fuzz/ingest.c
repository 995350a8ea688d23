/*
 * tests/fuzz/ingest.c: ev_ingest, the one door every event goes through.
 *
 * Input: byte 0 picks the source (0 hook, 1 browser, 2 CLI, 3 pixel, mod
 * 4), byte 1 whether a visitor id comes with it (bit 0: yes) and whether
 * the batch is partial (bit 1: ev_ingest_partial, as ?partial=1), the
 * rest is the JSON body, passed with its length (NUL bytes included).
 * Checks: no crash, leak or undefined behaviour; an accepted batch answers
 * with a count (a partial one also with a list of its refusals), a refused
 * one with a 4xx/5xx and a message.
 */
#include "fuzz.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	fz_start_world();
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len)
{
	static const enum ev_source src[] = {EV_HOOK, EV_BROWSER, EV_CLI, EV_PIXEL};
	if (len < 2)
		return 0;
	struct ev_error err;
	memset(&err, 0, sizeof err);
	char *json = fz_str(data + 2, len - 2);
	const char *vid = data[1] & 1 ? "v_fuzzvisitor0000000000" : NULL;
	struct buf refused = {0};
	int n = data[1] & 2 ?
		ev_ingest_partial(&fz_app, src[data[0] % 4], json, len - 2, vid,
				  FZ_NOW, &err, &refused) :
		ev_ingest(&fz_app, src[data[0] % 4], json, len - 2, vid, FZ_NOW,
			  &err);
	if (n < 0 && (err.status < 400 || err.status > 599 || !err.msg[0] ||
		      !memchr(err.msg, '\0', sizeof err.msg)))
		abort(); /* a refusal must say why, with an error status */
	if (n > 0 && (data[1] & 2) && (!refused.data || refused.data[0] != '[' ||
				       refused.data[refused.len - 1] != ']'))
		abort(); /* a partial batch lists its refusals */
	buf_free(&refused);
	free(json);
	fz_reset();
	return 0;
}
