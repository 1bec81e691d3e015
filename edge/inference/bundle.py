"""Model bundles: a folder with manifest.json, the model files and labels.txt.

The manifest is the contract between training and the Pi. It is validated against
``schemas/manifest.schema.json`` and then cross-checked (labels, groups, files, digests), so a
bad bundle is refused at load time with a message naming the field and the fix, not at the
first frame.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import BundleError
from .labels import read_labels, write_labels
from .scope import ScopeModel, load_scope
from .tflite_file import is_edgetpu_compiled, read_model_bytes, sha256_file

SCHEMA_VERSION = 1
ARTIFACT_KINDS = ("float", "int8", "edgetpu")
# Defaults that fit MobileNet-style models and Coral's reference models.
DEFAULT_INPUT = {
    "color_order": "RGB",
    "resize": "center-crop",
    "normalization": {"mean": [127.5, 127.5, 127.5], "std": [127.5, 127.5, 127.5]},
}


@lru_cache(maxsize=1)
def manifest_schema() -> dict[str, Any]:
    text = resources.files("edge").joinpath("schemas/manifest.schema.json").read_text()
    return json.loads(text)


@dataclass(frozen=True)
class Artifact:
    kind: str
    path: Path
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Bundle:
    """A validated bundle (or a bare .tflite wrapped to look like one)."""

    root: Path | None
    manifest: dict[str, Any]
    artifacts: dict[str, Artifact]
    # The scope check and activation maps (None: the bundle has none and says so).
    scope: ScopeModel | None = None
    # More int8 models averaged with the first (an ensemble; manifest "members"): on-demand
    # classifications use them all, the live stream the first alone.
    members: tuple[Artifact, ...] = ()

    @property
    def scope_texts(self) -> dict[str, str]:
        """What an out-of-scope image is called, and what the live page says meanwhile."""
        spec = self.manifest.get("scope") or {}
        return {
            "out_of_scope": spec.get("out_of_scope", "not an image for this model"),
            "nothing_in_view": spec.get("nothing_in_view", "nothing to classify in view"),
        }

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def imaging(self) -> str:
        """microscopy, dermoscopy or photography: which DICOM object its results become."""
        return self.manifest.get("imaging", "photography")

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def label_groups(self) -> dict[str, list[str]]:
        return dict(self.manifest.get("label_groups", {}))

    @property
    def decision(self) -> dict[str, Any] | None:
        return self.manifest.get("decision")

    @property
    def input_spec(self) -> dict[str, Any]:
        spec = {**DEFAULT_INPUT, **self.manifest["input"]}
        return spec

    def member_input_spec(self, member: Artifact) -> dict[str, Any]:
        """An ensemble member's input: the bundle's, at the member's own size when its entry
        declares one (a member trained at another resolution sees the image at that size)."""
        spec = self.input_spec
        own = member.info.get("input")
        return {**spec, "size": list(own["size"])} if own else spec

    @property
    def tta(self) -> list[str]:
        """Views averaged when test-time augmentation is asked for ([] = not offered)."""
        return list(self.manifest.get("tta") or [])

    @property
    def class_bias(self):
        """Per-class offsets added to the logits before the softmax (None: none)."""
        bias = self.manifest.get("class_bias")
        if not bias:
            return None
        import numpy as np

        return np.asarray(bias, dtype=np.float64)

    @property
    def output_kind(self) -> str:
        return self.manifest.get("output", "auto")

    def describe(self) -> dict[str, Any]:
        """What the kit tells of the bundle it runs (``/api/model``): which model, which
        members a capture averages, which views, and the rule that turns scores into advice."""
        rule = self.decision
        keys = ("group", "threshold", "tta_threshold", "target_sensitivity", "threshold_method",
                "positive", "negative")
        return {
            "name": self.name,
            "version": self.version,
            "description": self.manifest.get("description", ""),
            "intended_use": self.manifest.get("intended_use", ""),
            "labels": self.labels,
            "label_groups": self.label_groups,
            "artifacts": sorted(self.artifacts),
            # Averaged with the first model for captures, uploads and `classify`; the live
            # stream runs the first alone.
            "members": [{"file": m.path.name, "sha256": m.info.get("sha256"),
                         "from": m.info.get("from"), "class_bias": "class_bias" in m.info,
                         "input_size": self.member_input_spec(m)["size"]}
                        for m in self.members],
            "tta": self.tta,
            "decision": {k: rule[k] for k in keys if k in rule} if rule else None,
            "scope_check": self.scope is not None,
        }

    def only(self, kind: str) -> Bundle:
        """The same bundle restricted to one artifact (to evaluate or time it alone)."""
        # The scope check reads the int8 model's feature outputs (and the Edge TPU's, compiled
        # from it); a float artifact is evaluated without it.
        scope = self.scope if kind in ("int8", "edgetpu") else None
        return Bundle(self.root, self.manifest, {kind: self.artifacts[kind]}, scope)  # no members

    def cpu_artifact(self) -> Artifact | None:
        """The artifact the CPU runs: int8 when present (fast on a Pi's ARM cores), else float."""
        return self.artifacts.get("int8") or self.artifacts.get("float")

    def file(self, key: str) -> Path | None:
        rel = self.manifest.get(key)
        if not rel or self.root is None:
            return None
        return self.root / rel


def _schema_errors(manifest: Any) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(manifest_schema())
    out = []
    for err in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        out.append(f"{where}: {err.message}")
    return out


def _cross_errors(manifest: dict[str, Any]) -> list[str]:
    errors = []
    labels = manifest["labels"]
    # Duplicates happen in real label sets (ImageNet has two "crane"s); they are only an error
    # where a group would be ambiguous.
    duplicates = {lab for lab in labels if labels.count(lab) > 1}
    groups = manifest.get("label_groups", {})
    for group, members in groups.items():
        unknown = [m for m in members if m not in labels]
        if unknown:
            errors.append(f"label_groups/{group}: unknown labels {unknown} (known: {labels})")
        ambiguous = sorted(duplicates.intersection(members))
        if ambiguous:
            errors.append(f"label_groups/{group}: labels {ambiguous} occur more than once")
    # The bundle's logit offsets (its first model's) and each ensemble member's own.
    biases = [("class_bias", manifest.get("class_bias"))] + [
        (f"member {m['file']}: class_bias", m.get("class_bias"))
        for m in manifest.get("members", [])
    ]
    for where, bias in biases:
        if bias is None:
            continue
        if len(bias) != len(labels):
            errors.append(f"{where} has {len(bias)} values for {len(labels)} labels")
        if manifest.get("output") != "logits":
            errors.append(f'{where}: needs "output": "logits" (it is added to the logits)')
    tta = manifest.get("tta") or []
    turns = sorted({"rot90", "rot270"}.intersection(tta))
    sizes = [manifest["input"]["size"]] + [
        m["input"]["size"] for m in manifest.get("members", []) if "input" in m
    ]
    for size in sizes:
        if turns and size[0] != size[1] and size != [0, 0]:
            errors.append(
                f"tta: {turns} would turn the {size[0]}×{size[1]} input on its side; on a "
                "non-square input use identity, flip_lr, flip_ud and rot180"
            )
            break
    decision = manifest.get("decision")
    if decision and decision["group"] not in groups:
        errors.append(
            f"decision/group: {decision['group']!r} is not one of label_groups {sorted(groups)}"
        )
    return errors


def validate_manifest(manifest: Any, source: str = "manifest") -> None:
    errors = _schema_errors(manifest)
    if not errors:
        errors = _cross_errors(manifest)
    if errors:
        lines = "\n  ".join(errors)
        raise BundleError(
            f"{source} is not a valid bundle manifest:\n  {lines}",
            "see docs/bundle-format.md for the schema",
        )


def _check_digest(root: Path, path: Path, info: dict[str, Any]) -> None:
    """The file's sha256 is the one the manifest names for it (``info["sha256"]``)."""
    digest = sha256_file(path)
    if digest != info["sha256"]:
        raise BundleError(
            f"bundle {root.name}: sha256 of {info['file']} is {digest[:12]}…, "
            f"manifest says {info['sha256'][:12]}…",
            "the file is corrupt or was replaced; copy the bundle again",
        )


def _check_artifact(root: Path, kind: str, info: dict[str, Any], verify: bool) -> Artifact:
    path = root / info["file"]
    if not path.is_file():
        raise BundleError(
            f"bundle {root.name}: artifact '{kind}' file {info['file']} is missing",
            "copy the file into the bundle or remove the artifact from manifest.json",
        )
    if verify:
        size = path.stat().st_size
        if "size" in info and info["size"] != size:
            raise BundleError(
                f"bundle {root.name}: {info['file']} is {size} bytes, manifest says {info['size']}",
                "the file is truncated or was replaced; copy the bundle again",
            )
        if "sha256" in info:
            _check_digest(root, path, info)
        data = read_model_bytes(path)
        compiled = is_edgetpu_compiled(data)
        if kind == "edgetpu" and not compiled:
            raise BundleError(
                f"bundle {root.name}: artifact 'edgetpu' ({info['file']}) is not compiled for the "
                "Edge TPU",
                "compile the int8 model with `python -m training compile`",
            )
        if kind != "edgetpu" and compiled:
            raise BundleError(
                f"bundle {root.name}: artifact '{kind}' ({info['file']}) is compiled for the Edge "
                "TPU and cannot run on the CPU",
                "list it under artifacts.edgetpu and add the plain int8 model as artifacts.int8",
            )
    return Artifact(kind, path, dict(info))


def load_bundle(path: Path | str, verify: bool = True) -> Bundle:
    """Load and check a bundle folder. ``verify`` hashes the model files (a few ms per MB)."""
    root = Path(path)
    manifest_path = root / "manifest.json"
    if not root.is_dir():
        raise BundleError(f"model bundle not found: {root}", "pass --model with a bundle folder")
    if not manifest_path.is_file():
        raise BundleError(
            f"{root} has no manifest.json",
            "a bundle needs manifest.json; for a bare model use --model FILE.tflite --labels FILE",
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from exc
    validate_manifest(manifest, str(manifest_path))
    labels_file = root / "labels.txt"
    if labels_file.is_file():
        file_labels = read_labels(labels_file)
        if file_labels != manifest["labels"]:
            raise BundleError(
                f"{labels_file} ({len(file_labels)} labels) disagrees with manifest.json "
                f"({len(manifest['labels'])} labels)",
                "regenerate labels.txt from the manifest or re-export the bundle",
            )
    artifacts = {
        kind: _check_artifact(root, kind, info, verify)
        for kind, info in manifest["artifacts"].items()
    }
    members = tuple(
        _check_artifact(root, "int8", info, verify) for info in manifest.get("members", [])
    )
    return Bundle(root, manifest, artifacts, _check_scope(root, manifest.get("scope"), verify),
                  members)


def _check_scope(root: Path, spec: dict[str, Any] | None, verify: bool) -> ScopeModel | None:
    """The scope file named in the manifest: present, the digest it claims, well formed."""
    if not spec:
        return None
    path = root / spec["file"]
    if not path.is_file():
        raise BundleError(
            f"bundle {root.name}: scope file {spec['file']} is missing",
            'copy the file into the bundle, or remove "scope" from manifest.json (the kit '
            "then classifies without a scope check)",
        )
    if verify:
        _check_digest(root, path, spec)
    return load_scope(path, f"bundle {root.name}")


def bundle_from_tflite(
    model: Path | str, labels: Path | str | None = None, name: str | None = None
) -> Bundle:
    """Wrap a bare .tflite (what Coral users have today) in an in-memory bundle."""
    model = Path(model)
    data = read_model_bytes(model)
    kind = "edgetpu" if is_edgetpu_compiled(data) else "int8"
    label_list = read_labels(Path(labels)) if labels else None
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": name or model.stem,
        "version": "unversioned",
        "labels": label_list or ["class_0", "class_1"],
        "input": {"size": [0, 0]},  # filled from the interpreter when opened
        "output": "auto",
        "artifacts": {kind: {"file": model.name}},
        "_labels_from_model": label_list is None,
    }
    return Bundle(None, manifest, {kind: Artifact(kind, model, {"file": model.name})})


def load_model(model: Path | str, labels: Path | str | None = None, verify: bool = True) -> Bundle:
    """A bundle folder, or a bare .tflite with an optional labels file."""
    path = Path(model)
    if not path.exists():
        raise BundleError(
            f"model bundle not found: {path}",
            "pass --model with a bundle folder, or a .tflite file and --labels",
        )
    if path.is_dir():
        if labels:
            raise BundleError("--labels is only for a bare .tflite; a bundle has its own labels")
        return load_bundle(path, verify=verify)
    if path.suffix == ".json" and path.name == "manifest.json":
        return load_bundle(path.parent, verify=verify)
    return bundle_from_tflite(path, labels)


def write_bundle(
    out_dir: Path | str,
    manifest: dict[str, Any],
    files: dict[str, Path],
) -> Path:
    """Write a bundle: copy each artifact in, fill in sha256 and size, write labels.txt.

    ``files`` maps artifact kind to a model file; the manifest's ``artifacts`` entries (metrics,
    compiler logs) are kept and completed.
    """
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(json.dumps(manifest))  # deep copy, JSON-clean
    manifest.setdefault("schema_version", SCHEMA_VERSION)
    arts = manifest.setdefault("artifacts", {})
    for kind, src in files.items():
        src = Path(src)
        entry = arts.setdefault(kind, {})
        entry.setdefault("file", src.name)
        dest = out / entry["file"]
        if src.resolve() != dest.resolve():
            shutil.copyfile(src, dest)
        entry["sha256"] = sha256_file(dest)
        entry["size"] = dest.stat().st_size
    scope = manifest.get("scope")
    if scope:  # its file was written into the bundle by training: record what it is
        scope_file = out / scope["file"]
        scope["sha256"] = sha256_file(scope_file)
        scope["size"] = scope_file.stat().st_size
    validate_manifest(manifest, f"{out}/manifest.json")
    write_labels(out / "labels.txt", manifest["labels"])
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / "manifest.json")
    return out
