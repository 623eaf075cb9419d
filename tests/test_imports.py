"""The package's layering: no import cycle between its modules, and the registry's order of methods."""
import ast
from pathlib import Path

import surrogate
from surrogate.methods import METHODS

PACKAGE = Path(surrogate.__file__).parent


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports anywhere in it (top level, inside functions, under TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:                # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:                              # from . import x, y
                found.update(a.name.split(".")[0] for a in node.names)
            elif node.level == 0 and node.module and node.module.split(".")[0] == "surrogate":
                parts = node.module.split(".")                 # from surrogate.x import y / from surrogate import x
                found.update([parts[1]] if len(parts) > 1 else (a.name for a in node.names))
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("surrogate.") and a.name.count(".") >= 1)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports (the package's ``__init__`` left out: it imports them all)."""
    modules = {p.stem: p for p in package.glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules whose last imports the first), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):]
            if n not in state and (cycle := visit(n)) is not None:
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c"]
    assert find_cycle({"a": {"a"}}) == ["a"]


def test_the_import_parser_sees_every_kind_of_import(tmp_path: Path):
    (tmp_path / "m.py").write_text(
        "from . import a, b as c\nfrom .d import x\nimport surrogate.e\nfrom surrogate.f import y\n"
        "from surrogate import g\nimport torch\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .h import z\n"
        "def later():\n    from .i import w\n")
    assert _imports(tmp_path / "m.py") == {"a", "b", "d", "e", "f", "g", "h", "i"}


def test_no_import_cycle_between_the_package_modules():
    graph = import_graph()
    assert {"graph", "gating", "evaluate", "methods", "scorers", "surrogates", "plotting"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle + cycle[:1])


def test_the_ground_floor_imports_nothing_of_the_package():
    graph = import_graph()
    assert graph["measuring"] == set()
    assert "plotting" not in graph["graph"] and "evaluate" not in graph["graph"]


def test_the_registry_lists_each_method_module_together_in_import_order():
    # the package imports scorers, surrogates and baselines in this order; each registers its own methods
    modules = [m.build.__module__ for m in METHODS.values()]
    order = ["surrogate.scorers", "surrogate.surrogates", "surrogate.baselines"]
    assert set(modules) == set(order)
    assert modules == sorted(modules, key=order.index)
