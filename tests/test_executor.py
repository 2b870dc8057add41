"""`ThreadExecutor`: task functions in threads of the worker's own, results back in Trio."""

import threading
import time

import pytest
import trio

from trioflow.executor import ThreadExecutor


def poll(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


async def test_a_function_runs_in_another_thread_and_its_value_comes_back():
    executor = ThreadExecutor(1)
    here = threading.get_ident()
    assert await executor.run(threading.get_ident) != here
    assert await executor.run(lambda: 6 * 7) == 42


async def test_an_exception_is_raised_in_the_caller():
    executor = ThreadExecutor(1)

    def fails():
        raise KeyError("nope")

    with pytest.raises(KeyError, match="nope"):
        await executor.run(fails)
    assert await executor.run(lambda: "still works") == "still works"


async def test_as_many_run_at_once_as_are_asked():
    """No cap here (the worker core decides how many run): three functions
    that each wait for the other two all finish."""
    executor = ThreadExecutor(1)
    barrier = threading.Barrier(3, timeout=10)
    results = []

    async def one(i):
        results.append(await executor.run(lambda: (barrier.wait(), i)[1]))

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(one, i)
    assert sorted(results) == [0, 1, 2]


async def test_a_cancelled_run_returns_at_once_and_the_thread_finishes_alone():
    executor = ThreadExecutor(1)
    release, finished = threading.Event(), threading.Event()

    def long():
        release.wait(10)
        finished.set()
        return "dropped"

    with trio.move_on_after(0.05) as scope:
        await executor.run(long)
    assert scope.cancelled_caught and not finished.is_set()
    release.set()
    assert await trio.to_thread.run_sync(finished.wait, 10)
    assert await executor.run(lambda: "next") == "next"


def test_idle_threads_end(monkeypatch):
    monkeypatch.setattr(ThreadExecutor, "IDLE_S", 0.05)
    executor = ThreadExecutor(1)
    before = {t.ident for t in threading.enumerate()}

    async def main():
        return await executor.run(threading.get_ident)

    ident = trio.run(main)
    assert ident not in before
    assert poll(lambda: ident not in {t.ident for t in threading.enumerate()})
    assert executor._idle == 0


async def test_one_function_after_another_use_one_thread():
    """A thread is idle again before its result is reported, so the next
    function (which the result often triggers) finds it instead of
    starting another."""
    executor = ThreadExecutor(1)
    loop_thread = threading.get_ident()

    class SlowInThreads:
        """The executor's lock, slow to take in its threads: it widens the
        window in which a result reported before its thread is idle again
        would send the next function to a new thread."""

        def __init__(self):
            self.lock = threading.Lock()

        def __enter__(self):
            if threading.get_ident() != loop_thread:
                time.sleep(0.01)
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    executor._lock = SlowInThreads()
    threads = {await executor.run(threading.get_ident) for _ in range(10)}
    assert len(threads) == 1
