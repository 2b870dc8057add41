"""Worker failures with real processes: SIGKILL, SIGSTOP, poison tasks, lost data.

Each test runs a LocalCluster whose workers are real subprocesses under
in-process nannies, and kills or freezes those processes with signals.
"""

import logging
import os
import re
import signal
import time

import psutil
import pytest

import trioflow

pytestmark = pytest.mark.processes


def slow_inc(x, delay=0.02):
    time.sleep(delay)
    return x + 1


def add(a, b):
    return a + b


def die(code=1):
    os._exit(code)


def segfault():
    os.kill(os.getpid(), signal.SIGSEGV)


def hog_memory(nbytes):
    block = bytearray(nbytes)
    time.sleep(30)
    return len(block)


def poll(predicate, timeout=20.0, message="condition"):
    """Poll `predicate` until true or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


def worker_pids(client):
    return {addr: info["pid"] for addr, info in client.scheduler_info()["workers"].items()}


@pytest.fixture
def cluster3():
    with trioflow.LocalCluster(n_workers=3, threads_per_worker=1) as cluster:
        with trioflow.Client(cluster) as client:
            yield cluster, client


@pytest.fixture
def cluster2():
    with trioflow.LocalCluster(n_workers=2, threads_per_worker=1) as cluster:
        with trioflow.Client(cluster) as client:
            yield cluster, client


def test_sigkill_mid_map_reroutes_and_every_result_is_right(cluster3):
    """SIGKILL one worker at ~30% of a map: every future still completes correctly,
    the scheduler drops the worker and its nanny brings a new one."""
    cluster, client = cluster3
    pids = worker_pids(client)
    futures = client.map(slow_inc, range(300))
    done = 0
    victim_address, victim_pid = next(iter(pids.items()))
    for _ in trioflow.as_completed(futures):
        done += 1
        if done == 90:
            os.kill(victim_pid, signal.SIGKILL)
    assert client.gather(futures) == [i + 1 for i in range(300)]
    poll(lambda: victim_pid not in worker_pids(client).values(), message="dead worker dropped")
    poll(lambda: len(worker_pids(client)) == 3, message="nanny restarted the worker")


def test_tree_reduction_survives_a_worker_killed_in_the_middle(cluster3):
    """A binary-tree sum is right even though a worker (holding intermediate
    results) is killed halfway: lost inputs are recomputed from lineage."""
    cluster, client = cluster3
    layer = client.map(slow_inc, range(64), delay=0.01)
    pids = worker_pids(client)
    killed = False
    while len(layer) > 1:
        layer = [client.submit(add, layer[i], layer[i + 1]) for i in range(0, len(layer), 2)]
        if len(layer) == 8 and not killed:
            client.wait_for_workers(3)
            os.kill(next(iter(pids.values())), signal.SIGKILL)
            killed = True
    assert layer[0].result(timeout=60) == sum(range(1, 65))


def big_range(x):
    """A result too big to travel inline with its report (it must be fetched)."""
    return list(range(x, x + 1000))


def test_held_results_lost_with_their_worker_are_recomputed(cluster2):
    """Finished futures whose only copy died are recomputed on the survivor."""
    cluster, client = cluster2
    futures = client.map(big_range, range(20))
    client.gather(futures)
    pids = worker_pids(client)
    victim, pid = next(iter(pids.items()))
    on_victim = [f for f in futures if client.who_has([f])[f.key] == [victim]]
    assert on_victim, "some results lived only on the victim"
    os.kill(pid, signal.SIGKILL)
    assert client.gather(futures, timeout=60) == [list(range(i, i + 1000)) for i in range(20)]
    for future in on_victim:
        holders = client.who_has([future])[future.key]
        assert holders and victim not in holders


def test_small_results_their_client_already_has_are_not_recomputed(cluster2, tmp_path):
    """Small results travel to the client with their reports. When their only
    holder dies, nothing is computed again (the client has the values);
    only once a new task needs one is it computed, on the survivor."""
    from tests.cluster.test_scheduler_failure import executions, record

    cluster, client = cluster2
    log = str(tmp_path / "executions")
    futures = client.map(record, [log] * 20, range(20))
    assert client.gather(futures, timeout=30) == [i + 1 for i in range(20)]
    pids = worker_pids(client)
    victim, pid = next(iter(pids.items()))
    on_victim = [i for i, f in enumerate(futures) if client.who_has([f])[f.key] == [victim]]
    assert on_victim, "some results lived only on the victim"
    os.kill(pid, signal.SIGKILL)
    poll(lambda: victim not in worker_pids(client), message="the victim dropped")
    assert client.gather(futures, timeout=30) == [i + 1 for i in range(20)]
    assert executions(log) == {i: 1 for i in range(20)}
    assert all(client.who_has([futures[i]])[futures[i].key] == [] for i in on_victim)
    total = client.submit(sum, [futures[i] for i in on_victim])
    assert total.result(timeout=30) == sum(i + 1 for i in on_victim)
    assert executions(log) == {i: (2 if i in on_victim else 1) for i in range(20)}


def test_sigstopped_worker_is_dropped_within_ttl_plus_one_second(cluster2):
    """A frozen worker (socket open, nothing sent) is declared dead within
    worker_ttl + 1 s by its heartbeat deadline, and its work is rerouted."""
    cluster, client = cluster2
    pids = worker_pids(client)
    frozen_address, frozen_pid = next(iter(pids.items()))
    futures = client.map(slow_inc, range(40), delay=0.05)
    os.kill(frozen_pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        poll(lambda: frozen_address not in worker_pids(client), timeout=10, message="frozen worker dropped")
        elapsed = time.monotonic() - stopped_at
        assert elapsed <= trioflow.Config().worker_ttl + 1.0, elapsed
        assert client.gather(futures, timeout=60) == [i + 1 for i in range(40)]
    finally:
        os.kill(frozen_pid, signal.SIGCONT)


def test_poison_task_raises_killed_worker_after_three_deaths(cluster3):
    """os._exit in a task: retried on other workers, then KilledWorker naming the
    key, the count and the last worker; dependents fail the same way; the
    cluster is fully usable afterwards."""
    cluster, client = cluster3
    poison = client.submit(die, key="poison")
    dependent = client.submit(add, poison, 1)
    with pytest.raises(trioflow.KilledWorker) as info:
        poison.result(timeout=60)
    message = str(info.value)
    assert "'poison'" in message and "running on 3 workers" in message
    assert info.value.deaths == 3 and info.value.last_worker.startswith("tcp://127.0.0.1:")
    with pytest.raises(trioflow.KilledWorker):
        dependent.result(timeout=10)
    poll(lambda: len(worker_pids(client)) == 3, message="nannies restarted the workers")
    assert client.submit(slow_inc, 1).result(timeout=30) == 2
    assert poison.status == "error"


def segfault_later(delay):
    time.sleep(delay)
    segfault()


def test_innocent_tasks_on_a_poisoned_worker_are_rerouted_not_marked():
    """Tasks queued on (but not running on) the worker a poison task kills
    finish normally; only the poison task is marked bad. With
    allowed_failures=1 a single wrongly counted death would mark an
    innocent task bad too."""
    config = trioflow.Config(allowed_failures=1)
    with trioflow.LocalCluster(n_workers=2, threads_per_worker=1, config=config) as cluster:
        with trioflow.Client(cluster) as client:
            bad = client.submit(segfault_later, 0.5, key="segfault")
            # The poison task sleeps first, so about half of these queue
            # behind it on the worker it is about to kill.
            innocent = client.map(slow_inc, range(30), delay=0.01)
            with pytest.raises(trioflow.KilledWorker):
                bad.result(timeout=60)
            assert client.gather(innocent, timeout=60) == [i + 1 for i in range(30)]


def test_memory_hog_is_killed_by_its_nanny_and_the_cluster_recovers(caplog):
    """A worker past memory_terminate_fraction (0.95) of its memory_limit is
    killed by the nanny (logged with the figure), the task counts as having
    killed it, and the restarted workers serve new work."""
    caplog.set_level(logging.WARNING, logger="trioflow.nanny")
    limit = 400 * 2**20
    config = trioflow.Config(allowed_failures=1)
    with trioflow.LocalCluster(n_workers=2, memory_limit=limit, config=config) as cluster:
        with trioflow.Client(cluster) as client:
            hog = client.submit(hog_memory, 2 * limit, key="hog")
            with pytest.raises(trioflow.KilledWorker, match="'hog'"):
                hog.result(timeout=120)
            poll(lambda: len(worker_pids(client)) == 2, message="workers back")
            assert client.submit(slow_inc, 1).result(timeout=30) == 2
    kills = [r.getMessage() for r in caplog.records if "of its limit of" in r.getMessage()]
    assert kills, "the nanny did not log the kill"
    used = int(re.search(r"uses (\d+) bytes of memory", kills[0]).group(1))
    assert used > 0.95 * limit
    assert f"over 95% of its limit of {limit} bytes (memory_terminate_fraction)" in kills[0]


def test_scattered_data_is_lost_with_its_only_holder(cluster2):
    """Scattered data has no lineage: killing its only holder makes it and its
    dependents raise LostData naming the key — no hang, no recompute."""
    cluster, client = cluster2
    [data] = client.scatter([list(range(1000))])
    [holder] = client.who_has([data])[data.key]
    dependent = client.submit(len, data)
    assert dependent.result(timeout=30) == 1000
    later = client.submit(sum, data)
    os.kill(worker_pids(client)[holder], signal.SIGKILL)
    with pytest.raises(trioflow.LostData, match=data.key):
        data.result(timeout=30)
    assert data.status == "lost"
    with pytest.raises(trioflow.LostData, match=data.key):
        client.submit(sorted, data).result(timeout=30)
    # `later` either ran before the kill or fails with the same LostData.
    try:
        assert later.result(timeout=30) == sum(range(1000))
    except trioflow.LostData as exc:
        assert exc.key == data.key


def test_replicated_scattered_data_survives_a_holder_and_is_restored(cluster3):
    """replicate(n=2) keeps two copies; the same kill then loses nothing and
    the scheduler makes a new second copy."""
    cluster, client = cluster3
    [data] = client.scatter([list(range(1000))])
    client.replicate([data], n=2)
    holders = client.who_has([data])[data.key]
    assert len(holders) == 2
    os.kill(worker_pids(client)[holders[0]], signal.SIGKILL)
    assert data.result(timeout=30) == list(range(1000))
    assert client.submit(len, data).result(timeout=30) == 1000
    poll(lambda: len(client.who_has([data])[data.key]) == 2 and holders[0] not in client.who_has([data])[data.key],
         message="a second copy restored")


def test_restart_cancels_futures_and_returns_with_fresh_workers(cluster2):
    """Client.restart(): every worker replaced through its nanny, futures fail
    with CancelledError saying so, and it returns with as many workers."""
    cluster, client = cluster2
    before = worker_pids(client)
    done = client.submit(slow_inc, 1)
    assert done.result(timeout=30) == 2
    pending = client.submit(time.sleep, 60)
    client.restart()
    after = worker_pids(client)
    assert len(after) == 2 and not set(after.values()) & set(before.values())
    for future in (done, pending):
        with pytest.raises(trioflow.CancelledError, match="restarted"):
            future.result(timeout=10)
    assert client.submit(slow_inc, 5).result(timeout=30) == 6
    for pid in before.values():
        poll(lambda pid=pid: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
             message=f"old worker {pid} gone")


def test_restart_that_outlasts_its_timeout_says_so_and_the_workers_still_return(cluster2):
    """Workers not back within restart's timeout: a clear error naming how
    many came back; the nannies go on, and the cluster serves again later.
    (A new worker process needs far more than 10 ms to start and register.)"""
    cluster, client = cluster2
    with pytest.raises(RuntimeError, match=r"only [01] of 2 workers came back within 0.01 s"):
        client.restart(timeout=0.01)
    poll(lambda: len(worker_pids(client)) == 2, message="workers back after all")
    assert client.submit(slow_inc, 1).result(timeout=30) == 2


def test_restart_without_nannies_sends_workers_away_with_a_warning(caplog):
    """Workers without a nanny are told to leave on restart, with a warning."""
    import logging

    with trioflow.LocalCluster(n_workers=1, nanny=False) as cluster, trioflow.Client(cluster) as client:
        with caplog.at_level(logging.WARNING, logger="trioflow.scheduler"):
            client.restart(timeout=10)
        assert any("has no nanny" in r.getMessage() for r in caplog.records)
        poll(lambda: not worker_pids(client), message="nanny-less worker left")
