"""Bundle loading: every broken bundle is refused with a message that says what to fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge.errors import BundleError, ModelError
from edge.inference.bundle import bundle_from_tflite, load_bundle, load_model, validate_manifest
from edge.inference.classifier import Classifier


@pytest.fixture
def bundle_copy(coral_bundle, tmp_path) -> Path:
    dest = tmp_path / "b"
    shutil.copytree(coral_bundle, dest)
    return dest


def edit_manifest(root: Path, change) -> None:
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def test_valid_bundle_loads_with_digests(coral_bundle):
    b = load_bundle(coral_bundle)
    assert set(b.artifacts) == {"int8", "edgetpu"}
    assert b.cpu_artifact().kind == "int8"
    m = json.loads((coral_bundle / "manifest.json").read_text())
    assert len(m["artifacts"]["int8"]["sha256"]) == 64
    assert (coral_bundle / "labels.txt").read_text().splitlines()[89] == "macaw"


def test_corrupt_artifact_is_refused_by_sha256(bundle_copy):
    model = bundle_copy / "mobilenet_v2_1.0_224_quant.tflite"
    data = bytearray(model.read_bytes())
    data[5000] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 of mobilenet_v2_1.0_224_quant.tflite"):
        load_bundle(bundle_copy)


def test_truncated_artifact_is_refused_by_size(bundle_copy):
    model = bundle_copy / "mobilenet_v2_1.0_224_quant.tflite"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(BundleError, match="truncated"):
        load_bundle(bundle_copy)


def test_missing_artifact_file(bundle_copy):
    (bundle_copy / "mobilenet_v2_1.0_224_quant_edgetpu.tflite").unlink()
    with pytest.raises(BundleError, match="artifact 'edgetpu' file .* is missing"):
        load_bundle(bundle_copy)


def test_missing_manifest(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path)


def test_manifest_not_json(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{nope")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_copy)


def test_schema_errors_name_the_field(bundle_copy):
    edit_manifest(bundle_copy, lambda m: (m.pop("labels"), m["input"].update(resize="zoom")))
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    text = str(info.value)
    assert "'labels' is a required property" in text
    assert "input/resize" in text and "docs/bundle-format.md" in text


def test_decision_must_name_a_group(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m["decision"].update(group="birds"))
    with pytest.raises(BundleError, match="decision/group: 'birds' is not one of"):
        load_bundle(bundle_copy)


def test_group_with_unknown_label(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m["label_groups"]["parrots"].append("dodo"))
    with pytest.raises(BundleError, match=r"label_groups/parrots: unknown labels \['dodo'\]"):
        load_bundle(bundle_copy)


def test_labels_file_must_agree(bundle_copy):
    (bundle_copy / "labels.txt").write_text("a\nb\nc\n")
    with pytest.raises(BundleError, match="disagrees with manifest.json"):
        load_bundle(bundle_copy)


def test_compiled_model_listed_as_int8_is_refused(bundle_copy):
    def swap(m):
        m["artifacts"]["int8"], m["artifacts"]["edgetpu"] = (
            m["artifacts"]["edgetpu"],
            m["artifacts"]["int8"],
        )

    edit_manifest(bundle_copy, swap)
    with pytest.raises(BundleError, match="compiled for the Edge TPU and cannot run on the CPU"):
        load_bundle(bundle_copy)


def test_input_size_mismatch_found_when_opened(bundle_copy, host_without_tpu):
    edit_manifest(bundle_copy, lambda m: m["input"].update(size=[160, 160]))
    with pytest.raises(BundleError, match="input is 224×224 but the manifest says 160×160"):
        Classifier(load_bundle(bundle_copy), backend="cpu")


def test_input_dtype_mismatch_found_when_opened(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m["artifacts"]["int8"].update(input_dtype="int8"))
    with pytest.raises(BundleError, match="input type is uint8, the manifest says int8"):
        Classifier(load_bundle(bundle_copy), backend="cpu")


def test_label_count_must_match_outputs(coral, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    bundle = load_model(coral / "mobilenet_v2_1.0_224_quant.tflite", labels)
    with pytest.raises(BundleError, match="has 1001 outputs but there are 3 labels"):
        Classifier(bundle, backend="cpu")


def test_text_file_named_tflite(tmp_path):
    fake = tmp_path / "model.tflite"
    fake.write_text("this is not a model\n" * 10)
    with pytest.raises(ModelError, match="not a TensorFlow Lite model"):
        bundle_from_tflite(fake)


def test_bare_model_without_labels_gets_numbered_classes(coral, parrot):
    clf = Classifier(load_model(coral / "mobilenet_v2_1.0_224_quant.tflite"), backend="cpu")
    assert clf.classify(str(parrot)).label == "class_89"


def test_validate_manifest_accepts_minimal():
    validate_manifest(
        {
            "schema_version": 1,
            "name": "x",
            "version": "1",
            "labels": ["a", "b"],
            "input": {"size": [96, 96]},
            "artifacts": {"float": {"file": "m.tflite"}},
        }
    )
