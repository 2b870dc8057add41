"""Reports of what a real cluster did: a performance report and a Perfetto trace.

`performance_report` is a context manager around a block of work: when the
block ends it writes one self-contained HTML file (no network, no files
beside it) holding the block's task stream, drawn, with the counters that
moved meanwhile (runs, errors, worker deaths, KilledWorker, LostData,
recomputations, bytes transferred), a table per function and the cluster
events. `write_perfetto_trace` writes a task stream (``Client.
get_task_stream()``) as Chrome trace-event JSON, in the same format as
``trioflow chaos --trace`` writes for simulated runs.

Both read only what the scheduler already records for everyone
(`trioflow.recorder`), through two client requests; they need no extra
package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from trioflow.recorder import COUNTERS
from trioflow.trace_events import chrome_trace
from trioflow.wall_clock import epoch_seconds

__all__ = ["performance_report", "perfetto_trace", "write_perfetto_trace"]

# The row of the scheduler's events in a trace.
SCHEDULER_ROW = "scheduler"


def perfetto_trace(task_stream: Iterable[Mapping[str, Any]], events: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """A task stream (and cluster events) as a Chrome/Perfetto trace-event JSON object.

    One row per worker with a bar ``ran <key>`` per run (``ran <key>
    (erred)`` for one that raised); cluster events (from
    `Client.get_cluster_metrics`) are ticks on a ``scheduler`` row. Times
    are seconds since the first of them, as in the chaos lab's traces.
    """
    runs = list(task_stream)
    events = list(events)
    times = [run["startstops"][0]["start"] for run in runs] + [event["time"] for event in events]
    t0 = min(times, default=0.0)
    items = []
    for run in runs:
        span = run["startstops"][0]
        name = f"ran {run['key']}" + ("" if run.get("status") == "OK" else " (erred)")
        items.append((span["stop"] - t0, run["worker"], name, span["stop"] - span["start"]))
    for event in events:
        items.append((event["time"] - t0, SCHEDULER_ROW, f"{event['kind']}: {event['text']}", None))
    items.sort(key=lambda item: item[0] - (item[3] or 0.0))
    workers = sorted({run["worker"] for run in runs})
    return chrome_trace(items, "trioflow cluster", rows=[SCHEDULER_ROW, *workers] if events else workers)


def write_perfetto_trace(
    task_stream: Iterable[Mapping[str, Any]], path: str | os.PathLike, events: Iterable[Mapping[str, Any]] = ()
) -> None:
    """Write `perfetto_trace` to `path` (open it at https://ui.perfetto.dev)."""
    with open(path, "w", encoding="utf-8") as out:
        json.dump(perfetto_trace(task_stream, events), out)


class performance_report:
    """Write what the cluster did during a block to one self-contained HTML file.

    ::

        with trioflow.Client(...) as client, trioflow.performance_report("report.html"):
            client.gather(client.map(inc, range(1000)))

        async with trioflow.performance_report("report.html", client=async_client):
            ...

    Args:
        filename: where the report goes (written when the block ends, even
            if it raised).
        client: the client to ask: a `trioflow.Client` (by default the one
            opened last) or, with ``async with``, an `AsyncClient` (needed).
        perfetto: also write the block's task stream as a Perfetto trace here.

    The runs are those that overlap the block, by the wall clock; the
    counters are their change over the block.
    """

    def __init__(self, filename: str | os.PathLike = "trioflow-report.html", *, client: Any = None,
                 perfetto: str | os.PathLike | None = None):
        self.filename = filename
        self.perfetto = perfetto
        self._client = client
        self._start = 0.0
        self._before: dict[str, Any] = {}

    # -- blocking code --------------------------------------------------------

    def __enter__(self) -> performance_report:
        from trioflow.sync_client import default_client

        if self._client is None:
            self._client = default_client()
        self._begin(self._client.get_cluster_metrics())
        return self

    def __exit__(self, *exc_info: Any) -> None:
        stop = epoch_seconds()
        after = self._client.get_cluster_metrics(self._before["events_newest"])
        self._write(self._client.get_task_stream(start=self._start), after, stop)

    # -- Trio code ----------------------------------------------------------------

    async def __aenter__(self) -> performance_report:
        if self._client is None:
            raise ValueError("async with performance_report(...) needs client=<an AsyncClient>")
        self._begin(await self._client.get_cluster_metrics())
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        stop = epoch_seconds()
        after = await self._client.get_cluster_metrics(self._before["events_newest"])
        self._write(await self._client.get_task_stream(start=self._start), after, stop)

    # -- both -----------------------------------------------------------------------

    def _begin(self, metrics: dict[str, Any]) -> None:
        self._start = epoch_seconds()
        self._before = {
            "counters": metrics["counters"],
            "events_newest": max((event["seq"] for event in metrics["events"]), default=0),
        }

    def _write(self, runs: list[dict[str, Any]], after: dict[str, Any], stop: float) -> None:
        from trioflow.version import __version__
        from trioflow.dashboard.assets import report_html

        data = report_data(runs, self._before["counters"], after, self._start, stop)
        data["trioflow"] = __version__
        title = f"trioflow performance report: {os.path.basename(os.fspath(self.filename))}"
        data["title"] = title
        with open(self.filename, "w", encoding="utf-8") as out:
            out.write(report_html(title, data))
        if self.perfetto is not None:
            write_perfetto_trace(runs, self.perfetto, after["events"])


def report_data(
    runs: list[dict[str, Any]], counters_before: Mapping[str, float], after: Mapping[str, Any], start: float, stop: float
) -> dict[str, Any]:
    """What a performance report holds (its page draws it; tests read it)."""
    functions: dict[str, dict[str, Any]] = {}
    for run in runs:
        span = run["startstops"][0]
        seconds = span["stop"] - span["start"]
        entry = functions.setdefault(run["name"], {"name": run["name"], "runs": 0, "errors": 0, "seconds": 0.0, "max_s": 0.0})
        entry["runs"] += 1
        entry["errors"] += run["status"] != "OK"
        entry["seconds"] += seconds
        entry["max_s"] = max(entry["max_s"], seconds)
    counters = {name: after["counters"].get(name, 0) - counters_before.get(name, 0) for name in after["counters"]}
    return {
        "start": start,
        "stop": stop,
        "counters": counters,
        "counters_help": COUNTERS,
        "tasks": after["tasks"],
        "workers": after["workers"],
        "functions": sorted(functions.values(), key=lambda f: -f["seconds"]),
        "runs": [
            [run["key"], run["name"], run["worker"], run["startstops"][0]["start"], run["startstops"][0]["stop"],
             run.get("error")]
            for run in runs
        ],
        "events": after["events"],
    }
