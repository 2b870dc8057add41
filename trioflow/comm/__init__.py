"""How trioflow processes talk: framing, serialization, networks, requests.

See docs/protocol.md for the bytes and every message op.
"""

from trioflow.comm.connection import Connection, open_connection
from trioflow.comm.frames import FrameLimits
from trioflow.comm.handshake import PROTOCOL_VERSION, expect_hello, say_hello
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
from trioflow.comm.serialize import (
    Serialized,
    dumps,
    dumps_function,
    loads,
    loads_function,
)

__all__ = [
    "PROTOCOL_VERSION",
    "Connection",
    "ConnectionPool",
    "FrameLimits",
    "Network",
    "RequestFailed",
    "Requests",
    "Serialized",
    "TCPNetwork",
    "connect_with_timeout",
    "dumps",
    "dumps_function",
    "expect_hello",
    "loads",
    "loads_function",
    "open_connection",
    "open_connection_pool",
    "parse_address",
    "reply",
    "say_hello",
]
