"""Simulated machines: a worker "process" is a Trio task you can kill.

The real `Worker` and `Nanny` run unchanged; the simulator only supplies
the two interfaces design.md §3 asks every shell to take:

* `SimLauncher` (the nanny's `Launcher`, rule 4) starts a `Worker` as a
  task in the cluster's nursery, inside a cancel scope of its own, and
  returns a `SimWorkerHandle`. `kill` is SIGKILL: the network first
  resets every connection of the node (peers see a reset, as when the
  kernel cleans up a dead process), then the scope is cancelled. The nanny
  notices through `wait` and launches the next incarnation at the same
  address, as it would a process.
* `SimExecutor` (rule 3) runs a task function inline, after sleeping a
  seeded duration on the virtual clock. No threads: a simulated minute of
  work costs microseconds, and a run is a pure function of its seed. A
  poison function raises `WorkerCrash`, which the executor turns into a
  `kill` of its own worker.

Each worker is watched for one promise of work stealing (`_witness_steals`):
a task it gave up to a steal never runs there afterwards, unless the
scheduler assigned it there again. A break is an error of its handle, so
a violation of the run.

What this does not model: threads inside a worker (a task's function runs
in one go, in the worker's Trio thread, at the end of its duration), memory
(no nanny memory limit: the handle has no pid), and a process that ignores
SIGTERM (`terminate` always succeeds).
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from trioflow.comm.auth import Credentials

from trioflow.config import Config
from trioflow.errors import CommClosedError, ProtocolError

if TYPE_CHECKING:
    from trioflow.sim.ledger import Ledger
    from trioflow.sim.network import SimNetwork
    from trioflow.sim.trace import Trace
    from trioflow.worker import Worker

# Exit codes reported by `SimWorkerHandle.wait`, as a process would.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_KILLED = -9
EXIT_TERMINATED = -15


class WorkerCrash(BaseException):
    """Raised by a poison task function: "this process dies now".

    A `BaseException` (not an `Exception`), so the worker's wrapper does not
    capture it as a user error, exactly as it cannot capture a segfault.
    """


# The label of the task function that ran last, set by the function itself
# (`note_running`) and read by the executor for the trace. Plain global
# state is enough: functions run inline, one at a time, between awaits.
_running_label: str | None = None


def note_running(label: str) -> None:
    """Called by a workload function: tells the executor which task it is."""
    global _running_label
    _running_label = label


class SimExecutor:
    """Runs task functions inline after a seeded simulated duration.

    Args:
        node: the worker's node name (for the trace).
        handle: the worker's handle, to kill on `WorkerCrash`.
        nthreads: at most this many functions "run" at once.
        rng: draws each task's duration.
        durations: (min, max) seconds a task takes.
        trace: where executions are recorded.
        ledger: where each call of a task function is counted, if anywhere.
    """

    def __init__(
        self,
        node: str,
        handle: SimWorkerHandle,
        nthreads: int,
        rng: random.Random,
        durations: tuple[float, float],
        trace: Trace,
        ledger: Ledger | None = None,
    ):
        self.node = node
        self.handle = handle
        self.limiter = trio.CapacityLimiter(nthreads)
        self.rng = rng
        self.durations = durations
        self.trace = trace
        self.ledger = ledger

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Sleep the task's duration, then call `fn()`; a crash kills the worker.

        Cancellation: a cancelled run never calls `fn` (the "thread" died
        with its process, or the worker shut down).
        """
        global _running_label
        async with self.limiter:
            started = trio.current_time()
            duration = self.rng.uniform(*self.durations)
            await trio.sleep(duration)
            _running_label = None
            try:
                result = fn()
            except WorkerCrash:
                self._count(_running_label)
                self.trace.span(self.node, f"ran {_running_label} (crashed)", started, duration)
                self.trace.add(self.node, f"crash by poison {_running_label}")
                self.handle.kill(reason="poison")
                await trio.sleep_forever()
            self._count(_running_label)
            self.trace.span(self.node, f"ran {_running_label}", started, duration)
            return result

    def _count(self, label: str | None) -> None:
        if self.ledger is not None and label is not None:
            self.ledger.ran(label, self.node, trio.current_time())

    async def run_now(self, fn: Callable[[], Any]) -> Any:
        """Call `fn()` at once (`Client.run`), inline."""
        await trio.lowlevel.checkpoint()
        return fn()


class SimWorkerHandle:
    """One incarnation of a simulated worker, as the nanny sees it."""

    def __init__(
        self, node: str, incarnation: int, network: SimNetwork, trace: Trace, ledger: Ledger | None = None
    ):
        self.node = node
        self.ledger = ledger
        self.incarnation = incarnation
        self.network = network
        self.trace = trace
        self.pid: int | None = None  # no process: no memory limit either
        self.scope = trio.CancelScope()
        self.worker: Worker | None = None
        self.exit_code: int | None = None
        # Exceptions `Worker.serve` raised other than "scheduler unreachable":
        # bugs, reported as violations.
        self.errors: list[str] = []
        # Known, harmless oddities (reported, not violations).
        self.notes: list[str] = []
        self._ending_as: int | None = None
        self._done = trio.Event()

    @property
    def alive(self) -> bool:
        return self.exit_code is None

    @property
    def ending(self) -> bool:
        """Killed or told to stop: still unwinding, but already gone."""
        return self._ending_as is not None

    async def run(self, worker: Worker) -> None:
        """The "process": serve until the worker ends or is killed."""
        self.worker = worker
        code = EXIT_OK
        try:
            with self.scope:
                await worker.serve()
        except CommClosedError as exc:
            code = EXIT_ERROR
            self.trace.add(self.node, f"exit: {exc}")
        except Exception as exc:
            code = EXIT_ERROR
            if self.scope.cancel_called and _only_comm_errors(exc):
                # Being killed or stopped while a connection broke: the
                # connection's error may come out instead of the
                # cancellation (alone or in a group, depending on which
                # nursery saw it first). Harmless: the process is ending.
                self.notes.append(f"{self.node}: {_summary(exc)} escaped Worker.serve while it was stopped")
                self.trace.add(self.node, f"exit while stopping: {_summary(exc)}")
            else:  # a bug in the worker shell
                details = "".join(traceback.format_exception(exc))
                self.errors.append(f"{self.node}: Worker.serve raised {_summary(exc)}\n{details}")
                self.trace.add(self.node, f"exit: unexpected {_summary(exc)}")
        finally:
            if self._ending_as is not None:
                code = self._ending_as
            self.exit_code = code
            self.trace.add(self.node, f"exited code={code} incarnation={self.incarnation}")
            if self.ledger is not None:
                self.ledger.worker_lost(
                    self.node, worker_keys(worker), trio.current_time(), f"its process ended, code {code}"
                )
            self._done.set()

    async def wait(self) -> int | None:
        await self._done.wait()
        return self.exit_code

    def kill(self, reason: str = "kill") -> None:
        """SIGKILL: peers see every connection reset; nothing runs after."""
        if not self.alive or self._ending_as == EXIT_KILLED:
            return
        self._ending_as = EXIT_KILLED
        self.trace.add(self.node, f"killed ({reason})")
        self.network.crash(self.node)
        self.scope.cancel(reason=f"simulated SIGKILL ({reason})")

    async def terminate(self, grace: float) -> None:
        """SIGTERM: the worker shuts down politely (says goodbye), then SIGKILL."""
        if self.alive and self._ending_as is None:
            self._ending_as = EXIT_TERMINATED
            self.trace.add(self.node, "terminated")
            self.scope.cancel(reason="simulated SIGTERM")
        with trio.move_on_after(grace):
            await self._done.wait()
        if self.alive:
            self.kill(reason=f"still alive {grace:g} s after SIGTERM")
            await self._done.wait()


def worker_keys(worker: Worker | None) -> set[str]:
    """The keys a worker runs (in a thread, even a cancelled run) or holds."""
    if worker is None or worker.state is None:
        return set()
    return set(worker.state.executing) | set(worker.data)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _only_comm_errors(exc: BaseException) -> bool:
    return all(isinstance(leaf, (CommClosedError, ProtocolError)) for leaf in _leaves(exc))


def _summary(exc: BaseException) -> str:
    """``Type: message`` of each leaf of `exc` (no object ids, no tracebacks)."""
    return "; ".join(f"{type(leaf).__name__}: {leaf}" for leaf in _leaves(exc))


class SimLauncher:
    """Launches incarnations of worker `index` for its nanny (a `Launcher`).

    Args:
        index: the worker's number; its node is ``worker-<index>``.
        scheduler_address: where the worker registers.
        port: the worker's fixed port (every incarnation serves there).
        network: the simulated network.
        nursery: where the worker tasks run (the cluster's).
        config: the worker's tunables.
        nthreads: the worker's threads.
        seed: the run's seed (each incarnation draws durations from it).
        durations: (min, max) seconds a task takes.
        trace: the run's trace.
        credentials: the cluster's credentials, for the workers.
        ledger: where runs and process ends are written down, if anywhere.
    """

    def __init__(
        self,
        index: int,
        *,
        scheduler_address: str,
        port: int,
        network: SimNetwork,
        nursery: trio.Nursery,
        config: Config,
        nthreads: int,
        seed: int,
        durations: tuple[float, float],
        trace: Trace,
        credentials: Credentials | None = None,
        ledger: Ledger | None = None,
    ):
        self.index = index
        self.credentials = credentials
        self.ledger = ledger
        self.node = f"worker-{index}"
        self.scheduler_address = scheduler_address
        self.port = port
        self.network = network
        self.nursery = nursery
        self.config = config
        self.nthreads = nthreads
        self.seed = seed
        self.durations = durations
        self.trace = trace
        self.handles: list[SimWorkerHandle] = []

    @property
    def current(self) -> SimWorkerHandle | None:
        return self.handles[-1] if self.handles else None

    async def launch(self, nanny_address: str, memory_limit: int | None = None) -> SimWorkerHandle:
        from trioflow.sim.determinism import derive_rng
        from trioflow.worker import Worker

        incarnation = len(self.handles) + 1
        handle = SimWorkerHandle(self.node, incarnation, self.network, self.trace, self.ledger)
        executor = SimExecutor(
            self.node,
            handle,
            self.nthreads,
            derive_rng(self.seed, self.node, incarnation, "durations"),
            self.durations,
            self.trace,
            self.ledger,
        )
        worker = Worker(
            self.scheduler_address,
            nthreads=self.nthreads,
            host=self.node,
            port=self.port,
            config=self.config,
            network=self.network.for_node(self.node),
            executor=executor,
            nanny_address=nanny_address,
            pid=None,
            rng=derive_rng(self.seed, self.node, incarnation, "reconnect"),
            credentials=self.credentials,
        )
        _witness_steals(worker, handle)
        self.handles.append(handle)
        self.trace.add(self.node, f"launched incarnation={incarnation}")
        self.nursery.start_soon(handle.run, worker, name=f"{self.node}#{incarnation}")
        await trio.lowlevel.checkpoint()
        return handle



def _witness_steals(worker: Worker, handle: SimWorkerHandle) -> None:
    """Watch `worker`'s core: after it answers that it gave a task up to a
    steal, it must not execute that task unless assigned it again. (The
    scheduler moves a stolen task only on that answer: together, a steal
    never makes a task run twice.)

    It wraps two methods of this one `Worker` object, the simulation's own:
    the shell stays as in production.
    """
    from trioflow.core.worker_events import ComputeRequested, Execute, SendStealAnswer

    given_up: dict[str, None] = {}
    apply, carry_out = worker._apply, worker._carry_out

    def observed_apply(event: Any) -> None:
        if isinstance(event, ComputeRequested):
            given_up.pop(event.key, None)  # assigned here again: it may run here
        apply(event)

    def observed_carry_out(instruction: Any) -> None:
        if isinstance(instruction, SendStealAnswer) and instruction.given_up:
            given_up[instruction.key] = None
        elif isinstance(instruction, Execute) and instruction.key in given_up:
            handle.errors.append(
                f"{handle.node}: ran {instruction.key} after giving it up to a steal (it may run twice)"
            )
        carry_out(instruction)

    worker._apply = observed_apply  # type: ignore[method-assign]
    worker._carry_out = observed_carry_out  # type: ignore[method-assign]
