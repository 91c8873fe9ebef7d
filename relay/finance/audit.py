"""The audit trail's hash chains: how a row is hashed, and `outbox-relay audit verify`.

The rows are written by database triggers (sql/0005_pre_ledger_audit.sql); this module
only reads them. Each entity row (an intent, a payment, a janitor check, a reconciliation
exception...) has its own chain: its audit rows are numbered ``chain_seq`` 1, 2, 3... and
each carries ``prev_hash``, the hash of the chain's previous row, and ``hash``, the
SHA-256 of :func:`canonical` over its own fields. :func:`verify_chain` is pure: it names
the first broken link of one chain and says what happened there:

* ``edited``: a row's fields no longer match its hash (or a row was changed and rehashed,
  which the next row's link shows);
* ``deleted``: a row links to a row that is not there, and positions are missing;
* ``inserted``: rows sit between two rows that link to each other directly;
* ``reordered``: a row links to a row that comes after it, or ids run backwards.

:func:`verify_database` walks every chain, then checks that every audited row that exists
(intents hot and archived, payments, janitor checks, reconciliation runs, exceptions and
actions, exchange rates) ends its chain in its live state, which also catches a deleted tail, a rewritten
or forged last row, a deleted chain, and a change made while the audit trigger was off
(``tail_mismatch``, ``missing_chain``). A claim is mechanics and writes no row (sql/0021):
an intent in flight may be exactly one claim ahead of its chain, nothing else.

An intent's creation rows (the intent's, and its payment's when the intent created it) are
written by the first relay transaction that touches the intent, its claim or its promotion
(sql/0019), keeping who inserted it and when. Until then the intent has no audit row: an
intent or payment inserted less than ``creation_grace_seconds`` ago (server clock) without
one is counted as awaiting its creation rows; an older one, or a chain that does not start
with its ``insert`` row, is a ``missing_creation`` break. An intent a relay has touched
(claimed, promoted) has its creation rows whatever its age: without any audit row it is a
``missing_chain`` break, as for every other audited row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg

from relay.infra.queries import QUERIES

__all__ = [
    "AuditRow",
    "Break",
    "VerifyReport",
    "canonical",
    "fold",
    "row_hash",
    "verify_chain",
    "verify_database",
]

FORMAT_VERSION = "outbox-audit-v1"

BreakKind = Literal[
    "edited",
    "deleted",
    "inserted",
    "reordered",
    "tail_mismatch",
    "missing_chain",
    "missing_creation",
]

# How long an intent may wait for the relay to write its creation rows before `audit verify`
# calls it missing: a relay claims a new intent within milliseconds to seconds (longer when
# a backlog or an open circuit holds it, hence minutes).
DEFAULT_CREATION_GRACE_SECONDS = 300.0

# The entities whose first audit rows the relay writes (sql/0019).
_CREATED_BY_RELAY = ("intent", "payment")


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One row of outbox.audit_log; ``before``/``after`` are the jsonb as PostgreSQL renders it."""

    id: int
    at: datetime
    actor: str
    entity: str
    entity_id: str
    payment_id: str | None
    operation: str
    reason: str | None
    before: str | None
    after: str | None
    chain_seq: int
    prev_hash: bytes | None
    hash: bytes


@dataclass(frozen=True, slots=True)
class Break:
    kind: BreakKind
    entity: str
    entity_id: str
    row_id: int | None  # the audit row named; None when the whole chain is missing
    chain_seq: int | None
    message: str

    def describe(self) -> str:
        """``audit row 45 (payment a0, chain_seq 3) edited: ...``"""
        if self.row_id is None:
            return f"{self.entity} {self.entity_id} {self.kind}: {self.message}"
        return (
            f"audit row {self.row_id} ({self.entity} {self.entity_id}, chain_seq "
            f"{self.chain_seq}) {self.kind}: {self.message}"
        )


def _timestamp(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(row: AuditRow) -> bytes:
    """The bytes a row's hash is taken over; outbox.audit_canonical builds the same."""
    fields = (
        str(row.id),
        _timestamp(row.at),
        row.actor,
        row.entity,
        row.entity_id,
        row.payment_id,
        row.operation,
        row.reason,
        row.before,
        row.after,
        str(row.chain_seq),
        row.prev_hash.hex() if row.prev_hash is not None else None,
    )
    lines = ["-" if f is None else f"{len(f)}:{f}" for f in fields]
    return (FORMAT_VERSION + "".join("\n" + line for line in lines)).encode("utf-8")


def row_hash(row: AuditRow) -> bytes:
    return hashlib.sha256(canonical(row)).digest()


def _where(row: AuditRow) -> str:
    return f"audit row {row.id} ({row.entity} {row.entity_id}, chain_seq {row.chain_seq})"


def verify_chain(rows: Sequence[AuditRow]) -> Break | None:
    """The first broken link of one chain (its rows in chain_seq order), or None.

    Links are checked before contents, so an inserted row that was hashed correctly is
    named as inserted rather than blamed on the row after it.
    """
    if not rows:
        return None
    position = {row.hash: k for k, row in enumerate(rows)}
    for k, row in enumerate(rows):
        previous = rows[k - 1] if k else None
        expected_prev = previous.hash if previous else None
        expected_seq = previous.chain_seq + 1 if previous else 1
        if row.prev_hash != expected_prev:
            j = position.get(row.prev_hash) if row.prev_hash is not None else None
            if j is not None and j < k - 1:
                first, last = rows[j + 1], rows[k - 1]
                span = f"audit row {first.id}" + (f" to {last.id}" if last is not first else "")
                return _break(
                    "inserted",
                    first,
                    f"{span} sit(s) between audit rows {rows[j].id} and {row.id}, which link "
                    "to each other directly: inserted after the fact",
                )
            if j is not None and j >= k:
                return _break(
                    "reordered",
                    row,
                    f"{_where(row)} links to audit row {rows[j].id}, which comes after it: "
                    "rows were reordered",
                )
            if row.chain_seq > expected_seq:
                missing = (
                    f"chain_seq {expected_seq}"
                    if row.chain_seq == expected_seq + 1
                    else f"chain_seq {expected_seq} to {row.chain_seq - 1}"
                )
                return _break(
                    "deleted",
                    row,
                    f"{_where(row)} links to a row that is not there; {missing} is missing: "
                    "deleted",
                )
            if previous is not None and row_hash(previous) != previous.hash:
                return _break(
                    "edited", previous, f"{_where(previous)} does not match its hash: edited"
                )
            if previous is not None:
                return _break(
                    "edited",
                    previous,
                    f"{_where(previous)} was changed and given a new hash: {_where(row)} "
                    "still links to its original hash",
                )
            return _break(
                "edited", row, f"{_where(row)} starts the chain but links to a previous row"
            )
        if previous is not None and row.id < previous.id:
            return _break(
                "reordered",
                row,
                f"{_where(row)} has a smaller id than the row before it ({previous.id}): "
                "rows were reordered",
            )
        if row.chain_seq != expected_seq:
            return _break(
                "edited", row, f"{_where(row)} should be at chain_seq {expected_seq}: edited"
            )
        if row_hash(row) != row.hash:
            return _break("edited", row, f"{_where(row)}: its fields do not match its hash: edited")
    return None


def _break(kind: BreakKind, row: AuditRow, message: str) -> Break:
    return Break(kind, row.entity, row.entity_id, row.id, row.chain_seq, message)


def fold(rows: Iterable[AuditRow]) -> dict[str, Any]:
    """The audited columns as the chain says they are now: each row's ``after`` applied."""
    state: dict[str, Any] = {}
    for row in rows:
        if row.after is not None:
            state.update(json.loads(row.after))
    return state


def _digest(doc: dict[str, Any]) -> bytes:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).digest()


# -- the database walk -----------------------------------------------------------------


@dataclass
class VerifyReport:
    rows: int = 0
    chains: int = 0
    live_rows_checked: int = 0
    awaiting_creation: int = 0  # younger than the grace, no creation rows yet
    creation_grace_seconds: float = DEFAULT_CREATION_GRACE_SECONDS
    breaks: list[Break] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.breaks

    @property
    def first_break(self) -> Break | None:
        """The break with the lowest audit row id: where the trail first went wrong."""
        if not self.breaks:
            return None
        return min(self.breaks, key=lambda b: (b.row_id is None, b.row_id or 0))

    def to_json(self) -> dict[str, Any]:
        first = self.first_break
        return {
            "intact": self.intact,
            "rows": self.rows,
            "chains": self.chains,
            "live_rows_checked": self.live_rows_checked,
            "awaiting_creation": self.awaiting_creation,
            "creation_grace_seconds": self.creation_grace_seconds,
            "first_break": asdict(first) if first else None,
            "breaks": [asdict(b) for b in self.ordered_breaks()],
        }

    def ordered_breaks(self) -> list[Break]:
        """Every break by audit row id, rowless breaks (missing chains) last."""
        return sorted(self.breaks, key=_break_order)


def _break_order(b: Break) -> tuple[bool, int, str, str]:
    return (b.row_id is None, b.row_id or 0, b.entity, b.entity_id)


# Every audited entity has a live row to compare its chain's end with (queries.sql,
# audit_live_documents): without it, a chain's last rows could be deleted, or rewritten
# and re-hashed, or a forged row appended, and every link would still hold. None of these
# rows is ever deleted (the relay archives intents, which stay compared).
_TAIL_CHECKED = (
    "intent",
    "payment",
    "janitor_check",
    "reconciliation_run",
    "reconciliation_exception",
    "reconciliation_action",
    "fx_rate",
    "fx_posting",
    "provider",  # sql/0050
    "routing_rule",  # sql/0051
    "flow",  # sql/0072 (its steps are in its document)
    "authorization_policy",  # sql/0084
)
# Rows that are never deleted by anyone (sql/0027, sql/0050, sql/0051, sql/0072 refuse it): a
# chain of one of these entities without its live row means the row was removed behind the
# trigger's back.
_NEVER_DELETED = (
    "fx_rate",
    "fx_posting",
    "provider",
    "routing_rule",
    "flow",
    "authorization_policy",
)


def _before_open_claim(entity: str, doc: dict[str, Any]) -> dict[str, Any]:
    """An intent in flight as its chain last saw it: a claim writes no audit row (sql/0021),
    the row that ends the claim records it. So a live intent may be exactly one claim
    ahead of its chain (in_flight, one more attempt, claimed_by set) and no more."""
    if entity != "intent" or doc.get("status") != "in_flight" or doc.get("claimed_by") is None:
        return doc
    attempts = doc.get("attempts")
    if not isinstance(attempts, int) or attempts < 1:
        return doc
    return {**doc, "status": "pending", "attempts": attempts - 1, "claimed_by": None}


def _chains(rows: Iterable[AuditRow]) -> Iterator[list[AuditRow]]:
    chain: list[AuditRow] = []
    for row in rows:
        if chain and (row.entity, row.entity_id) != (chain[0].entity, chain[0].entity_id):
            yield chain
            chain = []
        chain.append(row)
    if chain:
        yield chain


def _missing_creation(chain: Sequence[AuditRow]) -> Break | None:
    """An intent's or payment's chain must start with its creation (``insert``) row, or
    with the baseline of a row older than the trail."""
    first = chain[0]
    # 'baseline': sql/0005's first row of a row that existed before the trail did.
    if first.entity not in _CREATED_BY_RELAY or first.operation in ("insert", "baseline"):
        return None
    return _break(
        "missing_creation",
        first,
        f"the chain of {first.entity} {first.entity_id} starts with a {first.operation!r} row, "
        "not its creation row: the creation rows were deleted, or it was changed before any "
        "relay or audit trigger saw it",
    )


def _no_creation_rows(entity: str, entity_id: str, created_at: datetime | None) -> Break:
    when = f"inserted at {_timestamp(created_at)}" if created_at is not None else "inserted"
    return Break(
        "missing_creation",
        entity,
        entity_id,
        None,
        None,
        f"{entity} {entity_id} was {when}, longer ago than the creation grace, and has no "
        "audit rows: the relay writes them in its first transaction that touches the intent "
        "(claim or promotion), so no relay has claimed it yet (is a relay serving its "
        "provider running? `outbox-relay status`), or its chain was deleted",
    )


def verify_database(
    conninfo: str,
    *,
    creation_grace_seconds: float = DEFAULT_CREATION_GRACE_SECONDS,
    progress: Callable[[str], None] = lambda _line: None,
) -> VerifyReport:
    """Walk every chain, then compare the end of each audited row's chain with the row.

    Both walks read one snapshot (REPEATABLE READ), so a claim committing in between cannot
    show a live row whose new audit rows the first walk did not see.
    """
    report = VerifyReport(creation_grace_seconds=creation_grace_seconds)
    tails: dict[tuple[str, str], tuple[AuditRow, bytes] | None] = {}
    with psycopg.connect(conninfo) as conn:
        conn.read_only = True
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction():
            with conn.cursor(name="outbox_audit_verify") as cur:
                cur.itersize = 5_000
                cur.execute(QUERIES["audit_rows_by_chain"])
                rows = (AuditRow(*record) for record in cur)
                for chain in _chains(rows):
                    report.chains += 1
                    report.rows += len(chain)
                    found = verify_chain(chain) or _missing_creation(chain)
                    if found is not None:
                        report.breaks.append(found)
                    if chain[0].entity in _TAIL_CHECKED:
                        # A broken chain's state proves nothing: its break is reported instead.
                        tails[(chain[0].entity, chain[0].entity_id)] = (
                            None if found else (chain[-1], _digest(fold(chain)))
                        )
                    if report.chains % 10_000 == 0:
                        progress(f"checked {report.rows} audit rows in {report.chains} chains")
            progress(
                f"checked {report.rows} audit rows in {report.chains} chains; comparing live rows"
            )
            with conn.cursor(name="outbox_audit_live") as cur:
                cur.itersize = 5_000
                cur.execute(
                    QUERIES["audit_live_documents"],
                    {"creation_grace_seconds": creation_grace_seconds},
                )
                for entity, entity_id, doc, created_at, untouched, young in cur:
                    report.live_rows_checked += 1
                    key = (entity, entity_id)
                    if key in tails or not untouched:
                        _compare_live_row(report, tails, entity, entity_id, doc)
                    elif young:
                        report.awaiting_creation += 1
                    else:
                        report.breaks.append(_no_creation_rows(entity, entity_id, created_at))
                    if report.live_rows_checked % 10_000 == 0:
                        progress(f"compared {report.live_rows_checked} live rows")
    for (entity, entity_id), tail in sorted(tails.items()):
        if entity in _NEVER_DELETED and tail is not None:
            last = tail[0]
            report.breaks.append(
                _tail_mismatch(
                    entity,
                    entity_id,
                    last,
                    "but the row itself is gone: it was deleted with its triggers off",
                )
            )
    return report


def _tail_mismatch(entity: str, entity_id: str, last: AuditRow, why: str) -> Break:
    return Break(
        "tail_mismatch",
        entity,
        entity_id,
        last.id,
        last.chain_seq,
        f"the chain of {entity} {entity_id} ends at audit row {last.id} {why}",
    )


def _compare_live_row(
    report: VerifyReport,
    tails: dict[tuple[str, str], tuple[AuditRow, bytes] | None],
    entity: str,
    entity_id: str,
    doc: dict[str, Any],
) -> None:
    key = (entity, entity_id)
    if key not in tails:
        report.breaks.append(
            Break(
                "missing_chain",
                entity,
                entity_id,
                None,
                None,
                f"{entity} {entity_id} exists but has no audit rows: its chain "
                "was deleted, or it was written with the audit trigger off",
            )
        )
        return
    tail = tails.pop(key)
    if tail is None:
        return
    last, digest = tail
    if digest != _digest(doc) and digest != _digest(_before_open_claim(entity, doc)):
        report.breaks.append(
            _tail_mismatch(
                entity,
                entity_id,
                last,
                f"(chain_seq {last.chain_seq}) in a state that differs "
                "from the live row: later audit rows were deleted, or the row was changed with "
                "the audit trigger off",
            )
        )
