"""Profile trioflow on W1 (map(inc, range(N)) + gather, 2 workers x 1 thread), or W2.

Not a benchmark (run_all.py skips it): a tool for finding where trioflow's
time goes. Trioflow side only. During the timed runs it records:

* CPU seconds per thread of this process (the client's Trio thread
  "trioflow-client", the cluster's "trioflow-cluster" = scheduler + nannies,
  the main thread) and of each worker process (psutil);
* ``--mode cprofile``: a cProfile of each Trio loop thread (enabled from
  inside the thread, for the timed runs only); deterministic, but its
  overhead inflates Python-heavy code;
* ``--mode pyspy`` (needs ``pip install py-spy`` and ptrace rights): py-spy
  samples of this process (per thread) and of every worker process; low
  overhead. In both modes the workers are sampled with py-spy if it exists.

    python benchmarks/profile_w1.py --mode cprofile --out /tmp/prof
    python benchmarks/profile_w1.py --mode pyspy --out /tmp/prof
    python benchmarks/profile_w1.py --no-profile --switch-interval 0.0005   # GIL experiment
    TRIOFLOW_WORKER_SATURATION=inf python benchmarks/profile_w1.py --no-profile

Writes ``<out>/*.prof`` / ``<out>/*.txt`` (collapsed stacks) and prints a
summary: top functions by cumulative share of each thread / process.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import io
import json
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import now, pin_apart, quiesce, trioflow_client, worker_pids  # noqa: E402


def inc(x):
    return x + 1


def one_run_w2(client, n: int) -> float:
    """W2 instead: `n` sequential submit(...).result() round trips."""
    start = now()
    for i in range(n):
        assert client.submit(inc, i, pure=False).result() == i + 1
    return now() - start


def one_run(client, n: int) -> float:
    start = now()
    futures = client.map(inc, range(n), pure=False)
    results = client.gather(futures)
    elapsed = now() - start
    assert len(results) == n and results[-1] == n
    del futures, results
    return elapsed


# ------------------------------------------------------------ CPU by thread --


def thread_names() -> dict[int, str]:
    return {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}


def thread_cpu() -> dict[str, float]:
    import psutil

    names = thread_names()
    out: dict[str, float] = collections.defaultdict(float)
    for t in psutil.Process().threads():
        out[names.get(t.id, f"other-{t.id}")] += t.user_time + t.system_time
    return dict(out)


def schedstat(pid: int) -> dict[str, tuple[float, float, int]]:
    """Per thread of `pid`: (seconds on a CPU, seconds runnable but waiting
    for a CPU, context switches, seconds in the kernel), from
    /proc/PID/task/TID/schedstat and .../stat. A thread
    blocked on the GIL is *sleeping* (a futex), so it shows in neither: wall
    - cpu - runqueue wait = time asleep (idle, or waiting for the GIL)."""
    out = {}
    names = thread_names() if pid == os.getpid() else {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    on_cpu, waiting, slices = f.read().split()
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    comm = f.read().strip()
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
                ticks = os.sysconf("SC_CLK_TCK")
                system_s = int(fields[12]) / ticks  # stime: field 15 of stat
                name = names.get(int(tid), comm if int(tid) != pid else "main")
                key = name if name not in out else f"{name}-{tid}"
                out[key] = (int(on_cpu) / 1e9, int(waiting) / 1e9, int(slices), system_s)
    return out


def schedstat_delta(before: dict, after: dict, wall: float) -> dict:
    out = {}
    for name, (cpu1, wait1, n1, sys1) in after.items():
        cpu0, wait0, n0, sys0 = before.get(name, (0.0, 0.0, 0, 0.0))
        cpu, wait = cpu1 - cpu0, wait1 - wait0
        if cpu + wait > 0.005 * wall:
            out[name] = {
                "cpu_frac": round(cpu / wall, 3),
                "kernel_cpu_frac": round((sys1 - sys0) / wall, 3),
                "runqueue_wait_frac": round(wait / wall, 3),
                "switches_per_s": round((n1 - n0) / wall),
            }
    return out


def process_cpu(pids: list[int]) -> dict[int, float]:
    import psutil

    out = {}
    for pid in pids:
        with contextlib.suppress(Exception):
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
    return out


# ------------------------------------------------------------------ py-spy --


class PySpy:
    """``py-spy record`` on a pid, collapsed output, stopped with SIGINT."""

    def __init__(self, pid: int, path: str, rate: int, threads: bool):
        self.path = path
        command = ["py-spy", "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "-o", path]
        command += ["--nonblocking"]
        if threads:
            command.append("--threads")
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_LINE = re.compile(r":\d+\)")


def collapsed_summary(path: str, top: int, seconds: float, rate: int) -> dict:
    """Inclusive and self sample shares per function, per thread, from a
    py-spy collapsed-stack file (function names keep their file, not line)."""
    by_thread: dict[str, dict] = {}
    if not os.path.exists(path):
        return {"error": f"no {path}"}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count_text = line.rpartition(" ")
            count = int(count_text)
            frames = stack.split(";")
            thread = "all"
            if frames and frames[0].startswith(("thread ", "process ")):
                # "process N:..." then maybe "thread (0x..)"
                while frames and frames[0].startswith(("thread ", "process ")):
                    if frames[0].startswith("thread "):
                        thread = frames[0]
                    frames = frames[1:]
            entry = by_thread.setdefault(
                thread, {"samples": 0, "inclusive": collections.Counter(), "self": collections.Counter()}
            )
            entry["samples"] += count
            seen = set()
            for frame in frames:
                name = _LINE.sub(")", frame)
                if name not in seen:
                    entry["inclusive"][name] += count
                    seen.add(name)
            if frames:
                entry["self"][_LINE.sub(")", frames[-1])] += count
    out = {}
    for thread, entry in sorted(by_thread.items(), key=lambda kv: -kv[1]["samples"]):
        total = entry["samples"]
        out[thread] = {
            "active_samples": total,
            "active_frac_of_wall": total / (seconds * rate) if seconds > 0 else None,
            "top_inclusive": [(name, round(100 * c / total, 1)) for name, c in entry["inclusive"].most_common(top)],
            "top_self": [(name, round(100 * c / total, 1)) for name, c in entry["self"].most_common(top)],
        }
    return out


# ---------------------------------------------------------------- cProfile --


def cprofile_summary(profile: cProfile.Profile, path: str, top: int) -> str:
    profile.dump_stats(path)
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return text.getvalue()


# -------------------------------------------------------------------- main --


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("w1", "w2"), default="w1", help="w2: 1 worker, sequential round trips")
    parser.add_argument("--tasks", type=int, default=None, help="tasks per run (w1: 20000, w2: 500)")
    parser.add_argument("--runs", type=int, default=2, help="timed (profiled) runs")
    parser.add_argument("--mode", choices=("cprofile", "pyspy"), default="cprofile")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default="profile-w1")
    parser.add_argument(
        "--switch-interval", type=float, help="sys.setswitchinterval for this process (GIL experiment)"
    )
    parser.add_argument("--no-profile", action="store_true", help="CPU/schedstat accounting only, no profiler")
    parser.add_argument(
        "--pin", action="store_true",
        help="this process on the first CPU, the workers on the others, after the warm-up (as toggle_ab.py --pin)",
    )
    args = parser.parse_args(argv)
    if args.tasks is None:
        args.tasks = 20_000 if args.workload == "w1" else 500
    run = one_run if args.workload == "w1" else one_run_w2
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    os.makedirs(args.out, exist_ok=True)
    have_pyspy = shutil.which("py-spy") is not None
    if args.mode == "pyspy" and not have_pyspy:
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 0

    report: dict = {
        "workload": args.workload,
        "mode": "none" if args.no_profile else args.mode,
        "tasks": args.tasks,
        "runs": args.runs,
        "switch_interval": sys.getswitchinterval(),
        "pinned": args.pin,
        "trioflow_env": {k: v for k, v in os.environ.items() if k.startswith("TRIOFLOW_")},
    }
    spies: list[tuple[str, PySpy]] = []
    profiles: dict[str, cProfile.Profile] = {}
    with trioflow_client(n_workers=2 if args.workload == "w1" else 1, threads_per_worker=1) as client:
        cluster = client._bench_cluster
        loops = {"trioflow-client": client._loop, "trioflow-cluster": cluster._loop}
        run(client, args.tasks)  # warm-up
        quiesce(client, "trioflow")
        if args.pin:
            pin_apart()
        pids = worker_pids(client, "trioflow")
        report["worker_pids"] = pids
        try:
            if have_pyspy and not args.no_profile:
                for i, pid in enumerate(pids):
                    spies.append((f"worker{i}", PySpy(pid, f"{args.out}/worker{i}.txt", args.rate, True)))
                if args.mode == "pyspy":
                    spies.append(("main", PySpy(os.getpid(), f"{args.out}/main.txt", args.rate, True)))
                time.sleep(1.0)  # let py-spy attach
            if args.mode == "cprofile" and not args.no_profile:
                for name, loop in loops.items():
                    profiles[name] = cProfile.Profile()
                    loop.run_sync(profiles[name].enable)
            sched0 = {p: schedstat(p) for p in [os.getpid(), *pids]}
            cpu0, procs0, t0 = thread_cpu(), process_cpu(pids), now()
            runs = []
            for _ in range(args.runs):
                runs.append(run(client, args.tasks))
            wall = now() - t0
            cpu1, procs1 = thread_cpu(), process_cpu(pids)
            sched1 = {p: schedstat(p) for p in [os.getpid(), *pids]}
            for name, loop in loops.items():
                if name in profiles:
                    loop.run_sync(profiles[name].disable)
        finally:
            for _, spy in spies:
                spy.stop()
        report["runs_s"] = [round(r, 3) for r in runs]
        report["tasks_per_s"] = [round(args.tasks / r, 1) for r in runs]
        report["wall_s"] = round(wall, 3)
        report["thread_cpu_frac"] = {
            name: round((cpu1.get(name, 0) - cpu0.get(name, 0)) / wall, 3)
            for name in sorted(set(cpu0) | set(cpu1))
            if cpu1.get(name, 0) - cpu0.get(name, 0) > 0.005 * wall
        }
        report["worker_cpu_frac"] = {
            str(pid): round((procs1.get(pid, 0) - procs0.get(pid, 0)) / wall, 3) for pid in pids
        }
        report["schedstat"] = {
            ("main-process" if p == os.getpid() else f"worker-{p}"): schedstat_delta(sched0[p], sched1[p], wall)
            for p in sched0
        }
        quiesce(client, "trioflow")

    for name, profile in profiles.items():
        text = cprofile_summary(profile, f"{args.out}/{name}.prof", args.top)
        with open(f"{args.out}/{name}.cprofile.txt", "w") as f:
            f.write(text)
    spied_seconds = wall + 1.0
    report["pyspy"] = {
        label: collapsed_summary(spy.path, args.top, spied_seconds, args.rate) for label, spy in spies
    }
    with open(f"{args.out}/report.json", "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "pyspy"}, indent=1))
    for label, threads in report["pyspy"].items():
        print(f"\n=== py-spy {label}")
        if "error" in threads:
            print(threads["error"])
            continue
        for thread, summary in list(threads.items())[:3]:
            print(f"-- {thread}: {summary['active_samples']} active samples, "
                  f"~{summary['active_frac_of_wall']:.2f} of wall busy")
            for name, pct in summary["top_inclusive"][:15]:
                print(f"   {pct:5.1f}%  {name}")
    for name in profiles:
        print(f"\n=== cProfile {name}: see {args.out}/{name}.cprofile.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
