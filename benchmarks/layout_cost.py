"""What W1 and W3 pay for the benchmark's layout: client and scheduler in one process.

Not a workload of shared/benchmarks.md: a measurement for the performance
issue (docs/performance.md, "What is left"). Every workload runs on a
`LocalCluster`, whose scheduler is a thread of the benchmark's own
process (dask's layout, which the benchmarks share so that the two
libraries are compared alike), so the client's loop, the scheduler's loop
and the caller share one interpreter lock. Here the same workload also
runs in a deployment's layout, and the two alternate round by round
(A B, then B A) so that a drift in the machine's speed hits both alike:

- ``local``: ``trioflow.LocalCluster(2 workers x 1 thread)`` and a
  ``Client`` on it, as in `_harness.trioflow_client`;
- ``deployed``: ``trioflow scheduler`` and two ``trioflow worker
  --no-nanny`` processes, and a ``Client`` in this process.

W1: ``map(inc, range(--tasks))`` then ``gather``. W3: the binary-tree sum
of `w3_tree_sum.py` over ``--leaves`` leaves. trioflow only. Prints one
JSON line: tasks/s per round and layout, the median of each, and the
median of the per-round ratios deployed / local with how many rounds the
deployed layout won.

    python benchmarks/layout_cost.py [--workload w1|w3] [--rounds 8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import TRIOFLOW, median, now, quiesce, trioflow_client  # noqa: E402
from w8_pending_memory import Server, _address, _free_port  # noqa: E402

import trioflow  # noqa: E402
from trioflow.comm.auth import TOKEN_VARIABLE, Credentials  # noqa: E402


def inc(x):
    return x + 1


def add(a, b):
    return a + b


def w1_round(client, args: argparse.Namespace) -> float:
    start = now()
    futures = client.map(inc, range(args.tasks), pure=False)
    values = client.gather(futures)
    seconds = now() - start
    if values[-1] != args.tasks:
        raise AssertionError(f"W1: inc({args.tasks - 1}) gave {values[-1]!r}")
    return args.tasks / seconds


def w3_round(client, args: argparse.Namespace) -> float:
    start = now()
    level = client.map(inc, range(args.leaves), pure=False)
    while len(level) > 1:
        level = [client.submit(add, level[i], level[i + 1], pure=False) for i in range(0, len(level), 2)]
    total = level[0].result()
    seconds = now() - start
    if total != sum(i + 1 for i in range(args.leaves)):
        raise AssertionError(f"W3: the tree summed to {total!r}")
    return (2 * args.leaves - 1) / seconds


@contextlib.contextmanager
def deployed_client(logs: str):
    """A scheduler process, two worker processes, and a Client here; all ended on exit."""
    token = Credentials.generate().cluster_token()
    env_before = os.environ.get(TOKEN_VARIABLE)
    os.environ[TOKEN_VARIABLE] = token  # inherited by the servers, read by the Client
    servers: list[Server] = []
    try:
        py = sys.executable
        port = _free_port()
        servers.append(
            Server(
                [py, "-m", "trioflow", "scheduler", "--port", str(port), "--host", "127.0.0.1", "--log-level", "info"],
                os.path.join(logs, "scheduler.log"),
            )
        )
        address = _address(servers[0], r"listening at (tcp://\S+)")
        for i in range(2):
            servers.append(
                Server(
                    [py, "-m", "trioflow", "worker", address, "--no-nanny", "--nthreads", "1",
                     "--host", "127.0.0.1", "--log-level", "warning"],  # fmt: skip
                    os.path.join(logs, f"worker-{i}.log"),
                )
            )
        with trioflow.Client(address) as client:
            client.wait_for_workers(2, timeout=60)
            yield client
    finally:
        for server in reversed(servers):
            server.stop()
        if env_before is None:
            os.environ.pop(TOKEN_VARIABLE, None)
        else:
            os.environ[TOKEN_VARIABLE] = env_before


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("w1", "w3"), default="w1")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per layout (default 8)")
    parser.add_argument("--tasks", type=int, default=20_000, help="W1: tasks a round (default 20000)")
    parser.add_argument("--leaves", type=int, default=4096, help="W3: leaves a round (default 4096)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.tasks < 1 or args.leaves < 2:
        parser.error("--rounds and --tasks must be at least 1, --leaves at least 2")
    one_round = w1_round if args.workload == "w1" else w3_round
    figures: dict[str, list[float]] = {"local": [], "deployed": []}
    logs = tempfile.mkdtemp(prefix="layout-cost-")
    try:
        with deployed_client(logs) as deployed, trioflow_client(n_workers=2, threads_per_worker=1) as local:
            clients = {"local": local, "deployed": deployed}
            for client in clients.values():  # warm-up: functions shipped, threads started
                one_round(client, args)
            for i in range(args.rounds):
                for layout in ("local", "deployed") if i % 2 == 0 else ("deployed", "local"):
                    figures[layout].append(one_round(clients[layout], args))
                    quiesce(clients[layout], TRIOFLOW)  # the round's tasks forgotten, untimed
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    ratios = [d / loc for d, loc in zip(figures["deployed"], figures["local"])]
    result = {
        "tool": "layout_cost",
        "workload": args.workload.upper(),
        "params": {"rounds": args.rounds, "tasks": args.tasks, "leaves": args.leaves, "n_workers": 2},
        "tasks_per_s": {k: [round(x) for x in v] for k, v in figures.items()},
        "median_tasks_per_s": {k: round(median(v)) for k, v in figures.items()},
        "deployed_over_local": round(median(ratios), 3),
        "deployed_won": f"{sum(r > 1 for r in ratios)} of {len(ratios)}",
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
