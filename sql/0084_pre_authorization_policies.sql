-- Flows, issue 21: a default policy per provider for authorisations no flow covers
-- (docs/flows.md, "Authorisations no flow covers"). Opt-in: a provider with no row here, or
-- with action 'off', gets nothing.
--
-- An authorisation is *uncovered* when its payment is `authorized`, no open flow
-- (running, compensating, needs_operator) has a step on it, and no intent of it is
-- unresolved (a capture or void on its way, or dead for an operator). It is *aged* once its
-- payment has not changed for the policy's after_seconds. Then:
--   alert: the relay's gauge outbox_relay_uncovered_authorizations{provider,policy} counts
--          it, and the alert OutboxRelayUncoveredAuthorizations fires (deploy/prometheus);
--   void:  the relay's flow sweeper inserts one void for it (outbox.authorization_sweep_v1),
--          an ordinary intent with a key derived from the payment: never a second one. A
--          void that fails leaves the authorisation uncovered and aged: the gauge counts it.
-- Stripe's default hold is seven days: after_seconds 518400 (six days) voids before the
-- provider lets the hold lapse by itself.

CREATE TABLE outbox.authorization_policies (
    provider       text PRIMARY KEY
        CONSTRAINT authorization_policies_provider_lowercase_identifier
        CHECK (provider ~ '^[a-z][a-z0-9_]*$' AND length(provider) <= 63),
    action         text NOT NULL
        CONSTRAINT authorization_policies_action_valid CHECK (action IN ('off', 'alert', 'void')),
    after_seconds  integer NOT NULL
        CONSTRAINT authorization_policies_after_seconds_1_minute_to_366_days
        CHECK (after_seconds BETWEEN 60 AND 31622400),
    reason         text NOT NULL CONSTRAINT authorization_policies_reason_given CHECK (reason ~ '\S'),
    updated_by     text NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE outbox.authorization_policies IS 'Per provider, what happens to an authorisation no flow covers once its payment has not changed for after_seconds: off, alert (a gauge and an alert) or void (sql/0084, docs/flows.md).';

CREATE TRIGGER authorization_policies_audit
    AFTER INSERT OR UPDATE ON outbox.authorization_policies
    FOR EACH ROW EXECUTE FUNCTION outbox.audit_generic(
        'authorization_policy', 'provider', 'provider,action,after_seconds,reason,updated_by');
-- Never deleted (`audit verify` compares each chain's end with its live row): 'off' opts out.
CREATE TRIGGER authorization_policies_no_delete
    BEFORE DELETE OR TRUNCATE ON outbox.authorization_policies
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.refuse_change();

-- The uncovered authorisations are found from the authorised payments of the providers with
-- a policy, and each payment's flow steps.
CREATE INDEX payments_authorized_idx ON outbox.payments (provider, updated_at)
    WHERE state = 'authorized';
CREATE INDEX flow_steps_payment_idx ON outbox.flow_steps (payment_id);

-- Set a provider's policy (an operator; audited with its reason).
CREATE FUNCTION outbox.authorization_policy_set_v1(p_operator text, p_provider text, p_action text,
                                                   p_after_seconds integer, p_reason text)
RETURNS outbox.authorization_policies
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_row outbox.authorization_policies;
BEGIN
    PERFORM outbox.set_operator_actor(p_operator);
    PERFORM set_config('outbox.reason', coalesce(p_reason, ''), true);
    INSERT INTO outbox.authorization_policies AS a (provider, action, after_seconds, reason, updated_by)
    VALUES (p_provider, p_action, p_after_seconds, coalesce(p_reason, ''), p_operator)
    ON CONFLICT (provider) DO UPDATE
    SET action = excluded.action, after_seconds = excluded.after_seconds, reason = excluded.reason,
        updated_by = excluded.updated_by, updated_at = now()
    RETURNING * INTO v_row;
    RETURN v_row;
END;
$$;

-- The aged uncovered authorisations of the providers with a policy (see the header), as of
-- p_now (NULL: now()).
CREATE FUNCTION outbox.uncovered_authorizations_v1(p_now timestamptz DEFAULT NULL)
RETURNS TABLE (payment_id text, provider text, currency text, authorized_minor bigint,
               unchanged_since timestamptz, action text, after_seconds integer)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p.payment_id, p.provider, p.currency, p.authorized_minor, p.updated_at, a.action,
           a.after_seconds
    FROM outbox.authorization_policies AS a
    JOIN outbox.payments AS p ON p.provider = a.provider AND p.state = 'authorized'
    WHERE a.action <> 'off'
      AND p.updated_at <= coalesce(p_now, now()) - make_interval(secs => a.after_seconds)
      AND NOT EXISTS (SELECT 1 FROM outbox.flow_steps AS s
                      JOIN outbox.flows AS f ON f.id = s.flow_id
                      WHERE s.payment_id = p.payment_id
                        AND f.state IN ('running', 'compensating', 'needs_operator'))
      AND NOT EXISTS (SELECT 1 FROM outbox.payment_intents AS i
                      WHERE i.payment_id = p.payment_id AND i.status NOT IN ('succeeded', 'failed'))
$$;

-- The idempotency key of the policy's void of a payment: one per payment, ever.
CREATE FUNCTION outbox.authorization_void_key(p_payment_id text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT 'authexp_' || translate(left(encode(sha256(convert_to(
        (SELECT i.installation_id::text FROM outbox.installation AS i)
        || '/authorization_void/' || p_payment_id, 'UTF8')), 'hex'), 48), '0123456789', 'ghijklmnop')
$$;

-- Insert the void of every aged uncovered authorisation whose provider's policy is 'void'
-- (at most p_limit, oldest first); returns how many. One sweeper at a time (a transaction
-- lock; a second returns 0), and a payment's void is never inserted twice: its key is
-- derived from the payment and looked for first, in the hot table and the archive.
CREATE FUNCTION outbox.authorization_sweep_v1(p_now timestamptz DEFAULT NULL, p_limit integer DEFAULT 100)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_count integer;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('outbox.authorization_sweep_v1')) THEN
        RETURN 0;
    END IF;
    PERFORM set_config('outbox.reason', 'authorization policy: void after its hold aged', true);
    INSERT INTO outbox.payment_intents (payment_id, action, provider, currency, idempotency_key, metadata)
    SELECT u.payment_id, 'void', u.provider, u.currency, k.key,
           jsonb_build_object('authorization_policy', jsonb_build_object(
               'action', 'void', 'after_seconds', u.after_seconds,
               'unchanged_since', u.unchanged_since))
    FROM outbox.uncovered_authorizations_v1(p_now) AS u
    CROSS JOIN LATERAL (SELECT outbox.authorization_void_key(u.payment_id) AS key) AS k
    WHERE u.action = 'void'
      AND NOT EXISTS (SELECT 1 FROM outbox.payment_intents AS i
                      WHERE i.provider = u.provider AND i.idempotency_key = k.key)
      AND NOT EXISTS (SELECT 1 FROM outbox.payment_intents_archive AS a
                      WHERE a.provider = u.provider AND a.idempotency_key = k.key)
    ORDER BY u.unchanged_since, u.payment_id
    LIMIT greatest(p_limit, 1);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END;
$$;

REVOKE ALL ON outbox.authorization_policies FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.authorization_policy_set_v1(text, text, text, integer, text),
    outbox.uncovered_authorizations_v1(timestamptz),
    outbox.authorization_void_key(text),
    outbox.authorization_sweep_v1(timestamptz, integer)
    FROM PUBLIC;
GRANT SELECT ON outbox.authorization_policies TO outbox_operator;
GRANT EXECUTE ON FUNCTION outbox.authorization_policy_set_v1(text, text, text, integer, text),
    outbox.uncovered_authorizations_v1(timestamptz)
    TO outbox_operator;
GRANT EXECUTE ON FUNCTION outbox.uncovered_authorizations_v1(timestamptz),
    outbox.authorization_sweep_v1(timestamptz, integer)
    TO outbox_relay;
