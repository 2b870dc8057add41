"""The one place that makes a simulated run replayable (design.md §3 rule 7).

Two things decide the order in which a Trio program's tasks run, apart
from the program itself:

* Trio's scheduler. Each pass of its run loop takes the batch of runnable
  tasks and, to keep programs from relying on an order, reverses it at
  random (`trio._core._run._r`, an unseeded `random.Random`). Under
  Hypothesis, Trio instead sorts each batch by task creation order and
  shuffles it with `_r` (`_ALLOW_DETERMINISTIC_SCHEDULING`), precisely so
  that examples replay. We switch that mode on, and seed `_r` from the
  run's seed, for the duration of one `trio.run` and restore both after.
  Sorting by creation order also removes the other order Trio leaves to
  chance: which of two cancel scopes with the same deadline fires first
  (its heap breaks ties by ``id()``) and in which order a cancelled scope
  wakes its tasks (a set): whatever order they are woken in, they *run*
  in the sorted, seeded order.
* Every other random choice (latencies, task durations, backoff jitter,
  client ids, the fault plan, the workload). Each comes from its own
  `random.Random` derived from the run's seed and a label by
  `derive_rng`, which seeds with a string. String seeds go through SHA-512,
  never through ``hash()``, so ``PYTHONHASHSEED`` cannot change them.

This module pokes at two private names of Trio; if a Trio release renames
them, `deterministic_scheduling` fails loudly rather than running a
non-replayable simulation (tests/sim/test_determinism.py would catch it).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import trio._core._run as _trio_run


def derive_rng(seed: int, *labels: object) -> random.Random:
    """A `random.Random` for one purpose of one run, e.g. ``(seed, "net")``.

    Two different labels give independent streams, so drawing one more
    latency never shifts the durations of tasks.
    """
    text = "/".join(["trioflow-sim", str(seed), *map(str, labels)])
    return random.Random(text)


@contextmanager
def deterministic_scheduling(seed: int) -> Iterator[None]:
    """Make Trio's task order a function of `seed` for the enclosed `trio.run`.

    Not reentrant and not thread-safe: one simulated run at a time per
    process (the chaos lab runs seeds one after another).
    """
    if not hasattr(_trio_run, "_ALLOW_DETERMINISTIC_SCHEDULING") or not hasattr(_trio_run, "_r"):
        raise RuntimeError(
            "this Trio version has no deterministic scheduling hook "
            "(trio._core._run._ALLOW_DETERMINISTIC_SCHEDULING and _r); "
            "the chaos lab cannot replay runs with it"
        )
    saved_flag = _trio_run._ALLOW_DETERMINISTIC_SCHEDULING
    saved_state = _trio_run._r.getstate()
    _trio_run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    _trio_run._r.seed(f"trioflow-sim/{seed}/trio-scheduler")
    try:
        yield
    finally:
        _trio_run._ALLOW_DETERMINISTIC_SCHEDULING = saved_flag  # type: ignore[misc]
        _trio_run._r.setstate(saved_state)
