"""Who may talk to whom: credentials, and the challenge-response that opens every connection.

Anyone who can reach a port is a stranger until proven otherwise
(design.md §6 rule 1). Before a single msgpack byte is read, both ends of
every connection prove that they hold the secret of a *role*:

* **cluster**: the scheduler, nannies and workers. A cluster credential may
  register a worker, fetch from workers, and reach a nanny's control port.
* **client**: whoever submits work. A client credential may talk to the
  scheduler as a client and fetch results from workers' data ports;
  nothing else.

The client secret is derived from the cluster secret (an HMAC of it), so a
cluster member holds both and hands out only the client one; a client
cannot work back to the cluster secret.

The exchange, all of it fixed-size binary, read with exact lengths under
`handshake_timeout` (a stranger costs us 38 bytes)::

    connector -> acceptor   "TFLW" | version | role | nonce_c (32)             38 bytes
    acceptor -> connector   "TFLW" | status  | nonce_s (32) | proof_s (32)    69 bytes
    connector -> acceptor   proof_c (32)                                       32 bytes

    proof_s = HMAC-SHA256(key, "trioflow-auth-v1 server" | role | nonce_c | nonce_s)
    proof_c = HMAC-SHA256(key, "trioflow-auth-v1 client" | role | nonce_c | nonce_s)

The acceptor proves itself first, so a connector with a wrong or missing
token learns it at once (and raises `AuthenticationError`) without ever
sending a proof; the labels differ by direction, so neither side can be
used to compute the other's proof. Fresh nonces from both sides make every
proof single-use; proofs are compared in constant time (`hmac.compare_digest`).

What this does not do: encrypt. Anyone on the path can read the traffic
(and, between the handshake and the first message, splice into it). Use
``tls://`` addresses (`trioflow.comm.security`) for that; authentication
runs inside TLS then, and both combine.

`--no-auth` makes a process use the empty secret for both roles: it then
talks only to other `--no-auth` processes, and anyone can talk to it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

import trio

from trioflow.comm.network import Network, connect_with_timeout
from trioflow.config import Config
from trioflow.errors import AuthenticationError, CommClosedError

logger = logging.getLogger("trioflow.comm")

MAGIC = b"TFLW"
VERSION = 1
NONCE_BYTES = 32
PROOF_BYTES = 32
HELLO_BYTES = len(MAGIC) + 2 + NONCE_BYTES  # 38
ANSWER_BYTES = len(MAGIC) + 1 + NONCE_BYTES + PROOF_BYTES  # 69

CLUSTER = "cluster"
CLIENT = "client"
ANY_CREDENTIAL = frozenset({CLIENT, CLUSTER})
_ROLE_BYTES = {CLIENT: 1, CLUSTER: 2}
_ROLES_BY_BYTE = {v: k for k, v in _ROLE_BYTES.items()}

# The acceptor's status byte.
OK = 0
ROLE_NOT_SERVED = 1  # this port does not serve the role asked for
NO_CREDENTIAL = 2  # this process holds no secret for the role

_CLUSTER_PREFIX = "trioflow-cluster-v1:"
_CLIENT_PREFIX = "trioflow-client-v1:"
SECRET_BYTES = 32

# Where a process finds its token when nothing else says: `TRIOFLOW_TOKEN`
# (the token itself, either kind), else these files (`Config.token_file`,
# `Config.client_token_file`).
TOKEN_VARIABLE = "TRIOFLOW_TOKEN"


def _derive_client_secret(cluster: bytes) -> bytes:
    return hmac.new(cluster, b"trioflow client credential v1", hashlib.sha256).digest()


class Credentials:
    """The secrets one process holds: the cluster's (optional) and the clients'.

    Build one with `generate` (a new cluster), `from_token` (what a token
    file or `TRIOFLOW_TOKEN` holds), or `Credentials.none()` (``--no-auth``).
    """

    def __init__(
        self,
        cluster: bytes | None,
        client: bytes,
        *,
        enabled: bool = True,
        nonce: Callable[[int], bytes] = secrets.token_bytes,
    ):
        self._cluster = cluster
        self._client = client
        self.enabled = enabled
        # Where challenges come from: the operating system's CSPRNG; the
        # chaos lab passes a seeded source, so its runs replay exactly.
        self.nonce = nonce

    @classmethod
    def generate(cls) -> Credentials:
        """Fresh credentials for a new cluster (its client secret derived)."""
        return cls.from_cluster_secret(secrets.token_bytes(SECRET_BYTES))

    @classmethod
    def from_cluster_secret(cls, secret: bytes, nonce: Callable[[int], bytes] = secrets.token_bytes) -> Credentials:
        """The credentials of the cluster whose secret is `secret`."""
        return cls(secret, _derive_client_secret(secret), nonce=nonce)

    @classmethod
    def none(cls) -> Credentials:
        """No authentication (``--no-auth``): the empty secret, for both roles."""
        return cls(b"", b"", enabled=False)

    @classmethod
    def from_token(cls, text: str, *, source: str = "the token") -> Credentials:
        """Parse a token (``trioflow-cluster-v1:...`` or ``trioflow-client-v1:...``).

        Raises:
            AuthenticationError: the text is not a token (`source` says
                where it came from; the token itself is never echoed).
        """
        text = text.strip()
        for prefix in (_CLUSTER_PREFIX, _CLIENT_PREFIX):
            if text.startswith(prefix):
                try:
                    secret = base64.urlsafe_b64decode(text[len(prefix) :].encode("ascii"))
                except (ValueError, UnicodeEncodeError):
                    break
                if len(secret) != SECRET_BYTES:
                    break
                if prefix == _CLUSTER_PREFIX:
                    return cls(secret, _derive_client_secret(secret))
                return cls(None, secret)
        raise AuthenticationError(
            f"{source} is not a trioflow token (expected '{_CLUSTER_PREFIX}...' or '{_CLIENT_PREFIX}...')"
        )

    @property
    def is_cluster(self) -> bool:
        return self._cluster is not None

    def key(self, role: str) -> bytes | None:
        """The secret for `role`, or None if this process does not hold it."""
        return self._cluster if role == CLUSTER else self._client

    def cluster_token(self) -> str:
        if self._cluster is None:
            raise AuthenticationError("these credentials hold no cluster secret")
        return _CLUSTER_PREFIX + base64.urlsafe_b64encode(self._cluster).decode("ascii")

    def client_token(self) -> str:
        return _CLIENT_PREFIX + base64.urlsafe_b64encode(self._client).decode("ascii")

    def client_only(self) -> Credentials:
        """The same credentials without the cluster secret (to hand to a client)."""
        return Credentials(None, self._client, enabled=self.enabled, nonce=self.nonce)

    def __repr__(self) -> str:  # never the secrets themselves
        kind = "disabled" if not self.enabled else ("cluster" if self.is_cluster else "client")
        return f"<Credentials {kind}>"


# ------------------------------------------------------ finding a token --


def read_token_file(path: Path) -> Credentials:
    """The credentials in a token file (warns if others may read it)."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "token file %s can be read by other users (mode %o): chmod 600 it", path, stat.S_IMODE(mode)
        )
    return Credentials.from_token(path.read_text(), source=f"token file {path}")


def write_token_file(path: Path, token: str) -> None:
    """Write `token` to `path`, readable by this user only (0600, directory 0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")


def find_credentials(
    token_file: str, client_token_file: str, environ: Mapping[str, str] | None = None
) -> tuple[Credentials, str] | None:
    """This process's credentials and where they came from, or None.

    Looked for in order: `TRIOFLOW_TOKEN`, the cluster token file, the
    client token file.

    Raises:
        AuthenticationError: a token was found but is not one.
    """
    environ = os.environ if environ is None else environ
    if environ.get(TOKEN_VARIABLE):
        return Credentials.from_token(environ[TOKEN_VARIABLE], source=TOKEN_VARIABLE), TOKEN_VARIABLE
    for name in (token_file, client_token_file):
        path = Path(name).expanduser()
        if path.is_file():
            return read_token_file(path), str(path)
    return None


def missing_token_error(what: str, token_file: str, client_token_file: str) -> AuthenticationError:
    return AuthenticationError(
        f"{what} needs a token: set {TOKEN_VARIABLE}, or put one in {token_file} (cluster) or "
        f"{client_token_file} (clients); `trioflow scheduler` writes both when it first starts. "
        f"(--no-auth turns authentication off, for trusted networks only.)"
    )


# ------------------------------------------------------- the exchange --


def _proof(key: bytes, label: bytes, role: str, nonce_c: bytes, nonce_s: bytes) -> bytes:
    message = b"trioflow-auth-v1 " + label + bytes([_ROLE_BYTES[role]]) + nonce_c + nonce_s
    return hmac.new(key, message, hashlib.sha256).digest()


class _ClosedEarly(CommClosedError):
    """The peer closed before `n` bytes came; `received` holds what did."""

    def __init__(self, received: bytes, n: int):
        super().__init__(f"the peer closed the connection after {len(received)} of {n} bytes")
        self.received = received


async def _read_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    """Exactly `n` bytes, never more (what follows belongs to the connection)."""
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise _ClosedEarly(bytes(data), n)
        data += chunk
    return bytes(data)


async def authenticate_connector(
    stream: trio.abc.Stream,
    credentials: Credentials,
    role: str,
    address: str,
    timeout: float,
    nonce: Callable[[int], bytes] = secrets.token_bytes,
) -> None:
    """Prove to the server at `address` that we hold `role`'s secret, and make it prove it too.

    Raises:
        AuthenticationError: the server does not hold our secret (a wrong
            or missing token on either side, or not the cluster we meant),
            does not serve `role` here, or answers something else.
        CommClosedError: the connection broke, or no answer in `timeout`.
    """
    key = credentials.key(role)
    if key is None:
        raise AuthenticationError(f"this process holds no {role} credential to connect to {address}")
    nonce_c = nonce(NONCE_BYTES)
    try:
        with trio.fail_after(timeout):
            await stream.send_all(MAGIC + bytes([VERSION, _ROLE_BYTES[role]]) + nonce_c)
            answer = await _read_exactly(stream, ANSWER_BYTES)
    except trio.TooSlowError:
        raise CommClosedError(f"{address} did not answer the authentication within {timeout:g} s") from None
    except _ClosedEarly as exc:
        if exc.received and not exc.received.startswith(MAGIC[: len(exc.received)]):
            # Some other server answered (an HTTP server's 400, say) and hung up.
            raise AuthenticationError(
                f"{address} does not speak trioflow: it answered {exc.received[:40]!r}; check the address"
            ) from None
        raise CommClosedError(
            f"{address} closed the connection during authentication ({exc}); is it a trioflow server, "
            f"and is the address's scheme (tcp:// or tls://) the one it serves?"
        ) from None
    except (trio.BrokenResourceError, OSError) as exc:
        raise CommClosedError(f"authentication with {address} failed: {exc!r}") from None
    if answer[:4] != MAGIC:
        raise AuthenticationError(
            f"{address} does not speak trioflow (it answered {answer[:16]!r}...); check the address"
        )
    status = answer[4]
    if status == ROLE_NOT_SERVED:
        raise AuthenticationError(f"{address} does not accept {role} connections on this port")
    if status == NO_CREDENTIAL:
        raise AuthenticationError(f"{address} holds no {role} credential, so it cannot check ours")
    nonce_s, proof_s = answer[5 : 5 + NONCE_BYTES], answer[5 + NONCE_BYTES :]
    if not hmac.compare_digest(proof_s, _proof(key, b"server", role, nonce_c, nonce_s)):
        hint = "--no-auth on both sides" if not credentials.enabled else f"{TOKEN_VARIABLE} or the token file"
        raise AuthenticationError(
            f"{address} does not hold our {role} credential: the tokens differ (check {hint}), "
            f"one side runs with --no-auth, or it is not the cluster you meant"
        )
    try:
        await stream.send_all(_proof(key, b"client", role, nonce_c, nonce_s))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        # The server hung up after its answer (stopping, say): a broken
        # connection like any other, never an error of another type that
        # would end the task making the connection (seed 78 of the chaos lab).
        raise CommClosedError(f"authentication with {address} failed: {exc!r}") from None


async def authenticate_acceptor(
    stream: trio.abc.Stream,
    credentials: Credentials,
    roles: frozenset[str],
    timeout: float,
    nonce: Callable[[int], bytes] = secrets.token_bytes,
) -> str:
    """Check that the peer holds the secret of one of `roles`; return that role.

    Reads 38 bytes, then 32, never more, before anything else is decoded.

    Raises:
        AuthenticationError: the peer did not prove a role this port serves
            (the text says why, with no secret in it).
        CommClosedError: it hung up, or took longer than `timeout`.
    """
    try:
        with trio.fail_after(timeout):
            # The fixed part first: a stranger speaking anything else is
            # turned away after 6 bytes, not after a timeout.
            head = await _read_exactly(stream, len(MAGIC))
            if head != MAGIC:
                raise AuthenticationError(f"not a trioflow authentication: it began with {head!r}")
            head += await _read_exactly(stream, 2)
            if head[4] != VERSION:
                raise AuthenticationError(f"authentication version {head[4]}, this process speaks {VERSION}")
            hello = head + await _read_exactly(stream, NONCE_BYTES)
            role = _ROLES_BY_BYTE.get(hello[5])
            if role is None or role not in roles:
                await stream.send_all(MAGIC + bytes([ROLE_NOT_SERVED]) + bytes(NONCE_BYTES + PROOF_BYTES))
                raise AuthenticationError(f"asked for role {role or hello[5]!r}, which this port does not serve")
            key = credentials.key(role)
            if key is None:
                await stream.send_all(MAGIC + bytes([NO_CREDENTIAL]) + bytes(NONCE_BYTES + PROOF_BYTES))
                raise AuthenticationError(f"asked for role {role!r}, for which this process holds no credential")
            nonce_c, nonce_s = hello[6:], nonce(NONCE_BYTES)
            await stream.send_all(MAGIC + bytes([OK]) + nonce_s + _proof(key, b"server", role, nonce_c, nonce_s))
            proof_c = await _read_exactly(stream, PROOF_BYTES)
    except trio.TooSlowError:
        raise CommClosedError(f"no authentication within {timeout:g} s (handshake_timeout)") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise CommClosedError(f"the peer went away during authentication: {exc!r}") from None
    if not hmac.compare_digest(proof_c, _proof(key, b"client", role, nonce_c, nonce_s)):
        raise AuthenticationError(f"a wrong proof for role {role!r} (a wrong token)")
    return role


# ------------------------------------------------- for the shells --


async def connect_authenticated(
    network: Network, address: str, credentials: Credentials, role: str, timeout: float
) -> trio.abc.Stream:
    """A stream to `address` on which both ends proved `role`'s secret.

    Raises:
        AuthenticationError: the proof failed (the message says what to check).
        CommClosedError: no connection, or it broke.
    """
    stream = await connect_with_timeout(network, address, timeout)
    try:
        await authenticate_connector(stream, credentials, role, address, timeout, credentials.nonce)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def accept_authenticated(
    stream: trio.abc.Stream, credentials: Credentials, roles: frozenset[str], timeout: float, server: str
) -> str | None:
    """The role the peer proved on `stream`, or None (logged, stream closed).

    A failure costs one clipped log line; the server goes on serving others.
    """
    try:
        return await authenticate_acceptor(stream, credentials, roles, timeout, credentials.nonce)
    except (AuthenticationError, CommClosedError) as exc:
        logger.warning("%s refused a connection that did not authenticate: %s", server, str(exc)[:300])
        await trio.aclose_forcefully(stream)
        return None


def credentials_for(config: Config, what: str, *, cluster: bool, environ: Mapping[str, str] | None = None) -> Credentials:
    """The credentials a process configured by `config` uses (``--no-auth``: none).

    Args:
        what: who asks, for the error ("a worker").
        cluster: whether it must hold the cluster secret (scheduler, nanny, worker).

    Raises:
        AuthenticationError: no token anywhere, a bad one, or a client token
            where the cluster's is needed.
    """
    if not config.auth:
        return Credentials.none()
    found = find_credentials(config.token_file, config.client_token_file, environ)
    if found is None:
        raise missing_token_error(what, config.token_file, config.client_token_file)
    credentials, source = found
    if cluster and not credentials.is_cluster:
        raise AuthenticationError(
            f"{what} needs the cluster token, but {source} holds a client token "
            f"(the cluster token is in {config.token_file} where the scheduler first started)"
        )
    return credentials


def scheduler_credentials(config: Config, environ: Mapping[str, str] | None = None) -> Credentials:
    """A scheduler's credentials: found as for anyone, or made on its first start.

    With no `TRIOFLOW_TOKEN` and no token file, a new cluster token and its
    client token are written to `config.token_file` and
    `config.client_token_file` (0600), and logged by path (never by value).
    """
    if not config.auth:
        logger.warning(
            "AUTHENTICATION IS OFF (--no-auth): anyone who can reach this scheduler's port "
            "can run any code on its workers. Use it on a trusted network only."
        )
        return Credentials.none()
    found = find_credentials(config.token_file, config.client_token_file, environ)
    if found is not None:
        credentials, source = found
        if not credentials.is_cluster:
            raise AuthenticationError(
                f"a scheduler needs the cluster token, but {source} holds a client token"
            )
        logger.info("using the cluster token from %s", source)
        return credentials
    credentials = Credentials.generate()
    cluster_file = Path(config.token_file).expanduser()
    client_file = Path(config.client_token_file).expanduser()
    write_token_file(cluster_file, credentials.cluster_token())
    if not client_file.exists():
        write_token_file(client_file, credentials.client_token())
    logger.warning(
        "created a new cluster token in %s (give it to workers and nannies) and a client token in %s "
        "(give it to clients); or set TRIOFLOW_TOKEN to the token itself",
        cluster_file, client_file,
    )
    return credentials


def child_environment(credentials: Credentials) -> dict[str, str]:
    """The variables that hand `credentials` to a child process (never argv,
    which `ps` shows to every user): its cluster token, if it has one."""
    if not credentials.enabled or not credentials.is_cluster:
        return {}
    return {TOKEN_VARIABLE: credentials.cluster_token()}
