"""Datasets, splits, metrics and configs: no TensorFlow needed."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from training.config import ConfigError, load_config
from training.datasets import (
    DatasetError,
    Sample,
    check_samples,
    class_weights,
    load_ham10000,
    load_samples,
    split_samples,
)
from training.metrics import confusion, roc_auc, summarise, threshold_for_sensitivity

ROOT = Path(__file__).resolve().parent.parent


def test_ham10000_split_never_puts_a_lesion_in_two_parts(shared):
    samples = load_ham10000(shared / "datasets" / "ham10000")
    assert len(samples) == 8553
    parts = split_samples(samples, seed=7)
    groups = {p: {s.group for s in items} for p, items in parts.items()}
    assert not groups["train"] & groups["val"]
    assert not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    assert sum(len(v) for v in parts.values()) == len(samples)
    # stratified: melanoma share within 1.5 points in every part
    share = {p: np.mean([s.label == "mel" for s in items]) for p, items in parts.items()}
    overall = np.mean([s.label == "mel" for s in samples])
    assert all(abs(v - overall) < 0.015 for v in share.values()), share
    assert abs(len(parts["test"]) / len(samples) - 0.15) < 0.02


def test_split_is_deterministic_from_the_seed(shared):
    samples = load_samples("folders", shared / "datasets" / "all-blood-smear")
    a = split_samples(samples, seed=1)
    b = split_samples(samples, seed=1)
    c = split_samples(samples, seed=2)
    assert [s.path for s in a["test"]] == [s.path for s in b["test"]]
    assert [s.path for s in a["test"]] != [s.path for s in c["test"]]


def test_group_with_many_images_stays_together():
    samples = [
        Sample(Path(f"/x/{g}_{i}.jpg"), "a" if g < 10 else "b", f"L{g}")
        for g in range(20)
        for i in range(1 + g % 4)
    ]
    parts = split_samples(samples, seed=3)
    where = {}
    for p, items in parts.items():
        for s in items:
            assert where.setdefault(s.group, p) == p


def test_bad_datasets_fail_clearly(tmp_path):
    good = tmp_path / "a.jpg"
    good.write_bytes(b"x")
    with pytest.raises(DatasetError, match="1 images are missing"):
        check_samples([Sample(good, "a", "1"), Sample(tmp_path / "nope.jpg", "b", "2")], ["a", "b"])
    with pytest.raises(DatasetError, match=r"labels \['zzz'\] are not in the config"):
        check_samples([Sample(good, "a", "1"), Sample(good, "zzz", "2")], ["a", "b"])
    with pytest.raises(DatasetError, match="only one class"):
        check_samples([Sample(good, "a", "1"), Sample(good, "a", "2")], ["a", "b"])
    with pytest.raises(DatasetError, match="HAM10000_metadata.csv"):
        load_ham10000(tmp_path)
    bad_csv = tmp_path / "d.csv"
    bad_csv.write_text("file,class\nx.jpg,a\n")
    with pytest.raises(DatasetError, match="needs columns path and label"):
        load_samples("csv", bad_csv)


def test_generic_csv_layout(tmp_path):
    (tmp_path / "img").mkdir()
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group"])
        w.writerow(["img/1.jpg", "a", "p1"])
        w.writerow(["img/2.jpg", "b", ""])
    s = load_samples("csv", tmp_path / "d.csv")
    assert s[0] == Sample(tmp_path / "img/1.jpg", "a", "p1")
    assert s[1].group == "img/2.jpg"


def test_class_weights_balance():
    s = [Sample(Path(str(i)), "a", str(i)) for i in range(30)] + [
        Sample(Path(str(i)), "b", str(i)) for i in range(10)
    ]
    w = class_weights(s, ["a", "b"])
    assert w[0] * 30 == pytest.approx(w[1] * 10)
    assert w[1] == pytest.approx(40 / (2 * 10))


def test_auc_matches_hand_computed_case():
    # positives score 0.9, 0.4; negatives 0.5, 0.1: pairs won 3 of 4 → 0.75
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.5, 0.1])) == 0.75
    # a tie between a positive and a negative counts half
    assert roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5


def test_summary_matches_hand_computed_case():
    labels = ["benign", "x", "y"]
    y = np.array([0, 0, 1, 2, 2])
    probs = np.array(
        [
            [0.8, 0.1, 0.1],  # benign, right
            [0.3, 0.6, 0.1],  # benign predicted x: group score 0.7 → flagged at 0.5
            [0.2, 0.7, 0.1],  # x, right
            [0.1, 0.1, 0.8],  # y, right
            [0.6, 0.1, 0.3],  # y predicted benign: group score 0.4 → missed
        ]
    )
    m = summarise(y, probs, labels, [1, 2], threshold=0.5)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["recall"] == {"benign": 0.5, "x": 1.0, "y": 0.5}
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    # group AUC: positives 0.8, 0.9, 0.4 vs negatives 0.2, 0.7 → wins 2+2+1 = 5 of 6
    assert m["group_auc"] == pytest.approx(5 / 6)
    assert confusion(np.array([0, 1]), np.array([1, 1]), 2).tolist() == [[0, 1], [0, 1]]


def test_threshold_reaches_target_sensitivity():
    y = np.array([1] * 10 + [0] * 5)
    s = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.3, 0.5, 0.9])
    t = threshold_for_sensitivity(y, s, 0.9)
    assert t == 0.3 and (s[y == 1] >= t).mean() >= 0.9
    assert threshold_for_sensitivity(y, s, 1.0) == 0.2


def test_shipped_configs_load():
    for name in ("blood-smear", "skin-lesion"):
        cfg = load_config(ROOT / "training" / "configs" / f"{name}.toml")
        assert cfg.name == name and cfg.decision.group in cfg.decision.groups


def test_config_errors_are_clear(tmp_path):
    base = (ROOT / "training/configs/blood-smear.toml").read_text()
    p = tmp_path / "c.toml"
    p.write_text(base.replace('backbone = "mobilenetv2"', 'backbone = "resnet"'))
    with pytest.raises(ConfigError, match="backbone: 'resnet' is not one of"):
        load_config(p)
    p.write_text(base.replace("batch_size = 32", "batch_size = 32\nbatchsize = 1"))
    with pytest.raises(ConfigError, match=r"unknown option\(s\) batchsize"):
        load_config(p)
    p.write_text(base.replace('ALL = ["Early", "Pre", "Pro"]', 'ALL = ["Early", "Blast"]'))
    with pytest.raises(ConfigError, match=r"groups.ALL: \['Blast'\] are not dataset labels"):
        load_config(p)
    p.write_text(base.replace("batch_size = 32", "batch_size = 32\ncached_copies = 99"))
    with pytest.raises(ConfigError, match=r"cached_copies must be between 0 \(off\) and 32"):
        load_config(p)
    p.write_text(base.replace("batch_size = 32", "batch_size = 32\nqat_epochs = 2"))
    with pytest.raises(ConfigError, match="qat_epochs needs cached_copies"):
        load_config(p)
    p.write_text(base.replace("batch_size = 32", "batch_size = 32\nint8_copies = 2"))
    with pytest.raises(ConfigError, match="int8_copies needs cached_copies"):
        load_config(p)
    many = "batch_size = 32\ncached_copies = 2\nint8_copies = 40"
    p.write_text(base.replace("batch_size = 32", many))
    with pytest.raises(ConfigError, match=r"int8_copies must be between 0 \(off\) and 32"):
        load_config(p)
    # A mistyped target would leave the card silent about it: refused, with the file and key.
    for bad in ("acuracy = 0.9", "referred_Blast = 0.9"):
        p.write_text(base.replace("[export.targets]", f"[export.targets]\n{bad}"))
        with pytest.raises(ConfigError, match=rf"c.toml \[export.targets\] '{bad[:-6]}' is "
                                              "not a target"):
            load_config(p)
    p.write_text(base.replace("[export.targets]", "[export.targets]\nreferred_Pro = 0.9"))
    assert load_config(p).export.targets["referred_Pro"] == 0.9


def test_model_card_target_table():
    from training.card import target_results

    ev = {"artifacts": {"int8": {"accuracy": 0.81, "group_auc": 0.90, "sensitivity": 0.95,
                                 "file_size_bytes": 3_000_000}},
          "int8_minus_float_accuracy": -0.02, "int8_float_agreement": 0.99}
    rows = {name: (ok, got) for name, ok, _, got in target_results(
        {"accuracy": 0.80, "group_auc": 0.92, "max_int8_drop": 0.01, "min_agreement": 0.98,
         "max_int8_mb": 4.0}, ev)}
    assert rows["accuracy"] == (True, "0.810")
    assert rows["group AUC"] == (False, "0.900")
    assert rows["int8 accuracy loss vs float"] == (False, "2.0 points")
    assert rows["int8/float agreement"][0] is True
    assert rows["int8 file size"] == (True, "3.00 MB")


def test_model_card_targets_for_tta_and_per_class_recall():
    from training.card import target_results

    base = {"accuracy": 0.80, "balanced_accuracy": 0.70, "group_auc": 0.93,
            "specificity_at_target": 0.78, "recall": {"mel": 0.65}, "file_size_bytes": 3e6,
            "latency_ms_1_thread": 4.0}
    base.update(macro_auc=0.955, specificity=0.74, referred={"mel": 0.89, "nv": 0.2})
    tta = {**base, "accuracy": 0.86, "recall": {"mel": 0.72}, "macro_auc": 0.961,
           "referred": {"mel": 0.91}}
    ev = {"artifacts": {"int8": base}, "tta": {"int8": tta}}
    targets = {"accuracy": 0.85, "recall_mel": 0.70, "max_latency_ms": 15, "macro_auc": 0.96,
               "specificity": 0.75, "referred_mel": 0.90}
    plain = {n: (ok, got) for n, ok, _, got in target_results(targets, ev)}
    with_tta = {n: (ok, got) for n, ok, _, got in target_results(targets, ev, "int8+tta")}
    assert plain["accuracy"] == (False, "0.800") and with_tta["accuracy"] == (True, "0.860")
    assert plain["mel recall"][0] is False and with_tta["mel recall"] == (True, "0.720")
    assert plain["macro AUC"] == (False, "0.955") and with_tta["macro AUC"] == (True, "0.961")
    assert plain["specificity of the shipped threshold"] == (False, "0.740")
    assert plain["mel referred"] == (False, "0.890")
    assert with_tta["mel referred"] == (True, "0.910")
    assert with_tta["CPU invoke, 1 thread"] == (True, "4.0 ms")


def test_logit_adjustment_is_tuned_for_accuracy_and_balanced_accuracy():
    """A model that under-predicts a rare class: the tuned bias gives it its share back, and
    applying that bias is what the edge does (class_bias added to the logits)."""
    import numpy as np

    from edge.inference import postprocess as pp
    from training.metrics import adjust, balanced_accuracy, tune_logit_adjustment

    rng = np.random.default_rng(0)
    y = np.array([0] * 900 + [1] * 100)
    logits = rng.normal(0, 1, (1000, 2))
    logits[:, 0] += 2.5  # every image leans to the common class
    logits[y == 1, 1] += 3.0  # the rare class is separable, but its scores are too low
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    tau, bias, table = tune_logit_adjustment(probs, y, np.array([0.9, 0.1]))
    assert tau > 0 and bias[1] > bias[0]
    before = balanced_accuracy(y, probs.argmax(1))
    after = balanced_accuracy(y, adjust(probs, bias).argmax(1))
    assert after > before + 0.02
    best = max(table, key=lambda r: r["score"])
    assert best["tau"] == tau
    edge = np.array([pp.to_probabilities(row, "logits", bias) for row in np.log(probs)])
    np.testing.assert_allclose(edge, adjust(probs, bias), atol=1e-5)


def test_a_bootstrap_threshold_is_a_lower_bound_and_reproducible():
    """The lesion-level bootstrap keeps the target sensitivity in 95 % of resamples: its
    threshold is at or below the split's own, and the same predictions give the same value."""
    import numpy as np

    from training.metrics import (
        sensitivity_interval,
        threshold_for_sensitivity,
        threshold_with_bound,
    )

    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(300), 2)  # two images a lesion
    y = np.repeat(rng.random(300) < 0.2, 2)
    score = np.clip(rng.normal(0.25 + 0.4 * y, 0.15), 0, 1)
    point = threshold_for_sensitivity(y, score, 0.9)
    bound, resampled = threshold_with_bound(y, score, groups, 0.9, n_boot=500, seed=7)
    assert bound <= point
    assert (resampled >= bound).mean() >= 0.95 - 1e-9  # ≥ target in 95 % of resamples
    assert threshold_with_bound(y, score, groups, 0.9, n_boot=500, seed=7)[0] == bound
    sens, lo, hi = sensitivity_interval(y, score, groups, bound)
    assert lo <= sens <= hi and sens >= 0.9


def test_a_shipped_threshold_never_passes_above_the_scores_it_was_chosen_at():
    """int8 softmax scores come in steps of 1/256: 190/256 = 0.7421875 rounded to the nearest
    four decimals is 0.7422, which would stop flagging every image that scored exactly that."""
    import numpy as np

    from training.threshold import rates, shipped

    steps = np.arange(257) / 256
    kept = np.array([shipped(t) for t in steps])
    assert (kept <= steps).all() and (steps - kept < 1e-4).all()
    assert shipped(0.7421875) == 0.7421
    positive = np.ones(3, dtype=bool)
    assert rates(positive, np.full(3, 0.7421875), shipped(0.7421875))["sensitivity"] == 1.0


def test_the_shipped_thresholds_recompute_from_the_scores_each_bundle_keeps():
    """Each shipped bundle keeps the validation scores its referral thresholds were chosen on:
    the thresholds recomputed from that file alone, by the manifest's own method, are the
    shipped ones, and so are the sensitivity and specificity the manifest reports."""
    import json

    from training.threshold import recompute, shipped

    for name in ("blood-smear", "skin-lesion"):
        bundle = ROOT / "models" / name
        decision = json.loads((bundle / "manifest.json").read_text())["decision"]
        got = recompute(bundle, decision)
        assert shipped(got["threshold"]) == decision["threshold"], name
        assert got["sensitivity"] == decision["chosen_on"]["sensitivity"], name
        assert got["sensitivity"] >= decision["target_sensitivity"], name
        if "tta_threshold" in decision:
            assert shipped(got["tta_threshold"]) == decision["tta_threshold"], name
            assert got["tta_specificity"] == decision["chosen_on"]["tta_specificity"], name


def test_every_target_the_config_accepts_has_a_row_in_the_card():
    """config.TARGETS (what a config may ask for) and the card's table (what it reports) are
    kept apart: a key accepted there but not rendered here would vanish from the card."""
    from training.card import target_results
    from training.config import TARGETS

    metrics = {"accuracy": 0.9, "balanced_accuracy": 0.9, "macro_auc": 0.9, "group_auc": 0.9,
               "sensitivity": 0.9, "specificity": 0.9, "specificity_at_target": 0.9,
               "recall": {"mel": 0.9}, "referred": {"mel": 0.9}, "file_size_bytes": 3e6,
               "latency_ms_1_thread": 4.0}
    ev = {"artifacts": {"int8": metrics}, "int8_minus_float_accuracy": 0.0,
          "int8_float_agreement": 1.0}
    for key in (*TARGETS, "recall_mel", "referred_mel"):
        assert len(target_results({key: 0.5}, ev)) == 1, key


class _Stream:
    """A standard error that says whether it is a terminal and keeps what is written."""

    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bars_redraw_rarely_into_a_log_file(monkeypatch, tty):
    from training.progress import LOG_INTERVAL, bar

    err = _Stream(tty)
    # The bar's own stream decides, whatever standard error is (None under pythonw, say).
    monkeypatch.setattr("sys.stderr", None)
    clock = iter(range(0, 10_000, 2))  # each step takes 2 s
    monkeypatch.setattr("tqdm.std.time", lambda: float(next(clock)))
    progress = bar(range(50), desc="decode", file=err)
    # tqdm's monitor thread redraws a bar silent for maxinterval: that clock is slowed too.
    assert (progress.maxinterval >= LOG_INTERVAL) is not tty
    for _ in progress:
        pass
    redraws = err.text.count("\r")
    # 100 s of work: redrawn about every step on a terminal, once or twice into a file.
    assert redraws > 40 if tty else redraws <= 4, redraws
