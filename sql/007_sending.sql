-- 007_sending.sql: a sending pipeline that loses nothing and bursts
-- nothing (issue 8). Columns only: no row is touched.

-- How many times a tick died while preparing this message (rendering,
-- before it reached the relay): set before the rendering, cleared once
-- the message is handed to the transport. A message that keeps killing
-- the tick is given up on; a tick killed while it waits for the relay
-- counts against nobody (attempts counts the hand-overs).
ALTER TABLE messages ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0;

-- A step paused because the relay refused its content for several
-- different recipients in a row (5xx at the end of DATA): its messages
-- wait, nobody is suppressed, until `remarket flows resume FLOW STEP`.
ALTER TABLE steps ADD COLUMN paused_at INTEGER;
ALTER TABLE steps ADD COLUMN paused_reason TEXT;
