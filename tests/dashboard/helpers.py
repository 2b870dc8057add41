"""HTTP for the dashboard tests: a blocking GET in a worker thread, so a
dashboard served by the test's own Trio loop can answer it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import trio


def fetch(url: str, *, method: str = "GET", headers: dict[str, str] | None = None, timeout: float = 10.0):
    """``(status, headers, body)`` of one request (error statuses too)."""
    request = urllib.request.Request(url, method=method, headers=headers or {})
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
