"""Magnitude masks: exact counts, deterministic ties, protected entries."""
import numpy as np
import pytest

from trainer.pruning.masks import magnitude_mask


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.8, 0.9, 0.99])
def test_prunes_exactly_the_smallest_magnitudes(sparsity):
    w = np.random.default_rng(1).normal(size=(64, 33)).astype(np.float32)
    m = magnitude_mask(w, sparsity)
    assert int((m == 0).sum()) == round(sparsity * w.size)
    if 0 < sparsity:
        assert np.abs(w[m == 0]).max() <= np.abs(w[m == 1]).min()


def test_ties_go_to_the_lowest_indices_and_repeat():
    w = np.zeros((10, 10), np.float32)
    m = magnitude_mask(w, 0.35)
    assert np.array_equal(np.flatnonzero(m.ravel() == 0), np.arange(35))
    assert np.array_equal(m, magnitude_mask(w.copy(), 0.35))


def test_protected_entries_are_never_pruned():
    w = np.full((10, 10), 0.001, np.float32)
    protected = np.zeros((10, 10), bool)
    protected[0] = True  # the smallest-looking row is frozen
    m = magnitude_mask(w, 0.95, protected)
    assert m[0].min() == 1.0 and int((m == 0).sum()) == 90


def test_magnitude_mask_is_the_k_smallest_by_magnitude_then_index():
    """The definition, by a full stable sort, on kernels that are mostly
    exact zeros already (every update after the first), with ties and frozen entries."""
    from trainer.pruning.masks import magnitude_mask
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 500))
        w = rng.standard_normal(n).astype(np.float32)
        w[rng.random(n) < rng.random()] = 0.0
        if trial % 3 == 0:
            w = np.round(w, 1)  # many ties among nonzeros too
        protected = rng.random(n) < 0.2 if trial % 4 == 0 else None
        sparsity = float(rng.random())
        magnitude = np.abs(w).astype(np.float64)
        if protected is not None:
            magnitude[protected] = np.inf
        k = min(int(round(sparsity * n)), int(np.isfinite(magnitude).sum()))
        want = np.ones(n, np.float32)
        want[np.lexsort((np.arange(n), magnitude))[:k]] = 0.0
        np.testing.assert_array_equal(magnitude_mask(w, sparsity, protected), want, err_msg=str(trial))
