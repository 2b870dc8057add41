"""`Future`: a handle on a task's eventual value, held by user code.

Each key a client knows has one `FutureState` (its status, failure and
holders), owned by the client's Trio thread. A `Future` is a cheap handle on
it; a key may have many handles. When the last handle is garbage collected
the client tells the scheduler it no longer wants the key, which is how
results get freed (design.md §2: "keys that no client holds ... are
forgotten").

The same `Future` class serves both clients. With `AsyncClient`, blocking
methods return awaitables (``await f``, ``await f.result()``); with `Client`
they block the calling thread while the client's Trio thread does the work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from trioflow.comm.serialize import Serialized
from trioflow.core.failures import Cancelled, DataLost, TaskFailure
from trioflow.protocol import failure_to_exception

if TYPE_CHECKING:
    from trioflow.client import AsyncClient

logger = logging.getLogger("trioflow.client")

PENDING = "pending"
FINISHED = "finished"
ERROR = "error"
CANCELLED = "cancelled"
LOST = "lost"


class FutureState:
    """What the client knows about one key. Touched only in the Trio thread.

    Kept small: a client may hold a million of these. The `trio.Event` a
    waiter needs (with its set of waiting tasks, 272 bytes) and the list of
    callbacks are made only for the states someone waits on or watches.
    """

    __slots__ = (
        "key", "status", "failure", "local_error", "who_has", "value", "version", "refs", "callbacks",
        "_done", "_event",
    )

    def __init__(self, key: str):
        self.key = key
        self.status = PENDING
        self.failure: TaskFailure | None = None
        # An error of this client's own (its scheduler connection is gone).
        self.local_error: BaseException | None = None
        # Workers the scheduler last said hold the value.
        self.who_has: tuple[str, ...] = ()
        # The pickled value itself, when it was small enough to come with
        # the report (no need to fetch it from a worker).
        self.value: Serialized | None = None
        # Bumped by every change, so an answer computed before a change can
        # be recognised as stale.
        self.version = 0
        # Live `Future` handles for this key.
        self.refs = 0
        # Called once when the state is done (None: nobody asked).
        self.callbacks: list[Callable[[], None]] | None = None
        self._done = False
        # Set when done; made by the first waiter (None: nobody waits).
        self._event: trio.Event | None = None

    def done(self) -> bool:
        return self._done

    async def wait(self) -> None:
        if self._done:
            await trio.lowlevel.checkpoint()
            return
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()

    def finish(self, who_has: tuple[str, ...], value: Serialized | None = None) -> None:
        self.version += 1
        self.status, self.failure, self.local_error, self.who_has = FINISHED, None, None, who_has
        self.value = value
        self._set_done()

    def fail(self, failure: TaskFailure) -> None:
        self.version += 1
        if isinstance(failure, Cancelled):
            self.status = CANCELLED
        elif isinstance(failure, DataLost):
            self.status = LOST
        else:
            self.status = ERROR
        self.failure = failure
        self._set_done()

    def fail_locally(self, error: BaseException) -> None:
        self.version += 1
        self.status, self.local_error = ERROR, error
        self._set_done()

    def lose(self) -> None:
        """The value is gone and is being recomputed: not done any more."""
        self.version += 1
        self.status = LOST
        self.who_has = ()
        self.value = None
        self._not_done()

    def reset(self) -> None:
        """Pending again (a cancelled key submitted anew)."""
        self.version += 1
        self.status, self.failure, self.local_error, self.who_has = PENDING, None, None, ()
        self._not_done()

    def exception(self) -> BaseException:
        if self.local_error is not None:
            return self.local_error
        assert self.failure is not None
        return failure_to_exception(self.failure)

    def add_callback(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once, when this state is next done."""
        if self.callbacks is None:
            self.callbacks = []
        self.callbacks.append(callback)

    def _not_done(self) -> None:
        if self._done:
            self._done = False
            self._event = None  # the next waiter makes a fresh one

    def _set_done(self) -> None:
        if self._event is not None:
            self._event.set()
        if self._done:
            return
        self._done = True
        callbacks, self.callbacks = self.callbacks, None
        for callback in callbacks or ():
            try:
                callback()
            except Exception:
                logger.exception("a done callback of %r raised", self.key)


class Future:
    """The eventual result of the task `key`, computed on the cluster.

    Attributes:
        key: the task's unique name.
    """

    __slots__ = ("_client", "_state", "__weakref__")

    # dask recognises this as a future inside a graph (a persisted
    # collection's graph maps each key to one): dask._task_spec makes it a
    # reference to the future's key.
    __dask_future__ = True

    def __init__(self, key: str, client: AsyncClient, state: FutureState):
        self._client = client
        self._state = state
        state.refs += 1

    @property
    def key(self) -> str:
        """The task's unique name (its state's: a handle need not keep it too)."""
        return self._state.key

    # -- status -----------------------------------------------------------

    @property
    def status(self) -> str:
        """'pending', 'finished', 'error', 'cancelled' or 'lost'."""
        return self._state.status

    @property
    def client(self) -> AsyncClient:
        return self._client

    def done(self) -> bool:
        """True once the task has a value or a final failure."""
        return self._state.done()

    # -- results ------------------------------------------------------------

    def result(self, timeout: float | None = None) -> Any:
        """The value, or raise the task's failure.

        Raises:
            TimeoutError: not done within `timeout` seconds (the future
                stays valid and may complete later).
            Exception: the user's exception (with a `RemoteTraceback` cause),
                `KilledWorker`, `LostData` or `CancelledError`.
        """
        return self._client._call(self._client._result, self, timeout)

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
            self._state.add_callback(lambda: fn(self))

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
        return f"<Future {self.key!r} {self.status}>"

    def __dask_tokenize__(self) -> str:
        return self.key

    def __reduce__(self):
        raise TypeError(
            "a trioflow Future cannot be pickled; pass it as an argument to "
            "submit() and the task receives its value"
        )
