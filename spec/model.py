"""The scheduler-side task lifecycle and the worker set, as a state machine.

Rules of this module:

* A `World` is an immutable value: the records the scheduler keeps (one
  `Task` per key), the live workers, the keys clients hold, and how many
  faults have happened. Worlds are hashable, so `spec.explore` can visit
  each one once.
* `apply(scope, world, event)` returns every world the event may lead to.
  The model is deliberately *nondeterministic* where trioflow's policy is
  not part of the contract: which worker runs a ready task, which of two
  failed inputs a dependent inherits its failure from, which workers get
  replicas. The core must pick one of the allowed outcomes; the model does
  not care which.
* Every change of a task's state goes through `TRANSITIONS` (in
  `spec.world`, with the states, records and events this module moves).
  Each entry names the rules that may take it; a rule is a guard (when it
  may fire) plus an effect (what it changes).

Theory of operation
-------------------
An event (`Submit`, `WorkerDies`, `TaskFinishes`, ...) applies its direct
effect: a record is created, a worker leaves, a value arrives. Then the
world *settles*: the internal rules of `RULES` fire, in table order, until
none is enabled. They are the knock-on effects a careful reader would
expect: a needed task waits; a task whose input failed fails the same way;
a value whose last copy vanished is recomputed, or lost if it was scattered
(unless a live worker is fetching a copy: then it waits for that copy,
released); what nobody needs is released; what nothing refers to is
forgotten. Last,
every task that is ready (all inputs in memory) is *placed*: on a live
worker that is not paused, in the queue (root tasks, when every such worker
is saturated), or in no-worker (when no allowed worker is alive and not
paused). Then, with the "steal" feature, a worker with nothing to do *may*
ask for a task that waits on another (work stealing): the task moves only
when its worker answers that it gave the task up, which it may do only if
it had not started it (`StealAnswered`). Whether a steal is worth it is the
core's cost model (core/stealing.py), so the model allows every steal
the rules permit, and none.

A key is *needed* while a client holds it or while a dependent record is in
progress (waiting, queued, no-worker, processing). A record is kept while it
is needed or while a dependent record refers to it (lineage). A needed key
*must be computed* unless every client holding it already has its value
(a small value travels with the report) and no work in progress needs it:
such a key whose last copy is lost is released, and computed again only
when something needs the value.

What the model leaves out, on purpose: priorities and queue order, byte
sizes and placement by data volume, retries of raising tasks (the model
runs every task with ``retries=0``), worker threads (each worker has one),
task durations and the cost model of stealing, stimulus ids.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import NamedTuple

from spec.world import (  # noqa: F401 - re-exported: `spec.model` is the one import
    State,
    RELEASED,
    WAITING,
    QUEUED,
    NO_WORKER,
    PROCESSING,
    MEMORY,
    ERRED,
    LOST,
    FORGOTTEN,
    IN_PROGRESS,
    FAILED,
    ERROR,
    KILLED,
    LOST_DATA,
    CANCELLED,
    Failure,
    KeySpec,
    ALL_FEATURES,
    Scope,
    Task,
    World,
    EMPTY,
    Report,
    Outcome,
    Submit,
    Release,
    Cancel,
    ClientLeaves,
    Scatter,
    WorkerJoins,
    WorkerDies,
    WorkerRetires,
    TaskStarts,
    TaskFinishes,
    TaskRaises,
    ReplicaAdded,
    ReplicaLost,
    CopyDropped,
    Replicate,
    Restart,
    SchedulerRestarts,
    FireAndForget,
    FIRE_AND_FORGET,
    THIEF_GONE,
    StealAnswered,
    WorkerPauses,
    WorkerResumes,
    Event,
    show,
    TRANSITIONS,
    InvalidTransition,
)


# -------------------------------------------------------------- the draft --


class _Draft:
    """A mutable copy of a world while one event is applied to it."""

    __slots__ = (
        "scope", "tasks", "live", "holds", "delivered", "faults", "cancelled", "moves", "recovering", "restarted",
        "paused",
    )

    def __init__(self, scope: Scope, world: World):
        self.scope = scope
        self.tasks: dict[str, Task] = dict(world.tasks)
        self.live: set[str] = set(world.live)
        self.holds: set[tuple[str, str]] = set(world.holds)
        self.delivered: set[tuple[str, str]] = set(world.delivered)
        self.paused: set[str] = set(world.paused)
        self.faults = world.faults
        self.cancelled: list[tuple[str, str]] = []  # holds dropped by cancellation
        self.moves: set[tuple[State, State]] = set()  # transitions taken (coverage)
        # After a scheduler restart: runs a worker said it still has, {key: worker}.
        self.recovering: dict[str, str] = {}
        # A scheduler restart: its clients resubmit one after the other, so
        # the new scheduler places each one's root tasks before it hears of
        # the next one's (user priority orders the tasks of one event).
        self.restarted = False

    def copy(self) -> _Draft:
        other = _Draft.__new__(_Draft)
        other.scope, other.faults = self.scope, self.faults
        other.tasks, other.live, other.holds = dict(self.tasks), set(self.live), set(self.holds)
        other.delivered = set(self.delivered)
        other.paused = set(self.paused)
        other.cancelled, other.moves = list(self.cancelled), set(self.moves)
        other.recovering = dict(self.recovering)
        other.restarted = self.restarted
        return other

    def freeze(self) -> World:
        return World(
            tuple(sorted(self.tasks.items())),
            frozenset(self.live),
            frozenset(self.holds),
            self.faults,
            # A released (or cancelled) hold takes its delivered value with it.
            frozenset(self.delivered & self.holds),
            frozenset(self.paused),
        )

    # -- queries --

    def held_keys(self) -> set[str]:
        return {k for _, k in self.holds}

    def dependents(self, key: str) -> list[str]:
        return [k for k, t in self.tasks.items() if key in t.deps]

    def needed(self, key: str) -> bool:
        """Held by a client, or an input of a dependent in progress."""
        if any(k == key for _, k in self.holds):
            return True
        return any(key in t.deps and t.state in IN_PROGRESS for t in self.tasks.values())

    def available(self, key: str) -> bool:
        t = self.tasks.get(key)
        return t is not None and t.state is MEMORY and bool(t.who_has)

    def running(self) -> set[str]:
        """The live workers that take new work: those not paused. (A new
        scheduler places work before the workers re-announce their pauses.)"""
        return set(self.live) if self.restarted else self.live - self.paused

    # -- the one way a state changes --

    def move(self, key: str, target: State, **changes) -> None:
        before = self.tasks[key].state if key in self.tasks else FORGOTTEN
        if (before, target) not in TRANSITIONS:
            raise InvalidTransition(f"{key}: {before.value} -> {target.value}")
        self.moves.add((before, target))
        if target is FORGOTTEN:
            del self.tasks[key]
            return
        t = self.tasks.get(key) or Task(target)
        fields = dict(state=target, **changes)
        if target is not PROCESSING:
            fields.setdefault("processing_on", None)
            fields.setdefault("running", False)
            fields.setdefault("thief", None)  # a pending steal ends with the assignment
        if target is not MEMORY:
            fields.setdefault("who_has", frozenset())
            fields.setdefault("pending", frozenset())
        if target not in FAILED:
            fields.setdefault("failure", None)
        self.tasks[key] = t._replace(**fields)

    def update(self, key: str, **changes) -> None:
        self.tasks[key] = self.tasks[key]._replace(**changes)


# ------------------------------------------------------ the event rules --
#
# Each event rule is a guard (may this event happen in this world?) and an
# effect (its direct consequences). `apply` settles the world afterwards.


def _guard(scope: Scope, w: World, ev: Event) -> bool:  # noqa: C901 - one case per event
    t = w.task(getattr(ev, "key", "")) if hasattr(ev, "key") else None
    match ev:
        case Submit(client, key):
            return client in scope.clients and key in scope.keys and not scope.keys[key].scattered
        case Release(client, key) | Cancel(client, key) | FireAndForget(client, key):
            # (The fire-and-forget pseudo-client is no client: it lets go by itself.)
            return client in scope.clients and (client, key) in w.holds
        case Replicate(client, key, n):
            return client in scope.clients and (client, key) in w.holds and n > 0
        case ClientLeaves(client):
            return client in scope.clients
        case Scatter(client, key, worker):
            return (
                client in scope.clients
                and key in scope.keys
                and scope.keys[key].scattered
                and worker in scope.workers
            )
        case WorkerJoins(worker, held):
            return worker in scope.workers and all(k in scope.keys for k in held)
        case WorkerDies(worker) | WorkerRetires(worker):
            return worker in w.live
        case TaskStarts(key):
            return t is not None and t.state is PROCESSING and not t.running
        case TaskFinishes(key, worker):
            # A result counts only from the worker the task is processing
            # on; from any other (a run it was taken from) it is ignored.
            return t is not None and t.state is PROCESSING and t.processing_on == worker
        case TaskRaises(key):
            return t is not None and t.state is PROCESSING
        case ReplicaAdded(key, worker):
            if t is not None and _awaits_copy(scope, key, t):
                return worker in t.pending  # the copy it waits for (and only that one)
            return t is not None and t.state is MEMORY and worker in w.live
        case ReplicaLost(key, holder, dependent, reporter):
            if t is not None and _awaits_copy(scope, key, t):
                # The copy it waits for failed: no holder is left to name
                # (the one named is any other the reporter was given).
                return dependent is None and reporter in t.pending and holder != reporter
            if t is None or t.state is not MEMORY or (holder is not None and holder not in t.who_has):
                return False
            if reporter is not None and (dependent is not None or reporter not in t.pending):
                return False
            if dependent is None:
                return True
            d = w.task(dependent)
            return d is not None and d.state is PROCESSING and key in d.deps
        case CopyDropped(key, worker):
            return t is not None and t.state is MEMORY and worker in t.who_has
        case StealAnswered(key, given_up):
            # A worker gives a task up only if it has not started it.
            return t is not None and t.state is PROCESSING and t.thief is not None and not (given_up and t.running)
        case WorkerPauses(worker):
            return worker in w.live and worker not in w.paused
        case WorkerResumes(worker):
            return worker in w.paused
        case Restart() | SchedulerRestarts():
            return True
    return False


def _effect(d: _Draft, ev: Event) -> None:  # noqa: C901 - one case per event
    scope = d.scope
    match ev:
        case Submit(client, key):
            # The lineage goes with the submission; keys the scheduler
            # already has are kept as they are ("same key, same lineage").
            for k in scope.lineage(key):
                if k in d.tasks or scope.keys[k].scattered:
                    continue
                linked = tuple(x for x in scope.keys[k].deps if x in d.tasks)
                d.move(k, RELEASED, deps=linked)
                unknown = [x for x in scope.keys[k].deps if x not in d.tasks]
                if unknown:
                    # Scattered data the scheduler never had (or forgot).
                    d.move(k, ERRED, failure=Failure(LOST_DATA, unknown[0]))
            if key in d.tasks and d.tasks[key].state is MEMORY:
                d.delivered.discard((client, key))  # reported again, without the value
            d.holds.add((client, key))
        case Release(client, key):
            d.holds.discard((client, key))
        case Cancel(client, key):
            stack, seen = [key], set()
            while stack:
                k = stack.pop()
                if k in seen or k not in d.tasks:
                    continue
                seen.add(k)
                stack.extend(d.dependents(k))
                if (client, k) in d.holds:
                    d.holds.discard((client, k))
                    d.cancelled.append((client, k))
        case ClientLeaves(client):
            d.holds = {(c, k) for c, k in d.holds if c != client}
        case Scatter(client, key, worker):
            t = d.tasks.get(key)
            if worker in d.live:
                if t is None or t.state is LOST:
                    d.move(key, MEMORY, who_has=frozenset({worker}))
                elif t.state is RELEASED:  # it awaited a copy: here is one
                    d.move(key, MEMORY, who_has=frozenset({worker}), pending=t.pending - {worker})
                else:
                    d.update(key, who_has=t.who_has | {worker}, pending=t.pending - {worker})
            elif t is None:
                # Its only copy died before the scheduler recorded it: the
                # data is lost, exactly as if it had died a moment later.
                d.move(key, LOST, failure=Failure(LOST_DATA, key))
            d.holds.add((client, key))
        case WorkerJoins(worker, held):
            if worker in d.live:
                # A new connection from an address thought alive: the old
                # incarnation died.
                _worker_leaves(d, worker, suspect=True)
                d.faults += 1
            d.live.add(worker)
            for k in held:
                t = d.tasks.get(k)
                if t is None:
                    continue  # (the core keeps it as an orphan for a while)
                if t.state is MEMORY:
                    d.update(k, who_has=t.who_has | {worker}, pending=t.pending - {worker})
                elif t.state in IN_PROGRESS or t.state is LOST:
                    # The value we were waiting for (or had lost) exists: take it.
                    d.move(k, MEMORY, who_has=frozenset({worker}))
                elif _awaits_copy(scope, k, t):
                    # Scattered data waiting for a copy: this is one.
                    d.move(k, MEMORY, who_has=frozenset({worker}), pending=t.pending - {worker})
                # released or erred: nobody needs that copy; it is freed
        case WorkerDies(worker):
            _worker_leaves(d, worker, suspect=True)
            d.faults += 1
        case WorkerRetires(worker):
            _worker_leaves(d, worker, suspect=False)
        case TaskStarts(key):
            d.update(key, running=True)
        case TaskFinishes(key, worker):
            # From the worker it is assigned to (the guard says so). A finish
            # from anywhere else, including a second finish of a value
            # already in memory, is a no-op: that run was cancelled and its
            # value is being dropped.
            d.move(key, MEMORY, who_has=frozenset({worker}))
            if scope.keys[key].small:
                # The value rides with the report to every client holding it.
                d.delivered |= {(c, k) for c, k in d.holds if k == key}
        case TaskRaises(key):
            d.move(key, ERRED, failure=Failure(ERROR, key))
        case ReplicaAdded(key, worker):
            t = d.tasks[key]
            if t.state is RELEASED:
                # The copy awaited since its last holder left (rule
                # "await-copy"): back in memory, and what waits on it runs.
                d.move(key, MEMORY, who_has=frozenset({worker}), pending=t.pending - {worker})
            else:
                d.update(key, who_has=t.who_has | {worker}, pending=t.pending - {worker})
        case ReplicaLost(key, holder, dependent, reporter):
            t = d.tasks[key]
            if t.state is RELEASED:
                # An awaited copy failed; with none left on its way the data
                # is lost (rule "copy-not-coming").
                d.update(key, pending=t.pending - {reporter})
                d.faults += 1
                return
            if dependent is not None:
                reporter = d.tasks[dependent].processing_on
            # The reporter is no holder either: a worker only reports inputs
            # it does not have. Only a holder that answered without the value
            # is named (`holder`); one that did not answer stays a holder.
            d.update(key, who_has=t.who_has - {holder, reporter}, pending=t.pending - {reporter})
            if dependent is not None:
                d.move(dependent, WAITING)
            d.faults += 1
        case CopyDropped(key, worker):
            t = d.tasks[key]
            d.update(key, who_has=t.who_has - {worker})
        case Replicate(client, key, n):
            d.update(key, replicas=n if n > 1 else 0)
        case StealAnswered(key, given_up):
            t = d.tasks[key]
            if not given_up:
                d.update(key, thief=None)  # it started (or finished): it stays
            elif t.thief in d.live and t.thief not in d.paused:
                # Only now, the victim having given it up, does the thief get it.
                d.move(key, PROCESSING, processing_on=t.thief, running=False, thief=None)
            else:
                d.move(key, WAITING)  # its thief left or paused: placed afresh
        case WorkerPauses(worker):
            d.paused.add(worker)
        case WorkerResumes(worker):
            d.paused.discard(worker)
        case FireAndForget(client, key):
            # Held by the pseudo-client until it has a value or a failure
            # (rule "fired-done"); a key with its value already needs nothing.
            if d.tasks[key].state in (*IN_PROGRESS, RELEASED):
                d.holds.add((FIRE_AND_FORGET, key))
        case Restart():
            for client, key in sorted(d.holds):
                d.cancelled.append((client, key))
            d.holds.clear()
            for key in list(d.tasks):
                d.move(key, FORGOTTEN)
        case SchedulerRestarts():
            _scheduler_restarts(d)
            d.faults += 1


def _worker_leaves(d: _Draft, worker: str, *, suspect: bool) -> None:
    """Take `worker` out: reroute its tasks, drop its copies.

    A task that was *running* there is suspected once more (unless the
    departure was expected); at allowed_failures suspicions it is erred with
    KilledWorker and never runs again. A task only assigned there is simply
    rerouted.
    """
    d.live.discard(worker)
    d.paused.discard(worker)
    for key, t in list(d.tasks.items()):
        if t.thief == worker:
            d.update(key, thief=THIEF_GONE)
            t = d.tasks[key]
        if t.state is PROCESSING and t.processing_on == worker:
            if t.running and suspect:
                n = t.suspicious + 1
                if n >= d.scope.allowed_failures:
                    d.move(key, ERRED, suspicious=n, failure=Failure(KILLED, key))
                    continue
                d.update(key, suspicious=n)
            d.move(key, WAITING)
        elif worker in t.who_has or worker in t.pending:
            d.update(key, who_has=t.who_has - {worker}, pending=t.pending - {worker})


def _scheduler_restarts(d: _Draft) -> None:
    """A fresh scheduler rebuilds from what workers and clients still have.

    Workers re-register the values they hold; clients re-submit the lineage
    of every key they hold, in either order (keys already held by a live
    worker go to memory; computed keys nobody holds are recomputed;
    scattered keys nobody holds are lost once the recovery window closes). A run a worker still has in a thread may be
    taken up where it is (`_place`), never started a second time. What only
    the old scheduler knew is gone: suspicion counts, replication requests,
    assignments not yet started.
    """
    old = d.tasks
    d.tasks = {}
    d.delivered = set()  # the new scheduler knows of no value sent to a client
    d.restarted = True
    # Fire-and-forget holds lived in the old scheduler only.
    d.holds = {(c, k) for c, k in d.holds if c != FIRE_AND_FORGET}
    wanted: set[str] = set()
    for _, key in d.holds:
        wanted.update(d.scope.lineage(key))
    for key in d.scope.keys:
        if key not in wanted:
            continue
        t = old.get(key)
        holders = t.who_has if t is not None and t.state is MEMORY else frozenset()
        deps = d.scope.keys[key].deps
        if holders:
            if d.scope.keys[key].scattered:
                # Its record comes from a client's resubmission and its
                # value from a worker, in either order: a record made first
                # waits (released) for the value while the recovery window
                # is open.
                d.move(key, RELEASED, deps=deps)
            d.move(key, MEMORY, deps=deps, who_has=holders)
            continue
        d.move(key, RELEASED, deps=deps)
        if d.scope.keys[key].scattered:
            d.move(key, LOST, failure=Failure(LOST_DATA, key))
        elif t is not None and t.state is PROCESSING and t.running:
            d.recovering[key] = t.processing_on


# --------------------------------------------------- the internal rules --
#
# Settling: each rule is (name, source states, guard, effect). `_settle`
# fires the first enabled rule (in this order, keys in sorted order) until
# none is; an effect may return several alternatives (a nondeterministic
# choice), and then the world splits.


class _Context:
    """Who is needed and who is referenced, computed once per settling pass
    (every rule that fires ends the pass, so it is never stale)."""

    __slots__ = ("must_compute", "needed", "referenced")

    def __init__(self, d: _Draft):
        self.needed = {k for _, k in d.holds}  # held by a client ...
        # ... that lacks the value, or (below) an input of work in progress.
        self.must_compute = {k for c, k in d.holds if (c, k) not in d.delivered}
        self.referenced: set[str] = set()
        for t in d.tasks.values():
            self.referenced.update(t.deps)
            if t.state in IN_PROGRESS:
                self.needed.update(t.deps)  # ... or an input of work in progress
                self.must_compute.update(t.deps)


def _failed_inputs(d: _Draft, t: Task) -> list[Failure]:
    out: list[Failure] = []
    for x in t.deps:
        f = d.tasks[x].failure if x in d.tasks and d.tasks[x].state in FAILED else None
        if f is not None and f not in out:
            out.append(f)
    return out


def _rule_fired_done(d: _Draft, key: str, t: Task, ctx: _Context) -> list[_Draft] | None:
    """A fired-and-forgotten key has a value or a failure: the pseudo-client lets go."""
    if (FIRE_AND_FORGET, key) not in d.holds or (t.state is MEMORY and not t.who_has):
        return None
    d.holds.discard((FIRE_AND_FORGET, key))
    return [d]


def _awaits_copy(scope: Scope, key: str, t: Task) -> bool:
    """Scattered data released: its last holder left while a live worker was
    fetching a copy (`pending`), and it waits for that copy (INV-AWAITED)."""
    return t.state is RELEASED and scope.keys[key].scattered


def _rule_last_copy(d: _Draft, key: str, t: Task, ctx: _Context) -> list[_Draft] | None:
    """memory, no copy left: recompute, release, forget, await a copy, or lose it."""
    if t.who_has:
        return None
    scattered = d.scope.keys[key].scattered
    needed, referenced = key in ctx.needed, key in ctx.referenced
    # A live worker is fetching a copy when asked to (replication: pending)
    # and when it was sent a dependent that needs the value; the latter
    # answers with the copy or with its failure even once that dependent
    # is taken back (seeds 789 and 829 of the chaos lab).
    fetching = t.pending | {
        x.processing_on
        for x in d.tasks.values()
        if x.state is PROCESSING and key in x.deps and x.processing_on in d.live
    }
    if scattered and (needed or referenced) and fetching:
        # The copy may exist already (its report on its way): wait for it,
        # released; the pending copies are kept (await-copy).
        d.move(key, RELEASED, pending=frozenset(fetching))
    elif scattered and (needed or referenced):
        d.move(key, LOST, failure=Failure(LOST_DATA, key))  # last-copy-lost
    elif not needed and not referenced:
        d.move(key, FORGOTTEN)  # unreferenced
    elif scattered:
        raise AssertionError("unreachable")
    elif key in ctx.must_compute:
        d.move(key, WAITING)  # recompute
    else:
        d.move(key, RELEASED)  # not-needed, or its holders have the value (lineage kept)
    return [d]


def _rule_copy_not_coming(d: _Draft, key: str, t: Task, ctx: _Context) -> list[_Draft] | None:
    """released scattered data, no copy on its way any more (the fetch
    failed, or the worker fetching it left): lost now (if still kept)."""
    if not d.scope.keys[key].scattered or t.pending:
        return None
    if key not in ctx.needed and key not in ctx.referenced:
        return None  # unreferenced: forgotten
    d.move(key, LOST, failure=Failure(LOST_DATA, key))
    return [d]


def _rule_input_failed(d: _Draft, key: str, t: Task, ctx: _Context) -> list[_Draft] | None:
    """in progress, an input failed: fail with the input's failure (same error)."""
    failures = _failed_inputs(d, t)
    if not failures:
        return None
    out = []
    for f in failures:
        alt = d.copy() if len(failures) > 1 else d
        alt.move(key, ERRED, failure=f)
        out.append(alt)
    return out


def _rule_not_needed(d: _Draft, key: str, t: Task, ctx: _Context) -> list[_Draft] | None:
    """memory, nobody needs it: drop the value; in progress, nobody needs its
    value (a client that has it does not need it computed): drop the run."""
    if key in (ctx.needed if t.state is MEMORY else ctx.must_compute):
        return None
    referenced = key in ctx.referenced
    if t.state is MEMORY:
        if d.scope.keys[key].scattered:
            if referenced:
                return None  # scattered data is kept while referenced
            d.move(key, FORGOTTEN)
        elif referenced:
            d.move(key, RELEASED)
        else:
            d.move(key, FORGOTTEN)
        return [d]
    d.move(key, RELEASED)
    return [d]


def _rule_needed(d: _Draft, key: str, t: Task, ctx: _Context) -> list[_Draft] | None:
    """released, its value needed again: wait for (and recompute) its inputs.
    (Scattered data is never computed: released, it awaits a copy.)"""
    if key not in ctx.must_compute or d.scope.keys[key].scattered:
        return None
    d.move(key, WAITING)
    return [d]


def _rule_input_gone(d: _Draft, key: str, t: Task, ctx: _Context) -> list[_Draft] | None:
    """queued/no-worker/processing, an input is no longer in memory: wait again."""
    if all(d.available(x) for x in t.deps):
        return None
    d.move(key, WAITING)
    return [d]


def _rule_unreferenced(d: _Draft, key: str, t: Task, ctx: _Context) -> list[_Draft] | None:
    """released/erred/lost, not needed, no dependent record: forget it."""
    if key in ctx.needed or key in ctx.referenced:
        return None
    d.move(key, FORGOTTEN)
    return [d]


class Rule(NamedTuple):
    name: str
    sources: tuple[State, ...]
    fire: object  # (draft, key, task, context) -> list[_Draft] | None


RULES: tuple[Rule, ...] = (
    Rule("fired-done", (MEMORY, ERRED, LOST), _rule_fired_done),
    Rule("last-copy-lost / recompute / await-copy", (MEMORY,), _rule_last_copy),
    Rule("copy-not-coming", (RELEASED,), _rule_copy_not_coming),
    Rule("input-failed", IN_PROGRESS, _rule_input_failed),
    # "needed" before "not-needed": a dependent about to wait makes its
    # inputs needed, so a value it will use is not dropped in between.
    Rule("needed", (RELEASED,), _rule_needed),
    Rule("not-needed", (*IN_PROGRESS, MEMORY), _rule_not_needed),
    Rule("input-gone", (NO_WORKER, PROCESSING), _rule_input_gone),
    Rule("unreferenced", (RELEASED, ERRED, LOST), _rule_unreferenced),
)


def _settle(d: _Draft) -> list[_Draft]:
    """Fire internal rules until none is enabled, then place ready tasks."""
    done: list[_Draft] = []
    todo = [d]
    while todo:
        cur = todo.pop()
        fired = None
        keys = sorted(cur.tasks)
        ctx = _Context(cur)
        for rule in RULES:
            for key in keys:
                t = cur.tasks[key]
                if t.state in rule.sources:
                    fired = rule.fire(cur, key, t, ctx)
                    if fired is not None:
                        break
            if fired is not None:
                break
        if fired is None:
            for alt in _keep_replicas(cur):
                for placed in _place(alt):
                    done.extend(_steal(placed))
        else:
            todo.extend(fired)
    return done


def _keep_replicas(d: _Draft) -> list[_Draft]:
    """Replicated values: ask enough live non-holders for a copy (Replicate).

    Which workers are asked is policy (the core picks those holding the
    fewest values); the model allows any.
    """
    drafts = [d]
    for key in sorted(d.tasks):
        t = d.tasks[key]
        if t.state is not MEMORY or not t.replicas:
            continue
        pending = frozenset(w for w in t.pending if w in d.live and w not in t.who_has)
        short = min(t.replicas, len(d.live)) - len(t.who_has) - len(pending)
        candidates = sorted(d.live - t.who_has - pending)
        choices = list(itertools.combinations(candidates, short)) if short > 0 else [()]
        out = []
        for cur in drafts:
            for chosen in choices:
                alt = cur.copy() if len(choices) > 1 else cur
                alt.update(key, pending=pending | set(chosen))
                out.append(alt)
        drafts = out
    return drafts


def _allowed(d: _Draft, key: str) -> list[str]:
    """The live workers a constrained task may run on (resources not counted).

    Its restrictions, or, if loose and none of them is alive, every live
    worker; of those, the ones that declared at least the resources it needs.
    """
    spec, scope = d.scope.keys[key], d.scope
    allowed = sorted(d.live) if spec.restrict is None else [w for w in spec.restrict if w in d.live]
    if spec.loose and not allowed:
        allowed = sorted(d.live)
    running = d.running()
    return [w for w in allowed if w in running and all(scope.has(w, r) >= n for r, n in spec.resources)]


def _place(d: _Draft) -> list[_Draft]:
    """Every ready task goes to a worker, the queue, or no-worker (rule "ready").

    Ready: waiting with every input in memory, or already queued/no-worker.
    A constrained task (restrictions or resources) goes to an allowed live
    worker with its resources free (the resources held by the tasks
    processing there counted), else to no-worker, and may stay there only
    while no such worker can take it. A task with inputs goes to a worker
    holding one of them (one that is not paused; if every holder is, any
    worker that is not; if every worker is, it waits in no-worker). A root
    task goes to a live worker below capacity, or queues; it may stay queued
    only while every live worker is saturated, and never while a root task of
    lower user priority is sent out. A paused worker gets nothing new (the
    only exception: a run it still has after a scheduler restart is taken up
    there). Which worker is not the model's concern.
    """
    ready = [
        k
        for k, t in sorted(d.tasks.items())
        if (t.state is WAITING and all(d.available(x) for x in t.deps))
        or t.state in (QUEUED, NO_WORKER)
    ]
    if not ready:
        return [d]
    scope = d.scope
    load = {w: 0 for w in d.live}
    used = {w: {} for w in d.live}
    for k, t in d.tasks.items():
        if t.state is PROCESSING:
            load[t.processing_on] += 1
            for r, n in scope.keys[k].resources:
                used[t.processing_on][r] = used[t.processing_on].get(r, 0) + n
    running = d.running()
    choices: list[list[tuple[State, str | None, bool]]] = []
    roots: list[bool] = []
    allowed: dict[str, list[str]] = {}
    for k in ready:
        spec, t = scope.keys[k], d.tasks[k]
        if spec.constrained:
            allowed[k] = _allowed(d, k)
            opts = [(PROCESSING, w, False) for w in allowed[k]] + [(NO_WORKER, None, False)]
            root = False
        elif t.deps:
            holders = sorted(set().union(*(d.tasks[x].who_has for x in t.deps)) & running) or sorted(running)
            allowed[k] = sorted(running)
            opts = [(PROCESSING, w, False) for w in holders] or [(NO_WORKER, None, False)]
            root = False
        else:
            opts = [(PROCESSING, w, False) for w in sorted(running)] + [(QUEUED, None, False)]
            root = True
        if d.recovering.get(k) in d.live:
            # After a scheduler restart: the run its worker still has is
            # taken up there (already running), unless it was placed before
            # that worker re-registered.
            opts = [(PROCESSING, d.recovering[k], True), *opts]
        choices.append(opts)
        roots.append(root)
    out = []
    for combo in itertools.product(*choices):
        new_roots = {w: 0 for w in d.live}
        for (state, w, recovered), root in zip(combo, roots):
            if state is PROCESSING and root and not recovered:
                new_roots[w] += 1
        if any(load[w] + new_roots[w] > scope.capacity for w in d.live if new_roots[w]):
            continue
        total = dict(load)
        holding = {w: dict(used[w]) for w in d.live}
        for k, (state, w, _) in zip(ready, combo):
            if state is PROCESSING:
                total[w] += 1
                for r, n in scope.keys[k].resources:
                    holding[w][r] = holding[w].get(r, 0) + n
        if not d.restarted and any(
            s is PROCESSING and not rec and any(holding[w][r] > scope.has(w, r) for r, _ in scope.keys[k].resources)
            for k, (s, w, rec) in zip(ready, combo)
        ):
            # A task is sent only where its resources are free. (After a
            # scheduler restart the clients' resubmissions arrive one by one,
            # and a run a worker still has is taken up where it runs: the
            # new scheduler may have placed another task on its resources
            # before it learnt of it.)
            continue
        if any(
            state is NO_WORKER
            and any(all(holding[w].get(r, 0) + n <= scope.has(w, r) for r, n in scope.keys[k].resources)
                    for w in allowed[k])
            for k, (state, _, _) in zip(ready, combo)
        ):
            continue  # a constrained task idles while an allowed worker could take it
        if any(s is QUEUED for s, _, _ in combo) and any(
            total[w] < scope.capacity for w in running
        ):
            continue  # a root task may not queue while a worker is below capacity
        sent = [scope.keys[k].priority for k, (s, _, rec), root in zip(ready, combo, roots) if root and s is PROCESSING and not rec]
        kept = [scope.keys[k].priority for k, (s, _, _) in zip(ready, combo) if s is QUEUED]
        if sent and kept and max(kept) > min(sent) and not d.restarted:
            continue  # the user's priority comes first
        alt = d.copy() if len(choices) > 1 or len(choices[0]) > 1 else d
        for k, (state, w, recovered) in zip(ready, combo):
            if alt.tasks[k].state is not state or alt.tasks[k].processing_on != w:
                if w is None:
                    alt.move(k, state)
                else:
                    alt.move(k, state, processing_on=w, running=recovered)
        out.append(alt)
    assert out, f"no placement for {ready}"
    return out


def _steal(d: _Draft) -> list[_Draft]:
    """Rule "steal" (the "steal" feature): a worker with nothing to do may ask
    for a task that waits on another worker.

    A *thief* is a live worker, not paused, with no task processing and no
    steal pending toward it (workers have one thread). It may ask for any
    task processing on another worker that has not started, has no steal
    pending, has no restrictions or resources, and waits: its worker has
    another task processing, or is paused. Each thief asks for one task or
    none; whether it does is the core's cost model, so both are allowed. The
    task does not move yet: its worker's answer decides (`StealAnswered`).
    """
    if "steal" not in d.scope.features:
        return [d]
    # (After a scheduler restart the new scheduler may steal for a worker
    # that has not re-announced its pause yet, as it may place work there.)
    running = d.running()
    load = {w: 0 for w in d.live}
    for t in d.tasks.values():
        if t.state is PROCESSING:
            load[t.processing_on] += 1
    expected = {t.thief for t in d.tasks.values() if t.thief is not None}
    thieves = [w for w in sorted(running) if load[w] == 0 and w not in expected]
    candidates = [
        k
        for k, t in sorted(d.tasks.items())
        if t.state is PROCESSING
        and not t.running
        and t.thief is None
        and not d.scope.keys[k].constrained
        and (t.processing_on in d.paused or load[t.processing_on] >= 2)
    ]
    if not thieves or not candidates:
        return [d]
    out = []
    for combo in itertools.product(*([None, *candidates] for _ in thieves)):
        picked = [k for k in combo if k is not None]
        if len(picked) != len(set(picked)):
            continue  # one steal per task
        alt = d.copy() if picked else d
        for thief, k in zip(thieves, combo):
            if k is not None:
                alt.update(k, thief=thief)
        out.append(alt)
    return out


# -------------------------------------------------------------- the API --


def apply(scope: Scope, world: World, event: Event) -> list[Outcome]:
    """Every outcome `event` may have in `world`; [] if its guard is false."""
    if not _guard(scope, world, event):
        return []
    draft = _Draft(scope, world)
    _effect(draft, event)
    outcomes = []
    seen = set()
    for d in _settle(draft):
        post = d.freeze()
        reports = _reports(world, post, d.cancelled)
        post = _keep_delivered(scope, post, reports, event)
        if post in seen:
            continue
        seen.add(post)
        outcomes.append(Outcome(post, reports, _computes(world, post), frozenset(d.moves)))
    return outcomes


def _keep_delivered(scope: Scope, post: World, reports: frozenset[Report], event: Event) -> World:
    """A client keeps the value of its latest report only: every report of
    this step but the one of a small value finishing takes it back. (No
    client that has the value is told it was lost.)"""
    brought = event.key if isinstance(event, TaskFinishes) and scope.keys[event.key].small else None
    taken = {(r.client, r.key) for r in reports if r.key != brought or r.kind != "finished"}
    if not taken & post.delivered:
        return post
    return post._replace(delivered=post.delivered - taken)


def _reports(pre: World, post: World, cancelled: list[tuple[str, str]]) -> frozenset[Report]:
    """What each client must be told about the keys it holds after a step."""
    out = {Report("cancelled", c, k) for c, k in cancelled}
    for client, key in post.holds:
        before, after = pre.task(key), post.task(key)
        assert after is not None
        newly_held = (client, key) not in pre.holds
        if after.state is MEMORY and (newly_held or before is None or before.state is not MEMORY):
            out.add(Report("finished", client, key))
        if after.state in FAILED and (
            newly_held or before is None or before.failure != after.failure
        ):
            out.add(Report("erred", client, key, after.failure))
        if (
            not newly_held
            and before is not None
            and before.state is MEMORY
            and after.state in IN_PROGRESS
            and (client, key) not in pre.delivered  # a client with the value keeps it
        ):
            out.add(Report("lost", client, key))
    return frozenset(out)


def _computes(pre: World, post: World) -> frozenset[tuple[str, str]]:
    out = set()
    for key, t in post.tasks:
        if t.state is PROCESSING:
            b = pre.task(key)
            if b is None or b.state is not PROCESSING or b.processing_on != t.processing_on:
                out.add((t.processing_on, key))
    return frozenset(out)


def enabled_events(scope: Scope, w: World) -> Iterator[Event]:
    """The events the explorer tries in `w` (each still passes its guard)."""
    f = scope.features
    can_fault = w.faults < scope.max_faults
    tasks = dict(w.tasks)
    for c in scope.clients:
        for k in scope.computed():
            if (c, k) not in w.holds:
                yield Submit(c, k)
        for k in scope.scattered():
            if (c, k) not in w.holds:
                for wk in scope.workers:
                    if wk in w.live or "scatter-to-dead" in f:
                        yield Scatter(c, k, wk)
    for c, k in sorted(w.holds):
        if c == FIRE_AND_FORGET:
            continue
        yield Release(c, k)
        if "cancel" in f:
            yield Cancel(c, k)
        t = tasks[k]
        if "fire-and-forget" in f and (FIRE_AND_FORGET, k) not in w.holds and t.state in (*IN_PROGRESS, RELEASED):
            yield FireAndForget(c, k)
        if "replicate" in f and t.state is MEMORY and not t.replicas:
            yield Replicate(c, k, 2)
        if "replicate" in f and t.state is MEMORY and can_fault:
            for h in sorted(t.who_has):
                for r in sorted(t.pending):
                    yield ReplicaLost(k, h, None, r)
            for r in sorted(t.pending):
                yield ReplicaLost(k, None, None, r)  # no holder answered
    if "client-leaves" in f:
        for c in sorted({c for c, _ in w.holds} - {FIRE_AND_FORGET}):
            yield ClientLeaves(c)
    for wk in scope.workers:
        if wk not in w.live:
            yield WorkerJoins(wk)
            if "rejoin-with-data" in f:
                for k, t in w.tasks:
                    if t.state is MEMORY or t.state in IN_PROGRESS or t.state is LOST or t.pending:
                        yield WorkerJoins(wk, (k,))
        else:
            if can_fault:
                yield WorkerDies(wk)
                if "reconnect" in f:
                    yield WorkerJoins(wk)
            if "retire" in f:
                yield WorkerRetires(wk)
    for k, t in w.tasks:
        if t.state is PROCESSING:
            if not t.running:
                yield TaskStarts(k)
            yield TaskFinishes(k, t.processing_on)
            yield TaskRaises(k)
        if t.state in IN_PROGRESS and "stale-finish" in f:
            # A run it was taken from (rerouted, released) finished after
            # all: the guard makes it a no-op, which the explorer checks.
            for wk in sorted(w.live - {t.processing_on}):
                yield TaskFinishes(k, wk)
        elif t.state is RELEASED and t.pending:
            # Scattered data awaiting a copy: it comes, or (a fault) fails.
            for wk in sorted(t.pending):
                yield ReplicaAdded(k, wk)
                if can_fault:
                    for h in scope.workers:
                        if h != wk:
                            yield ReplicaLost(k, h, None, wk)
                            break
        elif t.state is MEMORY:
            for wk in sorted(w.live - t.who_has):
                yield ReplicaAdded(k, wk)
            if can_fault:
                for h in sorted(t.who_has):
                    yield ReplicaLost(k, h)
                    for dk, dt in w.tasks:
                        if dt.state is PROCESSING and k in dt.deps:
                            yield ReplicaLost(k, h, dk)
                for dk, dt in w.tasks:
                    if dt.state is PROCESSING and k in dt.deps:
                        yield ReplicaLost(k, None, dk)  # no holder answered
    if "steal" in f:
        for k, t in w.tasks:
            if t.state is PROCESSING and t.thief is not None:
                yield StealAnswered(k, False)
                if not t.running:
                    yield StealAnswered(k, True)
    if "pause" in f:
        for wk in sorted(w.live):
            yield WorkerResumes(wk) if wk in w.paused else WorkerPauses(wk)
    if "restart" in f and (w.tasks or w.holds):
        yield Restart()
    if "scheduler-restart" in f and can_fault:
        yield SchedulerRestarts()
