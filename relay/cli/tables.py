"""Plain-text tables, progress lines and refusals for the operator commands: no I/O but the
streams they print to."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import TextIO

import psycopg

__all__ = [
    "Progress",
    "clip",
    "format_seconds",
    "format_when",
    "plain_help",
    "print_refusal",
    "render_table",
]

# reStructuredText markup of docstrings: ``literal`` and **strong**.
_RST_MARKUP = re.compile(r"``(.+?)``|\*\*(.+?)\*\*", re.DOTALL)


def plain_help(text: str) -> str:
    """A docstring as --help prints it: reStructuredText markup taken out, text kept."""
    return _RST_MARKUP.sub(lambda m: next(g for g in m.groups() if g is not None), text)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns as wide as their widest cell; numbers right-aligned, text left-aligned."""
    cells = [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    numeric = [
        bool(rows) and all(_is_number(row[i]) or row[i] is None for row in rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(widths[i]) if numeric[i] else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(row) for row in cells)])


def clip(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters; a cut one ends in ``…`` so a reader knows
    there is more, after the last whole word when one ends in the second half."""
    if len(text) <= width:
        return text
    head = text[: width - 1]
    space = head.rfind(" ")
    if space > width // 2:
        head = head[:space]
    return head.rstrip(" ,;:") + "…"


def format_when(value: object) -> str:
    """A timestamp to the second (``2026-12-07 20:30:06+00:00``); ``-`` for None."""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    return "-" if value is None else str(value)


def format_seconds(seconds: float | None) -> str:
    """``93784`` -> ``'1d 2h'``, ``125`` -> ``'2m 5s'``, ``4.2`` -> ``'4.2s'``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


class Progress:
    """``label: done/total (pct%)`` on stderr: one updating line on a terminal, else a line
    per step (every ``every`` items, and at the end) so logs show how far a job got."""

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self._tty = self.stream.isatty()

    def advance(self, n: int) -> None:
        self.done += n
        pct = 100 * self.done // self.total if self.total else 100
        text = f"{self.label}: {self.done}/{self.total} ({pct}%)"
        if self._tty:
            print(f"\r{text}", end="", file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)

    def finish(self) -> None:
        if self._tty and self.done:
            print(file=self.stream, flush=True)


def print_refusal(exc: psycopg.Error, *, hint: str | None = None) -> int:
    """The database's refusal on stderr: its message, the rule (constraint) that refused and
    its hint (``hint`` when the database gives none); exit status 1."""
    diag = exc.diag
    rule = f" [{diag.constraint_name}]" if diag.constraint_name else ""
    print(f"error: {diag.message_primary or exc}{rule}", file=sys.stderr)
    if diag.message_hint or hint:
        print(f"hint: {diag.message_hint or hint}", file=sys.stderr)
    return 1
