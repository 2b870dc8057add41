"""Requests and replies, the connection pool, and the hello handshake."""

from __future__ import annotations

import re

import pytest
import trio
import trio.testing

from tests.comm.helpers import SMALL_LIMITS, connection_pair
from trioflow.comm import (
    PROTOCOL_VERSION,
    Connection,
    RequestFailed,
    Requests,
    TCPNetwork,
    expect_hello,
    open_connection,
    open_connection_pool,
    reply,
    say_hello,
)
from trioflow.comm.frames import batch_frames
from trioflow.errors import CommClosedError, ProtocolError

# ---------------------------------------------------------------- Requests --


async def deliver_forever(conn: Connection, requests: Requests) -> None:
    """The reader a Requests needs: hand every reply to its caller."""
    try:
        while True:
            for message in await conn.receive():
                requests.deliver(message)
    except CommClosedError:
        requests.fail_all("reader saw the connection close")


async def test_call_gets_its_own_reply_when_replies_come_out_of_order():
    """Replies are matched to callers by request_id, whatever order they arrive in."""
    results: dict[int, dict] = {}
    answered_order: list[int] = []
    async with connection_pair() as (client, server), trio.open_nursery() as nursery:
        requests = Requests(client)
        nursery.start_soon(deliver_forever, client, requests)

        async def answer_all_in_reverse() -> None:
            pending: list[dict] = []
            while len(pending) < 5:
                pending.extend(await server.receive())
            for request in reversed(pending):
                answered_order.append(request["n"])
                reply(server, request, value=request["n"] * 2)

        async def ask(n: int) -> None:
            results[n] = await requests.call({"op": "double", "n": n})

        nursery.start_soon(answer_all_in_reverse)
        with trio.fail_after(5):
            async with trio.open_nursery() as callers:
                for n in range(5):
                    callers.start_soon(ask, n)
                    await trio.testing.wait_all_tasks_blocked()  # fix the sending order
        nursery.cancel_scope.cancel()
    assert answered_order == [4, 3, 2, 1, 0]
    assert {n: r["value"] for n, r in results.items()} == {n: 2 * n for n in range(5)}
    assert all(r["op"] == "reply" for r in results.values())


async def test_error_reply_raises_request_failed():
    """A reply carrying "error" raises RequestFailed with that text in the caller."""
    async with connection_pair() as (client, server), trio.open_nursery() as nursery:
        requests = Requests(client)
        nursery.start_soon(deliver_forever, client, requests)

        async def answer_with_error() -> None:
            [request] = await server.receive()
            reply(server, request, error="no such key 'x'")

        nursery.start_soon(answer_with_error)
        with trio.fail_after(5), pytest.raises(RequestFailed, match="no such key 'x'"):
            await requests.call({"op": "get", "key": "x"})
        nursery.cancel_scope.cancel()


async def test_fail_all_wakes_waiting_callers_with_comm_closed():
    """fail_all makes every waiting call raise CommClosedError with the reason."""
    errors: list[BaseException] = []
    async with connection_pair() as (client, _server):
        requests = Requests(client)

        async def ask() -> None:
            try:
                await requests.call({"op": "slow"})
            except CommClosedError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            assert errors == []
            requests.fail_all("peer went away")
    assert len(errors) == 3
    assert all("peer went away" in str(e) for e in errors)


async def test_reader_seeing_close_fails_the_pending_call():
    """When the peer hangs up, a call waiting for its reply raises CommClosedError."""
    async with connection_pair() as (client, server), trio.open_nursery() as nursery:
        requests = Requests(client)
        nursery.start_soon(deliver_forever, client, requests)

        async def hang_up() -> None:
            await server.receive()
            await server.aclose()

        nursery.start_soon(hang_up)
        with trio.fail_after(5), pytest.raises(CommClosedError):
            await requests.call({"op": "anything"})


def test_deliver_claims_replies_only():
    """deliver() returns False for non-replies and True for replies (even unknown ones)."""
    requests = Requests(conn=None)  # deliver never touches the connection
    assert requests.deliver({"op": "task_finished"}) is False
    assert requests.deliver({"op": "reply", "request_id": 12345}) is True


async def test_cancelled_call_discards_the_late_reply():
    """A caller that gave up leaves nothing behind; its late reply is dropped quietly."""
    async with connection_pair() as (client, server):
        requests = Requests(client)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(requests.call, {"op": "slow"})
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        [request] = await server.receive()
        assert requests.deliver({"op": "reply", "request_id": request["request_id"]}) is True
        assert requests._pending == {}


async def test_send_failure_in_call_leaves_no_pending_entry():
    """A request that cannot be sent raises in call() and is not left waiting."""
    async with connection_pair() as (client, _):
        requests = Requests(client)
        with pytest.raises(TypeError):
            await requests.call({"op": "bad", "value": object()})
        assert requests._pending == {}


async def test_reply_to_a_closed_connection_is_silent():
    """reply() on a connection whose asker has gone does not raise."""
    async with connection_pair() as (_, server):
        await server.aclose()
        reply(server, {"op": "get", "request_id": 1}, value=1)
        assert server.closed


# --------------------------------------------------------- ConnectionPool --


class EchoServer:
    """A small peer: checks the hello, then answers requests until told to hang up.

    ops: "echo" -> reply with the same value; "fail" -> reply with an error;
    "hang_up" -> close the connection without replying.
    """

    def __init__(self) -> None:
        self.hellos: list[dict] = []
        self.network = TCPNetwork()

    async def handle(self, stream: trio.abc.Stream) -> None:
        async with open_connection(stream, SMALL_LIMITS, peer="pool") as conn:
            try:
                hello, batch = await expect_hello(conn, timeout=5)
                self.hellos.append(hello)
                while True:
                    for request in batch:
                        if request["op"] == "hang_up":
                            return
                        if request["op"] == "fail":
                            reply(conn, request, error="you asked for it")
                        else:
                            reply(conn, request, value=request["value"])
                    batch = await conn.receive()
            except (CommClosedError, ProtocolError):
                return


async def start_echo_server(nursery: trio.Nursery) -> tuple[EchoServer, str]:
    server = EchoServer()
    address = await nursery.start(server.network.serve, server.handle, "127.0.0.1", 0)
    return server, address


async def test_pool_call_gets_reply_and_reuses_one_connection():
    """Several calls to one address, sequential and concurrent, share one connection."""
    async with trio.open_nursery() as nursery:
        server, address = await start_echo_server(nursery)
        async with open_connection_pool(
            TCPNetwork(), SMALL_LIMITS, role="peer", connect_timeout=5
        ) as pool:
            with trio.fail_after(10):
                for i in range(3):
                    assert (await pool.call(address, {"op": "echo", "value": i}))["value"] == i
                results: list[int] = []

                async def ask(i: int) -> None:
                    results.append((await pool.call(address, {"op": "echo", "value": i}))["value"])

                async with trio.open_nursery() as callers:
                    for i in range(10):
                        callers.start_soon(ask, i)
        nursery.cancel_scope.cancel()
    assert sorted(results) == list(range(10))
    assert len(server.hellos) == 1
    assert server.hellos[0]["role"] == "peer"
    assert server.hellos[0]["protocol"] == PROTOCOL_VERSION


async def test_pool_error_reply_raises_request_failed():
    """An error reply from the peer raises RequestFailed and keeps the link."""
    async with trio.open_nursery() as nursery:
        server, address = await start_echo_server(nursery)
        async with open_connection_pool(
            TCPNetwork(), SMALL_LIMITS, role="peer", connect_timeout=5
        ) as pool:
            with trio.fail_after(10):
                with pytest.raises(RequestFailed, match="you asked for it"):
                    await pool.call(address, {"op": "fail"})
                assert (await pool.call(address, {"op": "echo", "value": "ok"}))["value"] == "ok"
        nursery.cancel_scope.cancel()
    assert len(server.hellos) == 1


async def test_pool_reconnects_after_the_server_closes_the_link():
    """When the server hangs up, the waiting call fails and the next call opens a new link."""
    async with trio.open_nursery() as nursery:
        server, address = await start_echo_server(nursery)
        async with open_connection_pool(
            TCPNetwork(), SMALL_LIMITS, role="peer", connect_timeout=5
        ) as pool:
            with trio.fail_after(10):
                assert (await pool.call(address, {"op": "echo", "value": 1}))["value"] == 1
                with pytest.raises(CommClosedError, match=re.escape(address)):
                    await pool.call(address, {"op": "hang_up"})
                assert (await pool.call(address, {"op": "echo", "value": 2}))["value"] == 2
        nursery.cancel_scope.cancel()
    assert len(server.hellos) == 2


async def test_pool_call_where_nothing_listens_raises_comm_closed(refused_address):
    """Calling an address with no listener raises CommClosedError, and a retry tries again."""
    async with open_connection_pool(
        TCPNetwork(), SMALL_LIMITS, role="peer", connect_timeout=5
    ) as pool:
        with trio.fail_after(10):
            for _ in range(2):
                with pytest.raises(CommClosedError, match=re.escape(refused_address)):
                    await pool.call(refused_address, {"op": "echo", "value": 1})


async def test_pool_bad_address_fails_only_that_call():
    """A malformed address fails the call in the caller; the pool keeps serving others."""
    async with trio.open_nursery() as nursery:
        server, address = await start_echo_server(nursery)
        async with open_connection_pool(
            TCPNetwork(), SMALL_LIMITS, role="peer", connect_timeout=5
        ) as pool:
            with trio.fail_after(10):
                with pytest.raises(CommClosedError, match="no-scheme-here"):
                    await pool.call("no-scheme-here", {"op": "echo", "value": 1})
                assert (await pool.call(address, {"op": "echo", "value": 3}))["value"] == 3
        nursery.cancel_scope.cancel()
    assert len(server.hellos) == 1


# --------------------------------------------------------------- handshake --


async def test_hello_is_accepted_with_the_messages_that_came_with_it():
    """expect_hello returns the hello and the rest of its batch."""
    async with connection_pair() as (client, server):
        say_hello(client, "worker", address="tcp://127.0.0.1:1")
        client.send({"op": "first_report"})
        with trio.fail_after(5):
            hello, rest = await expect_hello(server, timeout=5)
    assert hello == {
        "op": "hello", "role": "worker", "protocol": PROTOCOL_VERSION, "address": "tcp://127.0.0.1:1"
    }
    assert rest == [{"op": "first_report"}]


@pytest.mark.parametrize(
    "first, roles, reason",
    [
        pytest.param({"op": "compute"}, None, "expected a hello message first, got op 'compute'",
                     id="not-hello"),
        pytest.param({"op": "hello", "role": "worker", "protocol": PROTOCOL_VERSION + 1}, None,
                     f"peer speaks protocol {PROTOCOL_VERSION + 1}", id="wrong-protocol"),
        pytest.param({"op": "hello", "role": "worker"}, None, "peer speaks protocol None",
                     id="missing-protocol"),
        pytest.param({"op": "hello", "role": "client", "protocol": PROTOCOL_VERSION},
                     frozenset({"worker"}), "unexpected role 'client'", id="unexpected-role"),
        pytest.param({"op": "hello", "role": "emperor", "protocol": PROTOCOL_VERSION}, None,
                     "unexpected role 'emperor'", id="unknown-role"),
    ],
)
async def test_bad_hello_raises_protocol_error(first, roles, reason):
    """A first message that is not a valid hello is rejected with ProtocolError."""
    async with connection_pair() as (client, server):
        client.send(first)
        kwargs = {} if roles is None else {"roles": roles}
        with trio.fail_after(5), pytest.raises(ProtocolError, match=re.escape(reason)):
            await expect_hello(server, timeout=5, **kwargs)


async def test_silent_peer_times_out_as_protocol_error(autojump_clock):
    """A peer that never says hello is rejected after the timeout, as ProtocolError."""
    async with connection_pair() as (_client, server):
        start = trio.current_time()
        with pytest.raises(ProtocolError, match="no hello within 0.5 s"):
            await expect_hello(server, timeout=0.5)
        assert trio.current_time() - start == pytest.approx(0.5)


async def test_empty_first_batch_is_a_protocol_error():
    """A well-formed but empty first batch is rejected as ProtocolError (not IndexError)."""
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(right, SMALL_LIMITS)
    await left.send_all(b"".join(batch_frames([])))
    with trio.fail_after(5), pytest.raises(ProtocolError, match="hello"):
        await expect_hello(conn, timeout=5)


async def test_peer_hanging_up_before_hello_is_comm_closed():
    """A peer that closes before saying hello gives CommClosedError."""
    async with connection_pair() as (client, server):
        await client.aclose()
        with trio.fail_after(5), pytest.raises(CommClosedError):
            await expect_hello(server, timeout=5)
