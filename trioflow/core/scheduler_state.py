"""The scheduler's brain: a pure state machine over tasks and workers.

Rules of this module (and of everything in `trioflow.core`):

* Everything that decides what happens to a task lives here: which worker
  runs it, when it is retried, when it is bad, what is recomputed, what is
  forgotten, how long the recovery window stays open, how long an orphan
  is kept. The Trio shell (`trioflow.scheduler`) only turns bytes into
  events and messages into bytes, and sleeps when asked to.
* No I/O, no clock, no randomness, no threads. No event carries a time:
  where a decision waits for time to pass, the core asks the shell to hand
  it an event later (`WakeAfter`; scheduler_events.py). Given the same
  events, the same messages come out.
* Every state change goes through the transition table, but those listed
  in `OUTSIDE_THE_TABLE` (scheduler_transitions.py).
* Iteration is over insertion-ordered dicts, never over sets of strings.

Theory of operation
-------------------
`handle(event)` applies one fact and returns the messages it implies. Each
event has a handler here (`_on_<event>`) that updates what the fact changes
and asks for the task moves it implies; the moves themselves, and the rules
that make one move lead to others, live in `scheduler_transitions.py`: the
`TRANSITIONS` table and `TaskTransitions`, the engine this class owns (its
`transitions`) and hands the records it needs when it is made. So a
stimulus reads top to bottom: `handle(event)` -> `_on_<event>` here ->
`self.transitions.run({key: target})` -> the table's method for each move
-> messages in the event's `Outbox` -> returned by `handle`.

Worker death is the interesting case (design.md §1, spec/README.md
"WorkerDies"): each task that was *running* there is suspected once more
and, past `allowed_failures`, erred with `WorkerDeaths`; the other tasks
assigned there go back to waiting; values whose only copy was there are
recomputed from lineage if needed, or LOST if they were scattered (unless
a live worker is fetching a copy: then they wait for it, `_await_copy`).

After every event, a worker with an idle thread may steal a task that
waits on another (`WorkStealing`, core/stealing.py, this class's
`balancer`); a worker whose memory passed its pause fraction
(`WorkerPaused`) is sent nothing new until it resumes, and its waiting
tasks are the first to be stolen.
"""

from __future__ import annotations

import collections
import operator
from collections.abc import Callable, Iterable

from trioflow.core.durations import TaskDurations, key_prefix
from trioflow.core.failures import Cancelled, DataLost, WorkerDeaths
from trioflow.core.scheduler_events import (
    ClientConnected,
    ClientDisconnected,
    ClusterRestarted,
    DataDropped,
    DataScattered,
    FIRE_AND_FORGET,
    FreeKeys,
    KeysCancelled,
    KeysFiredAndForgotten,
    KeysReleased,
    OrphansExpired,
    RecoveryEnded,
    ReplicaAdded,
    ReplicaMissing,
    ReplicationRequested,
    ReportErred,
    SchedulerEvent,
    SchedulerMessage,
    SchedulerStarted,
    StealAnswered,
    Outbox,
    TaskErred,
    TaskFinished,
    TasksSubmitted,
    TaskStarted,
    WorkerConnected,
    WorkerDisconnected,
    WorkerPaused,
    WakeAfter,
    WorkerResumed,
)
from trioflow.core.scheduler_records import (
    FAILED,
    IN_PROGRESS,
    Orphan,
    SchedulerTask,
    SchedulerWorker,
    task_priority,
)
from trioflow.core.scheduler_transitions import (
    ERRED,
    FORGOTTEN,
    LOST,
    MEMORY,
    NO_WORKER,
    PROCESSING,
    QUEUED,
    RELEASED,
    TRANSITIONS,
    WAITING,
    InvalidTransition,
    Recommendations,
    TaskTransitions,
)
from trioflow.core.stealing import WorkStealing

__all__ = ["TRANSITIONS", "InvalidTransition", "SchedulerState"]

_STATE_OF = operator.attrgetter("state")


class SchedulerState:
    """Tasks, workers and clients, and the rules that move tasks between states.

    Args:
        allowed_failures: worker deaths a running task may witness before it
            is marked bad (`Config.allowed_failures`).
        worker_saturation: tasks per thread sent ahead to a worker before
            root tasks queue here (`Config.worker_saturation`).
        work_stealing: whether idle workers steal waiting tasks from busy
            ones (`Config.work_stealing`; core/stealing.py).
        bandwidth: bytes per second a value is taken to move between
            workers, for the cost of a steal (`Config.bandwidth`).
        recovery_grace_s: how long after `SchedulerStarted` the recovery
            window stays open (`Config.recovery_grace`).
        orphan_timeout_s: how long values nobody claimed after a restart
            are kept (`Config.orphan_timeout`).
        story_length: how many recent transitions to keep in `story`.
    """

    def __init__(
        self,
        *,
        allowed_failures: int = 3,
        worker_saturation: float,
        work_stealing: bool = True,
        bandwidth: float = 100e6,
        recovery_grace_s: float = 2.5,
        orphan_timeout_s: float = 60.0,
        story_length: int = 10_000,
    ):
        self.allowed_failures = allowed_failures
        self.worker_saturation = worker_saturation
        self.recovery_grace_s = recovery_grace_s
        self.orphan_timeout_s = orphan_timeout_s
        self.tasks: dict[str, SchedulerTask] = {}
        self.workers: dict[str, SchedulerWorker] = {}
        # client id -> the keys it holds futures for
        self.clients: dict[str, dict[str, None]] = {}
        # Workers below capacity, in the order they will get root tasks.
        self.idle: dict[str, None] = {}
        # Root tasks waiting for capacity: a heap of (priority, key). Entries
        # whose task left QUEUED are skipped when popped (lazy deletion), so
        # releasing a queued task costs nothing here.
        self.queued: list[tuple[int, str]] = []
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
        # Until RecoveryEnded: re-registered values claimed by one client's
        # resubmitted lineage are judged (kept or released) only once every
        # reconnecting client has resubmitted, since another may hold them.
        self.recovery_open = True
        self.unjudged: dict[str, None] = {}
        # Scattered keys that no worker is known to hold, waiting for one
        # to bring them back: those a client's resubmission made after a
        # scheduler restart, and those whose last holder left while a
        # worker was fetching a copy (`_await_copy`). While the recovery
        # window is open, or while a copy is on its way, they wait,
        # released (a client may reconnect before the workers do; the copy
        # may already be there, its report on the wire); after that they
        # are lost, and a worker that still brings one back is believed:
        # nothing here contradicts it (docs/security.md, "Integrity").
        # Invariant (INV-AWAITED): each has a record without lineage;
        # released only while the window is open or a copy is pending
        # (`replicas_pending`), else lost (a holder takes it out).
        self.awaiting_holders: dict[str, None] = {}
        self._submitted = 0
        # The messages of the event being handled, shared with the two
        # collaborators below so they leave in the order they were decided.
        self.outbox = Outbox()
        # Work stealing (core/stealing.py): how long tasks take, by prefix;
        # the steals asked of victims that have not answered; the workers
        # with a thread to spare and those with tasks waiting for one.
        self.durations = TaskDurations()
        self.balancer = WorkStealing(
            tasks=self.tasks,
            workers=self.workers,
            outbox=self.outbox,
            durations=self.durations,
            enabled=work_stealing,
            bandwidth=bandwidth,
        )
        self.stealing = self.balancer.pending
        self.starving = self.balancer.starving
        self.backlogged = self.balancer.backlogged
        # The rules of a task's life (core/scheduler_transitions.py), over
        # the records above. Invariant: none of the containers handed to it
        # is ever rebound, only changed in place.
        self.transitions = TaskTransitions(
            tasks=self.tasks,
            workers=self.workers,
            clients=self.clients,
            idle=self.idle,
            queued=self.queued,
            unrunnable=self.unrunnable,
            recovering_runs=self.recovering_runs,
            replicated=self.replicated,
            awaiting_holders=self.awaiting_holders,
            # (key, from, to, stimulus_id) of recent transitions, for debugging.
            story=collections.deque(maxlen=story_length),
            outbox=self.outbox,
            balancer=self.balancer,
        )
        self._handlers: dict[type, Callable[[SchedulerEvent], None]] = {
            ClientConnected: self._on_client_connected,
            ClientDisconnected: self._on_client_disconnected,
            TasksSubmitted: self._on_tasks_submitted,
            KeysReleased: self._on_keys_released,
            KeysCancelled: self._on_keys_cancelled,
            DataScattered: self._on_data_scattered,
            SchedulerStarted: self._on_scheduler_started,
            WorkerConnected: self._on_worker_connected,
            WorkerDisconnected: self._on_worker_disconnected,
            TaskStarted: self._on_task_started,
            TaskFinished: self._on_task_finished,
            TaskErred: self._on_task_erred,
            ReplicaAdded: self._on_replica_added,
            ReplicaMissing: self._on_replica_missing,
            DataDropped: self._on_data_dropped,
            ReplicationRequested: self._on_replication_requested,
            KeysFiredAndForgotten: self._on_keys_fired_and_forgotten,
            ClusterRestarted: self._on_cluster_restarted,
            OrphansExpired: self._on_orphans_expired,
            RecoveryEnded: self._on_recovery_ended,
            StealAnswered: self._on_steal_answered,
            WorkerPaused: self._on_worker_paused,
            WorkerResumed: self._on_worker_resumed,
        }

    @property
    def story(self) -> collections.deque[tuple[str, str, str, str]]:
        """(key, from, to, stimulus_id) of the recent transitions, oldest
        first; the transition engine writes it."""
        return self.transitions.story

    @story.setter
    def story(self, log: collections.deque[tuple[str, str, str, str]]) -> None:
        # A watcher may put its own deque in (trioflow/recorder.py).
        self.transitions.story = log

    # ------------------------------------------------------------ entry --

    def handle(self, event: SchedulerEvent) -> list[SchedulerMessage]:
        """Apply one event; return the messages the shell must send, in order."""
        self.outbox.open(event.stimulus_id)
        try:
            self._handlers[type(event)](event)
            if self.transitions.resources_freed:
                self.transitions.resources_freed = False
                self.transitions.run({k: PROCESSING for k in self.unrunnable if self.tasks[k].resources})
            self.transitions.fill_idle_workers()
            self.balancer.balance()
        finally:
            out = self.outbox.close()
        return out

    # ---------------------------------------------------------- queries --

    def who_has(self, keys: Iterable[str] | None = None) -> dict[str, list[str]]:
        keys = self.tasks if keys is None else keys
        return {k: list(self.tasks[k].who_has) if k in self.tasks else [] for k in keys}

    def has_what(self) -> dict[str, list[str]]:
        return {a: list(ws.has_what) for a, ws in self.workers.items()}

    def worker_addresses(self) -> list[str]:
        """The registered workers, in registration order."""
        return list(self.workers)

    def is_registered(self, address: str) -> bool:
        return address in self.workers

    def worker_load(self, address: str) -> tuple[int, int, int] | None:
        """(threads, tasks processing there, values held there) of a
        registered worker; None if it is not registered."""
        ws = self.workers.get(address)
        return None if ws is None else (ws.nthreads, len(ws.processing), len(ws.has_what))

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

    def knows(self, key: str) -> bool:
        """Whether a task record exists for `key`."""
        return key in self.tasks

    def awaits_holder(self, key: str) -> bool:
        """Whether `key` is scattered data a client resubmitted and no
        worker has held since (a worker's claim to hold it contradicts
        nothing this scheduler knows)."""
        return key in self.awaiting_holders

    def in_recovery(self) -> bool:
        """Whether the recovery window is open: what recovering clients send
        is held back until `RecoveryEnded` (see that event)."""
        return self.recovery_open

    def wants(self, client: str, key: str) -> bool:
        """Whether `client` holds a future for `key`."""
        return key in self.clients.get(client, ())

    def assigned_to(self, key: str) -> str | None:
        """The worker `key` is processing on, if any."""
        ts = self.tasks.get(key)
        return None if ts is None else ts.processing_on

    def worker_keys(self, address: str) -> list[str]:
        """The keys a worker holds or is assigned (empty if it is not registered)."""
        ws = self.workers.get(address)
        return [] if ws is None else [*ws.has_what, *ws.processing]

    def claimable_keys(self, address: str) -> set[str]:
        """What a worker may credibly claim to hold when it registers again:
        what it holds or is assigned, and the values it was told to fetch
        (copies asked of it, inputs of its tasks). A fetch can land after
        the worker's connection broke; refusing that copy lost scattered
        data whose other holder left next (seed 137 of the partition mix)."""
        ws = self.workers.get(address)
        if ws is None:
            return set()
        keys = {*ws.has_what, *ws.processing, *ws.replicating}
        for key in ws.processing:
            keys.update(self.tasks[key].dependencies)
        return keys

    def copies(self, keys: Iterable[str]) -> dict[str, int | None]:
        """How many workers hold each key's value (None: not in memory)."""
        out: dict[str, int | None] = {}
        for key in keys:
            ts = self.tasks.get(key)
            out[key] = len(ts.who_has) if ts is not None and ts.state is MEMORY else None
        return out

    def count_by_state(self) -> dict[str, int]:
        # Counted in C (a Counter over a map): a client polling this while
        # the scheduler holds 100,000 tasks costs it a few ms, not tens.
        counts = collections.Counter(map(_STATE_OF, self.tasks.values()))
        return {state.value: n for state, n in counts.items()}

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
                ts.delivered.pop(ev.client, None)
                self.transitions.recommend_release_if_unneeded(ts, recs)
        self.transitions.run(recs)

    def _on_tasks_submitted(self, ev: TasksSubmitted) -> None:
        wanted = self.clients.setdefault(ev.client, {})
        new: list[SchedulerTask] = []
        for spec in ev.tasks:
            if spec.key in self.tasks:
                continue  # same key, same lineage: the existing record serves
            self._submitted += 1
            ts = SchedulerTask(
                spec.key,
                spec.run_spec,
                priority=task_priority(spec.priority, self._submitted),
                retries=spec.retries,
                restrictions=spec.workers,
                loose=spec.loose and spec.workers is not None,
                resources=dict(spec.resources) if spec.resources else None,
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
                ts.own("dependencies")[dep_key] = dep
                dep.own("dependents")[ts.key] = ts
        for ts in new:
            orphan = self.orphans.pop(ts.key, None)
            if orphan is not None:
                self._claim_orphan(ts, orphan)
        for key in ev.wanted:
            ts = self.tasks.get(key)
            if ts is None:
                continue
            ts.own("who_wants")[ev.client] = None
            # The task's own key string: the one decoded from `wanted` is a
            # second copy of it (90 bytes a task for nothing).
            wanted[ts.key] = None
            if ts.state is MEMORY:
                self.transitions.report_finished(ev.client, ts)
            elif ts.state in FAILED:
                self.transitions.report_failure(ev.client, ts)
        # One task at a time, in submission order, each with its knock-on
        # effects, so that earlier work is placed first.
        adopted: list[SchedulerTask] = []
        for ts in new:
            if ts.key not in self.tasks:
                continue  # forgotten meanwhile
            if ts.state is MEMORY:  # took an orphaned value above
                adopted.append(ts)
            elif ts.failure is not None:
                self.transitions.run({ts.key: ERRED})
            elif not ts.has_lineage:
                # Scattered data resubmitted after a scheduler restart that
                # no surviving worker has brought back: it cannot be
                # recomputed. A worker may still bring it while the recovery
                # window is open (whoever reconnects first); then it is lost.
                self.awaiting_holders[ts.key] = None
                if not self.recovery_open:
                    self.transitions.run({ts.key: LOST})
            elif self.transitions.is_needed(ts):
                self.transitions.run({ts.key: WAITING})
            elif ts.state is RELEASED and not ts.dependents:
                # Submitted, never wanted, needed by nothing: nothing to do.
                self.transitions.run({ts.key: FORGOTTEN})
        # Known keys kept only as lineage (released) that are wanted again.
        for key in ev.wanted:
            ts = self.tasks.get(key)
            if ts is not None and ts.state is RELEASED and ts.has_lineage:
                self.transitions.run({key: WAITING})
        # A value taken from an orphan may be an input of a task submitted
        # after it in this same batch, or, while the recovery is open, of
        # another client's resubmission still to come: judge whether it is
        # needed only then.
        for ts in adopted:
            if self.recovery_open:
                self.unjudged[ts.key] = None
            else:
                self._judge_adopted(ts.key)

    def _judge_adopted(self, key: str) -> None:
        ts = self.tasks.get(key)
        if ts is not None and ts.state is MEMORY:
            recs: Recommendations = {}
            self.transitions.recommend_release_if_unneeded(ts, recs)
            self.transitions.run(recs)

    def _on_recovery_ended(self, ev: RecoveryEnded) -> None:
        self.recovery_open = False
        # Resubmitted scattered data no worker brought back in time is lost
        # (and what needs it errs) before the values brought back are
        # judged: an input of an erred task is not needed any more.
        self.transitions.run(
            {
                key: LOST
                for key in self.awaiting_holders
                if self.tasks[key].state is RELEASED and not self.tasks[key].replicas_pending
            }
        )
        unjudged = list(self.unjudged)
        self.unjudged.clear()
        for key in unjudged:
            self._judge_adopted(key)

    def _on_keys_released(self, ev: KeysReleased) -> None:
        wanted = self.clients.get(ev.client, {})
        recs: Recommendations = {}
        for key in ev.keys:
            wanted.pop(key, None)
            ts = self.tasks.get(key)
            if ts is not None and ev.client in ts.who_wants:
                del ts.who_wants[ev.client]
                ts.delivered.pop(ev.client, None)
                self.transitions.recommend_release_if_unneeded(ts, recs)
        self.transitions.run(recs)

    def _on_keys_cancelled(self, ev: KeysCancelled) -> None:
        """The client gives up `keys` and every dependent of them it holds.

        Other clients' futures are untouched: a key another client still
        wants keeps running, and so does everything it needs.
        """
        wanted = self.clients.get(ev.client, {})
        recs: Recommendations = {}
        seen: dict[str, None] = {}
        failure = Cancelled(ev.reason)  # one record for every key of the event
        stack = [self.tasks[k] for k in ev.keys if k in self.tasks]
        while stack:
            ts = stack.pop()
            if ts.key in seen:
                continue
            seen[ts.key] = None
            stack.extend(ts.dependents.values())
            if ev.client in ts.who_wants:
                del ts.who_wants[ev.client]
                ts.delivered.pop(ev.client, None)
                wanted.pop(ts.key, None)
                self.outbox.emit(ReportErred(self.outbox.stimulus_id, ev.client, ts.key, failure, ts.key))
                self.transitions.recommend_release_if_unneeded(ts, recs)
        self.transitions.run(recs)

    def _on_data_scattered(self, ev: DataScattered) -> None:
        wanted = self.clients.setdefault(ev.client, {})
        for key, (nbytes, holders) in ev.placed.items():
            live = [self.workers[a] for a in holders if a in self.workers]
            ts = self.tasks.get(key)
            if ts is None:
                self._submitted += 1
                ts = self.tasks[key] = SchedulerTask(key, None, priority=task_priority(0, self._submitted))
            ts.own("who_wants")[ev.client] = None
            wanted[key] = None
            if ts.state is MEMORY:
                for ws in live:
                    self.transitions.add_replica(ts, ws)
                self.transitions.report_finished(ev.client, ts)
            elif ts.state is RELEASED and live and key not in self.awaiting_holders:
                # New (or only lineage): the scattered value is its value.
                self.transitions.adopt_value(ts, nbytes, live)
                for client in ts.who_wants:
                    self.transitions.report_finished(client, ts)
            elif ts.state in (RELEASED, LOST) and live:
                # Lost data placed again, or resubmitted data nobody had
                # brought back yet: everyone who holds it hears it is back,
                # and what waits on it runs.
                self.transitions.run({}, first=(ts, MEMORY, {"worker": live[0], "nbytes": nbytes}))
                for ws in live[1:]:
                    self.transitions.add_replica(ts, ws)
            elif ts.state is RELEASED and ts.replicas_pending:
                # Every worker it was placed on died before we heard of it,
                # but it awaits a copy on its way (`_await_copy`): its
                # arrival, or its failure, is reported to every holder.
                pass
            elif ts.state is RELEASED or ts.state is LOST:
                # Every worker it was placed on died before we heard of it.
                if ts.state is RELEASED:
                    self.transitions.run({key: LOST})
                else:
                    self.transitions.report_failure(ev.client, ts)
            else:
                # The key is already being computed; keep that, drop the copies.
                for ws in live:
                    self.outbox.emit(FreeKeys(self.outbox.stimulus_id, ws.address, (key,)))

    # -------------------------------------------------- worker events --

    def _on_scheduler_started(self, ev: SchedulerStarted) -> None:
        """The recovery window opens (it is open from the start) and closes
        `recovery_grace_s` from now: workers that survived a scheduler
        restart re-register first, and the lineage clients resubmit then
        finds their values."""
        self.outbox.emit(
            WakeAfter(ev.stimulus_id, self.recovery_grace_s, RecoveryEnded(f"recovery-ended-after-{ev.stimulus_id}"))
        )

    def _on_worker_connected(self, ev: WorkerConnected) -> None:
        held, running = ev.held, ev.running
        if ev.worker in self.workers:
            # A new connection from an address we still think is alive: the
            # old incarnation is gone.
            self._remove_worker(ev.worker, expected=False)
        ws = SchedulerWorker(ev.worker, ev.nthreads, self.worker_saturation, dict(ev.resources))
        self.workers[ev.worker] = ws
        self.idle[ev.worker] = None
        self.balancer.refresh(ws)
        # Every value the worker brings is taken first; only then do their
        # knock-on effects run (one of them may be what made another
        # needed).
        recs: Recommendations = {}
        for key, nbytes in held.items():
            ts = self.tasks.get(key)
            if ts is None:
                orphan = self.orphans.setdefault(key, Orphan())
                orphan.holders[ev.worker] = None
                orphan.nbytes = nbytes
            elif ts.state is MEMORY:
                self.transitions.add_replica(ts, ws)
            elif ts.state in IN_PROGRESS or ts.state is LOST or key in self.awaiting_holders:
                # The value we were waiting for already exists: take it.
                self.transitions.move(ts, MEMORY, recs, worker=ws, nbytes=nbytes)
            else:
                self.outbox.emit(FreeKeys(self.outbox.stimulus_id, ev.worker, (key,)))
        self.transitions.run(recs)
        for key in running:
            ts = self.tasks.get(key)
            if ts is None:
                self.orphans.setdefault(key, Orphan()).running_on = ev.worker
            elif ts.state in (WAITING, QUEUED, NO_WORKER):
                self.recovering_runs[key] = ev.worker
        recs: Recommendations = {}
        for key in self.unrunnable:
            # Tried again: the newcomer may be allowed, have the resources,
            # or be the first live worker a loose task may fall back on.
            recs[key] = PROCESSING
        for key in running:
            ts = self.tasks.get(key)
            if ts is not None and ts.state is QUEUED:
                recs[key] = PROCESSING
        self.transitions.run(recs)
        for key in self.replicated:
            self.transitions.replicate(self.tasks[key])
        # What it brought that nobody has claimed is kept for a while, for
        # a client that will resubmit its lineage.
        orphans = tuple(key for key in (*held, *running) if key in self.orphans)
        if orphans:
            expired = OrphansExpired(f"orphans-expired-after-{ev.stimulus_id}", orphans)
            self.outbox.emit(WakeAfter(ev.stimulus_id, self.orphan_timeout_s, expired))

    def _on_worker_disconnected(self, ev: WorkerDisconnected) -> None:
        if ev.worker not in self.workers:
            return  # already removed (a close after a missed heartbeat)
        self._remove_worker(ev.worker, ev.expected)

    def _remove_worker(self, address: str, expected: bool) -> None:
        """Take a worker out: reroute its work, recompute or lose its data."""
        ws = self.workers.pop(address)
        self.idle.pop(address, None)
        self.starving.pop(address, None)
        self.backlogged.pop(address, None)
        self.balancer.thief_left(ws)
        recs: Recommendations = {}
        for key in ws.replicating:
            ts = self.tasks[key]
            del ts.replicas_pending[address]
            self.transitions.copy_not_coming(ts, recs)  # it was the copy data awaited
        self._forget_worker_orphans(address)
        # First the data: drop this replica everywhere. Values with no copy
        # left are recommended first, so that by the time the rescheduled
        # tasks below look at their dependencies, those are no longer MEMORY.
        for key in ws.has_what:
            ts = self.tasks[key]
            del ts.who_has[address]
            if not ts.who_has:
                recs[key] = self.transitions.target_for_lost_value(ts)
        # Then the work: every task assigned there is detached. A task that
        # was *running* when the worker died is suspected of killing it.
        for key in ws.processing:
            ts = self.tasks[key]
            was_running, ts.running, ts.processing_on = ts.running, False, None
            if was_running and not expected:
                ts.suspicious += 1
                ts.last_worker = address
                if ts.suspicious >= self.allowed_failures:
                    # spec: INV-KILLED. Marked on the allowed_failures-th
                    # death; it never runs again.
                    ts.failure = WorkerDeaths(key, ts.suspicious, address)
                    ts.failure_origin = key
                    recs[key] = ERRED
                    continue
            recs.setdefault(key, WAITING)
        self.transitions.run(recs)
        # Copies a client asked for are restored on the survivors.
        for key in (*ws.has_what, *ws.replicating):
            ts = self.tasks.get(key)
            if ts is not None and key in self.replicated:
                self.transitions.replicate(ts)
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
        if ev.duration is not None:
            # Any run that really happened says how long such tasks take.
            self.durations.observe(ts.prefix if ts is not None else key_prefix(ev.key), ev.duration)
        if ts is None:
            orphan = self.orphans.get(ev.key)
            if orphan is not None and orphan.running_on == ev.worker:
                # A run that outlived the old scheduler: keep its value for
                # the client that will resubmit it.
                orphan.running_on = None
                orphan.holders[ev.worker] = None
                orphan.nbytes = ev.nbytes
            else:
                self.outbox.emit(FreeKeys(self.outbox.stimulus_id, ev.worker, (ev.key,)))
        elif ts.state is MEMORY:
            if ev.worker not in ts.who_has:
                # A second run of a task whose value already came from
                # another worker (it had been rerouted; both runs ended).
                # That first result cancelled this run with a FreeKeys
                # which may be crossing this message on the wire, so the
                # worker may be dropping its value right now: do not count
                # it as a copy, free it (again). Found by seed 2 of the
                # chaos lab (tests/sim/test_regressions.py).
                self.outbox.emit(FreeKeys(self.outbox.stimulus_id, ev.worker, (ev.key,)))
        elif ts.state is PROCESSING and ts.processing_on == ev.worker:
            self.transitions.run({}, first=(ts, MEMORY, {"worker": ws, "nbytes": ev.nbytes, "inline": ev.inline}))
        elif ts.state in IN_PROGRESS:
            # spec: a result counts only from the worker the task is
            # processing on. This one comes from a run the task was taken
            # from (rerouted, released and resubmitted) or from a worker
            # that was never asked: its value is not taken, and the worker
            # is told to drop it. (Taking it would save a computation, but
            # would let any worker put a value of its choosing in front of
            # the clients that wait for this key.)
            self.outbox.emit(FreeKeys(self.outbox.stimulus_id, ev.worker, (ev.key,)))
        else:
            # Nobody needs this value any more (released, erred).
            self.outbox.emit(FreeKeys(self.outbox.stimulus_id, ev.worker, (ev.key,)))

    def _on_steal_answered(self, ev: StealAnswered) -> None:
        move = self.balancer.answer(ev)
        if move is not None:
            self.transitions.run({}, first=move)

    def steal_pending(self, key: str, steal_id: int, victim: str) -> bool:
        """Whether `victim`'s answer with `steal_id` is about the steal of `key`
        still pending (the shell asks, to know whether the victim's copy of
        the task is gone)."""
        return self.balancer.steal_pending(key, steal_id, victim)

    def _on_worker_paused(self, ev: WorkerPaused) -> None:
        """Its memory is high: nothing new goes there (placement, the queue,
        steals) until it resumes. What it has stays: its running tasks go on,
        and those waiting there are the first a starving worker steals."""
        ws = self.workers.get(ev.worker)
        if ws is None or ws.paused:
            return
        ws.paused = True
        self.idle.pop(ev.worker, None)
        self.balancer.refresh(ws)

    def _on_worker_resumed(self, ev: WorkerResumed) -> None:
        ws = self.workers.get(ev.worker)
        if ws is None or not ws.paused:
            return
        ws.paused = False
        if ws.hungry:
            self.idle[ev.worker] = None
        self.balancer.refresh(ws)
        # Tasks that waited for a worker that is not paused may go now.
        self.transitions.run({key: PROCESSING for key in self.unrunnable})

    def _on_task_erred(self, ev: TaskErred) -> None:
        ts = self.tasks.get(ev.key)
        if ts is None or ts.state is not PROCESSING or ts.processing_on != ev.worker:
            return  # stale: the task was rerouted or released meanwhile
        if ts.retries_left > 0:
            ts.retries_left -= 1
            self.transitions.run({ts.key: WAITING})
            return
        ts.failure, ts.failure_origin = ev.failure, ts.key
        self.transitions.run({ts.key: ERRED})

    def _on_replica_added(self, ev: ReplicaAdded) -> None:
        ts = self.tasks.get(ev.key)
        ws = self.workers.get(ev.worker)
        if ws is None:
            return
        if ts is not None and ts.state is MEMORY:
            self.transitions.add_replica(ts, ws)
        elif ts is not None and ts.state is RELEASED and ev.worker in ts.replicas_pending:
            # The copy that data whose last holder left was waiting for
            # (`_await_copy`): back in memory, and what waits on it runs.
            self.transitions.run({}, first=(ts, MEMORY, {"worker": ws, "nbytes": ev.nbytes}))
        elif ts is not None and ts.processing_on == ev.worker:
            # A copy fetched before the task was assigned there: the worker
            # answers the assignment with TaskFinished, which counts it. A
            # free now would cross that answer (seed 5 of the chaos lab).
            pass
        else:
            self.outbox.emit(FreeKeys(self.outbox.stimulus_id, ev.worker, (ev.key,)))

    def _on_replica_missing(self, ev: ReplicaMissing) -> None:
        """A worker could not fetch `key` from any holder it was given, or
        dropped a fetch it had not begun (no holder named, no dependent).

        The holders it names answered that they do not have the value, so
        they stop counting as holders. A holder the worker tried but that did
        not answer (hung, unreachable) is not named: that is no proof that it
        lacks the value, and its liveness is judged here (`worker_ttl`), so
        it stays a holder (seeds 75 and 439 of the chaos lab's hang mix).
        The dependent goes back to waiting and is sent again with fresh
        holders, or after the value is recomputed.
        A worker asked for a copy stops being a pending copy: data that
        awaited that copy (`_await_copy`) is lost if no other is coming.
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
                    self.outbox.emit(FreeKeys(self.outbox.stimulus_id, address, (ts.key,)))
            if not ts.who_has:
                recs[ts.key] = self.transitions.target_for_lost_value(ts)
        dependent = self.tasks.get(ev.dependent) if ev.dependent else None
        if dependent is not None and dependent.processing_on == ev.worker:
            recs.setdefault(dependent.key, WAITING)
        if ts is not None and ev.worker in ts.replicas_pending:
            del ts.replicas_pending[ev.worker]
            del self.workers[ev.worker].replicating[ts.key]
            self.transitions.copy_not_coming(ts, recs)  # it was the copy data awaited
        self.transitions.run(recs)
        if ts is not None and ts.key in self.replicated and ts.key in self.tasks:
            self.transitions.replicate(ts)

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
                recs[key] = self.transitions.target_for_lost_value(ts)
            elif key in self.replicated:
                self.transitions.replicate(ts)
        self.transitions.run(recs)

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
            self.transitions.replicate(ts)

    def _on_cluster_restarted(self, ev: ClusterRestarted) -> None:
        """Flush every task: each held future hears that it was cancelled.

        Workers stay registered until they disconnect (the shell restarts
        them); they are emptied here, so nothing is rerouted to them.
        """
        failure = Cancelled(ev.reason)
        for key, ts in self.tasks.items():
            for client in ts.who_wants:
                self.outbox.emit(ReportErred(self.outbox.stimulus_id, client, key, failure, key))
            self.story.append((key, ts.state.value, FORGOTTEN.value, self.outbox.stimulus_id))
        self.tasks.clear()
        for wanted in self.clients.values():
            wanted.clear()
        self.stealing.clear()
        for ws in self.workers.values():
            ws.processing.clear()
            ws.has_what.clear()
            ws.replicating.clear()
            ws.used.clear()
            ws.prefixes.clear()
            ws.incoming.clear()
            self.balancer.refresh(ws)
        self.idle.clear()
        self.idle.update((address, None) for address, ws in self.workers.items() if not ws.paused)
        self.queued.clear()
        self.unrunnable.clear()
        self.replicated.clear()
        for key, orphan in self.orphans.items():
            for address in orphan.holders:
                self.outbox.emit(FreeKeys(self.outbox.stimulus_id, address, (key,)))
        self.orphans.clear()
        self.recovering_runs.clear()
        self.unjudged.clear()
        self.awaiting_holders.clear()

    def _on_keys_fired_and_forgotten(self, ev: KeysFiredAndForgotten) -> None:
        """The pseudo-client FIRE_AND_FORGET holds each key still in progress
        (of those `ev.client` holds) until it has a value or a failure
        (`_release_fired`): the task runs even if every client lets go."""
        held = self.clients.get(ev.client, {})
        fired = self.clients.setdefault(FIRE_AND_FORGET, {})
        recs: Recommendations = {}
        for key in ev.keys:
            ts = self.tasks.get(key)
            if key in held and ts is not None and ts.state in IN_PROGRESS | {RELEASED}:
                ts.own("who_wants")[FIRE_AND_FORGET] = None
                fired[key] = None
                if ts.state is RELEASED and ts.has_lineage:
                    # Its client had the value (a small one), but the
                    # pseudo-client has not: it is computed again. (Data
                    # awaiting a copy is held until the copy comes or not.)
                    recs[key] = WAITING
        self.transitions.run(recs)

    def _on_orphans_expired(self, ev: OrphansExpired) -> None:
        for key in ev.keys:
            orphan = self.orphans.pop(key, None)
            if orphan is None:
                continue
            for address in orphan.holders:
                self.outbox.emit(FreeKeys(self.outbox.stimulus_id, address, (key,)))

    def _claim_orphan(self, ts: SchedulerTask, orphan: Orphan) -> None:
        """A resubmitted task takes what workers said they hold or run for it."""
        if orphan.holders:
            self.transitions.adopt_value(ts, orphan.nbytes, [self.workers[a] for a in orphan.holders])
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
