"""trioflow: a distributed task scheduler for Python, built on Trio.

The public surface lives here and nowhere else (tests/test_exports.py pins
it). Start with `Client`::

    import trioflow
    with trioflow.Client() as client:          # a local cluster of its own
        future = client.submit(pow, 2, 10)
        assert future.result() == 1024
"""

import logging as _logging

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
from trioflow.worker_client import get_client, get_worker, rejoin, secede, worker_client

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
