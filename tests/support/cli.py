"""The `outbox-relay` command line as a user runs it: a subprocess of this interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

__all__ = ["BASE_ENV", "run_cli"]

# The environment without the runner's own RELAY_* settings, so a test sets exactly the
# configuration it means.
BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m relay ARGS` with BASE_ENV plus ``env``; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env={**BASE_ENV, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard, not a speed limit
    )
