"""The Helm chart (helm/outbox-relay), its example application chart, the Dockerfile and the
monitoring files (deploy/).

Helm's own engine (v4's Go library, no `helm` binary) lints and renders the charts, through
two Python packages, each in a child process (a Go panic cannot take pytest down; one child
per package serves the whole session):

* `helm-sdkpy`, the package the chart's issue names, lints each mode: its `Lint` takes only
  a chart directory (no values, no strict mode) and reports findings by path and severity
  without their text, so a mode is linted as a temporary copy of the chart whose
  values.yaml holds that mode's values. It needs Python >= 3.12: this interpreter, else the
  oldest pyenv version >= 3.12, else python3.12+ on PATH.
* `helm-python-sdk` (any CPython >= 3.10) renders offline with install semantics, so the
  tests read the manifests Kubernetes would receive and see the chart's `fail` refusals
  (`helm lint` turns `fail` into a log line), and lints with values, reporting findings
  with their text: the schema tests check which value a finding names, and a failed
  helm-sdkpy lint shows its findings. helm-sdkpy renders nothing without a cluster.

Neither is a project dependency: the first run installs each with pip into a cache
directory outside the repository ($XDG_CACHE_HOME or ~/.cache, then outbox-relay-tests/),
keyed by its version, the Python version and the machine; later runs reuse it.

Where one cannot be installed (no network, no wheel for the platform, no Python >= 3.12) its
tests skip with the reason, except under RELAY_TEST_REQUIRE_SERVICES=1 (CI), where they
fail.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import platform
import re
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "outbox-relay"
EXAMPLE = ROOT / "helm" / "examples" / "app-with-sidecar"
HELM_PYTHON_SDK_VERSION = "0.2.2"
HELM_SDKPY_VERSION = "0.1.32"
REQUIRE_SERVICES = os.environ.get("RELAY_TEST_REQUIRE_SERVICES") == "1"
RELEASE = "rel"
NAMESPACE = "payments"
KUBE_VERSION = "v1.30.0"
ANSWER_TIMEOUT_SECONDS = 300  # a hung Go call fails the test instead of the whole run

# Runs in the child process with helm-python-sdk importable: one JSON request per line in,
# one JSON answer per line out.
_WORKER = r"""
import json, re, sys
import helm_python as helm

def docs(text):
    out = []
    for part in re.split(r"(?m)^---\s*$", text):
        if part.strip():
            parsed = helm.values_from_yaml(part)
            if parsed:
                out.append(parsed)
    return out

def handle(req):
    op = req["op"]
    if op == "lint":
        return helm.lint(req["chart"], req.get("values"), strict=True,
                         kube_version=req["kube_version"])
    if op == "render":
        rendered = helm.Chart.load(req["chart"]).render(
            req.get("values"), name=req["name"], namespace=req["namespace"], is_install=True)
        return {path: (text if path.endswith(".txt") else docs(text))
                for path, text in rendered.items()}
    if op == "yaml":
        return helm.values_from_yaml(req["text"])
    if op == "version":
        return helm.helm_sdk_version()
    raise ValueError(op)

for line in sys.stdin:
    req = json.loads(line)
    try:
        answer = {"ok": True, "result": handle(req)}
    except Exception as exc:
        answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
"""


# Runs in the child process (Python >= 3.12) with helm-sdkpy importable: one chart
# directory per line in, its lint report (JSON) per line out.
_LINT_WORKER = r"""
import asyncio, json, sys
import helm_sdkpy

lint = helm_sdkpy.Lint(helm_sdkpy.Configuration(namespace=sys.argv[1]))
for line in sys.stdin:
    req = json.loads(line)
    try:
        if req["op"] == "version":
            result = helm_sdkpy.get_version()
        else:
            result = asyncio.run(lint.run(req["chart"]))
        answer = {"ok": True, "result": result}
    except Exception as exc:
        answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(answer, default=str) + "\n")
    sys.stdout.flush()
"""


class HelmError(Exception):
    """Helm refused: a render error (a template's `fail`, a schema violation) or bad input."""


class _HelmChild:
    """A child process running a worker script with a Helm SDK importable."""

    def __init__(self, python: str, script: str, sdk_dir: Path, home: Path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(sdk_dir)
        for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            env[var] = str(home / var.lower())
        self._stderr = (home / "helm-stderr.log").open("w+")
        self._proc = subprocess.Popen(
            [python, "-c", script, NAMESPACE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )

    def _ask(self, **request: Any) -> Any:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], ANSWER_TIMEOUT_SECONDS)
        if not ready:
            self._proc.kill()
            raise RuntimeError(f"the Helm worker gave no answer to {request['op']} in time")
        line = self._proc.stdout.readline()
        if not line:
            self._stderr.seek(0)
            raise RuntimeError(f"the Helm worker died; its stderr:\n{self._stderr.read()[-4000:]}")
        answer = json.loads(line)
        if not answer["ok"]:
            raise HelmError(answer["error"])
        return answer["result"]

    def version(self) -> str:
        result: str = self._ask(op="version")
        return result

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()


class HelmLint(_HelmChild):
    """helm-sdkpy's lint: a chart directory as it stands (its own values.yaml)."""

    def lint(self, chart: Path) -> list[tuple[int, str]]:
        """Findings of severity warning or error (2, 3) as (severity, path). helm-sdkpy
        serialises a finding's error as {}, so its text is not available."""
        report = self._ask(op="lint", chart=str(chart))
        return [(m["Severity"], m["Path"]) for m in report["Messages"] if m["Severity"] >= 2]


class Helm(_HelmChild):
    """helm-python-sdk: lint with values (findings with their text), render offline."""

    def __init__(self, sdk_dir: Path, home: Path) -> None:
        super().__init__(sys.executable, _WORKER, sdk_dir, home)

    def lint(self, chart: Path, values: dict[str, Any] | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._ask(
            op="lint", chart=str(chart), values=values, kube_version=KUBE_VERSION
        )
        return result

    def render(self, chart: Path, values: dict[str, Any] | None = None) -> Manifests:
        result = self._ask(
            op="render", chart=str(chart), values=values, name=RELEASE, namespace=NAMESPACE
        )
        return Manifests(result)

    def parse(self, text: str) -> dict[str, Any]:
        """YAML as Helm reads it (numbers, octal, anchors), as a dict."""
        result: dict[str, Any] = self._ask(op="yaml", text=text)
        return result

    def yaml(self, path: Path) -> dict[str, Any]:
        return self.parse(path.read_text())


class Manifests:
    """Rendered chart: parsed documents by template path, and NOTES.txt."""

    def __init__(self, rendered: dict[str, Any]) -> None:
        self.notes = next((v for k, v in rendered.items() if k.endswith("NOTES.txt")), "")
        self.docs = [
            doc for path in sorted(rendered) if not path.endswith(".txt") for doc in rendered[path]
        ]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc.get("kind") == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]


def _python_version(python: str) -> tuple[int, int] | None:
    try:
        done = subprocess.run(
            [python, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None  # e.g. a pyenv shim for a version that is not selected
    major, minor = done.stdout.split()
    return int(major), int(minor)


def _python_for_helm_sdkpy() -> tuple[str, tuple[int, int]] | None:
    """This interpreter if >= 3.12, else the oldest pyenv CPython >= 3.12 (its wheels are
    the likeliest to exist), else python3.12+ on PATH."""
    if sys.version_info >= (3, 12):
        return sys.executable, (sys.version_info.major, sys.version_info.minor)
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    found: list[tuple[tuple[int, int], str]] = []
    for candidate in sorted(pyenv.glob("*/bin/python3")):
        if re.fullmatch(r"3\.\d+\.\d+", candidate.parent.parent.name):  # CPython builds only
            version = _python_version(str(candidate))
            if version is not None and version >= (3, 12):
                found.append((version, str(candidate)))
    for name in ("python3.12", "python3.13", "python3.14"):
        python_on_path = shutil.which(name)
        if python_on_path is not None:
            version = _python_version(python_on_path)
            if version is not None and version >= (3, 12):
                found.append((version, python_on_path))
    if not found:
        return None
    version, python = min(found)
    return python, version


def _install(package: str, version: str, python: str, py: tuple[int, int], deps: bool) -> Path:
    """`package==version` for `python` in a cache directory outside the repository
    (installed once)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = cache / "outbox-relay-tests"
    key = f"{package}-{version}-py{py[0]}{py[1]}-{platform.machine()}"
    target = root / key
    if (target / ".complete").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=root))
    try:
        done = subprocess.run(
            [
                python,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *([] if deps else ["--no-deps"]),
                "--only-binary=:all:",
                "--target",
                str(staging),
                f"{package}=={version}",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip()[-2000:] or done.stdout.strip()[-2000:])
        (staging / ".complete").touch()
        try:
            staging.rename(target)  # atomic: a concurrent run either wins or finds it done
        except OSError:
            if not (target / ".complete").exists():
                raise
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install_sdk() -> Path:
    """helm-python-sdk for this interpreter (renders, and lints with values)."""
    py = (sys.version_info.major, sys.version_info.minor)
    return _install("helm-python-sdk", HELM_PYTHON_SDK_VERSION, sys.executable, py, deps=False)


def _unavailable(reason: str) -> NoReturn:
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (RELAY_TEST_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Helm]:
    try:
        sdk_dir = _install_sdk()
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"helm-python-sdk=={HELM_PYTHON_SDK_VERSION} could not be installed: {exc}")
    engine = Helm(sdk_dir, tmp_path_factory.mktemp("helm-home"))
    try:
        assert engine.version().startswith("v4.")
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="session")
def helm_lint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HelmLint]:
    """helm-sdkpy's lint, in a child process running Python >= 3.12."""
    found = _python_for_helm_sdkpy()
    if found is None:
        _unavailable(
            f"helm-sdkpy=={HELM_SDKPY_VERSION} needs Python >= 3.12; none found (this "
            f"interpreter is {platform.python_version()}; looked in $PYENV_ROOT or ~/.pyenv "
            "and for python3.12+ on PATH)"
        )
    python, py = found
    try:
        sdk_dir = _install("helm-sdkpy", HELM_SDKPY_VERSION, python, py, deps=True)
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"helm-sdkpy=={HELM_SDKPY_VERSION} could not be installed for {python}: {exc}")
    engine = HelmLint(python, _LINT_WORKER, sdk_dir, tmp_path_factory.mktemp("helm-sdkpy-home"))
    try:
        assert engine.version() == f"helm-sdkpy-v{HELM_SDKPY_VERSION}"
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="session")
def app_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example application chart with outbox-relay in charts/ (`helm dependency update`)."""
    app = tmp_path_factory.mktemp("charts") / "app-with-sidecar"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("charts"))
    shutil.copytree(CHART, app / "charts" / "outbox-relay")
    return app


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="session")
def fleet(helm: Helm) -> dict[str, Any]:
    """Values of a full fleet install (ci/fleet-values.yaml)."""
    return helm.yaml(CHART / "ci" / "fleet-values.yaml")


@pytest.fixture(scope="session")
def sidecar(helm: Helm) -> dict[str, Any]:
    """Values of the relay chart alone in sidecar mode (ci/sidecar-values.yaml)."""
    return helm.yaml(CHART / "ci" / "sidecar-values.yaml")


@pytest.fixture(scope="session")
def defaults(helm: Helm) -> dict[str, Any]:
    return helm.yaml(CHART / "values.yaml")


def problems(report: dict[str, Any]) -> list[str]:
    """Lint findings of severity warning or error (2, 3), as `path: text`."""
    return [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]


def relay_container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    for container in pod_spec.get("containers") or []:
        if container["name"] == name:
            return container
    for container in pod_spec.get("initContainers") or []:
        if container["name"] == name:
            return container
    raise AssertionError(f"no container {name!r} in the pod")


# ---------------------------------------------------------------------------------------
# Lint, each mode, with Helm's engine
# ---------------------------------------------------------------------------------------


def with_values(chart: Path, values: dict[str, Any], where: Path) -> Path:
    """A copy of `chart` whose values.yaml is `values` (written as JSON, which is YAML):
    helm-sdkpy lints a chart with its own values.yaml only, so this is how a mode is
    linted as installed."""
    copied = where / chart.name
    shutil.copytree(chart, copied)
    (copied / "values.yaml").write_text(json.dumps(values, indent=2) + "\n")
    return copied


def test_lint_fleet_mode_is_clean(
    helm_lint: HelmLint, helm: Helm, defaults: dict[str, Any], fleet: dict[str, Any], tmp_path: Path
) -> None:
    chart = with_values(CHART, merged(defaults, fleet), tmp_path)
    # helm-sdkpy reports no text; helm-python-sdk's lint says what is wrong.
    assert helm_lint.lint(chart) == [], problems(helm.lint(CHART, fleet))


def test_lint_sidecar_mode_is_clean(
    helm_lint: HelmLint,
    helm: Helm,
    defaults: dict[str, Any],
    sidecar: dict[str, Any],
    tmp_path: Path,
) -> None:
    chart = with_values(CHART, merged(defaults, sidecar), tmp_path)
    assert helm_lint.lint(chart) == [], problems(helm.lint(CHART, sidecar))


@pytest.mark.parametrize("native", [False, True], ids=["classic-sidecar", "native-sidecar"])
def test_lint_example_app_chart_is_clean(
    helm_lint: HelmLint, helm: Helm, app_chart: Path, native: bool, tmp_path: Path
) -> None:
    values = {"outbox-relay": {"sidecar": {"native": native}}}
    chart = with_values(app_chart, merged(helm.yaml(app_chart / "values.yaml"), values), tmp_path)
    assert helm_lint.lint(chart) == [], problems(helm.lint(app_chart, values))


def test_lint_reports_a_schema_violation(
    helm_lint: HelmLint, helm: Helm, defaults: dict[str, Any], fleet: dict[str, Any], tmp_path: Path
) -> None:
    """The lints above would see a bad value: the schema is part of what they check."""
    bad = merged(fleet, {"replicaCount": "three"})
    assert (3, "values.yaml") in helm_lint.lint(with_values(CHART, merged(defaults, bad), tmp_path))
    report = helm.lint(CHART, bad)
    assert any("/replicaCount" in p for p in problems(report)), report


# ---------------------------------------------------------------------------------------
# values.schema.json refuses wrong values (Helm checks it on install, upgrade and lint)
# ---------------------------------------------------------------------------------------

BAD_VALUES = [
    ({"mode": "daemonset"}, "/mode"),
    ({"replicas": 3}, "replicas"),  # misspelt key: unknown keys are refused
    ({"replicaCount": -1}, "/replicaCount"),
    ({"image": {"repository": "outbox-relay:1.0"}}, "/image/repository"),
    ({"image": {"digest": "latest"}}, "/image/digest"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"relay": {"httpPort": 0}}, "/relay/httpPort"),
    ({"relay": {"logFormat": "xml"}}, "/relay/logFormat"),
    ({"relay": {"batchSize": 10000}}, "/relay/batchSize"),
    ({"relay": {"leaseSeconds": 0}}, "/relay/leaseSeconds"),
    ({"relay": {"maxInFlight": "many"}}, "/relay/maxInFlight"),
    ({"relay": {"extraEnv": {"DATABASE_URL": "x"}}}, "invalid propertyName 'DATABASE_URL'"),
    ({"relay": {"extraEnv": {"RELAY_BATCH_SIZE": 5}}}, "/relay/extraEnv/RELAY_BATCH_SIZE"),
    ({"database": {"url": "mysql://db/app"}}, "/database/url"),
    ({"database": {"existingSecret": "Not_A_Name"}}, "/database/existingSecret"),
    (
        {"providers": {"Stripe-EU": {"apiKey": {"existingSecret": "k"}}}},
        "invalid propertyName 'Stripe-EU'",
    ),
    ({"providers": {"stripe": {"kind": "paypal"}}}, "/providers/stripe/kind"),
    ({"providers": {"stripe": {"timeoutMs": "10s"}}}, "/providers/stripe/timeoutMs"),
    ({"providers": {"stripe": {"baseUrl": "api.stripe.com"}}}, "/providers/stripe/baseUrl"),
    ({"providers": {"stripe": {"apiKey": {"file": "/k"}}}}, "/providers/stripe/apiKey"),
    ({"amqp": {"url": "http://rabbit"}}, "/amqp/url"),
    ({"secretFileMode": 511}, "/secretFileMode"),
    (
        {"containerSecurityContext": {"runAsNonRoot": False}},
        "/containerSecurityContext/runAsNonRoot",
    ),
    ({"containerSecurityContext": {"runAsUser": 0}}, "/containerSecurityContext/runAsUser"),
    (
        {"containerSecurityContext": {"readOnlyRootFilesystem": False}},
        "/containerSecurityContext/readOnlyRootFilesystem",
    ),
    (
        {"containerSecurityContext": {"allowPrivilegeEscalation": True}},
        "/containerSecurityContext/allowPrivilegeEscalation",
    ),
    ({"containerSecurityContext": {"privileged": True}}, "/containerSecurityContext/privileged"),
    (
        {"containerSecurityContext": {"capabilities": {"drop": ["NET_RAW"]}}},
        "/containerSecurityContext/capabilities/drop",
    ),
    (
        {"containerSecurityContext": {"capabilities": {"add": ["NET_ADMIN"]}}},
        "/containerSecurityContext/capabilities/add",
    ),
    (
        {"containerSecurityContext": {"seccompProfile": {"type": "Unconfined"}}},
        "/containerSecurityContext/seccompProfile/type",
    ),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    ({"podSecurityContext": {"runAsUser": 0}}, "/podSecurityContext/runAsUser"),
    (
        {"podSecurityContext": {"seccompProfile": {"type": "Unconfined"}}},
        "/podSecurityContext/seccompProfile/type",
    ),
    # Localhost without a profile: the kubelet would refuse every pod.
    (
        {"podSecurityContext": {"seccompProfile": {"type": "Localhost"}}},
        "at '/podSecurityContext/seccompProfile': missing property 'localhostProfile'",
    ),
    (
        {"containerSecurityContext": {"seccompProfile": {"type": "Localhost"}}},
        "at '/containerSecurityContext/seccompProfile': missing property 'localhostProfile'",
    ),
    (
        {"containerSecurityContext": {"seccompProfile": {"localhostProfile": "relay.json"}}},
        "/containerSecurityContext/seccompProfile",
    ),
    # Helm drops a null value, so the schema sees fsGroup missing: the 0440 secret files
    # would be unreadable by the relay.
    (
        {"podSecurityContext": {"fsGroup": None}},
        "at '/podSecurityContext': missing property 'fsGroup'",
    ),
    ({"podSecurityContext": {"fsGroup": 0}}, "/podSecurityContext/fsGroup"),
    ({"probes": {"readiness": {"enabled": "no"}}}, "/probes/readiness/enabled"),
    ({"metrics": {"grafanaDashboard": {"enabled": "no"}}}, "/metrics/grafanaDashboard/enabled"),
    ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
    ({"terminationGracePeriodSeconds": 0}, "/terminationGracePeriodSeconds"),
    ({"probes": {"liveness": {"periodSeconds": 0}}}, "/probes/liveness/periodSeconds"),
    ({"podDisruptionBudget": {"maxUnavailable": "50"}}, "/podDisruptionBudget/maxUnavailable"),
    ({"sidecar": {"containerName": "Relay_1"}}, "/sidecar/containerName"),
    (
        {"metrics": {"serviceMonitor": {"interval": "30 seconds"}}},
        "/metrics/serviceMonitor/interval",
    ),
    (
        {"metrics": {"grafanaDashboard": {"labels": {"grafana_dashboard": 1}}}},
        "/metrics/grafanaDashboard/labels",
    ),
]


@pytest.mark.parametrize(
    ("bad", "pointer"),
    BAD_VALUES,
    ids=[re.sub(r"[^\w/-]+", "_", p).strip("/_") for _, p in BAD_VALUES],
)
def test_schema_refuses_bad_value(
    helm: Helm, fleet: dict[str, Any], bad: dict[str, Any], pointer: str
) -> None:
    values = merged(fleet, bad)
    found = [p for p in problems(helm.lint(CHART, values)) if p.startswith("values.yaml:")]
    assert found, f"the schema accepted {bad}"
    assert any(pointer in p for p in found), found
    with pytest.raises(HelmError, match="values don't meet the specifications of the schema"):
        helm.render(CHART, values)


def test_schema_is_self_contained() -> None:
    """Helm refuses remote $ref (and air-gapped clusters cannot fetch them)."""
    text = (CHART / "values.schema.json").read_text()
    json.loads(text)
    assert not re.search(r'"\$ref"\s*:\s*"(?!#)', text)


def test_schema_accepts_the_chart_defaults(helm: Helm, defaults: dict[str, Any]) -> None:
    report = helm.lint(CHART, None)
    assert [p for p in problems(report) if p.startswith("values.yaml")] == []
    assert defaults["mode"] == "fleet"


# ---------------------------------------------------------------------------------------
# Refusals the schema cannot express: the templates `fail` with a message naming the value
# ---------------------------------------------------------------------------------------

REFUSED = [
    # (id, values on top of ci/fleet-values.yaml, or of nothing when the id says "bare", message)
    ("bare-no-database", {}, "the database URL is required"),
    (
        "bare-no-provider",
        {"database": {"existingSecret": "db"}},
        "at least one provider is required",
    ),
    (
        "two-database-sources",
        {"database": {"url": "postgresql://db/app"}},
        "set only one of database.existingSecret and database.url",
    ),
    (
        "provider-without-key",
        {"providers": {"adyen": {"apiKey": {"existingSecret": ""}}}},
        "providers.adyen needs an API key",
    ),
    (
        "two-key-sources",
        {"providers": {"stripe": {"apiKey": {"value": "sk_live_x"}}}},
        "set only one of providers.stripe.apiKey.existingSecret and providers.stripe.apiKey.value",
    ),
    (
        "timeout-outlasts-lease",
        {"providers": {"stripe": {"timeoutMs": 60000}}},
        "providers.stripe.timeoutMs (60000) must stay below relay.leaseSeconds (60 s)",
    ),
    (
        "grace-not-above-drain",
        {"terminationGracePeriodSeconds": 30},
        "terminationGracePeriodSeconds (30) must be at least relay.shutdownGraceSeconds (30)"
        " + 15 = 45",
    ),
    (
        # Above the grace but inside the margin the message asks for: refused too.
        "grace-inside-the-margin",
        {"terminationGracePeriodSeconds": 44},
        "terminationGracePeriodSeconds (44) must be at least relay.shutdownGraceSeconds (30)"
        " + 15 = 45",
    ),
    (
        "drain-longer-than-grace",
        {"relay": {"shutdownGraceSeconds": 50}},
        "terminationGracePeriodSeconds (45) must be at least relay.shutdownGraceSeconds (50)"
        " + 15 = 65",
    ),
    (
        "extra-env-overrides-the-grace",
        {"relay": {"extraEnv": {"RELAY_SHUTDOWN_GRACE_SECONDS": "300"}}},
        "relay.extraEnv.RELAY_SHUTDOWN_GRACE_SECONDS would override a variable the chart sets"
        " (and bypass its checks); set relay.shutdownGraceSeconds instead",
    ),
    (
        "extra-env-overrides-the-port",
        {"relay": {"extraEnv": {"RELAY_HTTP_PORT": "8080"}}},
        "relay.extraEnv.RELAY_HTTP_PORT would override a variable the chart sets"
        " (and bypass its checks); set relay.httpPort instead",
    ),
    (
        "extra-env-overrides-the-database-file",
        {"relay": {"extraEnv": {"RELAY_DATABASE_URL_FILE": "/tmp/url"}}},
        "relay.extraEnv.RELAY_DATABASE_URL_FILE would override a variable the chart sets"
        " (and bypass its checks); set database.existingSecret or database.url",
    ),
    (
        "extra-env-sets-a-provider-field-the-chart-manages",
        {"relay": {"extraEnv": {"RELAY_PROVIDERS__STRIPE__TIMEOUT_MS": "90000"}}},
        "relay.extraEnv.RELAY_PROVIDERS__STRIPE__TIMEOUT_MS configures a provider lane, which"
        " the chart builds from providers.<name> (its API key mounted as a file);"
        " set providers.stripe.timeoutMs instead",
    ),
    (
        "extra-env-sets-another-provider-field",
        {"relay": {"extraEnv": {"RELAY_PROVIDERS__STRIPE__RATE_LIMIT_BURST": "5"}}},
        "set providers.stripe.extraEnv.RATE_LIMIT_BURST instead",
    ),
    (
        "provider-extra-env-overrides-the-timeout",
        {"providers": {"stripe": {"extraEnv": {"TIMEOUT_MS": "90000"}}}},
        "providers.stripe.extraEnv.TIMEOUT_MS would override a variable the chart sets"
        " (and bypass its checks); set providers.stripe.timeoutMs instead",
    ),
    (
        "provider-extra-env-overrides-the-key-file",
        {"providers": {"stripe": {"extraEnv": {"API_KEY_FILE": "/k"}}}},
        "set providers.stripe.apiKey.existingSecret or apiKey.value (mounted as a file) instead",
    ),
    (
        # relay/infra/config.py refuses RELAY_PUBLISH_TIMEOUT_SECONDS (15) >= RELAY_LEASE_SECONDS.
        "publish-timeout-outlasts-lease",
        {"relay": {"leaseSeconds": 12}},
        "with amqp.enabled, relay.leaseSeconds (12) must be above the events publish timeout"
        " (15 s, RELAY_PUBLISH_TIMEOUT_SECONDS), or the relay refuses to start",
    ),
    (
        "raised-publish-timeout-outlasts-lease",
        {"relay": {"extraEnv": {"RELAY_PUBLISH_TIMEOUT_SECONDS": "60"}}},
        "relay.leaseSeconds (60) must be above the events publish timeout (60 s",
    ),
    (
        "amqp-without-url",
        {"amqp": {"enabled": True, "existingSecret": ""}},
        "amqp.enabled needs amqp.existingSecret or amqp.url",
    ),
    (
        "pdb-both-bounds",
        {"podDisruptionBudget": {"minAvailable": 1}},
        "set exactly one of podDisruptionBudget.maxUnavailable and podDisruptionBudget.minAvailable",
    ),
    (
        "sidecar-podmonitor-without-selector",
        {"mode": "sidecar", "metrics": {"podMonitor": {"enabled": True}}},
        "in sidecar mode metrics.podMonitor.selector must name the application's pod labels",
    ),
    (
        "webhooks-without-endpoint",
        {"webhooks": {"enabled": True}},
        "webhooks.enabled needs at least one entry under webhooks.endpoints",
    ),
    (
        "webhooks-ingress-without-host",
        {
            "webhooks": {
                "enabled": True,
                "endpoints": {"stripe": {"existingSecret": "s"}},
                "ingress": {"enabled": True},
            }
        },
        "webhooks.ingress.enabled needs webhooks.ingress.host",
    ),
]


@pytest.mark.parametrize(("case", "change", "message"), REFUSED, ids=[r[0] for r in REFUSED])
def test_install_refuses_inconsistent_values(
    helm: Helm, fleet: dict[str, Any], case: str, change: dict[str, Any], message: str
) -> None:
    values = change if case.startswith("bare-") else merged(fleet, change)
    with pytest.raises(HelmError, match=re.escape(message)):
        helm.render(CHART, values)


def test_extra_env_cannot_override_any_variable_the_chart_sets(
    helm: Helm, fleet: dict[str, Any], fleet_manifests: Manifests
) -> None:
    """Every RELAY_* the chart renders itself, found in its own output, is refused."""
    env = fleet_manifests.one("ConfigMap", f"{RELEASE}-outbox-relay")["data"]
    extra = set(fleet["relay"]["extraEnv"]) | {
        f"RELAY_PROVIDERS__{name.upper()}__{key}"
        for name, provider in fleet["providers"].items()
        for key in provider.get("extraEnv", {})
    }
    container = relay_container(
        fleet_manifests.one("Deployment")["spec"]["template"]["spec"], "relay"
    )
    managed = (set(env) - extra) | {item["name"] for item in container["env"]}
    assert {"RELAY_SHUTDOWN_GRACE_SECONDS", "RELAY_PROVIDERS__STRIPE__TIMEOUT_MS"} <= managed
    for key in sorted(managed):
        values = merged(fleet, {"relay": {"extraEnv": {key: "1"}}})
        with pytest.raises(HelmError, match=rf"relay\.extraEnv\.{key} .*; set \S"):
            helm.render(CHART, values)
    prefix = "RELAY_PROVIDERS__STRIPE__"
    for key in sorted(k.removeprefix(prefix) for k in managed if k.startswith(prefix)):
        values = merged(fleet, {"providers": {"stripe": {"extraEnv": {key: "1"}}}})
        with pytest.raises(HelmError, match=rf"providers\.stripe\.extraEnv\.{key} .*; set \S"):
            helm.render(CHART, values)


ACCEPTED = [
    # (id, values on top of ci/fleet-values.yaml): the limits of the refusals above
    ("grace-exactly-drain-plus-margin", {"terminationGracePeriodSeconds": 45}),
    (
        "short-lease-with-a-shorter-publish-timeout",
        {"relay": {"leaseSeconds": 12, "extraEnv": {"RELAY_PUBLISH_TIMEOUT_SECONDS": "5"}}},
    ),
    ("short-lease-without-amqp", {"relay": {"leaseSeconds": 12}, "amqp": {"enabled": False}}),
    (
        "seccomp-localhost-with-a-profile",
        {
            "podSecurityContext": {
                "seccompProfile": {"type": "Localhost", "localhostProfile": "profiles/relay.json"}
            }
        },
    ),
    (
        "no-fs-group-with-world-readable-files",
        {"podSecurityContext": {"fsGroup": None}, "secretFileMode": 0o444},
    ),
    ("unmanaged-extra-env", {"relay": {"extraEnv": {"RELAY_HTTP_HOST": "127.0.0.1"}}}),
]


@pytest.mark.parametrize(("case", "change"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_install_accepts_values_at_the_limits(
    helm: Helm, fleet: dict[str, Any], case: str, change: dict[str, Any]
) -> None:
    values = merged(fleet, change)
    assert [p for p in problems(helm.lint(CHART, values)) if p.startswith("values.yaml")] == []
    assert helm.render(CHART, values).one("Deployment")


# ---------------------------------------------------------------------------------------
# Fleet mode: what Kubernetes receives
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fleet_manifests(helm: Helm, fleet: dict[str, Any]) -> Manifests:
    return helm.render(CHART, fleet)


def test_fleet_deployment_runs_relays_as_configured(
    fleet_manifests: Manifests, fleet: dict[str, Any]
) -> None:
    deployment = fleet_manifests.one("Deployment")
    assert deployment["spec"]["replicas"] == fleet["replicaCount"] == 3
    pod = deployment["spec"]["template"]["spec"]
    container = relay_container(pod, "relay")
    assert container["image"] == "outbox-relay:0.1.0"  # appVersion when no tag is given
    assert container["args"] == ["run"]
    assert {
        "name": "RELAY_INSTANCE_NAME",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    } in container["env"]
    configmap = fleet_manifests.one("ConfigMap", f"{RELEASE}-outbox-relay")
    assert container["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
    assert pod["automountServiceAccountToken"] is False
    assert fleet_manifests.one("ServiceAccount")["automountServiceAccountToken"] is False


def test_fleet_pod_security(fleet_manifests: Manifests) -> None:
    pod = fleet_manifests.one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = relay_container(pod, "relay")["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


def test_fleet_probes_and_grace(fleet_manifests: Manifests) -> None:
    pod = fleet_manifests.one("Deployment")["spec"]["template"]["spec"]
    container = relay_container(pod, "relay")
    env = fleet_manifests.one("ConfigMap", f"{RELEASE}-outbox-relay")["data"]
    port = {"name": "relay-http", "containerPort": int(env["RELAY_HTTP_PORT"]), "protocol": "TCP"}
    assert container["ports"] == [port]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "relay-http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "relay-http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "relay-http"}
    assert pod["terminationGracePeriodSeconds"] >= float(env["RELAY_SHUTDOWN_GRACE_SECONDS"]) + 15


def test_configmap_maps_values_to_relay_variables(fleet_manifests: Manifests) -> None:
    env = fleet_manifests.one("ConfigMap", f"{RELEASE}-outbox-relay")["data"]
    mount = "/var/run/secrets/outbox-relay"
    assert env == {
        "RELAY_LOG_FORMAT": "json",
        "RELAY_HTTP_PORT": "9108",
        "RELAY_BATCH_SIZE": "100",
        "RELAY_MAX_IN_FLIGHT": "256",
        "RELAY_LEASE_SECONDS": "60",
        "RELAY_MAX_ATTEMPTS": "8",
        "RELAY_SHUTDOWN_GRACE_SECONDS": "30",
        "RELAY_DB_POOL_SIZE": "4",
        "RELAY_DATABASE_URL_FILE": f"{mount}/database/url",
        "RELAY_AMQP_URL_FILE": f"{mount}/amqp/url",
        "RELAY_PROVIDERS__STRIPE__KIND": "stripe",
        "RELAY_PROVIDERS__STRIPE__BASE_URL": "https://api.stripe.com",
        "RELAY_PROVIDERS__STRIPE__API_KEY_FILE": f"{mount}/providers/stripe/api-key",
        "RELAY_PROVIDERS__STRIPE__CONCURRENCY": "32",
        "RELAY_PROVIDERS__STRIPE__TIMEOUT_MS": "10000",
        "RELAY_PROVIDERS__STRIPE__CONNECT_TIMEOUT_MS": "3000",
        "RELAY_PROVIDERS__STRIPE__RATE_LIMIT_PER_SECOND": "50",
        "RELAY_POLL_MAX_INTERVAL_SECONDS": "10",
    }


def test_large_numbers_are_not_printed_in_exponent_form(helm: Helm, fleet: dict[str, Any]) -> None:
    """Helm reads YAML numbers as floats; 1500000 must not reach the relay as 1.5e+06."""
    values = merged(
        fleet,
        {
            "relay": {
                "maxInFlight": 1500000,
                "leaseSeconds": 2.5,
                "extraEnv": {"RELAY_PUBLISH_TIMEOUT_SECONDS": "2"},
            },
            "providers": {"stripe": {"timeoutMs": 2000, "concurrency": 1000000}},
        },
    )
    env = helm.render(CHART, values).one("ConfigMap", f"{RELEASE}-outbox-relay")["data"]
    assert env["RELAY_MAX_IN_FLIGHT"] == "1500000"
    assert env["RELAY_PROVIDERS__STRIPE__CONCURRENCY"] == "1000000"
    assert env["RELAY_LEASE_SECONDS"] == "2.5"


def _file_paths(
    manifests: Manifests, pod: dict[str, Any], container: dict[str, Any]
) -> dict[str, tuple[str, str]]:
    """Each mounted secret file: path in the container -> (Secret name, key)."""
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    files = {}
    for volume in pod["volumes"]:
        if "projected" not in volume:
            continue
        mount = mounts[volume["name"]]
        assert mount["readOnly"] is True
        for source in volume["projected"]["sources"]:
            for item in source["secret"]["items"]:
                files[f"{mount['mountPath']}/{item['path']}"] = (
                    source["secret"]["name"],
                    item["key"],
                )
    return files


def test_secrets_are_mounted_files_that_the_relay_reads(fleet_manifests: Manifests) -> None:
    """Every *_FILE variable points at a file mounted from the Secret the values name."""
    pod = fleet_manifests.one("Deployment")["spec"]["template"]["spec"]
    files = _file_paths(fleet_manifests, pod, relay_container(pod, "relay"))
    env = fleet_manifests.one("ConfigMap", f"{RELEASE}-outbox-relay")["data"]
    wanted = {name: value for name, value in env.items() if name.endswith("_FILE")}
    assert {files[path] for path in wanted.values()} == {
        ("outbox-relay-database", "url"),
        ("outbox-relay-amqp", "url"),
        ("stripe-api-key", "api-key"),
    }
    assert set(files) == set(wanted.values())
    assert not fleet_manifests.all("Secret")  # all secrets exist already: none created


def test_inline_secret_values_create_a_secret(helm: Helm, sidecar: dict[str, Any]) -> None:
    manifests = helm.render(CHART, sidecar)
    (secret,) = [
        s
        for s in manifests.all("Secret")
        if "helm.sh/hook" not in s["metadata"].get("annotations", {})
    ]
    assert sorted(secret["data"]) == ["amqp-url", "database-url", "provider-stripe-api-key"]
    assert "sk_test_ci_only" not in json.dumps(manifests.docs)  # base64, never in clear text


def test_migrations_run_as_a_pre_install_hook_job_with_the_same_image(
    fleet_manifests: Manifests,
) -> None:
    job = fleet_manifests.one("Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    relay = relay_container(fleet_manifests.one("Deployment")["spec"]["template"]["spec"], "relay")
    assert container["image"] == relay["image"]
    assert container["args"] == ["migrate"]
    assert container["securityContext"] == relay["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["restartPolicy"] == "Never"
    files = _file_paths(fleet_manifests, pod, container)
    url_file = next(e["value"] for e in container["env"] if e["name"] == "RELAY_DATABASE_URL_FILE")
    assert files[url_file] == ("outbox-relay-database", "url")


def test_migration_hook_gets_its_own_copy_of_an_inline_url(
    helm: Helm, sidecar: dict[str, Any]
) -> None:
    """A pre-install hook runs before the release's Secret exists: it must not mount it."""
    manifests = helm.render(CHART, sidecar)
    job = manifests.one("Job")
    hook_secret = manifests.one("Secret", f"{RELEASE}-outbox-relay-migrations")
    hook_weight = int(hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert hook_secret["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert hook_weight < int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
    pod = job["spec"]["template"]["spec"]
    files = _file_paths(manifests, pod, pod["containers"][0])
    assert set(files.values()) == {(hook_secret["metadata"]["name"], "database-url")}


def test_declared_providers_are_applied_after_the_migrations(
    helm: Helm, fleet: dict[str, Any]
) -> None:
    """sql/0050: the registry from values, by the migrations Job once migrate has run."""
    declared = [
        {"name": "stripe", "kind": "stripe"},
        {
            "name": "adyen_eu",
            "kind": "adyen",
            "currencies": ["EUR"],
            "limits": {"EUR": {"min": 100}},
        },
    ]
    manifests = helm.render(CHART, merged(fleet, {"providerRegistry": declared}))
    pod = manifests.one("Job")["spec"]["template"]["spec"]
    (migrate,) = pod["initContainers"]
    (apply,) = pod["containers"]
    assert migrate["args"] == ["migrate"]
    assert apply["image"] == migrate["image"]
    assert apply["args"][:2] == ["providers", "apply"]
    assert json.loads(apply["args"][2]) == declared
    assert apply["args"][3:5] == ["--operator", f"helm:{RELEASE}"]
    assert apply["args"][5] == "--reason"
    assert apply["env"] == [e for e in migrate["env"] if e["name"] == "RELAY_DATABASE_URL_FILE"]
    assert _file_paths(manifests, pod, apply) == _file_paths(manifests, pod, migrate)


def test_declared_providers_carry_their_pinned_api_version(
    helm: Helm, fleet: dict[str, Any]
) -> None:
    """sql/0070: an API version canary as docs/routing.md writes it in values, two instances
    of one kind each pinned to its own version: the registry's pins reach `providers apply`
    as given, the lane's version the relays' environment; the schema refuses a version that
    is not a plain token, naming the field."""
    declared = [
        {"name": "stripe", "kind": "stripe", "apiVersion": "2026-10-28.endive"},
        {"name": "stripe_next", "kind": "stripe", "apiVersion": "2027-01-15.future"},
    ]
    lane = {
        "kind": "stripe",
        "apiKey": {"existingSecret": "stripe-api-key"},
        "extraEnv": {"API_VERSION": "2027-01-15.future", "ALLOW_UNTESTED_API_VERSION": "true"},
    }
    values = merged(fleet, {"providers": {"stripe_next": lane}, "providerRegistry": declared})
    manifests = helm.render(CHART, values)
    (apply,) = manifests.one("Job")["spec"]["template"]["spec"]["containers"]
    assert json.loads(apply["args"][2]) == declared
    env = manifests.one("ConfigMap", f"{RELEASE}-outbox-relay")["data"]
    assert env["RELAY_PROVIDERS__STRIPE_NEXT__API_VERSION"] == "2027-01-15.future"
    bad = [{"name": "stripe", "kind": "stripe", "apiVersion": "2026-10-28 endive"}]
    with pytest.raises(Exception, match="apiVersion"):
        helm.render(CHART, merged(fleet, {"providerRegistry": bad}))


def test_schema_refuses_a_provider_without_kind(helm: Helm, fleet: dict[str, Any]) -> None:
    with pytest.raises(Exception, match="kind"):
        helm.render(CHART, merged(fleet, {"providerRegistry": [{"name": "stripe"}]}))


def test_migrations_can_be_turned_off(helm: Helm, fleet: dict[str, Any]) -> None:
    manifests = helm.render(CHART, merged(fleet, {"migrations": {"enabled": False}}))
    assert not manifests.all("Job")
    assert "migrations.enabled=false" in manifests.notes


def test_pod_disruption_budget_and_service_select_only_relay_pods(
    fleet_manifests: Manifests,
) -> None:
    deployment = fleet_manifests.one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    job_labels = fleet_manifests.one("Job")["spec"]["template"]["metadata"]["labels"]
    pdb = fleet_manifests.one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        pdb["spec"]["selector"]["matchLabels"],
        fleet_manifests.one("Service")["spec"]["selector"],
        fleet_manifests.one("NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()
        assert not selector.items() <= job_labels.items()  # the migration pod is not a relay


def test_network_policy_admits_only_the_http_port(fleet_manifests: Manifests) -> None:
    policy = fleet_manifests.one("NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"port": "relay-http", "protocol": "TCP"}]
    egress_ports = [p["port"] for rule in policy["egress"] for p in rule.get("ports", [])]
    assert egress_ports == [53, 53, 5432, 443]


def test_optional_objects_are_off_by_default(helm: Helm, fleet: dict[str, Any]) -> None:
    minimal = {k: fleet[k] for k in ("database", "providers")}
    manifests = helm.render(CHART, minimal)
    kinds = sorted(doc["kind"] for doc in manifests.docs)
    assert kinds == [
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "Job",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]  # the second ConfigMap is the Grafana dashboard


def test_service_monitor_scrapes_the_relays(fleet_manifests: Manifests) -> None:
    monitor = fleet_manifests.one("ServiceMonitor")
    service = fleet_manifests.one("Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_prometheus_rule_and_dashboard_carry_the_canonical_files(
    helm: Helm, fleet_manifests: Manifests
) -> None:
    rule = fleet_manifests.one("PrometheusRule")
    assert rule["spec"] == helm.yaml(CHART / "files" / "prometheus" / "alerts.yaml")
    dashboard = fleet_manifests.one("ConfigMap", f"{RELEASE}-outbox-relay-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "files" / "grafana" / "outbox-relay-dashboard.json").read_text())
    assert json.loads(dashboard["data"]["outbox-relay-dashboard.json"]) == shipped


def test_notes_tell_how_to_reach_the_fleet(fleet_manifests: Manifests) -> None:
    assert f"port-forward svc/{RELEASE}-outbox-relay 9108" in fleet_manifests.notes
    assert f"logs job/{RELEASE}-outbox-relay-migrations" in fleet_manifests.notes


@pytest.mark.parametrize("mode", ["fleet", "sidecar"])
def test_notes_mention_the_migration_job_only_when_there_is_one(
    helm: Helm, fleet: dict[str, Any], sidecar: dict[str, Any], mode: str
) -> None:
    base = fleet if mode == "fleet" else sidecar
    with_job = helm.render(CHART, base)
    without = helm.render(CHART, merged(base, {"migrations": {"enabled": False}}))
    assert with_job.all("Job") and not without.all("Job")
    assert "migration Job" in with_job.notes or "the Job" in with_job.notes
    assert "Job" not in without.notes
    assert "migrations.enabled=false" in without.notes


@pytest.mark.parametrize(
    ("mode", "setting", "expected"),
    [
        ("fleet", None, True),
        ("fleet", False, False),
        ("sidecar", None, False),
        ("sidecar", True, True),
    ],
    ids=["fleet-default", "fleet-off", "sidecar-default", "sidecar-on"],
)
def test_readiness_probe_is_on_in_fleet_mode_and_off_in_sidecar_mode_by_default(
    helm: Helm,
    app_chart: Path,
    fleet: dict[str, Any],
    mode: str,
    setting: bool | None,
    expected: bool,
) -> None:
    probes = {} if setting is None else {"probes": {"readiness": {"enabled": setting}}}
    if mode == "fleet":
        pod = helm.render(CHART, merged(fleet, probes)).one("Deployment")["spec"]["template"][
            "spec"
        ]
        container = relay_container(pod, "relay")
    else:
        manifests = helm.render(app_chart, {"outbox-relay": probes})
        pod = manifests.one("Deployment")["spec"]["template"]["spec"]
        container = relay_container(pod, "outbox-relay")
        if not expected:
            assert (
                "no readinessProbe"
                in helm.render(CHART, merged(_sidecar_alone(fleet), probes)).notes
            )
    assert ("readinessProbe" in container) is expected
    if expected:
        assert container["readinessProbe"] == {
            "httpGet": {"path": "/readyz", "port": "relay-http"},
            "initialDelaySeconds": 0,
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 2,
        }  # the probe's settings, without the chart's `enabled` switch
    assert "livenessProbe" in container and "startupProbe" in container


def _sidecar_alone(fleet: dict[str, Any]) -> dict[str, Any]:
    """The fleet's values in sidecar mode, with no optional object that needs more."""
    return {"mode": "sidecar", "database": fleet["database"], "providers": fleet["providers"]}


@pytest.mark.parametrize(
    ("mode", "setting", "expected"),
    [
        ("fleet", None, True),
        ("sidecar", None, False),
        ("sidecar", True, True),
        ("fleet", False, False),
    ],
    ids=["fleet-default", "sidecar-default", "sidecar-on", "fleet-off"],
)
def test_grafana_dashboard_is_on_by_default_only_in_fleet_mode(
    helm: Helm, fleet: dict[str, Any], mode: str, setting: bool | None, expected: bool
) -> None:
    """Every application chart that includes the relay would otherwise ship the same
    dashboard uid."""
    values = {k: fleet[k] for k in ("database", "providers")} | {"mode": mode}
    if setting is not None:
        values["metrics"] = {"grafanaDashboard": {"enabled": setting}}
    names = [d["metadata"]["name"] for d in helm.render(CHART, values).all("ConfigMap")]
    assert (f"{RELEASE}-outbox-relay-dashboard" in names) is expected


# ---------------------------------------------------------------------------------------
# Sidecar mode: the relay chart alone and the example application chart
# ---------------------------------------------------------------------------------------


def test_sidecar_mode_creates_no_relay_pods(helm: Helm, sidecar: dict[str, Any]) -> None:
    manifests = helm.render(CHART, sidecar)
    kinds = {doc["kind"] for doc in manifests.docs}
    assert not kinds & {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ServiceAccount",
        "NetworkPolicy",
    }
    assert {"ConfigMap", "Secret", "Job", "PodMonitor", "PrometheusRule"} <= kinds
    monitor = manifests.one("PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "app-with-sidecar"
    }
    assert "outbox-relay.sidecar.containers" in manifests.notes


@pytest.mark.parametrize("native", [False, True], ids=["classic-sidecar", "native-sidecar"])
def test_example_app_runs_the_relay_in_its_pods(
    helm: Helm, app_chart: Path, fleet_manifests: Manifests, native: bool
) -> None:
    manifests = helm.render(app_chart, {"outbox-relay": {"sidecar": {"native": native}}})
    (deployment,) = manifests.all("Deployment")  # the application's; the relay adds none
    assert deployment["metadata"]["name"] == f"{RELEASE}-app-with-sidecar"
    pod = deployment["spec"]["template"]["spec"]
    relay = relay_container(pod, "outbox-relay")
    containers = [c["name"] for c in pod["containers"]]
    init_containers = [c["name"] for c in pod.get("initContainers") or []]
    if native:
        assert (containers, init_containers) == (["app"], ["outbox-relay"])
        assert relay["restartPolicy"] == "Always"
    else:
        assert (containers, init_containers) == (["app", "outbox-relay"], [])
        assert "restartPolicy" not in relay

    # The same container as the fleet's: security, probes, configuration cannot drift.
    fleet_relay = relay_container(
        fleet_manifests.one("Deployment")["spec"]["template"]["spec"], "relay"
    )
    # ... except readiness, off by default here: a relay that is not ready (database away,
    # schema upgrade, draining) must not take the application's pods out of its Services.
    assert "readinessProbe" not in relay
    for field in (
        "securityContext",
        "livenessProbe",
        "startupProbe",
        "ports",
        "env",
        "envFrom",
        "volumeMounts",
        "args",
    ):
        assert relay[field] == fleet_relay[field], field
    assert relay["image"] == "registry.example.com/payments/outbox-relay:0.1.0"

    configmap = manifests.one("ConfigMap", f"{RELEASE}-outbox-relay")
    assert relay["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
    assert configmap["data"]["RELAY_DB_POOL_SIZE"] == "3"
    files = _file_paths(manifests, pod, relay)
    assert set(files.values()) == {("app-database", "url"), ("stripe-api-key", "api-key")}
    assert pod["securityContext"]["fsGroup"] == 10001  # lets the relay read its 0440 files
    grace = float(configmap["data"]["RELAY_SHUTDOWN_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] == grace + 15  # the margin the chart requires
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/outbox-relay-config" in annotations
    assert (
        manifests.one("Job")["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    )


def test_application_install_refuses_a_weakened_relay(helm: Helm, app_chart: Path) -> None:
    """The relay's schema applies to its section of the application's values too."""
    values = {"outbox-relay": {"containerSecurityContext": {"readOnlyRootFilesystem": False}}}
    with pytest.raises(HelmError, match="readOnlyRootFilesystem"):
        helm.render(app_chart, values)


def test_sidecar_template_refuses_a_relay_left_in_fleet_mode(helm: Helm, app_chart: Path) -> None:
    with pytest.raises(HelmError, match=r"set outbox-relay.mode=sidecar"):
        helm.render(app_chart, {"outbox-relay": {"mode": "fleet"}})


def test_sidecar_templates_follow_a_dependency_alias(helm: Helm, app_chart: Path) -> None:
    """With `alias: relay`, the templates take (dict "root" $ "chart" "relay")."""
    aliased = app_chart.parent / "app-with-alias"
    shutil.copytree(app_chart, aliased)
    chart_yaml = aliased / "Chart.yaml"
    chart_yaml.write_text(
        chart_yaml.read_text().replace(
            "repository: file://", "alias: relay\n    repository: file://"
        )
    )
    values = aliased / "values.yaml"
    values.write_text(values.read_text().replace("\noutbox-relay:\n", "\nrelay:\n"))
    deployment = aliased / "templates" / "deployment.yaml"
    deployment.write_text(
        re.sub(
            r'(include "outbox-relay\.sidecar[\w.]*") \.',
            r'\1 (dict "root" $ "chart" "relay")',
            deployment.read_text(),
        )
    )
    manifests = helm.render(aliased, {"relay": {"sidecar": {"native": True}}})
    pod = manifests.one("Deployment")["spec"]["template"]["spec"]
    relay = relay_container(pod, "outbox-relay")
    assert relay["restartPolicy"] == "Always"
    configmap = manifests.one("ConfigMap", f"{RELEASE}-relay")
    assert relay["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]


def test_sidecar_config_change_rolls_the_application_pods(helm: Helm, app_chart: Path) -> None:
    def checksum(values: dict[str, Any]) -> str:
        deployment = helm.render(app_chart, values).one("Deployment")
        value: str = deployment["spec"]["template"]["metadata"]["annotations"][
            "checksum/outbox-relay-config"
        ]
        return value

    before = checksum({})
    assert checksum({"outbox-relay": {"relay": {"batchSize": 50}}}) != before
    assert checksum({}) == before


# ---------------------------------------------------------------------------------------
# Files read as text: documentation, monitoring, Dockerfile
# ---------------------------------------------------------------------------------------


def _doc_yaml_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    text = readme.partition("\n## Deploying on Kubernetes\n")[2].partition("\n## ")[0]
    return re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)


def test_documented_fleet_values_install(helm: Helm) -> None:
    """The copy-paste values of the README's Kubernetes section render as documented."""
    (block,) = [b for b in _doc_yaml_blocks() if b.startswith("mode: fleet")]
    manifests = helm.render(CHART, helm.parse(block))
    assert manifests.one("Deployment")["spec"]["replicas"] == 3
    assert {"ServiceMonitor", "PrometheusRule"} <= {d["kind"] for d in manifests.docs}


def test_documented_sidecar_values_install(helm: Helm, app_chart: Path) -> None:
    (block,) = [b for b in _doc_yaml_blocks() if b.startswith("outbox-relay:\n  mode: sidecar")]
    pod = helm.render(app_chart, helm.parse(block)).one("Deployment")["spec"]["template"]["spec"]
    relay = relay_container(pod, "outbox-relay")
    assert relay["restartPolicy"] == "Always"  # native: true in the documented values
    assert relay["image"] == "registry.example.com/payments/outbox-relay:0.1.0"


def _leaf_keys(values: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            keys.extend(_leaf_keys(value, path + "."))
        else:
            keys.append(path)
    return keys


def test_chart_readme_documents_every_value(defaults: dict[str, Any]) -> None:
    """Each value has a row in the README's table (a row may cover an object, e.g. `resources`)."""
    readme = (CHART / "README.md").read_text().partition("\n## Values\n")[2]
    rows = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.MULTILINE))
    assert rows, "the chart README has no values table"
    leaves = _leaf_keys(defaults)
    undocumented = [k for k in leaves if not any(k == r or k.startswith(r + ".") for r in rows)]
    assert undocumented == []
    stale = [
        r
        for r in rows
        if "<name>" not in r and not any(k == r or k.startswith(r + ".") for k in leaves)
    ]
    assert stale == [], "README rows for values that no longer exist"


def test_deploy_copies_match_the_chart() -> None:
    """deploy/ holds copies for use without Helm; the chart's files/ are canonical."""
    pairs = [
        ("deploy/grafana/outbox-relay-dashboard.json", "files/grafana/outbox-relay-dashboard.json"),
        ("deploy/prometheus/alerts.yaml", "files/prometheus/alerts.yaml"),
    ]
    for copy_path, canonical in pairs:
        assert (ROOT / copy_path).read_bytes() == (CHART / canonical).read_bytes(), (
            f"{copy_path} differs from helm/outbox-relay/{canonical}: copy the chart's file"
        )


CONTRACT_METRICS = {
    "outbox_relay_intents_finished_total",
    "outbox_relay_provider_call_seconds",
    "outbox_relay_in_flight",
    "outbox_relay_breaker_state",
    "outbox_relay_queue_depth",
    "outbox_relay_oldest_pending_age_seconds",
    "outbox_relay_unpublished_events",
    "outbox_relay_publish_lag_seconds",
    "outbox_relay_reconciliation_open_delta_minor",
    "outbox_relay_dead_letters",
}


def _known_metrics() -> set[str]:
    declared = set(
        re.findall(
            r'"(outbox_relay_[a-z0-9_]+)"', (ROOT / "relay" / "infra" / "metrics.py").read_text()
        )
    )
    names = CONTRACT_METRICS | declared
    return names | {f"{n}_{suffix}" for n in names for suffix in ("bucket", "sum", "count")}


def test_alerts_and_dashboard_query_only_known_metrics(helm: Helm) -> None:
    known = _known_metrics()
    rules = helm.yaml(CHART / "files" / "prometheus" / "alerts.yaml")
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert alerts
    for alert in alerts:
        assert alert["alert"].startswith("OutboxRelay")
        assert alert["labels"]["severity"] in {"warning", "critical"}
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
    dashboard = json.loads(
        (CHART / "files" / "grafana" / "outbox-relay-dashboard.json").read_text()
    )
    exprs = [alert["expr"] for alert in alerts] + [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    used = {name for expr in exprs for name in re.findall(r"\boutbox_relay_[a-z0-9_]+", expr)}
    assert used - known == set()
    assert CONTRACT_METRICS - {n.removesuffix("_bucket") for n in used} == set()


def _alerts(helm: Helm) -> dict[str, dict[str, Any]]:
    rules = helm.yaml(CHART / "files" / "prometheus" / "alerts.yaml")
    return {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}


def test_alert_aggregations_keep_each_release_apart(helm: Helm) -> None:
    """Several releases in one Prometheus: every aggregation keeps namespace and job."""
    aggregation = re.compile(r"\b(sum|max|min|avg|count)\s*(?:by\s*\(([^)]*)\))?\s*\(")
    for name, rule in _alerts(helm).items():
        found = aggregation.findall(rule["expr"])
        for op, by in found:
            labels = {label.strip() for label in by.split(",")}
            assert {"namespace", "job"} <= labels, f"{name}: {op} by ({by})"


def test_breaker_alert_holds_through_half_open_probes(helm: Helm) -> None:
    """The gauge alternates 2 (open) and 1 (half-open, probing) during an outage; the
    condition must hold at every sample of it, or each probe restarts the `for` timer."""
    rule = _alerts(helm)["OutboxRelayCircuitOpen"]
    match = re.fullmatch(
        r"max by \([^)]*\) \(outbox_relay_breaker_state\) (==|>=|>) (\d+)", rule["expr"].strip()
    )
    assert match, rule["expr"]
    op, threshold = match[1], int(match[2])
    holds = {"==": int.__eq__, ">=": int.__ge__, ">": int.__gt__}[op]
    outage = [2, 2, 1, 2, 2, 1, 2]  # open, a failed probe (half-open), open again ...
    assert all(holds(state, threshold) for state in outage)
    assert not holds(0, threshold), "closed does not alert"
    assert rule["for"] == "5m"


def _dead_outcomes() -> set[str]:
    """The `outcome` labels of outbox_relay_intents_finished_total that mean dead, as the
    counter's help text lists them (`... -> dead.`)."""
    from relay.infra.metrics import INTENTS_FINISHED

    text = INTENTS_FINISHED._documentation
    dead = next(part for part in text.split(";") if "-> dead" in part)
    dead = re.sub(r"\([^)]*\)", "", dead.split("-> dead")[0])
    return {word.strip() for word in dead.split(",") if word.strip()}


def test_new_dead_letter_alert_counts_deaths_not_a_gauge_delta(helm: Helm) -> None:
    """delta() of the dead-letters gauge nets a retry against a new death; the finished
    counter with the dead outcomes only goes up."""
    expr = _alerts(helm)["OutboxRelayNewDeadLetters"]["expr"]
    assert "delta(" not in expr and "outbox_relay_dead_letters" not in expr
    selectors = re.findall(r'outbox_relay_intents_finished_total\{outcome=~"([^"]+)"\}', expr)
    assert selectors and all(set(s.split("|")) == _dead_outcomes() for s in selectors)
    assert _dead_outcomes() >= {"invalid", "exhausted"}
    assert re.search(r"increase\(outbox_relay_intents_finished_total\{[^}]*\}\[15m\]\)", expr)
    # A series born at 1 (the relay's first death of that kind) is invisible to increase().
    assert re.search(
        r"\bunless\b[^{]*outbox_relay_intents_finished_total\{[^}]*\} offset 15m", expr
    )


def _stages(dockerfile: str) -> list[list[str]]:
    """Instructions (continuations joined, comments dropped) grouped by FROM."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", dockerfile)
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_slim_non_root() -> None:
    stages = _stages((ROOT / "Dockerfile").read_text())
    assert len(stages) >= 2, "multi-stage: build, then a clean runtime stage"
    final = stages[-1]
    assert re.match(r"FROM python:\S*-slim", final[0])
    assert any(line.startswith("COPY --from=") for line in final)
    assert not any(
        re.search(r"apt-get install|gcc|build-essential|COPY \. ", line) for line in final
    )
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users, "the final stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root UID, so runAsNonRoot can check it"
    assert final[-2:] == ['ENTRYPOINT ["outbox-relay"]', 'CMD ["run"]']
    assert any(
        line.startswith("RUN ") and re.search(r"pip (--python \S+ )?install \.", line)
        for line in stages[0]
    )


def test_image_carries_no_pip_or_setuptools() -> None:
    """`python -m venv` seeds the venv with pip and, before Python 3.12, setuptools (and its
    distutils hook), and the final stage copies the venv whole: the build must leave them
    out of it (--without-pip) or remove them, and the final stage removes the base
    image's own."""
    stages = _stages((ROOT / "Dockerfile").read_text())
    build = [
        command.strip()
        for stage in stages[:-1]
        for line in stage
        if line.startswith("RUN ")
        for command in line.removeprefix("RUN ").split("&&")
    ]
    final = stages[-1]

    def uninstalls(command: str, name: str) -> bool:
        return bool(re.search(rf"\buninstall\b[^;]*\s{name}(\s|$)", command))

    venvs = [c for c in build if re.search(r"python\S* -m venv ", c)]
    assert venvs, "the build stage creates the virtualenv"
    for command in venvs:
        venv = command.split()[-1]
        removed = all(
            any(venv in c and uninstalls(c, name) for c in build) for name in ("pip", "setuptools")
        )
        assert "--without-pip" in command or removed, f"{venv} keeps pip and setuptools"
    for command in build:
        assert not re.search(r"ensurepip|\binstall\b.*\s(pip|setuptools|wheel)(\s|$)", command)
    venv = venvs[0].split()[-1]
    assert [line.split()[-2:] for line in final if line.startswith("COPY --from=")] == [
        [venv, venv]
    ], "only the virtualenv comes from the build stage"
    final_commands = [
        c
        for line in final
        if line.startswith("RUN ")
        for c in line.removeprefix("RUN ").split("&&")
    ]
    for name in ("pip", "setuptools"):
        assert any(uninstalls(c, name) for c in final_commands), f"the base image keeps {name}"


def test_dockerignore_keeps_the_context_to_the_package() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # everything out, then only what `pip install .` reads back in
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert included == {"pyproject.toml", "README.md", "relay", "provider_adapters", "sql"}
    copied = set(
        re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    )
    assert {path.rstrip("/") for line in copied for path in line.split()} <= included


def test_migrations_can_log_in_as_the_schema_owner(helm: Helm, fleet: dict[str, Any]) -> None:
    """Least privilege: the Job mounts its own Secret; the relay's pods never see it."""
    values = merged(
        fleet,
        {
            # An inline relay URL would otherwise get a hook copy for the Job.
            "database": {"existingSecret": "", "url": "postgresql://relay@db/payments"},
            "migrations": {"database": {"existingSecret": "outbox-owner", "secretKey": "dsn"}},
        },
    )
    manifests = helm.render(CHART, values)
    job_pod = manifests.one("Job")["spec"]["template"]["spec"]
    job_files = _file_paths(manifests, job_pod, job_pod["containers"][0])
    assert set(job_files.values()) == {("outbox-owner", "dsn")}
    relay_pod = manifests.one("Deployment")["spec"]["template"]["spec"]
    relay_files = _file_paths(manifests, relay_pod, relay_container(relay_pod, "relay"))
    assert ("outbox-owner", "dsn") not in set(relay_files.values())
    assert not any(
        s["metadata"]["name"].endswith("-migrations") for s in manifests.all("Secret")
    ), "no hook copy of the relay's URL is needed"


# ---------------------------------------------------------------------------------------
# The webhook receiver (`outbox-relay webhooks serve`): its own Deployment, Service, Ingress
# ---------------------------------------------------------------------------------------

WEBHOOKS = {
    "webhooks": {
        "enabled": True,
        "endpoints": {"stripe": {"existingSecret": "stripe-webhook", "secretKey": "secrets"}},
        "ingress": {"enabled": True, "host": "hooks.example.com", "className": "nginx"},
    }
}


def test_webhook_receiver_runs_as_its_own_deployment_service_and_ingress(
    helm: Helm, fleet: dict[str, Any]
) -> None:
    manifests = helm.render(CHART, merged(fleet, WEBHOOKS))
    name = f"{RELEASE}-outbox-relay-webhooks"
    deployment = manifests.one("Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["webhooks", "serve"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RELAY_WEBHOOKS_PORT"] == "9110"
    assert env["RELAY_WEBHOOKS__STRIPE__KIND"] == "stripe"
    secrets_file = env["RELAY_WEBHOOKS__STRIPE__SECRETS_FILE"]
    assert secrets_file == "/var/run/secrets/outbox-relay/webhooks/stripe/secrets"
    sources = pod["volumes"][0]["projected"]["sources"]
    assert {
        "secret": {
            "name": "stripe-webhook",
            "items": [{"key": "secrets", "path": "webhooks/stripe/secrets"}],
        }
    } in sources
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The relay Deployment and its Service do not select the receiver, nor it them.
    service = manifests.one("Service", name)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    relay_labels = manifests.one("Deployment", f"{RELEASE}-outbox-relay")["spec"]["template"][
        "metadata"
    ]["labels"]
    assert not service["spec"]["selector"].items() <= relay_labels.items()
    assert (
        not manifests.one("Service", f"{RELEASE}-outbox-relay")["spec"]["selector"].items()
        <= labels.items()
    )
    ingress = manifests.one("Ingress", name)["spec"]
    assert ingress["ingressClassName"] == "nginx"
    (rule,) = ingress["rules"]
    assert rule["host"] == "hooks.example.com"
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/webhooks/"  # /metrics stays inside the cluster
    assert path["backend"]["service"] == {"name": name, "port": {"name": "webhooks"}}


def test_webhook_receiver_is_off_by_default(helm: Helm, fleet: dict[str, Any]) -> None:
    assert not any(
        d["metadata"]["name"].endswith("-webhooks") for d in helm.render(CHART, fleet).docs
    )


def test_inline_webhook_secrets_go_into_the_created_secret(
    helm: Helm, sidecar: dict[str, Any]
) -> None:
    values = merged(
        sidecar,
        {
            "webhooks": {
                "enabled": True,
                "endpoints": {"stripe": {"secrets": ["whsec_a", "whsec_b"]}},
            }
        },
    )
    manifests = helm.render(CHART, values)
    secret = manifests.one("Secret", f"{RELEASE}-outbox-relay")

    assert base64.b64decode(secret["data"]["webhook-stripe-secrets"]).decode() == "whsec_a\nwhsec_b"
    pod = manifests.one("Deployment", f"{RELEASE}-outbox-relay-webhooks")["spec"]["template"][
        "spec"
    ]
    sources = pod["volumes"][0]["projected"]["sources"]
    assert {
        "secret": {
            "name": secret["metadata"]["name"],
            "items": [{"key": "webhook-stripe-secrets", "path": "webhooks/stripe/secrets"}],
        }
    } in sources


def test_adyen_hmac_keys_come_from_a_secret_like_stripe_s_signing_secrets(
    helm: Helm, fleet: dict[str, Any]
) -> None:
    values = merged(
        fleet,
        {
            "webhooks": {
                "enabled": True,
                "endpoints": {
                    "stripe": {"existingSecret": "stripe-webhook", "secretKey": "secrets"},
                    "adyen": {
                        "kind": "adyen",
                        "existingSecret": "adyen-webhook-hmac",
                        "secretKey": "hmac-keys",
                    },
                },
            }
        },
    )
    pod = helm.render(CHART, values).one("Deployment", f"{RELEASE}-outbox-relay-webhooks")["spec"][
        "template"
    ]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RELAY_WEBHOOKS__ADYEN__KIND"] == "adyen"
    assert env["RELAY_WEBHOOKS__STRIPE__KIND"] == "stripe"
    assert (
        env["RELAY_WEBHOOKS__ADYEN__SECRETS_FILE"]
        == "/var/run/secrets/outbox-relay/webhooks/adyen/secrets"
    )
    sources = pod["volumes"][0]["projected"]["sources"]
    assert {
        "secret": {
            "name": "adyen-webhook-hmac",
            "items": [{"key": "hmac-keys", "path": "webhooks/adyen/secrets"}],
        }
    } in sources


ADYEN_KEY = "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056"


def test_inline_adyen_hmac_keys_go_into_the_created_secret(
    helm: Helm, sidecar: dict[str, Any]
) -> None:
    second = "00112233445566778899AABBCCDDEEFF00112233445566778899AABBCCDDEEFF"
    values = merged(
        sidecar,
        {
            "webhooks": {
                "enabled": True,
                "endpoints": {"adyen": {"kind": "adyen", "secrets": [ADYEN_KEY, second]}},
            }
        },
    )
    secret = helm.render(CHART, values).one("Secret", f"{RELEASE}-outbox-relay")
    stored = base64.b64decode(secret["data"]["webhook-adyen-secrets"]).decode()
    assert stored == f"{ADYEN_KEY}\n{second}"


@pytest.mark.parametrize(
    ("endpoint", "bad"),
    [
        ({"kind": "adyen", "secrets": ["whsec_a"]}, "whsec_a"),  # a Stripe secret on Adyen
        ({"kind": "adyen", "secrets": ["not-hex"]}, "not-hex"),
        ({"kind": "stripe", "secrets": [ADYEN_KEY]}, ADYEN_KEY),  # an HMAC key on Stripe
        ({"kind": "paypal", "existingSecret": "x"}, "paypal"),
    ],
)
def test_a_webhook_secret_of_the_wrong_shape_for_its_kind_is_refused(
    helm: Helm, sidecar: dict[str, Any], endpoint: dict[str, Any], bad: str
) -> None:
    values = merged(sidecar, {"webhooks": {"enabled": True, "endpoints": {"hook": endpoint}}})
    with pytest.raises(HelmError) as refused:
        helm.render(CHART, values)
    assert "webhooks" in str(refused.value) and "endpoints" in str(refused.value)
