"""Where a worker process's start goes before it can connect: W9's anatomy.

Not a workload of shared/benchmarks.md: a measurement for the performance
issue (docs/performance.md, W9). W9's start is mostly two fresh worker
interpreters importing what a worker needs; this takes one such start
apart, in fresh interpreters of this venv, ``--runs`` times:

- ``interpreter_ms``: ``python -c pass`` (the interpreter and `site`,
  with whatever ``.pth`` files the install put there);
- ``imports_ms``: the self times ``python -X importtime`` reports for
  ``import trioflow.cli, trioflow.worker`` (what ``python -m trioflow
  worker`` imports before it connects), summed, and split by top-level
  package (``by_package_ms``, the largest ones);
- ``dataclasses``: of trioflow's own import, the time spent making its
  dataclasses (``dataclasses`` compiles each generated method at
  import), how many there are, and the modules that make the most.

Medians over the runs. Prints one JSON line.

    python benchmarks/import_cost.py [--runs 7]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import median, now  # noqa: E402

WORKER_IMPORTS = "import trioflow.cli, trioflow.worker"

# Run in a fresh interpreter: times every dataclass trioflow's modules make.
_DATACLASS_PROBE = """
import dataclasses, json, sys, time
made = []
process_class = dataclasses._process_class
def timed(cls, *args, **kwargs):
    start = time.perf_counter()
    try:
        return process_class(cls, *args, **kwargs)
    finally:
        if cls.__module__.startswith("trioflow"):
            made.append((cls.__module__, time.perf_counter() - start))
dataclasses._process_class = timed
import trioflow.cli, trioflow.worker
by_module = {}
for module, seconds in made:
    by_module[module] = by_module.get(module, 0.0) + seconds
print(json.dumps({"count": len(made), "seconds": sum(s for _, s in made), "by_module": by_module}))
"""


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True)


def interpreter_ms() -> float:
    start = now()
    _run(["-c", "pass"])
    return (now() - start) * 1e3


def import_times() -> tuple[float, dict[str, float]]:
    """Total self time of the worker's imports, and per top-level package (ms)."""
    report = _run(["-X", "importtime", "-c", WORKER_IMPORTS]).stderr
    by_package: collections.Counter[str] = collections.Counter()
    for line in report.splitlines():
        if not line.startswith("import time:"):
            continue
        fields = line[len("import time:") :].split("|")
        if len(fields) != 3 or not fields[0].strip().isdigit():
            continue  # the header line
        name = fields[2].strip()
        by_package[name.split(".")[0]] += int(fields[0]) / 1e3
    return sum(by_package.values()), dict(by_package)


def dataclass_times() -> dict:
    return json.loads(_run(["-c", _DATACLASS_PROBE]).stdout)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh interpreters per figure (default 7)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    interpreter, imports, dataclass_runs = [], [], []
    packages: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(args.runs):
        interpreter.append(interpreter_ms())
        total, by_package = import_times()
        imports.append(total)
        for name, ms in by_package.items():
            packages[name].append(ms)
        dataclass_runs.append(dataclass_times())
    by_package_ms = {name: round(median(v + [0.0] * (args.runs - len(v))), 1) for name, v in packages.items()}
    largest = dict(sorted(by_package_ms.items(), key=lambda kv: -kv[1])[:12])
    modules = collections.defaultdict(list)
    for run in dataclass_runs:
        for module, seconds in run["by_module"].items():
            modules[module].append(seconds * 1e3)
    result = {
        "tool": "import_cost",
        "python": sys.version.split()[0],
        "runs": args.runs,
        "interpreter_ms": round(median(interpreter), 1),
        "imports_ms": round(median(imports), 1),
        "by_package_ms": largest,
        "dataclasses": {
            "count": dataclass_runs[0]["count"],
            "ms": round(median([run["seconds"] * 1e3 for run in dataclass_runs]), 1),
            "largest_modules_ms": {
                m: round(median(v), 1) for m, v in sorted(modules.items(), key=lambda kv: -median(kv[1]))[:4]
            },
        },
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
