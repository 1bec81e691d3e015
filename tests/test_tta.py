"""Test-time augmentation: the bundle option, what the classifier averages, and where the
daemon uses it (uploads and captures, never the live stream)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.errors import BundleError
from edge.inference.bundle import load_bundle, validate_manifest
from edge.inference.classifier import Classifier
from edge.inference.preprocess import tta_views

ROOT = Path(__file__).resolve().parent.parent
VIEWS = ["identity", "flip_lr", "flip_ud", "rot180"]


def _with_tta(src: Path, dest: Path, views, threshold: float | None = None) -> Path:
    shutil.copytree(src, dest)
    path = dest / "manifest.json"
    m = json.loads(path.read_text())
    m["tta"] = views
    if threshold is not None:
        m["decision"]["tta_threshold"] = threshold
    path.write_text(json.dumps(m))
    return dest


@pytest.fixture
def skin_tta(tmp_path) -> Path:
    """The shipped skin-lesion bundle (a 4:3 input) offering the four shape-keeping views."""
    return _with_tta(ROOT / "models" / "skin-lesion", tmp_path / "skin", VIEWS)


def _sample(bundle: Path) -> Path:
    return sorted((bundle / "samples").glob("*.jpg"))[0]


def test_tta_is_the_mean_of_the_views_classified_one_by_one(skin_tta):
    clf = Classifier(load_bundle(skin_tta), backend="cpu", threads=1)
    rgb, times = clf.prepare(str(_sample(skin_tta)))
    views = tta_views(rgb, VIEWS)
    # The views really differ (a flipped lesion is another input)...
    assert not np.array_equal(views[0], views[1])
    singles = [clf.infer(v) for v in views]
    each = np.array([[r.probabilities[lab] for lab in clf.bundle.labels] for r in singles])
    assert len({tuple(np.round(row, 6)) for row in each}) > 1
    # ...and the TTA result is exactly their mean, with the views counted.
    averaged = clf.infer(rgb, times, tta=True)
    got = np.array([averaged.probabilities[lab] for lab in clf.bundle.labels])
    np.testing.assert_allclose(got, each.mean(axis=0), rtol=0, atol=1e-6)
    assert averaged.views == 4 and singles[0].views == 1
    plain = clf.infer(rgb, times)
    assert plain.views == 1
    np.testing.assert_allclose(
        [plain.probabilities[lab] for lab in clf.bundle.labels], each[0], atol=1e-7
    )


def test_tta_decision_uses_its_own_threshold(tmp_path):
    bundle = _with_tta(ROOT / "models" / "skin-lesion", tmp_path / "s", VIEWS, threshold=0.999)
    clf = Classifier(load_bundle(bundle), backend="cpu", threads=1)
    rgb, _ = clf.prepare(str(_sample(bundle)))
    assert clf.infer(rgb, tta=True).decision["threshold"] == 0.999
    assert clf.infer(rgb).decision["threshold"] == clf.bundle.decision["threshold"]


def test_tta_without_views_in_the_bundle_is_a_plain_classification(blood_bundle, blood_samples):
    clf = Classifier(load_bundle(blood_bundle), backend="cpu", threads=1)
    a = clf.classify(str(blood_samples[0]), tta=True)
    b = clf.classify(str(blood_samples[0]))
    assert a.views == b.views == 1 and a.probabilities == b.probabilities


@pytest.mark.parametrize(
    ("views", "needle"),
    [
        (["identity", "mirror"], "tta"),
        (["identity"], "tta"),
        (["identity", "identity"], "tta"),
    ],
)
def test_manifest_rejects_a_bad_tta_option(tmp_path, views, needle):
    bundle = _with_tta(ROOT / "models" / "skin-lesion", tmp_path / "bad", views)
    with pytest.raises(BundleError) as err:
        load_bundle(bundle)
    assert needle in str(err.value)


def test_quarter_turns_are_refused_on_a_non_square_input():
    m = json.loads((ROOT / "models" / "skin-lesion" / "manifest.json").read_text())
    m["input"]["size"] = [168, 224]
    m["tta"] = ["identity", "rot90"]
    with pytest.raises(BundleError) as err:
        validate_manifest(m)
    assert "non-square" in str(err.value) and "rot180" in str(err.value)
    m["tta"] = VIEWS
    validate_manifest(m)


def test_square_input_may_turn_by_quarters(tmp_path, blood_samples):
    bundle = _with_tta(ROOT / "models" / "blood-smear", tmp_path / "b", ["identity", "rot90"])
    clf = Classifier(load_bundle(bundle), backend="cpu", threads=1)
    assert clf.classify(str(blood_samples[0]), tta=True).views == 2


def test_daemon_uses_tta_for_uploads_not_for_the_live_stream(skin_tta, tmp_path):
    from tests.test_pipeline import _pipeline

    frame = np.asarray(Image.open(_sample(skin_tta)).convert("RGB"))
    pipe, _ = _pipeline(skin_tta, tmp_path, [frame])
    pipe.start()
    try:
        deadline = time.monotonic() + 20
        while pipe.state.classified < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pipe.state.classified >= 3
        assert pipe.state.result["views"] == 1  # live: one view per frame
        upload = pipe.results.classify_and_store(_sample(skin_tta).read_bytes(), "upload", None)
        assert upload["views"] == 4
    finally:
        pipe.stop()
        pipe.store.close()
