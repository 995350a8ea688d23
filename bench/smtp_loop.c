/* smtp_loop.c: raw libcurl SMTP send loop, the baseline for
 * `remarket tick` in bench/run.sh. It sends COUNT copies of a prebuilt
 * ~3 KB multipart/alternative message through ONE reused easy handle
 * (so the SMTP connection is reused, as a well-written sender would).
 * Usage: smtp_loop SMTP_URL COUNT
 * Prints: <count> <seconds> <msgs_per_sec>
 */
#include <curl/curl.h>
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

int main(int argc, char **argv)
{
    static char msg[8192];
    struct upload up;
    CURL *c;
    CURLcode rc;
    long count, i;
    double t0, secs;
    char rcpt[64];

    if (argc != 3) {
        fprintf(stderr, "usage: %s SMTP_URL COUNT\n", argv[0]);
        return 2;
    }
    count = atol(argv[2]);
    if (count < 1) {
        fprintf(stderr, "smtp_loop: COUNT must be >= 1\n");
        return 2;
    }
    up.data = msg;
    up.len = build_message(msg, sizeof msg);

    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK || !(c = curl_easy_init())) {
        fprintf(stderr, "smtp_loop: libcurl init failed\n");
        return 1;
    }
    curl_easy_setopt(c, CURLOPT_URL, argv[1]);
    curl_easy_setopt(c, CURLOPT_MAIL_FROM, "<shop@shop.example>");
    curl_easy_setopt(c, CURLOPT_READFUNCTION, read_cb);
    curl_easy_setopt(c, CURLOPT_READDATA, &up);
    curl_easy_setopt(c, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 30L);

    t0 = now();
    for (i = 1; i <= count; i++) {
        struct curl_slist *to;
        snprintf(rcpt, sizeof rcpt, "<shopper%ld@example.com>", i);
        to = curl_slist_append(NULL, rcpt);
        if (!to) {
            fprintf(stderr, "smtp_loop: out of memory\n");
            return 1;
        }
        curl_easy_setopt(c, CURLOPT_MAIL_RCPT, to);
        up.pos = 0;
        rc = curl_easy_perform(c);
        curl_easy_setopt(c, CURLOPT_MAIL_RCPT, (struct curl_slist *)NULL);
        curl_slist_free_all(to);
        if (rc != CURLE_OK) {
            fprintf(stderr, "smtp_loop: message %ld: %s\n", i, curl_easy_strerror(rc));
            return 1;
        }
    }
    secs = now() - t0;
    curl_easy_cleanup(c);
    curl_global_cleanup();
    printf("%ld %.6f %.1f\n", count, secs, secs > 0 ? (double)count / secs : 0.0);
    fprintf(stderr, "smtp_loop: message size %zu bytes\n", up.len);
    return 0;
}
