"""The scope check and the class activation map, from the model's own feature outputs.

A bundle's int8 model may carry, besides its class output, a few *taps*: feature maps of the
backbone (an early one that sees texture and colour, and the last one, which the head pools).
Both jobs below are a handful of small matrix products on those maps, in numpy:

- **Scope** (is this image what the model was made for?): each tap is pooled to the per-channel
  mean and standard deviation over its locations (signed square roots, which make ReLU features
  closer to Gaussian), projected and whitened (PCA + a class-conditional Gaussian with a shared
  covariance, fitted by ``training`` on the training split), and scored by the Mahalanobis
  distance to the nearest class mean. Each tap's distance is standardised by its spread on the
  validation split and the largest counts: an image is out of scope when it exceeds the
  threshold chosen on validation for the bundle's in-scope acceptance.
- **Where the model looked**: the head is global-average pooling followed by dense layers
  (ReLU between them), so with the dense layers' active units fixed at the pooled point, each
  logit is the average over locations of ``w_c · f(x, y)`` plus a constant: that per-location
  term is the class activation map (exact in float for a single dense layer, Zhou et al. 2016).
  The decision group's map uses the gradient of the log group probability in the logits.

The parameters live in the bundle's ``scope`` file (``.npz``), validated when it loads.
"""

from __future__ import annotations

import io
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError

SCOPE_FORMAT = 1


def pooled(fmap: np.ndarray) -> np.ndarray:
    """(H, W, C) float map → the scope feature: signed √mean and √std per channel (2C,)."""
    flat = fmap.reshape(-1, fmap.shape[-1])
    mean = flat.mean(axis=0)
    std = flat.std(axis=0)
    return np.concatenate([np.sign(mean) * np.sqrt(np.abs(mean)), np.sqrt(std)])


_scratch = threading.local()  # per thread: the live worker and an upload may pool at once


def _buffers(shape: tuple[int, int], dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Two reused (locations, channels) buffers: a fresh 250 KB array per frame costs page
    faults that took longer than the sums themselves."""
    cache = getattr(_scratch, "buffers", None)
    if cache is None:
        cache = _scratch.buffers = {}
    key = (shape, dtype)
    if key not in cache:
        cache[key] = (np.empty(shape, dtype), np.empty(shape, dtype))
    return cache[key]


def pooled_tap(raw: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """The scope feature of a tap as the model returned it (int8/uint8 or float), without
    dequantising the map first: the mean and standard deviation of ``(q - zero) * scale`` are
    ``(mean(q) - zero) * scale`` and ``std(q) * scale``. Equal to
    ``pooled(dequantize_map(raw, detail))`` within float32 rounding at a third of its cost:
    this runs on every live frame."""
    arr = raw[0] if raw.ndim == 4 else raw
    scale, zero = detail.get("quantization", (0.0, 0))
    if arr.dtype.kind not in "iu" or not scale:
        return pooled(dequantize_map(raw, detail))
    shape = (arr.shape[0] * arr.shape[1], arr.shape[2])
    n = shape[0]
    # Sums of integer values and of their squares are exact in float32 up to 2**24; beyond
    # that (a map of over a thousand locations) they are taken in float64.
    dtype = np.float32 if n * 256 * 256 < 2**24 else np.float64
    flat, squares = _buffers(shape, dtype)
    np.copyto(flat, arr.reshape(shape))
    np.multiply(flat, flat, out=squares)
    # The sums are exact integers; the moments are taken from them in float64 (the variance
    # is a difference of two close numbers when a channel barely varies).
    m = flat.sum(axis=0).astype(np.float64) / n
    var = squares.sum(axis=0).astype(np.float64) / n - m * m
    mean = (m - zero) * scale
    std = np.sqrt(np.maximum(var, 0.0)) * scale
    return np.concatenate([np.sign(mean) * np.sqrt(np.abs(mean)), np.sqrt(std)]).astype(
        np.float32, copy=False)


def dequantize_map(raw: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """An int8/uint8 tap → float (H, W, C); float taps pass through."""
    scale, zero = detail.get("quantization", (0.0, 0))
    arr = raw[0] if raw.ndim == 4 else raw
    if arr.dtype.kind in "iu" and scale:
        return (arr.astype(np.float32) - np.float32(zero)) * np.float32(scale)
    return arr.astype(np.float32)


@dataclass(frozen=True)
class Tap:
    """One feature map used by the scope check: its shape and the fitted whitening."""

    shape: tuple[int, int, int]
    mean: np.ndarray  # (D,) feature mean
    project: np.ndarray  # (D, k): PCA then whitening by the shared covariance
    centres: np.ndarray  # (n_classes, k) class means in the whitened space
    median: float  # of the validation distances
    spread: float  # their standard deviation

    def distance(self, feature: np.ndarray) -> float:
        z = (feature - self.mean) @ self.project
        d = ((self.centres - z) ** 2).sum(axis=1).min()
        return float((d - self.median) / self.spread)


@dataclass(frozen=True)
class Head:
    """The dense layers after the pooling, dequantised from the int8 model: [(W, b, relu)]."""

    layers: tuple[tuple[np.ndarray, np.ndarray, bool], ...]

    def logits_and_weights(self, pooled_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits at the pooled point and the effective (C_feat, n_classes) linear map."""
        x = pooled_mean.astype(np.float64)
        eff = None
        for w, b, relu in self.layers:
            pre = x @ w + b
            x = np.maximum(pre, 0) if relu else pre
            wl = w * (pre > 0)[None, :] if relu else w
            eff = wl if eff is None else eff @ wl
        assert eff is not None, "a head has at least one dense layer"
        return x, eff


@dataclass(frozen=True)
class ScopeModel:
    taps: tuple[Tap, ...]
    threshold: float
    head: Head | None
    cam_tap: int  # which tap the head pools (the last feature map)
    acceptance: float  # in-scope share of validation images kept at the threshold

    def check(self, features: list[np.ndarray]) -> dict[str, Any]:
        """The verdict on one image from its taps' scope features (:func:`pooled_tap`)."""
        score = max(t.distance(f) for t, f in zip(self.taps, features, strict=True))
        return {
            "in_scope": bool(score <= self.threshold),
            "score": round(score, 3),
            "threshold": round(self.threshold, 3),
        }

    def activation_maps(
        self, fmap: np.ndarray, probs: np.ndarray, cls: int, group: list[int] | None
    ) -> dict[str, Any] | None:
        """Per-location evidence for class ``cls`` and (if given) the decision group, in logit
        units, with the model's own probabilities ``probs`` for the group's weighting."""
        if self.head is None:
            return None
        h, w, c = fmap.shape
        flat = fmap.reshape(-1, c).astype(np.float64)
        _, eff = self.head.logits_and_weights(flat.mean(axis=0))
        per_class = flat @ eff  # (h*w, n_classes): averages to the logits minus a constant
        out: dict[str, Any] = {"size": [h, w], "class": per_class[:, cls].reshape(h, w)}
        if group:
            p = probs.astype(np.float64)
            pg = max(float(p[group].sum()), 1e-9)
            coef = -p.copy()
            coef[group] += p[group] / pg  # d log P(group) / d logit
            out["group"] = (per_class @ coef).reshape(h, w)
        return out


def _arr(z: Any, key: str, where: str) -> np.ndarray:
    if key not in z.files:
        raise BundleError(
            f"{where}: scope file lacks {key!r}", "rebuild it with `python -m training scope`"
        )
    return np.asarray(z[key])


def load_scope(path: Path, where: str) -> ScopeModel:
    """Read and check a scope file; every defect is a BundleError naming the file."""
    try:
        data = path.read_bytes()
        z = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise BundleError(
            f"{where}: scope file {path.name} cannot be read ({exc})",
            "copy the bundle again or rebuild it with `python -m training scope`",
        ) from exc
    fmt = int(_arr(z, "format", where))
    if fmt != SCOPE_FORMAT:
        raise BundleError(
            f"{where}: scope file format {fmt}, this kit reads {SCOPE_FORMAT}",
            "rebuild it with this version's `python -m training scope`",
        )
    n = int(_arr(z, "n_taps", where))
    taps = []
    for i in range(n):
        shape = tuple(int(v) for v in _arr(z, f"tap{i}_shape", where))
        mean = _arr(z, f"tap{i}_mean", where).astype(np.float32)
        proj = _arr(z, f"tap{i}_project", where).astype(np.float32)
        centres = _arr(z, f"tap{i}_centres", where).astype(np.float32)
        stats = _arr(z, f"tap{i}_stats", where).astype(np.float64)
        d = 2 * shape[2] if len(shape) == 3 else -1
        if (
            len(shape) != 3
            or mean.shape != (d,)
            or proj.ndim != 2
            or proj.shape[0] != d
            or centres.ndim != 2
            or centres.shape[1] != proj.shape[1]
            or stats.shape != (2,)
            or not stats[1] > 0
        ):
            raise BundleError(
                f"{where}: scope tap {i} has inconsistent shapes (map {list(shape)}, mean "
                f"{list(mean.shape)}, projection {list(proj.shape)}, centres "
                f"{list(centres.shape)})",
                "the file does not belong to this model; rebuild it with `python -m training "
                "scope`",
            )
        for arr in (mean, proj, centres):
            if not np.isfinite(arr).all():
                raise BundleError(
                    f"{where}: scope tap {i} holds NaN or infinite values",
                    "rebuild it with `python -m training scope`",
                )
        taps.append(Tap(shape, mean, proj, centres, float(stats[0]), float(stats[1])))
    if not taps:
        raise BundleError(f"{where}: scope file has no taps", "rebuild it")
    layers: list[tuple[np.ndarray, np.ndarray, bool]] = []
    for j in range(int(z["n_dense"]) if "n_dense" in z.files else 0):
        w = _arr(z, f"dense{j}_w", where).astype(np.float64)
        b = _arr(z, f"dense{j}_b", where).astype(np.float64)
        relu = bool(_arr(z, f"dense{j}_relu", where))
        if (
            w.ndim != 2
            or b.shape != (w.shape[1],)
            or (layers and layers[-1][0].shape[1] != w.shape[0])
        ):
            raise BundleError(
                f"{where}: scope head layer {j} has inconsistent shapes",
                "rebuild it with `python -m training scope`",
            )
        layers.append((w, b, relu))
    cam_tap = int(_arr(z, "cam_tap", where))
    head = Head(tuple(layers)) if layers else None
    if head is not None and layers[0][0].shape[0] != taps[cam_tap].shape[2]:
        raise BundleError(
            f"{where}: scope head expects {layers[0][0].shape[0]} features, "
            f"tap {cam_tap} has {taps[cam_tap].shape[2]}",
            "rebuild it",
        )
    return ScopeModel(
        tuple(taps),
        float(_arr(z, "threshold", where)),
        head,
        cam_tap,
        float(_arr(z, "acceptance", where)),
    )


def save_scope(path: Path, model: dict[str, np.ndarray]) -> None:
    """Write the arrays ``training`` fitted (see :func:`load_scope` for the keys)."""
    buf = io.BytesIO()
    arrays: dict[str, np.ndarray] = {"format": np.asarray(SCOPE_FORMAT, dtype=np.int64),
                                      **model}
    savez: Any = np.savez  # numpy's stub types **kwds as its allow_pickle flag
    savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def match_taps(details: list[dict[str, Any]], shapes: list[tuple[int, int, int]]) -> list[int]:
    """Which of the model's extra outputs is each tap (by shape: the compiler may rename or
    reorder outputs, never reshape them)."""
    found = []
    for shape in shapes:
        hits = [
            i
            for i, d in enumerate(details)
            if tuple(int(v) for v in d["shape"])[1:] == tuple(shape) and i not in found
        ]
        if not hits:
            have = [list(int(v) for v in d["shape"]) for d in details]
            raise BundleError(
                f"the model has no feature output of shape {list(shape)} for the scope check "
                f"(outputs: {have})",
                "the scope file belongs to another model; rebuild it with `python -m training "
                "scope`",
            )
        found.append(hits[0])
    return found


def to_png_map(values: np.ndarray) -> np.ndarray:
    """Map → [0, 1] for display: positive evidence only, scaled by its own maximum."""
    v = np.maximum(np.asarray(values, dtype=np.float64), 0)
    top = v.max()
    return v / top if top > 0 else v
