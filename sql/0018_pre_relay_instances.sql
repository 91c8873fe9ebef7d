-- Which providers the running relays serve, so an intent nobody will ever claim is visible.
--
-- An intent names its provider; a relay claims only the providers it is configured for
-- (RELAY_PROVIDERS__<NAME>__...). An intent for a provider no relay serves ('paypal' when
-- every relay has only stripe) is accepted and stays pending forever. Refusing it at INSERT
-- needs a provider registry, which is not here yet; until then each relay reports what it
-- serves, and `outbox-relay status`, the gauge outbox_relay_unserved_intents and the alert
-- OutboxRelayUnservedIntents name the providers no live relay serves.
--
-- Each relay's queue-depth sampler (relay/service/depth.py) upserts its own row every
-- sample (RELAY_DEPTH_INTERVAL_SECONDS, jittered), never on the claim path. A row whose
-- heartbeat is older than three of its own intervals (at least 30 s) is a relay that is gone:
-- the statement relay_instances (relay/infra/queries.sql) holds that rule. Rows gone for a
-- day are pruned by the heartbeat statement, so restarts (a new instance name each) do not
-- pile up.

CREATE TABLE outbox.relay_instances (
    instance                    text PRIMARY KEY
                                CONSTRAINT relay_instances_instance_named CHECK (instance <> ''),
    providers                   text[] NOT NULL,
    heartbeat_interval_seconds  float8 NOT NULL
                                CONSTRAINT relay_instances_interval_positive
                                CHECK (heartbeat_interval_seconds > 0),
    started_at                  timestamptz NOT NULL DEFAULT now(),
    heartbeat_at                timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE outbox.relay_instances IS
    'One row per running relay (its instance name): the providers it serves and its last '
    'heartbeat. Live while heartbeat_at is within max(3 x heartbeat_interval_seconds, 30 s).';

-- The relay upserts its own row (INSERT ... ON CONFLICT DO UPDATE needs SELECT, INSERT and
-- UPDATE) and prunes rows unseen for a day (DELETE); the operator's `status` reads them.
GRANT SELECT, INSERT, DELETE ON outbox.relay_instances TO outbox_relay;
GRANT UPDATE (providers, heartbeat_interval_seconds, heartbeat_at)
    ON outbox.relay_instances TO outbox_relay;
GRANT SELECT ON outbox.relay_instances TO outbox_operator;
