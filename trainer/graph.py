"""The layers of a Keras 3 model that is one chain, in order.

Structured pruning (trainer.pruning.structured) and permutation alignment
(merge.align) both move whole units through a model, which is only
well-defined when every layer feeds exactly the next one. :func:`chain`
finds that order from the Keras graph, or says which layer breaks it.

A chain is a Sequential or functional model with one input and one output in
which every layer (or Keras operation) is called once, on one tensor: no
branches, residual adds, concatenations or shared layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.errors import UsageError

__all__ = ["Link", "NotAChain", "chain", "is_graph_model"]


@dataclass(frozen=True)
class Link:
    """One step of the chain: ``layer`` maps a tensor of ``input_shape`` to
    one of ``output_shape`` (both with the batch axis first, ``None`` if unknown).
    ``layer`` is a Keras layer, or a bare Keras operation (``keras.ops``
    called on a symbolic tensor), which has no weights."""

    layer: Any
    input_shape: tuple
    output_shape: tuple


class NotAChain(UsageError):
    """``model`` is not a chain. ``layer`` is the layer that breaks it (None:
    the model as a whole), ``reason`` says why, so that a caller can name the
    layer in its own words."""

    def __init__(self, model, layer, reason: str):
        self.model, self.layer, self.reason = model, layer, reason
        where = f"layer {layer.name!r} ({type(layer).__name__}) " if layer is not None else ""
        super().__init__(f"model {_name(model)!r} is not a plain chain of layers: {where}{reason}")


def _name(model) -> str:
    return getattr(model, "name", type(model).__name__)


def _count(items, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def is_graph_model(model) -> bool:
    """A Sequential or functional model, i.e. one whose layer graph is known."""
    import keras
    # Keras 3 exports no name for the class that keras.Model(inputs, outputs)
    # returns (keras.models has only Model and Sequential), so it comes from keras.src.
    from keras.src.models.functional import Functional
    return isinstance(model, (keras.Sequential, Functional))


def _check_model(model) -> None:
    import keras
    if not isinstance(model, keras.Model):
        raise NotAChain(model, None, f"is not a keras.Model but a {type(model).__name__}")
    if not is_graph_model(model):
        raise NotAChain(model, None, "is a subclassed Keras model, whose layer graph is not known; "
                        "use a Sequential or functional model")
    try:
        inputs, outputs = model.inputs, model.outputs
    except AttributeError:  # what Keras 3 raises for a Sequential model not built yet
        inputs = None
    if inputs is None:
        raise NotAChain(model, None, "is a Sequential model with no known input shape; start it with "
                        "keras.Input(shape=...) or call model.build(input_shape) first")
    if len(inputs) != 1 or len(outputs) != 1:
        raise NotAChain(model, None, f"has {_count(inputs, 'input')} and {_count(outputs, 'output')}; "
                        "a chain has one of each")


def chain(model) -> list[Link]:
    """The layers from ``model``'s input to its output, in order, without the
    InputLayer; raises :class:`NotAChain` (a ``UsageError``) naming the first
    layer, seen from the output, that makes ``model`` anything else."""
    import keras
    _check_model(model)
    backwards = []
    tensor = model.outputs[0]
    while True:
        # Keras 3 has no public accessor for the call that made a tensor; the
        # documented KerasHistory (operation, node_index, tensor_index) on every
        # symbolic tensor, with the operation's _inbound_nodes, is how Keras's own
        # Functional walks its graph. Following node_index (not the layer's
        # only/first node) keeps a layer also used in another model from
        # confusing the walk.
        operation, node_index, _ = tensor._keras_history
        if isinstance(operation, keras.layers.InputLayer):
            break
        inputs = operation._inbound_nodes[node_index].input_tensors
        if len(inputs) != 1:
            raise NotAChain(model, operation, f"takes {len(inputs)} inputs (branches or skip connections)")
        backwards.append(Link(operation, tuple(inputs[0].shape), tuple(tensor.shape)))
        tensor = inputs[0]
    links = backwards[::-1]
    seen = set()
    for link in links:
        if id(link.layer) in seen:
            raise NotAChain(model, link.layer, "is used more than once (shared layer)")
        seen.add(id(link.layer))
    # A functional model only holds operations its output depends on, so this
    # is a safeguard against graphs Keras builds differently in later versions.
    everything = getattr(model, "operations", None) or model.layers
    for op in everything:
        if not isinstance(op, keras.layers.InputLayer) and id(op) not in seen:
            raise NotAChain(model, op, "is not on the path from the input to the output")
    return links
