-- 009_keys_codes.sql: a single-use code is used once.

-- A checkout's hold on a code: POST /discounts/validate with "reserve":
-- true keeps the code for that cart until reserved_until (15 minutes);
-- meanwhile another cart is told "reserved". The order event redeems it.
ALTER TABLE discounts ADD COLUMN reserved_cart TEXT;
ALTER TABLE discounts ADD COLUMN reserved_until INTEGER;

-- What the order's discount_code was, set by the order event: 'redeemed'
-- (this order used the code first, before it expired), 'reused' (another
-- order had redeemed it), 'expired' (used after its expiry). NULL: no code,
-- or one remarket did not issue. Only a 'redeemed' code attributes the
-- order to the message that carried it, so a code earns one order.
ALTER TABLE orders ADD COLUMN code_status TEXT
  CHECK (code_status IN ('redeemed', 'reused', 'expired'));

-- Orders recorded before this migration, flagged by the same rules; no
-- row and no attribution is changed.
UPDATE orders SET code_status = 'expired' WHERE EXISTS (SELECT 1 FROM discounts d
  WHERE d.code = orders.discount_code AND orders.ts > d.expires);
UPDATE orders SET code_status = 'redeemed' WHERE code_status IS NULL
  AND EXISTS (SELECT 1 FROM discounts d WHERE d.code = orders.discount_code
  AND d.order_key = orders.order_key);
UPDATE orders SET code_status = 'reused' WHERE code_status IS NULL
  AND EXISTS (SELECT 1 FROM discounts d WHERE d.code = orders.discount_code
  AND d.redeemed_at IS NOT NULL);
CREATE INDEX orders_code_status ON orders(code_status) WHERE code_status IS NOT NULL;
