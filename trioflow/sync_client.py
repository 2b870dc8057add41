"""`Client`: the blocking client, for ordinary Python code.

It runs an `AsyncClient` in a background Trio thread (`LoopThread`) and
forwards each call there: the work and the state live in that one thread,
the caller waits. ``Client()`` with no address first starts a
`LocalCluster` and closes it again with the client.

The bridge between the two is `BlockingPortal`, which the `AsyncClient`
calls through whenever a `Future` (or `wait`, `as_completed`) needs its
client: with a portal the call crosses into the loop thread and blocks
until it is done, without one it returns an awaitable. The one call that
does not wait is `submit` (a loop of them would wait 8,000 times for a
thread busy elsewhere): the async client queues its task from the
caller's thread and takes it in at its next step (`_submit_from_thread`).
"""

from __future__ import annotations

import functools
import queue
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from trioflow.client import AsyncClient
from trioflow.comm.auth import Credentials
from trioflow.cluster import LocalCluster
from trioflow.config import Config
from trioflow.fetching import unpickled
from trioflow.future import Future, ValueReport, not_done_within
from trioflow.graph import compute_plan, flatten_keys, graph_plan, persist_plan, shape_like
from trioflow.loop_thread import LoopThread
from trioflow.packing import graph_options, is_future, map_calls
from trioflow.task_options import task_options

# The client opened last and not yet closed: what `trioflow.performance_report`
# reports on when it is not given one (dask calls it the default client).
_latest: weakref.ref[Client] | None = None


def default_client() -> Client:
    """The `Client` opened last and still open.

    Raises:
        ValueError: no client is open.
    """
    client = _latest() if _latest is not None else None
    if client is None or client.status in ("closed", "closing"):
        raise ValueError("no trioflow.Client is open: create one first, or pass client=")
    return client


class BlockingPortal:
    """How a blocking `Client`'s `AsyncClient` is called: from other threads.

    `call` runs a coroutine function in the client's loop thread and blocks
    the caller until it returns (its exception is raised in the caller);
    `call_soon` runs a plain function there, also blocking until done.
    Neither may be called from the loop thread itself (trio refuses: that
    would wait on itself forever).
    """

    blocking = True

    def __init__(self, loop: LoopThread):
        self._loop = loop

    def call(self, async_fn: Callable[..., Any], *args: Any) -> Any:
        return self._loop.run(async_fn, *args)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self._loop.run_sync(fn, *args)

    def result(self, client: AsyncClient, future: Future, timeout: float | None) -> Any:
        """`Future.result`: wait here for the loop's report that the future
        is done, and take a value that came with it.

        The general `call` would run `client._result` as a task of the
        loop, which the report of completion wakes; the loop hands the
        value back a few steps later, when that task has run and ended.
        Here the report's handler itself hands it over (`ValueReport`), and
        the value is unpickled in this thread. A failure, or a value held
        by a worker, takes the general path once the future is done, with
        what is left of `timeout`.
        """
        if self._loop.in_loop_thread():
            # (A done callback, say.) Waiting here would wait for this very
            # thread forever: the general path refuses, with Trio's error.
            return self.call(client._result, future, timeout)
        answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        report = ValueReport(future, answers, timeout)
        try:
            self._loop.call_soon(client._report_when_done, report)
        except RuntimeError:
            return self.call(client._result, future, timeout)  # the loop ended: it says why
        # Without a timeout, the one answer comes when the future is done;
        # with one, the loop answers at once: done, or PENDING.
        answer = answers.get()
        if answer is ValueReport.PENDING:
            assert timeout is not None
            try:
                answer = answers.get(timeout=max(timeout, 0.0))
            except queue.Empty:
                try:
                    self._loop.call_soon(client._forget_report, report)
                except RuntimeError:
                    pass  # the loop ended, and the report with it
                raise not_done_within(timeout) from None
        taken, value = answer
        if not taken:
            return self.call(client._result_by, future, report.deadline)
        return unpickled(value)


# Calls `Client.map` pickles in the caller's thread before handing them to
# the client's loop (whose step for a slice is then a few tens of ms).
MAP_SLICE = 5_000


class Client:
    """Connect to a trioflow scheduler (or start a local cluster) and submit work.

    Args:
        address: ``"tcp://host:port"``, a cluster object, or None to start a
            `LocalCluster` owned by this client.
        n_workers, threads_per_worker, processes: for that local cluster.
        config: tunables; defaults plus ``TRIOFLOW_*`` variables if omitted.
        credentials: what the client proves (see `AsyncClient`); a local
            cluster's own are used when it is given or started here.
    """

    def __init__(
        self,
        address: Any = None,
        *,
        n_workers: int | None = None,
        threads_per_worker: int = 1,
        processes: bool = True,
        config: Config | None = None,
        credentials: Credentials | None = None,
    ):
        self.cluster: LocalCluster | None = None
        if address is None:
            self.cluster = LocalCluster(
                n_workers, threads_per_worker, processes=processes, config=config
            )
            address = self.cluster
        # A loop of the client's own, never the cluster's: whatever the
        # client does in its thread (packing a million tasks, dropping as
        # many futures) must not delay the scheduler's answers to its
        # workers (design.md §6 rule 6). It costs a thread hop between
        # client and scheduler on every message (W2: benchmarks/README.md).
        try:
            self._client = AsyncClient(address, config=config, credentials=credentials)
        except BaseException:
            if self.cluster is not None:
                self.cluster.close()
            raise
        self._loop = LoopThread("trioflow-client", batch=self._client.config.batch_threads)
        self._client._portal = BlockingPortal(self._loop)
        try:
            self._loop.start(self._client._run)
        except BaseException:
            self._loop.stop()
            if self.cluster is not None:
                self.cluster.close()
            raise
        global _latest
        _latest = weakref.ref(self)

    @property
    def id(self) -> str:
        return self._client.id

    @property
    def scheduler_address(self) -> str:
        return self._client.scheduler_address

    @property
    def status(self) -> str:
        return self._client.status

    def _run(self, async_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self._loop.run(functools.partial(async_fn, *args, **kwargs))

    # -- submitting ---------------------------------------------------------

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        key: str | None = None,
        pure: bool = True,
        retries: int = 0,
        workers: Any = None,
        allow_other_workers: bool = False,
        resources: Any = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> Future:
        """See `AsyncClient.submit`.

        The call is pickled in this thread and handed to the client's loop
        without waiting for it (`AsyncClient._submit_from_thread`), unless
        the client is not running: then the loop is asked, and refuses.
        """
        if not callable(fn):
            raise TypeError(f"submit() expects a callable, got {type(fn).__name__}")
        options = task_options(retries, workers, allow_other_workers, resources, priority)
        packed = self._client._pack(fn, [(args, kwargs)], [key], pure, options)
        futures = self._client._submit_from_thread(packed)
        if futures is None:
            futures = self._loop.run_sync(self._client._submit_packed, packed)
        return futures[0]

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        key: Any = None,
        pure: bool = True,
        retries: int = 0,
        workers: Any = None,
        allow_other_workers: bool = False,
        resources: Any = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> list[Future]:
        """See `AsyncClient.map`.

        The calls are pickled here, in the caller's thread, `MAP_SLICE` at a
        time; the client's loop makes each slice's futures and sends its
        tasks, a short step per slice, so that neither the client's loop
        nor (with a `LocalCluster`) the scheduler's waits on a big map.
        """
        calls, keys, prefix = map_calls(fn, tuple(list(it) for it in iterables), key, kwargs)
        options = task_options(retries, workers, allow_other_workers, resources, priority)
        self._loop.run_sync(self._client._admit, len(calls))
        futures: list[Future] = []
        for start in range(0, len(calls), MAP_SLICE):
            packed = self._client._pack(
                fn, calls[start : start + MAP_SLICE], keys[start : start + MAP_SLICE], pure, options, prefix
            )
            futures.extend(self._loop.run_sync(self._client._submit_packed, packed))
        return futures

    # Dask graphs: converted, ordered and pickled here, in the caller's
    # thread, never on the Trio thread (which a LocalCluster's scheduler
    # may share); only the submission and the waiting happen there.

    asynchronous = False  # what dask asks of a client given as scheduler=

    def get(self, dsk: Any, keys: Any, **options: Any) -> Any:
        """Compute a dask graph; see `AsyncClient.get`.

        ``dask.compute(x, scheduler=client.get)`` and
        ``dask.config.set(scheduler=client.get)`` call this.
        """
        checked = task_options(**graph_options(options))
        plan = graph_plan(dsk, flatten_keys(keys), is_future)
        futures = self._loop.run_sync(self._client._submit_plan, plan, checked)
        return self.gather(shape_like(keys, futures))

    def compute(self, collections: Any, *, optimize_graph: bool = True, sync: bool = False, **options: Any) -> Any:
        """Futures for the values of dask collections; see `AsyncClient.compute`.

        With ``sync=True``, the values themselves (as dask.distributed).
        """
        checked = task_options(**graph_options(options))
        (singleton, items), plan, where = compute_plan(collections, optimize_graph, is_future)
        futures = self._loop.run_sync(self._client._submit_plan, plan, checked)
        out = [futures[where[i]] if i in where else item for i, item in enumerate(items)]
        if sync:
            out = self.gather(out)
        return out[0] if singleton else out

    def persist(self, collections: Any, *, optimize_graph: bool = True, **options: Any) -> Any:
        """Dask collections backed by futures on the cluster; see `AsyncClient.persist`.

        ``dask.persist(x, scheduler=client.get)`` calls this (with a list).
        """
        checked = task_options(**graph_options(options))
        singleton, plan, rebuild = persist_plan(collections, optimize_graph, is_future)
        futures = self._loop.run_sync(self._client._submit_plan, plan, checked)
        out = rebuild(futures)
        return out[0] if singleton else out

    # -- results ------------------------------------------------------------

    def gather(self, futures: Any, timeout: float | None = None) -> Any:
        return self._run(self._client.gather, futures, timeout)

    def scatter(self, data: Any, broadcast: bool = False, timeout: float | None = None) -> Any:
        return self._run(self._client.scatter, data, broadcast, timeout)

    def cancel(self, futures: Any, reason: str = "cancelled by the client") -> None:
        return self._run(self._client.cancel, futures, reason)

    def run(self, function: Callable[..., Any], *args: Any, workers: Any = None, **kwargs: Any) -> dict[str, Any]:
        """See `AsyncClient.run`."""
        return self._run(self._client.run, function, *args, workers=workers, **kwargs)

    def run_on_scheduler(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """See `AsyncClient.run_on_scheduler`."""
        return self._run(self._client.run_on_scheduler, function, *args, **kwargs)

    def upload_file(self, path: str) -> None:
        """See `AsyncClient.upload_file`."""
        return self._run(self._client.upload_file, path)

    def replicate(self, futures: Any, n: int = 2) -> None:
        return self._run(self._client.replicate, futures, n)

    def restart(self, timeout: float | None = None) -> None:
        return self._run(self._client.restart, timeout)

    # -- the cluster ----------------------------------------------------------

    def who_has(self, futures: Any = None) -> dict[str, list[str]]:
        return self._run(self._client.who_has, futures)

    def has_what(self) -> dict[str, list[str]]:
        return self._run(self._client.has_what)

    def nthreads(self) -> dict[str, int]:
        return self._run(self._client.nthreads)

    def scheduler_info(self) -> dict[str, Any]:
        return self._run(self._client.scheduler_info)

    def wait_for_workers(self, n: int, timeout: float | None = None) -> None:
        return self._run(self._client.wait_for_workers, n, timeout)

    # -- watching it ------------------------------------------------------------

    def get_task_stream(
        self, start: float | None = None, stop: float | None = None, count: int | None = None
    ) -> list[dict[str, Any]]:
        """See `AsyncClient.get_task_stream`."""
        return self._run(self._client.get_task_stream, start, stop, count)

    def get_cluster_metrics(self, events_after: int = 0) -> dict[str, Any]:
        """See `AsyncClient.get_cluster_metrics`."""
        return self._run(self._client.get_cluster_metrics, events_after)

    @property
    def dashboard_link(self) -> str | None:
        """The scheduler's dashboard (``http://127.0.0.1:8787/``), or None if it serves none."""
        return self.scheduler_info()["dashboard"]

    # -- lifetime ---------------------------------------------------------------

    def close(self) -> None:
        """Release every future, disconnect, and stop an owned local cluster."""
        if self._loop.alive:
            try:
                self._loop.run(self._client.close_and_wait)
            finally:
                self._loop.stop()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self.id} {self.scheduler_address} {self.status}>"
