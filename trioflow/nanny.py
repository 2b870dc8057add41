"""The nanny: a small supervisor that keeps one worker process alive.

A worker runs arbitrary user code, so it may segfault, call `os._exit`,
leak memory or hang. The nanny is the part that stays simple and survives
all of that:

* it starts the worker as a child process through a `Launcher`
  (design.md §3 rule 4: the simulator launches workers as cancellable Trio
  tasks instead);
* when the worker dies it starts a new one, after a capped, jittered,
  exponential backoff if the worker keeps dying young;
* with a `memory_limit`, it hands the limit to the worker (which spills to
  disk and pauses by it: `trioflow.memory`), checks the worker's resident
  memory (psutil) every `Config.memory_check_interval`, and kills a worker
  that passes `Config.memory_terminate_fraction` of it; after a worker dies
  it removes the spill directory the worker could not;
* it serves a small control port on which the scheduler asks for restarts
  (`Client.restart()` goes scheduler -> nanny, so a worker too busy or too
  hung to read messages is still restarted);
* when it is cancelled (SIGTERM or SIGINT to the nanny process) it stops
  the worker (SIGTERM, then SIGKILL after a grace period) and returns.

If the nanny itself is killed with SIGKILL it cannot clean up, so the worker
watches its parent (`--parent-pid`) and exits when the nanny is gone: no
orphans either way.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Protocol

import trio

from trioflow.comm import (
    Network,
    TCPNetwork,
    clip,
    reply,
)
from trioflow.comm import messages as m
from trioflow.comm.auth import CLUSTER, Credentials, child_environment, credentials_for
from trioflow.comm.door import Door
from trioflow.comm.network import advertised_address
from trioflow.comm.security import Security
from trioflow.backoff import Backoff
from trioflow.config import Config, parse_bytes
from trioflow.errors import CommClosedError, ProtocolError
from trioflow.memory import remove_spill_directories
from trioflow.nurseries import background_tasks

logger = logging.getLogger("trioflow.nanny")

# A worker that lived at least this long was healthy: its death resets backoff.
HEALTHY_LIFETIME_S = 10.0
# How long a worker may take to exit after SIGTERM before it gets SIGKILL.
TERMINATE_GRACE_S = 3.0


class WorkerHandle(Protocol):
    """A running worker, as a launcher hands it to the nanny."""

    pid: int | None

    async def wait(self) -> int | None:
        """Wait for the worker to exit; return its exit code."""

    def kill(self) -> None:
        """End it at once (SIGKILL)."""

    async def terminate(self, grace: float) -> None:
        """End it politely (SIGTERM), then at once after `grace` seconds."""


class Launcher(Protocol):
    async def launch(self, nanny_address: str, memory_limit: int | None = None) -> WorkerHandle:
        """Start a worker whose nanny listens at `nanny_address`, with
        `memory_limit` bytes to stay under (None: no limit)."""


class ProcessHandle:
    """A worker running as a child process."""

    def __init__(self, process: trio.Process):
        self.process = process
        self.pid: int | None = process.pid

    async def wait(self) -> int | None:
        return await self.process.wait()

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()

    async def terminate(self, grace: float) -> None:
        if self.process.returncode is not None:
            return
        try:
            self.process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            return
        with trio.move_on_after(grace):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


# glibc's malloc keeps freed memory for reuse instead of giving it back to
# the system, and after the first large block is freed it serves blocks of
# tens of MB from that heap too. A worker that spilled a value would then
# see its resident memory stay where it was, spill everything else and
# pause for nothing. Setting a trim threshold (any one of malloc's tuning
# variables also turns off that growth) makes freed memory go back to the
# system. dask.distributed's nanny sets the same variable to the same value.
MALLOC_TRIM_THRESHOLD_BYTES = 65536


def _returning_freed_memory(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with MALLOC_TRIM_THRESHOLD_ set, unless the user set it already."""
    return {"MALLOC_TRIM_THRESHOLD_": str(MALLOC_TRIM_THRESHOLD_BYTES), **env}


class ProcessLauncher:
    """Starts ``python -m trioflow worker ... --no-nanny`` child processes.

    Args:
        scheduler_address: the worker's scheduler.
        worker_args: further command-line arguments for the worker.
        env: the environment for the worker (this process's if omitted).
        credentials: the cluster's credentials, handed to the worker in its
            environment (`TRIOFLOW_TOKEN`).
    """

    def __init__(
        self,
        scheduler_address: str,
        worker_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        credentials: Credentials | None = None,
    ):
        self.scheduler_address = scheduler_address
        self.worker_args = list(worker_args)
        # The worker's token goes in its environment, never its argv.
        self.env = {**(os.environ if env is None else env), **child_environment(credentials)} if credentials else env

    async def launch(self, nanny_address: str, memory_limit: int | None = None) -> ProcessHandle:
        command = [
            sys.executable,
            "-m",
            "trioflow",
            "worker",
            self.scheduler_address,
            "--no-nanny",
            "--nanny-address",
            nanny_address,
            "--parent-pid",
            str(os.getpid()),
            *self.worker_args,
        ]
        env = self.env
        if memory_limit is not None:
            command += ["--memory-limit", str(memory_limit)]
            env = _returning_freed_memory(os.environ if env is None else env)
        process = await trio.lowlevel.open_process(command, stdin=subprocess.DEVNULL, env=env)
        return ProcessHandle(process)


class Nanny:
    """Supervise one worker: start, restart, memory limit, clean shutdown.

    Args:
        launcher: how to start a worker (`ProcessLauncher` in production).
        host: interface for the nanny's control port (loopback by default).
            A wildcard (``0.0.0.0``) advertises the address this machine
            uses to reach the scheduler, as a worker does.
        port: the control port (0: any free one; give one to open it in a
            firewall).
        memory_limit: the worker's memory limit in bytes (None: no limit):
            the worker spills and pauses by it, and is killed past
            `Config.memory_terminate_fraction` of it. The kill needs a
            launcher whose handles have a real ``pid``.
        config: tunables (backoff, memory check interval).
        network: how to serve the control port.
        rng: for backoff jitter (seeded in the simulator).
        credentials: the cluster's credentials: only the scheduler (which
            holds them too) may ask this nanny for a restart.
    """

    def __init__(
        self,
        launcher: Launcher,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        memory_limit: int | None = None,
        config: Config | None = None,
        network: Network | None = None,
        rng: random.Random | None = None,
        credentials: Credentials | None = None,
    ):
        if memory_limit is not None and memory_limit <= 0:
            raise ValueError(f"memory_limit must be positive bytes or None, got {memory_limit!r}")
        self.launcher = launcher
        self.host = host
        self.port = port
        self.memory_limit = memory_limit
        self.config = config or Config.from_env()
        self.network = network or TCPNetwork(Security.from_config(self.config), self.config.handshake_timeout)
        self.credentials = (
            credentials if credentials is not None
            else credentials_for(self.config, "a nanny", cluster=True)
        )
        self.rng = rng or random.Random()
        self.address: str | None = None
        self.worker: WorkerHandle | None = None
        # How many workers this nanny has started (1 + restarts).
        self.launches = 0
        self._restart_now = trio.Event()
        # Set (and replaced) each time a new worker has been launched.
        self._launched = trio.Event()
        self._scope: trio.CancelScope | None = None
        self.closed = trio.Event()
        # Only the cluster (the scheduler) may ask for restarts.
        self._door = Door(
            "a trioflow nanny's control port",
            config=self.config,
            credentials=self.credentials,
            credential_roles=frozenset({CLUSTER}),
            roles={"control": m.SCHEDULER_TO_NANNY},
        )

    @property
    def worker_pid(self) -> int | None:
        return None if self.worker is None else self.worker.pid

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a worker running until cancelled; report the control address.

        Cancellation: the current worker is terminated (SIGTERM, then
        SIGKILL after a grace period) before this returns, even though the
        nanny is being cancelled.
        """
        try:
            await self._serve(task_status)
        finally:
            self.closed.set()

    async def _serve(self, task_status: trio.TaskStatus[str]) -> None:
        async with background_tasks() as nursery:
            self._scope = nursery.cancel_scope
            bound = await nursery.start(self.network.serve, self._serve_control, self.host, self.port)
            # What the scheduler dials to ask for restarts: never 0.0.0.0.
            scheduler = getattr(self.launcher, "scheduler_address", None)
            self.address = advertised_address(bound, scheduler) if scheduler else bound
            backoff = Backoff(self.config.reconnect_backoff_min, self.config.reconnect_backoff_max, self.rng)
            while True:
                self.worker = await self.launcher.launch(self.address, memory_limit=self.memory_limit)
                self.launches += 1
                self._launched.set()
                self._launched = trio.Event()
                logger.info("nanny %s started worker pid %s", self.address, self.worker.pid)
                if self.launches == 1:
                    task_status.started(self.address)
                born = trio.current_time()
                reason = await self._supervise(self.worker)
                if reason == "restart requested":
                    backoff.reset()
                    continue
                if trio.current_time() - born >= HEALTHY_LIFETIME_S:
                    backoff.reset()
                pause = backoff.next()
                logger.warning(
                    "worker pid %s %s; restarting it in %.2f s", self.worker.pid, reason, pause
                )
                await trio.sleep(pause)

    async def _supervise(self, worker: WorkerHandle) -> str:
        """Wait until the worker exits, is over its memory limit, or must restart."""
        reason = "exited"
        try:
            async with background_tasks() as nursery:
                done = trio.Event()

                async def wait_exit() -> None:
                    nonlocal reason
                    code = await worker.wait()
                    reason = f"exited with code {code}"
                    done.set()

                async def wait_restart() -> None:
                    nonlocal reason
                    await self._restart_now.wait()
                    self._restart_now = trio.Event()
                    reason = "restart requested"
                    await worker.terminate(TERMINATE_GRACE_S)
                    done.set()

                nursery.start_soon(wait_exit)
                nursery.start_soon(wait_restart)
                if self.memory_limit is not None and worker.pid is not None:
                    nursery.start_soon(self._watch_memory, worker, done)
                await done.wait()
        finally:
            with trio.CancelScope(shield=True):
                await worker.terminate(TERMINATE_GRACE_S)
            if worker.pid is not None:
                # A worker killed (by us, or SIGKILL) could not remove its
                # spill directory; one that exited cleanly already did.
                remove_spill_directories(self.config, worker.pid)
        return reason

    async def _watch_memory(self, worker: WorkerHandle, done: trio.Event) -> None:
        import psutil

        assert self.memory_limit is not None
        fraction = self.config.memory_terminate_fraction
        threshold = fraction * self.memory_limit
        try:
            process = psutil.Process(worker.pid)
            while True:
                rss = process.memory_info().rss
                if rss > threshold:
                    logger.warning(
                        "worker pid %s uses %d bytes of memory, over %g%% of its limit of %d bytes "
                        "(memory_terminate_fraction); killing it",
                        worker.pid,
                        rss,
                        100 * fraction,
                        self.memory_limit,
                    )
                    worker.kill()
                    return
                await trio.sleep(self.config.memory_check_interval)
        except psutil.NoSuchProcess:
            return

    def stop(self) -> None:
        """Stop supervising: terminate the worker and return from `serve`."""
        if self._scope is not None:
            self._scope.cancel(reason="nanny stopped")

    async def close(self) -> None:
        """`stop`, and wait until the worker process has exited."""
        self.stop()
        await self.closed.wait()

    def request_restart(self) -> None:
        """Replace the worker now (no backoff)."""
        self._restart_now.set()

    async def _serve_control(self, stream: trio.abc.Stream) -> None:
        """The control port: the scheduler asks for a restart here."""
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
                            continue
                        launched = self._launched
                        self.request_restart()
                        await launched.wait()
                        reply(conn, request, m.PidReply(pid=self.worker_pid))
            except CommClosedError:
                pass
            except ProtocolError as exc:
                logger.warning("closing control connection: %s", clip(str(exc), 300))


def parse_memory(text: str) -> int | None:
    """Bytes from ``"4GB"``, ``"512MiB"``, ``"1e9"``; None for ``"0"``/``"none"``.

    Units as dask has them (`trioflow.config.parse_bytes`): ``4GB`` and
    ``4g`` are 4×10⁹ bytes, ``4GiB`` is 2³².

    Raises:
        ValueError: the text is not a size, or not positive.
    """
    cleaned = text.strip().lower()
    if cleaned in ("0", "none", ""):
        return None
    try:
        value = parse_bytes(cleaned)
    except ValueError:
        raise ValueError(f"{text!r} is not a memory size (try 4GB, 512MiB or a number of bytes)") from None
    if value <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return value
