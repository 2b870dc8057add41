"""`@frozen`: the immutable value classes of trioflow (events, instructions,
failures, `Config`), made cheaper to create at import.

Each is a frozen, slotted dataclass with value equality, exactly as
``dataclasses.dataclass(frozen=True, slots=True)`` would make it. The
difference is where three of its methods come from. On Python 3.11 a
dataclass compiles every method it generates from source text when the
class is created, some 50 us apiece, six methods a class. A worker process
creates some thirty such classes while it starts, before it can connect
(docs/performance.md, W9). `__eq__`, `__hash__` and `__repr__` do not need
code of their own per class: here they are three shared functions that
read the fields' values as one tuple through a getter made once per class
(an `operator.attrgetter`). They answer as the generated
ones do (same tuples compared and hashed, same text), which
tests/core/test_frozen.py checks against real dataclasses. `__init__` and
the frozen `__setattr__` / `__delattr__` are still the dataclass's own.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T", bound=type)


def frozen(cls: T) -> T:
    """`dataclasses.dataclass(frozen=True, slots=True)`, created faster."""
    cls = dataclasses.dataclass(frozen=True, slots=True, eq=False, repr=False)(cls)
    cls._field_values = staticmethod(_field_values([field.name for field in dataclasses.fields(cls)]))
    cls.__eq__ = _eq
    cls.__hash__ = _hash
    cls.__repr__ = _repr
    return cls


def _field_values(names: list[str]) -> Callable[[Any], tuple]:
    """The fields' values as one tuple: what a dataclass compares and hashes."""
    if len(names) >= 2:
        return operator.attrgetter(*names)  # a tuple already
    if names:
        value = operator.attrgetter(names[0])
        return lambda record: (value(record),)
    return lambda record: ()


def _eq(self: Any, other: Any) -> Any:
    if other.__class__ is not self.__class__:
        return NotImplemented
    values = self._field_values
    return values(self) == values(other)


def _hash(self: Any) -> int:
    return hash(self._field_values(self))


def _repr(self: Any) -> str:
    shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr)
    return f"{self.__class__.__qualname__}({shown})"
