"""The nanny as a real process: restarts, signal forwarding, no orphans."""

import os
import signal
import time

import psutil
import pytest

import trioflow
from tests.cluster.conftest import free_port
from tests.cluster.test_worker_failures import poll, worker_pids
from trioflow.nanny import parse_memory

pytestmark = pytest.mark.processes


def inc(x):
    return x + 1


def gone(pid):
    """True once `pid` has exited (a zombie awaiting its reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def scheduler(spawn):
    port = free_port()
    proc = spawn("scheduler", "--port", port)
    proc.wait_for_line("listening at")
    return f"tcp://127.0.0.1:{port}"


@pytest.mark.parametrize("command", ["worker", "nanny"])
def test_worker_runs_under_a_nanny_that_restarts_it(spawn, scheduler, command):
    """`trioflow worker` (nanny by default) and `trioflow nanny`: SIGKILL the
    worker process and the nanny starts a new one, which registers."""
    nanny = spawn(command, scheduler, "--nthreads", 1)
    with trioflow.Client(scheduler) as client:
        client.wait_for_workers(1, timeout=30)
        [first] = worker_pids(client).values()
        assert first != nanny.pid and psutil.Process(first).ppid() == nanny.pid
        os.kill(first, signal.SIGKILL)
        second = poll(lambda: [p for p in worker_pids(client).values() if p != first], message="new worker")
        assert psutil.Process(second[0]).ppid() == nanny.pid
        assert client.submit(inc, 1).result(timeout=30) == 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_nanny_stops_its_worker_and_exits_cleanly(spawn, scheduler, signum):
    """SIGTERM or SIGINT (Ctrl-C) to the nanny is forwarded: the worker
    stops, the nanny exits 0."""
    nanny = spawn("worker", scheduler)
    with trioflow.Client(scheduler) as client:
        client.wait_for_workers(1, timeout=30)
        [worker] = worker_pids(client).values()
        nanny.send_signal(signum)
        assert nanny.wait() == 0
        poll(lambda: gone(worker), timeout=10, message="worker stopped")
        poll(lambda: not worker_pids(client), timeout=10, message="scheduler saw it leave")


def test_a_sigkilled_nanny_leaves_no_orphan(spawn, scheduler):
    """SIGKILL the nanny: its worker notices its parent is gone and exits."""
    nanny = spawn("worker", scheduler)
    with trioflow.Client(scheduler) as client:
        client.wait_for_workers(1, timeout=30)
        [worker] = worker_pids(client).values()
    os.kill(nanny.pid, signal.SIGKILL)
    started = time.monotonic()
    poll(lambda: gone(worker), timeout=10, message="orphaned worker exits")
    assert time.monotonic() - started < 5


def test_a_silent_scheduler_is_noticed_by_its_workers(spawn, scheduler):
    """SIGSTOP the scheduler: a worker notices the silence after scheduler_ttl."""
    worker = spawn("worker", scheduler, "--no-nanny", "--scheduler-ttl", 1)
    worker.wait_for_line("ready")
    scheduler_proc = [p for p in psutil.Process().children() if scheduler.split(":")[-1] in " ".join(p.cmdline())]
    assert scheduler_proc
    os.kill(scheduler_proc[0].pid, signal.SIGSTOP)
    try:
        worker.wait_for_line("no message for 1 s (scheduler_ttl)", timeout=15)
    finally:
        os.kill(scheduler_proc[0].pid, signal.SIGCONT)


@pytest.mark.parametrize(
    "text, expected",
    [("4GB", 4 * 10**9), ("512MiB", 512 * 2**20), ("1e9", 10**9), ("2 gib", 2 * 2**30), ("0", None), ("none", None)],
)
def test_memory_sizes_parse(text, expected):
    """--memory-limit accepts decimal and binary units, plain bytes, and 0/none."""
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "4XB", "-1GB", "4 G B"])
def test_bad_memory_sizes_are_refused(text):
    """A size that does not parse raises ValueError naming the text."""
    with pytest.raises(ValueError, match="memory size"):
        parse_memory(text)


@pytest.mark.parametrize("nanny", [True, False], ids=["nanny", "no-nanny"])
def test_the_worker_knows_its_memory_limit(spawn, scheduler, nanny):
    """--memory-limit reaches the worker, which spills and pauses by it (a
    nanny passes it on to the worker it starts; without a nanny the worker
    takes it itself, and nobody terminates it): its heartbeat says so."""
    spawn("worker", scheduler, "--memory-limit", "300MB", *(() if nanny else ("--no-nanny",)))
    with trioflow.Client(scheduler) as client:
        client.wait_for_workers(1, timeout=30)
        poll(
            lambda: [w["metrics"].get("memory_limit") for w in client.scheduler_info()["workers"].values()]
            == [3e8],
            message="the worker's heartbeat to carry its limit",
        )
