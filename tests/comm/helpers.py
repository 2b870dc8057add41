"""Helpers shared by the comm tests: small limits, connected pairs, an in-memory network."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import NoReturn

import trio
import trio.testing

from trioflow.comm import Connection, FrameLimits, Network, TCPNetwork, open_connection

# Small enough that tests can exceed every limit cheaply: a body (frame 0)
# and a buffer frame of 4 KiB each, 8 frames and 64 items per batch.
SMALL_LIMITS = FrameLimits(
    max_frame_bytes=4096, max_body_bytes=4096, max_frames=8, max_items=64, max_batch_bytes=64 * 1024
)
# Large enough for the big-value tests (a 64 MB buffer, a 16 MB body).
BIG_LIMITS = FrameLimits(max_frame_bytes=128 * 1024 * 1024, max_body_bytes=32 * 1024 * 1024)


@asynccontextmanager
async def connection_pair(
    limits: FrameLimits = SMALL_LIMITS,
    make_streams: Callable = trio.testing.memory_stream_pair,
    inbound: tuple[str | None, str | None] = (None, None),
) -> AsyncIterator[tuple[Connection, Connection]]:
    """Two running `Connection`s joined by an in-memory stream pair.

    `inbound` is the inbound channel of (left, right); None keeps raw maps.
    """
    left, right = make_streams()
    async with open_connection(left, limits, peer="left", inbound=inbound[0]) as a, open_connection(
        right, limits, peer="right", inbound=inbound[1]
    ) as b:
        yield a, b


@asynccontextmanager
async def tcp_connection_pair(
    inbound: str | None = None, limits: FrameLimits = SMALL_LIMITS
) -> AsyncIterator[tuple[Connection, Connection]]:
    """Two running `Connection`s over real loopback TCP: (connecting side, serving side)."""
    accepted: list[Connection] = []
    ready = trio.Event()

    async def handler(stream):
        async with open_connection(stream, limits, peer="client", inbound=inbound) as conn:
            accepted.append(conn)
            ready.set()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        network = TCPNetwork()
        address = await nursery.start(network.serve, handler, "127.0.0.1", 0)
        async with open_connection(await network.connect(address), limits, peer="server") as conn:
            with trio.fail_after(10):
                await ready.wait()
            yield conn, accepted[0]
        nursery.cancel_scope.cancel()


class MemoryNetwork(Network):
    """A `Network` of in-memory streams, for tests on a `MockClock`.

    `serve` registers a handler under ``sim://host:port``; `connect` starts
    that handler on one end of a fresh stream pair, in the server's nursery.
    """

    def __init__(self) -> None:
        self._servers: dict[str, tuple[Callable, trio.Nursery]] = {}
        self.connects = 0

    async def connect(self, address: str) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        entry = self._servers.get(address)
        if entry is None:
            raise OSError(f"nothing listens at {address}")
        handler, nursery = entry
        left, right = trio.testing.memory_stream_pair()
        nursery.start_soon(handler, right)
        self.connects += 1
        return left

    async def serve(
        self, handler, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        address = f"sim://{host}:{port}"
        async with trio.open_nursery() as nursery:
            self._servers[address] = (handler, nursery)
            try:
                task_status.started(address)
                await trio.sleep_forever()
            finally:
                del self._servers[address]
