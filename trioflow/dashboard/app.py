"""The dashboard's HTTP routes (Starlette), and `Guard`, which every request passes first.

=================  ==========================================================
route              answers
=================  ==========================================================
``GET /``          the page (HTML, its script and style inline: no build step)
``GET /api/state`` the JSON the page polls (`trioflow.dashboard.state`);
                   ``?runs_after=N&events_after=M`` ask only for what is new
``GET /metrics``   Prometheus text format (`trioflow.dashboard.metrics`)
``GET /health``    ``ok``, for a load balancer or a test
=================  ==========================================================

Every answer is GET-only and read-only: nothing here changes the cluster.
A bad request gets a JSON error naming what was wrong: 400 for a bad query
parameter, 404 for an unknown path, 405 for another method, and 401 or 403
from `Guard` (`trioflow.dashboard.auth`).

Starlette is imported inside `build_app`: it is an optional extra.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from trioflow.dashboard.assets import dashboard_page
from trioflow.dashboard.auth import DashboardRequest, RequestCheck
from trioflow.dashboard.metrics import metrics_registry, metrics_text
from trioflow.dashboard.state import cluster_state

# Headers of every answer: never cached (it is live), never framed or sniffed.
COMMON_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# Query parameters of /api/state, besides the token.
STATE_PARAMETERS = ("runs_after", "events_after")
MAX_SEQ = 1 << 62


class Guard:
    """ASGI middleware: every HTTP request must pass each of `checks` to reach `app`."""

    def __init__(self, app: Any, checks: Iterable[RequestCheck]):
        self.app = app
        self.checks = tuple(checks)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.checks:
            request = DashboardRequest.from_scope(scope)
            for check in self.checks:
                refusal = check(request)
                if refusal is not None:
                    headers = {"WWW-Authenticate": 'Bearer realm="trioflow dashboard"'} if refusal.status == 401 else {}
                    await _send_json(send, refusal.status, {"error": refusal.reason}, headers)
                    return
        await self.app(scope, receive, send)


def build_app(scheduler: Any, checks: Iterable[RequestCheck]) -> Any:
    """The dashboard of `scheduler` as an ASGI application, behind `checks`."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    page = dashboard_page()
    registry = metrics_registry(scheduler)

    def answer(body: bytes | str, media_type: str, status: int = 200, headers: dict | None = None) -> Response:
        return Response(body, status_code=status, media_type=media_type, headers={**COMMON_HEADERS, **(headers or {})})

    def json_answer(document: Any, status: int = 200, headers: dict | None = None) -> Response:
        return answer(_dumps(document), "application/json", status, headers)

    async def index(request: Request) -> Response:
        return answer(page.html, "text/html; charset=utf-8", headers={"Content-Security-Policy": page.csp})

    async def state(request: Request) -> Response:
        try:
            numbers = _query_numbers(request.query_params.multi_items(), STATE_PARAMETERS)
        except ValueError as exc:
            return json_answer({"error": str(exc)}, 400)
        return json_answer(cluster_state(scheduler, **numbers))

    async def metrics(request: Request) -> Response:
        body, content_type = metrics_text(registry)
        return answer(body, content_type)

    async def health(request: Request) -> Response:
        return answer("ok\n", "text/plain; charset=utf-8")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            text = f"no such page: {request.url.path[:200]} (try /, /api/state, /metrics or /health)"
        elif exc.status_code == 405:
            text = f"{request.method[:20]} is not allowed: the dashboard is read-only (GET and HEAD)"
        else:
            text = exc.detail
        return json_answer({"error": text}, exc.status_code, dict(exc.headers or {}))

    app = Starlette(
        routes=[Route("/", index), Route("/api/state", state), Route("/metrics", metrics), Route("/health", health)],
        exception_handlers={HTTPException: http_error},
    )
    return Guard(app, checks)


def _query_numbers(items: Iterable[tuple[str, str]], names: tuple[str, ...]) -> dict[str, int]:
    """The named query parameters as ints in 0..2**62 (absent: 0).

    Raises:
        ValueError: an unknown parameter, a repeated one, or a value that is
            not such an int; the text names it.
    """
    out: dict[str, int] = {}
    for name, text in items:
        if name == "token":
            continue
        if name not in names:
            raise ValueError(f"unknown query parameter {name[:40]!r} (known: {', '.join(names)})")
        if name in out:
            raise ValueError(f"query parameter {name!r} given twice")
        if not (text.isascii() and text.isdigit()) or int(text) > MAX_SEQ:
            raise ValueError(f"query parameter {name!r} must be an integer between 0 and {MAX_SEQ}, got {text[:40]!r}")
        out[name] = int(text)
    return {name: out.get(name, 0) for name in names}


def _dumps(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()


async def _send_json(send: Any, status: int, document: Any, headers: dict[str, str]) -> None:
    body = _dumps(document)
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in {**COMMON_HEADERS, **headers}.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
