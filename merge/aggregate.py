"""Aggregation rules: how one tensor from every input becomes one tensor.

Each rule is one small class behind `Rule.combine`, which receives the inputs
lazily, one (values, weight, mask) at a time, so that a streaming rule holds
two arrays whatever the number of inputs.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

Reads = Iterator[tuple[np.ndarray, float, "np.ndarray | None"]]

MASK_POLICIES = ("intersection", "union", "renormalize")


class Rule:
    name = "?"
    # A streaming rule is done with each input before asking for the next,
    # so the caller may refill one buffer for every input.
    streaming = True

    def combine(self, reads: Reads) -> tuple[np.ndarray, "np.ndarray | None"]:
        """(merged values, merged keep-mask or None when no input had one).
        Weights arrive normalized to sum to 1."""
        raise NotImplementedError


class WeightedMean(Rule):
    """FedAvg: the sample-weighted mean, masks combined by a policy.

    intersection: a weight pruned by any input stays pruned;
    union:        kept where any input keeps it, pruned inputs count as zero;
    renormalize:  kept where any input keeps it, averaged over those that do.
    """

    name = "mean"

    def __init__(self, mask_policy: str = "intersection"):
        if mask_policy not in MASK_POLICIES:
            raise ValueError(mask_policy)
        self.policy = mask_policy

    def combine(self, reads):
        acc = keep = denom = None
        masked = False
        for x, w, mask in reads:
            m = None if mask is None else mask > 0
            masked |= m is not None
            if self.policy == "renormalize":
                kept = np.ones(x.shape, bool) if m is None else m
                x = np.where(kept, x, 0).astype(x.dtype, copy=False)
                contrib = kept.astype(x.dtype) * w
                denom = contrib if denom is None else np.add(denom, contrib, out=denom)
            np.multiply(x, x.dtype.type(w), out=x)   # in place: no third array
            acc = x if acc is None else np.add(acc, x, out=acc)
            if m is not None:
                if keep is None:
                    keep = m
                elif self.policy == "intersection":
                    np.logical_and(keep, m, out=keep)
                else:
                    np.logical_or(keep, m, out=keep)
            elif self.policy != "intersection":
                keep = np.ones(x.shape, bool)  # an input without a mask keeps all
        if self.policy == "renormalize":
            np.divide(acc, denom, out=acc, where=denom > 0)
        if not masked:
            return acc, None
        if keep is None:
            keep = np.ones(acc.shape, bool)
        # tf.where semantics: +0.0 where pruned, whatever sign the sum had.
        return np.where(keep, acc, acc.dtype.type(0)), keep


def first_of(reads: Iterable) -> tuple[np.ndarray, None]:
    """Non-float tensors (step counters and the like) are not averaged: the
    first input's value is kept."""
    for x, _, _ in reads:
        return x, None
    raise ValueError("no inputs")


RULES = {"mean": WeightedMean}


def reprune(values: np.ndarray, keep: "np.ndarray | None", sparsity: float) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude re-pruning of a merged tensor; what was pruned stays pruned
    (its magnitude is zero, so it goes first)."""
    from trainer.pruning.masks import magnitude_mask
    current = 0.0 if keep is None else 1.0 - keep.mean()
    if keep is not None and current >= sparsity:
        return values, keep
    mask = magnitude_mask(values, sparsity) > 0
    if keep is not None:
        mask &= keep
    return np.where(mask, values, values.dtype.type(0)), mask
