"""Inference backends and the policy that chooses one: ``auto``, ``cpu`` or ``edgetpu``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ...errors import EdgeTpuError, ModelError
from ...hardware import find_edgetpus
from ..bundle import Bundle
from ..runtime import Runtime, resolve_runtime
from .base import Backend
from .cpu import CpuBackend
from .edgetpu import EdgeTpuBackend

log = logging.getLogger(__name__)
POLICIES = ("auto", "cpu", "edgetpu")

__all__ = [
    "CpuBackend",
    "EdgeTpuBackend",
    "POLICIES",
    "Backend",
    "Selection",
    "open_backend",
    "open_cpu",
    "open_edgetpu",
]


@dataclass
class Selection:
    backend: Backend
    reason: str  # why this backend was chosen, shown on the page and in `classify`


def open_cpu(bundle: Bundle, runtime: Runtime, threads: int | None, why: str) -> Selection:
    artifact = bundle.cpu_artifact()
    if artifact is None:
        raise ModelError(
            f"{bundle.name}: the model is compiled for the Edge TPU (it holds edgetpu-custom-op) "
            f"and cannot run on the CPU, and no Edge TPU is usable here ({why})",
            "attach a Coral, or use the plain int8 model (the file without _edgetpu) for the CPU",
        )
    return Selection(CpuBackend(artifact, runtime, threads), why)


def open_edgetpu(
    bundle: Bundle, runtime: Runtime, threads: int | None, device: str | None
) -> Selection:
    artifact = bundle.artifacts.get("edgetpu")
    if artifact is None:
        raise EdgeTpuError(
            f"bundle {bundle.name} has no Edge TPU artifact",
            "compile its int8 model with `python -m training compile`, or use --backend cpu",
        )
    if not find_edgetpus():
        raise EdgeTpuError(
            "no Edge TPU found (no USB device 1a6e:089a or 18d1:9302, no /dev/apex_*)",
            "plug the Coral into a USB 3 port or a powered hub; `python -m edge doctor` checks it",
        )
    backend = EdgeTpuBackend(artifact, runtime, threads, device=device)
    return Selection(backend, f"Edge TPU ({backend.device or 'first device'})")


def open_backend(
    bundle: Bundle,
    policy: str = "auto",
    threads: int | None = None,
    device: str | None = None,
    runtime: Runtime | None = None,
) -> Selection:
    """Open a backend for ``bundle`` by ``policy``; ``auto`` never fails for want of a TPU."""
    if policy not in POLICIES:
        raise ValueError(f"backend must be one of {', '.join(POLICIES)}, not {policy!r}")
    runtime = runtime or resolve_runtime()
    if policy == "cpu":
        return open_cpu(bundle, runtime, threads, "CPU requested")
    if policy == "edgetpu":
        return open_edgetpu(bundle, runtime, threads, device)
    if "edgetpu" not in bundle.artifacts:
        why = "CPU: the bundle has no Edge TPU artifact"
    else:
        try:
            return open_edgetpu(bundle, runtime, threads, device)
        except EdgeTpuError as exc:
            why = f"CPU fallback: {exc.message}"
    log.info("using the CPU (%s)", why)
    return open_cpu(bundle, runtime, threads, why)
