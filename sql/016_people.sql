-- remarket 016: people and personal data (issue 11).
--
-- `remarket forget EMAIL` erases a person and keeps only this: a keyed
-- hash of the address (libsodium generichash, keyed by the newest key of
-- the key ring), so that a later event or import naming the address finds
-- it and the new contact starts suppressed ('forgotten') instead of being
-- silently mailed again. Only `remarket suppress remove EMAIL` lifts that.
CREATE TABLE IF NOT EXISTS forgotten (
  hash TEXT PRIMARY KEY,       -- hex of generichash(lower(email), key)
  ts   INTEGER NOT NULL        -- when it was forgotten
) WITHOUT ROWID;
