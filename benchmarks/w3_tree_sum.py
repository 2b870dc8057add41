"""W3 — a binary-tree sum: many small tasks that depend on each other.

2 workers x 1 thread; 8192 leaves ``client.map(inc, range(8192), pure=False)``,
then the tree above them, level by level: ``client.submit(add, a, b,
pure=False)`` for each pair of the level below, until one future is left
(8191 inner nodes, 16 383 tasks in all). The whole graph is submitted before
anything is awaited; the run ends when the root's ``result()`` returns, and
the root is checked against ``sum(i + 1 for i in range(8192))``. Median of 3
timed runs after 1 warm-up; fresh keys every run; after each run the futures
are dropped and the scheduler is let empty itself (untimed).

Figure: tasks/s (higher is better) = 16 383 / median seconds, per side, and
trioflow / dask. Also: every run, the time the submit calls took (building
and sending the graph), CPU use.

    python benchmarks/w3_tree_sum.py [--leaves 8192] [--repeat 3] [--warmup 1] [--no-dask] [--interleave]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Figure, Workload, median, now, parse_args, quiesce, run_workload  # noqa: E402


def inc(x):
    return x + 1


def add(a, b):
    return a + b


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--leaves", type=int, default=8192, help="leaves of the tree (default 8192)")


def n_tasks(leaves: int) -> int:
    """Leaves plus inner nodes: a binary tree over `leaves` has leaves - 1."""
    return 2 * leaves - 1


def run_once(client, system: str, args: argparse.Namespace) -> dict:
    """Submit the whole tree, wait for the root, check it; then let the scheduler empty."""
    start = now()
    level = above = client.map(inc, range(args.leaves), pure=False)
    while len(level) > 1:
        above = [client.submit(add, a, b, pure=False) for a, b in zip(level[0::2], level[1::2], strict=False)]
        if len(level) % 2:  # an odd one out (only when --leaves is not a power of 2) goes up as it is
            above.append(level[-1])
        level = above
    submitted = now()
    total = level[0].result()
    elapsed = now() - start
    expected = args.leaves * (args.leaves + 1) // 2
    if total != expected:
        raise AssertionError(f"W3: the tree summed to {total!r}, expected {expected}")
    del level, above  # the root's last references: now the scheduler may forget the tree
    return {"seconds": elapsed, "submit_s": submitted - start, "quiesce_s": quiesce(client, system)}


def summarize(samples: list[dict], args: argparse.Namespace) -> dict:
    runs = [s["seconds"] for s in samples]
    seconds = median(runs)
    tasks = n_tasks(args.leaves)
    return {
        "tasks_per_s": tasks / seconds,
        "median_s": seconds,
        "tasks": tasks,
        "runs_s": runs,
        "runs_tasks_per_s": [tasks / s for s in runs],
        "submit_s": [s["submit_s"] for s in samples],
        "quiesce_s": [s["quiesce_s"] for s in samples],
    }


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[1], add_flags, repeat=3, warmup=1, argv=argv)
    workload = Workload(
        id="W3",
        name="tree sum: map(inc) leaves, submit(add, a, b) inner nodes, pure=False",
        cluster={"n_workers": 2, "threads_per_worker": 1},
        figures=[Figure("tasks_per_s", "tasks/s", "higher")],
        run_once=run_once,
        summarize=summarize,
        params={"leaves": args.leaves, "tasks": n_tasks(args.leaves), "pure": False},
    )
    return run_workload(workload, args)


if __name__ == "__main__":
    main()
