"""A new scheduler rebuilding its state: re-registered values and runs, exact outputs.

After a scheduler restart the workers come back with what they hold and
run, and the clients resubmit the lineage of what they hold. These tests
drive a fresh `SchedulerState` through that recovery (spec/README.md,
"Scheduler restart"; docs/resilience.md, "The scheduler dies").
"""

from tests.core.conftest import last_sid, said, sid
from trioflow.core import DataLost, SchedulerState, TaskState, WorkerDeaths
from trioflow.core.scheduler_records import wire_priority
from trioflow.core.scheduler_events import (
    ComputeTask,
    DataScattered,
    FreeKeys,
    KeysReleased,
    OrphansExpired,
    RecoveryEnded,
    ReportErred,
    ReportFinished,
    SchedulerStarted,
    TaskSpec,
    TasksSubmitted,
    WakeAfter,
    WorkerConnected,
    WorkerDisconnected,
)
from trioflow.core.scheduler_invariants import check_invariants

A, B = "tcp://a", "tcp://b"


def spec(key, *deps):
    return TaskSpec(key, f"run-{key}", tuple(deps))


def submit(s, *specs, client="c1", wanted=None):
    wanted = tuple(t.key for t in specs) if wanted is None else tuple(wanted)
    return s.handle(TasksSubmitted(sid(), client, tuple(specs), wanted))


def test_an_adopted_value_nobody_needs_is_freed_when_the_recovery_ends(sched):
    """Kills the mutants that leave `_on_recovery_ended` without judging (the
    loop over `unjudged` removed, or `_judge_adopted` doing nothing): a value
    a worker brought back that no resubmitted lineage needs stays for ever."""
    sched.handle(WorkerConnected(sid(), A, 1, held={"a": 8, "d": 8}))
    msgs = submit(sched, spec("a"), spec("b"), spec("d", "a", "b"), wanted=["d"])
    assert msgs == [ReportFinished(last_sid(), "c1", "d", (A,))]
    # a is d's lineage only, and d is done: a is not needed, but another
    # client's resubmission may still name it, so it waits for the verdict.
    assert sched.tasks["a"].state is TaskState.MEMORY
    assert list(sched.unjudged) == ["a", "d"]
    msgs = sched.handle(RecoveryEnded(sid()))
    assert msgs == [FreeKeys(last_sid(), A, ("a",))]
    assert sched.tasks["a"].state is TaskState.RELEASED
    assert sched.unjudged == {} and sched.recovery_open is False


def test_an_adopted_value_another_client_holds_is_kept(sched):
    """Kills the mutant that judges adopted values at once (`if
    self.recovery_open` made false): the value the first client's lineage
    names but does not need is freed, and the second client's resubmission
    then computes it again."""
    sched.handle(WorkerConnected(sid(), A, 1, held={"a": 8, "d": 8}))
    submit(sched, spec("a"), spec("b"), spec("d", "a", "b"), wanted=["d"], client="c1")
    msgs = submit(sched, spec("a"), client="c2")
    assert msgs == [ReportFinished(last_sid(), "c2", "a", (A,))]
    assert sched.handle(RecoveryEnded(sid())) == []
    assert sched.tasks["a"].state is TaskState.MEMORY and list(sched.tasks["a"].who_has) == [A]


def test_after_the_recovery_an_adopted_value_is_judged_at_once():
    """Once the window has closed, a resubmission that adopts an unneeded
    value frees it in the same step (nobody else is still to come)."""
    state = SchedulerState(allowed_failures=3, worker_saturation=1.0)
    state.handle(RecoveryEnded(sid()))
    state.handle(WorkerConnected(sid(), A, 1, held={"a": 8, "d": 8}))
    msgs = submit(state, spec("a"), spec("b"), spec("d", "a", "b"), wanted=["d"])
    sid_ = last_sid()
    assert msgs == [ReportFinished(sid_, "c1", "d", (A,)), FreeKeys(sid_, A, ("a",))]
    assert state.unjudged == {}
    check_invariants(state)


def test_a_run_reclaimed_from_the_queue_counts_its_workers_death():
    """A worker registers while running one of several queued root tasks:
    that task is assigned back to it, running, so the worker's death counts
    against it.

    Kills the mutant that drops the loop of `_on_worker_connected` moving a
    reported run out of the queue (`for key in ev.running: ... QUEUED ->
    PROCESSING`): the queue then hands the worker another task, the run
    stays queued, and the death is missed by the KilledWorker count. Also
    kills `ts.running = True` removed from `_to_processing`'s recovering
    branch (the run is assigned but not counted as running)."""
    state = SchedulerState(allowed_failures=1, worker_saturation=1.0)
    state.handle(WorkerConnected(sid(), B, 1))
    msgs = submit(state, spec("t0"), spec("t1"), spec("t2"), spec("t3"))
    assert said(msgs) == [("compute", B, "t0")]
    assert [state.tasks[k].state for k in ("t1", "t2", "t3")] == [TaskState.QUEUED] * 3
    msgs = state.handle(WorkerConnected(sid(), A, 1, running=("t3",)))
    assert [(type(m), m.worker, m.key) for m in msgs] == [(ComputeTask, A, "t3")]
    assert state.tasks["t3"].processing_on == A and state.tasks["t3"].running
    assert [state.tasks[k].state for k in ("t1", "t2")] == [TaskState.QUEUED] * 2
    msgs = state.handle(WorkerDisconnected(sid(), A))
    failure = WorkerDeaths("t3", 1, A)
    assert said(msgs) == [("erred", "c1", "t3", failure, "t3")]
    assert state.tasks["t3"].state is TaskState.ERRED
    check_invariants(state)


# --- scattered data after a scheduler restart, whoever reconnects first ---


def scattered(key):
    return TaskSpec(key, None)


def test_scattered_data_waits_for_its_holder_while_the_recovery_is_open(sched):
    """The client resubmits before the worker holding its scattered data has
    re-registered: the data waits (no LostData), its dependent waits on it,
    and both go on when the worker brings it back.

    Kills the mutants that declare resubmitted scattered data lost at once
    (`if not self.recovery_open` negated) or that do not take it from the
    registering worker (`key in self.awaiting_holders` dropped there)."""
    msgs = submit(sched, scattered("s"), spec("d", "s"), wanted=["s", "d"])
    assert msgs == []
    assert sched.tasks["s"].state is TaskState.RELEASED and sched.awaits_holder("s")
    assert sched.tasks["d"].state is TaskState.WAITING and list(sched.tasks["d"].waiting_on) == ["s"]
    check_invariants(sched)
    msgs = sched.handle(WorkerConnected(sid(), A, 1, held={"s": 8}))
    s_ = last_sid()
    assert msgs == [
        ReportFinished(s_, "c1", "s", (A,)),
        ComputeTask(s_, A, "d", "run-d", wire_priority(sched.tasks["d"].priority), {"s": (A,)}, {"s": 8}),
    ]
    assert not sched.awaits_holder("s")
    assert sched.handle(RecoveryEnded(sid())) == []
    assert sched.tasks["s"].state is TaskState.MEMORY


def test_scattered_data_nobody_brings_back_in_time_is_lost_and_a_late_holder_restores_it(sched):
    """At the end of the recovery window, resubmitted scattered data no worker
    brought back is lost (the client hears LostData, its dependent errs); a
    worker that registers later with it puts it back in memory (the
    dependent stays erred: its failure was reported).

    Kills the mutant that leaves `_on_recovery_ended` without declaring the
    awaited data lost (the dependent would wait for ever)."""
    submit(sched, scattered("s"), spec("d", "s"), wanted=["s", "d"])
    msgs = sched.handle(RecoveryEnded(sid()))
    s_ = last_sid()
    lost = DataLost("s")
    assert msgs == [ReportErred(s_, "c1", "s", lost, "s"), ReportErred(s_, "c1", "d", lost, "s")]
    assert sched.awaits_holder("s")  # still: a late worker may bring it
    check_invariants(sched)
    msgs = sched.handle(WorkerConnected(sid(), A, 1, held={"s": 8}))
    assert msgs == [ReportFinished(last_sid(), "c1", "s", (A,))]
    assert sched.tasks["s"].state is TaskState.MEMORY and not sched.awaits_holder("s")
    assert sched.tasks["d"].state is TaskState.ERRED


def test_scattered_data_held_since_is_no_longer_awaited():
    """Once a worker held the resubmitted data, the scheduler has a record of
    who had it: losing it again is an ordinary loss, and a claim to hold it
    is no longer taken on trust (`awaits_holder` is false)."""
    state = SchedulerState(allowed_failures=3, worker_saturation=1.0)
    state.handle(RecoveryEnded(sid()))
    state.handle(WorkerConnected(sid(), A, 1, held={"s": 8}))
    submit(state, scattered("s"))
    assert state.tasks["s"].state is TaskState.MEMORY and not state.awaits_holder("s")
    msgs = state.handle(WorkerDisconnected(sid(), A))
    assert msgs == [ReportErred(last_sid(), "c1", "s", DataLost("s"), "s")]
    assert not state.awaits_holder("s")
    check_invariants(state)


def test_an_awaited_key_a_client_releases_is_forgotten(sched):
    """Resubmitted scattered data nobody holds any more is forgotten, and no
    longer awaited."""
    submit(sched, scattered("s"))
    assert sched.awaits_holder("s")
    sched.handle(KeysReleased(sid(), "c1", ("s",)))
    assert sched.tasks == {} and not sched.awaits_holder("s")
    assert sched.handle(RecoveryEnded(sid())) == []


def test_scattered_again_while_awaited_the_data_is_back(sched):
    """The client scatters the awaited key again (its digest names the same
    data): it is in memory, and what waits on it runs."""
    sched.handle(WorkerConnected(sid(), B, 1))
    submit(sched, scattered("s"), spec("d", "s"), wanted=["s", "d"])
    msgs = sched.handle(DataScattered(sid(), "c1", {"s": (8, (B,))}))
    assert [(type(m), getattr(m, "key", None)) for m in msgs] == [(ReportFinished, "s"), (ComputeTask, "d")]
    assert not sched.awaits_holder("s")


def test_scattered_data_resubmitted_after_the_recovery_is_lost_at_once():
    """A client that reconnects after the recovery window closed resubmits
    scattered data no worker brought back: it is lost at once (the client
    hears LostData, its dependent errs), not left waiting for ever.

    Kills the mutant that only marks such data awaited in
    `_on_tasks_submitted` (the `LOST` transition for a closed window
    removed): the client's future and its dependent would never end."""
    state = SchedulerState(allowed_failures=3, worker_saturation=1.0)
    state.handle(RecoveryEnded(sid()))
    msgs = submit(state, scattered("s"), spec("d", "s"), wanted=["s", "d"])
    s_ = last_sid()
    lost = DataLost("s")
    assert msgs == [ReportErred(s_, "c1", "s", lost, "s"), ReportErred(s_, "c1", "d", lost, "s")]
    assert state.tasks["s"].state is TaskState.LOST and state.tasks["d"].state is TaskState.ERRED
    check_invariants(state)


# ------------------------------------------------------------- timers --


def test_the_start_sets_the_timer_that_closes_the_recovery_window():
    """The core decides how long the window stays open: its start asks the
    shell for `RecoveryEnded` after `recovery_grace_s`, and the window stays
    open until that event comes back."""
    state = SchedulerState(worker_saturation=1.0, recovery_grace_s=2.5)
    started = SchedulerStarted(sid())
    closes = RecoveryEnded(f"recovery-ended-after-{started.stimulus_id}")
    assert state.handle(started) == [WakeAfter(started.stimulus_id, 2.5, closes)]
    assert state.in_recovery()
    assert state.handle(closes) == []
    assert not state.in_recovery()
    check_invariants(state)


def test_values_nobody_claims_set_the_timer_of_their_expiry():
    """A worker bringing keys nobody knows asks for their expiry after
    `orphan_timeout_s`; the expiry frees what is still unclaimed."""
    state = SchedulerState(worker_saturation=1.0, orphan_timeout_s=60.0)
    joined = WorkerConnected(sid(), A, 1, held={"x": 8}, running=("y",))
    expires = OrphansExpired(f"orphans-expired-after-{joined.stimulus_id}", ("x", "y"))
    assert state.handle(joined) == [WakeAfter(joined.stimulus_id, 60.0, expires)]
    assert state.handle(expires) == [FreeKeys(expires.stimulus_id, A, ("x",))]
    assert state.orphans == {}
    check_invariants(state)


def test_a_worker_bringing_only_known_values_sets_no_timer(sched):
    """No orphan, no timer: the value of a known task is taken at once."""
    submit(sched, TaskSpec("s", None))
    joined = WorkerConnected(sid(), A, 1, held={"s": 8})
    assert sched.handle(joined) == [ReportFinished(joined.stimulus_id, "c1", "s", (A,))]
