"""A 2 GiB NumPy result reaches the client: time, and how many copies each side held.

Not a workload of shared/benchmarks.md: the check of issue 13 ("a 2 GiB
numpy result reaches the client"), too big for CI. One `LocalCluster` of
one worker process (default config: max_frame_bytes 1 GiB, so the value
travels as three frames and is read into one buffer); a task makes an
array of ``--gib`` GiB (uint64, 0, 1, 2, ...) on the worker, the client
fetches it (``result()``), and checks it against a checksum the worker
computed (no second array on the client).

Memory, from the high-water marks of resident memory (``VmHWM``):
``client_peak_growth`` is how much this process's peak grew during the
fetch, over the array's size (one copy: about 1.0; two full copies would
be 2.0); ``worker_peak`` is the worker's peak over the array's size while
it made and sent the value (about 1.0: the array goes out of band, sent
from its own memory). Prints one JSON line.

    python benchmarks/big_value.py [--gib 2] [--repeat 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import now  # noqa: E402

import trioflow  # noqa: E402


def make_array(n_bytes):
    import numpy as np

    return np.arange(n_bytes // 8, dtype=np.uint64)


def checksum(array):
    import numpy as np

    return int(array.sum(dtype=np.uint64))


def rss_kib(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM of a process, KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value, _ = line.split()
                out[name[:-1]] = int(value)
    return out


def reset_peak(pid: int | str = "self") -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    n_bytes = int(args.gib * 2**30) // 8 * 8
    runs = []
    with trioflow.LocalCluster(1) as cluster, trioflow.Client(cluster) as client:
        [(worker_address, info)] = client.scheduler_info()["workers"].items()
        worker_pid = info["pid"]
        for _ in range(args.repeat):
            gc.collect()
            reset_peak()
            reset_peak(worker_pid)
            before = rss_kib()
            worker_before = rss_kib(worker_pid)
            t0 = now()
            future = client.submit(make_array, n_bytes, pure=False)
            expected = client.submit(checksum, future).result()
            made = now()
            value = future.result()
            fetched = now()
            ok = value.nbytes == n_bytes and checksum(value) == expected
            after = rss_kib()
            worker_after = rss_kib(worker_pid)
            runs.append(
                {
                    "ok": ok,
                    "make_and_checksum_s": made - t0,
                    "fetch_s": fetched - made,
                    "fetch_mb_per_s": n_bytes / (fetched - made) / 1e6,
                    "client_peak_growth": (after["VmHWM"] - before["VmRSS"]) * 1024 / n_bytes,
                    "worker_peak": (worker_after["VmHWM"] - worker_before["VmRSS"]) * 1024 / n_bytes,
                }
            )
            del value, future
    print(
        json.dumps(
            {
                "name": "big value: a NumPy result of --gib GiB to the client",
                "bytes": n_bytes,
                "runs": runs,
                "all_ok": all(r["ok"] for r in runs),
                "loadavg_1m": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
