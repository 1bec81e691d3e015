"""``python -m edge doctor``: what this device has, each finding with its fix."""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from . import hardware
from .paths import models_dir


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def check_runtime() -> Check:
    from .errors import RuntimeMissingError
    from .inference.runtime import resolve_runtime

    try:
        rt = resolve_runtime()
    except RuntimeMissingError as exc:
        return Check("runtime", "fail", exc.message, exc.hint or "")
    skipped = "; ".join(f"{k} skipped: {v}" for k, v in rt.skipped.items() if k != "tensorflow")
    return Check("runtime", "ok", rt.label + (f" ({skipped})" if skipped else ""))


def check_libedgetpu() -> Check:
    from .inference.backends.edgetpu import INSTALL_HINT, edgetpu_library, runtime_version

    lib = edgetpu_library()
    try:
        ctypes.CDLL(lib)
    except OSError as exc:
        return Check("libedgetpu", "warn", f"{lib} not loadable ({exc}); CPU only", INSTALL_HINT)
    version = runtime_version() or "version unknown"
    return Check("libedgetpu", "ok", f"{lib} loads ({version})")


def check_edgetpu() -> Check:
    tpus = hardware.find_edgetpus()
    if not tpus:
        return Check(
            "edge-tpu",
            "warn",
            "no Edge TPU found; inference runs on the CPU",
            "plug the Coral USB Accelerator into a USB 3 (blue) port or a powered hub; "
            "a PCIe/M.2 Coral needs the gasket-dkms driver (/dev/apex_0)",
        )
    names = ", ".join(f"{t.description} at {t.path}" for t in tpus)
    unflashed = [t for t in tpus if "no firmware" in t.description]
    if unflashed:
        return Check("edge-tpu", "ok", names + " (firmware loads on first use)")
    return Check("edge-tpu", "ok", names)


def check_cameras() -> Check:
    videos = hardware.find_video_devices()
    try:
        import picamera2  # noqa: F401  # type: ignore[import-not-found]

        pic = "picamera2 importable"
    except Exception as exc:  # ImportError, or a broken libcamera binding
        pic = f"picamera2 not importable ({type(exc).__name__})"
    if not videos:
        return Check(
            "cameras",
            "warn",
            f"no /dev/video* devices; {pic}",
            "connect the camera or USB microscope; for a CSI camera check the ribbon cable and "
            "`rpicam-hello --list-cameras`; replay:DIR works without a camera",
        )
    return Check("cameras", "ok", f"{', '.join(videos)}; {pic}")


def check_groups() -> Check:
    user = pwd.getpwuid(os.getuid()).pw_name
    if os.getuid() == 0:
        return Check("groups", "ok", "running as root (the service runs as user fieldscope)")
    have = {grp.getgrgid(g).gr_name for g in os.getgroups()}
    missing = [g for g in ("video", "plugdev") if g not in have]
    if missing:
        return Check(
            "groups",
            "warn",
            f"user {user} is not in {', '.join(missing)}",
            f"sudo usermod -aG {','.join(missing)} {user} && log out and in again",
        )
    return Check("groups", "ok", f"user {user} is in video and plugdev")


def check_governor() -> Check:
    govs = sorted(set(hardware.cpu_governors()))
    if not govs:
        return Check("cpu-governor", "ok", "no cpufreq information (not a Pi, or a VM)")
    if govs != ["performance"]:
        return Check(
            "cpu-governor",
            "warn",
            f"governor {', '.join(govs)}: latency varies with load",
            "echo performance | sudo tee /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor",
        )
    return Check("cpu-governor", "ok", "performance")


def check_thermal() -> Check:
    temp = hardware.cpu_temperature_c()
    flags = hardware.pi_throttled()
    parts = []
    if temp is not None:
        parts.append(f"{temp:.1f} °C")
    if flags is not None:
        events = hardware.decode_throttled(flags)
        parts.append(f"throttled=0x{flags:x}" + (f" ({'; '.join(events)})" if events else ""))
        if events:
            return Check(
                "thermal",
                "warn",
                ", ".join(parts),
                "use the official power supply (5 V 3 A Pi 4, 5 A Pi 5) and a heatsink or fan",
            )
    if temp is not None and temp >= 80:
        return Check("thermal", "warn", ", ".join(parts), "add a heatsink or fan")
    return Check("thermal", "ok", ", ".join(parts) or "no sensor information")


def check_disk(path: Path) -> Check:
    target = path if path.exists() else Path.cwd()
    usage = shutil.disk_usage(target)
    free_gb = usage.free / 1e9
    detail = f"{free_gb:.1f} GB free of {usage.total / 1e9:.1f} GB at {target}"
    if free_gb < 0.2:
        return Check("disk", "fail", detail, "free space: delete old results or use a larger card")
    if free_gb < 1.0:
        return Check("disk", "warn", detail, "results stop being stored when the disk is full")
    return Check("disk", "ok", detail)


def check_bundles(folder: Path) -> list[Check]:
    from .errors import FieldScopeError
    from .inference.bundle import load_bundle

    if not folder.is_dir():
        return [
            Check(
                "models",
                "fail",
                f"no models folder at {folder}",
                "copy the bundles into models/ or set FIELDSCOPE_MODELS",
            )
        ]
    bundles = sorted(p for p in folder.iterdir() if (p / "manifest.json").is_file())
    if not bundles:
        return [
            Check(
                "models",
                "fail",
                f"no bundles in {folder}",
                "copy a bundle folder (with manifest.json) into it",
            )
        ]
    out = []
    for path in bundles:
        try:
            bundle = load_bundle(path)
        except FieldScopeError as exc:
            out.append(Check(f"model {path.name}", "fail", exc.message, exc.hint or ""))
            continue
        kinds = ", ".join(sorted(bundle.artifacts))
        if bundle.scope is None:
            out.append(Check(
                f"model {path.name}", "warn",
                f"{bundle.name} {bundle.version} ({kinds}): no scope check, so images that are "
                "not for it are classified anyway, and no activation maps",
                f"add one with `python -m training scope --model {path}`",
            ))
            continue
        scope = f"scope check at {bundle.scope.threshold:.2f}"
        out.append(Check(f"model {path.name}", "ok",
                         f"{bundle.name} {bundle.version} ({kinds}; {scope})"))
    return out


def check_platform(machine: str | None = None, version: tuple[int, int] | None = None) -> Check:
    """A 32-bit OS or an old Python: the kit's wheels and code need 64-bit and 3.11+."""
    import platform
    import sys

    machine = machine or platform.machine()
    version = version or sys.version_info[:2]
    if machine in ("armv7l", "armv6l", "armhf", "i686", "i386"):
        return Check("platform", "fail", f"a 32-bit OS ({machine})",
                     "flash 64-bit Raspberry Pi OS (Bookworm, arm64) with Raspberry Pi Imager")
    if version < (3, 11):
        return Check("platform", "fail", f"Python {version[0]}.{version[1]}",
                     "FieldScope needs Python 3.11 or newer: Raspberry Pi OS Bookworm has it")
    return Check("platform", "ok", f"{machine}, Python {version[0]}.{version[1]}")


def check_kit_name(hostname: str | None = None) -> Check:
    """A host name every fresh Pi has makes a poor kit id (MQTT client ids and topics)."""
    import socket

    from .config import GENERIC_HOSTNAMES, default_kit_id

    host = hostname or socket.gethostname()
    if host.split(".")[0].lower() in GENERIC_HOSTNAMES:
        return Check(
            "kit name", "warn",
            f"the host name {host!r} is the default of every fresh install; the kit id "
            f"becomes {default_kit_id(host)!r} (from /etc/machine-id) unless [kit] id is set",
            "name the kit: `sudo hostnamectl set-hostname fieldscope-01`, or [kit] id in the "
            "config",
        )
    return Check("kit name", "ok", host)


def run_checks(models: str | None = None, data_dir: str | None = None) -> list[Check]:
    folder = Path(models) if models else models_dir()
    checks = [
        check_platform(),
        check_runtime(),
        check_libedgetpu(),
        check_edgetpu(),
        check_cameras(),
        check_groups(),
        check_governor(),
        check_thermal(),
        check_disk(Path(data_dir) if data_dir else folder),
        check_kit_name(),
    ]
    checks.extend(check_bundles(folder))
    return checks


def render(checks: list[Check]) -> str:
    marks = {"ok": "  ok ", "warn": " warn", "fail": " FAIL"}
    lines = []
    for c in checks:
        lines.append(f"[{marks[c.status]}] {c.name}: {c.detail}")
        if c.fix and c.status != "ok":
            lines.append(f"         fix: {c.fix}")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    lines.append(f"{len(checks)} checks: {failed} failed, {warned} warnings")
    return "\n".join(lines)
