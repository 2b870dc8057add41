"""Work stealing in the chaos lab: steals happen under crashes and
partitions, every oracle holds, and the lab's steal witness (sim/nodes.py)
catches a worker that runs a task after giving it up."""

from __future__ import annotations

import pytest

from tests.sim.test_lab import assert_clean
from trioflow.core import worker_state
from trioflow.core.worker_events import SendStealAnswer
from trioflow.sim.lab import LabSettings, run_seed

SEEDS = range(4)


@pytest.mark.parametrize("kind", ["crash", "partition"])
def test_steals_happen_under_one_kind_of_fault_and_every_oracle_holds(kind):
    """Four seeds whose faults are all crashes (or all partitions): tasks
    are stolen in each run, and no oracle is broken (no task ran twice, no
    wrong value, nothing left behind)."""
    moved = []
    for seed in SEEDS:
        report = run_seed(seed, LabSettings(mix={kind: 1.0}))
        assert_clean(report)
        assert set(report.faults) <= {kind, "poison"} and report.faults.get(kind, 0) > 0
        moved.append(report.steals["stolen"])
    assert all(n > 0 for n in moved), moved


def test_the_witness_catches_a_worker_that_runs_what_it_gave_up(monkeypatch):
    """A broken worker core that answers "given up" but keeps the task (and
    runs it) is reported as a violation naming the task."""

    def keep_but_say_given_up(self, ev):
        ts = self.tasks.get(ev.key)
        said = ts is not None and ts.state in (worker_state.WAITING, worker_state.READY)
        self._emit(SendStealAnswer(self._stimulus_id, ev.key, ev.steal_id, said))

    monkeypatch.setattr(worker_state.WorkerState, "_on_steal_requested", keep_but_say_given_up)
    reports = [run_seed(seed, LabSettings(n_tasks=120), plan=[]) for seed in SEEDS]
    found = [v for r in reports for v in r.violations if "after giving it up to a steal" in v]
    assert found, [r.violations for r in reports]
