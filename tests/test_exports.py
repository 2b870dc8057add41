"""The public surface of trioflow, pinned (design.md §4)."""

import concurrent.futures
import inspect

import trioflow

PUBLIC = {
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
}


def test_public_names_are_exactly_these():
    """trioflow.__all__ is the documented public surface, and each name exists."""
    assert set(trioflow.__all__) == PUBLIC
    for name in PUBLIC:
        assert hasattr(trioflow, name), name


def test_cancelled_error_is_a_concurrent_futures_cancelled_error():
    """trioflow.CancelledError can be caught as concurrent.futures.CancelledError."""
    assert issubclass(trioflow.CancelledError, concurrent.futures.CancelledError)


def test_client_methods_of_the_design_exist():
    """Client and AsyncClient offer the methods design.md §4 names."""
    names = ["submit", "map", "gather", "scatter", "cancel", "run", "who_has", "has_what",
             "nthreads", "scheduler_info", "get", "close"]
    for cls in (trioflow.Client, trioflow.AsyncClient):
        for name in names:
            assert callable(getattr(cls, name, None)), f"{cls.__name__}.{name}"


def test_servers_serve_with_task_status():
    """Scheduler and Worker have serve(*, task_status) for nursery.start."""
    for cls in (trioflow.Scheduler, trioflow.Worker):
        assert "task_status" in inspect.signature(cls.serve).parameters
