"""The ``--operator`` option of the operator commands, and who acts when it is left out."""

from __future__ import annotations

import argparse

from relay.operations.operators import check_operator_name, default_operator, parse_age

__all__ = ["add_operator_argument", "age", "operator_name", "operator_of"]


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
