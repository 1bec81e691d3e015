"""Compare backbones cheaply on the same split: a linear head on each frozen backbone's pooled
features (the same images, input size and class weights). It ranks what each backbone's
ImageNet features already hold for a task; it is not what fine-tuning reaches.

    python -m training probe --config training/configs/skin-lesion.toml \\
        --backbones mobilenetv2,mobilenet_edgetpu [--run-dir runs/skin-lesion]
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from .config import Config
from .datasets import class_weights
from .metrics import headline

log = logging.getLogger(__name__)


def _features(backbone, images: np.ndarray) -> np.ndarray:
    from .input_pipeline import make_dataset

    feats = backbone.predict(make_dataset(images, None, 64, train=False), verbose=0)
    return feats.mean(axis=(1, 2))


def probe(cfg: Config, run_dir: Path, backbones: list[str], epochs: int = 60) -> list[dict]:
    import keras

    from .model import build_backbone
    from .train import prepare_data

    data = prepare_data(cfg, run_dir)
    labels = cfg.dataset.labels
    group = [labels.index(m) for m in cfg.decision.groups[cfg.decision.group]]
    weights = class_weights(data["parts"]["train"], labels, cfg.train.class_weight)
    rows = []
    for name in backbones:
        t0 = time.time()
        keras.utils.set_random_seed(cfg.dataset.seed)
        backbone = build_backbone(name, cfg.model.hw, cfg.model.weights)
        feats = {p: _features(backbone, data[f"x_{p}"]) for p in ("train", "val", "test")}
        head = keras.Sequential([keras.Input(feats["train"].shape[1:]),
                                 keras.layers.Dense(len(labels), activation="softmax")])
        head.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
        head.fit(feats["train"], data["y_train"], epochs=epochs, batch_size=64,
                 class_weight=weights, verbose=0,
                 validation_data=(feats["val"], data["y_val"]),
                 callbacks=[keras.callbacks.EarlyStopping(patience=8, restore_best_weights=True)])
        row = {"backbone": name, "params_m": round(backbone.count_params() / 1e6, 2),
               "minutes": round((time.time() - t0) / 60, 1)}
        for part in ("val", "test"):
            m = headline(data[f"y_{part}"], head.predict(feats[part], verbose=0), group)
            row[part] = {k: round(v, 4) for k, v in m.items()}
        log.info("probe %s: %s", name, row)
        rows.append(row)
    out = run_dir / "probe.json"
    out.write_text(json.dumps(rows, indent=1))
    return rows
