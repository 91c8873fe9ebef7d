-- Retention and vacuum: keep the hot table small so claims stay fast and dead tuples few.
--
-- The relay's sweeper moves intents that ended (succeeded or failed) more than
-- RELAY_RETENTION_HOURS ago into outbox.payment_intents_archive, in batches, with
-- SKIP LOCKED so several replicas never wait on each other. Dead intents stay in the hot
-- table until an operator works them. The archive is cold and append-only from the
-- relay's side: partition it, export it or truncate old parts as your retention policy
-- says. Its columns mirror payment_intents one for one (a migration that adds a column to
-- payment_intents adds it here too, in the same position).

CREATE TABLE outbox.payment_intents_archive (LIKE outbox.payment_intents INCLUDING DEFAULTS);
ALTER TABLE outbox.payment_intents_archive ADD PRIMARY KEY (id);
CREATE INDEX payment_intents_archive_payment_idx
    ON outbox.payment_intents_archive (payment_id, payment_seq);
CREATE UNIQUE INDEX payment_intents_archive_idempotency_key_unique
    ON outbox.payment_intents_archive (provider, idempotency_key);

COMMENT ON TABLE outbox.payment_intents_archive IS
    'Intents that ended more than RELAY_RETENTION_HOURS ago, moved out of the hot table by the relay.';

-- The sweeper's scan: oldest completed first, over terminal rows only.
CREATE INDEX payment_intents_completed_idx
    ON outbox.payment_intents (completed_at) WHERE status IN ('succeeded', 'failed');

-- A key already used by an archived intent would make the provider replay that result:
-- the unique index no longer sees it, so check the archive (only for keys the app chose;
-- derived keys never repeat).
CREATE FUNCTION outbox.payment_intents_key_not_archived() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.idempotency_key IS NOT NULL AND EXISTS (
        SELECT 1 FROM outbox.payment_intents_archive
        WHERE provider = NEW.provider AND idempotency_key = NEW.idempotency_key
    ) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'unique_violation',
            SCHEMA = 'outbox', TABLE = 'payment_intents', COLUMN = 'idempotency_key',
            CONSTRAINT = 'payment_intents_idempotency_key_unique',
            MESSAGE = 'payment_intents.idempotency_key was already used by an archived intent of this provider',
            HINT = 'Use a new idempotency key for a new intent, or omit it to have one derived.';
    END IF;
    RETURN NEW;
END;
$$;

-- Fires before payment_intents_before_insert (triggers run in name order), so an app key
-- is checked as the application gave it.
CREATE TRIGGER payment_intents_a_key_not_archived
    BEFORE INSERT ON outbox.payment_intents
    FOR EACH ROW EXECUTE FUNCTION outbox.payment_intents_key_not_archived();

-- Every write-back updates intent rows and the sweeper deletes them: vacuum the hot
-- tables after 2 % churn (not the default 20 %), without throttling, so dead tuples stay
-- few and the claim index stays tight. fillfactor 80 (set at creation) leaves room for
-- updates on the same page.
ALTER TABLE outbox.payment_intents SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);
ALTER TABLE outbox.payments SET (
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);
