"""`AsyncClient`: submit Python functions to a trioflow cluster, from Trio.

This module is the client's shell: it owns the scheduler connection, keeps
it up (reconnecting with backoff, resubmitting after a scheduler restart),
turns the scheduler's reports into events for the client's core and carries
out what the core answers. The other jobs live next door:

* `trioflow.core.client_state` -- the core: futures, their handle counts,
  their lineage, report handling, the tasks kept while the scheduler is
  away (pure; events in, outputs out);
* `trioflow.packing` -- calls turned into named, pickled tasks;
* `trioflow.fetching` -- values fetched from the workers that hold them;
* `trioflow.cluster_requests` -- questions and orders about the cluster
  (run a function everywhere, upload a file, the task stream...);
* `trioflow.sync_client` -- the blocking `Client`, which runs one of these
  in a background Trio thread through its portal.

The path of a task, as seen from here:

1. `submit` packs the call (`packing.pack`): the function pickled once
   (cached), the arguments once, every `Future` in them swapped for a
   `TaskRef`; those keys are the task's dependencies. The key is a digest
   of function and arguments (``pure=True``), so the same call gives the
   same key.
2. The core counts the new handle and keeps the task in the lineage
   (`HandlesMade`, `CallsSubmitted`); it answers `SendTasks`, and the task
   goes to the scheduler in a ``submit`` message. The future is pending.
3. The scheduler reports ``key_finished`` (with the workers holding the
   value), ``key_erred`` (with a failure record) or ``key_lost`` (being
   recomputed). The reader task hands each to the core, which updates the
   `FutureRecord` and answers `FutureDone`: the shell wakes the waiters.
4. `result` waits for that, then the `Fetcher` gets the value straight
   from a worker that holds it (``get_data``); never through the scheduler.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import random
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from typing import Any

import trio

import trioflow.cluster_requests as cluster_requests
from trioflow.backoff import Backoff
from trioflow.comm import (
    Connection,
    FrameLimits,
    HandshakeRefused,
    Network,
    RequestFailed,
    Requests,
    TCPNetwork,
    await_welcome,
    clip,
    dumps,
    open_connection,
    open_connection_pool,
    say_hello,
)
from trioflow.comm import messages as m
from trioflow.comm.auth import CLIENT, Credentials, connect_authenticated, credentials_for
from trioflow.comm.connection import writing_through
from trioflow.comm.frames import max_value_bytes, too_big
from trioflow.comm.security import Security
from trioflow.comm.serialize import Serialized, SerializedFunction, content_digest
from trioflow.config import Config
from trioflow.core import client_events as ce
from trioflow.core import client_state as cs
from trioflow.core.client_state import FINISHED, ClientState, ClientStatus, FutureRecord
from trioflow.errors import AuthenticationError, CommClosedError, ProtocolError
from trioflow.fetching import Fetcher
from trioflow.future import (
    Future,
    ValueReport,
    call_when_done,
    exception_of,
    forget_when_done,
    not_done_within,
    wait_done,
    wake,
)
from trioflow.graph import (
    compute_plan,
    flatten_keys,
    graph_plan,
    persist_plan,
    shape_like,
)
from trioflow.lineage import keep, resubmission
from trioflow.nurseries import background_tasks
from trioflow.packing import (
    byte_slices,
    future_keys,
    graph_options,
    is_future,
    map_calls,
    pack,
    plan_tasks,
    submit_messages,
)
from trioflow.protocol import (
    clip_text,
    failure_from_wire,
    replace_futures,
    substitute,
)
from trioflow.task_options import TaskOptions, task_options

logger = logging.getLogger("trioflow.client")

# Tasks a client keeps for a scheduler that is away before submit() refuses
# more (read when a client is made: the core enforces it).
MAX_QUEUED_WHILE_AWAY = cs.MAX_QUEUED_WHILE_AWAY
# Keys per `release_keys`, `cancel_keys`, `fire_and_forget` and `who_has`
# message: a message body must stay within `max_body_bytes`.
KEYS_SLICE = m.MAX_KEYS
# Values per `scatter` request (each value is one frame or more).
SCATTER_SLICE = 1_000
# Keys a step of `_flush_releases` forgets before it yields the loop.
RELEASE_SLICE = 10_000
# Futures `cancel` fails between two yields.
CANCEL_SLICE = 10_000

# A task as `_pack` makes it: its wire form and the function it calls.
Packed = tuple[m.TaskWire, SerializedFunction]


def unpacked(packed: list[Packed]) -> tuple[list[m.TaskWire], dict[str, Serialized]]:
    """Packed tasks as `_submit_tasks` takes them: the tasks, and the
    payload of each function they call by its id."""
    return [task for task, _ in packed], {used.function_id: used.payload for _, used in packed}


class InLoopPortal:
    """How `AsyncClient` is called: from its own Trio loop, so a method's
    coroutine is returned to be awaited and a plain call runs now. (The
    blocking `Client` replaces it with a portal from another thread:
    `trioflow.sync_client.BlockingPortal`.)"""

    blocking = False

    def call(self, async_fn: Callable[..., Any], *args: Any) -> Any:
        return async_fn(*args)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)

    def result(self, client: AsyncClient, future: Future, timeout: float | None) -> Any:
        return client._result(future, timeout)


class AsyncClient:
    """A Trio-native client of a trioflow scheduler.

    Use it as an async context manager::

        async with trioflow.AsyncClient("tcp://127.0.0.1:8786") as client:
            future = client.submit(inc, 1)
            assert await future == 2

    Args:
        address: the scheduler's ``tcp://host:port`` (or ``tls://``), or an
            object with a ``scheduler_address`` attribute (a cluster; its
            ``credentials`` are used, as a client's).
        config: tunables; defaults plus ``TRIOFLOW_*`` variables if omitted.
        network: how to connect (the simulator passes its own).
        rng: source of the random parts of keys and ids (seeded in the
            simulator; design.md §3 rule 5).
        credentials: what this client proves (by default the cluster's, as
            a client, or found: ``TRIOFLOW_TOKEN``, the token files).
    """

    asynchronous = True  # what dask asks of a client given as scheduler=

    def __init__(
        self,
        address: Any,
        *,
        config: Config | None = None,
        network: Network | None = None,
        rng: random.Random | None = None,
        credentials: Credentials | None = None,
    ):
        if credentials is None and getattr(address, "credentials", None) is not None:
            # A cluster of this process: act as its client, no more.
            credentials = address.credentials.client_only()
        if config is None and isinstance(getattr(address, "config", None), Config):
            config = address.config  # (its TLS files, its timeouts)
        address = getattr(address, "scheduler_address", address)
        if not isinstance(address, str):
            raise TypeError(f"expected a scheduler address like 'tcp://127.0.0.1:8786', got {address!r}")
        self.scheduler_address = address
        self.config = config or Config.from_env()
        self.network = network or TCPNetwork(Security.from_config(self.config), self.config.handshake_timeout)
        self.credentials = (
            credentials if credentials is not None else credentials_for(self.config, "a client", cluster=False)
        )
        self._rng = rng or random.Random()
        self.id = f"client-{self._random_hex()}"
        self.limits = FrameLimits.from_config(self.config)
        # Every decision about futures is the core's; this shell only reads it.
        self.core = ClientState(MAX_QUEUED_WHILE_AWAY)
        self._stimulus_ids = itertools.count()
        self._conn: Connection | None = None
        self._requests: Requests | None = None
        self._pool = None
        self._fetcher = Fetcher(self, retry_pause_s=self.config.heartbeat_interval)
        self._closed = trio.Event()
        self._finished = trio.Event()
        # Set while a scheduler connection is up (replaced when it drops).
        self._connected = trio.Event()
        self._registered = False
        self._reader_scope: trio.CancelScope | None = None
        # Replicate requests the core wants made again of a new scheduler.
        self._replicas_to_ask: list[ce.RequestReplicas] = []
        self._stack: AsyncExitStack | None = None
        # How this client is called (replaced by the blocking `Client`).
        self._portal: Any = InLoopPortal()
        self._token: trio.lowlevel.TrioToken | None = None
        # Keys whose handles were collected, from any thread; drained in ours.
        self._released: collections.deque[str] = collections.deque()
        self._release_lock = threading.Lock()
        self._release_scheduled = False
        # Tasks a blocking client's caller submitted, with the handles it
        # was given, not yet taken in here (`_submit_from_thread`).
        self._submissions: collections.deque[tuple[list[Packed], list[Future]]] = collections.deque()
        self._submission_scheduled = False

    def _random_hex(self) -> str:
        return uuid.UUID(int=self._rng.getrandbits(128), version=4).hex

    @property
    def status(self) -> str:
        """'new', 'running', 'reconnecting', 'closing' or 'closed'."""
        return self.core.status.value

    @property
    def futures(self) -> dict[str, FutureRecord]:
        """The core's record of every key this client holds a handle for."""
        return self.core.futures

    # ------------------------------------------------------------ lifetime --

    async def __aenter__(self) -> AsyncClient:
        self._stack = AsyncExitStack()
        nursery = await self._stack.enter_async_context(background_tasks())
        try:
            await nursery.start(self._run)
        except BaseException:
            # Close the nursery we opened before the error leaves: an
            # ``async with`` whose __aenter__ raises never calls __aexit__.
            await self._stack.__aexit__(*sys.exc_info())
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close_and_wait()  # a graceful goodbye, not a cancellation
        assert self._stack is not None
        await self._stack.__aexit__(*exc_info)

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve reports, and reconnect whenever the scheduler is lost.

        The first connection must succeed (or this raises `CommClosedError`).
        After that a lost scheduler is retried with capped, jittered
        exponential backoff; on reconnecting, the client resubmits the
        lineage of every future it holds (the core's `SchedulerConnected`).
        Pending futures wait through the outage. Only after
        `scheduler_timeout` seconds without a scheduler do they fail, with
        `CommClosedError`.

        Cancellation: closing the client ends this; nothing is resubmitted.
        """
        self._token = trio.lowlevel.current_trio_token()
        try:
            async with open_connection_pool(
                self.network,
                self.limits,
                role="peer",
                credentials=self.credentials.client_only(),
                connect_timeout=self.config.connect_timeout,
                peer_timeout=self.config.peer_timeout,
                idle_timeout=self.config.idle_timeout,
            ) as self._pool:
                await self._stay_connected(task_status)
        finally:
            self._conn = None
            self._apply(ce.ConnectionEnded(self._stimulus("ended")))
            self._finished.set()

    async def _stay_connected(self, task_status: trio.TaskStatus[None]) -> None:
        backoff = Backoff(self.config.reconnect_backoff_min, self.config.reconnect_backoff_max, self._rng)
        unreachable_since = trio.current_time()
        first = True
        while self.core.status is not ClientStatus.CLOSING:
            try:
                stream = await connect_authenticated(
                    self.network, self.scheduler_address, self.credentials, CLIENT, self.config.connect_timeout
                )
                reason, registered = await self._session(stream, task_status, recovering=not first)
            except AuthenticationError as exc:
                # A token that does not match will not start to by waiting.
                if first:
                    raise
                self._give_up(str(exc))
                return
            except CommClosedError as exc:
                if first:
                    # The first connection must work: a wrong address, a
                    # server that is not a scheduler or does not answer, is
                    # the user's to fix, not something to retry forever.
                    raise
                reason, registered = str(exc), False
            if registered:
                first = False
                backoff.reset()
                unreachable_since = trio.current_time()
            if self.core.status is ClientStatus.CLOSING:
                return
            self._scheduler_lost(reason)
            if trio.current_time() - unreachable_since >= self.config.scheduler_timeout:
                self._give_up(reason)
                return
            with trio.move_on_after(backoff.next()):
                await self._closed.wait()

    async def _session(
        self, stream: trio.abc.Stream, task_status: trio.TaskStatus[None], recovering: bool
    ) -> tuple[str, bool]:
        """One connection's lifetime; returns why it ended and whether we registered.

        Raises:
            CommClosedError: registration failed (refused, not a scheduler,
                no answer within `connect_timeout`).
        """
        async with open_connection(
            stream, self.limits, peer=self.scheduler_address, inbound=m.SCHEDULER_TO_CLIENT
        ) as conn:
            hello = m.Hello(
                role="client",
                protocol=m.PROTOCOL_VERSION,
                client_id=self.id,
                recovering=recovering and bool(self.core.lineage),
            )
            try:
                await say_hello(conn, hello)
                _, first = await await_welcome(
                    conn, self.config.connect_timeout, self.scheduler_address, "a trioflow scheduler"
                )
            except HandshakeRefused:
                raise
            except CommClosedError as exc:
                raise CommClosedError(f"registration with {self.scheduler_address} failed: {exc}") from None
            self._conn, self._requests = conn, Requests(conn, m.CLIENT_TO_SCHEDULER)
            if recovering:
                logger.info("client %s reconnected to %s; resubmitting its lineage", self.id, self.scheduler_address)
            self._replicas_to_ask = []
            self._apply(ce.SchedulerConnected(self._stimulus("connected"), recovering))
            self._connected.set()
            if not self._registered:
                self._registered = True
                task_status.started()
            self._on_messages(first)
            try:
                async with background_tasks() as helpers:
                    helpers.start_soon(self._heartbeats, conn)
                    if self._replicas_to_ask:
                        helpers.start_soon(self._replicate_again, self._replicas_to_ask)
                    with trio.CancelScope() as self._reader_scope:
                        return await self._listen(conn), True
                    return "closed", True
            finally:
                self._conn = None
                self._connected = trio.Event()
                self._scheduler_lost("the connection ended")

    def _scheduler_lost(self, reason: str) -> None:
        """Nothing goes to the scheduler until a new one is there (logged once per outage)."""
        before = self.core.status
        self._apply(ce.SchedulerDisconnected(self._stimulus("lost")))
        if before is not ClientStatus.RECONNECTING and self.core.status is ClientStatus.RECONNECTING:
            logger.warning(
                "client %s lost the scheduler %s (%s); reconnecting", self.id, self.scheduler_address, reason
            )

    async def _heartbeats(self, conn: Connection) -> None:
        """Keep an idle connection from being closed as idle by the scheduler."""
        interval = self.config.idle_timeout / 4
        while True:
            due = conn.last_sent + interval
            if trio.current_time() >= due:
                try:
                    conn.send(m.ClientHeartbeat())
                except CommClosedError:
                    return
                due = trio.current_time() + interval
            await trio.sleep_until(due)

    async def _listen(self, conn: Connection) -> str:
        try:
            while True:
                self._on_messages(await conn.receive())
        except CommClosedError as exc:
            return str(exc)
        except ProtocolError as exc:
            logger.warning("bad message from the scheduler: %s", clip(str(exc), 300))
            return f"protocol error: {clip(str(exc), 300)}"
        finally:
            assert self._requests is not None
            self._requests.fail_all("the scheduler connection closed")

    def _give_up(self, reason: str) -> None:
        logger.error(
            "client %s gives up: no scheduler at %s for %g s (scheduler_timeout)",
            self.id,
            self.scheduler_address,
            self.config.scheduler_timeout,
        )
        error = CommClosedError(f"lost the connection to the scheduler for good: {reason}")
        self._apply(ce.GaveUp(self._stimulus("gave-up"), error))

    async def close(self) -> None:
        """Release every key and disconnect. Idempotent."""
        if self.core.status in (ClientStatus.CLOSING, ClientStatus.CLOSED):
            return
        self._apply(ce.ClosingRequested(self._stimulus("close")))
        self._closed.set()
        if self._reader_scope is not None:
            self._reader_scope.cancel()

    async def _replicate_again(self, requests: list[ce.RequestReplicas]) -> None:
        """Ask a new scheduler for the copies asked of the old one.

        Sent right behind the resubmission (the scheduler handles them in
        order, so the keys are known by then); the answer comes once the
        copies exist, and nobody waits for it. Without this, a scheduler
        restart silently ends every `replicate`, and the next worker death
        can lose data its client kept two copies of.
        """
        assert self._requests is not None
        for request in requests:
            keys = request.keys
            for start in range(0, len(keys), KEYS_SLICE):
                try:
                    await self._requests.call(m.Replicate(keys=list(keys[start : start + KEYS_SLICE]), n=request.n))
                except (CommClosedError, RequestFailed) as exc:
                    # Gone again (the next resubmission asks anew), or not
                    # all in memory: the scheduler keeps the request anyway.
                    logger.info("client %s: copies asked again of the new scheduler: %s", self.id, clip(str(exc), 200))

    async def close_and_wait(self) -> None:
        """`close`, then wait (briefly) until the connection has said goodbye."""
        await self.close()
        with trio.move_on_after(self.config.connect_timeout):
            await self._finished.wait()

    # ---------------------------------------------------- calling conventions --

    def _call(self, async_fn: Callable[..., Any], *args: Any) -> Any:
        """Blocking (`Client`) or awaitable (`AsyncClient`), as the portal says."""
        return self._portal.call(async_fn, *args)

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn` in our Trio thread (now, if we are in it)."""
        self._portal.call_soon(fn, *args)

    def _call_result(self, future: Future, timeout: float | None) -> Any:
        """`Future.result`: blocking or awaitable, as the portal says."""
        return self._portal.result(self, future, timeout)

    def _report_when_done(self, report: ValueReport) -> None:
        """(In our loop.) Call `report` once its future is done: now if it is."""
        report.start()
        future = report.future
        if future._state is None:
            # Its task still queued (`_submit_from_thread`): take it in, as
            # `Future._record` has it taken in. (The call that takes it in
            # was queued before this one: a safeguard.)
            self._take_submissions()
        record = future._state
        if record is None or record.done():
            report()
        else:
            report.pending()
            call_when_done(record, report)

    async def _result_by(self, future: Future, deadline: float) -> Any:
        """`_result`, given a deadline on our clock instead of a timeout."""
        timeout = None if deadline == math.inf else max(deadline - trio.current_time(), 0.0)
        return await self._result(future, timeout)

    def _forget_report(self, report: ValueReport) -> None:
        """(In our loop.) Its caller stopped waiting (timed out)."""
        record = report.future._state
        if record is not None:
            forget_when_done(record, report)

    # ---------------------------------------------------------------- core --

    def _stimulus(self, what: str) -> str:
        return f"{what}-{next(self._stimulus_ids)}"

    def _apply(self, event: ce.ClientEvent, fresh: Mapping[str, m.TaskWire] | None = None) -> None:
        """Feed one event to the core and carry out what it answers.

        `fresh`: the wire form of tasks just packed (a `SendTasks` for them
        sends these; other keys are rebuilt from the lineage).
        """
        for output in self.core.handle(event):
            kind = type(output)
            if kind is ce.FutureDone:
                record = self.core.futures.get(output.key)
                if record is not None:
                    wake(record)
            elif kind is ce.SendTasks:
                if fresh is not None:
                    tasks = [fresh[key] for key in output.keys]
                else:
                    tasks = resubmission(self.core.lineage, output.keys)
                self._send_all(submit_messages(tasks, self.core.lineage.functions, output.wanted))
            elif kind is ce.SendReleaseKeys:
                self._send_all(m.ReleaseKeys(keys=list(part)) for part in _slices(output.keys, KEYS_SLICE))
            elif kind is ce.SendCancelKeys:
                reason = clip_text(output.reason, m.MAX_REASON_CHARS)
                self._send_all(m.CancelKeys(keys=list(part), reason=reason) for part in _slices(output.keys, KEYS_SLICE))
            elif kind is ce.SendFireAndForget:
                self._send_all(m.FireAndForget(keys=list(part)) for part in _slices(output.keys, KEYS_SLICE))
            elif kind is ce.SendMissingData:
                self._send_all([m.MissingData(key=output.key, holders=list(output.holders))])
            elif kind is ce.RequestReplicas:
                self._replicas_to_ask.append(output)
            else:
                raise AssertionError(f"no handler for the client core's {kind.__name__}")

    def _send_all(self, messages: Iterable[m.Message]) -> None:
        """Send to the scheduler; if the connection just broke, drop the rest.

        Nothing is lost by that: the core asks only while connected, and a
        broken connection means a new scheduler, which gets the lineage of
        every held key anew and knows nothing the dropped messages said.
        """
        if self._conn is None:
            return
        try:
            for message in messages:
                self._conn.send(message)
        except CommClosedError:
            pass

    # ------------------------------------------------------------ reports --

    def _on_messages(self, messages: list[m.Message]) -> None:
        for message in messages:
            kind = type(message)
            if kind is m.Reply:
                assert self._requests is not None
                self._requests.deliver(message)
            elif kind is m.KeyFinished:
                sid = self._stimulus("key-finished")
                self._apply(ce.FinishReported(sid, message.key, tuple(message.who_has), message.value))
            elif kind is m.KeyErred:
                failure = failure_from_wire(message.failure)
                self._apply(ce.FailureReported(self._stimulus("key-erred"), (message.key,), failure))
            elif kind is m.KeysErred:
                failure = failure_from_wire(message.failure)
                self._apply(ce.FailureReported(self._stimulus("keys-erred"), tuple(message.keys), failure))
            elif kind is m.KeyLost:
                self._apply(ce.LossReported(self._stimulus("key-lost"), message.key))
            elif kind is m.Restarted:
                self._apply(ce.RestartReported(self._stimulus("restarted")))
            elif kind is m.SubmitRefused:
                logger.error("the scheduler refused %d tasks: %s", len(message.keys), clip(message.reason, 300))
                self._apply(ce.RefusalReported(self._stimulus("refused"), tuple(message.keys), message.reason))
            # welcome (repeated) and anything else harmless are ignored

    # ------------------------------------------------------------ handles --

    def _future(self, key: str) -> Future:
        """A new handle on `key` (its record made, or pending again if cancelled)."""
        self._apply(ce.HandlesMade(self._stimulus("handle"), (key,)))
        return Future(self, key, self.core.futures[key])

    def _futures(self, keys: list[str]) -> list[Future]:
        """`_future` for many keys, in one step of the core."""
        self._apply(ce.HandlesMade(self._stimulus("handles"), tuple(keys)))
        futures = self.core.futures
        return [Future(self, key, futures[key]) for key in keys]

    def _release_ref(self, key: str) -> None:
        """A handle on `key` went away (any thread, possibly during GC)."""
        self._released.append(key)
        with self._release_lock:
            if self._release_scheduled or self._token is None:
                return
            self._release_scheduled = True
        try:
            self._token.run_sync_soon(self._flush_releases)
        except trio.RunFinishedError:
            pass

    def _flush_releases(self) -> None:
        """Hand the core the dropped handles, at most `RELEASE_SLICE` a step.

        Dropping a million futures queues a million keys; each step takes
        a slice and, if more are left, queues itself again behind whatever
        else the loop has to do, so this loop never stalls on it.
        """
        with self._release_lock:
            self._release_scheduled = False
        # A blocking client's caller queues tasks without waiting (from
        # another thread, `_submit_from_thread`): a handle dropped may be
        # the input of a task queued before it was dropped, or that task's
        # own. Every task queued before the releases counted here is taken
        # in first; a release queued meanwhile waits for the next step (its
        # task may have been queued after this take), or the scheduler
        # would forget an input a task it has not yet been sent needs.
        releases = min(len(self._released), RELEASE_SLICE)
        self._take_submissions()
        dropped = [self._released.popleft() for _ in range(releases)]
        if dropped:
            self._apply(ce.HandlesDropped(self._stimulus("dropped"), tuple(dropped)))
        if self._released:
            with self._release_lock:
                if self._release_scheduled:
                    return
                self._release_scheduled = True
            assert self._token is not None
            try:
                self._token.run_sync_soon(self._flush_releases)
            except trio.RunFinishedError:
                pass  # the client's loop is ending: nothing left to tell

    # ------------------------------------------------------------- submit --

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        key: str | None = None,
        pure: bool = True,
        retries: int = 0,
        workers: str | Iterable[str] | None = None,
        allow_other_workers: bool = False,
        resources: Mapping[str, float] | None = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> Future:
        """Run ``fn(*args, **kwargs)`` on the cluster; return its `Future`.

        Futures inside `args`/`kwargs` (also inside lists, tuples, dicts and
        sets) become dependencies: the task runs after them, with their values.
        Every keyword not named below goes to `fn`, as in dask.distributed.

        Args:
            key: the task's name; by default derived from `fn` and the
                arguments (``pure=True``) or random (``pure=False``).
            pure: whether equal calls may share one key (and one result).
            retries: how many times to rerun the task if `fn` raises.
            workers: worker address(es) allowed to run it.
            allow_other_workers: with `workers`, only a preference: any
                worker runs it while none of those is alive.
            resources: ``{"GPU": 1}``: run it only where a worker declared
                that much, free of the tasks already running there.
            priority: higher runs first (the default is 0).

        Raises:
            ValueError, TypeError: an option is out of bounds (named).
        """
        if not callable(fn):
            raise TypeError(f"submit() expects a callable, got {type(fn).__name__}")
        options = task_options(retries, workers, allow_other_workers, resources, priority)
        self._admit(1)
        [future] = self._submit_packed(self._pack(fn, [(args, kwargs)], [key], pure, options))
        return future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        key: str | list[str] | None = None,
        pure: bool = True,
        retries: int = 0,
        workers: str | Iterable[str] | None = None,
        allow_other_workers: bool = False,
        resources: Mapping[str, float] | None = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> list[Future]:
        """`submit` `fn` once per element of the zipped `iterables`.

        `key` may be a list of keys, or a prefix for generated ones; the
        other options are `submit`'s, for every task; other keywords go to
        `fn`. Here every call is pickled in the caller's loop, in one go;
        the blocking `Client.map` pickles in the caller's thread instead,
        and hands this loop the futures to make in slices (`map_calls`,
        `_pack`, `_submit_packed`).
        """
        if not callable(fn):
            raise TypeError(f"map() expects a callable, got {type(fn).__name__}")
        options = task_options(retries, workers, allow_other_workers, resources, priority)
        calls, keys, prefix = map_calls(fn, iterables, key, kwargs)
        self._admit(len(calls))
        return self._submit_packed(self._pack(fn, calls, keys, pure, options, prefix=prefix))

    def _pack(
        self,
        fn: Callable[..., Any],
        calls: list[tuple[tuple, dict]],
        keys: list[str | None],
        pure: bool,
        options: TaskOptions,
        prefix: str | None = None,
    ) -> list[Packed]:
        """`packing.pack` with this client's limits and random source; any
        thread may run it (the blocking `Client` runs it in the caller's)."""
        return pack(fn, calls, keys, pure, options, self.limits, self._random_hex, prefix)

    def _submit_packed(self, packed: list[Packed]) -> list[Future]:
        """Handles and lineage for packed tasks, then the tasks on their way
        (in the client's loop; refused like `submit` if they could be
        neither sent nor kept). A task whose input already failed for good
        is not sent: its future fails at once, with that failure (the
        core's `CallsSubmitted`)."""
        self._admit(len(packed))
        futures = self._futures([task.key for task, _ in packed])
        self._submit_tasks(*unpacked(packed))
        return futures

    def _submit_from_thread(self, packed: list[Packed]) -> list[Future] | None:
        """Handles for packed tasks, returned without waiting for our loop
        (called by a blocking `Client` in its caller's thread), or None if
        the caller must wait for `_submit_packed` instead.

        Waiting cost each `submit` two thread hand-offs, and with a
        `LocalCluster` each waits for the interpreter lock the scheduler's
        thread holds: 0.9 ms a call in a loop of submits (W3,
        docs/performance-history.md, the second round). Instead the tasks
        queue here and the loop takes them in, in order, in its next step
        (`_take_submissions`); every later call from any thread reaches the
        loop behind them, since Trio runs `run_sync_soon` callbacks in the
        order they came. Only a running client takes this path (a look at
        the core's status from the caller's thread, which changes nothing;
        the loop decides again): one reconnecting or closing is asked and
        refuses at once, as before. If it stops running in between, the
        handles fail with the refusal instead (`CallsRefused`).
        """
        token = self._token
        if token is None or self.core.status is not ClientStatus.RUNNING:
            return None
        futures = [Future(self, task.key, None) for task, _ in packed]
        self._submissions.append((packed, futures))
        with self._release_lock:
            if self._submission_scheduled:
                return futures
            self._submission_scheduled = True
        try:
            token.run_sync_soon(self._take_submissions)
        except trio.RunFinishedError:
            raise CommClosedError(f"client {self.id} is closed") from None
        return futures

    def _take_submissions(self) -> None:
        """Take in every task `_submit_from_thread` queued (in our loop).

        All at once, as one submission (one step of the core here and one
        `submit` message to the scheduler, however many calls queued them),
        when the client can take them all; else each call's on its own, so
        that each is refused as its caller would have been.
        """
        with self._release_lock:
            self._submission_scheduled = False
        queued = [self._submissions.popleft() for _ in range(len(self._submissions))]
        if not queued:
            return
        # The submit goes out before this returns (`writing_through`).
        with writing_through():
            if self.core.refusal(sum(len(packed) for packed, _ in queued)) is None:
                self._take_in([task for packed, _ in queued for task in packed], [f for _, fs in queued for f in fs])
            else:
                for packed, futures in queued:
                    self._take_in(packed, futures)

    def _take_in(self, packed: list[Packed], futures: list[Future]) -> None:
        """Make the records of handles given out already; submit their
        tasks, or fail the handles if the client cannot take the tasks."""
        keys = [future.key for future in futures]
        new = tuple(key for key in keys if key not in self.core.futures)
        why = self.core.refusal(len(packed))
        self._apply(ce.HandlesMade(self._stimulus("handles"), tuple(keys)))
        records = self.core.futures
        for future in futures:
            future._state = records[future.key]
        if why is not None:
            error = CommClosedError(f"client {self.id} could not take the task: {why}")
            self._apply(ce.CallsRefused(self._stimulus("refused"), new, error))
            return
        self._submit_tasks(*unpacked(packed))

    def _take_submissions_now(self) -> None:
        """Have our loop take in the queued tasks before this returns (even
        with none queued: the loop may be taking one in right now)."""
        self._call_soon(self._take_submissions)

    def _submit_tasks(self, tasks: list[m.TaskWire], functions: dict[str, Serialized]) -> None:
        """Hand the core tasks whose handles exist; it keeps and sends them."""
        keys = tuple(task.key for task in tasks)
        event = ce.CallsSubmitted(self._stimulus("submit"), keys, tuple(keep(task) for task in tasks), functions)
        self._apply(event, fresh={task.key: task for task in tasks})

    def _admit(self, n_tasks: int) -> None:
        """Refuse `n_tasks` new tasks now, before any future or lineage
        exists for them, if they could be neither sent nor kept (the core's
        `refusal`: while reconnecting, at most `MAX_QUEUED_WHILE_AWAY` wait
        for the resubmission)."""
        why = self.core.refusal(n_tasks)
        if why is None:
            return
        if self.core.status is ClientStatus.RECONNECTING:
            raise CommClosedError(f"the scheduler at {self.scheduler_address} is unreachable and {why}")
        self._require_connection()

    def _require_connection(self) -> Connection:
        if self._conn is None or not self.core.connected:
            raise CommClosedError(f"client {self.id} is {self.status}, not connected to a scheduler")
        return self._conn

    async def _connection(self, timeout: float | None) -> Connection:
        """The scheduler connection, waiting up to `timeout` s for a reconnect."""
        if self.core.status in (ClientStatus.CLOSING, ClientStatus.CLOSED, ClientStatus.NEW):
            return self._require_connection()
        with trio.move_on_after(math.inf if timeout is None else timeout):
            # A connection that broke is not the one to use, even before the
            # reader task has noticed (`_connected` is then still set, and
            # its wait a checkpoint that lets the reader run).
            while self._conn is None or self._conn.closed or not self.core.connected:
                await self._connected.wait()
            return self._conn
        raise CommClosedError(
            f"no connection to the scheduler at {self.scheduler_address} within {timeout:g} s"
        )

    async def _call_scheduler(self, message: m.Message) -> Any:
        """A request on the current connection (`CommClosedError` if it breaks)."""
        assert self._requests is not None
        return await self._requests.call(message)

    # ------------------------------------------------------------- graphs --

    # The blocking `Client` does the first step (the plan: converting,
    # ordering and pickling the graph) in the caller's thread; here it runs
    # in a worker thread. Only `_submit_plan` and the waiting use the loop.

    async def get(self, dsk: Any, keys: Any, **options: Any) -> Any:
        """Compute the dask graph `dsk`; return the values of `keys`.

        `dsk` is a dict of dask tasks, a `HighLevelGraph`, or a dask
        expression (what ``dask.compute`` hands a scheduler); `keys` is a key
        or a (nested) list of keys. The options are `submit`'s (retries,
        workers, allow_other_workers, resources, priority), for every task.
        With `Client`, ``dask.compute(x, scheduler=client.get)`` works.

        Raises:
            KeyError: a key is not in the graph.
            ImportError: dask is not installed.
        """
        checked = task_options(**graph_options(options))
        plan = await trio.to_thread.run_sync(graph_plan, dsk, flatten_keys(keys), is_future)
        futures = self._submit_plan(plan, checked)
        return await self.gather(shape_like(keys, futures))

    async def compute(self, collections: Any, *, optimize_graph: bool = True, **options: Any) -> Any:
        """Start computing dask collections; return a `Future` for each value.

        A single collection gives a single future, a list a list (items that
        are not dask collections pass through). The value of the future is
        what ``collection.compute()`` returns. Options as in `get`.
        """
        checked = task_options(**graph_options(options))
        (singleton, items), plan, where = await trio.to_thread.run_sync(
            compute_plan, collections, optimize_graph, is_future
        )
        futures = self._submit_plan(plan, checked)
        out = [futures[where[i]] if i in where else item for i, item in enumerate(items)]
        return out[0] if singleton else out

    async def persist(self, collections: Any, *, optimize_graph: bool = True, **options: Any) -> Any:
        """Start computing dask collections; return collections backed by futures.

        Returns at once, with a collection of the same type whose graph
        holds one `Future` per key (the values stay on the cluster). A list
        gives a list. Options as in `get`.
        """
        checked = task_options(**graph_options(options))
        singleton, plan, rebuild = await trio.to_thread.run_sync(persist_plan, collections, optimize_graph, is_future)
        futures = self._submit_plan(plan, checked)
        out = rebuild(futures)
        return out[0] if singleton else out

    def _submit_plan(self, plan: Any, options: TaskOptions) -> dict[Any, Future]:
        """Submit the (pickled) tasks of a graph plan; a `Future` per wanted dask key.

        Every task is first submitted as wanted (a scheduler forgets a task
        nobody wants that is not yet the input of another, and a big graph
        travels in several messages), then the handles of the tasks nobody
        asked for are dropped: the scheduler keeps each of those while a
        dependent needs it.
        """
        for key, future in plan.futures.items():
            if future.client is not self:
                raise ValueError(f"the graph holds a future of another client ({key!r})")
        unknown = [key for key in plan.external if key not in self.core.futures]
        if unknown:
            raise KeyError(f"the graph refers to {unknown[0]!r}, which is neither in it nor a future of this client")
        self._admit(len(plan.tasks))
        tasks = plan_tasks(plan, options)
        handles = dict(zip((task.key for task in tasks), self._futures([task.key for task in tasks]), strict=True))
        self._submit_tasks(tasks, {plan.function.function_id: plan.function.payload})
        return {dask_key: handles.get(key) or plan.futures.get(key) or self._future(key)
                for dask_key, key in plan.keys.items()}

    # ------------------------------------------------------------ results --

    async def _result(self, future: Future, timeout: float | None) -> Any:
        values = await self._gather_records([future._state], timeout)
        return values[future.key]

    async def _exception(self, future: Future, timeout: float | None) -> BaseException | None:
        with _timeout(timeout):
            await wait_done(future._state)
        record = future._state
        return None if record.status is FINISHED else exception_of(record)

    async def gather(self, futures: Any, timeout: float | None = None) -> Any:
        """The values of `futures` (a future, or a list/tuple/dict nesting them).

        Raises the failure of the first failed future, in order.
        """
        found: dict[str, None] = {}
        structure = replace_futures(futures, is_future, found)
        records = [self.core.futures[key] for key in found if key in self.core.futures]
        if len(records) != len(found):
            raise ValueError("gather() was given a future of another (or closed) client")
        values = await self._gather_records(records, timeout)
        return substitute(structure, values)

    async def _gather_records(self, records: list[FutureRecord], timeout: float | None) -> dict[str, Any]:
        """Wait for every record, then fetch the values straight from workers."""
        with _timeout(timeout):
            return await self._fetcher.gather(records)

    # ------------------------------------------------------- other requests --

    async def _request(self, message: m.Message) -> Any:
        """Ask the scheduler; waits up to connect_timeout for a reconnect first."""
        await self._connection(self.config.connect_timeout)
        assert self._requests is not None
        try:
            return await self._requests.call(message)
        except RequestFailed as exc:
            raise RuntimeError(f"the scheduler refused {message.OP!r}: {exc}") from None

    async def scatter(self, data: Any, broadcast: bool = False, timeout: float | None = None) -> Any:
        """Put local data on the cluster; return futures for it.

        A list gives a list of futures, a dict a dict (its keys become the
        task keys), anything else a single future. Scattered data has no
        lineage: if every worker holding it dies it is lost (`LostData`);
        `replicate` keeps copies.
        """
        if isinstance(data, Mapping):
            items = [(str(k), v) for k, v in data.items()]
        elif isinstance(data, (list, tuple)):
            items = [(None, v) for v in data]
        else:
            items = [(None, data)]
        payloads: dict[str, Serialized] = {}
        keys: list[str] = []
        for key, value in items:
            serialized = dumps(value)
            if key is None:
                key = f"{type(value).__name__}-{content_digest(serialized)}"
            if serialized.nbytes > max_value_bytes(self.limits):
                raise ValueError(too_big(f"the value scattered as {key!r}", serialized.nbytes, self.limits))
            payloads[key] = serialized
            keys.append(key)
        futures = dict(zip(keys, self._futures(keys), strict=True))
        markers = tuple(keep(m.TaskWire(key=key, scattered=True)) for key in keys)
        self._apply(ce.ValuesScattered(self._stimulus("scatter"), tuple(keys), markers))
        with _timeout(timeout):
            for part in byte_slices(list(payloads.items()), SCATTER_SLICE, max_value_bytes(self.limits)):
                await self._request(m.Scatter(data=dict(part), broadcast=broadcast))
        if isinstance(data, Mapping):
            return {key: futures[key] for key in keys}
        if isinstance(data, (list, tuple)):
            return [futures[key] for key in keys]
        return futures[keys[0]]

    def _fire_and_forget(self, keys: list[str]) -> None:
        """Tell the scheduler to compute `keys` even once no client holds them."""
        self._apply(ce.FiredAndForgotten(self._stimulus("fire-and-forget"), tuple(keys)))

    async def cancel(self, futures: Any, reason: str = "cancelled by the client") -> None:
        """Cancel the tasks of `futures` and every dependent this client holds.

        Their futures raise `trioflow.CancelledError`. Other clients'
        futures for the same keys are not affected.
        """
        keys = [k for k in future_keys(futures) if k in self.core.futures]
        for part in _slices(keys, CANCEL_SLICE):
            self._apply(ce.FuturesCancelled(self._stimulus("cancel"), tuple(part), reason))
            if len(part) == CANCEL_SLICE:
                await trio.lowlevel.checkpoint()

    async def run(
        self, function: Callable[..., Any], *args: Any, workers: Iterable[str] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Call ``function(*args, **kwargs)`` on every worker (or on `workers`).

        Returns ``{worker_address: result}``. It runs at once, beside the
        worker's tasks (not in a task thread). A function with a
        ``dask_worker`` parameter gets the `Worker` object, as in dask.

        Raises:
            Exception: the first exception a worker's call raised.
            RuntimeError: `workers` names an address that is no worker here.
        """
        return await cluster_requests.run_everywhere(self._request, function, args, kwargs, workers)

    async def run_on_scheduler(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``function(*args, **kwargs)`` in the scheduler's process; return its result.

        It runs in a thread of the scheduler's process. A function with a
        ``dask_scheduler`` parameter gets the `Scheduler` object, as in dask:
        read it, do not change it (only the scheduler's driver task may).

        Raises:
            Exception: what the function raised.
        """
        return await cluster_requests.run_on_scheduler(self._request, function, args, kwargs)

    async def upload_file(self, path: str) -> None:
        """Send a ``.py``, ``.zip`` or ``.egg`` file to every worker, now and later.

        Each worker stores it in a directory of its own, first on its
        ``sys.path`` (a ``.zip``/``.egg`` is itself put there), and reloads
        a module of that name it had already imported; workers that join
        later get it when they register.

        Raises:
            ValueError: not such a file, or larger than `MAX_UPLOAD_BYTES`.
            RuntimeError: a worker could not store it (named, with why).
        """
        await cluster_requests.upload_file(self._request, path)

    async def replicate(self, futures: Any, n: int = 2) -> None:
        """Keep `n` copies of each future's value, on different workers.

        Returns once the copies exist (or every worker has one). The
        scheduler restores the count when a holder dies, so data without
        lineage (scattered) survives losing a worker. The request outlives
        a scheduler restart: the client asks the new scheduler again, right
        after resubmitting its lineage. ``n=1`` ends it.
        """
        found: dict[str, None] = {}
        replace_futures(futures, is_future, found)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= m.MAX_WORKERS:
            raise ValueError(f"n must be an int between 1 and {m.MAX_WORKERS}, got {n!r}")
        # Remembered by the core, for the next scheduler should this one die.
        self._apply(ce.CopiesRequested(self._stimulus("replicate"), tuple(found), n))
        await self._request(m.Replicate(keys=list(found), n=n))

    async def restart(self, timeout: float | None = None) -> None:
        """Kill every worker and start it again through its nanny.

        All task state is flushed: every future of every client fails with
        `trioflow.CancelledError`. Returns once as many workers as had
        nannies are back. Workers without a nanny leave for good.

        Raises:
            RuntimeError: the workers did not come back within `timeout`
                (default `Config.restart_timeout`) seconds.
        """
        wait = self.config.restart_timeout if timeout is None else timeout
        if not 0 < wait <= m.MAX_TIMEOUT_S:
            raise ValueError(f"timeout must be between 0 and {m.MAX_TIMEOUT_S:g} s, got {wait!r}")
        with _timeout(wait + self.config.connect_timeout):
            await self._request(m.Restart(timeout=wait))

    async def who_has(self, futures: Any = None) -> dict[str, list[str]]:
        """``{key: [worker addresses]}`` for `futures` (all keys if None)."""
        keys = None
        if futures is not None:
            found: dict[str, None] = {}
            replace_futures(futures, is_future, found)
            keys = list(found)
        return (await self._request(m.WhoHas(keys=keys))).who_has

    async def has_what(self) -> dict[str, list[str]]:
        """``{worker address: [keys it holds]}``."""
        return (await self._request(m.HasWhat())).has_what

    async def nthreads(self) -> dict[str, int]:
        """``{worker address: number of threads}``."""
        return (await self._request(m.NThreads())).nthreads

    async def scheduler_info(self) -> dict[str, Any]:
        """The scheduler's address, its workers and its task counts (a dict)."""
        return await cluster_requests.scheduler_info(self._request)

    async def get_task_stream(
        self, start: float | None = None, stop: float | None = None, count: int | None = None
    ) -> list[dict[str, Any]]:
        """The task runs the scheduler remembers, oldest first: one dict per run, as dask's.

        Each dict holds ``key``, ``name`` (the function part of the key),
        ``worker``, ``status`` (``"OK"`` or ``"error"``), ``startstops``
        (``({"action": "compute", "start": ..., "stop": ...},)``, wall-clock
        seconds by the worker's clock), and ``nbytes`` for a run that
        returned or ``error`` (the exception's type and message) for one
        that raised. The scheduler keeps the newest 100,000 runs;
        `trioflow.write_perfetto_trace` turns the list into a timeline.

        Args:
            start, stop: seconds since the epoch (``time.time()``): keep the
                runs that overlap this window.
            count: keep only the newest `count` of them.

        Raises:
            ValueError: a bound that is not a number of seconds since the
                epoch, or a `count` that is not an int >= 0.
        """
        return await cluster_requests.task_stream(self._request, start, stop, count)

    async def get_cluster_metrics(self, events_after: int = 0) -> dict[str, Any]:
        """The scheduler's counters, its tasks by state, its worker count and recent cluster events.

        ``counters`` are the `trioflow.recorder.COUNTERS` (runs, bytes,
        worker deaths, KilledWorker, LostData, recomputations, restarts...)
        plus the sums and counts of the task-duration and event-loop-lag
        histograms. ``events`` are dicts (``seq``, ``time``, ``kind``,
        ``text``, ``worker``, ``count``) numbered after `events_after`.
        """
        return await cluster_requests.cluster_metrics(self._request, events_after)

    async def wait_for_workers(self, n: int, timeout: float | None = None) -> None:
        """Return once at least `n` workers are connected."""
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= m.MAX_WORKERS:
            raise ValueError(f"n must be an int between 1 and {m.MAX_WORKERS}, got {n!r}")
        with _timeout(timeout):
            await self._request(m.WaitForWorkers(n=n))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.scheduler_address} {self.status}>"




def fire_and_forget(futures: Any) -> None:
    """Run these futures' tasks to the end even if every handle is dropped.

    As in dask.distributed: the scheduler holds each key until its task has
    a value or a failure, then forgets it (a failure is reported to no one).
    `futures` is a future or a list/tuple/dict/set nesting them. Not kept
    across a scheduler restart unless a client still holds the key.
    """
    found: dict[str, None] = {}
    by_client: dict[int, tuple[AsyncClient, list[str]]] = {}

    def collect(obj: Any) -> bool:
        if is_future(obj):
            by_client.setdefault(id(obj.client), (obj.client, []))[1].append(obj.key)
            return True
        return False

    replace_futures(futures, collect, found)
    for client, keys in by_client.values():
        client._call_soon(client._fire_and_forget, list(dict.fromkeys(keys)))


class _timeout:
    """``with _timeout(seconds)``: raise the builtin TimeoutError, or no limit."""

    def __init__(self, seconds: float | None):
        self.scope = trio.CancelScope(
            deadline=trio.current_time() + seconds if seconds is not None else float("inf")
        )
        self.seconds = seconds

    def __enter__(self) -> trio.CancelScope:
        return self.scope.__enter__()

    def __exit__(self, *exc_info: Any) -> bool:
        handled = self.scope.__exit__(*exc_info)
        if self.scope.cancelled_caught:
            raise not_done_within(self.seconds)
        return handled



def _slices(items: Any, size: int) -> Iterable[Any]:
    """`items` (a list or tuple) in consecutive slices of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
