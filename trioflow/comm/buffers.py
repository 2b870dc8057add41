"""Large frames in and out of a socket with no copy the kernel does not make.

Receiving a big value (`FrameBuffer`) and writing a batch of frames
(`send_frames`) are where a transfer of hundreds of MiB spends its time. On
this machine's loopback the kernel moves about 2 GB/s between two
processes; everything trioflow adds on top is one of three costs, and this
module removes or shrinks each:

1. **A copy in user space.** ``stream.receive_some(k)`` returns a fresh
   ``bytes`` of up to k bytes, which then had to be appended to the value's
   buffer (and that buffer grown by ``realloc``). `FrameBuffer` has the
   kernel write straight into the value's own memory (``recv_into``), so
   the bytes are copied once, by the kernel, as with a raw socket. On the
   sending side `send_frames` hands the kernel a list of buffers
   (``sendmsg``, scatter/gather I/O): the batch header, the message body
   and a NumPy array's memory go out in one system call with no join.
2. **Page faults.** Fresh memory costs a page fault per 4 KiB the first
   time it is written: for 256 MiB that was 180-350 ms here, more than the
   kernel's copy itself. `FrameBuffer` has the kernel fault each step in
   one call (``MADV_POPULATE_WRITE``, Linux 5.14+): 100-150 ms for 256 MiB.
   Where that is missing the buffer still works, with ordinary faults.
   This cost is not trioflow's but fresh memory's: raw loopback TCP into a
   fresh buffer runs at 400-850 MB/s here, into a buffer faulted before the
   clock at about 2,000 (benchmarks/w4_transfer.py measures both). Huge
   pages (``MADV_HUGEPAGE``) made the faults 4x cheaper in a loop, but in
   the workers some took half a second (the host behind this VM backing
   the memory): W4 fell to 200-570 MB/s with them, so they are not asked
   for.
3. **Waiting on each other.** Nothing here: a value is one frame (or a few
   pieces, `frames.CONTINUED`) and is read in as few calls as the kernel
   allows.

What it deliberately does not do (the security contract, design.md §6
rule 3: memory follows bytes): it never commits memory ahead of the bytes
that have arrived by more than a bounded step. A `FrameBuffer` *reserves*
address space for the whole frame (an anonymous ``mmap``, which costs no
memory until written; the frame's size has already been checked against
the connection's and the process's budgets), but makes pages real only as
the bytes come: the first `FIRST_STEP_BYTES` once the frame's first bytes
are here, then steps that double with what has arrived, each at most
`MAX_STEP_BYTES`. A header announcing 1 GiB followed by a trickle costs a
few MiB. A reserved but untouched page is never counted in the RSS.

**Warm buffers** (`WarmBuffers`, a worker process's only): the page faults
of item 2 are paid again for every new value, although the memory of the
value received before it is often free by then. A worker process keeps the
memory of big frames it received, up to a cap, and receives the next big
frame into one that no value uses any more: its pages are real already, so
the transfer runs at the speed of the kernel's copy (W4 in
docs/performance.md). The cap bounds what it holds beyond its values; a
buffer unused for `WarmBuffers.idle_s` is given back, and so is every free
one when the worker's memory manager needs memory. Across machines a
production server would also let the NIC place bytes (io_uring, zero-copy
receive); that is beyond a teaching codebase.
"""

from __future__ import annotations

import mmap
import os
import socket
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

# Frames at least this large are received into a `FrameBuffer`; smaller
# ones into ordinary bytes (an mmap per small value would cost a system
# call each and could exhaust the process's map count, vm.max_map_count).
MAPPED_FRAME_BYTES = 1 << 20
# Memory made real once a big frame's first bytes have arrived, and the
# largest step after that (one populate call blocks the loop for its
# duration: 32 MiB take 5-10 ms here).
FIRST_STEP_BYTES = 4 << 20
MAX_STEP_BYTES = 32 << 20
_PAGE = mmap.PAGESIZE
# MADV_POPULATE_WRITE (Linux 5.14): fault a range in, writable, in one
# call. Python 3.11's mmap module does not name it.
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform.startswith("linux") else None)
# Turned off for the process at the first refusal (an older kernel).
_can_populate = _POPULATE_WRITE is not None
# At most this many buffers in one sendmsg call (Linux's IOV_MAX is 1024).
IOV_MAX = 1024


# Whether `send_frames` and `receive_some` call the kernel themselves on a
# plain TCP socket (see `receive_some`). POSIX only: on Windows a socket
# is not a file descriptor `os.read` accepts. Switched off only to measure
# what it saves (benchmarks/toggle_ab.py, ``direct-io``).
DIRECT_IO = os.name == "posix"

# Linux's TCP_CORK (absent elsewhere: no message is held there).
_TCP_CORK = getattr(socket, "TCP_CORK", None)


def set_cork(stream: trio.abc.Stream, on: bool) -> bool:
    """Cork (`on`) or uncork the TCP socket under `stream`; return whether
    it is corked now.

    A corked socket takes bytes into the kernel but sends no partial
    packet until it is uncorked (which sends everything at once) or 200 ms
    have passed (Linux's ceiling, tcp(7)). The bytes are the kernel's
    either way: if the process dies, they are sent as its socket closes.
    A stream that is not plain TCP (TLS, the simulator's), a platform
    without TCP_CORK, or a refusal leaves the socket as it is: False.
    """
    sock = raw_socket(stream)
    if _TCP_CORK is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 1 if on else 0)
    except OSError:  # closed meanwhile: whatever it held goes out as it closes
        return False
    return on


def raw_socket(stream: trio.abc.Stream) -> Any | None:
    """The Trio socket under `stream`, when it is a plain TCP stream.

    TLS streams (and the simulator's in-memory ones) have none: they are
    read and written through their own methods, with one copy more.
    """
    if isinstance(stream, trio.SocketStream):
        return stream.socket
    return None


class FrameBuffer:
    """`n` bytes of address space, filled as the frame's bytes arrive.

    Args:
        n: the frame's announced size (already checked against the budgets).
        initial: bytes of the frame already read (fewer than `n`).
        warm: the process's `WarmBuffers`: the frame is received into a
            free kept buffer if there is one, and its buffer is offered to
            be kept once complete (`frame`). None: a fresh buffer, not kept.

    Attributes:
        got: how many bytes have arrived so far.
    """

    __slots__ = ("n", "map", "got", "_ready", "_warm")

    def __init__(self, n: int, initial: bytes | bytearray | memoryview = b"", warm: WarmBuffers | None = None):
        self.n = n
        self._warm = warm
        recycled = warm.take(n) if warm is not None else None
        if recycled is not None:
            self.map, ready = recycled
        else:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
            self.map, ready = mmap.mmap(-1, n, flags=flags), 0
        self.got = 0
        # Invariant: got <= n, and bytes [0, _ready) may be touched. A
        # recycled buffer's pages are real already (_ready may pass n).
        self._ready = ready
        if initial:
            self.write(initial)

    @property
    def complete(self) -> bool:
        return self.got >= self.n

    def frame(self) -> Any:
        """The received frame, once complete: the buffer, or its first `n`
        bytes when it is a recycled one that is larger. Keeps it warm."""
        if self._warm is not None:
            self._warm.keep(self.map, max(self._ready, self.n))
        if len(self.map) == self.n:
            return self.map
        with memoryview(self.map) as whole:
            return whole[: self.n]

    def _grow(self) -> None:
        """Make the next step of pages real (see the module docstring)."""
        global _can_populate
        step = min(max(self._ready, FIRST_STEP_BYTES), MAX_STEP_BYTES)
        start, end = self._ready, min(self.n, self._ready + step)
        if _can_populate:
            try:
                self.map.madvise(_POPULATE_WRITE, start, end - start)
            except OSError:
                _can_populate = False
        self._ready = end

    def room(self) -> memoryview:
        """A view of where the next bytes go (release it after use)."""
        if self._ready <= self.got:
            self._grow()
        with memoryview(self.map) as whole:
            return whole[self.got : min(self._ready, self.n)]

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Copy `data` in (the path for streams without a raw socket)."""
        with memoryview(data) as view:
            view = view.cast("B") if view.ndim != 1 or view.itemsize != 1 else view
            taken = 0
            while taken < len(view):
                with self.room() as room:
                    k = min(len(room), len(view) - taken)
                    room[:k] = view[taken : taken + k]
                self.got += k
                taken += k

    async def receive(self, stream: trio.abc.Stream, max_bytes: int) -> int:
        """Read the next bytes of the frame from `stream`; return how many (0: EOF).

        With a raw socket the kernel writes into the buffer itself
        (``recv_into``); otherwise up to `max_bytes` are read and copied in.

        Cancellation: safe; a cancelled read consumes nothing.
        """
        sock = raw_socket(stream)
        if sock is None:
            chunk = await stream.receive_some(min(max_bytes, self.n - self.got))
            if chunk:
                self.write(chunk)
            return len(chunk)
        with self.room() as room:
            k = await sock.recv_into(room)
        self.got += k
        return k


@dataclass(eq=False)
class _Kept:
    map: mmap.mmap
    warm_bytes: int  # how much of it has real pages
    used_at: float  # when a frame was last received into it


class WarmBuffers:
    """Memory of big received frames, kept to receive the next ones into.

    A kept buffer is *free* when nothing but this pool refers to it: every
    view of an ``mmap`` (a NumPy array's, a memoryview slice's) holds a
    reference to it, so the reference count says, exactly, whether a value
    still lives in it (CPython's counts; a free buffer is one whose only
    reference is its `_Kept` entry). A free buffer of the right size is
    handed to the next big frame. Nothing else changes for a value: its
    memory is a buffer like any other until it is dropped.

    Off (`limit` 0) until `configure` turns it on: only a worker process
    does, and only for its own event loop's thread (a task's client, on a
    thread of its own, receives as before). A client or a scheduler rarely
    receives big values in a row, and a process that holds memory after its
    user dropped a value would be a surprise.
    """

    # A free buffer at most this much larger than a frame is used for it
    # (a quarter): values of similar sizes share buffers, a small value
    # does not take a huge one.
    SLACK = 0.25

    def __init__(self) -> None:
        self.limit = 0
        self.idle_s = 30.0
        self._kept: list[_Kept] = []
        self._now: Any = None
        self._thread: int | None = None
        self.reused = 0  # frames received into a kept buffer (a heartbeat reports it)

    def configure(self, limit: int, idle_s: float, now: Any) -> None:
        """Keep up to `limit` bytes of buffers (0: none), each at most `idle_s`
        seconds after its last frame, for frames received on this thread;
        `now()` reads the clock (Trio's, in a worker)."""
        self.limit, self.idle_s, self._now = limit, idle_s, now
        self._thread = threading.get_ident()
        if not limit:
            self.release()

    def _mine(self) -> bool:
        return bool(self.limit) and threading.get_ident() == self._thread

    @property
    def kept_bytes(self) -> int:
        """Bytes of buffers held, free or holding a value."""
        return sum(len(k.map) for k in self._kept)

    def free_bytes(self) -> int:
        """Bytes of buffers held that no value uses (memory held beyond values)."""
        return sum(len(k.map) for k in self._kept if _is_free(k))

    def take(self, n: int) -> tuple[mmap.mmap, int] | None:
        """A free buffer for a frame of `n` bytes and how much of it is warm,
        or None. The smallest that fits, and not more than `SLACK` too big."""
        if not self._mine():
            return None
        self.trim()
        best: _Kept | None = None
        for kept in self._kept:
            size = len(kept.map)
            if n <= size <= n * (1 + self.SLACK) and _is_free(kept) and (best is None or size < len(best.map)):
                best = kept
        if best is None:
            return None
        best.used_at = self._now()
        self.reused += 1
        return best.map, best.warm_bytes

    def keep(self, buffer: mmap.mmap, warm_bytes: int) -> None:
        """A big frame was received into `buffer`: keep it if there is room."""
        if not self._mine():
            return
        for kept in self._kept:
            if kept.map is buffer:
                kept.warm_bytes = max(kept.warm_bytes, min(warm_bytes, len(buffer)))
                kept.used_at = self._now()
                return
        self.trim()
        if self.kept_bytes + len(buffer) <= self.limit:
            self._kept.append(_Kept(buffer, min(warm_bytes, len(buffer)), self._now()))

    def trim(self) -> int:
        """Give back free buffers idle past `idle_s`; return the bytes given back."""
        if not self._kept:
            return 0
        horizon = self._now() - self.idle_s
        return self._give_back(lambda kept: kept.used_at < horizon)

    def release(self) -> int:
        """Give back every free buffer (the memory manager needs memory);
        return the bytes given back. Those still holding values stay kept."""
        return self._give_back(lambda kept: True)

    def _give_back(self, wanted: Any) -> int:
        given, still = 0, []
        for kept in self._kept:
            size = len(kept.map)
            if wanted(kept) and _is_free(kept):
                try:
                    kept.map.close()
                except BufferError:  # a view the count missed: keep it, never crash
                    still.append(kept)
                    continue
                given += size
            else:
                still.append(kept)
        self._kept = still
        return given


def _is_free(kept: _Kept) -> bool:
    # The entry's own reference, and getrefcount's argument.
    return sys.getrefcount(kept.map) <= 2


# The process's pool of warm buffers: off until a worker process turns it on.
WARM = WarmBuffers()


async def send_frames(stream: trio.abc.Stream, frames: Sequence[Any], large: int) -> None:
    """Write `frames` in order: small ones joined, large ones (>= `large`
    bytes) from their own memory.

    On a raw socket, one ``sendmsg`` takes the lot (scatter/gather I/O), and
    a partial send resumes from where the kernel stopped; a batch of small
    frames only, joined, is one ``write`` that returns without a checkpoint
    when the kernel takes it at once (`receive_some` says why that is safe
    and what it saves). Elsewhere each large frame is its own ``send_all``
    and the small ones between are joined.

    Cancellation: a write cut short leaves the stream unusable (the caller,
    `Connection.run_sender`, closes the connection).
    """
    pieces: list[Any] = []
    pending: list[Any] = []
    for frame in frames:
        if memoryview(frame).nbytes >= large:
            if pending:
                pieces.append(b"".join(pending))
                pending = []
            pieces.append(frame)
        else:
            pending.append(frame)
    if pending:
        pieces.append(b"".join(pending) if len(pending) > 1 else pending[0])
    sock = raw_socket(stream)
    if sock is not None and DIRECT_IO and len(pieces) == 1:
        with _bytes_view(pieces[0]) as view:
            await _write_all(sock, view)
        return
    if sock is None or len(pieces) == 1:
        for piece in pieces:
            with _bytes_view(piece) as view:
                await stream.send_all(view)
        return
    views = [_bytes_view(p) for p in pieces]
    try:
        while views:
            sent = await sock.sendmsg(views[:IOV_MAX])
            while sent:
                first = views[0]
                if sent >= len(first):
                    sent -= len(first)
                    views.pop(0).release()
                else:
                    views[0] = first[sent:]
                    first.release()
                    sent = 0
    finally:
        for view in views:
            view.release()


async def _write_all(sock: Any, view: memoryview) -> None:
    """All of `view` to the socket, waiting only while the kernel's buffer is full."""
    written = 0
    while written < len(view):
        try:
            written += os.write(_open_fileno(sock), view[written:])
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def receive_some(stream: trio.abc.Stream, max_bytes: int, try_first: bool = True) -> bytes:
    """Up to `max_bytes` from `stream`, at least one; ``b""`` at its end.

    On a plain TCP socket this calls the kernel itself (``read`` on the
    socket's descriptor, which Trio keeps non-blocking) and waits with
    ``wait_readable`` only when nothing is there: the same system calls
    and the same checkpoints as ``SocketStream.receive_some``, without
    the layers around them (a conflict detector, an error translation,
    a generic try-then-wait helper), which cost several microseconds a
    call, and a short task makes a dozen such calls in all its processes
    (docs/performance.md, W2). `send_frames` does the same for writes and
    drops the checkpoint Trio takes after a write the kernel accepted at
    once: its caller, `Connection.run_sender`, checkpoints when it waits
    for the next message, and after the write when more are queued.

    With `try_first` false it waits before it reads, as Trio does not:
    for a caller that knows the socket was just drained (`Connection`'s
    reads, `WAIT_AFTER_SHORT_READ`), a read tried first would fail.

    Errors stay ``OSError`` (where Trio would say
    ``BrokenResourceError``); a socket closed under us is
    ``trio.ClosedResourceError`` either way.
    """
    sock = raw_socket(stream)
    if sock is None or not DIRECT_IO:
        return await stream.receive_some(max_bytes)
    if try_first:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            data = os.read(_open_fileno(sock), max_bytes)
        except BlockingIOError:
            pass
        else:
            # Bytes were waiting: yield once anyway, so a peer that keeps this
            # socket full cannot keep the reader from letting others run.
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return os.read(_open_fileno(sock), max_bytes)
        except BlockingIOError:  # a spurious wake-up: wait again
            pass


def writes_directly(stream: trio.abc.Stream) -> bool:
    """Whether `send_frames` and `write_now` write `stream`'s socket
    descriptor themselves (a plain socket, with `DIRECT_IO` on)."""
    return DIRECT_IO and raw_socket(stream) is not None


def write_now(stream: trio.abc.Stream, data: memoryview) -> int | None:
    """Write what the kernel takes of `data` at once, without waiting.

    Returns how many bytes it took (0 if its buffer is full), or None when
    `stream` is not a plain socket written directly (TLS, the simulator's
    streams): those are written only by their sender task. No checkpoint
    and no await, so a handler that queued messages can write them before
    it returns (`Connection`'s write-through says why).

    Raises:
        OSError: the write failed (the peer reset the connection, say).
        trio.ClosedResourceError: the socket was closed under us.
    """
    sock = raw_socket(stream)
    if sock is None or not DIRECT_IO:
        return None
    try:
        return os.write(_open_fileno(sock), data)
    except BlockingIOError:
        return 0


def _open_fileno(sock: Any) -> int:
    fd = sock.fileno()
    if fd == -1:
        raise trio.ClosedResourceError("the socket was closed")
    return fd


def _bytes_view(data: Any) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        return view.cast("B")
    return view
