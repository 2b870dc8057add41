"""A worker process serves with its garbage collector on and nothing frozen.

It imports with the collector paused (trioflow/gc_pause.py says why); a
pause that outlived the imports would let cycles pile up for the worker's
whole life, unseen by any test that only checks results.
"""

import gc

import pytest

import trioflow

pytestmark = pytest.mark.processes


def collector_state(_: object = None) -> tuple[bool, int, tuple[int, int, int]]:
    gc.collect()
    return gc.isenabled(), gc.get_freeze_count(), gc.get_threshold()


def test_worker_processes_run_tasks_with_the_collector_on():
    with trioflow.Client(n_workers=2, threads_per_worker=1) as client:
        states = client.gather([client.submit(collector_state, i, pure=False) for i in range(4)])
    assert set(states) == {(True, 0, gc.get_threshold())}
