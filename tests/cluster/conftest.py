"""Real processes for cluster tests: started by fixtures, always ended."""

import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest


def _ephemeral_ports() -> range:
    """The ports the kernel gives to outgoing connections (Linux's default
    when it does not say)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(part) for part in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def _server_ports() -> range:
    """Ports for servers: 10000 and up, below the ephemeral range (or above
    it, on a machine where it starts low)."""
    ephemeral = _ephemeral_ports()
    if ephemeral.start - 10_000 >= 1_000:
        return range(10_000, ephemeral.start)
    if 65_536 - ephemeral.stop >= 1_000:
        return range(ephemeral.stop, 65_536)
    return range(1_024, 65_536)  # no room outside it: any port (and the race is back)


_handed_out: set[int] = set()
_port_choice = random.Random()


def free_port() -> int:
    """A loopback port nothing listens on, for a server a test starts later.

    Chosen outside the kernel's range for outgoing connections: a port from
    that range (what binding port 0 gives) can become the source port of
    some connection between this call and the server's bind, and the
    server then fails with "address already in use". Each port is handed
    out once per test session, so two servers of one test never share it.

    Raises:
        RuntimeError: no free port found in 200 tries.
    """
    candidates = _server_ports()
    for _ in range(200):
        port = _port_choice.choice(candidates)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {candidates} after 200 tries")


class Proc:
    """A `trioflow ...` subprocess whose stderr lines we can wait for."""

    def __init__(self, args, env=None):
        self.args = args
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "trioflow", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.popen.stdout:
            self._queue.put(line)
        self._queue.put(None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for_line(self, text: str, timeout: float = 30.0) -> str:
        """Block until a line containing `text` is printed (or fail)."""
        for line in self.lines:
            if text in line:
                return line
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line with {text!r} within {timeout} s; output:\n{''.join(self.lines)}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"process exited before printing {text!r}; output:\n{''.join(self.lines)}")
            self.lines.append(line)
            if text in line:
                return line

    def output(self) -> str:
        self._reader.join(timeout=5)
        while not self._queue.empty():
            line = self._queue.get()
            if line is not None:
                self.lines.append(line)
        return "".join(self.lines)

    def send_signal(self, signum):
        self.popen.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        return self.popen.wait(timeout)

    def kill(self):
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(10)


@pytest.fixture
def spawn():
    """Start `trioflow` subprocesses; every one is killed at teardown."""
    started: list[Proc] = []

    def start(*args, env=None) -> Proc:
        proc = Proc([str(a) for a in args], env=env)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.popen.poll() is None:
                try:
                    os.killpg(proc.popen.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            proc.kill()
