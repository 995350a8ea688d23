#!/bin/sh
# bench/run.sh: measure remarket against baselines measured in the same run
# on the same machine, and print the results as ratios (see bench/README.md).
#
#   A. events/s through nginx into POST /rm/collect, remarket vs a bare
#      libfcgi responder (bench/bare.c) behind the same nginx config.
#   B. emails/s from `remarket tick` into smtp-sink, vs a raw libcurl
#      SMTP send loop (bench/smtp_loop.c) into the same sink.
#
# Usage: sh bench/run.sh [--baselines-only]
# Tunables (environment): BENCH_N (emails, default 2000),
#   BENCH_WRK_THREADS (2), BENCH_WRK_CONNS (32), BENCH_WRK_SECS (5),
#   BENCH_THREADS (FastCGI threads of both bare and remarket serve, via
#   REMARKET_THREADS; default 4, remarket's own default),
#   BENCH_REPS (runs of each email measurement, median taken; default 3),
#   BENCH_KEEP=1 keeps the temp dir (logs, databases) for inspection,
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
BASE_ONLY=0
[ "${1:-}" = "--baselines-only" ] && BASE_ONLY=1

PIDS=""
TMP=""
cleanup() {
    rc=$?
    set +e
    for p in $PIDS; do
        stop "$p" 20
    done
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then
        if [ "${BENCH_KEEP:-0}" = 1 ]; then
            echo "bench: kept $TMP" >&2
        else
            rm -rf "$TMP"
        fi
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

die() {
    echo "bench: FAILED: $*" >&2
    exit 1
}
warn() {
    echo "bench: WARNING: $*" >&2
}
need() {
    command -v "$1" >/dev/null 2>&1 || [ -x "$1" ] || die "$1 not found (run scripts/deps.sh bench)"
}
# Start a command in the background and remember its pid for cleanup.
bg() {
    "$@" &
    PIDS="$PIDS $!"
    LASTPID=$!
}
# Stop one background process that we started: SIGTERM, then SIGKILL if it
# is still there after $2 tenths of a second (default 30). Sets KILLED=1 if
# SIGKILL was needed. (libfcgi servers finish their kept-alive nginx
# connections before exiting on SIGTERM, which nginx closes only after its
# 60 s upstream keepalive_timeout.)
stop() {
    KILLED=0
    kill "$1" 2>/dev/null || true
    i=0
    while alive "$1" && [ $i -lt "${2:-30}" ]; do
        sleep 0.1
        i=$((i + 1))
    done
    if alive "$1"; then
        KILLED=1
        kill -9 "$1" 2>/dev/null || true
    fi
    wait "$1" 2>/dev/null || true
    np=""
    for p in $PIDS; do
        [ "$p" = "$1" ] || np="$np $p"
    done
    PIDS=$np
}
alive() {
    kill -0 "$1" 2>/dev/null
}
now() {
    date +%s.%N
}
# A TCP port that nothing on this machine uses right now.
free_port() {
    p=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
    p=$((20000 + p % 30000))
    tries=0
    while awk -v p="$(printf %04X "$p")" '
            FNR > 1 { split($2, a, ":"); if (a[2] == p) f = 1 }
            END { exit !f }' /proc/net/tcp /proc/net/tcp6 2>/dev/null; do
        p=$((p + 1))
        tries=$((tries + 1))
        [ $tries -lt 1000 ] || die "no free TCP port found"
    done
    echo "$p"
}
# Wait (up to ~5 s) until a TCP port listens on loopback, or the pid dies.
wait_port() {
    hex=$(printf %04X "$1")
    i=0
    while ! awk -v p="$hex" '
            FNR > 1 && $4 == "0A" { split($2, a, ":"); if (a[2] == p) f = 1 }
            END { exit !f }' /proc/net/tcp /proc/net/tcp6 2>/dev/null; do
        alive "$2" || return 1
        i=$((i + 1))
        [ $i -lt 100 ] || return 1
        sleep 0.05
    done
    alive "$2"
}
# Wait (up to ~5 s) until a unix socket exists, or the pid dies.
wait_sock() {
    i=0
    while [ ! -S "$1" ]; do
        alive "$2" || return 1
        i=$((i + 1))
        [ $i -lt 100 ] || return 1
        sleep 0.05
    done
    alive "$2"
}
fmt() {
    awk -v x="$1" 'BEGIN { printf "%.1f", x }'
}
median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 }
        END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'
}

need cc
need nginx
need wrk
need curl
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
HTTP_PORT=$(free_port)
[ "$HTTP_PORT" != "$SINK_PORT" ] || HTTP_PORT=$((HTTP_PORT + 1))
mkdir -p "$TMP/nginx/tmp"
sed -e "/TEST:/s|server unix:[^;]*;|server unix:$TMP/fcgi.sock;|" \
    -e "/TEST:/s|listen [^;]*;|listen 127.0.0.1:$HTTP_PORT;|" \
    nginx.conf.example >"$TMP/nginx.conf"
if ! grep -q "unix:$TMP/fcgi.sock;" "$TMP/nginx.conf" || ! grep -q "listen 127.0.0.1:$HTTP_PORT;" "$TMP/nginx.conf"; then
    die "nginx.conf.example: the two \"TEST:\" lines (server unix:...; listen ...;) were not found"
fi
nginx -t -q -p "$TMP/nginx" -c "$TMP/nginx.conf" 2>"$TMP/nginx-t.log" \
    || { cat "$TMP/nginx-t.log" >&2; die "nginx -t rejects the config"; }
bg nginx -p "$TMP/nginx" -c "$TMP/nginx.conf"
NGINX_PID=$LASTPID
wait_port "$HTTP_PORT" "$NGINX_PID" || { cat "$TMP/nginx/error.log" >&2 2>/dev/null; die "nginx did not start on 127.0.0.1:$HTTP_PORT"; }
URL="http://127.0.0.1:$HTTP_PORT/rm/collect"
BODY='{"type":"view","visitor_id":"v-bench-0001","sku":"LAMP-1"}'

cat >"$TMP/post.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$BODY'
EOF

# One request with curl first, so that a broken setup is reported clearly.
probe() {
    code=$(curl -s -o "$TMP/probe.body" -w '%{http_code}' -m 5 \
        -H 'Content-Type: application/json' --data-binary "$BODY" "$URL" || true)
    if [ "$code" != 204 ]; then
        warn "$1: POST /rm/collect answered HTTP '$code' (expected 204); body:"
        head -c 500 "$TMP/probe.body" >&2 2>/dev/null || true
        echo >&2
        echo "--- nginx error.log (tail)" >&2
        tail -n 5 "$TMP/nginx/error.log" >&2 2>/dev/null || true
        return 1
    fi
}
# Runs wrk; sets RPS and prints warnings for errors. $1 = label
run_wrk() {
    wrk -t1 -c4 -d1s -s "$TMP/post.lua" "$URL" >/dev/null 2>&1 || true  # warm-up
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
}

# ---------------------------------------------------------------- A: bare
rm -f "$TMP/fcgi.sock"
bg "$TMP/bare" "$TMP/fcgi.sock" "$THREADS"
BARE_PID=$LASTPID
wait_sock "$TMP/fcgi.sock" "$BARE_PID" || die "bare FastCGI responder did not start"
probe bare || die "nginx -> bare responder does not work"
run_wrk bare
A_BASE=$RPS A_BASE_REQS=$REQS A_BASE_ERR=$NON2XX A_BASE_LAT="p50 $P50, p99 $P99"
stop "$BARE_PID" 0
rm -f "$TMP/fcgi.sock"

# ---------------------------------------------------------------- B: raw libcurl
# Each email figure is the median of REPS runs: a run takes only ~0.5-1 s,
# so a single one is at the mercy of the scheduler.
B_BASE_ALL=""
B_BASE_SECS_ALL=""
r=1
while [ $r -le "$REPS" ]; do
    before=$(sink_count)
    "$TMP/smtp_loop" "$SMTP_URL" "$N" >"$TMP/smtp_loop.$r.txt" 2>"$TMP/smtp_loop.$r.err" \
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
    export REMARKET_KEY_FILE="$TMP/rm.key"
    export REMARKET_BASE_URL="http://127.0.0.1:$HTTP_PORT/rm"
    # wrk sends everything from one address: the per-address limit for
    # browser events (rate_ip_per_min) would answer 429 to nearly all of it.
    export REMARKET_RATE_IP_PER_MIN=0 REMARKET_RATE_VISITOR_PER_MIN=0

    # ------------------------------------------------------------ A: remarket
    REMARKET_DB="$TMP/rm.db" "$RM" init >"$TMP/init.log" 2>&1 \
        || { cat "$TMP/init.log" >&2; die "remarket init failed (REMARKET_DB=$TMP/rm.db)"; }
    (REMARKET_DB="$TMP/rm.db" REMARKET_THREADS="$THREADS" exec "$RM" serve "$TMP/fcgi.sock") >"$TMP/serve.log" 2>&1 &
    PIDS="$PIDS $!"
    RM_PID=$!
    wait_sock "$TMP/fcgi.sock" "$RM_PID" \
        || { cat "$TMP/serve.log" >&2; die "remarket serve did not create $TMP/fcgi.sock"; }
    if probe remarket; then
        run_wrk remarket
        A_RM=$RPS A_RM_REQS=$REQS A_RM_ERR=$NON2XX A_RM_LAT="p50 $P50, p99 $P99"
    else
        warn "skipping the remarket collect benchmark"
        A_RM=0 A_RM_REQS=0 A_RM_ERR=n/a A_RM_LAT=n/a
    fi
    alive "$RM_PID" || { cat "$TMP/serve.log" >&2; die "remarket serve died during the benchmark"; }
    stop "$RM_PID" 30
    [ $KILLED = 0 ] || echo "bench: note: remarket serve did not exit within 3 s of SIGTERM; it was killed" >&2

    # ------------------------------------------------------------ B: remarket
    T0=$(date +%s)
    # remarket event takes at most 1000 events per call (EV_MAX_BATCH, the
    # same cap as a POST body), so the 2N events go in files of 500 pairs.
    awk -v n="$N" -v t0="$T0" -v dir="$TMP" 'BEGIN {
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
    B_RM_ALL=""
    B_RM_SECS_ALL=""
    SENT_ALL=""
    SINK_ALL=""
    LOAD_ALL=""
    r=1
    while [ $r -le "$REPS" ]; do
        # A fresh database per run, loaded with the same N abandoned carts.
        export REMARKET_DB="$TMP/mail.$r.db"
        "$RM" init >"$TMP/init-mail.$r.log" 2>&1 \
            || { cat "$TMP/init-mail.$r.log" >&2; die "remarket init failed (REMARKET_DB=$REMARKET_DB)"; }
        # every cart must be mailed: no 10 % control group in the bench
        "$RM" flows holdout abandoned_cart 0 >/dev/null \
            || die "remarket flows holdout failed (REMARKET_DB=$REMARKET_DB)"
        t1=$(now)
        for f in "$TMP"/events.*.json; do
            "$RM" event --now "$T0" <"$f" >>"$TMP/event.$r.log" 2>&1 \
                || { tail -n 20 "$TMP/event.$r.log" >&2; die "remarket event failed on $f"; }
        done
        t2=$(now)
        LOAD_ALL="$LOAD_ALL $(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.3fs", b - a }')"

        before=$(sink_count)
        t1=$(now)
        REMARKET_SMTP_URL="$SMTP_URL" "$RM" tick --now $((T0 + 3700)) >"$TMP/tick.$r.out" 2>"$TMP/tick.$r.err" \
            || { cat "$TMP/tick.$r.out" >&2; tail -n 20 "$TMP/tick.$r.err" >&2; die "remarket tick failed"; }
        t2=$(now)
        secs=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.6f", b - a }')
        sent=$(tr -d ' \n\t' <"$TMP/tick.$r.out" | sed -n 's/.*"sent":\([0-9][0-9]*\).*/\1/p')
        sleep 0.1
        got=$(( $(sink_count) - before ))
        if [ -z "$sent" ]; then
            warn "remarket tick printed no \"sent\" count: $(head -c 300 "$TMP/tick.$r.out")"
            sent=$got
        elif [ "$sent" != "$N" ]; then
            warn "remarket tick sent $sent emails, expected $N; summary: $(head -c 300 "$TMP/tick.$r.out")"
        fi
        [ "$got" = "$sent" ] || warn "remarket tick reports sent=$sent but smtp-sink counted $got messages"
        B_RM_ALL="$B_RM_ALL $(awk -v n="$sent" -v s="$secs" 'BEGIN { if (s > 0) printf "%.1f", n / s; else print 0 }')"
        B_RM_SECS_ALL="$B_RM_SECS_ALL ${secs}s"
        SENT_ALL="$SENT_ALL $sent"
        SINK_ALL="$SINK_ALL $got"
        r=$((r + 1))
    done
    # shellcheck disable=SC2086
    B_RM=$(median $B_RM_ALL)
fi

# ---------------------------------------------------------------- report
echo
echo "remarket benchmark ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc 2>/dev/null || echo ?) CPUs)"
echo "  A: wrk -t$WRK_T -c$WRK_C -d${WRK_S}s POST /rm/collect ($(printf %s "$BODY" | wc -c) byte JSON) through nginx ($(awk '/worker_processes/ { print $2 + 0 }' "$TMP/nginx.conf") workers, nginx.conf.example)"
echo "     remarket serve with threads=$THREADS; baseline: bench/bare.c, libfcgi, $THREADS threads, 204 No Content"
echo "  B: N=$N emails into smtp-sink on loopback, median of $REPS runs each"
echo "     baseline: bench/smtp_loop.c, one libcurl easy handle reused, ${MSG_SIZE:-?}-byte message"
echo
printf '%-32s %14s %14s %8s\n' benchmark baseline remarket ratio
if [ $BASE_ONLY = 0 ]; then
    printf '%-32s %12s/s %12s/s %8s\n' "collect events/s via nginx" "$(fmt "$A_BASE")" "$(fmt "$A_RM")" "$(ratio "$A_RM" "$A_BASE")"
    printf '%-32s %12s/s %12s/s %8s\n' "emails/s into smtp-sink" "$(fmt "$B_BASE")" "$(fmt "$B_RM")" "$(ratio "$B_RM" "$B_BASE")"
else
    printf '%-32s %12s/s %14s %8s\n' "collect events/s via nginx" "$(fmt "$A_BASE")" "(skipped)" "-"
    printf '%-32s %12s/s %14s %8s\n' "emails/s into smtp-sink" "$(fmt "$B_BASE")" "(skipped)" "-"
fi
echo
echo "raw figures:"
echo "  bare:       $A_BASE_REQS requests in ${WRK_S}s, $A_BASE req/s, latency $A_BASE_LAT, non-2xx: $A_BASE_ERR"
if [ $BASE_ONLY = 0 ]; then
    echo "  remarket:   $A_RM_REQS requests in ${WRK_S}s, $A_RM req/s, latency $A_RM_LAT, non-2xx: $A_RM_ERR"
fi
echo "  smtp_loop:  $N messages per run, runs took$B_BASE_SECS_ALL (median $(fmt "$B_BASE")/s)"
if [ $BASE_ONLY = 0 ]; then
    echo "  tick:       $N carts per run, runs took$B_RM_SECS_ALL (median $(fmt "$B_RM")/s); sent:$SENT_ALL; smtp-sink counted:$SINK_ALL"
    echo "  (setup, not compared: remarket event loaded $((2 * N)) events in$LOAD_ALL)"
fi
if [ $BASE_ONLY = 1 ]; then
    echo
    echo "bench: --baselines-only: remarket was not measured"
fi
if [ $BASE_ONLY = 0 ]; then
    echo
    REMARKET="$RM" sh "$(dirname "$0")/report.sh"
fi
