"""Which units to keep (largest kernel-slice L2 norm), and the masks that zero the others."""
from __future__ import annotations

import math
import numbers
import re

import keras
import numpy as np

from trainer.errors import UsageError
from trainer.varnames import key_map

from .analysis import chain as model_chain
from .analysis import check_path, check_prunable_name, prunable_text
from .kinds import units


def _fraction(value, what) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{what} must be a number in [0, 1) (the share of units to remove), got {value!r}")
    value = float(value)
    if not (0.0 <= value < 1.0):  # also rejects nan
        raise UsageError(f"{what} must be in [0, 1) (the share of units to remove), got {value}")
    return value


def _unit_norms(layer) -> np.ndarray:
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    return np.linalg.norm(kernel.reshape(-1, kernel.shape[-1]).astype(np.float64), axis=0)


def _candidates(chain, layer_regex) -> list:
    candidates = list(chain.prunable)
    if layer_regex is None:
        return candidates
    try:
        pattern = re.compile(layer_regex)
    except (re.error, TypeError) as exc:
        raise UsageError(f"--layers {layer_regex!r}: not a regular expression ({exc})") from None
    candidates = [layer for layer in candidates if pattern.fullmatch(layer.name)]
    if not candidates:
        raise UsageError(
            f"--layers {layer_regex!r} matches no prunable layer of model {chain.model.name!r}; "
            f"prunable layers (Dense/Conv2D except the output layer): {prunable_text(chain)}"
        )
    return candidates


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
    chain = model_chain(model)
    candidates = _candidates(chain, layer_regex)
    if isinstance(fraction, dict):
        fractions = {}
        for name, value in fraction.items():
            check_prunable_name(chain, name)
            if not any(layer.name == name for layer in candidates):
                raise UsageError(f"layer {name!r} has a fraction of its own but does not match "
                                 f"--layers {layer_regex!r}")
            fractions[name] = _fraction(value, f"fraction for layer {name!r}")
        candidates = [layer for layer in candidates if layer.name in fractions]
    else:
        value = _fraction(fraction, "--fraction")
        fractions = {layer.name: value for layer in candidates}
        if not candidates:
            raise UsageError(
                f"model {model.name!r} has no prunable layer: structured pruning removes units of "
                "Dense/Conv2D layers other than the output layer"
            )
    keep = {}
    for layer in candidates:
        n = units(layer)
        n_keep = max(1, n - int(math.floor(fractions[layer.name] * n + 1e-9)))
        order = np.argsort(-_unit_norms(layer), kind="stable")
        keep[layer.name] = np.sort(order[:n_keep]).astype(np.int64)
    for layer in candidates:
        if keep[layer.name].size < units(layer):
            check_path(chain, layer)
    return keep


def _indices(name, indices, size) -> np.ndarray:
    try:
        array = np.asarray(indices)
    except Exception:
        array = np.asarray([None])
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise UsageError(f"kept units of layer {name!r} must be a 1-D array of integer indices, got {indices!r}")
    if array.size == 0:
        raise UsageError(f"layer {name!r} keeps no unit: at least one unit must be kept")
    array = array.astype(np.int64)
    if np.unique(array).size != array.size:
        raise UsageError(f"kept units of layer {name!r} contain duplicates")
    if array.min() < 0 or array.max() >= size:
        raise UsageError(f"kept units of layer {name!r} must be in [0, {size}), got {array.min()}..{array.max()}")
    return np.sort(array)


def validated_keep(chain, keep) -> dict:
    """``keep`` checked against the chain: prunable layers, valid indices, sliceable paths."""
    if not isinstance(keep, dict):
        raise UsageError(
            f"keep must be a dict {{layer_name: kept unit indices}} (from select_units), got {type(keep).__name__}"
        )
    by_name = {layer.name: layer for layer in chain.prunable}
    result = {}
    for name, indices in keep.items():
        check_prunable_name(chain, name)
        result[name] = _indices(name, indices, units(by_name[name]))
    for layer in chain.prunable:
        if layer.name in result and result[layer.name].size < units(layer):
            check_path(chain, layer)
    return result


def unit_masks(model, keep) -> dict:
    """0/1 float32 masks that turn ``model`` into the masked model.

    Returns ``{key: mask}`` keyed like every variable of the project
    (trainer.varnames, e.g. ``"dense1/kernel"``, ``"dense1/bias"``), one mask
    of the weight's shape for the kernel and the bias of every layer in
    ``keep``: zero at the kernel slice ``kernel[..., j]`` and the bias entry
    ``bias[j]`` of every removed unit ``j``, one elsewhere. Weights of other
    layers are not in the result (their mask is all ones). Apply with
    ``for k, w in keyed(model.weights).items(): w.assign(w * masks[k])``
    for the keys in ``masks``.
    """
    chain = model_chain(model)
    keep = validated_keep(chain, keep)
    names = key_map(model.weights)
    masks = {}
    for layer in chain.prunable:
        if layer.name not in keep:
            continue
        units_mask = np.zeros(units(layer), np.float32)
        units_mask[keep[layer.name]] = 1.0
        masks[names[id(layer.kernel)]] = np.broadcast_to(units_mask, tuple(layer.kernel.shape)).astype(np.float32)
        if layer.use_bias:
            masks[names[id(layer.bias)]] = units_mask.copy()
    return masks
