-- The migrations' own bookkeeping: which numbered files were applied, and their checksums.
--
-- relay/infra/migrate.py runs this file's text before every file it applies (under its
-- advisory lock, in that file's transaction), so the table exists before the first
-- version is read or recorded; it then applies this file like any other and records it as
-- 0000 (a database migrated before 0000 existed already has the table: this is a no-op
-- there). Kept as a numbered file so that `psql -v ON_ERROR_STOP=1 -f` of every file in
-- order builds the same schema without migrate.py: sql/0008 grants on this table.
-- Every statement is IF NOT EXISTS, so it can run any number of times.

CREATE SCHEMA IF NOT EXISTS outbox;

CREATE TABLE IF NOT EXISTS outbox.schema_migrations (
    version     text PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
