-- Issue 20, the API version canary: the registry records the provider API version an
-- instance is pinned to, so that one provider kind may be registered twice (`stripe` on the
-- current version, `stripe_next` on a newer one) and a split rule moves new payments to the
-- new version gradually and rolls them back the same way (docs/routing.md, "API version
-- canary").
--
-- outbox.providers.api_version: the version the relays serving that name must pin
-- (RELAY_PROVIDERS__<NAME>__API_VERSION, or the adapter's default when unset). NULL: the
-- registry records none and nothing is checked. A relay refuses to start when its pinned
-- version differs from the registry's, and `outbox-relay status` names a running relay whose
-- version differs (the registry changed after it started). The spelling per kind (Stripe's
-- 2026-10-28.endive, Adyen's v71) is checked by the command (relay/operations/providers.py);
-- the table refuses anything that is not a plain token.
--
-- Changed through outbox.provider_set_v2 (v1 plus p_api_version; v1 is restated as a call of
-- v2 that leaves the version alone), audited with the other columns, and held for a second
-- operator when four eyes are on (a new version is new traffic; a rollback is a weight).
-- Restated whole here, each with its one change marked "sql/0070":
--   outbox.provider_set_v1                (sql/0050) now calls v2
--   outbox.providers_four_eyes            (sql/0052) compares api_version too
--   outbox.registry_approve_v1            (sql/0052) passes a request's api_version to v2
-- and the trigger providers_audit (sql/0050) is recreated with api_version in its columns;
-- existing providers get one 'baseline' audit row recording api_version NULL, so their
-- chains still end in their live state (`outbox-relay audit verify`), as sql/0014 did.

-- 1. The column ------------------------------------------------------------------------------

ALTER TABLE outbox.providers
    ADD COLUMN api_version text
        CONSTRAINT providers_api_version_token
            CHECK (api_version ~ '^[A-Za-z0-9][A-Za-z0-9._-]*$' AND length(api_version) <= 64);

COMMENT ON COLUMN outbox.providers.api_version IS
    'The provider API version the relays serving this name must pin (sql/0070), e.g. '
    '2026-10-28.endive (stripe) or v71 (adyen); a relay with another one refuses to start. '
    'NULL: not recorded, not checked.';

-- 2. Audited with the rest ---------------------------------------------------------------------

DROP TRIGGER providers_audit ON outbox.providers;
CREATE TRIGGER providers_audit
    AFTER INSERT OR UPDATE ON outbox.providers
    FOR EACH ROW EXECUTE FUNCTION outbox.audit_generic(
        'provider', 'name', 'name,kind,enabled,currencies,amount_limits,note,api_version');

SELECT set_config('outbox.reason', 'sql/0070: the registry records API versions', true);
SELECT outbox.audit_write('provider', p.name, NULL, 'baseline', NULL,
                          jsonb_build_object('api_version', p.api_version), 'db:' || current_user)
FROM outbox.providers AS p
ORDER BY p.name;
SELECT set_config('outbox.reason', '', true);

-- 3. Changing it: provider_set_v2 ------------------------------------------------------------

-- provider_set_v1's arguments plus p_api_version: NULL keeps it, '' clears it (not recorded).
CREATE FUNCTION outbox.provider_set_v2(
    p_operator text, p_name text, p_kind text DEFAULT NULL, p_enabled boolean DEFAULT NULL,
    p_currencies text[] DEFAULT NULL, p_amount_limits jsonb DEFAULT NULL, p_note text DEFAULT NULL,
    p_reason text DEFAULT NULL, p_create boolean DEFAULT true, p_api_version text DEFAULT NULL
) RETURNS outbox.providers
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    row_now outbox.providers;
    unknown text;
BEGIN
    PERFORM outbox.set_operator_actor(p_operator);
    PERFORM set_config('outbox.reason', coalesce(p_reason, ''), true);
    SELECT string_agg(u.wanted, ', ') INTO unknown
    FROM unnest(p_currencies) AS u(wanted)
    WHERE NOT EXISTS (SELECT 1 FROM outbox.currencies AS c WHERE c.code = upper(u.wanted));
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', CONSTRAINT = 'providers_currencies_known',
            MESSAGE = format('providers.currencies: %s not in outbox.currencies', unknown),
            HINT = 'Use ISO 4217 codes, e.g. EUR, USD, JPY.';
    END IF;
    -- The first row of an empty registry closes it: register what is in use first.
    PERFORM pg_advisory_xact_lock(hashtext('outbox.providers'));
    IF NOT EXISTS (SELECT 1 FROM outbox.providers) THEN
        PERFORM outbox.providers_seed_in_use();
    END IF;
    UPDATE outbox.providers AS p SET
        kind = coalesce(p_kind, p.kind),
        enabled = coalesce(p_enabled, p.enabled),
        currencies = CASE WHEN p_currencies IS NULL THEN p.currencies
                          WHEN cardinality(p_currencies) = 0 THEN NULL
                          ELSE (SELECT array_agg(DISTINCT upper(c) ORDER BY upper(c)) FROM unnest(p_currencies) AS c) END,
        amount_limits = coalesce(p_amount_limits, p.amount_limits),
        note = coalesce(p_note, p.note),
        api_version = CASE WHEN p_api_version IS NULL THEN p.api_version  -- sql/0070
                           ELSE nullif(p_api_version, '') END,
        updated_at = now(),
        updated_by = outbox.audit_actor()
    WHERE p.name = p_name
    RETURNING * INTO row_now;
    IF FOUND THEN
        RETURN row_now;
    END IF;
    IF NOT p_create THEN
        RAISE EXCEPTION USING ERRCODE = 'no_data_found',
            MESSAGE = format('provider %s is not registered', quote_literal(p_name)),
            HINT = 'Register it first: outbox-relay providers add NAME --kind KIND.';
    END IF;
    IF p_kind IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'not_null_violation', CONSTRAINT = 'providers_kind_required',
            MESSAGE = format('provider %s is new: its kind (the adapter, e.g. stripe or adyen) is required', quote_literal(p_name));
    END IF;
    INSERT INTO outbox.providers (name, kind, enabled, currencies, amount_limits, note, api_version, updated_by)
    VALUES (p_name, p_kind, coalesce(p_enabled, true),
            CASE WHEN cardinality(p_currencies) = 0 THEN NULL
                 ELSE (SELECT array_agg(DISTINCT upper(c) ORDER BY upper(c)) FROM unnest(p_currencies) AS c) END,
            coalesce(p_amount_limits, '{}'::jsonb), p_note, nullif(p_api_version, ''),  -- sql/0070
            outbox.audit_actor())
    RETURNING * INTO row_now;
    RETURN row_now;
END;
$$;

COMMENT ON FUNCTION outbox.provider_set_v2(text, text, text, boolean, text[], jsonb, text, text, boolean, text) IS
    'Register or change a provider (NULL keeps a value; currencies ''{}'': all; api_version '
    ''''': not recorded), as operator p_operator, with p_reason as the audit row''s why. The '
    'first row of an empty registry registers every provider in use first.';

-- v1 (sql/0050) keeps its arguments and meaning: it never touches api_version.
CREATE OR REPLACE FUNCTION outbox.provider_set_v1(
    p_operator text, p_name text, p_kind text DEFAULT NULL, p_enabled boolean DEFAULT NULL,
    p_currencies text[] DEFAULT NULL, p_amount_limits jsonb DEFAULT NULL, p_note text DEFAULT NULL,
    p_reason text DEFAULT NULL, p_create boolean DEFAULT true
) RETURNS outbox.providers
LANGUAGE sql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM outbox.provider_set_v2(p_operator, p_name, p_kind, p_enabled, p_currencies,
                                         p_amount_limits, p_note, p_reason, p_create, NULL)  -- sql/0070
$$;

-- 4. Four eyes: a new pinned version is held like any change that sends traffic ---------------

CREATE OR REPLACE FUNCTION outbox.providers_four_eyes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND (NEW.kind, NEW.currencies, NEW.amount_limits, NEW.api_version)  -- sql/0070
                            IS NOT DISTINCT FROM
                            (OLD.kind, OLD.currencies, OLD.amount_limits, OLD.api_version)
       AND (NEW.enabled = OLD.enabled OR NOT NEW.enabled) THEN
        RETURN NEW;  -- disabled, a note changed, or nothing
    END IF;
    PERFORM outbox.registry_refuse_unapproved('provider', NEW.name,
        CASE TG_OP WHEN 'INSERT' THEN 'registering it' ELSE 'this change' END);
    RETURN NEW;
END;
$$;

-- A provider request's change may hold "api_version" (as provider_set_v2's argument).
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
    ELSE
        PERFORM outbox.registry_policy_set_v1(p_operator, (c ->> 'four_eyes')::boolean,
                                              current_setting('outbox.reason'));
    END IF;
    RETURN req;
END;
$$;

-- 5. Who may call it ---------------------------------------------------------------------------

REVOKE EXECUTE ON FUNCTION outbox.provider_set_v2(text, text, text, boolean, text[], jsonb, text, text, boolean, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.provider_set_v2(text, text, text, boolean, text[], jsonb, text, text, boolean, text)
    TO outbox_operator;
