-- Every statement the relay runs, one `-- name: X` block each, with a one-line purpose.
-- Loaded once by relay/queries.py; tests PREPARE each one against the migrated schema.
-- `now` is an optional parameter (NULL = the server's clock) so tests own time.

-- name: claim_intents
-- Lease up to `limit` eligible intents of one provider; commit before any provider call.
WITH picked AS (
    SELECT id
    FROM outbox.payment_intents
    WHERE status = 'pending'
      AND provider = %(provider)s
      AND available_at <= COALESCE(%(now)s::timestamptz, now())
    ORDER BY available_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox.payment_intents AS i
SET status = 'in_flight',
    attempts = i.attempts + 1,
    lease_token = nextval('outbox.lease_token_seq'),
    lease_expires_at = COALESCE(%(now)s::timestamptz, now()) + make_interval(secs => %(lease_seconds)s),
    claimed_by = %(instance)s,
    updated_at = COALESCE(%(now)s::timestamptz, now())
FROM picked, outbox.payments AS p
WHERE i.id = picked.id AND p.payment_id = i.payment_id
RETURNING i.id, i.payment_id, i.action, i.provider, i.amount_minor, i.currency,
          i.payment_method, i.idempotency_key, i.attempts, i.lease_token,
          i.metadata ->> 'traceparent' AS traceparent,
          p.state AS payment_state, p.authorized_minor, p.captured_minor, p.refunded_minor,
          p.provider_reference AS payment_reference;

-- name: lock_payments
-- Lock the payments a write-back touches, in a fixed order, before reading blocked intents.
SELECT payment_id
FROM outbox.payments
WHERE payment_id = ANY(%(payment_ids)s::text[])
ORDER BY payment_id
FOR UPDATE;

-- name: complete_intents
-- Write a batch of outcomes, each fenced by its lease token; promote the next blocked intent.
WITH outcome AS (
    SELECT *
    FROM unnest(
        %(ids)s::bigint[], %(lease_tokens)s::bigint[], %(statuses)s::text[],
        %(retry_delays)s::float8[], %(provider_references)s::text[],
        %(amounts_applied)s::bigint[], %(error_codes)s::text[], %(error_messages)s::text[],
        %(payment_states)s::text[], %(authorized)s::bigint[], %(captured)s::bigint[],
        %(refunded)s::bigint[], %(payment_references)s::text[]
    ) AS o(id, lease_token, status, retry_delay, provider_reference, amount_applied_minor,
           error_code, error_message, payment_state, authorized_minor, captured_minor,
           refunded_minor, payment_reference)
),
written AS (
    UPDATE outbox.payment_intents AS i
    SET status = o.status,
        available_at = CASE WHEN o.status = 'pending'
                            THEN COALESCE(%(now)s::timestamptz, now()) + make_interval(secs => o.retry_delay)
                            ELSE i.available_at END,
        lease_token = NULL,
        lease_expires_at = NULL,
        claimed_by = NULL,
        provider_reference = COALESCE(o.provider_reference, i.provider_reference),
        amount_applied_minor = o.amount_applied_minor,
        error_code = o.error_code,
        error_message = o.error_message,
        completed_at = CASE WHEN o.status IN ('succeeded', 'failed', 'dead')
                            THEN COALESCE(%(now)s::timestamptz, now()) END,
        updated_at = COALESCE(%(now)s::timestamptz, now())
    FROM outcome AS o
    WHERE i.id = o.id AND i.lease_token = o.lease_token AND i.status = 'in_flight'
    RETURNING i.id, i.payment_id, i.status
),
paid AS (
    UPDATE outbox.payments AS p
    SET state = o.payment_state,
        authorized_minor = o.authorized_minor,
        captured_minor = o.captured_minor,
        refunded_minor = o.refunded_minor,
        provider_reference = COALESCE(o.payment_reference, p.provider_reference),
        updated_at = COALESCE(%(now)s::timestamptz, now())
    FROM outcome AS o JOIN written AS w ON w.id = o.id
    WHERE p.payment_id = w.payment_id AND o.payment_state IS NOT NULL
    RETURNING p.payment_id
),
promoted AS (
    UPDATE outbox.payment_intents AS n
    SET status = 'pending',
        available_at = COALESCE(%(now)s::timestamptz, now()),
        updated_at = COALESCE(%(now)s::timestamptz, now())
    WHERE n.id IN (
        SELECT (SELECT b.id
                FROM outbox.payment_intents AS b
                WHERE b.payment_id = w.payment_id AND b.status = 'blocked'
                ORDER BY b.payment_seq
                LIMIT 1)
        FROM written AS w
        WHERE w.status IN ('succeeded', 'failed')
    )
    RETURNING n.id
)
SELECT w.id, (SELECT count(*) FROM promoted) AS promoted FROM written AS w;

-- name: requeue_expired_leases
-- Return intents whose relay died (lease expired) to pending, to be retried under the same key.
WITH expired AS (
    SELECT id
    FROM outbox.payment_intents
    WHERE status = 'in_flight' AND lease_expires_at < COALESCE(%(now)s::timestamptz, now())
    ORDER BY lease_expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox.payment_intents AS i
SET status = 'pending',
    lease_token = NULL,
    lease_expires_at = NULL,
    claimed_by = NULL,
    available_at = COALESCE(%(now)s::timestamptz, now()),
    error_code = 'lease_expired',
    error_message = 'the relay holding this intent stopped before writing an outcome; '
                    'it is retried with the same idempotency key',
    updated_at = COALESCE(%(now)s::timestamptz, now())
FROM expired
WHERE i.id = expired.id
RETURNING i.id;

-- name: release_leases
-- Give back claimed intents that never reached the provider (shutdown), fenced by token.
UPDATE outbox.payment_intents AS i
SET status = 'pending',
    attempts = greatest(i.attempts - 1, 0),
    lease_token = NULL,
    lease_expires_at = NULL,
    claimed_by = NULL,
    available_at = COALESCE(%(now)s::timestamptz, now()),
    updated_at = COALESCE(%(now)s::timestamptz, now())
FROM unnest(%(ids)s::bigint[], %(lease_tokens)s::bigint[]) AS r(id, lease_token)
WHERE i.id = r.id AND i.lease_token = r.lease_token AND i.status = 'in_flight'
RETURNING i.id;

-- name: status_counts
-- Queue depth by provider and status, for `outbox-relay status` and the demo.
SELECT provider, status, count(*) AS intents,
       min(created_at) FILTER (WHERE status = 'pending') AS oldest_pending
FROM outbox.payment_intents
GROUP BY provider, status
ORDER BY provider, status;

-- name: schema_version
-- The latest applied migration, for readiness and `status`.
SELECT max(version) FROM outbox.schema_migrations;
