"""The chaos lab's inputs and judges, without running a cluster.

Fault plans print and parse back; workloads are seeded and evaluated in
plain Python; and the oracles reject each kind of wrong outcome (a judge
that accepts everything would make every run pass).
"""

from __future__ import annotations

import random

import pytest

from trioflow.errors import CancelledError, CommClosedError, KilledWorker, LostData
from trioflow.sim.determinism import derive_rng
from trioflow.sim.faults import Fault, format_plan, last_heal, parse_plan, random_plan
from trioflow.sim.oracles import check_outcomes
from trioflow.sim.workload import (
    Failure,
    Ref,
    ScatteredValue,
    SimUserError,
    TaskNode,
    Value,
    Workload,
    evaluate,
    generate,
)


def test_a_plan_prints_and_parses_back():
    """Every generated plan survives its text form unchanged (so any plan can be replayed)."""
    plan = random_plan(random.Random(5), n_faults=40, n_workers=4, window=8.0, mix={
        "crash": 1, "restart": 1, "hang": 1, "partition": 1, "reset": 1, "scheduler_restart": 1,
    })
    assert parse_plan(format_plan(plan)) == plan
    assert {f.kind for f in plan} == {"crash", "restart", "hang", "partition", "reset", "scheduler_restart"}


def test_a_plan_in_text_names_kind_time_target_and_duration():
    """The text form is kind@time:target[/duration], and a bad fault is refused with a reason."""
    assert parse_plan("hang@2:worker-1/4.5,crash@1.5:worker-0") == [
        Fault(1.5, "crash", "worker-0"),
        Fault(2.0, "hang", "worker-1", 4.5),
    ]
    assert last_heal(parse_plan("hang@2:worker-1/4.5,crash@7:worker-0")) == 7.0
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault.parse("explode@1:worker-0")
    with pytest.raises(ValueError, match="not a fault"):
        Fault.parse("crash:worker-0")


def test_derived_random_streams_are_independent_of_each_other_and_of_hash_seeds():
    """The same (seed, label) gives the same stream; another label another stream."""
    assert derive_rng(7, "net").random() == derive_rng(7, "net").random()
    assert derive_rng(7, "net").random() != derive_rng(7, "faults").random()
    assert derive_rng(7, "net").random() != derive_rng(8, "net").random()


def test_a_workload_is_a_function_of_its_seed():
    """The same seed builds the same graph; graphs mix every shape and stay topological."""
    a, b = generate(random.Random(3)), generate(random.Random(3))
    assert a == b
    seen = {s.key for s in a.scattered}
    for node in a.nodes:
        assert all(dep in seen for dep in node.dependencies), node
        seen.add(node.key)
    shapes = {node.shape for seed in range(5) for node in generate(random.Random(seed)).nodes}
    assert shapes == {"map", "chain", "tree", "diamond"}


def test_evaluation_propagates_failures_with_every_possible_origin():
    """A task with two failing inputs may fail with either input's error."""
    workload = Workload(
        [ScatteredValue("data-0", 5, 1)],
        [
            TaskNode("a", "fail", (Ref("data-0"),), "map", 0),
            TaskNode("b", "fail", (), "map", 0),
            TaskNode("c", "combine", (Ref("a"), Ref("b")), "tree", 0),
            TaskNode("d", "step", (Ref("data-0"), 1), "chain", 0),
        ],
        [0.0],
    )
    expected = evaluate(workload)
    assert expected["c"] == Failure(("a", "b"))
    assert expected["d"] == Value((5 * 31 + 1) % 1_000_003)


def _tiny() -> tuple[Workload, dict]:
    workload = Workload(
        [ScatteredValue("data-0", 5, 1), ScatteredValue("data-1", 6, 2)],
        [
            TaskNode("a", "step", (Ref("data-0"), 1), "chain", 0),
            TaskNode("b", "fail", (Ref("a"),), "chain", 0),
            TaskNode("p", "poison", (), "map", 0),
            TaskNode("q", "step", (Ref("p"), 2), "map", 0),
            TaskNode("r", "step", (Ref("data-1"), 3), "map", 0),
        ],
        [0.0],
        poison="p",
    )
    return workload, evaluate(workload)


def _judge(workload, expected, witnessed_deaths=None, declared_lost=("data-0",), **changes):
    observed = {
        "data-0": ("value", 5),
        "data-1": ("value", 6),
        "a": ("value", expected["a"].value),
        "b": ("error", SimUserError("b failed on purpose")),
        "p": ("error", KilledWorker("p", 3, "sim://worker-0:8800")),
        "q": ("error", KilledWorker("p", 3, "sim://worker-0:8800")),
        "r": ("value", expected["r"].value),
    }
    observed.update(changes)
    return check_outcomes(
        workload, expected, observed, witnessed_deaths=witnessed_deaths or {}, allowed_failures=3,
        declared_lost=declared_lost,
    )


def test_the_oracle_accepts_the_outcomes_the_failure_table_prescribes():
    """Right values, the user's error, and KilledWorker for the poison task pass."""
    workload, expected = _tiny()
    assert _judge(workload, expected) == []
    # Scattered data the scheduler declared lost may be lost, and so may
    # what depends on it (whether the scheduler was right to is judged by
    # check_data_losses, tests/sim/test_ledger.py).
    assert _judge(workload, expected, a=("error", LostData("data-0"))) == []


@pytest.mark.parametrize(
    "change, complaint",
    [
        ({"a": ("value", 1)}, "sequential Python says"),
        ({"b": ("value", 1)}, "must fail"),
        ({"b": ("error", SimUserError("a failed on purpose"))}, "allowed user errors"),
        ({"a": ("error", KilledWorker("a", 3, "w"))}, "not the poison task"),
        ({"r": ("error", LostData("data-1"))}, "never declared 'data-1' lost"),
        ({"a": ("error", LostData("data-1"))}, "not scattered data it uses"),
        ({"a": ("error", CancelledError("restarted"))}, "without a cluster restart"),
        ({"a": ("error", CommClosedError("gone"))}, "never prescribes"),
    ],
)
def test_the_oracle_rejects_every_other_outcome(change, complaint):
    """Wrong values, foreign errors, and failures the table does not prescribe are violations."""
    workload, expected = _tiny()
    problems = _judge(workload, expected, **change)
    assert len(problems) == 1 and complaint in problems[0], problems


def test_the_oracle_accepts_killed_worker_for_a_task_that_witnessed_enough_deaths():
    """A task the scheduler saw running on allowed_failures dying workers may be KilledWorker."""
    workload, expected = _tiny()
    killed = ("error", KilledWorker("a", 3, "sim://worker-1:8801"))
    assert _judge(workload, expected, witnessed_deaths={"a": 3}, a=killed, b=killed) == []
    assert _judge(workload, expected, witnessed_deaths={"a": 2}, a=killed, b=killed) != []


def test_a_missing_outcome_is_a_violation():
    """A future that never reached a final state is reported by name."""
    workload, expected = _tiny()
    problems = check_outcomes(
        workload, expected, {}, witnessed_deaths={}, allowed_failures=3, declared_lost=()
    )
    assert problems == ["7 futures have no outcome: data-0, data-1, a, b, p, q, r"]
