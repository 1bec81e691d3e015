"""A member trained elsewhere (``training/gpu_members.py``, PyTorch on a GPU) made into a run
that ``python -m training train --skip-training`` builds like any other: the Keras model with
the trained weights, the split, the history and where and how long it trained.

The weights map tensor by tensor (:func:`training.efficientnet_lite.load_weights`, the same
mapping the ImageNet transplant uses), so nothing of PyTorch is needed here.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .config import Config, ConfigError

REPORT = "report.json"
ELSEWHERE = "trained_elsewhere.json"


def load_halves(prefix: Path) -> dict[str, np.ndarray]:
    """The state dict that ``gpu_members.save_halves`` wrote as ``PREFIX.a.npz`` and
    ``PREFIX.b.npz``."""
    state: dict[str, np.ndarray] = {}
    for part in ("a", "b"):
        path = prefix.parent / f"{prefix.name}.{part}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: a member's weights come as two files, .a and .b")
        with np.load(path) as data:
            state.update({k: data[k] for k in data.files})
    return state


def member_info(prefix: Path) -> tuple[dict, dict]:
    """The training report beside the member's files, and the member's own entry in it."""
    path = prefix.parent / REPORT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the report gpu_members.py writes beside the weights")
    report = json.loads(path.read_text())
    if prefix.name not in report.get("members", {}):
        known = ", ".join(report.get("members", {})) or "none"
        raise ValueError(f"{path} has no member {prefix.name!r} (it has: {known})")
    return report, report["members"][prefix.name]


def check_config(cfg: Config, info: dict) -> None:
    """The config must describe the model the member is: its backbone, input and head."""
    h, w = info["input_size"]
    if not cfg.model.backbone.startswith("efficientnet_lite"):
        raise ConfigError(f"model.backbone is {cfg.model.backbone!r}; members trained by "
                          "gpu_members.py are EfficientNet-Lite")
    if tuple(cfg.model.hw) != (h, w):
        raise ConfigError(f"the member was trained at {h}x{w} but model.input_size is "
                          f"{list(cfg.model.hw)}: --set 'model.input_size=[{h}, {w}]'")
    if cfg.model.dense:
        raise ConfigError("the member has no hidden dense layer but model.dense is "
                          f"{cfg.model.dense}: --set model.dense=0")


def keras_model(cfg: Config, state: dict[str, np.ndarray]):
    """The config's image model (backbone, then the head as training builds it) carrying
    ``state``; every tensor of the state is used, or the mapping raises."""
    import keras

    from .efficientnet_lite import load_weights
    from .model import build_backbone, build_head

    backbone = build_backbone(cfg.model.backbone, cfg.model.hw, "none")
    n = load_weights(backbone, state)
    head = build_head(backbone.output_shape[1:], len(cfg.dataset.labels), cfg.model.dropout, 0)
    head.get_layer("probs").set_weights([state["_fc.weight"].T, state["_fc.bias"]])
    if n + 2 != len(state):
        raise ValueError(f"{len(state) - n - 2} tensors of the member fit no layer")
    inputs = keras.Input((*cfg.model.hw, 3), name="image")
    return keras.Model(inputs, head(backbone(inputs, training=False)),
                       name=cfg.name.replace("-", "_"))


def import_member(cfg: Config, prefix: Path, run_dir: Path) -> Path:
    """Write ``run_dir`` (model.keras, split.csv, config.json, history.csv, train_time.json
    and trained_elsewhere.json) for the member at ``prefix``; returns the model's path."""
    from .datasets import config_split, write_split

    report, info = member_info(prefix)
    check_config(cfg, info)
    model = keras_model(cfg, load_halves(prefix))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_split(config_split(cfg.dataset), run_dir / "split.csv")
    settings = json.loads(json.dumps(asdict(cfg), default=str))
    (run_dir / "config.json").write_text(json.dumps(settings, indent=2))
    with open(run_dir / "history.csv", "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["epoch", "loss", "val_accuracy", "val_balanced_accuracy",
                      "val_group_auc", "val_score"])
        for m in info["history"]:
            out.writerow([m["epoch"] - 1, m["loss"], m["accuracy"], m["balanced_accuracy"],
                          m["group_auc"], m["score"]])
    (run_dir / "train_time.json").write_text(json.dumps({"minutes": info["minutes"]}))
    args = report.get("args", {})
    elsewhere = {
        "member": prefix.name,
        "device": report.get("device"),
        "torch": report.get("torch"),
        "input_size": info["input_size"],
        "seed": info["seed"],
        "epochs": info["epochs"],
        "best_epoch": info["best_epoch"],
        "minutes": info["minutes"],
        "validation": {k: info["best"][k] for k in ("accuracy", "balanced_accuracy",
                                                     "group_auc", "score")},
        "recipe": {k: args.get(k) for k in ("batch", "lr", "wd", "dropout", "drop_connect",
                                            "power", "soft", "soft_weight", "max_epochs",
                                            "budget_s", "deadline_s")},
        "planned_epochs": info.get("planned_epochs", info["epochs"]),
    }
    (run_dir / ELSEWHERE).write_text(json.dumps(elsewhere, indent=1))
    path = run_dir / "model.keras"
    model.save(path)
    return path
