-- The application's INSERT pays for the audit rows of a new intent and of a new payment.
-- 0005 wrote them with statement-level triggers over transition tables, which suits the
-- relay's write-backs of hundreds of rows but is the wrong shape for the application's
-- usual statement of one row: a transition table, a jsonb array and a set-based INSERT
-- for one row cost the application about half of its INSERT throughput
-- (benchmarks/insert_cost.py). Inserts are now audited by row-level triggers calling
-- outbox.audit_write directly (2.1x the single-row INSERT rate in pgbench, measured while
-- writing this). The rows written are identical: same document, operation, actor, chain
-- position and hash, and the payment's row still precedes its intent's. UPDATEs keep the
-- statement-level triggers, where batching pays.

CREATE FUNCTION outbox.audit_payment_intent_inserted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM outbox.audit_write('intent', NEW.id::text, NEW.payment_id, 'insert', NULL,
                               outbox.audit_intent_doc(NEW), outbox.audit_actor());
    RETURN NULL;
END;
$$;

CREATE FUNCTION outbox.audit_payment_inserted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM outbox.audit_write('payment', NEW.payment_id, NEW.payment_id, 'insert', NULL,
                               outbox.audit_payment_doc(NEW), outbox.audit_actor());
    RETURN NULL;
END;
$$;

REVOKE ALL ON FUNCTION outbox.audit_payment_intent_inserted() FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox.audit_payment_inserted() FROM PUBLIC;

DROP TRIGGER payment_intents_audit_insert ON outbox.payment_intents;
CREATE TRIGGER payment_intents_audit_insert
    AFTER INSERT ON outbox.payment_intents
    FOR EACH ROW EXECUTE FUNCTION outbox.audit_payment_intent_inserted();

DROP TRIGGER payments_audit_insert ON outbox.payments;
CREATE TRIGGER payments_audit_insert
    AFTER INSERT ON outbox.payments
    FOR EACH ROW EXECUTE FUNCTION outbox.audit_payment_inserted();
