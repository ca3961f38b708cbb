"""Masks beside their weights, applied inside the compiled step.

One mechanism serves pruning and freezing: a 0/1 mask per weight multiplies
the (allreduced) gradient, and after the optimizer the weight is put back
where the mask is 0: to zero for pruning, to its frozen value for freezing.
Momentum and Adam slots carry updates across steps even when the gradient
is 0, which is why the gradient mask alone is not enough.

TFMOT's prune_low_magnitude keeps its masks inside layer wrappers and
updates them in a Keras callback, per process: under Horovod each rank
would compute its own masks with nothing keeping them equal. Here masks are
plain variables that the backend broadcasts and verifies.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..agreement import require_agreement
from ..errors import MaskMismatch
from ..varnames import safe


def magnitude_mask(weight: np.ndarray, sparsity: float, protected: np.ndarray | None = None) -> np.ndarray:
    """0 for the round(sparsity x size) smallest |w|, 1 elsewhere; exact count.

    The threshold comes from np.partition (linear time: a full sort of a
    1.5M-entry kernel took most of an update); ties at the threshold go to
    the lowest indices, so equal inputs always give equal masks.
    `protected` entries (frozen weights) are never chosen.
    """
    magnitude = np.abs(weight.ravel())
    if protected is not None:
        magnitude[protected.ravel()] = np.inf
    k = min(int(round(sparsity * weight.size)), int(np.isfinite(magnitude).sum()))
    mask = np.ones(weight.size, dtype=np.float32)
    if k:
        threshold = _kth_smallest(magnitude, k)
        below = magnitude < threshold
        mask[below] = 0.0
        ties = np.flatnonzero(magnitude == threshold)[: k - int(below.sum())]
        mask[ties] = 0.0
    return mask.reshape(weight.shape)


def _kth_smallest(magnitude: np.ndarray, k: int):
    """The k-th smallest of `magnitude` (>= 0), as np.partition gives it.

    Pruned weights are exact zeros, so from the second mask update on most of
    a kernel is one repeated value, and NumPy 2's partition slows down on
    repeats (227 ms instead of 16 for 1.5M entries at 80% zeros, measured):
    the zeros are counted, and only the nonzeros partitioned."""
    zeros = magnitude.size - np.count_nonzero(magnitude)
    if k <= zeros:
        return magnitude.dtype.type(0)
    positive = magnitude[magnitude > 0]
    return np.partition(positive, k - zeros - 1)[k - zeros - 1]


class MaskSet:
    """0/1 masks for chosen weights; `trackable` goes into the checkpoint.

    `values` (freezing only) hold what a masked-out entry is put back to
    after each update; for pruning it is zero.
    """

    def __init__(self, named: dict, backend, keep_values: bool, name: str):
        """`named`: {key (varnames) of a weight: the weight}."""
        self.name = name
        self.names = list(named)
        self.targets = list(named.values())
        self._index = {id(v): i for i, v in enumerate(self.targets)}
        self.backend = backend
        with backend.scope():
            self.masks = [tf.Variable(tf.ones(v.shape, v.dtype), trainable=False,
                                      name=safe(k) + "_mask") for k, v in named.items()]
            self.values = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                                       name=safe(k) + "_frozen") for k, v in named.items()] if keep_values else []

    def checkpoint_entries(self) -> dict:
        """Checkpoint sections, each {key of the weight: variable}: `pruning`
        (or `frozen`) for the masks, `frozen_values` for what frozen entries
        are put back to."""
        out = {self.name: dict(zip(self.names, self.masks))}
        if self.values:
            out[f"{self.name}_values"] = dict(zip(self.names, self.values))
        return out

    def grad_hook(self, grads, variables):
        out = list(grads)
        for i, v in enumerate(variables):
            j = self._index.get(id(v))
            if j is not None and out[i] is not None:
                out[i] = out[i] * self.masks[j]
        return out

    def after_update(self):
        for j, v in enumerate(self.targets):
            self.backend.assign_in_step(v, self._remask(j))

    def _remask(self, j):
        # tf.where, not w * mask: a negative weight times 0 is -0.0, whose
        # sign bit a bit-exact export would have to keep as a nonzero.
        # The mask is read inside the function, so that on tf.distribute
        # each device's update reads its own copy.
        mask = self.masks[j]
        if self.values:
            values = self.values[j]
            return lambda w: tf.where(mask > 0, w, values)
        return lambda w: tf.where(mask > 0, w, tf.zeros_like(w))

    def set(self, arrays: list[np.ndarray]) -> None:
        """New masks from this process, compared across replicas, then made
        identical by the chief's broadcast and applied to the weights at once
        (cross-replica context, between steps)."""
        for m, a in zip(self.masks, arrays):
            m.assign(a)
        if self.backend.num_replicas > 1:
            # Before the broadcast: after it every replica holds the chief's
            # masks, and ranks whose own masks differed (drifted weights,
            # another config) would train on unnoticed.
            named = {**{f"mask of {k}": m for k, m in zip(self.names, self.masks)},
                     **{f"frozen values of {k}": v for k, v in zip(self.names, self.values)}}
            require_agreement(self.backend, named, "", f"before {self.backend.replica_noun} 0's "
                              "masks are broadcast", error=MaskMismatch)
        self.backend.broadcast_variables(self.masks + self.values)
        for j, v in enumerate(self.targets):
            v.assign(self._remask(j)(v))

    def verify(self) -> dict:
        """{weight name: per-replica checksums of its mask}; a mismatch stops
        the run naming the weight."""
        return require_agreement(self.backend, dict(zip(self.names, self.masks)), "mask of ",
                                 "after the broadcast", error=MaskMismatch)

    def sparsity(self) -> dict:
        return {k: float(1.0 - m.numpy().mean()) for k, m in zip(self.names, self.masks)}
