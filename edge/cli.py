"""Command line: ``python -m edge classify|doctor``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import FieldScopeError
from .inference.runtime import usable_cores

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
log = logging.getLogger("edge")


def _expand(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files as given; folders give their image files (sorted). Returns (files, problems)."""
    files: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                kinds = ", ".join(sorted(IMAGE_SUFFIXES))
                problems.append(f"{path}: no images in this folder ({kinds})")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    return files, problems


def _format(result, top_k: int) -> str:
    parts = ", ".join(f"{lab} {score:.3f}" for lab, score in result.top_k[:top_k])
    t = result.timings_ms
    views = f", {result.views} views" if result.views > 1 else ""
    line = (
        f"{result.image}: {parts} [{result.backend}, invoke {t['invoke']:.1f} ms{views}, "
        f"total {t['total']:.1f} ms]"
    )
    if result.decision:
        line += f"  {result.decision['text']}"
    return line


def cmd_classify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .inference.backends.edgetpu import parse_device
    from .inference.bundle import load_model
    from .inference.classifier import Classifier
    from .paths import default_bundle

    parse_device(args.device)  # a typo is an error even where no Edge TPU is attached
    model = args.model or default_bundle()
    bundle = load_model(model, args.labels)
    clf = Classifier(bundle, backend=args.backend, threads=args.threads, device=args.device)
    log.info(
        "model %s %s on %s: %s", bundle.name, bundle.version, clf.backend.name, clf.backend_reason
    )
    if args.tta and not bundle.tta:
        log.warning("--tta: bundle %s offers no test-time views; classifying plainly", bundle.name)
    if not args.json:
        print(
            f"# {bundle.name} {bundle.version} · {clf.backend.name} "
            f"({clf.backend_reason}) · {clf.runtime.label}",
            file=sys.stderr,
        )
    files, problems = _expand(args.images)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    failed = len(problems)
    bar = tqdm(files, unit="img", file=sys.stderr, disable=len(files) < 5 or None, leave=False)
    for path in bar:
        try:
            result = clf.classify(str(path), top_k=args.top_k, name=str(path), tta=args.tta)
        except FieldScopeError as exc:
            failed += 1
            bar.write(f"error: {exc}", file=sys.stderr)
            continue
        if args.json:
            doc = result.to_dict()
            out = {
                k: doc[k]
                for k in (
                    "image",
                    "label",
                    "score",
                    "probabilities",
                    "top_k",
                    "groups",
                    "decision",
                    "backend",
                    "timings_ms",
                    "model",
                    "notes",
                    "views",
                )
            }
            bar.write(json.dumps(out))
        else:
            bar.write(_format(result, args.top_k))
    return 1 if failed or not files else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import render, run_checks

    checks = run_checks(models=args.models)
    if args.json:
        print(
            json.dumps(
                {
                    "checks": [c.to_dict() for c in checks],
                    "ok": not any(c.status == "fail" for c in checks),
                },
                indent=2,
            )
        )
    else:
        print(render(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import load_config, parse_source
    from .serve import running_as_service, serve, serve_error

    overrides: dict = {
        "model.bundle": args.model,
        "web.host": args.host,
        "web.port": args.port,
        "storage.data_dir": args.data_dir,
        "model.backend": args.backend,
        "model.threads": args.threads,
    }
    cfg = None
    try:
        if args.source:
            kind, path = parse_source(args.source)
            overrides["source.kind"], overrides["source.path"] = kind, path
        cfg = load_config(args.config, overrides)
        return serve(cfg, args.profile)
    except FieldScopeError as exc:
        if args.error_page or running_as_service():
            # The page shows only the error text; it binds where the kit was asked to (the
            # command line, else the config's [web], even when the rest of the file is bad).
            host, port = _where_to_serve(args, cfg)
            return serve_error(str(exc), host, port)
        raise


def cmd_export(args: argparse.Namespace) -> int:
    """A sample as DICOM files (image + report per field) or a FHIR bundle, read beside a
    running daemon without disturbing it."""
    from .config import load_config
    from .daemon.profiles import ProfileBundles
    from .daemon.store import Store
    from .outbound.messages import Gone

    if not args.config and not args.data_dir:
        raise FieldScopeError("export needs the kit's data folder",
                              "give --data-dir DIR or --config FILE")
    # An export reads the data folder only: the camera the config names is never opened.
    cfg = load_config(args.config, {"storage.data_dir": args.data_dir}, camera=False)
    store = Store(cfg.data_dir, read_only=True)
    # Without a config the kit's id is the one the daemon wrote there (UIDs and FHIR ids
    # derive from it: the same field exports the same objects).
    kit_id = cfg.kit_id if args.config else (store.setting("kit_id") or cfg.kit_id)
    remembered = None if args.config else (lambda pid: store.setting(f"bundle:{pid}"))
    bundle_for = ProfileBundles(cfg, remembered)

    try:
        if args.format == "dicom":
            from .outbound.dicom import export_sample

            files = export_sample(store, args.sample, Path(args.out), kit_id,
                                  cfg.section("dicom").institution, bundle_for)
            print(f"{len(files)} DICOM files in {args.out}")
        else:
            from .outbound.fhir import sample_bundle

            doc = sample_bundle(store, args.sample, kit_id, bundle_for)
            text = json.dumps(doc, indent=2)
            if args.out == "-":
                print(text)
            else:
                Path(args.out).write_text(text + "\n")
                print(f"FHIR bundle of sample {args.sample} in {args.out}", file=sys.stderr)
    except Gone as exc:
        raise FieldScopeError(str(exc), "list samples with GET /api/samples") from exc
    finally:
        store.close()
    return 0


def _where_to_serve(args: argparse.Namespace, cfg) -> tuple[str, int]:
    if cfg is not None:
        return cfg.web.host, cfg.web.port
    web: dict = {}
    if args.config:
        try:
            from .config import read_toml

            raw = read_toml(Path(args.config))
            web = raw.get("web", {}) if isinstance(raw.get("web"), dict) else {}
        except (FieldScopeError, OSError):
            web = {}
    host = args.host or web.get("host")
    port = args.port or web.get("port")
    return (
        host if isinstance(host, str) and host else "127.0.0.1",
        port if isinstance(port, int) and 0 < port < 65536 else 8080,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("classify", help="classify images or folders of images")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--model", help="bundle folder or .tflite file (default: models/blood-smear)")
    p.add_argument("--labels", help="labels file for a bare .tflite")
    p.add_argument("--backend", choices=("auto", "cpu", "edgetpu"), default="auto")
    p.add_argument("--device", help="Edge TPU device: usb, usb:N, pci, pci:N or :N")
    p.add_argument(
        "--threads", type=int, default=usable_cores(), help="CPU threads (default: usable cores)"
    )
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument(
        "--tta",
        action="store_true",
        help="average over the bundle's test-time views (flips/turns; several invokes per image);"
        " an ensemble bundle is always classified as a capture, every member over every view",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per image per line")
    p.set_defaults(func=cmd_classify)

    d = sub.add_parser("doctor", help="check this device: runtime, Edge TPU, cameras, bundles")
    d.add_argument("--json", action="store_true")
    d.add_argument("--models", help="folder of bundles to check (default: models/)")
    d.set_defaults(func=cmd_doctor)

    s = sub.add_parser("serve", help="run the daemon: capture, classify, store, web page")
    s.add_argument("--config", help="TOML config (see docs/fieldscope.example.toml)")
    s.add_argument("--model", help="bundle folder or .tflite")
    s.add_argument(
        "--profile",
        help="start on this profile of the config's [profiles] (default: the last one chosen)",
    )
    s.add_argument("--source", help="picamera2, v4l2:/dev/video0 or replay:DIR")
    s.add_argument("--host", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int)
    s.add_argument("--data-dir", help="database and snapshots")
    s.add_argument("--backend", choices=("auto", "cpu", "edgetpu"))
    s.add_argument("--threads", type=int)
    s.add_argument(
        "--error-page",
        action="store_true",
        help="on a start-up error, serve a page saying why (default under systemd)",
    )
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser("export", help="a stored sample as DICOM files or a FHIR bundle")
    e.add_argument("format", choices=("dicom", "fhir"))
    e.add_argument("--sample", required=True, help="the sample code")
    e.add_argument("--out", required=True,
                   help="dicom: a folder (a USB stick); fhir: a file, or - for standard output")
    e.add_argument("--config", help="the kit's config (its data folder, kit id, profiles)")
    e.add_argument("--data-dir", help="the kit's data folder (instead of the config's)")
    e.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.verbose or args.command == "serve":
        logging.getLogger("edge").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if getattr(args, "threads", 1) is not None and getattr(args, "threads", 1) < 1:
        parser.error("--threads must be at least 1")
    try:
        return args.func(args)
    except FieldScopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
