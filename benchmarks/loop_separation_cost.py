"""What W2 pays for giving a LocalCluster's scheduler a loop apart from the client's.

Not a workload of shared/benchmarks.md: a measurement for issue 13. Until
then `Client(cluster)` ran in the cluster's own Trio thread, so client and
scheduler talked without crossing threads; now the client has a thread
(and loop) of its own. One `LocalCluster(1 worker x 1 thread)`, two
clients on it:

- ``shared``: an `AsyncClient` started in the cluster's `LoopThread`,
  called the way `Client` calls its own (the former layout);
- ``separate``: ``trioflow.Client(cluster)`` (its own thread, the layout now).

W2's round trip (``submit(inc, i, pure=False).result()``), ``--calls`` per
round, the layouts alternating round by round (``--rounds``) so that a
drift in the machine's load hits both alike. Prints one JSON line: median
and p99 per layout (ms), and separate / shared.

With ``--pin`` (after the warm-up) this process's threads run on the first
CPU and the worker on the others, as ``toggle_ab.py --pin``: the layouts
then compare at one placement; free, the kernel places each as it likes.

    python benchmarks/loop_separation_cost.py [--rounds 10] [--calls 200] [--pin]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import median, now, percentile, pin_apart  # noqa: E402

import trioflow  # noqa: E402
from trioflow.client import AsyncClient  # noqa: E402
from trioflow.sync_client import BlockingPortal  # noqa: E402

_inputs = itertools.count()


def inc(x):
    return x + 1


class SharedLoopClient:
    """An AsyncClient in the cluster's own loop thread (the former `Client(cluster)`)."""

    def __init__(self, cluster: trioflow.LocalCluster):
        self._loop = cluster.loop
        self._client = AsyncClient(cluster)
        self._client._portal = BlockingPortal(self._loop)
        self._loop.start(self._client._run)

    def submit(self, fn, *args, **kwargs):
        return self._loop.run_sync(functools.partial(self._client.submit, fn, *args, **kwargs))

    def close(self) -> None:
        self._loop.run(self._client.close_and_wait)


def round_trips(client, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        i = next(_inputs)
        t0 = now()
        value = client.submit(inc, i, pure=False).result()
        samples.append(now() - t0)
        assert value == i + 1
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warmup-calls", type=int, default=50)
    parser.add_argument("--pin", action="store_true", help="this process on the first CPU, the worker on the others")
    args = parser.parse_args()
    samples: dict[str, list[float]] = {"shared": [], "separate": []}
    with trioflow.LocalCluster(1, threads_per_worker=1) as cluster:
        clients = {"shared": SharedLoopClient(cluster), "separate": trioflow.Client(cluster)}
        try:
            for client in clients.values():
                round_trips(client, args.warmup_calls)
            if args.pin:
                pin_apart()
            for r in range(args.rounds):
                order = ["shared", "separate"] if r % 2 == 0 else ["separate", "shared"]
                for name in order:
                    samples[name].extend(round_trips(clients[name], args.calls))
        finally:
            for client in clients.values():
                client.close()
    out: dict = {"params": vars(args), "loadavg_1m": os.getloadavg()[0]}
    for name, values in samples.items():
        ms = [v * 1e3 for v in values]
        out[name] = {"median_ms": round(median(ms), 3), "p99_ms": round(percentile(ms, 99), 3), "n": len(ms)}
    out["separate_over_shared"] = {
        k: round(out["separate"][k] / out["shared"][k], 3) for k in ("median_ms", "p99_ms")
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
