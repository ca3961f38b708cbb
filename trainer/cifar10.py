"""Read an already-downloaded CIFAR-10 from disk, never from the network.

Both official layouts are understood:

* ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5`` and
  ``test_batch``, Python pickles of dicts with bytes keys (``b'data'``: uint8
  array (N, 3072), ``b'labels'``: list of ints).
* ``cifar-10-batches-bin/``: ``data_batch_1.bin`` .. ``data_batch_5.bin`` and
  ``test_batch.bin``, records of 1 label byte + 3072 pixel bytes.

The layout directory may be ``data_dir`` itself or a subdirectory of it, so
both ``--data-dir ~/data`` and ``--data-dir ~/data/cifar-10-batches-py`` work.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from trainer.errors import UsageError

__all__ = ["load_cifar10"]

PY_DIR = "cifar-10-batches-py"
BIN_DIR = "cifar-10-batches-bin"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"

NUM_CLASSES = 10
_SIDE = 32
_PIXELS = 3 * _SIDE * _SIDE  # 3072, channel-major: 1024 R, 1024 G, 1024 B
_RECORD = 1 + _PIXELS  # one label byte in front of every image in the .bin files

# A pickle can name any importable callable and have it called, so the batch
# files are read with an allowlist holding only what numpy needs to rebuild a
# uint8 array. numpy 2 pickles say ``numpy._core``; numpy 1.x ones say
# ``numpy.core``; both spellings resolve in numpy 1.26.
_ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
})


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        # encoding='bytes' like the official loader: the batches were written
        # by Python 2, whose str objects must stay bytes (the dict keys and
        # the raw pixel buffer).
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UsageError(
            f"{self._path}: refusing to unpickle global {module}.{name} "
            "(a CIFAR-10 batch only contains numpy arrays, so this file is not "
            "an official batch); replace it with the file from cifar-10-python.tar.gz"
        )


def _read_pickle_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _RestrictedUnpickler(f, path).load()
    except UsageError:
        raise
    except Exception as e:  # truncated/corrupt pickles fail in many different ways
        raise UsageError(
            f"{path}: cannot read CIFAR-10 batch ({type(e).__name__}: {e}); "
            "the file is truncated or corrupt, extract it again from cifar-10-python.tar.gz"
        ) from None
    if not isinstance(batch, dict):
        raise UsageError(f"{path}: expected a pickled dict, found {type(batch).__name__}; "
                         "replace it with the file from cifar-10-python.tar.gz")

    def get(key: str):
        # Official files have bytes keys; a batch re-saved from Python 3 with
        # str keys is the same data, so accept it too.
        for k in (key.encode(), key):
            if k in batch:
                return batch[k]
        raise UsageError(f"{path}: no {key!r} entry in the batch dict; "
                         "replace it with the file from cifar-10-python.tar.gz")

    data, labels = get("data"), get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _PIXELS:
        desc = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise UsageError(f"{path}: 'data' must be a uint8 array of shape (N, {_PIXELS}), "
                         f"found {desc}; replace it with the file from cifar-10-python.tar.gz")
    try:
        labels = np.asarray(labels)
    except Exception:
        labels = np.asarray([], dtype=object)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        raise UsageError(f"{path}: 'labels' must be {len(data)} integers (one per image), "
                         f"found {labels.dtype} array of shape {labels.shape}; "
                         "replace it with the file from cifar-10-python.tar.gz")
    return data, labels


def _read_bin_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise UsageError(f"{path}: cannot read CIFAR-10 batch ({e}); check the file's permissions") from None
    if raw.size % _RECORD:
        raise UsageError(
            f"{path}: size {raw.size} bytes is not a multiple of the {_RECORD}-byte "
            "record; the file is truncated, extract it again from cifar-10-binary.tar.gz"
        )
    records = raw.reshape(-1, _RECORD)
    return records[:, 1:], records[:, 0]


def _find_layout(data_dir: str) -> tuple[str, str] | None:
    """(directory, "py"|"bin") of the layout to read; py wins when both exist."""
    names = {
        "py": TRAIN_BATCHES + (TEST_BATCH,),
        "bin": tuple(n + ".bin" for n in TRAIN_BATCHES + (TEST_BATCH,)),
    }
    for kind, subdir in (("py", PY_DIR), ("bin", BIN_DIR)):
        nested = os.path.join(data_dir, subdir)
        if os.path.isdir(nested):
            return nested, kind
        # Any one batch file marks the layout, so a partly copied layout is
        # reported as "file X missing" instead of "no CIFAR-10 here".
        if any(os.path.isfile(os.path.join(data_dir, n)) for n in names[kind]):
            return data_dir, kind
    return None


def _to_hwc(flat: np.ndarray) -> np.ndarray:
    # Rows are channel-major (all R, then G, then B, each 32 rows of 32);
    # Keras layers expect channels last.
    return np.ascontiguousarray(flat.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1))


def load_cifar10(data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_train, y_train, x_test, y_test)`` from an extracted CIFAR-10.

    ``x_*`` are uint8 of shape (N, 32, 32, 3) (HWC), ``y_*`` int64 in 0..9.
    Train batches are concatenated in order 1..5. Raises :class:`UsageError`
    naming the offending file for a missing, truncated or corrupt batch.
    """
    data_dir = os.path.expanduser(str(data_dir))
    if not os.path.isdir(data_dir):
        raise UsageError(f"CIFAR-10 data directory {data_dir} does not exist; "
                         "pass --data-dir pointing at the extracted cifar-10-batches-py/ or -bin/")
    found = _find_layout(data_dir)
    if found is None:
        raise UsageError(
            f"no CIFAR-10 batches in {data_dir}: expected {PY_DIR}/ or {BIN_DIR}/ "
            "(extract cifar-10-python.tar.gz or cifar-10-binary.tar.gz there)"
        )
    layout_dir, kind = found
    read, suffix = (_read_pickle_batch, "") if kind == "py" else (_read_bin_batch, ".bin")

    def load(name: str) -> tuple[np.ndarray, np.ndarray]:
        path = os.path.join(layout_dir, name + suffix)
        if not os.path.isfile(path):
            raise UsageError(f"CIFAR-10 batch file {path} is missing; "
                             "extract the complete archive into the data directory")
        data, labels = read(path)
        # A zero-length file is the typical leftover of an interrupted copy.
        if len(data) == 0:
            raise UsageError(f"{path}: contains no images; the file is truncated, "
                             "extract it again from the official archive")
        if labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise UsageError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}, found "
                             f"{int(labels.min())}..{int(labels.max())}; the file is corrupt")
        return _to_hwc(data), labels.astype(np.int64)

    train = [load(n) for n in TRAIN_BATCHES]
    x_test, y_test = load(TEST_BATCH)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test, y_test
