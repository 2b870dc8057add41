"""A blocking `Future.result` waits in the caller's thread for the report
that its future is done (`BlockingPortal.result`, `ValueReport`).

A small value comes with that report and is taken there; anything else
(a failure, a value a worker holds) goes the general way, through a task
in the client's loop (`AsyncClient._result`), once the future is done.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

import trioflow
from trioflow.client import AsyncClient
from trioflow.comm.messages import INLINE_VALUE_BYTES

BOUND_S = 30.0


def inc(x):
    return x + 1


def fail(message):
    raise ValueError(message)


def big(n):
    return b"x" * n


# Gates the tests open for tasks that wait on them. Task functions from
# tests travel by value, so a task finds its gate by module name at run time
# (the cluster's workers are threads of this process).
GATES: dict[str, threading.Event] = {}


def wait_at_gate(name, value):
    import sys

    if not sys.modules[__name__].GATES[name].wait(BOUND_S):
        raise TimeoutError(f"gate {name!r} never opened")
    return value


@pytest.fixture
def gate(request) -> Iterator[tuple[str, threading.Event]]:
    name = request.node.name
    GATES[name] = event = threading.Event()
    try:
        yield name, event
    finally:
        event.set()
        del GATES[name]


@pytest.fixture
def client() -> Iterator[trioflow.Client]:
    with trioflow.LocalCluster(1, processes=False) as cluster, trioflow.Client(cluster) as client:
        yield client


@pytest.fixture
def general_path_calls(monkeypatch) -> list[str]:
    """The keys `AsyncClient._result` (the general path) was asked for."""
    calls: list[str] = []
    general = AsyncClient._result

    async def counted(self, future, timeout):
        calls.append(future.key)
        return await general(self, future, timeout)

    monkeypatch.setattr(AsyncClient, "_result", counted)
    return calls


def test_a_small_value_is_taken_from_the_report_itself(client, general_path_calls):
    futures = [client.submit(inc, i, pure=False) for i in range(20)]
    assert [future.result() for future in futures] == list(range(1, 21))
    assert general_path_calls == []


def test_a_value_a_worker_holds_is_fetched_once_the_future_is_done(client, general_path_calls):
    future = client.submit(big, 4 * INLINE_VALUE_BYTES)
    assert future.result() == b"x" * (4 * INLINE_VALUE_BYTES)
    assert general_path_calls == [future.key]


def big_at_gate(name, n):
    return wait_at_gate(name, b"x" * n)


def test_a_value_a_worker_holds_is_fetched_within_the_callers_timeout(client, gate, general_path_calls):
    name, event = gate
    n = 4 * INLINE_VALUE_BYTES
    future = client.submit(big_at_gate, name, n)
    with pytest.raises(TimeoutError):
        future.result(timeout=0.05)
    event.set()
    # Pending when asked, then done: the fetch gets what is left of the
    # timeout (the deadline the loop noted), which is plenty here.
    assert future.result(timeout=BOUND_S) == b"x" * n
    assert general_path_calls == [future.key]


def test_a_failure_raises_the_tasks_own_error(client):
    future = client.submit(fail, "boom")
    with pytest.raises(ValueError, match="boom"):
        future.result()
    # Done already: even a zero timeout gives the task's error, not a timeout.
    with pytest.raises(ValueError, match="boom"):
        future.result(timeout=0)


def test_a_done_future_with_a_small_value_answers_even_a_zero_timeout(client):
    future = client.submit(inc, 1)
    assert future.result() == 2
    assert future.result(timeout=0) == 2


def test_a_wait_that_times_out_leaves_nothing_behind(client, gate):
    name, event = gate
    future = client.submit(wait_at_gate, name, 7)
    for _ in range(3):
        with pytest.raises(TimeoutError, match="not done within 0.05 s"):
            future.result(timeout=0.05)
    # Each wait took its report back: no callback piles up on the record
    # while the caller polls (read in the loop, which owns the record).
    # The loop runs calls from this thread in order, so the take-backs
    # queued above have run by the time this one does.
    left = client._loop.run_sync(lambda: future._state.waiters and future._state.waiters.callbacks)
    assert not left
    event.set()
    assert future.result(timeout=BOUND_S) == 7


def test_many_threads_waiting_on_one_future_all_get_its_value(client, gate):
    name, event = gate
    future = client.submit(wait_at_gate, name, 42)
    values: list[int] = []
    lock = threading.Lock()

    def wait() -> None:
        value = future.result(timeout=BOUND_S)
        with lock:
            values.append(value)

    threads = [threading.Thread(target=wait, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    event.set()
    for thread in threads:
        thread.join(BOUND_S)
    assert values == [42] * 8


def test_a_closed_clients_future_says_so(client):
    future = client.submit(inc, 1)
    assert future.result() == 2
    client.close()
    with pytest.raises(RuntimeError, match="not running"):
        future.result()


def test_waiting_in_the_clients_own_thread_is_refused_not_a_deadlock(client):
    """A done callback runs in the client's loop thread: a blocking wait
    there would wait for itself."""
    future = client.submit(inc, 1)
    assert future.result() == 2
    outcome: list[BaseException | int] = []
    called = threading.Event()

    def callback(done):
        try:
            outcome.append(done.result(timeout=1))
        except BaseException as exc:
            outcome.append(exc)
        called.set()

    future.add_done_callback(callback)
    assert called.wait(BOUND_S)
    assert isinstance(outcome[0], RuntimeError) and "blocking function" in str(outcome[0])
