"""Which layers a removed unit travels through, and whether it can be cut out exactly.

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
  amount ``sum(k * W[rows of that channel])`` to every output of the next layer,
  which slice_model folds into the next layer's bias.

**BatchNormalization / non-zero-preserving activation rule.** If the path from
a pruned layer to the next weighted layer contains a BatchNormalization layer or
an activation with ``f(0) != 0`` (including the pruned layer's own activation),
the next weighted layer must be a ``Dense``, or a ``Conv2D`` with
``padding="valid"``, and must have a bias; then the constant is folded into that
bias exactly. Otherwise (``Conv2D`` with ``padding="same"``, whose zero padding
makes the constant's contribution differ at the borders, or no bias) the layer
is refused with a UsageError -- exclude it from pruning with ``layer_regex`` or
a per-layer fraction dict. The rule is decided from the topology and the
activation functions, never from the weights' values. With BatchNormalization
the equality holds in inference mode only (in training mode BatchNormalization
uses batch statistics), as with any BatchNormalization model.

Pruned paths
------------
A removed unit only travels from its pruned layer to the *next* weighted layer
(the next ``Dense`` or ``Conv2D``), so only the layers on such a **pruned path**
-- the pruned layer itself, the layers after it, and the next weighted layer,
whose input is sliced -- must be of a type that can be sliced:

* the pruned layer and the next weighted layer: ``Dense`` or ``Conv2D``
  (``groups=1``, no LoRA, not quantized) -- exactly these classes, not subclasses;
* the layers in between: ``MaxPooling2D``, ``AveragePooling2D``,
  ``GlobalAveragePooling2D``, ``GlobalMaxPooling2D``, ``Flatten``,
  ``Activation``, ``ReLU``, ``LeakyReLU``, ``ELU``, ``Dropout`` and
  ``BatchNormalization`` (on the last axis);

all ``channels_last``. If the walk forward from a pruned layer meets any other
layer first -- e.g. the ``LocalResponseNormalization`` of ``cifar10_cnn`` (it
mixes neighbouring channels, so removing one changes the others), a recurrent
layer, a wrapper such as ``TimeDistributed``, a nested model, a
depthwise/separable convolution, Reshape, a bare ``keras.ops`` operation -- the
UsageError names that layer (and the pruned layer to exclude). Naming such a
layer as one to prune is refused the same way. Every layer on no pruned path is
carried over unchanged, whatever its type.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from trainer import graph
from trainer.errors import UsageError

from .kinds import (ELEMENTWISE_ACTIVATIONS, ELEMENTWISE_LAYERS, SUPPORTED, SUPPORTED_TEXT, L,
                    activation_name, is_weighted, maps_zero_to_nonzero, unsupported_reason)


@dataclass
class Chain:
    model: object
    layers: list  # forward order, without the InputLayer
    in_shapes: dict  # layer name -> input shape (batch axis first)
    weighted: list = field(default_factory=list)  # exact Dense/Conv2D layers, forward order

    @property
    def output_layer(self):
        """The last Dense/Conv2D: its units are the classes, so it is never pruned."""
        return self.weighted[-1] if self.weighted else None

    @property
    def prunable(self):
        return self.weighted[:-1]

    def index(self, layer):
        return next(i for i, other in enumerate(self.layers) if other is layer)


def chain(model) -> Chain:
    """``model``'s layers, or a UsageError if it is not a single chain.

    Only the topology is checked here: layer types and configs matter only on
    the paths that removed units travel (check_path).
    """
    try:
        links = graph.chain(model)
    except graph.NotAChain as e:
        if e.layer is not None:
            raise refuse(model, e.layer, e.reason) from None
        name = getattr(model, "name", type(model).__name__)
        raise UsageError(f"cannot prune model {name!r} structurally: it {e.reason}; "
                         f"{SUPPORTED_TEXT}") from None
    layers = [link.layer for link in links]
    return Chain(model=model, layers=layers, in_shapes={link.layer.name: link.input_shape for link in links},
                 weighted=[layer for layer in layers if is_weighted(layer)])


def refuse(model, layer, reason, pruned=None) -> UsageError:
    """``layer`` cannot be sliced; ``pruned``: the pruned layer whose units would reach it."""
    where = advice = ""
    if pruned is not None and pruned is not layer:
        where = f" is on the path of pruned layer {pruned.name!r} to the next Dense/Conv2D layer and"
    if pruned is not None:
        advice = f"; exclude {pruned.name!r} from pruning (--prune-layers or --prune-config when training, --layers with `trainer slice`)"
    return UsageError(
        f"cannot prune model {model.name!r} structurally: layer {layer.name!r} "
        f"({type(layer).__name__}){where} {reason}{advice}; {SUPPORTED_TEXT}"
    )


def _check_on_path(chain, layer, pruned) -> None:
    """``layer`` lies on ``pruned``'s path (or is ``pruned``): it must be sliceable."""
    model = chain.model
    if type(layer) not in SUPPORTED:
        raise refuse(model, layer, unsupported_reason(layer), pruned)
    if getattr(layer, "data_format", None) == "channels_first":
        raise refuse(model, layer, "uses data_format='channels_first' (only channels_last is supported)", pruned)
    if is_weighted(layer):
        if int(getattr(layer, "groups", 1)) != 1:
            raise refuse(model, layer, f"is a grouped convolution (groups={layer.groups})", pruned)
        # Their kernel is not the plain variable that get/set_weights slices.
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            raise refuse(model, layer, "has LoRA or quantized weights", pruned)
    if isinstance(layer, L.BatchNormalization):
        rank = len(chain.in_shapes[layer.name])
        axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
        if sorted(a % rank for a in axes) != [rank - 1]:
            raise refuse(model, layer, f"normalizes axis {layer.axis}, not the last (channel) axis", pruned)


def _check_elementwise(model, layer, pruned) -> None:
    if isinstance(layer, (L.Activation, L.Dense, L.Conv2D)):
        name = activation_name(layer.activation)
        if name not in ELEMENTWISE_ACTIVATIONS:
            what = "its activation" if layer is pruned else f"after pruned layer {pruned.name!r}, its activation"
            raise refuse(
                model, layer,
                f"cannot be pruned through: {what} {name or layer.activation!r} is not an elementwise "
                f"Keras activation (it mixes units), so removing a unit would change the others; "
                f"exclude {pruned.name!r} from pruning (--prune-layers or --prune-config when training, --layers with `trainer slice`)",
            )


def check_path(chain, pruned) -> None:
    """Raise UsageError if removing units of ``pruned`` cannot be sliced exactly.

    Walks forward from ``pruned`` to the next weighted layer: every layer met
    on the way (and ``pruned`` and that next layer) must be of a supported type
    and configuration; the first one that is not is named. Then the
    BatchNormalization / f(0) != 0 rule of the module docstring.
    """
    model = chain.model
    _check_on_path(chain, pruned, pruned)
    _check_elementwise(model, pruned, pruned)
    culprit = pruned if maps_zero_to_nonzero(pruned) else None
    following = None
    for layer in chain.layers[chain.index(pruned) + 1:]:
        _check_on_path(chain, layer, pruned)
        if is_weighted(layer):
            following = layer
            break
        if isinstance(layer, ELEMENTWISE_LAYERS):
            _check_elementwise(model, layer, pruned)
            if culprit is None and maps_zero_to_nonzero(layer):
                culprit = layer
        elif isinstance(layer, L.BatchNormalization) and culprit is None:
            culprit = layer
    if following is None:  # cannot happen: the output layer is never pruned
        raise refuse(model, pruned, "is not followed by a Dense/Conv2D layer")
    if culprit is None:
        return
    foldable = isinstance(following, L.Dense) or following.padding == "valid"
    if foldable and following.use_bias:
        return
    if culprit is pruned:
        why = f"its activation {activation_name(pruned.activation)!r} maps 0 to a nonzero value"
    elif isinstance(culprit, L.BatchNormalization):
        why = f"layer {culprit.name!r} is a BatchNormalization after it"
    else:
        why = f"layer {culprit.name!r} after it maps 0 to a nonzero value"
    if isinstance(following, L.Conv2D) and following.padding != "valid":
        next_desc = f"a Conv2D with padding={following.padding!r}"
    else:
        next_desc = f"a {type(following).__name__} without a bias"
    raise UsageError(
        f"cannot prune layer {pruned.name!r} of model {model.name!r} structurally: {why}, "
        "so every removed unit becomes a nonzero constant; that constant "
        f"can only be folded exactly into a following Dense or padding='valid' Conv2D with a bias, "
        f"but the next weighted layer {following.name!r} is {next_desc}. Exclude {pruned.name!r} "
        "from pruning (--prune-layers or --prune-config when training, --layers with `trainer slice`)"
    )


def prunable_text(chain) -> str:
    names = [layer.name for layer in chain.prunable]
    return ", ".join(repr(n) for n in names) if names else "none"


def _inner_names(layer) -> set:
    """Names of the layers nested in ``layer`` (wrapped layer, nested model layers)."""
    # Keras 3 has no public recursive listing that covers wrappers and nested
    # models alike; _flatten_layers is what Layer.layers itself is built on.
    try:
        return {inner.name for inner in layer._flatten_layers(include_self=False, recursive=True)}
    except Exception:  # a bare keras.ops operation, or a Keras without it
        return set()


def check_prunable_name(chain, name) -> None:
    """``name`` must be a prunable layer of the chain; else say what it is."""
    if any(layer.name == name for layer in chain.prunable):
        return
    for layer in chain.layers:
        if type(layer) in SUPPORTED:
            continue
        if layer.name == name:
            raise refuse(
                chain.model, layer,
                f"{unsupported_reason(layer)}, so its units cannot be removed (only Dense/Conv2D "
                "units can; the layer can only be carried over unchanged)",
            )
        if name in _inner_names(layer):
            raise refuse(
                chain.model, layer,
                f"{unsupported_reason(layer)}, and layer {name!r} is inside it: structured pruning "
                "cannot remove units of a nested layer (the outer layer can only be carried over "
                "unchanged)",
            )
    output = chain.output_layer
    if output is not None and name == output.name:
        raise UsageError(
            f"layer {name!r} is the output layer of model {chain.model.name!r}: its units are the "
            f"classes and it is never pruned; prunable layers: {prunable_text(chain)}"
        )
    raise UsageError(
        f"model {chain.model.name!r} has no prunable layer {name!r}; prunable layers "
        f"(Dense/Conv2D except the output layer): {prunable_text(chain)}"
    )
