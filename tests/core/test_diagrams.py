"""docs/state-machines.md's diagrams are the cores' transition tables."""

from pathlib import Path

from trioflow.core import diagrams, scheduler_transitions, worker_transitions
from trioflow.core.scheduler_records import TaskState
from trioflow.core.worker_transitions import TaskEvent, WorkerTaskState

PAGE = Path(__file__).resolve().parents[2] / "docs" / "state-machines.md"


def test_the_page_shows_the_tables_as_they_are():
    """The generated section of docs/state-machines.md equals what the tables give."""
    page = PAGE.read_text()
    assert page == diagrams.replace_diagrams(page), (
        "docs/state-machines.md is out of date: run python -m trioflow.core.diagrams --write docs/state-machines.md"
    )


def test_every_row_is_an_arrow():
    """Each scheduler row is an arrow named by its method; each worker row's
    targets are arrows naming its event."""
    scheduler = diagrams.scheduler_diagram()
    for (source, target), method in scheduler_transitions.TRANSITIONS.items():
        arrow = f"{source.value.replace('-', '_')} --> {target.value.replace('-', '_')}: {method.__name__}"
        assert arrow in scheduler, arrow
    worker = diagrams.worker_diagram()
    for (source, event), targets in worker_transitions.TRANSITIONS.items():
        for target in targets:
            start = "[*]" if source is None else source.value
            end = "[*]" if target is None else target.value
            line = next(x for x in worker.splitlines() if x.startswith(f"    {start} --> {end}: "))
            assert event.value in line.split(": ", 1)[1].split(", "), (source, event, target)


def test_a_new_row_changes_the_diagrams(monkeypatch):
    """A row added to either table shows (the check has teeth)."""
    before = diagrams.diagrams()
    rows = dict(scheduler_transitions.TRANSITIONS)
    rows[TaskState.LOST, TaskState.WAITING] = rows[TaskState.MEMORY, TaskState.WAITING]
    monkeypatch.setattr(scheduler_transitions, "TRANSITIONS", rows)
    assert "lost --> waiting: _memory_to_waiting" in diagrams.diagrams() != before
    worker_rows = dict(worker_transitions.TRANSITIONS)
    worker_rows[WorkerTaskState.MEMORY, TaskEvent.STEAL] = (None,)
    monkeypatch.setattr(worker_transitions, "TRANSITIONS", worker_rows)
    assert "Steal" in next(x for x in diagrams.worker_diagram().splitlines() if x.startswith("    memory --> [*]: "))
