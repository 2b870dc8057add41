"""``python -m trioflow ...`` is the `trioflow` command, exit status included."""

import sys

from trioflow.cli import main

sys.exit(main())
