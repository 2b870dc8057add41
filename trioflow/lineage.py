"""`Lineage`: what a client keeps to submit its work again after a scheduler restart.

A scheduler that dies forgets every task. Its workers survive with their
values, but only the clients know *how* each value was made. So each client
keeps the task message of every key it holds a future for, and of every key
those depend on (transitively: recomputing a lost value may need its
inputs' recipes too), together with the pickled functions they use. On
reconnecting it sends them all again in one `submit` (design.md §1,
"scheduler dies").

A record goes as soon as nothing needs it: no future for the key and no
kept record that depends on it. That is reference counting, done by hand
because the references are keys, not objects.
"""

from __future__ import annotations

from collections.abc import Callable
from trioflow.comm.messages import TaskWire
from trioflow.comm.serialize import Serialized, SerializedFunction


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


class Lineage:
    """The task messages (and functions) needed to rebuild held keys."""

    def __init__(self) -> None:
        # key -> the task as first submitted, in submission order (inputs
        # before dependents, which is the order a resubmission needs).
        self.tasks: dict[str, KeptTask] = {}
        # key -> how many kept tasks list it as a dependency
        self._dependents: dict[str, int] = {}
        self.functions: dict[str, Serialized] = {}
        self._function_users: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def messages(self) -> list[TaskWire]:
        """Every kept task, as `submit` messages carry them, inputs first."""
        return [kept.message(key) for key, kept in self.tasks.items()]

    def remember(self, task: TaskWire, function: SerializedFunction | None) -> None:
        """Keep `task` (a task of a `submit`, or scattered data)."""
        key = task.key
        if key in self.tasks:
            return
        self.tasks[key] = KeptTask(task)
        for dep in task.dependencies:
            self._dependents[dep] = self._dependents.get(dep, 0) + 1
        if function is not None:
            self.functions[function.function_id] = function.payload
            self._function_users[function.function_id] = self._function_users.get(function.function_id, 0) + 1

    def forget(self, key: str, held: Callable[[str], bool]) -> None:
        """Drop `key`'s record if nothing needs it, then its inputs' likewise.

        `held(key)` says whether the client still holds a future for a key.
        """
        stack = [key]
        while stack:
            key = stack.pop()
            if key not in self.tasks or held(key) or self._dependents.get(key, 0):
                continue
            task = self.tasks.pop(key)
            self._dependents.pop(key, None)
            function_id = task.function_id
            if function_id is not None:
                self._function_users[function_id] -= 1
                if not self._function_users[function_id]:
                    del self._function_users[function_id]
                    del self.functions[function_id]
            for dep in task.dependencies:
                self._dependents[dep] -= 1
                stack.append(dep)
