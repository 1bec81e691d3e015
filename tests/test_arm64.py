"""The arm64 test's own checks go red when they should (`make test-arm64` runs the test itself):
its comparison catches a model whose ARM answers differ, and the Pi's wheelhouse cannot be made
when the edge extra pins a wheel that exists for x86 only."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

from tests.arm64.compare import PROBABILITY_TOLERANCE, compare, parse_lines
from tests.arm64.run import PIS, unit_settings

REPO = Path(__file__).resolve().parents[1]


def _line(image: str, probs: dict[str, float], outcome: str = "no ALL pattern") -> str:
    label = max(probs, key=probs.get)
    return json.dumps({"image": image, "label": label, "probabilities": probs,
                       "decision": {"outcome": outcome, "positive": outcome != "no ALL pattern"},
                       "notes": []})


X86 = "\n".join([
    _line("models/b/samples/a.jpg", {"Benign": 0.9, "Pre": 0.1}),
    _line("models/b/samples/b.jpg", {"Benign": 0.2, "Pre": 0.8}, "ALL pattern"),
])


def test_identical_answers_agree():
    found = compare(parse_lines(X86), parse_lines(X86.replace("models/b", "/opt/fieldscope/m")))
    assert found.ok and found.agreed == found.compared == 2 and found.max_difference == 0.0


def test_a_drift_within_one_int8_step_agrees_and_beyond_it_does_not():
    near = X86.replace("0.9", str(0.9 - PROBABILITY_TOLERANCE / 2))
    assert compare(parse_lines(X86), parse_lines(near)).ok
    far = X86.replace("0.9", str(0.9 - 2 * PROBABILITY_TOLERANCE))
    found = compare(parse_lines(X86), parse_lines(far))
    assert not found.ok and found.agreed == 1
    assert "a.jpg" in found.problems[0] and "p(Benign)" in found.problems[0]


def test_a_different_label_or_decision_is_a_failure():
    flipped = "\n".join([
        _line("a.jpg", {"Benign": 0.9, "Pre": 0.1}, "ALL pattern"),  # decision differs
        _line("b.jpg", {"Benign": 0.2, "Pre": 0.8}, "ALL pattern"),
    ])
    found = compare(parse_lines(X86), parse_lines(flipped))
    assert not found.ok and "answer" in found.problems[0]


def test_a_missing_image_and_an_empty_run_fail():
    one = X86.splitlines()[0]
    found = compare(parse_lines(X86), parse_lines(one))
    assert not found.ok and "missing on the emulated Pi" in found.problems[0]
    assert not compare({}, {}).ok  # nothing compared proves nothing


def test_each_pi_shows_its_own_core_in_cpuinfo():
    parts = {cpu: pi.cpuinfo() for cpu, pi in PIS.items()}
    assert "CPU part\t: 0xd08" in parts["cortex-a72"]  # Pi 4
    assert "CPU part\t: 0xd03" in parts["cortex-a53"]  # Pi 3, Zero 2 W
    assert "CPU part\t: 0xd0b" in parts["cortex-a76"]  # Pi 5
    assert all(text.count("processor\t:") == 4 for text in parts.values())


def test_the_daemon_starts_as_the_installed_unit_says():
    unit = unit_settings((REPO / "systemd/fieldscope.service").read_text())
    assert unit["User"] == ["fieldscope"]
    assert unit["ExecStart"][0].endswith("-m edge serve --config /etc/fieldscope/fieldscope.toml")
    assert "-/etc/fieldscope/environment" in unit["EnvironmentFile"]


def _wheel(folder: Path, name: str, tag: str) -> None:
    dist = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(folder / f"{name}-1.0-{tag}.whl", "w") as z:
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{dist}/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n")
        z.writestr(f"{dist}/RECORD", "")


def _wheelhouse(tmp_path: Path, edge: list[str]) -> subprocess.CompletedProcess:
    tmp_path = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    tmp_path.mkdir()
    """scripts/make-wheelhouse.sh run against a planted edge extra, from a local index only."""
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    (project / "scripts/make-wheelhouse.sh").write_bytes(
        (REPO / "scripts/make-wheelhouse.sh").read_bytes())
    (project / "scripts/install.sh").write_text("#!/bin/sh\n")
    (project / "pyproject.toml").write_text(
        "[project]\nname = 'planted'\nversion = '0'\n[project.optional-dependencies]\n"
        f"edge = {json.dumps(edge)}\n")
    index = tmp_path / "index"
    index.mkdir(exist_ok=True)
    _wheel(index, "fsok", "py3-none-any")
    _wheel(index, "fsx86only", "cp311-cp311-manylinux2014_x86_64")
    _wheel(index, "setuptools", "py3-none-any")
    _wheel(index, "wheel", "py3-none-any")
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHON": "python3"}
    return subprocess.run(["bash", str(project / "scripts/make-wheelhouse.sh"),
                           str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=120, cwd=project)


def test_the_pi_wheelhouse_refuses_an_x86_only_wheel(tmp_path):
    control = _wheelhouse(tmp_path, ["fsok==1.0"])
    assert control.returncode == 0, control.stderr
    assert (tmp_path / "run0/out/wheels/fsok-1.0-py3-none-any.whl").exists()
    planted = _wheelhouse(tmp_path, ["fsok==1.0", "fsx86only==1.0"])
    assert planted.returncode != 0
    assert "fsx86only" in planted.stderr and "No matching distribution" in planted.stderr
