"""Guard rails, pure: is a split's canary worse than its baseline? Counts in, verdict out.

A guard rail (sql/0067, ``outbox.routing_guards``) watches one split rule. Each side (the
canary, the baseline) is summed over the first intents of the payments the rule routed to it
in the window, each classed once by :func:`classify`:

* ``succeeded``: succeeded, or accepted and awaiting its confirmation;
* ``declined``: the provider refused it (intent ``failed``);
* ``error``: given up (``dead``) on an invalid or retryable code, or being retried after a
  retryable one (the provider unavailable, rate limiting, unreachable);
* ``ambiguous``: an ambiguous code (timeout, connection lost, 5xx), retried or given up;
* no class yet (``None``): not tried, or claimed with no outcome so far (or a status this
  module does not know): not a sample.

The class of a code is the error catalogue's (provider_adapters/error_catalogue.csv), which
the caller looks up; an uncatalogued code counts as an error.

:func:`evaluate` compares the sides, each with at least ``min_samples`` outcomes:

* failures (declined + errors) and ambiguous outcomes as rates of the side's samples: the
  canary is worse when its rate exceeds the baseline's by more than the margin, in basis
  points (1/100 of a percent), compared exactly in integers
  (``c_bad * b_n * 10000 > (b_bad * 10000 + margin * b_n) * c_n``);
* latency at the guard's percentile (milliseconds from the INSERT to the outcome, computed
  by the database): worse when the canary's exceeds the baseline's by more than the margin.

A margin left unset (None) is not compared. The verdict rolls back when any compared measure
is worse; its ``reason`` is one line that says which, with the figures, and is what the audit
row and the event carry.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import attrgetter

__all__ = [
    "BASIS_POINTS",
    "OUTCOME_CLASSES",
    "Comparison",
    "GuardRail",
    "SideCounts",
    "Verdict",
    "classify",
    "evaluate",
    "format_bp",
    "rate_bp",
    "rolled_back",
]

BASIS_POINTS = 10_000
OUTCOME_CLASSES = ("succeeded", "declined", "error", "ambiguous")

_SUCCEEDED = frozenset({"succeeded", "awaiting_confirmation"})
_WAITING = frozenset({"blocked", "pending", "in_flight"})


def rolled_back(rolled_back_at: object, canary_weight: int | None) -> bool:
    """A guard's canary is at 0 because a relay rolled it back (no one raised it since)."""
    return rolled_back_at is not None and canary_weight == 0


def classify(status: str, error_code: str | None, code_class: str | None) -> str | None:
    """The outcome class of a payment's first intent, or None while it has none.

    ``code_class`` is the catalogue's class of ``error_code`` (retryable, declined,
    ambiguous, invalid), None for an uncatalogued code or none.
    """
    if status in _SUCCEEDED:
        return "succeeded"
    if status == "failed":
        return "declined"
    if status == "dead" or (status in _WAITING and error_code is not None):
        return "ambiguous" if code_class == "ambiguous" else "error"
    # Not tried yet, its first attempt under way, or a status this module does not know
    # (a later migration's): not a sample, rather than a guess or a stopped relay.
    return None


@dataclass(frozen=True, slots=True)
class GuardRail:
    """One rule's guard, as stored (sql/0067)."""

    rule: str
    canary: str
    baseline: str
    window_seconds: int = 900
    min_samples: int = 100
    failure_margin_bp: int | None = None
    ambiguous_margin_bp: int | None = None
    latency_percentile: int = 95
    latency_margin_ms: int | None = None

    def __post_init__(self) -> None:
        if self.canary == self.baseline:
            raise ValueError("canary and baseline must differ")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be at least 1, got {self.min_samples}")
        for name in ("failure_margin_bp", "ambiguous_margin_bp"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= BASIS_POINTS:
                raise ValueError(f"{name} must be 0 to {BASIS_POINTS}, got {value}")
        if self.latency_margin_ms is not None and self.latency_margin_ms < 0:
            raise ValueError(f"latency_margin_ms must be 0 or more, got {self.latency_margin_ms}")
        if not 50 <= self.latency_percentile <= 99:
            raise ValueError(f"latency_percentile must be 50 to 99, got {self.latency_percentile}")


@dataclass(frozen=True, slots=True)
class SideCounts:
    """One side's outcomes in the window; ``latency_ms``: its percentile, None without any."""

    provider: str
    succeeded: int = 0
    declined: int = 0
    errors: int = 0
    ambiguous: int = 0
    latency_ms: int | None = None

    @property
    def samples(self) -> int:
        return self.succeeded + self.declined + self.errors + self.ambiguous

    @property
    def failures(self) -> int:
        return self.declined + self.errors

    @classmethod
    def tally(
        cls, provider: str, classes: Iterable[tuple[str | None, int]], latency_ms: int | None
    ) -> SideCounts:
        """Sum ``(class, count)`` pairs (classes from :func:`classify`; None is skipped)."""
        totals = dict.fromkeys(OUTCOME_CLASSES, 0)
        for klass, count in classes:
            if klass is not None:
                totals[klass] += count
        return cls(
            provider,
            succeeded=totals["succeeded"],
            declined=totals["declined"],
            errors=totals["error"],
            ambiguous=totals["ambiguous"],
            latency_ms=latency_ms,
        )


def rate_bp(part: int, whole: int) -> int:
    """``part / whole`` in basis points, rounded down; 0 for an empty side."""
    return part * BASIS_POINTS // whole if whole else 0


def format_bp(bp: int) -> str:
    """Basis points as a percentage with two decimals: 1234 -> '12.34%'."""
    return f"{bp // 100}.{bp % 100:02d}%"


@dataclass(frozen=True, slots=True)
class Comparison:
    """One measure: the canary's and the baseline's value, the margin, whether it is worse."""

    measure: str  # failures | ambiguous | latency
    canary: int  # basis points, or milliseconds for latency
    baseline: int
    margin: int
    worse: bool
    text: str


@dataclass(frozen=True, slots=True)
class Verdict:
    rollback: bool
    enough_samples: bool
    reason: str
    comparisons: tuple[Comparison, ...] = field(default_factory=tuple)


def _rate_worse(c_bad: int, c_n: int, b_bad: int, b_n: int, margin_bp: int) -> bool:
    # c_bad/c_n - b_bad/b_n > margin/10000, cross-multiplied (c_n, b_n > 0): no division.
    return c_bad * b_n * BASIS_POINTS > (b_bad * BASIS_POINTS + margin_bp * b_n) * c_n


def _rate(
    measure: str, c_bad: int, c_n: int, b_bad: int, b_n: int, margin_bp: int, names: tuple[str, str]
) -> Comparison:
    worse = _rate_worse(c_bad, c_n, b_bad, b_n, margin_bp)
    c_bp, b_bp = rate_bp(c_bad, c_n), rate_bp(b_bad, b_n)
    text = (
        f"{measure} {format_bp(c_bp)} ({c_bad}/{c_n}) on {names[0]} vs {format_bp(b_bp)} "
        f"({b_bad}/{b_n}) on {names[1]}, margin {format_bp(margin_bp)}: "
        + ("WORSE" if worse else "within")
    )
    return Comparison(measure, c_bp, b_bp, margin_bp, worse, text)


def evaluate(guard: GuardRail, canary: SideCounts, baseline: SideCounts) -> Verdict:
    """Compare ``canary`` with ``baseline`` under ``guard``; see the module docstring."""
    window = f"window {guard.window_seconds} s, at least {guard.min_samples} samples a side"
    short = [s for s in (canary, baseline) if s.samples < guard.min_samples]
    if short:
        waiting = ", ".join(f"{s.provider} {s.samples}" for s in short)
        return Verdict(
            rollback=False,
            enough_samples=False,
            reason=f"guard rail {guard.rule}: not enough samples yet ({waiting}; {window})",
        )
    names = (canary.provider, baseline.provider)
    comparisons: list[Comparison] = []
    rates = (
        ("failures", guard.failure_margin_bp, attrgetter("failures")),
        ("ambiguous", guard.ambiguous_margin_bp, attrgetter("ambiguous")),
    )
    for measure, margin_bp, count in rates:
        if margin_bp is not None:
            comparisons.append(
                _rate(
                    measure,
                    count(canary),
                    canary.samples,
                    count(baseline),
                    baseline.samples,
                    margin_bp,
                    names,
                )
            )
    if (
        guard.latency_margin_ms is not None
        and canary.latency_ms is not None
        and baseline.latency_ms is not None
    ):
        slower = canary.latency_ms - baseline.latency_ms > guard.latency_margin_ms
        comparisons.append(
            Comparison(
                "latency",
                canary.latency_ms,
                baseline.latency_ms,
                guard.latency_margin_ms,
                slower,
                f"p{guard.latency_percentile} latency {canary.latency_ms} ms on {names[0]} vs "
                f"{baseline.latency_ms} ms on {names[1]}, margin {guard.latency_margin_ms} ms: "
                + ("WORSE" if slower else "within"),
            )
        )
    worse = [c for c in comparisons if c.worse]
    shown = worse or comparisons
    head = (
        f"guard rail {guard.rule}: canary {canary.provider} worse than baseline "
        f"{baseline.provider}, rolled back to 0"
        if worse
        else f"guard rail {guard.rule}: canary {canary.provider} within its margins"
    )
    details = "; ".join(c.text for c in shown) or "no measure compared"
    return Verdict(
        rollback=bool(worse),
        enough_samples=True,
        reason=f"{head}: {details} ({window})",
        comparisons=tuple(comparisons),
    )
