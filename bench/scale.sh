#!/bin/sh
# bench/scale.sh: how remarket holds up as the store grows (issue 10).
# For each size (1 k and 100 k customers; 1 M with BIG=1) a database made
# by bench/gen-db.sh, on which NOTHING is due, and:
#
#   tick      `remarket tick --now T` twice (T+60 the second time, a cron a
#             minute later); the second is the figure: the first also
#             builds what later ticks may keep. Max RSS of the second.
#   hooks     signed POST /rm/events through nginx (nginx.conf.example)
#             into `remarket serve`, one after another, 10 ms apart
#             (bench/events_probe.py): latency p50/p99/max while idle (the
#             baseline) and during a third tick (T+120). A hook waits for
#             whichever write transaction holds the database: its worst
#             latency during a tick is about the tick's longest one.
#             Max RSS of `remarket serve` after it all.
#
# Then once, on a fresh database (a store's first day): `remarket import
# orders` of a generated CSV shaped like the UCI Online Retail history
# (21 lines an order, 124 lines a customer, 4000 products), BENCH_IMPORT_LINES
# lines (54 000; 540 000 with BIG=1), with the hook probe running: lines/s
# and the hooks' latency during the import. Max RSS of the import.
#
# Usage: sh bench/scale.sh     (make bench runs it after bench/run.sh)
# Environment: BIG=1 adds 1 M customers and the 540 k-line import (5+
#   minutes: generating 1 M customers alone takes about 3);
#   BENCH_SIZES (e.g. "1000 200000") replaces the list of sizes;
#   BENCH_IMPORT_LINES; BENCH_GEN_DIR=dir keeps the generated databases
#   there and reuses them (each run works on a copy);
#   BENCH_KEEP=1 keeps the temp dir; REMARKET=path of the binary.
set -eu

cd "$(dirname "$0")/.."
ROOT=$(pwd)
RM=${REMARKET:-$ROOT/remarket}
BIG=${BIG:-0}
[ -n "$BIG" ] || BIG=0
if [ "$BIG" = 1 ]; then
    SIZES=${BENCH_SIZES:-1000 100000 1000000}
    LINES=${BENCH_IMPORT_LINES:-540000}
else
    SIZES=${BENCH_SIZES:-1000 100000}
    LINES=${BENCH_IMPORT_LINES:-54000}
fi
T=1795000000
SECRET=bench-hook-secret-0123456789abcdef

. bench/lib.sh

need nginx
need python3
need sqlite3
[ -x /usr/bin/time ] || die "/usr/bin/time not found (apt-get install time)"
[ -x "$RM" ] || die "$RM not found or not executable (build it with make first)"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/remarket-scale.XXXXXX")
chmod 755 "$TMP"   # nginx workers (www-data) reach the FastCGI socket in here
for v in $(env | sed -n 's/^\(REMARKET_[A-Za-z0-9_]*\)=.*/\1/p'); do
    unset "$v"
done
[ ! -e remarket.conf ] || warn "./remarket.conf exists and will be read by remarket (keys not set by the bench apply)"
export REMARKET_OUTBOX="$TMP/outbox" REMARKET_HOOK_SECRET="$SECRET"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

nginx_start ""
HOOK_URL="http://127.0.0.1:$HTTP_PORT/rm/events"

# secs CMD...: runs CMD (output to $OUT), sets SECS (wall) and RSS_MB (max
# resident set, from /usr/bin/time).
secs() {
    t1=$(now)
    /usr/bin/time -f %M -o "$TMP/time.txt" "$@" >"$OUT" 2>&1 \
        || { tail -n 20 "$OUT" >&2; die "failed: $*"; }
    t2=$(now)
    SECS=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.3f", b - a }')
    RSS_MB=$(awk '{ printf "%.1f", $1 / 1024 }' "$TMP/time.txt")
}
# serve_start DB: remarket serve on $TMP/fcgi.sock; sets RM_PID.
serve_start() {
    rm -f "$TMP/fcgi.sock"
    (REMARKET_DB="$1" exec "$RM" serve "$TMP/fcgi.sock") >"$TMP/serve.log" 2>&1 &
    PIDS="$PIDS $!"
    RM_PID=$!
    wait_sock "$TMP/fcgi.sock" "$RM_PID" \
        || { cat "$TMP/serve.log" >&2; die "remarket serve did not create $TMP/fcgi.sock"; }
}
# probe_start NAME: the hook probe in the background until probe_end NAME;
# its first second (new connections, python starting) is not measured.
probe_start() {
    rm -f "$TMP/stop.$1"
    python3 bench/events_probe.py "$HOOK_URL" "$SECRET" "$TMP/stop.$1" 10 900 "$T" >"$TMP/probe.$1" 2>&1 &
    PIDS="$PIDS $!"
    PROBE_PID=$!
    sleep 1   # python takes a moment to start
    alive "$PROBE_PID" || { cat "$TMP/probe.$1" >&2; die "bench/events_probe.py stopped at once"; }
}
# probe_end NAME [FROM TO]: stops it; sets P_N P_50 P_99 P_MAX P_ERR over
# all its requests, or over those that overlap FROM..TO (Unix seconds):
# the requests a tick or an import could have held up.
probe_end() {
    touch "$TMP/stop.$1"
    wait "$PROBE_PID" || { cat "$TMP/probe.$1" >&2; die "bench/events_probe.py failed"; }
    stop "$PROBE_PID" 0   # already ended: only forgets it
    read -r P_N P_50 P_99 P_MAX P_ERR P_WHY <"$TMP/probe.$1" || true
    [ "${P_ERR:-1}" = 0 ] || warn "hooks ($1): $P_ERR of $P_N answers were not 202: ${P_WHY:-}"
    [ $# -ge 3 ] || return 0
    awk -v a="$2" -v b="$3" '$1 <= b && $1 + $2 / 1000 >= a { print $2, ($3 != 202) }' \
        "$TMP/stop.$1.lat" | sort -g | awk '
        { v[NR] = $1; e += $2 }
        function at(p,  k) { k = int(p / 100 * NR); if (k < p / 100 * NR) k++; if (k < 1) k = 1; return v[k] }
        END { if (NR) printf "%d %.2f %.2f %.2f %d\n", NR, at(50), at(99), v[NR], e; else print "0 0 0 0 0" }' \
        >"$TMP/window.$1"
    read -r P_N P_50 P_99 P_MAX P_ERR <"$TMP/window.$1"
    # the longest time in FROM..TO in which no hook got its 202: about the
    # longest write transaction (the hooks queue behind it, so their own
    # latencies add up to more; a 503 after busy_timeout is no answer)
    P_STALL=$(awk -v a="$2" -v b="$3" '$1 <= b && $1 + $2 / 1000 >= a && $3 == 202 { printf "%.6f\n", $1 + $2 / 1000 }' \
        "$TMP/stop.$1.lat" | sort -g | awk -v a="$2" -v b="$3" '
        BEGIN { last = a; m = 0 }
        { if ($1 - last > m) m = $1 - last; last = $1 }
        END { if (b - last > m) m = b - last; printf "%.0f\n", m * 1000 }')
}

ROWS=""
BASE_TICK=""
for S in $SIZES; do
    case $S in '' | *[!0-9]*) die "BENCH_SIZES: '$S' is not a number of customers" ;; esac
    DB="$TMP/s$S.db"
    if [ -n "${BENCH_GEN_DIR:-}" ]; then
        mkdir -p "$BENCH_GEN_DIR"
        G="$BENCH_GEN_DIR/customers-$S.db"
        if [ ! -e "$G" ]; then
            OUT="$TMP/gen.$S.log"
            secs env REMARKET="$RM" REMARKET_KEY_FILE="$G.key" sh bench/gen-db.sh "$S" "$G" "$T"
            GEN=$SECS
        else
            GEN="(kept)"
        fi
        cp "$G" "$DB" && cp "$G.key" "$DB.key"
    else
        OUT="$TMP/gen.$S.log"
        secs env REMARKET="$RM" REMARKET_KEY_FILE="$DB.key" sh bench/gen-db.sh "$S" "$DB" "$T"
        GEN=$SECS
    fi
    export REMARKET_DB="$DB" REMARKET_KEY_FILE="$DB.key"
    # a kept database may be of an older schema: bring it forward (not timed)
    OUT="$TMP/init.$S.out"
    secs "$RM" init
    OUT="$TMP/tick1.$S.out"
    secs "$RM" tick --now "$T"
    TICK1=$SECS
    OUT="$TMP/tick2.$S.out"
    secs "$RM" tick --now $((T + 60))
    TICK2=$SECS TICK_RSS=$RSS_MB
    for f in "$TMP/tick1.$S.out" "$TMP/tick2.$S.out"; do
        tr -d ' \n' <"$f" | grep -q '"enrolled":0,"sent":0' \
            || warn "$S customers: a tick found work, so it was not 'nothing due': $(head -c 300 "$f")"
    done
    [ -n "$BASE_TICK" ] || BASE_TICK=$TICK2

    serve_start "$DB"
    probe_start "idle.$S"
    t1=$(now)
    sleep 3
    t2=$(now)
    probe_end "idle.$S" "$t1" "$t2"
    I_50=$P_50 I_99=$P_99 I_MAX=$P_MAX I_STALL=$P_STALL
    probe_start "tick.$S"
    OUT="$TMP/tick3.$S.out"
    secs "$RM" tick --now $((T + 120))
    TICK3=$SECS
    sleep 0.5
    probe_end "tick.$S" "$t1" "$t2"
    SERVE_RSS=$(awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$RM_PID/status")
    stop "$RM_PID" 30
    ROWS="$ROWS$S $GEN $TICK1 $TICK2 $(ratio "$TICK2" "$BASE_TICK") $TICK_RSS $SERVE_RSS $I_50 $I_99 $I_MAX $P_50 $P_99 $P_MAX $(ratio "$P_99" "$I_99") $P_N $TICK3 $I_STALL $P_STALL $P_ERR
"
    rm -f "$DB" "$DB-wal" "$DB-shm"
done

# ---------------------------------------------------------------- import
# UCI Online Retail: 541 909 lines, 25 900 invoices, 4 372 customers,
# 4 070 products, one year. The same shape, dated the year before T.
CSV="$TMP/orders.csv"
awk -v L="$LINES" -v t0=$((T - 365 * 86400)) 'BEGIN {
    print "order_id,email,date,sku,name,price,qty"
    orders = int(L / 21) + 1; cust = int(L / 124) + 1
    for (l = 0; l < L; l++) {
        o = int(l / 21); c = (o * 7919) % cust
        a = (l * 2654435761 + o) % 1000; s = 1 + int(a * a / 250)
        printf "%d,u%d@example.com,%d,SKU%d,Item %d,%.2f,%d\n", 500000 + o, c,
            t0 + int(o * 31536000 / orders), s, s, 1 + s % 50 + 0.95, 1 + l % 4
    }
}' >"$CSV"
DB="$TMP/import.db"
export REMARKET_DB="$DB" REMARKET_KEY_FILE="$TMP/import.key"
"$RM" init >"$TMP/import-init.log" 2>&1 || { cat "$TMP/import-init.log" >&2; die "remarket init failed ($DB)"; }
serve_start "$DB"
probe_start idle.import
t1=$(now)
sleep 3
t2=$(now)
probe_end idle.import "$t1" "$t2"
J_50=$P_50 J_99=$P_99 J_MAX=$P_MAX J_STALL=$P_STALL
probe_start import
OUT="$TMP/import.out"
secs "$RM" import orders "$CSV" --now "$T"
IMP_SECS=$SECS IMP_RSS=$RSS_MB
probe_end import "$t1" "$t2"
stop "$RM_PID" 30
tr -d ' \n' <"$OUT" | grep -q '"refused":0' || warn "import: $(tail -c 300 "$OUT")"
IMP_ORDERS=$(sqlite3 "$DB" "SELECT count(*) FROM orders")
IMP_LINES=$(sqlite3 "$DB" "SELECT count(*) FROM order_lines")
[ "$IMP_LINES" = "$LINES" ] || warn "import: $IMP_LINES order lines in the database, $LINES in the CSV"
IMP_RATE=$(awk -v n="$LINES" -v s="$IMP_SECS" 'BEGIN { printf "%.0f", n / s }')

# ---------------------------------------------------------------- report
echo
echo "remarket at scale ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc 2>/dev/null || echo ?) CPUs, load average before: $LOAD_BEFORE, after: $(cut -d' ' -f1-3 /proc/loadavg))"
echo "  databases from bench/gen-db.sh: 3-5 orders a customer over 2 years, nothing due at T=$T"
echo "  tick: 2nd of two ticks (T, T+60); ratio to the smallest size; goal: within 2x at 1 M"
echo "  hooks: signed POST /rm/events via nginx, 100/s (open loop), idle 3 s (baseline) vs the requests that overlap"
echo "         a 3rd tick (T+120); goal: p99 < 50 ms. ratio: p99 during the tick / p99 idle; stall: the longest"
echo "         time no hook got its 202 (about the longest write transaction; goal: < 50 ms)"
echo
printf '%10s %8s %8s %8s %6s %8s %8s | %-22s | %-28s %6s | %s\n' customers gen_s tick1_s tick2_s ratio tick_MB serve_MB \
    "hooks idle p50/p99/max" "during tick p50/p99/max" ratio "stall idle/tick"
echo "$ROWS" | while read -r s gen t1 t2 r trss srss i50 i99 imax p50 p99 pmax pr pn t3 ist pst perr; do
    [ -n "$s" ] || continue
    printf '%10s %8s %8s %8s %6s %8s %8s | %-22s | %-28s %6s | %s\n' "$s" "$gen" "$t1" "$t2" "$r" "$trss" "$srss" \
        "$i50/$i99/$imax ms" "$p50/$p99/$pmax ms" "$pr" "$ist/$pst ms"
done
echo
echo "import orders: $LINES lines ($IMP_ORDERS orders) in ${IMP_SECS}s = $IMP_RATE lines/s (goal: 50000 lines/s), max RSS ${IMP_RSS} MB"
echo "  hooks that overlapped the import: p50/p99/max $P_50/$P_99/$P_MAX ms over $P_N requests ($P_ERR not 202); idle: $J_50/$J_99/$J_MAX ms; p99 ratio $(ratio "$P_99" "$J_99")"
echo "  longest time without a 202 to any hook: ${P_STALL} ms during the import, ${J_STALL} ms idle"
echo
echo "raw: per size: hook requests that overlapped the 3rd tick, and its seconds (with the probe running):"
echo "$ROWS" | while read -r s gen t1 t2 r trss srss i50 i99 imax p50 p99 pmax pr pn t3 ist pst perr; do
    [ -n "$s" ] || continue
    echo "  $s customers: $pn requests ($perr not 202), tick ${t3}s"
done
