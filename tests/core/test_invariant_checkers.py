"""The invariant checkers catch what they promise: one broken state per check.

`check_invariants` and `check_worker_invariants` run at the teardown of
every core test, after every step of the property tests and at the end of
every chaos run; a check that never fires would make all of those pass.
So each test here builds a sound state (the checker passes), breaks one
thing, and requires the checker to name that very invariant.
"""

from __future__ import annotations

import pytest

from tests.core.conftest import sid
from trioflow.core import SchedulerState, UserError, WorkerState, WorkerTaskState
from trioflow.core.scheduler_events import (
    DataScattered,
    ReplicationRequested,
    TaskErred,
    TaskFinished,
    TaskSpec,
    TasksSubmitted,
    TaskStarted,
    WorkerConnected,
    WorkerDisconnected,
)
from trioflow.core.scheduler_invariants import InvariantViolation, check_invariants
from trioflow.core.scheduler_records import Orphan, SchedulerTask, TaskState
from trioflow.core.worker_events import ComputeRequested, DataPut, FreeRequested
from trioflow.core.worker_invariants import check_worker_invariants
from trioflow.core.worker_state import WorkerTask

A, B, C, DEAD = "tcp://a", "tcp://b", "tcp://c", "tcp://dead"
BOOM = UserError(None, "ValueError", "boom", "tb")


# ------------------------------------------------------------ scheduler --


def spec(key, *deps, workers=None):
    return TaskSpec(key, f"run-{key}", tuple(deps), 0, workers)


def sound_scheduler() -> SchedulerState:
    """A scheduler with a task in every state, sound (`check_invariants` passes).

    x memory (on A), y processing on A (needs x), z waiting (needs y); p
    released (lineage of m, in memory on B); e erred; s scattered on B with
    a copy pending on C; gone lost; r no-worker (only on a dead worker);
    q0..q4 roots, some processing, some queued; o an orphan held by C.
    """
    state = SchedulerState(allowed_failures=3, worker_saturation=1.0)
    state.handle(WorkerConnected(sid(), A, 2))
    state.handle(WorkerConnected(sid(), B, 1))
    state.handle(WorkerConnected(sid(), C, 1, held={"o": 8}))
    state.handle(TasksSubmitted(sid(), "c1", (spec("x"),), ("x",)))
    _finish(state, "x")
    state.handle(TasksSubmitted(sid(), "c1", (spec("p"), spec("m", "p")), ("m",)))
    _finish(state, "p")
    _finish(state, "m")
    state.handle(TasksSubmitted(sid(), "c1", (spec("e"),), ("e",)))
    worker = state.tasks["e"].processing_on
    state.handle(TaskErred(sid(), worker, "e", BOOM))
    state.handle(DataScattered(sid(), "c1", {"s": (8, (B,)), "gone": (8, (DEAD,))}))
    state.handle(ReplicationRequested(sid(), "c1", ("s",), 2))
    state.handle(TasksSubmitted(sid(), "c1", (spec("y", "x"), spec("z", "y")), ("z",)))
    state.handle(TasksSubmitted(sid(), "c1", (spec("r", workers=(DEAD,)),), ("r",)))
    roots = [f"q{i}" for i in range(5)]
    state.handle(TasksSubmitted(sid(), "c1", tuple(spec(k) for k in roots), tuple(roots)))
    return state


def _finish(state, key):
    worker = state.tasks[key].processing_on
    state.handle(TaskStarted(sid(), worker, key))
    state.handle(TaskFinished(sid(), worker, key, 8))


def _unwant(state, key):
    del state.tasks[key].who_wants["c1"]
    del state.clients["c1"][key]


def _set(obj, **fields):
    for name, value in fields.items():
        setattr(obj, name, value)


def _queued_key(state):
    return next(k for k, ts in state.tasks.items() if ts.state is TaskState.QUEUED)


def _saturated_worker(state):
    return next(a for a, ws in state.workers.items() if ws.saturated)


T = lambda state, key: state.tasks[key]  # noqa: E731 - a short name for the table

SCHEDULER_BREAKS = {
    "stored under the wrong key or forgotten": lambda s: _set(T(s, "x"), state=TaskState.FORGOTTEN),
    "dependency 'x' is not a live record": lambda s: T(s, "y").own("dependencies").__setitem__("x", SchedulerTask("x", "run", (0,))),
    "not among the dependents of": lambda s: T(s, "x").dependents.pop("y"),
    "dependent 'ghost' does not link back": lambda s: T(s, "x").own("dependents").__setitem__("ghost", SchedulerTask("ghost", "r", (0,))),
    "dependent 'e' does not link back": lambda s: T(s, "x").own("dependents").__setitem__("e", T(s, "e")),
    "INV-WAITERS": lambda s: T(s, "x").waiters.clear(),
    "INV-PROCESSING processing_on=": lambda s: _set(T(s, "y"), processing_on=None),
    "INV-PROCESSING not listed by live worker": lambda s: s.workers[A].processing.pop("y"),
    "INV-MEMORY who_has=": lambda s: T(s, "m").who_has.clear(),
    "INV-MEMORY holder": lambda s: T(s, "x").own("who_has").__setitem__(DEAD, None),
    "INV-READY inputs not all in memory": lambda s: _set(T(s, "x"), state=TaskState.LOST),
    "INV-WAITING waiting_on": lambda s: T(s, "z").waiting_on.clear(),
    "waiting_on set outside WAITING": lambda s: T(s, "y").own("waiting_on").__setitem__("x", None),
    "INV-FAILED": lambda s: _set(T(s, "e"), failure=None),
    "INV-LOST a task with lineage is never lost": lambda s: _set(T(s, "gone"), run_spec="run-gone"),
    "INV-KILLED": lambda s: _set(T(s, "x"), suspicious=3),
    "which does not list it": lambda s: T(s, "x").own("who_wants").__setitem__("c9", None),
    "INV-NEEDED released although its value is needed": lambda s: (
        T(s, "p").own("who_wants").__setitem__("c1", None), s.clients["c1"].__setitem__("p", None)
    ),
    "delivered to": lambda s: T(s, "x").own("delivered").__setitem__("c9", None),
    "INV-NEEDED in progress although nobody needs its value": lambda s: _unwant(s, "z"),
    "INV-FORGET unreferenced but not forgotten": lambda s: _unwant(s, "e"),
    "INV-FORGET unreferenced value kept": lambda s: _unwant(s, "m"),
    "INV-REPLICAS pending copy at": lambda s: T(s, "s").own("replicas_pending").__setitem__(DEAD, None),
    "INV-REPLICAS copies pending outside memory": lambda s: (
        T(s, "e").own("replicas_pending").__setitem__(C, None), s.workers[C].replicating.__setitem__("e", None)
    ),
    "replicated mismatch": lambda s: _set(T(s, "s"), replicas_wanted=1),
    "no-worker <-> unrunnable mismatch": lambda s: s.unrunnable.pop("r"),
    "queued but not in the queue": lambda s: s.queued.clear(),
    "client 'c1': holds 'ghost'": lambda s: s.clients["c1"].__setitem__("ghost", None),
    "lists 'x' as processing": lambda s: s.workers[B].processing.__setitem__("x", None),
    "lists 'x' as held": lambda s: s.workers[C].has_what.__setitem__("x", None),
    "lists 'x' as replicating": lambda s: s.workers[B].replicating.__setitem__("x", None),
    "idle=True saturated=True": lambda s: s.idle.__setitem__(_saturated_worker(s), None),
    "idle worker tcp://dead is not live": lambda s: s.idle.__setitem__(DEAD, None),
    "orphan 'x' has a task record": lambda s: s.orphans.__setitem__("x", s.orphans["o"]),
    "is held and run by nobody": lambda s: s.orphans.__setitem__("o2", Orphan()),
    "names dead worker tcp://dead": lambda s: s.orphans["o"].holders.__setitem__(DEAD, None),
    "recovering run of 'x'": lambda s: s.recovering_runs.__setitem__("x", A),
    "awaited holder of 'x' is stale": lambda s: s.awaiting_holders.__setitem__("x", None),
    "resources in use": lambda s: s.workers[A].used.__setitem__("GPU", 1.0),
    "a task is queued while a worker is idle": lambda s: s.idle.__setitem__(_saturated_worker(s), None),
}


def test_the_sound_scheduler_state_has_every_kind_of_task():
    """The base of the cases below is sound and has a task in every state."""
    state = sound_scheduler()
    check_invariants(state)
    states = {ts.state for ts in state.tasks.values()}
    assert states == set(TaskState) - {TaskState.FORGOTTEN}
    assert state.orphans and state.replicated and state.unrunnable and _queued_key(state)


@pytest.mark.parametrize("names", SCHEDULER_BREAKS)
def test_the_scheduler_checker_flags_each_broken_invariant(names):
    """Breaking one thing in a sound state makes `check_invariants` name it."""
    state = sound_scheduler()
    SCHEDULER_BREAKS[names](state)
    with pytest.raises(InvariantViolation) as raised:
        check_invariants(state)
    assert names in str(raised.value)


def test_a_run_a_registering_worker_still_has_is_sound_while_its_task_waits():
    """A run taken up after a scheduler restart (`recovering_runs`) is sound
    while its task waits for an input, whatever the other tasks' states
    (here the last record is a value in memory): the checker judges that
    task, not another (kills the mutants that drop its lookup in the
    recovering-runs check, or turn its `ts is None` round)."""
    state = SchedulerState(allowed_failures=3, worker_saturation=1.0)
    state.handle(WorkerConnected(sid(), A, 1, running=("t",)))
    state.handle(WorkerConnected(sid(), B, 1))
    state.handle(TasksSubmitted(sid(), "c1", (spec("i"), spec("t", "i")), ("t",)))
    state.handle(TasksSubmitted(sid(), "c1", (spec("m"),), ("m",)))
    _finish(state, "m")
    assert state.recovering_runs == {"t": A} and state.tasks["t"].state is TaskState.WAITING
    assert list(state.tasks)[-1] == "m" and state.tasks["m"].state is TaskState.MEMORY
    check_invariants(state)


def test_a_dead_workers_tasks_are_not_left_assigned():
    """A worker removed without its tasks being rerouted is flagged (the
    state a missing `WorkerDisconnected` handler would leave)."""
    state = sound_scheduler()
    del state.workers[A]
    state.idle.pop(A, None)
    with pytest.raises(InvariantViolation, match="INV-PROCESSING not listed by live worker"):
        check_invariants(state)
    state = sound_scheduler()
    state.handle(WorkerDisconnected(sid(), A))
    check_invariants(state)


# --------------------------------------------------------------- worker --

ME, PEER, OTHER = "tcp://w1", "tcp://peer", "tcp://other"


def compute(key, who_has=None, priority=(1,)):
    who_has = who_has or {}
    return ComputeRequested(sid(), key, f"run-{key}", priority, who_has, {k: 10 for k in who_has})


def sound_worker() -> WorkerState:
    """A worker with a task in every state, sound (`check_worker_invariants` passes).

    Two threads run x (executing) and c (released while running: cancelled);
    r is ready; w waits on i (in flight from PEER); v waits on j (to fetch
    from OTHER: one request at a time); m is a value put here.
    """
    state = WorkerState(ME, nthreads=2, max_gathers=1)
    state.handle(compute("x"))
    state.handle(compute("c"))
    state.handle(FreeRequested(sid(), ("c",)))
    state.handle(compute("r"))
    state.handle(compute("w", {"i": (PEER,)}))
    state.handle(compute("v", {"j": (OTHER,)}))
    state.handle(DataPut(sid(), {"m": 10}))
    return state


W = lambda state, key: state.tasks[key]  # noqa: E731

WORKER_BREAKS = {
    "tasks executing on 1 threads": lambda s: _set(s, nthreads=1),
    "counted as executing but is": lambda s: (s.executing.pop("x"), s.executing.__setitem__("m", None)),
    "not counted as executing": lambda s: s.executing.pop("x"),
    "dependency 'i' does not link back": lambda s: W(s, "i").dependents.pop("w"),
    "dependent 'ghost' is not a live record": lambda s: W(s, "i").dependents.__setitem__("ghost", WorkerTask("ghost", WorkerTaskState.WAITING)),
    "dependent 'r' does not link back": lambda s: W(s, "i").dependents.__setitem__("r", W(s, "r")),
    "input 'i' is flight": lambda s: (W(s, "r").dependencies.__setitem__("i", W(s, "i")), W(s, "i").dependents.__setitem__("r", W(s, "r"))),
    "not in the ready heap": lambda s: s.ready.clear(),
    "waiting_on": lambda s: W(s, "w").waiting_on.clear(),
    "FETCH <-> fetch queue mismatch": lambda s: s.fetch.clear(),
    "FLIGHT without a request in flight": lambda s: s.in_flight.clear(),
    "nothing left to fetch it from": lambda s: W(s, "j").holders.clear(),
    "waiting to run but not assigned here": lambda s: _set(W(s, "r"), assigned=False),
    "fetch queue holds forgotten": lambda s: s.fetch.__setitem__("ghost", None),
    "gathers in flight, limit 0": lambda s: _set(s, max_gathers=0),
    # Each half of the seceded check alone (a task both executing and
    # seceded; a task rejoining that never seceded).
    "seceded ['x'], rejoining [] overlap": lambda s: s.seceded.__setitem__("x", None),
    "seceded [], rejoining ['x'] overlap": lambda s: (s.executing.pop("x"), s.rejoining.__setitem__("x", None)),
}


def test_the_sound_worker_state_has_every_kind_of_task():
    """The base of the cases below is sound and has a task in every state."""
    state = sound_worker()
    check_worker_invariants(state)
    assert {ts.state for ts in state.tasks.values()} == set(WorkerTaskState)


@pytest.mark.parametrize("names", WORKER_BREAKS)
def test_the_worker_checker_flags_each_broken_invariant(names):
    """Breaking one thing in a sound worker makes `check_worker_invariants` name it."""
    state = sound_worker()
    WORKER_BREAKS[names](state)
    with pytest.raises(InvariantViolation) as raised:
        check_worker_invariants(state)
    assert names in str(raised.value)
