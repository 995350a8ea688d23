#!/bin/sh
# bench/run.sh: measure remarket against baselines measured in the same run
# on the same machine, and print the results as ratios (see bench/README.md).
#
#   A. events/s through nginx into POST /rm/collect and into signed
#      POST /rm/events (a one-event cart batch), remarket vs a bare
#      libfcgi responder (bench/bare.c) behind the same nginx config,
#      the median of BENCH_REPS runs each; after each remarket run the
#      events in its database are counted against the 2xx answers.
#   B. emails/s from `remarket tick` into smtp-sink, vs a raw libcurl
#      SMTP send loop (bench/smtp_loop.c) into the same sink, sending the
#      bytes of one of remarket's own mails: remarket with
#      smtp_connections = 1 against the loop on 1 connection, and with 4
#      against the loop on 4.
#   C. the same through a relay that takes 50 ms per message
#      (bench/slow_relay.py, which also records the Message-IDs):
#      remarket and the loop on 1 and on 4 connections, and remarket's
#      4-connection figure over its 1-connection one.
#   D. a win-back tick on a UCI-sized history (BENCH_UCI_CSV, else
#      bench/uci_like.py: 540 594 lines): imported, segments and the
#      item-to-item table brought up to date, the clock moved to when
#      win-back is due for every lapsed customer (winback_daily_max and
#      winback_max_idle_days lifted, holdout 0), one tick into the
#      outbox. Mails/s against two baselines on the same mails: a loop
#      writing them as the outbox does (open, write, fsync, rename;
#      python3) and the smtp_loop of part B (1 connection, into
#      smtp-sink).
# Then bench/report.sh (report and recommendations on big tables) and,
# from `make bench`, bench/scale.sh (tick, hooks and import at 1 k / 100 k
# [/ 1 M] customers).
#
# Usage: sh bench/run.sh [--baselines-only]
# Tunables (environment): BENCH_N (emails, default 2000),
#   BENCH_WRK_THREADS (2), BENCH_WRK_CONNS (32), BENCH_WRK_SECS (5),
#   BENCH_THREADS (FastCGI threads of both bare and remarket serve, via
#   REMARKET_THREADS; default 4, remarket's own default),
#   BENCH_REPS (runs of each email measurement, median taken; default 3),
#   BENCH_SLOW_N (emails through the slow relay, default 100) and
#   BENCH_SLOW_MS (its time per message, default 50),
#   BENCH_PARTS (default ABCD: the parts to run; A alone: BENCH_PARTS=A),
#   BENCH_UCI_CSV (part D's history: an order CSV with email and consent
#   columns, e.g. the UCI Online Retail export given them; default
#   bench/uci_like.py's), BENCH_WINBACK_NOW (part D's clock, 2012-03-15),
#   BENCH_KEEP=1 keeps the temp dir (logs, databases) for inspection,
#   BENCH_NO_REPORT=1 skips bench/report.sh at the end,
#   REMARKET=path of the binary (default ./remarket in the repo root).
set -eu

cd "$(dirname "$0")/.."
ROOT=$(pwd)
RM=${REMARKET:-$ROOT/remarket}
N=${BENCH_N:-2000}
WRK_T=${BENCH_WRK_THREADS:-2}
WRK_C=${BENCH_WRK_CONNS:-32}
WRK_S=${BENCH_WRK_SECS:-5}
THREADS=${BENCH_THREADS:-4}
REPS=${BENCH_REPS:-3}
SLOW_N=${BENCH_SLOW_N:-100}
SLOW_MS=${BENCH_SLOW_MS:-50}
PARTS=${BENCH_PARTS:-ABCD}
BASE_ONLY=0
[ "${1:-}" = "--baselines-only" ] && BASE_ONLY=1
part() { case $PARTS in *"$1"*) return 0 ;; esac; return 1; }

. bench/lib.sh

need cc
need nginx
need wrk
need curl
need python3
part D && need sqlite3
SINK=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
[ -x "$SINK" ] || die "smtp-sink not found (it comes with the postfix package)"
if [ $BASE_ONLY = 0 ]; then
    [ -x "$RM" ] || die "$RM not found or not executable (build it with make first, or use --baselines-only)"
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/remarket-bench.XXXXXX")
# nginx workers run as www-data (nginx.conf.example) when nginx runs as
# root: they must be able to reach the FastCGI socket in here.
chmod 755 "$TMP"

# Make sure nothing from the caller's environment changes remarket's setup.
for v in $(env | sed -n 's/^\(REMARKET_[A-Za-z0-9_]*\)=.*/\1/p'); do
    unset "$v"
done
[ ! -e remarket.conf ] || warn "./remarket.conf exists and will be read by remarket (keys not set by the bench apply)"

# ---------------------------------------------------------------- build
FCGI_FLAGS=$(pkg-config --cflags --libs fcgi 2>/dev/null || echo -lfcgi)
CURL_FLAGS=$(pkg-config --cflags --libs libcurl 2>/dev/null || echo -lcurl)
# shellcheck disable=SC2086
cc -O2 -Wall -Wextra -Werror -o "$TMP/bare" bench/bare.c $FCGI_FLAGS -lpthread \
    || die "cannot build bench/bare.c"
# shellcheck disable=SC2086
cc -O2 -Wall -Wextra -Werror -o "$TMP/smtp_loop" bench/smtp_loop.c $CURL_FLAGS \
    || die "cannot build bench/smtp_loop.c"

# ---------------------------------------------------------------- smtp-sink
SINK_PORT=$(free_port)
SINK_USER=""
[ "$(id -u)" -eq 0 ] && SINK_USER="-u postfix"
# -c: running counters on stdout (used to check how many messages arrived);
# no -d/-D, so nothing is written to disk: mail is accepted and dropped.
# shellcheck disable=SC2086
(cd "$TMP" && exec "$SINK" $SINK_USER -c "127.0.0.1:$SINK_PORT" 256) >"$TMP/sink.log" 2>&1 &
PIDS="$PIDS $!"
SINK_PID=$!
wait_port "$SINK_PORT" "$SINK_PID" || { cat "$TMP/sink.log" >&2; die "smtp-sink did not start on 127.0.0.1:$SINK_PORT"; }
SMTP_URL="smtp://127.0.0.1:$SINK_PORT"
sink_count() {
    tr '\r' '\n' <"$TMP/sink.log" | grep -o 'mesg=[0-9]*' | tail -n 1 | sed 's/mesg=//' | grep . || echo 0
}

# ---------------------------------------------------------------- nginx
nginx_start "$SINK_PORT"
BASE_URL="http://127.0.0.1:$HTTP_PORT/rm"
BODY='{"type":"view","visitor_id":"v-bench-0001","sku":"LAMP-1"}'
# A signed hook: a one-event cart batch, signed as bench/events_probe.py
# and the tests do (HMAC-SHA256 of "<t>.<body>" with the hook secret).
HOOK_SECRET=bench-hook-secret
HOOK_BODY='[{"type":"cart","email":"bench@example.com","cart_id":"bench-1","currency":"EUR","items":[{"sku":"P1","name":"Product 1","price":6,"qty":1}],"total":6}]'

# post_lua KIND: the wrk script (and PROBE_* for curl) of a kind of
# request: collect, or events (signed now: the signature is good for 5
# minutes, so it is made again before each run).
post_lua() {
    if [ "$1" = collect ]; then
        URL="$BASE_URL/collect" PBODY=$BODY PSIG=""
    else
        URL="$BASE_URL/events" PBODY=$HOOK_BODY
        PSIG=$(python3 -c 'import hmac, hashlib, sys, time
t = str(int(time.time()))
m = hmac.new(sys.argv[1].encode(), t.encode() + b"." + sys.argv[2].encode(), hashlib.sha256)
print("t=%s,v1=%s" % (t, m.hexdigest()))' "$HOOK_SECRET" "$HOOK_BODY")
    fi
    {
        echo 'wrk.method = "POST"'
        echo 'wrk.headers["Content-Type"] = "application/json"'
        [ -z "$PSIG" ] || echo "wrk.headers[\"X-Remarket-Signature\"] = \"$PSIG\""
        echo "wrk.body = '$PBODY'"
    } >"$TMP/post.lua"
}

# One request with curl first, so that a broken setup is reported clearly.
# $1 = label, $2 = the status expected.
probe() {
    code=$(curl -s -o "$TMP/probe.body" -w '%{http_code}' -m 5 \
        -H 'Content-Type: application/json' ${PSIG:+-H "X-Remarket-Signature: $PSIG"} \
        --data-binary "$PBODY" "$URL" || true)
    if [ "$code" != "$2" ]; then
        warn "$1: POST $URL answered HTTP '$code' (expected $2); body:"
        head -c 500 "$TMP/probe.body" >&2 2>/dev/null || true
        echo >&2
        echo "--- nginx error.log (tail)" >&2
        tail -n 5 "$TMP/nginx/error.log" >&2 2>/dev/null || true
        return 1
    fi
}
# Runs wrk (a warm-up, then the measured run); sets RPS, REQS, P50, P99,
# NON2XX, and OK2XX (the 2xx answers of both runs), and prints warnings
# for errors. $1 = label
run_wrk() {
    wrk -t1 -c4 -d1s -s "$TMP/post.lua" "$URL" >"$TMP/wrk-$1.warm.txt" 2>&1 || true
    wrk --latency -t"$WRK_T" -c"$WRK_C" -d"${WRK_S}s" -s "$TMP/post.lua" "$URL" >"$TMP/wrk-$1.txt" 2>&1 \
        || { cat "$TMP/wrk-$1.txt" >&2; die "wrk failed against $1"; }
    RPS=$(awk '/^Requests\/sec:/ { print $2 }' "$TMP/wrk-$1.txt")
    [ -n "$RPS" ] || { cat "$TMP/wrk-$1.txt" >&2; die "cannot parse wrk output for $1"; }
    REQS=$(awk '/requests in/ { print $1 }' "$TMP/wrk-$1.txt")
    P50=$(awk '$1 == "50%" { print $2 }' "$TMP/wrk-$1.txt")
    P99=$(awk '$1 == "99%" { print $2 }' "$TMP/wrk-$1.txt")
    NON2XX=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$TMP/wrk-$1.txt")
    SOCKERR=$(grep 'Socket errors:' "$TMP/wrk-$1.txt" || true)
    if [ -n "$NON2XX" ] && [ "$NON2XX" != 0 ]; then
        warn "$1: $NON2XX of $REQS responses were not 2xx/3xx"
    fi
    if [ -n "$SOCKERR" ]; then
        warn "$1: wrk reports$(echo "$SOCKERR" | sed 's/^ *Socket errors://')"
    fi
    : "${NON2XX:=0}"
    OK2XX=$(awk '/requests in/ { n += $1 } /Non-2xx or 3xx responses:/ { n -= $NF }
        END { print n + 0 }' "$TMP/wrk-$1.warm.txt" "$TMP/wrk-$1.txt")
}
# count_check LABEL DB: the events in DB against the 2xx answers of the
# probe and both wrk runs. wrk stops with up to one request per
# connection in flight, which remarket may have stored after wrk stopped
# reading: more events than answers, by at most that, is not a loss.
count_check() {
    stored=$(python3 -c 'import sqlite3, sys
print(sqlite3.connect(sys.argv[1]).execute("SELECT count(*) FROM events").fetchone()[0])' "$2" 2>/dev/null || echo "?")
    answered=$((OK2XX + 1))
    inflight=$((WRK_C + 4))
    CHECK="$stored events stored, $answered answered 2xx"
    if [ "$stored" = "?" ] || [ "$stored" -lt "$answered" ]; then
        warn "$1: $stored events in the database, but $answered requests were answered 2xx: events answered as stored are missing"
    elif [ "$stored" -gt $((answered + inflight)) ]; then
        warn "$1: $stored events in the database, $answered answered 2xx: more than the $inflight requests wrk can leave unread"
    fi
}

# ---------------------------------------------------------------- A: ingest
# Each figure is the median of REPS runs, bare and remarket taking turns
# (collect, then events), so that a change in the machine's load falls on
# both. Each remarket run starts on a fresh database.
A_BASE_ALL="" A_RM_ALL="" E_BASE_ALL="" E_RM_ALL="" A_RM_RAW="" E_RM_RAW="" A_BASE_RAW="" E_BASE_RAW=""
a_bare() { # $1 = collect | events
    rm -f "$TMP/fcgi.sock"
    bg "$TMP/bare" "$TMP/fcgi.sock" "$THREADS"
    BARE_PID=$LASTPID
    wait_sock "$TMP/fcgi.sock" "$BARE_PID" || die "bare FastCGI responder did not start"
    post_lua "$1"
    probe "bare $1" 204 || die "nginx -> bare responder does not work"
    run_wrk "bare-$1.$r"
    stop "$BARE_PID" 0
    rm -f "$TMP/fcgi.sock"
}
a_remarket() { # $1 = collect | events, $2 = the status expected
    db="$TMP/a-$1.$r.db"
    REMARKET_DB="$db" REMARKET_KEY_FILE="$TMP/a.key" "$RM" init >"$TMP/a-init.log" 2>&1 \
        || { cat "$TMP/a-init.log" >&2; die "remarket init failed (REMARKET_DB=$db)"; }
    # wrk sends everything from one address: the per-address limit for
    # browser events (rate_ip_per_min) would answer 429 to nearly all of it.
    (REMARKET_DB="$db" REMARKET_KEY_FILE="$TMP/a.key" REMARKET_THREADS="$THREADS" \
        REMARKET_HOOK_SECRET="$HOOK_SECRET" REMARKET_RATE_IP_PER_MIN=0 \
        REMARKET_RATE_VISITOR_PER_MIN=0 exec "$RM" serve "$TMP/fcgi.sock") >"$TMP/serve-$1.$r.log" 2>&1 &
    PIDS="$PIDS $!"
    RM_PID=$!
    wait_sock "$TMP/fcgi.sock" "$RM_PID" \
        || { cat "$TMP/serve-$1.$r.log" >&2; die "remarket serve did not create $TMP/fcgi.sock"; }
    post_lua "$1"
    if probe "remarket $1" "$2"; then
        run_wrk "remarket-$1.$r"
    else
        warn "skipping the remarket $1 benchmark"
        RPS=0 REQS=0 NON2XX=n/a P50=n/a P99=n/a OK2XX=-1
    fi
    alive "$RM_PID" || { cat "$TMP/serve-$1.$r.log" >&2; die "remarket serve died during the benchmark"; }
    stop "$RM_PID" 30
    [ $KILLED = 0 ] || echo "bench: note: remarket serve did not exit within 3 s of SIGTERM; it was killed" >&2
    CHECK=""
    [ "$OK2XX" -lt 0 ] || count_check "remarket $1 run $r" "$db"
    COMMITS=$(sed -n 's/.*ingest stored \([0-9]*\) requests in \([0-9]*\) commits.*/\1 requests in \2 commits/p' "$TMP/serve-$1.$r.log")
    rm -f "$TMP/fcgi.sock" "$db" "$db-wal" "$db-shm"
}
if part A; then
    r=1
    while [ $r -le "$REPS" ]; do
        a_bare collect
        A_BASE_ALL="$A_BASE_ALL $RPS" A_BASE_RAW="$A_BASE_RAW $REQS/$NON2XX"
        if [ $BASE_ONLY = 0 ]; then
            a_remarket collect 204
            A_RM_ALL="$A_RM_ALL $RPS"
            A_RM_RAW="$A_RM_RAW
    run $r: $REQS requests, p50 $P50, p99 $P99, non-2xx $NON2XX; $CHECK; ${COMMITS:-no commit count}"
        fi
        a_bare events
        E_BASE_ALL="$E_BASE_ALL $RPS" E_BASE_RAW="$E_BASE_RAW $REQS/$NON2XX"
        if [ $BASE_ONLY = 0 ]; then
            a_remarket events 202
            E_RM_ALL="$E_RM_ALL $RPS"
            E_RM_RAW="$E_RM_RAW
    run $r: $REQS requests, p50 $P50, p99 $P99, non-2xx $NON2XX; $CHECK; ${COMMITS:-no commit count}"
        fi
        r=$((r + 1))
    done
    # shellcheck disable=SC2086
    A_BASE=$(median $A_BASE_ALL) A_RM=$(median ${A_RM_ALL:-0}) E_BASE=$(median $E_BASE_ALL) E_RM=$(median ${E_RM_ALL:-0})
fi

# Parts B and C (sending) share their setup; BENCH_PARTS=A skips them all.
if part B || part C; then
# ---------------------------------------------------------------- events, one mail
# make_events N DIR: N shoppers' identify and cart events (carts of T0) in
# DIR/events.NNNNN.json; remarket event takes at most 1000 events per call
# (EV_MAX_BATCH, the same cap as a POST body), so they go in files of 500
# pairs.
T0=$(date +%s)
make_events() {
    mkdir -p "$2"
    awk -v n="$1" -v t0="$T0" -v dir="$2" 'BEGIN {
        per = 500
        for (i = 1; i <= n; i++) {
            if ((i - 1) % per == 0) {
                if (f != "") { print "]" > f; close(f) }
                f = sprintf("%s/events.%05d.json", dir, (i - 1) / per)
                print "[" > f
            }
            last = (i % per == 0 || i == n)
            printf "{\"type\":\"identify\",\"email\":\"shopper%d@example.com\",\"name\":\"Shopper %d\",\"consent\":true,\"ts\":%d},\n", i, i, t0 > f
            printf "{\"type\":\"cart\",\"email\":\"shopper%d@example.com\",\"cart_id\":\"c-%d\",\"currency\":\"EUR\",\"items\":[{\"sku\":\"LAMP-1\",\"name\":\"Rattan lamp\",\"price\":39.90,\"qty\":1,\"url\":\"https://shop.example/p/lamp\",\"image\":\"https://shop.example/img/lamp.jpg\"}],\"total\":39.90,\"ts\":%d}%s\n", i, i, t0, (last ? "" : ",") > f
        }
        if (f != "") { print "]" > f; close(f) }
    }'
}
# load_carts DB DIR: a fresh database DB (holdout 0: every cart is
# mailed, no control group in the bench) with the events of DIR.
load_carts() {
    REMARKET_DB="$1" "$RM" init >"$1.init.log" 2>&1 \
        || { cat "$1.init.log" >&2; die "remarket init failed (REMARKET_DB=$1)"; }
    REMARKET_DB="$1" "$RM" flows holdout abandoned_cart 0 >/dev/null \
        || die "remarket flows holdout failed (REMARKET_DB=$1)"
    for f in "$2"/events.*.json; do
        REMARKET_DB="$1" "$RM" event --now "$T0" <"$f" >>"$1.event.log" 2>&1 \
            || { tail -n 20 "$1.event.log" >&2; die "remarket event failed on $f"; }
    done
}
MSG_FILE=-
if [ $BASE_ONLY = 0 ]; then
    export REMARKET_KEY_FILE="$TMP/rm.key" REMARKET_OUTBOX="$TMP/outbox"
    export REMARKET_BASE_URL="http://127.0.0.1:$HTTP_PORT/rm"
    # wrk sends everything from one address: the per-address limit for
    # browser events (rate_ip_per_min) would answer 429 to nearly all of it.
    export REMARKET_RATE_IP_PER_MIN=0 REMARKET_RATE_VISITOR_PER_MIN=0
    # the ticks send to a loopback sink: a real relay for remarket, so
    # the demo sender and http links would be refused (remarket status)
    export REMARKET_FROM="Bench Shop <shop@bench.example>"
    export REMARKET_POSTAL_ADDRESS="1 Bench Road, 75000 Paris"
    export REMARKET_ALLOW_INSECURE_LINKS=yes

    make_events "$N" "$TMP"
    # One of remarket's own mails, from an outbox (which holds exactly the
    # bytes it gives SMTP): the baseline loop sends these same bytes.
    make_events 1 "$TMP/one"
    load_carts "$TMP/eml.db" "$TMP/one"
    REMARKET_DB="$TMP/eml.db" REMARKET_OUTBOX="$TMP/outbox" "$RM" tick --now $((T0 + 3700)) >"$TMP/eml.out" 2>&1 \
        || { cat "$TMP/eml.out" >&2; die "remarket tick into the outbox $TMP/outbox failed"; }
    for f in "$TMP"/outbox/m*.eml; do
        MSG_FILE=$f
        break
    done
    [ -f "$MSG_FILE" ] || { cat "$TMP/eml.out" >&2; die "remarket tick wrote no mail into the outbox $TMP/outbox"; }
fi

# ---------------------------------------------------------------- B: raw libcurl
# Each email figure is the median of REPS runs: a run takes only ~0.5-1 s,
# so a single one is at the mercy of the scheduler.
B_BASE_ALL=""
B_BASE_SECS_ALL=""
r=1
while [ $r -le "$REPS" ]; do
    before=$(sink_count)
    "$TMP/smtp_loop" "$SMTP_URL" "$N" "$MSG_FILE" >"$TMP/smtp_loop.$r.txt" 2>"$TMP/smtp_loop.$r.err" \
        || { cat "$TMP/smtp_loop.$r.err" >&2; die "smtp_loop could not send to $SMTP_URL"; }
    read -r _ secs rate <"$TMP/smtp_loop.$r.txt"
    B_BASE_ALL="$B_BASE_ALL $rate"
    B_BASE_SECS_ALL="$B_BASE_SECS_ALL ${secs}s"
    sleep 0.1
    got=$(( $(sink_count) - before ))
    [ "$got" = "$N" ] || warn "smtp_loop run $r: smtp-sink counted $got messages, expected $N"
    r=$((r + 1))
done
# shellcheck disable=SC2086
B_BASE=$(median $B_BASE_ALL)
MSG_SIZE=$(sed -n 's/.*message size \([0-9]*\).*/\1/p' "$TMP/smtp_loop.1.err")

if [ $BASE_ONLY = 0 ]; then
    # ------------------------------------------------------------ B: remarket
    # run_b CONNS: REPS ticks with smtp_connections = CONNS, each on a fresh
    # database loaded with the same N abandoned carts; sets B_RM (median
    # mails/s) and the raw figures B_RM_SECS_ALL, SENT_ALL, SINK_ALL.
    run_b() {
        B_RM_ALL=""
        B_RM_SECS_ALL=""
        SENT_ALL=""
        SINK_ALL=""
        r=1
        while [ $r -le "$REPS" ]; do
            # A fresh database per run, loaded with the same N abandoned carts.
            export REMARKET_DB="$TMP/mail.$1.$r.db"
            t1=$(now)
            load_carts "$REMARKET_DB" "$TMP"
            t2=$(now)
            LOAD_ALL="$LOAD_ALL $(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.3fs", b - a }')"

            before=$(sink_count)
            t1=$(now)
            REMARKET_SMTP_URL="$SMTP_URL" REMARKET_SMTP_CONNECTIONS="$1" "$RM" tick --now $((T0 + 3700)) >"$TMP/tick.$1.$r.out" 2>"$TMP/tick.$1.$r.err" \
                || { cat "$TMP/tick.$1.$r.out" >&2; tail -n 20 "$TMP/tick.$1.$r.err" >&2; die "remarket tick failed"; }
            t2=$(now)
            secs=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.6f", b - a }')
            sent=$(tr -d ' \n\t' <"$TMP/tick.$1.$r.out" | sed -n 's/.*"sent":\([0-9][0-9]*\).*/\1/p')
            sleep 0.1
            got=$(( $(sink_count) - before ))
            if [ -z "$sent" ]; then
                warn "remarket tick printed no \"sent\" count: $(head -c 300 "$TMP/tick.$1.$r.out")"
                sent=$got
            elif [ "$sent" != "$N" ]; then
                warn "remarket tick ($1 connections) sent $sent emails, expected $N; summary: $(head -c 300 "$TMP/tick.$1.$r.out")"
            fi
            [ "$got" = "$sent" ] || warn "remarket tick ($1 connections) reports sent=$sent but smtp-sink counted $got messages"
            B_RM_ALL="$B_RM_ALL $(awk -v n="$sent" -v s="$secs" 'BEGIN { if (s > 0) printf "%.1f", n / s; else print 0 }')"
            B_RM_SECS_ALL="$B_RM_SECS_ALL ${secs}s"
            SENT_ALL="$SENT_ALL $sent"
            SINK_ALL="$SINK_ALL $got"
            r=$((r + 1))
        done
        # shellcheck disable=SC2086
        B_RM=$(median $B_RM_ALL)
    }
    LOAD_ALL=""
    run_b 1
    B_RM1=$B_RM B_RM1_SECS_ALL=$B_RM_SECS_ALL SENT1_ALL=$SENT_ALL SINK1_ALL=$SINK_ALL
    run_b 4
    B_RM4=$B_RM B_RM4_SECS_ALL=$B_RM_SECS_ALL SENT4_ALL=$SENT_ALL SINK4_ALL=$SINK_ALL
fi

# ---------------------------------------------------------------- B: 4 connections
# The loop on 4 connections into the same sink: the bar for parallel
# sending (median of REPS runs, as remarket's).
B_BASE4_ALL=""
B_BASE4_SECS_ALL=""
r=1
while [ $r -le "$REPS" ]; do
    "$TMP/smtp_loop" "$SMTP_URL" "$N" "$MSG_FILE" 4 >"$TMP/smtp_loop4.$r.txt" 2>"$TMP/smtp_loop4.$r.err" \
        || { cat "$TMP/smtp_loop4.$r.err" >&2; die "smtp_loop (4 connections) could not send to $SMTP_URL"; }
    read -r _ secs rate <"$TMP/smtp_loop4.$r.txt"
    B_BASE4_ALL="$B_BASE4_ALL $rate"
    B_BASE4_SECS_ALL="$B_BASE4_SECS_ALL ${secs}s"
    r=$((r + 1))
done
# shellcheck disable=SC2086
B_BASE4=$(median $B_BASE4_ALL)

# ---------------------------------------------------------------- C: slow relay
# A relay that answers each message SLOW_MS after it arrived, on any number
# of connections at once: one connection then carries at most 1000/SLOW_MS
# mails a second, whatever the sender does; only more connections help.
RELAY_PORT=$(free_port)
bg python3 bench/slow_relay.py 127.0.0.1 "$RELAY_PORT" "$SLOW_MS" >"$TMP/relay.log" 2>&1
RELAY_PID=$LASTPID
wait_port "$RELAY_PORT" "$RELAY_PID" || { cat "$TMP/relay.log" >&2; die "bench/slow_relay.py did not start on 127.0.0.1:$RELAY_PORT"; }
RELAY_URL="smtp://127.0.0.1:$RELAY_PORT"
relay_count() {
    grep -o 'mesg=[0-9]*' "$TMP/relay.log" | tail -n 1 | sed 's/mesg=//' | grep . || echo 0
}
for c in 1 4; do
    before=$(relay_count)
    "$TMP/smtp_loop" "$RELAY_URL" "$SLOW_N" "$MSG_FILE" $c >"$TMP/slow_loop$c.txt" 2>"$TMP/slow_loop$c.err" \
        || { cat "$TMP/slow_loop$c.err" >&2; die "smtp_loop ($c connections) could not send to $RELAY_URL"; }
    got=$(( $(relay_count) - before ))
    [ "$got" = "$SLOW_N" ] || warn "smtp_loop ($c connections): the slow relay counted $got messages, expected $SLOW_N"
done
read -r _ C_BASE1_SECS C_BASE1 <"$TMP/slow_loop1.txt"
read -r _ C_BASE4_SECS C_BASE4 <"$TMP/slow_loop4.txt"
# run_c CONNS: one tick with smtp_connections = CONNS through the slow
# relay, on a fresh database of SLOW_N carts; sets C_RM (mails/s), C_RM_SECS
# and C_RM_SENT, and checks the relay's count and that the Message-IDs it
# got are distinct.
run_c() {
    load_carts "$TMP/slow.$1.db" "$TMP/slow"
    before=$(relay_count)
    lines=$(wc -l <"$TMP/relay.log")
    t1=$(now)
    REMARKET_DB="$TMP/slow.$1.db" REMARKET_SMTP_URL="$RELAY_URL" REMARKET_SMTP_CONNECTIONS="$1" "$RM" tick --now $((T0 + 3700)) >"$TMP/slow-tick.$1.out" 2>"$TMP/slow-tick.$1.err" \
        || { cat "$TMP/slow-tick.$1.out" >&2; tail -n 20 "$TMP/slow-tick.$1.err" >&2; die "remarket tick into the slow relay failed"; }
    t2=$(now)
    C_RM_SECS=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.3f", b - a }')
    C_RM_SENT=$(tr -d ' \n\t' <"$TMP/slow-tick.$1.out" | sed -n 's/.*"sent":\([0-9][0-9]*\).*/\1/p')
    got=$(( $(relay_count) - before ))
    ids=$(tail -n +"$((lines + 1))" "$TMP/relay.log" | grep -o 'id=[^ ]*' | sort | uniq | wc -l)
    [ "${C_RM_SENT:-}" = "$SLOW_N" ] || warn "remarket tick ($1 connections) sent ${C_RM_SENT:-?} emails through the slow relay, expected $SLOW_N"
    [ "$got" = "${C_RM_SENT:-}" ] || warn "remarket tick ($1 connections) reports sent=${C_RM_SENT:-?} but the slow relay counted $got messages"
    [ "$ids" = "$got" ] || warn "remarket tick ($1 connections): the slow relay got $got messages but $ids distinct Message-IDs"
    C_RM_IDS=$ids
    C_RM=$(awk -v n="${C_RM_SENT:-0}" -v s="$C_RM_SECS" 'BEGIN { if (s > 0) printf "%.1f", n / s; else print 0 }')
}
C_RM1=0 C_RM4=0 C_RM1_SECS=n/a C_RM4_SECS=n/a C_RM1_SENT=n/a C_RM4_SENT=n/a C_RM1_IDS=n/a C_RM4_IDS=n/a
if [ $BASE_ONLY = 0 ]; then
    make_events "$SLOW_N" "$TMP/slow"
    run_c 1
    C_RM1=$C_RM C_RM1_SECS=$C_RM_SECS C_RM1_SENT=$C_RM_SENT C_RM1_IDS=$C_RM_IDS
    run_c 4
    C_RM4=$C_RM C_RM4_SECS=$C_RM_SECS C_RM4_SENT=$C_RM_SENT C_RM4_IDS=$C_RM_IDS
fi
stop "$RELAY_PID" 10
fi # parts B and C

# ---------------------------------------------------------------- D: win-back
# A win-back tick on a history the size of UCI Online Retail's (issue 14:
# "a 1,400-mail win-back tick on this history should take seconds").
if part D && [ $BASE_ONLY = 0 ]; then
    D_CSV=${BENCH_UCI_CSV:-$TMP/uci.csv}
    [ -n "${BENCH_UCI_CSV:-}" ] || python3 bench/uci_like.py >"$D_CSV" \
        || die "bench/uci_like.py failed"
    D_LINES=$(($(wc -l <"$D_CSV") - 1))
    D_NOW=${BENCH_WINBACK_NOW:-2012-03-15}
    D_BOX="$TMP/winback-outbox"
    d_rm() {
        REMARKET_DB="$TMP/winback.db" REMARKET_KEY_FILE="$TMP/winback.key" \
        REMARKET_OUTBOX="$D_BOX" REMARKET_SMTP_URL= \
        REMARKET_WINBACK_DAILY_MAX=1000000 REMARKET_WINBACK_MAX_IDLE_DAYS=0 \
            "$RM" "$@"
    }
    d_rm init >"$TMP/winback.log" 2>&1 || { cat "$TMP/winback.log" >&2; die "remarket init (part D) failed"; }
    d_rm flows holdout winback 0 >>"$TMP/winback.log" 2>&1 || die "remarket flows holdout winback 0 failed"
    t1=$(now)
    d_rm import orders "$D_CSV" --now "$D_NOW" >>"$TMP/winback.log" 2>&1 || warn "import (part D): $(tail -n 3 "$TMP/winback.log")"
    t2=$(now)
    D_IMPORT=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.1f", b - a }')
    # what earlier ticks would have kept current: segments (without
    # enrolling) and the item-to-item table
    d_rm segments --now "$D_NOW" >>"$TMP/winback.log" 2>&1 || die "remarket segments (part D) failed"
    D_ANY=$(sqlite3 "$TMP/winback.db" "SELECT email FROM contacts ORDER BY id LIMIT 1")
    d_rm recommend "$D_ANY" >>"$TMP/winback.log" 2>&1 || die "remarket recommend (part D) failed"
    t1=$(now)
    d_rm tick --now "$D_NOW" >"$TMP/winback-tick.out" 2>"$TMP/winback-tick.err" \
        || { tail -n 20 "$TMP/winback-tick.err" >&2; die "the win-back tick (part D) failed"; }
    t2=$(now)
    D_SECS=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.3f", b - a }')
    D_SENT=$(tr -d ' \n\t' <"$TMP/winback-tick.out" | sed -n 's/.*"sent":\([0-9][0-9]*\).*/\1/p')
    D_FILES=$(find "$D_BOX" -name 'm*.eml' | wc -l)
    [ "${D_SENT:-x}" = "$D_FILES" ] || warn "win-back tick: sent=${D_SENT:-?} but $D_FILES mails in the outbox"
    D_RM=$(awk -v n="${D_SENT:-0}" -v s="$D_SECS" 'BEGIN { if (s > 0) printf "%.1f", n / s; else print 0 }')
    # the baselines, on the same mails: written as the outbox does, and
    # sent by the raw SMTP loop (one win-back mail, D_SENT times)
    D_BASE_OUT=$(python3 - "$D_BOX" "$TMP/outbox-loop" <<'PY'
import os, sys, time
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
mails = [open(os.path.join(src, f), 'rb').read() for f in sorted(os.listdir(src)) if f.endswith('.eml')]
t = time.monotonic()
for i, m in enumerate(mails):
    path = os.path.join(dst, 'm%06d.eml' % i)
    tmp = path + '.tmp'
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.write(fd, m)
    os.fsync(fd)
    os.close(fd)
    os.rename(tmp, path)
s = time.monotonic() - t
print('%.1f' % (len(mails) / s if s > 0 else 0))
PY
) || die "the outbox baseline loop failed"
    D_MSG=$(find "$D_BOX" -name 'm*.eml' | sort | head -n 1)
    D_BASE_SMTP=0
    if [ -n "$D_MSG" ] && [ "${D_SENT:-0}" -gt 0 ]; then
        "$TMP/smtp_loop" "$SMTP_URL" "$D_SENT" "$D_MSG" >"$TMP/smtp_loop_d.txt" 2>"$TMP/smtp_loop_d.err" \
            || { cat "$TMP/smtp_loop_d.err" >&2; die "smtp_loop (part D) could not send to $SMTP_URL"; }
        read -r _ _ D_BASE_SMTP <"$TMP/smtp_loop_d.txt"
    fi
    D_WAITING=$(tr -d ' \n\t' <"$TMP/winback-tick.out" | sed -n 's/.*"winback_waiting":\([0-9][0-9]*\).*/\1/p')
fi

# ---------------------------------------------------------------- report
echo
echo "remarket benchmark ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc 2>/dev/null || echo ?) CPUs)"
if part A; then
echo "  A: wrk -t$WRK_T -c$WRK_C -d${WRK_S}s through nginx ($(awk '/worker_processes/ { print $2 + 0 }' "$TMP/nginx.conf") workers, nginx.conf.example), median of $REPS runs each:"
echo "     POST /rm/collect ($(printf %s "$BODY" | wc -c) byte JSON), signed POST /rm/events (a $(printf %s "$HOOK_BODY" | wc -c) byte one-event cart batch)"
echo "     remarket serve with threads=$THREADS; baseline: bench/bare.c, libfcgi, $THREADS threads, 204 No Content, the same requests"
fi
if part B || part C; then
echo "  B: N=$N emails into smtp-sink on loopback, median of $REPS runs each"
echo "     baseline: bench/smtp_loop.c, one libcurl easy handle reused per connection, the same ${MSG_SIZE:-?}-byte message"
echo "     ($([ "$MSG_FILE" = - ] && echo "a built-in message: --baselines-only" || echo "one of remarket's abandoned-cart mails, from its outbox"))"
echo "  C: $SLOW_N emails through bench/slow_relay.py, ${SLOW_MS} ms per message, one run each"
fi
if part D && [ $BASE_ONLY = 0 ]; then
echo "  D: one win-back tick into the outbox on a $D_LINES-line history ($([ -n "${BENCH_UCI_CSV:-}" ] && echo "$BENCH_UCI_CSV" || echo bench/uci_like.py)) at $D_NOW"
echo "     baselines: the same mails written as the outbox writes them (python3: open, write, fsync, rename),"
echo "     and one of them sent as many times by smtp_loop (1 connection, into smtp-sink)"
fi
echo
printf '%-32s %14s %14s %8s\n' benchmark baseline remarket ratio
if part A; then
    if [ $BASE_ONLY = 0 ]; then
        printf '%-32s %12s/s %12s/s %8s\n' "collect events/s via nginx" "$(fmt "$A_BASE")" "$(fmt "$A_RM")" "$(ratio "$A_RM" "$A_BASE")"
        printf '%-32s %12s/s %12s/s %8s\n' "signed /events via nginx" "$(fmt "$E_BASE")" "$(fmt "$E_RM")" "$(ratio "$E_RM" "$E_BASE")"
    else
        printf '%-32s %12s/s %14s %8s\n' "collect events/s via nginx" "$(fmt "$A_BASE")" "(skipped)" "-"
        printf '%-32s %12s/s %14s %8s\n' "signed /events via nginx" "$(fmt "$E_BASE")" "(skipped)" "-"
    fi
fi
if ! part B && ! part C; then
    :
elif [ $BASE_ONLY = 0 ]; then
    printf '%-32s %12s/s %12s/s %8s\n' "emails/s into smtp-sink, 1 conn" "$(fmt "$B_BASE")" "$(fmt "$B_RM1")" "$(ratio "$B_RM1" "$B_BASE")"
    printf '%-32s %12s/s %12s/s %8s\n' "emails/s into smtp-sink, 4 conns" "$(fmt "$B_BASE4")" "$(fmt "$B_RM4")" "$(ratio "$B_RM4" "$B_BASE4")"
    printf '%-32s %12s/s %12s/s %8s\n' "emails/s, ${SLOW_MS} ms relay, 1 conn" "$(fmt "$C_BASE1")" "$(fmt "$C_RM1")" "$(ratio "$C_RM1" "$C_BASE1")"
    printf '%-32s %12s/s %12s/s %8s\n' "emails/s, ${SLOW_MS} ms relay, 4 conns" "$(fmt "$C_BASE4")" "$(fmt "$C_RM4")" "$(ratio "$C_RM4" "$C_BASE4")"
    echo "  (remarket with smtp_connections = 1 and 4 against the loop on as many;"
    echo "   with the slow relay 4 connections carry $(ratio "$C_RM4" "$C_RM1")x what 1 does for remarket (goal 3.5), $(ratio "$C_BASE4" "$C_BASE1")x for the loop)"
else
    printf '%-32s %12s/s %14s %8s\n' "emails/s into smtp-sink" "$(fmt "$B_BASE")" "(skipped)" "-"
    printf '%-32s %12s/s %14s %8s\n' "  same, loop on 4 connections" "$(fmt "$B_BASE4")" "(skipped)" "-"
    printf '%-32s %12s/s %14s %8s\n' "emails/s, ${SLOW_MS} ms relay, 1 conn" "$(fmt "$C_BASE1")" "(skipped)" "-"
    printf '%-32s %12s/s %14s %8s\n' "emails/s, ${SLOW_MS} ms relay, 4 conns" "$(fmt "$C_BASE4")" "(skipped)" "-"
fi
if part D && [ $BASE_ONLY = 0 ]; then
    printf '%-32s %12s/s %12s/s %8s\n' "win-back mails/s, outbox" "$(fmt "$D_BASE_OUT")" "$(fmt "$D_RM")" "$(ratio "$D_RM" "$D_BASE_OUT")"
    printf '%-32s %12s/s %12s/s %8s\n' "  same, vs SMTP loop 1 conn" "$(fmt "$D_BASE_SMTP")" "$(fmt "$D_RM")" "$(ratio "$D_RM" "$D_BASE_SMTP")"
fi
echo
echo "raw figures:"
if part A; then
    echo "  bare, collect (requests/non-2xx per run):$A_BASE_RAW; req/s:$A_BASE_ALL"
    echo "  bare, events (requests/non-2xx per run):$E_BASE_RAW; req/s:$E_BASE_ALL"
    if [ $BASE_ONLY = 0 ]; then
        echo "  remarket, collect (req/s:$A_RM_ALL):$A_RM_RAW"
        echo "  remarket, signed events (req/s:$E_RM_ALL):$E_RM_RAW"
    fi
fi
if part B || part C; then
echo "  smtp_loop:  $N messages per run, runs took$B_BASE_SECS_ALL (median $(fmt "$B_BASE")/s)"
if [ $BASE_ONLY = 0 ]; then
    echo "  tick, 1 connection:  $N carts per run, runs took$B_RM1_SECS_ALL (median $(fmt "$B_RM1")/s); sent:$SENT1_ALL; smtp-sink counted:$SINK1_ALL"
    echo "  tick, 4 connections: $N carts per run, runs took$B_RM4_SECS_ALL (median $(fmt "$B_RM4")/s); sent:$SENT4_ALL; smtp-sink counted:$SINK4_ALL"
    echo "  (setup, not compared: remarket event loaded $((2 * N)) events in$LOAD_ALL)"
fi
echo "  smtp_loop, 4 connections: $N messages into smtp-sink, runs took$B_BASE4_SECS_ALL (median $(fmt "$B_BASE4")/s)"
C_RM_RAW=""
[ $BASE_ONLY = 1 ] || C_RM_RAW="; remarket tick ${C_RM1_SECS}s (1 conn), ${C_RM4_SECS}s (4 conns), sent ${C_RM1_SENT} and ${C_RM4_SENT}, distinct Message-IDs at the relay ${C_RM1_IDS} and ${C_RM4_IDS}"
echo "  slow relay: loop $SLOW_N messages in ${C_BASE1_SECS}s (1 conn), ${C_BASE4_SECS}s (4 conns)$C_RM_RAW"
fi
if part D && [ $BASE_ONLY = 0 ]; then
    echo "  win-back tick: ${D_SENT:-?} mails (outbox: $D_FILES, still waiting: ${D_WAITING:-?}) in ${D_SECS}s; the import of $D_LINES lines took ${D_IMPORT}s (not compared)"
fi
if [ $BASE_ONLY = 1 ]; then
    echo
    echo "bench: --baselines-only: remarket was not measured"
fi
if [ $BASE_ONLY = 0 ] && [ "${BENCH_NO_REPORT:-0}" != 1 ] && { part B || part C; }; then
    echo
    REMARKET="$RM" sh "$(dirname "$0")/report.sh"
fi
