-- outbox.audit_payment_intent_inserted wrote an intent's creation audit row from a per-row
-- INSERT trigger (sql/0010, restated by sql/0015). Since sql/0037 the relay writes creation
-- rows set-based on its first touch (sql/0060), and no trigger calls the function: left in
-- place it reads as a second, contradicting account of when a creation is audited.
DROP FUNCTION outbox.audit_payment_intent_inserted();
