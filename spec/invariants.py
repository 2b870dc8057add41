"""What must be true of the scheduler-side lifecycle: in every state, across
every step, and eventually.

Each invariant has an id (INV-*, STEP-*, LIVE-*), one sentence, and the row
of the failure table (design.md §1) it protects. The same ids appear in
`trioflow.core.scheduler_invariants` where the core checks its own version.

* State invariants are predicates on one `World`: `state_violations`.
* Step invariants relate the world before an event to each world after it:
  `step_violations`.
* Liveness properties ("eventually") are checked by `spec.explore` by
  running the model forward from each reachable state: `liveness_violations`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

from spec.model import (
    FIRE_AND_FORGET,
    FAILED,
    IN_PROGRESS,
    KILLED,
    LOST,
    MEMORY,
    NO_WORKER,
    PROCESSING,
    QUEUED,
    RELEASED,
    WAITING,
    ClientLeaves,
    Event,
    Outcome,
    Release,
    ReplicaAdded,
    ReplicaLost,
    Restart,
    SchedulerRestarts,
    Scope,
    StealAnswered,
    TaskFinishes,
    TaskStarts,
    THIEF_GONE,
    World,
    WorkerDies,
    WorkerJoins,
    WorkerResumes,
    WorkerRetires,
    apply,
)


class Invariant(NamedTuple):
    id: str
    sentence: str
    row: str  # the failure-table row (design.md §1) it protects


def _must_compute(w: World, key: str) -> bool:
    """Needed by a holder that lacks the value, or by work in progress."""
    if any(k == key and (c, k) not in w.delivered for c, k in w.holds):
        return True
    return any(key in t.deps and t.state in IN_PROGRESS for _, t in w.tasks)


def _available(tasks: dict, key: str) -> bool:
    t = tasks.get(key)
    return t is not None and t.state is MEMORY and bool(t.who_has)


def _awaits(scope: Scope, key: str, t) -> bool:
    """Scattered data released while a live worker fetches a copy (INV-AWAITED)."""
    return t.state is RELEASED and scope.keys[key].scattered and bool(t.pending)


def _can_take(scope: Scope, w: World, key: str, used: dict[str, dict[str, int]]) -> bool:
    """Some allowed live worker, not paused, has `key`'s resources free."""
    spec = scope.keys[key]
    allowed = sorted(w.live) if spec.restrict is None else [x for x in spec.restrict if x in w.live]
    if spec.loose and not allowed:
        allowed = sorted(w.live)
    return any(
        all(used[x].get(r, 0) + n <= scope.has(x, r) for r, n in spec.resources)
        for x in allowed
        if x not in w.paused
    )


# ------------------------------------------------------- state invariants --

STATE_INVARIANTS: tuple[Invariant, ...] = (
    Invariant(
        "INV-PROCESSING",
        "A task in processing is assigned to exactly one live worker, and only a "
        "processing task is assigned or marked running.",
        "worker connection closes",
    ),
    Invariant(
        "INV-MEMORY",
        "A task in memory has at least one live holder, and only tasks in memory have holders.",
        "worker connection closes",
    ),
    Invariant(
        "INV-READY",
        "No task is processing, queued or in no-worker before all its inputs are in memory.",
        "worker connection closes",
    ),
    Invariant(
        "INV-WAITING",
        "A waiting task waits only on inputs that are not in memory, and on at least one.",
        "worker connection closes",
    ),
    Invariant(
        "INV-PROGRESS",
        "Every input a waiting task waits on is itself in progress, so nothing waits forever.",
        "worker connection closes",
    ),
    Invariant(
        "INV-NEEDED",
        "A task is in progress only while its value is needed, and released only while it is "
        "not: by work in progress, or by a client holding it that does not have the value.",
        "Client.restart() / cancel (no work for nobody)",
    ),
    Invariant(
        "INV-KILLED",
        "A task's suspicious count never exceeds allowed_failures, and it is erred with "
        "KilledWorker (its own) iff that count reached allowed_failures.",
        "a task keeps killing workers",
    ),
    Invariant(
        "INV-FAILED",
        "A task carries a failure iff it is erred or lost.",
        "user function raises",
    ),
    Invariant(
        "INV-ERR-DEPENDENTS",
        "No task in progress has a failed input: an erred task's dependents are erred too.",
        "user function raises",
    ),
    Invariant(
        "INV-ORIGIN",
        "A failed task's failure originates at the task itself or at one of its transitive inputs.",
        "user function raises",
    ),
    Invariant(
        "INV-LOST",
        "Scattered data is only ever in memory or lost (never recomputed), or released while it "
        "awaits a copy (INV-AWAITED), and only scattered data is ever lost.",
        "scattered data lost",
    ),
    Invariant(
        "INV-AWAITED",
        "Scattered data is released only while a live worker is fetching a copy of it (its last "
        "holder left first), and copies are pending only for values or for such data.",
        "scattered data lost (never while a live worker may hold a copy)",
    ),
    Invariant(
        "INV-HELD",
        "No key a client holds is ever forgotten.",
        "worker connection closes / scheduler dies (futures stay answerable)",
    ),
    Invariant(
        "INV-FORGET",
        "Every record is held by a client or is in the lineage of a held key; nothing else is kept.",
        "Client.restart() / release (no leak)",
    ),
    Invariant(
        "INV-QUEUED",
        "A task is queued only if it is an unconstrained root task and every live worker that is "
        "not paused is saturated.",
        "worker connection closes (queued work stays movable)",
    ),
    Invariant(
        "INV-NO-WORKER",
        "A task is in no-worker only if it is constrained (restrictions, resources) and no allowed "
        "live worker that is not paused has its resources free, or it has inputs and every live "
        "worker is paused.",
        "worker connection closes / memory (a paused worker)",
    ),
    Invariant(
        "INV-STEAL",
        "A steal is pending only on a processing task, toward a worker other than the one it is "
        "processing on (or toward none, its thief gone): a task being stolen stays processing on "
        "its victim, so no task is ever processing on two workers.",
        "(work stealing)",
    ),
    Invariant(
        "INV-PAUSED",
        "Only live workers are paused.",
        "memory (a paused worker)",
    ),
    Invariant(
        "INV-REPLICAS",
        "A value with a replication request has, counting copies already requested from live "
        "workers, min(n, live workers) copies.",
        "scattered data lost (Client.replicate)",
    ),
)


def state_violations(scope: Scope, w: World) -> Iterator[str]:  # noqa: C901 - flat checks
    """Yield "INV-ID: explanation" for every state invariant `w` breaks."""
    tasks = dict(w.tasks)
    held = {k for _, k in w.holds}
    saturated = {
        wk: sum(1 for t in tasks.values() if t.processing_on == wk) >= scope.capacity
        for wk in w.live
    }
    used: dict[str, dict[str, int]] = {wk: {} for wk in w.live}
    for key, t in tasks.items():
        if t.processing_on in used:
            for r, n in scope.keys[key].resources:
                used[t.processing_on][r] = used[t.processing_on].get(r, 0) + n

    for key, t in tasks.items():
        spec = scope.keys[key]
        at = f"{key} ({t.state.value})"
        if (t.state is PROCESSING) != (t.processing_on is not None):
            yield f"INV-PROCESSING: {at} processing_on={t.processing_on}"
        if t.processing_on is not None and t.processing_on not in w.live:
            yield f"INV-PROCESSING: {at} assigned to dead worker {t.processing_on}"
        if t.running and t.state is not PROCESSING:
            yield f"INV-PROCESSING: {at} marked running"
        if (t.state is MEMORY) != bool(t.who_has):
            yield f"INV-MEMORY: {at} who_has={sorted(t.who_has)}"
        if not t.who_has <= w.live:
            yield f"INV-MEMORY: {at} held by dead {sorted(t.who_has - w.live)}"
        missing = [x for x in t.deps if not _available(tasks, x)]
        if t.state in (PROCESSING, QUEUED, NO_WORKER) and missing:
            yield f"INV-READY: {at} inputs {missing} not in memory"
        if t.state is WAITING:
            if not missing:
                yield f"INV-WAITING: {at} has every input yet waits"
            for x in missing:
                # (Scattered data awaiting a copy is on its way to memory too.)
                if x in tasks and tasks[x].state not in IN_PROGRESS and not _awaits(scope, x, tasks[x]):
                    yield f"INV-PROGRESS: {at} waits on {x} ({tasks[x].state.value})"
        if t.state in IN_PROGRESS and not _must_compute(w, key):
            yield f"INV-NEEDED: {at} in progress although nobody needs its value"
        if t.state is RELEASED and _must_compute(w, key) and not _awaits(scope, key, t):
            yield f"INV-NEEDED: {at} released although its value is needed"
        killed_here = t.failure is not None and t.failure.kind == KILLED and t.failure.origin == key
        if t.suspicious > scope.allowed_failures:
            yield f"INV-KILLED: {at} suspicious={t.suspicious}"
        if killed_here != (t.suspicious >= scope.allowed_failures):
            yield f"INV-KILLED: {at} suspicious={t.suspicious} failure={t.failure}"
        if (t.state in FAILED) != (t.failure is not None):
            yield f"INV-FAILED: {at} failure={t.failure}"
        if t.state in IN_PROGRESS:
            for x in t.deps:
                if x in tasks and tasks[x].state in FAILED:
                    yield f"INV-ERR-DEPENDENTS: {at} has failed input {x}"
        if t.failure is not None and t.failure.origin != key and t.failure.origin not in scope.ancestors(key):
            yield f"INV-ORIGIN: {at} failure {t.failure} from outside its lineage"
        if spec.scattered and t.state not in (MEMORY, LOST) and not _awaits(scope, key, t):
            yield f"INV-LOST: scattered {at}"
        if t.state is RELEASED and spec.scattered and not t.pending:
            yield f"INV-AWAITED: scattered {at} awaits no copy"
        if t.pending and not (t.state is MEMORY or _awaits(scope, key, t)):
            yield f"INV-AWAITED: {at} has copies pending {sorted(t.pending)}"
        if not t.pending <= w.live - t.who_has:
            yield f"INV-AWAITED: {at} copies pending at {sorted(t.pending)}, not live non-holders"
        if t.state is LOST and not spec.scattered:
            yield f"INV-LOST: computed {at} is lost"
        if t.state is QUEUED and (spec.deps or spec.constrained):
            yield f"INV-QUEUED: {at} is not an unconstrained root task"
        if t.state is QUEUED and not all(v for wk, v in saturated.items() if wk not in w.paused):
            yield f"INV-QUEUED: {at} queued while a worker is below capacity"
        if t.state is NO_WORKER and (
            _can_take(scope, w, key, used) if spec.constrained else not spec.deps or bool(w.live - w.paused)
        ):
            yield f"INV-NO-WORKER: {at} although an allowed worker could take it"
        if t.thief is not None and (
            t.state is not PROCESSING or t.thief == t.processing_on or t.thief not in (*w.live, THIEF_GONE)
        ):
            yield f"INV-STEAL: {at} stolen by {t.thief}"
        if t.state is MEMORY and t.replicas:
            copies = len(t.who_has) + len(t.pending)
            if copies < min(t.replicas, len(w.live)) or not t.pending <= w.live - t.who_has:
                yield f"INV-REPLICAS: {at} holders {sorted(t.who_has)} pending {sorted(t.pending)}"
    if not w.paused <= w.live:
        yield f"INV-PAUSED: {sorted(w.paused - w.live)} paused but not live"
    for key in held:
        if key not in tasks:
            yield f"INV-HELD: held key {key} was forgotten"
    kept: set[str] = set()
    stack = list(held)
    while stack:
        k = stack.pop()
        if k in kept or k not in tasks:
            continue
        kept.add(k)
        stack.extend(tasks[k].deps)
    for key in tasks:
        if key not in kept:
            yield f"INV-FORGET: {key} ({tasks[key].state.value}) is neither held nor lineage of a held key"


# -------------------------------------------------------- step invariants --

STEP_INVARIANTS: tuple[Invariant, ...] = (
    Invariant(
        "STEP-SUSPICIOUS",
        "A task's suspicious count only grows while its record lives (a restart starts afresh).",
        "a task keeps killing workers",
    ),
    Invariant(
        "STEP-FINAL",
        "An erred task stays erred, with the same failure, until it is forgotten: "
        "a task marked bad is never retried.",
        "a task keeps killing workers / user function raises",
    ),
    Invariant(
        "STEP-SAME-ERROR",
        "A task that fails because of an input fails with exactly that input's failure.",
        "user function raises",
    ),
    Invariant(
        "STEP-RESTART-KEEPS",
        "A scheduler restart loses nothing a survivor can give back: every key in the "
        "lineage of a held key that a live worker holds is in memory again right after it.",
        "the scheduler dies",
    ),
    Invariant(
        "STEP-RESOURCES",
        "A task is sent to a worker only if, with it, the worker's processing tasks hold no more of "
        "a resource than the worker declared (after a scheduler restart a run a worker still has is "
        "taken up where it runs, even if that overcommits it).",
        "(submit options: resources=)",
    ),
    Invariant(
        "STEP-REPORTED",
        "Every key a client holds that fails, is lost, or is cancelled is reported to that client.",
        "user function raises / scattered data lost / Client.restart()",
    ),
    Invariant(
        "STEP-STEAL",
        "A steal is asked only of a task that has not started, for a live worker that is not paused "
        "and has nothing to do; and a task moves to its thief only when its victim answered that it "
        "gave it up, never once it had started: a stolen task was not running, and never runs twice "
        "because of a steal.",
        "(work stealing)",
    ),
    Invariant(
        "STEP-PAUSED",
        "No task is sent to a paused worker (after a scheduler restart, until the workers have "
        "re-announced their pauses, excepted).",
        "memory (a paused worker)",
    ),
)


def step_violations(scope: Scope, pre: World, event: Event, out: Outcome) -> Iterator[str]:
    """Yield "STEP-ID: explanation" for every step invariant this step breaks."""
    post = out.world
    fresh = isinstance(event, (Restart, SchedulerRestarts))
    after = dict(post.tasks)
    for key, b in pre.tasks:
        a = after.get(key)
        if a is None or fresh:
            continue
        if a.suspicious < b.suspicious:
            yield f"STEP-SUSPICIOUS: {key} {b.suspicious} -> {a.suspicious}"
        if b.state.value == "erred" and (a.state is not b.state or a.failure != b.failure):
            yield f"STEP-FINAL: {key} erred {b.failure} -> {a.state.value} {a.failure}"
    for key, a in post.tasks:
        b = pre.task(key)
        if a.state in FAILED and a.failure.origin != key and (b is None or b.failure != a.failure):
            inputs = [after[x].failure for x in a.deps if x in after and after[x].state in FAILED]
            ghost = b is None and a.failure.kind == "lost-data" and a.failure.origin not in a.deps
            if a.failure not in inputs and not ghost:
                yield f"STEP-SAME-ERROR: {key} got {a.failure}, inputs have {inputs}"
    if isinstance(event, SchedulerRestarts):
        # (Fire-and-forget holds live in the old scheduler only.)
        wanted = {k for c, key in pre.holds if c != FIRE_AND_FORGET for k in scope.lineage(key)}
        for key in sorted(wanted):
            b, a = pre.task(key), after.get(key)
            if b is not None and b.state is MEMORY and b.who_has and (a is None or a.state is not MEMORY):
                state = "forgotten" if a is None else a.state.value
                yield f"STEP-RESTART-KEEPS: {key} held by {sorted(b.who_has)} came back {state}"
    if not isinstance(event, SchedulerRestarts):
        for worker, key in sorted(out.computes):
            held: dict[str, int] = {}
            for k, t in post.tasks:
                if t.processing_on == worker:
                    for r, n in scope.keys[k].resources:
                        held[r] = held.get(r, 0) + n
            for r, _ in scope.keys[key].resources:
                if held[r] > scope.has(worker, r):
                    yield f"STEP-RESOURCES: {key} sent to {worker}, which then holds {held[r]} {r} of {scope.has(worker, r)}"
    yield from _steal_violations(pre, event, out)
    if not isinstance(event, SchedulerRestarts):
        for worker, key in sorted(out.computes):
            if worker in post.paused:
                yield f"STEP-PAUSED: {key} sent to paused {worker}"
    told = {(r.client, r.key) for r in out.reports if r.kind in ("erred", "cancelled")}
    voluntary = isinstance(event, (Release, ClientLeaves))
    for client, key in pre.holds:
        if client == FIRE_AND_FORGET:
            continue  # it is told nothing and lets go by itself
        if (client, key) not in post.holds and not voluntary and (client, key) not in told:
            yield f"STEP-REPORTED: {client} lost its future for {key} without being told"
    for client, key in post.holds:
        if client == FIRE_AND_FORGET:
            continue
        a, b = after[key], pre.task(key)
        if a.state in FAILED and (b is None or b.failure != a.failure or (client, key) not in pre.holds):
            if (client, key) not in told:
                yield f"STEP-REPORTED: {client} not told that {key} failed ({a.failure})"
        if a.state is MEMORY and (b is None or b.state is not MEMORY or (client, key) not in pre.holds):
            if not any(r.kind == "finished" and (r.client, r.key) == (client, key) for r in out.reports):
                yield f"STEP-REPORTED: {client} not told that {key} finished"


def _steal_violations(pre: World, event: Event, out: Outcome) -> Iterator[str]:
    """STEP-STEAL: how steals are asked and how stolen tasks move."""
    post = out.world
    if isinstance(event, (SchedulerRestarts,)):
        return
    load = {wk: 0 for wk in post.live}
    for _, t in post.tasks:
        if t.state is PROCESSING:
            load[t.processing_on] += 1
    for key, a in post.tasks:
        b = pre.task(key)
        if a.thief not in (None, THIEF_GONE) and (b is None or b.thief is None or b.state is not PROCESSING):
            # A steal asked in this step.
            if a.running or a.thief not in post.live or a.thief in post.paused or load[a.thief]:
                yield f"STEP-STEAL: steal of {key} for {a.thief} (running={a.running}, load {load.get(a.thief)})"
        if b is None or b.state is not PROCESSING or a.state is not PROCESSING:
            continue
        moved = a.processing_on != b.processing_on
        answered = isinstance(event, StealAnswered) and event.key == key
        if answered and moved and (not event.given_up or b.running):
            yield f"STEP-STEAL: {key} moved to {a.processing_on} though {b.processing_on} kept it or ran it"
        if answered and not event.given_up and moved:
            yield f"STEP-STEAL: {key} moved though its victim kept it"
        # (A task its victim dropped for another reason may be placed anywhere,
        # its thief included: the victim left, or could not fetch an input.)
        victim_left = isinstance(event, (WorkerDies, WorkerRetires, WorkerJoins)) and event.worker == b.processing_on
        dropped = isinstance(event, ReplicaLost) and event.dependent == key
        if moved and b.thief == a.processing_on and not (answered or victim_left or dropped):
            yield f"STEP-STEAL: {key} moved to its thief {a.processing_on} before its victim answered"


# -------------------------------------------------------------- liveness --

LIVENESS: tuple[Invariant, ...] = (
    Invariant(
        "LIVE-FORGET",
        "Every key no one holds is eventually forgotten: once clients release everything, "
        "no record is left.",
        "Client.restart() / release (no leak)",
    ),
    Invariant(
        "LIVE-PROGRESS",
        "If faults stop (copies on their way arrive), a worker is alive and paused workers resume, "
        "every held key ends in memory, erred or lost (or released, its value at the client), unless "
        "it needs a task restricted to absent workers.",
        "worker connection closes / a task keeps killing workers",
    ),
)


def _run(scope: Scope, w: World, pick: Callable[[World], Event | None], limit: int) -> World:
    for _ in range(limit):
        ev = pick(w)
        if ev is None:
            return w
        outcomes = apply(scope, w, ev)
        assert outcomes, f"{ev} not enabled"
        w = outcomes[0].world
    raise AssertionError(f"did not settle in {limit} steps from {w.describe()}")


def _blocked(tasks: dict, key: str) -> bool:
    """`key` cannot finish without a worker that is not there (no-worker)."""
    t = tasks.get(key)
    if t is None:
        return False
    if t.state is NO_WORKER:
        return True
    return t.state is WAITING and any(
        _blocked(tasks, x) for x in t.deps if not _available(tasks, x)
    )


def liveness_violations(scope: Scope, w: World) -> Iterator[str]:
    """Run the model forward from `w` and check the LIVE-* properties."""

    def release_one(cur: World) -> Release | None:
        held = sorted(h for h in cur.holds if h[0] != FIRE_AND_FORGET)
        return Release(*held[0]) if held else None

    end = _run(scope, w, release_one, 2 * len(w.holds) + 1)
    # What a fire-and-forget hold keeps (until its key has an outcome) stays.
    fired = {k for _, key in end.holds for k in scope.lineage(key)}
    if any(k not in fired for k, _ in end.tasks):
        yield f"LIVE-FORGET: after releasing everything, still kept: {end.describe()}"
    if not w.live:
        return

    def resume_one(cur: World) -> WorkerResumes | None:
        return WorkerResumes(min(cur.paused)) if cur.paused else None

    # Memory pressure ends too: a paused worker resumes (else nothing runs there).
    w = _run(scope, w, resume_one, len(w.paused) + 1)

    def work(cur: World) -> TaskStarts | TaskFinishes | ReplicaAdded | None:
        for key, t in cur.tasks:
            if t.state is PROCESSING:
                return TaskFinishes(key, t.processing_on) if t.running else TaskStarts(key)
            if _awaits(scope, key, t):
                return ReplicaAdded(key, min(t.pending))  # no fault: the awaited copy comes
        return None

    end = _run(scope, w, work, 4 * len(scope.keys) + 4)
    tasks = dict(end.tasks)
    for client, key in sorted(end.holds):
        t = tasks[key]
        if t.state is RELEASED and (client, key) in end.delivered:
            continue  # the client has the value
        if t.state not in (MEMORY, *FAILED) and not _blocked(tasks, key):
            yield f"LIVE-PROGRESS: held {key} stuck in {t.state.value}: {end.describe()}"
    if any(t.state is LOST and not scope.keys[k].scattered for k, t in tasks.items()):
        yield "LIVE-PROGRESS: computed data lost"
