-- 019_report.sql: what the report's one definition of "recovered" and its
-- activity list look up per cart (issue 11).
--
-- A recovered cart's revenue is the revenue of the orders that ordered it
-- (orders.cart_id, or the contact's order at the cart's ordered_at), per
-- cart, so orders are indexed by cart. (A cart's enrollment is found by
-- the (flow_id, cart_id) key enrollments already have.) IF NOT EXISTS:
-- the migration may be replayed.
CREATE INDEX IF NOT EXISTS orders_cart ON orders(cart_id) WHERE cart_id IS NOT NULL;
