"""A client's brain: its futures, their reference counts, their lineage.

Rules
-----
Everything a client *decides* about its futures lives here; everything it
*does* (connect, reconnect, send, fetch values, wake waiters) lives in the
shell, `trioflow.client.AsyncClient`. Like the other cores (design.md §2):

* pure: no trio, no sockets, no threads, no clock, no randomness; it
  imports only the standard library, `trioflow.core` and `trioflow.errors`
  (tests/core/test_purity.py walks the imports);
* events in, outputs out: `ClientState.handle(event)` applies one event
  and returns what the shell must do, in order, each output carrying the
  event's `stimulus_id`;
* the shell may *read* the records (a `Future` handle reads its record's
  status from any thread), never write them.

Theory of operation
-------------------
A client holds one `FutureRecord` per key it has handles for. Its status
moves between five values (``pending``, ``finished``, ``error``,
``cancelled``, ``lost``) on the scheduler's reports (`FinishReported`,
`FailureReported`, `LossReported`, `RestartReported`, `RefusalReported`), on the
client's own decisions (`FuturesCancelled`, `GaveUp`, `CallsRefused`) and on what the
fetcher learns (`HoldersLearned`). A record is *done* once it has a value or
a final failure; a done record can become pending again (its value was lost
and is being recomputed), which is why `done()` is a flag beside the status
and not a status of its own. Each change bumps `version`, so an answer
computed before a change is recognised as stale (`HoldersLearned`). The
statuses are no lifecycle of the model's (see below), so there is no
transition table: a record's status changes in `_on_finish_reported` and
in the three helpers `_fail`, `_fail_locally` and `_reopen`, nowhere else.

Handles are counted, not tracked (`HandlesMade`, `HandlesDropped`): when the
last handle goes, the record goes, the scheduler is told the key is
released, and the key's lineage is forgotten if no kept task depends on it.

The lineage (`Lineage`) is what a new scheduler needs after a restart: the
task of every held key and, transitively, of its inputs, with the functions
they call. While the scheduler is away (``reconnecting``) new tasks are not
sent; they wait in the lineage, at most `MAX_QUEUED_WHILE_AWAY` of them
(`refusal`), and go with the resubmission that `SchedulerConnected`
produces. Requests that only make sense to the scheduler that is there now
(release, cancel, fire-and-forget) are dropped while it is away: a
resubmission carries only the keys still held, and not the cancelled ones.

What this module deliberately does not do: it never waits (the shell wakes
waiters on `FutureDone`), never fetches a value (trioflow/fetching.py), and
never sees a wire message (the shell converts both ways).

The model
---------
`spec/` does not model a client. It models the *scheduler's* view of
clients: which client holds which key (``World.holds``) and which reports
each must receive (``Outcome.reports``); there is no client state machine
and no client transition table in it to conform to. What it does say of
clients, this core must agree with: tests/properties/test_client_conformance.py
walks the model at random, feeds each client's core the model's reports
and the client-side half of its events, and checks after every step that
each held key has a record whose status is the one the model's state and
failure kind promise (design.md §1), and that a resubmission wants every
held key not failed for good. Two places where the client decides from what
it has seen itself, and the model from what the scheduler knows, are listed
there (a failed key after a scheduler restart; a task on an input that
failed for good here).

Events and outputs are declared in `trioflow.core.client_events`.
"""

from __future__ import annotations

import enum
from typing import Any

from trioflow.core.client_events import (
    CallsRefused,
    CallsSubmitted,
    ClientEvent,
    ClientOutput,
    ClosingRequested,
    ConnectionEnded,
    CopiesRequested,
    FailureReported,
    FetchFailed,
    FinishReported,
    FiredAndForgotten,
    FutureDone,
    FuturesCancelled,
    GaveUp,
    HandlesDropped,
    HandlesMade,
    HoldersLearned,
    LineageTask,
    LossReported,
    RefusalReported,
    RequestReplicas,
    RestartReported,
    SchedulerConnected,
    SchedulerDisconnected,
    SendCancelKeys,
    SendFireAndForget,
    SendMissingData,
    SendReleaseKeys,
    SendTasks,
    ValuesScattered,
)
from trioflow.core.failures import Cancelled, DataLost, TaskFailure

# Tasks a client keeps for a scheduler that is away before it refuses more.
MAX_QUEUED_WHILE_AWAY = 100_000

class FutureStatus(str, enum.Enum):
    """A future's status, spelled as `Future.status` shows it."""

    PENDING = "pending"  # submitted; no value and no final failure yet
    FINISHED = "finished"  # a worker (or the report itself) has the value
    ERROR = "error"  # the task failed (user error, KilledWorker), or this client gave up
    CANCELLED = "cancelled"  # cancelled by a client, or the cluster restarted
    LOST = "lost"  # scattered data lost for good (done), or being recomputed (not done)


PENDING = FutureStatus.PENDING
FINISHED = FutureStatus.FINISHED
ERROR = FutureStatus.ERROR
CANCELLED = FutureStatus.CANCELLED
LOST = FutureStatus.LOST


class ClientStatus(str, enum.Enum):
    """Where the client is in its life, spelled as `AsyncClient.status` shows it."""

    NEW = "new"  # not connected yet
    RUNNING = "running"  # registered with a scheduler: messages go out at once
    RECONNECTING = "reconnecting"  # the scheduler is away: new tasks wait in the lineage
    CLOSING = "closing"  # closed by the user, or gave up: nothing more goes out
    CLOSED = "closed"  # the connection task ended


# ----------------------------------------------------------------- records --


class FutureRecord:
    """What the client knows about one key.

    Kept small: a client may hold a million of these (slots; the waiting
    machinery is made by the shell only for the records someone waits on).
    """

    __slots__ = ("key", "status", "_done", "failure", "local_error", "who_has", "value", "version", "refs", "waiters")

    def __init__(self, key: str):
        self.key = key
        self.status = PENDING
        # Whether done() (set by the machine only). Invariant: FINISHED is
        # done, PENDING is not; a done record that is not FINISHED has a
        # failure or a local error (`check_invariants`).
        self._done = False
        self.failure: TaskFailure | None = None
        # An error of this client's own (its scheduler is gone for good, or
        # refused the task): raised as it is, not through the failure table.
        self.local_error: BaseException | None = None
        # Workers the scheduler last said hold the value.
        self.who_has: tuple[str, ...] = ()
        # The pickled value itself, when it was small enough to come with
        # the report (opaque here: the shell unpickles it).
        self.value: Any = None
        # Bumped by every change, so that an answer computed before a
        # change can be recognised as stale.
        self.version = 0
        # Live `Future` handles for this key. Invariant: > 0 while the
        # record is in `ClientState.futures`.
        self.refs = 0
        # The shell's: whoever waits on this record (an event, callbacks).
        # Never read or written here; it lives and dies with the record.
        self.waiters: Any = None

    def done(self) -> bool:
        """Whether the key has a value or a final failure (it may become
        pending again: a lost value being recomputed)."""
        return self._done

    def failed_for_good(self) -> bool:
        """Done with a failure of the cluster (not a connection of this
        client's that gave up, which a new client could still get past)."""
        return self.done() and self.status is not FINISHED and self.failure is not None

    def __repr__(self) -> str:
        return f"<FutureRecord {self.key!r} {self.status.value}{' done' if self.done() else ''}>"


class Lineage:
    """The tasks (and functions) needed to rebuild the keys a client holds.

    A scheduler that dies forgets every task. Its workers survive with
    their values, but only the clients know *how* each value was made. So
    each client keeps the task of every key it holds, and of every key those
    depend on (transitively: recomputing a lost value may need its inputs'
    recipes too), with the pickled functions they call.

    A record goes as soon as nothing needs it: no handle for the key and no
    kept task that depends on it. That is reference counting, done by hand
    because the references are keys, not objects. The tasks themselves are
    opaque here (the shell keeps them compact: trioflow/lineage.py).
    """

    def __init__(self) -> None:
        # key -> its task, in submission order (inputs before dependents,
        # which is the order a resubmission needs).
        self.tasks: dict[str, LineageTask] = {}
        # key -> how many kept tasks list it as a dependency
        self._dependents: dict[str, int] = {}
        # function id -> its pickled payload (opaque), while a kept task calls it
        self.functions: dict[str, Any] = {}
        self._function_users: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def remember(self, key: str, task: LineageTask, function: Any = None) -> None:
        """Keep `task` for `key` (a submitted task, or scattered data without a function)."""
        if key in self.tasks:
            return
        self.tasks[key] = task
        for dep in task.dependencies:
            self._dependents[dep] = self._dependents.get(dep, 0) + 1
        function_id = task.function_id
        if function is not None and function_id is not None:
            self.functions[function_id] = function
            self._function_users[function_id] = self._function_users.get(function_id, 0) + 1

    def forget(self, key: str, held: Any) -> None:
        """Drop `key`'s task if nothing needs it, then its inputs' likewise.

        `held` is a container of the keys the client still holds.
        """
        stack = [key]
        while stack:
            key = stack.pop()
            if key not in self.tasks or key in held or self._dependents.get(key, 0):
                continue
            task = self.tasks.pop(key)
            self._dependents.pop(key, None)
            function_id = task.function_id
            if function_id is not None and function_id in self._function_users:
                self._function_users[function_id] -= 1
                if not self._function_users[function_id]:
                    del self._function_users[function_id]
                    del self.functions[function_id]
            for dep in task.dependencies:
                self._dependents[dep] -= 1
                stack.append(dep)


# -------------------------------------------------------------- the machine --


class ClientState:
    """The futures of one client, as a state machine (see the module docstring).

    Args:
        max_queued_while_away: tasks kept for an absent scheduler before
            `refusal` refuses more.
    """

    def __init__(self, max_queued_while_away: int = MAX_QUEUED_WHILE_AWAY):
        self.status = ClientStatus.NEW
        # key -> its record, for every key with a live handle.
        self.futures: dict[str, FutureRecord] = {}
        self.lineage = Lineage()
        # key -> the copies the user asked to keep (`replicate`): a new
        # scheduler knows nothing of them, so they are asked for again after
        # each resubmission. Invariant: every key here is in `futures`.
        self.replicas: dict[str, int] = {}
        # Tasks submitted since the scheduler went away. Invariant: 0 unless
        # status is RECONNECTING.
        self.queued_while_away = 0
        self.max_queued_while_away = max_queued_while_away
        self._out: list[ClientOutput] = []
        self._stimulus_id = ""
        self._handlers = {
            HandlesMade: self._on_handles_made,
            HandlesDropped: self._on_handles_dropped,
            CallsSubmitted: self._on_calls_submitted,
            CallsRefused: self._on_calls_refused,
            ValuesScattered: self._on_values_scattered,
            FuturesCancelled: self._on_futures_cancelled,
            FiredAndForgotten: self._on_fired_and_forgotten,
            CopiesRequested: self._on_copies_requested,
            FinishReported: self._on_finish_reported,
            FailureReported: self._on_failure_reported,
            LossReported: self._on_loss_reported,
            RestartReported: self._on_restart_reported,
            RefusalReported: self._on_refusal_reported,
            HoldersLearned: self._on_holders_learned,
            FetchFailed: self._on_fetch_failed,
            SchedulerConnected: self._on_scheduler_connected,
            SchedulerDisconnected: self._on_scheduler_disconnected,
            GaveUp: self._on_gave_up,
            ClosingRequested: self._on_closing_requested,
            ConnectionEnded: self._on_connection_ended,
        }

    # ------------------------------------------------------------ entry --

    def handle(self, event: ClientEvent) -> list[ClientOutput]:
        """Apply one event; return what the shell must do, in order.

        Raises:
            KeyError: an event type this machine does not know (a bug of
                the shell's, not of the peer's: reports are converted there).
        """
        self._stimulus_id = event.stimulus_id
        try:
            self._handlers[type(event)](event)
        finally:
            out, self._out = self._out, []
        return out

    # ---------------------------------------------------------- queries --

    @property
    def connected(self) -> bool:
        """Whether messages go out now (registered with a scheduler)."""
        return self.status is ClientStatus.RUNNING

    def refusal(self, n_tasks: int) -> str | None:
        """Why `n_tasks` new tasks cannot be taken now, or None if they can.

        Asked before any handle or lineage exists for them. While
        reconnecting, new tasks wait in the lineage for the resubmission,
        at most `max_queued_while_away` of them: past that, the user hears
        it at once rather than the client holding back unbounded work.
        """
        if self.status is ClientStatus.RECONNECTING:
            if self.queued_while_away + n_tasks > self.max_queued_while_away:
                return (
                    f"{self.queued_while_away} tasks are already waiting for it "
                    f"(at most {self.max_queued_while_away})"
                )
            return None
        if self.status is not ClientStatus.RUNNING:
            return f"the client is {self.status.value}"
        return None

    def wanted_again(self) -> list[str]:
        """The keys a resubmission wants: every held future not failed for good."""
        return [k for k, rec in self.futures.items() if not rec.done() or rec.status is FINISHED]

    # ----------------------------------------------------------- handles --

    def _on_handles_made(self, ev: HandlesMade) -> None:
        for key in ev.keys:
            rec = self.futures.get(key)
            if rec is None:
                rec = self.futures[key] = FutureRecord(key)
            elif rec.status is CANCELLED:
                # Submitted anew after a cancel: pending again. (Other
                # failures stay: a failed key submitted again is the same
                # failed task, design.md §1.)
                self._reopen(rec, PENDING)
                rec.failure = rec.local_error = None
            rec.refs += 1

    def _on_handles_dropped(self, ev: HandlesDropped) -> None:
        released = []
        for key in ev.keys:
            rec = self.futures.get(key)
            if rec is None:
                continue
            rec.refs -= 1
            if rec.refs <= 0:
                del self.futures[key]
                self.replicas.pop(key, None)
                released.append(key)
                self.lineage.forget(key, self.futures)
        if released and self.connected:
            self._emit(SendReleaseKeys(self._stimulus_id, tuple(released)))

    # ------------------------------------------------------- submissions --

    def _on_calls_submitted(self, ev: CallsSubmitted) -> None:
        """Keep and send the tasks; a task whose input already failed for
        good fails at once instead, with that failure (design.md §1: a
        dependent of a failed task raises the same error). The scheduler
        would say the same unless it restarted since: a new scheduler knows
        nothing of a failure, and a failed future's task is not resubmitted.
        """
        sent = []
        for key, task in zip(ev.keys, ev.tasks, strict=True):
            failed = next((self.futures[d] for d in task.dependencies if self._failed_for_good(d)), None)
            if failed is not None:
                rec = self.futures[key]
                if not rec.done():
                    assert failed.failure is not None
                    self._fail(rec, failed.failure)
                continue
            self.lineage.remember(key, task, ev.functions.get(task.function_id) if task.function_id else None)
            sent.append(key)
        if not sent:
            return
        if self.status is ClientStatus.RECONNECTING:
            self.queued_while_away += len(sent)  # they go with the resubmission
        elif self.connected:
            self._emit(SendTasks(self._stimulus_id, tuple(sent), tuple(sent)))

    def _failed_for_good(self, key: str) -> bool:
        rec = self.futures.get(key)
        return rec is not None and rec.failed_for_good()

    def _on_values_scattered(self, ev: ValuesScattered) -> None:
        # The values travel in the scatter request itself; the marker lets a
        # new scheduler know the key (it waits for a worker to bring it back).
        for key, task in zip(ev.keys, ev.tasks, strict=True):
            self.lineage.remember(key, task)

    def _on_futures_cancelled(self, ev: FuturesCancelled) -> None:
        keys = tuple(k for k in ev.keys if k in self.futures)
        failure = Cancelled(ev.reason)
        for key in keys:
            rec = self.futures[key]
            if not rec.done():
                self._fail(rec, failure)
        # While reconnecting there is nothing to send: cancelled keys are
        # left out of the resubmission (they are done and not finished).
        if keys and self.connected:
            self._emit(SendCancelKeys(self._stimulus_id, keys, ev.reason))

    def _on_fired_and_forgotten(self, ev: FiredAndForgotten) -> None:
        # (While reconnecting: the resubmission carries only held keys.)
        if ev.keys and self.connected:
            self._emit(SendFireAndForget(self._stimulus_id, ev.keys))

    def _on_copies_requested(self, ev: CopiesRequested) -> None:
        for key in ev.keys:
            if key in self.futures:
                if ev.n > 1:
                    self.replicas[key] = ev.n
                else:
                    self.replicas.pop(key, None)

    # ------------------------------------------------------------ reports --

    def _on_finish_reported(self, ev: FinishReported) -> None:
        rec = self.futures.get(ev.key)
        if rec is None:
            return  # released meanwhile: the report crossed our release
        rec.version += 1
        rec.status, rec.failure, rec.local_error = FINISHED, None, None
        rec.who_has, rec.value = ev.who_has, ev.value
        self._set_done(rec)

    def _on_failure_reported(self, ev: FailureReported) -> None:
        for key in ev.keys:
            rec = self.futures.get(key)
            if rec is not None:
                self._fail(rec, ev.failure)

    def _on_loss_reported(self, ev: LossReported) -> None:
        rec = self.futures.get(ev.key)
        if rec is not None:
            self._reopen(rec, LOST)

    def _on_restart_reported(self, ev: RestartReported) -> None:
        # Every future, done or not: a finished value is gone with its worker.
        failure = Cancelled("the cluster was restarted")
        for rec in self.futures.values():
            self._fail(rec, failure)

    def _on_calls_refused(self, ev: CallsRefused) -> None:
        for key in ev.keys:
            rec = self.futures.get(key)
            if rec is not None and not rec.done():
                self._fail_locally(rec, ev.error)

    def _on_refusal_reported(self, ev: RefusalReported) -> None:
        error = ValueError(f"the scheduler refused the task: {ev.reason}")
        for key in ev.keys:
            rec = self.futures.get(key)
            if rec is not None and not rec.done():
                self._fail_locally(rec, error)

    # ----------------------------------------------------------- fetching --

    def _on_holders_learned(self, ev: HoldersLearned) -> None:
        """Apply the scheduler's answer to the records it is still true of.

        A report can overtake the answer: a `key_finished` sent right behind
        the `who_has` reply may be handled before the fetcher resumes. So an
        answer applies only to a record that did not change since the
        question was asked, that is finished, and whose value did not come
        with a report meanwhile.
        """
        for key, (version, holders) in ev.answers.items():
            rec = self.futures.get(key)
            if rec is None or rec.version != version or rec.status is not FINISHED or rec.value is not None:
                continue
            if holders:
                rec.who_has = holders
            else:
                self._reopen(rec, LOST)  # being recomputed: wait for its report

    def _on_fetch_failed(self, ev: FetchFailed) -> None:
        """Name to the scheduler only the holders that answered "missing".

        A holder that did not answer (refused, broke, hung) is no proof that
        it lacks the value: the scheduler judges its liveness itself
        (`worker_ttl`; a closed connection) and drops its copies when it
        leaves. Naming it made the scheduler forget a live holder's copy,
        and declare scattered data lost while a hung worker still held it:
        the rule the workers follow (trioflow/core/worker_state.py,
        `_fail_fetch_if_hopeless`) holds for the client too.
        """
        for key, holder in ev.lacking.items():
            if key in self.futures and self.connected:
                self._emit(SendMissingData(self._stimulus_id, key, (holder,)))
        # ev.unreachable: deliberately nothing (see above). The fetcher asks
        # who holds the value again, after a pause.

    # ------------------------------------------------------ the connection --

    def _on_scheduler_connected(self, ev: SchedulerConnected) -> None:
        self.status = ClientStatus.RUNNING
        if not ev.recovering:
            return
        # The new scheduler knows nothing: send it the whole lineage (the
        # tasks queued while it was away are in there), then ask again for
        # the copies asked of the old one, right behind (the scheduler
        # handles messages in order, so the keys are known by then).
        self.queued_while_away = 0
        wanted = self.wanted_again()
        self._emit(SendTasks(self._stimulus_id, tuple(self.lineage.tasks), tuple(wanted)))
        still = set(wanted)
        by_n: dict[int, list[str]] = {}
        for key, n in self.replicas.items():
            if key in still:
                by_n.setdefault(n, []).append(key)
        for n, keys in sorted(by_n.items()):
            self._emit(RequestReplicas(self._stimulus_id, tuple(keys), n))

    def _on_scheduler_disconnected(self, ev: SchedulerDisconnected) -> None:
        if self.status in (ClientStatus.RUNNING, ClientStatus.NEW, ClientStatus.RECONNECTING):
            self.status = ClientStatus.RECONNECTING

    def _on_gave_up(self, ev: GaveUp) -> None:
        self.status = ClientStatus.CLOSING
        self.queued_while_away = 0
        for rec in self.futures.values():
            if not rec.done():
                self._fail_locally(rec, ev.error)

    def _on_closing_requested(self, ev: ClosingRequested) -> None:
        if self.status in (ClientStatus.CLOSING, ClientStatus.CLOSED):
            return
        was_connected = self.connected
        self.status = ClientStatus.CLOSING
        self.queued_while_away = 0
        if was_connected and self.futures:
            self._emit(SendReleaseKeys(self._stimulus_id, tuple(self.futures)))

    def _on_connection_ended(self, ev: ConnectionEnded) -> None:
        self.status = ClientStatus.CLOSED
        self.queued_while_away = 0

    # ------------------------------------------------------------ helpers --

    def _emit(self, output: ClientOutput) -> None:
        self._out.append(output)

    def _fail(self, rec: FutureRecord, failure: TaskFailure) -> None:
        rec.version += 1
        if isinstance(failure, Cancelled):
            rec.status = CANCELLED
        elif isinstance(failure, DataLost):
            rec.status = LOST
        else:
            rec.status = ERROR
        rec.failure = failure
        self._set_done(rec)

    def _fail_locally(self, rec: FutureRecord, error: BaseException) -> None:
        rec.version += 1
        rec.status, rec.local_error = ERROR, error
        self._set_done(rec)

    def _reopen(self, rec: FutureRecord, status: FutureStatus) -> None:
        """Not done any more: lost and being recomputed, or submitted anew."""
        rec.version += 1
        rec.status, rec.who_has, rec.value, rec._done = status, (), None, False

    def _set_done(self, rec: FutureRecord) -> None:
        # Only the step from not done to done wakes anyone: a record that
        # was done already (a second report) has no waiters left.
        if not rec.done():
            rec._done = True
            self._emit(FutureDone(self._stimulus_id, rec.key))


def check_invariants(state: ClientState) -> list[str]:
    """The invariants of a `ClientState`, as a list of violations (empty: all hold)."""
    problems = []
    for key, rec in state.futures.items():
        if rec.key != key:
            problems.append(f"{key}: record is for {rec.key}")
        if rec.refs <= 0:
            problems.append(f"{key}: held with {rec.refs} handles")
        if rec.status is FINISHED and not rec.done():
            problems.append(f"{key}: finished but not done")
        if rec.status is PENDING and rec.done():
            problems.append(f"{key}: pending but done")
        if rec.done() and rec.status is not FINISHED and rec.failure is None and rec.local_error is None:
            problems.append(f"{key}: done with status {rec.status.value} and no failure")
    for key in state.replicas:
        if key not in state.futures:
            problems.append(f"{key}: copies kept for a key not held")
    if state.queued_while_away and state.status is not ClientStatus.RECONNECTING:
        problems.append(f"{state.queued_while_away} tasks queued while {state.status.value}")
    return problems
