"""The simulated network: delivery, closing, resets, black holes, partitions, crashes.

Every test runs on Trio's virtual clock (`autojump_clock`, or `MockClock` in
a `trio.run` of its own), so waiting "ten seconds" costs nothing and no
real socket or wall clock is involved.
"""

from __future__ import annotations

import errno
import math
import random

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trioflow.comm import FrameLimits, connect_with_timeout, open_connection
from trioflow.errors import CommClosedError
from trioflow.sim import SimNetwork, SimStream
from trioflow.sim.network import FIRST_PORT

LATENCY = (0.01, 0.05)


def make_network(seed: int = 0, latency=LATENCY, trace: list | None = None) -> SimNetwork:
    on_event = None if trace is None else (lambda t, kind, detail: trace.append((t, kind, detail)))
    return SimNetwork(random.Random(seed), latency, on_event=on_event)


async def serve_collecting(nursery: trio.Nursery, net: SimNetwork, node: str, port: int = 0):
    """Serve at `node`; return the address and a channel of accepted streams."""
    accepted_send, accepted = trio.open_memory_channel[SimStream](math.inf)

    async def handler(stream: trio.abc.Stream) -> None:
        accepted_send.send_nowait(stream)

    address = await nursery.start(net.for_node(node).serve, handler, node, port)
    return address, accepted


async def open_pair(nursery: trio.Nursery, net: SimNetwork, client: str = "client", server: str = "server"):
    """A connected (client end, server end) pair between two nodes."""
    address, accepted = await serve_collecting(nursery, net, server)
    client_end = await net.for_node(client).connect(address)
    return client_end, await accepted.receive()


async def nothing_arrives(stream: trio.abc.Stream, seconds: float = 10.0) -> bool:
    """True if `stream` yields no bytes (nor EOF nor error) for `seconds`."""
    with trio.move_on_after(seconds) as scope:
        await stream.receive_some()
    return scope.cancelled_caught


# ------------------------------------------------------------ delivery --


async def test_chunks_arrive_after_a_latency_within_bounds(autojump_clock):
    """Each chunk arrives alone, between min and max latency after it was sent."""
    net = make_network(seed=1)
    async with trio.open_nursery() as nursery:
        a, b = await open_pair(nursery, net)
        for i in range(20):
            sent_at = trio.current_time()
            await a.send_all(b"chunk %d" % i)
            assert await b.receive_some() == b"chunk %d" % i
            assert LATENCY[0] <= trio.current_time() - sent_at <= LATENCY[1]
        nursery.cancel_scope.cancel()


async def test_a_later_chunk_never_overtakes_an_earlier_one(autojump_clock):
    """A burst arrives in send order even when later chunks draw shorter latencies."""
    net = make_network(seed=2, latency=(0.0, 1.0))
    async with trio.open_nursery() as nursery:
        a, b = await open_pair(nursery, net)
        chunks = [b"<%03d>" % i for i in range(200)]
        for chunk in chunks:
            await a.send_all(chunk)
        received = b""
        while len(received) < sum(map(len, chunks)):
            received += await b.receive_some()
        assert received == b"".join(chunks)
        nursery.cancel_scope.cancel()


async def test_receive_some_returns_at_most_max_bytes(autojump_clock):
    """receive_some(n) hands out at most n bytes and keeps the rest in order."""
    net = make_network()
    async with trio.open_nursery() as nursery:
        a, b = await open_pair(nursery, net)
        await a.send_all(b"abcdefgh")
        await a.send_all(b"ij")
        assert await b.receive_some(3) == b"abc"
        await trio.sleep(1)  # both chunks have arrived: they coalesce
        assert await b.receive_some(6) == b"defghi"
        assert await b.receive_some() == b"j"
        with pytest.raises(ValueError):
            await b.receive_some(0)
        nursery.cancel_scope.cancel()


async def test_each_connection_runs_the_handler_in_its_own_task(autojump_clock):
    """serve() runs handler(stream) once per accepted connection, concurrently."""
    net = make_network()

    async def echo(stream: trio.abc.Stream) -> None:
        while data := await stream.receive_some():
            await stream.send_all(data.upper())

    async with trio.open_nursery() as nursery:
        address = await nursery.start(net.for_node("echo").serve, echo, "echo", 0)
        streams = [await net.for_node(f"client-{i}").connect(address) for i in range(3)]
        for i, stream in enumerate(streams):
            await stream.send_all(b"hi %d" % i)
        for i, stream in enumerate(streams):
            assert await stream.receive_some() == b"HI %d" % i
        nursery.cancel_scope.cancel()


async def test_a_trioflow_connection_exchanges_messages(autojump_clock):
    """A real comm.Connection sends small and multi-chunk messages over a SimStream."""
    net = make_network(seed=3)
    big = bytes(range(256)) * 2048  # 512 KiB: a large frame, read in several chunks
    async with trio.open_nursery() as nursery:
        a, b = await open_pair(nursery, net, "worker-1", "scheduler")
        async with open_connection(a, FrameLimits(), peer="scheduler") as left:
            async with open_connection(b, FrameLimits(), peer="worker-1") as right:
                left.send({"op": "hello", "n": 1})
                left.send({"op": "data", "payload": big})
                received = []
                while len(received) < 2:
                    received += await right.receive()
                assert received == [{"op": "hello", "n": 1}, {"op": "data", "payload": big}]
                right.send({"op": "reply", "ok": True})
                assert await left.receive() == [{"op": "reply", "ok": True}]
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------- closing --


async def test_close_gives_the_peer_its_data_then_eof(autojump_clock):
    """After aclose the peer reads what was sent, then b"" forever, and cannot send."""
    net = make_network()
    async with trio.open_nursery() as nursery:
        a, b = await open_pair(nursery, net)
        await a.send_all(b"last words")
        await a.aclose()
        await a.aclose()  # idempotent
        assert await b.receive_some() == b"last words"
        assert await b.receive_some() == b""
        assert await b.receive_some() == b""
        with pytest.raises(trio.BrokenResourceError):
            await b.send_all(b"anyone there?")
        with pytest.raises(trio.ClosedResourceError):
            await a.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await a.receive_some()
        nursery.cancel_scope.cancel()


async def test_closing_wakes_a_receive_on_the_same_end(autojump_clock):
    """A task parked in receive_some gets ClosedResourceError when its own end closes."""
    net = make_network()
    async with trio.open_nursery() as nursery:
        a, _ = await open_pair(nursery, net)

        async def close_soon() -> None:
            await trio.sleep(1)
            await a.aclose()

        nursery.start_soon(close_soon)
        with pytest.raises(trio.ClosedResourceError):
            await a.receive_some()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- resets --


async def test_reset_breaks_both_ends_including_a_blocked_receive(autojump_clock):
    """reset(node) breaks its streams on both sides, waking a parked receive."""
    net = make_network()
    async with trio.open_nursery() as nursery:
        a, b = await open_pair(nursery, net)
        await b.send_all(b"never read")

        async def reset_soon() -> None:
            await trio.sleep(1)
            net.reset("client")

        nursery.start_soon(reset_soon)
        with pytest.raises(trio.BrokenResourceError):
            await b.receive_some()
        assert trio.current_time() == pytest.approx(1, abs=0.1)
        for operation in (a.receive_some(), a.send_all(b"x"), b.send_all(b"x")):
            with pytest.raises(trio.BrokenResourceError):
                await operation
        await a.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await a.receive_some()
        nursery.cancel_scope.cancel()


async def test_reset_link_and_reset_connection_touch_only_their_targets(autojump_clock):
    """reset_link(a, b) spares other links; reset_connection(id) spares other connections."""
    net = make_network()
    async with trio.open_nursery() as nursery:
        w1, _ = await open_pair(nursery, net, "worker-1", "scheduler")
        w2, s2 = await open_pair(nursery, net, "worker-2", "scheduler")
        w2_again, s2_again = await open_pair(nursery, net, "worker-2", "scheduler")
        net.reset_link("scheduler", "worker-1")
        with pytest.raises(trio.BrokenResourceError):
            await w1.send_all(b"x")
        assert [(c.id, c.client_node) for c in net.connections()] == [(2, "worker-2"), (3, "worker-2")]
        net.reset_connection(2)
        with pytest.raises(trio.BrokenResourceError):
            await s2.receive_some()
        await w2_again.send_all(b"still here")
        assert await s2_again.receive_some() == b"still here"
        nursery.cancel_scope.cancel()


# ----------------------------------------------------------- black holes --


async def test_black_hole_swallows_bytes_and_hangs_connects(autojump_clock):
    """Under a black hole, bytes (even those in flight) vanish, receives wait and connects hang."""
    net = make_network()
    async with trio.open_nursery() as nursery:
        address, _ = await serve_collecting(nursery, net, "worker-1")
        to_worker, at_worker = await open_pair(nursery, net, "scheduler", "worker-1")
        await to_worker.send_all(b"in flight")  # arrives no earlier than 10 ms from now
        net.black_hole("worker-1")
        await to_worker.send_all(b"into the void")
        await at_worker.send_all(b"from the void")
        assert await nothing_arrives(at_worker)
        assert await nothing_arrives(to_worker)
        with trio.move_on_after(10) as scope:
            await net.for_node("client").connect(address)
        assert scope.cancelled_caught
        with trio.move_on_after(10) as scope:
            await net.for_node("worker-1").connect(address)
        assert scope.cancelled_caught
        nursery.cancel_scope.cancel()


async def test_bytes_that_arrived_before_a_black_hole_stay_readable(autojump_clock):
    """A black hole loses what is in flight, not what the receiver's kernel already holds."""
    net = make_network()
    async with trio.open_nursery() as nursery:
        a, b = await open_pair(nursery, net, "scheduler", "worker-1")
        await a.send_all(b"arrived")
        await trio.sleep(1)
        net.black_hole("worker-1")
        assert await b.receive_some() == b"arrived"
        nursery.cancel_scope.cancel()


async def test_what_survives_a_black_hole_is_a_prefix_of_what_was_sent(autojump_clock):
    """Bytes lost mid-burst leave no gap: the reader gets a prefix, then nothing."""
    net = make_network(seed=5, latency=(0.0, 1.0))
    async with trio.open_nursery() as nursery:
        a, b = await open_pair(nursery, net, "scheduler", "worker-1")
        chunks = [b"<%03d>" % i for i in range(100)]
        for chunk in chunks:
            await a.send_all(chunk)
        received = await b.receive_some()  # the first arrivals, at most a few chunks
        net.black_hole("worker-1")
        with trio.move_on_after(10):
            while True:
                received += await b.receive_some()
        sent = b"".join(chunks)
        assert 0 < len(received) < len(sent)
        assert sent.startswith(received)
        nursery.cancel_scope.cancel()


async def test_healing_a_black_hole_completes_connects_and_resets_damaged_streams(autojump_clock):
    """After heal, a hanging connect completes, a stream that lost bytes is reset, an idle one lives."""
    net = make_network()
    async with trio.open_nursery() as nursery:
        address, accepted = await serve_collecting(nursery, net, "worker-1")
        damaged, damaged_peer = await open_pair(nursery, net, "scheduler", "worker-1")
        idle, idle_peer = await open_pair(nursery, net, "client", "worker-1")
        net.black_hole("worker-1")
        await damaged.send_all(b"lost")
        connected: list[trio.abc.Stream] = []

        async def connect() -> None:
            connected.append(await net.for_node("client").connect(address))

        nursery.start_soon(connect)
        await trio.sleep(30)
        assert connected == []
        net.heal_black_hole("worker-1")
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == pytest.approx(30, abs=0.1)  # no extra delay after heal
        assert len(connected) == 1
        assert isinstance(await accepted.receive(), SimStream)
        with pytest.raises(trio.BrokenResourceError):
            await damaged_peer.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await damaged.send_all(b"x")
        await idle.send_all(b"fine")
        assert await idle_peer.receive_some() == b"fine"
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------ partitions --


async def test_partition_blocks_only_crossing_traffic_until_healed(autojump_clock):
    """A partition isolates the groups; heal makes new connects work and resets damaged streams."""
    net = make_network()
    async with trio.open_nursery() as nursery:
        b_address, _ = await serve_collecting(nursery, net, "b1")
        inside, inside_peer = await open_pair(nursery, net, "a1", "a2")
        crossing, crossing_peer = await open_pair(nursery, net, "a1", "b1")
        idle, idle_peer = await open_pair(nursery, net, "a2", "b1")
        net.partition(["a1", "a2"], ["b1"])

        await inside.send_all(b"same side")
        assert await inside_peer.receive_some() == b"same side"
        await crossing.send_all(b"across")
        assert await nothing_arrives(crossing_peer)
        with trio.move_on_after(10) as scope:
            await net.for_node("a1").connect(b_address)
        assert scope.cancelled_caught

        net.heal_partition()
        with pytest.raises(trio.BrokenResourceError):
            await crossing_peer.receive_some()
        await idle.send_all(b"untouched")
        assert await idle_peer.receive_some() == b"untouched"
        fresh = await net.for_node("a1").connect(b_address)
        await fresh.send_all(b"after heal")
        await inside.send_all(b"still fine")
        assert await inside_peer.receive_some() == b"still fine"
        nursery.cancel_scope.cancel()


async def test_a_close_lost_in_a_partition_becomes_a_reset_at_heal(autojump_clock):
    """An EOF discarded by a partition is not half-delivered: the peer sees a reset at heal."""
    net = make_network()
    async with trio.open_nursery() as nursery:
        a, b = await open_pair(nursery, net, "a", "b")
        net.partition(["a"], ["b"])
        await a.aclose()
        assert await nothing_arrives(b)
        net.heal_partition()
        with pytest.raises(trio.BrokenResourceError):
            await b.receive_some()
        nursery.cancel_scope.cancel()


def test_partition_groups_must_not_overlap():
    """A node cannot be on both sides of a partition."""
    with pytest.raises(ValueError, match="both sides"):
        make_network().partition(["a", "b"], ["b"])


# --------------------------------------------------- listeners & crashes --


async def test_connect_to_an_address_nobody_serves_is_refused(autojump_clock):
    """connect() raises ConnectionRefusedError like TCP; connect_with_timeout makes it CommClosedError."""
    net = make_network()
    with pytest.raises(ConnectionRefusedError):
        await net.for_node("client").connect("sim://nobody:1")
    with pytest.raises(CommClosedError, match="nothing listens"):
        await connect_with_timeout(net.for_node("client"), "sim://nobody:1", timeout=5)
    with pytest.raises(ValueError, match="scheme"):
        await net.for_node("client").connect("tcp://127.0.0.1:1")


async def test_ports_are_allocated_in_order_and_not_shared(autojump_clock):
    """Port 0 counts up from FIRST_PORT; a taken port raises EADDRINUSE; a view serves only as its node."""
    net = make_network()
    async with trio.open_nursery() as nursery:
        first, _ = await serve_collecting(nursery, net, "scheduler")
        second, _ = await serve_collecting(nursery, net, "worker-1")
        assert (first, second) == (f"sim://scheduler:{FIRST_PORT}", f"sim://worker-1:{FIRST_PORT + 1}")
        with pytest.raises(OSError) as info:
            await serve_collecting(nursery, net, "scheduler", FIRST_PORT)
        assert info.value.errno == errno.EADDRINUSE
        with pytest.raises(ValueError, match="cannot serve as host"):
            await nursery.start(net.for_node("worker-1").serve, None, "127.0.0.1", 0)
        nursery.cancel_scope.cancel()


async def test_a_crashed_node_refuses_and_a_restart_serves_at_the_same_address(autojump_clock):
    """crash() resets connections and removes listeners; a new server may take the same port."""
    trace: list = []
    net = make_network(trace=trace)
    async with trio.open_nursery() as nursery:
        old_server = trio.CancelScope()

        async def run_old(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with old_server:
                async with trio.open_nursery() as own:
                    task_status.started(await serve_collecting(own, net, "worker-1"))

        address, accepted = await nursery.start(run_old)
        stream = await net.for_node("scheduler").connect(address)
        peer = await accepted.receive()
        net.crash("worker-1")
        with pytest.raises(trio.BrokenResourceError):
            await stream.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await peer.send_all(b"x")
        with pytest.raises(ConnectionRefusedError):
            await net.for_node("scheduler").connect(address)

        _, port = address.rsplit(":", 1)
        new_address, new_accepted = await serve_collecting(nursery, net, "worker-1", int(port))
        assert new_address == address
        # The crashed node's server task only now ends: it must not unregister the new one.
        old_server.cancel()
        await trio.sleep(1)
        assert ("unlisten", f"{address}: server stopped") not in [(k, d) for _, k, d in trace]
        fresh = await net.for_node("scheduler").connect(address)
        await fresh.send_all(b"welcome back")
        assert await (await new_accepted.receive()).receive_some() == b"welcome back"
        nursery.cancel_scope.cancel()


# ----------------------------------------------------------- determinism --


async def scripted_traffic(net: SimNetwork) -> None:
    """Echo servers, clients, and every kind of fault, driven by one task."""

    async def echo(stream: trio.abc.Stream) -> None:
        try:
            while data := await stream.receive_some():
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    async def chatter(stream: trio.abc.Stream, name: str) -> None:
        try:
            for i in range(10):
                await stream.send_all(f"{name} says {i}".encode())
                await stream.receive_some()
                await trio.sleep(0.3)
            await stream.aclose()
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        address = await nursery.start(net.for_node("scheduler").serve, echo, "scheduler", 0)
        for i in range(3):
            node = f"worker-{i}"
            stream = await net.for_node(node).connect(address)
            nursery.start_soon(chatter, stream, node)
            await trio.sleep(0.25)
        net.black_hole("worker-0")
        await trio.sleep(0.7)
        net.heal_black_hole("worker-0")
        net.partition(["scheduler"], ["worker-1"])
        await trio.sleep(0.9)
        net.heal_partition()
        net.crash("worker-2")
        await trio.sleep(5)
        nursery.cancel_scope.cancel()


def run_scripted(seed: int) -> list[tuple[float, str, str]]:
    trace: list[tuple[float, str, str]] = []
    net = make_network(seed=seed, trace=trace)
    trio.run(scripted_traffic, net, clock=trio.testing.MockClock(autojump_threshold=0))
    return trace


def test_the_same_seed_gives_the_same_trace():
    """Two runs of the same script with the same seed produce identical traces."""
    first = run_scripted(seed=42)
    kinds = {kind for _, kind, _ in first}
    assert {"send", "deliver", "discard", "reset", "black_hole", "partition", "crash"} <= kinds
    assert run_scripted(seed=42) == first


def test_a_different_seed_changes_the_latencies():
    """Another seed draws other latencies, so the timings in the trace differ."""
    sends_a = [event for event in run_scripted(seed=1) if event[1] == "send"]
    sends_b = [event for event in run_scripted(seed=2) if event[1] == "send"]
    assert sends_a[0][2].split("latency")[0] == sends_b[0][2].split("latency")[0]
    assert sends_a[0][2] != sends_b[0][2]


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    chunks=st.lists(st.binary(min_size=0, max_size=50), max_size=30),
    max_bytes=st.integers(1, 64),
)
def test_any_traffic_arrives_intact_and_in_order(seed, chunks, max_bytes):
    """For any seed, chunking and read size, the receiver gets exactly the bytes sent, then EOF."""

    async def main() -> bytes:
        net = make_network(seed=seed, latency=(0.0, 0.1))
        async with trio.open_nursery() as nursery:
            a, b = await open_pair(nursery, net)
            for chunk in chunks:
                await a.send_all(chunk)
            await a.aclose()
            received = b""
            while data := await b.receive_some(max_bytes):
                assert len(data) <= max_bytes
                received += data
            nursery.cancel_scope.cancel()
        return received

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == b"".join(chunks)
