"""Who the dashboard answers: the check hook every request passes first.

The dashboard shows task keys, worker addresses and error messages, and
its ``/metrics`` are scraped by machines, so every request (the page, its
JSON, the metrics) goes through one *check*: a callable that looks at the
request's head and returns None to let it through, or a `Refusal`. The
server wraps the whole application in it (`trioflow.dashboard.app.Guard`),
so no route can forget it.

Checks in place today:

* `token_check`, when `Config.dashboard_token` is set: the request carries
  the token as ``Authorization: Bearer <token>`` or ``?token=<token>``
  (compared in constant time).
* `loopback_host_check`, when the dashboard is bound to loopback (the
  default): the ``Host`` header names a loopback host. Without it, a web
  page the browser loaded from elsewhere could resolve its own name to
  127.0.0.1 ("DNS rebinding") and read the dashboard through the browser.

When cluster-wide authentication lands, its check plugs in here:
`Scheduler(dashboard_check=...)` replaces the token check with any callable
of this shape; `default_checks` is the one place that chooses.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import urllib.parse
from collections.abc import Callable, Mapping

__all__ = [
    "DashboardRequest",
    "Refusal",
    "RequestCheck",
    "default_checks",
    "is_loopback",
    "loopback_host_check",
    "token_check",
]


@dataclasses.dataclass(frozen=True)
class DashboardRequest:
    """The head of one HTTP request, as a check sees it.

    Attributes:
        path: the path, without the query (``/api/state``).
        query: each query parameter's values.
        headers: header names in lower case -> the last value sent.
    """

    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]

    @classmethod
    def from_scope(cls, scope: Mapping) -> DashboardRequest:
        """From an ASGI HTTP scope (headers are bytes there, in latin-1)."""
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        return cls(path=scope["path"], query=query, headers=headers)

    def bearer_token(self) -> str | None:
        """The token of an ``Authorization: Bearer <token>`` header, if any."""
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a request is refused: an HTTP status (401, 403) and a reason for the person."""

    status: int
    reason: str


RequestCheck = Callable[[DashboardRequest], "Refusal | None"]


def token_check(token: str) -> RequestCheck:
    """A check that lets through requests carrying `token` (header or query).

    Raises:
        ValueError: `token` is empty (that would let everyone through).
    """
    if not token:
        raise ValueError("a dashboard token must not be empty")
    expected = token.encode()

    def check(request: DashboardRequest) -> Refusal | None:
        offered = request.bearer_token()
        if offered is None:
            values = request.query.get("token")
            offered = values[-1] if values else None
        if offered is None:
            return Refusal(
                401,
                "this dashboard needs a token: add ?token=<token> to the URL, "
                "or send the header 'Authorization: Bearer <token>'",
            )
        if not hmac.compare_digest(offered.encode(), expected):
            return Refusal(401, "wrong dashboard token")
        return None

    return check


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 possibly in brackets) is this machine's loopback."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_host_check(request: DashboardRequest) -> Refusal | None:
    """Refuse a request whose ``Host`` header is not a loopback name (DNS rebinding)."""
    host = request.headers.get("host", "")
    if is_loopback(_host_name(host)):
        return None
    return Refusal(
        403,
        f"this dashboard listens on loopback and answers only requests for a loopback host "
        f"(localhost, 127.0.0.1, [::1]); this one asked for {host[:100]!r}",
    )


def _host_name(host: str) -> str:
    """The name in a ``Host`` header: ``localhost:8787`` -> ``localhost``, ``[::1]:8787`` -> ``[::1]``."""
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    return host.rsplit(":", 1)[0]


def default_checks(token: str, bound_host: str, check: RequestCheck | None = None) -> list[RequestCheck]:
    """The checks a dashboard bound to `bound_host` applies, in order.

    Args:
        token: `Config.dashboard_token` ("" for none).
        bound_host: the interface the dashboard listens on.
        check: a check to use instead of the token check (the hook for
            cluster-wide authentication).
    """
    checks: list[RequestCheck] = []
    if is_loopback(bound_host):
        checks.append(loopback_host_check)
    if check is not None:
        checks.append(check)
    elif token:
        checks.append(token_check(token))
    return checks
