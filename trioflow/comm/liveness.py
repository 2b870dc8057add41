"""Busy is not dead: how late this process's own event loop wakes up.

design.md §6 rule 6: a stall of a process's *own* event loop never counts
against its peers' liveness. A peer is declared gone when it has been
silent for a while (`worker_ttl`, `scheduler_ttl`, `idle_timeout`,
`peer_timeout`); but if our loop was frozen for part of that while (a long
step of the driver, the garbage collector, a blocking call, the operating
system not scheduling us, a SIGSTOP of our own process), the peer's
messages were waiting in our socket and nobody read them. Counting that
time against the peer is how a busy cluster used to kill its own healthy
workers.

Theory of operation
-------------------
`LoopLag.run` is a small periodic task (one per Trio run, started on first
use by `loop_lag()`): it sleeps `TICK_S` and notes how late it woke. Each
late wake-up is a *stall*: the interval during which the loop could not
run its tasks. A deadline on a peer is then measured in our loop's
*responsive* time:

    silent since `since`, allowed `allowance` seconds:
    deadline = since + allowance + (our stalls between `since` and now)

A deadline is first set as if no stall will happen (``since +
allowance``); when it passes, the owner asks again (`LoopLag.deadline`):
if our loop stalled meanwhile, the deadline has moved and the owner waits
again; only a deadline that holds after every stall is counted means the
peer is late.

The subtle case is a stall that is still *in progress* from the ticker's
point of view: when the loop resumes after a long freeze, Trio expires
deadlines before any task runs, so the owner of a deadline may look before
the ticker has woken and noted the stall. `stalled_between` therefore also
counts the time since the ticker was due (`overdue`): the freeze the ticker
has not had the chance to see yet.

What this deliberately does not do: forgive a peer whose *own* loop
stalled. From the outside a frozen process and a busy one look the same
(W6 freezes a worker with SIGSTOP and expects it dropped within
`worker_ttl`); that is why the heavy work of every process is kept off the
loop that talks to its peers, or sliced into short steps.

The same ticks feed the lag a person sees (the dashboard's and /metrics'
event-loop lag): a watcher (`LoopLag.watch`) hears how late every wake-up
came, so one task measures the loop for deadlines and for display alike.

Under a virtual clock (`trio.testing.MockClock`, the chaos lab) code takes
no time and the loop cannot lag, so no ticker runs and every stall is zero.
"""

from __future__ import annotations

import collections
import math
import sys
import weakref
from collections.abc import Callable

import trio

__all__ = ["LoopLag", "loop_lag"]

# How often the ticker wakes. Its cost is one sleep and one wake-up: about
# 20 microseconds of CPU per tick here.
TICK_S = 0.05
# Lateness below this is scheduling noise, not a stall worth remembering.
MIN_STALL_S = 0.001
# Stalls remembered (the oldest go first). 4096 ticks late by more than a
# millisecond is over three minutes of a loop late on every tick: longer
# than any deadline that asks (`idle_timeout` is 60 s by default).
MAX_STALLS = 4096


class LoopLag:
    """The stalls of one Trio loop, as a ticker saw them.

    Attributes:
        tick: seconds between the ticker's wake-ups.
        max_stall: the longest stall seen so far, in seconds (a metric).
        total_stall: every stall seen so far, added up, in seconds.
    """

    def __init__(self, tick: float = TICK_S, *, enabled: bool = True):
        self.tick = tick
        self.enabled = enabled
        # (began, ended) of each stall, oldest first: `began` is when the
        # ticker was due, `ended` when it woke.
        self._stalls: collections.deque[tuple[float, float]] = collections.deque(maxlen=MAX_STALLS)
        # When the ticker is due next; a loop past this and not yet back in
        # the ticker is stalled right now (`overdue`).
        self._due = math.inf
        self.max_stall = 0.0
        self.total_stall = 0.0
        self._watchers: list[weakref.WeakMethod] = []

    def watch(self, watcher: Callable[[float], None]) -> None:
        """Call `watcher(seconds late)`, a bound method, at every wake-up of
        the ticker, stall or not (the recorder's lag histogram). It must be
        quick, and raise nothing: it runs in the ticker. Held weakly: a
        scheduler restarted in the same run leaves no old recorder behind."""
        self._watchers.append(weakref.WeakMethod(watcher))  # type: ignore[arg-type]

    async def run(self) -> None:
        """Tick until cancelled, noting every late wake-up. Never returns."""
        if not self.enabled:
            await trio.sleep_forever()
        while True:
            self._due = trio.current_time() + self.tick
            await trio.sleep_until(self._due)
            woke = trio.current_time()
            late = woke - self._due
            if self._watchers:
                self._tell_watchers(max(0.0, late))
            if late > MIN_STALL_S:
                self._stalls.append((self._due, woke))
                self.total_stall += late
                self.max_stall = max(self.max_stall, late)

    def _tell_watchers(self, late: float) -> None:
        alive = []
        for ref in self._watchers:
            watcher = ref()
            if watcher is not None:
                watcher(late)
                alive.append(ref)
        self._watchers = alive

    def stalled_between(self, since: float, until: float | None = None) -> float:
        """Seconds of [since, until] (until: now) during which this loop was stalled.

        Counts the stalls the ticker noted and the one it is overdue to
        note (see the module docstring).
        """
        now = trio.current_time() if until is None else until
        total = 0.0
        if now > self._due:
            total += now - max(self._due, since)
        for began, ended in reversed(self._stalls):
            if ended <= since:
                break
            total += max(0.0, min(ended, now) - max(began, since))
        return total

    def deadline(self, since: float, allowance: float) -> float:
        """When `allowance` seconds of our responsive time since `since` are up.

        That is ``since + allowance``, moved later by every stall of this
        loop since `since`. A caller whose deadline passed asks again: a
        later answer means the time was ours, not the peer's.
        """
        if math.isinf(allowance):
            return math.inf
        return since + allowance + self.stalled_between(since)


_LOOP_LAG: trio.lowlevel.RunVar[LoopLag] = trio.lowlevel.RunVar("trioflow_loop_lag")


def loop_lag() -> LoopLag:
    """The `LoopLag` of the current Trio run, its ticker started on first use.

    One per run, because stalls belong to a loop: a `LocalCluster`'s
    scheduler and a `Client` each run a loop in a thread of their own, and
    each has its own monitor; the chaos lab's nodes share one run (and a
    virtual clock, which never lags: no ticker runs there).
    """
    try:
        return _LOOP_LAG.get()
    except LookupError:
        pass
    # (A MockClock exists only where trio.testing was imported: no need to
    # import it into every process to ask.)
    testing = sys.modules.get("trio.testing")
    virtual = testing is not None and isinstance(trio.lowlevel.current_clock(), testing.MockClock)
    lag = LoopLag(enabled=not virtual)
    _LOOP_LAG.set(lag)
    if not virtual:
        # A system task: it lives as long as the run, belongs to no
        # nursery of ours, and is cancelled when the run ends.
        trio.lowlevel.spawn_system_task(lag.run, name="trioflow loop lag")
    return lag
