"""The recorder (`trioflow.recorder`): fed like the scheduler shell feeds it, read like the dashboard reads it.

Cluster events come from a real `SchedulerState` driven by core events,
so these tests also pin how the recorder reads the core's decisions.
"""

import itertools

import pytest

from trioflow.core import SchedulerState
from trioflow.core.scheduler_events import (
    DataScattered,
    TaskFinished,
    TaskSpec,
    TasksSubmitted,
    TaskStarted,
    WorkerConnected,
    WorkerDisconnected,
)
from trioflow.core.scheduler_invariants import check_invariants
from trioflow.recorder import ClusterRecorder, Histogram, Ring, TransitionLog, error_text, key_name

A, B, C = "tcp://127.0.0.1:1001", "tcp://127.0.0.1:1002", "tcp://127.0.0.1:1003"
_ids = itertools.count()


def stimulus(what: str) -> str:
    return f"{what}-{next(_ids)}"


class Clock:
    """A wall clock that moves only when told."""

    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def watched():
    """A core whose story a recorder watches (invariants checked after)."""
    state = SchedulerState(allowed_failures=3, worker_saturation=1.0)
    recorder = ClusterRecorder(clock=Clock())
    recorder.watch(state)
    yield state, recorder
    check_invariants(state)


def submit(state, *keys, client="c1"):
    state.handle(TasksSubmitted(stimulus("submit"), client, tuple(TaskSpec(k, f"run-{k}") for k in keys), keys))


def leave(state, recorder, worker, *, expected=False, reason="connection closed"):
    """What `Scheduler._left` does: tell the recorder, then the core, under one stimulus."""
    sid = stimulus("worker-left")
    ws = state.workers[worker]
    recorder.worker_left(
        worker, reason, expected=expected, processing=len(ws.processing), held=len(ws.has_what), stimulus_id=sid
    )
    state.handle(WorkerDisconnected(sid, worker, expected=expected))


def events(recorder, after=0):
    return [(kind, text) for _, _, kind, text, _, _ in recorder.events_after(after)]


def test_the_ring_keeps_the_newest_items_by_number():
    """A ring of 3 keeps items 5..7 of 7, finds them by number, and never hands out dropped ones."""
    ring = Ring(3)
    assert ring.newest == 0 and ring.between(0) == []
    for n in range(1, 8):
        ring.append((n, f"item {n}"))
    assert ring.newest == 7 and len(ring) == 3
    assert [item[0] for item in ring.between(0)] == [5, 6, 7]
    assert [item[0] for item in ring.between(5)] == [6, 7]
    assert [item[0] for item in ring.between(4, until=6)] == [5, 6]
    assert ring.between(7) == [] and ring.between(9) == []
    with pytest.raises(ValueError, match="at least one item"):
        Ring(0)


def test_the_histogram_counts_values_into_prometheus_buckets():
    """A value on a bound counts in that bound's bucket (le); the last bucket is +Inf."""
    histogram = Histogram([0.1, 1.0])
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value)
    assert histogram.cumulative() == [(0.1, 2), (1.0, 3), (float("inf"), 4)]
    assert (histogram.count, histogram.sum) == (4, pytest.approx(3.65))


@pytest.mark.parametrize(
    "key, name",
    [
        ("inc-9f2c1d0e4b5a69788796a5b4c3d2e1f0", "inc"),
        ("slow_inc-deadbeefcafe1234", "slow_inc"),
        ("('sum-ab12cd34ef', 3)", "sum"),
        ("load-csv-0123456789abcdef", "load-csv"),
        ("int-0123456789abcdef0123456789abcdef", "int"),
        ("0123456789abcdef0123456789abcdef", "data"),
        ("x", "x"),
    ],
)
def test_key_name_is_the_function_part_of_a_key(key, name):
    """Runs are coloured and grouped by the function part of their key, as dask's key_split does."""
    assert key_name(key) == name


def test_runs_are_kept_with_their_worker_times_and_outcome():
    """A finished and an erred run land in the stream, the counters and the duration histogram."""
    recorder = ClusterRecorder(clock=Clock())
    recorder.task_ran(A, "inc-1", 100.0, 100.25, nbytes=28)
    recorder.task_ran(B, "boom-1", 101.0, 101.5, error=error_text("ZeroDivisionError", "division by zero"))
    recorder.task_ran(A, "old-peer", None, None, nbytes=1)  # a peer that sends no times
    runs = recorder.runs.between(0)
    assert runs[:2] == [
        (1, "inc-1", A, 100.0, 100.25, 28, None),
        (2, "boom-1", B, 101.0, 101.5, None, "ZeroDivisionError: division by zero"),
    ]
    assert runs[2][3] == runs[2][4] == recorder.clock()
    counters = recorder.counters()
    assert (counters["runs_ok"], counters["runs_erred"], counters["result_bytes"]) == (2, 1, 29)
    assert counters["task_duration_seconds_count"] == 3
    assert counters["task_duration_seconds_sum"] == pytest.approx(0.75)


def test_an_exception_text_is_clipped():
    """A run keeps at most 200 characters of its exception."""
    assert len(error_text("ValueError", "x" * 10_000)) == 200
    assert error_text("KeyError", "") == "KeyError"


def test_a_page_of_runs_keeps_to_its_window_count_and_size():
    """runs_page: a time window, the newest `count`, and pages of `max_runs` that continue after `until`."""
    recorder = ClusterRecorder(clock=Clock())
    for n in range(10):
        recorder.task_ran(A, f"k{n}", 100.0 + n, 100.5 + n)
    page, until, more = recorder.runs_page(start=103.0, stop=105.2, max_runs=100, max_bytes=1 << 20)
    assert [r[1] for r in page] == ["k3", "k4", "k5"] and until == 10 and not more
    page, _, _ = recorder.runs_page(count=2, max_runs=100, max_bytes=1 << 20)
    assert [r[1] for r in page] == ["k8", "k9"]
    assert recorder.runs_page(count=0, max_runs=100, max_bytes=1 << 20)[0] == []
    # Pages of 4, and a run that arrives meanwhile is not mixed in.
    page, until, more = recorder.runs_page(max_runs=4, max_bytes=1 << 20)
    assert [r[0] for r in page] == [1, 2, 3, 4] and until == 10 and more
    recorder.task_ran(A, "late", 200.0, 201.0)
    seen = [r[0] for r in page]
    while more:
        page, until, more = recorder.runs_page(after=page[-1][0], until=until, max_runs=4, max_bytes=1 << 20)
        seen += [r[0] for r in page]
    assert seen == list(range(1, 11))
    # The byte budget ends a page early (but never before its first run).
    page, _, more = recorder.runs_page(max_runs=100, max_bytes=1)
    assert len(page) == 1 and more


def test_the_transition_log_is_still_the_core_story(watched):
    """Watching the core does not change its story: every transition is still recorded."""
    state, recorder = watched
    assert isinstance(state.story, TransitionLog)
    state.handle(WorkerConnected(stimulus("join"), A, 1))
    submit(state, "x")
    # (A root task passes through the queue, so that tasks made ready
    # together go out best priority first.)
    assert [entry[:3] for entry in state.story] == [
        ("x", "released", "waiting"),
        ("x", "waiting", "queued"),
        ("x", "queued", "processing"),
    ]


def test_a_worker_death_is_an_event_with_its_reason_and_its_rescheduled_runs(watched):
    """A death is written with its reason, then one summary of the runs it sent elsewhere."""
    state, recorder = watched
    recorder.worker_joined(A, 2, 4242)
    state.handle(WorkerConnected(stimulus("join"), A, 2))
    state.handle(WorkerConnected(stimulus("join"), B, 2))
    submit(state, "t1", "t2", "t3", "t4")
    on_a = sorted(state.workers[A].processing)
    leave(state, recorder, A, reason="connection closed (killed)")
    assert events(recorder) == [
        ("worker-joined", f"{A} joined (2 threads, pid 4242)"),
        ("worker-died", f"{A} died: connection closed (killed); it was processing {len(on_a)} tasks and held 0 values"),
        ("rescheduled", f"rescheduled {len(on_a)} runs (their worker left): {', '.join(on_a)}"),
    ]
    counters = recorder.counters()
    assert (counters["worker_deaths"], counters["rescheduled"], counters["workers_joined"]) == (1, len(on_a), 1)
    # The summary is attributed to the worker that left.
    assert recorder.events.between(0)[-1][4] == A


def test_a_worker_leaving_on_purpose_is_not_a_death(watched):
    """A goodbye counts as retired, with its own kind of event."""
    state, recorder = watched
    state.handle(WorkerConnected(stimulus("join"), A, 1))
    leave(state, recorder, A, expected=True)
    assert events(recorder) == [("worker-left", f"{A} left on purpose; it was processing 0 tasks and held 0 values")]
    assert (recorder.counts["workers_retired"], recorder.counts["worker_deaths"]) == (1, 0)


def test_a_task_that_kills_three_workers_is_one_killed_worker_event(watched):
    """The third death of a running task writes KilledWorker with the count and the last worker."""
    state, recorder = watched
    for worker in (A, B, C):
        state.handle(WorkerConnected(stimulus("join"), worker, 1))
    submit(state, "poison")
    for _ in range(3):
        worker = state.tasks["poison"].processing_on
        state.handle(TaskStarted(stimulus("started"), worker, "poison"))
        leave(state, recorder, worker)
        state.handle(WorkerConnected(stimulus("join"), worker, 1))  # its nanny restarts it
    kinds = [kind for kind, _ in events(recorder)]
    assert kinds.count("killed-worker") == 1 and kinds.count("worker-died") == 3
    text = dict(events(recorder))["killed-worker"]
    assert text == f"KilledWorker: poison was running on 3 workers when they died (last {worker}); it will not run again"
    assert recorder.counters()["killed_worker"] == 1


def test_a_lost_value_that_is_still_needed_is_recomputed(watched):
    """A value whose only copy dies with its worker, wanted and not yet fetched, is recomputed."""
    state, recorder = watched
    state.handle(WorkerConnected(stimulus("join"), A, 1))
    state.handle(WorkerConnected(stimulus("join"), B, 1))
    submit(state, "big")
    holder = state.tasks["big"].processing_on
    state.handle(TaskStarted(stimulus("started"), holder, "big"))
    state.handle(TaskFinished(stimulus("finished"), holder, "big", 10_000))
    leave(state, recorder, holder)
    assert ("recomputing", "recomputing 1 value whose last copy was lost: big") in events(recorder)
    assert recorder.counters()["recomputed"] == 1


def test_scattered_data_lost_with_its_last_copy_is_lost_data(watched):
    """Scattered data has no lineage: losing its only holder is LostData, named."""
    state, recorder = watched
    state.handle(WorkerConnected(stimulus("join"), A, 1))
    state.handle(DataScattered(stimulus("scatter"), "c1", {"data-1": (100, (A,))}))
    leave(state, recorder, A, expected=True)
    assert ("lost-data", "LostData: 1 scattered value lost with the last copy: data-1") in events(recorder)
    assert recorder.counters()["lost_data"] == 1


def test_a_user_error_is_not_a_killed_worker(watched):
    """processing -> erred because the function raised is a run with an error, not KilledWorker."""
    from trioflow.core import UserError
    from trioflow.core.scheduler_events import TaskErred

    state, recorder = watched
    state.handle(WorkerConnected(stimulus("join"), A, 1))
    submit(state, "boom")
    state.handle(TaskErred(stimulus("task-erred"), A, "boom", UserError(None, "ValueError", "no", "tb")))
    assert events(recorder) == [] and recorder.counters()["killed_worker"] == 0


def test_a_restart_is_an_event():
    """Client.restart() is written with who asked."""
    recorder = ClusterRecorder(clock=Clock())
    recorder.restarted("client-1")
    assert events(recorder) == [("restart", "the cluster was restarted by client-1: every task was flushed")]
    assert recorder.counters()["restarts"] == 1
