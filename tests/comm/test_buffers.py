"""`buffers`: big frames received in place with memory in steps, batches written by scatter I/O."""

from __future__ import annotations

import numpy as np
import pytest
import trio
import trio.testing

from trioflow.comm import buffers
from trioflow.comm.buffers import FIRST_STEP_BYTES, MAX_STEP_BYTES, FrameBuffer, raw_socket, receive_some, send_frames

GIB = 1 << 30


def test_a_huge_frame_buffer_makes_pages_real_only_a_step_ahead_of_its_bytes():
    """A FrameBuffer for 1 GiB holding 1,000 bytes has at most its first step of pages in use."""
    buffer = FrameBuffer(GIB, b"x" * 1000)
    assert buffer.got == 1000
    assert buffer._ready <= FIRST_STEP_BYTES


@pytest.mark.parametrize("arrived", [1, FIRST_STEP_BYTES, 3 * FIRST_STEP_BYTES + 5, 5 * MAX_STEP_BYTES + 1])
def test_pages_in_use_stay_within_a_bounded_step_of_the_bytes_that_arrived(arrived):
    """However the bytes arrive, pages in use never exceed the bytes + one step (at most doubling, at most MAX_STEP_BYTES)."""
    buffer = FrameBuffer(GIB)
    chunk = b"\x07" * (1 << 20)
    while buffer.got < arrived:
        buffer.write(chunk[: min(len(chunk), arrived - buffer.got)])
        step = min(max(buffer.got, FIRST_STEP_BYTES), MAX_STEP_BYTES)
        assert buffer.got <= buffer._ready <= buffer.got + step
    assert buffer.got == arrived


def test_a_frame_buffer_filled_in_odd_pieces_holds_the_bytes_in_order():
    """Bytes written in pieces of odd sizes (and from a non-byte view) come out whole, and the buffer is complete."""
    data = np.random.default_rng(1).integers(0, 256, 3 * FIRST_STEP_BYTES + 123, dtype=np.uint8)
    words = data[: len(data) // 8 * 8].view(np.float64)  # a view whose format is not bytes
    buffer = FrameBuffer(len(data), memoryview(words)[:1000])
    start = 1000 * 8
    for size in (1, 4095, 4097, FIRST_STEP_BYTES, 7 << 20):
        buffer.write(data[start : start + size].tobytes())
        start += size
    buffer.write(data[start:].tobytes())
    assert buffer.complete
    assert bytes(buffer.map) == data.tobytes()


FRAMES = [
    b"header",
    b"a small frame",
    np.arange(3 << 20, dtype=np.float64),  # 24 MiB: more than a socket buffer takes at once
    b"between",
    memoryview(bytes(range(256)) * 1024),
    b"",
    b"last",
]


def _expected() -> bytes:
    return b"".join(memoryview(f).cast("B").tobytes() if isinstance(f, np.ndarray) else bytes(f) for f in FRAMES)


async def _read_all(stream: trio.abc.Stream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await receive_some(stream, 1 << 20)
        assert chunk, "the stream ended early"
        got += chunk
    return bytes(got)


async def test_frames_written_by_scatter_io_over_tcp_arrive_in_order():
    """send_frames over a real TCP stream (one sendmsg, resumed after partial sends) delivers every byte in order."""
    expected = _expected()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        client = await trio.testing.open_stream_to_socket_listener(listeners[0])
        server = await listeners[0].accept()
        assert raw_socket(client) is not None
        nursery.start_soon(send_frames, client, FRAMES, 64 * 1024)
        with trio.fail_after(30):
            assert await _read_all(server, len(expected)) == expected
        await client.aclose()
        await server.aclose()
        await listeners[0].aclose()


async def test_frames_written_to_a_stream_without_a_socket_arrive_in_order():
    """send_frames over an in-memory stream (no socket: send_all per piece) delivers the same bytes."""
    expected = _expected()
    left, right = trio.testing.memory_stream_pair()
    assert raw_socket(left) is None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_frames, left, FRAMES, 64 * 1024)
        with trio.fail_after(30):
            assert await _read_all(right, len(expected)) == expected


@pytest.fixture
async def tcp_pair():
    """Two ends of a loopback TCP connection, closed at the end."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    client = await trio.testing.open_stream_to_socket_listener(listeners[0])
    server = await listeners[0].accept()
    try:
        yield client, server
    finally:
        await client.aclose()
        await server.aclose()
        await listeners[0].aclose()


@pytest.fixture(params=[True, False], ids=["direct-io", "trio-streams"])
def direct_io(request, monkeypatch):
    monkeypatch.setattr(buffers, "DIRECT_IO", request.param)
    return request.param


async def test_a_batch_of_small_frames_bigger_than_the_socket_buffer_arrives_whole(tcp_pair, direct_io):
    """Small frames joined into one write of 24 MiB (many partial writes, waits for room) arrive in order."""
    client, server = tcp_pair
    frames = [bytes([i % 251]) * 12_000 for i in range(2_000)]
    expected = b"".join(frames)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_frames, client, frames, 64 * 1024)
        with trio.fail_after(30):
            assert await _read_all(server, len(expected)) == expected


async def test_receive_some_returns_empty_bytes_once_the_peer_closed(tcp_pair, direct_io):
    client, server = tcp_pair
    await send_frames(client, [b"last words"], 64 * 1024)
    await client.aclose()
    with trio.fail_after(10):
        assert await _read_all(server, 10) == b"last words"
        assert await receive_some(server, 100) == b""


async def test_receive_some_on_a_stream_closed_here_says_closed(tcp_pair, direct_io):
    """Closed before the call, or while waiting in it: trio.ClosedResourceError, never a read of a stale descriptor."""
    client, server = tcp_pair
    async with trio.open_nursery() as nursery:

        async def close_soon():
            await trio.testing.wait_all_tasks_blocked()
            await server.aclose()

        nursery.start_soon(close_soon)
        with trio.fail_after(10), pytest.raises(trio.ClosedResourceError):
            await receive_some(server, 100)
    with pytest.raises(trio.ClosedResourceError):
        await receive_some(server, 100)


async def test_writing_to_a_peer_that_closed_fails_instead_of_hanging(tcp_pair, direct_io):
    client, server = tcp_pair
    await server.aclose()
    with trio.fail_after(10), pytest.raises((OSError, trio.BrokenResourceError)):
        for _ in range(1_000):  # the first writes may still be taken by the kernel
            await send_frames(client, [b"x" * 60_000], 64 * 1024)


async def test_receive_some_is_a_checkpoint_even_when_bytes_are_waiting(tcp_pair, direct_io):
    """A peer that keeps the socket full cannot keep its reader from letting other tasks run."""
    client, server = tcp_pair
    await send_frames(client, [b"y" * 1000], 64 * 1024)
    with trio.fail_after(10):  # until the bytes are in this end's kernel buffer
        await trio.lowlevel.wait_readable(server.socket)
    with trio.testing.assert_checkpoints():
        assert await receive_some(server, 1000) == b"y" * 1000


async def test_a_receive_that_waits_first_still_gets_bytes_already_there_and_later_ones(tcp_pair, direct_io):
    """try_first=False (`Connection` after a short read) changes when the
    kernel is asked, never what comes back."""
    client, server = tcp_pair
    await send_frames(client, [b"there"], 64 * 1024)
    with trio.fail_after(10):
        await trio.lowlevel.wait_readable(server.socket)
        with trio.testing.assert_checkpoints():
            assert await receive_some(server, 100, try_first=False) == b"there"
    async with trio.open_nursery() as nursery:

        async def send_once_blocked():
            await trio.testing.wait_all_tasks_blocked()
            await send_frames(client, [b"later"], 64 * 1024)

        nursery.start_soon(send_once_blocked)
        with trio.fail_after(10):
            assert await receive_some(server, 100, try_first=False) == b"later"


async def test_a_cancelled_receive_takes_no_bytes(tcp_pair, direct_io):
    client, server = tcp_pair
    with trio.move_on_after(0.05) as scope:
        await receive_some(server, 100)
    assert scope.cancelled_caught
    await send_frames(client, [b"after"], 64 * 1024)
    with trio.fail_after(10):
        assert await _read_all(server, 5) == b"after"
