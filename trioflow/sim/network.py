"""The chaos lab's network: in-memory streams with latency and injected faults.

`SimNetwork` implements `trioflow.comm.network.Network` without sockets, so
a whole cluster can run inside one `trio.run` under `trio.testing.MockClock`
(design.md §3). Each simulated machine is a *node*, named by a host string
("scheduler", "worker-1"); its address is ``sim://<node>:<port>``. A shell
is handed ``net.for_node("worker-1")``, a `NetworkView` whose `connect`
knows which node is calling, because faults are about nodes.

Rules (what makes a run replayable from a seed):

* The only randomness is the injected `random.Random`: one latency draw per
  `connect`, per delivered ``send_all`` and per ``aclose`` (the EOF travels
  too); bytes a fault discards draw nothing.
* The only clock is Trio's. Delivery needs no background task: a chunk is
  stored with the virtual time it *arrives*, and the receiver sleeps until
  then. So the network owns no nursery and leaves no task behind.
* Collections are dicts and lists; nothing iterates over a set of strings.
  Faults walk the connections in the order they were opened.
* Every connection, delivery, loss, reset and fault is reported to the
  optional ``on_event(time, kind, detail)`` callback, in the order it
  happens, so the simulator can build a byte-identical trace. Kinds:
  listen, unlisten, connect, connect_hang, refuse, accept, send, deliver,
  discard, eof, close, reset, reset_node, reset_link, black_hole,
  heal_black_hole, partition, heal_partition, crash.

Theory of operation. A connection is a `_SimLink` with two `SimStream`
ends. ``send_all`` on one end draws a latency and appends
``(arrival_time, bytes)`` to the other end's inbox; arrival times on one
direction never decrease, so a later chunk never overtakes an earlier one
even when it drew a shorter latency. ``receive_some`` returns what has
arrived by now (several chunks coalesced, at most ``max_bytes``), or parks
until the next arrival time or until something happens to the link.
``aclose`` sends an EOF marker down the same pipe, so the peer reads the
data first and then ``b""``.

Faults, from the point of view of TCP:

* ``reset`` / ``reset_link`` / ``reset_connection``: an RST. Both ends see
  `trio.BrokenResourceError` at once, including a task parked in
  ``receive_some``; bytes not yet read are gone. There is no silent loss
  inside a live stream: a "dropped message" is a reset of its connection.
* ``black_hole(node)``: the machine stops answering but its sockets stay
  open (a hung process, a dead host whose peers have not noticed). Bytes
  from or to it are discarded, including those in flight when it starts;
  bytes that had already arrived stay readable. Connects to or from it
  hang until healed (or until the caller's timeout cancels them).
* ``partition(a, b)``: the same, for traffic between the two groups only.
* Healing either restores delivery of *new* bytes. A connection that lost
  bytes would now carry a corrupted byte stream, which TCP never does, so
  healing resets every such connection instead (its owners see a broken
  stream, as they would after a real TCP timeout).
* ``crash(node)``: the process died and the kernel answered for it: all its
  connections are reset and its listeners removed, so its address refuses
  connections until something serves there again (a restarted node may
  serve at the same port). The node's tasks are the simulator's to cancel:
  ``crash`` only changes the network.

What is deliberately not modelled: bandwidth, buffer limits and
backpressure (``send_all`` never blocks); partial writes; loss,
duplication or reordering inside a connection (TCP hides those); RST when
closing with unread data; the time an RST takes to travel (both ends break
at once, while a FIN travels like data); the one write TCP still accepts
after the peer closed (here ``send_all`` raises at once); retransmission
timeouts (a connection behind a fault stays open until healed or closed by
its owner's own deadline); different latencies per link (one range for the
whole network).
Chunks on different connections are independent, so they may arrive in
any order their latencies produce. Two events due at exactly the same
virtual time (for instance with ``latency=(0, 0)``) are ordered by Trio's
scheduler, which the simulator makes deterministic in its own place.
"""

from __future__ import annotations

import errno
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple, NoReturn

import trio

from trioflow.comm.network import Network, StreamHandler, format_address, parse_address

SCHEME = "sim"
# Ports handed out for ``port=0``, counting up per network.
FIRST_PORT = 40000
# The source node of connections made through `SimNetwork.connect` itself
# rather than through a `NetworkView`.
OUTSIDE_NODE = "outside"

TraceCallback = Callable[[float, str, str], None]


class ConnectionInfo(NamedTuple):
    """One open connection, as `SimNetwork.connections` lists it."""

    id: int
    client_node: str
    server_address: str


class SimStream(trio.abc.Stream):
    """One end of a simulated connection.

    Args:
        network: the network that owns the connection.
        link: the connection.
        node: the node this end belongs to.
    """

    def __init__(self, network: SimNetwork, link: _SimLink, node: str):
        self._network = network
        self._link = link
        self.node = node
        self._peer: SimStream | None = None  # set once both ends exist
        # (arrival time, bytes) sent to this end; None as bytes is the EOF.
        # Invariant: arrival times never decrease from left to right.
        self._inbox: deque[tuple[float, bytes | None]] = deque()
        self._last_arrival = -math.inf
        self._closed = False  # our own aclose() ran
        self._broken = False  # the connection was reset
        self._eof_seen = False
        self._wakeup = trio.lowlevel.ParkingLot()  # the parked receive_some
        self._sending = False
        self._receiving = False

    @property
    def peer(self) -> SimStream:
        assert self._peer is not None
        return self._peer

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        if self._broken:
            raise trio.BrokenResourceError(f"connection #{self._link.id} was reset")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Queue `data` for the peer; returns at once (buffering is unbounded).

        Raises:
            trio.ClosedResourceError: this end was closed.
            trio.BrokenResourceError: the connection was reset, or the peer
                closed its end (as the peer's RST would tell TCP).
            trio.BusyResourceError: another task is sending on this end.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            self._check_open()
            self._network._transmit(self, bytes(data))
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()
        self._check_open()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to `max_bytes` of what has arrived; ``b""`` after the peer's EOF.

        Raises:
            trio.ClosedResourceError: this end was closed (also while waiting).
            trio.BrokenResourceError: the connection was reset (also while
                waiting).
            trio.BusyResourceError: another task is receiving on this end.
        """
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint()
            while True:
                self._check_open()
                data = self._take_arrived(math.inf if max_bytes is None else max_bytes)
                if data is not None:
                    return data
                next_arrival = self._inbox[0][0] if self._inbox else math.inf
                with trio.move_on_at(next_arrival):
                    await self._wakeup.park()
        finally:
            self._receiving = False

    def _take_arrived(self, limit: float) -> bytes | None:
        """Pop what has arrived by now (at most `limit` bytes); None if nothing."""
        if self._eof_seen:
            return b""
        now = trio.current_time()
        parts: list[bytes] = []
        size = 0
        while self._inbox and self._inbox[0][0] <= now and size < limit:
            arrival, chunk = self._inbox[0]
            if chunk is None:
                if parts:
                    break  # hand over the data now, the EOF next time
                self._inbox.popleft()
                self._eof_seen = True
                self._network._emit("eof", f"{self._link.label(self.peer)} read by {self.node}")
                return b""
            room = int(min(limit - size, len(chunk)))
            parts.append(chunk[:room])
            size += room
            if room < len(chunk):
                self._inbox[0] = (arrival, chunk[room:])
            else:
                self._inbox.popleft()
        if not parts:
            return None
        self._network._emit("deliver", f"{self._link.label(self.peer)} {size} bytes")
        return b"".join(parts)

    async def aclose(self) -> None:
        """Close this end (idempotent); the peer reads EOF after the data."""
        if not self._closed:
            self._closed = True
            self._inbox.clear()
            self._wakeup.unpark_all()
            self._network._end_closed(self)
        await trio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "reset" if self._broken else "open"
        return f"<SimStream #{self._link.id} {self.node}->{self.peer.node} ({state})>"


class _SimLink:
    """One connection: its two ends and what faults did to it."""

    def __init__(self, network: SimNetwork, link_id: int, client: str, server: str, address: str):
        self.id = link_id
        self.address = address  # the listener's, for `connections()`
        self.client_end = SimStream(network, self, client)
        self.server_end = SimStream(network, self, server)
        self.client_end._peer = self.server_end
        self.server_end._peer = self.client_end
        # True once any byte or EOF sent on it was discarded; healing then
        # resets it, because the byte stream after the gap would be corrupt.
        self.lost_bytes = False

    @property
    def ends(self) -> tuple[SimStream, SimStream]:
        return (self.client_end, self.server_end)

    def touches(self, node: str) -> bool:
        return self.client_end.node == node or self.server_end.node == node

    def label(self, sender: SimStream) -> str:
        return f"#{self.id} {sender.node}->{sender.peer.node}"


class _Listener:
    __slots__ = ("address", "handler", "nursery")

    def __init__(self, address: str, handler: StreamHandler, nursery: trio.Nursery):
        self.address = address
        self.handler = handler
        self.nursery = nursery  # where `handler` runs, one task per stream


class SimNetwork(Network):
    """An in-memory network of named nodes, with latency and faults.

    Args:
        rng: the only source of randomness (latencies).
        latency: (min, max) seconds a chunk, an EOF or a connect takes,
            drawn uniformly for each one.
        on_event: called as ``on_event(time, kind, detail)`` for every
            connection, delivery, loss, reset and fault.
    """

    def __init__(
        self,
        rng: random.Random,
        latency: tuple[float, float] = (0.001, 0.005),
        *,
        on_event: TraceCallback | None = None,
    ):
        low, high = latency
        if not 0 <= low <= high:
            raise ValueError(f"latency must be (min, max) with 0 <= min <= max, got {latency!r}")
        self._rng = rng
        self._latency = (float(low), float(high))
        self._on_event = on_event
        self._views: dict[str, NetworkView] = {}
        self._listeners: dict[tuple[str, int], _Listener] = {}
        self._next_port = FIRST_PORT
        self._link_ids = 0
        # Open connections, oldest first (dict order is insertion order).
        self._links: dict[int, _SimLink] = {}
        self._black_holes: dict[str, None] = {}  # an ordered set of nodes
        self._partitions: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
        # Connects hanging on a black hole or partition park here.
        self._healed = trio.lowlevel.ParkingLot()

    # ------------------------------------------------------------ Network --

    def for_node(self, node: str) -> NetworkView:
        """The network as seen from `node`: what its shells are given."""
        if not node or ":" in node or "/" in node:
            raise ValueError(f"a node name must be non-empty without ':' or '/', got {node!r}")
        view = self._views.get(node)
        if view is None:
            view = self._views[node] = NetworkView(self, node)
        return view

    async def connect(self, address: str) -> trio.abc.Stream:
        """Connect from `OUTSIDE_NODE` (shells use a `for_node` view instead)."""
        return await self._connect(OUTSIDE_NODE, address)

    async def serve(
        self,
        handler: StreamHandler,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Serve at ``sim://host:port`` as node `host` (see `NetworkView.serve`)."""
        await self.for_node(host).serve(handler, host, port, task_status=task_status)

    async def _connect(self, source: str, address: str) -> SimStream:
        scheme, host, port = parse_address(address)
        if scheme != SCHEME:
            raise ValueError(f"SimNetwork cannot reach {address!r}: scheme {scheme!r} is not {SCHEME}")
        delay = self._draw_latency()
        self._emit("connect", f"{source} -> {address}, latency {delay!r}")
        await trio.sleep(delay)
        if self._blocked(source, host):
            # The SYN is lost, again and again: hang until healed. The
            # caller's timeout (connect_with_timeout) is what ends this.
            self._emit("connect_hang", f"{source} -> {address}")
            while self._blocked(source, host):
                await self._healed.park()
        listener = self._listeners.get((host, port))
        if listener is None:
            self._emit("refuse", f"{source} -> {address}")
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"nothing listens at {address}")
        self._link_ids += 1
        link = _SimLink(self, self._link_ids, source, host, address)
        self._links[link.id] = link
        self._emit("accept", f"#{link.id} {source} -> {address}")
        listener.nursery.start_soon(listener.handler, link.server_end)
        return link.client_end

    async def _serve(
        self,
        node: str,
        handler: StreamHandler,
        port: int,
        task_status: trio.TaskStatus[str],
    ) -> NoReturn:
        if port == 0:
            port = self._free_port(node)
        key = (node, port)
        address = format_address(SCHEME, node, port)
        if key in self._listeners:
            raise OSError(errno.EADDRINUSE, f"address already in use: {address}")
        async with trio.open_nursery() as nursery:
            listener = _Listener(address, handler, nursery)
            self._listeners[key] = listener
            self._emit("listen", address)
            try:
                task_status.started(address)
                await trio.sleep_forever()
            finally:
                # A crash may have removed us, and a restarted node may
                # already serve here: only remove our own registration.
                if self._listeners.get(key) is listener:
                    del self._listeners[key]
                    self._emit("unlisten", f"{address}: server stopped")
        raise AssertionError("unreachable")  # pragma: no cover

    def _free_port(self, node: str) -> int:
        while (node, self._next_port) in self._listeners:
            self._next_port += 1
        port = self._next_port
        self._next_port += 1
        return port

    # ----------------------------------------------------------- delivery --

    def _draw_latency(self) -> float:
        return self._rng.uniform(*self._latency)

    def _emit(self, kind: str, detail: str) -> None:
        if self._on_event is not None:
            self._on_event(trio.current_time(), kind, detail)

    def _blocked(self, a: str, b: str) -> bool:
        """Whether traffic between nodes `a` and `b` is currently discarded."""
        if a in self._black_holes or b in self._black_holes:
            return True
        for side_a, side_b in self._partitions:
            if (a in side_a and b in side_b) or (a in side_b and b in side_a):
                return True
        return False

    def _transmit(self, sender: SimStream, data: bytes) -> None:
        """Put `data` on its way from `sender` to its peer (or lose it)."""
        receiver = sender.peer
        if not data:
            return
        # A closed peer answers with an RST; behind a fault nothing answers.
        if receiver._closed and not self._blocked(sender.node, receiver.node):
            raise trio.BrokenResourceError(f"connection #{sender._link.id}: the peer closed it")
        self._put(sender, data, f"{len(data)} bytes")

    def _put(self, sender: SimStream, chunk: bytes | None, what: str) -> None:
        link = sender._link
        receiver = sender.peer
        if self._blocked(sender.node, receiver.node):
            link.lost_bytes = True
            self._emit("discard", f"{link.label(sender)} {what}")
            return
        delay = self._draw_latency()
        # Never before the previous chunk: one direction is a FIFO pipe.
        arrival = max(trio.current_time() + delay, receiver._last_arrival)
        receiver._last_arrival = arrival
        receiver._inbox.append((arrival, chunk))
        self._emit("send", f"{link.label(sender)} {what}, latency {delay!r}")
        receiver._wakeup.unpark_all()

    def _end_closed(self, end: SimStream) -> None:
        link = end._link
        if link.id not in self._links:
            return  # already reset
        self._emit("close", f"#{link.id} by {end.node}")
        if end.peer._closed:
            del self._links[link.id]
        else:
            self._put(end, None, "EOF")

    # ------------------------------------------------------------- faults --

    def connections(self) -> list[ConnectionInfo]:
        """The open connections, oldest first (for a fault injector to pick)."""
        return [
            ConnectionInfo(link.id, link.client_end.node, link.address) for link in self._links.values()
        ]

    def reset_connection(self, connection_id: int) -> None:
        """Reset one connection (a no-op if it is already gone)."""
        link = self._links.get(connection_id)
        if link is not None:
            self._reset(link, "reset_connection")

    def reset(self, node: str) -> None:
        """Reset every connection touching `node`, as a TCP RST would."""
        self._emit("reset_node", node)
        for link in self._touching(node):
            self._reset(link, f"reset of {node}")

    def reset_link(self, a: str, b: str) -> None:
        """Reset every connection between nodes `a` and `b`."""
        self._emit("reset_link", f"{a} <-> {b}")
        for link in list(self._links.values()):
            if link.touches(a) and link.touches(b):
                self._reset(link, f"reset of {a} <-> {b}")

    def black_hole(self, node: str) -> None:
        """From now on, discard everything `node` sends or is sent; hang its connects."""
        if node in self._black_holes:
            return
        self._black_holes[node] = None
        self._emit("black_hole", node)
        self._drop_in_flight()

    def heal_black_hole(self, node: str) -> None:
        """Deliver `node`'s new traffic again; reset its connections that lost bytes."""
        if node not in self._black_holes:
            return
        del self._black_holes[node]
        self._emit("heal_black_hole", node)
        self._after_heal()

    def partition(self, group_a: Sequence[str], group_b: Sequence[str]) -> None:
        """Discard traffic between the two groups (in addition to any other partition)."""
        side_a, side_b = tuple(group_a), tuple(group_b)
        overlap = [node for node in side_a if node in side_b]
        if overlap:
            raise ValueError(f"nodes {overlap} are on both sides of the partition")
        self._partitions.append((side_a, side_b))
        self._emit("partition", f"{list(side_a)} | {list(side_b)}")
        self._drop_in_flight()

    def heal_partition(self) -> None:
        """End every partition; reset the connections that lost bytes across one."""
        if not self._partitions:
            return
        self._partitions.clear()
        self._emit("heal_partition", "")
        self._after_heal()

    def crash(self, node: str) -> None:
        """`node`'s process died: reset its connections, remove its listeners."""
        self._emit("crash", node)
        for link in self._touching(node):
            self._reset(link, f"crash of {node}")
        for key, listener in list(self._listeners.items()):
            if key[0] == node:
                del self._listeners[key]
                self._emit("unlisten", f"{listener.address}: crash of {node}")

    def _touching(self, node: str) -> list[_SimLink]:
        return [link for link in self._links.values() if link.touches(node)]

    def _reset(self, link: _SimLink, reason: str) -> None:
        del self._links[link.id]
        for end in link.ends:
            end._broken = True
            end._inbox.clear()
            end._wakeup.unpark_all()
        self._emit("reset", f"#{link.id} {link.client_end.node} <-> {link.server_end.node}: {reason}")

    def _drop_in_flight(self) -> None:
        """Lose what is in flight on links a fault just blocked (arrived bytes stay)."""
        now = trio.current_time()
        for link in self._links.values():
            for receiver in link.ends:
                sender = receiver.peer
                if not self._blocked(sender.node, receiver.node):
                    continue
                kept = deque(item for item in receiver._inbox if item[0] <= now)
                lost = len(receiver._inbox) - len(kept)
                if lost:
                    receiver._inbox = kept
                    link.lost_bytes = True
                    self._emit("discard", f"{link.label(sender)} {lost} chunks in flight")

    def _after_heal(self) -> None:
        for link in list(self._links.values()):
            if link.lost_bytes and not self._blocked(link.client_end.node, link.server_end.node):
                self._reset(link, "lost bytes while unreachable")
        self._healed.unpark_all()


class NetworkView(Network):
    """`SimNetwork` as seen from one node: connects are made *from* it."""

    def __init__(self, network: SimNetwork, node: str):
        self.network = network
        self.node = node

    async def connect(self, address: str) -> trio.abc.Stream:
        """A stream from this node to `address`.

        Raises:
            ConnectionRefusedError: nothing serves at `address`.
            ValueError: `address` is not a ``sim://`` address.

        Cancellation: safe; a connect hanging on a black hole or partition
        waits until it heals or is cancelled.
        """
        return await self.network._connect(self.node, address)

    async def serve(
        self,
        handler: StreamHandler,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Serve at ``sim://<node>:port`` until cancelled; `host` must be this node.

        Port 0 takes the next free port of the network (from `FIRST_PORT`).
        Cancellation stops accepting and waits for the handlers (cancelled
        too); the streams they hold are theirs to close.

        Raises:
            OSError: something already serves at that address (EADDRINUSE).
            ValueError: `host` is not this node's name.
        """
        if host != self.node:
            raise ValueError(
                f"node {self.node!r} cannot serve as host {host!r}; "
                f"give the shell host={self.node!r}"
            )
        await self.network._serve(self.node, handler, port, task_status)
        raise AssertionError("unreachable")  # pragma: no cover

    def __repr__(self) -> str:
        return f"<NetworkView of {self.node}>"
