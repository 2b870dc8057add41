"""W2 — round-trip latency of one tiny task at a time.

1 worker x 1 thread; 500 sequential ``client.submit(inc, i, pure=False).result()``
after 50 untimed warm-up round trips. Each round trip is timed from the
``submit`` call to ``result()`` returning: client -> scheduler -> worker ->
scheduler -> client, then the value fetched from the worker.

Figures: median and p99 round trip in ms (lower is better) per side, and
trioflow / dask (below 1 means trioflow is faster). With ``--repeat R`` there
are R batches of ``--calls`` round trips; all samples are pooled for the
median and p99, and each batch's median is reported too.

    python benchmarks/w2_latency.py [--calls 500] [--repeat 1] [--no-dask] [--interleave]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Figure, Workload, median, now, p99, parse_args, percentile, run_workload  # noqa: E402


def inc(x):
    return x + 1


# Distinct inputs on top of pure=False: no run can ever hit an earlier key.
_inputs = itertools.count()


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=500, help="timed round trips per batch (default 500)")
    parser.add_argument("--warmup-calls", type=int, default=50, help="untimed round trips first (default 50)")


def round_trips(client, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        i = next(_inputs)
        t0 = now()
        value = client.submit(inc, i, pure=False).result()
        samples.append(now() - t0)
        if value != i + 1:
            raise AssertionError(f"W2: inc({i}) gave {value!r}")
    return samples


def warmup(client, system: str, args: argparse.Namespace) -> None:
    for _ in range(max(1, args.warmup)):
        round_trips(client, args.warmup_calls)


def run_once(client, system: str, args: argparse.Namespace) -> dict:
    return {"ms": [s * 1e3 for s in round_trips(client, args.calls)]}


def summarize(samples: list[dict], args: argparse.Namespace) -> dict:
    ms = [x for s in samples for x in s["ms"]]
    return {
        "median_ms": median(ms),
        "p99_ms": p99(ms),
        "p90_ms": percentile(ms, 90),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "mean_ms": sum(ms) / len(ms),
        "samples": len(ms),
        "batch_median_ms": [median(s["ms"]) for s in samples],
    }


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[1], add_flags, repeat=1, warmup=1, argv=argv)
    workload = Workload(
        id="W2",
        name="latency: sequential submit(inc, i, pure=False).result()",
        cluster={"n_workers": 1, "threads_per_worker": 1},
        figures=[Figure("median_ms", "ms", "lower"), Figure("p99_ms", "ms", "lower")],
        run_once=run_once,
        summarize=summarize,
        warmup=warmup,
        params={"calls": args.calls, "warmup_calls": args.warmup_calls, "pure": False},
    )
    return run_workload(workload, args)


if __name__ == "__main__":
    main()
