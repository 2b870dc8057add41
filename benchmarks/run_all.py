"""Run every ``benchmarks/w*.py`` script, collect their JSON lines, print a table.

The scripts (picked up by name, in the order of their workload numbers):
w1_throughput.py, w2_latency.py, w3_tree_sum.py, w4_transfer.py,
w5_kill_during_map.py, w6_hung_worker.py, w7_poison_task.py,
w8_pending_memory.py, w9_startup.py, w10_scaling.py, w11_skewed_tasks.py,
w12_spill.py.

Each script runs in its own subprocess (and its own process group, so that
a timed-out script's worker processes go with it). Options given here that
every script understands (``--no-dask``, ``--repeat``, ``--warmup``) are
passed on. Benchmarks never fail CI: this exits 0 whatever happened, unless
``--strict``.

    python benchmarks/run_all.py [--out results.json] [--only w1,w2] [--no-dask]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _number(path: str) -> int:
    """The workload number of ``wN_name.py`` (w10 sorts after w9, not after w1)."""
    match = re.match(r"w(\d+)", os.path.basename(path))
    return int(match.group(1)) if match else 0


def _selected(path: str, wanted: list[str]) -> bool:
    """``--only w1`` picks w1_throughput.py, not w10_scaling.py."""
    name = os.path.basename(path).lower()
    return any(name.startswith(w) and not name[len(w) : len(w) + 1].isdigit() for w in wanted)


def scripts(only: list[str] | None) -> list[str]:
    found = sorted(glob.glob(os.path.join(HERE, "w*.py")), key=lambda f: (_number(f), f))
    if only:
        wanted = [o.strip().lower() for o in only]
        found = [f for f in found if _selected(f, wanted)]
    return found


def run_script(path: str, passthrough: list[str], timeout: float) -> dict:
    """Run one script; return its JSON line as a dict (or an error record)."""
    name = os.path.basename(path)
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, path, *passthrough],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM lets the script close its clusters; then the whole group goes.
            _signal_group(process, signal.SIGTERM)
            try:
                stdout, stderr = process.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                stdout, stderr = process.communicate()
            record = _last_json(stdout) or {}
            record.setdefault("script", name)
            record["error"] = f"timed out after {timeout:g} s"
            record["stderr_tail"] = stderr[-2000:]
            return record
        except BaseException:  # we were interrupted: the script goes too
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except BaseException:
                pass
            raise
    finally:
        # Anything left in the script's process group (normally nothing).
        _signal_group(process, signal.SIGKILL)
    record = _last_json(stdout)
    if record is None:
        return {
            "script": name,
            "error": f"no JSON line (exit code {process.returncode})",
            "stderr_tail": stderr[-2000:],
        }
    record["script"] = name
    record["wall_s"] = round(time.perf_counter() - start, 3)
    if process.returncode:
        record["exit_code"] = process.returncode
    return record


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def _ratio_cell(fig: dict) -> str:
    """The ratio, or its bound when the dask side never reached the figure
    (e.g. W6: dask never dropped the frozen worker within the cap)."""
    if fig.get("ratio") is None and fig.get("ratio_at_most") is not None:
        return "< " + _fmt(fig["ratio_at_most"])
    return _fmt(fig.get("ratio"))


def table(records: list[dict]) -> str:
    rows = [("workload", "figure", "unit", "better", "trioflow", "dask", "ratio t/d", "other dask variants")]
    for record in records:
        workload = record.get("workload") or record.get("script", "?")
        if "figures" not in record:
            rows.append((workload, "ERROR", "", "", "", "", "", record.get("error", "")[:60]))
            continue
        for fig in record["figures"]:
            variants = [
                f"{k}={_fmt(v)} (ratio {_fmt(fig.get('ratio_vs_' + k))})"
                for k, v in fig.items()
                if k not in ("figure", "unit", "better", "trioflow", "dask", "ratio") and not k.startswith("ratio")
            ]
            rows.append(
                (
                    workload,
                    fig["figure"],
                    fig["unit"],
                    fig["better"],
                    _fmt(fig.get("trioflow")),
                    _fmt(fig.get("dask")),
                    _ratio_cell(fig),
                    "; ".join(variants),
                )
            )
        for label, error in (record.get("errors") or {}).items():
            rows.append((workload, f"ERROR ({label})", "", "", "", "", "", error[:80]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _interrupted(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupted)  # so that the running script is ended too
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the JSON lines to this file (one per workload)")
    parser.add_argument("--only", help="comma-separated script prefixes, e.g. w1,w2")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per script (default 1800)")
    parser.add_argument("--no-dask", action="store_true", help="passed on: trioflow side only")
    parser.add_argument("--repeat", type=int, help="passed on: timed runs per side")
    parser.add_argument("--warmup", type=int, help="passed on: warm-up runs")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any workload failed")
    args = parser.parse_args(argv)

    passthrough: list[str] = []
    if args.no_dask:
        passthrough.append("--no-dask")
    if args.repeat is not None:
        passthrough += ["--repeat", str(args.repeat)]
    if args.warmup is not None:
        passthrough += ["--warmup", str(args.warmup)]

    records = []
    try:
        for path in scripts(args.only.split(",") if args.only else None):
            print(f"running {os.path.basename(path)} ...", file=sys.stderr, flush=True)
            record = run_script(path, passthrough, args.timeout)
            records.append(record)
            if args.out:  # written as we go, so a late failure keeps the earlier lines
                with open(args.out, "w") as f:
                    for r in records:
                        f.write(json.dumps(r) + "\n")
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc}); the running script was ended", file=sys.stderr)

    print(table(records))
    print("ratios are trioflow / dask: above 1 is trioflow ahead for 'higher', below 1 for 'lower'")
    failed = [r for r in records if r.get("error") or r.get("errors")]
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
