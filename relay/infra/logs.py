"""structlog set-up: JSON lines on stdout in production, readable lines on a terminal.

Every event is one line on stdout. Lines logged inside an intent's processing carry
``intent_id``, ``payment_id``, ``provider``, ``attempt`` and ``trace_id`` (bound through
contextvars by the runtime). Records of libraries that use the standard ``logging``
module (psycopg's pool, aiohttp, the Stripe SDK) go through the same chain, so they are
JSON lines too. Every value passes :func:`relay.infra.redaction.redact_processor` before it is
rendered: secrets and card numbers never reach the output. The rendered line then passes
:func:`relay.infra.redaction.scrub_registered`, so a configured secret (an API key, a password;
see :func:`relay.infra.config.load_settings`) is masked even where no value rule looks (a key
of the event, text a renderer adds).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog

from relay.infra.redaction import redact_processor, scrub_registered

__all__ = ["configure_logging"]


def configure_logging(
    fmt: Literal["auto", "json", "console"] = "auto",
    level: int = logging.INFO,
    *,
    stream: TextIO | None = None,
) -> None:
    out = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    # The level and the time stamp are the relay's own text, added after redaction (they
    # cannot hold a secret, and redacting them cost a regex pass each per line); they are
    # still added before rendering, in the same place of the line.
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.format_exc_info,
        redact_processor,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, renderer, _scrub_line],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    # Standard-library records (third-party libraries): same chain, same stream.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
                _scrub_line,
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_outbox_relay", False):
            root.removeHandler(old)
    handler._outbox_relay = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(max(level, logging.WARNING))  # libraries: warnings and errors only


def _scrub_line(_logger: object, _method: str, line: Any) -> Any:
    """Last processor: the rendered line without any registered secret."""
    return scrub_registered(line) if isinstance(line, str) else line
