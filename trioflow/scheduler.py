"""The scheduler process: a Trio shell around `trioflow.core.SchedulerState`.

What this file does, and nothing more:

* accepts connections (`Network.serve`), reads the hello, and runs one
  reader task per connection;
* keeps each worker alive with a `trio.CancelScope` whose deadline every
  message from the worker pushes `worker_ttl` seconds ahead; when the
  deadline passes, the reader is cancelled and the worker is declared gone
  through the same path as a closed connection (design.md §1, "worker
  hangs");
* turns typed messages into core events and core messages into typed
  messages (`trioflow.comm.messages` declares them all), through one
  dispatch table per role.

One driver (`trioflow/drivers.py`) owns the core. Readers hand it what
they receive, so the core is never touched from two places and needs no
lock: the driver's task runs it, or the reader itself when the driver is
idle (`Driver.run_or_post`); exchanges that must wait on other peers
(`scatter` puts data on workers, `run` calls every worker) run as their
own tasks (`scheduler_exchanges`) and come back through the driver's
inbox.

A peer can hurt only its own connection (design.md §6 rule 5): whatever it
sends is checked at the edge (`Connection.receive`), a message that breaks
its declaration closes that connection (a request gets an error reply
instead), a submission that cannot be run (a cycle, an unknown function)
is refused with `submit_refused`, and a reader whose peer floods the
driver waits for it to catch up (`MAX_UNHANDLED`) without that wait
counting against the peer's liveness.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import weakref
from collections.abc import Callable
from typing import Any

import trio

from trioflow import scheduler_exchanges as exchanges
from trioflow.comm import (
    ByteBudget,
    Connection,
    ConnectionPool,
    FrameLimits,
    LoopLag,
    Network,
    PeerSilent,
    Requests,
    TCPNetwork,
    clip,
    loop_lag,
    open_connection_pool,
    reply,
)
from trioflow.comm import messages as m
from trioflow.comm.auth import ANY_CREDENTIAL, Credentials, credentials_for
from trioflow.comm.door import Door
from trioflow.comm.security import Security
from trioflow.comm.serialize import Serialized, SerializedFunction, content_digest, verify_function
from trioflow.config import Config
from trioflow.core.scheduler_state import SchedulerState
from trioflow.core.scheduler_events import (
    AcquireReplicas,
    ClientConnected,
    ClientDisconnected,
    ClusterRestarted,
    ComputeTask,
    DataDropped,
    DataScattered,
    FreeKeys,
    KeysCancelled,
    KeysFiredAndForgotten,
    KeysReleased,
    OrphansExpired,
    RecoveryEnded,
    ReplicaAdded,
    ReplicaMissing,
    ReplicationRequested,
    ReportErred,
    ReportFinished,
    ReportLost,
    RequestSteal,
    SchedulerEvent,
    SchedulerMessage,
    SchedulerStarted,
    StealAnswered,
    TaskErred,
    TaskFinished,
    TaskSpec,
    TasksSubmitted,
    TaskStarted,
    WakeAfter,
    WorkerConnected,
    WorkerDisconnected,
    WorkerPaused,
    WorkerResumed,
)
from trioflow.drivers import Driver
from trioflow.errors import CommClosedError, DriverStopped, ProtocolError, SerializationError
from trioflow.nurseries import side_by_side
from trioflow.comm import dumps, loads
from trioflow.protocol import RunSpec, failure_from_wire, failure_to_wire, user_error_from_exception, wants_keyword
from trioflow.recorder import ClusterRecorder, error_text, event_record, run_record

logger = logging.getLogger("trioflow.scheduler")

# Most messages of one batch the driver handles before yielding to other tasks,
# and most work: a message weighs one, plus one per task or key it carries
# (`_weight`), so a slice of 2,048 is a few milliseconds of the driver's time
# whatever the messages hold. (Slicing by count alone let 64 `release_keys`
# of 10,000 keys each hold the loop for seconds.)
DRIVER_SLICE = 64
DRIVER_SLICE_WEIGHT = 2_048
# Messages a connection may have waiting for the driver before its reader
# stops reading (backpressure: a flood waits in the peer's socket, not in
# our memory).
MAX_UNHANDLED = 50_000
# Keys a worker may list as held or running when it registers.
MAX_REGISTERED_KEYS = 10_000_000
# Bytes of uploaded files a scheduler keeps for workers that join later.
MAX_UPLOADS_BYTES = 256 << 20
# Least seconds between two writes to a client (`Connection.write_interval`).
# A busy cluster finishes tasks every few hundred microseconds, and each
# write of their results wakes the client's loop thread, which in a
# `LocalCluster` then competes for the GIL with this one; spacing the writes
# puts about five results in each instead of one or two (W1: 3,773 writes
# for 20,000 results instead of 15,287; the client's thread ~25 % less CPU
# a task; docs/performance-history.md, the seventh round).
# An idle link writes at once, so a lone result (W2) is never held back.
CLIENT_WRITE_INTERVAL_S = 0.0005
# Seconds a worker keeps a function after the last task there that calls it
# has left (`WorkerLink.idle_functions`); freed between one and two of these
# later. A program that submits one task at a time and waits for it (a loop
# of `submit(f, x).result()`) would otherwise have the function freed at
# every result and sent (and unpickled) again with the next task: one
# message more to the worker a round trip, written while the result goes
# to the client. 0: freed at once.
FUNCTION_GRACE_S = 0.5


class _Link:
    """One accepted connection and the reader task serving it."""

    def __init__(self, conn: Connection, name: str, outbound: str):
        self.conn = conn
        self.name = name
        self.requests = Requests(conn, outbound)
        # Cancelling this ends the reader (and so the connection).
        self.scope = trio.CancelScope()
        self.close_reason: str | None = None
        # Set once the driver has sent the welcome (nothing may precede it).
        self.welcomed = False
        # Messages posted to the driver and not yet handled (backpressure).
        self.unhandled = 0
        self.caught_up = trio.Event()
        # Exchanges this connection asked for (`run`, `wait_for_workers`...):
        # they end with it.
        self.exchanges: trio.Nursery | None = None

    def send(self, message: m.Message) -> None:
        """Queue `message`; a closed link is ignored (its departure is on its way)."""
        try:
            self.conn.send(message)
        except CommClosedError:
            pass

    def close(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        self.scope.cancel()


class WorkerLink(_Link):
    def __init__(self, conn: Connection, hello: m.Hello, serial: int):
        super().__init__(conn, hello.address, m.SCHEDULER_TO_WORKER)
        self.address: str = hello.address
        self.nthreads: int = hello.nthreads
        # The worker's process id, for operators (and tests that kill it).
        self.pid = hello.pid
        # The control address of its nanny (None: no nanny, no restarts).
        self.nanny = hello.nanny
        # What it offers to tasks that ask for resources.
        self.resources: dict[str, float] = dict(hello.resources)
        # Registration number: later registrations have larger ones.
        self.serial = serial
        self.last_heartbeat: dict[str, float] = {}
        self.last_heartbeat_at = -math.inf
        # True when the worker said goodbye or was asked to leave.
        self.retiring = False
        # The worker's function cache, mirrored: which function each task
        # sent there calls, and how many such tasks there are per function.
        # When the count drops to zero the worker is told to drop it, and
        # the next task that needs it carries it again. Messages on one
        # connection are ordered, so both sides always agree.
        self.task_functions: dict[str, str] = {}
        self.function_users: dict[str, int] = {}
        # Functions the worker still has that no task there calls, and
        # since when (Trio's clock): kept for FUNCTION_GRACE_S, so that the
        # next task that calls one finds it there.
        self.idle_functions: dict[str, float] = {}
        # How many value reports (task_finished, replica_added) the driver
        # has handled from this connection. Every free_keys carries it: the
        # worker answers a free with data_dropped only for values whose
        # last report this count does not cover, i.e. whose report may be
        # crossing the free on the wire (`Worker._on_free_keys`).
        self.reports_heard = 0

    def free(self, keys: list[str]) -> None:
        """Tell the worker to drop `keys`, in messages of at most MAX_KEYS,
        each saying how many of its value reports were heard before it."""
        for start in range(0, len(keys), m.MAX_KEYS):
            self.send(m.FreeKeys(keys=keys[start : start + m.MAX_KEYS], reports_heard=self.reports_heard))

    def task_done(self, key: str) -> str | None:
        """`key` left this worker; the function id it no longer needs, if any."""
        function_id = self.task_functions.pop(key, None)
        if function_id is None:
            return None
        left = self.function_users[function_id] - 1
        if left:
            self.function_users[function_id] = left
            return None
        del self.function_users[function_id]
        return function_id


class ClientLink(_Link):
    def __init__(self, conn: Connection, client_id: str, recovering: bool = False):
        super().__init__(conn, client_id, m.CLIENT_TO_SCHEDULER)
        self.client_id = client_id
        conn.write_interval = CLIENT_WRITE_INTERVAL_S
        # It reconnected after a scheduler restart (it resubmits lineage).
        self.recovering = recovering
        # Whether its messages wait in `held_back` until the core's recovery
        # window closes (`RecoveryEnded`); decided when it joins.
        self.holding = False
        self.held_back: list[m.Message] = []


class _Refusal(Exception):
    """A submission the scheduler will not take (the text says why)."""


class Scheduler:
    """Serve a trioflow scheduler.

    Args:
        host: interface to bind; loopback unless told otherwise, because
            anyone who can reach the port can run code on the workers.
        port: TCP port, 0 for any free one.
        config: tunables; defaults plus ``TRIOFLOW_*`` variables if omitted.
            ``dashboard_port`` serves the dashboard (docs/dashboard.md).
        network: how to accept connections (the simulator passes its own).
        credentials: the cluster's credentials (by default from
            ``TRIOFLOW_TOKEN`` or `Config.token_file`).
        dashboard_check: decides which requests the dashboard answers, in
            place of its token check (`trioflow.dashboard.auth`).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        config: Config | None = None,
        network: Network | None = None,
        credentials: Credentials | None = None,
        dashboard_check: Callable[..., Any] | None = None,
    ):
        self.config = config or Config.from_env()
        self.restart_timeout = self.config.restart_timeout
        self.network = network or TCPNetwork(Security.from_config(self.config), self.config.handshake_timeout)
        # What every connection must prove (docs/security.md): given, or
        # found (TRIOFLOW_TOKEN, the token file); `trioflow scheduler`
        # creates a token file on its first start.
        self.credentials = (
            credentials if credentials is not None
            else credentials_for(self.config, "a scheduler", cluster=True)
        )
        self.host = host
        self.port = port
        self.limits = FrameLimits.from_config(self.config)
        self.budget = ByteBudget(self.config.max_process_bytes)
        self.door = Door(
            "a trioflow scheduler",
            config=self.config,
            credentials=self.credentials,
            credential_roles=ANY_CREDENTIAL,
            roles={"client": m.CLIENT_TO_SCHEDULER, "worker": m.WORKER_TO_SCHEDULER},
            budget=self.budget,
        )
        self.state = SchedulerState(
            allowed_failures=self.config.allowed_failures,
            worker_saturation=self.config.worker_saturation,
            work_stealing=self.config.work_stealing,
            bandwidth=self.config.bandwidth,
            recovery_grace_s=self.config.recovery_grace,
            orphan_timeout_s=self.config.orphan_timeout,
        )
        # What happened, for people (the dashboard, get_task_stream): fed
        # here, never read by a decision. It watches the core's story.
        self.recorder = ClusterRecorder()
        self.recorder.watch(self.state)
        if dashboard_check is None and self.credentials.enabled and not self.config.dashboard_token:
            # Like every other entry point: whoever may use the cluster (the
            # client token) may watch it; `?token=<client token>` in a browser.
            from trioflow.dashboard.auth import token_check

            dashboard_check = token_check(self.credentials.client_token())
        self.dashboard_check = dashboard_check
        # ``http://host:port/`` once the dashboard serves.
        self.dashboard_address: str | None = None
        self.address: str | None = None
        self.loop_lag: LoopLag | None = None
        self.workers: dict[str, WorkerLink] = {}
        self.clients: dict[str, ClientLink] = {}
        # function_id -> the function, while any task refers to it (tasks
        # hold it through their RunSpec; this only finds it by id).
        self.functions: weakref.WeakValueDictionary[str, SerializedFunction] = weakref.WeakValueDictionary()
        self._driver = Driver(lambda: f"the scheduler at {self.address}", logger)
        self._stimulus_ids = itertools.count()
        self._serials = itertools.count(1)
        self._membership_changed = trio.Event()
        # Set after every state change for tasks waiting on a condition
        # (replication, restarts); None while nobody waits.
        self._state_changed: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._pool: ConnectionPool | None = None
        # free_keys and free_functions held back per worker until `_apply` ends.
        self._frees: dict[str, list[str]] = {}
        self._function_frees: dict[str, list[str]] = {}
        # Set when a function goes idle on a worker (`_free_idle_functions_in_time`).
        self._functions_went_idle = trio.Event()
        # Files clients uploaded (`Client.upload_file`), in upload order: each
        # worker that joins gets them all before anything else.
        self.uploads: dict[str, Serialized] = {}
        # Resource names tasks asked for that no worker declared (warned once).
        self._unknown_resources: set[str] = set()
        # Small results that came with the task_finished being applied.
        self._inline_values: dict[str, Serialized] = {}
        # client id -> (failure, keys, origins): failures reported by the
        # event being applied, sent together when it ends (`_flush_erred`).
        self._erred: dict[str, tuple[Any, list[str], list[str]]] = {}
        # address -> (its registration number, the keys a departed worker
        # held or was assigned): what it may claim when it registers again
        # (`_checked_claims`).
        self._departed: dict[str, tuple[int, set[str]]] = {}
        self._worker_handlers: dict[type, Callable[[WorkerLink, Any], SchedulerEvent | None]] = {
            m.TaskStarted: self._on_task_started,
            m.TaskFinished: self._on_task_finished,
            m.TaskErred: self._on_task_erred,
            m.ReplicaAdded: self._on_replica_added,
            m.ReplicaMissing: self._on_replica_missing,
            m.DataDropped: self._on_data_dropped,
            m.StealResponse: self._on_steal_response,
            m.Paused: self._on_paused,
            m.Resumed: self._on_resumed,
            m.Goodbye: self._on_goodbye,
            # Heartbeats are answered by the reader; one that overtakes the
            # welcome on its way to the driver is answered here.
            m.Heartbeat: self._on_heartbeat,
        }
        self._client_handlers: dict[type, Callable[[ClientLink, Any], None]] = {
            m.Submit: self._on_submit,
            m.ReleaseKeys: self._on_release_keys,
            m.CancelKeys: self._on_cancel_keys,
            m.FireAndForget: self._on_fire_and_forget,
            m.MissingData: self._on_missing_data,
            m.Scatter: self._on_scatter,
            m.RunEverywhere: self._on_run,
            m.RunOnScheduler: self._on_run_on_scheduler,
            m.UploadFile: self._on_upload_file,
            m.WhoHas: self._on_who_has,
            m.HasWhat: self._on_has_what,
            m.NThreads: self._on_nthreads,
            m.GetSchedulerInfo: self._on_scheduler_info,
            m.WaitForWorkers: self._on_wait_for_workers,
            m.GetTaskStream: self._on_get_task_stream,
            m.GetClusterMetrics: self._on_get_cluster_metrics,
            m.Replicate: self._on_replicate,
            m.Restart: self._on_restart,
            m.Invalid: self._on_invalid,
        }

    # -------------------------------------------------------------- serve --

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept workers and clients until cancelled.

        Reports the bound address through `task_status`. Shutdown is a
        cancellation: every connection closes; workers keep their data and
        running tasks and clients keep their futures (what they do next is
        theirs to decide).

        Raises:
            DriverStopped: a bug stopped the scheduler (`_drive`); the same
                happens to the connections as on shutdown.
        """
        stopped: DriverStopped | None = None
        try:
            await self._serve(task_status)
        except* DriverStopped as group:
            stopped = group.exceptions[0]  # type: ignore[assignment]
        if stopped is not None:
            # Out of the nursery's group as itself (its message is the point),
            # and raised here so that the group is not chained onto it.
            raise stopped

    async def _serve(self, task_status: trio.TaskStatus[str]) -> None:
        async with open_connection_pool(
            self.network,
            self.limits,
            role="control",
            credentials=self.credentials,
            connect_timeout=self.config.connect_timeout,
            peer_timeout=self.config.restart_timeout,
            idle_timeout=self.config.idle_timeout,
            budget=self.budget,
        ) as self._pool, side_by_side() as nursery:
            # (side_by_side: a port that is taken reaches the caller as the
            # OSError naming it, not wrapped in a group of one.)
            self._nursery = nursery
            # The core's recovery window opens now; it asks to be woken when
            # it closes (`WakeAfter`). Applied here, before the driver runs:
            # nothing else touches the core yet.
            self._apply(SchedulerStarted(self._stimulus("scheduler-started")))
            # This loop's stalls: the deadlines use them through their
            # connections, and the recorder shows every tick's lateness.
            self.loop_lag = loop_lag()
            self.loop_lag.watch(self.recorder.note_loop_lag)
            nursery.start_soon(self._drive)
            nursery.start_soon(self._free_idle_functions_in_time)
            self.address = await nursery.start(
                self.network.serve, self._serve_stream, self.host, self.port
            )
            logger.info("trioflow scheduler listening at %s", self.address)
            if self.config.dashboard_port is not None:
                from trioflow.dashboard import serve_dashboard

                self.dashboard_address = await nursery.start(serve_dashboard, self)
                if self.config.dashboard_token:
                    needs = " (requests need the dashboard token)"
                elif self.credentials.enabled:
                    needs = " (add ?token=<the client token> to the URL)"
                else:
                    needs = ""
                logger.info("trioflow dashboard at %s%s", self.dashboard_address, needs)
            task_status.started(self.address)

    async def wait_for_workers(self, n: int) -> None:
        """Return once at least `n` workers are registered."""
        while len(self.state.worker_addresses()) < n:
            await self._membership_changed.wait()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Return once `condition()` holds, re-checking after each state change."""
        while not condition():
            if self._state_changed is None:
                self._state_changed = trio.Event()
            await self._state_changed.wait()

    # --------------------------------------------------- connections: edge --

    async def _serve_stream(self, stream: trio.abc.Stream) -> None:
        async with self.door.admit(stream) as admitted:
            if admitted is None:
                return
            conn, hello = admitted
            try:
                link, held, running, early = await self._admit(conn, hello)
            except (ProtocolError, CommClosedError) as exc:
                logger.warning("closing a worker's connection before it registered: %s", clip(str(exc), 300))
                return
            conn.peer = link.name
            async with trio.open_nursery() as exchanges:
                link.exchanges = exchanges
                self._post(self._joined, link, held, running)
                reason = await self._read(link, early)
                # From here the nursery takes no new exchange: the driver
                # may still handle a request this link sent just before
                # it ended, and finds nobody to answer (`_spawn`).
                link.exchanges = None
                exchanges.cancel_scope.cancel(reason="its connection closed")
            self._post(self._left, link, reason)

    async def _admit(
        self, conn: Connection, hello: m.Hello
    ) -> tuple[_Link, dict[str, int], tuple[str, ...], list[m.Message]]:
        """The link for a hello (and a worker's registration), and the
        messages that came with the registration's last chunk."""
        if hello.role == "client":
            conn.idle_timeout = self.config.idle_timeout
            return ClientLink(conn, hello.client_id, recovering=hello.recovering), {}, (), []
        held, running, early = await self._registration(conn)
        return WorkerLink(conn, hello, next(self._serials)), held, tuple(running), early

    async def _registration(self, conn: Connection) -> tuple[dict[str, int], list[str], list[m.Message]]:
        """What a worker holds and runs, in `register` chunks up to `done`;
        and what came after `done` in the same receive.

        A worker may send before its welcome (a heartbeat while the welcome
        is slow, the report of a task it ran through a reconnection), and
        a receive returns the batches that arrived together: what follows
        `done` is handled after the welcome, as if it had come later.
        """
        held: dict[str, int] = {}
        running: list[str] = []
        with trio.move_on_after(self.config.connect_timeout):
            while True:
                batch = await conn.receive()
                for i, message in enumerate(batch):
                    if not isinstance(message, m.Register):
                        raise ProtocolError(f"a worker must register before sending {message.OP!r}")
                    held.update(message.held)
                    running.extend(message.running)
                    if len(held) + len(running) > MAX_REGISTERED_KEYS:
                        raise ProtocolError(f"a worker may register at most {MAX_REGISTERED_KEYS} keys")
                    if message.done:
                        return held, running, batch[i + 1 :]
        raise ProtocolError(f"a worker did not finish registering within {self.config.connect_timeout:g} s")

    async def _read(self, link: _Link, early: list[m.Message] | None = None) -> str:
        """Feed the driver until the connection ends; return why it ended.

        `early`: messages already received (with a worker's registration),
        handed over first.
        """
        is_worker = isinstance(link, WorkerLink)
        if is_worker:
            # spec: the liveness deadline. Any message from a worker is a
            # sign of life; silence for worker_ttl ends the connection (in
            # `Connection.receive`), which is how a hung worker is declared
            # dead. The time is counted in this loop's responsive time
            # (`liveness.LoopLag`): a stall of the scheduler's own loop
            # never counts against a worker (design.md §6 rule 6).
            link.conn.idle_timeout = self.config.worker_ttl
            link.conn.idle_name = "worker_ttl"
        try:
            with link.scope:
                if early:
                    self._hand_over(link, early)
                while True:
                    self._hand_over(link, await link.conn.receive())
                    if link.unhandled > MAX_UNHANDLED:
                        # We are the slow one: stop reading until the driver
                        # catches up. The peer is not silent: no deadline
                        # runs while we do not read.
                        while link.unhandled > MAX_UNHANDLED // 2:
                            link.caught_up = trio.Event()
                            await link.caught_up.wait()
            return link.close_reason or "closed by the scheduler"
        except PeerSilent as exc:
            return exc.reason
        except CommClosedError as exc:
            return f"connection closed ({clip(str(exc), 200)})"
        except ProtocolError as exc:
            logger.warning("closing connection from %s: %s", clip(link.name), clip(str(exc), 300))
            return f"protocol error: {clip(str(exc), 300)}"
        finally:
            link.requests.fail_all(f"{link.name} disconnected")

    def _hand_over(self, link: _Link, batch: list[m.Message]) -> None:
        """Give the driver what `link` sent, but what the reader answers itself."""
        rest = [msg for msg in batch if not self._answered_by_reader(link, msg)]
        link.unhandled += len(rest)
        # In slices of bounded work, so the driver yields between them and
        # one huge batch cannot hold the loop (whose heartbeat answers would
        # then be late). The first runs here if the driver is idle
        # (`Driver.run_or_post`).
        for i, part in enumerate(_slices(rest)):
            if i == 0:
                self._driver.run_or_post(self._received, link, part)
            else:
                self._driver.post(self._received, link, part)

    def _answered_by_reader(self, link: _Link, message: m.Message) -> bool:
        """Handle replies and heartbeats right here, not in the driver.

        A heartbeat is answered by the reader so that a busy driver (a long
        queue of work in its inbox) never makes a healthy scheduler look
        silent to its workers.
        """
        kind = type(message)
        if kind is m.Reply:
            return link.requests.deliver(message)
        if kind is m.Heartbeat and link.welcomed:
            assert isinstance(link, WorkerLink)
            link.last_heartbeat = message.metrics
            link.last_heartbeat_at = trio.current_time()
            link.send(m.HeartbeatAck())
            return True
        return kind is m.ClientHeartbeat

    def _post(self, handler: Callable, *args: Any) -> None:
        self._driver.post(handler, *args)

    # ------------------------------------------------------------- driver --

    async def _drive(self) -> None:
        """The driver's task: it and the readers that find the driver idle
        are the only code that touches `self.state` (`Driver.run_or_post`).

        Crash-only (trioflow/drivers.py says why): a handler that raises is
        a bug (bad input raises ProtocolError, which closes one connection
        in `_handle`, before it gets here), and the core may have applied
        part of the event and lost its messages. So the scheduler stops,
        with `DriverStopped` naming the event and the exception; restarted,
        it is rebuilt by the workers and clients that reconnect.
        """
        await self._driver.run()

    def _stimulus(self, what: str) -> str:
        return f"{what}-{next(self._stimulus_ids)}"

    def _apply(self, event: SchedulerEvent) -> None:
        try:
            for message in self.state.handle(event):
                self._dispatch(message)
        finally:
            self._inline_values.clear()
            self._flush_erred()
        self._flush_frees()
        if self._state_changed is not None:
            self._state_changed.set()
            self._state_changed = None

    def _joined(self, link: _Link, held: dict[str, int], running: tuple[str, ...]) -> None:
        # The welcome goes first: registering may already assign work.
        link.send(m.Welcome(address=self.address))
        link.welcomed = True
        if isinstance(link, WorkerLink):
            # Uploaded files first: messages on a connection are ordered, so
            # they are stored before any task that imports them arrives.
            for filename, data in self.uploads.items():
                try:
                    link.requests.send_unawaited(m.UploadFile(filename=filename, data=data))
                except CommClosedError:
                    break
            old = self.workers.get(link.address)
            if old is not None:
                old.close("replaced by a new connection from the same address")
                self._departed[link.address] = (old.serial, self.state.claimable_keys(link.address))
            held, running = self._checked_claims(link, held, running)
            self.workers[link.address] = link
            self._apply(
                WorkerConnected(
                    self._stimulus("worker-joined"), link.address, link.nthreads, held, running, link.resources
                )
            )
            logger.info("worker %s joined (%d threads)", link.address, link.nthreads)
            self.recorder.worker_joined(link.address, link.nthreads, link.pid)
            self._membership_changed.set()
            self._membership_changed = trio.Event()
        else:
            assert isinstance(link, ClientLink)
            old = self.clients.get(link.client_id)
            if old is not None:
                old.close("replaced by a new connection with the same client id")
            self.clients[link.client_id] = link
            if link.recovering and self.state.in_recovery():
                # Lineage from before a scheduler restart: held back until
                # the core's recovery window closes, so that surviving
                # workers re-register first.
                link.holding = True
            self._apply(ClientConnected(self._stimulus("client-joined"), link.client_id))

    def _checked_claims(
        self, link: WorkerLink, held: dict[str, int], running: tuple[str, ...]
    ) -> tuple[dict[str, int], tuple[str, ...]]:
        """What a registering worker says it holds and runs, less what it may not claim.

        A claim is taken when the key is unknown here (it stays an orphan,
        unconfirmed, until a client's resubmission claims it or it
        expires), while the core's recovery window is open (a new
        scheduler has no record to check a claim against: the workers that
        come back are the record), when this address held or ran the key
        when it left or had been told to fetch it (a copy asked of it, an
        input of a task it ran: the fetch may have landed after the link
        broke; `SchedulerState.claimable_keys`), or when the key is
        scattered data a client resubmitted and no worker has held since
        (`awaits_holder`: again nothing here contradicts the claim, and only
        a worker can bring that data back). Any other claim would let a
        worker that never had a value stand in for it before the clients
        waiting on that key: it is dropped, and the worker told to free it.
        """
        _, allowed = self._departed.pop(link.address, (0, set()))

        def credible(key: str) -> bool:
            return (
                self.state.in_recovery()
                or key in allowed
                or not self.state.knows(key)
                or self.state.awaits_holder(key)
            )

        kept_held = {k: n for k, n in held.items() if credible(k)}
        kept_running = tuple(k for k in running if credible(k))
        dropped = [k for k in held if k not in kept_held]
        if dropped or len(kept_running) != len(running):
            logger.warning(
                "worker %s claimed %d values and %d runs it never had here (e.g. %s); ignored",
                link.address, len(dropped), len(running) - len(kept_running), clip((dropped or list(running))[:3]),
            )
            link.free(dropped)
        return kept_held, kept_running

    def _left(self, link: _Link, reason: str) -> None:
        if isinstance(link, WorkerLink):
            if self.workers.get(link.address) is not link:
                return
            del self.workers[link.address]
            self._departed[link.address] = (link.serial, self.state.claimable_keys(link.address))
            self._spawn(self._forget_departed, link.address, link.serial)
            if link.retiring:
                logger.info("worker %s left on purpose", link.address)
            else:
                logger.warning("worker %s left: %s", link.address, reason)
            stimulus_id = self._stimulus("worker-left")
            _, processing, held = self.state.worker_load(link.address) or (0, 0, 0)
            self.recorder.worker_left(
                link.address, reason, expected=link.retiring, stimulus_id=stimulus_id,
                processing=processing, held=held,
            )
            self._apply(WorkerDisconnected(stimulus_id, link.address, expected=link.retiring))
            self._membership_changed.set()
            self._membership_changed = trio.Event()
        else:
            assert isinstance(link, ClientLink)
            if self.clients.get(link.client_id) is not link:
                return
            del self.clients[link.client_id]
            self._apply(ClientDisconnected(self._stimulus("client-left"), link.client_id))

    async def _forget_departed(self, address: str, serial: int) -> None:
        """After `orphan_timeout`, a departed worker's claims are no longer credible."""
        await trio.sleep(self.config.orphan_timeout)
        self._post(self._drop_departed, address, serial)

    def _drop_departed(self, address: str, serial: int) -> None:
        if self._departed.get(address, (None,))[0] == serial:
            del self._departed[address]

    async def _wake_after(self, delay_s: float, event: SchedulerEvent) -> None:
        """The core's timer (`WakeAfter`): `event` goes back to it after `delay_s`."""
        await trio.sleep(delay_s)
        self._post(self._timer_fired, event)

    def _timer_fired(self, event: SchedulerEvent) -> None:
        if isinstance(event, RecoveryEnded):
            # The recovery window closes. Every client that reconnected
            # within it resubmits now, all in one go (so that a value one
            # client's lineage brings back is still there when another
            # client that holds it resubmits); only then is the core told,
            # and judges which of the values workers brought back are needed.
            for link in list(self.clients.values()):
                if link.holding:
                    self._flush_held_client(link)
        self._apply(event)

    def _flush_held_client(self, link: ClientLink) -> None:
        link.holding = False
        held_back, link.held_back = link.held_back, []
        if held_back:
            self._handle(link, held_back)

    def _received(self, link: _Link, messages: list[m.Message]) -> None:
        link.unhandled -= len(messages)
        if link.unhandled <= MAX_UNHANDLED // 2:
            link.caught_up.set()
        if link.scope.cancel_called:
            return  # being closed: ignore whatever else it sent
        if isinstance(link, ClientLink) and link.holding:
            link.held_back.extend(messages)
            return
        self._handle(link, messages)

    def _handle(self, link: _Link, messages: list[m.Message]) -> None:
        try:
            handlers = self._worker_handlers if isinstance(link, WorkerLink) else self._client_handlers
            for message in messages:
                handler = handlers.get(type(message))
                if handler is None:
                    raise ProtocolError(f"unexpected {message.OP!r} after registration")
                event = handler(link, message)
                if event is not None:
                    self._apply(event)
        except ProtocolError as exc:
            logger.warning("closing connection from %s: %s", clip(link.name), clip(str(exc), 300))
            link.close(f"protocol error: {exc}")

    # ------------------------------------------------ core -> wire messages --

    def _flush_frees(self, address: str | None = None) -> None:
        """Send the `free_keys` (and `free_functions`) held back for one worker (or all)."""
        addresses = list(self._frees) if address is None else [address]
        for address in addresses:
            keys = self._frees.pop(address, None)
            worker = self.workers.get(address)
            if keys and worker is not None:
                worker.free(keys)
                for key in keys:
                    self._task_left(worker, key)
        for address in list(self._function_frees) if address is None else [address]:
            function_ids = self._function_frees.pop(address, None)
            worker = self.workers.get(address)
            if function_ids and worker is not None:
                for start in range(0, len(function_ids), m.MAX_KEYS):
                    worker.send(m.FreeFunctions(function_ids=function_ids[start : start + m.MAX_KEYS]))

    def _task_left(self, worker: WorkerLink, key: str) -> None:
        function_id = worker.task_done(key)
        if function_id is None:
            return
        if FUNCTION_GRACE_S > 0:
            worker.idle_functions[function_id] = trio.current_time()
            self._functions_went_idle.set()
        else:
            self._function_frees.setdefault(worker.address, []).append(function_id)

    async def _free_idle_functions_in_time(self) -> None:
        """Have functions that stayed idle FUNCTION_GRACE_S freed on their workers."""
        while True:
            await self._functions_went_idle.wait()
            self._functions_went_idle = trio.Event()
            await trio.sleep(FUNCTION_GRACE_S)
            self._post(self._free_idle_functions)

    def _free_idle_functions(self) -> None:
        """(Driver.) Free the functions idle for FUNCTION_GRACE_S or more; the
        younger ones get another look after the next sleep."""
        freed_before = trio.current_time() - FUNCTION_GRACE_S
        for worker in self.workers.values():
            idle = worker.idle_functions
            expired = [function_id for function_id, since in idle.items() if since <= freed_before]
            for function_id in expired:
                del idle[function_id]
            if expired:
                self._function_frees.setdefault(worker.address, []).extend(expired)
                self._flush_frees(worker.address)
            if idle:
                self._functions_went_idle.set()

    def _dispatch(self, message: SchedulerMessage) -> None:
        if isinstance(message, FreeKeys):
            # Releasing many keys frees them one by one; they travel as one
            # message per worker. Anything else for that worker flushes them
            # first, so its order of messages is kept.
            self._frees.setdefault(message.worker, []).extend(message.keys)
            return
        worker_address = getattr(message, "worker", None)
        if worker_address in self._frees or worker_address in self._function_frees:
            self._flush_frees(worker_address)
        if isinstance(message, WakeAfter):
            if isinstance(message.event, OrphansExpired):
                logger.info("%d values or runs re-registered that nobody has claimed yet", len(message.event.keys))
            self._spawn(self._wake_after, message.delay_s, message.event)
        elif isinstance(message, ComputeTask):
            worker = self.workers.get(message.worker)
            if worker is None:
                return
            spec: RunSpec = message.run_spec
            function_id = spec.function_id
            if message.key in worker.task_functions:
                self._task_left(worker, message.key)  # sent again: count it once
                self._flush_frees(worker.address)
            # Sent with the first task there that calls it, unless the
            # worker still has it from an earlier one (idle_functions).
            first = (
                function_id not in worker.function_users
                and worker.idle_functions.pop(function_id, None) is None
            )
            worker.task_functions[message.key] = function_id
            worker.function_users[function_id] = worker.function_users.get(function_id, 0) + 1
            worker.send(
                m.ComputeTask(
                    key=message.key,
                    function_id=function_id,
                    function=spec.function.payload if first else None,
                    args=spec.args,
                    priority=list(message.priority),
                    who_has={k: list(v) for k, v in message.who_has.items()},
                    nbytes=dict(message.nbytes),
                )
            )
        elif isinstance(message, RequestSteal):
            worker = self.workers.get(message.worker)
            if worker is not None:
                self.recorder.steal_requested()
                worker.send(m.StealRequest(key=message.key, steal_id=message.steal_id))
        elif isinstance(message, AcquireReplicas):
            worker = self.workers.get(message.worker)
            if worker is not None:
                worker.send(
                    m.AcquireReplicas(
                        who_has={k: list(v) for k, v in message.who_has.items()}, nbytes=dict(message.nbytes)
                    )
                )
        elif isinstance(message, ReportFinished):
            value = self._inline_values[message.key] if message.with_value else None
            self._to_client(message.client, m.KeyFinished(key=message.key, who_has=list(message.who_has), value=value))
        elif isinstance(message, ReportErred):
            # One failure is often reported for many keys (a cancel of
            # 100,000 futures, an error shared by dependents): they travel
            # together, as one `keys_erred` per failure (`_flush_erred`).
            batch = self._erred.get(message.client)
            if batch is not None and (batch[0] is not message.failure or len(batch[1]) >= m.MAX_KEYS):
                self._flush_erred(message.client)
                batch = None
            if batch is None:
                batch = self._erred[message.client] = (message.failure, [], [])
            batch[1].append(message.key)
            batch[2].append(message.origin)
        elif isinstance(message, ReportLost):
            self._to_client(message.client, m.KeyLost(key=message.key))
        else:  # pragma: no cover - a new message type without a case here
            raise TypeError(f"no dispatch for {message!r}")

    def _to_client(self, client_id: str, message: m.Message) -> None:
        if client_id in self._erred:
            self._flush_erred(client_id)  # what was reported first goes first
        link = self.clients.get(client_id)
        if link is not None:
            link.send(message)

    def _flush_erred(self, client_id: str | None = None) -> None:
        """Send the failures held back for one client (or all): one
        `key_erred`, or one `keys_erred` for many keys."""
        for client in list(self._erred) if client_id is None else [client_id]:
            failure, keys, origins = self._erred.pop(client)
            link = self.clients.get(client)
            if link is None:
                continue
            wire = failure_to_wire(failure)
            if len(keys) == 1:
                link.send(m.KeyErred(key=keys[0], origin=origins[0], failure=wire))
            else:
                link.send(m.KeysErred(keys=keys, origins=origins, failure=wire))

    # ------------------------------------------------------- worker ops --

    def _on_task_started(self, link: WorkerLink, msg: m.TaskStarted) -> SchedulerEvent:
        return TaskStarted(self._stimulus("task-started"), link.address, msg.key)

    def _on_task_finished(self, link: WorkerLink, msg: m.TaskFinished) -> SchedulerEvent:
        link.reports_heard += 1  # before the core hears it: a free it causes counts it
        self._task_left(link, msg.key)  # its run there is over, counted or not
        assigned = self.state.assigned_to(msg.key)
        if assigned is not None and assigned != link.address:
            logger.info(
                "ignoring task_finished for %s from %s: the task is processing on %s",
                clip(msg.key), link.address, assigned,
            )
        self.recorder.task_ran(link.address, msg.key, msg.start, msg.stop, nbytes=msg.nbytes)
        if msg.value is not None:
            # Passed on to clients told of this key during this event only
            # (the core says which: `ReportFinished.with_value`); the
            # scheduler keeps no values.
            self._inline_values[msg.key] = msg.value
        return TaskFinished(
            self._stimulus("task-finished"), link.address, msg.key, msg.nbytes,
            inline=msg.value is not None, duration=msg.duration,
        )

    def _on_task_erred(self, link: WorkerLink, msg: m.TaskErred) -> SchedulerEvent:
        self._task_left(link, msg.key)
        error = error_text(msg.failure.type_name, msg.failure.message)
        self.recorder.task_ran(link.address, msg.key, msg.start, msg.stop, error=error)
        return TaskErred(self._stimulus("task-erred"), link.address, msg.key, failure_from_wire(msg.failure))

    def _on_replica_added(self, link: WorkerLink, msg: m.ReplicaAdded) -> SchedulerEvent:
        link.reports_heard += 1
        self.recorder.transferred(msg.nbytes)
        return ReplicaAdded(self._stimulus("replica-added"), link.address, msg.key, msg.nbytes)

    def _on_replica_missing(self, link: WorkerLink, msg: m.ReplicaMissing) -> SchedulerEvent:
        return ReplicaMissing(
            self._stimulus("replica-missing"), link.address, msg.key, tuple(msg.holders), msg.dependent
        )

    def _on_data_dropped(self, link: WorkerLink, msg: m.DataDropped) -> SchedulerEvent:
        return DataDropped(self._stimulus("data-dropped"), link.address, tuple(msg.keys))

    def _on_steal_response(self, link: WorkerLink, msg: m.StealResponse) -> SchedulerEvent:
        if msg.given_up and self.state.steal_pending(msg.key, msg.steal_id, link.address):
            # The worker forgot the task: its function may go from there
            # (the thief gets it with its ComputeTask, if it lacks it).
            self._task_left(link, msg.key)
        return StealAnswered(self._stimulus("steal-answered"), link.address, msg.key, msg.steal_id, msg.given_up)

    def _on_paused(self, link: WorkerLink, msg: m.Paused) -> SchedulerEvent:
        logger.info("worker %s paused: its memory is past its pause fraction", link.address)
        return WorkerPaused(self._stimulus("worker-paused"), link.address)

    def _on_resumed(self, link: WorkerLink, msg: m.Resumed) -> SchedulerEvent:
        logger.info("worker %s resumed", link.address)
        return WorkerResumed(self._stimulus("worker-resumed"), link.address)

    def _on_heartbeat(self, link: WorkerLink, msg: m.Heartbeat) -> None:
        self._answered_by_reader(link, msg)
        return None

    def _on_goodbye(self, link: WorkerLink, msg: m.Goodbye) -> None:
        link.retiring = True
        return None

    # ------------------------------------------------------- client ops --

    def _on_submit(self, link: ClientLink, msg: m.Submit) -> None:
        try:
            specs = self._task_specs(msg)
        except _Refusal as exc:
            keys = list(dict.fromkeys(task.key for task in msg.tasks))
            logger.warning("refused %d tasks from client %s: %s", len(keys), clip(link.client_id), clip(str(exc), 300))
            link.send(m.SubmitRefused(keys=keys, reason=str(exc)))
            return
        self._apply(TasksSubmitted(self._stimulus("submit"), link.client_id, tuple(specs), tuple(msg.wanted)))
        self._warn_unknown_resources(specs)

    def _warn_unknown_resources(self, specs: list[TaskSpec]) -> None:
        """Say (once per name) that tasks ask for a resource no worker declares:
        they wait in no-worker until such a worker joins, which may be a typo."""
        wanted = {name for spec in specs if spec.resources for name in spec.resources}
        if not wanted:
            return
        declared = {name for worker in self.workers.values() for name in worker.resources}
        for name in sorted(wanted - declared - self._unknown_resources):
            self._unknown_resources.add(name)
            logger.warning(
                "tasks ask for resource %r, which no worker declares (declared: %s); they wait "
                "until a worker with it joins (trioflow worker --resources %s=N)",
                name, sorted(declared) or "none", name,  # (names are at most 64 characters)
            )

    def _task_specs(self, msg: m.Submit) -> list[TaskSpec]:
        """The core's task specs for a submission, after the checks the
        declarations cannot make: functions match their ids, and the new
        tasks form no cycle.

        Raises:
            _Refusal: with a reason naming the task and the field.
        """
        functions: dict[str, SerializedFunction] = {}
        for function_id, payload in msg.functions.items():
            function = self.functions.get(function_id)
            if function is None:
                try:
                    function = verify_function(function_id, payload)
                except SerializationError as exc:
                    raise _Refusal(f"field 'functions': {exc}") from None
                self.functions[function_id] = function
            functions[function_id] = function
        new: dict[str, m.TaskWire] = {}
        for task in msg.tasks:
            if task.key in task.dependencies:
                raise _Refusal(f"task {clip(task.key)} depends on itself (field 'dependencies')")
            if not self.state.knows(task.key):
                new.setdefault(task.key, task)
        cycle = _find_cycle(new)
        if cycle:
            path = " -> ".join(clip(k, 60) for k in cycle)
            raise _Refusal(f"the tasks' dependencies form a cycle: {path} (field 'dependencies')")
        specs = []
        for task in msg.tasks:
            if task.scattered:
                # Data without lineage, re-registered by a reconnecting client.
                specs.append(TaskSpec(task.key, None))
                continue
            function = functions.get(task.function_id) or self.functions.get(task.function_id)
            if function is None:
                raise _Refusal(
                    f"task {clip(task.key)} calls function {task.function_id[:16]}..., which is neither in "
                    f"this submission (field 'functions') nor known here"
                )
            specs.append(
                TaskSpec(
                    task.key,
                    RunSpec(function, task.args),
                    tuple(task.dependencies),
                    task.retries,
                    None if task.workers is None else tuple(task.workers),
                    task.loose,
                    task.resources,
                    task.priority,
                )
            )
        return specs

    def _on_release_keys(self, link: ClientLink, msg: m.ReleaseKeys) -> None:
        self._apply(KeysReleased(self._stimulus("release"), link.client_id, tuple(msg.keys)))

    def _on_cancel_keys(self, link: ClientLink, msg: m.CancelKeys) -> None:
        self._apply(KeysCancelled(self._stimulus("cancel"), link.client_id, tuple(msg.keys), msg.reason))

    def _on_fire_and_forget(self, link: ClientLink, msg: m.FireAndForget) -> None:
        # The core takes only keys this client holds.
        self._apply(KeysFiredAndForgotten(self._stimulus("fire-and-forget"), link.client_id, tuple(msg.keys)))

    def _on_missing_data(self, link: ClientLink, msg: m.MissingData) -> None:
        if not self.state.wants(link.client_id, msg.key):
            # Only a client that holds the key may say its copy is missing:
            # another client's word must not make that key lost.
            logger.info(
                "ignoring missing_data for %s from client %s, which holds no future for it",
                clip(msg.key), clip(link.client_id),
            )
            return
        event = ReplicaMissing(
            self._stimulus("client-missing"), f"client:{link.client_id}", msg.key, tuple(msg.holders)
        )
        self._apply(event)

    def _on_who_has(self, link: ClientLink, msg: m.WhoHas) -> None:
        reply(link.conn, msg, m.WhoHasReply(who_has=self.state.who_has(msg.keys)))

    def _on_has_what(self, link: ClientLink, msg: m.HasWhat) -> None:
        reply(link.conn, msg, m.HasWhatReply(has_what=self.state.has_what()))

    def _on_nthreads(self, link: ClientLink, msg: m.NThreads) -> None:
        reply(link.conn, msg, m.NThreadsReply(nthreads=self.state.nthreads()))

    def _on_scheduler_info(self, link: ClientLink, msg: m.GetSchedulerInfo) -> None:
        workers = {}
        for address in self.state.worker_addresses():
            nthreads, processing, held = self.state.worker_load(address)  # type: ignore[misc]
            worker = self.workers.get(address)
            workers[address] = m.WorkerInfo(
                nthreads=nthreads,
                processing=processing,
                keys=held,
                pid=None if worker is None else worker.pid,
                metrics={} if worker is None else worker.last_heartbeat,
            )
        info = m.SchedulerInfo(
            address=self.address,
            workers=workers,
            tasks=self.state.count_by_state(),
            clients=len(self.clients),
            dashboard=self.dashboard_address,
        )
        reply(link.conn, msg, m.InfoReply(info=info))

    def _on_get_task_stream(self, link: ClientLink, msg: m.GetTaskStream) -> None:
        runs, until, more = self.recorder.runs_page(
            after=msg.after, until=msg.until, start=msg.start, stop=msg.stop, count=msg.count,
            max_runs=m.MAX_STREAM_PAGE, max_bytes=self.config.max_body_bytes // 2,
        )
        reply(link.conn, msg, m.TaskStreamReply(runs=[run_record(r) for r in runs], until=until, more=more))

    def _on_get_cluster_metrics(self, link: ClientLink, msg: m.GetClusterMetrics) -> None:
        metrics = m.ClusterMetricsReply(
            counters=self.recorder.counters(),
            tasks=self.state.count_by_state(),
            workers=len(self.state.worker_addresses()),
            events=[event_record(e) for e in self.recorder.events_after(msg.events_after)],
        )
        reply(link.conn, msg, metrics)

    def _on_wait_for_workers(self, link: ClientLink, msg: m.WaitForWorkers) -> None:
        async def wait() -> None:
            await self.wait_for_workers(msg.n)
            reply(link.conn, msg, m.CountReply(n=len(self.state.worker_addresses())))

        self._spawn(wait, link=link)

    def _on_invalid(self, link: ClientLink, msg: m.Invalid) -> None:
        """A request (or submission) that broke its declaration: say which field."""
        logger.warning("refused a %r from client %s: %s", msg.op, clip(link.client_id), clip(msg.reason, 300))
        if msg.op == "submit":
            link.send(m.SubmitRefused(keys=msg.keys, reason=msg.reason))
        else:
            reply(link.conn, msg, error=msg.reason)

    def _on_scatter(self, link: ClientLink, msg: m.Scatter) -> None:
        # A key that exists already may be scattered again only if it names
        # its content (the client's "type-digest" keys): otherwise one
        # client could put its value under another client's key.
        for key, value in msg.data.items():
            if self.state.knows(key) and key.rpartition("-")[2] != content_digest(value):
                reply(
                    link.conn, msg,
                    error=f"key {clip(key)} is already in use on this cluster: scatter the value under another key",
                )
                return

        def done(placed: dict[str, tuple[int, list[str]]], failed: list[str]) -> None:
            self._scattered(link, msg, placed, failed)

        # Not tied to the client's connection: values already on workers
        # must be recorded (or freed) even if the client leaves meanwhile.
        self._spawn(exchanges.scatter, self, msg.data, msg.broadcast, done)

    def _scattered(self, link: ClientLink, request: m.Scatter, placed: dict, failed: list[str]) -> None:
        """The end of a scatter, back in the driver: record where data landed."""
        if self.clients.get(link.client_id) is not link:
            # The client left: nobody wants these copies.
            for key, (_, holders) in placed.items():
                for address in holders:
                    if address not in self.state.who_has([key])[key] and address in self.workers:
                        self.workers[address].free([key])
            return
        if placed:
            event = DataScattered(
                self._stimulus("scatter"),
                link.client_id,
                {key: (nbytes, tuple(holders)) for key, (nbytes, holders) in placed.items()},
            )
            self._apply(event)
        if failed:
            reply(link.conn, request, error=f"could not place {len(failed)} keys on any worker: {clip(failed[:5])}")
        else:
            reply(link.conn, request, m.KeysReply(keys=list(placed)))

    def _on_run(self, link: ClientLink, msg: m.RunEverywhere) -> None:
        if msg.workers is not None:
            unknown = [w for w in msg.workers if not self.state.is_registered(w)]
            if unknown:
                reply(link.conn, msg, error=f"no worker at {clip(unknown[0])} (field 'workers')")
                return

        def done(results: dict[str, m.RunOutcome]) -> None:
            reply(link.conn, msg, m.RunEverywhereReply(results=results))

        self._spawn(exchanges.run_everywhere, self, msg.function, done, msg.workers, link=link)

    def _on_run_on_scheduler(self, link: ClientLink, msg: m.RunOnScheduler) -> None:
        """`Client.run_on_scheduler`: call a client's function in this process.

        It runs in a thread of its own, so a slow function does not stall
        the scheduler (design.md §6 rule 6). A function with a
        ``dask_scheduler`` parameter gets this `Scheduler`: it may read it
        (racily: the driver goes on changing the state meanwhile), and must
        not change it: only the driver changes the core. Any client may run
        code here, as it may on the workers: the port is the trust boundary
        (docs/security.md).
        """

        async def run_here() -> None:
            try:
                function = loads(msg.function)
                if wants_keyword(function, "dask_scheduler"):
                    function = functools.partial(function, dask_scheduler=self)
                result = await trio.to_thread.run_sync(function, abandon_on_cancel=True)
                payload = dumps(result)
            except (Exception, SystemExit) as exc:
                failure = failure_to_wire(user_error_from_exception(exc))
                reply(link.conn, msg, m.RunHereReply(failure=failure))
                return
            reply(link.conn, msg, m.RunHereReply(result=payload))

        self._spawn(run_here, link=link)

    def _on_upload_file(self, link: ClientLink, msg: m.UploadFile) -> None:
        """`Client.upload_file`: keep the file for workers that join, and store
        it on every worker now; the reply says which stored it."""
        total = sum(d.nbytes for n, d in self.uploads.items() if n != msg.filename) + msg.data.nbytes
        if msg.filename not in self.uploads and len(self.uploads) >= m.MAX_UPLOADS:
            reply(link.conn, msg, error=f"this cluster already keeps {m.MAX_UPLOADS} uploaded files")
            return
        if total > MAX_UPLOADS_BYTES:
            reply(link.conn, msg, error=f"uploaded files would take {total} bytes, more than {MAX_UPLOADS_BYTES}")
            return
        self.uploads[msg.filename] = msg.data

        def done(results: dict[str, str]) -> None:
            reply(link.conn, msg, m.UploadEverywhereReply(results=results))

        self._spawn(exchanges.upload_everywhere, self, msg.filename, msg.data, done, link=link)

    def _on_replicate(self, link: ClientLink, msg: m.Replicate) -> None:
        keys = tuple(msg.keys)
        foreign = [key for key in keys if not self.state.wants(link.client_id, key)]
        if foreign:
            reply(link.conn, msg, error=f"this client holds no future for {clip(foreign[:3])}: it cannot replicate them")
            return
        self._apply(ReplicationRequested(self._stimulus("replicate"), link.client_id, keys, msg.n))

        def done(settled: tuple[str, ...] | None, error: str | None) -> None:
            if error is not None:
                reply(link.conn, msg, error=error)
            else:
                reply(link.conn, msg, m.WhoHasReply(who_has=self.state.who_has(settled)))

        self._spawn(exchanges.answer_when_replicated, self, keys, msg.n, done, link=link)

    def _on_restart(self, link: ClientLink, msg: m.Restart) -> None:
        """`Client.restart()`: flush every task now; replace the workers next.

        Workers with a nanny are restarted by it; workers without one are
        told to leave (they cannot come back by themselves) and a warning
        says so. `exchanges.restart_workers` replies once as many workers as
        had nannies have registered anew, or with an error after the timeout.
        """
        timeout = msg.timeout or self.config.restart_timeout
        old = list(self.workers.values())
        since = max((w.serial for w in old), default=0)
        for worker in old:
            worker.retiring = True
            worker.task_functions.clear()
            worker.function_users.clear()
            worker.idle_functions.clear()
        self.recorder.restarted(link.client_id)
        self._apply(ClusterRestarted(self._stimulus("restart"), "the cluster was restarted"))
        for client in self.clients.values():
            client.send(m.Restarted())
        for worker in old:
            if not worker.nanny:
                logger.warning(
                    "worker %s has no nanny: it was told to leave and will not come back", worker.address
                )
                worker.send(m.Close(reason="the cluster is restarting and this worker has no nanny"))

        def done(n_workers: int | None, error: str | None) -> None:
            if error is not None:
                reply(link.conn, msg, error=error)
            else:
                reply(link.conn, msg, m.RestartReply(n_workers=n_workers))

        nannies = [w.nanny for w in old if w.nanny]
        # Not tied to the client's connection: the restart goes on without it.
        self._spawn(exchanges.restart_workers, self, nannies, since, timeout, done)

    def _spawn(self, async_fn: Callable, *args: Any, link: _Link | None = None) -> None:
        """Run an exchange: in `link`'s nursery (it ends with the link) or the scheduler's.

        An exchange that raises is a bug; it is logged, and only that
        exchange ends.
        """

        async def guarded() -> None:
            try:
                await async_fn(*args)
            except Exception:
                logger.exception("internal error in the scheduler's exchange %s", async_fn.__name__)

        if link is None:
            assert self._nursery is not None
            self._nursery.start_soon(guarded)
        elif link.exchanges is not None:
            link.exchanges.start_soon(guarded)
        # else: the link is gone, and nobody waits for the answer.

    # ------------------------------------------- what exchanges may ask --

    def live_workers(self) -> list[str]:
        return self.state.worker_addresses()

    def registrations_since(self, serial: int) -> int:
        return sum(link.serial > serial for link in self.workers.values() if self.state.is_registered(link.address))

    def scatter_targets(self, keys: list[str], broadcast: bool) -> dict[str, tuple[str, ...]]:
        return self.state.scatter_targets(keys, broadcast)

    def copies(self, keys: tuple[str, ...]) -> dict[str, int | None]:
        return self.state.copies(keys)

    async def ask_worker(self, address: str, message: m.Message) -> Any:
        link = self.workers.get(address)
        if link is None:
            raise CommClosedError(f"worker {address} is gone")
        return await link.requests.call(message)

    async def ask_nanny(self, address: str, message: m.Message) -> Any:
        assert self._pool is not None
        return await self._pool.call(address, message)

    def post(self, handler: Callable[..., None], *args: Any) -> None:
        self._post(handler, *args)


def _weight(message: m.Message) -> int:
    """The driver's work for `message`: one, plus one per task or key it names."""
    kind = type(message)
    if kind is m.Submit:
        return 1 + len(message.tasks)
    if kind is m.ReleaseKeys or kind is m.CancelKeys or kind is m.DataDropped:
        return 1 + len(message.keys)
    return 1


def _slices(messages: list[m.Message]) -> list[list[m.Message]]:
    """`messages` cut into slices of at most `DRIVER_SLICE` messages and
    `DRIVER_SLICE_WEIGHT` work (a heavier message goes alone)."""
    slices: list[list[m.Message]] = []
    current: list[m.Message] = []
    weight = 0
    for message in messages:
        w = _weight(message)
        if current and (len(current) >= DRIVER_SLICE or weight + w > DRIVER_SLICE_WEIGHT):
            slices.append(current)
            current, weight = [], 0
        current.append(message)
        weight += w
    if current:
        slices.append(current)
    return slices


def _find_cycle(tasks: dict[str, m.TaskWire]) -> list[str] | None:
    """A cycle among the dependencies of `tasks` (only edges between them), or None.

    Depth-first, iterative (a chain of a million tasks must not overflow the
    stack), in the order the tasks came.
    """
    DONE, ACTIVE = 1, 2
    mark: dict[str, int] = {}
    for root in tasks:
        if root in mark:
            continue
        mark[root] = ACTIVE
        path = [root]
        stack = [iter(tasks[root].dependencies)]
        while stack:
            for dep in stack[-1]:
                if dep not in tasks:
                    continue
                seen = mark.get(dep)
                if seen == ACTIVE:
                    return path[path.index(dep) :] + [dep]
                if seen is None:
                    mark[dep] = ACTIVE
                    path.append(dep)
                    stack.append(iter(tasks[dep].dependencies))
                    break
            else:
                mark[path.pop()] = DONE
                stack.pop()
    return None
