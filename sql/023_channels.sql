-- remarket 023: channels beyond email, SMS first (issue 13).
--
-- A step's channels: 'email' (as before), 'sms', or an ordered choice
-- such as 'sms,email': the message goes by the first one the contact has
-- consented to when it is sent. (steps.channel of 001 allows only
-- 'email' in its CHECK and is left as it is: a CHECK cannot be altered
-- without rebuilding the table.) `remarket flows set F N channel=...`
-- writes it; the code checks each name.
ALTER TABLE steps ADD COLUMN channels TEXT NOT NULL DEFAULT 'email'
  CHECK (channels <> '');
-- The channel a message went by: written when it is sent.
ALTER TABLE messages ADD COLUMN channel TEXT NOT NULL DEFAULT 'email';
-- A contact's mobile number (E.164: '+' and 8-15 digits) and its own SMS
-- consent, never implied by the email consent: with who gave it (hook,
-- cli, sms for a START) and when. A STOP sets sms_consent to 0.
ALTER TABLE contacts ADD COLUMN phone TEXT;
ALTER TABLE contacts ADD COLUMN sms_consent INTEGER NOT NULL DEFAULT 0;
ALTER TABLE contacts ADD COLUMN sms_consent_source TEXT;
ALTER TABLE contacts ADD COLUMN sms_consent_at INTEGER;
-- an inbound STOP finds the contacts of its number
CREATE INDEX IF NOT EXISTS contacts_phone ON contacts(phone)
  WHERE phone IS NOT NULL;
