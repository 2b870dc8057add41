"""Big values: cut into frames under max_frame_bytes, read into one buffer; too big for a budget, an error naming key and size.

An in-process cluster (real TCP) with small limits, so that megabytes
exercise what gigabytes do with the defaults; one test sends a 1.1 GiB
result with the default budgets (the case of issue 13, which looped on
"frame larger than max_frame_bytes").
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import trio

import trioflow
from trioflow.config import Config

MiB = 1 << 20
# Frames of 1 MiB at most; 16 MiB a batch: room for values of 15 MiB.
SMALL = Config(max_frame_bytes=MiB, max_connection_bytes=16 * MiB)


def make_array(n_bytes, seed=0):
    return np.arange(n_bytes // 8, dtype=np.uint64) + np.uint64(seed)


def checksum(array):
    return int(array.sum(dtype=np.uint64))


@pytest.fixture
async def small_cluster():
    async with trioflow.AsyncLocalCluster(2, processes=False, config=SMALL) as cluster:
        yield cluster


@pytest.fixture
async def small_client(small_cluster):
    async with trioflow.AsyncClient(small_cluster, config=SMALL) as client:
        yield client


def executions(cluster) -> int:
    return sum(worker.executions for worker in cluster.workers.values())


async def test_a_result_over_max_frame_bytes_reaches_the_client(small_client):
    """An 8 MiB result travels as 8 frames of 1 MiB and arrives equal."""
    with trio.fail_after(60):
        value = await small_client.submit(make_array, 8 * MiB, 3)
    assert np.array_equal(value, make_array(8 * MiB, 3))


async def test_a_result_too_big_for_the_budget_errs_naming_key_and_size(small_client, small_cluster):
    """A 32 MiB result (budget 16 MiB) raises at once, naming the key and the size; it is computed once, never looped on."""
    big = small_client.submit(make_array, 32 * MiB, pure=False)
    with trio.fail_after(60), pytest.raises(trioflow.SerializationError) as caught:
        await big
    assert big.key in str(caught.value) and "max_connection_bytes" in str(caught.value)
    assert re.search(r"is 33,554,\d{3} bytes", str(caught.value))
    assert executions(small_cluster) == 1
    with trio.fail_after(60):
        assert await small_client.submit(checksum, big) == checksum(make_array(32 * MiB))  # it lives on its worker
        assert await small_client.submit(sum, [1, 2]) == 3


async def test_values_that_fit_alone_but_not_together_all_arrive(small_client, small_cluster):
    """Three 6 MiB results (budget 16 MiB) come in several answers: each worker sends what fits and the rest later."""
    [a, b] = sorted(small_cluster.scheduler.state.workers)
    futures = [small_client.submit(make_array, 6 * MiB, i, workers=[a]) for i in range(3)]
    with trio.fail_after(60):
        values = await small_client.gather(futures)
        assert executions(small_cluster) == 3  # nothing was recomputed to make up for a value not sent
        # And from worker to worker: b fetches all three from a.
        total = await small_client.submit(lambda *arrays: sum(checksum(x) for x in arrays), *futures, workers=[b])
    assert all(np.array_equal(v, make_array(6 * MiB, i)) for i, v in enumerate(values))
    assert total == sum(checksum(make_array(6 * MiB, i)) for i in range(3))
    assert executions(small_cluster) == 4


async def test_an_argument_too_big_for_the_scheduler_errs_naming_its_task(small_client):
    """A 32 MiB argument (budget 16 MiB) fails its task with an error naming the key and size; the client goes on."""
    future = small_client.submit(len, np.zeros(32 * MiB, dtype=np.uint8))
    with trio.fail_after(60), pytest.raises(trioflow.SerializationError) as caught:
        await future
    assert future.key in str(caught.value) and re.search(r"are 33,554,\d{3} bytes", str(caught.value))
    with trio.fail_after(60):
        assert await small_client.submit(len, np.zeros(MiB, dtype=np.uint8)) == MiB


async def test_scattering_a_value_too_big_raises_naming_it(small_client):
    """scatter() of a value over the budget raises ValueError naming its key and size, before sending anything."""
    with pytest.raises(ValueError, match=r"'big' is 33,554,\d{3} bytes"):
        await small_client.scatter({"big": np.zeros(32 * MiB, dtype=np.uint8)})


async def test_a_result_of_1_1_gib_reaches_the_client():
    """A 1.1 GiB result, more than the default max_frame_bytes (1 GiB), reaches the client intact."""
    n_bytes = int(1.1 * 2**30) // 8 * 8
    async with trioflow.AsyncLocalCluster(1, processes=False) as cluster, trioflow.AsyncClient(cluster) as client:
        future = client.submit(make_array, n_bytes, 7)
        with trio.fail_after(120):
            expected = await client.submit(checksum, future)
            value = await future
        assert value.nbytes == n_bytes and checksum(value) == expected
