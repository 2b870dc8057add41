"""Where task functions run: the executor interface (design.md §3 rule 3).

The worker shell never calls a user function itself; it hands a
zero-argument callable to an executor. `ThreadExecutor` runs it in Trio's
thread pool, at most `nthreads` at a time. The simulator supplies an
executor that runs the function inline and advances the virtual clock by a
seeded duration instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import trio


class Executor(Protocol):
    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run the task function `fn()`; return its result or raise its exception."""

    async def run_now(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` without waiting for a task thread (for `Client.run`)."""


class ThreadExecutor:
    """Run functions in worker threads.

    How many run at once is the worker core's decision (`WorkerState`
    starts at most `nthreads`, and starts another when one `secede`s), so
    the limiter here does not bound them; it only lifts Trio's default cap
    on threads, which seceded tasks waiting on their children could reach.

    Cancellation: the thread cannot be interrupted. A cancelled `run`
    returns at once and the thread finishes in the background (its result
    is dropped); this is what lets a worker shut down promptly even while a
    long task runs.
    """

    def __init__(self, nthreads: int):
        self.nthreads = nthreads
        self.limiter = trio.CapacityLimiter(math.inf)

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await trio.to_thread.run_sync(fn, limiter=self.limiter, abandon_on_cancel=True)

    async def run_now(self, fn: Callable[[], Any]) -> Any:
        return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)
