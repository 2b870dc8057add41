"""A hostile peer: trioflow's wire format spoken by hand, for attack tests.

The tests in `test_hostile_peers.py` play a stranger who reached a
trioflow port. That stranger must not borrow trioflow's own comm layer:
the point of those tests is to pin what a server does with bytes it did
not expect, and they must keep meaning the same thing when `trioflow.comm`
is rewritten. So this module writes and reads the bytes of
docs/protocol.md itself, with msgpack and pickle and nothing from trioflow:

    u32 n_frames (little-endian), then one u64 length per frame, then the
    frames. Frame 0 is a msgpack array of messages (maps with a string
    "op"); a pickled value inside a message is msgpack extension 1 whose
    4-byte payload (u32) counts the frames it owns (the pickle stream,
    then its out-of-band buffers), claimed in the order values appear.

Before any of that, both ends prove a token (docs/security.md): `connect`
does it by hand too (`authenticate`), as a peer holding the session's token
(`TRIOFLOW_TOKEN`, set by tests/conftest.py), since the findings are about
what a *connected* peer can do whatever its credentials. `connect(...,
authenticate=False)` is a stranger without any.

Every wait here is bounded (a `timeout` argument, in seconds), so a server
that hangs makes a test fail instead of hang.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import pickle
import secrets
import struct
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import cloudpickle
import msgpack
import trio

EXT_PICKLED = 1
PROTOCOL_VERSION = 1
READ_CHUNK_BYTES = 1 << 16
# Largest batch we accept from the server we attack; we only ever expect
# small replies, so anything bigger is a test bug or a server bug.
MAX_INCOMING_FRAME_BYTES = 64 << 20

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Pickled:
    """A Python value as it travels: a pickle stream plus out-of-band buffers."""

    def __init__(self, frames: list[bytes]):
        self.frames = frames

    @classmethod
    def of(cls, value: Any) -> Pickled:
        """Pickle `value` (protocol 5, cloudpickle, big buffers out of band)."""
        buffers: list[bytes] = []

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:
            buffers.append(bytes(buffer.raw()))
            return False

        return cls([cloudpickle.dumps(value, protocol=5, buffer_callback=out_of_band), *buffers])

    def load(self) -> Any:
        return pickle.loads(self.frames[0], buffers=self.frames[1:])

    def __repr__(self) -> str:
        return f"<Pickled {len(self.frames)} frames>"


# ------------------------------------------------------------------ bytes --


def batch_header(lengths: Iterable[int]) -> bytes:
    """The header announcing frames of these lengths (no frame bytes)."""
    lengths = list(lengths)
    return _U32.pack(len(lengths)) + b"".join(_U64.pack(n) for n in lengths)


def frame_batch(frames: list[bytes]) -> bytes:
    """A whole batch: header, then the frames themselves."""
    return batch_header(len(f) for f in frames) + b"".join(frames)


def pack_messages(messages: Iterable[dict]) -> list[bytes]:
    """The frames of a batch carrying `messages` (frame 0 first)."""
    buffers: list[bytes] = []

    def default(obj: Any) -> Any:
        if isinstance(obj, Pickled):
            buffers.extend(obj.frames)
            return msgpack.ExtType(EXT_PICKLED, _U32.pack(len(obj.frames)))
        raise TypeError(f"cannot pack a {type(obj).__name__}")

    body = msgpack.packb(list(messages), default=default, use_bin_type=True)
    return [body, *buffers]


def encode_batch(*messages: dict) -> bytes:
    return frame_batch(pack_messages(messages))


def decode_frames(frames: list[bytes]) -> list[dict]:
    """The messages of a received batch; pickled values become `Pickled`."""
    next_frame = 1

    def ext_hook(code: int, data: bytes) -> Any:
        nonlocal next_frame
        if code != EXT_PICKLED:
            return msgpack.ExtType(code, data)
        (count,) = _U32.unpack(data)
        value = Pickled(frames[next_frame : next_frame + count])
        next_frame += count
        return value

    return msgpack.unpackb(frames[0], ext_hook=ext_hook, raw=False, strict_map_key=False)


def msgpack_bomb(n_arrays: int = 12, per_array: int = 1_000_000) -> bytes:
    """Frame 0 of a decoding bomb: ~1 byte per empty array it decodes to.

    `n_arrays` arrays of `per_array` empty msgpack arrays each (0x90), so no
    single array is longer than a per-array limit of 1,000,000 entries, yet
    the whole decodes to n_arrays * per_array Python lists (~64 bytes each).
    """
    inner = b"\xdd" + per_array.to_bytes(4, "big") + b"\x90" * per_array
    return b"\xdd" + n_arrays.to_bytes(4, "big") + inner * n_arrays


# ------------------------------------------------------------- a connection --


class PeerClosed(Exception):
    """The server closed (or reset) the connection."""


class RawPeer:
    """One TCP connection to a trioflow server, driven by hand."""

    def __init__(self, stream: trio.SocketStream, address: str):
        self.stream = stream
        self.address = address
        self._buffer = bytearray()
        self._send_lock = trio.Lock()
        self.closed_by_server = False
        # Every message received so far, in order (also those skipped by
        # `next_message` and `request`).
        self.received: list[dict] = []
        # Received but not yet handed out by `next_message`.
        self._pending: list[dict] = []

    # -- sending --

    async def send_bytes(self, data: bytes) -> None:
        """Write raw bytes.

        Raises:
            PeerClosed: the server has closed the connection.
        """
        try:
            async with self._send_lock:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.closed_by_server = True
            raise PeerClosed(f"{self.address}: write failed: {exc!r}") from None

    async def send(self, *messages: dict) -> None:
        """Send `messages` as one batch."""
        await self.send_bytes(encode_batch(*messages))

    async def say_hello(self, role: str, **fields: Any) -> None:
        await self.send({"op": "hello", "role": role, "protocol": PROTOCOL_VERSION, **fields})

    # -- receiving --

    async def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            try:
                chunk = await self.stream.receive_some(READ_CHUNK_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.closed_by_server = True
                raise PeerClosed(f"{self.address}: read failed: {exc!r}") from None
            if not chunk:
                self.closed_by_server = True
                raise PeerClosed(f"{self.address} closed the connection")
            self._buffer += chunk
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    async def receive_batch(self, timeout: float = 5.0) -> list[dict]:
        """The messages of the next batch.

        Raises:
            PeerClosed: the server closed the connection first.
            trio.TooSlowError: nothing complete within `timeout` seconds.
        """
        with trio.fail_after(timeout):
            (n_frames,) = _U32.unpack(await self._read_exactly(4))
            lengths = struct.unpack(f"<{n_frames}Q", await self._read_exactly(8 * n_frames))
            if any(n > MAX_INCOMING_FRAME_BYTES for n in lengths):
                raise AssertionError(f"{self.address} announced frames of {lengths} bytes")
            frames = [await self._read_exactly(n) for n in lengths]
        messages = decode_frames(frames)
        self.received.extend(messages)
        return messages

    async def next_message(self, timeout: float = 5.0, skip: tuple[str, ...] = ("heartbeat_ack",)) -> dict:
        """The next message whose op is not in `skip` (bounded by `timeout`)."""
        deadline = trio.current_time() + timeout
        while True:
            while self._pending:
                message = self._pending.pop(0)
                if message.get("op") not in skip:
                    return message
            self._pending.extend(await self.receive_batch(max(0.0, deadline - trio.current_time())))

    async def request(self, message: dict, request_id: int, timeout: float = 5.0) -> dict:
        """Send a request and return its reply (other messages are kept in `received`)."""
        await self.send({**message, "request_id": request_id})
        deadline = trio.current_time() + timeout
        while True:
            answer = await self.next_message(max(0.0, deadline - trio.current_time()))
            if answer.get("op") == "reply" and answer.get("request_id") == request_id:
                return answer

    async def wait_closed(self, timeout: float) -> bool:
        """Read (and keep) whatever comes until the server closes the
        connection; True if it did within `timeout` seconds."""
        with trio.move_on_after(timeout):
            try:
                while True:
                    self._pending.extend(await self.receive_batch(math.inf))
            except PeerClosed:
                return True
        return False

    # -- the hello of each role --

    async def hello_client(self, client_id: str = "raw-client", timeout: float = 5.0) -> dict:
        """Register as a client; return the welcome."""
        await self.say_hello("client", client_id=client_id)
        welcome = await self.next_message(timeout)
        assert welcome.get("op") == "welcome", f"expected a welcome, got {welcome!r:.300}"
        return welcome

    async def hello_worker(
        self,
        address: str,
        *,
        nthreads: int = 1,
        held: dict[str, int] | None = None,
        running: list[str] | None = None,
        pid: int | None = None,
        nanny: str | None = None,
    ) -> None:
        """Send a worker's hello and its registration of what it holds and
        runs (the caller reads what comes back)."""
        await self.say_hello("worker", address=address, nthreads=nthreads, pid=pid, nanny=nanny)
        await self.send({"op": "register", "held": held or {}, "running": running or [], "done": True})

    async def heartbeats(self, interval: float = 0.5) -> None:
        """Send a worker heartbeat every `interval` seconds until cancelled
        or closed, so the scheduler does not drop this fake worker."""
        while True:
            try:
                await self.send({"op": "heartbeat", "metrics": {}})
            except PeerClosed:
                return
            await trio.sleep(interval)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


def parse_tcp_address(address: str) -> tuple[str, int]:
    scheme, _, rest = address.partition("://")
    assert scheme == "tcp", address
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)


def token_secret(token: str, role: str) -> bytes:
    """The secret of `role` in a cluster token (the client's is derived from it)."""
    prefix, _, body = token.strip().partition(":")
    secret = base64.urlsafe_b64decode(body)
    if prefix == "trioflow-client-v1":
        assert role == "client", "a client token proves the client role only"
        return secret
    assert prefix == "trioflow-cluster-v1", prefix
    if role == "cluster":
        return secret
    return hmac.new(secret, b"trioflow client credential v1", hashlib.sha256).digest()


async def authenticate(stream: trio.abc.Stream, token: str, role: str = "cluster", timeout: float = 5.0) -> None:
    """The challenge-response of docs/security.md, from the connecting side.

    Raises:
        AssertionError: the server's proof does not check out (or it refused).
    """
    key = token_secret(token, role)
    role_byte = {"client": 1, "cluster": 2}[role]
    nonce_c = secrets.token_bytes(32)
    with trio.fail_after(timeout):
        await stream.send_all(b"TFLW" + bytes([1, role_byte]) + nonce_c)
        answer = b""
        while len(answer) < 69:
            try:
                chunk = await stream.receive_some(69 - len(answer))
            except (trio.BrokenResourceError, OSError):
                chunk = b""
            if not chunk:
                raise PeerClosed("the server closed the connection during authentication")
            answer += chunk
    assert answer[:4] == b"TFLW" and answer[4] == 0, f"authentication refused: status {answer[4]}"
    nonce_s, proof_s = answer[5:37], answer[37:]
    label = b"trioflow-auth-v1 "
    expected = hmac.new(key, label + b"server" + bytes([role_byte]) + nonce_c + nonce_s, hashlib.sha256).digest()
    assert hmac.compare_digest(proof_s, expected), "the server does not hold our token"
    await stream.send_all(
        hmac.new(key, label + b"client" + bytes([role_byte]) + nonce_c + nonce_s, hashlib.sha256).digest()
    )


@asynccontextmanager
async def connect(
    address: str, timeout: float = 5.0, *, authenticate_as: str | None = "cluster", token: str | None = None
) -> AsyncIterator[RawPeer]:
    """A raw connection to `address` (``tcp://host:port``), closed on exit.

    Authenticated as `authenticate_as` with `token` (default: the session's
    `TRIOFLOW_TOKEN`); ``authenticate_as=None`` sends nothing first.
    """
    host, port = parse_tcp_address(address)
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, port)
    peer = RawPeer(stream, address)
    try:
        if authenticate_as is not None:
            try:
                await authenticate(stream, token or os.environ["TRIOFLOW_TOKEN"], authenticate_as, timeout)
            except PeerClosed:
                peer.closed_by_server = True  # (turned away at once: a connection cap)
        yield peer
    finally:
        await peer.aclose()


# ---------------------------------------------------------- what a client sends --


def task_message(
    key: str,
    function_id: str,
    args: tuple = (),
    *,
    dependencies: list[str] | None = None,
    retries: int = 0,
    workers: list[str] | None = None,
) -> dict:
    """One task of a `submit` message, calling ``function(*args)``."""
    return {
        "key": key,
        "function_id": function_id,
        "args": Pickled.of((tuple(args), {})),
        "dependencies": dependencies or [],
        "retries": retries,
        "workers": workers,
    }


def submit_message(tasks: list[dict], functions: dict[str, Pickled], wanted: list[str] | None = None) -> dict:
    return {
        "op": "submit",
        "tasks": tasks,
        "functions": functions,
        "wanted": [t["key"] for t in tasks] if wanted is None else wanted,
    }


# ------------------------------------------------------------ a fake worker --


async def serve_forged_data(
    values: dict[str, Any], *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen on loopback and answer every ``get_data`` with `values`.

    The address of a fake worker that claims to hold keys: whoever fetches
    from it gets the forged values. Runs until cancelled.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def answer(stream: trio.SocketStream) -> None:
        peer = RawPeer(stream, "a fetcher")
        try:
            while True:
                message = await peer.next_message(timeout=math.inf)
                if message.get("op") == "get_data":
                    keys = [k for k in message.get("keys", []) if k in values]
                    await peer.send(
                        {
                            "op": "reply",
                            "request_id": message.get("request_id"),
                            "data": {k: Pickled.of(values[k]) for k in keys},
                            "missing": [k for k in message.get("keys", []) if k not in values],
                            "errors": {},
                        }
                    )
        except PeerClosed:
            pass
        finally:
            await peer.aclose()

    task_status.started(f"tcp://127.0.0.1:{port}")
    await trio.serve_listeners(answer, listeners)
