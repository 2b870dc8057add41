"""The scheduler's invariants as code: one source, three users.

Core tests call `check_invariants` at teardown, the property tests after
every step, and the simulator at the end of every run. Each check names the
invariant of spec/README.md it enforces (INV-*). They hold *between* events:
`SchedulerState.handle` may break them while it works, never when it returns.
"""

from __future__ import annotations

from trioflow.core.failures import WorkerDeaths
from trioflow.core.scheduler_records import FAILED, IN_PROGRESS, TaskState
from trioflow.core.scheduler_state import SchedulerState


class InvariantViolation(AssertionError):
    """The scheduler's state breaks an invariant of spec/README.md."""


def check_invariants(state: SchedulerState) -> None:
    """Raise `InvariantViolation` naming the first broken invariant, if any."""
    problems = list(_violations(state))
    if problems:
        raise InvariantViolation("\n".join(problems[:20]))


def _violations(state: SchedulerState):  # noqa: C901 - a flat list of checks
    S = TaskState
    queued_keys = {key for _, key in state.queued}
    for key, ts in state.tasks.items():
        where = f"task {key!r} ({ts.state.value})"
        if ts.key != key or ts.state is S.FORGOTTEN:
            yield f"{where}: stored under the wrong key or forgotten"
        for dep_key, dep in ts.dependencies.items():
            if state.tasks.get(dep_key) is not dep:
                yield f"{where}: dependency {dep_key!r} is not a live record"
            elif key not in dep.dependents:
                yield f"{where}: not among the dependents of {dep_key!r}"
        for dependent_key, dependent in ts.dependents.items():
            if state.tasks.get(dependent_key) is not dependent or key not in dependent.dependencies:
                yield f"{where}: dependent {dependent_key!r} does not link back"
        expected_waiters = {
            k for k, d in ts.dependents.items() if d.state in IN_PROGRESS
        }
        if set(ts.waiters) != expected_waiters:
            yield f"{where}: INV-WAITERS waiters {sorted(ts.waiters)} != {sorted(expected_waiters)}"
        # INV-PROCESSING: processing on exactly one live worker.
        if (ts.state is S.PROCESSING) != (ts.processing_on is not None):
            yield f"{where}: INV-PROCESSING processing_on={ts.processing_on!r}"
        if ts.processing_on is not None:
            ws = state.workers.get(ts.processing_on)
            if ws is None or key not in ws.processing:
                yield f"{where}: INV-PROCESSING not listed by live worker {ts.processing_on}"
        # INV-MEMORY: a value has at least one live holder; only values do.
        if (ts.state is S.MEMORY) != bool(ts.who_has):
            yield f"{where}: INV-MEMORY who_has={list(ts.who_has)}"
        for address in ts.who_has:
            ws = state.workers.get(address)
            if ws is None or key not in ws.has_what:
                yield f"{where}: INV-MEMORY holder {address} is not live or does not list it"
        # INV-READY: nothing runs (or is queued to run) before its inputs exist.
        available = {k for k, d in ts.dependencies.items() if d.state is S.MEMORY and d.who_has}
        if ts.state in (S.PROCESSING, S.QUEUED, S.NO_WORKER) and len(available) != len(ts.dependencies):
            yield f"{where}: INV-READY inputs not all in memory"
        if ts.state is S.WAITING:
            missing = set(ts.dependencies) - available
            if set(ts.waiting_on) != missing or not missing:
                yield f"{where}: INV-WAITING waiting_on {sorted(ts.waiting_on)} != {sorted(missing)}"
        elif ts.waiting_on:
            yield f"{where}: waiting_on set outside WAITING"
        # INV-FAILED: failed tasks keep their failure; dependents share it.
        if (ts.state in FAILED) != (ts.failure is not None):
            yield f"{where}: INV-FAILED failure={ts.failure!r}"
        if ts.state is S.LOST and ts.has_lineage:
            yield f"{where}: INV-LOST a task with lineage is never lost"
        # INV-KILLED: marked bad exactly when it witnessed allowed_failures deaths.
        killed = isinstance(ts.failure, WorkerDeaths) and ts.failure_origin == key
        if killed != (ts.suspicious >= state.allowed_failures):
            yield f"{where}: INV-KILLED suspicious={ts.suspicious} failure={ts.failure!r}"
        # INV-HELD: a held key is never forgotten, and a needed one does not idle.
        for client in ts.who_wants:
            if key not in state.clients.get(client, {}):
                yield f"{where}: wanted by {client!r}, which does not list it"
        needed = bool(ts.who_wants or ts.waiters)
        value_needed = bool(ts.waiters) or any(c not in ts.delivered for c in ts.who_wants)
        awaited = key in state.awaiting_holders and (state.recovery_open or bool(ts.replicas_pending))
        if ts.state is S.RELEASED and value_needed and not awaited:
            # (Scattered data waits, released, for a worker to bring it back
            # while the recovery window is open or a copy is on its way:
            # INV-AWAITED below.)
            yield f"{where}: INV-NEEDED released although its value is needed"
        if ts.state is S.RELEASED and not ts.has_lineage and not awaited:
            yield f"{where}: INV-AWAITED scattered data released while awaiting no holder"
        if not set(ts.delivered) <= set(ts.who_wants):
            yield f"{where}: delivered to {sorted(ts.delivered)}, not all of whom hold it"
        if ts.state in IN_PROGRESS and not value_needed:
            yield f"{where}: INV-NEEDED in progress although nobody needs its value"
        # INV-FORGET: what no one refers to is forgotten.
        if not needed and not ts.dependents and ts.state is not S.MEMORY:
            yield f"{where}: INV-FORGET unreferenced but not forgotten"
        if not needed and not ts.dependents and ts.state is S.MEMORY and key not in state.unjudged:
            yield f"{where}: INV-FORGET unreferenced value kept"
        # INV-REPLICAS: copies on their way go to live workers that do not
        # hold one yet, and only for values.
        for address in ts.replicas_pending:
            ws = state.workers.get(address)
            if ws is None or key not in ws.replicating or address in ts.who_has:
                yield f"{where}: INV-REPLICAS pending copy at {address} is not a live, distinct worker"
        if ts.replicas_pending and ts.state is not S.MEMORY and not (
            ts.state is S.RELEASED and key in state.awaiting_holders
        ):
            yield f"{where}: INV-REPLICAS copies pending outside memory (and not awaited: INV-AWAITED)"
        if (ts.replicas_wanted > 1) != (key in state.replicated):
            yield f"{where}: replicas_wanted={ts.replicas_wanted} <-> replicated mismatch"
        if (ts.state is S.NO_WORKER) != (key in state.unrunnable):
            yield f"{where}: no-worker <-> unrunnable mismatch"
        if ts.state is S.QUEUED and key not in queued_keys:
            yield f"{where}: queued but not in the queue"
    for client, keys in state.clients.items():
        for key in keys:
            ts = state.tasks.get(key)
            if ts is None or client not in ts.who_wants:
                yield f"client {client!r}: holds {key!r}, which does not list it (INV-HELD)"
    for address, ws in state.workers.items():
        for key in ws.processing:
            ts = state.tasks.get(key)
            if ts is None or ts.processing_on != address:
                yield f"worker {address}: lists {key!r} as processing"
        for key in ws.has_what:
            ts = state.tasks.get(key)
            if ts is None or address not in ts.who_has:
                yield f"worker {address}: lists {key!r} as held"
        for key in ws.replicating:
            ts = state.tasks.get(key)
            if ts is None or address not in ts.replicas_pending:
                yield f"worker {address}: lists {key!r} as replicating"
        # Resources: what the tasks processing here hold, within what it has.
        used: dict[str, float] = {}
        for key in ws.processing:
            ts = state.tasks.get(key)
            for name, amount in ((ts.resources or {}) if ts is not None else {}).items():
                used[name] = used.get(name, 0) + amount
        if any(abs(used.get(n, 0) - ws.used.get(n, 0)) > 1e-6 for n in {*used, *ws.used}):
            yield f"worker {address}: resources in use {ws.used} != held by its tasks {used}"
        # (`used` may exceed `resources` after a scheduler restart: a run a
        # worker still has is taken up where it runs, even if the new
        # scheduler placed another task on those resources first. A task
        # is never *sent* where its resources are not free: spec STEP-RESOURCES.)
        # Idle workers take root tasks: never saturated or paused ones, always
        # hungry ones that are not paused.
        idle = address in state.idle
        if (idle and (ws.saturated or ws.paused)) or (ws.hungry and not ws.paused and not idle):
            yield f"worker {address}: idle={idle} saturated={ws.saturated} hungry={ws.hungry} paused={ws.paused}"
        # Work stealing's bookkeeping (core/stealing.py).
        prefixes: dict[str, int] = {}
        for key in ws.processing:
            ts = state.tasks.get(key)
            if ts is not None:
                prefixes[ts.prefix] = prefixes.get(ts.prefix, 0) + 1
        if prefixes != ws.prefixes:
            yield f"worker {address}: prefixes {ws.prefixes} != those of its processing tasks {prefixes}"
        if (address in state.starving) != ws.starving or (address in state.backlogged) != ws.backlogged:
            yield f"worker {address}: starving/backlogged out of date"
        for key in ws.incoming:
            pending = state.stealing.get(key)
            if pending is None or pending.thief != address:
                yield f"worker {address}: expects {key!r}, which no pending steal brings it (INV-STEAL)"
    for address in state.idle:
        if address not in state.workers:
            yield f"idle worker {address} is not live"
    for address in (*state.starving, *state.backlogged):
        if address not in state.workers:
            yield f"starving or backlogged worker {address} is not live"
    # INV-STEAL: a steal is pending only on a task processing on its victim,
    # toward another worker (or none, if its thief left).
    for key, pending in state.stealing.items():
        ts = state.tasks.get(key)
        if ts is None or ts.state is not S.PROCESSING or ts.processing_on != pending.victim:
            yield f"INV-STEAL: steal of {key!r} from {pending.victim} pending, but the task is {ts!r}"
        if pending.thief is not None:
            thief = state.workers.get(pending.thief)
            if pending.thief == pending.victim or thief is None or key not in thief.incoming:
                yield f"INV-STEAL: steal of {key!r} toward {pending.thief}, which does not expect it"
    # INV-ORPHANS: what workers reported and no task claimed yet.
    for key, orphan in state.orphans.items():
        if key in state.tasks:
            yield f"orphan {key!r} has a task record"
        if not orphan.holders and orphan.running_on is None:
            yield f"orphan {key!r} is held and run by nobody"
        for address in [*orphan.holders, orphan.running_on]:
            if address is not None and address not in state.workers:
                yield f"orphan {key!r} names dead worker {address}"
    # INV-AWAITED: scattered data no worker is known to hold waits, released,
    # only while the recovery window is open or a copy is on its way to a
    # live worker (its last holder left first); else it is lost.
    for key in state.awaiting_holders:
        ts = state.tasks.get(key)
        waits = ts is not None and (state.recovery_open or bool(ts.replicas_pending))
        allowed = (S.RELEASED, S.LOST) if waits else (S.LOST,)
        if ts is None or ts.has_lineage or ts.state not in allowed:
            yield (
                f"INV-AWAITED: awaited holder of {key!r} is stale ({ts!r}, "
                f"recovery open: {state.recovery_open})"
            )
    for key, address in state.recovering_runs.items():
        ts = state.tasks.get(key)
        if ts is None or ts.state not in (S.WAITING, S.QUEUED, S.NO_WORKER) or address not in state.workers:
            yield f"recovering run of {key!r} on {address} is stale ({ts!r})"
    if state.idle and any(
        state.tasks.get(k) is not None and state.tasks[k].state is S.QUEUED for k in queued_keys
    ):
        yield "a task is queued while a worker is idle"
