"""``/metrics``: the cluster in Prometheus's text format, through prometheus-client.

The numbers live in the scheduler's `ClusterRecorder` as plain Python
numbers (cheap to bump on the hot path); `SchedulerCollector` turns them
into metric families only when Prometheus scrapes, in the scheduler's
thread. prometheus-client is imported there, lazily: it is an optional
extra, and ``import trioflow`` must work without it.

========================================  =========  ==================================
metric                                    type       what
========================================  =========  ==================================
trioflow_tasks{state}                     gauge      tasks the scheduler knows, by state
trioflow_workers                          gauge      workers registered
trioflow_worker_threads                   gauge      their threads
trioflow_worker_processing_tasks{worker}  gauge      tasks assigned to each worker
trioflow_worker_memory_bytes{worker}      gauge      each worker's resident memory
trioflow_clients                          gauge      clients connected
trioflow_task_runs_total{status}          counter    runs reported, ``ok`` or ``error``
trioflow_task_duration_seconds            histogram  how long runs took (workers' clocks)
trioflow_result_bytes_total               counter    bytes of results stored on workers
trioflow_transfer_bytes_total             counter    bytes copied from worker to worker
trioflow_workers_joined_total             counter    workers that registered
trioflow_worker_deaths_total              counter    workers that left without a goodbye
trioflow_workers_retired_total            counter    workers that left on purpose
trioflow_killed_worker_total              counter    tasks marked bad (KilledWorker)
trioflow_lost_data_total                  counter    scattered values lost (LostData)
trioflow_recomputations_total             counter    values recomputed after a loss
trioflow_rescheduled_runs_total           counter    runs sent again (worker left, retry)
trioflow_restarts_total                   counter    cluster restarts
trioflow_steal_requests_total             counter    tasks asked of a busy worker for an idle one
trioflow_stolen_total                     counter    tasks moved by a steal
trioflow_worker_spilled_bytes{worker}     gauge      bytes of values each worker holds on disk
trioflow_event_loop_lag_seconds           histogram  how late the scheduler's loop woke
trioflow_event_loop_last_lag_seconds      gauge      the latest of those measurements
========================================  =========  ==================================
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from trioflow.dashboard.state import TASK_STATES
from trioflow.recorder import COUNTERS, Histogram

# Recorder counter -> the Prometheus counter it becomes (runs_ok and
# runs_erred become one family with a status label).
PROMETHEUS_COUNTERS = {
    "result_bytes": "trioflow_result_bytes",
    "transfer_bytes": "trioflow_transfer_bytes",
    "workers_joined": "trioflow_workers_joined",
    "worker_deaths": "trioflow_worker_deaths",
    "workers_retired": "trioflow_workers_retired",
    "killed_worker": "trioflow_killed_worker",
    "lost_data": "trioflow_lost_data",
    "recomputed": "trioflow_recomputations",
    "rescheduled": "trioflow_rescheduled_runs",
    "restarts": "trioflow_restarts",
    "steal_requests": "trioflow_steal_requests",
    "stolen": "trioflow_stolen",
}


def metrics_registry(scheduler: Any) -> Any:
    """A prometheus-client registry holding one `SchedulerCollector` for `scheduler`."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SchedulerCollector(scheduler))
    return registry


def metrics_text(registry: Any) -> tuple[bytes, str]:
    """The exposition of `registry`: ``(body, content type)``."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST


class SchedulerCollector:
    """A prometheus-client collector reading a scheduler and its recorder at scrape time."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        scheduler, recorder = self.scheduler, self.scheduler.recorder
        counts = scheduler.state.count_by_state()
        tasks = GaugeMetricFamily("trioflow_tasks", "Tasks the scheduler knows, by state", labels=["state"])
        for state in TASK_STATES:
            tasks.add_metric([state], counts.get(state, 0))
        yield tasks
        workers = scheduler.state.workers
        yield GaugeMetricFamily("trioflow_workers", "Workers registered with the scheduler", value=len(workers))
        yield GaugeMetricFamily(
            "trioflow_worker_threads", "Threads of the registered workers", value=sum(w.nthreads for w in workers.values())
        )
        processing = GaugeMetricFamily(
            "trioflow_worker_processing_tasks", "Tasks assigned to each worker", labels=["worker"]
        )
        memory = GaugeMetricFamily(
            "trioflow_worker_memory_bytes", "Resident memory of each worker process, at its last heartbeat",
            labels=["worker"],
        )
        spilled = GaugeMetricFamily(
            "trioflow_worker_spilled_bytes", "Bytes of values each worker holds on disk, at its last heartbeat",
            labels=["worker"],
        )
        for address, ws in workers.items():
            processing.add_metric([address], len(ws.processing))
            link = scheduler.workers.get(address)
            rss = None if link is None else link.last_heartbeat.get("memory")
            if rss is not None and math.isfinite(rss):
                memory.add_metric([address], rss)
            on_disk = None if link is None else link.last_heartbeat.get("spilled_bytes")
            if on_disk is not None and math.isfinite(on_disk):
                spilled.add_metric([address], on_disk)
        yield processing
        yield memory
        yield spilled
        yield GaugeMetricFamily("trioflow_clients", "Clients connected to the scheduler", value=len(scheduler.clients))

        counters = recorder.counters()
        runs = CounterMetricFamily("trioflow_task_runs", "Task runs the workers reported", labels=["status"])
        runs.add_metric(["ok"], counters["runs_ok"])
        runs.add_metric(["error"], counters["runs_erred"])
        yield runs
        yield _histogram(
            "trioflow_task_duration_seconds", "How long task runs took, by the workers' clocks", recorder.durations
        )
        for name, metric in PROMETHEUS_COUNTERS.items():
            yield CounterMetricFamily(metric, COUNTERS[name][0].upper() + COUNTERS[name][1:], value=counters[name])
        yield _histogram(
            "trioflow_event_loop_lag_seconds",
            "How late the scheduler's event loop woke from a sleep (measured every 0.5 s)",
            recorder.loop_lag,
        )
        yield GaugeMetricFamily(
            "trioflow_event_loop_last_lag_seconds", "The latest event-loop lag measurement", value=recorder.last_loop_lag
        )


def _histogram(name: str, documentation: str, histogram: Histogram) -> Any:
    from prometheus_client.core import HistogramMetricFamily

    buckets = [("+Inf" if math.isinf(bound) else repr(bound), n) for bound, n in histogram.cumulative()]
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=histogram.sum)
