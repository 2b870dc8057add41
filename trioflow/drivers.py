"""The driver loop of a server: the one task that owns its core, crash-only.

The scheduler and the worker each keep their core (`SchedulerState`,
`WorkerState`) behind a single task, the *driver*: every other task (a
connection's reader, a finished execution, a timer) posts a handler to the
driver's inbox, and the driver runs them one at a time, so the core needs
no lock. `run_driver` is that loop, shared by both shells.

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
import types
from collections.abc import Callable
from typing import Any

import trio

from trioflow.errors import DriverStopped

__all__ = ["run_driver"]

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


async def run_driver(
    inbox: trio.MemoryReceiveChannel[tuple[Callable, tuple]], server: Callable[[], str], logger: logging.Logger
) -> None:
    """Run each posted handler in turn; stop the server if one raises.

    Args:
        inbox: where other tasks post ``(handler, args)``.
        server: who this is, for the message ("the scheduler at tcp://..."),
            asked only then (the address is known once the server listens).
        logger: the server's logger; the failure is logged there (CRITICAL,
            with the traceback) before the server stops.

    Raises:
        DriverStopped: a handler raised; the message names the event being
            handled (or the handler, if it raised outside the core) and the
            exception, which is its ``__cause__``. Leaving the driver's
            nursery, it cancels the rest of the server.
    """
    async for handler, args in inbox:
        _run(handler, args, server, logger)
        # The burst: what else is waiting, with no checkpoint between
        # (BURST_HANDLERS says why and how far).
        deadline = trio.current_time() + BURST_SECONDS
        for _ in range(BURST_HANDLERS):
            if trio.current_time() >= deadline:
                break
            try:
                handler, args = inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            _run(handler, args, server, logger)


def _run(handler: Callable, args: tuple, server: Callable[[], str], logger: logging.Logger) -> None:
    """Run one handler; a handler that raises stops the server (`DriverStopped`)."""
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
            f"{server()} stops: {what} raised {type(exc).__name__}: {str(exc)[:300]} "
            "(crash-only: restart it; its peers resend what it needs)"
        )
        logger.critical("%s", message, exc_info=exc)
        raise DriverStopped(message) from exc


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
