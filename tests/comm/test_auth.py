"""Credentials, tokens and the challenge-response that opens every connection."""

from __future__ import annotations

import logging
import os
import stat

import pytest
import trio
import trio.testing

from trioflow import Config
from trioflow.comm import auth
from trioflow.comm.auth import (
    CLIENT,
    CLUSTER,
    Credentials,
    authenticate_acceptor,
    authenticate_connector,
    credentials_for,
    find_credentials,
    scheduler_credentials,
)
from trioflow.errors import AuthenticationError, CommClosedError

ADDRESS = "tcp://10.0.0.1:8786"


# ------------------------------------------------------------ tokens --


def test_a_cluster_token_round_trips_and_carries_the_client_secret():
    """A cluster token gives both secrets back; its client token gives only the client's."""
    credentials = Credentials.generate()
    again = Credentials.from_token(credentials.cluster_token())
    assert again.key(CLUSTER) == credentials.key(CLUSTER) and again.key(CLIENT) == credentials.key(CLIENT)
    client = Credentials.from_token(credentials.client_token())
    assert client.key(CLIENT) == credentials.key(CLIENT)
    assert client.key(CLUSTER) is None and not client.is_cluster
    assert credentials.key(CLIENT) != credentials.key(CLUSTER)


@pytest.mark.parametrize(
    "text", ["", "hello", "trioflow-cluster-v1:", "trioflow-cluster-v1:!!!!", "trioflow-client-v1:" + "A" * 8]
)
def test_a_bad_token_is_refused_without_echoing_it(text):
    """A malformed token raises AuthenticationError naming where it came from, not what it was."""
    with pytest.raises(AuthenticationError, match="the test token is not a trioflow token") as info:
        Credentials.from_token(text, source="the test token")
    secret_part = text.partition(":")[2] if ":" in text else text
    if secret_part:
        assert secret_part not in str(info.value)


def test_repr_never_shows_a_secret():
    """Credentials print their kind, never their bytes."""
    credentials = Credentials.generate()
    assert repr(credentials) == "<Credentials cluster>"
    assert credentials.cluster_token() not in repr(credentials)


def test_token_files_are_written_for_this_user_only(tmp_path, caplog):
    """A scheduler's first start writes both token files 0600 in a 0700 directory, and logs their paths."""
    config = Config(token_file=str(tmp_path / "cfg" / "cluster"), client_token_file=str(tmp_path / "cfg" / "client"))
    with caplog.at_level(logging.WARNING, logger="trioflow"):
        credentials = scheduler_credentials(config, environ={})
    for name in ("cluster", "client"):
        assert stat.S_IMODE((tmp_path / "cfg" / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "cfg").stat().st_mode) == 0o700
    assert (tmp_path / "cfg" / "cluster").read_text().strip() == credentials.cluster_token()
    assert (tmp_path / "cfg" / "client").read_text().strip() == credentials.client_token()
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert str(tmp_path / "cfg" / "cluster") in logged and credentials.cluster_token() not in logged
    # The second start uses them.
    assert scheduler_credentials(config, environ={}).key(CLUSTER) == credentials.key(CLUSTER)


def test_the_token_variable_comes_before_the_files(tmp_path):
    """TRIOFLOW_TOKEN wins over token files; then the cluster file; then the client file."""
    cluster, other = Credentials.generate(), Credentials.generate()
    (tmp_path / "cluster").write_text(cluster.cluster_token())
    (tmp_path / "client").write_text(other.client_token())
    os.chmod(tmp_path / "cluster", 0o600)
    os.chmod(tmp_path / "client", 0o600)
    files = (str(tmp_path / "cluster"), str(tmp_path / "client"))
    found, source = find_credentials(*files, environ={"TRIOFLOW_TOKEN": other.cluster_token()})
    assert found.key(CLUSTER) == other.key(CLUSTER) and source == "TRIOFLOW_TOKEN"
    found, source = find_credentials(*files, environ={})
    assert found.key(CLUSTER) == cluster.key(CLUSTER) and source == files[0]
    (tmp_path / "cluster").unlink()
    found, source = find_credentials(*files, environ={})
    assert not found.is_cluster and source == files[1]
    (tmp_path / "client").unlink()
    assert find_credentials(*files, environ={}) is None


def test_a_token_file_others_can_read_is_warned_about(tmp_path, caplog):
    """A token file readable by the group or the world gets a warning with its mode."""
    path = tmp_path / "cluster"
    path.write_text(Credentials.generate().cluster_token())
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="trioflow"):
        find_credentials(str(path), str(tmp_path / "none"), environ={})
    assert any("can be read by other users (mode 644)" in r.getMessage() for r in caplog.records)


def test_no_token_says_where_to_put_one(tmp_path):
    """Without a token anywhere, a worker's error names the variable and both files."""
    config = Config(token_file=str(tmp_path / "c"), client_token_file=str(tmp_path / "u"))
    with pytest.raises(AuthenticationError) as info:
        credentials_for(config, "a worker", cluster=True, environ={})
    text = str(info.value)
    assert "TRIOFLOW_TOKEN" in text and str(tmp_path / "c") in text and "--no-auth" in text


def test_a_client_token_cannot_run_a_worker(tmp_path):
    """A process that must join the cluster refuses a client token, saying which it needs."""
    config = Config(token_file=str(tmp_path / "c"), client_token_file=str(tmp_path / "u"))
    env = {"TRIOFLOW_TOKEN": Credentials.generate().client_token()}
    with pytest.raises(AuthenticationError, match="a worker needs the cluster token"):
        credentials_for(config, "a worker", cluster=True, environ=env)
    assert not credentials_for(config, "a client", cluster=False, environ=env).is_cluster


def test_no_auth_needs_no_token(tmp_path, caplog):
    """--no-auth: no token is looked for, and a scheduler warns loudly."""
    config = Config(auth=False, token_file=str(tmp_path / "c"), client_token_file=str(tmp_path / "u"))
    assert not credentials_for(config, "a worker", cluster=True, environ={}).enabled
    with caplog.at_level(logging.WARNING, logger="trioflow"):
        scheduler_credentials(config, environ={})
    assert any("AUTHENTICATION IS OFF" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------- the exchange --


class CountingStream(trio.abc.Stream):
    """One end of a memory stream that records how many bytes each read asked for."""

    def __init__(self, inner: trio.abc.Stream):
        self.inner = inner
        self.asked: list[int | None] = []

    async def send_all(self, data) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None) -> bytes:
        self.asked.append(max_bytes)
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def exchange(server_credentials, client_credentials, role=CLIENT, roles=auth.ANY_CREDENTIAL):
    """Run both sides over a memory stream; return (server outcome, client outcome)."""
    left, right = trio.testing.memory_stream_pair()
    server_stream = CountingStream(right)
    outcomes: dict[str, object] = {}

    async def server() -> None:
        try:
            outcomes["server"] = await authenticate_acceptor(server_stream, server_credentials, roles, 5)
        except (AuthenticationError, CommClosedError) as exc:
            outcomes["server"] = exc
            await right.aclose()

    async def client() -> None:
        try:
            await authenticate_connector(left, client_credentials, role, ADDRESS, 5)
            outcomes["client"] = "ok"
        except (AuthenticationError, CommClosedError) as exc:
            outcomes["client"] = exc
            await left.aclose()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            nursery.start_soon(client)
    outcomes["asked"] = server_stream.asked
    return outcomes


async def test_both_sides_prove_the_same_token():
    """With one cluster's credentials both roles authenticate; the server learns which."""
    credentials = Credentials.generate()
    result = await exchange(credentials, credentials.client_only(), CLIENT)
    assert (result["server"], result["client"]) == (CLIENT, "ok")
    result = await exchange(credentials, credentials, CLUSTER)
    assert (result["server"], result["client"]) == (CLUSTER, "ok")


async def test_the_server_reads_nothing_beyond_the_fixed_exchange():
    """Before a proof is checked the acceptor asks for exactly 4, 2, 32 and 32 bytes: nothing else is read."""
    credentials = Credentials.generate()
    result = await exchange(credentials, credentials)
    assert sum(n for n in result["asked"]) == 70
    assert max(result["asked"]) == 32


async def test_a_wrong_token_fails_at_once_on_both_sides():
    """Another cluster's token: the client raises naming the address and what to check;
    it never sends a proof, so the server sees the client hang up."""
    result = await exchange(Credentials.generate(), Credentials.generate().client_only())
    assert isinstance(result["client"], AuthenticationError)
    assert ADDRESS in str(result["client"]) and "TRIOFLOW_TOKEN" in str(result["client"])
    assert isinstance(result["server"], CommClosedError)


async def test_a_server_hanging_up_before_the_clients_proof_is_a_closed_connection():
    """The server answered, then hung up (it was stopping) before the client's
    proof went out: the client's last send breaks, and that is a
    CommClosedError like every other break in the exchange. A raw
    BrokenResourceError ended the task making the connection (a client's
    connection pool, with the client: seed 78 of the chaos lab)."""
    credentials = Credentials.generate()
    left, right = trio.testing.memory_stream_pair()

    class HangsUpAfterItsAnswer(CountingStream):
        async def send_all(self, data) -> None:
            await self.inner.send_all(data)
            await self.inner.aclose()

    async def server() -> None:
        with pytest.raises(CommClosedError):
            await authenticate_acceptor(HangsUpAfterItsAnswer(right), credentials, auth.ANY_CREDENTIAL, 5)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            with pytest.raises(CommClosedError, match=ADDRESS):
                await authenticate_connector(left, credentials, CLUSTER, ADDRESS, 5)


async def test_a_client_credential_cannot_ask_for_the_cluster_role():
    """A client holds no cluster secret: it cannot even start a cluster exchange."""
    credentials = Credentials.generate()
    result = await exchange(credentials, credentials.client_only(), CLUSTER)
    assert isinstance(result["client"], AuthenticationError)
    assert "holds no cluster credential" in str(result["client"])


async def test_a_port_that_serves_only_the_cluster_refuses_a_client():
    """A nanny's control port (cluster only) turns a client exchange away, telling it so."""
    credentials = Credentials.generate()
    result = await exchange(credentials, credentials.client_only(), CLIENT, roles=frozenset({CLUSTER}))
    assert "does not accept client connections" in str(result["client"])
    assert "which this port does not serve" in str(result["server"])


async def test_a_forged_proof_is_refused():
    """A connector that sends a wrong proof (it does not hold the key) is refused by the server."""
    credentials = Credentials.generate()
    left, right = trio.testing.memory_stream_pair()

    async def forger() -> None:
        await left.send_all(auth.MAGIC + bytes([auth.VERSION, 1]) + bytes(32))
        answer = await left.receive_some(69)
        assert answer[:5] == auth.MAGIC + bytes([auth.OK])
        await left.send_all(bytes(32))  # not the HMAC

    async with trio.open_nursery() as nursery:
        nursery.start_soon(forger)
        with trio.fail_after(5), pytest.raises(AuthenticationError, match="a wrong proof"):
            await authenticate_acceptor(right, credentials, auth.ANY_CREDENTIAL, 5)


async def test_a_stranger_is_turned_away_after_four_bytes():
    """Bytes that are not the magic end the exchange without waiting for more."""
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(b"GET ")
    with trio.fail_after(1), pytest.raises(AuthenticationError, match="not a trioflow authentication"):
        await authenticate_acceptor(right, Credentials.generate(), auth.ANY_CREDENTIAL, 5)


async def test_an_http_server_is_named_by_what_it_answered():
    """A connector that reaches an HTTP server says what answered."""
    left, right = trio.testing.memory_stream_pair()

    async def http() -> None:
        await right.receive_some(38)
        await right.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await right.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(http)
        with trio.fail_after(5), pytest.raises(AuthenticationError, match="does not speak trioflow: it answered b'HTTP/1.1 400"):
            await authenticate_connector(left, Credentials.generate(), CLIENT, ADDRESS, 5)


async def test_silence_is_a_timeout(autojump_clock):
    """A peer that says nothing is dropped after the handshake timeout, on either side."""
    left, right = trio.testing.memory_stream_pair()
    with pytest.raises(CommClosedError, match="handshake_timeout"):
        await authenticate_acceptor(right, Credentials.generate(), auth.ANY_CREDENTIAL, 2)
    with pytest.raises(CommClosedError, match="did not answer the authentication within 2 s"):
        await authenticate_connector(left, Credentials.generate(), CLIENT, ADDRESS, 2)


async def test_no_auth_talks_only_to_no_auth():
    """--no-auth on both sides works; one side with a token and one without do not."""
    none = Credentials.none()
    result = await exchange(none, none, CLUSTER)
    assert (result["server"], result["client"]) == (CLUSTER, "ok")
    result = await exchange(Credentials.generate(), none, CLIENT)
    assert "--no-auth" in str(result["client"])
