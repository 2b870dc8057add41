"""`trioflow chaos --real`: a short sweep of the real processes under real faults.

Two seeds, each a scheduler and two nanny-supervised workers started from
the command line, a small workload, and four faults drawn from every real
kind (SIGKILL, SIGSTOP/SIGCONT, the scheduler killed and started again at
its address, and link cuts between network namespaces when the tests run
as root). The command ends every process and removes every namespace
itself; the test checks that nothing of it is left.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trioflow.sim import netns

pytestmark = pytest.mark.processes

# Seconds the two runs may take together, startup included (about 30 here).
SWEEP_TIMEOUT_S = 120
# Seeds 8 and 9 of this shape strike with every kind (cuts with namespaces).
FIRST_SEED, SEEDS = 8, 2
SHAPE = ["--workers", "2", "--tasks", "40", "--faults", "4", "--mix", "kill=1,stop=1,scheduler=1,cut=1"]


def _ours_left() -> list[str]:
    return [name for name in netns._our_namespaces() if name.startswith(f"{netns.PREFIX}")]


def test_a_short_real_sweep_passes_every_oracle():
    """Two seeds of the real processes under SIGKILL, SIGSTOP, scheduler restarts (and cuts): no violation."""
    namespaces = netns.unavailable() is None
    before = set(_ours_left()) if namespaces else set()
    done = subprocess.run(
        [
            sys.executable, "-m", "trioflow", "chaos", "--real", "--seeds", str(SEEDS),
            "--first-seed", str(FIRST_SEED), "--json", *SHAPE,
        ],
        capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["runs"] == SEEDS and summary["violations"] == 0
    kinds = set(summary["faults"]) - {"poison"}
    assert kinds == ({"kill", "stop", "scheduler", "cut"} if namespaces else {"kill", "stop", "scheduler"})
    if namespaces:
        assert set(_ours_left()) == before, "the sweep left network namespaces behind"
    assert summary["outcomes"].get("value", 0) > 40
