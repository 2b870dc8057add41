"""The model itself: exhaustive small-scope checks of `spec/` (no core involved).

Bigger scopes run from the script: ``python -m spec.explore --all``.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

from spec import explore, invariants, worker_model
from spec import model as m

SPEC_DIR = pathlib.Path(explore.__file__).parent


def test_spec_imports_nothing_from_trioflow():
    """spec/ is an independent statement: no module of it imports trioflow."""
    offenders = []
    for path in sorted(SPEC_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "trioflow"]
    assert offenders == []


@pytest.fixture(scope="module")
def ci_results():
    """Each CI scope explored once (a few seconds each), shared by the tests below."""
    return {name: explore.explore(name, explore.SCOPES[name]) for name in explore.CI_SCOPES}


@pytest.mark.parametrize("name", explore.CI_SCOPES)
def test_every_reachable_state_of_a_small_scope_keeps_every_invariant(ci_results, name):
    """BFS over a CI scope: every state, step and liveness property holds."""
    result = ci_results[name]
    assert result.violation is None, result.violation
    assert result.states > 500  # the scope really was explored


@pytest.mark.parametrize("name", explore.CI_WORKER_SCOPES)
def test_every_reachable_state_of_the_worker_model_keeps_every_invariant(name):
    """BFS over a small worker scope: every W-INV and W-STEP invariant holds."""
    result = explore.explore_worker(name, worker_model.SCOPES[name])
    assert result.violation is None, result.violation
    assert result.states > 100


def test_a_violation_comes_with_a_shortest_trace():
    """The explorer reports the first violation with a shortest event trace."""
    scope = dataclasses.replace(explore.SCOPES["ci-chain"], features=frozenset())
    # A wrong "invariant" (no value ever exists) that needs three events to
    # break: a worker joins, x is submitted, x finishes.
    result = explore.bfs(
        "planted",
        m.EMPTY,
        lambda w: ((e, o) for e in m.enabled_events(scope, w) for o in m.apply(scope, w, e)),
        lambda w: ["PLANTED: a value exists"] if any(t.state is m.MEMORY for _, t in w.tasks) else [],
        lambda pre, ev, out: [],
        None,
        m.World.describe,
        m.show,
    )
    assert result.violation is not None
    steps = [line for line in result.violation.splitlines() if line.startswith("  ") and ". " in line]
    assert len(steps) == 3
    assert "PLANTED" in result.violation


def test_every_transition_of_the_table_is_taken(ci_results):
    """Every TRANSITIONS entry is taken by some step of the CI scopes (no dead rows)."""
    never = set.intersection(*(set(r.uncovered) for r in ci_results.values()))
    # A restricted task fed by scattered data needs a bigger scope ("mixed").
    assert never <= {"no-worker->erred"}


def test_model_invariants_name_a_failure_table_row():
    """Each invariant has an id, one sentence, and the design.md row it protects."""
    everything = (
        invariants.STATE_INVARIANTS
        + invariants.STEP_INVARIANTS
        + invariants.LIVENESS
        + worker_model.WORKER_INVARIANTS
        + worker_model.WORKER_STEP_INVARIANTS
    )
    ids = [inv.id for inv in everything]
    assert len(ids) == len(set(ids))
    for inv in everything:
        assert inv.sentence.endswith(".")
    for inv in invariants.STATE_INVARIANTS + invariants.STEP_INVARIANTS + invariants.LIVENESS:
        assert inv.row
