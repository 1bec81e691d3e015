#!/usr/bin/env python3
"""How long a profile switch takes: the daemon's pipeline (as ``build`` makes it) on a config
with profiles, switched back and forth; prints each switch and the median, with the machine.

Usage: python scripts/bench_switch.py [--config scripts/demo.toml] [--switches 10]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge import hardware  # noqa: E402
from edge.config import load_config  # noqa: E402
from edge.serve import build  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "scripts" / "demo.toml"))
    ap.add_argument("--switches", type=int, default=10)
    ap.add_argument("--settle", type=float, default=0.5, help="seconds between switches")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as data:
        cfg = load_config(args.config, {"storage.data_dir": data})
        profiles = list(cfg.all_profiles())
        if len(profiles) < 2:
            sys.exit(f"{args.config}: needs at least two [profiles]")
        pipe, _, store = build(cfg, profiles[0])
        pipe.start()
        try:
            time.sleep(1.0)
            times = []
            for i in range(args.switches):
                target = profiles[(i + 1) % len(profiles)]
                t = time.perf_counter()
                pipe.switch_profile(target)
                times.append((time.perf_counter() - t) * 1e3)
                print(f"→ {target:<16} {times[-1]:7.1f} ms")
                time.sleep(args.settle)
        finally:
            pipe.stop()
            store.close()
    print(f"median {statistics.median(times):.0f} ms, max {max(times):.0f} ms over "
          f"{len(times)} switches · {hardware.machine_line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
