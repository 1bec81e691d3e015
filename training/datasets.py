"""Labelled image sets and their splits.

Three layouts: HAM10000 (a metadata CSV with image_id, dx and lesion_id, plus an image folder),
one folder per class, and a generic CSV (path,label[,group]). Splits are stratified by class and
grouped (lesion, patient) so no group lands in two parts, deterministic from a seed.
"""

from __future__ import annotations

import csv
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
PARTS = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset that cannot be trained on, with what is wrong and how to fix it."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    group: str


def load_ham10000(
    root: Path, csv_name: str = "HAM10000_metadata.csv", image_dir: str = "images"
) -> list[Sample]:
    meta = root / csv_name
    if not meta.is_file():
        raise DatasetError(f"{meta} not found: a HAM10000 folder has {csv_name} and {image_dir}/")
    out = []
    with open(meta, newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                out.append(
                    Sample(
                        root / image_dir / f"{row['image_id']}.jpg",
                        row["dx"],
                        row.get("lesion_id") or row["image_id"],
                    )
                )
            except KeyError as exc:
                raise DatasetError(f"{meta}: missing column {exc}") from exc
    return out


def load_class_folders(root: Path) -> list[Sample]:
    """One sub-folder per class; each image is its own group (no patient ids given)."""
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    out = []
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        for img in sorted(cls.iterdir()):
            if img.suffix.lower() in IMAGE_SUFFIXES:
                out.append(Sample(img, cls.name, f"{cls.name}/{img.stem}"))
    return out


def load_csv(path: Path, image_root: Path | None = None) -> list[Sample]:
    """Columns path,label[,group]; relative paths from ``image_root`` or the CSV's folder."""
    base = image_root or path.parent
    out = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise DatasetError(f"{path}: needs columns path and label (and optionally group)")
        for row in reader:
            p = Path(row["path"])
            out.append(
                Sample(
                    p if p.is_absolute() else base / p,
                    row["label"],
                    row.get("group") or row["path"],
                )
            )
    return out


def load_samples(layout: str, root: Path, **kw) -> list[Sample]:
    loaders = {"ham10000": load_ham10000, "folders": load_class_folders, "csv": load_csv}
    if layout not in loaders:
        raise DatasetError(f"unknown dataset layout {layout!r}: use one of {sorted(loaders)}")
    return loaders[layout](Path(root), **kw)


def check_samples(samples: list[Sample], labels: list[str]) -> None:
    """Refuse a dataset with missing images, unknown labels or fewer than two classes."""
    if not samples:
        raise DatasetError("the dataset is empty")
    missing = [s.path for s in samples if not s.path.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        raise DatasetError(
            f"{len(missing)} images are missing (e.g. {shown}); fix the paths or remove the rows"
        )
    unknown = sorted({s.label for s in samples} - set(labels))
    if unknown:
        raise DatasetError(f"labels {unknown} are not in the config's labels {labels}")
    present = {s.label for s in samples}
    if len(present) < 2:
        raise DatasetError(f"only one class ({', '.join(present)}) in the data: need at least two")


def split_samples(
    samples: list[Sample], fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, list[Sample]]:
    """Stratified, grouped, seeded split: every group goes wholly to one part.

    Groups are assigned per class (a group's majority label) in a seeded order, each to the
    part that is furthest below its target share, so class proportions hold in every part.
    """
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group].append(s)
    by_class: dict[str, list[str]] = defaultdict(list)
    for gid, members in groups.items():
        label = Counter(m.label for m in members).most_common(1)[0][0]
        by_class[label].append(gid)
    rng = random.Random(seed)
    parts: dict[str, list[Sample]] = {p: [] for p in PARTS}
    for label in sorted(by_class):
        gids = sorted(by_class[label])
        rng.shuffle(gids)
        total = sum(len(groups[g]) for g in gids)
        counts = dict.fromkeys(PARTS, 0)
        for gid in gids:
            deficit = {p: fractions[i] * total - counts[p] for i, p in enumerate(PARTS)}
            part = max(PARTS, key=lambda p: (deficit[p], -PARTS.index(p)))
            parts[part].extend(groups[gid])
            counts[part] += len(groups[gid])
    for p in PARTS:
        parts[p].sort(key=lambda s: str(s.path))
    return parts


def config_split(ds) -> dict[str, list[Sample]]:
    """The split a run of this dataset config trains on (``ds``: the config's [dataset]):
    loaded, limited per class, checked and split, seeded and grouped, so every command that
    comes after training rebuilds it exactly."""
    extra = {"csv_name": ds.csv} if ds.layout == "ham10000" and ds.csv else {}
    samples = load_samples(ds.layout, ds.root_path, **extra)
    if ds.limit_per_class:
        by: dict[str, list[Sample]] = {}
        for s in samples:
            by.setdefault(s.label, []).append(s)
        samples = [s for lab in sorted(by) for s in by[lab][: ds.limit_per_class]]
    check_samples(samples, ds.labels)
    return split_samples(samples, tuple(ds.fractions), ds.seed)


def write_split(parts: dict[str, list[Sample]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["part", "path", "label", "group"])
        for part in PARTS:
            for s in parts[part]:
                w.writerow([part, str(s.path), s.label, s.group])


def read_split(path: Path) -> dict[str, list[Sample]]:
    parts: dict[str, list[Sample]] = {p: [] for p in PARTS}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            parts[row["part"]].append(Sample(Path(row["path"]), row["label"], row["group"]))
    return parts


def class_weights(
    samples: list[Sample], labels: list[str], mode: str = "balanced"
) -> dict[int, float]:
    """Loss weights per class index.

    ``balanced``: n / (k × n_c), every class weighs the same (best balanced accuracy);
    ``sqrt``: the square root of that, a compromise when plain accuracy matters too;
    ``none``: all 1.
    """
    counts = Counter(s.label for s in samples)
    n, k = len(samples), len(labels)
    full = {i: n / (k * counts[lab]) if counts[lab] else 0.0 for i, lab in enumerate(labels)}
    if mode == "balanced":
        return full
    if mode == "sqrt":
        return {i: w**0.5 for i, w in full.items()}
    if mode == "none":
        return dict.fromkeys(full, 1.0)
    raise ValueError(f"class_weight must be balanced, sqrt or none, not {mode!r}")
