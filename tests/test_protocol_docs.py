"""docs/protocol.md's op tables are the declarations of trioflow/comm/messages.py."""

from pathlib import Path

from trioflow.comm import messages
from trioflow.comm.protocol_docs import BEGIN, END, replace_tables, tables

PAGE = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def test_the_protocol_page_shows_every_declared_op_as_declared():
    """The generated section of docs/protocol.md equals what the declarations give."""
    page = PAGE.read_text()
    assert page == replace_tables(page), (
        "docs/protocol.md is out of date: run python -m trioflow.comm.protocol_docs --write docs/protocol.md"
    )


def test_every_op_appears_in_the_tables():
    """Each op of messages.OPS has a row (a new op cannot be left out)."""
    generated = tables()
    for op in messages.OPS:
        if op != "reply":
            assert f"| `{op}` |" in generated, op
    assert generated.startswith(BEGIN) and generated.endswith(END)


def test_a_changed_declaration_makes_the_page_stale():
    """Changing a bound in a declaration changes the tables (the check has teeth)."""
    before = tables()
    old = messages.Replicate.FIELDS["n"]
    messages.Replicate.FIELDS["n"] = (messages.Int(1, 7), old[1])
    try:
        assert tables() != before
        assert "an int between 1 and 7" in tables()
    finally:
        messages.Replicate.FIELDS["n"] = old
