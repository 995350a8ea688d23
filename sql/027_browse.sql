-- remarket 027: browse abandonment (issue 13). A known contact who
-- looked at a product (two views, or one of 60 s or more) and added
-- nothing to a cart within browse_idle_minutes gets one mail about it.
--
-- flows.trigger has a CHECK listing its values (003), which SQLite
-- cannot alter: the table is rebuilt with the wider list. It copies
-- every column flows has at the time of writing, as PRAGMA
-- table_info(flows) lists them after 025: id, name, trigger, enabled,
-- holdout_pct. (Migrations run with foreign keys off.)
CREATE TABLE flows_new (
  id          INTEGER PRIMARY KEY,
  name        TEXT NOT NULL UNIQUE,
  trigger     TEXT NOT NULL
              CHECK (trigger IN ('cart_abandoned', 'customer_lapsed',
                                 'order_placed', 'browse_abandoned')),
  enabled     INTEGER NOT NULL DEFAULT 1,
  holdout_pct INTEGER NOT NULL DEFAULT 10 CHECK (holdout_pct BETWEEN 0 AND 50)
);
INSERT INTO flows_new (id, name, trigger, enabled, holdout_pct)
  SELECT id, name, trigger, enabled, holdout_pct FROM flows;
DROP TABLE flows;
ALTER TABLE flows_new RENAME TO flows;

-- One row per (known contact, product) viewed and not yet looked at by
-- the tick: upserted by view events, read by the index on last (only
-- rows idle for browse_idle_minutes), deleted once read.
CREATE TABLE browse_views (
  contact_id  INTEGER NOT NULL REFERENCES contacts(id),
  sku         TEXT NOT NULL,
  first       INTEGER NOT NULL,
  last        INTEGER NOT NULL,
  views       INTEGER NOT NULL DEFAULT 1,
  max_seconds INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (contact_id, sku)
);
CREATE INDEX browse_views_last ON browse_views(last);

-- A browse enrollment hangs on the product viewed (once per product per
-- 30 days: enrollments_contact_sku).
ALTER TABLE enrollments ADD COLUMN sku TEXT;
CREATE INDEX enrollments_contact_sku ON enrollments(contact_id, sku, created)
  WHERE sku IS NOT NULL;

-- Off by default: one mail, at once, about the product and two more.
INSERT INTO flows (name, trigger, holdout_pct, enabled)
  VALUES ('browse_abandonment', 'browse_abandoned', 10, 0);
INSERT INTO steps (flow_id, position, delay_s, template)
  SELECT id, 1, 0, 'browse_reminder' FROM flows WHERE name = 'browse_abandonment';
