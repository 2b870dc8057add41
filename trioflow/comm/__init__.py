"""How trioflow processes talk: framing, messages, serialization, networks, requests.

`messages` declares every op (the protocol); `schema` is the vocabulary it
is declared in. See docs/protocol.md for the bytes and every op.
"""

from trioflow.comm import messages
from trioflow.comm.connection import ByteBudget, Connection, PeerSilent, open_connection
from trioflow.comm.liveness import LoopLag, loop_lag
from trioflow.comm.frames import FrameLimits
from trioflow.comm.handshake import (
    PROTOCOL_VERSION,
    ConnectionGate,
    HandshakeRefused,
    await_welcome,
    expect_hello,
    say_hello,
)
from trioflow.comm.network import (
    Network,
    TCPNetwork,
    connect_with_timeout,
    parse_address,
)
from trioflow.comm.rpc import (
    ConnectionPool,
    RequestFailed,
    Requests,
    open_connection_pool,
    reply,
)
from trioflow.comm.schema import clip
from trioflow.comm.serialize import (
    Serialized,
    dumps,
    dumps_function,
    loads,
    loads_function,
)

__all__ = [
    "PROTOCOL_VERSION",
    "ByteBudget",
    "Connection",
    "ConnectionGate",
    "ConnectionPool",
    "FrameLimits",
    "HandshakeRefused",
    "LoopLag",
    "Network",
    "PeerSilent",
    "RequestFailed",
    "Requests",
    "Serialized",
    "TCPNetwork",
    "await_welcome",
    "clip",
    "connect_with_timeout",
    "dumps",
    "dumps_function",
    "expect_hello",
    "loads",
    "loads_function",
    "loop_lag",
    "messages",
    "open_connection",
    "open_connection_pool",
    "parse_address",
    "reply",
    "say_hello",
]
