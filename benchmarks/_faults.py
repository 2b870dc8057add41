"""Helpers for the failure workloads (W5 kill, W6 freeze, W7 poison task).

Both sides run their scheduler in this process (trioflow: ``LocalCluster``'s
Trio thread; dask: ``LocalCluster``'s event-loop thread), so "the scheduler
dropped the worker" is read straight from the in-process scheduler's table
of workers, without a round trip, the same way on both sides:

- trioflow: ``cluster._cluster.scheduler.state.workers`` (address -> worker
  record; the pid comes from ``scheduler.workers[address].pid``);
- dask: ``cluster.scheduler.workers`` (address -> ``WorkerState`` with ``.pid``).

`MembershipWatch` polls that table from a thread every few ms and records
every worker leaving or joining with a `now()` timestamp.

`frozen(pid)` SIGSTOPs a process and always SIGCONTs it again (``finally``,
``atexit``, and a small guardian process in its own session that sends
SIGCONT if this process dies without doing it, even by SIGKILL).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from _harness import TRIOFLOW, now

# ------------------------------------------------------------ the scheduler --


def in_process_scheduler(client: Any, side: str) -> Any:
    """The scheduler object living in this process behind `client`."""
    if side == TRIOFLOW:
        cluster = getattr(client, "_bench_cluster", None) or client.cluster
        return cluster._cluster.scheduler
    return client.cluster.scheduler


def membership(client: Any, side: str) -> Callable[[], dict[str, int | None]]:
    """A function returning ``{address: worker pid}`` as the in-process scheduler
    sees it right now (read from another thread: retried if the table changes
    while being copied)."""
    scheduler = in_process_scheduler(client, side)

    if side == TRIOFLOW:
        # Membership is the scheduler *state*'s table (what the brief calls
        # dropped); the pid comes from the connection, which the scheduler
        # forgets a moment earlier than the state does: keep the last known.
        known: dict[str, int | None] = {}

        def read() -> dict[str, int | None]:
            links = scheduler.workers
            out = {}
            for address in list(scheduler.state.workers):
                link = links.get(address)
                pid = getattr(link, "pid", None) if link is not None else known.get(address)
                known[address] = out[address] = pid
            return out

    else:

        def read() -> dict[str, int | None]:
            return {address: getattr(ws, "pid", None) for address, ws in list(scheduler.workers.items())}

    def snapshot() -> dict[str, int | None]:
        for _ in range(1000):
            try:
                return read()
            except RuntimeError:  # "changed size during iteration"
                continue
        return read()

    return snapshot


def worker_pid_map(client: Any, side: str) -> dict[str, int]:
    """``{address: pid}`` of the worker processes, through the client API
    (trioflow: ``scheduler_info()``; dask: ``client.run(os.getpid)``)."""
    if side == TRIOFLOW:
        workers = client.scheduler_info()["workers"]
        return {address: info["pid"] for address, info in workers.items() if info.get("pid")}
    return dict(client.run(os.getpid))


def wait_for_workers(
    snapshot: Callable[[], dict[str, int | None]],
    n: int,
    timeout: float,
    gone_pids: frozenset[int] = frozenset(),
    interval: float = 0.005,
) -> float | None:
    """Wait until the scheduler holds `n` workers, none of them with a pid in
    `gone_pids`; return the seconds waited, or None after `timeout`."""
    start = now()
    while True:
        current = snapshot()
        if len(current) >= n and not (set(current.values()) & gone_pids):
            return now() - start
        if now() - start > timeout:
            return None
        time.sleep(interval)


class MembershipWatch:
    """Poll the in-process scheduler's worker table every `interval` s in a
    thread; ``events`` is a list of ``(t, "left"|"joined", address, pid)``.
    A worker whose pid changes at the same address counts as left + joined."""

    def __init__(self, snapshot: Callable[[], dict[str, int | None]], interval: float = 0.001):
        self.snapshot = snapshot
        self.interval = interval
        self.events: list[tuple[float, str, str, int | None]] = []
        self.current = snapshot()
        self.polls = 0
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="bench-membership-watch", daemon=True)

    def __enter__(self) -> MembershipWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            time.sleep(self.interval)
            try:
                snap = self.snapshot()
            except Exception:
                continue
            t = now()
            self.polls += 1
            events = []
            for address, pid in self.current.items():
                if address not in snap or snap[address] != pid:
                    events.append((t, "left", address, pid))
            for address, pid in snap.items():
                if address not in self.current or self.current[address] != pid:
                    events.append((t, "joined", address, pid))
            self.current = snap
            if events:
                with self._changed:
                    self.events.extend(events)
                    self._changed.notify_all()

    def first(
        self, kind: str, after: float = -float("inf"), address: str | None = None, pid: int | None = None
    ) -> float | None:
        """The time of the first `kind` event after `after` (matching
        `address` / `pid` when given), or None."""
        for t, k, a, p in list(self.events):
            if k == kind and t >= after and (address is None or a == address) and (pid is None or p == pid):
                return t
        return None

    def wait_first(self, kind: str, timeout: float, **match: Any) -> float | None:
        """`first`, waiting up to `timeout` s for it to happen."""
        deadline = now() + timeout
        with self._changed:
            while True:
                t = self.first(kind, **match)
                if t is not None:
                    return t
                left = deadline - now()
                if left <= 0:
                    return None
                self._changed.wait(min(left, 0.05))

    def count(self, kind: str, after: float = -float("inf"), before: float = float("inf")) -> int:
        return sum(1 for t, k, _, _ in list(self.events) if k == kind and after <= t <= before)

    def log(self, origin: float) -> list[list[Any]]:
        """The events as ``[seconds since origin, kind, address, pid]``."""
        return [[round(t - origin, 4), k, a, p] for t, k, a, p in list(self.events)]


# ------------------------------------------------------------ freezing --

_stopped: set[int] = set()
_stopped_lock = threading.Lock()

_GUARDIAN = r"""
import os, signal, sys
pid = int(sys.argv[1])
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.read()          # returns when the benchmark closes the pipe or dies
try:
    os.kill(pid, signal.SIGCONT)
except (ProcessLookupError, PermissionError):
    pass
"""


def _continue_all() -> None:
    with _stopped_lock:
        pids = list(_stopped)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGCONT)


atexit.register(_continue_all)


class Freeze:
    """What `frozen` yields: `now()` of the SIGSTOP and of the SIGCONT."""

    def __init__(self, pid: int):
        self.pid = pid
        self.stopped_at: float = float("nan")
        self.continued_at: float = float("nan")


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[Freeze]:
    """SIGSTOP `pid` for the ``with`` block; SIGCONT it on the way out,
    whatever happens. A guardian process (own session, started and ready
    before the stop) sends SIGCONT too if this process dies first, so no
    stopped worker is ever left behind."""
    freeze = Freeze(pid)
    guardian = subprocess.Popen(
        [sys.executable, "-c", _GUARDIAN, str(pid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
    )
    try:
        if guardian.stdout.readline().strip() != "ready":
            raise RuntimeError("the SIGCONT guardian did not start")
        with _stopped_lock:
            _stopped.add(pid)
        freeze.stopped_at = now()
        try:
            os.kill(pid, signal.SIGSTOP)
            yield freeze
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            freeze.continued_at = now()
            with _stopped_lock:
                _stopped.discard(pid)
    finally:
        with contextlib.suppress(Exception):
            guardian.stdin.close()  # the guardian sends one more SIGCONT and exits
        try:
            guardian.wait(timeout=10)
        except subprocess.TimeoutExpired:
            guardian.kill()
            guardian.wait()


def process_state(pid: int) -> str | None:
    """The one-letter state of `pid` from /proc (``T`` = stopped), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
