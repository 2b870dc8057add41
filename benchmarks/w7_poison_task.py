"""W7 — a poison task: a task that kills its worker process (``os._exit(1)``).

2 workers x 1 thread, nannies on both sides (they restart each dead worker);
default configuration: trioflow marks the task bad on its ``allowed_failures``
= 3rd worker death, dask.distributed on its 4th (``allowed-failures`` = 3,
compared with ``>``). Each timed run submits one fresh poison task
(``pure=False``) and times ``submit`` -> ``result()`` raising; the
exception must be the side's ``KilledWorker`` (anything else, or nothing
within ``--cap`` s, fails the side).

Between runs (untimed) the cluster is let get back to 2 workers, and then
``--settle`` seconds (11 s, on both sides) pass, so that every worker has
lived longer than trioflow's nanny counts as healthy (10 s) and its restart
back-off starts again from the minimum; ``--settle 0`` shows what
back-to-back poison tasks cost instead. The warm-up runs ordinary tasks
only.

Figure: ``seconds`` until ``result()`` raises KilledWorker (median over runs;
lower is better). Also: worker deaths during each run as the in-process
scheduler saw them (``_faults.MembershipWatch``), trioflow's
``KilledWorker.deaths``, the exception type, and how long the cluster took
to get back to 2 workers.

    python benchmarks/w7_poison_task.py [--repeat 3] [--settle 11] [--cap 120]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _faults import MembershipWatch, membership, wait_for_workers  # noqa: E402
from _harness import TRIOFLOW, Figure, Workload, median, now, parse_args, quiesce, run_workload  # noqa: E402

N_WORKERS = 2


def die():
    import os

    os._exit(1)


def inc(x):
    return x + 1


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cap", type=float, default=120.0, help="seconds result() may take (default 120)")
    parser.add_argument(
        "--settle", type=float, default=11.0, help="untimed seconds between runs, after recovery (default 11)"
    )
    parser.add_argument("--poll-ms", type=float, default=2.0, help="worker-table poll interval, ms (default 2)")


def killed_worker_type(system: str) -> type:
    if system == TRIOFLOW:
        import trioflow

        return trioflow.KilledWorker
    from distributed import KilledWorker

    return KilledWorker


_runs: dict[str, int] = {}


def warmup(client, system: str, args: argparse.Namespace) -> None:
    snapshot = membership(client, system)
    if wait_for_workers(snapshot, N_WORKERS, timeout=60) is None:
        raise RuntimeError(f"W7 warm-up: {N_WORKERS} workers did not register")
    for _ in range(max(1, args.warmup)):
        client.gather(client.map(inc, range(10 * N_WORKERS), pure=False))
    _runs[system] = 0


def run_once(client, system: str, args: argparse.Namespace) -> dict:
    snapshot = membership(client, system)
    expected = killed_worker_type(system)
    if _runs.get(system):
        time.sleep(args.settle)  # untimed: see the module docstring
    _runs[system] = _runs.get(system, 0) + 1
    sample: dict = {}
    outcome: dict = {}
    with MembershipWatch(snapshot, args.poll_ms / 1e3) as watch:
        start = now()
        future = client.submit(die, pure=False)
        try:
            future.result(timeout=args.cap)
            outcome["returned"] = True
        except Exception as exc:  # KilledWorker expected; TimeoutError after the cap
            raised_at = now()
            outcome.update(
                type=type(exc),
                name=f"{type(exc).__module__}.{type(exc).__qualname__}",
                message=str(exc),
                deaths=getattr(exc, "deaths", None),
                timeout=isinstance(exc, TimeoutError),
            )
            # Keep nothing that refers to the future (the exception's
            # traceback holds result()'s frame): the scheduler may then
            # forget the task, and the next run starts from an empty one.
            del exc
        if system != TRIOFLOW:
            # Seen here: after result() raised, dask's client keeps counting
            # the erred future (refcount 1 after `del` and gc.collect()), so
            # its scheduler would hold the task for good (untimed `quiesce`
            # then waits its full 30 s); release the key explicitly.
            future.release()
        del future
        recovered = wait_for_workers(snapshot, N_WORKERS, timeout=60 if system == TRIOFLOW else 20)
        if recovered is None and system != TRIOFLOW:
            recovered = _repair_dask(client, snapshot, sample)
        # Deaths of this run: every worker that left from the submit until the
        # cluster was whole again (the last death is often seen by the poll
        # a moment after result() has already raised).
        sample["events"] = watch.log(start)
        sample["deaths_seen"] = watch.count("left", after=start)
        if "type" in outcome:
            sample["deaths_seen_before_raise"] = watch.count("left", after=start, before=raised_at)
    sample["recovered_s"] = recovered
    if outcome.get("returned"):
        raise AssertionError("W7: the poison task returned a value")
    sample["exception"] = outcome["name"]
    sample["message"] = outcome["message"][:300]
    sample["deaths_reported"] = outcome["deaths"]
    if not issubclass(outcome["type"], expected):
        if outcome["timeout"]:
            raise AssertionError(
                f"W7: result() did not raise within {args.cap:g} s ({sample['deaths_seen']} deaths seen)"
            )
        raise AssertionError(
            f"W7: expected {expected.__module__}.{expected.__qualname__}, got {outcome['name']}: {outcome['message']}"
        )
    sample["seconds"] = raised_at - start
    if recovered is None:
        raise RuntimeError(
            f"W7: the cluster did not get back to {N_WORKERS} workers within 60 s "
            f"(now: {snapshot()}; membership events since the submit: {sample['events']})"
        )
    sample["quiesce_s"] = quiesce(client, system)
    return sample


def _repair_dask(client, snapshot, sample: dict) -> float | None:
    """Seen here on a loaded machine: a dask nanny whose new worker process
    dies while the nanny is still starting it (the poison task reached the
    worker as soon as it registered) closes for good ("nanny-instantiate-
    failed"), and LocalCluster then drops it: the cluster shrinks, to no
    workers at all. Untimed repair: ``cluster.scale(N)`` starts new nannies
    for the missing ones; recorded in the sample (``dask_nannies_lost``)."""
    cluster = client.cluster
    sample["dask_nannies_lost"] = N_WORKERS - sum(
        1 for nanny in list(cluster.workers.values()) if "running" in str(getattr(nanny, "status", ""))
    )
    start = now()
    cluster.scale(N_WORKERS)
    waited = wait_for_workers(snapshot, N_WORKERS, timeout=60)
    sample["dask_rescaled_s"] = None if waited is None else now() - start
    return None if waited is None else 20.0 + (now() - start)


def summarize(samples: list[dict], args: argparse.Namespace) -> dict:
    runs = [s["seconds"] for s in samples]
    return {
        "seconds": median(runs),
        "runs_s": runs,
        "exception": sorted({s["exception"] for s in samples}),
        "deaths_seen": [s["deaths_seen"] for s in samples],
        "deaths_seen_before_raise": [s["deaths_seen_before_raise"] for s in samples],
        "deaths_reported": [s["deaths_reported"] for s in samples],
        "recovered_s": [s["recovered_s"] for s in samples],
        "quiesce_s": [s["quiesce_s"] for s in samples],
        "dask_nannies_lost": [s.get("dask_nannies_lost", 0) for s in samples],
        "message": samples[-1]["message"],
        "events_since_submit": [s["events"] for s in samples],
    }


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[1], add_flags, repeat=3, warmup=1, argv=argv)
    workload = Workload(
        id="W7",
        name="poison task (os._exit(1)): seconds until result() raises KilledWorker",
        cluster={"n_workers": N_WORKERS, "threads_per_worker": 1},
        figures=[Figure("seconds", "s", "lower")],
        run_once=run_once,
        summarize=summarize,
        warmup=warmup,
        params={
            "settle_s": args.settle,
            "cap_s": args.cap,
            "poll_ms": args.poll_ms,
            "pure": False,
            "config": "defaults (trioflow allowed_failures=3 -> 3 deaths; dask allowed-failures=3 -> 4 deaths)",
        },
        measure_cpu=False,
    )
    return run_workload(workload, args)


if __name__ == "__main__":
    main()
