"""The formal model of trioflow's task lifecycle, as executable Python.

Rules of this package:

* It imports nothing from `trioflow` (design.md §2). It is a second,
  independent statement of what the core must do; `tests/properties/`
  holds the model and the core side by side and checks one against the
  other.
* It is small and slow on purpose: immutable states, one function per rule,
  no cleverness. Its job is to be read and to be explored exhaustively, not
  to schedule anything.

Modules:

* `spec.world`: the vocabulary (states, records, events, the transition
  table).
* `spec.model`: the scheduler-side lifecycle of tasks and the worker set
  (each transition as guard + effect; `apply`).
* `spec.invariants`: what must hold in every state and across every step
  (INV-*), each tied to a row of the failure table in design.md §1.
* `spec.worker_model`: one worker's task states, events and invariants
  (W-INV-*).
* `spec.explore`: breadth-first search over every reachable state of a small
  scope (`python -m spec.explore`).

spec/README.md is the readable form: diagram, table, invariants.
"""
