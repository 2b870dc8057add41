"""The bytes on the wire: batches of msgpack messages plus raw buffer frames.

A *batch* is what one write carries::

    u32  n_frames                       (little-endian)
    u64  length of each frame           (n_frames of them; bit 63: "continued")
    frame 0: a msgpack array of messages (each a map with an "op")
    frame 1..: the buffers of every `Serialized` value, in message order

A buffer larger than the peer's `max_frame_bytes` travels as several
frames: every piece but the last has bit 63 of its length set
(`CONTINUED`), and the receiver reads the pieces, which follow each other
on the wire, into one buffer (`frame_groups`, then
`Connection._read_frame`). So a value of several GiB travels with no frame
above the limit and arrives as one buffer, never two copies.

A `Serialized` value inside a message is a msgpack extension (code 1) whose
payload is the number of buffer frames it owns: the pickle stream first,
then its out-of-band buffers. Frames are claimed in the order the values
appear, which is the order msgpack decodes them, so messages can be encoded
one at a time (when they are sent) and concatenated into a batch later.

Every length is checked against `FrameLimits` *before* anything is
allocated, and decoding is bounded in size, count and nesting (design.md §6
rule 3):

* size: frame 0, the msgpack body, has a small limit of its own
  (`max_body_bytes`, a few MiB), apart from the buffer frames that carry
  values (`max_frame_bytes`);
* count: msgpack arrays and maps hold at most `max_items` entries, and a
  body may create at most one container per `BODY_BYTES_PER_CONTAINER`
  bytes. Without that bound, 12 MB of ``0x90`` bytes decode to twelve
  million empty lists (about 870 MB, and seconds of a frozen event loop);
* nesting: msgpack's own decoder refuses nesting deeper than its fixed
  stack, and every message is checked against its declaration afterwards.

A violation raises `ProtocolError`, and the caller closes that one
connection.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Sequence
from typing import Any

import msgpack

from trioflow.comm.schema import Record
from trioflow.comm.serialize import Serialized
from trioflow.errors import ProtocolError

EXT_SERIALIZED = 1
# Bit 63 of a frame's length: the next frame continues the same buffer.
CONTINUED = 1 << 63
_U32 = struct.Struct("<I")
_EXT_PAYLOAD = struct.Struct("<I")
# A legitimate message spends at least this many body bytes per list or map
# it holds (the messages of docs/protocol.md spend 40 or more: every list or
# map is a field, whose name alone takes a few bytes), so a body may hold at
# most one container per this many bytes: 4 MiB then decode to at most a
# quarter of a million containers (under 20 MB, tens of milliseconds),
# whatever the bytes are.
BODY_BYTES_PER_CONTAINER = 16
# Before the hello nothing but a small hello may arrive: one frame of this
# many bytes at most (design.md §6 rule 1).
HELLO_BODY_BYTES = 16 * 1024


@dataclasses.dataclass(frozen=True)
class FrameLimits:
    """What a peer may send us in one batch (see the `trioflow.Config` fields).

    Args:
        max_frame_bytes: largest buffer frame (a value's bytes).
        max_body_bytes: largest frame 0 (the msgpack body of the messages).
        max_frames: most frames in one batch.
        max_items: most entries in one msgpack array or map.
        max_batch_bytes: most bytes one batch may announce in all; also
            the connection's budget of bytes in flight.
    """

    max_frame_bytes: int = 1 << 30
    max_body_bytes: int = 4 << 20
    max_frames: int = 65_536
    max_items: int = 1_000_000
    max_batch_bytes: int = 4 << 30

    @classmethod
    def from_config(cls, config) -> FrameLimits:
        return cls(
            max_frame_bytes=config.max_frame_bytes,
            max_body_bytes=config.max_body_bytes,
            max_frames=config.max_frames_per_batch,
            max_items=config.max_messages_per_batch,
            # A batch larger than the whole process's budget could never be
            # read either: the smaller of the two bounds a batch.
            max_batch_bytes=min(config.max_connection_bytes, config.max_process_bytes),
        )

    @classmethod
    def before_hello(cls) -> FrameLimits:
        """The tiny limits of a connection whose peer has not said hello."""
        return cls(
            max_frame_bytes=0,
            max_body_bytes=HELLO_BODY_BYTES,
            max_frames=1,
            max_items=64,
            max_batch_bytes=HELLO_BODY_BYTES,
        )


# Room kept in a batch for everything but one big value (the message body,
# the batch header, a pickle stream) when a value is sized against a peer's
# budget.
VALUE_HEADROOM_BYTES = 1 << 20


def max_value_bytes(limits: FrameLimits) -> int:
    """The largest value that can travel to a peer with these limits."""
    return max(0, limits.max_batch_bytes - VALUE_HEADROOM_BYTES)


def too_big(what: str, nbytes: int, limits: FrameLimits, verb: str = "is") -> str:
    """The error for a value that cannot travel: what it is, its size, the bound."""
    return (
        f"{what} {verb} {nbytes:,} bytes ({nbytes / 2**30:.2f} GiB), more than a peer accepts in one "
        f"message: at most {max_value_bytes(limits):,} bytes (max_connection_bytes and "
        f"max_process_bytes={limits.max_batch_bytes:,}, less {VALUE_HEADROOM_BYTES:,} for the message)"
    )


class EncodedMessage:
    """One message, packed: its msgpack bytes and the frames it refers to.

    `held`: the message may wait in the kernel for the sender's next write
    (`Message.HELD`; `Connection`, "Held messages").
    """

    __slots__ = ("body", "frames", "nbytes", "held")

    def __init__(self, body: bytes, frames: list[Any]):
        self.body = body
        self.frames = frames
        self.nbytes = len(body) + sum(memoryview(f).nbytes for f in frames)
        self.held = False


def encode_message(message: dict) -> EncodedMessage:
    """Pack one message; raises TypeError naming a value that cannot travel."""
    frames: list[Any] = []

    def default(obj: Any) -> Any:
        if isinstance(obj, Serialized):
            frames.append(obj.header)
            frames.extend(obj.buffers)
            return msgpack.ExtType(EXT_SERIALIZED, _EXT_PAYLOAD.pack(1 + len(obj.buffers)))
        if isinstance(obj, (set, frozenset)):
            return sorted(obj)
        if isinstance(obj, Record):
            return obj.wire_fields()
        raise TypeError(f"cannot send a {type(obj).__name__} in a message")

    return EncodedMessage(msgpack.packb(message, default=default, use_bin_type=True), frames)


def batch_frames(messages: Sequence[EncodedMessage], max_frame_bytes: float = math.inf) -> list[Any]:
    """The frames of a batch (header first) for `messages`, in order.

    A buffer larger than `max_frame_bytes` (the peer's limit) is cut into
    pieces of at most that size, memoryviews of the buffer (no copy); every
    piece but the last is marked `CONTINUED` in the header.
    """
    body = b"".join([_array_header(len(messages)), *(m.body for m in messages)])
    frames: list[Any] = [body]
    lengths = [len(body)]
    for m in messages:
        for frame in m.frames:
            view = memoryview(frame)
            n = view.nbytes
            if n <= max_frame_bytes:
                frames.append(frame)
                lengths.append(n)
                continue
            piece = int(max_frame_bytes)
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            for start in range(0, n, piece):
                frames.append(view[start : start + piece])
                size = min(piece, n - start)
                lengths.append(size | CONTINUED if start + piece < n else size)
    header = _U32.pack(len(frames)) + struct.pack(f"<{len(frames)}Q", *lengths)
    return [header, *frames]


def frame_count(message: EncodedMessage, max_frame_bytes: float) -> int:
    """How many frames `message`'s buffers take once cut to `max_frame_bytes`."""
    if message.nbytes <= max_frame_bytes:
        return len(message.frames)
    count = 0
    for frame in message.frames:
        n = memoryview(frame).nbytes
        count += max(1, -(-n // max_frame_bytes)) if n > max_frame_bytes else 1
    return int(count)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def check_frame_count(n_frames: int, limits: FrameLimits) -> None:
    if n_frames == 0 or n_frames > limits.max_frames:
        raise ProtocolError(f"batch announces {n_frames} frames (limit {limits.max_frames})")


def check_frame_lengths(lengths: Sequence[int], limits: FrameLimits) -> int:
    """Check a batch's announced frame lengths; return their total.

    Raises:
        ProtocolError: a frame or the whole batch is larger than allowed.
    """
    return frame_groups(lengths, limits)[1]


def frame_groups(lengths: Sequence[int], limits: FrameLimits) -> tuple[list[int], int]:
    """The buffers a batch's announced frames make, and the batch's total bytes.

    Frames marked `CONTINUED` join the frame after them into one buffer:
    ``[body, 10 | CONTINUED, 10 | CONTINUED, 5, 7]`` is a body, a buffer of
    25 bytes and one of 7. Every frame must be within `max_frame_bytes` and
    the whole batch within the connection's budget (`max_batch_bytes`),
    checked here, before anything is allocated.

    Raises:
        ProtocolError: the body is too large (or marked continued), a frame
            is larger than allowed, the last frame is marked continued, or
            the batch is larger than the connection's budget.
    """
    # (A body marked continued announces 2**63 bytes or more: refused here.)
    if lengths[0] > limits.max_body_bytes:
        raise ProtocolError(
            f"message body of {lengths[0]} bytes exceeds max_body_bytes={limits.max_body_bytes}"
        )
    groups = [lengths[0]]
    total = lengths[0]
    joined = 0
    continued = False
    for announced in lengths[1:]:
        continued = bool(announced & CONTINUED)
        length = announced & ~CONTINUED
        if length > limits.max_frame_bytes:
            raise ProtocolError(
                f"frame of {length} bytes exceeds max_frame_bytes={limits.max_frame_bytes}"
            )
        total += length
        joined += length
        if not continued:
            groups.append(joined)
            joined = 0
    if continued:
        raise ProtocolError("the batch's last frame is marked as continued")
    if total > limits.max_batch_bytes:
        raise ProtocolError(
            f"batch of {total} bytes exceeds the connection's budget of {limits.max_batch_bytes} bytes "
            f"(max_connection_bytes)"
        )
    return groups, total


def decode_batch(frames: Sequence[Any], limits: FrameLimits) -> list[dict]:
    """The messages of a batch whose frames have all been read.

    Raises:
        ProtocolError: the bytes are not a valid batch (with the reason).
    """
    next_frame = 1

    def ext_hook(code: int, data: bytes) -> Any:
        nonlocal next_frame
        if code != EXT_SERIALIZED or len(data) != _EXT_PAYLOAD.size:
            raise ProtocolError(f"unknown msgpack extension type {code}")
        (count,) = _EXT_PAYLOAD.unpack(data)
        if count < 1 or next_frame + count > len(frames):
            raise ProtocolError("a serialized value refers to frames the batch does not have")
        value = Serialized(frames[next_frame], frames[next_frame + 1 : next_frame + count])
        next_frame += count
        return value

    containers_left = len(frames[0]) // BODY_BYTES_PER_CONTAINER + 64

    def count_container(container: Any) -> Any:
        nonlocal containers_left
        containers_left -= 1
        if containers_left < 0:
            raise ProtocolError(
                f"message body of {len(frames[0])} bytes holds more than one list or map per "
                f"{BODY_BYTES_PER_CONTAINER} bytes (a decoding bomb?)"
            )
        return container

    try:
        messages = msgpack.unpackb(
            frames[0],
            ext_hook=ext_hook,
            list_hook=count_container,
            object_hook=count_container,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_body_bytes,
            max_bin_len=limits.max_body_bytes,
            max_array_len=limits.max_items,
            max_map_len=limits.max_items,
            max_ext_len=_EXT_PAYLOAD.size,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several types for bad bytes
        raise ProtocolError(f"undecodable batch: {type(exc).__name__}: {exc}") from None
    if not isinstance(messages, list):
        raise ProtocolError(f"a batch must be a msgpack array, got {type(messages).__name__}")
    if next_frame != len(frames):
        raise ProtocolError(f"batch has {len(frames) - next_frame} frames no message refers to")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            raise ProtocolError(f"a message must be a map with a string 'op', got {message!r:.100}")
    return messages
