"""Where task functions run: the executor interface (design.md §3 rule 3).

The worker shell never calls a user function itself; it hands a
zero-argument callable to an executor. `ThreadExecutor` runs it in Trio's
thread pool, at most `nthreads` at a time. The simulator supplies an
executor that runs the function inline and advances the virtual clock by a
seeded duration instead.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

import trio

from trioflow.batch_threads import make_this_thread_batch


class Executor(Protocol):
    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run the task function `fn()`; return its result or raise its exception."""

    async def run_now(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` without waiting for a task thread (for `Client.run`)."""


class ThreadExecutor:
    """Run functions in worker threads of the executor's own.

    How many run at once is the worker core's decision (`WorkerState`
    starts at most `nthreads`, and starts another when one `secede`s), so
    there is no cap here: a job finds an idle thread or starts one. Threads
    wait `IDLE_S` for the next job, then end.

    Why not ``trio.to_thread.run_sync``: every task crosses to a thread and
    back, and Trio's general-purpose crossing (a capacity limiter, a
    context copy, support for calls back into Trio) cost ~40 us of CPU of
    the ~140 us a round trip costs here (docs/performance-history.md,
    the second round). A thread waiting on a queue and a result handed
    back with `TrioToken.run_sync_soon` is the whole of what a task needs;
    a task calling back into its worker (`secede`, `rejoin`) passes the
    worker's token explicitly (`TaskContext.trio_token`).

    Cancellation: the thread cannot be interrupted. A cancelled `run`
    returns at once and the thread finishes in the background (its result
    is dropped); this is what lets a worker shut down promptly even while a
    long task runs.
    """

    IDLE_S = 10.0

    def __init__(self, nthreads: int, *, batch: bool = False):
        self.nthreads = nthreads
        self.batch = batch  # SCHED_BATCH threads (trioflow/batch_threads.py)
        self._jobs: queue.SimpleQueue[Callable[[], Callable[[], None]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a job that no submitter has claimed
        self._started = itertools.count()

    async def run(self, fn: Callable[[], Any]) -> Any:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[tuple[bool, Any]] = []

        def deliver(ok: bool, value: Any) -> None:  # in the Trio thread
            box.append((ok, value))
            done.set()

        def job() -> Callable[[], None]:  # in a task thread; returns how to report
            try:
                ok, value = True, fn()
            except BaseException as exc:  # handed to the caller, raised there
                ok, value = False, exc
            return lambda: token.run_sync_soon(deliver, ok, value)

        self._submit(job)
        await done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    async def run_now(self, fn: Callable[[], Any]) -> Any:
        return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)

    def _submit(self, job: Callable[[], Callable[[], None]]) -> None:
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1
        self._jobs.put(job)
        if start:
            name = f"trioflow-task-{next(self._started)}"
            threading.Thread(target=self._work, name=name, daemon=True).start()

    def _work(self) -> None:
        make_this_thread_batch(self.batch)
        while True:
            try:
                job = self._jobs.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # nobody counts on a waiting thread: end one
                        self._idle -= 1
                        return
                continue  # a job is on its way to us
            report = job()
            # Idle *before* the result is reported: the worker's answer to
            # it is often the next job, which should find this thread
            # rather than start another.
            with self._lock:
                self._idle += 1
            try:
                report()
            except trio.RunFinishedError:
                pass  # the worker is gone; the result goes with it
            del job, report  # nothing of the last job stays alive while we wait
