"""`Connection`: ordered, batched messages over a stream, with limits and clean failures."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import trio
import trio.testing

from tests.comm.helpers import BIG_LIMITS, SMALL_LIMITS, connection_pair
from trioflow.comm import Connection, Serialized, TCPNetwork, dumps, loads, open_connection
from trioflow.comm.frames import batch_frames, encode_message
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


async def test_large_bytes_round_trip_in_memory():
    """A 16 MB bytes value (inside the msgpack body, not a buffer) arrives intact."""
    payload = bytes(range(256)) * (16 * 1024 * 1024 // 256)
    async with connection_pair(limits=BIG_LIMITS) as (a, b):
        a.send({"op": "blob", "data": payload})
        [message] = await b.receive()
    assert message["data"] == payload


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


async def test_peer_announcing_a_huge_frame_is_rejected_before_allocating():
    """A header claiming a 2**40-byte frame raises ProtocolError at once."""
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(right, SMALL_LIMITS)
    await left.send_all(struct.pack("<IQ", 1, 2**40))
    with trio.fail_after(1), pytest.raises(ProtocolError, match="exceeds max_frame_bytes"):
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
    "message",
    [
        pytest.param({"op": "big", "data": b"x" * (SMALL_LIMITS.max_frame_bytes + 1)}, id="body"),
        pytest.param(
            {"op": "big", "value": Serialized(b"h", [b"x" * (SMALL_LIMITS.max_frame_bytes + 1)])},
            id="buffer",
        ),
        pytest.param(
            {"op": "big", "value": Serialized(b"x" * (SMALL_LIMITS.max_frame_bytes + 1))},
            id="pickle-stream",
        ),
    ],
)
async def test_oversized_message_raises_protocol_error_in_send(message):
    """A message with a frame over max_frame_bytes fails in send() and is not queued."""
    async with connection_pair() as (a, b):
        with pytest.raises(ProtocolError, match="max_frame_bytes"):
            a.send(message)
        a.send({"op": "next"})
        assert await b.receive() == [{"op": "next"}]


def _payload_size_for_body(body_bytes: int) -> int:
    """The bytes payload size that makes {"op": "b", "d": ...} encode to `body_bytes`."""
    return next(
        n for n in range(body_bytes - 16, body_bytes)
        if len(encode_message({"op": "b", "d": b"x" * n}).body) == body_bytes
    )


@pytest.mark.parametrize("body_bytes", [SMALL_LIMITS.max_frame_bytes - 1, SMALL_LIMITS.max_frame_bytes])
async def test_send_accepts_only_what_the_peer_accepts_at_the_size_limit(body_bytes):
    """At the size limit a message is refused in send() or delivered, never rejected by the peer."""
    size = _payload_size_for_body(body_bytes)
    async with connection_pair() as (a, b):
        if body_bytes + 1 > SMALL_LIMITS.max_frame_bytes:  # + the batch's array header
            with pytest.raises(ProtocolError, match="max_frame_bytes"):
                a.send({"op": "b", "d": b"x" * size})
        else:
            a.send({"op": "b", "d": b"x" * size})
            with trio.fail_after(5):
                [message] = await b.receive()
            assert len(message["d"]) == size


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
