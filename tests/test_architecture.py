"""The package layering (docs/ARCHITECTURE.md): ``cli_module`` (the model) imports neither ``pipelines`` nor
``jobs`` nor Ray; ``pipelines`` (Ray Data / Serve building blocks) does not import ``jobs`` (entry points).
Checked on the source, lazy imports inside functions included, and by importing every model module in a fresh
interpreter."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"cli_module": ("pipelines", "jobs", "ray"), "pipelines": ("jobs",)}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in a file, nested ones included."""
    package = path.parent.name
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            name = ".".join(filter(None, [package, node.module])) if node.level else node.module or ""
            out.append((node.lineno, name))
    return out


def violations(package: str) -> list[str]:
    banned = FORBIDDEN[package]
    return [f"{path.relative_to(ROOT)}:{line} imports {name}"
            for path in sorted((ROOT / package).glob("*.py"))
            for line, name in imported_modules(path)
            if name.split(".")[0] in banned]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_layering(package):
    assert violations(package) == []


def test_checker_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "cli_module"
    pkg.mkdir()
    (pkg / "m.py").write_text("def f():\n    import ray.train\n    from jobs.cli import main\n    from . import model\n")
    names = [name for _, name in imported_modules(pkg / "m.py")]
    assert names == ["ray.train", "jobs.cli", "cli_module"]


def test_importing_the_model_package_loads_no_ray_pipelines_or_jobs():
    modules = sorted(p.stem for p in (ROOT / "cli_module").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module('cli_module.' + m)\n"
            "print(json.dumps(sorted({k.split('.')[0] for k in sys.modules} & {'ray', 'pipelines', 'jobs'})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
