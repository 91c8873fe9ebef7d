"""The LISTEN connection backs off while the database is away: one log line per wait,
waits doubling to a cap, never a reconnect flood (issue 17: two listen_connection_lost
lines a second against a database that was not there)."""

from __future__ import annotations

import socket

import pytest
import structlog

from relay.infra.db import listen_forever

pytestmark = pytest.mark.anyio


class _Enough(Exception):
    """Ends listen_forever after the waits the test wants to see."""


def _refusing_conninfo() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens there now: each connect is refused at once.
    return f"host=127.0.0.1 port={port} dbname=x user=x connect_timeout=5"


@pytest.mark.parametrize("jitter", [0.0, 1.0])
async def test_reconnects_back_off_to_a_cap_with_one_line_per_wait(jitter: float) -> None:
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 8:
            raise _Enough

    with structlog.testing.capture_logs() as logs, pytest.raises(_Enough):
        await listen_forever(
            _refusing_conninfo(),
            lambda: None,
            retry_seconds=1.0,
            max_retry_seconds=30.0,
            sleep=record,
            jitter=lambda: jitter,
        )
    bounds = [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    # Jitter keeps each wait between half its bound and all of it.
    assert waits == [bound * (0.5 + jitter / 2) for bound in bounds]
    lost = [entry for entry in logs if entry["event"] == "listen_connection_lost"]
    assert [entry["failures"] for entry in lost] == list(range(1, 9))
    assert [entry["retry_in"] for entry in lost] == [round(w, 2) for w in waits]
