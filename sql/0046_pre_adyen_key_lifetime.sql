-- Adyen keeps an idempotency key, and replays the first answer under it, for at least 31
-- days (../shared/PROVIDERS.md; docs/providers.md "Idempotency-key lifetimes"); Stripe for
-- at least 24 hours, the '*' row of sql/0005. An intent of the provider instance named
-- 'adyen' that was already sent may be sent again under its key for 31 days; past that the
-- guard of sql/0005 parks it dead (idempotency_key_expired) instead.
--
-- The row is keyed by the provider's *name*, which the database cannot tie to an adapter:
-- a relay checks at start that no provider it serves has a longer lifetime here than its
-- adapter's provider keeps (relay/domain/key_lifetimes.py), and refuses to start otherwise,
-- so a Stripe lane named 'adyen' can never inherit 31 days. Another Adyen instance ('adyen_eu')
-- gets the '*' 24 hours (safe, only earlier) until a row is added for it. An existing row
-- for 'adyen' is kept.
INSERT INTO outbox.provider_policies (provider, idempotency_key_lifetime)
VALUES ('adyen', interval '31 days')
ON CONFLICT (provider) DO NOTHING;

COMMENT ON TABLE outbox.provider_policies IS
    'Per-provider facts the database enforces. idempotency_key_lifetime: how long the '
    'provider deduplicates a key (Stripe: 24 hours, Adyen: 31 days), never longer than the '
    'provider keeps keys (relays refuse to start otherwise); ''*'' applies to providers '
    'without a row.';
