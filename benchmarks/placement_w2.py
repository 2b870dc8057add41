"""W2's round trip against where the kernel put the threads, in ONE cluster.

Not a workload of shared/benchmarks.md (run_all.py skips it): a measurement
for docs/performance.md ("W2"). A `LocalCluster` puts three threads in the
benchmark's process: the caller, the client's loop and the scheduler's loop.
They share one interpreter lock, so at most one of them runs Python at a
time, and a round trip passes the work between them six times. On two
CPUs the kernel sometimes runs all three on one CPU and the worker on the
other, sometimes spreads them; this script shows what each costs.

Two parts, on one cluster of one one-thread worker:

* ``free``: blocks of ``--per`` round trips with nobody choosing the CPUs;
  during each block it samples, every tenth round trip, which CPU each
  thread last ran on. A block is *together* when in most samples the
  process's three threads were on one CPU, else *split*. It prints the
  median round trip of each kind of block.
* ``pinned``: the same blocks, alternating between no affinity (``free``)
  and this process's threads all allowed on one CPU only (the worker free),
  which is what a machine's owner could choose with ``taskset``; trioflow
  itself never sets an affinity.

    python benchmarks/placement_w2.py [--blocks 20] [--per 200]

Prints one JSON line. Linux only (``/proc``, ``sched_setaffinity``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import now, trioflow_client, worker_pids  # noqa: E402

OUR_THREADS = ("MainThread", "trioflow-client", "trioflow-cluster")


def inc(x):
    return x + 1


def last_cpu(pid: int, tid: int) -> int:
    """The CPU thread `tid` of `pid` last ran on (field 39 of its stat)."""
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[36])


def our_cpus() -> tuple[int, ...]:
    """The CPUs the caller, the client's loop and the scheduler's loop last ran on."""
    ids = {t.name: t.native_id for t in threading.enumerate()}
    return tuple(last_cpu(os.getpid(), ids[name]) for name in OUR_THREADS)


def block(client, per: int, sample: bool) -> tuple[float, bool | None]:
    """Median ms of `per` round trips; with `sample`, whether the three
    threads mostly shared one CPU."""
    times: list[float] = []
    together = collections.Counter()
    for i in range(per):
        start = now()
        assert client.submit(inc, i, pure=False).result() == i + 1
        times.append(now() - start)
        if sample and i % 10 == 0:
            together[len(set(our_cpus())) == 1] += 1
    mostly = together[True] > together[False] if sample else None
    return statistics.median(times) * 1e3, mostly


def set_affinity(cpus: set[int]) -> None:
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):
            pass  # a thread that ended meanwhile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=20, help="blocks of each part (default 20)")
    parser.add_argument("--per", type=int, default=200, help="round trips a block (default 200)")
    args = parser.parse_args()
    if args.blocks < 2 or args.per < 10:
        parser.error("--blocks must be at least 2 and --per at least 10")
    every_cpu = os.sched_getaffinity(0)
    if len(every_cpu) < 2:
        parser.error("needs at least two CPUs to compare placements")
    with trioflow_client(1, 1) as client:
        worker_pids(client, "trioflow")  # (fails early if the worker is not up)
        for i in range(300):
            client.submit(inc, i, pure=False).result()
        free = [block(client, args.per, sample=True) for _ in range(args.blocks)]
        one_cpu = {min(every_cpu)}
        pinned: dict[str, list[float]] = {"free": [], "pinned": []}
        try:
            for b in range(args.blocks):
                for name in ("pinned", "free") if b % 2 else ("free", "pinned"):
                    set_affinity(one_cpu if name == "pinned" else every_cpu)
                    pinned[name].append(block(client, args.per, sample=False)[0])
        finally:
            set_affinity(every_cpu)
    kinds = {"together": [ms for ms, t in free if t], "split": [ms for ms, t in free if not t]}
    print(json.dumps({
        "benchmark": "placement_w2",
        "unit": "ms (median round trip of a block)",
        "free_blocks": {k: {"blocks": len(v), "median": statistics.median(v) if v else None,
                            "figures": [round(x, 3) for x in v]} for k, v in kinds.items()},
        "pinned_vs_free": {k: {"median": statistics.median(v), "figures": [round(x, 3) for x in v]}
                           for k, v in pinned.items()},
        "pinned_over_free_median": statistics.median(p / f for p, f in zip(pinned["pinned"], pinned["free"])),
    }))


if __name__ == "__main__":
    main()
