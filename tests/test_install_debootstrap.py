"""Opt-in slow test: install.sh for real in a Debian bookworm root made with debootstrap.

A stand-in for Raspberry Pi OS (same Debian release, x86-64 instead of arm64). Runs only with
FIELDSCOPE_SLOW=1, as root, with debootstrap installed; reaches Debian's and PyPI's package
servers to build the root and a local wheelhouse, then installs with --offline (no network
inside the install) and checks the installed daemon serves /api/health.

    FIELDSCOPE_SLOW=1 .venv/bin/python -m pytest tests/test_install_debootstrap.py -s
Set FIELDSCOPE_DEBOOTSTRAP_ROOT to reuse an existing root between runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("FIELDSCOPE_SLOW") != "1",
        reason="opt-in: FIELDSCOPE_SLOW=1 (needs root, debootstrap, network)",
    ),
]
PACKAGES = "python3,python3-venv,python3-pip,rsync,ca-certificates,systemd,udev,passwd,procps"


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


@pytest.fixture(scope="module")
def debroot(tmp_path_factory) -> Path:
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        pytest.fail("needs root and debootstrap (apt install debootstrap)")
    given = os.environ.get("FIELDSCOPE_DEBOOTSTRAP_ROOT")
    root = Path(given) if given else tmp_path_factory.mktemp("debroot") / "root"
    if not (root / "usr/bin/python3").exists():
        sh(
            "debootstrap",
            "--variant=minbase",
            f"--include={PACKAGES}",
            "bookworm",
            str(root),
            "http://deb.debian.org/debian",
        )
    mounts = []
    for fs in ("proc", "sys", "dev"):
        target = root / fs
        sh("mount", "--bind", f"/{fs}", str(target))
        mounts.append(target)
    yield root
    for target in reversed(mounts):
        subprocess.run(["umount", "-l", str(target)], check=False)


def wheelhouse(dest: Path, python: str) -> None:
    reqs = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "edge"
    ]
    sh(
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--dest",
        str(dest),
        "--only-binary=:all:",
        "--python-version",
        python,
        *reqs,
        "setuptools",
        "wheel",
    )


def test_install_sh_in_a_bookworm_root_serves_health(debroot, tmp_path):
    py = subprocess.run(
        [
            "chroot",
            str(debroot),
            "python3",
            "-c",
            "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    offline = debroot / "root/offline"
    if offline.exists():
        shutil.rmtree(offline)
    wheelhouse(offline / "wheels", py)
    (offline / "debs").mkdir()
    src = debroot / "root/fieldscope"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "data", "runs", "__pycache__", ".pytest_cache", ".ruff_cache"))
    for _ in range(2):  # idempotent: the second run updates in place
        sh(
            "chroot",
            str(debroot),
            "bash",
            "/root/fieldscope/scripts/install.sh",
            "--offline",
            "/root/offline",
            "--edgetpu",
            "none",
            "--no-start",
        )
    assert (debroot / "etc/systemd/system/fieldscope.service").is_file()
    assert (debroot / "etc/systemd/system/multi-user.target.wants/fieldscope.service").is_symlink()
    assert (debroot / "etc/udev/rules.d/99-fieldscope-coral.rules").is_file()
    groups = subprocess.run(
        ["chroot", str(debroot), "id", "-nG", "fieldscope"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert {"video", "plugdev"} <= set(groups)
    # Run the installed daemon as its user, as the unit would (no systemd as PID 1 here).
    port = 18080
    conf = debroot / "etc/fieldscope/fieldscope.toml"
    text = conf.read_text().replace("port = 8080", f"port = {port}")
    conf.write_text(text)
    proc = subprocess.Popen(
        [
            "chroot",
            str(debroot),
            "setpriv",
            "--reuid=fieldscope",
            "--regid=fieldscope",
            "--init-groups",
            "env",
            "FIELDSCOPE_MODELS=/opt/fieldscope/models",
            "/opt/fieldscope/.venv/bin/python",
            "-m",
            "edge",
            "serve",
            "--config",
            "/etc/fieldscope/fieldscope.toml",
        ],
        cwd=str(debroot),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        end = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as r:
                    body = json.loads(r.read())
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < end, "the installed daemon did not answer"
                time.sleep(1)
        # no camera in the root: the daemon says so and keeps serving
        assert body["inference"]["ok"] is True
        assert body["camera"]["state"] in ("lost", "starting")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
