-- An actor name is trusted only from a role entitled to it.
--
-- Until now any session could write `SELECT set_config('outbox.actor', 'relay:r1', true)`
-- and be recorded in the audit trail as the relay, or as any operator. The name a session
-- gives itself is now kept only when its login role belongs to the family's group role
-- (a superuser belongs to every role), as sql/0009 already requires for the relay's
-- exemption from the events' card-number guard:
--
--   relay:<instance>, janitor:<instance>   members of outbox_relay
--   operator:<name>                         members of outbox_operator
--   reconcile:<provider>                    members of outbox_operator or outbox_relay
--
-- Any other name, or a name the role is not entitled to, is recorded as db:<role>, as if
-- none had been given: the trail names who really wrote, never who a writer said it was.
-- session_user, not current_user: the audit triggers run as the schema's owner.

CREATE FUNCTION outbox.actor_entitled(claim text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT CASE split_part(claim, ':', 1)
        WHEN 'relay' THEN pg_has_role(session_user, 'outbox_relay', 'MEMBER')
        WHEN 'janitor' THEN pg_has_role(session_user, 'outbox_relay', 'MEMBER')
        WHEN 'operator' THEN pg_has_role(session_user, 'outbox_operator', 'MEMBER')
        WHEN 'reconcile' THEN pg_has_role(session_user, 'outbox_operator', 'MEMBER')
                              OR pg_has_role(session_user, 'outbox_relay', 'MEMBER')
        ELSE false
    END
$$;

-- One expression, no FROM: PostgreSQL inlines both functions into the audit triggers'
-- statements, where this runs once per audit row (1.5 us a call instead of 6.6 us with
-- a subquery, measured with 200,000 calls). An unset or empty setting names no family.
CREATE OR REPLACE FUNCTION outbox.audit_actor() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN outbox.actor_entitled(current_setting('outbox.actor', true))
                THEN current_setting('outbox.actor', true)
                ELSE 'db:' || session_user END
$$;

GRANT EXECUTE ON FUNCTION outbox.actor_entitled(text) TO PUBLIC;
