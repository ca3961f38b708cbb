"""Checking before and after: can the model be sliced, and does the slice compute the same?"""
from __future__ import annotations

import keras
import numpy as np

from .analysis import chain as model_chain
from .analysis import check_path, check_prunable_name
from .surgery import slice_model


def check_sliceable(model, layers=None) -> None:
    """Raise ``UsageError`` naming the first layer that makes ``model`` unsliceable.

    Checks the topology (a single chain) and, for every layer in ``layers``
    (names; default: every prunable layer, i.e. every Dense/Conv2D except the
    output layer), that its removed units can be sliced exactly: every layer
    from it to the next Dense/Conv2D layer is of a supported type, elementwise
    activations only, and the BatchNormalization / ``f(0) != 0`` rule (see
    analysis). Layers on no such path are not checked: slice_model carries
    them over unchanged.
    """
    chain = model_chain(model)
    if layers is None:
        names = [layer.name for layer in chain.prunable]
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
    for name in names:
        check_prunable_name(chain, name)
    for layer in chain.prunable:  # forward order: the first offending layer is named
        if layer.name in names:
            check_path(chain, layer)


def slice_checked(model, keep, x) -> tuple:
    """(sliced model, max |output difference| to ``model`` on ``x``): the slice
    and the evidence that it computes what the masked model computes."""
    small = slice_model(model, keep)
    numpy = keras.ops.convert_to_numpy
    diff = float(np.max(np.abs(numpy(model(x, training=False)) - numpy(small(x, training=False)))))
    return small, diff
