"""`Future`: a handle on a task's eventual value, held by user code.

Each key a client knows has one `FutureRecord` (its status, failure and
holders), kept by the client's core (trioflow/core/client_state.py) in the
client's Trio thread. A `Future` is a cheap handle on it; a key may have
many handles. When the last handle is garbage collected the client tells
the scheduler it no longer wants the key, which is how results get freed
(design.md §2: "keys that no client holds ... are forgotten"). Waiting on a
record (`wait_done`, `call_when_done`) is the shell's part, here.

The same `Future` class serves both clients. With `AsyncClient`, blocking
methods return awaitables (``await f``, ``await f.result()``); with `Client`
they block the calling thread while the client's Trio thread does the work.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Protocol

import trio

from trioflow.core.client_state import FutureRecord, FutureStatus
from trioflow.protocol import failure_to_exception

logger = logging.getLogger("trioflow.client")

# The statuses as `Future.status` spells them.
PENDING = FutureStatus.PENDING.value
FINISHED = FutureStatus.FINISHED.value
ERROR = FutureStatus.ERROR.value
CANCELLED = FutureStatus.CANCELLED.value
LOST = FutureStatus.LOST.value


class Waiters:
    """Whoever waits on one record: a `trio.Event` and done callbacks.

    Made only for the records someone waits on or watches (a client may
    hold a million records; the event and its set of waiting tasks are 272
    bytes). It hangs on the record (`FutureRecord.waiters`, a slot the core
    keeps for the shell and never reads) and is woken by the shell when the
    core says the record is done (`FutureDone`). Touched only in the
    client's Trio thread.
    """

    __slots__ = ("event", "callbacks")

    def __init__(self) -> None:
        self.event: trio.Event | None = None
        # Called once when the record is next done (None: nobody asked).
        self.callbacks: list[Callable[[], None]] | None = None


def _waiters(record: FutureRecord) -> Waiters:
    if record.waiters is None:
        record.waiters = Waiters()
    return record.waiters


async def wait_done(record: FutureRecord) -> None:
    """Return once `record` is done (at once, after a checkpoint, if it is)."""
    if record.done():
        await trio.lowlevel.checkpoint()
        return
    waiters = _waiters(record)
    if waiters.event is None or waiters.event.is_set():
        # (Set but not done: it was done, and is pending again since.)
        waiters.event = trio.Event()
    await waiters.event.wait()


def call_when_done(record: FutureRecord, callback: Callable[[], None]) -> None:
    """Call `callback()` once, when `record` is next done."""
    waiters = _waiters(record)
    if waiters.callbacks is None:
        waiters.callbacks = []
    waiters.callbacks.append(callback)


def not_done_within(seconds: float) -> TimeoutError:
    """What a wait for a result raises when its timeout passes (the future
    stays valid and may complete later)."""
    return TimeoutError(f"not done within {seconds:g} s")


def forget_when_done(record: FutureRecord, callback: Callable[[], None]) -> None:
    """Take back a `call_when_done` (the same callback object) not yet called."""
    waiters = record.waiters
    if waiters is not None and waiters.callbacks:
        waiters.callbacks = [other for other in waiters.callbacks if other is not callback]


class ValueReport:
    """Tells a thread outside the client's loop that a future is done.

    A blocking `Future.result` waits in the caller's thread for this
    report instead of for a task in the client's loop: the handler of the
    task's report of completion calls it (`wake`), and the caller has its
    answer as soon as the loop has it, without the loop running anything
    more for it (docs/performance.md, W2). It puts in `queue` what the
    caller may take without asking the loop again: ``(True, value)`` when
    the value came with the report (a small result), else ``(False, None)``
    (the task failed or was cancelled, its value is to be fetched from a
    worker, or the future was never taken in): the caller then asks the
    loop for the result the usual way (`AsyncClient._result`).

    A caller with a timeout also hears `PENDING` when the future is not
    done yet, so that its timeout counts from then: the wait for a
    future already done never times out, however short the timeout.
    The loop notes then, on its own clock, the `deadline` by which the
    caller wants its answer; the general path, if taken, has until then.

    Called in the client's loop only, like every reader of a record.
    """

    PENDING = "pending"

    __slots__ = ("future", "queue", "timeout", "deadline")

    def __init__(self, future: Future, queue: Any, timeout: float | None):
        self.future = future
        self.queue = queue  # anything with a thread-safe put()
        self.timeout = timeout
        self.deadline = math.inf  # set in the loop (`start`)

    def start(self) -> None:
        """The loop has the report: the caller's timeout starts now."""
        if self.timeout is not None:
            self.deadline = trio.current_time() + max(self.timeout, 0.0)

    def pending(self) -> None:
        if self.timeout is not None:
            self.queue.put(self.PENDING)

    def __call__(self) -> None:
        record = self.future._state
        if record is not None and record.status is FutureStatus.FINISHED and record.value is not None:
            self.queue.put((True, record.value))
        else:
            self.queue.put((False, None))


def wake(record: FutureRecord) -> None:
    """`record` became done: wake its waiters and run its callbacks (once)."""
    waiters = record.waiters
    if waiters is None:
        return
    if waiters.event is not None:
        waiters.event.set()
    callbacks, waiters.callbacks = waiters.callbacks, None
    for callback in callbacks or ():
        try:
            callback()
        except Exception:
            logger.exception("a done callback of %r raised", record.key)


def exception_of(record: FutureRecord) -> BaseException:
    """The exception a failed record raises: the client's own error, or the
    one the failure table promises for the cluster's failure."""
    if record.local_error is not None:
        return record.local_error
    assert record.failure is not None
    return failure_to_exception(record.failure)


class FutureOwner(Protocol):
    """What a `Future` needs of its client (`AsyncClient`; typed here so
    that this module need not import the client, which imports it)."""

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any: ...
    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> None: ...
    def _call_result(self, future: Future, timeout: float | None) -> Any: ...
    async def _result(self, future: Future, timeout: float | None) -> Any: ...
    async def _exception(self, future: Future, timeout: float | None) -> BaseException | None: ...
    async def cancel(self, futures: Any, reason: str = ...) -> None: ...
    def _release_ref(self, key: str) -> None: ...
    def _take_submissions_now(self) -> None: ...


class Future:
    """The eventual result of the task `key`, computed on the cluster.

    Attributes:
        key: the task's unique name.
    """

    __slots__ = ("_client", "_state", "_key", "__weakref__")

    # dask recognises this as a future inside a graph (a persisted
    # collection's graph maps each key to one): dask._task_spec makes it a
    # reference to the future's key.
    __dask_future__ = True

    def __init__(self, client: FutureOwner, key: str, state: FutureRecord | None):
        # (The record's handle count is the core's: the client counts this
        # handle in when it makes it, `HandlesMade`.) The record is None
        # only for a handle a blocking client's `submit` returned before
        # its loop took the task in; the loop fills it in (`_take_submissions`).
        self._client = client
        self._key = key
        self._state = state

    @property
    def key(self) -> str:
        """The task's unique name."""
        return self._key

    def _record(self) -> FutureRecord:
        """The record, for reading from any thread: if the client's loop
        has not yet taken this future's task in, it is asked to now."""
        if self._state is None:
            self._client._take_submissions_now()
            if self._state is None:
                raise RuntimeError(f"the future {self.key!r} was never taken in by its client, which has ended")
        return self._state

    # -- status -----------------------------------------------------------

    @property
    def status(self) -> str:
        """'pending', 'finished', 'error', 'cancelled' or 'lost'."""
        return self._record().status.value

    @property
    def client(self) -> Any:
        return self._client

    def done(self) -> bool:
        """True once the task has a value or a final failure."""
        return self._record().done()

    # -- results ------------------------------------------------------------

    def result(self, timeout: float | None = None) -> Any:
        """The value, or raise the task's failure.

        Raises:
            TimeoutError: not done within `timeout` seconds (the future
                stays valid and may complete later).
            Exception: the user's exception (with a `RemoteTraceback` cause),
                `KilledWorker`, `LostData` or `CancelledError`.
        """
        return self._client._call_result(self, timeout)

    def exception(self, timeout: float | None = None) -> Any:
        """The task's exception once done, or None if it finished."""
        return self._client._call(self._client._exception, self, timeout)

    def __await__(self):
        return self._client._result(self, None).__await__()

    # -- callbacks and control ------------------------------------------------

    def add_done_callback(self, fn: Callable[[Future], Any]) -> None:
        """Call ``fn(self)`` when the future is done (at once if it is).

        Callbacks run in the client's Trio thread and must not block.
        """
        self._client._call_soon(self._add_done_callback, fn)

    def _add_done_callback(self, fn: Callable[[Future], Any]) -> None:
        if self._state.done():
            fn(self)
        else:
            call_when_done(self._state, lambda: fn(self))

    def cancel(self) -> Any:
        """Cancel this future's task (see `Client.cancel`)."""
        return self._client._call(self._client.cancel, [self])

    def release(self) -> None:
        """Drop this handle now rather than when it is garbage collected."""
        client, self._client = self._client, None  # type: ignore[assignment]
        if client is not None:
            client._release_ref(self.key)

    def __del__(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            client._release_ref(self.key)

    def __repr__(self) -> str:
        status = "submitted" if self._state is None else self._state.status.value
        return f"<Future {self.key!r} {status}>"

    def __dask_tokenize__(self) -> str:
        return self.key

    def __reduce__(self):
        raise TypeError(
            "a trioflow Future cannot be pickled; pass it as an argument to "
            "submit() and the task receives its value"
        )
