"""trainer.pruning.export (sparse .npz artifact, SavedModel) and trainer.pruning.report."""
import json
import pickle

import numpy as np
import pytest
import keras
import tensorflow as tf

from trainer.errors import UsageError
from trainer.models import build_model
from trainer.pruning.export import FORMAT, export_savedmodel, load_sparse, save_sparse
from trainer.pruning.report import format_table, plot_sparsity, sparsity_rows

SHAPES = {"digits_cnn": (8, 8, 1), "cifar10_cnn": (32, 32, 3)}


def _model(name, seed=0):
    keras.utils.set_random_seed(seed)
    return build_model(name, SHAPES[name], 10)


def _prune(model, sparsity):
    """Zero the `sparsity` fraction of smallest-magnitude entries of every kernel (rank >= 2)."""
    for w in model.weights:
        value = w.numpy()
        if value.ndim < 2 or sparsity == 0:
            continue
        flat = value.reshape(-1)
        flat[np.argsort(np.abs(flat), kind="stable")[: int(round(sparsity * flat.size))]] = 0
        w.assign(flat.reshape(value.shape))
    return model


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint8)


def _assert_same_weights(a, b):
    wa, wb = {w.path: np.asarray(w.numpy()) for w in a.weights}, {w.path: np.asarray(w.numpy()) for w in b.weights}
    assert list(wa) == list(wb)
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and wa[name].shape == wb[name].shape, name
        assert np.array_equal(_bits(wa[name]), _bits(wb[name])), name  # bitwise, -0.0 included


def _x(name, n=4):
    return np.random.default_rng(1).random((n, *SHAPES[name]), dtype=np.float32)


# --------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_round_trip_is_bitwise_exact(tmp_path, name, sparsity):
    model = _prune(_model(name), sparsity)
    kernel = next(w for w in model.weights if w.path == "conv1/kernel").numpy()
    assert abs(np.mean(kernel == 0) - sparsity) < 0.01  # the pruning really happened

    info = save_sparse(model, tmp_path / "m.npz")
    assert info["bytes"] == (tmp_path / "m.npz").stat().st_size
    assert info["params"] == model.count_params()
    assert info["nonzeros"] == sum(int(np.count_nonzero(w.numpy())) for w in model.weights)
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]  # no temporary left

    loaded = load_sparse(tmp_path / "m.npz")
    assert loaded is not model and loaded.name == model.name
    assert [type(l).__name__ for l in loaded.layers] == [type(l).__name__ for l in model.layers]
    _assert_same_weights(model, loaded)
    x = _x(name)
    assert np.array_equal(model(x, training=False).numpy(), loaded(x, training=False).numpy())


def test_negative_zero_and_nan_survive(tmp_path):
    model = _model("digits_cnn")
    bias = model.get_layer("dense1").bias
    value = bias.numpy()
    value[:3] = [-0.0, np.nan, 0.0]
    bias.assign(value)
    save_sparse(model, tmp_path / "m.npz")
    got = load_sparse(tmp_path / "m.npz").get_layer("dense1").bias.numpy()
    assert np.signbit(got[0]) and got[0] == 0 and np.isnan(got[1])
    assert np.array_equal(_bits(got), _bits(value))


def test_artifact_holds_no_pickled_object_and_names_every_weight(tmp_path):
    model = _prune(_model("digits_cnn"), 0.9)
    save_sparse(model, tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    assert all(a.dtype != object for a in data.values())
    assert data["format"].dtype == np.uint8 and data["architecture"].dtype == np.uint8
    assert json.loads(data["architecture"].tobytes())["class_name"] == "Functional"
    index = json.loads(data["index"].tobytes())
    assert [e["name"] for e in index] == [w.path for w in model.weights]
    assert [tuple(e["shape"]) for e in index] == [tuple(w.shape) for w in model.weights]


# --------------------------------------------------------------------------
# Size
# --------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity,limit", [(0.9, 0.15), (0.0, 1.2)])
def test_artifact_size_scales_with_nonzeros(tmp_path, sparsity, limit):
    model = _prune(_model("cifar10_cnn"), sparsity)
    model.save(tmp_path / "dense.keras")
    dense = (tmp_path / "dense.keras").stat().st_size
    sparse = save_sparse(model, tmp_path / "sparse.npz")["bytes"]
    ratio = sparse / dense
    print(f"cifar10_cnn at {sparsity:.0%} sparsity: sparse {sparse} B / dense .keras {dense} B = {ratio:.3f}")
    assert ratio <= limit


# --------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------


def _load_error(path) -> str:
    with pytest.raises(UsageError) as info:
        load_sparse(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_truncated_corrupt_and_random_files(tmp_path):
    save_sparse(_prune(_model("digits_cnn"), 0.5), tmp_path / "good.npz")
    good = (tmp_path / "good.npz").read_bytes()

    (tmp_path / "truncated.npz").write_bytes(good[: len(good) // 2])
    _load_error(tmp_path / "truncated.npz")

    flipped = bytearray(good)
    middle = len(flipped) // 2
    flipped[middle:middle + 64] = bytes(b ^ 0xFF for b in flipped[middle:middle + 64])
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    _load_error(tmp_path / "flipped.npz")

    (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    _load_error(tmp_path / "random.npz")

    (tmp_path / "empty.npz").write_bytes(b"")
    _load_error(tmp_path / "empty.npz")

    np.save(tmp_path / "array.npy", np.zeros(3))
    _load_error(tmp_path / "array.npy")

    assert "no such file" in _load_error(tmp_path / "missing.npz")


class _Payload:
    """Unpickling this creates a file: proof that a loader unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_renamed_npz_is_never_unpickled(tmp_path):
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_Payload(control))).close()
    assert control.exists()  # the payload works when unpickled

    marker = tmp_path / "marker"
    (tmp_path / "evil.npz").write_bytes(pickle.dumps(_Payload(marker)))
    _load_error(tmp_path / "evil.npz")
    assert not marker.exists()


def test_an_architecture_with_lambda_bytecode_is_refused_not_run(tmp_path):
    global _MARKER  # a global, not a closure: Keras serializes closure cells with the bytecode
    marker = tmp_path / "marker"
    _MARKER = str(marker)
    inputs = keras.Input((3,))
    outputs = keras.layers.Lambda(lambda x: (open(_MARKER, "w").close(), x)[1])(inputs)
    model = keras.Model(inputs, outputs)
    with pytest.raises(UsageError, match="Lambda"):
        save_sparse(model, tmp_path / "refused.npz")
    assert marker.exists()  # building the model ran the lambda once
    marker.unlink()

    def text(s):
        return np.frombuffer(s.encode(), dtype=np.uint8)

    np.savez_compressed(tmp_path / "lambda.npz", format=text(FORMAT),
                        architecture=text(model.to_json()), index=text("[]"))
    _load_error(tmp_path / "lambda.npz")
    assert not marker.exists()


def _rewrite(src, dst, edit):
    with np.load(src, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    index = json.loads(data["index"].tobytes())
    edit(index, data)
    data["index"] = np.frombuffer(json.dumps(index).encode(), dtype=np.uint8)
    np.savez_compressed(dst, **data)


def test_missing_tensor_or_wrong_shape_names_file_and_tensor(tmp_path):
    save_sparse(_prune(_model("digits_cnn"), 0.9), tmp_path / "good.npz")

    def drop(index, data):
        del index[2]  # conv2/kernel

    _rewrite(tmp_path / "good.npz", tmp_path / "missing.npz", drop)
    assert "conv2/kernel" in _load_error(tmp_path / "missing.npz")

    def reshape(index, data):
        index[0]["shape"] = [3, 3, 1, 16]

    _rewrite(tmp_path / "good.npz", tmp_path / "shape.npz", reshape)
    assert "conv1/kernel" in _load_error(tmp_path / "shape.npz")

    def short_values(index, data):
        data["w0004_values"] = data["w0004_values"][:-1]  # dense1/kernel

    _rewrite(tmp_path / "good.npz", tmp_path / "values.npz", short_values)
    assert "dense1/kernel" in _load_error(tmp_path / "values.npz")


# --------------------------------------------------------------------------
# SavedModel
# --------------------------------------------------------------------------


def test_savedmodel_serves_the_same_outputs(tmp_path):
    model = _prune(_model("digits_cnn"), 0.5)
    out = tmp_path / "serving"
    export_savedmodel(model, out)
    export_savedmodel(model, out)  # replaces the previous export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serving"]  # no temporaries left
    assert (out / "saved_model.pb").exists()

    serving = tf.saved_model.load(str(out)).signatures["serving_default"]
    (arg,) = serving.structured_input_signature[1]
    x = _x("digits_cnn")
    (y,) = serving(**{arg: tf.constant(x)}).values()
    np.testing.assert_allclose(y.numpy(), model(x, training=False).numpy(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def test_sparsity_rows_table_and_plot(tmp_path):
    model = _model("digits_cnn")
    assert sparsity_rows(model) == []  # zero biases of a fresh model are not pruning

    conv1 = model.get_layer("conv1").kernel  # 3*3*1*32 = 288
    value = conv1.numpy().reshape(-1)
    value[:100] = 0
    conv1.assign(value.reshape(conv1.shape))
    dense1 = model.get_layer("dense1").kernel  # 576*128 (3*3*64 after pool1)
    value = dense1.numpy().reshape(-1)
    value[:30] = 0
    dense1.assign(value.reshape(dense1.shape))
    mask = np.ones(dense1.shape, dtype=np.float32).reshape(-1)
    mask[20:70] = 0  # overlaps the weight's own zeros at 20..29: counted once
    masks = {"dense1/kernel": mask.reshape(dense1.shape),
             "logits/kernel": np.ones(model.get_layer("logits").kernel.shape, bool),
             "conv2/bias": np.ones(64)}

    rows = sparsity_rows(model, masks)
    assert [(r["layer"], r["weight"], r["params"], r["zeros"]) for r in rows] == [
        ("conv1", "conv1/kernel", 288, 100),
        ("conv2", "conv2/bias", 64, 64),  # all-zero fresh bias, listed because masked
        ("dense1", "dense1/kernel", 576 * 128, 70),
        ("logits", "logits/kernel", 128 * 10, 0),
    ]
    assert rows[0]["sparsity"] == pytest.approx(100 / 288)
    assert rows[3]["sparsity"] == 0.0

    table = format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 1 + 1 + 4 + 1 + 1
    assert len({len(line) for line in lines}) == 1  # aligned
    assert lines[0].split() == ["layer", "weight", "params", "zeros", "sparsity"]
    assert lines[2].split() == ["conv1", "conv1/kernel", "288", "100", "34.72%"]
    total_params = 288 + 64 + 576 * 128 + 1280
    assert lines[-1].split()[-3:] == [f"{total_params:,}", "234", f"{100 * 234 / total_params:.2f}%"]

    plot_sparsity(rows, tmp_path / "sparsity.png")
    png = (tmp_path / "sparsity.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1024
    assert [p.name for p in tmp_path.iterdir()] == ["sparsity.png"]

    with pytest.raises(UsageError, match="nope"):
        sparsity_rows(model, {"nope/kernel": np.ones(3)})
    with pytest.raises(UsageError, match="conv1/kernel"):
        sparsity_rows(model, {"conv1/kernel": np.ones(3)})
