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
# The out-of-fold scores an operating point was carried over from (see carry_over).
OOF_FILE = "threshold_oof_scores.csv"
BOOTSTRAP = {"n_boot": 2000, "seed": 0}  # lesion_bound's resamples (kept in chosen_on)


@dataclass(frozen=True)
class Scores:
    """The decision group's score per validation image (``tta``: averaged over the views)."""

    image: list[str]
    lesion: np.ndarray
    positive: np.ndarray
    score: np.ndarray
    tta: np.ndarray | None = None


def shipped(threshold: float) -> float:
    """The threshold as the manifest keeps it: four decimals, never above the threshold itself.
    Rounded to the nearest it could pass above the very scores it was chosen at (an int8
    softmax gives scores in steps of 1/256, such as 0.7421875 -> 0.7422) and stop flagging them."""
    t = float(threshold)
    kept = round(t, 4)
    return kept if kept <= t else round(kept - 1e-4, 4)


def shipped_up(threshold: float) -> float:
    """A threshold placed at a specificity, as the manifest keeps it: four decimals, never below
    the threshold itself (rounded down it would flag again the negatives it was placed above)."""
    t = float(threshold)
    kept = round(t, 4)
    return kept if kept >= t else round(kept + 1e-4, 4)


def choose(positive: np.ndarray, score: np.ndarray, lesion: np.ndarray, target: float,
           method: str, confidence: float) -> float:
    """The threshold for ``target`` sensitivity: on these images as they are (``validation``)
    or at the ``confidence`` lower bound over lesion-level resamples (``lesion_bound``, with
    BOOTSTRAP's resamples and seed, which the manifest records)."""
    if method == "lesion_bound":
        return threshold_with_bound(positive, score, lesion, target, confidence,
                                    **BOOTSTRAP)[0]
    return threshold_for_sensitivity(positive, score, target)


def choose_both(scores: Scores, target: float, method: str,
                confidence: float) -> dict[str, float]:
    """Both thresholds chosen on ``scores`` themselves: ``threshold`` on one view,
    ``tta_threshold`` on the views' mean where the scores have it."""
    out = {"threshold": choose(scores.positive, scores.score, scores.lesion, target, method,
                               confidence)}
    if scores.tta is not None:
        out["tta_threshold"] = choose(scores.positive, scores.tta, scores.lesion, target,
                                      method, confidence)
    return out


def at_specificity(positive: np.ndarray, score: np.ndarray, specificity: float) -> float:
    """The lowest threshold at which at least ``specificity`` of the negatives score below it
    (``score >= threshold`` flags), ties included."""
    neg = np.sort(np.asarray(score, dtype=np.float64)[~positive])
    if not len(neg):
        raise ValueError("no negative image to place a specificity on")
    k = min(len(neg), math.ceil(specificity * len(neg) - 1e-12))
    if k == 0:
        return float(neg[0])  # nothing need score below it
    return float(np.nextafter(neg[k - 1], np.inf))


def carry_over(oof: Scores, own: Scores, target: float, method: str,
               confidence: float) -> tuple[dict[str, float], dict[str, dict]]:
    """Thresholds on ``own`` (the shipped models' validation scores) at the operating point
    chosen on ``oof``: the threshold for ``target`` there (by ``method``), the specificity it
    has there, and on ``own`` the lowest threshold with that specificity. For fold models whose
    scores are more extreme than the shipped models' (another recipe): a score does not carry
    over, a specificity can, if the shipped models rank at least as well. Returns the
    thresholds (kept with :func:`shipped_up`, so the specificity stays) and, per threshold,
    what was carried."""
    thresholds, carried = {}, {}
    for key, col in (("threshold", "score"), ("tta_threshold", "tta")):
        theirs, mine = getattr(oof, col), getattr(own, col)
        if theirs is None or mine is None:
            continue
        if oof.positive.all() or not oof.positive.any():
            raise ValueError("out-of-fold scores need images in and out of the decision group "
                             "to carry a specificity over")
        t = choose(oof.positive, theirs, oof.lesion, target, method, confidence)
        q = rates(oof.positive, theirs, t)["specificity"]
        thresholds[key] = at_specificity(own.positive, mine, q)
        carried[key] = {"out_of_fold_threshold": t, "specificity": q}
    return thresholds, carried


def rates(positive: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """Sensitivity and specificity of ``score >= threshold`` on these images (in float64, as
    the edge compares); a rate with no image to count is left out, not NaN."""
    flagged = np.asarray(score, dtype=np.float64) >= float(threshold)
    out = {}
    if positive.any():
        out["sensitivity"] = float(flagged[positive].mean())
    if (~positive).any():
        out["specificity"] = float((~flagged[~positive]).mean())
    return out


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


def chosen_on(scores: Scores, digest: str, decision: dict) -> dict:
    """The manifest's record: the file, how the thresholds were chosen from it, and what the
    shipped thresholds reach there."""
    out: dict = {"file": SCORES_FILE, "sha256": digest, "n": len(scores.image),
                 **rates(scores.positive, scores.score, decision["threshold"])}
    if decision.get("threshold_method") == "lesion_bound":
        out["bootstrap"] = dict(BOOTSTRAP)
    if scores.tta is not None and "tta_threshold" in decision:
        out.update({f"tta_{k}": v for k, v in
                    rates(scores.positive, scores.tta, decision["tta_threshold"]).items()})
    return out


def recompute(bundle_dir: Path, decision: dict) -> dict:
    """The thresholds again from the bundle's stored scores, by the manifest's own method,
    and what they reach there; raises ValueError when the file is missing or altered, or the
    manifest does not say how they were chosen."""
    record = decision.get("chosen_on")
    if not record:
        raise ValueError(f"{bundle_dir}: the manifest does not say what the threshold was "
                         "chosen on (a bundle built before the scores were kept)")
    if "target_sensitivity" not in decision:
        raise ValueError(f"{bundle_dir}: the manifest's decision has no target_sensitivity")
    path = bundle_dir / SCORES_FILE
    if record.get("file") != SCORES_FILE or not path.is_file():
        raise ValueError(f"{path}: missing")
    if hashlib.sha256(path.read_bytes()).hexdigest() != record["sha256"]:
        raise ValueError(f"{path}: its digest differs from the manifest's")
    scores = read_scores(path)
    method = decision.get("threshold_method", "validation")
    if method == "lesion_bound" and record.get("bootstrap") != BOOTSTRAP:
        raise ValueError(f"{bundle_dir}: chosen with resamples {record.get('bootstrap')}, this "
                         f"version recomputes with {BOOTSTRAP}")
    how = (decision["target_sensitivity"], method, decision.get("threshold_confidence", 0.95))
    if "carried_from" in record:  # an operating point carried over from out-of-fold scores
        source = bundle_dir / record["carried_from"]["file"]
        if not source.is_file() or hashlib.sha256(source.read_bytes()).hexdigest() != record[
                "carried_from"]["sha256"]:
            raise ValueError(f"{source}: missing, or its digest differs from the manifest's")
        thresholds, _ = carry_over(read_scores(source), scores, *how)
        out: dict = {**thresholds, "rounded": "up"}
        keep = shipped_up
    else:
        out = choose_both(scores, *how)
        keep = shipped
    # The rates are those of the thresholds as a manifest keeps them (see shipped).
    out.update(rates(scores.positive, scores.score, keep(out["threshold"])))
    if "tta_threshold" in out and scores.tta is not None:
        out.update({f"tta_{k}": v for k, v in
                    rates(scores.positive, scores.tta, keep(out["tta_threshold"])).items()})
    return out


def compare(got: dict, decision: dict) -> list[tuple[str, float | None, float | None, bool]]:
    """(threshold key, recomputed, shipped, the same) for every threshold either side has: a
    shipped threshold the file cannot recompute, or the reverse, is not the same."""
    rows = []
    keep = shipped_up if got.get("rounded") == "up" else shipped
    for key in ("threshold", "tta_threshold"):
        if key in got or key in decision:
            mine = keep(got[key]) if key in got else None
            rows.append((key, mine, decision.get(key), mine is not None
                         and mine == decision.get(key)))
    return rows
