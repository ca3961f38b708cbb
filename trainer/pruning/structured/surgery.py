"""slice_model: rebuild the model smaller, with the removed units physically gone."""
from __future__ import annotations

import keras
import numpy as np

from .analysis import chain as model_chain
from .kinds import (ELEMENTWISE_LAYERS, PASS_THROUGH, L, apply_elementwise, bn_apply, is_weighted,
                    maps_zero_to_nonzero, units)
from .selection import validated_keep


def _fold_amount(layer, kernel_in, removed, const) -> np.ndarray:
    """What the removed (constant) input channels add to ``layer``'s pre-activation output."""
    rows = np.take(kernel_in, removed, axis=-2).astype(np.float64)
    values = const[removed].astype(np.float64)
    if isinstance(layer, L.Dense):
        return values @ rows
    # padding='valid' Conv2D: every output position sees the full kernel window.
    return np.einsum("hwio,i->o", rows, values)


def _sliced_weights(chain, keep) -> tuple[dict, dict, dict]:
    """({layer name: new weights}, {layer name: new units/filters}, {layer
    name: new input shape} where it shrinks), walking the chain forward with
    the kept indices and the constants of the removed entries."""
    new_weights, new_sizes, new_inputs = {}, {}, {}
    kept_in = None  # indices kept on the last axis of the current tensor; None = all
    const = None  # (C,) values of removed entries on the last axis; None = all zero
    for layer in chain.layers:
        if kept_in is not None:
            new_inputs[layer.name] = chain.in_shapes[layer.name][:-1] + (int(kept_in.size),)
        if is_weighted(layer):
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
            if layer.name in keep and keep[layer.name].size < units(layer):
                out = keep[layer.name]
                kernel = np.take(kernel, out, axis=-1)
                if bias is not None:
                    bias = bias[out]
                new_sizes[layer.name] = int(out.size)
                kept_in = out
                zero_out = apply_elementwise(layer, np.zeros(units(layer), np.float32))
                const = zero_out if np.any(zero_out != 0) else None
            new_weights[layer.name] = [kernel] + ([bias.astype(weights[1].dtype)] if bias is not None else [])
        elif kept_in is None:
            continue  # nothing removed upstream: layer carried over unchanged
        elif isinstance(layer, L.BatchNormalization):
            channels = int(layer.moving_mean.shape[0])
            const = bn_apply(layer, const if const is not None else np.zeros(channels, np.float32))
            new_weights[layer.name] = [np.take(w, kept_in, axis=-1) for w in layer.get_weights()]
        elif isinstance(layer, ELEMENTWISE_LAYERS):
            if const is not None or maps_zero_to_nonzero(layer):
                channels = int(chain.in_shapes[layer.name][-1])
                out = apply_elementwise(layer, const if const is not None else np.zeros(channels, np.float32))
                const = out if np.any(out != 0) else None
        elif isinstance(layer, L.Flatten):
            shape = chain.in_shapes[layer.name]
            channels = int(shape[-1])
            positions = int(np.prod([int(d) for d in shape[1:-1]])) if len(shape) > 2 else 1
            kept_in = (np.arange(positions)[:, None] * channels + kept_in[None, :]).ravel()
            if const is not None:
                const = np.tile(const, positions)
        elif isinstance(layer, PASS_THROUGH):
            pass  # pooling (of a constant map: the constant), Dropout: channels unchanged
    return new_weights, new_sizes, new_inputs


def _custom_objects(chain) -> dict:
    """Classes of carried-over layers that are not Keras's own (e.g.
    LocalResponseNormalization), so that they rebuild even if nobody
    registered them as serializable."""
    custom = {}
    for layer in chain.layers:
        try:  # same private helper as analysis._inner_names, for layers nested in wrappers/models
            inner = list(layer._flatten_layers(include_self=True, recursive=True))
        except Exception:
            inner = [layer]
        for sub in inner:
            cls = type(sub)
            if not cls.__module__.startswith(("keras.", "tf_keras.", "tensorflow.")):
                custom[cls.__name__] = cls
                custom[keras.saving.get_registered_name(cls)] = cls
    return custom


def slice_model(model, keep):
    """A new, smaller model with the removed units of ``keep`` physically gone.

    ``keep`` is ``{layer_name: kept unit indices}`` as returned by
    select_units. Each pruned layer keeps only its kept units (kernel and
    bias, and ``units``/``filters`` in its config); the next weighted layer's
    input dimension is sliced to match -- through ``Flatten`` a conv's removed
    channel ``c`` removes every flattened index ``(h, w, c)``, through
    pooling/activation/Dropout layers channels pass unchanged, and a
    BatchNormalization on the way keeps the gamma/beta/moving_mean/
    moving_variance entries of the kept channels. A nonzero constant left by a
    removed unit is folded into the next layer's bias (see analysis). The new
    model is rebuilt from ``model``'s Sequential/functional config, keeps all
    layer names and the model name, and is not compiled. In inference mode it
    gives the same outputs as the masked model (``model``'s weights multiplied
    by unit_masks). ``model`` itself is not modified, and it does not matter
    whether it is already masked.
    """
    chain = model_chain(model)
    keep = validated_keep(chain, keep)
    new_weights, new_sizes, new_inputs = _sliced_weights(chain, keep)

    config = model.get_config()
    for entry in config["layers"]:
        name = entry["config"].get("name")
        if name in new_sizes:
            entry["config"]["units" if entry["class_name"] == "Dense" else "filters"] = new_sizes[name]
        if name in new_inputs:
            # Keras 3 builds a deserialized layer from its build_config before
            # the model calls it, so it must name the new, smaller input. Left
            # out, the layer would be built later, inside a Sequential's name
            # scope, and its variables' paths would differ from the others'.
            if set(entry.get("build_config") or {}) == {"input_shape"}:
                entry["build_config"] = {"input_shape": list(new_inputs[name])}
            else:
                entry.pop("build_config", None)
    with keras.saving.custom_object_scope(_custom_objects(chain)):
        cls = keras.Sequential if isinstance(model, keras.Sequential) else keras.Model
        sliced = cls.from_config(config)
    for name, weights in new_weights.items():
        sliced.get_layer(name).set_weights(weights)
    for layer in chain.layers:  # everything else, whatever its type: same weights
        if layer.name not in new_weights and getattr(layer, "weights", None):
            sliced.get_layer(layer.name).set_weights(layer.get_weights())
    return sliced
