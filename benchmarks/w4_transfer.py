"""W4 — moving a large value from one worker to another.

2 workers x 1 thread. Each timed run (fresh keys, fresh random data):

1. untimed: ``x = submit(make_array, n, seed, workers=[A])`` and the same
   array (same seed) made on B, ``local = submit(make_array, n, seed,
   workers=[B])``; both waited for; ``who_has`` must show x on A alone;
2. ``local_s``: ``submit(total, local, workers=[B]).result()`` — the sum on
   data already on B (scheduling round trip + the sum itself; ``total``
   adds the 64-bit words as unsigned integers: exact, so the two sums must
   be equal to the bit);
3. ``round_trip_s``: ``submit(total, x, workers=[B]).result()`` — the same
   sum, but B must first fetch the 256 MiB from A; both sums must be equal;
4. transfer seconds = ``round_trip_s - local_s``;
   ``mb_per_s = n / transfer seconds / 10**6`` (MB = 10^6 bytes).

The arrays are float64 random numbers (incompressible; dask has no lz4
here and compresses nothing, trioflow never does). A sum on B's own copy
stands in for "the same sum on local data", so the array on B is freshly
made as x is on A.

Loopback, in the same run: a sender subprocess keeps one TCP connection to
this process open on 127.0.0.1 and, on each one-byte request, ``sendall``s n
bytes from a buffer it built beforehand; this process ``recv_into``s them
into a bytearray allocated (and zero-filled) before the clock starts. One
loopback sample is taken right after each timed transfer (paired under the
same load), plus one in every warm-up. A second loopback figure,
``loopback_fresh``, receives the same bytes into memory mapped after the
clock starts (an anonymous ``mmap``, its pages faulted in by the kernel as
the bytes land): what a receiver of a *new* value pays, trioflow's and
dask's alike. On this 2-core VM the two differ by 2-4x (page faults are
dear here): the first is the wire's limit, the second a new value's.

Figures (per side, then trioflow / dask): ``mb_per_s`` (median of 5 timed
runs after 1 warm-up; higher is better). The figures row also carries
``loopback`` (median MB/s over every loopback sample of the run) and
``ratio_vs_loopback`` (trioflow / loopback); ``ratios`` has each side's
figure / loopback. Per side: every sample, min/median/max (bimodality shows
there), the round-trip and local-sum times, and the loopback samples paired
with that side's runs.

    python benchmarks/w4_transfer.py [--mib 256] [--repeat 5] [--warmup 1] [--no-dask]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import mmap
import os
import socket
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (  # noqa: E402
    DASK,
    TRIOFLOW,
    Figure,
    Workload,
    median,
    now,
    open_default,
    parse_args,
    quiesce,
    ratio,
    run_workload,
    trioflow_client,
)

MB = 10**6
MIB = 2**20


def make_array(nbytes, seed):
    import numpy as np

    return np.random.default_rng(seed).random(nbytes // 8)


def total(array):
    """The sum of the array's 64-bit words as unsigned integers (mod 2**64).

    Exact and independent of the order of the additions, so the sum of A's
    array on B must equal the sum of B's own copy to the bit. (A float sum
    is not: NumPy's pairwise summation follows the buffer's alignment, and
    an array received over the network may sit at another alignment; a
    float sum of the same data differed in the 16th significant digit.)
    """
    import numpy as np

    return int(array.view(np.uint64).sum(dtype=np.uint64))


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mib", type=int, default=256, help="size of the array, MiB (default 256)")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="trioflow over tls:// (mutual TLS, throwaway certificates); dask stays on tcp://",
    )


def open_tls_cluster(side, cluster):
    """trioflow's cluster with every process on tls:// (one throwaway CA); dask as usual."""
    if side.system != TRIOFLOW:
        return open_default(side, cluster)
    import trioflow
    from trioflow.tls_certs import make_certificates

    directory = tempfile.mkdtemp(prefix="w4-tls-")
    paths = make_certificates(directory)
    config = trioflow.Config(
        tls_ca_file=str(paths["ca"]), tls_cert_file=str(paths["worker"]), tls_key_file=str(paths["worker-key"])
    )
    return trioflow_client(**cluster, config=config)


# ------------------------------------------------------------------ loopback --

# The sender: connect, build the payload, then answer each request byte
# with the whole payload; exit when the connection closes.
_SENDER = r"""
import socket, sys
port, nbytes = int(sys.argv[1]), int(sys.argv[2])
payload = memoryview(bytearray(b"\x01" * nbytes))
conn = socket.create_connection(("127.0.0.1", port))
conn.sendall(b"r")                       # ready: the payload is built
while conn.recv(1):
    conn.sendall(payload)
"""


class Loopback:
    """Raw TCP throughput between this process and a sender subprocess.

    One connection for the whole run (both sides' transfers also go over
    connections opened once). Each `sample` asks for `nbytes` and times
    their arrival into a buffer allocated before the clock starts.
    """

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.buffer = bytearray(nbytes)  # zero-filled: its pages exist before any clock starts
        self.view = memoryview(self.buffer)
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SENDER, str(port), str(nbytes)], stdin=subprocess.DEVNULL
        )
        listener.settimeout(60)
        try:
            self.conn, _ = listener.accept()
        finally:
            listener.close()
        self.conn.settimeout(60)
        if self.conn.recv(1) != b"r":
            raise RuntimeError("W4: the loopback sender did not start")
        self.samples_mb_per_s: list[float] = []
        self.fresh_mb_per_s: list[float] = []

    def sample(self) -> float:
        """One transfer of `nbytes`; returns MB/s (also kept in `samples_mb_per_s`)."""
        mb_per_s = self._receive(self.view, now())
        self.samples_mb_per_s.append(mb_per_s)
        return mb_per_s

    def sample_fresh(self) -> float:
        """The same, into memory mapped after the clock starts (kept in `fresh_mb_per_s`).

        What any receiver of a *new* value pays: the kernel faults its
        pages in as the bytes land (an anonymous ``mmap``, never touched
        before).
        """
        start = now()
        buffer = mmap.mmap(-1, self.nbytes)
        with memoryview(buffer) as view:
            mb_per_s = self._receive(view, start)
        buffer.close()
        self.fresh_mb_per_s.append(mb_per_s)
        return mb_per_s

    def _receive(self, view: memoryview, start: float) -> float:
        left, got = self.nbytes, 0
        self.conn.sendall(b"g")
        while left:
            n = self.conn.recv_into(view[got:], left)
            if n == 0:
                raise ConnectionError("W4: the loopback sender went away")
            got += n
            left -= n
        return self.nbytes / (now() - start) / MB

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_loopback: Loopback | None = None
_seeds = itertools.count(1)


# ------------------------------------------------------------------ the runs --


def _wait(system: str):
    if system == TRIOFLOW:
        from trioflow import wait
    else:
        from distributed import wait
    return wait


def _two_workers(client) -> tuple[str, str]:
    addresses = sorted(client.scheduler_info()["workers"])
    if len(addresses) < 2:
        raise RuntimeError(f"W4 needs 2 workers, the scheduler has {len(addresses)}")
    return addresses[0], addresses[1]


def transfer(client, system: str, nbytes: int) -> dict:
    """One measured transfer A -> B (see the module docstring)."""
    a, b = _two_workers(client)
    seed = next(_seeds)
    x = client.submit(make_array, nbytes, seed, workers=[a], pure=False)
    local = client.submit(make_array, nbytes, seed, workers=[b], pure=False)
    _wait(system)([x, local])
    holders = sorted(client.who_has([x])[x.key])
    if holders != [a]:
        raise AssertionError(f"W4: the array meant for {a} is on {holders}")

    start = now()
    local_sum = client.submit(total, local, workers=[b], pure=False).result()
    local_s = now() - start

    start = now()
    remote_sum = client.submit(total, x, workers=[b], pure=False).result()
    round_trip_s = now() - start

    if remote_sum != local_sum:
        raise AssertionError(f"W4: the sum on B of A's array is {remote_sum!r}, of B's own copy {local_sum!r}")
    transfer_s = round_trip_s - local_s
    del x, local
    return {
        "round_trip_s": round_trip_s,
        "local_s": local_s,
        "transfer_s": transfer_s,
        "mb_per_s": nbytes / transfer_s / MB if transfer_s > 0 else None,
    }


def warmup(client, system: str, args: argparse.Namespace) -> None:
    for _ in range(args.warmup):
        transfer(client, system, args.mib * MIB)
        quiesce(client, system)
        _loopback.sample()
        _loopback.sample_fresh()


def run_once(client, system: str, args: argparse.Namespace) -> dict:
    sample = transfer(client, system, args.mib * MIB)
    sample["quiesce_s"] = quiesce(client, system)
    sample["loopback_mb_per_s"] = _loopback.sample()
    sample["loopback_fresh_mb_per_s"] = _loopback.sample_fresh()
    return sample


def _spread(values: list[float]) -> dict:
    return {"min": min(values), "median": median(values), "max": max(values)} if values else {}


def summarize(samples: list[dict], args: argparse.Namespace) -> dict:
    rates = [s["mb_per_s"] for s in samples if s["mb_per_s"] is not None]
    loop = [s["loopback_mb_per_s"] for s in samples]
    fresh = [s["loopback_fresh_mb_per_s"] for s in samples]
    out = {
        "mb_per_s": median(rates) if rates else None,
        "mb_per_s_spread": _spread(rates),
        "runs_mb_per_s": [s["mb_per_s"] for s in samples],
        "runs_transfer_s": [s["transfer_s"] for s in samples],
        "runs_round_trip_s": [s["round_trip_s"] for s in samples],
        "runs_local_s": [s["local_s"] for s in samples],
        "quiesce_s": [s["quiesce_s"] for s in samples],
        "loopback_mb_per_s": median(loop),
        "loopback_runs_mb_per_s": loop,
        "vs_loopback": ratio(median(rates) if rates else None, median(loop)),
        "loopback_fresh_mb_per_s": median(fresh),
        "loopback_fresh_runs_mb_per_s": fresh,
        "vs_loopback_fresh": ratio(median(rates) if rates else None, median(fresh)),
    }
    if len(rates) < len(samples):
        out["runs_without_a_transfer_time"] = len(samples) - len(rates)  # round trip <= local sum
    return out


def postprocess(line: dict) -> None:
    """Add the loopback column: every loopback sample of the run, both sides."""
    loop = _loopback.samples_mb_per_s if _loopback is not None else []
    fresh = _loopback.fresh_mb_per_s if _loopback is not None else []
    line["loopback"] = {
        "mb_per_s": median(loop),
        "spread": _spread(loop),
        "samples": loop,
        "fresh_mb_per_s": median(fresh),
        "fresh_spread": _spread(fresh),
        "fresh_samples": fresh,
        "bytes": line["params"]["bytes"],
    }
    for row in line["figures"]:
        if row["figure"] != "mb_per_s":
            continue
        row["loopback"] = median(loop)
        row["ratio_vs_loopback"] = ratio(row.get(TRIOFLOW), median(loop))
        line["ratios"]["mb_per_s_vs_loopback"] = row["ratio_vs_loopback"]
        line["ratios"]["dask_mb_per_s_vs_loopback"] = ratio(row.get(DASK), median(loop))
        row["loopback_fresh"] = median(fresh)
        row["ratio_vs_loopback_fresh"] = ratio(row.get(TRIOFLOW), median(fresh))
        line["ratios"]["mb_per_s_vs_loopback_fresh"] = row["ratio_vs_loopback_fresh"]
        line["ratios"]["dask_mb_per_s_vs_loopback_fresh"] = ratio(row.get(DASK), median(fresh))


def main(argv=None) -> dict:
    global _loopback
    args = parse_args(__doc__.splitlines()[1], add_flags, repeat=5, warmup=1, argv=argv)
    nbytes = args.mib * MIB
    workload = Workload(
        id="W4",
        name=f"transfer: a {args.mib} MiB array made on worker A, summed on worker B",
        cluster={"n_workers": 2, "threads_per_worker": 1},
        figures=[Figure("mb_per_s", "MB/s (10^6 B)", "higher")],
        run_once=run_once,
        summarize=summarize,
        warmup=warmup,
        params={
            "mib": args.mib,
            "bytes": nbytes,
            "transfer_s": "round trip of the sum on B of A's array - the same sum on B's own copy",
            "loopback": "one TCP connection, sendall from a prebuilt buffer, "
            "recv_into a buffer allocated before the clock",
            "loopback_fresh": "the same, recv_into an mmap made after the clock starts (pages faulted as bytes land)",
        },
        postprocess=postprocess,
        open_cluster=open_tls_cluster if args.tls else None,
    )
    _loopback = Loopback(nbytes)
    try:
        return run_workload(workload, args)
    finally:
        _loopback.close()


if __name__ == "__main__":
    main()
