"""Shared helpers for the trioflow-vs-dask.distributed benchmarks.

Every ``benchmarks/w*.py`` script runs one workload (shared/benchmarks.md,
W1..W12) on trioflow and, when ``import distributed`` works and ``--no-dask``
was not given, on dask.distributed too, in the same process run, and prints
ONE JSON line: both sides' figures and the ratios trioflow/dask. The ratio is
the figure that counts: the machines are shared and absolute times drift.

Layout on both sides: client and scheduler in this process, workers as
subprocesses under nannies that live in this process and restart them
(trioflow: ``LocalCluster(nanny=True)``, the default, whose nannies start
``python -m trioflow worker --no-nanny`` children; dask:
``LocalCluster(processes=True)``). A workload may open its clusters itself
(``Workload.open_cluster``): W8 runs scheduler and worker as processes of
their own, W9 starts and closes a cluster in every timed run.

Benchmarks never fail CI: a side that breaks is reported in the JSON line
(``"error"``), and the script still exits 0 unless ``--strict`` is given.

Sides run one after the other (each: start cluster, warm up, timed runs,
close), or with ``--interleave`` all clusters open at once and the timed runs
alternating between sides. Each timed run also records CPU seconds of this
process (client + scheduler) and of the worker processes (``"cpu"``).

A workload script looks like::

    def inc(x):               # defined in the script: pickled by value
        return x + 1

    def run_once(client, system, args):
        ...                   # ONE timed run, with `now()`; return a sample dict

    def summarize(samples, args):
        return {"tasks_per_s": ...}    # the figures, from that side's samples

    if __name__ == "__main__":
        args = parse_args("W1 ...", add_flags)
        run_workload(Workload(id="W1", name="throughput",
                              cluster={"n_workers": 2, "threads_per_worker": 1},
                              figures=[Figure("tasks_per_s", "tasks/s", "higher")],
                              run_once=run_once, summarize=summarize), args)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

#: The clock every benchmark uses (monotonic, high resolution).
now = time.perf_counter

TRIOFLOW = "trioflow"
DASK = "dask"


# ----------------------------------------------------------------- statistics --


def median(values: Sequence[float]) -> float:
    """The median of `values` (NaN if empty)."""
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) by linear interpolation, like numpy's default."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def p99(values: Sequence[float]) -> float:
    return percentile(values, 99.0)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or `b` is zero."""
    if a is None or b is None or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return None
    if b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


class Timer:
    """``with Timer() as t: ...``; then ``t.seconds``."""

    def __enter__(self) -> Timer:
        self.start = now()
        self.seconds = math.nan
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.seconds = now() - self.start


# ------------------------------------------------------------------ arguments --


def parse_args(
    description: str,
    add_flags: Callable[[argparse.ArgumentParser], None] | None = None,
    *,
    repeat: int = 3,
    warmup: int = 1,
    argv: Sequence[str] | None = None,
) -> argparse.Namespace:
    """The common command line; `add_flags` adds the workload's size flags."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--no-dask", action="store_true", help="run the trioflow side only")
    parser.add_argument("--no-trioflow", action="store_true", help="run the dask side only")
    parser.add_argument(
        "--repeat", type=int, default=repeat, help=f"timed runs per side; the median is reported (default {repeat})"
    )
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed warm-up runs (default {warmup})")
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="open every side's cluster at once and alternate the timed runs between sides "
        "(fairer when the machine's load drifts; idle clusters cost a little)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 if a side failed (by default benchmarks never fail)"
    )
    parser.add_argument("--pretty", action="store_true", help="indent the JSON (it is then more than one line)")
    if add_flags is not None:
        add_flags(parser)
    return parser.parse_args(argv)


# -------------------------------------------------------------------- clusters --


def dask_available() -> bool:
    try:
        import distributed  # noqa: F401
    except Exception:
        return False
    return True


@contextlib.contextmanager
def trioflow_client(n_workers: int, threads_per_worker: int = 1, **cluster_kwargs: Any) -> Iterator[Any]:
    """A trioflow `LocalCluster` (worker subprocesses) and a `Client`; both closed on exit."""
    import trioflow

    with trioflow.LocalCluster(
        n_workers=n_workers, threads_per_worker=threads_per_worker, **cluster_kwargs
    ) as cluster, trioflow.Client(cluster) as client:
        client._bench_cluster = cluster  # for worker pids (profiling)
        yield client


@contextlib.contextmanager
def dask_client(
    n_workers: int, threads_per_worker: int = 1, config: dict[str, Any] | None = None, **cluster_kwargs: Any
) -> Iterator[Any]:
    """A dask.distributed ``LocalCluster(processes=True)`` and a ``Client``; both closed on exit.

    `config` (e.g. ``{"distributed.scheduler.worker-saturation": float("inf")}``)
    is in force while the cluster is created and used.
    """
    import logging

    import dask
    from distributed import Client, LocalCluster

    with dask.config.set(config or {}):
        with LocalCluster(
            processes=True,
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            host="127.0.0.1",
            dashboard_address=None,  # no dashboard ...
            # ... but the scheduler's plain HTTP server (/health) still starts,
            # on port 8787 by default: loopback, any free port, so that two
            # clusters (--interleave) do not collide.
            scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
            silence_logs=logging.CRITICAL,  # a loaded machine makes dask log megabytes
            **cluster_kwargs,
        ) as cluster, Client(cluster) as client:
            yield client


def worker_pids(client: Any, side: str) -> list[int]:
    """The OS pids of the worker processes behind `client` (best effort)."""
    try:
        if side == TRIOFLOW:
            cluster = getattr(client, "_bench_cluster", None) or client.cluster
            pids = []
            for handle in cluster.workers.values():  # WorkerProcess, Nanny, ...
                pid = getattr(handle, "worker_pid", None) or getattr(handle, "pid", None)
                if isinstance(pid, int):
                    pids.append(pid)
            if pids:
                return pids
            # Fallback: our child processes running ``trioflow worker``.
            import psutil

            return [
                p.pid
                for p in psutil.Process().children(recursive=True)
                if "trioflow" in " ".join(p.cmdline()) and "worker" in p.cmdline()
            ]
        return sorted(client.run(os.getpid).values())
    except Exception:
        return []


def quiesce(client: Any, side: str, timeout: float = 30.0) -> float:
    """Drop garbage and wait (up to `timeout` s) until the scheduler holds no
    tasks, so that one timed run does not pay for forgetting the last one.
    Best effort: returns the seconds waited (NaN if it could not tell)."""
    gc.collect()
    start = now()
    deadline = start + timeout
    while now() < deadline:
        try:
            if side == TRIOFLOW:
                counts = client.scheduler_info().get("tasks", {})
                held = sum(counts.values()) if isinstance(counts, dict) else int(counts)
            else:
                held = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
        except Exception:
            return math.nan
        if held == 0:
            return now() - start
        time.sleep(0.02)
    return now() - start


# -------------------------------------------------------------------- running --


@dataclasses.dataclass(frozen=True)
class Figure:
    """One reported figure: a key in what `measure` returns."""

    name: str
    unit: str
    better: str  # "higher" or "lower"


@dataclasses.dataclass(frozen=True)
class Side:
    """One column of the comparison: a system and how its cluster is set up."""

    label: str  # "trioflow", "dask", "dask_saturation_inf", ...
    system: str  # TRIOFLOW or DASK
    config: dict[str, Any] | None = None  # dask config for this side
    note: str = ""


def _trioflow_source_hash() -> str | None:
    """A short hash of the trioflow package's source files as they are on
    disk now. The working tree may be edited while a benchmark runs, and
    worker processes started later (nanny restarts) import whatever is on
    disk then: a hash that differs between the start and the end of a run
    says the run may have mixed two versions."""
    try:
        import hashlib
        import importlib.util

        spec = importlib.util.find_spec("trioflow")
        root = os.path.dirname(spec.origin)
        digest = hashlib.sha1()
        for folder, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    digest.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as f:
                        digest.update(f.read())
        return digest.hexdigest()[:12]
    except Exception:
        return None


_SOURCE_AT_START = _trioflow_source_hash()


def _compile_trioflow() -> str:
    """Compile trioflow's sources to bytecode (``__pycache__``), as pip
    does for dask's when it installs the wheel.

    An editable install has no bytecode, and with PYTHONDONTWRITEBYTECODE=1
    (set on these machines) Python never writes any: every worker process
    would compile trioflow from source at start (about 0.1 s of CPU each),
    while dask's workers load bytecode. Reading bytecode is allowed under
    that variable, so compiling once here puts both sides on equal terms
    (W9, and every worker a nanny restarts in W5..W7).
    """
    try:
        import compileall
        import importlib.util

        root = os.path.dirname(importlib.util.find_spec("trioflow").origin)
        ours = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "trioflow")
        if os.path.realpath(root) != os.path.realpath(ours):
            # Another checkout's trioflow (PYTHONPATH): not ours to write into.
            return f"not compiled: trioflow imported from {root}"
        ok = compileall.compile_dir(root, quiet=1)
        return "compiled by the harness" if ok else "compile failed (some modules from source)"
    except Exception as exc:  # best effort: the benchmark still runs
        return f"not compiled: {type(exc).__name__}"


_BYTECODE = _compile_trioflow()


def _environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    source_now = _trioflow_source_hash()
    env["trioflow_source_hash"] = _SOURCE_AT_START
    env["trioflow_bytecode"] = _BYTECODE
    if source_now != _SOURCE_AT_START:
        env["trioflow_source_changed_during_run"] = source_now
    with contextlib.suppress(Exception):
        env["loadavg_1m"] = round(os.getloadavg()[0], 2)
    with contextlib.suppress(Exception):
        import trioflow

        env["trioflow"] = trioflow.__version__
    with contextlib.suppress(Exception):
        import distributed

        env["distributed"] = distributed.__version__
    with contextlib.suppress(Exception):  # read-only git queries: which code was measured
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["git_head"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", "trioflow"], cwd=root, capture_output=True, timeout=10
        ).returncode
        env["trioflow_tree_dirty"] = dirty != 0
    return env


def layout(client: Any, system: str) -> dict[str, Any]:
    """How the side's processes are laid out (to say what differs)."""
    out: dict[str, Any] = {"workers_as_processes": True}
    with contextlib.suppress(Exception):
        if system == TRIOFLOW:
            cluster = getattr(client, "_bench_cluster", None)
            inner = getattr(cluster, "_cluster", None)
            out["nanny_in_client_process"] = bool(getattr(inner, "nanny", False))
        else:
            out["nanny_in_client_process"] = True  # LocalCluster(processes=True) default
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 6)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class _Terminated(BaseException):
    pass


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated(f"signal {signum}")


class CpuMeter:
    """CPU seconds used by this process and by the worker processes of a client.

    ``delta()`` since the last ``reset()``: {"wall_s", "main_cpu_s", "workers_cpu_s"}.
    This process holds the client and the scheduler on both sides (and dask's
    nannies); workers are subprocesses. Best effort: empty if psutil is missing.
    """

    def __init__(self, client: Any, system: str):
        self.pids = worker_pids(client, system)
        try:
            import psutil

            self.me = psutil.Process()
            self.workers = [psutil.Process(pid) for pid in self.pids]
        except Exception:
            self.me, self.workers = None, []
        self.reset()

    def _read(self) -> tuple[float, float, float]:
        main = workers = math.nan
        with contextlib.suppress(Exception):
            t = self.me.cpu_times()
            main = t.user + t.system
        with contextlib.suppress(Exception):
            workers = 0.0
            for p in self.workers:
                t = p.cpu_times()
                workers += t.user + t.system
        return now(), main, workers

    def reset(self) -> None:
        self.start = self._read()

    def delta(self) -> dict[str, float]:
        end = self._read()
        wall = end[0] - self.start[0]
        out = {"wall_s": wall, "main_cpu_s": end[1] - self.start[1], "workers_cpu_s": end[2] - self.start[2]}
        if wall > 0:
            out["main_cpu_frac"] = out["main_cpu_s"] / wall  # 1.0 = one core busy
            out["workers_cpu_frac"] = out["workers_cpu_s"] / wall  # summed over workers
        return out


@dataclasses.dataclass
class Workload:
    """What a benchmark script hands to `run_workload`.

    run_once(client, system, args) -> dict: ONE timed run (a "sample");
        `system` is TRIOFLOW or DASK. It may also tidy up untimed (`quiesce`).
    summarize(samples, args) -> dict: the figures (keys named by `figures`)
        and anything else worth keeping, from that side's samples.
    warmup(client, system, args): untimed; by default `run_once` is called
        ``args.warmup`` times.
    """

    id: str
    name: str
    cluster: dict[str, Any]
    figures: Sequence[Figure]
    run_once: Callable[[Any, str, argparse.Namespace], dict[str, Any]]
    summarize: Callable[[list[dict[str, Any]], argparse.Namespace], dict[str, Any]]
    warmup: Callable[[Any, str, argparse.Namespace], None] | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra_dask_sides: Sequence[Side] = ()
    #: Record CPU use per timed run. Off for workloads that kill or replace
    #: worker processes (the meter follows the pids it saw first).
    measure_cpu: bool = True
    #: Called with the finished JSON line (a dict) before it is printed, to
    #: add what only makes sense across sides (e.g. a ratio bound).
    postprocess: Callable[[dict[str, Any]], None] | None = None
    #: Opens a side's cluster instead of the default (client and scheduler in
    #: this process, workers under nannies): ``open_cluster(side, cluster)``
    #: is a context manager yielding what `run_once` gets as its client.
    #: W8 and W9 start their own processes inside each run and yield None
    #: (`no_cluster`); W10 captures the logs of the default cluster.
    open_cluster: Callable[[Side, dict[str, Any]], contextlib.AbstractContextManager] | None = None
    #: ``describe_layout(system) -> dict``: the side's process layout for
    #: the JSON (``layout``), when `open_cluster` makes the default
    #: description (`layout`) wrong.
    describe_layout: Callable[[str], dict[str, Any]] | None = None


def open_default(side: Side, cluster: dict[str, Any]) -> contextlib.AbstractContextManager:
    """The usual cluster of a side (see the module docstring), yielding its client."""
    if side.system == TRIOFLOW:
        return trioflow_client(**cluster)
    return dask_client(config=side.config, **cluster)


@contextlib.contextmanager
def no_cluster(side: Side, cluster: dict[str, Any]) -> Iterator[None]:
    """For workloads whose every run starts (and ends) its own processes."""
    yield None


def _open(side: Side, workload: Workload) -> contextlib.AbstractContextManager:
    return (workload.open_cluster or open_default)(side, workload.cluster)


def _layout(workload: Workload, client: Any, system: str) -> dict[str, Any]:
    if workload.describe_layout is not None:
        return workload.describe_layout(system)
    return layout(client, system)


class _SideRun:
    """The state of one side during a run: its client, samples, error."""

    def __init__(self, side: Side):
        self.side = side
        self.client: Any = None
        self.opened = False  # the cluster is open (interleaved mode)
        self.samples: list[dict[str, Any]] = []
        self.cpu: list[dict[str, float]] = []
        self.meter: CpuMeter | None = None
        self.info: dict[str, Any] = {}
        self.error: str | None = None
        self.traceback: str | None = None

    def fail(self, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        self.traceback = traceback.format_exc(limit=10)

    def warm(self, workload: Workload, args: argparse.Namespace) -> None:
        start = now()
        if workload.warmup is not None:
            workload.warmup(self.client, self.side.system, args)
        else:
            for _ in range(args.warmup):
                workload.run_once(self.client, self.side.system, args)
        self.info["warmup_s"] = now() - start

    def run_once(self, workload: Workload, args: argparse.Namespace) -> None:
        if not workload.measure_cpu:
            self.samples.append(workload.run_once(self.client, self.side.system, args))
            return
        if self.meter is None:
            self.meter = CpuMeter(self.client, self.side.system)
        self.meter.reset()
        sample = workload.run_once(self.client, self.side.system, args)
        self.cpu.append(self.meter.delta())
        self.samples.append(sample)

    def result(self, workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.info)
        if self.samples:
            try:
                out.update(workload.summarize(self.samples, args))
            except Exception as exc:
                self.fail(exc)
        if self.cpu:
            out["cpu"] = {
                key: median([c[key] for c in self.cpu if key in c])
                for key in ("main_cpu_frac", "workers_cpu_frac", "main_cpu_s", "workers_cpu_s")
            }
        if self.error:
            out["error"] = self.error
        if self.side.note:
            out["note"] = self.side.note
        return out


def _sequential(workload: Workload, runs: list[_SideRun], args: argparse.Namespace) -> None:
    """One side after the other: start its cluster, warm up, time, close."""
    for run in runs:
        start = now()
        try:
            with _open(run.side, workload) as run.client:
                run.info["setup_s"] = now() - start
                run.info["layout"] = _layout(workload, run.client, run.side.system)
                run.warm(workload, args)
                for _ in range(args.repeat):
                    run.run_once(workload, args)
                closing = now()
            run.info["close_s"] = now() - closing
        except Exception as exc:
            run.fail(exc)
        finally:
            run.client = run.meter = None


def _interleaved(workload: Workload, runs: list[_SideRun], args: argparse.Namespace) -> None:
    """Every side's cluster open at once; the timed runs alternate between
    sides (the order rotating each round), so slow drifts in the machine's
    load hit every side alike. The idle clusters cost a little (their
    heartbeats share this process and the cores)."""
    with contextlib.ExitStack() as stack:
        for run in runs:
            start = now()
            try:
                run.client = stack.enter_context(_open(run.side, workload))
                run.opened = True
                run.info["setup_s"] = now() - start
                run.info["layout"] = _layout(workload, run.client, run.side.system)
                run.warm(workload, args)
            except Exception as exc:
                run.fail(exc)
        for round_ in range(args.repeat):
            shift = round_ % len(runs)
            for run in runs[shift:] + runs[:shift]:
                if run.error is None and run.opened:  # (the client may be None: `no_cluster`)
                    try:
                        run.run_once(workload, args)
                    except Exception as exc:
                        run.fail(exc)
    for run in runs:
        run.client = run.meter = None


def run_workload(workload: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """Run `workload` on every side, print ONE JSON line, return it as a dict.

    The reference dask side is labelled ``"dask"``; ``workload.extra_dask_sides``
    are further dask variants (e.g. another config), each compared with
    trioflow too. Ratios are always trioflow / dask, whatever `better` says:
    for "higher" figures above 1 is trioflow ahead, for "lower" ones below 1.
    """
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    sides: list[Side] = []
    if not args.no_trioflow:
        sides.append(Side(TRIOFLOW, TRIOFLOW))
    skipped = None
    if args.no_dask:
        skipped = "--no-dask"
    elif not dask_available():
        skipped = "distributed is not importable (pip install -e '.[bench]')"
    else:
        sides.append(Side(DASK, DASK))
        sides.extend(workload.extra_dask_sides)

    runs = [_SideRun(side) for side in sides]
    interrupted = None
    try:
        (_interleaved if args.interleave else _sequential)(workload, runs, args)
    except (_Terminated, KeyboardInterrupt) as exc:
        interrupted = repr(exc)
    finally:
        if previous is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, previous)

    results = {run.side.label: run.result(workload, args) for run in runs}
    table = []
    ratios: dict[str, Any] = {}
    trio_side = results.get(TRIOFLOW, {})
    for figure in workload.figures:
        row: dict[str, Any] = {
            "figure": figure.name,
            "unit": figure.unit,
            "better": figure.better,
            TRIOFLOW: trio_side.get(figure.name),
        }
        for side in sides:
            if side.system != DASK:
                continue
            theirs = results.get(side.label, {}).get(figure.name)
            row[side.label] = theirs
            suffix = "" if side.label == DASK else f"_vs_{side.label}"
            r = ratio(trio_side.get(figure.name), theirs)
            row[f"ratio{suffix}"] = r
            ratios[f"{figure.name}{suffix}"] = r
        table.append(row)

    line: dict[str, Any] = {
        "workload": workload.id,
        "name": workload.name,
        "params": {
            **workload.cluster,
            **workload.params,
            "repeat": args.repeat,
            "warmup": args.warmup,
            "mode": "interleaved" if args.interleave else "sequential",
        },
        "figures": table,
        "ratios": ratios,
        "results": results,
        "env": _environment(),
    }
    if skipped:
        line["dask_skipped"] = skipped
    errors = {run.side.label: run.error for run in runs if run.error}
    if interrupted:
        errors["interrupted"] = interrupted
    if errors:
        line["errors"] = errors
    if workload.postprocess is not None:
        try:
            workload.postprocess(line)
        except Exception as exc:
            line.setdefault("errors", {})["postprocess"] = f"{type(exc).__name__}: {exc}"
    for run in runs:
        if run.traceback:
            print(f"[{workload.id} {run.side.label}] {run.traceback}", file=sys.stderr)
    line = _jsonable(line)
    print(json.dumps(line, indent=2 if args.pretty else None), flush=True)
    if errors and args.strict:
        sys.exit(1)
    return line


def pin_apart() -> None:
    """This process's threads (caller, client, scheduler) on CPU 0; the
    worker processes' threads on the other CPUs.

    For ``--pin`` only: a measurement's choice, never trioflow's. Left
    free, the kernel sometimes runs this process's three threads on one
    CPU and sometimes spreads them, and W2 then differs by a quarter
    between blocks of one cluster (docs/performance.md, W2), which can
    swamp a change of a few per cent; pinned, each block runs with the
    same placement. Threads started later inherit their creator's CPUs.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit(f"--pin needs two CPUs or more; this process may use {cpus}")
    import psutil  # a benchmark dependency, needed only here

    me = psutil.Process()
    for thread in me.threads():
        os.sched_setaffinity(thread.id, {cpus[0]})
    for child in me.children(recursive=True):
        try:
            for thread in child.threads():
                os.sched_setaffinity(thread.id, set(cpus[1:]))
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass  # a process that ended meanwhile
