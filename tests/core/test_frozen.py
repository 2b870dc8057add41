"""`@frozen` classes answer as real frozen, slotted dataclasses do.

Each class below has a twin made by ``dataclasses.dataclass(frozen=True,
slots=True)``; for any field values, the two agree on equality (with one
another's kind), hashing and text, and both refuse changes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioflow.config import Config
from trioflow.core import worker_events
from trioflow.core.failures import Cancelled, DataLost
from trioflow.core.frozen import frozen

twin = dataclasses.dataclass(frozen=True, slots=True)


@frozen
class Empty:
    pass


@twin
class EmptyTwin:
    pass


@frozen
class One:
    key: str


@twin
class OneTwin:
    key: str


@frozen
class Three:
    key: str
    n: Any
    tags: tuple = ()


@twin
class ThreeTwin:
    key: str
    n: Any
    tags: tuple = ()


@frozen
class Hidden:
    key: str
    secret: str = dataclasses.field(repr=False, default="")


@twin
class HiddenTwin:
    key: str
    secret: str = dataclasses.field(repr=False, default="")


def named_as(twin_obj: Any, name: str) -> str:
    """The twin's text with the twin's class name replaced."""
    return repr(twin_obj).replace(type(twin_obj).__qualname__, name, 1)


values = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.text(max_size=5), st.tuples(st.integers()))


@given(st.text(max_size=5), values, st.text(max_size=5), values)
def test_equality_hash_and_text_match_a_dataclass(key_a, n_a, key_b, n_b):
    a, b = Three(key_a, n_a), Three(key_b, n_b)
    ta, tb = ThreeTwin(key_a, n_a), ThreeTwin(key_b, n_b)
    assert (a == b) is (ta == tb)
    assert (a != b) is (ta != tb)
    assert (a == a) is (ta == ta)  # a NaN field: equal to itself, as a tuple is
    assert hash(a) == hash(ta)
    assert repr(a) == named_as(ta, "Three")


@given(st.text(max_size=5), st.text(max_size=5))
def test_a_single_field_compares_as_a_tuple(key_a, key_b):
    assert (One(key_a) == One(key_b)) is (OneTwin(key_a) == OneTwin(key_b))
    assert hash(One(key_a)) == hash(OneTwin(key_a))
    assert repr(One(key_a)) == named_as(OneTwin(key_a), "One")


def test_a_nan_field_makes_an_object_equal_to_itself_only():
    nan = math.nan
    assert One(nan) == One(nan)  # the same float object: equal, as in a tuple
    assert One(nan) != One(float("nan"))
    assert (OneTwin(nan) == OneTwin(nan)) and (OneTwin(nan) != OneTwin(float("nan")))


def test_no_fields():
    assert Empty() == Empty()
    assert hash(Empty()) == hash(EmptyTwin())
    assert repr(Empty()) == "Empty()"


def test_another_class_with_the_same_fields_is_not_equal():
    assert DataLost("k") != Cancelled("k")
    assert One("k") != OneTwin("k")
    assert One("k").__eq__(OneTwin("k")) is NotImplemented


def test_a_subclass_is_not_equal_to_its_base():
    base = worker_events.WorkerEvent("s")
    sub = worker_events.MemoryPaused("s")
    assert base != sub and sub != base


def test_unhashable_fields_make_it_unhashable_as_a_dataclass_does():
    with pytest.raises(TypeError):
        hash(Three("k", [1]))
    with pytest.raises(TypeError):
        hash(ThreeTwin("k", [1]))


def test_fields_kept_out_of_the_text_stay_out():
    assert repr(Hidden("k", "token")) == named_as(HiddenTwin("k", "token"), "Hidden")
    assert "token" not in repr(Hidden("k", "token"))
    assert Hidden("k", "a") != Hidden("k", "b")  # still compared


def test_it_refuses_changes_and_has_no_dict():
    one = One("k")
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.key = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del one.key  # type: ignore[misc]
    assert not hasattr(one, "__dict__")


def test_the_cores_and_the_config_are_made_with_it():
    for cls in (worker_events.ComputeRequested, DataLost, Config):
        assert cls.__eq__ is One.__eq__ and dataclasses.is_dataclass(cls)
    assert Config() == Config() and hash(Config()) == hash(Config())
    assert Config() != Config(heartbeat_interval=0.25)
    assert dataclasses.replace(Config(), heartbeat_interval=0.25) == Config(heartbeat_interval=0.25)
