"""The wall clock, for telling a person how long something took.

trioflow decides nothing by real time: shells read Trio's clock, which the
simulator replaces (design.md §3 rule 2). Commands still owe their user a
duration ("demo took 12.3 s", "1,000 runs per minute"); they read it here,
the one place outside the simulator's own clock where a command measures
real time, so a grep for the clock finds every reader.
"""

import time


def wall_seconds() -> float:
    """Seconds on a monotonic wall clock; only differences between two calls mean anything."""
    return time.perf_counter()
