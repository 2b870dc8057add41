"""The worker state machine, events in and exact instructions out (no I/O)."""

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

ME, PEER, OTHER = "tcp://w1", "tcp://peer", "tcp://other"
BOOM = UserError(None, "ValueError", "boom", "tb")


def compute(key, who_has=None, priority=(1,)):
    who_has = who_has or {}
    return ComputeRequested(sid(), key, f"run-{key}", priority, who_has, {k: 10 for k in who_has})


def kinds(instructions):
    return [type(i).__name__ for i in instructions]


def test_a_task_without_inputs_starts_at_once(worker):
    """Compute -> started is reported before Execute; success reports finished."""
    out = worker.handle(compute("x"))
    assert out == [SendTaskStarted(out[0].stimulus_id, "x"), Execute(out[1].stimulus_id, "x", "run-x", ())]
    out = worker.handle(ExecutionSucceeded(sid(), "x", 8))
    assert [(type(i), i.key) for i in out] == [(SendTaskFinished, "x")]
    assert worker.tasks["x"].state is WorkerTaskState.MEMORY


def test_threads_bound_how_many_run_and_priority_orders_the_rest(worker):
    """With one thread, the best priority waiting runs next."""
    worker.handle(compute("first", priority=(5,)))
    worker.handle(compute("late", priority=(9,)))
    worker.handle(compute("urgent", priority=(1,)))
    assert list(worker.executing) == ["first"]
    out = worker.handle(ExecutionSucceeded(sid(), "first", 1))
    assert [i.key for i in out if isinstance(i, Execute)] == ["urgent"]


def test_inputs_from_one_peer_are_fetched_in_one_request(worker):
    """Two inputs held by the same peer: one Gather for both, then the task runs."""
    out = worker.handle(compute("z", {"a": (PEER,), "b": (PEER,)}))
    assert [(i.peer, i.keys) for i in out if isinstance(i, Gather)] == [(PEER, ("a", "b"))]
    out = worker.handle(GatherSucceeded(sid(), PEER, {"a": 10, "b": 10}))
    assert kinds(out) == ["SendReplicaAdded", "SendReplicaAdded", "SendTaskStarted", "Execute"]


def test_a_failed_peer_is_replaced_by_the_next_holder(worker):
    """When one holder fails, the same input is fetched from the next one."""
    worker.handle(compute("z", {"a": (PEER, OTHER)}))
    out = worker.handle(GatherFailed(sid(), PEER, ("a",)))
    assert [(i.peer, i.keys) for i in out if isinstance(i, Gather)] == [(OTHER, ("a",))]


def test_an_input_nobody_can_provide_is_reported_and_its_task_dropped(worker):
    """All holders failed: report the input missing (naming the task) and forget the task."""
    worker.handle(compute("z", {"a": (PEER,)}))
    out = worker.handle(GatherSucceeded(sid(), PEER, {}, missing=("a",)))
    assert out == [SendReplicaMissing(out[0].stimulus_id, "a", (PEER,), "z")]
    assert worker.tasks == {}


def test_only_holders_that_answered_without_the_value_are_named_missing(worker):
    """A holder that did not answer (hung, unreachable) is no proof that it
    lacks the value: the report names only the one that answered without it
    (seeds 75 and 439 of the chaos lab's hang mix)."""
    worker.handle(compute("z", {"a": (PEER, OTHER)}))
    out = worker.handle(GatherFailed(sid(), PEER, ("a",)))
    assert out == [Gather(out[0].stimulus_id, OTHER, ("a",))]
    out = worker.handle(GatherSucceeded(sid(), OTHER, {}, missing=("a",)))
    assert out == [SendReplicaMissing(out[0].stimulus_id, "a", (OTHER,), "z")]
    assert worker.tasks == {}


def test_an_input_no_holder_answered_for_is_reported_naming_nobody(worker):
    """Every holder failed to answer: the input is reported missing (the
    task goes back to the scheduler) naming no holder."""
    worker.handle(compute("z", {"a": (PEER, OTHER)}))
    worker.handle(GatherFailed(sid(), PEER, ("a",)))
    out = worker.handle(GatherSucceeded(sid(), OTHER, {}))  # answered, but not for "a"
    assert out == [SendReplicaMissing(out[0].stimulus_id, "a", (), "z")]
    assert worker.tasks == {}


def test_an_unsendable_input_errs_its_dependent(worker):
    """A holder that cannot serialize the input: the dependent errs with that error."""
    worker.handle(compute("z", {"a": (PEER,)}))
    out = worker.handle(GatherSucceeded(sid(), PEER, {}, errors={"a": BOOM}))
    assert out == [SendTaskErred(out[0].stimulus_id, "z", BOOM)]
    assert worker.tasks == {}


def test_release_while_running_cancels_and_resume_does_not_run_twice(worker):
    """Free during execution -> cancelled; compute again -> the same run serves."""
    worker.handle(compute("x"))
    assert worker.handle(FreeRequested(sid(), ("x",))) == []
    assert worker.tasks["x"].state is WorkerTaskState.CANCELLED
    out = worker.handle(compute("x"))
    assert not [i for i in out if isinstance(i, Execute)], "never two runs of one task"
    out = worker.handle(ExecutionSucceeded(sid(), "x", 8))
    assert kinds(out) == ["SendTaskFinished"]


def test_a_cancelled_run_that_ends_is_dropped(worker):
    """A released task's result is dropped when its thread ends; nothing is reported."""
    worker.handle(compute("x"))
    worker.handle(FreeRequested(sid(), ("x",)))
    out = worker.handle(ExecutionSucceeded(sid(), "x", 8))
    assert out == [DropData(out[0].stimulus_id, ("x",))]
    assert worker.tasks == {}


def test_failures_are_reported_and_forgotten(worker):
    """An erring function is reported with its failure and leaves no record."""
    worker.handle(compute("x"))
    out = worker.handle(ExecutionFailed(sid(), "x", BOOM))
    assert out == [SendTaskErred(out[0].stimulus_id, "x", BOOM)]
    assert worker.tasks == {}


def test_values_stay_until_the_scheduler_frees_them(worker):
    """Fetched inputs are reported as replicas and kept until freed."""
    worker.handle(compute("z", {"a": (PEER,)}))
    worker.handle(GatherSucceeded(sid(), PEER, {"a": 10}))
    worker.handle(ExecutionSucceeded(sid(), "z", 1))
    assert worker.memory() == {"a": 10, "z": 1}
    out = worker.handle(FreeRequested(sid(), ("a",)))
    # The drop is reported too: the free may have crossed a report of "a"
    # (seeds 5 and 56 of the chaos lab, tests/sim/test_regressions.py).
    sid_ = out[0].stimulus_id
    assert out == [DropData(sid_, ("a",)), SendDataDropped(sid_, ("a",))]


def test_a_free_crossing_an_assignment_keeps_the_input_until_done(worker):
    """A value freed while a task here still needs it is kept until that task ends."""
    worker.handle(DataPut(sid(), {"a": 10}))
    worker.handle(compute("z", {"a": (ME,)}))
    out = worker.handle(FreeRequested(sid(), ("a",)))
    assert out == [SendDataDropped(out[0].stimulus_id, ("a",))]  # no longer offered
    out = worker.handle(ExecutionSucceeded(sid(), "z", 1))
    assert DropData(out[0].stimulus_id, ("a",)) in out
    assert "a" not in worker.tasks


def test_replicas_requested_are_fetched_and_reported(worker):
    """acquire_replicas: fetch the copy and report it; no holder left -> missing."""
    out = worker.handle(ReplicasRequested(sid(), {"d": (PEER,)}, {"d": 100}))
    assert [(i.peer, i.keys) for i in out if isinstance(i, Gather)] == [(PEER, ("d",))]
    out = worker.handle(GatherSucceeded(sid(), PEER, {"d": 100}))
    assert out == [SendReplicaAdded(out[0].stimulus_id, "d", 100)]


def test_compute_of_a_value_in_flight_computes_if_the_fetch_fails(worker):
    """Regression (a tree reduction hung after a SIGKILL): asked to compute a key
    whose copy is still being fetched from a now-dead peer, the worker computes
    it when that fetch fails instead of reporting it missing and forgetting it."""
    worker.handle(ReplicasRequested(sid(), {"k": (PEER,)}, {"k": 10}))
    assert worker.tasks["k"].state is WorkerTaskState.FLIGHT
    assert worker.handle(compute("k")) == []
    out = worker.handle(GatherFailed(sid(), PEER, ("k",)))
    assert kinds(out) == ["SendTaskStarted", "Execute"]
    out = worker.handle(ExecutionSucceeded(sid(), "k", 10))
    assert kinds(out) == ["SendTaskFinished"]


def test_compute_of_a_value_in_flight_reports_it_when_it_lands(worker):
    """...and if the fetch succeeds, the landed copy answers the compute request."""
    worker.handle(ReplicasRequested(sid(), {"k": (PEER,)}, {"k": 10}))
    worker.handle(compute("k"))
    out = worker.handle(GatherSucceeded(sid(), PEER, {"k": 10}))
    assert kinds(out) == ["SendReplicaAdded", "SendTaskFinished"]


def test_compute_of_a_value_still_to_fetch_computes_it(worker):
    """A key queued for fetching but asked to compute is computed, not fetched."""
    state = WorkerState(ME, nthreads=1, max_gathers=1)
    state.handle(compute("a", {"x": (PEER,)}))
    state.handle(compute("b", {"y": (OTHER,)}))
    assert state.tasks["y"].state is WorkerTaskState.FETCH
    out = state.handle(compute("y"))
    assert not [i for i in out if isinstance(i, Gather)]
    assert state.tasks["y"].state in (WorkerTaskState.READY, WorkerTaskState.EXECUTING)
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
    worker.handle(TaskSeceded("s1", "parent"))
    worker.handle(TaskRejoining("s2", "parent"))  # granted at once: its slot is free
    assert list(worker.executing) == ["parent"]
    worker.handle(TaskSeceded("s3", "parent"))
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
