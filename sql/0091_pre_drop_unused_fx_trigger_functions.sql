-- outbox.payment_intents_fx_charge_rate() and outbox.payment_intents_fx_guard() were the
-- functions of two BEFORE INSERT triggers on payment_intents (sql/0027 to sql/0030). sql/0086
-- folded their rules into payment_intents_before_insert (as the row functions
-- payment_intents_fx_charge_rate_v1 and payment_intents_fx_guard_v1) and dropped the
-- triggers; no trigger or statement calls the old functions. Left in place they read as a
-- second copy of the FX rules, one that nothing runs. The relay never called them, so a
-- relay of either release runs against this schema unchanged.
DROP FUNCTION outbox.payment_intents_fx_charge_rate();
DROP FUNCTION outbox.payment_intents_fx_guard();
