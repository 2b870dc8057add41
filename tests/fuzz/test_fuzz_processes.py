"""Fuzzing real processes over loopback TCP: broken batches end no process.

`python -m trioflow scheduler` and one `python -m trioflow worker --no-nanny`
run as subprocesses (always killed at teardown). Fifty attacker connections,
drawn by Hypothesis from the strategies of tests/fuzz/attacks.py with a fixed
seed (derandomized), say hello as a client or a worker to the scheduler, or
as a peer to the worker's data port, and write broken batches over real
sockets: the kernel's buffering, resets and partial reads, which the
simulated network does not model. Then both processes must still run, a
`trioflow.Client` that was connected all along must get correct results,
and no line either process printed may be longer than 2,000 characters.
(A valid `restart` is left out: it tells a worker without a nanny to
leave, by design.)
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import trioflow
from trioflow.config import Config

from tests.cluster.conftest import free_port
from tests.fuzz.attacks import Attack, attacks, examples

pytestmark = pytest.mark.processes

N_ATTACKS = examples(50)
MAX_LINE_CHARS = 2_000
# Small timeouts, for the servers and for the client (whose heartbeats
# follow its own idle_timeout).
FLAGS = ("--handshake-timeout", "0.5", "--idle-timeout", "2", "--connect-timeout", "2", "--log-level", "info")
CLIENT_CONFIG = Config(handshake_timeout=0.5, idle_timeout=2.0, connect_timeout=2.0)


def inc(x):
    return x + 1


class Proc:
    """A ``python -m trioflow ...`` subprocess in a session of its own, its output collected."""

    def __init__(self, *args: str):
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "trioflow", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._ready = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._ready:
                self.lines.append(line)
                self._ready.notify_all()

    def wait_for_line(self, text: str, timeout: float = 30.0) -> None:
        with self._ready:
            if not self._ready.wait_for(lambda: any(text in line for line in self.lines), timeout):
                raise AssertionError(f"no line with {text!r} within {timeout} s:\n{''.join(self.lines)}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(10)
        self._reader.join(5)


@pytest.fixture
def spawn():
    """Start ``python -m trioflow`` subprocesses; every one is killed at teardown."""
    started: list[Proc] = []

    def start(*args) -> Proc:
        proc = Proc(*(str(a) for a in args))
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.kill()


def send(port: int, attack: Attack) -> None:
    """Play `attack` on a fresh TCP connection to `port`, then close it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            for step in attack.steps:
                for piece in step.pieces([]):
                    sock.sendall(piece)
                time.sleep(step.pause)
            time.sleep(attack.linger)
        except OSError:
            pass  # the server closed the connection: it is allowed to


def test_fifty_broken_batches_end_no_process(spawn):
    """After 50 attacker connections over TCP, scheduler and worker still run and serve a client right."""
    port, worker_port = free_port(), free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = spawn("scheduler", "--port", port, *FLAGS)
    scheduler.wait_for_line("listening at")
    worker = spawn("worker", address, "--no-nanny", "--port", worker_port, *FLAGS)
    worker.wait_for_line("ready")
    targets = {"client": port, "worker": port, "peer": worker_port}
    pauses = st.sampled_from([0.0, 0.0, 0.0, 0.01])
    with trioflow.Client(address, config=CLIENT_CONFIG) as client:
        assert client.submit(inc, 1).result(timeout=30) == 2
        sent: list[str] = []

        # A client's `restart` tells a worker without a nanny to leave (as it
        # should): the one op a stranger may use to end the worker here.
        strategy = st.sampled_from(sorted(targets)).flatmap(lambda role: attacks(role, pauses=pauses))

        @settings(
            max_examples=N_ATTACKS,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(attack=strategy.filter(lambda attack: "restart" not in attack.ops()))
        def attack_once(attack: Attack) -> None:
            sent.append(attack.role)
            send(targets[attack.role], attack)
            assert scheduler.popen.poll() is None, f"the scheduler exited after:\n{attack.describe()}"
            assert worker.popen.poll() is None, f"the worker exited after:\n{attack.describe()}"

        attack_once()
        assert len(sent) == N_ATTACKS
        assert client.submit(inc, 10).result(timeout=30) == 11
        futures = client.map(inc, range(20, 24))
        assert client.gather(futures, timeout=30) == [21, 22, 23, 24]
        [scattered] = client.scatter([7])
        assert client.submit(inc, scattered).result(timeout=30) == 8
    assert scheduler.popen.poll() is None and worker.popen.poll() is None
    for proc in (scheduler, worker):
        long_lines = [line[:200] for line in proc.lines if len(line) > MAX_LINE_CHARS]
        assert not long_lines, f"lines longer than {MAX_LINE_CHARS} characters: {long_lines}"
        records = re.split(r"\n(?=\d{4}-\d\d-\d\d )", "".join(proc.lines))
        internal = [r for r in records if "internal error" in r or "Traceback" in r]
        assert not internal, "\n".join(internal)
