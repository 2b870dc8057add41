"""The dashboard with real processes: `trioflow scheduler --dashboard-port`, workers
that die under their nannies, and what the counters and events make of it."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

import trioflow
from tests.cluster.conftest import free_port
from tests.dashboard.helpers import fetch

pytestmark = pytest.mark.processes


def die():
    os._exit(1)


def inc(x):
    return x + 1


def test_a_task_that_kills_its_workers_is_counted_and_told():
    """Three worker deaths, one KilledWorker naming the task, in counters and events;
    and each worker process reports its memory."""
    with trioflow.LocalCluster(n_workers=2, threads_per_worker=1) as cluster, trioflow.Client(cluster) as client:
        assert client.submit(inc, 1).result(timeout=30) == 2
        memory = poll(lambda: _memory_of_every_worker(client), message="every worker's memory in a heartbeat")
        poison = client.submit(die, key="poison")
        with pytest.raises(trioflow.KilledWorker):
            poison.result(timeout=60)
        metrics = client.get_cluster_metrics()
    assert metrics["counters"]["worker_deaths"] == 3 and metrics["counters"]["killed_worker"] == 1
    kinds = [event["kind"] for event in metrics["events"]]
    assert kinds.count("worker-died") == 3 and kinds.count("killed-worker") == 1
    (killed,) = [event for event in metrics["events"] if event["kind"] == "killed-worker"]
    assert killed["text"].startswith("KilledWorker: poison was running on 3 workers when they died")
    died = [event["text"] for event in metrics["events"] if event["kind"] == "worker-died"]
    assert all("connection closed" in text and "it was processing 1 tasks" in text for text in died)
    # A Python process with trioflow loaded holds some tens of MB.
    assert len(memory) == 2 and all(10e6 < m < 2e9 for m in memory)


def _memory_of_every_worker(client):
    memory = [info["metrics"].get("memory") for info in client.scheduler_info()["workers"].values()]
    return memory if memory and None not in memory else None


def poll(predicate, timeout=20.0, message="condition"):
    """Poll `predicate` until it returns something true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


def test_the_scheduler_command_serves_its_dashboard_behind_a_token(spawn):
    """`trioflow scheduler --dashboard-port 0` says where the page is; with
    TRIOFLOW_DASHBOARD_TOKEN set, only requests with the token get an answer;
    SIGTERM ends both ports."""
    port = free_port()
    scheduler = spawn("scheduler", "--port", port, "--dashboard-port", 0, env={"TRIOFLOW_DASHBOARD_TOKEN": "tok"})
    line = scheduler.wait_for_line("trioflow dashboard at")
    assert line.endswith("(requests need the dashboard token)\n")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO    trioflow\.scheduler: ", line), line
    url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
    assert fetch(url, authorize=False)[0] == 401
    status, headers, body = fetch(url + "?token=tok", authorize=False)
    assert status == 200 and b"trioflow" in body
    status, headers, body = fetch(url + "metrics", headers={"Authorization": "Bearer tok"})
    assert status == 200 and b"trioflow_workers 0.0" in body
    scheduler.send_signal(signal.SIGTERM)
    assert scheduler.wait() == 0
    with pytest.raises(OSError):
        fetch(url + "health", timeout=2)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "trioflow", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dashboard-port", "70000"], "dashboard_port must be a port number between 0 and 65535, got 70000"),
        (["--dashboard-port", "eighty"], "argument --dashboard-port: invalid int value: 'eighty'"),
        (["--dashboard-host", " "], "dashboard_host must name an interface"),
    ],
)
def test_bad_dashboard_flags_are_refused_clearly(args, message):
    """A bad dashboard flag exits with status 2 and names what was wrong."""
    result = run_cli("scheduler", "--port", "0", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_a_taken_dashboard_port_stops_the_scheduler_with_a_clear_message(spawn):
    """The scheduler exits 1 and says which port was taken, not "Exceptions from Trio nursery"."""
    first = spawn("scheduler", "--port", free_port(), "--dashboard-port", 0)
    taken = re.search(r"http://127\.0\.0\.1:(\d+)/", first.wait_for_line("dashboard at")).group(1)
    result = run_cli("scheduler", "--port", str(free_port()), "--dashboard-port", taken)
    assert result.returncode == 1
    assert f"scheduler failed: cannot serve the dashboard on 127.0.0.1:{taken}: address already in use" in result.stderr
