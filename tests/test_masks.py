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
