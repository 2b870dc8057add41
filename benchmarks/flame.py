"""Flame graphs (py-spy, SVG) of trioflow on one workload, timed part only.

Not a benchmark (run_all.py runs only ``w*.py``): a tool for finding where
the time goes. It starts the workload's trioflow cluster, warms it up,
attaches ``py-spy record --subprocesses`` to this process (client,
scheduler, nannies) and so to the worker processes too, runs the timed part
of the workload, stops py-spy (SIGINT) and leaves one SVG. Each process
and thread is its own root of the graph (``--threads``), so the client's,
the scheduler's and each worker's share can be read off.

    python benchmarks/flame.py w1 -o benchmarks/profiles/w1-after.svg
    python benchmarks/flame.py w2 -o /tmp/w2.svg --rate 500
    python benchmarks/flame.py w4 -o /tmp/w4.svg --idle
    python benchmarks/flame.py w9 -o /tmp/w9.svg --rate 1000 --repeat 10

Needs ``pip install py-spy`` and the right to ptrace our own children.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import now, pin_apart, quiesce, trioflow_client  # noqa: E402

MIB = 2**20


def inc(x):
    return x + 1


def add(a, b):
    return a + b


def make_array(nbytes, seed):
    import numpy as np

    return np.random.default_rng(seed).random(nbytes // 8)


def total(array):
    import numpy as np

    return int(array.view(np.uint64).sum(dtype=np.uint64))


def w1(client, args):
    futures = client.map(inc, range(args.tasks), pure=False)
    client.gather(futures)


def w2(client, args):
    for i in range(args.calls):
        client.submit(inc, i, pure=False).result()


def w3(client, args):
    level = client.map(inc, range(args.leaves), pure=False)
    while len(level) > 1:
        level = [client.submit(add, a, b, pure=False) for a, b in zip(level[::2], level[1::2])]
    level[0].result()


class W4:
    """Arrays made on A before the clock; the timed part sums each on B."""

    def prepare(self, client, args):
        from trioflow import wait

        a, self.b = sorted(client.scheduler_info()["workers"])[:2]
        self.arrays = [
            client.submit(make_array, args.mib * MIB, seed, workers=[a], pure=False) for seed in range(args.transfers)
        ]
        wait(self.arrays)

    def __call__(self, client, args):
        # Each array is dropped once summed, as in w4_transfer.py, so that B
        # may receive the next into the memory of the last (warm buffers).
        while self.arrays:
            x = self.arrays.pop(0)
            client.submit(total, x, workers=[self.b], pure=False).result()
            del x
            time.sleep(0.05)


def w9(args):
    """Start a 2-worker cluster, a client, one task, and close: `args.repeat` times."""
    import trioflow

    for _ in range(args.repeat):
        with trioflow.LocalCluster(n_workers=2, threads_per_worker=1) as cluster, trioflow.Client(cluster) as client:
            client.submit(inc, 1, pure=False).result()


def start_pyspy(out: str, rate: int, idle: bool) -> subprocess.Popen:
    form = "raw" if out.endswith(".txt") else "flamegraph"  # collapsed stacks, for scripts
    command = [
        "py-spy", "record", "--pid", str(os.getpid()), "--subprocesses", "--threads",
        "--rate", str(rate), "--format", form, "-o", out, "--nonblocking",
    ]
    if idle:
        command.append("--idle")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.5)  # let py-spy attach to every process
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=("w1", "w2", "w3", "w4", "w9"))
    parser.add_argument("-o", "--out", required=True, help="the SVG to write (.txt: collapsed stacks instead)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--idle", action="store_true", help="also sample threads that wait")
    parser.add_argument("--tasks", type=int, default=20_000, help="W1 tasks")
    parser.add_argument("--calls", type=int, default=500, help="W2 round trips")
    parser.add_argument("--leaves", type=int, default=8192, help="W3 leaves")
    parser.add_argument("--mib", type=int, default=256, help="W4 array size")
    parser.add_argument("--transfers", type=int, default=4, help="W4 arrays moved")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs (W1..W3), clusters started (W9)")
    parser.add_argument(
        "--pin", action="store_true",
        help="after the warm-up, this process on the first CPU and the workers on the others "
        "(as toggle_ab.py --pin; py-spy itself may use every CPU)",
    )
    args = parser.parse_args()

    if args.workload == "w9":
        import trioflow  # noqa: F401  (imported before py-spy, as W9 does before its clock)

        spy = start_pyspy(args.out, args.rate, args.idle)
        start = now()
        w9(args)
        seconds = now() - start
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=120)
        print(f"w9: {seconds:.3f} s profiled; {args.out}: rc {spy.returncode} {err.decode()[-300:]}")
        return
    workers = 1 if args.workload == "w2" else 2
    run = W4() if args.workload == "w4" else {"w1": w1, "w2": w2, "w3": w3}[args.workload]
    with trioflow_client(workers, 1) as client:
        repeat = 1 if args.workload == "w4" else args.repeat
        if args.workload == "w4":
            run.prepare(client, args)
        else:
            run(client, args)  # warm-up
            quiesce(client, "trioflow")
        every_cpu = os.sched_getaffinity(0)
        if args.pin:
            pin_apart()
        spy = start_pyspy(args.out, args.rate, args.idle)
        os.sched_setaffinity(spy.pid, every_cpu)
        start = now()
        for _ in range(repeat):
            run(client, args)
            if args.workload != "w4":
                quiesce(client, "trioflow")
        seconds = now() - start
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=120)
    print(f"{args.workload}: {seconds:.3f} s profiled; {args.out}: rc {spy.returncode} {err.decode()[-300:]}")


if __name__ == "__main__":
    main()
