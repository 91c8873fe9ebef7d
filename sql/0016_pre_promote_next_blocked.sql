-- One rule, one place: "promote the next blocked intent of a payment".
--
-- The rule: a payment's first unresolved intent (the lowest payment_seq among blocked,
-- pending, in_flight and dead), if it is `blocked`, becomes `pending`, due now. Every other
-- intent is left alone, so calling it for a payment whose head is pending, in flight or
-- dead, or that has no unresolved intent, changes nothing; calling it twice promotes once.
--
-- It was written three times: the relay's write-back (relay/infra/queries.sql,
-- complete_intents), the orphan sweep (promote_orphaned_blocked) and the operator's
-- cancel (sql/0006, cancel_dead_intents). The write-back and the cancel promoted "the
-- first blocked intent", the sweep "the first unresolved intent, if blocked"; they agree
-- whenever the intent just ended was the payment's only unblocked unresolved one, which
-- per-payment order guarantees (an intent leaves `blocked` only when every earlier one is
-- resolved, and a resolved intent never becomes unresolved again). The sweep's form is
-- the one that is safe without that argument, so it is the rule.
--
-- Callers hold the payments' row locks (the write-back's lock_payments, the sweep's
-- lock_orphaned_blocked_payments, the cancel's FOR UPDATE), so no intent of these payments
-- is inserted or ended meanwhile. The function is VOLATILE: its UPDATE takes a new
-- snapshot, which sees what its caller's statement already changed (the write-back calls it
-- after its own UPDATE of the finished intents, see complete_intents).
--
-- retry_dead_intents (sql/0006) promotes nothing: it decides the re-driven intent's own
-- status (blocked behind an earlier unresolved intent, else pending), as the insert
-- trigger does, and is left as it is.
--
-- Set-based (an array of payment ids) so the write-back calls it once per batch.
-- Versioned (_v1): applications and operators may come to call it; a changed rule gets a
-- new name, the old one stays until a _post_ migration removes it.

CREATE FUNCTION outbox.promote_next_blocked_v1(payment_ids text[], due_at timestamptz DEFAULT NULL)
RETURNS TABLE (intent_id bigint, payment_id text, provider text)
-- plpgsql, not sql: a sql function with a SET clause is never inlined and is planned again
-- on every call (about 160 us against 38 us on the write-back, measured), while plpgsql
-- keeps the statement's plan for the session. Its statement still takes a new snapshot
-- after the caller's command, as the comment above requires.
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
    IF cardinality(payment_ids) IS NULL OR cardinality(payment_ids) = 0 THEN
        RETURN;  -- a batch of retries finishes no payment
    END IF;
    RETURN QUERY
    UPDATE outbox.payment_intents AS n
    SET status = 'pending',
        available_at = COALESCE(due_at, now()),
        updated_at = COALESCE(due_at, now())
    FROM (
        SELECT (SELECT u.id
                FROM outbox.payment_intents AS u
                WHERE u.payment_id = l.payment_id
                  AND u.status IN ('blocked', 'pending', 'in_flight', 'dead')
                ORDER BY u.payment_seq
                LIMIT 1) AS id
        FROM (SELECT DISTINCT unnest(payment_ids) AS payment_id) AS l
    ) AS head
    WHERE n.id = head.id AND n.status = 'blocked'
    RETURNING n.id, n.payment_id, n.provider;
END;
$$;

COMMENT ON FUNCTION outbox.promote_next_blocked_v1(text[], timestamptz) IS
    'For each payment named: its first unresolved intent (by payment_seq), if blocked, becomes '
    'pending, due at due_at (NULL: now()). Returns the intents promoted. Callers lock the payments first.';

-- Runs with the caller's rights (no SECURITY DEFINER): the relay's column grants of sql/0008
-- (SELECT on intents, UPDATE of status, available_at, updated_at) are what it needs. The
-- relay's write-back and sweep call it; cancel_dead_intents calls it as the schema owner
-- (SECURITY DEFINER), so outbox_operator needs no EXECUTE: an operator changes intents only
-- through the dead-letter functions.
REVOKE ALL ON FUNCTION outbox.promote_next_blocked_v1(text[], timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.promote_next_blocked_v1(text[], timestamptz) TO outbox_relay;

-- The operator's cancel, as sql/0006 wrote it (and sql/0008 made it SECURITY DEFINER with a
-- pinned search_path, restated here: CREATE OR REPLACE resets both), with its promotion now
-- the call above. Its grants (EXECUTE for outbox_operator only) are kept by the REPLACE.
CREATE OR REPLACE FUNCTION outbox.cancel_dead_intents(ids bigint[], operator text, reason text DEFAULT NULL)
RETURNS TABLE (intent_id bigint, payment_id text, status text, promoted_intent_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
        SELECT n.intent_id INTO promoted
        FROM outbox.promote_next_blocked_v1(ARRAY[target.payment_id]) AS n;

        -- The result event, shaped as the relay's write-back shapes it (relay/infra/queries.sql,
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
