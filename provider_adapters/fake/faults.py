"""Fault injection for the fake provider: what to break, how often, reproducibly."""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["FaultConfig", "FaultRoller"]

_ENV_PREFIX = "FAKE_PROVIDER_"


@dataclass
class FaultConfig:
    """Rates are probabilities in [0, 1] per effect-capable POST."""

    latency_ms: int = 0
    latency_jitter_ms: int = 0
    rate_429: float = 0.0
    rate_503: float = 0.0
    rate_timeout_after_effect: float = 0.0
    rate_500_after_effect: float = 0.0
    rate_malformed: float = 0.0
    timeout_seconds: float = 5.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "rate_429",
            "rate_503",
            "rate_timeout_after_effect",
            "rate_500_after_effect",
            "rate_malformed",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.latency_ms < 0 or self.latency_jitter_ms < 0 or self.timeout_seconds < 0:
            raise ValueError("latency_ms, latency_jitter_ms and timeout_seconds must be >= 0")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> FaultConfig:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in fields(cls):
            raw = env.get(_ENV_PREFIX + spec.name.upper())
            if raw is None:
                continue
            if spec.name in ("latency_ms", "latency_jitter_ms", "seed"):
                values[spec.name] = int(raw)
            else:
                values[spec.name] = float(raw)
        return cls(**values)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FaultConfig:
        known = {spec.name for spec in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault settings: {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FaultRoller:
    config: FaultConfig
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if self.config.seed is not None:
            self.rng.seed(self.config.seed)

    def latency_seconds(self) -> float:
        jitter = (
            self.rng.uniform(0, self.config.latency_jitter_ms)
            if self.config.latency_jitter_ms
            else 0
        )
        return (self.config.latency_ms + jitter) / 1000

    def before(self) -> str | None:
        """A fault that answers before anything is applied: '429', '503' or None."""
        roll = self.rng.random()
        if roll < self.config.rate_429:
            return "429"
        if roll < self.config.rate_429 + self.config.rate_503:
            return "503"
        return None

    def after(self) -> str | None:
        """A fault after the effect was applied: 'timeout_after_effect', '500_after_effect',
        'malformed' or None."""
        roll = self.rng.random()
        c = self.config
        if roll < c.rate_timeout_after_effect:
            return "timeout_after_effect"
        if roll < c.rate_timeout_after_effect + c.rate_500_after_effect:
            return "500_after_effect"
        if roll < c.rate_timeout_after_effect + c.rate_500_after_effect + c.rate_malformed:
            return "malformed"
        return None

    def malformed_body(self, body: dict[str, Any]) -> bytes:
        import json

        variant = self.rng.randrange(5)
        if variant == 0:
            text = json.dumps(body)
            return text[: max(1, len(text) // 2)].encode()
        broken = dict(body)
        if variant == 1 and "amount" in broken:
            broken["amount"] = str(broken["amount"])
        elif variant == 2 and "amount" in broken:
            broken["amount"] = int(broken["amount"]) + 1
        elif variant == 3 and "currency" in broken:
            broken["currency"] = "xxx"
        else:
            broken["status"] = "teleported"
        return json.dumps(broken).encode()
