-- 002_measure.sql: what measurement needs: holdout groups, A/B variants
-- and the attribution of each order to the message that earned it.

-- Share of a flow's enrollees (0-50 %) who get no message at all, so the
-- report can compare them with those who do. Assignment is deterministic:
-- a hash of (flow, email) under 10000 * holdout_pct / 100.
ALTER TABLE flows ADD COLUMN holdout_pct INTEGER NOT NULL DEFAULT 10
  CHECK (holdout_pct BETWEEN 0 AND 50);
ALTER TABLE enrollments ADD COLUMN holdout INTEGER NOT NULL DEFAULT 0;

-- A second version of a step: each column left NULL falls back to the
-- step's own. share % of contacts get B, chosen by a hash of (flow, step,
-- email), so a contact always sees the same variant of a step.
CREATE TABLE step_variants (
  flow_id        INTEGER NOT NULL REFERENCES flows(id),
  position       INTEGER NOT NULL,
  template       TEXT,
  delay_s        INTEGER CHECK (delay_s >= 0),
  discount_pct   INTEGER CHECK (discount_pct BETWEEN 0 AND 90),
  discount_valid INTEGER CHECK (discount_valid > 0),
  share          INTEGER NOT NULL DEFAULT 50 CHECK (share BETWEEN 1 AND 99),
  PRIMARY KEY (flow_id, position)
);
ALTER TABLE messages ADD COLUMN variant TEXT NOT NULL DEFAULT 'A'
  CHECK (variant IN ('A', 'B'));

-- Set by the order event: the message the order is attributed to, and how
-- (click: a click within the click window; code: the order redeemed the
-- message's code; influenced: only a send within the view window).
ALTER TABLE orders ADD COLUMN message INTEGER REFERENCES messages(id);
ALTER TABLE orders ADD COLUMN attribution TEXT
  CHECK (attribution IN ('click', 'code', 'influenced'));

CREATE INDEX messages_contact_sent ON messages(contact_id, sent_at);
CREATE INDEX messages_enrollment ON messages(enrollment_id);
CREATE INDEX orders_message ON orders(message);
CREATE INDEX orders_ts ON orders(ts);
CREATE INDEX enrollments_flow_created ON enrollments(flow_id, created);
CREATE INDEX discounts_message ON discounts(message);
