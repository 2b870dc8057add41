"""The chaos lab's task functions, run for real (`trioflow chaos --real`).

A real worker process runs `run_logged`, which writes each run's start and
end to a log file of its own process (the *run log*), sleeps a duration of
its own (drawn from the run's seed and the key, so a task takes the same
time wherever it runs), and then calls the workload's function
(`trioflow.sim.workload.FUNCTIONS`). The poison task ends its process, as a
segfault would, after logging its start: an unfinished run in the log of a
process that died.

This module is small and imports little on purpose: every worker process
imports it to unpickle its tasks.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from trioflow.sim.workload import FUNCTIONS
from trioflow.wall_clock import epoch_seconds

# The exit status of a process the poison task ended.
POISON_EXIT = 86
# The prefix of each process's run log, in the run's directory.
RUN_LOG_PREFIX = "runs-"


def run_logged(log_dir: str, seed: int, durations: tuple[float, float], op: str, label: str, *args: Any) -> Any:
    """Run the workload task `label` (``FUNCTIONS[op](label, *args)``) and log it."""
    path = os.path.join(log_dir, f"{RUN_LOG_PREFIX}{os.getpid()}.log")
    _log(path, "start", label)
    time.sleep(random.Random(f"{seed}/{label}").uniform(*durations))
    if op == "poison":
        os._exit(POISON_EXIT)
    try:
        return FUNCTIONS[op](label, *args)
    finally:
        _log(path, "end", label)


def _log(path: str, what: str, label: str) -> None:
    # One write per line, appended: lines of two threads never interleave.
    with open(path, "a") as log:
        log.write(f"{what} {label} {epoch_seconds():.6f}\n")


def read_run_logs(log_dir: str) -> list[tuple[str, str, int, float]]:
    """Every logged event: ``(start|end, key, pid, time)``, in time order."""
    events = []
    for name in os.listdir(log_dir):
        if not name.startswith(RUN_LOG_PREFIX):
            continue
        pid = int(name[len(RUN_LOG_PREFIX) : -len(".log")])
        with open(os.path.join(log_dir, name)) as log:
            for line in log:
                parts = line.split()
                if len(parts) == 3:  # a line cut short by a kill is no event
                    events.append((parts[0], parts[1], pid, float(parts[2])))
    return sorted(events, key=lambda event: event[3])
