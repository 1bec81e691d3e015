"""``python -m training train|export|evaluate|compare|compile|...``."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from edge.errors import FieldScopeError

from .config import ConfigError, load_config
from .datasets import DatasetError, load_samples, read_split


def _cfg(args):
    overrides = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return load_config(args.config, overrides)


def cmd_train(args) -> int:
    from .build import build_bundle
    from .train import train

    cfg = _cfg(args)
    run_dir = Path(args.run_dir or f"runs/{cfg.name}")
    if not args.skip_training:
        train(cfg, run_dir)
    out = Path(args.out or f"models/{cfg.name}")
    ev = build_bundle(
        cfg, run_dir, out, keep_float=args.keep_float, samples_per_class=args.samples_per_class
    )
    (run_dir / "evaluation.json").write_text(json.dumps(ev, indent=2, default=float))
    for kind, m in ev["artifacts"].items():
        print(
            f"{kind}: accuracy {m['accuracy']:.4f}, {cfg.decision.group} AUC "
            f"{m['group_auc']:.4f}, sensitivity {m['sensitivity']:.4f}, specificity "
            f"{m['specificity']:.4f} (test, n={m['n']})"
        )
    print(f"bundle written to {out}; metrics in {run_dir / 'evaluation.json'}")
    return 0


def cmd_import_member(args) -> int:
    """A member trained by training/gpu_members.py, made a run and built as train builds."""
    from .imported import import_member

    member = Path(args.member)
    if not any(item.startswith("version=") for item in args.set or []):
        # The member's name as build metadata: an ensemble's members then tell themselves apart.
        args.set = [*(args.set or []), f"version={_cfg(args).version}+{member.name}"]
    cfg = _cfg(args)
    run_dir = Path(args.run_dir or f"runs/{cfg.name}-{member.name}")
    print(f"Keras model: {import_member(cfg, member, run_dir)}")
    # A candidate until it is chosen: never over the shipped bundle unless --out says so.
    args.out = args.out or str(run_dir / "bundle")
    args.run_dir, args.skip_training = str(run_dir), True
    return cmd_train(args)


def cmd_oof_scores(args) -> int:
    from edge.inference.bundle import load_bundle

    from .oof import oof_scores, write_oof_scores

    if len(args.bundle) != len(args.oof):
        print("error: give one --oof file per --bundle, in the same order", file=sys.stderr)
        return 2
    models = [(load_bundle(Path(b)), Path(f)) for b, f in zip(args.bundle, args.oof, strict=True)]
    scores = oof_scores(models)
    digest = write_oof_scores(Path(args.out), scores, models)
    print(f"{args.out}: {len(scores.image)} images from {len(set(scores.lesion))} lesions, "
          f"{int(scores.positive.sum())} in the decision group (sha256 {digest[:12]}); build "
          f"with python -m training ensemble ... --oof-scores {args.out}")
    return 0


def cmd_ensemble(args) -> int:
    from .datasets import config_split
    from .ensemble import build_ensemble

    cfg = _cfg(args)
    parts = config_split(cfg.dataset)  # the split the bundles were trained on
    ev = build_ensemble(cfg, Path(args.first), [Path(m) for m in args.member], Path(args.out),
                        parts, args.version,
                        Path(args.oof_scores) if args.oof_scores else None)
    for name, m in ev["rows"].items():
        print(f"{name}: accuracy {m['accuracy']:.4f}, balanced {m['balanced_accuracy']:.4f}, "
              f"macro AUC {m['macro_auc']:.4f}, group AUC {m['group_auc']:.4f}, sensitivity "
              f"{m['sensitivity']:.4f} ({m['sensitivity_ci95'][0]:.3f}-"
              f"{m['sensitivity_ci95'][1]:.3f}), specificity {m['specificity']:.4f}")
    lat = ev["capture_latency_ms"]
    print(f"one capture: {lat[1]:.0f} ms at 1 thread, {lat[2]:.0f} ms at 2 threads")
    return 0


def cmd_scope(args) -> int:
    from .scope import add_scope

    cfg = _cfg(args)
    if not cfg.export.scope_layers:
        print("error: the config has no export.scope_layers", file=sys.stderr)
        return 2
    from .datasets import config_split

    parts = config_split(cfg.dataset)  # the split the bundle was trained on
    report = add_scope(Path(args.model or f"models/{cfg.name}"), cfg, parts)
    r = report["in_scope_test"]
    print(f"in-scope test images rejected: {100 * r['rejected']:.1f} % of {r['n']}")
    for name, m in report["sets"].items():
        print(
            f"{name}: rejected {100 * m['rejected']:.1f} % of {m['n']}, AUROC "
            f"{m['auroc']:.3f}, TNR at 95 % TPR {100 * m['tnr_at_95_tpr']:.1f} %"
        )
    return 0


def cmd_export(args) -> int:
    from .build import export_artifacts

    cfg = _cfg(args)
    files = export_artifacts(cfg, Path(args.run_dir or f"runs/{cfg.name}"))
    for kind, path in files.items():
        print(f"{kind}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def _samples_from(data: str, part: str):
    path = Path(data)
    if path.is_file() and path.suffix == ".csv":
        with open(path) as fh:
            header = fh.readline()
        if header.startswith("part,"):
            return read_split(path)[part]
        return load_samples("csv", path)
    if (path / "HAM10000_metadata.csv").is_file():
        return load_samples("ham10000", path)
    return load_samples("folders", path)


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_bundle

    samples = _samples_from(args.data, args.part)
    ev = evaluate_bundle(Path(args.model), samples)
    ev.pop("_probs")
    ev.pop("_y")
    if args.json:
        print(json.dumps(ev, default=float))
    else:
        for kind, m in ev["artifacts"].items():
            print(
                f"{kind}: accuracy {m['accuracy']:.4f}, balanced {m['balanced_accuracy']:.4f}, "
                f"macro AUC {m['macro_auc']:.4f}, group AUC {m['group_auc']:.4f}, "
                f"sensitivity {m['sensitivity']:.4f}, specificity {m['specificity']:.4f} "
                f"at {m['threshold']:.3f} (n={m['n']})"
            )
            recall = ", ".join(f"{lab} {r:.2f}" for lab, r in m["recall"].items())
            print(f"  per-class recall: {recall}")
        for kind, m in ev.get("tta", {}).items():
            print(
                f"{kind} + TTA ({len(m['views'])} views): accuracy {m['accuracy']:.4f}, balanced "
                f"{m['balanced_accuracy']:.4f}, group AUC {m['group_auc']:.4f}, sensitivity "
                f"{m['sensitivity']:.4f}, specificity {m['specificity']:.4f}"
            )
        if "ensemble" in ev:
            m = ev["ensemble"]
            print(
                f"ensemble ({m['members']} models x {len(m['views'])} views, as a capture): "
                f"accuracy {m['accuracy']:.4f}, balanced {m['balanced_accuracy']:.4f}, macro AUC "
                f"{m['macro_auc']:.4f}, group AUC {m['group_auc']:.4f}, sensitivity "
                f"{m['sensitivity']:.4f}, specificity {m['specificity']:.4f}"
            )
        if "int8_float_agreement" in ev:
            print(f"int8/float agreement {ev['int8_float_agreement']:.4f}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare

    samples = _samples_from(args.data, args.part)
    out = compare(Path(args.baseline), args.candidate, samples, args.resamples,
                  Path(args.cache) if args.cache else None)
    if args.json:
        print(json.dumps(out))
        return 0
    b = out["baseline_figures"]
    print(f"{out['baseline']} (baseline, {out['n']} images, {out['lesions']} lesions): "
          f"accuracy {b['accuracy']:.4f}, balanced {b['balanced_accuracy']:.4f}, group AUC "
          f"{b['group_auc']:.4f}")
    for spec, c in out["candidates"].items():
        lo, hi = c["ci95"]
        print(f"{spec}: accuracy {c['accuracy']:.4f}, balanced {c['balanced_accuracy']:.4f}, "
              f"group AUC {c['group_auc']:.4f}; score {c['score']:.4f} vs {c['baseline']:.4f}: "
              f"{c['difference']:+.4f} (95 % interval {lo:+.4f} to {hi:+.4f}), higher in "
              f"{100 * c['better_share']:.0f} % of {c['resamples']} lesion resamples")
    return 0


def _keep_scores(bundle_dir: Path, args) -> int:
    """For a bundle built before its validation scores were kept: score the config's
    validation split through the bundle as its thresholds were chosen (the first model on one
    view; every member over every view) and keep the file, but only when the shipped
    thresholds come back from it: a bundle never claims to have been chosen on scores that do
    not give its thresholds."""
    import tempfile

    from edge.inference.bundle import load_bundle

    from .datasets import config_split
    from .evaluate import validation_scores
    from .threshold import SCORES_FILE, chosen_on, compare, recompute, write_scores

    cfg = _cfg(args)
    bundle = load_bundle(bundle_dir)
    art = bundle.cpu_artifact()
    if art is None:
        print(f"error: {bundle_dir} has no CPU artifact to score with", file=sys.stderr)
        return 2
    scores = validation_scores(bundle, config_split(cfg.dataset)["val"], art.kind,
                               tta=bool(bundle.tta), members=bool(bundle.members))
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    rule = manifest["decision"]
    with tempfile.TemporaryDirectory() as tmp:
        digest = write_scores(Path(tmp) / SCORES_FILE, scores)
        trial = {**rule, "chosen_on": chosen_on(scores, digest, rule)}
        rows = compare(recompute(Path(tmp), trial), rule)
        if not all(same for *_, same in rows):
            for key, mine, given, _ in rows:
                print(f"{key}: recomputed {mine}, shipped {given}", file=sys.stderr)
            print("error: these scores do not give the shipped thresholds; nothing written",
                  file=sys.stderr)
            return 1
        shutil.copyfile(Path(tmp) / SCORES_FILE, bundle_dir / SCORES_FILE)
    rule["chosen_on"] = trial["chosen_on"]
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    load_bundle(bundle_dir)  # still loads
    return 0


def cmd_threshold(args) -> int:
    from .threshold import compare, recompute

    bundle = Path(args.model)
    if args.config:
        code = _keep_scores(bundle, args)
        if code:
            return code
    decision = json.loads((bundle / "manifest.json").read_text()).get("decision") or {}
    try:
        got = recompute(bundle, decision)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = compare(got, decision)
    for key, mine, given, same in rows:
        print(f"{key}: recomputed {mine}, shipped {given} ({'the same' if same else 'DIFFERENT'})")
    where = ("out-of-fold images" if decision["chosen_on"].get("source") else
             "validation images")
    print(f"on the {decision['chosen_on']['n']} stored {where}: sensitivity "
          f"{got.get('sensitivity', float('nan')):.4f}, specificity "
          f"{got.get('specificity', float('nan')):.4f}"
          + (f"; every view {got['tta_sensitivity']:.4f} / {got['tta_specificity']:.4f}"
             if "tta_sensitivity" in got and "tta_specificity" in got else ""))
    return 0 if all(same for *_, same in rows) else 1


def cmd_teacher_prep(args) -> int:
    from .teacher import prepare

    cfg = _cfg(args)
    out = prepare(cfg, Path(args.run_dir or f"runs/{cfg.name}"), Path(args.out))
    print(f"teacher data in {out}: run `python training/gpu_teacher.py --data {out} --out DIR`")
    return 0


def cmd_probe(args) -> int:
    from .probe import probe

    cfg = _cfg(args)
    rows = probe(cfg, Path(args.run_dir or f"runs/{cfg.name}"), args.backbones.split(","))
    for r in rows:
        print(f"{r['backbone']}: {r['params_m']} M parameters; val {r['val']}; test {r['test']}")
    return 0


def cmd_compile(args) -> int:
    from edge.inference.bundle import load_bundle, write_bundle

    from .edgetpu import CompilerMissing, compile_model, preflight, render_preflight

    bundle = load_bundle(args.model)
    int8 = bundle.artifacts.get("int8")
    if int8 is None:
        print("error: the bundle has no int8 artifact to compile", file=sys.stderr)
        return 2
    print(render_preflight(preflight(int8.path)))
    try:
        compiled, clog = compile_model(int8.path, bundle.root, args.runtime_version)
    except CompilerMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    manifest = dict(bundle.manifest)
    manifest["artifacts"]["edgetpu"] = {
        "file": compiled.name,
        "input_dtype": "uint8",
        "edgetpu": clog,
    }
    files = {k: a.path for k, a in bundle.artifacts.items()}
    files["edgetpu"] = compiled
    write_bundle(bundle.root, manifest, files)
    print(f"compiled: {clog}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train, export, evaluate and write the bundle")
    t.add_argument("--config", required=True)
    t.add_argument("--run-dir")
    t.add_argument("--out", help="bundle folder (default models/<name>)")
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.finetune_epochs=1",
    )
    t.add_argument("--keep-float", action="store_true", help="ship the float artifact too")
    t.add_argument("--samples-per-class", type=int, default=0)
    t.add_argument("--skip-training", action="store_true", help="reuse run-dir/model.keras")
    t.set_defaults(func=cmd_train)
    im = sub.add_parser(
        "import-member",
        help="a member trained by training/gpu_members.py → a run and its bundle, as train",
    )
    im.add_argument("--member", required=True,
                    help="DIR/NAME of its NAME.a.npz and NAME.b.npz (report.json beside)")
    im.add_argument("--config", required=True)
    im.add_argument("--run-dir", help="default runs/<name>-<member>")
    im.add_argument("--out", help="bundle folder (default RUN_DIR/bundle)")
    im.add_argument("--set", action="append", metavar="KEY=VALUE")
    im.add_argument("--keep-float", action="store_true", help="ship the float artifact too")
    im.add_argument("--samples-per-class", type=int, default=0)
    im.set_defaults(func=cmd_import_member)
    oo = sub.add_parser(
        "oof-scores",
        help="referral scores from gpu_members.py --folds logits, for ensemble --oof-scores",
    )
    oo.add_argument("--bundle", action="append", required=True,
                    help="a model of the ensemble, in its order (the first: the live stream's)")
    oo.add_argument("--oof", action="append", required=True,
                    help="that model's oof-NAME.npz, in the same order")
    oo.add_argument("--out", required=True, help="the scores file to write (CSV)")
    oo.set_defaults(func=cmd_oof_scores)
    e = sub.add_parser("export", help="export float and int8 TFLite from a run")
    e.add_argument("--config", required=True)
    e.add_argument("--run-dir")
    e.add_argument("--set", action="append")
    e.set_defaults(func=cmd_export)
    v = sub.add_parser("evaluate", help="evaluate a bundle's artifacts on a dataset")
    v.add_argument("--model", required=True)
    v.add_argument(
        "--data",
        required=True,
        help="split.csv (uses --part), a path,label CSV, HAM10000 or class folders",
    )
    v.add_argument("--part", default="test")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_evaluate)
    cp = sub.add_parser(
        "compare",
        help="candidates against the shipped bundle on validation, with a lesion-level "
        "bootstrap of the score's difference",
    )
    cp.add_argument("--baseline", required=True, help="the shipped bundle")
    cp.add_argument("--candidate", action="append", required=True,
                    help="a bundle, or bundles joined by + (their mean: an ensemble)")
    cp.add_argument("--data", required=True, help="split.csv (uses --part) or as for evaluate")
    cp.add_argument("--part", default="val")
    cp.add_argument("--resamples", type=int, default=1000)
    cp.add_argument("--cache", help="a folder keeping each bundle's probabilities")
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(func=cmd_compare)
    tp = sub.add_parser(
        "teacher-prep", help="write the folder training/gpu_teacher.py trains a teacher on"
    )
    tp.add_argument("--config", required=True)
    tp.add_argument("--run-dir", help="the run whose split.csv to use (default runs/<name>)")
    tp.add_argument("--out", required=True)
    tp.add_argument("--set", action="append")
    tp.set_defaults(func=cmd_teacher_prep)
    pr = sub.add_parser("probe", help="compare backbones: a linear head on frozen features")
    pr.add_argument("--config", required=True)
    pr.add_argument("--run-dir")
    pr.add_argument("--backbones", default="mobilenetv2,mobilenet_edgetpu")
    pr.add_argument("--set", action="append")
    pr.set_defaults(func=cmd_probe)
    sc = sub.add_parser(
        "scope", help="add the scope check and activation maps to a bundle, in place"
    )
    sc.add_argument("--config", required=True)
    sc.add_argument("--model", help="the bundle (default models/<name>)")
    sc.add_argument("--set", action="append")
    sc.set_defaults(func=cmd_scope)
    en = sub.add_parser(
        "ensemble", help="an ensemble bundle: a first bundle plus other bundles' int8 models"
    )
    en.add_argument("--config", required=True)
    en.add_argument("--first", required=True, help="the bundle whose model serves the live view")
    en.add_argument("--member", action="append", required=True, help="another trained bundle")
    en.add_argument("--out", required=True)
    en.add_argument("--version", required=True)
    en.add_argument("--oof-scores", help="choose the thresholds on these scores "
                    "(python -m training oof-scores) instead of the validation split's")
    en.add_argument("--set", action="append")
    en.set_defaults(func=cmd_ensemble)
    th = sub.add_parser(
        "threshold", help="recompute a bundle's referral thresholds from its stored scores"
    )
    th.add_argument("--model", required=True)
    th.add_argument("--config", help="first score the config's validation split through the "
                    "bundle and keep the scores in it (a bundle built before they were kept)")
    th.add_argument("--set", action="append")
    th.set_defaults(func=cmd_threshold)
    c = sub.add_parser("compile", help="compile a bundle's int8 model for the Edge TPU")
    c.add_argument("--model", required=True)
    c.add_argument("--runtime-version", type=int, default=14)
    c.set_defaults(func=cmd_compile)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, DatasetError, FieldScopeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
