"""The bytes on the wire: batches of msgpack messages plus raw buffer frames.

A *batch* is what one write carries::

    u32  n_frames                       (little-endian)
    u64  length of each frame           (n_frames of them)
    frame 0: a msgpack array of messages (each a map with an "op")
    frame 1..: the buffers of every `Serialized` value, in message order

A `Serialized` value inside a message is a msgpack extension (code 1) whose
payload is the number of buffer frames it owns: the pickle stream first,
then its out-of-band buffers. Frames are claimed in the order the values
appear, which is the order msgpack decodes them, so messages can be encoded
one at a time (when they are sent) and concatenated into a batch later.

Every length is checked against `FrameLimits` *before* anything is
allocated, and msgpack's own size limits are applied while decoding; a
violation raises `ProtocolError`, and the caller closes that one connection.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from typing import Any

import msgpack

from trioflow.comm.serialize import Serialized
from trioflow.errors import ProtocolError

EXT_SERIALIZED = 1
_U32 = struct.Struct("<I")
_EXT_PAYLOAD = struct.Struct("<I")


@dataclasses.dataclass(frozen=True)
class FrameLimits:
    """What a peer may send us (see `trioflow.Config`)."""

    max_frame_bytes: int = 1 << 30
    max_frames: int = 65_536
    max_items: int = 1_000_000

    @classmethod
    def from_config(cls, config) -> FrameLimits:
        return cls(config.max_frame_bytes, config.max_frames_per_batch, config.max_messages_per_batch)


class EncodedMessage:
    """One message, packed: its msgpack bytes and the frames it refers to."""

    __slots__ = ("body", "frames", "nbytes")

    def __init__(self, body: bytes, frames: list[Any]):
        self.body = body
        self.frames = frames
        self.nbytes = len(body) + sum(memoryview(f).nbytes for f in frames)


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
        raise TypeError(f"cannot send a {type(obj).__name__} in a message")

    return EncodedMessage(msgpack.packb(message, default=default, use_bin_type=True), frames)


def batch_frames(messages: Sequence[EncodedMessage]) -> list[Any]:
    """The frames of a batch (header first) for `messages`, in order."""
    body = b"".join([_array_header(len(messages)), *(m.body for m in messages)])
    frames: list[Any] = [body]
    for m in messages:
        frames.extend(m.frames)
    lengths = [memoryview(f).nbytes for f in frames]
    header = _U32.pack(len(frames)) + struct.pack(f"<{len(frames)}Q", *lengths)
    return [header, *frames]


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def check_frame_count(n_frames: int, limits: FrameLimits) -> None:
    if n_frames == 0 or n_frames > limits.max_frames:
        raise ProtocolError(f"batch announces {n_frames} frames (limit {limits.max_frames})")


def check_frame_lengths(lengths: Sequence[int], limits: FrameLimits) -> None:
    for length in lengths:
        if length > limits.max_frame_bytes:
            raise ProtocolError(
                f"frame of {length} bytes exceeds max_frame_bytes={limits.max_frame_bytes}"
            )


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

    try:
        messages = msgpack.unpackb(
            frames[0],
            ext_hook=ext_hook,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_frame_bytes,
            max_bin_len=limits.max_frame_bytes,
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
