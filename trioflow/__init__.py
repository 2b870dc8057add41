"""trioflow: a distributed task scheduler for Python, built on Trio.

The public surface lives here and nowhere else (tests/test_exports.py pins
it). Start with `Client`::

    import trioflow
    with trioflow.Client() as client:          # a local cluster of its own
        future = client.submit(pow, 2, 10)
        assert future.result() == 1024
"""

from trioflow.gc_pause import collector_paused as _collector_paused

# Importing this package loads trio, the bulk of what every worker process
# imports before it can serve, so the garbage collector is paused meanwhile
# (`trioflow.gc_pause` says why).
with _collector_paused():
    import importlib as _importlib
    import logging as _logging
    from typing import TYPE_CHECKING

    # Imported now, not on first use: the function `worker_client` and the
    # module `trioflow.worker_client` share a name, and importing the module
    # (which the first use of any of these would do) would make
    # `trioflow.worker_client` the module. Bound here, after the module is
    # imported, the name is the function. (The module is light: it imports
    # the client only when a task asks for one.)
    from trioflow.worker_client import get_client, get_worker, rejoin, secede, worker_client

if TYPE_CHECKING:  # what a type checker or an editor reads; nothing at run time
    from trioflow.client import AsyncClient, fire_and_forget
    from trioflow.cluster import AsyncLocalCluster, LocalCluster
    from trioflow.config import Config, ConfigError
    from trioflow.errors import (
        AuthenticationError,
        CancelledError,
        CommClosedError,
        KilledWorker,
        LostData,
        ProtocolError,
        RemoteTraceback,
        SerializationError,
    )
    from trioflow.future import Future
    from trioflow.reports import performance_report, write_perfetto_trace
    from trioflow.scheduler import Scheduler
    from trioflow.sync_client import Client
    from trioflow.version import __version__
    from trioflow.waiting import (
        ALL_COMPLETED,
        FIRST_COMPLETED,
        FIRST_EXCEPTION,
        as_completed,
        progress,
        wait,
    )
    from trioflow.worker import Worker

# Each public name and the module that defines it. They are imported on first
# use (PEP 562), not here: a worker process is started with ``python -m
# trioflow worker``, which imports this package first, and it has no use for
# the client, the cluster or the scheduler. Importing them all cost every
# worker start about 60 ms of CPU (docs/performance.md, W9).
_HOMES = {
    "AsyncClient": "trioflow.client",
    "fire_and_forget": "trioflow.client",
    "AsyncLocalCluster": "trioflow.cluster",
    "LocalCluster": "trioflow.cluster",
    "Config": "trioflow.config",
    "ConfigError": "trioflow.config",
    "AuthenticationError": "trioflow.errors",
    "CancelledError": "trioflow.errors",
    "CommClosedError": "trioflow.errors",
    "KilledWorker": "trioflow.errors",
    "LostData": "trioflow.errors",
    "ProtocolError": "trioflow.errors",
    "RemoteTraceback": "trioflow.errors",
    "SerializationError": "trioflow.errors",
    "Future": "trioflow.future",
    "performance_report": "trioflow.reports",
    "write_perfetto_trace": "trioflow.reports",
    "Scheduler": "trioflow.scheduler",
    "Client": "trioflow.sync_client",
    "__version__": "trioflow.version",
    "ALL_COMPLETED": "trioflow.waiting",
    "FIRST_COMPLETED": "trioflow.waiting",
    "FIRST_EXCEPTION": "trioflow.waiting",
    "as_completed": "trioflow.waiting",
    "progress": "trioflow.waiting",
    "wait": "trioflow.waiting",
    "Worker": "trioflow.worker",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'trioflow' has no attribute {name!r}")
    value = getattr(_importlib.import_module(home), name)
    globals()[name] = value  # the next lookup is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


# Where log records go is the application's choice (the CLI sets up readable
# logs); the library only makes sure that none are printed by default.
_logging.getLogger("trioflow").addHandler(_logging.NullHandler())

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "AsyncClient",
    "AsyncLocalCluster",
    "AuthenticationError",
    "CancelledError",
    "Client",
    "CommClosedError",
    "Config",
    "ConfigError",
    "Future",
    "KilledWorker",
    "LocalCluster",
    "LostData",
    "ProtocolError",
    "RemoteTraceback",
    "Scheduler",
    "SerializationError",
    "Worker",
    "__version__",
    "as_completed",
    "fire_and_forget",
    "get_client",
    "get_worker",
    "performance_report",
    "progress",
    "rejoin",
    "secede",
    "wait",
    "worker_client",
    "write_perfetto_trace",
]
