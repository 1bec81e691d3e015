"""A run interrupted after its best epoch resumes without losing that epoch: the best file is not
replaced by a worse one, early stopping goes on counting, and the weights kept are the best's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import require_module

require_module("tensorflow", "training needs the train extra (installed in CI)")

import keras  # noqa: E402

from training.resume import averaged_weights, best_and_backup, prior_best, state_path  # noqa: E402


class Interrupted(Exception):
    pass


def _fit(run_dir, scores, patience, stop_after=None, weights_seen=None, ema=0.0):
    """Fit a tiny model whose validation score per epoch is ``scores[epoch]``; raise after
    epoch ``stop_after`` (0-based) as a killed process would, after the backup was written.
    With ``ema`` the optimizer averages the weights and the callbacks see the average."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, use_ema=ema > 0, ema_momentum=ema or 0.99),
        loss="mse",
    )
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

    first = [averaged_weights(run_dir, "finetune")] if ema else []
    model.fit(
        x,
        y,
        epochs=len(scores),
        verbose=0,
        shuffle=False,
        callbacks=[*first, Ran(), Score(), *keep, backup, Kill()],
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


def _close(a, b):
    return all(np.allclose(p, q, atol=1e-6) for p, q in zip(a, b, strict=True))


def test_averaged_weights_are_scored_kept_and_resumed(tmp_path):
    """With a moving average of the weights, every epoch is scored on the average, the best
    average is what the run keeps, and a run resumed from its backup goes on training the
    training weights, not the average: it sees what an uninterrupted run sees."""
    scores = [0.5, 0.6, 0.9, 0.7, 0.8]
    plain: dict[int, list] = {}
    _fit(tmp_path / "plain", scores, patience=5, weights_seen=plain)
    whole: dict[int, list] = {}
    model, _ = _fit(tmp_path / "whole", scores, patience=5, weights_seen=whole, ema=0.5)
    assert not _close(whole[2], plain[2])  # the average, not the last step's weights
    assert _same(model.get_weights(), whole[2])
    assert _same(
        keras.models.load_model(tmp_path / "whole" / "best-finetune.keras").get_weights(), whole[2]
    )

    parts: dict[int, list] = {}
    with pytest.raises(Interrupted):
        _fit(tmp_path / "parts", scores, patience=5, stop_after=1, weights_seen=parts, ema=0.5)
    model, ran = _fit(tmp_path / "parts", scores, patience=5, weights_seen=parts, ema=0.5)
    assert ran == [2, 3, 4]
    for epoch in range(len(scores)):
        assert _close(parts[epoch], whole[epoch]), epoch
    assert _close(model.get_weights(), whole[2])


def test_a_phase_is_not_resumed_under_settings_its_backup_was_not_written_with(tmp_path):
    """Turning the moving average on while a phase waits to resume would swap the optimizer's
    zero-initialised average into the model (Keras only warns that it skipped the slots): the
    start is refused before any work, saying which setting differs."""
    from dataclasses import asdict
    from pathlib import Path

    from training.config import ConfigError, load_config
    from training.resume import check_resumable
    from training.train import train

    cfg_path = Path(__file__).resolve().parent.parent / "training/configs/blood-smear.toml"
    first = load_config(cfg_path)
    (tmp_path / "backup-finetune").mkdir()
    (tmp_path / "backup-finetune" / "training_metadata.json").write_text('{"epoch": 2}')
    stored = json.loads(json.dumps(asdict(first), default=str))
    (tmp_path / "config.json").write_text(json.dumps(stored))

    with pytest.raises(ConfigError, match=r"backup-finetune.*train\.ema_momentum") as err:
        train(load_config(cfg_path, {"train.ema_momentum": 0.99}), tmp_path)
    assert "new --run-dir" in str(err.value)
    assert json.loads((tmp_path / "config.json").read_text()) == stored  # left as it was
    assert not (tmp_path / "split.csv").exists()  # refused before any work

    changed = json.loads(json.dumps(stored))
    changed["model"]["dense"] = 64
    with pytest.raises(ConfigError, match="model"):
        check_resumable(tmp_path, changed)
    changed = json.loads(json.dumps(stored))
    changed["train"]["finetune_epochs"] += 4  # more epochs: a resume may ask for them
    check_resumable(tmp_path, changed)
    # Once the phase ends Keras deletes its backup: a new start may change anything.
    (tmp_path / "backup-finetune" / "training_metadata.json").unlink()
    check_resumable(tmp_path, {"model": {"dense": 64}})
