"""A real cluster's threads run under SCHED_BATCH, the caller's do not.

trioflow/batch_threads.py says why. Read per thread from /proc, so the
test sees what the kernel applies: every thread of each worker process,
the client's and the cluster's loop threads, and the caller's own thread.
"""

import os
import sys

import pytest

import trioflow
from tests.cluster.conftest import free_port

pytestmark = [
    pytest.mark.processes,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's"),
]


def thread_policies(pid: int) -> dict[int, int]:
    """Thread id -> scheduling policy, for every thread of process `pid`."""
    policies = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            policies[int(tid)] = os.sched_getscheduler(int(tid))
        except ProcessLookupError:  # a thread that just ended
            pass
    return policies


def task_policy(_: object = None) -> tuple[int, int]:
    """In a task: this thread's policy, and its worker process's main thread's."""
    return os.sched_getscheduler(0), os.sched_getscheduler(os.getpid())


def loop_thread_policies(client) -> list[int]:
    """The policies of the client's and the cluster's loop threads."""
    threads = [client._loop._thread, client.cluster._loop._thread]
    return [os.sched_getscheduler(thread.native_id) for thread in threads]


@pytest.mark.parametrize(
    "batch_threads, expected", [(True, os.SCHED_BATCH), (False, os.SCHED_OTHER)], ids=["on", "off"]
)
def test_threads_trioflow_starts_follow_the_config_and_the_callers_never_change(batch_threads, expected):
    config = trioflow.Config(batch_threads=batch_threads)
    mine = os.sched_getscheduler(0)
    with trioflow.Client(n_workers=2, threads_per_worker=1, config=config) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 2
        pids = [info["pid"] for info in workers.values()]
        # Every thread of every worker process: its loop, its task threads.
        runs = client.gather([client.submit(task_policy, i, pure=False) for i in range(4)])
        assert set(runs) == {(expected, expected)}
        for pid in pids:
            assert set(thread_policies(pid).values()) == {expected}, pid
        assert loop_thread_policies(client) == [expected, expected]
    assert os.sched_getscheduler(0) == mine == os.SCHED_OTHER


@pytest.mark.parametrize(
    "flags, expected", [((), os.SCHED_BATCH), (("--no-batch-threads",), os.SCHED_OTHER)], ids=["on", "off"]
)
def test_trioflow_commands_started_by_hand_follow_the_flag(spawn, flags, expected):
    """Started from this (default-policy) thread, a scheduler and a worker
    set their own policy: nothing is inherited here."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = spawn("scheduler", "--port", port, *flags)
    scheduler.wait_for_line("listening at")
    worker = spawn("worker", address, "--no-nanny", *flags)
    worker.wait_for_line("ready")
    for server in (scheduler, worker):
        assert set(thread_policies(server.pid).values()) == {expected}, server.args
