"""W11 — skewed tasks: eight slow and eight fast, submitted together (work stealing).

2 workers x 1 thread; 16 tasks submitted at once, alternating: a slow one
(``work(0.5, i)``: sleeps 0.5 s) and a fast one (``work(0.01, i)``: 0.01 s),
then ``gather``. Placement alternates root tasks between the workers as
they are submitted, so every slow task lands on the same worker: without
work stealing that worker sleeps for 4 s while the other idles after 0.08 s.
Ideal: the slow tasks split 4/4, about 2.05 s. Median of 3 timed runs after
1 warm-up, fresh keys every run (``pure=False``); the warm-up also lets both
schedulers learn how long ``work`` takes (both estimate task durations by
function name).

Figure: seconds (lower is better) per side, and trioflow / dask. Also: each
run's seconds, and on trioflow the steals asked and tasks moved per run
(from the scheduler's counters).

    python benchmarks/w11_skewed_tasks.py [--slow 0.5] [--fast 0.01] [--pairs 8] [--two-functions]

``--two-functions``: the slow and the fast tasks are two different functions
(``slow`` and ``fast``), so their durations are estimated apart; by default
they share one (``work``), the harder case for the estimates.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import TRIOFLOW, Figure, Workload, median, now, parse_args, quiesce, run_workload  # noqa: E402


def work(seconds, i):
    time.sleep(seconds)
    return i


def slow(seconds, i):
    time.sleep(seconds)
    return i


def fast(seconds, i):
    time.sleep(seconds)
    return i


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slow", type=float, default=0.5, help="seconds of a slow task (default 0.5)")
    parser.add_argument("--fast", type=float, default=0.01, help="seconds of a fast task (default 0.01)")
    parser.add_argument("--pairs", type=int, default=8, help="slow tasks, and as many fast ones (default 8)")
    parser.add_argument(
        "--two-functions", action="store_true", help="slow and fast tasks are two functions (default: one)"
    )


def ideal_s(args: argparse.Namespace) -> float:
    """Two threads, perfectly balanced: half of all the work."""
    return args.pairs * (args.slow + args.fast) / 2


def _steal_counters(client, system: str) -> tuple[float, float]:
    if system != TRIOFLOW:
        return (float("nan"), float("nan"))
    counters = client.get_cluster_metrics()["counters"]
    return counters.get("steal_requests", 0.0), counters.get("stolen", 0.0)


def run_once(client, system: str, args: argparse.Namespace) -> dict:
    """Submit the 16 tasks alternating slow and fast, gather, check."""
    slow_fn, fast_fn = (slow, fast) if args.two_functions else (work, work)
    asked_before, moved_before = _steal_counters(client, system)
    start = now()
    futures = []
    for i in range(args.pairs):
        futures.append(client.submit(slow_fn, args.slow, 2 * i, pure=False))
        futures.append(client.submit(fast_fn, args.fast, 2 * i + 1, pure=False))
    results = client.gather(futures)
    elapsed = now() - start
    if results != list(range(2 * args.pairs)):
        raise AssertionError(f"W11: wrong results {results}")
    asked, moved = _steal_counters(client, system)
    del futures, results
    return {
        "seconds": elapsed,
        "steals_asked": asked - asked_before,
        "steals_moved": moved - moved_before,
        "quiesce_s": quiesce(client, system),
    }


def summarize(samples: list[dict], args: argparse.Namespace) -> dict:
    runs = [s["seconds"] for s in samples]
    return {
        "seconds": median(runs),
        "runs_s": runs,
        "ideal_s": ideal_s(args),
        "steals_asked": [s["steals_asked"] for s in samples],
        "steals_moved": [s["steals_moved"] for s in samples],
    }


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[1], add_flags, repeat=3, warmup=1, argv=argv)
    workload = Workload(
        id="W11",
        name="skewed tasks: 8 x 0.5 s and 8 x 0.01 s alternating, submitted together",
        cluster={"n_workers": 2, "threads_per_worker": 1},
        figures=[Figure("seconds", "s", "lower")],
        run_once=run_once,
        summarize=summarize,
        params={
            "slow_s": args.slow, "fast_s": args.fast, "pairs": args.pairs,
            "functions": "slow, fast" if args.two_functions else "work", "ideal_s": ideal_s(args),
        },
    )
    return run_workload(workload, args)


if __name__ == "__main__":
    main()
