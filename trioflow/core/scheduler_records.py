"""The scheduler's records: task states, one record per task, one per worker.

These are plain mutable records; only `SchedulerState` changes them, and only
inside a transition. Field comments mark the invariants that
`trioflow.core.scheduler_invariants.check_invariants` enforces (spec/README.md
names them INV-*).
"""

from __future__ import annotations

import enum
import math
from typing import Any

from trioflow.core.failures import TaskFailure
from trioflow.core.durations import key_prefix


class TaskState(enum.Enum):
    """Where a task is in its life, spelled as in spec/README.md."""

    RELEASED = "released"  # known (lineage kept), no value, nobody needs it now
    WAITING = "waiting"  # needed; some dependency is not in memory yet
    QUEUED = "queued"  # ready, no dependencies, every worker is saturated
    NO_WORKER = "no-worker"  # ready, but no live worker satisfies its restrictions
    PROCESSING = "processing"  # assigned to exactly one live worker
    MEMORY = "memory"  # its value is held by at least one live worker
    ERRED = "erred"  # it (or a dependency) failed; the failure is kept
    LOST = "lost"  # scattered data whose every copy died; cannot be recomputed
    FORGOTTEN = "forgotten"  # the record is gone (only seen in logs)


# States in which a task is still on its way to a value: the tasks that count
# as "waiters" of their dependencies.
IN_PROGRESS = frozenset(
    {TaskState.WAITING, TaskState.QUEUED, TaskState.NO_WORKER, TaskState.PROCESSING}
)
# States with a final outcome a client can be told about.
FAILED = frozenset({TaskState.ERRED, TaskState.LOST})


class _NoEntries(dict):
    """The one, always empty, stand-in for a task's dict until it has an entry.

    A scheduler holds a record per task, a hundred thousand of them pending
    at once; most of their eight dicts stay empty for life (a root task has
    no dependencies, dependents, waiters...), and an empty dict is 64 bytes.
    So a record's dicts start as this shared object, on which reading,
    iterating, `pop` with a default, `clear` and `del` (a `KeyError`) work
    as on any empty dict; only a write needs a dict of the task's own, made
    by `SchedulerTask.own`. Every way of writing raises here, so a write
    that forgot to ask for one fails loudly instead of filling the dict
    every task shares.
    """

    __slots__ = ()

    def _shared(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a task's shared empty dict cannot be written: use SchedulerTask.own(name)")

    __setitem__ = setdefault = update = __ior__ = popitem = _shared


NO_ENTRIES: dict = _NoEntries()


# Submissions a scheduler numbers; far more than it will ever see.
_SUBMISSIONS = 1 << 64


def task_priority(user_priority: int, submitted: int) -> int:
    """The scheduler's priority of a task: lower runs first.

    One int that orders like the pair (-user_priority, submitted), so the
    user's priority comes first and, within it, earlier work finishes first.
    An int and not that pair because every pending task keeps one, and W8
    counts its bytes; `wire_priority` gives the pair back for the worker.
    """
    return -user_priority * _SUBMISSIONS + submitted


def wire_priority(priority: int) -> tuple[int, int]:
    """The pair (-user_priority, submitted) a `task_priority` stands for."""
    return divmod(priority, _SUBMISSIONS)


class SchedulerTask:
    """What the scheduler knows about one key.

    Memory: the dicts below start as the shared `NO_ENTRIES` and become a
    dict of the task's own at their first entry (`own`); `priority` is one
    int (`task_priority`). With the key kept once (the records, the
    clients' wants and the queue share the task's key string), a pending
    task costs the scheduler under 1,000 bytes (W8, benchmarks/README.md).
    """

    __slots__ = (
        "key",
        "prefix",
        "run_spec",
        "priority",
        "retries_left",
        "restrictions",
        "loose",
        "resources",
        "state",
        "dependencies",
        "dependents",
        "waiting_on",
        "waiters",
        "who_wants",
        "delivered",
        "who_has",
        "processing_on",
        "running",
        "nbytes",
        "suspicious",
        "last_worker",
        "failure",
        "failure_origin",
        "replicas_wanted",
        "replicas_pending",
    )

    def __init__(
        self,
        key: str,
        run_spec: Any,
        priority: int,
        retries: int = 0,
        restrictions: tuple[str, ...] | None = None,
        loose: bool = False,
        resources: dict[str, float] | None = None,
    ):
        self.key = key
        # The function part of the key ("inc" for "inc-9f2c..."): tasks with
        # the same prefix are taken to last about as long (core/durations.py).
        self.prefix = key_prefix(key)
        # What a worker runs; None for scattered data, which has no lineage.
        self.run_spec = run_spec
        # Lower runs first: one int that orders like (-user priority,
        # submission number), so the user's priority comes first and earlier
        # work finishes first (`task_priority`).
        self.priority = priority
        self.retries_left = retries
        # The only workers allowed to run it (None: any); with `loose`, the
        # workers it prefers while one of them is alive.
        self.restrictions = restrictions
        self.loose = loose
        # {name: amount} it holds on its worker while processing there.
        self.resources = resources
        self.state = TaskState.RELEASED
        # Ordered dicts used as sets: iteration order must not depend on
        # hash() of strings (design.md §3 rule 6). Each starts as the shared
        # `NO_ENTRIES`; writers ask for the task's own first (`own`).
        self.dependencies: dict[str, SchedulerTask] = NO_ENTRIES
        self.dependents: dict[str, SchedulerTask] = NO_ENTRIES
        # Invariant: only while WAITING; exactly the dependencies not available.
        self.waiting_on: dict[str, None] = NO_ENTRIES
        # Invariant: the dependents in IN_PROGRESS states (they need our value).
        self.waiters: dict[str, None] = NO_ENTRIES
        # Clients holding a future for this key. Invariant: never forgotten
        # while non-empty.
        self.who_wants: dict[str, None] = NO_ENTRIES
        # The clients of `who_wants` that got the value itself with the
        # report of its completion (small values): losing every copy in the
        # cluster loses nothing they need. Invariant: a subset of who_wants.
        self.delivered: dict[str, None] = NO_ENTRIES
        # Invariant: non-empty iff MEMORY; every holder is a live worker.
        self.who_has: dict[str, None] = NO_ENTRIES
        # Invariant: set iff PROCESSING, and that worker lists this task.
        self.processing_on: str | None = None
        # True once the worker said it started executing this assignment.
        self.running = False
        self.nbytes = 0
        # Worker deaths while this task was running there. Only grows.
        self.suspicious = 0
        self.last_worker: str | None = None
        # Set iff ERRED or LOST; dependents share the record and the origin.
        self.failure: TaskFailure | None = None
        self.failure_origin: str | None = None
        # Copies a client asked to keep (Client.replicate); 1 unless asked.
        self.replicas_wanted = 1
        # Workers asked to fetch a copy that has not arrived yet.
        # Invariant: disjoint from who_has; every entry is a live worker.
        self.replicas_pending: dict[str, None] = NO_ENTRIES

    @property
    def has_lineage(self) -> bool:
        return self.run_spec is not None

    def own(self, name: str) -> dict:
        """The task's dict `name`, made its own first if it is still the
        shared empty one: call before writing an entry into it."""
        entries = getattr(self, name)
        if entries is NO_ENTRIES:
            entries = {}
            setattr(self, name, entries)
        return entries

    def __repr__(self) -> str:
        return f"<SchedulerTask {self.key!r} {self.state.value}>"


class SchedulerWorker:
    """What the scheduler knows about one live worker."""

    __slots__ = (
        "address", "nthreads", "capacity", "refill_at", "processing", "has_what", "replicating", "resources", "used",
        "paused", "prefixes", "incoming",
    )

    def __init__(self, address: str, nthreads: int, saturation: float, resources: dict[str, float] | None = None):
        self.address = address
        self.nthreads = nthreads
        # What it declared ({"GPU": 2}), and how much of it the tasks
        # processing here hold. Invariant: `used` is the sum of the
        # resources of the tasks in `processing`, and never exceeds `resources`.
        self.resources: dict[str, float] = dict(resources or {})
        self.used: dict[str, float] = {}
        # How many tasks may be assigned here at once before root tasks queue
        # on the scheduler instead (Config.worker_saturation).
        self.capacity = (
            math.inf if math.isinf(saturation) else max(1, math.ceil(nthreads * saturation))
        )
        # A saturated worker takes root tasks again only once it is down to
        # this many, and is then topped up to capacity in one go: the queued
        # tasks travel as a batch instead of one message per finished task.
        self.refill_at = self.capacity if math.isinf(self.capacity) else self.capacity // 2
        # Invariant: exactly the PROCESSING tasks whose processing_on is us.
        self.processing: dict[str, None] = {}
        # Invariant: exactly the MEMORY tasks whose who_has lists us.
        self.has_what: dict[str, None] = {}
        # Keys we were asked to fetch a copy of (their replicas_pending lists us).
        self.replicating: dict[str, None] = {}
        # The worker said its memory passed its pause fraction: it starts
        # nothing new, so nothing new is sent to it (docs/resilience.md).
        self.paused = False
        # How many of the tasks in `processing` have each key prefix: with
        # the average durations per prefix this gives the worker's backlog
        # in seconds at any time, in O(prefixes) (core/stealing.py).
        # Invariant: exactly the prefixes of `processing`, counted.
        self.prefixes: dict[str, int] = {}
        # Keys this worker asked to steal whose victim has not answered yet.
        # Invariant: exactly the pending steals whose thief is this worker.
        self.incoming: dict[str, None] = {}

    def fits(self, resources: dict[str, float] | None) -> bool:
        """Whether a task needing `resources` may start here now."""
        return not resources or all(
            self.used.get(name, 0) + amount <= self.resources.get(name, 0) for name, amount in resources.items()
        )

    @property
    def occupancy(self) -> float:
        return len(self.processing) / self.nthreads

    @property
    def starving(self) -> bool:
        """A thread here has, or will soon have, nothing to run: it may steal."""
        return not self.paused and len(self.processing) + len(self.incoming) < self.nthreads

    @property
    def backlogged(self) -> bool:
        """Some task here waits for a thread (or for the pause to end): it may be stolen."""
        return len(self.processing) > (0 if self.paused else self.nthreads)

    @property
    def saturated(self) -> bool:
        return len(self.processing) >= self.capacity

    @property
    def hungry(self) -> bool:
        """Low enough on work to be topped up with queued root tasks."""
        return len(self.processing) <= self.refill_at and not self.saturated

    def __repr__(self) -> str:
        return f"<SchedulerWorker {self.address} {len(self.processing)}/{self.nthreads}>"


class Orphan:
    """A key a worker holds or runs that this scheduler has no task for (yet).

    After a scheduler restart, workers re-register before clients resubmit
    their lineage; the orphan keeps what the workers said so that the
    resubmitted task can take the value (or the running thread) instead of
    computing it again.
    """

    __slots__ = ("nbytes", "holders", "running_on")

    def __init__(self) -> None:
        self.nbytes = 0
        # Invariant: live workers only.
        self.holders: dict[str, None] = {}
        self.running_on: str | None = None

    def __repr__(self) -> str:
        return f"<Orphan holders={list(self.holders)} running_on={self.running_on}>"
