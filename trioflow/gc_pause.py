"""Importing without the cyclic garbage collector walking what is imported.

Why: importing trio and trioflow creates a few hundred thousand objects that
live as long as the process: modules, classes, functions. The collector
meets them again and again all the same: every 700 new objects it walks the
young ones looking for cycles, and every tenth time the middle generation
too. In a worker process those ~20 collections cost about 8 ms of a start of
about 150 ms (docs/performance.md, W9), and a cluster's start waits for its
slowest worker.

So the collector is paused while importing, and then every tracked object
is handed straight to the oldest generation (`gc.freeze` then
`gc.unfreeze`), where objects that live long end up anyway. Simply pausing
would not do: the first collection after the pause would walk everything the
imports made at once. Nothing is leaked: the oldest generation is still
collected, only less often. In a program that imports trioflow, its own
young objects move too; a cycle among them is freed by the next full
collection instead of the next young one.

This module imports nothing but `gc`, so that it can be the first thing the
package imports.
"""

import gc


class collector_paused:
    """Context manager: no cyclic garbage collection inside the block, and
    every tracked object moves to the oldest generation when it ends.

    Restores the state it found, so a program that had turned the collector
    off keeps it off, and a nested use changes nothing until the outermost
    block ends. A program that froze objects itself (`gc.freeze`, as a
    server does before it forks) keeps them frozen: then nothing is moved.
    """

    def __enter__(self) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc_info: object) -> None:
        if not self._was_enabled:
            return
        if gc.get_freeze_count() == 0:
            gc.freeze()  # every tracked object, young ones included, out of reach...
            gc.unfreeze()  # ...and back, into the oldest generation
        gc.enable()
