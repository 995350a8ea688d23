-- 008_tick.sql: the runs of the tick, so that POST /tick answers at once
-- and the operator can still see how each tick ended.

-- One row a tick run, written when it starts (by POST /tick or `remarket
-- tick`) and again when it ends. now is the tick's clock (injectable);
-- pid and started_real (real Unix seconds) tell whether a row without
-- finished_real is still running: its process lives and it is younger
-- than the longest a tick can take. summary is the tick's JSON (what
-- `remarket tick` prints), or {"error": ...}. Only the last 10000 runs
-- are kept.
CREATE TABLE ticks (
  id INTEGER PRIMARY KEY,
  now INTEGER NOT NULL,
  source TEXT NOT NULL,             -- 'http' or 'cli'
  pid INTEGER NOT NULL,
  started_real INTEGER NOT NULL,
  finished_real INTEGER,
  summary TEXT
);
CREATE INDEX ticks_open ON ticks (id) WHERE finished_real IS NULL;
