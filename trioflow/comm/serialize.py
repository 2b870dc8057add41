"""Turning Python objects into bytes and back: pickle protocol 5, zero copies.

User objects (functions, arguments, results, exceptions) travel as a
`Serialized`: one pickle stream plus the out-of-band buffers that pickle
protocol 5 hands us (a NumPy array's memory, a bytes object's payload...).
The buffers are sent as frames of their own (`trioflow.comm.frames`), so a
256 MB array is never copied into a pickle stream and never copied out of
one. Nobody but the process that needs the object unpickles it: the
scheduler forwards a task's `Serialized` arguments without looking inside.

Functions are the exception to "pickle each time": `client.map(f, ...)`
sends one function to thousands of tasks, so `dumps_function` pickles each
function once and `loads_function` unpickles each distinct payload once.
A function's id is the digest of its pickled bytes (`function_id`), and
whoever receives a function checks the id against the bytes
(`verify_function`): no peer can pass off its own bytes under the id of
another client's function.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
from collections.abc import Sequence
from typing import Any

import cloudpickle

from trioflow.errors import SerializationError

__all__ = ["Serialized", "dumps", "loads", "dumps_function", "loads_function"]

PROTOCOL = 5


class Serialized:
    """A pickled object: its pickle stream and its out-of-band buffers."""

    __slots__ = ("header", "buffers")

    def __init__(self, header: bytes | memoryview, buffers: Sequence[Any] = ()):
        self.header = header
        # A tuple, and the one empty tuple when there are none: most values
        # (every small argument a scheduler keeps) have none, and an empty
        # list per value was 56 bytes of each pending task.
        self.buffers: tuple[Any, ...] = tuple(buffers) if buffers else ()

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(memoryview(b).nbytes for b in self.buffers)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Serialized):
            return NotImplemented
        return bytes(self.header) == bytes(other.header) and [bytes(b) for b in self.buffers] == [
            bytes(b) for b in other.buffers
        ]

    def __repr__(self) -> str:
        return f"<Serialized {len(self.header)} bytes + {len(self.buffers)} buffers>"


# Values made of these types alone pickle the same with the standard
# library's pickler as with cloudpickle, which builds a pickler object in
# Python on every call: 0.7 us against 4.7 us here for ``((5,), {})``, the
# arguments of a small task (and its result), on the path of every task.
_PLAIN_SCALARS = frozenset({type(None), bool, int, float, complex, str})
_PLAIN_CONTAINERS = frozenset({tuple, list, dict})
# Containers larger than this (or nested deeper) go to cloudpickle without
# being looked through: checking them in Python would cost what it saves.
_PLAIN_MAX_ITEMS = 16
_PLAIN_MAX_DEPTH = 3
# trioflow's own small types that count as scalars too (`pickles_plainly`).
_PLAIN_REFERENCES: set[type] = set()


def pickles_plainly(cls: type) -> type:
    """Class decorator: instances of `cls` may take the standard pickler's path.

    Only for a class whose instances pickle to the same bytes with either
    pickler: an importable class (both picklers then name it rather than
    copy it) whose ``__reduce__`` gives builtin scalars. `TaskRef` is one,
    and it is in the arguments of every task that depends on another:
    without it, each such call went to cloudpickle (9.6 us against 1.7 us
    for two references, the arguments of a W3 tree node).
    """
    _PLAIN_REFERENCES.add(cls)
    return cls


def _plain(obj: Any, depth: int = 0) -> bool:
    """True if `obj` is built only of builtin scalars (and `pickles_plainly`
    types) in small builtin containers."""
    kind = type(obj)
    if kind in _PLAIN_SCALARS or kind in _PLAIN_REFERENCES:
        return True
    if depth >= _PLAIN_MAX_DEPTH or kind not in _PLAIN_CONTAINERS or len(obj) > _PLAIN_MAX_ITEMS:
        return False
    scalars = _PLAIN_SCALARS
    if kind is dict:
        for key, value in obj.items():
            if type(key) not in scalars and not _plain(key, depth + 1):
                return False
            if type(value) not in scalars and not _plain(value, depth + 1):
                return False
        return True
    for item in obj:
        if type(item) not in scalars and not _plain(item, depth + 1):
            return False
    return True


def dumps(obj: Any) -> Serialized:
    """Pickle `obj` with protocol 5, keeping large buffers out of band.

    Raises:
        SerializationError: `obj` cannot be pickled (the message says why).
    """
    if _plain(obj):
        return Serialized(pickle.dumps(obj, protocol=PROTOCOL))
    buffers: list[memoryview] = []

    def keep_out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            buffers.append(buffer.raw())
        except BufferError:
            return True  # not contiguous: let pickle copy it in band
        return False

    try:
        header = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=keep_out_of_band)
    except Exception as exc:
        raise SerializationError(
            f"could not serialize {type(obj).__name__} object: {type(exc).__name__}: {exc}"
        ) from exc
    return Serialized(header, buffers)


def loads(serialized: Serialized) -> Any:
    """Unpickle a `Serialized` (its buffers are used in place, not copied).

    Raises:
        SerializationError: the bytes do not unpickle here.
    """
    try:
        return pickle.loads(serialized.header, buffers=serialized.buffers)
    except Exception as exc:
        raise SerializationError(
            f"could not deserialize object: {type(exc).__name__}: {exc}"
        ) from exc


def content_digest(serialized: Serialized) -> str:
    """A short hex digest of a value's pickled bytes (buffers included).

    Scattered values are named by it (``"int-<digest>"``), so scattering the
    same value twice gives the same key, and a scheduler can tell a key that
    names its content from one a client chose.
    """
    digest = hashlib.blake2b(serialized.header, digest_size=16)
    for buffer in serialized.buffers:
        digest.update(buffer)
    return digest.hexdigest()


class SerializedFunction:
    """A function pickled once, with the id that names its bytes.

    `payload` is a `Serialized` with no out-of-band buffers (they are folded
    in), so it travels as one frame and its digest is over one byte string.
    """

    __slots__ = ("function_id", "payload", "__weakref__")

    def __init__(self, function_id: str, payload: Serialized):
        self.function_id = function_id
        self.payload = payload


def function_id(payload: bytes | bytearray | memoryview) -> str:
    """The id of a pickled function: the hex BLAKE2b-256 digest of its bytes.

    256 bits, so that finding two functions with one id is out of reach.
    """
    return hashlib.blake2b(payload, digest_size=32).hexdigest()


def verify_function(claimed_id: str, payload: Serialized) -> SerializedFunction:
    """The function `payload`, if `claimed_id` is the digest of its bytes.

    Raises:
        SerializationError: the id does not name these bytes, or the payload
            has buffers of its own.
    """
    if payload.buffers:
        raise SerializationError(f"function {claimed_id[:16]}... arrived with out-of-band buffers")
    if function_id(payload.header) != claimed_id:
        raise SerializationError(f"function id {claimed_id[:16]}... is not the digest of its bytes")
    return SerializedFunction(claimed_id, payload)


def dumps_function(fn: Any) -> SerializedFunction:
    """Pickle `fn` once (cached while it is hashable); the id names its bytes."""
    try:
        return _dumps_function_cached(fn)
    except TypeError:  # unhashable callable: pickle it every time
        return _dumps_function(fn)


@functools.lru_cache(maxsize=512)
def _dumps_function_cached(fn: Any) -> SerializedFunction:
    return _dumps_function(fn)


def _dumps_function(fn: Any) -> SerializedFunction:
    payload = dumps(fn)
    if payload.buffers:
        # Rare (a function closing over large arrays): fold the buffers in so
        # the payload can be cached and sent as one value.
        payload = Serialized(cloudpickle.dumps(fn, protocol=PROTOCOL))
    header = bytes(payload.header)
    return SerializedFunction(function_id(header), Serialized(header))


@functools.lru_cache(maxsize=512)
def _loads_function_bytes(payload: bytes) -> Any:
    return loads(Serialized(payload))


def loads_function(payload: Serialized) -> Any:
    """Unpickle a function payload, once per distinct payload."""
    return _loads_function_bytes(bytes(payload.header))
