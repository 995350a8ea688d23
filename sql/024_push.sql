-- remarket 024: web push subscriptions (issue 13).
--
-- One row per browser that let the store send it notifications: the
-- PushSubscription remarket.js posts to /push/subscribe. endpoint is the
-- push service's URL for that browser (RFC 8030); p256dh and auth are the
-- browser's P-256 public key (65 bytes) and auth secret (16 bytes),
-- base64url, that each message is encrypted to (RFC 8291). visitor_id is
-- the browser's rm_vid; contact_id the contact that visitor was then
-- (NULL: not known yet, found through visitors when sending). Written by
-- POST /push/subscribe; deleted when the push service answers 404 or 410
-- (the browser unsubscribed) and when the contact is forgotten.
CREATE TABLE IF NOT EXISTS push_subscriptions (
  id          INTEGER PRIMARY KEY,
  endpoint    TEXT NOT NULL UNIQUE,
  p256dh      TEXT NOT NULL,
  auth        TEXT NOT NULL,
  visitor_id  TEXT,
  contact_id  INTEGER REFERENCES contacts(id),
  created     INTEGER NOT NULL,
  last_sent   INTEGER,          -- when push_send last reached the service
  last_status INTEGER           -- the push service's HTTP status then
);
CREATE INDEX IF NOT EXISTS push_subscriptions_contact
  ON push_subscriptions(contact_id);
CREATE INDEX IF NOT EXISTS push_subscriptions_visitor
  ON push_subscriptions(visitor_id);
