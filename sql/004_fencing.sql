-- 004_fencing.sql: the tick that holds a message's lease, and visitors
-- whose link to a contact is proven.

-- A random number per tick, set when it claims a message: the tick checks
-- it right before sending and every write of the outcome requires it, so
-- a tick whose lease ran out (and was taken over) neither sends nor
-- records.
ALTER TABLE messages ADD COLUMN lease_owner INTEGER;

-- 1 when this browser reached the contact through a signed link (a
-- recovery click proves access to the mailbox); only then may /onsite
-- speak about the contact's carts, not for a visitor id anyone can claim.
ALTER TABLE visitors ADD COLUMN verified INTEGER NOT NULL DEFAULT 0;
