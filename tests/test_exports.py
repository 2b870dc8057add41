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


def test_every_public_name_has_one_home():
    """Every public name is imported with the package or on first use, and
    `trioflow.worker_client` is the function, whatever was imported first."""
    import trioflow.worker_client  # noqa: F401  (the module of the same name)

    eager = {"get_client", "get_worker", "rejoin", "secede", "worker_client"}
    assert set(trioflow._HOMES) | eager == set(trioflow.__all__)
    assert callable(trioflow.worker_client) and not isinstance(trioflow.worker_client, type(trioflow))
    assert set(dir(trioflow)) >= set(trioflow.__all__)


def test_a_worker_process_does_not_import_the_client_or_the_scheduler():
    """``python -m trioflow worker`` imports what a worker needs, nothing more.

    Every worker process pays its imports at start (W9 in
    docs/performance.md): the client, the cluster, the scheduler's core and
    the chaos lab are ~60 ms of CPU a worker never uses. The check runs in
    a fresh interpreter (this one has imported everything already).
    """
    import subprocess
    import sys

    code = (
        "import sys, trioflow.cli, trioflow.worker; "
        "print(sorted(m for m in sys.modules if m in {'trioflow.client', 'trioflow.cluster', "
        "'trioflow.scheduler', 'trioflow.core.scheduler_state', 'trioflow.sim.network', 'psutil'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]", done.stdout
