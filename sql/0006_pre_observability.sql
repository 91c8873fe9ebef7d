-- Observability and operator tooling: trace context validated at INSERT, a small index for
-- the queue-depth gauges, and the SQL API an operator uses on dead intents.
--
-- Operators call these functions from `outbox-relay dead-letters ...` or from psql:
--
--   SELECT * FROM outbox.retry_dead_intents(ARRAY[42, 43], 'alice');
--   SELECT * FROM outbox.cancel_dead_intents(ARRAY[44], 'alice', 'refunded by hand');
--   SELECT * FROM outbox.intent_history(42);
--
-- Each names its operator: the functions set `outbox.actor` to 'operator:<name>' for the
-- transaction, so the audit trail's triggers (sql/0005) record who acted.

-- 1. Trace context ------------------------------------------------------------------------

-- True for a W3C traceparent of version 00 with a non-zero trace id and parent id.
CREATE FUNCTION outbox.is_valid_traceparent(candidate text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT COALESCE(
        candidate ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
        AND substr(candidate, 4, 32) <> repeat('0', 32)
        AND substr(candidate, 37, 16) <> repeat('0', 16),
        false)
$$;

-- metadata.traceparent, when present, must be a valid traceparent: it is passed to the
-- provider as a header, bound to the relay's logs and copied to result events. Checked by a
-- trigger at INSERT (and on an UPDATE of metadata) rather than a table CHECK, so rows
-- written before this migration are neither scanned nor refused on the relay's updates;
-- the relay drops an invalid value from those rows instead of forwarding it.
CREATE FUNCTION outbox.payment_intents_traceparent_check() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF jsonb_typeof(NEW.metadata) = 'object' AND NEW.metadata ? 'traceparent' AND NOT (
        jsonb_typeof(NEW.metadata -> 'traceparent') = 'string'
        AND outbox.is_valid_traceparent(NEW.metadata ->> 'traceparent')
    ) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'metadata',
            CONSTRAINT = 'payment_intents_traceparent_w3c',
            MESSAGE = 'payment_intents.metadata.traceparent is not a W3C traceparent (value withheld)',
            HINT = 'Use 00-<32 lower-case hex trace id, not all zero>-<16 hex parent id, not all zero>-<2 hex flags>, '
                   'e.g. 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01, or leave traceparent out.';
    END IF;
    RETURN NEW;
END;
$$;

-- Named to fire after the archived-key check and before payment_intents_before_insert
-- (BEFORE triggers run in name order), so a bad traceparent is refused before the
-- payment row is locked.
CREATE TRIGGER payment_intents_b_traceparent_w3c
    BEFORE INSERT OR UPDATE OF metadata ON outbox.payment_intents
    FOR EACH ROW EXECUTE FUNCTION outbox.payment_intents_traceparent_check();

-- 2. Queue depth ----------------------------------------------------------------------------

-- Unresolved intents by provider and status, with available_at for the oldest due pending
-- one: every relay counts these every few seconds (relay/depth.py) from this index alone
-- (an index-only scan once vacuum has marked the pages visible), never touching the
-- finished rows that make up most of the table.
CREATE INDEX payment_intents_depth_idx
    ON outbox.payment_intents (provider, status, available_at)
    WHERE status IN ('blocked', 'pending', 'in_flight', 'dead');

-- 3. Operator actions on dead intents --------------------------------------------------------

-- Validate an operator's name and record it as the transaction's actor; returns the actor.
CREATE FUNCTION outbox.set_operator_actor(operator text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    IF operator IS NULL OR operator !~ '^\S' OR length(operator) > 200 OR operator ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION USING
            ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'operator must name who acts: 1 to 200 printable characters, not starting with a space',
            HINT = 'Pass your user name, e.g. outbox.retry_dead_intents(ARRAY[42], ''alice'').';
    END IF;
    PERFORM set_config('outbox.actor', 'operator:' || operator, true);
    RETURN 'operator:' || operator;
END;
$$;

-- Re-drive dead intents: each goes back to `pending` (due now) with its attempts reset and
-- its error cleared, under the SAME idempotency key, so a provider that already applied it
-- replays the first result. Per-payment order holds: an intent with an earlier unresolved
-- intent of its payment goes to `blocked` instead (the write-back that ends the earlier one
-- promotes it). Ids that are not dead are skipped.
--
-- An intent that was sent and is older than its provider's idempotency-key lifetime
-- (outbox.provider_policies, sql/0005; Stripe: 24 h) may be forgotten by the provider: sent
-- again under its key it could take effect twice. Such an intent stays dead (note
-- 'key_past_lifetime') unless the janitor's lookups found no effect of it since it died
-- (janitor_checks.result 'no_effect'), or the operator passes past_key_lifetime => true
-- after checking at the provider that it took no effect.
--
-- Returns one row per dead intent named: its new status (pending, blocked, or dead when
-- kept) and a note saying why it was kept.
CREATE FUNCTION outbox.retry_dead_intents(
    ids bigint[], operator text, past_key_lifetime boolean DEFAULT false)
RETURNS TABLE (intent_id bigint, payment_id text, status text, note text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    target      record;
    new_status  text;
    moved       boolean := false;
BEGIN
    PERFORM outbox.set_operator_actor(operator);
    -- Payments first, in payment_id order, as the relay's write-back locks them.
    PERFORM 1
    FROM outbox.payments AS p
    WHERE p.payment_id IN (
        SELECT i.payment_id FROM outbox.payment_intents AS i
        WHERE i.id = ANY(ids) AND i.status = 'dead')
    ORDER BY p.payment_id
    FOR UPDATE OF p;
    FOR target IN
        SELECT i.id, i.payment_id, i.payment_seq,
               i.attempts > 0
               AND i.created_at < now() - outbox.idempotency_key_lifetime(i.provider)
               AND NOT EXISTS (
                   SELECT 1 FROM outbox.janitor_checks AS j
                   WHERE j.intent_id = i.id AND j.result = 'no_effect'
                     AND j.dead_at IS NOT DISTINCT FROM i.completed_at) AS key_at_risk
        FROM outbox.payment_intents AS i
        WHERE i.id = ANY(ids) AND i.status = 'dead'
        ORDER BY i.payment_id, i.payment_seq
        FOR UPDATE OF i
    LOOP
        IF target.key_at_risk AND NOT COALESCE(past_key_lifetime, false) THEN
            intent_id := target.id;
            payment_id := target.payment_id;
            status := 'dead';
            note := 'key_past_lifetime';
            RETURN NEXT;
            CONTINUE;
        END IF;
        new_status := CASE WHEN EXISTS (
            SELECT 1 FROM outbox.payment_intents AS e
            WHERE e.payment_id = target.payment_id
              AND e.payment_seq < target.payment_seq
              AND e.status IN ('blocked', 'pending', 'in_flight', 'dead')
        ) THEN 'blocked' ELSE 'pending' END;
        UPDATE outbox.payment_intents AS i
        SET status = new_status,
            attempts = 0,
            available_at = now(),
            lease_token = NULL,
            lease_expires_at = NULL,
            claimed_by = NULL,
            error_code = NULL,
            error_message = NULL,
            completed_at = NULL,
            updated_at = now()
        WHERE i.id = target.id;
        moved := true;
        intent_id := target.id;
        payment_id := target.payment_id;
        status := new_status;
        note := NULL;
        RETURN NEXT;
    END LOOP;
    IF moved THEN
        PERFORM pg_notify('outbox_payment_intents', '');
    END IF;
END;
$$;

-- End dead intents for good: each becomes `failed` with error_code 'cancelled_by_operator'
-- (the reason, if given, in error_message), and the next blocked intent of its payment is
-- promoted to `pending` (the rule the relay's write-back follows when an intent fails). A
-- result event `payment.<action>.failed` is recorded, as for any failure. The payment's
-- state is not changed: if the provider may have applied the intent, settle that with the
-- provider first. Ids that are not dead are skipped. Returns one row per intent ended.
CREATE FUNCTION outbox.cancel_dead_intents(ids bigint[], operator text, reason text DEFAULT NULL)
RETURNS TABLE (intent_id bigint, payment_id text, status text, promoted_intent_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    actor     text;
    target    record;
    promoted  bigint;
    message   text;
    ended     boolean := false;
BEGIN
    actor := outbox.set_operator_actor(operator);
    IF reason IS NOT NULL AND length(reason) > 300 THEN
        RAISE EXCEPTION USING
            ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('reason is %s characters long; at most 300', length(reason));
    END IF;
    message := 'cancelled by ' || actor || COALESCE(': ' || NULLIF(btrim(reason), ''), '');
    PERFORM 1
    FROM outbox.payments AS p
    WHERE p.payment_id IN (
        SELECT i.payment_id FROM outbox.payment_intents AS i
        WHERE i.id = ANY(ids) AND i.status = 'dead')
    ORDER BY p.payment_id
    FOR UPDATE OF p;
    FOR target IN
        SELECT i.id, i.payment_id
        FROM outbox.payment_intents AS i
        WHERE i.id = ANY(ids) AND i.status = 'dead'
        ORDER BY i.payment_id, i.payment_seq
        FOR UPDATE OF i
    LOOP
        -- The audit trail records why (sql/0005 reads outbox.reason).
        PERFORM set_config('outbox.reason',
                           COALESCE(NULLIF(btrim(reason), ''), 'cancelled by operator'), true);
        UPDATE outbox.payment_intents AS i
        SET status = 'failed',
            lease_token = NULL,
            lease_expires_at = NULL,
            claimed_by = NULL,
            error_code = 'cancelled_by_operator',
            error_message = message,
            completed_at = now(),
            updated_at = now()
        WHERE i.id = target.id;

        promoted := NULL;
        PERFORM set_config('outbox.reason',
                           format('promoted: intent %s before it was cancelled', target.id), true);
        UPDATE outbox.payment_intents AS n
        SET status = 'pending', available_at = now(), updated_at = now()
        WHERE n.id = (
            SELECT b.id FROM outbox.payment_intents AS b
            WHERE b.payment_id = target.payment_id AND b.status = 'blocked'
            ORDER BY b.payment_seq
            LIMIT 1)
        RETURNING n.id INTO promoted;

        -- The result event, shaped as the relay's write-back shapes it (relay/queries.sql,
        -- complete_intents), so consumers learn the intent ended.
        INSERT INTO outbox.events
            (event_id, ordering_key, routing_key, event_type, payload, payment_id, traceparent)
        SELECT e.event_id, 'payment:' || i.payment_id, e.event_type, e.event_type,
               jsonb_build_object(
                   'event_id', e.event_id,
                   'event_type', e.event_type,
                   'occurred_at', now(),
                   'payment_id', i.payment_id,
                   'intent', jsonb_build_object(
                       'id', i.id,
                       'action', i.action,
                       'status', i.status,
                       'provider', i.provider,
                       'currency', i.currency,
                       'amount_minor', i.amount_minor,
                       'amount_applied_minor', i.amount_applied_minor,
                       'provider_reference', i.provider_reference,
                       'idempotency_key', i.idempotency_key,
                       'attempts', i.attempts,
                       'error_code', i.error_code,
                       'error_message', i.error_message,
                       'metadata', i.metadata),
                   'payment', jsonb_build_object(
                       'state', p.state,
                       'authorized_minor', p.authorized_minor,
                       'captured_minor', p.captured_minor,
                       'refunded_minor', p.refunded_minor,
                       'provider_reference', p.provider_reference)),
               i.payment_id,
               CASE WHEN outbox.is_valid_traceparent(i.metadata ->> 'traceparent')
                    THEN i.metadata ->> 'traceparent' END
        FROM outbox.payment_intents AS i
        JOIN outbox.payments AS p ON p.payment_id = i.payment_id
        CROSS JOIN LATERAL (
            SELECT gen_random_uuid() AS event_id, 'payment.' || i.action || '.failed' AS event_type
        ) AS e
        WHERE i.id = target.id;

        intent_id := target.id;
        payment_id := target.payment_id;
        status := 'failed';
        promoted_intent_id := promoted;
        ended := true;
        RETURN NEXT;
    END LOOP;
    PERFORM set_config('outbox.reason', '', true);
    IF ended THEN
        PERFORM pg_notify('outbox_payment_intents', '');
    END IF;
END;
$$;

-- The audit trail of one intent (sql/0005's outbox.audit_log), oldest first. Raises
-- undefined_table, naming the migration, when the audit trail is not installed.
CREATE FUNCTION outbox.intent_history(intent bigint)
RETURNS TABLE (at timestamptz, actor text, operation text, reason text, before jsonb, after jsonb)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF to_regclass('outbox.audit_log') IS NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'undefined_table',
            MESSAGE = 'no audit trail: outbox.audit_log does not exist (migration 0005 not applied)',
            HINT = 'Run `outbox-relay migrate`.';
    END IF;
    RETURN QUERY EXECUTE
        'SELECT a.at, a.actor::text, a.operation::text, a.reason::text, a.before, a.after
         FROM outbox.audit_log AS a
         WHERE a.entity = ''intent'' AND a.entity_id = $1
         ORDER BY a.id'
        USING intent::text;
END;
$$;
