-- 019_report.sql: what the report's activity list and its one definition
-- of "recovered" look up per cart (issue 11).
--
-- A recovered cart's revenue is the revenue of the orders that name it
-- (orders.cart_id), and the activity list finds a cart's enrollment
-- (enrollments.cart_id): both per row, so both indexed. IF NOT EXISTS:
-- the migration may be replayed.
CREATE INDEX IF NOT EXISTS orders_cart ON orders(cart_id) WHERE cart_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS enrollments_cart ON enrollments(cart_id)
  WHERE cart_id IS NOT NULL;
