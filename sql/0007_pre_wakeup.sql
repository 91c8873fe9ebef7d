-- Debounced wake-ups: NOTIFY only while some relay may be waiting for one.
--
-- A transaction that notified takes a cluster-wide lock while it commits, so notifying
-- commits queue behind each other (benchmarks/insert_cost.py measures it). A relay that
-- is saturated (its lanes are full) does not need wake-ups: it comes back for more as
-- soon as a call finishes. So a relay sets `wanted` before it goes to sleep and clears it
-- when it claims with its capacity full; the insert trigger notifies only while `wanted`.
-- Polling with jitter stays correct on its own: a wake-up lost to a race costs at most
-- one poll interval. Without the row (or with `wanted` true) every statement notifies.

CREATE TABLE outbox.relay_wakeup (
    singleton   boolean PRIMARY KEY DEFAULT true CONSTRAINT relay_wakeup_single_row CHECK (singleton),
    wanted      boolean NOT NULL DEFAULT true,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO outbox.relay_wakeup DEFAULT VALUES;

COMMENT ON TABLE outbox.relay_wakeup IS
    'wanted: some relay is idle and waits for a NOTIFY on outbox_payment_intents; '
    'relays set and clear it, the insert trigger reads it.';

-- SECURITY DEFINER: the application's role inserts intents and needs no right on the flag.
CREATE OR REPLACE FUNCTION outbox.payment_intents_notify() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF coalesce((SELECT wanted FROM outbox.relay_wakeup), true) THEN
        PERFORM pg_notify('outbox_payment_intents', '');
    END IF;
    RETURN NULL;
END;
$$;
