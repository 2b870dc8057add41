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


def _left_by(pid: int) -> list[str]:
    """Namespaces the run with process id `pid` made and did not remove.
    (Only its own: another run on the machine may have some at any time.)"""
    return [name for name in netns._our_namespaces() if name.startswith(f"{netns.PREFIX}{pid}-")]


def test_a_short_real_sweep_passes_every_oracle():
    """Two seeds of the real processes under SIGKILL, SIGSTOP, scheduler restarts (and cuts): no violation."""
    namespaces = netns.unavailable() is None
    sweep = subprocess.Popen(
        [
            sys.executable, "-m", "trioflow", "chaos", "--real", "--seeds", str(SEEDS),
            "--first-seed", str(FIRST_SEED), "--json", *SHAPE,
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = sweep.communicate(timeout=SWEEP_TIMEOUT_S)
    finally:
        if sweep.poll() is None:  # timed out (or the test was interrupted): end it
            sweep.kill()
            sweep.communicate()
    assert sweep.returncode == 0, stdout[-3000:] + stderr[-3000:]
    summary = json.loads(stdout)
    assert summary["runs"] == SEEDS and summary["violations"] == 0
    kinds = set(summary["faults"]) - {"poison"}
    assert kinds == ({"kill", "stop", "scheduler", "cut"} if namespaces else {"kill", "stop", "scheduler"})
    if namespaces:
        assert _left_by(sweep.pid) == [], "the sweep left network namespaces behind"
    assert summary["outcomes"].get("value", 0) > 40
