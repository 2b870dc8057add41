"""Warm receive buffers in real worker processes, and values not kept alive by a connection.

A worker process receives a big value into the memory of one it dropped
(comm/buffers.py, `WarmBuffers`). Across real processes: a value still in
use on the worker is never overwritten by the next one received, a dropped
one's memory is reused, and a client's connection does not keep the last
value it fetched alive.
"""

import gc
import weakref

import pytest

import trioflow
from tests.cluster.test_worker_failures import poll
from trioflow.comm.buffers import FrameBuffer

np = pytest.importorskip("numpy", reason="install the test extra: pip install -e '.[test]'")

MIB = 1 << 20
HELD = "_trioflow_test_held_values"  # where `hold` keeps values, in the worker process


def make_array(seed, nbytes):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 1 << 62, nbytes // 8, dtype=np.uint64)


def total(array):
    import numpy as np

    return int(array.sum(dtype=np.uint64))


def hold(array):
    """Keep `array` alive in this process, whatever the worker does with its key
    (as a cache in user code would), and return its total."""
    import builtins

    builtins.__dict__.setdefault(HELD, []).append(array)
    return total(array)


def total_of_held():
    import builtins

    return [total(array) for array in builtins.__dict__.get(HELD, [])]


def warm_buffers():
    from trioflow.comm.buffers import WARM

    return {"reused": WARM.reused, "kept": WARM.kept_bytes, "free": WARM.free_bytes()}


def test_a_value_in_use_is_never_overwritten_and_a_dropped_ones_memory_is_reused():
    with trioflow.LocalCluster(n_workers=2, threads_per_worker=1) as cluster, trioflow.Client(cluster) as client:
        a, b = sorted(client.scheduler_info()["workers"])
        made = [client.submit(make_array, seed, 4 * MIB, workers=[a], pure=False) for seed in range(3)]
        expected = client.gather([client.submit(total, x, workers=[a], pure=False) for x in made])
        assert len(set(expected)) == 3
        first, second, third = made
        del made

        # B receives the first and keeps using it; then the second, which B
        # drops once nobody needs it.
        assert client.submit(hold, first, workers=[b], pure=False).result() == expected[0]
        assert client.submit(total, second, workers=[b], pure=False).result() == expected[1]
        before = client.run(warm_buffers, workers=[b])[b]
        assert before["kept"] >= 8 * MIB  # both buffers kept
        del second
        poll(lambda: client.run(warm_buffers, workers=[b])[b]["free"] >= 4 * MIB, message="B to drop the second")

        # The third is received into the second's memory, not the first's.
        assert client.submit(total, third, workers=[b], pure=False).result() == expected[2]
        after = client.run(warm_buffers, workers=[b])[b]
        assert after["reused"] == before["reused"] + 1
        assert client.run(total_of_held, workers=[b])[b] == [expected[0]]


def test_a_fetched_value_is_not_kept_alive_by_its_connection(monkeypatch):
    """Once the caller drops a value it gathered, its memory goes: the
    connection's reader keeps no reference to the last answer while it
    waits for the next (one did, until the next answer on that link)."""
    buffers = []
    frame = FrameBuffer.frame

    def remembered(self):
        buffers.append(weakref.ref(self.map))
        return frame(self)

    monkeypatch.setattr(FrameBuffer, "frame", remembered)
    with trioflow.LocalCluster(n_workers=1, processes=False) as cluster, trioflow.Client(cluster) as client:
        future = client.submit(make_array, 7, 4 * MIB, pure=False)
        value = future.result()
        assert buffers and buffers[-1]() is not None and value.nbytes == 4 * MIB
        del value, future

        def gone():
            gc.collect()
            return buffers[-1]() is None

        poll(gone, timeout=10, message="the fetched value's buffer to be freed")
