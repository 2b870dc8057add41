"""Hosts for cluster tests and `trioflow chaos --real`: Linux network
namespaces joined by a virtual switch.

A network namespace has its own interfaces, addresses, routes and ports:
to a process inside it, it is another machine on a LAN. `virtual_lan`
builds such a LAN for one test and tears it down afterwards:

    switch namespace        bridge ``br0``, no address
      ├── veth ``p-s``  ─────  ``tf0`` 10.213.0.1/24  in namespace "s"
      ├── veth ``p-a``  ─────  ``tf0`` 10.213.0.2/24  in namespace "a"
      └── ...

Every address lives inside a namespace this module created; the machine's
own namespace gains no interface and no address, and no route leads out,
so nothing the tests start can reach (or be reached from) a real network.
Two test runs at once do not collide: each has its own namespaces, hence
its own LAN, and the names carry the pid of the run (``tfnet-<pid>-<n>-``).
Cutting a host's link (`Lan.cut`) sets its ``tf0`` down, as when a cable
is pulled: the other hosts hear silence from it (no reset, no FIN), and the
cut host itself has no route to them until `Lan.mend`.

Processes in a namespace start as ``ip netns exec NS python ...``, which
execs (no fork), so the pid we get is the Python process itself; each gets
a session of its own and is ended with `os.killpg`. `Lan.close` then kills
whatever is still inside the namespaces (anything that left its process
group, or a process the test forgot), deletes them (their veths go with them), and checks that none of
them is left. `remove_leftovers` does the same for the namespaces of an
earlier run that crashed before its cleanup (its pid no longer runs).

`entered(lan, host)` moves the calling *thread* into a host's namespace for
a block (``setns(2)``): the sockets it opens meanwhile belong to that host.
That is how `trioflow chaos --real` runs its client on a host of the LAN
without any process of its own in it.

Needs root and iproute2; `unavailable()` says why not, for a skip.
"""

from __future__ import annotations

import ctypes
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import count

from trioflow.wall_clock import wall_seconds

PREFIX = "tfnet-"
# A private range nobody routes; every LAN is its own, so all use the same.
SUBNET = "10.213.0"
IP_TIMEOUT_S = 10.0
# How long a killed process may take to be reaped.
REAP_TIMEOUT_S = 10.0

_lan_numbers = count(1)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip ARGS`` (bounded); raise with its stderr if it fails and `check`."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def unavailable() -> str | None:
    """Why namespaces cannot be built here (for a skip), or None if they can.

    Tries what the tests need, on a probe namespace removed at once: adding
    a namespace, a veth pair into it, and running a command inside.
    """
    if sys.platform != "linux":
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs these tests as root)"
    if shutil.which("ip") is None:
        return "no `ip` command (install iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        ip("netns", "add", probe)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        ip("netns", "exec", probe, "true")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"network namespaces are not usable: {exc}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


def _our_namespaces() -> list[str]:
    listed = ip("netns", "list").stdout.splitlines()
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in listed if line.startswith(PREFIX)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(namespace: str) -> None:
    """SIGKILL every process in `namespace` and wait until they are gone."""
    deadline = wall_seconds() + REAP_TIMEOUT_S
    while True:
        pids = [int(p) for p in ip("netns", "pids", namespace, check=False).stdout.split()]
        if not pids:
            return
        if wall_seconds() > deadline:
            raise RuntimeError(f"processes {pids} in namespace {namespace} survive SIGKILL")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _remove(namespaces: Sequence[str]) -> None:
    """Kill what runs in `namespaces`, delete them, and check they are gone."""
    errors = []
    for name in namespaces:
        try:
            _kill_inside(name)
        except RuntimeError as exc:
            errors.append(str(exc))
        ip("netns", "del", name, check=False)
    left = set(namespaces) & set(_our_namespaces())
    if left or errors:
        raise RuntimeError(f"cleanup incomplete: namespaces left {sorted(left)}; {errors}")


def remove_leftovers() -> list[str]:
    """Remove the namespaces of earlier runs whose process is gone; return their names."""
    stale = []
    for name in _our_namespaces():
        pid_text = name[len(PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            stale.append(name)
    if stale:
        _remove(stale)
    return stale


class Lan:
    """Hosts (network namespaces) on one virtual switch; see the module docstring."""

    def __init__(self, hosts: Sequence[str]):
        self.tag = f"{PREFIX}{os.getpid()}-{next(_lan_numbers)}-"
        self.switch = self.tag + "switch"
        self.addresses = {host: f"{SUBNET}.{i}" for i, host in enumerate(hosts, start=1)}
        self.namespaces = [self.switch] + [self.tag + host for host in hosts]

    def namespace(self, host: str) -> str:
        return self.tag + host

    def build(self) -> None:
        """Create the namespaces, the bridge and one veth link per host."""
        for name in self.namespaces:
            ip("netns", "add", name)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for host, address in self.addresses.items():
            ns, port = self.namespace(host), f"p-{host}"
            ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "tf0", "netns", ns)
            ip("-n", self.switch, "link", "set", port, "master", "br0")
            ip("-n", self.switch, "link", "set", port, "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "tf0")
            ip("-n", ns, "link", "set", "tf0", "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def close(self) -> None:
        """Kill every process left in the namespaces, then delete them (and their veths)."""
        _remove(self.namespaces)

    def cut(self, host: str) -> None:
        """Pull `host`'s cable: its link goes down, its packets stop."""
        ip("-n", self.namespace(host), "link", "set", "tf0", "down")

    def mend(self, host: str) -> None:
        """Plug `host`'s cable back in."""
        ip("-n", self.namespace(host), "link", "set", "tf0", "up")

    def exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(host), *argv]


# setns(2)'s flag for a network namespace (linux/sched.h).
_CLONE_NEWNET = 0x40000000


@contextmanager
def entered(lan: Lan, host: str) -> Iterator[None]:
    """Run the block's thread in `host`'s network namespace (see the module docstring).

    Sockets opened in the block stay in that namespace after it; other
    threads are not moved (Trio's worker threads among them: the block
    must resolve no names, which numeric addresses never need).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{lan.namespace(host)}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns into {lan.namespace(host)}: {os.strerror(error)}")
        try:
            yield
        finally:
            if libc.setns(own, _CLONE_NEWNET) != 0:  # pragma: no cover - the kernel refusing our own namespace
                error = ctypes.get_errno()
                raise OSError(error, f"setns back: {os.strerror(error)}")
    finally:
        os.close(target)
        os.close(own)


@contextmanager
def virtual_lan(hosts: Sequence[str]) -> Iterator[Lan]:
    """A `Lan` of `hosts`, removed on exit whatever happened (leftovers of
    crashed earlier runs are removed first)."""
    remove_leftovers()
    lan = Lan(hosts)
    try:
        lan.build()
        yield lan
    finally:
        lan.close()


class HostProcess:
    """A process on one host of a `Lan`, whose output lines we can wait for.

    stdout and stderr are merged and read by a thread, so the child never
    blocks on a full pipe. `kill` ends its whole process group.
    """

    def __init__(self, lan: Lan, host: str, argv: Sequence[str], env: Mapping[str, str], cwd: str):
        self.host = host
        self.argv = list(argv)
        self.popen = subprocess.Popen(
            lan.exec_argv(host, argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def _take(self, timeout: float) -> str | None:
        """The next line (None at the end of output); raises queue.Empty after `timeout`."""
        line = self._queue.get(timeout=max(timeout, 0.0))
        if line is not None:
            self.lines.append(line)
        return line

    def wait_for_line(self, text: str, timeout: float = 20.0, after: int = 0) -> str:
        """The first line (from line number `after` on) containing `text`;
        fails after `timeout` s or if the process ends first."""
        for line in self.lines[after:]:
            if text in line:
                return line
        deadline = wall_seconds() + timeout
        while True:
            try:
                line = self._take(deadline - wall_seconds())
            except queue.Empty:
                raise AssertionError(
                    f"[{self.host}] no line with {text!r} within {timeout} s; output:\n{self.output()}"
                ) from None
            if line is None:
                raise AssertionError(
                    f"[{self.host}] exited ({self.popen.poll()}) before printing {text!r}; output:\n{self.output()}"
                )
            if text in line:
                return line

    def wait(self, timeout: float = 20.0) -> int:
        """The exit status, once the process has ended and its output is read (bounded)."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"[{self.host}] still running after {timeout} s; output:\n{self.output()}") from None
        self._reader.join(timeout=5)
        self._drain()
        return code

    def _drain(self) -> None:
        while True:
            try:
                self._take(0)
            except queue.Empty:
                return

    def output(self) -> str:
        self._drain()
        return "".join(self.lines)

    def kill(self) -> None:
        """SIGKILL the process group (SIGCONT first, should it be stopped) and reap it."""
        if self.popen.poll() is None:
            for signum in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.killpg(self.popen.pid, signum)
                except ProcessLookupError:
                    pass
        try:
            self.popen.wait(REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return  # Lan.close kills it by namespace, and says so if it cannot
        self._reader.join(timeout=5)
        if not self._reader.is_alive() and self.popen.stdout is not None:
            self.popen.stdout.close()
