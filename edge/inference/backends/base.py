"""The one interface every inference backend implements (CPU, Edge TPU, ...)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from ...errors import ModelError
from ..bundle import Artifact
from ..runtime import Runtime


class Backend(ABC):
    """Runs one model artifact. Subclasses only decide how the interpreter is built."""

    name: str = "?"

    def __init__(self, artifact: Artifact, runtime: Runtime, threads: int | None = None) -> None:
        self.artifact = artifact
        self.runtime = runtime
        self.threads = threads
        self.interpreter = self._build_interpreter()
        self.input_detail = self.interpreter.get_input_details()[0]
        outputs = self.interpreter.get_output_details()
        # The class output comes first; a bundle with a scope check adds feature maps (taps).
        ranked = [d for d in outputs if len(d["shape"]) == 2] or outputs
        self.output_detail = ranked[0]
        self.tap_details = [d for d in outputs if d is not ranked[0]]

    @abstractmethod
    def _build_interpreter(self) -> Any: ...

    def _allocate(self, interpreter: Any) -> Any:
        try:
            interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            raise ModelError(
                f"{self.artifact.path.name}: cannot prepare the model: {exc}",
                "the file is damaged or needs ops this runtime lacks; re-export it",
            ) from exc
        return interpreter

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.input_detail["shape"])

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(self.input_detail["dtype"])

    @property
    def output_size(self) -> int:
        return int(np.prod(self.output_detail["shape"]))

    def invoke(self, tensor: np.ndarray) -> np.ndarray:
        """Run one input (batch of 1) and return a copy of the raw output."""
        self.interpreter.set_tensor(self.input_detail["index"], tensor)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output_detail["index"]).copy()

    def invoke_with_taps(
        self, tensor: np.ndarray, taps: list[int]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Like :meth:`invoke`, also returning copies of the feature outputs ``taps`` (indices
        into ``tap_details``)."""
        out = self.invoke(tensor)
        get = self.interpreter.get_tensor
        return out, [get(self.tap_details[i]["index"]).copy() for i in taps]

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "artifact": self.artifact.kind,
            "file": self.artifact.path.name,
            "runtime": self.runtime.label,
            "threads": self.threads,
        }

    def close(self) -> None:
        self.interpreter = None
