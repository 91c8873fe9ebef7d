-- Payment flows with compensations (issue 21, docs/flows.md).
--
-- A flow is a set of steps declared in the application's own transaction with
-- `SELECT outbox.flow_start_v1(flow_key, steps, metadata)`. Each step becomes an ordinary
-- outbox.payment_intents row when the steps it depends on have succeeded, so claims,
-- fencing, per-payment order, the janitor, webhooks and awaiting_confirmation apply to it
-- unchanged. The flow advances in the database, in the transaction that changes one of its
-- intents (an AFTER UPDATE trigger on payment_intents, under the flow's row lock): a crash
-- cannot lose an advance, and a compensation cannot be inserted twice (one column per step
-- holds its compensation's intent, and its idempotency key is derived from the flow).

-- ==========================================================================================
-- Tables
-- ==========================================================================================
CREATE TABLE outbox.flows (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    flow_key     text NOT NULL,
    state        text NOT NULL DEFAULT 'running',
    reason       text,
    failed_step  integer,
    metadata     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_by   text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    CONSTRAINT flows_flow_key_unique UNIQUE (flow_key),
    CONSTRAINT flows_flow_key_nonblank_max_200 CHECK (flow_key ~ '\S' AND length(flow_key) <= 200),
    CONSTRAINT flows_state_valid CHECK (state IN ('running', 'completed', 'compensating',
                                                  'compensated', 'needs_operator')),
    CONSTRAINT flows_metadata_is_object CHECK (jsonb_typeof(metadata) = 'object'),
    CONSTRAINT flows_metadata_max_16kb CHECK (pg_column_size(metadata) <= 16384)
) WITH (fillfactor = 80);

COMMENT ON TABLE outbox.flows IS 'Payment flows (docs/flows.md): steps that are intents, each with the compensation that undoes it. Started by outbox.flow_start_v1; advanced by the trigger payment_intents_flows (outbox.flows_follow_intent).';
COMMENT ON COLUMN outbox.flows.state IS 'running: steps are started as their dependencies succeed (a step''s terminal outcome moves it on); completed: every step succeeded (terminal); compensating: a step failed, the compensations of the steps that took effect run in reverse order once no step is unsettled; compensated: every effect undone (terminal); needs_operator: a compensation failed or is dead (reason says which; the operator settles it).';

CREATE INDEX flows_open_idx ON outbox.flows (id)
    WHERE state IN ('running', 'compensating', 'needs_operator');

CREATE TABLE outbox.flow_steps (
    id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    flow_id                 bigint NOT NULL,
    seq                     integer NOT NULL,
    depends_on              integer[] NOT NULL DEFAULT '{}',
    payment_id              text NOT NULL,
    action                  text NOT NULL,
    provider                text,
    amount_minor            bigint,
    currency                text NOT NULL,
    payment_method          text,
    metadata                jsonb NOT NULL DEFAULT '{}'::jsonb,
    compensation            text NOT NULL,
    status                  text NOT NULL DEFAULT 'waiting',
    intent_id               bigint,
    amount_applied_minor    bigint,
    error_code              text,
    compensation_status     text,
    compensation_intent_id  bigint,
    compensation_note       text,
    updated_at              timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT flow_steps_flow_exists FOREIGN KEY (flow_id) REFERENCES outbox.flows (id),
    CONSTRAINT flow_steps_seq_unique UNIQUE (flow_id, seq),
    CONSTRAINT flow_steps_intent_unique UNIQUE (intent_id),
    CONSTRAINT flow_steps_compensation_intent_unique UNIQUE (compensation_intent_id),
    CONSTRAINT flow_steps_seq_positive CHECK (seq > 0),
    -- Every dependency names an earlier step, so a flow has no cycle. (Array operators,
    -- no function call: the CHECK runs again on every UPDATE of the row.)
    CONSTRAINT flow_steps_depends_on_earlier_steps CHECK (
        0 < ALL (depends_on) AND seq > ALL (depends_on) AND cardinality(depends_on) <= 50
        AND array_position(depends_on, NULL) IS NULL),
    CONSTRAINT flow_steps_payment_id_nonblank_max_200 CHECK (payment_id ~ '\S' AND length(payment_id) <= 200),
    CONSTRAINT flow_steps_action_valid CHECK (action IN ('authorize', 'capture', 'charge', 'void', 'refund')),
    CONSTRAINT flow_steps_provider_lowercase_identifier CHECK (provider ~ '^[a-z][a-z0-9_]*$' AND length(provider) <= 63),
    CONSTRAINT flow_steps_amount_minor_positive CHECK (amount_minor > 0 AND amount_minor <= 999999999999),
    CONSTRAINT flow_steps_amount_minor_required_for_authorize_charge
        CHECK (action NOT IN ('authorize', 'charge') OR amount_minor IS NOT NULL),
    CONSTRAINT flow_steps_currency_known FOREIGN KEY (currency) REFERENCES outbox.currencies (code),
    CONSTRAINT flow_steps_payment_method_required_for_authorize_charge
        CHECK (action NOT IN ('authorize', 'charge') OR payment_method IS NOT NULL),
    CONSTRAINT flow_steps_payment_method_token_format
        CHECK (payment_method ~ '^[A-Za-z0-9_]+$' AND length(payment_method) BETWEEN 3 AND 255),
    CONSTRAINT flow_steps_metadata_is_object CHECK (jsonb_typeof(metadata) = 'object'),
    CONSTRAINT flow_steps_compensation_valid CHECK (compensation IN ('void', 'refund', 'none')),
    -- What undoes what: an authorisation is voided, a capture or a charge refunded; a void
    -- or a refund is not undone.
    CONSTRAINT flow_steps_compensation_fits_action CHECK (
        compensation = 'none'
        OR (action = 'authorize' AND compensation = 'void')
        OR (action IN ('capture', 'charge') AND compensation = 'refund')),
    CONSTRAINT flow_steps_status_valid CHECK (status IN ('waiting', 'started', 'dead', 'succeeded',
                                                         'failed', 'skipped')),
    CONSTRAINT flow_steps_started_has_intent CHECK (
        status NOT IN ('started', 'dead', 'succeeded') OR intent_id IS NOT NULL),
    CONSTRAINT flow_steps_compensation_status_valid CHECK (
        compensation_status IN ('not_needed', 'started', 'dead', 'succeeded', 'failed')),
    CONSTRAINT flow_steps_compensation_only_after_effect CHECK (
        compensation_status IS NULL OR status = 'succeeded')
) WITH (fillfactor = 80);

COMMENT ON TABLE outbox.flow_steps IS 'The steps of outbox.flows, one intent each (intent_id, once started) and at most one compensation intent (compensation_intent_id).';
COMMENT ON COLUMN outbox.flow_steps.status IS 'waiting: not started (its dependencies have not all succeeded); started: its intent is unresolved (blocked, pending, in_flight, awaiting_confirmation); dead: its intent is dead (the janitor or an operator settles it; the flow waits); succeeded: took effect; failed: failed for good (declined, refused, cancelled by an operator), or refused when the flow inserted it (error_code); skipped: never started because the flow compensates.';
COMMENT ON COLUMN outbox.flow_steps.compensation_status IS 'NULL: no compensation decided; not_needed: the step''s compensation is none, or a later step of the flow on the same payment superseded it (compensation_note says which); started / dead / succeeded / failed: its compensation intent''s state.';

CREATE INDEX flow_steps_flow_idx ON outbox.flow_steps (flow_id, seq);

-- ==========================================================================================
-- Keys, documents, refusals
-- ==========================================================================================

-- A flow's intents' idempotency keys: stable for a (flow, step, role), unique per
-- installation, spelled as the insert trigger spells derived keys (hex digits as letters,
-- so that no key holds a card-like run of digits).
CREATE FUNCTION outbox.flow_idempotency_key(p_flow_id bigint, p_seq integer, p_role text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    -- PL/pgSQL, not SQL: its query's plan is kept, where a SQL function that cannot be
    -- inlined is planned again on every call (so are flow_doc and flow_audit_doc).
    RETURN 'flow_' || translate(left(encode(sha256(convert_to(
        (SELECT i.installation_id::text FROM outbox.installation AS i)
        || '/flow/' || p_flow_id::text || '/' || p_seq::text || '/' || p_role,
        'UTF8')), 'hex'), 48), '0123456789', 'ghijklmnop');
END;
$$;

-- The flow as its events and `outbox-relay flows show` present it.
CREATE FUNCTION outbox.flow_doc(p_flow_id bigint) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT jsonb_build_object(
        'id', f.id, 'flow_key', f.flow_key, 'state', f.state, 'reason', f.reason,
        'failed_step', f.failed_step, 'metadata', f.metadata,
        'steps', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                'seq', s.seq, 'depends_on', to_jsonb(s.depends_on), 'payment_id', s.payment_id,
                'action', s.action, 'provider', s.provider, 'amount_minor', s.amount_minor,
                'currency', s.currency, 'status', s.status, 'intent_id', s.intent_id,
                'amount_applied_minor', s.amount_applied_minor, 'error_code', s.error_code,
                'compensation', s.compensation, 'compensation_status', s.compensation_status,
                'compensation_intent_id', s.compensation_intent_id,
                'compensation_note', s.compensation_note) ORDER BY s.seq)
            FROM outbox.flow_steps AS s WHERE s.flow_id = f.id), '[]'::jsonb))
    FROM outbox.flows AS f
    WHERE f.id = p_flow_id);
END;
$$;

-- ==========================================================================================
-- Audit: one hash chain per flow (entity 'flow'), its steps inside its document
-- ==========================================================================================

-- The flow as the audit trail records it: its own columns and every step's, text that may
-- come from a provider redacted as an intent's are; like an intent's, its metadata is not
-- in it. One chain per flow, one row per change
-- of the flow or of any of its steps (its start, each advance): a flow costs a hashed row
-- per transaction that moves it, not one per row it touches.
CREATE FUNCTION outbox.flow_audit_doc(p_flow_id bigint) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT jsonb_build_object(
        'id', f.id, 'flow_key', f.flow_key, 'state', f.state,
        'reason', outbox.audit_redact_text(f.reason), 'failed_step', f.failed_step,
        'created_by', f.created_by,
        'steps', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                'seq', s.seq, 'depends_on', to_jsonb(s.depends_on), 'payment_id', s.payment_id,
                'action', s.action, 'provider', s.provider, 'amount_minor', s.amount_minor,
                'currency', s.currency, 'compensation', s.compensation, 'status', s.status,
                'intent_id', s.intent_id, 'amount_applied_minor', s.amount_applied_minor,
                'error_code', outbox.audit_redact_text(s.error_code),
                'compensation_status', s.compensation_status,
                'compensation_intent_id', s.compensation_intent_id,
                'compensation_note', outbox.audit_redact_text(s.compensation_note))
                ORDER BY s.seq)
            FROM outbox.flow_steps AS s WHERE s.flow_id = f.id), '[]'::jsonb))
    FROM outbox.flows AS f
    WHERE f.id = p_flow_id);
END;
$$;

-- Append the flow's audit row: its whole document when p_before is NULL (its start), else
-- the keys that changed since p_before (nothing when none did). The caller holds the
-- flow's row lock, which keeps its chain's tail still (outbox.audit_write).
CREATE FUNCTION outbox.flow_audit_change(p_flow_id bigint, p_before jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_after  jsonb := outbox.flow_audit_doc(p_flow_id);
    v_old    jsonb;
    v_new    jsonb;
BEGIN
    IF p_before IS NULL THEN
        PERFORM outbox.audit_write('flow', p_flow_id::text, NULL, 'insert', NULL, v_after,
                                   outbox.audit_actor());
        RETURN;
    END IF;
    SELECT jsonb_object_agg(a.key, p_before -> a.key), jsonb_object_agg(a.key, a.value)
    INTO v_old, v_new
    FROM jsonb_each(v_after) AS a
    WHERE a.value IS DISTINCT FROM p_before -> a.key;
    IF v_new IS NOT NULL THEN
        PERFORM outbox.audit_write('flow', p_flow_id::text, NULL, 'update', v_old, v_new,
                                   outbox.audit_actor());
    END IF;
END;
$$;

-- ==========================================================================================
-- Starting a step or a compensation: an ordinary intent
-- ==========================================================================================

-- Insert the intent of step `p_step` (role 'step') or of its compensation (role
-- 'compensation'). Returns the intent id, or NULL when the insert was refused and
-- p_strict is false (the refusal is recorded on the step; the flow treats it as a failure).
-- With p_strict (flow_start_v1) a refusal aborts the application's transaction instead.
CREATE FUNCTION outbox.flow_insert_intent(p_flow outbox.flows, p_step outbox.flow_steps,
                                          p_role text, p_strict boolean) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id       bigint;
    v_action   text := CASE WHEN p_role = 'step' THEN p_step.action ELSE p_step.compensation END;
    v_amount   bigint;
    v_key      text := outbox.flow_idempotency_key(p_flow.id, p_step.seq, p_role);
    v_meta     jsonb := p_step.metadata || jsonb_build_object('flow', jsonb_build_object(
                            'id', p_flow.id, 'flow_key', p_flow.flow_key, 'step', p_step.seq,
                            'role', p_role));
    v_provider text := p_step.provider;
    v_state    text;
    v_constraint text;
BEGIN
    IF p_role = 'step' THEN
        v_amount := p_step.amount_minor;
    ELSE
        -- A refund gives back what the step applied (NULL: whatever is still refundable); a
        -- void releases the whole authorisation. The payment's provider: the step's own.
        v_amount := CASE WHEN v_action = 'refund'
                         THEN coalesce(p_step.amount_applied_minor, p_step.amount_minor) END;
        SELECT i.provider INTO v_provider FROM outbox.payment_intents AS i WHERE i.id = p_step.intent_id;
        IF v_provider IS NULL THEN
            SELECT a.provider INTO v_provider FROM outbox.payment_intents_archive AS a
            WHERE a.id = p_step.intent_id;
        END IF;
    END IF;
    IF p_strict THEN
        INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, currency,
                                            payment_method, idempotency_key, metadata)
        VALUES (p_step.payment_id, v_action, v_provider, v_amount, p_step.currency,
                CASE WHEN p_role = 'step' THEN p_step.payment_method END, v_key, v_meta)
        RETURNING id INTO v_id;
        RETURN v_id;
    END IF;
    BEGIN
        INSERT INTO outbox.payment_intents (payment_id, action, provider, amount_minor, currency,
                                            payment_method, idempotency_key, metadata)
        VALUES (p_step.payment_id, v_action, v_provider, v_amount, p_step.currency,
                CASE WHEN p_role = 'step' THEN p_step.payment_method END, v_key, v_meta)
        RETURNING id INTO v_id;
        RETURN v_id;
    EXCEPTION WHEN integrity_constraint_violation OR data_exception OR raise_exception
                   OR no_data_found OR insufficient_privilege
                   OR object_not_in_prerequisite_state THEN
        -- The rules of the insert trigger (the registry, the payment's provider and
        -- currency) can refuse a step started long after the flow: the refusal is the
        -- step's outcome, not the write-back's, which must still commit.
        GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_constraint = CONSTRAINT_NAME;
        IF p_role = 'step' THEN
            UPDATE outbox.flow_steps AS s
            SET status = 'failed',
                error_code = 'refused_at_insert:' || coalesce(nullif(v_constraint, ''), v_state),
                updated_at = now()
            WHERE s.id = p_step.id;
        ELSE
            UPDATE outbox.flow_steps AS s
            SET compensation_status = 'failed',
                compensation_note = 'its ' || v_action || ' was refused at insert: '
                                    || coalesce(nullif(v_constraint, ''), v_state),
                updated_at = now()
            WHERE s.id = p_step.id;
        END IF;
        RETURN NULL;
    END;
END;
$$;

-- ==========================================================================================
-- Advancing a flow
-- ==========================================================================================

-- The compensation phase: settle, then undo in reverse order, one compensation at a time.
-- Returns the flow's next state and its reason (NULL: keep the current reason).
CREATE FUNCTION outbox.flow_compensate(p_flow outbox.flows, OUT next_state text, OUT next_reason text)
LANGUAGE plpgsql AS $$
DECLARE
    s  outbox.flow_steps;
    v_id bigint;
BEGIN
    -- An ambiguous or unsettled step may still take effect: nothing is compensated until
    -- every started step has a known outcome (the janitor, a webhook or an operator settles
    -- a dead or awaiting one).
    IF EXISTS (SELECT 1 FROM outbox.flow_steps AS w
               WHERE w.flow_id = p_flow.id AND w.status IN ('started', 'dead')) THEN
        next_state := 'compensating';
        RETURN;
    END IF;

    -- Steps that need no compensation: those declared 'none', and an authorisation that a
    -- later step of the flow captured or voided (the capture's refund undoes the money; a
    -- second void would be refused by the state machine).
    UPDATE outbox.flow_steps AS u
    SET compensation_status = 'not_needed',
        compensation_note = CASE WHEN u.compensation = 'none' THEN 'declared none' ELSE (
            SELECT 'superseded by step ' || t.seq || ' (' || t.action || ')'
            FROM outbox.flow_steps AS t
            WHERE t.flow_id = u.flow_id AND t.seq > u.seq AND t.payment_id = u.payment_id
              AND t.status = 'succeeded' AND t.action IN ('capture', 'void')
            ORDER BY t.seq LIMIT 1) END,
        updated_at = now()
    WHERE u.flow_id = p_flow.id AND u.status = 'succeeded' AND u.compensation_status IS NULL
      AND (u.compensation = 'none'
           OR (u.compensation = 'void' AND EXISTS (
                   SELECT 1 FROM outbox.flow_steps AS t
                   WHERE t.flow_id = u.flow_id AND t.seq > u.seq AND t.payment_id = u.payment_id
                     AND t.status = 'succeeded' AND t.action IN ('capture', 'void'))));

    LOOP
        SELECT * INTO s FROM outbox.flow_steps AS f
        WHERE f.flow_id = p_flow.id AND f.compensation_status IN ('failed', 'dead')
        ORDER BY f.seq DESC LIMIT 1;
        IF FOUND THEN
            next_state := 'needs_operator';
            next_reason := format('compensation of step %s (%s of payment %s) %s%s: %s', s.seq,
                s.compensation, s.payment_id,
                CASE WHEN s.compensation_status = 'failed' THEN 'failed' ELSE 'is dead' END,
                coalesce(' (' || s.compensation_note || ')', ''),
                CASE WHEN s.compensation_status = 'failed'
                     THEN 'the step''s effect stands; undo it at the provider and record it'
                     ELSE 'the janitor settles it, or re-drive or cancel it (outbox-relay dead-letters)' END);
            RETURN;
        END IF;
        IF EXISTS (SELECT 1 FROM outbox.flow_steps AS w
                   WHERE w.flow_id = p_flow.id AND w.compensation_status = 'started') THEN
            next_state := 'compensating';
            RETURN;
        END IF;
        -- The next compensation: the latest step that took effect and is not yet undone.
        SELECT * INTO s FROM outbox.flow_steps AS f
        WHERE f.flow_id = p_flow.id AND f.status = 'succeeded' AND f.compensation_status IS NULL
        ORDER BY f.seq DESC LIMIT 1;
        IF NOT FOUND THEN
            next_state := 'compensated';
            RETURN;
        END IF;
        v_id := outbox.flow_insert_intent(p_flow, s, 'compensation', false);
        IF v_id IS NOT NULL THEN
            UPDATE outbox.flow_steps AS u
            SET compensation_status = 'started', compensation_intent_id = v_id, updated_at = now()
            WHERE u.id = s.id;
        END IF;
        -- Refused: recorded 'failed' on the step; the loop's next pass names it.
    END LOOP;
END;
$$;

-- Bring a flow's steps up to date with their intents' states (an archived intent ended
-- long ago and was seen then). The caller holds the flow's row lock.
CREATE FUNCTION outbox.flow_refresh(p_flow_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE outbox.flow_steps AS u
    SET status = CASE WHEN i.status IN ('succeeded', 'failed', 'dead') THEN i.status ELSE 'started' END,
        amount_applied_minor = i.amount_applied_minor,
        error_code = i.error_code,
        updated_at = now()
    FROM outbox.payment_intents AS i
    WHERE u.flow_id = p_flow_id AND i.id = u.intent_id AND u.status IN ('started', 'dead')
      AND u.status IS DISTINCT FROM
          CASE WHEN i.status IN ('succeeded', 'failed', 'dead') THEN i.status ELSE 'started' END;
    UPDATE outbox.flow_steps AS u
    SET compensation_status = CASE WHEN i.status IN ('succeeded', 'failed', 'dead') THEN i.status
                                   ELSE 'started' END,
        compensation_note = CASE WHEN i.status IN ('failed', 'dead')
                                 THEN coalesce(i.error_code, i.status) ELSE u.compensation_note END,
        updated_at = now()
    FROM outbox.payment_intents AS i
    WHERE u.flow_id = p_flow_id AND i.id = u.compensation_intent_id
      AND u.compensation_status IN ('started', 'dead')
      AND u.compensation_status IS DISTINCT FROM
          CASE WHEN i.status IN ('succeeded', 'failed', 'dead') THEN i.status ELSE 'started' END;

END;
$$;

-- A compensating flow's steps that were inserted but never sent (pending or blocked, no
-- attempt) fail unsent (error_code flow_compensating), so that nothing is done only to be
-- undone (a capture then its refund). A relay's claim holds the row's lock: a step being
-- claimed now is left alone, and settled like any other. Each one ends as an operator's
-- cancel ends an intent: its result event, and its payment's next intent promoted.
CREATE FUNCTION outbox.flow_withdraw_unsent(p_flow_id bigint, p_reason text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    target    record;
    v_count   integer := 0;
    v_payments text[] := '{}';
BEGIN
    -- The payments first, in order, as a write-back locks them: promotion reads under them.
    PERFORM 1 FROM outbox.payments AS p
    WHERE p.payment_id IN (
        SELECT s.payment_id FROM outbox.flow_steps AS s
        JOIN outbox.payment_intents AS i ON i.id = s.intent_id
        WHERE s.flow_id = p_flow_id AND s.status = 'started'
          AND i.status IN ('pending', 'blocked') AND i.attempts = 0)
    ORDER BY p.payment_id
    FOR UPDATE OF p;
    -- This function advances the flow itself: the trigger must not re-enter it.
    PERFORM set_config('outbox.flow_advancing', p_flow_id::text, true);
    FOR target IN
        UPDATE outbox.payment_intents AS i
        SET status = 'failed',
            error_code = 'flow_compensating',
            error_message = left('never sent: its flow compensates (' || p_reason || ')', 500),
            completed_at = now(),
            updated_at = now()
        FROM outbox.flow_steps AS s
        WHERE s.flow_id = p_flow_id AND s.status = 'started' AND i.id = s.intent_id
          AND i.status IN ('pending', 'blocked') AND i.attempts = 0
        RETURNING i.id, i.payment_id
    LOOP
        v_count := v_count + 1;
        v_payments := v_payments || target.payment_id;
        -- The result event, shaped as the relay's write-back shapes it (complete_intents).
        INSERT INTO outbox.events
            (event_id, ordering_key, routing_key, event_type, payload, payment_id, traceparent)
        SELECT e.event_id, 'payment:' || i.payment_id, e.event_type, e.event_type,
               jsonb_build_object(
                   'event_id', e.event_id,
                   'event_type', e.event_type,
                   'occurred_at', now(),
                   'payment_id', i.payment_id,
                   'intent', jsonb_build_object(
                       'id', i.id, 'action', i.action, 'status', i.status,
                       'provider', i.provider, 'currency', i.currency,
                       'amount_minor', i.amount_minor,
                       'amount_applied_minor', i.amount_applied_minor,
                       'provider_reference', i.provider_reference,
                       'idempotency_key', i.idempotency_key, 'attempts', i.attempts,
                       'error_code', i.error_code, 'error_message', i.error_message,
                       'metadata', i.metadata),
                   'payment', jsonb_build_object(
                       'state', p.state, 'authorized_minor', p.authorized_minor,
                       'captured_minor', p.captured_minor, 'refunded_minor', p.refunded_minor,
                       'provider_reference', p.provider_reference)),
               i.payment_id,
               CASE WHEN outbox.is_valid_traceparent(i.metadata ->> 'traceparent')
                    THEN i.metadata ->> 'traceparent' END
        FROM outbox.payment_intents AS i
        JOIN outbox.payments AS p ON p.payment_id = i.payment_id
        CROSS JOIN LATERAL (
            SELECT outbox.new_event_id() AS event_id, 'payment.' || i.action || '.failed' AS event_type
        ) AS e
        WHERE i.id = target.id;
    END LOOP;
    PERFORM set_config('outbox.flow_advancing', '', true);
    IF v_count > 0 THEN
        PERFORM outbox.promote_next_blocked_v1(v_payments);
    END IF;
    RETURN v_count;
END;
$$;

-- Bring one flow up to date with its intents, under its row lock; insert what is due.
-- Idempotent: it derives everything from the intents' states and the flow's rows, so a
-- second call (another trigger, a retried transaction) finds nothing more to do.
CREATE FUNCTION outbox.flow_advance(p_flow_id bigint, p_strict boolean DEFAULT false) RETURNS void
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
BEGIN
    SELECT * INTO f FROM outbox.flows AS x WHERE x.id = p_flow_id FOR UPDATE;
    IF NOT FOUND OR f.state IN ('completed', 'compensated') THEN
        RETURN;
    END IF;
    v_state := f.state;
    v_reason := f.reason;
    v_failed := f.failed_step;
    -- A flow being started is audited whole by flow_start_v1 once it is in place.
    IF NOT p_strict THEN
        v_before := outbox.flow_audit_doc(f.id);
    END IF;

    PERFORM outbox.flow_refresh(f.id);

    IF v_state = 'running' THEN
        -- Start every waiting step whose dependencies all succeeded, in step order.
        IF NOT EXISTS (SELECT 1 FROM outbox.flow_steps AS x WHERE x.flow_id = f.id AND x.status = 'failed') THEN
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
        IF v_reason IS NULL THEN
            -- compensating or compensated: the reason stays the failure that started it
            SELECT format('step %s (%s of payment %s) failed: %s', x.seq, x.action, x.payment_id,
                          coalesce(x.error_code, 'declined'))
            INTO v_reason
            FROM outbox.flow_steps AS x WHERE x.flow_id = f.id AND x.seq = v_failed;
        END IF;
    END IF;

    IF v_state IS DISTINCT FROM f.state OR v_reason IS DISTINCT FROM f.reason THEN
        UPDATE outbox.flows AS x
        SET state = v_state, reason = v_reason, failed_step = v_failed, updated_at = now(),
            finished_at = CASE WHEN v_state IN ('completed', 'compensated') THEN now() END
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

-- The trigger: every UPDATE that gives a flow's intent a settled state (a write-back, the
-- janitor, the inbox, an operator) advances its flow in the same transaction. A row
-- trigger whose WHEN is decided without calling any function: an intent in no flow (no
-- `flow` key in its metadata, which only the flow's own INSERT writes) and a claim cost
-- nothing here.
CREATE FUNCTION outbox.flows_follow_intent() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
DECLARE
    v_flow bigint;
BEGIN
    SELECT s.flow_id INTO v_flow FROM outbox.flow_steps AS s WHERE s.intent_id = NEW.id;
    IF NOT FOUND THEN
        SELECT s.flow_id INTO v_flow FROM outbox.flow_steps AS s
        WHERE s.compensation_intent_id = NEW.id;
    END IF;
    -- flow_withdraw_unsent ends a flow's intents while advancing that flow itself.
    IF v_flow IS NOT NULL
       AND v_flow::text IS DISTINCT FROM nullif(current_setting('outbox.flow_advancing', true), '') THEN
        PERFORM outbox.flow_advance(v_flow, false);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER payment_intents_flows AFTER UPDATE OF status ON outbox.payment_intents
    FOR EACH ROW
    WHEN (NEW.status IN ('succeeded', 'failed', 'dead') AND OLD.status IS DISTINCT FROM NEW.status
          AND NEW.metadata ? 'flow')
    EXECUTE FUNCTION outbox.flows_follow_intent();

-- ==========================================================================================
-- The application's API
-- ==========================================================================================

-- Start a flow in the caller's transaction; return its id. `p_steps` is a JSON array of
-- steps (step n is element n, from 1): {payment_id, action, provider, amount_minor,
-- currency, payment_method, metadata, depends_on: [step numbers], compensation:
-- 'void' | 'refund' | 'none' (default: void for authorize, refund for capture and charge,
-- none otherwise)}. The steps that depend on nothing are inserted as intents at once, by
-- the same rules as any INSERT; a malformed flow is refused by a named constraint.
CREATE FUNCTION outbox.flow_start_v1(p_flow_key text, p_steps jsonb, p_metadata jsonb DEFAULT '{}'::jsonb)
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

    INSERT INTO outbox.flows (flow_key, metadata, created_by)
    VALUES (p_flow_key, p_metadata, outbox.audit_actor())
    RETURNING id INTO v_flow;

    FOR v_step, v_n IN SELECT e, o::integer FROM jsonb_array_elements(p_steps) WITH ORDINALITY AS x(e, o) LOOP
        IF jsonb_typeof(v_step) <> 'object' THEN
            PERFORM outbox.refuse_input('flow_steps', 'step', 'flow_steps_step_is_object',
                format('step %s must be a JSON object', v_n));
        END IF;
        SELECT k INTO v_bad FROM jsonb_object_keys(v_step) AS k
        WHERE k NOT IN ('payment_id', 'action', 'provider', 'amount_minor', 'currency',
                        'payment_method', 'metadata', 'depends_on', 'compensation')
        ORDER BY k LIMIT 1;
        IF v_bad IS NOT NULL THEN
            PERFORM outbox.refuse_input('flow_steps', 'step', 'flow_steps_known_fields',
                format('step %s has an unknown field %s', v_n, quote_literal(left(v_bad, 40))),
                'Fields: payment_id, action, provider, amount_minor, currency, payment_method, '
                'metadata, depends_on, compensation.');
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
        IF jsonb_typeof(v_step -> 'metadata') NOT IN ('object', 'null') THEN
            PERFORM outbox.refuse_input('flow_steps', 'metadata', 'flow_steps_metadata_is_object',
                format('of step %s must be a JSON object', v_n));
        END IF;
        v_action := v_step ->> 'action';
        INSERT INTO outbox.flow_steps AS fs (flow_id, seq, depends_on, payment_id, action, provider,
                                       amount_minor, currency, payment_method, metadata,
                                       compensation)
        VALUES (v_flow, v_n,
                coalesce(ARRAY(SELECT d::integer FROM jsonb_array_elements_text(v_step -> 'depends_on') AS d),
                         '{}'),
                v_step ->> 'payment_id', v_action, v_step ->> 'provider',
                (v_step ->> 'amount_minor')::bigint, upper(v_step ->> 'currency'),
                v_step ->> 'payment_method', coalesce(v_step -> 'metadata', '{}'::jsonb),
                coalesce(v_step ->> 'compensation',
                         CASE WHEN v_action = 'authorize' THEN 'void'
                              WHEN v_action IN ('capture', 'charge') THEN 'refund'
                              ELSE 'none' END))
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

    -- The steps that wait for nothing start now, refused by the INSERT's own rules.
    PERFORM outbox.flow_advance(v_flow, true);
    -- Its audit chain starts with the whole flow as started (the row lock is the INSERT's).
    PERFORM outbox.flow_audit_change(v_flow, NULL);
    RETURN v_flow;
END;
$$;

COMMENT ON FUNCTION outbox.flow_start_v1(text, jsonb, jsonb) IS 'Start a payment flow in the caller''s transaction (docs/flows.md); returns the flow id. Refuses a malformed flow by a named constraint; inserts the steps that depend on nothing as intents.';

-- ==========================================================================================
-- Deletion refused (the audit trail compares each flow's chain with its live row)
-- ==========================================================================================
CREATE TRIGGER flows_no_delete BEFORE DELETE OR TRUNCATE ON outbox.flows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.refuse_change();
CREATE TRIGGER flow_steps_no_delete BEFORE DELETE OR TRUNCATE ON outbox.flow_steps
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.refuse_change();

-- ==========================================================================================
-- Privileges (sql/0008: nothing for PUBLIC; each role its own)
-- ==========================================================================================
REVOKE ALL ON outbox.flows, outbox.flow_steps FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.flow_idempotency_key(bigint, integer, text),
    outbox.flow_doc(bigint),
    outbox.flow_audit_doc(bigint),
    outbox.flow_audit_change(bigint, jsonb),
    outbox.flow_insert_intent(outbox.flows, outbox.flow_steps, text, boolean),
    outbox.flow_compensate(outbox.flows),
    outbox.flow_refresh(bigint),
    outbox.flow_withdraw_unsent(bigint, text),
    outbox.flow_advance(bigint, boolean),
    outbox.flow_start_v1(text, jsonb, jsonb)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.flow_start_v1(text, jsonb, jsonb) TO outbox_app;
GRANT EXECUTE ON FUNCTION outbox.flow_audit_doc(bigint) TO outbox_operator;  -- audit verify
-- The application reads its flows' outcome; operators read them (`outbox-relay flows`,
-- audit verify). The relay needs no right: the trigger advances flows as the owner.
GRANT SELECT ON outbox.flows, outbox.flow_steps TO outbox_app, outbox_operator;
