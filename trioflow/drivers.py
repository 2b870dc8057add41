"""The driver of a server: the one place its core is touched, crash-only.

The scheduler and the worker each keep their core (`SchedulerState`,
`WorkerState`) behind a *driver*: every other task (a connection's reader,
a finished execution, a timer) hands it a handler, and it runs them one at
a time, in the order handed, so the core needs no lock. Most handlers wait
in the driver's inbox for its task; one handed over while the driver is
idle runs at once, in the task that handed it (`Driver.run_or_post` says
why that keeps the order and the bound on a stall). `Driver` is shared by
both shells.

Why crash-only
--------------
A handler that raises is a bug: bad input from a peer never gets this far
(it is refused at the edge, `comm/schema.py`, and closes one connection).
If the bug is in the core, the event was applied only in part: the
transitions made before the exception stay made, and the messages already
decided are lost with the exception. The server could go on, but with a
state that no longer matches what its peers were told, and every later
decision would build on that. The other way out, a transactional `handle`
(copy, apply, keep the copy only if nothing raised), would cost a copy of
the records on every event, or an undo log through every transition.

trioflow already knows how to rebuild a server from its peers, which it has
to for crashes anyway: a restarted scheduler is re-told what the workers
hold and run and what the clients want (docs/resilience.md, "The scheduler
dies"), and a nanny restarts a dead worker whose tasks the scheduler
reroutes. So a raising handler stops the server, loudly: the log and the
`DriverStopped` that ends `serve` name the event and the exception, and
whoever started the server restarts it. A bug then costs a restart, never
a silently wrong cluster.
"""

from __future__ import annotations

import logging
import math
import types
from collections.abc import Callable
from typing import Any

import trio

from trioflow.comm.connection import writing_through
from trioflow.errors import DriverStopped

__all__ = ["Driver"]

# After a handler, the driver runs the handlers already waiting in its inbox
# one after another, without a checkpoint between them, up to this many more
# or until this much of the loop's clock has passed; then it lets the other
# tasks run. Why: each checkpoint between two handlers lets every
# connection's sender write what the last handler queued, so a busy driver
# wrote once (and woke a peer, in a LocalCluster often a thread of its own
# process that then takes the GIL) per handler. Run together, the handlers'
# messages go out together: for 40,000 tasks of W1 (under cProfile) the
# scheduler's loop went round 41,282 times and wrote 15,342 times, and with
# bursts 2,492 and 2,904 times (docs/performance.md, W1). A handler is
# bounded work (the scheduler's readers post slices of a few milliseconds
# at most), so the bound on a burst is the time: a burst starts no handler
# once 2 ms have passed. Under the chaos lab's virtual clock no time passes
# while handlers run, and the count bounds it.
BURST_HANDLERS = 32
BURST_SECONDS = 0.002
# False: every handler waits for the driver's task, as before `run_or_post`
# ran one at once (a switch for measuring the difference:
# benchmarks/toggle_ab.py driver-at-once).
RUN_WHEN_IDLE = True


class Driver:
    """A server's driver: its inbox, and the loop that runs what is posted.

    Handlers come in two ways. `post` queues one for the driver's task
    (`run`), which runs them in the order posted. `run_or_post` runs one at
    once, in the calling task, when the driver is idle: nothing queued and
    no handler running. That keeps the guarantee (one handler at a time,
    in the order handed over) and saves a pass of the loop: the driver's
    task would have woken a pass later to run the handler, and what the
    handler queues for the senders would have been written a pass after
    that. In a round trip of W2 such a pass came on every read of the
    scheduler and of the worker (docs/performance.md, W2). A handler that
    hands over another (the core's timers, say) always queues it, so
    handlers never nest.

    `run_or_post` is for a task that has just checkpointed (a reader after
    `Connection.receive`, which always is one; an execution after its
    thread): it then runs one handler per step, as the driver would
    without a burst, so the stall bound stays one handler's work. A task
    that hands over several handlers in one step posts all but the first
    (the scheduler's reader does, for the slices of a big batch).
    """

    def __init__(self, server: Callable[[], str], logger: logging.Logger):
        """
        Args:
            server: who this is, for the message if a handler raises ("the
                scheduler at tcp://..."); asked only then (the address is
                known once the server listens).
            logger: the server's logger; a handler's failure is logged
                there (CRITICAL, with the traceback) before the server stops.
        """
        self._send, self._inbox = trio.open_memory_channel[tuple[Callable | None, tuple]](math.inf)
        self._server = server
        self._logger = logger
        # Posted and not yet run: while any are, a new handler must queue
        # behind them, or it would overtake them.
        self._queued = 0
        self._running = False
        # Set when a handler run by `run_or_post` raised: the driver's task
        # raises it (so the server stops the same way whichever task ran
        # the handler), and nothing else runs meanwhile.
        self._stopped: DriverStopped | None = None

    def post(self, handler: Callable, *args: Any) -> None:
        """Queue ``handler(*args)``; the driver's task runs it in turn."""
        if self._stopped is not None:
            return  # the server is stopping: nothing more runs
        self._queued += 1
        self._send.send_nowait((handler, args))

    def run_or_post(self, handler: Callable, *args: Any) -> None:
        """Run ``handler(*args)`` now if the driver is idle, else `post` it.

        A handler that raises stops the server all the same: the driver's
        task raises its `DriverStopped`, which ends `serve`; the caller
        carries on until then, and what it posts meanwhile never runs.
        """
        if self._queued or self._running or self._stopped is not None or not RUN_WHEN_IDLE:
            self.post(handler, *args)
            return
        try:
            with writing_through():
                self._run_one(handler, args)
        except DriverStopped:
            self._send.send_nowait((None, ()))  # wakes the driver's task to raise it

    async def run(self) -> None:
        """Run each posted handler in turn; stop the server if one raises.

        Raises:
            DriverStopped: a handler raised; the message names the event
                being handled (or the handler, if it raised outside the
                core) and the exception, which is its ``__cause__``. Leaving
                the driver's nursery, it cancels the rest of the server.
        """
        async for handler, args in self._inbox:
            # The burst's messages are written as it ends (`writing_through`).
            with writing_through():
                self._run_queued(handler, args)
                # The burst: what else is waiting, with no checkpoint between
                # (BURST_HANDLERS says why and how far).
                deadline = trio.current_time() + BURST_SECONDS
                for _ in range(BURST_HANDLERS):
                    if trio.current_time() >= deadline:
                        break
                    try:
                        handler, args = self._inbox.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    self._run_queued(handler, args)
            # Hold nothing while waiting: the next handler may come much
            # later (those handed over meanwhile can all run at once), and
            # the arguments of the last one can be a value the core has
            # since dropped, whose memory would stay taken.
            del handler, args

    def _run_queued(self, handler: Callable | None, args: tuple) -> None:
        if handler is None:  # a handler run at once raised (`run_or_post`)
            assert self._stopped is not None
            raise self._stopped
        self._queued -= 1
        self._run_one(handler, args)

    def _run_one(self, handler: Callable, args: tuple) -> None:
        """Run one handler, marked as running; one that raises stops the
        driver (`DriverStopped`, logged CRITICAL with the traceback)."""
        self._running = True
        try:
            handler(*args)
        except Exception as exc:
            event = _event_in_hand(exc.__traceback__) or _event_in(args)
            what = (
                f"handling {type(event).__name__} (stimulus {event.stimulus_id!r})"
                if event is not None
                else f"running {getattr(handler, '__name__', handler)!r}"
            )
            message = (
                f"{self._server()} stops: {what} raised {type(exc).__name__}: {str(exc)[:300]} "
                "(crash-only: restart it; its peers resend what it needs)"
            )
            self._logger.critical("%s", message, exc_info=exc)
            self._stopped = DriverStopped(message)
            raise self._stopped from exc
        finally:
            self._running = False


def _event_in_hand(tb: types.TracebackType | None) -> Any:
    """The event a core's `handle(event)` was applying when it raised, if so.

    Found in the traceback rather than tracked: the handlers reach the core
    through several layers of the shell (a batch of messages, each turned
    into an event and applied), and the frame of `handle` is the one place
    that knows for sure. The outermost such frame is the event the shell
    applied.
    """
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "handle":
            event = frame.f_locals.get("event")
            if hasattr(event, "stimulus_id"):
                return event
        tb = tb.tb_next
    return None


def _event_in(args: tuple) -> Any:
    """An event posted as the handler's argument (``_post(_apply, event)``)."""
    return next((arg for arg in args if hasattr(arg, "stimulus_id")), None)
