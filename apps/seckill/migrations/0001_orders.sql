-- The sale's order book when it lives in PostgreSQL: one row per order, made from a
-- reservation of an inventory shard (order_id = '<inventory>-<reservation_id>').
CREATE TABLE seckill_orders (
    order_id       text    PRIMARY KEY,
    inventory      text    NOT NULL,
    reservation_id bigint  NOT NULL,
    item_id        text    NOT NULL,
    user_id        text    NOT NULL,
    status         text    NOT NULL
        CHECK (status IN ('pending_payment', 'paid', 'shipped', 'expired')),
    expires_at_ms  bigint  NOT NULL,
    -- For an expired order: whether its unit's release in the inventory was confirmed.
    released       boolean NOT NULL DEFAULT false,
    UNIQUE (inventory, reservation_id)
);

CREATE INDEX seckill_orders_user ON seckill_orders (user_id);
CREATE INDEX seckill_orders_item ON seckill_orders (item_id);
-- The expiry sweep reads only pending orders, by expiry time.
CREATE INDEX seckill_orders_due ON seckill_orders (expires_at_ms)
    WHERE status = 'pending_payment';
-- The release sweep reads only expired orders whose unit is not back yet.
CREATE INDEX seckill_orders_unreleased ON seckill_orders (order_id)
    WHERE status = 'expired' AND NOT released;
