-- Issue 20, "Failover for new payments". A routed payment's first intent (authorize or
-- charge) that could not reach its provider at all moves to the next usable target of the
-- rule that routed it, under a new idempotency key scoped to that provider, in one write:
-- the intent, the payment, their blocked later intents, and (by the tables' own triggers)
-- the hash-chained audit rows, actor the relay that moved it and its reason as the why.
--
-- "Could not reach at all" is a stored fact, never a guess: `unsent_attempts` counts the
-- attempts whose outcome proved that no request was sent (a connect failure: the adapters'
-- Retryable provider_unreachable / connection_error, provider_adapters/base.py UNSENT_CODES).
-- A claim counts an attempt; a hand-back or a parked intent takes it back (release_leases,
-- complete_intents); a crash, a cut-off or an ambiguous or any other reply leaves it counted
-- and not unsent. So attempts = unsent_attempts holds only while nothing may have reached the
-- provider, and an intent with one maybe-sent attempt never fails over (the janitor, or its
-- retries under the same key, settle it with its provider first). An operator's re-drive
-- (outbox.retry_dead_intents) sets attempts back to 0, which would erase that history: the
-- trigger payment_intents_failover_history keeps it in `maybe_sent`, sticky.
--
-- The fallback order is the routing rule's own target list (decision, docs/routing.md
-- "Failover"): the targets after routing are the providers the rule was approved to send
-- this payment's traffic to, so failover adds no new place money can go, needs no column or
-- four-eyes rule of its own, and an operator stops it with the commands that exist (disable
-- the target, or the rule). Only payments a rule routed fail over: a provider the application
-- named is its choice. A payment never goes back to a provider it left (failed_over_from).

ALTER TABLE outbox.payment_intents
    ADD COLUMN unsent_attempts integer NOT NULL DEFAULT 0
        CONSTRAINT payment_intents_unsent_attempts_not_negative CHECK (unsent_attempts >= 0);
ALTER TABLE outbox.payment_intents_archive ADD COLUMN unsent_attempts integer NOT NULL DEFAULT 0;
ALTER TABLE outbox.payment_intents ADD COLUMN maybe_sent boolean NOT NULL DEFAULT false;
ALTER TABLE outbox.payment_intents_archive ADD COLUMN maybe_sent boolean NOT NULL DEFAULT false;

COMMENT ON COLUMN outbox.payment_intents.maybe_sent IS
    'An attempt of this intent may have reached its provider before its attempts were counted '
    'back to fewer (an operator''s re-drive sets them to 0): it never fails over (sql/0064).';

-- Attempts go down in three places: a hand-back and a parked intent give back the claim's
-- own attempt (never sent), an operator's re-drive sets them to 0. Before the count goes
-- down, what it showed is kept: a history with a maybe-sent attempt sets maybe_sent; an
-- all-unsent history stays all-unsent at the new count. Rare statements only: claims and
-- write-backs never lower attempts, so the WHEN clause keeps this off their path.
CREATE FUNCTION outbox.payment_intents_failover_history() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- The claim in progress (in_flight) is the attempt being given back: not sent.
    IF OLD.attempts - (OLD.status = 'in_flight')::integer > OLD.unsent_attempts THEN
        NEW.maybe_sent := true;
    ELSE
        NEW.unsent_attempts := least(NEW.unsent_attempts, NEW.attempts);
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER payment_intents_failover_history
    BEFORE UPDATE OF attempts ON outbox.payment_intents
    FOR EACH ROW WHEN (NEW.attempts < OLD.attempts AND NOT OLD.maybe_sent)
    EXECUTE FUNCTION outbox.payment_intents_failover_history();

COMMENT ON COLUMN outbox.payment_intents.unsent_attempts IS
    'Attempts whose outcome proved no request was sent (a connect failure, sql/0064). While it '
    'equals attempts, nothing of this intent can have reached its provider: the only state in '
    'which a routed first intent may fail over.';

ALTER TABLE outbox.payments ADD COLUMN failed_over_from text[];

COMMENT ON COLUMN outbox.payments.failed_over_from IS
    'The providers this payment left by failover (sql/0064), in order; NULL if it never moved. '
    'A payment never fails over back to one of them.';

-- One intent, locked by the caller: moved if it qualifies, else nothing. p_lease_token names
-- the claim of a relay whose attempt just failed to connect (the fence: the intent must still
-- be in flight under that token, and that attempt counts as unsent); NULL for a pending intent
-- (a sweep by a relay whose breaker for the provider is open).
CREATE FUNCTION outbox.fail_over_intent_v1(p_id bigint, p_lease_token bigint, p_why text)
RETURNS TABLE (intent_id bigint, payment_id text, from_provider text, to_provider text,
               idempotency_key text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    i        outbox.payment_intents;
    pay      outbox.payments;
    rule     outbox.routing_rules;
    cand     outbox.payment_intents;
    target   text;
    new_key  text;
BEGIN
    SELECT * INTO i FROM outbox.payment_intents AS pi WHERE pi.id = p_id FOR UPDATE;
    IF NOT FOUND OR i.payment_seq <> 1 OR i.action NOT IN ('authorize', 'charge') OR i.maybe_sent THEN
        RETURN;
    END IF;
    IF p_lease_token IS NULL THEN
        IF i.status <> 'pending' OR i.attempts <> i.unsent_attempts THEN
            RETURN;
        END IF;
    ELSIF i.status <> 'in_flight' OR i.lease_token IS DISTINCT FROM p_lease_token
          OR i.attempts - 1 <> i.unsent_attempts THEN
        RETURN;
    END IF;
    SELECT * INTO pay FROM outbox.payments AS p WHERE p.payment_id = i.payment_id FOR UPDATE;
    IF pay.routing_rule_id IS NULL OR pay.state <> 'new' OR pay.provider_reference IS NOT NULL
       OR pay.awaiting_action IS NOT NULL OR pay.provider <> i.provider THEN
        RETURN;
    END IF;
    SELECT * INTO rule FROM outbox.routing_rules AS r WHERE r.id = pay.routing_rule_id AND r.enabled;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- The rule's targets in list order: the first other one the registry's INSERT rules
    -- (registered, enabled, currency, limits, representable amount) would accept.
    FOREACH target IN ARRAY rule.providers LOOP
        CONTINUE WHEN target = i.provider OR target = ANY (coalesce(pay.failed_over_from, '{}'));
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM outbox.providers AS p WHERE p.name = target AND p.enabled);
        cand := i;
        cand.provider := target;
        BEGIN
            PERFORM outbox.payment_intents_check_provider_v1(cand, true);
        EXCEPTION WHEN check_violation THEN
            CONTINUE;
        END;
        -- Scoped to the provider: derived, so every attempt there sends it; a key too long
        -- for the column's rule is shortened to a hash of it.
        new_key := i.idempotency_key || '.fo.' || target;
        IF length(new_key) > 255
           OR EXISTS (SELECT 1 FROM outbox.payment_intents AS u
                      WHERE u.provider = target AND u.idempotency_key = new_key)
           OR EXISTS (SELECT 1 FROM outbox.payment_intents_archive AS u
                      WHERE u.provider = target AND u.idempotency_key = new_key) THEN
            -- Too long, or (an application's own key) taken there: the intent's id makes it unique.
            new_key := 'outbox_fo_' || encode(sha256(convert_to(new_key || '/' || i.id, 'UTF8')), 'hex');
        END IF;
        PERFORM set_config('outbox.reason',
            format('failover from %s to %s (rule %s v%s): %s', i.provider, target, rule.name,
                   rule.version, p_why), true);
        UPDATE outbox.payment_intents AS pi
        SET provider = target,
            idempotency_key = new_key,
            status = 'pending',
            attempts = 0,
            unsent_attempts = 0,
            lease_token = NULL,
            lease_expires_at = NULL,
            claimed_by = NULL,
            available_at = now(),
            error_code = 'failed_over',
            error_message = format('never reached %s (%s); moved to %s under a new idempotency key',
                                   i.provider, p_why, target),
            updated_at = now()
        WHERE pi.id = i.id;
        -- Later intents inserted meanwhile wait blocked behind this one, never sent: they
        -- follow their payment to its new provider (their keys were never used anywhere).
        UPDATE outbox.payment_intents AS pi
        SET provider = target, updated_at = now()
        WHERE pi.payment_id = i.payment_id AND pi.id <> i.id AND pi.status = 'blocked';
        -- After the intents: an intent's first touch writes its and its payment's creation
        -- audit rows (sql/0037), which must open the payment's chain before this update.
        UPDATE outbox.payments AS p
        SET provider = target,
            failed_over_from = array_append(coalesce(p.failed_over_from, '{}'), i.provider),
            updated_at = now()
        WHERE p.payment_id = i.payment_id;
        RETURN QUERY SELECT i.id, i.payment_id, i.provider, target, new_key;
        RETURN;
    END LOOP;
END;
$$;

COMMENT ON FUNCTION outbox.fail_over_intent_v1(bigint, bigint, text) IS
    'Move a routed payment''s first intent that never reached its provider to the next usable '
    'target of its rule, under a new idempotency key (sql/0064); nothing when it does not qualify.';

-- A relay whose breaker for p_provider is open: move up to p_limit pending first intents of
-- routed payments that never reached it. Rows locked elsewhere (a claim, an INSERT of a later
-- intent) are skipped for the next sweep. Candidates that cannot move (no usable target) are
-- passed over, so they cannot hold back the ones behind them.
CREATE FUNCTION outbox.fail_over_pending_v1(p_provider text, p_limit integer, p_why text)
RETURNS TABLE (intent_id bigint, payment_id text, from_provider text, to_provider text,
               idempotency_key text)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c      record;
    moved  integer := 0;
BEGIN
    FOR c IN
        SELECT pi.id
        FROM outbox.payment_intents AS pi
        JOIN outbox.payments AS p ON p.payment_id = pi.payment_id
        JOIN outbox.routing_rules AS r ON r.id = p.routing_rule_id
        WHERE pi.status = 'pending' AND pi.provider = p_provider
          AND pi.payment_seq = 1 AND pi.attempts = pi.unsent_attempts AND NOT pi.maybe_sent
          AND r.enabled AND cardinality(r.providers) > 1
        ORDER BY pi.available_at, pi.id
        FOR UPDATE OF pi, p SKIP LOCKED
    LOOP
        EXIT WHEN moved >= p_limit;
        RETURN QUERY SELECT * FROM outbox.fail_over_intent_v1(c.id, NULL, p_why);
        IF FOUND THEN
            moved := moved + 1;
        END IF;
    END LOOP;
END;
$$;

COMMENT ON FUNCTION outbox.fail_over_pending_v1(text, integer, text) IS
    'Fail over (sql/0064) up to p_limit pending first intents of routed payments of p_provider '
    'that never reached it: run by a relay whose breaker for p_provider is open.';

REVOKE EXECUTE ON FUNCTION outbox.payment_intents_failover_history() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION outbox.fail_over_intent_v1(bigint, bigint, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION outbox.fail_over_pending_v1(text, integer, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox.fail_over_intent_v1(bigint, bigint, text) TO outbox_relay;
GRANT EXECUTE ON FUNCTION outbox.fail_over_pending_v1(text, integer, text) TO outbox_relay;

-- The write-back records an unsent attempt (complete_intents); the relay may write the column.
GRANT UPDATE (unsent_attempts) ON outbox.payment_intents TO outbox_relay;
