-- The application's INSERT does the minimum per row; the creation's audit rows move to the
-- relay's first transaction; the card rule becomes issue 17's.
--
-- Issue 23 (product decision): the creation's hash-chained audit rows (the intent's, and
-- its payment's when the INSERT created the payment) may be written by the relay, set-based,
-- in the first transaction of the relay that touches the intent. They keep who inserted
-- (payment_intents.created_by / payments.created_by, recorded at INSERT) and when (the
-- rows' created_at), so the trail reads as before: the same documents, actor and time;
-- only the audit row ids are drawn later. The intent's first UPDATE is that transaction:
-- its claim (pending -> in_flight), or the promotion of a `blocked` intent (the write-back
-- that ends the intent before it, the orphan sweep, an operator's cancel: all through
-- outbox.promote_next_blocked_v1). A statement trigger on UPDATE writes the missing
-- creation rows before the UPDATE's own audit rows (triggers of one event fire in name
-- order: payment_intents_audit_0_creation before payment_intents_audit_update), so every
-- chain still starts with its 'insert' row, whichever release of the relay runs the UPDATE.
-- An intent no relay has touched yet has no audit row; `outbox-relay audit verify` reports
-- one that is older than its --creation-grace (relay/finance/audit.py).
--
-- Issue 17 (the card rule, by the issue's definition): no stored value and no error text
-- holds a Luhn-valid run of 13 to 19 digits, where separators and invisible or formatting
-- characters between two digits are ignored. sql/0009 and sql/0017 looked only for card
-- shapes (first digit 2 to 6, groups as printed, hex ids skipped) and deliberately let
-- `invoice 2026-12-03 000042` through; now any 13 to 19 consecutive digits of a longer run
-- count too, whatever their first digit, and inside UUIDs and traceparents as well. An id
-- whose digits happen to hold such a run is refused by name (<table>_<column>_not_card_number)
-- with advice: put a letter or another non-separator character (`:`, `#`, `,`) between its
-- numbers. The character classes live in one place (outbox.card_invisible_characters,
-- outbox.card_separator_characters); every function that scans for cards is rebuilt on them.
--
-- Cost (benchmarks/insert_cost.py): one BEFORE INSERT trigger whose common path is a few
-- expressions over the row's text built once, the payment's row, and the wake-up NOTIFY
-- (debounced as before, sql/0007); no AFTER INSERT trigger, no audit row, no hash.

-- 1. Who inserted ----------------------------------------------------------------------

-- Nullable: rows inserted before this migration have their creation rows already.
ALTER TABLE outbox.payment_intents ADD COLUMN created_by text;
ALTER TABLE outbox.payment_intents_archive ADD COLUMN created_by text;
ALTER TABLE outbox.payments ADD COLUMN created_by text;

COMMENT ON COLUMN outbox.payment_intents.created_by IS
    'Who inserted the intent, as the audit trail names actors (db:<login role>, or the '
    'operator or relay the session is entitled to name): the actor of its creation audit row, '
    'which the relay writes in the first transaction that touches the intent.';
COMMENT ON COLUMN outbox.payments.created_by IS
    'Who inserted the intent that created the payment: the actor of its creation audit row.';

-- 2. The card rule ----------------------------------------------------------------------

-- The one list of characters nobody sees between two digits: Unicode's format characters
-- (Cf: soft hyphen, zero-width space and joiners, direction marks and overrides, word
-- joiner, BOM, ...), variation selectors, the combining grapheme joiner and the Hangul and
-- Khmer fillers. As the inside of a regular expression's bracket expression.
CREATE FUNCTION outbox.card_invisible_characters() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT '\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f\u034f\u115f\u1160\u17b4-\u17b5\u180b-\u180d\u180f\u3164\ufe00-\ufe0f\uffa0\U000e0100-\U000e01ef'::text
$$;

-- The one list of separators people put between digit groups: every Unicode space, control
-- character, dash (Pd, and the minus sign), `.`, `_`, `/`, `\`, middle dots and bullets.
CREATE FUNCTION outbox.card_separator_characters() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT '\x01-\x1f\x7f-\x9f\u0020\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a-\u2e3b\u2e40\u2e5d\u301c\u3030\u30a0\ufe31-\ufe32\ufe58\ufe63\uff0d\U00010ead\u2212\u002e\u005f\u002f\u005c\u00b7\u2022\u2024\u2219\uff0e\uff0f\uff3f'::text
$$;

-- What may stand between two digits of one run: a separator, an invisible character, or a
-- control character as jsonb's text escapes it (\n, \t, \u001f...). A regular expression.
-- The calls below have constant arguments, so the planner folds each pattern to a constant
-- once per cached plan: the classes are written once and cost nothing per row.
CREATE FUNCTION outbox.card_gap() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT '(?:[' || outbox.card_separator_characters() || outbox.card_invisible_characters()
           || ']|\\(?:[bfnrt]|u00[01][0-9A-Fa-f]))'
$$;

-- The pre-filter: 13 digits with only gaps between them (a run that may hold a card, Luhn
-- or not). A superset of contains_card_number; SQL, so it is inlined with its pattern
-- folded. The first test needs no backslash handling and decides almost every text.
CREATE OR REPLACE FUNCTION outbox.may_hold_card_number(candidate text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT candidate ~ ('[0-9](?:[' || outbox.card_separator_characters()
                        || outbox.card_invisible_characters() || ']*[0-9]){12}')
        OR (strpos(candidate, '\') > 0
            AND candidate ~ ('[0-9](?:' || outbox.card_gap() || '*[0-9]){12}'))
$$;

COMMENT ON FUNCTION outbox.may_hold_card_number(text) IS
    'True when the text holds 13 digits with only separators, invisible characters or jsonb '
    'control escapes between them: a superset of contains_card_number, for pre-filters.';

-- The text's digit runs, gaps between two digits removed (sql/0017's name, kept for callers).
CREATE OR REPLACE FUNCTION outbox.card_scan_text(candidate text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT regexp_replace(candidate, '([0-9])' || outbox.card_gap() || '+(?=[0-9])', '\1', 'g')
$$;

COMMENT ON FUNCTION outbox.card_scan_text(text) IS
    'The text as the card rule reads it: every run of separators, invisible characters and '
    'jsonb control escapes between two digits removed, so each digit run is contiguous.';

-- Issue 17's rule. For each digit run (gaps removed) of 13 digits or more, every window of
-- 13 to 19 consecutive digits is tested with Luhn's checksum, in O(length) through two
-- prefix sums: Luhn leaves the rightmost digit j as is and doubles every second digit
-- leftwards, so digits i..j sum to even[j] - even[i - 1] when j is even (odd[...] when odd).
-- Linear: 16,000 digits in a row take about 0.1 s here, a 256 kB payload of digits about a
-- second (only a row that is refused anyway, or holds such a run, gets this far).
CREATE OR REPLACE FUNCTION outbox.contains_card_number(candidate text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    run     text;
    bytes   bytea;  -- the run as bytes: get_byte is O(1), substr on text is O(position)
    n       int;
    d       int;
    j       int;
    len     int;
    even    int[];  -- even[k]: digits 1..k, digit p as is when p is even, else doubled
    odd     int[];  -- odd[k]: digits 1..k, digit p as is when p is odd, else doubled
    s0      int := 0;
    s1      int := 0;
BEGIN
    IF candidate IS NULL OR NOT outbox.may_hold_card_number(candidate) THEN
        RETURN false;
    END IF;
    FOR run IN
        SELECT m[1] FROM regexp_matches(outbox.card_scan_text(candidate), '([0-9]{13,})', 'g') AS m
    LOOP
        n := length(run);
        bytes := convert_to(run, 'UTF8');
        even := array_fill(0, ARRAY[n + 1], ARRAY[0]);
        odd := array_fill(0, ARRAY[n + 1], ARRAY[0]);
        s0 := 0;
        s1 := 0;
        FOR j IN 1 .. n LOOP
            d := get_byte(bytes, j - 1) - 48;
            IF j % 2 = 0 THEN
                s0 := s0 + d;
                s1 := s1 + CASE WHEN d > 4 THEN 2 * d - 9 ELSE 2 * d END;
            ELSE
                s1 := s1 + d;
                s0 := s0 + CASE WHEN d > 4 THEN 2 * d - 9 ELSE 2 * d END;
            END IF;
            even[j] := s0;
            odd[j] := s1;
            CONTINUE WHEN j < 13;
            FOR len IN 13 .. least(19, j) LOOP
                IF j % 2 = 0 THEN
                    IF (even[j] - even[j - len]) % 10 = 0 THEN RETURN true; END IF;
                ELSIF (odd[j] - odd[j - len]) % 10 = 0 THEN
                    RETURN true;
                END IF;
            END LOOP;
        END LOOP;
    END LOOP;
    RETURN false;
END;
$$;

COMMENT ON FUNCTION outbox.contains_card_number(text) IS
    'True when the text holds 13 to 19 consecutive digits passing the Luhn check, where any '
    'separators (spaces, controls, dashes, . _ / \, bullets), invisible or formatting '
    'characters and jsonb control escapes between two digits are ignored (issue 17).';

-- The refusal names the rule and says what to do when the value is no card but an id whose
-- digits happen to pass the checksum.
CREATE OR REPLACE FUNCTION outbox.refuse_card_number(p_table text, p_column text, p_value text, p_hint text,
                                                     p_where text DEFAULT '') RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF outbox.contains_card_number(p_value) THEN
        PERFORM outbox.refuse_input(p_table, p_column, format('%s_%s_not_card_number', p_table, p_column),
            format('holds a card-like number%s: 13 to 19 digits in a row passing the Luhn check, '
                   'separators and invisible characters between digits ignored', p_where),
            p_hint || ' If it is an id or a key, not a card: put a letter or a '':'' between its '
                      'numbers, so that no 13 of its digits follow each other.');
    END IF;
END;
$$;

-- events.event_id: a UUID's text joins its hex digits across dashes, so about one random
-- UUID in 140 holds a Luhn-valid run of 13 to 19 digits. The ids the server draws (the
-- column's default, or for an explicit NULL) are drawn again until they hold no 13-digit
-- run at all. An id the application sends is a uuid, not text, and is stored as sent; a
-- row whose id may hold card digits is checked rule by rule by events_0_hostile_input
-- (its pre-filter reads event_id too), so no refusal shows it in a DETAIL.
CREATE FUNCTION outbox.new_event_id() RETURNS uuid
LANGUAGE plpgsql VOLATILE PARALLEL SAFE AS $$
DECLARE
    id uuid;
BEGIN
    LOOP
        id := gen_random_uuid();
        EXIT WHEN id::text !~ '[0-9](?:-?[0-9]){12}';
    END LOOP;
    RETURN id;
END;
$$;

ALTER TABLE outbox.events ALTER COLUMN event_id SET DEFAULT outbox.new_event_id();

CREATE FUNCTION outbox.events_event_id() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.event_id := outbox.new_event_id();
    RETURN NEW;
END;
$$;

-- Before events_before_insert (name order), which would draw gen_random_uuid() instead.
CREATE TRIGGER events_0_event_id
    BEFORE INSERT ON outbox.events
    FOR EACH ROW
    WHEN (NEW.event_id IS NULL)
    EXECUTE FUNCTION outbox.events_event_id();

-- sql/0017's guard of the application's events, its pre-filter reading event_id as well.
DROP TRIGGER events_0_hostile_input ON outbox.events;
CREATE TRIGGER events_0_hostile_input
    BEFORE INSERT OR UPDATE OF exchange, routing_key, event_type, ordering_key, payment_id, payload, headers,
                               traceparent, event_id
    ON outbox.events
    FOR EACH ROW
    WHEN (NOT (coalesce(current_setting('outbox.actor', true), '') LIKE 'relay:%'
               AND pg_has_role(session_user, 'outbox_relay', 'MEMBER'))
          AND (pg_column_size(NEW.payload) > 262144
               OR pg_column_size(NEW.headers) > 16384
               OR outbox.may_hold_card_number(concat_ws('|', NEW.exchange, NEW.routing_key, NEW.event_type,
                                                        NEW.ordering_key, NEW.payment_id, NEW.traceparent,
                                                        NEW.payload::text, NEW.headers::text,
                                                        NEW.event_id::text))
               OR NEW.ordering_key ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
               OR NEW.payment_id ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
               OR jsonb_path_exists(NEW.payload, 'strict $.**{65}')))
    EXECUTE FUNCTION outbox.events_hostile_input();

-- 3. payment_intents: one BEFORE INSERT trigger, the minimum per row ----------------------

-- Used by the UPDATE guard (payment_intents_0_input_guard) and kept equal to the INSERT
-- trigger's own test below: true when a rule may be broken, so the guard runs every rule.
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

CREATE OR REPLACE FUNCTION outbox.payment_intents_before_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    pay       outbox.payments%ROWTYPE;
    meta      text := NEW.metadata::text;
    wanted    boolean;
    archived  boolean;
    install   uuid;
BEGIN
    -- Every rule that must refuse at INSERT, on the row's text built once. A row that may
    -- break one (or may hold card data) is checked rule by rule, each refusal named and
    -- showing no value, before any table constraint could echo the row in its DETAIL.
    -- (A document nested 33 deep renders at least 66 characters: the depth test runs only
    -- for such text. '|' is no separator: digits of two columns never join.)
    IF NEW.amount_minor >= 1000000000000
       OR pg_column_size(NEW.metadata) > 16384
       OR length(NEW.payment_id) > 200
       OR outbox.may_hold_card_number(concat_ws('|', NEW.payment_id, NEW.action, NEW.provider,
                                                NEW.currency, NEW.idempotency_key, meta))
       OR NEW.payment_id ~ '[\x01-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]'
       OR (length(meta) > 65 AND jsonb_path_exists(NEW.metadata, 'strict $.**{33}'))
       OR NOT (NEW.payment_method ~ '^[A-Za-z0-9_]+$' AND length(NEW.payment_method) BETWEEN 3 AND 255)
       OR translate(NEW.payment_method, '_', '') ~ '[0-9]{13}'
       OR (NEW.metadata ? 'traceparent'
           AND NOT (jsonb_typeof(NEW.metadata -> 'traceparent') = 'string'
                    AND outbox.is_valid_traceparent(NEW.metadata ->> 'traceparent')))
    THEN
        PERFORM outbox.payment_intents_check_input(NEW);
    END IF;

    -- The relay owns these columns; whatever the application sent is replaced.
    NEW.status := 'pending';
    NEW.attempts := 0;
    NEW.available_at := now();
    NEW.lease_token := NULL;
    NEW.lease_expires_at := NULL;
    NEW.claimed_by := NULL;
    NEW.amount_applied_minor := NULL;
    NEW.provider_reference := NULL;
    NEW.error_code := NULL;
    NEW.error_message := NULL;
    NEW.created_at := now();
    NEW.updated_at := now();
    NEW.completed_at := NULL;
    NEW.created_by := outbox.audit_actor();

    -- NULLs and malformed values are left to the column constraints, which name them.
    IF NEW.payment_id IS NULL OR NEW.provider IS NULL OR NEW.currency IS NULL OR NEW.action IS NULL THEN
        RETURN NEW;
    END IF;

    NEW.currency := upper(NEW.currency);
    -- The payment's row gives each intent its position (payment_seq) in commit order (see
    -- sql/0015): concurrent inserts for one payment queue on its row, or for its first
    -- intents on the primary key. The currency is looked up in the insert's own statement.
    -- The same statement reads the two facts every row needs: whether a relay asked to be
    -- woken (sql/0007), and whether the key was used by an archived intent.
    WITH created AS (
        INSERT INTO outbox.payments (payment_id, provider, currency, created_by)
        SELECT NEW.payment_id, NEW.provider, c.code, NEW.created_by
        FROM outbox.currencies AS c
        WHERE c.code = NEW.currency
        ON CONFLICT (payment_id) DO NOTHING
        RETURNING next_seq, provider, currency
    )
    SELECT created.next_seq, created.provider, created.currency,
           coalesce((SELECT w.wanted FROM outbox.relay_wakeup AS w), true),
           NEW.idempotency_key IS NOT NULL AND EXISTS (
               SELECT 1 FROM outbox.payment_intents_archive AS a
               WHERE a.provider = NEW.provider AND a.idempotency_key = NEW.idempotency_key)
    INTO pay.next_seq, pay.provider, pay.currency, wanted, archived
    FROM (VALUES (1)) AS one
    LEFT JOIN created ON true;
    IF archived THEN
        RAISE EXCEPTION USING
            ERRCODE = 'unique_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'idempotency_key',
            CONSTRAINT = 'payment_intents_idempotency_key_unique',
            MESSAGE = 'payment_intents.idempotency_key was already used by an archived intent of this provider',
            HINT = 'Use a new idempotency key for a new intent, or omit it to have one derived.';
    END IF;
    WHILE pay.next_seq IS NULL LOOP
        -- Nothing inserted: the payment exists, or the currency is unknown.
        UPDATE outbox.payments AS p SET next_seq = p.next_seq + 1, updated_at = now()
        WHERE p.payment_id = NEW.payment_id
        RETURNING p.next_seq, p.provider, p.currency INTO pay.next_seq, pay.provider, pay.currency;
        EXIT WHEN FOUND;
        PERFORM outbox.payment_intents_refuse_unknown_currency(NEW.currency);
        -- The row was deleted between the two statements (by hand): insert it again.
        INSERT INTO outbox.payments (payment_id, provider, currency, created_by)
        VALUES (NEW.payment_id, NEW.provider, NEW.currency, NEW.created_by)
        ON CONFLICT (payment_id) DO NOTHING
        RETURNING next_seq, provider, currency INTO pay.next_seq, pay.provider, pay.currency;
    END LOOP;

    IF pay.currency <> NEW.currency THEN
        PERFORM outbox.payment_intents_refuse_unknown_currency(NEW.currency);
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'currency',
            CONSTRAINT = 'payment_intents_currency_matches_payment',
            MESSAGE = format('payment_intents.currency %s differs from payment %s''s currency %s',
                             quote_literal(NEW.currency), quote_literal(NEW.payment_id), quote_literal(pay.currency)),
            HINT = 'Every intent of one payment_id uses the currency of its first intent.';
    END IF;
    IF pay.provider <> NEW.provider THEN
        RAISE EXCEPTION USING
            ERRCODE = 'check_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'provider',
            CONSTRAINT = 'payment_intents_provider_matches_payment',
            MESSAGE = format('payment_intents.provider %s differs from payment %s''s provider %s',
                             quote_literal(NEW.provider), quote_literal(NEW.payment_id), quote_literal(pay.provider)),
            HINT = 'Every intent of one payment_id goes to the provider of its first intent.';
    END IF;

    NEW.payment_seq := pay.next_seq;
    -- Per-payment order: wait behind any unresolved earlier intent (dead ones included).
    -- A payment's first intent (its row was just created) has none.
    IF pay.next_seq > 1 AND EXISTS (
        SELECT 1 FROM outbox.payment_intents
        WHERE payment_id = NEW.payment_id AND status IN ('blocked', 'pending', 'in_flight', 'dead')
    ) THEN
        NEW.status := 'blocked';
    END IF;

    -- A derived key spells the digest's hex digits as letters (0-9 as g-p): a hex digest
    -- holds 13 decimal digits in a row about once in twelve keys, and the card rule would
    -- then find a Luhn-valid run in a value the relay stores and sends (sql/0001's form,
    -- hex, stays on the intents that have it).
    IF NEW.idempotency_key IS NULL THEN
        SELECT installation_id INTO install FROM outbox.installation;
        NEW.idempotency_key := 'outbox_' || translate(left(encode(sha256(convert_to(
            install::text || '/' || NEW.payment_id || '/' || NEW.payment_seq::text || '/' || NEW.action,
            'UTF8')), 'hex'), 48), '0123456789', 'ghijklmnop');
    END IF;

    -- sql/0007: wake an idle relay; identical notifications of a transaction are one.
    IF wanted THEN
        PERFORM pg_notify('outbox_payment_intents', '');
    END IF;
    RETURN NEW;
END;
$$;

-- The creation's audit rows are no longer written at INSERT (section 4 writes them).
DROP TRIGGER payment_intents_audit_insert ON outbox.payment_intents;

-- 4. The creation's audit rows, in the first transaction that touches the intent ---------

-- For the intents an UPDATE statement touches for the first time (attempts = 0 before it:
-- an intent's first UPDATE is its claim or its promotion, and every claim counts an
-- attempt), the creation rows that are missing: the payment's first (when its chain is
-- empty: the INSERT created it), then the intent's, each chain_seq 1, documents as the row
-- stood before this UPDATE (as the INSERT left it), actor created_by, time created_at.
-- ON CONFLICT: two transactions writing the same payment's first row cannot both succeed,
-- and the one that waits keeps the other's.
CREATE FUNCTION outbox.audit_intent_creations() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET jit = off
AS $$
BEGIN
    INSERT INTO outbox.audit_log
        (id, at, actor, entity, entity_id, payment_id, operation, reason, before, after,
         chain_seq, prev_hash, hash)
    SELECT c.id, c.at, c.actor, c.entity, c.entity_id, c.payment_id, 'insert', NULL, NULL, c.after,
           1, NULL,
           sha256(outbox.audit_canonical(c.id, c.at, c.actor, c.entity, c.entity_id, c.payment_id,
                                         'insert', NULL, NULL, c.after, 1, NULL))
    FROM (
        SELECT nextval('outbox.audit_log_id_seq') AS id, e.*
        FROM (
            SELECT 0 AS kind, p.payment_id AS payment_id, 0::bigint AS intent_id,
                   p.created_at AS at, coalesce(p.created_by, 'db:unknown') AS actor,
                   'payment'::text AS entity, p.payment_id AS entity_id,
                   outbox.audit_payment_doc(p) AS after
            FROM outbox.payments AS p
            WHERE p.payment_id IN (SELECT o.payment_id FROM old_rows AS o WHERE o.attempts = 0)
              AND NOT EXISTS (
                  SELECT 1 FROM outbox.audit_log AS a
                  WHERE a.entity = 'payment' AND a.entity_id = p.payment_id AND a.chain_seq = 1)
            UNION ALL
            SELECT 1, o.payment_id, o.id, o.created_at, coalesce(o.created_by, 'db:unknown'),
                   'intent', o.id::text, outbox.audit_intent_doc(o)
            FROM old_rows AS o
            WHERE o.attempts = 0
              AND NOT EXISTS (
                  SELECT 1 FROM outbox.audit_log AS a
                  WHERE a.entity = 'intent' AND a.entity_id = o.id::text AND a.chain_seq = 1)
            ORDER BY 2, 1, 3
        ) AS e
    ) AS c
    ON CONFLICT (entity, entity_id, chain_seq) DO NOTHING;
    RETURN NULL;
END;
$$;

-- A name that sorts before payment_intents_audit_update: the creation rows come first.
CREATE TRIGGER payment_intents_audit_0_creation
    AFTER UPDATE ON outbox.payment_intents
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT
    EXECUTE FUNCTION outbox.audit_intent_creations();
