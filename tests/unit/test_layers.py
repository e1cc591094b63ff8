"""The layering of docs/architecture.md holds: import-linter's contracts (pyproject.toml) and no private
name reached across packages."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# [Note: the one sanctioned private reach]  infinity._native is the cffi binding that infinity.io wraps
# (DESIGN.md: "_native/ io/: cffi loader; handles ..."); everything else goes through infinity.io.
ALLOWED = {("io", "_native")}


def lint_imports() -> str:
    found = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports is missing: scripts/setup installs it with the test extras (import-linter)")
    return found


def test_import_linter_contracts_are_kept() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([lint_imports(), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout
    assert "kept, 0 broken" in done.stdout


def package_of(module: str) -> str:
    """'infinity.zero.engine' -> 'zero'; 'infinity.errors' -> 'errors'; 'infinity' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_reaches(path: Path) -> list[str]:
    return reaches_in(path.read_text(), module_name(path), str(path.relative_to(ROOT)))


def reaches_in(source: str, importer: str, label: str) -> list[str]:
    """Each import in source of a private module or name that belongs to another package."""
    own = package_of(importer) if importer.startswith("infinity") else importer.split(".")[0]
    found = []
    for node in ast.walk(ast.parse(source, filename=label)):
        if not isinstance(node, ast.ImportFrom) or node.level or not (node.module or "").startswith("infinity"):
            continue
        target = package_of(node.module)
        if target == own or (own, target) in ALLOWED:
            continue
        names = [a.name for a in node.names]
        hidden = [part for part in node.module.split(".") if private(part)] + [n for n in names if private(n)]
        if hidden:
            found.append(f"{label}:{node.lineno}: from {node.module} import {', '.join(names)}")
    return found


def test_no_module_imports_a_private_name_of_another_package() -> None:
    files = sorted((ROOT / "infinity").rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    assert len(files) > 50  # the walk found the code
    reaches = [line for f in files for line in private_reaches(f)]
    assert not reaches, "private names reached across packages:\n" + "\n".join(reaches)


def test_the_private_import_check_catches_a_reach() -> None:
    source = ("from infinity.config._values import Problems\n"
              "from infinity.zero.engine import _shape_of\n"
              "from infinity.cli.bench import _own_package_is_fine\n"
              "from infinity.config import Problems\n")
    assert len(reaches_in(source, "infinity.cli.planted", "planted.py")) == 2
    assert reaches_in("from infinity._native import load\n", "infinity.io.libaio", "libaio.py") == []
    assert len(reaches_in("from infinity._native import load\n", "infinity.bench.plan", "plan.py")) == 1
