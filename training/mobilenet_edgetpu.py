"""Offline ImageNet initialisation: MobileNet-EdgeTPU rebuilt in Keras from its quantised file.

Keras has no MobileNet-EdgeTPU, and the TF-slim checkpoint needs a download. The model
garden's 8-bit file (``../shared/models-ref/mobilenet-edgetpu``) holds the whole network, so
the Keras model is read off its graph: each convolution becomes a convolution (no bias)
followed by a BatchNormalization whose beta is the folded bias (gamma 1, mean 0, variance
1 − epsilon, as for Coral's MobileNetV2 in :mod:`training.coral_weights`), with a ReLU where
the file's output range starts at exactly zero; residual ADDs become ``Add`` layers. The
backbone ends where the file's average pool starts (the 1280-channel ``Conv_1``), like
``include_top=False``; the 1001-way classifier is returned for the ImageNet check.

Strides come from the tensor shapes at 224 px; padding is ``same`` throughout (TF-slim's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.inference.runtime import resolve_runtime

from .coral_weights import _dequantize

MOBILENET_EDGETPU = "models-ref/mobilenet-edgetpu/mobilenet_edgetpu_1.0_224_uint8.tflite"


def _interpreter(path: Path):
    """The file's own ops, shapes allocated, no delegate fusing them away."""
    rt = resolve_runtime()
    kwargs = {}
    try:
        from ai_edge_litert.interpreter import OpResolverType

        kwargs["experimental_op_resolver_type"] = (
            OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        )
    except ImportError:  # tflite-runtime / TensorFlow Lite: same enum elsewhere
        try:
            from tflite_runtime.interpreter import OpResolverType  # type: ignore

            kwargs["experimental_op_resolver_type"] = (
                OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            )
        except ImportError:
            pass
    interp = rt.interpreter_cls(model_path=str(path), **kwargs)
    interp.allocate_tensors()
    return interp


def _layer_name(tensor_name: str) -> str:
    """``…;MobilenetEdgeTPU/expanded_conv_3/expand/BatchNorm_Fold/bias1`` →
    ``expanded_conv_3_expand``."""
    name = tensor_name.split(";")[-1]
    parts = name.split("/")
    if parts and parts[0] == "MobilenetEdgeTPU":
        parts = parts[1:]
    keep = [p for p in parts if p not in ("BatchNorm_Fold", "bias1", "add")]
    return "_".join(keep) or "conv"


def read_graph(path: Path) -> list[dict]:
    """The backbone's ops in graph order, each with what a Keras layer needs."""
    interp = _interpreter(path)
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    graph = []
    for op in interp._get_ops_details():
        kind = op["op_name"]
        out = tensors[op["outputs"][0]]
        if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            src = tensors[op["inputs"][0]]
            w, b = tensors[op["inputs"][1]], tensors[op["inputs"][2]]
            scale, zero = out["quantization"]
            graph.append(
                {
                    "op": kind,
                    "name": _layer_name(out["name"]),
                    "input": op["inputs"][0],
                    "output": op["outputs"][0],
                    "stride": int(src["shape"][1]) // int(out["shape"][1]),
                    "kernel": _dequantize(
                        interp.get_tensor(w["index"]), w["quantization_parameters"]
                    ),
                    "bias": _dequantize(
                        interp.get_tensor(b["index"]), b["quantization_parameters"]
                    ),
                    # uint8 output whose code 0 is the real 0: a ReLU was fused into the op.
                    "relu": zero == 0 and scale > 0,
                }
            )
        elif kind == "ADD":
            graph.append(
                {
                    "op": kind,
                    "name": _layer_name(out["name"]) + "_add",
                    "inputs": list(op["inputs"]),
                    "output": op["outputs"][0],
                }
            )
        elif kind == "AVERAGE_POOL_2D":
            graph.append({"op": kind, "input": op["inputs"][0]})
    return graph


def build_mobilenet_edgetpu(
    tflite_path: Path, input_shape: tuple[int, int, int] = (224, 224, 3), weights: bool = True
):
    """A Keras MobileNet-EdgeTPU backbone (input [-1, 1], output the 1280-channel map) and the
    ImageNet classifier (kernel [1280, 1001], bias). ``weights=False`` keeps Keras's random
    initialisation (the architecture still comes from the file)."""
    import keras

    graph = read_graph(Path(tflite_path))
    pool = next((i for i, n in enumerate(graph) if n["op"] == "AVERAGE_POOL_2D"), None)
    if pool is None or pool + 1 >= len(graph) or graph[pool + 1]["op"] != "CONV_2D":
        raise ValueError(f"{tflite_path}: not a MobileNet-EdgeTPU file (no pool + classifier)")
    inputs = keras.Input(input_shape, name="input")
    first = graph[0]["input"]
    values: dict[int, object] = {first: inputs}
    to_set = []
    for node in graph[:pool]:
        if node["op"] == "ADD":
            a, b = (values[i] for i in node["inputs"])
            values[node["output"]] = keras.layers.Add(name=node["name"])([a, b])
            continue
        kernel, name = node["kernel"], node["name"]
        if node["op"] == "DEPTHWISE_CONV_2D":
            k = kernel[0][..., np.newaxis]  # [1, kh, kw, c] → [kh, kw, c, 1]
            conv = keras.layers.DepthwiseConv2D(
                k.shape[:2], strides=node["stride"], padding="same", use_bias=False, name=name
            )
        else:
            k = np.transpose(kernel, (1, 2, 3, 0))  # [out, kh, kw, in] → [kh, kw, in, out]
            conv = keras.layers.Conv2D(
                k.shape[-1],
                k.shape[:2],
                strides=node["stride"],
                padding="same",
                use_bias=False,
                name=name,
            )
        bn = keras.layers.BatchNormalization(epsilon=1e-3, name=f"{name}_BN")
        x = bn(conv(values[node["input"]]))
        if node["relu"]:
            x = keras.layers.ReLU(name=f"{name}_relu")(x)
        values[node["output"]] = x
        to_set.append((conv, bn, k, node["bias"]))
    model = keras.Model(inputs, values[graph[pool]["input"]], name="mobilenet_edgetpu")
    if weights:
        for conv, bn, k, bias in to_set:
            expected = tuple(conv.get_weights()[0].shape)
            if k.shape != expected:
                raise ValueError(f"{conv.name}: kernel {k.shape} does not fit {expected}")
            conv.set_weights([k])
            n = bias.shape[0]
            one = np.ones(n, np.float32)
            bn.set_weights([one, bias, np.zeros(n, np.float32), one - bn.epsilon])
    cls = graph[pool + 1]
    return model, (np.transpose(cls["kernel"][:, 0, 0, :]), cls["bias"])
