-- 015_winback.sql: the first campaign after an import is ramped.
--
-- The customers found lapsed (and eligible) by a tick wait here until
-- the daily cap (winback_daily_max, a rolling 24 h) lets them in; the
-- most recently lapsed first (last_order descending, by this index).
-- Nobody is lost: a row leaves only when enrolled or no longer eligible
-- (a new order, an unsubscribe, idle longer than winback_max_idle_days).
-- A tick with nothing waiting reads one index entry.
CREATE TABLE IF NOT EXISTS winback_waiting (
  flow_id INTEGER NOT NULL,
  contact_id INTEGER NOT NULL,
  last_order INTEGER NOT NULL,
  PRIMARY KEY (flow_id, contact_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS winback_waiting_recent
  ON winback_waiting(last_order DESC, contact_id);
