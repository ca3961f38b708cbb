"""Federated client splits: partition properties, determinism, skew."""

import numpy as np
import pytest

from trainer.errors import UsageError
from trainer.splits import client_indices, parse_split


def labels(n=1000, k=10, seed=0):
    return np.random.default_rng(seed).permutation(np.arange(n) % k)


def partition(y, clients, spec, seed=0, **kw):
    return [client_indices(y, c, clients, spec, seed, **kw) for c in range(clients)]


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "dirichlet:0.01", "dirichlet:100",
                                  "classes:1", "classes:2", "classes:3", "classes:5",
                                  "classes:10"])
@pytest.mark.parametrize("clients", [1, 2, 3, 7])
def test_disjoint_and_complete(spec, clients):
    y = labels(997)  # not a multiple of anything convenient
    parts = partition(y, clients, spec, seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == len(y), "overlapping or missing samples"
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(y)))
    for p in parts:
        assert p.dtype == np.int64
        np.testing.assert_array_equal(p, np.sort(p))


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "classes:3"])
def test_deterministic_for_seed(spec):
    y = labels()
    a, b = partition(y, 4, spec, seed=11), partition(y, 4, spec, seed=11)
    for pa, pb in zip(a, b):
        np.testing.assert_array_equal(pa, pb)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5"])
def test_differs_across_seeds(spec):
    y = labels()
    a, b = partition(y, 4, spec, seed=1), partition(y, 4, spec, seed=2)
    assert any(len(pa) != len(pb) or not np.array_equal(pa, pb) for pa, pb in zip(a, b))


def test_iid_near_equal_and_mixed():
    y = labels(1003)
    parts = partition(y, 4, "iid")
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for p in parts:
        counts = np.bincount(y[p], minlength=10)
        assert counts.min() > 0.5 * len(p) / 10  # every class present in roughly its share


def test_classes_five_on_two_clients():
    y = labels()
    p0, p1 = partition(y, 2, "classes:5")
    assert set(y[p0]) == {0, 1, 2, 3, 4}
    assert set(y[p1]) == {5, 6, 7, 8, 9}
    # every sample of a held class goes to its only holder
    assert len(p0) == np.isin(y, [0, 1, 2, 3, 4]).sum()


def test_classes_unheld_go_round_robin():
    # 3 clients x 2 classes cover 0..5; classes 6, 7, 8, 9 are held by nobody
    # and go whole to clients 0, 1, 2, 0.
    y = labels()
    parts = partition(y, 3, "classes:2")
    assert [set(y[p]) for p in parts] == [{0, 1, 6, 9}, {2, 3, 7}, {4, 5, 8}]


def test_classes_shared_class_divided_evenly():
    # 4 clients x 3 classes: client 3 holds 9, 0, 1 (wrapping around), so
    # classes 0 and 1 are held by clients 0 and 3 and split between them.
    y = labels(1000)
    parts = partition(y, 4, "classes:3")
    assert set(y[parts[3]]) == {9, 0, 1}
    for c in (0, 1):
        n0, n3 = (y[parts[0]] == c).sum(), (y[parts[3]] == c).sum()
        assert n0 > 0 and n3 > 0 and abs(n0 - n3) <= 1


def test_classes_as_many_as_available_means_all_classes():
    y = labels()
    parts = partition(y, 3, "classes:10")
    assert all(set(y[p]) == set(range(10)) for p in parts)


def test_classes_more_than_available_is_refused():
    # classes:20 on 10 classes would silently be an iid split.
    with pytest.raises(UsageError) as e:
        partition(labels(), 3, "classes:20")
    assert str(e.value) == ("--split classes:20: the data set has 10 classes, so a client cannot hold 20; "
                            "use classes:C with C <= 10, or iid")


def test_classes_use_num_classes_for_a_subset():
    # A test set that lacks class 9 must still map classes to the same clients.
    y = labels()
    subset = y[y != 9]
    p0, p1 = partition(subset, 2, "classes:5", num_classes=10)
    assert set(subset[p0]) == {0, 1, 2, 3, 4} and set(subset[p1]) == {5, 6, 7, 8}


def _top_share(y, parts, k=10):
    """Mean over classes of the largest fraction of that class held by one client."""
    counts = np.array([np.bincount(y[p], minlength=k) for p in parts])  # clients x classes
    return float((counts.max(axis=0) / counts.sum(axis=0)).mean())


def test_dirichlet_small_alpha_is_skewed():
    y = labels(2000)
    skewed = _top_share(y, partition(y, 5, "dirichlet:0.05", seed=0))
    even = _top_share(y, partition(y, 5, "dirichlet:1000", seed=0))
    assert skewed > 0.7  # most of each class sits on one client
    assert even < 0.3  # close to the 1/5 of an even split


@pytest.mark.parametrize("spec, want", [
    ("iid", ("iid", None)), (" IID ", ("iid", None)),
    ("dirichlet:0.5", ("dirichlet", 0.5)), ("dirichlet:1e-2", ("dirichlet", 0.01)),
    ("classes:5", ("classes", 5)),
])
def test_parse_split(spec, want):
    assert parse_split(spec) == want


@pytest.mark.parametrize("spec", ["", "foo", "iid:2", "dirichlet", "dirichlet:", "dirichlet:0",
                                  "dirichlet:-1", "dirichlet:abc", "dirichlet:nan",
                                  "dirichlet:inf", "classes:0", "classes:1.5", "classes:x",
                                  "classes"])
def test_bad_spec(spec):
    with pytest.raises(UsageError, match="iid"):
        parse_split(spec)
    with pytest.raises(UsageError):
        client_indices(labels(), 0, 2, spec, 0)


@pytest.mark.parametrize("client, clients", [(2, 2), (-1, 2), (0, 0), (0, -3)])
def test_bad_client(client, clients):
    with pytest.raises(UsageError):
        client_indices(labels(), client, clients, "iid", 0)


def test_non_integer_labels():
    with pytest.raises(UsageError, match="integer"):
        client_indices(labels().astype(float), 0, 2, "iid", 0)


def test_split_seed_lets_clients_train_with_their_own_seed():
    """Clients with different --seed but one --split-seed hold disjoint shares
    that cover the training set; without it their shares would overlap."""
    from trainer.job import Options, load_data

    def rows(seed, client, split_seed=None):
        data = load_data(Options(data="digits", seed=seed, client=client, clients=2, split="iid",
                                 split_seed=split_seed), "digits_cnn")
        return {r.tobytes() for r in data.x_train}

    a, b = rows(1, 0, split_seed=7), rows(2, 1, split_seed=7)
    assert not a & b and len(a | b) == len(rows(0, 0, 7) | rows(0, 1, 7))
    assert rows(1, 0) & rows(2, 1)  # each client's own seed: overlapping shares
