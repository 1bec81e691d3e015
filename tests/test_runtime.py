"""Interpreter resolution, and the edge side working with TensorFlow absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge.inference.runtime import tflite_runtime_numpy_problem
from tests.conftest import require_module

ROOT = Path(__file__).resolve().parent.parent

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCK = set(sys.argv[1].split(",")) if sys.argv[1] else set()
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCK:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
    sys.meta_path.insert(0, Block())
    sys.argv = sys.argv[1:]
""")


def run_python(code: str, block: str = "", env: dict | None = None, extra_path: str = ""):
    script = BLOCKER + textwrap.dedent(code)
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, str(ROOT)) if p)
    return subprocess.run(
        [sys.executable, "-c", script, block],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=ROOT,
        timeout=300,
    )


def test_edge_classifies_with_tensorflow_absent(parrot, coral):
    code = f"""
        import json, sys
        import edge
        from edge.inference.bundle import load_model
        from edge.inference.classifier import Classifier
        clf = Classifier(load_model({str(coral / "mobilenet_v2_1.0_224_quant.tflite")!r},
                                    {str(coral / "imagenet_labels.txt")!r}))
        r = clf.classify({str(parrot)!r})
        print(json.dumps({{"label": r.label, "runtime": clf.runtime.name,
                          "tf": "tensorflow" in sys.modules}}))
    """
    proc = run_python(code, block="tensorflow")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"label": "macaw", "runtime": "ai_edge_litert", "tf": False}


def test_no_module_in_edge_imports_tensorflow():
    code = """
        import importlib, pkgutil, sys
        import edge
        for m in pkgutil.walk_packages(edge.__path__, "edge."):
            if m.name != "edge.__main__":
                importlib.import_module(m.name)
        assert "tensorflow" not in sys.modules
        print("ok")
    """
    proc = run_python(code, block="tensorflow")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_no_runtime_gives_one_clear_error(parrot):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCKER + "from edge.cli import main; raise SystemExit(main())",
            "ai_edge_litert,tflite_runtime,tensorflow",
            "classify",
            "--model",
            str(parrot.parent / "mobilenet_v2_1.0_224_quant.tflite"),
            str(parrot),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2
    assert "no TensorFlow Lite runtime could be loaded" in proc.stderr
    assert "pip install ai-edge-litert" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("numpy_version", ["2.1.0", "1.26.4"])
def test_tflite_runtime_is_refused_with_numpy2_and_used_with_numpy1(tmp_path, numpy_version):
    """A tflite-runtime 2.14 install is skipped with the reason next to numpy 2, and used next to
    numpy 1 (the installed numpy's version is set in the child, so both cases always run)."""
    pkg = tmp_path / "tflite_runtime"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('__version__ = "2.14.0"\n')
    (pkg / "interpreter.py").write_text("Interpreter = object\ndef load_delegate(*a): pass\n")
    code = f"""
        import numpy
        numpy.__version__ = {numpy_version!r}
        from edge.inference.runtime import resolve_runtime
        from edge.errors import RuntimeMissingError
        try:
            print("resolved", resolve_runtime().name)
        except RuntimeMissingError as exc:
            print(exc.message)
            raise SystemExit(3)
    """
    proc = run_python(code, block="ai_edge_litert,tensorflow", extra_path=str(tmp_path))
    if numpy_version.startswith("2"):
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert "tflite-runtime 2.14.0 was built for numpy 1.x" in proc.stdout
        assert "numpy<2" in proc.stdout
    else:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.split() == ["resolved", "tflite_runtime"]


def test_numpy_rule():
    assert tflite_runtime_numpy_problem("2.14.0", "2.1.0")
    assert tflite_runtime_numpy_problem("2.13.1", "2.0.0")
    assert tflite_runtime_numpy_problem("2.14.0", "1.26.4") is None
    assert tflite_runtime_numpy_problem("2.15.0", "2.1.0") is None


def test_tensorflow_lite_is_the_last_resort(parrot, coral):
    require_module("tensorflow", "the training extra is installed in CI")
    code = f"""
        from edge.inference.bundle import load_model
        from edge.inference.classifier import Classifier
        clf = Classifier(load_model({str(coral / "mobilenet_v2_1.0_224_quant.tflite")!r},
                                    {str(coral / "imagenet_labels.txt")!r}))
        print(clf.runtime.name, clf.classify({str(parrot)!r}).label)
    """
    proc = run_python(code, block="ai_edge_litert,tflite_runtime")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["tensorflow", "macaw"]


def test_unknown_runtime_name_is_refused():
    code = """
        from edge.inference.runtime import resolve_runtime
        from edge.errors import RuntimeMissingError
        try:
            resolve_runtime()
        except RuntimeMissingError as exc:
            print(exc)
    """
    proc = run_python(code, env={"FIELDSCOPE_RUNTIME": "onnx"})
    assert "not a known runtime" in proc.stdout
