"""Classification metrics in plain numpy, so evaluation needs no TensorFlow or scikit-learn."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U with tied ranks averaged)."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), thresholds descending."""
    y = np.asarray(y_true).astype(bool)
    thresholds = np.unique(np.asarray(score))[::-1]
    tpr = np.array([(score[y] >= t).mean() for t in thresholds])
    fpr = np.array([(score[~y] >= t).mean() for t in thresholds])
    return np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[np.inf, thresholds]


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return m


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true``."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean([(y_pred[y_true == c] == c).mean() for c in np.unique(y_true)]))


def headline(y_true: np.ndarray, probs: np.ndarray, group_idx: list[int]) -> dict[str, float]:
    """Accuracy, balanced accuracy and the decision group's ROC AUC: what early stopping, the
    backbone probe and the logit-adjustment tuning compare."""
    y_true = np.asarray(y_true)
    pred = probs.argmax(axis=1)
    return {
        "accuracy": float((pred == y_true).mean()),
        "balanced_accuracy": balanced_accuracy(y_true, pred),
        "group_auc": roc_auc(np.isin(y_true, group_idx), probs[:, group_idx].sum(axis=1)),
    }


def selection_score(m: dict[str, float]) -> float:
    """What chooses an epoch and a model to ship: the mean of accuracy, balanced accuracy and
    the decision group's AUC (from :func:`headline`)."""
    return (m["accuracy"] + m["balanced_accuracy"] + m["group_auc"]) / 3


def threshold_for_sensitivity(y_true: np.ndarray, score: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity reaches ``target`` (most specific such rule)."""
    y = np.asarray(y_true).astype(bool)
    pos = np.sort(np.asarray(score)[y])[::-1]
    if len(pos) == 0:
        return 0.5
    k = int(np.ceil(target * len(pos)))  # positives that must score at or above the threshold
    return float(pos[max(k, 1) - 1])


def lesion_resamples(groups: np.ndarray, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Indices of ``n_boot`` bootstrap resamples drawn by lesion (``groups``): a lesion's
    images come in or stay out together, so two photos of one lesion count once."""
    names, index = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(index == i) for i in range(len(names))]
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])


def threshold_with_bound(
    y_true: np.ndarray, score: np.ndarray, groups: np.ndarray, target: float,
    confidence: float = 0.95, n_boot: int = 2000, seed: int = 0,
) -> tuple[float, np.ndarray]:
    """A threshold whose sensitivity reaches ``target`` with ``confidence`` on new lesions:
    lesions (``groups``) are resampled with replacement, each resample's own threshold for the
    target is found, and the threshold that reaches it in ``confidence`` of them is kept (a
    lower bound, so a split's luck does not set it). Returns it and the resampled thresholds."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    ts = np.array([threshold_for_sensitivity(y[pick], s[pick], target)
                   for pick in lesion_resamples(groups, n_boot, seed)])
    return float(np.quantile(ts, 1 - confidence)), ts


def sensitivity_interval(
    y_true: np.ndarray, score: np.ndarray, groups: np.ndarray, threshold: float,
    n_boot: int = 2000, seed: int = 1,
) -> tuple[float, float, float]:
    """Sensitivity at ``threshold`` and its 95 % interval by lesion-level bootstrap."""
    y = np.asarray(y_true).astype(bool)
    hit = np.asarray(score) >= threshold
    values = []
    for pick in lesion_resamples(groups, n_boot, seed):
        pos = y[pick]
        if pos.any():
            values.append(hit[pick][pos].mean())
    lo, hi = np.quantile(values, [0.025, 0.975])
    return float(hit[y].mean()), float(lo), float(hi)


def specificity_at_sensitivity(y_true: np.ndarray, score: np.ndarray, target: float) -> float:
    """The best specificity any threshold reaches while keeping sensitivity ≥ ``target``
    (read off this split's own ROC: what the rule could do here, not what the shipped
    threshold does)."""
    y = np.asarray(y_true).astype(bool)
    if not y.any() or y.all():
        return float("nan")
    t = threshold_for_sensitivity(y, score, target)
    return float((np.asarray(score)[~y] < t).mean())


def reliability(
    y_true: np.ndarray, score: np.ndarray, bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Calibration of a probability: per equal-width bin the mean score, the observed rate
    and the count, and the expected calibration error (count-weighted |score − rate|)."""
    y = np.asarray(y_true).astype(float)
    s = np.asarray(score, dtype=np.float64)
    which = np.minimum((s * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(which, weights=s, minlength=bins) / count
        rate = np.bincount(which, weights=y, minlength=bins) / count
    ece = float(np.nansum(count * np.abs(mean - rate)) / max(count.sum(), 1))
    return mean, rate, count.astype(int), ece


def summarise(
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    group_idx: list[int],
    threshold: float,
    target_sensitivity: float = 0.9,
) -> dict:
    """Everything the model card reports, for one artifact on one split."""
    y_true = np.asarray(y_true)
    pred = probs.argmax(axis=1)
    n = len(labels)
    cm = confusion(y_true, pred, n)
    recall = {
        labels[i]: float(cm[i, i] / cm[i].sum()) if cm[i].sum() else float("nan") for i in range(n)
    }
    aucs = [roc_auc(y_true == i, probs[:, i]) for i in range(n) if (y_true == i).any()]
    is_pos = np.isin(y_true, group_idx)
    gscore = probs[:, group_idx].sum(axis=1)
    flagged = gscore >= threshold
    # What the decision does for each diagnosis: the share of its images that are referred
    # (for a melanoma that matters more than whether its top-1 label is "mel").
    referred = {
        labels[i]: float(flagged[y_true == i].mean()) if (y_true == i).any() else float("nan")
        for i in range(n)
    }
    return {
        "referred": referred,
        "n": int(len(y_true)),
        "accuracy": float((pred == y_true).mean()),
        "balanced_accuracy": float(np.nanmean(list(recall.values()))),
        "recall": recall,
        "macro_auc": float(np.nanmean(aucs)),
        "confusion": cm.tolist(),
        "group_auc": roc_auc(is_pos, gscore),
        "threshold": float(threshold),
        "sensitivity": float(flagged[is_pos].mean()) if is_pos.any() else float("nan"),
        "specificity": float((~flagged[~is_pos]).mean()) if (~is_pos).any() else float("nan"),
        "target_sensitivity": float(target_sensitivity),
        "specificity_at_target": specificity_at_sensitivity(is_pos, gscore, target_sensitivity),
        "group_ece": reliability(is_pos, gscore)[3],
    }


def adjust(probs: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Probabilities with ``bias`` added to their logits (what the edge does with class_bias)."""
    logits = np.log(np.clip(probs.astype(np.float64), 1e-12, None)) + bias
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def tune_logit_adjustment(
    probs: np.ndarray, y: np.ndarray, prior: np.ndarray, taus=None
) -> tuple[float, np.ndarray, list[dict]]:
    """Logit adjustment (bias = −τ·log prior): the τ whose adjusted predictions give the best
    mean of accuracy and balanced accuracy on these (validation) data. Returns τ, the bias
    (centred) and the table of what each τ gave."""
    taus = np.round(np.arange(0, 1.01, 0.1), 2) if taus is None else taus
    log_prior = np.log(np.clip(prior, 1e-6, None))
    table = []
    for tau in taus:
        pred = adjust(probs, -tau * log_prior).argmax(axis=1)
        acc = float((pred == y).mean())
        bal = balanced_accuracy(y, pred)
        table.append({"tau": float(tau), "accuracy": acc, "balanced_accuracy": bal,
                      "score": (acc + bal) / 2})
    best = max(table, key=lambda r: (r["score"], -r["tau"]))
    bias = -best["tau"] * log_prior
    return best["tau"], bias - bias.mean(), table


def headline_kind(kinds) -> str:
    """The artifact whose figures lead (what a kit runs on its CPU): int8 when the bundle has
    one, else the first."""
    kinds = list(kinds)
    return "int8" if "int8" in kinds else kinds[0]
