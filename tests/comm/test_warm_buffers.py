"""`WarmBuffers`: a worker process receives big values into the memory of dropped ones.

The one property that matters above speed: a buffer a value still uses is
never handed to another frame (the value would be overwritten).
"""

import threading
import weakref

import numpy as np
import pytest

from trioflow.comm.buffers import FrameBuffer, WarmBuffers

MIB = 1 << 20


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def pool(clock):
    warm = WarmBuffers()
    warm.configure(64 * MIB, 30.0, clock)
    yield warm
    warm.configure(0, 0.0, clock)


def receive(pool, data: bytes):
    """A frame of `data` received as a connection does: a buffer filled, then its frame."""
    buffer = FrameBuffer(len(data), warm=pool)
    buffer.write(data)
    assert buffer.complete
    return buffer.frame()


def test_a_dropped_values_buffer_receives_the_next_frame_warm(pool):
    first = receive(pool, b"a" * (2 * MIB))
    first_id = id(first)
    del first
    buffer = FrameBuffer(2 * MIB, warm=pool)
    assert id(buffer.map) == first_id  # the same memory, recycled
    assert buffer._ready >= 2 * MIB  # its pages are real: nothing to fault
    assert pool.reused == 1


def test_a_buffer_a_value_still_uses_is_never_reused(pool):
    first = np.frombuffer(receive(pool, b"\x01" * (2 * MIB)), dtype=np.uint8)
    second = np.frombuffer(receive(pool, b"\x02" * (2 * MIB)), dtype=np.uint8)
    assert (first == 1).all() and (second == 2).all()
    assert pool.reused == 0
    del second  # its buffer is free now; the first's is not
    third = np.frombuffer(receive(pool, b"\x03" * (2 * MIB)), dtype=np.uint8)
    assert pool.reused == 1
    assert (first == 1).all() and (third == 3).all()


def test_a_slice_of_a_value_keeps_its_buffer_in_use(pool):
    """Any view keeps the buffer busy, however derived (memoryview slices
    refer to the buffer itself, not to the view they were cut from)."""
    with memoryview(receive(pool, b"\x05" * (2 * MIB))) as whole:
        tail = whole[MIB:]
    kept = bytes(tail[:8])
    receive(pool, b"\x06" * (2 * MIB))
    assert bytes(tail[:8]) == kept
    assert pool.reused == 0


def test_a_smaller_frame_gets_the_first_bytes_of_a_slightly_larger_buffer(pool):
    del_me = receive(pool, b"x" * (4 * MIB))
    del del_me
    frame = receive(pool, b"y" * (3 * MIB + MIB // 2))
    assert pool.reused == 1
    assert len(frame) == 3 * MIB + MIB // 2 and bytes(frame[-3:]) == b"yyy"


def test_a_small_frame_does_not_take_a_much_larger_buffer(pool):
    big = receive(pool, b"x" * (8 * MIB))
    del big
    receive(pool, b"y" * (2 * MIB))
    assert pool.reused == 0


def test_what_is_kept_is_bounded(clock):
    warm = WarmBuffers()
    warm.configure(3 * MIB, 30.0, clock)
    try:
        frames = [receive(warm, b"z" * (2 * MIB)) for _ in range(3)]
        assert warm.kept_bytes == 2 * MIB  # the first fits, the others do not
        del frames
        assert warm.free_bytes() == 2 * MIB
    finally:
        warm.configure(0, 0.0, clock)
    assert warm.kept_bytes == 0


def test_buffers_idle_too_long_are_given_back(pool, clock):
    frame = receive(pool, b"q" * (2 * MIB))
    buffer = weakref.ref(frame)  # the mmap itself (the frame fills it exactly)
    del frame
    clock.now = 10.0
    assert pool.trim() == 0  # not idle long enough
    clock.now = 31.0
    assert pool.trim() == 2 * MIB
    assert pool.kept_bytes == 0 and buffer() is None


def test_release_gives_back_free_buffers_only(pool):
    held = receive(pool, b"h" * (2 * MIB))
    dropped = receive(pool, b"d" * (2 * MIB))
    del dropped
    assert pool.release() == 2 * MIB
    assert pool.kept_bytes == 2 * MIB and bytes(held[:1]) == b"h"


def test_other_threads_do_not_use_the_pool(pool):
    """A task's own client receives on a thread of its own: its frames stay out."""
    frame = receive(pool, b"t" * (2 * MIB))
    del frame
    seen = []
    thread = threading.Thread(target=lambda: seen.append((pool.take(2 * MIB), receive(pool, b"u" * (2 * MIB)))))
    thread.start()
    thread.join(timeout=30)
    assert seen and seen[0][0] is None
    assert pool.reused == 0 and pool.kept_bytes == 2 * MIB


def test_the_pool_is_off_until_configured():
    warm = WarmBuffers()
    frame = receive(warm, b"o" * (2 * MIB))
    assert warm.kept_bytes == 0 and len(frame) == 2 * MIB
