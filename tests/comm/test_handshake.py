"""The hello handshake: say_hello, expect_hello (accept or refuse), await_welcome, ConnectionGate."""

from __future__ import annotations

import logging
import re

import pytest
import trio
import trio.testing

from tests.comm.helpers import SMALL_LIMITS
from trioflow.comm import (
    PROTOCOL_VERSION,
    Connection,
    ConnectionGate,
    FrameLimits,
    HandshakeRefused,
    await_welcome,
    expect_hello,
    open_connection,
    say_hello,
)
from trioflow.comm import messages as m
from trioflow.comm.auth import CLUSTER
from trioflow.comm.frames import batch_frames, encode_message
from trioflow.errors import CommClosedError, ProtocolError

WORKER_HELLO = m.Hello(role="worker", protocol=PROTOCOL_VERSION, address="tcp://127.0.0.1:1", nthreads=2)
SCHEDULER_ROLES = {"client": m.CLIENT_TO_SCHEDULER, "worker": m.WORKER_TO_SCHEDULER}


def hello_conn(stream: trio.abc.Stream) -> Connection:
    """The accepting side's connection before the hello: tiny limits, the hello channel."""
    return Connection(stream, FrameLimits.before_hello(), peer="stranger", inbound=m.HELLO, send_limits=SMALL_LIMITS)


class OneHelloServer:
    """Accepts one connection: reads its hello for `roles`, and notes what came of it."""

    def __init__(self, roles: dict[str, str], timeout: float = 5) -> None:
        self.roles = roles
        self.timeout = timeout
        self.hello: m.Hello | None = None
        self.error: BaseException | None = None
        self.conn: Connection | None = None

    async def serve(self, stream: trio.abc.Stream) -> None:
        async with open_connection(
            stream, FrameLimits.before_hello(), peer="stranger", inbound=m.HELLO, send_limits=SMALL_LIMITS
        ) as conn:
            self.conn = conn
            try:
                self.hello = await expect_hello(conn, self.timeout, self.roles, "a test scheduler", SMALL_LIMITS, authenticated=CLUSTER)
            except (ProtocolError, CommClosedError) as exc:
                self.error = exc


# -------------------------------------------------------------- accepting --


async def test_hello_is_accepted_and_sets_the_roles_channel_and_limits():
    """expect_hello returns the hello; the connection then reads the role's channel under the normal limits.

    The next batch is already buffered as the hello is read, and stays for
    the next receive: a hello is never read together with what follows it
    (`Connection._take_buffered_batches`)."""
    left, right = trio.testing.memory_stream_pair()
    server = hello_conn(right)
    async with open_connection(left, SMALL_LIMITS, inbound=m.SCHEDULER_TO_WORKER) as worker:
        await say_hello(worker, WORKER_HELLO)
        worker.send(m.TaskStarted(key="x"))  # after the hello: a batch of its own
        with trio.fail_after(5):
            await worker.flush()
            hello = await expect_hello(server, 5, SCHEDULER_ROLES, "a test scheduler", SMALL_LIMITS, authenticated=CLUSTER)
            assert hello == WORKER_HELLO
            assert (server.inbound, server.limits) == (m.WORKER_TO_SCHEDULER, SMALL_LIMITS)
            assert await server.receive() == [m.TaskStarted(key="x")]


async def test_say_hello_returns_once_the_hello_is_written():
    """say_hello flushes: it returns only after the hello was handed to the stream."""
    left, right = trio.testing.lockstep_stream_pair()
    server = hello_conn(right)
    async with open_connection(left, SMALL_LIMITS) as client:
        said = trio.Event()

        async def hello_then_note() -> None:
            await say_hello(client, m.Hello(role="peer", protocol=PROTOCOL_VERSION))
            said.set()

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hello_then_note)
                await trio.testing.wait_all_tasks_blocked()
                assert not said.is_set()  # lockstep: nobody has read it yet
                assert await server.receive() == [m.Hello(role="peer", protocol=PROTOCOL_VERSION)]


@pytest.mark.parametrize(
    "second, reason",
    [
        pytest.param(WORKER_HELLO, "a hello must come alone, got 2 messages", id="two-hellos"),
        pytest.param(
            m.Register(held={}, running=[], done=True), "op 'register' may not be sent hello", id="hello-and-register"
        ),
    ],
)
async def test_hello_batched_with_other_messages_is_refused(second, reason):
    """A hello must travel alone: one sharing its batch is a protocol error."""
    left, right = trio.testing.memory_stream_pair()
    server = hello_conn(right)
    async with open_connection(left, SMALL_LIMITS) as client:
        client.send(WORKER_HELLO)
        client.send(second)  # no flush between them: one batch
        with trio.fail_after(5), pytest.raises(ProtocolError, match=re.escape(reason)):
            await expect_hello(server, 5, SCHEDULER_ROLES, "a test scheduler", SMALL_LIMITS, authenticated=CLUSTER)


REFUSED_HELLOS = [
    pytest.param(
        {"op": "hello", "role": "peer", "protocol": PROTOCOL_VERSION + 1},
        "a test scheduler speaks trioflow protocol 1, not 2",
        id="wrong-protocol",
    ),
    pytest.param(
        {"op": "hello", "role": "client", "protocol": PROTOCOL_VERSION, "client_id": "c-1"},
        "this is a test scheduler, which serves peer or worker connections, not clients",
        id="role-not-served",
    ),
]


@pytest.mark.parametrize("first, reason", REFUSED_HELLOS)
async def test_hello_this_server_does_not_serve_gets_refused(first, reason):
    """A hello for a protocol or role this server does not serve is answered with Refused, and the server raises."""
    server = OneHelloServer({"peer": m.PEER_TO_WORKER, "worker": m.WORKER_TO_SCHEDULER})
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve, right)
        async with open_connection(left, SMALL_LIMITS, inbound=m.SCHEDULER_TO_CLIENT) as client:
            client.send(first)
            with trio.fail_after(5):
                assert await client.receive() == [m.Refused(reason=reason)]
                with pytest.raises(CommClosedError):
                    await client.receive()  # and the server closed the connection
    assert isinstance(server.error, ProtocolError)
    assert str(server.error) == reason
    assert server.hello is None


@pytest.mark.parametrize(
    "first, reason",
    [
        pytest.param({"op": "task_started", "key": "a"}, "op 'task_started' may not be sent hello", id="not-hello"),
        pytest.param({"op": "compute"}, "unknown op 'compute'", id="unknown-op"),
        pytest.param({"op": "hello", "role": "worker"}, "'hello': lacks field 'protocol'", id="missing-protocol"),
        pytest.param(
            {"op": "hello", "role": "emperor", "protocol": PROTOCOL_VERSION},
            "'hello': field role must be one of 'client', 'worker', 'peer', 'control', got 'emperor'",
            id="unknown-role",
        ),
        pytest.param(
            {"op": "hello", "role": "client", "protocol": PROTOCOL_VERSION},
            "'hello': a client hello needs field 'client_id'",
            id="client-without-id",
        ),
        *REFUSED_HELLOS,
    ],
)
async def test_bad_hello_raises_protocol_error(first, reason):
    """A first message that is not a valid hello for this server is rejected with ProtocolError naming why."""
    left, right = trio.testing.memory_stream_pair()
    server = hello_conn(right)
    async with open_connection(left, SMALL_LIMITS) as client:
        client.send(first)
        with trio.fail_after(5), pytest.raises(ProtocolError, match=re.escape(reason)):
            await expect_hello(server, 5, {"peer": m.PEER_TO_WORKER, "worker": m.WORKER_TO_SCHEDULER}, "a test scheduler", SMALL_LIMITS, authenticated=CLUSTER)


async def test_silent_peer_times_out_as_protocol_error(autojump_clock):
    """A peer that never says hello is rejected after the timeout, as ProtocolError."""
    _left, right = trio.testing.memory_stream_pair()
    server = hello_conn(right)
    start = trio.current_time()
    with trio.fail_after(10), pytest.raises(ProtocolError, match=re.escape("no hello within 0.5 s (handshake_timeout)")):
        await expect_hello(server, 0.5, SCHEDULER_ROLES, "a test scheduler", SMALL_LIMITS, authenticated=CLUSTER)
    assert trio.current_time() - start == pytest.approx(0.5)


async def test_empty_first_batch_is_a_protocol_error():
    """A well-formed but empty first batch is rejected as ProtocolError (not IndexError)."""
    left, right = trio.testing.memory_stream_pair()
    server = hello_conn(right)
    await left.send_all(b"".join(batch_frames([])))
    with trio.fail_after(5), pytest.raises(ProtocolError, match="a hello must come alone, got 0 messages"):
        await expect_hello(server, 5, SCHEDULER_ROLES, "a test scheduler", SMALL_LIMITS, authenticated=CLUSTER)


async def test_peer_hanging_up_before_hello_is_comm_closed():
    """A peer that closes before saying hello gives CommClosedError."""
    left, right = trio.testing.memory_stream_pair()
    server = hello_conn(right)
    await left.aclose()
    with trio.fail_after(5), pytest.raises(CommClosedError):
        await expect_hello(server, 5, SCHEDULER_ROLES, "a test scheduler", SMALL_LIMITS, authenticated=CLUSTER)


async def test_big_batch_before_the_hello_is_refused_unread():
    """Before its hello a peer may send at most 16 KiB: a bigger first batch is refused from its header."""
    left, right = trio.testing.memory_stream_pair()
    server = hello_conn(right)
    header, body = batch_frames([encode_message({**WORKER_HELLO.to_wire(), "pad": "x" * 20_000})])
    await left.send_all(header)  # the body never comes: it is not waited for
    with trio.fail_after(5), pytest.raises(ProtocolError, match="exceeds max_body_bytes=16384"):
        await expect_hello(server, 5, SCHEDULER_ROLES, "a test scheduler", SMALL_LIMITS, authenticated=CLUSTER)


# ------------------------------------------------------------- welcoming --


async def test_await_welcome_returns_the_welcome_and_what_came_with_it():
    """await_welcome returns the Welcome and the rest of its batch."""
    left, right = trio.testing.memory_stream_pair()
    client = Connection(left, SMALL_LIMITS, inbound=m.SCHEDULER_TO_CLIENT)
    frames = batch_frames([encode_message(m.Welcome(address="tcp://127.0.0.1:2").to_wire()), encode_message({"op": "restarted"})])
    await right.send_all(b"".join(frames))
    with trio.fail_after(5):
        welcome, rest = await await_welcome(client, 5, "tcp://127.0.0.1:2", "a trioflow scheduler")
    assert welcome == m.Welcome(address="tcp://127.0.0.1:2")
    assert rest == [m.Restarted()]


async def test_await_welcome_raises_handshake_refused_with_the_servers_reason():
    """A connecting side refused by the server raises HandshakeRefused carrying the server's reason."""
    server = OneHelloServer({"worker": m.WORKER_TO_SCHEDULER})
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve, right)
        async with open_connection(left, SMALL_LIMITS, inbound=m.SCHEDULER_TO_CLIENT) as client:
            await say_hello(client, m.Hello(role="client", protocol=PROTOCOL_VERSION, client_id="c-1"))
            with trio.fail_after(5), pytest.raises(
                HandshakeRefused,
                match=re.escape(
                    "sim://s refused the connection: this is a test scheduler, which serves worker connections, not clients"
                ),
            ):
                await await_welcome(client, 5, "sim://s", "a trioflow scheduler")
    assert isinstance(server.error, ProtocolError)


@pytest.mark.parametrize(
    "answer, reason",
    [
        pytest.param(
            b"HTTP/1.1 400 Bad Request\r\n\r\n",
            "tcp://127.0.0.1:80 is not a trioflow scheduler: the peer does not speak trioflow: "
            "it sent b'HTTP/1.1 400 Bad Request",
            id="an-http-server",
        ),
        pytest.param(
            b"".join(batch_frames([encode_message({"op": "get_data", "keys": ["a"], "request_id": 1})])),
            "tcp://127.0.0.1:80 is not a trioflow scheduler: op 'get_data' may not be sent scheduler->client",
            id="an-op-from-elsewhere",
        ),
        pytest.param(
            b"".join(batch_frames([encode_message({"op": "restarted"})])),
            "tcp://127.0.0.1:80 is not a trioflow scheduler: it answered with Restarted()",
            id="not-a-welcome",
        ),
    ],
)
async def test_await_welcome_raises_handshake_refused_on_a_stranger(answer, reason):
    """An answer that is not a welcome, or not trioflow at all, raises HandshakeRefused naming what answered."""
    left, right = trio.testing.memory_stream_pair()
    client = Connection(left, SMALL_LIMITS, peer="tcp://127.0.0.1:80", inbound=m.SCHEDULER_TO_CLIENT)
    await right.send_all(answer)
    with trio.fail_after(5), pytest.raises(HandshakeRefused, match=re.escape(reason)):
        await await_welcome(client, 5, "tcp://127.0.0.1:80", "a trioflow scheduler")


async def test_await_welcome_from_a_silent_server_is_comm_closed(autojump_clock):
    """Nothing answering within the timeout is CommClosedError (perhaps slow), not a refusal."""
    left, _right = trio.testing.memory_stream_pair()
    client = Connection(left, SMALL_LIMITS, inbound=m.SCHEDULER_TO_CLIENT)
    start = trio.current_time()
    with trio.fail_after(60), pytest.raises(CommClosedError) as info:
        await await_welcome(client, 5, "tcp://127.0.0.1:2", "a trioflow scheduler")
    assert type(info.value) is CommClosedError
    assert str(info.value) == "tcp://127.0.0.1:2 did not answer within 5 s; is it a trioflow scheduler?"
    assert trio.current_time() - start == pytest.approx(5)


async def test_await_welcome_from_a_server_hanging_up_is_comm_closed():
    """A server that closes without a word gives CommClosedError, not HandshakeRefused."""
    left, right = trio.testing.memory_stream_pair()
    client = Connection(left, SMALL_LIMITS, inbound=m.SCHEDULER_TO_CLIENT)
    await right.aclose()
    with trio.fail_after(5), pytest.raises(CommClosedError) as info:
        await await_welcome(client, 5, "tcp://127.0.0.1:2", "a trioflow scheduler")
    assert type(info.value) is CommClosedError


# -------------------------------------------------------------- the gate --


async def test_connection_gate_refuses_beyond_its_limit():
    """At most `limit` connections are let in at once; one leaving lets the next in."""
    gate = ConnectionGate(2, "a test port")
    assert gate.try_enter()
    assert gate.try_enter()
    assert not gate.try_enter()
    assert gate.open == 2
    gate.leave()
    assert gate.try_enter()
    assert not gate.try_enter()
    assert gate.open == 2


async def test_connection_gate_logs_at_most_one_summary_per_10_s(mock_clock, caplog):
    """A flood of refusals costs one log line per 10 s, which counts the refusals since the last."""
    caplog.set_level(logging.WARNING, logger="trioflow.comm")
    gate = ConnectionGate(1, "a test port")
    assert gate.try_enter()
    for _ in range(5):
        assert not gate.try_enter()  # t=0: the first is logged, the next 4 counted
    mock_clock.jump(9.9)
    for _ in range(3):
        assert not gate.try_enter()  # counted
    mock_clock.jump(0.1)
    assert not gate.try_enter()  # t=10: logged with the 7 before it
    assert [r.getMessage() for r in caplog.records if r.name == "trioflow.comm"] == [
        "a test port refused 1 connection(s): already at max_connections=1",
        "a test port refused 8 connection(s): already at max_connections=1",
    ]
