"""ruff and mypy are part of the test suite, so CI fails on lint or type errors; so is
importing a third-party package that the right pyproject.toml does not declare."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


# -- declared dependencies ------------------------------------------------------------------
#
# Every third-party module the code imports must come from a distribution it declares, in
# the place that ships that code: the production package's modules from its runtime
# dependencies, outbox-relay-demo's modules (demo/pyproject.toml) from those plus its own,
# tests/ and scripts/ from the `test` extra too, benchmarks/ from `bench` too. An import
# guarded by ``except ImportError`` is optional by design: any extra may provide it.

LOCAL_PACKAGES = frozenset({"relay", "provider_adapters", "tests", "benchmarks", "scripts"})


def _pyproject(path: Path) -> dict[str, Any]:
    with path.open("rb") as file:
        data: dict[str, Any] = tomllib.load(file)
    return data


MAIN = _pyproject(ROOT / "pyproject.toml")
DEMO = _pyproject(ROOT / "demo" / "pyproject.toml")
# What outbox-relay-demo packs from the main source tree, as paths relative to ROOT.
DEMO_FILES = sorted(
    (ROOT / "demo" / source).resolve().relative_to(ROOT)
    for source in DEMO["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
)


@dataclass(frozen=True)
class Imported:
    module: str  # the top-level name, e.g. "aiormq" for "from aiormq.abc import X"
    where: str  # path:line
    optional: bool  # inside ``try: ... except ImportError``


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(
        isinstance(kind, ast.Name) and kind.id in ("ImportError", "ModuleNotFoundError")
        for kind in kinds
    )


def _imports(path: Path) -> Iterator[Imported]:
    label = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path

    def visit(node: ast.AST, optional: bool) -> Iterator[Imported]:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.partition(".")[0]
            if top not in sys.stdlib_module_names and top not in LOCAL_PACKAGES:
                yield Imported(top, f"{label}:{node.lineno}", optional)
        guarded = isinstance(node, ast.Try) and any(map(_catches_import_error, node.handlers))
        for child in ast.iter_child_nodes(node):
            in_body = guarded and isinstance(node, ast.Try) and child in node.body
            yield from visit(child, optional or in_body)

    yield from visit(ast.parse(path.read_text(), str(path)), False)


def _python_files(*relative: Path) -> list[Path]:
    files: list[Path] = []
    for entry in relative:
        path = ROOT / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def _distributions(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` name, with those their extras add
    (``psycopg[pool]`` declares psycopg-pool), whatever the environment markers say."""
    names: set[str] = set()
    for text in requirements:
        requirement = Requirement(text)
        names.add(canonicalize_name(requirement.name))
        if not requirement.extras:
            continue
        try:
            added = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for dependency in map(Requirement, added):
            if dependency.marker is not None and any(
                dependency.marker.evaluate({"extra": extra}) for extra in requirement.extras
            ):
                names.add(canonicalize_name(dependency.name))
    return names


RUNTIME = _distributions(MAIN["project"]["dependencies"])
EXTRAS = {
    extra: _distributions(requirements)
    for extra, requirements in MAIN["project"]["optional-dependencies"].items()
}
DEMO_DEPENDENCIES = _distributions(DEMO["project"]["dependencies"])
ANY_EXTRA = RUNTIME | DEMO_DEPENDENCIES | set().union(*EXTRAS.values())


def _undeclared(files: list[Path], declared: set[str]) -> list[str]:
    """``where: module`` for every third-party import not provided by ``declared``."""
    providers = importlib.metadata.packages_distributions()
    problems = []
    for path in files:
        for imported in _imports(path):
            # Not installed here (a marker left it out): the module's own name stands in.
            dists = providers.get(imported.module) or [imported.module]
            allowed = ANY_EXTRA if imported.optional else declared
            if not {canonicalize_name(dist) for dist in dists} & allowed:
                problems.append(f"{imported.where}: {imported.module} (from {', '.join(dists)})")
    return problems


def _is_demo_file(path: Path) -> bool:
    relative = path.relative_to(ROOT)
    return any(relative == demo or demo in relative.parents for demo in DEMO_FILES)


def test_the_production_package_imports_only_its_runtime_dependencies() -> None:
    shipped = [
        path
        for path in _python_files(Path("relay"), Path("provider_adapters"))
        if not _is_demo_file(path)
    ]
    assert len(shipped) > 50
    assert _undeclared(shipped, RUNTIME) == [], "declare these in [project] dependencies"


def test_the_demo_distribution_imports_only_what_it_and_the_relay_declare() -> None:
    demo_files = _python_files(*DEMO_FILES)
    assert any(path.name == "server.py" for path in demo_files)
    assert _undeclared(demo_files, RUNTIME | DEMO_DEPENDENCIES) == [], (
        "declare these in demo/pyproject.toml's dependencies"
    )


def test_tests_scripts_and_benchmarks_import_only_declared_packages() -> None:
    in_tests = _python_files(Path("tests"), Path("scripts"))
    # Tests and benchmarks use the fake providers from the source tree (editable install).
    with_fakes = RUNTIME | DEMO_DEPENDENCIES
    assert _undeclared(in_tests, with_fakes | EXTRAS["test"]) == [], (
        "declare these in the test extra"
    )
    in_benchmarks = _python_files(Path("benchmarks"))
    assert _undeclared(in_benchmarks, with_fakes | EXTRAS["bench"]) == [], (
        "declare these in the bench extra"
    )


def test_the_demo_files_are_left_out_of_the_production_wheel() -> None:
    """What outbox-relay-demo packs is exactly what the production wheel excludes, so every
    module ships in exactly one of the two."""
    excluded = MAIN["tool"]["hatch"]["build"]["targets"]["wheel"]["exclude"]
    assert sorted(Path(pattern) for pattern in excluded) == DEMO_FILES


def test_the_import_walk_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The checks above rely on this walk: plain, dotted, from-imports and nested ones are
    seen; guarded ones are optional; relative, stdlib and local ones are not third-party."""
    module = tmp_path / "sample.py"
    module.write_text(
        "import os, aiormq.abc\n"
        "from stripe import HTTPClient\n"
        "from . import sibling\n"
        "from relay.infra import db\n"
        "def f():\n"
        "    import httpx\n"
        "try:\n"
        "    import pgserver\n"
        "except (OSError, ModuleNotFoundError):\n"
        "    pass\n"
    )
    found = {(i.module, i.optional) for i in _imports(module)}
    assert found == {("aiormq", False), ("stripe", False), ("httpx", False), ("pgserver", True)}


@pytest.mark.parametrize(
    "argv", [["demo"], ["demo", "--payments", "5"], ["fake-provider", "--port", "0"]]
)
def test_without_the_demo_distribution_the_cli_says_what_to_install(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A production install (`pip install .`) has no provider_adapters.fake: `demo` and
    `fake-provider` exit 2 naming the install command; the other commands still parse."""
    from relay.cli.main import build_parser, main

    monkeypatch.setitem(sys.modules, "provider_adapters.fake", None)  # as if not installed
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"`outbox-relay {argv[0]}` needs the fake providers" in error
    assert "pip install '.[demo]' ./demo" in error
    listing = " ".join(build_parser().format_help().split())  # unwrapped, whatever the width
    assert listing.count("; needs the demo extra") == 2  # fake-provider and demo
    assert build_parser().parse_args(["status", "--json"]).json is True
