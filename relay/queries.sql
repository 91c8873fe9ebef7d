-- Every statement the relay runs, one `-- name: X` block each, with a one-line purpose.
-- Loaded once by relay/queries.py; tests PREPARE each one against the migrated schema.
-- `now` is an optional parameter (NULL = the server's clock) so tests own time.

-- name: claim_intents
-- Lease up to `limit` eligible intents of one provider; commit before any provider call.
-- The audit trail records the claim as 'relay:<instance>' (outbox.actor, set for this statement).
-- NOTE: an intent already sent longer ago than its provider's idempotency-key lifetime is
-- parked `dead` by a trigger instead of claimed (sql/0005); the final SELECT leaves it out.
WITH actor AS (
    SELECT set_config('outbox.actor', 'relay:' || %(instance)s::text, true) AS actor
),
picked AS (
    SELECT id
    FROM outbox.payment_intents
    WHERE status = 'pending'
      AND provider = %(provider)s
      AND available_at <= COALESCE(%(now)s::timestamptz, now())
    ORDER BY available_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
claimed AS (
    UPDATE outbox.payment_intents AS i
    SET status = 'in_flight',
        attempts = i.attempts + 1,
        lease_token = nextval('outbox.lease_token_seq'),
        lease_expires_at = COALESCE(%(now)s::timestamptz, now()) + make_interval(secs => %(lease_seconds)s),
        claimed_by = %(instance)s,
        updated_at = COALESCE(%(now)s::timestamptz, now())
    FROM picked, outbox.payments AS p, actor
    WHERE i.id = picked.id AND p.payment_id = i.payment_id
    RETURNING i.id, i.payment_id, i.action, i.provider, i.amount_minor, i.currency,
              i.payment_method, i.idempotency_key, i.attempts, i.lease_token,
              i.metadata ->> 'traceparent' AS traceparent,
              p.state AS payment_state, p.authorized_minor, p.captured_minor, p.refunded_minor,
              p.provider_reference AS payment_reference, i.status
)
SELECT id, payment_id, action, provider, amount_minor, currency, payment_method,
       idempotency_key, attempts, lease_token, traceparent, payment_state, authorized_minor,
       captured_minor, refunded_minor, payment_reference
FROM claimed
WHERE status = 'in_flight';

-- name: set_actor
-- Name who writes in this transaction (and why, optionally) for the audit trail's triggers.
SELECT set_config('outbox.actor', %(actor)s::text, true),
       set_config('outbox.reason', COALESCE(%(reason)s::text, ''), true);

-- name: lock_payments
-- Lock the payments a write-back touches, in a fixed order, before reading blocked intents.
SELECT payment_id
FROM outbox.payments
WHERE payment_id = ANY(%(payment_ids)s::text[])
ORDER BY payment_id
FOR UPDATE;

-- name: complete_intents
-- Write a batch of outcomes, each fenced by its lease token; promote the next blocked intent;
-- record one result event per terminal outcome (ordered per payment by the events trigger).
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
),
evented AS (
    -- Rows in ordering-key order: streams are locked in the same order by every write-back.
    INSERT INTO outbox.events
        (event_id, ordering_key, routing_key, event_type, payload, payment_id, traceparent)
    SELECT e.event_id, 'payment:' || w.payment_id, e.event_type, e.event_type,
           jsonb_build_object(
               'event_id', e.event_id,
               'event_type', e.event_type,
               'occurred_at', COALESCE(%(now)s::timestamptz, now()),
               'payment_id', w.payment_id,
               'intent', jsonb_build_object(
                   'id', w.id,
                   'action', i.action,
                   'status', w.status,
                   'provider', i.provider,
                   'currency', i.currency,
                   'amount_minor', i.amount_minor,
                   'amount_applied_minor', o.amount_applied_minor,
                   'provider_reference', COALESCE(o.provider_reference, i.provider_reference),
                   'idempotency_key', i.idempotency_key,
                   'attempts', i.attempts,
                   'error_code', o.error_code,
                   'error_message', o.error_message,
                   'metadata', i.metadata),
               'payment', CASE WHEN o.payment_state IS NOT NULL THEN jsonb_build_object(
                                   'state', o.payment_state,
                                   'authorized_minor', o.authorized_minor,
                                   'captured_minor', o.captured_minor,
                                   'refunded_minor', o.refunded_minor,
                                   'provider_reference', COALESCE(o.payment_reference, p.provider_reference))
                               ELSE jsonb_build_object(
                                   'state', p.state,
                                   'authorized_minor', p.authorized_minor,
                                   'captured_minor', p.captured_minor,
                                   'refunded_minor', p.refunded_minor,
                                   'provider_reference', p.provider_reference) END),
           w.payment_id,
           CASE WHEN i.metadata ->> 'traceparent' ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
                THEN i.metadata ->> 'traceparent' END
    FROM written AS w
    JOIN outcome AS o ON o.id = w.id
    JOIN outbox.payment_intents AS i ON i.id = w.id
    JOIN outbox.payments AS p ON p.payment_id = w.payment_id
    CROSS JOIN LATERAL (
        SELECT gen_random_uuid() AS event_id, 'payment.' || i.action || '.' || w.status AS event_type
    ) AS e
    WHERE w.status IN ('succeeded', 'failed', 'dead')
    ORDER BY 'payment:' || w.payment_id
    RETURNING id
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

-- name: archive_terminal_intents
-- Move up to `limit` intents that ended more than `older_than_seconds` ago to the archive.
-- Dead intents stay: an operator still has to work them.
WITH due AS (
    SELECT id
    FROM outbox.payment_intents
    WHERE status IN ('succeeded', 'failed')
      AND completed_at < COALESCE(%(now)s::timestamptz, now()) - make_interval(secs => %(older_than_seconds)s)
    ORDER BY completed_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
moved AS (
    DELETE FROM outbox.payment_intents AS i
    USING due
    WHERE i.id = due.id
    RETURNING i.*
)
INSERT INTO outbox.payment_intents_archive
SELECT * FROM moved
RETURNING id;

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

-- name: claim_events
-- Lease up to `limit` publishable events (heads of their ordering key, or unkeyed); commit before publishing.
WITH picked AS (
    SELECT id
    FROM outbox.events
    WHERE status = 'pending'
      AND available_at <= COALESCE(%(now)s::timestamptz, now())
    ORDER BY available_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox.events AS e
SET available_at = COALESCE(%(now)s::timestamptz, now()) + make_interval(secs => %(lease_seconds)s),
    lease_token = nextval('outbox.lease_token_seq'),
    claimed_by = %(instance)s,
    attempts = e.attempts + 1
FROM picked
WHERE e.id = picked.id
RETURNING e.id, e.event_id, e.lease_token, e.ordering_key, e.seq, e.exchange, e.routing_key,
          e.event_type, e.payload::text AS payload, e.headers, e.payment_id, e.schema_version,
          e.traceparent, e.created_at, e.attempts;

-- name: lock_event_streams
-- Inside the mark transaction: lock the streams of confirmed events, skipping any a writer holds.
SELECT ordering_key
FROM outbox.event_streams
WHERE ordering_key = ANY(%(ordering_keys)s::text[])
ORDER BY ordering_key
FOR UPDATE SKIP LOCKED;

-- name: mark_events
-- Record broker results (published / unroutable), fenced by lease token; promote each key's next event.
WITH result AS (
    SELECT *
    FROM unnest(
        %(ids)s::bigint[], %(lease_tokens)s::bigint[], %(statuses)s::text[],
        %(error_codes)s::text[], %(error_messages)s::text[]
    ) AS r(id, lease_token, status, error_code, error_message)
),
marked AS (
    UPDATE outbox.events AS e
    SET status = r.status,
        published_at = COALESCE(%(now)s::timestamptz, now()),
        available_at = COALESCE(%(now)s::timestamptz, now()),
        lease_token = NULL,
        claimed_by = NULL,
        error_code = r.error_code,
        error_message = r.error_message
    FROM result AS r
    WHERE e.id = r.id AND e.lease_token = r.lease_token AND e.status = 'pending'
    RETURNING e.id, e.ordering_key, e.seq
),
advanced AS (
    -- The caller holds these stream rows (lock_event_streams, same transaction).
    UPDATE outbox.event_streams AS s
    SET done_seq = greatest(s.done_seq, m.seq)
    FROM marked AS m
    WHERE s.ordering_key = m.ordering_key
    RETURNING s.ordering_key
),
promoted AS (
    UPDATE outbox.events AS n
    SET status = 'pending',
        available_at = COALESCE(%(now)s::timestamptz, now())
    FROM marked AS m
    WHERE n.ordering_key = m.ordering_key AND n.seq = m.seq + 1 AND n.status = 'blocked'
    RETURNING n.id
)
SELECT m.id, (SELECT count(*) FROM promoted) AS promoted FROM marked AS m;

-- name: release_events
-- Hand back held events that were not confirmed (nack, lost connection, missing exchange), fenced by token.
UPDATE outbox.events AS e
SET available_at = COALESCE(%(now)s::timestamptz, now()) + make_interval(secs => r.delay),
    lease_token = NULL,
    claimed_by = NULL,
    error_code = r.error_code,
    error_message = r.error_message
FROM unnest(
    %(ids)s::bigint[], %(lease_tokens)s::bigint[], %(delays)s::float8[],
    %(error_codes)s::text[], %(error_messages)s::text[]
) AS r(id, lease_token, delay, error_code, error_message)
WHERE e.id = r.id AND e.lease_token = r.lease_token AND e.status = 'pending'
RETURNING e.id;

-- name: unpublished_events
-- Events not yet published (blocked or pending) and the age of the oldest, for metrics.
SELECT count(*) AS events,
       COALESCE(extract(epoch FROM COALESCE(%(now)s::timestamptz, now()) - min(created_at)), 0)::float8
           AS oldest_seconds
FROM outbox.events
WHERE status IN ('blocked', 'pending');

-- Observability and operator tooling (relay/depth.py, relay/status.py,
-- relay/dead_letters.py, relay/intents_show.py); the functions come from sql/0006.

-- name: queue_depth
-- Unresolved intents by provider and status, and the wait of the oldest due pending one, from payment_intents_depth_idx.
SELECT provider, status, count(*) AS intents,
       COALESCE(extract(epoch FROM COALESCE(%(now)s::timestamptz, now())
                - min(available_at) FILTER (
                      WHERE status = 'pending'
                        AND available_at <= COALESCE(%(now)s::timestamptz, now()))), 0)::float8
           AS oldest_pending_seconds
FROM outbox.payment_intents
WHERE status IN ('blocked', 'pending', 'in_flight', 'dead')
GROUP BY provider, status
ORDER BY provider, status;

-- name: set_operator_actor
-- First statement of every operator transaction: the audit trail records 'operator:<name>'.
SELECT set_config('outbox.actor', 'operator:' || %(operator)s::text, true);

-- name: dead_letters_count
-- How many dead intents match the operator's filters (NULL filter = any).
SELECT count(*)
FROM outbox.payment_intents
WHERE status = 'dead'
  AND (%(provider)s::text IS NULL OR provider = %(provider)s::text)
  AND (%(error_code)s::text IS NULL OR error_code = %(error_code)s::text)
  AND (%(older_than_seconds)s::float8 IS NULL
       OR COALESCE(completed_at, updated_at)
          <= COALESCE(%(now)s::timestamptz, now()) - make_interval(secs => %(older_than_seconds)s::float8));

-- name: dead_letters_list
-- Dead intents matching the filters, longest dead first, for `dead-letters list`.
SELECT i.id, i.payment_id, i.provider, i.action, i.amount_minor, i.currency, c.exponent,
       i.attempts, i.error_code, i.error_message, i.idempotency_key, i.created_at,
       extract(epoch FROM COALESCE(%(now)s::timestamptz, now())
               - COALESCE(i.completed_at, i.updated_at))::float8 AS dead_seconds
FROM outbox.payment_intents AS i
JOIN outbox.currencies AS c ON c.code = i.currency
WHERE i.status = 'dead'
  AND (%(provider)s::text IS NULL OR i.provider = %(provider)s::text)
  AND (%(error_code)s::text IS NULL OR i.error_code = %(error_code)s::text)
  AND (%(older_than_seconds)s::float8 IS NULL
       OR COALESCE(i.completed_at, i.updated_at)
          <= COALESCE(%(now)s::timestamptz, now()) - make_interval(secs => %(older_than_seconds)s::float8))
ORDER BY COALESCE(i.completed_at, i.updated_at), i.id
LIMIT %(limit)s;

-- name: dead_letters_page
-- The next `limit` matching dead intent ids after `after_id` (keyset), for bulk retry/cancel.
SELECT id, created_at
FROM outbox.payment_intents
WHERE status = 'dead'
  AND id > %(after_id)s
  AND (%(provider)s::text IS NULL OR provider = %(provider)s::text)
  AND (%(error_code)s::text IS NULL OR error_code = %(error_code)s::text)
  AND (%(older_than_seconds)s::float8 IS NULL
       OR COALESCE(completed_at, updated_at)
          <= COALESCE(%(now)s::timestamptz, now()) - make_interval(secs => %(older_than_seconds)s::float8))
ORDER BY id
LIMIT %(limit)s;

-- name: dead_letters_by_id
-- The named intents' status and age, to report ids that are not dead before acting.
SELECT id, status, created_at
FROM outbox.payment_intents
WHERE id = ANY(%(ids)s::bigint[])
ORDER BY id;

-- name: retry_dead_intents
-- Re-drive dead intents under their own keys (sql/0006: outbox.retry_dead_intents).
SELECT intent_id, payment_id, status
FROM outbox.retry_dead_intents(%(ids)s::bigint[], %(operator)s::text);

-- name: cancel_dead_intents
-- End dead intents as failed 'cancelled_by_operator' and promote each payment's next intent.
SELECT intent_id, payment_id, status, promoted_intent_id
FROM outbox.cancel_dead_intents(%(ids)s::bigint[], %(operator)s::text, %(reason)s::text);

-- name: intent_detail
-- One intent for `intents show`, from the hot table or the archive.
SELECT id, payment_id, payment_seq, action, provider, amount_minor, currency, payment_method,
       idempotency_key, metadata, status, attempts, available_at, lease_expires_at, claimed_by,
       amount_applied_minor, provider_reference, error_code, error_message, created_at,
       updated_at, completed_at, archived
FROM (
    SELECT id, payment_id, payment_seq, action, provider, amount_minor, currency, payment_method,
           idempotency_key, metadata, status, attempts, available_at, lease_expires_at,
           claimed_by, amount_applied_minor, provider_reference, error_code, error_message,
           created_at, updated_at, completed_at, false AS archived
    FROM outbox.payment_intents WHERE id = %(id)s
    UNION ALL
    SELECT id, payment_id, payment_seq, action, provider, amount_minor, currency, payment_method,
           idempotency_key, metadata, status, attempts, available_at, lease_expires_at,
           claimed_by, amount_applied_minor, provider_reference, error_code, error_message,
           created_at, updated_at, completed_at, true AS archived
    FROM outbox.payment_intents_archive WHERE id = %(id)s
) AS found
LIMIT 1;

-- name: intent_payment
-- The payment an intent belongs to, with its currency's exponent.
SELECT p.payment_id, p.provider, p.currency, c.exponent, p.state, p.authorized_minor,
       p.captured_minor, p.refunded_minor, p.provider_reference, p.created_at, p.updated_at
FROM outbox.payments AS p
JOIN outbox.currencies AS c ON c.code = p.currency
WHERE p.payment_id = %(payment_id)s;

-- name: payment_intents_in_order
-- Every intent of one payment (hot and archived), in dispatch order.
SELECT id, payment_seq, action, status, amount_minor, attempts, error_code, created_at
FROM (
    SELECT id, payment_seq, action, status, amount_minor, attempts, error_code, created_at
    FROM outbox.payment_intents WHERE payment_id = %(payment_id)s
    UNION ALL
    SELECT id, payment_seq, action, status, amount_minor, attempts, error_code, created_at
    FROM outbox.payment_intents_archive WHERE payment_id = %(payment_id)s
) AS all_intents
ORDER BY payment_seq, id;

-- name: audit_trail_present
-- Whether sql/0005's audit trail is installed.
SELECT to_regclass('outbox.audit_log') IS NOT NULL;

-- name: intent_history
-- The intent's audit trail rows, oldest first (sql/0006: outbox.intent_history).
SELECT at, actor, operation, before, after
FROM outbox.intent_history(%(id)s::bigint);
