"""Fixtures for the pure core: state machines with invariants checked at teardown."""

import itertools

import pytest

from trioflow.core import SchedulerState, WorkerState
from trioflow.core import scheduler_events as ev
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


def said(msgs: list, of: str | None = None) -> list[tuple]:
    """Every message of one event, in order, each as a short tuple (so a
    test can assert the whole list: an extra message fails it).

    Each message must carry the stimulus id of the event: `of`, or by
    default the id `sid()` made last (`last_sid`).
    """
    of = _last if of is None else of
    strays = [m for m in msgs if m.stimulus_id != of]
    assert not strays, f"messages not caused by the event {of!r}: {strays}"
    return [_brief(m) for m in msgs]


def _brief(m) -> tuple:
    if isinstance(m, ev.ComputeTask):
        return ("compute", m.worker, m.key)
    if isinstance(m, ev.FreeKeys):
        return ("free", m.worker, m.keys)
    if isinstance(m, ev.ReportFinished):
        return ("finished", m.client, m.key, m.who_has) + (("with value",) if m.with_value else ())
    if isinstance(m, ev.ReportErred):
        return ("erred", m.client, m.key, m.failure, m.origin)
    if isinstance(m, ev.ReportLost):
        return ("lost", m.client, m.key)
    if isinstance(m, ev.AcquireReplicas):
        return ("acquire", m.worker, dict(m.who_has))
    if isinstance(m, ev.RequestSteal):
        return ("steal", m.worker, m.key)
    if isinstance(m, ev.WakeAfter):
        return ("wake", m.delay_s, type(m.event).__name__)
    raise AssertionError(f"no brief form for {m!r}")

