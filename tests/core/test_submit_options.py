"""submit options in the scheduler core: resources, priority, loose restrictions,
fire-and-forget. Events in, exact messages out (no I/O)."""

from tests.core.conftest import sid
from trioflow.core import TaskState
from trioflow.core.scheduler_events import (
    FIRE_AND_FORGET,
    ComputeTask,
    FreeKeys,
    KeysFiredAndForgotten,
    KeysReleased,
    ReplicaMissing,
    ReportFinished,
    ReportLost,
    TaskErred,
    TaskFinished,
    TaskSpec,
    TasksSubmitted,
    WorkerConnected,
    WorkerDisconnected,
)
from tests.core.test_scheduler_state import BOOM, state_of

A, B = "tcp://a", "tcp://b"


def task(key, *deps, workers=None, loose=False, resources=None, priority=0):
    return TaskSpec(key, f"run-{key}", tuple(deps), 0, workers, loose, resources, priority)


def submit(s, *specs, client="c1"):
    return s.handle(TasksSubmitted("sub", client, tuple(specs), tuple(t.key for t in specs)))


def compute(worker, key, priority, stimulus="sub", who_has=None):
    who_has = who_has or {}
    return ComputeTask(stimulus, worker, key, f"run-{key}", priority, who_has, {k: 8 for k in who_has})


# ------------------------------------------------------------- resources --


def test_a_task_waits_for_a_worker_with_the_resource(sched):
    """No worker has a GPU: the task waits in no-worker; the GPU worker that
    joins gets it, though a worker without one is idle."""
    sched.handle(WorkerConnected(sid(), A, 1))
    assert submit(sched, task("x", resources={"GPU": 1})) == []
    assert state_of(sched, "x") is TaskState.NO_WORKER
    out = sched.handle(WorkerConnected("join", B, 1, resources={"GPU": 2}))
    assert out == [compute(B, "x", (0, 1), "join")]
    assert sched.workers[B].used == {"GPU": 1}


def test_resources_in_use_are_counted_and_given_back(sched):
    """GPU=2 runs two GPU=1 tasks at once; the third waits until one ends, then
    starts at once on the freed GPU (an idle worker without one does not take it)."""
    sched.handle(WorkerConnected(sid(), A, 4, resources={"GPU": 2}))
    sched.handle(WorkerConnected(sid(), B, 4))
    out = submit(sched, *(task(k, resources={"GPU": 1}) for k in ("x", "y", "z")))
    assert out == [compute(A, "x", (0, 1)), compute(A, "y", (0, 2))]
    assert state_of(sched, "z") is TaskState.NO_WORKER and sched.workers[A].used == {"GPU": 2}
    out = sched.handle(TaskFinished("done", A, "x", 8))
    assert out == [ReportFinished("done", "c1", "x", (A,)), compute(A, "z", (0, 3), "done")]
    assert sched.workers[A].used == {"GPU": 2}
    sched.handle(TaskErred("err", A, "y", BOOM))
    assert sched.workers[A].used == {"GPU": 1}


def test_resources_of_a_dead_workers_tasks_move_with_them(sched):
    """A GPU task rerouted from a dead worker waits for another GPU worker."""
    sched.handle(WorkerConnected(sid(), A, 1, resources={"GPU": 1}))
    sched.handle(WorkerConnected(sid(), B, 1))
    submit(sched, task("x", resources={"GPU": 1}))
    assert sched.handle(WorkerDisconnected("gone", A)) == []
    assert state_of(sched, "x") is TaskState.NO_WORKER


# -------------------------------------------------------------- priority --


def test_the_users_priority_comes_before_submission_order(sched):
    """One worker, capacity one: of the queued root tasks the one of higher
    user priority runs next, though submitted last."""
    sched.handle(WorkerConnected(sid(), A, 1))
    submit(sched, task("first"))
    submit(sched, task("low", priority=-5), task("normal"), task("urgent", priority=10))
    out = sched.handle(TaskFinished("done", A, "first", 8))
    assert out == [ReportFinished("done", "c1", "first", (A,)), compute(A, "urgent", (-10, 4), "done")]
    out = sched.handle(TaskFinished("done2", A, "urgent", 8))
    assert out[1:] == [compute(A, "normal", (0, 3), "done2")]


def test_a_root_task_made_ready_does_not_jump_a_queued_one_of_higher_priority(sched):
    """A worker freed in the same step as a root task becomes ready again (its
    only copy was lost) takes the queued task of higher priority first."""
    sched.handle(WorkerConnected(sid(), A, 1))
    submit(sched, task("a"), task("d", "a"))
    sched.handle(TaskFinished("fa", A, "a", 8))  # d now runs on A (capacity 1)
    submit(sched, task("urgent", priority=5))
    assert state_of(sched, "urgent") is TaskState.QUEUED
    # A cannot find a's value for d: a is computed again, d waits, A is free.
    out = sched.handle(ReplicaMissing("lost", A, "a", (A,), "d"))
    assert out == [
        FreeKeys("lost", A, ("a",)),
        ReportLost("lost", "c1", "a"),
        FreeKeys("lost", A, ("d",)),
        compute(A, "urgent", (-5, 3), "lost"),
    ]
    assert state_of(sched, "a") is TaskState.QUEUED


# ------------------------------------------------------ loose restrictions --


def test_loose_restrictions_prefer_the_named_workers(sched):
    """workers=[B], allow_other_workers: B if alive, else any live worker."""
    sched.handle(WorkerConnected(sid(), A, 1))
    assert submit(sched, task("x", workers=(B,), loose=True)) == [compute(A, "x", (0, 1))]
    sched.handle(WorkerConnected(sid(), B, 1))
    assert submit(sched, task("y", workers=(B,), loose=True)) == [compute(B, "y", (0, 2))]
    assert submit(sched, task("z", workers=(B,))) == [compute(B, "z", (0, 3))]


def test_a_loose_task_without_any_worker_waits_in_no_worker(sched):
    """No worker at all: a loose task waits in no-worker, and the first worker takes it."""
    assert submit(sched, task("x", workers=(B,), loose=True)) == []
    assert state_of(sched, "x") is TaskState.NO_WORKER
    assert sched.handle(WorkerConnected("join", A, 1)) == [compute(A, "x", (0, 1), "join")]


# ------------------------------------------------------- fire and forget --


def test_a_fired_and_forgotten_task_runs_after_its_client_lets_go(sched):
    """fire_and_forget then release: the task still runs; once it has a value
    nobody holds it and it is forgotten (nobody is told)."""
    sched.handle(WorkerConnected(sid(), A, 1))
    submit(sched, task("x"))
    assert sched.handle(KeysFiredAndForgotten("ff", "c1", ("x",))) == []
    assert sched.handle(KeysReleased("rel", "c1", ("x",))) == []
    assert state_of(sched, "x") is TaskState.PROCESSING
    assert sched.handle(TaskFinished("done", A, "x", 8)) == [FreeKeys("done", A, ("x",))]
    assert state_of(sched, "x") is TaskState.FORGOTTEN and sched.clients[FIRE_AND_FORGET] == {}


def test_fire_and_forget_takes_only_the_clients_own_keys_in_progress(sched):
    """Another client's key, or one already in memory, is not taken."""
    sched.handle(WorkerConnected(sid(), A, 1))
    submit(sched, task("x"))
    sched.handle(TaskFinished("done", A, "x", 8))
    submit(sched, task("y"), client="c2")
    sched.handle(KeysFiredAndForgotten("ff", "c1", ("x", "y")))
    assert sched.clients[FIRE_AND_FORGET] == {}
    assert sched.tasks["y"].who_wants == {"c2": None}
