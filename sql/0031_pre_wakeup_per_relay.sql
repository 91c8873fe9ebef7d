-- Wake-ups asked per relay: a saturated relay no longer turns NOTIFY off for idle ones.
--
-- sql/0007 made `outbox.relay_wakeup.wanted` one flag for every relay: an idle relay set it,
-- a saturated one cleared it, so with two relays the saturated one silenced the idle one,
-- which then heard of new intents only by polling (backing off to
-- RELAY_POLL_MAX_INTERVAL_SECONDS) while the busy one queued them behind its full lanes.
--
-- Now each idle relay records its wish here (one row, its instance name), and a saturated
-- relay clears the flag only when no other live relay wishes for wake-ups. The insert
-- trigger is unchanged: it still reads the one flag row, so an INSERT costs exactly what it
-- cost before (nothing per relay, no scan). The relays' statements want_wakeups and
-- skip_wakeups (relay/infra/queries.sql) keep the flag equal to "some live relay waits":
-- skip_wakeups locks the flag row before it reads this table (in a later statement, so its
-- snapshot sees every wish committed before the lock), and want_wakeups always updates the
-- flag row, waiting for a skip's lock and then setting the flag: the two serialise on the
-- flag row and a skip cannot undo a wish.
--
-- A relay that died while idle leaves its row: it stops counting once its heartbeat in
-- outbox.relay_instances is stale (the rule of sql/0018), and a relay that reports no
-- heartbeat (RELAY_DEPTH_INTERVAL_SECONDS=0) keeps counting, so inserts keep notifying:
-- the safe side, at worst the cost sql/0007 removed. skip_wakeups prunes stale rows.
-- Per provider (a relay whose Stripe lane is full but whose Adyen lane idles) would need
-- the insert trigger to read a row per provider: docs/performance.md says why not yet.

CREATE TABLE outbox.relay_wakeup_wants (
    instance    text PRIMARY KEY
                CONSTRAINT relay_wakeup_wants_instance_named CHECK (instance <> ''),
    since       timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE outbox.relay_wakeup_wants IS
    'One row per idle relay (its instance name) that waits for a NOTIFY; relay_wakeup.wanted '
    'stays true while any live relay has a row here.';

-- The relay inserts (ON CONFLICT DO NOTHING), reads and deletes its rows; nothing updates them.
-- Operators read it, as they read relay_wakeup.
GRANT SELECT, INSERT, DELETE ON outbox.relay_wakeup_wants TO outbox_relay;
GRANT SELECT ON outbox.relay_wakeup_wants TO outbox_operator;
