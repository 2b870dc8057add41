"""A blocking `Client.submit` returns its future without waiting for the
client's loop (`AsyncClient._submit_from_thread`).

Each test holds the client's loop thread in one step (`loop_held`) to make
the window in which a future exists but its task is not yet taken in as
wide as it needs to be, without sleeping.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import trioflow
from trioflow.errors import CommClosedError

BOUND_S = 30.0


def inc(x):
    return x + 1


@pytest.fixture
def client() -> Iterator[trioflow.Client]:
    with trioflow.LocalCluster(1, processes=False) as cluster, trioflow.Client(cluster) as client:
        yield client


def run_in_loop_soon(client: trioflow.Client, fn: Callable[[], Any]) -> None:
    """Queue `fn` in the client's loop behind whatever is queued there."""
    token = client._loop._token
    assert token is not None
    token.run_sync_soon(fn)


@contextlib.contextmanager
def loop_held(client: trioflow.Client) -> Iterator[None]:
    """The client's loop thread stays in one step until the block ends."""
    holding, gate = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        gate.wait(BOUND_S)

    run_in_loop_soon(client, hold)
    assert holding.wait(BOUND_S)
    try:
        yield
    finally:
        gate.set()


class Caller(threading.Thread):
    """Calls `fn` in a thread of its own, keeping what it returned or raised."""

    def __init__(self, fn: Callable[[], Any]):
        super().__init__(daemon=True)
        self.fn = fn
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:
            self.error = exc


def test_submit_returns_while_the_clients_loop_is_busy(client):
    with loop_held(client):
        caller = Caller(lambda: [client.submit(inc, i) for i in range(20)])
        caller.start()
        caller.join(BOUND_S)
        assert not caller.is_alive(), "submit waited for the client's loop"
        futures = caller.value
        assert [repr(f).endswith("submitted>") for f in futures] == [True] * 20
    # Later calls reach the loop behind the queued tasks: gather sees them all.
    assert client.gather(futures) == list(range(1, 21))


def test_a_future_not_yet_taken_in_answers_once_the_loop_takes_it(client):
    with loop_held(client):
        future = client.submit(inc, 1)
        asker = Caller(future.done)
        asker.start()
    asker.join(BOUND_S)
    assert asker.error is None and asker.value in (True, False)
    assert future.result() == 2 and future.status == "finished"


def test_a_future_dropped_before_its_task_was_taken_in_is_released(client):
    earlier = client.submit(inc, 0, pure=False)
    assert earlier.result() == 1
    with loop_held(client):
        # Dropping `earlier` queues the release step first; the new task's
        # step comes after it, so the release must take the task in itself.
        del earlier
        dropped = client.submit(inc, 1, pure=False)
        key = dropped.key
        dropped.release()  # (`del` would wait: the queue holds the handle)
        kept = client.submit(inc, 2)
    assert kept.result() == 3  # (asked after both steps above have run)
    assert key not in client._client.core.futures


def close_in_this_step(client: trioflow.Client) -> None:
    """`AsyncClient.close` has no checkpoint: run it to its end at once."""
    with contextlib.suppress(StopIteration):
        client._client.close().send(None)


def test_tasks_the_client_can_no_longer_take_fail_their_futures(client):
    with loop_held(client):
        # The client is running when `submit` looks, and closing by the
        # time its loop takes the task in.
        run_in_loop_soon(client, lambda: close_in_this_step(client))
        future = client.submit(inc, 1)
    with pytest.raises(CommClosedError, match="could not take the task: the client is closing"):
        future.result(timeout=BOUND_S)


def test_submits_from_many_threads_all_arrive(client):
    callers = [Caller(lambda n=n: [client.submit(inc, 1000 * n + i) for i in range(200)]) for n in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(BOUND_S)
    assert [caller.error for caller in callers] == [None] * 4
    futures = [future for caller in callers for future in caller.value]
    assert client.gather(futures) == [1000 * n + i + 1 for n in range(4) for i in range(200)]


def test_a_release_never_overtakes_a_task_queued_before_it(client, monkeypatch):
    """The caller's thread may queue a task on `a` and then drop `a` while
    the loop is between taking in the queued tasks and taking the dropped
    handles; `a`'s release must then wait for the next step, or the
    scheduler forgets `a` before it hears of the task that needs it."""
    a = client.submit(inc, 1, pure=False)
    assert a.result() == 2
    trigger = client.submit(inc, 0, pure=False)
    assert trigger.result() == 1
    inner = client._client
    take_submissions = inner._take_submissions
    raced: list[trioflow.Future] = []

    def take_then_race() -> None:
        take_submissions()
        if not raced:  # what the caller's thread can do right after the take
            raced.append(client.submit(inc, a, pure=False))
            a.release()

    monkeypatch.setattr(inner, "_take_submissions", take_then_race)
    with loop_held(client):
        trigger.release()  # queues a release step: the race runs inside it
    client._loop.run_sync(lambda: None)  # (queued behind that step)
    assert len(raced) == 1, "the release step never ran"
    assert raced[0].result(timeout=BOUND_S) == 3
