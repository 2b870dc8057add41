"""Pickling user objects: round trips, out-of-band buffers, function caching, errors."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import functools
import hashlib
import re
import threading

import cloudpickle
import numpy as np
import pytest

import trioflow.comm.serialize as serialize
from trioflow.comm.serialize import (
    PROTOCOL,
    Serialized,
    dumps,
    dumps_function,
    function_id,
    loads,
    loads_function,
    verify_function,
)
from trioflow.errors import KilledWorker, SerializationError
from trioflow.protocol import TaskRef

BIG_ARRAY_ELEMENTS = 1_000_000  # 8 MB of float64


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


class CustomError(Exception):
    pass


def module_level_square(x):
    return x * x


# ------------------------------------------------------------ round trips --

PLAIN_VALUES = [
    pytest.param(0, id="zero"),
    pytest.param(-(2**100), id="huge-int"),
    pytest.param(3.25, id="float"),
    pytest.param(1 + 2j, id="complex"),
    pytest.param(None, id="none"),
    pytest.param(True, id="bool"),
    pytest.param("", id="empty-str"),
    pytest.param("héllo wörld ✓", id="unicode-str"),
    pytest.param(b"\x00\xffbytes", id="bytes"),
    pytest.param(bytes(range(256)) * 40_000, id="big-bytes"),
    pytest.param(bytearray(b"x" * 100_000), id="bytearray"),
    pytest.param([1, [2, [3, {"a": (4, 5), "b": {6, 7}}]]], id="nested-containers"),
    pytest.param({"k": frozenset({1, 2}), 3: [None, (), {}]}, id="dict-mixed-keys"),
    pytest.param(Point(1, 2), id="dataclass"),
    pytest.param(datetime.datetime(2024, 2, 29, 12, 30), id="datetime"),
    pytest.param(decimal.Decimal("1.10"), id="decimal"),
]


@pytest.mark.parametrize("value", PLAIN_VALUES)
def test_plain_values_round_trip(value):
    """Every ordinary Python value comes back equal and of the same type."""
    result = loads(dumps(value))
    assert result == value
    assert type(result) is type(value)


ARRAYS = [
    pytest.param(np.arange(10), id="small-int"),
    pytest.param(np.arange(BIG_ARRAY_ELEMENTS, dtype=np.float64), id="big-float"),
    pytest.param(np.asfortranarray(np.arange(12.0).reshape(3, 4)), id="fortran-order"),
    pytest.param(np.arange(20)[::3], id="non-contiguous"),
    pytest.param(np.array(7.5), id="zero-dim"),
    pytest.param(np.zeros(0, dtype=np.int8), id="empty"),
    pytest.param(np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]), id="structured"),
    pytest.param(np.array(["ab", "cde"]), id="unicode"),
    pytest.param(np.array([{"a": 1}, None], dtype=object), id="object-dtype"),
]


@pytest.mark.parametrize("array", ARRAYS)
def test_numpy_arrays_round_trip(array):
    """Arrays of any dtype, order and shape come back with equal data, dtype and shape."""
    result = loads(dumps(array))
    assert result.dtype == array.dtype
    assert result.shape == array.shape
    if array.flags.f_contiguous and not array.flags.c_contiguous:
        assert result.flags.f_contiguous  # Fortran order is kept
    assert np.array_equal(result, array)


def test_lambda_round_trips():
    """A lambda (not importable by name) travels by value and still works."""
    fn = loads(dumps(lambda x, y=2: x * y))
    assert fn(3) == 6


def test_closure_round_trips_with_its_captured_values():
    """A closure carries the values it closed over."""
    offset = 41

    def add_offset(x):
        return x + offset

    assert loads(dumps(add_offset))(1) == 42


@pytest.mark.parametrize(
    "fn, arg, expected",
    [
        pytest.param(module_level_square, 7, 49, id="module-function"),
        pytest.param(len, "abc", 3, id="builtin"),
        pytest.param(functools.partial(pow, 2), 10, 1024, id="partial"),
        pytest.param("-".join, ["a", "b"], "a-b", id="bound-method"),
    ],
)
def test_callables_round_trip(fn, arg, expected):
    """Functions, builtins, partials and bound methods survive a round trip."""
    assert loads(dumps(fn))(arg) == expected


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(ValueError("bad value", 3), id="builtin"),
        pytest.param(CustomError("custom"), id="custom"),
        pytest.param(KilledWorker("x-1", 3, "tcp://127.0.0.1:1"), id="trioflow-error"),
    ],
)
def test_exceptions_round_trip(exc):
    """An exception keeps its type, args and message."""
    result = loads(dumps(exc))
    assert type(result) is type(exc)
    assert result.args == exc.args
    assert str(result) == str(exc)


def test_exception_raised_with_traceback_round_trips():
    """An exception that was actually raised (it has a traceback) still pickles."""
    try:
        raise CustomError("raised")
    except CustomError as caught:
        result = loads(dumps(caught))
    assert isinstance(result, CustomError)
    assert str(result) == "raised"


# ------------------------------------------------------ out-of-band buffers --


def test_large_array_travels_as_out_of_band_buffer():
    """A large array's memory is a separate buffer, not part of the pickle stream."""
    array = np.arange(BIG_ARRAY_ELEMENTS, dtype=np.float64)
    serialized = dumps(array)
    assert len(serialized.buffers) == 1
    assert len(serialized.header) < 1024
    assert memoryview(serialized.buffers[0]).nbytes == array.nbytes
    assert serialized.nbytes == len(serialized.header) + array.nbytes


def test_dumps_does_not_copy_the_array():
    """The out-of-band buffer is a view of the array's own memory."""
    array = np.arange(BIG_ARRAY_ELEMENTS, dtype=np.float64)
    serialized = dumps(array)
    view = np.frombuffer(serialized.buffers[0], dtype=np.float64)
    assert np.shares_memory(view, array)


def test_loads_reuses_a_received_writable_buffer():
    """loads builds the array on top of the buffer it was given: no copy, writable."""
    array = np.arange(BIG_ARRAY_ELEMENTS, dtype=np.float64)
    serialized = dumps(array)
    received = bytearray(serialized.buffers[0])  # what the connection hands over
    result = loads(Serialized(serialized.header, [received]))
    assert np.shares_memory(result, np.frombuffer(received, dtype=np.uint8))
    assert result.flags.writeable
    received[:8] = np.float64(-1.0).tobytes()
    assert result[0] == -1.0


def test_loads_reuses_a_read_only_buffer():
    """A read-only buffer is used in place too; the array is then read-only."""
    array = np.arange(1000, dtype=np.int32)
    serialized = dumps(array)
    received = bytes(serialized.buffers[0])
    result = loads(Serialized(serialized.header, [received]))
    assert np.shares_memory(result, np.frombuffer(received, dtype=np.uint8))
    assert not result.flags.writeable
    assert np.array_equal(result, array)


def test_many_arrays_give_one_buffer_each_in_order():
    """Several arrays in one object become buffers in pickling order."""
    arrays = [np.full(1000, i, dtype=np.int64) for i in range(5)]
    serialized = dumps({"arrays": arrays})
    assert len(serialized.buffers) == 5
    firsts = [np.frombuffer(b, dtype=np.int64)[0] for b in serialized.buffers]
    assert firsts == [0, 1, 2, 3, 4]
    result = loads(serialized)
    assert all(np.array_equal(r, a) for r, a in zip(result["arrays"], arrays, strict=True))


def test_serialized_equality_compares_bytes():
    """Two Serialized with the same bytes are equal whatever buffer types hold them."""
    a = Serialized(b"head", [b"one", bytearray(b"two")])
    b = Serialized(memoryview(b"head"), [memoryview(b"one"), b"two"])
    assert a == b
    assert a != Serialized(b"head", [b"one"])
    assert a.nbytes == 4 + 3 + 3


# --------------------------------------------------------------- functions --


def test_dumps_function_caches_per_function():
    """The same function object is pickled once: the same result object comes back."""

    def fn(x):
        return x

    assert dumps_function(fn) is dumps_function(fn)


def _make_adder(k):
    def add(x):
        return x + k

    return add


def test_equal_bytes_give_equal_ids():
    """Two distinct functions that pickle to the same bytes share an id."""
    first, second = dumps_function(_make_adder(1)), dumps_function(_make_adder(1))
    assert first is not second
    assert first.payload == second.payload
    assert first.function_id == second.function_id


def test_different_bytes_give_different_ids():
    """Functions that pickle differently get different ids."""
    assert dumps_function(_make_adder(1)).function_id != dumps_function(_make_adder(2)).function_id


def test_loads_function_round_trips_and_caches():
    """A function payload loads to a working function, once per distinct payload (whatever holds its bytes)."""
    payload = dumps_function(_make_adder(10)).payload
    fn = loads_function(payload)
    assert fn(5) == 15
    assert loads_function(Serialized(memoryview(bytes(payload.header)))) is fn
    assert loads_function(dumps_function(_make_adder(11)).payload) is not fn


def test_function_id_is_the_blake2b_256_digest_of_the_payload():
    """A function's id is the 64-hex BLAKE2b-256 digest of its pickled bytes (a valid wire function id)."""
    serialized = dumps_function(_make_adder(3))
    assert serialized.function_id == hashlib.blake2b(serialized.payload.header, digest_size=32).hexdigest()
    assert serialized.function_id == function_id(serialized.payload.header)
    assert re.fullmatch("[0-9a-f]{64}", serialized.function_id)
    assert serialized.payload.buffers == ()


def test_verify_function_accepts_the_id_of_its_bytes():
    """A payload received under its own digest is accepted as that function."""
    sent = dumps_function(_make_adder(4))
    received = verify_function(sent.function_id, Serialized(bytearray(sent.payload.header)))
    assert received.function_id == sent.function_id
    assert loads_function(received.payload)(1) == 5


@pytest.mark.parametrize(
    "claimed, payload, reason",
    [
        pytest.param(
            dumps_function(_make_adder(1)).function_id, dumps_function(_make_adder(2)).payload,
            "is not the digest of its bytes", id="another-functions-id",
        ),
        pytest.param("0" * 64, dumps_function(_make_adder(1)).payload, "is not the digest of its bytes", id="made-up-id"),
        pytest.param(
            function_id(b"h"), Serialized(b"h", [b"buffer"]), "arrived with out-of-band buffers", id="with-buffers"
        ),
    ],
)
def test_verify_function_refuses_bytes_under_another_id(claimed, payload, reason):
    """No peer can pass off its own bytes under another function's id, nor send a function with buffers."""
    with pytest.raises(SerializationError, match=reason):
        verify_function(claimed, payload)


class UnhashableCallable:
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, k):
        self.k = k

    def __call__(self, x):
        return x * self.k


def test_unhashable_callable_is_pickled_without_cache():
    """An unhashable callable still serializes (uncached) with a stable id."""
    fn = UnhashableCallable(3)
    first, second = dumps_function(fn), dumps_function(fn)
    assert first is not second
    assert first.function_id == second.function_id
    assert loads_function(first.payload)(2) == 6


def test_function_closing_over_large_array_folds_buffers_in():
    """A function whose closure holds a big array still becomes one payload."""
    data = np.arange(BIG_ARRAY_ELEMENTS, dtype=np.float64)

    def total():
        return float(data.sum())

    serialized = dumps_function(total)
    assert isinstance(serialized.payload, Serialized)
    assert isinstance(serialized.payload.header, bytes)
    assert serialized.payload.buffers == ()
    assert serialized.payload.nbytes > data.nbytes
    assert serialized.function_id == function_id(serialized.payload.header)
    assert loads_function(serialized.payload)() == float(data.sum())


# ------------------------------------------------------------------ errors --


def _generator():
    yield 1


@pytest.mark.parametrize(
    "value, type_name",
    [
        pytest.param(threading.Lock(), "lock", id="lock"),
        pytest.param(_generator(), "generator", id="generator"),
        pytest.param({"nested": [threading.RLock()]}, "RLock", id="nested-rlock"),
    ],
)
def test_unpicklable_objects_raise_serialization_error(value, type_name):
    """An object pickle refuses raises SerializationError naming the offending type."""
    with pytest.raises(SerializationError, match=type_name) as info:
        dumps(value)
    assert "could not serialize" in str(info.value)


def test_unpicklable_closure_raises_from_dumps_function():
    """A function closing over a lock cannot be shipped, and says so."""
    lock = threading.Lock()

    def uses_lock():
        with lock:
            return 1

    with pytest.raises(SerializationError, match="lock"):
        dumps_function(uses_lock)


@pytest.mark.parametrize(
    "serialized",
    [
        pytest.param(Serialized(b"not a pickle"), id="garbage"),
        pytest.param(Serialized(dumps(np.arange(10)).header), id="missing-buffer"),
        pytest.param(
            Serialized(b"\x80\x05\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x0fno_such_module\x94"),
            id="truncated",
        ),
    ],
)
def test_undecodable_bytes_raise_serialization_error(serialized):
    """Bytes that do not unpickle raise SerializationError, not a raw pickle error."""
    with pytest.raises(SerializationError, match="could not deserialize"):
        loads(serialized)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(((5,), {}), id="small-task-arguments"),
        pytest.param({"a": [1, 2.5, None, True], "b": ("x", 3j)}, id="nested-builtins"),
        pytest.param(list(range(17)), id="longer-than-the-plain-check"),
        pytest.param([[[[1]]]], id="deeper-than-the-plain-check"),
        pytest.param((lambda x: x + 1, {}), id="a-lambda-among-builtins"),
        pytest.param(((Point(1, 2),), {}), id="a-dataclass-among-builtins"),
    ],
)
def test_values_round_trip_whichever_pickler_takes_them(value):
    """Builtin-only values (the standard pickler's fast path) and anything else (cloudpickle) come back equal."""
    back = loads(dumps(value))
    if isinstance(value, tuple) and callable(value[0]):
        assert back[0](1) == 2 and back[1] == {}
    else:
        assert back == value


def test_a_function_defined_here_among_builtins_still_travels_by_value():
    """A tuple holding a local function is not 'plain': it is pickled by value, not by a reference the peer lacks."""

    def local(x):
        return x * 3

    serialized = dumps(((local, 1), {}))
    assert b"local" in bytes(serialized.header)
    (fn, arg), _ = loads(serialized)
    assert fn(arg) == 3


def test_the_arguments_of_a_dependent_task_skip_cloudpickle(monkeypatch):
    """References to other tasks' values are plain: such a call takes the standard pickler, and comes back whole."""
    call = ((TaskRef("add-1"), TaskRef("add-2"), 3), {"scale": TaskRef("inc-0")})
    used: list[object] = []
    original = serialize.cloudpickle.dumps

    def recording_dumps(obj, *args, **kwargs):
        used.append(obj)
        return original(obj, *args, **kwargs)

    monkeypatch.setattr(serialize.cloudpickle, "dumps", recording_dumps)
    (a, b, n), kwargs = loads(dumps(call))
    assert used == []
    assert (type(a), a.key, b.key, n, kwargs["scale"].key) == (TaskRef, "add-1", "add-2", 3, "inc-0")


def test_a_task_reference_pickles_to_the_same_bytes_either_way():
    """What makes TaskRef plain: both picklers give the same bytes, so a pure task's key does not depend on the path."""
    call = ((TaskRef("add-1"), TaskRef("add-2")), {})
    assert dumps(call).header == cloudpickle.dumps(call, protocol=PROTOCOL)
