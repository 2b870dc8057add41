"""Chrome/Perfetto trace-event JSON: a timeline of rows holding bars and ticks.

Both kinds of trace trioflow writes use it, so both open the same way in
https://ui.perfetto.dev or chrome://tracing: the chaos lab's traces of
simulated runs (`trioflow.sim.trace`, ``trioflow chaos --trace``) and the
task streams of real clusters (`trioflow.reports.write_perfetto_trace`).
Each row (a Chrome "thread") is a node: a worker, the scheduler, the
network; a bar is something that lasted (a task's run, a fault), a tick
something that happened.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# One event: (time in seconds, row, name, duration in seconds or None for a
# tick). A bar ends at `time`.
TraceEvent = tuple[float, str, str, "float | None"]


def chrome_trace(events: Iterable[TraceEvent], process_name: str, rows: Iterable[str] = ()) -> dict[str, Any]:
    """The events as a Chrome trace-event JSON object.

    Args:
        events: what to draw, in any order.
        process_name: the title of the timeline.
        rows: rows to list first, in this order; the others follow in the
            order their first event comes.
    """
    tids: dict[str, int] = {}
    for row in rows:
        tids.setdefault(row, len(tids) + 1)
    out: list[dict[str, Any]] = []
    for t, node, name, duration in events:
        tid = tids.setdefault(node, len(tids) + 1)
        if duration is None:
            out.append({"name": name, "ph": "i", "s": "t", "ts": round(t * 1e6, 3), "pid": 1, "tid": tid})
        else:
            out.append(
                {
                    "name": name,
                    "ph": "X",
                    "ts": round((t - duration) * 1e6, 3),
                    "dur": round(duration * 1e6, 3),
                    "pid": 1,
                    "tid": tid,
                }
            )
    metadata = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": process_name}}]
    for node, tid in tids.items():
        metadata.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": node}})
        metadata.append({"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": tid, "args": {"sort_index": tid}})
    return {"traceEvents": metadata + out, "displayTimeUnit": "ms"}
