#!/bin/sh
# demo-shop.sh: a small home-decor shop with remarket behind it, in your
# browser. Starts `remarket serve` on a unix socket, the shop backend
# (demo/backend.py) and nginx (demo/nginx-demo.conf: the shop at /, the
# backend at /api/, remarket at /rm/), all on 127.0.0.1, with mail written
# to an outbox that the shop's /outbox page shows. Ctrl-C stops everything.
#
#   make && sh scripts/demo-shop.sh [--reset]
#
# State lives in ./var/demo-shop (kept between runs; --reset starts anew).
# Ports: DEMO_PORT (8080) for the shop, DEMO_BACKEND_PORT (8081).
set -eu
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DIR="$ROOT/var/demo-shop"
PORT=${DEMO_PORT:-8080}
BPORT=${DEMO_BACKEND_PORT:-8081}
RM="$ROOT/remarket"

[ "${1:-}" = "--reset" ] && rm -rf "$DIR"
[ -x "$RM" ] || { echo "demo-shop: $RM is not built: run make first" >&2; exit 1; }
for tool in nginx python3 curl; do
	command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || {
		echo "demo-shop: $tool is missing: sudo sh scripts/deps.sh test" >&2; exit 1; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

mkdir -p "$DIR/outbox" "$DIR/nginx/tmp" "$DIR/backend"
# Secrets made once per state directory.
[ -s "$DIR/secrets" ] || {
	umask 077
	printf 'HOOK=%s\nTICK=%s\n' "$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" \
		"$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" > "$DIR/secrets"
	umask 022
}
. "$DIR/secrets"

SHOP="http://127.0.0.1:$PORT"
export REMARKET_DB="$DIR/remarket.db" REMARKET_KEY_FILE="$DIR/remarket.key" \
	REMARKET_OUTBOX="$DIR/outbox" REMARKET_SMTP_URL= \
	REMARKET_TEMPLATES="$ROOT/demo/templates" REMARKET_STATIC_DIR="$ROOT/static" \
	REMARKET_BASE_URL="$SHOP/rm" REMARKET_STORE_URL="$SHOP" \
	REMARKET_CART_URL="$SHOP/cart?restore={cart}&code={code}" \
	REMARKET_HOOK_SECRET="$HOOK" REMARKET_TICK_TOKEN="$TICK" \
	REMARKET_FROM="Maison Demo <shop@example.com>"
# One clock for the shop, remarket's pages and links, and the report: the
# backend writes the demo clock's offset here when the outbox's +1 h /
# +24 h / +72 h buttons move it, and remarket reads it at every request.
export REMARKET_CLOCK_FILE="$DIR/backend/clock"

pids=""
cleanup() {
	trap - EXIT INT TERM HUP
	for p in $pids; do kill "$p" 2>/dev/null || true; done
	for p in $pids; do wait "$p" 2>/dev/null || true; done
	rm -f "$DIR/remarket.sock"
	echo "demo-shop: stopped"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

"$RM" init >/dev/null

rm -f "$DIR/remarket.sock"
"$RM" serve "$DIR/remarket.sock" 2>>"$DIR/serve.log" &
pids="$pids $!"

sed -e "s#@LISTEN@#127.0.0.1:$PORT#" -e "s#@SOCKET@#$DIR/remarket.sock#" \
	-e "s#@BACKEND@#127.0.0.1:$BPORT#" -e "s#@SHOP@#$ROOT/demo/shop#" \
	demo/nginx-demo.conf > "$DIR/nginx.conf"

i=0
until [ -S "$DIR/remarket.sock" ]; do
	i=$((i + 1)); [ $i -lt 100 ] || { echo "demo-shop: remarket serve did not start, see $DIR/serve.log" >&2; exit 1; }
	sleep 0.1
done

"$NGINX" -p "$DIR/nginx/" -c "$DIR/nginx.conf" -e "$DIR/nginx/error.log" &
nginx_pid=$!
pids="$pids $nginx_pid"

# The hook secret reaches the backend through REMARKET_HOOK_SECRET (not argv).
python3 demo/backend.py --port "$BPORT" --remarket-url "$SHOP/rm" \
	--remarket-bin "$RM" --outbox "$DIR/outbox" --state "$DIR/backend" 2>>"$DIR/backend.log" &
pids="$pids $!"

i=0
until curl -fsS "$SHOP/rm/health" >/dev/null 2>&1 && curl -fsS "$SHOP/api/health" >/dev/null 2>&1; do
	i=$((i + 1))
	kill -0 "$nginx_pid" 2>/dev/null && [ $i -lt 100 ] || { echo "demo-shop: the shop did not answer on $SHOP (port in use? see $DIR/nginx/error.log, $DIR/backend.log)" >&2; exit 1; }
	sleep 0.1
done

cat <<EOF

  Maison Demo is open (remarket behind it, mail to an outbox):

    shop            $SHOP/
    cart            $SHOP/cart
    outbox viewer   $SHOP/outbox
    report          $("$RM" report --link)

  Add something to the cart, type an email on the cart page and tick the
  consent box, then leave. In the outbox viewer, "Advance clock +1 h" lets
  the cart become abandoned and writes the first reminder; its link brings
  the cart back. State: $DIR (--reset to start anew). Ctrl-C stops.

EOF
wait
