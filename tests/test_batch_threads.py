"""Threads trioflow starts run under SCHED_BATCH; the caller's never change.

Unit level here (the helper, `ThreadExecutor`, `LoopThread`); the same
for real worker processes is in tests/cluster/test_batch_threads.py.
"""

import os
import sys
import threading

import pytest

from trioflow.batch_threads import make_this_thread_batch
from trioflow.executor import ThreadExecutor
from trioflow.loop_thread import LoopThread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's")


def in_new_thread(fn):
    """`fn()` in a thread of its own (the policy is per thread), its value back."""
    box = []
    thread = threading.Thread(target=lambda: box.append(fn()))
    thread.start()
    thread.join(10)
    assert box, "the thread did not finish"
    return box[0]


def policy() -> int:
    return os.sched_getscheduler(0)


def test_a_default_thread_becomes_batch():
    assert in_new_thread(lambda: (make_this_thread_batch(), policy())) == (True, os.SCHED_BATCH)


def test_turned_off_a_default_thread_stays_as_it_is():
    assert in_new_thread(lambda: (make_this_thread_batch(False), policy())) == (False, os.SCHED_OTHER)


def test_turned_off_a_thread_that_inherited_batch_goes_back_to_the_default():
    """A worker process started from a batch thread begins batch."""

    def inherit_then_ask():
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        return in_new_thread(lambda: (policy(), make_this_thread_batch(False), policy()))

    assert in_new_thread(inherit_then_ask) == (os.SCHED_BATCH, False, os.SCHED_OTHER)


@pytest.mark.parametrize("batch", [True, False])
def test_a_thread_someone_put_under_another_policy_keeps_it(batch):
    def idle_then_ask():
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return make_this_thread_batch(batch), policy()

    assert in_new_thread(idle_then_ask) == (False, os.SCHED_IDLE)


@pytest.mark.parametrize("batch, expected", [(True, os.SCHED_BATCH), (False, os.SCHED_OTHER)])
async def test_task_threads_run_under_the_policy_asked_for(batch, expected):
    executor = ThreadExecutor(1, batch=batch)
    assert await executor.run(policy) == expected
    assert policy() == os.SCHED_OTHER  # the loop's own thread: untouched


@pytest.mark.parametrize("batch, expected", [(True, os.SCHED_BATCH), (False, os.SCHED_OTHER)])
def test_a_loop_thread_runs_under_the_policy_asked_for(batch, expected):
    loop = LoopThread("test-loop", batch=batch)
    try:
        assert loop.run_sync(policy) == expected
    finally:
        loop.stop()
    assert policy() == os.SCHED_OTHER  # the caller's thread: untouched
