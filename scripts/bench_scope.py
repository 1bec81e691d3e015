#!/usr/bin/env python3
"""What the scope check and the activation maps add per frame, for each bundle.

Times, on the bundle's own samples through the kit's classifier at 1 thread: a live frame
without the scope check (the same model file with the scope removed from the manifest), the
same with it (the added cost is the scope check plus copying the feature outputs), and a
capture's activation maps. Prints medians and the machine line (CPU flags).

Usage: python scripts/bench_scope.py [--model models/skin-lesion ...] [--runs 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge import hardware  # noqa: E402  (first: it pins numpy's BLAS threads)
from edge.inference.bundle import load_bundle  # noqa: E402
from edge.inference.classifier import Classifier  # noqa: E402


def _median_ms(fn, runs: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench(model: Path, runs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        plain_dir = Path(tmp) / "plain"
        shutil.copytree(model, plain_dir)
        manifest = json.loads((plain_dir / "manifest.json").read_text())
        manifest.pop("scope", None)
        (plain_dir / "manifest.json").write_text(json.dumps(manifest))
        with_scope = Classifier(load_bundle(model), backend="cpu", threads=1)
        plain = Classifier(load_bundle(plain_dir), backend="cpu", threads=1)
        sample = sorted((model / "samples").glob("*.jpg"))[0]
        small, _ = with_scope.prepare(str(sample))
        bare = _median_ms(lambda: plain.infer(small), runs)
        scoped = _median_ms(lambda: with_scope.infer(small), runs)
        maps = [with_scope.infer(small, explain=True).timings_ms["map"] for _ in range(runs)]
        scope_only = [with_scope.infer(small).timings_ms["scope"] for _ in range(runs)]
    return {
        "model": model.name,
        "live_frame_ms_without_scope": round(bare, 3),
        "live_frame_ms_with_scope": round(scoped, 3),
        "added_per_live_frame_ms": round(scoped - bare, 3),
        "scope_check_ms": round(statistics.median(scope_only), 3),
        "map_per_capture_ms": round(statistics.median(maps), 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", type=Path)
    p.add_argument("--runs", type=int, default=200)
    args = p.parse_args()
    models = args.model or [ROOT / "models" / "blood-smear", ROOT / "models" / "skin-lesion"]
    print(hardware.machine_line())
    for m in models:
        r = bench(m, args.runs)
        print(
            f"{r['model']}: live frame {r['live_frame_ms_without_scope']:.2f} ms without the "
            f"scope check, {r['live_frame_ms_with_scope']:.2f} ms with it (+"
            f"{r['added_per_live_frame_ms']:.2f} ms; the check itself {r['scope_check_ms']:.2f}"
            f" ms); activation maps {r['map_per_capture_ms']:.2f} ms per capture (1 thread)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
