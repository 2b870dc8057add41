"""Requests and replies on top of connections, and a pool of peer links.

Most traffic in trioflow is one-way (the scheduler streams orders, workers
stream reports). A few exchanges are questions that need an answer: a
worker fetching data from a peer, a client gathering results, `run`,
`scatter`. For those, a message carries a ``request_id`` and the answer
comes back as ``{"op": "reply", "request_id": ..., ...}`` (or with an
``"error"`` string). `Requests` matches the two on one connection;
`ConnectionPool` keeps one long-lived connection per peer address.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from trioflow.comm.connection import Connection, open_connection
from trioflow.comm.frames import FrameLimits
from trioflow.comm.handshake import say_hello
from trioflow.comm.network import Network, connect_with_timeout
from trioflow.errors import CommClosedError, ProtocolError
from trioflow.nurseries import background_tasks

logger = logging.getLogger("trioflow.comm")


class RequestFailed(Exception):
    """The peer received the request but answered with an error."""


class _Pending:
    __slots__ = ("event", "reply", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: dict[str, Any] | None = None
        self.error: BaseException | None = None


class Requests:
    """The requests sent on one connection that still await a reply."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._ids = itertools.count()
        self._pending: dict[int, _Pending] = {}
        # When the oldest unanswered request was sent (None: nothing owed).
        self.waiting_since: float | None = None
        self._now_waiting = trio.Event()

    async def wait_until_waiting(self) -> None:
        """Return once at least one request awaits its reply."""
        while self.waiting_since is None:
            await self._now_waiting.wait()

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send `message` and wait for its reply.

        Raises:
            CommClosedError: the connection closed before the reply came.
            RequestFailed: the peer replied with an error.

        Cancellation: safe; a reply that arrives later is discarded.
        """
        request_id = next(self._ids)
        pending = self._pending[request_id] = _Pending()
        if self.waiting_since is None:
            self.waiting_since = trio.current_time()
            self._now_waiting.set()
            self._now_waiting = trio.Event()
        try:
            self.conn.send({**message, "request_id": request_id})
            await pending.event.wait()
        finally:
            self._pending.pop(request_id, None)
            if not self._pending:
                self.waiting_since = None
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        if "error" in pending.reply:
            raise RequestFailed(pending.reply["error"])
        return pending.reply

    def deliver(self, message: dict[str, Any]) -> bool:
        """Hand a received message to its waiting caller; False if not a reply."""
        if message["op"] != "reply":
            return False
        pending = self._pending.get(message.get("request_id"))  # type: ignore[arg-type]
        if pending is not None:
            pending.reply = message
            pending.event.set()
        return True

    def fail_all(self, reason: str) -> None:
        for pending in self._pending.values():
            pending.error = CommClosedError(reason)
            pending.event.set()
        self._pending.clear()


def reply(conn: Connection, request: dict[str, Any], **fields: Any) -> None:
    """Answer `request` on `conn` (quietly, if the asker has gone)."""
    try:
        conn.send({"op": "reply", "request_id": request.get("request_id"), **fields})
    except CommClosedError:
        pass


class _PeerLink:
    __slots__ = ("ready", "requests", "error")

    def __init__(self) -> None:
        self.ready = trio.Event()
        self.requests: Requests | None = None
        self.error: str | None = None


class ConnectionPool:
    """One long-lived connection per peer address, opened on first use.

    Each link has a reader task in the pool's nursery that delivers replies;
    when a link breaks, its waiting callers get `CommClosedError` and the
    next call opens a fresh connection.
    """

    def __init__(
        self, network: Network, limits: FrameLimits, role: str, connect_timeout: float,
        nursery: trio.Nursery, idle_timeout: float = math.inf,
    ):
        self.network = network
        self.limits = limits
        self.role = role
        self.connect_timeout = connect_timeout
        # A peer that owes us an answer and sends no byte for this long is
        # hung: the link is closed and its callers get CommClosedError.
        self.idle_timeout = idle_timeout
        self._nursery = nursery
        self._links: dict[str, _PeerLink] = {}

    async def call(self, address: str, message: dict[str, Any]) -> dict[str, Any]:
        """Send a request to the peer at `address` and wait for the reply.

        Raises:
            CommClosedError: the peer cannot be reached (or `address` is
                malformed) or the link broke.
            RequestFailed: the peer answered with an error.
        """
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = _PeerLink()
            self._nursery.start_soon(self._run_link, address, link)
        await link.ready.wait()
        if link.requests is None:
            raise CommClosedError(link.error or f"no connection to {address}")
        return await link.requests.call(message)

    async def _run_link(self, address: str, link: _PeerLink) -> None:
        try:
            stream = await connect_with_timeout(self.network, address, self.connect_timeout)
        except (CommClosedError, ValueError) as exc:  # ValueError: a malformed address
            link.error = str(exc)
            self._links.pop(address, None)
            link.ready.set()
            return
        try:
            async with open_connection(stream, self.limits, peer=address) as conn:
                say_hello(conn, self.role)
                link.requests = Requests(conn)
                link.ready.set()
                async with background_tasks() as helpers:
                    helpers.start_soon(self._watch, conn, link.requests)
                    while True:
                        for message in await conn.receive():
                            link.requests.deliver(message)
        except (CommClosedError, ProtocolError) as exc:
            link.error = f"connection to {address} lost: {exc}"
        finally:
            if self._links.get(address) is link:
                del self._links[address]
            if link.requests is not None:
                link.requests.fail_all(link.error or f"connection to {address} closed")
            link.ready.set()

    async def _watch(self, conn: Connection, requests: Requests) -> None:
        """Close the link when the peer owes an answer and has gone silent."""
        if self.idle_timeout == math.inf:
            return
        while True:
            await requests.wait_until_waiting()
            assert requests.waiting_since is not None
            deadline = max(conn.last_received, requests.waiting_since) + self.idle_timeout
            if trio.current_time() >= deadline:
                await conn.aclose(f"no answer for {self.idle_timeout:g} s (peer_timeout)")
                return
            await trio.sleep_until(deadline)

    def forget(self, address: str) -> None:
        """Drop the link to `address` (its reader ends when the peer closes)."""
        self._links.pop(address, None)


@asynccontextmanager
async def open_connection_pool(
    network: Network,
    limits: FrameLimits,
    *,
    role: str,
    connect_timeout: float,
    idle_timeout: float = math.inf,
) -> AsyncIterator[ConnectionPool]:
    async with background_tasks() as nursery:
        yield ConnectionPool(network, limits, role, connect_timeout, nursery, idle_timeout)
