"""Real OS processes for crash tests: the fake provider and relays, killable with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.waiting import block_until

# Nothing listens on port 9 (discard): a provider that never answers.
UNREACHABLE_PROVIDER = "http://127.0.0.1:9"


def idle_relay_env(database_url: str, **extra: str) -> dict[str, str]:
    """`run`'s environment for a relay with one Stripe lane whose provider never answers,
    logging JSON: for tests of start-up, shutdown and what the relay reports, not of
    payments. ``extra`` adds or overrides variables."""
    return {
        "RELAY_DATABASE_URL": database_url,
        "RELAY_PROVIDERS__STRIPE__API_KEY": "sk_test_idle_relay",
        "RELAY_PROVIDERS__STRIPE__BASE_URL": UNREACHABLE_PROVIDER,
        "RELAY_LOG_FORMAT": "json",
        **extra,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _ServedProcess:
    """A child process serving HTTP on a free port of 127.0.0.1, logging to ``log_name``
    in ``log_dir``; started when built (``probe_path`` answers 2xx), stopped by stop()."""

    what = "the process"
    probe_path = "/_fake/effects"
    stop_seconds = 10.0

    def __init__(
        self,
        log_dir: Path,
        log_name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        start_seconds: float = 30.0,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_dir / log_name, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *argv, "--port", str(self.port)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        block_until(self._answers, f"{self.what} to answer", guard_seconds=start_seconds)

    def _answers(self) -> bool:
        try:
            httpx.get(f"{self.url}{self.probe_path}", timeout=1).raise_for_status()
        except httpx.HTTPError:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.what} exited at start; see its log") from None
            return False
        return True

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(self.stop_seconds)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class _FakeProcess(_ServedProcess):
    """A fake provider: its effects, and faults set at run time."""

    def effects(self) -> dict[str, object]:
        response = httpx.get(f"{self.url}/_fake/effects", timeout=30)
        response.raise_for_status()
        result: dict[str, object] = response.json()
        return result

    def configure(self, faults: dict[str, object]) -> None:
        httpx.post(f"{self.url}/_fake/config", json=faults, timeout=10).raise_for_status()


class WebhookReceiverProcess(_ServedProcess):
    """`outbox-relay webhooks serve` as its own process, with an Adyen route
    (``/webhooks/adyen``) verifying with ``hmac_keys``; ``adyen_url`` is where the fake Adyen
    sends its notifications."""

    what = "the webhook receiver"
    probe_path = "/healthz"
    stop_seconds = 30.0

    def __init__(self, log_dir: Path, database_url: str, hmac_keys: list[str]) -> None:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RELAY_")},
            "RELAY_DATABASE_URL": database_url,
            "RELAY_WEBHOOKS__ADYEN__KIND": "adyen",
            "RELAY_WEBHOOKS__ADYEN__SECRETS": json.dumps(hmac_keys),
            "RELAY_LOG_FORMAT": "json",
        }
        super().__init__(
            log_dir,
            "webhooks.log",
            ["relay", "webhooks", "serve", "--host", "127.0.0.1"],
            env=env,
            start_seconds=60.0,
        )
        self.adyen_url = f"{self.url}/webhooks/adyen"


class AdyenFakeProcess(_FakeProcess):
    """The fake Adyen Checkout API (provider_adapters/fake/adyen.py) as its own process."""

    what = "the fake Adyen"

    def __init__(self, log_dir: Path, *flags: str) -> None:
        super().__init__(log_dir, "fake-adyen.log", ["provider_adapters.fake.adyen", *flags])

    def notifications(self) -> list[dict[str, object]]:
        """The notifications it sent or is sending, each with ``_delivered`` (2xx answers)."""
        response = httpx.get(f"{self.url}/_fake/webhooks", timeout=30)
        response.raise_for_status()
        notes: list[dict[str, object]] = response.json()["notifications"]
        return notes


class FakeProviderProcess(_FakeProcess):
    """The fake Stripe (``outbox-relay fake-provider``) as its own process."""

    what = "the fake provider"

    def __init__(self, log_dir: Path, *flags: str) -> None:
        super().__init__(log_dir, "fake-provider.log", ["relay", "fake-provider", *flags])


class RelayProcess:
    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.http_port = int(env.get("RELAY_HTTP_PORT") or free_port())
        self.env = {
            **os.environ,
            **env,
            "RELAY_INSTANCE_NAME": name,
            "RELAY_HTTP_PORT": str(self.http_port),
        }
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0
        self.starts = 0
        self._log_offset = 0

    def start(self) -> None:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "run"], env=self.env, stdout=log, stderr=log
        )
        log.close()
        self.starts += 1

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait for this start's `relay_ready` log line (signal handlers are installed)."""
        block_until(
            self.ready, f"{self.name} to log relay_ready", guard_seconds=timeout, every=0.05
        )

    def ready(self) -> bool:
        """Whether this start has logged `relay_ready`; raises if the relay exited."""
        if b"relay_ready" in self.log_path.read_bytes()[self._log_offset :]:
            return True
        if not self.running:
            raise RuntimeError(f"{self.name} exited; see {self.log_path}")
        return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.kills += 1

    def terminate(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None
