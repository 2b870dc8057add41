"""`wait` and `as_completed`: waiting on many futures at once.

Both work with either client: with `Client` they block the calling thread;
with `AsyncClient` `wait` returns an awaitable and `as_completed` is an
async iterator (``async for future in as_completed(futures)``).
"""

from __future__ import annotations

import math
import queue
from collections.abc import Iterable
from typing import Any, NamedTuple

import trio

from trioflow.future import FINISHED, Future

ALL_COMPLETED = "ALL_COMPLETED"
FIRST_COMPLETED = "FIRST_COMPLETED"
FIRST_EXCEPTION = "FIRST_EXCEPTION"


class DoneAndNotDone(NamedTuple):
    done: set[Future]
    not_done: set[Future]


def wait(
    futures: Iterable[Future] | Future, timeout: float | None = None, return_when: str = ALL_COMPLETED
) -> Any:
    """Wait until `futures` are done (or the first one, or the first failure).

    Returns ``DoneAndNotDone(done, not_done)``; nothing is raised for failed
    futures (ask each one).

    Raises:
        TimeoutError: `return_when` was not met within `timeout` seconds.
        ValueError: an unknown `return_when`.
    """
    fs = [futures] if isinstance(futures, Future) else list(futures)
    if return_when not in (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION):
        raise ValueError(f"return_when must be one of ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION; got {return_when!r}")
    if not fs:
        return DoneAndNotDone(set(), set())
    return fs[0].client._call(_wait, fs, timeout, return_when)


async def _wait(fs: list[Future], timeout: float | None, return_when: str) -> DoneAndNotDone:
    """Wait in the client's loop; linear in the number of futures.

    Each future not yet done gets one callback, which counts it off; the
    loop wakes only when the counts say the condition may be met (all done,
    the first done, the first failure), then checks it once over every
    future. A future can be done and pending again (its value was lost and
    is being recomputed): that check finds it, and it is counted again.
    (Re-checking every future on every completion, as this used to, was
    quadratic: 100,000 futures took minutes.)
    """
    pending: dict[int, Future] = {}
    changed = trio.Event()
    any_done = False
    any_failed = False

    def counted_met() -> bool:
        if return_when == FIRST_COMPLETED:
            return any_done
        return not pending or (return_when == FIRST_EXCEPTION and any_failed)

    def on_done(f: Future) -> None:
        nonlocal any_done, any_failed
        pending.pop(id(f), None)
        any_done = True
        any_failed = any_failed or f.status != FINISHED
        if counted_met():
            changed.set()

    def count() -> None:
        """Count every future afresh; give each one not done our callback."""
        nonlocal any_done, any_failed
        any_done = any_failed = False
        for f in fs:
            if f.done():
                any_done = True
                any_failed = any_failed or f.status != FINISHED
            elif id(f) not in pending:
                pending[id(f)] = f
                f._add_done_callback(on_done)

    def met() -> bool:
        if return_when == FIRST_COMPLETED:
            return any(f.done() for f in fs)
        all_done = all(f.done() for f in fs)
        if return_when == ALL_COMPLETED:
            return all_done
        return all_done or any(f.done() and f.status != FINISHED for f in fs)

    count()
    with trio.move_on_after(math.inf if timeout is None else timeout):
        while True:
            if counted_met():
                if met():
                    break
                count()  # some went back to pending: count them again
                continue
            await changed.wait()
            changed = trio.Event()
    if not met():
        raise TimeoutError(f"{sum(not f.done() for f in fs)} of {len(fs)} futures not done within {timeout:g} s")
    done = {f for f in fs if f.done()}
    return DoneAndNotDone(done, set(fs) - done)


class as_completed:
    """Iterate over futures in the order they complete.

    Args:
        futures: the futures to watch (more can be `add`-ed while iterating).
        with_results: yield ``(future, result)`` pairs instead of futures
            (a failed future then raises its exception from the iteration).
    """

    def __init__(self, futures: Iterable[Future] = (), with_results: bool = False):
        self.with_results = with_results
        self._pending = 0
        self._asynchronous: bool | None = None
        self._queue: queue.SimpleQueue[Future] = queue.SimpleQueue()
        self._send: trio.MemorySendChannel[Future] | None = None
        self._receive: trio.MemoryReceiveChannel[Future] | None = None
        for future in futures:
            self.add(future)

    def add(self, future: Future) -> None:
        asynchronous = not future.client._portal.blocking
        if self._asynchronous is None:
            self._asynchronous = asynchronous
            if asynchronous:
                self._send, self._receive = trio.open_memory_channel(math.inf)
        elif self._asynchronous != asynchronous:
            raise ValueError("as_completed() cannot mix futures of blocking and async clients")
        self._pending += 1
        future.add_done_callback(self._on_done)

    def _on_done(self, future: Future) -> None:
        if self._send is not None:
            self._send.send_nowait(future)
        else:
            self._queue.put(future)

    def count(self) -> int:
        """How many futures have not been yielded yet."""
        return self._pending

    def is_empty(self) -> bool:
        return self._pending == 0

    def __iter__(self) -> as_completed:
        if self._asynchronous:
            raise TypeError("futures of an AsyncClient: use 'async for'")
        return self

    def __next__(self) -> Any:
        if self._pending == 0:
            raise StopIteration
        future = self._queue.get()
        self._pending -= 1
        return (future, future.result()) if self.with_results else future

    def batches(self) -> Any:
        """Iterate over lists of futures: each list holds every future done
        by then (at least one), as dask.distributed's ``batches()`` does.

        With `Client` a plain iterator; with `AsyncClient` an async one.
        With ``with_results=True`` the lists hold ``(future, result)`` pairs.
        """
        if self._asynchronous:
            return self._abatches()
        return self._batches()

    def _batches(self):
        while self._pending:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._pending -= len(batch)
            yield [(f, f.result()) for f in batch] if self.with_results else batch

    async def _abatches(self):
        while self._pending and self._receive is not None:
            batch = [await self._receive.receive()]
            while True:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            self._pending -= len(batch)
            yield [(f, await f.result()) for f in batch] if self.with_results else batch

    def __aiter__(self) -> as_completed:
        if self._asynchronous is False:
            raise TypeError("futures of a blocking Client: use a plain 'for'")
        return self

    async def __anext__(self) -> Any:
        if self._pending == 0 or self._receive is None:
            raise StopAsyncIteration
        future = await self._receive.receive()
        self._pending -= 1
        return (future, await future.result()) if self.with_results else future


def progress(*futures: Any, notebook: bool | None = None, file: Any = None, **tqdm_options: Any) -> Any:
    """Show a progress bar until `futures` are done (a future, or lists of them).

    The bar is tqdm's: ``tqdm.auto`` picks a widget in Jupyter and a text
    bar in a terminal (``notebook=False`` forces the text bar, ``True`` the
    widget). Failed and cancelled futures count as done. With `Client` it
    blocks until every future is done; with `AsyncClient` it returns an
    awaitable. Nothing is raised for failed futures (ask each one).

    Args:
        file: where a text bar is written (default: stderr).
        tqdm_options: passed on to tqdm (``desc=``, ``leave=``...).
    """
    fs: list[Future] = []
    for item in futures:
        fs.extend([item] if isinstance(item, Future) else list(item))
    if notebook is None:
        from tqdm.auto import tqdm
    elif notebook:
        from tqdm.notebook import tqdm
    else:
        from tqdm import tqdm
    if not fs:
        return None
    return fs[0].client._call(_progress, fs, tqdm, {"file": file, **tqdm_options})


async def _progress(fs: list[Future], tqdm: Any, options: dict) -> None:
    changed = trio.Event()

    def on_done(_: Future) -> None:
        changed.set()

    for f in fs:
        f._add_done_callback(on_done)
    bar = tqdm(total=len(fs), unit="task", **{k: v for k, v in options.items() if v is not None})
    try:
        done = 0
        while True:
            now = sum(f.done() for f in fs)
            bar.update(now - done)
            done = now
            if done == len(fs):
                return
            await changed.wait()
            changed = trio.Event()
    finally:
        bar.close()


__all__ = ["ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "DoneAndNotDone", "as_completed", "progress", "wait"]
