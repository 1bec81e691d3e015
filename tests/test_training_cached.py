"""Fine-tuning on cached activations: the slice is exact, shares weights with the backbone, the
copies are cached and drawn fairly, and a training run through it trains the top layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require_module

require_module("tensorflow", "training needs the train extra (installed in CI)")

import keras  # noqa: E402

from training.cached import (  # noqa: E402
    activations,
    copies_dataset,
    int8_activations,
    split_at,
)
from training.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mobilenet(coral):
    """Real ImageNet weights: a randomly initialised MobileNetV2's activations underflow to ~0
    by block 13, where every augmented copy would look the same."""
    from training.model import build_backbone

    return build_backbone("mobilenetv2", 64, "coral")


@pytest.fixture(scope="module")
def images(parrot):
    from PIL import Image

    img = Image.open(parrot).convert("RGB")
    w, h = img.size
    crops = [img.crop((i * w // 10, 0, i * w // 10 + h // 2, h // 2)) for i in range(5)]
    return np.stack([np.asarray(c.resize((64, 64))) for c in crops]).astype(np.uint8)


def test_split_composes_to_the_backbone_and_shares_its_layers(mobilenet, images):
    bottom, top = split_at(mobilenet, "block_13_expand")
    x = (images[:2].astype(np.float32) - 127.5) / 127.5
    whole = mobilenet.predict(x, verbose=0)
    parts = top.predict(bottom.predict(x, verbose=0), verbose=0)
    np.testing.assert_allclose(parts, whole, atol=1e-5)
    assert top.get_layer("Conv_1") is mobilenet.get_layer("Conv_1")
    assert "block_12_add" in [layer.name for layer in bottom.layers]
    assert "block_12_add" not in [layer.name for layer in top.layers]


def test_split_inside_a_residual_block_is_refused(mobilenet):
    with pytest.raises(ValueError, match="skip connection"):
        split_at(mobilenet, "block_12_depthwise")
    with pytest.raises(ValueError, match="no layer 'nope'"):
        split_at(mobilenet, "nope")


def test_activations_are_augmented_per_copy_and_reused_from_disk(mobilenet, images, tmp_path):
    bottom, _ = split_at(mobilenet, "block_13_expand")
    plain = activations(bottom, images, 1, False, "block_13_expand", tmp_path, "t")
    assert plain.shape == (1, 5, 4, 4, 96) and plain.dtype == np.float16
    expected = bottom.predict((images.astype(np.float32) - 127.5) / 127.5, verbose=0)
    np.testing.assert_allclose(plain[0], expected, atol=0.02, rtol=0.01)

    keras.utils.set_random_seed(0)  # as train() does: copies must still differ
    aug = activations(bottom, images, 3, True, "block_13_expand", tmp_path, "a")
    assert np.abs(plain[0]).mean() > 0.05  # real activations, not an underflow
    for a, b in ((0, 1), (1, 2), (0, 2)):  # a different flip/turn/colour per copy
        assert np.abs(aug[a].astype(np.float32) - aug[b]).mean() > 0.01
    files = sorted(tmp_path.glob("a-*.npy"))
    assert len(files) == 3
    np.save(files[0], np.full_like(aug[0], 7))  # a reused copy comes from its file
    again = activations(bottom, images, 3, True, "block_13_expand", tmp_path, "a")
    assert (again[0] == 7).all() and np.array_equal(again[1:], aug[1:])


def test_int8_activations_are_the_int8_bottoms_own(mobilenet, images, tmp_path):
    """Batched (with a padded last batch) they equal one image at a time through the int8
    bottom, they are the float bottom's up to int8 error, and augmented copies differ."""
    from edge.inference.runtime import resolve_runtime
    from training.export import export_int8

    layer = "block_6_expand"
    bottom, _ = split_at(mobilenet, layer)
    tflite = export_int8(bottom, images, tmp_path / "bottom.tflite")
    q = int8_activations(tflite, images, 1, False, layer, tmp_path, "t", batch=2)
    assert q.shape == (1, 5, 8, 8, 32) and q.dtype == np.float16

    interp = resolve_runtime().interpreter_cls(model_path=str(tflite))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    scale, zero = out["quantization"]
    for i, img in enumerate(images):
        interp.set_tensor(inp["index"], img[None])
        interp.invoke()
        one = (interp.get_tensor(out["index"])[0].astype(np.float32) - zero) * scale
        np.testing.assert_array_equal(q[0, i], one.astype(np.float16))

    f = bottom.predict((images.astype(np.float32) - 127.5) / 127.5, verbose=0)
    assert np.linalg.norm(q[0] - f) / np.linalg.norm(f) < 0.3
    assert np.abs(q[0].astype(np.float32) - f).max() > 0  # int8 rounding is there

    aug = int8_activations(tflite, images, 2, True, layer, tmp_path, "a", batch=2)
    assert np.abs(aug[0].astype(np.float32) - aug[1]).mean() > 0.01
    assert len(list(tmp_path.glob("a-int8-*.npy"))) == 2


def test_copies_dataset_shows_each_image_once_per_epoch_with_its_class_weight():
    n, copies = 10, 3
    acts = np.arange(copies * n, dtype=np.float16).reshape(copies, n, 1)  # value = copy*n + i
    labels = np.array([0, 1] * 5, dtype=np.int32)
    ds = copies_dataset(acts, labels, {0: 1.0, 1: 4.0}, batch=4, seed=0)
    assert len(ds) == 3
    seen_copies = set()
    for _ in range(4):
        batches = [ds[i] for i in range(len(ds))]
        values = np.concatenate([x[:, 0] for x, _, _ in batches]).astype(int)
        images = values % n
        assert sorted(images) == list(range(n))  # every image exactly once
        for x, y, w in batches:
            idx = x[:, 0].astype(int) % n
            np.testing.assert_array_equal(y, labels[idx])
            np.testing.assert_array_equal(w, np.where(y == 1, 4.0, 1.0))
        seen_copies |= set(values // n)
        ds.on_epoch_end()
    assert seen_copies == {0, 1, 2}


@pytest.mark.parametrize("int8_copies", [0, 1])
def test_a_cached_run_trains_only_the_top_and_keeps_the_bottom(shared, tmp_path, int8_copies):
    """small_cnn sliced at conv2: conv0/conv1 stay as initialised, conv2 and the head change."""
    import keras

    from training.train import train

    cfg = load_config(
        ROOT / "training/configs/blood-smear.toml",
        {
            "model.backbone": "small_cnn",
            "model.weights": "none",
            "model.input_size": 48,
            "model.dense": 16,
            "dataset.limit_per_class": 10,
            "train.head_epochs": 1,
            "train.finetune_epochs": 2,
            "train.finetune_lr": 0.01,
            "train.batch_size": 8,
            "train.unfreeze_from": "conv2",
            "train.cached_copies": 2,
            "train.int8_copies": int8_copies,
        },
    )
    keras.utils.set_random_seed(cfg.dataset.seed)
    from training.model import build_backbone

    initial = build_backbone("small_cnn", 48, "none")  # same seed → same initial weights
    run_dir = tmp_path / "run"
    model = keras.models.load_model(train(cfg, run_dir))
    trained = model.get_layer("small_cnn")
    for name in ("conv0", "conv1"):
        for a, b in zip(
            initial.get_layer(name).get_weights(),
            trained.get_layer(name).get_weights(),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(
        initial.get_layer("conv2").get_weights()[0], trained.get_layer("conv2").get_weights()[0]
    )
    acts = run_dir / "activations"
    assert len(list(acts.glob("train-[0-9]-*.npy"))) == 2
    # int8 copies join the float ones and replace the float validation activations
    assert len(list(acts.glob("train-int8-*.npy"))) == int8_copies
    assert len(list(acts.glob("val-int8-*.npy"))) == int8_copies
    assert len(list(acts.glob("val-[0-9]-*.npy"))) == 1 - int8_copies
    assert (acts / "bottom_int8.tflite").is_file() == bool(int8_copies)
    assert (run_dir / "history.csv").read_text().count("\n") == 3  # header + 2 epochs
