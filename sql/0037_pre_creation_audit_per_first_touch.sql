-- sql/0019 wrote an intent's creation rows from a statement trigger on every UPDATE of
-- outbox.payment_intents. A write-back promotes each payment's next blocked intent in a
-- statement of its own, so that trigger ran (and planned its INSERT ... SELECT over the
-- transition table) once per promoted intent, and once more for every other UPDATE,
-- whether or not any row was touched for the first time: one relay drained 5,000 intents at
-- 604/s against 1,721/s before sql/0019. The same rows, written per row and only for a row
-- touched for the first time (attempts = 0 before the UPDATE: an intent's first UPDATE is
-- its claim or its promotion, and every claim counts an attempt). Row triggers fire before
-- statement triggers, so the creation rows still come before the UPDATE's own audit row.
CREATE FUNCTION outbox.audit_intent_creation() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
BEGIN
    INSERT INTO outbox.audit_log
        (id, at, actor, entity, entity_id, payment_id, operation, reason, before, after,
         chain_seq, prev_hash, hash)
    SELECT c.id, c.at, c.actor, c.entity, c.entity_id, c.payment_id, 'insert', NULL, NULL, c.after,
           1, NULL,
           sha256(outbox.audit_canonical(c.id, c.at, c.actor, c.entity, c.entity_id, c.payment_id,
                                         'insert', NULL, NULL, c.after, 1, NULL))
    FROM (
        SELECT nextval('outbox.audit_log_id_seq') AS id, e.*
        FROM (
            -- The payment's first (when its chain is empty: the INSERT created it).
            SELECT 0 AS kind, p.payment_id, p.created_at AS at,
                   coalesce(p.created_by, 'db:unknown') AS actor, 'payment'::text AS entity,
                   p.payment_id AS entity_id, outbox.audit_payment_doc(p) AS after
            FROM outbox.payments AS p
            WHERE p.payment_id = OLD.payment_id
              AND NOT EXISTS (
                  SELECT 1 FROM outbox.audit_log AS a
                  WHERE a.entity = 'payment' AND a.entity_id = p.payment_id AND a.chain_seq = 1)
            UNION ALL
            -- Then the intent's, as the INSERT left it.
            SELECT 1, OLD.payment_id, OLD.created_at, coalesce(OLD.created_by, 'db:unknown'),
                   'intent', OLD.id::text, outbox.audit_intent_doc(OLD)
            WHERE NOT EXISTS (
                  SELECT 1 FROM outbox.audit_log AS a
                  WHERE a.entity = 'intent' AND a.entity_id = OLD.id::text AND a.chain_seq = 1)
            ORDER BY 1
        ) AS e
    ) AS c
    -- Two transactions writing the same payment's first row cannot both succeed; the one
    -- that waits keeps the other's.
    ON CONFLICT (entity, entity_id, chain_seq) DO NOTHING;
    RETURN NULL;
END;
$$;

DROP TRIGGER payment_intents_audit_0_creation ON outbox.payment_intents;
DROP FUNCTION outbox.audit_intent_creations();
CREATE TRIGGER payment_intents_audit_0_creation
    AFTER UPDATE ON outbox.payment_intents
    FOR EACH ROW
    WHEN (OLD.attempts = 0)
    EXECUTE FUNCTION outbox.audit_intent_creation();

REVOKE ALL ON FUNCTION outbox.audit_intent_creation() FROM PUBLIC;
