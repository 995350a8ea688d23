-- 011_cart_generations.sql: a cart goes on after its order; a catalog may
-- name products by brand and category only.

-- A cart id lives on after its order: an item change with a later ts than
-- the order starts generation N + 1 under the same cart_key. The ordered
-- generation keeps its row (its id, items, orders and enrollments) under
-- the key "<cart_key>#<N>" ('#' is in no cart id), so each generation is
-- abandoned, enrolled and attributed on its own. Written by ev_cart.
ALTER TABLE carts ADD COLUMN generation INTEGER NOT NULL DEFAULT 1;
-- when generation N + 1 began (the ts of its first item change); NULL for
-- a first generation. An order with an earlier ts is the generation before.
ALTER TABLE carts ADD COLUMN started INTEGER;

-- The product's brand (product events and catalog imports, optional):
-- with the category it names a product that has no name ("Brand · category").
ALTER TABLE products ADD COLUMN brand TEXT;
