"""W5 — a worker process SIGKILLed in the middle of a map.

3 workers x 1 thread; ``client.map(slow_inc, range(600), pure=False)`` where
each task sleeps 20 ms; one worker process is SIGKILLed once 30 % of the
futures are done (its nanny restarts it on both sides). Each timed run is a
pair on the same cluster: the map without a kill, then the map with one;
every result is checked (``slow_inc(i) == i + 1``; a wrong or missing result
fails the side). Between runs (untimed) the cluster is let get back to 3
workers and a small map warms the replacement up; each run kills a worker
that has not been killed yet (so no nanny restarts a worker that died young,
which trioflow's nanny would answer with a longer back-off).

The done count is polled from the client every 2 ms in both runs of a pair
(``future.done()`` over the 600 futures); the kill goes out as soon as it
reaches 30 %. A thread polls the in-process scheduler's worker table every
``--poll-ms`` (1 ms) during both runs, on both sides (see ``_faults.py``).

Figures (per side, then trioflow / dask):
- ``slowdown``: median time with the kill / median time without (lower is better);
- ``drop_s``: seconds from the SIGKILL to the address leaving the
  scheduler's worker table (median over runs);
- ``all_correct``: "yes (N/N runs)" when every result of every run was right.
Also: ``replaced_s`` (kill -> the nanny's replacement registered), every
run's times and the per-pair ratios.

    python benchmarks/w5_kill_during_map.py [--tasks 600] [--delay 0.02] [--kill-at 0.3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _faults import MembershipWatch, membership, wait_for_workers, worker_pid_map  # noqa: E402
from _harness import TRIOFLOW, Figure, Workload, median, now, parse_args, quiesce, run_workload  # noqa: E402

N_WORKERS = 3


def slow_inc(x, delay=0.02):
    time.sleep(delay)
    return x + 1


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=int, default=600, help="tasks per map (default 600)")
    parser.add_argument("--delay", type=float, default=0.02, help="seconds each task sleeps (default 0.02)")
    parser.add_argument("--kill-at", type=float, default=0.3, help="fraction done at the kill (default 0.3)")
    parser.add_argument("--poll-ms", type=float, default=1.0, help="worker-table poll interval, ms (default 1)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a map may take before the side fails")


# Per side: the pids of the workers that were there after the warm-up, and
# those already killed (victims: an original not killed yet, when there is one).
_originals: dict[str, set[int]] = {}
_killed: dict[str, set[int]] = {}


def _helpers(client, system: str):
    return membership(client, system), (
        __import__("trioflow").wait if system == TRIOFLOW else __import__("distributed").wait
    )


def warmup(client, system: str, args: argparse.Namespace) -> None:
    snapshot, _ = _helpers(client, system)
    if wait_for_workers(snapshot, N_WORKERS, timeout=60) is None:
        raise RuntimeError(f"W5 warm-up: {N_WORKERS} workers did not register")
    for _ in range(max(1, args.warmup)):
        futures = client.map(slow_inc, range(10 * N_WORKERS), delay=0.0, pure=False)
        client.gather(futures)
        futures = client.map(slow_inc, range(5 * N_WORKERS), delay=args.delay, pure=False)
        client.gather(futures)
        del futures
    _originals[system] = set(worker_pid_map(client, system).values())
    _killed[system] = set()


def one_map(client, system: str, args, wait, victim: tuple[str, int] | None) -> dict:
    """One timed map; SIGKILL `victim` (address, pid) at `args.kill_at` done."""
    n = args.tasks
    threshold = max(1, int(round(args.kill_at * n)))
    out: dict = {}
    start = now()
    futures = client.map(slow_inc, range(n), delay=args.delay, pure=False)
    out["map_call_s"] = now() - start
    while True:
        done = sum(1 for f in futures if f.done())
        if done >= threshold:
            break
        if now() - start > args.timeout:
            raise TimeoutError(f"W5: only {done}/{n} done after {args.timeout:g} s (before the kill)")
        time.sleep(0.002)
    out["threshold_reached_s"] = now() - start
    out["done_at_kill"] = done
    if victim is not None:
        out["kill_t"] = now()
        os.kill(victim[1], signal.SIGKILL)
        out["kill_s"] = out["kill_t"] - start
    left = args.timeout - (now() - start)
    try:
        wait(futures, timeout=max(left, 1.0))
    except TimeoutError:
        done = sum(1 for f in futures if f.done())
        raise TimeoutError(f"W5: only {done}/{n} done after {args.timeout:g} s (kill={victim is not None})") from None
    results = client.gather(futures)
    out["seconds"] = now() - start
    wrong = [(i, r) for i, r in enumerate(results) if r != i + 1]
    out["wrong"] = len(wrong) + max(0, n - len(results))
    if out["wrong"]:
        raise AssertionError(
            f"W5: {out['wrong']} of {n} results wrong (kill={victim is not None}); first: {wrong[:3]}"
        )
    del futures, results
    return out


def run_once(client, system: str, args: argparse.Namespace) -> dict:
    snapshot, wait = _helpers(client, system)
    originals, killed = _originals.setdefault(system, set()), _killed.setdefault(system, set())
    pids = worker_pid_map(client, system)
    fresh = sorted((a, p) for a, p in pids.items() if p in originals and p not in killed)
    victim = (fresh or sorted(pids.items()))[0]
    killed.add(victim[1])
    sample: dict = {"victim": list(victim)}
    with MembershipWatch(snapshot, args.poll_ms / 1e3) as watch:
        base = one_map(client, system, args, wait, None)
        sample["quiesce_between_s"] = quiesce(client, system)
        kill = one_map(client, system, args, wait, victim)
        kill_t = kill.pop("kill_t")
        dropped = watch.wait_first("left", timeout=30.0, after=kill_t, address=victim[0])
        replaced = None
        if dropped is not None:
            replaced = watch.wait_first("joined", timeout=60.0, after=dropped)
        sample["events"] = watch.log(kill_t)
        sample["polls"] = watch.polls
    sample.update(
        base_s=base["seconds"],
        kill_s=kill["seconds"],
        pair_ratio=kill["seconds"] / base["seconds"],
        drop_s=None if dropped is None else dropped - kill_t,
        replaced_s=None if replaced is None else replaced - kill_t,
        killed_at_s=kill["kill_s"],
        done_at_kill=kill["done_at_kill"],
        base_threshold_s=base["threshold_reached_s"],
        correct=True,
    )
    # Untimed: back to 3 workers (none of them the victim), then warm the
    # replacement up, and forget the maps.
    recovered = wait_for_workers(snapshot, N_WORKERS, timeout=60, gone_pids=frozenset({victim[1]}))
    sample["recovered_after_run_s"] = recovered
    if recovered is None:
        raise RuntimeError(f"W5: the cluster did not get back to {N_WORKERS} workers within 60 s")
    client.gather(client.map(slow_inc, range(5 * N_WORKERS), delay=0.0, pure=False))
    sample["quiesce_after_s"] = quiesce(client, system)
    return sample


def summarize(samples: list[dict], args: argparse.Namespace) -> dict:
    base = [s["base_s"] for s in samples]
    kill = [s["kill_s"] for s in samples]
    drops = [s["drop_s"] for s in samples if s["drop_s"] is not None]
    replaced = [s["replaced_s"] for s in samples if s["replaced_s"] is not None]
    correct = sum(1 for s in samples if s["correct"])
    return {
        "slowdown": median(kill) / median(base),
        "drop_s": median(drops) if len(drops) == len(samples) else f"not dropped within 30 s in {len(samples) - len(drops)}/{len(samples)} runs",
        "all_correct": f"{'yes' if correct == len(samples) else 'NO'} ({correct}/{len(samples)} runs)",
        "base_median_s": median(base),
        "kill_median_s": median(kill),
        "pair_ratios": [s["pair_ratio"] for s in samples],
        "base_runs_s": base,
        "kill_runs_s": kill,
        "drop_runs_s": [s["drop_s"] for s in samples],
        "replaced_s": median(replaced) if replaced else None,
        "replaced_runs_s": [s["replaced_s"] for s in samples],
        "killed_at_s": [s["killed_at_s"] for s in samples],
        "done_at_kill": [s["done_at_kill"] for s in samples],
        "recovered_after_run_s": [s["recovered_after_run_s"] for s in samples],
        "quiesce_s": [[s["quiesce_between_s"], s["quiesce_after_s"]] for s in samples],
        "victims": [s["victim"] for s in samples],
        "events_since_kill": [s["events"] for s in samples],
        "ideal_map_s": args.tasks * args.delay / N_WORKERS,
    }


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[1], add_flags, repeat=3, warmup=1, argv=argv)
    workload = Workload(
        id="W5",
        name="SIGKILL one of 3 workers at 30 % of map(sleep 20 ms) over 600 items",
        cluster={"n_workers": N_WORKERS, "threads_per_worker": 1},
        figures=[
            Figure("slowdown", "x (with kill / without)", "lower"),
            Figure("drop_s", "s", "lower"),
            Figure("all_correct", "", "higher"),
        ],
        run_once=run_once,
        summarize=summarize,
        warmup=warmup,
        params={
            "tasks": args.tasks,
            "delay_s": args.delay,
            "kill_at": args.kill_at,
            "poll_ms": args.poll_ms,
            "pure": False,
            "dropped_means": "address left the in-process scheduler's worker table",
        },
        measure_cpu=False,
    )
    return run_workload(workload, args)


if __name__ == "__main__":
    main()
