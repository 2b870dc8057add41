"""The pure (sans-IO) state machines at the heart of trioflow.

Nothing in this package performs I/O, reads a clock, draws random numbers or
starts threads: events go in, messages come out (design.md §2). A test walks
the imports of every module here and fails on anything but the standard
library, other `trioflow.core` modules and `trioflow.errors`.
"""

import importlib as _importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trioflow.core.failures import Cancelled, DataLost, TaskFailure, UserError, WorkerDeaths
    from trioflow.core.scheduler_records import SchedulerTask, SchedulerWorker, TaskState
    from trioflow.core.scheduler_state import SchedulerState
    from trioflow.core.scheduler_transitions import TRANSITIONS, InvalidTransition
    from trioflow.core.worker_state import WorkerState, WorkerTask, WorkerTaskState

# Imported on first use (PEP 562): a worker process needs the worker's core
# only, and the scheduler's core costs ~30 ms to import (docs/performance.md, W9).
_HOMES = {
    "Cancelled": "trioflow.core.failures",
    "DataLost": "trioflow.core.failures",
    "TaskFailure": "trioflow.core.failures",
    "UserError": "trioflow.core.failures",
    "WorkerDeaths": "trioflow.core.failures",
    "SchedulerTask": "trioflow.core.scheduler_records",
    "SchedulerWorker": "trioflow.core.scheduler_records",
    "TaskState": "trioflow.core.scheduler_records",
    "SchedulerState": "trioflow.core.scheduler_state",
    "TRANSITIONS": "trioflow.core.scheduler_transitions",
    "InvalidTransition": "trioflow.core.scheduler_transitions",
    "WorkerState": "trioflow.core.worker_state",
    "WorkerTask": "trioflow.core.worker_state",
    "WorkerTaskState": "trioflow.core.worker_state",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'trioflow.core' has no attribute {name!r}")
    value = getattr(_importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


__all__ = [
    "TRANSITIONS",
    "Cancelled",
    "DataLost",
    "InvalidTransition",
    "SchedulerState",
    "SchedulerTask",
    "SchedulerWorker",
    "TaskFailure",
    "TaskState",
    "UserError",
    "WorkerDeaths",
    "WorkerState",
    "WorkerTask",
    "WorkerTaskState",
]
