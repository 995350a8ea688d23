#!/bin/sh
# demo.sh: the quick start. Runs remarket on its embedded defaults (an
# SQLite file, mail written to an outbox directory) through three days of
# an abandoned-cart flow in a few seconds, by moving the injected clock.
# Everything lives in ./var/demo and is made anew at each run.
set -eu
cd "$(dirname "$0")/.."
RM=./remarket
DIR=./var/demo
rm -rf "$DIR"
export REMARKET_DB="$DIR/remarket.db" REMARKET_KEY_FILE="$DIR/remarket.key" \
       REMARKET_OUTBOX="$DIR/outbox" REMARKET_TEMPLATES=./demo/templates REMARKET_SMTP_URL=
T0=$(date +%s)
say() { printf '\n== %s\n' "$*"; }
tick() { printf '%-28s ' "tick at $1:"; $RM tick --now "$2"; }

say "remarket init (database, signing key, outbox)"
$RM init

say "events: a catalog with a review, and five shoppers who leave full carts"
sed "s/T0/$T0/g" demo/events.json | $RM event --now "$T0"
echo "  lea, bruno, chloe and eva gave consent; dan did not, so he is never emailed."
echo "  10 % of enrollees are held out as a control group (eva falls in it): they"
echo "  get nothing, so the report can tell what the flow really adds."

tick "+30 min (not idle yet)" $((T0 + 1800))
tick "+1 h (step 1: reminder)" $((T0 + 3700))

say "bruno clicks his recovery link and buys; chloe unsubscribes"
# The shopper's click: the binary answers GET /r/<token> as a CGI program.
link() { grep -lE "^To: (.* <)?$1@example.com" "$DIR"/outbox/*.eml | head -n 1; }
rtoken=$(tr -d '\r' < "$(link bruno)" | sed -n 's#.*/rm/r/\([A-Za-z0-9_-]*\).*#\1#p' | head -n 1)
GATEWAY_INTERFACE=CGI/1.1 REQUEST_METHOD=GET PATH_INFO="/r/$rtoken" REMARKET_NOW=$((T0 + 7000)) \
	$RM | sed -n 's/^Location: /  recovery link redirects to: /p'
printf '{"type":"order","order_id":"o-5001","email":"bruno@example.com","cart_id":"c-102","total":59.00,"currency":"EUR","ts":%s}' \
	$((T0 + 7200)) | $RM event --now $((T0 + 7200))
# Chloe's mail client posts to the List-Unsubscribe URL (RFC 8058); the
# binary answers it as a plain CGI program here, as a web server would run it.
msg=$(link chloe)
token=$(sed -n 's#^List-Unsubscribe: <.*/u/\([A-Za-z0-9_-]*\)>.*#\1#p' "$msg" | tr -d '\r')
printf 'List-Unsubscribe=One-Click' | GATEWAY_INTERFACE=CGI/1.1 REQUEST_METHOD=POST \
	PATH_INFO="/u/$token" CONTENT_TYPE=application/x-www-form-urlencoded CONTENT_LENGTH=26 \
	$RM | sed -n 's/^Status: /  unsubscribe answered: /p'

tick "+24 h (step 2: review)" $((T0 + 86400 + 100))
tick "+72 h (step 3: 10 % off)" $((T0 + 3 * 86400 + 100))
tick "+96 h (nothing left)" $((T0 + 4 * 86400 + 100))

say "the outbox: one .eml file per message"
for f in "$DIR"/outbox/*.eml; do
	to=$(sed -n 's/^To: //p' "$f" | tr -d '\r')
	subj=$(sed -n 's/^Subject: //p' "$f" | tr -d '\r')
	printf '  %s  %-20s %s\n' "$(basename "$f")" "$to" "$subj"
done

say "report (also as a page, the one GET /rm/report serves: $DIR/report.html)"
$RM report --now $((T0 + 4 * 86400 + 100))
# the report is the operator's: a link from `remarket report --link` opens it
rlink=$($RM report --link --now $((T0 + 4 * 86400 + 100)))
GATEWAY_INTERFACE=CGI/1.1 REQUEST_METHOD=GET PATH_INFO=/report REMOTE_ADDR=127.0.0.1 \
	QUERY_STRING="t=${rlink##*t=}" REMARKET_NOW=$((T0 + 4 * 86400 + 100)) $RM |
	sed '1,/^\r*$/d' > "$DIR/report.html"

say "flows (change them with: remarket flows set abandoned_cart 2 delay=48h)"
$RM flows
printf '\nOpen a message: less %s/outbox/m000001.eml (or any mail client)\n' "$DIR"

# At a terminal, go on with the shop itself in a browser (Ctrl-C stops it);
# from a script or CI, stop here.
if [ -t 0 ] && [ -t 1 ] && [ -z "${DEMO_BATCH:-}" ]; then
	printf '\n== now the demo shop, in your browser (DEMO_BATCH=1 skips this)\n'
	exec sh scripts/demo-shop.sh
fi
