"""The package layout holds its rules: the core imports no stage, a stage imports another stage only through
that stage's package (its public entry points), nothing imports the CLI, no import circle, no huge module."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "prodesc"
STAGES = ("data", "train", "generate", "eval", "serve", "export")
CORE = ("config", "errors", "prompts", "models", "rundir", "records", "attention", "embedder", "dist", "specs",
        "files", "config_tree")
MAX_LOGIC_LINES = 400  # lines of code: blank lines, comments and docstrings not counted


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> prodesc modules it imports (at any depth: lazy imports inside functions count too)."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        mod, found = _module(path), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("prodesc")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prodesc"):
                for a in node.names:  # `from prodesc import x` may name a module
                    sub = f"{node.module}.{a.name}"
                    found.add(sub if (SRC.parent / (sub.replace(".", "/") + ".py")).exists()
                              or (SRC.parent / sub.replace(".", "/")).is_dir() else node.module)
        graph[mod] = found - {mod}
    return graph


def test_the_core_imports_no_stage():
    for mod, deps in _imports().items():
        if mod.removeprefix("prodesc.") in CORE:
            bad = [d for d in deps if d.split(".")[1:2] and d.split(".")[1] in STAGES]
            assert not bad, f"{mod} (core) imports {bad}"


def test_a_stage_uses_another_stage_only_through_its_package():
    for mod, deps in _imports().items():
        stage = mod.split(".")[1] if mod.count(".") else None
        if stage not in STAGES:
            continue
        for d in deps:
            other = d.split(".")[1] if d.count(".") else None
            assert other not in STAGES or other == stage or d == f"prodesc.{other}", f"{mod} imports {d}"


def test_nothing_imports_the_cli():
    assert not [m for m, deps in _imports().items() if "prodesc.cli" in deps]


def test_no_import_circle():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(graph.get(mod, ())):
            if dep == "prodesc" or dep not in graph:
                continue
            if state.get(dep) == 1 and not (dep in mod or mod.startswith(dep + ".")):  # a package's own __init__
                raise AssertionError(" -> ".join([*path, mod, dep]))
            if dep not in state:
                visit(dep, [*path, mod])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])


def _logic_lines(path: Path) -> int:
    text = path.read_text()
    docs = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            docs |= set(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for i, line in enumerate(text.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and i not in docs)


def test_no_module_is_huge():
    big = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := _logic_lines(p)) > MAX_LOGIC_LINES}
    assert not big, f"split these modules: {big}"
