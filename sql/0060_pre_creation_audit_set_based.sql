-- The creation's audit rows (issue 23: written by the relay's first change of an intent,
-- sql/0019 and sql/0037), set-based again and planned without sequential scans.
--
-- What was slow. sql/0037's row trigger looks up whether the intent's and its payment's first
-- audit rows exist (NOT EXISTS on outbox.audit_log, entity, entity_id, chain_seq = 1).
-- PL/pgSQL plans that statement once per session from the statistics of the moment: planned
-- while audit_log was small (a new database, or one analysed before the relay wrote to it),
-- the lookups are sequential scans, and the session keeps that plan while the table grows.
-- On a fresh database after 6,000 claimed intents each call took 1.9 ms (two scans of 4,800
-- rows): the claim cost 3.7 ms per intent, the write-back (whose promotion touches each
-- blocked intent for the first time) 4.1 ms; sql/0019's statement trigger, which scanned the
-- table once per UPDATE, had the same cause (docs/performance.md, run E's regression).
--
-- Now: one statement trigger again (sql/0019's rows, order and conflict rule), which leaves at
-- once unless the statement touched an intent for the first time (attempts = 0 before it: a
-- claim or a promotion), and whose lookups are index probes at every size of the table: each
-- is a LATERAL probe per row (an anti-join let the planner, which takes a transition table
-- for one row, scan every `intent` row of the index per intent), and enable_seqscan is off
-- while it plans (every lookup is equality on the unique key audit_log_chain_position). It fires before payment_intents_audit_update (triggers of one
-- event fire in name order), so a creation row precedes the UPDATE's own row, as before.
CREATE FUNCTION outbox.audit_intent_creations_v2() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
SET enable_seqscan = off
AS $$
BEGIN
    -- Most UPDATEs (write-backs, retries, a promoted intent's claim) touch no new intent.
    IF NOT EXISTS (SELECT 1 FROM old_rows AS o WHERE o.attempts = 0) THEN
        RETURN NULL;
    END IF;
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
            -- A payment's first (when its chain is empty: the INSERT created it), then its
            -- intents', as the INSERT left them; per payment, in intent id order.
            SELECT 0 AS kind, p.payment_id AS payment_id, 0::bigint AS intent_id,
                   p.created_at AS at, coalesce(p.created_by, 'db:unknown') AS actor,
                   'payment'::text AS entity, p.payment_id AS entity_id,
                   outbox.audit_payment_doc(p) AS after
            FROM outbox.payments AS p
            LEFT JOIN LATERAL (
                SELECT true AS found FROM outbox.audit_log AS a
                WHERE a.entity = 'payment' AND a.entity_id = p.payment_id AND a.chain_seq = 1
                LIMIT 1
            ) AS f ON true
            WHERE p.payment_id IN (SELECT o.payment_id FROM old_rows AS o WHERE o.attempts = 0)
              AND f.found IS NULL
            UNION ALL
            SELECT 1, o.payment_id, o.id, o.created_at, coalesce(o.created_by, 'db:unknown'),
                   'intent', o.id::text, outbox.audit_intent_doc(o)
            FROM old_rows AS o
            LEFT JOIN LATERAL (
                SELECT true AS found FROM outbox.audit_log AS a
                WHERE a.entity = 'intent' AND a.entity_id = o.id::text AND a.chain_seq = 1
                LIMIT 1
            ) AS f ON true
            WHERE o.attempts = 0 AND f.found IS NULL
            ORDER BY 2, 1, 3
        ) AS e
    ) AS c
    -- Two transactions writing the same payment's first row cannot both succeed; the one
    -- that waits keeps the other's.
    ON CONFLICT (entity, entity_id, chain_seq) DO NOTHING;
    RETURN NULL;
END;
$$;

DROP TRIGGER payment_intents_audit_0_creation ON outbox.payment_intents;
DROP FUNCTION outbox.audit_intent_creation();
CREATE TRIGGER payment_intents_audit_0_creation
    AFTER UPDATE ON outbox.payment_intents
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT
    EXECUTE FUNCTION outbox.audit_intent_creations_v2();

REVOKE ALL ON FUNCTION outbox.audit_intent_creations_v2() FROM PUBLIC;
