"""The package's shape, read from its source (ast, nothing run): the subpackages are floors, and a module
imports only from its own subpackage or from a floor below; no import circle, not even through an import
inside a function; few modules at the top, none long.  The floors are those of the subpackages' docstrings."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ddp_cnn"

# Bottom to top; subpackages on one floor are independent of each other (the model never reads data).
FLOORS = [{"system"}, {"dist"}, {"model", "data"}, {"run"}, {"inference"}, {"cli"}, {"<top>"}]
MAX_TOP_MODULES = 8
MAX_LINES = 400
COMMANDS = ("train", "evaluate", "predict", "export", "summary", "report", "supervise")


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """{dotted module name: file} for every module of the package (a package by its __init__)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, modules: dict) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (a name taken from a package is the
    submodule of that name when there is one, else the package)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    found.add(sub)
                elif base in modules:
                    found.add(base)
    found.discard(name)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, colouring the modules)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                circle = visit(nxt)
                if circle:
                    return circle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            circle = visit(node)
            if circle:
                return circle
    return None


def floor_of(module: str) -> int:
    parts = module.split(".")
    room = parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else "<top>"
    for level, rooms in enumerate(FLOORS):
        if room in rooms:
            return level
    raise AssertionError(f"{module}: in no floor of FLOORS (a new subpackage needs its place there)")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a module on the same floor in another subpackage, or on a higher floor."""
    bad = []
    for src, targets in graph.items():
        for dst in targets:
            if dst == "ddp_cnn" or src == "ddp_cnn":
                continue  # the package's own __init__ is the front door, imported lazily by name
            same_room = src.split(".")[:2] == dst.split(".")[:2]
            if not same_room and floor_of(dst) >= floor_of(src):
                bad.append(f"{src} -> {dst}")
    return sorted(bad)


def test_no_import_circle():
    circle = find_circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_imports_go_down_the_floors():
    assert upward_imports(import_graph()) == []


def test_few_modules_at_the_top_and_none_long():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, f"{len(top)} modules at the top of ddp_cnn/: {top}"
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"


def test_every_subpackage_says_what_it_owns():
    for init in PACKAGE.glob("*/__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init}: no docstring saying what it owns"
        floor_of(f"ddp_cnn.{init.parent.name}.x")


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path):
    """The walker on a made-up package: dist imports run (upward), and run and dist import each other."""
    pkg = tmp_path / "ddp_cnn"
    for sub in ("dist", "run"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text('"""x."""\n')
    (pkg / "__init__.py").write_text("")
    (pkg / "dist" / "reducer.py").write_text("def f():\n    from ddp_cnn.run import trainer\n")
    (pkg / "run" / "trainer.py").write_text("from ..dist.reducer import f\n")
    graph = import_graph(pkg)
    assert graph["ddp_cnn.run.trainer"] == {"ddp_cnn.dist.reducer"}
    assert find_circle(graph) in (["ddp_cnn.dist.reducer", "ddp_cnn.run.trainer", "ddp_cnn.dist.reducer"],
                                  ["ddp_cnn.run.trainer", "ddp_cnn.dist.reducer", "ddp_cnn.run.trainer"])
    assert "ddp_cnn.dist.reducer -> ddp_cnn.run.trainer" in upward_imports(graph)


@pytest.mark.parametrize("command", COMMANDS)
def test_python_m_commands_keep_their_names(command):
    """`python -m ddp_cnn.<command>`, as README, docs, recipes, launch/ and tests write it, finds its module."""
    assert importlib.util.find_spec(f"ddp_cnn.{command}") is not None
    assert importlib.util.find_spec(f"ddp_cnn.cli.{command}") is not None


def test_public_names_keep_working():
    import ddp_cnn
    from ddp_cnn import comm, layers as L
    from ddp_cnn.inference import load, normalize, probabilities
    from ddp_cnn.model import Sequential

    assert ddp_cnn.Trainer.__name__ == "Trainer" and ddp_cnn.TrainConfig.__name__ == "TrainConfig"
    assert callable(comm.create) and issubclass(L.Conv2D, L.Layer) and callable(Sequential)
    assert all(map(callable, (load, normalize, probabilities)))
