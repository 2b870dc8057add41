"""The scheduler's brain: a pure state machine over tasks and workers.

Rules of this module (and of everything in `trioflow.core`):

* Everything that decides what happens to a task lives here: which worker
  runs it, when it is retried, when it is bad, what is recomputed, what is
  forgotten. The Trio shell (`trioflow.scheduler`) only turns bytes into
  events and messages into bytes.
* No I/O, no clock, no randomness, no threads. Time and identity arrive on
  events. Given the same events, the same messages come out.
* Iteration is over insertion-ordered dicts, never over sets of strings.

Theory of operation
-------------------
`handle(event)` applies one fact and returns the messages it implies. Most
facts change one task's state, and a change to one task can make others
change (a value arriving makes dependents ready; a failure errs dependents;
a task finishing makes its inputs unneeded). Those knock-on changes are
*recommendations*, ``{key: target_state}``, which `_transitions` works off
until none are left. Every state change goes through `TRANSITIONS`, the
table below; a (from, to) pair not in it raises `InvalidTransition` and
leaves the task as it was.

A task is *needed* while a client holds a future for it (`who_wants`) or a
dependent in progress still needs its value (`waiters`). A task that is no
longer needed drops its value (RELEASED) but keeps its record, because a
dependent's lineage may need it again; the record itself is FORGOTTEN once
no dependent record and no client refers to it. Scattered data has no
lineage, so its value is kept as long as its record is.

Worker death is the interesting case (design.md §1, spec/README.md
"WorkerDies"): each task that was *running* there is suspected once more
and, past `allowed_failures`, erred with `WorkerDeaths`; the other tasks
assigned there go back to waiting; values whose only copy was there are
recomputed from lineage if needed, or LOST if they were scattered.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Callable, Iterable

from trioflow.core.failures import Cancelled, DataLost, WorkerDeaths
from trioflow.core.scheduler_events import (
    AcquireReplicas,
    ClientConnected,
    ClientDisconnected,
    ClusterRestarted,
    ComputeTask,
    DataDropped,
    DataScattered,
    FreeKeys,
    KeysCancelled,
    KeysReleased,
    OrphansExpired,
    ReplicaAdded,
    ReplicaMissing,
    ReplicationRequested,
    ReportErred,
    ReportFinished,
    ReportLost,
    SchedulerEvent,
    SchedulerMessage,
    TaskErred,
    TaskFinished,
    TasksSubmitted,
    TaskStarted,
    WorkerConnected,
    WorkerDisconnected,
)
from trioflow.core.scheduler_records import (
    FAILED,
    IN_PROGRESS,
    Orphan,
    SchedulerTask,
    SchedulerWorker,
    TaskState,
)

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


class SchedulerState:
    """Tasks, workers and clients, and the rules that move tasks between states.

    Args:
        allowed_failures: worker deaths a running task may witness before it
            is marked bad (`Config.allowed_failures`).
        worker_saturation: tasks per thread sent ahead to a worker before
            root tasks queue here (`Config.worker_saturation`).
        story_length: how many recent transitions to keep in `story`.
    """

    def __init__(
        self,
        *,
        allowed_failures: int = 3,
        worker_saturation: float = 4.0,
        story_length: int = 10_000,
    ):
        self.allowed_failures = allowed_failures
        self.worker_saturation = worker_saturation
        self.tasks: dict[str, SchedulerTask] = {}
        self.workers: dict[str, SchedulerWorker] = {}
        # client id -> the keys it holds futures for
        self.clients: dict[str, dict[str, None]] = {}
        # Workers below capacity, in the order they will get root tasks.
        self.idle: dict[str, None] = {}
        # Root tasks waiting for capacity: a heap of (priority, key). Entries
        # whose task left QUEUED are skipped when popped (lazy deletion), so
        # releasing a queued task costs nothing here.
        self.queued: list[tuple[tuple[int, ...], str]] = []
        # Tasks whose restrictions name no live worker.
        self.unrunnable: dict[str, None] = {}
        # Keys a client asked to keep more than one copy of.
        self.replicated: dict[str, None] = {}
        # Keys workers hold or run that no task record names (after a
        # scheduler restart, until clients resubmit their lineage).
        self.orphans: dict[str, Orphan] = {}
        # Tasks a worker said it is already running: when ready, they are
        # assigned there rather than started a second time elsewhere.
        self.recovering_runs: dict[str, str] = {}
        # (key, from, to, stimulus_id) of recent transitions, for debugging.
        self.story: collections.deque[tuple[str, str, str, str]] = collections.deque(
            maxlen=story_length
        )
        self._submitted = 0
        self._stimulus_id = ""
        self._out: list[SchedulerMessage] = []
        self._handlers: dict[type, Callable[[SchedulerEvent], None]] = {
            ClientConnected: self._on_client_connected,
            ClientDisconnected: self._on_client_disconnected,
            TasksSubmitted: self._on_tasks_submitted,
            KeysReleased: self._on_keys_released,
            KeysCancelled: self._on_keys_cancelled,
            DataScattered: self._on_data_scattered,
            WorkerConnected: self._on_worker_connected,
            WorkerDisconnected: self._on_worker_disconnected,
            TaskStarted: self._on_task_started,
            TaskFinished: self._on_task_finished,
            TaskErred: self._on_task_erred,
            ReplicaAdded: self._on_replica_added,
            ReplicaMissing: self._on_replica_missing,
            DataDropped: self._on_data_dropped,
            ReplicationRequested: self._on_replication_requested,
            ClusterRestarted: self._on_cluster_restarted,
            OrphansExpired: self._on_orphans_expired,
        }

    # ------------------------------------------------------------ entry --

    def handle(self, event: SchedulerEvent) -> list[SchedulerMessage]:
        """Apply one event; return the messages the shell must send, in order."""
        self._stimulus_id = event.stimulus_id
        try:
            self._handlers[type(event)](event)
            self._fill_idle_workers()
        finally:
            out, self._out = self._out, []
        return out

    # ---------------------------------------------------------- queries --

    def who_has(self, keys: Iterable[str] | None = None) -> dict[str, list[str]]:
        keys = self.tasks if keys is None else keys
        return {k: list(self.tasks[k].who_has) if k in self.tasks else [] for k in keys}

    def has_what(self) -> dict[str, list[str]]:
        return {a: list(ws.has_what) for a, ws in self.workers.items()}

    def nthreads(self) -> dict[str, int]:
        return {a: ws.nthreads for a, ws in self.workers.items()}

    def processing(self) -> dict[str, list[str]]:
        return {a: list(ws.processing) for a, ws in self.workers.items()}

    def scatter_targets(self, keys: Iterable[str], broadcast: bool) -> dict[str, tuple[str, ...]]:
        """Where scattered values should go: every worker, or spread evenly.

        Not broadcast: round-robin, starting with the workers that hold the
        fewest values, so repeated scatters even out.
        """
        if not self.workers:
            return {}
        if broadcast:
            everyone = tuple(self.workers)
            return {key: everyone for key in keys}
        order = sorted(self.workers.values(), key=lambda ws: len(ws.has_what))
        return {key: (order[i % len(order)].address,) for i, key in enumerate(keys)}

    def count_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for ts in self.tasks.values():
            counts[ts.state.value] = counts.get(ts.state.value, 0) + 1
        return counts

    # -------------------------------------------------- client events --

    def _on_client_connected(self, ev: ClientConnected) -> None:
        self.clients.setdefault(ev.client, {})

    def _on_client_disconnected(self, ev: ClientDisconnected) -> None:
        keys = self.clients.pop(ev.client, {})
        recs: Recommendations = {}
        for key in keys:
            ts = self.tasks.get(key)
            if ts is not None:
                ts.who_wants.pop(ev.client, None)
                self._recommend_release_if_unneeded(ts, recs)
        self._transitions(recs)

    def _on_tasks_submitted(self, ev: TasksSubmitted) -> None:
        wanted = self.clients.setdefault(ev.client, {})
        recs: Recommendations = {}
        new: list[SchedulerTask] = []
        for spec in ev.tasks:
            if spec.key in self.tasks:
                continue  # same key, same lineage: the existing record serves
            self._submitted += 1
            ts = SchedulerTask(
                spec.key,
                spec.run_spec,
                priority=(self._submitted,),
                retries=spec.retries,
                restrictions=spec.workers,
            )
            self.tasks[spec.key] = ts
            new.append(ts)
        # Link dependencies once every new record exists (a batch may list a
        # task before its inputs).
        by_key = {spec.key: spec for spec in ev.tasks}
        for ts in new:
            for dep_key in by_key[ts.key].dependencies:
                dep = self.tasks.get(dep_key)
                if dep is None:
                    # A client referred to a key this scheduler has never had
                    # (or has forgotten): its data is lost for this task.
                    ts.failure, ts.failure_origin = DataLost(dep_key), dep_key
                    continue
                ts.dependencies[dep_key] = dep
                dep.dependents[ts.key] = ts
        for ts in new:
            orphan = self.orphans.pop(ts.key, None)
            if orphan is not None:
                self._claim_orphan(ts, orphan)
        for key in ev.wanted:
            ts = self.tasks.get(key)
            if ts is None:
                continue
            ts.who_wants[ev.client] = None
            wanted[key] = None
            if ts.state is MEMORY:
                self._report_finished(ev.client, ts)
            elif ts.state in FAILED:
                self._report_failure(ev.client, ts)
        # One task at a time, in submission order, each with its knock-on
        # effects, so that earlier work is placed first.
        for ts in new:
            if ts.key not in self.tasks:
                continue  # forgotten meanwhile
            if ts.state is MEMORY:  # took an orphaned value above
                recs = {}
                self._recommend_release_if_unneeded(ts, recs)
                self._transitions(recs)
            elif ts.failure is not None:
                self._transitions({ts.key: ERRED})
            elif not ts.has_lineage:
                # Scattered data resubmitted after a scheduler restart that
                # no surviving worker holds: it cannot be recomputed.
                self._transitions({ts.key: LOST})
            elif self._is_needed(ts):
                self._transitions({ts.key: WAITING})
            elif ts.state is RELEASED and not ts.dependents:
                # Submitted, never wanted, needed by nothing: nothing to do.
                self._transitions({ts.key: FORGOTTEN})

    def _on_keys_released(self, ev: KeysReleased) -> None:
        wanted = self.clients.get(ev.client, {})
        recs: Recommendations = {}
        for key in ev.keys:
            wanted.pop(key, None)
            ts = self.tasks.get(key)
            if ts is not None and ev.client in ts.who_wants:
                del ts.who_wants[ev.client]
                self._recommend_release_if_unneeded(ts, recs)
        self._transitions(recs)

    def _on_keys_cancelled(self, ev: KeysCancelled) -> None:
        """The client gives up `keys` and every dependent of them it holds.

        Other clients' futures are untouched: a key another client still
        wants keeps running, and so does everything it needs.
        """
        wanted = self.clients.get(ev.client, {})
        recs: Recommendations = {}
        seen: dict[str, None] = {}
        stack = [self.tasks[k] for k in ev.keys if k in self.tasks]
        while stack:
            ts = stack.pop()
            if ts.key in seen:
                continue
            seen[ts.key] = None
            stack.extend(ts.dependents.values())
            if ev.client in ts.who_wants:
                del ts.who_wants[ev.client]
                wanted.pop(ts.key, None)
                self._emit(ReportErred(self._stimulus_id, ev.client, ts.key, Cancelled(ev.reason), ts.key))
                self._recommend_release_if_unneeded(ts, recs)
        self._transitions(recs)

    def _on_data_scattered(self, ev: DataScattered) -> None:
        wanted = self.clients.setdefault(ev.client, {})
        for key, (nbytes, holders) in ev.placed.items():
            live = [a for a in holders if a in self.workers]
            ts = self.tasks.get(key)
            if ts is None:
                self._submitted += 1
                ts = self.tasks[key] = SchedulerTask(key, None, priority=(self._submitted,))
            if ts.state is RELEASED or ts.state is LOST:
                if not live:
                    continue
                self._log(ts, MEMORY)
                ts.state, ts.nbytes = MEMORY, nbytes
                ts.failure = ts.failure_origin = None
            if ts.state is MEMORY:
                for address in live:
                    self._add_replica(ts, self.workers[address])
            else:
                # The key is already being computed; keep that, drop the copies.
                for address in live:
                    self._emit(FreeKeys(self._stimulus_id, address, (key,)))
            ts.who_wants[ev.client] = None
            wanted[key] = None
            if ts.state is MEMORY:
                self._report_finished(ev.client, ts)

    # -------------------------------------------------- worker events --

    def _on_worker_connected(self, ev: WorkerConnected) -> None:
        if ev.worker in self.workers:
            # A new connection from an address we still think is alive: the
            # old incarnation is gone.
            self._on_worker_disconnected(WorkerDisconnected(ev.stimulus_id, ev.worker))
        ws = SchedulerWorker(ev.worker, ev.nthreads, self.worker_saturation)
        self.workers[ev.worker] = ws
        self.idle[ev.worker] = None
        for key, nbytes in ev.held.items():
            ts = self.tasks.get(key)
            if ts is None:
                orphan = self.orphans.setdefault(key, Orphan())
                orphan.holders[ev.worker] = None
                orphan.nbytes = nbytes
            elif ts.state is MEMORY:
                self._add_replica(ts, ws)
            elif ts.state in IN_PROGRESS or ts.state is LOST:
                # The value we were waiting for already exists: take it.
                self._transitions({}, first=(ts, MEMORY, {"worker": ws, "nbytes": nbytes}))
            else:
                self._emit(FreeKeys(self._stimulus_id, ev.worker, (key,)))
        for key in ev.running:
            ts = self.tasks.get(key)
            if ts is None:
                self.orphans.setdefault(key, Orphan()).running_on = ev.worker
            elif ts.state in (WAITING, QUEUED, NO_WORKER):
                self.recovering_runs[key] = ev.worker
        recs: Recommendations = {}
        for key in self.unrunnable:
            ts = self.tasks[key]
            if ts.restrictions is None or ev.worker in ts.restrictions:
                recs[key] = PROCESSING
        for key in ev.running:
            ts = self.tasks.get(key)
            if ts is not None and ts.state is QUEUED:
                recs[key] = PROCESSING
        self._transitions(recs)
        for key in self.replicated:
            self._replicate(self.tasks[key])

    def _on_worker_disconnected(self, ev: WorkerDisconnected) -> None:
        ws = self.workers.pop(ev.worker, None)
        if ws is None:
            return  # already removed (a close after a missed heartbeat)
        self.idle.pop(ev.worker, None)
        for key in ws.replicating:
            del self.tasks[key].replicas_pending[ev.worker]
        self._forget_worker_orphans(ev.worker)
        recs: Recommendations = {}
        # First the data: drop this replica everywhere. Values with no copy
        # left are recommended first, so that by the time the rescheduled
        # tasks below look at their dependencies, those are no longer MEMORY.
        for key in ws.has_what:
            ts = self.tasks[key]
            del ts.who_has[ev.worker]
            if not ts.who_has:
                recs[key] = self._target_for_lost_value(ts)
        # Then the work: every task assigned there is detached. A task that
        # was *running* when the worker died is suspected of killing it.
        for key in ws.processing:
            ts = self.tasks[key]
            was_running, ts.running, ts.processing_on = ts.running, False, None
            if was_running and not ev.expected:
                ts.suspicious += 1
                ts.last_worker = ev.worker
                if ts.suspicious >= self.allowed_failures:
                    # spec: INV-KILLED. Marked on the allowed_failures-th
                    # death; it never runs again.
                    ts.failure = WorkerDeaths(key, ts.suspicious, ev.worker)
                    ts.failure_origin = key
                    recs[key] = ERRED
                    continue
            recs.setdefault(key, WAITING)
        self._transitions(recs)
        # Copies a client asked for are restored on the survivors.
        for key in (*ws.has_what, *ws.replicating):
            ts = self.tasks.get(key)
            if ts is not None and key in self.replicated:
                self._replicate(ts)
        ws.processing.clear()
        ws.has_what.clear()
        ws.replicating.clear()

    def _on_task_started(self, ev: TaskStarted) -> None:
        ts = self.tasks.get(ev.key)
        if ts is not None and ts.processing_on == ev.worker:
            ts.running = True

    def _on_task_finished(self, ev: TaskFinished) -> None:
        ts = self.tasks.get(ev.key)
        ws = self.workers.get(ev.worker)
        if ws is None:
            return  # a message from a worker we already declared dead
        if ts is None:
            orphan = self.orphans.get(ev.key)
            if orphan is not None and orphan.running_on == ev.worker:
                # A run that outlived the old scheduler: keep its value for
                # the client that will resubmit it.
                orphan.running_on = None
                orphan.holders[ev.worker] = None
                orphan.nbytes = ev.nbytes
            else:
                self._emit(FreeKeys(self._stimulus_id, ev.worker, (ev.key,)))
        elif ts.state is MEMORY:
            if ev.worker not in ts.who_has:
                # A second run of a task whose value already came from
                # another worker (it had been rerouted; both runs ended).
                # That first result cancelled this run with a FreeKeys
                # which may be crossing this message on the wire, so the
                # worker may be dropping its value right now: do not count
                # it as a copy, free it (again). Found by seed 2 of the
                # chaos lab (tests/sim/test_regressions.py).
                self._emit(FreeKeys(self._stimulus_id, ev.worker, (ev.key,)))
        elif ts.state in IN_PROGRESS:
            # Usually PROCESSING here; a value finished by a worker the task
            # was taken from (rerouted, or re-registered after a restart) is
            # just as good, so it is taken rather than computed again.
            self._transitions({}, first=(ts, MEMORY, {"worker": ws, "nbytes": ev.nbytes}))
        else:
            # Nobody needs this value any more (released, erred).
            self._emit(FreeKeys(self._stimulus_id, ev.worker, (ev.key,)))

    def _on_task_erred(self, ev: TaskErred) -> None:
        ts = self.tasks.get(ev.key)
        if ts is None or ts.state is not PROCESSING or ts.processing_on != ev.worker:
            return  # stale: the task was rerouted or released meanwhile
        if ts.retries_left > 0:
            ts.retries_left -= 1
            self._transitions({ts.key: WAITING})
            return
        ts.failure, ts.failure_origin = ev.failure, ts.key
        self._transitions({ts.key: ERRED})

    def _on_replica_added(self, ev: ReplicaAdded) -> None:
        ts = self.tasks.get(ev.key)
        ws = self.workers.get(ev.worker)
        if ws is None:
            return
        if ts is not None and ts.state is MEMORY:
            self._add_replica(ts, ws)
        elif ts is not None and ts.processing_on == ev.worker:
            # A copy fetched before the task was assigned there: the worker
            # answers the assignment with TaskFinished, which counts it. A
            # free now would cross that answer (seed 5 of the chaos lab).
            pass
        else:
            self._emit(FreeKeys(self._stimulus_id, ev.worker, (ev.key,)))

    def _on_replica_missing(self, ev: ReplicaMissing) -> None:
        """A worker could not fetch `key` from any holder it was given.

        The holders it names did not have the value (or did not answer), so
        they stop counting as holders; the dependent goes back to waiting and
        is sent again with fresh holders, or after the value is recomputed.
        """
        recs: Recommendations = {}
        ts = self.tasks.get(ev.key)
        if ts is not None and ts.state is MEMORY:
            # The reporter itself is no holder either, whatever we believed:
            # a worker only reports inputs it does not have. Without this, a
            # stale `who_has` naming the reporter sends the dependent back
            # to it forever (seed 2 of the chaos lab).
            for address in (*ev.holders, ev.worker):
                ws = self.workers.get(address)
                if ws is not None and address in ts.who_has:
                    del ts.who_has[address]
                    del ws.has_what[ts.key]
                    self._emit(FreeKeys(self._stimulus_id, address, (ts.key,)))
            if not ts.who_has:
                recs[ts.key] = self._target_for_lost_value(ts)
        dependent = self.tasks.get(ev.dependent) if ev.dependent else None
        if dependent is not None and dependent.processing_on == ev.worker:
            recs.setdefault(dependent.key, WAITING)
        if ts is not None and ev.worker in ts.replicas_pending:
            del ts.replicas_pending[ev.worker]
            del self.workers[ev.worker].replicating[ts.key]
        self._transitions(recs)
        if ts is not None and ts.key in self.replicated and ts.key in self.tasks:
            self._replicate(ts)

    def _on_data_dropped(self, ev: DataDropped) -> None:
        """The worker dropped these values (it was told to; the message may
        have crossed a report that made us count it again)."""
        ws = self.workers.get(ev.worker)
        if ws is None:
            return
        recs: Recommendations = {}
        for key in ev.keys:
            ts = self.tasks.get(key)
            if ts is None or ts.state is not MEMORY or ev.worker not in ts.who_has:
                continue
            del ts.who_has[ev.worker]
            del ws.has_what[key]
            if not ts.who_has:
                recs[key] = self._target_for_lost_value(ts)
            elif key in self.replicated:
                self._replicate(ts)
        self._transitions(recs)

    def _on_replication_requested(self, ev: ReplicationRequested) -> None:
        for key in ev.keys:
            ts = self.tasks.get(key)
            if ts is None:
                continue
            ts.replicas_wanted = ev.n
            if ev.n > 1:
                self.replicated[key] = None
            else:
                self.replicated.pop(key, None)
            self._replicate(ts)

    def _on_cluster_restarted(self, ev: ClusterRestarted) -> None:
        """Flush every task: each held future hears that it was cancelled.

        Workers stay registered until they disconnect (the shell restarts
        them); they are emptied here, so nothing is rerouted to them.
        """
        failure = Cancelled(ev.reason)
        for key, ts in self.tasks.items():
            for client in ts.who_wants:
                self._emit(ReportErred(self._stimulus_id, client, key, failure, key))
            self.story.append((key, ts.state.value, FORGOTTEN.value, self._stimulus_id))
        self.tasks.clear()
        for wanted in self.clients.values():
            wanted.clear()
        for ws in self.workers.values():
            ws.processing.clear()
            ws.has_what.clear()
            ws.replicating.clear()
        self.idle = dict.fromkeys(self.workers)
        self.queued.clear()
        self.unrunnable.clear()
        self.replicated.clear()
        for key, orphan in self.orphans.items():
            for address in orphan.holders:
                self._emit(FreeKeys(self._stimulus_id, address, (key,)))
        self.orphans.clear()
        self.recovering_runs.clear()

    def _on_orphans_expired(self, ev: OrphansExpired) -> None:
        for key in ev.keys:
            orphan = self.orphans.pop(key, None)
            if orphan is None:
                continue
            for address in orphan.holders:
                self._emit(FreeKeys(self._stimulus_id, address, (key,)))

    def _claim_orphan(self, ts: SchedulerTask, orphan: Orphan) -> None:
        """A resubmitted task takes what workers said they hold or run for it."""
        if orphan.holders:
            ts.state, ts.nbytes = MEMORY, orphan.nbytes
            for address in orphan.holders:
                self._add_replica(ts, self.workers[address])
            self.story.append((ts.key, RELEASED.value, MEMORY.value, self._stimulus_id))
        elif orphan.running_on is not None:
            self.recovering_runs[ts.key] = orphan.running_on

    def _forget_worker_orphans(self, address: str) -> None:
        for key in [k for k, o in self.orphans.items() if address in o.holders or o.running_on == address]:
            orphan = self.orphans[key]
            orphan.holders.pop(address, None)
            if orphan.running_on == address:
                orphan.running_on = None
            if not orphan.holders and orphan.running_on is None:
                del self.orphans[key]
        for key in [k for k, w in self.recovering_runs.items() if w == address]:
            del self.recovering_runs[key]

    def _replicate(self, ts: SchedulerTask) -> None:
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
            ts.replicas_pending[ws.address] = None
            ws.replicating[ts.key] = None
            self._emit(
                AcquireReplicas(self._stimulus_id, ws.address, {ts.key: tuple(ts.who_has)}, {ts.key: ts.nbytes})
            )

    # ------------------------------------------------ the transition engine --

    def _transitions(
        self,
        recs: Recommendations,
        first: tuple[SchedulerTask, TaskState, dict] | None = None,
    ) -> None:
        """Apply `first` (a transition with arguments), then every recommendation.

        Recommendations are processed oldest first; each transition may add
        more. A recommendation can go stale while it waits its turn (a later
        transition made the task needed again, or forgotten); it is checked
        against the task as it is *now*.
        """
        if first is not None:
            ts, target, kwargs = first
            self._transition(ts, target, recs, **kwargs)
        while recs:
            key = next(iter(recs))
            target = recs.pop(key)
            ts = self.tasks.get(key)
            if ts is None:
                continue
            if ts.state is MEMORY and not ts.who_has:
                # Its last copy vanished: where it goes depends on whether it
                # is needed now, not when the recommendation was made.
                target = self._target_for_lost_value(ts)
            elif target in (RELEASED, FORGOTTEN) and self._is_needed(ts):
                continue
            elif target is FORGOTTEN and (ts.dependents or ts.who_wants):
                continue
            elif target is WAITING and ts.state is RELEASED and not self._is_needed(ts):
                continue
            if ts.state is target:
                continue
            self._transition(ts, target, recs)

    def _transition(
        self, ts: SchedulerTask, target: TaskState, recs: Recommendations, **kwargs
    ) -> None:
        method = TRANSITIONS.get((ts.state, target))
        if method is None:
            raise InvalidTransition(
                f"{ts.key!r}: no transition {ts.state.value} -> {target.value} "
                f"(stimulus {self._stimulus_id!r})"
            )
        before = ts.state
        method(self, ts, recs, **kwargs)
        self.story.append((ts.key, before.value, ts.state.value, self._stimulus_id))

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
            dep.waiters[ts.key] = None
            if not self._is_available(dep):
                ts.waiting_on[dep.key] = None
                if dep.state is RELEASED:
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
        ws = self._choose_worker(ts)
        if ws is not None:
            self._assign(ts, ws)
        elif ts.restrictions is not None:
            ts.state = NO_WORKER
            self.unrunnable[ts.key] = None
        else:
            ts.state = QUEUED
            heapq.heappush(self.queued, (ts.priority, ts.key))

    def _to_memory(
        self, ts: SchedulerTask, recs: Recommendations, *, worker: SchedulerWorker, nbytes: int
    ) -> None:
        """`worker` holds the value now (it computed it, or re-registered with it)."""
        if ts.state is PROCESSING:
            # Finished by the worker it was assigned to, or by one it had
            # been taken from: either way, cancel any other run.
            self._unassign(ts, cancel=ts.processing_on != worker.address)
        elif ts.state is NO_WORKER:
            del self.unrunnable[ts.key]
        self.recovering_runs.pop(ts.key, None)
        ts.state, ts.nbytes = MEMORY, nbytes
        ts.failure = ts.failure_origin = None
        ts.waiting_on.clear()
        self._add_replica(ts, worker)
        for client in ts.who_wants:
            self._report_finished(client, ts)
        for key in ts.waiters:
            dependent = self.tasks[key]
            if dependent.state is WAITING:
                dependent.waiting_on.pop(ts.key, None)
                if not dependent.waiting_on:
                    recs[key] = PROCESSING
        self._stop_waiting(ts, recs)
        self._recommend_release_if_unneeded(ts, recs)

    def _to_waiting_again(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """Rerouted (worker died, input lost, retry): wait and run again."""
        if ts.state is PROCESSING:
            self._unassign(ts, cancel=True)
        elif ts.state is NO_WORKER:
            del self.unrunnable[ts.key]
        ts.state = WAITING
        self._wait_for_dependencies(ts, recs)

    def _memory_to_waiting(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """The value's last copy is gone and it is still needed: recompute it."""
        assert not ts.who_has
        self._drop_pending_replicas(ts)
        for client in ts.who_wants:
            self._emit(ReportLost(self._stimulus_id, client, ts.key))
        self._invalidate_dependents(ts, recs)
        ts.state = WAITING
        self._wait_for_dependencies(ts, recs)

    def _to_lost(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """Scattered data lost its last copy: it cannot come back."""
        self._drop_pending_replicas(ts)
        ts.state = LOST
        ts.failure, ts.failure_origin = DataLost(ts.key), ts.key
        for client in ts.who_wants:
            self._report_failure(client, ts)
        self._err_dependents(ts, recs)
        self._recommend_release_if_unneeded(ts, recs)

    def _to_erred(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """`ts.failure` is set: keep it, tell clients, and err the dependents."""
        if ts.state is PROCESSING:
            self._unassign(ts, cancel=True)
        elif ts.state is NO_WORKER:
            del self.unrunnable[ts.key]
        ts.state = ERRED
        ts.waiting_on.clear()
        self.recovering_runs.pop(ts.key, None)
        for client in ts.who_wants:
            self._report_failure(client, ts)
        self._stop_waiting(ts, recs)
        self._err_dependents(ts, recs)
        self._recommend_release_if_unneeded(ts, recs)

    def _to_released(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """Nobody needs it any more: drop the run or the value, keep lineage."""
        if ts.state is PROCESSING:
            self._unassign(ts, cancel=True)
        elif ts.state is NO_WORKER:
            del self.unrunnable[ts.key]
        elif ts.state is MEMORY:
            self._drop_all_replicas(ts)
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
        ts.state = FORGOTTEN
        del self.tasks[ts.key]
        self.replicated.pop(ts.key, None)
        for dep in ts.dependencies.values():
            dep.dependents.pop(ts.key, None)
            dep.waiters.pop(ts.key, None)
            self._recommend_release_if_unneeded(dep, recs)

    # ------------------------------------------------------------ helpers --

    def _is_needed(self, ts: SchedulerTask) -> bool:
        return bool(ts.who_wants or ts.waiters)

    @staticmethod
    def _is_available(ts: SchedulerTask) -> bool:
        # A MEMORY task with no holder is about to be recomputed (its
        # recommendation is pending): it is not available.
        return ts.state is MEMORY and bool(ts.who_has)

    def _recommend_release_if_unneeded(self, ts: SchedulerTask, recs: Recommendations) -> None:
        if self._is_needed(ts):
            return
        unreferenced = not ts.dependents
        if ts.state in IN_PROGRESS:
            # Unless it is doomed in this same step (its failure is set and
            # ERRED recommended): releasing it instead would keep a failure
            # outside ERRED (INV-FAILED; seed 314 of the chaos lab).
            if ts.failure is None:
                recs[ts.key] = RELEASED
        elif ts.state is MEMORY:
            if ts.has_lineage:
                recs[ts.key] = FORGOTTEN if unreferenced else RELEASED
            elif unreferenced:
                recs[ts.key] = FORGOTTEN  # scattered: kept while referenced
        elif unreferenced:  # RELEASED, ERRED, LOST
            recs[ts.key] = FORGOTTEN

    def _target_for_lost_value(self, ts: SchedulerTask) -> TaskState:
        """Where a MEMORY task goes when its last copy disappears."""
        if not ts.has_lineage:
            return LOST if (self._is_needed(ts) or ts.dependents) else FORGOTTEN
        if self._is_needed(ts):
            return WAITING
        return FORGOTTEN if not ts.dependents else RELEASED

    def _stop_waiting(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """`ts` no longer needs its inputs' values: they may be released."""
        for dep in ts.dependencies.values():
            if dep.waiters.pop(ts.key, 0) is None:
                self._recommend_release_if_unneeded(dep, recs)

    def _invalidate_dependents(self, ts: SchedulerTask, recs: Recommendations) -> None:
        """`ts` lost its value: dependents that were about to use it wait again."""
        for key in ts.waiters:
            dependent = self.tasks[key]
            if dependent.state is WAITING:
                dependent.waiting_on[ts.key] = None
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

    def _choose_worker(self, ts: SchedulerTask) -> SchedulerWorker | None:
        """Pick the worker for a ready task, or None to queue/park it.

        Restricted tasks go to the least busy allowed worker. Tasks with
        inputs go where most of their input bytes already are (ties: least
        busy), so data moves as little as possible. Root tasks take the
        next worker below capacity, round-robin; when all are saturated
        they queue here, which keeps work movable if a worker dies.
        Costs are bounded by the task's own inputs, never by cluster size.
        """
        if ts.restrictions is not None:
            allowed = [self.workers[a] for a in ts.restrictions if a in self.workers]
            return min(allowed, key=lambda ws: ws.occupancy, default=None)
        if ts.dependencies:
            held: dict[str, int] = {}
            for dep in ts.dependencies.values():
                for address in dep.who_has:
                    held[address] = held.get(address, 0) + dep.nbytes + 1
            if held:
                best = max(held, key=lambda a: (held[a], -self.workers[a].occupancy))
                return self.workers[best]
        if not self.idle:
            return None
        address = next(iter(self.idle))
        return self.workers[address]

    def _assign(self, ts: SchedulerTask, ws: SchedulerWorker) -> None:
        ts.state = PROCESSING
        ts.processing_on = ws.address
        ts.running = False
        ws.processing[ts.key] = None
        if ws.address in self.idle:
            # Round-robin: the next root task goes to the next idle worker.
            del self.idle[ws.address]
            if not ws.saturated:
                self.idle[ws.address] = None
        deps = ts.dependencies.values()
        self._emit(
            ComputeTask(
                self._stimulus_id,
                ws.address,
                ts.key,
                ts.run_spec,
                ts.priority,
                who_has={d.key: tuple(d.who_has) for d in deps},
                nbytes={d.key: d.nbytes for d in deps},
            )
        )

    def _unassign(self, ts: SchedulerTask, *, cancel: bool) -> None:
        """Take `ts` off its worker (telling the worker to drop it if `cancel`)."""
        address, ts.processing_on, ts.running = ts.processing_on, None, False
        ws = self.workers.get(address) if address is not None else None
        if ws is None:
            return
        del ws.processing[ts.key]
        if not ws.saturated:
            self.idle.setdefault(ws.address, None)
        if cancel:
            self._emit(FreeKeys(self._stimulus_id, ws.address, (ts.key,)))

    def _fill_idle_workers(self) -> None:
        """Hand queued root tasks to workers below capacity, best priority first."""
        while self.idle and self.queued:
            _, key = heapq.heappop(self.queued)
            ts = self.tasks.get(key)
            if ts is None or ts.state is not QUEUED:
                continue  # released while queued
            self._transitions({key: PROCESSING})

    def _add_replica(self, ts: SchedulerTask, ws: SchedulerWorker) -> None:
        ts.who_has[ws.address] = None
        ws.has_what[ts.key] = None
        if ts.replicas_pending.pop(ws.address, 0) is None:
            del ws.replicating[ts.key]
        if ts.key in self.replicated:
            self._replicate(ts)

    def _drop_pending_replicas(self, ts: SchedulerTask) -> None:
        """`ts` left memory: copies still on their way will be freed on arrival."""
        for address in ts.replicas_pending:
            del self.workers[address].replicating[ts.key]
        ts.replicas_pending.clear()

    def _drop_all_replicas(self, ts: SchedulerTask) -> None:
        self._drop_pending_replicas(ts)
        for address in ts.who_has:
            del self.workers[address].has_what[ts.key]
            self._emit(FreeKeys(self._stimulus_id, address, (ts.key,)))
        ts.who_has.clear()

    def _report_finished(self, client: str, ts: SchedulerTask) -> None:
        self._emit(ReportFinished(self._stimulus_id, client, ts.key, tuple(ts.who_has)))

    def _report_failure(self, client: str, ts: SchedulerTask) -> None:
        assert ts.failure is not None and ts.failure_origin is not None
        self._emit(ReportErred(self._stimulus_id, client, ts.key, ts.failure, ts.failure_origin))

    def _emit(self, message: SchedulerMessage) -> None:
        self._out.append(message)

    def _log(self, ts: SchedulerTask, target: TaskState) -> None:
        self.story.append((ts.key, ts.state.value, target.value, self._stimulus_id))


# The transition table: every allowed (from, to) pair and the method doing it.
# spec/README.md draws the same table as a diagram.
_S = SchedulerState
TRANSITIONS: dict[tuple[TaskState, TaskState], Callable[..., None]] = {
    (RELEASED, WAITING): _S._released_to_waiting,
    (RELEASED, LOST): _S._to_lost,
    (RELEASED, ERRED): _S._to_erred,
    (RELEASED, FORGOTTEN): _S._to_forgotten,
    (WAITING, PROCESSING): _S._to_processing,  # may end QUEUED or NO_WORKER
    (WAITING, MEMORY): _S._to_memory,  # a value re-registered or finished elsewhere
    (WAITING, ERRED): _S._to_erred,
    (WAITING, RELEASED): _S._to_released,
    (QUEUED, PROCESSING): _S._to_processing,
    (QUEUED, ERRED): _S._to_erred,
    (QUEUED, RELEASED): _S._to_released,
    (QUEUED, WAITING): _S._to_waiting_again,
    (QUEUED, MEMORY): _S._to_memory,
    (NO_WORKER, PROCESSING): _S._to_processing,
    (NO_WORKER, ERRED): _S._to_erred,
    (NO_WORKER, RELEASED): _S._to_released,
    (NO_WORKER, WAITING): _S._to_waiting_again,
    (NO_WORKER, MEMORY): _S._to_memory,
    (PROCESSING, MEMORY): _S._to_memory,
    (PROCESSING, WAITING): _S._to_waiting_again,
    (PROCESSING, ERRED): _S._to_erred,
    (PROCESSING, RELEASED): _S._to_released,
    (MEMORY, WAITING): _S._memory_to_waiting,
    (MEMORY, LOST): _S._to_lost,
    (MEMORY, RELEASED): _S._to_released,
    (MEMORY, FORGOTTEN): _S._to_forgotten,
    (ERRED, FORGOTTEN): _S._to_forgotten,
    (LOST, FORGOTTEN): _S._to_forgotten,
    (LOST, MEMORY): _S._to_memory,  # a copy turned up again (re-registration)
}
del _S
