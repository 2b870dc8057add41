"""Copies a client asked for (`Client.replicate`) and copies reported missing, exact outputs."""

from tests.core.conftest import last_sid, sid
from trioflow.core import DataLost, TaskState
from trioflow.core.scheduler_events import (
    AcquireReplicas,
    ComputeTask,
    DataScattered,
    FreeKeys,
    KeysReleased,
    ReplicaAdded,
    ReplicaMissing,
    ReplicationRequested,
    ReportErred,
    ReportFinished,
    ReportLost,
    TaskFinished,
    TasksSubmitted,
    TaskSpec,
    WorkerConnected,
    WorkerDisconnected,
)

A, B, C, D = "tcp://a", "tcp://b", "tcp://c", "tcp://d"


def join(s, *workers):
    for w in workers:
        s.handle(WorkerConnected(sid(), w, 1))


def test_a_missing_replica_of_a_forgotten_key_changes_nothing(sched):
    """A copy requested before the key was forgotten fails afterwards: the
    report finds no record, and nothing is sent or recorded.

    Kills the mutants that drop a `ts is not None` guard of
    `_on_replica_missing` (the handler then raises on the missing record)."""
    join(sched, A, B)
    sched.handle(DataScattered(sid(), "c1", {"data": (100, (A,))}))
    [acquire] = sched.handle(ReplicationRequested(sid(), "c1", ("data",), 2))
    assert (type(acquire), acquire.worker) == (AcquireReplicas, B)
    msgs = sched.handle(KeysReleased(sid(), "c1", ("data",)))
    assert msgs == [FreeKeys(last_sid(), A, ("data",))]
    assert sched.tasks == {} and sched.workers[B].replicating == {}
    assert sched.handle(ReplicaMissing(sid(), B, "data", (A,), None)) == []
    assert sched.handle(ReplicaMissing(sid(), B, "data", (A,), "gone-too")) == []
    assert sched.tasks == {} and sched.orphans == {}


def test_a_failed_copy_is_asked_for_again(sched):
    """Three copies wanted on four workers; the worker asked for the third
    cannot fetch it from the holder it tried: that holder stops counting (it
    is told to free its copy) and two new copies are asked for from the one
    left, one of them from the worker that failed.

    Kills the mutants that keep the failed request pending (`del
    ts.replicas_pending[...]` dropped: only one new request) or that do not
    ask again (the final `replicate` call dropped: none)."""
    join(sched, A, B, C, D)
    sched.handle(DataScattered(sid(), "c1", {"data": (100, (A, B))}))
    [acquire] = sched.handle(ReplicationRequested(sid(), "c1", ("data",), 3))
    assert (acquire.worker, dict(acquire.who_has)) == (C, {"data": (A, B)})
    msgs = sched.handle(ReplicaMissing(sid(), C, "data", (A,), None))
    s = last_sid()
    assert msgs == [
        FreeKeys(s, A, ("data",)),
        AcquireReplicas(s, A, {"data": (B,)}, {"data": 100}),
        AcquireReplicas(s, C, {"data": (B,)}, {"data": 100}),
    ]
    assert list(sched.tasks["data"].who_has) == [B]
    assert list(sched.tasks["data"].replicas_pending) == [A, C]
    sched.handle(ReplicaAdded(sid(), C, "data", 100))
    assert sched.handle(ReplicaAdded(sid(), A, "data", 100)) == []
    assert list(sched.tasks["data"].who_has) == [B, C, A]
    assert sched.tasks["data"].state is TaskState.MEMORY


def test_a_failed_copy_from_a_worker_never_asked_is_only_a_missing_holder(sched):
    """A holder that was not asked for a copy reports the value missing: it
    and the holder it named stop counting; the last copies being gone, the
    scattered data waits for the copy still on its way to C, and is lost
    when C cannot fetch it either."""
    join(sched, A, B, C)
    sched.handle(DataScattered(sid(), "c1", {"data": (100, (A, B))}))
    [acquire] = sched.handle(ReplicationRequested(sid(), "c1", ("data",), 3))
    assert acquire.worker == C
    msgs = sched.handle(ReplicaMissing(sid(), A, "data", (B,), None))
    s = last_sid()
    # A (the reporter) and B (the holder it tried) both stop counting; the
    # copy on its way to C is awaited (it may have left before B lost it).
    assert msgs == [FreeKeys(s, B, ("data",)), FreeKeys(s, A, ("data",))]
    assert sched.tasks["data"].state is TaskState.RELEASED
    assert list(sched.tasks["data"].replicas_pending) == [C]
    msgs = sched.handle(ReplicaMissing(sid(), C, "data", (A, B), None))
    assert msgs == [ReportErred(last_sid(), "c1", "data", DataLost("data"), "data")]
    assert sched.tasks["data"].state is TaskState.LOST
    assert sched.tasks["data"].replicas_pending == {} and sched.workers[C].replicating == {}


# --- the last holder leaves while a copy is on its way (chaos lab seed 23) --


def _last_holder_leaves_while_a_copy_is_pending(sched):
    """Scattered `data` on A only, its dependent `m` running there, a second
    copy asked of B; then A leaves before B says it has the copy."""
    join(sched, A, B, C)
    sched.handle(DataScattered(sid(), "c1", {"data": (100, (A,))}))
    [compute] = sched.handle(TasksSubmitted(sid(), "c1", (TaskSpec("m", "run-m", ("data",)),), ("m",)))
    assert (compute.worker, compute.key) == (A, "m")
    msgs = sched.handle(ReplicationRequested(sid(), "c1", ("data",), 2))
    assert msgs == [AcquireReplicas(last_sid(), B, {"data": (A,)}, {"data": 100})]
    assert sched.handle(WorkerDisconnected(sid(), A)) == []  # no DataLost: B may have it
    assert sched.tasks["data"].state is TaskState.RELEASED
    assert list(sched.tasks["data"].replicas_pending) == [B]
    assert list(sched.workers[B].replicating) == ["data"]
    assert sched.awaits_holder("data")
    assert sched.tasks["m"].state is TaskState.WAITING
    assert list(sched.tasks["m"].waiting_on) == ["data"]


def test_the_copy_on_its_way_brings_data_back_when_its_last_holder_leaves(sched):
    """Scattered data whose last holder leaves while B fetches a copy is not
    lost: B's ReplicaAdded brings it back to memory, the client hears it
    finished, its dependent runs on B, and a second copy is asked of C."""
    _last_holder_leaves_while_a_copy_is_pending(sched)
    msgs = sched.handle(ReplicaAdded(sid(), B, "data", 100))
    s = last_sid()
    assert msgs == [
        AcquireReplicas(s, C, {"data": (B,)}, {"data": 100}),
        ReportFinished(s, "c1", "data", (B,), False),
        ComputeTask(s, B, "m", "run-m", (0, 2), {"data": (B,)}, {"data": 100}),
    ]
    assert sched.tasks["data"].state is TaskState.MEMORY
    assert not sched.awaits_holder("data")
    assert list(sched.tasks["data"].replicas_pending) == [C]


def test_data_awaiting_a_copy_is_lost_when_the_fetch_fails(sched):
    """The copy B was fetching fails (ReplicaMissing from B): no copy is on
    its way any more, so the data is lost now, and its dependent errs."""
    _last_holder_leaves_while_a_copy_is_pending(sched)
    msgs = sched.handle(ReplicaMissing(sid(), B, "data", (A,), None))
    s = last_sid()
    assert msgs == [
        ReportErred(s, "c1", "data", DataLost("data"), "data"),
        ReportErred(s, "c1", "m", DataLost("data"), "data"),
    ]
    assert sched.tasks["data"].state is TaskState.LOST
    assert sched.tasks["m"].state is TaskState.ERRED
    assert sched.workers[B].replicating == {}


def test_data_awaiting_a_copy_is_lost_when_the_fetching_worker_leaves(sched):
    """B, the worker fetching the awaited copy, leaves too: the data is lost now."""
    _last_holder_leaves_while_a_copy_is_pending(sched)
    msgs = sched.handle(WorkerDisconnected(sid(), B))
    s = last_sid()
    assert msgs == [
        ReportErred(s, "c1", "data", DataLost("data"), "data"),
        ReportErred(s, "c1", "m", DataLost("data"), "data"),
    ]
    assert sched.tasks["data"].state is TaskState.LOST
    assert sched.tasks["data"].replicas_pending == {}


def test_a_copy_from_a_worker_not_asked_does_not_end_the_wait(sched):
    """While data awaits B's copy, a ReplicaAdded from C (never asked) is
    not believed: C is told to free it, and the data still awaits B's."""
    _last_holder_leaves_while_a_copy_is_pending(sched)
    msgs = sched.handle(ReplicaAdded(sid(), C, "data", 100))
    assert msgs == [FreeKeys(last_sid(), C, ("data",))]
    assert sched.tasks["data"].state is TaskState.RELEASED


def test_data_awaiting_a_copy_that_nobody_holds_any_more_is_forgotten(sched):
    """The client lets go of the data and its dependent while the copy is on
    its way: the record is forgotten and the copy is freed when it lands."""
    _last_holder_leaves_while_a_copy_is_pending(sched)
    assert sched.handle(KeysReleased(sid(), "c1", ("m", "data"))) == []
    assert sched.tasks == {} and sched.workers[B].replicating == {}
    msgs = sched.handle(ReplicaAdded(sid(), B, "data", 100))
    assert msgs == [FreeKeys(last_sid(), B, ("data",))]


def test_computed_data_whose_last_holder_leaves_while_a_copy_is_pending_is_recomputed(sched):
    """A key with lineage does not wait for the copy: it is computed again at
    once (its holder told it is lost), and the pending copy is dropped."""
    join(sched, A, B)
    sched.handle(TasksSubmitted(sid(), "c1", (TaskSpec("x", "run-x", ()),), ("x",)))
    sched.handle(TaskFinished(sid(), A, "x", 100))
    [acquire] = sched.handle(ReplicationRequested(sid(), "c1", ("x",), 2))
    assert acquire.worker == B
    msgs = sched.handle(WorkerDisconnected(sid(), A))
    s = last_sid()
    assert msgs == [ReportLost(s, "c1", "x"), ComputeTask(s, B, "x", "run-x", (0, 1), {}, {})]
    assert sched.tasks["x"].replicas_pending == {} and sched.workers[B].replicating == {}


# --- a holder that did not answer is no proof that it lacks the value ------
# (seeds 75 and 439 of the chaos lab's hang mix: a hung holder was dropped and
# scattered data declared lost while that holder, alive, still held it)


def _scattered_with_dependent_on(sched, worker):
    """`data` scattered to A and C; `y` (needs it) processing on `worker`."""
    join(sched, A, B, C)
    sched.handle(DataScattered(sid(), "c1", {"data": (100, (A, C))}))
    msgs = sched.handle(TasksSubmitted(sid(), "c1", (TaskSpec("y", "run-y", ("data",), 0, (worker,)),), ("y",)))
    assert [(type(m), m.worker, m.key) for m in msgs] == [(ComputeTask, worker, "y")]
    return msgs[0]


def test_a_holder_that_did_not_answer_is_kept_and_one_that_answered_missing_is_dropped(sched):
    """B fetched `data` for `y` from A (no answer: hung) and from C (answered
    that it does not have it). The worker names only C: C stops counting and
    is told to free the key; A, perhaps only slow, is still a holder; the
    data is not lost, and `y` is sent again with A as its holder."""
    first = _scattered_with_dependent_on(sched, B)
    msgs = sched.handle(ReplicaMissing(sid(), B, "data", (C,), "y"))
    s = last_sid()
    assert msgs == [
        FreeKeys(s, C, ("data",)),
        FreeKeys(s, B, ("y",)),  # back to waiting: the old assignment is withdrawn
        ComputeTask(s, B, "y", "run-y", first.priority, {"data": (A,)}, {"data": 100}),
    ]
    assert list(sched.tasks["data"].who_has) == [A]
    assert sched.tasks["data"].state is TaskState.MEMORY


def test_holders_that_did_not_answer_are_all_kept(sched):
    """No holder answered (the report names nobody): both stay holders, no
    key is freed, and `y` is sent again naming both."""
    first = _scattered_with_dependent_on(sched, B)
    msgs = sched.handle(ReplicaMissing(sid(), B, "data", (), "y"))
    s = last_sid()
    assert msgs == [
        FreeKeys(s, B, ("y",)),  # back to waiting: the old assignment is withdrawn
        ComputeTask(s, B, "y", "run-y", first.priority, {"data": (A, C)}, {"data": 100}),
    ]
    assert list(sched.tasks["data"].who_has) == [A, C]
    assert sched.tasks["data"].state is TaskState.MEMORY


def test_a_copy_goes_to_the_worker_holding_the_fewest_values(sched):
    """Replication asks the workers that hold the fewest values first (its
    docstring's policy; the model allows any): B holds three values and C
    none, so C is asked, though B comes first in registration order.

    Kills `TaskTransitions.replicate::stmt#3` (the sort dropped)."""
    join(sched, A, B, C)
    sched.handle(DataScattered(sid(), "c1", {"data": (100, (A,))}))
    sched.handle(DataScattered(sid(), "c1", {f"other-{i}": (8, (B,)) for i in range(3)}))
    msgs = sched.handle(ReplicationRequested(sid(), "c1", ("data",), 2))
    assert msgs == [AcquireReplicas(last_sid(), C, {"data": (A,)}, {"data": 100})]
