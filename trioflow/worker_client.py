"""Tasks that submit tasks: `get_worker`, `get_client`, `worker_client`, `secede`, `rejoin`.

A task function runs in a thread of a worker. These functions, called from
that thread, reach the worker and a client of the same cluster, as in
dask.distributed::

    def fib(n):
        if n < 2:
            return n
        with trioflow.worker_client() as client:     # gives the thread slot back
            a, b = client.submit(fib, n - 1), client.submit(fib, n - 2)
            return a.result() + b.result()

Why `secede`: a worker runs at most `nthreads` task functions at once. A
task that waits for tasks it submitted keeps its slot while it waits; on a
one-thread worker the tasks it waits for can then never run there, and if
every worker's slots are taken by waiting tasks, nothing runs anywhere.
`secede()` tells the worker's core that this thread no longer counts
(`TaskSeceded`), so the next ready task starts; `rejoin()` asks for a slot
again and blocks until the core hands one back (`TaskRejoining`, then the
instruction `Rejoin`), so at most `nthreads` tasks compute at a time
again. `worker_client()` does both around a `get_client()`.

The client inside a worker is an ordinary blocking `Client`, one per
worker, made the first time a task asks and closed with the worker. It
connects to the worker's own scheduler address with the worker's own
`Config`: whatever the worker needs to reach its scheduler, the client
has too.

How a thread knows its task: the worker sets a thread-local record
(`trioflow.task_context.TaskContext`) around each function call
(`Worker._execute`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio

from trioflow.task_context import current_task

if TYPE_CHECKING:
    from trioflow.sync_client import Client
    from trioflow.worker import Worker

def get_worker() -> Worker:
    """The `Worker` running the current task.

    Raises:
        ValueError: not called from a task.
    """
    return current_task("get_worker").worker


def get_task_key() -> str:
    """The key of the task the current thread runs.

    Raises:
        ValueError: not called from a task.
    """
    return current_task("get_task_key").key


def get_client() -> Client:
    """A blocking `Client` of the cluster running the current task.

    One per worker, shared by its tasks. A task that waits on the futures
    it submits should `secede` first (or use `worker_client`).

    Raises:
        ValueError: not called from a task.
    """
    # Imported here: this module is imported with the package (its
    # `worker_client` must win over the module of the same name), and a
    # worker process has no use for the client until a task asks for one.
    from trioflow.sync_client import Client

    return current_task("get_client").worker.task_client(Client)


def secede() -> None:
    """Give this task's thread slot back to its worker while it waits.

    The function goes on running; the worker starts another task in its
    place. Call `rejoin` before computing again. Does nothing if already
    seceded.

    Raises:
        ValueError: not called from a task.
    """
    context = current_task("secede")
    if context.seceded:
        return
    context.seceded = True
    trio.from_thread.run_sync(context.worker.task_seceded, context.key, trio_token=context.trio_token)


def rejoin() -> None:
    """Take a thread slot again after `secede`; blocks until one is free.

    Does nothing if this task has not seceded.

    Raises:
        ValueError: not called from a task.
    """
    context = current_task("rejoin")
    if not context.seceded:
        return
    resumed = threading.Event()
    trio.from_thread.run_sync(context.worker.task_rejoining, context.key, resumed, trio_token=context.trio_token)
    resumed.wait()
    context.seceded = False


@contextlib.contextmanager
def worker_client(timeout: Any = None, separate_thread: bool = True) -> Iterator[Client]:
    """``with worker_client() as client:``: secede, give the worker's client, rejoin.

    Args:
        timeout, separate_thread: accepted for dask.distributed's signature;
            the thread is always given back (`secede`).
    """
    client = get_client()
    secede()
    try:
        yield client
    finally:
        rejoin()
