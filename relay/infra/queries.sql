-- Every statement the relay runs, one `-- name: X` block each, with a one-line purpose.
-- Loaded once by relay/infra/queries.py; tests PREPARE each one against the migrated schema.
-- `now` is an optional parameter (NULL = the server's clock) so tests own time.

-- name: claim_intents
-- Lease up to `limit` eligible intents of one provider; commit before any provider call.
-- The audit trail records the claim as 'relay:<instance>' (outbox.actor, set for this statement).
-- NOTE: an intent already sent longer ago than its provider's idempotency-key lifetime is
-- parked `dead` by a trigger instead of claimed (sql/0005); the final SELECT leaves it out.
-- `exponent` (ISO 4217, outbox.currencies) lets an adapter convert to its provider's units.
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
    FROM outbox.payments AS p, actor
    -- An array, not a join with `picked`: the generic plan of a join (psycopg prepares a
    -- statement after 5 runs; LIMIT is a parameter, estimated at hundreds of rows) hashed
    -- every intent of the table; = ANY probes the primary key per claimed id.
    WHERE i.id = ANY (ARRAY(SELECT picked.id FROM picked)) AND p.payment_id = i.payment_id
    RETURNING i.id, i.payment_id, i.action, i.provider, i.amount_minor, i.currency,
              i.payment_method, i.idempotency_key, i.attempts, i.lease_token,
              i.metadata ->> 'traceparent' AS traceparent,
              p.state AS payment_state, p.authorized_minor, p.captured_minor, p.refunded_minor,
              p.provider_reference AS payment_reference, p.disputed_minor, p.dispute_status,
              p.awaiting_action, i.status
)
SELECT id, payment_id, action, provider, amount_minor, currency, payment_method,
       idempotency_key, attempts, lease_token, traceparent, payment_state, authorized_minor,
       captured_minor, refunded_minor, payment_reference, disputed_minor, dispute_status,
       awaiting_action, c.exponent
FROM claimed
LEFT JOIN outbox.currencies AS c ON c.code = claimed.currency
WHERE claimed.status = 'in_flight';

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
        %(refunded)s::bigint[], %(payment_references)s::text[], %(unsent)s::boolean[]
    ) AS o(id, lease_token, status, retry_delay, provider_reference, amount_applied_minor,
           error_code, error_message, payment_state, authorized_minor, captured_minor,
           refunded_minor, payment_reference, unsent)
),
written AS (
    UPDATE outbox.payment_intents AS i
    -- `blocked` (sql/0038): parked at dispatch while an earlier intent of the payment awaits
    -- its provider's confirmation; pending instead when that confirmation committed since
    -- the claim (the payment is locked by lock_payments, so this sees it). The attempt was
    -- never sent: it does not count.
    SET status = CASE WHEN o.status = 'blocked'
                           AND NOT EXISTS (SELECT 1 FROM outbox.payments AS ap
                                           WHERE ap.payment_id = i.payment_id
                                             AND ap.awaiting_action IS NOT NULL)
                      THEN 'pending' ELSE o.status END,
        attempts = CASE WHEN o.status = 'blocked' THEN greatest(i.attempts - 1, 0)
                        ELSE i.attempts END,
        -- sql/0064: an attempt that provably sent nothing (a connect failure); while every
        -- attempt is one, a routed first intent may still fail over.
        unsent_attempts = i.unsent_attempts + CASE WHEN o.unsent THEN 1 ELSE 0 END,
        available_at = CASE WHEN o.status IN ('pending', 'blocked')
                            THEN COALESCE(%(now)s::timestamptz, now()) + make_interval(secs => o.retry_delay)
                            ELSE i.available_at END,
        lease_token = NULL,
        lease_expires_at = NULL,
        claimed_by = NULL,
        provider_reference = COALESCE(o.provider_reference, i.provider_reference),
        -- awaiting_confirmation: the amount requested goes to the payment's awaiting_minor;
        -- nothing is applied until the provider confirms it.
        amount_applied_minor = CASE WHEN o.status = 'awaiting_confirmation' THEN NULL
                                    ELSE o.amount_applied_minor END,
        error_code = o.error_code,
        error_message = o.error_message,
        completed_at = CASE WHEN o.status IN ('succeeded', 'failed', 'dead')
                            THEN COALESCE(%(now)s::timestamptz, now()) END,
        updated_at = COALESCE(%(now)s::timestamptz, now())
    FROM outcome AS o
    WHERE i.id = o.id AND i.lease_token = o.lease_token AND i.status = 'in_flight'
    -- The token too: a batch may hold a stale outcome of the same intent (its lease
    -- expired and it was claimed again while the first outcome waited for the database);
    -- only the outcome whose fence held may update the payment or emit an event.
    RETURNING i.id, i.payment_id, i.status, o.lease_token, i.action
),
paid AS (
    -- The confirmed amounts from the outcome; what was requested and awaits the provider's
    -- confirmation (sql/0038) beside them, cleared by the terminal outcome that follows it.
    UPDATE outbox.payments AS p
    SET state = COALESCE(o.payment_state, p.state),
        authorized_minor = COALESCE(o.authorized_minor, p.authorized_minor),
        captured_minor = COALESCE(o.captured_minor, p.captured_minor),
        refunded_minor = COALESCE(o.refunded_minor, p.refunded_minor),
        -- an authorisation awaiting confirmation: the provider knows the payment by the
        -- reference it answered with, and so does its confirmation
        provider_reference = COALESCE(o.payment_reference,
                                      CASE WHEN w.status = 'awaiting_confirmation'
                                                AND w.action IN ('authorize', 'charge')
                                           THEN o.provider_reference END,
                                      p.provider_reference),
        awaiting_action = CASE WHEN w.status = 'awaiting_confirmation' THEN w.action END,
        awaiting_minor = CASE WHEN w.status = 'awaiting_confirmation'
                              THEN COALESCE(o.amount_applied_minor, 0) ELSE 0 END,
        updated_at = COALESCE(%(now)s::timestamptz, now())
    FROM outcome AS o JOIN written AS w ON w.id = o.id AND w.lease_token = o.lease_token
    WHERE p.payment_id = w.payment_id
      AND (o.payment_state IS NOT NULL OR w.status = 'awaiting_confirmation'
           OR (p.awaiting_action IS NOT NULL AND w.status IN ('succeeded', 'failed', 'dead')))
    RETURNING p.payment_id
),
promoted AS (
    -- sql/0016's rule, once per batch. Its argument reads `written` to the end first, so the
    -- function's UPDATE (a new snapshot, VOLATILE) sees these intents already finished.
    SELECT n.intent_id
    FROM outbox.promote_next_blocked_v1(
        ARRAY(SELECT w.payment_id FROM written AS w WHERE w.status IN ('succeeded', 'failed')),
        %(now)s::timestamptz) AS n
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
           CASE WHEN outbox.is_valid_traceparent(i.metadata ->> 'traceparent')
                THEN i.metadata ->> 'traceparent' END
    FROM written AS w
    JOIN outcome AS o ON o.id = w.id AND o.lease_token = w.lease_token
    JOIN outbox.payment_intents AS i ON i.id = w.id
    JOIN outbox.payments AS p ON p.payment_id = w.payment_id
    CROSS JOIN LATERAL (
        -- sql/0019: an event id with no 13-digit run, which the card rule would call a card
        SELECT outbox.new_event_id() AS event_id, 'payment.' || i.action || '.' || w.status AS event_type
    ) AS e
    WHERE w.status IN ('succeeded', 'failed', 'dead')
    ORDER BY 'payment:' || w.payment_id
    RETURNING id
)
SELECT w.id, (SELECT count(*) FROM promoted) AS promoted, w.lease_token FROM written AS w;

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

-- name: lock_orphaned_blocked_payments
-- Lock (skipping busy ones) payments whose first unresolved intent is blocked: nothing will promote it.
-- An application inserting under REPEATABLE READ or SERIALIZABLE decides `blocked` from its
-- snapshot, so an intent resolved after that snapshot still blocks the new one. Found via
-- payment_intents_depth_idx (blocked rows of these providers) and, per row, one probe of
-- payment_intents_unresolved_by_payment_idx. SKIP LOCKED: a write-back or insert in
-- progress owns that payment now; the next sweep looks again.
SELECT p.payment_id
FROM outbox.payments AS p
WHERE p.payment_id IN (
    SELECT b.payment_id
    FROM outbox.payment_intents AS b
    WHERE b.provider = ANY(%(providers)s::text[])
      AND b.status = 'blocked'
      AND NOT EXISTS (
          SELECT 1
          FROM outbox.payment_intents AS e
          WHERE e.payment_id = b.payment_id
            AND e.payment_seq < b.payment_seq
            AND e.status IN ('blocked', 'pending', 'in_flight', 'dead'))
    LIMIT %(limit)s)
  -- a payment awaiting a confirmation keeps its later intents parked (sql/0038): its
  -- confirmation's write-back promotes them
  AND p.awaiting_action IS NULL
ORDER BY p.payment_id
FOR UPDATE OF p SKIP LOCKED;

-- name: promote_orphaned_blocked
-- Under the payments' locks (lock_orphaned_blocked_payments), promote each payment's first unresolved intent if it is blocked.
-- A new statement, so its snapshot sees every write-back and insert that committed before
-- the locks were granted: the same rule (sql/0016), under the same lock, as complete_intents.
SELECT intent_id AS id, payment_id, provider
FROM outbox.promote_next_blocked_v1(%(payment_ids)s::text[], %(now)s::timestamptz);

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

-- name: fail_over_claimed
-- Fail over (sql/0064) a claimed first intent whose attempt could not connect, fenced by its lease token.
-- No row: it does not qualify (named provider, an earlier attempt that may have been sent, no
-- usable target left), and the caller writes the attempt's outcome back as usual.
SELECT intent_id, payment_id, from_provider, to_provider, idempotency_key
FROM outbox.fail_over_intent_v1(%(id)s, %(lease_token)s, %(why)s);

-- name: fail_over_pending
-- Fail over (sql/0064) up to `limit` pending first intents of routed payments that never reached `provider` (its breaker is open).
SELECT intent_id, payment_id, from_provider, to_provider, idempotency_key
FROM outbox.fail_over_pending_v1(%(provider)s, %(limit)s, %(why)s);

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

-- name: want_wakeups
-- This relay is going idle: record its wish (sql/0031) and ask inserts to NOTIFY. The flag row
-- is updated even when already true: the update waits for a skip_wakeups holding that row's
-- lock and then sets the flag over whatever it decided, so no skip can undo this wish.
WITH wish AS (
    INSERT INTO outbox.relay_wakeup_wants (instance) VALUES (%(instance)s::text)
    ON CONFLICT (instance) DO NOTHING
)
UPDATE outbox.relay_wakeup
SET wanted = true, updated_at = CASE WHEN wanted THEN updated_at ELSE now() END
RETURNING wanted;

-- name: lock_wakeup_flag
-- skip_wakeups' first statement, in its transaction: wait for any wish being recorded, so the
-- next statement's snapshot sees it (sql/0031).
SELECT wanted FROM outbox.relay_wakeup FOR UPDATE;

-- name: skip_wakeups
-- This relay is saturated and comes back on its own: withdraw its wish and the wishes of gone
-- relays; inserts stop notifying only when no other live relay waits (sql/0031). A relay is
-- gone by the rule of the statement relay_instances; one that reports no heartbeat counts.
WITH gone AS (
    SELECT w.instance
    FROM outbox.relay_wakeup_wants AS w
    JOIN outbox.relay_instances AS r USING (instance)
    WHERE r.heartbeat_at < now() - make_interval(secs => greatest(3 * r.heartbeat_interval_seconds, 30))
),
withdrawn AS (
    DELETE FROM outbox.relay_wakeup_wants AS w
    WHERE w.instance = %(instance)s::text OR w.instance IN (SELECT instance FROM gone)
)
UPDATE outbox.relay_wakeup SET wanted = false, updated_at = now()
WHERE wanted
  AND NOT EXISTS (
      SELECT 1 FROM outbox.relay_wakeup_wants AS w
      WHERE w.instance <> %(instance)s::text
        AND w.instance NOT IN (SELECT instance FROM gone)
  )
RETURNING wanted;

-- name: want_event_wakeups
-- This publisher is going idle: ask event inserts to NOTIFY (sql/0021; no write when already asked).
UPDATE outbox.events_wakeup SET wanted = true, updated_at = now() WHERE NOT wanted RETURNING wanted;

-- name: skip_event_wakeups
-- This publisher claimed a full batch and comes back on its own: event inserts need not NOTIFY.
UPDATE outbox.events_wakeup SET wanted = false, updated_at = now() WHERE wanted RETURNING wanted;

-- name: status_counts
-- Queue depth by provider and status, for `outbox-relay status` and the demo.
SELECT provider, status, count(*) AS intents,
       min(created_at) FILTER (WHERE status = 'pending') AS oldest_pending
FROM outbox.payment_intents
GROUP BY provider, status
ORDER BY provider, status;

-- name: schema_version
-- The latest applied migration, for readiness and `status`.
SELECT max(version) AS version FROM outbox.schema_migrations;

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

-- Observability and operator tooling (relay/service/depth.py, relay/operations/status.py,
-- relay/operations/dead_letters.py, relay/operations/intents.py); the functions come from sql/0006.

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
SELECT id
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
-- The named intents' status, to report ids that are missing or not dead before acting.
SELECT id, status
FROM outbox.payment_intents
WHERE id = ANY(%(ids)s::bigint[])
ORDER BY id;

-- name: retry_dead_intents
-- Re-drive dead intents under their own keys; keys past their lifetime stay dead unless allowed (sql/0006).
SELECT intent_id, payment_id, status, note
FROM outbox.retry_dead_intents(%(ids)s::bigint[], %(operator)s::text, %(past_key_lifetime)s::boolean);

-- name: cancel_dead_intents
-- End dead intents as failed 'cancelled_by_operator' and promote each payment's next intent.
SELECT intent_id, payment_id, status, promoted_intent_id
FROM outbox.cancel_dead_intents(%(ids)s::bigint[], %(operator)s::text, %(reason)s::text);

-- name: intent_detail
-- One intent for `intents show`, from the hot table or the archive.
SELECT id, payment_id, payment_seq, action, provider, amount_minor, currency, payment_method,
       idempotency_key, metadata, status, attempts, available_at, lease_expires_at, claimed_by,
       amount_applied_minor, provider_reference, error_code, error_message, created_at,
       updated_at, completed_at, archived, original_amount_minor, original_currency,
       (SELECT c.exponent FROM outbox.currencies AS c WHERE c.code = original_currency)
           AS original_exponent,
       fx_rate_id, fx_via_rate_id,
       (SELECT jsonb_build_object('base', r.base, 'quote', r.quote, 'rate', r.rate::text,
                                  'source_kind', r.source_kind, 'source_name', r.source_name,
                                  'published_at', r.published_at)
        FROM outbox.fx_rates AS r WHERE r.id = fx_rate_id) AS fx_rate,
       (SELECT jsonb_build_object('base', r.base, 'quote', r.quote, 'rate', r.rate::text,
                                  'source_kind', r.source_kind, 'source_name', r.source_name,
                                  'published_at', r.published_at)
        FROM outbox.fx_rates AS r WHERE r.id = fx_via_rate_id) AS fx_via_rate
FROM (
    SELECT id, payment_id, payment_seq, action, provider, amount_minor, currency, payment_method,
           idempotency_key, metadata, status, attempts, available_at, lease_expires_at,
           claimed_by, amount_applied_minor, provider_reference, error_code, error_message,
           created_at, updated_at, completed_at, false AS archived, original_amount_minor,
           original_currency, fx_rate_id, fx_via_rate_id
    FROM outbox.payment_intents WHERE id = %(id)s
    UNION ALL
    SELECT id, payment_id, payment_seq, action, provider, amount_minor, currency, payment_method,
           idempotency_key, metadata, status, attempts, available_at, lease_expires_at,
           claimed_by, amount_applied_minor, provider_reference, error_code, error_message,
           created_at, updated_at, completed_at, true AS archived, original_amount_minor,
           original_currency, fx_rate_id, fx_via_rate_id
    FROM outbox.payment_intents_archive WHERE id = %(id)s
) AS found
LIMIT 1;

-- name: intent_payment
-- The payment an intent belongs to, with its currency's exponent.
SELECT p.payment_id, p.provider, p.currency, c.exponent, p.state, p.authorized_minor,
       p.captured_minor, p.refunded_minor, p.disputed_minor, p.dispute_status,
       p.dispute_reference, p.provider_reference, p.created_at, p.updated_at
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
SELECT at, actor, operation, reason, before, after
FROM outbox.intent_history(%(id)s::bigint);

-- name: reconciliation_open
-- Open reconciliation exceptions and their absolute deltas by provider and currency (sql/0005's view), for the gauges.
SELECT provider, currency, sum(exceptions)::bigint AS exceptions, sum(delta_minor)::bigint AS delta_minor
FROM outbox.reconciliation_open_delta
GROUP BY provider, currency
ORDER BY provider, currency;

-- name: relay_heartbeat
-- This relay is alive and serves `providers` (sql/0018) with their pinned API versions (sql/0045):
-- upsert its row, prune rows unseen for a day.
-- Pruning skips rows another relay is pruning (SKIP LOCKED): two relays never wait on each other.
WITH stale AS (
    SELECT instance
    FROM outbox.relay_instances
    WHERE heartbeat_at < COALESCE(%(now)s::timestamptz, now()) - interval '1 day'
      AND instance <> %(instance)s::text
    FOR UPDATE SKIP LOCKED
),
pruned AS (
    DELETE FROM outbox.relay_instances AS r USING stale WHERE r.instance = stale.instance
)
INSERT INTO outbox.relay_instances AS r
    (instance, providers, heartbeat_interval_seconds, started_at, heartbeat_at, api_versions)
VALUES (%(instance)s::text, %(providers)s::text[], %(interval_seconds)s::float8,
        COALESCE(%(now)s::timestamptz, now()), COALESCE(%(now)s::timestamptz, now()),
        %(api_versions)s::jsonb)
ON CONFLICT (instance) DO UPDATE
SET providers = EXCLUDED.providers,
    heartbeat_interval_seconds = EXCLUDED.heartbeat_interval_seconds,
    heartbeat_at = EXCLUDED.heartbeat_at,
    api_versions = EXCLUDED.api_versions
RETURNING r.instance;

-- name: provider_key_lifetimes
-- How long after creation each of these providers' intents may be sent again (sql/0005's guard), checked at start.
SELECT p.provider,
       extract(epoch FROM outbox.idempotency_key_lifetime(p.provider))::float8 AS lifetime_seconds
FROM unnest(%(providers)s::text[]) AS p(provider)
ORDER BY p.provider;

-- name: relay_withdraw
-- This relay stops cleanly (sql/0018): delete its row, so its providers show unserved at once.
DELETE FROM outbox.relay_instances WHERE instance = %(instance)s::text
RETURNING instance;

-- name: relay_instances
-- Every reported relay, live first: live while its heartbeat is within max(3 of its intervals, 30 s).
-- The one place of that rule; relay/domain/serving.py reads it for the unserved gauge and `status`.
SELECT instance, providers, heartbeat_at,
       extract(epoch FROM COALESCE(%(now)s::timestamptz, now()) - heartbeat_at)::float8
           AS heartbeat_age_seconds,
       heartbeat_at >= COALESCE(%(now)s::timestamptz, now())
           - make_interval(secs => greatest(3 * heartbeat_interval_seconds, 30)) AS live,
       api_versions
FROM outbox.relay_instances
ORDER BY live DESC, instance;

-- ------------------------------------------------------------------------------------------
-- Audit trail and ledger checks (sql/0005; relay/finance/audit.py, relay/finance/ledger.py)
-- ------------------------------------------------------------------------------------------

-- name: audit_rows_by_chain
-- Every audit row, chain by chain in chain order, jsonb as the text that was hashed.
SELECT id, at, actor, entity, entity_id, payment_id, operation, reason,
       before::text, after::text, chain_seq, prev_hash, hash
FROM outbox.audit_log
ORDER BY entity, entity_id, chain_seq;

-- name: audit_live_documents
-- The audited columns of every live row of every audited table, redacted as the trail stores them.
-- The colder tables' allow-lists are their audit triggers' (sql/0005, sql/0014): keep them equal.
-- An intent's and its new payment's creation rows are written by the first relay transaction
-- that touches the intent (sql/0019): `created_at` says when the row was inserted,
-- `untouched` whether no UPDATE can have reached it yet (an intent still as inserted; a
-- payment still new whose intents all are), `young` whether it was inserted less than
-- `creation_grace_seconds` ago by the server's clock.
SELECT 'intent', i.id::text, outbox.audit_intent_doc(i), i.created_at,
       i.status IN ('pending', 'blocked') AND i.attempts = 0 AS untouched,
       i.created_at > now() - make_interval(secs => %(creation_grace_seconds)s) AS young
FROM outbox.payment_intents AS i
UNION ALL
SELECT 'intent', a.id::text,
       outbox.audit_intent_doc(ROW(a.*)::outbox.payment_intents), a.created_at, false, false
FROM outbox.payment_intents_archive AS a
UNION ALL
SELECT 'payment', p.payment_id, outbox.audit_payment_doc(p), p.created_at,
       p.state = 'new' AND NOT EXISTS (
           SELECT 1 FROM outbox.payment_intents AS i
           WHERE i.payment_id = p.payment_id
             AND (i.status NOT IN ('pending', 'blocked') OR i.attempts > 0)),
       p.created_at > now() - make_interval(secs => %(creation_grace_seconds)s)
FROM outbox.payments AS p
UNION ALL
SELECT 'janitor_check', j.intent_id::text, outbox.audit_generic_doc(j,
       'intent_id,payment_id,provider,checks,not_found,result,detail,settled_at'), NULL, false, false
FROM outbox.janitor_checks AS j
UNION ALL
SELECT 'reconciliation_run', r.id::text, outbox.audit_generic_doc(r,
       'id,provider,window_start,window_end,status,run_by,provider_items,internal_items,matched,'
       'exceptions_found,exceptions_new,exceptions_cleared'), NULL, false, false
FROM outbox.reconciliation_runs AS r
UNION ALL
SELECT 'reconciliation_exception', x.id::text, outbox.audit_generic_doc(x,
       'id,provider,kind,match_key,payment_id,ledger_transaction_id,provider_transaction_id,'
       'currency,internal_amount_minor,provider_amount_minor,fee_minor,expected_fee_minor,'
       'delta_minor,detail,status,last_run_id,times_seen,resolution,resolution_reason,resolved_by'),
       NULL, false, false
FROM outbox.reconciliation_exceptions AS x
UNION ALL
SELECT 'reconciliation_action', a.id::text, outbox.audit_generic_doc(a,
       'id,exception_id,payment_id,action,amount_minor,reason,requested_by,approved_by,status,'
       'intent_id,requested_login,approved_login'), NULL, false, false
FROM outbox.reconciliation_actions AS a
UNION ALL
SELECT 'fx_rate', r.id::text, outbox.audit_fx_rate_doc(r), NULL, false, false
FROM outbox.fx_rates AS r
UNION ALL
SELECT 'fx_posting', p.id::text, outbox.audit_generic_doc(p,
       'id,kind,payment_id,intent_id,provider,provider_reference,source_currency,'
       'source_amount_minor,currency,expected_minor,actual_minor,difference_minor,our_rate_id,'
       'our_via_rate_id,compared_rate_id,compared_via_rate_id,provider_rate,posted_at,posted_by'),
       NULL, false, false
FROM outbox.fx_postings AS p
UNION ALL
SELECT 'provider', v.name, outbox.audit_generic_doc(v,
       'name,kind,enabled,currencies,amount_limits,note,api_version'), NULL, false, false
FROM outbox.providers AS v
UNION ALL
SELECT 'routing_rule', r.name, outbox.audit_generic_doc(r,
       'id,name,version,priority,enabled,currencies,min_amount_minor,max_amount_minor,'
       'payment_method_prefixes,metadata_key,metadata_values,mode,providers,weights,note'),
       NULL, false, false
FROM outbox.routing_rules AS r
UNION ALL
SELECT 'flow', f.id::text, outbox.flow_audit_doc(f.id), NULL, false, false
FROM outbox.flows AS f
UNION ALL
SELECT 'authorization_policy', a.provider, outbox.audit_generic_doc(a,
       'provider,action,after_seconds,reason,updated_by'), NULL, false, false
FROM outbox.authorization_policies AS a;

-- name: ledger_counts
-- Ledger transactions, entries and payments, for the check's headline.
SELECT (SELECT count(*) FROM outbox.ledger_transactions),
       (SELECT count(*) FROM outbox.ledger_entries),
       (SELECT count(*) FROM outbox.payments);

-- name: ledger_unbalanced
-- Ledger transactions that do not sum to zero per currency, have no entries, or mix currencies.
SELECT t.id, t.payment_id, t.kind, COALESCE(e.currency, t.currency) AS currency, t.currency,
       COALESCE(sum(e.amount_minor), 0)::bigint AS imbalance, count(e.id) AS entries
FROM outbox.ledger_transactions AS t
LEFT JOIN outbox.ledger_entries AS e ON e.transaction_id = t.id
GROUP BY t.id, t.payment_id, t.kind, COALESCE(e.currency, t.currency), t.currency
HAVING COALESCE(sum(e.amount_minor), 0) <> 0 OR count(e.id) = 0
    OR COALESCE(e.currency, t.currency) <> t.currency
ORDER BY t.id;

-- name: ledger_orphan_entries
-- Ledger entries whose transaction does not exist (sql/0022: no foreign key; append-only and one writer keep it so).
SELECT e.transaction_id, count(*) AS entries
FROM outbox.ledger_entries AS e
WHERE NOT EXISTS (SELECT 1 FROM outbox.ledger_transactions AS t WHERE t.id = e.transaction_id)
GROUP BY e.transaction_id
ORDER BY e.transaction_id;

-- name: ledger_posting_mismatches
-- Succeeded intents without exactly one posting of their action, and postings without a succeeded intent.
WITH intents AS (
    SELECT id, payment_id, action, status FROM outbox.payment_intents
    UNION ALL
    SELECT id, payment_id, action, status FROM outbox.payment_intents_archive
),
postings AS (
    SELECT t.*, count(*) OVER (PARTITION BY t.intent_id) AS postings
    FROM outbox.ledger_transactions AS t
    -- a change a notification reported (sql/0023) has no intent to match
    WHERE t.intent_id IS NOT NULL
)
SELECT i.id, COALESCE(i.payment_id, t.payment_id), i.action, i.status, t.id, t.kind,
       COALESCE(t.postings, 0)
FROM intents AS i
FULL JOIN postings AS t ON t.intent_id = i.id
WHERE (i.status = 'succeeded' AND t.id IS NULL)
   OR (t.id IS NOT NULL AND (i.id IS NULL OR i.status <> 'succeeded'
                             OR t.kind <> i.action OR t.postings > 1))
ORDER BY COALESCE(i.id, t.intent_id), t.id;

-- name: ledger_payment_mismatches
-- Payments whose amounts differ from their ledger: authorised, open hold, captured, refunded, disputed, receivable.
WITH postings AS (
    SELECT payment_id,
           sum(amount_minor) FILTER (WHERE kind IN ('authorize', 'charge'))::bigint AS authorized,
           count(*) FILTER (WHERE currency <> (SELECT p.currency FROM outbox.payments AS p
                                               WHERE p.payment_id = t.payment_id)) AS wrong_currency
    FROM outbox.ledger_transactions AS t
    GROUP BY payment_id
),
balances AS (
    SELECT t.payment_id,
           sum(e.amount_minor) FILTER (WHERE e.account = t.provider || ':holds')::bigint AS holds,
           (-sum(e.amount_minor) FILTER (WHERE e.account = t.provider || ':captured'))::bigint AS captured,
           sum(e.amount_minor) FILTER (WHERE e.account = t.provider || ':refunded')::bigint AS refunded,
           sum(e.amount_minor) FILTER (WHERE e.account = t.provider || ':receivable')::bigint AS receivable,
           sum(e.amount_minor) FILTER (WHERE e.account = t.provider || ':disputed')::bigint AS disputed
    FROM outbox.ledger_transactions AS t
    JOIN outbox.ledger_entries AS e ON e.transaction_id = t.id
    GROUP BY t.payment_id
),
compared AS (
    SELECT p.payment_id, p.currency, p.state, COALESCE(po.wrong_currency, 0) AS wrong_currency,
           p.authorized_minor, COALESCE(po.authorized, 0) AS ledger_authorized,
           CASE WHEN p.state = 'authorized' THEN p.authorized_minor ELSE 0 END AS open_hold,
           COALESCE(b.holds, 0) AS ledger_holds,
           p.captured_minor, COALESCE(b.captured, 0) AS ledger_captured,
           p.refunded_minor, COALESCE(b.refunded, 0) AS ledger_refunded,
           p.disputed_minor, COALESCE(b.disputed, 0) AS ledger_disputed,
           p.captured_minor - p.refunded_minor - p.disputed_minor AS receivable,
           COALESCE(b.receivable, 0) AS ledger_receivable
    FROM outbox.payments AS p
    LEFT JOIN postings AS po ON po.payment_id = p.payment_id
    LEFT JOIN balances AS b ON b.payment_id = p.payment_id
)
SELECT * FROM compared
WHERE wrong_currency > 0
   OR (authorized_minor, open_hold, captured_minor, refunded_minor, disputed_minor, receivable)
      IS DISTINCT FROM
      (ledger_authorized, ledger_holds, ledger_captured, ledger_refunded, ledger_disputed,
       ledger_receivable)
ORDER BY payment_id;

-- name: ledger_account_balances
-- Debits, credits and transactions per account and currency.
SELECT account, currency,
       COALESCE(sum(amount_minor) FILTER (WHERE amount_minor > 0), 0)::bigint AS debits,
       COALESCE(-sum(amount_minor) FILTER (WHERE amount_minor < 0), 0)::bigint AS credits,
       count(DISTINCT transaction_id) AS transactions
FROM outbox.ledger_entries
GROUP BY account, currency
ORDER BY account, currency;

-- name: ledger_payment_totals
-- The payments' amounts summed per provider and currency, beside which the ledger's totals are shown.
SELECT provider, currency, sum(authorized_minor)::bigint AS authorized,
       sum(captured_minor)::bigint AS captured, sum(refunded_minor)::bigint AS refunded,
       sum(disputed_minor)::bigint AS disputed,
       sum(CASE WHEN state = 'authorized' THEN authorized_minor ELSE 0 END)::bigint AS open_holds
FROM outbox.payments
GROUP BY provider, currency
ORDER BY provider, currency;

-- name: ledger_authorized_totals
-- Authorised amounts posted (authorize and charge transactions) per provider and currency.
SELECT provider, currency, sum(amount_minor)::bigint AS authorized
FROM outbox.ledger_transactions
WHERE kind IN ('authorize', 'charge')
GROUP BY provider, currency;

-- name: janitor_reserve
-- Reserve up to `limit` dead intents due for a lookup (newly dead, or a re-check due), with their payments
-- and their currency's ISO 4217 exponent.
WITH due AS (
    SELECT i.id, i.payment_id, i.provider, i.completed_at
    FROM outbox.payment_intents AS i
    LEFT JOIN outbox.janitor_checks AS j ON j.intent_id = i.id
    WHERE i.status = 'dead'
      AND i.provider = ANY(%(providers)s::text[])
      AND (j.intent_id IS NULL
           OR j.dead_at IS DISTINCT FROM i.completed_at
           OR (j.settled_at IS NULL AND j.next_check_at <= COALESCE(%(now)s::timestamptz, now())))
    ORDER BY i.id
    LIMIT %(limit)s
    FOR UPDATE OF i SKIP LOCKED
),
reserved AS (
    INSERT INTO outbox.janitor_checks AS j (intent_id, payment_id, provider, dead_at, next_check_at)
    SELECT id, payment_id, provider, completed_at,
           COALESCE(%(now)s::timestamptz, now()) + make_interval(secs => %(reservation_seconds)s::float8)
    FROM due
    ON CONFLICT (intent_id) DO UPDATE
    SET next_check_at = EXCLUDED.next_check_at,
        -- a new death (the intent was re-driven and died again) starts a new cycle
        checks = CASE WHEN j.dead_at IS DISTINCT FROM EXCLUDED.dead_at THEN 0 ELSE j.checks END,
        not_found = CASE WHEN j.dead_at IS DISTINCT FROM EXCLUDED.dead_at THEN 0 ELSE j.not_found END,
        result = CASE WHEN j.dead_at IS DISTINCT FROM EXCLUDED.dead_at THEN NULL ELSE j.result END,
        settled_at = CASE WHEN j.dead_at IS DISTINCT FROM EXCLUDED.dead_at THEN NULL ELSE j.settled_at END,
        dead_at = EXCLUDED.dead_at
    RETURNING j.intent_id, j.checks, j.not_found
)
SELECT i.id, i.payment_id, i.action, i.provider, i.amount_minor, i.currency, i.payment_method,
       i.idempotency_key, i.attempts, i.completed_at AS dead_at, i.error_code,
       p.state AS payment_state, p.authorized_minor, p.captured_minor, p.refunded_minor,
       p.provider_reference AS payment_reference,
       r.checks, r.not_found,
       (SELECT c.exponent FROM outbox.currencies AS c WHERE c.code = i.currency) AS exponent
FROM reserved AS r
JOIN outbox.payment_intents AS i ON i.id = r.intent_id
JOIN outbox.payments AS p ON p.payment_id = i.payment_id
ORDER BY i.id;

-- name: janitor_take
-- Take one dead intent back under a janitor lease to write its settled outcome; no row if it changed meanwhile.
WITH taken AS (
    UPDATE outbox.payment_intents AS i
    SET status = 'in_flight',
        lease_token = nextval('outbox.lease_token_seq'),
        lease_expires_at = now() + make_interval(secs => %(lease_seconds)s::float8),
        claimed_by = %(instance)s::text,
        updated_at = now()
    WHERE i.id = %(id)s::bigint AND i.status = 'dead'
      AND i.completed_at IS NOT DISTINCT FROM %(dead_at)s::timestamptz
    RETURNING i.lease_token, i.payment_id
)
SELECT t.lease_token, p.state AS payment_state, p.authorized_minor, p.captured_minor,
       p.refunded_minor, p.provider_reference AS payment_reference
FROM taken AS t
JOIN outbox.payments AS p ON p.payment_id = t.payment_id;

-- name: janitor_record
-- Record one lookup's result and when the intent is due again (settled: never).
UPDATE outbox.janitor_checks
SET checks = %(checks)s::integer,
    not_found = %(not_found)s::integer,
    result = %(result)s::text,
    detail = %(detail)s::text,
    last_checked_at = now(),
    next_check_at = now() + make_interval(secs => %(next_check_seconds)s::float8),
    settled_at = CASE WHEN %(settled)s::boolean THEN now() END
WHERE intent_id = %(intent_id)s::bigint;

-- ------------------------------------------------------------------------------------------
-- Reconciliation (relay/finance/reconcile.py) and its exception workflow (relay/finance/exceptions.py)
-- ------------------------------------------------------------------------------------------

-- name: reconcile_start_run
-- Record a reconciliation run as started; the audit trail names who ran it.
INSERT INTO outbox.reconciliation_runs (provider, window_start, window_end)
VALUES (%(provider)s::text, %(since)s::timestamptz, %(until)s::timestamptz)
RETURNING id;

-- name: currency_exponents
-- Every currency's ISO 4217 exponent, to convert the provider's settlement amounts into minor units.
SELECT code, exponent FROM outbox.currencies;

-- name: reconcile_internal_items
-- The ledger's money-moving postings (captures, charges, refunds) of one provider in a time range.
SELECT id, payment_id, kind, provider_reference, amount_minor, currency, posted_at
FROM outbox.ledger_transactions
WHERE provider = %(provider)s::text
  AND kind IN ('capture', 'charge', 'refund')
  AND posted_at >= %(since)s::timestamptz AND posted_at < %(until)s::timestamptz
ORDER BY id;

-- name: reconcile_record_exception
-- Record a finding; found again, the same exception is updated (never a second copy), a cleared one reopens.
INSERT INTO outbox.reconciliation_exceptions AS x
    (provider, kind, match_key, payment_id, ledger_transaction_id, provider_transaction_id,
     currency, internal_amount_minor, provider_amount_minor, fee_minor, expected_fee_minor,
     delta_minor, detail, occurred_at, first_run_id, last_run_id)
VALUES (%(provider)s::text, %(kind)s::text, %(match_key)s::text, %(payment_id)s::text,
        %(ledger_transaction_id)s::bigint, %(provider_transaction_id)s::text, %(currency)s::text,
        %(internal_amount_minor)s::bigint, %(provider_amount_minor)s::bigint, %(fee_minor)s::bigint,
        %(expected_fee_minor)s::bigint, %(delta_minor)s::bigint, %(detail)s::text,
        %(occurred_at)s::timestamptz, %(run_id)s::bigint, %(run_id)s::bigint)
ON CONFLICT ON CONSTRAINT reconciliation_exceptions_once DO UPDATE
SET last_run_id = EXCLUDED.last_run_id,
    times_seen = x.times_seen + 1,
    payment_id = EXCLUDED.payment_id,
    ledger_transaction_id = EXCLUDED.ledger_transaction_id,
    provider_transaction_id = EXCLUDED.provider_transaction_id,
    currency = EXCLUDED.currency,
    internal_amount_minor = EXCLUDED.internal_amount_minor,
    provider_amount_minor = EXCLUDED.provider_amount_minor,
    fee_minor = EXCLUDED.fee_minor,
    expected_fee_minor = EXCLUDED.expected_fee_minor,
    delta_minor = EXCLUDED.delta_minor,
    detail = EXCLUDED.detail,
    status = CASE WHEN x.status = 'cleared' THEN 'open' ELSE x.status END,
    resolution = CASE WHEN x.status = 'cleared' THEN NULL ELSE x.resolution END,
    resolution_reason = CASE WHEN x.status = 'cleared' THEN NULL ELSE x.resolution_reason END,
    resolved_by = CASE WHEN x.status = 'cleared' THEN NULL ELSE x.resolved_by END,
    resolved_at = CASE WHEN x.status = 'cleared' THEN NULL ELSE x.resolved_at END
RETURNING x.id, (x.xmax = 0) AS inserted, x.status;

-- name: reconcile_clear_exceptions
-- Open exceptions of the window that this run no longer finds: the two sides agree now.
UPDATE outbox.reconciliation_exceptions
SET status = 'cleared',
    resolution = 'cleared',
    resolution_reason = 'not found again by reconciliation run ' || %(run_id)s::bigint,
    resolved_by = outbox.audit_actor(),
    resolved_at = now(),
    last_run_id = %(run_id)s::bigint
WHERE provider = %(provider)s::text
  AND status = 'open'
  -- found by a notification (sql/0023), not by a run: a run cannot clear it
  AND inbox_id IS NULL
  AND occurred_at >= %(since)s::timestamptz AND occurred_at < %(until)s::timestamptz
  AND id <> ALL(%(seen)s::bigint[])
RETURNING id;

-- name: reconcile_finish_run
-- Close a run with its counts (or as failed).
UPDATE outbox.reconciliation_runs
SET status = %(status)s::text,
    finished_at = now(),
    provider_items = %(provider_items)s::integer,
    internal_items = %(internal_items)s::integer,
    matched = %(matched)s::integer,
    exceptions_found = %(found)s::integer,
    exceptions_new = %(new)s::integer,
    exceptions_cleared = %(cleared)s::integer
WHERE id = %(run_id)s::bigint;

-- name: exceptions_list
-- Reconciliation exceptions, filtered by status, provider and kind (NULL: any), oldest first, with
-- their currency's exponent (outbox.currencies) to print amounts in currency units.
SELECT x.id, x.provider, x.kind, x.status, x.payment_id, x.match_key, x.currency,
       x.internal_amount_minor, x.provider_amount_minor, x.fee_minor, x.expected_fee_minor,
       x.delta_minor, x.times_seen, x.occurred_at, x.detail, x.resolution, x.resolution_reason,
       x.resolved_by, x.resolved_at,
       (SELECT a.id FROM outbox.reconciliation_actions AS a
        WHERE a.exception_id = x.id AND a.status = 'awaiting_approval'
        ORDER BY a.id DESC LIMIT 1) AS pending_action,
       (SELECT c.exponent FROM outbox.currencies AS c WHERE c.code = x.currency) AS exponent
FROM outbox.reconciliation_exceptions AS x
WHERE (%(statuses)s::text[] IS NULL OR x.status = ANY(%(statuses)s::text[]))
  AND (%(provider)s::text IS NULL OR x.provider = %(provider)s::text)
  AND (%(kind)s::text IS NULL OR x.kind = %(kind)s::text)
ORDER BY x.id
LIMIT %(limit)s::integer;

-- name: exception_for_update
-- One exception, locked for an operator's command, with its currency's exponent (to print amounts).
SELECT x.id, x.provider, x.kind, x.status, x.payment_id, x.delta_minor, x.currency,
       (SELECT c.exponent FROM outbox.currencies AS c WHERE c.code = x.currency) AS exponent
FROM outbox.reconciliation_exceptions AS x
WHERE x.id = %(id)s::bigint
FOR UPDATE OF x;

-- name: exception_accept
-- Accept an open exception with a reason (no money moves).
UPDATE outbox.reconciliation_exceptions
SET status = 'accepted', resolution = 'accepted', resolution_reason = %(reason)s::text,
    resolved_by = %(operator)s::text, resolved_at = now()
WHERE id = %(id)s::bigint AND status = 'open'
RETURNING id;

-- name: action_request
-- Ask for a money-moving command on an exception; it waits for a second operator.
WITH asked AS (
    INSERT INTO outbox.reconciliation_actions
        (exception_id, payment_id, action, amount_minor, reason, requested_by)
    VALUES (%(exception_id)s::bigint, %(payment_id)s::text, %(action)s::text,
            %(amount_minor)s::bigint, %(reason)s::text, %(operator)s::text)
    RETURNING id
),
waiting AS (
    UPDATE outbox.reconciliation_exceptions
    SET status = 'awaiting_approval'
    WHERE id = %(exception_id)s::bigint
    RETURNING id
)
SELECT asked.id FROM asked, waiting;

-- name: action_for_update
-- One requested action with its exception, both locked for the approval; the requester's database
-- login and this session's (four eyes by login, sql/0014).
SELECT a.id, a.exception_id, a.payment_id, a.action, a.amount_minor, a.reason, a.requested_by,
       a.approved_by, a.approved_at, a.status, a.intent_id, x.status, a.requested_login,
       session_user
FROM outbox.reconciliation_actions AS a
JOIN outbox.reconciliation_exceptions AS x ON x.id = a.exception_id
WHERE a.id = %(id)s::bigint
FOR UPDATE OF a, x;

-- name: action_insert_intent
-- An approved refund or void becomes an ordinary intent of the payment; the relay sends it exactly once.
INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, currency, metadata)
SELECT p.payment_id, %(action)s::text, p.provider, %(amount_minor)s::bigint, p.currency,
       jsonb_build_object('reconciliation_exception', %(exception_id)s::bigint,
                          'reconciliation_action', %(action_id)s::bigint)
FROM outbox.payments AS p
WHERE p.payment_id = %(payment_id)s::text
RETURNING id;

-- name: action_dead_intents
-- The dead intents of a payment, the ones a re-drive would send again.
SELECT id FROM outbox.payment_intents
WHERE payment_id = %(payment_id)s::text AND status = 'dead'
ORDER BY payment_seq;

-- name: action_redrive
-- Re-drive a payment's dead intents under their own keys (sql/0006: outbox.retry_dead_intents).
SELECT intent_id FROM outbox.retry_dead_intents(%(ids)s::bigint[], %(operator)s::text);

-- name: action_executed
-- Mark an approved action executed, by whom, and the intent it created or re-drove.
UPDATE outbox.reconciliation_actions
SET status = 'executed', approved_by = %(operator)s::text, approved_at = now(),
    intent_id = %(intent_id)s::bigint
WHERE id = %(id)s::bigint AND status = 'awaiting_approval'
RETURNING id;

-- name: exception_resolve
-- Resolve an exception by an executed action.
UPDATE outbox.reconciliation_exceptions
SET status = 'resolved', resolution = %(resolution)s::text,
    resolution_reason = %(reason)s::text, resolved_by = %(operator)s::text, resolved_at = now()
WHERE id = %(id)s::bigint
RETURNING id;

-- ------------------------------------------------------------------------------------------
-- The webhook inbox (sql/0023): the receiver (relay/service/webhooks.py) stores, relays
-- apply (relay/core/inbox/), operators read (relay/operations/webhooks.py)
-- ------------------------------------------------------------------------------------------

-- name: inbox_insert
-- Store one verified notification; a duplicate of (provider, event_id) inserts nothing and returns no row.
INSERT INTO outbox.webhook_inbox (provider, event_id, event_type, event_created_at, payload)
VALUES (%(provider)s::text, %(event_id)s::text, %(event_type)s::text,
        %(event_created_at)s::timestamptz, %(payload)s::jsonb)
ON CONFLICT ON CONSTRAINT webhook_inbox_event_once DO NOTHING
RETURNING id;

-- name: inbox_claim
-- Lease up to `limit` received notifications of these providers (available_at becomes the lease's end); commit before applying.
WITH picked AS (
    SELECT id
    FROM outbox.webhook_inbox
    WHERE status = 'received'
      AND provider = ANY(%(providers)s::text[])
      AND available_at <= COALESCE(%(now)s::timestamptz, now())
    ORDER BY available_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox.webhook_inbox AS w
SET available_at = COALESCE(%(now)s::timestamptz, now()) + make_interval(secs => %(lease_seconds)s::float8),
    lease_token = nextval('outbox.lease_token_seq'),
    claimed_by = %(instance)s::text,
    attempts = w.attempts + 1
FROM picked
WHERE w.id = picked.id
RETURNING w.id, w.provider, w.event_id, w.event_type, w.event_created_at, w.received_at,
          w.payload, w.lease_token, w.attempts;

-- name: inbox_take
-- Inside the apply transaction: lock a claimed notification if this lease still holds it (the fence).
SELECT id
FROM outbox.webhook_inbox
WHERE id = %(id)s::bigint AND lease_token = %(lease_token)s::bigint AND status = 'received'
FOR UPDATE;

-- name: inbox_finish
-- Mark a notification applied or ignored with what it did, fenced by its lease token.
UPDATE outbox.webhook_inbox
SET status = %(status)s::text,
    -- the moment of applying, not the transaction's start: receipt-to-applied lag reads it
    applied_at = clock_timestamp(),
    result = %(result)s::text,
    payment_id = COALESCE(%(payment_id)s::text, payment_id),
    lease_token = NULL,
    claimed_by = NULL,
    last_error = NULL
WHERE id = %(id)s::bigint AND lease_token = %(lease_token)s::bigint AND status = 'received'
RETURNING id, received_at, event_created_at, applied_at;

-- name: inbox_retry
-- Hand a notification back to be applied again after `delay_seconds` (apply failed, or it waits for an intent in flight), fenced.
UPDATE outbox.webhook_inbox
SET available_at = now() + make_interval(secs => %(delay_seconds)s::float8),
    lease_token = NULL,
    claimed_by = NULL,
    payment_id = COALESCE(%(payment_id)s::text, payment_id),
    last_error = %(error)s::text
WHERE id = %(id)s::bigint AND lease_token = %(lease_token)s::bigint AND status = 'received'
RETURNING id;

-- name: inbox_intent_payment
-- The payment of the intent our call carried `idempotency_key` for (to lock it first, as a write-back does).
SELECT payment_id
FROM outbox.payment_intents
WHERE provider = %(provider)s::text AND idempotency_key = %(idempotency_key)s::text;

-- name: inbox_intent_by_key
-- The intent of one idempotency key with its payment (locked by the caller) and currency exponent.
SELECT i.id, i.payment_id, i.action, i.provider, i.amount_minor, i.currency, i.payment_method,
       i.idempotency_key, i.attempts, i.status, i.completed_at, i.lease_expires_at,
       p.state AS payment_state, p.authorized_minor, p.captured_minor, p.refunded_minor,
       p.provider_reference AS payment_reference, p.disputed_minor, p.dispute_status,
       (SELECT c.exponent FROM outbox.currencies AS c WHERE c.code = i.currency) AS exponent
FROM outbox.payment_intents AS i
JOIN outbox.payments AS p ON p.payment_id = i.payment_id
WHERE i.provider = %(provider)s::text AND i.idempotency_key = %(idempotency_key)s::text;

-- name: inbox_take_intent
-- Take an intent whose outcome is unknown (dead, pending a retry after an ambiguous reply, or awaiting its confirmation) under a lease, to write what the notification shows.
UPDATE outbox.payment_intents AS i
SET status = 'in_flight',
    lease_token = nextval('outbox.lease_token_seq'),
    lease_expires_at = now() + make_interval(secs => %(lease_seconds)s::float8),
    claimed_by = %(instance)s::text,
    updated_at = now()
WHERE i.id = %(id)s::bigint
  AND (i.status IN ('dead', 'awaiting_confirmation') OR (i.status = 'pending' AND i.attempts > 0))
RETURNING i.lease_token, i.status;

-- name: inbox_payment_by_id
-- A payment of this provider by our payment_id (a confirmation's merchant reference), locked, as inbox_payment_by_reference reads it.
SELECT p.payment_id, p.currency, p.state, p.authorized_minor, p.captured_minor, p.refunded_minor,
       p.provider_reference, p.disputed_minor, p.dispute_status, p.dispute_reference,
       (SELECT c.exponent FROM outbox.currencies AS c WHERE c.code = p.currency) AS exponent,
       (SELECT count(*) FROM outbox.payment_intents AS i
        WHERE i.payment_id = p.payment_id
          AND i.status IN ('blocked', 'pending', 'in_flight', 'awaiting_confirmation', 'dead'))
           AS unresolved
FROM outbox.payments AS p
WHERE p.provider = %(provider)s::text AND p.payment_id = %(payment_id)s::text
FOR UPDATE OF p;

-- name: inbox_intent_by_reference
-- The latest intent of one payment (locked by the caller) whose call the provider accepted as `reference`, with its payment, to finish on confirmation.
SELECT i.id, i.payment_id, i.action, i.provider, i.amount_minor, i.currency, i.payment_method,
       i.idempotency_key, i.attempts, i.status, i.amount_applied_minor,
       p.state AS payment_state, p.authorized_minor, p.captured_minor, p.refunded_minor,
       p.provider_reference AS payment_reference, p.disputed_minor, p.dispute_status,
       p.awaiting_action, p.awaiting_minor,
       (SELECT c.exponent FROM outbox.currencies AS c WHERE c.code = i.currency) AS exponent
FROM outbox.payment_intents AS i
JOIN outbox.payments AS p ON p.payment_id = i.payment_id
WHERE i.payment_id = %(payment_id)s::text AND i.provider_reference = %(reference)s::text
  AND i.action = ANY(%(actions)s::text[])
ORDER BY i.id DESC
LIMIT 1;

-- name: inbox_intent_unsettled_of_action
-- The first intent of one payment (locked by the caller) with these actions whose outcome is not written: a confirmation naming a reference no intent recorded may be its (a reply lost, a stored 5xx replayed).
SELECT i.id, i.payment_id, i.action, i.provider, i.amount_minor, i.currency, i.payment_method,
       i.idempotency_key, i.attempts, i.status, i.amount_applied_minor,
       p.state AS payment_state, p.authorized_minor, p.captured_minor, p.refunded_minor,
       p.provider_reference AS payment_reference, p.disputed_minor, p.dispute_status,
       p.awaiting_action, p.awaiting_minor,
       (SELECT c.exponent FROM outbox.currencies AS c WHERE c.code = i.currency) AS exponent
FROM outbox.payment_intents AS i
JOIN outbox.payments AS p ON p.payment_id = i.payment_id
WHERE i.payment_id = %(payment_id)s::text AND i.action = ANY(%(actions)s::text[])
  AND i.status IN ('pending', 'in_flight', 'dead')
ORDER BY i.id
LIMIT 1;

-- name: inbox_reversed
-- Whether the posting of this intent was already reversed (a withdrawn confirmation applied before).
SELECT EXISTS (
    SELECT 1 FROM outbox.ledger_transactions AS r
    JOIN outbox.ledger_transactions AS t ON t.id = r.reverses_transaction_id
    WHERE t.intent_id = %(intent_id)s::bigint) AS reversed;

-- name: inbox_post_reversal
-- Reverse the capture or refund posting of an intent whose confirmation the provider withdrew (sql/0038): its entries negated, once.
SELECT outbox.post_reversal_v1(%(inbox_id)s::bigint, %(intent_id)s::bigint);

-- name: inbox_record_reversal
-- A capture or refund the provider withdrew (CAPTURE_FAILED, REFUND_FAILED after success): the payment's amounts and state back.
UPDATE outbox.payments
SET captured_minor = %(captured_minor)s::bigint,
    refunded_minor = %(refunded_minor)s::bigint,
    state = %(state)s::text,
    updated_at = now()
WHERE payment_id = %(payment_id)s::text
RETURNING payment_id, state, authorized_minor, captured_minor, refunded_minor, provider_reference,
          disputed_minor, dispute_status;

-- name: inbox_record_authorisation_ended
-- The provider released an open authorisation by itself (TECHNICAL_CANCEL, EXPIRE): the payment is voided.
UPDATE outbox.payments
SET state = 'voided', updated_at = now()
WHERE payment_id = %(payment_id)s::text AND state = 'authorized'
RETURNING payment_id, state, authorized_minor, captured_minor, refunded_minor, provider_reference,
          disputed_minor, dispute_status;

-- name: inbox_resolve_overdue
-- A late confirmation settled its intent: resolve the intent's confirmation_overdue exception (sql/0038).
SELECT outbox.resolve_overdue_confirmation_v1(%(intent_id)s::bigint, %(resolution)s::text);

-- name: awaiting_overdue
-- Intents of these providers awaiting a confirmation for longer than the deadline, oldest first (payment_intents_awaiting_idx).
SELECT id, payment_id, provider, action, updated_at
FROM outbox.payment_intents
WHERE status = 'awaiting_confirmation' AND provider = ANY(%(providers)s::text[])
  AND updated_at < COALESCE(%(now)s::timestamptz, now()) - make_interval(secs => %(deadline_seconds)s::float8)
ORDER BY updated_at, id
LIMIT %(limit)s;

-- name: awaiting_depth
-- Intents awaiting their provider's confirmation per provider, and how long the oldest has waited, for the depth gauges (payment_intents_awaiting_idx).
SELECT provider, count(*) AS intents,
       COALESCE(extract(epoch FROM COALESCE(%(now)s::timestamptz, now()) - min(updated_at)), 0)::float8
           AS oldest_seconds
FROM outbox.payment_intents
WHERE status = 'awaiting_confirmation'
GROUP BY provider
ORDER BY provider;

-- name: open_overdue_confirmation
-- Open the confirmation_overdue exception of one intent (once); NULL when it is open already or the intent moved on.
SELECT outbox.open_overdue_confirmation_v1(%(intent_id)s::bigint, %(detail)s::text);

-- name: inbox_payment_by_reference
-- A payment of this provider by its provider reference (Stripe: the PaymentIntent), locked, with its currency's exponent and unresolved intents.
SELECT p.payment_id, p.currency, p.state, p.authorized_minor, p.captured_minor, p.refunded_minor,
       p.provider_reference, p.disputed_minor, p.dispute_status, p.dispute_reference,
       (SELECT c.exponent FROM outbox.currencies AS c WHERE c.code = p.currency) AS exponent,
       (SELECT count(*) FROM outbox.payment_intents AS i
        WHERE i.payment_id = p.payment_id
          AND i.status IN ('blocked', 'pending', 'in_flight', 'awaiting_confirmation', 'dead'))
           AS unresolved
FROM outbox.payments AS p
WHERE p.provider = %(provider)s::text AND p.provider_reference = %(reference)s::text
ORDER BY p.payment_id
LIMIT 1
FOR UPDATE OF p;

-- name: inbox_record_refund
-- A refund made outside the relay, as a notification reported it: the payment's refunded total and state.
UPDATE outbox.payments
SET refunded_minor = %(refunded_minor)s::bigint,
    state = %(state)s::text,
    updated_at = now()
WHERE payment_id = %(payment_id)s::text
RETURNING payment_id, state, authorized_minor, captured_minor, refunded_minor, provider_reference,
          disputed_minor, dispute_status;

-- name: inbox_record_capture
-- A capture made outside the relay, as a notification reported it: the payment's captured total and state.
UPDATE outbox.payments
SET captured_minor = %(captured_minor)s::bigint,
    state = 'captured',
    updated_at = now()
WHERE payment_id = %(payment_id)s::text
RETURNING payment_id, state, authorized_minor, captured_minor, refunded_minor, provider_reference,
          disputed_minor, dispute_status;

-- name: inbox_unresolved_captures
-- Capture intents of one payment whose outcome is not written yet: a capture notification may be theirs.
SELECT id, status
FROM outbox.payment_intents
WHERE payment_id = %(payment_id)s::text AND action = 'capture'
  AND status IN ('blocked', 'pending', 'in_flight', 'dead')
ORDER BY id;

-- name: inbox_record_dispute
-- A dispute as a notification reported it (sql/0035): the amount withdrawn and not returned, its status and id.
UPDATE outbox.payments
SET disputed_minor = %(disputed_minor)s::bigint,
    dispute_status = %(dispute_status)s::text,
    dispute_reference = %(dispute_reference)s::text,
    updated_at = now()
WHERE payment_id = %(payment_id)s::text
RETURNING payment_id, state, authorized_minor, captured_minor, refunded_minor, provider_reference,
          disputed_minor, dispute_status;

-- name: inbox_post_ledger
-- Post a change a notification reported to the ledger: refund, capture, void, dispute, dispute_reversal (sql/0038; once per notification and kind).
SELECT outbox.post_notified_change_v3(%(inbox_id)s::bigint, %(payment_id)s::text, %(kind)s::text,
                                      %(amount_minor)s::bigint, %(reference)s::text);

-- name: inbox_open_exception
-- Open, or find again, the reconciliation exception a notification revealed.
SELECT outbox.open_notified_exception_v1(
    %(inbox_id)s::bigint, %(provider)s::text, %(kind)s::text, %(match_key)s::text,
    %(payment_id)s::text, %(currency)s::text, %(internal_minor)s::bigint,
    %(provider_minor)s::bigint, %(detail)s::text, %(occurred_at)s::timestamptz);

-- name: inbox_event
-- The result event of an applied notification, in its payment's stream.
INSERT INTO outbox.events (event_id, ordering_key, routing_key, event_type, payload, payment_id)
SELECT e.event_id, 'payment:' || %(payment_id)s::text, %(event_type)s::text, %(event_type)s::text,
       %(payload)s::jsonb || jsonb_build_object('event_id', e.event_id,
                                                'event_type', %(event_type)s::text,
                                                'occurred_at', now(),
                                                'payment_id', %(payment_id)s::text),
       %(payment_id)s::text
FROM (SELECT gen_random_uuid() AS event_id) AS e
RETURNING id;

-- name: inbox_ledger_totals
-- The ledger's captured and refunded totals of one payment, to compare a notification's amounts with at once.
SELECT (COALESCE(sum(amount_minor) FILTER (WHERE kind IN ('capture', 'charge')), 0)
        - COALESCE(sum(amount_minor) FILTER (WHERE kind = 'capture_reversal'), 0))::bigint AS captured,
       (COALESCE(sum(amount_minor) FILTER (WHERE kind = 'refund'), 0)
        - COALESCE(sum(amount_minor) FILTER (WHERE kind = 'refund_reversal'), 0))::bigint AS refunded
FROM outbox.ledger_transactions
WHERE payment_id = %(payment_id)s::text;

-- name: inbox_retention
-- Delete up to `limit` applied or ignored notifications finished more than `older_than_seconds` ago.
WITH due AS (
    SELECT id
    FROM outbox.webhook_inbox
    WHERE status IN ('applied', 'ignored')
      AND applied_at < COALESCE(%(now)s::timestamptz, now()) - make_interval(secs => %(older_than_seconds)s::float8)
    ORDER BY applied_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM outbox.webhook_inbox AS w
USING due
WHERE w.id = due.id
RETURNING w.id;

-- name: inbox_waiting
-- Received notifications not yet applied, per provider, and the age of the oldest, for the depth gauges (webhook_inbox_claimable_idx).
SELECT provider, count(*) AS notifications,
       COALESCE(extract(epoch FROM COALESCE(%(now)s::timestamptz, now()) - min(received_at)), 0)::float8
           AS oldest_seconds
FROM outbox.webhook_inbox
WHERE status = 'received'
GROUP BY provider
ORDER BY provider;

-- name: webhooks_summary
-- Notifications by provider, type and status, for `outbox-relay webhooks list`.
SELECT provider, event_type, status, count(*) AS notifications, max(received_at) AS last_received
FROM outbox.webhook_inbox
GROUP BY provider, event_type, status
ORDER BY provider, event_type, status;

-- name: webhooks_list
-- The latest notifications, filtered by provider, status and type (NULL: any).
SELECT id, provider, event_id, event_type, status, event_created_at, received_at, applied_at,
       attempts, payment_id, result, last_error
FROM outbox.webhook_inbox
WHERE (%(provider)s::text IS NULL OR provider = %(provider)s::text)
  AND (%(status)s::text IS NULL OR status = %(status)s::text)
  AND (%(event_type)s::text IS NULL OR event_type = %(event_type)s::text)
ORDER BY id DESC
LIMIT %(limit)s::integer;

-- name: webhook_show
-- One notification by id or by provider event id, with its stored (redacted) payload.
SELECT id, provider, event_id, event_type, status, event_created_at, received_at, applied_at,
       attempts, claimed_by, payment_id, result, last_error, payload
FROM outbox.webhook_inbox
WHERE id::text = %(ref)s::text OR event_id = %(ref)s::text
ORDER BY id
LIMIT 1;

-- name: webhooks_for_payment
-- The notifications that touched one payment, for `intents show`.
SELECT id, provider, event_id, event_type, status, received_at, applied_at, result
FROM outbox.webhook_inbox
WHERE payment_id = %(payment_id)s::text
ORDER BY id;

-- Exchange rates (sql/0027; relay/finance/fx.py)
-- ------------------------------------------------------------------------------------------

-- name: fx_insert_rates
-- Insert a document's rates; one already recorded (same pair, source, valid_from and rate) is skipped.
INSERT INTO outbox.fx_rates
    (base, quote, rate, source_kind, source_name, source_url, source_sha256, operator,
     published_at, fetched_at, valid_from, valid_until)
SELECT r.base, r.quote, r.rate, %(source_kind)s::text, %(source_name)s::text,
       %(source_url)s::text, %(source_sha256)s::bytea, %(operator)s::text, r.published_at,
       COALESCE(%(fetched_at)s::timestamptz, now()), r.valid_from, r.valid_until
FROM unnest(%(bases)s::text[], %(quotes)s::text[], %(rates)s::numeric[],
            %(published)s::timestamptz[], %(valid_from)s::timestamptz[],
            %(valid_until)s::timestamptz[])
     AS r(base, quote, rate, published_at, valid_from, valid_until)
ON CONFLICT (base, quote, source_kind, source_name, valid_from, rate) DO NOTHING
RETURNING id;

-- name: fx_insert_rates_as_relay
-- The relay's periodic ECB fetch: as fx_insert_rates, without an operator (outbox_relay may not name one).
INSERT INTO outbox.fx_rates
    (base, quote, rate, source_kind, source_name, source_url, source_sha256,
     published_at, fetched_at, valid_from, valid_until)
SELECT r.base, r.quote, r.rate, %(source_kind)s::text, %(source_name)s::text,
       %(source_url)s::text, %(source_sha256)s::bytea, r.published_at,
       COALESCE(%(fetched_at)s::timestamptz, now()), r.valid_from, r.valid_until
FROM unnest(%(bases)s::text[], %(quotes)s::text[], %(rates)s::numeric[],
            %(published)s::timestamptz[], %(valid_from)s::timestamptz[],
            %(valid_until)s::timestamptz[])
     AS r(base, quote, rate, published_at, valid_from, valid_until)
ON CONFLICT (base, quote, source_kind, source_name, valid_from, rate) DO NOTHING
RETURNING id;

-- name: fx_current_rates
-- The rate of every pair valid at `at` (NULL: now), with its source, age and the policy's limit.
SELECT r.id, r.base, r.quote, r.rate::text AS rate, r.source_kind, r.source_name, r.operator,
       r.published_at, r.fetched_at, r.valid_from, r.valid_until,
       COALESCE(%(at)s::timestamptz, now()) - r.published_at AS age,
       COALESCE(%(at)s::timestamptz, now()) - r.published_at > p.max_rate_age AS stale,
       p.max_rate_age
FROM (
    SELECT DISTINCT ON (f.base, f.quote) f.*
    FROM outbox.fx_rates AS f
    WHERE f.valid_from <= COALESCE(%(at)s::timestamptz, now())
      AND (f.valid_until IS NULL OR f.valid_until > COALESCE(%(at)s::timestamptz, now()))
    ORDER BY f.base, f.quote, f.valid_from DESC, f.id DESC
) AS r
CROSS JOIN outbox.fx_policy AS p
ORDER BY r.base, r.quote;

-- name: fx_rate_history
-- Every recorded rate of a pair (either direction), newest first, with who recorded it.
SELECT r.id, r.base, r.quote, r.rate::text AS rate, r.source_kind, r.source_name,
       r.source_url, encode(r.source_sha256, 'hex') AS source_sha256, r.operator,
       r.published_at, r.fetched_at, r.valid_from, r.valid_until, r.recorded_by, r.recorded_at
FROM outbox.fx_rates AS r
WHERE (r.base = %(base)s::text AND r.quote = %(quote)s::text)
   OR (r.base = %(quote)s::text AND r.quote = %(base)s::text)
ORDER BY r.valid_from DESC, r.id DESC
LIMIT %(limit)s::integer;

-- name: fx_convert
-- outbox.convert_v1 (sql/0027) with both currencies' exponents, for `fx convert`.
SELECT c.converted_minor, c.currency, c.rate::text AS rate, c.rate_id, c.via_rate_id,
       c.rate_published_at, c.rate_age,
       (SELECT exponent FROM outbox.currencies WHERE code = upper(%(from_ccy)s::text)) AS from_exponent,
       (SELECT exponent FROM outbox.currencies WHERE code = c.currency) AS to_exponent
FROM outbox.convert_v1(%(amount_minor)s::bigint, %(from_ccy)s::text, %(to_ccy)s::text,
                       COALESCE(%(at)s::timestamptz, now())) AS c;

-- name: fx_currency_exponent
-- One currency's ISO 4217 exponent (NULL row when unknown), to read an amount given in major units.
SELECT exponent FROM outbox.currencies WHERE code = upper(%(code)s::text);

-- name: fx_rate_ages
-- Age in seconds of the newest published rate of every pair and source, for the gauge and its alert.
SELECT base, quote, source_kind,
       extract(epoch FROM COALESCE(%(now)s::timestamptz, now()) - max(published_at))::float8
           AS age_seconds
FROM outbox.fx_rates
GROUP BY base, quote, source_kind
ORDER BY base, quote, source_kind;

-- name: reconcile_convert
-- Our conversion of a ledger amount into the currency the provider settled it in, at the rate in force
-- at the settlement (outbox.convert_v1 with no age limit: a past settlement is judged by the rate then).
SELECT converted_minor, currency, rate::text, rate_id, via_rate_id
FROM outbox.convert_v1(%(amount_minor)s::bigint, %(from_ccy)s::text, %(to_ccy)s::text,
                       %(at)s::timestamptz, interval '100 years');

-- name: reconcile_post_settlement
-- Post a settled charge's FX difference (provider's amount against ours) to the journal, once per transaction.
INSERT INTO outbox.fx_postings
    (kind, payment_id, provider, provider_reference, source_currency, source_amount_minor,
     currency, expected_minor, actual_minor, our_rate_id, our_via_rate_id, provider_rate)
VALUES ('settlement', %(payment_id)s::text, %(provider)s::text, %(provider_reference)s::text,
        %(source_currency)s::text, %(source_amount_minor)s::bigint, %(currency)s::text,
        %(expected_minor)s::bigint, %(actual_minor)s::bigint, %(rate_id)s::bigint,
        %(via_rate_id)s::bigint, %(provider_rate)s::text)
ON CONFLICT (provider, provider_reference) WHERE kind = 'settlement' DO NOTHING
RETURNING id;

-- name: fx_postings_list
-- The FX difference journal (sql/0029), newest first, with both currencies' exponents.
SELECT p.id, p.kind, p.payment_id, p.intent_id, p.provider, p.provider_reference,
       p.source_currency, p.source_amount_minor, p.currency, p.expected_minor, p.actual_minor,
       p.difference_minor, p.our_rate_id, p.our_via_rate_id, p.compared_rate_id,
       p.compared_via_rate_id, p.provider_rate, p.posted_at, p.posted_by,
       (SELECT exponent FROM outbox.currencies WHERE code = p.source_currency) AS source_exponent,
       (SELECT exponent FROM outbox.currencies WHERE code = p.currency) AS exponent
FROM outbox.fx_postings AS p
WHERE (%(payment_id)s::text IS NULL OR p.payment_id = %(payment_id)s::text)
ORDER BY p.id DESC
LIMIT %(limit)s::integer;

-- name: fx_difference_totals
-- The FX difference journal summed by provider, currency and kind, for the gauge and the dashboard.
SELECT provider, currency, kind, sum(difference_minor)::bigint AS difference_minor,
       count(*) AS postings
FROM outbox.fx_postings
GROUP BY provider, currency, kind
ORDER BY provider, currency, kind;

-- name: ledger_fx_problems
-- FX difference postings (sql/0029) whose entries do not balance, or whose refund is not a succeeded refund.
WITH intents AS (
    SELECT id, action, status FROM outbox.payment_intents
    UNION ALL
    SELECT id, action, status FROM outbox.payment_intents_archive
),
sums AS (
    SELECT posting_id, sum(amount_minor)::bigint AS imbalance
    FROM outbox.fx_ledger_entries
    GROUP BY posting_id
)
SELECT p.id, p.kind, p.payment_id, p.intent_id, p.currency, COALESCE(s.imbalance, 0) AS imbalance,
       i.action, i.status
FROM outbox.fx_postings AS p
LEFT JOIN sums AS s ON s.posting_id = p.id
LEFT JOIN intents AS i ON i.id = p.intent_id
WHERE COALESCE(s.imbalance, 0) <> 0
   OR (p.kind = 'refund_at_charge_rate'
       AND (i.id IS NULL OR i.action <> 'refund' OR i.status <> 'succeeded'))
ORDER BY p.id;

-- ------------------------------------------------------------------------------------------
-- The provider registry and routing rules (sql/0050, sql/0051; relay/operations/providers.py)

-- name: providers_list
-- Every registered provider, by name.
SELECT name, kind, enabled, currencies, amount_limits, note, api_version, created_at, updated_at,
       updated_by
FROM outbox.providers
ORDER BY name;

-- name: provider_set
-- Register or change one provider as an operator (NULL keeps a value; currencies '{}': all;
-- api_version '': not recorded).
SELECT name, kind, enabled, currencies, amount_limits, note, api_version, created_at, updated_at,
       updated_by
FROM outbox.provider_set_v2(%(operator)s, %(name)s, %(kind)s, %(enabled)s, %(currencies)s::text[],
                            %(amount_limits)s::jsonb, %(note)s, %(reason)s, %(create)s,
                            %(api_version)s);

-- name: registered_api_versions
-- The API version the registry pins for these providers (NULL: all), where it records one
-- (sql/0070): a relay refuses to start with another; `status` names a running relay that differs.
SELECT name, kind, api_version
FROM outbox.providers
WHERE (%(providers)s::text[] IS NULL OR name = ANY(%(providers)s::text[])) AND api_version IS NOT NULL
ORDER BY name;

-- name: routing_rules_list
-- Every routing rule, in the order the INSERT tries them (disabled ones too).
SELECT id, name, version, priority, enabled, currencies, min_amount_minor, max_amount_minor,
       payment_method_prefixes, metadata_key, metadata_values, mode, providers, weights, note,
       updated_at, updated_by
FROM outbox.routing_rules
ORDER BY priority, id;

-- name: routing_rule_set
-- Add or change one routing rule as an operator (rule: the columns to set, as JSON).
SELECT id, name, version, priority, enabled, currencies, min_amount_minor, max_amount_minor,
       payment_method_prefixes, metadata_key, metadata_values, mode, providers, weights, note,
       updated_at, updated_by
FROM outbox.routing_rule_set_v1(%(operator)s, %(name)s, %(rule)s::jsonb, %(reason)s, %(create)s);

-- name: registry_changes
-- The audit rows of one registry entity ('provider' or 'routing_rule'), newest first.
SELECT at, actor, operation, reason, before, after
FROM outbox.audit_log
WHERE entity = %(entity)s AND entity_id = %(entity_id)s
ORDER BY chain_seq DESC
LIMIT %(limit)s;

-- name: registered_enabled_providers
-- The names of the enabled registered providers (status: one that no live relay serves).
SELECT name FROM outbox.providers WHERE enabled ORDER BY name;

-- name: payment_routing
-- How a payment's provider was chosen: the rule and version, NULL when the first intent named it.
-- failed_over_from (sql/0064): the providers it left by failover, in order.
SELECT p.routing_rule_id, p.routing_rule_version, r.name AS routing_rule_name,
       r.version AS routing_rule_current_version, outbox.routing_bucket(p.payment_id) AS routing_bucket,
       p.failed_over_from
FROM outbox.payments AS p
LEFT JOIN outbox.routing_rules AS r ON r.id = p.routing_rule_id
WHERE p.payment_id = %(payment_id)s;

-- name: registry_policy_set
-- Turn four eyes on the registry and routing rules on or off as an operator (sql/0052).
SELECT four_eyes FROM outbox.registry_policy_set_v1(%(operator)s, %(four_eyes)s, %(reason)s);

-- name: registry_request
-- Record a registry or routing change for a second operator; its id.
SELECT id FROM outbox.registry_request_v1(%(operator)s, %(entity)s, %(name)s, %(change)s::jsonb, %(reason)s);

-- name: registry_approve
-- Apply a pending registry request as a second operator, from another login.
SELECT id, entity, name, change, reason, status, requested_by, requested_login, approved_by,
       approved_login
FROM outbox.registry_approve_v1(%(operator)s, %(id)s);

-- name: registry_requests
-- Registry requests, pending first, newest first.
SELECT id, entity, name, change, reason, status, requested_by, requested_login, requested_at,
       approved_by, approved_login, approved_at
FROM outbox.registry_requests
ORDER BY status = 'pending' DESC, id DESC
LIMIT 100;

-- ------------------------------------------------------------------------------------------
-- Guard rails of split rules (sql/0067; relay/service/guard_rails.py, relay/operations/providers.py)

-- name: guard_rails_list
-- Every guard rail with its rule's state now: the canary's and baseline's weights, the rule's mode and whether it is enabled.
SELECT g.rule_name, g.canary, g.baseline, g.enabled, g.window_seconds, g.min_samples,
       g.failure_margin_bp, g.ambiguous_margin_bp, g.latency_percentile, g.latency_margin_ms,
       g.note, g.version, g.updated_at, g.updated_by, g.rolled_back_at, g.rolled_back_by,
       g.rollback_reason, r.id AS rule_id, r.enabled AS rule_enabled, r.mode, r.providers,
       r.weights, r.weights[array_position(r.providers, g.canary)] AS canary_weight,
       r.weights[array_position(r.providers, g.baseline)] AS baseline_weight
FROM outbox.routing_guards AS g
JOIN outbox.routing_rules AS r ON r.name = g.rule_name
ORDER BY g.rule_name;

-- name: guard_rail_window
-- Per enabled guard and side: the first intents of the payments its rule routed in the window (and since its last rollback), by status and error code, with the provider's kind for the error catalogue; on each row, the side's percentile (the guard's) of INSERT-to-outcome time of those that finished, in whole milliseconds (NULL: no latency margin, or none finished). The window is read once: per guard, one range scan of payments_routed_idx and a payment_idx probe per payment (OFFSET 0 keeps the subquery per guard, whatever the tables' statistics).
WITH w AS MATERIALIZED (
    SELECT g.rule_name, g.latency_percentile, g.latency_margin_ms, w.provider, w.status,
           w.error_code, w.took
    FROM outbox.routing_guards AS g
    JOIN outbox.routing_rules AS r ON r.name = g.rule_name
    CROSS JOIN LATERAL (
        SELECT p.provider, i.status, i.error_code, i.completed_at - i.created_at AS took
        FROM outbox.payments AS p
        JOIN outbox.payment_intents AS i ON i.payment_id = p.payment_id AND i.payment_seq = 1
        WHERE p.routing_rule_id = r.id
          AND p.created_at >= greatest(COALESCE(%(now)s::timestamptz, now())
                                           - make_interval(secs => g.window_seconds),
                                       COALESCE(g.rolled_back_at, '-infinity'::timestamptz))
          AND p.provider IN (g.canary, g.baseline)
        OFFSET 0
    ) AS w
    WHERE g.enabled
),
latency AS (
    SELECT rule_name, provider,
           floor(extract(epoch FROM percentile_disc(latency_percentile / 100.0)
                                    WITHIN GROUP (ORDER BY took)) * 1000)::bigint AS latency_ms
    FROM w
    WHERE latency_margin_ms IS NOT NULL AND took IS NOT NULL
    GROUP BY rule_name, latency_percentile, provider
),
outcomes AS (
    SELECT rule_name, provider, status, error_code, count(*)::bigint AS intents
    FROM w
    GROUP BY rule_name, provider, status, error_code
)
-- Every side with a latency has outcomes (its rows are among them): the join loses none.
SELECT o.rule_name, o.provider, COALESCE(pr.kind, o.provider) AS kind, o.status, o.error_code,
       o.intents, l.latency_ms
FROM outcomes AS o
LEFT JOIN latency AS l ON l.rule_name = o.rule_name AND l.provider = o.provider
LEFT JOIN outbox.providers AS pr ON pr.name = o.provider;

-- name: guard_rail_rollback
-- A relay's automatic rollback of a guarded canary to weight 0 (audited as relay:<instance>, the comparison as the reason); all NULL when nothing was done (another relay was first).
SELECT id, name, version, providers, weights
FROM outbox.routing_guard_rollback_v1(%(instance)s, %(rule)s, %(canary)s, %(reason)s,
                                      %(comparison)s::jsonb);

-- name: routing_guard_set
-- Add or change the guard rail of a split rule as an operator (guard: the columns to set, as JSON).
SELECT rule_name, canary, baseline, enabled, window_seconds, min_samples, failure_margin_bp,
       ambiguous_margin_bp, latency_percentile, latency_margin_ms, note, version, updated_at,
       updated_by, rolled_back_at, rolled_back_by, rollback_reason
FROM outbox.routing_guard_set_v1(%(operator)s, %(rule)s, %(guard)s::jsonb, %(reason)s);

-- ------------------------------------------------------------------------------------------
-- Payment flows (sql/0072; relay/operations/flows.py)
-- ------------------------------------------------------------------------------------------

-- name: flows_list
-- Flows newest first, optionally of one state, with how many steps each has and how many took effect.
SELECT f.id, f.flow_key, f.state, f.reason, f.created_at, f.updated_at,
       count(s.id) AS steps,
       count(s.id) FILTER (WHERE s.status = 'succeeded') AS succeeded,
       count(s.id) FILTER (WHERE s.compensation_status = 'succeeded') AS compensated
FROM outbox.flows AS f
LEFT JOIN outbox.flow_steps AS s ON s.flow_id = f.id
WHERE %(state)s::text IS NULL OR f.state = %(state)s::text
GROUP BY f.id
ORDER BY f.id DESC
LIMIT %(limit)s;

-- name: flow_detail
-- One flow's row.
SELECT id, flow_key, state, reason, failed_step, metadata, created_by, created_at, updated_at,
       finished_at
FROM outbox.flows
WHERE id = %(id)s::bigint;

-- name: flow_steps_detail
-- One flow's steps in order, each with its intent's and its compensation's current state.
SELECT s.seq, s.depends_on, s.payment_id, s.action, coalesce(i.provider, s.provider) AS provider,
       s.amount_minor, s.currency, s.status, s.intent_id, i.status AS intent_status,
       i.idempotency_key, s.amount_applied_minor, s.error_code, s.compensation,
       s.compensation_status, s.compensation_intent_id, c.status AS compensation_intent_status,
       c.idempotency_key AS compensation_key, s.compensation_note
FROM outbox.flow_steps AS s
LEFT JOIN outbox.payment_intents AS i ON i.id = s.intent_id
LEFT JOIN outbox.payment_intents AS c ON c.id = s.compensation_intent_id
WHERE s.flow_id = %(id)s::bigint
ORDER BY s.seq;

-- name: flow_history
-- One flow's audit trail (its steps are in its document), oldest first.
SELECT a.at, a.actor, a.entity, a.entity_id, a.operation, a.reason, a.before, a.after
FROM outbox.audit_log AS a
WHERE a.entity = 'flow' AND a.entity_id = %(id)s::bigint::text
ORDER BY a.chain_seq;

-- name: authorization_policies_list
-- The providers' policies for authorisations no flow covers (sql/0084), with how many are aged and uncovered now.
WITH uncovered AS (
    SELECT u.provider, count(*) AS n FROM outbox.uncovered_authorizations_v2(NULL) AS u
    GROUP BY u.provider
)
SELECT a.provider, a.action, a.after_seconds, a.reason, a.updated_by, a.updated_at,
       COALESCE(uncovered.n, 0) AS uncovered_now
FROM outbox.authorization_policies AS a
LEFT JOIN uncovered ON uncovered.provider = a.provider
ORDER BY a.provider;

-- name: authorization_policy_set
-- Set a provider's policy for authorisations no flow covers as an operator (audited, entity authorization_policy).
SELECT provider, action, after_seconds, reason, updated_by, updated_at
FROM outbox.authorization_policy_set_v1(%(operator)s, %(provider)s, %(action)s,
                                        %(after_seconds)s, %(reason)s);

-- ------------------------------------------------------------------------------------------
-- Flow deadlines and uncovered authorisations (sql/0083, sql/0084; relay/service/flow_sweep.py)
-- ------------------------------------------------------------------------------------------

-- name: flow_sweep
-- Enforce flow deadlines, then the per-provider void policy, as relay:<instance>: how many flows were advanced and voids inserted, and the aged authorisations no flow covers that stay after it, per provider and policy (parallel arrays; the gauge outbox_relay_uncovered_authorizations).
WITH actor AS MATERIALIZED (
    SELECT set_config('outbox.actor', 'relay:' || %(instance)s::text, true) AS actor
)
SELECT x.flows, (x.a).voids, (x.a).providers, (x.a).policies, (x.a).authorizations
FROM (
    -- In this order (flows first: a compensation's void covers its payment), each once:
    -- OFFSET 0 keeps the record from being expanded into one call per column.
    SELECT outbox.flow_sweep_v1(%(now)s::timestamptz, %(limit)s::integer) AS flows,
           outbox.authorization_sweep_v2(%(now)s::timestamptz, %(limit)s::integer) AS a
    FROM actor
    OFFSET 0
) AS x;

-- name: flow_cancel
-- An operator cancels a running flow: it compensates (sql/0085; a cancel that refunds needs a second operator).
SELECT id, flow_key, state, reason FROM outbox.flow_cancel_v1(%(operator)s, %(id)s, %(reason)s);

-- name: flow_retry_step
-- An operator re-drives a flow's dead step or dead compensation under its own key (sql/0085).
SELECT id, flow_key, state, reason
FROM outbox.flow_retry_step_v1(%(operator)s, %(id)s, %(seq)s, %(reason)s);

-- name: flow_mark_compensated
-- An operator records a failed compensation as done by hand (sql/0085; needs a second operator's approval).
SELECT id, flow_key, state, reason
FROM outbox.flow_mark_compensated_v1(%(operator)s, %(id)s, %(seq)s, %(reason)s);
