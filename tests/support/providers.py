"""The Stripe adapter paired with the fake Stripe-compatible server it is tested against.

``stripe_on_fake()`` starts the in-process fake (tests/support/fake_server.py) and yields it with
a :class:`StripeAdapter` pointed at it; ``stripe_adapter(url)`` is the adapter alone, for
a server of the test's own. Both close the adapter's connections on the way out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from provider_adapters.fake import FaultConfig
from provider_adapters.stripe import StripeAdapter
from tests.support.fake_server import API_KEY, FakeServer, running_fake

__all__ = ["stripe_adapter", "stripe_on_fake"]


@asynccontextmanager
async def stripe_adapter(
    base_url: str, *, api_key: str = API_KEY, **options: Any
) -> AsyncIterator[StripeAdapter]:
    """An adapter named ``stripe``, by default with the fake's API key; ``options`` (e.g.
    ``read_timeout_seconds``) go to :class:`StripeAdapter`."""
    adapter = StripeAdapter(name="stripe", api_key=api_key, base_url=base_url, **options)
    try:
        yield adapter
    finally:
        await adapter.aclose()


@asynccontextmanager
async def stripe_on_fake(
    faults: FaultConfig | None = None,
) -> AsyncIterator[tuple[FakeServer, StripeAdapter]]:
    async with running_fake(faults) as fake, stripe_adapter(fake.url) as adapter:
        yield fake, adapter
