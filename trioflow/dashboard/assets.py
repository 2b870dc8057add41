"""The page and the performance report, built from the files in ``static/``.

No build step: the files are plain HTML, CSS and JavaScript, read as they
are and inlined into one document each, so the page is one request and the
report one self-contained file. ``stream.js`` (the task-stream drawing) and
``common.css`` are shared by both.

The page's Content-Security-Policy allows exactly its own inline script
(by its SHA-256) and requests to its own origin: nothing else runs there,
and it talks to nobody else.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import re
from importlib import resources
from typing import Any

# A slot of a template: /*STYLE*/, /*SCRIPT*/, /*DATA*/, /*TITLE*/.
_SLOT = re.compile(r"/\*(STYLE|SCRIPT|DATA|TITLE)\*/")


@dataclasses.dataclass(frozen=True)
class Page:
    html: str
    csp: str


def static_text(name: str) -> str:
    """The text of ``static/<name>``."""
    return resources.files("trioflow.dashboard").joinpath("static", name).read_text(encoding="utf-8")


@functools.cache
def dashboard_page() -> Page:
    """The live page, with its style and script inline, and its Content-Security-Policy."""
    script = static_text("stream.js") + "\n" + static_text("dashboard.js")
    html = fill(static_text("dashboard.html"), STYLE=static_text("common.css") + static_text("dashboard.css"), SCRIPT=script)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return Page(html=html, csp=csp)


def report_html(title: str, data: dict[str, Any]) -> str:
    """A performance report: one HTML file holding `data` and what draws it."""
    # No "<" inside a <script> element (no "</script>", no "<!--"): JSON may
    # spell it "\u003c".
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return fill(
        static_text("report.html"),
        STYLE=static_text("common.css") + static_text("report.css"),
        SCRIPT=static_text("stream.js") + "\n" + static_text("report.js"),
        DATA=payload,
        TITLE=_escape(title),
    )


def fill(template: str, **parts: str) -> str:
    """`template` with each ``/*NAME*/`` slot replaced by ``parts[NAME]``, in one pass
    (so a part that happens to contain a slot's text is left alone)."""
    return _SLOT.sub(lambda match: parts[match.group(1)], template)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
