"""submit/map options on a real (in-process) cluster: resources, priority,
allow_other_workers, fire_and_forget, and bad values refused by name."""

import gc
import threading

import pytest
import trio

import trioflow
from tests.conftest import wait_until
from trioflow.core import TaskState

# In-process workers share this module with the test: tasks report here.
# (Task functions from tests travel by value, so they look these up by
# module name at run time instead of carrying copies.)
ran: list[str] = []
gate = threading.Event()


def shared():
    import sys

    return sys.modules[__name__]


@pytest.fixture(autouse=True)
def fresh():
    ran.clear()
    gate.clear()
    yield
    gate.set()  # never leave a worker thread blocked


def blocked(name):
    here = shared()
    here.gate.wait(30)
    here.ran.append(name)
    return name


def record(name):
    shared().ran.append(name)
    return name


def state(cluster, future):
    ts = cluster.scheduler.state.tasks.get(future.key)
    return None if ts is None else ts.state


async def test_a_task_waits_for_a_worker_with_its_resource(client, cluster, caplog):
    """No worker has a GPU: the task waits (no-worker), the scheduler says which
    resource nobody declares; a worker with one joins and runs it."""
    future = client.submit(record, "gpu", resources={"GPU": 1})
    await wait_until(lambda: state(cluster, future) is TaskState.NO_WORKER, message="no-worker")
    assert "resource 'GPU', which no worker declares" in caplog.text
    gpu = trioflow.Worker(cluster.scheduler_address, resources={"GPU": 2})
    async with trio.open_nursery() as nursery:
        await nursery.start(gpu.serve)
        assert await future == "gpu"
        assert (await client.who_has([future]))[future.key] == [gpu.address]
        await gpu.close()


async def test_resources_in_use_are_counted():
    """GPU=1 on a 2-thread worker: a second GPU task waits for the first to end."""
    async with trioflow.AsyncLocalCluster(1, 2, processes=False, resources={"GPU": 1}) as cluster:
        async with trioflow.AsyncClient(cluster) as client:
            first = client.submit(blocked, "first", resources={"GPU": 1})
            second = client.submit(record, "second", resources={"GPU": 1})
            free = client.submit(record, "free")  # no resources: runs on the second thread
            assert await free == "free"
            assert state(cluster, second) is TaskState.NO_WORKER
            gate.set()
            assert await client.gather([first, second]) == ["first", "second"]
            assert ran == ["free", "first", "second"]


async def test_higher_priority_runs_first_then_submission_order():
    """One busy 1-thread worker: the tasks sent to it run by user priority,
    then in submission order (the worker's own queue follows the priority)."""
    async with trioflow.AsyncLocalCluster(1, 1, processes=False) as cluster:
        async with trioflow.AsyncClient(cluster) as client:
            hold = client.submit(blocked, "hold")
            await wait_until(lambda: state(cluster, hold) is TaskState.PROCESSING)
            names = ["low", "normal-1", "high", "normal-2"]
            priorities = [-1, 0, 5, 0]
            futures = [client.submit(record, n, priority=p) for n, p in zip(names, priorities)]
            await wait_until(lambda: all(state(cluster, f) is TaskState.PROCESSING for f in futures))
            gate.set()
            await client.gather(futures)
            assert ran == ["hold", "high", "normal-1", "normal-2", "low"]


async def test_allow_other_workers_makes_workers_a_preference(client, cluster):
    """workers=[absent]: waits; with allow_other_workers=True it runs elsewhere."""
    absent = "tcp://127.0.0.1:9"
    strict = client.submit(record, "strict", workers=[absent])
    loose = client.submit(record, "loose", workers=[absent], allow_other_workers=True)
    assert await loose == "loose"
    assert state(cluster, strict) is TaskState.NO_WORKER
    await client.cancel([strict])


async def test_fire_and_forget_runs_a_task_nobody_holds(client, cluster):
    """A fired-and-forgotten task runs to the end after its last future is
    dropped (and is then forgotten); one that was not is released at once."""
    kept = client.submit(blocked, "kept", pure=False)
    dropped = client.submit(blocked, "dropped", pure=False)
    await wait_until(lambda: state(cluster, kept) is state(cluster, dropped) is TaskState.PROCESSING)
    trioflow.fire_and_forget(kept)
    kept_key, dropped_key = kept.key, dropped.key
    del kept, dropped
    gc.collect()
    tasks = cluster.scheduler.state.tasks
    await wait_until(lambda: dropped_key not in tasks, message="the dropped task released")
    assert kept_key in tasks
    gate.set()
    await wait_until(lambda: "kept" in ran and kept_key not in tasks, message="fired task done and forgotten")


async def test_other_keywords_go_to_the_function(client):
    """Keywords that are not submit options reach the function (as in dask)."""

    def echo(*args, **kwargs):
        return sorted(kwargs)

    assert await client.submit(echo, fifo_timeout=1, colour="red") == ["colour", "fifo_timeout"]
    assert await client.gather(client.map(echo, [1], colour="red")) == [["colour"]]


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"priority": "high"}, ValueError, "priority must be an int"),
        ({"priority": 2**40}, ValueError, "priority must be an int between"),
        ({"resources": {"GPU": -1}}, ValueError, "the amount of 'GPU' must be positive"),
        ({"resources": {"GPU": "one"}}, TypeError, "the amount of 'GPU' must be a number"),
        ({"resources": ["GPU"]}, TypeError, "resources must be a dict"),
        ({"resources": {"": 1}}, ValueError, "resource name"),
        ({"allow_other_workers": True}, ValueError, "allow_other_workers=True needs workers"),
        ({"allow_other_workers": "yes", "workers": ["tcp://127.0.0.1:9"]}, TypeError, "allow_other_workers must be"),
        ({"workers": []}, ValueError, "allows no worker"),
        ({"retries": -1}, ValueError, "retries must be"),
    ],
)
async def test_bad_options_are_refused_by_name(client, options, error, match):
    """A bad option value raises at submit, naming the option; nothing is sent."""
    before = len(client.futures)
    with pytest.raises(error, match=match):
        client.submit(record, "x", **options)
    with pytest.raises(error, match=match):
        client.map(record, ["x"], **options)
    assert len(client.futures) == before


def test_worker_resources_flag_parses_and_refuses_nonsense():
    """--resources GPU=2,MEM=4e9 parses; a bad entry is refused by name."""
    from trioflow.task_options import parse_resources

    assert parse_resources("GPU=2,MEM=4e9") == {"GPU": 2.0, "MEM": 4e9}
    with pytest.raises(ValueError, match="'GPU' is not NAME=NUMBER"):
        parse_resources("GPU")
    with pytest.raises(ValueError, match="must be positive"):
        parse_resources("GPU=0")


def test_resources_flag_is_what_parse_resources_reads():
    """The --resources flag a cluster passes to a worker process parses back to the same resources."""
    from trioflow.task_options import parse_resources, resources_flag

    resources = {"GPU": 2.0, "MEM": 4e9, "fraction": 0.1}
    flag, value = resources_flag(resources)
    assert flag == "--resources"
    assert parse_resources(value) == resources
    assert resources_flag({}) == []
