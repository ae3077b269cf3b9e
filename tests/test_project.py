"""Project-wide checks: strict typing, public surface, README/CI consistency."""

from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _public_modules() -> list[str]:
    names: list[str] = []
    for pkg_name in ("derp", "tailnet"):
        pkg = importlib.import_module(pkg_name)
        names.append(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg_name + "."):
            parts = info.name.split(".")
            if any(p.startswith("_") for p in parts) or info.name.startswith("tailnet.v2"):
                continue
            names.append(info.name)
    return names


@pytest.mark.parametrize("name", _public_modules())
def test_public_module_declares_all(name: str) -> None:
    """Every public module declares ``__all__`` and every listed name exists."""
    mod = importlib.import_module(name)
    exported = getattr(mod, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert len(set(exported)) == len(exported), f"{name}.__all__ has duplicates"
    for attr in exported:
        assert hasattr(mod, attr), f"{name}.__all__ lists missing name {attr!r}"


def test_mypy_strict() -> None:
    """``mypy --strict`` passes on both packages (configured in pyproject.toml)."""
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--config-file", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_test_command_matches_ci() -> None:
    """The README's second command is exactly what .ci/run executes."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, flags=re.S)
    assert len(blocks) >= 2, "README must open with two sh command blocks"
    ci = (ROOT / ".ci" / "run").read_text()
    assert blocks[1].strip() in ci



def _import_graph(package: str) -> dict[str, set[str]]:
    """Module → modules of ``package`` it imports (every import statement, including
    ``TYPE_CHECKING`` blocks and function-level imports; a package's parent
    ``__init__`` executed implicitly is not an edge)."""
    import ast

    root = ROOT / package
    mods: dict[str, tuple[Path, bool]] = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_pkg)
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    b = base[: len(base) - (node.level - 1)]
                    mod = ".".join(b + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                cands = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            deps.update(c for c in cands if c in mods and c != name)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_in_derp() -> None:
    """``derp/`` has no import cycle, ``TYPE_CHECKING`` imports included (the server
    depends on :mod:`derp.peers`; :mod:`derp.mesh` and :mod:`derp.workers` on both)."""
    graph = _import_graph("derp")
    assert "derp.peers" in graph["derp.server.context"]
    assert not any(m.startswith(("derp.mesh", "derp.workers")) for m in graph["derp.server.app"])
    assert _cycles(graph) == []


def test_cycle_check_sees_a_cycle() -> None:
    """The checker itself: a two-module loop is reported."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
