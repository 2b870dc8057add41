"""Compare two settings inside ONE running cluster, switching every block.

Not a workload of shared/benchmarks.md (run_all.py skips it): a way to
tell a change of a few per cent from the machine's drift. This VM's speed
moves by 20-40 % within minutes, sometimes within seconds, so two runs of
a workload, one per version, disagree by more than most changes are worth
(docs/performance-history.md, "The ninth round"). Here one cluster serves
both settings: the script switches the setting, runs a block of the workload,
switches back, runs another, and so on, A then B, then B then A, so that
whatever the machine does in those seconds hits both alike. Each block
gives one figure; the per-block ratios A/B are what to read.

Only what can be switched in running processes can be compared this way:

- ``batch-threads``: every thread of this process and of the worker
  processes under Linux's ``SCHED_BATCH`` (A) or the default policy (B)
  (trioflow/batch_threads.py);
- ``client-write-interval:A,B``: the scheduler's least seconds between
  two writes to a client (`Connection.write_interval`), through
  `Client.run_on_scheduler`; ``worker-write-interval:A,B`` the same for
  its writes to workers;
- ``direct-io``: connections call the kernel themselves on plain sockets
  (A) or go through Trio's `SocketStream` methods (B)
  (`trioflow.comm.buffers.DIRECT_IO`), in this process and every worker;
- ``held:OP``: op OP declared held (A) or not (B) (docs/protocol.md,
  "Held messages"), in this process (client and scheduler) and in every
  worker (`Client.run`);
- ``driver-burst:A,B``: how many waiting handlers a driver runs after one
  before it lets other tasks run (`trioflow.drivers.BURST_HANDLERS`; 0: a
  checkpoint after every handler), in this process (the scheduler) and in
  every worker;
- ``driver-at-once``: a reader or an execution that finds the driver idle
  runs its handler at once (A) or every handler waits for the driver's
  task (B) (`trioflow.drivers.RUN_WHEN_IDLE`), in this process (the
  scheduler) and in every worker;
- ``merge-batches``: a receive returns, with the batch it read, the
  batches already buffered whole (A), or one batch a receive (B)
  (`trioflow.comm.connection.MERGE_BUFFERED_BATCHES`), in this process (the
  client and the scheduler) and in every worker;
- ``result-report``: a blocking `Future.result` takes its value from the
  report that the future is done (A, `BlockingPortal.result`) or runs the
  general path, a task in the client's loop (B), in this process;
- ``function-grace:A,B``: seconds a worker keeps a function no task there
  calls any more (`trioflow.scheduler.FUNCTION_GRACE_S`; 0: freed at once),
  read by the scheduler, in this process (set in the workers too, where
  nothing reads it);
- ``wait-after-short-read``: after a read that got less than it asked
  for, a connection's next read waits for the socket (A) or tries first
  (B) (`trioflow.comm.connection.WAIT_AFTER_SHORT_READ`), in this process
  (the client and the scheduler) and in every worker;
- ``write-through``: what a handler queues is written as it returns (A) or
  by each connection's sender task a pass later (B)
  (`trioflow.comm.connection.WRITE_THROUGH`), here and in every worker.

``--pin`` runs this process's threads on the first CPU and the workers on
the others, so that where the kernel puts the threads (which moves W2 by a
quarter between blocks) is the same for every block.

Workloads, as blocks: ``w2`` (``--per`` sequential ``submit(inc, i).result()``
on one worker; figure: median ms), ``w1`` (``map(inc, range(per))`` and
``gather`` on two; tasks/s), ``w3`` (a binary tree sum over ``per`` leaves on
two; tasks/s). Prints one JSON line.

    python benchmarks/toggle_ab.py SWITCH [--workload w2] [--blocks 30] [--per 100]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import median, now, pin_apart, trioflow_client  # noqa: E402

import psutil  # noqa: E402

def inc(x):
    return x + 1


def add(a, b):
    return a + b


# ------------------------------------------------------------ workloads --


def block_w2(client, per: int) -> float:
    """Median milliseconds of `per` sequential round trips."""
    times = []
    for i in range(per):
        start = now()
        client.submit(inc, i, pure=False).result()
        times.append(now() - start)
    return median(times) * 1e3


def block_w1(client, per: int) -> float:
    start = now()
    client.gather(client.map(inc, range(per), pure=False))
    return per / (now() - start)


def block_w3(client, per: int) -> float:
    start = now()
    level = client.map(inc, range(per), pure=False)
    while len(level) > 1:
        above = [client.submit(add, a, b, pure=False) for a, b in zip(level[0::2], level[1::2], strict=False)]
        if len(level) % 2:  # the odd one out goes up as it is (w3_tree_sum.py does the same)
            above.append(level[-1])
        level = above
    total = level[0].result()
    if total != per * (per + 1) // 2:
        raise AssertionError(f"the tree summed to {total!r}, expected {per * (per + 1) // 2}")
    return (2 * per - 1) / (now() - start)  # per leaves and per - 1 sums


@dataclasses.dataclass(frozen=True)
class BlockKind:
    n_workers: int
    block: Callable[[Any, int], float]
    unit: str  # of the figure `block` returns
    higher_is_better: bool
    default_per: int


WORKLOADS = {
    "w2": BlockKind(1, block_w2, "ms", False, 100),
    "w1": BlockKind(2, block_w1, "tasks/s", True, 3000),
    "w3": BlockKind(2, block_w3, "tasks/s", True, 2048),
}


# ------------------------------------------------------------- switches --


def _set_write_interval(seconds: float, links: str = "clients", dask_scheduler=None) -> int:
    """(On the scheduler.) Set the write interval of every client (or worker) link.

    This runs in a thread beside the scheduler's loop, which
    `run_on_scheduler` says not to change things from; a benchmark may, for
    this one: the attribute is a float the sender reads before each write,
    and one assignment of it is atomic under the GIL.
    """
    chosen = dask_scheduler.clients if links == "clients" else dask_scheduler.workers
    for link in chosen.values():
        link.conn.write_interval = seconds
    return len(chosen)


def _set_held(op: str, held: bool) -> bool:
    """(In a worker, or here.) Declare `op` held or not, in this process."""
    from trioflow.comm import messages as m

    m.OPS[op].HELD = held
    return m.OPS[op].HELD


# Switches that are one module variable, set the same way here and in every
# worker: switch -> (module, variable).
MODULE_SWITCHES = {
    "direct-io": ("trioflow.comm.buffers", "DIRECT_IO"),
    "driver-at-once": ("trioflow.drivers", "RUN_WHEN_IDLE"),
    "driver-burst": ("trioflow.drivers", "BURST_HANDLERS"),
    "merge-batches": ("trioflow.comm.connection", "MERGE_BUFFERED_BATCHES"),
    "function-grace": ("trioflow.scheduler", "FUNCTION_GRACE_S"),
    "wait-after-short-read": ("trioflow.comm.connection", "WAIT_AFTER_SHORT_READ"),
    "write-through": ("trioflow.comm.connection", "WRITE_THROUGH"),
}


def _set_module_variable(module: str, name: str, value: Any) -> Any:
    """(In a worker, or here.) Set `module`.`name` in this process; its value now."""
    target = importlib.import_module(module)
    setattr(target, name, value)
    return getattr(target, name)


def _threads(pids: list[int]) -> list[int]:
    return [int(tid) for pid in pids for tid in os.listdir(f"/proc/{pid}/task")]


def parse_switch(spec: str) -> tuple[str, Any]:
    """``(kind, value)`` of a SWITCH argument, checked before any cluster starts.

    Raises:
        SystemExit: the switch is unknown or its value malformed (named).
    """
    kind, _, arg = spec.partition(":")
    if kind in ("batch-threads", "direct-io", "driver-at-once", "merge-batches", "result-report", "wait-after-short-read",
                "write-through"):
        return kind, None
    if kind in ("client-write-interval", "worker-write-interval"):
        return kind, _two_settings(kind, arg, float, "numbers of seconds")
    if kind == "driver-burst":
        return kind, _two_settings(kind, arg, int, "whole numbers of handlers")
    if kind == "function-grace":
        return kind, _two_settings(kind, arg, float, "numbers of seconds")
    if kind == "held":
        from trioflow.comm import messages as m

        if arg not in m.OPS:
            raise SystemExit(f"held: no op {arg!r} (ops: {', '.join(sorted(m.OPS))})")
        if m.OPS[arg].REPLY is not None:
            raise SystemExit(f"held: {arg!r} is a request; a request cannot be held")
        return kind, arg
    raise SystemExit(
        f"unknown switch {spec!r}: batch-threads, direct-io, client-write-interval:A,B, "
        "worker-write-interval:A,B, driver-burst:A,B, driver-at-once, merge-batches, result-report, function-grace:A,B, "
        "wait-after-short-read, write-through or held:OP"
    )


def _two_settings(kind: str, arg: str, convert: Callable[[str], Any], what: str) -> tuple[Any, Any]:
    """The ``A,B`` of a switch: two non-negative values.

    Raises:
        SystemExit: not two values of the kind, or one is negative (named).
    """
    try:
        a, b = (convert(x) for x in arg.split(","))
    except ValueError:
        raise SystemExit(f"{kind} wants two {what}, A,B; got {arg!r}") from None
    if min(a, b) < 0:
        raise SystemExit(f"{kind}: {what} cannot be negative, got {arg!r}")
    return a, b


def switch_for(kind: str, value: Any, client) -> tuple[Callable[[bool], None], Callable[[], None]]:
    """``(apply(a), restore())`` for a parsed switch: `apply(True)` puts
    setting A in force, `apply(False)` setting B; `restore` puts back what
    was in force before."""
    if kind == "batch-threads":
        me = psutil.Process()
        pids = [me.pid] + [p.pid for p in me.children(recursive=True)]
        before = {tid: os.sched_getscheduler(tid) for tid in _threads(pids)}

        def apply(a: bool) -> None:
            for tid in _threads(pids):
                try:
                    os.sched_setscheduler(tid, os.SCHED_BATCH if a else os.SCHED_OTHER, os.sched_param(0))
                except (ProcessLookupError, PermissionError):
                    pass  # a thread that ended meanwhile, or one we may not touch

        def restore() -> None:
            for tid, policy in before.items():
                try:
                    os.sched_setscheduler(tid, policy, os.sched_param(0))
                except (ProcessLookupError, PermissionError):
                    pass

        return apply, restore
    if kind == "result-report":
        from trioflow.sync_client import BlockingPortal

        reporting = BlockingPortal.__dict__["result"]

        def general_path(self, client, future, timeout):
            return self.call(client._result, future, timeout)

        def apply(a: bool) -> None:
            BlockingPortal.result = reporting if a else general_path

        return apply, lambda: apply(True)
    if kind in ("client-write-interval", "worker-write-interval"):
        links = "clients" if kind == "client-write-interval" else "workers"
        a_s, b_s = value

        def apply(a: bool) -> None:
            client.run_on_scheduler(_set_write_interval, a_s if a else b_s, links)

        from trioflow.scheduler import CLIENT_WRITE_INTERVAL_S

        before = CLIENT_WRITE_INTERVAL_S if links == "clients" else 0.0
        return apply, lambda: client.run_on_scheduler(_set_write_interval, before, links)
    if kind in MODULE_SWITCHES:
        module, name = MODULE_SWITCHES[kind]
        before = getattr(importlib.import_module(module), name)
        a_value, b_value = value if value is not None else (True, False)

        def set_everywhere(setting: Any) -> None:
            _set_module_variable(module, name, setting)  # this process: the client and the scheduler
            answers = client.run(_set_module_variable, module, name, setting)
            if set(answers.values()) != {setting}:
                raise RuntimeError(f"the workers did not all switch {kind} to {setting}: {answers}")

        return (lambda a: set_everywhere(a_value if a else b_value)), (lambda: set_everywhere(before))
    if kind == "held":
        from trioflow.comm import messages as m

        arg = value
        before = m.OPS[arg].HELD

        def apply(a: bool) -> None:
            _set_held(arg, a)  # this process: the client and the scheduler
            answers = client.run(_set_held, arg, a)
            if set(answers.values()) != {a}:
                raise RuntimeError(f"the workers did not all switch {arg!r} to held={a}: {answers}")

        def restore() -> None:
            _set_held(arg, before)
            client.run(_set_held, arg, before)

        return apply, restore
    raise AssertionError(f"parse_switch let through {kind!r}")


# ----------------------------------------------------------------- main --


def measure(args: argparse.Namespace) -> dict[str, Any]:
    kind = WORKLOADS[args.workload]
    n_workers, block, unit, higher_is_better = kind.n_workers, kind.block, kind.unit, kind.higher_is_better
    figures: dict[str, list[float]] = {"A": [], "B": []}
    with trioflow_client(n_workers) as client:
        for i in range(100):  # warm: imports, caches, the first connections
            client.submit(inc, i, pure=False).result()
        if args.pin:
            pin_apart()
        apply, restore = switch_for(*args.parsed_switch, client)
        try:
            for b in range(args.blocks):
                for side in ("A", "B") if b % 2 == 0 else ("B", "A"):
                    apply(side == "A")
                    client.submit(inc, -1, pure=False).result()  # one round trip under the new setting first
                    figures[side].append(block(client, args.per))
        finally:
            restore()
    ratios = [a / b for a, b in zip(figures["A"], figures["B"], strict=True)]
    better = sum((r > 1) if higher_is_better else (r < 1) for r in ratios)
    return {
        "benchmark": "toggle_ab",
        "switch": args.switch,
        "workload": args.workload,
        "unit": unit,
        "higher_is_better": higher_is_better,
        "blocks": args.blocks,
        "pinned": args.pin,
        "per_block": args.per,
        "median_A": median(figures["A"]),
        "median_B": median(figures["B"]),
        "ratio_A_over_B_median": median(ratios),
        "ratio_A_over_B_mean": sum(ratios) / len(ratios),
        "blocks_A_better": better,
        "figures": figures,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "switch", help="batch-threads | direct-io | client-write-interval:A,B | worker-write-interval:A,B | driver-burst:A,B | "
        "driver-at-once | merge-batches | result-report | function-grace:A,B | wait-after-short-read | write-through | held:OP"
    )
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="w2")
    parser.add_argument("--blocks", type=int, default=30, help="blocks per setting (default 30)")
    parser.add_argument("--per", type=int, default=None, help="round trips (w2), tasks (w1) or leaves (w3) per block")
    parser.add_argument(
        "--pin", action="store_true",
        help="this process on the first CPU, the workers on the others (placement fixed; for W2)",
    )
    args = parser.parse_args(argv)
    if args.blocks < 1:
        parser.error(f"--blocks must be at least 1, got {args.blocks}")
    if args.per is None:
        args.per = WORKLOADS[args.workload].default_per
    if args.per < 2:
        parser.error(f"--per must be at least 2, got {args.per}")
    args.parsed_switch = parse_switch(args.switch)
    result = measure(args)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
