"""CIFAR-10 loader against small files written in the official formats."""

import os
import pickle
import struct

import numpy as np
import pytest

from trainer.cifar10 import load_cifar10
from trainer.data import load_dataset
from trainer.errors import UsageError

TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
ALL = TRAIN + ["test_batch"]


def make_images(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, size=n).astype(np.int64)
    return x, y


def channel_major(x):
    """HWC images -> official (N, 3072) rows, written out pixel by pixel.

    Spelled as loops on purpose, so the test does not reuse the loader's
    reshape/transpose and a wrong axis order in the loader is caught.
    """
    rows = np.zeros((len(x), 3072), np.uint8)
    for i in range(len(x)):
        for ch in range(3):
            for r in range(32):
                for c in range(32):
                    rows[i, ch * 1024 + r * 32 + c] = x[i, r, c, ch]
    return rows


class _Py2Pickler(pickle._Pickler):
    """Writes bytes and str the way Python 2's cPickle wrote the official
    batches (BINSTRING opcodes); Python 3's protocol 2 would wrap every bytes
    object in a call to _codecs.encode, which the real files do not contain."""

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin-1"))

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def batch_dict(name, x, y):
    return {
        b"batch_label": f"{name} of 5".encode(),
        b"labels": [int(v) for v in y],
        b"data": channel_major(x),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(x))],
    }


def write_py(folder, batches, style="py2"):
    os.makedirs(folder, exist_ok=True)
    for name, (x, y) in batches.items():
        with open(os.path.join(folder, name), "wb") as f:
            if style == "py2":
                _Py2Pickler(f, protocol=2).dump(batch_dict(name, x, y))
            else:
                pickle.dump(batch_dict(name, x, y), f)


def write_bin(folder, batches):
    os.makedirs(folder, exist_ok=True)
    for name, (x, y) in batches.items():
        rows = channel_major(x)
        with open(os.path.join(folder, name + ".bin"), "wb") as f:
            for label, row in zip(y, rows):
                f.write(bytes([int(label)]) + row.tobytes())


def make_batches(seed=0, sizes=(3, 2, 4, 1, 2, 3)):
    return {name: make_images(n, seed * 100 + i) for i, (name, n) in enumerate(zip(ALL, sizes))}


def check(result, batches):
    x_train, y_train, x_test, y_test = result
    exp_x = np.concatenate([batches[n][0] for n in TRAIN])
    exp_y = np.concatenate([batches[n][1] for n in TRAIN])
    assert x_train.dtype == np.uint8 and x_train.shape == (len(exp_x), 32, 32, 3)
    np.testing.assert_array_equal(x_train, exp_x)
    np.testing.assert_array_equal(y_train, exp_y)
    np.testing.assert_array_equal(x_test, batches["test_batch"][0])
    np.testing.assert_array_equal(y_test, batches["test_batch"][1])
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64


@pytest.fixture(scope="module")
def batches():
    return make_batches()


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_py_layout_in_subdirectory(tmp_path, batches, style):
    write_py(tmp_path / "cifar-10-batches-py", batches, style)
    check(load_cifar10(str(tmp_path)), batches)


def test_bin_layout_in_subdirectory(tmp_path, batches):
    write_bin(tmp_path / "cifar-10-batches-bin", batches)
    check(load_cifar10(str(tmp_path)), batches)


@pytest.mark.parametrize("writer", [write_py, write_bin])
def test_layout_directory_given_directly(tmp_path, batches, writer):
    writer(tmp_path, batches)
    check(load_cifar10(str(tmp_path)), batches)


def test_known_pixel_lands_in_hwc_position(tmp_path):
    # One hand-placed value per channel at row 1, column 2 of image 0.
    x = np.zeros((1, 32, 32, 3), np.uint8)
    batches = {n: (x, np.array([7])) for n in ALL}
    write_bin(tmp_path, batches)
    path = tmp_path / "data_batch_1.bin"
    raw = bytearray(path.read_bytes())
    for ch, value in enumerate((11, 22, 33)):
        raw[1 + ch * 1024 + 1 * 32 + 2] = value
    path.write_bytes(bytes(raw))
    x_train, y_train, _, _ = load_cifar10(str(tmp_path))
    assert list(x_train[0, 1, 2]) == [11, 22, 33]
    assert int(x_train[0].sum()) == 11 + 22 + 33
    assert y_train[0] == 7


def test_py_layout_preferred_when_both_present(tmp_path, batches):
    write_py(tmp_path / "cifar-10-batches-py", batches)
    write_bin(tmp_path / "cifar-10-batches-bin", make_batches(seed=1))
    check(load_cifar10(str(tmp_path)), batches)


def test_load_dataset_scales_to_unit_range(tmp_path, batches):
    write_bin(tmp_path / "cifar-10-batches-bin", batches)
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.name == "cifar10" and ds.num_classes == 10 and ds.input_shape == (32, 32, 3)
    assert ds.x_train.dtype == np.float32
    np.testing.assert_allclose(ds.x_train * 255, np.concatenate([batches[n][0] for n in TRAIN]),
                               atol=1e-3)
    np.testing.assert_allclose(ds.x_test * 255, batches["test_batch"][0], atol=1e-3)


def test_truncated_bin_names_file(tmp_path, batches):
    write_bin(tmp_path, batches)
    path = tmp_path / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(UsageError, match="data_batch_3.bin"):
        load_cifar10(str(tmp_path))


def test_empty_bin_names_file(tmp_path, batches):
    write_bin(tmp_path, batches)
    (tmp_path / "test_batch.bin").write_bytes(b"")
    with pytest.raises(UsageError, match="test_batch.bin"):
        load_cifar10(str(tmp_path))


def test_bin_label_out_of_range_names_file(tmp_path, batches):
    write_bin(tmp_path, batches)
    path = tmp_path / "data_batch_2.bin"
    raw = bytearray(path.read_bytes())
    raw[3073] = 10  # label byte of the second record
    path.write_bytes(bytes(raw))
    with pytest.raises(UsageError, match="data_batch_2.bin.*0..9"):
        load_cifar10(str(tmp_path))


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_truncated_pickle_names_file(tmp_path, batches, style):
    write_py(tmp_path, batches, style)
    path = tmp_path / "data_batch_4"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UsageError, match="data_batch_4"):
        load_cifar10(str(tmp_path))


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_pickle_with_code_execution_is_refused(tmp_path, batches):
    write_py(tmp_path, batches)
    marker = tmp_path / "pwned.txt"
    evil = batch_dict("data_batch_2", *batches["data_batch_2"])
    evil[b"labels"] = _RunsShell(marker)
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump(evil, f)
    # The payload really is live: plain pickle would run it.
    assert b"system" in (tmp_path / "data_batch_2").read_bytes()
    with pytest.raises(UsageError) as err:
        load_cifar10(str(tmp_path))
    assert not marker.exists()
    assert "data_batch_2" in str(err.value) and "system" in str(err.value)


def test_harmless_foreign_global_is_refused_too(tmp_path, batches):
    write_py(tmp_path, batches)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": channel_major(batches["test_batch"][0]),
                     b"labels": __import__("collections").OrderedDict()}, f)
    with pytest.raises(UsageError, match="test_batch.*collections.OrderedDict"):
        load_cifar10(str(tmp_path))


@pytest.mark.parametrize("mutate, pattern", [
    (lambda d: d.update({b"data": d[b"data"][:, :3000]}), "data_batch_1.*3072"),
    (lambda d: d.update({b"data": d[b"data"].astype(np.int32)}), "data_batch_1.*uint8"),
    (lambda d: d.update({b"labels": d[b"labels"][:-1]}), "data_batch_1.*labels"),
    (lambda d: d.update({b"labels": [12] * len(d[b"labels"])}), "data_batch_1.*0..9"),
    (lambda d: d.pop(b"data"), "data_batch_1.*'data'"),
])
def test_malformed_pickle_names_file(tmp_path, batches, mutate, pattern):
    write_py(tmp_path, batches)
    d = batch_dict("data_batch_1", *batches["data_batch_1"])
    mutate(d)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump(d, f)
    with pytest.raises(UsageError, match=pattern):
        load_cifar10(str(tmp_path))


@pytest.mark.parametrize("writer, missing", [
    (write_py, "data_batch_4"), (write_py, "test_batch"),
    (write_bin, "data_batch_5.bin"), (write_bin, "test_batch.bin"),
])
def test_missing_batch_names_file(tmp_path, batches, writer, missing):
    writer(tmp_path / "sub", batches)
    os.remove(tmp_path / "sub" / missing)
    with pytest.raises(UsageError, match=f"{missing}.*missing"):
        load_cifar10(str(tmp_path / "sub"))


def test_directory_without_cifar(tmp_path):
    with pytest.raises(UsageError, match="cifar-10-batches-py"):
        load_cifar10(str(tmp_path))


def test_nonexistent_directory(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_cifar10(str(tmp_path / "nope"))
