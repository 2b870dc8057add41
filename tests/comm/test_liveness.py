"""Busy is not dead: the loop-lag monitor, and deadlines counted in our loop's responsive time.

These tests stall the test's own Trio loop on purpose, with a blocking
`time.sleep` (the stall being measured, not a way to wait for something);
they run on the real clock, since a virtual clock never lags.
"""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from tests.comm.helpers import SMALL_LIMITS
from trioflow.comm import Connection, FrameLimits, PeerSilent, Serialized, loop_lag, open_connection
from trioflow.comm.frames import batch_frames, encode_message
from trioflow.comm.liveness import LoopLag

STALL_S = 0.3


async def test_a_stall_of_the_loop_is_counted_before_and_after_the_ticker_sees_it():
    """A blocking call in the loop is a stall: counted at once (overdue ticker), then from the ticker's record."""
    lag = loop_lag()
    await trio.testing.wait_all_tasks_blocked()  # the ticker is asleep, due soon
    since = trio.current_time()
    time.sleep(STALL_S)
    assert lag.stalled_between(since) >= STALL_S - lag.tick  # before any task ran again
    await trio.testing.wait_all_tasks_blocked()  # the ticker woke late, noted it, sleeps again
    assert lag.max_stall >= STALL_S - lag.tick
    assert lag.stalled_between(since) >= STALL_S - lag.tick
    assert lag.deadline(since, 1.0) >= since + 1.0 + STALL_S - lag.tick


async def test_stalls_before_the_window_do_not_count():
    """Only the stalls after `since` move a deadline that starts at `since`."""
    lag = loop_lag()
    await trio.testing.wait_all_tasks_blocked()
    time.sleep(STALL_S)
    await trio.testing.wait_all_tasks_blocked()
    since = trio.current_time()
    assert lag.stalled_between(since) < STALL_S - lag.tick


def test_one_monitor_per_run_and_none_ticks_on_a_virtual_clock():
    """Each Trio run has its own monitor; under a MockClock it never ticks and sees no stall."""

    async def monitor() -> LoopLag:
        assert loop_lag() is loop_lag()
        return loop_lag()

    assert trio.run(monitor) is not trio.run(monitor)

    async def virtual() -> float:
        lag = loop_lag()
        since = trio.current_time()
        await trio.sleep(10)  # virtual seconds
        time.sleep(0.05)
        return lag.stalled_between(since), lag.enabled

    assert trio.run(virtual, clock=trio.testing.MockClock(autojump_threshold=0)) == (0.0, False)


async def test_a_stall_of_our_own_loop_does_not_count_against_a_silent_peer():
    """A receive whose idle deadline passes while our own loop is stalled waits again, and gets the batch."""
    left, right = trio.testing.memory_stream_pair()
    got: list[list[dict]] = []
    async with open_connection(left, SMALL_LIMITS, peer="sender") as sender, open_connection(
        right, SMALL_LIMITS, peer="receiver", idle_timeout=1.0
    ) as receiver:
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                got.append(await receiver.receive())

            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()  # the receiver waits for a batch
            time.sleep(2.0)  # our loop stalls for twice the idle timeout
            # The receiver wakes past its deadline; counted in responsive time
            # the sender has been silent for almost nothing, so it waits again.
            await trio.testing.wait_all_tasks_blocked()
            sender.send({"op": "late"})
    assert got == [[{"op": "late"}]]


async def test_a_peer_silent_in_responsive_time_is_still_dropped():
    """A peer that sends nothing while our loop runs freely is dropped after idle_timeout, naming the knob."""
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(right, SMALL_LIMITS, idle_timeout=0.3)
    conn.idle_name = "worker_ttl"
    with trio.fail_after(10), pytest.raises(PeerSilent, match=r"no message for 0\.3 s \(worker_ttl\)") as caught:
        await conn.receive()
    assert caught.value.reason == "no message for 0.3 s (worker_ttl)"
    assert conn.closed
    await left.aclose()


async def test_a_stall_in_the_middle_of_a_big_frame_resumes_where_it_was():
    """A big frame half read when a stall of our loop expires its deadline carries on; nothing read is lost."""
    payload = bytes(range(256)) * 4096  # 1 MiB: read chunk by chunk into one growing buffer
    limits = FrameLimits(max_frame_bytes=2 << 20, max_batch_bytes=4 << 20)
    wire = b"".join(bytes(f) for f in batch_frames([encode_message({"op": "v", "value": Serialized(b"h", [payload])})]))
    left, right = trio.testing.memory_stream_pair()
    receiver = Connection(right, limits, idle_timeout=0.5, min_transfer_rate=1e9)
    got: list[list[dict]] = []

    async def receive() -> None:
        got.append(await receiver.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await left.send_all(wire[: len(wire) // 2])  # the header and half the frame
        await trio.testing.wait_all_tasks_blocked()  # the receiver has read it, waits for the rest
        time.sleep(1.5)  # our loop stalls past the batch's deadline (0.5 s grace)
        await trio.testing.wait_all_tasks_blocked()
        await left.send_all(wire[len(wire) // 2 :])
    [[message]] = got
    assert bytes(message["value"].buffers[0]) == payload
    await receiver.aclose()
    await left.aclose()


async def test_a_watcher_hears_every_tick_and_is_held_weakly():
    """The recorder's lag histogram hears each wake-up of the one ticker
    (`LoopLag.watch`), stall or not; a watcher nobody else holds is dropped."""
    lag = LoopLag(tick=0.01)
    heard: list[float] = []

    class Recorder:
        def note(self, late: float) -> None:
            heard.append(late)

    kept, dropped = Recorder(), Recorder()
    lag.watch(kept.note)
    lag.watch(dropped.note)
    del dropped
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lag.run)
        with trio.fail_after(5):
            while len(heard) < 3:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert all(late >= 0 for late in heard)
    assert len(lag._watchers) == 1  # the dropped one's reference is gone
