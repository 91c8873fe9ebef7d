-- sql/0084's payments_authorized_idx (provider, updated_at) WHERE state = 'authorized' made
-- every UPDATE of outbox.payments that moves updated_at a non-HOT one, whatever its state:
-- PostgreSQL 15 keeps an update heap-only only when no column an index reads (key,
-- expression or predicate) changes, and every write-back and every later intent's insert
-- (its next_seq bump) sets updated_at. A non-HOT update writes an entry into each index of
-- the table (the primary key, payments_provider_reference_idx, payments_routed_idx).
-- benchmarks/hot_updates.py counts it: captures inserted after their authorisations bumped
-- 2,000 payments with 0 HOT updates under sql/0084's index, about half HOT without it (the
-- rest find no room on the page: fillfactor 80).
--
-- The uncovered-authorisation sweep only needs to find a provider's authorised payments
-- that have not changed for a while. An authorisation is found from the same predicate,
-- keyed by created_at, which is set once: the payment cannot have been unchanged for longer
-- than it exists, so updated_at <= cutoff implies created_at <= cutoff, and that bound keeps
-- the sweep a range scan over old authorisations. The predicate still reads `state`: the
-- updates that change a payment's state (its authorisation, capture, void, failure) stay
-- non-HOT. Nothing that still finds authorised payments among all of them can avoid that
-- (a payment leaving the index must change a column it reads), and an authorisation sets
-- provider_reference, which payments_provider_reference_idx reads, anyway. The updates
-- that leave the state alone (next_seq bumps, awaiting confirmations, partial refunds,
-- disputes, fail-overs) may be HOT again.
--
-- Building it reads the payments table under a lock that holds INSERTs back: on a large
-- table build it CONCURRENTLY by hand first, with this name and definition
-- (docs/developing.md), then drop the old index CONCURRENTLY.
CREATE INDEX IF NOT EXISTS payments_authorized_created_idx
    ON outbox.payments (provider, created_at) WHERE state = 'authorized';
DROP INDEX IF EXISTS outbox.payments_authorized_idx;

-- As sql/0084's v1, with the bound on created_at the index serves (see above). created_at is
-- now() of the INSERT and updated_at now() of a transaction that found the committed payment:
-- only a transaction that began before the INSERT committed can set an updated_at older than
-- created_at, by less than its own length, and its payment is found that much later. A new
-- name, as docs/developing.md asks of a function whose behaviour changes: v1 stays as it was
-- for the relays and operator commands of the previous release (the new index serves its
-- provider and state conditions too).
CREATE FUNCTION outbox.uncovered_authorizations_v2(p_now timestamptz DEFAULT NULL)
RETURNS TABLE (payment_id text, provider text, currency text, authorized_minor bigint,
               unchanged_since timestamptz, action text, after_seconds integer)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT p.payment_id, p.provider, p.currency, p.authorized_minor, p.updated_at, a.action,
           a.after_seconds
    FROM outbox.authorization_policies AS a
    CROSS JOIN LATERAL (SELECT coalesce(p_now, now()) - make_interval(secs => a.after_seconds)
                            AS cutoff) AS c
    JOIN outbox.payments AS p ON p.provider = a.provider AND p.state = 'authorized'
    WHERE a.action <> 'off'
      AND p.created_at <= c.cutoff
      AND p.updated_at <= c.cutoff
      AND NOT EXISTS (SELECT 1 FROM outbox.flow_steps AS s
                      JOIN outbox.flows AS f ON f.id = s.flow_id
                      WHERE s.payment_id = p.payment_id
                        AND f.state IN ('running', 'compensating', 'needs_operator'))
      AND NOT EXISTS (SELECT 1 FROM outbox.payment_intents AS i
                      WHERE i.payment_id = p.payment_id AND i.status NOT IN ('succeeded', 'failed'))
$$;

REVOKE ALL ON FUNCTION outbox.uncovered_authorizations_v2(timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.uncovered_authorizations_v2(timestamptz)
    TO outbox_operator, outbox_relay;
