"""``python -m trioflow ...`` is the `trioflow` command, exit status included."""

import sys

from trioflow.gc_pause import collector_paused

with collector_paused():  # the command's own imports (`trioflow.gc_pause` says why)
    from trioflow.cli import main

sys.exit(main())
