"""Fine-tuning the top of a backbone on cached activations.

On a 2-core CPU a MobileNetV2 forward pass at 224 px costs about 30 ms per image, while training
only its last four blocks costs about 7 ms. Running the frozen bottom every epoch wastes most of
the budget, so it runs once per augmented copy of the training set; the top blocks and the head
then train for many epochs on those stored activations (each epoch draws one copy per image).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from .progress import bar

log = logging.getLogger(__name__)


def split_at(backbone, layer_name: str):
    """(bottom, top): ``bottom`` maps the image to the input of ``layer_name``, ``top`` maps that
    to the backbone's output. The layers are shared with ``backbone``: training ``top`` trains it.
    """
    import keras

    names = [layer.name for layer in backbone.layers]
    if layer_name not in names:
        raise ValueError(f"unfreeze_from: no layer {layer_name!r} in {backbone.name}")
    cut = backbone.get_layer(layer_name).input
    bottom = keras.Model(backbone.input, cut, name="bottom")
    try:
        top = keras.Model(cut, backbone.output, name="top")
    except Exception as exc:  # Keras reports a disconnected graph in several ways
        raise ValueError(
            f"cannot cache activations at {layer_name!r}: a skip connection crosses it; choose "
            f"the first layer of a block (e.g. block_13_expand)"
        ) from exc
    return bottom, top


def _key(images: np.ndarray, layer: str, copy: int, augmented: bool, extra: str = "") -> str:
    h = hashlib.sha256(f"{layer}|{copy}|{augmented}|{images.shape}{extra}".encode())
    h.update(np.ascontiguousarray(images[:: max(1, len(images) // 64)]).tobytes())
    return h.hexdigest()[:16]


def activations(
    bottom,
    images: np.ndarray,
    copies: int,
    augmented: bool,
    layer: str,
    cache_dir: Path,
    desc: str,
    batch: int = 64,
    seed: int = 0,
) -> np.ndarray:
    """(copies, N, h, w, c) float16 activations of ``bottom`` on ``copies`` augmented versions
    of ``images`` (uint8). Each copy is saved under ``cache_dir`` so a resumed run reuses it."""
    import tensorflow as tf

    from .input_pipeline import make_dataset

    def compute(k: int) -> np.ndarray:
        log.info("%s activations, copy %d of %d", desc, k + 1, copies)
        # One seed per copy: once a global seed is set (train() sets one), every freshly traced
        # augmentation gets the same op seeds, and the copies could come out identical.
        tf.random.set_seed(seed + k)
        ds = make_dataset(images, None, batch, train=augmented, shuffle=False)
        # predict, not a Python loop over the dataset: such a loop hung in the tf.data
        # iterator's destructor after the last batch (TF 2.21, 6,000 images).
        return bottom.predict(ds, verbose=1)

    shape = (copies, len(images), *bottom.output_shape[1:])
    paths = [
        cache_dir / f"{desc}-{k}-{_key(images, layer, k, augmented)}.npy" for k in range(copies)
    ]
    return _per_copy(shape, paths, compute)


def _per_copy(shape: tuple, paths: list[Path], compute) -> np.ndarray:
    """float16 ``shape`` filled copy by copy: from its file in ``paths`` when a run saved it,
    else ``compute(k)``, saved at once (atomically) so an interrupted run resumes there."""
    out = np.empty(shape, dtype=np.float16)
    for k, path in enumerate(paths):
        if path.is_file():
            out[k] = np.load(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        out[k] = compute(k)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, out[k])
        tmp.replace(path)
    return out


def augmented_uint8(images: np.ndarray, batch: int = 64) -> np.ndarray:
    """One augmented copy of ``images`` as uint8 pixels: what a camera would have delivered."""
    import keras

    from .input_pipeline import make_dataset

    identity = keras.Sequential([keras.Input(images.shape[1:]), keras.layers.Identity()])
    x = identity.predict(make_dataset(images, None, batch, train=True, shuffle=False), verbose=0)
    return np.clip(np.round(x * 127.5 + 127.5), 0, 255).astype(np.uint8)


def int8_activations(
    tflite: Path,
    images: np.ndarray,
    copies: int,
    augmented: bool,
    layer: str,
    cache_dir: Path,
    desc: str,
    seed: int = 0,
    chunk: int = 512,
    batch: int = 32,
) -> np.ndarray:
    """Like :func:`activations`, but computed by the int8 TFLite bottom (uint8 in and out).

    The int8 model's frozen bottom is off by about a quarter (relative error) from the float
    one on HAM10000 (blocks 0-10 of the transplanted MobileNetV2), and that is where nearly all
    int8/float disagreement came from. A top trained on these activations as well as the float
    ones learns to give the same answer for both.
    """
    import tensorflow as tf

    from edge.inference.runtime import resolve_runtime, usable_cores

    digest = "|int8 " + hashlib.sha256(tflite.read_bytes()).hexdigest()[:16]
    interp = resolve_runtime().interpreter_cls(model_path=str(tflite), num_threads=usable_cores())
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], [batch, *inp["shape"][1:]])
    interp.allocate_tensors()
    scale, zero = outp["quantization"]

    def compute(k: int) -> np.ndarray:
        log.info("%s int8 activations, copy %d of %d", desc, k + 1, copies)
        tf.random.set_seed(seed + 1000 + k)  # other augmentations than the float copies'
        acts = np.empty((len(images), *outp["shape"][1:]), dtype=np.float32)
        for start in bar(range(0, len(images), chunk), desc=f"{desc} int8 copy {k + 1}"):
            part = images[start : start + chunk]
            pixels = augmented_uint8(part) if augmented else part
            for b in range(0, len(pixels), batch):
                x = pixels[b : b + batch]
                n = len(x)
                if n < batch:  # the interpreter keeps one batch size: pad the last batch
                    x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), x.dtype)])
                interp.set_tensor(inp["index"], x)
                interp.invoke()
                q = interp.get_tensor(outp["index"])[:n]
                acts[start + b : start + b + n] = (q.astype(np.float32) - zero) * scale
        return acts

    shape = (copies, len(images), *outp["shape"][1:])
    paths = [
        cache_dir / f"{desc}-int8-{k}-{_key(images, layer, k, augmented, digest)}.npy"
        for k in range(copies)
    ]
    return _per_copy(shape, paths, compute)


def copies_dataset(
    acts: np.ndarray, labels: np.ndarray, weights: dict[int, float], batch: int, seed: int
):
    """A Keras dataset over cached copies: every epoch shows each image once, through a copy
    drawn at random, in a new order; yields (activations, label, class weight)."""
    import keras

    class Copies(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.w = np.array(
                [weights.get(i, 1.0) for i in range(int(labels.max()) + 1)], dtype=np.float32
            )
            self.on_epoch_end()

        def __len__(self) -> int:
            return int(np.ceil(len(labels) / batch))

        def on_epoch_end(self) -> None:
            self.order = self.rng.permutation(len(labels))
            self.copy = self.rng.integers(0, len(acts), len(labels))

        def __getitem__(self, i: int):
            idx = np.sort(self.order[i * batch : (i + 1) * batch])
            x = acts[self.copy[idx], idx].astype(np.float32)
            y = labels[idx]
            return x, y, self.w[y]

    return Copies()
