"""A cluster across hosts: scheduler, workers and clients on different network namespaces.

Each test builds a LAN of four hosts (`trioflow/sim/netns.py`): network
namespaces joined by veth links to a bridge, with addresses in
10.213.0.0/24 that exist only inside them:

    s  10.213.0.1   the scheduler
    a  10.213.0.2   a worker
    b  10.213.0.3   a worker
    c  10.213.0.4   a client, or a stranger

Every process is a real ``python -m trioflow ...`` (or a client script)
started with ``ip netns exec``, as it would be on another machine: it sees
only its own host's interfaces, so a worker bound to 0.0.0.0 must find the
address it advertises, and every byte between them crosses a veth link,
which a test can cut. Tokens travel in ``TRIOFLOW_TOKEN`` in the child's
environment (never argv); HOME is a temporary directory, so no token file
of the real user is read or written.

Rules these tests keep: only addresses of namespaces they create; every
process is ended (process groups, then whatever is left in the
namespaces) and every namespace removed, pass or fail; every wait is
bounded. Needs root and iproute2 (CI runs as root); skipped otherwise.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trioflow.sim import netns
from trioflow.comm.auth import Credentials

pytestmark = pytest.mark.processes

HOSTS = ("s", "a", "b", "c")
SCHEDULER_PORT = 8786
# Short enough to keep the link-cut test quick, long enough for a busy
# two-core machine not to lose a worker that is merely slow.
WORKER_TTL_S = 2.0
# Clients give up on a connection after this (the default 10 s would only
# make a failing test slower).
CONNECT_TIMEOUT_S = 5.0
STARTUP_TIMEOUT_S = 20.0
# Time for a nanny to restart its worker (SIGTERM, a new process, registering).
RESTART_TIMEOUT_S = 6.0
CLIENT_TIMEOUT_S = 40.0

# The client, run on a host as a script: functions defined in its
# __main__ travel to the workers by value. It prints "progress N" as
# results arrive, then one "result {...}" or "error {...}" line (JSON). The
# plan comes as argv[1]; the token, if any, only through the environment.
CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import trioflow

    def slow_square(x, delay):
        time.sleep(delay)
        return x * x

    def touch(path):
        open(path, "w").close()
        return "ran"

    def report(kind, **fields):
        print(kind, json.dumps(fields), flush=True)

    plan = json.loads(sys.argv[1])
    try:
        with trioflow.Client(plan["address"]) as client:
            workers = sorted(client.nthreads())
            if plan["mode"] == "map":
                futures = client.map(slow_square, range(plan["n"]), delay=plan["delay"])
                for done, _ in enumerate(trioflow.as_completed(futures), start=1):
                    print("progress", done, flush=True)
                results = client.gather(futures)
                ran_on = sorted({a for f in futures for a in client.who_has([f])[f.key]})
                # A sum over every result: the workers fetch from each other.
                total = client.submit(sum, futures).result(timeout=30)
                report("result", results=results, total=total, ran_on=ran_on, workers=workers)
            elif plan["mode"] == "restart":
                client.restart(timeout=plan["timeout"])
                value = client.submit(touch, plan["marker"]).result(timeout=30)
                report("result", value=value, workers=sorted(client.nthreads()))
            else:
                value = client.submit(touch, plan["marker"]).result(timeout=30)
                report("result", value=value, workers=workers)
    except Exception as exc:
        report("error", type=type(exc).__name__, message=str(exc))
        sys.exit(1)
    """
)


@functools.cache
def _why_no_namespaces() -> str | None:
    return netns.unavailable()


@pytest.fixture
def lan():
    """The four hosts; removed at the end, whatever happened."""
    reason = _why_no_namespaces()
    if reason is not None:
        pytest.skip(reason)
    with netns.virtual_lan(HOSTS) as lan:
        yield lan


@pytest.fixture
def home(tmp_path) -> Path:
    """HOME of every child: empty, so no token file is found or written elsewhere."""
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def client_script(tmp_path) -> Path:
    path = tmp_path / "client.py"
    path.write_text(CLIENT_SCRIPT)
    return path


@pytest.fixture
def start(lan, home):
    """Start a process on a host; every one is killed at teardown (before the LAN goes)."""
    started: list[netns.HostProcess] = []

    def start(host: str, *argv: str, token: str | None = None, tls: dict[str, str] | None = None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOFLOW_")}
        env.update(HOME=str(home), PYTHONUNBUFFERED="1", TRIOFLOW_CONNECT_TIMEOUT=str(CONNECT_TIMEOUT_S))
        if token is not None:
            env["TRIOFLOW_TOKEN"] = token
        for name, path in (tls or {}).items():
            env[f"TRIOFLOW_TLS_{name.upper()}_FILE"] = path
        proc = netns.HostProcess(lan, host, [sys.executable, *argv], env, cwd=str(home))
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.kill()


# ---------------------------------------------------------------- helpers --


def make_certificates(lan: netns.Lan, directory: Path) -> dict[str, dict[str, str]]:
    """`trioflow tls-certs` for the LAN's addresses; the TLS files of each role."""
    pytest.importorskip("cryptography", reason="TLS certificates need cryptography: pip install -e .[test]")
    hosts = [arg for address in lan.addresses.values() for arg in ("--host", address)]
    done = subprocess.run(
        [sys.executable, "-m", "trioflow", "tls-certs", str(directory), *hosts],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return {
        role: {"ca": str(directory / "ca.pem"), "cert": str(directory / f"{role}.pem"),
               "key": str(directory / f"{role}-key.pem")}
        for role in ("scheduler", "worker", "client")
    }


def tls_flags(files: dict[str, str] | None) -> list[str]:
    if files is None:
        return []
    return ["--tls-ca-file", files["ca"], "--tls-cert-file", files["cert"], "--tls-key-file", files["key"]]


def start_scheduler(start, lan, token: str, tls: dict[str, str] | None = None, *flags: str):
    """A scheduler on host s; returns it and the address it listens at."""
    scheme = "tls" if tls else "tcp"
    address = f"{scheme}://{lan.addresses['s']}:{SCHEDULER_PORT}"
    scheduler = start(
        "s", "-m", "trioflow", "scheduler", "--host", lan.addresses["s"], "--port", str(SCHEDULER_PORT),
        *tls_flags(tls), *flags, token=token,
    )
    scheduler.wait_for_line(f"listening at {address}", timeout=STARTUP_TIMEOUT_S)
    return scheduler, address


def worker_argv(scheduler_address: str, tls: dict[str, str] | None = None) -> list[str]:
    # Bound to every interface, as on a real machine: the worker must find
    # the address by which the scheduler's host reaches it.
    return ["-m", "trioflow", "worker", scheduler_address, "--host", "0.0.0.0", "--no-nanny", *tls_flags(tls)]


def start_workers(start, lan, scheduler, scheduler_address, token, hosts, tls=None) -> dict[str, str]:
    """Workers on `hosts`, registered with the scheduler; their advertised addresses by host."""
    addresses = {}
    for host in hosts:
        worker = start(host, *worker_argv(scheduler_address, tls), token=token)
        line = worker.wait_for_line(" ready: ", timeout=STARTUP_TIMEOUT_S)
        addresses[host] = re.search(r"trioflow worker (\S+) ready", line).group(1)
    for address in addresses.values():
        scheduler.wait_for_line(f"worker {address} joined", timeout=STARTUP_TIMEOUT_S)
    return addresses


def run_client(start, script: Path, host: str, plan: dict, token: str | None, tls=None):
    """The client script on `host`, following `plan` (see CLIENT_SCRIPT)."""
    return start(host, str(script), json.dumps(plan), token=token, tls=tls)


def client_outcome(client: netns.HostProcess, timeout: float = CLIENT_TIMEOUT_S) -> tuple[str, dict]:
    """("result" or "error", its fields), once the client has said it and exited."""
    line = _last_word(client, timeout)
    client.wait(timeout=10)
    kind, _, fields = line.partition(" ")
    return kind, json.loads(fields)


def _last_word(client: netns.HostProcess, timeout: float) -> str:
    """The client's "result ..." or "error ..." line (fails after `timeout` s)."""
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        for line in client.lines[seen:]:
            if line.startswith(("result ", "error ")):
                return line
        seen = len(client.lines)
        client.wait_for_line("", timeout=max(deadline - time.monotonic(), 0.1), after=seen)


def wait_for_count(proc: netns.HostProcess, text: str, count: int, timeout: float) -> None:
    """Until `count` lines of `proc` contain `text` (fails after `timeout` s)."""
    deadline = time.monotonic() + timeout
    while sum(text in line for line in proc.lines) < count:
        proc.wait_for_line(text, timeout=max(deadline - time.monotonic(), 0.1), after=len(proc.lines))


# ------------------------------------------------------------------ tests --


def test_work_completes_across_hosts_with_tokens_and_tls(start, lan, client_script, tmp_path):
    """Four hosts compute a map and a cross-worker sum over mutual TLS with tokens; plain TCP gets nothing."""
    certs = make_certificates(lan, tmp_path / "certs")
    cluster = Credentials.generate()
    scheduler, address = start_scheduler(start, lan, cluster.cluster_token(), certs["scheduler"])
    workers = start_workers(start, lan, scheduler, address, cluster.cluster_token(), "ab", certs["worker"])
    # Bound to 0.0.0.0, each advertises its own host's address, over TLS.
    for host, worker_address in workers.items():
        assert worker_address.startswith(f"tls://{lan.addresses[host]}:"), worker_address

    n = 40
    plan = {"address": address, "mode": "map", "n": n, "delay": 0.02}
    client = run_client(start, client_script, "c", plan, cluster.client_token(), certs["client"])
    kind, out = client_outcome(client)

    assert kind == "result", out
    assert out["results"] == [x * x for x in range(n)]
    assert out["total"] == sum(x * x for x in range(n))
    assert out["workers"] == sorted(workers.values())
    assert out["ran_on"] == sorted(workers.values())  # both hosts computed

    # The right token over plain TCP gets nothing: the port speaks only TLS.
    plain = {**plan, "address": address.replace("tls://", "tcp://")}
    kind, out = client_outcome(run_client(start, client_script, "c", plain, cluster.client_token()))
    assert (kind, out["type"]) == ("error", "CommClosedError"), out
    assert "scheme (tcp:// or tls://)" in out["message"]
    scheduler.wait_for_line("TLS handshake failed", timeout=10)


def test_a_link_cut_longer_than_worker_ttl_in_a_map_loses_no_result(start, lan, client_script):
    """A worker's link cut for worker_ttl + 1 s mid-map: declared dead, it comes back, and no result is lost."""
    cluster = Credentials.generate()
    scheduler, address = start_scheduler(
        start, lan, cluster.cluster_token(), None, "--worker-ttl", str(WORKER_TTL_S)
    )
    workers = start_workers(start, lan, scheduler, address, cluster.cluster_token(), "ab")

    # 80 tasks of 0.1 s on two one-thread workers: about 4 s of work, most
    # of it still to do when the cut begins and some when it ends.
    n = 80
    plan = {"address": address, "mode": "map", "n": n, "delay": 0.1}
    client = run_client(start, client_script, "c", plan, cluster.client_token())
    client.wait_for_line("progress 10", timeout=CLIENT_TIMEOUT_S)

    cut_at = time.monotonic()
    lan.cut("a")
    scheduler.wait_for_line(f"worker {workers['a']} left", timeout=WORKER_TTL_S + 10)
    left_at_line = len(scheduler.lines)
    # The cut lasts worker_ttl + 1 s (a fault's length, not a wait for anything).
    time.sleep(max(0.0, cut_at + WORKER_TTL_S + 1.0 - time.monotonic()))
    assert "\nresult " not in "\n" + client.output(), "the map ended during the cut: cut earlier"
    lan.mend("a")

    kind, out = client_outcome(client)
    assert kind == "result", out
    assert out["results"] == [x * x for x in range(n)]
    assert out["total"] == sum(x * x for x in range(n))
    # The worker on the mended link registers again.
    scheduler.wait_for_line(f"worker {workers['a']} joined", timeout=STARTUP_TIMEOUT_S, after=left_at_line)


def test_a_process_without_the_token_gets_nothing_run(start, lan, client_script, tmp_path, home):
    """Strangers on another host (no token, a wrong one, a worker with a client's) get nothing run."""
    cluster, other = Credentials.generate(), Credentials.generate()
    scheduler, address = start_scheduler(start, lan, cluster.cluster_token())
    workers = start_workers(start, lan, scheduler, address, cluster.cluster_token(), "a")
    marker = tmp_path / "stranger-ran"
    plan = {"address": address, "mode": "touch", "marker": str(marker)}

    # No TRIOFLOW_TOKEN, and no token file under HOME (none was ever written there).
    assert not (home / ".config").exists()
    kind, out = client_outcome(run_client(start, client_script, "c", plan, None))
    assert (kind, out["type"]) == ("error", "AuthenticationError"), out
    assert "needs a token" in out["message"]

    # Another cluster's client token: the scheduler cannot prove ours, and says where.
    kind, out = client_outcome(run_client(start, client_script, "c", plan, other.client_token()))
    assert (kind, out["type"]) == ("error", "AuthenticationError"), out
    assert address in out["message"]

    # A worker holding only a client token refuses to start.
    worker = start("c", *worker_argv(address), token=cluster.client_token())
    assert worker.wait() == 1
    assert "needs the cluster token" in worker.output()

    # A worker holding another cluster's token reaches the scheduler, is
    # refused there, and stops. The scheduler logs each refusal: the wrong
    # client's connection, and this one.
    worker = start("c", *worker_argv(address), token=other.cluster_token())
    assert worker.wait() == 1
    assert "does not hold our cluster credential" in worker.output()
    wait_for_count(scheduler, "refused a connection that did not authenticate", 2, timeout=10)

    # The rightful client, from the same host: one worker only, and it runs
    # what it is given; the stranger's function never ran.
    proof = tmp_path / "client-ran"
    kind, out = client_outcome(
        run_client(start, client_script, "c", {**plan, "marker": str(proof)}, cluster.client_token())
    )
    assert kind == "result", out
    assert out == {"value": "ran", "workers": [workers["a"]]}
    assert proof.exists()
    assert not marker.exists()


@pytest.mark.parametrize(
    "bind",
    ["own-address", "0.0.0.0"],
)
def test_a_worker_under_a_nanny_on_another_host_restarts(start, lan, client_script, tmp_path, bind):
    """Client.restart() restarts a worker whose nanny runs on another host, bound to its address or 0.0.0.0."""
    cluster = Credentials.generate()
    scheduler, address = start_scheduler(start, lan, cluster.cluster_token())
    host = lan.addresses["a"] if bind == "own-address" else bind
    nanny = start("a", "-m", "trioflow", "worker", address, "--host", host, token=cluster.cluster_token())
    nanny.wait_for_line(" ready: ", timeout=STARTUP_TIMEOUT_S)
    proof = tmp_path / "ran-after-restart"
    plan = {"address": address, "mode": "restart", "timeout": RESTART_TIMEOUT_S, "marker": str(proof)}

    kind, out = client_outcome(run_client(start, client_script, "c", plan, cluster.client_token()))

    assert kind == "result", out
    assert proof.exists()
    wait_for_count(nanny, "started worker pid", 2, timeout=10)  # a new worker process
