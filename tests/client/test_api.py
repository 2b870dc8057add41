"""The client API of design.md §4, on an in-process cluster over real TCP."""

import gc
import operator
import pickle

import pytest
import trio
import trio.testing

import trioflow
from tests.conftest import wait_until
from trioflow.core.client_state import FinishReported, LossReported


def inc(x):
    return x + 1


def add(a, b):
    return a + b


def div(a, b):
    return a / b


def total(*args, **kwargs):
    return sum(args) + sum(kwargs.values())


def deep_sum(obj):
    if isinstance(obj, dict):
        return sum(deep_sum(v) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(deep_sum(v) for v in obj)
    return obj


async def test_submit_returns_the_value(client):
    """submit -> await future gives fn's return value."""
    future = client.submit(inc, 41)
    assert await future == 42
    assert await future.result() == 42
    assert future.status == "finished" and future.done()


async def test_submit_passes_kwargs_and_honours_key(client):
    """kwargs reach the function; key= names the task."""
    future = client.submit(total, 1, 2, key="my-total", c=3, d=4)
    assert future.key == "my-total"
    assert await future == 10


async def test_pure_calls_share_a_key_impure_ones_do_not(client):
    """pure=True: equal calls share a key; pure=False: each call is its own task."""
    a, b = client.submit(inc, 1), client.submit(inc, 1)
    c, d = client.submit(inc, 1, pure=False), client.submit(inc, 1, pure=False)
    assert a.key == b.key
    assert a.key.startswith("inc-")
    assert len({a.key, c.key, d.key}) == 3
    assert [await f for f in (a, b, c, d)] == [2, 2, 2, 2]


async def test_map_zips_iterables_and_accepts_keys(client):
    """map runs fn over zipped iterables; keys may be a list or a prefix."""
    futures = client.map(add, range(5), range(10, 15))
    assert await client.gather(futures) == [10, 12, 14, 16, 18]
    named = client.map(inc, [1, 2], key=["one", "two"])
    assert [f.key for f in named] == ["one", "two"]
    prefixed = client.map(inc, [1, 2], key="step")
    assert all(f.key.startswith("step-") for f in prefixed)
    with pytest.raises(ValueError):
        client.map(inc, [1, 2], key=["only-one"])


async def test_gather_keeps_the_shape_of_nested_structures(client):
    """gather accepts lists, tuples and dicts of futures and keeps their shape."""
    x, y = client.submit(inc, 1), client.submit(inc, 2)
    assert await client.gather({"a": [x, (y, 5)], "b": x}) == {"a": [2, (3, 5)], "b": 2}


async def test_futures_inside_containers_become_dependencies(client):
    """Futures in lists/dicts/tuples/sets passed as arguments are replaced by values."""
    x, y = client.submit(inc, 1), client.submit(inc, 10)
    nested = client.submit(deep_sum, {"a": [x, (y, 100)], "b": {x}})
    assert await nested == 2 + 11 + 100 + 2


async def test_a_chain_of_dependents_runs_in_order(client):
    """A long chain of dependent tasks computes the right value."""
    future = client.submit(inc, 0)
    for _ in range(50):
        future = client.submit(inc, future)
    assert await future == 51


async def test_user_error_keeps_its_type_message_and_remote_traceback(client):
    """The resilience document's example: x raises ZeroDivisionError, remote traceback kept."""
    x = client.submit(div, 1, 0)
    with pytest.raises(ZeroDivisionError, match="division by zero") as info:
        await x
    cause = info.value.__cause__
    assert isinstance(cause, trioflow.RemoteTraceback)
    assert "in div" in cause.text and "ZeroDivisionError: division by zero" in cause.text
    assert "trioflow" not in cause.text.split("\n", 2)[1], "remote traceback starts in user code"
    assert x.status == "error"
    assert isinstance(await x.exception(), ZeroDivisionError)


async def test_dependents_of_a_failed_task_raise_the_same_error(client):
    """y = add(x, 10) raises x's ZeroDivisionError; the cluster keeps serving."""
    x = client.submit(div, 1, 0)
    y = client.submit(add, x, 10)
    with pytest.raises(ZeroDivisionError, match="division by zero"):
        await y
    assert y.status == "error"
    assert await client.submit(add, 1, 10) == 11


async def test_unpicklable_argument_errs_that_future_and_its_dependents(client):
    """An argument that cannot be pickled fails its future with a clear error."""
    import threading

    bad = client.submit(id, threading.Lock())
    with pytest.raises(trioflow.SerializationError, match="could not serialize the arguments of id"):
        await bad
    with pytest.raises(trioflow.SerializationError):
        await client.submit(inc, bad)
    assert await client.submit(inc, 1) == 2


def make_lock(_):
    import threading

    return threading.Lock()


async def test_unpicklable_result_errs_on_fetch_not_hangs(client, cluster):
    """A result that cannot be pickled raises SerializationError when fetched,
    for the client and for a dependent on another worker."""
    a, b = list(cluster.scheduler.state.workers)
    locked = client.submit(make_lock, 1, workers=a)
    with pytest.raises(trioflow.SerializationError, match="cannot be sent"):
        await locked
    use = client.submit(type, locked, workers=b)
    with pytest.raises(trioflow.SerializationError):
        await use
    same_worker = client.submit(lambda lock: type(lock).__name__, locked, workers=a)
    assert await same_worker == "lock"


async def test_done_callbacks_fire_once_done(client):
    """add_done_callback runs after completion, and at once on a done future."""
    seen = []
    future = client.submit(inc, 1)
    future.add_done_callback(lambda f: seen.append(("early", f.status)))
    await future
    future.add_done_callback(lambda f: seen.append(("late", f.status)))
    assert seen == [("early", "finished"), ("late", "finished")]


async def test_result_timeout_raises_and_the_future_stays_usable(client):
    """result(timeout) raises TimeoutError; the future completes later all the same."""
    import time

    future = client.submit(time.sleep, 0.5)
    with pytest.raises(TimeoutError):
        await future.result(timeout=0.01)
    assert await future.result(timeout=30) is None


async def test_scatter_list_dict_and_single_values(client):
    """scatter returns futures shaped like its input, holding the data."""
    [a, b] = await client.scatter([1, 2])
    d = await client.scatter({"x": 10, "y": 20})
    single = await client.scatter(7)
    assert set(d) == {"x", "y"} and d["x"].key == "x"
    assert await client.gather([a, b, d["x"], d["y"], single]) == [1, 2, 10, 20, 7]
    assert await client.submit(add, a, d["y"]) == 21


async def test_scatter_broadcast_puts_a_copy_on_every_worker(client, cluster):
    """broadcast=True: every worker holds the scattered value."""
    [data] = await client.scatter([list(range(100))], broadcast=True)
    who_has = await client.who_has([data])
    assert sorted(who_has[data.key]) == sorted(cluster.scheduler.state.workers)


async def test_cancel_fails_the_future_and_its_dependents(client):
    """cancel(x) makes x and its dependents raise CancelledError."""
    import time

    x = client.submit(time.sleep, 5)
    y = client.submit(operator.is_, x, None)
    await client.cancel([x])
    for future in (x, y):
        with pytest.raises(trioflow.CancelledError):
            await future
    assert x.status == "cancelled"
    await wait_until(lambda: y.status == "cancelled", message="dependent cancelled")
    assert await client.submit(inc, 1) == 2


async def test_as_completed_yields_each_future_once(client):
    """as_completed yields every future as it completes."""
    futures = client.map(inc, range(10))
    seen = [f async for f in trioflow.as_completed(futures)]
    assert sorted(f.key for f in seen) == sorted(f.key for f in futures)
    assert all(f.done() for f in seen)


async def test_wait_all_first_and_timeout(client):
    """wait: ALL_COMPLETED waits for all, FIRST_COMPLETED for one, timeout raises."""
    import time

    quick = client.map(inc, range(3))
    done, not_done = await trioflow.wait(quick)
    assert done == set(quick) and not not_done
    slow = client.submit(time.sleep, 1)
    done, not_done = await trioflow.wait([quick[0], slow], return_when=trioflow.FIRST_COMPLETED)
    assert quick[0] in done and slow in not_done
    with pytest.raises(TimeoutError):
        await trioflow.wait([slow], timeout=0.01)


async def test_wait_is_linear_in_the_number_of_futures(client, monkeypatch):
    """wait() over futures completing one by one looks at each future a bounded number of times, not N times each."""
    from trioflow.future import Future

    n = 300
    futures = [client._future(f"wait-linear-{i}") for i in range(n)]
    looks = 0
    done = Future.done

    def counting_done(self):
        nonlocal looks
        looks += 1
        return done(self)

    monkeypatch.setattr(Future, "done", counting_done)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trioflow.wait, futures)
        for i, future in enumerate(futures):
            await trio.testing.wait_all_tasks_blocked()  # the waiter sleeps until the next completion
            if i == n // 2:
                client._apply(LossReported("test", futures[0].key))  # one goes back to pending: counted again
                client._apply(FinishReported("test", futures[0].key, ("tcp://somewhere:1",)))
            client._apply(FinishReported("test", future.key, ("tcp://somewhere:1",)))
    assert looks < 20 * n  # re-checking all on each completion would be about n * n / 2


async def test_wait_first_completed_after_a_done_future_was_lost(client):
    """FIRST_COMPLETED is not met by a future that was done and went back to pending."""
    a, b = client._future("wait-lost-a"), client._future("wait-lost-b")
    client._apply(FinishReported("test", a.key, ("tcp://somewhere:1",)))
    client._apply(LossReported("test", a.key))
    async with trio.open_nursery() as nursery:
        result = []

        async def wait_first() -> None:
            result.append(await trioflow.wait([a, b], return_when=trioflow.FIRST_COMPLETED))

        nursery.start_soon(wait_first)
        await trio.testing.wait_all_tasks_blocked()
        assert not result
        client._apply(FinishReported("test", b.key, ("tcp://somewhere:1",)))
    [(done, not_done)] = result
    assert done == {b} and not_done == {a}


async def test_run_calls_a_function_on_every_worker(client, cluster):
    """run(fn) returns {worker address: fn()} for every worker."""
    results = await client.run(lambda: "hello")
    assert results == {address: "hello" for address in cluster.scheduler.state.workers}


async def test_run_raises_the_workers_exception(client):
    """run(fn) raises what fn raised on a worker."""
    with pytest.raises(ZeroDivisionError):
        await client.run(lambda: 1 / 0)


async def test_cluster_queries(client, cluster):
    """who_has, has_what, nthreads and scheduler_info describe the cluster."""
    x = client.submit(inc, 1)
    await x
    workers = sorted(cluster.scheduler.state.workers)
    assert sorted(await client.nthreads()) == workers
    assert set((await client.nthreads()).values()) == {1}
    [holder] = (await client.who_has([x]))[x.key]
    assert x.key in (await client.has_what())[holder]
    info = await client.scheduler_info()
    assert info["address"] == cluster.scheduler_address
    assert sorted(info["workers"]) == workers
    assert info["tasks"]["memory"] >= 1


async def test_inputs_on_different_workers_move_worker_to_worker(client, cluster):
    """A reduction whose inputs live on two workers fetches one input from the
    other worker directly (the scheduler and client never hold it)."""
    a, b = list(cluster.scheduler.state.workers)
    left = client.submit(list, range(1000), workers=a)
    right = client.submit(list, range(10), workers=b)
    result = client.submit(lambda x, y: len(x) + len(y), left, right)
    assert await result == 1010
    who_has = await client.who_has([left, right, result])
    # The result ran where the bigger input was, and fetched the smaller one.
    assert who_has[result.key] == [a]
    assert sorted(who_has[right.key]) == sorted([a, b])
    workers = {w.address: w for w in cluster.workers.values()}
    assert right.key in workers[a].data


async def test_released_futures_are_forgotten_and_their_data_freed(client, cluster):
    """Dropping every future of a key makes the scheduler forget it and workers free it."""
    futures = client.map(inc, range(20))
    await client.gather(futures)
    keys = [f.key for f in futures]
    del futures
    gc.collect()
    state = cluster.scheduler.state
    await wait_until(lambda: not any(k in state.tasks for k in keys), message="scheduler forgets")
    workers = list(cluster.workers.values())
    await wait_until(lambda: not any(k in w.data for w in workers for k in keys), message="workers free")


async def test_futures_cannot_be_pickled(client):
    """A Future inside an unsupported container fails loudly, not silently."""
    future = client.submit(inc, 1)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(future)


async def test_get_computes_a_classic_dask_graph(client):
    """client.get runs a graph of (function, *args) tuples, keys as references."""
    dsk = {"a": 1, "b": (inc, "a"), "c": (add, "a", "b"), ("d", 0): (sum, ["a", "b", "c"])}
    assert await client.get(dsk, "c") == 3
    assert await client.get(dsk, [[("d", 0)], "b"]) == [[6], 2]


@pytest.fixture
def da():
    """dask.array, or a skip that says how to get it (a sync fixture, so the
    reason survives: a skip raised inside a Trio test loses its message)."""
    return pytest.importorskip("dask.array", reason="interop with dask: install dask[array] (in the bench extra)")


async def test_get_runs_dask_collections(client, da):
    """A dask array's graph computes to the same value as dask's own scheduler."""
    x = (da.arange(100, chunks=10) ** 2).sum()
    keys = x.__dask_keys__()
    assert await client.get(dict(x.__dask_graph__()), keys) == x.compute(scheduler="sync")


def flaky(path, failures):
    """Raise the first `failures` times it is called (counting in a file)."""
    import pathlib

    counter = pathlib.Path(path)
    calls = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(calls))
    if calls <= failures:
        raise RuntimeError(f"failure {calls}")
    return calls


async def test_retries_rerun_a_raising_task(client, tmp_path):
    """retries=2: two failures are retried, the third call's value is returned."""
    future = client.submit(flaky, str(tmp_path / "a"), 2, retries=2)
    assert await future == 3


async def test_retries_exhausted_report_the_last_error(client, tmp_path):
    """retries=1 with three failures: the second failure is reported."""
    future = client.submit(flaky, str(tmp_path / "b"), 3, retries=1)
    with pytest.raises(RuntimeError, match="failure 2"):
        await future
    assert (tmp_path / "b").read_text() == "2"


class Oddity(Exception):
    """An exception whose constructor takes keywords and keeps extra state."""

    def __init__(self, code, *, detail="none"):
        super().__init__(code)
        self.code, self.detail = code, detail

    def __reduce__(self):
        return (_make_oddity, (self.code, self.detail))


def _make_oddity(code, detail):
    return Oddity(code, detail=detail)


def raise_oddity():
    raise Oddity(7, detail="seven")


async def test_exceptions_travel_by_their_own_reduction(client):
    """A user exception with a custom __reduce__ arrives with its state intact,
    and without a pickled traceback (that travels as text)."""
    with pytest.raises(Oddity) as info:
        await client.submit(raise_oddity)
    assert (info.value.code, info.value.detail) == (7, "seven")
    assert info.value.__traceback__ is not None  # the local raise, not the remote one
    assert "raise_oddity" in info.value.__cause__.text
