"""W3C trace context (``traceparent``) carried by an intent.

Applications may put ``traceparent`` in an intent's metadata; sql/0006 refuses a malformed
one at INSERT (``payment_intents_traceparent_w3c``). The relay passes a valid one to the
provider call's headers, binds its trace id to every log line of the intent, and the
write-back copies it onto the result event. Rows written before that check existed are
parsed here again: an invalid value is dropped, never forwarded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["TraceContext", "parse_traceparent"]

# version 00: 32 hex trace id, 16 hex parent id, 2 hex flags, lower case.
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_PARENT = "0" * 16


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: str
    parent_id: str
    flags: str

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags}"


def parse_traceparent(value: object) -> TraceContext | None:
    """The trace context in ``value``, or None when it is absent or not valid W3C."""
    if not isinstance(value, str):
        return None
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    trace_id, parent_id, flags = match.groups()
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_PARENT:
        return None
    return TraceContext(trace_id, parent_id, flags)
