"""The pure (sans-IO) state machines at the heart of trioflow.

Nothing in this package performs I/O, reads a clock, draws random numbers or
starts threads: events go in, messages come out (design.md §2). A test walks
the imports of every module here and fails on anything but the standard
library, other `trioflow.core` modules and `trioflow.errors`.
"""

from trioflow.core.failures import (
    Cancelled,
    DataLost,
    TaskFailure,
    UserError,
    WorkerDeaths,
)
from trioflow.core.scheduler_records import SchedulerTask, SchedulerWorker, TaskState
from trioflow.core.scheduler_state import SchedulerState
from trioflow.core.scheduler_transitions import TRANSITIONS, InvalidTransition
from trioflow.core.worker_state import WorkerState, WorkerTask, WorkerTaskState

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
