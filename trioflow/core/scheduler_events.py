"""What goes into `SchedulerState.handle` and what comes out.

Events are past-tense facts the shell observed (a message arrived, a
connection closed, a heartbeat deadline passed, a timer the core set went
off). Messages are imperative orders the shell must carry out (send this to
that worker or client, wake me later).

Time: the core reads no clock and no event carries a time. When a decision
depends on time passing (the recovery window after a start, how long an
orphaned value is kept), the core asks for
it with `WakeAfter(delay_s, event)`, and the shell hands `event` back after
that many seconds of its clock (Trio's, virtual in the simulator). So the
durations are decided here and the shell only sleeps.
Both are frozen dataclasses carrying the `stimulus_id` of the event that
caused them, so a task's whole story can be rebuilt from a log.

A message's name is the core's name of an order; the wire and the
receiving core name it in their own styles (`compute_task`,
`ComputeRequested`): `trioflow.protocol.ORDERS` maps the three.

Addresses are opaque strings to the core ("tcp://127.0.0.1:40123" for a
worker, any unique id for a client). `run_spec` and failure payloads are
opaque objects the core stores and passes on without looking inside.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from trioflow.core.failures import TaskFailure, UserError
from trioflow.core.frozen import frozen


# ---------------------------------------------------------------- events --


@frozen
class TaskSpec:
    """One task as a client submits it.

    Attributes:
        key: the task's unique name.
        run_spec: what a worker needs to run it (opaque here); None marks
            data without lineage, which only `DataScattered` creates.
        dependencies: keys whose values the task takes as arguments.
        retries: how many times a raising function is run again.
        workers: if given, the only worker addresses allowed to run it.
        loose: with `workers`, a preference only: while none of them is
            alive, any live worker may run it (allow_other_workers).
        resources: ``{name: amount}`` the task holds on its worker while it
            is processing there; only workers with that much free may run it.
        priority: the user's priority; higher runs first, before the
            scheduler's own order (submission order) is consulted.
    """

    key: str
    run_spec: Any
    dependencies: tuple[str, ...] = ()
    retries: int = 0
    workers: tuple[str, ...] | None = None
    loose: bool = False
    resources: Mapping[str, float] | None = None
    priority: int = 0


@frozen
class SchedulerEvent:
    stimulus_id: str


@frozen
class ClientConnected(SchedulerEvent):
    client: str


@frozen
class ClientDisconnected(SchedulerEvent):
    client: str


@frozen
class TasksSubmitted(SchedulerEvent):
    """A client submitted `tasks` and holds futures for `wanted` keys."""

    client: str
    tasks: tuple[TaskSpec, ...]
    wanted: tuple[str, ...]


@frozen
class KeysReleased(SchedulerEvent):
    """A client dropped its last future for each of `keys`."""

    client: str
    keys: tuple[str, ...]


@frozen
class KeysCancelled(SchedulerEvent):
    """A client cancelled `keys` (and so every dependent of them it wants)."""

    client: str
    keys: tuple[str, ...]
    reason: str = "cancelled by the client"


@frozen
class DataScattered(SchedulerEvent):
    """A client's data now lives on workers: ``{key: (nbytes, holders)}``."""

    client: str
    placed: Mapping[str, tuple[int, tuple[str, ...]]]


@frozen
class SchedulerStarted(SchedulerEvent):
    """The shell started serving: the recovery window opens now, for
    `recovery_grace_s` (the core answers with a `WakeAfter` for `RecoveryEnded`)."""


@frozen
class WorkerConnected(SchedulerEvent):
    """A worker registered.

    After a scheduler restart a surviving worker re-registers with the values
    it holds (`held`, ``{key: nbytes}``) and the tasks still running in its
    threads (`running`); keys this scheduler does not know yet are kept as
    orphans until a client resubmits their lineage (`OrphansExpired`, a
    timer the core sets then). The shell has dropped the claims it cannot
    believe (`Scheduler._checked_claims`).
    """

    worker: str
    nthreads: int
    held: Mapping[str, int] = dataclasses.field(default_factory=dict)
    running: tuple[str, ...] = ()
    # What the worker offers to tasks that ask for resources ({"GPU": 2}).
    resources: Mapping[str, float] = dataclasses.field(default_factory=dict)


@frozen
class OrphansExpired(SchedulerEvent):
    """No client claimed these orphaned keys in time: free them (a timer
    the core set when a worker brought them, `orphan_timeout_s`)."""

    keys: tuple[str, ...]


@frozen
class RecoveryEnded(SchedulerEvent):
    """The clients that reconnected in time have all resubmitted their
    lineage: values workers brought back that none of those lineages needs
    may go now.

    A timer: the core asks for it when it starts (`SchedulerStarted`, after
    `recovery_grace_s`). The shell holds back what recovering clients send
    while the window is open (`SchedulerState.in_recovery`) and, when the
    timer goes off, hands all of it in first: that is what makes this event
    true.
    """


@frozen
class WorkerDisconnected(SchedulerEvent):
    """A worker is gone: its connection closed or its heartbeats stopped.

    `expected` is True when the scheduler itself retired the worker (a
    restart, a clean shutdown): its running tasks are then not suspected of
    having killed it.
    """

    worker: str
    expected: bool = False


@frozen
class TaskStarted(SchedulerEvent):
    """A worker began executing `key` (from now on a death counts against it)."""

    worker: str
    key: str


@frozen
class TaskFinished(SchedulerEvent):
    worker: str
    key: str
    nbytes: int
    # The value came along, small enough to go on with the report to the
    # clients holding the key: they will have the value itself.
    inline: bool = False
    # Seconds the function ran, by the worker's (Trio) clock: feeds the
    # estimates work stealing weighs (core/durations.py). None: not measured.
    duration: float | None = None


@frozen
class TaskErred(SchedulerEvent):
    worker: str
    key: str
    failure: UserError


@frozen
class StealAnswered(SchedulerEvent):
    """The victim of steal `steal_id` answered: it gave `key` up (it had not
    started it, and never will), or it keeps it (started, finished, unknown)."""

    worker: str
    key: str
    steal_id: int
    given_up: bool


@frozen
class WorkerPaused(SchedulerEvent):
    """`worker`'s memory passed its pause fraction: it starts nothing new."""

    worker: str


@frozen
class WorkerResumed(SchedulerEvent):
    """`worker`'s memory is back under its pause fraction: it takes work again."""

    worker: str


@frozen
class ReplicaAdded(SchedulerEvent):
    """A worker now holds a copy of `key` (it fetched it for a task or a replica)."""

    worker: str
    key: str
    nbytes: int


@frozen
class ReplicaMissing(SchedulerEvent):
    """`worker` could not get `key` to run `dependent` (or as a copy asked for).

    `holders` are those that answered that they do not have it; holders that
    did not answer (hung, unreachable) are not named: they may still have it.
    """

    worker: str
    key: str
    holders: tuple[str, ...]
    dependent: str | None = None


@frozen
class DataDropped(SchedulerEvent):
    """`worker` no longer holds (or offers) these values: it freed them."""

    worker: str
    keys: tuple[str, ...]


@frozen
class ReplicationRequested(SchedulerEvent):
    """A client wants `n` copies of each of `keys`, kept through worker deaths."""

    client: str
    keys: tuple[str, ...]
    n: int


@frozen
class KeysFiredAndForgotten(SchedulerEvent):
    """`client` asks that `keys` be computed even once nobody holds them
    (`fire_and_forget`): the pseudo-client `FIRE_AND_FORGET` holds each
    until it has a value or a failure."""

    client: str
    keys: tuple[str, ...]


# The pseudo-client that holds fire-and-forget keys (never told anything).
FIRE_AND_FORGET = "fire-and-forget"


@frozen
class ClusterRestarted(SchedulerEvent):
    """Every worker is being restarted: all task state is flushed."""

    reason: str = "the cluster was restarted"


# -------------------------------------------------------------- messages --


class Outbox:
    """The messages one event has produced so far, and that event's id.

    `SchedulerState.handle` opens it for each event (`open`) and hands what
    it collected to the shell (`close`); its collaborators (the transition
    engine, work stealing) append to the same one, so the messages leave in
    the order they were decided.
    """

    __slots__ = ("stimulus_id", "messages")

    def __init__(self) -> None:
        self.stimulus_id = ""
        self.messages: list[SchedulerMessage] = []

    def open(self, stimulus_id: str) -> None:
        self.stimulus_id = stimulus_id

    def emit(self, message: SchedulerMessage) -> None:
        self.messages.append(message)

    def close(self) -> list[SchedulerMessage]:
        out, self.messages = self.messages, []
        return out


@frozen
class SchedulerMessage:
    stimulus_id: str


@frozen
class WakeAfter(SchedulerMessage):
    """Hand `event` back to the core `delay_s` seconds from now (the core
    has no clock: its timers are the shell's sleeps)."""

    delay_s: float
    event: SchedulerEvent


@frozen
class ComputeTask(SchedulerMessage):
    """Run `key` on `worker`; `who_has` says where each dependency lives."""

    worker: str
    key: str
    run_spec: Any
    priority: tuple[int, ...]
    who_has: Mapping[str, tuple[str, ...]]
    nbytes: Mapping[str, int]


@frozen
class RequestSteal(SchedulerMessage):
    """Ask `worker` (the victim) to give `key` up if it has not started it;
    its answer (`StealAnswered`) carries `steal_id` back."""

    worker: str
    key: str
    steal_id: int


@frozen
class FreeKeys(SchedulerMessage):
    """`worker` should drop these keys: their data, or their pending run."""

    worker: str
    keys: tuple[str, ...]


@frozen
class AcquireReplicas(SchedulerMessage):
    """`worker` should fetch copies of these keys from the holders named."""

    worker: str
    who_has: Mapping[str, tuple[str, ...]]
    nbytes: Mapping[str, int]


@frozen
class ReportFinished(SchedulerMessage):
    """Tell `client` that `key` has a value, held by `who_has`; with
    `with_value`, the value itself goes along (it came with the worker's
    report and is small)."""

    client: str
    key: str
    who_has: tuple[str, ...]
    with_value: bool = False


@frozen
class ReportErred(SchedulerMessage):
    """Tell `client` that `key` failed; `origin` is the key that failed first."""

    client: str
    key: str
    failure: TaskFailure
    origin: str


@frozen
class ReportLost(SchedulerMessage):
    """Tell `client` that `key`'s value is gone and is being computed again."""

    client: str
    key: str
