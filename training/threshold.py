"""The referral threshold and the validation scores it was chosen on, kept in the bundle.

A bundle ships ``threshold_scores.csv``: for every validation image, its lesion, whether it is
in the decision group, and the group score one view and (with test-time views) every view gave,
through the edge classifier. The manifest's ``decision.chosen_on`` names the file with its
digest and gives the sensitivity and specificity the shipped thresholds reach on those images.
Anyone can then recompute the thresholds from the file alone (``python -m training threshold``)
and find the shipped values, without the dataset or the model.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .metrics import threshold_for_sensitivity, threshold_with_bound

SCORES_FILE = "threshold_scores.csv"


@dataclass(frozen=True)
class Scores:
    """The decision group's score per validation image (``tta``: averaged over the views)."""

    image: list[str]
    lesion: np.ndarray
    positive: np.ndarray
    score: np.ndarray
    tta: np.ndarray | None = None


def shipped(threshold: float) -> float:
    """The threshold as the manifest keeps it: four decimals, rounded down. Rounded to the
    nearest it could pass above the very scores it was chosen at (an int8 softmax gives scores
    in steps of 1/256, such as 0.7421875) and stop flagging them."""
    return math.floor(float(threshold) * 1e4) / 1e4


def choose(positive: np.ndarray, score: np.ndarray, lesion: np.ndarray, target: float,
           method: str, confidence: float) -> float:
    """The threshold for ``target`` sensitivity: on these images as they are (``validation``)
    or at the ``confidence`` lower bound over lesion-level resamples (``lesion_bound``)."""
    if method == "lesion_bound":
        return threshold_with_bound(positive, score, lesion, target, confidence)[0]
    return threshold_for_sensitivity(positive, score, target)


def rates(positive: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity and specificity of ``score >= threshold`` on these images."""
    flagged = score >= threshold
    return {
        "sensitivity": float(flagged[positive].mean()) if positive.any() else float("nan"),
        "specificity": float((~flagged[~positive]).mean()) if (~positive).any() else float("nan"),
    }


def write_scores(path: Path, scores: Scores) -> str:
    """Write the file; returns its SHA-256 (the manifest records it)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "lesion", "positive", "score"] + (["score_tta"] if
                                                                scores.tta is not None else []))
        for i, name in enumerate(scores.image):
            row = [name, str(scores.lesion[i]), int(scores.positive[i]), repr(float(
                scores.score[i]))]
            if scores.tta is not None:
                row.append(repr(float(scores.tta[i])))
            w.writerow(row)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_scores(path: Path) -> Scores:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path}: no scores")
    tta = "score_tta" in rows[0]
    return Scores(
        image=[r["image"] for r in rows],
        lesion=np.array([r["lesion"] for r in rows]),
        positive=np.array([r["positive"] == "1" for r in rows]),
        score=np.array([float(r["score"]) for r in rows]),
        tta=np.array([float(r["score_tta"]) for r in rows]) if tta else None,
    )


def chosen_on(scores: Scores, digest: str, threshold: float,
              tta_threshold: float | None) -> dict:
    """The manifest's record: the file and what the shipped thresholds reach on it."""
    out: dict = {"file": SCORES_FILE, "sha256": digest, "n": len(scores.image),
                 **rates(scores.positive, scores.score, threshold)}
    if scores.tta is not None and tta_threshold is not None:
        tta = rates(scores.positive, scores.tta, tta_threshold)
        out.update(tta_sensitivity=tta["sensitivity"], tta_specificity=tta["specificity"])
    return out


def recompute(bundle_dir: Path, decision: dict) -> dict:
    """The thresholds again from the bundle's stored scores, by the manifest's own method,
    and what they reach there; raises ValueError when the file is missing or altered."""
    record = decision.get("chosen_on")
    if not record:
        raise ValueError(f"{bundle_dir}: the manifest does not say what the threshold was "
                         "chosen on (a bundle built before the scores were kept)")
    path = bundle_dir / record["file"]
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    if hashlib.sha256(path.read_bytes()).hexdigest() != record["sha256"]:
        raise ValueError(f"{path}: its digest differs from the manifest's")
    scores = read_scores(path)
    how = (decision.get("target_sensitivity", 0.9), decision.get("threshold_method",
                                                                 "validation"),
           decision.get("threshold_confidence", 0.95))
    out: dict = {"threshold": choose(scores.positive, scores.score, scores.lesion, *how)}
    out.update(rates(scores.positive, scores.score, out["threshold"]))
    if scores.tta is not None:
        out["tta_threshold"] = choose(scores.positive, scores.tta, scores.lesion, *how)
        tta = rates(scores.positive, scores.tta, out["tta_threshold"])
        out.update(tta_sensitivity=tta["sensitivity"], tta_specificity=tta["specificity"])
    return out
