"""Questions and orders about the cluster, not about futures: the client's admin requests.

Each function takes `ask`, the client's way to send one request to the
scheduler and await its reply (`AsyncClient._request`: it waits a little
for a reconnect, and turns a refusal into `RuntimeError`), checks its
arguments, and shapes the reply the way dask.distributed's client returns
it. None of them touches the client's futures; the `AsyncClient` methods
of the same names (with the docstrings users read) delegate here.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

from trioflow.comm import dumps, loads
from trioflow.comm import messages as m
from trioflow.errors import CommClosedError
from trioflow.protocol import failure_from_wire, failure_to_exception
from trioflow.recorder import key_name

Ask = Callable[[m.Message], Awaitable[Any]]


def _pickled_call(function: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    return dumps(functools.partial(function, *args, **kwargs) if args or kwargs else function)


async def run_everywhere(
    ask: Ask, function: Callable[..., Any], args: tuple, kwargs: dict[str, Any], workers: Iterable[str] | str | None
) -> dict[str, Any]:
    """``{worker address: function(*args, **kwargs)}`` (see `AsyncClient.run`)."""
    if isinstance(workers, str):
        workers = [workers]
    restrict = None if workers is None else [str(w) for w in workers]
    answer = await ask(m.RunEverywhere(function=_pickled_call(function, args, kwargs), workers=restrict))
    results = {}
    for address, outcome in sorted(answer.results.items()):
        if outcome.result is not None:
            results[address] = loads(outcome.result)
        elif outcome.failure is not None:
            raise failure_to_exception(failure_from_wire(outcome.failure))
        else:
            raise CommClosedError(f"worker {address}: {outcome.error}")
    return results


async def run_on_scheduler(ask: Ask, function: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """``function(*args, **kwargs)`` in the scheduler's process (see `AsyncClient.run_on_scheduler`)."""
    answer = await ask(m.RunOnScheduler(function=_pickled_call(function, args, kwargs)))
    if answer.failure is not None:
        raise failure_to_exception(failure_from_wire(answer.failure))
    return loads(answer.result)


async def upload_file(ask: Ask, path: str) -> None:
    """Send a file to every worker (see `AsyncClient.upload_file`).

    Its name and size are checked here, before it is read: the scheduler
    would refuse either, after the bytes had travelled.
    """
    filename = os.path.basename(path)
    if not m.is_upload_name(filename):
        raise ValueError(
            f"upload_file takes a .py, .zip or .egg file with a plain name (letters, digits, '_', '-', '.'), "
            f"got {filename!r}"
        )
    size = os.path.getsize(path)
    if size > m.MAX_UPLOAD_BYTES:
        raise ValueError(f"{filename} has {size} bytes; upload_file takes at most {m.MAX_UPLOAD_BYTES}")
    data = await trio.Path(path).read_bytes()
    answer = await ask(m.UploadFile(filename=filename, data=dumps(data)))
    failed = {address: why for address, why in sorted(answer.results.items()) if why}
    if failed:
        address, why = next(iter(failed.items()))
        raise RuntimeError(f"{len(failed)} workers could not store {filename}; {address}: {why}")


async def scheduler_info(ask: Ask) -> dict[str, Any]:
    """The scheduler's address, workers, task counts, clients and dashboard, as a dict."""
    info = (await ask(m.GetSchedulerInfo())).info
    return {
        "address": info.address,
        "workers": {address: dict(w.__dict__) for address, w in info.workers.items()},
        "tasks": info.tasks,
        "clients": info.clients,
        "dashboard": info.dashboard,
    }


async def task_stream(ask: Ask, start: float | None, stop: float | None, count: int | None) -> list[dict[str, Any]]:
    """The task runs the scheduler remembers, oldest first (see `AsyncClient.get_task_stream`).

    The stream comes in pages (a reply has a bounded size). The first page
    fixes the newest run (`until`); later pages continue after the last run
    received, up to it, so runs finishing meanwhile do not shift the pages.
    """
    for name, value in (("start", start), ("stop", stop)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= m.MAX_TIMESTAMP_S
        ):
            raise ValueError(f"{name} must be seconds since the epoch (like time.time()), got {value!r}")
    if count is not None and (
        isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= m.MAX_STREAM_COUNT
    ):
        raise ValueError(f"count must be an int between 0 and {m.MAX_STREAM_COUNT}, got {count!r}")
    runs: list[m.TaskRun] = []
    after, until = 0, None
    while True:
        page = await ask(
            m.GetTaskStream(start=start, stop=stop, count=count if until is None else None, after=after, until=until)
        )
        runs.extend(page.runs)
        if not page.more or not page.runs:
            return [_task_run_dict(run) for run in runs]
        after, until = page.runs[-1].seq, page.until


async def cluster_metrics(ask: Ask, events_after: int) -> dict[str, Any]:
    """Counters, tasks by state, worker count and cluster events (see `AsyncClient.get_cluster_metrics`)."""
    reply = await ask(m.GetClusterMetrics(events_after=events_after))
    return {
        "counters": dict(reply.counters),
        "tasks": dict(reply.tasks),
        "workers": reply.workers,
        "events": [dict(event.__dict__) for event in reply.events],
    }


def _task_run_dict(run: m.TaskRun) -> dict[str, Any]:
    """One run of the task stream as `get_task_stream` returns it (dask's shape, plus ``name``)."""
    out: dict[str, Any] = {
        "key": run.key,
        "name": key_name(run.key),
        "worker": run.worker,
        "status": run.status,
        "startstops": ({"action": "compute", "start": run.start, "stop": run.stop},),
    }
    if run.nbytes is not None:
        out["nbytes"] = run.nbytes
    if run.error is not None:
        out["error"] = run.error
    return out
