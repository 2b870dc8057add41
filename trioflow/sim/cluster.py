"""`SimCluster`: a real scheduler and real nannies and workers on a simulated network.

Every node is the production shell (`Scheduler`, `Nanny`, `Worker`), built
with ``host=<node name>`` and handed ``network.for_node(<node name>)``;
the simulation supplies only the launcher and executor (`trioflow.sim.nodes`)
and the faults. The nodes of a cluster of n workers:

    scheduler            sim://scheduler:8786
    nanny-i              sim://nanny-i:<first free port from 40000>
    worker-i             sim://worker-i:<8800 + i> (the same for every incarnation)
    client-0             (the lab's client; it only connects)

Each node lives in the cluster's nursery inside a cancel scope of its own:
crashing a node is `SimNetwork.crash` (its peers see resets) followed by
cancelling that scope. `inject` applies one `Fault`; the methods it calls
are the fault kinds of `trioflow.sim.faults`.

The cluster also *observes* the scheduler, for the oracles: after every
membership event it notes how many worker deaths each task has witnessed
(`witnessed_deaths`), which is what makes a `KilledWorker` legitimate; and
it keeps the run's `Ledger` (`trioflow.sim.ledger`): every worker lost and
what it ran and held then, every failed fetch, every scattered key the
scheduler declared lost and who held a copy at that moment, and what each
worker had when the scheduler died.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from trioflow.comm.auth import Credentials
from trioflow.config import Config
from trioflow.core.failures import DataLost
from trioflow.core.scheduler_events import (
    RecoveryEnded,
    ReplicaMissing,
    ReportErred,
    WorkerConnected,
    WorkerDisconnected,
)
from trioflow.core.scheduler_records import TaskState
from trioflow.nanny import Nanny
from trioflow.scheduler import Scheduler
from trioflow.sim.determinism import derive_rng
from trioflow.sim.faults import FAULT_KINDS, Fault
from trioflow.sim.ledger import Ledger
from trioflow.sim.nodes import SimLauncher, worker_keys

if TYPE_CHECKING:
    from trioflow.sim.network import SimNetwork
    from trioflow.sim.trace import Trace

SCHEDULER_NODE = "scheduler"
SCHEDULER_PORT = 8786
FIRST_WORKER_PORT = 8800
# How long the cluster may take to come up (virtual seconds).
STARTUP_TIMEOUT_S = 60.0


def sim_credentials(seed: int) -> Credentials:
    """A cluster's credentials drawn from `seed` (secret and challenges alike)."""
    rng = derive_rng(seed, "auth")
    return Credentials.from_cluster_secret(rng.randbytes(32), nonce=rng.randbytes)


class SimCluster:
    """A scheduler and `n_workers` nanny-supervised workers in one nursery.

    Args:
        seed: the run's seed (every random choice of every node derives from it).
        network: the simulated network.
        trace: the run's trace.
        config: tunables for every node.
        n_workers: how many nanny + worker pairs.
        nthreads: threads per worker.
        durations: (min, max) simulated seconds a task takes.
    """

    def __init__(
        self,
        *,
        seed: int,
        network: SimNetwork,
        trace: Trace,
        config: Config,
        n_workers: int,
        nthreads: int,
        durations: tuple[float, float],
    ):
        self.seed = seed
        self.network = network
        self.trace = trace
        self.config = config
        self.n_workers = n_workers
        self.nthreads = nthreads
        self.durations = durations
        self.scheduler_address = f"sim://{SCHEDULER_NODE}:{SCHEDULER_PORT}"
        # Every node authenticates as in production; the challenges come
        # from the run's seed, so a run replays byte for byte.
        self.credentials = sim_credentials(seed)
        self.scheduler: Scheduler | None = None
        self.schedulers: list[Scheduler] = []
        # The scheduler serving now (None while it is down): only its
        # events go into the ledger, not those of one being torn down.
        self._serving: Scheduler | None = None
        self._scheduler_scope: trio.CancelScope | None = None
        # When a crashed scheduler comes back (None: it is up).
        self._scheduler_back_at: float | None = None
        self.nannies: list[Nanny] = []
        self.launchers: list[SimLauncher] = []
        # key -> the most worker deaths the scheduler saw it running through.
        self.witnessed_deaths: dict[str, int] = {}
        self.ledger = Ledger()
        # Scattered keys the scheduler holds as lost right now.
        self._lost_now: set[str] = set()
        # Exceptions that escaped a node's serve (bugs), as messages.
        self.errors: list[str] = []
        self._nursery: trio.Nursery | None = None

    @property
    def nodes(self) -> list[str]:
        """Every node that may exist, in a fixed order."""
        names = [SCHEDULER_NODE]
        for i in range(self.n_workers):
            names += [f"nanny-{i}", f"worker-{i}"]
        return names + ["client-0"]

    def live_workers(self) -> list:
        """The `Worker` objects of the current, running incarnations."""
        workers = []
        for launcher in self.launchers:
            handle = launcher.current
            if handle is not None and handle.alive and handle.worker is not None:
                workers.append(handle.worker)
        return workers

    # ------------------------------------------------------------ lifetime --

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the scheduler and the nannies; return once every worker registered.

        Raises:
            RuntimeError: the cluster did not come up within STARTUP_TIMEOUT_S.
        """
        self._nursery = nursery
        await self.start_scheduler()
        for i in range(self.n_workers):
            await self._start_nanny(i)
        assert self.scheduler is not None
        with trio.move_on_after(STARTUP_TIMEOUT_S):
            await self.scheduler.wait_for_workers(self.n_workers)
            return
        raise RuntimeError(f"the simulated cluster did not start within {STARTUP_TIMEOUT_S:g} s")

    async def start_scheduler(self) -> None:
        assert self._nursery is not None
        scheduler = Scheduler(
            host=SCHEDULER_NODE,
            port=SCHEDULER_PORT,
            config=self.config,
            network=self.network.for_node(SCHEDULER_NODE),
            credentials=self.credentials,
        )
        self._observe(scheduler)
        scope = trio.CancelScope()

        async def run(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await scheduler.serve(task_status=task_status)
            except Exception as exc:
                self.errors.append(f"Scheduler.serve raised {type(exc).__name__}: {exc}")
                self.trace.add(SCHEDULER_NODE, f"exit: unexpected {type(exc).__name__}: {exc}")

        incarnation = len(self.schedulers) + 1
        address = await self._nursery.start(run, name=f"scheduler#{incarnation}")
        self.scheduler, self._scheduler_scope, self._serving = scheduler, scope, scheduler
        self._lost_now.clear()
        self.schedulers.append(scheduler)
        self.trace.add(SCHEDULER_NODE, f"serving at {address} incarnation={incarnation}")

    async def _start_nanny(self, i: int) -> None:
        assert self._nursery is not None
        launcher = SimLauncher(
            i,
            scheduler_address=self.scheduler_address,
            port=FIRST_WORKER_PORT + i,
            network=self.network,
            nursery=self._nursery,
            config=self.config,
            nthreads=self.nthreads,
            seed=self.seed,
            durations=self.durations,
            trace=self.trace,
            credentials=self.credentials,
            ledger=self.ledger,
        )
        node = f"nanny-{i}"
        nanny = Nanny(
            launcher,
            host=node,
            config=self.config,
            network=self.network.for_node(node),
            rng=derive_rng(self.seed, node),
            credentials=self.credentials,
        )
        self.launchers.append(launcher)
        self.nannies.append(nanny)

        async def run(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await nanny.serve(task_status=task_status)
            except Exception as exc:
                self.errors.append(f"{node}: Nanny.serve raised {type(exc).__name__}: {exc}")
                self.trace.add(node, f"exit: unexpected {type(exc).__name__}: {exc}")

        await self._nursery.start(run, name=node)

    def _observe(self, scheduler: Scheduler) -> None:
        """Watch the scheduler's core: what each event tells the oracles.

        Reads the core's own count of the deaths each task witnessed
        (`suspicious`, which only grows), for the KilledWorker oracle; and
        writes the ledger's facts (module docstring), each taken from the
        workers themselves at the moment of the event.
        """
        state = scheduler.state
        handle = state.handle
        deaths = self.witnessed_deaths

        def observed_handle(event):
            serving = scheduler is self._serving
            if serving:
                self._before(state, event)
            out = handle(event)
            if serving:
                self._after(state, event, out)
            if isinstance(event, (WorkerConnected, WorkerDisconnected)):
                for key, ts in state.tasks.items():
                    if ts.suspicious > deaths.get(key, 0):
                        deaths[key] = ts.suspicious
            return out

        state.handle = observed_handle  # type: ignore[method-assign]

    def _before(self, state, event) -> None:
        now = trio.current_time()
        if isinstance(event, (WorkerDisconnected, WorkerConnected)) and event.worker in state.workers:
            # Its registration ends (a new one from the same address
            # replaces it): whatever that worker runs or holds may be lost.
            node = _node(event.worker)
            how = "left the scheduler" if isinstance(event, WorkerDisconnected) else "replaced by a new registration"
            keys = worker_keys(self._current_worker(node)) | set(state.worker_keys(event.worker))
            self.ledger.worker_lost(node, keys, now, how)
        elif isinstance(event, ReplicaMissing):
            self.ledger.excuse([event.key], f"a fetch failed at {now:.3f} (reported by {event.worker})")

    def _after(self, state, event, out) -> None:
        now = trio.current_time()
        if isinstance(event, WorkerConnected):
            self.ledger.registered(_node(event.worker))
        elif isinstance(event, RecoveryEnded):
            back = {_node(a): worker_keys(self._current_worker(_node(a))) for a in state.workers}
            self.ledger.recovery_ended(now, back)
        for key in list(self._lost_now):
            ts = state.tasks.get(key)
            if ts is None or ts.state is not TaskState.LOST:
                self._lost_now.discard(key)
        # A report of LostData declares the data lost when the key has just
        # become lost, or when the scheduler has no record of it at all; a
        # report that repeats an old loss (a key lost earlier, a dependent
        # inheriting the failure of an erred input) declares nothing new.
        declared = {m.failure.key for m in out if isinstance(m, ReportErred) and isinstance(m.failure, DataLost)}
        for key in sorted(declared):
            ts = state.tasks.get(key)
            if ts is not None and (ts.state is not TaskState.LOST or key in self._lost_now):
                continue
            if ts is not None:
                self._lost_now.add(key)
            self.ledger.data_lost(key, now, self._holders(key, state))

    def _holders(self, key: str, state) -> tuple[tuple[str, str], ...]:
        """Every live worker that offers a copy of `key`, and how it stands."""
        out = []
        for launcher in self.launchers:
            handle = launcher.current
            if handle is None or not handle.alive or handle.ending or handle.worker is None:
                continue  # a process being killed is lost already
            worker = handle.worker
            if worker.state is None or key not in worker.state.memory() or key not in worker.data:
                continue
            node = _node(worker.address)
            if worker.address in state.workers:
                why = "registered, struck" if node in self.ledger.cut_off else "registered"
            elif node in self.ledger.cut_off:
                why = "cut off"
            else:
                why = "absent"
            out.append((node, why))
        return tuple(out)

    def _current_worker(self, node: str):
        launcher = self.launchers[int(node.split("-")[1])]
        handle = launcher.current
        return None if handle is None else handle.worker

    # -------------------------------------------------------------- faults --

    async def inject(self, fault: Fault) -> None:
        """Apply `fault` now; heal it `fault.duration` seconds later."""
        self.trace.add(fault.target, f"fault {fault}")
        if FAULT_KINDS[fault.kind].target != "scheduler":
            for node in fault.targets:
                self.ledger.struck(node)
        await getattr(self, f"_inject_{fault.kind}")(fault)

    def _launcher(self, node: str) -> SimLauncher:
        prefix = "worker-"
        if not node.startswith(prefix) or not node[len(prefix) :].isdigit():
            raise ValueError(f"fault target {node!r} is not a worker")
        index = int(node[len(prefix) :])
        if index >= self.n_workers:
            raise ValueError(f"fault target {node!r}: the cluster has {self.n_workers} workers")
        return self.launchers[index]

    async def _inject_crash(self, fault: Fault) -> None:
        handle = self._launcher(fault.target).current
        if handle is not None:
            handle.kill(reason="crash fault")

    async def _inject_restart(self, fault: Fault) -> None:
        self._launcher(fault.target)  # validate
        self.nannies[int(fault.target.split("-")[1])].request_restart()

    async def _inject_reset(self, fault: Fault) -> None:
        self._launcher(fault.target)
        self.network.reset(fault.target)

    async def _inject_hang(self, fault: Fault) -> None:
        self._launcher(fault.target)
        self.network.black_hole(fault.target)
        self._heal_later(fault, lambda: self.network.heal_black_hole(fault.target))

    async def _inject_partition(self, fault: Fault) -> None:
        cut = fault.targets
        for node in cut:
            self._launcher(node)
        # A worker's nanny is on the same machine: it is cut off with it.
        group = [n for node in cut for n in (node, node.replace("worker-", "nanny-"))]
        rest = [n for n in self.nodes if n not in group]
        self.network.partition(group, rest)
        self._heal_later(fault, self.network.heal_partition)

    async def _inject_scheduler_restart(self, fault: Fault) -> None:
        if fault.target != SCHEDULER_NODE:
            raise ValueError(f"a scheduler_restart targets {SCHEDULER_NODE!r}, not {fault.target!r}")
        back_at = trio.current_time() + fault.duration
        if self._scheduler_back_at is not None:
            # Already down: the second fault only keeps it down longer.
            self._scheduler_back_at = max(self._scheduler_back_at, back_at)
            return
        assert self._scheduler_scope is not None and self._nursery is not None
        self._serving = None
        self.ledger.scheduler_died(
            trio.current_time(), {_node(w.address): worker_keys(w) for w in self.live_workers()}
        )
        self.network.crash(SCHEDULER_NODE)
        self._scheduler_scope.cancel(reason="simulated scheduler crash")
        self._scheduler_back_at = back_at
        self._nursery.start_soon(self._restart_scheduler, trio.current_time())

    async def _restart_scheduler(self, down_since: float) -> None:
        """Serve a new scheduler at the same address once its downtime is over."""
        while self._scheduler_back_at is not None and trio.current_time() < self._scheduler_back_at:
            await trio.sleep_until(self._scheduler_back_at)
        self._scheduler_back_at = None
        await self.start_scheduler()
        self.trace.span(SCHEDULER_NODE, "scheduler down", down_since, trio.current_time() - down_since)

    def _heal_later(self, fault: Fault, heal) -> None:
        start = trio.current_time()

        async def later() -> None:
            await trio.sleep(fault.duration)
            heal()
            self.trace.span(fault.target, fault.kind, start, fault.duration)

        assert self._nursery is not None
        self._nursery.start_soon(later)


def _node(address: str) -> str:
    """``sim://worker-2:8802`` -> ``worker-2``."""
    return address.split("//", 1)[-1].rsplit(":", 1)[0]
