-- Validate sql/0029's wider reconciliation_exceptions.kind rule, added NOT VALID there so
-- that adding it scanned nothing under ACCESS EXCLUSIVE (docs/developing.md).
ALTER TABLE outbox.reconciliation_exceptions VALIDATE CONSTRAINT reconciliation_exceptions_kind_valid;
