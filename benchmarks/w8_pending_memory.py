"""W8 — the memory 100 000 pending tasks cost; W8b — cancelling them.

1 worker x 1 thread; the scheduler in its own process on both sides.
Every timed run is a fresh child process of this script (the client), which
starts a fresh scheduler and a fresh worker, each a process of its own:

- trioflow: ``python -m trioflow scheduler --port P`` and
  ``python -m trioflow worker ADDRESS --no-nanny --nthreads 1``;
- dask: ``python -m distributed.cli.dask_scheduler --port P --no-dashboard``
  (what ``dask scheduler`` runs) and ``python -m distributed.cli.dask_worker
  ADDRESS --no-nanny --nthreads 1 --no-dashboard`` (``dask worker``).

Fresh processes every run, client included, so that no run (and no side)
reuses memory a previous one freed. In the child (the client):

1. connect, wait for the worker, warm up untimed (a small map gathered; a
   small map of pending tasks submitted then cancelled);
2. keep the worker's only thread busy: ``block`` (a task that waits for a
   file to appear) is submitted and seen running;
3. RSS of the scheduler process and of the client process (after
   ``gc.collect()``, `--settle` s after the warm-up);
4. ``futures = client.map(sleep_1s, range(100_000), pure=False)`` (each
   task would sleep 1 s); wait until the scheduler holds all 100 001 tasks
   (polled: trioflow ``sum(client.scheduler_info()["tasks"].values())``,
   dask ``client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))``);
   after `--settle` s and ``gc.collect()``, RSS again;
   W8 = scheduler RSS growth / tasks, client RSS growth / futures (bytes);
5. W8b: ``client.cancel(futures + [blocker])`` (every task, the running
   blocker too; its file is created right after the cancel call, so it
   ends at once on the worker), then the scheduler's task count is polled
   (same calls, every 20 ms) until it is 0: seconds from the cancel call.
   The cancel call and the polls run in a thread that the child waits for
   at most `--cap` s (60): dask's cancel call itself waits for its
   scheduler, whose loop is then busy, so a poll could not time it out.
   A run that does not get to 0 within the cap reports "did not finish
   within 60 s" (the figure becomes that string; the ratio is bounded by
   trioflow / cap, ``ratio_at_most``).

What differs: trioflow's scheduler sends up to ``worker_saturation`` (64)
tasks per thread ahead to the worker; dask's (``worker-saturation`` 1.1)
keeps all but about one queued on the scheduler. Both schedulers hold a
record of every task; the state counts at step 4 are in the JSON
(``states``). Default ``--repeat 3`` (medians), no warm-up runs (each run
warms up inside its child, step 1).

    python benchmarks/w8_pending_memory.py [--tasks 100000] [--cap 60] [--repeat 3] [--no-dask]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import DASK, TRIOFLOW, Figure, Workload, median, no_cluster, now, parse_args, run_workload  # noqa: E402

POLL_S = 0.02
BLOCK_LIMIT_S = 900.0  # the blocker gives up by itself after this, should everything else fail


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
    parser.add_argument("--tasks", type=int, default=100_000, help="pending tasks (default 100000)")
    parser.add_argument("--cap", type=float, default=60.0, help="seconds W8b waits for 0 tasks (default 60)")
    parser.add_argument(
        "--settle", type=float, default=1.0, help="seconds before each RSS reading (default 1)"
    )
    parser.add_argument("--child", choices=[TRIOFLOW, DASK], help=argparse.SUPPRESS)  # one run, in a child


# ------------------------------------------------------- the child: servers --


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A scheduler or worker subprocess whose output goes to a log file."""

    def __init__(self, command: list[str], log_path: str):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match:
        deadline = now() + timeout
        while now() < deadline:
            with open(self.log_path, errors="replace") as f:
                match = re.search(pattern, f.read())
            if match:
                return match
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"W8: no {pattern!r} in {self.log_path} (exit code {self.process.poll()}): {self.tail()}")

    def tail(self, n: int = 1500) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return f.read()[-n:]
        return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def start_servers(system: str, logs: str) -> tuple[Server, Server, str]:
    """The scheduler (its address read from its log) and the worker."""
    py = sys.executable
    port = _free_port()
    if system == TRIOFLOW:
        # Authentication is on (the default): one cluster token for the
        # scheduler, the worker and this client, in the environment they
        # inherit (no token file is written in the home directory).
        from trioflow.comm.auth import Credentials

        os.environ.setdefault("TRIOFLOW_TOKEN", Credentials.generate().cluster_token())
        scheduler = Server(
            [py, "-m", "trioflow", "scheduler", "--port", str(port), "--host", "127.0.0.1", "--log-level", "info"],
            os.path.join(logs, "scheduler.log"),
        )
        address = _address(scheduler, r"listening at (tcp://\S+)")
        worker_cmd = [py, "-m", "trioflow", "worker", address, "--no-nanny", "--nthreads", "1",
                      "--host", "127.0.0.1", "--log-level", "warning"]  # fmt: skip
    else:
        scheduler = Server(
            [py, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
             "--no-dashboard", "--dashboard-address", "127.0.0.1:0"],  # fmt: skip
            os.path.join(logs, "scheduler.log"),
        )
        address = _address(scheduler, r"Scheduler at:\s+(tcp://\S+)")
        worker_cmd = [py, "-m", "distributed.cli.dask_worker", address, "--no-nanny", "--nthreads", "1",
                      "--host", "127.0.0.1", "--no-dashboard"]  # fmt: skip
    worker = Server(worker_cmd, os.path.join(logs, "worker.log"))
    return scheduler, worker, address


def _address(scheduler: Server, pattern: str) -> str:
    try:
        return scheduler.wait_for_line(pattern, 60).group(1)
    except BaseException:
        scheduler.stop()
        raise


# --------------------------------------------------------- the child: a run --


def _task_count(client, system: str) -> int:
    if system == TRIOFLOW:
        return sum(client.scheduler_info()["tasks"].values())
    return client.run_on_scheduler(_dask_count)


def _dask_count(dask_scheduler):
    return len(dask_scheduler.tasks)


def _dask_states(dask_scheduler):
    counts: dict = {}
    for ts in dask_scheduler.tasks.values():
        counts[ts.state] = counts.get(ts.state, 0) + 1
    return counts


def _states(client, system: str) -> dict:
    if system == TRIOFLOW:
        return dict(client.scheduler_info()["tasks"])
    return client.run_on_scheduler(_dask_states)


def _wait_count(client, system: str, predicate, timeout: float) -> tuple[float | None, int]:
    """Poll the scheduler's task count until `predicate(count)`; (seconds or None, last count)."""
    start = now()
    count = _task_count(client, system)
    while not predicate(count):
        if now() - start > timeout:
            return None, count
        time.sleep(POLL_S)
        count = _task_count(client, system)
    return now() - start, count


def child(system: str, args: argparse.Namespace) -> dict:
    import psutil

    out: dict = {"system": system}
    logs = tempfile.mkdtemp(prefix=f"w8-{system}-")
    try:
        scheduler, worker, address = start_servers(system, logs)
    except BaseException:
        shutil.rmtree(logs, ignore_errors=True)
        raise
    out["scheduler_pid"], out["worker_pid"] = scheduler.pid, worker.pid
    if system == TRIOFLOW:
        from trioflow import Client
    else:
        from distributed import Client
    release = os.path.join(logs, "release")
    try:
        client = Client(address)
        client.wait_for_workers(1, timeout=60)
        me, sched_proc, worker_proc = psutil.Process(), psutil.Process(scheduler.pid), psutil.Process(worker.pid)

        # 1. warm up: imports, connections, the submit and cancel paths.
        assert client.gather(client.map(inc, range(200), pure=False)) == list(range(1, 201))
        warm_block = client.submit(block, release + ".warm", 60.0, pure=False)
        _wait_for_file(release + ".warm.started", 60)
        warm = client.map(sleep_1s, range(200), pure=False)
        _wait_count(client, system, lambda c: c >= 201, 60)
        client.cancel(warm + [warm_block])
        open(release + ".warm", "w").close()
        del warm, warm_block
        if _wait_count(client, system, lambda c: c == 0, 60)[0] is None:
            raise RuntimeError("W8 warm-up: the scheduler did not forget 201 cancelled tasks within 60 s")

        # 2. the blocker holds the only thread.
        blocker = client.submit(block, release, BLOCK_LIMIT_S, pure=False)
        _wait_for_file(release + ".started", 60)

        # 3. before.
        time.sleep(args.settle)
        gc.collect()
        sched_before, client_before, worker_before = (p.memory_info().rss for p in (sched_proc, me, worker_proc))

        # 4. 100 000 pending tasks.
        start = now()
        futures = client.map(sleep_1s, range(args.tasks), pure=False)
        out["map_call_s"] = now() - start
        held_s, count = _wait_count(client, system, lambda c: c >= args.tasks + 1, 300)
        if held_s is None:
            raise RuntimeError(f"W8: the scheduler holds {count} of {args.tasks + 1} tasks after 300 s")
        out["all_held_s"] = now() - start
        time.sleep(args.settle)
        gc.collect()
        sched_after, client_after, worker_after = (p.memory_info().rss for p in (sched_proc, me, worker_proc))
        out["states"] = _states(client, system)
        out["scheduler_rss_before"], out["scheduler_rss_after"] = sched_before, sched_after
        out["client_rss_before"], out["client_rss_after"] = client_before, client_after
        out["worker_rss_growth"] = worker_after - worker_before
        out["scheduler_bytes_per_task"] = (sched_after - sched_before) / args.tasks
        out["client_bytes_per_future"] = (client_after - client_before) / args.tasks

        # 5. W8b: cancel everything; time until the scheduler holds nothing.
        result: dict = {}

        def cancel_and_wait() -> None:
            try:
                t0 = now()
                client.cancel(futures + [blocker])
                result["cancel_call_s"] = now() - t0
                open(release, "w").close()
                while True:
                    result["last_count"] = count = _task_count(client, system)
                    result["last_poll_s"] = now() - t0
                    if count == 0:
                        result["cancel_s"] = now() - t0
                        return
                    time.sleep(POLL_S)
            except BaseException as exc:  # reported, not raised: this is a daemon thread
                result["error"] = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=cancel_and_wait, name="w8b-cancel", daemon=True)
        started = now()
        thread.start()
        thread.join(args.cap)
        out["cancel_waited_s"] = now() - started
        if "error" in result:
            raise RuntimeError(f"W8b: {result['error']}")
        out["cancel_call_s"] = result.get("cancel_call_s")
        if "cancel_s" in result and result["cancel_s"] <= args.cap:
            out["cancel_s"] = result["cancel_s"]
        else:
            out["cancel_s"] = None
            out["cancel_last_count"] = result.get("last_count")
            out["cancel_last_poll_s"] = result.get("last_poll_s")
        with contextlib.suppress(OSError):
            open(release, "w").close()
        return out
    except BaseException as exc:
        raise RuntimeError(
            f"{type(exc).__name__}: {exc}\n--- scheduler log tail:\n{scheduler.tail()}"
            f"\n--- worker log tail:\n{worker.tail()}"
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            open(release, "w").close()
        for server in (worker, scheduler):
            server.stop()
        shutil.rmtree(logs, ignore_errors=True)


def _wait_for_file(path: str, timeout: float) -> None:
    deadline = now() + timeout
    while not os.path.exists(path):
        if now() > deadline:
            raise RuntimeError(f"W8: {os.path.basename(path)} did not appear within {timeout:g} s")
        time.sleep(0.005)


def child_main(args: argparse.Namespace) -> None:
    """One run in this (child) process: print its sample as one JSON line, exit."""
    try:
        sample = child(args.child, args)
    except BaseException as exc:
        import traceback

        sample = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
    print(json.dumps(sample), flush=True)
    # Without waiting for the client to close: a dask scheduler still busy
    # cancelling (it was stopped above) must not hold this process up.
    os._exit(0)


# ------------------------------------------------------------ the parent --


def run_once(client, system: str, args: argparse.Namespace) -> dict:
    """One run: a child process of this script does it (see the docstring)."""
    command = [sys.executable, os.path.abspath(__file__), "--child", system, "--tasks", str(args.tasks),
               "--cap", str(args.cap), "--settle", str(args.settle)]  # fmt: skip
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, start_new_session=True
        )
        try:
            stdout, _ = process.communicate(timeout=args.cap + 600)
        except subprocess.TimeoutExpired:
            stdout = b""
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # anything the child left in its own group
            process.wait()
        stderr.seek(0)
        err_tail = stderr.read()[-1500:].decode(errors="replace")
    lines = [line for line in stdout.decode(errors="replace").splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"W8: the child printed no result (exit code {process.returncode}): {err_tail}")
    sample = json.loads(lines[-1])
    if "error" in sample:
        raise RuntimeError(f"W8 child ({system}): {sample['error']}\n{sample.get('traceback', '')}")
    return sample


def summarize(samples: list[dict], args: argparse.Namespace) -> dict:
    finished = [s["cancel_s"] for s in samples if s["cancel_s"] is not None]
    missed = len(samples) - len(finished)
    return {
        "scheduler_bytes_per_task": median([s["scheduler_bytes_per_task"] for s in samples]),
        "client_bytes_per_future": median([s["client_bytes_per_future"] for s in samples]),
        "cancel_s": median(finished)
        if not missed
        else f"did not finish within {args.cap:g} s ({missed}/{len(samples)} runs)",
        "runs_scheduler_bytes_per_task": [s["scheduler_bytes_per_task"] for s in samples],
        "runs_client_bytes_per_future": [s["client_bytes_per_future"] for s in samples],
        "runs_cancel_s": [s["cancel_s"] for s in samples],
        "runs_cancel_call_s": [s["cancel_call_s"] for s in samples],
        "runs_cancel_last_count": [s.get("cancel_last_count") for s in samples],  # when not finished
        "runs_cancel_last_poll_s": [s.get("cancel_last_poll_s") for s in samples],  # (that count's answer)
        "runs_map_call_s": [s["map_call_s"] for s in samples],
        "runs_all_held_s": [s["all_held_s"] for s in samples],
        "runs_worker_rss_growth": [s["worker_rss_growth"] for s in samples],
        "scheduler_rss": [[s["scheduler_rss_before"], s["scheduler_rss_after"]] for s in samples],
        "client_rss": [[s["client_rss_before"], s["client_rss_after"]] for s in samples],
        "states": [s["states"] for s in samples],
        "cap_s": args.cap,
    }


def postprocess(line: dict) -> None:
    """When dask never got to 0 tasks within the cap, bound the ratio by trioflow / cap."""
    for row in line["figures"]:
        if row["figure"] != "cancel_s":
            continue
        mine, theirs = row.get(TRIOFLOW), row.get(DASK)
        if isinstance(mine, (int, float)) and isinstance(theirs, str):
            cap = line["results"][DASK].get("cap_s")
            if cap:
                row["ratio_at_most"] = round(mine / cap, 6)
                line["ratios"]["cancel_s_at_most"] = row["ratio_at_most"]


def describe_layout(system: str) -> dict:
    if system == TRIOFLOW:
        scheduler, worker = "python -m trioflow scheduler", "python -m trioflow worker --no-nanny"
    else:
        scheduler, worker = "python -m distributed.cli.dask_scheduler", "python -m distributed.cli.dask_worker --no-nanny"
    return {
        "client": "a fresh child process of this script per run",
        "scheduler": f"its own process ({scheduler})",
        "worker": f"its own process, no nanny ({worker})",
    }


def main(argv=None) -> dict | None:
    args = parse_args(__doc__.splitlines()[1], add_flags, repeat=3, warmup=0, argv=argv)
    if args.child:
        child_main(args)
        return None
    workload = Workload(
        id="W8",
        name=f"{args.tasks} pending tasks (1 worker kept busy): RSS per task; W8b: cancel them all",
        cluster={"n_workers": 1, "threads_per_worker": 1},
        figures=[
            Figure("scheduler_bytes_per_task", "bytes (scheduler RSS growth / tasks)", "lower"),
            Figure("client_bytes_per_future", "bytes (client RSS growth / futures)", "lower"),
            Figure("cancel_s", "s (W8b: cancel -> scheduler holds 0 tasks)", "lower"),
        ],
        run_once=run_once,
        summarize=summarize,
        params={"tasks": args.tasks, "cap_s": args.cap, "settle_s": args.settle, "pure": False},
        measure_cpu=False,
        postprocess=postprocess,
        open_cluster=no_cluster,
        describe_layout=describe_layout,
    )
    return run_workload(workload, args)


if __name__ == "__main__":
    main()
