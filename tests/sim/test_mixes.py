"""A few seeds of each single-fault mix, and of the default mix, pass every oracle.

The default mix rarely strikes with many faults of one kind at once, and
that is where some bugs hide (five scheduler restarts in a row found
replication forgotten across restarts). CI runs three small seeds of each;
docs/chaos.md reports 1,000 seeds of each at full size.
"""

from __future__ import annotations

import pytest

from tests.sim.test_lab import assert_clean
from trioflow.sim.faults import DEFAULT_MIX, FAULT_KINDS
from trioflow.sim.lab import LabSettings, run_seed

MIXES = {"default": dict(DEFAULT_MIX), **{kind: {kind: 1.0} for kind in FAULT_KINDS}}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mix", MIXES)
def test_each_mix_passes_every_oracle(mix, seed):
    """Five faults of one kind (or of the default mix) on a 100-task workload: no violation."""
    report = run_seed(seed, LabSettings(n_tasks=100, mix=MIXES[mix]))
    assert_clean(report)
    assert sum(n for kind, n in report.faults.items() if kind != "poison") == 5
