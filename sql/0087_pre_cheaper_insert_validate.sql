-- Validate sql/0086's restated payments rules, added NOT VALID there so that adding them
-- scanned nothing under ACCESS EXCLUSIVE (docs/developing.md); VALIDATE scans under SHARE
-- UPDATE EXCLUSIVE.
ALTER TABLE outbox.payments VALIDATE CONSTRAINT payments_state_valid;
ALTER TABLE outbox.payments VALIDATE CONSTRAINT payments_dispute_status_valid;
ALTER TABLE outbox.payments VALIDATE CONSTRAINT payments_awaiting_valid;
