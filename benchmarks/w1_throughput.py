"""W1 — throughput of many tiny independent tasks.

2 workers x 1 thread; ``client.map(inc, range(20_000), pure=False)`` then
``client.gather``; median of 3 timed runs after 1 warm-up; fresh keys every
run (``pure=False``, both sides). After each run the futures are dropped and
the scheduler is let empty itself (untimed), so a run does not pay for
forgetting the previous one.

Figure: tasks/s (higher is better) per side, and trioflow / dask. A second
dask figure is taken with ``distributed.scheduler.worker-saturation: inf``
(dask's scheduler then sends every task to the workers up front instead of
queueing them on the scheduler; dask's fastest setting for this workload).

    python benchmarks/w1_throughput.py [--tasks 20000] [--repeat 3] [--warmup 1] [--no-dask] [--interleave]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import DASK, Figure, Side, Workload, median, now, parse_args, quiesce, run_workload  # noqa: E402


def inc(x):
    return x + 1


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks per run (default 20000)")
    parser.add_argument("--workers", type=int, default=2, help="workers (default 2)")
    parser.add_argument(
        "--no-saturation-inf", action="store_true", help="skip the dask worker-saturation=inf variant"
    )


def run_once(client, system: str, args: argparse.Namespace) -> dict:
    """Map and gather `args.tasks` fresh tasks; then let the scheduler empty."""
    n = args.tasks
    start = now()
    futures = client.map(inc, range(n), pure=False)
    submitted = now()
    results = client.gather(futures)
    elapsed = now() - start
    if len(results) != n or results[0] != 1 or results[-1] != n:
        raise AssertionError("W1: wrong results")
    del futures, results
    return {"seconds": elapsed, "map_call_s": submitted - start, "quiesce_s": quiesce(client, system)}


def summarize(samples: list[dict], args: argparse.Namespace) -> dict:
    runs = [s["seconds"] for s in samples]
    seconds = median(runs)
    return {
        "tasks_per_s": args.tasks / seconds,
        "median_s": seconds,
        "runs_s": runs,
        "runs_tasks_per_s": [args.tasks / s for s in runs],
        "map_call_s": [s["map_call_s"] for s in samples],
        "quiesce_s": [s["quiesce_s"] for s in samples],
    }


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[1], add_flags, repeat=3, warmup=1, argv=argv)
    extra = []
    if not args.no_saturation_inf:
        extra.append(
            Side(
                "dask_saturation_inf",
                DASK,
                config={"distributed.scheduler.worker-saturation": float("inf")},
                note="distributed.scheduler.worker-saturation = inf",
            )
        )
    workload = Workload(
        id="W1",
        name="throughput: map(inc, range(N), pure=False) + gather",
        cluster={"n_workers": args.workers, "threads_per_worker": 1},
        figures=[Figure("tasks_per_s", "tasks/s", "higher")],
        run_once=run_once,
        summarize=summarize,
        params={"tasks": args.tasks, "pure": False},
        extra_dask_sides=extra,
    )
    return run_workload(workload, args)


if __name__ == "__main__":
    main()
