"""Load a data set as numpy arrays ready for training; nothing is downloaded.

Sources: ``digits`` (bundled with scikit-learn), ``cifar10`` (an extracted
official archive under ``--data-dir``), ``synthetic`` (generated, learnable)
and any ``*.npz`` file with arrays ``x`` and ``y``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from trainer.errors import UsageError

__all__ = ["Dataset", "load_dataset", "DATASETS"]

DATASETS = ("digits", "cifar10", "synthetic")

# The train/test split must not move with --seed: otherwise runs with
# different seeds are scored on different test sets and are not comparable.
_SPLIT_SEED = 20190531
_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # float32, shape (n, *input_shape)
    y_train: np.ndarray  # int64 class ids
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])


def load_dataset(name: str, data_dir: str | None = None, *,
                 synthetic_shape=(32, 32, 3), synthetic_size=(2048, 512),
                 num_classes=10, seed=0) -> Dataset:
    """Load data set ``name``: one of :data:`DATASETS` or a path ending in ``.npz``.

    ``data_dir`` is needed for ``cifar10``; for a relative ``.npz`` path that
    does not exist as given it is also tried as the base directory.
    ``synthetic_*``, ``num_classes`` and ``seed`` only shape ``synthetic``;
    the test split of ``digits`` and ``.npz`` files never depends on ``seed``.
    Raises :class:`UsageError` for anything the user must fix.
    """
    key = str(name).strip()
    if key.lower().endswith(".npz"):
        return _load_npz(key, data_dir)
    key = key.lower()
    if key == "digits":
        return _load_digits()
    if key == "cifar10":
        return _load_cifar10(data_dir)
    if key == "synthetic":
        return _make_synthetic(synthetic_shape, synthetic_size, num_classes, seed)
    raise UsageError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)} "
                     "or give a path to a .npz file")


def _split_indices(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stratified 80/20 split with the fixed seed; sorted (train, test) indices.

    Per class so that every class with >= 3 samples is in both parts, which
    a plain permutation cannot promise on small or imbalanced sets.
    """
    rng = np.random.default_rng(_SPLIT_SEED)
    test = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.append(idx[: int(round(len(idx) * _TEST_FRACTION))])
    test_idx = np.sort(np.concatenate(test)) if test else np.empty(0, np.int64)
    train_mask = np.ones(len(y), bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def _load_digits() -> Dataset:
    # Imported here: sklearn costs about a second and most runs use other data.
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]  # pixels are 0..16
    y = digits.target.astype(np.int64)
    tr, te = _split_indices(y)
    return Dataset("digits", x[tr], y[tr], x[te], y[te], 10)


def _load_cifar10(data_dir: str | None) -> Dataset:
    from trainer.cifar10 import load_cifar10

    if not data_dir:
        raise UsageError("cifar10 needs --data-dir: the directory holding the extracted "
                         "cifar-10-batches-py/ or cifar-10-batches-bin/ (nothing is downloaded)")
    if not os.path.isdir(os.path.expanduser(str(data_dir))):
        raise UsageError(f"data directory {data_dir} does not exist; "
                         "pass --data-dir pointing at the extracted CIFAR-10")
    x_train, y_train, x_test, y_test = load_cifar10(data_dir)
    return Dataset("cifar10", _scale_uint8(x_train), y_train, _scale_uint8(x_test), y_test, 10)


def _scale_uint8(x: np.ndarray) -> np.ndarray:
    # Multiply rather than divide: one pass, and exact for 0 and 255.
    return x.astype(np.float32) * np.float32(1.0 / 255.0)


def _make_synthetic(shape, size, num_classes, seed) -> Dataset:
    try:
        shape = tuple(int(s) for s in shape)
        n_train, n_test = (int(s) for s in size)
        k = int(num_classes)
    except (TypeError, ValueError):
        raise UsageError(f"synthetic data needs an integer shape, (n_train, n_test) sizes and "
                         f"a class count; got shape={shape!r} size={size!r} "
                         f"classes={num_classes!r}") from None
    if not shape or min(shape) < 1:
        raise UsageError(f"synthetic shape must be positive integers, got {shape}")
    if n_train < 1 or n_test < 1:
        raise UsageError(f"synthetic sizes must be >= 1, got train={n_train} test={n_test}")
    if k < 2:
        raise UsageError(f"synthetic data needs at least 2 classes, got {k}")
    rng = np.random.default_rng(seed)
    # One random pattern per class plus per-sample noise: the classes overlap
    # little (every element separates them a bit), so a model can learn them,
    # yet no single element gives the answer away. Means in [0.25, 0.75] keep
    # most noisy values inside [0, 1] like real pixels before the clip.
    means = rng.uniform(0.25, 0.75, size=(k, *shape)).astype(np.float32)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        # Balanced classes in random order: a skewed draw would let a model
        # score well by predicting the majority class.
        y = rng.permutation(np.arange(n) % k).astype(np.int64)
        noise = rng.standard_normal((n, *shape), dtype=np.float32) * np.float32(0.15)
        return np.clip(means[y] + noise, 0.0, 1.0), y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return Dataset("synthetic", x_train, y_train, x_test, y_test, k)


def _load_npz(path: str, data_dir: str | None) -> Dataset:
    path = os.path.expanduser(path)
    if not os.path.isfile(path) and data_dir and not os.path.isabs(path):
        in_dir = os.path.join(os.path.expanduser(str(data_dir)), path)
        if os.path.isfile(in_dir):
            path = in_dir
    if not os.path.isfile(path):
        raise UsageError(f"npz file {path} does not exist; give the path of a .npz "
                         "holding arrays x and y")
    arrays = _read_npz(path)
    if "x" not in arrays or "y" not in arrays:
        missing = " and ".join(k for k in ("x", "y") if k not in arrays)
        raise UsageError(f"{path} has no array {missing} (found: {', '.join(sorted(arrays)) or 'none'}); "
                         "save it with np.savez(path, x=inputs, y=labels)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise UsageError(f"{path} has only one of x_test/y_test; save both or neither "
                         "(without them 20% of x/y become the test set)")
    x = _npz_inputs(path, "x", arrays["x"])
    y = _npz_labels(path, "y", arrays["y"], len(x))
    if "x_test" in arrays:
        x_test = _npz_inputs(path, "x_test", arrays["x_test"])
        y_test = _npz_labels(path, "y_test", arrays["y_test"], len(x_test))
        if x_test.shape[1:] != x.shape[1:]:
            raise UsageError(f"{path}: x_test samples have shape {x_test.shape[1:]} but x samples "
                             f"have {x.shape[1:]}; save both with the same per-sample shape")
        x_train, y_train = x, y
    else:
        tr, te = _split_indices(y)
        x_train, y_train, x_test, y_test = x[tr], y[tr], x[te], y[te]
    if len(x_train) == 0:
        raise UsageError(f"{path}: no training samples; save at least one sample in x/y")
    num_classes = int(max(y_train.max(), y_test.max() if len(y_test) else 0)) + 1
    return Dataset(os.path.basename(path), x_train, y_train, x_test, y_test, num_classes)


def _read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        # allow_pickle=False: an object array would be unpickled, which runs
        # whatever code the file names; real data never needs it.
        loaded = np.load(path, allow_pickle=False)
    except Exception as e:  # corrupt archives fail in many ways (zip, zlib, header)
        raise UsageError(f"cannot read npz file {path} ({e}); save it again with "
                         "np.savez(path, x=inputs, y=labels) (numeric arrays only)") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        # A .npy renamed to .npz loads as one bare array with no names.
        raise UsageError(f"{path} holds a single array, not an .npz archive; save it with "
                         "np.savez(path, x=inputs, y=labels)")
    with loaded:
        try:
            # Members are decompressed lazily, so corruption shows up here.
            return {k: loaded[k] for k in loaded.files}
        except Exception as e:
            raise UsageError(f"cannot read npz file {path} ({e}); save it again with "
                             "np.savez(path, x=inputs, y=labels) (numeric arrays only)") from None


def _npz_inputs(path: str, key: str, x: np.ndarray) -> np.ndarray:
    if x.ndim < 2:
        raise UsageError(f"{path}: {key} has shape {x.shape}; it needs shape "
                         f"(n_samples, *input_shape), e.g. reshape to (-1, 1)")
    if x.dtype.kind in "iu":
        # Integer inputs are taken to be 8-bit pixels; anything wider is
        # ambiguous about its scale, so the user must decide.
        if x.size and (x.min() < 0 or x.max() > 255):
            raise UsageError(f"{path}: integer {key} has values outside 0..255; "
                             "save it as float32 already scaled")
        return _scale_uint8(x)
    if x.dtype.kind == "b":
        return x.astype(np.float32)
    if x.dtype.kind != "f":
        raise UsageError(f"{path}: {key} has dtype {x.dtype}; save numeric inputs "
                         "(uint8 pixels or floats)")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise UsageError(f"{path}: {key} contains NaN or infinite values; clean the data first")
    return x


def _npz_labels(path: str, key: str, y: np.ndarray, n: int) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:  # Keras-style (n, 1) labels
        y = y[:, 0]
    if y.ndim != 1:
        raise UsageError(f"{path}: {key} has shape {y.shape}; it must hold one class id "
                         "per sample (convert one-hot labels with y.argmax(axis=1))")
    if y.dtype.kind not in "iu":
        raise UsageError(f"{path}: {key} has dtype {y.dtype}; labels must be integer "
                         f"class ids (save {key}.astype('int64'))")
    if len(y) != n:
        raise UsageError(f"{path}: {len(y)} labels in {key} but {n} samples in "
                         f"{key.replace('y', 'x', 1)}; save one label per sample")
    if len(y) and y.min() < 0:
        raise UsageError(f"{path}: {key} has negative class ids; labels must be 0..K-1")
    return y.astype(np.int64)
