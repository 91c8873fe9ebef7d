-- Validate sql/0027's constraints on payment_intents, added NOT VALID there so that adding
-- them scanned nothing under ACCESS EXCLUSIVE. VALIDATE scans under SHARE UPDATE EXCLUSIVE:
-- the relay and the applications' INSERTs go on meanwhile (docs/developing.md).
ALTER TABLE outbox.payment_intents VALIDATE CONSTRAINT payment_intents_fx_all_or_none;
ALTER TABLE outbox.payment_intents VALIDATE CONSTRAINT payment_intents_original_amount_positive;
ALTER TABLE outbox.payment_intents VALIDATE CONSTRAINT payment_intents_original_currency_differs;
ALTER TABLE outbox.payment_intents VALIDATE CONSTRAINT payment_intents_fx_rate_id_fkey;
ALTER TABLE outbox.payment_intents VALIDATE CONSTRAINT payment_intents_fx_via_rate_id_fkey;
