"""The package's layers: every import goes down the order below, and no modules import each
other in a circle (a lazy import inside a function counts: it hides a cycle, it does not
remove it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "robustkd"

# lowest first; a module may import only from its own package or from an earlier entry
LAYERS = ("robustkd", "errors", "settings", "distributed", "utils", "io", "hub", "outputs",
          "plotting",
          "triggers", "data", "models", "evaluation", "training", "distill", "attacks",
          "defenses", "runs", "shipped", "jobs", "api", "experiments", "demo", "cli_flags",
          "cli_legacy", "cli",
          "__main__")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (SRC / rel).with_suffix(".py").exists() or (SRC / rel / "__init__.py").exists()


def imports_of(path: Path) -> set[str]:
    """Every robustkd module ``path`` imports, at any depth (functions, TYPE_CHECKING)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "robustkd"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if base.split(".")[0] != "robustkd":
                continue
            subs = [f"{base}.{a.name}" for a in node.names if is_module(f"{base}.{a.name}")]
            found |= set(subs) if len(subs) == len(node.names) else {base, *subs}
    return found - {here}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(SRC.rglob("*.py"))}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "robustkd"


def test_every_package_has_a_layer():
    missing = sorted({layer(m) for m in graph()} - set(LAYERS))
    assert not missing, f"add {missing} to LAYERS (and to docs/ARCHITECTURE.md)"


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return [f"{m} -> {d}" for m, deps in g.items() for d in sorted(deps)
            if layer(d) != layer(m) and rank[layer(d)] > rank[layer(m)]]


def test_imports_only_go_down():
    g = graph()
    assert sum(len(d) for d in g.values()) > 100  # the scan sees the package's imports
    upward = upward_imports(g)
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_an_upward_import_is_reported():
    g = {"robustkd.models.wrn": {"robustkd.training.loop"}, "robustkd.training.loop": set()}
    assert upward_imports(g) == ["robustkd.models.wrn -> robustkd.training.loop"]


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among modules, or None (iterative DFS, three colours)."""
    state: dict[str, int] = {}
    for start in g:
        if state.get(start):
            continue
        stack, path = [(start, iter(sorted(g[start])))], [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif nxt in g and state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt in g and not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(g[nxt]))))
                path.append(nxt)
    return None


def test_no_import_cycles():
    g = graph()
    # a package's __init__ gathering its submodules is not a cycle through them
    for m in g:
        if (SRC.parent / Path(*m.split(".")) / "__init__.py").exists():
            g[m] = {d for d in g[m] if not d.startswith(m + ".")}
    cycle = _cycle(g)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("text, expected", [
    ("from robustkd.models.layers import layers_of", {"robustkd.models.layers"}),
    ("from robustkd import api", {"robustkd.api"}),
    ("def f():\n    from robustkd.attacks import ATTACKS", {"robustkd.attacks"}),
])
def test_imports_of_reads_lazy_and_package_imports(tmp_path, text, expected, monkeypatch):
    f = SRC / "distill" / "_probe_for_test.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: text)
    assert imports_of(f) == expected


def test_the_tests_mirror_the_source_tree():
    """Each folder of tests is named after the package it tests; loose test files test
    top-level modules."""
    tests = Path(__file__).resolve().parent
    for folder in (p for p in tests.iterdir() if p.is_dir() and p.name != "__pycache__"):
        assert (SRC / folder.name / "__init__.py").exists(), f"tests/{folder.name}: no package"
        assert (folder / "__init__.py").exists(), f"tests/{folder.name} needs __init__.py"
        assert list(folder.glob("test_*.py")), f"tests/{folder.name} holds no tests"
    packages = {p.parent.name for p in SRC.glob("*/__init__.py")}
    tested = {p.name for p in tests.iterdir() if p.is_dir()}
    assert packages - tested <= {"__pycache__"}, f"packages without tests: {packages - tested}"
