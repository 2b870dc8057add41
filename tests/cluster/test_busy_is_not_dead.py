"""Busy is not dead (design.md §6 rule 6): a stall of a process's own loop never counts against its peers.

The scheduler runs in the test's Trio loop, the worker in a loop of its own
(a `LoopThread`), both over loopback TCP, so that one can stall while the
other keeps talking. A stall is a blocking `time.sleep` inside the loop
under test: what is measured, not a way to wait. After the stall, each test
waits for a fresh message on the same link, then checks that the link was
never dropped and replaced.
"""

from __future__ import annotations

import logging
import operator
import threading
import time

import pytest
import trio

import trioflow
import trioflow.client
from tests.conftest import wait_until
from trioflow.config import Config
from trioflow.loop_thread import LoopThread
from trioflow.scheduler import Scheduler
from trioflow.worker import Worker

TTL_S = 1.0
STALL_S = 2.5 * TTL_S


async def _scheduler_and_threaded_worker(nursery: trio.Nursery, config: Config):
    scheduler = Scheduler(config=config)
    address = await nursery.start(scheduler.serve)
    thread = LoopThread("test-worker")
    worker = Worker(address, config=config)
    await trio.to_thread.run_sync(thread.start, worker.serve)
    await scheduler.wait_for_workers(1)
    [link] = scheduler.workers.values()
    return scheduler, thread, link


async def _next_message_on(link) -> None:
    """Wait until `link` receives bytes after now (a heartbeat comes every 0.1 s)."""
    after = trio.current_time()
    await wait_until(lambda: link.conn.last_received > after, timeout=30, message="a message after the stall")


async def test_a_stall_of_the_schedulers_loop_drops_no_worker(caplog):
    """The scheduler's own loop stalls for 2.5x worker_ttl: the worker keeps its link, nothing is logged as left."""
    config = Config(worker_ttl=TTL_S, scheduler_ttl=30.0, heartbeat_interval=0.1)
    async with trio.open_nursery() as nursery:
        scheduler, thread, link = await _scheduler_and_threaded_worker(nursery, config)
        try:
            time.sleep(STALL_S)  # the scheduler's loop (this one) stalls; the worker's goes on
            await _next_message_on(link)
            assert scheduler.workers == {link.address: link}
            assert not link.scope.cancel_called
        finally:
            await trio.to_thread.run_sync(thread.stop)
            nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if "left:" in r.getMessage()]


async def test_a_stall_of_a_workers_loop_does_not_make_it_leave_its_scheduler(caplog):
    """The worker's own loop stalls for 2.5x scheduler_ttl: it does not give up on its scheduler."""
    config = Config(worker_ttl=30.0, scheduler_ttl=TTL_S, heartbeat_interval=0.1)
    async with trio.open_nursery() as nursery:
        scheduler, thread, link = await _scheduler_and_threaded_worker(nursery, config)
        try:
            # Stall the worker's loop (in its thread); ours keeps serving.
            await trio.to_thread.run_sync(thread.run_sync, time.sleep, STALL_S)
            await _next_message_on(link)
            assert scheduler.workers == {link.address: link}
            assert not link.scope.cancel_called
        finally:
            await trio.to_thread.run_sync(thread.stop)
            nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if "cannot reach its scheduler" in r.getMessage()]


class _RecordsWherePickled:
    """An argument that notes the thread that pickles it."""

    threads: list[str] = []

    def __reduce__(self):
        _RecordsWherePickled.threads.append(threading.current_thread().name)
        return (int, (1,))


@pytest.mark.processes
def test_a_client_of_a_local_cluster_has_a_loop_of_its_own_and_packs_in_the_callers_thread():
    """Client(cluster) runs apart from the scheduler's loop, and map/submit pickle in the caller's thread."""
    _RecordsWherePickled.threads.clear()
    with trioflow.LocalCluster(1) as cluster, trioflow.Client(cluster) as client:
        assert client._loop is not cluster.loop
        futures = client.map(operator.add, [_RecordsWherePickled()] * 3, [1, 2, 3])
        future = client.submit(operator.add, _RecordsWherePickled(), 10)
        assert client.gather(futures) == [2, 3, 4] and future.result() == 11
    assert _RecordsWherePickled.threads == [threading.current_thread().name] * 4


async def test_dropping_many_futures_is_forgotten_in_bounded_steps(client, monkeypatch):
    """Futures dropped at once are forgotten RELEASE_SLICE keys per step of the client's loop, all of them."""
    monkeypatch.setattr(trioflow.client, "RELEASE_SLICE", 100)
    steps: list[int] = []
    flush = client._flush_releases

    def counting_flush():
        before = len(client._released)
        flush()
        steps.append(before - len(client._released))

    monkeypatch.setattr(client, "_flush_releases", counting_flush)
    futures = [client._future(f"dropped-{i}") for i in range(1000)]
    assert len(client.futures) >= 1000
    del futures
    await wait_until(lambda: not any(k.startswith("dropped-") for k in client.futures), message="all forgotten")
    assert sum(steps) == 1000 and max(steps) <= 100 and len(steps) >= 10


def inc(x):
    return x + 1


@pytest.mark.processes
@pytest.mark.scale
def test_a_200_000_task_map_on_a_local_cluster_loses_no_worker(caplog):
    """SCALE (over a minute; runs with --scale): map(inc) over 200,000 tasks on LocalCluster(2), wait() and
    gather, then the futures dropped and forgotten, with no worker declared gone, reconnected or restarted."""
    n = 200_000
    caplog.set_level(logging.WARNING, logger="trioflow")
    with trioflow.LocalCluster(2) as cluster, trioflow.Client(cluster) as client:
        scheduler = cluster._cluster.scheduler
        links = dict(scheduler.workers)  # a reconnect would be a new link
        pids = {address: info["pid"] for address, info in client.scheduler_info()["workers"].items()}
        futures = client.map(inc, range(n), pure=False)
        trioflow.wait(futures)
        results = client.gather(futures)
        assert results == list(range(1, n + 1))
        del futures, results
        deadline = time.monotonic() + 300
        while sum(client.scheduler_info()["tasks"].values()) and time.monotonic() < deadline:
            time.sleep(0.1)  # polling the scheduler's count, as W10 does
        assert sum(client.scheduler_info()["tasks"].values()) == 0
        assert dict(scheduler.workers) == links
        assert {address: info["pid"] for address, info in client.scheduler_info()["workers"].items()} == pids
    gone = [r.getMessage() for r in caplog.records if "left:" in r.getMessage() or "restarting" in r.getMessage()]
    assert not gone
