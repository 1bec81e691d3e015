"""The commands as a user runs them: output, exit codes, one line per problem."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_host

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_classify_parrot_with_bare_model(coral, parrot):
    proc = run(
        "classify",
        "--model",
        str(coral / "mobilenet_v2_1.0_224_quant.tflite"),
        "--labels",
        str(coral / "imagenet_labels.txt"),
        "--backend",
        "cpu",
        str(parrot),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{parrot}: macaw ")


def test_classify_json_lines(coral_bundle, parrot, tmp_path):
    proc = run(
        "classify",
        "--model",
        str(coral_bundle),
        "--json",
        "--top-k",
        "2",
        str(parrot),
        str(parrot),
        env={"FIELDSCOPE_HOST_ROOT": str(make_host(tmp_path / "h"))},
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert len(lines) == 2
    doc = lines[0]
    assert doc["label"] == "macaw" and doc["backend"] == "cpu"
    assert len(doc["top_k"]) == 2 and abs(sum(doc["probabilities"].values()) - 1) < 0.02
    assert set(doc["timings_ms"]) >= {"decode", "preprocess", "invoke", "postprocess", "total"}
    assert doc["decision"]["outcome"] == "parrot"


def test_edgetpu_model_alone_fails_naming_the_tpu(coral, parrot, tmp_path):
    proc = run(
        "classify",
        "--model",
        str(coral / "mobilenet_v2_1.0_224_quant_edgetpu.tflite"),
        str(parrot),
        env={"FIELDSCOPE_HOST_ROOT": str(make_host(tmp_path / "h"))},
    )
    assert proc.returncode == 2
    assert "Edge TPU" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_edgetpu_model_on_cpu_backend_is_explained(coral, parrot):
    proc = run(
        "classify",
        "--backend",
        "cpu",
        "--model",
        str(coral / "mobilenet_v2_1.0_224_quant_edgetpu.tflite"),
        str(parrot),
    )
    assert proc.returncode == 2
    assert "compiled for the Edge TPU" in proc.stderr and "edgetpu-custom-op" in proc.stderr


def test_bad_inputs_are_reported_and_the_batch_goes_on(coral, parrot, tmp_path):
    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(parrot, folder / "a_good.jpg")
    (folder / "b_empty.jpg").write_bytes(b"")
    (folder / "c_truncated.jpg").write_bytes(parrot.read_bytes()[:2500])
    (folder / "d_text.png").write_text("not an image")
    shutil.copy(parrot, folder / "e_good.jpg")
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    (empty_dir / "readme.txt").write_text("x")
    proc = run(
        "classify",
        "--backend",
        "cpu",
        "--model",
        str(coral / "mobilenet_v2_1.0_224_quant.tflite"),
        "--labels",
        str(coral / "imagenet_labels.txt"),
        str(folder),
        str(empty_dir),
        str(tmp_path / "missing.jpg"),
    )
    assert proc.returncode == 1
    good = [ln for ln in proc.stdout.splitlines() if "macaw" in ln]
    assert len(good) == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 5, proc.stderr
    text = "\n".join(errors)
    for needle in (
        "b_empty.jpg: empty file",
        "c_truncated.jpg: damaged or truncated",
        "d_text.png: not a readable image",
        "no images in this folder",
        "missing.jpg: no such file",
    ):
        assert needle in text
    assert "Traceback" not in proc.stderr


def test_missing_default_model_says_what_to_do(parrot, tmp_path):
    proc = run("classify", str(parrot), env={"FIELDSCOPE_MODELS": str(tmp_path)})
    assert proc.returncode == 2
    assert "model bundle not found" in proc.stderr and "--model" in proc.stderr


def test_doctor_json_with_a_coral_attached(coral_bundle, fake_libedgetpu, tmp_path):
    host = make_host(tmp_path / "host", [("18d1", "9302")])
    (host / "dev/video0").write_text("")
    gov = host / "sys/devices/system/cpu/cpu0/cpufreq"
    gov.mkdir(parents=True)
    (gov / "scaling_governor").write_text("ondemand\n")
    fw = host / "sys/devices/platform/soc/soc:firmware"
    fw.mkdir(parents=True)
    (fw / "get_throttled").write_text("50005\n")
    thermal = host / "sys/class/thermal/thermal_zone0"
    thermal.mkdir(parents=True)
    (thermal / "temp").write_text("61234\n")
    models = tmp_path / "models"
    shutil.copytree(coral_bundle, models / "coral")
    proc = run(
        "doctor",
        "--json",
        "--models",
        str(models),
        env={"FIELDSCOPE_HOST_ROOT": str(host), "FIELDSCOPE_EDGETPU_LIB": str(fake_libedgetpu)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["runtime"]["status"] == "ok" and "ai-edge-litert" in checks["runtime"]["detail"]
    assert checks["libedgetpu"]["status"] == "ok"
    assert checks["edge-tpu"]["status"] == "ok" and "18d1:9302" in checks["edge-tpu"]["detail"]
    assert checks["cameras"]["status"] == "ok" and "video0" in checks["cameras"]["detail"]
    assert (
        checks["cpu-governor"]["status"] == "warn"
        and "performance" in checks["cpu-governor"]["fix"]
    )
    assert checks["thermal"]["status"] == "warn"
    assert "under-voltage has occurred" in checks["thermal"]["detail"]
    assert "61.2 °C" in checks["thermal"]["detail"]
    # Coral's reference model loads, and doctor says it has no scope check.
    assert checks["model coral"]["status"] == "warn"
    assert "no scope check" in checks["model coral"]["detail"]
    assert "python -m training scope" in checks["model coral"]["fix"]


def test_doctor_fails_on_a_broken_bundle_and_says_why(coral_bundle, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(coral_bundle, models / "coral")
    (models / "coral" / "mobilenet_v2_1.0_224_quant.tflite").write_bytes(b"garbage")
    proc = run(
        "doctor",
        "--models",
        str(models),
        env={"FIELDSCOPE_HOST_ROOT": str(make_host(tmp_path / "h"))},
    )
    assert proc.returncode == 1
    assert "FAIL] model coral" in proc.stdout
    assert "edge-tpu: no Edge TPU found" in proc.stdout
    assert "fix: plug the Coral" in proc.stdout


@pytest.mark.parametrize("ids,expect", [([("1a6e", "089a")], "firmware loads on first use")])
def test_doctor_sees_an_unflashed_coral(ids, expect, tmp_path, monkeypatch):
    from edge.doctor import check_edgetpu

    monkeypatch.setenv("FIELDSCOPE_HOST_ROOT", str(make_host(tmp_path / "h", ids)))
    assert expect in check_edgetpu().detail
    monkeypatch.setenv("FIELDSCOPE_HOST_ROOT", str(make_host(tmp_path / "p", apex=1)))
    assert "/dev/apex_0" in check_edgetpu().detail
