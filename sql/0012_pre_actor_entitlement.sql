-- An actor name is trusted only from a role entitled to it.
--
-- Until now any session could write `SELECT set_config('outbox.actor', 'relay:r1', true)`
-- and be recorded in the audit trail as the relay, or as any operator; and since sql/0009
-- the relay's own result events skip the events guard by that same setting, so an
-- application could have slipped a card number past it into an event. The name a session
-- gives itself is now kept only when its login role belongs to the family's group role
-- (a superuser belongs to every role):
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

CREATE OR REPLACE FUNCTION outbox.audit_actor() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN outbox.actor_entitled(claim) THEN claim ELSE 'db:' || session_user END
    FROM (SELECT nullif(current_setting('outbox.actor', true), '') AS claim) AS setting
$$;

GRANT EXECUTE ON FUNCTION outbox.actor_entitled(text) TO PUBLIC;

-- The relay's result events skip the events guard only when the relay really wrote them.
DROP TRIGGER events_0_hostile_input ON outbox.events;
CREATE TRIGGER events_0_hostile_input
    BEFORE INSERT OR UPDATE OF exchange, routing_key, event_type, ordering_key, payment_id, payload, headers
    ON outbox.events
    FOR EACH ROW
    WHEN (NOT (coalesce(current_setting('outbox.actor', true), '') LIKE 'relay:%'
               AND pg_has_role(session_user, 'outbox_relay', 'MEMBER'))
          AND (pg_column_size(NEW.payload) > 262144
               OR pg_column_size(NEW.headers) > 16384
               OR concat_ws(E'\x01', NEW.exchange, NEW.routing_key, NEW.event_type, NEW.ordering_key,
                            NEW.payment_id, NEW.payload::text, NEW.headers::text) ~ '[0-9](?:[ -]?[0-9]){12}'
               OR NEW.ordering_key ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
               OR NEW.payment_id ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
               OR jsonb_path_exists(NEW.payload, 'strict $.**{65}')))
    EXECUTE FUNCTION outbox.events_hostile_input();
