-- The ledger's foreign keys cost more than everything else the ledger writes, and guard
-- nothing that is not guarded already (issue 23, goal 2).
--
-- Every succeeded intent posts one transaction and two entries; each of the three foreign
-- keys below is a per-row check (an SPI query with a FOR KEY SHARE lock) at the end of the
-- statement, three per intent:
--   * ledger_entries.transaction_id -> ledger_transactions.id. The check's plan is cached
--     per connection the first time it runs; on a young ledger that is a sequential scan,
--     kept until the table is next analyzed, so each check reads the whole ledger: the
--     write-back's time grew with every batch (measured: 0.05 ms per check at 1,200 rows,
--     linear; benchmarks/sql_limit.py's 20,000-intent replay ran at a fifth of its rate).
--   * ledger_transactions.currency and ledger_entries.currency -> currencies.code. Each
--     check locks the currency's row FOR KEY SHARE; two write-backs in one currency make
--     that a MultiXact per commit, as payments.currency did before sql/0015.
-- What guards the same facts without them:
--   * Entries and their transaction are written by one statement of one SECURITY DEFINER
--     trigger function (sql/0021, payment_intents_post_ledger_v2); no role but the owner
--     may insert into either table (sql/0008), and neither row can be updated or deleted,
--     by anyone, owner included (append-only triggers, sql/0005). An entry can never lose
--     its transaction, and `outbox-relay ledger check` reports any entry whose
--     transaction is missing (ledger_orphan_entries), as it reports unbalanced ones.
--   * A transaction's currency is its intent's, which the insert trigger checked against
--     outbox.currencies and which equals its payment's; a currency used by a payment
--     cannot be deleted or renamed (sql/0015, currencies_used_code); `ledger check` reports
--     a transaction in another currency than its payment and an entry in another
--     currency than its transaction (ledger_payment_mismatches, ledger_unbalanced).
-- _post_: removing a constraint; no release uses these constraints by name.

ALTER TABLE outbox.ledger_entries DROP CONSTRAINT ledger_entries_transaction_id_fkey;
ALTER TABLE outbox.ledger_entries DROP CONSTRAINT ledger_entries_currency_fkey;
ALTER TABLE outbox.ledger_transactions DROP CONSTRAINT ledger_transactions_currency_fkey;
