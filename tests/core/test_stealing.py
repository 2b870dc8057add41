"""Work stealing and paused workers in the scheduler core: events in, exact
messages out (no I/O). The cost model and the confirmation exchange are
core/stealing.py; a paused worker's rules are in `SchedulerState`."""

import math

import pytest

from tests.core.conftest import said, sid
from trioflow.core import SchedulerState, TaskState
from trioflow.core.durations import UNKNOWN_DURATION_S, TaskDurations, key_prefix
from trioflow.core.scheduler_events import (
    ComputeTask,
    ReportFinished,
    RequestSteal,
    StealAnswered,
    TaskFinished,
    TaskSpec,
    TasksSubmitted,
    TaskStarted,
    WorkerConnected,
    WorkerDisconnected,
    WorkerPaused,
    WorkerResumed,
)
from trioflow.core.scheduler_invariants import check_invariants
from trioflow.core import stealing
from trioflow.core.stealing import STEAL_OVERHEAD_S

A, B, C = "tcp://a", "tcp://b", "tcp://c"


@pytest.fixture
def sched():
    state = SchedulerState(allowed_failures=3, worker_saturation=1.0)
    yield state
    check_invariants(state)


def task(key, *deps, workers=None, resources=None):
    return TaskSpec(key, f"run-{key}", tuple(deps), 0, workers, False, resources)


def submit(s, *specs, stimulus="sub", wanted=None):
    wanted = tuple(t.key for t in specs) if wanted is None else tuple(wanted)
    return s.handle(TasksSubmitted(stimulus, "c1", tuple(specs), wanted))


def compute(stimulus, worker, key, priority, who_has=None):
    who_has = who_has or {}
    return ComputeTask(stimulus, worker, key, f"run-{key}", priority, who_has, {k: 8 for k in who_has})


def fan_out_on_a(s, n=3, duration=None):
    """x runs on A; then n tasks that need x are all placed on A, with B idle.
    Returns the messages of x's finish."""
    s.handle(WorkerConnected(sid(), A, 1))
    s.handle(WorkerConnected(sid(), B, 1))
    submit(s, task("x"), *(task(f"y{i}", "x") for i in range(1, n + 1)), wanted=[f"y{i}" for i in range(1, n + 1)])
    assert s.tasks["x"].processing_on == A
    s.handle(TaskStarted(sid(), A, "x"))
    return s.handle(TaskFinished("x-done", A, "x", 8, duration=duration))


# -------------------------------------------------------- the durations --


@pytest.mark.parametrize(
    "key, prefix",
    [
        ("inc-9f2c4b1e0a7d6c5b", "inc"),
        ("step_big-003", "step_big"),
        ("('sum-ab12cd34ef', 3)", "sum"),
        ("my-task", "my-task"),
        ("load_training_batch-7", "load_training_batch"),
        ("0123456789abcdef0123", "data"),
    ],
)
def test_the_prefix_is_the_function_part_of_a_key(key, prefix):
    """Tasks of one function share a prefix, and so a duration estimate."""
    assert key_prefix(key) == prefix


def test_durations_start_at_the_default_and_average_each_report_in():
    """The first report replaces the default; each later one counts for half."""
    durations = TaskDurations()
    assert durations.estimate("inc") == UNKNOWN_DURATION_S
    durations.observe("inc", 0.2)
    assert durations.estimate("inc") == 0.2
    durations.observe("inc", 0.4)
    assert durations.estimate("inc") == pytest.approx(0.3)


def test_a_finished_task_reports_its_duration(sched):
    """TaskFinished's duration feeds the estimate of its prefix."""
    fan_out_on_a(sched, n=1, duration=0.25)
    assert sched.durations.estimate("x") == 0.25


# ------------------------------------------------------------ stealing --


def test_an_idle_worker_steals_the_task_that_would_wait_longest(sched):
    """Three tasks wait on A for its one thread while B idles: B asks A for
    the last of them (it would start last), and reserves a thread for it."""
    msgs = fan_out_on_a(sched)
    deps = {"x": (A,)}
    assert msgs == [
        compute("x-done", A, "y1", (0, 2), deps),
        compute("x-done", A, "y2", (0, 3), deps),
        compute("x-done", A, "y3", (0, 4), deps),
        RequestSteal("x-done", A, "y3", 1),
    ]
    assert sched.stealing["y3"].thief == B and sched.workers[B].incoming == {"y3": None}
    assert sched.tasks["y3"].processing_on == A  # not moved before A answers


def test_a_task_its_victim_gave_up_moves_to_the_thief(sched):
    """A gave y3 up: only now is it sent to B, and A is not told to free it."""
    fan_out_on_a(sched)
    msgs = sched.handle(StealAnswered("answer", A, "y3", 1, given_up=True))
    assert msgs == [compute("answer", B, "y3", (0, 4), {"x": (A,)})]
    assert sched.tasks["y3"].processing_on == B
    assert list(sched.workers[A].processing) == ["y1", "y2"]
    assert sched.stealing == {}
    assert ("y3", "processing", "processing", "answer") in sched.story


def test_a_task_its_victim_kept_stays_and_the_thief_asks_again(sched):
    """A started y3 before the request arrived: the steal is off, and B, still
    idle, asks for the next waiting task (y2)."""
    fan_out_on_a(sched)
    sched.handle(TaskStarted(sid(), A, "y3"))
    msgs = sched.handle(StealAnswered("answer", A, "y3", 1, given_up=False))
    assert msgs == [RequestSteal("answer", A, "y2", 2)]
    assert sched.tasks["y3"].processing_on == A


def test_given_up_is_not_believed_of_a_task_that_started(sched):
    """A run in progress is never handed to a second worker: an answer that
    contradicts the victim's own task_started counts as "kept"."""
    fan_out_on_a(sched)
    sched.handle(TaskStarted(sid(), A, "y3"))
    msgs = sched.handle(StealAnswered("answer", A, "y3", 1, given_up=True))
    assert said(msgs, of="answer") == [("steal", A, "y2")]
    assert sched.tasks["y3"].processing_on == A


def test_an_answer_about_a_steal_that_was_cancelled_is_ignored(sched):
    """y3 finished on A while the request was on its way: the steal ended
    with the assignment, and A's late answer changes nothing."""
    fan_out_on_a(sched)
    sched.handle(TaskStarted(sid(), A, "y3"))
    msgs = sched.handle(TaskFinished("done", A, "y3", 8))
    assert sched.tasks["y3"].state is TaskState.MEMORY and "y3" not in sched.stealing
    # B, idle again, asks for y2 in the same step.
    assert msgs == [ReportFinished("done", "c1", "y3", (A,)), RequestSteal("done", A, "y2", 2)]
    assert sched.handle(StealAnswered("late", A, "y3", 1, given_up=True)) == []
    assert sched.tasks["y3"].state is TaskState.MEMORY


def test_an_answer_to_an_older_steal_of_the_same_task_is_ignored(sched):
    """Steal ids tell answers apart: an answer naming the wrong id moves nothing."""
    fan_out_on_a(sched)
    assert sched.handle(StealAnswered("answer", A, "y3", 99, given_up=True)) == []
    assert sched.tasks["y3"].processing_on == A and "y3" in sched.stealing


def test_a_task_given_up_after_its_thief_died_is_placed_afresh(sched):
    """B died while A was asked: y3, given up, goes where its input is (A)."""
    fan_out_on_a(sched)
    sched.handle(WorkerDisconnected(sid(), B))
    assert sched.stealing["y3"].thief is None
    msgs = sched.handle(StealAnswered("answer", A, "y3", 1, given_up=True))
    assert msgs == [compute("answer", A, "y3", (0, 4), {"x": (A,)})]
    assert sched.tasks["y3"].processing_on == A


def test_a_victim_that_dies_takes_its_pending_steals_with_it(sched):
    """A died: its tasks are rerouted (to B, which holds no copy of x: x is
    recomputed first) and B no longer expects y3."""
    fan_out_on_a(sched)
    msgs = sched.handle(WorkerDisconnected("died", A))
    assert sched.stealing == {} and sched.workers[B].incoming == {}
    assert msgs == [compute("died", B, "x", (0, 1))]


def test_restricted_tasks_are_not_stolen(sched):
    """A task restricted to A stays on A however long it waits."""
    sched.handle(WorkerConnected(sid(), A, 1))
    sched.handle(WorkerConnected(sid(), B, 1))
    msgs = submit(sched, task("r1", workers=(A,)), task("r2", workers=(A,)), task("r3", workers=(A,)))
    assert said(msgs, of="sub") == [("compute", A, "r1"), ("compute", A, "r2"), ("compute", A, "r3")]


def test_a_task_whose_inputs_cost_more_to_move_than_to_run_stays(sched):
    """y tasks take 1 ms, their 1 MB input takes 10 ms to move at 100 MB/s:
    moving one costs more than running it, so B steals nothing."""
    sched.handle(WorkerConnected(sid(), A, 1))
    sched.handle(WorkerConnected(sid(), B, 1))
    for _ in range(2):
        sched.durations.observe("y1", 0.001)
        sched.durations.observe("y2", 0.001)
        sched.durations.observe("y3", 0.001)
    submit(sched, task("x"), task("y1", "x"), task("y2", "x"), task("y3", "x"), wanted=["y1", "y2", "y3"])
    msgs = sched.handle(TaskFinished("x-done", A, "x", 1_000_000))
    assert said(msgs, of="x-done") == [("compute", A, "y1"), ("compute", A, "y2"), ("compute", A, "y3")]


def test_a_task_that_would_wait_less_than_a_steal_costs_stays(sched):
    """Tasks known to take a tenth of the steal overhead: waiting behind two
    of them on A is quicker than moving to B."""
    quick = STEAL_OVERHEAD_S / 10
    for prefix in ("y1", "y2", "y3"):
        sched.durations.observe(prefix, quick)
    msgs = fan_out_on_a(sched)
    assert said(msgs, of="x-done") == [("compute", A, "y1"), ("compute", A, "y2"), ("compute", A, "y3")]


def test_a_task_is_stolen_for_the_work_ahead_of_it_not_its_own(sched):
    """The wait a steal saves is the work ahead of the task, not counting the
    task itself: tasks of a third of the steal overhead leave the last of
    three waiting two thirds of it (it stays); tasks of 0.6 of it leave it
    waiting 1.2 (it is stolen).

    Kills `WorkStealing._candidate::arith#2` (the task's own duration added
    to the wait ahead of it instead of taken off)."""
    for prefix in ("y1", "y2", "y3"):
        sched.durations.observe(prefix, STEAL_OVERHEAD_S / 3)
    msgs = fan_out_on_a(sched)
    assert said(msgs, of="x-done") == [("compute", A, "y1"), ("compute", A, "y2"), ("compute", A, "y3")]
    state = SchedulerState(worker_saturation=1.0)
    for prefix in ("y1", "y2", "y3"):
        state.durations.observe(prefix, STEAL_OVERHEAD_S * 0.6)
    msgs = fan_out_on_a(state)
    assert msgs[-1] == RequestSteal("x-done", A, "y3", 1)
    check_invariants(state)


@pytest.mark.parametrize("duration, stolen", [(0.125, False), (0.1875, True)])
def test_a_steal_must_save_more_than_it_costs(monkeypatch, duration, stolen):
    """A steal is made only when the wait it saves is strictly more than its
    cost: with a cost of exactly 0.25 s (no bytes to move, the overhead set
    to 0.25), the last of three tasks of 0.125 s would wait exactly 0.25 s
    (it stays); of 0.1875 s, 0.375 s (it is stolen). The figures are exact
    in binary, so the boundary is the comparison's own.

    Kills `WorkStealing._candidate::cmp#7` (``>=`` for ``>``)."""
    monkeypatch.setattr(stealing, "STEAL_OVERHEAD_S", 0.25)
    state = SchedulerState(worker_saturation=1.0, bandwidth=math.inf)
    for prefix in ("y1", "y2", "y3"):
        state.durations.observe(prefix, duration)
    msgs = fan_out_on_a(state)
    steals = [m for m in msgs if isinstance(m, RequestSteal)]
    assert steals == ([RequestSteal("x-done", A, "y3", 1)] if stolen else [])
    check_invariants(state)


def test_every_idle_worker_steals_in_the_same_event(sched):
    """B and C both idle while four tasks wait on A: one event lets each of
    them ask for a task (the last two assigned), not just the first.

    Kills `WorkStealing.balance::not#2` (stopping after the first thief
    while work is still backlogged)."""
    sched.handle(WorkerConnected(sid(), A, 1))
    sched.handle(WorkerConnected(sid(), B, 1))
    sched.handle(WorkerConnected(sid(), C, 1))
    submit(sched, task("x"), *(task(f"y{i}", "x") for i in range(1, 5)), wanted=[f"y{i}" for i in range(1, 5)])
    assert sched.tasks["x"].processing_on == A
    sched.handle(TaskStarted(sid(), A, "x"))
    msgs = sched.handle(TaskFinished("x-done", A, "x", 8))
    steals = [m for m in msgs if isinstance(m, RequestSteal)]
    assert [(m.worker, m.key) for m in steals] == [(A, "y4"), (A, "y3")]
    assert {sched.stealing[key].thief for key in ("y4", "y3")} == {B, C}


def test_stealing_can_be_switched_off():
    """work_stealing=False (Config.work_stealing): placement is final."""
    state = SchedulerState(worker_saturation=1.0, work_stealing=False)
    msgs = fan_out_on_a(state)
    assert said(msgs, of="x-done") == [("compute", A, "y1"), ("compute", A, "y2"), ("compute", A, "y3")]
    check_invariants(state)


def test_a_worker_with_free_threads_steals_one_task_per_thread(sched):
    """C has two threads: it asks for two tasks, the last two assigned to A."""
    fan_out_on_a(sched, n=4)
    sched.handle(WorkerDisconnected(sid(), B))  # (its pending steal: thief gone)
    msgs = sched.handle(WorkerConnected("c-joins", C, 2))
    assert msgs == [RequestSteal("c-joins", A, "y3", 2), RequestSteal("c-joins", A, "y2", 3)]
    assert list(sched.workers[C].incoming) == ["y3", "y2"]


# ---------------------------------------------------------------- pause --


def test_a_paused_worker_is_sent_nothing_new(sched):
    """Root tasks go to B while A is paused; once A resumes it gets the next."""
    sched.handle(WorkerConnected(sid(), A, 1))
    sched.handle(WorkerConnected(sid(), B, 1))
    sched.handle(WorkerPaused(sid(), A))
    msgs = submit(sched, task("r1"), task("r2"))
    assert msgs == [compute("sub", B, "r1", (0, 1))]
    assert sched.tasks["r2"].state is TaskState.QUEUED
    msgs = sched.handle(WorkerResumed("resumed", A))
    assert msgs == [compute("resumed", A, "r2", (0, 2))]


def test_a_task_whose_input_holders_are_all_paused_goes_to_a_worker_that_is_not(sched):
    """x is on A, which is paused: y goes to B, which fetches x."""
    sched.handle(WorkerConnected(sid(), A, 1))
    sched.handle(WorkerConnected(sid(), B, 1))
    submit(sched, task("x"), task("y", "x"), wanted=["y"])
    sched.handle(WorkerPaused(sid(), A))
    msgs = sched.handle(TaskFinished("x-done", A, "x", 8))
    assert msgs == [compute("x-done", B, "y", (0, 2), {"x": (A,)})]


def test_with_every_worker_paused_ready_work_waits_until_one_resumes(sched):
    """Nothing is sent while both are paused: y waits in no-worker, r queued."""
    sched.handle(WorkerConnected(sid(), A, 1))
    sched.handle(WorkerConnected(sid(), B, 1))
    submit(sched, task("x"), task("y", "x"), wanted=["y"])
    sched.handle(WorkerPaused(sid(), A))
    sched.handle(WorkerPaused(sid(), B))
    assert sched.handle(TaskFinished("x-done", A, "x", 8)) == []
    assert sched.tasks["y"].state is TaskState.NO_WORKER
    assert submit(sched, task("r")) == []
    assert sched.tasks["r"].state is TaskState.QUEUED
    # B resumes: y goes there; r stays queued, B being saturated by y.
    msgs = sched.handle(WorkerResumed("resumed", B))
    assert msgs == [compute("resumed", B, "y", (0, 2), {"x": (A,)})]
    assert sched.tasks["r"].state is TaskState.QUEUED


def test_the_waiting_tasks_of_a_paused_worker_are_stolen_first(sched):
    """A paused with two tasks assigned: B, idle, asks for both one at a time,
    however short they are (they would wait as long as A stays paused)."""
    for prefix in ("y1", "y2"):
        sched.durations.observe(prefix, STEAL_OVERHEAD_S / 10)
    fan_out_on_a(sched, n=2)
    msgs = sched.handle(WorkerPaused("paused", A))
    assert msgs == [RequestSteal("paused", A, "y2", 1)]
