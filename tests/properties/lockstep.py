"""Drive `trioflow.core.SchedulerState` and `spec.model` with the same events.

`Lockstep.step(model_event)` translates the model's event into the core's,
feeds both, and checks, after every step:

* the core's own invariants (`trioflow.core.scheduler_invariants`);
* that the core's observable state, abstracted (`abstract`), is one of the
  worlds the model allows after this event (the model is nondeterministic
  about placement, the core picks one);
* every model invariant, state and step, evaluated *on the core*;
* that every report the model requires (finished, erred with the same
  failure, lost, cancelled) was sent to the right client, that every report
  the core sent is true, and that every new assignment was sent as a
  ComputeTask.

The model's events the core does not support yet are listed in
`CORE_LACKS`; give them a translation in `to_core` when the core grows.
"""

from __future__ import annotations

import itertools

from spec import invariants as spec_invariants
from spec import model as m
from trioflow.core import Cancelled, DataLost, SchedulerState, UserError, WorkerDeaths
from trioflow.core.scheduler_events import (
    ClientDisconnected,
    ClusterRestarted,
    ComputeTask,
    DataDropped,
    DataScattered,
    FreeKeys,
    KeysCancelled,
    KeysFiredAndForgotten,
    KeysReleased,
    ReplicaAdded,
    ReplicaMissing,
    ReplicationRequested,
    ReportErred,
    ReportFinished,
    RecoveryEnded,
    ReportLost,
    RequestSteal,
    SchedulerEvent,
    StealAnswered,
    TaskErred,
    TaskFinished,
    TaskSpec,
    TasksSubmitted,
    TaskStarted,
    WorkerConnected,
    WorkerDisconnected,
    WorkerPaused,
    WorkerResumed,
)
from trioflow.core.scheduler_invariants import check_invariants

BOOM = UserError(exception=None, type_name="ZeroDivisionError", message="division by zero", traceback="")
NBYTES = 8

# Model events with no core counterpart yet. Add a branch to `to_core` and a
# rule to the state machine when the core has them.
CORE_LACKS: tuple[type, ...] = ()

_ids = itertools.count()


def sid() -> str:
    return f"prop-{next(_ids)}"


def make_core(scope: m.Scope) -> SchedulerState:
    # One thread per worker and saturation 1.0 give capacity 1, which is
    # what `scope.capacity` says.
    assert scope.capacity == 1
    return SchedulerState(
        allowed_failures=scope.allowed_failures, worker_saturation=1.0, work_stealing="steal" in scope.features
    )


def started_core(scope: m.Scope) -> SchedulerState:
    """A core past its recovery window, as a scheduler is `recovery_grace`
    after it starts (a restart replays its window: `restart_events`)."""
    core = make_core(scope)
    core.handle(RecoveryEnded(sid()))
    return core


def restart_events(scope: m.Scope, world: m.World, *, clients_first: bool) -> list[SchedulerEvent]:
    """What a *fresh* scheduler receives when the old one died (`SchedulerRestarts`).

    Every live worker re-registers with the values it holds and the tasks
    running in its threads; every client re-submits the lineage of each key
    it holds (scattered keys as specs without a function). The two arrive in
    either order.
    """
    workers = [
        WorkerConnected(
            sid(),
            w,
            1,
            {k: NBYTES for k, t in world.tasks if w in t.who_has},
            tuple(k for k, t in world.tasks if t.processing_on == w and t.running),
            dict(scope.worker_resources.get(w, ())),
        )
        for w in sorted(world.live)
    ]
    clients = []
    for client in sorted({c for c, _ in world.holds} - {m.FIRE_AND_FORGET}):
        held = sorted(k for c, k in world.holds if c == client)
        lineage = [k for k in scope.keys if any(k in scope.lineage(h) for h in held)]
        specs = tuple(
            task_spec(scope, k, None if scope.keys[k].scattered else f"run-{k}")  # scattered: no function
            for k in lineage
        )
        clients.append(TasksSubmitted(sid(), client, specs, tuple(held)))
    # The window closes once everyone who reconnected in time has spoken;
    # a paused worker says so again right after its welcome (the new
    # scheduler may have placed work on it before it heard).
    pauses = [WorkerPaused(sid(), w) for w in sorted(world.paused)]
    return [*(clients + workers if clients_first else workers + clients), RecoveryEnded(sid()), *pauses]


def task_spec(scope: m.Scope, key: str, run_spec) -> TaskSpec:
    """The core's spec of a model key, with its options."""
    spec = scope.keys[key]
    resources = dict(spec.resources) or None
    return TaskSpec(key, run_spec, spec.deps, 0, spec.restrict, spec.loose, resources, spec.priority)


def to_core(scope: m.Scope, world: m.World, event: m.Event, core: SchedulerState | None = None) -> SchedulerEvent:
    """The core event that means the same as the model's `event` (a steal's
    answer needs the `core`, for the id of the steal it answers)."""
    match event:
        case m.Submit(client, key):
            specs = tuple(task_spec(scope, k, f"run-{k}") for k in scope.lineage(key) if not scope.keys[k].scattered)
            return TasksSubmitted(sid(), client, specs, (key,))
        case m.Release(client, key):
            return KeysReleased(sid(), client, (key,))
        case m.Cancel(client, key):
            return KeysCancelled(sid(), client, (key,))
        case m.ClientLeaves(client):
            return ClientDisconnected(sid(), client)
        case m.Scatter(client, key, worker):
            return DataScattered(sid(), client, {key: (NBYTES, (worker,))})
        case m.WorkerJoins(worker, held):
            resources = dict(scope.worker_resources.get(worker, ()))
            return WorkerConnected(sid(), worker, 1, {k: NBYTES for k in held}, (), resources)
        case m.FireAndForget(client, key):
            return KeysFiredAndForgotten(sid(), client, (key,))
        case m.WorkerDies(worker):
            return WorkerDisconnected(sid(), worker)
        case m.WorkerRetires(worker):
            return WorkerDisconnected(sid(), worker, expected=True)
        case m.TaskStarts(key):
            return TaskStarted(sid(), world.task(key).processing_on, key)
        case m.TaskFinishes(key, worker):
            return TaskFinished(sid(), worker, key, NBYTES, inline=scope.keys[key].small)
        case m.TaskRaises(key):
            return TaskErred(sid(), world.task(key).processing_on, key, BOOM)
        case m.ReplicaAdded(key, worker):
            return ReplicaAdded(sid(), worker, key, NBYTES)
        case m.ReplicaLost(key, holder, dependent, reporter):
            if dependent is not None:
                reporter = world.task(dependent).processing_on
            holders = () if holder is None else (holder,)  # None: no holder answered
            return ReplicaMissing(sid(), reporter or "client:c1", key, holders, dependent)
        case m.CopyDropped(key, worker):
            return DataDropped(sid(), worker, (key,))
        case m.Replicate(client, key, n):
            return ReplicationRequested(sid(), client, (key,), n)
        case m.Restart():
            return ClusterRestarted(sid())
        case m.StealAnswered(key, given_up):
            pending = core.stealing[key]
            return StealAnswered(sid(), pending.victim, key, pending.steal_id, given_up)
        case m.WorkerPauses(worker):
            return WorkerPaused(sid(), worker)
        case m.WorkerResumes(worker):
            return WorkerResumed(sid(), worker)
    raise NotImplementedError(f"the core has no event for {m.show(event)} yet")


# ------------------------------------------------------------ abstraction --


def failure_of(failure, origin: str | None) -> m.Failure | None:
    """The model's view of a core failure record."""
    if failure is None:
        return None
    kind = {
        UserError: m.ERROR,
        WorkerDeaths: m.KILLED,
        DataLost: m.LOST_DATA,
        Cancelled: m.CANCELLED,
    }[type(failure)]
    return m.Failure(kind, origin)


def abstract(core: SchedulerState, faults: int) -> m.World:
    """The model world that the core's state stands for."""
    tasks = []
    for key, ts in core.tasks.items():
        tasks.append(
            (
                key,
                m.Task(
                    state=m.State(ts.state.value),
                    deps=tuple(ts.dependencies),
                    processing_on=ts.processing_on,
                    running=ts.running,
                    who_has=frozenset(ts.who_has),
                    suspicious=ts.suspicious,
                    failure=failure_of(ts.failure, ts.failure_origin),
                    replicas=ts.replicas_wanted if key in core.replicated else 0,
                    pending=frozenset(ts.replicas_pending),
                    thief=_thief(core, key),
                ),
            )
        )
    holds = frozenset((c, k) for c, keys in core.clients.items() for k in keys)
    delivered = frozenset((c, k) for k, ts in core.tasks.items() for c in ts.delivered)
    paused = frozenset(a for a, ws in core.workers.items() if ws.paused)
    return m.World(tuple(sorted(tasks)), frozenset(core.workers), holds, faults, delivered, paused)


def _thief(core: SchedulerState, key: str) -> str | None:
    """The model's `Task.thief` of a core task: its pending steal's thief."""
    pending = core.stealing.get(key)
    if pending is None:
        return None
    return m.THIEF_GONE if pending.thief is None else pending.thief


def reports_of(messages) -> set[m.Report]:
    out = set()
    for msg in messages:
        if isinstance(msg, ReportFinished):
            out.add(m.Report("finished", msg.client, msg.key))
        elif isinstance(msg, ReportLost):
            out.add(m.Report("lost", msg.client, msg.key))
        elif isinstance(msg, ReportErred) and isinstance(msg.failure, Cancelled):
            out.add(m.Report("cancelled", msg.client, msg.key))
        elif isinstance(msg, ReportErred):
            out.add(m.Report("erred", msg.client, msg.key, failure_of(msg.failure, msg.origin)))
    return out


def computes_of(messages) -> set[tuple[str, str]]:
    return {(msg.worker, msg.key) for msg in messages if isinstance(msg, ComputeTask)}


# --------------------------------------------------------------- lockstep --


class Lockstep:
    """A core and a model world, moved together; every step is checked."""

    def __init__(self, scope: m.Scope):
        self.scope = scope
        self.core = started_core(scope)
        self.world = m.EMPTY
        self.trace: list[str] = []

    def fail(self, problem: str) -> None:
        steps = "\n".join(f"  {i + 1}. {s}" for i, s in enumerate(self.trace))
        raise AssertionError(f"{problem}\nevents:\n{steps}")

    def step(
        self, event: m.Event | None, core_event: SchedulerEvent | None = None, *, clients_first: bool = False
    ) -> None:
        """Apply `event` to both sides (None: a core-only message the model
        treats as a no-op, such as a stale TaskStarted; pass `core_event`).

        `SchedulerRestarts` replaces the core by a fresh one and replays the
        re-registrations (`restart_events`), clients first if asked.
        """
        pre = self.world
        outcomes = m.apply(self.scope, pre, event) if event is not None else []
        if isinstance(event, m.SchedulerRestarts):
            self.trace.append(f"{m.show(event)} (clients {'first' if clients_first else 'last'})")
            self.core = make_core(self.scope)
            messages = []
            for core_event in restart_events(self.scope, pre, clients_first=clients_first):
                messages += self.core.handle(core_event)
        else:
            if core_event is None:
                core_event = to_core(self.scope, pre, event, self.core)
            self.trace.append(m.show(event) if event is not None else f"(core only) {core_event}")
            messages = self.core.handle(core_event)
        try:
            check_invariants(self.core)
        except AssertionError as exc:
            self.fail(f"core invariant broken: {exc}")
        faults = outcomes[0].world.faults if outcomes else pre.faults
        seen = abstract(self.core, faults)
        reports, computes = reports_of(messages), computes_of(messages)
        if not outcomes:
            # Not an event of the model here: the core must ignore it.
            expected = [m.Outcome(pre, frozenset(), frozenset())]
        else:
            expected = outcomes
        match = next((o for o in expected if o.world == seen), None)
        if match is None:
            options = "\n".join(f"    {o.world.describe()}" for o in expected[:4])
            self.fail(
                f"core left the model after {self.trace[-1]}:\n"
                f"  before: {pre.describe()}\n  core:   {seen.describe()}\n  model allows:\n{options}"
            )
        missing = match.reports - reports
        if missing:
            self.fail(f"core did not report {sorted(missing)} (sent {sorted(reports)})")
        for r in reports - match.reports:
            self._check_extra_report(r, pre, seen)
        if not match.computes <= computes:
            self.fail(f"no ComputeTask for {sorted(match.computes - computes)}")
        for worker, key in computes:
            t = seen.task(key)
            there = t is not None and (t.processing_on == worker or worker in t.who_has)
            moved = any(  # assigned, then taken back within the same step
                isinstance(msg, FreeKeys) and msg.worker == worker and key in msg.keys for msg in messages
            )
            if not there and not moved:
                self.fail(f"ComputeTask({worker}, {key}) but the task is neither processing nor held there")
        self._check_steals_asked(pre, seen, messages)
        self._check_failures_named(seen)
        problems = list(spec_invariants.state_violations(self.scope, seen))
        if event is not None:
            core_outcome = m.Outcome(seen, frozenset(reports), frozenset(computes))
            problems += spec_invariants.step_violations(self.scope, pre, event, core_outcome)
        if problems:
            self.fail("model invariant broken on the core: " + "; ".join(problems))
        self.world = seen

    def _check_extra_report(self, r: m.Report, pre: m.World, post: m.World) -> None:
        """A report the model did not require must still be true."""
        t = post.task(r.key)
        ok = {
            "finished": t is not None and t.state is m.MEMORY,
            "erred": t is not None and t.failure == r.failure,
            "lost": pre.state_of(r.key) is m.MEMORY and (t is None or t.state is not m.MEMORY),
            "cancelled": (r.client, r.key) not in post.holds,
        }[r.kind]
        if not ok:
            self.fail(f"core sent an untrue report {r} (key is {post.state_of(r.key).value})")

    def _check_steals_asked(self, pre: m.World, post: m.World, messages) -> None:
        """Every steal that began in this step was asked of its victim."""
        asked = {(msg.worker, msg.key) for msg in messages if isinstance(msg, RequestSteal)}
        for key, t in post.tasks:
            before = pre.task(key)
            if t.thief not in (None, m.THIEF_GONE) and (before is None or before.thief is None):
                if (t.processing_on, key) not in asked:
                    self.fail(f"steal of {key} pending, but no RequestSteal was sent to {t.processing_on}")

    def _check_failures_named(self, world: m.World) -> None:
        """KilledWorker names the key and the count; LostData names the key."""
        for key, ts in self.core.tasks.items():
            f = ts.failure
            if isinstance(f, WorkerDeaths) and ts.failure_origin == key:
                if (f.key, f.deaths) != (key, self.scope.allowed_failures):
                    self.fail(f"{key}: KilledWorker says {f}")
            if isinstance(f, DataLost) and f.key != ts.failure_origin:
                self.fail(f"{key}: LostData names {f.key}, origin {ts.failure_origin}")
