-- remarket 025: when a due message may go (issue 13: smart sending,
-- quiet hours).
--
-- deferred_by: the last timing rule that held the message back ('gap':
-- another message reached the contact within min_gap_hours; 'cart': an
-- open cart sequence goes first; 'quiet': the channel's quiet hours in
-- the contact's time zone). NULL if none ever did. The report counts
-- these messages, and those of them skipped as stale.
ALTER TABLE messages ADD COLUMN deferred_by TEXT;
-- gate_at: when this message passed the timing rules for the attempt
-- under way (written in one write transaction with the check, so that
-- two senders never both pass for one contact).
ALTER TABLE messages ADD COLUMN gate_at INTEGER;
-- the messages a contact received lately, and those on their way: the
-- gap check reads a window of these, never the contact's whole history
CREATE INDEX IF NOT EXISTS messages_contact_sent ON messages(contact_id, sent_at);
CREATE INDEX IF NOT EXISTS messages_contact_gate ON messages(contact_id, gate_at);
-- the contact's IANA time zone as the browser reported it (validated
-- against the system's tz database), or NULL: the store's timezone.
ALTER TABLE contacts ADD COLUMN tz TEXT;
