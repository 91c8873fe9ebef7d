-- `outbox-relay status` names a registered, enabled provider that no live relay serves
-- (sql/0050). Status is also run with the relay's own credentials (kubectl exec into a relay
-- pod), so the relay's role may read the registry, which holds no secret. Changing it stays
-- the operators' (provider_set_v1).
GRANT SELECT ON outbox.providers TO outbox_relay;
