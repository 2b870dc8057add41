"""The wall clock: for telling a person when and how long, never for a decision.

trioflow decides nothing by real time: shells read Trio's clock, which the
simulator replaces (design.md §3 rule 2). People are still owed real times:
a duration ("demo took 12.3 s", "1,000 runs per minute"), when a task ran
(the task stream, a performance report), when a real process was struck
(the real-process chaos runs, which are not simulated). They read it here,
the one place where trioflow reads the wall clock, so a grep for the clock
finds every reader.
"""

import time


def wall_seconds() -> float:
    """Seconds on a monotonic wall clock; only differences between two calls mean anything."""
    return time.perf_counter()


def epoch_seconds() -> float:
    """Seconds since the epoch now: a time a person (or another process) can place."""
    return time.time()
