"""`trioflow chaos --real`: the real processes under a seeded plan of real faults.

The lab (`trioflow.sim.lab`) simulates the machine under the real shells;
this runs the real thing: a ``trioflow scheduler`` process and
``trioflow worker`` processes (each a nanny and the worker it supervises),
started from the command line with the cluster's token in their
environment, and a real `AsyncClient` in this process submitting the lab's
workload (`trioflow.sim.workload`, each task run by
`trioflow.sim.real_tasks.run_logged`). Faults are real too, drawn from the
seed and applied one after the other (each heals before the next strikes):

========================  =================================================
kind                      what happens
========================  =================================================
``kill``                  SIGKILL of a worker process (its nanny starts a
                          new one)
``stop``                  SIGSTOP of a worker process, SIGCONT `duration` s
                          later (past `worker_ttl`, the scheduler gives up
                          on it first)
``scheduler``             SIGKILL of the scheduler; a new one serves at the
                          same address `duration` s later
``cut``                   the link of a worker's host goes down for
                          `duration` s (network namespaces only)
========================  =================================================

With root and iproute2 every process runs on a host of its own, a network
namespace of a private LAN (`trioflow.sim.netns`); this process's client
joins the client host by `setns` for the duration of the run. Without
them, everything is on loopback and there are no ``cut`` faults.

Wall time is real here: a run is not replayable byte for byte (the seed
fixes the workload, the plan and the task durations, not the scheduling
of four processes), and a violation names the run's directory, whose
process logs and run logs say what happened.

The oracles are the lab's, fed with what can be seen from outside the
processes: every future final within the liveness bound after the last
fault healed; every value right and every error one the failure table
prescribes (`check_outcomes`; a `KilledWorker` only for a task the run
logs show unfinished on `allowed_failures` workers that died or were cut
off past `worker_ttl`; never `LostData`, since every scattered value is
replicated on every worker and faults never overlap); every worker back
at the end; no key delivered twice with different values; no task run
more often than the faults that struck the workers it (or its inputs) ran
on, and the scheduler restarts, allow (the run logs count the runs; this
bound is looser than the lab's, which sees what each worker held); the
scheduler empty once the client has left; and no process logged an
ERROR. The invariants of the cores, which live inside the processes, are
the lab's to check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import psutil
import trio

from trioflow.client import AsyncClient
from trioflow.comm.auth import Credentials
from trioflow.comm.network import free_loopback_port
from trioflow.config import Config
from trioflow.errors import CommClosedError, LostData
from trioflow.sim import netns
from trioflow.sim.determinism import derive_rng
from trioflow.sim.lab import FETCH_PATIENCE_S, RunReport, _Collector, make_workload
from trioflow.sim.ledger import Ledger
from trioflow.sim.oracles import check_deliveries, check_outcomes
from trioflow.sim.real_tasks import read_run_logs, run_logged
from trioflow.sim.trace import Trace, logs_into
from trioflow.sim.workload import Ref, evaluate
from trioflow.wall_clock import epoch_seconds

REAL_KINDS = ("kill", "stop", "scheduler", "cut")
DEFAULT_REAL_MIX: dict[str, float] = {"kill": 4, "stop": 2, "scheduler": 1, "cut": 2}
SCHEDULER_PORT = 8786
# Seconds the cluster may take to come up (processes importing Python on a
# busy machine), and a reconnecting worker to register.
STARTUP_TIMEOUT_S = 60.0
# Seconds between looks at the cluster while waiting for it.
POLL_S = 0.05
# Seconds a fault waits for a worker process to strike while its nanny
# starts a new one (then it is skipped, and counted so).
WORKER_PROCESS_WAIT_S = 10.0


@dataclasses.dataclass(frozen=True)
class RealSettings:
    """The shape of every real run.

    Attributes:
        n_workers: nanny + worker process pairs.
        nthreads: threads per worker.
        n_tasks: tasks per workload (about).
        n_faults: faults per plan.
        mix: weights of the fault kinds (``cut`` is dropped without namespaces).
        durations: (min, max) seconds each task sleeps.
        gaps: (min, max) seconds between one fault healing and the next.
        fault_durations: (min, max) seconds a stop, a cut or a scheduler
            outage lasts.
        liveness_bound: every future must be final this many seconds after
            the last fault healed.
        settle: seconds for a departed client to be forgotten.
        use_netns: hosts on network namespaces (None: when available).
    """

    n_workers: int = 4
    nthreads: int = 2
    n_tasks: int = 200
    n_faults: int = 5
    mix: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_REAL_MIX))
    durations: tuple[float, float] = (0.01, 0.1)
    gaps: tuple[float, float] = (0.2, 1.0)
    fault_durations: tuple[float, float] = (0.5, 5.0)
    liveness_bound: float = 60.0
    settle: float = 5.0
    use_netns: bool | None = None


@dataclasses.dataclass(frozen=True)
class RealFault:
    """One fault of a real plan: at `time` s after the workload starts."""

    time: float
    kind: str
    target: str  # "worker-i" or "scheduler"
    duration: float = 0.0

    def __str__(self) -> str:
        text = f"{self.kind}@{self.time:g}:{self.target}"
        return f"{text}/{self.duration:g}" if self.duration else text


def real_plan(rng: random.Random, settings: RealSettings, *, with_cuts: bool) -> list[RealFault]:
    """`n_faults` faults one after the other, each healed before the next."""
    mix = {k: w for k, w in settings.mix.items() if w > 0 and (with_cuts or k != "cut")}
    if settings.n_faults and not mix:
        raise ValueError("the fault mix gives every usable kind weight 0")
    kinds, weights = list(mix), list(mix.values())
    plan, at = [], 0.0
    for _ in range(settings.n_faults):
        at = round(at + rng.uniform(*settings.gaps), 3)
        kind = rng.choices(kinds, weights)[0]
        target = "scheduler" if kind == "scheduler" else f"worker-{rng.randrange(settings.n_workers)}"
        duration = 0.0 if kind == "kill" else round(rng.uniform(*settings.fault_durations), 3)
        plan.append(RealFault(at, kind, target, duration))
        at += duration
    return plan


def parse_real_mix(text: str) -> dict[str, float]:
    """``kill=3,stop=1`` -> weights (a kind without ``=`` weighs 1).

    Raises:
        ValueError: an unknown kind or a weight that is not a number.
    """
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in REAL_KINDS:
            raise ValueError(f"unknown fault kind {name!r} for --real (known: {', '.join(REAL_KINDS)})")
        try:
            mix[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"weight of {name!r} must be a number, got {weight!r}") from None
    return mix


def run_real(seed: int, settings: RealSettings | None = None) -> RunReport:
    """One real run: start the processes, drive the workload under the plan, judge, clean up.

    Every process is ended and every namespace removed before this returns,
    whatever happened. The run's directory is removed if the run passed.
    """
    settings = settings or RealSettings()
    use_netns = settings.use_netns
    if use_netns is None:
        use_netns = netns.unavailable() is None
    run = _RealRun(seed, settings, use_netns)
    run_dir = tempfile.mkdtemp(prefix="trioflow-chaos-real-")
    try:
        with run.hosts() as lan, _Processes(run_dir, lan) as processes:
            run.lan, run.processes, run.run_dir = lan, processes, run_dir
            try:
                with (netns.entered(lan, "c") if lan is not None else contextlib.nullcontext()):
                    with logs_into(run.trace, run.violations):
                        trio.run(run.main)
            except Exception as exc:  # noqa: BLE001 - the report must say what broke
                run.violations.append(f"the run crashed: {type(exc).__name__}: {exc}")
            run.violations.extend(processes.errors())
    finally:
        if run.violations:
            run.notes.append(f"the processes' logs and run logs are in {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    return RunReport(
        seed=seed,
        plan=run.plan,
        workload=run.workload.describe(),
        violations=run.violations,
        sim_seconds=run.wall_seconds,
        trace=run.trace,
        faults=run.fault_counts(),
        outcomes=run.outcome_counts(),
        recovery_s=run.recovery_s,
        notes=run.notes,
    )


# ------------------------------------------------------------ processes --


class _Processes:
    """The run's processes: each in a session of its own, output to a log file,
    all ended (SIGCONT, then SIGKILL of the whole group) when the block ends."""

    def __init__(self, run_dir: str, lan: netns.Lan | None):
        self.run_dir = run_dir
        self.lan = lan
        self.started: list[tuple[str, subprocess.Popen]] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOFLOW_")}
        self.env.update(HOME=run_dir, PYTHONUNBUFFERED="1", TRIOFLOW_TOKEN=Credentials.generate().cluster_token())

    def __enter__(self) -> _Processes:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for _, process in self.started:
            self.end(process)

    def start(self, name: str, host: str | None, *argv: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "trioflow", *argv]
        if self.lan is not None and host is not None:
            command = self.lan.exec_argv(host, command)
        log = open(os.path.join(self.run_dir, f"{name}.log"), "a")  # noqa: SIM115 - the child owns it
        try:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.run_dir, start_new_session=True,
            )
        finally:
            log.close()
        self.started.append((name, process))
        return process

    @staticmethod
    def end(process: subprocess.Popen) -> None:
        """SIGCONT (should it be stopped) and SIGKILL to its whole process group; reap it."""
        for signum in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)

    def credentials(self) -> Credentials:
        return Credentials.from_token(self.env["TRIOFLOW_TOKEN"])

    def errors(self) -> list[str]:
        """Lines where a process logged an ERROR or a traceback."""
        problems = []
        for name in sorted({name for name, _ in self.started}):
            with open(os.path.join(self.run_dir, f"{name}.log"), errors="replace") as log:
                for line in log:
                    if " ERROR " in line or line.startswith("Traceback"):
                        problems.append(f"{name} logged: {line.strip()[:300]}")
        return problems[:20]


# ------------------------------------------------------------------ run --


class _RealRun:
    """The state of one real run while `trio.run` executes `main`."""

    def __init__(self, seed: int, settings: RealSettings, use_netns: bool):
        self.seed = seed
        self.settings = settings
        self.use_netns = use_netns
        self.workload = make_workload(seed, _lab_shape(settings))
        self.plan = real_plan(derive_rng(seed, "real-faults"), settings, with_cuts=use_netns)
        self.trace = Trace()
        self.violations: list[str] = []
        self.notes: list[str] = []
        self.observed: dict[str, Any] = {}
        self.ledger = Ledger()
        self.lan: netns.Lan | None = None
        self.processes: _Processes | None = None
        self.run_dir = ""
        self.scheduler: subprocess.Popen | None = None
        self.nannies: list[subprocess.Popen] = []
        # (wall time, pids, what) of every fault that cost a worker process
        # its link or its life (pids empty: the scheduler), for the run
        # oracles; wall time, as the run logs have it.
        self.struck: list[tuple[float, frozenset[int], str]] = []
        # Scattered key -> the pids of the workers the scheduler last said
        # held it (polled while the run goes: `_watch_holders`).
        self.holders: dict[str, frozenset[int]] = {}
        self.wall_seconds = 0.0
        self.recovery_s: float | None = None
        self.skipped = 0
        self._t0 = 0.0

    # -- hosts and addresses --

    @contextlib.contextmanager
    def hosts(self) -> Iterator[netns.Lan | None]:
        if not self.use_netns:
            self.scheduler_host = self.worker_host = "127.0.0.1"
            self.scheduler_port = free_loopback_port()
            yield None
            return
        names = ["s", *(f"w{i}" for i in range(self.settings.n_workers)), "c"]
        with netns.virtual_lan(names) as lan:
            self.scheduler_host, self.scheduler_port = lan.addresses["s"], SCHEDULER_PORT
            yield lan

    @property
    def address(self) -> str:
        return f"tcp://{self.scheduler_host}:{self.scheduler_port}"

    def _worker_host(self, i: int) -> tuple[str | None, str]:
        """(namespace host, address to bind) of worker i."""
        if self.lan is None:
            return None, "127.0.0.1"
        return f"w{i}", self.lan.addresses[f"w{i}"]

    # -- bookkeeping --

    def now(self) -> float:
        return trio.current_time() - self._t0

    def note(self, node: str, what: str) -> None:
        self.trace.add(node, what)

    def fault_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for fault in self.plan:
            counts[fault.kind] = counts.get(fault.kind, 0) + 1
        if self.workload.poison is not None:
            counts["poison"] = 1
        if self.skipped:
            counts["skipped (no worker process to strike)"] = self.skipped
        return counts

    def outcome_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for kind, what in self.observed.values():
            name = "value" if kind == "value" else type(what).__name__
            counts[name] = counts.get(name, 0) + 1
        return counts

    # -- the run --

    async def main(self) -> None:
        self._t0 = self.trace.origin = trio.current_time()
        assert self.processes is not None
        self.trace.add("lab", f"seed={self.seed} plan={','.join(map(str, self.plan)) or 'none'}")
        self.trace.add("lab", f"workload: {self.workload.describe()}")
        self._start_scheduler()
        for i in range(self.settings.n_workers):
            host, bind = self._worker_host(i)
            nanny = self.processes.start(
                f"nanny-{i}", host, "worker", self.address, "--nthreads", str(self.settings.nthreads),
                "--host", bind, "--log-level", "info",
            )
            self.nannies.append(nanny)
            self.note(f"nanny-{i}", f"started pid={nanny.pid}")
        client = await self._connect()
        try:
            async with client:
                await client.wait_for_workers(self.settings.n_workers, timeout=STARTUP_TIMEOUT_S)
                self.note("client-0", "every worker registered")
                await self._drive(client)
        finally:
            self.wall_seconds = self.now()
        await self._check_forgotten()

    def _start_scheduler(self) -> None:
        assert self.processes is not None
        self.scheduler = self.processes.start(
            "scheduler", "s" if self.lan is not None else None, "scheduler",
            "--host", self.scheduler_host, "--port", str(self.scheduler_port), "--log-level", "info",
        )
        self.note("scheduler", f"started pid={self.scheduler.pid}")

    async def _connect(self) -> AsyncClient:
        """A client of the new scheduler, once it listens (it may take a few seconds)."""
        assert self.processes is not None
        with trio.move_on_after(STARTUP_TIMEOUT_S):
            while True:
                client = AsyncClient(self.address, config=Config(), credentials=self.processes.credentials().client_only())
                try:
                    await client.__aenter__()
                except CommClosedError:
                    await trio.sleep(POLL_S)
                    continue
                await client.__aexit__(None, None, None)
                return AsyncClient(
                    self.address, config=Config(), credentials=self.processes.credentials().client_only(),
                    rng=derive_rng(self.seed, "client-0"),
                )
        raise RuntimeError(f"the scheduler did not listen at {self.address} within {STARTUP_TIMEOUT_S:g} s")

    async def _drive(self, client: AsyncClient) -> None:
        settings, workload = self.settings, self.workload
        futures: dict[str, Any] = {}
        for data in workload.scattered:
            scattered = await client.scatter({data.key: data.value})
            futures[data.key] = scattered[data.key]
        if futures:
            # Every worker keeps a copy (restarted ones fetch one), so one
            # fault at a time never loses scattered data.
            await client.replicate(list(futures.values()), n=settings.n_workers)
        start = trio.current_time()
        healed_at = start + (self.plan[-1].time + self.plan[-1].duration if self.plan else 0.0)
        self.note("client-0", "workload starts")
        collector = _Collector(client, futures, len(workload.keys), self.observed, self.trace, self.ledger)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._inject, start)
            watcher = trio.CancelScope()
            nursery.start_soon(self._watch_holders, client, [futures[d.key] for d in workload.scattered], watcher)
            async with trio.open_nursery() as waiters:
                with trio.move_on_at(healed_at + settings.liveness_bound) as liveness:
                    waiters.start_soon(collector.run, waiters)
                    for key in futures:
                        collector.watch(key)
                    await self._submit(client, futures, collector, start)
                    await collector.all_in.wait()
                waiters.cancel_scope.cancel(reason="every outcome is in, or the liveness bound passed")
            watcher.cancel()
        self.recovery_s = max(0.0, collector.last_done_at - healed_at)
        if liveness.cancelled_caught:
            pending = [k for k in workload.keys if k not in self.observed]
            self.violations.append(
                f"liveness: {len(pending)} futures not final {settings.liveness_bound:g} s after the last "
                f"fault healed: {pending[:10]}"
            )
        runs = read_run_logs(self.run_dir)
        lost, unjustified = self._data_losses()
        self.violations.extend(unjustified)
        self.violations.extend(
            check_outcomes(
                workload, evaluate(workload), self.observed,
                witnessed_deaths=self._deaths_while_running(runs),
                allowed_failures=Config().allowed_failures,
                declared_lost=lost,
            )
        )
        with trio.move_on_after(STARTUP_TIMEOUT_S) as membership:
            while len(await client.nthreads()) < settings.n_workers:
                await trio.sleep(POLL_S)
        if membership.cancelled_caught:
            self.violations.append(f"liveness: not every worker registered again within {STARTUP_TIMEOUT_S:g} s")
        await self._deliver_again(futures)
        self.violations.extend(check_deliveries(self.ledger))
        self.violations.extend(self._check_runs(read_run_logs(self.run_dir)))

    async def _submit(self, client: AsyncClient, futures: dict, collector: _Collector, start: float) -> None:
        # The waves are spread over the first half of the plan (a long plan
        # would otherwise strike an idle cluster once the workload is done).
        last_wave = self.workload.wave_times[-1]
        plan_end = self.plan[-1].time + self.plan[-1].duration if self.plan else 0.0
        scale = plan_end / 2 / last_wave if last_wave and plan_end / 2 > last_wave else 1.0
        for wave, at in enumerate(self.workload.wave_times):
            await trio.sleep_until(start + at * scale)
            self.note("client-0", f"submits wave {wave}")
            for node in self.workload.nodes:
                if node.wave == wave:
                    args = [futures[a.key] if isinstance(a, Ref) else a for a in node.args]
                    futures[node.key] = client.submit(
                        run_logged, self.run_dir, self.seed, self.settings.durations, node.op, node.key, *args,
                        key=node.key,
                    )
                    collector.watch(node.key)

    async def _watch_holders(self, client: AsyncClient, scattered: list, scope: trio.CancelScope) -> None:
        """Note, every `POLL_S`, which worker processes the scheduler says
        hold each scattered key (its last word before a loss is who held it)."""
        if not scattered:
            return
        with scope:
            while True:
                with trio.move_on_after(1.0):
                    with contextlib.suppress(CommClosedError, RuntimeError):
                        pids = {a: w["pid"] for a, w in (await client.scheduler_info())["workers"].items()}
                        for key, addresses in (await client.who_has(scattered)).items():
                            # Frozen once the client heard of the loss: who
                            # holds it after (a copy brought back) is no
                            # witness of it.
                            state = client.futures.get(key)
                            heard_lost = state is not None and state.done() and state.status != "finished"
                            if addresses and not heard_lost:
                                self.holders[key] = frozenset(pids[a] for a in addresses if pids.get(a))
                await trio.sleep(POLL_S)

    def _data_losses(self) -> tuple[set[str], list[str]]:
        """The scattered keys the client saw lost, and the losses no fault
        explains: the lab's rule (every holder lost), with the scheduler's
        last word on the holders for the ground truth it cannot see here."""
        lost: set[str] = set()
        problems = []
        for kind, error in self.observed.values():
            if kind != "error" or not isinstance(error, LostData) or error.key in lost:
                continue
            key = error.key
            lost.add(key)
            holders = self.holders.get(key, frozenset())
            struck = {pid for _, pids, _ in self.struck for pid in pids}
            spared = sorted(pid for pid in holders if pid not in struck and psutil.pid_exists(pid))
            if spared:
                problems.append(
                    f"{key}: lost although worker processes {spared}, which held it last, were neither "
                    f"struck by a fault nor dead"
                )
        return lost, problems

    async def _deliver_again(self, futures: dict[str, Any]) -> None:
        with trio.move_on_after(FETCH_PATIENCE_S):
            for key, future in futures.items():
                if future.status == "finished":
                    with contextlib.suppress(Exception):
                        self.ledger.delivered(key, await future, "the client's fetch at the end")

    async def _check_forgotten(self) -> None:
        """With the run's client gone, the scheduler must forget every task."""
        assert self.processes is not None
        async with AsyncClient(self.address, config=Config(), credentials=self.processes.credentials().client_only()) as probe:
            with trio.move_on_after(self.settings.settle):
                while await probe.who_has():
                    await trio.sleep(POLL_S)
            left = await probe.who_has()
        if left:
            self.violations.append(f"the scheduler still has {len(left)} tasks after the client left: {list(left)[:5]}")

    # -- faults --

    def _worker_pid(self, i: int) -> int | None:
        """The worker process nanny i supervises now, if any."""
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.nannies[i].pid).children():
                return child.pid
        return None

    async def _inject(self, start: float) -> None:
        for fault in self.plan:
            await trio.sleep_until(start + fault.time)
            self.note(fault.target, f"fault {fault}")
            if fault.kind == "scheduler":
                await self._restart_scheduler(fault)
                continue
            i = int(fault.target.split("-")[1])
            pid = await self._wait_for_worker_process(i)
            if pid is None and fault.kind != "cut":
                self.note(fault.target, "no worker process: fault skipped")
                self.skipped += 1
                continue
            pids = frozenset() if pid is None else frozenset({pid})
            if fault.kind == "kill":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.struck.append((epoch_seconds(), pids, f"{fault}"))
            elif fault.kind == "stop":
                os.kill(pid, signal.SIGSTOP)
                self.struck.append((epoch_seconds(), pids, f"{fault}"))
                try:
                    await trio.sleep(fault.duration)
                finally:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
            elif fault.kind == "cut":
                assert self.lan is not None
                self.lan.cut(f"w{i}")
                self.struck.append((epoch_seconds(), pids, f"{fault}"))
                try:
                    await trio.sleep(fault.duration)
                finally:
                    self.lan.mend(f"w{i}")
            self.note(fault.target, f"healed {fault}")

    async def _wait_for_worker_process(self, i: int) -> int | None:
        """The worker process of nanny i, waiting (bounded) while its nanny
        starts a new one: a fault strikes a process, not a restart."""
        with trio.move_on_after(WORKER_PROCESS_WAIT_S):
            while (pid := self._worker_pid(i)) is None:
                await trio.sleep(POLL_S)
            return pid
        return None

    async def _restart_scheduler(self, fault: RealFault) -> None:
        assert self.scheduler is not None
        _Processes.end(self.scheduler)
        self.struck.append((epoch_seconds(), frozenset(), f"{fault}"))
        await trio.sleep(fault.duration)
        self._start_scheduler()

    # -- the run oracles --

    def _deaths_while_running(self, runs) -> dict[str, int]:
        """Per key: the worker processes it was running on when a kill, a
        stop or a cut struck them, or when they died by themselves (the
        poison) with the run unfinished: what may make it `KilledWorker`."""
        runs_by = _runs_by_process(runs)
        deaths: dict[str, set[int]] = {}
        for (key, pid), spans in runs_by.items():
            for started, ended in spans:
                struck = any(
                    pid in pids and started <= at and (ended is None or ended >= at) for at, pids, _ in self.struck
                )
                if struck or (ended is None and not psutil.pid_exists(pid)):
                    deaths.setdefault(key, set()).add(pid)
        return {key: len(pids) for key, pids in deaths.items()}

    def _check_runs(self, runs) -> list[str]:
        """No key ran more often than the faults that touched it allow.

        A run beyond the first is excused by each distinct fault that
        struck a worker process after a run of the key, or of a key it
        depends on, had started there (the run, or its value, may have
        been lost there), by each scheduler restart, and by each process
        that died by itself (the poison) after such a run.
        """
        runs_by = _runs_by_process(runs)
        last_seen: dict[int, float] = {}
        for _, _, pid, at in runs:
            last_seen[pid] = at
        faults = list(self.struck) + [
            (at, frozenset({pid}), f"process {pid} died")
            for pid, at in last_seen.items()
            if not psutil.pid_exists(pid) and not any(pid in pids for _, pids, _ in self.struck)
        ]
        problems = []
        for key in self.workload.by_key:
            n = sum(len(spans) for (k, _), spans in runs_by.items() if k == key)
            if n <= 1:
                continue
            ancestors = self.workload.ancestors(key)
            first_run_on: dict[int, float] = {}
            for (k, pid), spans in runs_by.items():
                if k in ancestors:
                    first_run_on[pid] = min(first_run_on.get(pid, spans[0][0]), spans[0][0])
            excuses = {
                what for at, pids, what in faults
                if not pids or any(pid in first_run_on and first_run_on[pid] <= at for pid in pids)
            }
            if n > 1 + len(excuses):
                problems.append(
                    f"{key} ran {n} times, but only {len(excuses)} fault(s) struck the scheduler or the "
                    f"workers it or its inputs had run on"
                )
        return problems


def _runs_by_process(runs) -> dict[tuple[str, int], list[tuple[float, float | None]]]:
    """``{(key, pid): [(start, end or None), ...]}`` from the run logs."""
    spans: dict[tuple[str, int], list[tuple[float, float | None]]] = {}
    for what, key, pid, at in runs:
        if what == "start":
            spans.setdefault((key, pid), []).append((at, None))
        else:
            open_spans = spans.get((key, pid), [])
            if open_spans and open_spans[-1][1] is None:
                open_spans[-1] = (open_spans[-1][0], at)
    return spans


def _lab_shape(settings: RealSettings):
    """The lab's settings with this run's workload size (the workload generator takes them)."""
    from trioflow.sim.lab import LabSettings

    return LabSettings(n_workers=settings.n_workers, nthreads=settings.nthreads, n_tasks=settings.n_tasks)
