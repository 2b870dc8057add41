"""`trioflow chaos`: sweeps, replays, traces, JSON, and the exit status."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trioflow.cli import main
from trioflow.sim import lab
from trioflow.sim.lab import RunReport
from trioflow.sim.trace import Trace


def test_chaos_seeds_3_json_exits_0_and_prints_one_json_object():
    """`python -m trioflow chaos --seeds 3 --json` runs seeds 0..2 and prints a JSON summary."""
    done = subprocess.run(
        [sys.executable, "-m", "trioflow", "chaos", "--seeds", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["runs"] == 3 and summary["failed_seeds"] == [] and summary["violations"] == 0
    assert [r["seed"] for r in summary["results"]] == [0, 1, 2]
    assert all(len(r["trace_sha256"]) == 64 for r in summary["results"])
    assert summary["faults"]["crash"] > 0 and summary["sim_seconds"] > 0
    assert "runs_per_minute" in summary and "sim_seconds_per_wall_second" in summary


def test_chaos_seed_replays_one_run_and_writes_its_trace(tmp_path, capsys):
    """`--seed N --trace FILE --print-trace` prints the run and writes the Perfetto JSON."""
    path = tmp_path / "run.json"
    code = main(["chaos", "--seed", "4", "--tasks", "30", "--faults", "2", "--trace", str(path), "--print-trace"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "seed 4: ok" in out and "trace sha256" in out
    assert " client-0 result " in out  # the trace itself
    assert json.loads(path.read_text())["traceEvents"]


def test_chaos_plan_replays_given_faults(capsys):
    """`--plan` replaces the seed's own faults, and the summary says which ran."""
    code = main(["chaos", "--seed", "1", "--tasks", "30", "--plan", "crash@0.2:worker-1,hang@0.5:worker-2/1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "plan: crash@0.2:worker-1,hang@0.5:worker-2/1" in out


def _failing_report(seed, settings=None, plan=None):
    return RunReport(
        seed=seed, plan=[], workload="none", violations=["1 futures have no outcome: x"] if seed == 2 else [],
        sim_seconds=1.0, trace=Trace(), faults={}, outcomes={},
    )


def test_chaos_exits_1_and_names_each_failing_seed(monkeypatch, capsys):
    """A violation in any run makes the exit status 1; the summary names the seed and how to replay it."""
    monkeypatch.setattr(lab, "run_seed", _failing_report)
    assert main(["chaos", "--seeds", "4"]) == 1
    out = capsys.readouterr().out
    assert "seed 2: 1 futures have no outcome: x" in out
    assert "trioflow chaos --seed 2" in out
    assert main(["chaos", "--seeds", "4", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["failed_seeds"] == [2]


def test_the_replay_hint_repeats_the_flags_that_shaped_the_runs(monkeypatch, capsys):
    """A seed names a run only with its mix and shape: the hint printed for a
    failing seed of ``--mix hang=1 --tasks 50`` carries both."""
    monkeypatch.setattr(lab, "run_seed", _failing_report)
    assert main(["chaos", "--seeds", "3", "--mix", "hang=1", "--tasks", "50"]) == 1
    out = capsys.readouterr().out
    assert "replay one with: trioflow chaos --tasks 50 --mix hang=1 --seed 2 --print-trace" in out


@pytest.mark.parametrize(
    "argv",
    [["chaos", "--print-trace"], ["chaos", "--seeds", "2", "--trace", "x.json"], ["chaos", "--seed", "1", "--workers", "0"]],
)
def test_chaos_refuses_options_that_make_no_sense(argv, capsys):
    """Replay-only options without --seed, or an empty cluster, are refused with status 2."""
    assert main(argv) == 2
    assert "trioflow chaos:" in capsys.readouterr().err


def test_chaos_refuses_a_malformed_plan(capsys):
    """A plan that does not parse is an argument error naming the problem."""
    with pytest.raises(SystemExit) as exit_info:
        main(["chaos", "--seed", "1", "--plan", "explode@1:worker-0"])
    assert exit_info.value.code == 2
    assert "unknown fault kind" in capsys.readouterr().err
