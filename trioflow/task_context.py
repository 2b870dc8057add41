"""Which task the current thread runs: set by the worker around each call.

A record of its own so that the worker (which sets it) and the functions
tasks call (`trioflow.worker_client`, which read it) both import it from
below them: the worker never imports the client it builds for its tasks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trioflow.worker import Worker

__all__ = ["TaskContext", "current_task", "running_task"]

_local = threading.local()


@dataclasses.dataclass
class TaskContext:
    """The task the current thread runs, set by the worker around the call."""

    worker: Worker
    key: str
    trio_token: Any = None  # the worker's loop, for calls back into it
    seceded: bool = False


@contextlib.contextmanager
def running_task(worker: Worker, key: str, trio_token: Any = None) -> Iterator[TaskContext]:
    """Mark the current thread as running `key` on `worker` (the worker's use)."""
    context = _local.task = TaskContext(worker, key, trio_token)
    try:
        yield context
    finally:
        _local.task = None


def current_task(what: str) -> TaskContext:
    """The current thread's task; `what` names the caller in the error.

    Raises:
        ValueError: the thread runs no task.
    """
    context = getattr(_local, "task", None)
    if context is None:
        raise ValueError(f"{what}() works only inside a task running on a trioflow worker")
    return context
