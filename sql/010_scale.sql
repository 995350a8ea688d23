-- 010_scale.sql: a tick whose cost grows with what changed, not with the
-- store's history (issue 10). Segments become incremental: each customer's
-- aggregates are brought up to date from the orders added since the last
-- tick, and a segment is recomputed only for customers whose orders
-- changed or who crossed a time boundary (see the Segments section of
-- remarket.c). Every statement here may run twice (IF NOT EXISTS): the
-- unit test of migration 009 replays it.

-- The one row of bookkeeping behind the segments table. orders_seen: the
-- orders (by id) already counted in segments. now: the clock of the last
-- update that found work (time boundaries crossed since then are looked
-- up by index). lapse/lapse_why: the win-back threshold in seconds, cached
-- (winback_after = auto learns it from every order). cuts_at: when the
-- RFM quintile cut points were computed, over how many customers;
-- cuts_stale: how many changes to customers' orders since; cuts_key: the
-- cuts as text, to tell whether a refresh moved them. r1..r4 (with
-- r1c..r4c, the contact id that breaks ties) are the first (last_order,
-- contact_id) of quintiles 2-5, likewise f on (orders, contact_id) and m
-- on (spent, contact_id): a score is 1 plus the cuts at or below the
-- customer, which is what ntile(5) gives while the customers are those
-- the cuts were computed on. flows: what lapse enrollment depended on
-- (lapse flows, threshold, cool-down), NULL from a change of the cuts or
-- the threshold until everyone is marked dirty; when it changes every
-- customer is checked again.
CREATE TABLE IF NOT EXISTS segment_state (
  id          INTEGER PRIMARY KEY CHECK (id = 1),
  orders_seen INTEGER NOT NULL DEFAULT 0,
  now         INTEGER,
  lapse       INTEGER,
  lapse_why   TEXT,
  cuts_at     INTEGER,
  cuts_stale  INTEGER NOT NULL DEFAULT 1,
  cuts_key    TEXT,
  customers   INTEGER,
  flows       TEXT,
  r1, r1c, r2, r2c, r3, r3c, r4, r4c,
  f1, f1c, f2, f2c, f3, f3c, f4, f4c,
  m1, m1c, m2, m2c, m3, m3c, m4, m4c
);

-- Customers whose segment (and win-back eligibility) must be looked at
-- again: their orders changed, they crossed a time boundary, their
-- consent changed, or everyone after the cut points moved. Emptied in
-- chunks by the tick; a row left by a crash is done by the next tick.
CREATE TABLE IF NOT EXISTS segment_dirty (contact_id INTEGER PRIMARY KEY);

-- A customer's earliest order dated after the clock of the update that
-- counted it (orders with ts > now do not count yet): looked at again
-- once the clock passes ts.
CREATE TABLE IF NOT EXISTS segment_pending (
  contact_id INTEGER PRIMARY KEY,
  ts         INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS segment_pending_ts ON segment_pending(ts);

-- The quintile cut points and the time boundaries are index ranges.
CREATE INDEX IF NOT EXISTS segments_last ON segments(last_order);
CREATE INDEX IF NOT EXISTS segments_orders ON segments(orders);
CREATE INDEX IF NOT EXISTS segments_spent ON segments(spent);

-- New orders of the last two days (post-purchase enrollment) and carts
-- abandoned by this tick: ranges, not scans. (Win-back cool-downs ending
-- are a range of enrollments_flow_created.)
CREATE INDEX IF NOT EXISTS orders_ts ON orders(ts);
CREATE INDEX IF NOT EXISTS carts_abandoned_at ON carts(abandoned_at)
  WHERE abandoned_at IS NOT NULL;

-- A contact who may now be written to (consent given, unsubscribe or
-- suppression lifted) may be due a win-back: the next tick looks.
CREATE TRIGGER IF NOT EXISTS contacts_reachable_segment
  AFTER UPDATE OF consent, unsubscribed_at, suppressed_at ON contacts
  WHEN new.consent = 1 AND new.unsubscribed_at IS NULL
   AND new.suppressed_at IS NULL AND (old.consent IS NOT 1
   OR old.unsubscribed_at IS NOT NULL OR old.suppressed_at IS NOT NULL)
BEGIN
  INSERT OR IGNORE INTO segment_dirty (contact_id) VALUES (new.id);
END;
