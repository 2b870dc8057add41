"""How long to wait before trying again: capped, jittered exponential backoff.

Workers and clients reconnecting to a scheduler, and nannies restarting a
worker that keeps dying, all wait the same way. Each wait is drawn from the
upper half of the current step, and the step doubles from `minimum` up to
`maximum`: a peer that keeps failing backs off quickly, and many peers that
failed at the same moment (a scheduler restart drops every worker at once)
do not all come back in the same instant.

The random draws come from the caller's `random.Random`, so the chaos lab's
seeded runs replay the same waits.
"""

from __future__ import annotations

import random


class Backoff:
    """The waits between attempts; `reset` after a success.

    Args:
        minimum: the first step, in seconds.
        maximum: the largest step, in seconds.
        rng: where the jitter comes from.
    """

    def __init__(self, minimum: float, maximum: float, rng: random.Random):
        if not 0 < minimum <= maximum:
            raise ValueError(f"backoff needs 0 < minimum <= maximum, got {minimum} and {maximum}")
        self.minimum = minimum
        self.maximum = maximum
        self._rng = rng
        self._step = minimum

    def next(self) -> float:
        """The wait before the next attempt; the step after it doubles (capped)."""
        pause = self._step * self._rng.uniform(0.5, 1.0)
        self._step = min(self._step * 2, self.maximum)
        return pause

    def reset(self) -> None:
        """Start again from the minimum (the last attempt succeeded)."""
        self._step = self.minimum
