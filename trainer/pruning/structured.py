"""Structured pruning: remove whole Dense units and Conv2D filters, then slice the model.

A *unit* is an output unit of a ``Dense`` layer or an output channel (filter) of a
``Conv2D`` layer. :func:`select_units` keeps, in every prunable layer, the units
whose kernel slice has the largest L2 norm. The result can be used in two ways:

* the **masked model**: the original model with its weights multiplied by
  :func:`unit_masks` (the kernel slice and the bias entry of every removed unit
  set to zero), e.g. for fine-tuning with the pruned structure fixed;
* the **sliced model**: :func:`slice_model` builds a new, smaller model of the
  same topology (same layer names, same model name) in which every removed unit
  is physically gone -- the layer keeps an ``(M - r) x N`` kernel instead of
  ``M x N`` -- and the *next* weighted layer's input dimension is sliced to match.

In inference mode (``training=False``) both produce the same outputs, up to
float32 rounding (well within 1e-5 for ordinary models).

Why slicing is exact
--------------------
A removed unit has a zero kernel slice and a zero bias, so in the masked model
it outputs ``activation(0)`` at every position, for every input. Between the
pruned layer and the next Dense/Conv2D only per-channel operations are allowed
(pooling, Dropout, Flatten, elementwise activations, BatchNormalization), so the
removed channel stays a per-channel *constant* ``k`` all the way to the next
weighted layer:

* ``k == 0`` (relu, linear, tanh, ... with no BatchNormalization on the way):
  the channel contributes nothing, and cutting it out is exact.
* ``k != 0`` (BatchNormalization maps 0 to ``beta - gamma * mean / sqrt(var + eps)``;
  sigmoid, softplus, ... map 0 to a nonzero value): the channel adds the same
  amount ``sum(k * W[rows of that channel])`` to every output of the next layer.
  :func:`slice_model` folds that amount into the next layer's bias.

**BatchNormalization / non-zero-preserving activation rule.** If the path from
a pruned layer to the next weighted layer contains a BatchNormalization layer or
an activation with ``f(0) != 0`` (including the pruned layer's own activation),
the next weighted layer must be a ``Dense``, or a ``Conv2D`` with
``padding="valid"``, and must have a bias; then the constant is folded into that
bias exactly. Otherwise (``Conv2D`` with ``padding="same"``, whose zero padding
makes the constant's contribution differ at the borders, or no bias) the layer
is refused with :class:`~trainer.errors.UsageError` -- exclude it from pruning
with ``layer_regex`` or a per-layer fraction dict. The rule is decided from the
topology and the activation functions, never from the weights' values. With
BatchNormalization the equality holds in inference mode only (in training mode
BatchNormalization uses batch statistics), as with any BatchNormalization model.

Supported models
----------------
Sequential and functional models that are a single chain: one input, one
output, every layer used once with one input tensor (no Add/Concatenate
branches, no shared layers).

Which layer types are allowed depends on where they sit. A removed unit only
travels from its pruned layer to the *next* weighted layer (the next ``Dense``
or ``Conv2D``), so only the layers on such a **pruned path** -- the pruned
layer itself, the layers after it, and the next weighted layer, whose input is
sliced -- must be of a type that can be sliced:

* the pruned layer and the next weighted layer: ``Dense`` or ``Conv2D``
  (``groups=1``) -- exactly these classes, not subclasses such as
  ``Conv2DTranspose``;
* the layers in between: ``MaxPooling2D``, ``AveragePooling2D``,
  ``GlobalAveragePooling2D``, ``GlobalMaxPooling2D``, ``Flatten``,
  ``Activation``, ``ReLU``, ``LeakyReLU``, ``ELU``, ``Dropout`` and
  ``BatchNormalization`` (on the last axis);

all ``channels_last``. The next weighted layer is found by walking forward
from the pruned layer: if the walk meets any other layer first -- e.g. the
``LocalResponseNormalization`` of ``cifar10_cnn`` (it mixes neighbouring
channels, so removing one changes the others), a recurrent layer, a wrapper
such as ``TimeDistributed``, a nested model, a depthwise/separable
convolution, Reshape -- :func:`check_sliceable` raises a ``UsageError``
naming that layer (and the pruned layer to exclude). Naming such a layer as
one to prune is refused the same way.

Every layer that is on no pruned path (upstream of every pruned layer, or
after the last pruned layer's next weighted layer), whatever its type and
whether or not it has weights, is carried over unchanged by
:func:`slice_model` (same config, same weights). So ``digits_cnn`` and
``mlp`` can be pruned everywhere; in ``cifar10_cnn`` the dense layers
``local3``/``local4`` can be pruned (``layer_regex=r"local.*"``) but
``conv1``/``conv2`` cannot (their units pass through ``norm1``/``norm2``);
an LSTM followed by Dense layers can have those Dense layers pruned.

The model's *output layer* is its last Dense/Conv2D layer. Its units are the
classes: it is never pruned (only its inputs are sliced).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from trainer.errors import UsageError

__all__ = ["check_sliceable", "select_units", "slice_model", "unit_masks"]

_L = tf.keras.layers

_WEIGHTED = (_L.Dense, _L.Conv2D)  # exact classes: Conv2DTranspose is a Conv2D subclass
_POOLING = (
    _L.MaxPooling2D,
    _L.AveragePooling2D,
    _L.GlobalAveragePooling2D,
    _L.GlobalMaxPooling2D,
)
_ELEMENTWISE_LAYERS = (_L.Activation, _L.ReLU, _L.LeakyReLU, _L.ELU)
_PASS_THROUGH = _POOLING + (_L.Dropout,)
_SUPPORTED = frozenset(
    _WEIGHTED + _POOLING + _ELEMENTWISE_LAYERS + (_L.Dropout, _L.Flatten, _L.BatchNormalization)
)

# Keras activations that act on each value separately (softmax/log_softmax do not).
_ELEMENTWISE_ACTIVATIONS = frozenset(
    {
        "linear", "relu", "relu6", "elu", "selu", "tanh", "sigmoid", "hard_sigmoid",
        "softplus", "softsign", "swish", "silu", "gelu", "exponential", "mish",
    }
)

_SUPPORTED_TEXT = (
    "structured pruning supports single chains in which every pruned Conv2D/Dense layer "
    "reaches the next Conv2D/Dense layer through pooling/Flatten/BatchNormalization layers "
    "only (plus Activation, ReLU and Dropout); other layers are carried over unchanged "
    "when no pruned unit passes through them"
)


# --------------------------------------------------------------------------
# The chain
# --------------------------------------------------------------------------


@dataclass
class _Chain:
    model: tf.keras.Model
    layers: list  # forward order, without the InputLayer
    in_shapes: dict  # layer name -> input TensorShape
    weighted: list = field(default_factory=list)  # exact Dense/Conv2D layers, forward order

    @property
    def output_layer(self):
        return self.weighted[-1] if self.weighted else None

    @property
    def prunable(self):
        return self.weighted[:-1]

    def index(self, layer):
        return next(i for i, other in enumerate(self.layers) if other is layer)


def _is_weighted(layer) -> bool:
    """An exact ``Dense``/``Conv2D`` (not a subclass such as ``Conv2DTranspose``)."""
    return type(layer) in _WEIGHTED


def _units(layer) -> int:
    return int(layer.units) if isinstance(layer, _L.Dense) else int(layer.filters)


def _refuse(model, layer, reason, pruned=None) -> UsageError:
    """``layer`` cannot be sliced; ``pruned``: the pruned layer whose units would reach it."""
    where = ""
    advice = ""
    if pruned is not None and pruned is not layer:
        where = f" is on the path of pruned layer {pruned.name!r} to the next Dense/Conv2D layer and"
    if pruned is not None:
        advice = (
            f"; exclude {pruned.name!r} from pruning (layer_regex or a per-layer fraction dict)"
        )
    return UsageError(
        f"cannot prune model {model.name!r} structurally: layer {layer.name!r} "
        f"({type(layer).__name__}){where} {reason}{advice}; {_SUPPORTED_TEXT}"
    )


def _unsupported_reason(layer) -> str:
    cls = type(layer)
    names = {c.__name__ for c in cls.__mro__}
    if cls.__name__ == "LocalResponseNormalization":
        return (
            "mixes neighbouring channels, so removing one channel would change the others"
        )
    if isinstance(layer, tf.keras.Model):
        return "is a nested model; structured pruning needs one flat chain of layers"
    if isinstance(layer, _L.Wrapper):
        return f"wraps another layer ({type(layer.layer).__name__})"
    if isinstance(layer, _L.RNN) or "RNN" in names:
        return "is recurrent: its state mixes all units at every time step"
    if "_Merge" in names:
        return "merges branches; only single chains can be sliced"
    if "DepthwiseConv" in names or "SeparableConv" in names:
        return "is a depthwise/separable convolution, which ties output channels to input channels"
    if isinstance(layer, _L.Reshape) or isinstance(layer, _L.Permute):
        return "moves the channel axis"
    return "is a layer type structured pruning does not know how to slice"


def _check_on_path(chain, layer, pruned) -> None:
    """``layer`` lies on ``pruned``'s path (or is ``pruned``): it must be sliceable."""
    model = chain.model
    if type(layer) not in _SUPPORTED:
        raise _refuse(model, layer, _unsupported_reason(layer), pruned)
    if getattr(layer, "data_format", None) == "channels_first":
        raise _refuse(
            model, layer, "uses data_format='channels_first' (only channels_last is supported)", pruned
        )
    if isinstance(layer, _L.Conv2D) and int(getattr(layer, "groups", 1)) != 1:
        raise _refuse(model, layer, f"is a grouped convolution (groups={layer.groups})", pruned)
    if isinstance(layer, _L.BatchNormalization):
        if getattr(layer, "virtual_batch_size", None) is not None:
            raise _refuse(model, layer, "uses virtual_batch_size", pruned)
        rank = chain.in_shapes[layer.name].rank
        axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
        if rank is None or sorted(a % rank for a in axes) != [rank - 1]:
            raise _refuse(
                model, layer, f"normalizes axis {layer.axis}, not the last (channel) axis", pruned
            )


def _chain(model) -> _Chain:
    if not isinstance(model, tf.keras.Model):
        raise UsageError(
            f"structured pruning needs a tf.keras.Model, got {type(model).__name__}"
        )
    if not getattr(model, "_is_graph_network", False):
        if isinstance(model, tf.keras.Sequential):
            raise UsageError(
                f"Sequential model {model.name!r} has no known input shape: start it with "
                "tf.keras.Input(shape=...) or call model.build(input_shape) before pruning"
            )
        raise UsageError(
            f"model {model.name!r} is a subclassed Keras model: structured pruning needs a "
            f"Sequential or functional model; {_SUPPORTED_TEXT}"
        )
    # Only the topology is checked here. Layer types and configs matter only on
    # the paths that removed units travel (see _check_path); every other layer
    # is carried over unchanged by slice_model.
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UsageError(
            f"cannot prune model {model.name!r} structurally: it has {len(model.inputs)} inputs "
            f"and {len(model.outputs)} outputs; {_SUPPORTED_TEXT} with one input and one output"
        )
    # Walk back from the output: every node must have exactly one input tensor.
    backwards = []
    tensor = model.outputs[0]
    while True:
        layer, node_index, _ = tensor._keras_history
        if isinstance(layer, _L.InputLayer):
            break
        inputs = tf.nest.flatten(layer._inbound_nodes[node_index].keras_inputs)
        if len(inputs) != 1:
            raise _refuse(model, layer, f"takes {len(inputs)} inputs; only single chains can be sliced")
        backwards.append((layer, inputs[0].shape))
        tensor = inputs[0]
    backwards.reverse()
    layers = [layer for layer, _ in backwards]
    seen = set()
    for layer in layers:
        if id(layer) in seen:
            raise _refuse(model, layer, "is used more than once (shared layer)")
        seen.add(id(layer))
    for layer in model.layers:  # a layer off the chain would be a side branch
        if not isinstance(layer, _L.InputLayer) and id(layer) not in seen:
            raise _refuse(model, layer, "is not on the chain from the input to the output")
    chain = _Chain(model=model, layers=layers, in_shapes={l.name: s for l, s in backwards})
    chain.weighted = [layer for layer in layers if _is_weighted(layer)]
    return chain


# --------------------------------------------------------------------------
# Activations and the constant carried by a removed unit
# --------------------------------------------------------------------------


def _activation_name(activation):
    try:
        name = tf.keras.activations.serialize(activation)
    except Exception:  # an arbitrary callable Keras cannot name
        return None
    return name if isinstance(name, str) else None


def _apply_elementwise(layer, values: np.ndarray) -> np.ndarray:
    """``layer``'s activation (or the activation layer itself) on a (C,) vector."""
    x = tf.constant(np.asarray(values, np.float32)[None, :])
    if isinstance(layer, (_L.Activation,) + _WEIGHTED):
        y = layer.activation(x)
    else:  # ReLU, LeakyReLU, ELU layers
        y = layer(x)
    return np.asarray(y, np.float32)[0]


def _maps_zero_to_nonzero(layer) -> bool:
    return bool(np.any(_apply_elementwise(layer, np.zeros(1, np.float32)) != 0))


def _check_elementwise(model, layer, pruned) -> None:
    if isinstance(layer, (_L.Activation,) + _WEIGHTED):
        name = _activation_name(layer.activation)
        if name not in _ELEMENTWISE_ACTIVATIONS:
            what = "its activation"
            if layer is not pruned:
                what = f"after pruned layer {pruned.name!r}, its activation"
            raise _refuse(
                model,
                layer,
                f"cannot be pruned through: {what} {name or layer.activation!r} is not an elementwise "
                f"Keras activation (it mixes units), so removing a unit would change the others; "
                f"exclude {pruned.name!r} from pruning (layer_regex or a per-layer fraction dict)",
            )


def _bn_apply(layer, values: np.ndarray) -> np.ndarray:
    """Inference-mode BatchNormalization on a (C,) vector, as TensorFlow computes it."""
    c = values.shape[0]
    gamma = layer.gamma.numpy() if layer.gamma is not None else np.ones(c, np.float32)
    beta = layer.beta.numpy() if layer.beta is not None else np.zeros(c, np.float32)
    mean = layer.moving_mean.numpy()
    var = layer.moving_variance.numpy()
    inv = (1.0 / np.sqrt(var + np.float32(layer.epsilon))).astype(np.float32) * gamma
    return (values * inv + (beta - mean * inv)).astype(np.float32)


def _check_path(chain, pruned) -> None:
    """Raise UsageError if removing units of ``pruned`` cannot be sliced exactly.

    Walks forward from ``pruned`` to the next weighted layer: every layer met
    on the way (and ``pruned`` and that next layer) must be of a supported type
    and configuration; the first one that is not is named.
    """
    model = chain.model
    _check_on_path(chain, pruned, pruned)
    _check_elementwise(model, pruned, pruned)
    culprit = pruned if _maps_zero_to_nonzero(pruned) else None
    start = chain.index(pruned) + 1
    following = None
    for layer in chain.layers[start:]:
        _check_on_path(chain, layer, pruned)
        if _is_weighted(layer):
            following = layer
            break
        if isinstance(layer, _ELEMENTWISE_LAYERS):
            _check_elementwise(model, layer, pruned)
            if culprit is None and _maps_zero_to_nonzero(layer):
                culprit = layer
        elif isinstance(layer, _L.BatchNormalization) and culprit is None:
            culprit = layer
    if following is None:  # cannot happen: the output layer is never pruned
        raise _refuse(model, pruned, "is not followed by a Dense/Conv2D layer")
    if culprit is None:
        return
    foldable = isinstance(following, _L.Dense) or (
        isinstance(following, _L.Conv2D) and following.padding == "valid"
    )
    if foldable and following.use_bias:
        return
    if culprit is pruned:
        why = f"its activation {_activation_name(pruned.activation)!r} maps 0 to a nonzero value"
    elif isinstance(culprit, _L.BatchNormalization):
        why = f"layer {culprit.name!r} is a BatchNormalization after it"
    else:
        why = f"layer {culprit.name!r} after it maps 0 to a nonzero value"
    if isinstance(following, _L.Conv2D) and following.padding != "valid":
        next_desc = f"a Conv2D with padding={following.padding!r}"
    else:
        next_desc = f"a {type(following).__name__} without a bias"
    raise UsageError(
        f"cannot prune layer {pruned.name!r} of model {model.name!r} structurally: {why}, "
        "so every removed unit becomes a nonzero constant; that constant "
        f"can only be folded exactly into a following Dense or padding='valid' Conv2D with a bias, "
        f"but the next weighted layer {following.name!r} is {next_desc}. Exclude {pruned.name!r} "
        "from pruning (layer_regex or a per-layer fraction dict)"
    )


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def check_sliceable(model, layers=None) -> None:
    """Raise ``UsageError`` naming the first layer that makes ``model`` unsliceable.

    Checks the topology (a single chain, see the module docstring) and, for
    every layer in ``layers`` (names; default: every prunable layer, i.e. every
    Dense/Conv2D except the output layer), that its removed units can be sliced
    exactly: every layer from it to the next Dense/Conv2D layer is of a
    supported type, elementwise activations only, and the BatchNormalization /
    ``f(0) != 0`` rule of the module docstring. Layers on no such path are not
    checked: :func:`slice_model` carries them over unchanged.
    """
    chain = _chain(model)
    if layers is None:
        names = [layer.name for layer in chain.prunable]
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
    for name in names:
        _check_prunable_name(chain, name)
    for layer in chain.prunable:  # forward order: the first offending layer is named
        if layer.name in names:
            _check_path(chain, layer)


def _prunable_text(chain) -> str:
    names = [layer.name for layer in chain.prunable]
    return ", ".join(repr(n) for n in names) if names else "none"


def _inner_names(layer) -> set:
    """Names of the layers nested in ``layer`` (wrapped layer, nested model layers)."""
    try:
        return {inner.name for inner in layer._flatten_layers(include_self=False, recursive=True)}
    except Exception:  # not a Keras layer API we know
        return set()


def _check_prunable_name(chain, name) -> None:
    if any(layer.name == name for layer in chain.prunable):
        return
    for layer in chain.layers:
        if type(layer) in _SUPPORTED:
            continue
        if layer.name == name:
            raise _refuse(
                chain.model, layer,
                f"{_unsupported_reason(layer)}, so its units cannot be removed (only Dense/Conv2D "
                "units can; the layer can only be carried over unchanged)",
            )
        if name in _inner_names(layer):
            raise _refuse(
                chain.model, layer,
                f"{_unsupported_reason(layer)}, and layer {name!r} is inside it: structured pruning "
                "cannot remove units of a nested layer (the outer layer can only be carried over "
                "unchanged)",
            )
    output = chain.output_layer
    if output is not None and name == output.name:
        raise UsageError(
            f"layer {name!r} is the output layer of model {chain.model.name!r}: its units are the "
            f"classes and it is never pruned; prunable layers: {_prunable_text(chain)}"
        )
    raise UsageError(
        f"model {chain.model.name!r} has no prunable layer {name!r}; prunable layers "
        f"(Dense/Conv2D except the output layer): {_prunable_text(chain)}"
    )


def _fraction(value, what) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(
            f"{what} must be a number in [0, 1) (the share of units to remove), got {value!r}"
        )
    value = float(value)
    if not (0.0 <= value < 1.0):  # also rejects nan
        raise UsageError(
            f"{what} must be in [0, 1) (the share of units to remove), got {value}"
        )
    return value


def _unit_norms(layer) -> np.ndarray:
    kernel = layer.kernel.numpy()
    return np.linalg.norm(kernel.reshape(-1, kernel.shape[-1]).astype(np.float64), axis=0)


def select_units(model, fraction, layer_regex=None) -> dict:
    """Choose the units to keep: ``{layer_name: sorted kept indices (int64)}``.

    ``fraction`` is the share of units to remove, a float in [0, 1) applied to
    every prunable layer, or a dict ``{layer_name: fraction}`` naming the layers
    to prune (the others are left whole and are not in the result). Prunable
    layers are the Dense/Conv2D layers whose name matches ``layer_regex``
    (``re.fullmatch``; default: all) except the output layer, which is never
    pruned. In each layer ``floor(fraction * units)`` units are removed, but at
    least one unit is always kept; the kept units are those whose kernel slice
    (``kernel[..., j]``) has the largest L2 norm (ties: the lower index).
    Raises ``UsageError`` if the model or a selected layer cannot be sliced.
    """
    chain = _chain(model)
    candidates = list(chain.prunable)
    if layer_regex is not None:
        try:
            pattern = re.compile(layer_regex)
        except (re.error, TypeError) as exc:
            raise UsageError(f"bad layer_regex {layer_regex!r}: {exc}") from None
        candidates = [layer for layer in candidates if pattern.fullmatch(layer.name)]
        if not candidates:
            raise UsageError(
                f"layer_regex {layer_regex!r} matches no prunable layer of model {model.name!r}; "
                f"prunable layers (Dense/Conv2D except the output layer): {_prunable_text(chain)}"
            )
    if isinstance(fraction, dict):
        fractions = {}
        for name, value in fraction.items():
            _check_prunable_name(chain, name)
            if not any(layer.name == name for layer in candidates):
                raise UsageError(
                    f"layer {name!r} in the fraction dict does not match layer_regex {layer_regex!r}"
                )
            fractions[name] = _fraction(value, f"fraction for layer {name!r}")
        candidates = [layer for layer in candidates if layer.name in fractions]
    else:
        value = _fraction(fraction, "fraction")
        fractions = {layer.name: value for layer in candidates}
    if not candidates and not isinstance(fraction, dict):
        raise UsageError(
            f"model {model.name!r} has no prunable layer: structured pruning removes units of "
            "Dense/Conv2D layers other than the output layer"
        )

    keep = {}
    for layer in candidates:
        units = _units(layer)
        n_remove = int(math.floor(fractions[layer.name] * units + 1e-9))
        n_keep = max(1, units - n_remove)
        order = np.argsort(-_unit_norms(layer), kind="stable")
        keep[layer.name] = np.sort(order[:n_keep]).astype(np.int64)
    for layer in candidates:
        if keep[layer.name].size < _units(layer):
            _check_path(chain, layer)
    return keep


def _validated_keep(chain, keep) -> dict:
    if not isinstance(keep, dict):
        raise UsageError(
            f"keep must be a dict {{layer_name: kept unit indices}} (from select_units), "
            f"got {type(keep).__name__}"
        )
    by_name = {layer.name: layer for layer in chain.prunable}
    result = {}
    for name, indices in keep.items():
        _check_prunable_name(chain, name)
        layer = by_name[name]
        units = _units(layer)
        try:
            array = np.asarray(indices)
        except Exception:
            array = np.asarray([None])
        if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
            raise UsageError(
                f"kept units of layer {name!r} must be a 1-D array of integer indices, got {indices!r}"
            )
        if array.size == 0:
            raise UsageError(f"layer {name!r} keeps no unit: at least one unit must be kept")
        array = array.astype(np.int64)
        if np.unique(array).size != array.size:
            raise UsageError(f"kept units of layer {name!r} contain duplicates")
        if array.min() < 0 or array.max() >= units:
            raise UsageError(
                f"kept units of layer {name!r} must be in [0, {units}), got {array.min()}..{array.max()}"
            )
        result[name] = np.sort(array)
    for layer in chain.prunable:
        if layer.name in result and result[layer.name].size < _units(layer):
            _check_path(chain, layer)
    return result


def unit_masks(model, keep) -> dict:
    """0/1 float32 masks that turn ``model`` into the masked model.

    Returns ``{weight.name: mask}`` (e.g. ``"dense1/kernel:0"``,
    ``"dense1/bias:0"``), one mask of the weight's shape for the kernel and the
    bias of every layer in ``keep``: zero at the kernel slice ``kernel[..., j]``
    and the bias entry ``bias[j]`` of every removed unit ``j``, one elsewhere.
    Weights of other layers are not in the result (their mask is all ones).
    Apply with ``w.assign(w * masks[w.name])``.
    """
    chain = _chain(model)
    keep = _validated_keep(chain, keep)
    masks = {}
    for layer in chain.prunable:
        if layer.name not in keep:
            continue
        units_mask = np.zeros(_units(layer), np.float32)
        units_mask[keep[layer.name]] = 1.0
        masks[layer.kernel.name] = np.broadcast_to(units_mask, tuple(layer.kernel.shape)).astype(np.float32)
        if layer.use_bias:
            masks[layer.bias.name] = units_mask.copy()
    return masks


def _fold_amount(layer, kernel_in, removed, const) -> np.ndarray:
    """What the removed (constant) input channels add to ``layer``'s pre-activation output."""
    rows = np.take(kernel_in, removed, axis=-2).astype(np.float64)
    values = const[removed].astype(np.float64)
    if isinstance(layer, _L.Dense):
        return values @ rows
    # padding='valid' Conv2D: every output position sees the full kernel window.
    return np.einsum("hwio,i->o", rows, values)


def slice_model(model, keep) -> tf.keras.Model:
    """A new, smaller model with the removed units of ``keep`` physically gone.

    ``keep`` is ``{layer_name: kept unit indices}`` as returned by
    :func:`select_units`. Each pruned layer keeps only its kept units (kernel
    and bias, and ``units``/``filters`` in its config); the next weighted
    layer's input dimension is sliced to match -- through ``Flatten`` a conv's
    removed channel ``c`` removes every flattened index ``(h, w, c)``, through
    pooling/activation/Dropout layers channels pass unchanged, and a
    BatchNormalization on the way keeps the gamma/beta/moving_mean/
    moving_variance entries of the kept channels. A nonzero constant left by a
    removed unit is folded into the next layer's bias (see the module
    docstring). The new model is rebuilt from ``model``'s Sequential/functional
    config, keeps all layer names and the model name, and is not compiled.
    In inference mode it gives the same outputs as the masked model
    (``model``'s weights multiplied by :func:`unit_masks`). ``model`` itself is
    not modified, and it does not matter whether it is already masked.
    """
    chain = _chain(model)
    keep = _validated_keep(chain, keep)

    new_weights = {}
    new_sizes = {}
    kept_in = None  # indices kept on the last axis of the current tensor; None = all
    const = None  # (C,) values of removed entries on the last axis; None = all zero
    for layer in chain.layers:
        if _is_weighted(layer):
            weights = layer.get_weights()
            kernel = weights[0]
            bias = weights[1].astype(np.float64) if layer.use_bias else None
            if kept_in is not None:
                if const is not None:
                    removed = np.setdiff1d(np.arange(kernel.shape[-2]), kept_in)
                    if removed.size and np.any(const[removed] != 0):
                        bias = bias + _fold_amount(layer, kernel, removed, const)
                kernel = np.take(kernel, kept_in, axis=-2)
            kept_in, const = None, None
            if layer.name in keep and keep[layer.name].size < _units(layer):
                out = keep[layer.name]
                kernel = np.take(kernel, out, axis=-1)
                if bias is not None:
                    bias = bias[out]
                new_sizes[layer.name] = int(out.size)
                kept_in = out
                zero_out = _apply_elementwise(layer, np.zeros(_units(layer), np.float32))
                const = zero_out if np.any(zero_out != 0) else None
            new = [kernel]
            if bias is not None:
                new.append(bias.astype(weights[1].dtype))
            new_weights[layer.name] = new
        elif kept_in is None:
            continue  # nothing removed upstream: layer carried over unchanged
        elif isinstance(layer, _L.BatchNormalization):
            channels = int(layer.moving_mean.shape[0])
            base = const if const is not None else np.zeros(channels, np.float32)
            const = _bn_apply(layer, base)
            new_weights[layer.name] = [np.take(w, kept_in, axis=-1) for w in layer.get_weights()]
        elif isinstance(layer, _ELEMENTWISE_LAYERS):
            if const is not None or _maps_zero_to_nonzero(layer):
                channels = int(chain.in_shapes[layer.name][-1])
                base = const if const is not None else np.zeros(channels, np.float32)
                out = _apply_elementwise(layer, base)
                const = out if np.any(out != 0) else None
        elif isinstance(layer, _L.Flatten):
            shape = chain.in_shapes[layer.name]
            channels = int(shape[-1])
            positions = int(np.prod([int(d) for d in shape[1:-1]])) if shape.rank > 2 else 1
            kept_in = (np.arange(positions)[:, None] * channels + kept_in[None, :]).ravel()
            if const is not None:
                const = np.tile(const, positions)
        elif isinstance(layer, _PASS_THROUGH):
            pass  # pooling (of a constant map: the constant), Dropout: channels unchanged

    config = model.get_config()
    for entry in config["layers"]:
        name = entry["config"].get("name")
        if name in new_sizes:
            key = "units" if entry["class_name"] == "Dense" else "filters"
            entry["config"][key] = new_sizes[name]
    # Layers carried over may be custom (e.g. LocalResponseNormalization): make
    # their classes known even if they are not registered as serializable.
    custom_objects = {}
    for layer in chain.layers:
        try:
            inner = list(layer._flatten_layers(include_self=True, recursive=True))
        except Exception:
            inner = [layer]
        for sub in inner:
            cls = type(sub)
            if not cls.__module__.startswith(("keras.", "tf_keras.", "tensorflow.")):
                custom_objects[cls.__name__] = cls
                custom_objects[tf.keras.utils.get_registered_name(cls)] = cls
    with tf.keras.utils.custom_object_scope(custom_objects):
        if isinstance(model, tf.keras.Sequential):
            sliced = tf.keras.Sequential.from_config(config)
        else:
            sliced = tf.keras.Model.from_config(config)
    for name, weights in new_weights.items():
        sliced.get_layer(name).set_weights(weights)
    for layer in chain.layers:  # everything else, whatever its type: same weights
        if layer.name not in new_weights and layer.weights:
            sliced.get_layer(layer.name).set_weights(layer.get_weights())
    return sliced


def slice_checked(model, keep, x) -> tuple:
    """(sliced model, max |output difference| to `model` on `x`): the slice
    and the evidence that it computes what the masked model computes."""
    small = slice_model(model, keep)
    diff = float(np.max(np.abs(model(x, training=False).numpy() - small(x, training=False).numpy())))
    return small, diff
