# bench/lib.sh: the helpers bench/run.sh and bench/scale.sh share: a temp
# dir and background processes cleaned up on exit, free ports, waiting for
# a server, nginx in front of a FastCGI socket, and a little arithmetic.
# Sourced (". bench/lib.sh") from the repository root; sets PIDS and TMP.
# shellcheck shell=sh
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
        # shellcheck disable=SC2034 # read by the callers
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
# Wait (up to ~5 s) until the command "$@" after the pid succeeds, or the
# pid dies.
wait_for() {
    pid=$1
    shift
    i=0
    while ! "$@"; do
        alive "$pid" || return 1
        i=$((i + 1))
        [ $i -lt 100 ] || return 1
        sleep 0.05
    done
    alive "$pid"
}
# True when a TCP port listens on loopback.
port_listens() {
    awk -v p="$(printf %04X "$1")" '
        FNR > 1 && $4 == "0A" { split($2, a, ":"); if (a[2] == p) f = 1 }
        END { exit !f }' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
# Wait until a TCP port listens on loopback (wait_port PORT PID) or a unix
# socket exists (wait_sock PATH PID), or the pid dies.
wait_port() { wait_for "$2" port_listens "$1"; }
wait_sock() { wait_for "$2" test -S "$1"; }
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

# nginx with nginx.conf.example, its two "TEST:" lines pointed at
# $TMP/fcgi.sock and a free loopback port. Sets HTTP_PORT and NGINX_PID.
# $1: a port not to take (e.g. the SMTP sink's), optional.
nginx_start() {
    HTTP_PORT=$(free_port)
    [ "$HTTP_PORT" != "${1:-}" ] || HTTP_PORT=$((HTTP_PORT + 1))
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
}
