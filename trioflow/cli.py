"""The `trioflow` command: scheduler, worker, demo.

Every server subcommand runs until SIGINT (Ctrl-C) or SIGTERM, logs one
line when it is ready and one when it stops, and exits with status 0 after
a clean shutdown. Every `Config` field is also a flag (``--worker-ttl 5``),
over ``TRIOFLOW_*`` variables, over the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

import trio

from trioflow.config import Config, ConfigError

logger = logging.getLogger("trioflow.cli")

LOG_LEVELS = ("debug", "info", "warning", "error")
# How long a shutting-down server may spend on its last words.
BEFORE_STOP_TIMEOUT_S = 2.0


def wall_seconds() -> float:
    """Seconds on the wall clock, for telling a person how long a command took.

    The one place outside the simulator's own clock where trioflow reads real
    time: commands report durations with it; nothing decides anything by it
    (design.md §3 rule 2).
    """
    return time.perf_counter()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 0..65535")
    return value


def _byte_size(text: str) -> int:
    from trioflow.config import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration (overrides TRIOFLOW_* variables)")
    for field in dataclasses.fields(Config):
        kind = int if field.type == "int" else float
        if field.name.endswith("_bytes"):
            kind = _byte_size  # 4GB, 512MiB, ... as dask parses them
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=f"config_{field.name}",
            type=kind,
            default=None,
            metavar="SIZE" if kind is _byte_size else "N" if kind is int else "X",
        )


def _add_server_flags(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1: anyone who can reach the port can run code)",
    )
    parser.add_argument("--port", type=_port, default=default_port, help=f"port (default {default_port})")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    _add_config_flags(parser)


def _memory(text: str) -> int | None:
    from trioflow.nanny import parse_memory

    try:
        return parse_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _resources(text: str) -> dict[str, float]:
    from trioflow.task_options import parse_resources

    try:
        return parse_resources(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_worker_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scheduler_address", metavar="ADDRESS", help="the scheduler, e.g. tcp://127.0.0.1:8786")
    parser.add_argument("--nthreads", type=_positive_int, default=1, help="threads running tasks (default 1)")
    parser.add_argument(
        "--memory-limit",
        type=_memory,
        default=None,
        help="kill and restart the worker when its resident memory passes this (e.g. 4GB; needs a nanny)",
    )
    parser.add_argument(
        "--resources",
        type=_resources,
        default={},
        metavar="NAME=N,...",
        help="what this worker offers to tasks that ask for resources, e.g. GPU=2,MEM=8e9",
    )
    _add_server_flags(parser, default_port=0)


def build_parser() -> argparse.ArgumentParser:
    from trioflow import __version__

    # prog is spelled out so that `python -m trioflow` prints the same usage
    # lines as the `trioflow` script (argparse would otherwise say __main__.py).
    parser = argparse.ArgumentParser(prog="trioflow", description="A resilient task scheduler built on Trio.")
    parser.add_argument("--version", action="version", version=f"trioflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scheduler = commands.add_parser("scheduler", help="run a scheduler")
    _add_server_flags(scheduler, default_port=8786)

    worker = commands.add_parser("worker", help="run a worker (under a nanny unless --no-nanny)")
    _add_worker_flags(worker)
    worker.add_argument(
        "--no-nanny",
        action="store_true",
        help="run the worker in this process, with nobody to restart it",
    )
    # Set by a nanny for the worker it starts; not for people.
    worker.add_argument("--nanny-address", help=argparse.SUPPRESS)
    worker.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)

    nanny = commands.add_parser("nanny", help="run a worker under a nanny (what 'worker' does by default)")
    _add_worker_flags(nanny)

    commands.add_parser("demo", help="a guided tour on a local cluster")
    from trioflow.sim.cli import add_chaos_parser

    add_chaos_parser(commands)
    return parser


def _resources_flag(resources: dict[str, float]) -> list[str]:
    """``--resources`` for a worker process, or nothing."""
    if not resources:
        return []
    return ["--resources", ",".join(f"{name}={amount!r}" for name, amount in resources.items())]


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {
        name[len("config_") :]: value
        for name, value in vars(args).items()
        if name.startswith("config_") and value is not None
    }
    return Config.from_env(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from trioflow.demo import run_demo

        return run_demo()
    if args.command == "chaos":
        from trioflow.sim.cli import run_chaos

        return run_chaos(args)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.command == "scheduler":
        from trioflow.scheduler import Scheduler

        server = Scheduler(host=args.host, port=args.port, config=config)
        return trio.run(run_until_signalled, server.serve, "scheduler")
    if args.command == "worker" and args.no_nanny:
        from trioflow.worker import Worker

        if args.memory_limit is not None:
            parser.error("--memory-limit needs a nanny (drop --no-nanny)")
        server = Worker(
            args.scheduler_address,
            nthreads=args.nthreads,
            host=args.host,
            port=args.port,
            config=config,
            nanny_address=args.nanny_address,
            parent_pid=args.parent_pid,
            pid=os.getpid(),
            resources=args.resources,
        )
        return trio.run(run_until_signalled, server.serve, "worker", server.say_goodbye)
    if args.command in ("worker", "nanny"):
        from trioflow.nanny import Nanny, ProcessLauncher

        worker_args = [
            "--nthreads", str(args.nthreads),
            "--host", args.host,
            "--port", str(args.port),
            "--log-level", args.log_level,
            *_resources_flag(args.resources),
        ]
        launcher = ProcessLauncher(args.scheduler_address, worker_args, env={**os.environ, **config.to_env()})
        nanny = Nanny(launcher, host=args.host, memory_limit=args.memory_limit, config=config)
        return trio.run(run_until_signalled, nanny.serve, "nanny")
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


async def run_until_signalled(
    serve: Callable[..., Awaitable[object]],
    name: str,
    before_stop: Callable[[], Awaitable[object]] | None = None,
) -> int:
    """Run `serve` until it returns or SIGINT/SIGTERM arrives; return an exit code.

    On a signal, `before_stop` (if any) runs first, bounded to a few seconds,
    while everything still works (a worker says goodbye); then `serve` is
    cancelled.
    """
    exit_code = 0
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def serve_then_stop() -> None:
                nonlocal exit_code
                try:
                    await serve()
                except Exception as exc:
                    logger.error("%s failed: %s", name, exc)
                    exit_code = 1
                nursery.cancel_scope.cancel()

            nursery.start_soon(serve_then_stop)
            async for signum in signals:
                logger.info("%s received %s; shutting down", name, signal.Signals(signum).name)
                if before_stop is not None:
                    with trio.move_on_after(BEFORE_STOP_TIMEOUT_S):
                        await before_stop()
                nursery.cancel_scope.cancel()
                break
    logger.info("%s stopped", name)
    return exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
