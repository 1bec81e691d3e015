"""A run interrupted after its best epoch resumes without losing that epoch: the best file is not
replaced by a worse one, early stopping goes on counting, and the weights kept are the best's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import require_module

require_module("tensorflow", "training needs the train extra (installed in CI)")

import keras  # noqa: E402

from training.resume import best_and_backup, prior_best, state_path  # noqa: E402


class Interrupted(Exception):
    pass


def _fit(run_dir, scores, patience, stop_after=None, weights_seen=None):
    """Fit a tiny model whose validation score per epoch is ``scores[epoch]``; raise after
    epoch ``stop_after`` (0-based) as a killed process would, after the backup was written."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    y = np.random.default_rng(1).normal(size=(16, 2)).astype(np.float32)

    class Score(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_score"] = scores[epoch]
            if weights_seen is not None:
                weights_seen[epoch] = [w.copy() for w in self.model.get_weights()]

    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == stop_after:
                raise Interrupted

    keep, backup = best_and_backup(run_dir, "finetune", "val_score", patience, weights_only=False)
    ran = []

    class Ran(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            ran.append(epoch)

    model.fit(
        x, y, epochs=len(scores), verbose=0, callbacks=[Ran(), Score(), *keep, backup, Kill()]
    )
    return model, ran


def _same(a, b):
    return all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))


def test_resume_after_the_best_epoch_keeps_it(tmp_path):
    scores = [0.5, 0.9, 0.6, 0.7, 0.65, 0.95]
    seen: dict[int, list] = {}
    with pytest.raises(Interrupted):
        _fit(tmp_path, scores, patience=3, stop_after=2, weights_seen=seen)
    best_file = tmp_path / "best-finetune.keras"
    assert json.loads(state_path(best_file).read_text()) == {"score": 0.9, "epoch": 1}
    assert prior_best(tmp_path / "backup-finetune", best_file) == (0.9, 1, 3)

    model, ran = _fit(tmp_path, scores, patience=3, weights_seen=seen)
    # Epochs 0-2 ran before the kill; early stopping counted epoch 2, so after 3 and 4 the
    # patience of 3 ran out before epoch 5 (which would have been better).
    assert ran == [3, 4]
    assert _same(keras.models.load_model(best_file).get_weights(), seen[1])
    assert _same(model.get_weights(), seen[1])
    assert not (tmp_path / "backup-finetune").exists()
    assert prior_best(tmp_path / "backup-finetune", best_file) is None  # a new run starts fresh


def test_resume_that_improves_keeps_the_new_best(tmp_path):
    scores = [0.5, 0.9, 0.6, 0.95, 0.7]
    seen: dict[int, list] = {}
    with pytest.raises(Interrupted):
        _fit(tmp_path, scores, patience=5, stop_after=2, weights_seen=seen)
    model, ran = _fit(tmp_path, scores, patience=5, weights_seen=seen)
    assert ran == [3, 4]
    best_file = tmp_path / "best-finetune.keras"
    assert json.loads(state_path(best_file).read_text()) == {"score": 0.95, "epoch": 3}
    assert _same(keras.models.load_model(best_file).get_weights(), seen[3])
    assert _same(model.get_weights(), seen[3])
