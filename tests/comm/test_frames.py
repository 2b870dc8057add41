"""The batch format: encode/decode round trips, a Hypothesis property, malformed input."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trioflow.comm.frames import (
    EXT_SERIALIZED,
    FrameLimits,
    batch_frames,
    check_frame_count,
    check_frame_lengths,
    decode_batch,
    encode_message,
)
from trioflow.comm.serialize import Serialized, dumps, loads
from trioflow.errors import ProtocolError

LIMITS = FrameLimits(max_frame_bytes=1 << 20, max_frames=64, max_items=1000)
TINY = FrameLimits(max_frame_bytes=100, max_frames=4, max_items=8)


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
    "lengths", [[TINY.max_frame_bytes + 1], [0, 1, 2**40], [2**64 - 1]]
)
def test_oversized_frame_length_raises(lengths):
    """Any one frame over max_frame_bytes makes the batch invalid."""
    with pytest.raises(ProtocolError, match=f"exceeds max_frame_bytes={TINY.max_frame_bytes}"):
        check_frame_lengths(lengths, TINY)


def test_frame_lengths_at_the_limit_pass():
    """Frames of exactly max_frame_bytes (and empty ones) are accepted."""
    assert check_frame_lengths([0, TINY.max_frame_bytes], TINY) is None
