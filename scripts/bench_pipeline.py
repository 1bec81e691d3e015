#!/usr/bin/env python3
"""Throughput of the daemon's real pipeline vs a bare interpreter loop vs a naive loop.

All run in one process on the same model and thread count, fed with camera-sized frames from
memory. One pipeline runs for the whole benchmark; the loops take turns in short slices (bare,
naive, pipeline, pipeline with clients, then again), because a shared machine drifts by 10-20 %
over a minute: each ratio is taken within its round and the report gives the median over rounds.

- bare: set_tensor/invoke/get_tensor on an already preprocessed input (the ceiling), on the
  pipeline's own interpreter while the pipeline is held;
- naive: what common examples do per frame: PIL open/convert/resize, set, invoke, read (its own
  interpreter, the pipeline held meanwhile);
- pipeline: edge.daemon.pipeline.Pipeline (capture thread, quality gate, classifier,
  smoothing) with an in-memory camera that delivers a 640×480 frame whenever asked (no rate
  limit: the camera is never the bottleneck, so the ratio measures the pipeline);
- clients: the same pipeline, served by waitress, with two MJPEG viewers and an API poller
  attached for the slice;
- at 30 fps: the camera limited to 30 frames per second (a real camera's rate), where what
  matters is the CPU each classified frame costs and how long a frame takes to become a result,
  each next to the bare loop paced at the same rate.

The report names the CPU and its vector extensions (AVX2, AVX-512 VNNI): int8 speed differs
about 5x between them, so figures from different machines are not comparable.

Usage: python scripts/bench_pipeline.py [--model models/blood-smear] [--threads 2]
       [--seconds 15] [--rounds 10] [--json]
(--seconds is the measured time of each of the four, split over the rounds.)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# As the daemon does (edge/__init__.py), before numpy loads: OpenBLAS threads spinning beside
# the interpreter doubled the CPU each frame cost here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge.capture.base import Source  # noqa: E402
from edge.config import load_config  # noqa: E402
from edge.inference.bundle import load_model  # noqa: E402
from edge.inference.classifier import Classifier  # noqa: E402


class MemorySource(Source):
    """A camera made of pre-decoded frames: each ``read`` returns one at once (``fps`` 0), or
    at ``fps`` frames per second (sleeping, not spinning), like a real camera's rate."""

    name = "memory"

    def __init__(self, frames: list[np.ndarray], fps: float = 0.0) -> None:
        self.frames, self.i, self.next_at = frames, 0, 0.0
        self.set_fps(fps)
        self.running = threading.Event()  # cleared: read() waits, the camera is quiet
        self.running.set()

    def set_fps(self, fps: float) -> None:
        self.gap = 1.0 / fps if fps > 0 else 0.0

    def open(self) -> None:
        pass

    def read(self) -> np.ndarray:
        self.running.wait()
        now = time.monotonic()
        if self.next_at > now:
            time.sleep(self.next_at - now)
        self.next_at = max(now, self.next_at) + self.gap
        self.i += 1
        return self.frames[self.i % len(self.frames)]


def cpu_description() -> dict:
    """The CPU model and the vector extensions that decide int8 speed."""
    from edge import hardware

    return {"model": hardware.cpu_model(), "flags": hardware.cpu_extensions(),
            "cores": os.cpu_count()}


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def camera_frames(bundle, n: int = 8) -> list[np.ndarray]:
    """640×480 frames made of the bundle's samples without changing their shape (a sample
    stretched to 4:3 turns round cells into ovals, which the scope check rightly rejects): the
    sample scaled to the frame's height, in the middle, on its own mean colour."""
    samples = sorted((bundle.root / "samples").glob("*.jpg")) if bundle.root else []
    frames = []
    for path in (samples or [None])[:n]:
        if path is None:
            frames.append(np.full((480, 640, 3), 128, np.uint8))
            continue
        img = Image.open(path).convert("RGB")
        img = img.resize((round(img.width * 480 / img.height), 480))
        canvas = Image.new("RGB", (640, 480), tuple(int(v) for v in
                                                      np.asarray(img).reshape(-1, 3).mean(0)))
        canvas.paste(img, ((640 - img.width) // 2, 0))
        frames.append(np.asarray(canvas, dtype=np.uint8))
    return frames


def ran(state) -> int:
    """Frames the model ran on: classified ones and those the scope check set aside (the same
    work per frame)."""
    return state.classified + state.out_of_scope


@contextmanager
def held(pipe) -> Iterator:
    """The pipeline's backend, with its camera quiet and its classification waiting."""
    pipe.profile.capture.source.running.clear()
    try:
        with pipe.profile.classifier.exclusive() as backend:
            yield backend
    finally:
        pipe.profile.capture.source.running.set()


def run_bare(pipe, seconds: float) -> dict:
    """The interpreter alone, on the pipeline's own backend while the pipeline waits."""
    clf = pipe.profile.classifier
    with held(pipe) as backend:
        x = clf.adapter(np.zeros((*clf.input_size, 3), np.uint8))
        for _ in range(3):
            backend.invoke(x)
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            backend.invoke(x)
            n += 1
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"fps": n / wall, "cpu_s_per_frame": cpu / n, "invoke_ms": 1e3 * wall / n}


def run_bare_paced(pipe, seconds: float, fps: float) -> dict:
    """The bare loop at a camera's rate: one invoke per frame interval. Its CPU per frame and
    its invoke time are what the pipeline at the same rate is compared with."""
    clf = pipe.profile.classifier
    gap = 1.0 / fps
    with held(pipe) as backend:
        x = clf.adapter(np.zeros((*clf.input_size, 3), np.uint8))
        backend.invoke(x)
        n, t0, c0, busy = 0, time.perf_counter(), time.process_time(), 0.0
        next_at = t0
        while time.perf_counter() - t0 < seconds:
            now = time.perf_counter()
            if next_at > now:
                time.sleep(next_at - now)
            start = time.perf_counter()
            backend.invoke(x)
            busy += time.perf_counter() - start
            next_at += gap
            n += 1
        cpu = time.process_time() - c0
    return {"fps": n / (time.perf_counter() - t0), "cpu_s_per_frame": cpu / n,
            "invoke_ms": 1e3 * busy / n}


def measure_at_rate(pipe, seconds: float, fps: float) -> dict:
    """The pipeline with the camera at ``fps``: CPU per classified frame, frame-to-result."""
    pipe.profile.capture.source.set_fps(fps)
    try:
        measure_pipeline(pipe, min(0.3, seconds))  # settle at the new rate
        return measure_pipeline(pipe, seconds)
    finally:
        pipe.profile.capture.source.set_fps(0.0)


class NaiveLoop:
    """Per frame: decode the JPEG with PIL, convert, resize, set, invoke, read."""

    def __init__(self, model_path: Path, threads: int, frames: list[np.ndarray]) -> None:
        from edge.inference.runtime import resolve_runtime

        self.jpegs = []
        for f in frames:
            buf = io.BytesIO()
            Image.fromarray(f).save(buf, "JPEG", quality=90)
            self.jpegs.append(buf.getvalue())
        self.interp = resolve_runtime().interpreter_cls(
            model_path=str(model_path), num_threads=threads
        )
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]

    def run(self, pipe, seconds: float) -> dict:
        interp, inp, out = self.interp, self.inp, self.out
        h, w = inp["shape"][1:3]
        with held(pipe):  # the cores are the naive loop's
            n, t0, c0 = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - t0 < seconds:
                jpeg = self.jpegs[n % len(self.jpegs)]
                img = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((w, h))
                interp.set_tensor(inp["index"], np.expand_dims(np.asarray(img, inp["dtype"]), 0))
                interp.invoke()
                interp.get_tensor(out["index"])
                n += 1
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"fps": n / wall, "cpu_s_per_frame": cpu / n}


def measure_pipeline(pipe, seconds: float) -> dict:
    """Frames the running pipeline classifies in ``seconds``, and the CPU it takes."""
    n0, c0, t0 = ran(pipe.state), time.process_time(), time.perf_counter()
    time.sleep(seconds)
    n1, c1, t1 = ran(pipe.state), time.process_time(), time.perf_counter()
    done = max(1, n1 - n0)
    recent = pipe.board.recent_latencies()
    lat = recent[-min(len(recent), done) :]
    result = pipe.state.result or {}
    return {
        "fps": (n1 - n0) / (t1 - t0),
        "cpu_s_per_frame": (c1 - c0) / done,
        "frame_to_result_ms": float(np.median(lat)) if lat else None,
        "stage_ms": result.get("timings_ms"),  # of the slice's last frame
    }


def with_clients(base: str, fn):
    """Run ``fn`` with two MJPEG viewers and an API poller attached to the server at ``base``."""
    stop = threading.Event()

    def viewer():
        with urllib.request.urlopen(base + "/stream.mjpg", timeout=30) as r:
            while not stop.is_set():
                r.read(65536)

    def poller():
        while not stop.is_set():
            urllib.request.urlopen(base + "/api/status", timeout=10).read()
            stop.wait(0.5)

    workers = [threading.Thread(target=f, daemon=True) for f in (viewer, viewer, poller)]
    for t in workers:
        t.start()
    time.sleep(0.2)  # connected and streaming
    try:
        return fn()
    finally:
        stop.set()
        for t in workers:
            t.join(5.0)


def start_pipeline(model: str, threads: int, frames):
    """The daemon's pipeline on an in-memory camera, served (idle until clients attach)."""
    import tempfile

    from edge.daemon.pipeline import Pipeline
    from edge.daemon.store import Store
    from edge.serve import make_server
    from edge.web import create_app

    data = tempfile.mkdtemp(prefix="fieldscope-bench-")
    cfg = load_config(
        None,
        {
            "model.bundle": model,
            "model.threads": threads,
            "source.kind": "replay",
            "source.path": "memory",
            "storage.data_dir": data,
            "pipeline.store_every_s": 0.0,
            "pipeline.min_focus": 0.0,
            "pipeline.max_clipped": 1.0,
        },
    )
    clf = Classifier(load_model(model), backend="cpu", threads=threads)
    store = Store(Path(data))
    pipe = Pipeline(cfg, clf, MemorySource(frames), store)
    pipe.start()
    server = make_server(create_app(pipe, cfg), "127.0.0.1", 0, 6)
    threading.Thread(target=server.run, daemon=True).start()

    def stop() -> None:
        pipe.stop()
        server.close()
        server.task_dispatcher.shutdown()
        store.close()
        clf.close()

    return pipe, f"http://127.0.0.1:{server.effective_port}", stop


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "blood-smear"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--camera-fps", type=float, default=30.0,
                    help="the camera rate of the rate-limited comparison (default 30)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.rounds < 1 or args.seconds <= 0:
        ap.error("--rounds must be at least 1 and --seconds positive")
    bundle = load_model(args.model)
    frames = camera_frames(bundle)
    pipe, base, stop = start_pipeline(args.model, args.threads, frames)
    artifact = pipe.profile.classifier.backend.artifact
    naive = NaiveLoop(artifact.path, args.threads, frames)
    block = args.seconds / args.rounds
    rounds = []
    try:
        time.sleep(args.warmup)
        for _ in range(args.rounds):
            bare = run_bare(pipe, block)
            slow = naive.run(pipe, block)
            measure_pipeline(pipe, min(0.2, block))  # back in its stride after the hold
            alone = measure_pipeline(pipe, block)
            loaded = with_clients(base, lambda: measure_pipeline(pipe, block))
            bare30 = run_bare_paced(pipe, block, args.camera_fps)
            at30 = measure_at_rate(pipe, block, args.camera_fps)
            rounds.append({"bare": bare, "naive": slow, "pipeline": alone, "clients": loaded,
                           "bare_30": bare30, "pipeline_30": at30})
        rss = rss_mb()
    finally:
        stop()

    def med(fn) -> float:
        return float(np.median([fn(r) for r in rounds]))

    def ratio(a: str, b: str, key: str = "fps") -> float:
        return round(med(lambda r: r[a][key] / r[b][key]), 3)

    samples = [r["pipeline"]["stage_ms"] for r in rounds if r["pipeline"]["stage_ms"]]
    stage_ms = (
        {k: round(float(np.median([t[k] for t in samples if k in t])), 3) for k in samples[0]}
        if samples
        else None
    )

    def lat(name: str) -> float | None:
        values = [r[name]["frame_to_result_ms"] for r in rounds if r[name]["frame_to_result_ms"]]
        return round(float(np.median(values)), 2) if values else None

    out = {
        "model": f"{bundle.name} {bundle.version} ({artifact.kind})",
        "cpu": cpu_description(),
        "threads": args.threads,
        "rounds": args.rounds,
        "bare_fps": round(med(lambda r: r["bare"]["fps"]), 2),
        "bare_invoke_ms": round(med(lambda r: r["bare"]["invoke_ms"]), 2),
        "bare_cpu_s_per_frame": round(med(lambda r: r["bare"]["cpu_s_per_frame"]), 5),
        "naive_fps": round(med(lambda r: r["naive"]["fps"]), 2),
        "naive_cpu_s_per_frame": round(med(lambda r: r["naive"]["cpu_s_per_frame"]), 5),
        "pipeline_fps": round(med(lambda r: r["pipeline"]["fps"]), 2),
        "pipeline_cpu_s_per_frame": round(med(lambda r: r["pipeline"]["cpu_s_per_frame"]), 5),
        "pipeline_frame_to_result_ms": lat("pipeline"),
        "pipeline_stage_ms": stage_ms,  # median over the rounds' last frames
        "clients_fps": round(med(lambda r: r["clients"]["fps"]), 2),
        "clients_cpu_s_per_frame": round(med(lambda r: r["clients"]["cpu_s_per_frame"]), 5),
        "clients_frame_to_result_ms": lat("clients"),
        # The camera at --camera-fps (30): cost per frame and frame-to-result, next to the
        # bare loop paced at the same rate.
        "camera_fps": args.camera_fps,
        "at_camera_fps": {
            "pipeline_fps": round(med(lambda r: r["pipeline_30"]["fps"]), 2),
            "pipeline_cpu_s_per_frame": round(med(lambda r: r["pipeline_30"]["cpu_s_per_frame"]),
                                              5),
            "pipeline_frame_to_result_ms": lat("pipeline_30"),
            "bare_cpu_s_per_frame": round(med(lambda r: r["bare_30"]["cpu_s_per_frame"]), 5),
            "bare_invoke_ms": round(med(lambda r: r["bare_30"]["invoke_ms"]), 2),
        },
        # The daemon's pipeline and server, plus the naive loop's interpreter.
        "rss_mb": round(rss, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    # Each ratio within its round (the loops ran seconds apart), then the median over rounds.
    out["ratios"] = {
        "pipeline_vs_bare_fps": ratio("pipeline", "bare"),
        "clients_vs_bare_fps": ratio("clients", "bare"),
        "pipeline_vs_bare_cpu": ratio("pipeline", "bare", "cpu_s_per_frame"),
        "pipeline_vs_naive_fps": ratio("pipeline", "naive"),
        "pipeline_vs_bare_cpu_at_camera_fps": ratio("pipeline_30", "bare_30", "cpu_s_per_frame"),
    }
    a = out["at_camera_fps"]
    if a["pipeline_frame_to_result_ms"] is not None:
        # Target: a frame becomes a result within one invoke plus 1 ms.
        out["ratios"]["frame_to_result_minus_invoke_ms"] = round(
            a["pipeline_frame_to_result_ms"] - a["bare_invoke_ms"], 2
        )
    out["per_round_fps"] = [
        {k: round(r[k]["fps"], 1) for k in ("bare", "naive", "pipeline", "clients")}
        for r in rounds
    ]
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:32s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
