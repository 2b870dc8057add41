"""The version of trioflow, in a module of its own.

`trioflow.__version__` re-exports it, and packaging reads it from here
(pyproject.toml). It lives apart from `trioflow/__init__.py` so that a
module inside the package (the CLI's ``--version``, the performance report)
can name it without importing the package `__init__`, which imports nearly
every module and would close an import circle (tests/test_import_graph.py).
"""

__version__ = "0.1.0"
