"""`Door`: how a server lets a connection in, the same way at every port.

The scheduler's port, a worker's data port and a nanny's control port all
admit a connection in the same four steps, in this order, each one cheap
enough to refuse a stranger before the next costs anything:

1. the connection cap (`ConnectionGate`, `max_connections`);
2. authentication (`auth.accept_authenticated`): 70 bytes at most, before
   any msgpack;
3. the hello, read under tiny limits (`handshake.expect_hello`), for a role
   this port serves and the proven credential allows;
4. the connection's normal limits and inbound channel, set by the hello.

`Door.admit` does all four and hands the server a typed `Connection` and
the peer's `Hello`, or nothing (the refusal is logged, clipped, once).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import trio

import trioflow.comm.messages as m
from trioflow.comm.auth import Credentials, accept_authenticated
from trioflow.comm.connection import ByteBudget, Connection, open_connection
from trioflow.comm.frames import FrameLimits
from trioflow.comm.handshake import ConnectionGate, expect_hello
from trioflow.comm.schema import clip
from trioflow.config import Config
from trioflow.errors import CommClosedError, ProtocolError

logger = logging.getLogger("trioflow.comm")


class Door:
    """One server port's admission: who may come in, and how they must say hello.

    Args:
        server: what this port is, for logs and refusals ("a trioflow scheduler").
        config: the timeouts and limits (`handshake_timeout`,
            `max_connections`, `min_transfer_rate`, the frame limits).
        credentials: what the peer must prove.
        credential_roles: the credentials this port accepts (`auth.CLIENT`,
            `auth.CLUSTER`).
        roles: the hello roles this port serves -> their inbound channel.
        budget: the process's bytes in flight.
        hint: what a refused peer should do instead.
    """

    def __init__(
        self,
        server: str,
        *,
        config: Config,
        credentials: Credentials,
        credential_roles: frozenset[str],
        roles: Mapping[str, str],
        budget: ByteBudget | None = None,
        hint: str = "",
    ):
        self.server = server
        self.config = config
        self.credentials = credentials
        self.credential_roles = credential_roles
        self.roles = dict(roles)
        self.budget = budget
        self.hint = hint
        self.limits = FrameLimits.from_config(config)
        self.gate = ConnectionGate(config.max_connections, server)

    @asynccontextmanager
    async def admit(self, stream: trio.abc.Stream) -> AsyncIterator[tuple[Connection, m.Hello] | None]:
        """The connection and its hello, for the block; None if it was refused.

        The door owns `stream`: it is closed when the block ends, however it
        ends. A server stopping (a polite restart) cancels handlers that may
        not have opened their connection yet; a stream left open then kept
        its peer waiting out its whole connect timeout for an authentication
        answer (seed 356 of the chaos lab's restart mix: a fetch stalled
        10 s on a connection accepted 1 ms before the server stopped).
        """
        if not self.gate.try_enter():
            await stream.aclose()
            yield None
            return
        try:
            authenticated = await accept_authenticated(
                stream, self.credentials, self.credential_roles, self.config.handshake_timeout, self.server
            )
            if authenticated is None:
                yield None
                return
            async with open_connection(
                stream,
                FrameLimits.before_hello(),
                peer="new connection",
                inbound=m.HELLO,
                budget=self.budget,
                send_limits=self.limits,
                min_transfer_rate=self.config.min_transfer_rate,
            ) as conn:
                try:
                    hello = await expect_hello(
                        conn,
                        self.config.handshake_timeout,
                        self.roles,
                        self.server,
                        self.limits,
                        self.hint,
                        authenticated=authenticated,
                    )
                except (ProtocolError, CommClosedError) as exc:
                    logger.warning("%s: closing a connection before its hello completed: %s", self.server, clip(str(exc), 300))
                    yield None
                    return
                yield conn, hello
        finally:
            self.gate.leave()
            await trio.aclose_forcefully(stream)
