-- outbox.events_before_insert (sql/0004) runs per event row: every write-back's result events
-- and every event an application appends. sql/0004 set force_custom_plan on it so that a plan
-- cached while outbox.payments was tiny could not turn the payment lookup into a sequential
-- scan; the price was planning its two statements (the payment's row lock, the stream row's
-- INSERT ... ON CONFLICT) again for every row. A generic plan made with sequential scans
-- disabled keeps the same guarantee (both are equality on a primary key or unique index, so
-- an index probe is the right plan at every size) and is planned once per session.
-- Measured (docs/performance.md, run F): 2,000 events in batches of 100
-- into a 40,000-intent database, 6 alternating rounds in one session, load 2.5-3:
-- 0.18-0.25 ms of backend CPU per event before, 0.13-0.18 after.
ALTER FUNCTION outbox.events_before_insert() SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION outbox.events_before_insert() SET enable_seqscan = off;
