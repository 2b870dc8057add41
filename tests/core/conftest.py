"""Fixtures for the pure core: state machines with invariants checked at teardown."""

import itertools

import pytest

from trioflow.core import SchedulerState, WorkerState
from trioflow.core.scheduler_invariants import check_invariants
from trioflow.core.worker_invariants import check_worker_invariants

_ids = itertools.count()
_last = ""


def sid() -> str:
    """A fresh stimulus id."""
    global _last
    _last = f"test-{next(_ids)}"
    return _last


def last_sid() -> str:
    """The id `sid()` made last: the id of the event just handled, when that
    event was made last (what its messages must carry; a test compares
    with this, never with an id copied from the messages themselves)."""
    return _last


@pytest.fixture
def sched():
    state = SchedulerState(allowed_failures=3, worker_saturation=1.0)
    yield state
    check_invariants(state)


@pytest.fixture
def worker():
    state = WorkerState("tcp://w1", nthreads=1)
    yield state
    check_worker_invariants(state)
