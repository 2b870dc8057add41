"""W8c — releasing by dropping futures: is it linear in N?

Issue 13 asks that releasing N pending tasks by dropping their futures cost
time linear in N. The layout of W8 (`w8_pending_memory.py`): scheduler and
worker in processes of their own (trioflow ``python -m trioflow scheduler``
/ ``worker --no-nanny``; dask its CLI modules), 1 worker x 1 thread held by
a blocking task, the client here. For each N of ``--ns`` (default 10^4,
10^5, 2x10^5), on the same servers:

1. ``futures = client.map(sleep_1s, range(N), pure=False)``; wait until the
   scheduler holds all N tasks (plus the blocker), polled as in W8;
2. ``del futures`` (and ``gc.collect()``), then poll the scheduler's task
   count every 20 ms until it holds only the blocker: ``release_s``.

Figures: ``release_s_<N>`` (lower), and ``us_per_task_<N>`` = release_s /
N in microseconds: flat across N means linear. A size that does not get
there within ``--cap`` s (60) reports "did not finish within 60 s".
Default ``--repeat 1`` (each N once, in a fresh child process per side),
no warm-up runs (the child warms up: a small map gathered, a small map
released).

    python benchmarks/w8c_release.py [--ns 10000,100000,200000] [--cap 60] [--no-dask]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import DASK, TRIOFLOW, Figure, Workload, median, no_cluster, now, parse_args, run_workload  # noqa: E402
from w8_pending_memory import POLL_S, _wait_count, _wait_for_file, start_servers  # noqa: E402

import cloudpickle  # noqa: E402
import w8_pending_memory  # noqa: E402

# W8's helpers (its scheduler-side task count among them) travel by value:
# dask's scheduler process cannot import this directory's modules.
cloudpickle.register_pickle_by_value(w8_pending_memory)


# The task functions are W8's, written again on purpose: dask pickles a
# function of an importable module by reference, and its scheduler cannot
# import this directory (imported from w8_pending_memory, the dask side
# fails to deserialize its graph); defined here, in __main__, they travel
# by value.


def sleep_1s(i):
    import time

    time.sleep(1.0)
    return i


def inc(x):
    return x + 1


def block(path, limit_s):
    """Hold the worker's thread until `path` exists (or `limit_s` passed)."""
    import os
    import time

    open(path + ".started", "w").close()
    deadline = time.monotonic() + limit_s
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ns", default="10000,100000,200000", help="task counts (default 10000,100000,200000)")
    parser.add_argument("--cap", type=float, default=60.0, help="seconds a release may take (default 60)")
    parser.add_argument("--child", choices=[TRIOFLOW, DASK], help=argparse.SUPPRESS)


def sizes(args: argparse.Namespace) -> list[int]:
    return [int(float(n)) for n in args.ns.split(",")]


def child(system: str, args: argparse.Namespace) -> dict:
    out: dict = {"system": system, "per_n": {}}
    logs = tempfile.mkdtemp(prefix=f"w8c-{system}-")
    scheduler, worker, address = start_servers(system, logs)
    if system == TRIOFLOW:
        from trioflow import Client
    else:
        from distributed import Client
    release = os.path.join(logs, "release")
    try:
        client = Client(address)
        client.wait_for_workers(1, timeout=60)
        assert client.gather(client.map(inc, range(200), pure=False)) == list(range(1, 201))
        blocker = client.submit(block, release, 3600.0, pure=False)
        _wait_for_file(release + ".started", 60)
        warm = client.map(sleep_1s, range(200), pure=False)
        _wait_count(client, system, lambda c: c >= 201, 60)
        del warm
        gc.collect()
        _wait_count(client, system, lambda c: c == 1, 60)
        for n in sizes(args):
            futures = client.map(sleep_1s, range(n), pure=False)
            held_s, count = _wait_count(client, system, lambda c, n=n: c >= n + 1, 600)
            if held_s is None:
                raise RuntimeError(f"W8c: the scheduler holds {count} of {n + 1} tasks after 600 s")
            time.sleep(0.5)
            t0 = now()
            del futures
            gc.collect()
            drop_call_s = now() - t0
            seconds, left = _wait_count(client, system, lambda c: c <= 1, args.cap)
            out["per_n"][str(n)] = {
                "release_s": None if seconds is None else drop_call_s + seconds,
                "drop_call_s": drop_call_s,
                "left_at_cap": None if seconds is not None else left,
            }
            if seconds is None:
                break
            time.sleep(POLL_S)
        out["blocker"] = blocker.key  # held until here: the worker's thread stays busy
        return out
    finally:
        with contextlib.suppress(OSError):
            open(release, "w").close()
        for server in (worker, scheduler):
            server.stop()
        shutil.rmtree(logs, ignore_errors=True)


def child_main(args: argparse.Namespace) -> None:
    try:
        sample = child(args.child, args)
    except BaseException as exc:
        import traceback

        sample = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
    print(json.dumps(sample), flush=True)
    os._exit(0)


def run_once(client, system: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", system, "--ns", args.ns, "--cap", str(args.cap)]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
    try:
        stdout, _ = process.communicate(timeout=3600)
    except subprocess.TimeoutExpired:
        stdout = b""
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    lines = [line for line in stdout.decode(errors="replace").splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"W8c: the child printed no result (exit code {process.returncode})")
    sample = json.loads(lines[-1])
    if "error" in sample:
        raise RuntimeError(f"W8c child ({system}): {sample['error']}\n{sample.get('traceback', '')}")
    return sample


def summarize(samples: list[dict], args: argparse.Namespace) -> dict:
    out: dict = {}
    for n in sizes(args):
        entries = [s["per_n"].get(str(n)) for s in samples]
        done = [e["release_s"] for e in entries if e and e["release_s"] is not None]
        if len(done) == len(entries):
            out[f"release_s_{n}"] = median(done)
            out[f"us_per_task_{n}"] = median(done) / n * 1e6
        else:
            out[f"release_s_{n}"] = f"did not finish within {args.cap:g} s"
            out[f"us_per_task_{n}"] = None
    out["per_n"] = [s["per_n"] for s in samples]
    return out


def describe_layout(system: str) -> dict:
    return {
        "client": "a fresh child process of this script per side",
        "scheduler": "its own process (as W8)",
        "worker": "its own process, no nanny, its thread held by a blocking task (as W8)",
    }


def main(argv=None) -> dict | None:
    args = parse_args(__doc__.splitlines()[1], add_flags, repeat=1, warmup=0, argv=argv)
    if args.child:
        child_main(args)
        return None
    ns = sizes(args)
    workload = Workload(
        id="W8c",
        name="releasing N pending tasks by dropping their futures (W8's layout)",
        cluster={"n_workers": 1, "threads_per_worker": 1},
        figures=[Figure(f"release_s_{n}", "s (del futures -> scheduler holds only the blocker)", "lower") for n in ns]
        + [Figure(f"us_per_task_{n}", "microseconds per task (flat = linear)", "lower") for n in ns],
        run_once=run_once,
        summarize=summarize,
        params={"ns": ns, "cap_s": args.cap, "pure": False},
        measure_cpu=False,
        open_cluster=no_cluster,
        describe_layout=describe_layout,
    )
    return run_workload(workload, args)


if __name__ == "__main__":
    main()
