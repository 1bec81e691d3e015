"""The CI guard itself: under CI=true a skip that is not an explicit opt-in fails the run, and
an exception in a test's own thread fails its test (both tried in a separate pytest run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

INNER = '''
import threading
import pytest

def test_hidden_by_a_skip():
    pytest.skip("tool not installed")

def test_an_opt_in_skip():
    pytest.skip("opt-in: FIELDSCOPE_SLOW=1")

def test_importorskip_of_a_missing_module():
    pytest.importorskip("a_module_that_is_not_there")

def test_an_exception_in_a_helper_thread():
    t = threading.Thread(target=lambda: 1 / 0)
    t.start()
    t.join()
'''


def _run(tmp_path: Path, ci: str) -> str:
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_runtest_makereport"
                                          "  # noqa: F401\n")
    (tmp_path / "test_inner.py").write_text(INNER)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nfilterwarnings =\n    error::pytest.PytestUnhandledThreadExceptionWarning\n")
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                          str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    return out.stdout


def test_in_ci_only_opt_in_skips_remain_skips(tmp_path):
    text = _run(tmp_path, "true")
    assert "FAILED test_inner.py::test_hidden_by_a_skip" in text, text
    assert "FAILED test_inner.py::test_importorskip_of_a_missing_module" in text, text
    assert "SKIPPED [1] test_inner.py" in text and "opt-in" in text, text
    assert "FAILED test_inner.py::test_an_exception_in_a_helper_thread" in text, text


def test_outside_ci_a_skip_is_a_skip(tmp_path):
    text = _run(tmp_path, "")
    assert "FAILED test_inner.py::test_hidden_by_a_skip" not in text, text
    assert "3 skipped" in text or "3 skipped," in text, text
