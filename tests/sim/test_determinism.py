"""Replay: the same seed and plan give a byte-identical trace (design.md §3).

A run is fingerprinted by the SHA-256 of its trace (every connection,
delivery, fault, execution and client-observed outcome, with virtual
times). These tests run real clusters on the simulated network.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import trio._core._run as trio_run

from trioflow.sim.determinism import deterministic_scheduling
from trioflow.sim.lab import LabSettings, RunReport, run_seed

# A busy seed: five faults (crash, hang, partition...), a poison task,
# scattered data lost, user errors, work rerouted and recomputed.
BUSY_SEED = 7
SMALL = LabSettings(n_tasks=60, n_faults=3)


@functools.cache
def busy_run() -> RunReport:
    return run_seed(BUSY_SEED)


def test_a_busy_seed_replays_byte_for_byte():
    """Running the same busy seed twice gives the same trace, hence the same sha256."""
    first = busy_run()
    assert first.faults.get("poison") and sum(first.faults.values()) >= 5
    again = run_seed(BUSY_SEED)
    assert again.trace.text() == first.trace.text()
    assert again.trace_sha256 == first.trace_sha256


def test_different_seeds_give_different_traces():
    """Another seed is another run (workload, plan and timings all differ)."""
    assert run_seed(BUSY_SEED + 1, SMALL).trace_sha256 != run_seed(BUSY_SEED, SMALL).trace_sha256


def test_the_trace_shows_faults_executions_and_outcomes_in_virtual_time():
    """A trace line is "time node event", with faults, task runs and results in it."""
    lines = busy_run().trace.lines()
    assert all(line.split(" ", 2)[0].replace(".", "").isdigit() for line in lines)
    text = "\n".join(lines)
    for needle in (" fault ", " ran ", "client-0 result ", " net send ", "crash by poison"):
        assert needle in text, needle
    assert not re.search(r"0x[0-9a-fA-F]{6,}", text)  # no object ids


def test_pythonhashseed_cannot_change_a_run():
    """The same seed in a process with another hash seed gives the in-process trace."""
    seed = 3
    tiny = LabSettings(n_tasks=30, n_faults=2)
    expected = run_seed(seed, tiny).trace_sha256
    other = str(int(os.environ.get("PYTHONHASHSEED", "0") or 0) + 4242)  # surely not ours
    command = [sys.executable, "-m", "trioflow", "chaos", "--seed", str(seed), "--tasks", "30", "--faults", "2", "--json"]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": other}, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [result] = json.loads(done.stdout)["results"]
    assert result["trace_sha256"] == expected, f"PYTHONHASHSEED={other} changed the run"


def test_deterministic_scheduling_is_undone_after_the_run():
    """The Trio scheduler hook is set only inside the block, then restored as it was."""
    flag, state = trio_run._ALLOW_DETERMINISTIC_SCHEDULING, trio_run._r.getstate()
    with deterministic_scheduling(5):
        assert trio_run._ALLOW_DETERMINISTIC_SCHEDULING is True
    assert trio_run._ALLOW_DETERMINISTIC_SCHEDULING == flag
    assert trio_run._r.getstate() == state
