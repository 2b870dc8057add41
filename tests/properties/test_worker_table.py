"""The worker core's transition table lies within `spec/worker_model.py`.

The model has no table: it moves tasks in code (`_Draft.set`, `forget`,
...). So this test watches it move. It explores small scopes of the model
breadth first and notes every change of a task's state, labelled with what
caused it in the core's words (`TaskEvent`): the event being applied, or,
when the move happens inside one of the model's follow-up rules
(`_settle`, `_start`, `_gather`, `give_up_if_hopeless`, `release_inputs`),
that rule. Every (state, event) -> target row of the core's `TRANSITIONS`
must then be a move the model was seen to make, except the few listed in
`OUTSIDE_THE_MODEL`, each with the reason the model does not cover it.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import pathlib

import pytest

from spec import explore
from spec import worker_model as wm
from trioflow.core import worker_state
from trioflow.core.worker_transitions import TRANSITIONS, UNCHANGED, TaskEvent, WorkerTaskState

# The CI scopes of the worker model (spec/explore.py; under a second in
# all): together they make every move of the core's table that the model
# covers.
SCOPES = explore.CI_WORKER_SCOPES

# Rows of the core's table the model has no counterpart for, and why.
OUTSIDE_THE_MODEL = {
    # The model's scheduler never goes away (docs/resilience.md, "The
    # scheduler dies", covers this; tests/core/test_worker_scheduler_lost.py).
    ("waiting", "SchedulerLost", None),
    ("ready", "SchedulerLost", None),
    ("fetch", "SchedulerLost", None),
    # The model's peers can always send a value they hold; the core's can
    # fail to pickle it, and then the tasks that needed it err.
    ("flight", "GatherDone", None),
    ("waiting", "GatherDone", None),
}


def _name(state) -> str | None:
    return None if state is None else state.value


# --------------------------------------------------- watching the model --


class _Watch:
    """Which rule of the model is running, and every move seen so far."""

    def __init__(self):
        self.labels: list[str] = []
        self.moves: set[tuple[str | None, str, str | None]] = set()

    def note(self, before, after) -> None:
        if before is not after:
            self.moves.add((_name(before), self.labels[-1], _name(after)))

    @contextlib.contextmanager
    def label(self, label: str):
        self.labels.append(label)
        try:
            yield
        finally:
            self.labels.pop()


def _watched_tasks(watch: _Watch, tasks: dict) -> dict:
    class Tasks(dict):
        """A draft's task table that tells `watch` of every change of state."""

        def __setitem__(self, key, task):
            old = self.get(key)
            watch.note(None if old is None else old.state, task.state)
            super().__setitem__(key, task)

        def pop(self, key, *default):
            if key in self:
                watch.note(self[key].state, None)
            return super().pop(key, *default)

    return Tasks(tasks)


def _labelled(watch: _Watch, label, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with watch.label(label(*args) if callable(label) else label):
            return function(*args, **kwargs)

    return wrapper


def model_moves(scopes=SCOPES) -> set[tuple[str | None, str, str | None]]:
    """Every (state, cause, state) move the model makes in `scopes`."""
    watch = _Watch()
    with pytest.MonkeyPatch.context() as mp:
        init, copy = wm._Draft.__init__, wm._Draft.copy

        def watched_init(self, scope, w):
            init(self, scope, w)
            self.tasks = _watched_tasks(watch, self.tasks)

        def watched_copy(self):
            other = copy(self)
            other.tasks = _watched_tasks(watch, other.tasks)
            return other

        mp.setattr(wm._Draft, "__init__", watched_init)
        mp.setattr(wm._Draft, "copy", watched_copy)
        # The event's own effect, then the follow-ups, each under its name.
        mp.setattr(wm, "_effects", _labelled(watch, lambda d, pre, ev: type(ev).__name__, wm._effects))
        mp.setattr(wm, "_settle", _labelled(watch, TaskEvent.INPUTS_HERE.value, wm._settle))
        mp.setattr(wm, "_start", _labelled(watch, TaskEvent.THREAD_FREE.value, wm._start))
        mp.setattr(wm, "_gather", _labelled(watch, TaskEvent.PEER_FREE.value, wm._gather))
        hopeless = _labelled(watch, TaskEvent.HOPELESS.value, wm._Draft.give_up_if_hopeless)
        mp.setattr(wm._Draft, "give_up_if_hopeless", hopeless)
        unneeded = _labelled(watch, TaskEvent.UNNEEDED.value, wm._Draft.release_inputs)
        mp.setattr(wm._Draft, "release_inputs", unneeded)
        for name in scopes:
            result = explore.explore_worker(name, wm.SCOPES[name])
            assert result.violation is None, result.violation
    return watch.moves


def core_rows(table=TRANSITIONS) -> set[tuple[str | None, str, str | None]]:
    return {
        (_name(before), event.value, _name(after))
        for (before, event), targets in table.items()
        for after in targets
    }


@pytest.fixture(scope="module")
def moves():
    return model_moves()


# ------------------------------------------------------------------ tests --


def test_the_table_is_spelled_as_the_model():
    """States and model events of the table carry the model's names."""
    assert [s.value for s in WorkerTaskState] == [s.value for s in wm.WState]
    assert [s.name for s in WorkerTaskState] == [s.name for s in wm.WState]
    model_events = {cls.__name__ for cls in wm.WEvent.__args__} - {"Pause", "Resume"}
    assert model_events <= {e.value for e in TaskEvent}


def test_every_row_of_the_core_table_is_a_move_of_the_model(moves):
    """Each (state, event) -> target the core allows is one the model makes,
    but for the rows listed (with why) in OUTSIDE_THE_MODEL."""
    outside = core_rows() - moves
    assert outside == OUTSIDE_THE_MODEL


def test_a_row_the_model_forbids_is_caught(moves):
    """A planted row (a cancelled task resumed as merely ready: it would run
    a second time) is reported as outside the model."""
    planted = {**TRANSITIONS, (WorkerTaskState.CANCELLED, TaskEvent.COMPUTE): (WorkerTaskState.READY,)}
    assert core_rows(planted) - moves == OUTSIDE_THE_MODEL | {("cancelled", "Compute", "ready")}


def test_the_moves_the_core_never_makes_are_known(moves):
    """A move the model makes and the core's table has no row for is one of
    these known, documented differences (not all arise in the CI scopes)."""
    assert moves - core_rows() <= {
        # A task here needs the value of one that fails, or is freed, before
        # it ran: the model turns it into a fetch nobody can serve, so that
        # the dependent is reported missing ("abandon"). The core forgets it
        # (or keeps it, freed); the scheduler never sends those orders
        # (`scheduler_never_sends` in test_worker_conformance.py).
        ("executing", "ExecutionDone", "fetch"),
        ("waiting", "Free", "fetch"),
        ("waiting", "Hopeless", "fetch"),
        # A compute request held back while the value was in flight, applied
        # when the fetch fails: the model creates the input records under the
        # peer's answer, the core under the request's name (None -> fetch on
        # Compute, a row the model makes too).
        (None, "GatherDone", "fetch"),
        (None, "GatherFailed", "fetch"),
    }


def test_every_unchanged_pair_gives_a_reason():
    """Each UNCHANGED row is a (state or None, TaskEvent) pair with a reason."""
    for (state, event), reason in UNCHANGED.items():
        assert isinstance(event, TaskEvent) and (state is None or isinstance(state, WorkerTaskState))
        assert len(reason) > 20


def test_only_move_changes_a_task_state():
    """In worker_state.py, `ts.state` is assigned in one place: `_move`."""
    tree = ast.parse(pathlib.Path(worker_state.__file__).read_text())
    writers = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            for node in ast.walk(fn):
                targets = node.targets if isinstance(node, ast.Assign) else []
                for target in targets:
                    for t in ast.walk(target):
                        if isinstance(t, ast.Attribute) and t.attr == "state":
                            writers.append(fn.name)
    # WorkerTask.__init__ gives a new record its first state; `_new` checks it.
    assert sorted(writers) == ["__init__", "_move"]


def test_records_are_born_in_new_and_die_in_forget():
    """In worker_state.py, `tasks` gains a record only in `_new` and loses one only in `_forget`."""
    tree = ast.parse(pathlib.Path(worker_state.__file__).read_text())

    def is_tasks(node) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "tasks"

    changers = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        for node in ast.walk(fn):
            targets = []
            if isinstance(node, (ast.Assign, ast.Delete)):
                targets = node.targets
            if any(isinstance(t, ast.Subscript) and is_tasks(t.value) for t in targets):
                changers.append(fn.name)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if is_tasks(node.func.value) and node.func.attr in ("pop", "popitem", "clear", "update", "setdefault"):
                    changers.append(fn.name)
    assert sorted(changers) == ["_forget", "_new"]
