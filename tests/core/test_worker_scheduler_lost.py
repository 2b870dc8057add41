"""The worker core when its scheduler goes away (`SchedulerLost`), exact outputs.

A worker that loses its scheduler keeps its values and its running
threads (it will list them when it registers again) and drops every task
that has not started: the next scheduler sends what it still wants, and a
task kept here as well would run a second time (docs/resilience.md, "The
scheduler dies").

As in test_worker_state.py, each test compares whole lists of instructions,
with the stimulus id of the event it fed in.
"""

from tests.core.conftest import sid
from trioflow.core import WorkerState, WorkerTaskState
from trioflow.core.worker_events import (
    ComputeRequested,
    Execute,
    ExecutionSucceeded,
    Gather,
    GatherFailed,
    GatherSucceeded,
    ReplicasRequested,
    SchedulerLost,
    SendReplicaAdded,
    SendReplicaMissing,
    SendTaskFinished,
    SendTaskStarted,
)
from trioflow.core.worker_invariants import check_worker_invariants

ME, PEER, OTHER = "tcp://w1", "tcp://peer", "tcp://other"


def compute(key, who_has=None, priority=(1,)):
    who_has = who_has or {}
    return ComputeRequested(sid(), key, f"run-{key}", priority, who_has, {k: 10 for k in who_has})


def test_work_not_started_is_dropped_so_it_never_runs_twice(worker):
    """Kills the mutant that skips `_forget` of WAITING and READY tasks in
    `_on_scheduler_lost`: the READY task then starts when the thread frees
    up, while the next scheduler assigns it again (it runs twice)."""
    ev = compute("running", priority=(1,))
    assert worker.handle(ev) == [SendTaskStarted(ev.stimulus_id, "running"),
                                 Execute(ev.stimulus_id, "running", "run-running", ())]
    assert worker.handle(compute("ready", priority=(2,))) == []
    ev = compute("waiting", {"i": (PEER,)}, priority=(3,))
    assert worker.handle(ev) == [Gather(ev.stimulus_id, PEER, ("i",))]
    assert worker.tasks["ready"].state is WorkerTaskState.READY
    assert worker.tasks["waiting"].state is WorkerTaskState.WAITING
    assert worker.handle(SchedulerLost(sid())) == []
    # What the worker registers with next: the run in its thread, no value yet.
    assert worker.running() == ["running"]
    assert worker.memory() == {}
    assert sorted(worker.tasks) == ["i", "running"]
    s = sid()
    # Nothing else starts: "ready" was dropped with the scheduler.
    assert worker.handle(ExecutionSucceeded(s, "running", 8)) == [SendTaskFinished(s, "running", 8)]
    assert worker.memory() == {"running": 8}
    check_worker_invariants(worker)


def test_an_input_in_flight_is_kept_and_offered_when_it_lands(worker):
    """The fetch of a dropped task's input goes on; the value is kept and
    reported (the next scheduler counts it like any other copy)."""
    worker.handle(compute("t", {"i": (PEER,)}))
    assert worker.tasks["i"].state is WorkerTaskState.FLIGHT
    assert worker.handle(SchedulerLost(sid())) == []
    assert "t" not in worker.tasks and worker.tasks["i"].dependents == {}
    s = sid()
    assert worker.handle(GatherSucceeded(s, PEER, {"i": 10})) == [SendReplicaAdded(s, "i", 10)]
    assert worker.memory() == {"i": 10}


def test_a_copy_not_yet_requested_is_dropped():
    """A replica still queued for fetching (FETCH, nobody here needs it) is
    forgotten: the next scheduler asks again if it still wants it."""
    state = WorkerState(ME, nthreads=1, max_gathers=1)
    s = sid()
    assert state.handle(ReplicasRequested(s, {"a": (PEER,)}, {"a": 10})) == [Gather(s, PEER, ("a",))]
    assert state.handle(ReplicasRequested(sid(), {"b": (OTHER,)}, {"b": 10})) == []  # one request at a time
    assert (state.tasks["a"].state, state.tasks["b"].state) == (WorkerTaskState.FLIGHT, WorkerTaskState.FETCH)
    assert state.handle(SchedulerLost(sid())) == []
    assert sorted(state.tasks) == ["a"] and state.fetch == {}
    check_worker_invariants(state)


def test_a_withdrawn_compute_request_on_a_copy_in_flight_is_not_acted_upon(worker):
    """A value in flight that the old scheduler had also asked us to compute:
    if the fetch fails after the scheduler is gone, it is reported missing,
    not computed (nobody asks for that computation any more)."""
    s = sid()
    assert worker.handle(ReplicasRequested(s, {"k": (PEER,)}, {"k": 10})) == [Gather(s, PEER, ("k",))]
    assert worker.handle(compute("k")) == []
    assert worker.handle(SchedulerLost(sid())) == []
    assert worker.tasks["k"].assigned is False
    s = sid()
    out = worker.handle(GatherFailed(s, PEER, ("k",)))
    # PEER did not answer: not named as lacking the value (seed 75 of the hang mix).
    assert out == [SendReplicaMissing(s, "k", (), None)]
    assert worker.tasks == {}
