"""Ensemble bundles: a manifest naming more int8 members loads (or is refused with the
reason), captures and uploads average exactly members × views, the live stream one model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge.errors import BundleError
from edge.inference import postprocess
from edge.inference.bundle import load_bundle
from edge.inference.classifier import Classifier
from edge.inference.tflite_file import sha256_file

ROOT = Path(__file__).resolve().parents[1]
SKIN = ROOT / "models" / "skin-lesion"
BLOOD = ROOT / "models" / "blood-smear"


def _second_member(src: Path, dst: Path) -> None:
    """Another model with the same labels and input: the first with its output scale changed
    (its probabilities differ, its architecture does not)."""
    from tests.conftest import require_module

    require_module("tensorflow", "the test edits a model file with TensorFlow's tools")
    from tensorflow.lite.tools import flatbuffer_utils as fu

    model = fu.read_model(str(src))
    graph = model.subgraphs[0]
    out = graph.tensors[int(graph.outputs[0])]
    out.quantization.scale = np.asarray(out.quantization.scale) * 1.7
    fu.write_model(model, str(dst))


def _with_members(tmp_path: Path, *files: Path) -> Path:
    copy = tmp_path / "ensemble"
    shutil.copytree(SKIN, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["members"] = []
    for f in files:
        shutil.copyfile(f, copy / f.name)
        manifest["members"].append({"file": f.name, "sha256": sha256_file(copy / f.name),
                                    "size": (copy / f.name).stat().st_size})
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.fixture(scope="module")
def member(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("member") / "member2_int8.tflite"
    _second_member(SKIN / "skin-lesion_int8.tflite", out)
    return out


def test_a_two_member_bundle_averages_members_times_views(tmp_path, member):
    bundle = load_bundle(_with_members(tmp_path, member))
    assert len(bundle.members) == 1
    clf = Classifier(bundle, backend="cpu", threads=1)
    assert clf.members == 2 and clf.describe()["members"] == 2
    first = Classifier(load_bundle(SKIN), backend="cpu", threads=1)
    second_only = json.loads((bundle.root / "manifest.json").read_text())
    sample = sorted((SKIN / "samples").glob("*.jpg"))[0]
    small, _ = clf.prepare(str(sample))
    r = clf.infer(small, tta=True, members=True)
    assert r.views == 2 * len(bundle.tta)
    # By hand: each member's probabilities on each view, then their mean.
    from edge.inference.preprocess import tta_views

    by_hand = []
    # The first model with the bundle's logit offsets, a member with its own (none here).
    for backend, adapter, bias in [(first.backend, first.adapter, bundle.class_bias)] \
            + [(m.backend, m.adapter, m.bias) for m in clf._members]:
        for view in tta_views(small, bundle.tta):
            raw = backend.invoke(adapter(view))
            values = postprocess.dequantize(raw, backend.output_detail)
            by_hand.append(postprocess.to_probabilities(values, bundle.output_kind, bias))
    expected = np.mean(by_hand, axis=0)
    got = np.array([r.probabilities[lab] for lab in bundle.labels])
    assert np.allclose(got, expected, atol=1e-6)
    assert second_only["members"][0]["file"] == member.name
    # The live stream: the first member alone, one view.
    live = clf.infer(small)
    assert live.views == 1
    assert live.probabilities == first.infer(small).probabilities
    # Each is judged by the threshold chosen on what it is: the capture's mean (every member
    # over every view) by the rule's tta_threshold, one output by the plain one.
    rule = bundle.decision
    assert r.decision["threshold"] == rule["tta_threshold"]
    assert live.decision["threshold"] == rule["threshold"] != rule["tta_threshold"]
    # No threshold is chosen on the members over one view, so asking for the members (as
    # `edge classify` does without --tta) classifies as a capture: every member, every view.
    members_only = clf.infer(small, members=True)
    assert members_only.views == r.views
    assert members_only.probabilities == r.probabilities
    assert members_only.decision["threshold"] == rule["tta_threshold"]
    cli_like = clf.classify(str(sample))
    assert cli_like.views == r.views and cli_like.decision == r.decision


def test_a_member_adds_its_own_logit_offsets(tmp_path, member):
    """A member trained with its own logit adjustment declares it ("class_bias" in its
    members entry); the first model keeps the bundle's."""
    copy = _with_members(tmp_path, member)
    manifest = json.loads((copy / "manifest.json").read_text())
    labels = manifest["labels"]
    sample = sorted((SKIN / "samples").glob("*.jpg"))[0]
    plain = Classifier(load_bundle(copy), backend="cpu", threads=1)
    small, _ = plain.prepare(str(sample))
    before = plain.infer(small, members=True).probabilities
    manifest["members"][0]["class_bias"] = [3.0 if lab == "vasc" else 0.0 for lab in labels]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    biased = Classifier(load_bundle(copy), backend="cpu", threads=1)
    after = biased.infer(small, members=True).probabilities
    assert after["vasc"] > before["vasc"] + 0.01
    assert biased.infer(small).probabilities == plain.infer(small).probabilities  # first alone
    manifest["members"][0]["class_bias"] = [1.0]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="class_bias has 1 values"):
        Classifier(load_bundle(copy), backend="cpu", threads=1)


@pytest.fixture(scope="module")
def wide_member(tmp_path_factory) -> Path:
    """An int8 model with the bundle's 7 outputs that takes 120×160, not 168×224: a member
    trained at another input size."""
    from tests.conftest import require_module

    require_module("tensorflow", "the test exports a small int8 model")
    import keras
    from PIL import Image

    from training.export import export_int8

    keras.utils.set_random_seed(3)
    inputs = keras.Input((120, 160, 3))
    x = keras.layers.Conv2D(8, 3, strides=4, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(7)(x))
    images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((160, 120)))
                       for p in sorted((SKIN / "samples").glob("*.jpg"))])
    out = tmp_path_factory.mktemp("wide") / "member_wide_int8.tflite"
    return export_int8(model, images, out)


def _declare(copy: Path, size: list[int] | None) -> Path:
    manifest = json.loads((copy / "manifest.json").read_text())
    if size is None:
        manifest["members"][0].pop("input", None)
    else:
        manifest["members"][0]["input"] = {"size": size}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_a_member_at_its_own_input_size_sees_the_image_at_that_size(tmp_path, wide_member):
    """A member declaring its own input is fed the decoded image resized to that size (as it
    was trained and evaluated), not the first model's input stretched."""
    from edge.inference.preprocess import resize, tta_views

    copy = _with_members(tmp_path, wide_member)
    with pytest.raises(BundleError, match="declare the member's own size"):
        Classifier(load_bundle(copy), backend="cpu", threads=1)
    with pytest.raises(BundleError, match="fix the member's input.size"):
        Classifier(load_bundle(_declare(copy, [96, 128])), backend="cpu", threads=1)
    bundle = load_bundle(_declare(copy, [120, 160]))
    assert bundle.describe()["members"][0]["input_size"] == [120, 160]
    clf = Classifier(bundle, backend="cpu", threads=1)
    first = Classifier(load_bundle(SKIN), backend="cpu", threads=1)
    sample = sorted((SKIN / "samples").glob("*.jpg"))[1]
    small, _, decoded = clf.prepare_encoded(str(sample))
    assert small.shape == (168, 224, 3)
    r = clf.infer(small, tta=True, members=True, image=decoded)
    assert r.views == 2 * len(bundle.tta)
    member = clf._members[0]
    wide = np.asarray(resize(decoded, (120, 160), bundle.input_spec["resize"]), dtype=np.uint8)
    by_hand = []
    for backend, adapter, bias, img in [
        (first.backend, first.adapter, bundle.class_bias, small),
        (member.backend, member.adapter, member.bias, wide),
    ]:
        for view in tta_views(img, bundle.tta):
            assert adapter(view).shape == (1, *img.shape)
            values = postprocess.dequantize(backend.invoke(adapter(view)), backend.output_detail)
            by_hand.append(postprocess.to_probabilities(values, bundle.output_kind, bias))
    got = np.array([r.probabilities[lab] for lab in bundle.labels])
    assert np.allclose(got, np.mean(by_hand, axis=0), atol=1e-6)
    # `classify` (what `edge classify` and training's evaluation call) gives the same, from a
    # file and from a camera frame's array alike; the live stream runs the first model alone.
    assert clf.classify(str(sample)).probabilities == r.probabilities
    frame = np.asarray(decoded)
    from_frame = clf.classify(frame)
    assert from_frame.views == r.views
    assert clf.infer(small).probabilities == first.infer(small).probabilities
    with pytest.raises(ValueError, match="pass the decoded image"):
        clf.infer(small, members=True)


def test_the_ensemble_builder_records_a_member_s_own_size(tmp_path):
    """`python -m training ensemble` takes a bundle of another input size as a member (the
    manifest entry declares it) but not one that resizes or normalises differently."""
    from training.ensemble import _compatible

    def variant(name: str, **input_spec) -> Path:
        copy = tmp_path / name
        shutil.copytree(SKIN, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["input"].update(input_spec)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        return copy

    first = load_bundle(SKIN)
    assert _compatible(first, load_bundle(SKIN), SKIN) is None
    wider = variant("wider", size=[192, 256])
    assert _compatible(first, load_bundle(wider), wider) == {"size": [192, 256]}
    cropped = variant("cropped", size=[192, 256], resize="center-crop")
    with pytest.raises(BundleError, match="same colour order, resize and normalization"):
        _compatible(first, load_bundle(cropped), cropped)


def test_members_are_refused_with_the_reason(tmp_path, member):
    wrong_hash = _with_members(tmp_path / "a", member)
    manifest = json.loads((wrong_hash / "manifest.json").read_text())
    manifest["members"][0]["sha256"] = "0" * 64
    (wrong_hash / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="sha256 of member2_int8.tflite"):
        load_bundle(wrong_hash)

    missing = _with_members(tmp_path / "b", member)
    (missing / member.name).unlink()
    with pytest.raises(BundleError, match="member2_int8.tflite is missing"):
        load_bundle(missing)

    other_labels = _with_members(tmp_path / "c", BLOOD / "blood-smear_int8.tflite")
    with pytest.raises(BundleError, match="(outputs but the bundle has 7 labels|input)"):
        Classifier(load_bundle(other_labels), backend="cpu")


def test_the_model_page_and_status_list_the_members(tmp_path, member):
    from edge.serve import build
    from tests.daemon_helpers import make_config, replay_folder

    bundle = _with_members(tmp_path, member)
    cfg = make_config(bundle, replay_folder(tmp_path / "r", sorted((SKIN / "samples")
                                                                   .glob("*.jpg"))[:2]),
                      tmp_path / "data")
    pipeline, app, store = build(cfg)
    try:
        c = app.test_client()
        assert "member2_int8.tflite" in c.get("/model").get_data(as_text=True)
        members = c.get("/api/status").get_json()["model"]["members"]
        assert members == ["skin-lesion_int8.tflite", "member2_int8.tflite"]
        model = c.get("/api/model").get_json()
        listed = model["bundle"]["members"]
        assert [m["file"] for m in listed] == ["member2_int8.tflite"]
        assert listed[0]["sha256"] == sha256_file(bundle / "member2_int8.tflite")
        assert model["bundle"]["tta"] == load_bundle(SKIN).tta
        assert model["bundle"]["decision"]["threshold"] == load_bundle(bundle).decision[
            "threshold"]
        assert model["backend"]["members"] == 2
    finally:
        store.close()


def test_an_upload_averages_a_member_of_another_size_as_classify_does(tmp_path, wide_member):
    """The daemon's upload path hands the decoded image to the member of its own size: the
    stored result is `classify`'s, and the Model page names the member's input."""
    import io

    from edge.serve import build
    from tests.daemon_helpers import make_config, replay_folder

    samples = sorted((SKIN / "samples").glob("*.jpg"))
    bundle = _declare(_with_members(tmp_path, wide_member), [120, 160])
    cfg = make_config(bundle, replay_folder(tmp_path / "r", samples[:2]), tmp_path / "data")
    pipeline, app, store = build(cfg)
    try:
        c = app.test_client()
        assert "member_wide_int8.tflite (160×120 input)" in c.get("/model").get_data(
            as_text=True)
        token = c.get("/api/session").get_json()["csrf_token"]
        r = c.post("/api/classify", headers={"X-CSRFToken": token},
                   data={"image": (io.BytesIO(samples[1].read_bytes()), "x.jpg")})
        assert r.status_code == 201, r.get_json()
        doc = r.get_json()
        expected = Classifier(load_bundle(bundle), backend="cpu", threads=1).classify(
            str(samples[1]))
        assert doc["views"] == expected.views == 2 * len(load_bundle(SKIN).tta)
        assert doc["probabilities"] == pytest.approx(expected.probabilities, abs=1e-6)
    finally:
        store.close()
