"""What a client can read of what the cluster did: get_task_stream, get_cluster_metrics,
and the worker metrics behind the dashboard (in-process cluster, real TCP)."""

import time

import pytest
import trio

import trioflow
from tests.conftest import wait_until
from trioflow.comm import messages as m


def nap(x, seconds=0.05):
    time.sleep(seconds)
    return x


def boom(x):
    raise ZeroDivisionError(f"no {x}")


def big(x):
    return bytes(10_000) + bytes([x])  # too big to travel inline with task_finished


async def test_dashboard_is_off_unless_asked(cluster, client):
    """A library Scheduler serves no dashboard: no address, and scheduler_info says None."""
    assert trioflow.Config().dashboard_port is None
    assert cluster.scheduler.dashboard_address is None and cluster.dashboard_link is None
    assert (await client.scheduler_info())["dashboard"] is None


async def test_each_run_is_in_the_stream_with_its_worker_and_times(cluster, client):
    """Every run is reported by the worker that ran it, with wall-clock start and stop around the call."""
    before = time.time()
    naps = client.map(nap, range(6))
    fails = client.submit(boom, 1)
    assert await client.gather(naps) == list(range(6))
    with pytest.raises(ZeroDivisionError):
        await fails
    after = time.time()
    stream = await client.get_task_stream()
    assert len(stream) == 7
    workers = set(cluster.scheduler.state.workers)
    for run in stream:
        (span,) = run["startstops"]
        assert span["action"] == "compute"
        assert before <= span["start"] <= span["stop"] <= after
        assert run["worker"] in workers
    ok = [run for run in stream if run["status"] == "OK"]
    assert sorted(run["key"] for run in ok) == sorted(f.key for f in naps)
    assert all(run["name"] == "nap" and run["nbytes"] > 0 for run in ok)
    assert all(span["stop"] - span["start"] >= 0.045 for run in ok for span in run["startstops"])
    (erred,) = [run for run in stream if run["status"] == "error"]
    assert erred["key"] == fails.key and erred["error"] == "ZeroDivisionError: no 1" and "nbytes" not in erred


async def test_the_stream_comes_in_pages_and_can_be_narrowed(cluster, client, monkeypatch):
    """Pages of 3 still give all 10 runs in order; count keeps the newest; start and stop a window."""
    monkeypatch.setattr(m, "MAX_STREAM_PAGE", 3)
    futures = client.map(nap, range(10), seconds=0.01)
    await client.gather(futures)
    stream = await client.get_task_stream()
    assert len(stream) == 10
    starts = [run["startstops"][0]["start"] for run in stream]
    newest = await client.get_task_stream(count=4)
    assert [run["key"] for run in newest] == [run["key"] for run in stream[-4:]]
    cut = sorted(starts)[5]
    late = await client.get_task_stream(start=cut + 1e-6)
    assert late and all(run["startstops"][0]["stop"] >= cut for run in late) and len(late) < 10
    assert await client.get_task_stream(stop=1.0) == []


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"start": "yesterday"}, "start must be seconds since the epoch"),
        ({"stop": -5}, "stop must be seconds since the epoch"),
        ({"count": -1}, "count must be an int between 0"),
        ({"count": 2.5}, "count must be an int between 0"),
    ],
)
async def test_bad_stream_arguments_are_refused_clearly(client, kwargs, problem):
    """A bound that is not a time, or a count that is not an int >= 0, raises ValueError naming it."""
    with pytest.raises(ValueError, match=problem):
        await client.get_task_stream(**kwargs)


async def test_lost_and_recomputed_values_are_counted_and_told():
    """A worker leaving with the only copy of scattered data (LostData) and of a
    needed result (recomputed) shows in the counters and the events, by key."""
    async with trioflow.AsyncLocalCluster(3, processes=False) as cluster, trioflow.AsyncClient(cluster) as client:
        data = await client.scatter(12345)
        result = client.submit(big, 7)
        await _done(result)
        (data_holder,) = (await client.who_has([data]))[data.key]
        (result_holder,) = (await client.who_has([result]))[result.key]
        metrics = await client.get_cluster_metrics()
        seen = max((e["seq"] for e in metrics["events"]), default=0)
        for worker in {data_holder, result_holder}:
            await _worker_at(cluster, worker).close()
        with pytest.raises(trioflow.LostData):
            await data
        assert (await result)[-1] == 7  # recomputed on a survivor
        metrics = await client.get_cluster_metrics(events_after=seen)
        kinds = {event["kind"]: event for event in metrics["events"]}
        assert "worker-left" in kinds
        assert kinds["lost-data"]["text"] == f"LostData: 1 scattered value lost with the last copy: {data.key}"
        assert kinds["recomputing"]["text"] == f"recomputing 1 value whose last copy was lost: {result.key}"
        assert metrics["counters"]["lost_data"] == 1 and metrics["counters"]["recomputed"] == 1
        assert metrics["counters"]["workers_retired"] == len({data_holder, result_holder})
        assert metrics["counters"]["worker_deaths"] == 0


async def test_a_restart_is_an_event(client):
    """Client.restart() shows as a restart event and counter."""
    await client.restart()
    metrics = await client.get_cluster_metrics()
    assert [e["kind"] for e in metrics["events"]].count("restart") == 1
    assert metrics["counters"]["restarts"] == 1


async def test_a_busy_worker_still_reports_its_metrics(cluster, client):
    """A link never quiet carries no liveness heartbeats, yet metrics arrive at least every second."""
    scheduler = cluster.scheduler
    started = trio.current_time()
    n = 0
    while trio.current_time() - started < 2.5:
        await client.submit(nap, n, seconds=0.001, pure=False)
        n += 1
    for link in scheduler.workers.values():
        assert link.last_heartbeat_at > started + 1.0, "no heartbeat during the busy period"
        assert set(link.last_heartbeat) >= {"executing", "keys", "tasks"}


async def _done(future) -> None:
    await wait_until(future.done, message=f"{future.key} to finish")


def _worker_at(cluster, address):
    return next(w for w in cluster.workers.values() if w.address == address)
