"""Exhaustive small-scope check: visit every reachable state, check everything.

Run it::

    python -m spec.explore                  # the default scopes (a minute or two)
    python -m spec.explore --scope diamond  # one scope (see SCOPES below)
    python -m spec.explore --all            # every scope, and the worker model's
    python -m spec.explore --worker         # the worker model's scopes too

Breadth-first search from the empty world over every event the scope allows
(`spec.model.enabled_events`) and every outcome of each (the model is
nondeterministic about placement). In every state the state invariants are
checked, on every step the step invariants, and from every state the
liveness properties (by running the model forward). Because the search is
breadth-first, the first violation found comes with a *shortest* trace of
events from the empty world, which is printed.

This is the "small scope hypothesis": most bugs of a state machine show up
with a handful of tasks, two or three workers and a few faults. Bigger scopes
take longer (states grow roughly exponentially with each key and fault).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from spec import invariants, worker_model
from spec.model import ALL_FEATURES, EMPTY, TRANSITIONS, KeySpec, Scope, World, apply, enabled_events, show


class Result(NamedTuple):
    name: str
    states: int
    transitions: int
    seconds: float
    violation: str | None  # the first violation with its shortest trace, or None
    uncovered: tuple = ()  # TRANSITIONS entries no step of this scope took


def _trace(parent: dict, world) -> list:
    events = []
    while parent[world] is not None:
        world, event = parent[world]
        events.append(event)
    return events[::-1]


def bfs(
    name: str,
    initial,
    successors: Callable,  # world -> iterable of (event, outcome-like with .world)
    check_state: Callable,  # world -> iterable of violations
    check_step: Callable,  # (pre, event, outcome) -> iterable of violations
    check_live: Callable | None,
    describe: Callable,
    show_event: Callable,
    max_states: int | None = None,
) -> Result:
    """Generic breadth-first search; stops at the first violation."""
    start = time.perf_counter()
    parent: dict = {initial: None}
    queue = collections.deque([initial])
    transitions = 0

    def fail(world, problems: Iterable[str], extra: list | None = None) -> Result:
        steps = _trace(parent, world) + (extra or [])
        lines = [f"VIOLATION in scope {name!r} after {len(steps)} events:"]
        lines += [f"  {i + 1}. {show_event(e)}" for i, e in enumerate(steps)]
        lines += [f"  state: {describe(world)}"]
        lines += [f"  ! {p}" for p in problems]
        return Result(name, len(parent), transitions, time.perf_counter() - start, "\n".join(lines))

    while queue:
        world = queue.popleft()
        problems = list(check_state(world))
        if not problems and check_live is not None:
            problems = list(check_live(world))
        if problems:
            return fail(world, problems)
        for event, outcome in successors(world):
            transitions += 1
            problems = list(check_step(world, event, outcome))
            if problems:
                return fail(world, problems + [f"after: {describe(outcome.world)}"], [event])
            nxt = outcome.world
            if nxt not in parent:
                parent[nxt] = (world, event)
                queue.append(nxt)
                if max_states is not None and len(parent) >= max_states:
                    queue.clear()
                    break
    return Result(name, len(parent), transitions, time.perf_counter() - start, None)


def explore(name: str, scope: Scope, *, liveness: bool = True, max_states: int | None = None) -> Result:
    """Every reachable world of `scope`, every invariant in each."""

    taken: set = set()

    def successors(world: World):
        for event in enabled_events(scope, world):
            for outcome in apply(scope, world, event):
                taken.update(outcome.moves)
                yield event, outcome

    result = bfs(
        name,
        EMPTY,
        successors,
        lambda w: invariants.state_violations(scope, w),
        lambda pre, ev, out: invariants.step_violations(scope, pre, ev, out),
        (lambda w: invariants.liveness_violations(scope, w)) if liveness else None,
        World.describe,
        show,
        max_states,
    )
    uncovered = tuple(sorted(f"{a.value}->{b.value}" for a, b in TRANSITIONS.keys() - taken))
    return result._replace(uncovered=uncovered)


def explore_worker(name: str, scope: worker_model.WorkerScope) -> Result:
    """Every reachable state of the one-worker model."""

    def successors(s):
        for event in worker_model.enabled_events(scope, s):
            for outcome in worker_model.apply(scope, s, event):
                yield event, outcome

    return bfs(
        name,
        worker_model.initial(scope),
        successors,
        lambda s: worker_model.state_violations(scope, s),
        lambda pre, ev, out: worker_model.step_violations(scope, pre, ev, out),
        None,
        worker_model.describe,
        worker_model.show,
    )


# ---------------------------------------------------------------- scopes --

_NO_EXTRAS = frozenset({"cancel", "retire", "stale-finish"})
# The CI scopes keep one fault and the events that change the most.
_CI = frozenset(
    {"cancel", "scatter-to-dead", "rejoin-with-data", "replicate", "restart", "scheduler-restart"}
)
# Every event of the task lifecycle, without work stealing and pauses: the
# scopes that existed before them keep their size (with both, "chain" grows
# from 15 760 states to 126 465). The "steal" and "pause" scopes below
# combine the two with the lifecycle's other events.
_LIFECYCLE = ALL_FEATURES - {"steal", "pause"}
# Work stealing with faults, pauses, cancellation and scheduler restarts:
# the events that take a task away from its victim while a steal is pending.
_STEALING = frozenset({"steal", "pause", "cancel", "retire", "reconnect", "stale-finish", "scheduler-restart"})

SCOPES: dict[str, Scope] = {
    # Small enough for CI (tests/properties/test_model_exhaustive.py).
    "ci-chain": Scope({"x": KeySpec(small=True), "y": KeySpec(("x",))}, max_faults=1, features=_CI),
    "ci-scatter": Scope(
        {"s": KeySpec(scattered=True), "y": KeySpec(("s",))}, max_faults=1, features=_CI
    ),
    "ci-restricted": Scope(
        {"x": KeySpec(), "y": KeySpec(("x",), restrict=("w1",))}, max_faults=1, features=_CI
    ),
    "ci-resources": Scope(
        {"x": KeySpec(resources=(("GPU", 1),)), "y": KeySpec(resources=(("GPU", 1),))},
        worker_resources={"w1": (("GPU", 1),)}, max_faults=1, features=_CI | {"fire-and-forget"},
    ),
    "ci-options": Scope(
        {"a": KeySpec(), "b": KeySpec(priority=1), "l": KeySpec(("a",), restrict=("w2",), loose=True)},
        max_faults=0, features=frozenset({"fire-and-forget"}),
    ),
    # Two tasks need x, so both go where x is and one waits: the other
    # worker may steal it, while workers leave, reconnect and the scheduler
    # restarts.
    "ci-steal": Scope(
        {"x": KeySpec(), "y": KeySpec(("x",)), "z": KeySpec(("x",))},
        max_faults=1, features=frozenset({"steal", "retire", "scheduler-restart"}),
    ),
    # Workers pause and resume while x and y are placed (and stolen).
    "ci-pause": Scope(
        {"x": KeySpec(), "y": KeySpec(("x",))}, max_faults=1, features=frozenset({"pause", "steal"})
    ),
    # The script's default: every event of the lifecycle, two faults.
    "chain": Scope({"x": KeySpec(small=True), "y": KeySpec(("x",))}, max_faults=2, features=_LIFECYCLE),
    "scatter": Scope({"s": KeySpec(scattered=True), "y": KeySpec(("s",))}, max_faults=2, features=_LIFECYCLE),
    "restricted": Scope(
        {"x": KeySpec(), "y": KeySpec(("x",), restrict=("w1",))}, max_faults=2, features=_LIFECYCLE
    ),
    # Work stealing and pauses with what can interrupt them (default scopes).
    "steal": Scope(
        {"x": KeySpec(), "y": KeySpec(("x",)), "z": KeySpec(("x",))}, max_faults=1, features=_STEALING
    ),
    "pause": Scope({"x": KeySpec(small=True), "y": KeySpec(("x",))}, max_faults=1),
    # Bigger (--all): stealing with every other event but fire-and-forget
    # (the `options` scope explores fire-and-forget with scheduler restarts).
    "steal-all": Scope(
        {"x": KeySpec(), "y": KeySpec(("x",)), "z": KeySpec(("x",))},
        max_faults=1, features=ALL_FEATURES - {"fire-and-forget"},
    ),
    # Bigger (--all): resources, priority, loose restrictions, fire-and-forget.
    "options": Scope(
        {
            "a": KeySpec(priority=-1),
            "g": KeySpec(resources=(("GPU", 1),), priority=1),
            "l": KeySpec(("a",), restrict=("w2",), loose=True),
        },
        worker_resources={"w1": (("GPU", 1),)}, max_faults=2, features=_LIFECYCLE,
    ),
    "two-clients": Scope(
        {"x": KeySpec(small=True), "y": KeySpec(("x",))}, clients=("c1", "c2"), max_faults=1,
        features=_NO_EXTRAS,
    ),
    # Bigger (--all): minutes each.
    "queue": Scope({"a": KeySpec(), "b": KeySpec(), "c": KeySpec()}, max_faults=2, features=_LIFECYCLE),
    "diamond": Scope(
        {"x": KeySpec(), "y": KeySpec(("x",)), "z": KeySpec(("x", "y"))}, max_faults=3,
        features=_NO_EXTRAS | {"scheduler-restart"},
    ),
    "mixed": Scope(
        {"s": KeySpec(scattered=True), "x": KeySpec(), "y": KeySpec(("x", "s"), restrict=("w1",))},
        max_faults=2, features=_LIFECYCLE,
    ),
    "three-workers": Scope(
        {"x": KeySpec(), "y": KeySpec(("x",))}, workers=("w1", "w2", "w3"), max_faults=3,
        allowed_failures=3, features=_NO_EXTRAS,
    ),
    "poison": Scope(
        {"x": KeySpec(), "y": KeySpec(("x",)), "z": KeySpec(("y",))},
        workers=("w1", "w2", "w3"), max_faults=3, allowed_failures=3, features=frozenset(),
    ),
}
CI_SCOPES = ("ci-chain", "ci-scatter", "ci-restricted", "ci-resources", "ci-options", "ci-steal", "ci-pause")
DEFAULT_SCOPES = ("chain", "scatter", "restricted", "two-clients", "steal", "pause")
CI_WORKER_SCOPES = ("local-chain", "fetch-one", "steal-one")

WORKER_SCOPES: dict[str, worker_model.WorkerScope] = worker_model.SCOPES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spec.explore", description=__doc__.split("\n")[0])
    parser.add_argument("--scope", action="append", choices=sorted(SCOPES), help="scope(s) to explore")
    parser.add_argument("--all", action="store_true", help="explore every scheduler scope")
    parser.add_argument("--worker", action="store_true", help="explore the worker model's scopes too")
    parser.add_argument("--no-liveness", action="store_true", help="skip the LIVE-* checks (faster)")
    parser.add_argument("--max-states", type=int, default=None, help="stop each scope after N states")
    args = parser.parse_args(argv)
    names = list(SCOPES) if args.all else (args.scope or list(DEFAULT_SCOPES))
    failed = False
    for name in names:
        r = explore(name, SCOPES[name], liveness=not args.no_liveness, max_states=args.max_states)
        failed |= _print(r, SCOPES[name])
    if args.worker or args.all:
        for name, wscope in WORKER_SCOPES.items():
            failed |= _print(explore_worker(f"worker:{name}", wscope), None)
    return 1 if failed else 0


def _print(r: Result, scope: Scope | None) -> bool:
    what = ""
    if scope is not None:
        what = (
            f" keys={len(scope.keys)} workers={len(scope.workers)} clients={len(scope.clients)}"
            f" faults<={scope.max_faults} allowed_failures={scope.allowed_failures}"
        )
    print(f"{r.name:>16}:{what} {r.states} states, {r.transitions} transitions, {r.seconds:.1f} s")
    if r.uncovered:
        print(f"{'':>17} transitions never taken here: {', '.join(r.uncovered)}")
    if r.violation:
        print(r.violation)
    sys.stdout.flush()
    return r.violation is not None


if __name__ == "__main__":
    sys.exit(main())
