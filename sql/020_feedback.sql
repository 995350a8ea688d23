-- remarket 020: feedback that arrives after a message left (issue 12).
--
-- One row per bounce, spam complaint or mailed unsubscribe that reached
-- remarket later: by `remarket feedback` (a DSN, an ARF report or a mail
-- to unsubscribe_mailto) or by POST /feedback (a sending service's
-- webhook). message is the message it is about when the report named it
-- (by its VERP tag or its Message-ID), else the last message sent to the
-- contact (webhooks that name only the address). A message is counted
-- once per kind, however often its report arrives.
CREATE TABLE IF NOT EXISTS feedback (
  id         INTEGER PRIMARY KEY,
  message    INTEGER REFERENCES messages(id),
  contact_id INTEGER NOT NULL REFERENCES contacts(id),
  kind       TEXT NOT NULL
             CHECK (kind IN ('hard', 'soft', 'complaint', 'unsubscribe')),
  status     TEXT NOT NULL DEFAULT '', -- RFC 3463 status, or the provider's word
  source     TEXT NOT NULL,            -- mail, remarket, mailgun, postmark
  ts         INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS feedback_once ON feedback(message, kind)
  WHERE message IS NOT NULL;
-- soft bounces of a contact within 14 days
CREATE INDEX IF NOT EXISTS feedback_contact ON feedback(contact_id, kind, ts);
-- a report that names our Message-ID finds its message
CREATE INDEX IF NOT EXISTS messages_message_id ON messages(message_id);
-- Mailgun's signature covers a timestamp and a token, not the event it
-- comes with: each token is taken once while fresh (5 minutes), so a
-- signed pair seen in a log cannot carry other events. Purged as it ages.
CREATE TABLE IF NOT EXISTS webhook_tokens (
  token TEXT PRIMARY KEY,
  ts    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_tokens_ts ON webhook_tokens(ts);
