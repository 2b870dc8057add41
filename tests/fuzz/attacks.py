"""Broken messages and broken bytes, built from the protocol's declarations.

The fuzzers (test_fuzz_sim.py, test_fuzz_processes.py) play a stranger who
connects to a trioflow port and sends what it likes. This module draws what
it sends, in four layers, each starting from something valid and breaking it
(a valid message teaches the server nothing; pure noise never gets past the
first check):

1. **values**: a valid value of a field kind (`tests.strategies.value_of`),
   or a broken one: the wrong type, just out of bounds, huge (a list one past
   its limit, a string of megabytes), NaN and infinities, deep nesting, an
   undecodable string, a bad msgpack extension, broken inside (one item of a
   list, one field of a nested record);
2. **messages**: a valid map of an op of the attacker's channel, then a few
   mutations: a field dropped, added or broken, the op unknown, not a string
   or of another channel, the request id missing or out of range;
3. **batches**: the messages packed by hand (`pack`, so that pieces msgpack
   itself would refuse to write can be spliced in), then maybe damaged: no
   frames, too many, an announced length of a terabyte with no bytes after
   it, lengths that do not match, frames no message claims or that a
   message claims but are missing, a body that is not an array, cut short;
   or plain random bytes, or text;
4. **attacks**: for a role (client, worker, peer, control), a preamble (a
   valid hello, and a worker's registration, most of the time; a broken one
   or none otherwise), a few batches with pauses between them and writes
   split into pieces, and a linger before the attacker closes.

Keys can be `KeyRef` placeholders, filled when the bytes are written with
keys the victim really has (the well-behaved client's tasks, or the tasks
the scheduler sent a registered attacker), so that a fuzzed message can
touch real state: cancel another client's task, report a task as finished,
ask for a value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import struct
from typing import Any

import msgpack
from hypothesis import strategies as st

from trioflow.comm import messages as m
from trioflow.comm import schema
from trioflow.comm.frames import EXT_SERIALIZED, HELLO_BODY_BYTES
from trioflow.comm.serialize import Serialized

from tests.strategies import ops_on, raw_record, value_of

ROLES = ("client", "worker", "peer", "control")
# Examples per fuzzing test; TRIOFLOW_FUZZ_EXAMPLES=5000 runs many more locally.
FUZZ_EXAMPLES_ENV = "TRIOFLOW_FUZZ_EXAMPLES"
# Largest container a mutation builds item by item (a limit beyond this is
# exceeded with the body size instead).
MAX_BUILT_ITEMS = 200_000


def examples(default: int) -> int:
    """How many Hypothesis examples to run: `default`, or $TRIOFLOW_FUZZ_EXAMPLES."""
    text = os.environ.get(FUZZ_EXAMPLES_ENV, "").strip()
    return int(text) if text else default


# ------------------------------------------------------------ placeholders --


@dataclasses.dataclass(frozen=True)
class KeyRef:
    """A key to be filled in when the bytes are written: the `index`-th known key."""

    index: int


@dataclasses.dataclass(frozen=True)
class Raw:
    """Msgpack bytes spliced in as they are (what msgpack would not write)."""

    data: bytes

    def __repr__(self) -> str:
        head = self.data[:24]
        return f"Raw({head!r}{'...' if len(self.data) > 24 else ''} {len(self.data)} bytes)"


@dataclasses.dataclass(frozen=True)
class Big:
    """A large value described compactly (so a failing example prints short).

    `what` is ``"str"`` (a string of `n` x's), ``"list"`` (`n` copies of
    `item`) or ``"map"`` (`n` entries ``key_pattern % i -> item``).
    """

    what: str
    n: int
    item: Any = None
    key_pattern: str = "k%d"

    def build(self) -> Any:
        if self.what == "str":
            return "x" * self.n
        if self.what == "list":
            return [self.item] * self.n
        return {self.key_pattern % i: self.item for i in range(self.n)}

    def __repr__(self) -> str:
        return f"Big({self.what}, n={self.n}, item={self.item!r:.40})"


# ------------------------------------------------------------ packing --


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    if n < 1 << 16:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def pack(value: Any, frames: list[bytes], keys: list[str]) -> bytes:
    """`value` in msgpack, with `Raw`, `Big`, `KeyRef` and `Serialized` handled.

    A `Serialized` appends its frames to `frames` and becomes extension 1,
    exactly as `trioflow.comm.frames.encode_message` writes it.
    """
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, Big):
        return pack(value.build(), frames, keys)
    if isinstance(value, KeyRef):
        return msgpack.packb(keys[value.index % len(keys)] if keys else f"unknown-{value.index}")
    if isinstance(value, Serialized):
        frames.append(bytes(value.header))
        frames.extend(bytes(b) for b in value.buffers)
        return msgpack.packb(msgpack.ExtType(EXT_SERIALIZED, struct.pack("<I", 1 + len(value.buffers))))
    if isinstance(value, dict):
        parts = [_map_header(len(value))]
        for k, v in value.items():
            parts.append(pack(k, frames, keys))
            parts.append(pack(v, frames, keys))
        return b"".join(parts)
    if isinstance(value, (list, tuple)):
        if value and all(type(v) is type(value[0]) and isinstance(v, (str, int)) for v in value[:2]) and len(value) > 64:
            # A long list of plain values: let msgpack write it in one go.
            try:
                return msgpack.packb(list(value), use_bin_type=True)
            except (TypeError, ValueError, OverflowError):
                pass
        return _array_header(len(value)) + b"".join(pack(v, frames, keys) for v in value)
    return msgpack.packb(value, use_bin_type=True)


@dataclasses.dataclass
class Batch:
    """Messages (any values) to pack into one batch, and what to break in its frames.

    `damage` is a tuple: ``("ok",)``, ``("count", n)`` (announce n frames),
    ``("length", i, n)`` (announce frame i as n bytes), ``("extra_frame",
    data)``, ``("drop_frame",)`` (the last frame is missing),
    ``("not_array",)`` (the body is the first message alone), ``("truncate",
    fraction)``.
    """

    messages: list
    damage: tuple = ("ok",)

    def frames(self, keys: list[str]) -> list[bytes]:
        frames: list[bytes] = []
        if self.damage[0] == "not_array":
            body = pack(self.messages[0] if self.messages else None, frames, keys)
        else:
            body = _array_header(len(self.messages)) + b"".join(pack(v, frames, keys) for v in self.messages)
        return [body, *frames]

    def to_bytes(self, keys: list[str]) -> bytes:
        frames = self.frames(keys)
        kind = self.damage[0]
        if kind == "extra_frame":
            frames.append(self.damage[1])
        elif kind == "drop_frame" and len(frames) > 1:
            frames.pop()
        lengths = [len(f) for f in frames]
        count = len(frames)
        if kind == "count":
            count = self.damage[1]
        elif kind == "length":
            index = self.damage[1] % len(lengths)
            lengths[index] = self.damage[2]
        header = struct.pack("<I", count) + b"".join(struct.pack("<Q", n) for n in lengths)
        data = header + b"".join(frames)
        if kind == "truncate":
            data = data[: int(len(data) * self.damage[1])]
        return data


@dataclasses.dataclass
class Step:
    """One thing the attacker writes: a `Batch` or raw bytes, in `chunks`
    writes, then a pause of `pause` seconds."""

    what: Batch | bytes
    chunks: int = 1
    pause: float = 0.0

    def to_bytes(self, keys: list[str]) -> bytes:
        return self.what if isinstance(self.what, bytes) else self.what.to_bytes(keys)

    def pieces(self, keys: list[str]) -> list[bytes]:
        data = self.to_bytes(keys)
        if self.chunks <= 1 or len(data) < 2:
            return [data]
        size = max(1, math.ceil(len(data) / self.chunks))
        return [data[i : i + size] for i in range(0, len(data), size)]


@dataclasses.dataclass
class Attack:
    """What one attacker connection does: `steps`, then `linger` seconds, then close.

    The first `n_preamble` steps are its opening (hello, registration): a
    fuzzer may act between them and the rest (submit tasks a registered
    attacker may then be sent).
    """

    role: str
    steps: list[Step]
    linger: float = 0.0
    n_preamble: int = 0

    def ops(self) -> set:
        """The ops of the maps in its batches (whatever they are, hashable or not)."""
        found = set()
        for step in self.steps:
            if isinstance(step.what, Batch):
                for message in step.what.messages:
                    if isinstance(message, dict) and isinstance(message.get("op"), str):
                        found.add(message["op"])
        return found

    def describe(self, limit: int = 4000) -> str:
        text = f"Attack(role={self.role!r}, linger={self.linger}, n_preamble={self.n_preamble}, steps=[\n"
        for step in self.steps:
            text += f"  {step!r},\n"
        text += "])"
        return text if len(text) <= limit else text[:limit] + f"...({len(text) - limit} more chars)"


# ---------------------------------------------------------------- values --

# Values of every msgpack type, for "the wrong type" (and as junk anywhere).
JUNK = (
    None,
    True,
    False,
    0,
    -1,
    (1 << 63) - 1,
    -(1 << 63),
    (1 << 64) - 1,
    1.5,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "x",
    "tcp://127.0.0.1:1",
    b"bytes",
    [],
    {},
    [1, "a"],
    {"a": 1},
    {"kind": "user"},
    Serialized(b"\x80\x05N."),
    msgpack.ExtType(7, b"abcd"),
)

# Msgpack that the decoder must refuse or bound, spliced in as a value.
BAD_MSGPACK = (
    Raw(b"\xc1"),  # never used
    Raw(b"\xa3\xff\xfe\xfd"),  # a str that is not UTF-8
    Raw(b"\xdd\xff\xff\xff\xff"),  # an array of 4 billion items, none sent
    Raw(b"\xdf\xff\xff\xff\xff"),  # a map of 4 billion entries, none sent
    Raw(b"\xdb\x7f\xff\xff\xff"),  # a str of 2 GiB, none sent
    Raw(b"\xc6\x7f\xff\xff\xff"),  # bin of 2 GiB, none sent
    Raw(b"\xc9\x7f\xff\xff\xff\x01"),  # ext of 2 GiB, none sent
    Raw(b"\x81\x01\x02"),  # a map with an int key (strict_map_key)
    Raw(b"\x81\x90\x02"),  # a map with a list key
    Raw(b"\xd6\x01\x00\x00\x00\x00"),  # extension 1 claiming 0 frames
    Raw(b"\xd6\x01\xff\xff\xff\xff"),  # extension 1 claiming 4 billion frames
    Raw(b"\xd5\x01\x01\x00"),  # extension 1 with a 2-byte payload
    Raw(b"\xd6\x02\x01\x00\x00\x00"),  # an unknown extension type
    Raw(b"\xd7\xff" + b"\x00" * 8),  # the msgpack timestamp extension
    Raw(b"\xcb" + struct.pack(">d", math.nan)),
)


def deep(depth: int, container: str = "list") -> Raw:
    """`depth` nested lists (or maps) around nil: msgpack's stack limit is 1024."""
    if container == "list":
        return Raw(b"\x91" * depth + b"\xc0")
    return Raw(b"\x81\xa1k" * depth + b"\xc0")


def _simple_valid(kind: schema.Kind) -> Any:
    """One fixed valid value of `kind`, for filling long lists and maps."""
    if kind is m.ADDRESS:
        return "tcp://127.0.0.1:1"
    if kind is m.FUNCTION_ID:
        return "0" * m.FUNCTION_ID_CHARS
    if isinstance(kind, schema.Str):
        return "k" * max(kind.min_chars, 1)
    if isinstance(kind, schema.Int):
        return max(kind.lo, min(kind.hi, 0))
    if isinstance(kind, schema.Float):
        return max(kind.lo, min(kind.hi, 0.0))
    if isinstance(kind, schema.Bool):
        return False
    if isinstance(kind, schema.Choice):
        return kind.choices[0]
    if isinstance(kind, schema.Pickled):
        return Serialized(b"\x80\x05N.")
    if isinstance(kind, schema.Nullable):
        return None
    if isinstance(kind, schema.List):
        return []
    if isinstance(kind, schema.Map):
        return {}
    return {}


def _key_pattern(kind: schema.Kind) -> str:
    if kind is m.ADDRESS:
        return "tcp://h%d:1"
    if kind is m.FUNCTION_ID:
        return "%064x"
    return "k%d"


def _out_of_bounds(kind: schema.Kind) -> list:
    """Values of the right type just (or far) beyond `kind`'s bounds."""
    if isinstance(kind, schema.Int):
        out = [True, float(kind.lo)]
        if kind.lo - 1 >= -(1 << 63):
            out.append(kind.lo - 1)
        if kind.hi + 1 <= (1 << 64) - 1:
            out.append(kind.hi + 1)
        return out + [(1 << 64) - 1, -(1 << 63)]
    if isinstance(kind, schema.Float):
        return [math.nan, math.inf, -math.inf, kind.lo - 1.0, kind.hi * 10 if kind.hi > 0 else 1e300, "1.0"]
    if isinstance(kind, schema.Str):
        out = [Big("str", kind.max_chars + 1), Big("str", 1_000_000), b"bytes instead of str"]
        if kind.min_chars:
            out.append("")
        if kind is m.ADDRESS:
            out += ["nowhere", "tcp://:1", "tcp://h:99999", "http://h:1", "tcp://h:port", "sim://x:1", "tls://h:1"]
        if kind is m.FUNCTION_ID:
            out += ["XY" * 32, "ab" * 31, "g" * 64]
        return out
    if isinstance(kind, schema.Choice):
        return ["", "nanny", "CLIENT", Big("str", 10_000)]
    if isinstance(kind, schema.Bool):
        return [0, 1, "true"]
    if isinstance(kind, schema.Pickled):
        out = [b"raw bytes", msgpack.ExtType(EXT_SERIALIZED, b"\x01\x00"), *BAD_MSGPACK[9:12]]
        if kind.max_bytes is not None:
            out.append(Serialized(b"x" * (kind.max_bytes + 1)))
        return out
    if isinstance(kind, schema.List):
        n = kind.max_items + 1
        out = [{"not": "a list"}, "not a list"]
        if n <= MAX_BUILT_ITEMS:
            out.append(Big("list", n, _simple_valid(kind.item)))
        return out
    if isinstance(kind, schema.Map):
        n = kind.max_items + 1
        out = [["not", "a", "map"], {1: 2}]
        if n <= MAX_BUILT_ITEMS:
            out.append(Big("map", n, _simple_valid(kind.value), _key_pattern(kind.key)))
        return out
    if isinstance(kind, schema.Nested):
        return [[], "record", {}]
    if isinstance(kind, schema.Tagged):
        return [{}, {kind.tag: "meteor"}, {kind.tag: []}, {kind.tag: None}, [kind.tag]]
    if isinstance(kind, schema.Nullable):
        return _out_of_bounds(kind.kind)
    return []


@functools.cache  # strategies are immutable: build each one once
@st.composite
def bad_value(draw, kind: schema.Kind) -> Any:
    """A value `kind` must refuse (or, now and then, one it accepts)."""
    choice = draw(st.integers(0, 9))
    if choice <= 3:
        options = _out_of_bounds(kind)
        if options:
            return draw(st.sampled_from(options))
    if choice == 4:
        return draw(st.sampled_from(BAD_MSGPACK))
    if choice == 5:
        return deep(draw(st.sampled_from([2, 100, 1023, 1025, 5000])), draw(st.sampled_from(["list", "map"])))
    if choice == 6:
        inner = _descend(kind)
        if inner is not None:
            return draw(inner)
    if choice == 7:
        return draw(value_of(kind))  # valid after all: mutations need not always break
    return draw(st.sampled_from(JUNK))


@functools.cache
def _descend(kind: schema.Kind) -> st.SearchStrategy | None:
    """A valid container of `kind` with one value inside it broken."""
    if isinstance(kind, schema.Nullable):
        return _descend(kind.kind)
    if isinstance(kind, schema.List):
        return st.tuples(st.lists(value_of(kind.item), max_size=3), bad_value(kind.item), st.integers(0, 3)).map(
            lambda t: t[0][: t[2]] + [t[1]] + t[0][t[2] :]
        )
    if isinstance(kind, schema.Map):
        return st.tuples(
            st.dictionaries(value_of(kind.key), value_of(kind.value), max_size=2),
            value_of(kind.key) | st.sampled_from([1, b"k", None, ""]),
            bad_value(kind.value) | value_of(kind.value),
        ).map(lambda t: _with_entry(t[0], t[1], t[2]))
    if isinstance(kind, schema.Nested):
        return broken_map(kind.record)
    if isinstance(kind, schema.Tagged):
        return st.sampled_from(sorted(kind.records)).flatmap(
            lambda tag: broken_map(kind.records[tag]).map(lambda raw: {kind.tag: tag, **raw})
        )
    return None


def _with_entry(mapping: dict, key: Any, value: Any) -> dict:
    try:
        return {**mapping, key: value}
    except TypeError:
        return mapping


@functools.cache  # strategies are immutable: build each one once
@st.composite
def broken_map(draw, record: type[schema.Record]) -> dict:
    """A valid map of `record` with one to three of its fields broken."""
    raw = draw(raw_record(record))
    for _ in range(draw(st.integers(1, 3))):
        raw = draw(_mutate_fields(raw, record))
    return raw


@st.composite
def _mutate_fields(draw, raw: dict, record: type[schema.Record]) -> dict:
    raw = dict(raw)
    names = list(record.FIELDS)
    how = draw(st.sampled_from(["break", "break", "break", "drop", "add"] if names else ["add"]))
    if how == "break":
        name = draw(st.sampled_from(names))
        raw[name] = draw(bad_value(record.FIELDS[name][0]))
    elif how == "drop" and raw:
        del raw[draw(st.sampled_from(sorted(raw)))]
    else:
        name = draw(st.sampled_from(["colour", "op", "", "kind", "request_id"]) | st.text(max_size=8) | st.just(Big("str", 100_000)))
        value = draw(st.sampled_from(JUNK))
        if isinstance(name, Big):
            raw = {**raw, name.build(): value}
        else:
            raw[name] = value
    return raw


# -------------------------------------------------------------- messages --


def _refs(draw, value: Any, kind: schema.Kind, chance: int) -> Any:
    """`value` with some of its keys replaced by `KeyRef`s (1 in `chance`)."""
    if kind is m.KEY and type(value) is str:
        if draw(st.integers(0, chance - 1)) == 0:
            return KeyRef(draw(st.integers(-3, 7)))  # negative: the last keys (sent to the attacker)
        return value
    if isinstance(kind, schema.Nullable):
        return _refs(draw, value, kind.kind, chance)
    if isinstance(kind, schema.List) and type(value) is list:
        return [_refs(draw, item, kind.item, chance) for item in value]
    if isinstance(kind, schema.Map) and type(value) is dict:
        out = {}
        for k, v in value.items():
            out[_refs(draw, k, kind.key, chance)] = _refs(draw, v, kind.value, chance)
        return out
    if isinstance(kind, schema.Nested) and type(value) is dict:
        return _record_refs(draw, value, kind.record, chance)
    if isinstance(kind, schema.Tagged) and type(value) is dict:
        record = kind.records.get(value.get(kind.tag)) if type(value.get(kind.tag)) is str else None
        if record is not None:
            return _record_refs(draw, value, record, chance)
    return value


def _record_refs(draw, raw: dict, record: type[schema.Record], chance: int) -> dict:
    out = dict(raw)
    for name, (kind, _) in record.FIELDS.items():
        if name in out:
            out[name] = _refs(draw, out[name], kind, chance)
    return out


@functools.cache  # strategies are immutable: build each one once
@st.composite
def valid_message(draw, op: str, channel: str, keyrefs: bool = True) -> dict:
    """A valid wire map of `op` on `channel` (with a request id if it is a request)."""
    cls = m.OPS[op]
    raw = draw(raw_record(cls))
    if keyrefs:
        raw = _record_refs(draw, raw, cls, 2)
    wire = {"op": op, **raw}
    if m.reply_kind(cls, channel) is not None:
        wire["request_id"] = draw(st.integers(0, 20))
    return wire


@st.composite
def valid_reply(draw) -> dict:
    """A `reply` to some request: an error, or the fields of any reply record."""
    records = sorted({m.reply_kind(c, ch) for c in m.OPS.values() for ch in c.CHANNELS} - {None}, key=lambda r: r.__name__)
    request_id = draw(st.integers(0, 20) | st.sampled_from([-1, 1 << 63, "1", None]))
    if draw(st.booleans()):
        return {"op": "reply", "request_id": request_id, "error": draw(st.text(max_size=8) | st.just(Big("str", 5000)))}
    record = draw(st.sampled_from(records))
    return {"op": "reply", "request_id": request_id, **draw(raw_record(record))}


@functools.cache  # strategies are immutable: build each one once
@st.composite
def mutated_message(draw, op: str, channel: str) -> Any:
    """A map of `op` meant for `channel`, broken in one to three ways."""
    cls = m.OPS[op]
    wire = draw(valid_message(op, channel))
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.integers(0, 9))
        if how <= 5:
            wire = {"op": wire.get("op", op), **draw(_mutate_fields({k: v for k, v in wire.items() if k != "op"}, cls))}
        elif how == 6:
            wire["op"] = draw(
                st.sampled_from(["launch_missiles", "", "HELLO", "reply", "hello", None, 7, ["submit"], b"submit"])
                | st.just(Big("str", 100_000))
                | st.text(max_size=12)
            )
        elif how == 7:
            wire["request_id"] = draw(st.sampled_from([-1, 1 << 63, (1 << 64) - 1, "7", None, 1.0, True, []]))
        elif how == 8:
            wire.pop("request_id", None)
        else:
            name = draw(st.sampled_from(sorted(cls.FIELDS) or ["op"]))
            wire[name] = draw(st.sampled_from(BAD_MSGPACK) | st.builds(deep, st.sampled_from([1025, 3000])))
    return wire


@functools.cache  # strategies are immutable: build each one once
@st.composite
def message_for(draw, channel: str) -> Any:
    """Anything an attacker sending on `channel` might put in a batch."""
    own = ops_on(channel)
    others = sorted(op for op in m.OPS if op not in own and op != "reply")
    how = draw(st.integers(0, 19))
    if how <= 5 and own:
        return draw(st.sampled_from(own).flatmap(lambda op: valid_message(op, channel)))
    if how <= 13 and own:
        return draw(st.sampled_from(own).flatmap(lambda op: mutated_message(op, channel)))
    if how <= 15:
        # An op of another channel (a worker's report from a client...).
        return draw(st.sampled_from(others).flatmap(lambda op: valid_message(op, m.OPS[op].CHANNELS[0])))
    if how == 16:
        return draw(valid_reply())
    if how == 17:
        return draw(st.sampled_from(JUNK))  # not a map at all
    if how == 18:
        return {"no": "op"}
    return draw(st.sampled_from(BAD_MSGPACK) | st.builds(deep, st.sampled_from([1025, 3000])))


# --------------------------------------------------------------- batches --

DAMAGE = st.one_of(
    st.just(("ok",)),
    st.tuples(st.just("count"), st.sampled_from([0, 2, 3, 65_537, (1 << 32) - 1])),
    st.tuples(
        st.just("length"),
        st.integers(0, 3),
        st.sampled_from([0, 1, 5, 17, (4 << 20) + 1, 1 << 30, (1 << 30) + 1, 1 << 40, (1 << 64) - 1]),
    ),
    st.tuples(st.just("extra_frame"), st.sampled_from([b"", b"x" * 10])),
    st.just(("drop_frame",)),
    st.just(("not_array",)),
    st.tuples(st.just("truncate"), st.sampled_from([0.0, 0.1, 0.5, 0.9, 0.99])),
)

TEXT_NOISE = (
    b"GET / HTTP/1.1\r\nHost: scheduler\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS client hello
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"\x00" * 64,
    b"\xff" * 64,
)


def raw_bytes() -> st.SearchStrategy:
    """Bytes that are not a batch, or only a header of one."""
    return st.one_of(
        st.binary(min_size=1, max_size=64),
        st.sampled_from(TEXT_NOISE),
        st.builds(lambda n: struct.pack("<I", n), st.sampled_from([0, 1, 2, 65_537, (1 << 32) - 1])),
        st.builds(
            lambda n, length: struct.pack("<I", n) + struct.pack("<Q", length) * n,
            st.integers(1, 3),
            st.sampled_from([0, 8, 1 << 20, 1 << 40, (1 << 64) - 1]),
        ),
    )


@functools.cache  # strategies are immutable: build each one once
@st.composite
def batch_for(draw, channel: str) -> Batch:
    messages = draw(st.lists(message_for(channel), min_size=0, max_size=3))
    damage = draw(DAMAGE) if draw(st.integers(0, 3)) == 0 else ("ok",)
    return Batch(messages, damage)


# ------------------------------------------------------------- preambles --


def hello_map(role: str, draw, addresses: list[str]) -> dict:
    hello: dict[str, Any] = {"op": "hello", "role": role, "protocol": m.PROTOCOL_VERSION}
    if role == "client":
        hello["client_id"] = draw(st.text(min_size=1, max_size=8) | st.just("attacker"))
        if draw(st.booleans()):
            hello["recovering"] = draw(st.booleans())
    elif role == "worker":
        hello["address"] = draw(st.sampled_from(addresses)) if addresses and draw(st.integers(0, 9)) == 0 else draw(
            value_of(m.ADDRESS) | st.just("sim://attacker:1")
        )
        hello["nthreads"] = draw(st.integers(1, 4))
        if draw(st.booleans()):
            hello["pid"] = draw(value_of(m.PID))
        if draw(st.booleans()):
            hello["nanny"] = draw(value_of(m.ADDRESS))
    return hello


@st.composite
def preamble(draw, role: str, addresses: list[str]) -> list[Step]:
    """How the attacker opens: mostly as a valid `role`, sometimes not at all."""
    how = draw(st.integers(0, 19))
    hello = hello_map(role, draw, addresses)
    register = {"op": "register", "held": {}, "running": [], "done": True}
    if role == "worker" and draw(st.integers(0, 3)) == 0:
        register = draw(st.one_of(valid_message("register", m.WORKER_TO_SCHEDULER), mutated_message("register", m.WORKER_TO_SCHEDULER)))
    valid = [Step(Batch([hello]))] + ([Step(Batch([register]))] if role == "worker" else [])
    if how <= 13:
        return valid
    if how == 14:
        return [Step(draw(raw_bytes()))]  # no hello: noise before it
    if how == 15:
        return [Step(Batch([draw(broken_map(m.Hello)) | {"op": "hello"}]))]
    if how == 16:
        other = draw(st.sampled_from([r for r in ROLES if r != role] + ["nanny", ""]))
        return [Step(Batch([{**hello, "role": other}]))]
    if how == 17:
        return [Step(Batch([{**hello, "protocol": draw(st.sampled_from([0, 2, 1 << 31, -1]))}]))]
    if how == 18:
        # The hello with company in its batch, or too big to be a hello.
        company = draw(st.sampled_from([[register], [hello], [{"op": "client_heartbeat"}]]))
        big = {**hello, "client_id": Big("str", HELLO_BODY_BYTES + 1)}
        return [Step(Batch(draw(st.sampled_from([[hello, *company], [big]]))))]
    return [Step(Batch([hello], draw(DAMAGE)))]


# ---------------------------------------------------------------- attacks --

PAUSES = st.sampled_from([0.0, 0.0, 0.0, 0.01, 0.2, 1.0, 3.0])


@st.composite
def attacks(draw, role: str, addresses: list[str] = (), max_batches: int = 4, pauses: st.SearchStrategy = PAUSES) -> Attack:
    """One attacker connection as `role`: a preamble, then broken batches.

    Args:
        addresses: real workers' addresses (a worker-role attacker now and
            then says hello with one of them: impersonation).
        pauses: seconds to wait after a step and before closing.
    """
    channel = m.ROLE_CHANNELS[role][0]
    steps = draw(preamble(role, list(addresses)))
    n_preamble = len(steps)
    for _ in range(draw(st.integers(0, max_batches))):
        what = draw(batch_for(channel)) if draw(st.integers(0, 9)) else draw(raw_bytes())
        steps.append(Step(what, chunks=draw(st.sampled_from([1, 1, 1, 2, 7])), pause=draw(pauses)))
    if steps:
        steps[0].pause = draw(pauses)
    return Attack(role, steps, linger=draw(pauses), n_preamble=n_preamble)
