"""The architecture's checkers (import-linter contracts, mypy on edge/, deptry) pass on the
project, and each fails on a planted violation: a check that cannot fail would guard nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _copy(tmp_path: Path) -> Path:
    work = tmp_path / "project"
    work.mkdir()
    for name in ("edge", "training"):
        shutil.copytree(ROOT / name, work / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.tflite", "*.npz",
                                                      "*.png"))
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
    return work


def _plant(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the project with ``line`` appended to ``module`` (a path under it)."""
    work = _copy(tmp_path)
    target = work / module
    target.write_text(target.read_text() + f"\n{line}\n")
    return work


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lint-imports")], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(cwd), "PATH": str(BIN)})


def test_the_import_contracts_hold():
    out = _lint_imports(ROOT)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "BROKEN" not in out.stdout and out.stdout.count("KEPT") >= 5


def test_an_upward_import_breaks_a_contract(tmp_path):
    work = _plant(tmp_path, "edge/inference/quality.py", "from ..web import api  # planted")
    out = _lint_imports(work)
    assert out.returncode != 0
    assert "edge.inference.quality -> edge.web" in out.stdout


def test_tensorflow_in_edge_breaks_a_contract(tmp_path):
    work = _plant(tmp_path, "edge/inference/labels.py", "import tensorflow  # noqa  planted")
    out = _lint_imports(work)
    assert out.returncode != 0 and "tensorflow" in out.stdout


def test_an_import_cycle_breaks_a_contract(tmp_path):
    work = _plant(tmp_path, "edge/daemon/gate.py", "from . import pipeline  # noqa  planted")
    out = _lint_imports(work)
    assert out.returncode != 0 and "No cycles are allowed in edge.daemon" in out.stdout


def _tool(name: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(cwd), "PATH": str(BIN),
                                            "HOME": str(cwd)})


def test_mypy_passes_and_fails_on_a_planted_type_error(tmp_path):
    out = _tool("mypy", ROOT)
    assert out.returncode == 0, out.stdout[-3000:]
    work = _plant(tmp_path, "edge/daemon/gate.py", "PLANTED: int = 'not a number'")
    out = _tool("mypy", work)
    assert out.returncode != 0 and "gate.py" in out.stdout, out.stdout[-2000:]


def test_deptry_passes_and_fails_on_an_undeclared_import(tmp_path):
    out = _tool("deptry", ROOT, ".")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    work = _plant(tmp_path, "edge/inference/labels.py", "import yaml  # noqa  planted")
    out = _tool("deptry", work, ".")
    assert out.returncode != 0 and "yaml" in out.stdout + out.stderr
