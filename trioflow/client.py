"""`AsyncClient`: submit Python functions to a trioflow cluster, from Trio.

This is the client itself; `trioflow.Client` is a thin blocking wrapper that
runs one of these in a background Trio thread.

The path of a task, as seen from here:

1. `submit` pickles the function once (cached) and the arguments once,
   swapping every `Future` found in them for a `TaskRef`; those keys are the
   task's dependencies. The key is a digest of function and arguments
   (``pure=True``), so the same call gives the same key.
2. The task goes to the scheduler in a ``submit`` message; the future is
   pending.
3. The scheduler reports ``key_finished`` (with the workers holding the
   value), ``key_erred`` (with a failure record) or ``key_lost`` (being
   recomputed). The reader task updates the `FutureState`.
4. `result` waits for that, then fetches the value straight from a worker
   that holds it (``get_data``); never through the scheduler.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import logging
import math
import os
import random
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from typing import Any

import trio

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
    dumps_function,
    loads,
    open_connection,
    open_connection_pool,
    say_hello,
)
from trioflow.comm import messages as m
from trioflow.comm.auth import CLIENT, Credentials, connect_authenticated, credentials_for
from trioflow.comm.frames import max_value_bytes, too_big
from trioflow.comm.security import Security
from trioflow.comm.serialize import Serialized, SerializedFunction, content_digest
from trioflow.backoff import Backoff
from trioflow.config import Config
from trioflow.core.failures import Cancelled
from trioflow.errors import AuthenticationError, CommClosedError, ProtocolError, SerializationError
from trioflow.future import FINISHED, Future, FutureState
from trioflow.graph import (
    compute_plan,
    flatten_keys,
    graph_plan,
    persist_plan,
    shape_like,
)
from trioflow.lineage import Lineage
from trioflow.nurseries import background_tasks
from trioflow.recorder import key_name
from trioflow.task_options import TaskOptions, task_options
from trioflow.protocol import (
    clip_text,
    failure_from_wire,
    failure_to_exception,
    raise_serialization_error,
    replace_futures,
    substitute,
)

logger = logging.getLogger("trioflow.client")

# Tasks a client keeps for a scheduler that is away before submit() refuses more.
MAX_QUEUED_WHILE_AWAY = 100_000
# Tasks per `submit` message, and bytes of arguments (a task whose
# arguments are bigger goes alone).
SUBMIT_SLICE = 1_000
SUBMIT_BYTES = 64 << 20
# Keys per `release_keys`, `cancel_keys`, `who_has` and `get_data` message:
# a message body must stay within `max_body_bytes`.
KEYS_SLICE = m.MAX_KEYS
GET_DATA_SLICE = 1_000
# Values per `scatter` request (each value is one frame or more).
SCATTER_SLICE = 1_000
# Keys a step of `_flush_releases` forgets before it yields the loop.
RELEASE_SLICE = 10_000
# States `gather` waits for, and values it unpickles, between two yields.
GATHER_SLICE = 10_000
# Futures `cancel` fails between two yields.
CANCEL_SLICE = 10_000
# A task without dependencies shares this empty tuple (the field's default;
# a list per task was 56 bytes of every future's lineage).
NO_DEPENDENCIES: tuple[str, ...] = ()


def _is_future(obj: Any) -> bool:
    return type(obj) is Future


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
        self.futures: dict[str, FutureState] = {}
        self.status = "new"
        self._conn: Connection | None = None
        self._requests: Requests | None = None
        self._pool = None
        self._closed = trio.Event()
        self._finished = trio.Event()
        # Set while a scheduler connection is up (replaced when it drops).
        self._connected = trio.Event()
        self._registered = False
        self._reader_scope: trio.CancelScope | None = None
        # What to resubmit after a scheduler restart.
        self._lineage = Lineage()
        # key -> the copies this client asked to keep (`replicate`): a new
        # scheduler knows nothing of them, so they are asked for again
        # after each resubmission (`_replicate_again`).
        self._replicas: dict[str, int] = {}
        self._queued_while_away = 0
        self._stack: AsyncExitStack | None = None
        # Set by the blocking `Client`: runs an async method in our thread.
        self._blocking: Callable[..., Any] | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        # Keys whose handles were collected, from any thread; drained in ours.
        self._released: collections.deque[str] = collections.deque()
        self._release_lock = threading.Lock()
        self._release_scheduled = False
        self._scatter_ids = itertools.count()

    def _random_hex(self) -> str:
        return uuid.UUID(int=self._rng.getrandbits(128), version=4).hex

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
        lineage of every future it holds (`_resubmit`). Pending futures wait
        through the outage. Only after `scheduler_timeout` seconds without a
        scheduler do they fail, with `CommClosedError`.

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
            self.status = "closed"
            self._conn = None
            self._finished.set()

    async def _stay_connected(self, task_status: trio.TaskStatus[None]) -> None:
        backoff = Backoff(self.config.reconnect_backoff_min, self.config.reconnect_backoff_max, self._rng)
        unreachable_since = trio.current_time()
        first = True
        while self.status != "closing":
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
            if self.status == "closing":
                return
            if self.status != "reconnecting":
                self.status = "reconnecting"
                logger.warning(
                    "client %s lost the scheduler %s (%s); reconnecting", self.id, self.scheduler_address, reason
                )
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
                recovering=recovering and bool(self._lineage),
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
            self.status = "running"
            if recovering:
                logger.info("client %s reconnected to %s; resubmitting its lineage", self.id, self.scheduler_address)
                self._resubmit()
            self._connected.set()
            if not self._registered:
                self._registered = True
                task_status.started()
            self._on_messages(first)
            try:
                async with background_tasks() as helpers:
                    helpers.start_soon(self._heartbeats, conn)
                    if recovering and self._replicas:
                        helpers.start_soon(self._replicate_again)
                    with trio.CancelScope() as self._reader_scope:
                        return await self._listen(conn), True
                    return "closed", True
            finally:
                self._conn = None
                self._connected = trio.Event()

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
        self.status = "closing"
        error = CommClosedError(f"lost the connection to the scheduler for good: {reason}")
        for state in self.futures.values():
            if not state.done():
                state.fail_locally(error)

    async def close(self) -> None:
        """Release every key and disconnect. Idempotent."""
        if self.status in ("closing", "closed"):
            return
        self.status = "closing"
        if self._conn is not None:
            keys = list(self.futures)
            try:
                for start in range(0, len(keys), KEYS_SLICE):
                    self._conn.send(m.ReleaseKeys(keys=keys[start : start + KEYS_SLICE]))
            except CommClosedError:
                pass
        self._closed.set()
        if self._reader_scope is not None:
            self._reader_scope.cancel()

    def _resubmit(self) -> None:
        """Send the kept lineage to a new scheduler (after a reconnect)."""
        assert self._conn is not None
        self._queued_while_away = 0
        for message in submit_messages(self._lineage.messages(), self._lineage.functions, self._resubmitted()):
            self._conn.send(message)

    def _resubmitted(self) -> list[str]:
        """The keys a resubmission wants: every future not failed for good."""
        return [k for k, st in self.futures.items() if not st.done() or st.status == FINISHED]

    async def _replicate_again(self) -> None:
        """Ask a new scheduler for the copies asked of the old one.

        Sent right behind the resubmission (the scheduler handles them in
        order, so the keys are known by then); the answer comes once the
        copies exist, and nobody waits for it. Without this, a scheduler
        restart silently ends every `replicate`, and the next worker death
        can lose data its client kept two copies of.
        """
        wanted = set(self._resubmitted())
        by_n: dict[int, list[str]] = {}
        for key, n in self._replicas.items():
            if key in wanted:
                by_n.setdefault(n, []).append(key)
        assert self._requests is not None
        for n, keys in sorted(by_n.items()):
            for start in range(0, len(keys), KEYS_SLICE):
                try:
                    await self._requests.call(m.Replicate(keys=keys[start : start + KEYS_SLICE], n=n))
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
        """Blocking (`Client`) or awaitable (`AsyncClient`), as the owner wants."""
        if self._blocking is None:
            return async_fn(*args)
        return self._blocking(async_fn, *args)

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn` in our Trio thread (now, if we are in it)."""
        if self._blocking is None:
            fn(*args)
        else:
            assert self._token is not None
            trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    # ------------------------------------------------------------ reports --

    def _on_messages(self, messages: list[m.Message]) -> None:
        for message in messages:
            kind = type(message)
            if kind is m.Reply:
                assert self._requests is not None
                self._requests.deliver(message)
            elif kind is m.KeyFinished:
                state = self.futures.get(message.key)
                if state is not None:
                    state.finish(tuple(message.who_has), message.value)
            elif kind is m.KeyErred:
                state = self.futures.get(message.key)
                if state is not None:
                    state.fail(failure_from_wire(message.failure))
            elif kind is m.KeysErred:
                failure = failure_from_wire(message.failure)
                for key in message.keys:
                    state = self.futures.get(key)
                    if state is not None:
                        state.fail(failure)
            elif kind is m.KeyLost:
                state = self.futures.get(message.key)
                if state is not None:
                    state.lose()
            elif kind is m.Restarted:
                for state in self.futures.values():
                    state.fail(Cancelled("the cluster was restarted"))
            elif kind is m.SubmitRefused:
                logger.error("the scheduler refused %d tasks: %s", len(message.keys), clip(message.reason, 300))
                error = ValueError(f"the scheduler refused the task: {message.reason}")
                for key in message.keys:
                    state = self.futures.get(key)
                    if state is not None and not state.done():
                        state.fail_locally(error)
            # welcome (repeated) and anything else harmless are ignored

    # -------------------------------------------------- futures bookkeeping --

    def _future(self, key: str) -> Future:
        state = self.futures.get(key)
        if state is None:
            state = self.futures[key] = FutureState(key)
        elif state.status == "cancelled":
            state.reset()
        return Future(key, self, state)

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
        """Forget the keys whose last handle went, at most `RELEASE_SLICE` a step.

        Dropping a million futures queues a million keys; each step takes
        a slice and, if more are left, queues itself again behind whatever
        else the loop has to do, so this loop never stalls on it.
        """
        with self._release_lock:
            self._release_scheduled = False
        released = []
        for _ in range(min(len(self._released), RELEASE_SLICE)):
            key = self._released.popleft()
            state = self.futures.get(key)
            if state is None:
                continue
            state.refs -= 1
            if state.refs <= 0:
                del self.futures[key]
                self._replicas.pop(key, None)
                released.append(key)
                self._lineage.forget(key, self.futures.__contains__)
        if released and self._conn is not None and self.status == "running":
            try:
                for start in range(0, len(released), KEYS_SLICE):
                    self._conn.send(m.ReleaseKeys(keys=released[start : start + KEYS_SLICE]))
            except CommClosedError:
                pass
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
    ) -> list[tuple[m.TaskWire, SerializedFunction]]:
        """Pickle each call and name its task; touches no state of the
        client, so any thread may run it (the blocking `Client` runs it in
        the caller's, off the client's loop)."""
        function = dumps_function(fn)
        name = prefix or _function_name(fn)
        fields = options.wire_fields()
        packed = []
        for (args, kwargs), key in zip(calls, keys, strict=True):
            dependencies: dict[str, None] = {}
            call = replace_futures((args, kwargs), _is_future, dependencies)
            used = function
            failure = None
            try:
                payload = dumps(call)
            except SerializationError as exc:
                # Fail the task, not the call: it errs on a worker like any
                # user error, and so does every task that depends on it.
                failure = f"could not serialize the arguments of {name}: {exc}"
                key = key or f"{name}-{self._random_hex()}"
            if key is None:
                if pure:
                    digest = hashlib.blake2b(digest_size=16)
                    digest.update(function.function_id.encode())
                    digest.update(payload.header)
                    for buffer in payload.buffers:
                        digest.update(buffer)
                    key = f"{name}-{digest.hexdigest()}"
                else:
                    key = f"{name}-{self._random_hex()}"
            if failure is None and payload.nbytes > max_value_bytes(self.limits):
                # It could never reach the scheduler: fail the task, naming
                # it and its size (the same way, and for the same reason).
                failure = too_big(f"the arguments of task {key!r}", payload.nbytes, self.limits, verb="are")
            if failure is not None:
                used = dumps_function(raise_serialization_error)
                payload = dumps(((failure,), {}))
            task = m.TaskWire(
                key=key,
                function_id=used.function_id,
                args=payload,
                dependencies=list(dependencies) if dependencies else NO_DEPENDENCIES,
                scattered=False,
                **fields,
            )
            packed.append((task, used))
        return packed

    def _submit_packed(self, packed: list[tuple[m.TaskWire, SerializedFunction]]) -> list[Future]:
        """Futures and lineage for packed tasks, then the tasks on their way
        (in the client's loop; refused like `submit` if they could be
        neither sent nor kept).

        No task goes for a call that depends on a future that has already
        failed for good: its future fails at once, with that failure
        (design.md §1: a dependent of a failed task raises the same error).
        The scheduler would say the same, unless it restarted since: a new
        scheduler knows nothing of a failure, and a failed future's task is
        not resubmitted.
        """
        self._admit(len(packed))
        futures = []
        sent = []
        for task, used in packed:
            future = self._future(task.key)
            futures.append(future)
            failed = next(
                (self.futures[d] for d in task.dependencies if d in self.futures and _failed_for_good(self.futures[d])),
                None,
            )
            if failed is not None:
                if not future._state.done():
                    assert failed.failure is not None
                    future._state.fail(failed.failure)
                continue
            self._lineage.remember(task, used)
            sent.append(task)
        if sent:
            self._send_tasks(sent, [task.key for task in sent])
        return futures

    def _admit(self, n_tasks: int) -> None:
        """Refuse `n_tasks` new tasks now, before any future or lineage
        exists for them, if they could be neither sent nor kept.

        While reconnecting, submitted tasks wait in the lineage and go with
        the resubmission; at most `MAX_QUEUED_WHILE_AWAY` of them, after
        which `submit` raises rather than hold back unbounded work.
        """
        if self.status == "reconnecting":
            if self._queued_while_away + n_tasks > MAX_QUEUED_WHILE_AWAY:
                raise CommClosedError(
                    f"the scheduler at {self.scheduler_address} is unreachable and "
                    f"{self._queued_while_away} tasks are already waiting for it "
                    f"(at most {MAX_QUEUED_WHILE_AWAY})"
                )
        else:
            self._require_connection()

    def _send_tasks(self, tasks: list[m.TaskWire], wanted: list[str]) -> None:
        """Send new tasks (admitted by `_admit`), or, while the scheduler is
        away, keep them in the lineage for the resubmission."""
        if self.status == "reconnecting":
            self._queued_while_away += len(tasks)
            return
        conn = self._require_connection()
        for message in submit_messages(tasks, self._lineage.functions, wanted):
            conn.send(message)

    def _require_connection(self) -> Connection:
        if self._conn is None or self.status != "running":
            raise CommClosedError(f"client {self.id} is {self.status}, not connected to a scheduler")
        return self._conn

    async def _connection(self, timeout: float | None) -> Connection:
        """The scheduler connection, waiting up to `timeout` s for a reconnect."""
        if self.status in ("closing", "closed", "new"):
            return self._require_connection()
        with trio.move_on_after(math.inf if timeout is None else timeout):
            while self._conn is None or self.status != "running":
                await self._connected.wait()
            return self._conn
        raise CommClosedError(
            f"no connection to the scheduler at {self.scheduler_address} within {timeout:g} s"
        )

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
        checked = task_options(**_graph_options(options))
        plan = await trio.to_thread.run_sync(graph_plan, dsk, flatten_keys(keys), _is_future)
        futures = self._submit_plan(plan, checked)
        return await self.gather(shape_like(keys, futures))

    async def compute(self, collections: Any, *, optimize_graph: bool = True, **options: Any) -> Any:
        """Start computing dask collections; return a `Future` for each value.

        A single collection gives a single future, a list a list (items that
        are not dask collections pass through). The value of the future is
        what ``collection.compute()`` returns. Options as in `get`.
        """
        checked = task_options(**_graph_options(options))
        (singleton, items), plan, where = await trio.to_thread.run_sync(
            compute_plan, collections, optimize_graph, _is_future
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
        checked = task_options(**_graph_options(options))
        singleton, plan, rebuild = await trio.to_thread.run_sync(persist_plan, collections, optimize_graph, _is_future)
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
        unknown = [key for key in plan.external if key not in self.futures]
        if unknown:
            raise KeyError(f"the graph refers to {unknown[0]!r}, which is neither in it nor a future of this client")
        self._admit(len(plan.tasks))
        fields = options.wire_fields()
        tasks, handles = [], {}
        for task, payload in plan.pickled:
            wire = m.TaskWire(
                key=task.key,
                function_id=plan.function.function_id,
                args=payload,
                dependencies=list(dict.fromkeys(task.inputs.values())),
                scattered=False,
                **fields,
            )
            handles[task.key] = self._future(task.key)
            self._lineage.remember(wire, plan.function)
            tasks.append(wire)
        self._send_tasks(tasks, list(handles))
        return {dask_key: handles.get(key) or plan.futures.get(key) or self._future(key)
                for dask_key, key in plan.keys.items()}

    # ------------------------------------------------------------ results --

    async def _result(self, future: Future, timeout: float | None) -> Any:
        values = await self._gather_states([future._state], timeout)
        return values[future.key]

    async def _exception(self, future: Future, timeout: float | None) -> BaseException | None:
        with _timeout(timeout):
            await future._state.wait()
        state = future._state
        return None if state.status == FINISHED else state.exception()

    async def gather(self, futures: Any, timeout: float | None = None) -> Any:
        """The values of `futures` (a future, or a list/tuple/dict nesting them).

        Raises the failure of the first failed future, in order.
        """
        found: dict[str, None] = {}
        structure = replace_futures(futures, _is_future, found)
        states = [self.futures[key] for key in found if key in self.futures]
        if len(states) != len(found):
            raise ValueError("gather() was given a future of another (or closed) client")
        values = await self._gather_states(states, timeout)
        return substitute(structure, values)

    async def _gather_states(self, states: list[FutureState], timeout: float | None) -> dict[str, Any]:
        """Wait for every state, then fetch the values straight from workers."""
        values: dict[str, Any] = {}
        with _timeout(timeout):
            todo = states
            while todo:
                for i, state in enumerate(todo):
                    if not state.done():
                        await state.wait()
                    elif i % GATHER_SLICE == GATHER_SLICE - 1:
                        await trio.lowlevel.checkpoint()
                for state in todo:
                    if state.status != FINISHED:
                        raise state.exception()
                todo = await self._fetch(todo, values)
        return values

    async def _fetch(self, states: list[FutureState], values: dict[str, Any]) -> list[FutureState]:
        """Fetch what the holders have; return the states to wait on again."""
        by_worker: dict[str, list[FutureState]] = {}
        failed: dict[str, str | None] = {}  # key -> the holder that failed us
        retry: list[FutureState] = []
        for state in states:
            if state.value is not None:
                values[state.key] = state.value  # came with the report
            elif state.who_has:
                by_worker.setdefault(state.who_has[0], []).append(state)
            else:
                retry.append(state)
                failed[state.key] = None

        unsendable: list[str] = []

        async def fetch_from(worker: str, group: list[FutureState]) -> None:
            data: dict[str, Serialized] = {}
            errors: dict[str, str] = {}
            todo = [s.key for s in group]
            try:
                while todo:
                    later: list[str] = []
                    for start in range(0, len(todo), GET_DATA_SLICE):
                        answer = await self._pool.call(worker, m.GetData(keys=todo[start : start + GET_DATA_SLICE]))
                        data.update(answer.data)
                        errors.update(answer.errors)
                        later.extend(answer.later or ())
                    # Values too big to come with the others: asked for
                    # again (an answer's first value always comes or errs).
                    todo = [key for key in later if key not in data]
            except (CommClosedError, RequestFailed, ProtocolError):
                pass  # what did not come is asked for again below
            for state in group:
                if state.key in errors:
                    unsendable.append(errors[state.key])
                elif state.key in data:
                    values[state.key] = data[state.key]
                else:
                    retry.append(state)
                    failed[state.key] = worker

        async with trio.open_nursery() as nursery:
            for worker, group in by_worker.items():
                nursery.start_soon(fetch_from, worker, group)
        if unsendable:
            raise SerializationError(unsendable[0])
        for i, (key, value) in enumerate(values.items()):
            if isinstance(value, Serialized):
                values[key] = loads(value)
            if i % GATHER_SLICE == GATHER_SLICE - 1:
                await trio.lowlevel.checkpoint()
        if retry:
            await self._refresh_holders(retry, failed)
        return retry

    async def _refresh_holders(self, states: list[FutureState], failed: dict[str, str | None]) -> None:
        """Tell the scheduler which holders failed us and learn the current ones.

        A report can overtake the answer: the reader may handle a
        `key_finished` that came right behind the `who_has` reply before this
        task resumes. So an answer is applied only to states that did not
        change since the question was asked. Waits through a scheduler
        outage (the caller's timeout still applies).
        """
        while True:
            conn = await self._connection(None)
            asked = {state.key: state.version for state in states}
            for state in states:
                holder = failed.get(state.key)
                if holder is not None:
                    conn.send(m.MissingData(key=state.key, holders=[holder]))
            assert self._requests is not None
            keys = list(asked)
            who_has: dict[str, list[str]] = {}
            try:
                for start in range(0, len(keys), KEYS_SLICE):
                    answer = await self._requests.call(m.WhoHas(keys=keys[start : start + KEYS_SLICE]))
                    who_has.update(answer.who_has)
                break
            except CommClosedError:
                continue  # the scheduler went away meanwhile: wait for the next one
        for state in states:
            if state.version != asked[state.key] or state.status != FINISHED:
                continue  # newer news arrived meanwhile
            if state.value is not None:
                continue  # the value itself came meanwhile: no holder needed
            holders = tuple(who_has.get(state.key) or ())
            if holders:
                state.who_has = holders
            else:
                state.lose()  # being recomputed: wait for key_finished

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
        futures = {key: self._future(key) for key in keys}
        for key in keys:
            self._lineage.remember(m.TaskWire(key=key, scattered=True), None)
        with _timeout(timeout):
            for part in _byte_slices(list(payloads.items()), SCATTER_SLICE, max_value_bytes(self.limits)):
                await self._request(m.Scatter(data=dict(part), broadcast=broadcast))
        if isinstance(data, Mapping):
            return {key: futures[key] for key in keys}
        if isinstance(data, (list, tuple)):
            return [futures[key] for key in keys]
        return futures[keys[0]]

    def _fire_and_forget(self, keys: list[str]) -> None:
        """Tell the scheduler to compute `keys` even once no client holds them."""
        if self._conn is None:
            return  # (reconnecting: the resubmission carries only held keys)
        for start in range(0, len(keys), KEYS_SLICE):
            try:
                self._conn.send(m.FireAndForget(keys=keys[start : start + KEYS_SLICE]))
            except CommClosedError:
                return

    async def cancel(self, futures: Any, reason: str = "cancelled by the client") -> None:
        """Cancel the tasks of `futures` and every dependent this client holds.

        Their futures raise `trioflow.CancelledError`. Other clients'
        futures for the same keys are not affected.
        """
        keys = [k for k in future_keys(futures) if k in self.futures]
        failure = Cancelled(reason)
        for i, key in enumerate(keys):
            state = self.futures.get(key)
            if state is not None and not state.done():
                state.fail(failure)
            if i % CANCEL_SLICE == CANCEL_SLICE - 1:
                await trio.lowlevel.checkpoint()
        if keys and self._conn is not None:
            # (While reconnecting there is nothing to send: cancelled keys are
            # left out of the resubmission.)
            reason = clip_text(reason, m.MAX_REASON_CHARS)
            for start in range(0, len(keys), KEYS_SLICE):
                self._conn.send(m.CancelKeys(keys=keys[start : start + KEYS_SLICE], reason=reason))

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
        if isinstance(workers, str):
            workers = [workers]
        restrict = None if workers is None else [str(w) for w in workers]
        payload = dumps(functools.partial(function, *args, **kwargs) if args or kwargs else function)
        answer = await self._request(m.RunEverywhere(function=payload, workers=restrict))
        results = {}
        for address, outcome in sorted(answer.results.items()):
            if outcome.result is not None:
                results[address] = loads(outcome.result)
            elif outcome.failure is not None:
                raise failure_to_exception(failure_from_wire(outcome.failure))
            else:
                raise CommClosedError(f"worker {address}: {outcome.error}")
        return results

    async def run_on_scheduler(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``function(*args, **kwargs)`` in the scheduler's process; return its result.

        It runs in a thread of the scheduler's process. A function with a
        ``dask_scheduler`` parameter gets the `Scheduler` object, as in dask:
        read it, do not change it (only the scheduler's driver task may).

        Raises:
            Exception: what the function raised.
        """
        payload = dumps(functools.partial(function, *args, **kwargs) if args or kwargs else function)
        answer = await self._request(m.RunOnScheduler(function=payload))
        if answer.failure is not None:
            raise failure_to_exception(failure_from_wire(answer.failure))
        return loads(answer.result)

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
        filename = os.path.basename(path)
        if not m.is_upload_name(filename):
            raise ValueError(
                f"upload_file takes a .py, .zip or .egg file with a plain name (letters, digits, '_', '-', '.'), "
                f"got {filename!r}"
            )
        size = os.path.getsize(path)
        if size > m.MAX_UPLOAD_BYTES:
            raise ValueError(f"{filename} has {size} bytes; upload_file takes at most {m.MAX_UPLOAD_BYTES}")
        data = await trio.Path(path).read_bytes()
        answer = await self._request(m.UploadFile(filename=filename, data=dumps(data)))
        failed = {address: why for address, why in sorted(answer.results.items()) if why}
        if failed:
            address, why = next(iter(failed.items()))
            raise RuntimeError(f"{len(failed)} workers could not store {filename}; {address}: {why}")

    async def replicate(self, futures: Any, n: int = 2) -> None:
        """Keep `n` copies of each future's value, on different workers.

        Returns once the copies exist (or every worker has one). The
        scheduler restores the count when a holder dies, so data without
        lineage (scattered) survives losing a worker. The request outlives
        a scheduler restart: the client asks the new scheduler again, right
        after resubmitting its lineage. ``n=1`` ends it.
        """
        found: dict[str, None] = {}
        replace_futures(futures, _is_future, found)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= m.MAX_WORKERS:
            raise ValueError(f"n must be an int between 1 and {m.MAX_WORKERS}, got {n!r}")
        for key in found:
            if key in self.futures:
                # Remembered for the next scheduler should this one die.
                if n > 1:
                    self._replicas[key] = n
                else:
                    self._replicas.pop(key, None)
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
            replace_futures(futures, _is_future, found)
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
        info = (await self._request(m.GetSchedulerInfo())).info
        return {
            "address": info.address,
            "workers": {address: dict(w.__dict__) for address, w in info.workers.items()},
            "tasks": info.tasks,
            "clients": info.clients,
            "dashboard": info.dashboard,
        }

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
        for name, value in (("start", start), ("stop", stop)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= m.MAX_TIMESTAMP_S
            ):
                raise ValueError(f"{name} must be seconds since the epoch (like time.time()), got {value!r}")
        if count is not None and (
            isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= m.MAX_STREAM_COUNT
        ):
            raise ValueError(f"count must be an int between 0 and {m.MAX_STREAM_COUNT}, got {count!r}")
        runs: list[m.TaskRun] = []
        after, until = 0, None
        while True:
            # The first page fixes the newest run (`until`); later pages
            # continue after the last run received, up to it.
            page = await self._request(
                m.GetTaskStream(start=start, stop=stop, count=count if until is None else None, after=after, until=until)
            )
            runs.extend(page.runs)
            if not page.more or not page.runs:
                return [_task_run_dict(run) for run in runs]
            after, until = page.runs[-1].seq, page.until

    async def get_cluster_metrics(self, events_after: int = 0) -> dict[str, Any]:
        """The scheduler's counters, its tasks by state, its worker count and recent cluster events.

        ``counters`` are the `trioflow.recorder.COUNTERS` (runs, bytes,
        worker deaths, KilledWorker, LostData, recomputations, restarts...)
        plus the sums and counts of the task-duration and event-loop-lag
        histograms. ``events`` are dicts (``seq``, ``time``, ``kind``,
        ``text``, ``worker``, ``count``) numbered after `events_after`.
        """
        reply = await self._request(m.GetClusterMetrics(events_after=events_after))
        return {
            "counters": dict(reply.counters),
            "tasks": dict(reply.tasks),
            "workers": reply.workers,
            "events": [dict(event.__dict__) for event in reply.events],
        }

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
        if _is_future(obj):
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
            raise TimeoutError(f"not done within {self.seconds:g} s")
        return handled


def _failed_for_good(state: FutureState) -> bool:
    """Whether the key failed with a failure of the cluster (not pending, not
    recomputing, not a connection of this client's that gave up)."""
    return state.done() and state.status != FINISHED and state.failure is not None


def submit_messages(tasks: list[m.TaskWire], functions: Mapping[str, Serialized], wanted: Iterable[str]):
    """`submit` messages for `tasks`, at most `SUBMIT_SLICE` tasks and
    `SUBMIT_BYTES` of arguments each (a task with bigger ones goes alone).

    The scheduler handles one message at a time, so slices keep each of
    those steps short. A wanted key travels with its own task (the
    scheduler ignores wants of keys it has not seen yet). Each message
    carries the functions its tasks call (the scheduler keeps a function
    only while tasks refer to it, so it cannot be sent once for all time).
    """
    wanted_keys = set(wanted)
    sized = [(t, 0 if t.args is None else t.args.nbytes) for t in tasks]
    for part in _byte_slices(sized, SUBMIT_SLICE, SUBMIT_BYTES) if tasks else [[]]:
        part_tasks = [t for t, _ in part]
        used = {t.function_id: functions[t.function_id] for t in part_tasks if t.function_id in functions}
        yield m.Submit(tasks=part_tasks, functions=used, wanted=[t.key for t in part_tasks if t.key in wanted_keys])


def _byte_slices(items: list[tuple[Any, Any]], most: int, max_bytes: int) -> Iterable[list[tuple[Any, Any]]]:
    """`items` ``(thing, size or Serialized)`` in slices of at most `most`
    things and `max_bytes` bytes (a bigger thing goes alone)."""
    part: list[tuple[Any, Any]] = []
    size = 0
    for item in items:
        n = item[1] if isinstance(item[1], int) else item[1].nbytes
        if part and (len(part) >= most or size + n > max_bytes):
            yield part
            part, size = [], 0
        part.append(item)
        size += n
    if part:
        yield part


def future_keys(obj: Any) -> dict[str, None]:
    """The keys of the futures in `obj` (a future, or lists, tuples, sets and
    dict values holding them), in order, without copying `obj` the way
    `replace_futures` does (cancelling 100,000 futures made as many
    `TaskRef`s to throw away)."""
    found: dict[str, None] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if type(item) is Future:
            found[item.key] = None
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        elif isinstance(item, (set, frozenset)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(reversed(item.values()))
    return found


def map_calls(
    fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], key: Any, kwargs: dict[str, Any]
) -> tuple[list[tuple[tuple, dict]], list[str | None], str | None]:
    """`map`'s calls, their keys (None: to be named) and the key prefix.

    Raises:
        TypeError: `fn` is not callable.
        ValueError: a list of keys whose length is not the number of calls.
    """
    if not callable(fn):
        raise TypeError(f"map() expects a callable, got {type(fn).__name__}")
    calls = [(args, kwargs) for args in zip(*iterables, strict=False)]
    if isinstance(key, list):
        if len(key) != len(calls):
            raise ValueError(f"map() got {len(key)} keys for {len(calls)} calls")
        return calls, list(key), None
    return calls, [None] * len(calls), key if isinstance(key, str) else None


def _task_run_dict(run: m.TaskRun) -> dict[str, Any]:
    """One run of the task stream as `get_task_stream` returns it (dask's shape, plus ``name``)."""
    out: dict[str, Any] = {
        "key": run.key,
        "name": key_name(run.key),
        "worker": run.worker,
        "status": run.status,
        "startstops": ({"action": "compute", "start": run.start, "stop": run.stop},),
    }
    if run.nbytes is not None:
        out["nbytes"] = run.nbytes
    if run.error is not None:
        out["error"] = run.error
    return out


def _graph_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options of `get`/`compute`/`persist`, refusing unknown ones by name.

    (dask passes the keywords of ``dask.compute`` on to the scheduler; a
    graph has no function to give them to, so an unknown one is a mistake.)
    """
    known = {"retries", "workers", "allow_other_workers", "resources", "priority"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return options


def _function_name(fn: Any) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "lambda" if name == "<lambda>" else name
