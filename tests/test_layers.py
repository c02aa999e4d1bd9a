"""The package's folders are its layers: imports run only downward, no cycles, terminal libraries only at the top.

The scan reads every import statement in the package with `ast` (function-level and TYPE_CHECKING ones
included: a lazy import up a layer is still a dependency up a layer). docs/ARCHITECTURE.md draws the same table.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest
from checkpoints import checkpoints, tiny_folder  # noqa: F401  (fixtures)

PACKAGE = Path(__file__).resolve().parent.parent / "bluelm_cli"

# Higher ranks may import lower ones; packages of the same rank may not import each other.
RANKS: dict[str, int] = {
    "core": 0,
    "config": 1,
    "modeling": 2,
    "local": 3,
    "remote": 3,
    "testing": 3,
    "export": 4,
    "chat": 4,
    "bench": 5,
    "ui": 5,
    "cli": 6,
}
# Modules flat beside __init__.py: only the two the design card names. session.py is part of the chat layer.
FLAT_MODULES = {"session": "chat", "__main__": "cli"}
TERMINAL_LIBRARIES = ("rich", "prompt_toolkit", "typer", "click")
TERMINAL_LAYERS = {"ui", "cli"}


def layer_of(module: str) -> str | None:
    """'bluelm_cli.local.engine' -> 'local'; the package root itself (its version) belongs to no layer."""
    parts = module.split(".")
    if parts[0] != "bluelm_cli" or len(parts) == 1:
        return None
    return FLAT_MODULES.get(parts[1], parts[1])


def imports_of(path: Path, module: str) -> Iterable[tuple[str, int]]:
    """Every module `path` imports, absolute, with its line (relative imports resolved against `module`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield base, node.lineno
            for alias in node.names:  # `from bluelm_cli.chat import transcript` imports a module too
                yield f"{base}.{alias.name}", node.lineno


def package_modules(root: Path) -> dict[str, Path]:
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def violations(root: Path, ranks: Mapping[str, int] = RANKS) -> list[str]:
    """What breaks the layering, one line each: an import up (or across) a layer, a terminal library below ui/cli,
    a layer no rank covers, a flat module the design does not name."""
    found = []
    modules = package_modules(root)
    for module, path in modules.items():
        if module.count(".") == 1 and path.name != "__init__.py" and module.split(".")[1] not in FLAT_MODULES:
            found.append(f"{module}: a flat module beside __init__.py; put it in the layer it belongs to")
        own = layer_of(module)
        if own is not None and own not in ranks:
            found.append(f"{module}: layer '{own}' has no rank")
            continue
        for target, line in imports_of(path, module):
            top = target.split(".")[0]
            if top in TERMINAL_LIBRARIES and own not in TERMINAL_LAYERS:
                found.append(f"{module}:{line} imports {target}, a terminal library, below ui/ and cli/")
            if top != "bluelm_cli" or target not in modules:  # a name imported from a module is no module
                continue
            theirs = layer_of(target)
            if own is None or theirs is None or theirs == own:
                continue
            if theirs not in ranks:
                found.append(f"{module}:{line} imports {target}, whose layer '{theirs}' has no rank")
            elif ranks[theirs] >= ranks[own]:
                found.append(f"{module}:{line} imports {target}: {own} (rank {ranks[own]}) may not import"
                             f" {theirs} (rank {ranks[theirs]})")
    return found


def layer_graph(root: Path) -> dict[str, set[str]]:
    modules = package_modules(root)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        own = layer_of(module)
        if own is None:
            continue
        graph.setdefault(own, set())
        for target, _ in imports_of(path, module):
            theirs = layer_of(target) if target in modules else None
            if theirs is not None and theirs != own:
                graph[own].add(theirs)
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Each cycle between layers found by a depth-first search (one per back edge)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


# ----------------------------------------------------------------------------------------- the package
def test_every_import_runs_down_the_layers() -> None:
    assert violations(PACKAGE) == []


def test_no_cycle_between_subpackages() -> None:
    assert cycles(layer_graph(PACKAGE)) == []


def test_every_subpackage_says_what_it_does_and_may_import() -> None:
    for layer in RANKS:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "May import:" in doc, layer


# ----------------------------------------------------------------------------------------- the checker itself
def _tree(tmp_path: Path, files: Mapping[str, str]) -> Path:
    root = tmp_path / "bluelm_cli"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for layer in {name.split("/")[0] for name in files if "/" in name}:
        (root / layer / "__init__.py").touch()
    return root


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"core/a.py": "from bluelm_cli.chat.b import x\n", "chat/b.py": ""},
         "bluelm_cli.core.a:1 imports bluelm_cli.chat.b: core (rank 0) may not import chat (rank 4)"),
        ({"local/a.py": "def f():\n    from bluelm_cli.remote import b\n", "remote/b.py": ""},
         "bluelm_cli.local.a:2 imports bluelm_cli.remote.b: local (rank 3) may not import remote (rank 3)"),
        ({"chat/a.py": "import rich.console\n"},
         "bluelm_cli.chat.a:1 imports rich.console, a terminal library, below ui/ and cli/"),
        ({"engine.py": ""}, "bluelm_cli.engine: a flat module beside __init__.py; put it in the layer it belongs to"),
        ({"config/a.py": "from ..ui import b\n", "ui/b.py": ""},
         "bluelm_cli.config.a:1 imports bluelm_cli.ui.b: config (rank 1) may not import ui (rank 5)"),
    ],
)
def test_the_checker_finds_each_kind_of_violation(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    assert expected in violations(_tree(tmp_path, files))


def test_the_checker_finds_a_cycle(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"chat/a.py": "import bluelm_cli.ui.b\n", "ui/b.py": "import bluelm_cli.chat.a\n"})
    assert cycles(layer_graph(root)) == [["chat", "ui", "chat"]]


# ----------------------------------------------------------------------------------------- what the chat loads
def _imported_by(args: list[str], env_home: Path) -> set[str]:
    """The bluelm_cli modules a real `python -m bluelm_cli ARGS` imports (python -X importtime, on stderr)."""
    env = {**os.environ, "BLUELM_HOME": str(env_home), "NO_COLOR": "1", "TERM": "dumb"}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "bluelm_cli", *args], capture_output=True,
                          text=True, env=env, stdin=subprocess.DEVNULL, timeout=300)
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[-1].strip()
            if name.startswith("bluelm_cli"):
                names.add(name)
    assert names, proc.stderr[-2000:]
    return names


def test_help_imports_neither_bench_nor_testing_nor_torch(tmp_path: Path) -> None:
    names = _imported_by(["--help"], tmp_path)
    assert not {n for n in names if n.startswith(("bluelm_cli.bench", "bluelm_cli.testing", "bluelm_cli.local"))}


@pytest.mark.slow
def test_ask_on_a_checkpoint_imports_neither_bench_nor_testing(tmp_path: Path, tiny_folder: Path) -> None:
    names = _imported_by(["ask", "--model", str(tiny_folder), "-n", "2", "--temperature", "0", "hi"], tmp_path)
    assert "bluelm_cli.local.engine" in names  # the answer really ran
    assert not {n for n in names if n.startswith(("bluelm_cli.bench", "bluelm_cli.testing"))}
