"""Two-phase fine-tuning: a head on cached frozen-backbone features, then the top blocks.

Phase 1 is cheap (features are computed once); phase 2 trains the top of the backbone with
augmentation, BatchNorm frozen, early-stopped on the validation AUC of the decision group, with
checkpoints and a backup so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .cached import activations, copies_dataset, split_at
from .config import Config
from .datasets import class_weights, config_split, write_split
from .input_pipeline import cache_images, make_dataset, sampled_dataset
from .metrics import headline, selection_score

log = logging.getLogger(__name__)


def resize_mode(cfg: Config) -> str:
    return "squash" if cfg.dataset.layout == "ham10000" else "center-crop"


def prepare_data(cfg: Config, run_dir: Path) -> dict:
    parts = config_split(cfg.dataset)
    write_split(parts, run_dir / "split.csv")
    index = {lab: i for i, lab in enumerate(cfg.dataset.labels)}
    data = {"parts": parts}
    cache_dir = run_dir.parent / "cache"
    for part, items in parts.items():
        data[f"x_{part}"] = cache_images(
            items, cfg.model.hw, resize_mode(cfg), cache_dir, desc=f"{cfg.name}-{part}"
        )
        data[f"y_{part}"] = np.array([index[s.label] for s in items], dtype=np.int32)
    return data


def _strategy():
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def _callbacks(
    cfg: Config, run_dir: Path, val, group_idx: list[int], phase: str, averaged: bool = False
):
    """The phase's callbacks; with ``averaged`` (an optimizer keeping a moving average of the
    weights) everything from the validation score on sees the averaged weights."""
    import keras

    class ValAuc(keras.callbacks.Callback):
        """Validation decision-group ROC AUC (val_group_auc), balanced accuracy
        (val_balanced_accuracy) and val_score, the mean of the AUC, the accuracy and the
        balanced accuracy: early stopping on the AUC alone can keep an epoch whose class
        predictions are clearly worse (seen on HAM10000: AUC +0.007, accuracy −0.06), and on
        accuracy alone one that gives up the rare classes."""

        def on_epoch_end(self, epoch, logs=None):
            probs = self.model.predict(val[0], verbose=0, batch_size=64)
            m = headline(val[1], probs, group_idx)
            acc, bal = m["accuracy"], m["balanced_accuracy"]
            logs = logs if logs is not None else {}
            logs["val_group_auc"] = m["group_auc"]
            logs["val_balanced_accuracy"] = bal
            logs["val_score"] = selection_score(m)
            log.info(
                "%s epoch %d: val_group_auc %.4f, accuracy %.4f, balanced accuracy %.4f",
                phase,
                epoch + 1,
                logs["val_group_auc"],
                acc,
                bal,
            )

    from .resume import averaged_weights, best_and_backup

    # The int8 simulation's wrappers are not serialisable as a model: weights only.
    keep, backup = best_and_backup(run_dir, phase, "val_score", cfg.train.patience, phase == "qat")
    history = keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True)
    # The history row before the backup: a restart repeats a row rather than losing one.
    first = [averaged_weights(run_dir, phase)] if averaged else []
    return [*first, ValAuc(), *keep, history, backup]


def _compile(
    model, lr: float, steps: int = 0, warmup: int = 0, soft: bool = False, ema: float = 0.0
) -> None:
    """Adam and cross-entropy (on class indices, or on probability rows with ``soft``), with a
    cosine decay over ``steps`` when given (after ``warmup`` steps rising linearly from 0), and
    with ``ema`` > 0 a moving average of the weights at that momentum."""
    import keras

    if steps and warmup:
        lr = keras.optimizers.schedules.CosineDecay(
            0.0, max(steps - warmup, 1), warmup_target=lr, warmup_steps=warmup
        )
    elif steps:
        lr = keras.optimizers.schedules.CosineDecay(lr, steps)
    model.compile(
        optimizer=keras.optimizers.Adam(lr, use_ema=ema > 0, ema_momentum=ema or 0.99),
        loss=keras.losses.CategoricalCrossentropy()
        if soft
        else keras.losses.SparseCategoricalCrossentropy(),
        metrics=["categorical_accuracy" if soft else "accuracy"],
    )


def _finetune_cached(cfg: Config, run_dir: Path, top, head, acts, data, weights, group_idx, full):
    """Phase 2 on cached activations: the top blocks and the head, BatchNorm frozen; then, if
    configured, quantisation-aware epochs. ``full`` is the image model sharing these layers."""
    import keras

    log.info("training on %d cached copies of the activations", len(acts["train"]))
    ds = copies_dataset(
        acts["train"],
        data["y_train"],
        weights,
        cfg.train.batch_size,
        cfg.train.run_seed(cfg.dataset.seed),
    )
    val = (acts["val"], data["y_val"])

    def fit(model, lr: float, epochs: int, phase: str) -> None:
        _compile(model, lr, epochs * len(ds))
        model.fit(
            ds,
            epochs=epochs,
            validation_data=val,
            callbacks=_callbacks(cfg, run_dir, val, group_idx, phase),
            verbose=2,
        )

    model = keras.Model(top.input, head(top.output), name="top_and_head")
    fit(model, cfg.train.finetune_lr, cfg.train.finetune_epochs, "finetune")
    if cfg.train.qat_epochs:
        from .qat import simulate_int8

        # Kept so the int8 loss with and without the simulation can be compared.
        full.save(run_dir / "model-before-qat.keras")
        log.info("quantisation-aware fine-tuning, %d epochs", cfg.train.qat_epochs)
        fit(simulate_int8(model), cfg.train.qat_lr, cfg.train.qat_epochs, "qat")


def _finetune_images(cfg: Config, run_dir: Path, model, data, weights, group_idx) -> None:
    """Phase 2 on images: the unfrozen layers end to end, with augmentation, drawing classes
    as ``train.sampling`` says (then without loss weights) or as they come (with them)."""
    bs = cfg.train.batch_size
    labels = cfg.dataset.labels
    n = len(labels)
    steps_per_epoch = int(np.ceil(len(data["y_train"]) / bs))
    y_train, y_val = data["y_train"], data["y_val"]
    soft = bool(cfg.train.soft_labels)
    if soft:
        from .teacher import soft_targets

        y_train = soft_targets(
            cfg.train.soft_labels_path, data["parts"]["train"], labels, cfg.train.soft_weight
        )
        y_val = np.eye(n, dtype=np.float32)[data["y_val"]]
        log.info(
            "phase 2 learns from %.0f %% teacher (%s)",
            100 * cfg.train.soft_weight,
            cfg.train.soft_labels_path,
        )
    if cfg.train.sampling != "none":
        train_ds = sampled_dataset(
            data["x_train"],
            data["y_train"],
            n,
            cfg.train.sampling,
            bs,
            cfg.train.run_seed(cfg.dataset.seed),
            targets=y_train if soft else None,
            rotate=cfg.train.rotate,
        )
        fit_kw = {"steps_per_epoch": steps_per_epoch}
        log.info("phase 2 draws classes %s", cfg.train.sampling)
    else:
        train_ds = make_dataset(
            data["x_train"],
            y_train,
            bs,
            train=cfg.train.augment,
            seed=cfg.train.run_seed(cfg.dataset.seed),
            rotate=cfg.train.rotate,
        )
        fit_kw = {"class_weight": weights}
    _compile(
        model,
        cfg.train.finetune_lr,
        cfg.train.finetune_epochs * steps_per_epoch,
        cfg.train.warmup_steps,
        soft=soft,
        ema=cfg.train.ema_momentum,
    )
    val_norm = (np.asarray((data["x_val"].astype(np.float32) - 127.5) / 127.5), data["y_val"])
    model.fit(
        train_ds,
        epochs=cfg.train.finetune_epochs,
        validation_data=make_dataset(data["x_val"], y_val, 64, train=False),
        callbacks=_callbacks(
            cfg, run_dir, val_norm, group_idx, "finetune", averaged=cfg.train.ema_momentum > 0
        ),
        verbose=2,
        **fit_kw,
    )


def _add_int8_activations(cfg: Config, cache_dir: Path, bottom, data, acts) -> None:
    """Extend the cached float copies with copies from the int8 bottom, calibrated on the
    export's own images, and validate on int8 activations: the kit ships the int8 model."""
    from .cached import int8_activations
    from .export import calibration_images, export_int8

    layer = cfg.train.unfreeze_from
    rep = calibration_images(data["x_train"], cfg.export.representative_images, cfg.dataset.seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tflite = export_int8(bottom, rep, cache_dir / "bottom_int8.tflite")
    extra = int8_activations(
        tflite,
        data["x_train"],
        cfg.train.int8_copies,
        cfg.train.augment,
        layer,
        cache_dir,
        "train",
        seed=cfg.dataset.seed,
    )
    acts["train"] = np.concatenate([acts["train"], extra])
    acts["val"] = int8_activations(tflite, data["x_val"], 1, False, layer, cache_dir, "val")[
        0
    ].astype(np.float32)


def train(cfg: Config, run_dir: Path) -> Path:
    """Train and save ``run_dir/model.keras``; returns its path."""
    import keras
    import tensorflow as tf

    from .imported import ELSEWHERE
    from .model import build_backbone, build_head, unfreeze_from
    from .resume import check_resumable

    run_dir.mkdir(parents=True, exist_ok=True)
    # A model trained here is not one imported from elsewhere.
    (run_dir / ELSEWHERE).unlink(missing_ok=True)
    # As config.json stores it (paths as text, tuples as lists), to compare with the stored one.
    settings = json.loads(json.dumps(asdict(cfg), default=str))
    check_resumable(run_dir, settings)
    (run_dir / "config.json").write_text(json.dumps(settings, indent=2))
    keras.utils.set_random_seed(cfg.train.run_seed(cfg.dataset.seed))
    t0 = time.time()
    data = prepare_data(cfg, run_dir)
    labels = cfg.dataset.labels
    group_idx = [labels.index(m) for m in cfg.decision.groups[cfg.decision.group]]
    weights = class_weights(data["parts"]["train"], labels, cfg.train.class_weight)
    n = len(labels)
    bs = cfg.train.batch_size
    h, w = cfg.model.hw

    with _strategy().scope():
        backbone = build_backbone(cfg.model.backbone, (h, w), cfg.model.weights)
        backbone.trainable = False
        head = build_head(backbone.output_shape[1:], n, cfg.model.dropout, cfg.model.dense)

    copies = cfg.train.cached_copies if cfg.train.finetune_epochs > 0 else 0
    if copies:
        bottom, top = split_at(backbone, cfg.train.unfreeze_from)
        cache_dir = run_dir / "activations"
        acts = {
            "train": activations(
                bottom,
                data["x_train"],
                copies,
                cfg.train.augment,
                cfg.train.unfreeze_from,
                cache_dir,
                "train",
                seed=cfg.dataset.seed,
            ),
        }
        if cfg.train.int8_copies:  # also sets the validation activations, from the int8 bottom
            _add_int8_activations(cfg, cache_dir, bottom, data, acts)
        else:
            acts["val"] = activations(
                bottom, data["x_val"], 1, False, cfg.train.unfreeze_from, cache_dir, "val"
            )[0].astype(np.float32)
        log.info("activations cached in %.0f s", time.time() - t0)

    # Phase 1: head on cached features of the frozen backbone.
    feats = {}
    for part in ("train", "val"):
        if copies:  # validation activations are already float32
            src = acts["train"][0].astype(np.float32) if part == "train" else acts["val"]
            feats[part] = top.predict(src, batch_size=64, verbose=2)
        else:
            feats[part] = backbone.predict(
                make_dataset(data[f"x_{part}"], None, 64, train=False), verbose=2
            )
    _compile(head, cfg.train.head_lr)
    head.fit(
        feats["train"],
        data["y_train"],
        batch_size=bs,
        epochs=cfg.train.head_epochs,
        class_weight=weights,
        validation_data=(feats["val"], data["y_val"]),
        verbose=2,
    )
    log.info("phase 1 done in %.0f s", time.time() - t0)

    # Phase 2: the top blocks, end to end, with augmentation.
    inputs = keras.Input((h, w, 3), name="image")
    outputs = head(backbone(inputs, training=False))
    model = keras.Model(inputs, outputs, name=cfg.name.replace("-", "_"))
    if cfg.train.finetune_epochs > 0:
        if cfg.model.backbone == "small_cnn" and not copies:
            backbone.trainable = True
        else:
            count = unfreeze_from(backbone, cfg.train.unfreeze_from)
            log.info("fine-tuning %d backbone layers from %s", count, cfg.train.unfreeze_from)
    if copies:
        _finetune_cached(cfg, run_dir, top, head, acts, data, weights, group_idx, model)
    elif cfg.train.finetune_epochs > 0:
        _finetune_images(cfg, run_dir, model, data, weights, group_idx)
    out = run_dir / "model.keras"
    model.save(out)
    minutes = (time.time() - t0) / 60
    (run_dir / "train_time.json").write_text(json.dumps({"minutes": round(minutes, 1)}))
    log.info("training done in %.1f min → %s", minutes, out)
    del tf
    return out
