"""Hypothesis strategies built from the protocol's declarations (`trioflow.comm.messages`).

One source for every test that needs valid messages: the round-trip
properties of tests/comm/test_messages.py and the fuzzers of tests/fuzz/
(which start from a valid message and then break it). Because they walk the
declarations, a new op or field is covered the day it is declared.

Values are kept small (a few items, a few characters): the bounds have
tests of their own, and the fuzzers reach them on purpose.
"""

from __future__ import annotations

import functools

from hypothesis import reject
from hypothesis import strategies as st

from trioflow.comm import messages as m
from trioflow.comm import schema
from trioflow.comm.serialize import Serialized, function_id

__all__ = ["value_of", "raw_record", "op_on_channel", "ops_on"]


@functools.cache  # strategies are immutable: build each one once
def value_of(kind: schema.Kind) -> st.SearchStrategy:
    """Valid values of `kind` (small ones: the bounds have tests of their own)."""
    if kind is m.ADDRESS:
        hosts = st.sampled_from(["127.0.0.1", "worker-1.example", "[::1]"])
        return st.builds(lambda host, port: f"tcp://{host}:{port}", hosts, st.integers(0, 65535))
    if kind is m.FUNCTION_ID:
        return st.binary(max_size=8).map(function_id)
    if kind is m.UPLOAD_NAME:
        return st.from_regex(r"[a-z_][a-z0-9_]{0,6}\.(py|zip|egg)", fullmatch=True)
    if isinstance(kind, schema.Str):
        assert kind.test is None, f"no strategy for {kind.describe()}"
        return st.text(st.characters(codec="utf-8"), min_size=kind.min_chars, max_size=min(kind.max_chars, 8))
    if isinstance(kind, schema.Int):
        return st.integers(kind.lo, kind.hi)
    if isinstance(kind, schema.Float):
        return st.floats(kind.lo, kind.hi, allow_nan=False, allow_infinity=False)
    if isinstance(kind, schema.Bool):
        return st.booleans()
    if isinstance(kind, schema.Choice):
        return st.sampled_from(kind.choices)
    if isinstance(kind, schema.Bytes):
        return st.binary(max_size=min(kind.max_bytes, 16))
    if isinstance(kind, schema.Pickled):
        return st.builds(Serialized, st.binary(max_size=16), st.lists(st.binary(max_size=16), max_size=2))
    if isinstance(kind, schema.Nullable):
        return st.none() | value_of(kind.kind)
    if isinstance(kind, schema.List):
        return st.lists(value_of(kind.item), max_size=min(kind.max_items, 3))
    if isinstance(kind, schema.Map):
        return st.dictionaries(value_of(kind.key), value_of(kind.value), max_size=min(kind.max_items, 2))
    if isinstance(kind, schema.Nested):
        return raw_record(kind.record)
    if isinstance(kind, schema.Tagged):
        return st.one_of(
            [raw_record(record).map(lambda raw, tag=tag: {kind.tag: tag, **raw}) for tag, record in kind.records.items()]
        )
    raise AssertionError(f"no strategy for {type(kind).__name__}")


@functools.cache
@st.composite
def raw_record(draw, record: type[schema.Record]) -> dict:
    """A map `record` accepts: each field present or (if optional) left out.

    Cross-field rules (`check_fields`) reject some draws; a few more draws
    find one they accept.
    """
    for _ in range(20):
        raw = {}
        for name, (kind, default) in record.FIELDS.items():
            if default is schema.REQUIRED or draw(st.booleans()):
                raw[name] = draw(value_of(kind))
        try:
            record.check(raw)
        except schema.FieldError:
            continue
        return raw
    reject()


def ops_on(channel: str) -> list[str]:
    """The ops (but ``reply``) that may travel on `channel`, sorted."""
    return sorted(op for op, cls in m.OPS.items() if op != "reply" and channel in cls.CHANNELS)


def op_on_channel() -> st.SearchStrategy:
    """``((op, channel), raw map)``: a valid map of any op, on any of its channels."""
    pairs = sorted((op, channel) for op, cls in m.OPS.items() if op != "reply" for channel in cls.CHANNELS)
    return st.sampled_from(pairs).flatmap(lambda pair: st.tuples(st.just(pair), raw_record(m.OPS[pair[0]])))
