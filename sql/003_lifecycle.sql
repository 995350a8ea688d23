-- 003_lifecycle.sql: the whole customer life, not only carts: win-back of
-- lapsed customers, post-purchase messages, order lines for
-- recommendations, segments. (Migrations run with foreign keys off, so
-- flows can be rebuilt with its wider trigger list.)

CREATE TABLE flows_new (
  id          INTEGER PRIMARY KEY,
  name        TEXT NOT NULL UNIQUE,
  trigger     TEXT NOT NULL
              CHECK (trigger IN ('cart_abandoned', 'customer_lapsed', 'order_placed')),
  enabled     INTEGER NOT NULL DEFAULT 1,
  holdout_pct INTEGER NOT NULL DEFAULT 10 CHECK (holdout_pct BETWEEN 0 AND 50)
);
INSERT INTO flows_new (id, name, trigger, enabled, holdout_pct)
  SELECT id, name, trigger, enabled, holdout_pct FROM flows;
DROP TABLE flows;
ALTER TABLE flows_new RENAME TO flows;

-- A step for one segment only ('vip'), or for all but one ('!vip');
-- NULL: everyone. A step whose segment does not match is skipped, and
-- the contact goes on to the next one.
ALTER TABLE steps ADD COLUMN segment TEXT;

-- Post-purchase enrollments hang on an order, win-back ones on nothing.
ALTER TABLE enrollments ADD COLUMN order_id INTEGER REFERENCES orders(id);
CREATE UNIQUE INDEX enrollments_order ON enrollments(flow_id, order_id)
  WHERE order_id IS NOT NULL;
CREATE INDEX enrollments_contact ON enrollments(contact_id, flow_id, created);

-- One row per product line of an order: what recommendations are made of.
-- Written with the order (order events and remarket import orders).
CREATE TABLE order_lines (
  order_id   INTEGER NOT NULL REFERENCES orders(id),
  contact_id INTEGER REFERENCES contacts(id),
  sku        TEXT NOT NULL,
  qty        INTEGER NOT NULL DEFAULT 1,
  price      REAL,
  ts         INTEGER NOT NULL
);
INSERT INTO order_lines (order_id, contact_id, sku, qty, price, ts)
  SELECT o.id, o.contact_id, json_extract(j.value, '$.sku'),
         coalesce(json_extract(j.value, '$.qty'), 1), json_extract(j.value, '$.price'), o.ts
  FROM orders o, json_each(o.items) j WHERE json_extract(j.value, '$.sku') IS NOT NULL;
CREATE INDEX order_lines_sku ON order_lines(sku, order_id);
CREATE INDEX order_lines_order ON order_lines(order_id, sku);
CREATE INDEX order_lines_contact ON order_lines(contact_id, sku);
CREATE INDEX products_category ON products(category);

-- Each customer's RFM scores (1-5, quintiles over all customers) and named
-- segment, recomputed by every tick and by `remarket segments`.
CREATE TABLE segments (
  contact_id INTEGER PRIMARY KEY REFERENCES contacts(id),
  r INTEGER NOT NULL, f INTEGER NOT NULL, m INTEGER NOT NULL,
  orders INTEGER NOT NULL, spent REAL NOT NULL, last_order INTEGER NOT NULL,
  segment TEXT NOT NULL
    CHECK (segment IN ('new', 'active', 'vip', 'at_risk', 'lapsed', 'lost'))
);

-- Win-back: a personal recommendation at once, a loyalty code a week later
-- (min_spend -1: the store's average order value), VIPs get early access
-- instead, and a last chance two days before the code expires.
INSERT INTO flows (id, name, trigger, holdout_pct) VALUES (2, 'winback', 'customer_lapsed', 10);
INSERT INTO steps (flow_id, position, delay_s, template, segment) VALUES
  (2, 1, 0, 'winback_recommend', NULL);
INSERT INTO steps (flow_id, position, delay_s, template, discount_pct, discount_valid, min_spend, segment) VALUES
  (2, 2, 604800, 'winback_offer', 15, 1209600, -1, '!vip');
INSERT INTO steps (flow_id, position, delay_s, template, segment) VALUES
  (2, 3, 604800, 'winback_vip', 'vip'),
  (2, 4, 1641600, 'winback_last_chance', '!vip');

-- Post-purchase: thanks with the order at 1 h, a review request after
-- delivery (10 days), a cross-sell of what goes with it (21 days). Never a
-- discount. Not held out: a receipt-like thank-you is owed to everyone.
-- Off by default: many shops send their own confirmation (remarket flows
-- enable post_purchase).
INSERT INTO flows (id, name, trigger, holdout_pct, enabled) VALUES (3, 'post_purchase', 'order_placed', 0, 0);
INSERT INTO steps (flow_id, position, delay_s, template) VALUES
  (3, 1, 3600, 'order_thanks'),
  (3, 2, 864000, 'review_request'),
  (3, 3, 1814400, 'cross_sell');
