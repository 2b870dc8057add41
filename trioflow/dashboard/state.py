"""The dashboard's view of the cluster: one JSON-ready dict per poll of the page.

The page polls ``/api/state?runs_after=N&events_after=M`` and gets the
whole picture (workers, tasks by state, counters) plus only the task runs
and cluster events it has not seen yet, so a poll costs the same after an
hour as after a minute. Everything here reads the scheduler shell and its
`ClusterRecorder` in the scheduler's own Trio thread, between two steps of
its driver: no lock, and a consistent picture.

Cost: counting tasks by state walks every task record (about 10 ms for
100,000 tasks); the rest is proportional to the workers and to what is new.
"""

from __future__ import annotations

import math
from typing import Any

import trio

from trioflow.recorder import key_name

# Runs one poll returns at most; a page that fell further behind skips to the newest.
MAX_RUNS_PER_POLL = 5_000
# The order tasks by state are listed in (the order of a task's life).
TASK_STATES = ("released", "waiting", "queued", "no-worker", "processing", "memory", "erred", "lost")


def cluster_state(scheduler: Any, *, runs_after: int = 0, events_after: int = 0) -> dict[str, Any]:
    """What the page shows, for runs and events numbered after the given ones.

    Args:
        scheduler: a serving `trioflow.Scheduler`.
        runs_after: the last run number the page has.
        events_after: the last cluster event number the page has.
    """
    recorder = scheduler.recorder
    now = trio.current_time()
    workers = []
    for address, ws in scheduler.state.workers.items():
        link = scheduler.workers.get(address)
        metrics = link.last_heartbeat if link is not None else {}
        workers.append(
            {
                "address": address,
                "pid": None if link is None else link.pid,
                "nthreads": ws.nthreads,
                "processing": len(ws.processing),
                "executing": _number(metrics.get("executing")),
                "keys": len(ws.has_what),
                "memory": _number(metrics.get("memory")),
                # Only a worker with a memory limit spills and pauses
                # (trioflow/memory.py); the others report neither.
                "spilled": _number(metrics.get("spilled_bytes")),
                "paused": bool(ws.paused),
                "heartbeat_age": None if link is None else _age(now, link.last_heartbeat_at),
                "seen_age": None if link is None else _age(now, link.conn.last_received),
                "nanny": link is not None and bool(link.nanny),
            }
        )
    counts = scheduler.state.count_by_state()
    newest_run = recorder.runs.newest
    runs = [
        [seq, key, key_name(key), worker, start, stop, error]
        for seq, key, worker, start, stop, _, error in recorder.runs.between(
            max(runs_after, newest_run - MAX_RUNS_PER_POLL)
        )
    ]
    events = [
        {"seq": seq, "time": at, "kind": kind, "text": text, "worker": worker, "count": count}
        for seq, at, kind, text, worker, count in recorder.events_after(events_after)
    ]
    return {
        "now": recorder.clock(),
        "scheduler": {
            "address": scheduler.address,
            "uptime": recorder.clock() - recorder.created_at,
            "clients": len(scheduler.clients),
            "loop_lag": recorder.last_loop_lag,
        },
        "workers": workers,
        "tasks": {state: counts.get(state, 0) for state in TASK_STATES},
        "counters": recorder.counters(),
        "runs": runs,
        "runs_newest": newest_run,
        "events": events,
        "events_newest": recorder.events.newest,
    }


def _age(now: float, then: float) -> float | None:
    """Seconds since `then` (None: never)."""
    return None if not math.isfinite(then) else max(0.0, now - then)


def _number(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None
