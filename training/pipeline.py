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
from tqdm import tqdm

from edge.preprocess import open_image, resize

from .datasets import Sample


def _load_one(path: Path, size: int, mode: str) -> np.ndarray:
    img = open_image(path, target=(size, size))
    return np.asarray(resize(img, (size, size), mode), dtype=np.uint8)


def cache_images(
    samples: list[Sample], size: int, mode: str, cache_dir: Path, desc: str = "images"
) -> np.ndarray:
    """(N, size, size, 3) uint8, built once and reused while the file list is unchanged."""
    key = hashlib.sha256(
        "\n".join([str(size), mode] + [str(s.path) for s in samples]).encode()
    ).hexdigest()[:16]
    cache = cache_dir / f"{desc}-{size}-{key}.npy"
    if cache.is_file():
        return np.load(cache)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = pool.map(lambda s: _load_one(s.path, size, mode), samples)
        for i, arr in enumerate(tqdm(jobs, total=len(samples), desc=f"decode {desc}", unit="img")):
            out[i] = arr
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(cache)
    return out


def normalise(x):
    """uint8 RGB → [-1, 1], the manifest's mean 127.5 / std 127.5."""
    import tensorflow as tf

    return (tf.cast(x, tf.float32) - 127.5) / 127.5


def augment(x):
    """Dermoscopy and microscopy have no 'up': flips and right-angle turns are free; colour and
    brightness vary between cameras, stains and lights."""
    import tensorflow as tf

    x = tf.image.random_flip_left_right(x)
    x = tf.image.random_flip_up_down(x)
    x = tf.image.rot90(x, k=tf.random.uniform([], 0, 4, dtype=tf.int32))
    x = tf.cast(x, tf.float32) / 255.0
    x = tf.image.random_brightness(x, 0.08)
    x = tf.image.random_contrast(x, 0.9, 1.1)
    x = tf.image.random_saturation(x, 0.9, 1.1)
    x = tf.image.random_hue(x, 0.02)
    return tf.clip_by_value(x, 0.0, 1.0) * 2.0 - 1.0


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray | None,
    batch: int,
    train: bool,
    seed: int = 0,
    shuffle: bool | None = None,
):
    """Batches normalised (or, for ``train``, augmented) images; ``shuffle`` defaults to
    ``train`` (off where outputs must stay in input order)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((images, labels) if labels is not None else images)
    if train if shuffle is None else shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    fn = augment if train else normalise
    if labels is not None:
        ds = ds.map(lambda x, y: (fn(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch).prefetch(tf.data.AUTOTUNE)
