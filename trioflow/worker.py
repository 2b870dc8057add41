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
The values live in `self.data`, which only the driver writes: a dict, or,
with a memory limit, the spilling store of `trioflow.memory`, which a fourth
task watches (`_watch_memory`): past its fractions of the limit the worker
spills values to disk, and pauses.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import logging
import os
import random
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, MutableMapping
from typing import Any

import trio

from trioflow.comm import (
    ByteBudget,
    Connection,
    FrameLimits,
    Network,
    PeerSilent,
    RequestFailed,
    TCPNetwork,
    await_welcome,
    clip,
    dumps,
    loads,
    loads_function,
    loop_lag,
    open_connection,
    open_connection_pool,
    reply,
    say_hello,
)
from trioflow.comm import messages as m
from trioflow.comm.auth import (
    ANY_CREDENTIAL,
    CLUSTER,
    Credentials,
    connect_authenticated,
    credentials_for,
)
from trioflow.comm.buffers import WARM
from trioflow.comm.door import Door
from trioflow.comm.network import advertised_address
from trioflow.comm.security import Security
from trioflow.comm.serialize import Serialized, SerializedFunction, verify_function
from trioflow.backoff import Backoff
from trioflow.config import Config
from trioflow.core.worker_state import WorkerState
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
    MemoryPaused,
    MemoryResumed,
    Rejoin,
    ReplicasRequested,
    SchedulerLost,
    SendDataDropped,
    SendStealAnswer,
    SendReplicaAdded,
    SendReplicaMissing,
    SendTaskErred,
    SendTaskFinished,
    SendTaskStarted,
    StealRequested,
    TaskRejoining,
    TaskSeceded,
    WorkerEvent,
    WorkerInstruction,
)
from trioflow.drivers import Driver
from trioflow.errors import CommClosedError, ProtocolError, SerializationError
from trioflow.executor import Executor, ThreadExecutor
from trioflow.memory import MemoryManager, too_big_message
from trioflow.nurseries import background_tasks
from trioflow.comm.frames import max_value_bytes, too_big
from trioflow.comm.messages import INLINE_VALUE_BYTES
from trioflow.task_options import check_resources
from trioflow.task_context import running_task
from trioflow.protocol import (
    failure_to_wire,
    sizeof,
    substitute,
    user_error_from_exception,
    wants_keyword,
)
from trioflow.wall_clock import epoch_seconds, wall_seconds

logger = logging.getLogger("trioflow.worker")

# How often a worker under a nanny checks that the nanny still lives.
PARENT_CHECK_INTERVAL_S = 0.25
# How long a worker shutting down waits for its goodbye to be written.
GOODBYE_TIMEOUT_S = 1.0
# Keys per `register` message (a worker may bring back millions after a
# scheduler restart) and per `get_data` request.
REGISTER_CHUNK = 10_000
GET_DATA_CHUNK = 1_000
# A busy link carries no heartbeats (any message is a sign of life), but
# the dashboard still wants a busy worker's memory and load this often.
METRICS_INTERVAL_S = 1.0
# Storing values of at least this fraction of the memory limit at once has
# the memory measured at once (`_after_store`).
PROMPT_CHECK_FRACTION = 0.01


class Worker:
    """Serve a trioflow worker connected to the scheduler at `scheduler_address`.

    Args:
        scheduler_address: ``tcp://host:port`` of the scheduler.
        nthreads: how many task functions may run at once.
        host: interface to bind for peers; loopback unless told otherwise.
            A wildcard (``0.0.0.0``, ``::``) binds every interface and
            advertises the address this machine uses to reach the scheduler.
        port: TCP port for peers, 0 for any free one.
        contact_address: the address to advertise instead (``tcp://host:port``
            as others must dial it: behind NAT, in a container).
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
        credentials: the cluster's credentials (by default from
            ``TRIOFLOW_TOKEN`` or `Config.token_file`).
        resources: what this worker offers to tasks that ask for resources
            (``{"GPU": 2}``); the scheduler counts what its tasks hold.
        memory_limit: bytes this worker's process should stay under (its
            nanny's limit): past fractions of it (`Config.memory_*`) values
            are spilled to disk and the worker pauses (`trioflow.memory`).
            None: values stay in memory, whatever their size.
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
        credentials: Credentials | None = None,
        contact_address: str | None = None,
        resources: dict[str, float] | None = None,
        memory_limit: int | None = None,
    ):
        if nthreads < 1:
            raise ValueError(f"a worker needs at least one thread, got nthreads={nthreads}")
        self.resources = check_resources(resources, "Worker(resources=...)") or {}
        self.scheduler_address = scheduler_address
        self.nthreads = nthreads
        self.host = host
        self.contact_address = contact_address
        self.port = port
        self.config = config or Config.from_env()
        self.network = network or TCPNetwork(Security.from_config(self.config), self.config.handshake_timeout)
        self.credentials = (
            credentials if credentials is not None
            else credentials_for(self.config, "a worker", cluster=True)
        )
        self.executor = executor or ThreadExecutor(nthreads, batch=self.config.batch_threads)
        self.nanny_address = nanny_address
        self.parent_pid = parent_pid
        self.pid = pid
        self.limits = FrameLimits.from_config(self.config)
        self.budget = ByteBudget(self.config.max_process_bytes)
        self.address: str | None = None
        self.state: WorkerState | None = None
        # Whether to read our own process's memory, for the heartbeat (only a
        # worker that is a process of its own reports it) and the memory
        # manager. psutil is imported on the first read, not at start: it is
        # ~8 ms of a worker process's start (docs/performance.md, W9).
        self._measures_memory = pid is not None or memory_limit is not None
        self._warm_buffers = False  # set in serve (_keep_warm_buffers)
        self._process: Any = None
        # With a limit: what spills values and pauses the worker.
        self.memory: MemoryManager | None = None
        if memory_limit is not None:
            self.memory = MemoryManager(memory_limit, self.config, self._rss)
        # key -> value. Invariant: exactly the keys the core holds in MEMORY
        # (plus, briefly, results of cancelled runs about to be dropped).
        # With a memory limit, some of them may be on disk.
        self.data: MutableMapping[str, Any] = {} if self.memory is None else self.memory.data
        # function_id -> function, as the scheduler sent them; dropped when
        # the scheduler says no task here calls one any more (free_functions).
        self.functions: dict[str, SerializedFunction] = {}
        self.executions = 0  # functions run to completion or error, for tests
        # Small results of the execution being reported, sent with task_finished.
        self._inline: dict[str, Serialized] = {}
        # (start, stop) of the execution being reported, for the task stream,
        # and how long it ran by Trio's clock, for the scheduler's estimates.
        self._run_times: dict[str, tuple[float, float]] = {}
        self._durations: dict[str, float] = {}
        self._scheduler: Connection | None = None
        # The value reports (task_finished, replica_added) sent on the
        # scheduler connection, numbered from 1 on each connection, and the
        # number of the last report of each value still held. A free says
        # how many the scheduler had heard (`FreeKeys.reports_heard`); only
        # a value reported after that needs a data_dropped answer.
        self._reports_sent = 0
        self._reported: dict[str, int] = {}
        self._driver = Driver(lambda: f"worker {self.address}", logger)
        self._stimulus_ids = itertools.count()
        self._nursery: trio.Nursery | None = None
        self._pool = None
        # Peers that did not answer a fetch, and when: the next fetch from
        # one waits until `heartbeat_interval` after that failure. A holder
        # that did not answer is not reported as lacking the value (the
        # scheduler judges its liveness), so the scheduler may send the
        # dependent straight back naming it again: without this pause, a
        # peer that refuses at once while still registered would make that
        # a loop that takes no time.
        self._unanswered: dict[str, float] = {}
        self.closed = trio.Event()
        self._registered = False
        self._link_registered = False
        self._said_goodbye = False
        self._rng = rng or random.Random()
        # The blocking Client tasks get from `get_client()` (made on first use).
        self._task_client: Any = None
        self._task_client_lock = threading.Lock()
        # Where uploaded files live (`Client.upload_file`): made on the first
        # upload, put first on sys.path, removed when the worker stops.
        self.local_directory: str | None = None
        # Threads of seceded tasks waiting for a slot (`rejoin`), by key.
        self._rejoining: dict[str, threading.Event] = {}
        self._scheduler_handlers: dict[type, Callable[[Connection, Any], None]] = {
            m.ComputeTask: self._on_compute_task,
            m.FreeKeys: self._on_free_keys,
            m.FreeFunctions: self._on_free_functions,
            m.AcquireReplicas: self._on_acquire_replicas,
            m.PutData: self._on_put_data,
            m.StealRequest: self._on_steal_request,
            m.RunEverywhere: self._on_run,
            m.UploadFile: self._on_upload_file,
            m.Close: self._on_close,
            m.HeartbeatAck: self._on_nothing,
            m.Welcome: self._on_nothing,
            m.Invalid: self._on_invalid,
        }

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
                bound = await nursery.start(self.network.serve, self._serve_peer, self.host, self.port)
                self.address = self.contact_address or advertised_address(bound, self.scheduler_address)
                self._door = Door(
                    f"a trioflow worker's data port ({self.address})",
                    config=self.config,
                    credentials=self.credentials,
                    credential_roles=ANY_CREDENTIAL,
                    roles={"peer": m.PEER_TO_WORKER},
                    budget=self.budget,
                    hint=": point clients at the scheduler's address, not a worker's",
                )
                self.state = WorkerState(self.address, self.nthreads)
                self._keep_warm_buffers()
                if self.parent_pid is not None:
                    nursery.start_soon(self._watch_parent, self.parent_pid)
                if self.memory is not None:
                    nursery.start_soon(self._watch_memory)
                async with open_connection_pool(
                    self.network, self.limits, role="peer",
                    connect_timeout=self.config.connect_timeout,
                    peer_timeout=self.config.peer_timeout,
                    credentials=self.credentials,
                    idle_timeout=self.config.idle_timeout,
                    budget=self.budget,
                ) as self._pool:
                    nursery.start_soon(self._drive)
                    await self._stay_connected(task_status)
        finally:
            if self._warm_buffers:
                WARM.configure(0, 0.0, trio.current_time)
            await self._close_task_client()
            self._remove_local_directory()
            if self.memory is not None:
                self.memory.close()  # the spill directory goes with the worker
            self.closed.set()

    def _keep_warm_buffers(self) -> None:
        """Receive big values into the memory of dropped ones (comm/buffers.py).

        Only a worker that is a process of its own: the pool is the
        process's, and an in-process worker shares its process with a
        client, other workers or a test. With a memory limit, a quarter of
        it at most, so kept buffers cannot push the worker into spilling.
        """
        self._warm_buffers = self.pid is not None and self.config.warm_buffers
        if not self._warm_buffers:
            return
        limit = self.config.warm_buffer_bytes
        if self.memory is not None:
            limit = min(limit, self.memory.limit // 4)
        WARM.configure(limit, self.config.warm_buffer_idle, trio.current_time)

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
                self._post(self._scheduler_lost)
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

    # ------------------------------------------------ tasks that submit tasks --

    def task_client(self, make: Callable[..., Any]) -> Any:
        """The blocking client tasks here use (`trioflow.get_client`); made once.

        Called from task threads. `make` is the client's class: the worker
        does not import it (the client may start a local cluster, which
        imports the worker). It reaches the scheduler this worker reaches,
        with this worker's `Config`.
        """
        with self._task_client_lock:
            if self._task_client is None or self._task_client.status in ("closing", "closed"):
                self._task_client = make(
                    self.scheduler_address, config=self.config, credentials=self.credentials.client_only()
                )
            return self._task_client

    async def _close_task_client(self) -> None:
        client, self._task_client = self._task_client, None
        if client is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(GOODBYE_TIMEOUT_S):
                await trio.to_thread.run_sync(client.close, abandon_on_cancel=True)

    def task_seceded(self, key: str) -> None:
        """`secede()` in the thread running `key` (called in our Trio thread)."""
        self._post(self._apply, TaskSeceded(self._stimulus("secede"), key))

    def task_rejoining(self, key: str, resumed: threading.Event) -> None:
        """`rejoin()` in the thread running `key`; `resumed` is set once it has a slot."""
        self._rejoining[key] = resumed
        self._post(self._apply, TaskRejoining(self._stimulus("rejoin"), key))

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
        self._send(m.Goodbye())
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
        stream = await connect_authenticated(
            self.network, self.scheduler_address, self.credentials, CLUSTER, self.config.connect_timeout
        )
        assert self.state is not None
        async with open_connection(
            stream, self.limits, peer=self.scheduler_address, inbound=m.SCHEDULER_TO_WORKER, budget=self.budget
        ) as conn:
            await say_hello(
                conn,
                m.Hello(
                    role="worker",
                    protocol=m.PROTOCOL_VERSION,
                    address=self.address,
                    nthreads=self.nthreads,
                    pid=self.pid,
                    nanny=self.nanny_address,
                    resources=self.resources,
                ),
            )
            # What we hold and run, in chunks (after a scheduler restart it
            # can be a lot); the last chunk says `done`.
            held, running = list(self.state.memory().items()), list(self.state.running())
            while True:
                chunk_held, held = held[:REGISTER_CHUNK], held[REGISTER_CHUNK:]
                chunk_running, running = running[:REGISTER_CHUNK], running[REGISTER_CHUNK:]
                done = not held and not running
                conn.send(m.Register(held=dict(chunk_held), running=chunk_running, done=done))
                if done:
                    break
            self._scheduler = conn
            # The new connection's count starts from nothing: what we hold
            # was just registered, which the scheduler hears before it can
            # free anything on this connection.
            self._reports_sent = 0
            self._reported.clear()
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
                    conn.send(m.Goodbye())

    async def _listen_to_scheduler(self, conn: Connection, task_status: trio.TaskStatus[str]) -> str:
        ttl = self.config.scheduler_ttl
        try:
            _, first = await await_welcome(
                conn, self.config.connect_timeout, self.scheduler_address, "a trioflow scheduler"
            )
            logger.info(
                "trioflow worker %s ready: %d threads, scheduler %s",
                self.address,
                self.nthreads,
                self.scheduler_address,
            )
            self._link_registered = True
            if self.memory is not None and self.memory.paused:
                # A new scheduler (or the same one after a break) must know.
                conn.send(m.Paused())
            if not self._registered:
                self._registered = True
                task_status.started(self.address)
            self._post(self._from_scheduler, conn, first)
            # The scheduler answers every heartbeat, so silence past
            # scheduler_ttl means it hangs (or the network does). The time is
            # counted in this loop's responsive time (`liveness.LoopLag`): a
            # stall of the worker's own loop never counts against its
            # scheduler (design.md §6 rule 6).
            conn.idle_timeout = ttl
            conn.idle_name = "scheduler_ttl"
            while True:
                self._driver.run_or_post(self._from_scheduler, conn, await conn.receive())
        except PeerSilent as exc:
            return exc.reason
        except CommClosedError as exc:
            return str(exc)
        except ProtocolError as exc:
            logger.warning("bad message from the scheduler: %s", clip(str(exc), 300))
            return f"protocol error: {clip(str(exc), 300)}"

    async def _heartbeats(self, conn: Connection) -> None:
        """Keep both liveness deadlines fed, with as few messages as possible.

        Any message counts as a sign of life in both directions, so a
        heartbeat is only sent when the link has been quiet one way or the
        other for `heartbeat_interval`: the scheduler hears from us, and its
        `heartbeat_ack` lets us hear from it. A busy link carries only one
        every `METRICS_INTERVAL_S`, for the metrics it holds (memory, load:
        the scheduler's dashboard shows them).
        """
        interval = self.config.heartbeat_interval
        metrics_sent = trio.current_time()
        while True:
            assert self.state is not None
            due = min(min(conn.last_sent, conn.last_received) + interval, metrics_sent + METRICS_INTERVAL_S)
            if trio.current_time() >= due:
                WARM.trim()  # buffers idle too long go back (a no-op when none are kept)
                self._send(m.Heartbeat(metrics=self._metrics()))
                metrics_sent = trio.current_time()
                due = metrics_sent + min(interval, METRICS_INTERVAL_S)
            await trio.sleep_until(due)

    def _metrics(self) -> dict[str, float]:
        """What a heartbeat tells the scheduler (shown on its dashboard)."""
        assert self.state is not None
        metrics: dict[str, float] = {
            "executing": len(self.state.executing),
            "keys": len(self.data),
            "tasks": len(self.state.tasks),
            # The longest stall of this worker's loop so far, seconds.
            "max_stall_s": loop_lag().max_stall,
        }
        if self._measures_memory:
            rss = self._rss()
            if rss:
                metrics["memory"] = float(rss)
        if self.memory is not None:
            metrics.update(self.memory.metrics())
        if self._warm_buffers:
            metrics["warm_buffer_bytes"] = float(WARM.kept_bytes)
            metrics["warm_buffer_reuses"] = float(WARM.reused)
        return metrics

    # ------------------------------------------------------------- memory --

    def _rss(self) -> int:
        """This process's resident memory in bytes (0 if it cannot be read)."""
        import psutil

        try:
            if self._process is None:
                self._process = psutil.Process()
            return self._process.memory_info().rss
        except psutil.Error:
            return 0

    async def _watch_memory(self) -> None:
        """Every `memory_check_interval`, have the driver measure and act."""
        while True:
            await trio.sleep(self.config.memory_check_interval)
            self._post(self._check_memory)

    def _after_store(self, nbytes: int) -> None:
        """`nbytes` of values were just stored: if that is a lot (a hundredth
        of the limit), measure soon rather than at the next check, since a
        few tasks can make big values faster than the watcher looks.

        Soon, not now: the check is posted behind the handler that stored
        the value, whose frames (and the inbox item that carried it) still
        refer to it. Spilled now, the value would leave the store but not
        the process, the memory would not fall, and the check would spill
        everything else, then pause the worker for nothing.
        """
        if self.memory is not None and nbytes >= self.memory.limit * PROMPT_CHECK_FRACTION:
            self._post(self._check_memory)

    def _check_memory(self) -> None:
        """In the driver (the store is the driver's): spill, pause or resume."""
        assert self.memory is not None
        change = self.memory.check()
        if change is None:
            return
        rss, limit = self.memory.last_rss, self.memory.limit
        if change:
            logger.warning(
                "worker %s paused: its process uses %d bytes, past %.0f%% of its memory limit of %d bytes "
                "(%d values, %d bytes, spilled to disk)",
                self.address, rss, 100 * self.config.memory_pause_fraction, limit,
                len(self.memory.data.slow), self.memory.data.spilled_bytes,
            )
            self._apply(MemoryPaused(self._stimulus("paused")))
            self._send(m.Paused())
        else:
            logger.info("worker %s resumed: its process uses %d bytes of %d", self.address, rss, limit)
            self._apply(MemoryResumed(self._stimulus("resumed")))
            self._send(m.Resumed())

    # ------------------------------------------------------------- driver --

    def _post(self, handler: Callable, *args: Any) -> None:
        self._driver.post(handler, *args)

    async def _drive(self) -> None:
        """The driver's task: it, and the reader or execution that finds the
        driver idle (`Driver.run_or_post`), are the only code that touches
        `self.state` and writes `self.data`.

        Crash-only (trioflow/drivers.py says why): a handler that raises is
        a bug, and the core may have applied part of the event and lost its
        instructions. So the worker stops, with `DriverStopped` naming the
        event and the exception; its nanny starts a new one, and the
        scheduler reroutes what this one held and ran.
        """
        await self._driver.run()

    def _stimulus(self, what: str) -> str:
        return f"{what}-{next(self._stimulus_ids)}"

    def _apply(self, event: WorkerEvent) -> None:
        assert self.state is not None
        for instruction in self.state.handle(event):
            self._carry_out(instruction)

    def _carry_out(self, instruction: WorkerInstruction) -> None:
        if isinstance(instruction, Execute):
            # The function is looked up now, while the order that needs it
            # is being handled: a later free_functions must not take it away
            # from a run that is about to start.
            self._spawn(self._execute, instruction, self.functions.get(instruction.run_spec[0]))
        elif isinstance(instruction, Rejoin):
            resumed = self._rejoining.pop(instruction.key, None)
            if resumed is not None:
                resumed.set()
        elif isinstance(instruction, Gather):
            self._spawn(self._gather, instruction)
        elif isinstance(instruction, DropData):
            for key in instruction.keys:
                self.data.pop(key, None)
                self._reported.pop(key, None)
        elif isinstance(instruction, SendTaskStarted):
            self._send(m.TaskStarted(key=instruction.key))
        elif isinstance(instruction, SendTaskFinished):
            inline = self._inline.get(instruction.key)
            start, stop = self._run_times.get(instruction.key, (None, None))
            self._send_report(
                m.TaskFinished(
                    key=instruction.key, nbytes=instruction.nbytes, value=inline, start=start, stop=stop,
                    duration=self._durations.get(instruction.key),
                )
            )
        elif isinstance(instruction, SendTaskErred):
            start, stop = self._run_times.get(instruction.key, (None, None))
            failure = failure_to_wire(instruction.failure)
            self._send(m.TaskErred(key=instruction.key, failure=failure, start=start, stop=stop))
        elif isinstance(instruction, SendReplicaAdded):
            self._send_report(m.ReplicaAdded(key=instruction.key, nbytes=instruction.nbytes))
        elif isinstance(instruction, SendStealAnswer):
            self._send(
                m.StealResponse(key=instruction.key, steal_id=instruction.steal_id, given_up=instruction.given_up)
            )
        elif isinstance(instruction, SendDataDropped):
            keys = list(instruction.keys)
            for start in range(0, len(keys), m.MAX_KEYS):
                self._send(m.DataDropped(keys=keys[start : start + m.MAX_KEYS]))
        elif isinstance(instruction, SendReplicaMissing):
            self._send(
                m.ReplicaMissing(
                    key=instruction.key, holders=list(instruction.holders), dependent=instruction.dependent
                )
            )
        else:  # pragma: no cover - a new instruction without a case here
            raise TypeError(f"no handler for {instruction!r}")

    def _send(self, message: m.Message) -> None:
        if self._scheduler is None:
            return
        try:
            self._scheduler.send(message)
        except CommClosedError:
            return  # the reader notices and ends the link

    def _send_report(self, message: m.TaskFinished | m.ReplicaAdded) -> None:
        """Send a report that makes the scheduler count our copy of a value, numbered."""
        if self._scheduler is None:
            return
        self._reports_sent += 1
        self._reported[message.key] = self._reports_sent
        self._send(message)

    def _spawn(self, async_fn: Callable, *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(async_fn, *args)

    # ------------------------------------------------- scheduler messages --

    def _from_scheduler(self, conn: Connection, messages: list[m.Message]) -> None:
        for message in messages:
            handler = self._scheduler_handlers.get(type(message))
            if handler is None:
                logger.warning("ignoring an unexpected %r from the scheduler", message.OP)
                continue
            handler(conn, message)

    def _on_compute_task(self, conn: Connection, msg: m.ComputeTask) -> None:
        if msg.function is not None:
            try:
                self.functions[msg.function_id] = verify_function(msg.function_id, msg.function)
            except SerializationError as exc:
                logger.warning("the scheduler sent a function that does not match its id: %s", exc)
        self._apply(
            ComputeRequested(
                self._stimulus("compute"),
                msg.key,
                (msg.function_id, msg.args),
                tuple(msg.priority),
                {k: tuple(v) for k, v in msg.who_has.items()},
                msg.nbytes,
            )
        )

    def _on_steal_request(self, conn: Connection, msg: m.StealRequest) -> None:
        self._apply(StealRequested(self._stimulus("steal"), msg.key, msg.steal_id))

    def _on_free_keys(self, conn: Connection, msg: m.FreeKeys) -> None:
        # Which of these values the scheduler had stopped counting here for
        # good: their last report on this connection (if any: a value held
        # at registration has none) was heard before the free was decided,
        # so none can be crossing it. A free that comes from an older
        # connection than the current one is answered in full.
        heard: frozenset[str] = frozenset()
        if conn is self._scheduler:
            heard = frozenset(key for key in msg.keys if self._reported.get(key, 0) <= msg.reports_heard)
        self._apply(FreeRequested(self._stimulus("free"), tuple(msg.keys), heard))

    def _scheduler_lost(self) -> None:
        """The link is gone: tasks not started are dropped (the core's
        `SchedulerLost`), and with them the functions they would have
        called. The scheduler's record of this cache dies with the link,
        and the next link's starts empty (each function comes again with
        the first task that calls it), so nothing would ever free what is
        cached now. Runs already started hold their function.
        """
        self._apply(SchedulerLost(self._stimulus("scheduler-lost")))
        self.functions.clear()

    def _on_free_functions(self, conn: Connection, msg: m.FreeFunctions) -> None:
        for function_id in msg.function_ids:
            self.functions.pop(function_id, None)

    def _on_acquire_replicas(self, conn: Connection, msg: m.AcquireReplicas) -> None:
        who_has = {k: tuple(v) for k, v in msg.who_has.items()}
        self._apply(ReplicasRequested(self._stimulus("replicate"), who_has, msg.nbytes))

    def _on_close(self, conn: Connection, msg: m.Close) -> None:
        logger.warning("worker %s was told to leave by the scheduler: %s", self.address, clip(msg.reason, 300))
        self.stop()

    def _on_invalid(self, conn: Connection, msg: m.Invalid) -> None:
        logger.warning("refused a %r from the scheduler: %s", msg.op, clip(msg.reason, 300))
        reply(conn, msg, error=msg.reason)

    def _on_nothing(self, conn: Connection, msg: m.Message) -> None:
        """A heartbeat's answer (it kept the link alive by arriving)."""

    def _on_put_data(self, conn: Connection, msg: m.PutData) -> None:
        try:
            # A value already here is kept, never replaced: scattered keys
            # name their content, and a value computed here is the task's.
            values = {key: loads(value) for key, value in msg.data.items() if key not in self.data}
        except SerializationError as exc:
            reply(conn, msg, error=str(exc))
            return
        self.data.update(values)
        nbytes = {key: self._size_of(key) for key in msg.data}
        self._apply(DataPut(self._stimulus("put-data"), nbytes))
        reply(conn, msg, m.PutDataReply(nbytes=nbytes))

    def _on_run(self, conn: Connection, msg: m.RunEverywhere) -> None:
        self._spawn(self._run_function, conn, msg)

    async def _run_function(self, conn: Connection, msg: m.RunEverywhere) -> None:
        """`client.run`: call a function right here, in the worker's Trio thread.

        Like a task it goes through the executor, but it does not wait for a
        free task thread: `run` is for inspecting and preparing workers,
        and must work even while every thread is busy.
        """
        try:
            function = loads(msg.function)
            if wants_keyword(function, "dask_worker"):
                function = functools.partial(function, dask_worker=self)
            result = await self.executor.run_now(function)
            payload = dumps(result)
        except (Exception, SystemExit) as exc:
            reply(conn, msg, m.RunHereReply(failure=failure_to_wire(user_error_from_exception(exc))))
            return
        reply(conn, msg, m.RunHereReply(result=payload))

    # ----------------------------------------------------------- uploads --

    def _on_upload_file(self, conn: Connection, msg: m.UploadFile) -> None:
        """Store an uploaded .py, .zip or .egg where this process imports from.

        Written here, in the driver, before the next message is handled:
        the tasks that import it come after it on this connection. (Files
        are bounded by `MAX_UPLOAD_BYTES`, so this is a short stall.)
        """
        try:
            self._store_upload(msg.filename, loads(msg.data))
        except (OSError, SerializationError, ValueError, ImportError, SyntaxError) as exc:
            logger.warning("worker %s could not store %s: %s", self.address, msg.filename, exc)
            reply(conn, msg, error=clip(f"{type(exc).__name__}: {exc}", m.MAX_REASON_CHARS - 20))
            return
        reply(conn, msg, m.UploadHereReply())

    def _store_upload(self, filename: str, data: Any) -> None:
        if not m.is_upload_name(filename) or not isinstance(data, bytes):
            raise ValueError(f"refusing to store {filename!r}")
        if self.local_directory is None:
            self.local_directory = tempfile.mkdtemp(prefix="trioflow-worker-files-")
            sys.path.insert(0, self.local_directory)
        path = os.path.join(self.local_directory, filename)
        with open(path, "wb") as file:
            file.write(data)
        if filename.endswith(".py"):
            importlib.invalidate_caches()
            name = filename[: -len(".py")]
            if name in sys.modules:
                importlib.reload(sys.modules[name])  # a new version of a module tasks imported
        elif path not in sys.path:
            sys.path.insert(0, path)  # an archive: import from inside it
        logger.info("worker %s stored %s (%d bytes)", self.address, filename, len(data))

    def _remove_local_directory(self) -> None:
        directory, self.local_directory = self.local_directory, None
        if directory is None:
            return
        sys.path[:] = [p for p in sys.path if p != directory and not p.startswith(directory + os.sep)]
        shutil.rmtree(directory, ignore_errors=True)

    # ----------------------------------------------------------- execution --

    async def _execute(self, instruction: Execute, function: SerializedFunction | None) -> None:
        key = instruction.key
        function_id, args = instruction.run_spec
        inputs = {dep: self.data[dep] for dep in instruction.dependencies}
        if self._scheduler is not None:
            try:
                # The task_started message must be written (the kernel's)
                # before the function runs: if it kills this process, the
                # scheduler still learns that this task was running
                # (KilledWorker). It is held (`TaskStarted`): the kernel
                # sends it with our next message, or as the socket closes.
                await self._scheduler.flush()
            except CommClosedError:
                pass

        token = trio.lowlevel.current_trio_token()

        def run() -> tuple[bool, Any]:
            """In the thread: unpack, call, and capture a failure right here,
            so its traceback starts at the user's function, not in trioflow."""
            try:
                if function is None:
                    raise SerializationError(f"the scheduler never sent function {function_id}")
                fn = loads_function(function.payload)
                call_args, call_kwargs = loads(args)
                if inputs:
                    call_args, call_kwargs = substitute((call_args, call_kwargs), inputs)
            except (Exception, SystemExit) as exc:
                return False, user_error_from_exception(exc)
            try:
                with running_task(self, key, token):
                    return True, fn(*call_args, **call_kwargs)
            except (Exception, SystemExit) as exc:
                return False, user_error_from_exception(exc, skip_frames=1)

        def timed() -> tuple[bool, Any, tuple[float, float]]:
            """`run`, with its wall-clock start and stop for the task stream
            (never a decision). The duration comes from the monotonic clock,
            so a step of the wall clock cannot make a run end before it began."""
            start, begun = epoch_seconds(), wall_seconds()
            ok, outcome = run()
            return ok, outcome, (start, start + (wall_seconds() - begun))

        # How long it ran by Trio's clock (a decision's input, unlike `times`:
        # the scheduler's duration estimates; virtual seconds in the simulator).
        began = trio.current_time()
        ok, outcome, times = await self.executor.run(timed)
        duration = trio.current_time() - began
        value, error = (outcome, None) if ok else (None, outcome)
        # Run at once if the driver is idle: the result goes out one pass
        # of the loop sooner (`Driver.run_or_post`).
        self._driver.run_or_post(self._executed, key, value, error, times, duration)

    def _executed(
        self,
        key: str,
        result: Any,
        failure: Any,
        times: tuple[float, float] | None = None,
        duration: float | None = None,
    ) -> None:
        self.executions += 1
        if times is not None:
            self._run_times[key] = times
        if duration is not None:
            self._durations[key] = duration
        try:
            self._report_execution(key, result, failure)
        finally:
            self._run_times.clear()
            self._durations.clear()

    def _report_execution(self, key: str, result: Any, failure: Any) -> None:
        if failure is not None:
            self._apply(ExecutionFailed(self._stimulus("execute-failed"), key, failure))
            return
        nbytes = sizeof(result)
        if self.memory is not None and self.memory.too_big(nbytes):
            # Kept, it would push the process past its limit (the nanny kills
            # it); spilled, it could never be read back. A clear error instead.
            error = MemoryError(too_big_message(key, nbytes, self.memory.limit))
            logger.warning("worker %s: %s", self.address, error)
            del result
            self._apply(ExecutionFailed(self._stimulus("execute-failed"), key, user_error_from_exception(error)))
            return
        self.data[key] = result
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
        self._after_store(nbytes)

    # ---------------------------------------------------------- fetching --

    async def _gather(self, instruction: Gather) -> None:
        peer, keys = instruction.peer, list(instruction.keys)
        values: dict[str, Serialized] = {}
        missing: list[str] = []
        errors: dict[str, str] = {}
        failed_at = self._unanswered.get(peer)
        if failed_at is not None:
            await trio.sleep_until(failed_at + self.config.heartbeat_interval)
        try:
            todo = keys
            while todo:
                later: list[str] = []
                for start in range(0, len(todo), GET_DATA_CHUNK):
                    answer = await self._pool.call(peer, m.GetData(keys=todo[start : start + GET_DATA_CHUNK]))
                    values.update(answer.data)
                    missing.extend(answer.missing)
                    errors.update(answer.errors)
                    later.extend(answer.later or ())
                # Too big to come with the others: asked for again. (The
                # first value of an answer always comes or errs: progress.)
                todo = [key for key in later if key not in values]
        except (CommClosedError, RequestFailed, ProtocolError) as exc:
            logger.info("could not fetch %d keys from %s: %s", len(keys), peer, clip(str(exc), 300))
            now = trio.current_time()
            for other, at in list(self._unanswered.items()):
                if at + self.config.heartbeat_interval <= now:
                    del self._unanswered[other]  # long past: forget it
            self._unanswered[peer] = now
            self._post(self._apply, GatherFailed(self._stimulus("gather-failed"), peer, instruction.keys))
            return
        self._unanswered.pop(peer, None)
        asked = set(keys)
        loaded: dict[str, Any] = {}
        failures = {}
        for key, serialized in values.items():
            if key not in asked:
                continue  # a peer cannot hand us keys we did not ask for
            try:
                loaded[key] = loads(serialized)
            except SerializationError as exc:
                failures[key] = user_error_from_exception(exc)
        for key, message in errors.items():
            if key in asked:
                failures[key] = user_error_from_exception(SerializationError(message))
        self._post(self._gathered, peer, loaded, tuple(k for k in missing if k in asked), failures)

    def _size_of(self, key: str) -> int:
        """The estimated size of a value held here (without reading it back from disk)."""
        if self.memory is not None:
            return self.memory.data.sizes[key]
        return sizeof(self.data[key])

    def _gathered(self, peer: str, values: dict[str, Any], missing: tuple, failures: dict) -> None:
        assert self.state is not None
        nbytes = {}
        for key, value in values.items():
            if self.state.awaits_from_peer(key):
                self.data[key] = value
                nbytes[key] = sizeof(value)
        self._apply(GatherSucceeded(self._stimulus("gathered"), peer, nbytes, missing, failures))
        self._after_store(sum(nbytes.values()))

    # --------------------------------------------------------- serving data --

    async def _serve_peer(self, stream: trio.abc.Stream) -> None:
        """Answer `get_data` requests from other workers and from clients."""
        async with self._door.admit(stream) as admitted:
            if admitted is None:
                return
            conn, _ = admitted
            conn.idle_timeout = self.config.idle_timeout
            try:
                while True:
                    for request in await conn.receive():
                        if isinstance(request, m.Invalid):
                            reply(conn, request, error=request.reason)
                        else:
                            self._answer_get_data(conn, request)
            except CommClosedError:
                pass
            except ProtocolError as exc:
                logger.warning("closing peer connection: %s", clip(str(exc), 300))

    def _answer_get_data(self, conn: Connection, request: m.GetData) -> None:
        """Send the values asked for, as many as the asker's budget takes.

        A value too big to travel at all is an error naming its key and
        size (it would never arrive; asking again would loop). Values that
        fit alone but not after the ones before them are sent `later`: the
        asker asks for them again.
        """
        data: dict[str, Serialized] = {}
        missing: list[str] = []
        errors: dict[str, str] = {}
        later: list[str] = []
        room = max_value_bytes(conn.send_limits)
        used = 0
        for key in request.keys:
            if key not in self.data:
                missing.append(key)
                continue
            try:
                # A spilled value goes as the bytes on disk, never unpickled here.
                value = self.memory.data.serialized(key) if self.memory is not None else dumps(self.data[key])
            except SerializationError as exc:
                errors[key] = clip(f"the result of {key!r} cannot be sent: {exc}", m.MAX_REASON_CHARS - 20)
                continue
            if value.nbytes > room:
                errors[key] = clip(
                    too_big(f"the result of {clip(key)}", value.nbytes, conn.send_limits), m.MAX_REASON_CHARS - 20
                )
            elif used + value.nbytes > room:
                later.append(key)
            else:
                data[key] = value
                used += value.nbytes
        reply(conn, request, m.GetDataReply(data=data, missing=missing, errors=errors, later=later or None))
