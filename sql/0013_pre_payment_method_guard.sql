-- payment_method: refuse anything as long as a card number, and never quote the value.
--
-- Found by review:
-- * outbox.looks_like_card_number (sql/0001) tests whole runs of 13 to 19 digits (single
--   spaces or dashes between them) for Luhn. A card followed by its expiry,
--   `42424242424242421230`, is a run of 20 digits: it was not tested, and it was STORED.
-- * `4242424242424242 1230` and `4242-4242-4242-4242-999` are runs of 20 and 19 digits that
--   fail Luhn as a whole: they got past that test to the token-format CHECK, whose DETAIL
--   ("Failing row contains (...)") sent the whole row, card number included, to the client
--   and to the server log.
--
-- The rule now, under the same name (payment_intents_payment_method_not_card_number): a
-- payment_method holding 13 or more digits in a row is refused, Luhn or not, where any
-- character other than a letter between two digits (space, dash, dot, underscore, other
-- punctuation) does not end the row. A provider token never holds that many: Stripe's are
-- `pm_` and 24 letters and digits. Testing every 13 to 19 digit window for Luhn instead
-- would refuse a 16-digit number that is no card two times in three (10 windows, one in
-- ten passing by chance): a refusal at random is worse than a rule one can read. Other
-- columns keep sql/0009's card shapes (ids made of timestamps and counters must pass).
--
-- The token format (3 to 255 characters, each a letter, a digit or `_`) is checked here
-- too, under the CHECK's name (payment_intents_payment_method_token_format), after the
-- card rule. Both messages withhold the value. This trigger fires before every CHECK, so
-- the CHECK, kept as a backstop, never sees a payment_method it would refuse: no refusal
-- of a payment_method can echo it.
--
-- Cost: the WHEN clause is two regular expressions over a short token; the function runs
-- only for a value that breaks a rule. The relay never updates payment_method, so its
-- write-backs never fire it, and rows stored before this migration are not re-checked.

CREATE FUNCTION outbox.payment_intents_payment_method_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF regexp_replace(NEW.payment_method, '[^A-Za-z0-9]+', '', 'g') ~ '[0-9]{13}' THEN
        PERFORM outbox.refuse_input('payment_intents', 'payment_method',
            'payment_intents_payment_method_not_card_number',
            'looks like a raw card number: 13 or more digits in a row (separators ignored), '
            'which no provider token holds; it was not stored',
            'Tokenise the card with the provider and send its token (pm_...).');
    END IF;
    IF NEW.payment_method !~ '^[A-Za-z0-9_]{3,255}$' THEN
        PERFORM outbox.refuse_input('payment_intents', 'payment_method',
            'payment_intents_payment_method_token_format',
            format('is not a provider token (%s characters; a token has 3 to 255, each a letter, '
                   'a digit or _)', length(NEW.payment_method)),
            'Send the provider''s token for the payment method, such as pm_card_visa.');
    END IF;
    RETURN NEW;
END;
$$;
REVOKE ALL ON FUNCTION outbox.payment_intents_payment_method_guard() FROM PUBLIC;

-- '0_p' sorts after sql/0009's '0_hostile_input' (card numbers in the other columns) and
-- before '_a_key_not_archived', '_b_traceparent_w3c' and '_before_insert': BEFORE triggers
-- run in name order, and all of them before any CHECK. With a valid token format the only
-- separator left is `_`, hence the translate().
CREATE TRIGGER payment_intents_0_payment_method
    BEFORE INSERT OR UPDATE OF payment_method ON outbox.payment_intents
    FOR EACH ROW
    WHEN (NEW.payment_method !~ '^[A-Za-z0-9_]{3,255}$'
          OR translate(NEW.payment_method, '_', '') ~ '[0-9]{13}')
    EXECUTE FUNCTION outbox.payment_intents_payment_method_guard();
