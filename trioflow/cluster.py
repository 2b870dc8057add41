"""Local clusters: a scheduler plus workers on this machine, in one call.

`AsyncLocalCluster` is the Trio-native form (``async with``); `LocalCluster`
runs one in a background thread for ordinary code, which is what
``Client()`` with no address does.

Worker processes are real subprocesses started with ``python -m trioflow
worker``; the cluster ends them (SIGTERM, then SIGKILL after a grace
period) when it closes, even if it is cancelled. If this process dies
abruptly they still go: each loses its scheduler connection and exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import urllib.parse
from typing import Any

import trio

from trioflow.comm.auth import TOKEN_VARIABLE, Credentials, child_environment
from trioflow.config import Config
from trioflow.loop_thread import LoopThread
from trioflow.nanny import Nanny, ProcessLauncher
from trioflow.nurseries import background_tasks, side_by_side
from trioflow.scheduler import Scheduler
from trioflow.task_options import check_resources, resources_flag
from trioflow.worker import Worker

logger = logging.getLogger("trioflow.cluster")

TERMINATE_GRACE_S = 5.0
STARTUP_TIMEOUT_S = 60.0


def local_cluster_credentials(config: Config) -> Credentials:
    """A local cluster's default credentials (see `AsyncLocalCluster`)."""
    if not config.auth:
        return Credentials.none()
    token = os.environ.get(TOKEN_VARIABLE)
    if token:
        credentials = Credentials.from_token(token, source=TOKEN_VARIABLE)
        if credentials.is_cluster:
            return credentials
    return Credentials.generate()


def default_n_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class WorkerProcess:
    """A worker subprocess of a local cluster."""

    def __init__(self, name: int, command: list[str]):
        self.name = name
        self.command = command
        self.process: trio.Process | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.name} pid={self.pid}>"


class AsyncLocalCluster:
    """A scheduler and `n_workers` workers, for the lifetime of an ``async with``.

    Args:
        n_workers: how many workers (default: CPU count, at most 4).
        threads_per_worker: threads per worker.
        processes: workers as subprocesses (True) or as Trio tasks in this
            process (False: quick to start, handy in tests and notebooks).
        nanny: supervise each worker process with a `Nanny` (running here,
            in this process), which restarts it when it dies and makes
            `Client.restart()` possible. Only with processes=True.
        memory_limit: bytes of resident memory after which a nanny kills
            and restarts its worker (None: no limit).
        host: interface every server binds; loopback by default.
        scheduler_port: the scheduler's port, 0 for any free one.
        config: tunables for the scheduler and workers.
        worker_log_level: log level of worker subprocesses.
        credentials: the cluster's credentials; by default the cluster
            token in ``TRIOFLOW_TOKEN`` if one is set (so that other
            processes can join), else new ones made for this cluster alone
            (none with ``Config(auth=False)``). Its workers get them in
            their environment, a `Client` of it gets the client part.
        dashboard_port: serve the scheduler's dashboard on this port (0:
            any free one; see `dashboard_link`); overrides
            `Config.dashboard_port`. Needs ``trioflow[dashboard]``.
        resources: what each worker offers to tasks that ask for resources
            (``{"GPU": 1}``).
    """

    def __init__(
        self,
        n_workers: int | None = None,
        threads_per_worker: int = 1,
        *,
        processes: bool = True,
        nanny: bool = True,
        memory_limit: int | None = None,
        host: str = "127.0.0.1",
        scheduler_port: int = 0,
        config: Config | None = None,
        worker_log_level: str = "warning",
        credentials: Credentials | None = None,
        dashboard_port: int | None = None,
        resources: dict[str, float] | None = None,
    ):
        self.resources = check_resources(resources, "LocalCluster(resources=...)") or {}
        self.nanny = nanny and processes
        self.memory_limit = memory_limit
        self.n_workers = default_n_workers() if n_workers is None else n_workers
        if self.n_workers < 0:
            raise ValueError(f"n_workers must be >= 0, got {n_workers}")
        if threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be >= 1, got {threads_per_worker}")
        self.threads_per_worker = threads_per_worker
        self.processes = processes
        self.host = host
        self.config = config or Config.from_env()
        if dashboard_port is not None:
            self.config = self.config.replace(dashboard_port=dashboard_port)
        self.worker_log_level = worker_log_level
        if credentials is None:
            credentials = local_cluster_credentials(self.config)
        self.credentials = credentials
        self.scheduler = Scheduler(host=host, port=scheduler_port, config=self.config, credentials=credentials)
        self.scheduler_address: str | None = None
        self.workers: dict[int, Any] = {}
        self._nursery: trio.Nursery | None = None
        self._stack = None

    @property
    def dashboard_link(self) -> str | None:
        """The dashboard's URL (``http://127.0.0.1:8787/``) once it serves, else None.

        With authentication on, the link carries the client token
        (``?token=...``): open it as it is.
        """
        address = self.scheduler.dashboard_address
        if address is None or not self.credentials.enabled or self.config.dashboard_token:
            return address
        return f"{address}?token={urllib.parse.quote(self.credentials.client_token())}"

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Start everything; report the scheduler address once every worker
        has registered; run until cancelled, then stop the workers.

        Raises:
            RuntimeError: a worker process exited or did not register in time.
        """
        # The scheduler outlives the workers: its scope is shielded from our
        # cancellation and cancelled by hand once every worker has stopped,
        # so no worker sees its scheduler vanish during a clean shutdown.
        scheduler_scope = trio.CancelScope(shield=True)

        async def run_scheduler(*, task_status: trio.TaskStatus[str]) -> None:
            with scheduler_scope:
                await self.scheduler.serve(task_status=task_status)

        async with background_tasks() as nursery:
            self._nursery = nursery
            self.scheduler_address = await nursery.start(run_scheduler)
            try:
                # Side by side: each start forks a process, a few ms apiece,
                # and the cluster is up only when its last worker is (W9).
                async with side_by_side() as starting:
                    for _ in range(self.n_workers):
                        starting.start_soon(self.add_worker)
                try:
                    with trio.fail_after(STARTUP_TIMEOUT_S):
                        await self.scheduler.wait_for_workers(self.n_workers)
                except trio.TooSlowError:
                    raise RuntimeError(
                        f"only {len(self.scheduler.state.worker_addresses())} of {self.n_workers} workers "
                        f"registered within {STARTUP_TIMEOUT_S:g} s"
                    ) from None
                task_status.started(self.scheduler_address)
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await self._stop_workers()
                scheduler_scope.cancel(reason="the cluster is closing")

    async def _stop_workers(self) -> None:
        """Stop every worker: SIGTERM to processes, cancellation to in-process ones."""
        async with trio.open_nursery() as nursery:
            for handle in self.workers.values():
                if isinstance(handle, WorkerProcess):
                    if handle.process is not None:
                        nursery.start_soon(terminate, handle.process)
                else:  # a Nanny (terminates its process) or an in-process Worker
                    nursery.start_soon(handle.close)

    async def add_worker(self) -> Any:
        """Start one more worker (it registers with the scheduler on its own)."""
        assert self._nursery is not None and self.scheduler_address is not None
        name = len(self.workers)  # taken before any await: starts side by side get distinct names
        if self.nanny:
            launcher = ProcessLauncher(
                self.scheduler_address,
                ["--nthreads", str(self.threads_per_worker), "--host", self.host, "--log-level", self.worker_log_level,
                 *resources_flag(self.resources)],
                env={**os.environ, **self.config.to_env()},
                credentials=self.credentials,
            )
            nanny = Nanny(
                launcher, host=self.host, memory_limit=self.memory_limit, config=self.config,
                credentials=self.credentials,
            )
            self.workers[name] = nanny
            await self._nursery.start(nanny.serve)
            return nanny
        if self.processes:
            command = [
                sys.executable,
                "-m",
                "trioflow",
                "worker",
                self.scheduler_address,
                "--no-nanny",
                "--nthreads",
                str(self.threads_per_worker),
                "--host",
                self.host,
                "--log-level",
                self.worker_log_level,
                *resources_flag(self.resources),
            ]
            handle = WorkerProcess(name, command)
            self.workers[name] = handle
            await self._nursery.start(self._supervise, handle)
            return handle
        worker = Worker(
            self.scheduler_address, nthreads=self.threads_per_worker, host=self.host, config=self.config,
            credentials=self.credentials,
            resources=self.resources,
        )
        self.workers[name] = worker
        await self._nursery.start(worker.serve)
        return worker

    async def _supervise(self, handle: WorkerProcess, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run one worker process; end it when cancelled (no orphans)."""
        env = {**os.environ, **self.config.to_env(), **child_environment(self.credentials)}
        handle.process = await trio.lowlevel.open_process(
            handle.command, stdin=subprocess.DEVNULL, env=env
        )
        task_status.started()
        try:
            code = await handle.process.wait()
            logger.warning("worker process %d (pid %d) exited with code %s", handle.name, handle.pid, code)
        finally:
            with trio.CancelScope(shield=True):
                await terminate(handle.process)

    async def __aenter__(self) -> AsyncLocalCluster:
        from contextlib import AsyncExitStack

        self._stack = AsyncExitStack()
        nursery = await self._stack.enter_async_context(background_tasks())
        try:
            await nursery.start(self.serve)
        except BaseException:
            # An ``async with`` whose __aenter__ raises never calls
            # __aexit__: close the nursery opened above ourselves.
            await self._stack.__aexit__(*sys.exc_info())
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        assert self._stack is not None
        await self._stack.__aexit__(*exc_info)


async def terminate(process: trio.Process, grace: float = TERMINATE_GRACE_S) -> None:
    """SIGTERM `process`, wait up to `grace` seconds, then SIGKILL it."""
    if process.returncode is not None:
        return
    try:
        process.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        return
    with trio.move_on_after(grace):
        await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


class LocalCluster:
    """A local cluster for ordinary (blocking) code; see `AsyncLocalCluster`.

    Example::

        with trioflow.LocalCluster(n_workers=2) as cluster, trioflow.Client(cluster) as client:
            client.submit(sum, [1, 2]).result()
    """

    def __init__(
        self,
        n_workers: int | None = None,
        threads_per_worker: int = 1,
        *,
        processes: bool = True,
        nanny: bool = True,
        memory_limit: int | None = None,
        host: str = "127.0.0.1",
        scheduler_port: int = 0,
        config: Config | None = None,
        worker_log_level: str = "warning",
        credentials: Credentials | None = None,
        dashboard_port: int | None = None,
        resources: dict[str, float] | None = None,
    ):
        self._cluster = AsyncLocalCluster(
            n_workers,
            threads_per_worker,
            processes=processes,
            nanny=nanny,
            memory_limit=memory_limit,
            host=host,
            scheduler_port=scheduler_port,
            config=config,
            worker_log_level=worker_log_level,
            credentials=credentials,
            dashboard_port=dashboard_port,
            resources=resources,
        )
        self._loop = LoopThread("trioflow-cluster", batch=self._cluster.config.batch_threads)
        try:
            self.scheduler_address: str = self._loop.start(self._cluster.serve)
        except BaseException:
            self._loop.stop()
            raise

    @property
    def config(self) -> Config:
        """The cluster's config (a `Client` of it uses it unless given one)."""
        return self._cluster.config

    @property
    def credentials(self) -> Credentials:
        """The cluster's credentials (a `Client` of it takes the client part)."""
        return self._cluster.credentials

    @property
    def loop(self) -> LoopThread:
        """The Trio thread the cluster (scheduler and nannies) runs in; a
        `Client` of the cluster runs in a thread of its own."""
        return self._loop

    @property
    def dashboard_link(self) -> str | None:
        """See `AsyncLocalCluster.dashboard_link`."""
        return self._cluster.dashboard_link

    @property
    def workers(self) -> dict[int, Any]:
        """``{name: WorkerProcess or Worker}`` of the workers started here."""
        return dict(self._cluster.workers)

    def add_worker(self) -> Any:
        return self._loop.run(self._cluster.add_worker)

    def close(self) -> None:
        """Stop the workers (SIGTERM, then SIGKILL) and the scheduler."""
        self._loop.stop()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LocalCluster {self.scheduler_address} workers={len(self._cluster.workers)}>"
