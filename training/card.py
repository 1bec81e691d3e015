"""Model card: Markdown with ROC, confusion-matrix and training-curve plots."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .metrics import headline_kind, reliability, roc_curve


def _plots(
    out: Path, labels: list[str], ev: dict, history: Path | None, group: str, gidx: list[int]
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    y, probs = ev["_y"], ev["_probs"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for kind, p in probs.items():
        fpr, tpr, _ = roc_curve(np.isin(y, gidx), p[:, gidx].sum(axis=1))
        auc = _metrics_of(ev, kind)["group_auc"]
        ax.plot(fpr, tpr, label=f"{kind} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title=f"ROC: {group} vs rest")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)
    made.append("roc.png")

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for kind, p in probs.items():
        mean, rate, count, ece = reliability(np.isin(y, gidx), p[:, gidx].sum(axis=1))
        keep = count > 0
        ax.plot(mean[keep], rate[keep], marker="o", label=f"{kind} (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    ax.set(
        xlabel=f"{group} score (mean in bin)",
        ylabel=f"observed {group} rate",
        title=f"Reliability: {group} score (test)",
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=110)
    plt.close(fig)
    made.append("calibration.png")

    kind = headline_kind(ev["artifacts"])
    cm = np.array(ev["artifacts"][kind]["confusion"])
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(labels), 1.0 + 0.6 * len(labels)))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                color="white" if cm[i, j] > cm.max() / 2 else "black",
                fontsize=8,
            )
    ax.set_xticks(range(len(labels)), labels, rotation=45)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion ({kind}, test)")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=110)
    plt.close(fig)
    made.append("confusion.png")

    if history and history.is_file():
        with open(history, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ep = range(1, len(rows) + 1)
            for key in (
                "accuracy",
                "categorical_accuracy",
                "val_accuracy",
                "val_categorical_accuracy",
                "val_balanced_accuracy",
                "val_group_auc",
            ):
                if key in rows[0]:
                    ax.plot(ep, [float(r[key]) for r in rows], marker="o", label=key)
            ax.set(xlabel="fine-tuning epoch (then QAT, if any)", title="Training curves")
            ax.legend()
            fig.tight_layout()
            fig.savefig(out / "training.png", dpi=110)
            plt.close(fig)
            made.append("training.png")
    return made


def _metrics_of(ev: dict, kind: str) -> dict:
    """An artifact's metrics; ``KIND+tta`` names the same artifact over the test-time views."""
    if kind.endswith("+tta"):
        return ev["tta"][kind.removesuffix("+tta")]
    return ev["artifacts"][kind]


def _machine() -> str:
    """The CPU the card is written on (normally the one that trained), with the vector
    extensions that decide training and int8 speed."""
    import os

    from edge import hardware

    ext = hardware.cpu_extensions()
    return f"{hardware.cpu_model()}, {os.cpu_count()} cores" + (
        f" ({', '.join(ext)})" if ext else ""
    )


def _threshold_how(rule: dict) -> str:
    target = rule.get("target_sensitivity", 0)
    if rule.get("threshold_method") == "lesion_bound":
        conf = rule.get("threshold_confidence", 0.95)
        return (f"threshold was chosen on the validation split so that sensitivity "
                f"{target:.2f} holds on new lesions: the validation lesions were resampled "
                f"with replacement 2,000 times and the threshold kept is the one that reaches "
                f"{target:.2f} in {_pct(conf)} of the resamples (a lower confidence bound, not "
                "the validation images' own threshold).")
    return f"threshold was chosen on the validation split to reach sensitivity {target:.2f}."


def _chosen_on_text(rule: dict, views: list[str] | None, every: str = "every view") -> str:
    """What the shipped thresholds reach on the images they were chosen on, and where the
    scores are kept for anyone to recompute them."""
    c = rule.get("chosen_on")
    if not c or "sensitivity" not in c or "specificity" not in c:
        return ""
    averaged = (f" ({every}: {_pct(c['tta_sensitivity'])} at specificity "
                f"{_pct(c['tta_specificity'])})"
                if views and "tta_sensitivity" in c and "tta_specificity" in c else "")
    return (f" On the {c['n']} validation images it was chosen on, the threshold flags "
            f"{_pct(c['sensitivity'])} of the {rule['group']} ones at specificity "
            f"{_pct(c['specificity'])}{averaged}. Their scores are kept in `{c['file']}`: "
            "`python -m training threshold --model DIR` recomputes the thresholds from them.")


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


MINIMUMS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_auc": "macro AUC",
    "group_auc": "group AUC",
    "sensitivity": "sensitivity",
    "specificity": "specificity of the shipped threshold",
    "specificity_at_target": "specificity at the target sensitivity",
}


def target_results(
    targets: dict[str, float], ev: dict, kind: str | None = None
) -> list[tuple[str, bool, str, str]]:
    """(name, met, required, achieved) for each configured target, for one artifact (default
    the int8 one; ``int8+tta`` for it over the test-time views)."""
    kind = kind or headline_kind(ev["artifacts"])
    m = _metrics_of(ev, kind)
    out = []
    for key, name in MINIMUMS.items():
        if key in targets:
            out.append((name, m[key] >= targets[key], f"≥ {targets[key]:.2f}", f"{m[key]:.3f}"))
    for key in sorted(k for k in targets if k.startswith("recall_")):
        lab = key.removeprefix("recall_")
        got = m["recall"].get(lab, float("nan"))
        out.append((f"{lab} recall", got >= targets[key], f"≥ {targets[key]:.2f}", f"{got:.3f}"))
    # The share of a class's test images the shipped decision refers (a screening aid's promise
    # for melanoma is that it sends it on, whatever the top-1 label says).
    for key in sorted(k for k in targets if k.startswith("referred_")):
        lab = key.removeprefix("referred_")
        got = m.get("referred", {}).get(lab, float("nan"))
        out.append((f"{lab} referred", got >= targets[key], f"≥ {targets[key]:.2f}",
                    f"{got:.3f}"))
    if "max_latency_ms" in targets:
        ms = ev["artifacts"][kind.removesuffix("+tta")]["latency_ms_1_thread"]
        out.append(("CPU invoke, 1 thread", ms <= targets["max_latency_ms"],
                    f"≤ {targets['max_latency_ms']:.0f} ms", f"{ms:.1f} ms"))
    if "max_int8_drop" in targets and "int8_minus_float_accuracy" in ev:
        drop = -ev["int8_minus_float_accuracy"]
        out.append(("int8 accuracy loss vs float", drop <= targets["max_int8_drop"],
                    f"≤ {100 * targets['max_int8_drop']:.0f} point", f"{100 * drop:.1f} points"))
    if "min_agreement" in targets and "int8_float_agreement" in ev:
        agree = ev["int8_float_agreement"]
        out.append(("int8/float agreement", agree >= targets["min_agreement"],
                    f"≥ {_pct(targets['min_agreement'])}", _pct(agree)))
    if "max_int8_mb" in targets:
        mb = ev["artifacts"][kind.removesuffix("+tta")]["file_size_bytes"] / 1e6
        out.append(("int8 file size", mb <= targets["max_int8_mb"],
                    f"≤ {targets['max_int8_mb']} MB", f"{mb:.2f} MB"))
    return out


def _teacher_line(cfg) -> str:
    """What the student's soft labels came from, with the teacher's own figures if its report
    lies beside the labels (``NAME-report.json`` next to ``NAME.npz``)."""
    import json

    path = cfg.train.soft_labels_path
    w = cfg.train.soft_weight
    text = (
        f"- Phase 2 learnt from {1 - w:.0%} labels and {w:.0%} the out-of-fold probabilities "
        f"of a teacher ensemble (`training/gpu_teacher.py`, file `{path.name}`): five "
        "MobileNetV2s with the same offline initialisation, each trained on four fifths of the "
        "training split (lesion-grouped), each training image labelled by the model that never "
        "saw it. The teacher ran on a GPU once; the student trains on the CPU from the stored "
        "file, and without it from the labels alone."
    )
    report = path.with_name(path.stem + "-report.json")
    if report.is_file():
        r = json.loads(report.read_text())
        v, o = r["ensemble_val"], r["out_of_fold_train"]
        text += (
            f" Teacher: input {r['args']['hw']}, {r['epochs']} epochs per model, "
            f"{r['minutes']} min on one GPU; its ensemble on the validation split: accuracy "
            f"{v['accuracy']:.3f}, balanced accuracy {v['balanced_accuracy']:.3f}, "
            f"{cfg.decision.group} AUC {v['group_auc']:.3f} (out-of-fold on training images "
            f"{o['accuracy']:.3f} / {o['balanced_accuracy']:.3f} / {o['group_auc']:.3f})."
        )
    return text


def _elsewhere_lines(cfg, info: dict, group: str) -> list[str]:
    """The recipe of a model trained by training/gpu_members.py (``trained_elsewhere.json``
    of its run), its commands and its time."""
    h, w = info["input_size"]
    r, v = info["recipe"], info["validation"]
    soft = (
        f"; targets {1 - float(r['soft_weight']):.0%} the label and {float(r['soft_weight']):.0%} "
        f"the teacher's out-of-fold probabilities (`{Path(r['soft']).name}`, see "
        "`training/gpu_teacher.py`)"
        if r.get("soft") not in (None, "None", "")
        else ""
    )
    member = info["member"]
    return [
        f"- Backbone {cfg.model.backbone} (ImageNet initialisation from its wheel), input "
        f"{w}×{h} px (width × height), no hidden dense layer; every layer trained for "
        f"{info['epochs']} epochs"
        + (f" (of {info['planned_epochs']} planned: the run's time limit cut it short)"
           if info.get("planned_epochs", info["epochs"]) > info["epochs"] else "")
        + " on a GPU in PyTorch (`training/gpu_members.py`, the model "
        "`training/torch_lite.py` with the wheel's tensor names), seed "
        f"{info['seed']}: AdamW at learning rate {r['lr']} with weight decay {r['wd']}, "
        f"batch {r['batch']}, a one-epoch warm-up then cosine decay, dropout {r['dropout']}, "
        f"stochastic depth up to {r['drop_connect']}, BatchNorm statistics frozen, classes drawn "
        f"in proportion to their counts to the power {r['power']}, any rotation, flips, zoom "
        f"0.8-1.25, shifts and colour jitter{soft}. The epoch kept is the one with the best "
        f"validation score (mean of accuracy, balanced accuracy and {group} AUC over the four "
        f"views, in PyTorch): epoch {info['best_epoch']}, {v['accuracy']:.3f} / "
        f"{v['balanced_accuracy']:.3f} / {v['group_auc']:.3f}.",
        "- The weights came back to this Keras model tensor by tensor (`python -m training "
        "import-member`, the mapping the ImageNet transplant uses); export, logit adjustment, "
        "threshold and every figure here were made on the CPU from there, as for any run.",
        f"- Commands: `python -m training teacher-prep --config {cfg.source} --out DATA`, "
        f"`python -m training.gpu_members --data DATA --out OUT --member {h}x{w}:{info['seed']}"
        + (f" --soft {r['soft']}" if soft else "")
        + "".join(f" --{k.replace('_', '-')} {r[k]}" for k in ("max_epochs", "budget_s",
                                                                 "deadline_s") if r.get(k))
        + f"` (with the other members of its run, which share the budget), then `python -m "
        f"training import-member --member OUT/{member} --config {cfg.source} --set "
        f"model.dense=0 --set 'model.input_size=[{h}, {w}]' --out BUNDLE`.",
        f"- Time: {info['minutes']} min on one {info['device']} (PyTorch {info['torch']}); the "
        "kit needs neither the GPU nor PyTorch.",
    ]


def write_card(out: Path, manifest: dict, ev: dict, history: Path | None, cfg, extra: dict) -> Path:
    labels = manifest["labels"]
    rule = manifest["decision"]
    gidx = [labels.index(m) for m in manifest["label_groups"][rule["group"]]]
    plots = _plots(out, labels, ev, history, rule["group"], gidx)
    arts = ev["artifacts"]
    target_sens = rule.get("target_sensitivity", 0.9)
    ds = manifest["dataset"]
    members = ", ".join(manifest["label_groups"][rule["group"]])
    lines = [
        f"# Model card: {manifest['name']} {manifest['version']}",
        "",
        manifest.get("description", ""),
        "",
        "## Intended use",
        "",
        manifest.get("intended_use", ""),
        "",
        f"Decision rule: {rule['group']} score (sum of {members})"
        f" ≥ {rule['threshold']:.4f} → **{rule['positive']}**; otherwise {rule['negative']}. The "
        + _threshold_how(rule)
        + (
            f" Uploads and captures average the model over {len(manifest['tta'])} views "
            f"({', '.join(manifest['tta'])}) and use the threshold chosen the same way on those "
            f"averages, {rule['tta_threshold']:.4f}; the live stream uses one view."
            if manifest.get("tta") and "tta_threshold" in rule
            else ""
        )
        + _chosen_on_text(rule, manifest.get("tta")),
        "",
        "## Data",
        "",
        f"- Source: {ds.get('source', '')}; licence: {ds.get('license', '')}.",
        f"- Citation: {ds.get('citation', '')}",
        f"- Split: {extra['split_counts']} images (train/val/test), stratified by class, "
        "grouped by "
        f"{extra['group_by']}, seed {cfg.dataset.seed}; the split is in `split.csv` of the run.",
        "",
        f"## Results on the held-out test split ({ev['n']} images)",
        "",
        "| artifact | size | accuracy | balanced acc. | macro AUC | "
        f"{rule['group']} AUC | sensitivity | specificity | "
        f"specificity at {_pct(target_sens)} sensitivity | ECE | CPU latency 1 / 2 threads |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = list(arts.items()) + [(f"{k}+tta", m) for k, m in ev.get("tta", {}).items()]
    for kind, m in rows:
        base = arts[kind.removesuffix("+tta")]
        views = len(m.get("views", [])) or 1
        lat = (
            f"{base['latency_ms_1_thread']:.1f} / {base['latency_ms_2_threads']:.1f} ms"
            + (f" per view, {views} views" if views > 1 else "")
        )
        lines.append(
            f"| {kind.replace('+tta', ' + TTA')} | {base['file_size_bytes'] / 1e6:.2f} MB | "
            f"{_pct(m['accuracy'])} | {_pct(m['balanced_accuracy'])} | {m['macro_auc']:.3f} | "
            f"{m['group_auc']:.3f} | {_pct(m['sensitivity'])} | {_pct(m['specificity'])} | "
            f"{_pct(m['specificity_at_target'])} | {m['group_ece']:.3f} | {lat} |"
        )
    if "int8_float_agreement" in ev:
        lines += [
            "",
            f"int8 vs float: top-1 agreement {_pct(ev['int8_float_agreement'])}, "
            f"accuracy difference {100 * ev['int8_minus_float_accuracy']:+.1f} points.",
        ]
    if "tta" in ev:
        kind, m = next(iter(ev["tta"].items()))
        gain = m["gain_vs_plain"]
        lines += [
            "",
            f"Test-time augmentation ({kind}, mean over {', '.join(m['views'])}): accuracy "
            f"{100 * gain['accuracy']:+.1f} points, balanced accuracy "
            f"{100 * gain['balanced_accuracy']:+.1f} points, {rule['group']} AUC "
            f"{gain['group_auc']:+.3f}, specificity at {_pct(target_sens)} sensitivity "
            f"{100 * gain['specificity_at_target']:+.1f} points against one view "
            "(measured through `edge` on the int8 file).",
        ]
    cis = [f"{kind.replace('+tta', ' + TTA')} {_pct(m['sensitivity'])} "
           f"({_pct(m['sensitivity_ci95'][0])}–{_pct(m['sensitivity_ci95'][1])})"
           for kind, m in rows if m.get("sensitivity_ci95")]
    if cis:
        lines += ["", "Sensitivity of the shipped threshold on the test split, with its 95 % "
                  "interval (test lesions resampled with replacement): " + "; ".join(cis) + "."]
    lines += [
        "",
        f"Sensitivity and specificity are those of the shipped threshold on this split; "
        f"'specificity at {_pct(target_sens)} sensitivity' is the best this split's own ROC "
        "allows at that sensitivity. ECE: expected calibration error of the "
        f"{rule['group']} score in 10 bins (see the reliability plot).",
    ]
    columns = list(arts) + [f"{k}+tta" for k in ev.get("tta", {})]
    lines += [
        "",
        f"Per class: recall of the top-1 label, and the share referred by the decision rule "
        f"({rule['group']} score at its threshold):",
        "",
        "| class | "
        + " | ".join(f"recall {c.replace('+tta', ' + TTA')}" for c in columns)
        + " | "
        + " | ".join(f"referred {c.replace('+tta', ' + TTA')}" for c in columns)
        + " |",
        "|---|" + "---|" * (2 * len(columns)),
    ]
    names = manifest.get("label_names", {})
    for lab in labels:
        cells = [_pct(_metrics_of(ev, c)["recall"][lab]) for c in columns]
        cells += [_pct(_metrics_of(ev, c).get("referred", {}).get(lab, float("nan")))
                  for c in columns]
        lines.append(f"| {lab} ({names.get(lab, lab)}) | {' | '.join(cells)} |")
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    h, w = cfg.model.hw
    which = (
        "every layer"
        if cfg.train.unfreeze_from == "all"
        else f"the layers from `{cfg.train.unfreeze_from}` on"
    )
    drawn = {
        "none": "images as they come, loss weighted by class "
        f"({cfg.train.class_weight})",
        "sqrt": "classes drawn in proportion to the square root of their counts",
        "balanced": "every class drawn equally often",
    }[cfg.train.sampling]
    elsewhere = extra.get("elsewhere")
    lines += ["## Training", ""]
    if elsewhere:
        lines += _elsewhere_lines(cfg, elsewhere, rule["group"])
    else:
        lines.append(
        f"- Backbone {cfg.model.backbone} ({cfg.model.weights} initialisation), input "
        f"{w}×{h} px (width × height); head on cached features {cfg.train.head_epochs} "
        f"epochs, then fine-tuning of {which} for up to {cfg.train.finetune_epochs} epochs "
        f"at learning rate {cfg.train.finetune_lr:g} with cosine decay "
        f"(BatchNorm frozen; {drawn}"
        + ("; images turned by any angle" if cfg.train.rotate else "")
        + (
            f"; a moving average of the weights, momentum {cfg.train.ema_momentum:g} per step, "
            "validated and kept"
            if cfg.train.ema_momentum
            else ""
        )
        + "; early stopping on the mean of validation "
        f"{rule['group']} AUC, accuracy and balanced accuracy)."
        )
    if cfg.train.soft_labels and not elsewhere:
        lines.append(_teacher_line(cfg))
    adj = manifest.get("evaluation", {}).get("class_bias")
    if adj:
        table = {row["tau"]: row for row in adj["validation"]}
        at0, best = table.get(0.0), table[adj["tau"]]
        lines.append(
            f"- Logit adjustment: the edge adds −τ·log(class share in training) to the logits "
            f"before the softmax (manifest `class_bias`), τ = {adj['tau']:.1f} chosen on the "
            "validation split for the mean of accuracy and balanced accuracy"
            + (
                f" (validation accuracy {at0['accuracy']:.3f} → {best['accuracy']:.3f}, "
                f"balanced {at0['balanced_accuracy']:.3f} → {best['balanced_accuracy']:.3f})."
                if at0
                else "."
            )
        )
    if elsewhere:
        lines.append("")
    if cfg.train.cached_copies and not elsewhere:
        lines.append(
            f"- The frozen bottom ran once on {cfg.train.cached_copies} augmented copies of "
            "the training set; the layers from there on trained on those stored activations."
        )
    if cfg.train.int8_copies and not elsewhere:
        lines.append(
            f"- {cfg.train.int8_copies} more augmented copies came from the bottom converted to "
            "int8 (calibrated on the export's images), and validation used int8 activations, so "
            "the top learnt from what the int8 model computes as well as from the float one."
        )
    if cfg.train.qat_epochs and not elsewhere:
        lines.append(
            f"- Then {cfg.train.qat_epochs} quantisation-aware epochs (int8 activations "
            "simulated, `training/qat.py`) before the int8 export."
        )
    if not elsewhere:
        lines += [
            f"- Command: `python -m training train --config {cfg.source}`",
            f"- Time: {extra.get('train_minutes', '?')} min training on this machine: "
            f"{_machine()}, no GPU.",
            "",
        ]
    if cfg.export.runs:
        keys = list(dict.fromkeys(k for r in cfg.export.runs for k in r))
        lines += [
            "## What was tried",
            "",
            "Runs on the same split (figures on the test split through `edge`, int8 unless "
            "the row says otherwise):",
            "",
            "| " + " | ".join(keys) + " |",
            "|" + "---|" * len(keys),
        ]
        lines += [
            "| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in cfg.export.runs
        ]
        lines.append("")
    edgetpu = extra.get("edgetpu")
    if edgetpu:
        lines += ["## Edge TPU", "", edgetpu, ""]
    targets = cfg.export.targets
    if targets:
        kinds = [headline_kind(arts)]
        kinds += [f"{k}+tta" for k in ev.get("tta", {})]
        lines += [
            "## Targets (test split)",
            "",
            "| target | required | "
            + " | ".join(k.replace("+tta", " + TTA") for k in kinds)
            + " |",
            "|---|---|" + "---|" * len(kinds),
        ]
        results = [target_results(targets, ev, k) for k in kinds]
        for row in zip(*results, strict=True):
            name, _, want, _ = row[0]
            cells = " | ".join(f"{got} {'met' if ok else '**missed**'}" for _, ok, _, got in row)
            lines.append(f"| {name} | {want} | {cells} |")
        if cfg.export.gap_notes:
            lines += ["", "What would close the gap:", ""]
            lines += [f"- {note}" for note in cfg.export.gap_notes]
        lines.append("")
    lines += ["## Known limits", ""]
    lines += [f"- {lim}" for lim in cfg.export.limitations]
    lines += [
        "- Figures are from our own lesion-/image-disjoint split of the public data, not "
        "from a clinical study.",
        "",
    ]
    path = out / "CARD.md"
    path.write_text("\n".join(lines))
    return path
