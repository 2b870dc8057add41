"""W12 — values that outgrow the cluster's memory: spilling to disk.

2 workers x 1 thread, each with a memory limit (default 250 MB: the cluster
has 500 MB); ``--values`` NumPy arrays of ``--mib`` MiB each (default 75 x
20 MiB = 1.5 GiB, 3x the cluster's limit), every one held by a future until
the end, so that none may be dropped; then a sum of each (a dependent: the
arrays are read back from wherever they are) and a ``gather`` of the sums,
checked. Both sides spill the least recently used values to disk past the
same fractions of the limit (0.6 target, 0.7 spill, 0.8 pause, 0.95
terminate: dask's defaults, trioflow's too). One timed run after no warm-up
by default (a run writes gigabytes; ``--repeat`` for more); fresh keys.

Figures: whether it completed (1 or 0), worker deaths (worker processes
replaced during the run: their pids, before and after), seconds. Also, per
side, the bytes on disk at the end of the run where the side says so
(trioflow: its workers' heartbeat metrics).

    python benchmarks/w12_spill.py [--limit-mb 250] [--values 75] [--mib 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (  # noqa: E402
    DASK,
    TRIOFLOW,
    Figure,
    Workload,
    dask_client,
    median,
    now,
    parse_args,
    quiesce,
    run_workload,
    trioflow_client,
)


def make(i, mib):
    import numpy as np

    return np.full(mib * 2**20 // 8, float(i))


def total(array):
    return float(array.sum())


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit-mb", type=int, default=250, help="each worker's memory limit, MB (default 250)")
    parser.add_argument("--values", type=int, default=75, help="arrays made and held (default 75)")
    parser.add_argument("--mib", type=int, default=20, help="MiB per array (default 20)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a run counts as not done")


def _pids(client, system: str) -> set[int]:
    if system == TRIOFLOW:
        return {w["pid"] for w in client.scheduler_info()["workers"].values() if w.get("pid")}
    return set(client.run(os.getpid).values())


def _spilled(client, system: str) -> float | None:
    if system != TRIOFLOW:
        return None
    # (Heartbeats carry the figure; a busy link sends one every second.)
    time.sleep(1.2)
    return sum(w["metrics"].get("spilled_bytes", 0.0) for w in client.scheduler_info()["workers"].values())


def run_once(client, system: str, args: argparse.Namespace) -> dict:
    """Make the arrays, keep them, sum each, gather the sums; count replaced workers."""
    before = _pids(client, system)
    start = now()
    completed, error = 1, None
    try:
        arrays = [client.submit(make, i, args.mib, pure=False) for i in range(args.values)]
        sums = [client.submit(total, a, pure=False) for a in arrays]
        results = client.gather(sums)
        n = args.mib * 2**20 // 8
        if results != [float(i * n) for i in range(args.values)]:
            raise AssertionError("W12: wrong sums")
    except Exception as exc:  # KilledWorker, a timeout...: the run did not complete
        completed, error = 0, f"{type(exc).__name__}: {str(exc)[:300]}"
    elapsed = now() - start
    spilled = _spilled(client, system) if completed else None
    after = _pids(client, system)
    arrays = sums = None  # noqa: F841 - release them before the next run
    return {
        "seconds": elapsed,
        "completed": completed,
        "worker_deaths": len(before - after),
        "spilled_bytes_at_end": spilled,
        "error": error,
        "quiesce_s": quiesce(client, system, timeout=60),
    }


def summarize(samples: list[dict], args: argparse.Namespace) -> dict:
    return {
        "completed": min(s["completed"] for s in samples),
        "worker_deaths": sum(s["worker_deaths"] for s in samples),
        "seconds": median([s["seconds"] for s in samples]),
        "runs_s": [s["seconds"] for s in samples],
        "spilled_bytes_at_end": [s["spilled_bytes_at_end"] for s in samples],
        "run_errors": [s["error"] for s in samples if s["error"]],
    }


def open_cluster(side, cluster: dict):
    limit = cluster["memory_limit_mb"] * 10**6
    shape = {"n_workers": cluster["n_workers"], "threads_per_worker": cluster["threads_per_worker"]}
    if side.system == TRIOFLOW:
        return trioflow_client(**shape, memory_limit=limit)
    assert side.system == DASK
    return dask_client(config=side.config, **shape, memory_limit=limit)


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[1], add_flags, repeat=1, warmup=0, argv=argv)
    total_mb = args.values * args.mib * 2**20 / 1e6
    workload = Workload(
        id="W12",
        name="spilling: values totalling 3x the cluster's memory limit, held, then summed",
        cluster={"n_workers": 2, "threads_per_worker": 1, "memory_limit_mb": args.limit_mb},
        figures=[
            Figure("completed", "1 = every sum right", "higher"),
            Figure("worker_deaths", "workers", "lower"),
            Figure("seconds", "s", "lower"),
        ],
        run_once=run_once,
        summarize=summarize,
        params={
            "values": args.values, "mib_per_value": args.mib, "values_mb": round(total_mb),
            "times_cluster_limit": round(total_mb / (2 * args.limit_mb), 2),
        },
        open_cluster=open_cluster,
        measure_cpu=False,  # (the meter follows the pids it saw first; workers may be replaced)
    )
    return run_workload(workload, args)


if __name__ == "__main__":
    main()
