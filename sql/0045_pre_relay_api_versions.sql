-- Which provider API version each running relay pins, and whether its adapter was tested
-- with that version (issue 19). A relay starts with a version outside its adapter's tested
-- list only when RELAY_PROVIDERS__<NAME>__ALLOW_UNTESTED_API_VERSION is set; it then says so
-- in its log and metrics, and, through this column, in `outbox-relay status`, which reads
-- every relay's row: during a move to a new version (README "Moving to a new provider API
-- version") the canary relays and the rest show side by side.
--
-- The relay's heartbeat (statement relay_heartbeat) writes the column with its other fields.
-- One object keyed by the relay's provider names:
--   {"stripe": {"kind": "stripe", "version": "2026-10-28.endive", "tested": true}, ...}
-- Backward compatible: a relay of the previous release does not name the column, so its
-- row keeps the default (an empty object: nothing reported) and `status` shows nothing for it.
ALTER TABLE outbox.relay_instances
    ADD COLUMN api_versions jsonb NOT NULL DEFAULT '{}'::jsonb
        CONSTRAINT relay_instances_api_versions_object CHECK (jsonb_typeof(api_versions) = 'object');

COMMENT ON COLUMN outbox.relay_instances.api_versions IS
    'The provider API version this relay pins, by provider name: {"<name>": {"kind": ..., '
    '"version": ..., "tested": true|false}}; tested false only under '
    'ALLOW_UNTESTED_API_VERSION.';

GRANT UPDATE (api_versions) ON outbox.relay_instances TO outbox_relay;
