"""Model card: Markdown with ROC, confusion-matrix and training-curve plots."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .metrics import roc_curve


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
        auc = ev["artifacts"][kind]["group_auc"]
        ax.plot(fpr, tpr, label=f"{kind} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title=f"ROC: {group} vs rest")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)
    made.append("roc.png")

    kind = "int8" if "int8" in ev["artifacts"] else next(iter(ev["artifacts"]))
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
            for key in ("accuracy", "val_accuracy", "val_group_auc"):
                if key in rows[0]:
                    ax.plot(ep, [float(r[key]) for r in rows], marker="o", label=key)
            ax.set(xlabel="fine-tuning epoch (then QAT, if any)", title="Training curves")
            ax.legend()
            fig.tight_layout()
            fig.savefig(out / "training.png", dpi=110)
            plt.close(fig)
            made.append("training.png")
    return made


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def target_results(targets: dict[str, float], ev: dict) -> list[tuple[str, bool, str, str]]:
    """(name, met, required, achieved) for each configured target."""
    m = ev["artifacts"].get("int8") or next(iter(ev["artifacts"].values()))
    out = []
    for key in ("accuracy", "group_auc", "sensitivity"):
        if key in targets:
            out.append((key.replace("_", " "), m[key] >= targets[key], f"≥ {targets[key]:.2f}",
                        f"{m[key]:.3f}"))
    if "max_int8_drop" in targets and "int8_minus_float_accuracy" in ev:
        drop = -ev["int8_minus_float_accuracy"]
        out.append(("int8 accuracy loss vs float", drop <= targets["max_int8_drop"],
                    f"≤ {100 * targets['max_int8_drop']:.0f} point", f"{100 * drop:.1f} points"))
    if "min_agreement" in targets and "int8_float_agreement" in ev:
        agree = ev["int8_float_agreement"]
        out.append(("int8/float agreement", agree >= targets["min_agreement"],
                    f"≥ {_pct(targets['min_agreement'])}", _pct(agree)))
    if "max_int8_mb" in targets:
        mb = m["file_size_bytes"] / 1e6
        out.append(("int8 file size", mb <= targets["max_int8_mb"],
                    f"≤ {targets['max_int8_mb']} MB", f"{mb:.2f} MB"))
    return out


def write_card(out: Path, manifest: dict, ev: dict, history: Path | None, cfg, extra: dict) -> Path:
    labels = manifest["labels"]
    rule = manifest["decision"]
    gidx = [labels.index(m) for m in manifest["label_groups"][rule["group"]]]
    plots = _plots(out, labels, ev, history, rule["group"], gidx)
    arts = ev["artifacts"]
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
        f" ≥ {rule['threshold']:.3f} → **{rule['positive']}**; otherwise {rule['negative']}. The "
        f"threshold was chosen on the validation split to reach sensitivity "
        f"{rule.get('target_sensitivity', 0):.2f}.",
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
        f"{rule['group']} AUC | sensitivity | specificity | CPU latency 1 / 2 threads |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, m in arts.items():
        lines.append(
            f"| {kind} | {m['file_size_bytes'] / 1e6:.2f} MB | {_pct(m['accuracy'])} | "
            f"{_pct(m['balanced_accuracy'])} | {m['macro_auc']:.3f} | {m['group_auc']:.3f} | "
            f"{_pct(m['sensitivity'])} | {_pct(m['specificity'])} | "
            f"{m['latency_ms_1_thread']:.1f} / {m['latency_ms_2_threads']:.1f} ms |"
        )
    if "int8_float_agreement" in ev:
        lines += [
            "",
            f"int8 vs float: top-1 agreement {_pct(ev['int8_float_agreement'])}, "
            f"accuracy difference {100 * ev['int8_minus_float_accuracy']:+.1f} points.",
        ]
    kind = "int8" if "int8" in arts else next(iter(arts))
    lines += ["", f"Per-class recall ({kind}):", "", "| class | recall |", "|---|---|"]
    names = manifest.get("label_names", {})
    for lab, r in arts[kind]["recall"].items():
        lines.append(f"| {lab} ({names.get(lab, lab)}) | {_pct(r)} |")
    lines += ["", *[f"![{p}]({p})" for p in plots], ""]
    lines += [
        "## Training",
        "",
        f"- Backbone {cfg.model.backbone} ({cfg.model.weights} initialisation), input "
        f"{cfg.model.input_size} px; head on cached features {cfg.train.head_epochs} epochs, "
        f"then fine-tuning from `{cfg.train.unfreeze_from}` for up to "
        f"{cfg.train.finetune_epochs} epochs (BatchNorm frozen, early stopping on "
        f"the mean of validation {rule['group']} AUC and accuracy).",
    ]
    if cfg.train.cached_copies:
        lines.append(
            f"- The frozen bottom ran once on {cfg.train.cached_copies} augmented copies of "
            "the training set; the layers from there on trained on those stored activations."
        )
    if cfg.train.int8_copies:
        lines.append(
            f"- {cfg.train.int8_copies} more augmented copies came from the bottom converted to "
            "int8 (calibrated on the export's images), and validation used int8 activations, so "
            "the top learnt from what the int8 model computes as well as from the float one."
        )
    if cfg.train.qat_epochs:
        lines.append(
            f"- Then {cfg.train.qat_epochs} quantisation-aware epochs (int8 activations "
            "simulated, `training/qat.py`) before the int8 export."
        )
    lines += [
        f"- Command: `python -m training train --config {cfg.source}`",
        f"- Time: {extra.get('train_minutes', '?')} min training on a 2-core x86-64 CPU, no GPU.",
        "",
    ]
    edgetpu = extra.get("edgetpu")
    if edgetpu:
        lines += ["## Edge TPU", "", edgetpu, ""]
    targets = cfg.export.targets
    if targets:
        lines += ["## Targets (int8, test split)", "", "| target | required | result | |",
                  "|---|---|---|---|"]
        for name, ok, want, got in target_results(targets, ev):
            lines.append(f"| {name} | {want} | {got} | {'met' if ok else '**missed**'} |")
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
