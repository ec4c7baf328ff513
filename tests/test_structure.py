"""The package's shape (docs/architecture.md): imports run one way, with no cycles, counting the
imports inside functions too (a lazy import is still a dependency)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "regexp"


def imported_modules(path: Path) -> set[str]:
    """The regexp modules that a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from regexp import config` imports a module; `from regexp.x import y` the module x
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        found.update(name.split(".")[1] for name in names if name.startswith("regexp.") and name.count(".") >= 1)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {m: (imported_modules(PACKAGE / f"{m}.py") & modules) - {m} for m in modules}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per cycle found by depth-first search (empty: the graph is acyclic)."""
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_lazy_and_package_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import json\nfrom regexp import rundir\n\ndef f():\n    from regexp.tracking import Reporter\n"
                      "    import regexp.comparison\n")
    assert imported_modules(source) == {"rundir", "tracking", "comparison"}


def test_no_module_shadows_the_python_api():
    """`regexp.compare(...)` is a function: a submodule of that name would replace it once imported."""
    import regexp

    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules.isdisjoint(regexp.__all__)


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert graph["comparison"] and "rundir" in graph["comparison"]  # the graph is really read
    assert cycles(graph) == []


def test_run_records_are_a_leaf():
    """Every reader and writer of run dirs depends on rundir; rundir on nothing of regexp."""
    graph = import_graph()
    assert graph["rundir"] == set()
    for reader in ("comparison", "diagnose", "sweep", "tracking", "wandb_logger"):
        assert "rundir" in graph[reader], reader


def test_the_readers_of_run_dirs_import_nothing_heavy():
    """`regexp compare` and `regexp diagnose` read files: no torch, torchvision, wandb, matplotlib or scipy at import."""
    import subprocess
    import sys

    code = ("import sys, regexp.comparison, regexp.diagnose, regexp.sweep, regexp.tracking; "
            "print([m for m in ('torch', 'torchvision', 'wandb', 'matplotlib', 'scipy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
