"""The rules of a task's life on one worker: its states, what moves it, the table.

Rules of this module: it holds data and nothing else. `WorkerState`
(`worker_state.py`) decides *when* a task moves; this module says *where*
it may go. A move the table does not list is a bug in the core, and
`WorkerState` raises `InvalidWorkerTransition` before making it.

Theory of operation
-------------------
A worker keeps one record per key it deals with. A record is in one of
seven states, spelled as in `spec/worker_model.py` (`WState`), the formal
model this table is checked against (tests/properties/test_worker_table.py):

    the worker runs it            the worker holds or fetches its value
    ------------------            -------------------------------------
    WAITING   inputs missing      FETCH    to ask a peer, not yet asked
    READY     waits for a thread  FLIGHT   a peer has been asked
    EXECUTING its thread runs     MEMORY   the value is in the store
    CANCELLED its thread runs, though the scheduler released it

A key with no record is written `None` here ("absent": never heard of,
or forgotten). Records are born and die through the table too, as moves
from and to `None`.

What moves a record is a `TaskEvent`. Eight are the model's events, things
that happened outside the worker's control: the scheduler assigned, freed,
wanted a copy or asked for a task back; a client put data here; a thread
ended; a peer answered or failed. Five are the worker's own follow-ups,
which the model runs as rules of their own (`_settle`, `_start`,
`_gather`, `give_up_if_hopeless`, `release_inputs`): a task whose inputs
are all here is ready; a free thread takes a ready task; an idle peer is
asked for values to fetch; a fetch nobody can serve is given up, with the
tasks that needed it; an input nothing here needs any more is dropped.
The last, `SCHEDULER_LOST`, is not in the model (it models one scheduler
that never goes away).

An event can leave a record as it is. Each such (state, event) pair is in
`UNCHANGED` with the reason it is safe; any pair in neither table makes
`WorkerState` raise. So there is no silent "ignore whatever else comes":
every late answer, repeated order or crossed message is a row someone wrote
down, and anything else is a bug that stops the event.

Why states that look alike are kept apart:

* CANCELLED exists because a thread cannot be interrupted. Without it, a
  task released while it runs and then assigned again would be started a
  second time while the first run still goes (W-INV-ONCE in the model).
* FETCH and FLIGHT are apart because a worker asks a bounded number of
  peers at once (`max_gathers`) and bundles keys per peer: FETCH is the
  queue, FLIGHT the request that is out.
* WAITING and READY are apart because threads are few: READY tasks queue
  for them in priority order; WAITING tasks cannot start at all.

A doc generator can draw the state diagram from `TRANSITIONS` alone: each
``(state, event) -> targets`` row is one arrow per target, labelled with
the event's value; `None` is the start and end of every record.
"""

from __future__ import annotations

import enum


class WorkerTaskState(enum.Enum):
    """The state of one key's record on a worker (spec: `WState`)."""

    WAITING = "waiting"  # assigned here; some input is not here yet
    READY = "ready"  # assigned here; every input is here; waits for a thread
    EXECUTING = "executing"  # its function runs in a thread
    CANCELLED = "cancelled"  # its thread runs, but the scheduler released it
    FETCH = "fetch"  # a value to fetch from a peer; no request yet
    FLIGHT = "flight"  # a request to a peer is on its way
    MEMORY = "memory"  # the value is in the store


WAITING = WorkerTaskState.WAITING
READY = WorkerTaskState.READY
EXECUTING = WorkerTaskState.EXECUTING
CANCELLED = WorkerTaskState.CANCELLED
FETCH = WorkerTaskState.FETCH
FLIGHT = WorkerTaskState.FLIGHT
MEMORY = WorkerTaskState.MEMORY


class TaskEvent(enum.Enum):
    """What moves one record. The values are the names `spec/worker_model.py` uses.

    Several events of the core map to one of these: `ComputeRequested` is
    COMPUTE, `ExecutionSucceeded` and `ExecutionFailed` are EXECUTION_DONE
    (as the model's `ExecutionDone(key, ok)`), `GatherSucceeded` is
    GATHER_DONE. Events that move no record (secede, rejoin, pause, resume)
    have no member: they change which thread slot a running task holds, or
    whether anything new may start, not a task's state.
    """

    # What happened outside the worker (the model's events).
    COMPUTE = "Compute"  # the scheduler assigned a task here
    FREE = "Free"  # the scheduler no longer needs the key here
    REPLICAS = "Replicas"  # the scheduler wants a copy here
    PUT = "Put"  # a client's data was stored here (scatter)
    EXECUTION_DONE = "ExecutionDone"  # a thread ended: the function returned or raised
    GATHER_DONE = "GatherDone"  # a peer answered a request
    GATHER_FAILED = "GatherFailed"  # a request to a peer failed (dead, unreachable)
    STEAL = "Steal"  # the scheduler asks for a task back, for another worker
    # What the worker does next, by itself (the model's `_settle`).
    INPUTS_HERE = "InputsHere"  # every input is here (on assignment, or the last one arrived)
    THREAD_FREE = "ThreadFree"  # a thread slot is free for a ready task (`_start`)
    PEER_FREE = "PeerFree"  # a holder has no request from us out (`_gather`)
    HOPELESS = "Hopeless"  # nobody is left to fetch from (`give_up_if_hopeless`)
    UNNEEDED = "Unneeded"  # the last task here that needed this input let go (`release_inputs`)
    # Not in the model.
    SCHEDULER_LOST = "SchedulerLost"  # the link to the scheduler broke


COMPUTE = TaskEvent.COMPUTE
FREE = TaskEvent.FREE
REPLICAS = TaskEvent.REPLICAS
PUT = TaskEvent.PUT
EXECUTION_DONE = TaskEvent.EXECUTION_DONE
GATHER_DONE = TaskEvent.GATHER_DONE
GATHER_FAILED = TaskEvent.GATHER_FAILED
STEAL = TaskEvent.STEAL
INPUTS_HERE = TaskEvent.INPUTS_HERE
THREAD_FREE = TaskEvent.THREAD_FREE
PEER_FREE = TaskEvent.PEER_FREE
HOPELESS = TaskEvent.HOPELESS
UNNEEDED = TaskEvent.UNNEEDED
SCHEDULER_LOST = TaskEvent.SCHEDULER_LOST

State = WorkerTaskState | None  # None: the worker has no record of the key


class InvalidWorkerTransition(RuntimeError):
    """The core tried a move, or ignored an event, that no table row allows (a bug).

    Raised before the record changes. Records the same event changed
    earlier stay changed: the worker core is not transactional.
    """


# The transition table: (state, event) -> the states it may lead to.
# Where a row has several targets, the handler in worker_state.py chooses
# by what the table cannot see (does a task here need the value? did the
# function raise? is a compute request pending?); the comment says which.
TRANSITIONS: dict[tuple[State, TaskEvent], tuple[State, ...]] = {
    # -- The scheduler assigns a task (ComputeRequested) --
    # A new task to run here; and, for each input not here, a record to
    # fetch it with (the holders come with the assignment).
    (None, COMPUTE): (WAITING, FETCH),
    # A copy was wanted but not yet asked for: compute it instead.
    (FETCH, COMPUTE): (WAITING,),
    # Released while its thread ran, now wanted again: that thread serves.
    # Starting it afresh would run one task twice at once.
    (CANCELLED, COMPUTE): (EXECUTING,),
    # -- The scheduler frees a key (FreeRequested) --
    # A thread cannot be stopped: the run goes on, its result unwanted.
    (EXECUTING, FREE): (CANCELLED,),
    # Nothing here needs it any more: forget it (and drop its value).
    (WAITING, FREE): (None,),
    (READY, FREE): (None,),
    (FETCH, FREE): (None,),
    (FLIGHT, FREE): (None,),
    (MEMORY, FREE): (None,),
    # -- The scheduler wants a copy here (ReplicasRequested) --
    (None, REPLICAS): (FETCH,),
    # -- A client's data stored here (DataPut) --
    (None, PUT): (MEMORY,),
    # Scattered data whose copy was being fetched: it is here now.
    (FETCH, PUT): (MEMORY,),
    (FLIGHT, PUT): (MEMORY,),
    # -- A thread ended (ExecutionSucceeded, ExecutionFailed) --
    # Success: the value is here. Failure: reported, and forgotten.
    (EXECUTING, EXECUTION_DONE): (MEMORY, None),
    # A released run: forgotten, unless a task here needs its value; then
    # a success is kept for that task only, and a failure is fetched from
    # the holders the scheduler named for that task (chaos lab seed 21).
    (CANCELLED, EXECUTION_DONE): (None, MEMORY, FETCH),
    # -- A peer answered (GatherSucceeded) or did not (GatherFailed) --
    # Sent: here. Lacked: ask the next holder (FETCH), or compute it if the
    # scheduler asked that meanwhile (WAITING). Cannot be sent (does not
    # pickle): forgotten, and the tasks here that needed it err.
    (FLIGHT, GATHER_DONE): (MEMORY, FETCH, WAITING, None),
    (WAITING, GATHER_DONE): (None,),  # erred: an input cannot be sent
    (FLIGHT, GATHER_FAILED): (FETCH, WAITING),
    # -- The scheduler asks for a task back (StealRequested) --
    # Given up only before its thread started, then forgotten here.
    (WAITING, STEAL): (None,),
    (READY, STEAL): (None,),
    # -- The worker's own follow-ups --
    (WAITING, INPUTS_HERE): (READY,),
    (READY, THREAD_FREE): (EXECUTING,),
    (FETCH, PEER_FREE): (FLIGHT,),
    # No holder left: the fetch is reported missing and forgotten, and so
    # are the tasks that waited for it (the scheduler sends them again).
    (FETCH, HOPELESS): (None,),
    (WAITING, HOPELESS): (None,),
    # An input fetched or kept only for tasks here that are done with it.
    (FETCH, UNNEEDED): (None,),
    (MEMORY, UNNEEDED): (None,),
    # -- The scheduler is gone (SchedulerLost) --
    # Work not started is dropped: the next scheduler sends what it still
    # wants, and a task kept here as well would run twice.
    (WAITING, SCHEDULER_LOST): (None,),
    (READY, SCHEDULER_LOST): (None,),
    (FETCH, SCHEDULER_LOST): (None,),
}


def _same(reason: str, *pairs: tuple[State, TaskEvent]) -> dict[tuple[State, TaskEvent], str]:
    """One reason for several rows of UNCHANGED."""
    return {pair: reason for pair in pairs}


_LATE_ANSWER = (
    "a late answer for a key that is no longer in flight (forgotten, put here, "
    "or asked of another peer since): the shell stored nothing for it"
)
_HAS_IT = "already here, on its way, or computed here: no copy to fetch"

# (state, event) pairs that leave a record as it is, and why that is safe.
# The handler may still act (report, mark the record): only the state stays.
UNCHANGED: dict[tuple[State, TaskEvent], str] = {
    **_same(
        "a repeat of an assignment this worker already has in hand",
        (WAITING, COMPUTE), (READY, COMPUTE), (EXECUTING, COMPUTE),
    ),
    (MEMORY, COMPUTE): "the value is already here: report it finished, do not run it again",
    (FLIGHT, COMPUTE): (
        "its value is on its way from a peer: reported when it lands, "
        "computed here if that fetch fails (`compute_request`)"
    ),
    (None, FREE): (
        "already forgotten (given up to a steal, reported missing, a cancelled "
        "run that ended): the free crossed that news on the wire"
    ),
    (CANCELLED, FREE): "already released; its thread still runs, and its result will be dropped",
    **_same(
        "still an input of work assigned here (the free crossed that assignment "
        "on the wire): kept, marked freed, until that work is done",
        (WAITING, FREE), (READY, FREE), (FETCH, FREE), (FLIGHT, FREE), (MEMORY, FREE),
    ),
    **_same(
        _HAS_IT,
        (WAITING, REPLICAS), (READY, REPLICAS), (EXECUTING, REPLICAS), (CANCELLED, REPLICAS),
        (FETCH, REPLICAS), (FLIGHT, REPLICAS), (MEMORY, REPLICAS),
    ),
    (MEMORY, PUT): "the same value again: scattered keys name their content",
    **_same(
        _LATE_ANSWER,
        (None, GATHER_DONE), (WAITING, GATHER_DONE), (READY, GATHER_DONE),
        (EXECUTING, GATHER_DONE), (CANCELLED, GATHER_DONE), (FETCH, GATHER_DONE),
        (MEMORY, GATHER_DONE),
        (None, GATHER_FAILED), (WAITING, GATHER_FAILED), (READY, GATHER_FAILED),
        (EXECUTING, GATHER_FAILED), (CANCELLED, GATHER_FAILED), (FETCH, GATHER_FAILED),
        (MEMORY, GATHER_FAILED),
    ),
    (None, STEAL): (
        "not here (finished and freed meanwhile, or dropped when the scheduler was lost): "
        "nothing to give up; the answer says 'not given up', and the scheduler moves a task only on 'given up'"
    ),
    **_same(
        "its thread has started: kept, so that it never runs here and on the thief",
        (EXECUTING, STEAL), (CANCELLED, STEAL),
    ),
    (MEMORY, STEAL): "already done: kept; its finish report is on its way to the scheduler",
    **_same(
        "a copy being fetched, not a task that runs here: nothing to give up",
        (FETCH, STEAL), (FLIGHT, STEAL),
    ),
    **_same(
        "a task here waits for its value (giving it up would leave that task "
        "waiting for ever), or it is no longer assigned here",
        (WAITING, STEAL), (READY, STEAL),
    ),
    (MEMORY, SCHEDULER_LOST): "values are kept: the worker lists them when it registers again",
    **_same(
        "a thread cannot be stopped: its result goes to the next scheduler",
        (EXECUTING, SCHEDULER_LOST), (CANCELLED, SCHEDULER_LOST),
    ),
    (FLIGHT, SCHEDULER_LOST): "the request is out: the value is kept and offered when it lands",
}
