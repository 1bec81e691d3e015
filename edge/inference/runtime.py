"""Find a TFLite interpreter: LiteRT first, then tflite-runtime, then TensorFlow.

A Pi has only one of them installed, a developer machine may have all three. The first that
imports *and* works wins; the reasons the others were skipped are kept for ``doctor``.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import RuntimeMissingError

# Order of preference. FIELDSCOPE_RUNTIME=<name> restricts the search to one of them.
CANDIDATES = ("ai_edge_litert", "tflite_runtime", "tensorflow")
PIP_NAMES = {
    "ai_edge_litert": "ai-edge-litert",
    "tflite_runtime": "tflite-runtime",
    "tensorflow": "tensorflow",
}


def usable_cores() -> int:
    """The cores this process may run on (a container or taskset can allow fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Runtime:
    """The interpreter class and delegate loader of one installed package."""

    name: str
    version: str
    interpreter_cls: Callable[..., Any]
    load_delegate: Callable[..., Any]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{PIP_NAMES[self.name]} {self.version}"


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def tflite_runtime_numpy_problem(tflite_version: str, numpy_version: str) -> str | None:
    """tflite-runtime up to 2.14 (its last release) is built against numpy 1 and breaks on 2."""
    if _version_tuple(tflite_version) < (2, 15) and _version_tuple(numpy_version) >= (2,):
        return (
            f"tflite-runtime {tflite_version} was built for numpy 1.x but numpy {numpy_version} "
            "is installed: run `pip install 'numpy<2'` or install ai-edge-litert instead"
        )
    return None


def _load(name: str) -> Runtime:
    if name == "ai_edge_litert":
        mod = importlib.import_module("ai_edge_litert.interpreter")
        from importlib.metadata import version

        return Runtime(name, version("ai-edge-litert"), mod.Interpreter, mod.load_delegate)
    if name == "tflite_runtime":
        import numpy

        mod = importlib.import_module("tflite_runtime.interpreter")
        pkg = importlib.import_module("tflite_runtime")
        ver = getattr(pkg, "__version__", "0")
        problem = tflite_runtime_numpy_problem(ver, numpy.__version__)
        if problem:
            raise ImportError(problem)
        return Runtime(name, ver, mod.Interpreter, mod.load_delegate)
    if name == "tensorflow":
        tf = importlib.import_module("tensorflow")
        lite = tf.lite
        return Runtime(name, tf.__version__, lite.Interpreter, lite.experimental.load_delegate)
    raise ValueError(name)


@functools.lru_cache(maxsize=1)
def resolve_runtime() -> Runtime:
    """Return the first working runtime, or raise with why each candidate was rejected."""
    wanted = os.environ.get("FIELDSCOPE_RUNTIME", "").strip()
    if wanted and wanted not in CANDIDATES:
        raise RuntimeMissingError(
            f"FIELDSCOPE_RUNTIME={wanted!r} is not a known runtime",
            f"use one of {', '.join(CANDIDATES)} or unset it",
        )
    candidates = (wanted,) if wanted else CANDIDATES
    skipped: dict[str, str] = {}
    for name in candidates:
        try:
            rt = _load(name)
        except ImportError as exc:  # includes ModuleNotFoundError
            skipped[name] = str(exc) or type(exc).__name__
            continue
        except Exception as exc:  # a broken install: keep looking, report it
            skipped[name] = f"{type(exc).__name__}: {exc}"
            continue
        return Runtime(rt.name, rt.version, rt.interpreter_cls, rt.load_delegate, skipped)
    detail = "; ".join(f"{PIP_NAMES[k]}: {v}" for k, v in skipped.items())
    raise RuntimeMissingError(
        f"no TensorFlow Lite runtime could be loaded ({detail})",
        "install one: `pip install ai-edge-litert` (or `make install`)",
    )
