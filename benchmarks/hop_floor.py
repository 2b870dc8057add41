"""The floor under W2: what its hops cost with none of trioflow's logic on them.

Not a workload of shared/benchmarks.md (run_all.py skips it): a measurement
for issue 14's "what is left between trioflow and the physical limit".
W2's round trip (``submit(inc, i).result()``) is a chain of hops, each
waiting for the one before:

    caller thread -> client loop        (a call into a Trio thread, and back)
    client loop  <-> scheduler loop     (TCP; in a LocalCluster, two threads of one process)
    scheduler    <-> worker process     (TCP between processes)
    worker loop  <-> worker task thread (the executor)

This script times each kind of hop alone, in the same run, two ways:

- ``raw``: plain Trio (``SocketStream`` ping-pong of a 64-byte message;
  ``trio.from_thread`` for the caller; a queue and ``run_sync_soon`` for
  the task thread): nothing a scheduler could do with fewer steps on Trio;
- ``trioflow``: the same hops through trioflow's own pieces, with no
  scheduler or worker behind them (a `Connection` at each end, one small
  message checked against its declaration each way; `ThreadExecutor`;
  `LoopThread.run_sync`).

and sums them the way W2 chains them: ``floor = caller + 2 x tcp (one
between threads, one between processes) + task thread``. Then it runs W2
itself (a 1-worker `LocalCluster`) in the same minutes. What W2 takes
above the ``trioflow`` floor is the work of the cores and shells
(deciding, recording, the messages W2 sends that the floor does not);
what the ``trioflow`` floor takes above the ``raw`` one is the comm
layer's framing, checking and task hand-offs.

Each figure is the median over ``--rounds`` rounds of ``--calls`` round
trips (wall time per round trip, in microseconds), the kinds of hop
alternating round by round so that a drift of the machine hits all alike.
For the echo processes it also gives the CPU one round trip costs the
echo end (``..._echo_cpu``: a receive and a send, with the waits between).
Prints one JSON line.

    python benchmarks/hop_floor.py [--rounds 5] [--calls 2000]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import median, now, trioflow_client  # noqa: E402

import psutil  # noqa: E402
import trio  # noqa: E402

import trioflow  # noqa: E402
from trioflow.comm import messages as m  # noqa: E402
from trioflow.comm.connection import open_connection  # noqa: E402
from trioflow.comm.frames import FrameLimits  # noqa: E402
from trioflow.config import Config  # noqa: E402
from trioflow.errors import CommClosedError  # noqa: E402
from trioflow.executor import ThreadExecutor  # noqa: E402
from trioflow.loop_thread import LoopThread  # noqa: E402

PAYLOAD = b"x" * 64
LIMITS = FrameLimits.from_config(Config())


def inc(x):
    return x + 1


# ------------------------------------------------------------ echo ends --


async def raw_echo(stream: trio.SocketStream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)


async def connection_echo(stream: trio.SocketStream) -> None:
    """Answer every `heartbeat` with a `heartbeat_ack`, as checked messages.

    (Not `task_started`: it is held, docs/protocol.md, and would wait for a
    next message that a ping-pong never sends.)
    """
    async with open_connection(stream, LIMITS, peer="pinger", inbound=m.WORKER_TO_SCHEDULER) as conn:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, CommClosedError):
            while True:
                for _ in await conn.receive():
                    conn.send(m.HeartbeatAck())


ECHOES = {"raw": raw_echo, "connection": connection_echo}


async def serve_echo(kind: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(ECHOES[kind], listeners)


def echo_process_main(kind: str) -> None:
    """``--echo KIND``: serve one kind of echo, print the port, until stdin closes."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_echo, kind)
            print(port, flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)  # the parent closing stdin ends us
            nursery.cancel_scope.cancel()

    trio.run(main)


# ------------------------------------------------------------- pingers --


async def ping_raw(port: int, calls: int) -> float:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        for _ in range(100):  # warm
            await stream.send_all(PAYLOAD)
            await stream.receive_some(65536)
        start = now()
        for _ in range(calls):
            await stream.send_all(PAYLOAD)
            got = await stream.receive_some(65536)
            if len(got) != len(PAYLOAD):
                raise AssertionError(f"raw echo: {len(got)} bytes back, expected {len(PAYLOAD)}")
        return (now() - start) / calls


async def ping_connection(port: int, calls: int) -> float:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with open_connection(stream, LIMITS, peer="echo", inbound=m.SCHEDULER_TO_WORKER) as conn:
        for _ in range(100):
            conn.send(m.Heartbeat())
            await conn.receive()
        start = now()
        for _ in range(calls):
            conn.send(m.Heartbeat())
            got = await conn.receive()
            if [type(msg) for msg in got] != [m.HeartbeatAck]:
                raise AssertionError(f"connection echo answered {got!r}")
        return (now() - start) / calls


PINGERS = {"raw": ping_raw, "connection": ping_connection}


@dataclasses.dataclass
class Echo:
    port: int
    pid: int | None = None  # an echo process's, whose CPU is counted

    def cpu_seconds(self) -> float:
        if self.pid is None:
            return math.nan
        times = psutil.Process(self.pid).cpu_times()
        return times.user + times.system


@contextlib.contextmanager
def echo_process(kind: str) -> Iterator[Echo]:
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--echo", kind],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        yield Echo(int(process.stdout.readline()), process.pid)
    finally:
        process.stdin.close()
        try:
            process.wait(10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


@contextlib.contextmanager
def loop_thread(name: str) -> Iterator[LoopThread]:
    loop = LoopThread(name)
    try:
        yield loop
    finally:
        loop.stop()


@contextlib.contextmanager
def echo_thread(kind: str) -> Iterator[Echo]:
    with loop_thread(f"echo-{kind}") as loop:
        yield Echo(loop.start(serve_echo, kind))


# --------------------------------------------------------- thread hops --


async def task_thread_raw(calls: int) -> float:
    """A queue to a waiting thread, ``run_sync_soon`` back: the least a hand-off needs."""
    token = trio.lowlevel.current_trio_token()
    jobs: queue.SimpleQueue = queue.SimpleQueue()

    def work() -> None:
        while (job := jobs.get()) is not None:
            job()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        start = now()
        for _ in range(calls):
            done = trio.Event()
            jobs.put(lambda done=done: token.run_sync_soon(done.set))
            await done.wait()
        return (now() - start) / calls
    finally:
        jobs.put(None)
        thread.join()


async def task_thread_trioflow(calls: int) -> float:
    executor = ThreadExecutor(1, batch=Config().batch_threads)
    start = now()
    for i in range(calls):
        if await executor.run(functools.partial(inc, i)) != i + 1:
            raise AssertionError("ThreadExecutor returned a wrong value")
    return (now() - start) / calls


def caller_raw(loop: LoopThread, calls: int) -> float:
    token = loop.run_sync(trio.lowlevel.current_trio_token)
    start = now()
    for _ in range(calls):
        trio.from_thread.run_sync(int, trio_token=token)
    return (now() - start) / calls


def caller_trioflow(loop: LoopThread, calls: int) -> float:
    start = now()
    for _ in range(calls):
        loop.run_sync(int)
    return (now() - start) / calls


def w2(client: trioflow.Client, calls: int) -> float:
    start = now()
    for i in range(calls):
        if client.submit(inc, i, pure=False).result() != i + 1:
            raise AssertionError("W2: a wrong result")
    return (now() - start) / calls


# --------------------------------------------------------------- main --


def measure(args: argparse.Namespace) -> dict:
    samples: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        samples.setdefault(name, []).append(seconds * 1e6)

    calls = args.calls
    with contextlib.ExitStack() as stack:
        echoes = {
            (layout, kind): stack.enter_context(opener(kind))
            for layout, opener in (("processes", echo_process), ("threads", echo_thread))
            for kind in ("raw", "connection")
        }
        pinger = stack.enter_context(loop_thread("pinger"))
        client = stack.enter_context(trioflow_client(n_workers=1, threads_per_worker=1))  # W2's own layout
        w2(client, 100)  # warm: the function reaches the worker once

        def on_loop(fn: Callable[..., Awaitable[float]], *fn_args) -> float:
            return pinger.run(fn, *fn_args)

        for _ in range(args.rounds):
            for (layout, kind), echo in echoes.items():
                name = f"tcp_{layout}_{'raw' if kind == 'raw' else 'trioflow'}"
                cpu_before = echo.cpu_seconds()
                record(name, on_loop(PINGERS[kind], echo.port, calls))
                if echo.pid is not None:  # the echo end's CPU for one round trip (a receive and a send)
                    record(f"{name}_echo_cpu", (echo.cpu_seconds() - cpu_before) / (calls + 100))
            record("task_thread_raw", on_loop(task_thread_raw, calls))
            record("task_thread_trioflow", on_loop(task_thread_trioflow, calls))
            record("caller_raw", caller_raw(pinger, calls))
            record("caller_trioflow", caller_trioflow(pinger, calls))
            record("w2", w2(client, min(calls, 500)))
    us = {name: round(median(values), 1) for name, values in samples.items()}
    floors = {
        side: round(
            us[f"caller_{side}"] + us[f"tcp_threads_{side}"] + us[f"tcp_processes_{side}"] + us[f"task_thread_{side}"],
            1,
        )
        for side in ("raw", "trioflow")
    }
    return {
        "benchmark": "hop_floor",
        "unit": "microseconds per round trip (median of rounds)",
        "rounds": args.rounds,
        "calls": calls,
        "hops": us,
        "samples": {name: [round(v, 1) for v in values] for name, values in samples.items()},
        "floor_raw_us": floors["raw"],
        "floor_trioflow_us": floors["trioflow"],
        "w2_us": us["w2"],
        "w2_above_trioflow_floor_us": round(us["w2"] - floors["trioflow"], 1),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000, help="round trips per hop per round")
    parser.add_argument("--echo", choices=sorted(ECHOES), help=argparse.SUPPRESS)  # the child's role
    args = parser.parse_args(argv)
    if args.echo:
        echo_process_main(args.echo)
        return {}
    if args.rounds < 1 or args.calls < 1:
        parser.error("--rounds and --calls must be at least 1")
    result = measure(args)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
