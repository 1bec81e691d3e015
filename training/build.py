"""A trained Keras model → a complete bundle: artifacts, threshold, metrics, card, samples."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

from edge.inference.bundle import load_bundle, write_bundle

from .config import Config
from .datasets import read_split
from .edgetpu import CompilerMissing, compile_model, preflight, render_preflight
from .evaluate import evaluate_bundle, validation_scores
from .threshold import SCORES_FILE, choose, chosen_on, shipped, write_scores

log = logging.getLogger(__name__)


def base_manifest(cfg: Config, threshold: float, tta_threshold: float | None = None) -> dict:
    ds = cfg.dataset
    manifest = {
        "schema_version": 1,
        "name": cfg.name,
        "version": cfg.version,
        "description": cfg.description,
        "imaging": ds.imaging or ("dermoscopy" if ds.layout == "ham10000" else "microscopy"),
        "labels": ds.labels,
        "label_names": ds.label_names,
        "label_groups": cfg.decision.groups,
        "decision": {
            "group": cfg.decision.group,
            "threshold": shipped(threshold),
            "target_sensitivity": cfg.decision.target_sensitivity,
            "threshold_method": cfg.decision.threshold_method,
            "positive": cfg.decision.positive,
            "negative": cfg.decision.negative,
        },
        "input": {
            "size": list(cfg.model.hw),
            "color_order": "RGB",
            "resize": "squash" if ds.layout == "ham10000" else "center-crop",
            "normalization": {"mean": [127.5] * 3, "std": [127.5] * 3},
        },
        "output": cfg.export.output,
        "artifacts": {},
        "dataset": {"source": ds.source, "license": ds.license, "citation": ds.citation},
        "intended_use": cfg.export.intended_use,
        "card": "CARD.md",
        "samples": "samples",
    }
    if cfg.export.tta:
        manifest["tta"] = list(cfg.export.tta)
        if tta_threshold is not None:
            manifest["decision"]["tta_threshold"] = shipped(tta_threshold)
    if cfg.decision.threshold_method == "lesion_bound":
        manifest["decision"]["threshold_confidence"] = cfg.decision.threshold_confidence
    return manifest


def _tune_class_bias(cfg: Config, bundle, parts: dict, kind: str) -> dict:
    """Logit adjustment chosen on the validation split through the edge's own code."""
    import numpy as np

    from .evaluate import predict
    from .metrics import tune_logit_adjustment

    labels = cfg.dataset.labels
    counts = Counter(s.label for s in parts["train"])
    prior = np.array([counts[lab] for lab in labels], dtype=np.float64)
    prior /= prior.sum()
    probs, _ = predict(bundle, kind, parts["val"], desc="class bias on validation")
    y = np.array([labels.index(s.label) for s in parts["val"]])
    tau, bias, table = tune_logit_adjustment(probs, y, prior)
    log.info("logit adjustment: tau %.2f on validation (%s)", tau, table)
    return {"tau": tau, "bias": [round(float(b), 4) for b in bias], "validation": table}


def export_artifacts(cfg: Config, run_dir: Path) -> dict[str, Path]:
    import keras

    from .export import calibration_images, export_float, export_int8, logits_model
    from .train import prepare_data

    model = keras.models.load_model(run_dir / "model.keras")
    if cfg.export.output == "logits":
        model = logits_model(model)
    out = run_dir / "export"
    out.mkdir(exist_ok=True)
    files = {}
    if cfg.export.float:
        files["float"] = export_float(model, out / f"{cfg.name}_float.tflite")
    if cfg.export.int8:
        data = prepare_data(cfg, run_dir)
        x = data["x_train"]
        rep = calibration_images(x, cfg.export.representative_images, cfg.dataset.seed)
        files["int8"] = export_int8(model, rep, out / f"{cfg.name}_int8.tflite")
    return files


def add_samples(bundle_dir: Path, cfg: Config, test: list, per_class: int) -> None:
    """A few test-split images per class for the demo, with their attribution."""
    dest = bundle_dir / "samples"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir()
    counts: Counter = Counter()
    rows = []
    for s in test:
        if counts[s.label] >= per_class:
            continue
        counts[s.label] += 1
        name = f"{s.label}_{s.path.stem}{s.path.suffix.lower()}"
        shutil.copyfile(s.path, dest / name)
        rows.append(f"| {name} | {s.label} | {s.path.name} |")
    (dest / "ATTRIBUTION.md").write_text(
        "\n".join(
            [
                f"# Sample images for the {cfg.name} demo",
                "",
                "From the held-out test split (never seen in training). Source and licence:",
                "",
                f"- {cfg.dataset.citation}",
                f"- {cfg.dataset.source} — {cfg.dataset.license}",
                "",
                "| file | ground truth | original file |",
                "|---|---|---|",
                *rows,
                "",
            ]
        )
    )


def build_bundle(
    cfg: Config, run_dir: Path, out_dir: Path, keep_float: bool = False, samples_per_class: int = 0
) -> dict:
    files = export_artifacts(cfg, run_dir)
    if cfg.export.scope_layers and "int8" in files:
        # The scope check's feature outputs before anything is evaluated or compiled (the
        # class output is unchanged; the Edge TPU model then carries them too).
        from .scope import add_taps

        add_taps(files["int8"], files["int8"], cfg.export.scope_layers)
    parts = read_split(run_dir / "split.csv")
    staging = run_dir / "bundle"
    if staging.exists():
        shutil.rmtree(staging)
    manifest = base_manifest(cfg, 0.5)
    write_bundle(staging, manifest, files)
    cpu_kind = "int8" if "int8" in files else "float"
    staged = load_bundle(staging)
    adjustment = None
    if cfg.export.class_bias == "tuned":
        adjustment = _tune_class_bias(cfg, staged, parts, cpu_kind)
        write_bundle(staging, {**manifest, "class_bias": adjustment["bias"]}, files)
        staged = load_bundle(staging)
    how = {"method": cfg.decision.threshold_method,
           "confidence": cfg.decision.threshold_confidence}
    # The validation scores the thresholds are chosen on, kept in the bundle so that anyone can
    # recompute them (training/threshold.py).
    scores = validation_scores(staged, parts["val"], cpu_kind, tta=bool(cfg.export.tta))
    target = cfg.decision.target_sensitivity
    threshold = choose(scores.positive, scores.score, scores.lesion, target, **how)
    tta_threshold = (
        choose(scores.positive, scores.tta, scores.lesion, target, **how)
        if scores.tta is not None
        else None
    )
    manifest = base_manifest(cfg, threshold, tta_threshold)
    digest = write_scores(run_dir / SCORES_FILE, scores)
    manifest["decision"]["chosen_on"] = chosen_on(scores, digest, manifest["decision"])
    if adjustment:
        manifest["class_bias"] = adjustment["bias"]
    write_bundle(staging, manifest, files)
    ev = evaluate_bundle(staging, parts["test"])
    for kind, metrics in ev["artifacts"].items():
        manifest["artifacts"].setdefault(kind, {})["metrics"] = {
            k: v for k, v in metrics.items() if k not in ("confusion",)
        }
        manifest["artifacts"][kind]["input_dtype"] = "uint8" if kind == "int8" else "float32"
    manifest["evaluation"] = {
        "split": "test",
        "n": ev["n"],
        "int8_float_agreement": ev.get("int8_float_agreement"),
        "int8_minus_float_accuracy": ev.get("int8_minus_float_accuracy"),
    }
    if "tta" in ev:
        manifest["evaluation"]["tta"] = {
            kind: {k: v for k, v in m.items() if k != "confusion"} for kind, m in ev["tta"].items()
        }
    if adjustment:
        manifest["evaluation"]["class_bias"] = {k: v for k, v in adjustment.items() if k != "bias"}
    extra: dict = {
        "split_counts": "/".join(str(len(parts[p])) for p in ("train", "val", "test")),
        "group_by": "lesion_id" if cfg.dataset.layout == "ham10000" else "image",
    }
    tt = run_dir / "train_time.json"
    if tt.is_file():
        extra["train_minutes"] = json.loads(tt.read_text())["minutes"]
    from .imported import ELSEWHERE

    elsewhere = run_dir / ELSEWHERE
    if elsewhere.is_file():
        extra["elsewhere"] = json.loads(elsewhere.read_text())
    final_files = {k: v for k, v in files.items() if k == "int8" or keep_float}
    if "int8" in files:
        reports = preflight(files["int8"])
        text = render_preflight(reports)
        manifest["artifacts"]["int8"]["edgetpu_preflight"] = {
            "ops": len(reports),
            "mappable": sum(r.ok for r in reports),
        }
        try:
            compiled, clog = compile_model(
                files["int8"], files["int8"].parent, cfg.export.edgetpu_runtime_version
            )
            final_files["edgetpu"] = compiled
            manifest["artifacts"]["edgetpu"] = {"input_dtype": "uint8", "edgetpu": clog}
            text += f"\n\nCompiled: {clog}"
        except CompilerMissing as exc:
            log.warning("%s", exc)
            text += (
                "\n\nNot compiled here: edgetpu_compiler is not installed on the training "
                "machine. Run `python -m training compile --model models/"
                f"{cfg.name}` where it is."
            )
        extra["edgetpu"] = "Preflight of the int8 model: " + text
    for kind in list(manifest["artifacts"]):
        if kind not in final_files:
            manifest["artifacts"].pop(kind)
            manifest.setdefault("evaluated_not_shipped", {})[kind] = ev["artifacts"][kind]
            manifest["evaluated_not_shipped"][kind].pop("confusion", None)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    write_bundle(out_dir, manifest, final_files)
    shutil.copyfile(run_dir / SCORES_FILE, out_dir / SCORES_FILE)
    from .card import write_card

    write_card(out_dir, manifest, ev, run_dir / "history.csv", cfg, extra)
    if samples_per_class:
        add_samples(out_dir, cfg, parts["test"], samples_per_class)
    if cfg.export.scope_layers and "int8" in final_files:
        from .scope import add_scope

        add_scope(out_dir, cfg, parts)  # fitted on train, threshold on val; a card section
    load_bundle(out_dir)  # the result must load on the Pi side
    ev.pop("_probs")
    ev.pop("_y")
    return ev
