-- 012_reco.sql: recommendations that are personal, and cheap to send.

-- What a catalog line is: 'product' (a thing a customer buys and may be
-- recommended) or 'service' (postage, carriage, fees, bank charges,
-- manual adjustments: on many orders, never a product). Guessed by
-- rm_service(sku, name) when a product first appears (product hook,
-- catalog import, order import); set by `remarket products kind` or a
-- catalog CSV's kind column. Services are never recommended nor counted
-- in reco_items / reco_pairs.
ALTER TABLE products ADD COLUMN kind TEXT NOT NULL DEFAULT 'product'
  CHECK (kind IN ('product', 'service'));
UPDATE products SET kind = 'service' WHERE rm_service(sku, name);
-- service lines already ordered but not in the catalog get a row, so the
-- item-to-item table below never counts them (the distinct SKUs found by
-- one index seek each, not by reading every order line)
WITH RECURSIVE s(sku) AS (
  SELECT min(sku) FROM order_lines
  UNION ALL
  SELECT (SELECT min(sku) FROM order_lines WHERE sku > s.sku) FROM s
  WHERE s.sku IS NOT NULL)
INSERT INTO products (sku, name, kind, updated)
  SELECT sku, sku, 'service', 0 FROM s
  WHERE sku IS NOT NULL AND rm_service(sku, NULL) ON CONFLICT DO NOTHING;

-- The item-to-item table the recommendations read, written by
-- reco_refresh (before a mail that shows recommendations, and by
-- `remarket recommend`) from the order lines of orders after
-- reco_state.last_order, in short transactions, and corrected for one SKU
-- when its kind changes. A row of
-- reco_items: how many orders hold that product; of reco_pairs: how many
-- orders hold both (each pair twice, (a, b) and (b, a), so one index
-- seek finds every partner of a product). Orders of more than 100
-- distinct SKUs count for reco_items but not for pairs (a wholesale
-- order is no sign of taste, and its pairs grow as the square).
CREATE TABLE reco_items (
  sku    TEXT PRIMARY KEY,
  orders INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX reco_items_orders ON reco_items(orders, sku);
CREATE TABLE reco_pairs (
  sku    TEXT NOT NULL,
  other  TEXT NOT NULL,
  orders INTEGER NOT NULL,
  PRIMARY KEY (sku, other)
) WITHOUT ROWID;
-- one row: the last order id counted (order ids only grow), and how many
-- orders with lines were counted (the N of lift)
CREATE TABLE reco_state (
  id         INTEGER PRIMARY KEY CHECK (id = 1),
  last_order INTEGER NOT NULL,
  orders     INTEGER NOT NULL
);
INSERT INTO reco_state (id, last_order, orders) VALUES (1, 0, 0);
