"""The `Network` interface: the only way trioflow opens or accepts streams.

Every shell (scheduler, worker, nanny, client) is handed a `Network` and
calls `connect` and `serve` on it; nothing else in the package touches a
socket (design.md §3 rule 1). `TCPNetwork` is the real one; the simulator
provides another with the same two methods, backed by in-memory streams on
which it injects latency, resets, black holes and partitions.

Addresses are strings, ``"tcp://127.0.0.1:8786"``; the simulator uses
``"sim://name"``.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio

from trioflow.errors import CommClosedError

StreamHandler = Callable[[trio.abc.Stream], Awaitable[None]]


class Network(abc.ABC):
    """Opens streams to addresses and serves streams at an address."""

    @abc.abstractmethod
    async def connect(self, address: str) -> trio.abc.Stream:
        """A new stream to `address`.

        Raises:
            OSError: nothing accepts connections there (the caller turns this
                into `CommClosedError` and applies its own timeout).
        """

    @abc.abstractmethod
    async def serve(
        self,
        handler: StreamHandler,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Accept streams forever, running `handler(stream)` for each.

        Reports the bound address (``tcp://host:port``) through
        `task_status`, so ``address = await nursery.start(net.serve, ...)``.
        """


def parse_address(address: str) -> tuple[str, str, int]:
    """Split ``"tcp://host:port"`` into its scheme, host and port.

    Raises:
        ValueError: the address is not of that form.
    """
    scheme, sep, rest = address.partition("://")
    if not sep or not scheme:
        raise ValueError(f"address {address!r} has no scheme (expected e.g. tcp://127.0.0.1:8786)")
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host:
        raise ValueError(f"address {address!r} has no port (expected e.g. tcp://127.0.0.1:8786)")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"address {address!r} has a non-numeric port {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"address {address!r} has port {port} outside 0..65535")
    return scheme, host.strip("[]"), port


def format_address(scheme: str, host: str, port: int) -> str:
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


class TCPNetwork(Network):
    """Plain TCP through Trio's socket streams (Nagle off, as Trio sets it)."""

    async def connect(self, address: str) -> trio.abc.Stream:
        scheme, host, port = parse_address(address)
        if scheme != "tcp":
            raise ValueError(f"TCPNetwork cannot reach {address!r}: scheme {scheme!r} is not tcp")
        return await trio.open_tcp_stream(host, port)

    async def serve(
        self,
        handler: StreamHandler,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound_port = listeners[0].socket.getsockname()[1]
        task_status.started(format_address("tcp", host, bound_port))
        await trio.serve_listeners(handler, listeners)


async def connect_with_timeout(network: Network, address: str, timeout: float) -> trio.abc.Stream:
    """`network.connect(address)`, as a `CommClosedError` when it fails.

    Raises:
        CommClosedError: refused, unreachable, or not within `timeout` seconds.
    """
    try:
        with trio.fail_after(timeout):
            return await network.connect(address)
    except trio.TooSlowError:
        raise CommClosedError(f"could not connect to {address} within {timeout:g} s") from None
    except OSError as exc:
        raise CommClosedError(f"could not connect to {address}: {exc.strerror or exc}") from None
