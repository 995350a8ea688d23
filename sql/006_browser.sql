-- 006_browser.sql: the browser may name, never write. What a contact's
-- word came from, the browser's own consent, the double opt-in, and carts
-- a browser made kept apart from the backend's.

-- 1 once a signed hook or the operator (CLI, imports) named the address;
-- 0 for an address only ever typed into a browser ("browser-only").
ALTER TABLE contacts ADD COLUMN signed INTEGER NOT NULL DEFAULT 0;
-- The visitor whose checkbox gave the consent: only that browser may take
-- it back (a stranger typing the address may not).
ALTER TABLE contacts ADD COLUMN consent_vid TEXT;
-- browser_consent = confirm: the browser asked for consent (1) and the
-- confirmation mail went out (confirm_sent_at); the click sets consent.
ALTER TABLE contacts ADD COLUMN consent_pending INTEGER NOT NULL DEFAULT 0;
ALTER TABLE contacts ADD COLUMN confirm_sent_at INTEGER;
ALTER TABLE contacts ADD COLUMN confirmed_at INTEGER;
-- Set when a browser-only contact arrived past browser_new_contacts_per_hour:
-- recorded, never mailed until a signed hook names the address.
ALTER TABLE contacts ADD COLUMN held_at INTEGER;
CREATE INDEX contacts_browser_created ON contacts(signed, created);
CREATE INDEX contacts_pending ON contacts(consent_pending, confirm_sent_at);
CREATE INDEX contacts_held ON contacts(held_at) WHERE held_at IS NOT NULL;

-- Addresses the backend or the operator named before this migration.
UPDATE contacts SET signed = 1
WHERE email IN (SELECT json_extract(body, '$.email') FROM events
                WHERE source IN ('hook', 'cli'))
   OR id IN (SELECT contact_id FROM orders WHERE contact_id IS NOT NULL);

-- Carts a browser made (a visitor, and never named by a signed cart
-- event): their items keep sku and qty only (names, prices and links come
-- from the catalog at send time), and their keys become "<cart_id>/<vid>",
-- the form a browser's cart takes from now on, so the backend's cart of
-- the same id is never theirs.
CREATE TEMP TABLE browser_carts AS
  SELECT id FROM carts WHERE visitor_id IS NOT NULL
  AND cart_key NOT IN (SELECT json_extract(body, '$.cart_id') FROM events
                       WHERE source IN ('hook', 'cli') AND type = 'cart'
                       AND json_extract(body, '$.cart_id') IS NOT NULL);
UPDATE carts SET items = (SELECT json_group_array(json_object(
    'sku', json_extract(value, '$.sku'),
    'qty', coalesce(json_extract(value, '$.qty'), 1))) FROM json_each(carts.items))
WHERE id IN (SELECT id FROM temp.browser_carts);
UPDATE carts SET cart_key = cart_key || '/' || visitor_id
WHERE id IN (SELECT id FROM temp.browser_carts) AND cart_key NOT LIKE 'v:%'
  AND instr(cart_key, '/') = 0;
DROP TABLE temp.browser_carts;
