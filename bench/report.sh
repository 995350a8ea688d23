#!/bin/sh
# report.sh: times `remarket report --json` on a database of 1 000 000
# events with the state they imply (100 000 carts and enrollments, 250 000
# messages, 100 000 opens and clicks, 30 000 orders), generated with SQL.
# The issue's bar: under a second. Baseline: one full scan of the events
# table (SELECT count(*) ... WHERE body LIKE) on the same database.
set -eu
RM=${REMARKET:-./remarket}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export REMARKET_DB="$TMP/big.db" REMARKET_KEY_FILE="$TMP/key" REMARKET_OUTBOX="$TMP/outbox"
"$RM" init >/dev/null
T0=1795000000
sqlite3 "$REMARKET_DB" >/dev/null <<SQL
PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF;
BEGIN;
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000)
INSERT INTO events (ts, received, source, type, body)
SELECT $T0 + i * 2, $T0 + i * 2, 'browser', 'view',
       json_object('type', 'view', 'sku', 'SKU-' || (i % 500), 'visitor_id', 'v' || (i % 100000)) FROM n;
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000)
INSERT INTO contacts (id, email, name, consent, created, updated)
SELECT i, 'c' || i || '@example.com', 'C', 1, $T0, $T0 FROM n;
INSERT INTO carts (id, cart_key, contact_id, total, items, item_count, status, updated, abandoned_at, ordered_at)
SELECT id, 'k' || id, id, 40, '[{"sku":"A","name":"A","price":40}]', 1,
       CASE WHEN id % 10 = 0 THEN 'ordered' ELSE 'abandoned' END,
       $T0 + id * 20, $T0 + id * 20 + 3600,
       CASE WHEN id % 10 = 0 THEN $T0 + id * 20 + 86400 END FROM contacts;
INSERT INTO enrollments (id, flow_id, contact_id, cart_id, anchor, next_step, status, created, holdout)
SELECT id, 1, id, id, $T0 + id * 20, 3, 'active', $T0 + id * 20 + 3600, id % 10 = 3 FROM contacts;
INSERT INTO messages (enrollment_id, step, contact_id, status, next_try, sent_at, created)
SELECT e.id, s.position, e.contact_id, 'sent', e.anchor + s.delay_s, e.anchor + s.delay_s, e.anchor
FROM enrollments e JOIN steps s ON s.flow_id = 1 WHERE e.holdout = 0 AND (s.position < 3 OR e.id % 2 = 0);
INSERT INTO interactions (message, kind, ts) SELECT id, 'open', sent_at + 600 FROM messages WHERE id % 4 = 0;
INSERT INTO interactions (message, kind, ts) SELECT id, 'click', sent_at + 700 FROM messages WHERE id % 8 = 0;
INSERT INTO orders (order_key, contact_id, cart_id, total, ts, message, attribution)
SELECT 'o' || c.id, c.id, c.id, 40, c.ordered_at,
       (SELECT m.id FROM messages m WHERE m.enrollment_id = c.id AND m.step = 1),
       CASE WHEN c.id % 20 = 0 THEN 'click' ELSE 'influenced' END
FROM carts c WHERE c.status = 'ordered';
COMMIT;
ANALYZE;
SQL
events=$(sqlite3 "$REMARKET_DB" "SELECT count(*) FROM events")
until=$((T0 + 2100000))
t() { s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); echo "$e - $s" | bc -l; }
scan=$(t sqlite3 "$REMARKET_DB" "SELECT count(*) FROM events WHERE body LIKE '%SKU-7%'")
best=""
for r in 1 2 3; do
	x=$(t "$RM" report --json --now "$until" --since "$T0")
	if [ -z "$best" ] || [ "$(echo "$x < $best" | bc -l)" = 1 ]; then best=$x; fi
done
printf 'report on %s events      %8.3f s (scan of events %.3f s)   ratio %.2f   (bar: under 1 s)\n' \
	"$events" "$best" "$scan" "$(echo "$best / $scan" | bc -l)"

# Recommendations on 1 000 000 order lines (200 000 customers, 5 lines an
# order, 2 000 products in 20 categories, popularity skewed).
sqlite3 "$REMARKET_DB" <<SQL
PRAGMA synchronous=OFF;
BEGIN;
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
INSERT OR IGNORE INTO products (sku, name, price, category, updated)
SELECT 'P' || i, 'Product ' || i, 10 + i % 90, 'cat' || (i % 20), $T0 FROM n;
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000)
INSERT INTO order_lines (order_id, contact_id, sku, qty, price, ts)
SELECT 100000 + i, 1000000 + i % 200000, 'P' || ((i * i + l * 7919) % 2000 * (l + 1) % 2000 + 1), 1, 20, $T0
FROM n, (SELECT 0 AS l UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4);
INSERT INTO contacts (id, email, consent, created, updated) VALUES (1000007, 'reco@example.com', 1, $T0, $T0);
COMMIT;
ANALYZE;
SQL
lines=$(sqlite3 "$REMARKET_DB" "SELECT count(*) FROM order_lines")
scan2=$(t sqlite3 "$REMARKET_DB" "SELECT count(DISTINCT sku) FROM order_lines WHERE price > 0")
best=""
for r in 1 2 3; do
	x=$(t "$RM" recommend reco@example.com 3)
	if [ -z "$best" ] || [ "$(echo "$x < $best" | bc -l)" = 1 ]; then best=$x; fi
done
printf 'recommend on %s lines     %8.3f s (scan of lines  %.3f s)   ratio %.2f   (3 products: %s)\n' \
	"$lines" "$best" "$scan2" "$(echo "$best / $scan2" | bc -l)" "$("$RM" recommend reco@example.com 3 | tr '\n' ' ')"
