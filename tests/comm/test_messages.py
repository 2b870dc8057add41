"""The typed protocol (`comm.messages`, `comm.schema`): round trips of every op,
a Hypothesis round-trip property over the declarations, and malformed maps."""

from __future__ import annotations

import math
import re

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trioflow.comm import Connection, FrameLimits
from trioflow.comm import messages as m
from trioflow.comm import schema
from trioflow.comm.frames import batch_frames, decode_batch, encode_message
from trioflow.comm.serialize import Serialized, function_id
from trioflow.errors import ProtocolError

from tests.strategies import op_on_channel as _op_on_channel
from tests.strategies import raw_record as _raw_record

ADDR = "tcp://127.0.0.1:8786"
ADDR2 = "tcp://[::1]:8787"
FID = function_id(b"a pickled function")
VALUE = Serialized(b"pickle", [b"buffer-1", b"buffer-2"])
SMALL = Serialized(b"tiny")  # fits INLINE_VALUE_BYTES
USER = m.UserFailure(exception=VALUE, type_name="ValueError", message="bad", traceback="Traceback ...")
WORKER_INFO = m.WorkerInfo(nthreads=2, processing=1, keys=3, pid=None, metrics={"cpu": 0.25})


def request(message: m.Message, request_id: int = 7) -> m.Message:
    """`message` with a request id, as `Requests.call` sends it."""
    message.request_id = request_id
    return message


# ------------------------------------------------------ one of every op --

# At least one valid instance of every op but "reply" (whose fields depend on
# the request it answers: see REPLIES below). Optional fields are given in
# some entries and left out in others.
ONE_OF_EACH: list[m.Message] = [
    m.Hello(role="worker", protocol=m.PROTOCOL_VERSION, address=ADDR, nthreads=4, pid=42, nanny=ADDR2, recovering=True),
    m.Hello(role="client", protocol=m.PROTOCOL_VERSION, client_id="client-1"),
    m.Hello(role="peer", protocol=m.PROTOCOL_VERSION),
    m.Welcome(address=ADDR),
    m.Refused(reason="this is a worker's data port"),
    m.Submit(
        tasks=[
            m.TaskWire(key="a", function_id=FID, args=VALUE, dependencies=["b"], retries=2, workers=[ADDR], scattered=False),
            m.TaskWire(key="b", dependencies=[], scattered=True),
        ],
        functions={FID: Serialized(b"fn")},
        wanted=["a"],
    ),
    m.ReleaseKeys(keys=["a", "b"]),
    m.CancelKeys(keys=["a"], reason="the user said so"),
    m.MissingData(key="a", holders=[ADDR, ADDR2]),
    m.ClientHeartbeat(),
    request(m.Scatter(data={"a": VALUE, "b": SMALL}, broadcast=True)),
    request(m.Replicate(keys=["a"], n=2)),
    request(m.RunEverywhere(function=SMALL)),
    request(m.RunEverywhere(function=SMALL, workers=[ADDR])),
    request(m.RunOnScheduler(function=SMALL)),
    request(m.UploadFile(filename="helpers.py", data=SMALL)),
    m.FireAndForget(keys=["a"]),
    request(m.Restart(timeout=30.0)),
    request(m.Restart()),
    request(m.WhoHas(keys=["a"])),
    request(m.WhoHas()),
    request(m.HasWhat()),
    request(m.NThreads()),
    request(m.GetSchedulerInfo()),
    request(m.WaitForWorkers(n=3)),
    request(m.GetTaskStream()),
    request(m.GetTaskStream(start=1.7e9, stop=1.8e9, count=10, after=5, until=99)),
    request(m.GetClusterMetrics(events_after=3)),
    m.KeyFinished(key="a", who_has=[ADDR], value=SMALL),
    m.KeyFinished(key="a", who_has=[ADDR]),
    m.KeyErred(key="a", origin="a", failure=USER),
    m.KeyErred(key="a", origin="b", failure=m.KilledWorkerFailure(key="b", deaths=3, last_worker=ADDR)),
    m.KeyErred(key="a", origin="b", failure=m.LostDataFailure(key="b")),
    m.KeyErred(key="a", origin="a", failure=m.CancelledFailure(reason="cancelled by the client")),
    m.KeysErred(keys=["a", "b"], origins=["a", "b"], failure=m.CancelledFailure(reason="cancelled by the client")),
    m.KeyLost(key="a"),
    m.Restarted(),
    m.SubmitRefused(keys=["a", "b"], reason="a cycle: a -> b -> a"),
    m.Register(held={"a": 8}, running=["b"], done=True),
    m.Heartbeat(metrics={"cpu": 0.5, "memory": 1e9}),
    m.TaskStarted(key="a"),
    m.TaskFinished(key="a", nbytes=8, value=SMALL),
    m.TaskFinished(key="a", nbytes=1 << 40),
    m.TaskErred(key="a", failure=USER),
    m.TaskFinished(key="a", nbytes=8, start=1.7e9, stop=1.7e9 + 0.25),
    m.TaskFinished(key="a", nbytes=8, duration=0.25),
    m.TaskErred(key="a", failure=USER, start=12.5, stop=12.5),
    m.ReplicaAdded(key="a", nbytes=8),
    m.ReplicaMissing(key="a", holders=[ADDR], dependent="c"),
    m.DataDropped(keys=["a"]),
    m.Goodbye(),
    m.StealResponse(key="a", steal_id=7, given_up=True),
    m.Paused(),
    m.Resumed(),
    m.HeartbeatAck(),
    m.StealRequest(key="a", steal_id=7),
    m.ComputeTask(
        key="a", function_id=FID, function=Serialized(b"fn"), args=VALUE,
        priority=[0, -1, (1 << 63) - 1], who_has={"b": [ADDR]}, nbytes={"b": 8},
    ),
    m.FreeKeys(keys=["a"]),
    m.FreeFunctions(function_ids=[FID]),
    m.AcquireReplicas(who_has={"b": [ADDR, ADDR2]}, nbytes={"b": 8}),
    request(m.PutData(data={"a": VALUE})),
    m.Close(reason="restart"),
    request(m.GetData(keys=["a", "b"])),
    request(m.RestartWorker()),
]

# One valid instance of every reply record.
REPLIES: list[schema.Record] = [
    m.KeysReply(keys=["a"]),
    m.WhoHasReply(who_has={"a": [ADDR]}),
    m.HasWhatReply(has_what={ADDR: ["a", "b"]}),
    m.NThreadsReply(nthreads={ADDR: 4}),
    m.InfoReply(
        info=m.SchedulerInfo(address=ADDR, workers={ADDR: WORKER_INFO}, tasks={"memory": 3}, clients=1)
    ),
    m.CountReply(n=3),
    m.RestartReply(n_workers=2),
    m.RunEverywhereReply(
        results={ADDR: m.RunOutcome(result=SMALL), ADDR2: m.RunOutcome(failure=USER)}
    ),
    m.RunHereReply(result=SMALL),
    m.RunHereReply(failure=USER),
    m.PutDataReply(nbytes={"a": 8}),
    m.GetDataReply(data={"a": VALUE}, missing=["b"], errors={"c": "cannot pickle"}, later=["d"]),
    m.PidReply(pid=1234),
    m.PidReply(pid=None),
    m.TaskStreamReply(
        runs=[
            m.TaskRun(seq=1, key="a", worker=ADDR, start=1.7e9, stop=1.7e9 + 1, status="OK", nbytes=8),
            m.TaskRun(seq=2, key="b", worker=ADDR2, start=1.7e9, stop=1.7e9, status="error", error="ValueError: bad"),
        ],
        until=2,
        more=False,
    ),
    m.ClusterMetricsReply(
        counters={"runs_ok": 3.0, "worker_deaths": 1.0},
        tasks={"memory": 3},
        workers=2,
        events=[m.ClusterEvent(seq=1, time=1.7e9, kind="worker-died", text="it died", worker=ADDR, count=1)],
    ),
    m.InfoReply(
        info=m.SchedulerInfo(
            address=ADDR, workers={}, tasks={}, clients=0, dashboard="http://127.0.0.1:8787/"
        )
    ),
    m.UploadEverywhereReply(results={ADDR: "", ADDR2: "OSError: disk full"}),
    m.UploadHereReply(),
]


def on_each_channel(messages: list[m.Message]) -> list:
    return [
        pytest.param(message, channel, id=f"{message.OP}-{channel}-{i}")
        for i, message in enumerate(messages)
        for channel in message.CHANNELS
    ]


async def arrive(wire: dict, channel: str | None, limits: FrameLimits = FrameLimits()) -> list:
    """What a `Connection` with inbound `channel` returns for a batch holding `wire`."""
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(right, limits, peer="test", inbound=channel)
    await left.send_all(b"".join(batch_frames([encode_message(wire)])))
    with trio.fail_after(5):
        return await conn.receive()


def test_the_table_holds_every_op_and_every_reply():
    """ONE_OF_EACH covers every op but reply, and REPLIES every reply record a request declares."""
    assert {message.OP for message in ONE_OF_EACH} == set(m.OPS) - {"reply"}
    declared = {
        m.reply_kind(cls, channel) for cls in m.OPS.values() for channel in cls.CHANNELS
    } - {None}
    assert {type(r) for r in REPLIES} == declared


def test_a_request_cannot_be_declared_held():
    """A held request's reply would wait for the asker's next message."""
    with pytest.raises(TypeError, match="'held_ask' is a request: it cannot be held"):

        class HeldAsk(m.Message, op="held_ask", channels=(m.WORKER_TO_SCHEDULER,), reply=m.KeysReply, held=True):
            pass

    assert "held_ask" not in m.OPS
    assert [op for op, cls in m.OPS.items() if cls.HELD] == ["task_started"]


@pytest.mark.parametrize("message, channel", on_each_channel(ONE_OF_EACH))
async def test_every_op_round_trips_through_a_connection(message, channel):
    """Each op, sent on each of its channels, arrives as an equal typed message."""
    limits = FrameLimits.before_hello() if channel == m.HELLO else FrameLimits()
    assert await arrive(message.to_wire(), channel, limits) == [message]


def test_every_request_can_be_answered_on_its_reply_channel():
    """The channel a request's reply travels on carries replies."""
    for cls in m.OPS.values():
        for channel in cls.CHANNELS:
            if m.reply_kind(cls, channel) is not None:
                assert m.REPLY_CHANNEL[channel] in m.Reply.CHANNELS, (cls.OP, channel)


@pytest.mark.parametrize("fields", [pytest.param(r, id=type(r).__name__) for r in REPLIES])
async def test_every_reply_record_round_trips_and_checks(fields):
    """A Reply carrying each reply record arrives with its id, and checks back to the record."""
    [reply] = await arrive(m.Reply(41, fields).to_wire(), m.WORKER_TO_PEER)
    assert type(reply) is m.Reply
    assert (reply.request_id, reply.error) == (41, None)
    assert reply.checked(type(fields), "some_request") == fields


async def test_error_reply_round_trips():
    """A Reply with an error text arrives with that text and no fields."""
    [reply] = await arrive(m.Reply(3, None, "no such key").to_wire(), m.SCHEDULER_TO_CLIENT)
    assert (reply.request_id, reply.error) == (3, "no such key")


@pytest.mark.parametrize(
    "raw, expected, problem",
    [
        pytest.param(
            {"op": "reply", "request_id": 1, "data": {"a": "not pickled"}, "missing": [], "errors": {}},
            m.GetDataReply, "reply to 'get_data': field data['a'] must be a pickled value, got str of 11",
            id="wrong-type",
        ),
        pytest.param(
            {"op": "reply", "request_id": 1, "data": {}, "errors": {}},
            m.GetDataReply, "reply to 'get_data': lacks field 'missing'", id="missing-field",
        ),
        pytest.param(
            {"op": "reply", "request_id": 1, "data": {}, "missing": [], "errors": {}, "extra": 1},
            m.GetDataReply, "reply to 'get_data': has an unknown field 'extra'", id="unknown-field",
        ),
        pytest.param(
            {"op": "reply", "request_id": 1, "pid": -5},
            m.PidReply, "reply to 'get_data': field pid must be an int between 0 and 2147483648, got -5",
            id="out-of-bounds",
        ),
        pytest.param(
            {"op": "reply", "request_id": 1, "result": SMALL, "failure": USER.wire_fields()},
            m.RunHereReply, "reply to 'get_data': exactly one of 'result', 'failure' is expected",
            id="cross-field-rule",
        ),
    ],
)
def test_reply_checked_against_the_wrong_record_raises(raw, expected, problem):
    """Reply.checked raises ProtocolError naming the request and the field a reply breaks."""
    reply = m.decode(raw, m.WORKER_TO_PEER)
    with pytest.raises(ProtocolError) as info:
        reply.checked(expected, "get_data")
    assert str(info.value) == problem


# ------------------------------------------------------- malformed maps --

TASK = {"key": "a", "function_id": FID, "args": VALUE}
LONG_KEY = "k" * (m.MAX_KEY_CHARS + 1)

MALFORMED = [
    pytest.param({"op": "frobnicate"}, m.CLIENT_TO_SCHEDULER, "unknown op 'frobnicate'", id="unknown-op"),
    pytest.param(
        {"op": "task_finished", "key": "a", "nbytes": 1}, m.CLIENT_TO_SCHEDULER,
        "op 'task_finished' may not be sent client->scheduler", id="wrong-channel",
    ),
    pytest.param(
        {"op": "submit", "tasks": [], "functions": {}, "wanted": []}, m.PEER_TO_WORKER,
        "op 'submit' may not be sent peer->worker", id="client-op-on-a-workers-port",
    ),
    pytest.param(
        {"op": "task_started", "key": "a", "colour": "red"}, m.WORKER_TO_SCHEDULER,
        "'task_started': has an unknown field 'colour'", id="unknown-field",
    ),
    pytest.param(
        {"op": "task_started"}, m.WORKER_TO_SCHEDULER, "'task_started': lacks field 'key'", id="missing-field"
    ),
    pytest.param(
        {"op": "task_finished", "key": "a", "nbytes": "8"}, m.WORKER_TO_SCHEDULER,
        "'task_finished': field nbytes must be an int between 0 and 4611686018427387904, got str of 1",
        id="wrong-type",
    ),
    pytest.param(
        {"op": "task_finished", "key": "a", "nbytes": True}, m.WORKER_TO_SCHEDULER,
        "'task_finished': field nbytes must be an int between 0 and 4611686018427387904, got True",
        id="bool-is-not-an-int",
    ),
    pytest.param(
        {"op": "task_finished", "key": "a", "nbytes": -1}, m.WORKER_TO_SCHEDULER,
        "'task_finished': field nbytes must be an int between 0 and 4611686018427387904, got -1",
        id="negative-int",
    ),
    pytest.param(
        {"op": "submit", "tasks": [TASK, {**TASK, "key": "b", "retries": 1001}], "functions": {}, "wanted": []},
        m.CLIENT_TO_SCHEDULER,
        "'submit': field tasks[1].retries must be an int between 0 and 1000, got 1001",
        id="int-too-big-in-a-nested-record",
    ),
    pytest.param(
        {"op": "restart", "request_id": 1, "timeout": math.nan}, m.CLIENT_TO_SCHEDULER,
        "'restart': field timeout must be a number between 0.001 and 86400, got nan", id="nan",
    ),
    pytest.param(
        {"op": "restart", "request_id": 1, "timeout": math.inf}, m.CLIENT_TO_SCHEDULER,
        "'restart': field timeout must be a number between 0.001 and 86400, got inf", id="inf",
    ),
    pytest.param(
        {"op": "restart", "request_id": 1, "timeout": -1.0}, m.CLIENT_TO_SCHEDULER,
        "'restart': field timeout must be a number between 0.001 and 86400, got -1.0", id="negative-timeout",
    ),
    pytest.param(
        {"op": "heartbeat", "metrics": {"cpu": -math.inf}}, m.WORKER_TO_SCHEDULER,
        "'heartbeat': field metrics['cpu'] must be a number between -1e+18 and 1e+18, got -inf",
        id="infinite-metric",
    ),
    pytest.param(
        {"op": "task_started", "key": LONG_KEY}, m.WORKER_TO_SCHEDULER,
        "'task_started': field key must be a key of at most 1024 chars, got str of 1025", id="string-too-long",
    ),
    pytest.param(
        {"op": "task_started", "key": ""}, m.WORKER_TO_SCHEDULER,
        "'task_started': field key must be a key of at most 1024 chars, got str of 0", id="empty-key",
    ),
    pytest.param(
        {"op": "release_keys", "keys": ["k"] * (m.MAX_KEYS + 1)}, m.CLIENT_TO_SCHEDULER,
        f"'release_keys': field keys must be a list of at most {m.MAX_KEYS} (a key of at most 1024 chars), got list",
        id="list-too-long",
    ),
    pytest.param(
        {"op": "release_keys", "keys": ["a", 7]}, m.CLIENT_TO_SCHEDULER,
        "'release_keys': field keys[1] must be a key of at most 1024 chars, got 7", id="wrong-type-in-a-list",
    ),
    pytest.param(
        {"op": "acquire_replicas", "who_has": {"a": ["nowhere"]}, "nbytes": {}}, m.SCHEDULER_TO_WORKER,
        "'acquire_replicas': field who_has['a'][0] is not a valid address: 'nowhere'", id="bad-address",
    ),
    pytest.param(
        {"op": "free_functions", "function_ids": ["ab" * 32, "XY" * 32]}, m.SCHEDULER_TO_WORKER,
        "'free_functions': field function_ids[1] is not a valid function id", id="function-id-not-hex",
    ),
    pytest.param(
        {"op": "free_functions", "function_ids": ["ab" * 20]}, m.SCHEDULER_TO_WORKER,
        "'free_functions': field function_ids[0] must be a function id of 64 chars, got str of 40",
        id="function-id-wrong-length",
    ),
    pytest.param(
        {"op": "key_erred", "key": "a", "origin": "a", "failure": {"kind": "meteor"}}, m.SCHEDULER_TO_CLIENT,
        "'key_erred': field failure.kind must be one of ['cancelled', 'killed_worker', 'lost_data', 'user'], "
        "got 'meteor'",
        id="unknown-tag",
    ),
    pytest.param(
        {"op": "keys_erred", "keys": ["a", "b"], "origins": ["a"], "failure": {"kind": "cancelled", "reason": "x"}},
        m.SCHEDULER_TO_CLIENT,
        "'keys_erred': 'origins' has 1 keys for 2 in 'keys'",
        id="keys-and-origins-of-different-lengths",
    ),
    pytest.param(
        {"op": "task_erred", "key": "a", "failure": {"kind": "lost_data", "key": "a"}}, m.WORKER_TO_SCHEDULER,
        "'task_erred': field failure.kind must be one of ['user'], got 'lost_data'",
        id="tag-not-allowed-here",
    ),
    pytest.param(
        {"op": "hello", "role": "emperor", "protocol": 1}, m.HELLO,
        "'hello': field role must be one of 'client', 'worker', 'peer', 'control', got 'emperor'",
        id="unknown-choice",
    ),
    pytest.param(
        {"op": "hello", "role": "worker", "protocol": 1, "address": ADDR}, m.HELLO,
        "'hello': a worker hello needs field 'nthreads'", id="cross-field-rule",
    ),
    pytest.param(
        {"op": "submit", "tasks": [{"key": "a", "scattered": True, "args": VALUE}], "functions": {}, "wanted": []},
        m.CLIENT_TO_SCHEDULER,
        "'submit': field tasks[0] scattered data has no function, arguments or dependencies",
        id="cross-field-rule-nested",
    ),
    pytest.param(
        {"op": "key_finished", "key": "a", "who_has": [ADDR], "value": Serialized(b"x" * 2000)},
        m.SCHEDULER_TO_CLIENT,
        "'key_finished': field value is a pickled value of 2000 bytes, more than 1024",
        id="inline-value-too-big",
    ),
    pytest.param(
        {"op": "get_data", "keys": ["a"]}, m.PEER_TO_WORKER,
        "'get_data': a request needs an int 'request_id', got None", id="request-without-id",
    ),
    pytest.param(
        {"op": "task_finished", "key": "a", "nbytes": 1, "start": 10.0, "stop": 9.0}, m.WORKER_TO_SCHEDULER,
        "'task_finished': 'stop' (9) is before 'start' (10)", id="run-ends-before-it-starts",
    ),
    pytest.param(
        {"op": "task_erred", "key": "a", "failure": USER.wire_fields(), "start": 10.0}, m.WORKER_TO_SCHEDULER,
        "'task_erred': 'start' and 'stop' come together or not at all", id="run-start-without-stop",
    ),
    pytest.param(
        {"op": "task_finished", "key": "a", "nbytes": 1, "start": -1.0, "stop": 9.0}, m.WORKER_TO_SCHEDULER,
        "'task_finished': field start must be a number between 0 and 1e+11, got -1.0", id="run-time-out-of-bounds",
    ),
    pytest.param(
        {"op": "get_task_stream", "count": -1, "request_id": 1}, m.CLIENT_TO_SCHEDULER,
        "'get_task_stream': field count must be an int between 0 and 10000000, got -1", id="stream-count-negative",
    ),
    pytest.param(
        {"op": "get_data", "keys": ["a"], "request_id": -1}, m.PEER_TO_WORKER,
        "'get_data': a request needs an int 'request_id', got -1", id="request-id-out-of-bounds",
    ),
]


@pytest.mark.parametrize("raw, channel, problem", MALFORMED)
def test_malformed_maps_raise_protocol_error_naming_op_and_field(raw, channel, problem):
    """Each way a map can break its declaration raises ProtocolError saying which op, field and bound."""
    with pytest.raises(ProtocolError) as info:
        m.decode(raw, channel)
    assert str(info.value).startswith(problem), str(info.value)


def test_a_huge_peer_supplied_name_is_clipped_in_the_error():
    """An op name of a megabyte costs an error line, not a megabyte of it."""
    with pytest.raises(ProtocolError) as info:
        m.decode({"op": "x" * 1_000_000}, m.CLIENT_TO_SCHEDULER)
    assert len(str(info.value)) < 200


def test_unknown_field_is_refused_even_when_optional_fields_are_left_out():
    """A field not declared is an error even in a map that omits some optional fields."""
    with pytest.raises(ProtocolError, match="'hello': has an unknown field 'colour'"):
        m.decode({"op": "hello", "role": "peer", "protocol": 1, "colour": "red"}, m.HELLO)


def test_an_unhashable_tag_is_a_protocol_error():
    """A failure whose 'kind' is a list is refused as ProtocolError, not TypeError."""
    with pytest.raises(ProtocolError, match="'task_erred': field failure.kind"):
        m.decode({"op": "task_erred", "key": "a", "failure": {"kind": []}}, m.WORKER_TO_SCHEDULER)


# -------------------------------------------------------- messages.invalid --


def test_invalid_turns_a_bad_request_into_an_answerable_invalid():
    """A request that breaks its declaration becomes an Invalid with its request_id and the reason."""
    raw = {"op": "get_data", "request_id": 12, "keys": "a"}
    with pytest.raises(ProtocolError) as info:
        m.decode(raw, m.PEER_TO_WORKER)
    invalid = m.invalid(raw, m.PEER_TO_WORKER, info.value)
    assert isinstance(invalid, m.Invalid)
    assert (invalid.op, invalid.request_id, invalid.keys) == ("get_data", 12, [])
    assert f"'get_data': field keys must be a list of at most {m.MAX_KEYS}" in invalid.reason


def test_invalid_turns_a_bad_submit_into_an_invalid_carrying_its_keys():
    """A submit that breaks its declaration becomes an Invalid naming the keys it could read, once each."""
    raw = {
        "op": "submit",
        "tasks": [TASK, {**TASK, "key": "b", "retries": -1}, {**TASK, "key": "a"}, "junk", {"key": 5}],
        "functions": {},
        "wanted": ["a"],
    }
    with pytest.raises(ProtocolError) as info:
        m.decode(raw, m.CLIENT_TO_SCHEDULER)
    invalid = m.invalid(raw, m.CLIENT_TO_SCHEDULER, info.value)
    assert isinstance(invalid, m.Invalid)
    assert (invalid.op, invalid.request_id, invalid.keys) == ("submit", None, ["a", "b"])
    assert "tasks[1].retries" in invalid.reason


def test_invalid_keeps_the_reason_as_written():
    """The reason an Invalid carries is the error's own text, not its repr."""
    raw = {"op": "get_data", "request_id": 12, "keys": "a"}
    with pytest.raises(ProtocolError) as info:
        m.decode(raw, m.PEER_TO_WORKER)
    assert m.invalid(raw, m.PEER_TO_WORKER, info.value).reason == str(info.value)


@pytest.mark.parametrize(
    "raw, channel",
    [
        pytest.param({"op": "task_started", "key": 3}, m.WORKER_TO_SCHEDULER, id="one-way-op"),
        pytest.param({"op": "get_data", "keys": 3}, m.PEER_TO_WORKER, id="request-without-id"),
        pytest.param({"op": "get_data", "request_id": 1, "keys": 3}, m.CLIENT_TO_SCHEDULER, id="wrong-channel"),
        pytest.param({"op": "frobnicate", "request_id": 1}, m.CLIENT_TO_SCHEDULER, id="unknown-op"),
    ],
)
def test_invalid_is_none_for_what_cannot_be_answered(raw, channel):
    """A broken one-way message, a request without an id, or an op not allowed here gets no Invalid."""
    with pytest.raises(ProtocolError) as info:
        m.decode(raw, channel)
    assert m.invalid(raw, channel, info.value) is None


# ------------------------------------------------------------ the property --


def _as_lists(value):
    """`value` with tuples as lists and records as (type, fields): what the wire can tell apart."""
    if isinstance(value, schema.Record):
        return type(value), {k: _as_lists(v) for k, v in value.__dict__.items()}
    if isinstance(value, (list, tuple)):
        return [_as_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_lists(v) for k, v in value.items()}
    return value


def _through_the_wire(wire: dict, channel: str) -> m.Message:
    _, *frames = batch_frames([encode_message(wire)])
    [raw] = decode_batch(frames, FrameLimits())
    return m.decode(raw, channel)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(_op_on_channel(), st.integers(0, (1 << 63) - 1))
def test_property_any_valid_message_round_trips(op_and_raw, request_id):
    """Any map its declaration accepts, built as a message and sent, arrives as an equal message."""
    (op, channel), raw = op_and_raw
    message = m.OPS[op].check(raw)
    if m.is_request(message, channel):
        message.request_id = request_id
    assert _as_lists(_through_the_wire(message.to_wire(), channel)) == _as_lists(message)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.sampled_from([type(r) for r in REPLIES]).flatmap(lambda cls: st.tuples(st.just(cls), _raw_record(cls))))
def test_property_any_valid_reply_round_trips(cls_and_raw):
    """Any reply record its declaration accepts comes back from Reply.checked equal."""
    cls, raw = cls_and_raw
    fields = cls.check(raw)
    reply = _through_the_wire(m.Reply(5, fields).to_wire(), m.SCHEDULER_TO_CLIENT)
    assert _as_lists(reply.checked(cls, "any")) == _as_lists(fields)


def test_messages_built_in_code_are_not_checked_again():
    """Message(...) trusts its caller: the checks guard the edge, where maps arrive."""
    assert m.TaskStarted(key="").key == ""
    with pytest.raises(TypeError, match=re.escape("TaskStarted needs field 'key'")):
        m.TaskStarted()
    with pytest.raises(TypeError, match=re.escape("TaskStarted has no field 'colour'")):
        m.TaskStarted(key="a", colour="red")
