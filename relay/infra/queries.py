"""The relay's SQL, parsed once from queries.sql into named statements."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final, LiteralString

__all__ = ["QUERIES", "parse_queries"]

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, LiteralString]:
    """Split ``-- name: X`` blocks; a block's comment lines are kept as documentation."""
    parts = _NAME.split(text)
    queries: dict[str, LiteralString] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"queries.sql defines {name!r} twice")
        statement = "\n".join(
            line for line in body.strip().splitlines() if not line.lstrip().startswith("--")
        ).strip()
        # The file ships with the package and is not built from input: a literal in effect.
        queries[name] = statement  # type: ignore[assignment]
    return queries


QUERIES: Final = parse_queries((Path(__file__).parent / "queries.sql").read_text())
