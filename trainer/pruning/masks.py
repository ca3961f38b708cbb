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

from ..errors import MaskMismatch


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
        threshold = np.partition(magnitude, k - 1)[k - 1]
        below = magnitude < threshold
        mask[below] = 0.0
        ties = np.flatnonzero(magnitude == threshold)[: k - int(below.sum())]
        mask[ties] = 0.0
    return mask.reshape(weight.shape)


class MaskSet:
    """0/1 masks for chosen weights; `trackable` goes into the checkpoint.

    `values` (freezing only) hold what a masked-out entry is put back to
    after each update; for pruning it is zero.
    """

    def __init__(self, variables, backend, keep_values: bool, name: str):
        self.name = name
        self.targets = list(variables)
        self._index = {v.ref(): i for i, v in enumerate(self.targets)}
        self.backend = backend
        with backend.scope():
            self.masks = [tf.Variable(tf.ones(v.shape, v.dtype), trainable=False,
                                      name=_safe(v.name) + "_mask") for v in self.targets]
            self.values = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                                       name=_safe(v.name) + "_frozen") for v in self.targets] if keep_values else []
        self.trackable = tf.Module(name=name)
        self.trackable.masks = self.masks
        self.trackable.values = self.values

    def grad_hook(self, grads, variables):
        out = list(grads)
        for i, v in enumerate(variables):
            j = self._index.get(v.ref())
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
        """New masks from this process, made identical by the chief's broadcast,
        applied to the weights at once (cross-replica context, between steps)."""
        for m, a in zip(self.masks, arrays):
            m.assign(a)
        self.backend.broadcast_variables(self.masks + self.values)
        for j, v in enumerate(self.targets):
            v.assign(self._remask(j)(v))

    def verify(self) -> dict:
        """{weight name: per-replica checksums of its mask}; a mismatch stops
        the run naming the weight."""
        prints = dict(zip((v.name for v in self.targets), self.backend.replica_fingerprints_each(self.masks)))
        for name, per_replica in prints.items():
            if len(set(per_replica)) != 1:
                raise MaskMismatch(f"mask of {name} differs across replicas ({len(set(per_replica))} versions); "
                                   "stopping before the replicas diverge")
        return prints

    def sparsity(self) -> dict:
        return {v.name: float(1.0 - m.numpy().mean()) for v, m in zip(self.targets, self.masks)}


def _safe(name: str) -> str:
    return name.replace(":", "_").replace("/", "_")
