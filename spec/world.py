"""The vocabulary of the lifecycle model: states, records, events, transitions.

This module only names things; `spec.model` says how they move. A `World`
is an immutable, hashable value (the records the scheduler keeps, the live
workers, the keys clients hold, the faults so far), so `spec.explore` can
visit each one once and the tests can compare the core with it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import NamedTuple


class State(enum.Enum):
    """The states of a task on the scheduler, spelled as in the core."""

    RELEASED = "released"  # record kept as lineage; no value; nobody needs it
    WAITING = "waiting"  # needed; some input is not in memory
    QUEUED = "queued"  # ready root task; every live worker is saturated
    NO_WORKER = "no-worker"  # ready; no allowed worker is alive
    PROCESSING = "processing"  # assigned to one live worker
    MEMORY = "memory"  # at least one live worker holds its value
    ERRED = "erred"  # it or an input failed; the failure is kept
    LOST = "lost"  # scattered data whose every copy is gone
    FORGOTTEN = "forgotten"  # no record (only ever seen in transitions)

    # Identity hashing: worlds are hashed millions of times by the explorer,
    # and Enum's own __hash__ (by name) is comparatively slow.
    __hash__ = object.__hash__


RELEASED, WAITING, QUEUED, NO_WORKER, PROCESSING, MEMORY, ERRED, LOST, FORGOTTEN = State
# Tuples, not sets: membership by identity is cheaper than hashing an Enum,
# and the explorer asks these questions millions of times.
IN_PROGRESS = (WAITING, QUEUED, NO_WORKER, PROCESSING)
FAILED = (ERRED, LOST)

# The kinds of failure a future can raise (design.md §1).
ERROR = "error"  # the user's function raised
KILLED = "killed-worker"  # trioflow.KilledWorker
LOST_DATA = "lost-data"  # trioflow.LostData
CANCELLED = "cancelled"  # trioflow.CancelledError


class Failure(NamedTuple):
    """Why a task has no value: its kind and the key that failed first."""

    kind: str
    origin: str

    def __str__(self) -> str:
        return f"{self.kind}({self.origin})"


# ------------------------------------------------------------------ scope --


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """One key of a scope: its inputs, and where it comes from.

    Attributes:
        deps: the keys whose values it takes (listed earlier in the scope).
        scattered: data put on workers by a client; it has no lineage.
        restrict: if given, the only workers allowed to run it.
        small: its value is small enough to travel with the report of its
            completion, so the clients holding it then have the value.
        loose: with `restrict`, a preference only: while none of those
            workers is alive, any live worker may run it.
        resources: ``(("GPU", 1),)``: it holds that much of each resource on
            its worker while processing there; only a worker that declared
            enough, free of what its other tasks hold, may take it.
        priority: the user's priority; a root task of higher priority is
            never left queued while one of lower priority is sent out.
    """

    deps: tuple[str, ...] = ()
    scattered: bool = False
    restrict: tuple[str, ...] | None = None
    small: bool = False
    loose: bool = False
    resources: tuple[tuple[str, int], ...] = ()
    priority: int = 0

    @property
    def constrained(self) -> bool:
        """Placed only on the workers its restrictions and resources allow."""
        return self.restrict is not None or bool(self.resources)


# Events the explorer may try; a scope can switch some off to stay small.
ALL_FEATURES = frozenset(
    {
        "cancel",  # Cancel
        "client-leaves",  # ClientLeaves
        "retire",  # WorkerRetires (a clean, expected departure)
        "rejoin-with-data",  # WorkerJoins with held data
        "reconnect",  # WorkerJoins for an address still thought alive
        "stale-finish",  # TaskFinishes from a worker it is not assigned to (ignored)
        "scatter-to-dead",  # Scatter whose only holder died before it was recorded
        "replicate",  # Replicate
        "restart",  # Restart
        "scheduler-restart",  # SchedulerRestarts
        "fire-and-forget",  # FireAndForget
        "steal",  # work stealing: the steal rule of `_place`, and StealAnswered
        "pause",  # WorkerPauses, WorkerResumes
    }
)

# The pseudo-client that holds a key a client fired and forgot, until the
# key has a value or a failure. It is told nothing and releases nothing.
FIRE_AND_FORGET = "fire-and-forget"

# `Task.thief` of a steal still pending whose thief left: if the victim
# gives the task up, it is placed afresh.
THIEF_GONE = "(gone)"


@dataclasses.dataclass(frozen=True)
class Scope:
    """The bounds of a model: keys, workers, clients, faults.

    Attributes:
        keys: every key, in dependency order (inputs first).
        workers: worker addresses; each starts absent and may join.
        clients: client ids.
        allowed_failures: deaths a running task may witness (Config).
        capacity: tasks a worker takes before root tasks queue (the core's
            ``max(1, ceil(nthreads * worker_saturation))``).
        max_faults: how many faults (worker deaths, lost replicas,
            scheduler restarts) the explorer may inject.
        features: which optional events the explorer tries.
        worker_resources: what each worker declares, ``{"w1": (("GPU", 1),)}``.
    """

    keys: Mapping[str, KeySpec]
    workers: tuple[str, ...] = ("w1", "w2")
    clients: tuple[str, ...] = ("c1",)
    allowed_failures: int = 2
    capacity: int = 1
    max_faults: int = 2
    features: frozenset[str] = ALL_FEATURES
    worker_resources: Mapping[str, tuple[tuple[str, int], ...]] = dataclasses.field(default_factory=dict)

    def has(self, worker: str, name: str) -> int:
        """How much of resource `name` `worker` declared."""
        return dict(self.worker_resources.get(worker, ())).get(name, 0)

    def __hash__(self) -> int:
        return hash((tuple(self.keys.items()), self.workers, self.clients))

    def computed(self) -> list[str]:
        return [k for k, s in self.keys.items() if not s.scattered]

    def scattered(self) -> list[str]:
        return [k for k, s in self.keys.items() if s.scattered]

    def lineage(self, key: str) -> list[str]:
        """`key` and every key it (transitively) depends on, inputs first."""
        seen: set[str] = set()

        def visit(k: str) -> None:
            if k not in seen:
                seen.add(k)
                for d in self.keys[k].deps:
                    visit(d)

        visit(key)
        return [k for k in self.keys if k in seen]

    def ancestors(self, key: str) -> set[str]:
        return set(self.lineage(key)) - {key}


# ------------------------------------------------------------------ world --


class Task(NamedTuple):
    """The scheduler's record of one key."""

    state: State
    # The inputs linked when the record was made (a scattered input that did
    # not exist then is not linked; the task erred instead).
    deps: tuple[str, ...] = ()
    # Set iff PROCESSING: the one live worker it is assigned to.
    processing_on: str | None = None
    # That worker said it started (only then does its death count).
    running: bool = False
    # Non-empty iff MEMORY; only live workers.
    who_has: frozenset[str] = frozenset()
    # Worker deaths witnessed while running. Only grows.
    suspicious: int = 0
    # Set iff ERRED or LOST.
    failure: Failure | None = None
    # Copies a client asked to keep (0: no request).
    replicas: int = 0
    # Live workers asked to fetch a copy, not holding one yet. Only in
    # memory, or for scattered data released while it awaits such a copy
    # (its last holder left first: INV-AWAITED).
    pending: frozenset[str] = frozenset()
    # A steal asked of its worker (the victim) that has not answered yet:
    # the worker that will get it (THIEF_GONE if it left). Only while PROCESSING.
    thief: str | None = None


class World(NamedTuple):
    """Everything the scheduler knows, as one immutable value."""

    tasks: tuple[tuple[str, Task], ...]  # sorted by key
    live: frozenset[str]
    holds: frozenset[tuple[str, str]]  # (client, key)
    faults: int
    # Holds whose client got the value itself with the report (small values).
    delivered: frozenset[tuple[str, str]] = frozenset()
    # Live workers whose memory passed their pause fraction: sent nothing new.
    paused: frozenset[str] = frozenset()

    def task(self, key: str) -> Task | None:
        for k, t in self.tasks:
            if k == key:
                return t
        return None

    def state_of(self, key: str) -> State:
        t = self.task(key)
        return FORGOTTEN if t is None else t.state

    def describe(self) -> str:
        parts = []
        for k, t in self.tasks:
            extra = []
            if t.processing_on:
                extra.append(f"on={t.processing_on}{'*' if t.running else ''}")
            if t.who_has:
                extra.append("has=" + ",".join(sorted(t.who_has)))
            if t.suspicious:
                extra.append(f"susp={t.suspicious}")
            if t.failure:
                extra.append(str(t.failure))
            if t.replicas or t.pending:
                extra.append(f"n={t.replicas} pending={sorted(t.pending)}")
            if t.thief is not None:
                extra.append(f"stealing->{t.thief}")
            parts.append(f"{k}:{t.state.value}" + (f"[{' '.join(extra)}]" if extra else ""))
        holds = ",".join(f"{c}>{k}" + ("(has value)" if (c, k) in self.delivered else "") for c, k in sorted(self.holds))
        paused = f" paused {sorted(self.paused)}" if self.paused else ""
        return (
            f"tasks {{{'; '.join(parts)}}} live {sorted(self.live)}{paused} "
            f"holds {{{holds}}} faults {self.faults}"
        )


EMPTY = World((), frozenset(), frozenset(), 0)


class Report(NamedTuple):
    """What a client is told: ("finished"|"erred"|"lost"|"cancelled", ...)."""

    kind: str
    client: str
    key: str
    failure: Failure | None = None


class Outcome(NamedTuple):
    world: World
    reports: frozenset[Report]
    # (worker, key) for every assignment the step made: the core must send
    # each of these a ComputeTask.
    computes: frozenset[tuple[str, str]]
    # The (from, to) pairs of TRANSITIONS this step took.
    moves: frozenset[tuple[State, State]] = frozenset()


# ----------------------------------------------------------------- events --


class Submit(NamedTuple):
    """A client submits `key` with its lineage and holds a future for it."""

    client: str
    key: str


class Release(NamedTuple):
    """A client dropped its last future for `key`."""

    client: str
    key: str


class Cancel(NamedTuple):
    """A client cancels `key` and every dependent of it that it holds."""

    client: str
    key: str


class ClientLeaves(NamedTuple):
    """A client disconnected: it releases everything it held."""

    client: str


class Scatter(NamedTuple):
    """A client's data landed on `worker` (which may have died meanwhile)."""

    client: str
    key: str
    worker: str


class WorkerJoins(NamedTuple):
    """`worker` registered, already holding `held` (a reconnect or re-registration)."""

    worker: str
    held: tuple[str, ...] = ()


class WorkerDies(NamedTuple):
    """`worker`'s connection closed or its heartbeats stopped (a fault)."""

    worker: str


class WorkerRetires(NamedTuple):
    """`worker` was retired on purpose: nothing running there is suspected."""

    worker: str


class TaskStarts(NamedTuple):
    """The worker running `key` says it began (sent before the function runs)."""

    key: str


class TaskFinishes(NamedTuple):
    """`worker` reports `key`'s value."""

    key: str
    worker: str


class TaskRaises(NamedTuple):
    """The function of `key` raised on its worker."""

    key: str


class ReplicaAdded(NamedTuple):
    """`worker` now holds a copy of `key`."""

    key: str
    worker: str


class ReplicaLost(NamedTuple):
    """A fetch of `key` failed (a fault): `holder` answered that it no longer
    has it; `holder` None: no holder it tried answered at all (hung or
    unreachable: no proof that they lack it, so each stays a holder and its
    liveness is judged by heartbeats; seeds 75 and 439 of the hang mix).

    `dependent`, if given, is the task whose worker needed the value;
    `reporter`, if given, is a worker asked for a copy that could not get it.
    """

    key: str
    holder: str | None
    dependent: str | None = None
    reporter: str | None = None


class CopyDropped(NamedTuple):
    """`worker` says it dropped its copy of `key` (it was told to free it; the
    message may cross a report that made the scheduler count it again)."""

    key: str
    worker: str


class Replicate(NamedTuple):
    """A client asks that `n` copies of `key` be kept."""

    client: str
    key: str
    n: int


class StealAnswered(NamedTuple):
    """The worker `key` is processing on answers the steal asked of it: it
    gave the task up (it had not started it), or it keeps it."""

    key: str
    given_up: bool


class WorkerPauses(NamedTuple):
    """`worker`'s memory passed its pause fraction: it starts nothing new."""

    worker: str


class WorkerResumes(NamedTuple):
    """`worker`'s memory is back under its pause fraction."""

    worker: str


class FireAndForget(NamedTuple):
    """A client asks that `key` be computed even once nobody holds it."""

    client: str
    key: str


class Restart(NamedTuple):
    """`Client.restart()`: every task is flushed, every future cancelled."""


class SchedulerRestarts(NamedTuple):
    """The scheduler died and came back empty; workers re-register what
    they hold, clients re-submit the lineage of what they hold (a fault)."""


Event = (
    Submit | Release | Cancel | ClientLeaves | Scatter | WorkerJoins | WorkerDies | WorkerRetires
    | TaskStarts | TaskFinishes | TaskRaises | ReplicaAdded | ReplicaLost | CopyDropped | Replicate | Restart
    | SchedulerRestarts | FireAndForget | StealAnswered | WorkerPauses | WorkerResumes
)


def show(event: Event) -> str:
    args = ", ".join(repr(a) for a in event)
    return f"{type(event).__name__}({args})"


# ------------------------------------------------------ transition table --

# Every allowed (from, to) pair of a task's state, and the rules that take
# it. Event rules are CamelCase event names; internal rules are the names in
# RULES and `_place`. FORGOTTEN on the left means "no record yet".
TRANSITIONS: dict[tuple[State, State], tuple[str, ...]] = {
    (FORGOTTEN, RELEASED): ("Submit", "SchedulerRestarts"),
    (FORGOTTEN, MEMORY): ("Scatter", "SchedulerRestarts"),
    (FORGOTTEN, LOST): ("Scatter",),  # its only holder died before it was recorded
    (RELEASED, ERRED): ("Submit",),  # an input the scheduler does not know
    (RELEASED, LOST): ("SchedulerRestarts", "copy-not-coming"),  # scattered, and nobody has it (or will)
    (RELEASED, WAITING): ("needed",),
    # Scattered: resubmitted, then a worker brings it; or the copy it awaited came.
    (RELEASED, MEMORY): ("SchedulerRestarts", "ReplicaAdded", "WorkerJoins", "Scatter"),
    (RELEASED, FORGOTTEN): ("unreferenced", "Restart"),
    (WAITING, PROCESSING): ("ready",),
    (WAITING, MEMORY): ("WorkerJoins",),  # the value exists after all
    (WAITING, QUEUED): ("ready",),
    (WAITING, NO_WORKER): ("ready",),
    (WAITING, ERRED): ("input-failed",),
    (WAITING, RELEASED): ("not-needed",),
    (WAITING, FORGOTTEN): ("Restart",),
    # A queued task is a root task: it has no input to fail or vanish.
    (QUEUED, PROCESSING): ("ready",),
    (QUEUED, MEMORY): ("WorkerJoins",),
    (QUEUED, RELEASED): ("not-needed",),
    (QUEUED, FORGOTTEN): ("Restart",),
    (NO_WORKER, PROCESSING): ("ready",),  # an allowed worker joined, resumed, or has resources free
    (NO_WORKER, MEMORY): ("WorkerJoins",),
    (NO_WORKER, WAITING): ("input-gone",),
    (NO_WORKER, ERRED): ("input-failed",),
    (NO_WORKER, RELEASED): ("not-needed",),
    (NO_WORKER, FORGOTTEN): ("Restart",),
    (PROCESSING, MEMORY): ("TaskFinishes", "WorkerJoins"),
    # Stolen: its victim gave it up, and it moves to the thief.
    (PROCESSING, PROCESSING): ("StealAnswered",),
    (PROCESSING, WAITING): (
        "WorkerDies", "WorkerRetires", "WorkerJoins", "ReplicaLost", "input-gone",
        "StealAnswered",  # given up, but its thief left or paused: placed afresh
    ),
    (PROCESSING, ERRED): ("TaskRaises", "WorkerDies", "WorkerJoins", "input-failed"),
    (PROCESSING, RELEASED): ("not-needed",),
    (PROCESSING, FORGOTTEN): ("Restart",),
    (MEMORY, WAITING): ("recompute",),  # after WorkerDies, ReplicaLost, CopyDropped
    (MEMORY, LOST): ("last-copy-lost",),
    (MEMORY, RELEASED): ("not-needed", "await-copy"),  # await-copy: scattered, a copy on its way
    (MEMORY, FORGOTTEN): ("unreferenced", "Restart"),
    (ERRED, FORGOTTEN): ("unreferenced", "Restart"),
    (LOST, MEMORY): ("Scatter", "WorkerJoins"),  # a copy turned up again
    (LOST, FORGOTTEN): ("unreferenced", "Restart"),
}


class InvalidTransition(AssertionError):
    """The model tried a (from, to) pair its own table does not allow."""
