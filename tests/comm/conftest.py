"""Fixtures for the comm tests."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest


@pytest.fixture
def refused_address() -> Iterator[str]:
    """A loopback address where nothing listens (bound but not listening, so
    no other process can take the port while the test runs)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    try:
        yield f"tcp://127.0.0.1:{port}"
    finally:
        sock.close()
