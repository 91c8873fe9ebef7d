-- An amount has at most 12 digits in minor units (below 10^12; Stripe accepts 8). Found by
-- tests/test_hostile_input.py: amount_minor had no upper bound, so a Luhn-valid 13 to 19
-- digit number (a card number sent in the wrong column) was stored as an amount, and the
-- ledger's sums could approach bigint's range. The check is a BEFORE trigger named to fire
-- with 0009's guards, before any CHECK constraint, whose DETAIL would echo the whole row;
-- its message names the rule and never quotes the value.

CREATE FUNCTION outbox.payment_intents_amount_bound() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'check_violation',
        SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'amount_minor',
        CONSTRAINT = 'payment_intents_amount_minor_max_12_digits',
        MESSAGE = 'payment_intents.amount_minor has more than 12 digits; amounts are in minor '
                  'units below 1,000,000,000,000 (the value was not stored)',
        HINT = 'Send the amount in minor units of the currency, e.g. 1999 for EUR 19.99.';
END;
$$;

CREATE TRIGGER payment_intents_0_amount_bound
    BEFORE INSERT OR UPDATE OF amount_minor ON outbox.payment_intents
    FOR EACH ROW
    WHEN (NEW.amount_minor >= 1000000000000)
    EXECUTE FUNCTION outbox.payment_intents_amount_bound();
REVOKE ALL ON FUNCTION outbox.payment_intents_amount_bound() FROM PUBLIC;
