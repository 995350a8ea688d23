#!/bin/sh
# bench/gen-db.sh: a remarket database of N customers with a realistic
# history, made in seconds with SQL (recursive CTEs) on the schema of the
# binary (`remarket init`), for the scale benchmarks (bench/scale.sh).
#
#   sh bench/gen-db.sh N OUT.db [T]
#
# T (Unix seconds, default 1795000000) is "now" for the history: a tick
# at T (or a minute later) has NOTHING due. What is in it, for customer i
# of 1..N (all numbers are deterministic functions of i, no random()):
#   - contacts: c<i>@example.com, signed, 90 % consenting;
#   - orders: 3-5 each, first one uniform over the 2 years before T, the
#     others spread until a last order uniform between the first and T-1d,
#     so most customers have lapsed (as in most stores); 1-3 lines each of
#     2000 products in 20 categories, popularity skewed; order_lines as
#     the order event writes them;
#   - carts: one for every tenth customer: 70 % ordered, 25 % abandoned
#     (their abandoned-cart enrollment done, its 3 mails sent), 5 % open
#     and touched within the last 30 minutes (not idle yet);
#   - win-back: every consenting customer without an order for 40 days or
#     more (the earliest any threshold can call "at risk": 2/3 of the
#     60-day minimum of winback_after = auto) was enrolled after the last
#     order and is done: 2 mails sent (10 % holdout: none);
#   - opens (1 in 10 mails) and clicks (1 in 40).
# Segments are left to the first tick (it rebuilds them). No ANALYZE:
# remarket never runs one, so neither does the bench.
# The key its links are signed with is REMARKET_KEY_FILE, by default
# OUT.db.key (made if missing). Environment: REMARKET (binary, default
# ./remarket).
set -eu
[ $# -ge 2 ] || { echo "usage: sh bench/gen-db.sh N OUT.db [T]" >&2; exit 2; }
N=$1
OUT=$2
T=${3:-1795000000}
RM=${REMARKET:-./remarket}
case $N in '' | *[!0-9]*) echo "gen-db: N must be a number of customers" >&2; exit 2 ;; esac
[ ! -e "$OUT" ] || { echo "gen-db: $OUT exists: remove it first (the generator makes a new database)" >&2; exit 2; }
command -v sqlite3 >/dev/null || { echo "gen-db: sqlite3 not found (apt-get install sqlite3)" >&2; exit 1; }
[ -x "$RM" ] || { echo "gen-db: $RM not found: build it with make first" >&2; exit 1; }
DIR=$(mktemp -d "${TMPDIR:-/tmp}/remarket-gen.XXXXXX")
trap 'rm -rf "$DIR"' EXIT
KEY=${REMARKET_KEY_FILE:-$OUT.key}
REMARKET_DB="$OUT" REMARKET_KEY_FILE="$KEY" REMARKET_OUTBOX="$DIR/outbox" "$RM" init >"$DIR/init.log" 2>&1 \
    || { cat "$DIR/init.log" >&2; echo "gen-db: remarket init failed for $OUT" >&2; exit 1; }

# the indexes of the two big tables, as the schema made them
IDX="type = 'index' AND tbl_name IN ('orders', 'order_lines') AND sql IS NOT NULL"
DROP=$(sqlite3 "$OUT" "SELECT 'DROP INDEX ' || name || ';' FROM sqlite_master WHERE $IDX")
CREATE=$(sqlite3 "$OUT" "SELECT sql || ';' FROM sqlite_master WHERE $IDX")
[ -n "$CREATE" ] || { echo "gen-db: no index found on orders/order_lines in $OUT: has the schema changed?" >&2; exit 1; }
sqlite3 "$OUT" >/dev/null <<SQL
PRAGMA journal_mode=WAL;
PRAGMA synchronous=OFF;
PRAGMA cache_size=-262144;
PRAGMA temp_store=MEMORY;
BEGIN;
INSERT OR IGNORE INTO products (sku, name, price, url, image, category, updated)
WITH RECURSIVE p(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM p WHERE x < 2000)
SELECT 'P' || x, 'Product ' || x, 5 + x % 95, 'https://shop.example/p/' || x,
       'https://shop.example/img/' || x || '.jpg', 'cat' || (x % 20), $T - 800 * 86400 FROM p;

-- per customer: number of orders k (3-5), first order s, last order e
CREATE TEMP TABLE gc (i INTEGER PRIMARY KEY, k INTEGER, s INTEGER, e INTEGER);
INSERT INTO gc
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $N),
a AS (SELECT i, 3 + (i / 7) % 3 AS k,
             $T - 730 * 86400 + (i * 2654435761) % (729 * 86400) AS s FROM n)
SELECT i, k, s, s + ($T - 86400 - s) * ((i * 69069) % 1000) / 1000 FROM a;

INSERT INTO contacts (id, email, name, consent, signed, created, updated)
SELECT i, 'c' || i || '@example.com', 'Customer ' || i, i % 10 <> 0, 1, s - 600, e FROM gc;

-- orders: j-th of k between s and e; nl lines of skewed products
CREATE TEMP TABLE go (id INTEGER PRIMARY KEY, i INTEGER, j INTEGER, ts INTEGER, nl INTEGER,
                      p0 INTEGER, p1 INTEGER, p2 INTEGER);
INSERT INTO go (i, j, ts, nl, p0, p1, p2)
WITH RECURSIVE j(j) AS (SELECT 0 UNION ALL SELECT j + 1 FROM j WHERE j < 4),
h AS (SELECT i, j, s + (e - s) * j / (k - 1) AS ts, 1 + (i * 7 + j * 13) % 3 AS nl,
             (i * 2654435761 + j * 97) % 1000 AS a, (i * 40503 + j * 7919) % 1000 AS b,
             (i * 69069 + j * 104729) % 1000 AS c FROM gc JOIN j ON j.j < gc.k)
SELECT i, j, ts, nl, 1 + a * a / 500, 1 + b * b / 500, 1 + c * c / 500 FROM h ORDER BY ts;

-- the secondary indexes of orders and order_lines are built after the
-- load (much faster than row by row), with their own CREATE statements
$DROP
INSERT INTO orders (id, order_key, contact_id, total, currency, items, ts)
SELECT id, printf('%09d', id), i,  -- store order numbers grow with time
       (5 + p0 % 95) + CASE WHEN nl > 1 THEN 5 + p1 % 95 ELSE 0 END
                     + CASE WHEN nl > 2 THEN 5 + p2 % 95 ELSE 0 END,
       'EUR',
       '[' || '{"sku":"P' || p0 || '","name":"Product ' || p0 || '","price":' || (5 + p0 % 95) || ',"qty":1}'
           || CASE WHEN nl > 1 THEN ',{"sku":"P' || p1 || '","name":"Product ' || p1 || '","price":' || (5 + p1 % 95) || ',"qty":1}' ELSE '' END
           || CASE WHEN nl > 2 THEN ',{"sku":"P' || p2 || '","name":"Product ' || p2 || '","price":' || (5 + p2 % 95) || ',"qty":1}' ELSE '' END
           || ']',
       ts FROM go ORDER BY id;

-- the same lines as in orders.items, without parsing them again
INSERT INTO order_lines (order_id, contact_id, sku, qty, price, ts)
SELECT id, i, 'P' || p, 1, 5 + p % 95, ts FROM (
  SELECT id, i, ts, p0 AS p, 0 AS l FROM go
  UNION ALL SELECT id, i, ts, p1, 1 FROM go WHERE nl > 1
  UNION ALL SELECT id, i, ts, p2, 2 FROM go WHERE nl > 2) ORDER BY id, l;
$CREATE

-- carts of every tenth customer; q = (i / 10) % 20 picks the fate
INSERT INTO carts (cart_key, contact_id, currency, total, items, item_count, status, updated, abandoned_at, ordered_at)
SELECT 'k' || i, i, 'EUR', 5 + i % 95,
       json_array(json_object('sku', 'P' || (1 + i % 2000), 'name', 'Product ' || (1 + i % 2000),
                              'price', 5 + (1 + i % 2000) % 95, 'qty', 1)), 1,
       CASE WHEN q < 14 THEN 'ordered' WHEN q < 19 THEN 'abandoned' ELSE 'open' END,
       CASE WHEN q < 19 THEN e - 7200 ELSE $T - i % 1800 END,
       CASE WHEN q BETWEEN 14 AND 18 THEN e - 3600 END,
       CASE WHEN q < 14 THEN e END
FROM (SELECT i, e, (i / 10) % 20 AS q FROM gc WHERE i % 10 = 0);

-- abandoned carts: enrollment done, the 3 steps sent (or held out)
INSERT INTO enrollments (flow_id, contact_id, cart_id, anchor, next_step, status, created, holdout)
SELECT 1, contact_id, id, updated, 4, 'done', abandoned_at, (contact_id / 10) % 10 = 3
FROM carts WHERE status = 'abandoned';

-- win-back: lapsed 40 days or more, consenting: enrolled after the last
-- order (at 90 days, or yesterday), done
INSERT INTO enrollments (flow_id, contact_id, anchor, next_step, status, created, holdout)
SELECT 2, i, min(e + 90 * 86400, $T - 86400), 5, 'done', min(e + 90 * 86400, $T - 86400),
       (i * 31) % 10 = 7
FROM gc WHERE e <= $T - 40 * 86400 AND i % 10 <> 0;

INSERT INTO messages (enrollment_id, step, contact_id, status, next_try, attempts, sent_at, created)
SELECT e.id, s.position, e.contact_id, 'sent', e.anchor + s.delay_s, 1,
       min(e.anchor + s.delay_s, $T - 3600), e.created
FROM enrollments e JOIN steps s ON s.flow_id = e.flow_id
WHERE e.holdout = 0 AND (e.flow_id = 1 OR s.position <= 2);

INSERT INTO interactions (message, kind, ts)
SELECT id, 'open', sent_at + 600 FROM messages WHERE id % 10 = 0;
INSERT INTO interactions (message, kind, ts)
SELECT id, 'click', sent_at + 700 FROM messages WHERE id % 40 = 0;
COMMIT;
PRAGMA wal_checkpoint(TRUNCATE);
SQL
