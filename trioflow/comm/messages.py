"""Every message trioflow processes exchange, declared once.

This module is the protocol. Each op of docs/protocol.md is one class below:
its fields with their types and bounds (`trioflow.comm.schema`), the
*channels* it may travel on (who may send it to whom), and, for requests,
the fields of the reply. A test checks docs/protocol.md against these
declarations, so the two cannot drift apart.

How it is used:

* Receiving: a `Connection` knows its inbound channel (set by the
  handshake) and turns every map that arrives into a typed, checked
  message with `decode`. An op unknown, or not allowed on that channel, or
  a field out of bounds, raises `ProtocolError`; the shell closes that one
  connection and logs a clipped reason (design.md §6 rules 4 and 5). Shells
  dispatch on the class, through one table per role.
* Sending: shells build messages (``TaskStarted(key=k)``) and hand them to
  `Connection.send`, which calls `to_wire`.

Channels are named by the two ends of a connection and the direction; the
*role* in a hello says which kind of connection it is:

======================  ==========================================
role in the hello       inbound channel of the accepting side
======================  ==========================================
``client``              CLIENT_TO_SCHEDULER
``worker``              WORKER_TO_SCHEDULER
``peer`` or ``client``  PEER_TO_WORKER (a worker's own port)
``control``             SCHEDULER_TO_NANNY (a nanny's control port)
======================  ==========================================

Bounds are module constants, so a reader sees every limit in one place.
The limits on bytes (frames, bodies, budgets) are `Config` fields instead:
operators tune those; these are sanity bounds no honest peer comes near.
"""

from __future__ import annotations

import functools
import re
from typing import Any, ClassVar

from trioflow.comm.network import parse_address
from trioflow.comm.schema import (
    Bool,
    Choice,
    FieldError,
    Float,
    Int,
    List,
    Map,
    Nested,
    Nullable,
    Optional,
    Pickled,
    Record,
    Str,
    Tagged,
    clip,
)
from trioflow.errors import ProtocolError

PROTOCOL_VERSION = 1

# ------------------------------------------------------------------ channels --

HELLO = "hello"  # the first message a connecting side sends, to any server
CLIENT_TO_SCHEDULER = "client->scheduler"
SCHEDULER_TO_CLIENT = "scheduler->client"
WORKER_TO_SCHEDULER = "worker->scheduler"
SCHEDULER_TO_WORKER = "scheduler->worker"
PEER_TO_WORKER = "peer->worker"  # a worker's own port: other workers and clients ask for data
WORKER_TO_PEER = "worker->peer"
SCHEDULER_TO_NANNY = "scheduler->nanny"
NANNY_TO_SCHEDULER = "nanny->scheduler"

CHANNELS = (
    HELLO,
    CLIENT_TO_SCHEDULER,
    SCHEDULER_TO_CLIENT,
    WORKER_TO_SCHEDULER,
    SCHEDULER_TO_WORKER,
    PEER_TO_WORKER,
    WORKER_TO_PEER,
    SCHEDULER_TO_NANNY,
    NANNY_TO_SCHEDULER,
)
# The role a connecting side says hello with -> (the channel it sends on,
# the channel it hears back on).
ROLE_CHANNELS = {
    "client": (CLIENT_TO_SCHEDULER, SCHEDULER_TO_CLIENT),
    "worker": (WORKER_TO_SCHEDULER, SCHEDULER_TO_WORKER),
    "peer": (PEER_TO_WORKER, WORKER_TO_PEER),
    "control": (SCHEDULER_TO_NANNY, NANNY_TO_SCHEDULER),
}
SERVER_TO_CONNECTOR = tuple(answer for _, answer in ROLE_CHANNELS.values())
# The channel a request travels on -> the one its reply comes back on.
REPLY_CHANNEL = {
    CLIENT_TO_SCHEDULER: SCHEDULER_TO_CLIENT,
    SCHEDULER_TO_WORKER: WORKER_TO_SCHEDULER,
    PEER_TO_WORKER: WORKER_TO_PEER,
    SCHEDULER_TO_NANNY: NANNY_TO_SCHEDULER,
}

# -------------------------------------------------------------------- bounds --

MAX_KEY_CHARS = 1_024
MAX_ADDRESS_CHARS = 256
MAX_NAME_CHARS = 256
FUNCTION_ID_CHARS = 64  # hex of a 32-byte BLAKE2b digest (serialize.dumps_function)
MAX_REASON_CHARS = 4_096
MAX_TEXT_CHARS = 64 * 1024  # error messages and tracebacks
# Keys in one request or one-way message. Each message is one step of the
# receiver's driver, so this bounds how long one message can hold it;
# senders split longer lists into several messages.
MAX_KEYS = 10_000
# Keys in a reply (in practice `max_body_bytes` bounds a reply first).
MAX_REPLY_KEYS = 1_000_000
MAX_TASKS_PER_SUBMIT = 2_000
MAX_DEPENDENCIES = 100_000
MAX_RETRIES = 1_000
MAX_THREADS = 1_024
MAX_WORKERS = 100_000
MAX_NBYTES = 1 << 62
MAX_TIMEOUT_S = 86_400.0
MAX_FUNCTIONS_PER_SUBMIT = 1_024
MAX_METRICS = 64
# A task's user priority (`submit(priority=...)`), either sign.
MAX_PRIORITY = 1 << 31
# Resources a worker declares and a task asks for ({"GPU": 2}).
MAX_RESOURCES = 64
MAX_RESOURCE_NAME_CHARS = 64
MAX_RESOURCE_AMOUNT = 1e18
# Results this small (pickled) travel with the "finished" reports, so a
# client gets them without a round trip to the worker.
INLINE_VALUE_BYTES = 1024
# Wall-clock times (seconds since the epoch; virtual seconds in the
# simulator): up to the year 5138.
MAX_TIMESTAMP_S = 1e11
# How long a task may be said to have run (about 30 years).
MAX_DURATION_S = 1e9
# Task runs in one `get_task_stream` reply (the scheduler also ends a page
# at half of `max_body_bytes`), and most runs one call may ask for.
MAX_STREAM_PAGE = 5_000
MAX_STREAM_COUNT = 10_000_000
# Cluster events in one `get_cluster_metrics` reply; counters in it.
MAX_EVENTS = 1_000
MAX_COUNTERS = 64
# `Client.upload_file`: one file's bytes, and how many files a cluster keeps
# (each is sent to every worker that joins).
MAX_UPLOAD_BYTES = 64 << 20
MAX_UPLOADS = 256
# A plain file name with the suffix of a file Python can import from:
# no directory part, no leading dot.
_UPLOAD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.(py|zip|egg)").fullmatch


def is_upload_name(name: str) -> bool:
    """Whether `name` may be uploaded (``mod.py``, ``pkg.zip``, ``lib.egg``)."""
    return bool(_UPLOAD_NAME(name)) and ".." not in name


# Cached: the same few worker addresses come with every finished task (a
# client checks each key_finished's who_has), and parsing one costs more
# than the rest of the message's checks. Bounded, so a peer sending new
# addresses can fill at most ADDRESS_CACHE_SIZE x MAX_ADDRESS_CHARS
# (about 1 MB), and only with strings that passed the length check first.
ADDRESS_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def _is_address(text: str) -> bool:
    try:
        scheme, host, _ = parse_address(text)
    except ValueError:
        return False
    return scheme in ("tcp", "tls", "sim") and bool(host)


_is_hex = re.compile("[0-9a-f]*").fullmatch


KEY = Str(MAX_KEY_CHARS, min_chars=1, name="key")
KEYS = List(KEY, MAX_KEYS)
ADDRESS = Str(MAX_ADDRESS_CHARS, min_chars=1, name="address", test=_is_address)
ADDRESSES = List(ADDRESS, MAX_WORKERS)
NAME = Str(MAX_NAME_CHARS, min_chars=1, name="name")
REASON = Str(MAX_REASON_CHARS, name="text")
TEXT = Str(MAX_TEXT_CHARS, name="text")
FUNCTION_ID = Str(FUNCTION_ID_CHARS, min_chars=FUNCTION_ID_CHARS, name="function id", test=_is_hex)
NBYTES = Int(0, MAX_NBYTES)
PID = Nullable(Int(0, 1 << 31))
WHO_HAS = Map(KEY, ADDRESSES, MAX_KEYS)
KEY_NBYTES = Map(KEY, NBYTES, MAX_KEYS)
# A task's inputs: who holds each, and their sizes.
INPUTS_WHO_HAS = Map(KEY, ADDRESSES, MAX_DEPENDENCIES)
INPUTS_NBYTES = Map(KEY, NBYTES, MAX_DEPENDENCIES)
REPLY_KEYS = List(KEY, MAX_REPLY_KEYS)
METRICS = Map(Str(64, name="metric"), Float(-1e18, 1e18), MAX_METRICS)
TIMESTAMP = Float(0.0, MAX_TIMESTAMP_S)
SEQ = Int(0, 1 << 62)
RESOURCES = Map(
    Str(MAX_RESOURCE_NAME_CHARS, min_chars=1, name="resource name"),
    Float(1e-9, MAX_RESOURCE_AMOUNT),
    MAX_RESOURCES,
)


# ------------------------------------------------------------ the base class --


class Message(Record):
    """One op: a `Record` with an op name, channels and (for requests) a reply.

    Requests (ops with a ``reply``) carry a ``request_id`` chosen by the
    sender (`trioflow.comm.rpc.Requests`); the receiver answers with a
    `Reply` holding the same id.

    A ``held`` op is one whose news can wait for the sender's next message,
    as long as it is not lost if the sender dies: a batch made only of held
    messages is written with the socket corked (`Connection`, "Held
    messages"), so the kernel has its bytes but sends them with the next
    write, or after 200 ms.
    """

    OP: ClassVar[str] = ""
    CHANNELS: ClassVar[tuple[str, ...]] = ()
    REPLY: ClassVar[type[Record] | None] = None
    HELD: ClassVar[bool] = False
    _TRANSPORT_FIELDS = frozenset({"op", "request_id"})

    request_id: int | None = None

    def __init_subclass__(
        cls,
        op: str = "",
        channels: tuple[str, ...] = (),
        reply: type[Record] | None = None,
        held: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if op:
            if op in OPS:
                raise TypeError(f"op {op!r} is declared twice")
            if held and reply is not None:
                # Its answer would wait for the asker's next message (up to
                # 200 ms), which may be the one waiting for the answer.
                raise TypeError(f"op {op!r} is a request: it cannot be held")
            cls.OP, cls.CHANNELS, cls.REPLY, cls.HELD = op, channels, reply, held
            OPS[op] = cls

    def to_wire(self) -> dict[str, Any]:
        wire = self.wire_fields()
        wire["op"] = self.OP
        if self.request_id is not None:
            wire["request_id"] = self.request_id
        return wire


# op name -> its class, filled as the classes below are declared.
OPS: dict[str, type[Message]] = {}

REQUEST_ID = Int(0, (1 << 63) - 1)


class Reply(Message, op="reply", channels=SERVER_TO_CONNECTOR + (WORKER_TO_SCHEDULER,)):
    """The answer to a request: its fields, or an error text.

    The fields are checked by the side that asked, against the `REPLY` of
    the request it sent (`Requests.deliver`): only it knows which they are.
    """

    # `Reply` keeps the raw fields until the asker checks them.
    def __init__(self, request_id: int, fields: Record | None = None, error: str | None = None):
        self.request_id = request_id
        self.fields = fields
        self.error = error
        self.raw: dict[str, Any] = {}

    @classmethod
    def from_wire(cls, raw: dict, where: str) -> Reply:
        name = "request_id"
        try:
            reply = cls(REQUEST_ID.check(raw.get("request_id")))
            if "error" in raw:
                name = "error"
                reply.error = REASON.check(raw["error"])
        except FieldError as exc:
            exc.path.append(f".{name}")
            raise ProtocolError(exc.text(where)) from None
        reply.raw = raw
        return reply

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"op": "reply", "request_id": self.request_id}
        if self.error is not None:
            wire["error"] = self.error
        elif self.fields is not None:
            wire.update(self.fields.wire_fields())
        return wire

    def checked(self, expected: type[Record], op: str) -> Record:
        """The reply's fields, checked against the reply an `op` request promises."""
        fields = {k: v for k, v in self.raw.items() if k not in ("op", "request_id")}
        return expected.from_wire(fields, f"reply to {op!r}")

    def __repr__(self) -> str:
        return f"Reply({self.request_id}, error={clip(self.error)})" if self.error else f"Reply({self.request_id})"


def decode(raw: dict[str, Any], channel: str) -> Message:
    """The typed message for a map that arrived on `channel`.

    Raises:
        ProtocolError: unknown op, an op not allowed on this channel, or a
            field that breaks its declaration.
    """
    op = raw["op"]
    cls = OPS.get(op)
    if cls is None:
        raise ProtocolError(f"unknown op {clip(op)}")
    if channel not in cls.CHANNELS:
        raise ProtocolError(f"op {op!r} may not be sent {channel}")
    message = cls.from_wire(raw, repr(op))
    if reply_kind(cls, channel) is not None:
        request_id = raw.get("request_id")
        if type(request_id) is not int or not 0 <= request_id < 1 << 63:
            raise ProtocolError(f"{op!r}: a request needs an int 'request_id', got {clip(request_id, 40)}")
        message.request_id = request_id
    return message


class Invalid(Message):
    """Stands for a request (or a submission) that broke its declaration.

    A one-way message that breaks its declaration closes the connection. A
    request is answered instead, with an error naming the field and the
    bound ("every exchange either succeeds or replies with a clear error"),
    and a submission is refused with `SubmitRefused` for the keys it named,
    so the client's futures fail with the reason rather than hang. Never
    on the wire: `invalid` builds it from what arrived.
    """

    def __init__(self, op: str, request_id: int | None, reason: str, keys: list[str]):
        self.op = op
        self.request_id = request_id
        self.reason = reason
        self.keys = keys


def invalid(raw: dict[str, Any], channel: str, error: ProtocolError) -> Invalid | None:
    """An `Invalid` for `raw` if it is a request or a submission; else None."""
    cls = OPS.get(raw["op"])
    if cls is None or channel not in cls.CHANNELS:
        return None
    reason = str(error)[:MAX_REASON_CHARS]
    if cls is Submit:
        tasks = raw.get("tasks")
        found = [t.get("key") for t in tasks[:MAX_TASKS_PER_SUBMIT] if type(t) is dict] if type(tasks) is list else []
        keys = [k for k in found if type(k) is str and 0 < len(k) <= MAX_KEY_CHARS]
        return Invalid("submit", None, reason, list(dict.fromkeys(keys)))
    request_id = raw.get("request_id")
    if reply_kind(cls, channel) is None or type(request_id) is not int or not 0 <= request_id < 1 << 63:
        return None
    return Invalid(cls.OP, request_id, reason, [])


# ---------------------------------------------------------------- the hello --


class Hello(Message, op="hello", channels=(HELLO,)):
    """Who is calling, speaking which protocol; the first message on every link.

    Workers send their address and threads; clients their id. A worker's
    held values follow in `Register` messages, after the hello: before the
    hello a server reads at most a few KiB (design.md §6 rule 1).
    """

    role = Choice("client", "worker", "peer", "control")
    protocol = Int(0, 1 << 31)
    client_id = Optional(NAME)
    recovering = Optional(Bool(), False)
    address = Optional(ADDRESS)
    nthreads = Optional(Int(1, MAX_THREADS))
    pid = Optional(PID)
    nanny = Optional(ADDRESS)
    # What a worker offers to tasks that ask for resources ({"GPU": 2}).
    resources = Optional(RESOURCES, {})

    def check_fields(self) -> None:
        needed = {"client": ("client_id",), "worker": ("address", "nthreads")}.get(self.role, ())
        for name in needed:
            if getattr(self, name) is None:
                raise FieldError(f"a {self.role} hello needs field {name!r}")


class Welcome(Message, op="welcome", channels=(SCHEDULER_TO_CLIENT, SCHEDULER_TO_WORKER)):
    """Registration accepted; nothing else is sent before it."""

    address = ADDRESS


class Refused(Message, op="refused", channels=SERVER_TO_CONNECTOR):
    """The server will not serve this connection, and says why, then closes.

    Sent when the hello asks for something this port does not do (a client
    knocking on a worker's port), or is out of bounds. The connecting side
    raises with the reason instead of retrying blindly.
    """

    reason = REASON


# ----------------------------------------------------------- nested records --


class UserFailure(Record, tag=("kind", "user")):
    exception = Nullable(Pickled())
    type_name = NAME
    message = TEXT
    traceback = TEXT


class KilledWorkerFailure(Record, tag=("kind", "killed_worker")):
    key = KEY
    deaths = Int(0, 1 << 31)
    last_worker = ADDRESS


class LostDataFailure(Record, tag=("kind", "lost_data")):
    key = KEY


class CancelledFailure(Record, tag=("kind", "cancelled")):
    reason = REASON


FAILURE = Tagged(
    "kind",
    {
        "user": UserFailure,
        "killed_worker": KilledWorkerFailure,
        "lost_data": LostDataFailure,
        "cancelled": CancelledFailure,
    },
)
USER_FAILURE = Tagged("kind", {"user": UserFailure})


class TaskWire(Record):
    """One task of a `Submit`: a call to run, or scattered data to re-register."""

    key = KEY
    function_id = Optional(FUNCTION_ID)
    args = Optional(Pickled())
    dependencies = Optional(List(KEY, MAX_DEPENDENCIES), ())
    retries = Optional(Int(0, MAX_RETRIES), 0)
    workers = Optional(Nullable(ADDRESSES))
    # With `workers`: a preference, not a restriction (allow_other_workers).
    loose = Optional(Bool(), False)
    # {name: amount} the task holds on its worker while it runs.
    resources = Optional(Nullable(RESOURCES))
    # The user's priority: higher runs first.
    priority = Optional(Int(-MAX_PRIORITY, MAX_PRIORITY), 0)
    scattered = Optional(Bool(), False)

    def check_fields(self) -> None:
        if self.loose and self.workers is None:
            raise FieldError("'loose' needs 'workers'")
        if self.scattered:
            if self.function_id is not None or self.args is not None or self.dependencies:
                raise FieldError("scattered data has no function, arguments or dependencies")
        elif self.function_id is None or self.args is None:
            raise FieldError("a task needs 'function_id' and 'args' (or 'scattered': true)")


class WorkerInfo(Record):
    nthreads = Int(1, MAX_THREADS)
    processing = Int(0, 1 << 62)
    keys = Int(0, 1 << 62)
    pid = PID
    metrics = METRICS


class SchedulerInfo(Record):
    address = ADDRESS
    workers = Map(ADDRESS, Nested(WorkerInfo), MAX_WORKERS)
    tasks = Map(Str(32, name="state"), Int(0, 1 << 62), 16)
    clients = Int(0, 1 << 31)
    # The dashboard's address (``http://host:port/``), if the scheduler serves one.
    dashboard = Optional(Nullable(Str(MAX_ADDRESS_CHARS, name="URL")))


class RunOutcome(Record):
    """What one worker's call of a `run` function gave: exactly one field."""

    result = Optional(Pickled())
    failure = Optional(FAILURE)
    error = Optional(REASON)

    def check_fields(self) -> None:
        if sum(x is not None for x in (self.result, self.failure, self.error)) != 1:
            raise FieldError("exactly one of 'result', 'failure', 'error' is expected")


def _check_run_times(record: Record) -> None:
    """A run's `start` and `stop` come together, in order."""
    if (record.start is None) != (record.stop is None):
        raise FieldError("'start' and 'stop' come together or not at all")
    if record.start is not None and record.stop < record.start:
        raise FieldError(f"'stop' ({record.stop:g}) is before 'start' ({record.start:g})")


class TaskRun(Record):
    """One execution of a task, as its worker reported it: the task stream's unit."""

    seq = SEQ
    key = KEY
    worker = ADDRESS
    start = TIMESTAMP
    stop = TIMESTAMP
    status = Choice("OK", "error")
    nbytes = Optional(NBYTES)
    error = Optional(REASON)

    check_fields = _check_run_times


EVENT_KINDS = (
    "worker-joined",
    "worker-left",
    "worker-died",
    "killed-worker",
    "lost-data",
    "recomputing",
    "rescheduled",
    "restart",
)


class ClusterEvent(Record):
    """Something a person watching the cluster wants to know about (a worker left, why)."""

    seq = SEQ
    time = TIMESTAMP
    kind = Choice(*EVENT_KINDS)
    text = REASON
    worker = Optional(ADDRESS)
    count = Optional(Int(1, 1 << 62), 1)


# ---------------------------------------------------- replies (by request) --


class KeysReply(Record):
    keys = REPLY_KEYS


class WhoHasReply(Record):
    who_has = Map(KEY, ADDRESSES, MAX_REPLY_KEYS)


class HasWhatReply(Record):
    has_what = Map(ADDRESS, REPLY_KEYS, MAX_WORKERS)


class NThreadsReply(Record):
    nthreads = Map(ADDRESS, Int(1, MAX_THREADS), MAX_WORKERS)


class InfoReply(Record):
    info = Nested(SchedulerInfo)


class CountReply(Record):
    n = Int(0, MAX_WORKERS)


class RestartReply(Record):
    n_workers = Int(0, MAX_WORKERS)


class RunEverywhereReply(Record):
    results = Map(ADDRESS, Nested(RunOutcome), MAX_WORKERS)


class RunHereReply(Record):
    result = Optional(Pickled())
    failure = Optional(FAILURE)

    def check_fields(self) -> None:
        if (self.result is None) == (self.failure is None):
            raise FieldError("exactly one of 'result', 'failure' is expected")


class UploadEverywhereReply(Record):
    """Per worker: empty if it stored the file, else why not."""

    results = Map(ADDRESS, REASON, MAX_WORKERS)


class UploadHereReply(Record):
    pass


class PutDataReply(Record):
    nbytes = Map(KEY, NBYTES, MAX_REPLY_KEYS)


class GetDataReply(Record):
    data = Map(KEY, Pickled(), MAX_REPLY_KEYS)
    missing = REPLY_KEYS
    errors = Map(KEY, REASON, MAX_REPLY_KEYS)
    # Held here, but too big to travel with the values before them within
    # the asker's budget: ask again (each fits alone). None: no such key.
    later = Optional(Nullable(REPLY_KEYS))


class PidReply(Record):
    pid = PID


class TaskStreamReply(Record):
    runs = List(Nested(TaskRun), MAX_STREAM_PAGE)
    # The newest run this answer chose from: the next page asks with it.
    until = SEQ
    more = Bool()


class ClusterMetricsReply(Record):
    counters = Map(Str(64, name="counter"), Float(0.0, 1e18), MAX_COUNTERS)
    tasks = Map(Str(32, name="state"), Int(0, 1 << 62), 16)
    workers = Int(0, MAX_WORKERS)
    events = List(Nested(ClusterEvent), MAX_EVENTS)


# ---------------------------------------------------- client -> scheduler --


class Submit(Message, op="submit", channels=(CLIENT_TO_SCHEDULER,)):
    """Add tasks; keys among their dependencies must be known or in this batch.

    `functions` carries, by id, every function these tasks call: the id is
    the digest of the bytes, checked on arrival, so no client can register
    bytes under another function's id.
    """

    tasks = List(Nested(TaskWire), MAX_TASKS_PER_SUBMIT)
    functions = Map(FUNCTION_ID, Pickled(), MAX_FUNCTIONS_PER_SUBMIT)
    wanted = KEYS


class ReleaseKeys(Message, op="release_keys", channels=(CLIENT_TO_SCHEDULER,)):
    """The client dropped its last future for each key."""

    keys = KEYS


class CancelKeys(Message, op="cancel_keys", channels=(CLIENT_TO_SCHEDULER,)):
    """Cancel these and every dependent this client holds."""

    keys = KEYS
    reason = Optional(REASON, "cancelled by the client")


class MissingData(Message, op="missing_data", channels=(CLIENT_TO_SCHEDULER,)):
    """These holders answered the client that they do not have `key` (one that did not answer is not named)."""

    key = KEY
    holders = ADDRESSES


class FireAndForget(Message, op="fire_and_forget", channels=(CLIENT_TO_SCHEDULER,)):
    """Compute these keys (of this client's) even once no client holds them."""

    keys = KEYS


class ClientHeartbeat(Message, op="client_heartbeat", channels=(CLIENT_TO_SCHEDULER,)):
    """Sent by an idle client, so that its connection is not closed as idle."""


class Scatter(Message, op="scatter", channels=(CLIENT_TO_SCHEDULER,), reply=KeysReply):
    """Place these values on workers; the reply comes once they hold them."""

    data = Map(KEY, Pickled(), MAX_KEYS)
    broadcast = Optional(Bool(), False)


class Replicate(Message, op="replicate", channels=(CLIENT_TO_SCHEDULER,), reply=WhoHasReply):
    """Keep `n` copies of each key (at most one per worker)."""

    keys = KEYS
    n = Int(1, MAX_WORKERS)


class RunEverywhere(Message, op="run", channels=(CLIENT_TO_SCHEDULER, SCHEDULER_TO_WORKER), reply=None):
    """Call a function on every worker, or on `workers` (from a client), or on this worker (from the scheduler)."""

    function = Pickled()
    workers = Optional(Nullable(ADDRESSES))


class RunOnScheduler(Message, op="run_on_scheduler", channels=(CLIENT_TO_SCHEDULER,), reply=RunHereReply):
    """Call a function in the scheduler's process (in a thread of its own)."""

    function = Pickled()


UPLOAD_NAME = Str(MAX_NAME_CHARS, min_chars=1, name="file name", test=is_upload_name)


class UploadFile(Message, op="upload_file", channels=(CLIENT_TO_SCHEDULER, SCHEDULER_TO_WORKER), reply=None):
    """Store a .py, .zip or .egg file where every worker imports from (and on workers that join later)."""

    filename = UPLOAD_NAME
    # The file's bytes, pickled (so they travel as a frame of their own,
    # not in the message body); only a worker unpickles them.
    data = Pickled(max_bytes=MAX_UPLOAD_BYTES + 1024)


class Restart(Message, op="restart", channels=(CLIENT_TO_SCHEDULER,), reply=RestartReply):
    """Restart every worker through its nanny; flush all tasks."""

    timeout = Optional(Nullable(Float(0.001, MAX_TIMEOUT_S)))


class WhoHas(Message, op="who_has", channels=(CLIENT_TO_SCHEDULER,), reply=WhoHasReply):
    """Which workers hold these keys (all keys if nil)."""

    keys = Optional(Nullable(KEYS))


class HasWhat(Message, op="has_what", channels=(CLIENT_TO_SCHEDULER,), reply=HasWhatReply):
    """Which keys each worker holds."""


class NThreads(Message, op="nthreads", channels=(CLIENT_TO_SCHEDULER,), reply=NThreadsReply):
    """How many threads each worker has."""


class GetSchedulerInfo(Message, op="scheduler_info", channels=(CLIENT_TO_SCHEDULER,), reply=InfoReply):
    """The scheduler's address, its workers (with their last heartbeat's
    metrics) and its task counts by state."""


class WaitForWorkers(Message, op="wait_for_workers", channels=(CLIENT_TO_SCHEDULER,), reply=CountReply):
    """Answered once `n` workers are registered (or never, if the asker leaves first)."""

    n = Int(1, MAX_WORKERS)


class GetTaskStream(Message, op="get_task_stream", channels=(CLIENT_TO_SCHEDULER,), reply=TaskStreamReply):
    """One page of the task stream: the runs numbered after `after`, up to `until`.

    The first page leaves `until` nil (the scheduler picks its newest run
    and returns it); later pages send it back with the last `seq` they got
    as `after`. `start` and `stop` (wall-clock seconds) keep runs that
    overlap that window; `count` keeps the newest `count` of those.
    """

    start = Optional(Nullable(TIMESTAMP))
    stop = Optional(Nullable(TIMESTAMP))
    count = Optional(Nullable(Int(0, MAX_STREAM_COUNT)))
    after = Optional(SEQ, 0)
    until = Optional(Nullable(SEQ))


class GetClusterMetrics(Message, op="get_cluster_metrics", channels=(CLIENT_TO_SCHEDULER,), reply=ClusterMetricsReply):
    """The scheduler's counters (runs, deaths, KilledWorker, ...), its task counts and the
    cluster events numbered after `events_after`."""

    events_after = Optional(SEQ, 0)


# ---------------------------------------------------- scheduler -> client --


class KeyFinished(Message, op="key_finished", channels=(SCHEDULER_TO_CLIENT,)):
    """The value exists on `who_has`; a small one travels along as `value`."""

    key = KEY
    who_has = ADDRESSES
    value = Optional(Pickled(max_bytes=INLINE_VALUE_BYTES))


class KeyErred(Message, op="key_erred", channels=(SCHEDULER_TO_CLIENT,)):
    """The task failed; `origin` is the key that failed first."""

    key = KEY
    origin = KEY
    failure = FAILURE


class KeysErred(Message, op="keys_erred", channels=(SCHEDULER_TO_CLIENT,)):
    """Tasks that failed with one failure (a cancel); `origins[i]` failed first for `keys[i]`."""

    keys = KEYS
    origins = KEYS
    failure = FAILURE

    def check_fields(self) -> None:
        if len(self.origins) != len(self.keys):
            raise FieldError(f"'origins' has {len(self.origins)} keys for {len(self.keys)} in 'keys'")


class KeyLost(Message, op="key_lost", channels=(SCHEDULER_TO_CLIENT,)):
    """The value was lost and is being recomputed."""

    key = KEY


class Restarted(Message, op="restarted", channels=(SCHEDULER_TO_CLIENT,)):
    """The cluster was restarted: every future is cancelled."""


class SubmitRefused(Message, op="submit_refused", channels=(SCHEDULER_TO_CLIENT,)):
    """The tasks of one submit were refused (a cycle, an unknown function...)."""

    keys = KEYS
    reason = REASON


# ---------------------------------------------------- worker -> scheduler --


class Register(Message, op="register", channels=(WORKER_TO_SCHEDULER,)):
    """After its hello, what a worker already holds and runs, in chunks.

    Non-empty after a scheduler restart. The scheduler registers the worker
    (and sends its welcome) once the chunk with `done` arrives.
    """

    held = KEY_NBYTES
    running = KEYS
    done = Bool()


class Heartbeat(Message, op="heartbeat", channels=(WORKER_TO_SCHEDULER,)):
    """Sent when the link has been quiet for `heartbeat_interval`."""

    metrics = Optional(METRICS, {})


class TaskStarted(Message, op="task_started", channels=(WORKER_TO_SCHEDULER,), held=True):
    """The function is about to run (written before it does).

    Held: the scheduler needs it at once only if the function kills the
    worker (KilledWorker), and then the kernel delivers it as the process's
    socket closes. Otherwise it goes with the worker's next message (most
    often the task's `task_finished`), or after 200 ms: the scheduler is
    not woken for it alone while a short task runs.
    """

    key = KEY


class TaskFinished(Message, op="task_finished", channels=(WORKER_TO_SCHEDULER,)):
    """The value is stored here; counts only from the worker the task is on.

    `start` and `stop` are when the function ran, by the worker's wall
    clock: the task stream (docs/dashboard.md), never a decision.
    `duration` is how long it ran by the worker's Trio clock (virtual
    seconds in the simulator): work stealing's estimates are made of it.
    """

    key = KEY
    nbytes = NBYTES
    value = Optional(Pickled(max_bytes=INLINE_VALUE_BYTES))
    start = Optional(TIMESTAMP)
    stop = Optional(TIMESTAMP)
    duration = Optional(Nullable(Float(0.0, MAX_DURATION_S)))

    check_fields = _check_run_times


class TaskErred(Message, op="task_erred", channels=(WORKER_TO_SCHEDULER,)):
    """The function raised; counts only from the worker the task is on.

    `start` and `stop`: as for `task_finished`.
    """

    key = KEY
    failure = USER_FAILURE
    start = Optional(TIMESTAMP)
    stop = Optional(TIMESTAMP)

    check_fields = _check_run_times


class ReplicaAdded(Message, op="replica_added", channels=(WORKER_TO_SCHEDULER,)):
    """A copy is stored here (fetched for a task, or asked for)."""

    key = KEY
    nbytes = NBYTES


class ReplicaMissing(Message, op="replica_missing", channels=(WORKER_TO_SCHEDULER,)):
    """No holder could provide `key` (for `dependent`, or a requested copy).

    `holders` names those that answered that they do not have it; a holder
    that did not answer (hung, unreachable) is not named: it may still hold
    it, and the scheduler judges its liveness."""

    key = KEY
    holders = ADDRESSES
    dependent = Optional(Nullable(KEY))


class DataDropped(Message, op="data_dropped", channels=(WORKER_TO_SCHEDULER,)):
    """These values were freed here (the free may have crossed a report of them)."""

    keys = KEYS


class Goodbye(Message, op="goodbye", channels=(WORKER_TO_SCHEDULER,)):
    """Leaving on purpose: running tasks are not suspected."""


class StealResponse(Message, op="steal_response", channels=(WORKER_TO_SCHEDULER,)):
    """The answer to `steal_request` `steal_id`: the task was given up (it had
    not started here, and will not), or kept."""

    key = KEY
    steal_id = SEQ
    given_up = Bool()


class Paused(Message, op="paused", channels=(WORKER_TO_SCHEDULER,)):
    """This worker's memory passed its pause fraction: send it nothing new.
    (Sent again after a reconnection while it lasts.)"""


class Resumed(Message, op="resumed", channels=(WORKER_TO_SCHEDULER,)):
    """This worker's memory is back under its pause fraction."""


# ---------------------------------------------------- scheduler -> worker --


class HeartbeatAck(Message, op="heartbeat_ack", channels=(SCHEDULER_TO_WORKER,)):
    """Answer to a heartbeat, sent by the reader (not queued behind work)."""


class ComputeTask(Message, op="compute_task", channels=(SCHEDULER_TO_WORKER,)):
    """Run it here. `function` comes only while this worker lacks that id."""

    key = KEY
    function_id = FUNCTION_ID
    function = Optional(Pickled())
    args = Pickled()
    priority = List(Int(-(1 << 63), (1 << 63) - 1), 8)
    who_has = INPUTS_WHO_HAS
    nbytes = INPUTS_NBYTES


class StealRequest(Message, op="steal_request", channels=(SCHEDULER_TO_WORKER,)):
    """Give this task up for another worker if it has not started here;
    answer with `steal_response` carrying `steal_id`."""

    key = KEY
    steal_id = SEQ


class FreeKeys(Message, op="free_keys", channels=(SCHEDULER_TO_WORKER,)):
    """Drop these values or pending runs.

    `reports_heard`: how many `task_finished` and `replica_added` the
    scheduler had handled from this worker, on this connection, when it
    decided these frees. A value whose last report is among them cannot be
    crossing the free, so its drop needs no `data_dropped` answer."""

    keys = KEYS
    reports_heard = Optional(SEQ, 0)


class FreeFunctions(Message, op="free_functions", channels=(SCHEDULER_TO_WORKER,)):
    """No task on this worker calls these any more: drop them."""

    function_ids = List(FUNCTION_ID, MAX_KEYS)


class AcquireReplicas(Message, op="acquire_replicas", channels=(SCHEDULER_TO_WORKER,)):
    """Fetch copies of these keys from these holders."""

    who_has = WHO_HAS
    nbytes = KEY_NBYTES


class PutData(Message, op="put_data", channels=(SCHEDULER_TO_WORKER,), reply=PutDataReply):
    """Store scattered values here."""

    data = Map(KEY, Pickled(), MAX_KEYS)


class Close(Message, op="close", channels=(SCHEDULER_TO_WORKER,)):
    """Leave (a restart of a worker without a nanny)."""

    reason = REASON


# --------------------------------------------------- anyone -> worker port --


class GetData(Message, op="get_data", channels=(PEER_TO_WORKER,), reply=GetDataReply):
    """Send these values; values never pass through the scheduler."""

    keys = KEYS


# ---------------------------------------------------- scheduler -> nanny --


class RestartWorker(Message, op="restart_worker", channels=(SCHEDULER_TO_NANNY,), reply=PidReply):
    """Replace the worker now; the reply carries the new process id."""


# `run` answers differently by where it goes: every worker's outcome to a
# client, one outcome from a worker. Its reply is chosen per channel.
RUN_REPLIES = {CLIENT_TO_SCHEDULER: RunEverywhereReply, SCHEDULER_TO_WORKER: RunHereReply}
# `upload_file` likewise: every worker's answer to a client, one from a worker.
UPLOAD_REPLIES = {CLIENT_TO_SCHEDULER: UploadEverywhereReply, SCHEDULER_TO_WORKER: UploadHereReply}


def reply_kind(request: type[Message], channel: str) -> type[Record] | None:
    """The reply record of `request` sent on `channel` (None: one-way)."""
    if request is RunEverywhere:
        return RUN_REPLIES[channel]
    if request is UploadFile:
        return UPLOAD_REPLIES[channel]
    return request.REPLY


def is_request(message: Message, channel: str) -> bool:
    return reply_kind(type(message), channel) is not None


