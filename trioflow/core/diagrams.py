"""The state diagrams of docs/state-machines.md, drawn from the cores' tables.

A diagram drawn by hand drifts from the code the first time a row is added.
These are Mermaid diagrams (GitHub renders them; any Mermaid viewer does)
written from `scheduler_transitions.TRANSITIONS` (the scheduler's view of a
task: which moves exist, and the method that makes each) and
`worker_transitions.TRANSITIONS` (a worker's record of a key: which event
may move it where), between two marker lines of the page.
tests/core/test_diagrams.py fails when the page differs. After changing a
table::

    python -m trioflow.core.diagrams --write docs/state-machines.md
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections import defaultdict

from trioflow.core import scheduler_transitions, worker_transitions

BEGIN = "<!-- BEGIN generated diagrams (python -m trioflow.core.diagrams --write docs/state-machines.md) -->"
END = "<!-- END generated diagrams -->"

# Mermaid's name for "no record" (the start and the end of a record's life).
_NO_RECORD = "[*]"


def _node(state: str) -> str:
    """A Mermaid id for a state (ids cannot hold a hyphen: no-worker)."""
    return state.replace("-", "_")


def _names(states: list[str]) -> list[str]:
    """Declarations that show a state under its own spelling where its id differs."""
    return [f'    state "{name}" as {_node(name)}' for name in states if _node(name) != name]


def scheduler_diagram() -> str:
    """The scheduler's task states; an arrow per table row, named by its method."""
    table = scheduler_transitions.TRANSITIONS
    lines = ["```mermaid", "stateDiagram-v2"]
    lines += _names(sorted({state.value for pair in table for state in pair}))
    for (source, target), method in table.items():
        lines.append(f"    {_node(source.value)} --> {_node(target.value)}: {method.__name__}")
    lines.append(f"    {_NO_RECORD} --> released: submitted")
    lines.append("```")
    return "\n".join(lines)


def worker_diagram() -> str:
    """A worker's record of a key; an arrow per (state, target), naming every
    event that may make that move. Events that leave a record as it is
    (`worker_transitions.UNCHANGED`) draw nothing."""
    events: dict[tuple[str, str], list[str]] = defaultdict(list)
    for (source, event), targets in worker_transitions.TRANSITIONS.items():
        for target in targets:
            start = _NO_RECORD if source is None else source.value
            end = _NO_RECORD if target is None else target.value
            events[start, end].append(event.value)
    lines = ["```mermaid", "stateDiagram-v2"]
    for (start, end), names in events.items():
        lines.append(f"    {start} --> {end}: {', '.join(names)}")
    lines.append("```")
    return "\n".join(lines)


def diagrams() -> str:
    """The generated section of the page, markers included."""
    rows = len(scheduler_transitions.TRANSITIONS)
    worker_rows = len(worker_transitions.TRANSITIONS)
    return "\n\n".join(
        [
            BEGIN,
            f"### The scheduler's view of a task ({rows} moves)",
            scheduler_diagram(),
            f"### A worker's record of a key ({worker_rows} rows; `[*]`: no record)",
            worker_diagram(),
            END,
        ]
    )


def replace_diagrams(page: str) -> str:
    """`page` with its generated section rewritten.

    Raises:
        ValueError: the page lacks the marker lines.
    """
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the page has no generated section (lines {BEGIN!r} ... {END!r})")
    return page[:start] + diagrams() + page[end + len(END) :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", metavar="PAGE", help="rewrite the generated section of PAGE in place")
    args = parser.parse_args(argv)
    if args.write:
        path = pathlib.Path(args.write)
        path.write_text(replace_diagrams(path.read_text()))
    else:
        sys.stdout.write(diagrams() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
