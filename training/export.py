"""Keras model → float TFLite and full-integer (uint8 in/out) TFLite; every op checked."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edge.inference.runtime import resolve_runtime

log = logging.getLogger(__name__)
INT_TYPES = {np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int32), np.dtype(np.int16)}


class ExportError(RuntimeError):
    pass


def _converter(model):
    """A converter for batch size 1: the Edge TPU needs static shapes, and the Pi classifies one
    image at a time."""
    import keras
    import tensorflow as tf

    inputs = keras.Input(shape=model.input_shape[1:], batch_size=1, name="image")
    fixed = keras.Model(inputs, model(inputs, training=False))
    return tf.lite.TFLiteConverter.from_keras_model(fixed)


def logits_model(model):
    """The same model without its final softmax, sharing every weight.

    An int8 softmax output has steps of 1/256: a group score (the sum of a few class
    probabilities) then takes few distinct values near 0, and the decision's ROC suffers (on
    HAM10000: malignant AUC 0.838 instead of 0.867). Int8 logits keep that resolution; the edge
    applies the softmax in float (manifest ``"output": "logits"``).
    """
    import keras

    from .model import clone_with

    found = []

    def swap(layer):
        if isinstance(layer, keras.layers.Dense) and layer.activation is keras.activations.softmax:
            config = {**layer.get_config(), "activation": "linear", "name": f"{layer.name}_logits"}
            plain = keras.layers.Dense.from_config(config)
            plain.build(layer.input.shape)
            plain.set_weights(layer.get_weights())
            found.append(layer.name)
            return plain
        return layer

    clone = clone_with(model, swap)
    if len(found) != 1:
        raise ExportError(f"expected one softmax Dense layer to remove, found {found or 'none'}")
    return clone


def export_float(model, out: Path) -> Path:
    out.write_bytes(_converter(model).convert())
    return out


def calibration_images(x_train: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The calibration images: a seeded sample of the training images. The int8 bottom used in
    training (train.int8_copies) is calibrated on the same ones, so its ranges are the shipped
    model's."""
    rng = np.random.default_rng(seed)
    return x_train[rng.choice(len(x_train), size=min(n, len(x_train)), replace=False)]


def export_int8(model, representative: np.ndarray, out: Path) -> Path:
    """Post-training full-integer quantisation with uint8 input and output (Edge TPU ready).

    ``representative``: uint8 training images; they are normalised like the model's input.
    """
    import tensorflow as tf

    def gen():
        for img in representative:
            yield [((img.astype(np.float32) - 127.5) / 127.5)[None]]

    converter = _converter(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = gen
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    out.write_bytes(converter.convert())
    problems = float_ops(out)
    if problems:
        raise ExportError(f"{out.name} is not fully integer: {'; '.join(problems[:5])}")
    return out


def ops_of(path: Path) -> list[dict]:
    """The model's ops with their tensors' details (name, shape, dtype, quantisation)."""
    interp = resolve_runtime().interpreter_cls(model_path=str(path))
    details = {t["index"]: t for t in interp.get_tensor_details()}
    ops = []
    for op in interp._get_ops_details():
        tensors = [details[i] for i in list(op["inputs"]) + list(op["outputs"]) if i >= 0]
        activations = [details[i] for i in [op["inputs"][0], *op["outputs"]] if i >= 0]
        ops.append(
            {
                "index": op["index"],
                "op": op["op_name"],
                "tensors": tensors,
                "activations": activations,
            }
        )
    return ops


def float_ops(path: Path) -> list[str]:
    """Ops that touch a float tensor (an int8 model must have none)."""
    bad = []
    for op in ops_of(path):
        floats = [t["name"] for t in op["tensors"] if np.dtype(t["dtype"]) not in INT_TYPES]
        if floats:
            bad.append(f"op {op['index']} {op['op']} has float tensors {floats[:2]}")
    return bad
