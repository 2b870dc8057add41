"""The worker process: a Trio shell around `trioflow.core.WorkerState`.

A worker does three things at once, each a task in one nursery:

* talks to the scheduler: registers (listing the data it already holds),
  sends a heartbeat every `heartbeat_interval`, receives orders, and
  watches for a silent scheduler with a cancel scope whose deadline every
  message from the scheduler pushes `scheduler_ttl` ahead;
* runs task functions through an `Executor` (threads in production);
* serves its data to peers and clients that ask (`get_data`).

As in the scheduler, one driver task (`_drive`) owns the core; executions,
fetches and the scheduler reader report back through a memory channel.
The values live in `self.data`, which only the driver writes.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
from collections.abc import Callable
from typing import Any

import trio

from trioflow.comm import (
    Connection,
    FrameLimits,
    Network,
    RequestFailed,
    TCPNetwork,
    connect_with_timeout,
    dumps,
    expect_hello,
    loads,
    loads_function,
    open_connection,
    open_connection_pool,
    reply,
    say_hello,
)
from trioflow.comm.serialize import Serialized
from trioflow.backoff import Backoff
from trioflow.config import Config
from trioflow.core import WorkerState
from trioflow.core.worker_events import (
    ComputeRequested,
    DataPut,
    DropData,
    Execute,
    ExecutionFailed,
    ExecutionSucceeded,
    FreeRequested,
    Gather,
    GatherFailed,
    GatherSucceeded,
    ReplicasRequested,
    SchedulerLost,
    SendDataDropped,
    SendReplicaAdded,
    SendReplicaMissing,
    SendTaskErred,
    SendTaskFinished,
    SendTaskStarted,
    WorkerEvent,
    WorkerInstruction,
)
from trioflow.errors import CommClosedError, ProtocolError, SerializationError
from trioflow.executor import Executor, ThreadExecutor
from trioflow.nurseries import background_tasks
from trioflow.protocol import (
    INLINE_VALUE_BYTES,
    failure_to_wire,
    field,
    sizeof,
    str_list,
    str_map,
    substitute,
    user_error_from_exception,
)

logger = logging.getLogger("trioflow.worker")

# How often a worker under a nanny checks that the nanny still lives.
PARENT_CHECK_INTERVAL_S = 0.25
# How long a worker shutting down waits for its goodbye to be written.
GOODBYE_TIMEOUT_S = 1.0


class Worker:
    """Serve a trioflow worker connected to the scheduler at `scheduler_address`.

    Args:
        scheduler_address: ``tcp://host:port`` of the scheduler.
        nthreads: how many task functions may run at once.
        host: interface to bind for peers; loopback unless told otherwise.
        port: TCP port for peers, 0 for any free one.
        config: tunables; defaults plus ``TRIOFLOW_*`` variables if omitted.
        network: how to connect and listen (the simulator passes its own).
        executor: where functions run (threads unless given).
        nanny_address: the control address of this worker's nanny, if any;
            the scheduler asks it for restarts.
        parent_pid: exit when this process is no longer our parent (our
            nanny was killed and cannot clean up after itself).
        pid: the process id to report to the scheduler, when this worker is
            a process of its own (the CLI passes its pid; in-process and
            simulated workers report none).
        rng: for reconnect jitter (seeded in the simulator).
    """

    def __init__(
        self,
        scheduler_address: str,
        *,
        nthreads: int = 1,
        host: str = "127.0.0.1",
        port: int = 0,
        config: Config | None = None,
        network: Network | None = None,
        executor: Executor | None = None,
        nanny_address: str | None = None,
        parent_pid: int | None = None,
        pid: int | None = None,
        rng: random.Random | None = None,
    ):
        if nthreads < 1:
            raise ValueError(f"a worker needs at least one thread, got nthreads={nthreads}")
        self.scheduler_address = scheduler_address
        self.nthreads = nthreads
        self.host = host
        self.port = port
        self.config = config or Config.from_env()
        self.network = network or TCPNetwork()
        self.executor = executor or ThreadExecutor(nthreads)
        self.nanny_address = nanny_address
        self.parent_pid = parent_pid
        self.pid = pid
        self.limits = FrameLimits.from_config(self.config)
        self.address: str | None = None
        self.state: WorkerState | None = None
        # key -> value. Invariant: exactly the keys the core holds in MEMORY
        # (plus, briefly, results of cancelled runs about to be dropped).
        self.data: dict[str, Any] = {}
        # function_id -> pickled function, as the scheduler sent them.
        self.functions: dict[str, bytes] = {}
        self.executions = 0  # functions run to completion or error, for tests
        # Small results of the execution being reported, sent with task_finished.
        self._inline: dict[str, Serialized] = {}
        self._scheduler: Connection | None = None
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[Callable, tuple]](math.inf)
        self._stimulus_ids = itertools.count()
        self._nursery: trio.Nursery | None = None
        self._pool = None
        self.closed = trio.Event()
        self._registered = False
        self._link_registered = False
        # trio.current_time() of our last message to the scheduler.
        self._last_sent = -math.inf
        self._said_goodbye = False
        self._rng = rng or random.Random()

    # -------------------------------------------------------------- serve --

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the worker until cancelled, or until its scheduler has been
        unreachable for `Config.scheduler_timeout` seconds.

        Reports the worker's own address through `task_status` once it is
        registered with the scheduler. When the scheduler link is lost the
        worker keeps its data and running tasks and registers again (see
        `_stay_connected`). Shutdown: running threads are abandoned (their
        results dropped), held data is dropped with the process.
        """
        try:
            async with background_tasks() as nursery:
                self._nursery = nursery
                self.address = await nursery.start(
                    self.network.serve, self._serve_peer, self.host, self.port
                )
                self.state = WorkerState(self.address, self.nthreads)
                if self.parent_pid is not None:
                    nursery.start_soon(self._watch_parent, self.parent_pid)
                async with open_connection_pool(
                    self.network, self.limits, role="peer",
                    connect_timeout=self.config.connect_timeout,
                    idle_timeout=self.config.peer_timeout
                ) as self._pool:
                    nursery.start_soon(self._drive)
                    await self._stay_connected(task_status)
        finally:
            self.closed.set()

    async def _stay_connected(self, task_status: trio.TaskStatus[str]) -> None:
        """Register with the scheduler, and register again whenever the link is lost.

        Between attempts the worker waits a capped, jittered exponential
        backoff (`reconnect_backoff_min` doubling up to `reconnect_backoff_max`,
        each wait drawn from its upper half) so that many workers do not
        reconnect in lockstep. It gives up after `scheduler_timeout` seconds
        without a scheduler (by default it never does).
        """
        backoff = Backoff(self.config.reconnect_backoff_min, self.config.reconnect_backoff_max, self._rng)
        unreachable_since = trio.current_time()
        last_reason = None
        while True:
            self._link_registered = False
            try:
                reason = await self._serve_scheduler(task_status)
            except CommClosedError as exc:
                reason = str(exc)
            if self._link_registered:
                backoff.reset()
                unreachable_since = trio.current_time()
                self._post(self._apply, SchedulerLost(self._stimulus("scheduler-lost")))
            if reason != last_reason:
                logger.warning(
                    "worker %s cannot reach its scheduler %s (%s); retrying",
                    self.address,
                    self.scheduler_address,
                    reason,
                )
                last_reason = reason
            waited = trio.current_time() - unreachable_since
            if waited >= self.config.scheduler_timeout:
                raise CommClosedError(
                    f"worker {self.address} gives up: no scheduler at {self.scheduler_address} "
                    f"for {waited:.1f} s (scheduler_timeout; last error: {reason})"
                )
            await trio.sleep(backoff.next())

    async def close(self) -> None:
        """Say goodbye, `stop`, and wait until the worker has shut down."""
        await self.say_goodbye()
        self.stop()
        await self.closed.wait()

    async def say_goodbye(self) -> None:
        """Tell the scheduler we are leaving on purpose; wait until it is written.

        Called before shutting down (SIGTERM, `close`), while the connection
        still works: a goodbye queued only once cancellation has begun can be
        lost with a write it interrupts. Bounded by `GOODBYE_TIMEOUT_S`.
        """
        conn = self._scheduler
        if conn is None or self._said_goodbye:
            return
        self._send({"op": "goodbye"})
        self._said_goodbye = True
        with trio.move_on_after(GOODBYE_TIMEOUT_S):
            try:
                await conn.flush()
            except CommClosedError:
                pass

    async def _watch_parent(self, parent_pid: int) -> None:
        """Exit when our nanny is gone (killed without a chance to stop us)."""
        while os.getppid() == parent_pid:
            await trio.sleep(PARENT_CHECK_INTERVAL_S)
        logger.warning("worker %s: its nanny (pid %d) is gone; exiting", self.address, parent_pid)
        self.stop()

    def stop(self) -> None:
        """Shut the worker down, exactly as cancelling `serve` would."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel(reason="worker stopped")

    async def _serve_scheduler(self, task_status: trio.TaskStatus[str]) -> str:
        """Register, then exchange messages until the link ends; return why."""
        stream = await connect_with_timeout(
            self.network, self.scheduler_address, self.config.connect_timeout
        )
        assert self.state is not None
        async with open_connection(stream, self.limits, peer=self.scheduler_address) as conn:
            say_hello(
                conn,
                "worker",
                address=self.address,
                nthreads=self.nthreads,
                held=self.state.memory(),
                running=self.state.running(),
                pid=self.pid,
                nanny=self.nanny_address,
            )
            self._scheduler = conn
            leaving = True
            try:
                async with background_tasks() as nursery:
                    nursery.start_soon(self._heartbeats, conn)
                    reason = await self._listen_to_scheduler(conn, task_status)
                leaving = False
                return reason
            finally:
                self._scheduler = None
                if leaving and not conn.closed and not self._said_goodbye:
                    # Shutting down on purpose: say so, so the scheduler
                    # reroutes our tasks without suspecting them of killing us.
                    conn.send({"op": "goodbye"})

    async def _listen_to_scheduler(self, conn: Connection, task_status: trio.TaskStatus[str]) -> str:
        ttl = self.config.scheduler_ttl
        try:
            with trio.fail_after(self.config.connect_timeout):
                welcome = await conn.receive()
            if welcome[0]["op"] != "welcome":
                raise ProtocolError(f"expected a welcome, got op {welcome[0]['op']!r}")
            logger.info(
                "trioflow worker %s ready: %d threads, scheduler %s",
                self.address,
                self.nthreads,
                self.scheduler_address,
            )
            self._link_registered = True
            if not self._registered:
                self._registered = True
                task_status.started(self.address)
            self._post(self._from_scheduler, conn, welcome[1:])
            # The scheduler answers every heartbeat, so silence past
            # scheduler_ttl means it hangs (or the network does).
            with trio.CancelScope() as alive:
                while True:
                    alive.deadline = trio.current_time() + ttl
                    self._post(self._from_scheduler, conn, await conn.receive())
            return f"no message for {ttl:g} s (scheduler_ttl)"
        except trio.TooSlowError:
            return "the scheduler did not answer the registration"
        except CommClosedError as exc:
            return str(exc)
        except ProtocolError as exc:
            logger.warning("bad message from the scheduler: %s", exc)
            return f"protocol error: {exc}"

    async def _heartbeats(self, conn: Connection) -> None:
        """Keep both liveness deadlines fed, with as few messages as possible.

        Any message counts as a sign of life in both directions, so a
        heartbeat is only sent when the link has been quiet one way or the
        other for `heartbeat_interval`: the scheduler hears from us, and its
        `heartbeat_ack` lets us hear from it. A busy link carries none.
        """
        interval = self.config.heartbeat_interval
        while True:
            assert self.state is not None
            due = min(self._last_sent, conn.last_received) + interval
            if trio.current_time() >= due:
                self._send(
                    {
                        "op": "heartbeat",
                        "metrics": {
                            "executing": len(self.state.executing),
                            "keys": len(self.data),
                            "tasks": len(self.state.tasks),
                        },
                    }
                )
                due = trio.current_time() + interval
            await trio.sleep_until(due)

    # ------------------------------------------------------------- driver --

    def _post(self, handler: Callable, *args: Any) -> None:
        self._inbox_send.send_nowait((handler, args))

    async def _drive(self) -> None:
        """The one task that touches `self.state` and writes `self.data`."""
        async for handler, args in self._inbox:
            try:
                handler(*args)
            except Exception:
                logger.exception("internal error in worker %s while running %s", self.address, handler.__name__)

    def _stimulus(self, what: str) -> str:
        return f"{what}-{next(self._stimulus_ids)}"

    def _apply(self, event: WorkerEvent) -> None:
        assert self.state is not None
        for instruction in self.state.handle(event):
            self._carry_out(instruction)

    def _carry_out(self, instruction: WorkerInstruction) -> None:
        if isinstance(instruction, Execute):
            self._spawn(self._execute, instruction)
        elif isinstance(instruction, Gather):
            self._spawn(self._gather, instruction)
        elif isinstance(instruction, DropData):
            for key in instruction.keys:
                self.data.pop(key, None)
        elif isinstance(instruction, SendTaskStarted):
            self._send({"op": "task_started", "key": instruction.key})
        elif isinstance(instruction, SendTaskFinished):
            message = {"op": "task_finished", "key": instruction.key, "nbytes": instruction.nbytes}
            inline = self._inline.get(instruction.key)
            if inline is not None:
                message["value"] = inline
            self._send(message)
        elif isinstance(instruction, SendTaskErred):
            self._send(
                {"op": "task_erred", "key": instruction.key, "failure": failure_to_wire(instruction.failure)}
            )
        elif isinstance(instruction, SendReplicaAdded):
            self._send({"op": "replica_added", "key": instruction.key, "nbytes": instruction.nbytes})
        elif isinstance(instruction, SendDataDropped):
            self._send({"op": "data_dropped", "keys": instruction.keys})
        elif isinstance(instruction, SendReplicaMissing):
            self._send(
                {
                    "op": "replica_missing",
                    "key": instruction.key,
                    "holders": instruction.holders,
                    "dependent": instruction.dependent,
                }
            )
        else:  # pragma: no cover - a new instruction without a case here
            raise TypeError(f"no handler for {instruction!r}")

    def _send(self, message: dict[str, Any]) -> None:
        if self._scheduler is None:
            return
        try:
            self._scheduler.send(message)
        except CommClosedError:
            return  # the reader notices and ends the link
        self._last_sent = trio.current_time()

    def _spawn(self, async_fn: Callable, *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(async_fn, *args)

    # ------------------------------------------------- scheduler messages --

    def _from_scheduler(self, conn: Connection, messages: list[dict]) -> None:
        for message in messages:
            try:
                self._scheduler_op(conn, message)
            except ProtocolError as exc:
                logger.warning("ignoring bad message from the scheduler: %s", exc)

    def _scheduler_op(self, conn: Connection, m: dict) -> None:
        op = m["op"]
        if op == "compute_task":
            function_id = field(m, "function_id", str)
            if "function" in m:
                self.functions[function_id] = field(m, "function", bytes)
            who_has = {k: tuple(v) for k, v in str_map(m, "who_has", list).items()}
            self._apply(
                ComputeRequested(
                    self._stimulus("compute"),
                    field(m, "key", str),
                    (function_id, field(m, "args", Serialized)),
                    tuple(field(m, "priority", list)),
                    who_has,
                    str_map(m, "nbytes", int),
                )
            )
        elif op == "free_keys":
            self._apply(FreeRequested(self._stimulus("free"), tuple(str_list(m, "keys"))))
        elif op == "acquire_replicas":
            who_has = {k: tuple(v) for k, v in str_map(m, "who_has", list).items()}
            self._apply(ReplicasRequested(self._stimulus("replicate"), who_has, str_map(m, "nbytes", int)))
        elif op == "put_data":
            self._put_data(conn, m)
        elif op == "run":
            self._spawn(self._run_function, conn, m)
        elif op in ("heartbeat_ack", "welcome"):
            pass
        elif op == "close":
            logger.warning(
                "worker %s was told to leave by the scheduler: %s", self.address, m.get("reason", "")
            )
            self.stop()
        else:
            raise ProtocolError(f"unknown op {op!r} from the scheduler")

    def _put_data(self, conn: Connection, m: dict) -> None:
        try:
            values = {key: loads(value) for key, value in str_map(m, "data", Serialized).items()}
        except SerializationError as exc:
            reply(conn, m, error=str(exc))
            return
        self.data.update(values)
        nbytes = {key: sizeof(value) for key, value in values.items()}
        self._apply(DataPut(self._stimulus("put-data"), nbytes))
        reply(conn, m, nbytes=nbytes)

    async def _run_function(self, conn: Connection, m: dict) -> None:
        """`client.run`: call a function right here, in the worker's Trio thread.

        Like a task it goes through the executor, but it does not wait for a
        free task thread: `run` is for inspecting and preparing workers,
        and must work even while every thread is busy.
        """
        try:
            function = loads(field(m, "function", Serialized))
            result = await self.executor.run_now(function)
            payload = dumps(result)
        except (Exception, SystemExit) as exc:
            reply(conn, m, failure=failure_to_wire(user_error_from_exception(exc)))
            return
        reply(conn, m, result=payload)

    # ----------------------------------------------------------- execution --

    async def _execute(self, instruction: Execute) -> None:
        key = instruction.key
        function_id, args = instruction.run_spec
        inputs = {dep: self.data[dep] for dep in instruction.dependencies}
        payload = self.functions.get(function_id)
        if self._scheduler is not None:
            try:
                # The task_started message must be on the wire before the
                # function runs: if it kills this process, the scheduler
                # still learns that this task was running (KilledWorker).
                await self._scheduler.flush()
            except CommClosedError:
                pass

        def run() -> tuple[bool, Any]:
            """In the thread: unpack, call, and capture a failure right here,
            so its traceback starts at the user's function, not in trioflow."""
            try:
                if payload is None:
                    raise SerializationError(f"the scheduler never sent function {function_id}")
                fn = loads_function(payload)
                call_args, call_kwargs = loads(args)
                if inputs:
                    call_args, call_kwargs = substitute((call_args, call_kwargs), inputs)
            except (Exception, SystemExit) as exc:
                return False, user_error_from_exception(exc)
            try:
                return True, fn(*call_args, **call_kwargs)
            except (Exception, SystemExit) as exc:
                return False, user_error_from_exception(exc, skip_frames=1)

        ok, outcome = await self.executor.run(run)
        if ok:
            self._post(self._executed, key, outcome, None)
        else:
            self._post(self._executed, key, None, outcome)

    def _executed(self, key: str, result: Any, failure: Any) -> None:
        self.executions += 1
        if failure is not None:
            self._apply(ExecutionFailed(self._stimulus("execute-failed"), key, failure))
            return
        self.data[key] = result
        nbytes = sizeof(result)
        if nbytes <= INLINE_VALUE_BYTES:
            # Small enough to ride along with task_finished: the client then
            # has the value without asking this worker for it.
            try:
                inline = dumps(result)
            except SerializationError:
                inline = None
            if inline is not None and inline.nbytes <= INLINE_VALUE_BYTES:
                self._inline[key] = inline
        try:
            self._apply(ExecutionSucceeded(self._stimulus("executed"), key, nbytes))
        finally:
            self._inline.clear()

    # ---------------------------------------------------------- fetching --

    async def _gather(self, instruction: Gather) -> None:
        peer, keys = instruction.peer, instruction.keys
        try:
            answer = await self._pool.call(peer, {"op": "get_data", "keys": list(keys)})
            values = str_map(answer, "data", Serialized)
            missing = str_list(answer, "missing")
            errors = str_map(answer, "errors", str)
        except (CommClosedError, RequestFailed, ProtocolError) as exc:
            logger.info("could not fetch %d keys from %s: %s", len(keys), peer, exc)
            self._post(self._apply, GatherFailed(self._stimulus("gather-failed"), peer, keys))
            return
        loaded: dict[str, Any] = {}
        failures = {}
        for key, serialized in values.items():
            try:
                loaded[key] = loads(serialized)
            except SerializationError as exc:
                failures[key] = user_error_from_exception(exc)
        for key, message in errors.items():
            failures[key] = user_error_from_exception(SerializationError(message))
        self._post(self._gathered, peer, loaded, tuple(missing), failures)

    def _gathered(self, peer: str, values: dict[str, Any], missing: tuple, failures: dict) -> None:
        assert self.state is not None
        nbytes = {}
        for key, value in values.items():
            ts = self.state.tasks.get(key)
            if ts is not None and ts.state.value == "flight":
                self.data[key] = value
                nbytes[key] = sizeof(value)
        self._apply(GatherSucceeded(self._stimulus("gathered"), peer, nbytes, missing, failures))

    # --------------------------------------------------------- serving data --

    async def _serve_peer(self, stream: trio.abc.Stream) -> None:
        """Answer `get_data` requests from other workers and from clients."""
        async with open_connection(stream, self.limits, peer="peer") as conn:
            try:
                _, batch = await expect_hello(conn, self.config.connect_timeout, frozenset({"peer", "client"}))
                while True:
                    for m in batch:
                        if m["op"] != "get_data":
                            raise ProtocolError(f"unknown op {m['op']!r} from a peer")
                        self._answer_get_data(conn, m)
                    batch = await conn.receive()
            except CommClosedError:
                pass
            except ProtocolError as exc:
                logger.warning("closing peer connection: %s", exc)

    def _answer_get_data(self, conn: Connection, m: dict) -> None:
        data: dict[str, Serialized] = {}
        missing: list[str] = []
        errors: dict[str, str] = {}
        for key in str_list(m, "keys"):
            if key not in self.data:
                missing.append(key)
                continue
            try:
                data[key] = dumps(self.data[key])
            except SerializationError as exc:
                errors[key] = f"the result of {key!r} cannot be sent: {exc}"
        reply(conn, m, data=data, missing=missing, errors=errors)
