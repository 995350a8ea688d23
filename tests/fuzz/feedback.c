/*
 * tests/fuzz/feedback.c: `remarket feedback`'s mail reader (the small,
 * strict MIME reader of DSNs, ARF reports and mailed unsubscribes) and
 * what it then does to the database.
 *
 * Input: one mail, read by fb_mail_parse twice: without an envelope
 * recipient, then with the VERP address of message 1 (as Postfix's pipe
 * passes ${recipient}); each event found is applied by fb_apply to the
 * baseline world (bounce_address bounces@example.com, unsubscribe_mailto
 * unsubscribe@example.com), which fz_reset puts back after each input.
 *
 * Checks: no crash, leak or undefined behaviour; the kind is one of the
 * enum; a mail left alone says why; every string of the event is
 * terminated inside its array; a message is named only by a tag that
 * verifies, so never one outside the baseline's three (the seeds carry
 * the tags of messages 1 to 3: a made-up tag would need the key);
 * fb_apply answers 0, 1 or -1 and says what it did.
 */
#include "fuzz.h"

static void fz_set(char **slot, const char *v)
{
	free(*slot);
	*slot = strdup(v);
	if (!*slot)
		abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	fz_open();
	fz_set(&fz_cfg.bounce_address, "bounces@example.com");
	fz_set(&fz_cfg.unsubscribe_mailto, "unsubscribe@example.com");
	fz_baseline();
	fz_reset();
	return 0;
}

static void fz_check(const struct fb_event *ev, enum fb_kind k, const char *why)
{
	if (k < FB_NONE || k > FB_UNSUB || k != ev->kind)
		abort();
	if (k == FB_NONE && !*why)
		abort();
	if (memchr(ev->message_id, 0, sizeof ev->message_id) == NULL ||
	    memchr(ev->email, 0, sizeof ev->email) == NULL ||
	    memchr(ev->status, 0, sizeof ev->status) == NULL)
		abort();
	if (ev->message < 0 || ev->message > 3)
		abort(); /* a tag that should not have verified */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t len)
{
	char why[400], rcpt[320];
	struct fb_event ev;
	if (verp_sender(&fz_app, 1, rcpt, sizeof rcpt) < 0)
		abort();
	for (int pass = 0; pass < 2; pass++) {
		/* the exact bytes, no terminating NUL: the reader must not need one */
		char *mail = malloc(len ? len : 1);
		if (!mail)
			abort();
		memcpy(mail, data, len);
		why[0] = '\0';
		enum fb_kind k = fb_mail_parse(&fz_app, mail, len, pass ? rcpt : NULL,
					       &ev, why, sizeof why);
		fz_check(&ev, k, why);
		if (k != FB_NONE) {
			int rc = fb_apply(&fz_app, &ev, FZ_NOW, why, sizeof why);
			if (rc < -1 || rc > 1 || !*why)
				abort();
		}
		free(mail);
	}
	db_scalar(fz_app.db, "UPDATE steps SET paused_at = NULL, paused_reason = NULL");
	fz_reset();
	return 0;
}
