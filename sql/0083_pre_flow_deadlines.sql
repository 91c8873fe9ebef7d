-- Flows, issue 21 step 2: deadlines (docs/flows.md, "Deadlines").
--
-- A flow may declare a deadline for itself (flow_start_v1's fourth argument,
-- p_within_seconds) and for each step (the step's `within_seconds`), both counted from the
-- flow's start: "capture within 7 days or void", since card authorisations expire at the
-- provider (Stripe's default hold is seven days). When a step's deadline passes before the
-- step succeeded (or the flow's own passes with any step unfinished) the flow compensates as
-- if a step had failed: waiting steps are skipped, unsent ones withdrawn, started ones
-- settled first, then what took effect is undone in reverse order. Its reason names the
-- deadline missed. Nothing fires on its own in PostgreSQL: the relay's flow sweeper
-- (relay/service/flow_sweep.py) calls outbox.flow_sweep_v1 every few seconds, which advances
-- each running flow whose next deadline passed, under the flow's lock, as any advance:
-- audited in the flow's hash chain, one result event per transition. A write-back that
-- advances a flow past its deadline enforces it as well.
--
-- Replaced whole (each change marked `sql/0083`):
--   outbox.flow_doc            (sql/0072) shows the deadlines;
--   outbox.flow_advance        (sql/0072) enforces them, takes p_now (the sweep's clock),
--                              keeps flows.next_deadline, and compensates a flow whose
--                              stop_reason is set (a deadline here, an operator's cancel in
--                              sql/0085); its signature gains p_now, so it is dropped first;
--   outbox.flow_start_v1       (sql/0072) takes the deadlines; its signature gains
--                              p_within_seconds (DEFAULT NULL: every existing call still
--                              works), so it is dropped and created again with its grant.
-- flow_audit_doc is unchanged, so existing flows' chains still verify: a deadline shows in
-- the audit trail as the reason of the transition it caused.

ALTER TABLE outbox.flows
    ADD COLUMN deadline timestamptz,
    ADD COLUMN next_deadline timestamptz,
    ADD COLUMN stop_reason text;
ALTER TABLE outbox.flow_steps
    ADD COLUMN deadline timestamptz;

COMMENT ON COLUMN outbox.flows.deadline IS 'The flow''s own deadline (flow_start_v1''s p_within_seconds after its start): passed with any step unfinished, the flow compensates.';
COMMENT ON COLUMN outbox.flows.next_deadline IS 'For a running flow, the earliest deadline it can still miss (its own, or an unfinished step''s); the sweep (outbox.flow_sweep_v1) looks for the ones passed. NULL: none.';
COMMENT ON COLUMN outbox.flows.stop_reason IS 'Why the flow compensates when no step failed: a deadline missed, or an operator''s cancel (sql/0085).';
COMMENT ON COLUMN outbox.flow_steps.deadline IS 'The step''s deadline (its within_seconds after the flow''s start): passed before the step succeeded, the flow compensates.';

CREATE INDEX flows_next_deadline_idx ON outbox.flows (next_deadline)
    WHERE state = 'running' AND next_deadline IS NOT NULL;

DROP FUNCTION outbox.flow_advance(bigint, boolean);
DROP FUNCTION outbox.flow_start_v1(text, jsonb, jsonb);

-- The flow as its events and `outbox-relay flows show` present it.
CREATE OR REPLACE FUNCTION outbox.flow_doc(p_flow_id bigint) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT jsonb_build_object(
        'id', f.id, 'flow_key', f.flow_key, 'state', f.state, 'reason', f.reason,
        'failed_step', f.failed_step, 'metadata', f.metadata,
        'deadline', f.deadline,  -- sql/0083
        'steps', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                'seq', s.seq, 'depends_on', to_jsonb(s.depends_on), 'payment_id', s.payment_id,
                'action', s.action, 'provider', s.provider, 'amount_minor', s.amount_minor,
                'currency', s.currency, 'status', s.status, 'intent_id', s.intent_id,
                'amount_applied_minor', s.amount_applied_minor, 'error_code', s.error_code,
                'compensation', s.compensation, 'compensation_status', s.compensation_status,
                'compensation_intent_id', s.compensation_intent_id,
                'compensation_note', s.compensation_note,
                'deadline', s.deadline) ORDER BY s.seq)  -- sql/0083: deadline
            FROM outbox.flow_steps AS s WHERE s.flow_id = f.id), '[]'::jsonb))
    FROM outbox.flows AS f
    WHERE f.id = p_flow_id);
END;
$$;

-- Bring one flow up to date with its intents, under its row lock; insert what is due.
-- Idempotent: it derives everything from the intents' states and the flow's rows, so a
-- second call (another trigger, a retried transaction) finds nothing more to do.
CREATE FUNCTION outbox.flow_advance(p_flow_id bigint, p_strict boolean DEFAULT false,
                                    p_now timestamptz DEFAULT NULL) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    f          outbox.flows;
    s          outbox.flow_steps;
    v_id       bigint;
    v_state    text;
    v_reason   text;
    v_failed   integer;
    v_event    uuid;
    v_prev_reason text := current_setting('outbox.reason', true);
    v_before   jsonb;
    -- sql/0083: why the flow compensates when no step failed (a deadline, an operator's
    -- cancel), and when its next deadline falls
    v_now      timestamptz := coalesce(p_now, now());
    v_stop     text;
    v_next     timestamptz;
BEGIN
    SELECT * INTO f FROM outbox.flows AS x WHERE x.id = p_flow_id FOR UPDATE;
    IF NOT FOUND OR f.state IN ('completed', 'compensated') THEN
        RETURN;
    END IF;
    v_state := f.state;
    v_reason := f.reason;
    v_failed := f.failed_step;
    v_stop := f.stop_reason;
    -- A flow being started is audited whole by flow_start_v1 once it is in place.
    IF NOT p_strict THEN
        v_before := outbox.flow_audit_doc(f.id);
    END IF;

    PERFORM outbox.flow_refresh(f.id);

    -- sql/0083: a deadline passed with its step (or, for the flow's own, any step) not
    -- succeeded: the flow compensates, and starts nothing more.
    IF v_state = 'running' AND v_stop IS NULL AND f.next_deadline <= v_now THEN
        SELECT * INTO s FROM outbox.flow_steps AS x
        WHERE x.flow_id = f.id AND x.status <> 'succeeded' AND x.deadline <= v_now
        ORDER BY x.deadline, x.seq LIMIT 1;
        IF FOUND THEN
            v_stop := format('step %s (%s of payment %s) missed its deadline %s', s.seq, s.action,
                             s.payment_id, to_char(s.deadline AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'));
            v_failed := s.seq;
        ELSIF f.deadline <= v_now AND EXISTS (SELECT 1 FROM outbox.flow_steps AS x
                                              WHERE x.flow_id = f.id AND x.status <> 'succeeded') THEN
            v_stop := format('the flow missed its deadline %s',
                             to_char(f.deadline AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'));
        END IF;
    END IF;

    IF v_state = 'running' THEN
        -- Start every waiting step whose dependencies all succeeded, in step order.
        IF v_stop IS NULL AND NOT EXISTS (SELECT 1 FROM outbox.flow_steps AS x WHERE x.flow_id = f.id AND x.status = 'failed') THEN
            FOR s IN
                SELECT * FROM outbox.flow_steps AS w
                WHERE w.flow_id = f.id AND w.status = 'waiting'
                  AND NOT EXISTS (SELECT 1 FROM outbox.flow_steps AS d
                                  WHERE d.flow_id = w.flow_id AND d.seq = ANY (w.depends_on)
                                    AND d.status <> 'succeeded')
                ORDER BY w.seq
            LOOP
                v_id := outbox.flow_insert_intent(f, s, 'step', p_strict);
                IF v_id IS NULL THEN
                    EXIT;  -- refused: recorded 'failed' on the step
                END IF;
                UPDATE outbox.flow_steps AS u
                SET status = 'started', intent_id = v_id, updated_at = now()
                WHERE u.id = s.id;
            END LOOP;
        END IF;
        SELECT * INTO s FROM outbox.flow_steps AS x
        WHERE x.flow_id = f.id AND x.status = 'failed' ORDER BY x.seq LIMIT 1;
        IF FOUND THEN
            v_state := 'compensating';
            v_failed := s.seq;
            v_reason := format('step %s (%s of payment %s) failed: %s', s.seq, s.action,
                               s.payment_id, coalesce(s.error_code, 'declined'));
            UPDATE outbox.flow_steps AS u SET status = 'skipped', updated_at = now()
            WHERE u.flow_id = f.id AND u.status = 'waiting';
        ELSIF v_stop IS NOT NULL THEN
            -- sql/0083: a deadline or an operator's cancel; the waiting steps never start.
            v_state := 'compensating';
            v_reason := v_stop;
            UPDATE outbox.flow_steps AS u SET status = 'skipped', updated_at = now()
            WHERE u.flow_id = f.id AND u.status = 'waiting';
        ELSIF NOT EXISTS (SELECT 1 FROM outbox.flow_steps AS x
                          WHERE x.flow_id = f.id AND x.status <> 'succeeded') THEN
            v_state := 'completed';
            v_reason := NULL;
        END IF;
    END IF;

    IF v_state IN ('compensating', 'needs_operator') THEN
        IF outbox.flow_withdraw_unsent(f.id, coalesce(v_reason, 'compensating')) > 0 THEN
            PERFORM outbox.flow_refresh(f.id);
        END IF;
        SELECT c.next_state, c.next_reason INTO v_state, v_reason FROM outbox.flow_compensate(f) AS c;
        IF v_reason IS NULL AND v_stop IS NOT NULL THEN
            v_reason := v_stop;  -- sql/0083: the deadline or the cancel that started it
        ELSIF v_reason IS NULL THEN
            -- compensating or compensated: the reason stays the failure that started it
            SELECT format('step %s (%s of payment %s) failed: %s', x.seq, x.action, x.payment_id,
                          coalesce(x.error_code, 'declined'))
            INTO v_reason
            FROM outbox.flow_steps AS x WHERE x.flow_id = f.id AND x.seq = v_failed;
        END IF;
    END IF;

    -- sql/0083: the next deadline a running flow can still miss (the sweep's index).
    IF v_state = 'running' AND f.next_deadline IS NOT NULL THEN
        -- (least ignores NULLs: a flow's own deadline counts while any step is unfinished)
        SELECT least(min(x.deadline), CASE WHEN count(*) > 0 THEN f.deadline END) INTO v_next
        FROM outbox.flow_steps AS x WHERE x.flow_id = f.id AND x.status <> 'succeeded';
    END IF;
    IF v_state IS DISTINCT FROM f.state OR v_reason IS DISTINCT FROM f.reason
       OR v_stop IS DISTINCT FROM f.stop_reason OR v_next IS DISTINCT FROM f.next_deadline THEN
        UPDATE outbox.flows AS x
        SET state = v_state, reason = v_reason, failed_step = v_failed, updated_at = now(),
            finished_at = CASE WHEN v_state IN ('completed', 'compensated') THEN now() END,
            stop_reason = v_stop, next_deadline = v_next
        WHERE x.id = f.id;
    END IF;
    IF NOT p_strict THEN
        -- The audit row of a transition gives the flow's reason as its own.
        IF v_state IS DISTINCT FROM f.state THEN
            PERFORM set_config('outbox.reason', coalesce(v_reason, 'flow ' || v_state), true);
        END IF;
        PERFORM outbox.flow_audit_change(f.id, v_before);
        PERFORM set_config('outbox.reason', coalesce(v_prev_reason, ''), true);
    END IF;
    IF v_state IS DISTINCT FROM f.state THEN
        -- One result event per transition, in the flow's own stream: the application
        -- learns the outcome from one message.
        v_event := outbox.new_event_id();
        INSERT INTO outbox.events (event_id, ordering_key, routing_key, event_type, payload)
        VALUES (v_event, 'flow:' || f.id, 'flow.' || v_state, 'flow.' || v_state,
                jsonb_build_object('event_id', v_event, 'event_type', 'flow.' || v_state,
                                   'occurred_at', now(), 'previous_state', f.state,
                                   'flow', outbox.flow_doc(f.id)));
    END IF;
END;
$$;

-- Start a flow in the caller's transaction; return its id (see sql/0072; sql/0083 adds the
-- deadlines: p_within_seconds for the flow, within_seconds for a step).
CREATE FUNCTION outbox.flow_start_v1(p_flow_key text, p_steps jsonb, p_metadata jsonb DEFAULT '{}'::jsonb,
                                     p_within_seconds integer DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_flow   bigint;
    v_step   jsonb;
    v_n      integer;
    v_bad    text;
    v_action text;
    v_row    outbox.flow_steps;
    v_intent outbox.payment_intents;
BEGIN
    IF p_steps IS NULL OR jsonb_typeof(p_steps) <> 'array'
       OR jsonb_array_length(p_steps) NOT BETWEEN 1 AND 50 THEN
        PERFORM outbox.refuse_input('flows', 'steps', 'flows_steps_array_of_1_to_50',
            'must be a JSON array of 1 to 50 steps',
            'Pass the steps as a jsonb array, step 1 first.');
    END IF;
    IF outbox.may_hold_card_number(concat_ws('|', p_flow_key, p_steps::text, p_metadata::text))
       AND outbox.contains_card_number(concat_ws('|', p_flow_key, p_steps::text, p_metadata::text))
    THEN
        PERFORM outbox.refuse_input('flows', 'steps', 'flows_no_card_number',
            'holds a card-like number: 13 to 19 digits in a row passing the Luhn check',
            'Pass a payment method token, never a card number.');
    END IF;
    IF p_metadata IS NULL OR jsonb_typeof(p_metadata) <> 'object' THEN
        PERFORM outbox.refuse_input('flows', 'metadata', 'flows_metadata_is_object',
            'must be a JSON object');
    END IF;

    -- sql/0083: the flow's own deadline
    IF p_within_seconds IS NOT NULL AND p_within_seconds NOT BETWEEN 1 AND 31622400 THEN
        PERFORM outbox.refuse_input('flows', 'within_seconds', 'flows_within_seconds_1_to_366_days',
            'must be a whole number of seconds from 1 to 31622400 (366 days)',
            'Stripe''s default authorisation hold is 7 days: 604800.');
    END IF;

    INSERT INTO outbox.flows (flow_key, metadata, created_by, deadline)
    VALUES (p_flow_key, p_metadata, outbox.audit_actor(),
            now() + make_interval(secs => p_within_seconds))
    RETURNING id INTO v_flow;

    FOR v_step, v_n IN SELECT e, o::integer FROM jsonb_array_elements(p_steps) WITH ORDINALITY AS x(e, o) LOOP
        IF jsonb_typeof(v_step) <> 'object' THEN
            PERFORM outbox.refuse_input('flow_steps', 'step', 'flow_steps_step_is_object',
                format('step %s must be a JSON object', v_n));
        END IF;
        SELECT k INTO v_bad FROM jsonb_object_keys(v_step) AS k
        WHERE k NOT IN ('payment_id', 'action', 'provider', 'amount_minor', 'currency',
                        'payment_method', 'metadata', 'depends_on', 'compensation',
                        'within_seconds')  -- sql/0083
        ORDER BY k LIMIT 1;
        IF v_bad IS NOT NULL THEN
            PERFORM outbox.refuse_input('flow_steps', 'step', 'flow_steps_known_fields',
                format('step %s has an unknown field %s', v_n, quote_literal(left(v_bad, 40))),
                'Fields: payment_id, action, provider, amount_minor, currency, payment_method, '
                'metadata, depends_on, compensation, within_seconds.');
        END IF;
        IF jsonb_typeof(v_step -> 'amount_minor') NOT IN ('number', 'null')
           OR (jsonb_typeof(v_step -> 'amount_minor') = 'number'
               AND (v_step ->> 'amount_minor') !~ '^-?[0-9]{1,18}$') THEN
            PERFORM outbox.refuse_input('flow_steps', 'amount_minor', 'flow_steps_amount_minor_integer',
                format('of step %s must be an integer number of minor units', v_n));
        END IF;
        IF v_step ? 'depends_on' AND (jsonb_typeof(v_step -> 'depends_on') <> 'array'
           OR jsonb_path_exists(v_step -> 'depends_on', 'strict $[*] ? (@.type() != "number" || @ != @.floor())')) THEN
            PERFORM outbox.refuse_input('flow_steps', 'depends_on', 'flow_steps_depends_on_step_numbers',
                format('of step %s must be an array of step numbers', v_n));
        END IF;
        -- sql/0083: the step's deadline, in seconds from the flow's start
        IF jsonb_typeof(v_step -> 'within_seconds') NOT IN ('number', 'null')
           OR (jsonb_typeof(v_step -> 'within_seconds') = 'number'
               AND ((v_step ->> 'within_seconds') !~ '^[0-9]{1,8}$'
                    OR (v_step ->> 'within_seconds')::integer NOT BETWEEN 1 AND 31622400)) THEN
            PERFORM outbox.refuse_input('flow_steps', 'within_seconds', 'flow_steps_within_seconds_1_to_366_days',
                format('of step %s must be a whole number of seconds from 1 to 31622400 (366 days)', v_n),
                'Stripe''s default authorisation hold is 7 days: 604800.');
        END IF;
        IF jsonb_typeof(v_step -> 'metadata') NOT IN ('object', 'null') THEN
            PERFORM outbox.refuse_input('flow_steps', 'metadata', 'flow_steps_metadata_is_object',
                format('of step %s must be a JSON object', v_n));
        END IF;
        v_action := v_step ->> 'action';
        INSERT INTO outbox.flow_steps AS fs (flow_id, seq, depends_on, payment_id, action, provider,
                                       amount_minor, currency, payment_method, metadata,
                                       compensation, deadline)
        VALUES (v_flow, v_n,
                coalesce(ARRAY(SELECT d::integer FROM jsonb_array_elements_text(v_step -> 'depends_on') AS d),
                         '{}'),
                v_step ->> 'payment_id', v_action, v_step ->> 'provider',
                (v_step ->> 'amount_minor')::bigint, upper(v_step ->> 'currency'),
                v_step ->> 'payment_method', coalesce(v_step -> 'metadata', '{}'::jsonb),
                coalesce(v_step ->> 'compensation',
                         CASE WHEN v_action = 'authorize' THEN 'void'
                              WHEN v_action IN ('capture', 'charge') THEN 'refund'
                              ELSE 'none' END),
                now() + make_interval(secs => (v_step ->> 'within_seconds')::integer))
        RETURNING * INTO v_row;
        -- Every rule an intent's INSERT applies to its own columns (hostile input, the
        -- payment method, traceparent), now, with the intent's own constraint names: a
        -- later step is not refused for its input when it starts, long after this commit.
        v_intent := NULL;
        v_intent.payment_id := v_row.payment_id;
        v_intent.action := v_row.action;
        v_intent.provider := coalesce(v_row.provider, 'routed');
        v_intent.amount_minor := v_row.amount_minor;
        v_intent.currency := v_row.currency;
        v_intent.payment_method := v_row.payment_method;
        v_intent.metadata := v_row.metadata;
        v_intent.idempotency_key := outbox.flow_idempotency_key(v_flow, v_n, 'step');
        -- (The INSERT trigger's own pre-filter first: most steps can break no rule.)
        IF outbox.payment_intents_may_break_input_rules(v_intent) THEN
            PERFORM outbox.payment_intents_check_input(v_intent);
        END IF;
    END LOOP;

    -- One payment, one provider and one currency, whichever step names them.
    SELECT s.payment_id INTO v_bad
    FROM outbox.flow_steps AS s WHERE s.flow_id = v_flow
    GROUP BY s.payment_id
    HAVING count(DISTINCT s.currency) > 1 OR count(DISTINCT s.provider) > 1
    ORDER BY s.payment_id LIMIT 1;
    IF v_bad IS NOT NULL THEN
        PERFORM outbox.refuse_input('flow_steps', 'payment_id', 'flow_steps_payment_consistent',
            'names one payment with two providers or two currencies',
            'Every step of one payment_id uses one provider and one currency.');
    END IF;

    -- sql/0083: the first deadline the sweep watches for (flow_advance keeps it current)
    UPDATE outbox.flows AS f
    SET next_deadline = least(f.deadline, (SELECT min(s.deadline) FROM outbox.flow_steps AS s
                                           WHERE s.flow_id = v_flow))
    WHERE f.id = v_flow AND (f.deadline IS NOT NULL OR EXISTS (
        SELECT 1 FROM outbox.flow_steps AS s WHERE s.flow_id = v_flow AND s.deadline IS NOT NULL));

    -- The steps that wait for nothing start now, refused by the INSERT's own rules.
    PERFORM outbox.flow_advance(v_flow, true);
    -- Its audit chain starts with the whole flow as started (the row lock is the INSERT's).
    PERFORM outbox.flow_audit_change(v_flow, NULL);
    RETURN v_flow;
END;
$$;


-- Advance every running flow whose next deadline passed (at most p_limit of them, oldest
-- deadline first); returns how many were advanced. p_now: the clock (tests own it; NULL:
-- now()). SKIP LOCKED: a flow being advanced by a write-back is left to it, and replicas
-- sweep side by side. Each flow is advanced as any write-back advances it, so a deadline is
-- enforced once: the flow leaves `running`, and a second sweep finds it no more.
CREATE FUNCTION outbox.flow_sweep_v1(p_now timestamptz DEFAULT NULL, p_limit integer DEFAULT 100)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id    bigint;
    v_count integer := 0;
BEGIN
    FOR v_id IN
        SELECT f.id FROM outbox.flows AS f
        WHERE f.state = 'running' AND f.next_deadline <= coalesce(p_now, now())
        ORDER BY f.next_deadline
        LIMIT greatest(p_limit, 1)
        FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM outbox.flow_advance(v_id, false, p_now);
        v_count := v_count + 1;
    END LOOP;
    RETURN v_count;
END;
$$;

COMMENT ON FUNCTION outbox.flow_start_v1(text, jsonb, jsonb, integer) IS 'Start a payment flow in the caller''s transaction (docs/flows.md); returns the flow id. Refuses a malformed flow by a named constraint; inserts the steps that depend on nothing as intents. p_within_seconds and each step''s within_seconds: deadlines from the flow''s start (sql/0083).';

REVOKE ALL ON FUNCTION outbox.flow_advance(bigint, boolean, timestamptz),
    outbox.flow_start_v1(text, jsonb, jsonb, integer),
    outbox.flow_sweep_v1(timestamptz, integer)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.flow_start_v1(text, jsonb, jsonb, integer) TO outbox_app;
-- The relay's flow sweeper enforces deadlines (the function advances flows as the owner).
GRANT EXECUTE ON FUNCTION outbox.flow_sweep_v1(timestamptz, integer) TO outbox_relay;
