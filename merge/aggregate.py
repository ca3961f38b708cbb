"""Aggregation rules: how one tensor from every input becomes one tensor.

Each rule is one small class behind `Rule.combine`, which receives the inputs
lazily, one (values, weight, mask) at a time, so that a streaming rule holds
two arrays whatever the number of inputs. `parse_aggregator` turns
`--aggregator` into a rule.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from trainer.errors import UsageError

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


class _Robust(Rule):
    """Coordinate-wise rules that resist a few bad inputs. Unweighted: a
    sample count is exactly what a bad client could lie about. They need
    every input's slab at once (n slabs of memory, not two). Masks: a weight
    pruned by any input stays pruned."""

    streaming = False

    def combine(self, reads):
        xs, masks = [], []
        for x, _, mask in reads:
            xs.append(np.array(x, copy=True))
            masks.append(mask)
        values = self._reduce(np.stack(xs)).astype(xs[0].dtype, copy=False)
        given = [m > 0 for m in masks if m is not None]
        if not given:
            return values, None
        keep = np.logical_and.reduce(given)
        return np.where(keep, values, values.dtype.type(0)), keep

    def _reduce(self, stacked: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Median(_Robust):
    name = "median"

    def _reduce(self, stacked):
        return np.median(stacked, axis=0)


class TrimmedMean(_Robust):
    """Per coordinate, drop the floor(beta x n) largest and smallest values
    and average the rest."""

    name = "trimmed-mean"

    def __init__(self, beta: float):
        self.beta = beta

    def _reduce(self, stacked):
        n = stacked.shape[0]
        k = int(self.beta * n)
        return np.sort(stacked, axis=0)[k:n - k].mean(axis=0)


class Select(Rule):
    """One input's tensors, unchanged: what Krum chose. Inputs after the
    chosen one are never read."""

    name = "select"

    def __init__(self, index: int):
        self.index = index

    def combine(self, reads):
        for i, (x, _, mask) in enumerate(reads):
            if i == self.index:
                return x, (None if mask is None else mask > 0)
        raise ValueError(f"no input {self.index}")


def krum_index(sq_distances: np.ndarray, f: int) -> int:
    """Krum (Blanchard et al., 2017): the input whose n - f - 2 nearest
    neighbours are closest, by summed squared distance over all tensors."""
    n = len(sq_distances)
    scores = [np.sort(np.delete(sq_distances[i], i))[: n - f - 2].sum() for i in range(n)]
    return int(np.argmin(scores))


AGGREGATORS = "mean | median | trimmed-mean:BETA | krum:F"


def parse_aggregator(spec: str, n: int, mask_policy: str = "intersection"):
    """A Rule for `spec`, or ("krum", f) when a first pass must choose."""
    name, _, arg = spec.partition(":")
    try:
        if name == "mean" and not arg:
            return WeightedMean(mask_policy)
        if name == "median" and not arg:
            return Median()
        if name == "trimmed-mean":
            beta = float(arg or "nan")
            if not 0 <= beta < 0.5:
                raise ValueError
            if n - 2 * int(beta * n) < 1:
                raise UsageError(f"--aggregator {spec}: trims every one of the {n} inputs")
            return TrimmedMean(beta)
        if name == "krum":
            f = int(arg)
            if f < 0:
                raise ValueError
            if n < 2 * f + 3:
                raise UsageError(f"--aggregator {spec}: Krum tolerates F bad inputs out of at least 2F+3; "
                                 f"{n} inputs allow F <= {max(0, (n - 3) // 2)}")
            return ("krum", f)
    except ValueError:
        pass
    raise UsageError(f"--aggregator {spec}: expected {AGGREGATORS} (BETA in [0, 0.5), F >= 0)")


def first_of(reads: Iterable) -> tuple[np.ndarray, None]:
    """Non-float tensors (step counters and the like) are not averaged: the
    first input's value is kept."""
    for x, _, _ in reads:
        return x, None
    raise ValueError("no inputs")




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
