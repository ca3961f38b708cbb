"""Which samples each replica sees at each step.

Every process derives the same plan from (seed, epoch) alone, so no indices
travel over the network, a resumed run can rebuild the plan of the epoch it
stopped in, and every sample is seen exactly once per epoch across replicas.
"""
from __future__ import annotations

import numpy as np


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_batches(n: int, global_batch: int, num_replicas: int, seed: int, epoch: int,
                  start: int = 0) -> list[np.ndarray]:
    """Global batches of sample indices for one epoch, from sample offset `start`.

    The last batch keeps the remainder instead of dropping it. A remainder
    smaller than the replica count would leave some replica with an empty
    batch, so it is folded into the batch before it.
    """
    if global_batch < num_replicas:
        raise ValueError("global batch smaller than the number of replicas")
    order = epoch_permutation(n, seed, epoch)[start:]
    cuts = list(range(global_batch, len(order), global_batch))
    if cuts and len(order) - cuts[-1] < num_replicas:
        cuts.pop()
    return [b for b in np.split(order, cuts) if len(b)]


def replica_slices(batch: np.ndarray, num_replicas: int) -> list[np.ndarray]:
    """Split one global batch into near-equal, non-empty per-replica parts."""
    return np.array_split(batch, num_replicas)
