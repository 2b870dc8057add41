"""Addresses and the TCP `Network`: parsing, serving, connecting, failing to connect."""

from __future__ import annotations

import re

import pytest
import trio

from trioflow.comm import Network, TCPNetwork, connect_with_timeout, parse_address
from trioflow.comm.network import format_address
from trioflow.errors import CommClosedError

# ------------------------------------------------------------- addresses --


@pytest.mark.parametrize(
    "address, expected",
    [
        pytest.param("tcp://127.0.0.1:8786", ("tcp", "127.0.0.1", 8786), id="ipv4"),
        pytest.param("tcp://[::1]:8786", ("tcp", "::1", 8786), id="ipv6-brackets"),
        pytest.param("tcp://localhost:0", ("tcp", "localhost", 0), id="hostname-port-zero"),
        pytest.param("tcp://10.0.0.1:65535", ("tcp", "10.0.0.1", 65535), id="highest-port"),
        pytest.param("tls://example.org:443", ("tls", "example.org", 443), id="other-scheme"),
    ],
)
def test_parse_valid_addresses(address, expected):
    """Well-formed addresses split into scheme, bare host and integer port."""
    assert parse_address(address) == expected


@pytest.mark.parametrize(
    "address, reason",
    [
        pytest.param("127.0.0.1:8786", "has no scheme", id="no-scheme"),
        pytest.param("://127.0.0.1:8786", "has no scheme", id="empty-scheme"),
        pytest.param("tcp://127.0.0.1", "has no port", id="no-port"),
        pytest.param("tcp://", "has no port", id="nothing-after-scheme"),
        pytest.param("tcp://127.0.0.1:http", "non-numeric port 'http'", id="non-numeric-port"),
        pytest.param("tcp://127.0.0.1:", "non-numeric port ''", id="empty-port"),
        pytest.param("tcp://127.0.0.1:65536", "outside 0..65535", id="port-too-high"),
        pytest.param("tcp://127.0.0.1:-1", "outside 0..65535", id="negative-port"),
    ],
)
def test_parse_invalid_addresses(address, reason):
    """Malformed addresses raise ValueError quoting the address and what is wrong."""
    with pytest.raises(ValueError, match=re.escape(reason)) as info:
        parse_address(address)
    assert repr(address) in str(info.value)


@pytest.mark.parametrize(
    "host, expected",
    [("127.0.0.1", "tcp://127.0.0.1:1"), ("::1", "tcp://[::1]:1"), ("localhost", "tcp://localhost:1")],
)
def test_format_address_round_trips_with_parse(host, expected):
    """format_address brackets IPv6 hosts so parse_address can read them back."""
    assert format_address("tcp", host, 1) == expected
    assert parse_address(expected) == ("tcp", host, 1)


# --------------------------------------------------------------- serving --


async def receive_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    """Read n bytes (TCP may deliver them in pieces)."""
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


async def test_serve_reports_its_bound_address_and_accepts_connections():
    """serve reports tcp://127.0.0.1:<port> via nursery.start and runs the handler per stream."""
    network = TCPNetwork()
    greetings: list[bytes] = []
    two_served = trio.Event()

    async def handler(stream: trio.abc.Stream) -> None:
        async with stream:
            greetings.append(await receive_exactly(stream, 3))
            await stream.send_all(b"welcome")
            if len(greetings) == 2:
                two_served.set()

    async with trio.open_nursery() as nursery:
        address = await nursery.start(network.serve, handler, "127.0.0.1", 0)
        match = re.fullmatch(r"tcp://127\.0\.0\.1:(\d+)", address)
        assert match and int(match.group(1)) > 0
        for name in (b"one", b"two"):
            async with await network.connect(address) as stream:
                await stream.send_all(name)
                assert await receive_exactly(stream, 7) == b"welcome"
        with trio.fail_after(5):
            await two_served.wait()
        nursery.cancel_scope.cancel()
    assert sorted(greetings) == [b"one", b"two"]


async def test_connect_rejects_other_schemes():
    """TCPNetwork.connect refuses a non-tcp address with ValueError."""
    with pytest.raises(ValueError, match="scheme 'sim' is neither tcp nor tls"):
        await TCPNetwork().connect("sim://127.0.0.1:1")


async def test_connect_with_timeout_to_closed_port_raises_comm_closed(refused_address):
    """Connecting where nothing listens raises CommClosedError naming the address."""
    with trio.fail_after(10), pytest.raises(CommClosedError, match=re.escape(refused_address)):
        await connect_with_timeout(TCPNetwork(), refused_address, timeout=5)


class BlackHoleNetwork(Network):
    """A network whose connects never complete (a peer that drops SYNs)."""

    async def connect(self, address: str) -> trio.abc.Stream:
        await trio.sleep_forever()

    async def serve(self, handler, host, port, *, task_status=trio.TASK_STATUS_IGNORED):
        raise NotImplementedError


async def test_connect_with_timeout_gives_up_after_the_timeout(autojump_clock):
    """A connect that hangs becomes CommClosedError after exactly `timeout` seconds."""
    start = trio.current_time()
    with pytest.raises(CommClosedError, match="within 2.5 s"):
        await connect_with_timeout(BlackHoleNetwork(), "tcp://127.0.0.1:1", timeout=2.5)
    assert trio.current_time() - start == pytest.approx(2.5)


async def test_connect_with_timeout_returns_a_working_stream():
    """On success connect_with_timeout returns a stream connected to the server."""
    network = TCPNetwork()

    async def echo(stream: trio.abc.Stream) -> None:
        async with stream:
            await stream.send_all(await receive_exactly(stream, 7))

    async with trio.open_nursery() as nursery:
        address = await nursery.start(network.serve, echo, "127.0.0.1", 0)
        async with await connect_with_timeout(network, address, timeout=5) as stream:
            await stream.send_all(b"echo me")
            with trio.fail_after(5):
                assert await receive_exactly(stream, 7) == b"echo me"
        nursery.cancel_scope.cancel()


def test_a_wildcard_bind_advertises_the_address_that_reaches_the_scheduler():
    """A server bound to 0.0.0.0 advertises the local address towards its scheduler (here
    loopback); a concrete bind is advertised as it is."""
    from trioflow.comm.network import advertised_address

    assert advertised_address("tcp://0.0.0.0:4000", "tcp://127.0.0.1:8786") == "tcp://127.0.0.1:4000"
    assert advertised_address("tls://0.0.0.0:4000", "tls://127.0.0.1:8786") == "tls://127.0.0.1:4000"
    assert advertised_address("tcp://10.1.2.3:4000", "tcp://127.0.0.1:8786") == "tcp://10.1.2.3:4000"
