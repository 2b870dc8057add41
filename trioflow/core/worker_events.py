"""What goes into `WorkerState.handle` and what comes out.

Events are facts: the scheduler asked for something, a thread finished, a
peer answered. Instructions are what the worker shell must do: execute a
function, fetch data from a peer, drop data, tell the scheduler something.

Every event carries a `stimulus_id` chosen by the shell (for example
``"gathered-17"``), and every instruction carries the id of the event that
caused it. A log of both rebuilds a task's story: which message made the
worker fetch, start or drop what.

The formal model (`spec/worker_model.py`) names fewer events; the worker's
transition table (`worker_transitions.TaskEvent`) uses its names:

    this module                              spec/worker_model.py, TaskEvent
    ---------------------------------------  -------------------------------
    ComputeRequested                         Compute
    FreeRequested                            Free
    ReplicasRequested                        Replicas
    DataPut                                  Put
    ExecutionSucceeded, ExecutionFailed      ExecutionDone(ok)
    GatherSucceeded                          GatherDone
    GatherFailed                             GatherFailed
    StealRequested                           Steal
    MemoryPaused, MemoryResumed              Pause, Resume (move no task)
    SchedulerLost                            (not in the model)
    TaskSeceded, TaskRejoining               (not in the model; move no task)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from trioflow.core.failures import UserError
from trioflow.core.frozen import frozen


# ---------------------------------------------------------------- events --


@frozen
class WorkerEvent:
    """A fact the worker core must take into account."""

    stimulus_id: str  # names this event in logs and in the instructions it causes


@frozen
class ComputeRequested(WorkerEvent):
    """The scheduler assigned `key` here; `who_has` locates its inputs."""

    key: str
    run_spec: Any
    priority: tuple[int, ...]
    who_has: Mapping[str, tuple[str, ...]]
    nbytes: Mapping[str, int]


@frozen
class FreeRequested(WorkerEvent):
    """The scheduler no longer needs these keys here (value or pending run).

    `heard`: those of the keys whose every report from here the scheduler
    had handled when it sent the free (the shell knows, from
    `FreeKeys.reports_heard`). No report of them can be crossing the free,
    so dropping them needs no answer; the others are answered with
    `SendDataDropped`. Empty (the default): answer for every value dropped.
    """

    keys: tuple[str, ...]
    heard: frozenset[str] = frozenset()


@frozen
class ReplicasRequested(WorkerEvent):
    """The scheduler wants copies of these keys here, from the given holders."""

    who_has: Mapping[str, tuple[str, ...]]
    nbytes: Mapping[str, int]


@frozen
class DataPut(WorkerEvent):
    """The shell stored values handed to this worker directly (scatter)."""

    nbytes: Mapping[str, int]


@frozen
class SchedulerLost(WorkerEvent):
    """The scheduler connection is gone; the worker will register again.

    Values and running threads are kept (the next scheduler is told about
    them); work that had not started is dropped (it will be sent again).
    """


@frozen
class StealRequested(WorkerEvent):
    """The scheduler would move `key` to another worker (work stealing) if
    this worker has not started it; the answer must carry `steal_id`."""

    key: str
    steal_id: int


@frozen
class MemoryPaused(WorkerEvent):
    """The process's memory passed its pause fraction (the shell's memory
    manager measured it): start no new task and fetch nothing new."""


@frozen
class MemoryResumed(WorkerEvent):
    """The process's memory is back under its pause fraction."""


@frozen
class ExecutionSucceeded(WorkerEvent):
    """The function of `key` returned; the shell stored its value (`nbytes` in size)."""

    key: str
    nbytes: int


@frozen
class ExecutionFailed(WorkerEvent):
    """The function of `key` raised; `failure` carries the exception and its traceback."""

    key: str
    failure: UserError


@frozen
class TaskSeceded(WorkerEvent):
    """The function running `key` gave its thread slot back (`secede()`):
    it waits on other tasks, and another task may run meanwhile."""

    key: str


@frozen
class TaskRejoining(WorkerEvent):
    """The seceded function running `key` wants a thread slot again
    (`rejoin()`); its thread waits until `Rejoin` says it has one."""

    key: str


@frozen
class GatherSucceeded(WorkerEvent):
    """`peer` sent the values in `nbytes` (the shell stored them), did not
    have `missing`, and could not serialize the values in `errors`."""

    peer: str
    nbytes: Mapping[str, int]
    missing: tuple[str, ...] = ()
    errors: Mapping[str, UserError] = dataclasses.field(default_factory=dict)


@frozen
class GatherFailed(WorkerEvent):
    """The request to `peer` for `keys` failed (connection refused or closed)."""

    peer: str
    keys: tuple[str, ...]


# ---------------------------------------------------------- instructions --


@frozen
class WorkerInstruction:
    """Something the worker shell must do."""

    stimulus_id: str  # the id of the event that caused it


@frozen
class Execute(WorkerInstruction):
    """Run `key`'s function in a thread, with `dependencies` read from the store."""

    key: str
    run_spec: Any
    dependencies: tuple[str, ...]


@frozen
class Rejoin(WorkerInstruction):
    """The rejoining thread of `key` has its slot again: let it go on."""

    key: str


@frozen
class Gather(WorkerInstruction):
    """Fetch `keys` from `peer` into the store."""

    peer: str
    keys: tuple[str, ...]


@frozen
class DropData(WorkerInstruction):
    """Delete these values from the store (a key may be absent: it is then a no-op)."""

    keys: tuple[str, ...]


@frozen
class SendTaskStarted(WorkerInstruction):
    """Tell the scheduler, *before* the function runs, that `key` is running.

    The shell must have written this to the socket before starting the
    thread: if the function kills the process, the scheduler still learns
    that this task was running (design.md §1, "a task keeps killing workers").
    """

    key: str


@frozen
class SendTaskFinished(WorkerInstruction):
    """Tell the scheduler that `key`, assigned here, has its value here."""

    key: str
    nbytes: int


@frozen
class SendTaskErred(WorkerInstruction):
    """Tell the scheduler that `key` failed: its function raised, or an input could not be sent."""

    key: str
    failure: UserError


@frozen
class SendReplicaAdded(WorkerInstruction):
    """Tell the scheduler that a copy of `key` is here now, and offered to others."""

    key: str
    nbytes: int


@frozen
class SendReplicaMissing(WorkerInstruction):
    """No holder of `key` could provide it (for `dependent`, if any).

    `holders`: those that answered that they do not have it (not those that
    did not answer: they may still hold it)."""

    key: str
    holders: tuple[str, ...]
    dependent: str | None


@frozen
class SendStealAnswer(WorkerInstruction):
    """Tell the scheduler whether `key` was given up (it had not started
    here, and never will unless assigned here again) for steal `steal_id`."""

    key: str
    steal_id: int
    given_up: bool


@frozen
class SendDataDropped(WorkerInstruction):
    """Tell the scheduler these values are no longer offered from here.

    Sent for every value a free drops (or keeps only for local work): the
    free may have crossed a report of the same value on the wire, after
    which the scheduler would count a copy that is going away.
    """

    keys: tuple[str, ...]
