"""`Connection`: ordered, batched messages over a stream, with limits and clean failures."""

from __future__ import annotations

import os
import re
import socket
import struct
import tracemalloc

import numpy as np
import pytest
import trio
import trio.testing

from tests.comm.helpers import BIG_LIMITS, SMALL_LIMITS, connection_pair, tcp_connection_pair
from trioflow.comm import (
    ByteBudget,
    Connection,
    FrameLimits,
    Serialized,
    TCPNetwork,
    dumps,
    loads,
    open_connection,
)
from trioflow.comm import buffers
from trioflow.comm import connection as connection_module
from trioflow.comm import messages as m
from trioflow.comm.buffers import set_cork
from trioflow.comm.connection import DECODE_SLICE
from trioflow.comm.frames import CONTINUED, batch_frames, encode_message
from trioflow.errors import CommClosedError, ProtocolError

BIG_BYTES = 64 * 1024 * 1024


# ------------------------------------------------------------ delivery --


async def test_single_message_arrives():
    """A message sent on an idle connection arrives, alone, as sent."""
    async with connection_pair() as (a, b):
        a.send({"op": "ping", "n": 1, "blob": b"\x00\x01"})
        assert await b.receive() == [{"op": "ping", "n": 1, "blob": b"\x00\x01"}]


async def test_messages_arrive_in_order_across_batches():
    """Messages sent in bursts separated by checkpoints arrive complete and in order."""
    n = 500
    received: list[int] = []
    async with connection_pair() as (a, b):
        for i in range(n):
            a.send({"op": "n", "i": i})
            if i % 7 == 0:
                await trio.lowlevel.checkpoint()  # let the sender write a batch
        while len(received) < n:
            received.extend(m["i"] for m in await b.receive())
    assert received == list(range(n))


async def test_both_directions_are_independent():
    """Each side can send and receive at the same time."""
    async with connection_pair() as (a, b):
        a.send({"op": "from_a"})
        b.send({"op": "from_b"})
        assert await b.receive() == [{"op": "from_a"}]
        assert await a.receive() == [{"op": "from_b"}]


async def test_queued_messages_go_out_in_one_batch():
    """Everything queued before the sender runs is written as one batch."""
    async with connection_pair() as (a, b):
        for i in range(40):  # no checkpoint in this loop: the sender cannot run
            a.send({"op": "n", "i": i})
        batch = await b.receive()
    assert [m["i"] for m in batch] == list(range(40))


async def test_batch_respects_the_peers_frame_limit():
    """A backlog bigger than max_frames is split into several valid batches."""
    async with connection_pair() as (a, b):
        for i in range(10):  # each message has 2 frames; the peer takes 8 per batch
            a.send({"op": "d", "i": i, "v": Serialized(b"h", [b"buffer"])})
        received: list[dict] = []
        batches = 0
        while len(received) < 10:
            received.extend(await b.receive())
            batches += 1
    assert [m["i"] for m in received] == list(range(10))
    assert batches > 1


async def test_flush_returns_once_written():
    """flush() waits until the bytes were handed to the stream, not just queued."""
    async with connection_pair(make_streams=trio.testing.lockstep_stream_pair) as (a, b):
        flushed = trio.Event()

        async def flush_then_note():
            await a.flush()
            flushed.set()

        async with trio.open_nursery() as nursery:
            a.send({"op": "x"})
            nursery.start_soon(flush_then_note)
            await trio.testing.wait_all_tasks_blocked()
            # lockstep: send_all cannot finish until the peer reads.
            assert not flushed.is_set()
            assert await b.receive() == [{"op": "x"}]
            with trio.fail_after(5):
                await flushed.wait()


async def test_flush_with_nothing_queued_returns_at_once():
    """flush() on an idle connection does not wait."""
    async with connection_pair() as (a, _):
        with trio.fail_after(5):
            await a.flush()
        assert not a.closed


async def test_large_buffer_round_trips_over_tcp():
    """A 64 MB array travels as an out-of-band frame over real TCP, intact."""
    array = np.random.default_rng(0).integers(0, 2**63, BIG_BYTES // 8, dtype=np.int64)
    got: list[dict] = []
    done = trio.Event()

    async def handler(stream):
        async with open_connection(stream, BIG_LIMITS, peer="client") as conn:
            got.extend(await conn.receive())
            done.set()

    async with trio.open_nursery() as nursery:
        network = TCPNetwork()
        address = await nursery.start(network.serve, handler, "127.0.0.1", 0)
        async with open_connection(await network.connect(address), BIG_LIMITS) as conn:
            conn.send({"op": "data", "value": dumps(array)})
            with trio.fail_after(30):
                await conn.flush()
                await done.wait()
        nursery.cancel_scope.cancel()
    [message] = got
    value = message["value"]
    assert [memoryview(b).nbytes for b in value.buffers] == [BIG_BYTES]
    result = loads(value)
    assert np.array_equal(result, array)
    # The array lives in the received frame itself: no copy after the read.
    assert np.shares_memory(result, np.frombuffer(value.buffers[0], dtype=np.uint8))


async def test_a_buffer_cut_into_frames_round_trips_over_tcp_into_one_buffer():
    """A 64 MB array with max_frame_bytes of 8 MiB travels as 8 frames and arrives as ONE buffer the array lives in."""
    array = np.random.default_rng(2).integers(0, 2**63, BIG_BYTES // 8, dtype=np.int64)
    limits = FrameLimits(max_frame_bytes=8 * 1024 * 1024, max_batch_bytes=BIG_BYTES + (1 << 20))
    got: list[dict] = []
    done = trio.Event()

    async def handler(stream):
        async with open_connection(stream, limits, peer="client") as conn:
            got.extend(await conn.receive())
            done.set()

    async with trio.open_nursery() as nursery:
        network = TCPNetwork()
        address = await nursery.start(network.serve, handler, "127.0.0.1", 0)
        async with open_connection(await network.connect(address), limits) as conn:
            conn.send({"op": "data", "value": dumps(array)})
            with trio.fail_after(30):
                await conn.flush()
                await done.wait()
        nursery.cancel_scope.cancel()
    [message] = got
    [buffer] = message["value"].buffers
    assert memoryview(buffer).nbytes == BIG_BYTES
    result = loads(message["value"])
    assert np.array_equal(result, array)
    assert np.shares_memory(result, np.frombuffer(buffer, dtype=np.uint8))


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(Serialized(b"h", [bytes(range(256)) * 40]), id="buffer-in-three-frames"),
        pytest.param(Serialized(bytes(range(256)) * 40), id="pickle-stream-in-three-frames"),
    ],
)
async def test_a_value_over_max_frame_bytes_travels_in_pieces(value):
    """A buffer (or pickle stream) over max_frame_bytes is cut into frames the peer accepts and arrives whole."""
    async with connection_pair() as (a, b):
        a.send({"op": "big", "value": value})
        with trio.fail_after(5):
            [message] = await b.receive()
    assert message["value"] == value


async def test_large_bytes_round_trip_in_memory():
    """A 16 MB bytes value inside the msgpack body arrives intact where max_body_bytes allows it."""
    payload = bytes(range(256)) * (16 * 1024 * 1024 // 256)
    async with connection_pair(limits=BIG_LIMITS) as (a, b):
        a.send({"op": "blob", "data": payload})
        [message] = await b.receive()
    assert message["data"] == payload


# ----------------------------------------------------- typed messages --


async def test_connection_with_an_inbound_channel_returns_typed_messages():
    """Maps that arrive on a channel come out as checked Message objects; raw dicts and Messages both send."""
    async with connection_pair(inbound=(None, m.WORKER_TO_SCHEDULER)) as (worker, scheduler):
        worker.send(m.TaskStarted(key="x"))
        worker.send({"op": "task_finished", "key": "x", "nbytes": 8})
        received: list = []
        with trio.fail_after(5):
            while len(received) < 2:
                received.extend(await scheduler.receive())
    assert received == [m.TaskStarted(key="x"), m.TaskFinished(key="x", nbytes=8)]


async def test_broken_one_way_message_raises_protocol_error_in_receive():
    """A one-way message that breaks its declaration ends the batch with ProtocolError naming op and field."""
    async with connection_pair(inbound=(None, m.WORKER_TO_SCHEDULER)) as (worker, scheduler):
        worker.send({"op": "task_finished", "key": "x", "nbytes": -1})
        with trio.fail_after(5), pytest.raises(ProtocolError, match=re.escape("'task_finished': field nbytes must be")):
            await scheduler.receive()


async def test_op_not_allowed_on_the_channel_raises_protocol_error():
    """An op sent the wrong way (a worker report arriving on a worker's data port) is refused."""
    async with connection_pair(inbound=(None, m.PEER_TO_WORKER)) as (peer, worker):
        peer.send(m.TaskStarted(key="x"))
        with trio.fail_after(5), pytest.raises(ProtocolError, match="op 'task_started' may not be sent peer->worker"):
            await worker.receive()


async def test_broken_request_arrives_as_invalid_and_the_connection_stays_usable():
    """A request that breaks its declaration arrives as an Invalid to answer; the batch's others arrive too."""
    async with connection_pair(inbound=(None, m.PEER_TO_WORKER)) as (peer, worker):
        good = m.GetData(keys=["a"])
        good.request_id = 5
        peer.send({"op": "get_data", "request_id": 4, "keys": [1]})
        peer.send(good)
        received: list = []
        with trio.fail_after(5):
            while len(received) < 2:
                received.extend(await worker.receive())
        invalid, valid = received
        assert isinstance(invalid, m.Invalid)
        assert (invalid.op, invalid.request_id) == ("get_data", 4)
        assert "field keys[0] must be a key" in invalid.reason
        assert valid == good
        assert not worker.closed


async def test_many_messages_in_one_batch_are_all_checked():
    """A batch of thousands of messages (decoded in slices) arrives complete, in order, typed."""
    limits = FrameLimits()
    async with connection_pair(limits, inbound=(None, m.WORKER_TO_SCHEDULER)) as (worker, scheduler):
        for i in range(2000):
            worker.send(m.TaskStarted(key=f"k-{i}"))
        received: list = []
        with trio.fail_after(5):
            while len(received) < 2000:
                received.extend(await scheduler.receive())
    assert received == [m.TaskStarted(key=f"k-{i}") for i in range(2000)]


# ---------------------------------------------------- held messages --

needs_cork = pytest.mark.skipif(not hasattr(socket, "TCP_CORK"), reason="TCP_CORK is Linux's")


async def test_more_messages_queued_than_the_peer_reads_in_one_batch_arrive_in_several():
    """A batch is one msgpack array, and the peer reads at most max_items
    entries in one: 500 queued messages (SMALL_LIMITS: 64) go as several
    batches, not as one the peer must refuse."""
    async with connection_pair() as (left, right):
        for i in range(500):
            left.send({"op": "n", "i": i})
        got: list[int] = []
        with trio.fail_after(10):
            while len(got) < 500:
                batch = await right.receive()
                assert len(batch) <= SMALL_LIMITS.max_items
                got.extend(message["i"] for message in batch)
        assert got == list(range(500))


async def test_a_sender_with_many_batches_queued_lets_other_tasks_run_between_them():
    """Writes the kernel takes at once are no checkpoints (`buffers.send_frames`),
    so the sender yields between batches itself: another task runs while a
    long outbox is being written, and every message still arrives in order."""
    async with tcp_connection_pair() as (sender, receiver):
        total = 2_000  # SMALL_LIMITS: a 4 KiB body a batch, some 20 batches in all
        seen_mid_write: list[int] = []
        got: list[int] = []

        async def watch():
            while sender._written < total:
                if 0 < sender._written:
                    seen_mid_write.append(sender._written)
                await trio.lowlevel.checkpoint()

        for i in range(total):
            sender.send({"op": "n", "i": i})
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                while len(got) < total:
                    got.extend(message["i"] for message in await receiver.receive())
        assert got == list(range(total))
        assert seen_mid_write, "no other task ran while the sender wrote its batches"


async def test_batches_already_here_whole_come_back_from_one_receive():
    """Two batches read from the stream at once (a worker's held `task_started`
    and its `task_finished` arrive so) are returned by one receive, in order:
    the reader and its handler run once for both."""
    async with connection_pair() as (left, right):
        left.send({"op": "n", "i": 0})
        await left.flush()
        left.send({"op": "n", "i": 1})
        await left.flush()
        with trio.fail_after(10):
            got = await right.receive()
        assert [message["i"] for message in got] == [0, 1]
        assert right._reads == 1, "the two batches were not read at once: the test proves nothing"
        assert right._batches_received == 2


async def test_a_receive_whose_batch_was_already_here_is_still_a_checkpoint():
    """A receive takes the buffered batches only up to `DECODE_SLICE`
    messages; the next one then reads nothing from the stream, and yields
    all the same, so a reader going through a backlog lets other tasks run
    between two receives (`drivers.Driver.run_or_post` runs what a reader
    received at once, and counts on it)."""
    total = DECODE_SLICE + 1  # batches of SMALL_LIMITS.max_items (64)
    async with connection_pair() as (left, right):
        for i in range(total):
            left.send({"op": "n", "i": i})
        await left.flush()
        with trio.fail_after(10):
            first = await right.receive()
            reads = right._reads
            with trio.testing.assert_checkpoints():
                second = await right.receive()
        assert right._reads == reads, "the last batch was not already buffered: the test proves nothing"
        assert len(first) == DECODE_SLICE
        assert [message["i"] for message in first + second] == list(range(total))


@pytest.mark.parametrize(
    "bad, reason",
    [
        pytest.param(struct.pack("<IQ", 1, 3) + b"\xc1\xc1\xc1", "undecodable", id="body"),
        pytest.param(struct.pack("<IQ", 1, 2**40), "exceeds max_body_bytes", id="header"),
        pytest.param(struct.pack("<I", 0), "announces 0 frames", id="no-frames"),
    ],
)
async def test_a_good_batch_before_a_bad_one_is_received_before_the_error(bad, reason):
    """A batch that breaks the protocol, arriving with a good one, is left
    for the next receive: the good batch's messages are returned first."""
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(right, SMALL_LIMITS)
    good = b"".join(bytes(frame) for frame in batch_frames([encode_message({"op": "n", "i": 0})]))
    await left.send_all(good + bad)
    with trio.fail_after(1):
        got = await conn.receive()
    assert got == [{"op": "n", "i": 0}]
    with trio.fail_after(1), pytest.raises(ProtocolError, match=reason):
        await conn.receive()


async def test_a_buffered_batch_the_budget_cannot_take_at_once_waits_for_the_next_receive():
    """Taking a buffered batch along never skips the process's budget: one
    that does not fit while the first is held is left for the next receive,
    which takes its share the usual way."""
    message = encode_message({"op": "n", "i": 0})
    one_batch = b"".join(bytes(frame) for frame in batch_frames([message]))
    budget = ByteBudget(1000)
    await budget.acquire(1000 - len(message.body) - 2)  # room for one batch body only
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(right, SMALL_LIMITS, budget=budget)
    await left.send_all(one_batch + one_batch)
    with trio.fail_after(1):
        got = await conn.receive()
    assert got == [{"op": "n", "i": 0}]
    assert budget.in_use == 1000 - len(message.body) - 2
    with trio.fail_after(1):
        assert await conn.receive() == [{"op": "n", "i": 0}]


def corked(conn: Connection) -> bool:
    return bool(conn.stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK))


class _CountingOs:
    """`os` for trioflow.comm.buffers, counting the reads that found nothing."""

    def __init__(self):
        self.failed_reads = 0

    def read(self, fd, n):
        try:
            return os.read(fd, n)
        except BlockingIOError:
            self.failed_reads += 1
            raise

    def __getattr__(self, name):
        return getattr(os, name)


@pytest.mark.parametrize("wait_after_short_read", [True, False])
async def test_after_a_short_read_the_next_receive_waits_instead_of_reading_nothing(monkeypatch, wait_after_short_read):
    """A round trip's messages each come alone: after one is read, the
    kernel has nothing more, and a read tried first would fail."""
    counting = _CountingOs()
    monkeypatch.setattr(buffers, "os", counting)
    monkeypatch.setattr(connection_module, "WAIT_AFTER_SHORT_READ", wait_after_short_read)
    async with tcp_connection_pair() as (left, right):
        for i in range(5):
            counting.failed_reads = 0
            async with trio.open_nursery() as nursery:

                async def send_once_blocked(i=i):
                    await trio.testing.wait_all_tasks_blocked()
                    left.send({"op": "ping", "i": i})

                nursery.start_soon(send_once_blocked)
                with trio.fail_after(10):
                    assert await right.receive() == [{"op": "ping", "i": i}]
            # The first receive has no read before it to go by.
            if wait_after_short_read and i:
                assert counting.failed_reads == 0
            else:
                assert counting.failed_reads >= 1


@needs_cork
async def test_a_batch_of_held_messages_waits_in_a_corked_socket_for_the_next_write():
    """task_started alone is written to a corked socket; the next message
    uncorks it, and both arrive, in order."""
    async with tcp_connection_pair(inbound=m.WORKER_TO_SCHEDULER) as (worker, scheduler):
        assert m.TaskStarted.HELD and not m.TaskErred.HELD
        worker.send(m.TaskStarted(key="a"))
        with trio.fail_after(10):  # written at once: the kernel holds it, not we
            await worker.flush()
        assert corked(worker)  # the kernel's, but not sent on its own
        worker.send(m.Heartbeat())
        with trio.fail_after(10):
            await worker.flush()
        assert not corked(worker)
        got: list[m.Message] = []
        with trio.fail_after(10):
            while len(got) < 2:
                got.extend(await scheduler.receive())
        assert [type(message) for message in got] == [m.TaskStarted, m.Heartbeat]
        assert got[0].key == "a"


@needs_cork
async def test_a_batch_with_any_message_that_is_not_held_goes_out_at_once():
    """task_started queued together with another message is not held back."""
    async with tcp_connection_pair(inbound=m.WORKER_TO_SCHEDULER) as (worker, scheduler):
        worker.send(m.TaskStarted(key="a"))
        worker.send(m.Heartbeat())  # the same batch: the sender has not run
        with trio.fail_after(10):
            await worker.flush()
        assert not corked(worker)
        with trio.fail_after(10):
            got = await scheduler.receive()
        assert [type(message) for message in got] == [m.TaskStarted, m.Heartbeat]


@needs_cork
async def test_a_held_message_with_nothing_after_it_still_arrives():
    """The kernel sends what a corked socket holds within 200 ms: a
    task_started followed by silence is not lost."""
    async with tcp_connection_pair(inbound=m.WORKER_TO_SCHEDULER) as (worker, scheduler):
        worker.send(m.TaskStarted(key="alone"))
        with trio.fail_after(10):
            await worker.flush()
            [message] = await scheduler.receive()
        assert isinstance(message, m.TaskStarted) and message.key == "alone"


async def test_held_messages_go_out_at_once_on_a_stream_that_cannot_cork():
    """An in-memory stream (the simulator's) has no socket: nothing is held."""
    async with connection_pair(inbound=(None, m.WORKER_TO_SCHEDULER)) as (worker, scheduler):
        worker.send(m.TaskStarted(key="a"))
        with trio.fail_after(10):
            await worker.flush()
            [message] = await scheduler.receive()
        assert not set_cork(worker.stream, True)
        assert message.key == "a"


# ------------------------------------------------------------- closing --


async def test_peer_close_gives_comm_closed_on_receive():
    """When the peer closes, receive() raises CommClosedError and the connection is closed."""
    async with connection_pair() as (a, b):
        await b.aclose()
        with trio.fail_after(5), pytest.raises(CommClosedError):
            await a.receive()
        assert a.closed


async def test_peer_close_mid_batch_gives_comm_closed():
    """A peer that hangs up halfway through a batch causes CommClosedError, not a hang."""
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(right, SMALL_LIMITS)
    header, *frames = batch_frames([encode_message({"op": "x", "data": b"y" * 100})])
    await left.send_all(header + frames[0][:10])
    await left.aclose()
    with trio.fail_after(5), pytest.raises(CommClosedError):
        await conn.receive()
    assert conn.closed


async def test_send_after_close_raises():
    """send() on a closed connection raises CommClosedError with the reason."""
    async with connection_pair() as (a, _):
        await a.aclose("test is done")
        with pytest.raises(CommClosedError, match="test is done"):
            a.send({"op": "late"})


async def test_receive_after_local_close_raises():
    """receive() on a connection closed locally raises CommClosedError."""
    async with connection_pair() as (a, _):
        await a.aclose()
        with pytest.raises(CommClosedError):
            await a.receive()


async def test_flush_after_close_raises():
    """flush() of messages that can no longer be written raises CommClosedError."""
    async with connection_pair(make_streams=trio.testing.lockstep_stream_pair) as (a, _):
        a.send({"op": "never_read"})
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.aclose)
            with trio.fail_after(5), pytest.raises(CommClosedError):
                await a.flush()


async def test_sender_cancelled_mid_write_closes_the_connection():
    """A batch cut short by cancellation closes the connection (the stream is unusable)."""
    left, _right = trio.testing.lockstep_stream_pair()  # nobody reads: the write blocks
    conn = Connection(left, SMALL_LIMITS)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run_sender)
        conn.send({"op": "stuck"})
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert conn.closed
    with pytest.raises(CommClosedError):
        conn.send({"op": "after"})
    with trio.fail_after(5), pytest.raises(CommClosedError):
        await conn.flush()


async def test_write_failure_closes_the_connection():
    """When the stream breaks under the sender, the connection is closed and flush says so."""
    left, _right = trio.testing.memory_stream_pair()
    async with open_connection(left, SMALL_LIMITS) as conn:
        await left.send_stream.aclose()  # the next write raises ClosedResourceError
        conn.send({"op": "x"})
        with trio.fail_after(5), pytest.raises(CommClosedError):
            await conn.flush()
        assert conn.closed


# ------------------------------------------------------- hostile peers --


@pytest.mark.parametrize(
    "header, reason",
    [
        pytest.param(struct.pack("<IQ", 1, 2**40), "exceeds max_body_bytes", id="body"),
        pytest.param(struct.pack("<IQQ", 2, 10, 2**40), "exceeds max_frame_bytes", id="buffer"),
    ],
)
async def test_peer_announcing_a_huge_frame_is_rejected_before_allocating(header, reason):
    """A header claiming a 2**40-byte body or buffer frame raises ProtocolError at once."""
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(right, SMALL_LIMITS)
    await left.send_all(header)
    with trio.fail_after(1), pytest.raises(ProtocolError, match=reason):
        await conn.receive()


async def test_peer_announcing_too_many_frames_is_rejected():
    """A header announcing more frames than max_frames raises ProtocolError at once."""
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(right, SMALL_LIMITS)
    await left.send_all(struct.pack("<I", 2**32 - 1))
    with trio.fail_after(1), pytest.raises(ProtocolError, match="announces"):
        await conn.receive()


async def test_peer_sending_zero_frames_is_rejected():
    """A batch announcing zero frames raises ProtocolError."""
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(right, SMALL_LIMITS)
    await left.send_all(struct.pack("<I", 0))
    with trio.fail_after(1), pytest.raises(ProtocolError, match="announces 0 frames"):
        await conn.receive()


async def test_peer_sending_garbage_body_is_rejected():
    """Well-framed bytes that are not msgpack raise ProtocolError from receive()."""
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(right, SMALL_LIMITS)
    await left.send_all(struct.pack("<IQ", 1, 3) + b"\xc1\xc1\xc1")
    with trio.fail_after(1), pytest.raises(ProtocolError, match="undecodable"):
        await conn.receive()


async def test_huge_announced_frame_allocates_nothing_ahead_of_its_bytes():
    """A header announcing a 512 MiB frame costs memory for the bytes that came, not for 512 MiB."""
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(right, FrameLimits(), budget=ByteBudget(1 << 30))
    await left.send_all(struct.pack("<IQQ", 2, 1, 512 * 1024 * 1024) + b"\x90" + b"x" * 1000)
    await left.aclose()
    tracemalloc.start()
    try:
        with trio.fail_after(5), pytest.raises(CommClosedError, match="mid-frame"):
            await conn.receive()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024
    assert conn.budget.in_use == 0


async def test_a_huge_buffer_announced_in_pieces_allocates_nothing_ahead_of_its_bytes():
    """A header announcing 3 GiB as 12 continued frames of 256 MiB costs memory for the bytes that came only."""
    piece = 256 * 1024 * 1024
    lengths = [1] + [piece | CONTINUED] * 11 + [piece]
    left, right = trio.testing.memory_stream_pair()
    limits = FrameLimits(max_frame_bytes=piece, max_batch_bytes=4 << 30)
    conn = Connection(right, limits, budget=ByteBudget(4 << 30))
    await left.send_all(struct.pack(f"<I{len(lengths)}Q", len(lengths), *lengths) + b"\x90" + b"x" * 1000)
    await left.aclose()
    tracemalloc.start()
    try:
        with trio.fail_after(5), pytest.raises(CommClosedError, match="mid-frame"):
            await conn.receive()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024
    assert conn.budget.in_use == 0


async def test_batch_larger_than_max_batch_bytes_is_refused_before_reading():
    """A header announcing more than max_batch_bytes in all is refused without waiting for its bytes."""
    budget = ByteBudget(16 << 20)
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(right, FrameLimits(max_batch_bytes=1 << 20), budget=budget)
    await left.send_all(struct.pack("<IQQ", 2, 100, 2 << 20))  # the frames never come
    with trio.fail_after(1), pytest.raises(
        ProtocolError,
        match=re.escape("batch of 2097252 bytes exceeds the connection's budget of 1048576 bytes (max_connection_bytes)"),
    ):
        await conn.receive()
    assert budget.in_use == 0


async def test_a_batch_waits_for_its_share_of_the_process_budget():
    """A batch's frames are read once the process's budget has room, and its share is given back after."""
    budget = ByteBudget(1000)
    await budget.acquire(900)  # another connection's batch in flight
    left, right = trio.testing.memory_stream_pair()
    reader = Connection(right, SMALL_LIMITS, budget=budget)
    got: list[dict] = []

    async def read() -> None:
        got.extend(await reader.receive())

    async with open_connection(left, SMALL_LIMITS) as writer:
        writer.send({"op": "x", "pad": b"y" * 200})
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                assert got == []
                assert budget.in_use == 900
                budget.release(900)
    assert got == [{"op": "x", "pad": b"y" * 200}]
    assert budget.in_use == 0


async def test_peer_that_does_not_speak_trioflow_is_named():
    """A first answer that is text (an HTTP server) raises ProtocolError saying so, with what it sent."""
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(right, SMALL_LIMITS, peer="tcp://127.0.0.1:80")
    await left.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with trio.fail_after(1), pytest.raises(
        ProtocolError, match=re.escape("the peer does not speak trioflow: it sent b'HTTP/1.1 400 Bad")
    ):
        await conn.receive()


async def test_text_after_a_first_valid_batch_is_a_plain_frame_count_error():
    """Once a peer has spoken trioflow, a bad header is a bad header, not a stranger."""
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(right, SMALL_LIMITS)
    await left.send_all(b"".join(batch_frames([encode_message({"op": "x"})])) + b"HTTP/1.1 400 Bad Request")
    with trio.fail_after(1):
        assert await conn.receive() == [{"op": "x"}]
        with pytest.raises(ProtocolError, match="batch announces 1347703880 frames") as info:
            await conn.receive()
    assert "does not speak trioflow" not in str(info.value)


@pytest.mark.parametrize(
    "message, reason",
    [
        pytest.param({"op": "hello", "pad": b"x" * 20_000}, "exceeds max_body_bytes=16384", id="big-body"),
        pytest.param({"op": "hello", "v": Serialized(b"h")}, "announces 2 frames (limit 1)", id="buffer-frame"),
    ],
)
async def test_before_the_hello_only_a_small_body_is_read(message, reason):
    """Under FrameLimits.before_hello a batch larger than 16 KiB, or with a buffer frame, is refused."""
    left, right = trio.testing.memory_stream_pair()
    reader = Connection(right, FrameLimits.before_hello(), inbound=m.HELLO)
    async with open_connection(left, FrameLimits()) as writer:
        writer.send(message)
        with trio.fail_after(5), pytest.raises(ProtocolError, match=re.escape(reason)):
            await reader.receive()


# ---------------------------------------------------------------- time --


async def test_silent_peer_is_closed_after_idle_timeout(autojump_clock):
    """A peer that sends nothing for idle_timeout loses its connection with CommClosedError saying so."""
    _left, right = trio.testing.memory_stream_pair()
    conn = Connection(right, SMALL_LIMITS, peer="quiet", idle_timeout=30)
    start = trio.current_time()
    with trio.fail_after(60), pytest.raises(CommClosedError, match=re.escape("quiet: no message for 30 s (idle_timeout)")):
        await conn.receive()
    assert trio.current_time() - start == pytest.approx(30)
    assert conn.closed


async def test_idle_deadline_restarts_with_each_batch(autojump_clock):
    """Batches 20 s apart keep a connection with idle_timeout=30 open."""
    left, right = trio.testing.memory_stream_pair()
    reader = Connection(right, SMALL_LIMITS, idle_timeout=30)
    async with open_connection(left, SMALL_LIMITS) as writer:
        with trio.fail_after(100):
            for i in range(3):
                await trio.sleep(20)  # virtual time: the peer's pace
                writer.send({"op": "n", "i": i})
                assert await reader.receive() == [{"op": "n", "i": i}]
    assert not reader.closed


async def _trickle(stream: trio.abc.SendStream, data: bytes, bytes_per_second: int) -> None:
    for start in range(0, len(data), bytes_per_second):
        await stream.send_all(data[start : start + bytes_per_second])
        await trio.sleep(1)  # virtual time: the peer's pace


@pytest.mark.parametrize(
    "trickled, reason",
    [
        pytest.param("header", "a batch header did not arrive within 10 s", id="header"),
        pytest.param("body", "(the peer sends slower than min_transfer_rate=100 B/s)", id="body"),
        # The body's time runs from the header's arrival, 8 s into the wait.
        pytest.param("late body", "(the peer sends slower than min_transfer_rate=100 B/s)", id="late-body"),
    ],
)
async def test_trickling_batch_raises_protocol_error(autojump_clock, trickled, reason):
    """A batch whose bytes come slower than min_transfer_rate (after idle_timeout's grace) is refused."""
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(right, SMALL_LIMITS, idle_timeout=10, min_transfer_rate=100)
    # Three frames: a header of 4 + 3 * 8 bytes, and 2 KB of body.
    header, *frames = batch_frames([encode_message({"op": "x", "pad": b"y" * 2000, "v": Serialized(b"h", [b"b"])})])
    rest = b"".join(frames)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        if trickled == "header":
            nursery.start_soon(_trickle, left, header + rest, 1)
            expected_s = 4 + 10  # the deadline runs from the frame count's arrival
        else:
            idle_s = 8 if trickled == "late body" else 0

            async def header_then_trickle():
                await trio.sleep(idle_s)  # the receive waits meanwhile
                await left.send_all(header)
                await _trickle(left, rest, 1)

            nursery.start_soon(header_then_trickle)
            expected_s = idle_s + 10 + len(rest) / 100
        with trio.fail_after(100), pytest.raises(ProtocolError, match=re.escape(reason)):
            await conn.receive()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - start == pytest.approx(expected_s, abs=1)


async def test_batch_at_the_required_rate_arrives(autojump_clock):
    """The same batch sent at twice min_transfer_rate arrives, though it takes longer than idle_timeout."""
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(right, SMALL_LIMITS, idle_timeout=10, min_transfer_rate=100)
    header, body = batch_frames([encode_message({"op": "x", "pad": b"y" * 3000})])
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_trickle, left, header + body, 200)
        with trio.fail_after(100):
            assert await conn.receive() == [{"op": "x", "pad": b"y" * 3000}]
    assert trio.current_time() - start > 10


async def _record_arrivals(conn: Connection, n: int, batches: list[tuple[float, list]]) -> None:
    """Append each batch arriving on `conn` with its arrival time, until `n` messages came."""
    while sum(len(batch) for _, batch in batches) < n:
        batch = await conn.receive()
        batches.append((trio.current_time(), [message["i"] for message in batch]))


async def test_write_interval_gathers_what_is_queued_soon_after_a_write(autojump_clock):
    """With write_interval, messages queued within it of the last write wait for
    it and share one write; the wait is never longer than the interval."""
    batches: list[tuple[float, list]] = []
    with trio.fail_after(1):
        async with connection_pair() as (a, b), trio.open_nursery() as nursery:
            nursery.start_soon(_record_arrivals, b, 4, batches)
            a.write_interval = 0.001
            start = trio.current_time()
            a.send({"op": "n", "i": 0})
            for i in (1, 2, 3):
                await trio.sleep(0.0002)  # virtual time: results finishing one by one
                a.send({"op": "n", "i": i})
    assert [batch for _, batch in batches] == [[0], [1, 2, 3]]
    assert batches[0][0] == start  # the first, on an idle link: at once
    assert batches[1][0] - batches[0][0] == pytest.approx(0.001)


async def test_write_interval_holds_nothing_back_on_an_idle_link(autojump_clock):
    """A message queued longer than write_interval after the last write goes at once."""
    async with connection_pair() as (a, b):
        a.write_interval = 0.001
        for i in range(3):
            a.send({"op": "n", "i": i})
            sent = trio.current_time()
            arrived: list[tuple[float, list]] = []
            with trio.fail_after(1):
                await _record_arrivals(b, 1, arrived)
            assert arrived == [(sent, [i])]
            await trio.sleep(0.002)  # virtual time: the next result comes later


async def test_drain_while_the_sender_waits_out_the_interval_writes_once(autojump_clock):
    """`drain` (a goodbye) takes over while the sender sleeps out write_interval:
    the sender, waking mid-drain, must not write too (two writers on one
    stream) but stop, as it does when retired between batches."""
    left, right = trio.testing.lockstep_stream_pair()  # a write ends when the peer reads
    reader = Connection(right, SMALL_LIMITS)
    writer = Connection(left, SMALL_LIMITS)
    writer.write_interval = 0.001
    received: list = []

    async def read_slowly() -> None:
        received.append(await reader.receive())
        await trio.sleep(0.002)  # virtual time: past the sender's wake-up
        received.append(await reader.receive())

    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_slowly)
            nursery.start_soon(writer.run_sender)
            writer.send({"op": "n", "i": 0})
            await writer.flush()
            writer.send({"op": "n", "i": 1})
            await trio.sleep(0.0001)  # the sender now sleeps until 1 ms after its write
            await writer.drain()  # (unshielded here: a failing sender must end the test, not hang it)
            assert not writer.closed, writer.close_reason
            await trio.sleep(0.01)
            assert not writer.closed, writer.close_reason
            nursery.cancel_scope.cancel()
    assert received == [[{"op": "n", "i": 0}], [{"op": "n", "i": 1}]]


async def test_without_write_interval_each_message_sent_after_a_write_goes_alone(autojump_clock):
    """The default (0): the sender writes as soon as anything is queued."""
    async with connection_pair() as (a, b):
        batches: list[tuple[float, list]] = []
        with trio.fail_after(1):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_record_arrivals, b, 3, batches)
                for i in range(3):
                    a.send({"op": "n", "i": i})
                    await trio.sleep(0.0002)
    assert [batch for _, batch in batches] == [[0], [1], [2]]


# ------------------------------------------------------- byte budget --


async def test_byte_budget_serves_waiters_first_come_first_served():
    """A small request that would fit waits behind an earlier larger one; grants go in arrival order."""
    budget = ByteBudget(10)
    await budget.acquire(10)
    granted: set[str] = set()

    async def want(n: int, name: str) -> None:
        await budget.acquire(n)
        granted.add(name)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for n, name in [(8, "first"), (1, "second"), (6, "third")]:
                nursery.start_soon(want, n, name)
                await trio.testing.wait_all_tasks_blocked()  # fix the arrival order
            budget.release(2)  # 8 in use: "second" would fit, but "first" came before it
            await trio.testing.wait_all_tasks_blocked()
            assert granted == set()
            budget.release(8)  # 0 in use: "first" and "second" fit, "third" not after them
            await trio.testing.wait_all_tasks_blocked()
            assert granted == {"first", "second"}
            assert budget.in_use == 9
            budget.release(9)
    assert granted == {"first", "second", "third"}
    assert budget.in_use == 6


async def test_byte_budget_waiter_cancelled_takes_nothing(autojump_clock):
    """A waiter cancelled before its turn leaves the budget as it was."""
    budget = ByteBudget(10)
    await budget.acquire(10)
    with trio.move_on_after(1) as scope:  # cancelled while waiting
        await budget.acquire(5)
    assert scope.cancelled_caught
    assert budget.in_use == 10
    budget.release(10)
    assert budget.in_use == 0
    with trio.fail_after(1):
        await budget.acquire(10)  # nothing was left reserved for the waiter


async def test_byte_budget_waiter_cancelled_as_it_is_granted_leaks_nothing():
    """A waiter granted and cancelled in the same step either keeps its share or gives it back."""
    budget = ByteBudget(10)
    await budget.acquire(10)
    held: list[int] = []

    async def want(scope: trio.CancelScope) -> None:
        with scope:
            await budget.acquire(5)
            held.append(5)
            await trio.sleep_forever()

    scope = trio.CancelScope()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(want, scope)
            await trio.testing.wait_all_tasks_blocked()
            budget.release(5)  # grants the waiter...
            scope.cancel()  # ...which is cancelled before it runs
    assert budget.in_use == 5 + sum(held)


async def test_byte_budget_refuses_more_than_its_capacity():
    """Asking for more than the whole budget raises ProtocolError at once instead of waiting forever."""
    budget = ByteBudget(100)
    with trio.fail_after(1), pytest.raises(ProtocolError, match=re.escape("exceeds the process's budget of 100 bytes (max_process_bytes)")):
        await budget.acquire(101)
    assert budget.in_use == 0


async def test_byte_budget_cancelled_head_lets_the_next_waiter_in(autojump_clock):
    """When the first waiter gives up, the next one is granted if it fits."""
    budget = ByteBudget(10)
    await budget.acquire(8)
    granted = trio.Event()

    async def small() -> None:
        await budget.acquire(1)
        granted.set()

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(1):
            nursery.start_soon(small)  # runs once we wait, so it queues behind us
            await budget.acquire(5)
        with trio.move_on_after(10):
            await granted.wait()
        nursery.cancel_scope.cancel()
    assert granted.is_set()


# -------------------------------------------------- errors in the caller --


async def test_unsendable_value_raises_type_error_in_send():
    """A value msgpack cannot carry fails in send(), and the connection stays usable."""
    async with connection_pair() as (a, b):
        with pytest.raises(TypeError, match="cannot send a object"):
            a.send({"op": "bad", "value": object()})
        a.send({"op": "good"})
        assert await b.receive() == [{"op": "good"}]
        assert not a.closed


@pytest.mark.parametrize(
    "message, reason",
    [
        pytest.param(
            {"op": "big", "data": b"x" * (SMALL_LIMITS.max_body_bytes + 1)},
            "a 'big' message of 4114 bytes is larger than the peer accepts (max_body_bytes=4096)",
            id="body",
        ),
        pytest.param(
            m.ReleaseKeys(keys=[f"key-{i}" for i in range(1000)]),
            "a 'release_keys' message of",
            id="typed-message-body",
        ),
    ],
)
async def test_oversized_message_raises_protocol_error_in_send(message, reason):
    """A message over max_body_bytes fails in send() and is not queued."""
    async with connection_pair() as (a, b):
        with pytest.raises(ProtocolError, match=re.escape(reason)):
            a.send(message)
        a.send({"op": "next"})
        assert await b.receive() == [{"op": "next"}]


def _payload_size_for_body(body_bytes: int) -> int:
    """The bytes payload size that makes {"op": "b", "d": ...} encode to `body_bytes`."""
    return next(
        n for n in range(body_bytes - 16, body_bytes)
        if len(encode_message({"op": "b", "d": b"x" * n}).body) == body_bytes
    )


@pytest.mark.parametrize("body_bytes", [SMALL_LIMITS.max_body_bytes - 1, SMALL_LIMITS.max_body_bytes])
async def test_send_accepts_only_what_the_peer_accepts_at_the_size_limit(body_bytes):
    """At the body limit a message is refused in send() or delivered, never rejected by the peer."""
    size = _payload_size_for_body(body_bytes)
    async with connection_pair() as (a, b):
        if body_bytes + 1 > SMALL_LIMITS.max_body_bytes:  # + the batch's array header
            with pytest.raises(ProtocolError, match="max_body_bytes"):
                a.send({"op": "b", "d": b"x" * size})
        else:
            a.send({"op": "b", "d": b"x" * size})
            with trio.fail_after(5):
                [message] = await b.receive()
            assert len(message["d"]) == size


BATCH_LIMITS = FrameLimits(max_frame_bytes=8192, max_body_bytes=8192, max_frames=8, max_batch_bytes=8192)


def _message_of_nbytes(nbytes: int) -> dict:
    """A message whose body and frames add up to exactly `nbytes`."""
    fixed = encode_message({"op": "v", "v": Serialized(b"h", [b""])}).nbytes
    return {"op": "v", "v": Serialized(b"h", [b"y" * (nbytes - fixed)])}


async def test_message_over_the_batch_budget_fails_in_send():
    """A message whose frames add up to more than max_batch_bytes fails in send(), naming the limit."""
    async with connection_pair(BATCH_LIMITS) as (a, b):
        with pytest.raises(ProtocolError, match=re.escape("(max_connection_bytes=8192)")):
            a.send(_message_of_nbytes(BATCH_LIMITS.max_batch_bytes + 1))
        a.send({"op": "next"})
        with trio.fail_after(5):
            assert await b.receive() == [{"op": "next"}]


async def test_send_accepts_only_what_the_peer_accepts_at_the_batch_limit():
    """At the batch limit a message is refused in send() or delivered, never rejected by the peer."""
    async with connection_pair(BATCH_LIMITS) as (a, b):
        try:
            a.send(_message_of_nbytes(BATCH_LIMITS.max_batch_bytes))
        except ProtocolError:
            return
        with trio.fail_after(5):
            [message] = await b.receive()
        assert message["op"] == "v"


async def test_a_value_whose_pieces_exceed_max_frames_fails_in_send():
    """A buffer that needs more pieces than the peer's max_frames fails in send(), not at the peer."""
    async with connection_pair() as (a, b):
        # body + pickle stream + 7 pieces of 4 KiB = 9 frames > 8
        with pytest.raises(ProtocolError, match="needs 9 frames, more than max_frames=8"):
            a.send({"op": "big", "value": Serialized(b"h", [b"x" * (7 * SMALL_LIMITS.max_frame_bytes)])})
        a.send({"op": "next"})
        with trio.fail_after(5):
            assert await b.receive() == [{"op": "next"}]


async def test_message_with_more_frames_than_the_peer_accepts_fails_in_send():
    """A message needing more frames than max_frames fails in send(), not at the peer."""
    async with connection_pair() as (a, b):
        # body + pickle stream + buffers = max_frames + 1
        too_many = Serialized(b"h", [b"b"] * (SMALL_LIMITS.max_frames - 1))
        with pytest.raises(ProtocolError, match="max_frames"):
            a.send({"op": "many", "value": too_many})
        just_fits = Serialized(b"h", [b"b"] * (SMALL_LIMITS.max_frames - 2))
        a.send({"op": "many", "value": just_fits})
        with trio.fail_after(5):
            [message] = await b.receive()
        assert message["value"] == just_fits


# ------------------------------------------------ closing with work queued --


async def test_everything_queued_when_the_block_ends_is_delivered():
    """Messages still queued (even behind a batch being written) go out before the close."""
    limits = SMALL_LIMITS
    big = b"x" * (limits.max_frame_bytes // 2)  # one message per batch
    left, right = trio.testing.memory_stream_pair()
    reader = Connection(right, limits)
    async with open_connection(left, limits) as conn:
        for i in range(5):
            conn.send({"op": "n", "i": i, "pad": big})
        await trio.lowlevel.checkpoint()  # the sender starts writing the first batch
    received: list[int] = []
    with trio.fail_after(5):
        try:
            while True:
                received.extend(m["i"] for m in await reader.receive())
        except CommClosedError:
            pass
    assert received == list(range(5))


async def test_goodbye_queued_after_the_sender_was_cancelled_is_still_written():
    """A final message queued while the block is being cancelled is drained to the peer."""
    left, right = trio.testing.memory_stream_pair()
    reader = Connection(right, SMALL_LIMITS)
    with trio.CancelScope() as scope:
        async with open_connection(left, SMALL_LIMITS) as conn:
            await trio.testing.wait_all_tasks_blocked()  # the sender is idle
            scope.cancel()
            conn.send({"op": "goodbye"})
            with trio.CancelScope(shield=True):
                # Let the sender die of its cancellation before the block ends.
                await trio.testing.wait_all_tasks_blocked()
    with trio.fail_after(5):
        assert await reader.receive() == [{"op": "goodbye"}]
