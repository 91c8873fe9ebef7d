-- Validate sql/0035's rules, added NOT VALID there so that adding them scanned nothing
-- under ACCESS EXCLUSIVE (docs/developing.md); VALIDATE scans under SHARE UPDATE EXCLUSIVE.
ALTER TABLE outbox.payments VALIDATE CONSTRAINT payments_disputed_within_captured;
ALTER TABLE outbox.payments VALIDATE CONSTRAINT payments_dispute_status_valid;
ALTER TABLE outbox.ledger_transactions VALIDATE CONSTRAINT ledger_transactions_kind_valid;
