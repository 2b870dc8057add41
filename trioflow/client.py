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
import hashlib
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
    flatten_keys,
    graph_key,
    graph_nodes,
    needed_in_order,
    run_graph_node,
)
from trioflow.lineage import Lineage
from trioflow.nurseries import background_tasks
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
# Graph nodes `get` submits between two yields.
GRAPH_SLICE = 1_000
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
        wanted = [k for k, st in self.futures.items() if not st.done() or st.status == FINISHED]
        self._queued_while_away = 0
        for message in submit_messages(self._lineage.messages(), self._lineage.functions, wanted):
            self._conn.send(message)

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
        **kwargs: Any,
    ) -> Future:
        """Run ``fn(*args, **kwargs)`` on the cluster; return its `Future`.

        Futures inside `args`/`kwargs` (also inside lists, tuples, dicts and
        sets) become dependencies: the task runs after them, with their values.

        Args:
            key: the task's name; by default derived from `fn` and the
                arguments (``pure=True``) or random (``pure=False``).
            pure: whether equal calls may share one key (and one result).
            retries: how many times to rerun the task if `fn` raises.
            workers: worker address(es) allowed to run it.
        """
        if not callable(fn):
            raise TypeError(f"submit() expects a callable, got {type(fn).__name__}")
        self._admit(1)
        [future] = self._submit_packed(self._pack(fn, [(args, kwargs)], [key], pure, retries, workers))
        return future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        key: str | list[str] | None = None,
        pure: bool = True,
        retries: int = 0,
        workers: str | Iterable[str] | None = None,
        **kwargs: Any,
    ) -> list[Future]:
        """`submit` `fn` once per element of the zipped `iterables`.

        `key` may be a list of keys, or a prefix for generated ones. Here
        every call is pickled in the caller's loop, in one go; the blocking
        `Client.map` pickles in the caller's thread instead, and hands this
        loop the futures to make in slices (`map_calls`, `_pack`,
        `_submit_packed`).
        """
        calls, keys, prefix = map_calls(fn, iterables, key, kwargs)
        self._admit(len(calls))
        return self._submit_packed(self._pack(fn, calls, keys, pure, retries, workers, prefix=prefix))

    def _pack(
        self,
        fn: Callable[..., Any],
        calls: list[tuple[tuple, dict]],
        keys: list[str | None],
        pure: bool,
        retries: int,
        workers: str | Iterable[str] | None,
        prefix: str | None = None,
    ) -> list[tuple[m.TaskWire, SerializedFunction]]:
        """Pickle each call and name its task; touches no state of the
        client, so any thread may run it (the blocking `Client` runs it in
        the caller's, off the client's loop)."""
        if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= m.MAX_RETRIES:
            raise ValueError(f"retries must be an int between 0 and {m.MAX_RETRIES}, got {retries!r}")
        if isinstance(workers, str):
            workers = [workers]
        restrictions = None if workers is None else [str(w) for w in workers]
        function = dumps_function(fn)
        name = prefix or _function_name(fn)
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
                retries=retries,
                workers=restrictions,
                scattered=False,
            )
            packed.append((task, used))
        return packed

    def _submit_packed(self, packed: list[tuple[m.TaskWire, SerializedFunction]]) -> list[Future]:
        """Futures and lineage for packed tasks, then the tasks on their way
        (in the client's loop; refused like `submit` if they could be
        neither sent nor kept)."""
        self._admit(len(packed))
        futures = []
        for task, used in packed:
            futures.append(self._future(task.key))
            self._lineage.remember(task, used)
        self._send_tasks([task for task, _ in packed], [f.key for f in futures])
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

    async def get(self, dsk: Mapping, keys: Any, *, retries: int = 0, workers: Any = None) -> Any:
        """Compute the dask-style graph `dsk` and return the values of `keys`.

        `keys` is a key or a (nested) list of keys, as dask passes them, so
        ``dask.compute(x, scheduler=client.get)`` works (with `Client`).
        """
        # Converting and ordering a big graph (a dataframe's) takes seconds:
        # in a thread, off this loop.
        nodes, order = await trio.to_thread.run_sync(_graph_plan, dsk, keys)
        futures: dict[Any, Future] = {}
        for i, key in enumerate(order):
            inputs = {dep: futures[dep] for dep in nodes[key].dependencies}
            futures[key] = self.submit(
                run_graph_node, nodes[key], inputs, key=graph_key(key), retries=retries, workers=workers
            )
            if i % GRAPH_SLICE == GRAPH_SLICE - 1:
                await trio.lowlevel.checkpoint()

        def shape(k: Any) -> Any:
            return [shape(sub) for sub in k] if isinstance(k, list) else futures[k]

        return await self.gather(shape(keys))

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

    async def run(self, function: Callable[[], Any]) -> dict[str, Any]:
        """Call ``function()`` on every worker; return ``{worker_address: result}``.

        Raises:
            Exception: the first exception a worker's call raised.
        """
        answer = await self._request(m.RunEverywhere(function=dumps(function)))
        results = {}
        for address, outcome in sorted(answer.results.items()):
            if outcome.result is not None:
                results[address] = loads(outcome.result)
            elif outcome.failure is not None:
                raise failure_to_exception(failure_from_wire(outcome.failure))
            else:
                raise CommClosedError(f"worker {address}: {outcome.error}")
        return results

    async def replicate(self, futures: Any, n: int = 2) -> None:
        """Keep `n` copies of each future's value, on different workers.

        Returns once the copies exist (or every worker has one). The
        scheduler restores the count when a holder dies, so data without
        lineage (scattered) survives losing a worker.
        """
        found: dict[str, None] = {}
        replace_futures(futures, _is_future, found)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= m.MAX_WORKERS:
            raise ValueError(f"n must be an int between 1 and {m.MAX_WORKERS}, got {n!r}")
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
        }

    async def wait_for_workers(self, n: int, timeout: float | None = None) -> None:
        """Return once at least `n` workers are connected."""
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= m.MAX_WORKERS:
            raise ValueError(f"n must be an int between 1 and {m.MAX_WORKERS}, got {n!r}")
        with _timeout(timeout):
            await self._request(m.WaitForWorkers(n=n))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.scheduler_address} {self.status}>"


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


def _graph_plan(dsk: Mapping, keys: Any) -> tuple[dict, list]:
    """A graph's nodes and the keys `keys` need, inputs first."""
    nodes = graph_nodes(dsk)
    return nodes, needed_in_order(nodes, flatten_keys(keys))


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


def _function_name(fn: Any) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "lambda" if name == "<lambda>" else name
