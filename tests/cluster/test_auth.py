"""Authentication and TLS with real servers: tokens, roles, and what a stranger gets."""

from __future__ import annotations

import logging
import os
import time

import psutil
import pytest
import trio

import trioflow
from tests.cluster import raw_peer as rp
from tests.cluster.conftest import free_port
from trioflow import Config
from trioflow.comm.auth import CLIENT, Credentials, authenticate_connector
from trioflow.errors import AuthenticationError, CommClosedError

pytestmark = pytest.mark.processes


def inc(x):
    return x + 1


def home_env(tmp_path):
    """An environment whose token files live under `tmp_path` and with no TRIOFLOW_TOKEN."""
    env = {k: v for k, v in os.environ.items() if k != "TRIOFLOW_TOKEN"}
    env["TRIOFLOW_TOKEN_FILE"] = str(tmp_path / "cluster-token")
    env["TRIOFLOW_CLIENT_TOKEN_FILE"] = str(tmp_path / "client-token")
    return env


def client_config(tmp_path, **fields):
    return Config(
        token_file=str(tmp_path / "cluster-token"), client_token_file=str(tmp_path / "client-token"), **fields
    )


def test_a_new_scheduler_writes_the_tokens_and_only_holders_get_in(spawn, tmp_path, monkeypatch):
    """`trioflow scheduler` writes its token files on first start and says where; a worker with
    the cluster token and a client with the client file work; a client with another cluster's
    token fails within a second naming the address, and the scheduler logs one line and goes on."""
    monkeypatch.delenv("TRIOFLOW_TOKEN")  # (spawned processes inherit this process's environment)
    env = home_env(tmp_path)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = spawn("scheduler", "--port", port, env=env)
    line = scheduler.wait_for_line("created a new cluster token in")
    assert str(tmp_path / "cluster-token") in line and str(tmp_path / "client-token") in line
    cluster_token = (tmp_path / "cluster-token").read_text().strip()
    assert cluster_token not in line
    scheduler.wait_for_line("listening at")
    spawn("worker", address, "--no-nanny", env={**env, "TRIOFLOW_TOKEN": cluster_token})
    with trioflow.Client(address, config=client_config(tmp_path)) as client:
        assert client.submit(inc, 1).result(timeout=30) == 2
        stranger = Credentials.generate().client_only()
        started = time.monotonic()
        with pytest.raises(AuthenticationError) as info:
            trioflow.Client(address, credentials=stranger)
        assert time.monotonic() - started < 1.0
        assert address in str(info.value) and "TRIOFLOW_TOKEN" in str(info.value)
        scheduler.wait_for_line("refused a connection that did not authenticate")
        assert client.submit(inc, 2).result(timeout=30) == 3


def test_without_any_token_a_client_is_told_where_to_get_one(tmp_path, monkeypatch):
    """No TRIOFLOW_TOKEN and no token file: Client raises before connecting, naming both."""
    monkeypatch.delenv("TRIOFLOW_TOKEN")
    with pytest.raises(AuthenticationError, match="TRIOFLOW_TOKEN") as info:
        trioflow.Client(f"tcp://127.0.0.1:{free_port()}", config=client_config(tmp_path))
    assert str(tmp_path / "cluster-token") in str(info.value)


def test_a_worker_with_a_client_token_does_not_start(spawn, tmp_path):
    """`trioflow worker` given a client token exits at once, saying it needs the cluster token."""
    env = {**home_env(tmp_path), "TRIOFLOW_TOKEN": Credentials.generate().client_token()}
    worker = spawn("worker", f"tcp://127.0.0.1:{free_port()}", "--no-nanny", env=env)
    assert worker.wait(timeout=30) == 1
    assert "a worker needs the cluster token" in worker.output()


async def test_a_client_credential_cannot_register_a_worker(cluster, client, caplog):
    """A peer proving only the client role and saying hello as a worker is refused; no worker appears."""
    token = Credentials.from_token(os.environ["TRIOFLOW_TOKEN"]).client_token()
    with caplog.at_level(logging.WARNING, logger="trioflow"):
        async with rp.connect(cluster.scheduler_address, authenticate_as="client", token=token) as peer:
            await peer.hello_worker(f"tcp://127.0.0.1:{free_port()}")
            answer = await peer.next_message(timeout=5)
    assert answer["op"] == "refused" and "a client credential cannot connect as a worker" in answer["reason"]
    assert len((await client.scheduler_info())["workers"]) == 2


async def test_a_client_credential_cannot_reach_a_nannys_control_port(tmp_path):
    """A nanny's control port turns a client credential away at the first exchange."""
    async with trioflow.AsyncLocalCluster(1, nanny=True) as cluster:
        nanny = next(iter(cluster.workers.values()))
        address = nanny.address
        _, host, port = trioflow.comm.parse_address(address)
        stream = await trio.open_tcp_stream(host, port)
        try:
            with trio.fail_after(5), pytest.raises(AuthenticationError, match="does not accept client connections"):
                await authenticate_connector(stream, cluster.credentials.client_only(), CLIENT, address, 5)
        finally:
            await stream.aclose()
        assert nanny.launches == 1  # nobody restarted its worker


def test_a_local_clusters_workers_get_the_token_in_their_environment_not_argv(monkeypatch):
    """LocalCluster generates its own secret (no token configured) and hands it to worker
    processes in their environment; no process's command line shows it."""
    monkeypatch.delenv("TRIOFLOW_TOKEN")
    with trioflow.LocalCluster(2) as cluster:
        token = cluster.credentials.cluster_token()
        pids = [w.worker_pid for w in cluster.workers.values()]
        assert all(pids)
        for pid in pids:
            process = psutil.Process(pid)
            assert token not in " ".join(process.cmdline())
            assert process.environ().get("TRIOFLOW_TOKEN") == token
        with trioflow.Client(cluster) as client:
            assert client.submit(inc, 1).result(timeout=30) == 2
    other = trioflow.comm.auth.Credentials.generate()
    assert other.cluster_token() != token


def test_no_auth_warns_and_works_only_with_no_auth(spawn, tmp_path, monkeypatch):
    """`--no-auth` logs a loud warning; a --no-auth client works, a client with a token does not."""
    monkeypatch.delenv("TRIOFLOW_TOKEN")
    env = home_env(tmp_path)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = spawn("scheduler", "--port", port, "--no-auth", env=env)
    scheduler.wait_for_line("AUTHENTICATION IS OFF")
    scheduler.wait_for_line("listening at")
    spawn("worker", address, "--no-nanny", "--no-auth", env=env)
    assert not (tmp_path / "cluster-token").exists()
    with trioflow.Client(address, config=Config(auth=False)) as client:
        assert client.submit(inc, 1).result(timeout=30) == 2
    with pytest.raises(AuthenticationError, match="--no-auth"):
        trioflow.Client(address, credentials=Credentials.generate().client_only())


# ------------------------------------------------------------------- TLS --


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    from trioflow.tls_certs import make_certificates

    return make_certificates(tmp_path_factory.mktemp("tls"))


def tls_config(certificates, role):
    return Config(
        tls_ca_file=str(certificates["ca"]),
        tls_cert_file=str(certificates[role]),
        tls_key_file=str(certificates[f"{role}-key"]),
    )


async def test_tls_and_tokens_together(certificates):
    """Over tls:// with mutual TLS and tokens, work completes; the addresses say tls://."""
    credentials = Credentials.generate()
    async with trio.open_nursery() as nursery:
        scheduler = trioflow.Scheduler(config=tls_config(certificates, "scheduler"), credentials=credentials)
        address = await nursery.start(scheduler.serve)
        assert address.startswith("tls://")
        worker = trioflow.Worker(address, config=tls_config(certificates, "worker"), credentials=credentials)
        assert (await nursery.start(worker.serve)).startswith("tls://")
        async with trioflow.AsyncClient(
            address, config=tls_config(certificates, "client"), credentials=credentials.client_only()
        ) as client:
            assert await client.gather(client.map(inc, range(10))) == list(range(1, 11))
        nursery.cancel_scope.cancel()


async def test_plaintext_to_a_tls_port_and_tls_to_a_plaintext_port_fail_fast(certificates):
    """Each mismatch fails within a second with an error that names the scheme."""
    credentials = Credentials.generate()
    async with trio.open_nursery() as nursery:
        tls_scheduler = trioflow.Scheduler(config=tls_config(certificates, "scheduler"), credentials=credentials)
        tls_address = await nursery.start(tls_scheduler.serve)
        plain_scheduler = trioflow.Scheduler(credentials=credentials)
        plain_address = await nursery.start(plain_scheduler.serve)
        with trio.fail_after(1), pytest.raises(CommClosedError, match="tcp:// or tls://"):
            async with trioflow.AsyncClient(tls_address.replace("tls://", "tcp://"), credentials=credentials):
                pass
        with trio.fail_after(1), pytest.raises(CommClosedError, match="is it a tls:// server"):
            async with trioflow.AsyncClient(
                plain_address.replace("tcp://", "tls://"),
                config=tls_config(certificates, "client"),
                credentials=credentials,
            ):
                pass
        nursery.cancel_scope.cancel()


async def test_a_certificate_from_another_ca_is_refused(certificates, tmp_path):
    """A client whose certificate another CA signed cannot even reach the token exchange."""
    from trioflow.tls_certs import make_certificates

    other = make_certificates(tmp_path / "other")
    credentials = Credentials.generate()
    async with trio.open_nursery() as nursery:
        scheduler = trioflow.Scheduler(config=tls_config(certificates, "scheduler"), credentials=credentials)
        address = await nursery.start(scheduler.serve)
        with trio.fail_after(2), pytest.raises(CommClosedError, match="TLS handshake"):
            async with trioflow.AsyncClient(address, config=tls_config(other, "client"), credentials=credentials):
                pass
        nursery.cancel_scope.cancel()


def test_tls_certs_command_writes_keys_for_this_user_only(tmp_path, spawn):
    """`trioflow tls-certs DIR` writes a CA and a certificate per role; keys are 0600."""
    proc = spawn("tls-certs", tmp_path / "certs")
    assert proc.wait(timeout=30) == 0
    for role in ("scheduler", "worker", "client"):
        assert (tmp_path / "certs" / f"{role}.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
        assert oct((tmp_path / "certs" / f"{role}-key.pem").stat().st_mode & 0o777) == "0o600"
