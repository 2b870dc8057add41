"""Mutation testing of `trioflow/core`: plant one small bug at a time, and see
whether the tests notice.

    python tests/mutation/run_mutants.py                 # every mutant (takes a while)
    python tests/mutation/run_mutants.py --jobs 2 --json mutants.json
    python tests/mutation/run_mutants.py --list          # the mutants, without running anything
    python tests/mutation/run_mutants.py --file worker_state.py --sample 40 --seed 3
    python tests/mutation/run_mutants.py --only 'worker_state.py::WorkerState._on_free::stmt#2' --show

(pytest does not collect this file: its name does not start with ``test_``.)

How it works
------------
A *mutant* is `trioflow/core` with one small change, the kind of slip a
person makes: a comparison turned round (``<`` for ``<=``, ``is`` for
``is not``, ``in`` for ``not in``), ``and`` for ``or``, a ``not`` dropped
or a condition negated, ``True`` for ``False`` or ``n`` for ``n + 1``,
``+`` for ``-``, ``break`` for ``continue``, or one statement deleted (a
call, an assignment, a ``del``, a ``return``). Only code inside functions is
mutated, never ``assert`` statements (they check, they do not act) nor
``__repr__``. Each change is made in the source text at the node's position
(the rest of the file, comments and all, stays as it was).

Each mutant is written into a private copy of the repository (never into
the working tree) and the tests run there in stages, fastest first, each
stopping at its first failure:

1. ``tests/core`` (a second or two): the exact event-in, messages-out tests;
2. the conformance tests (``tests/properties``): the core against the
   model, in lockstep (Hypothesis, derandomized: the same examples every
   run), the mutated side (worker or scheduler) first;
3. ``tests/sim/test_regressions.py``: the chaos lab's pinned seeds;
4. ``tests/sim/test_lab.py``: whole chaos-lab runs.

A mutant is *killed* when a stage fails (or outlasts its timeout: the
tests noticed, by never finishing), and *survives* when every stage
passes. A survivor is either a hole in the tests or an *equivalent* mutant,
one no test can kill because it does not change what the code does (a
check that is also made elsewhere, a branch the other branches already
cover). `equivalent.txt`, next to this file, lists the survivors judged
equivalent, one id per line with the reason; the score is the share of the
*other* mutants that were killed. docs/testing.md records the last full
run and judges every survivor.

A mutant's id names its file, its function, the kind of change and its
rank among that function's changes of that kind
(``scheduler_state.py::SchedulerState._on_free::stmt#2``), so ids survive
edits elsewhere in the file.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import pathlib
import random
import shutil
import signal
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORE = ROOT / "trioflow" / "core"
EQUIVALENT_FILE = pathlib.Path(__file__).with_name("equivalent.txt")
# What the private copy holds: enough to import trioflow and run the tests.
# What a workspace holds: everything the stages' tests read (docs/ too: a
# test compares docs/state-machines.md with the tables).
COPIED = ("trioflow", "tests", "spec", "docs", "pyproject.toml")
# (name, test paths, timeout in seconds), fastest first. The timeouts are
# generous (each stage takes a few seconds to a minute here): a mutant that
# makes the tests spin for ever counts as killed when one passes. "{side}"
# is the conformance test of the mutated file's side (worker or scheduler)
# followed by the other one.
STAGES: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("core", ("tests/core",), 60.0),
    ("conformance", ("{side}",), 300.0),
    ("regressions", ("tests/sim/test_regressions.py",), 300.0),
    ("lab", ("tests/sim/test_lab.py",), 300.0),
)
_CONFORMANCE = {
    "worker": ("tests/properties/test_worker_conformance.py", "tests/properties/test_scheduler_conformance.py"),
    "scheduler": ("tests/properties/test_scheduler_conformance.py", "tests/properties/test_worker_conformance.py"),
}

_COMPARISONS = {
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
}
_SIMPLE_STATEMENTS = (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete, ast.Return, ast.Continue, ast.Break)


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One planted change: where, what it was, what it becomes."""

    id: str
    path: str  # relative to the repository root
    line: int
    start: int  # character offsets of the replaced text in the file
    end: int
    original: str
    replacement: str

    def apply(self, source: str) -> str:
        return source[: self.start] + self.replacement + source[self.end :]

    def describe(self) -> str:
        before = " ".join(self.original.split())
        after = " ".join(self.replacement.split())
        return f"{self.path}:{self.line}: {before[:80]!r} -> {after[:80]!r}"


# ------------------------------------------------------------- mutants --


class _Finder(ast.NodeVisitor):
    """Walks one module and records every mutation it allows, in source order."""

    def __init__(self, path: pathlib.Path, source: str):
        self.path = path
        self.rel = str(path.relative_to(ROOT))
        self.source = source
        # Character offset of the start of each line.
        self.line_starts = [0]
        for line in source.splitlines(keepends=True):
            self.line_starts.append(self.line_starts[-1] + len(line))
        self.scope: list[str] = []
        self.in_function = 0
        self.ranks: dict[tuple[str, str], int] = {}
        self.mutants: list[Mutant] = []

    # -- where we are --

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if node.name == "__repr__":
            return
        self.scope.append(node.name)
        self.in_function += 1
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        self._statements(body)
        for statement in body:
            self.visit(statement)
        self.in_function -= 1
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Assert(self, node: ast.Assert) -> None:
        return  # an assertion checks; it does not act

    # -- what may change --

    def generic_visit(self, node: ast.AST) -> None:
        if self.in_function:
            self._mutate(node)
        super().generic_visit(node)

    def _mutate(self, node: ast.AST) -> None:
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                swapped = _COMPARISONS.get(type(op))
                if swapped is not None:
                    changed = ast.Compare(node.left, [*node.ops[:i], swapped(), *node.ops[i + 1 :]], node.comparators)
                    self._add(node, "cmp", f"({ast.unparse(changed)})")
        elif isinstance(node, ast.BoolOp):
            other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            self._add(node, "bool", f"({ast.unparse(ast.BoolOp(other, node.values))})")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            self._add(node, "not", f"({ast.unparse(node.operand)})")
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            self._add(node, "const", str(not node.value))
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            self._add(node, "const", str(node.value + 1))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            other = ast.Sub() if isinstance(node.op, ast.Add) else ast.Add()
            self._add(node, "arith", f"({ast.unparse(ast.BinOp(node.left, other, node.right))})")
        if isinstance(node, (ast.If, ast.While, ast.IfExp)) and not isinstance(
            node.test, (ast.Compare, ast.BoolOp, ast.UnaryOp)
        ):
            self._add(node.test, "negate", f"(not {ast.unparse(node.test)})")
        if isinstance(node, ast.AugAssign) and isinstance(node.op, (ast.Add, ast.Sub)):
            other = ast.Sub() if isinstance(node.op, ast.Add) else ast.Add()
            self._add(node, "arith", ast.unparse(ast.AugAssign(node.target, other, node.value)))
        if isinstance(node, (ast.Continue, ast.Break)):
            self._add(node, "loop", "break" if isinstance(node, ast.Continue) else "continue")
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list):
                self._statements(block)

    def _statements(self, block: list[ast.stmt]) -> None:
        for statement in block:
            if isinstance(statement, _SIMPLE_STATEMENTS):
                self._add(statement, "stmt", "pass")

    def _add(self, node: ast.AST, kind: str, replacement: str) -> None:
        function = ".".join(self.scope)
        rank = self.ranks.get((function, kind), 0) + 1
        self.ranks[(function, kind)] = rank
        start = self.line_starts[node.lineno - 1] + _char_offset(self.source, node.lineno, node.col_offset, self.line_starts)
        end = self.line_starts[node.end_lineno - 1] + _char_offset(
            self.source, node.end_lineno, node.end_col_offset, self.line_starts
        )
        self.mutants.append(
            Mutant(
                id=f"{self.path.name}::{function}::{kind}#{rank}",
                path=self.rel,
                line=node.lineno,
                start=start,
                end=end,
                original=self.source[start:end],
                replacement=replacement,
            )
        )


def _char_offset(source: str, lineno: int, col_offset: int, line_starts: list[int]) -> int:
    """`ast` columns count UTF-8 bytes; turn one into a character offset."""
    line = source[line_starts[lineno - 1] : line_starts[lineno]]
    return len(line.encode("utf-8")[:col_offset].decode("utf-8"))


def find_mutants(files: list[pathlib.Path]) -> list[Mutant]:
    mutants = []
    for path in files:
        source = path.read_text()
        finder = _Finder(path, source)
        finder.visit(ast.parse(source, filename=str(path)))
        mutants.extend(finder.mutants)
    return mutants


# ------------------------------------------------------------- running --


@dataclasses.dataclass
class Result:
    mutant: Mutant
    outcome: str  # "killed", "timeout" or "survived"
    stage: str | None  # the stage that killed it
    seconds: float
    output: str = ""


class Workspace:
    """A private copy of the repository in which mutants are planted one at a time."""

    def __init__(self, parent: pathlib.Path, name: str):
        self.root = parent / name
        self.root.mkdir()
        for item in COPIED:
            source = ROOT / item
            if source.is_dir():
                shutil.copytree(source, self.root / item, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
            else:
                shutil.copy(source, self.root / item)
        self.log = self.root / "stage.log"

    def plant(self, mutant: Mutant | None, original: Mutant | None = None) -> None:
        """Write `mutant` into the copy (None: put the original back).

        Raises:
            SyntaxError: the mutant does not compile (a bug of this script:
                every replacement is a parenthesized expression or ``pass``).
        """
        target = mutant or original
        assert target is not None
        path = self.root / target.path
        source = (ROOT / target.path).read_text()
        text = mutant.apply(source) if mutant is not None else source
        compile(text, str(path), "exec")
        path.write_text(text)
        # A stale .pyc of the same size and second would be loaded instead.
        for pyc in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
            pyc.unlink()

    def fork_stage(self, paths: list[str]) -> int:
        """Run pytest on `paths` in a forked child (in this copy); return its pid.

        This process imported pytest and the test libraries once, and never
        trioflow: each child imports trioflow (and the tests) afresh from
        the copy, mutant included, so a stage costs its tests, not a new
        interpreter.
        """
        shutil.rmtree(self.root / ".hypothesis", ignore_errors=True)  # no replays of earlier mutants
        pid = os.fork()
        if pid:
            return pid
        try:  # the child: never returns
            fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(self.root)
            sys.path.insert(0, str(self.root))
            import pytest

            code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *paths])
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(code))
        except BaseException:  # noqa: BLE001 - a child must never return into the parent's loop
            os._exit(99)


def check_baseline(space: Workspace, stages) -> None:
    """Run every stage on the copy with no mutant: each must pass.

    A stage that fails without any mutant (a file the copy lacks, a test
    broken on this machine) would make every mutant look killed: a score of
    100% that means nothing. So a failing baseline ends the run, naming the
    stage and its output.

    Raises:
        SystemExit: a stage failed or outlasted its timeout unmutated.
    """
    for name, paths, timeout in stages:
        paths = [p for path in paths for p in (_CONFORMANCE["scheduler"] if path == "{side}" else (path,))]
        pid = space.fork_stage(paths)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise SystemExit(f"stage {name!r} outlasted its {timeout:g} s without any mutant")
            time.sleep(0.05)
        if os.waitstatus_to_exitcode(status) != 0:
            tail = space.log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"stage {name!r} fails without any mutant, so no score would mean anything:\n{tail}")
        print(f"baseline: stage {name} passes unmutated", flush=True)


def run_all(mutants: list[Mutant], stages, jobs: int, show: bool, on_result) -> list[Result]:
    """Test every mutant, `jobs` at a time, each stage a forked pytest run."""
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="trioflow-mutants-") as scratch:
        free = [Workspace(pathlib.Path(scratch), f"job-{i}") for i in range(max(1, jobs))]
        check_baseline(free[0], stages)
        todo = list(mutants)
        running: dict[int, tuple[Workspace, Mutant, int, float, float]] = {}  # pid -> (space, mutant, stage, started, deadline)

        def start(space: Workspace, mutant: Mutant, stage: int, started: float) -> None:
            name, paths, timeout = stages[stage]
            side = "worker" if pathlib.Path(mutant.path).name.startswith("worker_") else "scheduler"
            paths = [p for path in paths for p in (_CONFORMANCE[side] if path == "{side}" else (path,))]
            pid = space.fork_stage(paths)
            running[pid] = (space, mutant, stage, started, time.monotonic() + timeout)

        def finish(space: Workspace, mutant: Mutant, outcome: str, stage: int | None, started: float) -> None:
            output = space.log.read_text(errors="replace") if space.log.exists() else ""
            space.plant(None, mutant)
            result = Result(mutant, outcome, None if stage is None else stages[stage][0], time.monotonic() - started, output)
            results.append(result)
            free.append(space)
            on_result(result, len(results))

        try:
            _loop(todo, running, free, stages, show, start, finish)
        finally:
            for pid in running:  # interrupted: no child outlives this run
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    return results


def _loop(todo, running, free, stages, show, start, finish) -> None:
    """Start stages as workspaces free up; judge each stage as it ends."""
    while todo or running:
        while free and todo:
            space, mutant = free.pop(), todo.pop(0)
            space.plant(mutant)
            start(space, mutant, 0, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.monotonic()
            for pid, (space, mutant, stage, started, deadline) in list(running.items()):
                if now > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    del running[pid]
                    finish(space, mutant, "timeout", stage, started)
            time.sleep(0.05)
            continue
        if pid not in running:
            continue
        space, mutant, stage, started, _ = running.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if show:
            print(f"--- {mutant.id}, stage {stages[stage][0]}: exit {code}\n{space.log.read_text(errors='replace')[-4000:]}")
        if code != 0:
            finish(space, mutant, "killed", stage, started)
        elif stage + 1 < len(stages):
            start(space, mutant, stage + 1, started)
        else:
            finish(space, mutant, "survived", None, started)


def read_equivalent() -> dict[str, str]:
    """``{mutant id: why it is equivalent}`` from `equivalent.txt`."""
    judged = {}
    if EQUIVALENT_FILE.exists():
        for line in EQUIVALENT_FILE.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                mutant_id, _, reason = line.partition(" ")
                judged[mutant_id] = reason.strip()
    return judged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--file", action="append", help="only mutants of this file of trioflow/core (repeatable)")
    parser.add_argument("--only", action="append", metavar="ID", help="only this mutant (repeatable)")
    parser.add_argument("--sample", type=int, metavar="N", help="a random sample of N mutants")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--stages", default=",".join(s[0] for s in STAGES), help="stages to run, in order")
    parser.add_argument("--show", action="store_true", help="print each stage's pytest output")
    parser.add_argument("--json", metavar="FILE", help="write every result to FILE")
    args = parser.parse_args(argv)

    files = sorted(CORE.glob("*.py"))
    if args.file:
        files = [f for f in files if f.name in args.file]
    mutants = find_mutants(files)
    if args.only:
        mutants = [m for m in mutants if m.id in args.only]
        if not mutants:
            parser.error("no mutant has that id (see --list)")
    if args.sample is not None:
        mutants = sorted(random.Random(args.seed).sample(mutants, min(args.sample, len(mutants))), key=mutants.index)
    if args.list:
        for mutant in mutants:
            print(f"{mutant.id}\t{mutant.describe()}")
        print(f"{len(mutants)} mutants", file=sys.stderr)
        return 0
    stages = [s for name in args.stages.split(",") for s in STAGES if s[0] == name]
    equivalent = read_equivalent()

    started = time.monotonic()

    def on_result(result: Result, n: int) -> None:
        mark = {"killed": "killed", "timeout": "timeout", "survived": "SURVIVED"}[result.outcome]
        where = f" by {result.stage}" if result.stage else ""
        tag = " (judged equivalent)" if result.mutant.id in equivalent else ""
        print(f"[{n}/{len(mutants)}] {mark}{where} {result.seconds:.1f}s {result.mutant.id}{tag}", flush=True)

    # The test libraries are imported here once; every stage is a fork.
    __import__("hypothesis")
    __import__("pytest")
    __import__("trio")

    results = run_all(mutants, stages, args.jobs, args.show, on_result)
    _report(results, equivalent, time.monotonic() - started)
    if args.json:
        pathlib.Path(args.json).write_text(
            json.dumps(
                [
                    {
                        "id": r.mutant.id,
                        "where": r.mutant.describe(),
                        "outcome": r.outcome,
                        "stage": r.stage,
                        "seconds": round(r.seconds, 2),
                        "equivalent": equivalent.get(r.mutant.id),
                    }
                    for r in results
                ],
                indent=1,
            )
        )
    survivors = [r for r in results if r.outcome == "survived" and r.mutant.id not in equivalent]
    return 1 if survivors else 0


def _report(results: list[Result], equivalent: dict[str, str], wall: float) -> None:
    killed = [r for r in results if r.outcome != "survived"]
    survived = [r for r in results if r.outcome == "survived"]
    judged = [r for r in survived if r.mutant.id in equivalent]
    unjudged = [r for r in survived if r.mutant.id not in equivalent]
    by_stage: dict[str, int] = {}
    for r in killed:
        key = r.stage if r.outcome == "killed" else f"{r.stage} (timeout)"
        by_stage[key] = by_stage.get(key, 0) + 1
    considered = len(results) - len(judged)
    print(f"\n{len(results)} mutants in {wall / 60:.1f} min: {len(killed)} killed "
          f"({', '.join(f'{k} {n}' for k, n in by_stage.items()) or 'none'}), {len(survived)} survived "
          f"({len(judged)} judged equivalent)")
    if considered:
        print(f"score: {len(killed)}/{considered} non-equivalent mutants killed = {100 * len(killed) / considered:.1f}%")
    for r in unjudged:
        print(f"  SURVIVED {r.mutant.id}\n           {r.mutant.describe()}")


if __name__ == "__main__":
    sys.exit(main())
