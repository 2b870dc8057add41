"""The scheduler process: a Trio shell around `trioflow.core.SchedulerState`.

What this file does, and nothing more:

* accepts connections (`Network.serve`), reads the hello, and runs one
  reader task per connection;
* keeps each worker alive with a `trio.CancelScope` whose deadline every
  message from the worker pushes `worker_ttl` seconds ahead; when the
  deadline passes, the reader is cancelled and the worker is declared gone
  through the same path as a closed connection (design.md §1, "worker
  hangs");
* turns messages into core events and core messages into wire messages.

One driver task (`_drive`) owns the core. Readers hand it what they receive
through a memory channel, so the core is never touched from two places and
needs no lock; exchanges that must wait on other peers (`scatter` puts data
on workers, `run` calls every worker) run as their own tasks and come back
to the driver through the same channel.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from typing import Any

import trio

from trioflow import scheduler_exchanges as exchanges
from trioflow.comm import (
    Connection,
    ConnectionPool,
    FrameLimits,
    Network,
    Requests,
    TCPNetwork,
    expect_hello,
    open_connection,
    open_connection_pool,
    reply,
)
from trioflow.comm.serialize import Serialized
from trioflow.config import Config
from trioflow.core import SchedulerState
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
    KeysReleased,
    OrphansExpired,
    RecoveryEnded,
    ReplicaAdded,
    ReplicaMissing,
    ReplicationRequested,
    ReportErred,
    ReportFinished,
    ReportLost,
    SchedulerEvent,
    SchedulerMessage,
    TaskErred,
    TaskFinished,
    TaskSpec,
    TasksSubmitted,
    TaskStarted,
    WorkerConnected,
    WorkerDisconnected,
)
from trioflow.errors import CommClosedError, ProtocolError
from trioflow.protocol import (
    RunSpec,
    failure_to_wire,
    field,
    str_list,
    str_map,
    user_error_from_wire,
)

logger = logging.getLogger("trioflow.scheduler")

# Most messages of one batch the driver handles before yielding to other tasks.
DRIVER_SLICE = 64


class _Link:
    """One accepted connection and the reader task serving it."""

    def __init__(self, conn: Connection, name: str):
        self.conn = conn
        self.name = name
        self.requests = Requests(conn)
        # Cancelling this ends the reader (and so the connection).
        self.scope = trio.CancelScope()
        self.close_reason: str | None = None
        # Set once the driver has sent the welcome (nothing may precede it).
        self.welcomed = False

    def send(self, message: dict[str, Any]) -> None:
        """Queue `message`; a closed link is ignored (its departure is on its way)."""
        try:
            self.conn.send(message)
        except CommClosedError:
            pass

    def close(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        self.scope.cancel()


class WorkerLink(_Link):
    def __init__(
        self, conn: Connection, address: str, nthreads: int, pid: int | None, nanny: str | None
    ):
        super().__init__(conn, address)
        self.address = address
        self.nthreads = nthreads
        # The worker's process id, for operators (and tests that kill it).
        self.pid = pid
        # The control address of its nanny (None: no nanny, no restarts).
        self.nanny = nanny
        # Function ids this worker has been sent (it caches them per connection).
        self.functions_sent: set[str] = set()
        self.last_heartbeat: dict[str, Any] = {}
        # True when the scheduler itself asked it to leave (not a failure).
        self.retiring = False


class ClientLink(_Link):
    def __init__(self, conn: Connection, client_id: str):
        super().__init__(conn, client_id)
        self.client_id = client_id
        # A reconnecting client's messages wait here until this time (the
        # recovery grace); -inf when they are handled at once.
        self.held_until = -math.inf
        self.backlog: list[dict] = []


class Scheduler:
    """Serve a trioflow scheduler.

    Args:
        host: interface to bind; loopback unless told otherwise, because
            anyone who can reach the port can run code on the workers.
        port: TCP port, 0 for any free one.
        config: tunables; defaults plus ``TRIOFLOW_*`` variables if omitted.
        network: how to accept connections (the simulator passes its own).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        config: Config | None = None,
        network: Network | None = None,
    ):
        self.config = config or Config.from_env()
        self.network = network or TCPNetwork()
        self.host = host
        self.port = port
        self.limits = FrameLimits.from_config(self.config)
        self.state = SchedulerState(
            allowed_failures=self.config.allowed_failures,
            worker_saturation=self.config.worker_saturation,
        )
        self.address: str | None = None
        self.workers: dict[str, WorkerLink] = {}
        self.clients: dict[str, ClientLink] = {}
        # function_id -> pickled function, shared by every task that uses it.
        self.functions: dict[str, bytes] = {}
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[Callable, tuple]](math.inf)
        self._stimulus_ids = itertools.count()
        self._membership_changed = trio.Event()
        # Set after every state change for tasks waiting on a condition
        # (replication, restarts); None while nobody waits.
        self._state_changed: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._pool: ConnectionPool | None = None
        self._started_at = -math.inf
        # Set `recovery_grace` after the start: from then on a reconnecting
        # client's lineage is handled at once.
        self._recovery_over = False
        # free_keys messages held back per worker until `_apply` ends.
        self._frees: dict[str, list[str]] = {}
        # Small results that came with the task_finished being applied.
        self._inline_values: dict[str, Serialized] = {}
        self._worker_ops: dict[str, Callable[[WorkerLink, dict], SchedulerEvent | None]] = {
            "task_started": self._worker_task_started,
            "task_finished": self._worker_task_finished,
            "task_erred": self._worker_task_erred,
            "replica_added": self._worker_replica_added,
            "replica_missing": self._worker_replica_missing,
            "goodbye": self._worker_goodbye,
            # Heartbeats are answered by the reader; this is for one that came
            # with the hello, answered by the driver after the welcome.
            "heartbeat": self._worker_heartbeat,
            "data_dropped": self._worker_data_dropped,
        }
        self._client_ops: dict[str, Callable[[ClientLink, dict], None]] = {
            "submit": self._client_submit,
            "release_keys": self._client_release_keys,
            "cancel_keys": self._client_cancel_keys,
            "missing_data": self._client_missing_data,
            "scatter": self._client_scatter,
            "run": self._client_run,
            "who_has": self._client_who_has,
            "has_what": self._client_has_what,
            "nthreads": self._client_nthreads,
            "scheduler_info": self._client_scheduler_info,
            "wait_for_workers": self._client_wait_for_workers,
            "replicate": self._client_replicate,
            "restart": self._client_restart,
        }

    # -------------------------------------------------------------- serve --

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept workers and clients until cancelled.

        Reports the bound address through `task_status`. Shutdown is a
        cancellation: every connection closes; workers keep their data and
        running tasks and clients keep their futures (what they do next is
        theirs to decide).
        """
        async with open_connection_pool(
            self.network, self.limits, role="control", connect_timeout=self.config.connect_timeout
        ) as self._pool, trio.open_nursery() as nursery:
            self._nursery = nursery
            self._started_at = trio.current_time()
            nursery.start_soon(self._drive)
            nursery.start_soon(self._close_recovery_window)
            self.address = await nursery.start(
                self.network.serve, self._serve_stream, self.host, self.port
            )
            logger.info("trioflow scheduler listening at %s", self.address)
            task_status.started(self.address)

    async def wait_for_workers(self, n: int) -> None:
        """Return once at least `n` workers are registered."""
        while len(self.state.workers) < n:
            await self._membership_changed.wait()

    async def _wait_for_state(self, condition: Callable[[], bool]) -> None:
        """Return once `condition()` holds, re-checking after each state change."""
        while not condition():
            if self._state_changed is None:
                self._state_changed = trio.Event()
            await self._state_changed.wait()

    # ------------------------------------------------------------ readers --

    async def _serve_stream(self, stream: trio.abc.Stream) -> None:
        async with open_connection(stream, self.limits, peer="new connection") as conn:
            try:
                hello, first = await expect_hello(
                    conn, self.config.connect_timeout, frozenset({"worker", "client"})
                )
                if hello["role"] == "worker":
                    link: _Link = WorkerLink(
                        conn,
                        field(hello, "address", str),
                        field(hello, "nthreads", int),
                        field(hello, "pid", (int, type(None)), None),
                        field(hello, "nanny", (str, type(None)), None),
                    )
                    if link.nthreads < 1:
                        raise ProtocolError("a worker needs at least one thread")
                    held = str_map(hello, "held", int)
                    running = tuple(str_list(hello, "running")) if "running" in hello else ()
                else:
                    link = ClientLink(conn, field(hello, "client_id", str))
                    held, running = {}, ()
                    if field(hello, "recovering", bool, False) and not self._recovery_over:
                        # Lineage from before a scheduler restart: hold it back
                        # until surviving workers have had time to re-register.
                        link.held_until = self._started_at + self.config.recovery_grace
            except (ProtocolError, CommClosedError) as exc:
                logger.warning("closing connection before hello completed: %s", exc)
                return
            conn.peer = link.name
            self._post(self._joined, link, held, running, first)
            reason = await self._read(link)
            self._post(self._left, link, reason)

    async def _read(self, link: _Link) -> str:
        """Feed the driver until the connection ends; return why it ended."""
        ttl = self.config.worker_ttl
        is_worker = isinstance(link, WorkerLink)
        try:
            with link.scope:
                # spec: the liveness deadline. Any message from a worker is a
                # sign of life and pushes it forward; silence past worker_ttl
                # cancels this scope, which is how a hung worker is declared dead.
                with trio.CancelScope(deadline=trio.current_time() + ttl if is_worker else math.inf) as alive:
                    while True:
                        batch = await link.conn.receive()
                        if is_worker:
                            alive.deadline = trio.current_time() + ttl
                        rest = [m for m in batch if not self._answered_by_reader(link, m)]
                        # In slices, so the driver yields between them and one
                        # huge batch cannot starve other connections (whose
                        # heartbeats would then look late).
                        for start in range(0, len(rest), DRIVER_SLICE):
                            self._post(self._received, link, rest[start : start + DRIVER_SLICE])
                if alive.cancelled_caught:
                    return f"no message for {ttl:g} s (worker_ttl)"
            return link.close_reason or "closed by the scheduler"
        except CommClosedError:
            return "connection closed"
        except ProtocolError as exc:
            logger.warning("closing connection from %s: %s", link.name, exc)
            return f"protocol error: {exc}"
        finally:
            link.requests.fail_all(f"{link.name} disconnected")

    def _answered_by_reader(self, link: _Link, message: dict) -> bool:
        """Handle replies and heartbeats right here, not in the driver.

        A heartbeat is answered by the reader so that a busy driver (a long
        queue of work in its inbox) never makes a healthy scheduler look
        silent to its workers.
        """
        if link.requests.deliver(message):
            return True
        if message["op"] == "heartbeat" and isinstance(link, WorkerLink) and link.welcomed:
            metrics = message.get("metrics")
            if isinstance(metrics, dict):
                link.last_heartbeat = metrics
            link.send({"op": "heartbeat_ack"})
            return True
        return False

    def _post(self, handler: Callable, *args: Any) -> None:
        self._inbox_send.send_nowait((handler, args))

    # ------------------------------------------------------------- driver --

    async def _drive(self) -> None:
        """The one task that touches `self.state`."""
        async for handler, args in self._inbox:
            try:
                handler(*args)
            except Exception:
                # A bug, not bad input (that raises ProtocolError and closes
                # one connection). Keep serving everyone else, loudly.
                logger.exception("internal error in the scheduler while running %s", handler.__name__)

    def _stimulus(self, what: str) -> str:
        return f"{what}-{next(self._stimulus_ids)}"

    def _apply(self, event: SchedulerEvent) -> None:
        try:
            for message in self.state.handle(event):
                self._dispatch(message)
        finally:
            self._inline_values.clear()
        self._flush_frees()
        if self._state_changed is not None:
            self._state_changed.set()
            self._state_changed = None

    def _joined(self, link: _Link, held: dict[str, int], running: tuple[str, ...], first: list[dict]) -> None:
        # The welcome goes first: registering may already assign work.
        link.send({"op": "welcome", "address": self.address})
        link.welcomed = True
        if isinstance(link, WorkerLink):
            old = self.workers.get(link.address)
            if old is not None:
                old.close("replaced by a new connection from the same address")
            self.workers[link.address] = link
            self._apply(
                WorkerConnected(self._stimulus("worker-joined"), link.address, link.nthreads, held, running)
            )
            orphans = tuple(k for k in (*held, *running) if k in self.state.orphans)
            if orphans:
                logger.info(
                    "worker %s re-registered %d values or runs nobody has claimed yet", link.address, len(orphans)
                )
                self._spawn(self._expire_orphans, orphans)
            logger.info("worker %s joined (%d threads)", link.address, link.nthreads)
            self._membership_changed.set()
            self._membership_changed = trio.Event()
        else:
            assert isinstance(link, ClientLink)
            old = self.clients.get(link.client_id)
            if old is not None:
                old.close("replaced by a new connection with the same client id")
            self.clients[link.client_id] = link
            self._apply(ClientConnected(self._stimulus("client-joined"), link.client_id))
        if first:
            self._received(link, first)

    def _left(self, link: _Link, reason: str) -> None:
        if isinstance(link, WorkerLink):
            if self.workers.get(link.address) is not link:
                return
            del self.workers[link.address]
            if link.retiring:
                logger.info("worker %s left on purpose", link.address)
            else:
                logger.warning("worker %s left: %s", link.address, reason)
            self._apply(
                WorkerDisconnected(self._stimulus("worker-left"), link.address, expected=link.retiring)
            )
            self._membership_changed.set()
            self._membership_changed = trio.Event()
        else:
            assert isinstance(link, ClientLink)
            if self.clients.get(link.client_id) is not link:
                return
            del self.clients[link.client_id]
            self._apply(ClientDisconnected(self._stimulus("client-left"), link.client_id))

    async def _expire_orphans(self, keys: tuple[str, ...]) -> None:
        await trio.sleep(self.config.orphan_timeout)
        self._post(self._apply, OrphansExpired(self._stimulus("orphans-expired"), keys))

    async def _close_recovery_window(self) -> None:
        await trio.sleep_until(self._started_at + self.config.recovery_grace)
        self._post(self._end_recovery)

    def _end_recovery(self) -> None:
        """Every client that reconnected within `recovery_grace` resubmits
        now, all in one go (so that a value one client's lineage brings back
        is still there when another client that holds it resubmits); then the
        core judges which of the values workers brought back are needed."""
        self._recovery_over = True
        for link in list(self.clients.values()):
            if link.held_until > -math.inf:
                self._flush_held_client(link)
        self._apply(RecoveryEnded(self._stimulus("recovery-ended")))

    def _flush_held_client(self, link: ClientLink) -> None:
        link.held_until = -math.inf
        backlog, link.backlog = link.backlog, []
        if backlog:
            self._received(link, backlog)

    def _received(self, link: _Link, messages: list[dict]) -> None:
        if link.scope.cancel_called:
            return  # being closed: ignore whatever else it sent
        if isinstance(link, ClientLink) and link.held_until > -math.inf:
            link.backlog.extend(messages)
            return
        try:
            if isinstance(link, WorkerLink):
                for message in messages:
                    handler = self._worker_ops.get(message["op"])
                    if handler is None:
                        raise ProtocolError(f"unknown op {message['op']!r} from a worker")
                    event = handler(link, message)
                    if event is not None:
                        self._apply(event)
            else:
                assert isinstance(link, ClientLink)
                for message in messages:
                    handler = self._client_ops.get(message["op"])
                    if handler is None:
                        raise ProtocolError(f"unknown op {message['op']!r} from a client")
                    handler(link, message)
        except ProtocolError as exc:
            logger.warning("closing connection from %s: %s", link.name, exc)
            link.close(f"protocol error: {exc}")

    # ------------------------------------------------ core -> wire messages --

    def _flush_frees(self, address: str | None = None) -> None:
        """Send the `free_keys` held back for one worker (or for all)."""
        addresses = list(self._frees) if address is None else [address]
        for address in addresses:
            keys = self._frees.pop(address, None)
            worker = self.workers.get(address)
            if keys and worker is not None:
                worker.send({"op": "free_keys", "keys": keys})

    def _dispatch(self, message: SchedulerMessage) -> None:
        if isinstance(message, FreeKeys):
            # Releasing many keys frees them one by one; they travel as one
            # message per worker. Anything else for that worker flushes them
            # first, so its order of messages is kept.
            self._frees.setdefault(message.worker, []).extend(message.keys)
            return
        worker_address = getattr(message, "worker", None)
        if worker_address in self._frees:
            self._flush_frees(worker_address)
        if isinstance(message, ComputeTask):
            worker = self.workers.get(message.worker)
            if worker is None:
                return
            spec: RunSpec = message.run_spec
            wire: dict[str, Any] = {
                "op": "compute_task",
                "key": message.key,
                "function_id": spec.function_id,
                "args": spec.args,
                "priority": message.priority,
                "who_has": message.who_has,
                "nbytes": message.nbytes,
            }
            if spec.function_id not in worker.functions_sent:
                worker.functions_sent.add(spec.function_id)
                wire["function"] = spec.function
            worker.send(wire)
        elif isinstance(message, AcquireReplicas):
            worker = self.workers.get(message.worker)
            if worker is not None:
                worker.send({"op": "acquire_replicas", "who_has": message.who_has, "nbytes": message.nbytes})
        elif isinstance(message, ReportFinished):
            report = {"op": "key_finished", "key": message.key, "who_has": message.who_has}
            if message.with_value:
                report["value"] = self._inline_values[message.key]
            self._to_client(message.client, report)
        elif isinstance(message, ReportErred):
            self._to_client(
                message.client,
                {
                    "op": "key_erred",
                    "key": message.key,
                    "origin": message.origin,
                    "failure": failure_to_wire(message.failure),
                },
            )
        elif isinstance(message, ReportLost):
            self._to_client(message.client, {"op": "key_lost", "key": message.key})
        else:  # pragma: no cover - a new message type without a case here
            raise TypeError(f"no dispatch for {message!r}")

    def _to_client(self, client_id: str, message: dict[str, Any]) -> None:
        link = self.clients.get(client_id)
        if link is not None:
            link.send(message)

    # ------------------------------------------------------- worker ops --

    def _worker_task_started(self, link: WorkerLink, m: dict) -> SchedulerEvent:
        return TaskStarted(self._stimulus("task-started"), link.address, field(m, "key", str))

    def _worker_task_finished(self, link: WorkerLink, m: dict) -> SchedulerEvent:
        key = field(m, "key", str)
        value = field(m, "value", Serialized, None)
        if value is not None:
            # Passed on to clients told of this key during this event only
            # (the core says which: `ReportFinished.with_value`); the
            # scheduler keeps no values.
            self._inline_values[key] = value
        return TaskFinished(
            self._stimulus("task-finished"), link.address, key, field(m, "nbytes", int), inline=value is not None
        )

    def _worker_task_erred(self, link: WorkerLink, m: dict) -> SchedulerEvent:
        failure = user_error_from_wire(field(m, "failure", dict))
        return TaskErred(self._stimulus("task-erred"), link.address, field(m, "key", str), failure)

    def _worker_replica_added(self, link: WorkerLink, m: dict) -> SchedulerEvent:
        return ReplicaAdded(
            self._stimulus("replica-added"), link.address, field(m, "key", str), field(m, "nbytes", int)
        )

    def _worker_replica_missing(self, link: WorkerLink, m: dict) -> SchedulerEvent:
        return ReplicaMissing(
            self._stimulus("replica-missing"),
            link.address,
            field(m, "key", str),
            tuple(str_list(m, "holders")),
            field(m, "dependent", (str, type(None)), None),
        )

    def _worker_data_dropped(self, link: WorkerLink, m: dict) -> SchedulerEvent:
        return DataDropped(self._stimulus("data-dropped"), link.address, tuple(str_list(m, "keys")))

    def _worker_heartbeat(self, link: WorkerLink, m: dict) -> None:
        self._answered_by_reader(link, m)
        return None

    def _worker_goodbye(self, link: WorkerLink, m: dict) -> None:
        link.retiring = True
        return None

    # ------------------------------------------------------- client ops --

    def _client_submit(self, link: ClientLink, m: dict) -> None:
        for function_id, payload in str_map(m, "functions", bytes).items():
            self.functions.setdefault(function_id, payload)
        specs = []
        for task in field(m, "tasks", list):
            if not isinstance(task, dict):
                raise ProtocolError("'submit' message: each task must be a map")
            key = field(task, "key", str)
            if field(task, "scattered", bool, False):
                # Data without lineage, re-registered by a reconnecting client.
                specs.append(TaskSpec(key, None))
                continue
            function_id = field(task, "function_id", str)
            function = self.functions.get(function_id)
            if function is None:
                raise ProtocolError(f"'submit' names unknown function id {function_id!r}")
            args = field(task, "args", Serialized)
            workers = task.get("workers")
            if workers is not None:
                workers = tuple(str_list(task, "workers"))
            specs.append(
                TaskSpec(
                    key,
                    RunSpec(function_id, function, args),
                    tuple(str_list(task, "dependencies")),
                    field(task, "retries", int, 0),
                    workers,
                )
            )
        wanted = tuple(str_list(m, "wanted"))
        self._apply(TasksSubmitted(self._stimulus("submit"), link.client_id, tuple(specs), wanted))

    def _client_release_keys(self, link: ClientLink, m: dict) -> None:
        keys = tuple(str_list(m, "keys"))
        self._apply(KeysReleased(self._stimulus("release"), link.client_id, keys))

    def _client_cancel_keys(self, link: ClientLink, m: dict) -> None:
        keys = tuple(str_list(m, "keys"))
        reason = field(m, "reason", str, "cancelled by the client")
        self._apply(KeysCancelled(self._stimulus("cancel"), link.client_id, keys, reason))

    def _client_missing_data(self, link: ClientLink, m: dict) -> None:
        event = ReplicaMissing(
            self._stimulus("client-missing"),
            f"client:{link.client_id}",
            field(m, "key", str),
            tuple(str_list(m, "holders")),
        )
        self._apply(event)

    def _client_who_has(self, link: ClientLink, m: dict) -> None:
        keys = str_list(m, "keys") if m.get("keys") is not None else None
        reply(link.conn, m, who_has=self.state.who_has(keys))

    def _client_has_what(self, link: ClientLink, m: dict) -> None:
        reply(link.conn, m, has_what=self.state.has_what())

    def _client_nthreads(self, link: ClientLink, m: dict) -> None:
        reply(link.conn, m, nthreads=self.state.nthreads())

    def _client_scheduler_info(self, link: ClientLink, m: dict) -> None:
        workers = {
            address: {
                "nthreads": ws.nthreads,
                "processing": len(ws.processing),
                "keys": len(ws.has_what),
                "pid": self.workers[address].pid if address in self.workers else None,
                "metrics": self.workers[address].last_heartbeat if address in self.workers else {},
            }
            for address, ws in self.state.workers.items()
        }
        reply(
            link.conn,
            m,
            info={
                "address": self.address,
                "workers": workers,
                "tasks": self.state.count_by_state(),
                "clients": len(self.clients),
            },
        )

    def _client_wait_for_workers(self, link: ClientLink, m: dict) -> None:
        n = field(m, "n", int)

        async def wait() -> None:
            await self.wait_for_workers(n)
            reply(link.conn, m, n=len(self.state.workers))

        self._spawn(wait)

    def _client_scatter(self, link: ClientLink, m: dict) -> None:
        data = str_map(m, "data", Serialized)
        broadcast = field(m, "broadcast", bool, False)
        self._spawn(exchanges.scatter, self, link, m, data, broadcast)

    def _scattered(self, link: ClientLink, request: dict, placed: dict, failed: list[str]) -> None:
        """The end of a scatter, back in the driver: record where data landed."""
        if placed:
            event = DataScattered(
                self._stimulus("scatter"),
                link.client_id,
                {key: (nbytes, tuple(holders)) for key, (nbytes, holders) in placed.items()},
            )
            self._apply(event)
        if failed:
            reply(link.conn, request, error=f"could not place {len(failed)} keys on any worker: {failed[:5]}")
        else:
            reply(link.conn, request, keys=list(placed))

    def _client_run(self, link: ClientLink, m: dict) -> None:
        function = field(m, "function", Serialized)
        self._spawn(exchanges.run_everywhere, self, link, m, function)

    def _client_replicate(self, link: ClientLink, m: dict) -> None:
        keys = tuple(str_list(m, "keys"))
        n = field(m, "n", int)
        if n < 1:
            raise ProtocolError(f"'replicate' needs n >= 1, got {n}")
        self._apply(ReplicationRequested(self._stimulus("replicate"), link.client_id, keys, n))
        self._spawn(exchanges.answer_when_replicated, self, link, m, keys, n)

    def _client_restart(self, link: ClientLink, m: dict) -> None:
        """`Client.restart()`: flush every task now; replace the workers next.

        Workers with a nanny are restarted by it; workers without one are
        told to leave (they cannot come back by themselves) and a warning
        says so. `exchanges.restart_workers` replies once as many workers as
        had nannies have registered anew, or with an error after the timeout.
        """
        timeout = float(field(m, "timeout", (int, float, type(None)), None) or self.config.restart_timeout)
        old = dict(self.workers)
        for worker in old.values():
            worker.retiring = True
        self._apply(ClusterRestarted(self._stimulus("restart"), "the cluster was restarted"))
        for client in self.clients.values():
            client.send({"op": "restarted"})
        for worker in old.values():
            if not worker.nanny:
                logger.warning(
                    "worker %s has no nanny: it was told to leave and will not come back", worker.address
                )
                worker.send({"op": "close", "reason": "the cluster is restarting and this worker has no nanny"})
        self._spawn(exchanges.restart_workers, self, link, m, old, timeout)

    def _spawn(self, async_fn: Callable, *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(async_fn, *args)
