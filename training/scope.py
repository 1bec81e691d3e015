"""The scope check and activation maps of a bundle: feature outputs added to the int8 model,
the scope model fitted on the training split, its threshold chosen on validation, and the
report on images that are not for the model (``python -m training scope``).

The int8 model gains outputs, nothing else: its class output stays bit-identical (same ops,
same tensors), so the bundle's classification figures do not change. The kit computes the
scope score and the maps from those outputs (``edge/inference/scope.py``); the features here
come through the kit's own classifier, so training fits exactly what the kit will compute.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edge.inference.bundle import load_bundle, write_bundle
from edge.inference.classifier import Classifier
from edge.inference.scope import load_scope, pooled, save_scope

from .config import Config
from .scope_sets import Image, out_of_scope_sets

log = logging.getLogger(__name__)
MARK_START, MARK_END = "<!-- scope check -->", "<!-- /scope check -->"
MAX_DIMS = 256  # PCA components kept per tap: the live frame's cost grows with them


# -- the model file --------------------------------------------------------------------------
def _layer_pattern(layer: str) -> re.Pattern:
    return re.compile(rf"/{re.escape(layer)}(_\d+)?/")


def add_taps(src: Path, dst: Path, layers: list[str]) -> list[tuple[int, int, int]]:
    """Write ``src`` with the output of each named layer added as an extra model output;
    returns their (H, W, C) shapes. An output already there is not added twice."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils as fu

    model = fu.read_model(str(src))
    graph = model.subgraphs[0]
    outputs = [int(i) for i in graph.outputs]
    shapes = []
    for layer in layers:
        pattern = _layer_pattern(layer)
        hits = []
        for op in graph.operators:
            for t in op.outputs:
                name = graph.tensors[t].name.decode().split(";")[0]
                if pattern.search(name) and len(graph.tensors[t].shape) == 4:
                    hits.append(int(t))
        if not hits:
            raise ValueError(f"{src.name}: no 4-D tensor of layer {layer!r} (scope_layers)")
        tensor = hits[-1]  # the layer's final output (after its activation)
        shapes.append(tuple(int(d) for d in graph.tensors[tensor].shape[1:]))
        if tensor not in outputs:
            outputs.append(tensor)
            for sig in model.signatureDefs or []:
                entry = schema.TensorMapT()
                entry.name = f"tap_{layer}".encode()
                entry.tensorIndex = tensor
                sig.outputs = [*sig.outputs, entry]
    graph.outputs = np.asarray(outputs, dtype=np.int32)
    fu.write_model(model, str(dst))
    return shapes


def head_layers(path: Path) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """The dense layers after the last MEAN (global pooling), dequantised: [(W (in, out), b,
    relu)]. The activation map uses them exactly as the int8 model holds them."""
    from tensorflow.lite.tools import flatbuffer_utils as fu

    model = fu.read_model(str(path))
    graph = model.subgraphs[0]
    names = [fu.opcode_to_name(model, op.opcodeIndex) for op in graph.operators]
    last_mean = max(i for i, n in enumerate(names) if n == "MEAN")

    def const(t: int, dtype) -> tuple[np.ndarray, np.ndarray]:
        tensor = graph.tensors[t]
        raw = np.frombuffer(bytes(model.buffers[tensor.buffer].data), dtype=dtype)
        q = tensor.quantization
        scale = np.asarray(q.scale if q is not None and q.scale is not None else [1.0])
        zero = np.asarray(q.zeroPoint if q is not None and q.zeroPoint is not None else [0])
        return raw.reshape(tuple(tensor.shape)), (scale, zero)

    layers = []
    for i in range(last_mean + 1, len(names)):
        if names[i] != "FULLY_CONNECTED":
            continue
        op = graph.operators[i]
        w, (ws, wz) = const(int(op.inputs[1]), np.int8)
        wf = (w.astype(np.float64) - wz.reshape(-1, 1)) * ws.reshape(-1, 1)  # per out channel
        if len(op.inputs) > 2 and int(op.inputs[2]) >= 0:
            b, (bs, _) = const(int(op.inputs[2]), np.int32)
            bf = b.astype(np.float64) * bs
        else:  # the converter leaves out a bias that is all zeros
            bf = np.zeros(wf.shape[0])
        relu = op.builtinOptions is not None and op.builtinOptions.fusedActivationFunction == 1
        layers.append((wf.T, bf, bool(relu)))
    if not layers:
        raise ValueError(f"{path.name}: no dense layer after the global pooling")
    return layers


# -- fitting ---------------------------------------------------------------------------------
def _features(clf: Classifier, images: list[Image], desc: str) -> list[np.ndarray]:
    """Per tap, the (n, D) scope features of ``images`` through the kit's classifier."""
    from .progress import bar

    per_tap: list[list[np.ndarray]] = []
    for img in bar(images, desc=desc, unit="img", mininterval=2):
        small, _ = clf.prepare(img.load())
        maps = clf.feature_maps(small)
        if not per_tap:
            per_tap = [[] for _ in maps]
        for acc, m in zip(per_tap, maps, strict=True):
            acc.append(pooled(m))
    return [np.asarray(acc, dtype=np.float64) for acc in per_tap]


def _fit_tap(x: np.ndarray, y: np.ndarray, ridge: float = 1e-2) -> dict[str, np.ndarray]:
    """PCA to at most MAX_DIMS, class means, shared covariance (ridge-shrunk), whitening."""
    mean = x.mean(axis=0)
    xc = x - mean
    k = min(MAX_DIMS, x.shape[1], x.shape[0] - 1)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    pca = vt[:k].T
    z = xc @ pca
    classes = np.unique(y)
    centres = np.stack([z[y == c].mean(axis=0) for c in classes])
    resid = z - centres[np.searchsorted(classes, y)]
    cov = resid.T @ resid / len(resid)
    cov += ridge * np.trace(cov) / k * np.eye(k)
    white = np.linalg.cholesky(np.linalg.inv(cov))
    return {"mean": mean, "project": pca @ white, "centres": centres @ white}


def _distance(tap: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    z = (x - tap["mean"]) @ tap["project"]
    return ((z[:, None, :] - tap["centres"][None]) ** 2).sum(-1).min(axis=1)


def fit_scope(
    train: list[np.ndarray], y: np.ndarray, val: list[np.ndarray], acceptance: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The scope model's arrays and the validation scores it was thresholded on."""
    arrays: dict[str, np.ndarray] = {"n_taps": np.int64(len(train))}
    val_scores = []
    for i, (xt, xv) in enumerate(zip(train, val, strict=True)):
        tap = _fit_tap(xt, y)
        dv = _distance(tap, xv)
        median, spread = float(np.median(dv)), float(dv.std())
        for key, value in tap.items():
            arrays[f"tap{i}_{key}"] = value.astype(np.float32)
        arrays[f"tap{i}_stats"] = np.asarray([median, spread])
        val_scores.append((dv - median) / spread)
    combined = np.max(val_scores, axis=0)
    arrays["threshold"] = np.float64(np.quantile(combined, acceptance))
    arrays["acceptance"] = np.float64(acceptance)
    return arrays, combined


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(an out-of-scope score exceeds an in-scope one), ties counted half."""
    both = np.concatenate([inside, outside])
    ranks = np.argsort(np.argsort(both, kind="stable"), kind="stable").astype(np.float64) + 1
    for v in np.unique(both):  # average ranks of ties
        sel = both == v
        if sel.sum() > 1:
            ranks[sel] = ranks[sel].mean()
    r_out = ranks[len(inside) :].sum()
    n_in, n_out = len(inside), len(outside)
    return float((r_out - n_out * (n_out + 1) / 2) / (n_in * n_out))


def _rates(inside: np.ndarray, outside: np.ndarray, threshold: float) -> dict[str, float]:
    at95 = np.quantile(inside, 0.95)
    return {
        "n": int(len(outside)),
        "rejected": float((outside > threshold).mean()),
        "auroc": _auroc(inside, outside),
        "tnr_at_95_tpr": float((outside > at95).mean()),
    }


def _scores(model, feats: list[np.ndarray]) -> np.ndarray:
    return np.max(
        [[t.distance(f) for f in fs] for t, fs in zip(model.taps, feats, strict=True)], axis=0
    )


# -- the whole step --------------------------------------------------------------------------
def add_scope(bundle_dir: Path, cfg: Config, parts: dict) -> dict:
    """Give the bundle at ``bundle_dir`` feature outputs, a fitted scope file and a card
    section; returns the report. Runs in place (the bundle is rewritten atomically per file)."""
    bundle = load_bundle(bundle_dir)
    art = bundle.artifacts.get("int8")
    if art is None:
        raise ValueError(f"{bundle_dir}: the scope check needs an int8 artifact")
    exp = cfg.export
    with tempfile.TemporaryDirectory() as tmp:
        tapped = Path(tmp) / art.path.name
        shapes = add_taps(art.path, tapped, exp.scope_layers)
        shutil.copyfile(tapped, art.path)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest.pop("scope", None)
    manifest["version"] = cfg.version
    files = {kind: a.path for kind, a in bundle.artifacts.items() if kind != "edgetpu"}
    write_bundle(bundle_dir, manifest, files)  # new digests, no scope yet
    clf = Classifier(load_bundle(bundle_dir), backend="cpu", threads=2)
    if len(clf.backend.tap_details) != len(shapes):
        raise ValueError(f"{art.path.name}: expected {len(shapes)} feature outputs")
    labels = cfg.dataset.labels
    y = np.asarray([labels.index(s.label) for s in parts["train"]])
    train = _features(clf, [Image.of(s.path) for s in parts["train"]], "scope: train")
    val = _features(clf, [Image.of(s.path) for s in parts["val"]], "scope: val")
    arrays, _ = fit_scope(train, y, val, exp.scope_acceptance)
    for i, shape in enumerate(shapes):
        arrays[f"tap{i}_shape"] = np.asarray(shape, dtype=np.int64)
    head = head_layers(art.path)
    arrays["n_dense"] = np.int64(len(head))
    for j, (w, b, relu) in enumerate(head):
        arrays[f"dense{j}_w"], arrays[f"dense{j}_b"] = w.astype(np.float32), b.astype(np.float32)
        arrays[f"dense{j}_relu"] = np.bool_(relu)
    # The head pools the last feature map: the tap whose channels it takes.
    cam = [i for i, s in enumerate(shapes) if s[2] == head[0][0].shape[0]]
    arrays["cam_tap"] = np.int64(cam[-1] if cam else 0)
    scope_file = bundle_dir / "scope.npz"
    save_scope(scope_file, arrays)
    model = load_scope(scope_file, str(bundle_dir))
    report = evaluate_scope(model, clf, cfg, parts, bundle_dir)
    manifest["scope"] = {
        "file": scope_file.name,
        "sha256": "0" * 64,  # filled by write_bundle
        "out_of_scope": cfg.decision.out_of_scope,
        "nothing_in_view": cfg.decision.nothing_in_view,
        "evaluation": report,
    }
    write_bundle(bundle_dir, manifest, files)
    write_card_section(bundle_dir, report, cfg)
    load_bundle(bundle_dir)
    clf.close()
    return report


def evaluate_scope(model, clf: Classifier, cfg: Config, parts: dict, bundle_dir: Path) -> dict:
    """In-scope rejection on the test split and, per out-of-scope set, the share rejected at
    the shipped threshold, AUROC and the true-negative rate at 95 % in-scope acceptance."""
    test = _features(clf, [Image.of(s.path) for s in parts["test"]], "scope: test")
    inside = _scores(model, test)
    report: dict = {
        "method": "Mahalanobis distance to the nearest class mean (shared covariance, PCA ≤ "
        f"{MAX_DIMS}) on the mean and spread of {', '.join(cfg.export.scope_layers)}, "
        "largest standardised distance",
        "layers": list(cfg.export.scope_layers),
        "threshold": model.threshold,
        "acceptance_on_validation": model.acceptance,
        "in_scope_test": {
            "n": int(len(inside)),
            "rejected": float((inside > model.threshold).mean()),
        },
        "sets": {},
    }
    examples = {}
    for name, (what, images) in out_of_scope_sets(cfg, parts).items():
        scores = _scores(model, _features(clf, images, f"scope: {name}"))
        report["sets"][name] = {"what": what, **_rates(inside, scores, model.threshold)}
        examples[name] = (images[:: max(1, len(images) // 4)][:4], scores)
    _example_sheet(bundle_dir / "scope_examples.png", examples, model.threshold)
    return report


def _example_sheet(path: Path, examples: dict, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(examples)
    fig, axes = plt.subplots(rows, 4, figsize=(8, 2.0 * rows), squeeze=False)
    for r, (name, (images, scores)) in enumerate(examples.items()):
        step = max(1, len(scores) // 4)
        for c in range(4):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(images[c].load_array())
                s = scores[c * step]
                ax.set_title(f"{name}\n{s:.1f} {'out' if s > threshold else 'IN'}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_card_section(bundle_dir: Path, report: dict, cfg: Config) -> None:
    """Put the scope check's section into CARD.md (replacing an earlier one)."""
    card = bundle_dir / "CARD.md"
    text = card.read_text() if card.is_file() else f"# {cfg.name}\n"
    pat = re.compile(re.escape(MARK_START) + ".*?" + re.escape(MARK_END), re.S)
    text = pat.sub("", text).rstrip() + "\n\n" + render_section(report, cfg) + "\n"
    card.write_text(text)


def render_section(report: dict, cfg: Config) -> str:
    rej = report["in_scope_test"]
    lines = [
        MARK_START,
        "## Scope check and where the model looked",
        "",
        f'Images that are not for this model get **"{cfg.decision.out_of_scope}"**: neither '
        "positive nor negative, never flagged, left out of sample counts and every export. "
        f"Method: {report['method']}; threshold {report['threshold']:.2f}, chosen on the "
        f"validation split to keep {100 * report['acceptance_on_validation']:.0f} % of in-scope "
        "images. Fitted on the training split only; no out-of-scope image was used to fit it "
        "or to choose the threshold, so every row below is a fresh set.",
        "",
        f"In-scope test images rejected: **{100 * rej['rejected']:.1f} %** of {rej['n']}.",
        "",
        "| out-of-scope set | images | rejected at the shipped threshold | AUROC | TNR at 95 % "
        "TPR |",
        "|---|---|---|---|---|",
    ]
    for name, r in report["sets"].items():
        lines.append(
            f"| {name}: {r['what']} | {r['n']} | {100 * r['rejected']:.1f} % | "
            f"{r['auroc']:.3f} | {100 * r['tnr_at_95_tpr']:.1f} % |"
        )
    lines += [
        "",
        "![examples of each set, with their scores](scope_examples.png)",
        "",
        "Where the model looked: each capture and upload stores a class activation map for the "
        "top class and for the decision group (the head's dense layers linearised at the "
        "pooled features, so the map averages to the logit less its bias), shown as an "
        "overlay on the result and sample pages and in the printed report. It is coarse (one "
        "cell per 32 "
        "pixels of the model input) and shows evidence, not a segmentation.",
        "",
        "Limits: a new camera, stain or dermatoscope can move in-scope images past the "
        "threshold: check the in-scope rejection on a clinic's own images before relying on it."
        + (
            " The near-scope set is cut from the borders of dermoscopy images and enlarged, so "
            "part of what sets it apart is the enlargement; healthy skin under a dermatoscope at "
            "full resolution is untested."
            if "healthy skin" in report["sets"]
            else ""
        ),
        MARK_END,
    ]
    return "\n".join(lines)
