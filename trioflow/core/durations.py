"""How long tasks take: an average run time per key prefix.

Rules: the same as every module of `trioflow.core` (pure; no clock: the
durations arrive on `TaskFinished` events, measured by the workers with
Trio's clock, so that in the chaos lab they are virtual seconds).

Theory of operation
-------------------
A scheduler cannot know how long a task will run, but tasks made by the
same function usually take about as long as each other: ``client.map(f,
...)`` makes thousands of ``f-<digest>`` keys. So the scheduler keeps, per
*prefix* (the function part of a key, ``f``), an exponentially weighted
average of the durations its workers report: each new duration counts for
half. The first report replaces the default, `UNKNOWN_DURATION_S` (the
half second dask.distributed assumes of a task it knows nothing about).

Work stealing (`trioflow.core.stealing`) is the only reader: it adds these
estimates up to tell how long a task would wait behind the others on its
worker.

What this deliberately does not do: weigh durations by input size, or
remember the spread of durations (a prefix whose tasks take 1 ms or 10 s
at random is estimated by its recent average, and stealing then errs both
ways). dask.distributed does not either.
"""

from __future__ import annotations

import re
import sys

__all__ = ["UNKNOWN_DURATION_S", "TaskDurations", "key_prefix"]

# Seconds a task of a prefix never seen run is assumed to take.
UNKNOWN_DURATION_S = 0.5
# Prefixes remembered at most; past this the oldest is forgotten (a client
# that names every key differently must not grow the scheduler forever).
MAX_PREFIXES = 100_000

_HEX = re.compile(r"[0-9a-f]{8,}")


def key_prefix(key: str) -> str:
    """The function part of a key: ``inc-9f2c...`` -> ``inc``, ``('sum-ab12', 3)`` -> ``sum``.

    As dask's ``key_split``: the words of the key up to the first one that
    is not alphabetic or looks like a digest. A key that is all digest
    (scattered data is named ``type-digest``, plain digests too) is "data".
    The result is interned: a million tasks of one function share one string.
    """
    text = key
    if text[:2] in ("('", '("'):
        text = text[2:].split(text[1], 1)[0]
    words = text.split("-")
    name = words[0].strip("_'()\" ") or key
    for word in words[1:]:
        if not word.isalpha() or _HEX.fullmatch(word):
            break
        name += "-" + word
    if len(name) >= 16 and _HEX.fullmatch(name):
        return "data"
    return sys.intern(name)


class TaskDurations:
    """The average duration of the tasks of each key prefix, in seconds."""

    __slots__ = ("averages", "default")

    def __init__(self, default: float = UNKNOWN_DURATION_S):
        # prefix -> seconds, oldest prefix first (for the bound).
        self.averages: dict[str, float] = {}
        self.default = default

    def observe(self, prefix: str, seconds: float) -> None:
        """A task of `prefix` ran for `seconds`: half the new average is it."""
        seconds = max(0.0, seconds)
        old = self.averages.get(prefix)
        if old is None:
            if len(self.averages) >= MAX_PREFIXES:
                del self.averages[next(iter(self.averages))]
            self.averages[prefix] = seconds
        else:
            self.averages[prefix] = (old + seconds) / 2

    def estimate(self, prefix: str) -> float:
        """How long a task of `prefix` is expected to run."""
        return self.averages.get(prefix, self.default)
