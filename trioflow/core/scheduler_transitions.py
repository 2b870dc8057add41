"""How a task moves between states: the transition engine and its table.

Rules: the same as every module of `trioflow.core` (pure; ordered dicts
only). This module knows the *rules* of a task's life; `scheduler_state.py`
turns *facts* (events) into the moves these rules make. `SchedulerState`
owns one `TaskTransitions` (its `transitions`) and hands it, when it is
made, the records the rules read and change; a handler there asks for a
move with `transitions.run(recommendations)`, and the messages the moves
imply go to the event's `Outbox`, in the order they were decided.

Theory of operation
-------------------
A change to one task can make others change: a value arriving makes
dependents ready; a failure errs dependents; a task finishing makes its
inputs unneeded. Those knock-on changes are *recommendations*,
``{key: target_state}``, which `run` works off, oldest first,
until none are left. Every state change goes through `TRANSITIONS`, the
table at the end of this file (drawn as a diagram in spec/README.md), but
for the few listed in `OUTSIDE_THE_TABLE`; a (from, to) pair not in it
raises `InvalidTransition` and leaves the task as it was.

A task is *needed* while a client holds a future for it (`who_wants`) or a
dependent in progress still needs its value (`waiters`). A task that is no
longer needed drops its value (RELEASED) but keeps its record, because a
dependent's lineage may need it again; the record itself is FORGOTTEN once
no dependent record and no client refers to it. Scattered data has no
lineage, so its value is kept as long as its record is; when its last copy
goes it is LOST, unless a worker is fetching a copy right then: it waits
for that copy, released (`_await_copy`).

Its *value* is needed by a dependent in progress, or by a client holding it
that does not have the value: small values travel to the clients with the
report of their completion (`delivered`). A task is computed (kept in
progress) only while its value is needed; a needed task whose last copy is
lost, with every holder having the value, is RELEASED instead of computed
again, until something needs the value.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Callable

from trioflow.core.failures import DataLost
from trioflow.core.scheduler_events import (
    FIRE_AND_FORGET,
    AcquireReplicas,
    ComputeTask,
    FreeKeys,
    ReportErred,
    ReportFinished,
    Outbox,
    ReportLost,
)
from trioflow.core.scheduler_records import (
    FAILED,
    IN_PROGRESS,
    SchedulerTask,
    SchedulerWorker,
    TaskState,
    wire_priority,
)
from trioflow.core.stealing import WorkStealing

RELEASED = TaskState.RELEASED
WAITING = TaskState.WAITING
QUEUED = TaskState.QUEUED
NO_WORKER = TaskState.NO_WORKER
PROCESSING = TaskState.PROCESSING
MEMORY = TaskState.MEMORY
ERRED = TaskState.ERRED
LOST = TaskState.LOST
FORGOTTEN = TaskState.FORGOTTEN

Recommendations = dict[str, TaskState]


class InvalidTransition(RuntimeError):
    """A transition that `TRANSITIONS` does not allow was attempted (a bug)."""


class TaskTransitions:
    """The transition rules, over the records `SchedulerState` hands it.

    Args:
        tasks, workers, clients: the scheduler's records of each (shared:
            `SchedulerState` and this engine change the same dicts, and
            neither ever rebinds them).
        idle, queued, unrunnable, recovering_runs: where ready tasks are
            placed or wait (workers below capacity, the root-task heap, tasks
            no worker may run now, runs a re-registered worker reported;
            each described where `SchedulerState` makes it).
        replicated, awaiting_holders: keys kept in several copies, and
            scattered keys waiting for a holder (see `SchedulerState`).
        story: where each transition is logged (a watcher may put its own
            deque here: `SchedulerState.story`).
        outbox: where the messages a transition implies go.
        balancer: work stealing, told when a worker's load changes.
    """

    def __init__(
        self,
        *,
        tasks: dict[str, SchedulerTask],
        workers: dict[str, SchedulerWorker],
        clients: dict[str, dict[str, None]],
        idle: dict[str, None],
        queued: list[tuple[int, str]],
        unrunnable: dict[str, None],
        recovering_runs: dict[str, str],
        replicated: dict[str, None],
        awaiting_holders: dict[str, None],
        story: collections.deque[tuple[str, str, str, str]],
        outbox: Outbox,
        balancer: WorkStealing,
    ):
        self.tasks = tasks
        self.workers = workers
        self.clients = clients
        self.idle = idle
        self.queued = queued
        self.unrunnable = unrunnable
        self.recovering_runs = recovering_runs
        self.replicated = replicated
        self.awaiting_holders = awaiting_holders
        self.story = story
        self.outbox = outbox
        self.balancer = balancer
        # Set when a task gave its resources back: `SchedulerState.handle`
        # then places the tasks waiting in no-worker for resources again.
        self.resources_freed = False

    # ------------------------------------------------ the transition engine --

    def run(
        self,
        recs: Recommendations,
        first: tuple[SchedulerTask, TaskState, dict] | None = None,
    ) -> None:
        """Apply `first` (a transition with arguments), then every recommendation.

        Recommendations are processed oldest first; each transition may add
        more. A recommendation can go stale while it waits its turn (a later
        transition made the task needed again, or forgotten); it is checked
        against the task as it is *now*.

        Cost: constant per recommendation. They wait in an `OrderedDict`,
        whose ``popitem(last=False)`` takes the oldest at once; taking the
        first key of a plain dict (``next(iter(recs))``) skips every entry
        deleted before it, which made releasing or cancelling n tasks cost
        n * n / 2 steps (100,000 cancelled futures: seconds).
        """
        recs = collections.OrderedDict(recs)
        if first is not None:
            ts, target, kwargs = first
            self.move(ts, target, recs, **kwargs)
        while recs:
            key, target = recs.popitem(last=False)
            ts = self.tasks.get(key)
            if ts is None:
                continue
            if ts.state is MEMORY and not ts.who_has:
                # Its last copy vanished: where it goes depends on whether it
                # is needed now, not when the recommendation was made.
                target = self.target_for_lost_value(ts)
            elif target in (RELEASED, FORGOTTEN) and self._keeps(ts):
                # Stale: needed again since. This recommendation may have
                # replaced one still due (a ready task's "-> processing"):
                # recommend that again, or the task would wait for ever
                # (seed 805 of the chaos lab, tests/sim/test_regressions.py).
                self._recommend_due_move(ts, recs)
                continue
            elif target is FORGOTTEN and (ts.dependents or ts.who_wants):
                continue
            elif target is WAITING and ts.state is RELEASED and not self._value_needed(ts):
                continue
            elif target is PROCESSING and ts.state is MEMORY:
                continue  # ready to run, but its value arrived meanwhile
            if ts.state is target:
                continue
            self.move(ts, target, recs)

    def move(
        self, ts: SchedulerTask, target: TaskState, recs: Recommendations, **kwargs
    ) -> None:
        method = TRANSITIONS.get((ts.state, target))
        if method is None:
            raise InvalidTransition(
                f"{ts.key!r}: no transition {ts.state.value} -> {target.value} "
                f"(stimulus {self.outbox.stimulus_id!r})"
            )
        before = ts.state
        method(self, ts, recs, **kwargs)
        self.story.append((ts.key, before.value, ts.state.value, self.outbox.stimulus_id))

    # ------------------------------------------------------ transitions --

    def _released_to_waiting(self, ts: SchedulerTask, recs: Recommendations) -> None:
        ts.state = WAITING
        self._wait_for_dependencies(ts, recs)

    def _wait_for_dependencies(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """Register `ts` as a waiter of each input; recommend what it needs."""
        ts.waiting_on.clear()
        for dep in ts.dependencies.values():
            if dep.state in FAILED:
                ts.failure, ts.failure_origin = dep.failure, dep.failure_origin
                recs[ts.key] = ERRED
                return
        for dep in ts.dependencies.values():
            dep.own("waiters")[ts.key] = None
            if not self._is_available(dep):
                ts.own("waiting_on")[dep.key] = None
                if dep.state is RELEASED and dep.has_lineage:
                    # (Scattered data is never computed: a worker brings
                    # it back, after a scheduler restart or with the copy
                    # it was fetching, or it is lost.)
                    recs.setdefault(dep.key, WAITING)
        if not ts.waiting_on:
            recs[ts.key] = PROCESSING

    def _to_processing(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """Ready: every input is in memory. Assign, queue, or park it."""
        previous = ts.state
        if previous is NO_WORKER:
            del self.unrunnable[ts.key]
        running_on = self.recovering_runs.pop(ts.key, None)
        if running_on is not None:
            # The worker is already running it (it said so when it
            # re-registered): assign it there, never start a second run.
            self._assign(ts, self.workers[running_on])
            ts.running = True
            return
        pool = self._allowed_workers(ts)
        if pool is not None:
            ws = min(pool, key=lambda ws: ws.occupancy, default=None)
        elif not ts.dependencies and previous is not QUEUED:
            # A root task always passes through the queue: the root tasks
            # made ready by one event then go out best priority first
            # (`fill_idle_workers`, before the event's messages are
            # returned), whatever order the event made them ready in.
            ws = None
        else:
            ws = self._choose_worker(ts)
        if ws is not None:
            self._assign(ts, ws)
        elif pool is not None or ts.dependencies:
            # Constrained, and no allowed worker can take it now; or it has
            # inputs and every worker is paused: it waits for a worker to
            # join, resume, or give resources back.
            ts.state = NO_WORKER
            self.unrunnable[ts.key] = None
        else:
            ts.state = QUEUED
            heapq.heappush(self.queued, (ts.priority, ts.key))

    def _to_memory(
        self,
        ts: SchedulerTask,
        recs: Recommendations,
        *,
        worker: SchedulerWorker,
        nbytes: int,
        inline: bool = False,
    ) -> None:
        """`worker` holds the value now (it computed it, or re-registered with
        it); with `inline`, the value itself goes with the reports."""
        # Finished by the worker it was assigned to, or by one it had been
        # taken from: either way, cancel any other run.
        self._leave_placement(ts, cancel=ts.processing_on != worker.address)
        self.recovering_runs.pop(ts.key, None)
        self.awaiting_holders.pop(ts.key, None)
        ts.state, ts.nbytes = MEMORY, nbytes
        ts.failure = ts.failure_origin = None
        ts.waiting_on.clear()
        self.add_replica(ts, worker)
        for client in ts.who_wants:
            self.report_finished(client, ts, with_value=inline)
        for key in ts.waiters:
            dependent = self.tasks[key]
            if dependent.state is WAITING:
                dependent.waiting_on.pop(ts.key, None)
                if not dependent.waiting_on:
                    recs[key] = PROCESSING
        self._stop_waiting(ts, recs)
        self._release_fired(ts, recs)
        self.recommend_release_if_unneeded(ts, recs)

    def _to_waiting_again(self, ts: SchedulerTask, recs: Recommendations, *, cancel: bool = True) -> None:
        """Rerouted (worker died, input lost, retry, or given up to a thief
        that left: then there is no run to cancel): wait and run again."""
        self._leave_placement(ts, cancel=cancel)
        ts.state = WAITING
        self._wait_for_dependencies(ts, recs)

    def _to_thief(self, ts: SchedulerTask, recs: Recommendations, *, thief: SchedulerWorker) -> None:
        """Stolen: its victim gave it up (it had not started it and never
        will), so it moves to the thief (core/stealing.py). spec: StealAnswered."""
        self._unassign(ts, cancel=False)
        self._assign(ts, thief)

    def _memory_to_waiting(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """The value's last copy is gone and it is still needed: recompute it."""
        assert not ts.who_has
        self._drop_pending_replicas(ts)
        for client in ts.who_wants:
            if client not in ts.delivered:  # one that has the value keeps it
                self.outbox.emit(ReportLost(self.outbox.stimulus_id, client, ts.key))
        self._invalidate_dependents(ts, recs)
        ts.state = WAITING
        self._wait_for_dependencies(ts, recs)

    def _to_lost(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """Scattered data lost its last copy: it cannot come back."""
        self._drop_pending_replicas(ts)
        ts.state = LOST
        ts.failure, ts.failure_origin = DataLost(ts.key), ts.key
        for client in ts.who_wants:
            self.report_failure(client, ts)
        self._err_dependents(ts, recs)
        self._release_fired(ts, recs)
        self.recommend_release_if_unneeded(ts, recs)

    def _to_erred(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """`ts.failure` is set: keep it, tell clients, and err the dependents."""
        self._leave_placement(ts)
        ts.state = ERRED
        ts.waiting_on.clear()
        self.recovering_runs.pop(ts.key, None)
        for client in ts.who_wants:
            self.report_failure(client, ts)
        self._stop_waiting(ts, recs)
        self._err_dependents(ts, recs)
        self._release_fired(ts, recs)
        self.recommend_release_if_unneeded(ts, recs)

    def _memory_to_released(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """A value leaves memory without being lost: nobody needs it (lineage
        kept), or scattered data whose last holder left while a copy was on
        its way, which waits for that copy (`_await_copy`)."""
        if not ts.has_lineage and not ts.who_has:
            self._await_copy(ts, recs)
        else:
            self._to_released(ts, recs)

    def _await_copy(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """Scattered data lost its last known holder while a live worker was
        fetching a copy of it: it is not lost yet. A worker fetches a copy
        when asked to (`replicas_pending`, replication) and when it was sent
        a dependent that needs the value (`_fetchers`: seeds 789 and 829 of
        the chaos lab, a dependent's worker whose copy arrived 3 ms after the
        last holder left); the latter join `replicas_pending` now.

        That worker may well have the copy already, its `ReplicaAdded` still
        on the wire (seed 23 of the chaos lab: the holder restarted 1 ms
        before it arrived). So the data waits, released, in
        `awaiting_holders`, as resubmitted scattered data does after a
        scheduler restart: its pending copies are kept (unlike every other
        move out of memory); the copy arriving brings it back to memory,
        and the dependents that were about to use it wait for it meanwhile
        (they cannot run anywhere without it). Only when no copy is on its
        way any more (a failed fetch, or the fetching worker leaving too)
        is it lost (`copy_not_coming`). Clients are told nothing now: one
        that looks for a holder meanwhile finds none and waits for the
        report that comes either way. spec: rule "await-copy", INV-AWAITED.
        """
        assert not ts.who_has, ts
        for ws in self._fetchers(ts):
            # Asked outright, with no holder to fetch from: a worker with the
            # copy (or a fetch of it under way) answers with it, one without
            # answers ReplicaMissing at once. A dependent's worker may have
            # no fetch at all (a run of it already going there, restarted:
            # seed 271 of the partition mix waited for ever on such a one).
            ts.own("replicas_pending")[ws.address] = None
            ws.replicating[ts.key] = None
            self.outbox.emit(AcquireReplicas(self.outbox.stimulus_id, ws.address, {ts.key: ()}, {ts.key: ts.nbytes}))
        ts.state = RELEASED
        self.awaiting_holders[ts.key] = None
        # The dependents wait for the copy; their workers are told to drop
        # them, and a worker that drops a fetch it had not begun says so
        # (the worker core's `_release_inputs`), so every copy counted here
        # ends in `ReplicaAdded` or `ReplicaMissing`.
        self._invalidate_dependents(ts, recs)
        self.copy_not_coming(ts, recs)  # (the fetchers may have left meanwhile)

    def _fetchers(self, ts: SchedulerTask) -> list[SchedulerWorker]:
        """Live workers fetching a copy of `ts` for a dependent assigned there."""
        fetchers = []
        for key in ts.waiters:
            address = self.tasks[key].processing_on
            ws = self.workers.get(address) if address is not None else None
            if ws is not None and address not in ts.who_has and address not in ts.replicas_pending:
                fetchers.append(ws)
        return fetchers

    def copy_not_coming(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """Data awaiting a copy (`_await_copy`) saw its last pending copy
        fail: recommend what the loss of its last copy means now."""
        if ts.state is RELEASED and not ts.replicas_pending and not ts.has_lineage:
            recs[ts.key] = self.target_for_lost_value(ts)

    def _to_released(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """Nobody needs it any more: drop the run or the value, keep lineage."""
        if ts.state is MEMORY:
            self._drop_all_replicas(ts)
        else:
            self._leave_placement(ts)
        ts.state = RELEASED
        ts.waiting_on.clear()
        self.recovering_runs.pop(ts.key, None)
        self._stop_waiting(ts, recs)
        if not ts.dependents and not ts.who_wants:
            recs[ts.key] = FORGOTTEN

    def _to_forgotten(self, ts: SchedulerTask, recs: Recommendations) -> None:
        assert not ts.who_wants and not ts.dependents, ts
        if ts.state is MEMORY:
            self._drop_all_replicas(ts)
        else:
            self._drop_pending_replicas(ts)  # data that awaited a copy
        ts.state = FORGOTTEN
        del self.tasks[ts.key]
        self.replicated.pop(ts.key, None)
        self.awaiting_holders.pop(ts.key, None)
        for dep in ts.dependencies.values():
            dep.dependents.pop(ts.key, None)
            dep.waiters.pop(ts.key, None)
            self.recommend_release_if_unneeded(dep, recs)

    # ------------------------------------------------------------ helpers --

    def _leave_placement(self, ts: SchedulerTask, cancel: bool = True) -> None:
        """Undo where an in-progress task was put: its assignment (the run
        cancelled unless `cancel` is false) or its place among the tasks no
        worker may run."""
        if ts.state is PROCESSING:
            self._unassign(ts, cancel=cancel)
        elif ts.state is NO_WORKER:
            del self.unrunnable[ts.key]

    def is_needed(self, ts: SchedulerTask) -> bool:
        return bool(ts.who_wants or ts.waiters)

    def _keeps(self, ts: SchedulerTask) -> bool:
        """Whether `ts` keeps its run (in progress) or its value and record."""
        return self._value_needed(ts) if ts.state in IN_PROGRESS else self.is_needed(ts)

    def _value_needed(self, ts: SchedulerTask) -> bool:
        """Needed by work in progress or by a client that lacks the value."""
        if ts.waiters:
            return True
        if not ts.delivered:  # (the common case, asked once per task released or cancelled)
            return bool(ts.who_wants)
        return any(client not in ts.delivered for client in ts.who_wants)

    @staticmethod
    def _is_available(ts: SchedulerTask) -> bool:
        # A MEMORY task with no holder is about to be recomputed (its
        # recommendation is pending): it is not available.
        return ts.state is MEMORY and bool(ts.who_has)

    def recommend_release_if_unneeded(self, ts: SchedulerTask, recs: Recommendations) -> None:
        if ts.state in IN_PROGRESS:
            # Work goes on only while its value is needed (a client that has
            # the value does not need it computed again). Unless it is
            # doomed in this same step (its failure is set and ERRED
            # recommended): releasing it instead would keep a failure
            # outside ERRED (INV-FAILED; seed 314 of the chaos lab).
            if not self._value_needed(ts) and ts.failure is None:
                recs[ts.key] = RELEASED
            return
        if self.is_needed(ts):
            return
        unreferenced = not ts.dependents
        if ts.state is MEMORY:
            if ts.has_lineage:
                recs[ts.key] = FORGOTTEN if unreferenced else RELEASED
            elif unreferenced:
                recs[ts.key] = FORGOTTEN  # scattered: kept while referenced
        elif unreferenced:  # RELEASED, ERRED, LOST
            recs[ts.key] = FORGOTTEN

    def target_for_lost_value(self, ts: SchedulerTask) -> TaskState:
        """Where a task goes when its last copy disappears (a MEMORY task, or
        scattered data that awaited a copy that will not come)."""
        if not ts.has_lineage:
            if not (self.is_needed(ts) or ts.dependents):
                return FORGOTTEN
            # A copy on its way may exist already: wait for it (`_await_copy`).
            return RELEASED if ts.replicas_pending or self._fetchers(ts) else LOST
        if self._value_needed(ts):
            return WAITING
        if ts.who_wants or ts.dependents:
            return RELEASED  # its clients have the value; lineage kept
        return FORGOTTEN

    def _recommend_due_move(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """A kept task goes where its inputs and its need say: a waiting task
        with every input here to placement, a released one whose value is
        needed to waiting."""
        if ts.state is WAITING and not ts.waiting_on:
            recs.setdefault(ts.key, PROCESSING)
        elif ts.state is RELEASED and ts.has_lineage and self._value_needed(ts):
            recs.setdefault(ts.key, WAITING)

    def _stop_waiting(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """`ts` no longer needs its inputs' values: they may be released."""
        for dep in ts.dependencies.values():
            if dep.waiters.pop(ts.key, 0) is None:
                self.recommend_release_if_unneeded(dep, recs)

    def _invalidate_dependents(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """`ts` lost its value: dependents that were about to use it wait again."""
        for key in ts.waiters:
            dependent = self.tasks[key]
            if dependent.state is WAITING:
                dependent.own("waiting_on")[ts.key] = None
            elif dependent.state in IN_PROGRESS:
                recs.setdefault(key, WAITING)

    def _err_dependents(self, ts: SchedulerTask, recs: Recommendations) -> None:
        for dependent in ts.dependents.values():
            # A dependent already doomed in this same step keeps its own
            # failure: one that just witnessed its allowed_failures-th death
            # is KilledWorker (INV-KILLED), not the LostData of its input
            # lost with the same worker (seed 163 of the chaos lab).
            if dependent.state in IN_PROGRESS and dependent.failure is None:
                dependent.failure = ts.failure
                dependent.failure_origin = ts.failure_origin
                recs[dependent.key] = ERRED

    def _allowed_workers(self, ts: SchedulerTask) -> list[SchedulerWorker] | None:
        """The live workers a constrained task may start on now; None if any may.

        A task is constrained by `workers=` (unless loose: then only while
        one of those is alive; else any live worker will do) and by
        `resources=` (only workers with that much free, the amounts held by
        the tasks processing there counted). The least busy of these gets
        it (`_to_processing`); none: it waits in no-worker until a worker
        joins or resources are given back. Scanning the workers is fine
        here: constraints are rare and explicit, unlike placement, which
        never scans.
        """
        if ts.restrictions is None and not ts.resources:
            return None
        if ts.restrictions is not None:
            pool = [self.workers[a] for a in ts.restrictions if a in self.workers]
            if ts.loose and not pool:
                pool = list(self.workers.values())
        else:
            pool = list(self.workers.values())
        # A paused worker starts nothing new: it takes nothing new either.
        pool = [ws for ws in pool if not ws.paused]
        if ts.resources:
            pool = [ws for ws in pool if ws.fits(ts.resources)]
        return pool

    def _choose_worker(self, ts: SchedulerTask) -> SchedulerWorker | None:
        """Pick the worker for an unconstrained ready task, or None to queue it.

        Tasks with inputs go where most of their input bytes already are
        (ties: least busy), so data moves as little as possible. Root
        tasks, taken from the queue best priority first, go to the next
        worker below capacity, round-robin; when all are saturated they
        stay queued here, which keeps work movable if a worker dies. Costs
        are bounded by the task's own inputs, never by cluster size, but
        for one case: when every holder of its inputs is paused, the least
        busy worker that is not is looked for (None if there is none: the
        task then waits in no-worker).
        """
        if ts.dependencies:
            held: dict[str, int] = {}
            for dep in ts.dependencies.values():
                for address in dep.who_has:
                    if not self.workers[address].paused:
                        held[address] = held.get(address, 0) + dep.nbytes + 1
            if held:
                best = max(held, key=lambda a: (held[a], -self.workers[a].occupancy))
                return self.workers[best]
            running = [ws for ws in self.workers.values() if not ws.paused]
            return min(running, key=lambda ws: ws.occupancy, default=None)
        if not self.idle:
            return None
        address = next(iter(self.idle))
        return self.workers[address]

    def _assign(self, ts: SchedulerTask, ws: SchedulerWorker) -> None:
        ts.state = PROCESSING
        ts.processing_on = ws.address
        ts.running = False
        ws.processing[ts.key] = None
        ws.prefixes[ts.prefix] = ws.prefixes.get(ts.prefix, 0) + 1
        self.balancer.refresh(ws)
        for name, amount in (ts.resources or {}).items():
            ws.used[name] = ws.used.get(name, 0) + amount
        if ws.address in self.idle:
            # Round-robin: the next root task goes to the next idle worker.
            del self.idle[ws.address]
            if not ws.saturated:
                self.idle[ws.address] = None
        deps = ts.dependencies.values()
        self.outbox.emit(
            ComputeTask(
                self.outbox.stimulus_id,
                ws.address,
                ts.key,
                ts.run_spec,
                wire_priority(ts.priority),
                who_has={d.key: tuple(d.who_has) for d in deps},
                nbytes={d.key: d.nbytes for d in deps},
            )
        )

    def _unassign(self, ts: SchedulerTask, *, cancel: bool) -> None:
        """Take `ts` off its worker (telling the worker to drop it if `cancel`)."""
        address, ts.processing_on, ts.running = ts.processing_on, None, False
        # A steal of it that is pending is over (the victim's answer will
        # match nothing): the assignment it was about is.
        self.balancer.drop(ts.key)
        ws = self.workers.get(address) if address is not None else None
        if ws is None:
            return
        del ws.processing[ts.key]
        left = ws.prefixes[ts.prefix] - 1
        if left:
            ws.prefixes[ts.prefix] = left
        else:
            del ws.prefixes[ts.prefix]
        self.balancer.refresh(ws)
        if ts.resources:
            for name, amount in ts.resources.items():
                left = ws.used[name] - amount
                if left > 1e-9:
                    ws.used[name] = left
                else:
                    del ws.used[name]
            self.resources_freed = True
        if ws.hungry and not ws.paused:
            self.idle.setdefault(ws.address, None)
        if cancel:
            self.outbox.emit(FreeKeys(self.outbox.stimulus_id, ws.address, (ts.key,)))

    def fill_idle_workers(self) -> None:
        """Hand queued root tasks to workers below capacity, best priority first."""
        while self.idle and self.queued:
            _, key = heapq.heappop(self.queued)
            ts = self.tasks.get(key)
            if ts is None or ts.state is not QUEUED:
                continue  # released while queued
            self.run({key: PROCESSING})

    def add_replica(self, ts: SchedulerTask, ws: SchedulerWorker) -> None:
        ts.own("who_has")[ws.address] = None
        ws.has_what[ts.key] = None
        if ts.replicas_pending.pop(ws.address, 0) is None:
            del ws.replicating[ts.key]
        if ts.key in self.replicated:
            self.replicate(ts)

    def _drop_pending_replicas(self, ts: SchedulerTask) -> None:
        """`ts` left memory (or stopped awaiting a copy): copies still on
        their way will be freed on arrival."""
        for address in ts.replicas_pending:
            del self.workers[address].replicating[ts.key]
        ts.replicas_pending.clear()

    def _drop_all_replicas(self, ts: SchedulerTask) -> None:
        self._drop_pending_replicas(ts)
        for address in ts.who_has:
            del self.workers[address].has_what[ts.key]
            self.outbox.emit(FreeKeys(self.outbox.stimulus_id, address, (ts.key,)))
        ts.who_has.clear()

    def _release_fired(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """A fire-and-forget key has its outcome: the pseudo-client lets go."""
        if FIRE_AND_FORGET in ts.who_wants:
            del ts.who_wants[FIRE_AND_FORGET]
            self.clients[FIRE_AND_FORGET].pop(ts.key, None)
            self.recommend_release_if_unneeded(ts, recs)

    def report_finished(self, client: str, ts: SchedulerTask, with_value: bool = False) -> None:
        if client == FIRE_AND_FORGET:
            return  # nobody to tell
        # A client keeps the value of the latest report only: `delivered`
        # follows what it was last told.
        if with_value:
            ts.own("delivered")[client] = None
        else:
            ts.delivered.pop(client, None)
        self.outbox.emit(ReportFinished(self.outbox.stimulus_id, client, ts.key, tuple(ts.who_has), with_value))

    def report_failure(self, client: str, ts: SchedulerTask) -> None:
        if client == FIRE_AND_FORGET:
            return  # nobody to tell
        assert ts.failure is not None and ts.failure_origin is not None
        ts.delivered.pop(client, None)
        self.outbox.emit(ReportErred(self.outbox.stimulus_id, client, ts.key, ts.failure, ts.failure_origin))

    def adopt_value(self, ts: SchedulerTask, nbytes: int, holders: list[SchedulerWorker]) -> None:
        """OUTSIDE THE TABLE (`OUTSIDE_THE_TABLE`): a released record with no
        run and no waiter takes a value workers already hold.

        Nothing that a move out of RELEASED does applies: no run to cancel,
        no dependent waiting on it, no client to tell yet (the caller reports
        to whom it must, once every holder is counted).
        """
        assert ts.state is RELEASED and not ts.who_has, ts
        self.story.append((ts.key, RELEASED.value, MEMORY.value, self.outbox.stimulus_id))
        ts.state, ts.nbytes = MEMORY, nbytes
        for ws in holders:
            self.add_replica(ts, ws)

    def replicate(self, ts: SchedulerTask) -> None:
        """Ask workers for copies of `ts` until `replicas_wanted` exist or are coming.

        Copies go to the workers holding the fewest values. Scanning the
        workers is fine here: replication is rare and explicit, unlike
        placement, which never scans.
        """
        if ts.state is not MEMORY or not ts.who_has:
            return
        missing = min(ts.replicas_wanted, len(self.workers)) - len(ts.who_has) - len(ts.replicas_pending)
        if missing <= 0:
            return
        candidates = [
            ws
            for address, ws in self.workers.items()
            if address not in ts.who_has and address not in ts.replicas_pending
        ]
        candidates.sort(key=lambda ws: len(ws.has_what))
        for ws in candidates[:missing]:
            ts.own("replicas_pending")[ws.address] = None
            ws.replicating[ts.key] = None
            self.outbox.emit(
                AcquireReplicas(self.outbox.stimulus_id, ws.address, {ts.key: tuple(ts.who_has)}, {ts.key: ts.nbytes})
            )


# WARNING: the state changes that do not go through `TRANSITIONS`. Each is
# a record that appears or disappears wholesale rather than a task moving
# through its life, so none of the table's knock-on rules applies. A test
# (tests/core/test_scheduler_table.py) checks that any other code setting a
# task's state runs only inside a move of the table.
OUTSIDE_THE_TABLE: dict[str, str] = {
    "TaskTransitions.adopt_value": (
        "released -> memory, for a record a client just made (scatter of a new key, or "
        "a resubmitted key that workers said they hold): no run, no waiter, nobody told yet"
    ),
    "SchedulerState._on_cluster_restarted": (
        "every state -> forgotten at once (Client.restart): every record is dropped, each "
        "client told its futures are cancelled; nothing is left for a knock-on rule to move"
    ),
}

# The transition table: every allowed (from, to) pair and the method doing it.
# spec/README.md draws the same table as a diagram.
_T = TaskTransitions
TRANSITIONS: dict[tuple[TaskState, TaskState], Callable[..., None]] = {
    (RELEASED, WAITING): _T._released_to_waiting,
    # Scattered data that awaited a holder (resubmitted after a scheduler
    # restart, or its last holder left while a copy was on its way): a
    # worker brings it back, or no copy is coming.
    (RELEASED, MEMORY): _T._to_memory,
    (RELEASED, LOST): _T._to_lost,
    (RELEASED, ERRED): _T._to_erred,
    (RELEASED, FORGOTTEN): _T._to_forgotten,
    (WAITING, PROCESSING): _T._to_processing,  # may end QUEUED or NO_WORKER
    (WAITING, MEMORY): _T._to_memory,  # a value a (re-)registering worker brings
    (WAITING, ERRED): _T._to_erred,
    (WAITING, RELEASED): _T._to_released,
    # A queued task is a root task (`_to_processing`): no input of it can
    # fail or vanish, so it never errs or waits again from the queue.
    (QUEUED, PROCESSING): _T._to_processing,
    (QUEUED, RELEASED): _T._to_released,
    (QUEUED, MEMORY): _T._to_memory,
    (NO_WORKER, PROCESSING): _T._to_processing,
    (NO_WORKER, ERRED): _T._to_erred,
    (NO_WORKER, RELEASED): _T._to_released,
    (NO_WORKER, WAITING): _T._to_waiting_again,
    (NO_WORKER, MEMORY): _T._to_memory,
    (PROCESSING, MEMORY): _T._to_memory,
    (PROCESSING, PROCESSING): _T._to_thief,  # stolen (core/stealing.py)
    (PROCESSING, WAITING): _T._to_waiting_again,
    (PROCESSING, ERRED): _T._to_erred,
    (PROCESSING, RELEASED): _T._to_released,
    (MEMORY, WAITING): _T._memory_to_waiting,
    (MEMORY, LOST): _T._to_lost,
    (MEMORY, RELEASED): _T._memory_to_released,  # not needed, or awaiting a copy
    (MEMORY, FORGOTTEN): _T._to_forgotten,
    (ERRED, FORGOTTEN): _T._to_forgotten,
    (LOST, FORGOTTEN): _T._to_forgotten,
    (LOST, MEMORY): _T._to_memory,  # a copy turned up again (re-registration)
}
del _T
