"""One worker's task states, as a state machine, with its invariants.

Rules: as in `spec.model` (immutable worlds, nondeterministic where the
policy is not part of the contract, no import from trioflow).

Theory of operation
-------------------
The scheduler assigns a task (`Compute`) and says, for each input, which
peers hold it. Inputs not here become FETCH records; a fetch goes out as a
request to one holder (FLIGHT). A task whose inputs are all here is READY,
and EXECUTING once a thread takes it. The worker's environment is part of
the world: which threads run (one per `Execute` sent and not yet finished)
and which requests to peers are outstanding (one per `Gather` sent and not
yet answered). That is what lets the invariants talk about the real world:
a function never runs twice at once, a request to a dead peer is retried
elsewhere or reported, a value is not dropped while a task here needs it.

Two situations make this more than a queue:

* The scheduler may release a task while its thread runs. A thread cannot be
  interrupted, so the task is CANCELLED: asked for again, it is EXECUTING
  again (the running thread serves); otherwise its result is dropped when
  the thread ends (kept, and reported as a copy, if a task here needs it).
* A fetch can fail. The next holder is tried; when none is left the worker
  reports the input missing and drops the tasks that needed it; the
  scheduler decides what happens next.

Work stealing and memory add two requests. A `Steal` asks the worker to give
a task up for another worker: it does so only if the task's thread has not
started (waiting or ready), and says which. A `Pause` (memory past its pause
fraction) stops new threads and new requests until `Resume`.

Which ready task takes a free thread, and which holder a fetch goes to, are
left open (the core uses priorities and holder order).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Iterator, Mapping
from typing import NamedTuple

ME = "me"  # this worker's own address


class WState(enum.Enum):
    """The states of a task on a worker, spelled as in the core."""

    WAITING = "waiting"  # assigned here; some input is not here yet
    READY = "ready"  # assigned here; every input is here; waits for a thread
    EXECUTING = "executing"  # its function runs in a thread
    CANCELLED = "cancelled"  # its thread runs, but the scheduler released it
    FETCH = "fetch"  # a value to fetch from a peer; no request yet
    FLIGHT = "flight"  # a request to a peer is on its way
    MEMORY = "memory"  # the value is here

    __hash__ = object.__hash__


WAITING, READY, EXECUTING, CANCELLED, FETCH, FLIGHT, MEMORY = WState
RUNNING = (EXECUTING, CANCELLED)  # a thread runs it
USES_INPUTS = (WAITING, READY, EXECUTING, CANCELLED)  # needs its inputs kept


@dataclasses.dataclass(frozen=True)
class WorkerScope:
    """The bounds of a worker model.

    Attributes:
        tasks: keys the scheduler may assign here, with their inputs.
        inputs: keys computed elsewhere (fetched, replicated or put here).
        peers: other workers that may hold values.
        nthreads: threads of this worker.
        max_gathers: peers fetched from at once.
        max_faults: failed or incomplete answers from peers the explorer injects.
        steals: whether the explorer asks for steals of assigned tasks.
        pauses: whether the explorer pauses and resumes the worker.
    """

    tasks: Mapping[str, tuple[str, ...]]
    inputs: tuple[str, ...] = ()
    peers: tuple[str, ...] = ("p1", "p2")
    nthreads: int = 1
    max_gathers: int = 1
    max_faults: int = 2
    steals: bool = False  # the explorer tries Steal
    pauses: bool = False  # the explorer tries Pause and Resume

    def __hash__(self) -> int:
        return hash((tuple(self.tasks.items()), self.inputs, self.peers))


class WTask(NamedTuple):
    state: WState
    assigned: bool = False  # the scheduler asked this worker to compute it
    freed: bool = False  # the scheduler freed it while a task here needs it
    deps: tuple[str, ...] = ()  # inputs, while it still needs them
    holders: frozenset[str] = frozenset()  # peers to try (FETCH/FLIGHT)
    tried: frozenset[str] = frozenset()  # peers that failed to provide it
    # FLIGHT, and the scheduler asked us to compute it too: the `who_has` of
    # that request, used if the fetch fails.
    request: tuple | None = None
    # Of `tried`, the peers that answered that they lack it (the others did
    # not answer: they may still hold it). Only these are named when the
    # value is reported missing (chaos lab seeds 75 and 439 of the hang mix).
    lacking: frozenset[str] = frozenset()


class WWorld(NamedTuple):
    tasks: tuple[tuple[str, WTask], ...]
    threads: frozenset[str]  # keys whose thread runs (Execute sent, not done)
    gathers: frozenset[tuple[str, frozenset[str]]]  # outstanding requests: (peer, keys)
    faults: int
    paused: bool = False  # memory past the pause fraction: nothing new starts

    def task(self, key: str) -> WTask | None:
        for k, t in self.tasks:
            if k == key:
                return t
        return None


# Instructions, as plain tuples: ("execute", key), ("gather", peer, keys),
# ("drop", key), ("started", key), ("finished", key), ("erred", key),
# ("replica-added", key), ("missing", key, dependent-or-None, holders named), ("dropped", key),
# ("steal-answer", key, given_up).
Instruction = tuple


class WOutcome(NamedTuple):
    world: WWorld
    instructions: frozenset[Instruction]


# ----------------------------------------------------------------- events --


class Compute(NamedTuple):
    """The scheduler assigns `key`; `who_has` is ((input, holders), ...)."""

    key: str
    who_has: tuple[tuple[str, tuple[str, ...]], ...] = ()


class Free(NamedTuple):
    """The scheduler no longer needs `key` here (its value or its run).

    `heard`: the scheduler had heard every report of `key` from here when
    it sent the free, so no report can be crossing it."""

    key: str
    heard: bool = False


class Replicas(NamedTuple):
    """The scheduler wants a copy of `key` here, from `holders`."""

    key: str
    holders: tuple[str, ...]


class Put(NamedTuple):
    """A client's data for `key` was stored here directly (scatter)."""

    key: str


class ExecutionDone(NamedTuple):
    """The thread running `key` ended: its function returned, or raised."""

    key: str
    ok: bool


class GatherDone(NamedTuple):
    """`peer` answered: it sent `got`; the rest of the request it lacked."""

    peer: str
    got: tuple[str, ...]


class GatherFailed(NamedTuple):
    """The request to `peer` failed: it died or the connection broke (a fault)."""

    peer: str


class Steal(NamedTuple):
    """The scheduler would move `key` to another worker if it has not started here."""

    key: str


class Pause(NamedTuple):
    """This worker's memory passed its pause fraction."""


class Resume(NamedTuple):
    """This worker's memory is back under its pause fraction."""


WEvent = Compute | Free | Replicas | Put | ExecutionDone | GatherDone | GatherFailed | Steal | Pause | Resume


def show(event: WEvent) -> str:
    return f"{type(event).__name__}({', '.join(repr(a) for a in event)})"


def initial(scope: WorkerScope) -> WWorld:
    return WWorld((), frozenset(), frozenset(), 0)


def describe(w: WWorld) -> str:
    parts = []
    for k, t in w.tasks:
        flags = [f for f, on in (("assigned", t.assigned), ("freed", t.freed), ("request", t.request)) if on]
        if t.deps:
            flags.append("deps=" + ",".join(t.deps))
        if t.holders:
            flags.append("holders=" + ",".join(sorted(t.holders)))
        if t.tried:
            flags.append("tried=" + ",".join(sorted(t.tried)))
        if t.lacking:
            flags.append("lacking=" + ",".join(sorted(t.lacking)))
        parts.append(f"{k}:{t.state.value}" + (f"[{' '.join(flags)}]" if flags else ""))
    gathers = "; ".join(f"{p}<-{','.join(sorted(ks))}" for p, ks in sorted(w.gathers))
    paused = " paused" if w.paused else ""
    return f"tasks {{{'; '.join(parts)}}} threads {sorted(w.threads)} gathers {{{gathers}}} faults {w.faults}{paused}"


# -------------------------------------------------------------- the draft --


class _Draft:
    __slots__ = ("scope", "tasks", "threads", "gathers", "faults", "out", "paused")

    def __init__(self, scope: WorkerScope, w: WWorld):
        self.scope = scope
        self.tasks: dict[str, WTask] = dict(w.tasks)
        self.threads: set[str] = set(w.threads)
        self.gathers: dict[str, frozenset[str]] = dict(w.gathers)
        self.faults = w.faults
        self.paused = w.paused
        self.out: set[Instruction] = set()

    def copy(self) -> _Draft:
        other = _Draft.__new__(_Draft)
        other.scope, other.faults, other.paused = self.scope, self.faults, self.paused
        other.tasks, other.threads = dict(self.tasks), set(self.threads)
        other.gathers, other.out = dict(self.gathers), set(self.out)
        return other

    def freeze(self) -> WWorld:
        return WWorld(
            tuple(sorted(self.tasks.items())),
            frozenset(self.threads),
            frozenset(self.gathers.items()),
            self.faults,
            self.paused,
        )

    def dependents(self, key: str) -> list[str]:
        return [k for k, t in self.tasks.items() if key in t.deps]

    def set(self, key: str, **changes) -> None:
        self.tasks[key] = self.tasks[key]._replace(**changes)

    def forget(self, key: str) -> None:
        """Drop `key` (its value too), then the inputs nothing else here needs."""
        t = self.tasks.pop(key)
        if t.state in (MEMORY, CANCELLED):
            self.out.add(("drop", key))
        self.release_inputs(key, t.deps)

    def release_inputs(self, key: str, deps: tuple[str, ...]) -> None:
        """`key` no longer needs `deps`: forget those fetched or freed for it alone."""
        if key in self.tasks:
            self.set(key, deps=())
        for d in deps:
            dep = self.tasks.get(d)
            if dep is None or self.dependents(d):
                continue
            if dep.state is FETCH and not dep.assigned:
                # A fetch that never began ends: said, naming no holder (the
                # scheduler may await this copy of scattered data whose last
                # holder left; its rule "await-copy").
                self.out.add(("missing", d, None, frozenset()))
                self.forget(d)
            elif dep.state is MEMORY and dep.freed:
                self.forget(d)

    def abandon(self, key: str) -> None:
        """`key` will not be computed here after all.

        If tasks here wait for its value, it becomes a fetch with nobody to
        ask, so that the "hopeless" rule reports it missing for each of them
        and drops them in turn. Otherwise it is simply forgotten.
        """
        t = self.tasks[key]
        if not self.dependents(key):
            self.forget(key)
            return
        if t.state is MEMORY or t.state is CANCELLED:
            self.out.add(("drop", key))
        self.release_inputs(key, t.deps)
        self.set(key, state=FETCH, assigned=False, holders=frozenset(), tried=frozenset(), lacking=frozenset())

    def arrived(self, key: str) -> None:
        """A fetched (or put) value is here: keep it and tell the scheduler."""
        t = self.tasks[key]
        self.tasks[key] = t._replace(
            state=MEMORY, holders=frozenset(), tried=frozenset(), lacking=frozenset(), request=None
        )
        if not t.freed:  # a freed copy only serves local work: not offered
            self.out.add(("replica-added", key))
        if t.assigned:
            self.out.add(("finished", key))

    def retry_elsewhere(self, peer: str, keys, answered: bool) -> None:
        """`peer` did not provide `keys`: ask another holder, or compute it here
        if the scheduler asked for that meanwhile. `answered`: the peer said
        it lacks them (rather than not answering)."""
        for k in keys:
            t = self.tasks.get(k)
            if t is None or t.state is not FLIGHT:
                continue
            if t.request is not None:
                self.set(k, state=WAITING, holders=frozenset(), tried=frozenset(), lacking=frozenset(), request=None)
                self.start_compute(k, t.request)
            else:
                lacking = t.lacking | {peer} if answered else t.lacking
                self.set(k, state=FETCH, holders=t.holders - {peer}, tried=t.tried | {peer}, lacking=lacking)
                self.give_up_if_hopeless(k)

    def give_up_if_hopeless(self, key: str) -> bool:
        """Rule "hopeless": a fetch with nobody left to ask is reported missing
        (for each task here that needed it), naming only the holders that
        answered that they lack it, and those tasks are dropped."""
        t = self.tasks.get(key)
        if t is None or t.state is not FETCH or t.holders:
            return False
        users = self.dependents(key)
        for u in users or [None]:
            self.out.add(("missing", key, u, t.lacking))
        self.tasks.pop(key, None)  # (reported: dropping its users says nothing more)
        for u in users:
            if self.tasks[u].state in (WAITING, READY):
                self.abandon(u)
        return True

    def start_compute(self, key: str, who_has) -> None:
        """`key` (WAITING) is to run here: link its inputs, fetch those not here."""
        self.set(key, assigned=True, deps=tuple(x for x, _ in who_has))
        for x, holders in who_has:
            dep = self.tasks.get(x)
            offered = frozenset(holders) - {ME}
            if dep is None:
                self.tasks[x] = WTask(FETCH, holders=offered)
            elif dep.state in (FETCH, FLIGHT):
                self.set(x, holders=dep.holders | (offered - dep.tried))
            elif dep.state is CANCELLED:
                # Its released run may still serve us; if it fails, the value
                # is fetched from these holders instead.
                self.set(x, holders=dep.holders | offered)


# ----------------------------------------------------------------- events --


def _guard(scope: WorkerScope, w: WWorld, ev: WEvent) -> bool:
    t = w.task(ev.key) if hasattr(ev, "key") else None
    match ev:
        case Compute(key, who_has):
            return key in scope.tasks and tuple(d for d, _ in who_has) == scope.tasks[key]
        case Free(key):
            return t is not None
        case Replicas(key, holders):
            return key in scope.inputs or key in scope.tasks
        case Put(key):
            # Scattered data has its own keys: never one computed here.
            return key in scope.inputs and (t is None or t.state in (FETCH, FLIGHT, MEMORY))
        case ExecutionDone(key, ok):
            return key in w.threads
        case GatherDone(peer, got):
            requested = dict(w.gathers).get(peer)
            return requested is not None and set(got) <= requested
        case GatherFailed(peer):
            return peer in dict(w.gathers)
        case Steal(key):
            return key in scope.tasks
        case Pause():
            return not w.paused
        case Resume():
            return w.paused
    return False


def _effect(d: _Draft, ev: WEvent) -> None:  # noqa: C901 - one case per event
    match ev:
        case Compute(key, who_has):
            t = d.tasks.get(key)
            if t is not None:
                d.set(key, freed=False)  # assigned here again: the scheduler counts it
                t = d.tasks[key]
            if t is None:
                d.tasks[key] = WTask(WAITING)
                d.start_compute(key, who_has)
            elif t.state is FETCH:
                # A copy was wanted, not yet asked for: compute it instead.
                d.set(key, state=WAITING, holders=frozenset(), tried=frozenset(), lacking=frozenset())
                d.start_compute(key, who_has)
            elif t.state is FLIGHT:
                # On its way: report it when it lands, compute it if that fails.
                d.set(key, assigned=True, request=who_has)
            else:
                d.set(key, assigned=True)
                if t.state is CANCELLED:
                    d.set(key, state=EXECUTING)  # the running thread serves
                elif t.state is MEMORY:
                    d.out.add(("finished", key))
                # WAITING, READY, EXECUTING: a repeat
        case Free(key, heard):
            t = d.tasks[key]
            d.set(key, assigned=False, request=None)
            if t.state is MEMORY and not heard:
                # Say so: the free may have crossed a report of this value,
                # and the scheduler must not count a copy that is going away.
                d.out.add(("dropped", key))
            if t.state is EXECUTING:
                d.set(key, state=CANCELLED)
            elif t.state is CANCELLED:
                pass
            elif not d.dependents(key) or t.state in (WAITING, READY):
                # Waiting or ready: a task here that needs the value it would
                # have made is reported missing and dropped (see `abandon`),
                # so the scheduler sends it again.
                d.abandon(key)
            else:
                d.set(key, freed=True)  # kept until the tasks here that need it are done
        case Replicas(key, holders):
            if key not in d.tasks:
                d.tasks[key] = WTask(FETCH, holders=frozenset(holders) - {ME})
        case Put(key):
            t = d.tasks.get(key)
            if t is None:
                d.tasks[key] = WTask(MEMORY)
            elif t.state in (FETCH, FLIGHT):
                d.arrived(key)
        case ExecutionDone(key, ok):
            d.threads.discard(key)
            t = d.tasks[key]
            users = d.dependents(key)
            if t.state is EXECUTING and ok:
                d.release_inputs(key, t.deps)
                d.set(key, state=MEMORY, freed=False)  # reported: the scheduler decides
                d.out.add(("finished", key))
            elif t.state is EXECUTING:
                d.out.add(("erred", key))
                d.abandon(key)  # tasks here that needed it are reported and dropped
            elif not users:
                d.forget(key)  # a released run: its result is not wanted
            elif ok:
                # A released run whose value a task here needs: keep it for
                # that work only (freed: not offered, not counted).
                d.release_inputs(key, t.deps)
                d.set(key, state=MEMORY, freed=True, holders=frozenset())
            else:
                # A released run that failed, whose value a task here needs:
                # fetch it from the holders the scheduler named for that task.
                d.release_inputs(key, t.deps)
                d.set(key, state=FETCH)
        case GatherDone(peer, got):
            requested = d.gathers.pop(peer)
            for k in sorted(got):
                t = d.tasks.get(k)
                if t is not None and t.state is FLIGHT:
                    d.arrived(k)
                # Otherwise the value is no longer wanted here, or came by
                # another way meanwhile: a late answer is not stored at all,
                # so there is nothing to drop (dropping would drop ours).
            if requested - set(got):
                d.faults += 1
        case GatherFailed(peer):
            d.gathers.pop(peer)
            d.faults += 1
        case Steal(key):
            t = d.tasks.get(key)
            # Given up only if its thread has not started, and nothing here
            # waits for its value; then it is forgotten, as if never assigned.
            given_up = t is not None and t.assigned and t.state in (WAITING, READY) and not d.dependents(key)
            if given_up:
                d.forget(key)
            d.out.add(("steal-answer", key, given_up))
        case Pause():
            d.paused = True
        case Resume():
            d.paused = False


def _effects(d: _Draft, pre: WWorld, ev: WEvent) -> list[_Draft]:
    """`_effect`, then, for an answer that lacked keys, retry them one by one
    (in any order: the order of the request is the core's business)."""
    _effect(d, ev)
    if not isinstance(ev, (GatherDone, GatherFailed)):
        return [d]
    unanswered = sorted(dict(pre.gathers)[ev.peer] - set(getattr(ev, "got", ())))
    out = []
    for order in itertools.permutations(unanswered):
        e = d.copy()
        e.retry_elsewhere(ev.peer, order, answered=isinstance(ev, GatherDone))
        out.append(e)
    return out


# ------------------------------------------------------------ settling --


def _settle(d: _Draft) -> list[_Draft]:
    """Give up hopeless fetches, mark ready tasks, then fill threads and requests."""
    changed = True
    while changed:
        changed = False
        for key in sorted(d.tasks):
            t = d.tasks.get(key)
            if t is None:
                continue
            if d.give_up_if_hopeless(key):
                changed = True
            elif t.state is WAITING and all(
                x in d.tasks and d.tasks[x].state is MEMORY for x in t.deps
            ):
                d.set(key, state=READY)
                changed = True
    out = []
    for e in _start(d):
        out.extend(_gather(e))
    return out


def _start(d: _Draft) -> list[_Draft]:
    """Free threads take ready tasks (any of them: priority is policy)."""
    ready = sorted(k for k, t in d.tasks.items() if t.state is READY)
    free = d.scope.nthreads - len(d.threads)
    if not ready or free <= 0 or d.paused:
        return [d]
    out = []
    for chosen in itertools.combinations(ready, min(free, len(ready))):
        e = d.copy()
        for k in chosen:
            e.set(k, state=EXECUTING)
            e.threads.add(k)
            e.out.add(("started", k))
            e.out.add(("execute", k))
        out.append(e)
    return out


def _gather(d: _Draft) -> list[_Draft]:
    """FETCH keys go out to a holder with no request in flight, bundled per peer.

    A key may stay FETCH only if each of its holders already has a request
    in flight, or the limit on concurrent requests is reached.
    """
    fetch = sorted(k for k, t in d.tasks.items() if t.state is FETCH)
    if not fetch or d.paused:
        return [d]
    busy = set(d.gathers)
    options = [[None, *sorted(d.tasks[k].holders - busy)] for k in fetch]
    out = []
    for combo in itertools.product(*options):
        peers = {p for p in combo if p is not None}
        if len(busy) + len(peers) > d.scope.max_gathers:
            continue
        full = len(busy) + len(peers) >= d.scope.max_gathers
        if any(p is None and not full and d.tasks[k].holders - busy for k, p in zip(fetch, combo)):
            continue
        e = d.copy() if len(out) or len(options) > 1 or len(options[0]) > 1 else d
        batches: dict[str, set[str]] = {}
        for k, p in zip(fetch, combo):
            if p is not None:
                batches.setdefault(p, set()).add(k)
                e.set(k, state=FLIGHT)
        for p, keys in batches.items():
            e.gathers[p] = frozenset(keys)
            e.out.add(("gather", p, frozenset(keys)))
        out.append(e)
    return out


def apply(scope: WorkerScope, w: WWorld, ev: WEvent) -> list[WOutcome]:
    """Every outcome of `ev` in `w`; [] if its guard is false."""
    if not _guard(scope, w, ev):
        return []
    seen, out = set(), []
    for e in (s for d in _effects(_Draft(scope, w), w, ev) for s in _settle(d)):
        o = WOutcome(e.freeze(), frozenset(e.out))
        if o not in seen:
            seen.add(o)
            out.append(o)
    return out


# ------------------------------------------------------------ invariants --


class WInvariant(NamedTuple):
    id: str
    sentence: str


WORKER_INVARIANTS: tuple[WInvariant, ...] = (
    WInvariant("W-INV-ONCE", "A task runs in at most one thread, threads are bounded, and a task is "
               "executing or cancelled iff its thread runs."),
    WInvariant("W-INV-READY", "No task runs, or is ready to, before all its inputs are here."),
    WInvariant("W-INV-KEEP", "Nothing a task here still needs is forgotten: every input of a "
               "waiting, ready, executing or cancelled task has a record."),
    WInvariant("W-INV-WAITING", "A waiting task waits on at least one input, and each input it "
               "waits on is being fetched or computed here."),
    WInvariant("W-INV-FETCH", "A value to fetch has a holder left to ask, and a value in flight "
               "has a request outstanding."),
    WInvariant("W-INV-BUSY", "Unless the worker is paused, no thread idles while a task is ready, and "
               "no holder idles while a fetch waits and the request limit allows."),
    WInvariant("W-INV-ASSIGNED", "A task waits or is ready here only if the scheduler assigned it here."),
)
WORKER_STEP_INVARIANTS: tuple[WInvariant, ...] = (
    WInvariant("W-STEP-ONCE", "No Execute is sent for a task whose thread still runs."),
    WInvariant("W-STEP-REFETCH", "Data a failed or incomplete request did not bring is asked of "
               "another holder or reported missing."),
    WInvariant("W-STEP-KEEP", "No value is dropped while a task here still needs it."),
    WInvariant("W-STEP-GIVE-UP", "A task is given up to a steal only if its thread had not started, and "
               "then it is forgotten here: it never runs here and on its thief."),
    WInvariant("W-STEP-PAUSED", "A paused worker starts no thread and sends no request."),
    WInvariant("W-STEP-NAMED", "A value reported missing names only holders that answered that they lack "
               "it, never one that did not answer (it may still hold it)."),
)


def state_violations(scope: WorkerScope, w: WWorld) -> Iterator[str]:  # noqa: C901 - flat checks
    tasks = dict(w.tasks)
    in_flight = {k for _, keys in w.gathers for k in keys}
    busy = {p for p, _ in w.gathers}
    if len(w.threads) > scope.nthreads:
        yield f"W-INV-ONCE: {len(w.threads)} threads busy of {scope.nthreads}"
    if len(w.gathers) > scope.max_gathers:
        yield f"W-INV-FETCH: {len(w.gathers)} requests in flight, limit {scope.max_gathers}"
    for key in w.threads:
        if key not in tasks or tasks[key].state not in RUNNING:
            yield f"W-INV-ONCE: a thread runs {key}, which is {tasks.get(key)}"
    for key, t in tasks.items():
        at = f"{key} ({t.state.value})"
        if t.state in RUNNING and key not in w.threads:
            yield f"W-INV-ONCE: {at} but no thread runs it"
        if t.state in (READY, *RUNNING):
            for x in t.deps:
                if x not in tasks or tasks[x].state is not MEMORY:
                    yield f"W-INV-READY: {at} input {x} is not here"
        if t.state in USES_INPUTS:
            for x in t.deps:
                if x not in tasks:
                    yield f"W-INV-KEEP: {at} input {x} was forgotten"
        if t.state is WAITING:
            missing = [x for x in t.deps if x not in tasks or tasks[x].state is not MEMORY]
            if not missing:
                yield f"W-INV-WAITING: {at} has every input"
            for x in missing:
                if x in tasks and tasks[x].state not in (FETCH, FLIGHT, WAITING, READY, *RUNNING):
                    yield f"W-INV-WAITING: {at} waits on {x} ({tasks[x].state.value}), which nothing brings"
        if t.state is FETCH and not t.holders:
            yield f"W-INV-FETCH: {at} has nobody to fetch it from"
        if t.state is FLIGHT and key not in in_flight:
            # (A request may outlive the need for it: the value was put here
            # meanwhile, or the record forgotten. Its answer is then dropped.)
            yield f"W-INV-FETCH: {at} but no request for it is outstanding"
        if t.state is READY and len(w.threads) < scope.nthreads and not w.paused:
            yield f"W-INV-BUSY: {at} while a thread is free"
        if t.state is FETCH and len(w.gathers) < scope.max_gathers and t.holders - busy and not w.paused:
            yield f"W-INV-BUSY: {at} while {sorted(t.holders - busy)} could be asked"
        if t.state in (WAITING, READY) and not t.assigned:
            yield f"W-INV-ASSIGNED: {at} not assigned here"


def step_violations(scope: WorkerScope, pre: WWorld, ev: WEvent, out: WOutcome) -> Iterator[str]:
    post = dict(out.world.tasks)
    executes = [i[1] for i in out.instructions if i[0] == "execute"]
    for key in executes:
        if key in pre.threads and not (isinstance(ev, ExecutionDone) and ev.key == key):
            yield f"W-STEP-ONCE: Execute({key}) while its thread runs"
    if isinstance(ev, (GatherDone, GatherFailed)):
        requested = dict(pre.gathers)[ev.peer]
        got = set(ev.got) if isinstance(ev, GatherDone) else set()
        missing = {i[1] for i in out.instructions if i[0] == "missing"}
        dropped_for = {i[2] for i in out.instructions if i[0] == "missing"}
        for key in sorted(requested - got):
            b = pre.task(key)
            if b is None or b.state is not FLIGHT:
                continue  # nobody here was waiting for it any more
            a = post.get(key)
            if a is not None and a.state in (FETCH, FLIGHT) and ev.peer in a.holders and key not in missing:
                # (After it was reported missing, a new request for it, with
                # the scheduler's holders, may name that peer again.)
                yield f"W-STEP-REFETCH: {key} will be asked of {ev.peer} again"
            if a is None and key not in missing and key not in dropped_for:
                # Acceptable only if every task that needed it was dropped
                # (and reported) because of another missing input.
                users = [k for k, t in pre.tasks if key in t.deps]
                if not users or any(u in post or u not in dropped_for for u in users):
                    yield f"W-STEP-REFETCH: {key} neither asked elsewhere nor reported missing"
    for i in out.instructions:
        if i[0] == "missing" and isinstance(ev, GatherFailed) and ev.peer in i[3]:
            b = pre.task(i[1])
            if b is None or ev.peer not in b.lacking:
                yield f"W-STEP-NAMED: {i[1]} reported missing naming {ev.peer}, which did not answer"
    for i in out.instructions:
        if i[0] == "steal-answer" and i[2]:
            b = pre.task(i[1])
            if b is None or b.state not in (WAITING, READY) or i[1] in post or i[1] in out.world.threads:
                yield f"W-STEP-GIVE-UP: {i[1]} given up though it was {b} (now {post.get(i[1])})"
        if out.world.paused and i[0] in ("execute", "gather"):
            yield f"W-STEP-PAUSED: {i[0]} {i[1]} while paused"
        if i[0] == "drop":
            users = [k for k, t in post.items() if i[1] in t.deps and t.state in USES_INPUTS]
            if users and i[1] in post and post[i[1]].state is MEMORY:
                yield f"W-STEP-KEEP: {i[1]} dropped while {users} need it"
            elif users and i[1] not in post:
                yield f"W-STEP-KEEP: {i[1]} dropped while {users} need it"


# -------------------------------------------------------------- explorer --


def enabled_events(scope: WorkerScope, w: WWorld) -> Iterator[WEvent]:
    # Where the scheduler says an input is: one peer, two peers, or here
    # (which may be out of date).
    holder_sets = [scope.peers[:1], scope.peers[:2], (ME,)]
    tasks = dict(w.tasks)
    for key, deps in scope.tasks.items():
        t = tasks.get(key)
        if t is not None and t.assigned:
            continue
        for combo in itertools.product(holder_sets, repeat=len(deps)):
            yield Compute(key, tuple(zip(deps, combo)))
    for key in sorted(tasks):
        yield Free(key)
        if tasks[key].state is MEMORY:
            yield Free(key, heard=True)
    for key in scope.inputs:
        if key not in tasks:
            yield Replicas(key, scope.peers[:1])
        yield Put(key)
    for key in sorted(w.threads):
        yield ExecutionDone(key, True)
        yield ExecutionDone(key, False)
    if scope.steals:
        for key in sorted(tasks):
            if key in scope.tasks:
                yield Steal(key)
    if scope.pauses:
        yield Resume() if w.paused else Pause()
    for peer, keys in sorted(w.gathers):
        yield GatherDone(peer, tuple(sorted(keys)))
        if w.faults < scope.max_faults:
            yield GatherFailed(peer)
            if len(keys) > 1:
                for k in sorted(keys):
                    yield GatherDone(peer, (k,))
            yield GatherDone(peer, ())


SCOPES: dict[str, WorkerScope] = {
    "fetch-one": WorkerScope({"t": ("i",)}, inputs=("i",)),
    "fetch": WorkerScope({"t": ("i",), "u": ("i", "j")}, inputs=("i", "j")),
    "local-chain": WorkerScope({"t": (), "u": ("t",)}, inputs=(), nthreads=1),
    "two-threads": WorkerScope({"t": ("i",), "r": (), "u": ("t",)}, inputs=("i",), nthreads=2,
                               max_faults=1),
    # Steals and pauses of a task that fetches its input and of one that needs none.
    "steal-one": WorkerScope({"t": ("i",), "r": ()}, inputs=("i",), max_faults=1, steals=True, pauses=True),
    # Steals and pauses while a task fetches an input, one runs, one waits.
    "steal-pause": WorkerScope({"t": ("i",), "r": (), "u": ("t",)}, inputs=("i",), max_faults=1,
                               steals=True, pauses=True),
}
