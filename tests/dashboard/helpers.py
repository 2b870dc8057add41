"""HTTP for the dashboard tests: a blocking GET in a worker thread, so a
dashboard served by the test's own Trio loop can answer it."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import trio

from trioflow.comm.auth import Credentials


def session_client_token() -> str:
    """The client token of the test session's clusters (tests/conftest.py sets
    their cluster token in TRIOFLOW_TOKEN): a dashboard answers its holders."""
    return Credentials.from_token(os.environ["TRIOFLOW_TOKEN"]).client_token()


def fetch(
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
    authorize: bool = True,
):
    """``(status, headers, body)`` of one request (error statuses too).

    With `authorize` (and no Authorization header given), the request carries
    the session's client token, as a user's browser does from ``?token=``.
    """
    headers = dict(headers or {})
    if authorize and "Authorization" not in headers:
        headers["Authorization"] = f"Bearer {session_client_token()}"
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


async def get(url: str, **kwargs):
    return await trio.to_thread.run_sync(lambda: fetch(url, **kwargs))


async def get_json(url: str, **kwargs):
    status, headers, body = await get(url, **kwargs)
    return status, json.loads(body)
