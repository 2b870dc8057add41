"""A blocking Client on an in-process cluster, for the dask interop tests."""

import pytest

import trioflow


@pytest.fixture(scope="module")
def dask_cluster():
    """Two one-thread in-process workers (shared by a module: each test
    submits its own keys)."""
    with trioflow.LocalCluster(2, processes=False) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def sync_client(dask_cluster):
    with trioflow.Client(dask_cluster) as client:
        yield client


def executions(cluster) -> int:
    """Task functions the cluster's in-process workers have run so far."""
    return sum(worker.executions for worker in cluster.workers.values())
