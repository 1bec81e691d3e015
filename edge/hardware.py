"""What the host has: Edge TPUs on USB or PCIe, cameras, Pi temperature and throttling.

Everything reads plain files under ``/sys``, ``/dev`` and ``/proc`` so it works without root and
without extra packages. ``FIELDSCOPE_HOST_ROOT`` prefixes those paths, which lets tests and the
doctor run against a recorded host tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Coral USB Accelerator: Global Unichip id before its firmware is loaded, Google's id after.
CORAL_USB_IDS = {("1a6e", "089a"): "Coral USB (no firmware yet)", ("18d1", "9302"): "Coral USB"}


def host_path(path: str) -> Path:
    root = os.environ.get("FIELDSCOPE_HOST_ROOT", "")
    return Path(root + path) if root else Path(path)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


@dataclass(frozen=True)
class TpuDevice:
    kind: str  # "usb" or "pci"
    path: str
    description: str


def find_edgetpus() -> list[TpuDevice]:
    """Edge TPUs visible to the kernel: USB ids in sysfs and /dev/apex_* nodes (PCIe/M.2)."""
    found: list[TpuDevice] = []
    usb = host_path("/sys/bus/usb/devices")
    if usb.is_dir():
        for dev in sorted(usb.iterdir()):
            ids = (_read(dev / "idVendor"), _read(dev / "idProduct"))
            if ids in CORAL_USB_IDS:
                found.append(TpuDevice("usb", dev.name, f"{CORAL_USB_IDS[ids]} {ids[0]}:{ids[1]}"))
    dev_dir = host_path("/dev")
    if dev_dir.is_dir():
        for node in sorted(dev_dir.glob("apex_*")):
            found.append(TpuDevice("pci", str(node), "Coral PCIe/M.2 (gasket/apex driver)"))
    return found


def find_video_devices() -> list[str]:
    dev_dir = host_path("/dev")
    return [str(p) for p in sorted(dev_dir.glob("video*"))] if dev_dir.is_dir() else []


def cpu_governors() -> list[str]:
    base = host_path("/sys/devices/system/cpu")
    govs = []
    for f in sorted(base.glob("cpu[0-9]*/cpufreq/scaling_governor")):
        value = _read(f)
        if value:
            govs.append(value)
    return govs


def cpu_temperature_c() -> float | None:
    raw = _read(host_path("/sys/class/thermal/thermal_zone0/temp"))
    try:
        return int(raw) / 1000.0 if raw else None
    except ValueError:
        return None


# Bits of `vcgencmd get_throttled` (Raspberry Pi firmware).
THROTTLE_BITS = {
    0: "under-voltage now",
    1: "ARM frequency capped now",
    2: "throttled now",
    3: "soft temperature limit now",
    16: "under-voltage has occurred",
    17: "frequency capping has occurred",
    18: "throttling has occurred",
    19: "soft temperature limit has occurred",
}


def decode_throttled(value: int) -> list[str]:
    return [text for bit, text in THROTTLE_BITS.items() if value & (1 << bit)]


def pi_throttled() -> int | None:
    """The firmware's throttle flags, from sysfs (Pi OS kernels) or vcgencmd."""
    raw = _read(host_path("/sys/devices/platform/soc/soc:firmware/get_throttled"))
    if raw is not None:
        try:
            return int(raw, 16)
        except ValueError:
            return None
    if shutil.which("vcgencmd") and not os.environ.get("FIELDSCOPE_HOST_ROOT"):
        try:
            out = subprocess.run(
                ["vcgencmd", "get_throttled"], capture_output=True, text=True, timeout=2
            ).stdout
            return int(out.strip().split("=")[1], 16)
        except (OSError, subprocess.SubprocessError, IndexError, ValueError):
            return None
    return None


def cpu_model() -> str:
    text = _read(host_path("/proc/cpuinfo")) or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware"):
            return value.strip()
    return os.uname().machine


# The vector extensions that decide int8 (and training) speed, as /proc/cpuinfo names them.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "asimddp")


def cpu_extensions() -> list[str]:
    """Which of :data:`SPEED_FLAGS` this CPU has: int8 speed differs about 5x between a CPU
    with AVX-512 VNNI and one with AVX2 only, so figures are reported with these."""
    text = _read(host_path("/proc/cpuinfo")) or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            have = set(value.split())
            return [f for f in SPEED_FLAGS if f in have]
    return []


def machine_line() -> str:
    """The CPU and its speed-relevant flags in one line, printed beside benchmark figures."""
    return f"{cpu_model()} · {' '.join(cpu_extensions()) or 'no SIMD flags read'}"
