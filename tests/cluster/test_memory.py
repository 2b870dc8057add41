"""Spilling to disk with real worker processes under nannies with a memory
limit: values three times the cluster's memory complete, no worker dies;
one value bigger than a worker's whole limit is a clear error."""

import pytest

import trioflow
from tests.cluster.test_worker_failures import poll, worker_pids

pytestmark = pytest.mark.processes

LIMIT = 200 * 10**6  # bytes per worker: 400 MB for the cluster
VALUE = 20 * 10**6  # bytes per value
N_VALUES = 3 * 2 * LIMIT // VALUE  # 60 values, 1.2 GB: three times the cluster's memory


def make(i, nbytes):
    import numpy as np

    return np.full(nbytes // 8, float(i))


def total(array):
    return float(array.sum())


def lazily_huge(nbytes):
    """A value of `nbytes` whose pages are never touched (calloc): the
    process survives making it, so the worker itself sees its size."""
    import numpy as np

    return np.zeros(nbytes // 8)


def test_values_three_times_the_clusters_memory_complete_without_a_worker_death():
    """60 arrays of 20 MB, all held, on 2 workers limited to 200 MB each:
    the least recently used go to disk (scheduler_info shows the bytes), are
    read back for their sums, every sum is right, and no worker process dies."""
    with trioflow.LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=LIMIT) as cluster:
        with trioflow.Client(cluster) as client:
            pids = worker_pids(client)
            arrays = client.map(make, range(N_VALUES), nbytes=VALUE)
            sums = client.map(total, arrays)
            n = VALUE // 8
            assert client.gather(sums, timeout=120) == [float(i * n) for i in range(N_VALUES)]

            def spilled():
                workers = client.scheduler_info()["workers"].values()
                return sum(w["metrics"].get("spilled_bytes", 0) for w in workers)

            # Every array is still held: most of them must be on disk (the
            # heartbeats carrying the figure come at least once a second).
            poll(lambda: spilled() > N_VALUES * VALUE / 2, timeout=10, message="spilled bytes in scheduler_info")
            assert worker_pids(client) == pids
            assert client.get_cluster_metrics()["counters"]["worker_deaths"] == 0
            assert client.gather(arrays[:1])[0][0] == 0.0  # and a spilled value comes back to the client


def test_a_value_bigger_than_a_workers_whole_limit_is_a_clear_error():
    """A task whose value alone passes its worker's limit fails with a
    MemoryError naming the key and the size (kept, it would get the worker
    killed; spilled, it could never be read back); the worker lives on."""
    with trioflow.LocalCluster(n_workers=1, threads_per_worker=1, memory_limit=LIMIT) as cluster:
        with trioflow.Client(cluster) as client:
            pids = worker_pids(client)
            huge = client.submit(lazily_huge, 3 * LIMIT // 2, key="huge")
            with pytest.raises(MemoryError, match=r"task 'huge' is 300000000 bytes \(286\.1 MiB\), more than"):
                huge.result(timeout=60)
            assert f"memory limit of {LIMIT} bytes" in str(huge.exception())
            assert worker_pids(client) == pids
            assert client.submit(total, client.submit(make, 2, 8000)).result(timeout=30) == 2000.0
