"""W10 — does throughput hold as the map grows, and do workers stay alive?

2 workers x 1 thread; ``client.map(inc, range(N), pure=False)`` then
``gather`` (as W1), for N = 10^3, 10^4, 10^5 (and 10^6 with
``--max-n 1000000``; any list with ``--ns``), one after the other on the
same cluster; results checked; after each N the futures are dropped and the
scheduler is let empty itself (untimed). The cluster is W1's (client and
scheduler in this process, workers under nannies).

Figures: ``tasks_per_s_<N>`` for each N (higher is better; the curve should
stay flat), and for the whole run (every N, the quiescing after each
included; the same counts per N are in ``per_n``, times in seconds since
that N's map call began):

- ``removals`` (trioflow): the scheduler's ``worker <address> left:
  <reason>`` warnings (a worker it declared gone or lost; a worker leaving
  on purpose is logged at info and not counted). Counted by a logging
  handler on the ``trioflow`` logger of this process, where the
  ``LocalCluster``'s scheduler runs: no text parsing of our own output.
- ``reconnects`` (trioflow): lines ``worker ... cannot reach its scheduler``
  that the worker processes wrote. Worker processes (started by the nannies
  of this process) inherit its standard error, so while the trioflow side's
  cluster is open, file descriptor 2 of this process is pointed at a
  temporary file (restored when it closes) and those lines are counted
  there, from the file offset at which each N started.
- ``workers_left``: address-leaves-the-table events of the in-process
  scheduler's worker table, polled every ``--poll-ms`` (10) ms by a thread
  (``_faults.MembershipWatch``) — the same on both sides, so dask has a
  twin figure. A drop and re-registration shorter than a poll is missed
  there (the log counts see it).

Also per N: seconds, the map call's time, every counted log line (first
20), the times of the removals (``removal_at_s``, since that N's map call
began), nanny restarts (``worker pid ... restarting it`` warnings). A failure
at some N (e.g. a worker declared dead and its tasks erring) is reported as
that N's figure (``"failed: ..."``) with the log counts so far, and the
larger Ns are skipped. ``membership_events``: every leave/join seen, in
seconds since the run began.

trioflow also reports the longest stall of the scheduler's loop
(``scheduler_max_stall_s``, from its `LoopLag`) and of each worker's
(``workers_max_stall_s``, from their heartbeats) over the whole run.

``--use-wait`` adds ``wait(futures)`` (the side's own) before ``gather``.
trioflow's ``wait`` used to re-evaluate ``all(f.done() for f in fs)`` each
time a batch of futures completed, in the Trio thread that the
``LocalCluster``'s scheduler then shared with the client: quadratic in N
(at N = 10^5, 150-175 tasks/s against about 3 400 without; README,
"Figures measured"). It is linear now (issue 13), in the client's own
thread.

The dask side (``dask.distributed`` has no figure in shared/benchmarks.md)
runs the same maps; its logs are silenced as in every workload, so its
``removals``/``reconnects`` are null and only ``workers_left`` counts.
Default ``--repeat 1`` (each N once; one run to 10^5 takes minutes on dask),
1 warm-up (a map of 1000).

    python benchmarks/w10_scaling.py [--max-n 100000] [--ns 1000,10000] [--repeat 1] [--no-dask]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _faults import MembershipWatch, membership  # noqa: E402
from _harness import (  # noqa: E402
    TRIOFLOW,
    Figure,
    Side,
    Workload,
    median,
    now,
    open_default,
    parse_args,
    quiesce,
    run_workload,
)

REMOVAL = re.compile(r"^worker (\S+) left: (.*)$")
RECONNECT = "cannot reach its scheduler"
NANNY_RESTART = re.compile(r"^worker pid \S+ .*; restarting it in ")
KEPT_LINES = 20
MAP_TIMEOUT_BASE_S = 120.0  # plus --timeout-per-task-ms for each task


def inc(x):
    return x + 1


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-n", type=int, default=100_000, help="largest N of 10^3, 10^4, 10^5, 10^6 (default 100000)"
    )
    parser.add_argument("--ns", help="comma-separated Ns instead (e.g. 1000,200000); overrides --max-n")
    parser.add_argument("--poll-ms", type=float, default=10.0, help="worker-table poll interval, ms (default 10)")
    parser.add_argument(
        "--timeout-per-task-ms",
        type=float,
        default=10.0,
        help="a map fails after 120 s + N x this (default 10 ms a task)",
    )
    parser.add_argument(
        "--use-wait",
        action="store_true",
        help="call the side's wait(futures) before gather (see the docstring)",
    )


def sizes(args: argparse.Namespace) -> list[int]:
    if args.ns:
        return [int(float(n)) for n in args.ns.split(",")]
    return [n for n in (10**3, 10**4, 10**5, 10**6) if n <= args.max_n]


# --------------------------------------------------------- capturing logs --


class LogCapture(logging.Handler):
    """WARNING and above of the ``trioflow`` loggers of this process, and the
    standard error of the worker processes (through a file on fd 2)."""

    def __init__(self, stderr_path: str):
        super().__init__(level=logging.WARNING)
        self.stderr_path = stderr_path
        self.records: list[tuple[float, str, str]] = []  # (now(), logger name, message)
        self.lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            message = record.getMessage()
            with self.lock_:
                self.records.append((now(), record.name, message))

    def mark(self) -> tuple[int, int]:
        """Where the logs are now: (records seen, bytes of worker stderr)."""
        with self.lock_:
            n = len(self.records)
        return n, os.path.getsize(self.stderr_path)

    def since(self, mark: tuple[int, int], origin: float) -> dict:
        """Counts (and the lines) logged since `mark`; times since `origin` (a `now()`)."""
        with self.lock_:
            records = self.records[mark[0] :]
        with open(self.stderr_path, errors="replace") as f:
            f.seek(mark[1])
            worker_lines = f.read().splitlines()
        removals = [m for _, name, m in records if name == "trioflow.scheduler" and REMOVAL.match(m)]
        restarts = [m for _, name, m in records if name == "trioflow.nanny" and NANNY_RESTART.match(m)]
        reconnects = [line for line in worker_lines if RECONNECT in line]
        others = [f"{name}: {m}" for _, name, m in records if m not in removals and m not in restarts]
        removal_at = [t - origin for t, name, m in records if name == "trioflow.scheduler" and REMOVAL.match(m)]
        return {
            "removals": len(removals),
            "removal_at_s": removal_at[:KEPT_LINES],
            "reconnects": len(reconnects),
            "nanny_restarts": len(restarts),
            "removal_lines": removals[:KEPT_LINES],
            "reconnect_lines": reconnects[:KEPT_LINES],
            "nanny_restart_lines": restarts[:KEPT_LINES],
            "other_warnings": (others + [line for line in worker_lines if RECONNECT not in line])[:KEPT_LINES],
        }


@contextlib.contextmanager
def open_with_logs(side: Side, cluster: dict) -> Iterator:
    """W1's cluster; for trioflow with its logs captured (see the docstring)."""
    if side.system != TRIOFLOW:
        with open_default(side, cluster) as client:
            client._bench_logs = None
            yield client
        return
    fd, path = tempfile.mkstemp(prefix="w10-workers-", suffix=".log")
    capture = LogCapture(path)
    logger = logging.getLogger("trioflow")
    sys.stderr.flush()
    saved_stderr = os.dup(2)
    os.dup2(fd, 2)  # inherited by every worker process started from now on
    logger.addHandler(capture)
    try:
        with open_default(side, cluster) as client:
            client._bench_logs = capture
            yield client
    finally:
        logger.removeHandler(capture)
        sys.stderr.flush()
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)


# ------------------------------------------------------------------ the runs --


def _wait(system: str):
    if system == TRIOFLOW:
        from trioflow import wait
    else:
        from distributed import wait
    return wait


def one_map(client, system: str, n: int, args: argparse.Namespace) -> dict:
    """``map`` then ``gather``, as W1 does. A watchdog thread cancels the
    futures if the map takes longer than its timeout, so that ``gather``
    raises instead of hanging (the same calls on both sides)."""
    timeout = MAP_TIMEOUT_BASE_S + n * args.timeout_per_task_ms / 1e3
    timed_out = threading.Event()
    start = now()
    futures = client.map(inc, range(n), pure=False)
    map_call_s = now() - start

    def watchdog() -> None:
        timed_out.set()
        client.cancel(futures)

    timer = threading.Timer(timeout, watchdog)
    timer.daemon = True
    timer.start()
    try:
        if args.use_wait:
            _wait(system)(futures)
        results = client.gather(futures)
    except Exception as exc:
        if timed_out.is_set():
            raise TimeoutError(f"N={n}: not done within {timeout:g} s (the futures were cancelled)") from exc
        raise
    finally:
        timer.cancel()
    elapsed = now() - start
    if len(results) != n or any(r != i + 1 for i, r in enumerate(results)):
        raise AssertionError(f"W10: wrong results for N={n}")
    del futures, results
    return {"seconds": elapsed, "tasks_per_s": n / elapsed, "map_call_s": map_call_s}


def warmup(client, system: str, args: argparse.Namespace) -> None:
    for _ in range(args.warmup):
        one_map(client, system, 1000, args)
        quiesce(client, system)


def run_once(client, system: str, args: argparse.Namespace) -> dict:
    """Every N in turn; per N: the map's figures and what the logs said."""
    capture: LogCapture | None = getattr(client, "_bench_logs", None)
    snapshot = membership(client, system)
    per_n: dict[str, dict] = {}
    failed_at = None
    run_mark, run_began = (capture.mark() if capture else None), now()
    with MembershipWatch(snapshot, args.poll_ms / 1e3) as watch:
        for n in sizes(args):
            if failed_at is not None:
                per_n[str(n)] = {"error": f"skipped after the failure at N={failed_at}"}
                continue
            mark = capture.mark() if capture else None
            began = now()
            try:
                entry = one_map(client, system, n, args)
            except Exception as exc:
                entry = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
                failed_at = n
            entry["quiesce_s"] = quiesce(client, system, timeout=60)
            entry["workers_left"] = watch.count("left", after=began)
            entry["workers_joined"] = watch.count("joined", after=began)
            if capture:
                entry.update(capture.since(mark, began))
            else:
                entry.update(removals=None, reconnects=None)
            per_n[str(n)] = entry
    # The whole run's counts, from its start until the watch stopped: a
    # stall can come after the last N's window (e.g. while the scheduler
    # forgets 10^5 tasks), and it counts too.
    whole = capture.since(run_mark, run_began) if capture else {"removals": None, "reconnects": None}
    whole["workers_left"] = watch.count("left", after=run_began)
    whole["nanny_restarts"] = whole.get("nanny_restarts")
    whole.update(loop_stalls(client, system))
    return {"per_n": per_n, "whole_run": whole, "membership_events": watch.log(run_began)}


def loop_stalls(client, system: str) -> dict:
    """trioflow: the longest stall of the scheduler's loop (its `LoopLag`,
    in this process) and of each worker's (their heartbeats' metric), s."""
    if system != TRIOFLOW:
        return {}
    out: dict = {}
    cluster = getattr(client, "_bench_cluster", None)
    lag = getattr(getattr(getattr(cluster, "_cluster", None), "scheduler", None), "loop_lag", None)
    if lag is not None:
        out["scheduler_max_stall_s"] = round(lag.max_stall, 4)
    with contextlib.suppress(Exception):
        workers = client.scheduler_info()["workers"]
        out["workers_max_stall_s"] = sorted(round(w["metrics"].get("max_stall_s", 0.0), 4) for w in workers.values())
    return out


def summarize(samples: list[dict], args: argparse.Namespace) -> dict:
    out: dict = {}
    for n in sizes(args):
        entries = [s["per_n"][str(n)] for s in samples]
        errors = [e["error"] for e in entries if "error" in e]
        rates = [e["tasks_per_s"] for e in entries if "tasks_per_s" in e]
        out[f"tasks_per_s_{n}"] = median(rates) if not errors else f"failed: {errors[0]}"
        out[f"runs_tasks_per_s_{n}"] = rates
    for count in ("removals", "reconnects", "workers_left", "nanny_restarts"):
        values = [s["whole_run"].get(count) for s in samples]
        out[count] = None if any(v is None for v in values) else sum(values)
    stalls = [s["whole_run"]["scheduler_max_stall_s"] for s in samples if "scheduler_max_stall_s" in s["whole_run"]]
    if stalls:
        out["scheduler_max_stall_s"] = max(stalls)
    out["whole_run"] = [s["whole_run"] for s in samples]
    out["per_n"] = [s["per_n"] for s in samples]
    out["membership_events"] = [s["membership_events"] for s in samples]
    return out


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[1], add_flags, repeat=1, warmup=1, argv=argv)
    ns = sizes(args)
    workload = Workload(
        id="W10",
        name="scaling: map(inc, range(N), pure=False) for growing N; worker removals and reconnects",
        cluster={"n_workers": 2, "threads_per_worker": 1},
        figures=[Figure(f"tasks_per_s_{n}", "tasks/s", "higher") for n in ns]
        + [
            Figure("removals", "scheduler 'worker ... left:' warnings, whole run", "lower"),
            Figure("reconnects", "workers' 'cannot reach its scheduler' lines, whole run", "lower"),
            Figure("workers_left", "worker-table leave events, whole run", "lower"),
        ],
        run_once=run_once,
        summarize=summarize,
        warmup=warmup,
        params={"ns": ns, "pure": False, "poll_ms": args.poll_ms, "use_wait": args.use_wait},
        open_cluster=open_with_logs,
    )
    return run_workload(workload, args)


if __name__ == "__main__":
    main()
