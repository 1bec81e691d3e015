"""Edge TPU: a preflight of the int8 model against the TPU's documented limits, and compilation.

The preflight reports per op whether the Edge TPU compiler can map it (documented op list,
quantised tensors, static shapes, at most 3 dimensions larger than 1). The compiler itself,
``edgetpu_compiler``, ships only for x86-64 Linux from Coral's package repository; when it is not
on PATH the kit says so and how to get it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .export import ops_of

# Ops the Edge TPU compiler maps (coral.ai/docs/edgetpu/models-intro, "Supported operations").
EDGETPU_OPS = {
    "ADD",
    "AVERAGE_POOL_2D",
    "CONCATENATION",
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "DEQUANTIZE",
    "EXP",
    "FULLY_CONNECTED",
    "GATHER",
    "L2_NORMALIZATION",
    "LOGISTIC",
    "LSTM",
    "MAXIMUM",
    "MAX_POOL_2D",
    "MEAN",
    "MINIMUM",
    "MUL",
    "PACK",
    "PAD",
    "PRELU",
    "QUANTIZE",
    "REDUCE_MAX",
    "REDUCE_MIN",
    "RELU",
    "RELU6",
    "RELU_N1_TO_1",
    "RESHAPE",
    "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR",
    "RSQRT",
    "SLICE",
    "SOFTMAX",
    "SPACE_TO_DEPTH",
    "SPLIT",
    "SQUARED_DIFFERENCE",
    "SQUEEZE",
    "STRIDED_SLICE",
    "SUB",
    "SUM",
    "SQRT",
    "TANH",
    "TRANSPOSE",
    "TRANSPOSE_CONV",
    "HARD_SWISH",
}
QUANT_TYPES = {np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int32)}
INSTALL_COMPILER = (
    "edgetpu_compiler runs on x86-64 Linux only: add Coral's apt repository "
    "(https://coral.ai/docs/edgetpu/compiler/) and `sudo apt install edgetpu-compiler`, then run "
    "`python -m training compile --model BUNDLE` again"
)


@dataclass
class OpReport:
    index: int
    op: str
    ok: bool
    reasons: list[str]


def preflight(path: Path) -> list[OpReport]:
    reports = []
    for op in ops_of(path):
        reasons = []
        if op["op"] not in EDGETPU_OPS:
            reasons.append(f"{op['op']} is not an Edge TPU op")
        for t in op["tensors"]:
            if np.dtype(t["dtype"]) not in QUANT_TYPES:
                reasons.append(f"tensor {t['name']} is {np.dtype(t['dtype']).name}, not quantised")
            sig = t.get("shape_signature", t["shape"])
            if any(int(d) < 0 for d in sig):
                reasons.append(f"tensor {t['name']} has a dynamic shape {[int(d) for d in sig]}")
        for t in op["activations"]:  # the limit is on activations, not on weights
            if sum(int(d) > 1 for d in t["shape"]) > 3:
                reasons.append(f"tensor {t['name']} has more than 3 dimensions larger than 1")
        reports.append(OpReport(op["index"], op["op"], not reasons, reasons))
    return reports


def render_preflight(reports: list[OpReport]) -> str:
    bad = [r for r in reports if not r.ok]
    lines = [f"{len(reports) - len(bad)}/{len(reports)} ops can map to the Edge TPU"]
    for r in bad:
        lines.append(f"  op {r.index} {r.op}: {'; '.join(r.reasons)}")
    if bad:
        lines.append("  the compiler runs everything from the first unmappable op on the CPU")
    return "\n".join(lines)


def parse_compiler_log(text: str) -> dict:
    """Numbers from edgetpu_compiler's log: ops on TPU vs CPU, on-chip memory used."""
    out: dict = {}
    m = re.search(r"Number of operations that will run on Edge TPU:\s*(\d+)", text)
    if m:
        out["ops_on_tpu"] = int(m.group(1))
    m = re.search(r"Number of operations that will run on CPU:\s*(\d+)", text)
    if m:
        out["ops_on_cpu"] = int(m.group(1))
    for key, label in (
        ("on_chip_memory", "On-chip memory used for caching model parameters"),
        ("off_chip_memory", "Off-chip memory used for streaming uncached model parameters"),
    ):
        m = re.search(re.escape(label) + r":\s*([\d.]+\s*\w+)", text)
        if m:
            out[key] = m.group(1)
    m = re.search(r"Edge TPU Compiler version\s*([\d.]+)", text)
    if m:
        out["compiler_version"] = m.group(1)
    return out


class CompilerMissing(RuntimeError):
    pass


def compile_model(int8_path: Path, out_dir: Path, runtime_version: int = 14) -> tuple[Path, dict]:
    """Run edgetpu_compiler; returns the compiled file and the parsed log."""
    exe = shutil.which("edgetpu_compiler")
    if exe is None:
        raise CompilerMissing(f"edgetpu_compiler is not installed. {INSTALL_COMPILER}")
    proc = subprocess.run(
        [exe, "-s", "-m", str(runtime_version), "-o", str(out_dir), str(int8_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"edgetpu_compiler failed:\n{proc.stdout}\n{proc.stderr}")
    compiled = out_dir / f"{int8_path.stem}_edgetpu.tflite"
    log = parse_compiler_log(proc.stdout)
    log["runtime_version"] = runtime_version
    return compiled, log
