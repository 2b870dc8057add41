"""Copies a client asked for (`Client.replicate`) and copies reported missing, exact outputs."""

from tests.core.conftest import sid
from trioflow.core import DataLost, TaskState
from trioflow.core.scheduler_events import (
    AcquireReplicas,
    DataScattered,
    FreeKeys,
    KeysReleased,
    ReplicaAdded,
    ReplicaMissing,
    ReplicationRequested,
    ReportErred,
    WorkerConnected,
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
    assert msgs == [FreeKeys(msgs[0].stimulus_id, A, ("data",))]
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
    ask again (the final `_replicate` call dropped: none)."""
    join(sched, A, B, C, D)
    sched.handle(DataScattered(sid(), "c1", {"data": (100, (A, B))}))
    [acquire] = sched.handle(ReplicationRequested(sid(), "c1", ("data",), 3))
    assert (acquire.worker, dict(acquire.who_has)) == (C, {"data": (A, B)})
    msgs = sched.handle(ReplicaMissing(sid(), C, "data", (A,), None))
    s = msgs[0].stimulus_id
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
    and the holder it named stop counting, and the last copies being gone,
    scattered data is lost."""
    join(sched, A, B, C)
    sched.handle(DataScattered(sid(), "c1", {"data": (100, (A, B))}))
    [acquire] = sched.handle(ReplicationRequested(sid(), "c1", ("data",), 3))
    assert acquire.worker == C
    msgs = sched.handle(ReplicaMissing(sid(), A, "data", (B,), None))
    s = msgs[0].stimulus_id
    # A (the reporter) and B (the holder it tried) both stop counting: the
    # value is lost, and the copy still on its way to C is no longer awaited.
    assert msgs == [
        FreeKeys(s, B, ("data",)),
        FreeKeys(s, A, ("data",)),
        ReportErred(s, "c1", "data", DataLost("data"), "data"),
    ]
    assert sched.tasks["data"].state is TaskState.LOST
    assert sched.tasks["data"].replicas_pending == {} and sched.workers[C].replicating == {}
