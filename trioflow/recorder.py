"""What the scheduler saw happen, kept for people: task runs, counters, cluster events.

The scheduler shell feeds one `ClusterRecorder`; the dashboard
(`trioflow.dashboard`), its ``/metrics``, `Client.get_task_stream` and
`trioflow.performance_report` read it. It decides nothing, and the core does
not know it exists.

Rules:

* Cheap where it is fed on the hot path: a task's run costs one tuple
  appended to a list and one histogram bucket (about a microsecond). Names,
  texts and JSON are made only when someone asks.
* Bounded: the newest `stream_length` runs and `events_length` events are
  kept, and counters are numbers, so a worker cannot grow it by lying.
* Times are wall-clock seconds since the epoch: runs by the clocks of the
  workers that ran them, events by `clock`. They are for people; nothing
  decides by them (design.md §3 rule 2).

How the recorder hears of recomputations, KilledWorker and lost data
--------------------------------------------------------------------
Those are decisions of the core, taken deep inside one event: a worker's
departure can recompute hundreds of values. The core already writes every
transition to its `story` deque, for debugging. The shell hands the core a
`TransitionLog` in its place: a deque like the one it had, which also
passes the few transitions a person wants to hear of to
`ClusterRecorder.transition`:

=========================  ================================================
transition                 what it means
=========================  ================================================
memory -> waiting          a value's last copy was lost: it is recomputed
memory or released -> lost scattered data lost its last copy (LostData)
processing -> erred        with a `WorkerDeaths` failure: KilledWorker
processing -> waiting      a run was rescheduled (its worker left, a retry)
processing -> processing   a task was stolen (counted, no cluster event:
                           a busy cluster steals often)
=========================  ================================================

So no rule of the core is copied here. The transitions of one event are
summed into one cluster event per kind ("recomputing 37 values: inc-1,
..."), written when a later event begins or when someone reads.
"""

from __future__ import annotations

import collections
import functools
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

import trio

from trioflow.comm import messages as m
from trioflow.core.durations import key_prefix
from trioflow.core.failures import WorkerDeaths

__all__ = [
    "COUNTERS",
    "ClusterRecorder",
    "Histogram",
    "Ring",
    "TransitionLog",
    "key_name",
]

# Upper bounds of the buckets of the task-duration histogram, in seconds.
DURATION_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)
# Upper bounds of the buckets of the event-loop lag histogram, in seconds.
LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# How much of an exception's text a run in the stream keeps.
ERROR_TEXT_CHARS = 200
# Keys an aggregated event names as examples, and how much of each.
EXAMPLE_KEYS = 3
EXAMPLE_KEY_CHARS = 100

# The counters, with what each counts (the help text of /metrics too).
COUNTERS = {
    "runs_ok": "task runs that returned a value",
    "runs_erred": "task runs whose function raised",
    "result_bytes": "bytes of results stored on workers (the workers' size estimates)",
    "transfer_bytes": "bytes of values copied from worker to worker (inputs and replicas)",
    "workers_joined": "workers that registered",
    "worker_deaths": "workers that left without saying goodbye (killed, crashed, or silent past worker_ttl)",
    "workers_retired": "workers that left on purpose",
    "killed_worker": "tasks marked bad for killing allowed_failures workers (KilledWorker)",
    "lost_data": "scattered values lost with their last copy (LostData)",
    "recomputed": "values computed again because their last copy was lost",
    "rescheduled": "runs sent again (their worker left, or a retry)",
    "restarts": "cluster restarts (Client.restart)",
    "steal_requests": "tasks an idle worker asked a busy one to give up (work stealing)",
    "stolen": "tasks moved to another worker by a steal (their first worker had not started them)",
}

# Kinds of the cluster events, as `trioflow.comm.messages.EVENT_KINDS` declares them.
WORKER_JOINED = "worker-joined"
WORKER_LEFT = "worker-left"
WORKER_DIED = "worker-died"
KILLED_WORKER = "killed-worker"
LOST_DATA = "lost-data"
RECOMPUTING = "recomputing"
RESCHEDULED = "rescheduled"
RESTART = "restart"

# (from, to) transitions the recorder hears of, and what each one is.
_WATCHED = {
    ("memory", "waiting"): RECOMPUTING,
    ("memory", "lost"): LOST_DATA,
    ("released", "lost"): LOST_DATA,
    ("processing", "erred"): KILLED_WORKER,  # if the failure is WorkerDeaths
    ("processing", "waiting"): RESCHEDULED,
}
_COUNTER_OF_KIND = {
    RECOMPUTING: "recomputed",
    LOST_DATA: "lost_data",
    KILLED_WORKER: "killed_worker",
    RESCHEDULED: "rescheduled",
}
# What the stimulus of an event says about why runs were rescheduled.
_CAUSES = {
    "worker-left": "their worker left",
    "task-erred": "retries",
    "replica-missing": "an input was missing",
    "client-missing": "a client found a copy missing",
    "data-dropped": "a worker dropped a copy",
}


class Ring:
    """The newest `capacity` items of a sequence numbered from 1.

    Each item is a tuple whose first element is its number. Items are
    appended to a list; once it holds twice the capacity the oldest half is
    dropped in one ``del``, so an append costs O(1) amortised and an item is
    found by its number in O(1) (a deque would take O(n) to slice).
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"a ring holds at least one item, got capacity={capacity}")
        self.capacity = capacity
        self._items: list[tuple] = []
        # The number of `_items[0]`.
        self._base = 1
        # The number of the newest item (0 before the first).
        self.newest = 0

    def append(self, item: tuple) -> None:
        """Add `item`, whose first element must be ``newest + 1``."""
        items = self._items
        items.append(item)
        self.newest += 1
        if len(items) >= 2 * self.capacity:
            drop = len(items) - self.capacity
            del items[:drop]
            self._base += drop

    def between(self, after: int, until: int | None = None) -> list[tuple]:
        """The items kept numbered ``after + 1 .. until`` (default: the newest), oldest first."""
        newest = self.newest
        until = newest if until is None else min(until, newest)
        first = max(after + 1, newest - self.capacity + 1, self._base)
        if until < first:
            return []
        return self._items[first - self._base : until - self._base + 1]

    def __len__(self) -> int:
        return min(len(self._items), self.capacity)


class Histogram:
    """Counts per bucket, a sum and a count: the shape Prometheus histograms have."""

    def __init__(self, bounds: Iterable[float]):
        self.bounds = tuple(bounds)
        # counts[i]: values <= bounds[i] and > bounds[i - 1]; the last: above every bound.
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``[(upper bound, values <= it), ...]``, ending with ``(inf, count)``."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            total += n
            out.append((bound, total))
        return out


class TransitionLog(collections.deque):
    """The core's `story` deque, which also tells a recorder of the transitions it watches.

    `SchedulerState` appends ``(key, from, to, stimulus_id)`` after every
    transition; this is the only method it calls. The check is one set
    look-up per transition; the recorder is called only for the few pairs
    of `_WATCHED`.
    """

    def __init__(self, recorder: ClusterRecorder, maxlen: int | None):
        super().__init__(maxlen=maxlen)
        self._recorder = recorder

    def append(self, entry: tuple[str, str, str, str]) -> None:
        collections.deque.append(self, entry)
        kind = _WATCHED.get((entry[1], entry[2]))
        if kind is not None:
            self._recorder.transition(kind, entry[0], entry[3])
        elif entry[1] == entry[2] == "processing":
            self._recorder.counts["stolen"] += 1


class ClusterRecorder:
    """Task runs, counters and cluster events, fed by the scheduler shell.

    Args:
        clock: wall-clock seconds since the epoch, for the times of events.
        stream_length: how many runs the task stream keeps.
        events_length: how many cluster events are kept.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        stream_length: int = 100_000,
        events_length: int = 1_000,
    ):
        self.clock = clock
        self.created_at = clock()
        # (seq, key, worker, start, stop, nbytes or None, error text or None)
        self.runs = Ring(stream_length)
        # (seq, time, kind, text, worker or None, count)
        self.events = Ring(events_length)
        self.counts: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self.durations = Histogram(DURATION_BUCKETS_S)
        self.loop_lag = Histogram(LAG_BUCKETS_S)
        self.last_loop_lag = 0.0
        # The core whose story this recorder watches (to read a failure).
        self._state: Any = None
        # The summed transitions of the event being applied:
        # kind -> [time, count, example keys]; all under `_stimulus`.
        self._pending: dict[str, list] = {}
        self._stimulus: str | None = None
        # stimulus id -> the worker whose departure it is (for the summaries).
        self._departures: dict[str, str] = {}

    def watch(self, state: Any) -> None:
        """Replace `state.story` (a core's transition deque) by a `TransitionLog` feeding us."""
        log = TransitionLog(self, state.story.maxlen)
        log.extend(state.story)
        state.story = log
        self._state = state

    # ----------------------------------------------------------- feeding --

    def task_ran(
        self,
        worker: str,
        key: str,
        start: float | None,
        stop: float | None,
        nbytes: int | None = None,
        error: str | None = None,
    ) -> None:
        """A worker reported a run (`error`: the exception's text if it raised).

        Without times (a peer that sends none), the run is placed at the
        moment of the report, with no length.
        """
        if start is None or stop is None:
            start = stop = self.clock()
        runs = self.runs
        runs.append((runs.newest + 1, key, worker, start, stop, nbytes, error))
        self.durations.observe(stop - start)
        counts = self.counts
        if error is None:
            counts["runs_ok"] += 1
            counts["result_bytes"] += nbytes or 0
        else:
            counts["runs_erred"] += 1

    def steal_requested(self) -> None:
        """The core asked a worker to give a task up for an idle one."""
        self.counts["steal_requests"] += 1

    def transferred(self, nbytes: int) -> None:
        """A worker holds a copy it fetched from another."""
        self.counts["transfer_bytes"] += nbytes

    def worker_joined(self, address: str, nthreads: int, pid: int | None) -> None:
        self.counts["workers_joined"] += 1
        process = "" if pid is None else f", pid {pid}"
        self._event(WORKER_JOINED, f"{address} joined ({nthreads} threads{process})", address)

    def worker_left(
        self, address: str, reason: str, *, expected: bool, processing: int, held: int, stimulus_id: str
    ) -> None:
        """Called before the core hears of it, so its consequences follow this event."""
        if expected:
            self.counts["workers_retired"] += 1
            kind, text = WORKER_LEFT, f"{address} left on purpose"
        else:
            self.counts["worker_deaths"] += 1
            kind, text = WORKER_DIED, f"{address} died: {reason}"
        text += f"; it was processing {processing} tasks and held {held} values"
        self._event(kind, text, address)
        # Only the latest departure can still have transitions to sum:
        # `_event` has just written those of any earlier one.
        self._departures = {stimulus_id: address}

    def restarted(self, client: str) -> None:
        self.counts["restarts"] += 1
        self._event(RESTART, f"the cluster was restarted by {client}: every task was flushed", None)

    def transition(self, kind: str, key: str, stimulus_id: str) -> None:
        """One watched transition of the core (through `TransitionLog`)."""
        detail = ""
        if kind == KILLED_WORKER:
            ts = self._state.tasks.get(key) if self._state is not None else None
            if ts is None or not isinstance(ts.failure, WorkerDeaths) or ts.failure_origin != key:
                return  # a user error (or a dependent of one): not a KilledWorker
            detail = (
                f" was running on {ts.failure.deaths} workers when they died"
                f" (last {ts.failure.last_worker}); it will not run again"
            )
        if stimulus_id != self._stimulus:
            self._flush()
            self._stimulus = stimulus_id
        self.counts[_COUNTER_OF_KIND[kind]] += 1
        entry = self._pending.get(kind)
        if entry is None:
            entry = self._pending[kind] = [self.clock(), 0, [], detail]
        entry[1] += 1
        if len(entry[2]) < EXAMPLE_KEYS:
            entry[2].append(key if len(key) <= EXAMPLE_KEY_CHARS else key[:EXAMPLE_KEY_CHARS] + "...")

    def note_loop_lag(self, lag: float) -> None:
        """How late the event loop woke at one tick of its monitor
        (`trioflow.comm.liveness.LoopLag.watch`): how long anything that
        becomes ready (a heartbeat to answer, a message to route) waits for
        its turn."""
        self.last_loop_lag = lag
        self.loop_lag.observe(lag)

    # ----------------------------------------------------------- reading --

    def counters(self) -> dict[str, float]:
        """Every counter, plus the sums and counts of the two histograms."""
        self._flush()
        out = dict(self.counts)
        out["task_duration_seconds_sum"] = self.durations.sum
        out["task_duration_seconds_count"] = self.durations.count
        out["event_loop_lag_seconds_sum"] = self.loop_lag.sum
        out["event_loop_lag_seconds_count"] = self.loop_lag.count
        out["event_loop_lag_last_seconds"] = self.last_loop_lag
        return out

    def events_after(self, after: int) -> list[tuple]:
        """The cluster events numbered after `after`, oldest first."""
        self._flush()
        return self.events.between(after)

    def runs_page(
        self,
        *,
        after: int = 0,
        until: int | None = None,
        start: float | None = None,
        stop: float | None = None,
        count: int | None = None,
        max_runs: int,
        max_bytes: int,
    ) -> tuple[list[tuple], int, bool]:
        """One page of the task stream: ``(runs, until, more)``.

        Runs numbered ``after + 1 .. until`` (`until` defaults to the newest
        and is returned so later pages keep to it) that overlap the window
        ``start .. stop``; with `count`, only the newest `count` of those.
        A page ends after `max_runs` runs or about `max_bytes` of encoded
        runs, whichever comes first; `more` says whether runs are left.
        """
        until = self.runs.newest if until is None else min(until, self.runs.newest)
        runs = self.runs.between(after, until)
        if start is not None or stop is not None:
            low = -math.inf if start is None else start
            high = math.inf if stop is None else stop
            runs = [r for r in runs if r[4] >= low and r[3] <= high]
        if count is not None:
            runs = runs[len(runs) - count :] if count else []
        page: list[tuple] = []
        size = 0
        for run in runs:
            # msgpack of one TaskRun: field names and numbers (~90 bytes) plus its strings.
            size += 90 + len(run[1]) + len(run[2]) + len(run[6] or "")
            if page and (len(page) >= max_runs or size > max_bytes):
                return page, until, True
            page.append(run)
        return page, until, False

    # ---------------------------------------------------------- internal --

    def _event(self, kind: str, text: str, worker: str | None, count: int = 1, at: float | None = None) -> None:
        self._flush()
        events = self.events
        events.append((events.newest + 1, self.clock() if at is None else at, kind, text, worker, count))

    def _flush(self) -> None:
        """Write the summed transitions of the last event as cluster events."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        stimulus, self._stimulus = self._stimulus or "", None
        worker = self._departures.pop(stimulus, None)
        prefix = stimulus.rsplit("-", 1)[0]
        cause = _CAUSES.get(prefix, prefix)
        for kind, (at, n, examples, detail) in pending.items():
            self._write_summary(kind, n, examples, detail, cause, worker, at)

    def _write_summary(
        self, kind: str, n: int, examples: list[str], detail: str, cause: str, worker: str | None, at: float
    ) -> None:
        keys = ", ".join(examples) + (", ..." if n > len(examples) else "")
        if kind == KILLED_WORKER and n == 1:
            text = f"KilledWorker: {examples[0]}{detail}"
        elif kind == KILLED_WORKER:
            text = f"KilledWorker: {n} tasks killed their workers too often: {keys}"
        elif kind == LOST_DATA:
            text = f"LostData: {n} scattered value{'s' * (n != 1)} lost with the last copy: {keys}"
        elif kind == RECOMPUTING:
            text = f"recomputing {n} value{'s' * (n != 1)} whose last copy was lost: {keys}"
        else:
            text = f"rescheduled {n} run{'s' * (n != 1)} ({cause}): {keys}"
        events = self.events
        events.append((events.newest + 1, at, kind, text, worker, n))


def error_text(type_name: str, message: str) -> str:
    """What the task stream keeps of an exception: ``ZeroDivisionError: division by zero``, clipped."""
    text = f"{type_name}: {message}" if message else type_name
    return text if len(text) <= ERROR_TEXT_CHARS else text[: ERROR_TEXT_CHARS - 3] + "..."


def run_record(run: tuple) -> m.TaskRun:
    """A run of the ring as it travels in a `get_task_stream` reply."""
    seq, key, worker, start, stop, nbytes, error = run
    return m.TaskRun(
        seq=seq, key=key, worker=worker, start=start, stop=stop,
        status="OK" if error is None else "error", nbytes=nbytes, error=error,
    )


def event_record(event: tuple) -> m.ClusterEvent:
    """A cluster event of the ring as it travels in a `get_cluster_metrics` reply."""
    seq, at, kind, text, worker, count = event
    return m.ClusterEvent(seq=seq, time=at, kind=kind, text=text[: m.MAX_REASON_CHARS], worker=worker, count=count)


@functools.lru_cache(maxsize=4096)
def key_name(key: str) -> str:
    """The function part of a key: ``inc-9f2c...`` -> ``inc``, ``('sum-ab12', 3)`` -> ``sum``.

    The task stream colours runs by it and the reports group by it, as
    dask's ``key_split`` does; the scheduler core's duration estimates group
    keys the same way (`key_prefix`), so the rule is written once, there.
    """
    return key_prefix(key)
