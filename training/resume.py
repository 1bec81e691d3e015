"""A best checkpoint and early stopping that survive an interrupted run.

Keras' BackupAndRestore brings back the weights and the epoch count, but ModelCheckpoint and
EarlyStopping start again knowing no best: the first epoch after a restart replaced the best file
even when it was worse, early stopping forgot how long it had waited, and the weights kept at the
end were the best since the restart rather than the best of the run. The best score and its epoch
are therefore kept beside the checkpoint (``best-<phase>.json``) and read back on a resume.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

from .config import ConfigError

log = logging.getLogger(__name__)

# What a phase's backup holds depends on these settings: resumed with others, Keras would load
# weights of another shape, or skip the optimizer's slots with a warning (a moving average
# switched on mid-phase would start from zeros and swap them into the model).
STATE_KEYS = ("model", "train.unfreeze_from", "train.ema_momentum")


def _setting(config: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config.get(part, {}) if isinstance(config, dict) else {}
    return config


def check_resumable(run_dir: Path, config: dict[str, Any]) -> None:
    """Refuse to resume an interrupted phase under settings its backup was not written with.

    ``config`` is the run's configuration as ``run_dir/config.json`` stores it; that file is the
    one the interrupted start wrote."""
    backups = sorted(p.parent.name for p in run_dir.glob("backup-*/training_metadata.json"))
    stored = run_dir / "config.json"
    if not backups or not stored.exists():
        return
    before = json.loads(stored.read_text())
    changed = [k for k in STATE_KEYS if _setting(before, k) != _setting(config, k)]
    if changed:
        raise ConfigError(
            f"{run_dir} holds an interrupted phase ({', '.join(backups)}) trained with other "
            f"{', '.join(changed)} than this start's",
            "resume it with the settings it started with (its config.json), or train into a "
            "new --run-dir",
        )


class Prior(NamedTuple):
    """What the interrupted part of a phase found: its best score, that epoch (0-based) and the
    number of epochs it completed."""

    score: float
    epoch: int
    done: int


def state_path(best_path: Path) -> Path:
    return best_path.with_name(best_path.name.split(".")[0] + ".json")


def prior_best(backup_dir: Path, best_path: Path) -> Prior | None:
    """The best so far when this phase resumes from ``backup_dir``; None for a fresh start (no
    backup: Keras deletes it when a phase ends) or when the record does not fit the backup."""
    meta, state = backup_dir / "training_metadata.json", state_path(best_path)
    if not (meta.exists() and state.exists() and best_path.exists()):
        return None
    done = int(json.loads(meta.read_text())["epoch"])
    rec = json.loads(state.read_text())
    prior = Prior(float(rec["score"]), int(rec["epoch"]), done)
    if not 0 <= prior.epoch < done:
        log.warning("%s names epoch %d but the backup has %d: ignored", state, prior.epoch, done)
        return None
    return prior


def best_and_backup(
    run_dir: Path,
    phase: str,
    monitor: str,
    patience: int,
    weights_only: bool,
) -> tuple[list, object]:
    """The callbacks that keep the best epoch (the checkpoint, then early stopping with the
    best weights restored, which records each new best once the checkpoint has saved it), all
    maximising ``monitor``, and the backup that resumes the phase; a resumed phase goes on from
    its prior best."""
    import keras

    best_path = run_dir / (f"best-{phase}.weights.h5" if weights_only else f"best-{phase}.keras")
    backup_dir = run_dir / f"backup-{phase}"
    prior = prior_best(backup_dir, best_path)
    if prior:
        log.info(
            "%s resumes after epoch %d; best so far %s %.4f at epoch %d",
            phase,
            prior.done,
            monitor,
            prior.score,
            prior.epoch + 1,
        )

    class EarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if prior:
                self.best, self.best_epoch = prior.score, prior.epoch
                self.wait = prior.done - 1 - prior.epoch

        def on_epoch_end(self, epoch, logs=None):
            before = self.best
            super().on_epoch_end(epoch, logs)
            if self.best != before:
                path = state_path(best_path)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"score": float(self.best), "epoch": epoch}))
                os.replace(tmp, path)

        def on_train_end(self, logs=None):
            if prior and self.best == prior.score:
                # No epoch since the restart beat the one before it: its weights are on disk.
                self.best_weights = None
                super().on_train_end(logs)
                self.model.load_weights(best_path)
                log.info(
                    "%s: weights of epoch %d restored from %s", phase, prior.epoch + 1, best_path
                )
            else:
                super().on_train_end(logs)

    keep = [
        keras.callbacks.ModelCheckpoint(
            str(best_path),
            monitor=monitor,
            mode="max",
            save_best_only=True,
            save_weights_only=weights_only,
            initial_value_threshold=prior.score if prior else None,
        ),
        EarlyStopping(monitor=monitor, mode="max", patience=patience, restore_best_weights=True),
    ]
    return keep, keras.callbacks.BackupAndRestore(str(backup_dir))


def averaged_weights(run_dir: Path, phase: str) -> object:
    """The callback that puts the optimizer's moving average of the weights in the model at each
    epoch's end, for the validation score, the best checkpoint, early stopping and the backup,
    and the training weights back at the next epoch's start. List it before those callbacks.

    The backup is therefore written with the average in the model and the training weights in
    the optimizer: a phase resumed from it starts swapped, and the first epoch swaps back (a plain
    ``SwapEMAWeights`` would go on training from the average)."""
    import keras

    resumed = (run_dir / f"backup-{phase}" / "training_metadata.json").exists()

    class AveragedWeights(keras.callbacks.SwapEMAWeights):
        def __init__(self) -> None:
            super().__init__(swap_on_epoch=True)
            self._ema_weights_in_model = resumed

    return AveragedWeights()
