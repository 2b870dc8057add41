"""Ask Linux not to let a woken trioflow thread preempt the running one.

Every message and every task in trioflow wakes a thread: a worker's loop
wakes a task thread to run a function and is woken by it for the result;
a client's loop and a scheduler's loop wake each other; a process wakes
another through a socket. With more runnable threads than cores (two
workers, a scheduler and a client on two cores, in the benchmarks), Linux
by default lets the woken thread preempt the one that woke it. The waker
is usually a Python thread in the middle of its work, holding the GIL; if
the woken thread is in the same process it can do nothing but wait for
the GIL and switch back, and if it is in another process it takes the
core from a thread that was about to finish and block on its own. Each
such wake-up costs two context switches and leaves the caches colder.

Under ``SCHED_BATCH`` a thread gets the same share of the CPU as under the
default policy, but its wake-up never preempts: it runs when a core falls
idle or at the running thread's next tick. The thread that woke it goes on
to its next wait (where it lets go of the GIL) instead. Measured on two
cores, alternating runs of the same minutes (docs/performance-history.md,
"The fifth round"): W1 3,124-3,552 -> 3,786-4,143 tasks/s, W3 3,269-3,287 ->
3,687-3,957, with less CPU a task in every process.

What it changes for users: nothing on a machine with idle cores, where a
woken thread gets one at once. Task functions run in batch threads, and
threads and processes they start inherit the policy (Linux resets only
real-time policies on fork). The threads a program creates itself are
never touched: only those trioflow starts (`LoopThread`, `ThreadExecutor`)
and the main thread of a ``trioflow`` command. One shared pool inherits
it too: Trio's cache of threads for blocking calls (``trio.to_thread``,
``open_process``) is per process, and a cached thread first started by a
trioflow loop thread is batch. `Config.batch_threads` turns it all off.
"""

from __future__ import annotations

import os


def make_this_thread_batch(batch: bool = True) -> bool:
    """Put the calling thread under ``SCHED_BATCH`` (`batch`) or the default
    policy (not `batch`); return whether it is under ``SCHED_BATCH`` now.

    Both ways, because a thread inherits its creator's policy: a worker
    process started from a batch thread begins batch, and with
    `Config.batch_threads` off it must not stay so. A thread under a
    real-time or idle policy (someone's deliberate choice) keeps it.
    Elsewhere than Linux, or where the call is refused (a sandbox), nothing
    changes and nothing is raised.
    """
    try:
        policy = os.sched_getscheduler(0)
        wanted = os.SCHED_BATCH if batch else os.SCHED_OTHER
        if policy in (os.SCHED_OTHER, os.SCHED_BATCH) and policy != wanted:
            os.sched_setscheduler(0, wanted, os.sched_param(0))
            policy = wanted
        return policy == os.SCHED_BATCH
    except (AttributeError, OSError):  # not Linux, or not allowed here
        return False
