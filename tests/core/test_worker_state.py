"""The worker state machine, events in and exact instructions out (no I/O).

Every test compares the *whole* list of instructions an event returns, in
order, so an extra or missing message fails it; and each instruction's
stimulus id is compared with the id of the event the test fed in (`ev`,
or `s` when the event is built inline), never with one read off the output.
"""

import pytest

from tests.core.conftest import sid
from trioflow.core import UserError, WorkerState, WorkerTaskState
from trioflow.core.worker_events import (
    ComputeRequested,
    DataPut,
    DropData,
    Execute,
    ExecutionFailed,
    ExecutionSucceeded,
    FreeRequested,
    Gather,
    GatherFailed,
    GatherSucceeded,
    Rejoin,
    ReplicasRequested,
    SendDataDropped,
    SendReplicaAdded,
    SendReplicaMissing,
    SendTaskErred,
    SendTaskFinished,
    SendTaskStarted,
    TaskRejoining,
    TaskSeceded,
)
from trioflow.core.worker_invariants import check_worker_invariants
from trioflow.core.worker_transitions import InvalidWorkerTransition, TaskEvent

ME, PEER, OTHER = "tcp://w1", "tcp://peer", "tcp://other"
BOOM = UserError(None, "ValueError", "boom", "tb")


def compute(key, who_has=None, priority=(1,)):
    who_has = who_has or {}
    return ComputeRequested(sid(), key, f"run-{key}", priority, who_has, {k: 10 for k in who_has})


def started(s, key, deps=()):
    """What starting `key` sends, in order: TaskStarted before Execute."""
    return [SendTaskStarted(s, key), Execute(s, key, f"run-{key}", deps)]


def test_a_task_without_inputs_starts_at_once(worker):
    """Compute -> started is reported before Execute; success reports finished."""
    ev = compute("x")
    assert worker.handle(ev) == started(ev.stimulus_id, "x")
    s = sid()
    assert worker.handle(ExecutionSucceeded(s, "x", 8)) == [SendTaskFinished(s, "x", 8)]
    assert worker.tasks["x"].state is WorkerTaskState.MEMORY


def test_threads_bound_how_many_run_and_priority_orders_the_rest(worker):
    """With one thread, the best priority waiting runs next."""
    ev = compute("first", priority=(5,))
    assert worker.handle(ev) == started(ev.stimulus_id, "first")
    assert worker.handle(compute("late", priority=(9,))) == []
    assert worker.handle(compute("urgent", priority=(1,))) == []
    assert list(worker.executing) == ["first"]
    s = sid()
    out = worker.handle(ExecutionSucceeded(s, "first", 1))
    assert out == [SendTaskFinished(s, "first", 1), *started(s, "urgent")]


def test_inputs_from_one_peer_are_fetched_in_one_request(worker):
    """Two inputs held by the same peer: one Gather for both, then the task runs."""
    ev = compute("z", {"a": (PEER,), "b": (PEER,)})
    assert worker.handle(ev) == [Gather(ev.stimulus_id, PEER, ("a", "b"))]
    s = sid()
    out = worker.handle(GatherSucceeded(s, PEER, {"a": 10, "b": 10}))
    assert out == [SendReplicaAdded(s, "a", 10), SendReplicaAdded(s, "b", 10), *started(s, "z", ("a", "b"))]


def test_a_failed_peer_is_replaced_by_the_next_holder(worker):
    """When one holder fails, the same input is fetched from the next one."""
    ev = compute("z", {"a": (PEER, OTHER)})
    assert worker.handle(ev) == [Gather(ev.stimulus_id, PEER, ("a",))]
    s = sid()
    assert worker.handle(GatherFailed(s, PEER, ("a",))) == [Gather(s, OTHER, ("a",))]


def test_an_input_nobody_can_provide_is_reported_and_its_task_dropped(worker):
    """All holders failed: report the input missing (naming the task) and forget the task."""
    ev = compute("z", {"a": (PEER,)})
    assert worker.handle(ev) == [Gather(ev.stimulus_id, PEER, ("a",))]
    s = sid()
    out = worker.handle(GatherSucceeded(s, PEER, {}, missing=("a",)))
    assert out == [SendReplicaMissing(s, "a", (PEER,), "z")]
    assert worker.tasks == {}


def test_only_holders_that_answered_without_the_value_are_named_missing(worker):
    """A holder that did not answer (hung, unreachable) is no proof that it
    lacks the value: the report names only the one that answered without it
    (seeds 75 and 439 of the chaos lab's hang mix)."""
    ev = compute("z", {"a": (PEER, OTHER)})
    assert worker.handle(ev) == [Gather(ev.stimulus_id, PEER, ("a",))]
    s = sid()
    assert worker.handle(GatherFailed(s, PEER, ("a",))) == [Gather(s, OTHER, ("a",))]
    s = sid()
    out = worker.handle(GatherSucceeded(s, OTHER, {}, missing=("a",)))
    assert out == [SendReplicaMissing(s, "a", (OTHER,), "z")]
    assert worker.tasks == {}


def test_an_input_no_holder_answered_for_is_reported_naming_nobody(worker):
    """Every holder failed to answer: the input is reported missing (the
    task goes back to the scheduler) naming no holder."""
    worker.handle(compute("z", {"a": (PEER, OTHER)}))
    s = sid()
    assert worker.handle(GatherFailed(s, PEER, ("a",))) == [Gather(s, OTHER, ("a",))]
    s = sid()
    out = worker.handle(GatherSucceeded(s, OTHER, {}))  # answered, but not for "a"
    assert out == [SendReplicaMissing(s, "a", (), "z")]
    assert worker.tasks == {}


def test_an_unsendable_input_errs_its_dependent(worker):
    """A holder that cannot serialize the input: the dependent errs with that error."""
    worker.handle(compute("z", {"a": (PEER,)}))
    s = sid()
    out = worker.handle(GatherSucceeded(s, PEER, {}, errors={"a": BOOM}))
    assert out == [SendTaskErred(s, "z", BOOM)]
    assert worker.tasks == {}


def test_release_while_running_cancels_and_resume_does_not_run_twice(worker):
    """Free during execution -> cancelled; compute again -> the same run serves."""
    worker.handle(compute("x"))
    assert worker.handle(FreeRequested(sid(), ("x",))) == []
    assert worker.tasks["x"].state is WorkerTaskState.CANCELLED
    assert worker.handle(compute("x")) == [], "never two runs of one task"
    assert worker.tasks["x"].state is WorkerTaskState.EXECUTING
    s = sid()
    assert worker.handle(ExecutionSucceeded(s, "x", 8)) == [SendTaskFinished(s, "x", 8)]


def test_a_cancelled_run_that_ends_is_dropped(worker):
    """A released task's result is dropped when its thread ends; nothing is reported."""
    worker.handle(compute("x"))
    worker.handle(FreeRequested(sid(), ("x",)))
    s = sid()
    assert worker.handle(ExecutionSucceeded(s, "x", 8)) == [DropData(s, ("x",))]
    assert worker.tasks == {}


def test_failures_are_reported_and_forgotten(worker):
    """An erring function is reported with its failure and leaves no record."""
    worker.handle(compute("x"))
    s = sid()
    assert worker.handle(ExecutionFailed(s, "x", BOOM)) == [SendTaskErred(s, "x", BOOM)]
    assert worker.tasks == {}


def test_values_stay_until_the_scheduler_frees_them(worker):
    """Fetched inputs are reported as replicas and kept until freed."""
    worker.handle(compute("z", {"a": (PEER,)}))
    worker.handle(GatherSucceeded(sid(), PEER, {"a": 10}))
    s = sid()
    assert worker.handle(ExecutionSucceeded(s, "z", 1)) == [SendTaskFinished(s, "z", 1)]
    assert worker.memory() == {"a": 10, "z": 1}
    s = sid()
    out = worker.handle(FreeRequested(s, ("a",)))
    # The drop is reported too: the free may have crossed a report of "a"
    # (seeds 5 and 56 of the chaos lab, tests/sim/test_regressions.py).
    assert out == [DropData(s, ("a",)), SendDataDropped(s, ("a",))]


def test_values_whose_reports_the_scheduler_had_heard_are_dropped_without_an_answer(worker):
    """The shell says which freed keys' reports the scheduler had all handled
    (`heard`): no report of those can be crossing the free."""
    for key in ("a", "b"):
        worker.handle(DataPut(sid(), {key: 10}))
    s = sid()
    out = worker.handle(FreeRequested(s, ("a", "b"), heard=frozenset({"a"})))
    assert out == [DropData(s, ("a",)), DropData(s, ("b",)), SendDataDropped(s, ("b",))]
    assert worker.memory() == {}


def test_a_free_crossing_an_assignment_keeps_the_input_until_done(worker):
    """A value freed while a task here still needs it is kept until that task ends."""
    s = sid()
    assert worker.handle(DataPut(s, {"a": 10})) == []
    ev = compute("z", {"a": (ME,)})
    assert worker.handle(ev) == started(ev.stimulus_id, "z", ("a",))
    s = sid()
    assert worker.handle(FreeRequested(s, ("a",))) == [SendDataDropped(s, ("a",))]  # no longer offered
    assert worker.memory() == {}
    s = sid()
    out = worker.handle(ExecutionSucceeded(s, "z", 1))
    assert out == [DropData(s, ("a",)), SendTaskFinished(s, "z", 1)]
    assert "a" not in worker.tasks


def test_replicas_requested_are_fetched_and_reported(worker):
    """acquire_replicas: fetch the copy and report it."""
    s = sid()
    assert worker.handle(ReplicasRequested(s, {"d": (PEER,)}, {"d": 100})) == [Gather(s, PEER, ("d",))]
    s = sid()
    assert worker.handle(GatherSucceeded(s, PEER, {"d": 100})) == [SendReplicaAdded(s, "d", 100)]


def test_a_replica_with_no_holder_but_us_is_reported_missing_at_once(worker):
    """acquire_replicas naming only this worker: nobody to ask, so missing (naming nobody)."""
    s = sid()
    assert worker.handle(ReplicasRequested(s, {"d": (ME,)}, {"d": 100})) == [SendReplicaMissing(s, "d", (), None)]
    assert worker.tasks == {}


def test_compute_of_a_value_in_flight_computes_if_the_fetch_fails(worker):
    """Regression (a tree reduction hung after a SIGKILL): asked to compute a key
    whose copy is still being fetched from a now-dead peer, the worker computes
    it when that fetch fails instead of reporting it missing and forgetting it."""
    worker.handle(ReplicasRequested(sid(), {"k": (PEER,)}, {"k": 10}))
    assert worker.tasks["k"].state is WorkerTaskState.FLIGHT
    assert worker.handle(compute("k")) == []
    s = sid()
    assert worker.handle(GatherFailed(s, PEER, ("k",))) == started(s, "k")
    s = sid()
    assert worker.handle(ExecutionSucceeded(s, "k", 10)) == [SendTaskFinished(s, "k", 10)]


def test_compute_of_a_value_in_flight_reports_it_when_it_lands(worker):
    """...and if the fetch succeeds, the landed copy answers the compute request."""
    worker.handle(ReplicasRequested(sid(), {"k": (PEER,)}, {"k": 10}))
    worker.handle(compute("k"))
    s = sid()
    out = worker.handle(GatherSucceeded(s, PEER, {"k": 10}))
    assert out == [SendReplicaAdded(s, "k", 10), SendTaskFinished(s, "k", 10)]


def test_compute_of_a_value_still_to_fetch_computes_it(worker):
    """A key queued for fetching but asked to compute is computed, not fetched."""
    state = WorkerState(ME, nthreads=1, max_gathers=1)
    ev = compute("a", {"x": (PEER,)})
    assert state.handle(ev) == [Gather(ev.stimulus_id, PEER, ("x",))]
    assert state.handle(compute("b", {"y": (OTHER,)})) == []  # one request at a time
    assert state.tasks["y"].state is WorkerTaskState.FETCH
    ev = compute("y")
    assert state.handle(ev) == started(ev.stimulus_id, "y")
    assert state.tasks["y"].state is WorkerTaskState.EXECUTING
    check_worker_invariants(state)


def test_a_seceded_task_gives_its_thread_to_the_next_and_rejoins_first(worker):
    """secede: the next ready task starts on the freed slot; rejoin waits for a
    slot and gets it before any ready task; both results are reported."""
    worker.handle(compute("parent", priority=(1,)))
    worker.handle(compute("child", priority=(2,)))
    worker.handle(compute("other", priority=(3,)))
    out = worker.handle(TaskSeceded("s1", "parent"))
    assert out == [SendTaskStarted("s1", "child"), Execute("s1", "child", "run-child", ())]
    assert list(worker.executing) == ["child"] and list(worker.seceded) == ["parent"]
    assert worker.running() == ["child", "parent"]
    assert worker.handle(TaskRejoining("s2", "parent")) == []  # every slot is taken
    out = worker.handle(ExecutionSucceeded("s3", "child", 4))
    assert out == [SendTaskFinished("s3", "child", 4), Rejoin("s3", "parent")]  # not "other"
    assert list(worker.executing) == ["parent"] and worker.seceded == {} and worker.rejoining == {}
    out = worker.handle(ExecutionSucceeded("s4", "parent", 4))
    assert out == [SendTaskFinished("s4", "parent", 4), SendTaskStarted("s4", "other"),
                   Execute("s4", "other", "run-other", ())]


def test_a_seceded_task_may_finish_without_rejoining(worker):
    """A seceded task that ends (or is cancelled meanwhile) frees nothing twice."""
    worker.handle(compute("parent"))
    assert worker.handle(TaskSeceded("s1", "parent")) == []
    assert worker.handle(TaskRejoining("s2", "parent")) == [Rejoin("s2", "parent")]  # its slot is free
    assert list(worker.executing) == ["parent"]
    assert worker.handle(TaskSeceded("s3", "parent")) == []
    assert worker.handle(FreeRequested("s4", ("parent",))) == []
    assert worker.tasks["parent"].state is WorkerTaskState.CANCELLED
    out = worker.handle(ExecutionSucceeded("s5", "parent", 1))
    assert out == [DropData("s5", ("parent",))]
    assert worker.seceded == {} and worker.executing == {}


def test_secede_or_rejoin_of_a_task_not_running_is_ignored(worker):
    """Events for keys that do not run here change nothing."""
    assert worker.handle(TaskSeceded("s1", "ghost")) == []
    assert worker.handle(TaskRejoining("s2", "ghost")) == []
    assert worker.seceded == {} and worker.rejoining == {}


# -------------------------------------- pairs the table lists, or refuses --


def test_crossed_messages_are_listed_no_ops(worker):
    """A free for a key already gone and a late answer for a key no longer in
    flight change nothing and send nothing (rows of UNCHANGED)."""
    assert worker.handle(FreeRequested(sid(), ("ghost",))) == []
    assert worker.handle(GatherSucceeded(sid(), PEER, {"ghost": 10})) == []
    assert worker.handle(GatherFailed(sid(), PEER, ("ghost",))) == []
    assert worker.tasks == {}


def test_a_thread_end_for_a_key_without_a_thread_is_refused(worker):
    """A thread can only end for a task that holds one: anything else is a
    bug in the shell, and raises rather than passing unnoticed."""
    with pytest.raises(InvalidWorkerTransition, match="'ghost': no rule for absent --ExecutionDone-->"):
        worker.handle(ExecutionSucceeded(sid(), "ghost", 8))
    assert worker.tasks == {}


def test_a_put_of_a_key_computed_here_is_refused_whole(worker):
    """A client's value for a key that runs here would overwrite the state of
    a running task: refused before any key of the put is stored."""
    ev = compute("x")
    worker.handle(ev)
    with pytest.raises(InvalidWorkerTransition, match="'x': no rule for executing --Put--> executing"):
        worker.handle(DataPut(sid(), {"a": 10, "x": 10}))
    assert sorted(worker.tasks) == ["x"] and worker.tasks["x"].state is WorkerTaskState.EXECUTING


def test_a_move_the_table_does_not_allow_is_refused(worker):
    """The one place a state changes checks the table: a move it does not
    list raises and leaves the record as it was (a bug in the core would be
    named, not carried on).

    Kills `WorkerState._move::stmt#2` (the refusal dropped)."""
    worker.handle(compute("x"))
    ts = worker.tasks["x"]
    with pytest.raises(InvalidWorkerTransition, match="'x': no rule for executing --Steal--> ready"):
        worker._move(ts, TaskEvent.STEAL, WorkerTaskState.READY)
    assert ts.state is WorkerTaskState.EXECUTING
