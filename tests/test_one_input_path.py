"""One preprocessing path: the same image file gives the same model input whether it is
uploaded to the daemon, classified with ``edge classify`` or read by training's evaluation."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.config import load_config
from edge.daemon.pipeline import Pipeline
from edge.daemon.store import Store
from edge.inference.bundle import load_bundle
from edge.inference.classifier import Classifier
from tests.test_pipeline import ListSource

ROOT = Path(__file__).resolve().parent.parent


def _upload_input(bundle: Path, data: bytes, tmp_path: Path) -> np.ndarray:
    """The array the daemon's upload path hands to inference (recorded at infer())."""
    cfg = load_config(
        None,
        {"model.bundle": str(bundle), "source.path": "x", "storage.data_dir": str(tmp_path)},
    )
    clf = Classifier(load_bundle(bundle), backend="cpu", threads=1)
    seen = []
    infer = clf.infer

    def spy(small, *args, **kwargs):
        seen.append(small.copy())
        return infer(small, *args, **kwargs)

    clf.infer = spy
    pipe = Pipeline(cfg, clf, ListSource([np.zeros((8, 8, 3), np.uint8)]), Store(tmp_path))
    try:
        pipe.results.classify_and_store(data, "upload", None)
    finally:
        pipe.store.close()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize(
    "bundle, pick",
    [
        ("blood-smear", lambda b: sorted((b / "samples").glob("*.jpg"))[0]),
        ("skin-lesion", lambda b: sorted((b / "samples").glob("*.jpg"))[0]),
    ],
)
def test_same_jpeg_same_input_tensor_on_every_path(tmp_path, bundle, pick):
    root = ROOT / "models" / bundle
    path = pick(root)
    # A larger JPEG as a camera app would send: draft decoding (1/2 scale) then matters.
    big = tmp_path / "big.jpg"
    Image.open(path).convert("RGB").resize((800, 600)).save(big, "JPEG", quality=92)
    for image in (path, big):
        clf = Classifier(load_bundle(root), backend="cpu", threads=1)
        via_classify, _ = clf.prepare(str(image))
        via_upload = _upload_input(root, image.read_bytes(), tmp_path / image.stem)
        assert np.array_equal(via_upload, via_classify), image.name

        from training.input_pipeline import load_model_input  # (imports no TensorFlow)

        spec = clf.bundle.input_spec
        via_training = load_model_input(image, tuple(spec["size"]), spec["resize"])
        assert np.array_equal(via_training, via_classify), image.name


def test_upload_of_a_png_and_its_array_agree_with_classify(tmp_path, blood_samples):
    """Not only JPEG: a PNG upload takes the same path as classifying the file."""
    root = ROOT / "models" / "blood-smear"
    png = tmp_path / "field.png"
    Image.open(blood_samples[0]).save(png)
    clf = Classifier(load_bundle(root), backend="cpu", threads=1)
    via_classify, _ = clf.prepare(str(png))
    buf = io.BytesIO(png.read_bytes())
    assert np.array_equal(_upload_input(root, buf.getvalue(), tmp_path / "u"), via_classify)
