"""`LoopThread`: a Trio event loop in a background thread, for blocking APIs.

`Client` and `LocalCluster` are used from ordinary (non-Trio) code, so each
owns one of these: a daemon thread running ``trio.run``, with a nursery in
which long-lived services (an `AsyncClient`, a scheduler) run. Calls cross
into it with `trio.from_thread`, which is thread-safe and carries
exceptions back to the caller.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from trioflow.batch_threads import make_this_thread_batch

T = TypeVar("T")


class LoopThread:
    """One Trio loop in a daemon thread; `run`/`run_sync`/`start` call into it.

    `batch`: run the thread under Linux's ``SCHED_BATCH`` (trioflow/batch_threads.py
    says why; `Config.batch_threads`).
    """

    def __init__(self, name: str, *, batch: bool = False):
        self.name = name
        self.batch = batch
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._crash: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._crash is not None:
            raise RuntimeError(f"{name}: the event loop failed to start") from self._crash

    def _main(self) -> None:
        make_this_thread_batch(self.batch)
        try:
            trio.run(self._serve)
        except BaseException as exc:  # reported to the next caller
            self._crash = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel(reason=f"{self.name} stopped")

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._crash is None

    def _check(self) -> trio.lowlevel.TrioToken:
        if self._token is None or not self._thread.is_alive():
            raise RuntimeError(f"{self.name}: the event loop is not running") from self._crash
        return self._token

    def run(self, async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await async_fn(*args)`` in the loop; block until it returns."""
        return trio.from_thread.run(async_fn, *args, trio_token=self._check())

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the loop thread; block until it returns."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._check())

    def in_loop_thread(self) -> bool:
        """Whether the caller is this loop's own thread (which must never
        block waiting for the loop)."""
        return threading.get_ident() == self._thread.ident

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Have the loop run ``fn(*args)`` in its thread soon; return at once.

        Calls from one thread run in the order they were made (Trio's
        ``run_sync_soon``), behind the `run` and `run_sync` calls made before.
        """
        try:
            self._check().run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            raise RuntimeError(f"{self.name}: the event loop is not running") from None

    def start(self, async_fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Start a service (``async_fn(*args, task_status=...)``) in the loop's
        nursery; return the value it reports through ``task_status.started``."""
        assert self._nursery is not None
        return self.run(self._nursery.start, async_fn, *args)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every service and end the thread."""
        if self._thread.is_alive() and self._stop is not None:
            try:
                self.run_sync(self._stop.set)
            except (RuntimeError, trio.RunFinishedError):
                pass
            self._thread.join(timeout)
