"""The benchmark scripts run on a tiny case and print well-formed output (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_model_on_coral_reference(coral, tmp_path):
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/bench_model.py",
            "--model",
            str(coral / "mobilenet_v2_1.0_224_quant.tflite"),
            "--labels",
            str(coral / "imagenet_labels.txt"),
            "--threads",
            "1",
            "--runs",
            "5",
            "--json",
            str(out_json),
            "--markdown",
            str(out_md),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out_json.read_text())
    row = report["results"][0]
    assert row["artifact"] == "int8" and row["backend"] == "cpu" and row["threads"] == 1
    assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert set(row["preprocess"]) == {"640x480_ms", "1280x960_ms"}
    assert report["machine_before"]["runtime"].startswith("ai-edge-litert")
    md = out_md.read_text()
    assert "| int8 | cpu | 1 |" in md and "published: Coral Edge TPU benchmarks" in md


def test_bench_model_reports_a_missing_tpu_instead_of_failing(coral_bundle, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/bench_model.py",
            "--model",
            str(coral_bundle),
            "--threads",
            "1",
            "--runs",
            "3",
            "--json",
            str(tmp_path / "b.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "FIELDSCOPE_HOST_ROOT": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "b.json").read_text())["results"]
    tpu = [r for r in rows if r["backend"] == "edgetpu"]
    assert tpu and "no Edge TPU found" in tpu[0]["skipped"]


def test_bench_pipeline_json(blood_bundle):
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/bench_pipeline.py",
            "--model",
            str(blood_bundle),
            "--threads",
            "1",
            "--seconds",
            "1",
            "--rounds",
            "2",
            "--warmup",
            "0.5",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in (
        "bare_fps",
        "pipeline_fps",
        "naive_fps",
        "bare_cpu_s_per_frame",
        "pipeline_cpu_s_per_frame",
        "rss_mb",
        "model",
        "threads",
        "clients_fps",
    ):
        assert key in doc, key
    assert doc["threads"] == 1 and doc["bare_fps"] > 0 and doc["pipeline_fps"] > 0
    assert doc["model"].startswith("blood-smear")
    # one pipeline, the four loops taking turns: every round measured each of them
    assert len(doc["per_round_fps"]) == 2
    assert all(r["pipeline"] > 0 and r["bare"] > 0 for r in doc["per_round_fps"])
    assert set(doc["ratios"]) == {
        "pipeline_vs_bare_fps",
        "clients_vs_bare_fps",
        "pipeline_vs_bare_cpu",
        "pipeline_vs_naive_fps",
        "pipeline_vs_bare_cpu_at_camera_fps",
        "frame_to_result_minus_invoke_ms",
    }
    # The rate-limited comparison: the camera really ran at its rate (not faster), and the
    # report says which CPU the figures came from.
    at = doc["at_camera_fps"]
    assert doc["camera_fps"] == 30.0 and 0 < at["pipeline_fps"] <= 33
    assert at["pipeline_frame_to_result_ms"] > 0 and at["bare_invoke_ms"] > 0
    assert doc["cpu"]["model"] and isinstance(doc["cpu"]["flags"], list)
