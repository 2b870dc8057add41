"""`trioflow chaos`: run the chaos lab from the command line.

    trioflow chaos --seeds 500            # seeds 0..499, a progress bar, a summary
    trioflow chaos --seed 21 --print-trace    # replay one run, print its trace
    trioflow chaos --seed 21 --trace run.json # ...or write it for ui.perfetto.dev
    trioflow chaos --seeds 20 --json      # the summary as one JSON object
    trioflow chaos --real --seeds 3       # the real processes under real faults

The exit status is 1 when any run broke an oracle; the summary names each
failing seed and how to replay it. Only this module reads a wall clock,
to report how fast the lab runs; nothing inside a run does.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from trioflow.wall_clock import wall_seconds

DEFAULT_SEEDS = 100
DEFAULT_REAL_SEEDS = 3


def _mix(text: str) -> dict[str, float]:
    """A mix of the simulator's fault kinds (the real ones are checked in `run_chaos`)."""
    from trioflow.sim.faults import FAULT_KINDS

    mix: dict[str, float] = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in FAULT_KINDS:
            raise argparse.ArgumentTypeError(f"unknown fault kind {name!r} (known: {', '.join(FAULT_KINDS)})")
        try:
            mix[name] = float(weight) if weight else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {name!r} must be a number, got {weight!r}") from None
    return mix


def _plan(text: str) -> list:
    from trioflow.sim.faults import parse_plan

    try:
        return parse_plan(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _gaps(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX in seconds, got {text!r}") from None
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX, got {text!r}")
    return low, high


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def add_chaos_parser(subparsers: Any, help: str) -> argparse.ArgumentParser:
    """Add the ``chaos`` subcommand to `subparsers` (of ``trioflow``'s parser)."""
    parser = subparsers.add_parser(
        "chaos",
        help=help,
        description=(
            "Run the real scheduler, nannies, workers and client on a simulated "
            "network and clock, inject seeded faults, and check every outcome. "
            "Exit status 1 if any run breaks an oracle."
        ),
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--seeds", type=_count, metavar="N",
        help=f"run seeds FIRST..FIRST+N-1 (default {DEFAULT_SEEDS}; {DEFAULT_REAL_SEEDS} with --real)",
    )
    which.add_argument("--seed", type=int, metavar="N", help="replay the run of one seed")
    parser.add_argument("--first-seed", type=int, default=0, metavar="N", help="first seed of --seeds (default 0)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument(
        "--real", action="store_true",
        help="run the real processes (a scheduler, nannies and workers started from the command line) "
        "under real faults: SIGKILL, SIGSTOP/SIGCONT, scheduler kill-and-restart, and link cuts between "
        "network namespaces where those are available (root and iproute2)",
    )
    parser.add_argument(
        "--no-netns", action="store_true", help="with --real: everything on loopback, no link cuts"
    )
    parser.add_argument(
        "--gaps", type=_gaps, metavar="MIN,MAX",
        help="with --real: seconds between one fault healing and the next (default 0.2,1)",
    )
    parser.add_argument("--print-trace", action="store_true", help="with --seed: print the run's trace")
    parser.add_argument(
        "--trace", metavar="FILE", help="with --seed: write the trace as Chrome/Perfetto trace-event JSON"
    )
    parser.add_argument(
        "--plan", type=_plan, metavar="FAULTS",
        help="with --seed: inject these faults instead of the seed's own, e.g. "
        "'crash@1.5:worker-0,hang@2:worker-1/4' (kind@seconds:target[/duration])",
    )
    shape = parser.add_argument_group("the shape of each run")
    shape.add_argument("--workers", type=int, default=4, metavar="N", help="workers, each under a nanny (default 4)")
    shape.add_argument("--threads", type=int, default=2, metavar="N", help="threads per worker (default 2)")
    shape.add_argument("--tasks", type=int, default=200, metavar="N", help="tasks per workload (default 200)")
    shape.add_argument("--faults", type=_count, default=5, metavar="N", help="faults per run (default 5)")
    shape.add_argument(
        "--mix", metavar="KIND=W,...",
        help="fault kinds and weights (default crash=3,restart=1,hang=2,partition=1,reset=1,"
        "scheduler_restart=1; with --real: kill=4,stop=2,scheduler=1,cut=2)",
    )
    return parser


def run_chaos(args: argparse.Namespace) -> int:
    """Carry out ``trioflow chaos``; return the exit status."""
    from trioflow.sim.lab import LabSettings

    if args.seed is None and (args.print_trace or args.trace or args.plan is not None):
        print("trioflow chaos: --print-trace, --trace and --plan need --seed N", file=sys.stderr)
        return 2
    if args.workers < 1 or args.threads < 1 or args.tasks < 1:
        print("trioflow chaos: --workers, --threads and --tasks must be at least 1", file=sys.stderr)
        return 2
    if args.real:
        return _run_real(args)
    if args.no_netns or args.gaps:
        print("trioflow chaos: --no-netns and --gaps need --real", file=sys.stderr)
        return 2
    try:
        mix = _mix(args.mix) if args.mix else None
    except argparse.ArgumentTypeError as exc:
        print(f"trioflow chaos: {exc}", file=sys.stderr)
        return 2
    settings = LabSettings(
        n_workers=args.workers, nthreads=args.threads, n_tasks=args.tasks, n_faults=args.faults,
        **({"mix": mix} if mix else {}),
    )
    if args.seed is not None:
        return _replay(args, settings)
    seeds = range(args.first_seed, args.first_seed + (DEFAULT_SEEDS if args.seeds is None else args.seeds))
    return _sweep(args, settings, seeds)


def _run_real(args: argparse.Namespace) -> int:
    from trioflow.sim.real import RealSettings, parse_real_mix, run_real

    if args.plan is not None or args.trace:
        print("trioflow chaos: --plan and --trace are for the simulator, not --real", file=sys.stderr)
        return 2
    try:
        mix = parse_real_mix(args.mix) if args.mix else None
    except ValueError as exc:
        print(f"trioflow chaos: {exc}", file=sys.stderr)
        return 2
    settings = RealSettings(
        n_workers=args.workers, nthreads=args.threads, n_tasks=args.tasks, n_faults=args.faults,
        use_netns=False if args.no_netns else None, **({"mix": mix} if mix else {}),
        **({"gaps": args.gaps} if args.gaps else {}),
    )
    if args.seed is not None:
        return _replay(args, settings, run=run_real)
    count = DEFAULT_REAL_SEEDS if args.seeds is None else args.seeds
    return _sweep(args, settings, range(args.first_seed, args.first_seed + count), run=run_real)


def _replay(args: argparse.Namespace, settings: Any, run: Any = None) -> int:
    from trioflow.sim.faults import format_plan
    from trioflow.sim.lab import run_seed

    started = wall_seconds()
    report = run(args.seed, settings) if run is not None else run_seed(args.seed, settings, plan=args.plan)
    wall = wall_seconds() - started
    if args.trace:
        report.trace.write_chrome_trace(args.trace)
    if args.json:
        print(json.dumps(_summary([report], wall, settings)))
    else:
        if args.print_trace:
            sys.stdout.write(report.trace.text())
        print(f"seed {report.seed}: {'ok' if report.ok else 'VIOLATIONS'}")
        print(f"  workload: {report.workload}")
        print(f"  plan: {format_plan(report.plan) or 'no faults'}")
        print(f"  outcomes: {_counts(report.outcomes)}")
        print(f"  steals: {report.steals['requested']} asked, {report.steals['stolen']} moved")
        print(f"  simulated {report.sim_seconds:.1f} s in {wall:.2f} s; trace sha256 {report.trace_sha256}")
        if args.trace:
            print(f"  trace written to {args.trace} (open it at https://ui.perfetto.dev)")
        for note in report.notes:
            print(f"  note: {note}")
        for violation in report.violations:
            print(f"  violation: {violation}")
    return 0 if report.ok else 1


def _sweep(args: argparse.Namespace, settings: Any, seeds: range, run: Any = None) -> int:
    from trioflow.sim.lab import run_seed

    run = run or run_seed
    reports = []
    progress = _Progress(len(seeds))
    started = wall_seconds()
    for seed in seeds:
        report = run(seed, settings)
        reports.append(report)
        progress.step(failed=sum(not r.ok for r in reports))
    wall = wall_seconds() - started
    progress.close()
    summary = _summary(reports, wall, settings)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary, reports, real=args.real, shape=_shape_flags(args))
    return 1 if summary["failed_seeds"] else 0


def _shape_flags(args: argparse.Namespace) -> str:
    """The flags that shaped this sweep's runs, as typed: a seed names a run
    only together with them, so the replay hint must repeat them."""
    flags = []
    for name, default in (("workers", 4), ("threads", 2), ("tasks", 200), ("faults", 5)):
        if getattr(args, name) != default:
            flags.append(f"--{name} {getattr(args, name)}")
    if args.mix:
        flags.append(f"--mix {args.mix}")
    return "".join(f"{flag} " for flag in flags)


def _summary(reports: list, wall: float, settings: Any) -> dict[str, Any]:
    from trioflow.sim.faults import format_plan

    faults: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    steals = {"requested": 0, "stolen": 0}
    for report in reports:
        for kind, n in report.steals.items():
            steals[kind] += n
        for kind, n in report.faults.items():
            faults[kind] = faults.get(kind, 0) + n
        for kind, n in report.outcomes.items():
            outcomes[kind] = outcomes.get(kind, 0) + n
    sim = sum(r.sim_seconds for r in reports)
    return {
        "runs": len(reports),
        "workers": settings.n_workers,
        "threads_per_worker": settings.nthreads,
        "tasks_per_run": settings.n_tasks,
        "faults_per_run": settings.n_faults,
        "sim_seconds": round(sim, 3),
        "wall_seconds": round(wall, 3),
        "sim_seconds_per_wall_second": round(sim / wall, 2) if wall else None,
        "runs_per_minute": round(60 * len(reports) / wall, 1) if wall else None,
        "faults": faults,
        "outcomes": outcomes,
        "steals": steals,
        "runs_with_steals": sum(1 for r in reports if r.steals.get("stolen")),
        "violations": sum(len(r.violations) for r in reports),
        "failed_seeds": [r.seed for r in reports if not r.ok],
        "results": [
            {
                "seed": r.seed,
                "ok": r.ok,
                "sim_seconds": round(r.sim_seconds, 6),
                "trace_sha256": r.trace_sha256,
                "plan": format_plan(r.plan),
                "violations": r.violations,
            }
            for r in reports
        ],
    }


def _print_summary(summary: dict[str, Any], reports: list, real: bool = False, shape: str = "") -> None:
    runs = summary["runs"]
    print(
        f"chaos {'(real processes)' if real else 'lab'}: {runs} runs, {summary['workers']} workers x "
        f"{summary['threads_per_worker']} threads, ~{summary['tasks_per_run']} tasks and "
        f"{summary['faults_per_run']} faults per run"
    )
    if real:
        print(f"{summary['wall_seconds']:.1f} s of wall time ({summary['runs_per_minute']} runs per minute)")
    else:
        print(
            f"simulated {summary['sim_seconds']:.1f} s in {summary['wall_seconds']:.1f} s of wall time "
            f"({summary['sim_seconds_per_wall_second']} simulated s per wall s, "
            f"{summary['runs_per_minute']} runs per minute)"
        )
    print(f"faults injected: {_counts(summary['faults']) or 'none'}")
    print(f"outcomes: {_counts(summary['outcomes'])}")
    steals = summary["steals"]
    print(
        f"work stealing: {steals['requested']} steals asked, {steals['stolen']} tasks moved "
        f"(in {summary['runs_with_steals']} of {runs} runs); the rest were kept by their victims or cancelled"
    )
    failed = [r for r in reports if not r.ok]
    print(f"violations: {summary['violations']} in {len(failed)} of {runs} runs")
    for report in failed:
        print(f"  seed {report.seed}: {report.violations[0].splitlines()[0]}")
        if len(report.violations) > 1:
            print(f"    (and {len(report.violations) - 1} more)")
    for report in failed:
        for note in report.notes:
            print(f"  seed {report.seed}: {note}")
    if failed:
        again = ("--real " if real else "") + shape
        print(f"replay one with: trioflow chaos {again}--seed {failed[0].seed} --print-trace")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


class _Progress:
    """A one-line progress bar on stderr (a line per 10% when not a terminal)."""

    WIDTH = 30

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.tty = sys.stderr.isatty()
        self._last_tenth = -1

    def step(self, failed: int) -> None:
        self.done += 1
        filled = self.WIDTH * self.done // max(1, self.total)
        line = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total} runs, {failed} failing"
        if self.tty:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        else:
            tenth = 10 * self.done // max(1, self.total)
            if tenth != self._last_tenth:
                self._last_tenth = tenth
                print(line, file=sys.stderr)

    def close(self) -> None:
        if self.tty and self.total:
            sys.stderr.write("\n")
