"""The trioflow command: real scheduler and worker processes, signals, bad flags."""

import errno
import os
import signal
import socket
import subprocess
import sys

import pytest

import trioflow
from tests.cluster.conftest import free_port

pytestmark = pytest.mark.processes


def inc(x):
    return x + 1


def test_scheduler_and_worker_processes_serve_a_client(spawn):
    """`trioflow scheduler` + `trioflow worker --no-nanny` run tasks for a Client."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = spawn("scheduler", "--port", port)
    scheduler.wait_for_line(f"listening at {address}")
    worker = spawn("worker", address, "--nthreads", 2, "--no-nanny")
    worker.wait_for_line("ready: 2 threads")
    with trioflow.Client(address) as client:
        assert client.submit(inc, 1).result(timeout=30) == 2
        assert list(client.nthreads().values()) == [2]
        [info] = client.scheduler_info()["workers"].values()
        assert info["pid"] == worker.pid


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_servers_exit_cleanly_on_signals(spawn, signum):
    """SIGINT and SIGTERM stop scheduler and worker with status 0 and a log line."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = spawn("scheduler", "--port", port)
    scheduler.wait_for_line("listening at")
    worker = spawn("worker", address, "--no-nanny")
    worker.wait_for_line("ready")
    worker.send_signal(signum)
    assert worker.wait() == 0
    assert f"received {signum.name}; shutting down" in worker.output()
    scheduler.send_signal(signum)
    assert scheduler.wait() == 0
    assert "scheduler stopped" in scheduler.output()


def test_servers_bind_loopback_by_default(spawn):
    """Without --host the scheduler and the worker listen on 127.0.0.1 only."""
    port = free_port()
    scheduler = spawn("scheduler", "--port", port)
    line = scheduler.wait_for_line("listening at")
    assert f"tcp://127.0.0.1:{port}" in line
    worker = spawn("worker", f"tcp://127.0.0.1:{port}", "--no-nanny")
    assert "trioflow worker tcp://127.0.0.1:" in worker.wait_for_line("ready")


def test_host_flag_chooses_the_interface(spawn):
    """--host binds the servers elsewhere (here another loopback address)."""
    port = free_port()
    address = f"tcp://127.0.0.2:{port}"
    scheduler = spawn("scheduler", "--host", "127.0.0.2", "--port", port)
    assert address in scheduler.wait_for_line("listening at")
    worker = spawn("worker", address, "--host", "127.0.0.2", "--no-nanny")
    assert "trioflow worker tcp://127.0.0.2:" in worker.wait_for_line("ready")
    with trioflow.Client(address) as client:
        assert client.submit(inc, 1).result(timeout=30) == 2
        assert [a.startswith("tcp://127.0.0.2:") for a in client.nthreads()] == [True]


def test_client_without_an_address_starts_and_ends_its_own_cluster():
    """Client() with no address runs an embedded local cluster of worker
    processes, and closing the client ends them."""
    import psutil

    with trioflow.Client(n_workers=2, threads_per_worker=1) as client:
        assert client.submit(inc, 1).result(timeout=30) == 2
        pids = [info["pid"] for info in client.scheduler_info()["workers"].values()]
        assert len(pids) == 2 and os.getpid() not in pids
        workers = [psutil.Process(pid) for pid in pids]
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == []


def run_cli(*args, env=None):
    import os

    return subprocess.run(
        [sys.executable, "-m", "trioflow", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["worker"], None, "the following arguments are required: ADDRESS"),
        (["worker", "tcp://127.0.0.1:1", "--nthreads", "0"], None, "--nthreads: 0 is not at least 1"),
        (["scheduler", "--port", "99999"], None, "port 99999 is outside 0..65535"),
        (["scheduler", "--worker-ttl", "-1"], None, "worker_ttl must be positive"),
        (["scheduler", "--worker-ttl", "0.25"], None,
         "Config.heartbeat_interval (0.5 s) must be less than Config.worker_ttl (0.25 s)"),
        (["scheduler", "--allowed-failures", "two"], None, "invalid int value: 'two'"),
        (["scheduler"], {"TRIOFLOW_WORKER_TTL": "soon"}, "TRIOFLOW_WORKER_TTL='soon' is not a number"),
        (["bogus"], None, "invalid choice: 'bogus'"),
    ],
)
def test_bad_flags_and_config_are_refused_clearly(args, env, message):
    """A bad flag or variable exits with status 2 and names what was wrong."""
    result = run_cli(*args, env=env)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.fixture
def taken_port():
    """A loopback port this test holds open, so that a server cannot bind it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    "command, flags",
    [
        ("scheduler", ["--port"]),
        ("worker", ["SCHEDULER", "--no-nanny", "--scheduler-timeout", "5", "--port"]),
        ("nanny", ["SCHEDULER", "--scheduler-timeout", "5", "--nanny-port"]),
    ],
)
def test_a_taken_port_stops_a_server_with_a_message_naming_it(command, flags, taken_port):
    """Exit status 1 and the address in one line, not a bare "[Errno 98]"
    or "Exceptions from Trio nursery". (No scheduler listens at SCHEDULER:
    each server binds its own port before it looks for one.)"""
    scheduler = f"tcp://127.0.0.1:{free_port()}"
    args = [scheduler if flag == "SCHEDULER" else flag for flag in flags]
    result = run_cli(command, *args, taken_port)
    assert result.returncode == 1, result.stderr
    named = f"cannot listen on 127.0.0.1:{taken_port}: address already in use"
    assert f"{command} failed: [Errno {errno.EADDRINUSE}] {named}" in result.stderr


def test_a_local_cluster_on_a_taken_port_raises_the_os_error_itself(taken_port):
    """A library user catches `OSError` (errno EADDRINUSE) plainly, with the address in its text."""
    with pytest.raises(OSError) as caught:
        trioflow.LocalCluster(n_workers=1, scheduler_port=taken_port)
    assert caught.type is OSError  # not an ExceptionGroup around it
    assert caught.value.errno == errno.EADDRINUSE
    assert f"cannot listen on 127.0.0.1:{taken_port}" in str(caught.value)


def test_worker_gives_up_after_scheduler_timeout():
    """A worker whose scheduler stays unreachable retries, then after
    scheduler_timeout says why in one line and exits 1."""
    port = free_port()
    result = run_cli("worker", f"tcp://127.0.0.1:{port}", "--no-nanny", "--scheduler-timeout", "1.5")
    assert result.returncode == 1
    assert f"gives up: no scheduler at tcp://127.0.0.1:{port}" in result.stderr
    assert f"could not connect to tcp://127.0.0.1:{port}" in result.stderr


def test_demo_runs_every_step_and_says_what_happened():
    """`trioflow demo` (the README's first command) ends with status 0 and
    shows each behaviour it promises, checked by its own output."""
    result = run_cli("demo")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "gather -> [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]" in out
    assert f"sum of squares of 0..999 = {sum(i * i for i in range(1000))}" in out
    assert "x.result() raised ZeroDivisionError" in out
    assert "y.result() raised the same ZeroDivisionError" in out
    assert "gather -> all 40 results correct: True" in out
    assert "after 3 worker deaths the scheduler marked it bad" in out
    assert "client.submit(inc, 1).result() = 2" in out
    assert "every worker process ended" in out
