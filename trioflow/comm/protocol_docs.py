"""The op tables of docs/protocol.md, written from the declarations.

docs/protocol.md explains the protocol in prose; its tables of ops (every
field, its type and bounds, who sends it to whom, what a request's reply
holds) are generated from `trioflow.comm.messages`, between two marker
lines, so they cannot drift from the code: tests/comm/test_protocol_docs.py
fails when they differ. To bring the page up to date after changing a
declaration::

    python -m trioflow.comm.protocol_docs --write docs/protocol.md
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import trioflow.comm.messages as m
from trioflow.comm.schema import REQUIRED, Record

BEGIN = "<!-- BEGIN generated op tables (python -m trioflow.comm.protocol_docs --write docs/protocol.md) -->"
END = "<!-- END generated op tables -->"

# The order channels are presented in, with a heading each.
SECTIONS = [
    (m.HELLO, "The first message (connecting side → any server)"),
    (m.CLIENT_TO_SCHEDULER, "Client → scheduler"),
    (m.SCHEDULER_TO_CLIENT, "Scheduler → client"),
    (m.WORKER_TO_SCHEDULER, "Worker → scheduler"),
    (m.SCHEDULER_TO_WORKER, "Scheduler → worker"),
    (m.PEER_TO_WORKER, "Peer or client → worker (its own data port)"),
    (m.WORKER_TO_PEER, "Worker → peer or client"),
    (m.SCHEDULER_TO_NANNY, "Scheduler → nanny (its control port)"),
    (m.NANNY_TO_SCHEDULER, "Nanny → scheduler"),
]


def _fields(record: type[Record]) -> str:
    parts = []
    for name, (kind, default) in record.FIELDS.items():
        text = f"`{name}`: {kind.describe()}"
        if default is not REQUIRED:
            text += f" (optional, default {default!r})"
        parts.append(text)
    return "; ".join(parts) if parts else "—"


def _doc(cls: type) -> str:
    text = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(text.split())


def tables() -> str:
    """The markdown of every channel's ops."""
    out: list[str] = [BEGIN, ""]
    for channel, heading in SECTIONS:
        ops = [cls for cls in m.OPS.values() if channel in cls.CHANNELS and cls is not m.Reply]
        out += [f"### {heading}", "", f"Channel `{channel}`.", ""]
        out += ["| op | fields | reply | what it means |", "|---|---|---|---|"]
        for cls in ops:
            reply = m.reply_kind(cls, channel)
            reply_text = _fields(reply) if reply is not None else "—"
            out.append(f"| `{cls.OP}` | {_fields(cls)} | {reply_text} | {_doc(cls)} |")
        if channel in m.SERVER_TO_CONNECTOR or channel == m.WORKER_TO_SCHEDULER:
            out.append("| `reply` | `request_id`, then the reply's fields, or `error`: text | — | the answer to a request |")
        out.append("")
    out += ["### Records inside messages", "", "| record | fields |", "|---|---|"]
    for record in (m.TaskWire, m.UserFailure, m.KilledWorkerFailure, m.LostDataFailure, m.CancelledFailure,
                   m.RunOutcome, m.SchedulerInfo, m.WorkerInfo, m.TaskRun, m.ClusterEvent):
        name = record.__name__ if record.TAG is None else f"{record.__name__} (`{record.TAG[0]}`: `{record.TAG[1]!r}`)"
        out.append(f"| {name} | {_fields(record)} |")
    out += ["", END]
    return "\n".join(out)


def replace_tables(page: str) -> str:
    """`page` with its generated section replaced by the current tables."""
    start, end = page.index(BEGIN), page.index(END) + len(END)
    return page[:start] + tables() + page[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", metavar="PAGE", help="rewrite the generated section of PAGE in place")
    args = parser.parse_args(argv)
    if args.write:
        path = pathlib.Path(args.write)
        path.write_text(replace_tables(path.read_text()))
    else:
        sys.stdout.write(tables() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
