"""`Connection`: messages over a byte stream, written in batches.

Every peer-to-peer link in trioflow is one `Connection` over one
`trio.abc.Stream` (TCP in production, an in-memory stream in the
simulator). It has two halves with different owners:

* Sending is synchronous: `send(message)` encodes the message at once (so a
  value that cannot travel raises *in the caller*) and appends it to an
  outbox. One sender task (`run_sender`) drains the whole outbox into one
  batch per write. When the link is idle a message goes out alone, at once;
  under load thousands share a write. No caller ever awaits the network to
  enqueue, and no lock is needed: Trio runs one task at a time.
* Receiving belongs to one task that calls `receive()` in a loop; each call
  returns the messages of one batch.

`open_connection` runs the sender in a nursery for the lifetime of an
``async with`` block and closes the stream when the block ends.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from trioflow.comm.frames import (
    EncodedMessage,
    FrameLimits,
    batch_frames,
    check_frame_count,
    check_frame_lengths,
    decode_batch,
    encode_message,
)
from trioflow.errors import CommClosedError, ProtocolError
from trioflow.nurseries import background_tasks

logger = logging.getLogger("trioflow.comm")

RECEIVE_CHUNK_BYTES = 256 * 1024
# Frames at least this large are written with their own send_all, straight
# from the caller's buffer, instead of being joined into one bytes object.
LARGE_FRAME_BYTES = 64 * 1024
MAX_MESSAGES_PER_WRITE = 50_000
# The msgpack array header `batch_frames` puts before a batch of one message.
LONE_MESSAGE_ARRAY_HEADER_BYTES = 1
# How long a closing connection may spend writing what is still queued.
FINAL_FLUSH_S = 1.0


class Connection:
    """A bidirectional, batched message channel over one stream.

    Args:
        stream: the byte stream; the connection owns and closes it.
        limits: what the peer may send us.
        peer: a name for the other end, used in logs and errors.
    """

    def __init__(self, stream: trio.abc.Stream, limits: FrameLimits, *, peer: str = "?"):
        self.stream = stream
        self.limits = limits
        self.peer = peer
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
        # trio.current_time() when bytes last arrived (for hung-peer checks).
        self.last_received = trio.current_time()
        self.close_reason: str | None = None

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    # ------------------------------------------------------------ sending --

    def send(self, message: dict[str, Any]) -> None:
        """Queue `message` for the sender task; returns at once.

        Raises:
            CommClosedError: the connection is closed.
            TypeError: the message holds a value msgpack cannot carry.
            ProtocolError: one of its frames is larger than the peer accepts.
        """
        if self.close_reason is not None:
            raise CommClosedError(f"connection to {self.peer} is closed: {self.close_reason}")
        encoded = encode_message(message)
        # Check against what the peer will accept, so a message that cannot
        # travel fails here rather than closing the connection at the peer.
        # A message sent alone is wrapped in a one-byte msgpack array header
        # (`batch_frames`); bigger batches keep to half the limit (`_take_batch`).
        limit = self.limits.max_frame_bytes
        body_bytes = len(encoded.body) + LONE_MESSAGE_ARRAY_HEADER_BYTES
        if body_bytes > limit or any(memoryview(f).nbytes > limit for f in encoded.frames):
            raise ProtocolError(
                f"a {message.get('op')!r} message has a frame larger than "
                f"max_frame_bytes={self.limits.max_frame_bytes}"
            )
        if 1 + len(encoded.frames) > self.limits.max_frames:
            raise ProtocolError(
                f"a {message.get('op')!r} message needs {1 + len(encoded.frames)} frames, "
                f"more than max_frames={self.limits.max_frames}"
            )
        self._outbox.append(encoded)
        self._queued += 1
        self._outbox_nonempty.set()

    async def flush(self) -> None:
        """Wait until everything queued so far has been written to the stream.

        Once written, the bytes are the kernel's: they reach the peer even if
        this process dies right after (the worker relies on this to report a
        task as started before running a function that may kill it).

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
                if not self._outbox:
                    await self._outbox_nonempty.wait()
                    self._outbox_nonempty = trio.Event()
                    continue
                mid_write = True
                await self._write_batch()
                mid_write = False
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
        self._writing = True
        try:
            await self._write(batch_frames(batch))
        finally:
            self._writing = False
        self._written += len(batch)
        self._write_done.set()
        self._write_done = trio.Event()

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
            while self._outbox and not self.closed:
                await self._write_batch()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError, CommClosedError) as exc:
            self._mark_closed(f"final write failed: {exc!r}")

    def _take_batch(self) -> list[EncodedMessage]:
        """The oldest messages that fit one batch within the peer's limits."""
        body_budget = self.limits.max_frame_bytes // 2
        frame_budget = self.limits.max_frames - 1
        count = 0
        for message in self._outbox[:MAX_MESSAGES_PER_WRITE]:
            body_budget -= len(message.body)
            frame_budget -= len(message.frames)
            if count and (body_budget < 0 or frame_budget < 0):
                break
            count += 1
        batch = self._outbox[:count]
        del self._outbox[:count]
        return batch

    async def _write(self, frames: list[Any]) -> None:
        pending: list[Any] = []
        for frame in frames:
            if memoryview(frame).nbytes >= LARGE_FRAME_BYTES:
                if pending:
                    await self.stream.send_all(b"".join(pending))
                    pending = []
                await self.stream.send_all(frame)
            else:
                pending.append(frame)
        if pending:
            await self.stream.send_all(b"".join(pending))

    # ---------------------------------------------------------- receiving --

    async def receive(self) -> list[dict[str, Any]]:
        """The messages of the next batch from the peer.

        Raises:
            CommClosedError: the peer closed the stream (or it broke).
            ProtocolError: the peer sent bytes that break the protocol; the
                caller should close the connection and log the reason.
        """
        try:
            (n_frames,) = struct.unpack("<I", await self._read_exactly(4))
            check_frame_count(n_frames, self.limits)
            lengths = struct.unpack(f"<{n_frames}Q", await self._read_exactly(8 * n_frames))
            check_frame_lengths(lengths, self.limits)
            frames = [await self._read_exactly(length) for length in lengths]
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._mark_closed(f"read failed: {exc!r}")
            raise CommClosedError(f"connection to {self.peer} broke: {exc!r}") from None
        return decode_batch(frames, self.limits)

    async def _read_exactly(self, n: int) -> bytes | bytearray:
        buffer = self._receive_buffer
        if n > RECEIVE_CHUNK_BYTES and len(buffer) < n:
            return await self._read_large(n)
        while len(buffer) < n:
            chunk = await self.stream.receive_some(RECEIVE_CHUNK_BYTES)
            if not chunk:
                self._mark_closed("closed by the peer")
                raise CommClosedError(f"{self.peer} closed the connection")
            self.last_received = trio.current_time()
            buffer += chunk
        with memoryview(buffer) as view:
            out = view[:n].tobytes()
        del buffer[:n]
        return out

    async def _read_large(self, n: int) -> bytearray:
        """Read a big frame straight into its own buffer (one copy per chunk)."""
        out = bytearray(n)
        have = len(self._receive_buffer)
        out[:have] = self._receive_buffer
        self._receive_buffer.clear()
        with memoryview(out) as view:
            while have < n:
                chunk = await self.stream.receive_some(min(n - have, 4 * RECEIVE_CHUNK_BYTES))
                if not chunk:
                    self._mark_closed("closed by the peer")
                    raise CommClosedError(f"{self.peer} closed the connection mid-frame")
                view[have : have + len(chunk)] = chunk
                have += len(chunk)
                self.last_received = trio.current_time()
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
    stream: trio.abc.Stream, limits: FrameLimits, *, peer: str = "?"
) -> AsyncIterator[Connection]:
    """Run a `Connection` over `stream` for the duration of the block.

    On exit the sender gets a brief chance to write what is queued (a final
    reply, a goodbye), then the stream is closed.
    """
    conn = Connection(stream, limits, peer=peer)
    async with background_tasks() as nursery:
        nursery.start_soon(conn.run_sender)
        try:
            yield conn
        finally:
            with trio.move_on_after(FINAL_FLUSH_S, shield=True):
                await conn.drain()
            await conn.aclose()
