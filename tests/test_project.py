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

