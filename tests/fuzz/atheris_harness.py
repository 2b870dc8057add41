"""Coverage-guided fuzzing of trioflow's wire decoding with atheris (libFuzzer).

What it checks. Every byte a peer sends goes through three layers before a
shell sees it, and each must turn anything at all into either a result or a
`ProtocolError` (or, for a connection, `CommClosedError`). Anything else
that escapes (a `TypeError`, a `KeyError`, a `RecursionError`, a
`MemoryError`...) is a finding, and atheris stops and reports it with the
input. The first byte of an input picks the target:

* 0, "frames": the input *is* a batch (``u32`` frame count, ``u64``
  lengths, frames; docs/protocol.md "Bytes"): `check_frame_count` and
  `check_frame_lengths` under small or default limits, then `decode_batch`
  on the frames that are there;
* 1, "messages": the rest is a msgpack body (with a few buffer frames
  after it); every map in it goes through `messages.decode` on every
  channel (and `messages.invalid` when it is refused), every `reply`
  through `Reply.checked` against every reply record;
* 2, "fields": the next byte picks an op, the rest is msgpack for its
  fields, so that the fuzzer reaches the checks of every op's fields
  without having to guess op names;
* 3, "connection": the rest is fed, in a few chunks, into a real
  `Connection` over an in-memory stream (its inbound channel picked by a
  byte; with a `ByteBudget`), on Trio's virtual clock, one `trio.run` per
  input; the stream is then closed, or left silent until `idle_timeout`.
  The connection's budget must be back to 0 afterwards.

How to run it (atheris has wheels for CPython 3.11 on x86-64 Linux)::

    pip install -e '.[fuzz]'
    python tests/fuzz/atheris_harness.py -max_total_time=300 /tmp/trioflow-corpus
    python tests/fuzz/atheris_harness.py -atheris_runs=200000

A corpus directory given and empty is first filled with seeds: one valid
message of every op, built from the declarations, in each mode. Any
libFuzzer flag works (``-jobs``, ``-dict``, ``-minimize_crash=1``...). At the
end (and every minute) the harness prints what it reached: inputs per
target, outcomes (ProtocolError reasons, by their first words) and the ops
decoded on each channel. libFuzzer prints ``cov:`` (code edges reached) and
``ft:`` (features) as it goes. This file is not collected by pytest.

Result of the runs of 2026-11-30 (atheris 3.0.0, CPython 3.11.7, trioflow
at commit b2fb5d1; two cores shared with other work; 533 seeds): the
reference run, ``-max_total_time=310``, made 687,601 executions in 311 s
(2,210 per second), final ``cov: 316 ft: 941``, a corpus of 176 inputs
(13 KB), peak RSS 73 MB; with the two earlier runs below, 1,997,283
executions in about 11 minutes. Findings in trioflow: none. Every input
ended in a result, a `ProtocolError` or a `CommClosedError`; every
connection's budget drained; no `receive()` outlived its own deadline.
All 41 ops were decoded valid at least once (50 op-channel pairs), 11
kinds of request were answered as invalid instead of closing the
connection, and the "fields" target met 284 distinct refusals. The two
earlier runs found two harness bugs, now fixed: a `receive()` bounded by
600 virtual seconds, less than the connection allows itself (a batch
announcing 852 KB at a `min_transfer_rate` of 1 KiB/s gets 5 + 832 s; the
bound now follows the connection's rules), and a "fields" target that
silently did nothing (a wrong `msgpack.unpackb` argument under a broad
``except``). Weak spot: random bytes seldom make a valid reply record
(only `KeysReply` was checked valid).
"""

from __future__ import annotations

import collections
import math
import os
import struct
import sys
import threading
import time

# Filled by main() once the instrumented modules are imported.
frames = messages = schema = connection = None  # type: ignore[assignment]
ProtocolError = CommClosedError = None  # type: ignore[assignment]
trio = msgpack = Serialized = None  # type: ignore[assignment]

MODES = ("frames", "messages", "fields", "connection")
STATS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
STARTED = time.monotonic()


def _reason(exc: BaseException) -> str:
    """The first words of an error: what kind of refusal it was."""
    words = str(exc).replace("'", " ").split()
    return f"{type(exc).__name__}: " + " ".join(w for w in words[:5] if not w[:1].isdigit())


def _limits(small: bool):
    if small:
        return frames.FrameLimits(
            max_frame_bytes=4096, max_body_bytes=4096, max_frames=8, max_items=64, max_batch_bytes=64 * 1024
        )
    return frames.FrameLimits()


# ----------------------------------------------------------------- targets --


def fuzz_frames(data: bytes) -> None:
    """`data` as a whole batch: header checks, then `decode_batch`."""
    limits = _limits(small=bool(data[:1]) and data[0] & 1 == 0)
    data = data[1:]
    if len(data) < 4:
        return
    (n_frames,) = struct.unpack_from("<I", data)
    frames.check_frame_count(n_frames, limits)
    if len(data) < 4 + 8 * n_frames:
        STATS["frames"]["header cut short"] += 1
        return
    lengths = struct.unpack_from(f"<{n_frames}Q", data, 4)
    frames.check_frame_lengths(lengths, limits)
    offset = 4 + 8 * n_frames
    parts = []
    for length in lengths:
        parts.append(data[offset : offset + length])
        offset += length
    decoded = frames.decode_batch(parts, limits)
    STATS["frames"][f"decoded batches of {min(len(decoded), 3)}+ messages"] += 1


def _decode_everywhere(raw: dict) -> None:
    """`raw` through `messages.decode` on every channel; refused ones through `invalid`."""
    for channel in messages.CHANNELS:
        try:
            message = messages.decode(raw, channel)
        except ProtocolError as exc:
            invalid = messages.invalid(raw, channel, exc)
            if invalid is not None:
                STATS["answerable refusals"][invalid.op] += 1
            continue
        STATS["decoded"][f"{message.OP} on {channel}"] += 1
        if type(message) is messages.Reply:
            for record in _REPLY_RECORDS:
                try:
                    message.checked(record, "fuzz")
                    STATS["replies checked"][record.__name__] += 1
                except ProtocolError:
                    pass
        repr(message)


def fuzz_messages(data: bytes) -> None:
    """A msgpack body (then buffer frames) decoded, each map through every channel."""
    if not data:
        return
    n_buffers = data[0] % 4
    body = data[1:]
    buffers = [b"buffer"] * n_buffers
    batch = frames.decode_batch([body, *buffers], _limits(small=False))
    for raw in batch:
        _decode_everywhere(raw)


def fuzz_fields(data: bytes) -> None:
    """An op chosen by a byte, its fields from the msgpack that follows."""
    if len(data) < 2:
        return
    ops = sorted(messages.OPS)
    op = ops[data[0] % len(ops)]
    n_buffers = data[1] % 4
    try:
        fields = frames.decode_batch([data[2:], *[b"buffer"] * n_buffers], _limits(small=False))
    except ProtocolError:
        # Not a batch: take the body as the map itself.
        try:
            fields = msgpack.unpackb(
                data[2:], raw=False, strict_map_key=True, ext_hook=_ext_hook
            )
        except Exception:
            return
    if isinstance(fields, list):
        fields = fields[0] if fields and isinstance(fields[0], dict) else {}
    if not isinstance(fields, dict):
        return
    raw = {**fields, "op": op}
    try:
        messages.OPS[op].from_wire(raw, repr(op))
        STATS["fields"][f"valid {op}"] += 1
    except ProtocolError as exc:
        STATS["fields"][_reason(exc)] += 1
    _decode_everywhere(raw)
    for record in _REPLY_RECORDS:
        try:
            record.from_wire(fields, "fuzz")
        except ProtocolError:
            continue
        STATS["records decoded"][record.__name__] += 1


def _ext_hook(code: int, payload: bytes):
    return Serialized(payload) if code == 1 else msgpack.ExtType(code, payload)


async def _feed_connection(data: bytes) -> None:
    import trio.testing

    inbound = (None, *messages.CHANNELS)[data[0] % (1 + len(messages.CHANNELS))]
    before_hello = inbound == messages.HELLO
    limits = frames.FrameLimits.before_hello() if before_hello else _limits(small=data[1] & 1 == 0)
    close_at_end = data[1] & 2 == 0
    n_chunks = 1 + data[2] % 4
    body = data[3:]
    budget = connection.ByteBudget(1 << 40)
    left, right = trio.testing.memory_stream_pair()
    idle, rate = 5.0, 64 * 1024.0
    conn = connection.Connection(
        right, limits, peer="fuzz", inbound=inbound, budget=budget, idle_timeout=idle, min_transfer_rate=rate
    )
    # What one receive() may take at most, by its own rules: idle_timeout for
    # a batch to begin, a grace for its header and another for its frames,
    # plus its bytes at min_transfer_rate. Longer is a stall (virtual time:
    # waiting costs nothing here).
    grace = min(idle, connection.BATCH_GRACE_S)
    longest_receive = idle + 2 * grace + limits.max_batch_bytes / rate + 1.0
    size = max(1, math.ceil(len(body) / n_chunks))

    async def write() -> None:
        for start in range(0, len(body), size):
            await left.send_all(body[start : start + size])
            await trio.sleep(0.5)
        if close_at_end:
            await left.aclose()

    received = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        try:
            while True:
                with trio.fail_after(longest_receive):
                    batch = await conn.receive()
                received += 1
                for message in batch:
                    STATS["connection"][f"received {getattr(message, 'OP', 'raw map')}"] += 1
        except (ProtocolError, CommClosedError) as exc:
            STATS["connection"][_reason(exc)] += 1
        nursery.cancel_scope.cancel()
    if budget.in_use != 0:
        raise AssertionError(f"the connection's ByteBudget holds {budget.in_use} bytes after it ended")


def fuzz_connection(data: bytes) -> None:
    """The bytes as a peer would send them, read by a real `Connection`."""
    import trio.testing

    if len(data) < 3:
        return
    trio.run(_feed_connection, data, clock=trio.testing.MockClock(autojump_threshold=0))


TARGETS = (fuzz_frames, fuzz_messages, fuzz_fields, fuzz_connection)
_REPLY_RECORDS: list = []


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode = data[0] % len(TARGETS)
    STATS["inputs"][MODES[mode]] += 1
    try:
        TARGETS[mode](data[1:])
    except ProtocolError as exc:
        STATS[MODES[mode]][_reason(exc)] += 1
    except CommClosedError as exc:
        STATS[MODES[mode]][_reason(exc)] += 1


# ------------------------------------------------------------------ seeds --


def _simple_value(kind):
    """One valid value of a field kind, built from the declaration."""
    if kind is messages.ADDRESS:
        return "tcp://127.0.0.1:8786"
    if kind is messages.FUNCTION_ID:
        return "ab" * 32
    if isinstance(kind, schema.Str):
        return "k" * max(1, kind.min_chars)
    if isinstance(kind, schema.Int):
        return max(kind.lo, min(kind.hi, 1))
    if isinstance(kind, schema.Float):
        return max(kind.lo, min(kind.hi, 1.0))
    if isinstance(kind, schema.Bool):
        return True
    if isinstance(kind, schema.Choice):
        return kind.choices[0]
    if isinstance(kind, schema.Pickled):
        return Serialized(b"\x80\x05K\x01.")
    if isinstance(kind, schema.Nullable):
        return _simple_value(kind.kind)
    if isinstance(kind, schema.List):
        return [_simple_value(kind.item)]
    if isinstance(kind, schema.Map):
        return {_simple_value(kind.key): _simple_value(kind.value)}
    if isinstance(kind, schema.Nested):
        return _simple_record(kind.record)
    if isinstance(kind, schema.Tagged):
        tag, record = sorted(kind.records.items())[0]
        return {kind.tag: tag, **_simple_record(record)}
    return None


def _simple_record(record) -> dict:
    raw = {name: _simple_value(kind) for name, (kind, _) in record.FIELDS.items()}
    if record is messages.TaskWire:
        raw.update(scattered=False, dependencies=[])
    if record in (messages.RunOutcome, messages.RunHereReply):
        raw = {"result": raw["result"]}
    return raw


def seeds() -> list[bytes]:
    """Valid inputs for every target: one message of every op, and more."""
    out = []
    for op, cls in sorted(messages.OPS.items()):
        if op == "reply":
            wire = {"op": "reply", "request_id": 1, "keys": ["k"]}
        else:
            wire = {"op": op, **_simple_record(cls), "request_id": 1}
        encoded = frames.encode_message(wire)
        header, *batch = frames.batch_frames([encoded])
        out.append(bytes([0, 1]) + header + b"".join(batch))
        out.append(bytes([1, len(batch) - 1]) + batch[0])
        fields = frames.encode_message({k: v for k, v in wire.items() if k != "op"})
        out.append(bytes([2, sorted(messages.OPS).index(op), len(fields.frames)]) + b"\x91" + fields.body)
        for channel_index in range(1 + len(messages.CHANNELS)):
            out.append(bytes([3, channel_index, 0, 0]) + header + b"".join(bytes(b) for b in batch))
    return out


def _write_seeds(argv: list[str]) -> None:
    for arg in argv[1:]:
        if not arg.startswith("-") and os.path.isdir(arg) and not os.listdir(arg):
            for i, seed in enumerate(seeds()):
                with open(os.path.join(arg, f"seed-{i:04d}"), "wb") as f:
                    f.write(seed)
            print(f"wrote {len(seeds())} seeds into {arg}", file=sys.stderr)


# ----------------------------------------------------------------- report --


def report() -> None:
    elapsed = time.monotonic() - STARTED
    lines = [f"\n==== trioflow atheris harness: what was reached ({elapsed:.0f} s) ===="]
    for mode in MODES:
        lines.append(f"  inputs for {mode}: {STATS['inputs'][mode]}")
    for section in ("frames", "messages", "fields", "connection"):
        lines.append(f"  {section} outcomes ({len(STATS[section])} kinds):")
        for text, count in STATS[section].most_common(12):
            lines.append(f"    {count:9d}  {text}")
    decoded = STATS["decoded"]
    ops_reached = sorted({key.split(" on ")[0] for key in decoded})
    missing = sorted(set(messages.OPS) - set(ops_reached))
    lines.append(f"  ops decoded valid: {len(ops_reached)} of {len(messages.OPS)}; never: {missing}")
    lines.append(f"  (op, channel) pairs decoded valid: {len(decoded)}")
    lines.append(f"  requests answered as invalid: {dict(STATS['answerable refusals'])}")
    lines.append(f"  reply records checked valid: {sorted(STATS['replies checked'])}")
    lines.append(f"  records decoded from fields: {sorted(STATS['records decoded'])}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def _max_total_time(argv: list[str]) -> float | None:
    for arg in argv:
        if arg.startswith("-max_total_time="):
            return float(arg.split("=", 1)[1])
    return None


def _reporter(deadline: float | None) -> None:
    """Print the summary every minute, and just before libFuzzer stops."""
    while True:
        wait = 60.0
        if deadline is not None:
            wait = min(wait, max(0.0, STARTED + deadline - 1.5 - time.monotonic()))
        time.sleep(wait)
        report()
        if deadline is not None and time.monotonic() >= STARTED + deadline - 2:
            return


def main() -> None:
    global frames, messages, schema, connection, ProtocolError, CommClosedError, trio, msgpack, Serialized
    import atexit

    import atheris

    with atheris.instrument_imports(include=["trioflow.comm", "trioflow.errors"]):
        import msgpack as _msgpack
        import trio as _trio

        from trioflow.comm import connection as _connection
        from trioflow.comm import frames as _frames
        from trioflow.comm import messages as _messages
        from trioflow.comm import schema as _schema
        from trioflow.comm.serialize import Serialized as _Serialized
        from trioflow.errors import CommClosedError as _CommClosedError
        from trioflow.errors import ProtocolError as _ProtocolError
    frames, messages, schema, connection = _frames, _messages, _schema, _connection
    ProtocolError, CommClosedError, trio, msgpack, Serialized = (
        _ProtocolError, _CommClosedError, _trio, _msgpack, _Serialized,
    )
    _REPLY_RECORDS.extend(
        sorted(
            {messages.reply_kind(c, ch) for c in messages.OPS.values() for ch in c.CHANNELS} - {None},
            key=lambda r: r.__name__,
        )
    )
    _write_seeds(sys.argv)
    threading.Thread(target=_reporter, args=(_max_total_time(sys.argv),), daemon=True).start()
    atexit.register(report)  # runs after -atheris_runs=N (libFuzzer's own exits skip it)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
