"""A worker keeps a function for a while after its last task there left.

The scheduler mirrors each worker's function cache (`WorkerLink`): a
function travels with the first task that calls it there, and is freed
once no task there calls it. Freed at once, a program that submits one
task at a time and waits for it would have the function freed with every
result and sent again with the next task. So an idle function stays for
`FUNCTION_GRACE_S`, and is freed only if no task has called it meanwhile.
"""

import threading

import pytest
import trio

import trioflow
from trioflow import scheduler as scheduler_module
from trioflow.comm.serialize import dumps_function
from tests.conftest import wait_until


def inc(x):
    return x + 1


INC_ID = dumps_function(inc).function_id


async def _task_forgotten(cluster) -> None:
    await wait_until(lambda: not cluster.scheduler.state.tasks, timeout=10, message="the task forgotten")


async def test_the_next_task_finds_the_function_still_on_its_worker(monkeypatch):
    monkeypatch.setattr(scheduler_module, "FUNCTION_GRACE_S", 60.0)
    async with trioflow.AsyncLocalCluster(1, processes=False) as cluster:
        async with trioflow.AsyncClient(cluster) as client:
            (worker,) = cluster.workers.values()
            assert await client.submit(inc, 1) == 2
            kept = worker.functions[INC_ID]
            await _task_forgotten(cluster)
            # No task there calls it now; the worker has it all the same.
            assert INC_ID in cluster.scheduler.workers[worker.address].idle_functions
            assert worker.functions.get(INC_ID) is kept
            assert await client.submit(inc, 2) == 3
            # The second task did not carry it again (a copy sent would
            # have replaced the one the worker had).
            assert worker.functions[INC_ID] is kept


@pytest.mark.parametrize("grace_s", [0.0, 0.3])
async def test_an_idle_function_is_freed_after_the_grace_and_sent_again_when_needed(monkeypatch, grace_s):
    monkeypatch.setattr(scheduler_module, "FUNCTION_GRACE_S", grace_s)
    async with trioflow.AsyncLocalCluster(1, processes=False) as cluster:
        async with trioflow.AsyncClient(cluster) as client:
            (worker,) = cluster.workers.values()
            link = cluster.scheduler.workers[worker.address]
            submitted_at = trio.current_time()
            assert await client.submit(inc, 1) == 2
            await _task_forgotten(cluster)
            await wait_until(lambda: INC_ID not in worker.functions, timeout=10, message="inc freed on the worker")
            # Not before the grace: it went idle after the task was submitted.
            assert trio.current_time() - submitted_at >= grace_s
            assert not link.idle_functions and not link.function_users
            # The mirror agrees with the worker: the next task carries it
            # (a worker without it could not run the task).
            assert await client.submit(inc, 2) == 3


# Task functions from tests travel by value: `held` finds the gate by module
# name at run time instead of carrying a copy (workers here are threads).
gate = threading.Event()


def held(x):
    """Returns `x` once the test opens the gate."""
    import sys

    if not sys.modules[__name__].gate.wait(30):
        raise TimeoutError("the test never opened the gate")
    return x


async def test_a_function_taken_back_from_idle_is_not_freed_while_tasks_call_it(monkeypatch):
    grace_s = 0.2
    monkeypatch.setattr(scheduler_module, "FUNCTION_GRACE_S", grace_s)
    held_id = dumps_function(held).function_id
    gate.set()
    try:
        async with trioflow.AsyncLocalCluster(1, processes=False) as cluster:
            async with trioflow.AsyncClient(cluster) as client:
                (worker,) = cluster.workers.values()
                link = cluster.scheduler.workers[worker.address]
                assert await client.submit(held, 0) == 0
                await _task_forgotten(cluster)
                assert held_id in link.idle_functions
                gate.clear()
                running = client.submit(held, 1)
                await wait_until(lambda: held_id in link.function_users, message="held(1) sent to the worker")
                # Long enough for any sweep to free what it still took for idle
                # (this waits out the timer under test; nothing to poll for).
                await trio.sleep(3 * grace_s)
                queued = client.submit(held, 2)
                gate.set()
                with trio.fail_after(30):
                    assert await client.gather([running, queued]) == [1, 2]
    finally:
        gate.set()


async def test_a_worker_that_loses_its_scheduler_drops_the_functions_it_cached(monkeypatch):
    """The scheduler's record of a worker's cache dies with the link; the
    next link's starts empty. What the worker kept would never be freed."""
    monkeypatch.setattr(scheduler_module, "FUNCTION_GRACE_S", 60.0)
    async with trioflow.AsyncLocalCluster(1, processes=False) as cluster:
        async with trioflow.AsyncClient(cluster) as client:
            (worker,) = cluster.workers.values()
            assert await client.submit(inc, 1) == 2
            await _task_forgotten(cluster)
            assert INC_ID in worker.functions  # idle, within its grace
            old_link = cluster.scheduler.workers[worker.address]
            old_link.close("the test breaks the link")
            await wait_until(
                lambda: cluster.scheduler.workers.get(worker.address) not in (None, old_link),
                message="the worker registered again",
            )
            await wait_until(lambda: INC_ID not in worker.functions, message="the worker's cache emptied")
            assert await client.submit(inc, 2) == 3
            assert INC_ID in cluster.scheduler.workers[worker.address].idle_functions
