"""Raw model output → probabilities, label groups and the bundle's decision."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def dequantize(raw: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """(q − zero_point) × scale for uint8/int8 outputs; float outputs pass through."""
    values = raw.reshape(-1)
    scale, zero = detail.get("quantization", (0.0, 0))
    if values.dtype.kind in "iu" and scale:
        return (values.astype(np.float32) - zero) * np.float32(scale)
    return values.astype(np.float32)


def looks_like_probabilities(values: np.ndarray) -> bool:
    # Quantised softmax outputs sum to 1 within a few steps of 1/256.
    in_range = values.min() >= -1e-3 and values.max() <= 1.0 + 1e-3
    return bool(in_range and abs(values.sum() - 1) < 0.05)


def softmax(values: np.ndarray) -> np.ndarray:
    shifted = values - values.max()
    e = np.exp(shifted)
    return e / e.sum()


def to_probabilities(
    values: np.ndarray, kind: str = "auto", bias: np.ndarray | None = None
) -> np.ndarray:
    """Apply softmax only when the model emits logits (``kind`` or, if auto, by inspection).
    ``bias`` (the manifest's ``class_bias``, for logits) is added to the logits first."""
    if kind == "logits" or (kind == "auto" and not looks_like_probabilities(values)):
        logits = values.astype(np.float64)
        if bias is not None:
            logits = logits + bias
        return softmax(logits).astype(np.float32)
    probs = np.maximum(values, 0.0)  # the ufunc: np.clip costs several times more per frame
    total = probs.sum()
    return probs / total if total > 0 else probs


def top_k(probs: np.ndarray, labels: list[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probs, kind="stable")[: max(1, k)]
    return [(labels[i], float(probs[i])) for i in order]


def group_scores(probs: np.ndarray, labels: list[str], groups: dict[str, list[str]]) -> dict:
    index = {label: i for i, label in enumerate(labels)}
    return {g: float(sum(probs[index[m]] for m in members)) for g, members in groups.items()}


def decide(
    groups: dict[str, float], rule: dict[str, Any] | None, tta: bool = False
) -> dict[str, Any] | None:
    """The manifest's rule, e.g. malignant 0.83 ≥ 0.30 → refer. ``tta``: the scores are a mean
    over several outputs (test-time views, ensemble members), which are less extreme than one
    output's, so the rule's ``tta_threshold`` (chosen the same way on those means) applies when
    it has one."""
    if not rule:
        return None
    score = groups[rule["group"]]
    key = "tta_threshold" if tta and "tta_threshold" in rule else "threshold"
    threshold = float(rule[key])
    positive = score >= threshold
    outcome = rule.get("positive", "positive") if positive else rule.get("negative", "negative")
    sign = "≥" if positive else "<"
    # Enough decimals to show the threshold to two significant digits: a small threshold
    # (0.0059) printed as 0.01 would make "0.01 < 0.01" possible.
    n = max(2, 1 - math.floor(math.log10(threshold))) if threshold > 0 else 2
    return {
        "group": rule["group"],
        "score": score,
        "threshold": threshold,
        "positive": positive,
        "outcome": outcome,
        "text": f"{rule['group']}: {score:.{n}f} {sign} {threshold:.{n}f} → {outcome}",
    }


def not_assessable(decision: dict[str, Any], reason: str) -> dict[str, Any]:
    """The decision for an image the quality gate failed (blurred, over-exposed): like one out
    of scope, neither positive nor negative, so no export, page or message states a finding
    on it; the score is kept for the record."""
    out = dict(decision)
    out.update(positive=False, outcome="not assessable",
               text=f"not assessable: {reason or 'image quality'}")
    return out


def out_of_scope(decision: dict[str, Any] | None, texts: dict[str, str]) -> dict[str, Any]:
    """The decision for an image the scope check rejected: neither positive nor negative (it is
    never flagged and never counted as a negative; the score is kept for the record)."""
    out = dict(decision or {})
    out.update(
        positive=False,
        outcome="out of scope",
        in_scope=False,
        text=f"out of scope: {texts['out_of_scope']}",
    )
    return out
