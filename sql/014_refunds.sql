-- 014_refunds.sql: cancellations and refunds reduce an order's revenue.

-- What was refunded of an order (a refund event, or an imported 'C'
-- invoice): never more than its total. The report's revenue, recovered
-- and attributed revenue and the segments' `spent` count total - refunded.
ALTER TABLE orders ADD COLUMN refunded REAL NOT NULL DEFAULT 0;

-- One row per refund, so a hook sent twice refunds once: the key is the
-- event's refund_id, or order_id@ts:amount without one.
CREATE TABLE refunds (
  id INTEGER PRIMARY KEY,
  refund_key TEXT NOT NULL UNIQUE,
  order_id INTEGER NOT NULL REFERENCES orders(id),
  amount REAL NOT NULL,
  ts INTEGER NOT NULL
);
CREATE INDEX refunds_order ON refunds (order_id);
