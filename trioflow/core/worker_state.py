"""A worker's brain: which tasks run, which inputs to fetch, what to drop.

Rules of this module:

* Everything that decides what happens to a task on this worker lives
  here. The Trio shell (`trioflow.worker`) runs functions, talks to peers
  and the scheduler, and keeps the values; it turns what happened into
  events and carries out the instructions that come back.
* No I/O, no clock, no randomness, no threads: the machine needs no time
  at all (timeouts on peers are the shell's; a peer that does not answer
  in time arrives as `GatherFailed`). Its identity (its own address) is
  given once, at construction. Given the same events, the same
  instructions come out, each carrying the `stimulus_id` of the event
  that caused it, so that a task's story can be rebuilt from a log.
* Every change of a task's state goes through `_move`, which checks it
  against `TRANSITIONS` (worker_transitions.py); every event that leaves a
  task as it is goes through `_unchanged`, which checks it against
  `UNCHANGED`. Anything else raises `InvalidWorkerTransition`.
* Iteration is over insertion-ordered dicts, never over sets of strings.
* The values themselves live in the shell's data store: this machine only
  tracks keys and sizes.

The formal model of this machine is `spec/worker_model.py`;
tests/properties/test_worker_conformance.py runs the two side by side.

Theory of operation
-------------------
The scheduler sends `ComputeRequested` with, for each input, the workers
that hold it. Inputs held here are used at once; the others become FETCH
records, and `_ensure_gathering` bundles them into one `Gather` per peer
(at most one in flight per peer, `max_gathers` peers at a time). A task
whose inputs are all here is READY; `_ensure_executing` starts the best
READY tasks while threads are free.

Two situations make this more than a queue:

* The scheduler may release a task while its thread runs. A thread cannot
  be interrupted, so the task becomes CANCELLED: if the scheduler asks for
  it again it goes back to EXECUTING (it never runs twice at once);
  otherwise its result is dropped when the thread ends.
* A fetch can fail (the holder died or no longer has the value). The next
  holder is tried; when none is left the worker reports the input missing
  and forgets the task that needed it. The report names only the holders
  that *answered* without the value: one that did not answer (hung,
  unreachable) is no proof that it lacks it, and the scheduler judges its
  liveness itself (`worker_ttl`). The scheduler, which knows more, decides
  what happens next.

Values stay until the scheduler frees them: the scheduler's `who_has` is the
single account of where data lives, so a fetched copy is reported
(`SendReplicaAdded`) and then kept until `FreeRequested`.

Two more requests change what runs here:

* A steal (`StealRequested`): the scheduler would give a task assigned
  here to an idle worker. This worker gives it up only if it has not
  started it (it waits for inputs, or is ready): then it forgets it and
  answers so; otherwise it keeps it and answers that. The scheduler moves
  the task only on a "given up", so a task never runs here and there.
* A pause (`MemoryPaused`, from the shell's memory manager): while the
  process's memory is past its pause fraction, no new task starts and no
  new fetch goes out (both would add to the memory); running threads go on,
  and rejoining ones get their slots. `MemoryResumed` lifts it.

A task that waits on other tasks (a task that submits tasks, through
`trioflow.worker_client`) can give its thread slot back: `TaskSeceded`
moves it from `executing` (the slots, at most `nthreads`) to `seceded`,
and another ready task starts. Its thread still runs; the task is still
EXECUTING (or CANCELLED). When it wants a slot again (`TaskRejoining`) it
queues, and the next free slot goes to it before any ready task (`Rejoin`).
Without this, a one-thread worker whose task waits for another task it
submitted would wait forever.

Crossed messages are the normal case, not the exception: the scheduler
frees a key while this worker's report on it is on the wire, a peer's
answer lands after the key was forgotten, a steal asks for a task that
just finished. Each such case is a row of `UNCHANGED` with its reason.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any, NoReturn

from trioflow.core.worker_events import (
    ComputeRequested,
    DataPut,
    DropData,
    Execute,
    ExecutionFailed,
    ExecutionSucceeded,
    FreeRequested,
    Gather,
    GatherFailed,
    GatherSucceeded,
    MemoryPaused,
    MemoryResumed,
    Rejoin,
    ReplicasRequested,
    SchedulerLost,
    SendDataDropped,
    SendStealAnswer,
    SendReplicaAdded,
    SendReplicaMissing,
    SendTaskErred,
    SendTaskFinished,
    SendTaskStarted,
    StealRequested,
    TaskRejoining,
    TaskSeceded,
    WorkerEvent,
    WorkerInstruction,
)
from trioflow.core.worker_transitions import (
    CANCELLED,
    COMPUTE,
    EXECUTING,
    EXECUTION_DONE,
    FETCH,
    FLIGHT,
    FREE,
    GATHER_DONE,
    GATHER_FAILED,
    HOPELESS,
    INPUTS_HERE,
    MEMORY,
    PEER_FREE,
    PUT,
    READY,
    REPLICAS,
    SCHEDULER_LOST,
    STEAL,
    THREAD_FREE,
    TRANSITIONS,
    UNCHANGED,
    UNNEEDED,
    WAITING,
    InvalidWorkerTransition,
    TaskEvent,
    WorkerTaskState,
)

# The table and its vocabulary, for readers (and the doc generator) that
# start from this module.
__all__ = [
    "TRANSITIONS",
    "UNCHANGED",
    "InvalidWorkerTransition",
    "TaskEvent",
    "WorkerState",
    "WorkerTask",
    "WorkerTaskState",
]


class WorkerTask:
    """What this worker knows about one key: a task to run, or a value to hold or fetch."""

    __slots__ = (
        "key",
        "state",
        "run_spec",
        "priority",
        "assigned",
        "dependencies",
        "dependents",
        "waiting_on",
        "holders",
        "tried",
        "nbytes",
        "freed",
        "compute_request",
    )

    def __init__(self, key: str, state: WorkerTaskState):
        self.key = key
        # Changed only by `WorkerState._move`, which checks the table.
        self.state = state
        self.run_spec: Any = None
        self.priority: tuple[int, ...] = ()
        # True if the scheduler asked this worker to compute the key (as
        # opposed to fetching or holding it for someone else).
        self.assigned = False
        self.dependencies: dict[str, WorkerTask] = {}
        # Invariant: the assigned tasks here (not yet finished) that need us.
        self.dependents: dict[str, WorkerTask] = {}
        # Invariant: for WAITING tasks, the inputs not yet in MEMORY.
        self.waiting_on: dict[str, None] = {}
        # Peers said to hold the value (FETCH/FLIGHT), and those that failed:
        # True if that peer answered that it does not have the value, False
        # if it did not answer (connection refused, broke or timed out).
        self.holders: dict[str, None] = {}
        self.tried: dict[str, bool] = {}
        self.nbytes = 0
        # The scheduler freed this key while local work still needed it:
        # forget it as soon as that work is done.
        self.freed = False
        # A FLIGHT value the scheduler also asked us to compute: if the
        # fetch fails, this request starts the computation.
        self.compute_request: ComputeRequested | None = None

    def __repr__(self) -> str:
        return f"<WorkerTask {self.key!r} {self.state.value}>"


class WorkerState:
    """The tasks and data of one worker.

    Args:
        address: this worker's own address (never fetch from ourselves).
        nthreads: how many functions may run at once.
        max_gathers: how many peers may be fetched from at once.
    """

    def __init__(self, address: str, nthreads: int, *, max_gathers: int = 4):
        self.address = address
        self.nthreads = nthreads
        self.max_gathers = max_gathers
        self.tasks: dict[str, WorkerTask] = {}
        # Invariant: at most nthreads entries; EXECUTING or CANCELLED tasks
        # holding a thread slot.
        self.executing: dict[str, None] = {}
        # EXECUTING or CANCELLED tasks whose thread gave its slot back
        # (secede), and those of them waiting for a slot again (rejoin), in
        # the order they asked. Invariant: disjoint from `executing`.
        self.seceded: dict[str, None] = {}
        self.rejoining: dict[str, None] = {}
        # READY tasks by priority. Lazily pruned: an entry whose task left
        # READY (freed, stolen) stays until popped and is skipped then, so
        # leaving READY costs nothing here.
        self.ready: list[tuple[tuple[int, ...], str]] = []
        self.fetch: dict[str, None] = {}  # FETCH tasks, oldest first
        self.in_flight: dict[str, tuple[str, ...]] = {}  # peer -> keys requested
        # The memory manager paused this worker: nothing new starts.
        self.paused = False
        self._stimulus_id = ""
        self._out: list[WorkerInstruction] = []
        self._handlers: dict[type, Callable[[Any], None]] = {
            ComputeRequested: self._on_compute,
            FreeRequested: self._on_free,
            ReplicasRequested: self._on_replicas,
            DataPut: self._on_data_put,
            ExecutionSucceeded: self._on_execution_succeeded,
            ExecutionFailed: self._on_execution_failed,
            GatherSucceeded: self._on_gather_succeeded,
            GatherFailed: self._on_gather_failed,
            SchedulerLost: self._on_scheduler_lost,
            TaskSeceded: self._on_seceded,
            TaskRejoining: self._on_rejoining,
            StealRequested: self._on_steal_requested,
            MemoryPaused: self._on_memory_paused,
            MemoryResumed: self._on_memory_resumed,
        }

    def handle(self, event: WorkerEvent) -> list[WorkerInstruction]:
        """Apply one event; return what the shell must do, in order.

        Raises:
            InvalidWorkerTransition: the event, in the state the worker is
                in, calls for a move no row of the table allows (a bug).
        """
        self._stimulus_id = event.stimulus_id
        try:
            self._handlers[type(event)](event)
            # Whatever the event, a free thread or an idle peer may now have
            # work (the model's `_settle`, done after every event too).
            self._ensure_executing()
            self._ensure_gathering()
        finally:
            out, self._out = self._out, []
        return out

    # ---------------------------------------------------------- queries --

    def memory(self) -> dict[str, int]:
        """``{key: nbytes}`` of every value held here."""
        # A freed value is no longer ours to offer: it stays only until the
        # local work that needs it is done.
        return {k: ts.nbytes for k, ts in self.tasks.items() if ts.state is MEMORY and not ts.freed}

    def running(self) -> list[str]:
        """Keys whose functions are running here for the scheduler."""
        return [k for k in (*self.executing, *self.seceded) if self.tasks[k].state is EXECUTING]

    def awaits_from_peer(self, key: str) -> bool:
        """True if a request for `key`'s value is out to a peer and still wanted.

        The shell stores a value a peer sent only then: a late answer for a
        key forgotten, put here or asked of another peer since is dropped.
        """
        ts = self.tasks.get(key)
        return ts is not None and ts.state is FLIGHT

    # ------------------------------------------- the one place states change --

    def _move(self, ts: WorkerTask, event: TaskEvent, target: WorkerTaskState) -> None:
        """Move `ts` to `target` because of `event`, if the table allows it."""
        if target not in TRANSITIONS.get((ts.state, event), ()):
            self._refuse(ts.key, ts.state, event, target)
        ts.state = target

    def _new(self, key: str, event: TaskEvent, state: WorkerTaskState) -> WorkerTask:
        """Create the record of `key` in `state`: the move from `None`."""
        if state not in TRANSITIONS.get((None, event), ()):
            self._refuse(key, None, event, state)
        ts = self.tasks[key] = WorkerTask(key, state)
        return ts

    def _forget(self, ts: WorkerTask, event: TaskEvent) -> None:
        """Drop `ts` (and its value, if any): the move to `None`."""
        if None not in TRANSITIONS.get((ts.state, event), ()):
            self._refuse(ts.key, ts.state, event, None)
        if ts.state in (MEMORY, CANCELLED):
            # A CANCELLED task is forgotten only once its thread ended, so
            # its value may be in the store (the shell stored the result).
            self._emit(DropData(self._stimulus_id, (ts.key,)))
        self._release_inputs(ts)
        self.fetch.pop(ts.key, None)
        del self.tasks[ts.key]

    def _unchanged(self, key: str, event: TaskEvent) -> None:
        """`event` leaves `key` as it is (or absent): only where UNCHANGED says why."""
        ts = self.tasks.get(key)
        state = None if ts is None else ts.state
        if (state, event) not in UNCHANGED:
            self._refuse(key, state, event, state)

    def _refuse(self, key: str, state, event: TaskEvent, target) -> NoReturn:
        """Raise `InvalidWorkerTransition`: no row allows `state` --`event`--> `target`."""

        def name(s):
            return "absent" if s is None else s.value

        raise InvalidWorkerTransition(
            f"{key!r}: no rule for {name(state)} --{event.value}--> {name(target)} "
            f"(stimulus {self._stimulus_id!r})"
        )

    # ----------------------------------------------------------- events --

    def _on_compute(self, ev: ComputeRequested) -> None:
        ts = self.tasks.get(ev.key)
        if ts is not None:
            ts.freed = False  # assigned here again: the scheduler counts it
        if ts is None:
            ts = self._new(ev.key, COMPUTE, WAITING)
        elif ts.state is CANCELLED:
            # Released while its thread ran, wanted again: that thread's
            # result will be reported. Never start a second run.
            ts.assigned = True
            self._move(ts, COMPUTE, EXECUTING)
            return
        elif ts.state is FETCH:
            # A copy was wanted but not yet asked for: compute it instead.
            del self.fetch[ts.key]
            ts.holders.clear()
            ts.tried.clear()
            self._move(ts, COMPUTE, WAITING)
        else:
            # WAITING, READY, EXECUTING (a repeat), MEMORY (done) or FLIGHT
            # (on its way): the state stays; see UNCHANGED.
            self._unchanged(ts.key, COMPUTE)
            ts.assigned = True
            if ts.state is MEMORY:
                self._emit(SendTaskFinished(self._stimulus_id, ts.key, ts.nbytes))
            elif ts.state is FLIGHT:
                # Report it when it lands, or compute it if that fetch fails.
                ts.compute_request = ev
            return
        self._start_compute(ts, ev)

    def _start_compute(self, ts: WorkerTask, ev: ComputeRequested) -> None:
        """Set `ts` (WAITING, no inputs linked yet) up to run here."""
        ts.assigned, ts.run_spec, ts.priority = True, ev.run_spec, ev.priority
        fetching: list[WorkerTask] = []
        for dep_key, holders in ev.who_has.items():
            dep = self.tasks.get(dep_key)
            if dep is None:
                dep = self._new(dep_key, COMPUTE, FETCH)
                dep.nbytes = ev.nbytes.get(dep_key, 0)
                dep.priority = ev.priority
                self.fetch[dep_key] = None
            ts.dependencies[dep_key] = dep
            dep.dependents[ts.key] = ts
            if dep.state is not MEMORY:
                ts.waiting_on[dep_key] = None
            if dep.state in (FETCH, FLIGHT):
                # Holders we already tried stay tried: a peer that failed
                # us is not asked again for the same value.
                for peer in holders:
                    if peer != self.address and peer not in dep.tried:
                        dep.holders[peer] = None
                fetching.append(dep)
            elif dep.state is CANCELLED:
                # Released while its function runs here: if that run
                # succeeds its value serves `ts`; if it fails, the value is
                # fetched from these holders instead (seed 21 of the chaos lab).
                for peer in holders:
                    if peer != self.address:
                        dep.holders[peer] = None
        # Only now, with every link in place, give up on inputs nobody can
        # provide (that forgets `ts` and reports each missing input).
        for dep in fetching:
            if dep.state is FETCH and ts.key in self.tasks:
                self._fail_fetch_if_hopeless(dep)
        if ts.key in self.tasks and not ts.waiting_on:
            self._make_ready(ts)

    def _on_free(self, ev: FreeRequested) -> None:
        dropped: list[str] = []
        for key in ev.keys:
            ts = self.tasks.get(key)
            if ts is None:
                self._unchanged(key, FREE)
                continue
            ts.assigned = False
            ts.compute_request = None  # withdrawn: never acted upon later
            held = ts.state is MEMORY
            if ts.state is EXECUTING:
                self._move(ts, FREE, CANCELLED)
            elif ts.state is CANCELLED or ts.dependents:
                # CANCELLED: released already. Otherwise still an input of
                # work assigned here (the free crossed that assignment on
                # the wire): keep it until that work is done.
                self._unchanged(key, FREE)
                if ts.state is not CANCELLED:
                    ts.freed = True
            else:
                self._forget(ts, FREE)
            if held and key not in ev.heard:
                dropped.append(key)
        if dropped:
            # Say so: the free may have crossed a report of these values
            # (TaskFinished, ReplicaAdded) on the wire, and then the
            # scheduler counts copies that are going away. Found by seeds 5
            # and 56 of the chaos lab (tests/sim/test_regressions.py).
            # Values whose reports the scheduler had all heard (`ev.heard`)
            # cannot be in that case; most frees are of those.
            self._emit(SendDataDropped(self._stimulus_id, tuple(dropped)))

    def _on_replicas(self, ev: ReplicasRequested) -> None:
        for key, holders in ev.who_has.items():
            if key in self.tasks:
                self._unchanged(key, REPLICAS)
                continue
            ts = self._new(key, REPLICAS, FETCH)
            ts.nbytes = ev.nbytes.get(key, 0)
            ts.holders = {peer: None for peer in holders if peer != self.address}
            self.fetch[key] = None
            self._fail_fetch_if_hopeless(ts)

    def _on_scheduler_lost(self, ev: SchedulerLost) -> None:
        """Keep values and running threads; drop what has not started."""
        for ts in list(self.tasks.values()):
            if ts.key in self.tasks and ts.state in (WAITING, READY):
                self._forget(ts, SCHEDULER_LOST)
        for ts in list(self.tasks.values()):
            if ts.state is FETCH and not ts.dependents:
                self._forget(ts, SCHEDULER_LOST)
                continue
            self._unchanged(ts.key, SCHEDULER_LOST)
            if ts.state is FLIGHT and not ts.dependents:
                # Nobody will ask for this computation any more.
                ts.assigned = False
                ts.compute_request = None

    def _on_steal_requested(self, ev: StealRequested) -> None:
        """Give `key` up if its thread has not started; say which (module docstring)."""
        ts = self.tasks.get(ev.key)
        given_up = ts is not None and ts.assigned and ts.state in (WAITING, READY) and not ts.dependents
        if given_up:
            # Forgotten here: its inputs go too, unless other work needs them
            # (a fetch in flight lands and is offered as a copy, as usual).
            self._forget(ts, STEAL)
        else:
            self._unchanged(ev.key, STEAL)
        self._emit(SendStealAnswer(self._stimulus_id, ev.key, ev.steal_id, given_up))

    def _on_memory_paused(self, ev: MemoryPaused) -> None:
        self.paused = True

    def _on_memory_resumed(self, ev: MemoryResumed) -> None:
        self.paused = False

    # Secede and rejoin move a running task between thread slots; its state
    # stays, so they have no row in the table. The shell sends them only
    # from a running task's thread, each at most once in turn
    # (worker_client.py keeps track), and before that thread's end: the key
    # holds a slot. One that does not (a stray event, as in a test) changes
    # nothing, rather than miscounting the slots.

    def _on_seceded(self, ev: TaskSeceded) -> None:
        if ev.key in self.executing:
            del self.executing[ev.key]
            self.seceded[ev.key] = None

    def _on_rejoining(self, ev: TaskRejoining) -> None:
        if ev.key in self.seceded:
            self.rejoining[ev.key] = None

    def _on_data_put(self, ev: DataPut) -> None:
        # Check every key first: a client's put of a key this worker
        # computes is refused whole, not half applied.
        for key in ev.nbytes:
            ts = self.tasks.get(key)
            if ts is not None and ts.state not in (FETCH, FLIGHT):
                self._unchanged(key, PUT)
        for key, nbytes in ev.nbytes.items():
            ts = self.tasks.get(key)
            if ts is None:
                self._new(key, PUT, MEMORY).nbytes = nbytes
            elif ts.state in (FETCH, FLIGHT):
                self.fetch.pop(key, None)
                self._arrived(ts, PUT, nbytes)
            else:
                ts.nbytes = nbytes  # MEMORY: the same value again

    def _on_execution_succeeded(self, ev: ExecutionSucceeded) -> None:
        ts = self._finish_execution(ev.key)
        if ts.state is CANCELLED:
            if not ts.dependents:
                self._forget(ts, EXECUTION_DONE)
                return
            # Released while it ran, but meanwhile an input of work assigned
            # here: keep the value for that work only (the scheduler does
            # not count this copy), instead of leaving it waiting forever.
            # Found by seed 21 of the chaos lab (tests/sim/test_regressions.py).
            ts.freed = True
            ts.holders.clear()
            self._release_inputs(ts)
            self._now_in_memory(ts, EXECUTION_DONE, ev.nbytes)
            return
        self._release_inputs(ts)
        ts.freed = False  # reported as a result: the scheduler decides
        self._now_in_memory(ts, EXECUTION_DONE, ev.nbytes)
        self._emit(SendTaskFinished(self._stimulus_id, ts.key, ev.nbytes))

    def _on_execution_failed(self, ev: ExecutionFailed) -> None:
        ts = self._finish_execution(ev.key)
        if ts.state is EXECUTING:
            self._emit(SendTaskErred(self._stimulus_id, ts.key, ev.failure))
        elif ts.dependents:
            # A released run that failed, but an input of work assigned
            # here: fetch the value from the holders the scheduler named.
            self._release_inputs(ts)
            self._move(ts, EXECUTION_DONE, FETCH)
            self.fetch[ts.key] = None
            self._fail_fetch_if_hopeless(ts)
            return
        self._forget(ts, EXECUTION_DONE)

    def _on_gather_succeeded(self, ev: GatherSucceeded) -> None:
        # The peer is free for another request once this event is done.
        requested = self.in_flight.pop(ev.peer, ())
        for key, nbytes in ev.nbytes.items():
            ts = self.tasks.get(key)
            if ts is None or ts.state is not FLIGHT:
                # Released meanwhile, or already here by another way (put,
                # another peer): the shell stored nothing for it.
                self._unchanged(key, GATHER_DONE)
                continue
            self._arrived(ts, GATHER_DONE, nbytes)
        for key, failure in ev.errors.items():
            ts = self.tasks.get(key)
            if ts is not None and ts.state is FLIGHT:
                self._unobtainable(ts, failure)
            else:
                self._unchanged(key, GATHER_DONE)
        done = ev.nbytes.keys() | ev.errors.keys()
        self._retry_elsewhere(
            ev.peer, [k for k in requested if k not in done], lacking=set(ev.missing), event=GATHER_DONE
        )

    def _on_gather_failed(self, ev: GatherFailed) -> None:
        # Nothing came back: every key asked of that peer is tried elsewhere.
        requested = self.in_flight.pop(ev.peer, ev.keys)
        self._retry_elsewhere(ev.peer, requested, lacking=(), event=GATHER_FAILED)

    # ----------------------------------------------------------- helpers --

    def _make_ready(self, ts: WorkerTask) -> None:
        """`ts` has every input here: queue it for a thread, by priority."""
        self._move(ts, INPUTS_HERE, READY)
        heapq.heappush(self.ready, (ts.priority, ts.key))

    def _ensure_executing(self) -> None:
        """Fill free thread slots: rejoining threads first, then READY tasks."""
        # Threads that gave their slot back and want it again come first:
        # they hold work in progress (and perhaps memory).
        while self.rejoining and len(self.executing) < self.nthreads:
            key = next(iter(self.rejoining))
            del self.rejoining[key]
            del self.seceded[key]
            self.executing[key] = None
            self._emit(Rejoin(self._stimulus_id, key))
        while self.ready and len(self.executing) < self.nthreads and not self.paused:
            _, key = heapq.heappop(self.ready)
            ts = self.tasks.get(key)
            if ts is None or ts.state is not READY:
                continue  # a stale heap entry (see `ready`)
            self._move(ts, THREAD_FREE, EXECUTING)
            self.executing[key] = None
            # TaskStarted goes first: the scheduler must know the task runs
            # before the function can kill this worker (see worker.py).
            self._emit(SendTaskStarted(self._stimulus_id, key))
            self._emit(Execute(self._stimulus_id, key, ts.run_spec, tuple(ts.dependencies)))

    def _ensure_gathering(self) -> None:
        """Bundle FETCH keys into one request per idle peer, oldest first."""
        if not self.fetch or len(self.in_flight) >= self.max_gathers or self.paused:
            return
        batches: dict[str, list[str]] = {}
        for key in self.fetch:
            ts = self.tasks[key]
            peer = next((p for p in ts.holders if p not in self.in_flight), None)
            if peer is None:
                continue  # every holder has a request from us out: wait for it
            if peer not in batches and len(self.in_flight) + len(batches) >= self.max_gathers:
                continue
            batches.setdefault(peer, []).append(key)
        for peer, keys in batches.items():
            for key in keys:
                del self.fetch[key]
                self._move(self.tasks[key], PEER_FREE, FLIGHT)
            self.in_flight[peer] = tuple(keys)
            self._emit(Gather(self._stimulus_id, peer, tuple(keys)))

    def _arrived(self, ts: WorkerTask, event: TaskEvent, nbytes: int) -> None:
        """A fetched (or put) value is in the store now."""
        ts.holders.clear()
        ts.tried.clear()
        ts.compute_request = None
        self._now_in_memory(ts, event, nbytes)
        if not ts.freed:  # a freed copy is only for local work: not offered
            self._emit(SendReplicaAdded(self._stimulus_id, ts.key, nbytes))
        if ts.assigned:
            self._emit(SendTaskFinished(self._stimulus_id, ts.key, nbytes))

    def _now_in_memory(self, ts: WorkerTask, event: TaskEvent, nbytes: int) -> None:
        """`ts`'s value is in the store: tasks here waiting only for it are ready."""
        self._move(ts, event, MEMORY)
        ts.nbytes = nbytes
        for dependent in ts.dependents.values():
            if dependent.state is WAITING:
                dependent.waiting_on.pop(ts.key, None)
                if not dependent.waiting_on:
                    self._make_ready(dependent)

    def _retry_elsewhere(self, peer: str, keys, lacking, event: TaskEvent) -> None:
        """`peer` failed to provide `keys`: try their other holders.

        `lacking`: those of `keys` the peer answered that it does not have
        (the others it did not answer for: it may still hold them).
        """
        for key in keys:
            ts = self.tasks.get(key)
            if ts is None or ts.state is not FLIGHT:
                self._unchanged(key, event)  # a late answer (see UNCHANGED)
                continue
            if ts.compute_request is not None:
                # The scheduler asked us to compute it while the copy was on
                # its way: do that now. (Its inputs' records are created as
                # by the request itself, hence COMPUTE in `_start_compute`.)
                request, ts.compute_request = ts.compute_request, None
                ts.holders.clear()
                ts.tried.clear()
                self._move(ts, event, WAITING)
                self._start_compute(ts, request)
                continue
            ts.holders.pop(peer, None)
            ts.tried[peer] = key in lacking
            self._move(ts, event, FETCH)
            self.fetch[key] = None
            self._fail_fetch_if_hopeless(ts)

    def _fail_fetch_if_hopeless(self, ts: WorkerTask) -> None:
        """No holder left to try: report the value missing, drop who needed it.

        The report names only the holders that answered that they do not
        have the value. A holder that did not answer (hung, unreachable) may
        still hold it: the scheduler judges its liveness (`worker_ttl`) and
        sends the dependent again with fresh holders. Naming it made the
        scheduler drop a live holder's copy and declare scattered data lost
        (seeds 75 and 439 of the chaos lab's hang mix).
        """
        if ts.holders:
            return
        self.fetch.pop(ts.key, None)
        holders = tuple(peer for peer, answered in ts.tried.items() if answered)
        if not ts.dependents:
            self._emit(SendReplicaMissing(self._stimulus_id, ts.key, holders, None))
        for dependent in list(ts.dependents.values()):
            self._emit(SendReplicaMissing(self._stimulus_id, ts.key, holders, dependent.key))
            if dependent.state in (WAITING, READY):
                self._forget(dependent, HOPELESS)
        # Forgetting the last dependent may have forgotten `ts` already (an
        # input nothing here needs any more, UNNEEDED).
        if self.tasks.get(ts.key) is ts:
            self._forget(ts, HOPELESS)

    def _unobtainable(self, ts: WorkerTask, failure) -> None:
        """The holder has the value but cannot send it (it does not pickle):
        every task here that needs it fails with that error."""
        for dependent in list(ts.dependents.values()):
            if dependent.state in (WAITING, READY):
                self._emit(SendTaskErred(self._stimulus_id, dependent.key, failure))
                self._forget(dependent, GATHER_DONE)
        if self.tasks.get(ts.key) is ts:
            self._forget(ts, GATHER_DONE)

    def _finish_execution(self, key: str) -> WorkerTask:
        """Free the thread slot of `key`, whose thread ended; return its record.

        Only a task holding a slot (in `executing` or `seceded`) has a
        thread, and such a record is never forgotten before its thread
        ends: an end for any other key is a bug in the shell.
        """
        if key in self.seceded:
            del self.seceded[key]
            self.rejoining.pop(key, None)
        elif key in self.executing:
            del self.executing[key]
        else:
            ts = self.tasks.get(key)
            self._refuse(key, None if ts is None else ts.state, EXECUTION_DONE, None)
        return self.tasks[key]

    def _release_inputs(self, ts: WorkerTask) -> None:
        """`ts` is done with its inputs; forget those nobody here needs now."""
        for dep in ts.dependencies.values():
            dep.dependents.pop(ts.key, None)
            if dep.dependents:
                continue
            if dep.state is FETCH and not dep.assigned:
                # The scheduler may be counting on this copy: scattered data
                # whose last holder left waits for the copies of workers that
                # were sent its dependents (its `_await_copy`). A fetch that
                # never began ends here, so say so, naming no holder (unless
                # it was reported hopeless already: no longer in `fetch`).
                if dep.key in self.fetch:
                    self._emit(SendReplicaMissing(self._stimulus_id, dep.key, (), None))
                self._forget(dep, UNNEEDED)
            elif dep.state is MEMORY and dep.freed:
                self._forget(dep, UNNEEDED)
            # FLIGHT: the value is on its way; it is reported and kept when
            # it lands, and the scheduler frees it like any other copy.
            # MEMORY, not freed: a copy the scheduler counts; it frees it.
        ts.dependencies.clear()
        ts.waiting_on.clear()

    def _emit(self, instruction: WorkerInstruction) -> None:
        self._out.append(instruction)
