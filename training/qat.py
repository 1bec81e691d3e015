"""Quantisation-aware fine-tuning: the trained layers learn under simulated int8 activations.

Full-integer export rounds every tensor the int8 model stores to 256 levels. On HAM10000 that cost
about 2 points of accuracy after training in float. The TF Model Optimization toolkit, which does
quantisation-aware training for Keras 2, does not support Keras 3, so this module simulates the
rounding itself: each tensor the int8 model keeps (the outputs of ReLU6, of the linear
bottlenecks, of residual adds, of pooling and dense layers, and the cached input activations)
passes through ``tf.quantization.fake_quant_with_min_max_vars`` with its range tracked by a
moving average, and gradients pass straight through inside the range.

The simulated model shares its weights with the float model, which is then exported by the usual
post-training path: calibration finds ranges close to the simulated ones, and the weights have
learned to tolerate the rounding. Weights are not simulated: they are quantised per channel,
where the rounding error is much smaller than for activations.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from .model import clone_with


@keras.saving.register_keras_serializable(package="fieldscope")
class FakeQuant(keras.layers.Layer):
    """8-bit fake quantisation with an exponential moving average of the batch min/max; the
    range always holds 0, as TFLite's asymmetric quantisation requires."""

    def __init__(self, momentum: float = 0.99, **kwargs) -> None:
        super().__init__(**kwargs)
        self.momentum = momentum

    def build(self, input_shape) -> None:
        def var(name: str):
            return self.add_weight(shape=(), initializer="zeros", trainable=False, name=name)

        self.lo, self.hi, self.seen = var("lo"), var("hi"), var("seen")

    def call(self, x, training=None):
        if training:
            m = tf.where(self.seen > 0, self.momentum, 0.0)  # the first batch sets the range
            self.lo.assign(m * self.lo + (1 - m) * tf.minimum(tf.reduce_min(x), 0.0))
            self.hi.assign(m * self.hi + (1 - m) * tf.maximum(tf.reduce_max(x), 0.0))
            self.seen.assign(1.0)
        hi = tf.maximum(self.hi, self.lo + 1e-6)
        return tf.quantization.fake_quant_with_min_max_vars(x, self.lo, hi, num_bits=8)

    def get_config(self) -> dict:
        return {**super().get_config(), "momentum": self.momentum}


class Quantised(keras.layers.Layer):
    """A layer of the float model (shared, not copied) whose output is fake-quantised."""

    def __init__(self, inner: keras.layers.Layer, **kwargs) -> None:
        super().__init__(name=f"{inner.name}_q", **kwargs)
        self.inner = inner
        self.fq = FakeQuant(name=f"{inner.name}_fq")

    def call(self, inputs, training=None, mask=None):
        return self.fq(self.inner(inputs), training=training)


def stores_a_tensor(layer: keras.layers.Layer) -> bool:
    """Layers whose output is a tensor of the int8 model (not fused into the next op)."""
    if isinstance(layer, keras.layers.ReLU | keras.layers.Add | keras.layers.Dense):
        return True
    if isinstance(layer, keras.layers.GlobalAveragePooling2D):
        return True
    # MobileNetV2's linear bottlenecks: BatchNorm after the projection, with no activation.
    return isinstance(layer, keras.layers.BatchNormalization) and "project" in layer.name


def simulate_int8(model: keras.Model) -> keras.Model:
    """A twin of ``model`` (a Functional, possibly holding nested Functionals such as the head)
    with fake quantisation on its input and after every layer that stores a tensor."""

    twin = clone_with(model, lambda layer: Quantised(layer) if stores_a_tensor(layer) else layer)
    inputs = keras.Input(model.input_shape[1:], name="activations")
    return keras.Model(inputs, twin(FakeQuant(name="input_fq")(inputs)), name="int8_sim")
