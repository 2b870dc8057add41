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

from trioflow.comm.messages import (
    MAX_NAME_CHARS,
    MAX_REASON_CHARS,
    MAX_TEXT_CHARS,
    CancelledFailure,
    KilledWorkerFailure,
    LostDataFailure,
    UserFailure,
)
from trioflow.comm.schema import Record
from trioflow.comm.serialize import Serialized, SerializedFunction, dumps, loads, pickles_plainly
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
    RemoteTraceback,
    SerializationError,
)


@pickles_plainly  # the standard pickler takes the arguments of dependent tasks
class TaskRef:
    """Stands for "the value of `key`" inside a task's pickled arguments."""

    __slots__ = ("key",)

    def __init__(self, key: str):
        self.key = key

    def __reduce__(self):
        return (TaskRef, (self.key,))

    def __repr__(self) -> str:
        return f"TaskRef({self.key!r})"


class RunSpec(Serialized):
    """A task as the scheduler stores it: its pickled arguments, and the
    function that takes them.

    `function` is shared by every task that calls it (the scheduler keeps
    one `SerializedFunction` per id while any task refers to it); the
    scheduler sends it to a worker only while that worker lacks the id.

    It *is* the arguments' `Serialized` (their pickle stream and buffers),
    with the function beside them: one object per task rather than two
    (48 bytes of every pending task, of which a scheduler may hold
    millions).
    """

    __slots__ = ("function",)

    def __init__(self, function: SerializedFunction, args: Serialized):
        super().__init__(args.header, args.buffers)
        self.function = function

    @property
    def args(self) -> Serialized:
        """The pickled arguments (this object itself)."""
        return self

    @property
    def function_id(self) -> str:
        return self.function.function_id


def wants_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether `fn` takes a parameter called `name` (dask's ``dask_worker=``
    and ``dask_scheduler=`` conventions for `Client.run` and `run_on_scheduler`)."""
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


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


def failure_to_wire(failure: TaskFailure) -> Record:
    """The record a failure travels as (one of `messages.FAILURE`)."""
    if isinstance(failure, UserError):
        return UserFailure(
            exception=failure.exception,
            type_name=clip_text(failure.type_name, MAX_NAME_CHARS),
            message=clip_text(failure.message, MAX_TEXT_CHARS),
            traceback=clip_text(failure.traceback, MAX_TEXT_CHARS, keep="end"),
        )
    if isinstance(failure, WorkerDeaths):
        return KilledWorkerFailure(key=failure.key, deaths=failure.deaths, last_worker=failure.last_worker)
    if isinstance(failure, DataLost):
        return LostDataFailure(key=failure.key)
    if isinstance(failure, Cancelled):
        return CancelledFailure(reason=clip_text(failure.reason, MAX_REASON_CHARS))
    raise TypeError(f"not a task failure: {failure!r}")


def failure_from_wire(wire: Record) -> TaskFailure:
    """The core's failure for a record checked by `messages.FAILURE`."""
    if isinstance(wire, UserFailure):
        return UserError(wire.exception, wire.type_name, wire.message, wire.traceback)
    if isinstance(wire, KilledWorkerFailure):
        return WorkerDeaths(wire.key, wire.deaths, wire.last_worker)
    if isinstance(wire, LostDataFailure):
        return DataLost(wire.key)
    if isinstance(wire, CancelledFailure):
        return Cancelled(wire.reason)
    raise TypeError(f"not a failure record: {wire!r}")


def clip_text(text: str, limit: int, keep: str = "start") -> str:
    """`text` within `limit` characters (a traceback keeps its end, where the error is)."""
    if len(text) <= limit:
        return text
    marker = f"...[{len(text) - limit + 40} characters cut]..."
    room = limit - len(marker)
    return marker + text[-room:] if keep == "end" else text[:room] + marker


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


# ------------------------------------------------------- names of an order --

# One order has a name in each place it passes through, each in that place's
# style: the scheduler's core decides it (an imperative message of
# `trioflow.core.scheduler_events`), the wire carries it (a snake_case op of
# `trioflow.comm.messages`, docs/protocol.md), and the receiving core hears
# it (a past-tense event: the worker's core is told that it was requested).
# This table is where the three names meet; a test checks that every order
# the scheduler's core can give is here, that every name exists, and that
# the worker's shell turns each op into the event named. docs/architecture.md
# shows the same table.
#
#   (core message,     wire op(s),                  who hears it, as what)
ORDERS: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    ("ComputeTask", ("compute_task",), "worker", "ComputeRequested"),
    ("RequestSteal", ("steal_request",), "worker", "StealRequested"),
    ("FreeKeys", ("free_keys",), "worker", "FreeRequested"),
    ("AcquireReplicas", ("acquire_replicas",), "worker", "ReplicasRequested"),
    # The client's futures hear the reports; it has no core of its own yet.
    ("ReportFinished", ("key_finished",), "client", "the future finishes"),
    # One failure reported for many keys travels once (`keys_erred`).
    ("ReportErred", ("key_erred", "keys_erred"), "client", "the future fails"),
    ("ReportLost", ("key_lost",), "client", "the future waits again"),
)

# Messages of the scheduler's core that never go on the wire.
NOT_ON_THE_WIRE: dict[str, str] = {
    "WakeAfter": "a timer: the shell sleeps, then hands the event back to the core",
}
