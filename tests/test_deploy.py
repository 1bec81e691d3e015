"""Deployment files: systemd unit, udev rules, install and provisioning scripts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CI

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(ROOT.glob("scripts/**/*.sh"))


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if CI:
            pytest.fail(f"{tool} missing: .ci/run installs it")
        pytest.skip(f"{tool} not installed")
    return path


@pytest.fixture
def unit(tmp_path) -> Path:
    """The unit with ExecStart pointing at this machine's Python (verify checks it exists)."""
    text = (ROOT / "systemd/fieldscope.service").read_text()
    out = tmp_path / "fieldscope.service"
    out.write_text(text.replace("/opt/fieldscope/.venv/bin/python", sys.executable))
    return out


def test_unit_verifies(unit):
    proc = subprocess.run(
        [need("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "fieldscope.service" not in proc.stderr, proc.stderr  # no warnings about our unit


def test_unit_hardening_score(unit):
    proc = subprocess.run(
        [need("systemd-analyze"), "security", "--offline=true", str(unit)],
        capture_output=True,
        text=True,
    )
    m = re.search(r"Overall exposure level for fieldscope.service: ([\d.]+)", proc.stdout)
    assert m, proc.stdout[-500:] + proc.stderr
    assert float(m.group(1)) <= 2.5  # "OK"; docs/field-kit.md reports the figure


def test_unit_declares_what_the_kit_needs():
    text = (ROOT / "systemd/fieldscope.service").read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "StartLimitBurst=",
        "User=fieldscope",
        "SupplementaryGroups=video plugdev",
        "StateDirectory=fieldscope",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ReadWritePaths=/var/lib/fieldscope",
        "DevicePolicy=closed",
        "DeviceAllow=char-video4linux",
        "DeviceAllow=char-usb_device",
        "DeviceAllow=char-apex",
        "DeviceAllow=/dev/dma_heap/",
    ):
        assert line in text, line


UDEV_TOKEN = re.compile(
    r'^(?P<key>[A-Z_]+)(\{(?P<attr>[^}]+)\})?(?P<op>==|!=|\+=|:=|=)"(?P<value>[^"]*)"$'
)
UDEV_MATCH_KEYS = {"SUBSYSTEM", "SUBSYSTEMS", "ATTRS", "ATTR", "KERNEL", "ACTION", "DRIVERS"}
UDEV_ASSIGN_KEYS = {"MODE", "GROUP", "OWNER", "TAG", "SYMLINK", "RUN", "ENV"}


def test_udev_rules_parse():
    """udevadm verify arrived in systemd 254; this checks the same grammar for our rules."""
    rules = (ROOT / "systemd/99-fieldscope-coral.rules").read_text().splitlines()
    ids = set()
    for n, line in enumerate(rules, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        tokens = [t.strip() for t in line.split(",")]
        has_match = has_assign = False
        for tok in tokens:
            m = UDEV_TOKEN.match(tok)
            assert m, f"line {n}: cannot parse {tok!r}"
            key, op = m["key"], m["op"]
            if op in ("==", "!="):
                assert key in UDEV_MATCH_KEYS, f"line {n}: {key} is not a match key"
                has_match = True
            else:
                assert key in UDEV_ASSIGN_KEYS, f"line {n}: {key} cannot be assigned"
                has_assign = True
            if key == "MODE":
                assert re.fullmatch(r"0[0-7]{3}", m["value"]), f"line {n}: bad MODE"
            if key == "ATTRS" and m["attr"] in ("idVendor", "idProduct"):
                ids.add(m["value"])
        assert has_match and has_assign, f"line {n}: a rule needs a match and an assignment"
    assert {"1a6e", "089a", "18d1", "9302"} <= ids
    assert any('SUBSYSTEM=="apex"' in r for r in rules)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    proc = subprocess.run([need("shellcheck"), "-x", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def run_install(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "scripts/install.sh"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": os.environ["PATH"]},
    )


def test_install_dry_run_online():
    proc = run_install("--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for step in (
        "apt-get install -y",
        "libedgetpu1-std",
        "useradd --system",
        "usermod -aG video,plugdev",
        "python3 -m venv --system-site-packages",
        "[edge]",
        "write /etc/fieldscope/fieldscope.toml",
        "write /etc/systemd/system/fieldscope.service",
        "write /etc/udev/rules.d/99-fieldscope-coral.rules",
        "systemctl enable --now fieldscope.service",
        "http://127.0.0.1:8080",
    ):
        assert step in out, step


def test_install_dry_run_offline_uses_only_the_folder(tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "debs").mkdir()
    (tmp_path / "debs" / "libedgetpu1-max_16.0_arm64.deb").write_text("x")
    proc = run_install("--dry-run", "--offline", str(tmp_path), "--edgetpu", "max", "--no-start")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"--no-index --find-links {tmp_path}/wheels" in out
    assert f"dpkg -i {tmp_path}/debs/libedgetpu1-max_16.0_arm64.deb" in out
    assert "apt-get update" not in out and "curl" not in out
    assert "systemctl enable fieldscope.service" in out and "--now" not in out
    assert "[edge]" in out and "clinic" not in out


def test_install_with_clinic_adds_the_dicom_and_fhir_libraries():
    proc = run_install("--dry-run", "--with-clinic")
    assert proc.returncode == 0, proc.stderr
    assert "/opt/fieldscope[edge,clinic]" in proc.stdout


def test_install_refuses_bad_options_and_missing_folder(tmp_path):
    assert run_install("--edgetpu", "turbo").returncode == 2
    proc = run_install("--dry-run", "--offline", str(tmp_path / "nope"))
    assert proc.returncode == 1 and "make-wheelhouse.sh" in proc.stderr
    uninstall = run_install("--dry-run", "--uninstall")
    assert "systemctl disable --now fieldscope.service" in uninstall.stdout
    assert "kept /etc/fieldscope" in uninstall.stdout


def test_example_config_is_valid_and_complete():
    from dataclasses import fields

    from edge.config import SECTIONS, load_config

    cfg = load_config(
        ROOT / "docs/fieldscope.example.toml", {"source.kind": "replay", "source.path": "x"}
    )
    text = (ROOT / "docs/fieldscope.example.toml").read_text()
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            assert re.search(rf"^{f.name} = ", text, re.M), f"[{name}].{f.name} undocumented"
    assert cfg.web.host == "127.0.0.1"


def _fake_tools(tmp_path, arch: str, python: str | None = None) -> dict:
    """A PATH whose dpkg reports ``arch`` (and whose python3 is ``python`` when given)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dpkg").write_text(f"#!/bin/sh\necho {arch}\n")
    if python:
        (bin_dir / "python3").write_text(
            "#!/bin/sh\n"
            f'case "$*" in *"print("*) echo {python} ;; *) exit 1 ;; esac\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_install_refuses_a_32_bit_os_with_the_fix(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts/install.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=60,
                          env=_fake_tools(tmp_path, "armhf"))
    assert proc.returncode == 3
    assert "32-bit" in proc.stderr and "64-bit Raspberry Pi OS" in proc.stderr


def test_install_refuses_an_old_python_with_the_fix(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts/install.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=60,
                          env=_fake_tools(tmp_path, "arm64", python="3.9"))
    assert proc.returncode == 3
    assert "Python 3.11" in proc.stderr and "3.9" in proc.stderr


def test_doctor_names_a_32_bit_os_and_an_old_python():
    from edge.doctor import check_platform

    assert check_platform("armv7l", (3, 11)).status == "fail"
    assert "64-bit" in check_platform("armv7l", (3, 11)).fix
    assert check_platform("aarch64", (3, 9)).status == "fail"
    assert check_platform("aarch64", (3, 11)).status == "ok"
