"""Whole-network training pieces: the MobileNet-EdgeTPU transplant, a training step that moves
every layer but BatchNorm, class-balanced sampling, and the config checks around them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require_module

require_module("tensorflow", "training needs the train extra (installed in CI)")

from training.config import ConfigError, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SKIN = ROOT / "training" / "configs" / "skin-lesion.toml"
pytestmark = pytest.mark.training


def test_mobilenet_edgetpu_transplant_recognises_the_macaw(shared, parrot):
    from PIL import Image

    from training.mobilenet_edgetpu import MOBILENET_EDGETPU, build_mobilenet_edgetpu

    path = shared / MOBILENET_EDGETPU
    if not path.is_file():
        pytest.fail(f"{path} is missing from the shared data")
    model, (kernel, bias) = build_mobilenet_edgetpu(path)
    assert model.output_shape == (None, 7, 7, 1280)
    img = Image.open(parrot).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    x = (np.asarray(img, np.float32) - 127.5) / 127.5
    features = model.predict(x[None], verbose=0).mean(axis=(1, 2))[0]
    logits = features @ kernel + bias
    labels = [
        line.split(":", 1)[1]
        for line in (path.parent / "labels.txt").read_text().splitlines()
        if line
    ]
    top = int(np.argmax(logits))
    assert labels[top] == "macaw"
    p = np.exp(logits - logits.max())
    assert p[top] / p.sum() > 0.5
    # Random initialisation keeps the architecture and loses the knowledge.
    blank, _ = build_mobilenet_edgetpu(path, weights=False)
    assert len(blank.layers) == len(model.layers)
    assert np.argmax(blank.predict(x[None], verbose=0).mean(axis=(1, 2))[0] @ kernel + bias) != top


def test_a_whole_network_step_moves_every_layer_but_batchnorm(shared):
    """One optimiser step on eight real dermoscopy images at a 4:3 input: every convolution and
    the head change; BatchNorm (statistics, scale and offset) stays as transplanted, which is
    the intended handling (see training/model.py)."""
    import keras

    from training.input_pipeline import load_model_input
    from training.model import build_backbone, build_head, unfreeze_from
    from training.train import _compile

    images = sorted((shared / "datasets/ham10000/images").glob("*.jpg"))[:8]
    x = np.stack([load_model_input(p, (48, 64), "squash") for p in images])
    x = (x.astype(np.float32) - 127.5) / 127.5
    y = np.arange(8) % 7
    backbone = build_backbone("mobilenetv2", (48, 64), "coral")
    head = build_head(backbone.output_shape[1:], 7, 0.0, 16)
    inputs = keras.Input((48, 64, 3))
    model = keras.Model(inputs, head(backbone(inputs, training=False)))
    assert unfreeze_from(backbone, "all") > 50
    _compile(model, 1e-3)
    layers = [lay for lay in backbone.layers if lay.weights] + [
        lay for lay in head.layers if lay.weights
    ]
    before = {lay.name: [w.copy() for w in lay.get_weights()] for lay in layers}
    model.train_on_batch(x, y)
    moved, still = [], []
    for lay in layers:
        after = lay.get_weights()
        pairs = zip(before[lay.name], after, strict=True)
        changed = any(not np.array_equal(a, b) for a, b in pairs)
        is_bn = isinstance(lay, keras.layers.BatchNormalization)
        (still if is_bn else moved).append((lay.name, changed))
    assert moved and all(changed for _, changed in moved), [n for n, c in moved if not c]
    assert still and not any(changed for _, changed in still), [n for n, c in still if c]


@pytest.mark.parametrize(("mode", "power"), [("balanced", 0.0), ("sqrt", 0.5)])
def test_sampling_draws_classes_in_the_configured_proportions(mode, power):
    from training.input_pipeline import class_sampling_weights, sampled_dataset

    counts = np.array([400, 100, 25, 5])
    labels = np.repeat(np.arange(4), counts).astype(np.int32)
    images = np.zeros((len(labels), 8, 8, 3), np.uint8)
    want = class_sampling_weights(labels, 4, mode)
    np.testing.assert_allclose(want, counts**power / (counts**power).sum())
    drawn: Counter = Counter()
    for _, yb in sampled_dataset(images, labels, 4, mode, batch=50, seed=1).take(80):
        drawn.update(yb.numpy().tolist())
    total = sum(drawn.values())
    assert total == 4000
    for c in range(4):
        # 4000 draws: a binomial's standard deviation is at most 32, so 5 % is > 6 sigma.
        assert abs(drawn[c] / total - want[c]) < 0.05, (c, drawn, want)
    if mode == "balanced":
        assert min(drawn.values()) > 800  # the 5-image class is drawn as often as the others


def test_config_checks_the_new_options(tmp_path):
    cfg = load_config(SKIN)
    assert cfg.model.hw == (168, 224)
    assert cfg.train.unfreeze_from == "all" and cfg.train.sampling == "sqrt"
    assert cfg.export.tta == ["identity", "flip_lr", "flip_ud", "rot180"]
    bad = {
        "train.sampling": "uniform",
        "export.tta": ["identity", "rot90"],
        "model.input_size": [168, 224, 3],
        "train.ema_momentum": 1.0,
    }
    for key, value in bad.items():
        with pytest.raises(ConfigError) as err:
            load_config(SKIN, {key: value})
        assert key.split(".")[-1] in str(err.value)
    assert load_config(SKIN, {"train.ema_momentum": 0.998}).train.ema_momentum == 0.998
    for together in (
        {"train.ema_momentum": -0.5},
        {"train.ema_momentum": 0.99, "train.cached_copies": 2, "train.sampling": "none",
         "train.unfreeze_from": "top_conv", "train.soft_labels": ""},
        {"train.ema_momentum": 0.99, "train.finetune_epochs": 0},
    ):
        with pytest.raises(ConfigError, match="ema_momentum"):
            load_config(SKIN, together)


def test_soft_targets_mix_labels_with_the_teacher(tmp_path):
    from training.datasets import Sample
    from training.teacher import soft_targets

    labels = ["a", "b", "c"]
    path = tmp_path / "soft.npz"
    np.savez(
        path,
        image_id=np.array(["x1", "x2"]),
        probs=np.array([[0.2, 0.6, 0.2], [0.0, 0.0, 1.0]], np.float16),
        labels=np.array(labels),
    )
    samples = [Sample(Path("/d/x2.jpg"), "a", "g2"), Sample(Path("/d/x1.jpg"), "c", "g1")]
    got = soft_targets(path, samples, labels, 0.25)
    np.testing.assert_allclose(got, [[0.75, 0.0, 0.25], [0.05, 0.15, 0.8]], atol=1e-3)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-3)
    with pytest.raises(ValueError, match="another split"):
        soft_targets(path, [Sample(Path("/d/x9.jpg"), "a", "g")], labels, 0.5)
    with pytest.raises(ValueError, match="labels"):
        soft_targets(path, samples, ["a", "c", "b"], 0.5)


def test_shipped_teacher_file_covers_the_skin_split_and_never_the_test_images(shared):
    """The committed soft labels belong to the config's own split: every training and
    validation image has one, no test image does (the teacher never saw the test split)."""
    from training.datasets import load_samples, split_samples
    from training.teacher import soft_targets

    cfg = load_config(SKIN)
    # The shipped config learns from the teacher: this test is about that file.
    assert cfg.train.soft_labels, "the skin-lesion config names its teacher's soft labels"
    samples = load_samples("ham10000", cfg.dataset.root_path)
    parts = split_samples(samples, tuple(cfg.dataset.fractions), cfg.dataset.seed)
    for part in ("train", "val"):
        t = soft_targets(cfg.train.soft_labels_path, parts[part], cfg.dataset.labels, 1.0)
        assert len(t) == len(parts[part])
    ids = set(np.load(cfg.train.soft_labels_path)["image_id"].tolist())
    assert not ids & {s.path.stem for s in parts["test"]}
