"""W6 — a hung worker: SIGSTOP one worker process (its socket stays open).

2 workers, default configuration on both sides (trioflow: heartbeats every
0.5 s, ``worker_ttl`` 3 s; dask: ``distributed.scheduler.worker-ttl`` 5
minutes). One worker process is SIGSTOPped and the scheduler's worker table
(in this process, polled every ``--poll-ms``, see ``_faults.py``) is watched
until its address leaves it. A side that has not dropped it within the cap
(``--cap``, 60 s; dask's ttl is 5 minutes, so it normally does not) is
reported as "not within N s". The process is always SIGCONTed again (in a
``finally``; a guardian process does it too if this one dies first), then
the cluster is let get back to 2 workers (untimed; the trioflow worker
reconnects by itself) and, with ``--busy``, the tasks in flight during the
freeze are checked.

Each run freezes a worker not frozen yet, when there is one.

Figure: ``drop_s`` (seconds from the SIGSTOP to the drop; lower is better),
median over runs; trioflow's target is <= 4 s. When the dask side never drops
within the cap the ratio is null and ``ratio_at_most`` = trioflow / cap
bounds it. Also: ``recovered_s`` (SIGCONT -> 2 workers registered again).

    python benchmarks/w6_hung_worker.py [--cap 60] [--repeat 3] [--busy 40]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _faults import MembershipWatch, frozen, membership, process_state, wait_for_workers, worker_pid_map  # noqa: E402
from _harness import DASK, TRIOFLOW, Figure, Workload, median, parse_args, quiesce, run_workload  # noqa: E402

N_WORKERS = 2


def slow_inc(x, delay=0.05):
    import time

    time.sleep(delay)
    return x + 1


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cap", type=float, default=60.0, help="seconds to wait for the drop before giving up (default 60)"
    )
    parser.add_argument("--poll-ms", type=float, default=5.0, help="worker-table poll interval, ms (default 5)")
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        help="submit this many 50 ms tasks just before the freeze and check their results after (default 0: idle)",
    )


_originals: dict[str, set[int]] = {}
_frozen_before: dict[str, set[int]] = {}


def warmup(client, system: str, args: argparse.Namespace) -> None:
    snapshot = membership(client, system)
    if wait_for_workers(snapshot, N_WORKERS, timeout=60) is None:
        raise RuntimeError(f"W6 warm-up: {N_WORKERS} workers did not register")
    for _ in range(max(1, args.warmup)):
        client.gather(client.map(slow_inc, range(10 * N_WORKERS), delay=0.0, pure=False))
    _originals[system] = set(worker_pid_map(client, system).values())
    _frozen_before[system] = set()


def run_once(client, system: str, args: argparse.Namespace) -> dict:
    snapshot = membership(client, system)
    originals, done = _originals.setdefault(system, set()), _frozen_before.setdefault(system, set())
    pids = worker_pid_map(client, system)
    fresh = sorted((a, p) for a, p in pids.items() if p in originals and p not in done)
    address, pid = (fresh or sorted(pids.items()))[0]
    done.add(pid)
    sample: dict = {"victim": [address, pid]}
    futures = client.map(slow_inc, range(args.busy), pure=False) if args.busy else []
    with MembershipWatch(snapshot, args.poll_ms / 1e3) as watch:
        with frozen(pid) as freeze:
            stopped_at = freeze.stopped_at
            dropped = watch.wait_first("left", timeout=args.cap, after=stopped_at, address=address)
            sample["state_while_frozen"] = process_state(pid)  # "T": still stopped at the drop (or the cap)
        continued_at = freeze.continued_at
        sample["frozen_for_s"] = continued_at - stopped_at
        sample["state_after"] = process_state(pid)
        recovered = wait_for_workers(snapshot, N_WORKERS, timeout=60)
        if recovered is not None and dropped is not None:
            # The same worker must come back (re-register), not merely still be listed.
            back = watch.wait_first("joined", timeout=60, after=dropped)
            recovered = None if back is None else max(0.0, back - continued_at)
        sample["events"] = watch.log(stopped_at)
    sample["drop_s"] = None if dropped is None else dropped - stopped_at
    sample["recovered_s"] = recovered
    if args.busy:
        if system == TRIOFLOW:
            from trioflow import wait
        else:
            from distributed import wait
        wait(futures, timeout=60)
        results = client.gather(futures)
        sample["busy_correct"] = results == [i + 1 for i in range(args.busy)]
        if not sample["busy_correct"]:
            raise AssertionError("W6: wrong results for the tasks in flight during the freeze")
        del futures, results
    if recovered is None:
        raise RuntimeError(f"W6: the cluster did not get back to {N_WORKERS} workers within 60 s of the SIGCONT")
    sample["quiesce_s"] = quiesce(client, system)
    return sample


def summarize(samples: list[dict], args: argparse.Namespace) -> dict:
    drops = [s["drop_s"] for s in samples if s["drop_s"] is not None]
    missed = len(samples) - len(drops)
    out = {
        "drop_s": median(drops) if not missed else f"not within {args.cap:g} s ({missed}/{len(samples)} runs)",
        "dropped_runs": f"{len(drops)}/{len(samples)}",
        "drop_runs_s": [s["drop_s"] for s in samples],
        "cap_s": args.cap,
        "recovered_s": [s["recovered_s"] for s in samples],
        "frozen_for_s": [s["frozen_for_s"] for s in samples],
        "process_state_while_frozen": [s["state_while_frozen"] for s in samples],
        "process_state_after_sigcont": [s["state_after"] for s in samples],
        "quiesce_s": [s["quiesce_s"] for s in samples],
        "victims": [s["victim"] for s in samples],
        "events_since_stop": [s["events"] for s in samples],
    }
    if args.busy:
        out["busy_correct"] = all(s.get("busy_correct") for s in samples)
    return out


def postprocess(line: dict) -> None:
    """When dask never dropped the worker, bound the ratio by trioflow / cap."""
    for row in line["figures"]:
        if row["figure"] != "drop_s":
            continue
        mine, theirs = row.get(TRIOFLOW), row.get(DASK)
        if isinstance(mine, (int, float)) and isinstance(theirs, str):
            cap = line["results"][DASK].get("cap_s")
            if cap:
                row["ratio_at_most"] = round(mine / cap, 6)
                line["ratios"]["drop_s_at_most"] = row["ratio_at_most"]


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[1], add_flags, repeat=3, warmup=1, argv=argv)
    workload = Workload(
        id="W6",
        name="SIGSTOP one of 2 workers: seconds until the scheduler drops it (default config)",
        cluster={"n_workers": N_WORKERS, "threads_per_worker": 1},
        figures=[Figure("drop_s", "s", "lower")],
        run_once=run_once,
        summarize=summarize,
        warmup=warmup,
        params={
            "cap_s": args.cap,
            "poll_ms": args.poll_ms,
            "busy_tasks": args.busy,
            "config": "defaults (trioflow worker_ttl 3 s; dask worker-ttl 5 minutes)",
            "dropped_means": "address left the in-process scheduler's worker table",
        },
        measure_cpu=False,
        postprocess=postprocess,
    )
    return run_workload(workload, args)


if __name__ == "__main__":
    main()
