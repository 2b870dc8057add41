"""The batch format: encode/decode round trips, a Hypothesis property, malformed input."""

from __future__ import annotations

import re
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trioflow.comm.frames import (
    CONTINUED,
    EXT_SERIALIZED,
    FrameLimits,
    batch_frames,
    check_frame_count,
    check_frame_lengths,
    decode_batch,
    encode_message,
    frame_count,
    frame_groups,
)
from trioflow.comm.serialize import Serialized, dumps, loads
from trioflow.errors import ProtocolError

LIMITS = FrameLimits(max_frame_bytes=1 << 20, max_frames=64, max_items=1000)
# A body (frame 0) of 60 bytes, buffer frames of 100, 250 bytes in all.
TINY = FrameLimits(max_frame_bytes=100, max_body_bytes=60, max_frames=4, max_items=8, max_batch_bytes=250)


def round_trip(messages: list[dict], limits: FrameLimits = LIMITS) -> list[dict]:
    """encode each message, batch them, check the header, decode the frames."""
    header, *frames = batch_frames([encode_message(m) for m in messages])
    (n_frames,) = struct.unpack_from("<I", header)
    lengths = struct.unpack_from(f"<{n_frames}Q", header, 4)
    assert len(header) == 4 + 8 * n_frames
    assert list(lengths) == [memoryview(f).nbytes for f in frames]
    check_frame_count(n_frames, limits)
    check_frame_lengths(lengths, limits)
    return decode_batch(frames, limits)


# ------------------------------------------------------------ table-driven --

ROUND_TRIPS = [
    pytest.param([], id="empty-batch"),
    pytest.param([{"op": "ping"}], id="one-message"),
    pytest.param([{"op": "a", "n": i} for i in range(20)], id="twenty-messages-array16"),
    pytest.param(
        [{"op": "types", "i": -(2**63), "u": 2**64 - 1, "f": 1.5, "s": "é", "b": b"\x00", "n": None,
          "t": True, "l": [1, [2, []]], "m": {"k": {"j": []}}}],
        id="all-msgpack-types",
    ),
    pytest.param([{"op": "data", "value": Serialized(b"pickle")}], id="serialized-no-buffers"),
    pytest.param(
        [{"op": "data", "value": Serialized(b"h", [b"b1", bytearray(b"b2"), memoryview(b"b3")])}],
        id="serialized-with-buffers",
    ),
    pytest.param(
        [
            {"op": "x", "args": [Serialized(b"1"), {"k": Serialized(b"2", [b"2a"])}]},
            {"op": "y"},
            {"op": "z", "v": Serialized(b"3", [b"3a", b"3b"])},
        ],
        id="serialized-across-messages",
    ),
    pytest.param([{"op": "empty-frames", "v": Serialized(b"", [b""])}], id="zero-length-frames"),
]


@pytest.mark.parametrize("messages", ROUND_TRIPS)
def test_batches_round_trip(messages):
    """A batch of messages decodes to exactly the messages that were encoded."""
    assert round_trip(messages) == messages


def test_sets_travel_as_sorted_lists():
    """Sets are sent as sorted lists (so the bytes do not depend on hashing)."""
    assert round_trip([{"op": "s", "keys": {"b", "c", "a"}}]) == [{"op": "s", "keys": ["a", "b", "c"]}]


def test_tuples_arrive_as_lists():
    """msgpack has one sequence type: tuples arrive as lists."""
    assert round_trip([{"op": "t", "v": (1, (2, 3))}]) == [{"op": "t", "v": [1, [2, 3]]}]


def test_serialized_buffers_are_frames_not_copies_in_the_body():
    """A Serialized's header and buffers become frames of their own, in order."""
    array_bytes = bytes(range(256)) * 100
    value = Serialized(b"head", [array_bytes])
    header, body, *rest = batch_frames([encode_message({"op": "d", "v": value})])
    assert len(body) < 50
    assert rest == [b"head", array_bytes]
    assert rest[1] is array_bytes  # passed through, not copied


def test_numpy_value_round_trips_through_a_batch():
    """A pickled array with an out-of-band buffer survives encode and decode."""
    array = np.arange(10_000)
    [message] = round_trip([{"op": "result", "value": dumps(array)}])
    assert np.array_equal(loads(message["value"]), array)


@pytest.mark.parametrize(
    "value, type_name",
    [
        pytest.param(object(), "object", id="object"),
        pytest.param(2**64, "int", id="int-too-big"),
        pytest.param(1j, "complex", id="complex"),
    ],
)
def test_values_msgpack_cannot_carry_raise_type_error(value, type_name):
    """encode_message raises TypeError naming the type of a value that cannot travel."""
    with pytest.raises(TypeError, match=f"cannot send a {type_name}"):
        encode_message({"op": "x", "v": [value]})


# ------------------------------------------------------------ the property --

# Map keys are strings (decode_batch requires it); ints stay in msgpack's range;
# NaN is left out only because NaN != NaN would defeat the equality check.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
serialized_values = st.builds(
    Serialized, st.binary(max_size=20), st.lists(st.binary(max_size=20), max_size=3)
)
keys = st.text(min_size=1, max_size=6)
values = st.recursive(
    scalars | serialized_values,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3),
    max_leaves=8,
)
messages = st.builds(
    lambda op, fields: {**fields, "op": op},
    st.text(max_size=10),
    st.dictionaries(keys, values, max_size=4),
)


def serialized_in_order(value) -> list[Serialized]:
    """The Serialized values inside `value`, in msgpack's (depth-first) order."""
    if isinstance(value, Serialized):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in serialized_in_order(v)]
    if isinstance(value, list):
        return [s for v in value for s in serialized_in_order(v)]
    return []


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages, max_size=4))
def test_property_any_batch_round_trips_exactly(batch):
    """Arbitrary messages with Serialized values anywhere round-trip, frames claimed in order."""
    header, *frames = batch_frames([encode_message(m) for m in batch])
    decoded = decode_batch(frames, LIMITS)
    assert decoded == batch
    # Each decoded Serialized is built from the very frames, in order.
    expected_frames = [f for s in serialized_in_order(batch) for f in (s.header, *s.buffers)]
    decoded_frames = [f for s in serialized_in_order(decoded) for f in (s.header, *s.buffers)]
    assert len(decoded_frames) == len(frames) - 1
    assert all(d is f for d, f in zip(decoded_frames, frames[1:], strict=True))
    assert [bytes(f) for f in decoded_frames] == [bytes(f) for f in expected_frames]


# ---------------------------------------------------------- malformed input --


def body(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def serialized_ext(n_frames: int) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_SERIALIZED, struct.pack("<I", n_frames))


MALFORMED_BATCHES = [
    pytest.param([b"\xc1"], "undecodable batch", id="never-used-byte"),
    pytest.param([b"\x92\x81"], "undecodable batch", id="truncated"),
    pytest.param([body([{"op": "x"}]) + b"\x00"], "undecodable batch", id="trailing-bytes"),
    pytest.param([b""], "undecodable batch", id="empty-body"),
    pytest.param([body({"op": "x"})], "must be a msgpack array", id="map-not-array"),
    pytest.param([body("hello")], "must be a msgpack array", id="string-not-array"),
    pytest.param([body([1])], "must be a map with a string 'op'", id="message-not-map"),
    pytest.param([body([["op", "x"]])], "must be a map with a string 'op'", id="message-is-list"),
    pytest.param([body([{"no": "op"}])], "must be a map with a string 'op'", id="missing-op"),
    pytest.param([body([{"op": 7}])], "must be a map with a string 'op'", id="op-not-string"),
    pytest.param([body([{"op": b"x"}])], "must be a map with a string 'op'", id="op-is-bytes"),
    pytest.param([body([{"op": "x", 1: 2}])], "undecodable batch", id="int-map-key"),
    pytest.param(
        [body([{"op": "x", "v": msgpack.ExtType(5, b"\0\0\0\0")}])],
        "unknown msgpack extension type 5",
        id="unknown-ext",
    ),
    pytest.param(
        [body([{"op": "x", "v": msgpack.ExtType(EXT_SERIALIZED, b"\x01")}])],
        "unknown msgpack extension type 1",
        id="ext-bad-payload-size",
    ),
    pytest.param(
        [body([{"op": "x", "v": msgpack.ExtType(EXT_SERIALIZED, b"\0" * 64)}])],
        "undecodable batch",
        id="ext-payload-too-long",
    ),
    pytest.param(
        [body([{"op": "x", "v": serialized_ext(3)}]), b"only-one"],
        "refers to frames the batch does not have",
        id="ext-beyond-frames",
    ),
    pytest.param(
        [body([{"op": "x", "v": serialized_ext(0)}]), b"f"],
        "refers to frames the batch does not have",
        id="ext-claims-zero-frames",
    ),
    pytest.param(
        [body([{"op": "x", "a": serialized_ext(1), "b": serialized_ext(1)}]), b"f"],
        "refers to frames the batch does not have",
        id="two-values-one-frame",
    ),
    pytest.param(
        [body([{"op": "x"}]), b"stray"],
        "1 frames no message refers to",
        id="unclaimed-frame",
    ),
    pytest.param(
        [body([{"op": "x", "v": serialized_ext(1)}]), b"a", b"b", b"c"],
        "2 frames no message refers to",
        id="unclaimed-after-claimed",
    ),
    pytest.param([body([{"op": "x"}] * 9)], "undecodable batch", id="too-many-messages"),
    pytest.param([body([{"op": "x", "v": list(range(9))}])], "undecodable batch", id="array-too-long"),
    pytest.param(
        [body([{"op": "x", "m": {str(i): i for i in range(9)}}])], "undecodable batch", id="map-too-long"
    ),
]


@pytest.mark.parametrize("frames, reason", MALFORMED_BATCHES)
def test_malformed_batches_raise_protocol_error(frames, reason):
    """Each kind of malformed batch raises ProtocolError saying what is wrong."""
    with pytest.raises(ProtocolError, match=reason):
        decode_batch(frames, TINY)


@pytest.mark.parametrize("n_frames", [0, TINY.max_frames + 1, 2**32 - 1])
def test_frame_count_out_of_range_raises(n_frames):
    """A batch announcing no frames, or more than max_frames, is rejected."""
    with pytest.raises(ProtocolError, match=f"announces {n_frames} frames"):
        check_frame_count(n_frames, TINY)


@pytest.mark.parametrize("n_frames", [1, TINY.max_frames])
def test_frame_count_in_range_passes(n_frames):
    """Frame counts from one up to max_frames are accepted."""
    assert check_frame_count(n_frames, TINY) is None


@pytest.mark.parametrize(
    "lengths, reason",
    [
        pytest.param([TINY.max_body_bytes + 1], "message body of 61 bytes exceeds max_body_bytes=60", id="body"),
        pytest.param([2**64 - 1], "exceeds max_body_bytes=60", id="body-of-2**64-1"),
        pytest.param(
            [TINY.max_body_bytes + 1, 0], "exceeds max_body_bytes=60", id="body-over-its-limit-under-the-frames"
        ),
        pytest.param([0, 1, 2**40], "frame of 1099511627776 bytes exceeds max_frame_bytes=100", id="buffer"),
        pytest.param([0, TINY.max_frame_bytes + 1], "exceeds max_frame_bytes=100", id="buffer-just-over"),
        pytest.param(
            [60, 100, 91], "batch of 251 bytes exceeds the connection's budget of 250 bytes (max_connection_bytes)",
            id="batch",
        ),
    ],
)
def test_oversized_frame_length_raises(lengths, reason):
    """A body over max_body_bytes, a buffer over max_frame_bytes, or a batch over max_batch_bytes is invalid."""
    with pytest.raises(ProtocolError, match=re.escape(reason)):
        check_frame_lengths(lengths, TINY)


@pytest.mark.parametrize(
    "lengths",
    [
        pytest.param([TINY.max_body_bytes], id="body-at-its-limit"),
        pytest.param([0, TINY.max_frame_bytes], id="empty-body-and-buffer-at-its-limit"),
        pytest.param([50, 100, 100], id="batch-at-its-limit"),
    ],
)
def test_frame_lengths_at_the_limit_pass_and_give_the_total(lengths):
    """Frames of exactly their limit (and empty ones) are accepted; the batch's total is returned."""
    assert check_frame_lengths(lengths, TINY) == sum(lengths)


# ------------------------------------------- buffers cut into several frames --


def split_round_trip(messages: list[dict], limits: FrameLimits) -> tuple[list[int], list[dict]]:
    """Batch with buffers cut to the limit; join the pieces as a receiver does; decode."""
    header, *frames = batch_frames([encode_message(m) for m in messages], limits.max_frame_bytes)
    (n_frames,) = struct.unpack_from("<I", header)
    lengths = list(struct.unpack_from(f"<{n_frames}Q", header, 4))
    check_frame_count(n_frames, limits)
    groups, total = frame_groups(lengths, limits)
    wire = b"".join(bytes(f) for f in frames)
    assert total == len(wire)
    joined, offset = [], 0
    for n in groups:
        joined.append(wire[offset : offset + n])
        offset += n
    return lengths, decode_batch(joined, limits)


@pytest.mark.parametrize(
    "value, expected_lengths",
    [
        pytest.param(Serialized(b"h", [b"x" * 250]), [100 | CONTINUED, 100 | CONTINUED, 50], id="buffer-in-three"),
        pytest.param(Serialized(b"h", [b"x" * 200]), [100 | CONTINUED, 100], id="buffer-of-exactly-two"),
        pytest.param(Serialized(b"p" * 101), [100 | CONTINUED, 1], id="pickle-stream-in-two"),
        pytest.param(Serialized(b"h", [b"x" * 100]), [100], id="buffer-at-the-limit-is-not-cut"),
    ],
)
def test_a_buffer_larger_than_max_frame_bytes_is_cut_and_joined_again(value, expected_lengths):
    """A buffer over max_frame_bytes travels as pieces within the limit, marked CONTINUED but the last, and joins back."""
    limits = FrameLimits(max_frame_bytes=100, max_body_bytes=60, max_frames=8, max_items=8, max_batch_bytes=1000)
    lengths, [message] = split_round_trip([{"op": "v", "value": value}], limits)
    assert lengths[1 + (len(value.buffers) > 0) :] == expected_lengths  # after the body (and a small header)
    assert all(n & ~CONTINUED <= limits.max_frame_bytes for n in lengths[1:])
    assert message["value"] == value


def test_pieces_are_views_of_the_buffer_not_copies():
    """Cutting a buffer into frames copies nothing: each piece is a view into the original."""
    array = np.arange(1000, dtype=np.float64)
    value = dumps(array)
    _, *frames = batch_frames([encode_message({"op": "v", "value": value})], max_frame_bytes=1024)
    pieces = frames[2:]  # after the body and the pickle stream
    assert len(pieces) == 8 and sum(memoryview(p).nbytes for p in pieces) == array.nbytes
    assert all(np.shares_memory(np.frombuffer(p, dtype=np.uint8), array) for p in pieces)


def test_a_numpy_value_cut_into_frames_round_trips():
    """A NumPy array larger than max_frame_bytes arrives equal, from one joined buffer."""
    array = np.random.default_rng(1).random((64, 33))
    limits = FrameLimits(max_frame_bytes=1000, max_frames=64, max_batch_bytes=1 << 20)
    _, [message] = split_round_trip([{"op": "v", "value": dumps(array)}], limits)
    [buffer] = message["value"].buffers
    assert memoryview(buffer).nbytes == array.nbytes
    assert np.array_equal(loads(message["value"]), array)


def test_frame_count_counts_the_pieces():
    """A message's frame count includes every piece its big buffers are cut into."""
    message = encode_message({"op": "v", "value": Serialized(b"h", [b"x" * 250, b"y"])})
    assert frame_count(message, 100) == 1 + 3 + 1
    assert frame_count(message, 1000) == 3


@pytest.mark.parametrize(
    "lengths, reason",
    [
        pytest.param([0, 50 | CONTINUED], "last frame is marked as continued", id="last-continued"),
        pytest.param([0, 101 | CONTINUED, 5], "frame of 101 bytes exceeds max_frame_bytes=100", id="piece-over-the-limit"),
        pytest.param([60 | CONTINUED, 5], "exceeds max_body_bytes=60", id="body-continued"),
        pytest.param(
            [0, 100 | CONTINUED, 100 | CONTINUED, 51],
            "batch of 251 bytes exceeds the connection's budget of 250 bytes",
            id="joined-over-the-budget",
        ),
    ],
)
def test_malformed_or_oversized_pieces_raise(lengths, reason):
    """Pieces are checked one by one against max_frame_bytes, and all together against the budget."""
    with pytest.raises(ProtocolError, match=re.escape(reason)):
        frame_groups(lengths, TINY)


def test_frame_groups_joins_continued_frames():
    """Continued frames join the frame after them; the total counts every byte."""
    lengths = [7, 100 | CONTINUED, 100 | CONTINUED, 3, 9, 0]
    assert frame_groups(lengths, FrameLimits(max_frame_bytes=100, max_body_bytes=60, max_frames=8)) == (
        [7, 203, 9, 0],
        219,
    )


def test_the_body_limit_is_apart_from_the_buffer_limit():
    """A buffer frame may be larger than max_body_bytes, and a body larger than max_frame_bytes."""
    limits = FrameLimits(max_frame_bytes=10, max_body_bytes=1000)
    assert check_frame_lengths([1000, 10], limits) == 1010
    limits = FrameLimits(max_frame_bytes=1000, max_body_bytes=10)
    assert check_frame_lengths([10, 1000], limits) == 1010


def test_before_the_hello_the_limits_are_tiny():
    """Before a hello, a batch is one small body: no buffer frame, 16 KiB, 64 items."""
    limits = FrameLimits.before_hello()
    assert (limits.max_frames, limits.max_frame_bytes, limits.max_items) == (1, 0, 64)
    assert limits.max_body_bytes == limits.max_batch_bytes == 16 * 1024
    with pytest.raises(ProtocolError, match="announces 2 frames"):
        check_frame_count(2, limits)
    with pytest.raises(ProtocolError, match="exceeds max_body_bytes=16384"):
        check_frame_lengths([16 * 1024 + 1], limits)


# ----------------------------------------------- what decoding may cost --


def _array_of_empty_lists(n: int) -> bytes:
    """msgpack for a list of `n` empty lists: one container per byte."""
    return b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n


def _nested_empty_lists(outer: int, inner: int) -> bytes:
    """`outer` lists of `inner` empty lists each (no list longer than max_items)."""
    return b"\xdd" + outer.to_bytes(4, "big") + (b"\xdc" + inner.to_bytes(2, "big") + b"\x90" * inner) * outer


@pytest.mark.parametrize(
    "body, limits",
    [
        # Within max_items: only the count of containers stops it.
        pytest.param(_array_of_empty_lists((4 << 20) - 5), FrameLimits(max_items=1 << 23), id="one-long-list"),
        pytest.param(_nested_empty_lists(63, 65_535), FrameLimits(), id="nested-lists-default-limits"),
    ],
)
def test_decoding_bomb_is_refused(body, limits):
    """A 4 MiB body of 0x90 bytes (millions of empty lists) is refused, not decoded into gigabytes."""
    assert len(body) <= limits.max_body_bytes
    with pytest.raises(ProtocolError, match="a decoding bomb"):
        decode_batch([body], limits)


def test_a_body_of_bare_0x90_bytes_is_refused_at_once():
    """4 MiB of 0x90 with no array around them is one empty list and trailing bytes: refused, not decoded."""
    with pytest.raises(ProtocolError, match="undecodable batch: ExtraData"):
        decode_batch([b"\x90" * (4 << 20)], FrameLimits())


def test_a_body_of_lists_at_the_container_budget_decodes():
    """Small bodies keep a fixed allowance of containers: a short list of empty lists still decodes."""
    assert decode_batch([body([{"op": "x", "v": [[], [], []]}])], LIMITS) == [{"op": "x", "v": [[], [], []]}]


@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_deep_nesting_is_refused(depth):
    """Lists nested thousands deep are refused with ProtocolError (msgpack's fixed stack), not a crash."""
    # The padding buys the body a container allowance larger than `depth`,
    # so what refuses it is the nesting, not the count of containers.
    nested = b"\x91" * depth + b"\x90"
    message = b"\x83\xa2op\xa1x\xa3pad" + msgpack.packb("p" * 16 * depth) + b"\xa1v" + nested
    with pytest.raises(ProtocolError, match="undecodable batch") as info:
        decode_batch([b"\x91" + message], FrameLimits())
    assert "decoding bomb" not in str(info.value)


def test_nesting_within_the_stack_decodes():
    """Moderate nesting (a hundred deep) is legitimate and decodes."""
    value: list = []
    for _ in range(100):
        value = [value]
    padded = {"op": "x", "pad": "p" * 2000, "v": value}
    assert decode_batch([body([padded])], LIMITS) == [padded]
