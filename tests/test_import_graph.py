"""No two modules of trioflow import each other, directly or around a circle.

An import circle is a knot a reader cannot untie: neither module can be read
(or tested, or moved) without the other, and whichever is imported first sees
the other half-initialised, so a name that exists at rest is missing at
import time. The layers of design.md §2 say who may import whom; this test
checks the consequence that matters most, that the arrows all point one way.

How the graph is built, and why:

- Every `import` and `from ... import` statement counts, wherever it stands.
  An import moved inside a function still ties the two modules together; it
  only postpones the moment the knot is felt.
- Imports under `if TYPE_CHECKING:` do not count: they never run, and
  annotations are how a lower module names a higher type without needing it.
- `from pkg import name` points at the submodule `pkg.name` when there is
  one, and at `pkg` (its `__init__`) otherwise: `from trioflow.comm import
  messages` depends on `messages`, while `from trioflow import Client`
  depends on the package `__init__` and, through it, on everything it
  re-exports.
- The import of a module's parent packages that Python performs implicitly
  is not an arrow. A package `__init__` that re-exports its children would
  otherwise sit in a circle with each of them by construction, and the rule
  we want is the one a reader can follow: a submodule imports from the module
  that defines a name, never from a package `__init__` that re-exports it.
"""

import ast
import pathlib
import textwrap

import trioflow

ROOT = pathlib.Path(trioflow.__file__).parent


def module_files(package_dir):
    """Map each module name under `package_dir` to its file.

    Args:
        package_dir: the directory of a top-level package (it holds
            `__init__.py`); its name is the package's name.

    Returns:
        {dotted module name: path}, packages named by their directory.
    """
    package_dir = pathlib.Path(package_dir)
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = (package_dir.name, *path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking_guard(node):
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_statements(tree):
    """Every Import/ImportFrom node of a module, at any depth, skipping TYPE_CHECKING bodies."""
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking_guard(node):
            # The `else:` branch of such a guard does run; only its body is for the type checker.
            pending.extend(node.orelse)
        else:
            pending.extend(ast.iter_child_nodes(node))


def _absolute_base(importer, is_package, node):
    """The module a `from ... import` statement reads from, relative dots resolved."""
    if node.level == 0:
        return node.module
    # A package's `__init__` is its own anchor for one dot; a plain module's is its parent.
    anchor = importer.split(".")
    drop = node.level - 1 if is_package else node.level
    if drop:
        anchor = anchor[:-drop]
    return ".".join(anchor + ([node.module] if node.module else []))


def imports_of(name, path, modules):
    """The modules among `modules` that module `name` (at `path`) imports.

    Args:
        name: the importer's dotted name.
        path: its file.
        modules: every module of the package, as from `module_files`.

    Returns:
        The set of imported module names (never `name` itself).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    targets = set()
    for node in _import_statements(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = _absolute_base(name, is_package, node)
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            targets.add(submodule if submodule in modules else base)
    found = set()
    for target in targets:
        # `import a.b.c` of a name that is not a module (or not ours) falls back
        # to its nearest enclosing module of ours, if any.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def import_graph(package_dir):
    """{module: set of modules it imports}, for every module under `package_dir`."""
    modules = module_files(package_dir)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def import_circles(graph):
    """The strongly connected components of `graph` with more than one module.

    Tarjan's algorithm, written with an explicit stack so a deep chain of
    imports cannot exhaust Python's recursion limit.

    Returns:
        A sorted list of sorted lists of module names.
    """
    index, lowlink, on_stack, stack, circles = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        # Each frame: a module and the iterator over what it imports.
        work = [(root, iter(sorted(graph[root])))]
        index[root] = lowlink[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            module, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = lowlink[successor] = counter
                    counter += 1
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, ())))))
                    break
                if successor in on_stack:
                    lowlink[module] = min(lowlink[module], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    lowlink[parent] = min(lowlink[parent], lowlink[module])
                if lowlink[module] == index[module]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == module:
                            break
                    if len(component) > 1:
                        circles.append(sorted(component))
    return sorted(circles)


def describe(circle, graph):
    """A circle and the import arrows inside it, for a failure message."""
    members = set(circle)
    arrows = [f"    {a} -> {b}" for a in circle for b in sorted(graph[a]) if b in members]
    return "\n".join([" <-> ".join(circle), *arrows])


def test_trioflow_has_no_import_circle():
    """No set of trioflow modules imports itself around a circle (each one found is named with its arrows)."""
    graph = import_graph(ROOT)
    circles = import_circles(graph)
    assert not circles, "import circles:\n" + "\n\n".join(describe(c, graph) for c in circles)


def _write_package(tmp_path, files):
    for relative, source in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return tmp_path / "pkg"


def test_a_planted_circle_through_a_package_init_is_found(tmp_path):
    """A submodule importing a name its package __init__ re-exports closes a circle; importing it from where it is defined does not."""
    files = {
        "pkg/__init__.py": "from pkg.low import helper\nfrom pkg.high import api\n",
        "pkg/low.py": "def helper(): pass\n",
        "pkg/high.py": "def api():\n    from pkg import helper\n",
    }
    package = _write_package(tmp_path, files)
    graph = import_graph(package)
    assert graph["pkg.high"] == {"pkg"}
    assert import_circles(graph) == [["pkg", "pkg.high"]]

    (package / "high.py").write_text("def api():\n    from pkg.low import helper\n")
    assert import_circles(import_graph(package)) == []


def test_checker_rules_on_a_synthetic_package(tmp_path):
    """Relative imports resolve, a submodule named by `from pkg import` is that submodule, TYPE_CHECKING is skipped."""
    package = _write_package(tmp_path, {
        "pkg/__init__.py": "from .a import A\n",
        "pkg/a.py": """\
            from typing import TYPE_CHECKING
            from . import b
            if TYPE_CHECKING:
                from pkg.c import C
            else:
                import pkg.d
            def later():
                from .sub.e import E
            """,
        "pkg/b.py": "import os\nfrom pkg import c\n",
        "pkg/c.py": "",
        "pkg/d.py": "",
        "pkg/sub/__init__.py": "from ..c import C\nfrom . import e\n",
        "pkg/sub/e.py": "from ...outside import x\nimport pkg.b.not_a_module\n",
    })
    graph = import_graph(package)
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b", "pkg.d", "pkg.sub.e"},
        "pkg.b": {"pkg.c"},
        "pkg.c": set(),
        "pkg.d": set(),
        "pkg.sub": {"pkg.c", "pkg.sub.e"},
        "pkg.sub.e": {"pkg.b"},
    }
    assert import_circles(graph) == []


def test_every_circle_is_named_separately(tmp_path):
    """Two disjoint circles (one of them via a lazy import inside a function) are both reported."""
    package = _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import x\n",
        "pkg/b.py": "def f():\n    import pkg.a\n",
        "pkg/c.py": "from pkg import d\n",
        "pkg/d.py": "from pkg.e import y\n",
        "pkg/e.py": "from pkg.c import z\n",
        "pkg/f.py": "from pkg.a import x\n",
    })
    graph = import_graph(package)
    assert import_circles(graph) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d", "pkg.e"]]
    message = describe(["pkg.a", "pkg.b"], graph)
    assert "pkg.a -> pkg.b" in message and "pkg.b -> pkg.a" in message
