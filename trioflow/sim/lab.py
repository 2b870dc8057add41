"""One seeded run of the chaos lab: a whole cluster inside one `trio.run`.

`run_seed(seed)` is the entry point. It derives everything from the seed
(the workload, the fault plan unless one is given, every latency, task
duration, backoff jitter and client id) and then, on Trio's `MockClock`
with autojump (a simulated minute of heartbeats costs milliseconds):

1. starts a `SimCluster` (real scheduler, nannies and workers) and a real
   `AsyncClient` on a `SimNetwork`;
2. scatters the workload's data, then submits its waves of tasks while a
   task injects the plan's faults at their times;
3. waits for every future, recording each outcome, until the *liveness
   bound* (`LabSettings.liveness_bound` seconds after the last fault
   healed): a future still pending then is a violation (a deadlock);
4. lets the cluster settle, then runs the oracles (`trioflow.sim.oracles`):
   outcomes against sequential Python and the failure table, every worker
   back, the invariants of scheduler and workers; fetches every value once
   more and reads every worker's copies, and judges the run's ledger
   (`trioflow.sim.ledger`: how often each task ran, each loss of scattered
   data, every value delivered); then closes the client and checks that
   everything was forgotten;
5. returns a `RunReport` with the violations and the trace.

Nothing here reads a wall clock; `trioflow.sim.cli` times runs from outside.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Mapping
from typing import Any

import trio
import trio.testing

from trioflow.client import AsyncClient
from trioflow.config import Config
from trioflow.errors import CommClosedError
from trioflow.sim.cluster import SimCluster
from trioflow.sim.determinism import derive_rng, deterministic_scheduling
from trioflow.sim.faults import DEFAULT_MIX, Fault, count_by_kind, last_heal, random_plan
from trioflow.sim.network import SimNetwork
from trioflow.sim.oracles import (
    Outcome,
    check_data_losses,
    check_deliveries,
    check_executions,
    check_forgotten,
    check_outcomes,
    check_states,
)
from trioflow.sim.trace import Trace, logs_into
from trioflow.sim.workload import FUNCTIONS, Ref, Workload, evaluate, generate

CLIENT_NODE = "client-0"
# Seconds between the collector's fetches of finished values.
SWEEP_S = 1.0
# Seconds a sweep's fetch may take before each of its futures is awaited on
# its own (longer than any recovery: peer_timeout is 6 s by default).
FETCH_PATIENCE_S = 15.0
# Seconds between checks that the cluster forgot everything.
FORGET_POLL_S = 0.1


@dataclasses.dataclass(frozen=True)
class LabSettings:
    """The shape of every run: cluster size, workload size, fault mix, bounds.

    Attributes:
        n_workers: nanny + worker pairs.
        nthreads: threads per worker.
        n_tasks: tasks per workload (about).
        n_faults: faults per generated plan.
        fault_window: generated faults strike in [0, fault_window) seconds
            after the workload starts.
        mix: weights of the fault kinds in generated plans.
        durations: (min, max) simulated seconds a task takes.
        latency: (min, max) seconds a message takes on the network.
        liveness_bound: every future must be final this many seconds after
            the last fault healed.
        settle: seconds of calm before the state checks (in-flight messages
            land, restarted workers register).
        config: the cluster's tunables. The defaults, not the environment:
            a ``TRIOFLOW_*`` variable must not change a replay.
    """

    n_workers: int = 4
    nthreads: int = 2
    n_tasks: int = 200
    n_faults: int = 5
    fault_window: float = 8.0
    mix: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_MIX))
    durations: tuple[float, float] = (0.01, 0.2)
    latency: tuple[float, float] = (0.001, 0.005)
    liveness_bound: float = 60.0
    settle: float = 3.0
    config: Config = dataclasses.field(default_factory=Config)


@dataclasses.dataclass
class RunReport:
    """What one run did and whether it was right."""

    seed: int
    plan: list[Fault]
    workload: str
    violations: list[str]
    sim_seconds: float
    trace: Trace
    faults: dict[str, int]
    outcomes: dict[str, int]
    # Seconds from the last fault's healing to the last outcome (None if
    # the run did not get that far); the margin under the liveness bound.
    recovery_s: float | None = None
    # Known, harmless oddities of the shells seen during the run.
    notes: list[str] = dataclasses.field(default_factory=list)
    # Work stealing in this run, summed over every scheduler incarnation:
    # "requested" (asked of a victim) and "stolen" (moved to the thief).
    steals: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def trace_sha256(self) -> str:
        return self.trace.sha256()


def make_workload(seed: int, settings: LabSettings) -> Workload:
    return generate(
        derive_rng(seed, "workload"), sizes_rng=derive_rng(seed, "sizes"), n_tasks=settings.n_tasks
    )


def make_plan(seed: int, settings: LabSettings) -> list[Fault]:
    return random_plan(
        derive_rng(seed, "faults"),
        n_faults=settings.n_faults,
        n_workers=settings.n_workers,
        window=settings.fault_window,
        mix=settings.mix,
    )


def run_seed(seed: int, settings: LabSettings | None = None, plan: list[Fault] | None = None) -> RunReport:
    """Simulate one run; the same seed, settings and plan give the same trace.

    Args:
        seed: derives the workload, every random choice, and the plan.
        settings: the run's shape (defaults: `LabSettings()`).
        plan: faults to inject instead of the seed's own plan.
    """
    settings = settings or LabSettings()
    workload = make_workload(seed, settings)
    plan = sorted(plan) if plan is not None else make_plan(seed, settings)
    run = _Run(seed, settings, workload, plan)
    clock = trio.testing.MockClock(autojump_threshold=0)
    with deterministic_scheduling(seed), logs_into(run.trace, run.violations):
        try:
            trio.run(run.main, clock=clock)
        except BaseException as exc:  # noqa: BLE001 - the report must say what broke
            if isinstance(exc, KeyboardInterrupt):
                raise
            run.violations.append("the simulation crashed: " + "".join(traceback.format_exception(exc)))
    faults = count_by_kind(plan)
    if workload.poison is not None:
        faults["poison"] = 1
    return RunReport(
        seed=seed,
        plan=plan,
        workload=workload.describe(),
        violations=run.violations,
        sim_seconds=run.sim_seconds,
        trace=run.trace,
        faults=faults,
        outcomes=run.outcome_counts(),
        recovery_s=run.recovery_s,
        notes=run.notes,
        steals=run.steal_counts(),
    )


class _Run:
    """The state of one run while `trio.run` executes `main`."""

    def __init__(self, seed: int, settings: LabSettings, workload: Workload, plan: list[Fault]):
        self.seed = seed
        self.settings = settings
        self.workload = workload
        self.plan = plan
        self.trace = Trace()
        self.violations: list[str] = []
        self.notes: list[str] = []
        self.observed: dict[str, Outcome] = {}
        self.sim_seconds = 0.0
        self.recovery_s: float | None = None
        self.cluster: SimCluster | None = None

    def steal_counts(self) -> dict[str, int]:
        counts = {"requested": 0, "stolen": 0}
        for scheduler in self.cluster.schedulers if self.cluster is not None else ():
            counters = scheduler.recorder.counters()
            counts["requested"] += int(counters["steal_requests"])
            counts["stolen"] += int(counters["stolen"])
        return counts

    def outcome_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for kind, what in self.observed.values():
            name = "value" if kind == "value" else type(what).__name__
            counts[name] = counts.get(name, 0) + 1
        return counts

    async def main(self) -> None:
        trace, settings = self.trace, self.settings
        network = SimNetwork(
            derive_rng(self.seed, "network"),
            settings.latency,
            on_event=lambda t, kind, detail: trace.at(t, "net", f"{kind} {detail}"),
        )
        trace.add("lab", f"seed={self.seed} plan={','.join(map(str, self.plan)) or 'none'}")
        trace.add("lab", f"workload: {self.workload.describe()}")
        cluster = self.cluster = SimCluster(
            seed=self.seed,
            network=network,
            trace=trace,
            config=settings.config,
            n_workers=settings.n_workers,
            nthreads=settings.nthreads,
            durations=settings.durations,
        )
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await cluster.start(nursery)
                    client = AsyncClient(
                        cluster.scheduler_address,
                        config=settings.config,
                        network=network.for_node(CLIENT_NODE),
                        rng=derive_rng(self.seed, CLIENT_NODE),
                        credentials=cluster.credentials.client_only(),
                    )
                    await self._drive(client, nursery)
                finally:
                    self.sim_seconds = trio.current_time()
                    nursery.cancel_scope.cancel(reason="the run is over")
        finally:
            self.violations.extend(cluster.errors)
            for launcher in cluster.launchers:
                for handle in launcher.handles:
                    self.violations.extend(handle.errors)
                    self.notes.extend(handle.notes)
            trace.add("lab", f"end: {len(self.violations)} violations")

    async def _drive(self, client: AsyncClient, nursery: trio.Nursery) -> None:
        cluster, settings, workload, trace = self.cluster, self.settings, self.workload, self.trace
        assert cluster is not None
        async with client:
            futures: dict[str, Any] = {}
            for data in workload.scattered:
                scattered = await client.scatter({data.key: data.value})
                futures[data.key] = scattered[data.key]
                if data.replicas > 1:
                    await client.replicate([futures[data.key]], n=data.replicas)
            start = trio.current_time()
            healed_at = start + last_heal(self.plan)
            trace.add(CLIENT_NODE, "workload starts")
            nursery.start_soon(self._inject_faults, start)
            collector = _Collector(client, futures, len(workload.keys), self.observed, trace, cluster.ledger)
            async with trio.open_nursery() as waiters:
                with trio.move_on_at(healed_at + settings.liveness_bound) as liveness:
                    waiters.start_soon(collector.run, waiters)
                    for key in futures:
                        collector.watch(key)
                    await self._submit(client, futures, collector, start)
                    await collector.all_in.wait()
                waiters.cancel_scope.cancel(reason="every outcome is in, or the liveness bound passed")
            self.recovery_s = max(0.0, collector.last_done_at - healed_at)
            if liveness.cancelled_caught:
                pending = [k for k in workload.keys if k not in self.observed]
                self.violations.append(
                    f"liveness: {len(pending)} futures not final {settings.liveness_bound:g} s after "
                    f"the last fault healed (at {healed_at:.3f}): {pending[:10]}; "
                    + self._diagnose(futures, pending)
                )
            self.violations.extend(
                check_outcomes(
                    workload,
                    evaluate(workload),
                    self.observed,
                    witnessed_deaths=cluster.witnessed_deaths,
                    allowed_failures=settings.config.allowed_failures,
                    declared_lost={loss.key for loss in cluster.ledger.data_losses},
                )
            )
            await self._check_quiescent(max(trio.current_time(), healed_at))
            await self._deliver_again(futures)
            self.violations.extend(check_executions(workload, cluster.ledger))
            self.violations.extend(check_data_losses(cluster.ledger))
            self.violations.extend(check_deliveries(cluster.ledger))
        await self._check_forgotten()

    def _diagnose(self, futures: dict[str, Any], pending: list[str]) -> str:
        """Where each stuck future is: the client's view against the scheduler's."""
        assert self.cluster is not None and self.cluster.scheduler is not None
        tasks = self.cluster.scheduler.state.tasks
        stuck = []
        pending = sorted(pending, key=lambda k: k in futures and futures[k].done())
        for key in pending:
            future = futures.get(key)
            if future is None:
                stuck.append(f"{key} was never submitted")
                continue
            ts = tasks.get(key)
            where = "unknown to the scheduler" if ts is None else f"{ts.state.value} at the scheduler"
            if ts is not None and ts.who_has:
                where += f" (on {', '.join(ts.who_has)})"
            stuck.append(f"{key} is {future.status!r} (done={future.done()}) at the client, {where}")
        return "; ".join(stuck[:5])

    async def _submit(self, client: AsyncClient, futures: dict[str, Any], collector: _Collector, start: float) -> None:
        """Submit the workload's waves at their times, futures as arguments."""
        for wave, at in enumerate(self.workload.wave_times):
            await trio.sleep_until(start + at)
            self.trace.add(CLIENT_NODE, f"submits wave {wave}")
            for node in self.workload.nodes:
                if node.wave == wave:
                    args = [futures[a.key] if isinstance(a, Ref) else a for a in node.args]
                    futures[node.key] = client.submit(FUNCTIONS[node.op], node.key, *args, key=node.key)
                    collector.watch(node.key)

    async def _check_quiescent(self, healed_at: float) -> None:
        """Once every fault healed and things settled: membership and invariants."""
        cluster, settings = self.cluster, self.settings
        assert cluster is not None and cluster.scheduler is not None
        await trio.sleep_until(healed_at + settings.settle)
        scheduler = cluster.scheduler
        with trio.move_on_after(settings.liveness_bound) as membership:
            await scheduler.wait_for_workers(settings.n_workers)
        if membership.cancelled_caught:
            self.violations.append(
                f"liveness: only {len(scheduler.state.workers)} of {settings.n_workers} workers "
                f"registered {settings.liveness_bound:g} s after the faults healed"
            )
        self.trace.add("lab", "checking states")
        self.violations.extend(check_states(scheduler, cluster.live_workers()))

    async def _deliver_again(self, futures: dict[str, Any]) -> None:
        """Once calm: every finished value fetched again, every worker's copy read.

        Each goes into the ledger next to the value the collector fetched,
        for `check_deliveries` (a value fetched again may come from another
        worker, or from a recomputation).
        """
        assert self.cluster is not None
        ledger = self.cluster.ledger
        self.trace.add("lab", "fetching every value again")
        with trio.move_on_after(FETCH_PATIENCE_S):
            for key, future in futures.items():
                if future.status == "finished":
                    try:
                        ledger.delivered(key, await future, "the client's fetch at the end")
                    except Exception:  # noqa: BLE001 - lost meanwhile: no delivery to judge
                        pass
        for worker in self.cluster.live_workers():
            if worker.state is not None:
                for key in worker.state.memory():
                    if key in worker.data:
                        ledger.delivered(key, worker.data[key], f"the copy on {worker.address}")

    async def _check_forgotten(self) -> None:
        """The client left: within `settle` seconds nothing may be kept anywhere.

        Except orphans: values a late worker brought back that no client
        claimed are kept `orphan_timeout` seconds, by design (a client may
        still resubmit them), then freed; while the scheduler has any, the
        check waits for them to expire.
        """
        cluster = self.cluster
        assert cluster is not None and cluster.scheduler is not None
        start = trio.current_time()
        deadline = start + self.settings.settle
        while check_forgotten(cluster.scheduler, cluster.live_workers()) and trio.current_time() < deadline:
            if cluster.scheduler.state.orphans:
                deadline = max(deadline, start + self.settings.config.orphan_timeout + self.settings.settle)
            await trio.sleep(FORGET_POLL_S)
        self.trace.add("lab", "checking that everything was forgotten")
        self.violations.extend(check_forgotten(cluster.scheduler, cluster.live_workers()))

    async def _inject_faults(self, start: float) -> None:
        assert self.cluster is not None
        for fault in self.plan:
            await trio.sleep_until(start + fault.time)
            try:
                await self.cluster.inject(fault)
            except (ValueError, CommClosedError) as exc:
                self.violations.append(f"could not inject {fault}: {exc}")


class _Collector:
    """Records the outcome of every future, fetching values in periodic sweeps.

    A future's *final state* is noted when it happens (a done callback, in
    the trace as ``done <key> <status>``). Values are fetched every
    `SWEEP_S` seconds with one `gather` for everything finished since the
    last sweep (a few requests per worker instead of one per future); a
    value lost in between is recomputed and waited for, as `gather` does
    for any user. Failures are taken from the future itself.
    """

    def __init__(
        self, client: AsyncClient, futures: dict[str, Any], total: int, observed: dict, trace: Trace, ledger: Any
    ):
        self.client = client
        self.ledger = ledger
        self.futures = futures
        self.total = total
        self.observed = observed
        self.trace = trace
        self.ready: list[str] = []
        self.all_in = trio.Event()
        self.last_done_at = 0.0
        self._nursery: trio.Nursery | None = None

    def watch(self, key: str) -> None:
        self.futures[key].add_done_callback(lambda future, key=key: self._on_done(key, future))

    def _on_done(self, key: str, future: Any) -> None:
        self.trace.add(CLIENT_NODE, f"done {key} {future.status}")
        self.last_done_at = trio.current_time()
        self.ready.append(key)

    async def run(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        while len(self.observed) < self.total:
            await trio.sleep(SWEEP_S)
            batch, self.ready = self.ready, []
            finished = []
            for key in batch:
                future = self.futures[key]
                if future.done() and future.status != "finished":
                    error = await future.exception()
                    if error is not None:
                        self._record(key, "error", error)
                        continue
                finished.append(key)
            if finished:
                await self._fetch(finished)
        self.all_in.set()

    async def _fetch(self, keys: list[str]) -> None:
        with trio.move_on_after(FETCH_PATIENCE_S) as patience:
            try:
                values = await self.client.gather([self.futures[k] for k in keys])
            except Exception:  # one failed meanwhile: ask each on its own
                for key in keys:
                    await self._fetch_one(key)
            else:
                for key, value in zip(keys, values, strict=True):
                    self._record(key, "value", value)
        if patience.cancelled_caught:
            # One of them does not come back: let it wait alone, so that
            # the liveness check names it rather than the whole batch.
            for key in keys:
                if key not in self.observed:
                    self._nursery.start_soon(self._fetch_one, key)

    async def _fetch_one(self, key: str) -> None:
        try:
            value = await self.futures[key]
        except Exception as exc:  # every failure is an outcome to judge
            self._record(key, "error", exc)
        else:
            self._record(key, "value", value)

    def _record(self, key: str, kind: str, what: Any) -> None:
        self.observed[key] = (kind, what)
        if kind == "value":
            self.ledger.delivered(key, what, "the client's first fetch")
            self.trace.add(CLIENT_NODE, f"result {key} = {what!r}")
        else:
            self.trace.add(CLIENT_NODE, f"result {key} raised {type(what).__name__}: {what}")
