"""`Connection`: messages over a byte stream, written in batches.

Every peer-to-peer link in trioflow is one `Connection` over one
`trio.abc.Stream` (TCP in production, an in-memory stream in the
simulator). It has two halves with different owners:

* Sending is synchronous: `send(message)` encodes the message at once (so a
  value that cannot travel raises *in the caller*) and appends it to an
  outbox. One sender task (`run_sender`) drains the whole outbox into one
  batch per write. When the link is idle a message goes out alone, at once;
  under load thousands share a write. A link may also be given a
  `write_interval`: then, under load, the writes are spaced by it, and
  the messages queued in between share one. No caller ever awaits the
  network to enqueue, and no lock is needed: Trio runs one task at a time.
* Write-through. A server's handler (and a client taking in submissions)
  runs inside `writing_through()`: what it queues is written as it
  returns, as one batch per connection, when the kernel takes it at once,
  saving the sender's pass of the loop on every hop of a round trip.
  Whatever the kernel does not take at once, and anything a sender is
  already writing or pacing, stays the sender's.
* Held messages. A message whose op is declared ``held`` (`task_started`)
  matters at once only if its sender dies; otherwise it can ride with the
  next message. A batch made only of held messages is written to a corked
  socket (TCP_CORK, `buffers.set_cork`): the kernel has the bytes, and
  sends them as the socket closes if the process dies (a SIGKILL
  included), but otherwise holds them until the next write, which uncorks
  the socket and sends both in one packet, or for 200 ms at most. So a
  short task's `task_started` and `task_finished` wake the scheduler once,
  not twice. Only plain TCP on Linux corks; elsewhere a held message goes
  out at once like any other.
* Receiving belongs to one task that calls `receive()` in a loop; each call
  returns the messages of one batch (with those of the batches that
  arrived whole with it, up to `DECODE_SLICE` messages), decoded and
  checked against their declarations for the connection's inbound channel
  (`messages.decode`): the edge of the connection is the one place where
  bytes become typed messages.

What a peer can make the receiver spend is bounded (design.md §6 rule 3):

* Memory follows bytes. A frame's buffer grows as its bytes arrive, never
  ahead of them: a header announcing 1 GiB costs nothing until a GiB has
  come. A value larger than `max_frame_bytes` travels as several frames
  and grows into one buffer the same way (`_read_frame`). Before the hello
  the limits are tiny (`FrameLimits.before_hello`).
* Bytes in flight are budgeted. A batch may not announce more than the
  connection's budget (`max_connection_bytes`); and all connections of a
  process share a `ByteBudget` (`max_process_bytes`): a batch waits for
  its share before its body is read, and gives it back once it has been
  decoded.
* Time. A batch must begin within `idle_timeout` of the last one, and once
  begun must arrive at `min_transfer_rate` bytes per second or better, so
  a peer that goes silent or trickles bytes loses its connection. These
  times are counted in our loop's *responsive* time (`liveness.LoopLag`):
  a stall of this process's own loop never counts against the peer
  (design.md §6 rule 6). Decoding a big batch yields to other tasks every
  `DECODE_SLICE` messages.

`open_connection` runs the sender in a nursery for the lifetime of an
``async with`` block and closes the stream when the block ends.
"""

from __future__ import annotations

import collections
import logging
import math
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import trio

import trioflow.comm.messages as messages
from trioflow.comm.buffers import (
    MAPPED_FRAME_BYTES,
    WARM,
    FrameBuffer,
    receive_some,
    send_frames,
    set_cork,
    write_now,
    writes_directly,
)
from trioflow.comm.frames import (
    EncodedMessage,
    FrameLimits,
    batch_frames,
    check_frame_count,
    decode_batch,
    encode_message,
    frame_count,
    frame_groups,
)
from trioflow.comm.liveness import loop_lag
from trioflow.comm.schema import clip
from trioflow.errors import CommClosedError, ProtocolError
from trioflow.nurseries import background_tasks

logger = logging.getLogger("trioflow.comm")

RECEIVE_CHUNK_BYTES = 256 * 1024
# Frames at least this large are written straight from the caller's buffer
# (an iovec of their own in one sendmsg), instead of being joined into one
# bytes object with the small frames around them.
LARGE_FRAME_BYTES = 64 * 1024
MAX_MESSAGES_PER_WRITE = 50_000
# The msgpack array header `batch_frames` puts before a batch of one message,
# and before a batch of any size.
LONE_MESSAGE_ARRAY_HEADER_BYTES = 1
ARRAY_HEADER_MAX_BYTES = 5
# A batch that has begun may take this long (at most `idle_timeout`), plus
# its bytes at `min_transfer_rate`.
BATCH_GRACE_S = 30.0
# How long a closing connection may spend writing what is still queued.
FINAL_FLUSH_S = 1.0
# Messages checked between two yields to other tasks while decoding a batch.
DECODE_SLICE = 512
# `receive` returns, with the batch it read, the batches already buffered
# whole (`Connection._take_buffered_batches`); off, one batch a receive.
MERGE_BUFFERED_BATCHES = True
# After a read that got less than it asked for, the next one waits for the
# socket to be readable instead of trying first: the kernel had nothing
# more then, and a try would almost always fail (a system call and an
# exception for nothing, on every message of a round trip). Bytes that came
# meanwhile cost a pass of the loop instead. Off: always try first.
WAIT_AFTER_SHORT_READ = True
# Messages queued inside a `writing_through()` block are written as the
# block ends, by the code that ends it, when the kernel takes them at once;
# off, always by the connection's sender task, a pass of the loop later.
WRITE_THROUGH = True


class _Through(threading.local):
    """The connections written to inside this thread's `writing_through()`
    block (None outside one).

    Per thread, because a process can run several Trio loops in threads (a
    client's and a LocalCluster's), and the block is synchronous: whatever
    this thread queues between its start and its end is inside it. Not a
    context variable: a task spawned inside the block would inherit it, and
    queue into a block that ended long before.
    """

    written_to: list[Connection] | None = None


_through = _Through()


@contextmanager
def writing_through() -> Iterator[None]:
    """Write what is queued inside the block as it ends, not a pass later.

    For a synchronous stretch of code that decides messages (a server's
    handler, a client taking in submissions). Without it each message wakes
    its connection's sender task, which writes it on the loop's next pass:
    in a round trip of W2 that pass came after every handler on the chain,
    in the client, the scheduler (twice) and the worker
    (docs/performance.md, W2). Inside it, the messages wait in their
    outboxes, and when the block ends each connection written to writes
    its outbox as one batch if the kernel takes it whole at once
    (`Connection._write_through`); anything else (a sender already mid-write,
    a full socket buffer, a write interval not yet over, large frames, a
    stream that is not a plain socket) is left to the sender as before.
    The messages of one block still share a write. Blocks nest: the
    outermost writes.
    """
    if not WRITE_THROUGH or _through.written_to is not None:
        yield
        return
    written_to: list[Connection] = []
    _through.written_to = written_to
    try:
        yield
    finally:
        _through.written_to = None
        try:
            for conn in written_to:
                conn._write_through()
        finally:
            # Only if one of them raised (a bug): the rest go to their
            # senders, rather than wait for a block that never comes.
            for conn in written_to:
                if conn._through_pending:
                    conn._through_pending = False
                    conn._outbox_nonempty.set()


def _smaller_than(outbox: list[EncodedMessage], limit: int) -> bool:
    """Whether the messages in `outbox` come to fewer than `limit` bytes
    (looking no further than it takes to tell)."""
    total = 0
    for message in outbox:
        total += message.nbytes
        if total >= limit:
            return False
    return True


class ByteBudget:
    """Bytes in flight that a process allows across all its connections.

    `acquire` waits, first come first served, until `n` bytes are free. A
    connection takes its batch's announced size before reading the body,
    and `release`s it once the batch is decoded, so a process never holds
    more than `capacity` bytes of half-received batches, however many peers
    send at once.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_use = 0
        self._waiting: collections.deque[tuple[int, trio.Event]] = collections.deque()

    def fits(self, n: int) -> bool:
        """True when `acquire(n)` would return at once."""
        return not self._waiting and self.in_use + n <= self.capacity

    async def acquire(self, n: int) -> None:
        if n > self.capacity:
            raise ProtocolError(
                f"batch of {n} bytes exceeds the process's budget of {self.capacity} bytes (max_process_bytes)"
            )
        if not self._waiting and self.in_use + n <= self.capacity:
            self.in_use += n
            return
        ready = trio.Event()
        entry = (n, ready)
        self._waiting.append(entry)
        try:
            await ready.wait()
        except BaseException:
            if ready.is_set():
                self.release(n)  # granted as we were cancelled: give it back
            else:
                self._waiting.remove(entry)
                self.release(0)  # those queued behind us may fit now
            raise

    def release(self, n: int) -> None:
        """Give back `n` bytes and wake, in order, the waiters that now fit."""
        self.in_use -= n
        while self._waiting and self.in_use + self._waiting[0][0] <= self.capacity:
            n_next, ready = self._waiting.popleft()
            self.in_use += n_next
            ready.set()


class PeerSilent(CommClosedError):
    """The peer sent nothing for `idle_timeout` seconds of our responsive time.

    Attributes:
        reason: "no message for <t> s (<knob>)", the knob being
            `Connection.idle_name` (``worker_ttl`` on a scheduler's link to
            a worker, ``scheduler_ttl`` on a worker's link to its scheduler).
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


# The phases of receiving a batch (`Connection.receive`).
IDLE, HEADER, BUDGET, FRAMES = "idle", "header", "budget", "frames"


class _BatchProgress:
    """How far `Connection.receive` got with the batch it is reading.

    Kept outside the cancel scope, so that a deadline that turns out to
    have been our own loop's stall resumes the batch where it was.

    A phase's deadline is set on the scope only when the phase has to wait
    (`arm`): most batches arrive whole with their first bytes, and moving a
    Trio deadline three times a batch for phases that never wait was a
    visible share of a busy link's CPU.
    """

    __slots__ = (
        "phase", "since", "allowance", "deadline", "armed",
        "n_frames", "groups", "total", "budgeted", "frames", "partial",
    )

    def __init__(self, now: float, idle_timeout: float):
        self.phase = IDLE
        # When the phase began waiting, and how long the peer has for it.
        self.since = now
        self.allowance = idle_timeout
        self.deadline = now + idle_timeout
        self.armed = True  # the batch's scope begins with this deadline
        self.n_frames = 0
        self.groups: list[int] = []  # each buffer's length (pieces joined)
        self.total = 0
        self.budgeted = False  # `total` taken from the process's budget
        self.frames: list[Any] = []
        self.partial: bytearray | FrameBuffer | None = None  # the big buffer being read

    def enter(self, phase: str, allowance: float) -> None:
        self.phase = phase
        self.allowance = allowance
        self.armed = False

    def arm(self, scope: trio.CancelScope) -> None:
        """This phase is about to wait: its allowance runs from now (or, when
        a batch resumes after our own stall, from when it first waited)."""
        if not self.armed:
            self.armed = True
            self.since = trio.current_time()
            self.deadline = self.since + self.allowance
        scope.deadline = self.deadline


class Connection:
    """A bidirectional, batched message channel over one stream.

    Args:
        stream: the byte stream; the connection owns and closes it.
        limits: what the peer may send us.
        peer: a name for the other end, used in logs and errors.
        inbound: the channel messages arrive on (`trioflow.comm.messages`);
            ``None`` returns the raw maps (the wire tests use that).
        budget: the process's `ByteBudget`, if any.
        idle_timeout: seconds a batch may take to begin (inf: no limit).
        min_transfer_rate: bytes per second a begun batch must keep up.
        send_limits: what the peer accepts from us (default: `limits`;
            a server reading a hello under tiny limits still answers under
            the normal ones).

    ``write_interval`` (an attribute, 0 unless set; seconds): the least
    time from the end of one write to the start of the next. A message
    queued on a link that has not written for that long goes out at once;
    one queued sooner waits at most that long, and goes out with the
    others queued meanwhile. Each write wakes the peer, so this trades a
    bounded delay for fewer wake-ups on a busy link (the scheduler sets it
    on its client links: `scheduler.CLIENT_WRITE_INTERVAL_S`).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        limits: FrameLimits,
        *,
        peer: str = "?",
        inbound: str | None = None,
        budget: ByteBudget | None = None,
        idle_timeout: float = math.inf,
        min_transfer_rate: float = 64 * 1024,
        send_limits: FrameLimits | None = None,
    ):
        self.stream = stream
        self.limits = limits
        self.peer = peer
        self.inbound = inbound
        self.budget = budget
        self.idle_timeout = idle_timeout
        # The knob `idle_timeout` stands for, named in the reason a silent
        # peer is dropped for ("worker_ttl" on a scheduler's worker link).
        self.idle_name = "idle_timeout"
        self.min_transfer_rate = min_transfer_rate
        # This loop's stalls, so that none counts against the peer.
        self._lag = loop_lag()
        # Limits the *peer* applies to what we send (assumed equal to ours:
        # both ends run with the same Config).
        self.send_limits = send_limits or limits
        self._outbox: list[EncodedMessage] = []
        self._outbox_nonempty = trio.Event()
        # Messages queued and written so far, for `flush`.
        self._queued = 0
        self._written = 0
        self._write_done = trio.Event()
        self._receive_buffer = bytearray()
        # True while the sender is inside a write; False once `drain` takes over.
        self._writing = False
        self._sender_retired = False
        # Queued inside a `writing_through()` block that has not ended yet.
        self._through_pending = False
        # The tail of a batch the kernel took only part of in
        # `_write_through`: (bytes, messages in the batch, held), for the
        # sender to write before anything else.
        self._unsent: tuple[memoryview, int, bool] | None = None
        self.write_interval = 0.0
        self._last_write_end = -math.inf
        self._corked = False  # the last write was of held messages only
        self._batches_received = 0
        # Reads from the stream, each a checkpoint: a receive that made none
        # (its batch was already buffered) takes one before it returns.
        self._reads = 0
        # Whether the last read got less than it asked for (`_fill`).
        self._drained = False
        # trio.current_time() when bytes last arrived (for hung-peer checks).
        self.last_received = trio.current_time()
        # trio.current_time() when we last queued a message (for heartbeats).
        self.last_sent = -math.inf
        self.close_reason: str | None = None

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    # ------------------------------------------------------------ sending --

    def send(self, message: messages.Message | dict[str, Any]) -> None:
        """Queue `message` for the sender task; returns at once.

        Raises:
            CommClosedError: the connection is closed.
            TypeError: the message holds a value msgpack cannot carry.
            ProtocolError: it is larger than the peer accepts (the text
                names the op, the size and the limit).
        """
        if self.close_reason is not None:
            raise CommClosedError(f"connection to {self.peer} is closed: {self.close_reason}")
        is_message = isinstance(message, messages.Message)
        wire = message.to_wire() if is_message else message
        encoded = encode_message(wire)
        encoded.held = is_message and message.HELD
        # Check against what the peer will accept, so a message that cannot
        # travel fails here rather than closing the connection at the peer.
        # A message sent alone is wrapped in a one-byte msgpack array header
        # (`batch_frames`).
        limits = self.send_limits
        body_bytes = len(encoded.body) + LONE_MESSAGE_ARRAY_HEADER_BYTES
        op = wire.get("op")
        if body_bytes > limits.max_body_bytes:
            raise ProtocolError(
                f"a {op!r} message of {body_bytes} bytes is larger than the peer accepts "
                f"(max_body_bytes={limits.max_body_bytes}); send fewer keys or tasks per call"
            )
        # Buffers larger than the peer's max_frame_bytes travel cut into
        # several frames (`batch_frames`), each within the limit.
        n_frames = 1 + frame_count(encoded, limits.max_frame_bytes)
        if n_frames > limits.max_frames:
            raise ProtocolError(
                f"a {op!r} message needs {n_frames} frames, "
                f"more than max_frames={limits.max_frames}"
            )
        if encoded.nbytes + LONE_MESSAGE_ARRAY_HEADER_BYTES > limits.max_batch_bytes:
            raise ProtocolError(
                f"a {op!r} message of {encoded.nbytes + LONE_MESSAGE_ARRAY_HEADER_BYTES} bytes is larger than the peer's budget "
                f"(max_connection_bytes={limits.max_batch_bytes})"
            )
        self._outbox.append(encoded)
        self._queued += 1
        self.last_sent = trio.current_time()
        written_to = _through.written_to
        if written_to is None:
            self._outbox_nonempty.set()
        elif not self._through_pending:
            self._through_pending = True
            written_to.append(self)

    async def flush(self) -> None:
        """Wait until everything queued so far has been written to the stream.

        Once written, the bytes are the kernel's: they reach the peer even if
        this process dies right after (the worker relies on this to report a
        task as started before running a function that may kill it). Held
        messages may stay in the kernel until the next write, 200 ms at
        most (module docstring, "Held messages").

        Raises:
            CommClosedError: the connection closed first.
        """
        target = self._queued
        while self._written < target:
            if self.close_reason is not None:
                raise CommClosedError(f"connection to {self.peer} closed: {self.close_reason}")
            await self._write_done.wait()

    async def run_sender(self) -> None:
        """Write queued messages until the connection closes; never raises.

        Cancellation: safe at any await; a batch cut short by cancellation
        leaves the stream unusable, so the connection is then closed.
        """
        mid_write = False
        try:
            while self.close_reason is None and not self._sender_retired:
                if self._unsent is not None:
                    mid_write = True
                    await self._write_unsent()
                    mid_write = False
                    continue
                if not self._outbox:
                    await self._outbox_nonempty.wait()
                    self._outbox_nonempty = trio.Event()
                    continue
                if self.write_interval:
                    due = self._last_write_end + self.write_interval
                    if trio.current_time() < due:
                        await trio.sleep_until(due)  # what is queued meanwhile rides along
                        # Look again: `drain` may have retired us (and taken
                        # the outbox) meanwhile, or the connection closed.
                        continue
                mid_write = True
                await self._write_batch()
                mid_write = False
                self._last_write_end = trio.current_time()
                if self._outbox:
                    # A write the kernel took at once was no checkpoint
                    # (`buffers.send_frames`): let the tasks that queue
                    # messages run before the next one.
                    await trio.lowlevel.checkpoint()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._mark_closed(f"write failed: {exc!r}")
        finally:
            # A batch cut short mid-write leaves the stream unusable. Stopped
            # between batches (cancelled, or retired by `drain`), the stream
            # is clean: what is still queued is left for `drain`, which
            # `open_connection` always runs before closing.
            if mid_write:
                self._mark_closed(self.close_reason or "a write was cut short")

    async def _write_batch(self) -> None:
        batch = self._take_batch()
        held = all(message.held for message in batch)
        self._writing = True
        try:
            await self._write(batch_frames(batch, self.send_limits.max_frame_bytes), held)
        finally:
            self._writing = False
        self._batch_written(len(batch))

    def _batch_written(self, n_messages: int) -> None:
        self._written += n_messages
        self._write_done.set()
        self._write_done = trio.Event()

    def _write_through(self) -> None:
        """At the end of a `writing_through()` block: write the outbox now
        if the kernel takes it at once, else wake the sender to write it."""
        self._through_pending = False
        if not self._outbox or self.close_reason is not None:
            return
        if (
            not writes_directly(self.stream)
            or self._writing
            or self._unsent is not None
            or self._sender_retired
            or (self.write_interval and trio.current_time() < self._last_write_end + self.write_interval)
            or not _smaller_than(self._outbox, LARGE_FRAME_BYTES)
        ):
            # Large frames go from their own memory (`send_frames`), not
            # joined into a copy here, and a long outbox may not fit the
            # kernel's buffer anyway: the sender writes those.
            self._outbox_nonempty.set()
            return
        batch = self._take_batch()
        data = b"".join(batch_frames(batch, self.send_limits.max_frame_bytes))
        held = all(message.held for message in batch)
        if held and not self._corked:
            self._corked = set_cork(self.stream, True)
        try:
            n = write_now(self.stream, memoryview(data))
        except (OSError, trio.ClosedResourceError) as exc:
            self._mark_closed(f"write failed: {exc!r}")
            return
        assert n is not None  # `writes_directly` said it is a plain socket
        self._last_write_end = trio.current_time()
        if n < len(data):
            self._unsent = (memoryview(data)[n:], len(batch), held)
            self._outbox_nonempty.set()
            return
        if self._corked and not held:
            self._corked = set_cork(self.stream, False)
        self._batch_written(len(batch))
        if self._outbox:  # more than one batch's worth was queued
            self._outbox_nonempty.set()

    async def _write_unsent(self) -> None:
        """The rest of a batch `_write_through` began."""
        assert self._unsent is not None
        rest, n_messages, held = self._unsent
        self._writing = True
        try:
            await send_frames(self.stream, [rest], LARGE_FRAME_BYTES)
        finally:
            self._writing = False
        self._unsent = None
        if self._corked and not held:
            self._corked = set_cork(self.stream, False)
        self._last_write_end = trio.current_time()
        self._batch_written(n_messages)

    async def drain(self) -> None:
        """Write whatever is still queued from *this* task, then stop the sender.

        Used when the connection is about to close and its sender may
        already be cancelled (a final reply, a goodbye). Call it shielded.
        """
        if self.closed:
            return
        self._sender_retired = True
        try:
            # Let the sender finish the batch it is writing (only that one:
            # it stops after it, and the rest is ours to write).
            while self._writing and not self.closed:
                await self._write_done.wait()
            if self._unsent is not None and not self.closed:
                await self._write_unsent()
            while self._outbox and not self.closed:
                await self._write_batch()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError, CommClosedError) as exc:
            self._mark_closed(f"final write failed: {exc!r}")

    def _take_batch(self) -> list[EncodedMessage]:
        """The oldest messages that fit one batch within the peer's limits."""
        limits = self.send_limits
        body_budget = limits.max_body_bytes - ARRAY_HEADER_MAX_BYTES
        frame_budget = limits.max_frames - 1
        byte_budget = limits.max_batch_bytes - ARRAY_HEADER_MAX_BYTES
        count = 0
        # A batch is one msgpack array: the peer reads at most max_items.
        for message in self._outbox[: min(MAX_MESSAGES_PER_WRITE, limits.max_items)]:
            body_budget -= len(message.body)
            frame_budget -= frame_count(message, limits.max_frame_bytes)
            byte_budget -= message.nbytes
            if count and (body_budget < 0 or frame_budget < 0 or byte_budget < 0):
                break
            count += 1
        batch = self._outbox[:count]
        del self._outbox[:count]
        return batch

    async def _write(self, frames: list[Any], held: bool = False) -> None:
        # A batch of held messages only goes to a corked socket; any other
        # uncorks it once written, which sends both in one packet (module
        # docstring, "Held messages").
        if held and not self._corked:
            self._corked = set_cork(self.stream, True)
        # Large frames from their own memory, in one sendmsg with the rest
        # on a plain socket (`buffers.send_frames`).
        await send_frames(self.stream, frames, LARGE_FRAME_BYTES)
        if self._corked and not held:
            self._corked = set_cork(self.stream, False)

    # ---------------------------------------------------------- receiving --

    async def receive(self) -> list[Any]:
        """The messages of the next batch from the peer, checked.

        Raises:
            CommClosedError: the peer closed the stream (or it broke).
            PeerSilent: (a `CommClosedError`) the peer sent nothing for
                `idle_timeout` seconds of our loop's responsive time.
            ProtocolError: the peer sent bytes that break the protocol; the
                caller should close the connection and log the reason.
        """
        # A cancelled receive raises before it takes anything from the buffer.
        await trio.lowlevel.checkpoint_if_cancelled()
        progress = _BatchProgress(trio.current_time(), self.idle_timeout)
        reads = self._reads
        try:
            # One cancel scope for the whole batch, its deadline moved as the
            # batch arrives (a scope per phase cost a noticeable share of a
            # busy link's CPU): the next batch must begin within
            # idle_timeout; once begun, its header within the grace, its
            # frames at min_transfer_rate. A deadline that passes is asked
            # again, in our loop's responsive time (`LoopLag.deadline`): if
            # this loop stalled meanwhile, the time was ours, and the batch
            # carries on where it was (`_BatchProgress` keeps what has been
            # read; a cancelled receive_some consumes nothing).
            while True:
                with trio.CancelScope(deadline=progress.deadline) as scope:
                    await self._read_batch(progress, scope)
                if not scope.cancelled_caught:
                    break
                deadline = self._lag.deadline(progress.since, progress.allowance)
                if trio.current_time() < deadline:
                    progress.deadline = deadline
                    continue
                self._late(progress)
            if self._reads == reads:
                # Every batch was already here (a peer's writes can arrive
                # together): yield anyway, so that a reader going through
                # them lets other tasks run between two. A reader may run
                # what it received at once (`drivers.Driver.run_or_post`),
                # which counts on this.
                await trio.lowlevel.cancel_shielded_checkpoint()
            self._batches_received += 1
            raw = decode_batch(progress.frames, self.limits)
            progress.frames = []
            if MERGE_BUFFERED_BATCHES and self.inbound != messages.HELLO:
                # (A hello comes alone, read under the limits before the
                # hello; what follows it is read under the ones after.)
                self._take_buffered_batches(raw)
            if self.inbound is None:
                return raw
            return await self._decode(raw)
        except CommClosedError:
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if isinstance(exc, trio.ClosedResourceError) and self.close_reason is not None:
                # Closed on our side, for a reason (peer_timeout, idle...): say it.
                raise CommClosedError(f"connection to {self.peer} closed: {self.close_reason}") from None
            self._mark_closed(f"read failed: {exc!r}")
            raise CommClosedError(f"connection to {self.peer} broke: {exc!r}") from None
        finally:
            if progress.budgeted and self.budget is not None:
                self.budget.release(progress.total)

    def _take_buffered_batches(self, raw: list[Any]) -> None:
        """Append to `raw` the messages of the batches already here whole.

        A peer's writes can arrive together: a worker's `task_started`
        (held in its kernel) and its `task_finished` come in one packet as
        two batches. Returning them from one receive saves the reader a
        pass of the loop and its handler a run per batch. Only what needs
        no waiting is taken, and only while `raw` is under `DECODE_SLICE`
        messages, so a receive still does a bounded amount of work. A
        batch that breaks the protocol, or that the process's budget
        cannot take at once, is left in the buffer, for the next receive
        to take the usual way (and to fail there, after the good ones
        before it have been handled).
        """
        buffer = self._receive_buffer
        limits = self.limits
        while len(raw) < DECODE_SLICE and len(buffer) >= 4:
            (n_frames,) = struct.unpack_from("<I", buffer)
            header_bytes = 4 + 8 * n_frames
            if not 0 < n_frames <= limits.max_frames or len(buffer) < header_bytes:
                return
            lengths = struct.unpack_from(f"<{n_frames}Q", buffer, 4)
            try:
                groups, total = frame_groups(lengths, limits)
            except ProtocolError:
                return
            if len(buffer) < header_bytes + total or (self.budget is not None and not self.budget.fits(total)):
                return
            frames = []
            start = header_bytes
            with memoryview(buffer) as view:
                for length in groups:
                    frames.append(view[start : start + length].tobytes())
                    start += length
            try:
                more = decode_batch(frames, limits)
            except ProtocolError:
                return
            del buffer[:start]
            self._batches_received += 1
            raw += more

    async def _read_batch(self, progress: _BatchProgress, scope: trio.CancelScope) -> None:
        """Read the rest of a batch, phase by phase, from where `progress` is.

        A phase that has to wait sets the deadline of `scope` first
        (`_BatchProgress.arm`).
        """
        buffer = self._receive_buffer
        if progress.phase == IDLE:
            if len(buffer) < 4:
                await self._fill(4)
            (n_frames,) = struct.unpack_from("<I", buffer)
            if n_frames == 0 or n_frames > self.limits.max_frames:
                self._check_speaks_trioflow()
            check_frame_count(n_frames, self.limits)
            progress.n_frames = n_frames
            progress.enter(HEADER, min(self.idle_timeout, BATCH_GRACE_S))
        if progress.phase == HEADER:
            header_bytes = 4 + 8 * progress.n_frames
            if len(buffer) < header_bytes:
                progress.arm(scope)
                await self._fill(header_bytes)
            lengths = struct.unpack_from(f"<{progress.n_frames}Q", buffer, 4)
            progress.groups, progress.total = frame_groups(lengths, self.limits)
            del buffer[:header_bytes]
            # Waiting for our share of the process's budget is our
            # slowness, not the peer's: no deadline.
            progress.enter(BUDGET, math.inf)
        if progress.phase == BUDGET:
            if self.budget is not None:
                if not self.budget.fits(progress.total):
                    progress.arm(scope)
                await self.budget.acquire(progress.total)
                progress.budgeted = True
            allowance = math.inf
            if len(buffer) < progress.total:
                allowance = min(self.idle_timeout, BATCH_GRACE_S) + progress.total / self.min_transfer_rate
            progress.enter(FRAMES, allowance)
        frames, groups = progress.frames, progress.groups
        if progress.allowance != math.inf:  # not all here yet: reading waits
            progress.arm(scope)
        while len(frames) < len(groups):
            # Frame 0 is the msgpack body: bytes, whatever its size.
            frames.append(await self._read_frame(groups[len(frames)], progress, mapped=bool(frames)))

    def _late(self, progress: _BatchProgress) -> None:
        """The peer missed a deadline in our responsive time: say how.

        Raises:
            PeerSilent: no batch began within `idle_timeout`.
            ProtocolError: a begun batch did not arrive in time.
        """
        if progress.phase == IDLE:
            reason = f"no message for {self.idle_timeout:g} s ({self.idle_name})"
            self._mark_closed(reason)
            raise PeerSilent(f"{self.peer}: {reason}", reason)
        if progress.phase == HEADER:
            raise ProtocolError(f"a batch header did not arrive within {progress.allowance:g} s")
        raise ProtocolError(
            f"a batch of {progress.total} bytes did not arrive in time (the peer sends slower than "
            f"min_transfer_rate={self.min_transfer_rate:g} B/s)"
        )

    async def _decode(self, raw: list[dict[str, Any]]) -> list[messages.Message]:
        """Check each map against its declaration, yielding now and then.

        A request or submission that breaks its declaration becomes an
        `Invalid` (answered with the reason); anything else that does ends
        the connection (`ProtocolError`).
        """
        channel = self.inbound
        assert channel is not None
        decode = messages.decode
        out = []
        for start in range(0, len(raw), DECODE_SLICE):
            if start:
                await trio.lowlevel.checkpoint()
            for message in raw[start : start + DECODE_SLICE]:
                try:
                    out.append(decode(message, channel))
                except ProtocolError as exc:
                    refused = messages.invalid(message, channel, exc)
                    if refused is None:
                        raise
                    out.append(refused)
        return out

    def _check_speaks_trioflow(self) -> None:
        """Name what the peer is when its first bytes are not a batch at all."""
        if self._batches_received:
            return
        head = bytes(self._receive_buffer[:40])
        if head[:4].isascii() and head[:4].decode("ascii").isprintable():
            raise ProtocolError(f"the peer does not speak trioflow: it sent {clip(head, 60)}")

    async def _fill(self, n: int) -> None:
        """Read until the receive buffer holds at least `n` bytes."""
        buffer = self._receive_buffer
        while len(buffer) < n:
            try_first = not (WAIT_AFTER_SHORT_READ and self._drained)
            chunk = await receive_some(self.stream, RECEIVE_CHUNK_BYTES, try_first)
            if not chunk:
                self._mark_closed("closed by the peer")
                raise CommClosedError(f"{self.peer} closed the connection")
            self._drained = len(chunk) < RECEIVE_CHUNK_BYTES
            self.last_received = trio.current_time()
            self._reads += 1
            buffer += chunk

    async def _read_frame(self, n: int, progress: _BatchProgress, mapped: bool = True) -> Any:
        """One buffer of `n` bytes (one frame, or the pieces of one), allocated
        as its bytes arrive.

        Small frames come out of the receive buffer as bytes. A frame of
        `MAPPED_FRAME_BYTES` or more is read into a `FrameBuffer`: address
        space for `n` bytes whose pages are made real in steps as the bytes
        arrive (never ahead of them by more than a bounded step), and,
        on a plain socket, written by the kernel itself (``recv_into``): no
        copy in user space, no reallocation. So memory follows bytes, a
        value cut into several frames ends up in ONE buffer, and a header
        that announces 3 GiB costs nothing until 3 GiB have come. In
        between, a buffer grows in place chunk by chunk (``realloc``, at
        most an eighth ahead of what has arrived). The buffer being read is
        kept in `progress`, so a receive that resumes after a stall of our
        own loop loses nothing.
        """
        buffer = self._receive_buffer
        out = progress.partial
        if out is None:
            if len(buffer) >= n or n <= RECEIVE_CHUNK_BYTES:
                await self._fill(n)
                with memoryview(buffer) as view:
                    data = view[:n].tobytes()
                del buffer[:n]
                return data
            # A big buffer: take what is buffered (all of it is ours: fewer
            # than `n` bytes), then read the rest straight into it.
            if mapped and n >= MAPPED_FRAME_BYTES:
                out = progress.partial = FrameBuffer(n, buffer, warm=WARM)
            else:
                out = progress.partial = bytearray(buffer)
            buffer.clear()
        if isinstance(out, FrameBuffer):
            while not out.complete:
                if not await out.receive(self.stream, 4 * RECEIVE_CHUNK_BYTES):
                    self._mark_closed("closed by the peer")
                    raise CommClosedError(f"{self.peer} closed the connection mid-frame")
                self.last_received = trio.current_time()
                self._reads += 1
            progress.partial = None
            return out.frame()
        while len(out) < n:
            chunk = await receive_some(self.stream, min(n - len(out), 4 * RECEIVE_CHUNK_BYTES))
            if not chunk:
                self._mark_closed("closed by the peer")
                raise CommClosedError(f"{self.peer} closed the connection mid-frame")
            out += chunk
            self.last_received = trio.current_time()
            self._reads += 1
        progress.partial = None
        return out

    # ------------------------------------------------------------ closing --

    def _mark_closed(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        self._outbox_nonempty.set()
        self._write_done.set()

    async def aclose(self, reason: str = "closed locally") -> None:
        """Close the stream; queued messages not yet written are dropped."""
        self._mark_closed(reason)
        with trio.CancelScope(shield=True):
            await self.stream.aclose()

    def __repr__(self) -> str:
        state = f"closed: {self.close_reason}" if self.closed else "open"
        return f"<Connection to {self.peer} ({state})>"


@asynccontextmanager
async def open_connection(
    stream: trio.abc.Stream, limits: FrameLimits, *, peer: str = "?", **options: Any
) -> AsyncIterator[Connection]:
    """Run a `Connection` over `stream` for the duration of the block.

    `options` are those of `Connection` (inbound channel, budget, timeouts).
    On exit the sender gets a brief chance to write what is queued (a final
    reply, a goodbye), then the stream is closed.
    """
    conn = Connection(stream, limits, peer=peer, **options)
    async with background_tasks() as nursery:
        nursery.start_soon(conn.run_sender)
        try:
            yield conn
        finally:
            with trio.move_on_after(FINAL_FLUSH_S, shield=True):
                await conn.drain()
            await conn.aclose()
