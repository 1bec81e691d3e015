"""CPU backend: the TFLite interpreter with its built-in (XNNPACK) kernels."""

from __future__ import annotations

from typing import Any

from ...errors import ModelError
from ..tflite_file import is_edgetpu_compiled, read_model_bytes
from .base import Backend


class CpuBackend(Backend):
    name = "cpu"

    def _build_interpreter(self) -> Any:
        data = read_model_bytes(self.artifact.path)
        if is_edgetpu_compiled(data):
            raise ModelError(
                f"{self.artifact.path.name} is compiled for the Edge TPU (it holds "
                "edgetpu-custom-op) and cannot run on the CPU",
                "use --backend edgetpu with a Coral attached, or the plain int8 model "
                "(the file without _edgetpu) for the CPU",
            )
        try:
            interp = self.runtime.interpreter_cls(
                model_path=str(self.artifact.path), num_threads=self.threads
            )
        except (RuntimeError, ValueError) as exc:
            raise ModelError(
                f"{self.artifact.path.name}: the runtime cannot read this model: {exc}",
                "re-export it, or upgrade the runtime (`pip install -U ai-edge-litert`)",
            ) from exc
        return self._allocate(interp)
