-- The flows trigger (sql/0072) found a settled intent's flow with one statement per column
-- of flow_steps: its step's intent_id, then, when that found nothing (a compensation), its
-- compensation_intent_id. One statement now: the step's index first and the compensation's
-- only when that finds nothing (LIMIT 1 over UNION ALL stops at the first row; both columns
-- are unique), so a step's intent costs one probe as before and a compensation's one
-- statement instead of two. Not `intent_id = NEW.id OR compensation_intent_id = NEW.id`:
-- that probes both indexes for every step. Settings as sql/0072's (CREATE OR REPLACE
-- replaces them all).
CREATE OR REPLACE FUNCTION outbox.flows_follow_intent() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
DECLARE
    v_flow bigint;
BEGIN
    SELECT u.flow_id INTO v_flow
    FROM (SELECT s.flow_id FROM outbox.flow_steps AS s WHERE s.intent_id = NEW.id
          UNION ALL
          SELECT s.flow_id FROM outbox.flow_steps AS s WHERE s.compensation_intent_id = NEW.id) AS u
    LIMIT 1;
    -- flow_withdraw_unsent ends a flow's intents while advancing that flow itself.
    IF v_flow IS NOT NULL
       AND v_flow::text IS DISTINCT FROM nullif(current_setting('outbox.flow_advancing', true), '') THEN
        PERFORM outbox.flow_advance(v_flow, false);
    END IF;
    RETURN NULL;
END;
$$;
