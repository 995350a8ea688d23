-- 001_init.sql: the first schema of remarket. Each migration file in sql/
-- is numbered; `remarket init` runs those above PRAGMA user_version, in
-- order, each in one transaction, and sets user_version to its number.
-- Times are Unix seconds. Money is REAL in the store's currency.

-- One row per accepted event, exactly as it arrived (append-only).
-- Written by ev_ingest before anything reacts to the event.
CREATE TABLE events (
  id       INTEGER PRIMARY KEY,
  ts       INTEGER NOT NULL,            -- when it happened (event's ts or arrival)
  received INTEGER NOT NULL,            -- when remarket accepted it
  source   TEXT NOT NULL CHECK (source IN ('hook','browser','cli','pixel')),
  type     TEXT NOT NULL,
  body     TEXT NOT NULL CHECK (json_valid(body))
);
CREATE INDEX events_type_ts ON events(type, ts);

-- A person the store may write to. Created by identify, cart and order
-- events that carry an email; unsubscribed by /u/ links; suppressed after
-- a permanent (5xx) delivery failure.
CREATE TABLE contacts (
  id              INTEGER PRIMARY KEY,
  email           TEXT NOT NULL UNIQUE COLLATE NOCASE,
  name            TEXT NOT NULL DEFAULT '',
  consent         INTEGER NOT NULL DEFAULT 0,
  unsubscribed_at INTEGER,
  suppressed_at   INTEGER,
  suppress_reason TEXT,
  created         INTEGER NOT NULL,
  updated         INTEGER NOT NULL
);

-- A browser (cookie rm_vid) and, once known, the contact behind it.
CREATE TABLE visitors (
  vid        TEXT PRIMARY KEY,
  contact_id INTEGER REFERENCES contacts(id),
  first_seen INTEGER NOT NULL,
  last_seen  INTEGER NOT NULL
);

-- The latest state of a shopping cart, from cart/checkout/order events.
-- status: open (being filled), abandoned (idle past idle_minutes and
-- enrolled), ordered, empty.
CREATE TABLE carts (
  id           INTEGER PRIMARY KEY,
  cart_key     TEXT NOT NULL UNIQUE,       -- the store's cart_id
  contact_id   INTEGER REFERENCES contacts(id),
  visitor_id   TEXT,
  currency     TEXT NOT NULL DEFAULT 'EUR',
  total        REAL NOT NULL DEFAULT 0,
  items        TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(items)),
  item_count   INTEGER NOT NULL DEFAULT 0,
  status       TEXT NOT NULL DEFAULT 'open'
               CHECK (status IN ('open','abandoned','ordered','empty')),
  updated      INTEGER NOT NULL,           -- last shopper activity
  abandoned_at INTEGER,
  ordered_at   INTEGER
);
CREATE INDEX carts_status_updated ON carts(status, updated);
CREATE INDEX carts_contact ON carts(contact_id);

-- A placed order, from signed order events (idempotent on order_key).
CREATE TABLE orders (
  id            INTEGER PRIMARY KEY,
  order_key     TEXT NOT NULL UNIQUE,
  contact_id    INTEGER REFERENCES contacts(id),
  cart_id       INTEGER REFERENCES carts(id),
  total         REAL NOT NULL DEFAULT 0,
  currency      TEXT NOT NULL DEFAULT 'EUR',
  items         TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(items)),
  discount_code TEXT,
  ts            INTEGER NOT NULL
);
CREATE INDEX orders_contact ON orders(contact_id, ts);

-- The catalog, from product events: used for social proof.
CREATE TABLE products (
  sku      TEXT PRIMARY KEY,
  name     TEXT NOT NULL DEFAULT '',
  price    REAL,
  url      TEXT,
  image    TEXT,
  category TEXT,
  updated  INTEGER NOT NULL
);
CREATE TABLE reviews (
  id     INTEGER PRIMARY KEY,
  sku    TEXT NOT NULL REFERENCES products(sku),
  author TEXT NOT NULL,
  rating INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 5),
  text   TEXT NOT NULL,
  ts     INTEGER NOT NULL,
  UNIQUE (sku, author, text)
);

-- A flow is a trigger plus ordered steps. The operator edits these rows
-- (remarket flows set ...) without recompiling; a change applies to every
-- step not yet sent.
CREATE TABLE flows (
  id          INTEGER PRIMARY KEY,
  name        TEXT NOT NULL UNIQUE,
  trigger     TEXT NOT NULL CHECK (trigger IN ('cart_abandoned')),
  enabled     INTEGER NOT NULL DEFAULT 1
);
-- delay_s counts from the trigger's anchor (the cart's last activity).
CREATE TABLE steps (
  flow_id        INTEGER NOT NULL REFERENCES flows(id),
  position       INTEGER NOT NULL CHECK (position >= 1),
  delay_s        INTEGER NOT NULL CHECK (delay_s >= 0),
  channel        TEXT NOT NULL DEFAULT 'email' CHECK (channel IN ('email')),
  template       TEXT NOT NULL,
  discount_pct   INTEGER CHECK (discount_pct BETWEEN 1 AND 90),
  discount_valid INTEGER CHECK (discount_valid > 0),   -- seconds from sending
  min_spend      REAL NOT NULL DEFAULT 0,
  PRIMARY KEY (flow_id, position)
);

-- One contact going through one flow for one cart.
-- status: active, done (all steps sent), exited (exit_reason says why).
CREATE TABLE enrollments (
  id          INTEGER PRIMARY KEY,
  flow_id     INTEGER NOT NULL REFERENCES flows(id),
  contact_id  INTEGER NOT NULL REFERENCES contacts(id),
  cart_id     INTEGER REFERENCES carts(id),
  anchor      INTEGER NOT NULL,               -- step delays count from here
  next_step   INTEGER NOT NULL DEFAULT 1,
  status      TEXT NOT NULL DEFAULT 'active'
              CHECK (status IN ('active','done','exited')),
  exit_reason TEXT,
  created     INTEGER NOT NULL,
  UNIQUE (flow_id, cart_id)
);
CREATE INDEX enrollments_active ON enrollments(status, next_step);

-- One message per (enrollment, step): the UNIQUE key is what makes a step
-- impossible to send twice. status: queued (waiting for next_try),
-- sending (claimed until lease_until), sent, failed (permanent), skipped
-- (an exit condition held at send time).
CREATE TABLE messages (
  id            INTEGER PRIMARY KEY,
  enrollment_id INTEGER NOT NULL REFERENCES enrollments(id),
  step          INTEGER NOT NULL,
  contact_id    INTEGER NOT NULL REFERENCES contacts(id),
  status        TEXT NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued','sending','sent','failed','skipped')),
  next_try      INTEGER NOT NULL,
  lease_until   INTEGER,
  attempts      INTEGER NOT NULL DEFAULT 0,
  message_id    TEXT,                  -- RFC 5322 Message-ID, fixed at first claim
  discount_code TEXT,
  sent_at       INTEGER,
  error         TEXT,
  created       INTEGER NOT NULL,
  UNIQUE (enrollment_id, step)
);
CREATE INDEX messages_due ON messages(status, next_try);

-- Single-use discount codes handed out by incentive steps.
CREATE TABLE discounts (
  code        TEXT PRIMARY KEY,
  percent     INTEGER NOT NULL,
  min_spend   REAL NOT NULL DEFAULT 0,
  contact_id  INTEGER REFERENCES contacts(id),
  message     INTEGER REFERENCES messages(id),
  created     INTEGER NOT NULL,
  expires     INTEGER NOT NULL,
  redeemed_at INTEGER,
  order_key   TEXT
);

-- Opens, clicks and unsubscribes on sent messages.
CREATE TABLE interactions (
  id      INTEGER PRIMARY KEY,
  message INTEGER NOT NULL REFERENCES messages(id),
  kind    TEXT NOT NULL CHECK (kind IN ('open','click','unsubscribe','discount')),
  ts      INTEGER NOT NULL
);
CREATE INDEX interactions_message ON interactions(message, kind);

-- The default abandoned-cart flow: reminder at 1 h, social proof at 24 h,
-- 10 % off valid 48 h at 72 h.
INSERT INTO flows (id, name, trigger) VALUES (1, 'abandoned_cart', 'cart_abandoned');
INSERT INTO steps (flow_id, position, delay_s, template) VALUES
  (1, 1, 3600, 'cart_reminder'),
  (1, 2, 86400, 'social_proof');
INSERT INTO steps (flow_id, position, delay_s, template, discount_pct, discount_valid)
  VALUES (1, 3, 259200, 'cart_incentive', 10, 172800);
