"""Offline ImageNet initialisation: Keras MobileNetV2 from Coral's quantised reference model.

Labs often train with no internet, where ``weights="imagenet"`` cannot download. Coral's
``mobilenet_v2_1.0_224_quant.tflite`` holds the same network: its convolutions, in graph order,
are the Keras model's 52 convolution layers plus the 1001-way classifier. Each TFLite
convolution has batch norm folded in, so after dequantising, the folded bias becomes the beta of
the BatchNormalization that follows, with gamma 1, mean 0 and variance 1 − epsilon.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.inference.runtime import resolve_runtime

CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")


def _dequantize(values: np.ndarray, quant: dict) -> np.ndarray:
    scales = np.asarray(quant["scales"], dtype=np.float64)
    zeros = np.asarray(quant["zero_points"], dtype=np.float64)
    axis = quant.get("quantized_dimension", 0)
    if scales.size > 1:  # per-channel
        shape = [1] * values.ndim
        shape[axis] = -1
        scales, zeros = scales.reshape(shape), zeros.reshape(shape)
    return ((values.astype(np.float64) - zeros) * scales).astype(np.float32)


def read_tflite_convolutions(path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(op, float kernel in TFLite layout, float bias) for each convolution, in graph order."""
    rt = resolve_runtime()
    interp = rt.interpreter_cls(model_path=str(path))
    details = {t["index"]: t for t in interp.get_tensor_details()}
    convs = []
    for op in interp._get_ops_details():
        if op["op_name"] not in CONV_OPS:
            continue
        w_idx, b_idx = op["inputs"][1], op["inputs"][2]
        w = details[w_idx]
        b = details[b_idx]
        kernel = _dequantize(interp.get_tensor(w_idx), w["quantization_parameters"])
        bias = _dequantize(interp.get_tensor(b_idx), b["quantization_parameters"])
        convs.append((op["op_name"], kernel, bias))
    return convs


def load_into_mobilenetv2(model, tflite_path: Path) -> np.ndarray:
    """Set every conv + batch-norm pair of a Keras MobileNetV2 (alpha 1.0) from the TFLite file.

    Returns the 1001-way classifier (kernel [1280, 1001], bias) for checks and ImageNet heads.
    """
    import keras

    convs = read_tflite_convolutions(Path(tflite_path))
    layers = [
        layer
        for layer in model.layers
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))
    ]
    if len(convs) != len(layers) + 1:
        raise ValueError(
            f"{tflite_path} has {len(convs)} convolutions; MobileNetV2 needs {len(layers) + 1}"
        )
    by_name = {layer.name: layer for layer in model.layers}
    for layer, (op, kernel, bias) in zip(layers, convs[:-1], strict=True):
        if op == "DEPTHWISE_CONV_2D":
            # TFLite [1, kh, kw, in*mult] → Keras [kh, kw, in, mult]
            k = kernel[0][..., np.newaxis]
        else:
            # TFLite [out, kh, kw, in] → Keras [kh, kw, in, out]
            k = np.transpose(kernel, (1, 2, 3, 0))
        expected = tuple(layer.get_weights()[0].shape)
        if k.shape != expected:
            raise ValueError(f"{layer.name}: TFLite kernel {k.shape} does not fit {expected}")
        layer.set_weights([k])
        bn = following_batchnorm(layer, by_name)
        eps = bn.epsilon
        n = bias.shape[0]
        bn.set_weights(
            [
                np.ones(n, np.float32),
                bias,
                np.zeros(n, np.float32),
                np.full(n, 1.0 - eps, np.float32),
            ]
        )
    _, head_kernel, head_bias = convs[-1]
    return np.transpose(head_kernel[:, 0, 0, :]), head_bias


def following_batchnorm(layer, by_name):
    # Keras names them pairwise: Conv1/bn_Conv1, block_N_expand/block_N_expand_BN,
    # expanded_conv_depthwise/expanded_conv_depthwise_BN, Conv_1/Conv_1_bn.
    for candidate in (f"{layer.name}_BN", f"bn_{layer.name}", f"{layer.name}_bn"):
        if candidate in by_name:
            return by_name[candidate]
    raise ValueError(f"no BatchNormalization after {layer.name}")
