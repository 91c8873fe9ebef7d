-- A card number is refused by its shape, not by any 13 digits with dashes in between.
--
-- sql/0009 refused, in every column an application writes, any run of 13 to 19 digits
-- with single spaces or dashes anywhere between them that passed the Luhn check. One
-- such run in ten passes Luhn by chance, so ordinary identifiers were refused at random:
-- `order-1764747123-00042` (a timestamp and a counter), `1764747123456` (a timestamp in
-- milliseconds), `outbox-relay demo`'s own payment ids. An application whose INSERT fails
-- one time in ten for its own ids is worse off than one without the rule.
--
-- A card number as people and systems write it (a primary account number, ISO/IEC 7812):
--
-- * 13 to 19 digits, contiguous, or grouped as printed on cards: fours (4-4-4-4,
--   4-4-4-4-3, and a shorter last group: 4-4-4-1..4), or 4-6-5 / 4-6-4 (American Express,
--   Diners), each time with one space or dash between groups;
-- * beginning with 2 to 6, the major industry identifiers of the card networks (Mastercard
--   2 and 5, American Express, Diners and JCB 3, Visa 4, Discover, Maestro and UnionPay 6);
--   1 (airlines), 7 to 9 and 0 are not payment cards, and are where timestamps and most
--   counters start;
-- * passing the Luhn check.
--
-- A run of digit groups is searched for such a number at every group boundary, so a card
-- followed by an expiry (`4242 4242 4242 4242 12 30`) is still found, while a digit
-- group that is part of a longer number is not (a 23-digit number is no card).
-- Unchanged: UUIDs, W3C traceparents and hex runs of 20+ characters are skipped first;
-- payment_method keeps sql/0001's stricter rule (a token never holds 13 digits); the
-- relay's log redaction and the audit trail's redaction keep the broad rule, since masking
-- too much there costs nothing.

-- True when `digits` (digits only) is a card number: 13 to 19 digits, network 2 to 6, Luhn.
CREATE FUNCTION outbox.is_card_number(digits text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT length(digits) BETWEEN 13 AND 19
       AND left(digits, 1) BETWEEN '2' AND '6'
       AND outbox.looks_like_card_number(digits)
$$;

CREATE OR REPLACE FUNCTION outbox.contains_card_number(candidate text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    run     text;
    g       text[];
    n       int;
    i       int;
BEGIN
    IF candidate IS NULL OR candidate !~ '[0-9](?:[ -]?[0-9]){12}' THEN
        RETURN false;
    END IF;
    candidate := regexp_replace(candidate,
        '[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}'
        '|[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}'
        '|[0-9A-Fa-f]{20,}', '#', 'g');
    FOR run IN SELECT m[1] FROM regexp_matches(candidate, '([0-9]+(?:[ -][0-9]+)*)', 'g') AS m LOOP
        CONTINUE WHEN length(run) < 13;
        g := regexp_split_to_array(run, '[ -]');
        n := cardinality(g);
        FOR i IN 1 .. n LOOP
            IF outbox.is_card_number(g[i]) THEN
                RETURN true;
            END IF;
            CONTINUE WHEN length(g[i]) <> 4 OR i + 2 > n;
            IF length(g[i + 1]) = 4 AND length(g[i + 2]) = 4 AND i + 3 <= n THEN
                IF length(g[i + 3]) <= 4
                   AND outbox.is_card_number(g[i] || g[i + 1] || g[i + 2] || g[i + 3]) THEN
                    RETURN true;
                END IF;
                IF length(g[i + 3]) = 4 AND i + 4 <= n AND length(g[i + 4]) <= 3
                   AND outbox.is_card_number(g[i] || g[i + 1] || g[i + 2] || g[i + 3] || g[i + 4]) THEN
                    RETURN true;
                END IF;
            END IF;
            IF length(g[i + 1]) = 6 AND length(g[i + 2]) IN (4, 5)
               AND outbox.is_card_number(g[i] || g[i + 1] || g[i + 2]) THEN
                RETURN true;
            END IF;
        END LOOP;
    END LOOP;
    RETURN false;
END;
$$;

COMMENT ON FUNCTION outbox.contains_card_number(text) IS
    'True when the text holds a card number: 13 to 19 digits beginning with 2 to 6 and passing '
    'the Luhn check, contiguous or grouped as printed (4-4-4-4, 4-4-4-4-3, 4-6-5, 4-6-4; one '
    'space or dash between groups), outside UUIDs, W3C traceparents and hex runs of 20+ characters.';

-- The same rights as the helpers the guards already call (tests/test_least_privilege.py).
GRANT EXECUTE ON FUNCTION outbox.is_card_number(text) TO PUBLIC;
