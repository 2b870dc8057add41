"""Logging: the library prints nothing by itself; the command line sets up readable logs."""

import logging
import subprocess
import sys

import trioflow


def test_the_library_installs_only_a_null_handler():
    """The "trioflow" logger has one handler, a NullHandler; the application chooses where records go."""
    assert trioflow.__name__ == "trioflow"
    handlers = logging.getLogger("trioflow").handlers
    assert [type(h) for h in handlers] == [logging.NullHandler]


def test_a_warning_of_the_library_prints_nothing_unless_asked():
    """Without the NullHandler, Python's last-resort handler would print this warning to stderr."""
    code = "import logging, trioflow; logging.getLogger('trioflow.scheduler').warning('worker left')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == ""
    configured = "import logging, trioflow; logging.basicConfig(); logging.getLogger('trioflow.scheduler').warning('worker left')"
    done = subprocess.run([sys.executable, "-c", configured], capture_output=True, text=True, timeout=60)
    assert "worker left" in done.stderr
