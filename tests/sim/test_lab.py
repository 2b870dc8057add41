"""Whole runs of the chaos lab: real scheduler, nannies, workers and client, seeded faults.

Each test runs a cluster inside one `trio.run` on a virtual clock and
asserts that every oracle held (outcomes against sequential Python and the
failure table, liveness, invariants, nothing kept after the client left).
A failure prints the seed and the command that replays it.
"""

from __future__ import annotations

import json

import pytest

from trioflow.sim.faults import format_plan, parse_plan
from trioflow.sim.lab import LabSettings, run_seed


def assert_clean(report) -> None:
    __tracebackhide__ = True
    if report.violations:
        replay = f"trioflow chaos --seed {report.seed} --plan '{format_plan(report.plan)}' --print-trace"
        pytest.fail(f"seed {report.seed} broke an oracle (replay: {replay}):\n" + "\n".join(report.violations))


# More fixed seeds run in test_regressions.py (2, 5, 56, 163) and
# test_determinism.py (7): each a 200-task workload under five faults.
def test_a_seeded_run_with_faults_passes_every_oracle():
    """A 200-task workload under five seeded faults ends exactly as sequential Python says."""
    report = run_seed(0)
    assert_clean(report)
    assert sum(report.faults.values()) >= 5
    assert report.outcomes.get("value", 0) > 100


def test_every_fault_kind_of_the_default_mix_is_injected_and_survived():
    """One plan with each default kind at once: crash, restart, hang, partition, reset."""
    plan = parse_plan(
        "crash@0.3:worker-0,restart@0.6:worker-1,hang@0.9:worker-2/4,"
        "partition@1.2:worker-3+worker-0/3.5,reset@1.5:worker-1"
    )
    report = run_seed(11, LabSettings(n_tasks=120), plan=plan)
    assert_clean(report)
    assert report.faults == {"crash": 1, "restart": 1, "hang": 1, "partition": 1, "reset": 1, **(
        {"poison": 1} if "poison" in report.faults else {}
    )}


def test_a_scheduler_restart_loses_no_computation():
    """The scheduler dies mid-workload and comes back at its address: every future still ends right."""
    plan = parse_plan("scheduler_restart@0.8:scheduler/1.5,crash@2.5:worker-1")
    report = run_seed(3, LabSettings(n_tasks=120), plan=plan)
    assert_clean(report)
    text = report.trace.text()
    assert "serving at sim://scheduler:8786 incarnation=2" in text


def test_a_run_without_faults_finishes_promptly_and_every_value_is_right():
    """No faults, no poison luck needed: the workload simply computes."""
    report = run_seed(4, LabSettings(n_tasks=100), plan=[])
    assert_clean(report)
    assert report.recovery_s is not None and report.recovery_s < 10


def test_the_trace_opens_on_a_timeline(tmp_path):
    """The Chrome trace-event JSON has a named row per node and bars for task runs."""
    report = run_seed(5, LabSettings(n_tasks=40, n_faults=2))
    path = tmp_path / "run.json"
    report.trace.write_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    rows = {e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert {"scheduler", "worker-0", "client-0", "net"} <= rows
    bars = [e for e in events if e["ph"] == "X"]
    assert bars and all(e["dur"] >= 0 for e in bars)
    assert any(e["name"].startswith("ran ") for e in bars)
