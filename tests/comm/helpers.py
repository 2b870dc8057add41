"""Helpers shared by the comm tests: small limits and connected pairs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio
import trio.testing

from trioflow.comm import Connection, FrameLimits, open_connection

# Small enough that tests can exceed every limit cheaply.
SMALL_LIMITS = FrameLimits(max_frame_bytes=4096, max_frames=8, max_items=64)
# Large enough for the big-buffer tests.
BIG_LIMITS = FrameLimits(max_frame_bytes=128 * 1024 * 1024)


@asynccontextmanager
async def connection_pair(
    limits: FrameLimits = SMALL_LIMITS,
    make_streams: Callable = trio.testing.memory_stream_pair,
) -> AsyncIterator[tuple[Connection, Connection]]:
    """Two running `Connection`s joined by an in-memory stream pair."""
    left, right = make_streams()
    async with open_connection(left, limits, peer="left") as a, open_connection(
        right, limits, peer="right"
    ) as b:
        yield a, b

