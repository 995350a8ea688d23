/* smtp_loop.c: raw libcurl SMTP send loop, the baseline for
 * `remarket tick` in bench/run.sh. It sends COUNT copies of a message
 * through CONNS connections (default 1), each one reused easy handle in
 * its own thread (so each SMTP connection is kept open across messages,
 * as a well-written sender would); the COUNT messages are shared out
 * among them.
 * The message is FILE, as it is (an .eml from remarket's outbox, which
 * holds exactly the bytes remarket gives SMTP, so that "remarket vs loop"
 * compares like with like), or a prebuilt ~3 KB multipart/alternative
 * message when FILE is "-" or missing.
 * Usage: smtp_loop SMTP_URL COUNT [FILE|- [CONNS]]
 * Prints: <count> <seconds> <msgs_per_sec>
 */
#include <curl/curl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct upload {
    const char *data;
    size_t len, pos;
};

static size_t read_cb(char *buf, size_t size, size_t nmemb, void *userp)
{
    struct upload *u = userp;
    size_t room = size * nmemb, left = u->len - u->pos;
    if (left > room)
        left = room;
    memcpy(buf, u->data + u->pos, left);
    u->pos += left;
    return left;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Append a line (without CRLF) to the message buffer, adding CRLF. */
static void add(char *msg, size_t cap, size_t *len, const char *line)
{
    size_t n = strlen(line);
    if (*len + n + 2 >= cap) {
        fprintf(stderr, "smtp_loop: message buffer too small\n");
        exit(1);
    }
    memcpy(msg + *len, line, n);
    memcpy(msg + *len + n, "\r\n", 2);
    *len += n + 2;
    msg[*len] = '\0';
}

static size_t build_message(char *msg, size_t cap)
{
    size_t len = 0;
    int i;
    msg[0] = '\0';
    add(msg, cap, &len, "Date: Mon, 24 Nov 2025 12:00:00 +0000");
    add(msg, cap, &len, "From: Rattan & Co <shop@shop.example>");
    add(msg, cap, &len, "To: Shopper <shopper@example.com>");
    add(msg, cap, &len, "Subject: You left something in your cart");
    add(msg, cap, &len, "Message-ID: <bench-0001@shop.example>");
    add(msg, cap, &len, "MIME-Version: 1.0");
    add(msg, cap, &len, "List-Unsubscribe: <https://shop.example/rm/u/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA>");
    add(msg, cap, &len, "List-Unsubscribe-Post: List-Unsubscribe=One-Click");
    add(msg, cap, &len, "Content-Type: multipart/alternative; boundary=\"=_rm_bench_boundary\"");
    add(msg, cap, &len, "");
    add(msg, cap, &len, "--=_rm_bench_boundary");
    add(msg, cap, &len, "Content-Type: text/plain; charset=utf-8");
    add(msg, cap, &len, "Content-Transfer-Encoding: 8bit");
    add(msg, cap, &len, "");
    add(msg, cap, &len, "Hi Shopper,");
    add(msg, cap, &len, "");
    add(msg, cap, &len, "you left these items in your cart:");
    add(msg, cap, &len, "");
    for (i = 0; i < 3; i++)
        add(msg, cap, &len, "  1 x Rattan lamp  39.90 EUR  https://shop.example/p/lamp");
    add(msg, cap, &len, "");
    add(msg, cap, &len, "Total: 119.70 EUR");
    add(msg, cap, &len, "Complete your order: https://shop.example/rm/r/c-1?t=AAAAAAAAAAAAAAAAAAAAAAAA");
    add(msg, cap, &len, "");
    add(msg, cap, &len, "Unsubscribe: https://shop.example/rm/u/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    add(msg, cap, &len, "");
    add(msg, cap, &len, "--=_rm_bench_boundary");
    add(msg, cap, &len, "Content-Type: text/html; charset=utf-8");
    add(msg, cap, &len, "Content-Transfer-Encoding: 8bit");
    add(msg, cap, &len, "");
    add(msg, cap, &len, "<!doctype html><html><head><meta charset=\"utf-8\"><title>Your cart</title></head>");
    add(msg, cap, &len, "<body style=\"font-family:Helvetica,Arial,sans-serif;color:#222;background:#fafafa\">");
    add(msg, cap, &len, "<table role=\"presentation\" width=\"100%\" cellpadding=\"0\" cellspacing=\"0\"><tr><td align=\"center\">");
    add(msg, cap, &len, "<table role=\"presentation\" width=\"600\" cellpadding=\"12\" cellspacing=\"0\" style=\"background:#fff\">");
    add(msg, cap, &len, "<tr><td><h1 style=\"font-size:22px\">Hi Shopper, you left something behind</h1></td></tr>");
    for (i = 0; i < 3; i++) {
        add(msg, cap, &len, "<tr><td><a href=\"https://shop.example/p/lamp\"><img src=\"https://shop.example/img/lamp.jpg\" width=\"96\" height=\"96\" alt=\"Rattan lamp\"></a>");
        add(msg, cap, &len, "<a href=\"https://shop.example/p/lamp\" style=\"color:#222\">Rattan lamp</a> &times; 1 &mdash; 39.90 EUR</td></tr>");
    }
    add(msg, cap, &len, "<tr><td style=\"font-weight:bold\">Total: 119.70 EUR</td></tr>");
    add(msg, cap, &len, "<tr><td><a href=\"https://shop.example/rm/r/c-1?t=AAAAAAAAAAAAAAAAAAAAAAAA\" style=\"display:inline-block;padding:12px 24px;background:#0a7;color:#fff;text-decoration:none;border-radius:4px\">Complete your order</a></td></tr>");
    add(msg, cap, &len, "<tr><td style=\"font-size:12px;color:#888\">You receive this because you started an order at shop.example.");
    add(msg, cap, &len, "<a href=\"https://shop.example/rm/u/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\" style=\"color:#888\">Unsubscribe</a></td></tr>");
    add(msg, cap, &len, "</table></td></tr></table></body></html>");
    add(msg, cap, &len, "");
    add(msg, cap, &len, "--=_rm_bench_boundary--");
    return len;
}

/* Reads the whole message FILE (up to cap bytes); its length, or 0. */
static size_t read_message(const char *path, char *msg, size_t cap)
{
    FILE *f = fopen(path, "rb");
    size_t n;
    if (!f) {
        perror(path);
        return 0;
    }
    n = fread(msg, 1, cap, f);
    if (n == cap || ferror(f)) {
        fprintf(stderr, "smtp_loop: %s: unreadable or larger than %zu bytes\n", path, cap - 1);
        n = 0;
    }
    fclose(f);
    return n;
}

struct sender {
    const char *url, *msg;
    size_t len;
    long first, count; /* recipients first .. first + count - 1 */
    int failed;
};

/* One connection: its own easy handle, reused for each of its messages. */
static void *send_loop(void *arg)
{
    struct sender *sd = arg;
    struct upload up = {sd->msg, sd->len, 0};
    char rcpt[64];
    CURL *c = curl_easy_init();
    CURLcode rc;
    long i;

    if (!c) {
        fprintf(stderr, "smtp_loop: libcurl init failed\n");
        sd->failed = 1;
        return NULL;
    }
    curl_easy_setopt(c, CURLOPT_URL, sd->url);
    curl_easy_setopt(c, CURLOPT_MAIL_FROM, "<shop@shop.example>");
    curl_easy_setopt(c, CURLOPT_READFUNCTION, read_cb);
    curl_easy_setopt(c, CURLOPT_READDATA, &up);
    curl_easy_setopt(c, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 30L);
    for (i = sd->first; i < sd->first + sd->count; i++) {
        struct curl_slist *to;
        snprintf(rcpt, sizeof rcpt, "<shopper%ld@example.com>", i);
        to = curl_slist_append(NULL, rcpt);
        if (!to) {
            fprintf(stderr, "smtp_loop: out of memory\n");
            sd->failed = 1;
            break;
        }
        curl_easy_setopt(c, CURLOPT_MAIL_RCPT, to);
        up.pos = 0;
        rc = curl_easy_perform(c);
        curl_easy_setopt(c, CURLOPT_MAIL_RCPT, (struct curl_slist *)NULL);
        curl_slist_free_all(to);
        if (rc != CURLE_OK) {
            fprintf(stderr, "smtp_loop: message %ld: %s\n", i, curl_easy_strerror(rc));
            sd->failed = 1;
            break;
        }
    }
    curl_easy_cleanup(c);
    return NULL;
}

int main(int argc, char **argv)
{
    static char msg[1 << 20];
    struct sender sd[64];
    pthread_t th[64];
    size_t len;
    long count, conns = 1, i, first = 1;
    double t0, secs;
    int failed = 0;

    if (argc < 3 || argc > 5) {
        fprintf(stderr, "usage: %s SMTP_URL COUNT [FILE|- [CONNS]]\n", argv[0]);
        return 2;
    }
    count = atol(argv[2]);
    if (count < 1) {
        fprintf(stderr, "smtp_loop: COUNT must be >= 1\n");
        return 2;
    }
    if (argc == 5)
        conns = atol(argv[4]);
    if (conns < 1 || conns > 64 || conns > count) {
        fprintf(stderr, "smtp_loop: CONNS must be 1-64 and at most COUNT\n");
        return 2;
    }
    if (argc >= 4 && strcmp(argv[3], "-") != 0)
        len = read_message(argv[3], msg, sizeof msg);
    else
        len = build_message(msg, sizeof msg);
    if (len == 0)
        return 1;

    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, "smtp_loop: libcurl init failed\n");
        return 1;
    }
    for (i = 0; i < conns; i++) {
        sd[i] = (struct sender){argv[1], msg, len, first, count / conns + (i < count % conns), 0};
        first += sd[i].count;
    }
    t0 = now();
    for (i = 0; i < conns; i++)
        if (pthread_create(&th[i], NULL, send_loop, &sd[i]) != 0) {
            fprintf(stderr, "smtp_loop: cannot start thread %ld\n", i + 1);
            return 1;
        }
    for (i = 0; i < conns; i++) {
        pthread_join(th[i], NULL);
        failed |= sd[i].failed;
    }
    secs = now() - t0;
    curl_global_cleanup();
    if (failed)
        return 1;
    printf("%ld %.6f %.1f\n", count, secs, secs > 0 ? (double)count / secs : 0.0);
    fprintf(stderr, "smtp_loop: message size %zu bytes, %ld connection%s\n", len, conns,
            conns > 1 ? "s" : "");
    return 0;
}
