"""Optional: a teacher ensemble trained where a GPU is at hand, whose predictions become soft
labels for the CPU-trained student (``train.soft_labels``).

Nothing in the kit or in ``python -m training train`` needs this file or a GPU: without soft
labels the student learns from the hard labels alone. It runs with PyTorch, NumPy and Pillow
only (no TensorFlow, no FieldScope imports), on a folder made by
``python -m training teacher-prep`` (train and validation images, the split, the Coral
MobileNetV2 weights in Keras order):

    python training/gpu_teacher.py --data DIR --out DIR [--budget-s 330]

The teacher is the student's own architecture (MobileNetV2, same offline initialisation,
BatchNorm statistics frozen for the reason given in ../shared/README.md) trained with what a
GPU affords and a 2-core CPU does not: a larger input, free rotations and zooms, many epochs,
and five models on five lesion-grouped folds of the training split. Each training image's soft
label comes from the fold model that never saw it (out-of-fold), averaged over flips and the
half turn, so it carries what a model *generalises* to that image, not what it memorised.
Validation images get the five-model mean; the figures on them are reported in
``report.json`` (the test split is never sent).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image
from torch import nn

# (expansion, channels, repeats, first stride): MobileNetV2 with width 1.0, as in Keras.
BLOCKS = [
    (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
]


class ConvBN(nn.Module):
    """Convolution (no bias) + BatchNorm (+ ReLU6); stride-2 convolutions pad as TensorFlow's
    'same' does (the extra pixel right and below), so the transplanted weights see what they
    were made for."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, groups: int = 1, act=True):
        super().__init__()
        self.stride, self.k = stride, k
        pad = 0 if stride == 2 else k // 2
        self.conv = nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)
        self.act = act

    def forward(self, x):
        if self.stride == 2:  # TensorFlow 'same': the odd pixel of padding goes after
            ph = max((-(-x.shape[2] // 2) - 1) * 2 + self.k - x.shape[2], 0)
            pw = max((-(-x.shape[3] // 2) - 1) * 2 + self.k - x.shape[3], 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        x = self.bn(self.conv(x))
        return F.relu6(x) if self.act else x


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        mid = cin * t
        layers = [ConvBN(cin, mid, 1, 1)] if t != 1 else []
        layers += [ConvBN(mid, mid, 3, stride, groups=mid), ConvBN(mid, cout, 1, 1, act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    def __init__(self, n_classes: int, dropout: float = 0.3):
        super().__init__()
        layers = [ConvBN(3, 32, 3, 2), Block(32, 16, 1, 1)]
        cin = 16
        for t, c, n, s in BLOCKS:
            for i in range(n):
                layers.append(Block(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(ConvBN(cin, 1280, 1, 1))
        self.features = nn.Sequential(*layers)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(1280, n_classes)

    def forward(self, x):
        return self.fc(self.drop(self.features(x).mean(dim=(2, 3))))


def load_keras_weights(model: MobileNetV2, path: Path) -> None:
    """init.npz holds conv_i (Keras layout) and bn_i (gamma, beta, mean, variance) in graph
    order, which is the order the ConvBN modules are built in."""
    w = np.load(path)
    units = [m for m in model.modules() if isinstance(m, ConvBN)]
    if sum(k.startswith("conv_") for k in w.files) != len(units):
        raise ValueError(f"{path}: {len(units)} convolutions expected")
    for i, unit in enumerate(units):
        # depthwise [kh, kw, c, 1] → [c, 1, kh, kw]; others [kh, kw, in, out] → [out, in, kh, kw]
        order = (2, 3, 0, 1) if unit.conv.groups > 1 else (3, 2, 0, 1)
        k = np.transpose(w[f"conv_{i}"], order)
        unit.conv.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(k)))
        gamma, beta, mean, var = w[f"bn_{i}"]
        for name, value in zip(("weight", "bias", "running_mean", "running_var"),
                               (gamma, beta, mean, var), strict=True):
            getattr(unit.bn, name).data.copy_(torch.from_numpy(value.astype(np.float32)))


def freeze_bn_stats(model: nn.Module) -> None:
    """BatchNorm uses its transplanted statistics even in training (scale and offset learn)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def read_split(data: Path, labels: list[str]) -> dict[str, dict[str, list]]:
    out: dict[str, dict[str, list]] = {}
    with open(data / "split.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            part = out.setdefault(row["part"], {"id": [], "y": [], "group": []})
            part["id"].append(row["image_id"])
            part["y"].append(labels.index(row["label"]))
            part["group"].append(row["group"])
    return out


def load_images(data: Path, ids: list[str]) -> torch.Tensor:
    from concurrent.futures import ThreadPoolExecutor

    def one(i: str) -> np.ndarray:
        return np.asarray(Image.open(data / "images" / f"{i}.jpg").convert("RGB"))

    with ThreadPoolExecutor(16) as pool:
        arrs = list(pool.map(one, ids))
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()  # N,3,H,W uint8


def augment(x: torch.Tensor, out_hw: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """uint8 N,3,H,W → float in [-1, 1] at ``out_hw``: any rotation, flips, zoom 0.8–1.25,
    shifts up to 10 %, brightness/contrast/saturation ±10 %."""
    n, dev = x.shape[0], x.device
    r = lambda *s: torch.rand(*s, generator=gen, device=dev)  # noqa: E731
    angle = r(n) * 2 * np.pi
    scale = torch.exp((r(n) - 0.5) * 2 * np.log(1.25))
    flip = torch.where(r(n) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    h, w = x.shape[2], x.shape[3]
    aspect = w / h
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin / aspect
    theta[:, 1, 0] = sin * aspect * flip
    theta[:, 1, 1] = cos
    theta[:, :, 2] = (r(n, 2) - 0.5) * 0.2
    grid = F.affine_grid(theta, (n, 3, *out_hw), align_corners=False)
    y = F.grid_sample(x.float() / 255.0, grid, mode="bilinear", padding_mode="reflection",
                      align_corners=False)
    b = 1 + (r(n, 1, 1, 1) - 0.5) * 0.2
    c = 1 + (r(n, 1, 1, 1) - 0.5) * 0.2
    s = 1 + (r(n, 1, 1, 1) - 0.5) * 0.2
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * c + mean
    grey = y.mean(dim=1, keepdim=True)
    y = ((y - grey) * s + grey) * b
    return y.clamp(0, 1) * 2 - 1


def plain(x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    y = F.interpolate(x.float() / 255.0, size=out_hw, mode="bilinear", align_corners=False)
    return y * 2 - 1


def four_views(v: torch.Tensor) -> list[torch.Tensor]:
    """The kit's four shape-keeping test-time views of an N,C,H,W batch, in its order:
    identity, flip_lr (width), flip_ud (height), rot180."""
    return [v, v.flip(3), v.flip(2), v.flip(2).flip(3)]


@torch.no_grad()
def view_logits(model: nn.Module, x: torch.Tensor, out_hw, batch: int = 256) -> torch.Tensor:
    """(N, 4, classes) logits over :func:`four_views`."""
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        views = four_views(plain(x[i : i + batch], out_hw))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=views[0].is_cuda):
            out.append(torch.stack([model(u).float() for u in views], dim=1))
    return torch.cat(out)


def predict(model: nn.Module, x: torch.Tensor, out_hw, batch: int = 256) -> torch.Tensor:
    """Probabilities averaged over the four views (as the kit's TTA)."""
    return F.softmax(view_logits(model, x, out_hw, batch), dim=2).mean(1)


def sampling_probs(y: np.ndarray, n: int, power: float) -> np.ndarray:
    counts = np.bincount(y, minlength=n).astype(float)
    w = np.where(counts > 0, counts**power, 0) / np.maximum(counts, 1)
    p = w[y]
    return p / p.sum()


def adamw_cosine(model: nn.Module, args, steps: int, epochs: int):
    """AdamW at ``args.lr`` (weight decay ``args.wd``): one epoch of linear warm-up, then a
    cosine decay to zero at the last step."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd)
    total, warm = epochs * steps, steps

    def factor(s: int) -> float:  # a Python float: the scheduler's state then loads back
        return min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return opt, sched


def epoch_batches(model: nn.Module, x, probs, steps: int, batch: int, hw, gen):
    """One epoch's batches: the model in training mode with BatchNorm statistics frozen,
    ``steps`` batches drawn with ``probs`` (class sampling), each augmented to ``hw``;
    yields (indices, images)."""
    model.train()
    freeze_bn_stats(model)
    idx = torch.multinomial(probs, steps * batch, replacement=True, generator=gen)
    for s in range(steps):
        b = idx[s * batch : (s + 1) * batch]
        yield b, augment(x[b], hw, gen).contiguous(memory_format=torch.channels_last)


def train_one(x, y, init: Path, n_classes: int, args, epochs: int, seed: int, log) -> nn.Module:
    dev = x.device
    torch.manual_seed(seed)
    model = MobileNetV2(n_classes).to(dev)
    load_keras_weights(model, init)
    model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator(device=dev).manual_seed(seed)
    steps = int(np.ceil(len(y) / args.batch))
    opt, sched = adamw_cosine(model, args, steps, epochs)
    probs = torch.from_numpy(sampling_probs(y, n_classes, args.power)).to(dev)
    yt = torch.from_numpy(y).to(dev)
    for ep in range(epochs):
        t0, loss_sum = time.time(), 0.0
        for b, xb in epoch_batches(model, x, probs, steps, args.batch, args.hw, gen):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=xb.is_cuda):
                loss = F.cross_entropy(model(xb).float(), yt[b], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss)
        log(f"  epoch {ep + 1}/{epochs}: loss {loss_sum / steps:.3f} ({time.time() - t0:.1f} s)")
    return model


def metrics(y: np.ndarray, p: np.ndarray, group: list[int]) -> dict:
    pred = p.argmax(1)
    recall = [float((pred[y == c] == c).mean()) for c in np.unique(y)]
    pos = np.isin(y, group)
    score = p[:, group].sum(1)
    order = np.argsort(score)
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    auc = (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())
    return {"accuracy": float((pred == y).mean()), "balanced_accuracy": float(np.mean(recall)),
            "group_auc": float(auc)}


def group_folds(groups: list[str], k: int, seed: int) -> np.ndarray:
    """Fold number per image; every image of a lesion in the same fold."""
    rng = np.random.default_rng(seed)
    uniq = sorted(set(groups))
    fold_of = dict(zip(uniq, rng.permutation(len(uniq)) % k, strict=True))
    return np.array([fold_of[g] for g in groups])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--hw", type=int, nargs=2, default=[240, 320])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=1e-4)
    ap.add_argument("--power", type=float, default=0.5, help="class sampling ∝ count^power")
    ap.add_argument("--epochs", type=int, default=0, help="0: as many as --budget-s allows")
    ap.add_argument("--budget-s", type=float, default=330, help="training time for all folds")
    ap.add_argument("--max-epochs", type=int, default=40)
    ap.add_argument("--limit", type=int, default=0, help="images per part (a quick check)")
    args = ap.parse_args()
    args.hw = tuple(args.hw)
    args.out.mkdir(parents=True, exist_ok=True)
    logfile = open(args.out / "teacher.log", "a")  # noqa: SIM115

    def log(msg: str) -> None:
        print(msg, flush=True)
        logfile.write(msg + "\n")
        logfile.flush()

    meta = json.loads((args.data / "meta.json").read_text())
    labels, group = meta["labels"], [meta["labels"].index(m) for m in meta["group"]]
    split = read_split(args.data, labels)
    if args.limit:
        split = {p: {k: v[: args.limit] for k, v in d.items()} for p, d in split.items()}
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    log(f"device {dev}; torch {torch.__version__}; input {args.hw}")
    x = {p: load_images(args.data, d["id"]).to(dev) for p, d in split.items()}
    y = {p: np.array(d["y"]) for p, d in split.items()}
    folds = group_folds(split["train"]["group"], args.folds, 0)
    oof = np.zeros((len(y["train"]), len(labels)), np.float32)
    val = np.zeros((len(y["val"]), len(labels)), np.float32)
    epochs = args.epochs
    t_start = time.time()
    report: dict = {"folds": [], "args": {k: str(v) for k, v in vars(args).items()}}
    for f in range(args.folds):
        tr = np.flatnonzero(folds != f)
        ho = np.flatnonzero(folds == f)
        if not epochs:  # time one epoch of the first fold, then fit the budget
            t0 = time.time()
            train_one(x["train"][tr], y["train"][tr], args.data / "init.npz", len(labels),
                      args, 1, 1000, log)
            per = time.time() - t0
            epochs = int(max(3, min(args.max_epochs, args.budget_s / (per * args.folds))))
            log(f"one epoch {per:.1f} s → {epochs} epochs per fold")
        log(f"fold {f + 1}/{args.folds}: {len(tr)} train, {len(ho)} held out")
        model = train_one(x["train"][tr], y["train"][tr], args.data / "init.npz", len(labels),
                          args, epochs, f, log)
        oof[ho] = predict(model, x["train"][ho], args.hw).cpu().numpy()
        pv = predict(model, x["val"], args.hw).cpu().numpy()
        val += pv / args.folds
        m = {
            "held_out": metrics(y["train"][ho], oof[ho], group),
            "val": metrics(y["val"], pv, group),
        }
        report["folds"].append(m)
        log(f"fold {f + 1}: {json.dumps(m)}")
    report["epochs"] = epochs
    report["minutes"] = round((time.time() - t_start) / 60, 1)
    report["out_of_fold_train"] = metrics(y["train"], oof, group)
    report["ensemble_val"] = metrics(y["val"], val, group)
    log(json.dumps(report, indent=1))
    np.savez_compressed(
        args.out / "soft_labels.npz",
        image_id=np.array(split["train"]["id"] + split["val"]["id"]),
        probs=np.concatenate([oof, val]).astype(np.float16),
        labels=np.array(labels),
    )
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
