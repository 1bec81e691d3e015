"""Quantisation-aware fine-tuning: the simulation rounds like int8, sits where the int8 model
stores tensors, and trains the float model's own weights."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require_module

require_module("tensorflow", "training needs the train extra (installed in CI)")

import keras  # noqa: E402

from training.qat import FakeQuant, Quantised, simulate_int8  # noqa: E402


def test_fake_quant_rounds_to_256_levels_of_the_tracked_range():
    fq = FakeQuant(momentum=0.5)
    x = np.linspace(0.5, 3.0, 1000, dtype=np.float32)[None]
    fq(x, training=True)  # first batch sets the range, widened to hold 0
    assert float(fq.lo.numpy()) == 0.0 and float(fq.hi.numpy()) == pytest.approx(3.0)
    y = np.asarray(fq(x, training=False))
    step = 3.0 / 255
    assert len(np.unique(y)) <= 256
    np.testing.assert_allclose(np.round(y / step), y / step, atol=1e-3)  # on the grid
    assert np.abs(y - x).max() <= step / 2 + 1e-6
    fq(x * 2, training=True)  # later batches move the range by the moving average
    assert float(fq.hi.numpy()) == pytest.approx(0.5 * 3.0 + 0.5 * 6.0)


def test_simulation_wraps_stored_tensors_and_shares_weights():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(4, 1, name="expand")(inputs)
    x = keras.layers.BatchNormalization(name="expand_BN")(x)
    x = keras.layers.ReLU(6.0, name="expand_relu")(x)
    x = keras.layers.Conv2D(4, 1, name="project")(x)
    x = keras.layers.BatchNormalization(name="project_BN")(x)
    x = keras.layers.Add(name="add")([inputs, x])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="probs")(x)
    model = keras.Model(inputs, outputs)
    for name in ("expand_BN", "project_BN"):  # frozen, as in fine-tuning
        model.get_layer(name).trainable = False
    sim = simulate_int8(model)
    inner = sim.layers[-1]
    wrapped = sorted(layer.inner.name for layer in inner.layers if isinstance(layer, Quantised))
    # Conv→BN→ReLU is one fused int8 op: only its ReLU output is stored.
    assert wrapped == ["add", "expand_relu", "pool", "probs", "project_BN"]
    assert any(layer is model.get_layer("expand") for layer in inner.layers)

    rng = np.random.default_rng(0)
    data = rng.normal(size=(32, 8, 8, 4)).astype(np.float32)
    before = model.get_layer("project").get_weights()[0].copy()
    sim.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    sim.fit(data, rng.integers(0, 3, 32), epochs=2, batch_size=8, verbose=0)
    assert not np.array_equal(before, model.get_layer("project").get_weights()[0])
    gap = np.abs(sim.predict(data, verbose=0) - model.predict(data, verbose=0)).max()
    assert 0 < gap < 0.1  # the simulation differs from float only by rounding
