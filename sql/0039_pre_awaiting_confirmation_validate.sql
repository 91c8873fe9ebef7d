-- Validate sql/0038's wider rules (added NOT VALID) under SHARE UPDATE EXCLUSIVE: reads and
-- writes go on while existing rows are scanned (docs/developing.md, constraints in two steps).
ALTER TABLE outbox.payment_intents VALIDATE CONSTRAINT payment_intents_status_valid;
ALTER TABLE outbox.payments VALIDATE CONSTRAINT payments_awaiting_valid;
ALTER TABLE outbox.ledger_transactions VALIDATE CONSTRAINT ledger_transactions_kind_valid;
ALTER TABLE outbox.reconciliation_exceptions VALIDATE CONSTRAINT reconciliation_exceptions_kind_valid;
ALTER TABLE outbox.reconciliation_exceptions VALIDATE CONSTRAINT reconciliation_exceptions_run_or_notification;
