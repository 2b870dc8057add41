"""`background_tasks`: a nursery for helpers that live exactly as long as a block.

Trio wraps every exception that leaves a nursery in an `ExceptionGroup`
(strict exception groups). That is right when several tasks can fail, but
many of our nurseries only hold helpers that never raise (a connection's
sender, a heartbeat loop, a pool's readers) next to a body that may: a
`CommClosedError` from the body should come out as itself, so callers can
catch it plainly. `background_tasks` does that and nothing else: a group
holding one exception is unwrapped; a real group (two failures at once)
is left alone (a `trio.Cancelled` beside one error does not count). When
the block ends, the helpers are cancelled.

`side_by_side` is the same nursery for tasks the block waits for: several
starts run at once, and the block ends when all have finished.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


@asynccontextmanager
async def background_tasks() -> AsyncIterator[trio.Nursery]:
    async with _lone_error_unwrapped(cancel_at_end=True) as nursery:
        yield nursery


@asynccontextmanager
async def side_by_side() -> AsyncIterator[trio.Nursery]:
    async with _lone_error_unwrapped(cancel_at_end=False) as nursery:
        yield nursery


@asynccontextmanager
async def _lone_error_unwrapped(*, cancel_at_end: bool) -> AsyncIterator[trio.Nursery]:
    lone: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            finally:
                if cancel_at_end:
                    nursery.cancel_scope.cancel(reason="the block they served ended")
    except BaseExceptionGroup as group:
        # A Cancelled beside a real error adds nothing: if an outer scope is
        # cancelled, Trio cancels again at the next checkpoint anyway.
        errors = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
        if len(errors) != 1:
            raise
        lone = errors[0]
    if lone is not None:
        # Raised outside the except clause so the group is not chained on.
        raise lone
