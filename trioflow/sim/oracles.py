"""The oracles: what must be true at the end of every simulated run.

Each check returns a list of violations (human-readable strings); an empty
list means the run is correct. They encode design.md §1:

* `check_outcomes`: every future the client holds ended, and ended right.
  A value must equal the one `workload.evaluate` computed sequentially. An
  error must be one the failure table prescribes for that key:

  - the user's exception (type and message) of a failing task it depends
    on, or of itself;
  - `KilledWorker` naming the poison task, or a task the scheduler saw
    running on `allowed_failures` workers that died (a legitimate victim
    of bad luck: that is the rule), if the key depends on it;
  - `LostData` naming a scattered key it depends on, which was not
    replicated (or lost more workers than it had copies);
  - `CancelledError` only after a `Client.restart()`.

  Anything else (`CommClosedError`, a wrong value, a missing outcome) is a
  violation.
* `check_states`: the scheduler's and every live worker's invariants
  (`check_invariants`, `check_worker_invariants`), and that the scheduler's
  account of who holds what matches what the workers hold.
* `check_forgotten`: once the client has left, nothing is kept anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trioflow.core.scheduler_invariants import InvariantViolation, check_invariants
from trioflow.core.worker_invariants import check_worker_invariants
from trioflow.errors import CancelledError, KilledWorker, LostData
from trioflow.sim.workload import Failure, SimUserError, Value, Workload

# An outcome as the client saw it: ("value", v) or ("error", exception).
Outcome = tuple[str, Any]


def check_outcomes(
    workload: Workload,
    expected: Mapping[str, Value | Failure],
    observed: Mapping[str, Outcome],
    *,
    witnessed_deaths: Mapping[str, int],
    allowed_failures: int,
    workers_lost: int,
    restarts: int = 0,
) -> list[str]:
    """Check each observed outcome against the failure table (module docstring).

    Args:
        witnessed_deaths: per key, the worker deaths the scheduler saw it
            running through.
        workers_lost: how many worker losses the fault plan caused (an
            upper bound), for replicated scattered data.
        restarts: how many times the cluster was restarted (`Client.restart`).
    """
    problems = []
    scattered = {s.key: s for s in workload.scattered}
    missing = [key for key in workload.keys if key not in observed]
    if missing:
        problems.append(f"{len(missing)} futures have no outcome: {', '.join(missing[:10])}")
    for key in workload.keys:
        if key not in observed:
            continue
        kind, what = observed[key]
        want = expected[key]
        if kind == "value":
            if not isinstance(want, Value):
                problems.append(f"{key}: finished with {what!r}, but must fail (from {', '.join(want.origins)})")
            elif what != want.value:
                problems.append(f"{key}: finished with {what!r}, sequential Python says {want.value!r}")
            continue
        error: BaseException = what
        described = f"{type(error).__name__}: {error}"
        if isinstance(error, SimUserError):
            origins = want.origins if isinstance(want, Failure) else ()
            messages = [f"{o} failed on purpose" for o in origins if workload.by_key[o].op == "fail"]
            if str(error) not in messages:
                problems.append(f"{key}: raised {described}; allowed user errors: {messages or 'none'}")
        elif isinstance(error, KilledWorker):
            victim = error.key
            legitimate = victim == workload.poison or witnessed_deaths.get(victim, 0) >= allowed_failures
            if victim not in workload.ancestors(key) or not legitimate:
                problems.append(
                    f"{key}: raised {described}, but {victim!r} is not the poison task "
                    f"({workload.poison}) nor witnessed {allowed_failures} deaths "
                    f"({witnessed_deaths.get(victim, 0)}), or {key} does not depend on it"
                )
        elif isinstance(error, LostData):
            source = scattered.get(error.key)
            if source is None or error.key not in workload.ancestors(key):
                problems.append(f"{key}: raised {described}, but {error.key!r} is not scattered data it uses")
            elif source.replicas > 1 and workers_lost < source.replicas:
                problems.append(
                    f"{key}: raised {described}, but {error.key!r} had {source.replicas} copies "
                    f"and the plan lost at most {workers_lost} workers"
                )
        elif isinstance(error, CancelledError):
            if not restarts:
                problems.append(f"{key}: raised {described} without a cluster restart")
        else:
            problems.append(f"{key}: raised {described}, which the failure table never prescribes")
    return problems


def check_states(scheduler: Any, workers: Sequence[Any]) -> list[str]:
    """The invariants of the scheduler and of each worker, and their agreement.

    Args:
        scheduler: the running `Scheduler`.
        workers: the running `Worker` objects.
    """
    problems = []
    try:
        check_invariants(scheduler.state)
    except InvariantViolation as exc:
        problems.append(f"scheduler invariants: {exc}")
    by_address = {w.address: w for w in workers if w.state is not None}
    for worker in by_address.values():
        try:
            check_worker_invariants(worker.state)
        except InvariantViolation as exc:
            problems.append(f"worker {worker.address} invariants: {exc}")
        for key in worker.state.memory():
            if key not in worker.data:
                problems.append(f"worker {worker.address}: {key!r} is in memory but not in its data store")
    for key, ts in scheduler.state.tasks.items():
        for address in ts.who_has:
            worker = by_address.get(address)
            if worker is None:
                problems.append(f"scheduler: {key!r} held by {address}, which is not a running worker")
            elif key not in worker.data:
                problems.append(f"scheduler: {key!r} held by {address}, which does not have it")
    return problems


def check_forgotten(scheduler: Any, workers: Sequence[Any]) -> list[str]:
    """After the last client left: no task record, no value, anywhere."""
    problems = []
    if scheduler.state.tasks:
        keys = list(scheduler.state.tasks)
        problems.append(f"scheduler still has {len(keys)} tasks after the client left: {keys[:5]}")
    for worker in workers:
        if worker.data:
            problems.append(f"worker {worker.address} still holds {len(worker.data)} values: {list(worker.data)[:5]}")
        if worker.state is not None and worker.state.tasks:
            problems.append(
                f"worker {worker.address} still has {len(worker.state.tasks)} tasks: {list(worker.state.tasks)[:5]}"
            )
    return problems
