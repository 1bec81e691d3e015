"""Edge TPU backend: the TFLite interpreter with Coral's ``libedgetpu`` delegate.

pycoral is not needed: the delegate is loaded with the runtime's own ``load_delegate``, as
pycoral does internally. When pycoral is installed it is only asked for the runtime version.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
import subprocess
from typing import Any

from ...errors import EdgeTpuError
from ..tflite_file import is_edgetpu_compiled, read_model_bytes
from .base import Backend

log = logging.getLogger(__name__)

_LIB_NAMES = {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}
_DEVICE = re.compile(r"^(usb|pci)?(:\d+)?$")
INSTALL_HINT = (
    "install the Edge TPU runtime: `sudo apt install libedgetpu1-std` from Coral's package "
    "repository (scripts/install.sh does it, also offline from local .deb files)"
)


def edgetpu_library() -> str:
    """Library name or path; FIELDSCOPE_EDGETPU_LIB overrides it (e.g. a custom build)."""
    return os.environ.get("FIELDSCOPE_EDGETPU_LIB") or _LIB_NAMES.get(
        platform.system(), "libedgetpu.so.1"
    )


def parse_device(device: str | None) -> str | None:
    """Validate Coral's device strings: usb, usb:N, pci, pci:N, :N (N-th TPU of any kind)."""
    if device in (None, ""):
        return None
    if not _DEVICE.match(device):
        raise EdgeTpuError(
            f"bad Edge TPU device {device!r}",
            "use usb, usb:0, pci, pci:0 or :0 (the first TPU of any kind)",
        )
    return device


def runtime_version() -> str | None:
    """libedgetpu's version, from pycoral when installed, else from the package manager."""
    try:
        from pycoral.utils import edgetpu as pycoral_edgetpu

        return str(pycoral_edgetpu.get_runtime_version())
    except Exception:  # pycoral absent or broken: not required
        pass
    for pkg in ("libedgetpu1-std", "libedgetpu1-max"):
        try:
            out = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", pkg],
                capture_output=True,
                text=True,
                timeout=5,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode == 0 and out.stdout.strip():
            return f"{pkg} {out.stdout.strip()}"
    return None


def explain_delegate_failure(exc: BaseException) -> str:
    text = str(exc)
    if "version" in text.lower():
        return (
            f"the Edge TPU runtime is too old for this model ({text.strip()}); install a newer "
            "libedgetpu1-std or recompile the model with `edgetpu_compiler -m <runtime version>`"
        )
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return ": ".join(lines) if lines else type(exc).__name__


def load_edgetpu_delegate(runtime: Any, device: str | None = None) -> Any:
    """Load libedgetpu through the runtime; raise EdgeTpuError saying why it failed."""
    options = {"device": device} if device else {}
    library = edgetpu_library()
    try:
        # dlopen first: a missing library is then an OSError we can explain, and the runtime's
        # Delegate object is never half-built.
        ctypes.CDLL(library)
    except OSError as exc:
        raise EdgeTpuError(f"Edge TPU runtime {library} not found ({exc})", INSTALL_HINT) from exc
    try:
        return runtime.load_delegate(library, options)
    except (ValueError, RuntimeError, OSError) as exc:
        raise EdgeTpuError(
            f"Edge TPU delegate {library} failed to load: {explain_delegate_failure(exc)}",
            "check the Coral is plugged in (a USB 3 port, or a powered hub), the udev rules are "
            "installed and the user is in plugdev; `python -m edge doctor` checks all of these",
        ) from exc


class EdgeTpuBackend(Backend):
    name = "edgetpu"

    def __init__(self, artifact, runtime, threads=None, device: str | None = None) -> None:
        self.device = parse_device(device)
        super().__init__(artifact, runtime, threads)

    def _build_interpreter(self) -> Any:
        data = read_model_bytes(self.artifact.path)
        if not is_edgetpu_compiled(data):
            log.warning(
                "%s is not compiled for the Edge TPU: every op will run on the CPU",
                self.artifact.path.name,
            )
        delegate = load_edgetpu_delegate(self.runtime, self.device)
        try:
            interp = self.runtime.interpreter_cls(
                model_path=str(self.artifact.path),
                experimental_delegates=[delegate],
                num_threads=self.threads,
            )
            interp.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            raise EdgeTpuError(
                f"the Edge TPU could not run {self.artifact.path.name}: "
                f"{explain_delegate_failure(exc)}",
                "replug the Coral; if it persists, recompile the model for this runtime",
            ) from exc
        self._delegate = delegate  # keep it alive as long as the interpreter
        return interp

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": self.device or "auto"}
