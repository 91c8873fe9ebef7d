"""ruff and mypy are part of the test suite, so CI fails on lint or type errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; install the test extra: pip install -e '.[test]'")
    return found


def test_ruff_is_clean() -> None:
    result = subprocess.run([_tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _lint_imports(cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run(
        [_tool("lint-imports"), "--no-cache"], cwd=cwd, capture_output=True, text=True, env=env
    )


def test_import_contracts_hold() -> None:
    """The architecture's rules (pyproject.toml, [tool.importlinter]) hold for the tree."""
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "violation", "contract"),
    [
        ("relay/domain/money.py", "import relay.infra.db", "pure logic does no I/O"),
        ("relay/domain/breaker.py", "import psycopg", "pure logic does no I/O"),
        ("relay/core/store.py", "import relay.cli.main", "relay is layered"),
        ("relay/finance/ledger.py", "import relay.operations.status", "relay is layered"),
        ("provider_adapters/stripe.py", "import relay.infra.config", "never import the relay"),
    ],
)
def test_a_violation_fails_naming_its_rule(
    tmp_path: Path, module: str, violation: str, contract: str
) -> None:
    """The contracts bite: one forbidden import in a copy of the tree breaks the named rule."""
    for package in ("relay", "provider_adapters"):
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{violation}  # deliberate\n")
    result = _lint_imports(tmp_path, extra_path=tmp_path)
    assert result.returncode != 0, result.stdout
    broken = [line for line in result.stdout.splitlines() if " BROKEN" in line]
    assert any(contract in line for line in broken), result.stdout
