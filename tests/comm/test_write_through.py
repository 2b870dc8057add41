"""`writing_through()`: what a block queues is written as the block ends,
or left to the connection's sender, never lost and never out of order."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from tests.comm.helpers import BIG_LIMITS, SMALL_LIMITS, connection_pair, tcp_connection_pair
from trioflow.comm import Connection, TCPNetwork
from trioflow.comm import connection as connection_module
from trioflow.comm import messages as m
from trioflow.comm.connection import writing_through

needs_cork = pytest.mark.skipif(not hasattr(socket, "TCP_CORK"), reason="TCP_CORK is Linux's")


def corked(conn: Connection) -> bool:
    return bool(conn.stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK))


async def receive_numbers(conn: Connection, count: int) -> list[int]:
    got: list[int] = []
    with trio.fail_after(10):
        while len(got) < count:
            got.extend(message["i"] for message in await conn.receive())
    return got


BLOB = b"x" * 40_000  # a message well under LARGE_FRAME_BYTES


def fill_until_partial(sender: Connection, receiver: Connection) -> int:
    """Write blocks of one message while the peer does not read, until the
    kernel takes one only in part; return how many messages were sent.

    Small kernel buffers (which also stop their growing) make that come
    after a few blocks; the count is bounded all the same.
    """
    sender.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    receiver.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for i in range(2000):
        with writing_through():
            sender.send({"op": "n", "i": i, "blob": BLOB})
        if sender._unsent is not None:
            return i + 1
    raise AssertionError("the kernel took 2,000 writes of 40 KB without a reader")


async def test_messages_queued_in_a_block_are_written_as_it_ends_in_one_batch():
    """Inside the block nothing is written and the sender is not woken;
    as it ends the three messages go out together, before any await."""
    async with tcp_connection_pair() as (sender, receiver):
        with writing_through():
            for i in range(3):
                sender.send({"op": "n", "i": i})
            assert sender._written == 0
            assert not sender._outbox_nonempty.is_set()
        assert sender._written == 3
        with trio.fail_after(10):
            assert [message["i"] for message in await receiver.receive()] == [0, 1, 2]


async def test_blocks_nest_and_the_outermost_writes():
    async with tcp_connection_pair() as (sender, receiver):
        with writing_through():
            sender.send({"op": "n", "i": 0})
            with writing_through():
                sender.send({"op": "n", "i": 1})
            assert sender._written == 0
        assert sender._written == 2
        assert await receive_numbers(receiver, 2) == [0, 1]


async def test_a_message_queued_after_the_block_ended_still_goes_out():
    """A task started inside a block sends later, after the block ended: its
    message wakes the sender as usual (it must not join the ended block)."""
    async with tcp_connection_pair() as (sender, receiver):
        async with trio.open_nursery() as nursery:

            async def send_later():
                await trio.lowlevel.checkpoint()
                sender.send({"op": "n", "i": 1})

            with writing_through():
                sender.send({"op": "n", "i": 0})
                nursery.start_soon(send_later)
        assert await receive_numbers(receiver, 2) == [0, 1]


async def test_a_stream_without_a_socket_is_left_to_its_sender():
    """The simulator's in-memory streams are written only by their sender."""
    async with connection_pair() as (sender, receiver):
        with writing_through():
            sender.send({"op": "n", "i": 0})
        assert sender._written == 0 and sender._outbox_nonempty.is_set()
        assert await receive_numbers(receiver, 1) == [0]


async def test_the_switch_off_leaves_every_write_to_the_sender(monkeypatch):
    monkeypatch.setattr(connection_module, "WRITE_THROUGH", False)
    async with tcp_connection_pair() as (sender, receiver):
        with writing_through():
            sender.send({"op": "n", "i": 0})
        assert sender._written == 0
        assert await receive_numbers(receiver, 1) == [0]


async def test_a_write_interval_not_yet_over_leaves_the_write_to_the_sender():
    async with tcp_connection_pair() as (sender, receiver):
        sender.write_interval = 0.2
        with writing_through():
            sender.send({"op": "n", "i": 0})
        assert sender._written == 1  # nothing written for longer than the interval
        with writing_through():
            sender.send({"op": "n", "i": 1})
        assert sender._written == 1  # the sender writes it once the interval is over
        assert await receive_numbers(receiver, 2) == [0, 1]


async def test_what_the_kernel_does_not_take_the_sender_writes_first_in_order():
    """A full socket takes part of a block's batch: the rest, then what was
    queued after it (in a block or not), arrive whole and in order."""
    async with tcp_connection_pair(limits=BIG_LIMITS) as (sender, receiver):
        sent = fill_until_partial(sender, receiver)
        assert sender._written == sent - 1
        with writing_through():  # the tail is the sender's: this waits behind it
            sender.send({"op": "n", "i": sent, "blob": BLOB})
        assert sender._written == sent - 1
        sender.send({"op": "n", "i": sent + 1, "blob": BLOB})
        got = []
        with trio.fail_after(10):
            while len(got) < sent + 2:
                batch = await receiver.receive()
                assert all(message["blob"] == BLOB for message in batch)
                got.extend(message["i"] for message in batch)
        assert got == list(range(sent + 2))
        with trio.fail_after(10):
            await sender.flush()
        assert sender._unsent is None and sender._written == sent + 2


async def test_a_sender_in_the_middle_of_a_write_keeps_the_stream_to_itself():
    async with tcp_connection_pair(limits=BIG_LIMITS) as (sender, receiver):
        blob = b"y" * 16_000_000  # more than the kernel's buffers hold
        sender.send({"op": "n", "i": 0, "blob": blob})
        with trio.fail_after(10):
            while not sender._writing:  # the sender waits for room mid-batch
                await trio.testing.wait_all_tasks_blocked()
        with writing_through():
            sender.send({"op": "n", "i": 1, "blob": b""})
        assert sender._unsent is None and sender._written == 0
        assert await receive_numbers(receiver, 2) == [0, 1]


async def test_drain_writes_the_unsent_rest_when_no_sender_runs():
    """A connection closing (`drain`, no sender task) still writes the tail
    of a batch the kernel took only in part, before what is queued after."""
    async with trio.open_nursery() as nursery:
        network = TCPNetwork()
        accepted: list[trio.SocketStream] = []
        ready = trio.Event()

        async def handler(stream):
            accepted.append(stream)
            ready.set()
            await trio.sleep_forever()

        address = await nursery.start(network.serve, handler, "127.0.0.1", 0)
        stream = await network.connect(address)
        with trio.fail_after(10):
            await ready.wait()
        sender = Connection(stream, BIG_LIMITS)  # no sender task
        receiver = Connection(accepted[0], BIG_LIMITS)
        sent = fill_until_partial(sender, receiver)
        sender.send({"op": "n", "i": sent, "blob": BLOB})
        nursery.start_soon(sender.drain)
        assert await receive_numbers(receiver, sent + 1) == list(range(sent + 1))
        assert sender._unsent is None and not sender.closed
        nursery.cancel_scope.cancel()


async def test_a_failed_write_closes_the_connection_and_raises_nothing():
    """The peer has gone: a write at the end of a block fails, and the
    connection says why instead of raising into the code that ended it."""
    async with tcp_connection_pair() as (sender, receiver):
        await receiver.aclose()
        with trio.fail_after(10):
            # The first write after the close may still be taken (the peer's
            # kernel answers it with a reset); a later one fails.
            for i in range(1000):
                with writing_through():
                    sender.send({"op": "n", "i": i})
                if sender.closed:
                    break
                await trio.sleep(0.005)
        assert sender.closed
        assert sender.close_reason.startswith("write failed")


@needs_cork
async def test_a_held_message_written_through_waits_corked_for_the_next():
    async with tcp_connection_pair(inbound=m.WORKER_TO_SCHEDULER) as (worker, scheduler):
        with writing_through():
            worker.send(m.TaskStarted(key="a"))
        assert worker._written == 1 and corked(worker)
        with writing_through():
            worker.send(m.Heartbeat())
        assert worker._written == 2 and not corked(worker)
        got: list[m.Message] = []
        with trio.fail_after(10):
            while len(got) < 2:
                got.extend(await scheduler.receive())
        assert [type(message) for message in got] == [m.TaskStarted, m.Heartbeat]


async def test_large_frames_are_left_to_the_sender_uncopied():
    """A buffer of LARGE_FRAME_BYTES or more is written from its own memory
    by the sender (`send_frames`), not joined into a copy at the block's end."""
    from trioflow.comm import Serialized, dumps

    value = dumps(b"v" * (connection_module.LARGE_FRAME_BYTES * 2))
    assert isinstance(value, Serialized)
    async with tcp_connection_pair(limits=BIG_LIMITS) as (sender, receiver):
        with writing_through():
            sender.send({"op": "value", "value": value})
        # Not a byte of it written yet (a write tried would have left a tail).
        assert sender._unsent is None and sender._written == 0
        assert sender._outbox_nonempty.is_set()
        with trio.fail_after(10):
            [message] = await receiver.receive()
        assert message["value"].nbytes == value.nbytes


async def test_more_messages_than_one_batch_holds_go_in_several():
    """A block's batch is cut to the peer's limits like the sender's."""
    async with tcp_connection_pair() as (sender, receiver):
        with writing_through():
            for i in range(200):
                sender.send({"op": "n", "i": i})
        assert sender._written == SMALL_LIMITS.max_items  # one batch now, the sender the rest
        got: list[int] = []
        with trio.fail_after(10):
            while len(got) < 200:
                got.extend(message["i"] for message in await receiver.receive())
        assert got == list(range(200))


async def test_direct_socket_calls_switched_off_leave_the_write_to_the_sender(monkeypatch):
    """`buffers.DIRECT_IO` off (benchmarks/toggle_ab.py direct-io): the
    sender writes through Trio's stream, and a block leaves it to it."""
    from trioflow.comm import buffers

    async with tcp_connection_pair() as (sender, receiver):
        monkeypatch.setattr(buffers, "DIRECT_IO", False)
        with writing_through():
            sender.send({"op": "n", "i": 0})
        assert sender._written == 0 and sender._outbox_nonempty.is_set()
        assert await receive_numbers(receiver, 1) == [0]


async def test_a_block_whose_write_raises_still_hands_the_others_to_their_senders(monkeypatch):
    """A bug in one connection's write at the end of a block raises, but
    the other connections of the block are not left waiting for nothing."""
    async with tcp_connection_pair() as (first, first_peer), tcp_connection_pair() as (second, second_peer):

        def broken() -> None:
            raise RuntimeError("planted")

        monkeypatch.setattr(first, "_write_through", broken)
        with pytest.raises(RuntimeError, match="planted"):
            with writing_through():
                first.send({"op": "n", "i": 0})
                second.send({"op": "n", "i": 1})
        assert not second._through_pending
        assert await receive_numbers(second_peer, 1) == [1]
        # The next block writes the second connection through again.
        with writing_through():
            second.send({"op": "n", "i": 2})
        assert second._written == 2
        assert await receive_numbers(second_peer, 1) == [2]
