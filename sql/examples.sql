-- How an application talks to walpush: plain SQL, inside its own transactions.

-- Register where a user can be reached (the channel is a configured channel's name).
INSERT INTO walpush.devices (recipient, channel, address)
VALUES ('user-42', 'hooks', 'https://partner.example.com/hooks/walpush')
ON CONFLICT (channel, address) DO UPDATE
    SET recipient = EXCLUDED.recipient, active = true, deactivated_reason = NULL,
        updated_at = now();

-- Push something, atomically with the business change it belongs to.
BEGIN;
UPDATE orders SET status = 'shipped' WHERE id = 1001;
INSERT INTO walpush.outbox (topic, recipient, payload, collapse_key, dedupe_key)
VALUES ('order.shipped', 'user-42',
        '{"title": "Your order shipped", "body": "Order 1001 is on its way",
          "data": {"order_id": 1001}}',
        'order-1001', 'order-1001-shipped');
COMMIT;

-- Only to some channels.
INSERT INTO walpush.outbox (topic, recipient, payload, channels)
VALUES ('security.login', 'user-42', '{"title": "New sign-in"}', ARRAY['ios', 'android']);

-- What happened to a message.
SELECT d.device_id, v.channel, d.status, d.attempts, d.last_error, d.sent_at
FROM walpush.deliveries d
JOIN walpush.devices v ON v.id = d.device_id
WHERE d.outbox_id = 1;

-- Deliveries by status.
SELECT status, count(*) FROM walpush.deliveries GROUP BY status;

-- Devices a provider said are gone.
SELECT id, recipient, channel, deactivated_reason FROM walpush.devices WHERE NOT active;

-- Housekeeping: outbox rows whose deliveries are all final and older than 30 days.
DELETE FROM walpush.outbox o
WHERE o.created_at < now() - interval '30 days'
  AND NOT EXISTS (
      SELECT 1 FROM walpush.deliveries d
      WHERE d.outbox_id = o.id AND d.status IN ('pending', 'failed'));
