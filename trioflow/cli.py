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
from collections.abc import Awaitable, Callable, Sequence

import trio

from trioflow.batch_threads import make_this_thread_batch
from trioflow.config import Config, ConfigError
from trioflow.errors import AuthenticationError
from trioflow.gc_pause import collector_paused

logger = logging.getLogger("trioflow.cli")

LOG_LEVELS = ("debug", "info", "warning", "error")
# How long a shutting-down server may spend on its last words.
BEFORE_STOP_TIMEOUT_S = 2.0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def _address(text: str) -> str:
    from trioflow.comm.network import parse_address

    try:
        scheme, _, _ = parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if scheme not in ("tcp", "tls"):
        raise argparse.ArgumentTypeError(f"address {text!r}: scheme must be tcp or tls")
    return text


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
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            # --auth / --no-auth: `--no-auth` is the one people type.
            group.add_argument(
                flag, dest=f"config_{field.name}", action=argparse.BooleanOptionalAction, default=None,
                help=_CONFIG_HELP.get(field.name),
            )
            continue
        kind = {"int": int, "float": float, "str": str}[field.type.removesuffix(" | None")]
        if field.name.endswith("_bytes"):
            kind = _byte_size  # 4GB, 512MiB, ... as dask parses them
        group.add_argument(
            flag,
            dest=f"config_{field.name}",
            type=kind,
            default=None,
            metavar={int: "N", float: "X", str: "TEXT", _byte_size: "SIZE"}[kind],
            help=_CONFIG_HELP.get(field.name),
        )


# Help for the flags people reach for first (every field is a flag).
_CONFIG_HELP = {
    "dashboard_port": "serve the dashboard on this port (0: any free one); see docs/dashboard.md",
    "dashboard_host": "interface the dashboard binds (default 127.0.0.1)",
    "dashboard_token": "a token every dashboard request must carry (prefer TRIOFLOW_DASHBOARD_TOKEN: "
    "a flag shows in the process list)",
}


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
        "--nanny-port", type=_port, default=0, help="the nanny's control port (default: any free one)"
    )
    parser.add_argument(
        "--contact-address",
        type=_address,
        default=None,
        metavar="ADDRESS",
        help="the address others dial to reach this worker, if not the one it binds (NAT, containers)",
    )
    parser.add_argument(
        "--memory-limit",
        type=_memory,
        default=None,
        help="the worker's memory limit (e.g. 4GB): it spills values to disk and pauses past fractions of "
        "it (--memory-*-fraction); its nanny restarts it past --memory-terminate-fraction",
    )
    parser.add_argument(
        "--resources",
        type=_resources,
        default={},
        metavar="NAME=N,...",
        help="what this worker offers to tasks that ask for resources, e.g. GPU=2,MEM=8e9",
    )
    _add_server_flags(parser, default_port=0)


CHAOS_HELP = "run the whole cluster under seeded faults in one simulated process"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or, given `command`, every command but only
    that one's flags.

    A nanny starts each worker process with ``worker ...``, and the flags of
    all the commands (a flag per Config field, three times) cost a few
    milliseconds of each worker's start (W9, docs/performance.md); a
    command's own flags, usage and errors are the same either way.
    """
    from trioflow.version import __version__

    def wanted(name: str) -> bool:
        return command is None or command == name

    # prog is spelled out so that `python -m trioflow` prints the same usage
    # lines as the `trioflow` script (argparse would otherwise say __main__.py).
    parser = argparse.ArgumentParser(prog="trioflow", description="A resilient task scheduler built on Trio.")
    parser.add_argument("--version", action="version", version=f"trioflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    scheduler = commands.add_parser("scheduler", help="run a scheduler")
    if wanted("scheduler"):
        _add_server_flags(scheduler, default_port=8786)

    worker = commands.add_parser("worker", help="run a worker (under a nanny unless --no-nanny)")
    if wanted("worker"):
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
    if wanted("nanny"):
        _add_worker_flags(nanny)

    commands.add_parser("demo", help="a guided tour on a local cluster")
    certs = commands.add_parser(
        "tls-certs", help="write a throwaway CA and a certificate per role, for tls:// (needs the tls extra)"
    )
    certs.add_argument("directory", metavar="DIR", help="where to write ca.pem, scheduler.pem, worker.pem, client.pem, ...")
    certs.add_argument(
        "--host", action="append", default=None, metavar="NAME",
        help="a host name or address to put in the certificates (repeat; default 127.0.0.1 and localhost)",
    )
    if wanted("chaos"):
        from trioflow.sim.cli import add_chaos_parser

        add_chaos_parser(commands, help=CHAOS_HELP)
    else:
        commands.add_parser("chaos", help=CHAOS_HELP)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {
        name[len("config_") :]: value
        for name, value in vars(args).items()
        if name.startswith("config_") and value is not None
    }
    return Config.from_env(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(words[0] if words and not words[0].startswith("-") else None)
    args = parser.parse_args(words)
    if args.command == "demo":
        from trioflow.demo import run_demo

        return run_demo()
    if args.command == "chaos":
        from trioflow.sim.cli import run_chaos

        return run_chaos(args)
    if args.command == "tls-certs":
        from trioflow.tls_certs import make_certificates

        try:
            paths = make_certificates(args.directory, tuple(args.host or ("127.0.0.1", "localhost")))
        except (ImportError, OSError) as exc:
            print(f"trioflow tls-certs: {exc}", file=sys.stderr)
            return 1
        for role, path in paths.items():
            print(f"{role:14s} {path}")
        return 0
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    setup_logging(args.log_level)
    try:
        return _serve(parser, args, config)
    except (AuthenticationError, ConfigError) as exc:
        # No token, a bad one, TLS files missing: the person starting the
        # server is told what to fix, not shown a traceback.
        logger.error("%s", exc)
        return 1


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace, config: Config) -> int:
    from trioflow.comm.auth import credentials_for, scheduler_credentials

    # This process is a server of ours: its main thread runs our loop.
    make_this_thread_batch(config.batch_threads)

    if args.command == "scheduler":
        with collector_paused():
            from trioflow.scheduler import Scheduler

        server = Scheduler(
            host=args.host, port=args.port, config=config, credentials=scheduler_credentials(config)
        )
        return trio.run(run_until_signalled, server.serve, "scheduler")
    credentials = credentials_for(config, f"a {args.command}", cluster=True)
    if args.command == "worker" and args.no_nanny:
        with collector_paused():
            from trioflow.worker import Worker

        # (Without a nanny, nobody kills a worker past its terminate fraction:
        # it still spills and pauses by its limit.)
        server = Worker(
            args.scheduler_address,
            nthreads=args.nthreads,
            host=args.host,
            port=args.port,
            config=config,
            nanny_address=args.nanny_address,
            parent_pid=args.parent_pid,
            pid=os.getpid(),
            credentials=credentials,
            contact_address=args.contact_address,
            resources=args.resources,
            memory_limit=args.memory_limit,
        )
        return trio.run(run_until_signalled, server.serve, "worker", server.say_goodbye)
    if args.command in ("worker", "nanny"):
        with collector_paused():
            from trioflow.nanny import Nanny, ProcessLauncher
            from trioflow.task_options import resources_flag

        worker_args = [
            "--nthreads", str(args.nthreads),
            "--host", args.host,
            "--port", str(args.port),
            "--log-level", args.log_level,
            *resources_flag(args.resources),
        ]
        if args.contact_address:
            worker_args += ["--contact-address", args.contact_address]
        launcher = ProcessLauncher(
            args.scheduler_address, worker_args, env={**os.environ, **config.to_env()}, credentials=credentials
        )
        nanny = Nanny(
            launcher, host=args.host, port=args.nanny_port, memory_limit=args.memory_limit, config=config,
            credentials=credentials,
        )
        return trio.run(run_until_signalled, nanny.serve, "nanny")
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


def describe_error(exc: BaseException) -> str:
    """The message of `exc`, or of the errors inside it if it is an exception group.

    Trio wraps an error that ends a nursery in an `ExceptionGroup`, whose
    own message ("Exceptions from Trio nursery") says nothing; a person
    wants the port that was taken.
    """
    if isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        return "; ".join(describe_error(e) for e in inner) or str(exc)
    return str(exc) or type(exc).__name__


def setup_logging(level: str) -> None:
    """Readable logs on stderr for a command: time, level, component, message.

    The library itself installs only a `logging.NullHandler` (on the
    "trioflow" logger): where its records go is the application's choice;
    here the application is the command.
    """
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )


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
                    logger.error("%s failed: %s", name, describe_error(exc))
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
