"""`trioflow demo`: a short guided run on a local cluster, in plain words.

Each step prints what it is about to show, does it, and prints what
happened. Later steps show failures: a task that raises, a worker killed
mid-computation (its nanny starts another), a task that kills its workers.
"""

from __future__ import annotations

import operator
import os
import signal
import time

# Written as a user writes it, against the public names of the package. The
# demo may import the package `__init__` because it stands above everything
# in it: only the CLI's `demo` command imports this module.
import trioflow
from trioflow.wall_clock import wall_seconds


def inc(x: int) -> int:
    return x + 1


def div(a: float, b: float) -> float:
    return a / b


def add(a: int, b: int) -> int:
    return a + b


def square_sum(values: list[int]) -> int:
    return sum(v * v for v in values)


def slow_inc(x: int) -> int:
    time.sleep(0.05)
    return x + 1


def crash_worker() -> None:
    """Ends the worker process that runs it, as a segfault or OOM kill would."""
    os._exit(1)


def say(text: str = "") -> None:
    print(text, flush=True)


def step(number: int, title: str) -> None:
    say()
    say(f"{number}. {title}")
    say("-" * (len(title) + 3))


def run_demo() -> int:
    say("trioflow demo: a scheduler and two worker processes on this machine.")
    started = wall_seconds()
    with trioflow.LocalCluster(n_workers=2, threads_per_worker=1) as cluster:
        with trioflow.Client(cluster) as client:
            workers = sorted(client.nthreads())
            say(f"The scheduler listens at {cluster.scheduler_address}; workers: {', '.join(workers)}.")
            say(f"(started in {wall_seconds() - started:.2f} s)")

            step(1, "A map")
            futures = client.map(inc, range(10))
            say("client.map(inc, range(10)) sent ten tasks; the scheduler spread them over both workers.")
            say(f"gather -> {client.gather(futures)}")
            holders = client.who_has(futures)
            per_worker = {w: sum(w in h for h in holders.values()) for w in workers}
            say(f"results held per worker: {per_worker}")

            step(2, "A reduction whose inputs live on different workers")
            left = client.submit(list, range(0, 500), workers=workers[0])
            right = client.submit(list, range(500, 1000), workers=workers[1])
            say(f"left is computed on {workers[0]}, right on {workers[1]}.")
            total = client.submit(operator.add, left, right)
            both = client.submit(square_sum, total)
            say(f"sum of squares of 0..999 = {both.result()} (checked: {sum(i * i for i in range(1000))})")
            where = client.who_has([left, right, total])
            say(f"the concatenation ran on {where[total.key][0]}; it fetched the other list")
            say(f"worker-to-worker, so 'right' now lives on {sorted(where[right.key])}.")

            step(3, "User code fails: the error travels, nothing else breaks")
            x = client.submit(div, 1, 0)
            say("x = client.submit(div, 1, 0)")
            try:
                x.result()
            except ZeroDivisionError as exc:
                say(f"x.result() raised {type(exc).__name__}: {exc}")
                remote = str(exc.__cause__).strip().splitlines()
                say(f"  with the worker's traceback attached, ending: {remote[-1]!r}")
            y = client.submit(add, x, 10)
            say("y = client.submit(add, x, 10)  # depends on x")
            try:
                y.result()
            except ZeroDivisionError as exc:
                say(f"y.result() raised the same {type(exc).__name__}: {exc}")
            say(f"and the cluster carries on: client.submit(inc, 41).result() = {client.submit(inc, 41).result()}")
            say(f"statuses: x={x.status}, y={y.status}")

            step(4, "A worker process is killed in the middle of a map")
            futures = client.map(slow_inc, range(40))
            say("client.map(slow_inc, range(40)): forty tasks of 50 ms each.")
            while sum(f.done() for f in futures) < 10:
                time.sleep(0.005)
            victim, info = sorted(client.scheduler_info()["workers"].items())[0]
            os.kill(info["pid"], signal.SIGKILL)
            say(f"after 10 results, SIGKILL to the process of {victim} (pid {info['pid']}).")
            results = client.gather(futures, timeout=60)
            say(f"gather -> all 40 results correct: {results == [i + 1 for i in range(40)]}")
            say("its tasks were rerouted, and the results that lived only on it were")
            say("computed again on the survivor from their lineage.")
            client.wait_for_workers(2, timeout=60)
            say(f"its nanny started a new worker: {', '.join(sorted(client.nthreads()))}.")
            del futures  # released: the workers drop those results

            step(5, "A task that kills every worker that runs it")
            poison = client.submit(crash_worker)
            say("poison = client.submit(crash_worker)  # calls os._exit(1)")
            try:
                poison.result(timeout=60)
            except trioflow.KilledWorker as exc:
                say(f"after {exc.deaths} worker deaths the scheduler marked it bad:")
                say(f"  KilledWorker: {exc}")
            client.wait_for_workers(2, timeout=60)
            say(f"the nannies restarted the workers; client.submit(inc, 1).result() = {client.submit(inc, 1).result()}")

    say()
    say(f"Cluster closed; every worker process ended. Demo took {wall_seconds() - started:.1f} s.")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(run_demo())
