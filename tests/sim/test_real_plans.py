"""`trioflow chaos --real` without processes: its plans, its mix, its run-log oracles."""

from __future__ import annotations

import random

import pytest

from trioflow.sim.real import RealFault, RealSettings, _RealRun, _runs_by_process, parse_real_mix, real_plan

# A pid no process has (Linux pids stay below 2**22).
GONE = 2**30


def test_a_real_plan_strikes_one_fault_at_a_time():
    """Each fault starts after the previous one healed; kills last no time."""
    settings = RealSettings(n_faults=40)
    plan = real_plan(random.Random(3), settings, with_cuts=True)
    assert len(plan) == 40 and {f.kind for f in plan} == {"kill", "stop", "scheduler", "cut"}
    for before, after in zip(plan, plan[1:]):
        assert after.time >= before.time + before.duration + settings.gaps[0]
    assert all((f.duration == 0) == (f.kind == "kill") for f in plan)
    assert all(f.target == "scheduler" if f.kind == "scheduler" else f.target.startswith("worker-") for f in plan)
    assert str(RealFault(1.5, "stop", "worker-2", 3.0)) == "stop@1.5:worker-2/3"


def test_without_namespaces_there_are_no_cuts():
    """On loopback a link cannot be cut: the plan leaves cuts out, or refuses a mix of cuts only."""
    plan = real_plan(random.Random(1), RealSettings(n_faults=30), with_cuts=False)
    assert "cut" not in {f.kind for f in plan}
    with pytest.raises(ValueError, match="every usable kind weight 0"):
        real_plan(random.Random(1), RealSettings(mix={"cut": 1}), with_cuts=False)


def test_the_real_mix_names_only_real_faults():
    """`--mix` with --real takes kill, stop, scheduler and cut, with optional weights."""
    assert parse_real_mix("kill=3,stop,cut=0.5") == {"kill": 3.0, "stop": 1.0, "cut": 0.5}
    with pytest.raises(ValueError, match="unknown fault kind 'crash' for --real"):
        parse_real_mix("crash=1")
    with pytest.raises(ValueError, match="must be a number"):
        parse_real_mix("kill=many")


def test_run_logs_become_spans_per_key_and_process():
    """A start and its end make one span; a start never ended stays open."""
    runs = [("start", "x", 1, 1.0), ("end", "x", 1, 2.0), ("start", "x", 1, 3.0), ("start", "y", 2, 1.5)]
    assert _runs_by_process(runs) == {("x", 1): [(1.0, 2.0), (3.0, None)], ("y", 2): [(1.5, None)]}


def _run() -> _RealRun:
    run = _RealRun(0, RealSettings(n_tasks=20, n_faults=0), use_netns=False)
    return run


def _a_chain(run: _RealRun) -> tuple[str, str]:
    """An input and a task that depends on it, from the run's workload."""
    node = next(n for n in run.workload.nodes if n.dependencies)
    return node.dependencies[0], node.key


def test_a_rerun_without_a_fault_is_a_violation():
    """Two runs of a key on live, unharmed workers: the run oracle names it."""
    run = _run()
    key = run.workload.nodes[0].key
    runs = [("start", key, GONE, 1.0), ("end", key, GONE, 1.1), ("start", key, GONE + 1, 2.0), ("end", key, GONE + 1, 2.1)]
    # Both processes are "gone" by their pid: that would excuse the runs as
    # deaths, so say they were struck before the runs (which excuses nothing).
    run.struck = [(0.5, frozenset({GONE, GONE + 1}), "kill before any run")]
    assert [p.split(" ran ")[0] for p in run._check_runs(runs)] == [key]


def test_a_fault_after_a_run_of_the_key_or_its_input_excuses_one_more():
    """A kill of the worker an input ran on (after it ran) allows one rerun
    of its dependent; a scheduler restart allows one more of anything."""
    run = _run()
    dep, key = _a_chain(run)
    runs = [
        ("start", dep, GONE, 1.0), ("end", dep, GONE, 1.1),
        ("start", key, GONE + 1, 1.2), ("end", key, GONE + 1, 1.3),
        ("start", key, GONE + 2, 3.0), ("end", key, GONE + 2, 3.1),
    ]
    run.struck = [(2.0, frozenset({GONE}), "kill@2:worker-0"), (0.1, frozenset({GONE + 1, GONE + 2}), "early")]
    assert run._check_runs(runs) == []
    runs += [("start", key, GONE + 3, 4.0), ("end", key, GONE + 3, 4.1)]
    run.struck.append((0.1, frozenset({GONE + 3}), "early too"))
    assert [p.split(" ran ")[0] for p in run._check_runs(runs)] == [key]
    run.struck.append((3.5, frozenset(), "scheduler@3.5:scheduler/1"))
    assert run._check_runs(runs) == []


def test_a_task_unfinished_on_struck_or_dead_workers_witnessed_their_deaths():
    """KilledWorker is legitimate for a task whose run was cut short on
    allowed_failures workers: killed, stopped or cut while it ran, or dead
    by themselves with the run unfinished."""
    run = _run()
    runs = [
        ("start", "p", GONE, 1.0),  # died with the run unfinished (the poison)
        ("start", "p", GONE + 1, 2.0), ("end", "p", GONE + 1, 9.0),  # stopped at 3 while it ran
        ("start", "q", GONE + 2, 1.0), ("end", "q", GONE + 2, 1.5),  # done before the kill at 3
    ]
    run.struck = [(3.0, frozenset({GONE + 1, GONE + 2}), "stop")]
    assert run._deaths_while_running(runs) == {"p": 2}
