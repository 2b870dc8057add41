"""The scheduler state machine, events in and exact messages out (no I/O)."""

import pytest

from tests.core.conftest import last_sid, said, sid
from trioflow.core import Cancelled, DataLost, TaskState, UserError, WorkerDeaths
from trioflow.core.scheduler_events import (
    AcquireReplicas,
    ClientConnected,
    ClientDisconnected,
    ClusterRestarted,
    ComputeTask,
    DataScattered,
    FreeKeys,
    KeysCancelled,
    KeysReleased,
    OrphansExpired,
    RecoveryEnded,
    ReplicaAdded,
    ReplicaMissing,
    ReplicationRequested,
    ReportErred,
    ReportFinished,
    TaskErred,
    TaskFinished,
    TaskSpec,
    TasksSubmitted,
    TaskStarted,
    WorkerConnected,
    WorkerDisconnected,
)
from trioflow.core.scheduler_invariants import check_invariants
from trioflow.core.scheduler_state import InvalidTransition, SchedulerState

A, B, C = "tcp://a", "tcp://b", "tcp://c"
BOOM = UserError(exception=b"pickled", type_name="ZeroDivisionError", message="division by zero", traceback="tb")


def spec(key, *deps, retries=0, workers=None):
    return TaskSpec(key, f"run-{key}", tuple(deps), retries, workers)


def submit(s, *specs, client="c1", wanted=None):
    wanted = tuple(t.key for t in specs) if wanted is None else tuple(wanted)
    return s.handle(TasksSubmitted(sid(), client, tuple(specs), wanted))


def finish(s, worker, key, nbytes=8):
    s.handle(TaskStarted(sid(), worker, key))
    return s.handle(TaskFinished(sid(), worker, key, nbytes))


def state_of(s, key):
    return s.tasks[key].state if key in s.tasks else TaskState.FORGOTTEN


def join(s, *workers, nthreads=1):
    out = []
    for w in workers:
        out += s.handle(WorkerConnected(sid(), w, nthreads))
    return out


def test_submit_runs_on_a_worker_and_reports_to_the_client(sched):
    """A task goes waiting -> processing -> memory and the client hears of it."""
    join(sched, A)
    msgs = submit(sched, spec("x"))
    assert said(msgs) == [("compute", A, "x")]
    assert state_of(sched, "x") is TaskState.PROCESSING
    msgs = finish(sched, A, "x")
    assert msgs == [ReportFinished(last_sid(), "c1", "x", (A,))]
    assert state_of(sched, "x") is TaskState.MEMORY


def test_a_released_key_is_forgotten_and_its_data_freed(sched):
    """A key no client holds and no task needs is forgotten; holders free it."""
    join(sched, A)
    submit(sched, spec("x"))
    finish(sched, A, "x")
    msgs = sched.handle(KeysReleased(sid(), "c1", ("x",)))
    assert said(msgs) == [("free", A, ("x",))]
    assert "x" not in sched.tasks
    assert sched.workers[A].has_what == {}


def test_dependencies_wait_then_run_where_the_data_is(sched):
    """A dependent waits for its inputs and is sent to the worker holding them."""
    join(sched, A, B)
    msgs = submit(sched, spec("x"), spec("y", "x"), wanted=["y"])
    assert said(msgs) == [("compute", A, "x")]
    assert state_of(sched, "y") is TaskState.WAITING
    msgs = finish(sched, A, "x")
    assert said(msgs) == [("compute", A, "y")]
    [compute] = [m for m in msgs if isinstance(m, ComputeTask)]
    assert (compute.worker, compute.key, dict(compute.who_has)) == (A, "y", {"x": (A,)})
    finish(sched, A, "y")
    # x was only an input: once y has its value, x's value is freed but its
    # record stays, because it is y's lineage.
    assert state_of(sched, "x") is TaskState.RELEASED
    sched.handle(KeysReleased(sid(), "c1", ("y",)))
    assert sched.tasks == {}


def test_inputs_on_different_workers_go_to_the_larger_holder(sched):
    """Placement follows input bytes, so the bigger input does not move."""
    join(sched, A, B)
    submit(sched, spec("small"), spec("big"), wanted=["small", "big"])
    finish(sched, A, "small", nbytes=10)
    finish(sched, B, "big", nbytes=10_000)
    msgs = submit(sched, spec("sum", "small", "big"))
    assert said(msgs) == [("compute", B, "sum")]
    [compute] = [m for m in msgs if isinstance(m, ComputeTask)]
    assert compute.worker == B
    assert dict(compute.who_has) == {"small": (A,), "big": (B,)}


def test_user_error_errs_dependents_with_the_same_failure(sched):
    """x raises: x and every dependent report the same failure, origin x."""
    join(sched, A)
    submit(sched, spec("x"), spec("y", "x"), spec("z", "y"), wanted=["x", "z"])
    sched.handle(TaskStarted(sid(), A, "x"))
    msgs = sched.handle(TaskErred(sid(), A, "x", BOOM))
    assert said(msgs) == [
        ("free", A, ("x",)),
        ("erred", "c1", "x", BOOM, "x"),
        ("erred", "c1", "z", BOOM, "x"),
    ]
    assert state_of(sched, "y") is TaskState.ERRED
    # A dependent submitted later errs at once, with the same failure.
    msgs = submit(sched, spec("w", "x"))
    assert said(msgs) == [("erred", "c1", "w", BOOM, "x")]


def test_retries_run_a_raising_task_again(sched):
    """retries=1: the first error reschedules, the second is reported."""
    join(sched, A)
    submit(sched, spec("x", retries=1))
    msgs = sched.handle(TaskErred(sid(), A, "x", BOOM))
    assert said(msgs) == [("free", A, ("x",)), ("compute", A, "x")]
    msgs = sched.handle(TaskErred(sid(), A, "x", BOOM))
    assert said(msgs) == [("free", A, ("x",)), ("erred", "c1", "x", BOOM, "x")]


def test_worker_death_reroutes_pending_work(sched):
    """Tasks assigned to a dead worker (not running) go to a survivor, unsuspected."""
    join(sched, A, B)
    submit(sched, spec("x"), spec("y"))
    assert (sched.tasks["x"].processing_on, sched.tasks["y"].processing_on) == (A, B)
    msgs = sched.handle(WorkerDisconnected(sid(), A))
    # B is saturated (saturation 1.0, one thread), so x queues for it.
    assert said(msgs) == []
    assert state_of(sched, "x") is TaskState.QUEUED
    msgs = finish(sched, B, "y")
    assert said(msgs) == [("finished", "c1", "y", (B,)), ("compute", B, "x")]
    assert sched.tasks["x"].suspicious == 0


def test_lost_value_is_recomputed_from_lineage(sched):
    """x lived only on the dead worker and y still needs it: x runs again."""
    join(sched, A, B)
    submit(sched, spec("x"), spec("y", "x"), spec("other"), wanted=["y", "other"])
    assert sched.tasks["x"].processing_on == A
    finish(sched, A, "x")
    assert sched.tasks["y"].processing_on == A
    finish(sched, B, "other")
    msgs = sched.handle(WorkerDisconnected(sid(), A))
    assert said(msgs) == [("compute", B, "x")]
    assert state_of(sched, "y") is TaskState.WAITING
    msgs = finish(sched, B, "x")
    assert said(msgs) == [("compute", B, "y")]


def test_finished_futures_hear_that_their_value_is_being_recomputed(sched):
    """A held value lost with its worker is reported lost and then finished again."""
    join(sched, A, B)
    submit(sched, spec("x"))
    finish(sched, A, "x")
    msgs = sched.handle(WorkerDisconnected(sid(), A))
    assert said(msgs) == [("lost", "c1", "x"), ("compute", B, "x")]
    msgs = finish(sched, B, "x")
    assert said(msgs) == [("finished", "c1", "x", (B,))]


def test_poison_task_is_marked_bad_after_allowed_failures_deaths(sched):
    """Three deaths while running -> KilledWorker for it and its dependents."""
    join(sched, A, B, C)
    submit(sched, spec("bad"), spec("after", "bad"), wanted=["bad", "after"])
    for n in range(1, 4):
        worker = sched.tasks["bad"].processing_on
        sched.handle(TaskStarted(sid(), worker, "bad"))
        msgs = sched.handle(WorkerDisconnected(sid(), worker))
        assert sched.tasks["bad"].suspicious == n
        if n < 3:
            assert said(msgs) == [("compute", (A, B, C)[n], "bad")]
            sched.handle(WorkerConnected(sid(), worker, 1))  # the nanny restarts it
    failure = WorkerDeaths("bad", 3, worker)
    assert said(msgs) == [("erred", "c1", "bad", failure, "bad"), ("erred", "c1", "after", failure, "bad")]


def test_innocent_bystanders_are_not_suspected():
    """Only a task that had started counts a death; a task merely assigned to
    the dying worker is rerouted with a clean record."""
    sched = SchedulerState(allowed_failures=1, worker_saturation=2.0)
    join(sched, A)  # alone, so both tasks land on A
    submit(sched, spec("runs"), spec("queued-there"))
    assert {sched.tasks[k].processing_on for k in ("runs", "queued-there")} == {A}
    join(sched, B)
    sched.handle(TaskStarted(sid(), A, "runs"))
    msgs = sched.handle(WorkerDisconnected(sid(), A))
    assert state_of(sched, "runs") is TaskState.ERRED
    assert sched.tasks["queued-there"].suspicious == 0
    assert state_of(sched, "queued-there") is TaskState.PROCESSING
    assert sched.tasks["queued-there"].processing_on == B
    assert said(msgs) == [
        ("erred", "c1", "runs", WorkerDeaths(key="runs", deaths=1, last_worker=A), "runs"),
        ("compute", B, "queued-there"),
    ]
    check_invariants(sched)


def test_retries_do_not_spare_a_task_that_kills_workers():
    """`retries` counts user exceptions only: a task with retries left is
    still marked bad on its allowed_failures-th worker death, and those
    deaths leave its retries untouched."""
    sched = SchedulerState(allowed_failures=2, worker_saturation=1.0)
    join(sched, A, B, C)
    submit(sched, spec("poison", retries=5))
    for _ in range(2):
        worker = sched.tasks["poison"].processing_on
        sched.handle(TaskStarted(sid(), worker, "poison"))
        sched.handle(WorkerDisconnected(sid(), worker))
    ts = sched.tasks["poison"]
    assert ts.state is TaskState.ERRED
    assert isinstance(ts.failure, WorkerDeaths)
    assert ts.failure.deaths == 2
    assert ts.retries_left == 5
    check_invariants(sched)


def test_a_value_its_clients_already_have_is_not_recomputed_until_needed(sched):
    """A small value went to its client with the report; when its only copy
    dies, nothing is computed (the client has it): the key is released,
    lineage kept, and computed again only once a dependent needs it."""
    join(sched, A, B)
    submit(sched, spec("x"))
    worker = sched.tasks["x"].processing_on
    sched.handle(TaskStarted(sid(), worker, "x"))
    sched.handle(TaskFinished(sid(), worker, "x", 8, inline=True))
    assert list(sched.tasks["x"].delivered) == ["c1"]
    msgs = sched.handle(WorkerDisconnected(sid(), worker))
    assert state_of(sched, "x") is TaskState.RELEASED
    assert said(msgs) == []
    check_invariants(sched)
    msgs = submit(sched, spec("y", "x"))
    assert said(msgs) == [("compute", B, "x")]
    check_invariants(sched)


def test_a_value_sent_without_its_payload_is_recomputed_at_once(sched):
    """Without the value at the client (a large value), losing the only copy
    of a held key recomputes it, and the client hears that it was lost."""
    join(sched, A, B)
    submit(sched, spec("x"))
    worker = sched.tasks["x"].processing_on
    finish(sched, worker, "x")
    msgs = sched.handle(WorkerDisconnected(sid(), worker))
    assert said(msgs) == [("lost", "c1", "x"), ("compute", B, "x")]


def test_a_client_that_did_not_get_the_value_makes_it_computed_again(sched):
    """Two clients hold a small value; only one got it with the report (the
    other asked later): losing its copy recomputes it for the other."""
    join(sched, A, B)
    submit(sched, spec("x"), client="c1")
    worker = sched.tasks["x"].processing_on
    sched.handle(TaskStarted(sid(), worker, "x"))
    sched.handle(TaskFinished(sid(), worker, "x", 8, inline=True))
    submit(sched, spec("x"), client="c2")
    assert list(sched.tasks["x"].delivered) == ["c1"]
    msgs = sched.handle(WorkerDisconnected(sid(), worker))
    assert said(msgs) == [("lost", "c2", "x"), ("compute", B, "x")]
    sched.handle(KeysReleased(sid(), "c2", ("x",)))
    check_invariants(sched)


def test_expected_departure_suspects_nobody(sched):
    """A worker retired on purpose (restart) does not count against its tasks."""
    join(sched, A, B)
    submit(sched, spec("x"))
    worker = sched.tasks["x"].processing_on
    sched.handle(TaskStarted(sid(), worker, "x"))
    sched.handle(WorkerDisconnected(sid(), worker, expected=True))
    assert sched.tasks["x"].suspicious == 0


def test_scattered_data_is_lost_with_its_last_holder(sched):
    """Scattered data has no lineage: losing it errs it and its dependents."""
    join(sched, A, B)
    msgs = sched.handle(DataScattered(sid(), "c1", {"data": (100, (A,))}))
    assert said(msgs) == [("finished", "c1", "data", (A,))]
    submit(sched, spec("use", "data"))
    msgs = sched.handle(WorkerDisconnected(sid(), A))
    assert said(msgs) == [
        ("erred", "c1", "data", DataLost(key="data"), "data"),
        ("erred", "c1", "use", DataLost(key="data"), "data"),
    ]


def test_a_second_replica_survives_the_first(sched):
    """With two copies, losing one holder loses nothing."""
    join(sched, A, B)
    sched.handle(DataScattered(sid(), "c1", {"data": (100, (A,))}))
    sched.handle(ReplicaAdded(sid(), B, "data", 100))
    msgs = sched.handle(WorkerDisconnected(sid(), A))
    assert said(msgs) == []
    assert list(sched.tasks["data"].who_has) == [B]


def test_scattered_data_outlives_its_client_while_referenced(sched):
    """Scattered data is kept while a dependent's lineage refers to it."""
    join(sched, A)
    sched.handle(DataScattered(sid(), "c1", {"data": (100, (A,))}))
    submit(sched, spec("use", "data"), client="c2")
    finish(sched, A, "use")
    sched.handle(KeysReleased(sid(), "c1", ("data",)))
    assert state_of(sched, "data") is TaskState.MEMORY
    sched.handle(KeysReleased(sid(), "c2", ("use",)))
    assert sched.tasks == {}


def test_cancel_reports_the_key_and_its_dependents(sched):
    """cancel(x) cancels x and the dependents the same client holds."""
    join(sched, A)
    submit(sched, spec("x"), spec("y", "x"), wanted=["x", "y"])
    msgs = sched.handle(KeysCancelled(sid(), "c1", ("x",)))
    assert said(msgs) == [
        ("erred", "c1", "x", Cancelled(reason="cancelled by the client"), "x"),
        ("erred", "c1", "y", Cancelled(reason="cancelled by the client"), "y"),
        ("free", A, ("x",)),
    ]
    assert sched.tasks == {}


def test_cancel_leaves_other_clients_work_alone(sched):
    """A key another client holds keeps running when one client cancels it."""
    join(sched, A)
    submit(sched, spec("x"), client="c1")
    submit(sched, spec("x"), client="c2")
    msgs = sched.handle(KeysCancelled(sid(), "c1", ("x",)))
    assert said(msgs) == [("erred", "c1", "x", Cancelled(reason="cancelled by the client"), "x")]
    assert state_of(sched, "x") is TaskState.PROCESSING
    msgs = finish(sched, A, "x")
    assert said(msgs) == [("finished", "c2", "x", (A,))]


def test_client_disconnect_releases_its_keys(sched):
    """A client that goes away releases everything it held."""
    join(sched, A)
    sched.handle(ClientConnected(sid(), "c1"))
    submit(sched, spec("x"), spec("y", "x"), wanted=["y"])
    sched.handle(ClientDisconnected(sid(), "c1"))
    assert sched.tasks == {}


def test_root_tasks_queue_beyond_saturation_and_fill_on_completion(sched):
    """With saturation 1, a 1-thread worker holds one task; the rest queue."""
    join(sched, A)
    msgs = submit(sched, *(spec(f"t{i}") for i in range(5)))
    assert said(msgs) == [("compute", A, "t0")]
    assert [state_of(sched, f"t{i}") for i in range(1, 5)] == [TaskState.QUEUED] * 4
    msgs = finish(sched, A, "t0")
    assert said(msgs) == [("finished", "c1", "t0", (A,)), ("compute", A, "t1")]
    msgs = join(sched, B)
    assert said(msgs) == [("compute", B, "t2")]


def test_no_worker_then_worker_joins(sched):
    """A task restricted to an absent worker waits in no-worker until it joins."""
    join(sched, A)
    submit(sched, spec("x", workers=(B,)))
    assert state_of(sched, "x") is TaskState.NO_WORKER
    msgs = join(sched, B)
    assert said(msgs) == [("compute", B, "x")]


def test_missing_replica_sends_the_dependent_elsewhere(sched):
    """A worker that cannot fetch an input reports it; the input is recomputed."""
    join(sched, A, B)
    submit(sched, spec("x"), spec("y", "x", workers=(B,)), wanted=["y"])
    finish(sched, A, "x")
    assert sched.tasks["y"].processing_on == B
    msgs = sched.handle(ReplicaMissing(sid(), B, "x", (A,), "y"))
    assert said(msgs) == [("free", A, ("x",)), ("free", B, ("y",)), ("compute", A, "x")]
    assert state_of(sched, "y") is TaskState.WAITING


def test_stale_finish_from_a_released_task_is_freed(sched):
    """A result nobody wants any more is freed on the worker that made it."""
    join(sched, A)
    submit(sched, spec("x"))
    sched.handle(KeysReleased(sid(), "c1", ("x",)))
    msgs = sched.handle(TaskFinished(sid(), A, "x", 8))
    assert said(msgs) == [("free", A, ("x",))]


def test_a_finish_from_a_worker_the_task_is_not_on_is_ignored_and_freed(sched):
    """Only the worker a task is processing on can finish it: a task_finished
    from any other worker changes nothing, and that worker drops its value."""
    join(sched, A)
    join(sched, B)
    submit(sched, spec("x"))
    assigned = sched.tasks["x"].processing_on
    other = B if assigned == A else A
    msgs = sched.handle(TaskFinished(sid(), other, "x", 8))
    assert msgs == [FreeKeys(last_sid(), other, ("x",))]
    assert state_of(sched, "x") is TaskState.PROCESSING
    assert sched.tasks["x"].processing_on == assigned and not sched.tasks["x"].who_has
    msgs = sched.handle(TaskFinished(sid(), assigned, "x", 8))
    assert state_of(sched, "x") is TaskState.MEMORY and list(sched.tasks["x"].who_has) == [assigned]


def test_unknown_dependency_errs_with_lost_data(sched):
    """A task naming a key the scheduler never had errs with DataLost(key)."""
    join(sched, A)
    msgs = submit(sched, spec("y", "ghost"))
    assert said(msgs) == [("erred", "c1", "y", DataLost(key="ghost"), "ghost")]


def test_a_transition_outside_the_table_raises_and_changes_nothing(sched):
    """The transition table is closed: memory -> processing is refused."""
    join(sched, A)
    submit(sched, spec("x"))
    finish(sched, A, "x")
    ts = sched.tasks["x"]
    with pytest.raises(InvalidTransition):
        sched.transitions.move(ts, TaskState.PROCESSING, {})
    assert ts.state is TaskState.MEMORY


def test_replicate_asks_workers_for_copies_and_restores_them(sched):
    """replicate(n=2) fetches a second copy; when a holder dies, a new one is made."""
    join(sched, A, B, C)
    sched.handle(DataScattered(sid(), "c1", {"data": (100, (A,))}))
    msgs = sched.handle(ReplicationRequested(sid(), "c1", ("data",), 2))
    assert said(msgs) == [("acquire", B, {"data": (A,)})]
    [acquire] = [m for m in msgs if isinstance(m, AcquireReplicas)]
    assert dict(acquire.who_has) == {"data": (A,)}
    target = acquire.worker
    assert sched.tasks["data"].replicas_pending == {target: None}
    sched.handle(ReplicaAdded(sid(), target, "data", 100))
    assert list(sched.tasks["data"].who_has) == [A, target]
    msgs = sched.handle(WorkerDisconnected(sid(), A))
    assert said(msgs) == [("acquire", C, {"data": (B,)})]
    [acquire] = [m for m in msgs if isinstance(m, AcquireReplicas)]
    assert acquire.worker not in (A, target)
    assert dict(acquire.who_has) == {"data": (target,)}


def test_a_pending_copy_lost_with_its_worker_is_asked_elsewhere(sched):
    """If the worker fetching a copy dies, another worker is asked."""
    join(sched, A, B, C)
    sched.handle(DataScattered(sid(), "c1", {"data": (100, (A,))}))
    [acquire] = [m for m in sched.handle(ReplicationRequested(sid(), "c1", ("data",), 2)) if isinstance(m, AcquireReplicas)]
    msgs = sched.handle(WorkerDisconnected(sid(), acquire.worker))
    assert said(msgs) == [("acquire", C, {"data": (A,)})]
    [again] = [m for m in msgs if isinstance(m, AcquireReplicas)]
    assert again.worker not in (A, acquire.worker)


def test_restart_cancels_every_held_future_and_flushes_state(sched):
    """ClusterRestarted: each client hears 'cancelled' for each key; nothing remains."""
    join(sched, A, B)
    submit(sched, spec("x"), spec("y", "x"), wanted=["x", "y"])
    finish(sched, A, "x")
    msgs = sched.handle(ClusterRestarted(sid(), "the cluster was restarted"))
    assert said(msgs) == [
        ("erred", "c1", "x", Cancelled(reason="the cluster was restarted"), "x"),
        ("erred", "c1", "y", Cancelled(reason="the cluster was restarted"), "y"),
    ]
    assert sched.tasks == {} and sched.clients["c1"] == {}
    assert all(not ws.processing and not ws.has_what for ws in sched.workers.values())
    # The cluster takes new work at once.
    msgs = submit(sched, spec("z"))
    assert said(msgs) == [("compute", A, "z")]


def test_restart_frees_orphans_and_forgets_runs_taken_up_after_a_scheduler_restart(sched):
    """ClusterRestarted also drops what a new scheduler was still sorting out:
    an orphaned value is freed where it is held, and a run a registering
    worker still had is forgotten with its task.

    Kills the mutants that leave out the orphans' `FreeKeys` or the clearing
    of `recovering_runs` in `_on_cluster_restarted` (a stale run that names
    a forgotten task breaks the invariants)."""
    sched.handle(WorkerConnected(sid(), A, 1, held={"o": 8}, running=("t",)))
    sched.handle(WorkerConnected(sid(), B, 1))
    submit(sched, spec("i"), spec("t", "i"), wanted=["t"])
    assert sched.recovering_runs == {"t": A} and "o" in sched.orphans
    msgs = sched.handle(ClusterRestarted(sid(), "restarted"))
    s_ = last_sid()
    assert msgs == [
        ReportErred(s_, "c1", "t", Cancelled("restarted"), "t"),
        FreeKeys(s_, A, ("o",)),
    ]
    assert sched.recovering_runs == {} and sched.orphans == {}
    check_invariants(sched)


# --- a restarted scheduler: workers re-register, clients resubmit lineage ---


def test_a_value_a_worker_still_holds_is_not_recomputed(sched):
    """After a restart: the worker re-registers holding x, the client resubmits
    x and y=f(x): x is in memory at once and only y runs."""
    sched.handle(WorkerConnected(sid(), A, 1, held={"x": 8}))
    assert "x" in sched.orphans
    msgs = submit(sched, spec("x"), spec("y", "x"))
    assert said(msgs) == [("finished", "c1", "x", (A,)), ("compute", A, "y")]
    assert sched.orphans == {}


def test_a_task_still_running_is_not_started_twice(sched):
    """A worker re-registers running x: the resubmitted x is assigned to it, suspected if it dies."""
    join(sched, B)
    sched.handle(WorkerConnected(sid(), A, 1, running=("x",)))
    msgs = submit(sched, spec("x"))
    assert said(msgs) == [("compute", A, "x")]
    assert sched.tasks["x"].running
    msgs = sched.handle(TaskFinished(sid(), A, "x", 8))
    assert said(msgs) == [("finished", "c1", "x", (A,))]


def test_a_run_that_finishes_before_its_lineage_returns_is_kept(sched):
    """x finishes on a re-registered worker before any client resubmits it:
    the value is kept as an orphan and the resubmission takes it."""
    sched.handle(WorkerConnected(sid(), A, 1, running=("x",)))
    assert sched.handle(TaskFinished(sid(), A, "x", 8)) == []
    msgs = submit(sched, spec("x"))
    assert said(msgs) == [("finished", "c1", "x", (A,))]


def test_resubmitted_scattered_data_is_found_or_lost(sched):
    """Lineage-less keys resubmitted after a restart: held -> memory; held by
    nobody -> LostData once the recovery window closes."""
    sched.handle(WorkerConnected(sid(), A, 1, held={"kept": 8}))
    msgs = submit(sched, TaskSpec("kept", None), TaskSpec("gone", None))
    assert msgs == [ReportFinished(last_sid(), "c1", "kept", (A,))]
    msgs = sched.handle(RecoveryEnded(sid()))
    assert msgs == [ReportErred(last_sid(), "c1", "gone", DataLost("gone"), "gone")]


def test_unclaimed_orphans_expire_and_are_freed(sched):
    """Orphans no client claims are freed on their holders when they expire."""
    sched.handle(WorkerConnected(sid(), A, 1, held={"stale": 8}))
    msgs = sched.handle(OrphansExpired(sid(), ("stale",)))
    assert said(msgs) == [("free", A, ("stale",))]
    assert sched.orphans == {}


def test_a_late_worker_brings_a_value_being_recomputed(sched):
    """A worker re-registering with the value of a task being recomputed ends the recomputation."""
    join(sched, B)
    submit(sched, spec("x"))
    assert sched.tasks["x"].processing_on == B
    msgs = sched.handle(WorkerConnected(sid(), A, 1, held={"x": 8}))
    assert said(msgs) == [("free", B, ("x",)), ("finished", "c1", "x", (A,))]


def test_orphans_of_a_dead_worker_are_dropped(sched):
    """An orphan whose only holder dies is forgotten (its lineage will recompute it)."""
    sched.handle(WorkerConnected(sid(), A, 1, held={"x": 8}))
    sched.handle(WorkerDisconnected(sid(), A))
    assert sched.orphans == {}
    join(sched, B)
    msgs = submit(sched, spec("x"))
    assert said(msgs) == [("compute", B, "x")]


def test_a_saturated_worker_is_topped_up_in_batches():
    """Capacity 4 (one thread, saturation 4): a worker takes queued root tasks
    again only when down to 2, and then gets 2 at once (one batch, not one
    message per finished task)."""
    state = SchedulerState(allowed_failures=3, worker_saturation=4.0)
    join(state, A)
    msgs = submit(state, *(spec(f"t{i}") for i in range(10)))
    assert said(msgs) == [
        ("compute", A, "t0"),
        ("compute", A, "t1"),
        ("compute", A, "t2"),
        ("compute", A, "t3"),
    ]
    msgs = finish(state, A, "t0")
    assert said(msgs) == [("finished", "c1", "t0", (A,))]
    msgs = finish(state, A, "t1")
    assert said(msgs) == [("finished", "c1", "t1", (A,)), ("compute", A, "t4"), ("compute", A, "t5")]
    check_invariants(state)


def test_a_tasks_dicts_share_one_empty_dict_until_their_first_entry():
    """Records start with the shared NO_ENTRIES, which refuses every write; own() gives a task its own dict."""
    from trioflow.core.scheduler_records import NO_ENTRIES, SchedulerTask

    ts = SchedulerTask("x", None, priority=1)
    assert ts.who_has is NO_ENTRIES and ts.dependents is NO_ENTRIES
    for write in (
        lambda d: d.__setitem__("k", None),
        lambda d: d.setdefault("k", None),
        lambda d: d.update(k=None),
        lambda d: d.__ior__({"k": None}),
    ):
        with pytest.raises(TypeError, match="shared empty dict"):
            write(ts.who_has)
    assert ts.who_has.pop("k", None) is None and not NO_ENTRIES
    ts.own("who_has")["tcp://a:1"] = None
    assert ts.who_has == {"tcp://a:1": None} and ts.who_has is not NO_ENTRIES and not NO_ENTRIES


def test_a_batch_goes_on_past_a_task_forgotten_by_an_earlier_one(sched):
    """In one submission, an unwanted task listed first is forgotten and takes
    its unwanted input with it; the task listed after them, which names a
    key this scheduler never had, still errs with LostData naming that key.

    Kills the mutant that stops `_on_tasks_submitted`'s placement loop at the
    first task forgotten meanwhile (`continue` made `break`): "e" would then
    be taken up only as a wanted key, and run without its missing input."""
    join(sched, A)
    msgs = submit(sched, spec("b", "a"), spec("a"), spec("e", "ghost"), wanted=["e"])
    s_ = last_sid()
    assert msgs == [ReportErred(s_, "c1", "e", DataLost("ghost"), "ghost")]
    assert "a" not in sched.tasks and "b" not in sched.tasks
    assert state_of(sched, "e") is TaskState.ERRED
    check_invariants(sched)


def test_the_story_lists_every_move_of_a_key_with_its_stimulus():
    """`story` (what the dashboard's recorder reads) holds each move of a key,
    from and to, with the stimulus that caused it, ending in 'forgotten'.

    Kills the mutant that leaves a forgotten record in its last state
    (`ts.state = FORGOTTEN` removed from `_to_forgotten`): the story would
    end in 'memory -> memory'."""
    s = SchedulerState(allowed_failures=3, worker_saturation=1.0)
    s.handle(WorkerConnected("join", A, 1))
    s.handle(TasksSubmitted("sub", "c1", (spec("x"),), ("x",)))
    s.handle(TaskStarted("start", A, "x"))
    s.handle(TaskFinished("finish", A, "x", 8))
    s.handle(KeysReleased("release", "c1", ("x",)))
    assert list(s.story) == [
        ("x", "released", "waiting", "sub"),
        ("x", "waiting", "queued", "sub"),
        ("x", "queued", "processing", "sub"),
        ("x", "processing", "memory", "finish"),
        ("x", "memory", "forgotten", "release"),
    ]


def test_a_replication_request_goes_on_past_a_key_it_does_not_know(sched):
    """replicate() naming a key this scheduler has forgotten, then one it
    holds: the second still gets its copy.

    Kills the mutant that stops `_on_replication_requested` at the first
    unknown key (`continue` made `break`)."""
    join(sched, A, B)
    sched.handle(DataScattered(sid(), "c1", {"data": (100, (A,))}))
    msgs = sched.handle(ReplicationRequested("rep", "c1", ("gone", "data"), 2))
    assert msgs == [AcquireReplicas("rep", B, {"data": (A,)}, {"data": 100})]


def test_a_recomputed_input_whose_first_dependent_dies_with_its_worker_runs_for_the_second():
    """One worker's death, in one step: t's only copy goes (t must be
    recomputed and is ready: its input is on B), t's first dependent dies
    with it for good (KilledWorker), and its second dependent, rerouted,
    needs t again: t is recomputed on B, d1 fails with KilledWorker and d2
    waits for t. (Near seed 805 of the chaos lab; here d2 still needs t when
    d1 fails, so no release is recommended: the stale-release path itself
    is not reached, see docs/testing.md.)"""
    s = SchedulerState(allowed_failures=1, worker_saturation=2.0)
    s.handle(WorkerConnected(sid(), A, 2))
    submit(s, spec("i"))
    finish(s, A, "i")
    submit(s, spec("t", "i"))
    finish(s, A, "t")
    s.handle(WorkerConnected(sid(), B, 1))
    s.handle(ReplicationRequested(sid(), "c1", ("i",), 2))
    s.handle(ReplicaAdded(sid(), B, "i", 8))
    submit(s, spec("d1", "t"), spec("d2", "t"), wanted=["d1", "d2"])
    s.handle(KeysReleased(sid(), "c1", ("t",)))
    s.handle(TaskStarted(sid(), A, "d1"))
    out = s.handle(WorkerDisconnected("gone", A))
    assert out == [
        ReportErred("gone", "c1", "d1", WorkerDeaths("d1", 1, A), "d1"),
        ComputeTask("gone", B, "t", "run-t", (0, 2), {"i": (B,)}, {"i": 8}),
    ]
    assert [(k, s.tasks[k].state) for k in ("t", "d1", "d2")] == [
        ("t", TaskState.PROCESSING), ("d1", TaskState.ERRED), ("d2", TaskState.WAITING)
    ]
    check_invariants(s)
