"""Packing: a user's calls turned into named, pickled tasks, and tasks into messages.

Everything here is a plain function of its arguments: it touches no client
state, so any thread may run it. The blocking `Client` packs in the
caller's thread, off the client's Trio loop (a million-call `map` must not
stall the loop that carries the scheduler connection: design.md §6 rule 6);
`AsyncClient` packs in its loop.

A task's key, unless the user names it, is the function's name and a
digest of the pickled function and arguments (``pure=True``): the same call
gives the same key, so it is computed once. With ``pure=False`` the digest
is random. Futures found in the arguments become `TaskRef`s (the worker
swaps in their values) and their keys the task's dependencies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from trioflow.comm import FrameLimits, dumps, dumps_function
from trioflow.comm import messages as m
from trioflow.comm.frames import max_value_bytes, too_big
from trioflow.comm.serialize import Serialized, SerializedFunction
from trioflow.errors import SerializationError
from trioflow.future import Future
from trioflow.protocol import raise_serialization_error, replace_futures
from trioflow.task_options import TaskOptions

# Tasks per `submit` message, and bytes of arguments (a task whose
# arguments are bigger goes alone).
SUBMIT_SLICE = 1_000
SUBMIT_BYTES = 64 << 20
# A task without dependencies shares this empty tuple (the field's default;
# a list per task was 56 bytes of every future's lineage).
NO_DEPENDENCIES: tuple[str, ...] = ()


def is_future(obj: Any) -> bool:
    """Whether `obj` is a trioflow `Future` (exactly: a subclass is user data)."""
    return type(obj) is Future


def pack(
    fn: Callable[..., Any],
    calls: list[tuple[tuple, dict]],
    keys: list[str | None],
    pure: bool,
    options: TaskOptions,
    limits: FrameLimits,
    random_hex: Callable[[], str],
    prefix: str | None = None,
) -> list[tuple[m.TaskWire, SerializedFunction]]:
    """Pickle each call and name its task.

    A call whose arguments do not pickle, or are too big to ever reach the
    scheduler, still becomes a task: one that raises that error on a
    worker, so the task fails, not the call, and so does every task that
    depends on it (the same way as any user error).

    Args:
        calls: ``(args, kwargs)`` per task.
        keys: the key of each task, None to name it here.
        limits: the frame limits, which bound the size of arguments.
        random_hex: a random name part (the client's seeded source).
        prefix: the key prefix (default: the function's name).
    """
    function = dumps_function(fn)
    name = prefix or function_name(fn)
    fields = options.wire_fields()
    packed = []
    for (args, kwargs), key in zip(calls, keys, strict=True):
        dependencies: dict[str, None] = {}
        call = replace_futures((args, kwargs), is_future, dependencies)
        used = function
        failure = None
        try:
            payload = dumps(call)
        except SerializationError as exc:
            failure = f"could not serialize the arguments of {name}: {exc}"
            key = key or f"{name}-{random_hex()}"
        if key is None:
            if pure:
                digest = hashlib.blake2b(digest_size=16)
                digest.update(function.function_id.encode())
                digest.update(payload.header)
                for buffer in payload.buffers:
                    digest.update(buffer)
                key = f"{name}-{digest.hexdigest()}"
            else:
                key = f"{name}-{random_hex()}"
        if failure is None and payload.nbytes > max_value_bytes(limits):
            failure = too_big(f"the arguments of task {key!r}", payload.nbytes, limits, verb="are")
        if failure is not None:
            used = dumps_function(raise_serialization_error)
            payload = dumps(((failure,), {}))
        task = m.TaskWire(
            key=key,
            function_id=used.function_id,
            args=payload,
            dependencies=list(dependencies) if dependencies else NO_DEPENDENCIES,
            scattered=False,
            **fields,
        )
        packed.append((task, used))
    return packed


def plan_tasks(plan: Any, options: TaskOptions) -> list[m.TaskWire]:
    """The tasks of a dask graph plan (trioflow/graph.py: already ordered and
    pickled), as wire tasks with the same `options` for all."""
    fields = options.wire_fields()
    return [
        m.TaskWire(
            key=task.key,
            function_id=plan.function.function_id,
            args=payload,
            dependencies=list(dict.fromkeys(task.inputs.values())),
            scattered=False,
            **fields,
        )
        for task, payload in plan.pickled
    ]


def submit_messages(tasks: list[m.TaskWire], functions: Mapping[str, Serialized], wanted: Iterable[str]):
    """`submit` messages for `tasks`, at most `SUBMIT_SLICE` tasks and
    `SUBMIT_BYTES` of arguments each (a task with bigger ones goes alone).

    The scheduler handles one message at a time, so slices keep each of
    those steps short. A wanted key travels with its own task (the
    scheduler ignores wants of keys it has not seen yet). Each message
    carries the functions its tasks call (the scheduler keeps a function
    only while tasks refer to it, so it cannot be sent once for all time).
    No tasks still make one (empty) message: a resubmission of nothing
    tells a new scheduler that this client is back with nothing to redo.
    """
    wanted_keys = set(wanted)
    sized = [(t, 0 if t.args is None else t.args.nbytes) for t in tasks]
    for part in byte_slices(sized, SUBMIT_SLICE, SUBMIT_BYTES) if tasks else [[]]:
        part_tasks = [t for t, _ in part]
        used = {t.function_id: functions[t.function_id] for t in part_tasks if t.function_id in functions}
        yield m.Submit(tasks=part_tasks, functions=used, wanted=[t.key for t in part_tasks if t.key in wanted_keys])


def byte_slices(items: list[tuple[Any, Any]], most: int, max_bytes: int) -> Iterable[list[tuple[Any, Any]]]:
    """`items` ``(thing, size or Serialized)`` in slices of at most `most`
    things and `max_bytes` bytes (a bigger thing goes alone)."""
    part: list[tuple[Any, Any]] = []
    size = 0
    for item in items:
        n = item[1] if isinstance(item[1], int) else item[1].nbytes
        if part and (len(part) >= most or size + n > max_bytes):
            yield part
            part, size = [], 0
        part.append(item)
        size += n
    if part:
        yield part


def future_keys(obj: Any) -> dict[str, None]:
    """The keys of the futures in `obj` (a future, or lists, tuples, sets and
    dict values holding them), in order, without copying `obj` the way
    `replace_futures` does (cancelling 100,000 futures made as many
    `TaskRef`s to throw away)."""
    found: dict[str, None] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if type(item) is Future:
            found[item.key] = None
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        elif isinstance(item, (set, frozenset)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(reversed(item.values()))
    return found


def map_calls(
    fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], key: Any, kwargs: dict[str, Any]
) -> tuple[list[tuple[tuple, dict]], list[str | None], str | None]:
    """`map`'s calls, their keys (None: to be named) and the key prefix.

    Raises:
        TypeError: `fn` is not callable.
        ValueError: a list of keys whose length is not the number of calls.
    """
    if not callable(fn):
        raise TypeError(f"map() expects a callable, got {type(fn).__name__}")
    calls = [(args, kwargs) for args in zip(*iterables, strict=False)]
    if isinstance(key, list):
        if len(key) != len(calls):
            raise ValueError(f"map() got {len(key)} keys for {len(calls)} calls")
        return calls, list(key), None
    return calls, [None] * len(calls), key if isinstance(key, str) else None


def graph_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options of `get`/`compute`/`persist`, refusing unknown ones by name.

    (dask passes the keywords of ``dask.compute`` on to the scheduler; a
    graph has no function to give them to, so an unknown one is a mistake.)
    """
    known = {"retries", "workers", "allow_other_workers", "resources", "priority"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return options


def function_name(fn: Any) -> str:
    """The name part of a task's key: the function's name (``lambda`` for a lambda)."""
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "lambda" if name == "<lambda>" else name
