"""Which Keras layers and activations structured pruning can slice through,
and the per-channel constant a removed unit becomes on the way."""
from __future__ import annotations

import keras
import numpy as np

L = keras.layers

WEIGHTED = (L.Dense, L.Conv2D)  # compared with type(), so subclasses are not taken for them
POOLING = (L.MaxPooling2D, L.AveragePooling2D, L.GlobalAveragePooling2D, L.GlobalMaxPooling2D)
ELEMENTWISE_LAYERS = (L.Activation, L.ReLU, L.LeakyReLU, L.ELU)
PASS_THROUGH = POOLING + (L.Dropout,)
SUPPORTED = frozenset(WEIGHTED + POOLING + ELEMENTWISE_LAYERS + (L.Dropout, L.Flatten, L.BatchNormalization))

# Keras activations that act on each value separately (softmax, log_softmax,
# sparsemax and glu do not; threshold needs arguments a layer cannot give it).
ELEMENTWISE_ACTIVATIONS = frozenset({
    "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "tanh", "sigmoid", "hard_sigmoid",
    "log_sigmoid", "sparse_sigmoid", "softplus", "softsign", "sparse_plus", "squareplus", "swish", "silu",
    "hard_silu", "hard_swish", "gelu", "exponential", "mish", "hard_tanh", "hard_shrink", "soft_shrink",
    "tanh_shrink",
})

_MERGING = (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum, L.Concatenate, L.Dot)
_DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D, L.SeparableConv1D, L.SeparableConv2D)

SUPPORTED_TEXT = (
    "structured pruning supports single chains in which every pruned Conv2D/Dense layer "
    "reaches the next Conv2D/Dense layer through pooling/Flatten/BatchNormalization layers "
    "only (plus Activation, ReLU and Dropout); other layers are carried over unchanged "
    "when no pruned unit passes through them"
)


def is_weighted(layer) -> bool:
    """An exact ``Dense``/``Conv2D`` (not a subclass)."""
    return type(layer) in WEIGHTED


def units(layer) -> int:
    return int(layer.units) if isinstance(layer, L.Dense) else int(layer.filters)


def unsupported_reason(layer) -> str:
    """Why a removed unit cannot pass through ``layer`` (a type not in SUPPORTED)."""
    if type(layer).__name__ == "LocalResponseNormalization":
        return "mixes neighbouring channels, so removing one channel would change the others"
    if isinstance(layer, keras.Model):
        return "is a nested model; structured pruning needs one flat chain of layers"
    if isinstance(layer, L.Wrapper):
        return f"wraps another layer ({type(layer.layer).__name__})"
    if isinstance(layer, (L.RNN, L.Bidirectional)):
        return "is recurrent: its state mixes all units at every time step"
    if isinstance(layer, _MERGING):
        return "merges branches; only single chains can be sliced"
    if isinstance(layer, _DEPTHWISE):
        return "is a depthwise/separable convolution, which ties output channels to input channels"
    if isinstance(layer, (L.Reshape, L.Permute)):
        return "moves the channel axis"
    if not isinstance(layer, L.Layer):
        return "is a Keras operation (keras.ops) structured pruning does not know how to slice"
    return "is a layer type structured pruning does not know how to slice"


def activation_name(activation) -> str | None:
    """The Keras name of a built-in activation function, else None.

    Looked up rather than serialized: keras.activations.serialize warns on
    every lambda, and a custom function is unknown here either way.
    """
    name = getattr(activation, "__name__", None)
    try:
        return name if name and keras.activations.get(name) is activation else None
    except ValueError:
        return None


def apply_elementwise(layer, values: np.ndarray) -> np.ndarray:
    """``layer``'s activation (or the activation layer itself) on a (C,) vector."""
    x = keras.ops.convert_to_tensor(np.asarray(values, np.float32)[None, :])
    y = layer.activation(x) if isinstance(layer, (L.Activation,) + WEIGHTED) else layer(x)
    return keras.ops.convert_to_numpy(y).astype(np.float32)[0]


def maps_zero_to_nonzero(layer) -> bool:
    return bool(np.any(apply_elementwise(layer, np.zeros(1, np.float32)) != 0))


def bn_apply(layer, values: np.ndarray) -> np.ndarray:
    """Inference-mode BatchNormalization on a (C,) vector, computed in the
    order of keras.ops.batch_normalization on TensorFlow (x * inv + (beta - mean * inv))."""
    c = values.shape[0]
    numpy = keras.ops.convert_to_numpy
    gamma = numpy(layer.gamma) if layer.gamma is not None else np.ones(c, np.float32)
    beta = numpy(layer.beta) if layer.beta is not None else np.zeros(c, np.float32)
    mean, var = numpy(layer.moving_mean), numpy(layer.moving_variance)
    inv = (1.0 / np.sqrt(var + np.float32(layer.epsilon))).astype(np.float32) * gamma
    return (values * inv + (beta - mean * inv)).astype(np.float32)
