"""The first message on every connection: who is calling, speaking what.

The side that connects sends ``{"op": "hello", "role": ..., "protocol": N}``
before anything else; the side that accepts reads it with `expect_hello`
and closes the connection if it is missing, late, or of a protocol version
it does not speak. (Authentication, when a shared secret is configured,
will slot in here: a challenge and an HMAC before the hello is accepted.)
"""

from __future__ import annotations

from typing import Any

import trio

from trioflow.comm.connection import Connection
from trioflow.errors import ProtocolError

PROTOCOL_VERSION = 1
ROLES = frozenset({"client", "worker", "peer", "nanny", "control"})


def say_hello(conn: Connection, role: str, **fields: Any) -> None:
    """Queue the hello message that must open every connection."""
    conn.send({"op": "hello", "role": role, "protocol": PROTOCOL_VERSION, **fields})


async def expect_hello(
    conn: Connection, timeout: float, roles: frozenset[str] = ROLES
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read the peer's hello; return it and any messages that came with it.

    Raises:
        ProtocolError: no hello within `timeout`, a bad one, or a role not
            in `roles`.
        CommClosedError: the peer hung up first.
    """
    with trio.move_on_after(timeout):
        batch = await conn.receive()
        if not batch:  # a valid but empty batch: still not a hello
            raise ProtocolError("expected a hello message first, got an empty batch")
        hello, rest = batch[0], batch[1:]
        if hello["op"] != "hello":
            raise ProtocolError(f"expected a hello message first, got op {hello['op']!r}")
        if hello.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError(
                f"peer speaks protocol {hello.get('protocol')!r}, this process speaks {PROTOCOL_VERSION}"
            )
        if hello.get("role") not in roles:
            raise ProtocolError(f"unexpected role {hello.get('role')!r} (expected one of {sorted(roles)})")
        return hello, rest
    raise ProtocolError(f"no hello within {timeout:g} s")
