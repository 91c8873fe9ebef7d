-- Hostile input at INSERT: no card number in any column an application writes, no control
-- characters in identifiers, bounded jsonb depth, and every refusal named.
--
-- Found by tests/test_hostile_input.py (hypothesis-generated INSERTs):
--
-- * A card number was refused in payment_method only. It is now refused in every text
--   column an application writes, and in every key and value (strings and numbers, at any
--   depth) of the jsonb ones: `<table>_<column>_not_card_number`. Here a card number is
--   one as people and systems write it (a primary account number, ISO/IEC 7812): 13 to 19
--   digits beginning with 2 to 6 (the card networks' major industry identifiers: Mastercard
--   2 and 5, American Express, Diners and JCB 3, Visa 4, Discover, Maestro and UnionPay 6),
--   passing the Luhn check, contiguous or grouped as printed (4-4-4-4, 4-4-4-4-3, a shorter
--   last group of four, 4-6-5, 4-6-4; one space or dash between groups), found at any
--   digit-group boundary (`4242 4242 4242 4242 12 30` is a card and an expiry).
--   payment_method's broader rule (any 13 to 19 digits with spaces or dashes anywhere,
--   passing Luhn; outbox.looks_like_card_number) was tried here first and refused
--   ordinary ids at random: one such run in ten passes Luhn by chance, so
--   `order-1764747123-00042` or a millisecond timestamp failed one INSERT in ten, and so
--   did `outbox-relay demo`'s own ids. Timestamps begin with 1 and id-counter pairs are
--   not grouped like cards. The relay's log redaction and the audit trail's redaction keep
--   the broad rule: masking too much there costs nothing.
-- * A table CHECK reports its failure with DETAIL "Failing row contains (...)": the whole
--   row, a card number in metadata included, in the client's error and the server log.
--   The guards below are BEFORE triggers named to fire first (BEFORE triggers run in name
--   order, and before CHECK constraints), so a row carrying a card number is refused
--   before any other rule can echo it, and their messages never quote a value.
-- * A payment_id longer than 200 characters reached the payments upsert (which runs in
--   payment_intents_before_insert, before the CHECK) and failed there with an unnamed
--   btree "index row size exceeds maximum" error: refused first now, under the CHECK's name.
-- * Identifiers accepted control characters (newlines, escape sequences) and bidirectional
--   overrides (the "Trojan Source" characters), which forge log lines and reorder text in
--   an operator's terminal: payment_id and events' ordering_key and payment_id refuse them.
-- * jsonb of any depth was accepted (16 kB holds 8000 levels); Python's json (a consumer
--   of result events, `outbox-relay intents show`) fails past about 1000: metadata is
--   limited to 32 levels, event payloads to 64 (the relay's own result event nests the
--   intent's metadata two levels down).
--
-- A formatted random identifier is not a card number: UUIDs, W3C traceparents and hex runs
-- of 20 or more characters (digests, derived idempotency keys) are skipped before the scan.
-- Without that, 1 in 500 random UUIDs and 1 in 250 traceparents hold a Luhn-valid run of
-- 13 to 19 decimal digits and would be refused.
--
-- Cost: each guard is a trigger whose WHEN clause is one regular expression over the row's
-- text columns (jsonb rendered as text) plus two size and depth tests, evaluated without
-- entering PL/pgSQL; the function runs only for a row that may break a rule. The relay's own
-- result events (written with outbox.actor 'relay:...' by a member of outbox_relay, built
-- from checked columns and redacted messages) skip the events guard, so the write-back
-- pays nothing. An application that names itself relay:... is still checked (sql/0012
-- stops it posing as the relay in the audit trail too).

-- True when `digits` (digits only) is a card number: 13 to 19 digits, network 2 to 6, Luhn.
CREATE FUNCTION outbox.is_card_number(digits text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT length(digits) BETWEEN 13 AND 19
       AND left(digits, 1) BETWEEN '2' AND '6'
       AND outbox.looks_like_card_number(digits)
$$;

CREATE FUNCTION outbox.contains_card_number(candidate text) RETURNS boolean
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

-- Nesting depth of a jsonb value is at least `levels` (a scalar or {} is level 0).
CREATE FUNCTION outbox.jsonb_deeper_than(doc jsonb, levels int) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT jsonb_path_exists(doc, ('strict $.**{' || levels || '}')::jsonpath)
$$;

CREATE FUNCTION outbox.refuse_input(
    p_table text, p_column text, p_constraint text, p_message text, p_hint text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_hint IS NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            SCHEMA = 'outbox', TABLE = p_table, COLUMN = p_column, CONSTRAINT = p_constraint,
            MESSAGE = format('%s.%s %s (value withheld)', p_table, p_column, p_message);
    END IF;
    RAISE EXCEPTION USING
        ERRCODE = 'check_violation',
        SCHEMA = 'outbox', TABLE = p_table, COLUMN = p_column, CONSTRAINT = p_constraint,
        MESSAGE = format('%s.%s %s (value withheld)', p_table, p_column, p_message),
        HINT = p_hint;
END;
$$;

-- Refuse a value holding a card-like number, under the rule <table>_<column>_not_card_number.
CREATE FUNCTION outbox.refuse_card_number(
    p_table text, p_column text, p_value text, p_hint text, p_where text DEFAULT ''
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF outbox.contains_card_number(p_value) THEN
        PERFORM outbox.refuse_input(p_table, p_column, format('%s_%s_not_card_number', p_table, p_column),
            format('holds a card-like number%s (13 to 19 digits passing the Luhn check)', p_where), p_hint);
    END IF;
END;
$$;

-- 1. payment_intents ---------------------------------------------------------------------

CREATE FUNCTION outbox.payment_intents_hostile_input() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    card_hint constant text :=
        'A card number must never be stored: tokenise it with the provider and send its token '
        '(pm_...) in payment_method; keep card data out of ids, keys and metadata.';
BEGIN
    -- Sizes first: nothing below scans a value larger than its rule allows.
    IF pg_column_size(NEW.metadata) > 16384 THEN
        PERFORM outbox.refuse_input('payment_intents', 'metadata', 'payment_intents_metadata_max_16kb',
            format('is %s bytes; at most 16384', pg_column_size(NEW.metadata)));
    END IF;
    IF length(NEW.payment_id) > 200 THEN
        PERFORM outbox.refuse_input('payment_intents', 'payment_id', 'payment_intents_payment_id_nonblank_max_200',
            format('is %s characters long; at most 200', length(NEW.payment_id)));
    END IF;
    -- Card numbers before any rule whose error could show the row.
    PERFORM outbox.refuse_card_number('payment_intents', 'payment_id', NEW.payment_id, card_hint);
    PERFORM outbox.refuse_card_number('payment_intents', 'action', NEW.action, card_hint);
    PERFORM outbox.refuse_card_number('payment_intents', 'provider', NEW.provider, card_hint);
    PERFORM outbox.refuse_card_number('payment_intents', 'currency', NEW.currency, card_hint);
    PERFORM outbox.refuse_card_number('payment_intents', 'idempotency_key', NEW.idempotency_key, card_hint);
    -- jsonb rendered as text: every key and every string or number value, at any depth.
    PERFORM outbox.refuse_card_number('payment_intents', 'metadata', NEW.metadata::text, card_hint, ' in a key or value');
    IF NEW.payment_id ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]' THEN
        PERFORM outbox.refuse_input('payment_intents', 'payment_id', 'payment_intents_payment_id_no_control_characters',
            'holds a control character or a bidirectional override',
            'Use printable characters; newlines, escape sequences and direction overrides forge logs.');
    END IF;
    IF outbox.jsonb_deeper_than(NEW.metadata, 33) THEN
        PERFORM outbox.refuse_input('payment_intents', 'metadata', 'payment_intents_metadata_max_depth_32',
            'nests deeper than 32 levels');
    END IF;
    RETURN NEW;
END;
$$;

-- '0' sorts before every other trigger of the table ('payment_intents_a_...', '_b_...',
-- '_before_insert'), so this guard fires first.
CREATE TRIGGER payment_intents_0_hostile_input
    BEFORE INSERT OR UPDATE OF payment_id, action, provider, currency, idempotency_key, metadata
    ON outbox.payment_intents
    FOR EACH ROW
    WHEN (pg_column_size(NEW.metadata) > 16384
          OR length(NEW.payment_id) > 200
          OR concat_ws(E'\x01', NEW.payment_id, NEW.action, NEW.provider, NEW.currency,
                       NEW.idempotency_key, NEW.metadata::text) ~ '[0-9](?:[ -]?[0-9]){12}'
          OR NEW.payment_id ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
          OR jsonb_path_exists(NEW.metadata, 'strict $.**{33}'))
    EXECUTE FUNCTION outbox.payment_intents_hostile_input();

-- 2. events --------------------------------------------------------------------------------

CREATE FUNCTION outbox.events_hostile_input() RETURNS trigger
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
    RETURN NEW;
END;
$$;

-- Fires before events_before_insert (name order). traceparent is left to its format rule
-- (hex only) and event_id is a uuid column.
CREATE TRIGGER events_0_hostile_input
    BEFORE INSERT OR UPDATE OF exchange, routing_key, event_type, ordering_key, payment_id, payload, headers
    ON outbox.events
    FOR EACH ROW
    WHEN (NOT (coalesce(current_setting('outbox.actor', true), '') LIKE 'relay:%'
               AND pg_has_role(session_user, 'outbox_relay', 'MEMBER'))
          AND (pg_column_size(NEW.payload) > 262144
               OR pg_column_size(NEW.headers) > 16384
               OR concat_ws(E'\x01', NEW.exchange, NEW.routing_key, NEW.event_type, NEW.ordering_key,
                            NEW.payment_id, NEW.payload::text, NEW.headers::text) ~ '[0-9](?:[ -]?[0-9]){12}'
               OR NEW.ordering_key ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
               OR NEW.payment_id ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
               OR jsonb_path_exists(NEW.payload, 'strict $.**{65}')))
    EXECUTE FUNCTION outbox.events_hostile_input();
