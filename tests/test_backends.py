"""Backend policy and the Edge TPU delegate path, against a real shared library."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from edge.errors import EdgeTpuError, ModelError
from edge.inference.backends import open_backend
from edge.inference.backends.edgetpu import EdgeTpuBackend, explain_delegate_failure, parse_device
from edge.inference.bundle import Artifact, Bundle, load_bundle
from edge.inference.classifier import Classifier
from edge.inference.runtime import resolve_runtime


def test_auto_on_tpu_less_machine_runs_on_cpu_and_says_why(coral_bundle, parrot, host_without_tpu):
    clf = Classifier(load_bundle(coral_bundle))
    assert clf.backend.name == "cpu"
    assert clf.backend.artifact.kind == "int8"
    assert "no Edge TPU found" in clf.backend_reason
    result = clf.classify(str(parrot))
    assert result.label == "macaw"
    assert result.backend == "cpu"
    assert result.decision["outcome"] == "parrot"


def test_edgetpu_policy_without_tpu_fails_naming_the_tpu(coral_bundle, host_without_tpu):
    with pytest.raises(EdgeTpuError, match="no Edge TPU found"):
        open_backend(load_bundle(coral_bundle), "edgetpu")


def test_cpu_policy_never_loads_the_delegate(coral_bundle, host_with_tpu, fake_tpu_lib):
    before = fake_tpu_lib.created
    sel = open_backend(load_bundle(coral_bundle), "cpu")
    assert sel.backend.name == "cpu"
    assert fake_tpu_lib.created == before


def test_delegate_is_loaded_from_the_shared_library_and_applied(coral, parrot, fake_tpu_lib):
    """The real load_delegate path: our fake libedgetpu is dlopen'ed, created with the device
    option and its Prepare is called by the interpreter; a plain model still runs."""
    runtime = resolve_runtime()
    art = Artifact("edgetpu", coral / "mobilenet_v2_1.0_224_quant.tflite")
    prepared = fake_tpu_lib.prepared
    backend = EdgeTpuBackend(art, runtime, threads=1, device="usb:0")
    assert fake_tpu_lib.last_device == "usb:0"
    assert fake_tpu_lib.prepared == prepared + 1
    from edge.inference.preprocess import InputAdapter, open_image, resize

    spec = {"normalization": {"mean": [127.5] * 3, "std": [127.5] * 3}}
    adapter = InputAdapter.for_model(backend.input_detail, spec)
    rgb = np.asarray(resize(open_image(parrot), (224, 224), "center-crop"))
    out = backend.invoke(adapter(rgb))
    assert int(np.argmax(out)) == 89  # macaw


def test_delegate_creation_failure_is_reported(coral, fake_tpu_lib):
    art = Artifact("edgetpu", coral / "mobilenet_v2_1.0_224_quant_edgetpu.tflite")
    with pytest.raises(EdgeTpuError, match="failed to load.*fake: no such TPU"):
        EdgeTpuBackend(art, resolve_runtime(), device="usb:99")


def test_auto_falls_back_when_delegate_cannot_be_created(
    coral_bundle, parrot, host_with_tpu, fake_tpu_lib
):
    clf = Classifier(load_bundle(coral_bundle), device=":99")
    assert clf.backend.name == "cpu"
    assert "failed to load" in clf.backend_reason
    assert clf.classify(str(parrot)).label == "macaw"


def test_auto_falls_back_when_compiled_model_does_not_prepare(
    coral_bundle, parrot, host_with_tpu, fake_tpu_lib
):
    """TPU present, delegate loads, but the compiled model cannot run (as with a TPU the runtime
    cannot open): auto goes to the CPU and the reason names the Edge TPU."""
    clf = Classifier(load_bundle(coral_bundle))
    assert clf.backend.name == "cpu"
    assert "Edge TPU could not run mobilenet_v2_1.0_224_quant_edgetpu.tflite" in clf.backend_reason
    assert clf.classify(str(parrot)).label == "macaw"


def test_auto_reports_missing_runtime_library(coral_bundle, host_with_tpu, monkeypatch, tmp_path):
    monkeypatch.setenv("FIELDSCOPE_EDGETPU_LIB", str(tmp_path / "libedgetpu.so.1"))
    clf = Classifier(load_bundle(coral_bundle))
    assert clf.backend.name == "cpu"
    assert "Edge TPU runtime" in clf.backend_reason and "not found" in clf.backend_reason


def _bundle_running_on_fake_tpu(coral, coral_bundle) -> Bundle:
    """In-memory bundle whose 'edgetpu' artifact is the plain model: the fake delegate runs it."""
    real = load_bundle(coral_bundle)
    plain = coral / "mobilenet_v2_1.0_224_quant.tflite"
    arts = {"edgetpu": Artifact("edgetpu", plain), "int8": real.artifacts["int8"]}
    return Bundle(None, real.manifest, arts)


def test_tpu_failing_mid_run_falls_back_to_cpu(
    coral, coral_bundle, parrot, host_with_tpu, fake_tpu_lib
):
    clf = Classifier(_bundle_running_on_fake_tpu(coral, coral_bundle))
    assert clf.backend.name == "edgetpu"
    assert clf.classify(str(parrot)).backend == "edgetpu"

    def usb_reset():
        raise RuntimeError("Edge TPU: USB transfer error (device reset)")

    clf.backend.interpreter.invoke = usb_reset  # the hardware fault, injected at the interface
    result = clf.classify(str(parrot))
    assert result.backend == "cpu"
    assert result.label == "macaw"
    assert "USB transfer error" in result.notes[0]
    assert clf.describe()["fallbacks"] and "CPU fallback" in clf.backend_reason
    assert clf.classify(str(parrot)).backend == "cpu"


def test_tpu_failing_mid_run_with_edgetpu_policy_raises(
    coral, coral_bundle, parrot, host_with_tpu, fake_tpu_lib
):
    clf = Classifier(_bundle_running_on_fake_tpu(coral, coral_bundle), backend="edgetpu")

    def usb_reset():
        raise RuntimeError("USB transfer error")

    clf.backend.interpreter.invoke = usb_reset
    with pytest.raises(EdgeTpuError, match="failed during inference"):
        clf.classify(str(parrot))


def test_compiled_model_refused_on_cpu(coral):
    from edge.inference.backends.cpu import CpuBackend

    art = Artifact("int8", coral / "mobilenet_v2_1.0_224_quant_edgetpu.tflite")
    with pytest.raises(ModelError, match="compiled for the Edge TPU"):
        CpuBackend(art, resolve_runtime())


@pytest.mark.parametrize("good", ["usb", "usb:0", "usb:12", "pci", "pci:1", ":0", None])
def test_device_strings_accepted(good):
    assert parse_device(good) == good


@pytest.mark.parametrize("bad", ["USB", "usb0", "usb:", "pcie:0", "usb:x", "/dev/apex_0"])
def test_device_strings_refused(bad):
    with pytest.raises(EdgeTpuError, match="bad Edge TPU device"):
        parse_device(bad)


def test_runtime_too_old_is_explained():
    msg = (
        "Failed to prepare for TPU. Failed precondition: Package requires runtime version "
        "(14), which is newer than this runtime version (13)."
    )
    text = explain_delegate_failure(RuntimeError(msg))
    assert "too old" in text and "edgetpu_compiler -m" in text


def test_threads_are_passed_to_the_interpreter(coral_bundle, parrot):
    """What the interpreter runs with, not what the constructor was given: its XNNPACK pool
    starts (threads − 1) worker threads of the process (counted in /proc) when it is built."""
    code = f"""
import os, sys
from edge.inference.bundle import load_bundle
from edge.inference.classifier import Classifier
before = len(os.listdir("/proc/self/task"))
clf = Classifier(load_bundle({str(coral_bundle)!r}), backend="cpu", threads=int(sys.argv[1]))
clf.classify({str(parrot)!r})
print(len(os.listdir("/proc/self/task")) - before, clf.describe()["artifact"])
"""
    extra = {}
    for n in (1, 2, 3):
        proc = subprocess.run(
            [sys.executable, "-c", code, str(n)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "FIELDSCOPE_HOST_ROOT": "/nonexistent"},
        )
        assert proc.returncode == 0, proc.stderr
        started, artifact = proc.stdout.split()
        extra[n] = int(started)
        assert artifact == "int8"
    assert extra[2] - extra[1] == 1 and extra[3] - extra[1] == 2, extra


def test_tpu_that_fails_then_returns_is_used_again(
    coral, coral_bundle, parrot, host_with_tpu, fake_tpu_lib, monkeypatch, tmp_path
):
    """A USB reset: the TPU fails mid-run, the CPU stands in (degraded, with the reason), the
    TPU is tried again after its backoff, and once it opens inference is back on it. "Still
    unplugged" comes from the stand-in library itself (its delegate cannot be created)."""
    unplugged = tmp_path / "unplugged"
    monkeypatch.setenv("FAKE_EDGETPU_UNPLUGGED", str(unplugged))
    clf = Classifier(_bundle_running_on_fake_tpu(coral, coral_bundle))
    clf.reprobe_s = 0.2
    assert clf.classify(str(parrot)).backend == "edgetpu"

    def usb_reset():
        raise RuntimeError("Edge TPU: USB transfer error (device reset)")

    clf.backend.interpreter.invoke = usb_reset
    assert clf.classify(str(parrot)).backend == "cpu"
    assert clf.degraded and "USB transfer error" in clf.describe()["degraded"]["reason"]
    # Still unplugged at the first retry: the library refuses to open it; the CPU stays, the
    # wait doubles.
    unplugged.touch()
    created, attempts = fake_tpu_lib.created, fake_tpu_lib.attempts
    time.sleep(0.25)
    assert clf.classify(str(parrot)).backend == "cpu"
    assert clf.reprobe_s == pytest.approx(0.4)
    # The try reached the library, which refused it.
    assert fake_tpu_lib.attempts == attempts + 1 and fake_tpu_lib.created == created
    # Plugged back in: after the backoff the next classification runs on the TPU again.
    unplugged.unlink()
    time.sleep(0.45)
    r = clf.classify(str(parrot))
    assert r.backend == "edgetpu" and r.label == "macaw"
    assert "works again" in r.notes[0] and clf.degraded is None


def test_a_tpu_that_opens_but_fails_every_invoke_backs_off(
    coral, coral_bundle, parrot, host_with_tpu, fake_tpu_lib, monkeypatch
):
    """It enumerates again after a reset but every transfer fails: each re-probe that opens it
    and fails at once doubles the wait (it went back to 15 s at each open, for ever)."""
    from edge.inference import classifier as classifier_module

    def usb_reset():
        raise RuntimeError("Edge TPU: USB transfer error")

    clf = Classifier(_bundle_running_on_fake_tpu(coral, coral_bundle))
    clf.reprobe_s = 0.2
    clf.backend.interpreter.invoke = usb_reset
    assert clf.classify(str(parrot)).backend == "cpu"
    real_open = classifier_module.open_edgetpu

    def opens_but_fails(*args, **kwargs):
        selection = real_open(*args, **kwargs)
        selection.backend.interpreter.invoke = usb_reset
        return selection

    monkeypatch.setattr(classifier_module, "open_edgetpu", opens_but_fails)
    for expected in (0.4, 0.8):
        time.sleep(clf.reprobe_s + 0.05)
        r = clf.classify(str(parrot))
        assert r.backend == "cpu" and r.label == "macaw"  # the CPU stood in again
        assert clf.reprobe_s == pytest.approx(expected)
    assert len(clf.describe()["fallbacks"]) <= classifier_module.FALLBACK_EVENTS_KEPT


def test_a_cpu_model_that_cannot_stand_in_is_reported_not_reopened_each_frame(
    coral, coral_bundle, parrot, host_with_tpu, fake_tpu_lib, monkeypatch
):
    """The TPU fails and the bundle's CPU model disagrees with the manifest: classification
    fails with both reasons, health says degraded, and the CPU model is not reopened (and
    refused) at every frame."""
    from edge.inference import classifier as classifier_module
    from tests.conftest import ROOT

    bundle = _bundle_running_on_fake_tpu(coral, coral_bundle)
    other = ROOT / "models" / "skin-lesion" / "skin-lesion_int8.tflite"  # 224x168, not 224x224
    bundle = Bundle(None, bundle.manifest, {**bundle.artifacts, "int8": Artifact("int8", other)})
    clf = Classifier(bundle)
    assert clf.backend.name == "edgetpu"
    opened = []
    real_open_cpu = classifier_module.open_cpu
    monkeypatch.setattr(classifier_module, "open_cpu",
                        lambda *a, **k: opened.append(1) or real_open_cpu(*a, **k))

    def usb_reset():
        raise RuntimeError("Edge TPU: USB transfer error")

    clf.reprobe_s = 0.3
    clf.backend.interpreter.invoke = usb_reset
    for _ in range(3):
        with pytest.raises(EdgeTpuError, match="cannot stand in: .*manifest says 224×224"):
            clf.classify(str(parrot))
    assert len(opened) == 1
    since = clf.describe()["degraded"]["since"]
    assert "cannot stand in" in clf.describe()["degraded"]["reason"]
    # Frames keep coming and failing; the TPU is still tried again after its backoff (the
    # re-opened one works here), not pushed back by every failing frame.
    back, deadline = None, time.monotonic() + 3
    while back is None and time.monotonic() < deadline:
        try:
            back = clf.classify(str(parrot))
        except EdgeTpuError:
            assert clf.describe()["degraded"]["since"] == since
            time.sleep(0.05)
    assert back is not None and back.backend == "edgetpu" and clf.degraded is None


def _raise_no_tpu(*args, **kwargs):
    raise EdgeTpuError("no Edge TPU found")


def test_a_callers_bad_input_does_not_move_inference_off_the_tpu(
    coral, coral_bundle, host_with_tpu, fake_tpu_lib
):
    clf = Classifier(_bundle_running_on_fake_tpu(coral, coral_bundle))
    with pytest.raises(ValueError):
        clf.infer(np.zeros((10, 10, 3), np.uint8))  # wrong size: the caller's bug
    assert clf.backend.name == "edgetpu" and clf.degraded is None


@pytest.mark.parametrize("device", ["usb0", "ubs", "pci:x", ":", "usb:"])
def test_a_device_typo_is_a_config_error(device):
    from edge.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="device"):
        load_config(None, {"model.device": device, "source.path": "x"})
    for good in ("", "usb", "usb:1", "pci", "pci:0", ":0"):
        load_config(None, {"model.device": good, "source.path": "x"})
