"""dask collections on trioflow, through every path a dask user takes.

Each path is checked against dask's own synchronous scheduler, for
dask.array, dask.bag, dask.delayed and dask.dataframe (pandas).
"""

import operator

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import trioflow
from tests.dask.conftest import executions


def double(v):
    return v * 2


def not_multiple_of_3(v):
    return v % 3 != 0


def inc(v):
    return v + 1


def make_array():
    return (da.arange(200, chunks=25).reshape(20, 10).rechunk((5, 5)) ** 2).sum(axis=0)


def make_bag():
    return db.from_sequence(range(30), npartitions=4).map(double).filter(not_multiple_of_3).fold(operator.add)


def make_delayed():
    parts = [dask.delayed(inc)(i) for i in range(10)]
    return dask.delayed(sum)(parts)


def make_frame():
    frame = pd.DataFrame({"a": np.arange(120), "b": np.arange(120) % 7, "c": np.linspace(0, 1, 120)})
    df = dd.from_pandas(frame, npartitions=5)
    return df[df.a > 10].groupby("b").agg({"a": "sum", "c": "mean"})


COLLECTIONS = {"array": make_array, "bag": make_bag, "delayed": make_delayed, "dataframe": make_frame}


def same(value, expected):
    """Equal as dask's synchronous scheduler computes it (arrays, frames, scalars)."""
    if isinstance(expected, (pd.DataFrame, pd.Series)):
        pd.testing.assert_frame_equal(value, expected) if isinstance(expected, pd.DataFrame) else (
            pd.testing.assert_series_equal(value, expected)
        )
        return True
    if isinstance(expected, np.ndarray):
        np.testing.assert_array_equal(value, expected)
        return True
    assert value == expected
    return True


@pytest.mark.parametrize("kind", COLLECTIONS)
def test_dask_compute_with_scheduler_client_get(sync_client, kind):
    """dask.compute(x, scheduler=client.get) gives what dask's sync scheduler gives."""
    x = COLLECTIONS[kind]()
    (value,) = dask.compute(x, scheduler=sync_client.get)
    assert same(value, x.compute(scheduler="sync"))


@pytest.mark.parametrize("kind", COLLECTIONS)
def test_dask_config_scheduler_client_get(sync_client, dask_cluster, kind):
    """Under dask.config.set(scheduler=client.get), x.compute() runs on trioflow's workers."""
    x = COLLECTIONS[kind]()
    expected = x.compute(scheduler="sync")
    before = executions(dask_cluster)
    with dask.config.set(scheduler=sync_client.get):
        value = x.compute()
    assert same(value, expected)
    assert executions(dask_cluster) > before


@pytest.mark.parametrize("kind", COLLECTIONS)
def test_client_compute_returns_futures(sync_client, kind):
    """client.compute(x) returns a Future of x's value; a list gives a list (non-collections pass through)."""
    x = COLLECTIONS[kind]()
    future = sync_client.compute(x)
    assert isinstance(future, trioflow.Future)
    assert same(future.result(), x.compute(scheduler="sync"))
    [again, three] = sync_client.compute([x, 3])
    assert three == 3 and same(again.result(), x.compute(scheduler="sync"))


@pytest.mark.parametrize("kind", COLLECTIONS)
def test_client_persist_keeps_the_pieces_on_the_cluster(sync_client, kind):
    """client.persist(x) returns x's type, whose graph is Futures held by workers
    (dask.dataframe adds aliases that rename them)."""
    from dask._task_spec import Alias

    x = COLLECTIONS[kind]()
    persisted = sync_client.persist(x)
    assert type(persisted) is type(x)
    graph = dict(persisted.__dask_graph__())
    futures = [v for v in graph.values() if isinstance(v, trioflow.Future)]
    assert futures and all(isinstance(v, (trioflow.Future, Alias)) for v in graph.values())
    trioflow.wait(futures)
    held = sync_client.who_has(futures)
    assert all(held[f.key] for f in futures)
    assert same(dask.compute(persisted, scheduler=sync_client.get)[0], x.compute(scheduler="sync"))


def test_dask_persist_with_scheduler_client_get(sync_client):
    """dask.persist(x, scheduler=client.get) goes through client.persist; a later computation reuses it."""
    x = da.arange(60, chunks=10) * 3
    (persisted,) = dask.persist(x, scheduler=sync_client.get)
    assert all(isinstance(v, trioflow.Future) for v in dict(persisted.__dask_graph__()).values())
    total = (persisted + 1).sum()
    assert dask.compute(total, scheduler=sync_client.get)[0] == (x + 1).sum().compute(scheduler="sync")


def test_client_get_on_dicts_and_graphs(sync_client):
    """client.get takes a classic dict (keys as references), a HighLevelGraph, nested keys."""
    dsk = {"a": 1, "b": (inc, "a"), "c": (operator.add, "a", "b"), ("d", 0): (sum, ["a", "b", "c"])}
    assert sync_client.get(dsk, "c") == 3
    assert sync_client.get(dsk, [[("d", 0)], "b"]) == [[6], 2]
    x = make_array()
    hlg = x.__dask_graph__()
    blocks = sync_client.get(hlg, x.__dask_keys__())
    for ours, theirs in zip(blocks, dask.get(hlg, x.__dask_keys__()), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_client_get_refuses_unknown_keys_and_options(sync_client):
    """A key not in the graph, or an unknown option, is refused by name."""
    with pytest.raises(KeyError, match="'nope'"):
        sync_client.get({"a": 1}, "nope")
    with pytest.raises(TypeError, match="unknown option 'colour'"):
        sync_client.get({"a": 1}, "a", colour="red")


def test_dask_compute_with_scheduler_client(sync_client):
    """scheduler=client (the object, as with dask.distributed) works too."""
    x = make_array()
    np.testing.assert_array_equal(dask.compute(x, scheduler=sync_client)[0], x.compute(scheduler="sync"))


def test_graph_conversion_runs_off_the_loop(dask_cluster, monkeypatch):
    """The graph is converted and pickled in the caller's thread (Client) or a
    worker thread (AsyncClient), never in the Trio thread the cluster runs in."""
    import threading

    import trio

    from trioflow import graph

    seen = []
    original = graph.plan_graph

    def watched(*args):
        seen.append((threading.current_thread().name, trio.lowlevel.in_trio_run()))
        return original(*args)

    monkeypatch.setattr(graph, "plan_graph", watched)
    with trioflow.Client(dask_cluster) as client:
        assert client.get({"a": (inc, 1)}, "a") == 2
    assert seen == [(threading.current_thread().name, False)]

    async def from_trio():
        async with trioflow.AsyncClient(dask_cluster) as client:
            assert await client.get({"b": (inc, 2)}, "b") == 3
            assert await (await client.compute(make_delayed())) == 55

    trio.run(from_trio)
    assert len(seen) == 3 and not any(in_trio for _, in_trio in seen)


def test_a_dask_older_than_the_oldest_supported_is_named(monkeypatch):
    """With dask older than 2026.1 (which fuses a persisted collection's futures
    into tasks) client.get refuses, naming the versions."""
    from trioflow import graph

    monkeypatch.setattr(dask, "__version__", "2025.12.0")
    with pytest.raises(ImportError, match="needs dask 2026.1.0 or newer, found 2025.12.0"):
        graph.plan_graph({"a": 1}, ["a"], lambda obj: False)


@pytest.mark.processes
def test_a_dataframe_on_worker_processes():
    """A dask.dataframe groupby computes on real worker processes (issue 15: it
    never returned), and the cluster keeps serving after it."""
    with trioflow.LocalCluster(2, processes=True, nanny=False) as cluster, trioflow.Client(cluster) as client:
        x = make_frame()
        (value,) = dask.compute(x, scheduler=client.get)
        assert same(value, x.compute(scheduler="sync"))
        assert client.submit(inc, 1).result(timeout=30) == 2
