"""How a client's lineage keeps a task: compact, and as a wire task again.

Which tasks a client keeps, and for how long, is decided by its core
(`trioflow.core.client_state.Lineage`, reference counting by key). The core
never sees a wire message; this module is the shell's side of it: what is
kept of a `TaskWire` (`KeptTask`, a third of its size), and the `TaskWire`
made from it again for a resubmission (design.md §1, "scheduler dies").
"""

from __future__ import annotations

from trioflow.comm.messages import TaskWire
from trioflow.comm.serialize import Serialized
from trioflow.core.client_state import Lineage

__all__ = ["KeptTask", "Lineage", "keep", "resubmission"]


class KeptTask:
    """A task as the lineage keeps it: the fields of its `TaskWire` (but the
    key, which is the lineage's key for it), in slots.

    A client may hold a million futures, each with its task kept here: a
    `TaskWire`'s attribute dictionary alone is some 270 bytes, this whole
    record under 100.
    """

    __slots__ = ("function_id", "args", "dependencies", "retries", "workers", "scattered")

    def __init__(self, task: TaskWire):
        self.function_id = task.function_id
        # Arguments without out-of-band buffers (nearly all) are kept as
        # their pickle stream alone: the `Serialized` around it is 48 bytes.
        args = task.args
        self.args = args.header if args is not None and not args.buffers else args
        self.dependencies = task.dependencies
        self.retries = task.retries
        self.workers = task.workers
        self.scattered = task.scattered

    def message(self, key: str) -> TaskWire:
        """The task as it is submitted again."""
        args = self.args
        return TaskWire(
            key=key,
            function_id=self.function_id,
            args=args if args is None or isinstance(args, Serialized) else Serialized(args),
            dependencies=self.dependencies,
            retries=self.retries,
            workers=self.workers,
            scattered=self.scattered,
        )


def keep(task: TaskWire) -> KeptTask:
    """The compact form of `task` that a client's lineage keeps."""
    return KeptTask(task)


def resubmission(lineage: Lineage, keys) -> list[TaskWire]:
    """The kept tasks of `keys` (in this order), as `submit` messages carry them."""
    tasks = lineage.tasks
    return [tasks[key].message(key) for key in keys]  # type: ignore[attr-defined]
