"""The client's core agrees with what `spec/` says of clients.

The model (spec/model.py) has no client state machine: it models the
scheduler's side of clients, which keys each client holds (`World.holds`)
and the reports each must receive (`Outcome.reports`). So this is no
lockstep against a client model; it is a check that a `ClientState` fed the
model's own reports, and the client-side half of the model's events,
ends each step agreeing with the model:

* every key the model says a client holds has a record in its core;
* a held key in memory is FINISHED there; a failed one is done, with the
  status its failure kind promises (`STATUS_OF_FAILURE`, design.md §1); one
  in progress is not done, unless the client got its value with the report
  (`World.delivered`);
* releasing, cancelling and leaving send what the scheduler needs to learn
  it (the model's `Release`, `Cancel`, `ClientLeaves`);
* after a scheduler restart the resubmission wants every held key that has
  not failed for good, and carries the lineage of each.

Two deliberate differences (`Clients.diverged`), where the client decides
from what it has seen itself and the model from what the scheduler knows;
the reports that follow still agree:

* after a scheduler restart the model recomputes a key a client holds even
  if it had failed; the client does not want it again (a failed future
  stays failed, design.md §1), so its record stays done while the model
  has the key in progress;
* a task submitted on an input whose future failed for good *in this
  client* (an error, or this client's own cancel) fails at once with that
  failure, unsent (`CallsSubmitted`); the model submits it, and computes
  it if another client kept the input alive.
"""

from __future__ import annotations

import random

import pytest

from spec import model as sm
from spec.explore import SCOPES
from spec.world import CANCELLED as CANCELLED_KIND
from spec.world import ERROR as ERROR_KIND
from spec.world import FAILED, IN_PROGRESS, KILLED, LOST_DATA, MEMORY
from trioflow.core import Cancelled, DataLost, UserError, WorkerDeaths
from trioflow.core import client_state as cs

STATUS_OF_FAILURE = {
    ERROR_KIND: cs.ERROR,
    KILLED: cs.ERROR,
    LOST_DATA: cs.LOST,
    CANCELLED_KIND: cs.CANCELLED,
}
WALKS, STEPS = 150, 25


class Kept:
    """A kept task as the core's lineage sees it."""

    def __init__(self, dependencies: tuple[str, ...], scattered: bool):
        self.dependencies = dependencies
        self.function_id = None if scattered else "f"


def core_failure(failure):
    kind, origin = failure.kind, failure.origin
    if kind == ERROR_KIND:
        return UserError(exception=None, type_name="ValueError", message=origin, traceback="")
    if kind == KILLED:
        return WorkerDeaths(key=origin, deaths=3, last_worker="w1")
    if kind == LOST_DATA:
        return DataLost(key=origin)
    assert kind == CANCELLED_KIND
    return Cancelled(f"cancelled: {origin}")


class Clients:
    """One `ClientState` per client of the scope, fed in step with the model."""

    def __init__(self, scope):
        self.scope = scope
        self.cores = {c: self._new_core() for c in scope.clients}
        self.diverged: set[tuple[str, str]] = set()
        self._ids = iter(range(10**9))

    def _new_core(self) -> cs.ClientState:
        core = cs.ClientState()
        core.handle(cs.SchedulerConnected("connected", False))
        return core

    def handle(self, client: str, event_type, *args):
        event = event_type(f"{client}-{next(self._ids)}", *args)
        return event, self.cores[client].handle(event)

    # ---- the client-side half of the model's events --

    def act(self, event, pre: sm.World) -> None:
        match event:
            case sm.Submit(c, k) | sm.Scatter(c, k, _):
                # The model's client submits a key with its lineage; a real
                # one can only name inputs it has futures for. So an input
                # whose task this client no longer keeps is submitted again
                # first, through a handle dropped right after (as in
                # ``client.submit(f, client.submit(g))``).
                core = self.cores[c]
                temporary = [d for d in self.scope.lineage(k)[:-1] if d not in core.lineage.tasks]
                for d in temporary:
                    self.submit(c, d)
                self.submit(c, k)
                if temporary:
                    self.handle(c, cs.HandlesDropped, tuple(temporary))
                self.diverged.discard((c, k))
                if core.futures[k].done():
                    self.diverged.add((c, k))  # an input failed for good here: see the docstring
            case sm.Release(c, k):
                refs = self.cores[c].futures[k].refs
                ev, out = self.handle(c, cs.HandlesDropped, (k,) * refs)
                assert out == [cs.SendReleaseKeys(ev.stimulus_id, (k,))]
                assert k not in self.cores[c].futures
            case sm.Cancel(c, k):
                ev, out = self.handle(c, cs.FuturesCancelled, (k,), "cancelled by the client")
                assert out[-1] == cs.SendCancelKeys(ev.stimulus_id, (k,), "cancelled by the client")
                assert all(isinstance(o, cs.FutureDone) for o in out[:-1])
            case sm.ClientLeaves(c):
                held = tuple(self.cores[c].futures)
                ev, out = self.handle(c, cs.ClosingRequested)
                assert out == ([cs.SendReleaseKeys(ev.stimulus_id, held)] if held else [])
                self.cores[c] = self._new_core()  # the user's next client
            case sm.FireAndForget(c, k):
                ev, out = self.handle(c, cs.FiredAndForgotten, (k,))
                assert out == [cs.SendFireAndForget(ev.stimulus_id, (k,))]
            case sm.Replicate(c, k, n):
                assert self.handle(c, cs.CopiesRequested, (k,), n)[1] == []
            case sm.SchedulerRestarts():
                for c, core in self.cores.items():
                    self.handle(c, cs.SchedulerDisconnected)
                    ev, out = self.handle(c, cs.SchedulerConnected, True)
                    wanted = tuple(core.wanted_again())
                    assert out[0] == cs.SendTasks(ev.stimulus_id, tuple(core.lineage.tasks), wanted)
                    assert all(isinstance(o, cs.RequestReplicas) for o in out[1:])
                    held = {k for c2, k in pre.holds if c2 == c}
                    assert set(wanted) == {k for k in held if not core.futures[k].failed_for_good()}
                    for k in wanted:
                        assert set(self.scope.lineage(k)) <= set(core.lineage.tasks)
                    self.diverged |= {(c, k) for k in held if core.futures[k].failed_for_good()}

    def submit(self, c: str, k: str) -> None:
        spec = self.scope.keys[k]
        self.handle(c, cs.HandlesMade, (k,))
        kept = (Kept(tuple(spec.deps), spec.scattered),)
        if spec.scattered:
            _, out = self.handle(c, cs.ValuesScattered, (k,), kept)
            assert out == []
        else:
            ev, out = self.handle(c, cs.CallsSubmitted, (k,), kept, {"f": b"f"})
            assert out in ([cs.SendTasks(ev.stimulus_id, (k,), (k,))], [cs.FutureDone(ev.stimulus_id, k)], [])

    # ---- the scheduler's reports --

    def report(self, reports) -> None:
        # Cancellations first (the scheduler sends a cancel's reports in the
        # step that made them), then the rest, in a stable order.
        for r in sorted(reports, key=lambda r: (r.kind != "cancelled", r.client, r.key, r.kind)):
            if r.client not in self.cores:
                continue  # the fire-and-forget pseudo-client
            if r.kind == "finished":
                self.handle(r.client, cs.FinishReported, r.key, ("w1",))
                self.diverged.discard((r.client, r.key))
            elif r.kind == "lost":
                self.handle(r.client, cs.LossReported, r.key)
            elif r.kind == "cancelled":
                self.handle(r.client, cs.FailureReported, (r.key,), Cancelled("cancelled by the client"))
            else:
                self.handle(r.client, cs.FailureReported, (r.key,), core_failure(r.failure))
                self.diverged.discard((r.client, r.key))

    # ---- agreement --

    def check(self, world: sm.World) -> None:
        for c, core in self.cores.items():
            assert cs.check_invariants(core) == []
        for c, k in world.holds:
            if c not in self.cores:
                continue
            rec = self.cores[c].futures.get(k)
            assert rec is not None, f"{c} holds {k} in the model but has no record"
            t = world.task(k)
            if t.state is MEMORY:
                assert rec.status is cs.FINISHED, f"{c}/{k}: memory in the model, {rec.status.value} here"
            elif t.state in FAILED:
                assert rec.done() and rec.status is STATUS_OF_FAILURE[t.failure.kind], (
                    f"{c}/{k}: {t.failure} in the model, {rec.status.value} here"
                )
            elif t.state in IN_PROGRESS and (c, k) not in self.diverged and (c, k) not in world.delivered:
                # (A client that got a small value with its report keeps it:
                # it is not told when the scheduler recomputes it.)
                assert not rec.done(), f"{c}/{k}: {t.state.value} in the model, done ({rec.status.value}) here"


@pytest.mark.parametrize("name", ["two-clients", "chain", "scatter", "ci-chain", "ci-scatter"])
def test_the_client_core_agrees_with_the_model_on_random_walks(name):
    """Seeded random walks of the model: the clients' cores agree with it after every step."""
    scope = SCOPES[name]
    rng = random.Random(f"client-conformance-{name}")
    steps = 0
    for walk in range(WALKS):
        world, clients = sm.EMPTY, Clients(scope)
        for _ in range(STEPS):
            events = list(sm.enabled_events(scope, world))
            rng.shuffle(events)
            for event in events:
                outcomes = sm.apply(scope, world, event)
                if outcomes:
                    break
            else:
                break
            outcome = rng.choice(outcomes)
            try:
                clients.act(event, world)
                clients.report(outcome.reports)
                clients.check(outcome.world)
            except AssertionError as exc:
                raise AssertionError(f"walk {walk} of {name!r}, event {event}: {exc}") from exc
            world = outcome.world
            steps += 1
    assert steps > WALKS * 5  # the walks did walk
