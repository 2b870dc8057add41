"""`serve_dashboard`: the scheduler's HTTP port, served by hypercorn's Trio worker.

The scheduler starts it in its own nursery (``await nursery.start(
serve_dashboard, scheduler)``) when `Config.dashboard_port` is set, so the
dashboard lives exactly as long as the scheduler and runs in its thread.

This is the one listening socket trioflow opens outside the `Network`
interface (design.md §3 rule 1): it speaks HTTP to people and to
Prometheus, not trioflow's protocol to peers, and the simulator never
starts it.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import trio

from trioflow.nurseries import background_tasks

logger = logging.getLogger("trioflow.dashboard")

# hypercorn's own log records (a broken request, a crashed handler) go here.
HTTP_LOGGER = "trioflow.dashboard.http"
# Bytes of request line and headers hypercorn reads before refusing a request.
MAX_REQUEST_HEAD_BYTES = 16 * 1024
# Seconds an idle keep-alive connection stays open (the page polls faster).
KEEP_ALIVE_TIMEOUT_S = 5.0
# Seconds open requests get when the scheduler shuts down.
GRACEFUL_TIMEOUT_S = 0.5

MISSING_EXTRA = (
    "the dashboard needs the 'dashboard' extra: pip install 'trioflow[dashboard]' "
    "(hypercorn, starlette and prometheus-client; {name!r} is missing)"
)


class DashboardError(RuntimeError):
    """The dashboard cannot be served (its extra is missing, or its port cannot be bound)."""


async def serve_dashboard(scheduler: Any, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `scheduler`'s dashboard on its config's dashboard host and port, until cancelled.

    Reports the dashboard's URL (``http://127.0.0.1:8787/``) through
    `task_status` once it accepts connections.

    Raises:
        DashboardError: the ``dashboard`` extra is not installed, or the
            port cannot be bound (in use, not allowed, no such interface).

    Cancellation: the listener closes; open requests get
    `GRACEFUL_TIMEOUT_S` to finish (the page simply retries its poll).
    """
    config = scheduler.config
    host, port = config.dashboard_host, config.dashboard_port
    try:
        import hypercorn.config
        import hypercorn.trio

        from trioflow.dashboard.app import build_app
        from trioflow.dashboard.auth import default_checks

        app = build_app(scheduler, default_checks(config.dashboard_token, host, scheduler.dashboard_check))
    except ImportError as exc:
        raise DashboardError(MISSING_EXTRA.format(name=exc.name)) from None
    http = hypercorn.config.Config()
    http.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    http.accesslog = None
    http.errorlog = logging.getLogger(HTTP_LOGGER)
    http.include_server_header = False
    http.h11_max_incomplete_size = MAX_REQUEST_HEAD_BYTES
    http.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
    http.graceful_timeout = GRACEFUL_TIMEOUT_S
    async with background_tasks() as nursery:
        try:
            binds = await nursery.start(partial(hypercorn.trio.serve, app, http))
        except BaseException as exc:
            error = _os_error(exc)
            if error is None:
                raise
            reason = (error.strerror or str(error)).lower()
            raise DashboardError(
                f"cannot serve the dashboard on {host}:{port}: {reason} "
                "(choose another dashboard port, or 0 for any free one)"
            ) from None
        url = binds[0].rstrip("/") + "/"
        task_status.started(url)
        await trio.sleep_forever()


def _os_error(exc: BaseException) -> OSError | None:
    """The `OSError` inside `exc` (hypercorn nests a bind failure in exception groups), if any."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _os_error(inner)
            if found is not None:
                return found
    return None
