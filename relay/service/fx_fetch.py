"""The relay's opt-in periodic fetch of the ECB's reference rates (RELAY_FX_ECB_URL).

Off unless RELAY_FX_ECB_URL is set. Then one task, owned by the service's task group,
fetches the document every RELAY_FX_ECB_INTERVAL_SECONDS (x0.75-1.25 jitter, so a fleet
does not fetch in step), parses it (relay.domain.fx.parse_ecb_xml) and records its rates
in one transaction as ``relay:<instance>`` (relay.finance.fx.import_document_as_relay).
Every relay of a fleet may fetch: a rate already recorded is skipped by the table's
unique index, so N relays record each rate once.

A failed fetch, a document that does not parse, or a database error is logged with what
to do and counted (``outbox_relay_fx_fetches_total{result="failed"}``); the loop goes on
and the relay's other work is never touched. Staleness is watched by the rate-age gauge
(relay/service/depth.py) and the alert OutboxRelayFxRateStale, not by this loop.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import aiohttp
import anyio
import psycopg
import structlog

from relay.domain.fx import FxDocumentError, parse_ecb_xml
from relay.finance.fx import (
    FetchError,
    ImportReport,
    fetch_document_async,
    import_document_as_relay,
)
from relay.infra import metrics
from relay.infra.db import Database

__all__ = ["ECB_SOURCE_NAME", "EcbFetcher"]

log = structlog.get_logger("relay.service.fx_fetch")

ECB_SOURCE_NAME = "ECB euro foreign exchange reference rates"


class EcbFetcher:
    def __init__(
        self,
        db: Database,
        url: str,
        *,
        interval_seconds: float = 3_600.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.db = db
        self.url = url
        self.interval_seconds = interval_seconds
        self.rng = rng
        self.actor = f"relay:{db.name or 'outbox-relay'}"

    async def fetch_once(self, session: aiohttp.ClientSession) -> ImportReport:
        """Fetch, parse and record once; raises FetchError, FxDocumentError, psycopg.Error."""
        document = parse_ecb_xml(await fetch_document_async(session, self.url))
        async with self.db.pool.connection() as conn:
            report = await import_document_as_relay(
                conn, document, actor=self.actor, source_name=ECB_SOURCE_NAME, source_url=self.url
            )
        metrics.FX_FETCHES.labels(result="imported").inc()
        metrics.FX_RATES_IMPORTED.inc(report.inserted)
        log.info(
            "fx_rates_fetched",
            url=self.url,
            rates=report.rates_in_document,
            recorded=report.inserted,
        )
        return report

    async def run(self) -> None:
        """Fetch at once, then every interval, until cancelled."""
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    await self.fetch_once(session)
                except (FetchError, FxDocumentError, psycopg.Error) as exc:
                    metrics.FX_FETCHES.labels(result="failed").inc()
                    log.warning(
                        "fx_fetch_failed",
                        url=self.url,
                        error=str(exc)[:300],
                        remedy="check RELAY_FX_ECB_URL; rates already recorded stay in use "
                        "until they are older than outbox.fx_policy.max_rate_age",
                    )
                await anyio.sleep(self.interval_seconds * (0.75 + self.rng() / 2))
