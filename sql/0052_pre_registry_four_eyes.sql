-- Issue 20, step 3: four eyes on the flags, optional. With outbox.registry_policy.four_eyes
-- on, a change of the provider registry or of a routing rule that may send traffic somewhere
-- new (register or enable a provider, widen its currencies or limits, add or enable a rule,
-- raise a weight, change what a rule matches or names) is refused by name
-- (registry_change_needs_approval) unless a second operator, logged in as another database
-- login, approved it: `outbox-relay` records the change as a request
-- (outbox.registry_request_v1) and `outbox-relay registry approve ID` applies it
-- (outbox.registry_approve_v1), as the approver, in one transaction.
--
-- Changes that only take traffic away apply at once, four eyes or not, so that a kill switch
-- or a rollback is never held up: disabling a provider, disabling a rule, lowering weights
-- (a canary to 0). Turning four eyes on needs one operator; turning it off needs two.
--
-- The check is a trigger on outbox.providers and outbox.routing_rules (not in their set
-- functions), so no path around it: operators cannot write the tables, and only
-- registry_approve_v1 (SECURITY DEFINER) can mark a request approved in the current
-- transaction, which is what the trigger looks for. Everything is audited: the policy
-- (entity registry_policy), each request (entity registry_request: who asked, who approved,
-- by name and login), and the change itself (entity provider / routing_rule, actor the approver).

CREATE TABLE outbox.registry_policy (
    singleton boolean PRIMARY KEY DEFAULT true CONSTRAINT registry_policy_one_row CHECK (singleton),
    four_eyes boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text
);
INSERT INTO outbox.registry_policy DEFAULT VALUES;

COMMENT ON TABLE outbox.registry_policy IS
    'four_eyes: changes of the provider registry and routing rules that may send traffic '
    'somewhere new need a second operator (sql/0052); changes that only take traffic away never do.';

CREATE TRIGGER registry_policy_audit
    AFTER INSERT OR UPDATE ON outbox.registry_policy
    FOR EACH ROW EXECUTE FUNCTION outbox.audit_generic('registry_policy', 'singleton', 'four_eyes');

CREATE TABLE outbox.registry_requests (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    entity text NOT NULL CONSTRAINT registry_requests_entity_valid
        CHECK (entity IN ('provider', 'routing_rule', 'registry_policy')),
    name text NOT NULL,
    change jsonb NOT NULL CONSTRAINT registry_requests_change_object CHECK (jsonb_typeof(change) = 'object'),
    reason text NOT NULL CONSTRAINT registry_requests_reason_given CHECK (reason ~ '\S'),
    status text NOT NULL DEFAULT 'pending' CONSTRAINT registry_requests_status_valid
        CHECK (status IN ('pending', 'applied')),
    requested_by text NOT NULL,
    requested_login text NOT NULL DEFAULT session_user,
    requested_at timestamptz NOT NULL DEFAULT now(),
    approved_by text,
    approved_login text,
    approved_at timestamptz,
    applied_xid xid8
);

COMMENT ON TABLE outbox.registry_requests IS
    'Registry and routing changes waiting for a second operator (sql/0052), and the ones applied.';

CREATE TRIGGER registry_requests_audit
    AFTER INSERT OR UPDATE ON outbox.registry_requests
    FOR EACH ROW EXECUTE FUNCTION outbox.audit_generic(
        'registry_request', 'id',
        'id,entity,name,change,reason,status,requested_by,requested_login,approved_by,approved_login');

CREATE TRIGGER registry_requests_no_delete
    BEFORE DELETE OR TRUNCATE ON outbox.registry_requests
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.refuse_change();

-- True when this transaction applies an approved request for the entity.
CREATE FUNCTION outbox.registry_change_approved(p_entity text, p_name text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM outbox.registry_requests AS r
                   WHERE r.entity = p_entity AND r.name = p_name AND r.status = 'applied'
                     AND r.applied_xid = pg_current_xact_id())
$$;

CREATE FUNCTION outbox.registry_refuse_unapproved(p_entity text, p_name text, p_what text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT four_eyes FROM outbox.registry_policy) AND NOT outbox.registry_change_approved(p_entity, p_name) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'insufficient_privilege',
            CONSTRAINT = 'registry_change_needs_approval',
            MESSAGE = format('%s %s: %s needs a second operator (four eyes are on)', p_entity, p_name, p_what),
            HINT = 'Record it as a request (outbox-relay does so by itself) and have another operator, '
                   'logged in as another database login, run: outbox-relay registry approve ID.';
    END IF;
END;
$$;

-- Providers: anything but disabling (with nothing else changed) may send traffic somewhere new.
CREATE FUNCTION outbox.providers_four_eyes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND (NEW.kind, NEW.currencies, NEW.amount_limits) IS NOT DISTINCT FROM
                            (OLD.kind, OLD.currencies, OLD.amount_limits)
       AND (NEW.enabled = OLD.enabled OR NOT NEW.enabled) THEN
        RETURN NEW;  -- disabled, a note changed, or nothing
    END IF;
    PERFORM outbox.registry_refuse_unapproved('provider', NEW.name,
        CASE TG_OP WHEN 'INSERT' THEN 'registering it' ELSE 'this change' END);
    RETURN NEW;
END;
$$;

CREATE TRIGGER providers_four_eyes
    BEFORE INSERT OR UPDATE ON outbox.providers
    FOR EACH ROW EXECUTE FUNCTION outbox.providers_four_eyes();

-- Routing rules: disabling, or lowering weights with nothing else changed, takes traffic away.
CREATE FUNCTION outbox.routing_rules_four_eyes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND (NEW.priority, NEW.currencies, NEW.min_amount_minor, NEW.max_amount_minor,
            NEW.payment_method_prefixes, NEW.metadata_key, NEW.metadata_values, NEW.mode, NEW.providers)
           IS NOT DISTINCT FROM
           (OLD.priority, OLD.currencies, OLD.min_amount_minor, OLD.max_amount_minor,
            OLD.payment_method_prefixes, OLD.metadata_key, OLD.metadata_values, OLD.mode, OLD.providers)
       AND (NOT NEW.enabled
            OR (OLD.enabled AND (NEW.weights IS NOT DISTINCT FROM OLD.weights
                                 OR NOT EXISTS (SELECT 1 FROM unnest(NEW.weights, OLD.weights) AS w(n, o)
                                                WHERE n > o)))) THEN
        RETURN NEW;
    END IF;
    PERFORM outbox.registry_refuse_unapproved('routing_rule', NEW.name,
        CASE TG_OP WHEN 'INSERT' THEN 'adding it' ELSE 'this change' END);
    RETURN NEW;
END;
$$;

CREATE TRIGGER routing_rules_four_eyes
    BEFORE INSERT OR UPDATE ON outbox.routing_rules
    FOR EACH ROW EXECUTE FUNCTION outbox.routing_rules_four_eyes();

CREATE FUNCTION outbox.registry_policy_four_eyes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.four_eyes AND NOT NEW.four_eyes THEN
        PERFORM outbox.registry_refuse_unapproved('registry_policy', 'four_eyes', 'turning four eyes off');
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER registry_policy_four_eyes
    BEFORE UPDATE ON outbox.registry_policy
    FOR EACH ROW EXECUTE FUNCTION outbox.registry_policy_four_eyes();

CREATE FUNCTION outbox.registry_policy_set_v1(p_operator text, p_four_eyes boolean, p_reason text)
RETURNS outbox.registry_policy
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    now_row outbox.registry_policy;
BEGIN
    PERFORM outbox.set_operator_actor(p_operator);
    PERFORM set_config('outbox.reason', coalesce(p_reason, ''), true);
    UPDATE outbox.registry_policy SET four_eyes = p_four_eyes, updated_at = now(),
                                      updated_by = outbox.audit_actor()
    RETURNING * INTO now_row;
    RETURN now_row;
END;
$$;

-- Record a change for a second operator. p_change holds the set function's arguments:
-- provider: {"kind", "enabled", "currencies", "amount_limits", "note", "create"};
-- routing_rule: {"rule": {...}, "create"}; registry_policy: {"four_eyes"}.
CREATE FUNCTION outbox.registry_request_v1(p_operator text, p_entity text, p_name text, p_change jsonb,
                                           p_reason text)
RETURNS outbox.registry_requests
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    req outbox.registry_requests;
BEGIN
    PERFORM outbox.set_operator_actor(p_operator);
    INSERT INTO outbox.registry_requests (entity, name, change, reason, requested_by)
    VALUES (p_entity, p_name, p_change, coalesce(p_reason, ''), p_operator)
    RETURNING * INTO req;
    RETURN req;
END;
$$;

-- Apply a pending request as a second operator, from another database login.
CREATE FUNCTION outbox.registry_approve_v1(p_operator text, p_id bigint)
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
        PERFORM outbox.provider_set_v1(p_operator, req.name, c ->> 'kind', (c ->> 'enabled')::boolean,
            CASE WHEN c ? 'currencies' AND jsonb_typeof(c -> 'currencies') = 'array'
                 THEN ARRAY(SELECT jsonb_array_elements_text(c -> 'currencies')) END,
            CASE WHEN jsonb_typeof(c -> 'amount_limits') = 'object' THEN c -> 'amount_limits' END,
            c ->> 'note', current_setting('outbox.reason'), coalesce((c ->> 'create')::boolean, false));
    ELSIF req.entity = 'routing_rule' THEN
        PERFORM outbox.routing_rule_set_v1(p_operator, req.name, c -> 'rule', current_setting('outbox.reason'),
                                           coalesce((c ->> 'create')::boolean, false));
    ELSE
        PERFORM outbox.registry_policy_set_v1(p_operator, (c ->> 'four_eyes')::boolean,
                                              current_setting('outbox.reason'));
    END IF;
    RETURN req;
END;
$$;

GRANT SELECT ON outbox.registry_policy, outbox.registry_requests TO outbox_operator;
REVOKE EXECUTE ON FUNCTION outbox.registry_change_approved(text, text),
                           outbox.registry_refuse_unapproved(text, text, text),
                           outbox.registry_policy_set_v1(text, boolean, text),
                           outbox.registry_request_v1(text, text, text, jsonb, text),
                           outbox.registry_approve_v1(text, bigint)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.registry_policy_set_v1(text, boolean, text),
                          outbox.registry_request_v1(text, text, text, jsonb, text),
                          outbox.registry_approve_v1(text, bigint)
    TO outbox_operator;
