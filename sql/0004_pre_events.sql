-- outbox-relay result events: outbox.events, written in the same transaction as each
-- outcome (by the relay's write-back) or by applications, published to RabbitMQ.
--
-- Public contract (applications may INSERT their own domain events):
-- columns event_id, exchange, routing_key, event_type, payload, headers, ordering_key,
-- payment_id, schema_version, traceparent are written by the writer; every other column
-- belongs to the relay and is reset by the insert trigger whatever the writer sends.
--
-- Order: events that share an `ordering_key` are published in the order their inserting
-- transactions committed. The trigger takes the key's row in outbox.event_streams with an
-- upsert, which hands out `seq` under that row's lock: a second writer of the key waits
-- until the first commits, so `seq` order is commit order (a bigserial is not: values
-- are drawn before commit and can commit out of order). Eligibility is a stored fact: an
-- event is `pending` (publishable) only when every earlier event of its key is done
-- (`done_seq`, on the same row), else `blocked`; the publisher's mark, under the same
-- stream lock, advances `done_seq` and promotes the next one.

CREATE TABLE outbox.event_streams (
    ordering_key  text PRIMARY KEY,
    -- The seq handed to the latest event of this key; bumped under this row's lock.
    last_seq      bigint NOT NULL DEFAULT 1,
    -- Events 1..done_seq of this key are published or unroutable (only a key's head is
    -- ever publishable, so what is done is always a prefix); advanced by the mark.
    done_seq      bigint NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 80);

COMMENT ON TABLE outbox.event_streams IS
    'One row per ordering key: the sequence counter whose row lock orders concurrent writers.';

CREATE TABLE outbox.events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- written by the writer (the relay for payment outcomes, or the application)
    event_id        uuid NOT NULL DEFAULT gen_random_uuid(),
    exchange        text
        CONSTRAINT events_exchange_name_format CHECK (exchange ~ '^[A-Za-z0-9_.:-]{1,255}$'),
    routing_key     text NOT NULL
        CONSTRAINT events_routing_key_dotted_words CHECK (
            routing_key ~ '^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$' AND length(routing_key) <= 255),
    event_type      text
        CONSTRAINT events_event_type_format CHECK (event_type ~ '^[!-~]{1,255}$'),
    payload         jsonb NOT NULL
        CONSTRAINT events_payload_max_256kb CHECK (pg_column_size(payload) <= 262144),
    headers         jsonb NOT NULL DEFAULT '{}'::jsonb
        CONSTRAINT events_headers_is_object CHECK (jsonb_typeof(headers) = 'object')
        CONSTRAINT events_headers_flat_scalars CHECK (NOT jsonb_path_exists(headers,
            'strict $.* ? (@.type() == "object" || @.type() == "array" || @.type() == "null"
                    || (@.type() == "number" && (@ > 9007199254740991 || @ < -9007199254740991)))',
            '{}', true))  -- silent: a non-object is left to events_headers_is_object
        CONSTRAINT events_headers_reserved_names CHECK (
            NOT headers ?| ARRAY['schema-version', 'traceparent', 'ordering-key', 'sequence'])
        CONSTRAINT events_headers_max_16kb CHECK (pg_column_size(headers) <= 16384),
    ordering_key    text
        CONSTRAINT events_ordering_key_nonblank_max_255 CHECK (ordering_key ~ '\S' AND length(ordering_key) <= 255),
    payment_id      text
        CONSTRAINT events_payment_id_nonblank_max_200 CHECK (payment_id ~ '\S' AND length(payment_id) <= 200),
    schema_version  integer NOT NULL DEFAULT 1
        CONSTRAINT events_schema_version_positive CHECK (schema_version > 0),
    traceparent     text
        CONSTRAINT events_traceparent_format CHECK (
            traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'),
    -- written by the relay
    seq             bigint,
    status          text NOT NULL DEFAULT 'pending'
        CONSTRAINT events_status_valid CHECK (status IN ('blocked', 'pending', 'published', 'unroutable')),
    attempts        integer NOT NULL DEFAULT 0,
    -- When the event may be claimed; while a publisher holds it, its lease expiry.
    available_at    timestamptz NOT NULL DEFAULT now(),
    lease_token     bigint,
    claimed_by      text,
    error_code      text,
    error_message   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    CONSTRAINT events_seq_with_ordering_key CHECK ((seq IS NULL) = (ordering_key IS NULL))
) WITH (fillfactor = 80);

COMMENT ON COLUMN outbox.events.status IS
    'blocked: an earlier event of the same ordering_key is unpublished (the publish that ends it promotes this one); '
    'pending: publishable once available_at has passed (a publisher claims it; while held, available_at is the lease expiry); '
    'published: the broker confirmed it (terminal); '
    'unroutable: the broker confirmed it but no queue was bound for its routing key (terminal, logged, error_code no_route).';

-- A writer may choose event_id (its own deduplication key); it must stay unique.
CREATE UNIQUE INDEX events_event_id_unique ON outbox.events (event_id);
-- The claim: a plain SKIP LOCKED scan over publishable rows, O(batch).
CREATE INDEX events_claimable_idx ON outbox.events (available_at, id) WHERE status = 'pending';
-- Unpublished events of a key, in order: promotion finds a key's next event here.
CREATE INDEX events_unpublished_by_key_idx
    ON outbox.events (ordering_key, seq) WHERE status IN ('blocked', 'pending');

-- force_custom_plan: a plan cached while outbox.payments was tiny must not turn the
-- payment lookup into a sequential scan once it is large.
CREATE FUNCTION outbox.events_before_insert() RETURNS trigger
LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
DECLARE
    done  bigint;
BEGIN
    -- The relay owns these columns; whatever the writer sent is replaced.
    NEW.seq := NULL;
    NEW.status := 'pending';
    NEW.attempts := 0;
    NEW.available_at := now();
    NEW.lease_token := NULL;
    NEW.claimed_by := NULL;
    NEW.error_code := NULL;
    NEW.error_message := NULL;
    NEW.created_at := now();
    NEW.published_at := NULL;
    NEW.event_id := COALESCE(NEW.event_id, gen_random_uuid());
    -- event_type defaults to the routing key (a malformed key is left to its own constraint).
    IF NEW.event_type IS NULL AND NEW.routing_key ~ '^[!-~]{1,255}$' THEN
        NEW.event_type := NEW.routing_key;
    END IF;

    -- Malformed keys are left to the column constraint, which names them.
    IF NEW.ordering_key IS NULL OR NEW.ordering_key !~ '\S' OR length(NEW.ordering_key) > 255 THEN
        RETURN NEW;
    END IF;

    -- A payment's stream is taken after its payment row, as the relay's write-back does,
    -- so an application appending to `payment:<id>` cannot deadlock with the relay.
    IF NEW.ordering_key LIKE 'payment:%' THEN
        PERFORM 1 FROM outbox.payments WHERE payment_id = substr(NEW.ordering_key, 9) FOR UPDATE;
    END IF;

    -- Lock the key's stream row: concurrent writers of one key queue here until the
    -- holder commits, so seq follows commit order.
    INSERT INTO outbox.event_streams AS s (ordering_key)
    VALUES (NEW.ordering_key)
    ON CONFLICT (ordering_key) DO UPDATE SET last_seq = s.last_seq + 1
    RETURNING s.last_seq, s.done_seq INTO NEW.seq, done;

    -- Per-key order: wait behind any earlier event of the key that is not done yet.
    IF done < NEW.seq - 1 THEN
        NEW.status := 'blocked';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER events_before_insert
    BEFORE INSERT ON outbox.events
    FOR EACH ROW EXECUTE FUNCTION outbox.events_before_insert();

-- One wake-up per statement that inserted rows (the write-back inserts many at once).
CREATE FUNCTION outbox.events_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted) THEN
        PERFORM pg_notify('outbox_events', '');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_notify
    AFTER INSERT ON outbox.events
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION outbox.events_notify();
