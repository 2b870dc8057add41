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
  - `LostData` naming a scattered key it depends on, which the scheduler
    did declare lost (whether it was right to is `check_data_losses`'s
    question);
  - `CancelledError` only after a `Client.restart()`.

  Anything else (`CommClosedError`, a wrong value, a missing outcome) is a
  violation.
* `check_executions`: no key ran more often than the losses, failed
  fetches and late workers that touched it (or its inputs, or its
  dependents) allow.
* `check_data_losses`: scattered data was declared lost only when every
  worker that held a copy at that moment was lost.
* `check_deliveries`: no key was delivered twice with different values.
* `check_states`: the scheduler's and every live worker's invariants
  (`check_invariants`, `check_worker_invariants`), and that the scheduler's
  account of who holds what matches what the workers hold.
* `check_forgotten`: once the client has left, nothing is kept anywhere.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from trioflow.core.scheduler_invariants import InvariantViolation, check_invariants
from trioflow.core.worker_invariants import check_worker_invariants
from trioflow.errors import CancelledError, KilledWorker, LostData
from trioflow.sim.ledger import Ledger
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
    declared_lost: Collection[str],
    restarts: int = 0,
) -> list[str]:
    """Check each observed outcome against the failure table (module docstring).

    Args:
        witnessed_deaths: per key, the worker deaths the scheduler saw it
            running through.
        declared_lost: the scattered keys the scheduler declared lost
            during the run (`Ledger.data_losses`).
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
            elif error.key not in declared_lost:
                problems.append(f"{key}: raised {described}, but the scheduler never declared {error.key!r} lost")
        elif isinstance(error, CancelledError):
            if not restarts:
                problems.append(f"{key}: raised {described} without a cluster restart")
        else:
            problems.append(f"{key}: raised {described}, which the failure table never prescribes")
    return problems


def check_executions(workload: Workload, ledger: Ledger) -> list[str]:
    """No key ran more often than its losses, failed fetches and late workers allow.

    The bound (docs/chaos.md, "What every run checks"): a key's function
    may be called once, plus once for each distinct event in the ledger's
    excuses for the key, any key it depends on, or any key that depends on
    it (a dependent lost after the key's own value was dropped, its client
    having it, needs that value again): a worker lost while it
    had one of them assigned, running or held; a failed fetch of one of
    them; a scheduler restart after which no worker back by the end of the
    recovery window ran or held one of them that had run before, or that
    was running on a worker not back in time. (The lab's workload asks for
    no retries and never restarts the cluster, which would each add one.)
    """
    problems = []
    for key, runs in ledger.runs.items():
        if key not in workload.by_key:
            continue
        related = {**workload.ancestors(key), **workload.descendants(key)}
        excuses = sorted(ledger.excuses_for(related))
        allowed = 1 + len(excuses)
        if len(runs) > allowed:
            where = ", ".join(f"{node} at {time:.3f}" for time, node in runs)
            because = f" ({'; '.join(excuses[:3])}{'; ...' if len(excuses) > 3 else ''})" if excuses else ""
            problems.append(
                f"{key} ran {len(runs)} times ({where}), but {len(excuses)} loss(es), failed fetch(es) "
                f"or late worker(s) on it, its inputs or its dependents allow at most {allowed}{because}"
            )
    return problems


def check_data_losses(ledger: Ledger) -> list[str]:
    """Scattered data was declared lost only when every worker holding a copy was lost.

    "Lost" is the failure table's: the worker's process ended, or its link
    to the scheduler was cut (a crash, restart, hang, partition or reset
    struck it since it last registered, and it is not registered: or it
    leaves in the very instant of the loss, as two workers cut off
    together do one after the other). A holder the scheduler still counts
    as registered, or one that simply had not come back yet after a
    scheduler restart, was not lost.
    """
    problems = []
    for loss in ledger.data_losses:
        spared = ledger.spared(loss)
        if spared:
            held = ", ".join(f"{node} ({why})" for node, why in spared)
            problems.append(f"{loss.key}: declared lost at {loss.time:.3f} while {held} held a copy")
    return problems


def check_deliveries(ledger: Ledger) -> list[str]:
    """No key was delivered (to the client, or as a worker's copy) with two different values."""
    problems = []
    for key, seen in ledger.deliveries.items():
        first_value, first_where = seen[0]
        for value, where in seen[1:]:
            if value != first_value:
                problems.append(
                    f"{key}: delivered as {first_value!r} ({first_where}) and as {value!r} ({where})"
                )
                break
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
