"""Images → cached uint8 arrays → tf.data pipelines with augmentation.

Decoding thousands of JPEGs every epoch would keep two cores busy doing nothing useful, so every
image is decoded once, resized with the *edge's own* preprocessing (what the Pi will do) and kept
as a uint8 array on disk next to the run; augmentation then happens on tensors.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edge.inference.preprocess import open_image, resize

from .datasets import Sample
from .progress import bar


def load_model_input(path: Path, hw: tuple[int, int], mode: str) -> np.ndarray:
    """One image file → the (H, W, 3) uint8 array the model sees, by the edge's own path."""
    h, w = hw
    img = open_image(path, target=(w, h))
    return np.asarray(resize(img, (h, w), mode), dtype=np.uint8)


def cache_images(
    samples: list[Sample],
    hw: tuple[int, int],
    mode: str,
    cache_dir: Path,
    desc: str = "images",
) -> np.ndarray:
    """(N, H, W, 3) uint8, built once and reused while the file list is unchanged."""
    h, w = hw
    size = str(h) if h == w else f"{h}x{w}"
    key = hashlib.sha256(
        "\n".join([size, mode] + [str(s.path) for s in samples]).encode()
    ).hexdigest()[:16]
    cache = cache_dir / f"{desc}-{size}-{key}.npy"
    if cache.is_file():
        return np.load(cache)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = np.empty((len(samples), h, w, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = pool.map(lambda s: load_model_input(s.path, (h, w), mode), samples)
        for i, arr in enumerate(bar(jobs, total=len(samples), desc=f"decode {desc}", unit="img")):
            out[i] = arr
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(cache)
    return out


def normalise(x):
    """uint8 RGB → [-1, 1], the manifest's mean 127.5 / std 127.5."""
    import tensorflow as tf

    return (tf.cast(x, tf.float32) - 127.5) / 127.5


def augment(x, rotate: bool = False):
    """Dermoscopy and microscopy have no 'up': flips and right-angle turns are free (on a
    non-square input only the half turn keeps the shape, and the two flips give it), and with
    ``rotate`` any angle (edges filled by reflection); a lesion is framed a little closer or
    further each time; colour and brightness vary between cameras, stains and lights."""
    import tensorflow as tf

    h, w = x.shape[0], x.shape[1]
    x = tf.image.random_flip_left_right(x)
    x = tf.image.random_flip_up_down(x)
    if h == w:
        x = tf.image.rot90(x, k=tf.random.uniform([], 0, 4, dtype=tf.int32))
    x = tf.cast(x, tf.float32) / 255.0
    if rotate:
        x = random_rotation(x)
    x = random_zoom(x, 0.8)
    x = tf.image.random_brightness(x, 0.08)
    x = tf.image.random_contrast(x, 0.9, 1.1)
    x = tf.image.random_saturation(x, 0.9, 1.1)
    x = tf.image.random_hue(x, 0.02)
    return tf.clip_by_value(x, 0.0, 1.0) * 2.0 - 1.0


def random_rotation(x):
    """Turn by a random angle about the centre, filling the corners by reflection."""
    import math

    import tensorflow as tf

    h, w = float(x.shape[0]), float(x.shape[1])
    a = tf.random.uniform([], 0.0, 2 * math.pi)
    c, s = tf.cos(a), tf.sin(a)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    # Output pixel (x, y) reads input (c·x − s·y + tx, s·x + c·y + ty): a turn about the centre.
    transform = tf.stack(
        [c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy, 0.0, 0.0]
    )[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None],
        transforms=transform,
        output_shape=tf.constant([int(h), int(w)]),
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
    return out[0]


def random_zoom(x, min_scale: float):
    """Crop a random window of ``min_scale``..1 of each side (same aspect ratio) and scale it
    back to the input size; at most half the images are zoomed."""
    import tensorflow as tf

    h, w = x.shape[0], x.shape[1]
    s = tf.random.uniform([], min_scale, 1.0)
    s = tf.where(tf.random.uniform([]) < 0.5, 1.0, s)
    y0 = tf.random.uniform([], 0.0, 1.0 - s)
    x0 = tf.random.uniform([], 0.0, 1.0 - s)
    box = tf.stack([y0, x0, y0 + s, x0 + s])[None]
    return tf.image.crop_and_resize(x[None], box, [0], [h, w])[0]


def class_sampling_weights(labels: np.ndarray, n_classes: int, mode: str) -> np.ndarray:
    """How often each class is drawn: ``balanced`` equally, ``sqrt`` ∝ √count, ``none`` ∝
    count. Sums to 1."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    power = {"none": 1.0, "sqrt": 0.5, "balanced": 0.0}[mode]
    weights = np.where(counts > 0, counts**power, 0.0)
    return weights / weights.sum()


def sampled_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    mode: str,
    batch: int,
    seed: int = 0,
    targets: np.ndarray | None = None,
    rotate: bool = False,
):
    """An endless stream of augmented (image, target) batches, classes drawn with the
    probabilities of :func:`class_sampling_weights` (each class reshuffled on every pass).
    The target is the class index, or the row of ``targets`` (soft labels) when given."""
    import tensorflow as tf

    probs = class_sampling_weights(labels, n_classes, mode)
    parts, weights = [], []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        if not len(idx):
            continue
        out = labels[idx] if targets is None else targets[idx]
        ds = tf.data.Dataset.from_tensor_slices((images[idx], out))
        parts.append(ds.shuffle(len(idx), seed=seed + c, reshuffle_each_iteration=True).repeat())
        weights.append(float(probs[c]))
    picks = tf.data.Dataset.sample_from_datasets(parts, weights=weights, seed=seed)
    return (
        picks.map(lambda x, y: (augment(x, rotate), y), num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch)
        .prefetch(tf.data.AUTOTUNE)
    )


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray | None,
    batch: int,
    train: bool,
    seed: int = 0,
    shuffle: bool | None = None,
    rotate: bool = False,
):
    """Batches normalised (or, for ``train``, augmented) images; ``shuffle`` defaults to
    ``train`` (off where outputs must stay in input order)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((images, labels) if labels is not None else images)
    if train if shuffle is None else shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    fn = (lambda x: augment(x, rotate)) if train else normalise
    if labels is not None:
        ds = ds.map(lambda x, y: (fn(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch).prefetch(tf.data.AUTOTUNE)
