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
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NoReturn

import trio

from trioflow.errors import CommClosedError

if TYPE_CHECKING:
    from trioflow.comm.security import Security

logger = logging.getLogger("trioflow.comm")

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


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def advertised_address(bound: str, towards: str) -> str:
    """The address others should dial to reach a server bound at `bound`.

    A server bound to a wildcard (``tcp://0.0.0.0:PORT``) listens on every
    interface, but "0.0.0.0" reaches nothing from elsewhere: advertise the
    local address this machine uses to reach `towards` (the scheduler)
    instead. Found by "connecting" a UDP socket, which sends no packet.
    """
    scheme, host, port = parse_address(bound)
    if host not in WILDCARD_HOSTS:
        return bound
    _, peer_host, peer_port = parse_address(towards)
    family = socket.AF_INET6 if ":" in host or ":" in peer_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((peer_host, peer_port or 9))
            local = probe.getsockname()[0]
        except OSError:
            local = "127.0.0.1" if family == socket.AF_INET else "::1"
    return format_address(scheme, local, port)


def format_address(scheme: str, host: str, port: int) -> str:
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


# trio.SSLStream moves bytes through OpenSSL's memory buffers. Measured
# here: a 256 MiB value written in one call spends most of its time growing
# that buffer (about 60 MB/s in all); written in slices of 256 KiB, read in
# pieces of at most 64 KiB (one call allocates what it asks for), and with
# the socket read 1 MiB at a time, the same transfer runs at about 300 MB/s
# in one process. These sizes are what `TLSStream` uses.
TLS_WRITE_SLICE = 256 * 1024
TLS_READ_BYTES = 64 * 1024
TLS_SOCKET_READ_BYTES = 1 << 20


class _LargeReads(trio.abc.Stream):
    """A socket stream whose unbounded reads take up to `TLS_SOCKET_READ_BYTES`."""

    def __init__(self, inner: trio.abc.Stream):
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(TLS_SOCKET_READ_BYTES if max_bytes is None else max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class TLSStream(trio.abc.Stream):
    """`trio.SSLStream`, with writes sliced and reads capped (see above)."""

    def __init__(self, ssl_stream: trio.SSLStream):
        self.ssl_stream = ssl_stream

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with memoryview(data) as view:
            for start in range(0, max(len(view), 1), TLS_WRITE_SLICE):
                await self.ssl_stream.send_all(view[start : start + TLS_WRITE_SLICE])

    async def wait_send_all_might_not_block(self) -> None:
        await self.ssl_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.ssl_stream.receive_some(min(max_bytes or TLS_READ_BYTES, TLS_READ_BYTES))

    async def aclose(self) -> None:
        await self.ssl_stream.aclose()


class TCPNetwork(Network):
    """TCP through Trio's socket streams (Nagle off, as Trio sets it), and TLS.

    Args:
        security: the TLS files of this process (`trioflow.comm.security`);
            with them, `serve` listens on ``tls://`` and `connect` reaches
            ``tls://`` addresses. Without them only ``tcp://`` works.
        tls_handshake_timeout: seconds a peer has to finish the TLS handshake.
    """

    def __init__(self, security: Security | None = None, tls_handshake_timeout: float = 5.0):
        self.security = security
        self.tls_handshake_timeout = tls_handshake_timeout
        self._client_context = security.client_context() if security is not None else None
        self._server_context = security.server_context() if security is not None else None

    @property
    def scheme(self) -> str:
        """What `serve` listens on: ``tls`` with TLS files, else ``tcp``."""
        return "tcp" if self.security is None else "tls"

    async def connect(self, address: str) -> trio.abc.Stream:
        scheme, host, port = parse_address(address)
        if scheme not in ("tcp", "tls"):
            raise ValueError(f"cannot reach {address!r}: scheme {scheme!r} is neither tcp nor tls")
        if scheme == "tls" and self._client_context is None:
            raise ValueError(
                f"cannot reach {address!r}: a tls:// address needs TLS files "
                "(tls_ca_file, tls_cert_file, tls_key_file)"
            )
        stream = await trio.open_tcp_stream(host, port)
        if scheme == "tcp":
            return stream
        tls = trio.SSLStream(_LargeReads(stream), self._client_context, server_hostname=host)
        try:
            with trio.fail_after(self.tls_handshake_timeout):
                await tls.do_handshake()
        except trio.TooSlowError:
            await trio.aclose_forcefully(tls)
            raise OSError(f"the TLS handshake with {address} took longer than {self.tls_handshake_timeout:g} s") from None
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            await trio.aclose_forcefully(tls)
            raise OSError(
                f"the TLS handshake with {address} failed ({_tls_reason(exc)}); is it a tls:// server, "
                f"with a certificate from our CA?"
            ) from None
        return TLSStream(tls)

    async def serve(
        self,
        handler: StreamHandler,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            # The bare "[Errno 98] Address already in use" names neither
            # the address nor the way out; a person starting a server
            # needs both.
            reason = (exc.strerror or str(exc)).lower()
            raise OSError(
                exc.errno, f"cannot listen on {host}:{port}: {reason} (choose another host or port, or port 0 for any free one)"
            ) from None
        bound_port = listeners[0].socket.getsockname()[1]
        task_status.started(format_address(self.scheme, host, bound_port))
        if self._server_context is not None:
            handler = self._tls_handler(handler)
        await trio.serve_listeners(handler, listeners)

    def _tls_handler(self, handler: StreamHandler) -> StreamHandler:
        context = self._server_context

        async def serve_tls(stream: trio.abc.Stream) -> None:
            tls = trio.SSLStream(_LargeReads(stream), context, server_side=True)
            try:
                with trio.fail_after(self.tls_handshake_timeout):
                    await tls.do_handshake()
            except (trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as exc:
                # Plaintext on a TLS port (or a certificate not from our CA):
                # that connection only.
                logger.warning("closing a connection whose TLS handshake failed: %s", _tls_reason(exc))
                await trio.aclose_forcefully(tls)
                return
            await handler(TLSStream(tls))

        return serve_tls


def _tls_reason(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ else exc
    if isinstance(cause, trio.TooSlowError):
        return "it took too long"
    return str(getattr(cause, "reason", None) or cause or type(cause).__name__)[:200]


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
    except ValueError as exc:  # an address we cannot reach (scheme, no TLS files)
        raise CommClosedError(str(exc)) from None


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server
    started later, by another process, at a fixed address: the real-process
    chaos runs restart their scheduler there)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
