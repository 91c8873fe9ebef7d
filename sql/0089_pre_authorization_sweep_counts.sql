-- The flow sweeper (relay/service/flow_sweep.py) computed the aged uncovered authorisations
-- twice per turn on every relay: once in outbox.authorization_sweep_v1 to void them, once
-- more (statement uncovered_authorizations_aged) for the gauge. authorization_sweep_v2
-- computes them once and returns, beside how many voids it inserted, how many stay
-- uncovered per provider and policy: all of them but the ones it voided just now (a void
-- on its way is an unresolved intent, which uncovered_authorizations_v2 leaves out too).
-- Otherwise as sql/0084's v1, which stays for relays not yet upgraded; both take the same
-- lock, so one sweeper of either version voids at a time. The one without the lock inserts
-- nothing and counts all it finds.
CREATE FUNCTION outbox.authorization_sweep_v2(
    p_now timestamptz DEFAULT NULL, p_limit integer DEFAULT 100,
    OUT voids integer, OUT providers text[], OUT policies text[], OUT authorizations bigint[])
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_sweeper boolean := pg_try_advisory_xact_lock(hashtext('outbox.authorization_sweep_v1'));
BEGIN
    IF v_sweeper THEN
        PERFORM set_config('outbox.reason', 'authorization policy: void after its hold aged', true);
    END IF;
    WITH uncovered AS MATERIALIZED (
        SELECT * FROM outbox.uncovered_authorizations_v2(p_now)
    ),
    voided AS (
        INSERT INTO outbox.payment_intents (payment_id, action, provider, currency, idempotency_key, metadata)
        SELECT u.payment_id, 'void', u.provider, u.currency, k.key,
               jsonb_build_object('authorization_policy', jsonb_build_object(
                   'action', 'void', 'after_seconds', u.after_seconds,
                   'unchanged_since', u.unchanged_since))
        FROM uncovered AS u
        CROSS JOIN LATERAL (SELECT outbox.authorization_void_key(u.payment_id) AS key) AS k
        WHERE v_sweeper
          AND u.action = 'void'
          AND NOT EXISTS (SELECT 1 FROM outbox.payment_intents AS i
                          WHERE i.provider = u.provider AND i.idempotency_key = k.key)
          AND NOT EXISTS (SELECT 1 FROM outbox.payment_intents_archive AS a
                          WHERE a.provider = u.provider AND a.idempotency_key = k.key)
        ORDER BY u.unchanged_since, u.payment_id
        LIMIT greatest(p_limit, 1)
        RETURNING payment_id
    ),
    left_uncovered AS (
        SELECT u.provider, u.action, count(*) AS n
        FROM uncovered AS u
        WHERE NOT EXISTS (SELECT 1 FROM voided AS v WHERE v.payment_id = u.payment_id)
        GROUP BY u.provider, u.action
    )
    SELECT (SELECT count(*) FROM voided)::integer,
           coalesce(array_agg(l.provider ORDER BY l.provider, l.action), '{}'),
           coalesce(array_agg(l.action ORDER BY l.provider, l.action), '{}'),
           coalesce(array_agg(l.n ORDER BY l.provider, l.action), '{}')
    INTO voids, providers, policies, authorizations
    FROM left_uncovered AS l;
END;
$$;

COMMENT ON FUNCTION outbox.authorization_sweep_v2(timestamptz, integer) IS 'The void policy''s sweep of aged uncovered authorisations as authorization_sweep_v1 (sql/0084), and per provider and policy how many stay uncovered after it, from one computation (sql/0089).';

REVOKE ALL ON FUNCTION outbox.authorization_sweep_v2(timestamptz, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.authorization_sweep_v2(timestamptz, integer) TO outbox_relay;
