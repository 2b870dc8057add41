"""W9 — starting and closing a local cluster.

Each timed run: start a local cluster of 2 workers (x 1 thread), connect a
client, ``client.submit(inc, 1, pure=False).result()``, close. Two figures
per run:

- ``start_s``: from before the cluster is created to the first result
  (cluster + client + first task);
- ``close_s``: closing the client and the cluster (the ``with`` blocks'
  exits), until every worker process has ended.

The clusters are the very ones every other workload uses (``_harness``:
``trioflow_client`` = ``trioflow.LocalCluster`` with nannies in this process
and ``trioflow.Client``; ``dask_client`` = ``LocalCluster(processes=True,
dashboard_address=None)`` and ``Client``). Both libraries are imported
before any clock starts; worker processes start their own interpreters
every time, on both sides. Median of 5 timed runs after 1 warm-up.

    python benchmarks/w9_startup.py [--repeat 5] [--warmup 1] [--no-dask]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (  # noqa: E402
    TRIOFLOW,
    Figure,
    Workload,
    dask_client,
    median,
    no_cluster,
    now,
    parse_args,
    run_workload,
    trioflow_client,
)

N_WORKERS = 2


def inc(x):
    return x + 1


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def run_once(client, system: str, args: argparse.Namespace) -> dict:
    """Start, first result, close; `client` is None (each run makes its own)."""
    if system == TRIOFLOW:
        import trioflow  # noqa: F401  (imported before the clock)

        opener = trioflow_client
    else:
        import distributed  # noqa: F401

        opener = dask_client
    before = _children()
    with contextlib.ExitStack() as stack:
        start = now()
        client = stack.enter_context(opener(n_workers=N_WORKERS, threads_per_worker=1))
        connected = now()
        value = client.submit(inc, 1, pure=False).result()
        started = now()
        workers = len(client.scheduler_info()["workers"])  # untimed
        closing = now()
    closed = now()
    if value != 2:
        raise AssertionError(f"W9: inc(1) gave {value!r}")
    if workers != N_WORKERS:
        raise AssertionError(f"W9: {workers} workers registered, expected {N_WORKERS}")
    left = _children() - before
    return {
        "start_s": started - start,
        "cluster_and_client_s": connected - start,
        "first_result_s": started - connected,
        "close_s": closed - closing,
        "processes_left_after_close": len([p for p in left if psutil.pid_exists(p)]),
    }


def summarize(samples: list[dict], args: argparse.Namespace) -> dict:
    return {
        "start_s": median([s["start_s"] for s in samples]),
        "close_s": median([s["close_s"] for s in samples]),
        "runs_start_s": [s["start_s"] for s in samples],
        "runs_close_s": [s["close_s"] for s in samples],
        "runs_cluster_and_client_s": [s["cluster_and_client_s"] for s in samples],
        "runs_first_result_s": [s["first_result_s"] for s in samples],
        "processes_left_after_close": [s["processes_left_after_close"] for s in samples],
    }


def describe_layout(system: str) -> dict:
    return {
        "workers_as_processes": True,
        "nanny_in_client_process": True,
        "cluster": "started and closed inside each timed run (the same LocalCluster as W1)",
    }


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[1], repeat=5, warmup=1, argv=argv)
    workload = Workload(
        id="W9",
        name="start a 2-worker local cluster + client + first result; close",
        cluster={"n_workers": N_WORKERS, "threads_per_worker": 1},
        figures=[Figure("start_s", "s", "lower"), Figure("close_s", "s", "lower")],
        run_once=run_once,
        summarize=summarize,
        measure_cpu=False,
        open_cluster=no_cluster,
        describe_layout=describe_layout,
    )
    return run_workload(workload, args)


if __name__ == "__main__":
    main()
