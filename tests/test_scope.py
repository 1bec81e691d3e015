"""The scope check and the activation maps, with the real bundled models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.daemon.store import Store
from edge.errors import BundleError
from edge.inference.bundle import Artifact, Bundle, load_bundle
from edge.inference.classifier import Classifier
from edge.outbound import fhir
from edge.outbound.messages import unassessed_reason

ROOT = Path(__file__).resolve().parents[1]
SKIN = ROOT / "models" / "skin-lesion"
BLOOD = ROOT / "models" / "blood-smear"


def samples(bundle: Path) -> list[Path]:
    files = sorted((bundle / "samples").glob("*.jpg"))
    assert files
    return files


@pytest.fixture(scope="module")
def skin() -> Classifier:
    return Classifier(load_bundle(SKIN), backend="cpu", threads=1)


@pytest.fixture(scope="module")
def blood() -> Classifier:
    return Classifier(load_bundle(BLOOD), backend="cpu", threads=1)


@pytest.mark.parametrize("own, other", [("skin", "blood"), ("blood", "skin")])
def test_each_bundle_accepts_its_own_samples_and_rejects_the_other_use(own, other, request):
    clf = request.getfixturevalue(own)
    mine, theirs = (SKIN, BLOOD) if own == "skin" else (BLOOD, SKIN)
    # The bundles' samples are test-split images: the threshold keeps 97 % (skin) / 99 %
    # (blood) of in-scope validation images, so one sample in a dozen may fall outside.
    kept = [clf.classify(str(p)) for p in samples(mine)]
    accepted = [r for r in kept if r.scope["in_scope"]]
    assert len(accepted) >= len(kept) - 1, [r.scope for r in kept]
    assert all(r.decision["outcome"] != "out of scope" for r in accepted)
    for path in samples(theirs):
        r = clf.classify(str(path))
        assert not r.scope["in_scope"], (path.name, r.scope)
        assert r.scope["score"] > r.scope["threshold"]
        # Neither positive nor negative: the decision names the scope, never a finding.
        assert r.decision["outcome"] == "out of scope" and r.decision["positive"] is False
        assert clf.bundle.scope_texts["out_of_scope"] in r.decision["text"]


@pytest.mark.parametrize("which", ["skin", "blood"])
def test_a_blank_frame_is_out_of_scope(which, request):
    clf = request.getfixturevalue(which)
    for value in (0, 128, 255):
        frame = np.full((480, 640, 3), value, np.uint8)
        assert not clf.classify(frame).scope["in_scope"]


def test_the_scope_check_does_not_change_the_classification(skin, tmp_path):
    """The same model file without the scope file gives the same probabilities: the feature
    outputs only add outputs."""
    copy = tmp_path / "plain"
    shutil.copytree(SKIN, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["scope"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    plain = Classifier(load_bundle(copy), backend="cpu", threads=1)
    assert plain.bundle.scope is None
    for path in samples(SKIN)[:4] + samples(BLOOD)[:2]:
        a, b = skin.classify(str(path)), plain.classify(str(path))
        assert a.probabilities == b.probabilities
        assert b.scope is None and b.in_scope  # no scope check: says so, classifies anyway


def _broken_copy(tmp_path: Path, damage) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(SKIN, copy)
    damage(copy)
    return copy


def _rehash(copy: Path) -> None:
    from edge.inference.tflite_file import sha256_file

    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["scope"]["sha256"] = sha256_file(copy / manifest["scope"]["file"])
    (copy / "manifest.json").write_text(json.dumps(manifest))


def test_a_missing_scope_file_is_refused(tmp_path):
    copy = _broken_copy(tmp_path, lambda c: (c / "scope.npz").unlink())
    with pytest.raises(BundleError, match="scope file scope.npz is missing"):
        load_bundle(copy)


def test_a_corrupt_scope_file_is_refused(tmp_path):
    def damage(c):
        (c / "scope.npz").write_bytes(b"not a zip file at all")
        _rehash(c)

    with pytest.raises(BundleError, match="cannot be read"):
        load_bundle(_broken_copy(tmp_path, damage))


def test_a_scope_file_with_another_digest_is_refused(tmp_path):
    def damage(c):
        data = bytearray((c / "scope.npz").read_bytes())
        data[-100] ^= 0xFF
        (c / "scope.npz").write_bytes(bytes(data))

    with pytest.raises(BundleError, match="sha256 of scope.npz"):
        load_bundle(_broken_copy(tmp_path, damage))


def test_a_scope_file_of_the_wrong_shape_is_refused(tmp_path):
    def damage(c):
        z = dict(np.load(c / "scope.npz"))
        z["tap0_project"] = z["tap0_project"][:-3]
        np.savez(c / "scope.npz", **z)
        _rehash(c)

    with pytest.raises(BundleError, match="inconsistent shapes"):
        load_bundle(_broken_copy(tmp_path, damage))


def test_a_scope_file_for_another_model_is_refused(tmp_path):
    """The blood model's scope file in the skin bundle: its taps do not exist in this model."""

    def damage(c):
        shutil.copyfile(BLOOD / "scope.npz", c / "scope.npz")
        _rehash(c)

    bundle = load_bundle(_broken_copy(tmp_path, damage))
    with pytest.raises(BundleError, match="no feature output of shape"):
        Classifier(bundle, backend="cpu")


def _planted(lesion: Path, corner: tuple[int, int], skin_rgb=(214, 160, 140)) -> np.ndarray:
    canvas = np.zeros((300, 400, 3), np.uint8)
    canvas[:] = skin_rgb
    patch = np.asarray(Image.open(lesion).convert("RGB").resize((200, 150)))
    y, x = corner
    canvas[y:y + 150, x:x + 200] = patch
    return canvas


@pytest.mark.parametrize("corner", [(0, 0), (0, 200), (150, 0), (150, 200)])
def test_the_map_peaks_where_a_planted_lesion_sits(skin, corner):
    """A melanoma sample pasted into one corner of a plain skin-coloured image: the top
    class's map is largest in that quadrant."""
    r = skin.classify(_planted(SKIN / "samples" / "mel_ISIC_0024315.jpg", corner), explain=True)
    values = np.asarray(r.map["class"])
    h, w = values.shape
    iy, ix = np.unravel_index(values.argmax(), values.shape)
    assert (iy < h / 2) == (corner[0] == 0) and (ix < w / 2) == (corner[1] == 0), values.round(1)


@pytest.mark.parametrize("which", ["skin", "blood"])
def test_the_live_scope_feature_equals_the_fitted_one(which, request):
    """The kit pools each tap from its int8 values directly (cheaper per frame); training fits
    on the dequantised maps: both give one feature, and the verdict the kit reaches from a
    sample is the one the fitted statistic gives."""
    from edge.inference.scope import dequantize_map, pooled, pooled_tap

    clf = request.getfixturevalue(which)
    root = SKIN if which == "skin" else BLOOD
    small, _ = clf.prepare(str(samples(root)[0]))
    details = clf.backend.tap_details
    _, raws = clf.backend.invoke_with_taps(clf.adapter(small), list(range(len(details))))
    assert raws and all(r.dtype == np.int8 for r in raws)
    for raw, detail in zip(raws, details, strict=True):
        fast, fitted = pooled_tap(raw, detail), pooled(dequantize_map(raw, detail))
        assert fast.dtype == np.float32 and fast.shape == fitted.shape
        assert np.allclose(fast, fitted, rtol=1e-5, atol=1e-6)
    scope = clf.bundle.scope
    maps = clf.feature_maps(small)
    by_fit = scope.check([pooled(maps[j]) for j in clf._taps])  # the scope's taps, in order
    assert clf.infer(small).scope == by_fit


def test_maps_average_to_the_logits(skin):
    """The head linearised at the pooled point: each class map's mean is that class's logit
    less the head's bias path (the biases through the same active units), exactly."""
    small, _ = skin.prepare(str(samples(SKIN)[0]))
    fmap = skin.feature_maps(small)[skin.bundle.scope.cam_tap]
    flat = fmap.reshape(-1, fmap.shape[-1]).astype(np.float64)
    logits, eff = skin.bundle.scope.head.logits_and_weights(flat.mean(axis=0))
    per_class = (flat @ eff).mean(axis=0)
    (w1, b1, relu), (w2, b2, _) = skin.bundle.scope.head.layers
    assert relu
    active = (flat.mean(axis=0) @ w1 + b1) > 0
    bias_path = (b1 * active) @ w2 + b2
    assert np.allclose(per_class + bias_path, logits, atol=1e-6)


def test_scope_answer_is_the_same_on_the_edge_tpu_path_and_the_cpu(fake_tpu_lib, host_with_tpu):
    """The stand-in delegate runs the bundle's model as the 'edgetpu' artifact: both feature
    outputs come out of it, and the scope answer equals the CPU's."""
    real = load_bundle(SKIN)
    arts = {"edgetpu": Artifact("edgetpu", real.artifacts["int8"].path),
            "int8": real.artifacts["int8"]}
    tpu = Classifier(Bundle(None, real.manifest, arts, real.scope), backend="edgetpu")
    cpu = Classifier(real, backend="cpu")
    assert tpu.backend.name == "edgetpu" and len(tpu.backend.tap_details) == 2
    for path in samples(SKIN)[:3] + samples(BLOOD)[:3]:
        a, b = tpu.classify(str(path)), cpu.classify(str(path))
        assert a.backend == "edgetpu"
        assert a.scope == b.scope


def test_out_of_scope_fields_stay_out_of_the_sample_and_its_exports(skin, tmp_path):
    store = Store(tmp_path)
    inside = skin.classify(str(samples(SKIN)[0]), explain=True).to_dict()
    outside = skin.classify(str(samples(BLOOD)[0]), explain=True).to_dict()
    for doc, path in ((inside, samples(SKIN)[0]), (outside, samples(BLOOD)[0])):
        doc["assessable"] = doc["scope"]["in_scope"]
        doc["quality"] = {"assessable": True}
        store.save(doc, "upload", sample_code="S-1", profile="skin", jpeg=path.read_bytes())
    summary = store.sample_summary("S-1")
    assert summary["fields"] == 2 and summary["out_of_scope"] == 1
    assert summary["not_assessable"] == 1
    usable = [f for f in summary["results"] if f["assessable"]]
    assert len(usable) == 1 and usable[0]["in_scope"]
    stored = {f["in_scope"]: f for f in summary["results"]}
    assert stored[True]["map"]["size"] == [6, 7]  # the map is stored with the result
    assert unassessed_reason(stored[False]).startswith("not assessable (out of scope")
    doc = fhir.sample_bundle(store, "S-1", "kit-1", lambda _p: skin.bundle)
    obs = [e["resource"] for e in doc["entry"] if e["resource"]["resourceType"] == "Observation"]
    absent = [o for o in obs if "dataAbsentReason" in o]
    assert len(absent) == 1
    assert "out of scope" in absent[0]["dataAbsentReason"]["text"]
    assert absent[0]["interpretation"][0]["coding"][0]["code"] == "IND"
    import pydicom

    from edge.outbound.dicom import export_sample

    files = export_sample(store, "S-1", tmp_path / "usb", "kit-1", "Clinic", lambda _p: skin.bundle)
    reports = [pydicom.dcmread(f) for f in files if f.name.endswith("-report.dcm")]
    assert len(reports) == 2
    findings = [str(r) for r in reports]
    assert sum("out of scope" in text for text in findings) == 1
    store.close()


def test_doctor_names_the_scope_check_of_each_shipped_bundle():
    from edge.doctor import check_bundles

    checks = {c.name: c for c in check_bundles(ROOT / "models")}
    for name in ("blood-smear", "skin-lesion"):
        assert checks[f"model {name}"].status == "ok"
        assert "scope check at" in checks[f"model {name}"].detail

