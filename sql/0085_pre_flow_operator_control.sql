-- Flows, issue 21: operator control (docs/flows.md, "Operator control").
--
--   outbox.flow_cancel_v1           a running flow compensates (its stop_reason names the
--                                   operator and why; sql/0083's flow_advance does the rest);
--   outbox.flow_retry_step_v1       a dead step, or a dead compensation, is re-driven under its
--                                   own idempotency key (outbox.retry_dead_intents, as
--                                   `dead-letters retry`): the flow waits for it again;
--   outbox.flow_mark_compensated_v1 a compensation that failed (its effect stands) is recorded
--                                   as done by hand at the provider: compensation_status
--                                   'marked_by_operator', and the flow goes on undoing.
-- Each runs under the flow's row lock and advances the flow in the same transaction, so each
-- is audited in the flow's own hash chain (actor operator:<name>, the operator's reason)
-- with a result event when the flow's state changes.
--
-- Four eyes (the registry's mechanism, sql/0052: a request a second operator approves from
-- another database login) for the overrides that move money or stand in for the provider's
-- evidence: a cancel that will refund (a capture or charge of the flow took effect or may
-- still), and every mark-compensated. Unapproved, they are refused by name
-- (flow_operation_needs_approval); `outbox-relay flows` records the request and
-- `outbox-relay flows approve ID` (or `registry approve ID`) applies it. A cancel that only
-- releases holds, and a re-drive under the same key, need one operator (as `dead-letters
-- retry` does): a kill switch is never held up.
--
-- Replaced whole: outbox.registry_approve_v1 (last defined by sql/0070) gains the entity
-- 'flow' (marked sql/0085); registry_requests_entity_valid admits it.

ALTER TABLE outbox.registry_requests DROP CONSTRAINT registry_requests_entity_valid;
ALTER TABLE outbox.registry_requests ADD CONSTRAINT registry_requests_entity_valid
    CHECK (entity IN ('provider', 'routing_rule', 'registry_policy', 'flow'));

ALTER TABLE outbox.flow_steps DROP CONSTRAINT flow_steps_compensation_status_valid;
ALTER TABLE outbox.flow_steps ADD CONSTRAINT flow_steps_compensation_status_valid CHECK (
    compensation_status IN ('not_needed', 'started', 'dead', 'succeeded', 'failed',
                            'marked_by_operator'));
COMMENT ON COLUMN outbox.flow_steps.compensation_status IS 'NULL: no compensation decided; not_needed: the step''s compensation is none, or a later step of the flow on the same payment superseded it (compensation_note says which); started / dead / succeeded / failed: its compensation intent''s state; marked_by_operator: it failed and an operator undid the effect by hand (sql/0085; compensation_note says who and why).';

-- True when this transaction applies an approved request for this operation on the flow.
CREATE FUNCTION outbox.flow_operation_approved(p_flow_id bigint, p_operation text, p_seq integer)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM outbox.registry_requests AS r
                   WHERE r.entity = 'flow' AND r.name = p_flow_id::text AND r.status = 'applied'
                     AND r.applied_xid = pg_current_xact_id()
                     AND r.change ->> 'operation' = p_operation
                     AND (r.change ->> 'seq')::integer IS NOT DISTINCT FROM p_seq)
$$;

CREATE FUNCTION outbox.flow_operation_refuse(p_code text, p_message text, p_hint text,
                                             p_errcode text DEFAULT 'object_not_in_prerequisite_state')
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = p_errcode, CONSTRAINT = p_code, MESSAGE = p_message,
                          HINT = p_hint;
END;
$$;

-- The flow, locked; refused by name when there is none or no reason is given.
CREATE FUNCTION outbox.flow_operation_lock(p_operator text, p_flow_id bigint, p_reason text)
RETURNS outbox.flows
LANGUAGE plpgsql AS $$
DECLARE
    f outbox.flows;
BEGIN
    PERFORM outbox.set_operator_actor(p_operator);
    IF p_reason IS NULL OR p_reason !~ '\S' THEN
        PERFORM outbox.refuse_input('flows', 'reason', 'flow_operation_reason_given',
            'must say why the operator acts', 'Pass --reason "..."; it goes into the audit trail.');
    END IF;
    SELECT * INTO f FROM outbox.flows AS x WHERE x.id = p_flow_id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM outbox.flow_operation_refuse('flow_exists', format('no flow %s', p_flow_id),
            'outbox-relay flows list shows the flows.', 'no_data_found');
    END IF;
    RETURN f;
END;
$$;

-- Does the work of the three operations once they are allowed (by one operator, or approved).
CREATE FUNCTION outbox.flow_operate(p_operator text, p_flow_id bigint, p_operation text,
                                    p_seq integer, p_reason text) RETURNS outbox.flows
LANGUAGE plpgsql AS $$
DECLARE
    f      outbox.flows := outbox.flow_operation_lock(p_operator, p_flow_id, p_reason);
    s      outbox.flow_steps;
    v_kept record;
    v_before jsonb := outbox.flow_audit_doc(f.id);
BEGIN
    PERFORM set_config('outbox.reason', p_reason, true);
    IF p_operation = 'cancel' THEN
        IF f.state <> 'running' THEN
            PERFORM outbox.flow_operation_refuse('flow_cancel_running_only',
                format('flow %s is %s: only a running flow can be cancelled', f.id, f.state),
                'A compensating flow is being undone already; needs_operator: see its reason.');
        END IF;
        IF EXISTS (SELECT 1 FROM outbox.flow_steps AS x
                   WHERE x.flow_id = f.id AND x.compensation = 'refund'
                     AND x.status IN ('started', 'dead', 'succeeded'))
           AND NOT outbox.flow_operation_approved(f.id, 'cancel', NULL) THEN
            PERFORM outbox.flow_operation_refuse('flow_operation_needs_approval',
                format('flow %s: cancelling it refunds money, which needs a second operator', f.id),
                'Record it as a request (outbox-relay does so by itself); another operator, logged in '
                'as another database login, runs: outbox-relay flows approve ID.', 'insufficient_privilege');
        END IF;
        UPDATE outbox.flows AS x
        SET stop_reason = left(format('cancelled by operator %s: %s', p_operator, p_reason), 1000)
        WHERE x.id = f.id;
    ELSE
        SELECT * INTO s FROM outbox.flow_steps AS x WHERE x.flow_id = f.id AND x.seq = p_seq;
        IF NOT FOUND THEN
            PERFORM outbox.flow_operation_refuse('flow_step_exists',
                format('flow %s has no step %s', f.id, p_seq), 'outbox-relay flows show ID lists them.',
                'no_data_found');
        END IF;
        IF p_operation = 'retry_step' THEN
            IF s.status = 'dead' OR s.compensation_status = 'dead' THEN
                SELECT * INTO v_kept FROM outbox.retry_dead_intents(
                    ARRAY[CASE WHEN s.status = 'dead' THEN s.intent_id ELSE s.compensation_intent_id END],
                    p_operator) AS r WHERE r.status = 'dead';
                IF FOUND THEN
                    PERFORM outbox.flow_operation_refuse('flow_retry_' || v_kept.note,
                        format('step %s of flow %s: its intent %s was kept dead (%s)', s.seq, f.id,
                               v_kept.intent_id, v_kept.note),
                        'Sent longer ago than the provider keeps keys: check at the provider, then '
                        'outbox-relay dead-letters retry --past-key-lifetime.');
                END IF;
            ELSE
                PERFORM outbox.flow_operation_refuse('flow_retry_step_dead_only',
                    format('step %s of flow %s is %s (compensation %s): only a dead step or a dead '
                           'compensation is retried', s.seq, f.id, s.status,
                           coalesce(s.compensation_status, 'none yet')),
                    'A failed request sent again under its key gets the same answer from a provider '
                    'that stores outcomes (Stripe); undo a failed compensation at the provider and run '
                    'outbox-relay flows mark-compensated, or start a new flow.');
            END IF;
        ELSIF p_operation = 'mark_compensated' THEN
            IF f.state <> 'needs_operator' OR s.compensation_status IS DISTINCT FROM 'failed' THEN
                PERFORM outbox.flow_operation_refuse('flow_mark_compensated_failed_only',
                    format('step %s of flow %s: its compensation is %s and the flow %s; only a failed '
                           'compensation of a flow that needs an operator is marked done by hand',
                           s.seq, f.id, coalesce(s.compensation_status, 'not started'), f.state),
                    'A dead compensation may still take effect: let the janitor settle it, or cancel it '
                    '(outbox-relay dead-letters cancel) once the provider shows it did nothing.');
            END IF;
            IF NOT outbox.flow_operation_approved(f.id, 'mark_compensated', s.seq) THEN
                PERFORM outbox.flow_operation_refuse('flow_operation_needs_approval',
                    format('flow %s step %s: marking a compensation done by hand needs a second operator',
                           f.id, s.seq),
                    'Record it as a request (outbox-relay does so by itself); another operator, logged '
                    'in as another database login, runs: outbox-relay flows approve ID.',
                    'insufficient_privilege');
            END IF;
            UPDATE outbox.flow_steps AS x
            SET compensation_status = 'marked_by_operator',
                compensation_note = left(format('marked compensated by operator %s (was: %s): %s',
                                                p_operator, s.compensation_note, p_reason), 1000),
                updated_at = now()
            WHERE x.id = s.id;
        ELSE
            PERFORM outbox.flow_operation_refuse('flow_operation_valid',
                format('unknown flow operation %s', quote_literal(p_operation)),
                'cancel, retry_step or mark_compensated.', 'invalid_parameter_value');
        END IF;
    END IF;
    -- What the operator changed on the flow's own rows (a step marked compensated) is its
    -- own audit row; the advance that follows records what the flow then did.
    PERFORM outbox.flow_audit_change(f.id, v_before);
    PERFORM outbox.flow_advance(f.id);
    SELECT * INTO f FROM outbox.flows AS x WHERE x.id = f.id;
    RETURN f;
END;
$$;

CREATE FUNCTION outbox.flow_cancel_v1(p_operator text, p_flow_id bigint, p_reason text)
RETURNS outbox.flows
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT outbox.flow_operate(p_operator, p_flow_id, 'cancel', NULL, p_reason) $$;

CREATE FUNCTION outbox.flow_retry_step_v1(p_operator text, p_flow_id bigint, p_seq integer, p_reason text)
RETURNS outbox.flows
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT outbox.flow_operate(p_operator, p_flow_id, 'retry_step', p_seq, p_reason) $$;

CREATE FUNCTION outbox.flow_mark_compensated_v1(p_operator text, p_flow_id bigint, p_seq integer,
                                                p_reason text)
RETURNS outbox.flows
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT outbox.flow_operate(p_operator, p_flow_id, 'mark_compensated', p_seq, p_reason) $$;

-- Apply a pending request as a second operator, from another database login.
CREATE OR REPLACE FUNCTION outbox.registry_approve_v1(p_operator text, p_id bigint)
RETURNS outbox.registry_requests
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    req outbox.registry_requests;
    c   jsonb;
BEGIN
    PERFORM outbox.set_operator_actor(p_operator);
    SELECT * INTO req FROM outbox.registry_requests WHERE id = p_id FOR UPDATE;
    IF NOT FOUND OR req.status <> 'pending' THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found', CONSTRAINT = 'registry_request_pending',
            MESSAGE = format('registry request %s is not pending', p_id),
            HINT = 'outbox-relay registry requests lists the pending ones.';
    END IF;
    IF req.requested_login = session_user OR req.requested_by = p_operator THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege', CONSTRAINT = 'registry_approval_second_operator',
            MESSAGE = format('registry request %s was made by %s (login %s): another operator, logged in '
                             'as another database login, must approve it', p_id, req.requested_by, req.requested_login);
    END IF;
    UPDATE outbox.registry_requests
    SET status = 'applied', approved_by = p_operator, approved_login = session_user, approved_at = now(),
        applied_xid = pg_current_xact_id()
    WHERE id = p_id
    RETURNING * INTO req;
    c := req.change;
    PERFORM set_config('outbox.reason', format('request %s by %s, approved by %s: %s', req.id,
                                               req.requested_by, p_operator, req.reason), true);
    IF req.entity = 'provider' THEN
        PERFORM outbox.provider_set_v2(p_operator, req.name, c ->> 'kind', (c ->> 'enabled')::boolean,
            CASE WHEN c ? 'currencies' AND jsonb_typeof(c -> 'currencies') = 'array'
                 THEN ARRAY(SELECT jsonb_array_elements_text(c -> 'currencies')) END,
            CASE WHEN jsonb_typeof(c -> 'amount_limits') = 'object' THEN c -> 'amount_limits' END,
            c ->> 'note', current_setting('outbox.reason'), coalesce((c ->> 'create')::boolean, false),
            c ->> 'api_version');  -- sql/0070
    ELSIF req.entity = 'routing_rule' THEN
        PERFORM outbox.routing_rule_set_v1(p_operator, req.name, c -> 'rule', current_setting('outbox.reason'),
                                           coalesce((c ->> 'create')::boolean, false));
    ELSIF req.entity = 'flow' THEN
        -- sql/0085: an operator's override of a flow (docs/flows.md, "Operator control")
        PERFORM outbox.flow_operate(p_operator, req.name::bigint, c ->> 'operation',
                                    (c ->> 'seq')::integer, current_setting('outbox.reason'));
    ELSE
        PERFORM outbox.registry_policy_set_v1(p_operator, (c ->> 'four_eyes')::boolean,
                                              current_setting('outbox.reason'));
    END IF;
    RETURN req;
END;
$$;

REVOKE ALL ON FUNCTION outbox.flow_operation_approved(bigint, text, integer),
    outbox.flow_operation_refuse(text, text, text, text),
    outbox.flow_operation_lock(text, bigint, text),
    outbox.flow_operate(text, bigint, text, integer, text),
    outbox.flow_cancel_v1(text, bigint, text),
    outbox.flow_retry_step_v1(text, bigint, integer, text),
    outbox.flow_mark_compensated_v1(text, bigint, integer, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.flow_cancel_v1(text, bigint, text),
    outbox.flow_retry_step_v1(text, bigint, integer, text),
    outbox.flow_mark_compensated_v1(text, bigint, integer, text)
    TO outbox_operator;
