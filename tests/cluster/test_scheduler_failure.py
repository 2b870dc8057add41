"""Scheduler failure with real processes: SIGKILL it, start a new one at the
same address, and nothing computed is lost or computed twice."""

import collections
import signal
import time

import pytest

import trioflow
from tests.cluster.conftest import free_port
from tests.cluster.test_worker_failures import poll

pytestmark = pytest.mark.processes


def record(log_path, x, delay=0.0):
    """x + 1, noting each execution in a log file (appends are atomic)."""
    with open(log_path, "a") as log:
        log.write(f"{x}\n")
    time.sleep(delay)
    return x + 1


def executions(log_path):
    with open(log_path) as log:
        return collections.Counter(int(line) for line in log if line.strip())


class Cluster:
    """A scheduler process and worker processes (under nannies) on one port."""

    def __init__(self, spawn, n_workers=2):
        self.spawn = spawn
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler = self.start_scheduler()
        self.workers = [spawn("worker", self.address) for _ in range(n_workers)]

    def start_scheduler(self):
        proc = self.spawn("scheduler", "--port", self.port)
        proc.wait_for_line("listening at")
        return proc

    def kill_scheduler(self):
        self.scheduler.send_signal(signal.SIGKILL)
        self.scheduler.wait()


@pytest.fixture
def cluster(spawn):
    return Cluster(spawn)


def test_killed_scheduler_restarted_loses_and_repeats_nothing(cluster, tmp_path):
    """SIGKILL the scheduler mid-map and start a new one on the same port:
    every future completes with the right value and every task ran exactly
    once (finished results held by workers were not recomputed; running ones
    were not restarted elsewhere)."""
    log = str(tmp_path / "executions")
    with trioflow.Client(cluster.address) as client:
        client.wait_for_workers(2, timeout=30)
        futures = client.map(record, [log] * 40, range(40), delay=0.05)
        poll(lambda: sum(f.done() for f in futures) >= 10, message="a quarter done")
        cluster.kill_scheduler()
        cluster.scheduler = cluster.start_scheduler()
        assert client.gather(futures, timeout=60) == [x + 1 for x in range(40)]
        assert executions(log) == collections.Counter(range(40))
        total = client.submit(sum, futures)
        assert total.result(timeout=30) == sum(range(1, 41))


def test_result_timeout_during_the_outage_then_completion(cluster, tmp_path):
    """result(timeout=...) expiring while the scheduler is down raises a clear
    TimeoutError; the future completes once a scheduler is back."""
    log = str(tmp_path / "executions")
    with trioflow.Client(cluster.address) as client:
        client.wait_for_workers(2, timeout=30)
        slow = client.submit(record, log, 1, delay=1.5)
        cluster.kill_scheduler()
        with pytest.raises(TimeoutError):
            slow.result(timeout=0.5)
        later = client.submit(record, log, 2)  # submitted during the outage: queued
        cluster.scheduler = cluster.start_scheduler()
        assert slow.result(timeout=60) == 2
        assert later.result(timeout=60) == 3
        assert executions(log) == collections.Counter([1, 2])


def test_submit_while_the_scheduler_is_away_is_bounded(cluster, tmp_path, monkeypatch):
    """While reconnecting, a client keeps at most MAX_QUEUED_WHILE_AWAY tasks
    for the scheduler; past that, submit raises CommClosedError and the
    refused task never runs, while the kept ones do once it is back."""
    monkeypatch.setattr(trioflow.client, "MAX_QUEUED_WHILE_AWAY", 2)
    log = str(tmp_path / "executions")
    with trioflow.Client(cluster.address) as client:
        client.wait_for_workers(2, timeout=30)
        cluster.kill_scheduler()
        poll(lambda: client.status == "reconnecting", message="the client to notice")
        kept = [client.submit(record, log, 1), client.submit(record, log, 2)]
        with pytest.raises(trioflow.CommClosedError, match="2 tasks are already waiting"):
            client.submit(record, log, 3)
        cluster.scheduler = cluster.start_scheduler()
        assert client.gather(kept, timeout=60) == [2, 3]
        assert client.submit(record, log, 4).result(timeout=30) == 5
        assert executions(log) == collections.Counter([1, 2, 4])


def test_a_client_gives_up_after_scheduler_timeout(cluster, tmp_path):
    """With scheduler_timeout set, a client whose scheduler stays away that
    long fails its pending futures with a clear CommClosedError and stops
    accepting work."""
    log = str(tmp_path / "executions")
    config = trioflow.Config(scheduler_timeout=1.0)
    with trioflow.Client(cluster.address, config=config) as client:
        client.wait_for_workers(2, timeout=30)
        pending = client.submit(record, log, 1, delay=30)
        cluster.kill_scheduler()
        with pytest.raises(trioflow.CommClosedError, match="lost the connection to the scheduler for good"):
            pending.result(timeout=30)
        with pytest.raises(trioflow.CommClosedError):
            client.submit(record, log, 2)


def test_scattered_data_survives_a_scheduler_restart(cluster):
    """Scattered data held by a worker is found again by the new scheduler."""
    with trioflow.Client(cluster.address) as client:
        client.wait_for_workers(2, timeout=30)
        [data] = client.scatter([list(range(100))])
        cluster.kill_scheduler()
        cluster.scheduler = cluster.start_scheduler()
        assert client.submit(sum, data).result(timeout=60) == sum(range(100))
        assert data.result(timeout=30) == list(range(100))
