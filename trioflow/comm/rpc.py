"""Requests and replies on top of connections, and a pool of peer links.

Most traffic in trioflow is one-way (the scheduler streams orders, workers
stream reports). A few exchanges are questions that need an answer: a
worker fetching data from a peer, a client gathering results, `run`,
`scatter`. For those, a message carries a ``request_id`` and the answer
comes back as a `Reply` with the same id (or with an ``error`` text).
`Requests` matches the two on one connection and checks each reply
against what its request promises (`messages.reply_kind`): a reply that
breaks its declaration is a protocol error of the peer, and closes the
connection like any other. `ConnectionPool` keeps one long-lived
connection per peer address.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

import trioflow.comm.messages as messages
from trioflow.comm.auth import CLIENT, CLUSTER, Credentials, connect_authenticated
from trioflow.comm.connection import ByteBudget, Connection, open_connection
from trioflow.comm.frames import FrameLimits
from trioflow.comm.handshake import HandshakeRefused, say_hello
from trioflow.comm.liveness import loop_lag
from trioflow.comm.network import Network
from trioflow.comm.schema import Record
from trioflow.errors import AuthenticationError, CommClosedError, ProtocolError
from trioflow.nurseries import background_tasks

logger = logging.getLogger("trioflow.comm")


class RequestFailed(Exception):
    """The peer received the request but answered with an error."""


class _Pending:
    __slots__ = ("event", "reply", "error", "expected", "op")

    def __init__(self, expected: type[Record], op: str) -> None:
        self.event = trio.Event()
        self.reply: Record | None = None
        self.error: BaseException | None = None
        self.expected = expected
        self.op = op


class Requests:
    """The requests sent on one connection that still await a reply.

    Args:
        conn: the connection.
        channel: the channel requests travel on (it decides what a reply
            to `run` holds).
    """

    def __init__(self, conn: Connection, channel: str):
        self.conn = conn
        self.channel = channel
        self._ids = itertools.count()
        self._pending: dict[int, _Pending] = {}
        # When the oldest unanswered request was sent (None: nothing owed).
        self.waiting_since: float | None = None
        # Set (and replaced) whenever `waiting_since` turns on or off.
        self._changed = trio.Event()

    async def wait_for_change(self) -> None:
        """Return once requests start or stop awaiting replies."""
        await self._changed.wait()

    def _set_waiting(self, since: float | None) -> None:
        self.waiting_since = since
        self._changed.set()
        self._changed = trio.Event()

    async def call(self, message: messages.Message) -> Any:
        """Send `message` and wait for its reply's checked fields.

        Raises:
            CommClosedError: the connection closed before the reply came.
            RequestFailed: the peer replied with an error.

        Cancellation: safe; a reply that arrives later is discarded.
        """
        expected = messages.reply_kind(type(message), self.channel)
        assert expected is not None, f"{message.OP!r} is not a request on {self.channel}"
        request_id = next(self._ids)
        pending = self._pending[request_id] = _Pending(expected, message.OP)
        if self.waiting_since is None:
            self._set_waiting(trio.current_time())
        try:
            message.request_id = request_id
            self.conn.send(message)
            await pending.event.wait()
        finally:
            self._pending.pop(request_id, None)
            if not self._pending:
                self._set_waiting(None)
        if pending.error is not None:
            raise pending.error
        return pending.reply

    def send_unawaited(self, message: messages.Message) -> None:
        """Send the request `message` now; nobody waits for its reply, which
        is discarded when it comes (`deliver`). For requests that must go
        out in order with other messages, and whose answer only a log needs.

        Raises:
            CommClosedError: the connection is closed.
        """
        assert messages.reply_kind(type(message), self.channel) is not None
        message.request_id = next(self._ids)
        self.conn.send(message)

    def deliver(self, message: messages.Message) -> bool:
        """Hand a received reply to its waiting caller; False if not a reply.

        Raises:
            ProtocolError: the reply does not hold what its request promises.
        """
        if type(message) is not messages.Reply:
            return False
        pending = self._pending.get(message.request_id)
        if pending is None:
            return True  # its caller gave up (cancelled): nobody to tell
        if message.error is not None:
            pending.error = RequestFailed(message.error)
        else:
            pending.reply = message.checked(pending.expected, pending.op)
        pending.event.set()
        return True

    def fail_all(self, reason: str, error_type: type[CommClosedError] = CommClosedError) -> None:
        for pending in self._pending.values():
            pending.error = error_type(reason)
            pending.event.set()
        self._pending.clear()


def reply(conn: Connection, request: messages.Message, fields: Record | None = None, *, error: str | None = None) -> None:
    """Answer `request` on `conn` (quietly, if the asker has gone).

    An answer too large to travel becomes an error reply that says so: an
    exchange either succeeds or gets a clear error, never silence.
    """
    assert request.request_id is not None
    try:
        try:
            conn.send(messages.Reply(request.request_id, fields, error))
        except ProtocolError as exc:
            conn.send(messages.Reply(request.request_id, None, f"the answer cannot travel: {exc}"))
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
    next call opens a fresh connection. A link unused for half the
    servers' `idle_timeout` is closed by the pool itself, before the server
    would close it under a request in flight.

    Args:
        role: the role of our hello: ``"peer"`` (to workers' ports) or
            ``"control"`` (the scheduler to nannies).
        idle_timeout: the servers' idle timeout (see above).
        peer_timeout: a peer that owes an answer and sends no byte for this
            long is hung: the link is closed and its callers get
            `CommClosedError`.
    """

    def __init__(
        self, network: Network, limits: FrameLimits, role: str, connect_timeout: float,
        nursery: trio.Nursery, peer_timeout: float = math.inf, idle_timeout: float = math.inf,
        budget: ByteBudget | None = None, credentials: Credentials | None = None,
    ):
        self.network = network
        self.limits = limits
        self.role = role
        self.credentials = credentials if credentials is not None else Credentials.none()
        # The credential our links prove: the cluster's where we hold it.
        self.auth_role = CLUSTER if self.credentials.is_cluster else CLIENT
        self.outbound, self.inbound = messages.ROLE_CHANNELS[role]
        self.connect_timeout = connect_timeout
        self.peer_timeout = peer_timeout
        self.idle_timeout = idle_timeout
        self.budget = budget
        self._nursery = nursery
        self._links: dict[str, _PeerLink] = {}

    async def call(self, address: str, message: messages.Message) -> Any:
        """Send a request to the peer at `address` and wait for the reply.

        Raises:
            CommClosedError: the peer cannot be reached (or `address` is
                malformed) or the link broke.
            RequestFailed: the peer answered with an error.
        """
        for _ in range(2):
            link = self._links.get(address)
            if link is None:
                link = self._links[address] = _PeerLink()
                self._nursery.start_soon(self._run_link, address, link)
            await link.ready.wait()
            if link.requests is None:
                raise CommClosedError(link.error or f"no connection to {address}")
            if link.requests.conn.closed and self._links.get(address) is not link:
                continue  # closed for idleness as we got it: open a fresh one
            return await link.requests.call(message)
        raise CommClosedError(f"no connection to {address}")

    async def _run_link(self, address: str, link: _PeerLink) -> None:
        error_type: type[CommClosedError] = CommClosedError
        try:
            stream = await connect_authenticated(
                self.network, address, self.credentials, self.auth_role, self.connect_timeout
            )
        except (CommClosedError, AuthenticationError, ValueError) as exc:  # ValueError: a malformed address
            link.error = str(exc)
            self._links.pop(address, None)
            link.ready.set()
            return
        try:
            async with open_connection(
                stream, self.limits, peer=address, inbound=self.inbound, budget=self.budget
            ) as conn:
                await say_hello(conn, messages.Hello(role=self.role, protocol=messages.PROTOCOL_VERSION))
                link.requests = Requests(conn, self.outbound)
                link.ready.set()
                async with background_tasks() as helpers:
                    helpers.start_soon(self._watch, conn, link.requests, address)
                    while True:
                        # Handed over in a call, so that no local variable here
                        # keeps the last answer (and the value it carried) alive
                        # while the next one is awaited.
                        _deliver(link.requests, address, await conn.receive())
        except HandshakeRefused as exc:
            link.error, error_type = str(exc), HandshakeRefused
        except (CommClosedError, ProtocolError) as exc:
            link.error, error_type = f"connection to {address} lost: {exc}", CommClosedError
        finally:
            if self._links.get(address) is link:
                del self._links[address]
            if link.requests is not None:
                link.requests.fail_all(link.error or f"connection to {address} closed", error_type)
            link.ready.set()

    async def _watch(self, conn: Connection, requests: Requests, address: str) -> None:
        """Close the link when the peer owes an answer and has gone silent
        (for `peer_timeout` of our loop's responsive time: a stall of our
        own loop is not the peer's silence), or when nobody has used it for
        half the servers' idle timeout."""
        unused_after = self.idle_timeout / 2
        lag = loop_lag()
        while True:
            if requests.waiting_since is not None:
                deadline = lag.deadline(max(conn.last_received, requests.waiting_since), self.peer_timeout)
                if trio.current_time() >= deadline:
                    await conn.aclose(f"no answer for {self.peer_timeout:g} s (peer_timeout)")
                    return
            else:
                deadline = max(conn.last_received, conn.last_sent) + unused_after
                if trio.current_time() >= deadline:
                    self.forget(address)
                    await conn.aclose("unused")
                    return
            # Look again at the deadline, or sooner if requests start or stop.
            with trio.move_on_at(deadline):
                await requests.wait_for_change()

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
    peer_timeout: float = math.inf,
    idle_timeout: float = math.inf,
    budget: ByteBudget | None = None,
    credentials: Credentials | None = None,
) -> AsyncIterator[ConnectionPool]:
    async with background_tasks() as nursery:
        yield ConnectionPool(
            network, limits, role, connect_timeout, nursery, peer_timeout, idle_timeout, budget, credentials
        )


def _deliver(requests: Requests, address: str, batch: list) -> None:
    """Hand each answer of `batch` to the request waiting for it."""
    for message in batch:
        if type(message) is messages.Refused:
            raise HandshakeRefused(f"{address} refused the connection: {message.reason}")
        if not requests.deliver(message):
            raise ProtocolError(f"unexpected {message.OP!r} from {address}")
