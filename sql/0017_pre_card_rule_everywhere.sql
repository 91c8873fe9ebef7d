-- One card-number rule for every text and JSON value an application writes, checked before
-- any rule whose error could show the row.
--
-- Found by review (issue 17): a card number with `.` separators after invisible characters
-- (U+202E, U+200B, U+FEFF, then `3056.9300.0902.0004`) in idempotency_key was not a card
-- to outbox.contains_card_number (sql/0009: one space or dash between groups, nothing
-- invisible). The row went on to the CHECK payment_intents_idempotency_key_printable_max_255,
-- whose DETAIL "Failing row contains (...)" sent the whole row, card number included, to
-- the application's error handler, its log and the server log. Every CHECK and NOT NULL did
-- the same for a row holding a card the rule missed, in any column.
--
-- The rule now, for intents and events alike (outbox.contains_card_number, under the same
-- names <table>_<column>_not_card_number):
--
-- * invisible and formatting characters are removed first: Unicode's format characters
--   (Cf: soft hyphen, zero-width space and joiners, direction marks and overrides, word
--   joiner, BOM, ...), variation selectors, the combining grapheme joiner and the Hangul
--   and Khmer fillers; nobody reading the text sees them between two digits;
-- * a run of separators between digit groups counts as one: every Unicode space, control
--   character, dash (Pd, and the minus sign), `.`, `_`, `/`, `\`, middle dots and bullets,
--   and a control character escaped in jsonb's text (`\n`, `\t`, `\u001f`, ...);
-- * then sql/0009's shapes, unchanged: 13 to 19 digits beginning with 2 to 6, Luhn-valid,
--   contiguous or grouped as printed (4-4-4-4, 4-4-4-4-3, 4-6-5, 4-6-4), outside UUIDs,
--   W3C traceparents and hex runs of 20+ characters. Ids made of dates, timestamps and
--   counters (`invoice 2026-12-03 000042`, `order-1764747123-00042`) stay accepted; a comma
--   is no separator (jsonb arrays of years would be cards one time in ten).
-- * events.traceparent is scanned too (it was left to its format CHECK, which echoed it).
--
-- And no CHECK or NOT NULL can show a row that may hold a card: when the cheap pre-filter
-- finds 13 digits with only separators and invisible characters between them anywhere in
-- the row (a row that may hold card data, whether or not the rule calls it a card), the
-- guard checks every CHECK and NOT NULL of the application's columns itself and refuses by
-- the constraint's name and SQLSTATE (23514 check_violation, 23502 not_null_violation with
-- the column), its message withholding the value and the row. The table's constraints stay
-- as the backstop for the other rows, whose DETAIL can show no card.
--
-- Cost (benchmarks/insert_cost.py): the pre-filter keeps sql/0015's shape, one regular
-- expression over the row's text columns; its class is larger (a run of separators instead
-- of at most one) and a second expression runs only for a row holding a backslash.

-- 1. The rule ---------------------------------------------------------------------------

-- True when the text may hold a card: 13 digits with only separators, invisible characters
-- or jsonb's control escapes between them. A superset of outbox.contains_card_number, cheap
-- enough for every row (the second test runs only for text holding a backslash). SQL, so it
-- is inlined into the insert triggers' pre-filters.
CREATE FUNCTION outbox.may_hold_card_number(candidate text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT candidate ~ '[0-9](?:[\x01-\x1f\x7f-\x9f\u0020\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a-\u2e3b\u2e40\u2e5d\u301c\u3030\u30a0\ufe31-\ufe32\ufe58\ufe63\uff0d\U00010ead\u2212\u002e\u005f\u002f\u005c\u00b7\u2022\u2024\u2219\uff0e\uff0f\uff3f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f\u034f\u115f\u1160\u17b4-\u17b5\u180b-\u180d\u180f\u3164\ufe00-\ufe0f\uffa0\U000e0100-\U000e01ef]*[0-9]){12}'
        OR (strpos(candidate, '\') > 0
            AND candidate ~ '[0-9](?:(?:[\x01-\x1f\x7f-\x9f\u0020\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a-\u2e3b\u2e40\u2e5d\u301c\u3030\u30a0\ufe31-\ufe32\ufe58\ufe63\uff0d\U00010ead\u2212\u002e\u005f\u002f\u005c\u00b7\u2022\u2024\u2219\uff0e\uff0f\uff3f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f\u034f\u115f\u1160\u17b4-\u17b5\u180b-\u180d\u180f\u3164\ufe00-\ufe0f\uffa0\U000e0100-\U000e01ef]|\\(?:[bfnrt]|u00[01][0-9A-Fa-f]))*[0-9]){12}')
$$;

COMMENT ON FUNCTION outbox.may_hold_card_number(text) IS
    'True when the text holds 13 digits with only separators, invisible characters or jsonb '
    'control escapes between them: a superset of contains_card_number, for pre-filters.';

-- The text as the card rule reads it: invisible characters removed, jsonb's control escapes
-- read as separators, formatted hex identifiers replaced by #, each run of separators one
-- space.
CREATE FUNCTION outbox.card_scan_text(candidate text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT regexp_replace(
        regexp_replace(
            regexp_replace(
                regexp_replace(candidate, '[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f\u034f\u115f\u1160\u17b4-\u17b5\u180b-\u180d\u180f\u3164\ufe00-\ufe0f\uffa0\U000e0100-\U000e01ef]+', '', 'g'),
                '\\(?:[bfnrt]|u00[01][0-9A-Fa-f])', ' ', 'g'),
            '[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}'
            '|[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}'
            '|[0-9A-Fa-f]{20,}', '#', 'g'),
        '[\x01-\x1f\x7f-\x9f\u0020\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a-\u2e3b\u2e40\u2e5d\u301c\u3030\u30a0\ufe31-\ufe32\ufe58\ufe63\uff0d\U00010ead\u2212\u002e\u005f\u002f\u005c\u00b7\u2022\u2024\u2219\uff0e\uff0f\uff3f]+', ' ', 'g')
$$;

CREATE OR REPLACE FUNCTION outbox.contains_card_number(candidate text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    run     text;
    g       text[];
    n       int;
    i       int;
BEGIN
    IF candidate IS NULL OR NOT outbox.may_hold_card_number(candidate) THEN
        RETURN false;
    END IF;
    candidate := outbox.card_scan_text(candidate);
    FOR run IN SELECT m[1] FROM regexp_matches(candidate, '([0-9]+(?: [0-9]+)*)', 'g') AS m LOOP
        CONTINUE WHEN length(run) < 13;
        g := string_to_array(run, ' ');
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
    'the Luhn check, contiguous or grouped as printed (4-4-4-4, 4-4-4-4-3, 4-6-5, 4-6-4), where '
    'invisible and formatting characters are ignored and any run of separators (spaces, '
    'controls, dashes, . _ / \, jsonb control escapes) parts two groups; outside UUIDs, W3C '
    'traceparents and hex runs of 20+ characters.';

-- A NOT NULL refusal that shows no row: SQLSTATE and column as PostgreSQL reports them.
CREATE FUNCTION outbox.refuse_null(p_table text, p_column text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'not_null_violation',
        SCHEMA = 'outbox', TABLE = p_table, COLUMN = p_column,
        MESSAGE = format('null value in column "%s" of relation "%s" violates not-null constraint '
                         '(the row is withheld: it may hold card data)', p_column, p_table),
        HINT = format('Send a value for %s.%s.', p_table, p_column);
END;
$$;

-- 2. payment_intents: the pre-filter and the guards ---------------------------------------

-- sql/0015's pre-filter with the card test widened to outbox.may_hold_card_number; '|' (no
-- separator) between the columns keeps digits of two columns from joining.
CREATE OR REPLACE FUNCTION outbox.payment_intents_may_break_input_rules(i outbox.payment_intents) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT i.amount_minor >= 1000000000000
        OR pg_column_size(i.metadata) > 16384
        OR length(i.payment_id) > 200
        OR outbox.may_hold_card_number(concat_ws('|', i.payment_id, i.action, i.provider, i.currency,
                                                 i.idempotency_key, i.metadata::text))
        OR i.payment_id ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
        OR jsonb_path_exists(i.metadata, 'strict $.**{33}')
        OR NOT (i.payment_method ~ '^[A-Za-z0-9_]+$' AND length(i.payment_method) BETWEEN 3 AND 255)
        OR translate(i.payment_method, '_', '') ~ '[0-9]{13}'
        OR (i.metadata ? 'traceparent'
            AND NOT (jsonb_typeof(i.metadata -> 'traceparent') = 'string'
                     AND outbox.is_valid_traceparent(i.metadata ->> 'traceparent')))
$$;

-- Every CHECK and NOT NULL on the columns an application writes, by the constraint's name,
-- showing neither the value nor the row. Called for a row the pre-filter let in (it may
-- hold card data) once the card rules passed, so no constraint of the table fires for it.
CREATE FUNCTION outbox.payment_intents_refuse_like_constraints(i outbox.payment_intents) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF i.payment_id IS NULL THEN PERFORM outbox.refuse_null('payment_intents', 'payment_id'); END IF;
    IF i.action IS NULL THEN PERFORM outbox.refuse_null('payment_intents', 'action'); END IF;
    IF i.provider IS NULL THEN PERFORM outbox.refuse_null('payment_intents', 'provider'); END IF;
    IF i.currency IS NULL THEN PERFORM outbox.refuse_null('payment_intents', 'currency'); END IF;
    IF i.metadata IS NULL THEN PERFORM outbox.refuse_null('payment_intents', 'metadata'); END IF;
    IF NOT (i.action = ANY (ARRAY['authorize', 'capture', 'charge', 'void', 'refund'])) THEN
        PERFORM outbox.refuse_input('payment_intents', 'action', 'payment_intents_action_valid',
            'is not one of authorize, capture, charge, void, refund');
    END IF;
    IF i.payment_id !~ '\S' THEN
        PERFORM outbox.refuse_input('payment_intents', 'payment_id', 'payment_intents_payment_id_nonblank_max_200',
            'is blank; it needs a non-space character and at most 200');
    END IF;
    IF NOT (i.provider ~ '^[a-z][a-z0-9_]*$' AND length(i.provider) <= 63) THEN
        PERFORM outbox.refuse_input('payment_intents', 'provider', 'payment_intents_provider_lowercase_identifier',
            'is not a lower-case identifier of at most 63 characters',
            'Name the provider as configured, such as stripe.');
    END IF;
    IF i.amount_minor <= 0 THEN
        PERFORM outbox.refuse_input('payment_intents', 'amount_minor', 'payment_intents_amount_minor_positive',
            'is not positive', 'Send the amount in minor units, e.g. 1999 for EUR 19.99.');
    END IF;
    IF i.action IN ('authorize', 'charge') AND i.amount_minor IS NULL THEN
        PERFORM outbox.refuse_input('payment_intents', 'amount_minor',
            'payment_intents_amount_minor_required_for_authorize_charge', 'is missing for an authorize or a charge');
    END IF;
    IF i.action IN ('authorize', 'charge') AND i.payment_method IS NULL THEN
        PERFORM outbox.refuse_input('payment_intents', 'payment_method',
            'payment_intents_payment_method_required_for_authorize_charge', 'is missing for an authorize or a charge');
    END IF;
    IF NOT (i.idempotency_key ~ '^[!-~]+$' AND length(i.idempotency_key) <= 255) THEN
        PERFORM outbox.refuse_input('payment_intents', 'idempotency_key',
            'payment_intents_idempotency_key_printable_max_255',
            format('is not 1 to 255 printable ASCII characters (%s characters)', length(i.idempotency_key)),
            'Use printable ASCII without spaces, or omit the key to have one derived.');
    END IF;
    IF jsonb_typeof(i.metadata) <> 'object' THEN
        PERFORM outbox.refuse_input('payment_intents', 'metadata', 'payment_intents_metadata_is_object',
            format('is a JSON %s, not an object', jsonb_typeof(i.metadata)));
    END IF;
END;
$$;
REVOKE ALL ON FUNCTION outbox.payment_intents_refuse_like_constraints(outbox.payment_intents) FROM PUBLIC;

CREATE OR REPLACE FUNCTION outbox.payment_intents_check_input(i outbox.payment_intents) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF i.amount_minor >= 1000000000000 THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'amount_minor',
            CONSTRAINT = 'payment_intents_amount_minor_max_12_digits',
            MESSAGE = 'payment_intents.amount_minor has more than 12 digits; amounts are in minor '
                      'units below 1,000,000,000,000 (the value was not stored)',
            HINT = 'Send the amount in minor units of the currency, e.g. 1999 for EUR 19.99.';
    END IF;
    PERFORM outbox.payment_intents_refuse_hostile_input(i);
    PERFORM outbox.payment_intents_refuse_payment_method(i);
    IF jsonb_typeof(i.metadata) = 'object' AND i.metadata ? 'traceparent' AND NOT (
        jsonb_typeof(i.metadata -> 'traceparent') = 'string'
        AND outbox.is_valid_traceparent(i.metadata ->> 'traceparent')
    ) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'metadata',
            CONSTRAINT = 'payment_intents_traceparent_w3c',
            MESSAGE = 'payment_intents.metadata.traceparent is not a W3C traceparent (value withheld)',
            HINT = 'Use 00-<32 lower-case hex trace id, not all zero>-<16 hex parent id, not all zero>-<2 hex flags>, '
                   'e.g. 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01, or leave traceparent out.';
    END IF;
    -- Last: a row that got here may hold card data, so no table constraint may see it.
    PERFORM outbox.payment_intents_refuse_like_constraints(i);
END;
$$;

-- 3. events: the same rule, traceparent scanned, constraints checked without the row -----

CREATE OR REPLACE FUNCTION outbox.events_hostile_input() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    card_hint constant text := 'A card number must never be stored or published: send the provider''s token.';
    controls constant text := '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]';
BEGIN
    IF pg_column_size(NEW.payload) > 262144 THEN
        PERFORM outbox.refuse_input('events', 'payload', 'events_payload_max_256kb',
            format('is %s bytes; at most 262144', pg_column_size(NEW.payload)));
    END IF;
    IF pg_column_size(NEW.headers) > 16384 THEN
        PERFORM outbox.refuse_input('events', 'headers', 'events_headers_max_16kb',
            format('is %s bytes; at most 16384', pg_column_size(NEW.headers)));
    END IF;
    PERFORM outbox.refuse_card_number('events', 'exchange', NEW.exchange, card_hint);
    PERFORM outbox.refuse_card_number('events', 'routing_key', NEW.routing_key, card_hint);
    PERFORM outbox.refuse_card_number('events', 'event_type', NEW.event_type, card_hint);
    PERFORM outbox.refuse_card_number('events', 'ordering_key', NEW.ordering_key, card_hint);
    PERFORM outbox.refuse_card_number('events', 'payment_id', NEW.payment_id, card_hint);
    PERFORM outbox.refuse_card_number('events', 'traceparent', NEW.traceparent, card_hint);
    PERFORM outbox.refuse_card_number('events', 'payload', NEW.payload::text, card_hint, ' in a key or value');
    PERFORM outbox.refuse_card_number('events', 'headers', NEW.headers::text, card_hint, ' in a name or value');
    IF NEW.ordering_key ~ controls THEN
        PERFORM outbox.refuse_input('events', 'ordering_key', 'events_ordering_key_no_control_characters',
            'holds a control character or a bidirectional override');
    END IF;
    IF NEW.payment_id ~ controls THEN
        PERFORM outbox.refuse_input('events', 'payment_id', 'events_payment_id_no_control_characters',
            'holds a control character or a bidirectional override');
    END IF;
    IF outbox.jsonb_deeper_than(NEW.payload, 65) THEN
        PERFORM outbox.refuse_input('events', 'payload', 'events_payload_max_depth_64',
            'nests deeper than 64 levels');
    END IF;
    -- Every CHECK and NOT NULL of the writer's columns (see payment_intents_refuse_like_constraints).
    IF NEW.routing_key IS NULL THEN PERFORM outbox.refuse_null('events', 'routing_key'); END IF;
    IF NEW.payload IS NULL THEN PERFORM outbox.refuse_null('events', 'payload'); END IF;
    IF NEW.headers IS NULL THEN PERFORM outbox.refuse_null('events', 'headers'); END IF;
    IF NEW.schema_version IS NULL THEN PERFORM outbox.refuse_null('events', 'schema_version'); END IF;
    IF NOT (NEW.exchange ~ '^[A-Za-z0-9_.:-]+$' AND length(NEW.exchange) <= 255) THEN
        PERFORM outbox.refuse_input('events', 'exchange', 'events_exchange_name_format',
            'is not 1 to 255 letters, digits and _ . : -');
    END IF;
    IF NOT (NEW.routing_key ~ '^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$' AND length(NEW.routing_key) <= 255) THEN
        PERFORM outbox.refuse_input('events', 'routing_key', 'events_routing_key_dotted_words',
            'is not dot-separated words of letters, digits, _ and - (at most 255 characters)');
    END IF;
    IF NOT (NEW.event_type ~ '^[!-~]+$' AND length(NEW.event_type) <= 255) THEN
        PERFORM outbox.refuse_input('events', 'event_type', 'events_event_type_format',
            'is not 1 to 255 printable ASCII characters without spaces');
    END IF;
    IF NOT (NEW.ordering_key ~ '\S' AND length(NEW.ordering_key) <= 255) THEN
        PERFORM outbox.refuse_input('events', 'ordering_key', 'events_ordering_key_nonblank_max_255',
            'is blank or longer than 255 characters');
    END IF;
    IF NOT (NEW.payment_id ~ '\S' AND length(NEW.payment_id) <= 200) THEN
        PERFORM outbox.refuse_input('events', 'payment_id', 'events_payment_id_nonblank_max_200',
            'is blank or longer than 200 characters');
    END IF;
    IF NOT (NEW.traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$') THEN
        PERFORM outbox.refuse_input('events', 'traceparent', 'events_traceparent_format',
            'is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)');
    END IF;
    IF NEW.schema_version <= 0 THEN
        PERFORM outbox.refuse_input('events', 'schema_version', 'events_schema_version_positive', 'is not positive');
    END IF;
    IF jsonb_typeof(NEW.headers) <> 'object' THEN
        PERFORM outbox.refuse_input('events', 'headers', 'events_headers_is_object',
            format('is a JSON %s, not an object', jsonb_typeof(NEW.headers)));
    END IF;
    IF jsonb_path_exists(NEW.headers,
        'strict $.*?(((@.type() == "object" || @.type() == "array") || @.type() == "null") || @.type() == "number" && (@ > 9007199254740991 || @ < -9007199254740991))',
        '{}', true) THEN
        PERFORM outbox.refuse_input('events', 'headers', 'events_headers_flat_scalars',
            'holds an object, an array, a null or a number beyond 2^53 - 1',
            'Each header is a string, a boolean or a number within JavaScript''s safe integers.');
    END IF;
    IF NEW.headers ?| ARRAY['schema-version', 'traceparent', 'ordering-key', 'sequence'] THEN
        PERFORM outbox.refuse_input('events', 'headers', 'events_headers_reserved_names',
            'uses a name the relay sets (schema-version, traceparent, ordering-key, sequence)');
    END IF;
    RETURN NEW;
END;
$$;

DROP TRIGGER events_0_hostile_input ON outbox.events;
CREATE TRIGGER events_0_hostile_input
    BEFORE INSERT OR UPDATE OF exchange, routing_key, event_type, ordering_key, payment_id, payload, headers,
                               traceparent
    ON outbox.events
    FOR EACH ROW
    WHEN (NOT (coalesce(current_setting('outbox.actor', true), '') LIKE 'relay:%'
               AND pg_has_role(session_user, 'outbox_relay', 'MEMBER'))
          AND (pg_column_size(NEW.payload) > 262144
               OR pg_column_size(NEW.headers) > 16384
               OR outbox.may_hold_card_number(concat_ws('|', NEW.exchange, NEW.routing_key, NEW.event_type,
                                                        NEW.ordering_key, NEW.payment_id, NEW.traceparent,
                                                        NEW.payload::text, NEW.headers::text))
               OR NEW.ordering_key ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
               OR NEW.payment_id ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
               OR jsonb_path_exists(NEW.payload, 'strict $.**{65}')))
    EXECUTE FUNCTION outbox.events_hostile_input();
