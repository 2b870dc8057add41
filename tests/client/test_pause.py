"""A worker whose memory passes its pause fraction, on a real (in-process)
cluster: it tells the scheduler, which sends it nothing new until it
resumes. (The process memory is played by the test.)"""

import trio

import trioflow
from trioflow.dashboard.state import cluster_state


def inc(x):
    return x + 1


async def test_a_paused_worker_takes_no_new_tasks_until_it_resumes(client, cluster):
    """The worker says paused (its memory past 80% of its limit): new tasks
    go to the other worker (the dashboard shows it paused); it says resumed:
    it gets tasks again."""
    memory = {"rss": 0}
    worker = trioflow.Worker(cluster.scheduler_address, memory_limit=10**9)
    worker.memory.rss = lambda: memory["rss"]
    scheduler = cluster.scheduler
    async with trio.open_nursery() as nursery:
        address = await nursery.start(worker.serve)
        memory["rss"] = 850 * 10**6  # past the pause fraction, 0.8
        with trio.fail_after(10):
            await scheduler.wait_for(lambda: scheduler.state.workers[address].paused)
        # The dashboard says so.
        shown = {w["address"]: w["paused"] for w in cluster_state(scheduler)["workers"]}
        assert shown[address] is True and list(shown.values()).count(True) == 1
        futures = [client.submit(inc, i, pure=False) for i in range(20)]
        assert await client.gather(futures) == list(range(1, 21))
        who_has = await client.who_has(futures)
        assert not [key for key, holders in who_has.items() if address in holders]
        # A task only it may run waits for it (no-worker) ...
        only_there = client.submit(inc, 100, workers=[address])
        with trio.fail_after(10):
            await scheduler.wait_for(
                lambda: only_there.key in scheduler.state.unrunnable
            )
        memory["rss"] = 100 * 10**6
        # ... and runs once it resumed.
        with trio.fail_after(10):
            assert await only_there == 101
        assert not scheduler.state.workers[address].paused
        worker.stop()
