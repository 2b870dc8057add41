"""Work stealing: a thread that would idle takes a task that would wait.

Rules: the same as every module of `trioflow.core` (pure; ordered dicts
only; no clock: durations arrive on events). This is the part of the
scheduler's state machine that moves a task from one worker to another
*after* it was placed. `SchedulerState` owns one `WorkStealing`, which it
hands the task and worker records; the transition engine tells it when a
worker's load changed (`refresh`) and when a task left its worker (`drop`). The model is `spec/model.py` (the steal rule of
`_place` and the `StealAnswered` event); spec/README.md, "Work stealing".

Why
---
Placement is decided once, when a task becomes ready: where its inputs are,
or round-robin for root tasks. It cannot know that one worker's tasks will
take a second each and another's a millisecond. With two one-thread workers
and eight slow and eight fast tasks submitted alternately, placement puts
every slow task on the first worker: it works for four seconds while the
second idles after a tenth of one. Stealing lets the idle worker take the
slow tasks that are still waiting, for about two seconds in all.

Theory of operation
-------------------
*When.* At the end of every event (`SchedulerState.handle`), if a worker is
**starving** (fewer tasks processing there, counting those it is about to
steal, than threads; not paused) while another is **backlogged** (more tasks
processing than threads, so some wait; or paused with any task at all).
Both sets are kept up to date as tasks are assigned and taken back, so an
event that leaves every worker fed pays one test of an empty dict.

*Who.* Each starving worker (the thief) looks at the backlogged workers
(the victims) in the order of their backlog, longest first: the estimated
seconds of work processing there per thread, a paused worker counting as
endless. On a victim it considers its tasks from the last assigned to the
first (the last would start last), skipping any that runs already (a
thread cannot be interrupted), that is being stolen already, or that has
restrictions or resources (those stay where their user put them).

*Whether: the cost model.* For a candidate task on the victim::

    duration = the task's estimated run time (core/durations.py: the average
               of its prefix's reported durations)
    wait     = the estimated seconds of the tasks ahead of it on the victim,
               per thread (0 if it is among the first `nthreads`; endless if
               the victim is paused)
    transfer = bytes of its inputs the thief does not hold / Config.bandwidth

    steal it iff  transfer <= duration                 moving it costs less than running it
             and  wait > transfer + STEAL_OVERHEAD_S    it would start sooner on the thief

The thief starts it at once (it has a free thread) once its inputs arrive
and the exchange below is over (`STEAL_OVERHEAD_S`); the victim would start
it after `wait`. The first rule keeps tiny tasks with big inputs where their
data is: dask.distributed's scheduler refuses steals whose transfer time is
large next to the compute time for the same reason (its "cost multiplier").
A thief steals as many tasks as it has free threads, and steals again when
it runs dry.

*How: the confirmation exchange.* Moving a task must never make it run
twice, and the scheduler cannot know whether the victim has just started
it (its `task_started` may be on the wire). So:

1. `RequestSteal` goes to the victim; the thief reserves a thread for the
   task (`SchedulerWorker.incoming`) and the steal is *pending*.
2. The victim's core gives the task up only if it has not started it
   (waiting for inputs or ready), and answers (`StealAnswered`) with the
   steal's id. It answers no if the task runs, ran, or is unknown there.
3. Given up: the task moves to the thief (processing -> processing, a
   `ComputeTask` to the thief). Kept: the steal is cancelled and the task
   stays.

Anything that takes the task off its victim while the steal is pending
(it finished, erred, was released or rerouted, the victim died) cancels the
steal, and the victim's answer, when it comes, matches nothing (the steal
id tells a stale answer from a new one). If the thief died or paused
meanwhile, a task given up is placed afresh. An answer that says "given up"
about a task the victim had said it started is taken as "kept": a run in
progress is never handed to a second worker.

What this deliberately does not do:

* estimate how long a running task still has to go: the core has no clock,
  so a running task counts in full in its victim's backlog (a victim looks
  a little busier than it is);
* move tasks ahead of time to even out queues (dask.distributed's periodic
  `balance`): a thread steals when it would otherwise idle. In production:
  stealing ahead hides the exchange's round trip for very short tasks, at
  the price of more moves that turn out useless.
"""

from __future__ import annotations

import itertools
import math

from trioflow.core.durations import TaskDurations
from trioflow.core.scheduler_events import Outbox, RequestSteal, StealAnswered
from trioflow.core.scheduler_records import SchedulerTask, SchedulerWorker, TaskState

__all__ = ["STEAL_OVERHEAD_S", "STEAL_SCAN", "PendingSteal", "WorkStealing"]

# Seconds a steal costs beyond moving the inputs: the victim's answer, the
# ComputeTask to the thief, the thief's requests for its inputs (a few round
# trips on a LAN). A task that would wait less than this on its victim stays.
STEAL_OVERHEAD_S = 0.005
# How many tasks of a victim, from its last assigned, a thief considers. The
# last ones are the best to take; the bound keeps a steal O(1) however much
# a worker was sent ahead (Config.worker_saturation).
STEAL_SCAN = 32

PROCESSING = TaskState.PROCESSING


class PendingSteal:
    """A steal asked of a victim that has not answered yet."""

    __slots__ = ("victim", "thief", "steal_id")

    def __init__(self, victim: str, thief: str | None, steal_id: int):
        # Invariant: the worker the task is processing on.
        self.victim = victim
        # The worker that will get the task; None once it left (the task is
        # then placed afresh if the victim gives it up).
        self.thief = thief
        # Echoed by the victim's answer, which must match it.
        self.steal_id = steal_id

    def __repr__(self) -> str:
        return f"<PendingSteal #{self.steal_id} {self.victim} -> {self.thief}>"


class WorkStealing:
    """Which tasks move from busy workers to idle ones, and the steals pending.

    Args:
        tasks, workers: the scheduler's records (read here; a steal changes
            only `SchedulerWorker.incoming` and the sets below).
        outbox: where `RequestSteal` messages go.
        durations: how long tasks take, by prefix (fed by `SchedulerState`).
        enabled: `Config.work_stealing`.
        bandwidth: `Config.bandwidth`, bytes per second.
    """

    def __init__(
        self,
        *,
        tasks: dict[str, SchedulerTask],
        workers: dict[str, SchedulerWorker],
        outbox: Outbox,
        durations: TaskDurations,
        enabled: bool,
        bandwidth: float,
    ):
        self.tasks = tasks
        self.workers = workers
        self.outbox = outbox
        self.durations = durations
        self.enabled = enabled
        self.bandwidth = bandwidth
        # key -> its pending steal. Invariant: the task is processing on the victim.
        self.pending: dict[str, PendingSteal] = {}
        # Workers that could run more than they have (`SchedulerWorker.starving`),
        # and workers with tasks waiting for a thread (`backlogged`).
        self.starving: dict[str, None] = {}
        self.backlogged: dict[str, None] = {}
        self._steal_ids = itertools.count(1)

    # ------------------------------------------------------ bookkeeping --

    def refresh(self, ws: SchedulerWorker) -> None:
        """Keep `starving` and `backlogged` true of `ws` (after any change to
        its processing tasks, its incoming steals, or its pause)."""
        address = ws.address
        if ws.starving:
            self.starving[address] = None
        else:
            self.starving.pop(address, None)
        if ws.backlogged:
            self.backlogged[address] = None
        else:
            self.backlogged.pop(address, None)

    def drop(self, key: str) -> None:
        """The pending steal of `key`, if any, is over: the thief's reserved
        thread is free again."""
        pending = self.pending.pop(key, None)
        if pending is None or pending.thief is None:
            return
        thief = self.workers.get(pending.thief)
        if thief is not None:
            del thief.incoming[key]
            self.refresh(thief)

    def thief_left(self, ws: SchedulerWorker) -> None:
        """`ws` left with steals pending toward it: a task its victim gives up
        will be placed afresh."""
        for key in ws.incoming:
            self.pending[key].thief = None
        ws.incoming.clear()

    def steal_pending(self, key: str, steal_id: int, victim: str) -> bool:
        """Whether `victim`'s answer with `steal_id` is about the steal of `key`
        still pending (the shell asks, to know whether the victim's copy of
        the task is gone)."""
        pending = self.pending.get(key)
        return pending is not None and pending.steal_id == steal_id and pending.victim == victim

    # ---------------------------------------------------------- stealing --

    def balance(self) -> None:
        """Let every starving worker steal what is worth stealing (module docstring)."""
        if not (self.enabled and self.starving and self.backlogged):
            return
        for address in list(self.starving):
            thief = self.workers[address]
            while thief.starving and self._steal_for(thief):
                pass
            if not self.backlogged:
                return

    def _steal_for(self, thief: SchedulerWorker) -> bool:
        """Ask one victim for one task for `thief`; False if none is worth it."""
        victims = []
        for address in self.backlogged:
            if address != thief.address:
                ws = self.workers[address]
                victims.append((-self._wait_per_thread(ws), address, ws))
        victims.sort(key=lambda v: v[:2])  # longest backlog first; ties by address
        for _, _, victim in victims:
            ts = self._candidate(victim, thief)
            if ts is not None:
                self._request_steal(ts, victim, thief)
                return True
        return False

    def _backlog_s(self, ws: SchedulerWorker) -> float:
        """Estimated seconds of all the work processing on `ws`."""
        estimate = self.durations.estimate
        return sum(count * estimate(prefix) for prefix, count in ws.prefixes.items())

    def _wait_per_thread(self, ws: SchedulerWorker) -> float:
        return math.inf if ws.paused else self._backlog_s(ws) / ws.nthreads

    def _candidate(self, victim: SchedulerWorker, thief: SchedulerWorker) -> SchedulerTask | None:
        """The task of `victim` best taken by `thief`, by the cost model, or None."""
        estimate = self.durations.estimate
        ahead = self._backlog_s(victim)  # seconds of the tasks before the one looked at
        position = len(victim.processing)
        for scanned, key in enumerate(reversed(victim.processing)):
            position -= 1
            if scanned >= STEAL_SCAN or (position < victim.nthreads and not victim.paused):
                return None  # the rest start at once, or are too deep to look at
            ts = self.tasks[key]
            duration = estimate(ts.prefix)
            ahead -= duration
            if ts.running or key in self.pending or ts.restrictions is not None or ts.resources:
                continue
            wait = math.inf if victim.paused else max(ahead, 0.0) / victim.nthreads
            missing = sum(dep.nbytes for dep in ts.dependencies.values() if thief.address not in dep.who_has)
            transfer = missing / self.bandwidth
            if transfer <= duration and wait > transfer + STEAL_OVERHEAD_S:
                return ts
        return None

    def _request_steal(self, ts: SchedulerTask, victim: SchedulerWorker, thief: SchedulerWorker) -> None:
        steal_id = next(self._steal_ids)
        self.pending[ts.key] = PendingSteal(victim.address, thief.address, steal_id)
        thief.incoming[ts.key] = None
        self.refresh(thief)
        self.outbox.emit(RequestSteal(self.outbox.stimulus_id, victim.address, ts.key, steal_id))

    def answer(self, ev: StealAnswered) -> tuple[SchedulerTask, TaskState, dict] | None:
        """The victim answered (module docstring, "the confirmation exchange").

        Returns the move the answer calls for, for `SchedulerState` to put
        through the transition table: to the thief, or (the thief left or
        paused) back to waiting to be placed afresh; None if the task stays.
        """
        if not self.steal_pending(ev.key, ev.steal_id, ev.worker):
            return None  # the steal was cancelled meanwhile: nothing to decide
        ts = self.tasks[ev.key]
        pending = self.pending[ev.key]
        if not ev.given_up or ts.running:
            # Kept (it started, or finished): the steal is off, the task stays.
            self.drop(ev.key)
            return None
        thief = self.workers.get(pending.thief) if pending.thief is not None else None
        if thief is not None and not thief.paused:
            # spec: StealAnswered (given up). The victim will never run it:
            # only now does the thief get it.
            return ts, PROCESSING, {"thief": thief}
        # The thief left or paused: the task, given up, is placed afresh.
        return ts, TaskState.WAITING, {"cancel": False}
