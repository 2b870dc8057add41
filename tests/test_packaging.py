"""What a fresh install needs: every import is declared in pyproject.toml.

CI installs trioflow into a fresh virtual environment with the README's
command, so an import that pyproject.toml does not declare fails there. These
tests fail earlier and say which import it is, even on a machine where the
package happens to be installed by hand.

The rule they check:

* an import at module level (anywhere outside a function) of `trioflow/` is
  needed by ``import trioflow...``: its distribution must be a run-time
  dependency;
* an import inside a function runs only when that feature is used: it may
  come from an optional extra instead;
* a test module may also use the ``test`` extra; anything else it uses must
  come through ``pytest.importorskip`` with a reason saying what to install.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import trioflow

ROOT = Path(__file__).resolve().parent.parent


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalize(re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0])


def declared_requirements(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, set[str]]:
    """``{"": run-time distributions, extra: its distributions}``, names normalized."""
    project = tomllib.loads(pyproject.read_text())["project"]
    declared = {"": {_requirement_name(r) for r in project.get("dependencies", [])}}
    for extra, requirements in project.get("optional-dependencies", {}).items():
        declared[extra] = {_requirement_name(r) for r in requirements}
    return declared


def third_party_imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(top-level module, line, inside a function?)`` for each import in `path`."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            else:
                names = []
            for name in names:
                top = name.partition(".")[0]
                if top not in sys.stdlib_module_names and top not in ("__future__", "trioflow", "tests", "spec"):
                    found.append((top, child.lineno, in_function))
            visit(child, nested)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def distributions_of(module: str) -> set[str]:
    """The installed distributions that provide `module` (normalized names).

    A module no installed distribution provides is taken to come from the
    distribution of the same name, so an optional extra that is not installed
    here is still recognised when it is declared.
    """
    providers = importlib.metadata.packages_distributions().get(module)
    return {_normalize(d) for d in providers} if providers else {_normalize(module)}


def undeclared_imports(files: list[Path], always: set[str], optional: set[str]) -> list[str]:
    """A line per import whose distribution is not declared where it must be.

    Args:
        always: distributions a module-level import may come from.
        optional: distributions that an import inside a function may come
            from as well (optional extras).
    """
    problems = []
    for path in files:
        for module, line, in_function in third_party_imports(path):
            allowed = always | optional if in_function else always
            providers = distributions_of(module)
            if not providers & allowed:
                where = "inside a function" if in_function else "at module level"
                problems.append(
                    f"{path.relative_to(path.parents[1]) if len(path.parents) > 1 else path}:{line} "
                    f"imports {module!r} {where}, from {sorted(providers)}, "
                    f"which pyproject.toml does not declare there"
                )
    return problems


def test_trioflow_imports_only_declared_packages():
    """Module-level imports of trioflow/ are run-time dependencies; lazy ones may be extras."""
    declared = declared_requirements()
    extras = set().union(*(v for k, v in declared.items() if k))
    files = sorted((ROOT / "trioflow").rglob("*.py"))
    assert files
    assert undeclared_imports(files, declared[""], extras) == []


def test_tests_import_only_what_the_test_extra_installs():
    """What a test module imports at the top is installed by `.[test]`."""
    declared = declared_requirements()
    files = sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "spec").rglob("*.py"))
    assert undeclared_imports(files, declared[""] | declared["test"], set().union(*declared.values())) == []


def test_the_check_catches_an_undeclared_import(tmp_path):
    """A planted import of an undeclared package is reported, with its line."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "mod.py").write_text("import trio\nimport yaml_not_declared\n\ndef f():\n    import numpy\n")
    declared = declared_requirements()
    problems = undeclared_imports([package / "mod.py"], declared[""], {"numpy"})
    assert len(problems) == 1
    assert "mod.py:2" in problems[0] and "yaml_not_declared" in problems[0]
    # The same lazy import is an error where no extra may provide it.
    assert len(undeclared_imports([package / "mod.py"], declared[""], set())) == 2


def test_importorskip_says_what_to_install():
    """Every pytest.importorskip in the tests gives a reason naming what to install."""
    bare = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "importorskip"
            ):
                reason = next((k.value for k in node.keywords if k.arg == "reason"), None)
                if not (isinstance(reason, ast.Constant) and "install" in str(reason.value)):
                    bare.append(f"{path.name}:{node.lineno}")
    assert bare == []


def _cli(*args: str, module: bool) -> subprocess.CompletedProcess:
    if module:
        command = [sys.executable, "-m", "trioflow", *args]
    else:
        command = [str(Path(sys.executable).with_name("trioflow")), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args",
    [("--version",), ("--help",), (), ("worker", "--nthreads", "zero", "tcp://127.0.0.1:1"), ("nonsense",)],
    ids=["version", "help", "no-command", "bad-flag", "unknown-command"],
)
def test_python_dash_m_trioflow_is_the_trioflow_command(args):
    """`python -m trioflow` prints and exits exactly as the `trioflow` script does."""
    script = Path(sys.executable).with_name("trioflow")
    if not script.exists():
        pytest.skip(f"no trioflow script beside {sys.executable}: install with pip install -e '.[test]'")
    as_module, as_script = _cli(*args, module=True), _cli(*args, module=False)
    assert (as_module.returncode, as_module.stdout, as_module.stderr) == (
        as_script.returncode,
        as_script.stdout,
        as_script.stderr,
    )


def test_version_flag_prints_the_version():
    """`trioflow --version` prints the package's version and exits 0."""
    done = _cli("--version", module=True)
    assert done.returncode == 0
    assert done.stdout.strip() == f"trioflow {trioflow.__version__}"
    assert importlib.metadata.version("trioflow") == trioflow.__version__


def test_a_command_parses_the_same_with_only_its_own_flags():
    """`build_parser(command)` (what a worker process builds as it starts)
    reads that command's arguments exactly as the whole parser does."""
    from trioflow.cli import build_parser

    cases = [
        ["worker", "tcp://127.0.0.1:1", "--no-nanny", "--nthreads", "2", "--memory-limit", "1GB",
         "--heartbeat-interval", "0.5", "--no-work-stealing", "--parent-pid", "7"],
        ["nanny", "tcp://127.0.0.1:1", "--resources", "GPU=2", "--warm-buffer-bytes", "64MiB"],
        ["scheduler", "--port", "0", "--worker-ttl", "30"],
        ["chaos", "--seeds", "3"],
        ["demo"],
    ]
    for argv in cases:
        assert vars(build_parser(argv[0]).parse_args(argv)) == vars(build_parser().parse_args(argv)), argv
    assert build_parser("worker").format_help() == build_parser().format_help()
