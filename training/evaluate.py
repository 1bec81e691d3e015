"""Evaluate bundle artifacts through the edge classifier: the exact code the Pi runs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edge.inference.bundle import Bundle, load_bundle
from edge.inference.classifier import Classifier

from .datasets import Sample
from .metrics import headline_kind, sensitivity_interval, summarise
from .progress import bar
from .threshold import Scores, choose


def predict(
    bundle: Bundle,
    kind: str,
    samples: list[Sample],
    threads: int | None = None,
    desc: str = "",
    tta: bool = False,
    members: bool = False,
) -> tuple[np.ndarray, float]:
    """Probabilities (N, classes) from one artifact on the CPU (averaged over the bundle's
    test-time views with ``tta``, and over its ensemble members with ``members``), and the
    median invoke time (ms, all views and members)."""
    clf = Classifier(bundle if members else bundle.only(kind), backend="cpu", threads=threads)
    labels = bundle.labels
    probs = np.zeros((len(samples), len(labels)), dtype=np.float32)
    invoke = []
    for i, s in enumerate(bar(samples, desc=desc or f"evaluate {kind}", unit="img", leave=False)):
        r = clf.classify(str(s.path), tta=tta, members=members)
        probs[i] = [r.probabilities[lab] for lab in labels]
        invoke.append(r.timings_ms["invoke"])
    clf.close()
    return probs, float(np.median(invoke)) if invoke else float("nan")


def group_indices(bundle: Bundle) -> list[int]:
    rule = bundle.decision
    if not rule:
        return []
    members = bundle.label_groups[rule["group"]]
    return [bundle.labels.index(m) for m in members]


def group_scores(
    bundle: Bundle, samples: list[Sample], kind: str = "int8", tta: bool = False,
    members: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Whether each image is in the decision group, and the group's score for it."""
    probs, _ = predict(bundle, kind, samples, desc="scores on validation", tta=tta,
                       members=members)
    y = np.array([bundle.labels.index(s.label) for s in samples])
    gidx = group_indices(bundle)
    # float64, as the edge compares a score with its threshold.
    return np.isin(y, gidx), probs[:, gidx].sum(axis=1, dtype=np.float64)


def validation_scores(
    bundle: Bundle, samples: list[Sample], kind: str = "int8", tta: bool = False,
    members: bool = False,
) -> Scores:
    """What the referral thresholds are chosen on (and what the bundle keeps of it): the
    group score per image of the first model on one view (the live stream's ``threshold``)
    and, with ``tta`` or ``members``, of the mean a capture gives (``tta_threshold``: every
    view, every member)."""
    positive, one = group_scores(bundle, samples, kind)
    many = (group_scores(bundle, samples, kind, tta=True, members=members)[1]
            if tta or members else None)
    return Scores([s.path.name for s in samples], np.array([s.group for s in samples]),
                  positive, one, many)


def choose_threshold(
    bundle: Bundle, samples: list[Sample], target: float, kind: str = "int8", tta: bool = False,
    method: str = "validation", confidence: float = 0.95, members: bool = False,
) -> float:
    """Threshold on the decision group's score that reaches ``target`` sensitivity (on scores
    averaged over the test-time views with ``tta``): on ``samples`` as they are
    (``validation``), or at the ``confidence`` lower bound over lesion-level resamples of them
    (``lesion_bound``: the target then holds on new lesions, not only on these)."""
    positive, score = group_scores(bundle, samples, kind, tta, members)
    return choose(positive, score, np.array([s.group for s in samples]), target, method,
                  confidence)


def latency_ms(path: Path, threads: int, runs: int = 30) -> float:
    from edge.inference.runtime import resolve_runtime

    interp = resolve_runtime().interpreter_cls(model_path=str(path), num_threads=threads)
    interp.allocate_tensors()
    d = interp.get_input_details()[0]
    x = np.zeros(d["shape"], dtype=d["dtype"])
    interp.set_tensor(d["index"], x)
    for _ in range(3):
        interp.invoke()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        interp.invoke()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def sensitivity_ci(y: np.ndarray, probs: np.ndarray, bundle: Bundle, samples: list[Sample],
                    threshold: float) -> dict:
    """The shipped threshold's sensitivity and its 95 % interval by lesion-level bootstrap."""
    gidx = group_indices(bundle)
    if not gidx:
        return {}
    positive = np.isin(y, gidx)
    if not positive.any():
        return {}
    groups = np.array([s.group for s in samples])
    _, lo, hi = sensitivity_interval(positive, probs[:, gidx].sum(axis=1), groups, threshold)
    return {"sensitivity_ci95": [lo, hi]}


def evaluate_bundle(
    bundle_dir: Path | Bundle, samples: list[Sample], kinds: list[str] | None = None
) -> dict:
    """Metrics per CPU artifact on ``samples``, int8-vs-float agreement, sizes and latency."""
    bundle = bundle_dir if isinstance(bundle_dir, Bundle) else load_bundle(bundle_dir)
    kinds = kinds or [k for k in ("float", "int8") if k in bundle.artifacts]
    y = np.array([bundle.labels.index(s.label) for s in samples])
    rule = bundle.decision or {}
    threshold = rule.get("threshold", 0.5)
    target = rule.get("target_sensitivity", 0.9)
    out: dict = {"n": len(samples), "artifacts": {}}
    preds = {}
    for kind in kinds:
        probs, invoke = predict(bundle, kind, samples)
        preds[kind] = probs
        m = summarise(y, probs, bundle.labels, group_indices(bundle), threshold, target)
        m.update(sensitivity_ci(y, probs, bundle, samples, threshold))
        art = bundle.artifacts[kind]
        m["file_size_bytes"] = art.path.stat().st_size
        m["median_invoke_ms_in_classifier"] = invoke
        m["latency_ms_1_thread"] = latency_ms(art.path, 1)
        m["latency_ms_2_threads"] = latency_ms(art.path, 2)
        out["artifacts"][kind] = m
    if "float" in preds and "int8" in preds:
        out["int8_float_agreement"] = float(
            (preds["float"].argmax(1) == preds["int8"].argmax(1)).mean()
        )
        out["int8_minus_float_accuracy"] = (
            out["artifacts"]["int8"]["accuracy"] - out["artifacts"]["float"]["accuracy"]
        )
    if bundle.tta and not bundle.members:
        # What uploads and captures get: the CPU artifact over the bundle's views, judged by
        # the rule's tta_threshold when it has one. (An ensemble's first model over the views is
        # no path the kit runs, and no threshold was chosen on it: an ensemble's rows are the
        # live stream's above and the capture's below.)
        kind = headline_kind(kinds)
        probs, invoke = predict(bundle, kind, samples, desc=f"evaluate {kind} + tta", tta=True)
        m = summarise(
            y, probs, bundle.labels, group_indices(bundle),
            rule.get("tta_threshold", threshold), target,
        )
        m.update(sensitivity_ci(y, probs, bundle, samples, rule.get("tta_threshold", threshold)))
        m["views"] = bundle.tta
        m["median_invoke_ms_in_classifier"] = invoke
        out["tta"] = {kind: m}
        m["gain_vs_plain"] = {
            k: m[k] - out["artifacts"][kind][k]
            for k in ("accuracy", "balanced_accuracy", "group_auc", "specificity_at_target")
        }
        preds[f"{kind}+tta"] = probs
    if bundle.members:
        # What a capture gets from an ensemble bundle: every member over every view, judged by
        # the shipped rule (the rows above are the first model alone).
        # A mean of several outputs: the rule's tta_threshold (chosen on such means).
        ens_threshold = rule.get("tta_threshold", threshold)
        probs, invoke = predict(bundle, "int8", samples, desc="evaluate the ensemble",
                                tta=bool(bundle.tta), members=True)
        m = summarise(y, probs, bundle.labels, group_indices(bundle), ens_threshold, target)
        m.update(sensitivity_ci(y, probs, bundle, samples, ens_threshold))
        m.update(members=1 + len(bundle.members), views=bundle.tta or ["identity"],
                 median_invoke_ms_in_classifier=invoke)
        out["ensemble"] = m
    out["_probs"] = preds
    out["_y"] = y
    return out
