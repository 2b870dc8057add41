"""The worker's invariants as code (spec/README.md, "Worker invariants")."""

from __future__ import annotations

from trioflow.core.scheduler_invariants import InvariantViolation
from trioflow.core.worker_state import WorkerState, WorkerTaskState


def check_worker_invariants(state: WorkerState) -> None:
    """Raise `InvariantViolation` naming the first broken invariant, if any."""
    problems = list(_violations(state))
    if problems:
        raise InvariantViolation("\n".join(problems[:20]))


def _violations(state: WorkerState):
    S = WorkerTaskState
    ready_keys = {key for _, key in state.ready}
    in_flight = {key: peer for peer, keys in state.in_flight.items() for key in keys}
    # W-INV-ONCE: a task runs in at most one thread, and threads are bounded.
    if len(state.executing) > state.nthreads:
        yield f"{len(state.executing)} tasks executing on {state.nthreads} threads"
    for key in (*state.executing, *state.seceded):
        ts = state.tasks.get(key)
        if ts is None or ts.state not in (S.EXECUTING, S.CANCELLED):
            yield f"{key!r} counted as executing but is {ts!r}"
    if set(state.executing) & set(state.seceded) or not set(state.rejoining) <= set(state.seceded):
        yield f"executing {list(state.executing)}, seceded {list(state.seceded)}, rejoining {list(state.rejoining)} overlap"
    for key, ts in state.tasks.items():
        where = f"task {key!r} ({ts.state.value})"
        if ts.state in (S.EXECUTING, S.CANCELLED) and key not in state.executing and key not in state.seceded:
            yield f"{where}: not counted as executing"
        for dep_key, dep in ts.dependencies.items():
            if state.tasks.get(dep_key) is not dep or key not in dep.dependents:
                yield f"{where}: dependency {dep_key!r} does not link back"
        for dependent_key, dependent in ts.dependents.items():
            if state.tasks.get(dependent_key) is not dependent:
                yield f"{where}: dependent {dependent_key!r} is not a live record"
            elif key not in dependent.dependencies:
                yield f"{where}: dependent {dependent_key!r} does not link back"
        # W-INV-READY: nothing runs before its inputs are here.
        if ts.state in (S.READY, S.EXECUTING):
            for dep in ts.dependencies.values():
                if dep.state is not S.MEMORY:
                    yield f"{where}: input {dep.key!r} is {dep.state.value}"
        if ts.state is S.READY and key not in ready_keys:
            yield f"{where}: not in the ready heap"
        if ts.state is S.WAITING:
            missing = {k for k, d in ts.dependencies.items() if d.state is not S.MEMORY}
            if set(ts.waiting_on) != missing or not missing:
                yield f"{where}: waiting_on {sorted(ts.waiting_on)} != {sorted(missing)}"
        # W-INV-FETCH: every value to fetch is either queued or on its way.
        if (ts.state is S.FETCH) != (key in state.fetch):
            yield f"{where}: FETCH <-> fetch queue mismatch"
        # (A key may also be in a request while its record is not FLIGHT:
        # the value came another way first; the late answer is ignored.)
        if ts.state is S.FLIGHT and key not in in_flight:
            yield f"{where}: FLIGHT without a request in flight"
        if ts.state is S.FETCH and not ts.holders:
            yield f"{where}: nothing left to fetch it from, yet not reported missing"
        # W-INV-NEEDED: a fetch serves an assigned task or a requested replica.
        if ts.state in (S.WAITING, S.READY) and not ts.assigned:
            yield f"{where}: waiting to run but not assigned here"
    for key in state.fetch:
        if key not in state.tasks:
            yield f"fetch queue holds forgotten {key!r}"
    if len(state.in_flight) > state.max_gathers:
        yield f"{len(state.in_flight)} gathers in flight, limit {state.max_gathers}"
