"""When a worker answers a free with `data_dropped` (a real, in-process cluster).

The answer exists for one case: the free crossed, on the wire, a report
(task_finished, replica_added) that makes the scheduler count the worker's
copy again. Every `free_keys` says how many such reports the scheduler had
handled from that worker; the worker answers only for values it reported
after that.
"""

from __future__ import annotations

import trio

from tests.conftest import wait_until
from trioflow.comm import messages as m
from trioflow.core.scheduler_events import KeysReleased


def inc(x):
    return x + 1


def heard_data_dropped(scheduler) -> list[str]:
    """Record the keys of every data_dropped the scheduler's driver handles."""
    keys: list[str] = []
    handle = scheduler._worker_handlers[m.DataDropped]

    def recording(link, msg):
        keys.extend(msg.keys)
        return handle(link, msg)

    scheduler._worker_handlers[m.DataDropped] = recording
    return keys


def holders(cluster) -> set[str]:
    return {key for worker in cluster.workers.values() for key in worker.data}


async def test_a_free_of_a_value_the_scheduler_had_counted_is_not_answered(client, cluster):
    dropped = heard_data_dropped(cluster.scheduler)
    futures = [client.submit(inc, i, pure=False) for i in range(10)]
    assert await client.gather(futures) == list(range(1, 11))
    keys = {f.key for f in futures}
    assert keys <= holders(cluster)
    del futures
    await wait_until(lambda: not keys & holders(cluster), message="the workers to drop the released values")
    await wait_until(lambda: not any(cluster.scheduler.state.knows(k) for k in keys), message="the scheduler to forget")
    # Each free went after the scheduler had heard the value's task_finished.
    assert dropped == []


async def test_a_free_that_crosses_a_report_of_its_value_is_answered(client, cluster):
    """The scheduler frees a value in the instant between the worker's
    task_finished and the scheduler reading it: the worker must answer,
    because it cannot know whether the scheduler will count that report."""
    scheduler = cluster.scheduler
    dropped = heard_data_dropped(scheduler)
    crossed: list[str] = []
    for worker in cluster.workers.values():
        send_report = worker._send_report

        def release_at_once(message, send_report=send_report):
            send_report(message)
            if isinstance(message, m.TaskFinished) and not crossed:
                # The client lets the key go now, before the scheduler reads
                # the report just sent (this runs in the worker's driver, in
                # the same Trio run as the scheduler's).
                crossed.append(message.key)
                scheduler._apply(KeysReleased("crossing-release", client.id, (message.key,)))

        worker._send_report = release_at_once
    future = client.submit(inc, 1, pure=False)
    await wait_until(lambda: crossed, message="the task to finish")
    await wait_until(lambda: dropped, message="the worker's answer")
    assert dropped == [future.key]
    assert future.key not in holders(cluster)
    with trio.fail_after(10):
        await scheduler.wait_for(lambda: not scheduler.state.knows(future.key))
    # Later values are counted before they are freed: no more answers.
    assert await client.submit(inc, 2, pure=False) == 3
    assert dropped == [future.key]
