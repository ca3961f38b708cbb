"""load_dataset: digits, synthetic, .npz files and the usage errors."""

import dataclasses

import numpy as np
import pytest

from trainer.data import Dataset, load_dataset
from trainer.errors import UsageError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_shapes_and_range(digits):
    assert digits.name == "digits" and digits.num_classes == 10
    assert digits.input_shape == (8, 8, 1)
    assert digits.x_train.dtype == np.float32 and digits.x_test.dtype == np.float32
    assert digits.y_train.dtype == np.int64 and digits.y_test.dtype == np.int64
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert len(digits.x_train) == len(digits.y_train) and len(digits.x_test) == len(digits.y_test)
    assert 0.18 < len(digits.x_test) / 1797 < 0.22
    for x in (digits.x_train, digits.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    assert set(digits.y_train) == set(digits.y_test) == set(range(10))


def test_digits_split_is_stratified(digits):
    share = np.bincount(digits.y_test, minlength=10) / (
        np.bincount(digits.y_test, minlength=10) + np.bincount(digits.y_train, minlength=10))
    assert np.all(np.abs(share - 0.2) < 0.02)


def test_digits_train_and_test_are_the_original_samples(digits):
    from sklearn.datasets import load_digits

    orig = load_digits()
    x = np.concatenate([digits.x_train, digits.x_test])[..., 0] * 16
    y = np.concatenate([digits.y_train, digits.y_test])
    # Same multiset of (image, label) rows: nothing duplicated or lost.
    key = lambda imgs, lab: sorted(zip(lab.tolist(), np.rint(imgs).astype(int).reshape(len(lab), -1).tolist()))
    assert key(x, y) == key(orig.images, orig.target)


def test_digits_test_set_independent_of_seed(digits):
    other = load_dataset("digits", seed=123)
    np.testing.assert_array_equal(digits.x_test, other.x_test)
    np.testing.assert_array_equal(digits.y_test, other.y_test)


def test_dataset_is_frozen(digits):
    with pytest.raises(dataclasses.FrozenInstanceError):
        digits.name = "x"


@pytest.mark.parametrize("shape", [(32, 32, 3), (4, 8, 8, 1), (10, 6), (5,)])
def test_synthetic_shapes(shape):
    ds = load_dataset("synthetic", synthetic_shape=shape, synthetic_size=(60, 20),
                      num_classes=3, seed=0)
    assert ds.input_shape == shape and ds.num_classes == 3
    assert ds.x_train.shape == (60, *shape) and ds.x_test.shape == (20, *shape)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert np.bincount(ds.y_train).tolist() == [20, 20, 20]


def test_synthetic_deterministic_per_seed():
    kw = dict(synthetic_shape=(6, 6, 2), synthetic_size=(50, 10))
    a, b, c = (load_dataset("synthetic", seed=s, **kw) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)


def test_synthetic_is_learnable():
    # Nearest class mean fitted on train must beat chance by far on test.
    ds = load_dataset("synthetic", synthetic_shape=(8, 4), synthetic_size=(400, 200),
                      num_classes=10, seed=5)
    flat = lambda x: x.reshape(len(x), -1)
    centroids = np.stack([flat(ds.x_train)[ds.y_train == c].mean(0) for c in range(10)])
    dist = ((flat(ds.x_test)[:, None, :] - centroids[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == ds.y_test).mean() > 0.9


@pytest.mark.parametrize("kw", [dict(synthetic_shape=(0, 3)), dict(synthetic_size=(0, 5)),
                                dict(num_classes=1), dict(synthetic_shape="abc")])
def test_synthetic_bad_parameters(kw):
    with pytest.raises(UsageError, match="synthetic"):
        load_dataset("synthetic", **kw)


def test_unknown_name_lists_choices():
    with pytest.raises(UsageError, match="mnist.*digits.*cifar10.*synthetic.*npz"):
        load_dataset("mnist")


def test_cifar10_needs_data_dir():
    with pytest.raises(UsageError, match="--data-dir"):
        load_dataset("cifar10")


def test_cifar10_data_dir_must_exist(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_dataset("cifar10", str(tmp_path / "missing"))


# --- .npz files -----------------------------------------------------------

def test_npz_round_trip_with_test_arrays(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.random((30, 5, 2)).astype(np.float32), rng.integers(0, 4, 30)
    xt, yt = rng.random((7, 5, 2)).astype(np.float64), rng.integers(0, 4, 7)
    path = tmp_path / "mine.npz"
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt)
    ds = load_dataset(str(path))
    assert ds.name == "mine.npz" and ds.input_shape == (5, 2)
    np.testing.assert_array_equal(ds.x_train, x)
    np.testing.assert_array_equal(ds.y_train, y)
    np.testing.assert_allclose(ds.x_test, xt.astype(np.float32))
    np.testing.assert_array_equal(ds.y_test, yt)
    assert ds.x_test.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.num_classes == max(y.max(), yt.max()) + 1


def test_npz_uint8_scaled_and_split(tmp_path):
    x = np.arange(100, dtype=np.uint8).reshape(100, 1) * 2 + 55  # 55..253
    x[0, 0] = 255
    y = (np.arange(100) % 5).astype(np.uint8)
    path = tmp_path / "px.npz"
    np.savez_compressed(path, x=x, y=y)
    ds = load_dataset(str(path))
    assert ds.x_train.dtype == np.float32
    assert len(ds.x_train) == 80 and len(ds.x_test) == 20
    # Rebuild the uint8 value of every sample to check both scaling and that
    # the split neither loses nor repeats a sample.
    values = np.rint(np.concatenate([ds.x_train, ds.x_test])[:, 0] * 255).astype(int)
    assert sorted(values.tolist()) == sorted(x[:, 0].astype(int).tolist())
    assert np.concatenate([ds.x_train, ds.x_test]).max() == 1.0
    assert set(ds.y_test) == set(range(5)) and ds.num_classes == 5
    again = load_dataset(str(path), seed=9)
    np.testing.assert_array_equal(ds.x_test, again.x_test)


def test_npz_keras_style_column_labels(tmp_path):
    path = tmp_path / "col.npz"
    np.savez(path, x=np.zeros((10, 3), np.float32), y=np.arange(10).reshape(10, 1) % 2)
    assert load_dataset(str(path)).y_train.ndim == 1


def test_npz_relative_to_data_dir(tmp_path):
    np.savez(tmp_path / "rel.npz", x=np.zeros((10, 3), np.float32), y=np.arange(10) % 2)
    assert load_dataset("rel.npz", str(tmp_path)).input_shape == (3,)


@pytest.mark.parametrize("arrays, pattern", [
    (dict(x=np.zeros((5, 2))), "no array y"),
    (dict(y=np.zeros(5, int)), "no array x"),
    (dict(x=np.zeros((5, 2)), y=np.zeros(4, int)), "4 labels.*5 samples"),
    (dict(x=np.zeros((5, 2)), y=np.zeros(5)), "integer"),
    (dict(x=np.zeros((5, 2)), y=np.zeros((5, 3), int)), "one class id"),
    (dict(x=np.zeros((5, 2)), y=np.full(5, -1)), "negative"),
    (dict(x=np.zeros(5), y=np.zeros(5, int)), "shape"),
    (dict(x=np.full((5, 2), 300), y=np.zeros(5, int)), "0..255"),
    (dict(x=np.full((5, 2), np.nan), y=np.zeros(5, int)), "NaN"),
    (dict(x=np.zeros((5, 2)), y=np.zeros(5, int), x_test=np.zeros((2, 2))), "y_test"),
    (dict(x=np.zeros((5, 2)), y=np.zeros(5, int), x_test=np.zeros((2, 3)),
          y_test=np.zeros(2, int)), "x_test samples have shape"),
])
def test_npz_bad_contents(tmp_path, arrays, pattern):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UsageError, match=pattern) as err:
        load_dataset(str(path))
    assert "bad.npz" in str(err.value)


def test_npz_missing_file(tmp_path):
    with pytest.raises(UsageError, match="nothere.npz.*does not exist"):
        load_dataset(str(tmp_path / "nothere.npz"))


@pytest.mark.parametrize("content", [b"", b"garbage, not a zip", None])
def test_npz_corrupt(tmp_path, content):
    path = tmp_path / "broken.npz"
    if content is None:  # a real archive cut in half
        np.savez_compressed(path, x=np.random.default_rng(0).random((200, 50)), y=np.zeros(200, int))
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(UsageError, match="broken.npz"):
        load_dataset(str(path))


def test_npz_single_array_is_rejected(tmp_path):
    path = tmp_path / "single.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros((3, 2)))
    with pytest.raises(UsageError, match="single.npz.*single array"):
        load_dataset(str(path))


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"echo pwned > {self.marker}",))


def test_npz_object_array_is_not_unpickled(tmp_path):
    path, marker = tmp_path / "obj.npz", tmp_path / "pwned.txt"
    np.savez(path, x=np.array([_RunsShell(marker), None], dtype=object), y=np.zeros(2, int))
    with pytest.raises(UsageError, match="cannot read npz file .*obj.npz"):
        load_dataset(str(path))
    assert not marker.exists()


def test_dataset_input_shape_property():
    ds = Dataset("t", np.zeros((2, 3, 4), np.float32), np.zeros(2, np.int64),
                 np.zeros((1, 3, 4), np.float32), np.zeros(1, np.int64), 2)
    assert ds.input_shape == (3, 4)
