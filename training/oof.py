"""Referral scores from out-of-fold predictions (``gpu_members.py --folds``), for choosing a
threshold on images that chose nothing else.

A threshold chosen on the validation split that also picked each member's epoch, its logit
adjustment and the ensemble itself inherits their optimism: it referred fewer malignant test
lesions than it promised. Fold models trained on lesion-grouped folds of train + validation
give each image a prediction from a model that never saw it; this module turns those logits
into the scores the shipped bundle would give (each member's own logit offsets, the softmax,
the decision group's sum, the mean over members and views) in the format of
``threshold_scores.csv``, so that ``python -m training ensemble --oof-scores`` chooses on
them and ``python -m training threshold`` recomputes from them.

The fold models are the members' recipe trained again on K − 1 of K folds of train +
validation, not the shipped models: their float scores (trained in bf16 on a GPU or a CPU, the
PyTorch script's own resize) stand in for the int8 ensemble's. The ensemble build therefore
also reports what the chosen thresholds reach on the kit's own validation scores.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from edge.inference.bundle import Bundle
from edge.inference.postprocess import softmax

from .evaluate import group_indices
from .threshold import Scores, read_scores, write_scores


def oof_scores(models: list[tuple[Bundle, Path]]) -> Scores:
    """Scores from ``(bundle, oof file)`` pairs, one per model of the ensemble in its order
    (the first is the live stream's), each bundle the one the member came from (its logit
    offsets are the member's): ``score`` is the first model on the identity view, ``tta`` the
    mean over every model and the first bundle's views. Each file must hold the same images,
    the bundle's labels and the input size its bundle takes."""
    first = models[0][0]
    group = group_indices(first)
    views = list(first.tta or ["identity"])
    ref = None
    per_model = []
    for bundle, path in models:
        with np.load(path) as d:
            data = {k: d[k] for k in d.files}
        if "labels" not in data or "image_id" not in data:
            raise ValueError(f"{path}: not a whole out-of-fold file (one fold's file, "
                             "oof-NAME.foldFofK.npz, holds only its part; give oof-NAME.npz, "
                             "written once every fold is done)")
        if list(data["labels"]) != list(bundle.labels):
            raise ValueError(f"{path}: labels {list(data['labels'])} are not {bundle.labels}")
        size = [int(v) for v in data["input_size"]]
        if size != list(bundle.input_spec["size"]):
            raise ValueError(f"{path}: predictions at {size}, but the "
                             f"bundle takes {list(bundle.input_spec['size'])}")
        if ref is None:
            ref = data
        elif list(data["image_id"]) != list(ref["image_id"]):
            raise ValueError(f"{path}: not the same images, in the same order, as "
                             f"{models[0][1]}")
        else:
            _same_folds(path, data, models[0][1], ref)
        have = [str(v) for v in data["views"]]
        missing = [v for v in views if v not in have]
        if missing:
            raise ValueError(f"{path}: no logits for the views {missing}")
        z = data["logits"][:, [have.index(v) for v in views]].astype(np.float64)
        if bundle.class_bias is not None:
            z = z + bundle.class_bias
        p = np.apply_along_axis(softmax, -1, z)  # the kit's own, row by row
        per_model.append(p[..., group].sum(-1))  # (N, views)
    assert ref is not None
    return Scores(image=[str(i) for i in ref["image_id"]], lesion=ref["lesion"].astype(str),
                  positive=np.isin(ref["y"], group),
                  score=per_model[0][:, views.index("identity")],
                  tta=np.mean([g.mean(1) for g in per_model], axis=0))


# What of a fold recipe (gpu_members.fold_recipe) is each model's own; all else must agree.
OWN_RECIPE = ("input_size", "seed")


def _same_folds(path: Path, data: dict, ref_path: Path, ref: dict) -> None:
    """Two models' out-of-fold files pair only if each image had the same label, lesion and
    fold in both (the same fold models' split) and, where the files record it (runs since
    the recipe was written into the whole file), the same recipe."""
    for key in ("y", "lesion", "fold"):
        if not np.array_equal(data[key], ref[key]):
            raise ValueError(f"{path}: its {key!r} differs from {ref_path}'s (other folds or "
                             "another split: made by another run)")
    if "recipe" in data and "recipe" in ref:
        mine, theirs = json.loads(str(data["recipe"])), json.loads(str(ref["recipe"]))
        differ = [k for k in sorted(mine.keys() | theirs.keys())
                  if k not in OWN_RECIPE and mine.get(k) != theirs.get(k)]
        if differ:
            raise ValueError(f"{path}: made with other {', '.join(differ)} than {ref_path}")


def _model_ids(bundles: list[Bundle]) -> list[dict]:
    """What identifies each model: its bundle's name and version and its int8 file's digest."""
    out = []
    for b in bundles:
        out.append({"bundle": f"{b.name} {b.version}",
                    "sha256": b.manifest["artifacts"]["int8"]["sha256"]})
    return out


def write_oof_scores(path: Path, scores: Scores, models: list[tuple[Bundle, Path]]) -> str:
    """The scores file, and beside it ``PATH.json``: the models and OOF files it came from, so
    that an ensemble build can check it was made for the models it is given."""
    digest = write_scores(path, scores)
    record = {"models": _model_ids([b for b, _ in models]),
              "oof_files": [{"file": f.name,
                             "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
                            for _, f in models],
              "scores_sha256": digest}
    path.with_name(path.name + ".json").write_text(json.dumps(record, indent=1))
    return digest


def read_for(path: Path, first: Bundle, members: list[Bundle], test_ids: set[str]) -> Scores:
    """The scores at ``path``, refused unless its record says they were made for exactly these
    models in this order, the file is the one recorded, and no test image is among them."""
    side = path.with_name(path.name + ".json")
    if not side.is_file():
        raise ValueError(f"{side}: missing (python -m training oof-scores writes it beside "
                         "the scores)")
    record = json.loads(side.read_text())
    if hashlib.sha256(path.read_bytes()).hexdigest() != record.get("scores_sha256"):
        raise ValueError(f"{path}: its digest differs from {side.name}'s")
    want = _model_ids([first, *members])
    if record.get("models") != want:
        raise ValueError(f"{path} was made for {[m['bundle'] for m in record.get('models', [])]}"
                         f", not for this ensemble's {[m['bundle'] for m in want]} (same "
                         "models, same order, same int8 files)")
    scores = read_scores(path)
    if scores.tta is None:
        raise ValueError(f"{path}: no score_tta column (make it with oof-scores)")
    leaked = sorted(set(scores.image) & test_ids)
    if leaked:
        raise ValueError(f"{path} scores {len(leaked)} test images (e.g. {leaked[0]}): a "
                         "threshold is never chosen on the test split")
    return scores
