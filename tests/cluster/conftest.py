"""Real processes for cluster tests: started by fixtures, always ended."""

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
