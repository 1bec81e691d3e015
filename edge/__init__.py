"""FieldScope edge runtime: classify images on a Raspberry Pi, on the CPU or a Coral Edge TPU.

Nothing here imports TensorFlow: the Pi runs LiteRT (or tflite-runtime) only.
"""

from __future__ import annotations

import os

# The interpreter owns the cores. numpy's own products here (the scope check, the activation
# maps) are small, and OpenBLAS threads waking for each cost more than they save (0.3 ms
# single-threaded against 3 ms with a busy second core, measured). Set before numpy loads;
# a value from the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"

__all__ = ["Classifier", "Result", "__version__", "load_model"]


def __getattr__(name: str):  # lazy: `import edge` stays cheap and numpy-free
    if name in ("Classifier", "Result"):
        from .inference import classifier

        return getattr(classifier, name)
    if name == "load_model":
        from .inference.bundle import load_model

        return load_model
    raise AttributeError(name)
