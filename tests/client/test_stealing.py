"""Work stealing through the real shells (an in-process cluster over
loopback TCP): an idle worker takes a task that waits on a busy one, after
the busy one confirmed it had not started it, and no task runs twice.
(The rules themselves are tested event by event in tests/core/test_stealing.py.)"""

import threading

import pytest
import trio

import trioflow

# Task functions from tests travel by value, so they find this state by
# module name at run time instead of carrying copies of it.
ran: list[int] = []
gate = threading.Event()


def here():
    import sys

    return sys.modules[__name__]


@pytest.fixture(autouse=True)
def fresh():
    ran.clear()
    gate.clear()
    yield
    gate.set()  # never leave a worker thread blocked


def inc(x):
    return x + 1


def held(x, i):
    """Waits for the test's gate, then says it ran (once per run)."""
    module = here()
    module.gate.wait(30)
    module.ran.append(i)
    return x + i


async def pile_up_on_one_worker(client, scheduler):
    """Four tasks that all need a value only worker A holds, so placement
    puts them all on A (one thread: one runs, three wait)."""
    a, b = sorted(scheduler.state.workers)
    x = client.submit(inc, 0, workers=[a])
    assert await x == 1
    futures = [client.submit(held, x, i, pure=False) for i in range(4)]
    return a, b, futures


async def test_an_idle_worker_steals_a_waiting_task_and_nothing_runs_twice(client, cluster):
    """B is idle while three tasks wait on A: one moves to B (steal asked,
    given up, moved), it runs on B, and each of the four runs exactly once."""
    scheduler = cluster.scheduler
    a, b, futures = await pile_up_on_one_worker(client, scheduler)
    tasks = scheduler.state.tasks

    def on_b():
        return [f.key for f in futures if f.key in tasks and tasks[f.key].processing_on == b]

    with trio.fail_after(10):
        await scheduler.wait_for(lambda: bool(on_b()))
    counters = scheduler.recorder.counters()
    assert counters["steal_requests"] >= 1 and counters["stolen"] >= 1
    # B has one thread: while the gate is shut it holds exactly one stolen task.
    assert len(on_b()) == 1
    gate.set()
    assert await client.gather(futures) == [1, 2, 3, 4]
    assert sorted(ran) == [0, 1, 2, 3]
    holders = await client.who_has(futures)
    assert {h for hs in holders.values() for h in hs} == {a, b}


async def test_without_work_stealing_a_task_runs_where_it_was_placed():
    """Config(work_stealing=False): the same pile-up all runs on A."""
    config = trioflow.Config(work_stealing=False)
    async with trioflow.AsyncLocalCluster(2, threads_per_worker=1, processes=False, config=config) as cluster:
        async with trioflow.AsyncClient(cluster) as client:
            a, _, futures = await pile_up_on_one_worker(client, cluster.scheduler)
            gate.set()
            assert await client.gather(futures) == [1, 2, 3, 4]
            holders = await client.who_has(futures)
            assert {h for hs in holders.values() for h in hs} == {a}
            assert cluster.scheduler.recorder.counters()["steal_requests"] == 0
