"""Rows read by column name, at the cost of reading them by position.

psycopg's ``class_row`` and ``dict_row`` build a dict for every row; on the claim and the
write-back, which read a hundred rows per batch, that costs more than the positional
unpacking it replaces (``benchmarks/row_building.py``). :func:`columns_row` finds the
columns by name once per result instead, then calls its builder positionally. Guarantees,
each tested:

* each parameter of the builder receives the column of the same name, wherever the
  statement puts it; columns no parameter names are ignored, unless the builder takes
  ``**columns``, which then receives them by name;
* a parameter with a default whose column the result lacks receives its default;
* a parameter without a default whose column the result lacks raises ``KeyError`` naming
  the builder, the parameter and the columns the result has, before any row is built.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any, TypeVar

from psycopg import AsyncCursor
from psycopg.rows import AsyncRowFactory, RowMaker, no_result

__all__ = ["columns_row"]

R = TypeVar("R")

_BY_NAME = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def columns_row(build: Callable[..., R]) -> AsyncRowFactory[R]:
    """A row factory calling ``build`` with each row's columns matched to its parameters.

    ``build``'s named parameters must be positional (not keyword-only): a row is passed
    positionally, in their order, so no dict is made per row unless ``build`` takes
    ``**columns``.
    """
    parameters = list(inspect.signature(build).parameters.values())
    named = [p for p in parameters if p.kind in _BY_NAME]
    takes_rest = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    unusable = [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
    if unusable:
        raise TypeError(f"{build.__qualname__}: keyword-only parameters {unusable} cannot be read")
    wanted = {p.name for p in named}

    def factory(cursor: AsyncCursor[Any]) -> RowMaker[R]:
        if cursor.description is None:
            return no_result
        names = [column.name for column in cursor.description]
        position = {name: index for index, name in enumerate(names)}
        absent = [p for p in named if p.name not in position]
        for parameter in absent:
            if parameter.default is inspect.Parameter.empty:
                raise KeyError(
                    f"{build.__qualname__} reads column {parameter.name!r}; "
                    f"the statement returns {names}"
                )
        # An absent column reads its parameter's default from past the row's end.
        defaults = tuple(p.default for p in absent)
        slots = [
            position[p.name] if p.name in position else len(names) + absent.index(p) for p in named
        ]
        pick = _picker(slots)
        rest = [(name, index) for name, index in position.items() if name not in wanted]

        def make(values: Sequence[Any]) -> R:
            row = (*values, *defaults) if defaults else values
            if takes_rest:
                return build(*pick(row), **{name: row[index] for name, index in rest})
            return build(*pick(row))

        return make

    return factory


def _picker(slots: Sequence[int]) -> Callable[[Sequence[Any]], Sequence[Any]]:
    """The values at ``slots``, in order, as a sequence (itemgetter returns one bare)."""
    if not slots:
        return lambda values: ()
    if len(slots) == 1:
        (only,) = slots
        return lambda values: (values[only],)
    return itemgetter(*slots)
