"""The ``--operator`` option of the operator commands, and who acts when it is left out."""

from __future__ import annotations

import argparse

from relay.operations.operators import check_operator_name, default_operator, parse_age

__all__ = [
    "EXIT_APPROVAL_REQUESTED",
    "add_operator_argument",
    "age",
    "approval_requested",
    "operator_name",
    "operator_of",
    "positive",
]

# A change or override recorded for a second operator, not applied (sql/0052): the exit
# status of every operator command that records one.
EXIT_APPROVAL_REQUESTED = 3


def operator_name(value: str) -> str:
    """An argparse type: the operator's name, stripped (argparse names the option on error)."""
    try:
        return check_operator_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def age(text: str) -> float:
    """An argparse type: an age such as ``45s`` or ``1h30m``, in seconds."""
    try:
        return parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a limit, an id, a step's number)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def add_operator_argument(parser: argparse.ArgumentParser) -> None:
    """``--operator NAME``, checked as a name; None when left out (see :func:`operator_of`)."""
    parser.add_argument(
        "--operator",
        type=operator_name,
        default=None,
        metavar="NAME",
        help="who acts, recorded in the audit trail (default: $RELAY_OPERATOR, else your "
        "user name)",
    )


def operator_of(args: argparse.Namespace) -> str:
    """--operator, else RELAY_OPERATOR, else the OS user: as every operator command."""
    return str(args.operator or default_operator())


def approval_requested(exc: Exception) -> int:
    """Say that the change waits for a second operator (the exception names the request and
    the command that applies it); :data:`EXIT_APPROVAL_REQUESTED`."""
    print(f"not applied yet: {exc}")
    return EXIT_APPROVAL_REQUESTED
