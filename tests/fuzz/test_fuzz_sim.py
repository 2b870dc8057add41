"""Fuzzing the real shells on the simulated network: a stranger can hurt only its own connection.

A real `Scheduler`, two real `Nanny`s each supervising a real `Worker`
(`trioflow.sim.nodes.SimLauncher`, `SimExecutor`) and a well-behaved
`AsyncClient` run on a `SimNetwork` inside the test's `trio.run`, on Trio's
virtual clock. Hypothesis then plays an attacker (tests/fuzz/attacks.py):
each example opens one connection as a client or a worker (to the
scheduler), as a peer (to a worker's data port) or as the scheduler (to a
nanny's control port), writes a few broken batches, and closes. The same
cluster lives through every example of a test, so damage that builds up
shows too.

After every example the oracle (design.md §6 rule 5, docs/protocol.md):

* no server ended: every `serve` (scheduler, nannies, workers) still runs
  and none raised (a requested restart of a worker is allowed where the
  attacker's role may ask for one);
* the cluster comes back: the real workers are registered again, and no
  worker the attacker announced is left;
* the well-behaved client's tasks that were running during the attack end
  (correct, or cancelled by a restart the attacker was allowed to ask for;
  any outcome when the attacker ran them itself as a registered worker),
  and a fresh `submit`, `map` + `gather` and `scatter` done afterwards
  give exactly the right values;
* every process's `ByteBudget` is back to 0 bytes in use;
* no log record is longer than 2,000 characters, and none reports an
  internal error.

How Hypothesis and Trio share the test: Hypothesis runs in a worker thread
(`trio.to_thread.run_sync`) and runs each example on the Trio loop with
`trio.from_thread.run`. The virtual clock jumps ahead whenever everything
is idle only while an example runs (`autojump_threshold = 0`); while
Hypothesis draws the next example it stands still, so no timeout fires
behind the attacker's back.

Examples per role: `FUZZ_EXAMPLES` (deterministic: derandomized). Run more
locally with ``TRIOFLOW_FUZZ_EXAMPLES=2000 pytest tests/fuzz``.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from contextlib import asynccontextmanager

import trio
import trio.testing
from hypothesis import HealthCheck, Phase, given, settings

import trioflow
from trioflow.comm import Connection, FrameLimits
from trioflow.comm.frames import batch_frames, encode_message
from trioflow.config import Config
from trioflow.errors import CommClosedError, ProtocolError
from trioflow.nanny import Nanny
from trioflow.scheduler import Scheduler
from trioflow.sim.determinism import deterministic_scheduling
from trioflow.sim.network import SimNetwork
from trioflow.sim.nodes import SimLauncher
from trioflow.sim.trace import Trace

from tests.fuzz.attacks import Attack, attacks, examples

# Examples per role in CI: the file takes about 8 s of CPU (16 s on a loaded 2-core machine).
FUZZ_EXAMPLES = examples(60)
SEED = 20261130
N_WORKERS = 2
SCHEDULER = "sim://scheduler:8786"
WORKER_PORT = 8800
# Small timeouts, so that a connection left half-open ends quickly.
CONFIG = Config(
    handshake_timeout=0.5,
    idle_timeout=2.0,
    connect_timeout=2.0,
    restart_timeout=5.0,
    peer_timeout=2.0,
)
# Tasks of the well-behaved client in flight during each attack.
N_RUNNING = 6
# Virtual seconds a task of the well-behaved client takes.
DURATIONS = (0.02, 0.2)
# Virtual seconds the oracle waits for anything (a result, the cluster to
# come back, a budget to drain): far beyond every timeout in CONFIG.
ORACLE_TIMEOUT_S = 60.0
MAX_LOG_CHARS = 2_000


def inc(x):
    return x + 1


class LogRecords(logging.Handler):
    """Every record of the `trioflow` loggers, from INFO up."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class FuzzCluster:
    """The servers of one test, the well-behaved client, and the oracle."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.net = SimNetwork(random.Random(SEED), latency=(0.0005, 0.002))
        self.trace = Trace()
        self.scheduler: Scheduler | None = None
        self.nannies: list[Nanny] = []
        self.launchers: list[SimLauncher] = []
        self.client: trioflow.AsyncClient | None = None
        # "<server> ended: why": a serve that returned or raised.
        self.ended: list[str] = []
        self.logs = LogRecords()
        self.numbers = itertools.count(1_000)
        self.stopping = False
        # The first example that failed, and why (Hypothesis shrinks
        # against a cluster the failure may have damaged: the first one is
        # the one to believe).
        self.first_failure: str | None = None

    @property
    def worker_addresses(self) -> list[str]:
        return [f"sim://worker-{i}:{WORKER_PORT + i}" for i in range(N_WORKERS)]

    def target(self, role: str) -> str:
        if role == "peer":
            return self.worker_addresses[0]
        if role == "control":
            return self.nannies[0].address
        return SCHEDULER

    async def _serve(self, name: str, serve, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await serve(task_status=task_status)
        except Exception as exc:
            self.ended.append(f"{name}.serve raised {type(exc).__name__}: {exc}")
        else:
            if not self.stopping:
                self.ended.append(f"{name}.serve returned")

    async def start(self, nursery: trio.Nursery) -> None:
        self.scheduler = Scheduler(
            host="scheduler", port=8786, config=CONFIG, network=self.net.for_node("scheduler")
        )
        await nursery.start(self._serve, "scheduler", self.scheduler.serve)
        for i in range(N_WORKERS):
            launcher = SimLauncher(
                i, scheduler_address=SCHEDULER, port=WORKER_PORT + i, network=self.net, nursery=nursery,
                config=CONFIG, nthreads=2, seed=SEED, durations=DURATIONS, trace=self.trace,
            )
            nanny = Nanny(
                launcher, host=f"nanny-{i}", config=CONFIG, network=self.net.for_node(f"nanny-{i}"),
                rng=random.Random(i),
            )
            self.launchers.append(launcher)
            self.nannies.append(nanny)
            await nursery.start(self._serve, f"nanny-{i}", nanny.serve)
        with trio.fail_after(ORACLE_TIMEOUT_S):
            await self.scheduler.wait_for_workers(N_WORKERS)

    # ------------------------------------------------------------ attack --

    async def attack(self, attack: Attack, keys: list[str], after_preamble) -> None:
        """Connect as the attacker, write the steps, linger, close.

        `keys` are what `KeyRef`s resolve to; a registered attacker adds
        the keys of the tasks the scheduler sends it. `after_preamble()` is
        awaited once the opening steps are written.
        """
        stream = await self.net.for_node("attacker").connect(self.target(attack.role))
        conn = Connection(stream, FrameLimits(), peer="victim")

        async def read() -> None:
            try:
                while True:
                    for message in await conn.receive():
                        if message.get("op") == "compute_task" and type(message.get("key")) is str:
                            keys.append(message["key"])
            except (CommClosedError, ProtocolError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            try:
                for i, step in enumerate(attack.steps):
                    if i == attack.n_preamble:
                        await after_preamble()
                    for piece in step.pieces(keys):
                        await stream.send_all(piece)
                    await trio.sleep(step.pause)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the victim closed: it is allowed to
            if len(attack.steps) <= attack.n_preamble:
                await after_preamble()
            await trio.sleep(attack.linger)
            nursery.cancel_scope.cancel()
        await stream.aclose()

    async def run_example(self, attack: Attack) -> None:
        """One Hypothesis example, on the Trio loop: attack, then the oracle."""
        self.clock.autojump_threshold = 0
        try:
            await self._run_example(attack)
        except BaseException as exc:
            if self.first_failure is None:
                self.first_failure = f"{type(exc).__name__}: {exc}\n{attack.describe()}"
            raise
        finally:
            self.clock.autojump_threshold = math.inf

    async def _run_example(self, attack: Attack) -> None:
        assert self.client is not None
        self.logs.records.clear()
        handles_before = sum(len(launcher.handles) for launcher in self.launchers)
        first = next(self.numbers)
        # Tasks in flight during the attack, submitted once the attacker has
        # said hello (so that a registered attacker may be sent some of
        # them); their keys are the attacker's to name (KeyRef).
        running: list = []
        keys: list[str] = []

        async def submit() -> None:
            running.extend(
                self.client.map(inc, range(first, first + N_RUNNING), key=[f"fuzz-{first}-{i}" for i in range(N_RUNNING)])
            )
            keys[:0] = [f.key for f in running]
            await trio.sleep(0.01)

        await self.attack(attack, keys, submit)
        await trio.sleep(0.5)  # what the attacker set in motion reaches everyone
        await self.check(attack, running, first, handles_before)

    # ------------------------------------------------------------ oracle --

    async def check(self, attack: Attack, running: list, first: int, handles_before: int) -> None:
        assert self.client is not None and self.scheduler is not None
        self.check_servers(attack.role, handles_before)
        await self.wait("the real workers to be registered again, and no other", self.cluster_whole)
        await self.check_running(attack.role, running, first)
        del running
        n = next(self.numbers) * 10
        with trio.fail_after(ORACLE_TIMEOUT_S):
            assert await self.client.submit(inc, n) == n + 1
            futures = self.client.map(inc, range(n, n + 4))
            assert await self.client.gather(futures) == [n + 1, n + 2, n + 3, n + 4]
            [scattered] = await self.client.scatter([n])
            assert await self.client.submit(inc, scattered) == n + 1
            assert await self.client.gather(scattered) == n
        del futures, scattered
        await self.wait("every ByteBudget to drain", self.budgets_drained)
        self.check_servers(attack.role, handles_before)
        self.check_logs()

    def check_servers(self, role: str, handles_before: int) -> None:
        assert not self.ended, f"a server ended: {self.ended}"
        for launcher in self.launchers:
            for handle in launcher.handles:
                assert not handle.errors, f"a worker raised: {handle.errors}"
        if role not in ("client", "control"):
            # Only a client (`restart`) or the scheduler's role on a nanny's
            # port (`restart_worker`) may ask for workers to be replaced.
            handles = sum(len(launcher.handles) for launcher in self.launchers)
            assert handles == handles_before, "a worker died although nobody may restart it"

    def cluster_whole(self) -> bool:
        assert self.scheduler is not None
        if sorted(self.scheduler.state.workers) != self.worker_addresses:
            return False
        for launcher, address in zip(self.launchers, self.worker_addresses):
            handle = launcher.current
            if handle is None or not handle.alive or handle.worker is None:
                return False
            link = self.scheduler.workers.get(address)
            if link is None or link.conn.closed or not handle.worker._link_registered:
                return False
        return all(not nanny._restart_now.is_set() for nanny in self.nannies)

    def budgets_drained(self) -> bool:
        assert self.scheduler is not None
        budgets = [self.scheduler.budget] + [launcher.current.worker.budget for launcher in self.launchers]
        return all(budget.in_use == 0 for budget in budgets)

    async def wait(self, what: str, condition) -> None:
        with trio.move_on_after(ORACLE_TIMEOUT_S):
            while not condition():
                await trio.sleep(0.05)
            return
        raise AssertionError(f"waited {ORACLE_TIMEOUT_S:g} virtual seconds for {what}")

    async def check_running(self, role: str, running: list, first: int) -> None:
        """The tasks in flight during the attack end, and end right."""
        assert self.client is not None
        for future in running:
            with trio.move_on_after(ORACLE_TIMEOUT_S) as waiting:
                await future.exception()
            if waiting.cancelled_caught:
                raise AssertionError(f"task {future.key} of the well-behaved client never ended")
        for i, future in enumerate(running):
            exception = await future.exception()
            if exception is None:
                value = await future
                if role != "worker":
                    assert value == first + i + 1, f"task {future.key} gave {value!r}"
            elif role == "worker":
                pass  # a registered worker ran it, and may report what it likes
            elif role == "client" and isinstance(exception, trioflow.CancelledError):
                assert "restarted" in str(exception)
            else:
                raise AssertionError(f"task {future.key} of the well-behaved client failed: {exception!r}")

    def check_logs(self) -> None:
        for record in self.logs.records:
            text = record.getMessage()
            assert len(text) <= MAX_LOG_CHARS, f"a log record of {len(text)} characters: {text[:300]}..."
            assert "internal error" not in text, f"{text}\n{record.exc_text or ''}"
            assert record.exc_info is None, f"a log record with a traceback: {text}"


@asynccontextmanager
async def fuzz_cluster(clock):
    """A running `FuzzCluster` with its client; everything is stopped after."""
    cluster = FuzzCluster(clock)
    logger = logging.getLogger("trioflow")
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(cluster.logs)
    clock.autojump_threshold = 0
    try:
        async with trio.open_nursery() as nursery:
            await cluster.start(nursery)
            async with trioflow.AsyncClient(
                SCHEDULER, config=CONFIG, network=cluster.net.for_node("client-0"), rng=random.Random(SEED)
            ) as cluster.client:
                yield cluster
            cluster.stopping = True
            nursery.cancel_scope.cancel(reason="the test is over")
    finally:
        logger.removeHandler(cluster.logs)
        logger.setLevel(old_level)


def fuzz(cluster: FuzzCluster, role: str, n_examples: int) -> None:
    """Run Hypothesis (in this worker thread) against `cluster`, as `role`."""

    @settings(
        max_examples=n_examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(attack=attacks(role, cluster.worker_addresses))
    def example(attack: Attack) -> None:
        trio.from_thread.run(cluster.run_example, attack)

    example()


async def run_fuzz(mock_clock, role: str) -> None:
    async with fuzz_cluster(mock_clock) as cluster:
        mock_clock.autojump_threshold = math.inf
        try:
            await trio.to_thread.run_sync(fuzz, cluster, role, FUZZ_EXAMPLES)
        except BaseException:
            if cluster.first_failure is not None:
                print(f"FIRST FAILING EXAMPLE (as {role}):\n{cluster.first_failure}")
            raise
        finally:
            mock_clock.autojump_threshold = 0


async def test_fuzz_scheduler_as_a_client(mock_clock):
    """Broken batches from a stranger saying hello as a client end only its own connection."""
    await run_fuzz(mock_clock, "client")


async def test_fuzz_scheduler_as_a_worker(mock_clock):
    """A stranger registering as a worker and sending broken reports hurts nobody else."""
    await run_fuzz(mock_clock, "worker")


async def test_fuzz_worker_data_port_as_a_peer(mock_clock):
    """Broken get_data requests and bytes on a worker's data port leave the worker serving."""
    await run_fuzz(mock_clock, "peer")


async def test_fuzz_nanny_control_port(mock_clock):
    """Broken requests on a nanny's control port leave the nanny supervising its worker."""
    await run_fuzz(mock_clock, "control")


# ---------------------------------------------------------------- found bugs --


def _batch(*wires: dict) -> bytes:
    return b"".join(batch_frames([encode_message(wire) for wire in wires]))


async def _requests_racing_the_end(attempts: int) -> list[str]:
    """`attempts` clients that each send a `wait_for_workers` and, in the same
    write, a batch with an unknown op; the internal errors the scheduler logs."""
    logs = LogRecords()
    logger = logging.getLogger("trioflow")
    logger.addHandler(logs)
    net = SimNetwork(random.Random(SEED))
    scheduler = Scheduler(host="scheduler", port=8786, config=CONFIG, network=net.for_node("scheduler"))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.serve)
            for i in range(attempts):
                stream = await net.for_node("attacker").connect(SCHEDULER)
                await stream.send_all(_batch({"op": "hello", "role": "client", "protocol": 1, "client_id": f"c{i}"}))
                await stream.send_all(
                    _batch({"op": "wait_for_workers", "n": 5, "request_id": 1}) + _batch({"op": "frobnicate"})
                )
                await trio.sleep(0.1)
                await stream.aclose()
            nursery.cancel_scope.cancel()
    finally:
        logger.removeHandler(logs)
    return [
        f"{r.getMessage()}: {r.exc_info[1]!r}" for r in logs.records if "internal error" in r.getMessage()
    ]


def test_a_request_racing_its_connections_end_is_no_internal_error():
    """A request (wait_for_workers, run, replicate) followed in the same write by
    a bad batch closes that connection cleanly: no internal error is logged."""
    with deterministic_scheduling(SEED):
        errors = trio.run(
            _requests_racing_the_end, 40, clock=trio.testing.MockClock(autojump_threshold=0)
        )
    assert errors == []
