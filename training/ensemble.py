"""An ensemble bundle from trained bundles: the first bundle as it is (its model serves the live
stream, its scope check and maps stay), the others' int8 models added as members.

Captures, uploads and `edge classify` average every member over the test-time views, so the
referral threshold is chosen again on the validation split for those averages (by the config's
threshold method), and the test split is evaluated for each model alone and for the ensemble,
through the edge classifier, as a capture classifies. The card gets a section with the table
and the capture's latency at 1 and 2 threads on the machine that built it.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from pathlib import Path

import numpy as np

from edge.errors import BundleError
from edge.inference.bundle import load_bundle
from edge.inference.classifier import Classifier
from edge.inference.tflite_file import sha256_file

from .config import Config
from .datasets import Sample
from .evaluate import group_indices, predict, sensitivity_ci, validation_scores
from .metrics import summarise
from .threshold import (
    OOF_FILE,
    SCORES_FILE,
    carry_over,
    choose_both,
    chosen_on,
    rates,
    shipped,
    shipped_up,
    write_scores,
)

log = logging.getLogger(__name__)
KEYS = ("accuracy", "balanced_accuracy", "macro_auc", "group_auc", "sensitivity", "specificity",
        "specificity_at_target")


def _compatible(first, other, where: Path) -> dict | None:
    """Refuse a bundle that cannot be a member of ``first``'s ensemble; its own input size
    (the manifest entry's ``input``) when it differs from the first's, else None."""
    if other.labels != first.labels:
        raise BundleError(f"{where}: labels {other.labels} differ from {first.labels}",
                          "an ensemble's members share the first bundle's labels")
    mine, theirs = dict(first.input_spec), dict(other.input_spec)
    size = theirs.pop("size")
    if mine.pop("size") == size:
        return None
    if mine != theirs:
        raise BundleError(f"{where}: input {other.input_spec} differs from {first.input_spec}",
                          "a member may take another size, but the same colour order, resize "
                          "and normalization")
    return {"size": list(size)}


def _metrics(bundle, y, probs, samples: list[Sample], threshold: float, target: float) -> dict:
    m = summarise(y, probs, bundle.labels, group_indices(bundle), threshold, target)
    m.update(sensitivity_ci(y, probs, bundle, samples, threshold))
    if "mel" in bundle.labels:
        m["mel_referred"] = m.get("referred", {}).get("mel")
    m.pop("confusion", None)
    return m


def capture_latency_ms(bundle_dir: Path, image: Path, threads: int, runs: int = 10) -> float:
    """Median wall time of one capture's classification (every member × every view)."""
    clf = Classifier(load_bundle(bundle_dir), backend="cpu", threads=threads)
    small, _, decoded = clf.prepare_encoded(str(image))
    clf.infer(small, tta=True, members=True, image=decoded)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        clf.infer(small, tta=True, members=True, image=decoded)
        times.append((time.perf_counter() - t) * 1e3)
    clf.close()
    return float(np.median(times))


OOF_SOURCE = "out-of-fold predictions over train + validation"


def build_ensemble(cfg: Config, first_dir: Path, others: list[Path], out: Path,
                   parts: dict[str, list[Sample]], version: str,
                   oof_scores: Path | None = None) -> dict:
    """Write the ensemble bundle to ``out``; returns its evaluation. With ``oof_scores``
    (``python -m training oof-scores``) the thresholds are chosen on those scores instead of
    the validation split's."""
    first = load_bundle(first_dir)
    given = None
    if oof_scores is not None:  # checked before anything is written
        from .oof import read_for

        given = read_for(oof_scores, first, [load_bundle(d) for d in others],
                         {s.path.stem for s in parts["test"]})
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(first_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["version"] = version
    manifest["members"] = []
    for i, other_dir in enumerate(others, start=1):
        other = load_bundle(other_dir)
        own_input = _compatible(first, other, other_dir)
        src = other.artifacts["int8"].path
        name = f"member{i}_{src.name}"
        shutil.copyfile(src, out / name)
        entry: dict = {"file": name, "sha256": sha256_file(out / name),
                       "size": (out / name).stat().st_size,
                       "from": f"{other.name} {other.version}"}
        if other.manifest.get("class_bias"):
            entry["class_bias"] = list(other.manifest["class_bias"])
        if own_input:
            entry["input"] = own_input
        manifest["members"].append(entry)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    staged = load_bundle(out)
    target = cfg.decision.target_sensitivity
    how = {"method": cfg.decision.threshold_method,
           "confidence": cfg.decision.threshold_confidence}
    # Two thresholds, each chosen on the scores it will judge: `threshold` on the first model
    # alone, one view (what the live stream runs), `tta_threshold` on the mean of every member
    # over every view (what captures, uploads and `classify` give).
    val_scores = validation_scores(staged, parts["val"], "int8", tta=bool(staged.tta),
                                   members=True)
    carry = given is not None and cfg.decision.oof_carry == "specificity"
    scores = given if given is not None and not carry else val_scores
    assert scores.tta is not None and val_scores.tta is not None
    rule = manifest["decision"]
    if carry:
        assert given is not None
        got, carried = carry_over(given, val_scores, target, how["method"], how["confidence"])
        keep = shipped_up  # a specificity holds only for a threshold never below it
    else:
        got, keep = choose_both(scores, target, how["method"], how["confidence"]), shipped
    rule.update({key: keep(got[key]) for key in ("threshold", "tta_threshold")},
                target_sensitivity=target, threshold_method=cfg.decision.threshold_method)
    rule.pop("threshold_confidence", None)
    if cfg.decision.threshold_method == "lesion_bound":
        rule["threshold_confidence"] = cfg.decision.threshold_confidence
    # The ensemble's own validation scores replace the first bundle's copy.
    rule["chosen_on"] = chosen_on(scores, write_scores(out / SCORES_FILE, scores), rule)
    if carry:
        assert given is not None
        # The operating point came from the out-of-fold scores, kept beside the ones the
        # thresholds sit on, so that `training threshold` recomputes both steps.
        rule["chosen_on"]["carried_from"] = {
            "source": OOF_SOURCE, "file": OOF_FILE,
            "sha256": write_scores(out / OOF_FILE, given), "n": len(given.image),
            **carried}
    elif given is not None:
        rule["chosen_on"]["source"] = OOF_SOURCE
        # The fold models stand in for the shipped ones: what the thresholds chosen on them
        # reach on the kit's own (int8, every member and view) validation scores.
        rule["chosen_on"]["validation"] = {
            "n": len(val_scores.image),
            **rates(val_scores.positive, val_scores.score, rule["threshold"]),
            **{f"tta_{k}": v for k, v in
               rates(val_scores.positive, val_scores.tta, rule["tta_threshold"]).items()},
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    staged = load_bundle(out)

    test = parts["test"]
    y = np.array([staged.labels.index(s.label) for s in test])
    rows: dict[str, dict] = {}
    for b_dir in [first_dir, *others]:
        b = load_bundle(b_dir)
        probs, _ = predict(b, "int8", test, desc=f"test {b.name} {b.version} + tta", tta=True)
        theirs = b.decision or {}
        rows[f"{b.name} {b.version} (alone, its own threshold)"] = _metrics(
            b, y, probs, test, theirs.get("tta_threshold", theirs.get("threshold", 0.5)), target)
    probs, _ = predict(staged, "int8", test, desc="test ensemble + tta", tta=True, members=True)
    # The threshold as shipped (kept to four decimals), as a capture applies it.
    rows["ensemble (shipped decision)"] = _metrics(staged, y, probs, test, rule["tta_threshold"],
                                                   target)
    image = test[0].path
    latency = {t: capture_latency_ms(out, image, t) for t in (1, 2)}
    manifest["evaluation"]["ensemble"] = {
        "split": "test", "n": len(test), "rows": rows, "views": staged.tta,
        "members": 1 + len(manifest["members"]),
        "capture_latency_ms": latency, "machine": platform.processor() or platform.machine(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=float) + "\n")
    _card_section(out, manifest, rows, latency, len(test), cfg.export.targets)
    load_bundle(out)  # the finished bundle loads (digests, members, scope)
    return manifest["evaluation"]["ensemble"]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _chosen_text(rule: dict) -> str:
    c = rule.get("chosen_on") or {}
    if not all(k in c for k in ("sensitivity", "specificity", "tta_sensitivity",
                                "tta_specificity")):
        return ""
    where = (f"{c['n']} images of train + validation they were chosen on (each predicted "
             "by a fold model that never saw it)" if c.get("source") == OOF_SOURCE
             else f"{c['n']} validation images they were chosen on")
    v = c.get("validation")
    moved = c.get("carried_from")
    carried = (f" Each sits at the specificity that lesion-grouped fold models (trained again "
               "on the other folds, on hard labels to their last epoch; float scores) reach at "
               f"their own "
               f"threshold on {moved['n']} out-of-fold images of train + validation (live "
               f"stream {_pct(moved['threshold']['specificity'])}, captures "
               f"{_pct(moved['tta_threshold']['specificity'])}; their scores are kept in "
               f"`{moved['file']}`): their scores sit on another scale than the members', so "
               "the operating point is carried over, not the score." if moved else "")
    check = (f" On the kit's own validation scores (int8, {v['n']} images) the captures' "
             f"threshold flags {_pct(v.get('tta_sensitivity'))} at specificity "
             f"{_pct(v.get('tta_specificity'))}: the fold models are trained again (hard labels, "
             "their last epoch), not the shipped models, and their float scores stand in for "
             "these."
             if v else "")
    return (f" On the {where}, the live stream's "
            f"threshold flags {_pct(c['sensitivity'])} of the {rule['group']} ones at "
            f"specificity {_pct(c['specificity'])}, the captures' {_pct(c['tta_sensitivity'])} "
            f"at {_pct(c['tta_specificity'])}. Their scores are kept in `{c['file']}`: "
            "`python -m training threshold --model DIR` recomputes both from them." + carried
            + check)


def _targets(targets: dict[str, float], row: dict) -> list[str]:
    """The config's targets that a row of figures can answer, against the ensemble's row (what
    a capture gives): the card's targets table above is the first model's."""
    from .card import MINIMUMS, target_results

    keys = {k: v for k, v in targets.items()
            if k in MINIMUMS or k.startswith(("recall_", "referred_"))}
    if not keys:
        return []
    lines = ["", "Against the targets, as a capture classifies (the ensemble's row):", "",
             "| target | required | ensemble |", "|---|---|---|"]
    for name, ok, want, got in target_results(keys, {"artifacts": {"ensemble": row}},
                                              "ensemble"):
        lines.append(f"| {name} | {want} | {got} {'met' if ok else '**missed**'} |")
    return lines


def _card_section(out: Path, manifest: dict, rows: dict, latency: dict, n: int,
                  targets: dict[str, float] | None = None) -> None:
    rule = manifest["decision"]
    views = len(manifest.get("tta") or []) or 1
    models = 1 + len(manifest["members"])
    lines = [
        "", "## Ensemble (what captures, uploads and `edge classify` use)", "",
        f"This bundle averages {models} int8 models × {views} views for every capture, upload "
        f"and `edge classify`; the live stream runs the first model alone on one view. Members: "
        + ", ".join(m["from"] for m in manifest["members"]) + f". The shipped decision: "
        f"{rule['group']} ≥ {rule['tta_threshold']:.4f} on the ensemble's averages (the live "
        f"stream, on the first model's one view: {rule['threshold']:.4f}), each chosen on the "
        + ("out-of-fold predictions of lesion-grouped fold models over train + validation "
           "(trained again on the other folds, on hard labels to their last epoch; float "
           "scores)"
           if (rule.get("chosen_on") or {}).get("source") == OOF_SOURCE
           else "validation split at the operating point carried over from out-of-fold "
           "predictions" if "carried_from" in (rule.get("chosen_on") or {})
           else "validation split") + " on the scores it judges"
        + (" at the lesion-level lower bound" if rule.get("threshold_method") == "lesion_bound"
           else "") + "." + _chosen_text(rule)
        + " The tables above describe the first model alone, and so does the threshold "
        "sentence at the top of this card.", "",
        f"Test split ({n} images, lesions never seen in training), through the edge classifier "
        "with every view:", "",
        "| model | accuracy | balanced | macro AUC | malignant AUC | malignant referred (95 % "
        "interval) | specificity | melanomas referred |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        lo, hi = m["sensitivity_ci95"]
        lines.append(
            f"| {name} | {_pct(m['accuracy'])} | {_pct(m['balanced_accuracy'])} | "
            f"{m['macro_auc']:.3f} | {m['group_auc']:.3f} | {_pct(m['sensitivity'])} "
            f"({_pct(lo)}–{_pct(hi)}) | {_pct(m['specificity'])} | "
            f"{_pct(m.get('mel_referred'))} |")
    lines += _targets(targets or {}, rows["ensemble (shipped decision)"])
    lines += [
        "", f"One capture ({models} models × {views} views) takes {latency[1]:.0f} ms at 1 "
        f"thread and {latency[2]:.0f} ms at 2 threads on the machine that built this bundle "
        "(see docs/benchmarks.md for its CPU).", "",
    ]
    card = out / "CARD.md"
    text = card.read_text()
    heading, _, rest = text.partition("\n")
    if heading.startswith("# Model card: "):  # the copied card names the first bundle
        heading = f"# Model card: {manifest['name']} {manifest['version']} (an ensemble; the " \
                  f"first model is {heading.removeprefix('# Model card: ')})"
    card.write_text(heading + "\n" + rest.rstrip("\n") + "\n" + "\n".join(lines))
