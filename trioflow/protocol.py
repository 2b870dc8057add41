"""What the shells agree on: how a task, an argument and a failure travel.

The client packs a call ``fn(*args, **kwargs)`` into a `RunSpec`; the
scheduler stores it without unpickling anything; the worker unpacks it,
swaps each `TaskRef` for the value of the key it names, and runs it.
Failures decided by the cores (`trioflow.core.failures`) travel as small
maps and become exceptions again in the client (`failure_to_exception`).
docs/protocol.md describes every message that carries these.
"""

from __future__ import annotations

import pickle
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from trioflow.comm.serialize import Serialized, dumps, loads
from trioflow.core.failures import (
    Cancelled,
    DataLost,
    TaskFailure,
    UserError,
    WorkerDeaths,
)
from trioflow.errors import (
    CancelledError,
    KilledWorker,
    LostData,
    ProtocolError,
    RemoteTraceback,
    SerializationError,
)


# Results this small (pickled) travel with the "finished" reports, so a
# client gets them without a round trip to the worker.
INLINE_VALUE_BYTES = 1024


class TaskRef:
    """Stands for "the value of `key`" inside a task's pickled arguments."""

    __slots__ = ("key",)

    def __init__(self, key: str):
        self.key = key

    def __reduce__(self):
        return (TaskRef, (self.key,))

    def __repr__(self) -> str:
        return f"TaskRef({self.key!r})"


class RunSpec:
    """A task as the scheduler stores it: a function id and pickled arguments.

    `function` is the pickled function (shared by every task that uses it);
    the scheduler sends it to a worker only the first time that worker needs
    that `function_id`.
    """

    __slots__ = ("function_id", "function", "args")

    def __init__(self, function_id: str, function: Any, args: Serialized):
        self.function_id = function_id
        self.function = function
        self.args = args


# ------------------------------------------------------------ arguments --

_CONTAINERS = (list, tuple, dict, set, frozenset)


def replace_futures(obj: Any, is_future: Callable[[Any], bool], found: dict[str, None]) -> Any:
    """`obj` with every future (also inside lists/tuples/dicts/sets) as a `TaskRef`.

    The keys found are added to `found`, in order: they are the task's
    dependencies.
    """
    if is_future(obj):
        found[obj.key] = None
        return TaskRef(obj.key)
    kind = type(obj)
    if kind is list or kind is tuple:
        items = [replace_futures(x, is_future, found) for x in obj]
        return items if kind is list else tuple(items)
    if kind is dict:
        return {k: replace_futures(v, is_future, found) for k, v in obj.items()}
    if kind is set or kind is frozenset:
        return kind(replace_futures(x, is_future, found) for x in obj)
    return obj


def substitute(obj: Any, data: Mapping[str, Any]) -> Any:
    """`obj` with every `TaskRef` replaced by ``data[ref.key]``."""
    kind = type(obj)
    if kind is TaskRef:
        return data[obj.key]
    if kind is list or kind is tuple:
        items = [substitute(x, data) for x in obj]
        return items if kind is list else tuple(items)
    if kind is dict:
        return {k: substitute(v, data) for k, v in obj.items()}
    if kind is set or kind is frozenset:
        return kind(substitute(x, data) for x in obj)
    return obj


def raise_serialization_error(message: str) -> None:
    """The function of a task whose arguments could not be pickled.

    Running it on a worker raises the error there, so the task and every
    dependent fail the way any user error fails (design.md §1, first row).
    """
    raise SerializationError(message)


# -------------------------------------------------------------- failures --


def user_error_from_exception(exc: BaseException, skip_frames: int = 0) -> UserError:
    """Capture an exception raised by user code, with its traceback text.

    `skip_frames` drops the innermost-caller frames that belong to trioflow
    (the frame that called the user's function), so the remote traceback
    shows the user's code only.
    """
    tb = exc.__traceback__
    for _ in range(skip_frames):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return UserError(_pickle_exception(exc), _qualname(type(exc)), str(exc), text)


def _pickle_exception(exc: BaseException) -> Serialized | None:
    """The exception's own reduction, pickled; None if it does not pickle.

    `__reduce_ex__` is called directly rather than letting pickle consult
    `copyreg`: libraries may register reducers for every exception class
    (tblib, which dask installs, adds the traceback), and what travels — and
    the chaos lab's byte-exact traces — must not depend on what else this
    process happens to have imported. The traceback travels as text.
    """
    try:
        return dumps(exc.__reduce_ex__(pickle.HIGHEST_PROTOCOL))
    except (SerializationError, TypeError):
        return None


def _unpickle_exception(payload: Serialized) -> BaseException | None:
    reduced = loads(payload)
    if not isinstance(reduced, tuple) or len(reduced) < 2 or not callable(reduced[0]):
        return None
    exc = reduced[0](*reduced[1])
    state = reduced[2] if len(reduced) > 2 else None
    if state:
        if hasattr(exc, "__setstate__"):
            exc.__setstate__(state)
        else:
            exc.__dict__.update(state)
    return exc if isinstance(exc, BaseException) else None


def _qualname(kind: type) -> str:
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def failure_to_wire(failure: TaskFailure) -> dict[str, Any]:
    if isinstance(failure, UserError):
        return {
            "kind": "user",
            "exception": failure.exception,
            "type_name": failure.type_name,
            "message": failure.message,
            "traceback": failure.traceback,
        }
    if isinstance(failure, WorkerDeaths):
        return {
            "kind": "killed_worker",
            "key": failure.key,
            "deaths": failure.deaths,
            "last_worker": failure.last_worker,
        }
    if isinstance(failure, DataLost):
        return {"kind": "lost_data", "key": failure.key}
    if isinstance(failure, Cancelled):
        return {"kind": "cancelled", "reason": failure.reason}
    raise TypeError(f"not a task failure: {failure!r}")


def user_error_from_wire(wire: Mapping[str, Any]) -> UserError:
    return UserError(
        wire.get("exception"),
        str(wire.get("type_name", "Exception")),
        str(wire.get("message", "")),
        str(wire.get("traceback", "")),
    )


def failure_from_wire(wire: Mapping[str, Any]) -> TaskFailure:
    kind = wire.get("kind")
    if kind == "user":
        return user_error_from_wire(wire)
    if kind == "killed_worker":
        return WorkerDeaths(str(wire["key"]), int(wire["deaths"]), str(wire["last_worker"]))
    if kind == "lost_data":
        return DataLost(str(wire["key"]))
    if kind == "cancelled":
        return Cancelled(str(wire["reason"]))
    raise ValueError(f"unknown failure kind {kind!r}")


def failure_to_exception(failure: TaskFailure) -> BaseException:
    """The exception a client raises for `failure` (design.md §1)."""
    if isinstance(failure, WorkerDeaths):
        return KilledWorker(failure.key, failure.deaths, failure.last_worker)
    if isinstance(failure, DataLost):
        return LostData(failure.key)
    if isinstance(failure, Cancelled):
        return CancelledError(failure.reason)
    exc: BaseException | None = None
    if failure.exception is not None:
        try:
            exc = _unpickle_exception(failure.exception)
        except Exception:  # whatever rebuilding the user's class raises
            exc = None
    if not isinstance(exc, BaseException):
        exc = RuntimeError(f"{failure.type_name}: {failure.message}")
    exc.__cause__ = RemoteTraceback(failure.traceback)
    return exc


# ----------------------------------------------------------------- sizes --


def sizeof(value: Any) -> int:
    """A cheap estimate of the bytes `value` holds, for placement decisions."""
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    try:
        return sys.getsizeof(value)
    except Exception:
        return 64


# ------------------------------------------------- checking what arrives --


def _where(message: Mapping[str, Any]) -> str:
    op = message.get("op")
    return f"{op!r} message" if op is not None else "a nested map"


def field(message: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """``message[name]``, checked to be a `kind`.

    Peers are not trusted: a missing or mistyped field raises `ProtocolError`
    naming the op and the field, and the caller closes that one connection.
    """
    if name not in message:
        if default is not ...:
            return default
        raise ProtocolError(f"{_where(message)} lacks field {name!r}")
    value = message[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ProtocolError(
            f"{_where(message)}: field {name!r} must be {expected}, got {type(value).__name__}"
        )
    return value


def str_list(message: Mapping[str, Any], name: str) -> list[str]:
    """A field that must be a list of strings (keys, addresses)."""
    values = field(message, name, list)
    for value in values:
        if not isinstance(value, str):
            raise ProtocolError(f"{_where(message)}: {name!r} must hold strings")
    return values


def str_map(message: Mapping[str, Any], name: str, value_kind: type | tuple[type, ...]) -> dict[str, Any]:
    """A field that must be a map from strings to `value_kind`."""
    values = field(message, name, dict)
    for key, value in values.items():
        if not isinstance(key, str) or not isinstance(value, value_kind):
            raise ProtocolError(f"{_where(message)}: {name!r} has a bad entry for {key!r}")
    return values
