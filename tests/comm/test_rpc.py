"""Requests and replies, and the connection pool (the hello handshake: test_handshake.py)."""

from __future__ import annotations

import re

import pytest
import trio
import trio.testing

from tests.comm.helpers import SMALL_LIMITS, MemoryNetwork, connection_pair
from trioflow.comm import (
    PROTOCOL_VERSION,
    Connection,
    FrameLimits,
    HandshakeRefused,
    Network,
    RequestFailed,
    Requests,
    Serialized,
    TCPNetwork,
    expect_hello,
    open_connection,
    open_connection_pool,
    reply,
)
from trioflow.comm import messages as m
from trioflow.comm.auth import ANY_CREDENTIAL, CLUSTER, Credentials, accept_authenticated
from trioflow.errors import CommClosedError, ProtocolError

# A worker's data port: requests go peer -> worker, replies come back.
ASKER, ANSWERER = m.WORKER_TO_PEER, m.PEER_TO_WORKER


# The pools of these tests hold no credentials (`Credentials.none()`, as with
# --no-auth); their servers accept the same.
NO_AUTH = Credentials.none()


def get_data(*keys: str, request_id: int | None = None) -> m.GetData:
    message = m.GetData(keys=list(keys))
    message.request_id = request_id
    return message


def answer(*missing: str) -> m.GetDataReply:
    """A GetData reply that carries `missing` (the tests' way of echoing)."""
    return m.GetDataReply(data={}, missing=list(missing), errors={})


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
    results: dict[int, m.GetDataReply] = {}
    answered_order: list[int] = []
    async with connection_pair(inbound=(ASKER, ANSWERER)) as (client, server), trio.open_nursery() as nursery:
        requests = Requests(client, m.PEER_TO_WORKER)
        nursery.start_soon(deliver_forever, client, requests)

        async def answer_all_in_reverse() -> None:
            pending: list[m.GetData] = []
            while len(pending) < 5:
                pending.extend(await server.receive())
            for request in reversed(pending):
                n = int(request.keys[0])
                answered_order.append(n)
                reply(server, request, answer(str(2 * n)))

        async def ask(n: int) -> None:
            results[n] = await requests.call(get_data(str(n)))

        nursery.start_soon(answer_all_in_reverse)
        with trio.fail_after(5):
            async with trio.open_nursery() as callers:
                for n in range(5):
                    callers.start_soon(ask, n)
                    await trio.testing.wait_all_tasks_blocked()  # fix the sending order
        nursery.cancel_scope.cancel()
    assert answered_order == [4, 3, 2, 1, 0]
    assert results == {n: answer(str(2 * n)) for n in range(5)}
    assert all(type(r) is m.GetDataReply for r in results.values())


async def test_error_reply_raises_request_failed():
    """A reply carrying "error" raises RequestFailed with that text in the caller."""
    async with connection_pair(inbound=(ASKER, ANSWERER)) as (client, server), trio.open_nursery() as nursery:
        requests = Requests(client, m.PEER_TO_WORKER)
        nursery.start_soon(deliver_forever, client, requests)

        async def answer_with_error() -> None:
            [request] = await server.receive()
            reply(server, request, error="no such key 'x'")

        nursery.start_soon(answer_with_error)
        with trio.fail_after(5), pytest.raises(RequestFailed, match="no such key 'x'"):
            await requests.call(get_data("x"))
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "fields, problem",
    [
        pytest.param(
            {"data": {"x": "not pickled"}, "missing": [], "errors": {}},
            "reply to 'get_data': field data['x'] must be a pickled value, got str of 11",
            id="data-of-the-wrong-type",
        ),
        pytest.param({"data": {}, "errors": {}}, "reply to 'get_data': lacks field 'missing'", id="missing-field"),
        pytest.param({"n_workers": 3}, "reply to 'get_data': lacks field 'data'", id="reply-of-another-request"),
    ],
)
async def test_reply_not_matching_its_request_raises_protocol_error_in_deliver(fields, problem):
    """A reply that does not hold what its request promises raises ProtocolError in deliver()."""
    async with connection_pair(inbound=(ASKER, ANSWERER)) as (client, server):
        requests = Requests(client, m.PEER_TO_WORKER)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(requests.call, get_data("x"))
            with trio.fail_after(5):
                [request] = await server.receive()
                server.send({"op": "reply", "request_id": request.request_id, **fields})  # raw: no checks here
                [bad_reply] = await client.receive()
            with pytest.raises(ProtocolError) as info:
                requests.deliver(bad_reply)
            assert str(info.value) == problem
            nursery.cancel_scope.cancel()


async def test_run_reply_is_checked_by_the_channel_the_request_took():
    """`run` promises a different reply to a client than to the scheduler: Requests checks the right one."""
    async with connection_pair(inbound=(m.SCHEDULER_TO_CLIENT, m.CLIENT_TO_SCHEDULER)) as (client, scheduler):
        requests = Requests(client, m.CLIENT_TO_SCHEDULER)
        result: list = []

        async def ask() -> None:
            result.append(await requests.call(m.RunEverywhere(function=Serialized(b"fn"))))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            with trio.fail_after(5):
                [request] = await scheduler.receive()
                outcome = m.RunOutcome(result=Serialized(b"42"))
                reply(scheduler, request, m.RunEverywhereReply(results={"tcp://127.0.0.1:1": outcome}))
                [answered] = await client.receive()
                assert requests.deliver(answered) is True
    assert result == [m.RunEverywhereReply(results={"tcp://127.0.0.1:1": m.RunOutcome(result=Serialized(b"42"))})]


async def test_fail_all_wakes_waiting_callers_with_comm_closed():
    """fail_all makes every waiting call raise CommClosedError with the reason."""
    errors: list[BaseException] = []
    async with connection_pair(inbound=(ASKER, ANSWERER)) as (client, _server):
        requests = Requests(client, m.PEER_TO_WORKER)

        async def ask() -> None:
            try:
                await requests.call(get_data("slow"))
            except CommClosedError as exc:
                errors.append(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(ask)
                await trio.testing.wait_all_tasks_blocked()
                assert errors == []
                assert requests.waiting_since is not None
                requests.fail_all("peer went away")
    assert len(errors) == 3
    assert all("peer went away" in str(e) for e in errors)
    assert requests.waiting_since is None


async def test_reader_seeing_close_fails_the_pending_call():
    """When the peer hangs up, a call waiting for its reply raises CommClosedError."""
    async with connection_pair(inbound=(ASKER, ANSWERER)) as (client, server), trio.open_nursery() as nursery:
        requests = Requests(client, m.PEER_TO_WORKER)
        nursery.start_soon(deliver_forever, client, requests)

        async def hang_up() -> None:
            await server.receive()
            await server.aclose()

        nursery.start_soon(hang_up)
        with trio.fail_after(5), pytest.raises(CommClosedError):
            await requests.call(get_data("anything"))


def test_deliver_claims_replies_only():
    """deliver() returns False for non-replies and True for replies (even unknown ones)."""
    requests = Requests(conn=None, channel=m.PEER_TO_WORKER)  # deliver never touches the connection
    assert requests.deliver(m.TaskFinished(key="x", nbytes=1)) is False
    assert requests.deliver(m.decode({"op": "reply", "request_id": 12345}, ASKER)) is True


async def test_cancelled_call_discards_the_late_reply():
    """A caller that gave up leaves nothing behind; its late reply is dropped quietly."""
    async with connection_pair(inbound=(ASKER, ANSWERER)) as (client, server):
        requests = Requests(client, m.PEER_TO_WORKER)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(requests.call, get_data("slow"))
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        with trio.fail_after(5):
            [request] = await server.receive()
        late = m.decode(m.Reply(request.request_id, answer()).to_wire(), ASKER)
        assert requests.deliver(late) is True
        assert requests._pending == {}
        assert requests.waiting_since is None


@pytest.mark.parametrize(
    "message, error",
    [
        pytest.param(get_data("x" * 5000), ProtocolError, id="too-large"),
        pytest.param(m.GetData(keys=[object()]), TypeError, id="cannot-travel"),
    ],
)
async def test_send_failure_in_call_leaves_no_pending_entry(message, error):
    """A request that cannot be sent raises in call() and is not left waiting."""
    async with connection_pair(inbound=(ASKER, ANSWERER)) as (client, _):
        requests = Requests(client, m.PEER_TO_WORKER)
        with pytest.raises(error):
            await requests.call(message)
        assert requests._pending == {}
        assert requests.waiting_since is None


async def test_reply_to_a_closed_connection_is_silent():
    """reply() on a connection whose asker has gone does not raise."""
    async with connection_pair(inbound=(ASKER, ANSWERER)) as (_, server):
        await server.aclose()
        reply(server, get_data("k", request_id=1), answer())
        assert server.closed


async def test_reply_too_large_to_travel_becomes_an_error_reply():
    """An answer larger than the peer accepts is replaced by an error reply saying so, never by silence."""
    async with connection_pair(inbound=(ASKER, ANSWERER)) as (client, server):
        reply(server, get_data("k", request_id=3), answer("x" * 1000, "y" * 1000, "z" * 3000))
        with trio.fail_after(5):
            [answered] = await client.receive()
    assert answered.request_id == 3
    assert answered.error.startswith("the answer cannot travel: a 'reply' message of")
    assert "max_body_bytes=4096" in answered.error


# --------------------------------------------------------- ConnectionPool --


class EchoServer:
    """A small worker data port: checks the hello, then answers GetData until told to hang up.

    The first key says what to do: "fail" -> an error reply; "hang_up" ->
    close without replying; "ignore" -> no reply; anything else -> a reply
    whose `missing` echoes the keys.
    """

    def __init__(self, network: Network, idle_timeout: float = float("inf")) -> None:
        self.network = network
        self.idle_timeout = idle_timeout
        self.hellos: list[m.Hello] = []
        # Why each link ended, and when (trio.current_time()).
        self.ended: list[tuple[float, BaseException | None]] = []
        self.link_ended = trio.Event()

    async def handle(self, stream: trio.abc.Stream) -> None:
        reason: BaseException | None = None
        authenticated = await accept_authenticated(stream, NO_AUTH, ANY_CREDENTIAL, 5, "an echo server")
        assert authenticated is not None
        async with open_connection(
            stream, FrameLimits.before_hello(), peer="pool", inbound=m.HELLO, send_limits=SMALL_LIMITS
        ) as conn:
            try:
                hello = await expect_hello(conn, 5, {"peer": m.PEER_TO_WORKER}, "an echo server", SMALL_LIMITS, authenticated=authenticated)
                self.hellos.append(hello)
                conn.idle_timeout = self.idle_timeout
                while True:
                    for request in await conn.receive():
                        command = request.keys[0]
                        if command == "hang_up":
                            return
                        if command == "fail":
                            reply(conn, request, error="you asked for it")
                        elif command != "ignore":
                            reply(conn, request, answer(*request.keys))
            except (CommClosedError, ProtocolError) as exc:
                reason = exc
            finally:
                self.ended.append((trio.current_time(), reason))
                self.link_ended.set()


async def start_echo_server(nursery: trio.Nursery, network: Network | None = None, **options) -> tuple[EchoServer, str]:
    server = EchoServer(network or TCPNetwork(), **options)
    address = await nursery.start(server.network.serve, server.handle, "127.0.0.1", 0)
    return server, address


async def test_pool_call_gets_reply_and_reuses_one_connection():
    """Several calls to one address, sequential and concurrent, share one connection."""
    async with trio.open_nursery() as nursery:
        server, address = await start_echo_server(nursery)
        async with open_connection_pool(TCPNetwork(), SMALL_LIMITS, role="peer", connect_timeout=5) as pool:
            with trio.fail_after(10):
                for i in range(3):
                    assert await pool.call(address, get_data(str(i))) == answer(str(i))
                results: list[int] = []

                async def ask(i: int) -> None:
                    results.append(int((await pool.call(address, get_data(str(i)))).missing[0]))

                async with trio.open_nursery() as callers:
                    for i in range(10):
                        callers.start_soon(ask, i)
        nursery.cancel_scope.cancel()
    assert sorted(results) == list(range(10))
    assert server.hellos == [m.Hello(role="peer", protocol=PROTOCOL_VERSION)]


async def test_pool_error_reply_raises_request_failed():
    """An error reply from the peer raises RequestFailed and keeps the link."""
    async with trio.open_nursery() as nursery:
        server, address = await start_echo_server(nursery)
        async with open_connection_pool(TCPNetwork(), SMALL_LIMITS, role="peer", connect_timeout=5) as pool:
            with trio.fail_after(10):
                with pytest.raises(RequestFailed, match="you asked for it"):
                    await pool.call(address, get_data("fail"))
                assert await pool.call(address, get_data("ok")) == answer("ok")
        nursery.cancel_scope.cancel()
    assert len(server.hellos) == 1


async def test_pool_reconnects_after_the_server_closes_the_link():
    """When the server hangs up, the waiting call fails and the next call opens a new link."""
    async with trio.open_nursery() as nursery:
        server, address = await start_echo_server(nursery)
        async with open_connection_pool(TCPNetwork(), SMALL_LIMITS, role="peer", connect_timeout=5) as pool:
            with trio.fail_after(10):
                assert await pool.call(address, get_data("1")) == answer("1")
                with pytest.raises(CommClosedError, match=re.escape(address)):
                    await pool.call(address, get_data("hang_up"))
                assert await pool.call(address, get_data("2")) == answer("2")
        nursery.cancel_scope.cancel()
    assert len(server.hellos) == 2


async def test_pool_call_where_nothing_listens_raises_comm_closed(refused_address):
    """Calling an address with no listener raises CommClosedError, and a retry tries again."""
    async with open_connection_pool(TCPNetwork(), SMALL_LIMITS, role="peer", connect_timeout=5) as pool:
        with trio.fail_after(10):
            for _ in range(2):
                with pytest.raises(CommClosedError, match=re.escape(refused_address)):
                    await pool.call(refused_address, get_data("1"))


async def test_pool_bad_address_fails_only_that_call():
    """A malformed address fails the call in the caller; the pool keeps serving others."""
    async with trio.open_nursery() as nursery:
        server, address = await start_echo_server(nursery)
        async with open_connection_pool(TCPNetwork(), SMALL_LIMITS, role="peer", connect_timeout=5) as pool:
            with trio.fail_after(10):
                with pytest.raises(CommClosedError, match="no-scheme-here"):
                    await pool.call("no-scheme-here", get_data("1"))
                assert await pool.call(address, get_data("3")) == answer("3")
        nursery.cancel_scope.cancel()
    assert len(server.hellos) == 1


async def test_pool_closes_a_link_unused_for_half_the_idle_timeout(autojump_clock):
    """A link unused for idle_timeout/2 is closed by the pool, before the server would; the next call reconnects."""
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        server, address = await start_echo_server(nursery, network, idle_timeout=10)
        async with open_connection_pool(network, SMALL_LIMITS, role="peer", connect_timeout=5, idle_timeout=10) as pool:
            with trio.fail_after(30):
                assert await pool.call(address, get_data("1")) == answer("1")
                last_used = trio.current_time()
                await server.link_ended.wait()
                [(ended_at, reason)] = server.ended
                assert ended_at - last_used == pytest.approx(5)
                assert "idle_timeout" not in str(reason)  # the pool closed it, not the server
                assert await pool.call(address, get_data("2")) == answer("2")
        nursery.cancel_scope.cancel()
    assert network.connects == 2
    assert len(server.hellos) == 2


async def test_pool_keeps_a_link_in_use(autojump_clock):
    """Calls every 4 s keep one link open past idle_timeout/2 = 5 s."""
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        server, address = await start_echo_server(nursery, network, idle_timeout=10)
        async with open_connection_pool(network, SMALL_LIMITS, role="peer", connect_timeout=5, idle_timeout=10) as pool:
            with trio.fail_after(60):
                for i in range(5):
                    assert await pool.call(address, get_data(str(i))) == answer(str(i))
                    await trio.sleep(4)  # virtual time: the caller's pace
        nursery.cancel_scope.cancel()
    assert network.connects == 1
    assert len(server.hellos) == 1


async def test_pool_closes_a_link_whose_peer_owes_an_answer_past_peer_timeout(autojump_clock):
    """A peer that sends nothing for peer_timeout while a call waits fails that call; the next call reconnects."""
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        server, address = await start_echo_server(nursery, network)
        async with open_connection_pool(network, SMALL_LIMITS, role="peer", connect_timeout=5, peer_timeout=3) as pool:
            with trio.fail_after(30):
                start = trio.current_time()
                with pytest.raises(CommClosedError, match=re.escape(address)):
                    await pool.call(address, get_data("ignore"))
                assert trio.current_time() - start == pytest.approx(3)
                assert await pool.call(address, get_data("1")) == answer("1")
        nursery.cancel_scope.cancel()
    assert network.connects == 2


async def test_pool_link_ends_on_a_reply_that_breaks_its_declaration():
    """A reply not matching its request is the peer's protocol error: the call fails with CommClosedError."""
    network = MemoryNetwork()

    async def bad_server(stream: trio.abc.Stream) -> None:
        await accept_authenticated(stream, NO_AUTH, ANY_CREDENTIAL, 5, "a bad server")
        async with open_connection(stream, FrameLimits.before_hello(), inbound=m.HELLO, send_limits=SMALL_LIMITS) as conn:
            await expect_hello(conn, 5, {"peer": m.PEER_TO_WORKER}, "a bad server", SMALL_LIMITS, authenticated=CLUSTER)
            [request] = await conn.receive()
            conn.send({"op": "reply", "request_id": request.request_id, "data": {"x": 1}, "missing": [], "errors": {}})
            with pytest.raises(CommClosedError):
                await conn.receive()  # the pool hangs up

    async with trio.open_nursery() as nursery:
        address = await nursery.start(network.serve, bad_server, "bad", 1)
        async with open_connection_pool(network, SMALL_LIMITS, role="peer", connect_timeout=5) as pool:
            with trio.fail_after(5), pytest.raises(
                CommClosedError, match=re.escape("reply to 'get_data': field data['x'] must be a pickled value")
            ):
                await pool.call(address, get_data("x"))
        nursery.cancel_scope.cancel()


async def test_pool_call_failed_by_peer_timeout_says_so(autojump_clock):
    """The error of a call cut off by peer_timeout names peer_timeout, so a hung peer can be told from a crash."""
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        server, address = await start_echo_server(nursery, network)
        async with open_connection_pool(network, SMALL_LIMITS, role="peer", connect_timeout=5, peer_timeout=3) as pool:
            with trio.fail_after(30), pytest.raises(CommClosedError, match="peer_timeout"):
                await pool.call(address, get_data("ignore"))
        nursery.cancel_scope.cancel()


async def test_pool_call_refused_by_the_server_gives_its_reason():
    """A pool link the server refuses fails the call with HandshakeRefused carrying the server's reason."""
    network = MemoryNetwork()

    async def scheduler_port(stream: trio.abc.Stream) -> None:
        await accept_authenticated(stream, NO_AUTH, ANY_CREDENTIAL, 5, "a scheduler")
        async with open_connection(stream, FrameLimits.before_hello(), inbound=m.HELLO, send_limits=SMALL_LIMITS) as conn:
            with pytest.raises(ProtocolError):
                await expect_hello(
                    conn, 5, {"worker": m.WORKER_TO_SCHEDULER}, "a scheduler", SMALL_LIMITS, authenticated=CLUSTER
                )

    async with trio.open_nursery() as nursery:
        address = await nursery.start(network.serve, scheduler_port, "scheduler", 1)
        async with open_connection_pool(network, SMALL_LIMITS, role="peer", connect_timeout=5) as pool:
            with trio.fail_after(5), pytest.raises(
                HandshakeRefused, match="this is a scheduler, which serves worker connections, not peers"
            ):
                await pool.call(address, get_data("x"))
        nursery.cancel_scope.cancel()
