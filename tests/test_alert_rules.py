"""The Prometheus alert rules (helm/outbox-relay/files/prometheus/alerts.yaml, copied to
deploy/prometheus/alerts.yaml) are checked and unit-tested by promtool: series in, alerts
out (deploy/prometheus/tests/alerts_test.yaml), each rule shown firing when it should and
quiet when it should.

promtool is not a Python package: on Debian `apt-get install prometheus` brings it (.ci/run
does). Without it on PATH the promtool tests skip with that remedy, except under
RELAY_TEST_REQUIRE_SERVICES=1 (CI), where they fail.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_SERVICES

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "helm" / "outbox-relay" / "files" / "prometheus" / "alerts.yaml"
RULES_COPY = ROOT / "deploy" / "prometheus" / "alerts.yaml"
UNIT_TESTS = ROOT / "deploy" / "prometheus" / "tests" / "alerts_test.yaml"
PROMTOOL_TIMEOUT_SECONDS = 300  # a hung promtool fails the test, not the run


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        reason = (
            "promtool is not on PATH: install it (Debian: apt-get install -y "
            "--no-install-recommends prometheus) to run the alert rules' unit tests"
        )
        if REQUIRE_SERVICES:
            pytest.fail(f"{reason} (RELAY_TEST_REQUIRE_SERVICES=1)", pytrace=False)
        pytest.skip(reason)
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_SECONDS,
        check=False,
    )


def _alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\S+)\s*$", RULES.read_text(), flags=re.MULTILINE)


def _cases() -> list[tuple[str, bool]]:
    """(alertname, expects firing alerts) for every alert_rule_test case of the unit tests."""
    return [
        (name, expected.strip() != "[]")
        for name, expected in re.findall(
            r"^\s*alertname: (\S+)\s*\n\s*exp_alerts:(.*)$", UNIT_TESTS.read_text(), re.MULTILINE
        )
    ]


def test_promtool_checks_the_rules() -> None:
    promtool = _promtool()
    for path in (RULES, RULES_COPY):
        result = _run(promtool, "check", "rules", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"SUCCESS: {len(_alert_names())} rules found" in result.stdout


def test_every_rule_fires_when_it_should_and_stays_quiet_otherwise() -> None:
    """`promtool test rules`: each case gives series and the exact alerts (labels and
    rendered annotations) expected at an evaluation time; a rule that fires too early,
    too late, for the wrong labels or not at all fails here."""
    promtool = _promtool()
    result = _run(promtool, "test", "rules", str(UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_cover_every_rule_both_ways() -> None:
    """No rule without a case where it fires and one where it stays quiet."""
    names = _alert_names()
    assert "OutboxRelayUnservedIntents" in names
    cases = _cases()
    assert {name for name, _ in cases} <= set(names), "a case for a rule that does not exist"
    untested = [n for n in names if (n, True) not in cases or (n, False) not in cases]
    assert untested == [], "add firing and quiet cases to deploy/prometheus/tests/alerts_test.yaml"
    rule_files = re.findall(r"^rule_files:\s*\n\s*- (\S+)", UNIT_TESTS.read_text(), re.MULTILINE)
    assert [(UNIT_TESTS.parent / f).resolve() for f in rule_files] == [RULES_COPY.resolve()]
    assert RULES_COPY.read_bytes() == RULES.read_bytes(), "the tests read the deploy/ copy"
