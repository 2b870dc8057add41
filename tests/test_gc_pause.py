"""Importing trioflow runs no garbage collection and leaves the collector as it was.

trioflow/gc_pause.py says why: every worker process imports trio and
trioflow before it can serve, and the collector walking those imports cost
about 8 ms of each start.
"""

import gc
import os
import subprocess
import sys
import textwrap

import pytest

import trioflow
from trioflow.gc_pause import collector_paused


@pytest.fixture
def collector_as_found():
    """Put the collector back as this process had it, whatever a test did."""
    was_enabled = gc.isenabled()
    yield
    gc.unfreeze()
    if was_enabled:
        gc.enable()
    else:
        gc.disable()


class Node:
    """A tracked object that can sit in a cycle."""

    def __init__(self):
        self.other = self


def generation_of(obj) -> int | None:
    for generation in range(3):
        if any(o is obj for o in gc.get_objects(generation=generation)):
            return generation
    return None


def test_the_collector_is_paused_inside_and_enabled_after(collector_as_found):
    gc.enable()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_what_the_block_made_lands_in_the_oldest_generation(collector_as_found):
    gc.enable()
    with collector_paused():
        made = Node()
        assert generation_of(made) == 0
    assert generation_of(made) == 2
    assert gc.get_freeze_count() == 0  # nothing left out of the collector's reach


def test_garbage_made_inside_is_still_collected(collector_as_found):
    gc.enable()
    with collector_paused():
        cycle = Node()
    ids = {id(cycle)}
    del cycle
    gc.collect()
    assert not ids & {id(o) for o in gc.get_objects()}


def test_a_collector_turned_off_stays_off(collector_as_found):
    gc.disable()
    with collector_paused():
        made = Node()
    assert not gc.isenabled()
    assert generation_of(made) == 0  # nothing moved either


def test_nested_blocks_leave_it_paused_until_the_outermost_ends(collector_as_found):
    gc.enable()
    with collector_paused():
        with collector_paused():
            pass
        assert not gc.isenabled()
    assert gc.isenabled()


def test_an_error_in_the_block_still_restores_the_collector(collector_as_found):
    gc.enable()
    with pytest.raises(KeyError), collector_paused():
        raise KeyError("x")
    assert gc.isenabled()


def test_objects_the_program_froze_stay_frozen(collector_as_found):
    gc.enable()
    gc.freeze()
    frozen = gc.get_freeze_count()
    assert frozen > 0
    with collector_paused():
        Node()
    assert gc.get_freeze_count() == frozen
    assert gc.isenabled()


IMPORT_AND_COUNT = textwrap.dedent(
    """
    import atexit, gc, os, sys

    # Collections are counted until the command's `main` is called: what
    # runs before it is importing; what runs after is the command's work.
    main_called = []

    def watch(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_name == "main" and code.co_filename.endswith(os.path.join("trioflow", "cli.py")):
            main_called.append(True)
            sys.setprofile(None)

    sys.setprofile(watch)
    runs = []
    gc.callbacks.append(lambda phase, info: phase == "start" and not main_called and runs.append(info))
    atexit.register(lambda: print(len(runs), gc.isenabled(), gc.get_freeze_count(), bool(main_called)))
    {imports}
    """
)


@pytest.mark.parametrize(
    "imports",
    [
        "import trioflow",
        # `python -m trioflow worker ...` up to parsing its arguments (the
        # command exits there, printing the version).
        "sys.argv = ['trioflow', '--version']\nimport trioflow.__main__",
    ],
    ids=["package", "command"],
)
def test_importing_trioflow_in_a_fresh_process_runs_no_collection(imports, tmp_path):
    """No collection runs while trioflow's modules are imported, and the
    collector is on, with nothing frozen, once they are.

    With bytecode, as an installed package has it: compiling a module makes
    garbage before its first line runs, so a checkout without `__pycache__`
    (and PYTHONDONTWRITEBYTECODE set) would count that instead. The bytecode
    goes to a cache of the test's own, never into the source tree.
    """
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path)}
    package = os.path.dirname(trioflow.__file__)
    subprocess.run([sys.executable, "-m", "compileall", "-q", package], env=env, check=True, timeout=120)
    code = IMPORT_AND_COUNT.format(imports=imports)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    last = done.stdout.strip().splitlines()[-1]
    expected = "0 True 0 True" if "__main__" in imports else "0 True 0 False"
    assert last == expected, (done.stdout, done.stderr)
