"""The training pipeline end to end on a few dozen real images (tiny CNN, one epoch each)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require_module

require_module("tensorflow", "training needs the train extra (installed in CI)")

from edge.inference.bundle import load_bundle  # noqa: E402
from edge.inference.classifier import Classifier  # noqa: E402
from training.config import load_config  # noqa: E402
from training.edgetpu import parse_compiler_log, preflight  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "model.backbone": "small_cnn",
    "model.weights": "none",
    "model.input_size": 48,
    "model.dense": 16,
    "dataset.limit_per_class": 12,
    "train.head_epochs": 1,
    "train.finetune_epochs": 1,
    "train.batch_size": 8,
    # The whole-network phase keeps a moving average of the weights, validated and exported.
    "train.ema_momentum": 0.9,
    "export.representative_images": 16,
    # The small CNN's middle and last feature maps: the scope step runs as in a real build.
    "export.scope_layers": ["relu1", "relu2"],
}


# The moving-average callbacks the tiny run made: (phase, callback).
AVERAGES: list = []


@pytest.fixture(scope="module")
def tiny_run(shared, tmp_path_factory):
    import training.resume as resume
    from training.build import build_bundle
    from training.train import train

    cfg = load_config(ROOT / "training/configs/blood-smear.toml", TINY)
    work = tmp_path_factory.mktemp("train")
    run_dir, out = work / "run", work / "bundle"
    real = resume.averaged_weights

    def averaged_weights(run_dir, phase):
        AVERAGES.append((phase, real(run_dir, phase)))
        return AVERAGES[-1][1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("training.resume.averaged_weights", averaged_weights)
        train(cfg, run_dir)
    ev = build_bundle(cfg, run_dir, out, keep_float=True, samples_per_class=1)
    return cfg, run_dir, out, ev


def test_the_whole_network_phase_is_validated_and_kept_on_its_moving_average(tiny_run):
    cfg, run_dir, out, ev = tiny_run
    assert [phase for phase, _ in AVERAGES] == ["finetune"]
    # Keras ran it: after the last epoch the average is in the model, as validated and saved.
    assert AVERAGES[0][1]._ema_weights_in_model
    import keras

    assert keras.models.load_model(run_dir / "model.keras").optimizer.use_ema
    assert "moving average of the weights, momentum 0.9" in (out / "CARD.md").read_text()


def test_pipeline_writes_a_valid_bundle(tiny_run):
    cfg, run_dir, out, ev = tiny_run
    bundle = load_bundle(out)
    assert set(bundle.artifacts) == {"float", "int8"}
    m = bundle.manifest
    assert m["labels"] == ["Benign", "Early", "Pre", "Pro"]
    assert m["decision"]["group"] == "ALL" and 0 <= m["decision"]["threshold"] <= 1
    assert m["artifacts"]["int8"]["metrics"]["n"] == ev["n"] > 0
    assert (out / "CARD.md").read_text().startswith("# Model card: blood-smear")
    for png in ("roc.png", "confusion.png", "training.png"):
        assert (out / png).stat().st_size > 1000
    assert len(list((out / "samples").glob("*.jpg"))) == 4
    assert "Aria M." in (out / "samples" / "ATTRIBUTION.md").read_text()
    assert (run_dir / "split.csv").is_file() and (run_dir / "history.csv").is_file()
    # Trained bundles get their scope check: fitted, thresholded, reported in the card.
    assert bundle.scope is not None and len(bundle.scope.taps) == 2
    report = m["scope"]["evaluation"]
    assert report["in_scope_test"]["n"] == ev["n"] and "synthetic" in report["sets"]
    assert "Scope check" in (out / "CARD.md").read_text()


def test_int8_runs_in_the_edge_runtime_and_agrees_with_float(tiny_run):
    _, _, out, ev = tiny_run
    bundle = load_bundle(out)
    clf = Classifier(bundle, backend="cpu")
    assert clf.backend.artifact.kind == "int8" and clf.backend.input_dtype == np.uint8
    sample = next((out / "samples").glob("*.jpg"))
    r = clf.classify(str(sample))
    assert r.label in bundle.labels and abs(sum(r.probabilities.values()) - 1) < 0.05
    # a one-epoch model is nearly uniform, so compare probabilities rather than argmax
    from training.datasets import read_split
    from training.evaluate import predict

    test = read_split(tiny_run[1] / "split.csv")["test"]
    p_int8, _ = predict(bundle, "int8", test)
    p_float, _ = predict(bundle, "float", test)
    assert np.abs(p_int8 - p_float).mean() < 0.02
    assert np.abs(p_int8 - p_float).max() < 0.08
    # (top-1 agreement is checked on a decisive model below: this one is nearly uniform)
    assert preflight(bundle.artifacts["int8"].path)  # every op reported
    assert all(
        r.ok
        for r in preflight(bundle.artifacts["int8"].path)
        if r.op not in ("QUANTIZE", "DEQUANTIZE")
    )


def test_logits_bundle_ends_before_the_softmax_and_classifies_the_same(tiny_run, tmp_path):
    import keras

    from training.build import build_bundle
    from training.datasets import read_split
    from training.evaluate import predict
    from training.export import logits_model, ops_of

    cfg, run_dir, out, _ = tiny_run
    model = keras.models.load_model(run_dir / "model.keras")
    x = np.random.default_rng(0).uniform(-1, 1, (4, *model.input_shape[1:])).astype(np.float32)
    logits = logits_model(model).predict(x, verbose=0)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.softmax(logits)),
        model.predict(x, verbose=0),
        atol=1e-5,
    )

    cfg = load_config(
        ROOT / "training/configs/blood-smear.toml", {**TINY, "export.output": "logits"}
    )
    logits_out = tmp_path / "bundle"
    build_bundle(cfg, run_dir, logits_out, keep_float=True)
    bundle = load_bundle(logits_out)
    assert bundle.manifest["output"] == "logits"
    assert ops_of(bundle.artifacts["int8"].path)[-2]["op"] == "FULLY_CONNECTED"  # then QUANTIZE
    test = read_split(run_dir / "split.csv")["test"]
    p_logits, _ = predict(bundle, "int8", test)
    p_probs, _ = predict(load_bundle(out), "int8", test)
    np.testing.assert_allclose(p_logits.sum(axis=1), 1.0, atol=1e-4)  # softmax applied on the Pi
    assert np.abs(p_logits - p_probs).mean() < 0.02


def test_a_lesion_bound_threshold_is_chosen_recorded_and_reported(
        tiny_run, tmp_path):
    """decision.threshold_method = "lesion_bound": the threshold is the lower bound over
    resampled validation groups, the manifest says how it was chosen, and the card gives the
    test sensitivity with its interval."""
    from training.build import build_bundle

    cfg, run_dir, out, _ = tiny_run
    cfg = load_config(ROOT / "training/configs/blood-smear.toml",
                      {**TINY, "decision.threshold_method": "lesion_bound"})
    bound_out = tmp_path / "bundle"
    build_bundle(cfg, run_dir, bound_out, keep_float=False)
    plain, bound = load_bundle(out).decision, load_bundle(bound_out).decision
    assert bound["threshold_method"] == "lesion_bound" and bound["threshold_confidence"] == 0.95
    assert plain["threshold_method"] == "validation"
    from training.datasets import read_split
    from training.evaluate import choose_threshold
    from training.threshold import shipped

    val = read_split(run_dir / "split.csv")["val"]
    again = choose_threshold(load_bundle(bound_out), val, cfg.decision.target_sensitivity,
                             "int8", method="lesion_bound")
    assert bound["threshold"] == shipped(again)
    # The test sensitivity's lesion-bootstrap interval is recorded with the artifact's metrics.
    metrics = load_bundle(bound_out).manifest["artifacts"]["int8"]["metrics"]
    lo, hi = metrics["sensitivity_ci95"]
    assert 0 <= lo <= hi <= 1
    card = (bound_out / "CARD.md").read_text()
    assert "holds on new lesions" in card and "95 % interval" in card


def _threshold_cli(bundle: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", "threshold", "--model", str(bundle),
                           *extra], capture_output=True, text=True, cwd=ROOT)


def test_a_bundle_keeps_the_scores_its_thresholds_were_chosen_on(tiny_run, tmp_path):
    """With test-time views and the lesion bound: the bundle keeps each validation image's
    group score (one view and every view); recomputed from that file alone
    (`python -m training threshold`) both thresholds are the shipped ones, and the rates the
    manifest reports are what they reach there. An altered file, a shipped threshold the file
    does not give, and scores written afresh for a bundle without them (`--config`) are each
    handled as they should be."""
    from training.build import build_bundle
    from training.threshold import SCORES_FILE, rates, read_scores

    _, run_dir, _, _ = tiny_run
    over = {**TINY, "decision.threshold_method": "lesion_bound",
            "export.tta": ["identity", "flip_lr"]}
    cfg = load_config(ROOT / "training/configs/blood-smear.toml", over)
    out = tmp_path / "bundle"
    build_bundle(cfg, run_dir, out, keep_float=False)
    rule = load_bundle(out).decision
    record = rule["chosen_on"]
    scores = read_scores(out / SCORES_FILE)
    assert scores.tta is not None and not np.array_equal(scores.tta, scores.score)
    assert record["n"] == len(scores.image) and record["bootstrap"] == {"n_boot": 2000, "seed": 0}
    assert record["sensitivity"] == rates(scores.positive, scores.score, rule["threshold"])[
        "sensitivity"] >= cfg.decision.target_sensitivity
    assert record["tta_sensitivity"] == rates(scores.positive, scores.tta,
                                              rule["tta_threshold"])["sensitivity"]
    assert "threshold_scores.csv" in (out / "CARD.md").read_text()
    proc = _threshold_cli(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("(the same)") == 2

    # A shipped threshold the stored scores do not give is reported, with a failing status.
    manifest = json.loads((out / "manifest.json").read_text())
    nudged = json.loads(json.dumps(manifest))
    nudged["decision"]["tta_threshold"] = round(rule["tta_threshold"] + 1e-4, 4)
    (out / "manifest.json").write_text(json.dumps(nudged))
    proc = _threshold_cli(out)
    assert proc.returncode == 1 and "DIFFERENT" in proc.stdout
    # `--config` on a bundle built before the scores were kept writes them only when they give
    # its thresholds back: here they do not (the nudged one), so nothing is written ...
    del nudged["decision"]["chosen_on"]
    (out / "manifest.json").write_text(json.dumps(nudged))
    (out / SCORES_FILE).unlink()
    sets = [f"{k}={json.dumps(v)}" for k, v in over.items()]
    args = ["--config", str(ROOT / "training/configs/blood-smear.toml")]
    args += [a for kv in sets for a in ("--set", kv)]
    proc = _threshold_cli(out, *args)
    assert proc.returncode == 1 and "nothing written" in proc.stderr
    assert not (out / SCORES_FILE).exists()
    assert "chosen_on" not in json.loads((out / "manifest.json").read_text())["decision"]
    # ... and with the thresholds as built, it writes the same scores the build kept.
    del manifest["decision"]["chosen_on"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    proc = _threshold_cli(out, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((out / "manifest.json").read_text())["decision"]["chosen_on"] == record
    # An altered file is refused by its digest.
    (out / SCORES_FILE).write_text((out / SCORES_FILE).read_text().replace(",1,", ",0,", 1))
    proc = _threshold_cli(out)
    assert proc.returncode == 2 and "digest differs" in proc.stderr


def test_an_ensemble_bundle_is_built_thresholded_evaluated_and_carded(tiny_run, tmp_path):
    """`python -m training ensemble`: the first bundle plus another's int8 model as a member
    (here the same model again: the ensemble's answers must then equal the model's)."""
    from training.datasets import read_split
    from training.ensemble import build_ensemble

    cfg, run_dir, out, _ = tiny_run
    parts = read_split(run_dir / "split.csv")
    ens = tmp_path / "ensemble"
    ev = build_ensemble(cfg, out, [out], ens, parts, "9.9.9-ensemble")
    bundle = load_bundle(ens)
    assert len(bundle.members) == 1 and bundle.version == "9.9.9-ensemble"
    assert Classifier(bundle, backend="cpu", threads=1).members == 2
    alone, both = list(ev["rows"].values())
    assert both["accuracy"] == pytest.approx(alone["accuracy"])
    assert both["group_auc"] == pytest.approx(alone["group_auc"], abs=1e-6)
    assert set(ev["capture_latency_ms"]) == {1, 2}
    card = (ens / "CARD.md").read_text()
    assert "## Ensemble" in card and "ensemble (shipped decision)" in card
    # The config's targets, answered by the ensemble's row (the blood config asks accuracy and
    # sensitivity of it).
    both_acc = f"{both['accuracy']:.3f}"
    assert "as a capture classifies (the ensemble's row)" in card
    assert card.startswith("# Model card: blood-smear 9.9.9-ensemble (an ensemble; the first "
                           "model is blood-smear ")
    assert f"| accuracy | ≥ {cfg.export.targets['accuracy']:.2f} | {both_acc} " in card
    # Its thresholds were chosen on the ensemble's own validation scores, kept in the bundle.
    from training.threshold import compare, recompute

    rows = compare(recompute(ens, bundle.decision), bundle.decision)
    # Both: the live stream's (the first model, one view) and the captures' (every member).
    assert [key for key, *_ in rows] == ["threshold", "tta_threshold"]
    assert all(same for *_, same in rows)
    assert bundle.decision["threshold"] == load_bundle(out).decision["threshold"]


def test_an_ensemble_can_take_its_thresholds_from_out_of_fold_scores(tiny_run, tmp_path):
    """`ensemble --oof-scores`: the thresholds come from the given scores (kept in the bundle,
    recomputed from it), the manifest and the card say so, and the test split is still
    evaluated at them."""
    from training.datasets import read_split
    from training.ensemble import OOF_SOURCE, build_ensemble
    from training.oof import write_oof_scores
    from training.threshold import Scores, choose, compare, recompute, shipped

    cfg, run_dir, out, _ = tiny_run
    parts = read_split(run_dir / "split.csv")
    rng = np.random.default_rng(3)
    n = 300
    positive = rng.random(n) < 0.3
    score = np.clip(rng.normal(0.3 + 0.4 * positive, 0.15), 0, 1)
    scores = Scores(image=[f"i{k}" for k in range(n)], lesion=np.array([f"L{k // 2}" for k in
                    range(n)]), positive=positive, score=score,
                    tta=np.clip(score + rng.normal(0, 0.02, n), 0, 1))
    csv_path = tmp_path / "oof.csv"
    logits = tmp_path / "oof-first.npz"
    logits.write_bytes(b"the logits the scores came from")
    first = load_bundle(out)
    write_oof_scores(csv_path, scores, [(first, logits), (first, logits)])
    ens = tmp_path / "ensemble"
    # Scores made for other models (here: for the first model alone) are refused before
    # anything is written.
    alone = tmp_path / "alone.csv"
    write_oof_scores(alone, scores, [(first, logits)])
    with pytest.raises(ValueError, match="not for this ensemble's"):
        build_ensemble(cfg, out, [out], ens, parts, "9.9.9-oof", oof_scores=alone)
    assert not ens.exists()
    # So are scores of test images: a threshold is never chosen on the test split.
    test_ids = [s.path.stem for s in parts["test"]][:3]
    leaky = tmp_path / "leaky.csv"
    write_oof_scores(leaky, Scores(image=test_ids, lesion=np.array(test_ids),
                                   positive=np.array([True, False, True]),
                                   score=np.array([0.9, 0.1, 0.8]),
                                   tta=np.array([0.9, 0.1, 0.8])), [(first, logits)] * 2)
    with pytest.raises(ValueError, match="scores 3 test images"):
        build_ensemble(cfg, out, [out], ens, parts, "9.9.9-oof", oof_scores=leaky)
    ev = build_ensemble(cfg, out, [out], ens, parts, "9.9.9-oof", oof_scores=csv_path)
    rule = load_bundle(ens).decision
    how = {"method": cfg.decision.threshold_method,
           "confidence": cfg.decision.threshold_confidence}
    target = cfg.decision.target_sensitivity
    assert rule["tta_threshold"] == shipped(choose(positive, scores.tta, scores.lesion, target,
                                                   **how))
    assert rule["threshold"] == shipped(choose(positive, score, scores.lesion, target, **how))
    assert rule["chosen_on"]["source"] == OOF_SOURCE and rule["chosen_on"]["n"] == n
    assert (ens / "threshold_scores.csv").read_bytes() == csv_path.read_bytes()
    again = recompute(ens, rule)
    assert shipped(again["tta_threshold"]) == rule["tta_threshold"]
    assert ev["rows"]["ensemble (shipped decision)"]["threshold"] == rule["tta_threshold"]
    card = (ens / "CARD.md").read_text()
    assert "each chosen on the out-of-fold predictions of lesion-grouped fold models" in card
    assert f"On the {n} images of train + validation they were chosen on" in card
    # What those thresholds reach on the kit's own validation scores is reported beside them.
    check = rule["chosen_on"]["validation"]
    assert check["n"] == len(parts["val"]) and "tta_sensitivity" in check
    assert "On the kit's own validation scores (int8" in card
    # Carried over as an operating point ([decision] oof_carry = "specificity"): the thresholds
    # sit on the kit's own validation scores at the out-of-fold specificity, both files are
    # kept, and `training threshold` recomputes them.
    import dataclasses

    from training.threshold import OOF_FILE, carry_over, rates, read_scores, shipped_up

    carried_cfg = dataclasses.replace(
        cfg, decision=dataclasses.replace(cfg.decision, oof_carry="specificity"))
    moved = tmp_path / "carried"
    build_ensemble(carried_cfg, out, [out], moved, parts, "9.9.9-oof", oof_scores=csv_path)
    rule = load_bundle(moved).decision
    own = read_scores(moved / "threshold_scores.csv")
    assert len(own.image) == len(parts["val"])  # the kit's own validation scores
    assert (moved / OOF_FILE).read_bytes() == csv_path.read_bytes()
    want, carried = carry_over(scores, own, target, how["method"], how["confidence"])
    # Kept rounded up: the specificity carried over holds for the threshold as shipped.
    assert rule["tta_threshold"] == shipped_up(want["tta_threshold"])
    assert rule["threshold"] == shipped_up(want["threshold"])
    assert rates(own.positive, own.tta, rule["tta_threshold"])["specificity"] >= carried[
        "tta_threshold"]["specificity"]
    assert rule["chosen_on"]["carried_from"]["n"] == n
    again = recompute(moved, rule)
    assert all(same for *_, same in compare(again, rule))
    assert "the operating point is carried over, not the score" in (moved / "CARD.md").read_text()


def test_an_operating_point_carries_over_where_a_score_does_not():
    """Fold models whose scores are a monotone stretch of the shipped models' (more extreme,
    as hard labels make them): the threshold chosen on them, used as it is, flags nearly every
    negative of the shipped scores; carried over as a specificity, the shipped scores get the
    threshold with that specificity, the lowest such, ties included."""
    from training.threshold import Scores, at_specificity, carry_over, choose, rates

    rng = np.random.default_rng(5)
    n = 600
    positive = rng.random(n) < 0.25
    own = np.clip(rng.normal(0.25 + 0.45 * positive, 0.15), 1e-4, 1 - 1e-4)
    stretched = own ** 4  # same order, another scale
    lesion = np.array([f"L{k // 2}" for k in range(n)])
    oof = Scores(image=[str(k) for k in range(n)], lesion=lesion, positive=positive,
                 score=stretched, tta=stretched)
    mine = Scores(image=oof.image, lesion=lesion, positive=positive, score=own, tta=own)
    as_is = choose(positive, stretched, lesion, 0.9, "validation", 0.95)
    q = rates(positive, stretched, as_is)["specificity"]
    assert rates(positive, own, as_is)["specificity"] < q - 0.3  # the score does not carry
    got, carried = carry_over(oof, mine, 0.9, "validation", 0.95)
    assert carried["tta_threshold"]["specificity"] == q
    t = got["tta_threshold"]
    assert rates(positive, own, t)["specificity"] >= q  # the operating point does
    assert rates(positive, own, np.nextafter(t, 0))["specificity"] < q  # and it is the lowest
    assert rates(positive, own, t)["sensitivity"] >= 0.9  # the same order, the same images
    tied = np.array([0.1, 0.2, 0.2, 0.2, 0.5])
    none = np.zeros(5, bool)
    assert rates(none, tied, at_specificity(none, tied, 0.4))["specificity"] >= 0.4
    assert at_specificity(none, tied, 0.0) == 0.1
    from training.threshold import shipped_up

    assert shipped_up(0.52236) == 0.5224 and shipped_up(0.5224) == 0.5224
    with pytest.raises(ValueError, match="in and out of the decision group"):
        carry_over(Scores(image=["a"], lesion=np.array(["L"]), positive=np.array([True]),
                          score=np.array([0.5]), tta=np.array([0.5])), mine, 0.9,
                   "validation", 0.95)


def test_evaluate_judges_an_ensemble_as_a_capture_classifies(tiny_run, tmp_path):
    """`python -m training evaluate` on an ensemble bundle reports every member over every
    view under the shipped rule: a member made to differ (a strong logit bias towards the first
    class) moves the ensemble's row and leaves the first model's own rows as they were. Its
    rows are the paths the kit runs: the first model on one view, and the capture's mean."""
    from training.build import build_bundle
    from training.datasets import read_split
    from training.ensemble import build_ensemble
    from training.evaluate import evaluate_bundle, predict
    from training.metrics import summarise
    from training.threshold import SCORES_FILE, recompute, shipped

    _, run_dir, _, _ = tiny_run
    sets = {**TINY, "export.output": "logits", "export.tta": ["identity", "flip_lr"]}
    cfg = load_config(ROOT / "training/configs/blood-smear.toml", sets)
    first = tmp_path / "first"
    build_bundle(cfg, run_dir, first, keep_float=False)
    # The member: the same model with a strong logit bias towards the first class.
    member = tmp_path / "member"
    shutil.copytree(first, member)
    manifest = json.loads((member / "manifest.json").read_text())
    labels = manifest["labels"]
    manifest["class_bias"] = [6.0] + [0.0] * (len(labels) - 1)
    (member / "manifest.json").write_text(json.dumps(manifest))
    parts = read_split(run_dir / "split.csv")
    ens = tmp_path / "ensemble"
    build_ensemble(cfg, first, [member], ens, parts, "9.9.9-ensemble")
    skewed = load_bundle(ens)
    # Its thresholds come back from its own validation scores, which are not the first's.
    again = recompute(ens, skewed.decision)
    assert shipped(again["threshold"]) == skewed.decision["threshold"]
    kept = (ens / SCORES_FILE).read_bytes()
    assert kept != (first / SCORES_FILE).read_bytes()
    # Scored afresh (`threshold --config`, for a bundle built before the scores were kept), an
    # ensemble is scored as its thresholds were chosen: the first model alone on one view and
    # the members' mean, so the same file comes back and is written.
    manifest = json.loads((ens / "manifest.json").read_text())
    del manifest["decision"]["chosen_on"]
    (ens / "manifest.json").write_text(json.dumps(manifest))
    (ens / SCORES_FILE).unlink()
    args = ["--config", str(ROOT / "training/configs/blood-smear.toml")]
    args += [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    proc = _threshold_cli(ens, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (ens / SCORES_FILE).read_bytes() == kept

    test = parts["test"]
    got = evaluate_bundle(ens, test)
    alone = evaluate_bundle(first, test)
    assert got["ensemble"]["members"] == 2 and "ensemble" not in alone
    # The first model alone over the views is the single bundle's capture, no ensemble's path.
    assert "tta" in alone and "tta" not in got
    assert got["artifacts"]["int8"]["accuracy"] == alone["artifacts"]["int8"]["accuracy"]
    probs, _ = predict(skewed, "int8", test, tta=bool(skewed.tta), members=True)
    y = np.array([labels.index(s.label) for s in test])
    rule = skewed.decision
    group = [labels.index(m) for m in skewed.label_groups[rule["group"]]]
    threshold = rule["tta_threshold"]  # chosen on every member over every view
    want = summarise(y, probs, labels, group, threshold, rule["target_sensitivity"])
    for key in ("accuracy", "sensitivity", "specificity", "threshold"):
        assert got["ensemble"][key] == want[key], key
    # The member's bias moves the ensemble's probabilities towards the first class (a share of
    # predictions could already be all of them: the tiny model may call everything that class).
    assert probs[:, 0].mean() > alone["_probs"]["int8"][:, 0].mean()


def test_preflight_flags_float_ops(tiny_run):
    _, _, out, _ = tiny_run
    reports = preflight(load_bundle(out).artifacts["float"].path)
    bad = [r for r in reports if not r.ok]
    assert bad and any("not quantised" in reason for r in bad for reason in r.reasons)


def test_evaluate_command_json(tiny_run):
    _, run_dir, out, ev = tiny_run
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "evaluate",
            "--model",
            str(out),
            "--data",
            str(run_dir / "split.csv"),
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["artifacts"]["int8"]["accuracy"] == pytest.approx(
        ev["artifacts"]["int8"]["accuracy"]
    )


def test_compile_without_compiler_says_how_to_get_it(tiny_run, monkeypatch):
    _, _, out, _ = tiny_run
    proc = subprocess.run(
        [sys.executable, "-m", "training", "compile", "--model", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 3
    assert "edgetpu_compiler is not installed" in proc.stderr
    assert "apt install edgetpu-compiler" in proc.stderr
    assert "ops can map to the Edge TPU" in proc.stdout


def test_compiler_log_is_parsed():
    text = """Edge TPU Compiler version 16.0.384591198
Model compiled successfully in 1153 ms.
Input model: m_int8.tflite
On-chip memory used for caching model parameters: 3.24MiB
On-chip memory remaining for caching model parameters: 4.29MiB
Off-chip memory used for streaming uncached model parameters: 0.00B
Number of Edge TPU subgraphs: 1
Total number of operations: 72
Operation log: m_int8_edgetpu.log
Number of operations that will run on Edge TPU: 71
Number of operations that will run on CPU: 1
"""
    log = parse_compiler_log(text)
    assert log == {
        "ops_on_tpu": 71,
        "ops_on_cpu": 1,
        "on_chip_memory": "3.24MiB",
        "off_chip_memory": "0.00B",
        "compiler_version": "16.0.384591198",
    }


def test_offline_imagenet_initialisation_recognises_the_macaw(coral, parrot):
    import keras
    from PIL import Image

    from training.coral_weights import load_into_mobilenetv2

    base = keras.applications.MobileNetV2(
        input_shape=(224, 224, 3), include_top=False, weights=None, pooling="avg"
    )
    kernel, bias = load_into_mobilenetv2(base, coral / "mobilenet_v2_1.0_224_quant.tflite")
    img = Image.open(parrot).convert("RGB").resize((224, 224))
    x = (np.asarray(img, np.float32) - 127.5) / 127.5
    logits = base(x[None], training=False).numpy() @ kernel + bias
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert int(p.argmax()) == 89 and p.max() > 0.95


def test_int8_export_agrees_with_float_on_a_decisive_model(shared, parrot, tmp_path):
    """The export on a model whose answers are decisive: MobileNetV2 with the offline ImageNet
    weights and classifier (macaw 0.999 on the parrot). Exported by the training code to float
    and int8 and run through the edge classifier on real images, int8 must give the float
    model's top-1 on nearly every image where float is confident."""
    import keras

    from edge.inference.bundle import write_bundle
    from edge.inference.labels import read_labels
    from training.coral_weights import load_into_mobilenetv2
    from training.export import calibration_images, export_float, export_int8
    from training.input_pipeline import load_model_input
    from training.model import CORAL_MOBILENET

    coral = shared / CORAL_MOBILENET
    base = keras.applications.MobileNetV2(input_shape=(224, 224, 3), include_top=False,
                                          weights=None)
    kernel, bias = load_into_mobilenetv2(base, coral)
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    dense = keras.layers.Dense(1001, activation="softmax")
    model = keras.Model(base.input, dense(x))
    dense.set_weights([kernel, bias])
    images = [parrot] + sorted((shared / "datasets/ham10000/images").glob("*.jpg"))[:160]
    images += sorted((shared / "datasets/all-blood-smear/Benign").glob("*.jpg"))[:60]
    arrays = np.stack([load_model_input(p, (224, 224), "center-crop") for p in images])
    files = {
        "float": export_float(model, tmp_path / "m_float.tflite"),
        "int8": export_int8(model, calibration_images(arrays, 60, 0), tmp_path / "m_int8.tflite"),
    }
    manifest = {
        "name": "imagenet",
        "version": "1",
        "labels": read_labels(coral.parent / "imagenet_labels.txt"),
        "input": {"size": [224, 224], "resize": "center-crop"}, "output": "probabilities",
        "artifacts": {"float": {"input_dtype": "float32"}, "int8": {"input_dtype": "uint8"}},
    }
    bundle = load_bundle(write_bundle(tmp_path / "bundle", manifest, files))
    top = {}
    for kind in ("float", "int8"):
        clf = Classifier(bundle.only(kind), backend="cpu")
        top[kind] = [clf.classify(str(p)) for p in images]
    assert top["float"][0].label == top["int8"][0].label == "macaw"
    assert top["float"][0].score > 0.9
    confident = [i for i, r in enumerate(top["float"]) if r.score > 0.5]
    assert len(confident) >= 15  # the check below means something only on decisive answers
    same = sum(top["float"][i].label == top["int8"][i].label for i in confident)
    assert same / len(confident) >= 0.95, (same, len(confident))


def test_compare_scores_candidates_as_a_capture_classifies(tiny_run, tmp_path, capsys):
    """`python -m training compare`: a bundle against itself and against the ensemble of it
    with itself is exactly level; the baseline's score is that of the bundle's own capture
    classification; probabilities are kept in the cache folder."""
    from training.cli import main
    from training.datasets import read_split
    from training.evaluate import group_indices, predict
    from training.metrics import headline, selection_score

    cfg, run_dir, out, ev = tiny_run
    cache = tmp_path / "cache"
    argv = ["compare", "--baseline", str(out), "--candidate", str(out), "--candidate",
            f"{out}+{out}", "--data", str(run_dir / "split.csv"), "--part", "val",
            "--resamples", "50", "--cache", str(cache), "--json"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    for spec in (str(out), f"{out}+{out}"):
        c = got["candidates"][spec]
        assert c["difference"] == 0 and c["ci95"] == [0, 0] and c["better_share"] == 0
    val = read_split(run_dir / "split.csv")["val"]
    bundle = load_bundle(out)
    probs, _ = predict(bundle, "int8", val, tta=bool(bundle.tta))
    y = np.array([bundle.labels.index(s.label) for s in val])
    want = selection_score(headline(y, probs, group_indices(bundle)))
    assert got["candidates"][str(out)]["baseline"] == round(want, 4)
    assert len(list(cache.glob("*.npy"))) == 1  # one bundle, classified once
    assert main(argv[:-1]) == 0 and "lesion resamples" in capsys.readouterr().out


def test_compare_classifies_each_bundle_once(tiny_run, monkeypatch):
    """Without a cache, a bundle named as the baseline and in several candidates is still
    classified once: the validation split is the slow part of a comparison."""
    import training.compare as compare_module
    from training.datasets import read_split

    cfg, run_dir, out, ev = tiny_run
    calls = []
    real = compare_module.predict

    def counted(bundle, *args, **kw):
        calls.append(bundle.root)
        return real(bundle, *args, **kw)

    monkeypatch.setattr(compare_module, "predict", counted)
    val = read_split(run_dir / "split.csv")["val"]
    got = compare_module.compare(out, [str(out), f"{out}+{out}"], val, n_boot=20)
    assert len(got["candidates"]) == 2
    assert calls == [out]
