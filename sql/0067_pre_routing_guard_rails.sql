-- Issue 20, step 4: guard rails, the automatic rollback of a canary split (docs/routing.md,
-- "Guard rails").
--
-- A guard rail watches one split rule: which of its targets is the canary and which the
-- baseline, a sliding window, the samples each side needs, and the margins by which the
-- canary may be worse (failures: declines and errors; ambiguous outcomes; latency at a
-- percentile). Relays compare the two sides every RELAY_GUARD_RAILS_INTERVAL_SECONDS from
-- the intents themselves: the first intent of each payment the rule routed in the window
-- (outbox.payments.routing_rule_id, indexed below), so a fleet of relays counts each
-- payment once, whoever ran it. The comparison is pure (relay/domain/guard_rails.py).
--
-- When the canary is worse, a relay calls outbox.routing_guard_rollback_v1: in one
-- transaction, the canary's weight becomes 0 by the same UPDATE of outbox.routing_rules an
-- operator's `routes weights RULE canary=0` makes (the rule's triggers bump its version,
-- write the hash-chained audit row and let a lowering pass four eyes), with actor
-- relay:<instance> and the comparison as the reason; the guard records when and why; and an
-- event routing.guard_rail.rolled_back goes to RabbitMQ through outbox.events. Only the
-- first relay acts: the function locks the rule and does nothing when the canary is at 0
-- already (NULL), so two relays that reach the same verdict write one rollback.
--
-- A guard changes through outbox.routing_guard_set_v1 (`outbox-relay routes guard ...`),
-- audited as entity routing_guard. It never needs four eyes: a guard only ever takes traffic
-- away (raising the canary again is a weight change, held by four eyes when they are on).

CREATE TABLE outbox.routing_guards (
    rule_name text PRIMARY KEY REFERENCES outbox.routing_rules (name),
    canary text NOT NULL,
    baseline text NOT NULL,
    enabled boolean NOT NULL DEFAULT true,
    -- At most a day: terminal intents stay in payment_intents at least 24 h
    -- (RELAY_RETENTION_HOURS >= 24), so the window never reaches into the archive.
    window_seconds integer NOT NULL DEFAULT 900
        CONSTRAINT routing_guards_window_seconds_range CHECK (window_seconds BETWEEN 10 AND 86400),
    min_samples integer NOT NULL DEFAULT 100
        CONSTRAINT routing_guards_min_samples_range CHECK (min_samples BETWEEN 1 AND 1000000),
    -- Basis points (1/100 of a percent) of the payments with an outcome; NULL: not compared.
    failure_margin_bp integer
        CONSTRAINT routing_guards_failure_margin_range CHECK (failure_margin_bp BETWEEN 0 AND 10000),
    ambiguous_margin_bp integer
        CONSTRAINT routing_guards_ambiguous_margin_range CHECK (ambiguous_margin_bp BETWEEN 0 AND 10000),
    latency_percentile integer NOT NULL DEFAULT 95
        CONSTRAINT routing_guards_latency_percentile_range CHECK (latency_percentile BETWEEN 50 AND 99),
    latency_margin_ms integer
        CONSTRAINT routing_guards_latency_margin_range CHECK (latency_margin_ms BETWEEN 0 AND 3600000),
    note text CONSTRAINT routing_guards_note_max_500 CHECK (length(note) <= 500),
    version integer NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text,
    -- The last automatic rollback. Payments created before it are not counted again, so an
    -- operator who raises the canary after fixing it starts from a clean window.
    rolled_back_at timestamptz,
    rolled_back_by text,
    rollback_reason text,
    CONSTRAINT routing_guards_two_sides CHECK (canary <> baseline),
    CONSTRAINT routing_guards_a_margin CHECK (
        failure_margin_bp IS NOT NULL OR ambiguous_margin_bp IS NOT NULL OR latency_margin_ms IS NOT NULL)
);

COMMENT ON TABLE outbox.routing_guards IS
    'Guard rails of split rules (sql/0067): a relay sets the canary''s weight to 0 when, over '
    'the window and with min_samples on each side, its failure or ambiguous rate exceeds the '
    'baseline''s by more than the margin (basis points) or its latency percentile by more than '
    'latency_margin_ms. Changed through outbox.routing_guard_set_v1, audited as routing_guard.';

-- The payments a rule routed, newest last: the guard's window is one range scan per rule.
-- Only routed payments are in it, so an INSERT naming its provider pays nothing. Building it
-- reads the whole table under a lock that holds INSERTs back: on a large payments table build
-- it CONCURRENTLY by hand first, with this name and definition (docs/developing.md).
CREATE INDEX IF NOT EXISTS payments_routed_idx ON outbox.payments (routing_rule_id, created_at)
    WHERE routing_rule_id IS NOT NULL;

CREATE TRIGGER routing_guards_version
    BEFORE UPDATE ON outbox.routing_guards
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*)
    EXECUTE FUNCTION outbox.routing_rules_bump_version();

CREATE TRIGGER routing_guards_audit
    AFTER INSERT OR UPDATE ON outbox.routing_guards
    FOR EACH ROW EXECUTE FUNCTION outbox.audit_generic(
        'routing_guard', 'rule_name',
        'rule_name,version,canary,baseline,enabled,window_seconds,min_samples,failure_margin_bp,ambiguous_margin_bp,latency_percentile,latency_margin_ms,note,rolled_back_at,rolled_back_by');

CREATE TRIGGER routing_guards_no_delete
    BEFORE DELETE OR TRUNCATE ON outbox.routing_guards
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.refuse_change();

-- Adds or changes the guard of rule p_rule as operator p_operator (p_reason: the audit
-- row's why). p_guard: a JSON object of the columns to set (unknown keys are refused); a
-- new guard needs canary and baseline. The rule must be a split naming both.
CREATE FUNCTION outbox.routing_guard_set_v1(p_operator text, p_rule text, p_guard jsonb, p_reason text DEFAULT NULL)
RETURNS outbox.routing_guards
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rule    outbox.routing_rules;
    cur     outbox.routing_guards;
    merged  outbox.routing_guards;
    extra   text;
BEGIN
    PERFORM outbox.set_operator_actor(p_operator);
    PERFORM set_config('outbox.reason', coalesce(p_reason, ''), true);
    SELECT string_agg(k, ', ') INTO extra FROM jsonb_object_keys(p_guard) AS k
    WHERE k NOT IN ('canary', 'baseline', 'enabled', 'window_seconds', 'min_samples',
                    'failure_margin_bp', 'ambiguous_margin_bp', 'latency_percentile',
                    'latency_margin_ms', 'note');
    IF extra IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = format('guard rail fields %s are not settable', extra);
    END IF;
    SELECT * INTO rule FROM outbox.routing_rules WHERE name = p_rule;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found',
            MESSAGE = format('no routing rule %s', quote_literal(p_rule)),
            HINT = 'outbox-relay routes list shows the rules.';
    END IF;
    SELECT * INTO cur FROM outbox.routing_guards WHERE rule_name = p_rule FOR UPDATE;
    IF NOT FOUND THEN
        cur := jsonb_populate_record(NULL::outbox.routing_guards,
                                     jsonb_build_object('rule_name', p_rule, 'enabled', true,
                                                        'window_seconds', 900, 'min_samples', 100,
                                                        'latency_percentile', 95));
    END IF;
    merged := jsonb_populate_record(cur, p_guard);
    IF rule.mode <> 'split' THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'routing_guards_rule_is_split',
            MESSAGE = format('routing rule %s is a priority list: a guard rail watches a split', quote_literal(p_rule));
    END IF;
    IF merged.canary IS NULL OR merged.baseline IS NULL
       OR NOT merged.canary = ANY (rule.providers) OR NOT merged.baseline = ANY (rule.providers) THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'routing_guards_sides_are_targets',
            MESSAGE = format('guard rail of %s: canary %s and baseline %s must both be targets of the rule (%s)',
                             quote_literal(p_rule), coalesce(merged.canary, '(none)'),
                             coalesce(merged.baseline, '(none)'), array_to_string(rule.providers, ', ')),
            HINT = 'outbox-relay routes guard RULE --canary NAME --baseline NAME ...';
    END IF;
    IF cur.canary IS NULL THEN
        INSERT INTO outbox.routing_guards (rule_name, canary, baseline, enabled, window_seconds, min_samples,
                                           failure_margin_bp, ambiguous_margin_bp, latency_percentile,
                                           latency_margin_ms, note, updated_by)
        VALUES (p_rule, merged.canary, merged.baseline, merged.enabled, merged.window_seconds,
                merged.min_samples, merged.failure_margin_bp, merged.ambiguous_margin_bp,
                merged.latency_percentile, merged.latency_margin_ms, merged.note, outbox.audit_actor())
        RETURNING * INTO merged;
    ELSE
        UPDATE outbox.routing_guards SET
            canary = merged.canary, baseline = merged.baseline, enabled = merged.enabled,
            window_seconds = merged.window_seconds, min_samples = merged.min_samples,
            failure_margin_bp = merged.failure_margin_bp, ambiguous_margin_bp = merged.ambiguous_margin_bp,
            latency_percentile = merged.latency_percentile, latency_margin_ms = merged.latency_margin_ms,
            note = merged.note, updated_by = outbox.audit_actor()
        WHERE rule_name = p_rule
        RETURNING * INTO merged;
    END IF;
    RETURN merged;
END;
$$;

COMMENT ON FUNCTION outbox.routing_guard_set_v1(text, text, jsonb, text) IS
    'Add or change the guard rail of a split rule (p_guard: the columns to set, as JSON) as '
    'operator p_operator, with p_reason as the audit row''s why.';

-- A relay's automatic rollback: the canary of p_rule's guard to weight 0, as relay
-- p_instance, with p_reason (the comparison) as the audit rows' why. Returns the rule as it
-- is now, or NULL when there was nothing to do (the guard is off or names another canary,
-- the rule is disabled, or the canary is at 0 already: another relay was first).
CREATE FUNCTION outbox.routing_guard_rollback_v1(p_instance text, p_rule text, p_canary text, p_reason text,
                                                 p_comparison jsonb DEFAULT '{}')
RETURNS outbox.routing_rules
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    guard outbox.routing_guards;
    rule  outbox.routing_rules;
    k     integer;
BEGIN
    IF p_instance IS NULL OR p_instance !~ '^\S' OR length(p_instance) > 200 OR p_instance ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'p_instance must name the relay: 1 to 200 printable characters';
    END IF;
    -- Kept only when the login is a relay's (outbox.actor_entitled, sql/0012).
    PERFORM set_config('outbox.actor', 'relay:' || p_instance, true);
    PERFORM set_config('outbox.reason', coalesce(p_reason, ''), true);
    -- The rule first, as routing_rule_set_v1 locks it, then its guard.
    SELECT * INTO rule FROM outbox.routing_rules WHERE name = p_rule FOR UPDATE;
    SELECT * INTO guard FROM outbox.routing_guards WHERE rule_name = p_rule FOR UPDATE;
    IF rule.id IS NULL OR guard.rule_name IS NULL OR NOT guard.enabled OR guard.canary <> p_canary
       OR NOT rule.enabled OR rule.mode <> 'split' THEN
        RETURN NULL;
    END IF;
    k := array_position(rule.providers, p_canary);
    IF k IS NULL OR rule.weights[k] = 0 THEN
        RETURN NULL;
    END IF;
    UPDATE outbox.routing_rules SET weights[k] = 0, updated_by = outbox.audit_actor()
    WHERE id = rule.id
    RETURNING * INTO rule;
    UPDATE outbox.routing_guards
    SET rolled_back_at = clock_timestamp(), rolled_back_by = outbox.audit_actor(), rollback_reason = p_reason
    WHERE rule_name = p_rule;
    INSERT INTO outbox.events (ordering_key, routing_key, event_type, payload)
    SELECT 'routing_rule:' || p_rule, 'routing.guard_rail.rolled_back', 'routing.guard_rail.rolled_back',
           jsonb_build_object('event_id', e.event_id, 'event_type', 'routing.guard_rail.rolled_back',
                              'occurred_at', now(), 'rule', p_rule, 'rule_version', rule.version,
                              'canary', p_canary, 'baseline', guard.baseline,
                              'weights', to_jsonb(rule.weights), 'actor', outbox.audit_actor(),
                              'reason', p_reason, 'comparison', coalesce(p_comparison, '{}'::jsonb))
    FROM (SELECT outbox.new_event_id() AS event_id) AS e;
    RETURN rule;
END;
$$;

COMMENT ON FUNCTION outbox.routing_guard_rollback_v1(text, text, text, text, jsonb) IS
    'A relay''s automatic rollback of a guarded canary to weight 0 (audited as relay:<instance>, '
    'the comparison as the reason, event routing.guard_rail.rolled_back); NULL when already done.';

GRANT SELECT ON outbox.routing_guards TO outbox_operator, outbox_relay;
-- The relay reads the rules to know the canary's weight; `status` under the relay's login too.
GRANT SELECT ON outbox.routing_rules TO outbox_relay;
REVOKE EXECUTE ON FUNCTION outbox.routing_guard_set_v1(text, text, jsonb, text),
                           outbox.routing_guard_rollback_v1(text, text, text, text, jsonb)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.routing_guard_set_v1(text, text, jsonb, text) TO outbox_operator;
GRANT EXECUTE ON FUNCTION outbox.routing_guard_rollback_v1(text, text, text, text, jsonb) TO outbox_relay;
