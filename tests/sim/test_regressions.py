"""Bugs the chaos lab found, each pinned by its seed.

For every bug: the core events that reproduce it, in the order the seed's
run produced them (a fast, exact test of the fix), and the seed's whole
run, which must now pass every oracle. A seed names a run only with its
fault plan, so each plan is pinned here as it was drawn when the bug was
found; replay one with ``trioflow chaos --seed N --plan '<plan>' --print-trace``.
"""

from __future__ import annotations

import pytest

from tests.core.conftest import sid
from trioflow.core import SchedulerState, WorkerState, WorkerTaskState
from trioflow.core.scheduler_events import (
    AcquireReplicas,
    ComputeTask,
    DataDropped,
    DataScattered,
    TaskErred,
    FreeKeys,
    ReplicaAdded,
    ReplicaMissing,
    ReplicationRequested,
    ReportErred,
    ReportFinished,
    ReportLost,
    StealAnswered,
    TaskFinished,
    TasksSubmitted,
    TaskSpec,
    TaskStarted,
    WorkerConnected,
    WorkerDisconnected,
)
from trioflow.core.scheduler_invariants import check_invariants
from trioflow.core.scheduler_records import TaskState
from trioflow.core.worker_events import (
    ComputeRequested,
    DropData,
    Execute,
    ExecutionFailed,
    ExecutionSucceeded,
    FreeRequested,
    Gather,
    GatherFailed,
    GatherSucceeded,
    ReplicasRequested,
    SendDataDropped,
    SendReplicaAdded,
    SendReplicaMissing,
    SendTaskFinished,
)
from trioflow.core.worker_invariants import check_worker_invariants
from trioflow.core import DataLost, UserError, WorkerDeaths
from trioflow.sim.faults import parse_plan
from trioflow.sim.lab import LabSettings, run_seed

A, B = "sim://worker-0:8800", "sim://worker-1:8801"
ME, PEER = "sim://worker-2:8802", "sim://worker-3:8803"


def scheduler(*workers: str) -> SchedulerState:
    state = SchedulerState(allowed_failures=3, worker_saturation=1.0)
    for worker in workers:
        state.handle(WorkerConnected(sid(), worker, 1))
    return state


def submit(state: SchedulerState, key: str, *deps: str) -> list:
    return state.handle(TasksSubmitted(sid(), "c1", (TaskSpec(key, f"run-{key}", deps),), (key,)))


def compute(key: str, who_has=None) -> ComputeRequested:
    who_has = who_has or {}
    return ComputeRequested(sid(), key, f"run-{key}", (1,), who_has, {k: 8 for k in who_has})


def frees(messages, worker: str) -> list[str]:
    return [k for m in messages if isinstance(m, FreeKeys) and m.worker == worker for k in m.keys]


# The plans the seeds drew (2, 5, 21 and 56 with the default mix before
# scheduler_restart joined it).
PLANS = {
    2: "reset@3.456:worker-1,crash@4.106:worker-1,restart@5.252:worker-1,crash@6.641:worker-1,"
    "restart@7.916:worker-1",
    5: "crash@1.011:worker-1,partition@2.031:worker-0+worker-2/3.553,restart@2.32:worker-3,"
    "crash@4.449:worker-1,crash@5.892:worker-2",
    21: "reset@2.329:worker-2,partition@3.134:worker-0+worker-2/4.815,crash@3.237:worker-2,"
    "crash@3.768:worker-2,hang@7.638:worker-1/4.942",
    56: "crash@0.64:worker-3,hang@1.375:worker-3/4.539,crash@2.256:worker-1,"
    "partition@2.975:worker-1+worker-2/4.644,crash@3.612:worker-3",
    # --mix partition=1, found by the sweep of the final code (issue 19)
    271: "partition@0.119:worker-0+worker-1+worker-2/2.999,partition@3.356:worker-1/3.763,"
    "partition@3.485:worker-3/4.332,partition@5.539:worker-0/1.171,partition@7.21:worker-1+worker-3/3.449",
    163: "reset@0.436:worker-1,partition@2.078:worker-2/0.575,crash@2.973:worker-0,"
    "hang@3.052:worker-2/3.453,hang@4.925:worker-3/1.901",
    314: "scheduler_restart@1.539:scheduler/3.083,crash@3.279:worker-1,restart@4.951:worker-3,"
    "crash@5.688:worker-3,crash@7.548:worker-2",
    121: "hang@2.247:worker-1/5.083,partition@2.915:worker-2/2.294,restart@4.495:worker-0,"
    "reset@6.402:worker-2,partition@7.2:worker-1/0.874",
    463: "hang@1.251:worker-1/1.974,partition@3.849:worker-0+worker-1+worker-2/4.855,"
    "restart@4.433:worker-1,partition@7.006:worker-1/4.718,crash@7.387:worker-3",
    474: "scheduler_restart@1.224:scheduler/0.92,hang@1.444:worker-1/2.853,hang@3.839:worker-3/4.599,"
    "restart@7.554:worker-3,crash@7.916:worker-2",
    805: "crash@0.124:worker-0,crash@2.041:worker-0,reset@2.906:worker-2,hang@4.676:worker-3/4.117,"
    "reset@5.687:worker-3",
    23: "crash@0.784:worker-1,crash@1.477:worker-3,restart@1.561:worker-0,crash@1.892:worker-3,"
    "crash@2.521:worker-2",
    # --mix hang=1
    75: "hang@1.954:worker-0/2.679,hang@2.617:worker-2/5.454,hang@4.511:worker-3/0.836,"
    "hang@5.088:worker-0/0.905,hang@5.732:worker-2/4.13",
    439: "hang@0.39:worker-1/4.084,hang@1.273:worker-2/5.244,hang@4.953:worker-3/5.168,"
    "hang@5.843:worker-2/2.867,hang@7.574:worker-2/3.079",
    # --mix restart=1
    356: "restart@4.813:worker-2,restart@6.417:worker-3,restart@6.544:worker-2,restart@6.731:worker-3,"
    "restart@6.931:worker-2",
    # --mix reset=1
    789: "reset@5.24:worker-0,reset@5.274:worker-3,reset@5.331:worker-2,reset@5.734:worker-1,reset@5.751:worker-3",
    # default mix, found by the sweep of the final code (issue 19)
    78: "crash@1.465:worker-1,reset@2.347:worker-3,restart@3.05:worker-3,crash@3.544:worker-1,crash@6.602:worker-0",
    # --mix crash=1
    829: "crash@0.578:worker-0,crash@3.107:worker-2,crash@4.824:worker-2,crash@6.599:worker-0,crash@6.73:worker-3",
    # --mix partition=1, found by the sweep of stop 25
    137: "partition@0.809:worker-0+worker-1+worker-3/4.509,partition@2.402:worker-2+worker-3/2.462,"
    "partition@4.477:worker-3/5.503,partition@5.856:worker-0/1.867,partition@5.876:worker-3/3.716",
}


def run_pinned(seed: int, settings: LabSettings | None = None):
    return run_seed(seed, settings, plan=parse_plan(PLANS[seed]))


def assert_clean(report) -> None:
    __tracebackhide__ = True
    assert report.ok, f"seed {report.seed}:\n" + "\n".join(report.violations)


# ------------------------------------------------------------- seed 2 --


def test_seed_2_a_second_finish_is_not_counted_as_a_copy():
    """Seed 2: a rerouted task finished on both workers; the second finish crossed the
    FreeKeys that the first result sent it, and was counted as a copy the worker dropped.

    Since a result counts only from the worker the task is processing on, the
    run it had been taken from (on B) is not taken at all: it is freed there,
    and A's own finish, which that no longer crosses, is the value.
    """
    state = scheduler(A, B)
    submit(state, "x")
    assert state.tasks["x"].processing_on == A
    state.handle(TaskStarted(sid(), A, "x"))
    out = state.handle(TaskFinished(sid(), B, "x", 8))
    assert out == [FreeKeys(out[0].stimulus_id, B, ("x",))]
    assert state.tasks["x"].processing_on == A and not state.tasks["x"].who_has
    out = state.handle(TaskFinished(sid(), A, "x", 8))
    assert list(state.tasks["x"].who_has) == [A]
    assert frees(out, A) == [] and frees(out, B) == []
    # A late second finish from B is still not a copy: freed again.
    assert frees(state.handle(TaskFinished(sid(), B, "x", 8)), B) == ["x"]
    assert list(state.tasks["x"].who_has) == [A]
    check_invariants(state)


def test_seed_2_a_worker_missing_an_input_it_was_said_to_hold_stops_counting_as_holder():
    """Seed 2: the scheduler believed A held x, so it sent x's dependent to A again and
    again (a livelock); A's missing-input report now removes A as a holder."""
    state = scheduler(A, B)
    submit(state, "x")
    state.handle(TaskStarted(sid(), A, "x"))
    state.handle(TaskFinished(sid(), A, "x", 8))
    submit(state, "y", "x")
    assert state.tasks["y"].processing_on == A  # where its input is
    out = state.handle(ReplicaMissing(sid(), A, "x", (), "y"))
    assert A not in state.tasks["x"].who_has
    assert state.tasks["x"].state is not TaskState.MEMORY  # recomputed, not fetched from A
    assert not [m for m in out if isinstance(m, ComputeTask) and m.key == "y"]
    check_invariants(state)


def test_seed_2_run_passes():
    """Seed 2's whole run (reset, crashes, polite restarts of one worker, poison) passes."""
    assert_clean(run_pinned(2))


# ------------------------------------------------------------ seed 21 --


def test_seed_21_a_released_run_serves_the_local_task_that_needs_its_value():
    """Seed 21: a task released while running here became the input of a new task here;
    its result was dropped and the new task waited for it forever."""
    worker = WorkerState(ME, nthreads=2)
    worker.handle(compute("d"))
    worker.handle(FreeRequested(sid(), ("d",)))
    assert worker.tasks["d"].state is WorkerTaskState.CANCELLED
    worker.handle(compute("t", {"d": (PEER,)}))  # d's value is said to be on PEER
    out = worker.handle(ExecutionSucceeded(sid(), "d", 8))
    assert [i.key for i in out if isinstance(i, Execute)] == ["t"]
    assert not [i for i in out if isinstance(i, (SendTaskFinished, SendReplicaAdded))]
    assert "d" not in worker.memory()  # kept for t only, not offered to anyone
    check_worker_invariants(worker)
    out = worker.handle(ExecutionSucceeded(sid(), "t", 8))
    assert DropData(out[0].stimulus_id, ("d",)) in out
    check_worker_invariants(worker)


def test_seed_21_a_released_run_that_fails_is_fetched_instead():
    """Seed 21, the other way: if the released run fails, the local task's input is
    fetched from the holders the scheduler named."""
    worker = WorkerState(ME, nthreads=2)
    worker.handle(compute("d"))
    worker.handle(FreeRequested(sid(), ("d",)))
    worker.handle(compute("t", {"d": (PEER,)}))
    out = worker.handle(ExecutionFailed(sid(), "d", UserError(None, "ValueError", "no", "tb")))
    assert [(i.peer, i.keys) for i in out if isinstance(i, Gather)] == [(PEER, ("d",))]
    check_worker_invariants(worker)


# --------------------------------------------------------- seeds 5, 56 --


def test_seeds_5_and_56_a_worker_reports_dropping_a_value_it_may_still_be_counted_for():
    """Seeds 5 and 56: a FreeKeys crossed the worker's report of the same value, so the
    scheduler counted a copy the worker then dropped. The worker now says it dropped it."""
    worker = WorkerState(ME, nthreads=1)
    worker.handle(compute("z", {"a": (PEER,)}))
    worker.handle(GatherSucceeded(sid(), PEER, {"a": 8}))
    out = worker.handle(FreeRequested(sid(), ("a",)))  # z still runs: a is kept for it
    assert out == [SendDataDropped(out[0].stimulus_id, ("a",))]
    assert "a" not in worker.memory()
    # And the scheduler, hearing it, stops counting that copy.
    state = scheduler(ME, PEER)
    submit(state, "a")
    state.handle(TaskStarted(sid(), ME, "a"))
    state.handle(TaskFinished(sid(), ME, "a", 8))
    state.handle(ReplicaAdded(sid(), PEER, "a", 8))
    state.handle(DataDropped(sid(), PEER, ("a",)))
    assert list(state.tasks["a"].who_has) == [ME]
    check_invariants(state)


def test_seed_5_a_copy_fetched_by_the_worker_now_assigned_the_task_is_not_freed():
    """Seed 5: a value fetched by a worker just as the task was assigned to it was freed
    by the scheduler while its TaskFinished was on the way (then counted)."""
    state = scheduler(A)
    submit(state, "x")
    assert state.tasks["x"].processing_on == A
    out = state.handle(ReplicaAdded(sid(), A, "x", 8))  # fetched before the assignment arrived
    assert frees(out, A) == []
    state.handle(TaskFinished(sid(), A, "x", 8))
    assert list(state.tasks["x"].who_has) == [A]
    check_invariants(state)


def test_seed_5_a_freed_value_in_flight_is_not_offered_when_it_lands():
    """Seed 5: a value freed while being fetched for local work was reported as a copy
    when it landed, then dropped after that work."""
    worker = WorkerState(ME, nthreads=1)
    worker.handle(compute("z", {"a": (PEER,)}))
    worker.handle(FreeRequested(sid(), ("a",)))  # in flight, needed by z: kept, freed
    out = worker.handle(GatherSucceeded(sid(), PEER, {"a": 8}))
    assert not [i for i in out if isinstance(i, SendReplicaAdded)]
    check_worker_invariants(worker)


@pytest.mark.parametrize("seed", [5, 56])
def test_seeds_5_and_56_runs_pass(seed):
    """The whole runs of seeds 5 and 56 (partitions, crashes, a hang) pass every oracle."""
    assert_clean(run_pinned(seed))


# ----------------------------------------------------------- seed 163 --


def test_seed_163_a_task_killed_with_its_input_holder_is_killed_worker():
    """Seed 163: the poison task died with the only worker holding its scattered input;
    the input's LostData overwrote its KilledWorker (breaking INV-KILLED)."""
    state = SchedulerState(allowed_failures=1, worker_saturation=1.0)
    state.handle(WorkerConnected(sid(), A, 1))
    state.handle(DataScattered(sid(), "c1", {"data-0": (8, (A,))}))
    submit(state, "m", "data-0")
    state.handle(TaskStarted(sid(), A, "m"))
    state.handle(WorkerDisconnected(sid(), A))
    assert state.tasks["data-0"].state is TaskState.LOST
    assert state.tasks["m"].failure == WorkerDeaths("m", 1, A)
    check_invariants(state)


def test_seed_163_run_passes():
    """Seed 163's whole run (a reset, a partition, a crash, two hangs, poison) passes.

    (With the typed protocol's message sizes the run's timing differs and its
    poison task now meets LostData for its lost input first; the bug the seed
    found is pinned by the core test above.)
    """
    report = run_pinned(163)
    assert_clean(report)
    assert report.outcomes.get("value", 0) > 0


# ----------------------------------------------------------- seed 314 --


def test_seed_314_a_doomed_task_nobody_wants_ends_erred_not_released():
    """Seed 314: after a scheduler restart the client resubmitted lineage it no longer
    wanted; when a failure swept through it, a task doomed to ERRED was released
    instead, keeping its failure outside ERRED (INV-FAILED)."""
    state = scheduler(A)
    specs = (
        TaskSpec("x", "run-x"),
        TaskSpec("p", "run-p", ("x",)),
        TaskSpec("m", "run-m", ("x",)),
        TaskSpec("q", "run-q", ("m",)),
        TaskSpec("r", "run-r", ("p", "q")),
    )
    state.handle(TasksSubmitted(sid(), "c1", specs, ("r",)))  # only r is wanted
    state.handle(TaskStarted(sid(), A, "x"))
    state.handle(TaskErred(sid(), A, "x", UserError(None, "ValueError", "boom", "tb")))
    assert {k: t.state for k, t in state.tasks.items()} == dict.fromkeys("xpmqr", TaskState.ERRED)
    check_invariants(state)


def test_seed_314_run_passes():
    """Seed 314's whole run (the scheduler restarts, then three crashes and a restart) passes."""
    assert_clean(run_pinned(314))


# --------------------------------------------- seed 121: a bug in the client --


def test_seed_121_every_future_completes():
    """Seed 121 (and, before results could ride inline, 21, 124, 147, 148, 214, 259,
    272, 295): a future stayed 'lost' at the client while the scheduler held its value.
    AsyncClient._refresh_holders applied a stale who_has answer: a key_finished handled
    right behind the reply was undone by state.lose(). Answers now apply only to
    futures that did not change since the question was asked."""
    report = run_pinned(121, LabSettings(liveness_bound=15.0))
    assert_clean(report)


# ------------------------ seeds 463 and 474: small values the client has --


@pytest.mark.parametrize("seed", [463, 474])
def test_seeds_463_and_474_a_value_the_client_has_is_not_dropped(seed):
    """Seeds 463 and 474, found when small values stopped being recomputed for
    clients that have them: a gather whose fetch had failed asked who holds
    the key, and the answer "nobody" (right: the client has the value) made
    the client drop the value that had arrived meanwhile and wait for a
    report that would never come. AsyncClient._refresh_holders now keeps a
    value that arrived while it asked."""
    assert_clean(run_pinned(seed))


# ------------------------------- seed 805: a ready task left waiting --


def test_seed_805_a_ready_task_is_not_left_waiting():
    """Seed 805 (found by the 1,000-seed sweep of the default mix, issue 19):
    a worker's death made map-116 recompute (its inputs all there: "->
    processing" recommended), then, in the same step, a dependent's
    KilledWorker made it unneeded ("-> released" replaced the
    recommendation), then another dependent needed it again: the release
    was dropped as stale, and the task waited for ever with nothing to wait
    on (INV-WAITING; two futures never final). `TaskTransitions.run` now recommends
    again the move a stale release may have replaced."""
    assert_clean(run_pinned(805))


def test_a_stale_release_does_not_place_a_task_whose_input_is_gone():
    """The other half of seed 805's fix, found by a differential fuzzer over
    random event sequences (the mutant `_recommend_due_move::not#1` of
    tests/mutation, which no seed reached). A's death loses k0 and k1 (k0
    -> k1 -> k2 -> k7, all computed on A); k1 is recommended to wait (k8,
    running on A, needs it), then released as k8 dies for good
    (KilledWorker), then needed again by k2, which the client's k7 needs.
    The stale release recommends k1's due move again: it waits for k0,
    which is being recomputed; it is not placed without its input."""
    state = SchedulerState(allowed_failures=1, worker_saturation=1.0)
    state.handle(WorkerConnected(sid(), A, 1))
    state.handle(WorkerConnected(sid(), B, 1))
    graph = {"k0": (), "k1": ("k0",), "k2": ("k1",), "k3": ("k0",), "k4": ("k3",), "k6": (), "k7": ("k2",),
             "k8": ("k1", "k3", "k4", "k6")}
    specs = tuple(TaskSpec(key, f"run-{key}", deps) for key, deps in graph.items())
    state.handle(TasksSubmitted(sid(), "c1", specs, ("k0", "k6", "k7", "k8")))
    for key, where in [("k0", A), ("k1", A), ("k6", B), ("k2", A), ("k7", A), ("k3", A), ("k4", A)]:
        assert state.tasks[key].processing_on == where, key
        state.handle(TaskFinished(sid(), where, key, 8))
    state.handle(TaskStarted(sid(), A, "k8"))
    ev = WorkerDisconnected(sid(), A)
    out = state.handle(ev)
    assert out == [
        ReportLost(ev.stimulus_id, "c1", "k0"),
        ReportLost(ev.stimulus_id, "c1", "k7"),
        ReportErred(ev.stimulus_id, "c1", "k8", WorkerDeaths("k8", 1, A), "k8"),
        ComputeTask(ev.stimulus_id, B, "k0", "run-k0", (0, 1), {}, {}),
    ]
    states = {key: state.tasks[key].state.value for key in ("k0", "k1", "k2", "k7")}
    assert states == {"k0": "processing", "k1": "waiting", "k2": "waiting", "k7": "waiting"}
    assert dict(state.tasks["k1"].waiting_on) == {"k0": None}
    check_invariants(state)


# ------------- seed 23: scattered data lost while a copy was on its way --


def test_seed_23_scattered_data_is_not_lost_while_a_copy_is_on_its_way():
    """Seed 23 (found by the 1,000-seed sweep of the default mix): data-0, scattered
    with 2 copies wanted, lost one holder after another; with worker-0 its only
    holder, a copy was asked of worker-2. worker-0 left (a restart) 1 ms before
    worker-2's ReplicaAdded arrived: the core declared data-0 lost (LostData to
    the client and ~25 dependents), then freed worker-2's copy. It now waits,
    released, for the copy on its way (`_await_copy`), which brings it back."""
    state = scheduler(A, B, ME)
    state.handle(DataScattered(sid(), "c1", {"data-0": (8, (A, B))}))
    state.handle(ReplicationRequested(sid(), "c1", ("data-0",), 2))
    submit(state, "map-0", "data-0")
    out = state.handle(WorkerDisconnected(sid(), B))
    assert [m for m in out if isinstance(m, AcquireReplicas)] == [
        AcquireReplicas(out[0].stimulus_id, ME, {"data-0": (A,)}, {"data-0": 8})
    ]
    out = state.handle(WorkerDisconnected(sid(), A))
    assert not [m for m in out if isinstance(m, ReportErred)]  # no LostData
    assert state.tasks["data-0"].state is TaskState.RELEASED
    check_invariants(state)
    out = state.handle(ReplicaAdded(sid(), ME, "data-0", 8))
    assert frees(out, ME) == []  # the copy is the data now, not freed
    assert ReportFinished(out[0].stimulus_id, "c1", "data-0", (ME,), False) in out
    assert state.tasks["data-0"].state is TaskState.MEMORY
    assert state.tasks["map-0"].processing_on == ME
    check_invariants(state)


def test_seed_23_run_passes():
    """Seed 23's whole run (four crashes and a restart, scattered data replicated) passes."""
    assert_clean(run_pinned(23))


# ---- seeds 75 and 439 (hang mix): a holder that did not answer was dropped --


def test_seed_75_a_holder_that_did_not_answer_is_not_named_missing():
    """Seed 75 of `--mix hang=1`, worker side: worker-1 (ME here) fetched
    data-2 for tree-047 from worker-0 (A), hung, and worker-3 (PEER), gone:
    neither answered. It reported data-2 missing naming both, and the
    scheduler took that as proof that neither held it. It now names only the
    holders that answered without the value: here none."""
    worker = WorkerState(ME, nthreads=1)
    worker.handle(compute("tree-047", {"data-2": (A, PEER)}))
    worker.handle(GatherFailed(sid(), A, ("data-2",)))  # hung: no answer
    out = worker.handle(GatherFailed(sid(), PEER, ("data-2",)))  # gone: refused
    assert out == [SendReplicaMissing(out[0].stimulus_id, "data-2", (), "tree-047")]
    assert worker.tasks == {}
    check_worker_invariants(worker)


def test_seed_75_scattered_data_held_by_a_hung_worker_is_not_lost():
    """Seed 75, scheduler side: data-2 (scattered, no lineage) on worker-0 (A)
    and worker-3 (PEER); worker-3 leaves; worker-1 (B) reports it could not
    fetch data-2 for tree-047, naming no holder that answered. worker-0, hung
    but registered, stays a holder: no FreeKeys to it, no LostData, and
    tree-047 is sent again naming worker-0 (which serves it once it thaws,
    or leaves by worker_ttl and then the worker-left path decides)."""
    state = scheduler(A, B, PEER)
    state.handle(DataScattered(sid(), "c1", {"data-2": (8, (A, PEER))}))
    tree = TaskSpec("tree-047", "run-tree-047", ("data-2",), 0, (B,))
    out = state.handle(TasksSubmitted(sid(), "c1", (tree,), ("tree-047",)))
    [first] = [m for m in out if isinstance(m, ComputeTask)]
    assert (first.worker, dict(first.who_has)) == (B, {"data-2": (A, PEER)})
    state.handle(WorkerDisconnected(sid(), PEER))
    out = state.handle(ReplicaMissing(sid(), B, "data-2", (), "tree-047"))
    s = out[0].stimulus_id
    assert out == [
        FreeKeys(s, B, ("tree-047",)),
        ComputeTask(s, B, "tree-047", "run-tree-047", first.priority, {"data-2": (A,)}, {"data-2": 8}),
    ]
    assert state.tasks["data-2"].state is TaskState.MEMORY
    assert list(state.tasks["data-2"].who_has) == [A]
    check_invariants(state)


def test_seed_75_run_passes():
    """Seed 75 of `--mix hang=1` (five hangs): data-2 was declared lost at
    5.461 while worker-0 (registered, hung) held a copy."""
    assert_clean(run_pinned(75))


def test_seed_439_run_passes():
    """Seed 439 of `--mix hang=1` (five hangs): data-1 was declared lost
    while worker-2 (registered, hung) held a copy."""
    assert_clean(run_pinned(439))


def test_seed_356_of_the_restart_mix_leaves_no_record_behind():
    """Seed 356 of `--mix restart=1` (five polite restarts, found by the
    sweep of issue 19): worker-1 connected to worker-2 to fetch tree-014
    1 ms before worker-2 stopped for a restart; the handler of that
    connection was cancelled before it had authenticated, and the stream
    stayed open, so worker-1's fetch waited out its whole connect timeout
    (10 s) and the run ended with tree-014 still in flight (the lab's leak
    check). The door now closes the streams it was given however its
    handler ends (`tests/comm/test_door.py`). Seed 454 showed the same."""
    assert_clean(run_pinned(356))


# ------ seed 78: a server hanging up during authentication ended a client --


def test_seed_78_run_passes():
    """Seed 78 of the default mix (the 1,000-seed sweep of this issue's final
    code): the client's gather connected to worker-3 as it stopped for a
    restart; the worker, now closing the stream of a handler cancelled
    before its connection opened (seed 356's fix), hung up right after its
    authentication answer, and the client's proof, the last send of the
    exchange, raised a raw BrokenResourceError, which ended the client's
    connection pool and the client with it. Every break in the exchange is
    now a CommClosedError (`tests/comm/test_auth.py`)."""
    assert_clean(run_pinned(78))


# -- seeds 789 (reset mix) and 829 (crash mix): a dependent's copy on its way --


def scheduled_on_me(key: str = "data-2"):
    """Scattered `key` held by A only, with dependent k1 on A and k2 stolen
    to ME: ME was sent k2 naming A as the holder of `key`."""
    state = scheduler(A, ME)
    state.handle(DataScattered(sid(), "c1", {key: (8, (A,))}))
    submit(state, "k1", key)
    submit(state, "k2", key)
    state.handle(StealAnswered(sid(), A, "k2", 1, True))
    assert (state.tasks["k1"].processing_on, state.tasks["k2"].processing_on) == (A, ME)
    return state


def test_seeds_789_and_829_scattered_data_awaits_the_copy_a_dependents_worker_fetches():
    """Seeds 789 and 829 (found by the 1,000-seed sweeps of the reset and
    crash mixes): data-2's last holder left 20 ms after worker-1 was sent a
    dependent that needs it; worker-1 had fetched the copy, and its
    ReplicaAdded arrived 3 ms after the core had declared data-2 lost
    (LostData to the client and nine dependents) — the core counted only
    copies it had asked for by replication. A worker sent a dependent is
    fetching a copy too: the data now waits for it, released."""
    state = scheduled_on_me()
    ev = WorkerDisconnected(sid(), A)
    out = state.handle(ev)
    # ME is asked for its copy outright (no holder to fetch from); k1 (on
    # A) and k2 (on ME) wait for it, and ME drops k2 meanwhile.
    assert out == [
        AcquireReplicas(ev.stimulus_id, ME, {"data-2": ()}, {"data-2": 8}),
        FreeKeys(ev.stimulus_id, ME, ("k2",)),
    ]
    assert state.tasks["data-2"].state is TaskState.RELEASED
    assert dict(state.tasks["data-2"].replicas_pending) == {ME: None}
    assert {state.tasks[k].state for k in ("k1", "k2")} == {TaskState.WAITING}
    check_invariants(state)
    ev = ReplicaAdded(sid(), ME, "data-2", 8)
    out = state.handle(ev)
    assert out[0] == ReportFinished(ev.stimulus_id, "c1", "data-2", (ME,), False)
    assert sorted(m.key for m in out if isinstance(m, ComputeTask)) == ["k1", "k2"]
    assert all(m.worker == ME for m in out[1:]) and len(out) == 3, out
    assert state.tasks["data-2"].state is TaskState.MEMORY
    check_invariants(state)


def test_seeds_789_and_829_a_dependents_worker_that_dropped_its_fetch_makes_the_data_lost():
    """The other ending: the worker dropped its fetch (it had not begun, or
    it failed): the data is lost, and its dependents with it."""
    state = scheduled_on_me()
    state.handle(WorkerDisconnected(sid(), A))
    ev = ReplicaMissing(sid(), ME, "data-2", (), None)
    out = state.handle(ev)
    assert state.tasks["data-2"].state is TaskState.LOST
    assert out == [
        ReportErred(ev.stimulus_id, "c1", key, DataLost("data-2"), "data-2") for key in ("data-2", "k1", "k2")
    ]
    check_invariants(state)


def test_seeds_789_and_829_a_worker_dropping_a_fetch_it_had_not_begun_says_so():
    """The worker side: a dependent dropped before its input's fetch began
    ends that fetch, and the scheduler may be counting on it, so the worker
    reports it missing, naming no holder. A fetch already reported hopeless
    is not reported twice."""
    worker = WorkerState(ME, nthreads=1, max_gathers=1)
    worker.handle(compute("t1", {"x": (A,)}))  # x's fetch takes the one slot
    worker.handle(compute("t2", {"y": (A,)}))  # y waits for a slot: FETCH
    assert worker.tasks["y"].state is WorkerTaskState.FETCH
    ev = FreeRequested(sid(), ("t2",))
    out = worker.handle(ev)
    assert out == [SendReplicaMissing(ev.stimulus_id, "y", (), None)]
    assert "y" not in worker.tasks
    check_worker_invariants(worker)


def test_seed_271_a_dependents_worker_with_no_fetch_answers_at_once():
    """Seed 271 of the partition mix (the sweep of this issue's final code):
    the worker counted as fetching data-0 for a dependent had no fetch at
    all (the dependent's earlier run, cancelled, was going there again), so
    nothing ever came: data-0 waited, released, for ever, and 37 futures
    with it. Asked outright with no holder, a worker without the value
    answers ReplicaMissing at once, and the data is lost then."""
    worker = WorkerState(ME, nthreads=1)
    ev = ReplicasRequested(sid(), {"data-0": ()}, {"data-0": 8})
    assert worker.handle(ev) == [SendReplicaMissing(ev.stimulus_id, "data-0", (), None)]
    assert "data-0" not in worker.tasks
    state = scheduled_on_me("data-0")
    state.handle(WorkerDisconnected(sid(), A))
    ev = ReplicaMissing(sid(), ME, "data-0", (), None)
    state.handle(ev)
    assert state.tasks["data-0"].state is TaskState.LOST
    check_invariants(state)


def test_seed_271_run_passes():
    """Seed 271 of `--mix partition=1` (five partitions)."""
    assert_clean(run_pinned(271))


def test_seed_137_of_the_partition_mix_run_passes():
    """Seed 137 of `--mix partition=1`: a worker asked for a copy of scattered
    data (its last holder was cut off) finished the fetch after its own link
    broke. Registering again, its claim was refused (it had neither held nor
    run the key when it left), and the data was declared lost when its other
    holder was cut off next. A worker may now claim what it was told to fetch
    (`SchedulerState.claimable_keys`, tests/core/test_scheduler_queries.py)."""
    assert_clean(run_pinned(137))


def test_seed_789_of_the_reset_mix_run_passes():
    """Seed 789 of `--mix reset=1` (five connection resets within half a second)."""
    assert_clean(run_pinned(789))


def test_seed_829_of_the_crash_mix_run_passes():
    """Seed 829 of `--mix crash=1`."""
    assert_clean(run_pinned(829))


def test_seed_75_a_refetch_from_a_peer_that_did_not_answer_waits():
    """The shell side of the fix: a holder that did not answer stays a holder,
    so the scheduler may send the dependent straight back naming it. A fetch
    from a peer that failed to answer waits until `heartbeat_interval` after
    that failure (a peer refusing at once cannot make a loop that takes no
    time); a fetch from another peer does not wait."""
    import trio
    import trio.testing

    from trioflow.config import Config
    from trioflow.errors import CommClosedError
    from trioflow.worker import Worker

    worker = Worker("sim://scheduler:8786", config=Config(heartbeat_interval=0.5))
    attempts: list[float] = []
    posted: list = []

    class RefusingPool:
        async def call(self, address, message):
            attempts.append(trio.current_time())
            raise CommClosedError(f"{address} refused the connection")

    worker._pool = RefusingPool()
    worker._post = lambda handler, *args: posted.append(args[0])

    async def fetch_twice():
        await worker._gather(Gather("s1", A, ("data-2",)))
        await trio.sleep(0.1)
        await worker._gather(Gather("s2", A, ("data-2",)))  # waits until 0.5 s after the failure
        await worker._gather(Gather("s3", B, ("data-2",)))  # another peer: at once

    trio.run(fetch_twice, clock=trio.testing.MockClock(autojump_threshold=0))
    assert [round(t - attempts[0], 6) for t in attempts] == [0.0, 0.5, 0.5]
    assert [type(ev).__name__ for ev in posted] == ["GatherFailed"] * 3
