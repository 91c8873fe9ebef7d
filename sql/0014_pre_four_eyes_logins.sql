-- Four eyes by database login, every audited row's chain checked against its live row, and
-- the relay reading currency exponents.
--
-- 1. A money-moving reconciliation action needed a second, different *operator name*, but
--    the names are what the client says (--operator): one login could request as alice
--    and approve as bob. The action row now records the database login (session_user) of
--    its requester and of its approver, set by a trigger whatever the client sends, and
--    the database refuses an approval from the requester's login. session_user, not
--    current_user: SET ROLE does not change who logged in.
-- 2. `audit verify` compares the end of every chain with its live row. For the colder
--    tables (janitor checks, reconciliation runs, exceptions and actions) that needs their
--    audited document as the audit trigger (outbox.audit_generic) builds it.
-- 3. The relay's claim and the janitor read the currency's ISO 4217 exponent, so an
--    adapter can convert amounts to its provider's units (provider_adapters/currency_units.py).

-- ==========================================================================================
-- 1. Four eyes by login
-- ==========================================================================================

ALTER TABLE outbox.reconciliation_actions
    ADD COLUMN requested_login text,
    ADD COLUMN approved_login text;

COMMENT ON COLUMN outbox.reconciliation_actions.requested_login IS
    'The database login (session_user) that requested the action; set by a trigger. NULL only '
    'for actions requested before sql/0014.';
COMMENT ON COLUMN outbox.reconciliation_actions.approved_login IS
    'The database login (session_user) that approved it; set by a trigger, never the requester''s.';

-- The logins come from the session, never from the statement: a client cannot name
-- another login, and cannot change a recorded one.
CREATE FUNCTION outbox.reconciliation_actions_logins() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.requested_login := session_user;
        NEW.approved_login := CASE WHEN NEW.approved_by IS NOT NULL THEN session_user END;
    ELSE
        NEW.requested_login := OLD.requested_login;
        NEW.approved_login := CASE
            WHEN NEW.approved_by IS NULL THEN NULL
            WHEN OLD.approved_by IS NULL THEN session_user
            ELSE OLD.approved_login
        END;
    END IF;
    RETURN NEW;
END;
$$;
REVOKE ALL ON FUNCTION outbox.reconciliation_actions_logins() FROM PUBLIC;

CREATE TRIGGER reconciliation_actions_logins
    BEFORE INSERT OR UPDATE ON outbox.reconciliation_actions
    FOR EACH ROW EXECUTE FUNCTION outbox.reconciliation_actions_logins();

-- Checked after the name rule (CHECK constraints run in name order), so an approval by the
-- requester's own name is still reported as reconciliation_actions_second_approver.
ALTER TABLE outbox.reconciliation_actions
    ADD CONSTRAINT reconciliation_actions_second_login
    CHECK (approved_login IS NULL OR requested_login IS NULL OR approved_login <> requested_login);

-- The logins are audited with the rest of the action. Actions that exist already get one
-- audit row recording the new columns (NULL: their logins were not kept), so their chains
-- still end in their live state.
DROP TRIGGER reconciliation_actions_audit ON outbox.reconciliation_actions;
CREATE TRIGGER reconciliation_actions_audit
    AFTER INSERT OR UPDATE ON outbox.reconciliation_actions
    FOR EACH ROW EXECUTE FUNCTION outbox.audit_generic(
        'reconciliation_action', 'id',
        'id,exception_id,payment_id,action,amount_minor,reason,requested_by,approved_by,status,'
        'intent_id,requested_login,approved_login');

SELECT outbox.audit_write('reconciliation_action', a.id::text, a.payment_id, 'baseline', NULL,
                          jsonb_build_object('requested_login', a.requested_login,
                                             'approved_login', a.approved_login),
                          'db:' || current_user)
FROM outbox.reconciliation_actions AS a
ORDER BY a.id;

-- ==========================================================================================
-- 2. The audited document of a colder table's row
-- ==========================================================================================

-- What outbox.audit_generic records for a row, folded: the allow-listed columns (the
-- trigger's third argument), free text redacted. TimeZone UTC as in the trigger, so
-- timestamps render the same; `audit verify` compares it with the end of the row's chain.
CREATE FUNCTION outbox.audit_generic_doc(p_row anyelement, p_allowed text) RETURNS jsonb
LANGUAGE sql STABLE SET TimeZone = 'UTC' AS $$
    SELECT outbox.audit_redact(coalesce(jsonb_object_agg(key, value), '{}'::jsonb))
    FROM jsonb_each(to_jsonb(p_row))
    WHERE key = ANY(string_to_array(p_allowed, ','))
$$;
REVOKE ALL ON FUNCTION outbox.audit_generic_doc(anyelement, text) FROM PUBLIC;

-- audit verify runs as the operator (SQL functions run with the caller's rights, so the
-- redaction functions it calls are granted too).
GRANT EXECUTE ON FUNCTION outbox.audit_generic_doc(anyelement, text),
    outbox.audit_redact(jsonb)
    TO outbox_operator;

-- ==========================================================================================
-- 3. The relay reads exponents
-- ==========================================================================================

-- claim_intents and janitor_reserve return each intent's currency exponent.
GRANT SELECT ON outbox.currencies TO outbox_relay;
