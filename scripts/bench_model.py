#!/usr/bin/env python3
"""Latency of each artifact of a bundle (or a bare .tflite) on each backend and thread count.

Warm-up, then N timed invokes: p50/p90/p99, throughput, peak memory; preprocessing time from
camera-sized frames (640×480 and 1280×960) to the model input; the machine (CPU, governor,
temperature and throttling before and after, runtime and libedgetpu versions). For Coral's
reference MobileNet v2 the published figures are printed beside ours, marked as published.

Usage: python scripts/bench_model.py --model models/blood-smear [--threads 1,2] [--runs 200]
       [--json FILE] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

# As the daemon does (edge/__init__.py), before numpy loads: OpenBLAS threads spinning beside
# the interpreter doubled the CPU each frame cost here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge import hardware  # noqa: E402
from edge.errors import FieldScopeError  # noqa: E402
from edge.inference.backends.edgetpu import runtime_version  # noqa: E402
from edge.inference.bundle import load_model  # noqa: E402
from edge.inference.classifier import Classifier  # noqa: E402
from edge.inference.runtime import resolve_runtime  # noqa: E402

PUBLISHED = {  # clearly not ours: from Coral's published benchmarks
    "mobilenet_v2_1.0_224_quant": [
        ("Coral Edge TPU benchmarks: desktop CPU", "cpu", 51.0),
        ("Coral Edge TPU benchmarks: USB Accelerator", "edgetpu", 2.6),
        ("pycoral reference CSV: Raspberry Pi 4 + USB Accelerator", "edgetpu", 4.55),
        ("pycoral reference CSV: x86-64 + USB Accelerator (USB 3.0)", "edgetpu", 2.29),
    ],
}


def machine() -> dict:
    flags = hardware.pi_throttled()
    return {
        "cpu": hardware.cpu_model(),
        "cores": __import__("os").cpu_count(),
        "arch": platform.machine(),
        "governors": sorted(set(hardware.cpu_governors())),
        "temperature_c": hardware.cpu_temperature_c(),
        "throttled": hardware.decode_throttled(flags) if flags is not None else None,
        "runtime": resolve_runtime().label,
        "libedgetpu": runtime_version(),
    }


def time_invokes(backend, runs: int, warmup: int = 10) -> dict:
    d = backend.input_detail
    x = np.zeros(d["shape"], dtype=d["dtype"])
    for _ in range(warmup):
        backend.invoke(x)
    times = []
    t_all = time.perf_counter()
    for _ in range(runs):
        t = time.perf_counter()
        backend.invoke(x)
        times.append((time.perf_counter() - t) * 1e3)
    wall = time.perf_counter() - t_all
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return {
        "p50_ms": round(p50, 3),
        "p90_ms": round(p90, 3),
        "p99_ms": round(p99, 3),
        "throughput_fps": round(runs / wall, 1),
    }


def time_preprocess(clf: Classifier, runs: int = 50) -> dict:
    out = {}
    rng = np.random.default_rng(0)
    for w, h in ((640, 480), (1280, 960)):
        frame = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        clf.prepare(frame)
        t = time.perf_counter()
        for _ in range(runs):
            clf.adapter(clf.prepare(frame)[0])
        out[f"{w}x{h}_ms"] = round((time.perf_counter() - t) * 1e3 / runs, 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "blood-smear"))
    ap.add_argument("--labels")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--json", help="write the JSON report here")
    ap.add_argument("--markdown", help="write the Markdown table here")
    args = ap.parse_args()
    bundle = load_model(args.model, args.labels)
    before = machine()
    rows = []
    for kind, art in bundle.artifacts.items():
        for backend_name in ("cpu", "edgetpu"):
            if (kind == "edgetpu") != (backend_name == "edgetpu"):
                continue
            for threads in [int(t) for t in args.threads.split(",")]:
                row = {
                    "artifact": kind,
                    "file": art.path.name,
                    "backend": backend_name,
                    "threads": threads,
                    "size_mb": round(art.path.stat().st_size / 1e6, 2),
                }
                try:
                    clf = Classifier(bundle.only(kind), backend=backend_name, threads=threads)
                    row.update(time_invokes(clf.backend, args.runs))
                    row["preprocess"] = time_preprocess(clf)
                    clf.close()
                except FieldScopeError as exc:
                    row["skipped"] = exc.message
                rows.append(row)
    after = machine()
    report = {
        "model": bundle.name,
        "machine_before": before,
        "machine_after": after,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "results": rows,
        "published": PUBLISHED.get(bundle.name, []),
    }
    warnings = []
    if before["governors"] and before["governors"] != ["performance"]:
        warnings.append(f"CPU governor is {before['governors']}, not performance")
    if after["throttled"]:
        warnings.append(f"throttling during the run: {after['throttled']}")
    report["warnings"] = warnings
    md = [
        f"Model `{bundle.name}` on {before['cpu']} ({before['cores']} cores, {before['arch']}), "
        f"{before['runtime']}, libedgetpu {before['libedgetpu'] or 'not installed'}",
        "",
        "| artifact | backend | threads | size | p50 | p90 | p99 | fps | preprocess 640×480 | "
        "1280×960 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            md.append(
                f"| {r['artifact']} | {r['backend']} | {r['threads']} | {r['size_mb']} MB "
                f"| skipped: {r['skipped']} ||||||"
            )
            continue
        pre = r["preprocess"]
        md.append(
            f"| {r['artifact']} | {r['backend']} | {r['threads']} | {r['size_mb']} MB | "
            f"{r['p50_ms']} ms | {r['p90_ms']} ms | {r['p99_ms']} ms | "
            f"{r['throughput_fps']} | {pre['640x480_ms']} ms | {pre['1280x960_ms']} ms |"
        )
    for label, backend, ms in report["published"]:
        md.append(f"| published: {label} | {backend} | | | {ms} ms | | | | | |")
    md += [f"> warning: {w}" for w in warnings]
    text = "\n".join(md)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
