"""Output handling, checked against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from edge.inference import postprocess as pp


def test_dequantize_uint8_and_int8():
    d = {"quantization": (0.5, 10)}
    assert pp.dequantize(np.array([[10, 12, 20]], np.uint8), d).tolist() == [0.0, 1.0, 5.0]
    assert pp.dequantize(
        np.array([-128, 0], np.int8), {"quantization": (1 / 256, -128)}
    ).tolist() == [0.0, 0.5]


def test_softmax_only_for_logits():
    probs = np.array([0.7, 0.2, 0.1], np.float32)
    assert np.allclose(pp.to_probabilities(probs, "auto"), probs)
    logits = np.array([2.0, 1.0, 0.0], np.float32)
    e = np.exp([2.0, 1.0, 0.0])
    assert np.allclose(pp.to_probabilities(logits, "auto"), e / e.sum())
    # declared logits get softmax even when they happen to look like probabilities
    assert not np.allclose(pp.to_probabilities(probs, "logits"), probs)


def test_groups_and_decision_text():
    labels = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    probs = np.array([0.05, 0.10, 0.05, 0.02, 0.68, 0.08, 0.02])
    groups = pp.group_scores(probs, labels, {"malignant": ["mel", "bcc", "akiec"]})
    assert abs(groups["malignant"] - 0.83) < 1e-9
    d = pp.decide(
        groups,
        {
            "group": "malignant",
            "threshold": 0.30,
            "positive": "refer",
            "negative": "routine follow-up",
        },
    )
    assert d["positive"] is True
    assert d["text"] == "malignant: 0.83 ≥ 0.30 → refer"
    small = pp.decide(
        {"malignant": 0.005},
        {"group": "malignant", "threshold": 0.0059, "positive": "refer", "negative": "benign"},
    )
    assert small["text"] == "malignant: 0.0050 < 0.0059 → benign" and not small["positive"]
    low = pp.decide({"malignant": 0.1}, {"group": "malignant", "threshold": 0.3})
    assert low["outcome"] == "negative" and "<" in low["text"]


def test_top_k_order():
    assert pp.top_k(np.array([0.1, 0.6, 0.3]), ["a", "b", "c"], 2) == [("b", 0.6), ("c", 0.3)]


def test_class_bias_is_added_to_the_logits_before_the_softmax():
    logits = np.array([2.0, 1.0, 0.0], np.float32)
    plain = pp.to_probabilities(logits, "logits")
    biased = pp.to_probabilities(logits, "logits", np.array([0.0, 0.0, 3.0]))
    np.testing.assert_allclose(biased, pp.softmax(np.array([2.0, 1.0, 3.0])), rtol=1e-6)
    assert plain.argmax() == 0 and biased.argmax() == 2


def test_manifest_checks_class_bias(tmp_path):
    import json
    from pathlib import Path

    from edge.errors import BundleError
    from edge.inference.bundle import validate_manifest

    root = Path(__file__).resolve().parent.parent / "models" / "skin-lesion"
    m = json.loads((root / "manifest.json").read_text())
    m["output"] = "logits"
    m["class_bias"] = [0.0] * len(m["labels"])
    validate_manifest(m)
    m["class_bias"] = [0.0, 1.0]
    with pytest.raises(BundleError, match="class_bias"):
        validate_manifest(m)
    m["class_bias"] = [0.0] * len(m["labels"])
    m["output"] = "probabilities"
    with pytest.raises(BundleError, match="logits"):
        validate_manifest(m)
