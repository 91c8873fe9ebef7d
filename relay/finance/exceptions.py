"""Working reconciliation exceptions: deterministic operator commands, four eyes on money.

* ``accept ID --reason`` closes an exception without moving money (a known fee dispute,
  a charge made in the provider's dashboard...);
* ``refund``, ``void`` and ``redrive`` move money, so each only *asks*: the command is
  recorded with its operator and waits in outbox.reconciliation_actions;
* ``approve ACTION`` by a second, different operator executes it: a refund or a void
  becomes an ordinary intent of the payment (the relay sends it exactly once, under its
  own idempotency key), a re-drive sends the payment's dead intents again under their own
  keys. "Different" means a different name *and* a different database login: the name is
  only what the client says, so the action row also records the login (session_user) of
  its requester and of its approver, set by a trigger (sql/0014), and the database refuses
  an approval by the requester's name or from the requester's login (CHECK constraints),
  so no client can skip the rule.

Every command names its operator; the audit trail records each change as
``operator:<name>``. What a command will do is decided before it asks and printed, so the
approver approves exactly that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg

from relay.domain.money import format_minor
from relay.infra.queries import QUERIES

__all__ = [
    "AWAITING_A_PERSON",
    "ExceptionCommandError",
    "accept",
    "approve",
    "list_exceptions",
    "request_action",
    "validate_operator",
]

_OPERATOR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")
MONEY_MOVING = ("refund", "void", "redrive")
# What `exceptions list` shows by default: every exception that waits for someone, the
# ones to work and the ones whose money move waits for a second operator's approval.
AWAITING_A_PERSON = ("open", "awaiting_approval")


class ExceptionCommandError(Exception):
    """The command was refused; the message says why and what to do instead."""

    code = "exception_command_refused"


def validate_operator(name: str) -> str:
    if not _OPERATOR.match(name):
        raise ExceptionCommandError(
            f"operator {name!r} is not a name: use 1-100 letters, digits, '.', '_', '@' or '-'"
        )
    return name


def _as_operator(conn: psycopg.Connection, operator: str) -> str:
    actor = f"operator:{validate_operator(operator)}"
    conn.execute(QUERIES["set_actor"], {"actor": actor, "reason": None})
    return actor


COLUMNS = (
    "id",
    "provider",
    "kind",
    "status",
    "payment_id",
    "match_key",
    "currency",
    "internal_amount_minor",
    "provider_amount_minor",
    "fee_minor",
    "expected_fee_minor",
    "delta_minor",
    "times_seen",
    "occurred_at",
    "detail",
    "resolution",
    "resolution_reason",
    "resolved_by",
    "resolved_at",
    "pending_action",
    "exponent",
)


def list_exceptions(
    conninfo: str,
    *,
    statuses: list[str] | None,
    provider: str | None = None,
    kind: str | None = None,
    limit: int = 1000,
) -> list[dict[str, Any]]:
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            QUERIES["exceptions_list"],
            {"statuses": statuses, "provider": provider, "kind": kind, "limit": limit},
        ).fetchall()
    return [dict(zip(COLUMNS, row, strict=True)) for row in rows]


def _locked_exception(conn: psycopg.Connection, exception_id: int) -> tuple[Any, ...]:
    row = conn.execute(QUERIES["exception_for_update"], {"id": exception_id}).fetchone()
    if row is None:
        raise ExceptionCommandError(f"there is no reconciliation exception {exception_id}")
    return tuple(row)


def accept(conninfo: str, exception_id: int, *, operator: str, reason: str) -> None:
    if not reason.strip():
        raise ExceptionCommandError("accepting needs a reason (--reason)")
    with psycopg.connect(conninfo) as conn, conn.transaction():
        actor = _as_operator(conn, operator)
        _, _, _, status, *_ = _locked_exception(conn, exception_id)
        if status != "open":
            raise ExceptionCommandError(
                f"exception {exception_id} is {status}; only an open exception can be accepted"
            )
        conn.execute(
            QUERIES["exception_accept"], {"id": exception_id, "reason": reason, "operator": actor}
        )


@dataclass(frozen=True, slots=True)
class Requested:
    action_id: int
    exception_id: int
    action: str
    payment_id: str
    amount_minor: int | None
    currency: str | None
    exponent: int | None = None  # the currency's, from outbox.currencies

    def describe(self) -> str:
        if self.action == "refund" and self.amount_minor is not None:
            amount = format_minor(self.amount_minor, self.currency or "?", self.exponent)
            return f"refund {amount} of payment {self.payment_id}"
        if self.action == "void":
            return f"void the open authorisation of payment {self.payment_id}"
        return f"re-drive the dead intents of payment {self.payment_id} under their own keys"


def request_action(
    conninfo: str,
    exception_id: int,
    action: str,
    *,
    operator: str,
    reason: str,
    amount_minor: int | None = None,
) -> Requested:
    """Record a money-moving command; it runs only once a second operator approves it."""
    if action not in MONEY_MOVING:
        raise ExceptionCommandError(f"{action} is not one of {', '.join(MONEY_MOVING)}")
    if not reason.strip():
        raise ExceptionCommandError(f"a {action} needs a reason (--reason)")
    if amount_minor is not None and amount_minor <= 0:
        raise ExceptionCommandError(
            f"--amount must be a positive number of minor units, got {amount_minor}"
        )
    with psycopg.connect(conninfo) as conn, conn.transaction():
        name = validate_operator(operator)
        _as_operator(conn, name)
        _, _, kind, status, payment_id, delta, currency, exponent = _locked_exception(
            conn, exception_id
        )
        if status != "open":
            raise ExceptionCommandError(
                f"exception {exception_id} is {status}; commands apply to open exceptions"
            )
        if payment_id is None:
            raise ExceptionCommandError(
                f"exception {exception_id} ({kind}) belongs to no payment in outbox.payments: "
                "work it at the provider, then accept it with a reason"
            )
        if action == "refund":
            if amount_minor is None:
                if kind == "amount_mismatch" and delta > 0:
                    amount_minor = int(delta)  # the provider took this much more than asked
                else:
                    raise ExceptionCommandError(
                        f"say how much to refund: --amount in minor units of {currency}"
                    )
        elif amount_minor is not None:
            raise ExceptionCommandError(f"a {action} takes no --amount")
        if (
            action == "redrive"
            and not conn.execute(
                QUERIES["action_dead_intents"], {"payment_id": payment_id}
            ).fetchall()
        ):
            raise ExceptionCommandError(f"payment {payment_id} has no dead intent to re-drive")
        row = conn.execute(
            QUERIES["action_request"],
            {
                "exception_id": exception_id,
                "payment_id": payment_id,
                "action": action,
                "amount_minor": amount_minor,
                "reason": reason,
                "operator": name,
            },
        ).fetchone()
    assert row is not None
    return Requested(
        int(row[0]), exception_id, action, str(payment_id), amount_minor, currency, exponent
    )


@dataclass(frozen=True, slots=True)
class Executed:
    action_id: int
    exception_id: int
    action: str
    intent_ids: list[int]


def approve(conninfo: str, action_id: int, *, operator: str) -> Executed:
    """Execute a requested action as a second, different operator."""
    with psycopg.connect(conninfo) as conn, conn.transaction():
        name = validate_operator(operator)
        actor = _as_operator(conn, name)
        row = conn.execute(QUERIES["action_for_update"], {"id": action_id}).fetchone()
        if row is None:
            raise ExceptionCommandError(f"there is no reconciliation action {action_id}")
        (
            _,
            exception_id,
            payment_id,
            action,
            amount,
            reason,
            requested_by,
            approved_by,
            approved_at,
            status,
            _,
            _,
            requested_login,
            login,
        ) = row
        if status != "awaiting_approval":
            raise ExceptionCommandError(
                f"action {action_id} was already executed (approved by {approved_by} at "
                f"{approved_at:%Y-%m-%d %H:%M:%S %Z})"
            )
        if name == requested_by:
            raise ExceptionCommandError(
                f"action {action_id} was requested by {requested_by}; it moves money, so a "
                "second, different operator must approve it"
            )
        if requested_login is not None and requested_login == login:
            raise ExceptionCommandError(
                f"action {action_id} was requested from the database login {login!r}, the one "
                "you are connected as; it moves money, so it must be approved from a different "
                "login: approve it from your own database login (RELAY_DATABASE_URL naming "
                "your user, a member of outbox_operator)"
            )
        if action == "redrive":
            dead = [
                int(r[0])
                for r in conn.execute(QUERIES["action_dead_intents"], {"payment_id": payment_id})
            ]
            if not dead:
                raise ExceptionCommandError(f"payment {payment_id} has no dead intent any more")
            intent_ids = [
                int(r[0])
                for r in conn.execute(QUERIES["action_redrive"], {"ids": dead, "operator": name})
            ]
            # retry_dead_intents names the operator itself; keep ours for the rest.
            _as_operator(conn, name)
        else:
            created = conn.execute(
                QUERIES["action_insert_intent"],
                {
                    "action": action,
                    "amount_minor": amount,
                    "payment_id": payment_id,
                    "exception_id": exception_id,
                    "action_id": action_id,
                },
            ).fetchone()
            if created is None:
                raise ExceptionCommandError(f"payment {payment_id} no longer exists")
            intent_ids = [int(created[0])]
        conn.execute(
            QUERIES["action_executed"],
            {"id": action_id, "operator": name, "intent_id": intent_ids[0] if intent_ids else None},
        )
        conn.execute(
            QUERIES["exception_resolve"],
            {"id": exception_id, "resolution": action, "reason": reason, "operator": actor},
        )
    return Executed(action_id, int(exception_id), str(action), intent_ids)
