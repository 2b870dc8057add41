"""Hypothesis draws fault plans; any plan that breaks an oracle shrinks to a minimal one.

Each example is a whole simulated run (a small workload on four workers)
under a plan of up to five faults of any default kind, at any time, on any
target. If a plan breaks an oracle, Hypothesis shrinks it (fewer faults,
earlier times, shorter durations, lower worker numbers) and reports the
smallest plan that still fails, with the command that replays it.

The example count is fixed and the search derandomized, so CI runs the
same plans every time and stays within its budget; raise
``TRIOFLOW_CHAOS_EXAMPLES`` to search further on a workstation.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from trioflow.sim.faults import DEFAULT_MIX, FAULT_KINDS, Fault, format_plan
from trioflow.sim.lab import LabSettings, run_seed

N_WORKERS = 4
EXAMPLES = int(os.environ.get("TRIOFLOW_CHAOS_EXAMPLES", "5"))
LAB = LabSettings(n_workers=N_WORKERS, n_tasks=60)


@st.composite
def faults(draw: st.DrawFn) -> Fault:
    kind = FAULT_KINDS[draw(st.sampled_from(sorted(DEFAULT_MIX)))]
    time = draw(st.integers(0, 4000)) / 1000
    duration = draw(st.integers(int(kind.durations[0] * 1000), int(kind.durations[1] * 1000))) / 1000 if kind.durations else 0.0
    if kind.target == "scheduler":
        target = "scheduler"
    elif kind.target == "workers":
        group = draw(st.sets(st.integers(0, N_WORKERS - 1), min_size=1, max_size=N_WORKERS - 1))
        target = "+".join(f"worker-{i}" for i in sorted(group))
    else:
        target = f"worker-{draw(st.integers(0, N_WORKERS - 1))}"
    return Fault(time, kind.name, target, duration)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(seed=st.integers(0, 3), plan=st.lists(faults(), max_size=5))
def test_no_fault_plan_breaks_an_oracle(seed, plan):
    """Whatever faults strike, when and where, every oracle holds."""
    plan = sorted(plan)
    replay = f"trioflow chaos --seed {seed} --tasks {LAB.n_tasks} --plan '{format_plan(plan)}' --print-trace"
    note(f"replay with: {replay}")
    report = run_seed(seed, LAB, plan=plan)
    assert report.ok, f"plan {format_plan(plan)!r} on seed {seed}:\n" + "\n".join(report.violations)
