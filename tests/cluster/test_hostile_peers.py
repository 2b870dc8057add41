"""Hostile peers: what a stranger on a trioflow port must not be able to do.

Regression tests for the security findings against design.md §6 ("Trust:
what a peer may do"). Each test names its finding ("Finding N:") and says,
in its docstring or a comment, how it fails on the code it was written
against (commit 42cb943); every one of them fails there, and each is
written to pass once the behaviour it describes is implemented.

The attacker side speaks the wire format by hand (`raw_peer.py`), never
through `trioflow.comm`, so these tests keep their meaning when the comm
layer is rewritten. Well-behaved parties (the clients and workers that must
not be hurt) are real trioflow objects or `trioflow` subprocesses.

Rules these tests keep: loopback only; every wait is bounded; every process
is ended (the `spawn` fixture kills process groups; in-process servers live
in a nursery); assertions are on behaviour, and on words only where the
finding names them (case-insensitive regexes).
"""

from __future__ import annotations

import math
import re
import threading
import time
from contextlib import AsyncExitStack, asynccontextmanager, suppress

import cloudpickle
import psutil
import pytest
import trio

import trioflow
from tests.cluster import raw_peer as rp
from tests.cluster.conftest import free_port
from tests.conftest import wait_until

GIB = 1 << 30
MB = 1 << 20
TEN_MB = 10 * MB
# Memory a server may grow by while under attack (design.md §6.3).
RSS_GROWTH_LIMIT = 100 * MB
# Longest log line a server may print, whatever a peer sends (finding 4).
MAX_LOG_LINE_CHARS = 2_000
# Config of the well-behaved clients: short enough that a dead scheduler
# shows up quickly, long enough for a loaded test machine.
CLIENT_CONFIG = trioflow.Config(connect_timeout=5.0)
# Environment of `trioflow` subprocesses: the hello must come within 5 s.
SERVER_ENV = {"TRIOFLOW_CONNECT_TIMEOUT": "5"}


def inc(x):
    return x + 1


def slow_identity(x, seconds):
    time.sleep(seconds)
    return x


def evil(x):
    return 666


def function_of(fn) -> tuple[str, rp.Pickled]:
    """The id and pickled bytes a real client sends for `fn`.

    The one thing taken from trioflow's comm layer on the attacker side:
    how a function id is derived may change with the fix for finding 7 (an
    id the scheduler can check against the bytes), and a raw client that
    plays by the rules must then still send valid ids.
    """
    from trioflow.comm.serialize import dumps_function

    function = dumps_function(fn)
    return function.function_id, rp.Pickled([bytes(function.payload.header)])


# ------------------------------------------------------------- helpers --


class SubprocessCluster:
    """`trioflow scheduler` and `trioflow worker --no-nanny` subprocesses."""

    def __init__(self, address, scheduler, workers, worker_addresses):
        self.address = address
        self.scheduler = scheduler
        self.workers = workers
        self.worker_addresses = worker_addresses

    def scheduler_output(self) -> str:
        """Everything the scheduler printed; ends the scheduler first (the
        only way to read its output to the end)."""
        self.scheduler.kill()
        return self.scheduler.output()


async def wait_for_line(proc, text, timeout=30.0) -> str:
    # In a thread: the Trio loop of the test keeps running meanwhile.
    return await trio.to_thread.run_sync(proc.wait_for_line, text, timeout)


async def start_cluster(spawn, n_workers=1, env=None) -> SubprocessCluster:
    """A scheduler and `n_workers` one-thread workers, as subprocesses."""
    env = {**SERVER_ENV, **(env or {})}
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = spawn("scheduler", "--port", port, env=env)
    workers = [spawn("worker", address, "--no-nanny", env=env) for _ in range(n_workers)]
    await wait_for_line(scheduler, f"listening at {address}")
    worker_addresses = []
    for worker in workers:
        line = await wait_for_line(worker, " ready: ")
        worker_addresses.append(re.search(r"trioflow worker (tcp://\S+) ready", line).group(1))
    return SubprocessCluster(address, scheduler, workers, worker_addresses)


def _run_in_a_fresh_loop(async_fn, *args) -> dict:
    """``trio.run(async_fn, *args)``; returns {"value": ...} or {"error": ...}."""
    outcome: dict = {}

    async def main():
        try:
            outcome["value"] = await async_fn(*args)
        except BaseException as exc:  # reported to the caller, whatever it is
            outcome["error"] = exc

    try:
        trio.run(main)
    except BaseException as exc:
        outcome.setdefault("error", exc)
    return outcome


async def in_a_fresh_loop(async_fn, *args) -> dict:
    """Run `async_fn` in a Trio loop of its own, in a thread.

    For an `AsyncClient` that may fail to connect: today its `__aenter__`
    leaves its nursery open when the first connection fails, which corrupts
    the Trio loop it runs in ("Nursery stack corrupted"); kept apart, that
    cannot break the test's own loop (nor the in-process servers on it).
    Returns {"value": ...} or {"error": ...}.
    """
    return await trio.to_thread.run_sync(_run_in_a_fresh_loop, async_fn, *args)


async def _round_trip(address, timeout):
    with trio.fail_after(timeout):
        async with trioflow.AsyncClient(address, config=CLIENT_CONFIG) as client:
            return await client.submit(inc, 41, pure=False)


async def assert_serving(address, timeout=20.0, after="the attack"):
    """A well-behaved client connects and gets a task's result back."""
    try:
        # First by hand, which says plainly when nobody answers any more.
        async with rp.connect(address) as probe:
            await probe.hello_client("probe")
    except (OSError, rp.PeerClosed, trio.TooSlowError, AssertionError) as exc:
        raise AssertionError(f"after {after}, the scheduler at {address} does not welcome a client: {exc!r}") from None
    outcome = await in_a_fresh_loop(_round_trip, address, timeout)
    if outcome.get("value") != 42:
        problem = error_text(outcome["error"]) if "error" in outcome else f"result {outcome['value']!r}"
        raise AssertionError(f"after {after}, the scheduler at {address} no longer serves a client: {problem}")


def worker_departures(output: str) -> list[str]:
    """The scheduler's 'worker ... left: <reason>' warnings (a worker declared gone)."""
    return [line[:300] for line in output.splitlines() if re.search(r"worker \S+ left:", line)]


def error_text(exc: BaseException) -> str:
    """The messages of `exc` and of everything inside it (groups, causes)."""
    parts = [f"{type(exc).__name__}: {exc}"]
    if isinstance(exc, BaseExceptionGroup):
        parts.extend(error_text(e) for e in exc.exceptions)
    if exc.__cause__ is not None:
        parts.append(error_text(exc.__cause__))
    elif exc.__context__ is not None and not exc.__suppress_context__:
        parts.append(error_text(exc.__context__))
    return " | ".join(parts)


def _vm_hwm(pid: int) -> int | None:
    """Peak resident memory of `pid` in bytes (Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakRSS:
    """The most a process's resident memory grew while a block ran.

    Sampled with psutil every 10 ms, and also read from the kernel's own
    high-water mark (VmHWM) where there is one, so a short spike between
    samples still counts: memory a decoder allocates and frees again within
    a second is memory an attacker can make it allocate.
    """

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.baseline = 0
        self.peak = 0

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def _sample(self) -> None:
        try:
            self.peak = max(self.peak, self.process.memory_info().rss)
        except psutil.Error:
            pass  # the process ended: nothing more to measure

    @asynccontextmanager
    async def watch(self):
        self.baseline = self.peak = self.process.memory_info().rss
        hwm_before = _vm_hwm(self.process.pid)

        async def sample_forever():
            while True:
                self._sample()
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_forever)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()
        self._sample()
        hwm_after = _vm_hwm(self.process.pid)
        if hwm_before is not None and hwm_after is not None and hwm_after > hwm_before:
            # The high-water mark moved during the block: that peak is ours.
            self.peak = max(self.peak, hwm_after)


async def refused(peer: rp.RawPeer, caplog, pattern: str, timeout: float = 5.0) -> str | None:
    """Wait for the server to refuse what `peer` just sent.

    Refused means: within `timeout`, a message back to `peer` whose text
    matches `pattern`, or the connection closed with a logged reason that
    matches it. Returns None if so, else what happened instead.
    """
    regex = re.compile(pattern, re.IGNORECASE)
    with trio.move_on_after(timeout):
        try:
            while True:
                message = await peer.next_message(timeout=math.inf)
                if message.get("op") == "key_finished":
                    return f"the server accepted it and computed it: {message!r:.200}"
                if regex.search(repr(message)):
                    return None
        except rp.PeerClosed:
            logged = [r.getMessage() for r in caplog.records]
            if any(regex.search(m) for m in logged):
                return None
            return f"the connection was closed, but no logged reason matches {pattern!r}: {[m[:200] for m in logged]}"
    return f"no refusal within {timeout:g} s: accepted silently (received {[m.get('op') for m in peer.received]})"


async def join_thread(thread: threading.Thread, timeout: float) -> bool:
    """Wait (without blocking the Trio loop) for `thread` to end; True if it did."""
    with trio.move_on_after(timeout):
        while thread.is_alive():
            await trio.sleep(0.02)
    return not thread.is_alive()


# ------------------------------------------------------- the attacker works --


async def test_raw_peer_speaks_the_protocol(cluster):
    """The hand-written attacker is right: a raw client hello gets a welcome,
    a raw submit computes, a raw request gets its reply, and a raw peer
    fetches from a worker. (Passes today: it checks the test helper.)"""
    async with rp.connect(cluster.scheduler_address) as peer:
        welcome = await peer.hello_client("sanity")
        assert welcome["address"] == cluster.scheduler_address
        function_id, payload = function_of(inc)
        await peer.send(rp.submit_message([rp.task_message("sanity-1", function_id, (1,))], {function_id: payload}))
        finished = await peer.next_message()
        assert finished["op"] == "key_finished" and finished["key"] == "sanity-1"
        assert finished["value"].load() == 2
        [holder] = finished["who_has"]
        answer = await peer.request({"op": "who_has", "keys": ["sanity-1"]}, request_id=7)
        assert answer["who_has"] == {"sanity-1": [holder]}
        # (While this client holds the key: on its departure the value goes.)
        async with rp.connect(holder) as fetcher:
            await fetcher.say_hello("peer")
            answer = await fetcher.request({"op": "get_data", "keys": ["sanity-1", "nope"]}, request_id=1)
            assert answer["data"]["sanity-1"].load() == 2
            assert answer["missing"] == ["nope"]


@pytest.mark.processes
async def test_subprocess_helpers_measure_what_they_claim(spawn):
    """The subprocess cluster serves a client, PeakRSS sees a real allocation
    (300 MB, made and freed by `client.run`), and the scheduler's output can
    be read. (Passes today: it checks the test helpers.)"""
    cluster = await start_cluster(spawn, n_workers=1)
    await assert_serving(cluster.address, after="nothing")
    [worker] = cluster.workers
    rss = PeakRSS(worker.pid)
    async with trioflow.AsyncClient(cluster.address, config=CLIENT_CONFIG) as client:
        async with rss.watch():
            await client.run(lambda: len(bytearray(300 * MB)))
    assert rss.growth > 200 * MB
    assert "listening at" in cluster.scheduler_output()


# ----------------------------------------------------- finding 1: headers --


@pytest.mark.processes
async def test_huge_frame_headers_cost_the_scheduler_nothing(spawn):
    """Finding 1: four connections announcing 1 GiB frames (two before a
    hello, two after) grow the scheduler by < 100 MB and hurt nobody.

    Today: each header makes the scheduler allocate (and zero) 1 GiB before
    any body byte arrives: RSS grows by 3-4 GiB, and the loop stalls long
    enough for the workers to be dropped ("worker ... left: ...").
    """
    cluster = await start_cluster(spawn, n_workers=2)
    problems = []
    rss = PeakRSS(cluster.scheduler.pid)
    async with trioflow.AsyncClient(cluster.address, config=CLIENT_CONFIG) as client:
        assert await client.submit(inc, 0) == 1
        async with AsyncExitStack() as attackers, rss.watch():
            for _ in range(2):
                peer = await attackers.enter_async_context(rp.connect(cluster.address))
                with suppress(rp.PeerClosed):  # refused at once: fine
                    await peer.send_bytes(rp.batch_header([GIB]))
            for i in range(2):
                peer = await attackers.enter_async_context(rp.connect(cluster.address))
                # The hello, then at once the next batch (not waiting for the
                # welcome, which a scheduler busy allocating sends late).
                await peer.say_hello("client", client_id=f"announcer-{i}")
                # A small body that refers to one buffer frame, which never comes.
                [body, _] = rp.pack_messages(
                    [{"op": "scatter", "request_id": 1, "data": {"big": rp.Pickled([b""])}, "broadcast": False}]
                )
                with suppress(rp.PeerClosed):
                    await peer.send_bytes(rp.batch_header([len(body), GIB]) + body)
            # Meanwhile the cluster serves its client as usual.
            with trio.fail_after(20):
                futures = client.map(inc, range(20), pure=False)
                assert await client.gather(futures) == list(range(1, 21))
            # Give a receiver that allocates ahead of the bytes time to do it.
            with trio.move_on_after(2.0):
                while rss.growth < RSS_GROWTH_LIMIT:
                    await trio.sleep(0.05)
        if rss.growth >= RSS_GROWTH_LIMIT:
            problems.append(f"the scheduler's RSS grew by {rss.growth / MB:.0f} MB (limit 100 MB)")
        with trio.fail_after(10):
            info = await client.scheduler_info()
        if sorted(info["workers"]) != sorted(cluster.worker_addresses):
            problems.append(f"workers listed: {sorted(info['workers'])}, expected {cluster.worker_addresses}")
    await assert_serving(cluster.address)
    departures = worker_departures(cluster.scheduler_output())
    if departures:
        problems.append(f"workers were declared gone: {departures}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------ finding 2: decoding bomb --


def bomb_batch() -> bytes:
    """~12 MB of msgpack that decodes to 12 million empty arrays."""
    return rp.frame_batch([rp.msgpack_bomb(12, 1_000_000)])


@pytest.mark.processes
async def test_a_decoding_bomb_costs_the_scheduler_little_and_stalls_nobody(spawn):
    """Finding 2: a 12 MB batch that decodes to 12 million arrays costs the
    scheduler < 100 MB, closes that connection, and another client's round
    trips during the attack each take < 1.5 s.

    Today: it is decoded in full on the event loop (~860 MB, a stall of
    several seconds; round trips take as long), then the connection closes.
    """
    cluster = await start_cluster(spawn, n_workers=1)
    bomb = bomb_batch()
    problems = []
    latencies: list[float] = []
    rss = PeakRSS(cluster.scheduler.pid)
    async with trioflow.AsyncClient(cluster.address, config=CLIENT_CONFIG) as client:
        assert await client.submit(inc, 0) == 1
        async with rp.connect(cluster.address) as attacker, rss.watch():
            await attacker.hello_client("bomber")
            sent, attack_over = trio.Event(), trio.Event()
            closed = False

            async def attack():
                nonlocal closed
                try:
                    await attacker.send_bytes(bomb)
                except rp.PeerClosed:
                    closed = True  # refused before it was all sent: fine
                sent.set()
                closed = closed or await attacker.wait_closed(timeout=20)
                attack_over.set()

            async def round_trips():
                # Back to back, from when the bomb is on the wire until a
                # second after the attack is over, so one of them overlaps
                # any stall the bomb causes.
                await sent.wait()
                over_since = None
                i = 0
                with trio.move_on_after(40):
                    while over_since is None or trio.current_time() - over_since < 1.0:
                        start = trio.current_time()
                        with trio.move_on_after(15):
                            assert await client.submit(inc, i, pure=False) == i + 1
                        latencies.append(trio.current_time() - start)
                        i += 1
                        if over_since is None and attack_over.is_set():
                            over_since = trio.current_time()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attack)
                nursery.start_soon(round_trips)
        slowest = max(latencies, default=math.inf)
        if slowest >= 1.5:
            problems.append(f"a round trip during the attack took {slowest:.1f} s (limit 1.5 s)")
        if rss.growth >= RSS_GROWTH_LIMIT:
            problems.append(f"the scheduler's RSS grew by {rss.growth / MB:.0f} MB (limit 100 MB)")
        if not closed:
            problems.append("the scheduler did not close the bomber's connection within 20 s")
    await assert_serving(cluster.address)
    assert not problems, "\n".join(problems)


@pytest.mark.processes
async def test_decoding_bombs_at_a_worker_do_not_cost_its_running_task(spawn):
    """Finding 2: three bombs sent to a worker's peer port while it runs a
    3 s task: the task still completes with its value, the worker is never
    declared gone, and (as for the scheduler) it grows by < 100 MB.

    Today: the worker decodes them in full on its loop (~860 MB, ~3.5 s
    each, back to back), misses its heartbeats, and the scheduler declares
    it dead while the task runs ("worker ... left: no message for 3 s").
    """
    cluster = await start_cluster(spawn, n_workers=1)
    [worker_address] = cluster.worker_addresses
    [worker] = cluster.workers
    bomb = bomb_batch()
    problems = []
    rss = PeakRSS(worker.pid)
    async with trioflow.AsyncClient(cluster.address, config=CLIENT_CONFIG) as client:
        future = client.submit(slow_identity, 42, 3.0, pure=False)
        with trio.fail_after(10):
            while (await client.scheduler_info())["workers"][worker_address]["processing"] < 1:
                await trio.sleep(0.05)
        await trio.sleep(0.3)  # running by now

        async def bomb_the_worker():
            async with rp.connect(worker_address) as attacker:
                await attacker.say_hello("peer")
                try:
                    await attacker.send_bytes(bomb)
                except rp.PeerClosed:
                    return
                await attacker.wait_closed(timeout=15)

        async with rss.watch(), trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(bomb_the_worker)
        if rss.growth >= RSS_GROWTH_LIMIT:
            problems.append(f"the worker's RSS grew by {rss.growth / MB:.0f} MB (limit 100 MB)")
        try:
            with trio.fail_after(15):
                value = await future
            if value != 42:
                problems.append(f"the task's value is {value!r}, not 42")
        except Exception as exc:
            problems.append(f"the task did not complete with its value: {error_text(exc)}")
        with trio.fail_after(10):
            info = await client.scheduler_info()
        if worker_address not in info["workers"]:
            problems.append(f"the worker is no longer registered: {sorted(info['workers'])}")
    await assert_serving(cluster.address)
    departures = worker_departures(cluster.scheduler_output())
    if departures:
        problems.append(f"the worker was declared gone: {departures}")
    assert not problems, "\n".join(problems)


# ----------------------------------- finding 3: messages that end the scheduler --


@pytest.mark.processes
@pytest.mark.parametrize("timeout", [-1, math.nan], ids=["negative", "nan"])
async def test_a_restart_with_a_bad_timeout_gets_an_error_reply(spawn, timeout):
    """Finding 3a: `restart` with timeout -1 or NaN gets an error reply naming
    "timeout", and the scheduler lives on and serves a client.

    Today: the timeout reaches `trio.move_on_after`, whose ValueError
    ("`seconds` must be non-negative" / "must not be NaN") escapes a task of
    the scheduler's nursery: the process exits with status 1 ("scheduler
    failed: Exceptions from Trio nursery"), the raw client's connection
    closes without a reply, and no client is served any more.
    """
    cluster = await start_cluster(spawn, n_workers=1)
    problems = []
    async with rp.connect(cluster.address) as peer:
        await peer.hello_client("restarter")
        try:
            answer = await peer.request({"op": "restart", "timeout": timeout}, request_id=1)
        except (rp.PeerClosed, trio.TooSlowError) as exc:
            problems.append(f"no reply to the restart: {exc!r}")
        else:
            error = answer.get("error")
            if not isinstance(error, str) or not re.search("timeout", error, re.IGNORECASE):
                problems.append(f"the reply is not an error naming 'timeout': {answer!r:.300}")
    try:
        await assert_serving(cluster.address)
    except AssertionError as exc:
        problems.append(str(exc))
    if cluster.scheduler.popen.poll() is not None:
        problems.append(f"the scheduler process ended (status {cluster.scheduler.popen.poll()})")
    assert not problems, "\n".join(problems)


@pytest.mark.processes
@pytest.mark.parametrize("bad_nbytes", ["map of str", "str"])
async def test_a_fake_worker_answering_put_data_badly_does_not_end_the_scheduler(spawn, bad_nbytes):
    """Finding 3b: a fake worker that answers `put_data` with nbytes of the
    wrong type ({key: "x"} or "x") does not end the scheduler, which then
    serves a client.

    Today: the scatter exchange calls int("x") (or "x".items()) in a task
    of the scheduler's nursery; the error ends the process (status 1).
    """
    cluster = await start_cluster(spawn, n_workers=1)
    async with rp.connect(cluster.address) as fake, trio.open_nursery() as nursery:
        await fake.hello_worker(f"tcp://127.0.0.1:{free_port()}")
        assert (await fake.next_message())["op"] == "welcome"
        nursery.start_soon(fake.heartbeats)
        async with trioflow.AsyncClient(cluster.address, config=CLIENT_CONFIG) as client:

            async def scatter():
                # Broadcast, so the fake worker is asked too. How this call
                # ends (values or an error) is not the point here.
                with trio.move_on_after(10):
                    try:
                        await client.scatter([1, 2, 3], broadcast=True)
                    except Exception:
                        pass

            async with trio.open_nursery() as scattering:
                scattering.start_soon(scatter)
                with trio.fail_after(10):
                    request = await fake.next_message(timeout=math.inf)
                    while request["op"] != "put_data":
                        request = await fake.next_message(timeout=math.inf)
                key = next(iter(request["data"]))
                nbytes = {key: "x"} if bad_nbytes == "map of str" else "x"
                try:
                    await fake.send({"op": "reply", "request_id": request["request_id"], "nbytes": nbytes})
                except rp.PeerClosed:
                    pass
        nursery.cancel_scope.cancel()
    await assert_serving(cluster.address, after="a bad put_data reply")
    assert cluster.scheduler.popen.poll() is None, "the scheduler process ended"


# ---------------------------------------------- finding 4: unclipped logging --


# Each attack tolerates a server that closes the connection before it has
# sent everything (rp.PeerClosed): refusing early is a fine answer.


async def _long_op_before_hello(address):
    async with rp.connect(address) as peer:
        with suppress(rp.PeerClosed):
            await peer.send({"op": "x" * TEN_MB})
            await peer.wait_closed(timeout=10)


async def _long_op_after_hello(address):
    async with rp.connect(address) as peer:
        await peer.hello_client("long-op")
        with suppress(rp.PeerClosed):
            await peer.send({"op": "x" * TEN_MB})
            await peer.wait_closed(timeout=10)


async def _long_function_id(address):
    async with rp.connect(address) as peer:
        await peer.hello_client("long-function-id")
        with suppress(rp.PeerClosed):
            await peer.send(rp.submit_message([rp.task_message("long-fid", "f" * TEN_MB, (1,))], {}))
            await peer.wait_closed(timeout=10)


async def _long_worker_address(address):
    async with rp.connect(address) as peer:
        with suppress(rp.PeerClosed):
            await peer.hello_worker("tcp://" + "a" * TEN_MB)
            await peer.wait_closed(timeout=0.5)


LONG_FIELDS = {
    "op before the hello": _long_op_before_hello,
    "op after a client hello": _long_op_after_hello,
    "function_id in a submit": _long_function_id,
    "address in a worker hello": _long_worker_address,
}


@pytest.mark.processes
@pytest.mark.parametrize("where", list(LONG_FIELDS))
async def test_a_10_mb_field_never_makes_a_10_mb_log_line(spawn, where):
    """Finding 4: a 10 MB op, function id or worker address yields no log
    line over 2,000 characters, and the scheduler still serves.

    Today: the value is logged whole (a line of ~10,000,000 characters).
    """
    cluster = await start_cluster(spawn, n_workers=1)
    with trio.fail_after(30):
        await LONG_FIELDS[where](cluster.address)
    await assert_serving(cluster.address, after=f"a 10 MB {where}")
    longest = max(len(line) for line in cluster.scheduler_output().splitlines())
    assert longest <= MAX_LOG_LINE_CHARS, f"the scheduler printed a line of {longest} characters"


# ------------------------------------------------ finding 5: bad values --


CYCLES = {
    "a task that depends on itself": [("loop-a", ["loop-a"])],
    "two tasks that depend on each other": [("loop-a", ["loop-b"]), ("loop-b", ["loop-a"])],
}


@pytest.mark.parametrize("shape", list(CYCLES))
async def test_a_dependency_cycle_is_refused(cluster, client, caplog, shape):
    """Finding 5: a submit whose tasks form a cycle is refused (a message
    naming it within 5 s, or the connection closed with a logged reason),
    and other clients are served.

    Today: the tasks are accepted and wait forever; nothing is said.
    """
    function_id, payload = function_of(inc)
    tasks = [rp.task_message(key, function_id, (1,), dependencies=deps) for key, deps in CYCLES[shape]]
    with caplog.at_level("WARNING", logger="trioflow"):
        async with rp.connect(cluster.scheduler_address) as peer:
            await peer.hello_client("cyclist")
            await peer.send(rp.submit_message(tasks, {function_id: payload}))
            problem = await refused(peer, caplog, r"cycle|itself|depend")
    assert await client.submit(inc, 1) == 2
    assert problem is None, f"{shape}: {problem}"


async def test_absurd_retries_are_refused(cluster, client, caplog):
    """Finding 5: a task with retries=2**63-1 is refused (a message naming
    "retries", or the connection closed with a logged reason naming it).

    Today: it is accepted and computed (key_finished comes back).
    """
    function_id, payload = function_of(inc)
    task = rp.task_message("absurd-r", function_id, (1,), retries=2**63 - 1)
    with caplog.at_level("WARNING", logger="trioflow"):
        async with rp.connect(cluster.scheduler_address) as peer:
            await peer.hello_client("retrier")
            await peer.send(rp.submit_message([task], {function_id: payload}))
            problem = await refused(peer, caplog, r"retries")
    assert await client.submit(inc, 1) == 2
    assert problem is None, problem


@pytest.mark.parametrize(
    "field, value", [("nthreads", 2**63 - 1), ("address", "garbage")], ids=["absurd nthreads", "garbage address"]
)
async def test_a_worker_hello_with_absurd_values_is_refused(cluster, client, field, value):
    """Finding 5: a worker hello with nthreads=2**63-1 or address "garbage"
    is refused (closed, or a refusal instead of a welcome), and that worker
    never appears in scheduler_info.

    Today: it gets a welcome and is listed among the workers.
    """
    hello = {"address": f"tcp://127.0.0.1:{free_port()}", "nthreads": 1}
    hello[field] = value
    problems = []
    async with rp.connect(cluster.scheduler_address) as peer:
        await peer.hello_worker(hello["address"], nthreads=hello["nthreads"])
        try:
            answer = await peer.next_message(timeout=5)
            if answer.get("op") == "welcome":
                problems.append(f"the hello was welcomed: {answer!r:.200}")
        except rp.PeerClosed:
            pass  # refused by closing: fine
        except trio.TooSlowError:
            problems.append("neither refused nor welcomed within 5 s")
        listed = (await client.scheduler_info())["workers"]
        if hello["address"] in listed:
            problems.append(f"the worker is listed by scheduler_info: {listed[hello['address']]}")
    assert await client.submit(inc, 1) == 2
    assert not problems, "\n".join(problems)


async def test_waiting_for_a_billion_workers_is_an_error(cluster, client):
    """Finding 5: wait_for_workers with n=10**9 gets an error reply naming
    "n" within 5 s.

    Today: the request is accepted and never answered (a 5 s timeout here).
    """
    async with rp.connect(cluster.scheduler_address) as peer:
        await peer.hello_client("impatient")
        try:
            answer = await peer.request({"op": "wait_for_workers", "n": 10**9}, request_id=1, timeout=5)
        except trio.TooSlowError:
            pytest.fail("no reply within 5 s to wait_for_workers(n=10**9)")
    assert re.search(r"\bn\b", str(answer.get("error", "")), re.IGNORECASE), f"not an error naming n: {answer!r:.300}"
    assert await client.submit(inc, 1) == 2


async def test_a_waiter_that_hangs_up_leaves_nothing_behind():
    """Finding 5: a raw client that asks wait_for_workers(n=3) of a 1-worker
    cluster and then closes leaves no task behind in the scheduler.

    Reads the scheduler's private `_nursery` (its tasks: driver, listener,
    exchanges): the only way to see a waiter that nobody will ever answer.
    Today: the waiter stays there for good (one task more than before).
    """
    config = trioflow.Config(recovery_grace=0.05)
    async with trioflow.AsyncLocalCluster(1, processes=False, config=config) as cluster:
        scheduler = cluster.scheduler
        # The recovery window's own task ends after recovery_grace: let it.
        await wait_until(lambda: not scheduler.state.in_recovery(), timeout=5, message="the recovery window to end")
        await trio.sleep(0.1)
        before = len(scheduler._nursery.child_tasks)
        async with rp.connect(cluster.scheduler_address) as peer:
            await peer.hello_client("waiter")
            await peer.send({"op": "wait_for_workers", "n": 3, "request_id": 1})
            # Let the request arrive (today: a waiter task appears).
            with trio.move_on_after(1):
                while len(scheduler._nursery.child_tasks) <= before:
                    await trio.sleep(0.01)
        with trio.move_on_after(5):
            while len(scheduler._nursery.child_tasks) > before:
                await trio.sleep(0.02)
        left = len(scheduler._nursery.child_tasks) - before
        assert left <= 0, f"{left} task(s) still wait for a client that has gone: {scheduler._nursery.child_tasks}"
        async with trioflow.AsyncClient(cluster) as client:
            assert await client.submit(inc, 1) == 2


# ------------------------------------- finding 6: idle and connection limits --
# Today all of these fail at `trioflow.Config(...)` with TypeError: the
# fields idle_timeout, handshake_timeout and max_connections do not exist
# (the one failure of this kind the findings allow).


@asynccontextmanager
async def running_scheduler(config):
    """An in-process `trioflow.Scheduler` (no workers) for this block."""
    scheduler = trioflow.Scheduler(config=config)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(scheduler.serve)
        try:
            yield address
        finally:
            nursery.cancel_scope.cancel()


async def test_a_silent_connection_is_closed_after_idle_timeout():
    """Finding 6: a connection silent after its client hello is closed
    within 5 s when idle_timeout=1.0."""
    async with running_scheduler(trioflow.Config(idle_timeout=1.0)) as address:
        async with rp.connect(address) as peer:
            await peer.hello_client("sleeper")
            assert await peer.wait_closed(timeout=5), "a silent connection was still open after 5 s"


async def test_a_trickling_batch_is_closed_after_idle_timeout():
    """Finding 6: a connection that trickles one byte of a batch every
    0.3 s after its hello is closed within 8 s when idle_timeout=1.0."""
    async with running_scheduler(trioflow.Config(idle_timeout=1.0)) as address:
        async with rp.connect(address) as peer, trio.open_nursery() as nursery:
            await peer.hello_client("trickler")

            async def trickle():
                for byte in rp.batch_header([1000]) + b"\x91" + b"\x00" * 999:
                    try:
                        await peer.send_bytes(bytes([byte]))
                    except rp.PeerClosed:
                        return
                    await trio.sleep(0.3)

            nursery.start_soon(trickle)
            closed = await peer.wait_closed(timeout=8)
            nursery.cancel_scope.cancel()
        assert closed, "a trickling connection was still open after 8 s"


async def test_a_trickling_hello_is_closed_after_handshake_timeout():
    """Finding 6: bytes of a hello trickled one every 0.3 s are cut off
    within 5 s when handshake_timeout=1.0 (connect_timeout being longer)."""
    config = trioflow.Config(handshake_timeout=1.0, connect_timeout=30.0)
    async with running_scheduler(config) as address:
        async with rp.connect(address) as peer, trio.open_nursery() as nursery:
            hello = rp.encode_batch({"op": "hello", "role": "client", "protocol": 1, "client_id": "slow"})

            async def trickle():
                for byte in hello * 10:
                    try:
                        await peer.send_bytes(bytes([byte]))
                    except rp.PeerClosed:
                        return
                    await trio.sleep(0.3)

            nursery.start_soon(trickle)
            closed = await peer.wait_closed(timeout=5)
            nursery.cancel_scope.cancel()
        assert closed, "a trickled hello was still open after 5 s"


async def test_an_idle_real_client_is_kept_alive():
    """Finding 6: a real AsyncClient idle for 3 s (longer than idle_timeout=1.0)
    still works: its own heartbeats keep the connection."""
    config = trioflow.Config(idle_timeout=1.0)
    async with trioflow.AsyncLocalCluster(1, processes=False, config=config) as cluster:
        async with trioflow.AsyncClient(cluster, config=config) as client:
            assert await client.submit(inc, 1) == 2
            await trio.sleep(3)
            with trio.fail_after(10):
                assert await client.submit(inc, 2) == 3


async def test_connections_beyond_max_connections_are_closed():
    """Finding 6: of 20 raw connections (each sending a client hello), at
    most 8 stay open with max_connections=8; once they are gone a normal
    client connects and works."""
    config = trioflow.Config(max_connections=8)
    async with trioflow.AsyncLocalCluster(1, processes=False, config=config) as cluster:
        async with AsyncExitStack() as stack:
            peers = [await stack.enter_async_context(rp.connect(cluster.scheduler_address)) for _ in range(20)]
            for i, peer in enumerate(peers):
                try:
                    await peer.say_hello("client", client_id=f"crowd-{i}")
                except rp.PeerClosed:
                    pass
            closed = [False] * len(peers)

            async def watch(i):
                closed[i] = await peers[i].wait_closed(timeout=3)

            async with trio.open_nursery() as nursery:
                for i in range(len(peers)):
                    nursery.start_soon(watch, i)
            still_open = closed.count(False)
        assert still_open <= 8, f"{still_open} of 20 connections stayed open with max_connections=8"
        with trio.fail_after(15):
            async with trioflow.AsyncClient(cluster, config=config) as client:
                assert await client.submit(inc, 1) == 2


# ------------------------------------------ finding 7: function ids on trust --


async def _caches_are_empty(cluster) -> str | None:
    """None once no task is left and every function cache is empty (3 s)."""
    try:
        await wait_until(lambda: not cluster.scheduler.state.tasks, timeout=5, message="every task forgotten")
    except AssertionError as exc:
        return f"(not the finding) tasks were not forgotten: {exc}"
    workers = list(cluster.workers.values())
    with trio.move_on_after(3):
        while cluster.scheduler.functions or any(w.functions for w in workers):
            await trio.sleep(0.02)
        return None
    return (
        f"function caches not emptied once every task was forgotten: scheduler {len(cluster.scheduler.functions)}, "
        f"workers {[len(w.functions) for w in workers]}"
    )


@asynccontextmanager
async def hijacker(address, function_id):
    """A raw client that registers `evil` under `function_id`, calls it, and
    stays connected (holding its task) for the block."""
    async with rp.connect(address) as peer:
        await peer.hello_client("hijacker")
        # Well-formed (a pickled function in a frame of its own), so that what
        # stops it is the check of the id against the bytes.
        functions = {function_id: rp.Pickled([cloudpickle.dumps(evil, protocol=5)])}
        await peer.send(rp.submit_message([rp.task_message("hijack-1", function_id, (1,))], functions))
        # Whatever the scheduler makes of it: a result, a refusal, a close.
        with trio.move_on_after(5):
            try:
                await peer.next_message(timeout=math.inf)
            except rp.PeerClosed:
                pass
        yield peer


async def test_a_function_id_cannot_be_hijacked_after_its_first_use():
    """Finding 7: a raw client registering other bytes under the function id
    of `inc` (after client A used it) does not change A's results; and once
    every task is forgotten the function caches are empty.

    Today: A's results are right (the first payload for an id wins), but
    the caches keep every function for good: scheduler.functions and
    worker.functions are never emptied.
    """
    function_id, _ = function_of(inc)
    problems = []
    async with trioflow.AsyncLocalCluster(2, processes=False) as cluster:
        async with trioflow.AsyncClient(cluster) as a:
            assert await a.submit(inc, 1) == 2
            async with hijacker(cluster.scheduler_address, function_id):
                for x in (1, 2, 3):
                    with trio.fail_after(10):
                        value = await a.submit(inc, x, pure=False)
                    if value != x + 1:
                        problems.append(f"A's inc({x}) gave {value}")
        problem = await _caches_are_empty(cluster)
        if problem:
            problems.append(problem)
    assert not problems, "\n".join(problems)


async def test_a_function_id_cannot_be_claimed_before_its_first_use():
    """Finding 7: on a fresh scheduler, a raw client that registers other
    bytes under the function id of `inc` first (and stays connected) does
    not change client A's `inc` results; the caches end empty.

    Today: the scheduler keeps the first bytes it saw for an id, so A's
    inc(1) runs the attacker's function and gives 666.
    """
    function_id, _ = function_of(inc)
    problems = []
    async with trioflow.AsyncLocalCluster(2, processes=False) as cluster:
        async with hijacker(cluster.scheduler_address, function_id):
            async with trioflow.AsyncClient(cluster) as a:
                for x in (1, 2, 3):
                    with trio.fail_after(10):
                        value = await a.submit(inc, x)
                    if value != x + 1:
                        problems.append(f"A's inc({x}) gave {value}")
        problem = await _caches_are_empty(cluster)
        if problem:
            problems.append(problem)
    assert not problems, "\n".join(problems)


# ------------------------------------------- finding 8: forged task results --


@asynccontextmanager
async def cluster_past_recovery():
    """An in-process 2-worker cluster whose recovery window is over, so
    that what a worker's hello claims is not mistaken for a worker coming
    back after a scheduler restart."""
    config = trioflow.Config(recovery_grace=0.05)
    async with trioflow.AsyncLocalCluster(2, processes=False, config=config) as cluster:
        await wait_until(lambda: not cluster.scheduler.state.in_recovery(), timeout=5, message="the recovery window to end")
        yield cluster


async def _processing_on(cluster, key, worker_address) -> None:
    def placed():
        ts = cluster.scheduler.state.tasks.get(key)
        return ts is not None and ts.processing_on == worker_address

    await wait_until(placed, timeout=10, message=f"{key} processing on {worker_address}")


async def test_a_worker_cannot_finish_a_task_it_was_not_given():
    """Finding 8: a fake worker's task_finished (value 666) for a task that
    runs on another worker does not become the client's result.

    Today: the scheduler takes any worker's result for a task in progress
    ("just as good"): the client gets 666.
    """
    async with cluster_past_recovery() as cluster, trioflow.AsyncClient(cluster) as client:
        real = cluster.workers[0].address
        future = client.submit(slow_identity, 7, 2.0, pure=False, workers=[real])
        await _processing_on(cluster, future.key, real)
        async with trio.open_nursery() as nursery:
            fake_address = await nursery.start(rp.serve_forged_data, {future.key: 666})
            async with rp.connect(cluster.scheduler_address) as fake:
                await fake.hello_worker(fake_address)
                assert (await fake.next_message())["op"] == "welcome"
                nursery.start_soon(fake.heartbeats)
                forged = {"op": "task_finished", "key": future.key, "nbytes": 8, "value": rp.Pickled.of(666)}
                with suppress(rp.PeerClosed):
                    await fake.send(forged)
                with trio.fail_after(10):
                    value = await future
            nursery.cancel_scope.cancel()
        assert value == 7, f"the client's result is {value!r}: a forged result was taken"
        assert await client.submit(inc, 1, pure=False) == 2


async def test_a_worker_cannot_claim_to_hold_a_value_it_lacks():
    """Finding 8: a fake worker whose hello claims (`held`) the key a client
    is waiting for, and which serves 666 for it, does not change the result.

    Today: the claim is taken as the task's value ("the value we were
    waiting for already exists"); the client fetches it from the fake: 666.
    """
    async with cluster_past_recovery() as cluster, trioflow.AsyncClient(cluster) as client:
        real = cluster.workers[0].address
        future = client.submit(slow_identity, 7, 2.0, pure=False, workers=[real])
        await _processing_on(cluster, future.key, real)
        async with trio.open_nursery() as nursery:
            fake_address = await nursery.start(rp.serve_forged_data, {future.key: 666})
            async with rp.connect(cluster.scheduler_address) as fake:
                await fake.hello_worker(fake_address, held={future.key: 8})
                nursery.start_soon(fake.heartbeats)
                with trio.fail_after(10):
                    value = await future
            nursery.cancel_scope.cancel()
        assert value == 7, f"the client's result is {value!r}: a claimed value was taken"
        assert await client.submit(inc, 1, pure=False) == 2


# ------------------------------------------- finding 9: another client's data --


async def test_a_client_cannot_declare_another_clients_data_missing(cluster, client):
    """Finding 9: client B's missing_data about client A's scattered key
    does not lose it: A still gets its value and who_has still lists the holder.

    Today: the holder is struck off and told to free the value; A's future
    raises LostData.
    """
    future = await client.scatter(123)
    who_has = await client.who_has(future)
    holders = who_has[future.key]
    assert holders, who_has
    async with rp.connect(cluster.scheduler_address) as liar:
        await liar.hello_client("liar")
        await liar.send({"op": "missing_data", "key": future.key, "holders": holders})
        # A reply on the same connection: the missing_data was handled first.
        await liar.request({"op": "who_has", "keys": [future.key]}, request_id=1)
    problems = []
    after = await client.who_has(future)
    if sorted(after.get(future.key, [])) != sorted(holders):
        problems.append(f"who_has is {after}, was {who_has}")
    try:
        with trio.fail_after(10):
            value = await future
        if value != 123:
            problems.append(f"A's value is {value!r}")
    except Exception as exc:
        problems.append(f"A's future failed: {error_text(exc)}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------ finding 10: wrong address --


async def test_a_client_pointed_at_a_worker_says_so():
    """Finding 10: trioflow.Client(<a worker's address>) raises within 5 s
    with a message that says a worker answered.

    Today: the worker accepts the client's hello and never welcomes it;
    the client retries for ever (here: still hanging after 5 s).
    """
    outcome: dict = {}

    def connect(address):
        start = time.monotonic()
        try:
            outcome["client"] = trioflow.Client(address)
        except BaseException as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - start

    async with trioflow.AsyncLocalCluster(1, processes=False) as cluster:
        thread = threading.Thread(target=connect, args=(cluster.workers[0].address,), daemon=True)
        thread.start()
        await join_thread(thread, 5)
    # The worker is gone now: a client still trying gets a refusal and ends.
    ended = await join_thread(thread, 20)
    if "client" in outcome:
        outcome["client"].close()
    assert ended, "trioflow.Client(<worker address>) still hangs after the worker was closed"
    assert outcome["seconds"] <= 5, (
        f"trioflow.Client(<worker address>) was still trying after 5 s (ended after {outcome['seconds']:.1f} s, "
        f"when the worker went away)"
    )
    assert "error" in outcome, "trioflow.Client(<worker address>) connected"
    assert re.search("worker", error_text(outcome["error"]), re.IGNORECASE), error_text(outcome["error"])


@asynccontextmanager
async def loopback_server(answer: bytes | None):
    """A server on loopback that answers the first bytes of each connection
    with `answer` and closes it, or (None) reads and says nothing. Yields
    its address and a function that stops it (before the block ends)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handle(stream):
        async with stream:
            try:
                if answer is None:
                    while await stream.receive_some(65536):
                        pass
                    return
                await stream.receive_some(65536)
                await stream.send_all(answer)
            except trio.BrokenResourceError:
                pass

    async with trio.open_nursery() as nursery:
        serving = trio.CancelScope()

        async def serve():
            with serving:
                await trio.serve_listeners(handle, listeners)

        nursery.start_soon(serve)
        yield f"tcp://127.0.0.1:{port}", serving.cancel
        nursery.cancel_scope.cancel()


async def _open_client(address, config):
    async with trioflow.AsyncClient(address, config=config):
        return "connected"


async def open_client_in_a_thread(address, config, limit, stop_server):
    """Try to open an AsyncClient; what it did within `limit` seconds.

    The attempt runs in a thread with its own Trio loop (`in_a_fresh_loop`
    says why), unbounded, because bounding it with a cancel scope would
    report the scope, not the client. If it is still trying after `limit`,
    `stop_server()` is called: the client's next attempt is then refused
    and it ends. Returns (seconds taken, the error raised or "connected").
    """
    outcome: dict = {}

    def attempt():
        start = time.monotonic()
        outcome.update(_run_in_a_fresh_loop(_open_client, address, config))
        outcome["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    await join_thread(thread, limit)
    stop_server()
    assert await join_thread(thread, 20), "the client still tries after the server was stopped"
    return outcome["seconds"], outcome.get("error", outcome.get("value"))


async def test_a_client_pointed_at_an_http_server_says_so():
    """Finding 10: an AsyncClient pointed at an HTTP server (400 to every
    request) raises within 5 s with a message naming HTTP or "not a trioflow".

    Today: it reads "HTTP" as a frame count, calls it a failed
    registration, and reconnects for ever (here: still trying after 5 s).
    """
    async with loopback_server(b"HTTP/1.1 400 Bad Request\r\n\r\n") as (address, stop):
        seconds, error = await open_client_in_a_thread(address, trioflow.Config(), 5.0, stop)
    assert seconds <= 5.0, f"AsyncClient(<an HTTP server>) was still trying after 5 s (ended after {seconds:.1f} s)"
    assert isinstance(error, Exception), f"AsyncClient(<an HTTP server>) gave {error!r}"
    assert re.search(r"\bhttp\b|not a trioflow", error_text(error), re.IGNORECASE), error_text(error)


async def test_a_client_pointed_at_a_silent_server_gives_up():
    """Finding 10: an AsyncClient (connect_timeout=1) pointed at a server
    that accepts and says nothing raises within 3 s.

    Today: each attempt times out waiting for the welcome, and the client
    reconnects for ever (here: still trying after 3 s).
    """
    config = trioflow.Config(connect_timeout=1.0)
    async with loopback_server(None) as (address, stop):
        seconds, error = await open_client_in_a_thread(address, config, config.connect_timeout + 2, stop)
    assert seconds <= config.connect_timeout + 2, (
        f"AsyncClient(<a silent server>) was still trying after 3 s (ended after {seconds:.1f} s)"
    )
    assert isinstance(error, Exception), f"AsyncClient(<a silent server>) gave {error!r}"


# ------------------------------------------- every attack, one server --


async def _huge_header_before_hello(address):
    async with rp.connect(address) as peer:
        with suppress(rp.PeerClosed):
            await peer.send_bytes(rp.batch_header([GIB]))
            await peer.wait_closed(timeout=0.2)


async def _huge_header_after_hello(address):
    async with rp.connect(address) as peer:
        await peer.hello_client("announcer")
        [body, _] = rp.pack_messages([{"op": "scatter", "request_id": 1, "data": {"big": rp.Pickled([b""])}}])
        with suppress(rp.PeerClosed):
            await peer.send_bytes(rp.batch_header([len(body), GIB]) + body)
            await peer.wait_closed(timeout=0.2)


async def _decoding_bomb(address):
    async with rp.connect(address) as peer:
        await peer.hello_client("bomber")
        with suppress(rp.PeerClosed):
            await peer.send_bytes(bomb_batch())
            await peer.wait_closed(timeout=15)


def _as_client(*messages):
    """An attack: a client hello, `messages`, then half a second of listening."""

    async def attack(address):
        async with rp.connect(address) as peer:
            await peer.hello_client("attacker")
            with suppress(rp.PeerClosed):
                for message in messages:
                    await peer.send(message)
                await peer.wait_closed(timeout=0.5)

    return attack


def _as_worker(address_field, nthreads=1):
    """An attack: a worker hello, then half a second of listening."""

    async def attack(address):
        async with rp.connect(address) as peer:
            with suppress(rp.PeerClosed):
                await peer.hello_worker(address_field, nthreads=nthreads)
                await peer.wait_closed(timeout=0.5)

    return attack


def _cycle_submit(*pairs):
    function_id, payload = function_of(inc)
    tasks = [rp.task_message(key, function_id, (1,), dependencies=deps) for key, deps in pairs]
    return rp.submit_message(tasks, {function_id: payload})


def _retries_submit():
    function_id, payload = function_of(inc)
    task = rp.task_message("absurd-r", function_id, (1,), retries=2**63 - 1)
    return rp.submit_message([task], {function_id: payload})


ATTACKS = {
    "1 GiB header before the hello": _huge_header_before_hello,
    "1 GiB header after a hello": _huge_header_after_hello,
    "decoding bomb": _decoding_bomb,
    "10 MB op before the hello": _long_op_before_hello,
    "10 MB op after a hello": _long_op_after_hello,
    "10 MB function id": _long_function_id,
    "10 MB worker address": _long_worker_address,
    "self-dependent task": _as_client(_cycle_submit(("self-a", ["self-a"]))),
    "2-cycle": _as_client(_cycle_submit(("two-a", ["two-b"]), ("two-b", ["two-a"]))),
    "retries=2**63-1": _as_client(_retries_submit()),
    "nthreads=2**63-1": _as_worker("tcp://127.0.0.1:9", nthreads=2**63 - 1),
    "address 'garbage'": _as_worker("garbage"),
    "wait_for_workers(n=10**9)": _as_client({"op": "wait_for_workers", "n": 10**9, "request_id": 1}),
    "wait_for_workers(n=3), then hang up": _as_client({"op": "wait_for_workers", "n": 3, "request_id": 1}),
    "missing_data for a key it does not hold": _as_client(
        {"op": "missing_data", "key": "someone-elses", "holders": ["tcp://127.0.0.1:9"]}
    ),
    "restart with timeout -1": _as_client({"op": "restart", "timeout": -1, "request_id": 1}),
    "restart with timeout NaN": _as_client({"op": "restart", "timeout": math.nan, "request_id": 1}),
}


@pytest.mark.processes
async def test_the_scheduler_serves_a_client_after_each_attack(spawn):
    """Findings 1-5: one scheduler process takes every attack above in turn
    and, after each, still gives a well-behaved client its result.

    Today: the restart with timeout -1 ends the scheduler process (the
    first attack after which no client is served).
    """
    cluster = await start_cluster(spawn, n_workers=1)
    for name, attack in ATTACKS.items():
        with trio.fail_after(30):
            await attack(cluster.address)
        await assert_serving(cluster.address, after=f"the attack {name!r}")
