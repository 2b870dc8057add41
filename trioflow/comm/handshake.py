"""The first exchange on every connection: who is calling, and may they.

The side that connects sends a `Hello` before anything else, alone in its
batch (`say_hello` flushes it). The side that accepts reads it under tiny
limits (`FrameLimits.before_hello`) within `handshake_timeout`, and then
either accepts the role (the connection's inbound channel and limits are
set for it) or answers `Refused` with a reason and closes. A connecting
side that hears `Refused`, or bytes that are not trioflow at all, raises
`HandshakeRefused` naming what answered, instead of retrying in the dark:
a client pointed at a worker's port says so at once.

Before the hello, both ends of the stream have already proved a credential
(`trioflow.comm.auth`); the hello's role must be one that credential allows.

`ConnectionGate` caps how many connections a server holds at once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import trio

from trioflow.comm.auth import CLIENT, CLUSTER
from trioflow.comm.connection import Connection
from trioflow.comm.frames import FrameLimits
from trioflow.comm.messages import PROTOCOL_VERSION, Hello, Refused, Welcome
from trioflow.comm.schema import clip
from trioflow.errors import CommClosedError, ProtocolError

logger = logging.getLogger("trioflow.comm")

__all__ = [
    "PROTOCOL_VERSION",
    "ConnectionGate",
    "HandshakeRefused",
    "await_welcome",
    "expect_hello",
    "say_hello",
]


class HandshakeRefused(CommClosedError):
    """The server refused us, or is not the kind of server we wanted."""


async def say_hello(conn: Connection, hello: Hello) -> None:
    """Send `hello` and wait until it is written, so it travels alone.

    Raises:
        CommClosedError: the connection closed first.
    """
    conn.send(hello)
    await conn.flush()


# The credential each role of a hello needs (`trioflow.comm.auth`): a client
# credential may talk to a scheduler as a client and fetch from workers;
# registering a worker and a nanny's control port need the cluster's.
CREDENTIALS_FOR_ROLE = {
    "client": frozenset({CLIENT, CLUSTER}),
    "worker": frozenset({CLUSTER}),
    "peer": frozenset({CLIENT, CLUSTER}),
    "control": frozenset({CLUSTER}),
}


async def expect_hello(
    conn: Connection,
    timeout: float,
    roles: Mapping[str, str],
    server: str,
    limits: FrameLimits,
    hint: str = "",
    *,
    authenticated: str,
) -> Hello:
    """Read the peer's hello and accept it for one of `roles`, or refuse it.

    Args:
        conn: a connection created with `FrameLimits.before_hello()` and the
            ``hello`` inbound channel.
        timeout: seconds the peer has to say hello (`handshake_timeout`).
        roles: the roles this server serves -> the inbound channel of each.
        server: what this server is, for refusals ("a trioflow worker's
            data port").
        limits: the limits that apply once the hello is accepted.
        hint: what a refused peer should do instead (": connect to ...").
        authenticated: the credential the peer proved before the hello
            (`auth.CLIENT` or `auth.CLUSTER`); the hello's role must be one
            that credential allows (`CREDENTIALS_FOR_ROLE`).

    Raises:
        ProtocolError: no hello in time, a bad one, or a role this server
            does not serve (a `Refused` is then on its way to the peer).
        CommClosedError: the peer hung up first.
    """
    with trio.move_on_after(timeout):
        try:
            batch = await conn.receive()
        except ProtocolError as exc:
            refuse(conn, f"a bad hello: {exc}")
        if len(batch) != 1:
            raise ProtocolError(f"a hello must come alone, got {len(batch)} messages")
        [hello] = batch
        if hello.protocol != PROTOCOL_VERSION:
            refuse(conn, f"{server} speaks trioflow protocol {PROTOCOL_VERSION}, not {clip(hello.protocol)}")
        if hello.role not in roles:
            wanted = " or ".join(sorted(roles))
            refuse(conn, f"this is {server}, which serves {wanted} connections, not {hello.role}s{hint}")
        if authenticated not in CREDENTIALS_FOR_ROLE[hello.role]:
            refuse(conn, f"a {authenticated} credential cannot connect as a {hello.role}")
        conn.inbound = roles[hello.role]
        conn.limits = limits
        return hello
    raise ProtocolError(f"no hello within {timeout:g} s (handshake_timeout)")


def refuse(conn: Connection, reason: str) -> None:
    """Tell the peer why it is being turned away, then raise for the caller.

    The refusal is written by `open_connection`'s final flush as the
    connection closes.

    Raises:
        ProtocolError: always, with `reason`.
    """
    try:
        conn.send(Refused(reason=reason))
    except CommClosedError:
        pass
    raise ProtocolError(reason)


async def await_welcome(conn: Connection, timeout: float, address: str, expected: str) -> tuple[Welcome, list]:
    """Wait for a server's `Welcome`; return it and whatever came with it.

    Args:
        expected: what we meant to reach ("a trioflow scheduler"), for errors.

    Raises:
        HandshakeRefused: the server refused us, answered with something
            other than a welcome, or does not speak trioflow at all.
        CommClosedError: no answer within `timeout`, or the connection broke.
    """
    try:
        with trio.move_on_after(timeout):
            first, *rest = await conn.receive() or [None]
            if isinstance(first, Welcome):
                return first, rest
            if isinstance(first, Refused):
                raise HandshakeRefused(f"{address} refused the connection: {first.reason}")
            raise HandshakeRefused(f"{address} is not {expected}: it answered with {clip(first)}")
    except ProtocolError as exc:
        raise HandshakeRefused(f"{address} is not {expected}: {exc}") from None
    raise CommClosedError(f"{address} did not answer within {timeout:g} s; is it {expected}?")


class ConnectionGate:
    """At most `limit` connections at once; the rest are closed on arrival.

    A refused connection costs its peer a closed socket and this process one
    log line (a summary at most every `LOG_EVERY_S` seconds, so a flood does
    not flood the log).
    """

    LOG_EVERY_S = 10.0

    def __init__(self, limit: int, server: str):
        self.limit = limit
        self.server = server
        self.open = 0
        self._refused = 0
        self._last_log = -float("inf")

    def try_enter(self) -> bool:
        if self.open >= self.limit:
            self._refused += 1
            now = trio.current_time()
            if now - self._last_log >= self.LOG_EVERY_S:
                logger.warning(
                    "%s refused %d connection(s): already at max_connections=%d",
                    self.server, self._refused, self.limit,
                )
                self._refused, self._last_log = 0, now
            return False
        self.open += 1
        return True

    def leave(self) -> None:
        self.open -= 1
