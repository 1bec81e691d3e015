"""Images that are not for a model, assembled offline: the other use's images, everyday photos
(``../shared`` and the few that ship inside installed packages), synthetic images, and for the
skin model near-scope crops of healthy skin cut from the borders of dermoscopy images.

None of these is used to fit the scope check or choose its threshold: they only measure it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from edge.paths import shared_dir

from .config import Config, load_config
from .datasets import load_samples, split_samples

CONFIGS = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class Image:
    """A file, or an array made here (what the kit's classifier is given)."""

    path: Path | None = None
    array: np.ndarray | None = None

    @classmethod
    def of(cls, path: Path) -> Image:
        return cls(path=Path(path))

    def load(self) -> str | np.ndarray:
        return str(self.path) if self.path is not None else self.array

    def load_array(self) -> np.ndarray:
        if self.array is not None:
            return self.array
        with PILImage.open(self.path) as im:
            return np.asarray(im.convert("RGB"))


def synthetic_images(seed: int = 20261201, each: int = 12) -> list[Image]:
    """Blank, black and single-colour frames, noise, gradients, checkerboards and text."""
    rng = np.random.default_rng(seed)
    h, w = 300, 400
    out: list[np.ndarray] = [np.full((h, w, 3), v, np.uint8) for v in (0, 30, 128, 200, 255)]
    out += [np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8) for _ in range(each)]
    for _ in range(each):
        out.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        level, spread = rng.uniform(60, 200), rng.uniform(5, 60)
        out.append(np.clip(rng.normal(level, spread, (h, w, 3)), 0, 255).astype(np.uint8))
    yy, xx = np.mgrid[:h, :w]
    radial = (np.hypot(yy - h / 2, xx - w / 2) / np.hypot(h / 2, w / 2))[..., None]
    for i in range(each):
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = (xx / w if i % 2 else yy / h)[..., None]
        out.append((a * (1 - t) + b * t).astype(np.uint8))
        out.append((a * (1 - radial) + b * radial).astype(np.uint8))
    for _ in range(each):
        s = int(rng.integers(4, 80))
        m = ((yy // s + xx // s) % 2)[..., None]
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        out.append((a * m + b * (1 - m)).astype(np.uint8))
    words = [
        "sample",
        "field",
        "report",
        "patient",
        "slide",
        "stain",
        "lesion",
        "FieldScope",
        "0123456789",
    ]
    for _ in range(each):
        im = PILImage.new("RGB", (w, h), tuple(int(v) for v in rng.integers(150, 256, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(3, 15))):
            xy = (int(rng.integers(0, w - 60)), int(rng.integers(0, h - 20)))
            ink = tuple(int(v) for v in rng.integers(0, 100, 3))
            draw.text(
                xy, " ".join(rng.choice(words, 3)), fill=ink, font_size=int(rng.integers(10, 40))
            )
        out.append(np.asarray(im))
    return [Image(array=a) for a in out]


def everyday_photos() -> list[Path]:
    """The shared folder's photos and those that ship inside installed packages."""
    photos = sorted((shared_dir() / "datasets/everyday-photos").glob("*.jpg"))
    try:
        import matplotlib

        extra = Path(matplotlib.__file__).parent / "mpl-data/sample_data"
        photos += [p for p in (extra / "Minduka_Present_Blue_Pack.png",) if p.is_file()]
    except ImportError:
        pass
    return photos


def quarters(paths: list[Path]) -> list[Image]:
    """The four quarters of each photo: closer views of the same scenes."""
    out = []
    for p in paths:
        a = Image.of(p).load_array()
        h, w = a.shape[:2]
        for y in (0, h // 2):
            for x in (0, w // 2):
                out.append(Image(array=np.ascontiguousarray(a[y : y + h // 2, x : x + w // 2])))
    return out


def border_crops(paths: list[Path]) -> list[Image]:
    """Each corner third of a dermoscopy image: skin beside the lesion, without it."""
    out = []
    for p in paths:
        a = Image.of(p).load_array()
        h, w = a.shape[:2]
        ch, cw = h // 3, w // 3
        for y, x in ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)):
            out.append(Image(array=np.ascontiguousarray(a[y : y + ch, x : x + cw])))
    return out


def _test_split(cfg: Config) -> list:
    samples = load_samples(cfg.dataset.layout, shared_dir() / cfg.dataset.root)
    return split_samples(samples, tuple(cfg.dataset.fractions), cfg.dataset.seed)["test"]


def out_of_scope_sets(cfg: Config, parts: dict) -> dict[str, tuple[str, list[Image]]]:
    sets: dict[str, tuple[str, list[Image]]] = {}
    if cfg.export.scope_other:
        other = load_config(CONFIGS / cfg.export.scope_other)
        sets["other use"] = (
            f"{other.name} test split",
            [Image.of(s.path) for s in _test_split(other)],
        )
    photos = everyday_photos()
    sets["everyday photos"] = (
        "shared everyday photos and package sample photos",
        [Image.of(p) for p in photos],
    )
    sets["photo quarters"] = ("the same photos, each quarter on its own", quarters(photos))
    sets["synthetic"] = (
        "blank, single colours, noise, gradients, checkerboards, text",
        synthetic_images(),
    )
    if cfg.dataset.layout == "ham10000":
        sets["healthy skin"] = (
            "corner thirds of every third test image, enlarged",
            border_crops([s.path for s in parts["test"][::3]]),
        )
    return sets
