/*
 * remarket.h: the internal API of remarket, the contract the unit tests
 * link against. Everything not declared here is static in remarket.c.
 *
 * Conventions: functions return 0 on success and a negative value (or an
 * enum value below 0) on failure; "now" is always an argument, never read
 * from the system clock below the CLI and HTTP entry points (only a
 * tick's own bookkeeping reads it: elapsed seconds, when a run started
 * and ended), so that tests move time without sleeping. Strings are
 * NUL-terminated UTF-8.
 *
 * The groups below carry the names and the order of remarket.c's
 * sections (its table of contents); a section with nothing exported has
 * no group here.
 */
#ifndef REMARKET_H
#define REMARKET_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define RM_VERSION "0.5.0"

typedef int64_t rm_time; /* Unix seconds */

/* ==== Buffers and small helpers ======================================= */

/* An append that cannot be done (out of memory) sets the sticky error
 * flag; once set, every append does nothing and returns -1. A builder
 * appends freely and asks buf_failed once, before it reports success. */
struct buf {
	char *data; /* always NUL-terminated when len > 0 or after buf_add* */
	size_t len, cap;
	int failed; /* an append failed: the text is incomplete */
};
int buf_add(struct buf *b, const void *p, size_t n);
int buf_adds(struct buf *b, const char *s);
int buf_addf(struct buf *b, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
int buf_failed(const struct buf *b); /* 1 if an append failed, else 0 */
void buf_reset(struct buf *b); /* empty, error cleared, memory kept */
void buf_free(struct buf *b);   /* empty, error cleared, memory freed */

/* ==== Configuration =================================================== */

#define RM_MAX_CONNECTIONS 16 /* smtp_connections at most */
struct config {
	char *db, *key_file, *base_url, *store_url, *cart_url;
	char *smtp_url, *smtp_user, *smtp_password, *outbox, *from;
	char *tick_token, *hook_secret, *postal_address, *templates;
	char *code_prefix, *store_name, *unsubscribe_mailto;
	char *store_tagline; /* a few words under the store's name in mails */
	char *bounce_address; /* envelope sender, tagged per message (VERP);
			       * "": the from address, untagged */
	char *mailgun_signing_key;   /* POST /feedback/mailgun ("": refused) */
	char *postmark_webhook_auth; /* "user:password" of /feedback/postmark */
	/* SMS (see the SMS section): "" (off), "twilio" or "webhook" */
	char *sms_provider, *sms_from, *twilio_account_sid, *twilio_auth_token;
	char *twilio_api_url; /* https://api.twilio.com; a stand-in in tests */
	char *sms_url, *sms_secret; /* webhook: where, and the signing secret */
	char *logo_url;    /* the store's logo atop every mail ("": its name) */
	char *brand_color; /* #rrggbb: buttons and the mails' top rule */
	char *currency; /* ISO 4217; mails with no cart or order use it ("": none) */
	char *locale;   /* how mails write money and dates: "en_GB", "fr_FR" */
	char *timezone; /* IANA name mails' dates are in ("Europe/Paris") */
	char *reply_to; /* optional Reply-To mailbox, written like from */
	char *store_origin; /* scheme://host[:port] allowed to call /collect */
	char *static_dir;   /* remarket.js */
	char *vapid_key_file; /* web push: the VAPID key (keygen --vapid) */
	char *vapid_subject;  /* web push: mailto: or https: contact of the store */
	char *log_pii;      /* "yes": the log may name addresses; "no": ids only */
	long idle_minutes;  /* a cart idle this long is abandoned */
	long browse_idle_minutes; /* views with no cart this long: browse flow */
	long max_body;      /* bytes; larger request bodies get 413 */
	long threads;       /* FastCGI worker threads */
	long max_lateness_hours; /* a step later than this is stale (0: never) */
	long min_gap_hours; /* one message a contact per this, across flows (0: off) */
	char *quiet_hours_email, *quiet_hours_sms, *quiet_hours_push; /* "21-9", "" */
	long retention_days; /* raw events older than this go (0: kept) */
	long lease_seconds; /* how long a claimed message stays claimed */
	long smtp_connect_timeout; /* seconds to connect to the relay */
	long smtp_reply_timeout;   /* seconds to wait for each relay reply */
	long smtp_connections;     /* a tick sends on this many at once, 1..16 */
	long tick_budget_seconds;  /* a tick stops claiming after this */
	long max_items;     /* items per cart */
	long max_qty;       /* units per line of an event */
	long import_max_qty; /* units per line of an imported order */
	long import_max_items; /* lines of an imported order */
	long rate_ip_per_min, rate_visitor_per_min; /* browser events */
	char *trusted_proxies; /* addresses/CIDRs whose X-Forwarded-For counts */
	char *socket_group;    /* group of the 0660 FastCGI socket */
	long browser_new_contacts_per_hour; /* past this, browser-only contacts
					     * are recorded, not mailed */
	char *browser_consent; /* "checkbox", or "confirm": double opt-in */
	long attribution_click_days; /* an order within this of a click */
	long attribution_view_hours; /* "influenced": within this of a send */
	long conversion_days;        /* an enrollee who orders within this */
	char *winback_after;         /* days without an order, or "auto" */
	long winback_cooldown_days;  /* no second win-back within this */
	char *winback_max_idle_days; /* idle longer: no win-back; "auto" = 2x */
	long winback_daily_max;      /* win-back enrollments a rolling 24 h */
	char *allow_insecure_links;  /* "yes": http:// or loopback links may
				      * go to a real relay (tests, staging) */
	int dry_run; /* set by backtest, never read from a file: a due
		      * message is recorded as sent, not composed nor sent */
};
/* Loads defaults, then FILE (NULL: $REMARKET_CONFIG, else ./remarket.conf
 * if it exists), then REMARKET_<KEY> variables. */
int cfg_load(struct config *cfg, const char *file, char *err, size_t errlen);
void cfg_free(struct config *cfg);
/* Splits a mailbox ("Name <addr>", "\"Name, X\" <addr>" or "addr") into
 * its display name (quotes and escapes removed) and address; -1 if one
 * does not fit or there is no address. */
int cfg_mailbox(const char *mb, char *name, size_t nlen, char *addr,
		size_t alen);
/* Makes NAME (an IANA zone of the system's tz database, or "UTC") the
 * process's time zone: cfg_load calls it before any thread starts, so
 * one process writes one store's dates. -1 if the zone is not known. */
int cfg_timezone(const char *name);
/* The UTC offset (seconds east) at T of ZONE, an IANA name read once from
 * the system's tz database and cached (thread-safe, no TZ change); NULL
 * or "" is the process's zone. -1 if ZONE is not known. */
int tz_offset(const char *zone, rm_time t, long *off);
/* 1 if ZONE is a zone of the system's tz database (a browser's tz). */
int tz_known(const char *zone);
/* Quiet hours "FROM-TO" (whole hours, across midnight if FROM > TO) into
 * FROM and TO; "" gives -1, -1 (none). -1 if malformed. */
int quiet_parse(const char *spec, int *from, int *to);
/* The first minute at or after NOW outside CHANNEL's quiet hours
 * (quiet_hours_<channel>) in ZONE (NULL: the store's): NOW if allowed. */
rm_time quiet_next(const struct config *cfg, const char *channel,
		   const char *zone, rm_time now);
/* URL without its password ("smtp://user:pw@relay" gives
 * "smtp://user@relay"), for every message that names smtp_url; a URL
 * curl cannot parse is shown as "(smtp_url: not a URL)", never raw. */
void url_shown(const char *url, char *out, size_t n);

/* ==== Storage: connection, migrations, named statements =============== */

struct db;
int db_open(struct db **out, const char *path, char *err, size_t errlen);
int db_migrate(struct db *db, char *err, size_t errlen);
void db_close(struct db *db);
int db_user_version(struct db *db);
/* Runs one query of the tests' own and returns the first column of the
 * first row as an integer (or -1): a window into the state for tests. */
long long db_scalar(struct db *db, const char *sql);
/* A stable bucket in [0, 10000) for a text (also SQL's rm_bucket()). */
int rm_bucket(const char *text);
/* 1 if a catalog line (SKU, name; either may be NULL) looks like postage,
 * a fee or an adjustment rather than a product (SQL: rm_service). */
int rm_service(const char *sku, const char *name);

/* ==== The application object ========================================== */

#define RM_KEYBYTES 32
#define RM_MAXKEYS 16 /* keys in one key file (the key ring) */
struct app {
	struct config *cfg;
	unsigned char key[RM_KEYBYTES]; /* the newest key: signs every token */
	struct db *db;
	void *curl; /* one CURL handle per app, reused for SMTP keep-alive */
	/* the key ring's older keys, newest first: they only verify, so that
	 * links mailed before `remarket keygen --rotate` keep working */
	unsigned char old_keys[RM_MAXKEYS - 1][RM_KEYBYTES];
	int nold;
	/* the store's median order (a sort of every order): kept for an
	 * hour of the clock, so a win-back offer costs one read a tick, not
	 * one a mail */
	double store_median;
	int64_t median_at;
	int nokey; /* opened without the key ring (app_open_keyless) */
};
int app_open(struct app *app, struct config *cfg, char *err, size_t errlen);
/* As app_open; with KEYLESS, an unreadable key ring leaves app->nokey set
 * (and a random key that verifies nothing) instead of failing. */
int app_open_keyless(struct app *app, struct config *cfg, int keyless,
		     char *err, size_t errlen);
void app_close(struct app *app);

/* ==== Validators ====================================================== */

int val_utf8(const char *s, size_t n);       /* 1 if valid UTF-8 */
int val_email(const char *s);                /* 1 if a plausible address */
int val_text(const char *s, size_t maxlen);  /* 1 if no control chars and at
					      * most maxlen characters */
int val_ident(const char *s, size_t maxlen); /* [A-Za-z0-9._:-]+ */
int val_sku(const char *s); /* 1-64 printable characters */
int val_url(const char *s);                  /* 1 if http(s) URL */
int val_phone(const char *s); /* 1 if E.164: '+' and 8-15 digits, no 0 first */
/* 1 if V is a step's channels: known names ("email", "sms"), comma
 * separated, each once ("sms,email": the first the contact consented to) */
int channels_ok(const char *v);

/* ==== Signed tokens and hook signatures =============================== */

enum tok_kind {
	TOK_RECOVER = 'r',
	TOK_UNSUB = 'u',
	TOK_DISCOUNT = 'd',
	TOK_OPEN = 'o',
	TOK_REPORT = 'p', /* the operator's report link; subject: report_subject */
	TOK_CONFIRM = 'c', /* double opt-in: subject is the contact id */
	TOK_LINK = 'l', /* a tracked store link: subject is the message id,
			 * the MAC also covers the target URL */
};
enum tok_status {
	TOK_OK = 0,
	TOK_MALFORMED = -1,
	TOK_FORGED = -2,
	TOK_EXPIRED = -3,
	TOK_WRONG_KIND = -4,
};
#define TOK_MAXLEN 64
int tok_sign(const unsigned char key[RM_KEYBYTES], char kind, int64_t subject,
	     rm_time expires, char *out, size_t outlen);
int tok_verify(const unsigned char key[RM_KEYBYTES], const char *tok,
	       char kind, rm_time now, int64_t *subject);
const char *tok_strerror(int status);
/* As tok_sign/tok_verify, with BOUND (n bytes, may be NULL) under the MAC
 * too but not in the token: a tracked link binds its target URL. */
int tok_sign_for(const unsigned char key[RM_KEYBYTES], char kind,
		 int64_t subject, rm_time expires, const char *bound, size_t n,
		 char *out, size_t outlen);
int tok_verify_for(const unsigned char key[RM_KEYBYTES], const char *tok,
		   char kind, const char *bound, size_t n, rm_time now,
		   int64_t *subject);
/* tok_verify with each key of the ring, newest first. */
int app_tok_verify(const struct app *app, const char *tok, char kind,
		   rm_time now, int64_t *subject);
int app_tok_verify_for(const struct app *app, const char *tok, char kind,
		       const char *bound, rm_time now, int64_t *subject);

/* Server hook signature "t=<unix>,v1=<hex>" over "<t>.<body>". */
int hook_verify(const char *secret, const char *header, const char *body,
		size_t len, rm_time now, const char **why);
int hook_sign(const char *secret, rm_time t, const char *body, size_t len,
	      char *out, size_t outlen);

/* ==== Templates ======================================================= */

/* A rendering context: scalar variables and named lists of sub-contexts. */
struct tvar {
	const char *name;
	const char *value;            /* scalar, or NULL for a list */
	const struct tctx *list;      /* list elements */
	size_t nlist;
};
struct tctx {
	const struct tvar *vars;
	size_t nvars;
	const struct tctx *parent;    /* outer scope, looked up after vars */
};
enum tpl_mode { TPL_TEXT, TPL_HTML };
/* Renders TPL; partials ({{>name}}) are read from DIR with extension EXT.
 * Returns 0, or -1 with a message in err. */
int tpl_render(const char *tpl, const struct tctx *ctx, enum tpl_mode mode,
	       const char *dir, const char *ext, struct buf *out, char *err,
	       size_t errlen);
int html_escape(struct buf *out, const char *s);

/* ==== Events: validation and state (contacts, carts, orders) ========== */

enum ev_source { EV_HOOK, EV_BROWSER, EV_CLI, EV_PIXEL };
struct ev_error {
	int status;        /* HTTP status the caller should answer */
	int duplicates;    /* on success: repeated orders not stored again */
	char msg[160];     /* "items[3].price: must be a number >= 0" */
};
/* Validates and records one event object or an array of them, all or
 * nothing, and updates contacts, carts and orders. Returns the number of
 * events accepted (>= 0) or -1 with err filled in. visitor is the browser
 * cookie's visitor id, or NULL. */
int ev_ingest(struct app *app, enum ev_source src, const char *json,
	      size_t len, const char *visitor, rm_time now,
	      struct ev_error *err);
/* As ev_ingest, but the events of a batch that fail validation are left
 * out instead of refusing the whole batch (POST /events?partial=1):
 * REFUSED gets a JSON array of {"index":I,"error":"..."}, "[]" if none.
 * Returns the events accepted, or -1 (the body, or storing, failed). */
int ev_ingest_partial(struct app *app, enum ev_source src, const char *json,
		      size_t len, const char *visitor, rm_time now,
		      struct ev_error *err, struct buf *refused);

/* ==== Catalog and order imports (CSV) ================================= */

/* The CSV importers (`remarket import products|orders`): the first record
 * names the columns (separated by ',', ';' or tabs, after a UTF-8 byte
 * order mark or not), each row is validated and recorded as an EV_CLI
 * event (orders in transactions of at most 500 orders or 10 ms). Print
 * the counts on stdout, up to 20 refusals on stderr (with the line of
 * the file and the CSV's column) and a summary by reason. Return 0, or 1
 * if a row was refused or the header is missing or lacks a required
 * column (nothing is imported then). */
int import_products(struct app *app, FILE *f, rm_time now);
int import_orders(struct app *app, FILE *f, rm_time now);
int import_orders_rejects(struct app *app, FILE *f, rm_time now,
			  FILE *rejects);
/* The same for ORDERS (1) or products (0), with NAME (the file's, for
 * messages; NULL: "CSV"), REJECTS (orders only) and DRY_RUN: every line
 * checked as the import would, nothing written, the counts printed as
 * {"dry_run":true,"would_import":N,"refused":M}. */
int import_file(struct app *app, int orders, FILE *f, rm_time now,
		const char *name, FILE *rejects, int dry_run);
/* If set, called after each write transaction of import_orders commits,
 * with the orders imported so far: the store's database is free then
 * (tests post a hook there). */
extern void (*import_committed)(struct app *app, long orders);

/* ==== Segments ======================================================== */

/* The RFM segments, in the report's order. segment_names[] holds their
 * names as the SQL (SEGMENTS_FILL) writes them into segments.segment. */
enum segment { SEG_NEW, SEG_ACTIVE, SEG_VIP, SEG_AT_RISK, SEG_LAPSED,
	       SEG_LOST, SEG__MAX };
extern const char *const segment_names[SEG__MAX];
/* Days without an order after which a customer is lapsed: winback_after,
 * or with "auto" the 90th percentile of the gaps between customers'
 * consecutive orders, clamped to 60-180 (90 with fewer than 20 gaps). WHY
 * says how the number was found. */
long flow_lapse_days(struct app *app, char *why, size_t whylen);
/* Brings every customer's RFM scores and segment (table segments) up to
 * NOW, incrementally: only customers whose orders changed or who crossed
 * a time boundary are recomputed (the tick does the same, and enrolls). */
int flow_segments(struct app *app, rm_time now);
/* The reference: every segment recomputed from every order in one
 * transaction, as SEGMENTS_FILL does. For tests. */
int flow_segments_full(struct app *app, rm_time now);

/* ==== Recommendations ================================================= */

/* Up to N product skus to recommend to CONTACT, best first, in OUT
 * (each up to 64 bytes), after bringing the item-to-item table up to
 * date. Returns how many, or -1. */
int reco_for(struct app *app, int64_t contact, char (*out)[65], int n);
/* Brings the item-to-item table forward over the orders recorded since
 * the last call, in transactions of about CHUNK order lines each, until
 * it is current or BUDGET_MS of wall time have passed (0: no limit).
 * Returns the rows it wrote (0: it was current), or -1. */
long reco_refresh(struct app *app, long chunk, long budget_ms);
/* Sets SKU's kind ('product' or 'service') and corrects the table;
 * -1 if SKU is not in the catalog or KIND is neither. */
int reco_set_kind(struct app *app, const char *sku, const char *kind);

/* ==== Mail: rendering and RFC 5322 building =========================== */

struct mail {
	const char *from, *to, *subject, *message_id, *list_unsub;
	const char *text, *html;
	rm_time date;
	const char *feedback_id; /* optional: "flow:step:remarket" */
	const char *to_name;     /* optional: the contact's name in To */
	const char *reply_to;    /* optional: "Name <addr>" for Reply-To */
};
/* Builds the complete RFC 5322 message; -1 if a header would carry CR/LF
 * or OUT failed (out of memory), with the reason in err. */
int mail_build(const struct mail *m, struct buf *out, char *err,
	       size_t errlen);
/* Appends "NAME <addr>" as a header's value: a name with specials as an
 * RFC 5322 quoted-string, a non-ASCII one as RFC 2047 encoded-words, no
 * name as the bare address. -1 if OUT failed. */
int mail_mailbox(struct buf *out, const char *name, const char *addr);
/* 1 if LOCALE is in the table of locales mails can write. */
int mail_locale_known(const char *locale);
/* Money V in currency CUR ("" none) as LOCALE writes it ("£22.00",
 * "22,00 €" with a no-break space); WHOLE: no decimals if V is whole. */
void mail_money(char *out, size_t n, double v, const char *cur,
		const char *locale, int whole);
/* Time T in the process's time zone (cfg_timezone) as LOCALE writes a
 * day and hour: "Sunday 6 December, 14:00". */
void mail_date(char *out, size_t n, rm_time t, const char *locale);

/* ==== Transports: SMTP and outbox ===================================== */

enum send_result {
	SEND_OK = 0,
	SEND_TEMP = 1,   /* try again later: a 4xx or a time-out after the greeting */
	SEND_PERM = 2,   /* the recipient is refused (5xx to RCPT with 5.1.x or
			  * 5.2.x, or to the data) */
	SEND_CONFIG = 3, /* the relay refuses us (login, sender): stop the tick */
	SEND_CONTENT = 4, /* a 5xx to the content: this recipient, or the
			   * content/sender for all (the tick decides) */
	SEND_RCPT = 5,   /* a 5xx to RCPT without an enhanced status code:
			  * this recipient, or us (the tick decides) */
	SEND_DOWN = 6,   /* the relay unavailable: connection refused, a time-out
			  * or a 4xx before its greeting; stop the tick */
};

/* The envelope sender (MAIL FROM) of message MESSAGE: with bounce_address
 * "bounces@d", "bounces+<id>.<mac>@d" (VERP, the tag signed by the key
 * ring); without it (or for MESSAGE <= 0) the from address. -1 if OUT is
 * too small. */
int verp_sender(const struct app *app, int64_t message, char *out, size_t n);
/* 0 and the message if ADDR ("<a@d>" or "a@d") is bounce_address with a
 * tag that verifies under a key of the ring; -1 otherwise (forged,
 * malformed, another address, or no bounce_address). */
int verp_parse(const struct app *app, const char *addr, int64_t *message);

/* ==== Web push: VAPID and RFC 8291 encryption ========================= */

#define PUSH_MAX_PAYLOAD 3993 /* plaintext bytes: 4096 on the wire at most */
/* The aes128gcm body (RFC 8188: salt, rs 4096, keyid = AS_PUB, one
 * record) of MSG encrypted to a browser (its P-256 key UA_PUB and auth
 * secret AUTH, RFC 8291), with the server key pair and salt given, so a
 * test can replay RFC 8291's example; appended to OUT. -1 on a bad key
 * or a message over PUSH_MAX_PAYLOAD. */
int push_encrypt_with(const unsigned char ua_pub[65],
		      const unsigned char auth[16],
		      const unsigned char as_priv[32],
		      const unsigned char as_pub[65],
		      const unsigned char salt[16], const void *msg, size_t n,
		      struct buf *out);
/* The same with a new server key pair and a random salt: a message. */
int push_encrypt(const unsigned char ua_pub[65], const unsigned char auth[16],
		 const void *msg, size_t n, struct buf *out);
/* A new VAPID key pair (P-256) written to PATH (PEM, 0600, never over an
 * existing file); its public key (base64url of the uncompressed point,
 * what a browser's pushManager.subscribe wants) in PUB. */
int vapid_keygen(const char *path, char *pub, size_t publen, char *err,
		 size_t errlen);
/* The public key of the VAPID key in PATH, base64url, in PUB. */
int vapid_public(const char *path, char *pub, size_t publen, char *err,
		 size_t errlen);
/* The VAPID JWT (RFC 8292, ES256) for push service origin AUD, valid
 * until EXP, subject SUB (mailto: or https:), signed with the key in
 * PATH; appended to OUT. */
int vapid_jwt(const char *path, const char *aud, rm_time exp, const char *sub,
	      struct buf *out, char *err, size_t errlen);
/* Sends one notification ({title, body, url, icon} JSON, encrypted) to
 * push subscription SUBSCRIPTION_ID; 0 when the push service took it
 * (201). A 404 or 410 deletes the subscription (the browser left) and
 * returns -2; any other failure -1, the reason in ERR. The JWT's expiry
 * is on the real clock: the push service checks it against its own. */
int push_send(struct app *app, int64_t subscription_id, const char *title,
	      const char *body, const char *url, char *err, size_t errlen);
/* 1 if push is set up for flows: the VAPID key file readable and
 * vapid_subject set. */
int push_ready(const struct config *cfg);

/* ==== The message context ============================================= */

/* Template TPL rendered and built as the tick would for the contact of
 * EMAIL (their latest cart or order; NULL: a sample contact), addressed
 * to TO (NULL: the contact), PREFIX before the subject ("[TEST] " or "").
 * TRIGGER (NULL: the trigger of the step that sends TPL) says which kind
 * of mail it is. Writes nothing: no message, attempt or code; links are
 * signed for message 0 and a discount shows PREVIEW_CODE. */
#define PREVIEW_CODE "SAMPLE-NOT-A-CODE"
int mail_preview(struct app *app, const char *tpl, const char *trigger,
		 const char *email, const char *to, rm_time now,
		 const char *prefix, struct buf *text, struct buf *html,
		 struct buf *msg, char *err, size_t errlen);

/* ---- SMS (see the SMS section of remarket.c) ---- */
/* How TEXT travels: GSM-7 (septets, an extension character counting
 * two) unless one character is outside it, then UCS-2 (UTF-16 units);
 * one segment holds 160 septets or 70 units, each of several 153 or 67.
 * Returns the segments, -1 if TEXT is not UTF-8. */
struct sms_count {
	int ucs2;     /* 0: GSM-7 */
	size_t units; /* septets, or UTF-16 code units */
	int segments;
};
int sms_segments(const char *text, struct sms_count *c);
/* TEXT as one line (whitespace runs made one space) into OUT, with
 * "STORE: " before it unless it names STORE, and " Reply STOP to opt
 * out." after it unless it says "STOP to opt out". */
int sms_finish(const char *store, const char *text, struct buf *out);
/* An SMS of template TPL (TPL.sms) as mail_preview renders a mail. */
int sms_preview(struct app *app, const char *tpl, const char *trigger,
		const char *email, rm_time now, struct buf *out, char *err,
		size_t errlen);
/* What an HTTP STATUS (0: no answer) of PROVIDER ("twilio", "webhook"),
 * with its error CODE (Twilio's, else 0), means for the message. */
enum send_result sms_classify(const char *provider, long status, long code);
/* 1 if sms_provider and its settings are there. */
int sms_ready(const struct config *cfg);
/* Twilio's X-Twilio-Signature for a POST of FORM (urlencoded, LEN bytes)
 * to URL signed with TOKEN, base64 into OUT (29 bytes or more). */
int sms_twilio_signature(const char *token, const char *url, const char *form,
			 size_t len, char *out, size_t outlen);
/* An inbound reply's keyword: SMS_STOP, SMS_START, SMS_HELP, or 0. */
enum { SMS_STOP = 1, SMS_START = 2, SMS_HELP = 3 };
int sms_keyword(const char *body);

/* 1 if template TPL (text or HTML, or a partial of theirs) shows VAR:
 * the recommendation queries run only for a template that shows them. */
int mc_template_uses(struct app *app, const char *tpl, const char *var);
/* A loyalty code's minimum spend from a median order V: rounded down
 * to a price a person would write (the rule is in remarket.c). */
double min_spend_nice(double v);
/* CONTACT's median order, else the store's (read at most once an hour of
 * NOW, kept in app->store_median). */
double median_order(struct app *app, int64_t contact, rm_time now);

/* A tracked link to TARGET for message MSG (/l/<token>?u=<target>, valid
 * until EXPIRES) in OUT: 1 if it was made, 0 if TARGET is not on
 * store_url's host (OUT gets TARGET as it is), -1 on failure. */
int mc_link(struct app *app, int64_t msg, const char *target,
	    rm_time expires, struct buf *out);
/* 1 if URL is http(s) on store_url's host (the only place /l/ goes). */
int link_on_store(const struct config *cfg, const char *url);

/* ==== The flow engine: detect, claim, send, record ==================== */

/* What kept mail from going, one line each ("templates/x.html:12: ...",
 * the relay's refusal, a disk that cannot be written), each said once;
 * past RM_PROBLEMS lines only counted (more). */
#define RM_PROBLEMS 8
struct problems {
	char line[RM_PROBLEMS][400];
	int n;
	long more;
};
/* Adds a line to P unless it is there already. */
void problem_add(struct problems *p, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

struct tick_summary {
	long abandoned, enrolled, sent, retry, failed, exited, skipped;
	int budget_spent; /* the budget ran out: the rest waits for the next tick */
	long stale;        /* steps too late to send: recorded, not sent */
	long deferred;     /* held back by a timing rule (gap, cart, quiet) */
	long deferred_skipped; /* of the stale, those a timing rule held back */
	long winback_waiting; /* lapsed held back by winback_daily_max */
	long held_out;     /* of the enrolled: the holdout, never messaged */
	char stopped[400]; /* why the tick stopped early, or "" */
	struct problems problems; /* a tick with any exits non-zero */
};
/* Marks idle carts abandoned and enrolls them. */
int flow_detect(struct app *app, rm_time now, struct tick_summary *sum);
/* Claims up to LIMIT due messages with a lease; writes their ids. */
int flow_claim(struct app *app, rm_time now, int64_t *ids, int limit);
/* One whole tick: detect, claim, check exits, render, send, record. */
int flow_tick(struct app *app, rm_time now, struct tick_summary *sum);
int tick_json(struct app *app, const struct tick_summary *s, rm_time now,
	      struct buf *out);

/* ==== Feedback: bounces, complaints, unsubscribes by mail ============= */

enum fb_kind { FB_NONE, FB_HARD, FB_SOFT, FB_COMPLAINT, FB_UNSUB };
/* One bounce, complaint or unsubscribe that came back after a message. */
struct fb_event {
	enum fb_kind kind;
	int64_t message;      /* messages.id proven by a VERP tag, or 0 */
	char message_id[256]; /* "<...>": a Message-ID the report names */
	char email[256];      /* the recipient (a mailed unsubscribe: From) */
	char status[32];      /* "5.1.1", "abuse", "mailto", a provider's word */
	int by_email;         /* the address alone may name the contact */
	const char *source;   /* "mail", "remarket", "mailgun", "postmark" */
};
/* Reads one mail (a DSN, an ARF report, a mail to unsubscribe_mailto)
 * into EV; RCPT is its envelope recipient, or NULL. Returns EV's kind;
 * FB_NONE with the reason in WHY when the mail is none of those or asks
 * for nothing (a delay warning, a not-spam report). */
enum fb_kind fb_mail_parse(const struct app *app, const char *mail,
			   size_t len, const char *rcpt, struct fb_event *ev,
			   char *why, size_t whylen);
/* Acts on EV at NOW (suppress, unsubscribe, count, pause the step) and
 * records it once per message. 0: done, WHAT says what; 1: left alone,
 * WHAT says why (no message or contact of ours, already recorded); -1:
 * the database failed (try again later). */
int fb_apply(struct app *app, const struct fb_event *ev, rm_time now,
	     char *what, size_t whatlen);
/* For `remarket status`: appends one line to OUT for each step whose
 * complaints passed 0.1 % of its sends in the 7 days before NOW (over
 * 0.3 % it is paused, and the line says so). Returns how many, or -1. */
int feedback_complaint_warnings(struct app *app, rm_time now, struct buf *out);
/* ==== Checks before sending and status ================================ */

/* What `remarket status` and GET /rm/health (for the operator) show, and
 * what init, serve and a tick check before they start: one table of
 * checks (remarket.c), each with a level. */
enum check_level { CHECK_OK = 0, CHECK_WARN = 1, CHECK_STOP = 2 };
#define CHECK_START 1  /* init and serve refuse to start on a STOP */
#define CHECK_TICK 2   /* a tick refuses to send on a STOP */
#define CHECK_STATUS 4 /* remarket status, GET /rm/health */
/* Runs the checks of WHEN (a CHECK_* bit). APP->db may be NULL (no
 * database yet) and APP's key absent: checks that need them say so.
 * Appends {"status":"ok|warn|stop","exit":N,"checks":[...]} to JSON
 * (NULL: not made), the STOP lines to PROBLEMS (NULL: not kept), and
 * the operator's text to TEXT (NULL: not made). Returns the worst level,
 * or -1 (out of memory). */
int check_run(struct app *app, rm_time now, int when, struct buf *json,
	      struct problems *problems, struct buf *text);
/* ==== Backtest ======================================================== */

/* What one flow would have done over the replayed history. */
struct bt_flow {
	char name[64], trigger[20];
	char first[11], last[11]; /* first and last enrollment, YYYY-MM-DD */
	long enrolled, held_out, mails;
	long window_days; /* a return counts within this of the enrollment */
	long complete;    /* enrollments whose window ended in the history */
	long back_complete; /* of those, who ordered within it: organic */
	long back;        /* who ordered within it, of all the enrolled */
	char peak_day[11];
	long peak_mails;
};
/* Per flow and day: enrolled, and mails by the day they were due. */
struct bt_day {
	int flow; /* index into flows[] */
	char date[11], week[11]; /* the day, the Monday of its week */
	long enrolled, mails;
};
struct backtest {
	rm_time from, to;
	long days, orders, refunds, lapse_days;
	char lapse_why[200];
	double seconds; /* wall time of the whole run */
	struct bt_flow flows[16];
	int nflows;
	struct bt_day *per_day;
	size_t ndays;
};
/* Replays the flows over the store's history from FROM to TO (one tick
 * a day, nothing sent) on a temporary copy of the database (in $TMPDIR,
 * else /tmp; removed after) and fills BT. Only reads the store's
 * database. -1 with the reason in ERR. */
int backtest_run(struct app *app, rm_time from, rm_time to,
		 struct backtest *bt, char *err, size_t errlen);
void backtest_free(struct backtest *bt);
int backtest_json(const struct backtest *bt, struct buf *out);
int backtest_text(const struct backtest *bt, struct buf *out);

/* ==== The report ====================================================== */

/* Difference of two conversion rates, treated (x1 of n1) minus control
 * (x2 of n2), with a 95 % Wald interval. too_small when either group has
 * fewer than 30 members or there are fewer than 5 conversions in all. */
struct lift {
	double p1, p2, diff, lo, hi;
	int too_small;
};
void stat_lift(long x1, long n1, long x2, long n2, struct lift *out);
/* What a lift is worth: diff x N messaged x AOV, with its 95 % interval
 * (lo and hi of the lift, times the same N x AOV; the order value is
 * taken as known). */
struct incremental {
	double value, lo, hi;
};
void stat_incremental(const struct lift *l, long messaged, double aov,
		      struct incremental *out);
/* When the verdict will be known at the current effect: how many more
 * enrollments (messaged and held out together, in today's proportion)
 * until the 95 % interval of L, over N1 messaged and N2 held out, excludes
 * zero and the groups are big enough (stat_lift's too_small); 0 when it
 * already does, -1 when no estimate can be made (no holdout, or no
 * difference seen yet). */
long stat_more_needed(const struct lift *l, long n1, long n2);
/* Days for MORE enrollments at PER_DAY a day; -1 when unknown. */
double stat_days_needed(long more, double per_day);

#define REPORT_FLOWS 8
#define REPORT_STEPS 16
#define REPORT_DAYS 120
#define REPORT_MONTHS 24
struct step_report {
	int position;
	char variant;             /* 'A', or 'B' for a step's second version */
	long sent, opened, clicked, orders, converted;
	double revenue;
	struct lift ab;           /* on a 'B' row: B against A */
	/* of the sent: those that bounced or drew a complaint later
	 * (`remarket feedback`, POST /feedback), and their share of sent */
	long bounced, complained;
	double bounce_rate, complaint_rate;
	char name[80];            /* "Cart reminder · +1 h": template and delay */
};
/* One channel's messages sent in the period (messages.channel) and what
 * they drew: clicks, unsubscribes, and orders attributed to them. */
#define REPORT_CHANNELS 4
struct channel_report {
	char name[8];             /* "email", "sms", "push" */
	long sent, clicked, unsubscribed, orders;
	double revenue;
};
struct flow_report {
	char name[64];
	int holdout_pct, enabled;
	long enrolled, held_out, converted, held_converted;
	struct lift lift;         /* messaged against held out */
	long sent, bounced, complained; /* the steps' sums */
	double bounce_rate, complaint_rate;
	struct incremental incr;  /* lift x enrolled x the period's average order */
	long more_needed;         /* stat_more_needed of lift */
	double days_needed;       /* at this flow's enrollments per day */
	struct step_report steps[REPORT_STEPS];
	int nsteps;
};
struct report {
	rm_time since, until;
	long conversion_days;      /* the window of "recovered" (config) */
	char currency[8];
	long abandoned, recovered, orders, attributed, influenced;
	long orders_no_cart; /* orders that named no cart remarket knew (counted, attributed by contact) */
	double recovery_rate, revenue, recovered_revenue, influenced_revenue;
	double attributed_revenue; /* orders attributed (click or code) to any message */
	double aov;                /* revenue / orders: the period's average order */
	/* recovery_lift x abandoned (messaged) x aov, with its interval */
	struct incremental incr;
	long more_needed;          /* enrollments until recovery_lift's verdict */
	double days_needed;        /* at the period's cart enrollments per day */
	long sent, opened, clicked, unsubscribed, bounced, codes_issued, codes_redeemed;
	long stale;                /* steps recorded stale: too late to send */
	long deferred;             /* held back by a timing rule (gap, cart, quiet) */
	long deferred_skipped;     /* ... and skipped as stale in the end */
	double unsubscribe_rate, discount_cost;
	long codes_reused, codes_expired; /* orders whose code was used before, or had expired */
	long browser_held; /* new browser-only contacts past the hourly cap */
	/* the held-out carts (abandoned in the period) and those ordered
	 * anyway; recovery_lift: recovered, messaged against held out */
	long held_abandoned, held_recovered;
	struct lift recovery_lift;
	struct flow_report flows[REPORT_FLOWS];
	int nflows;
	struct channel_report channels[REPORT_CHANNELS];
	int nchannels;
	struct { char month[8]; long orders, attributed; double revenue; } months[REPORT_MONTHS];
	int nmonths;
	long lapse_days, lapsed, contacted, reactivated;
	char lapse_why[200];
	double reactivation_rate;  /* contacted who ordered within 30 days */
	/* held-out win-back customers (their first mail would have gone in
	 * the period) and those who ordered within 30 days of it anyway;
	 * reactivation_lift: contacted against held out */
	long held_contacted, held_reactivated;
	struct lift reactivation_lift;
	long segments[SEG__MAX];   /* customers per segment, by enum segment */
	double daily[REPORT_DAYS]; /* attributed revenue by day, last day = until */
	rm_time first_day;
	int ndays;
};
int report_build(struct app *app, rm_time since, rm_time until, struct report *r);
int report_json(const struct report *r, struct buf *out);
int report_html(const struct report *r, const char *store_name, struct buf *out);

/* ==== HTTP routes ===================================================== */

struct http_req {
	const char *method, *path, *query;
	const char *content_type, *authorization, *signature, *cookie;
	const char *twilio_signature; /* X-Twilio-Signature (/sms/inbound) */
	const char *origin;
	/* the client: REMOTE_ADDR, or from X-Forwarded-For when REMOTE_ADDR
	 * is one of trusted_proxies (the front-ends work it out) */
	const char *remote_addr;
	const char *body;
	size_t body_len;
	int body_too_large; /* the transport stopped reading at max_body */
};
struct http_resp {
	int status;
	const char *content_type;
	struct buf headers; /* extra "Name: value\r\n" lines */
	struct buf body;
};
/* Answers one request; a response whose buffers failed becomes a 500. */
void http_handle(struct app *app, const struct http_req *rq,
		 struct http_resp *rs, rm_time now);
void http_resp_free(struct http_resp *rs);

/* ==== FastCGI and CGI front-ends ====================================== */

/* The front-ends' whole path for one request: CGI parameters from ENV (a
 * NULL-terminated array of "NAME=value"), the body from BODY, and the CGI
 * response (Status, headers, blank line, body) appended to OUT. Uses the
 * real clock or $REMARKET_NOW, as the front-ends do. */
void http_serve_cgi(struct app *app, const char *const *env, const char *body,
		    size_t len, struct buf *out);

/* Group commit (`remarket serve` starts it): a writer thread with its own
 * connection to cfg->db stores the events of every ev_ingest of this
 * process, several requests in one transaction; each ev_ingest returns
 * once its events are committed (or with its own error). ev_writer_stop
 * stores what is queued, then ends the thread; ev_ingest then stores its
 * events itself again. Stats count since the process started. */
int ev_writer_start(struct config *cfg, char *err, size_t errlen);
void ev_writer_stop(void);
struct ev_writer_stats {
	long queued;   /* requests waiting for the writer now */
	long storing;  /* requests in the batch it is storing now */
	long requests; /* requests stored by the writer */
	long batches;  /* transactions (commits) it took for them */
};
void ev_writer_stats(struct ev_writer_stats *st);

#endif
