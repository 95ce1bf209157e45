"""Records: which cached results may be served as one shared object.

An in-process backend keeps a record by reference; it may serve many sessions
at once only if every value it hands out is immutable (a mutable value would
let one session's in-place change show in another's result).
"""

from __future__ import annotations

import datetime
import decimal
import enum
import uuid
import zoneinfo
from typing import Any

import pytest
from sqlalchemy.engine.result import SimpleResultMetaData

from sqla_cachelayer.records import Record, record_is_shareable


class Color(enum.Enum):
    RED = 1


def _objects_record(*values: tuple[Any, ...], layouts: int = 1) -> Record:
    objects = [(object, ("k", (i,), None), i % layouts, v, None) for i, v in enumerate(values)]
    return Record(
        metadata=SimpleResultMetaData(["x"]),
        attributes={},
        scalars_source=True,
        rows=list(range(len(values))),
        entity_positions=(0,),
        layouts=[("a", "b")] * layouts,
        objects=objects,
        seq=1,
        tables=("t",),
        created=0.0,
    )


def _rows_record(rows: list[Any], scalars: bool = False) -> Record:
    return Record(
        metadata=SimpleResultMetaData(["x"]),
        attributes={},
        scalars_source=scalars,
        rows=rows,
        entity_positions=(),
        layouts=[],
        objects=[],
        seq=1,
        tables=("t",),
        created=0.0,
    )


NAIVE = datetime.datetime(2026, 1, 2, 3, 4, 5)
UTC = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
ZONED = datetime.datetime(2026, 1, 2, tzinfo=zoneinfo.ZoneInfo("UTC"))

IMMUTABLE = [
    1,
    2.5,
    "s",
    b"b",
    True,
    None,
    decimal.Decimal("1.10"),
    datetime.date(2026, 1, 1),
    datetime.timedelta(seconds=3),
    uuid.UUID(int=7),
    NAIVE,
    UTC,
    datetime.time(12, 0),
    Color.RED,
    (1, "a", (2, None)),
    frozenset({1, 2}),
]
MUTABLE = [
    {"tags": ["a"]},
    ["a"],
    bytearray(b"x"),
    (1, ["nested"]),
    ZONED,  # a tzinfo we do not know to be immutable
    {1, 2},
]


@pytest.mark.parametrize("value", IMMUTABLE, ids=repr)
def test_immutable_values_are_shareable_in_every_position(value: Any) -> None:
    assert record_is_shareable(_objects_record((value, 1), (None, 2), (value, 3)))
    assert record_is_shareable(_objects_record((value, 1), (1, value), layouts=2))
    assert record_is_shareable(_rows_record([(value, 1), (None, 2)]))
    assert record_is_shareable(_rows_record([value, None, value], scalars=True))


@pytest.mark.parametrize("value", MUTABLE, ids=repr)
def test_one_mutable_value_anywhere_makes_the_record_private(value: Any) -> None:
    # among many immutable values, in the last row, so a check that stops
    # early or looks at one row only would miss it
    many = [(i, NAIVE) for i in range(50)]
    assert not record_is_shareable(_objects_record(*many, (2, value)))
    assert not record_is_shareable(_objects_record(*many, (2, value), layouts=2))
    assert not record_is_shareable(_rows_record([*many, (2, value)]))
    assert not record_is_shareable(_rows_record([NAIVE, None, value], scalars=True))
    # mixed with datetimes in the same column
    assert not record_is_shareable(_rows_record([(NAIVE,), (None,), (value,)]))
    # few rows (checked value by value rather than by column)
    assert not record_is_shareable(_objects_record((1, NAIVE), (2, value)))
    assert not record_is_shareable(_rows_record([(1, NAIVE), (2, value)]))
    assert not record_is_shareable(_rows_record([value], scalars=True))
    # many plain scalars
    assert not record_is_shareable(_rows_record([*range(50), value], scalars=True))


def test_empty_results_are_shareable() -> None:
    assert record_is_shareable(_rows_record([]))
    assert record_is_shareable(_rows_record([], scalars=True))
