"""What authentication (and TLS) add to opening a connection.

A scheduler in this process; for each setting, N clients connect one after
the other, each timed from the TCP connect to the scheduler's welcome, then
closed. The figure is the median per connection, and the difference
between "token" (the default) and "--no-auth" is what the challenge-response
costs. (Issue 12's bound: at most 2 ms.) No dask side: dask has no token
authentication to compare with.

    python benchmarks/handshake_cost.py [--connections 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import trio

import trioflow
from trioflow.comm.auth import Credentials


async def connect_times(n: int, config: trioflow.Config, credentials: Credentials) -> list[float]:
    async with trio.open_nursery() as nursery:
        scheduler = trioflow.Scheduler(config=config, credentials=credentials)
        address = await nursery.start(scheduler.serve)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            async with trioflow.AsyncClient(address, config=config, credentials=credentials.client_only()):
                times.append(time.perf_counter() - start)
        nursery.cancel_scope.cancel()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=200)
    args = parser.parse_args()
    from trioflow.tls_certs import make_certificates

    paths = make_certificates(tempfile.mkdtemp(prefix="handshake-"))
    tls = dict(tls_ca_file=str(paths["ca"]), tls_cert_file=str(paths["client"]), tls_key_file=str(paths["client-key"]))
    settings = {
        "no-auth": (trioflow.Config(auth=False), Credentials.none()),
        "token": (trioflow.Config(), Credentials.generate()),
        "token+tls": (trioflow.Config(**tls), Credentials.generate()),
    }
    out = {}
    for name, (config, credentials) in settings.items():
        times = trio.run(connect_times, args.connections, config, credentials)
        out[name] = {"median_ms": 1000 * statistics.median(times), "p90_ms": 1000 * statistics.quantiles(times, n=10)[-1]}
    out["auth_cost_ms"] = out["token"]["median_ms"] - out["no-auth"]["median_ms"]
    out["tls_cost_ms"] = out["token+tls"]["median_ms"] - out["token"]["median_ms"]
    print(json.dumps({"workload": "handshake", "connections": args.connections, "results": out}))


if __name__ == "__main__":
    main()
