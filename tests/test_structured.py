"""Tests for trainer.pruning.structured: unit selection, masks, exact slicing, refusals."""

import numpy as np
import pytest
import keras

from trainer.errors import UsageError
from trainer.models import build_model
from trainer.pruning.structured import check_sliceable, select_units, slice_model, unit_masks
from trainer.varnames import keyed, keys

L = keras.layers
TOL = 1e-5


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def digits():
    return build_model("digits_cnn", (8, 8, 1), 10)


def mlp():
    return build_model("mlp", (8, 8, 1), 10, dropout=0.2)


def seq_dense_bn():
    """Dense -> BN -> ReLU -> Dropout -> Dense(tanh) -> logits: BN constant folded into d2."""
    return keras.Sequential(
        [
            keras.Input(shape=(12,)),
            L.Dense(16, activation="relu", name="d1"),
            L.BatchNormalization(name="bn1"),
            L.ReLU(name="relu1"),
            L.Dropout(0.3, name="drop1"),
            L.Dense(8, activation="tanh", name="d2"),
            L.Dense(3, name="logits"),
        ],
        name="seq_dense_bn",
    )


def seq_conv_bn():
    """conv1 -> maxpool -> conv2(valid) -> BN -> relu -> avgpool -> flatten -> dense(sigmoid) -> logits.

    Pruning conv2 folds the BN constant through Flatten into dense1; pruning the
    sigmoid dense1 folds sigmoid(0) = 0.5 into logits.
    """
    return keras.Sequential(
        [
            keras.Input(shape=(10, 10, 2)),
            L.Conv2D(8, 3, padding="same", activation="relu", name="conv1"),
            L.MaxPooling2D(2, name="pool1"),
            L.Conv2D(6, 2, padding="valid", name="conv2"),
            L.BatchNormalization(name="bn2"),
            L.Activation("relu", name="act2"),
            L.AveragePooling2D(2, padding="same", name="pool2"),
            L.Flatten(name="flatten"),
            L.Dense(10, activation="sigmoid", name="dense1"),
            L.Dense(4, name="logits"),
        ],
        name="seq_conv_bn",
    )


def functional_gap():
    """A functional chain ending in GlobalAveragePooling2D; BN before a valid conv (folded)."""
    inputs = keras.Input(shape=(9, 9, 3), name="input")
    x = L.Conv2D(8, 3, padding="same", name="conv1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    x = L.Conv2D(12, 3, padding="valid", activation="relu", name="conv2")(x)
    x = L.Dropout(0.5, name="drop")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(16, activation="relu", name="dense1")(x)
    outputs = L.Dense(5, name="logits")(x)
    return keras.Model(inputs, outputs, name="functional_gap")


SLICEABLE = {
    "digits_cnn": digits,
    "mlp": mlp,
    "seq_dense_bn": seq_dense_bn,
    "seq_conv_bn": seq_conv_bn,
    "functional_gap": functional_gap,
}


def randomize(model, seed=0):
    """Random weights (nonzero biases, BN statistics away from the identity).

    Kernels get a He-like scale 1/sqrt(fan_in), so activations and logits stay of
    order 1 and float32 rounding stays far below the 1e-5 tolerance.
    """
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if "gamma" in w.name or "moving_variance" in w.name:
            value = rng.uniform(0.5, 1.5, w.shape)
        elif "kernel" in w.name:
            value = rng.normal(0.0, 1.0, w.shape) / np.sqrt(np.prod(w.shape[:-1]))
        else:
            value = rng.normal(0.0, 0.3, w.shape)
        w.assign(value.astype(np.float32))
    return model


def inputs_for(model, n=16, seed=1):
    shape = (n,) + tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def predict(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def apply_masks(model, masks):
    for name, w in keyed(model.weights).items():
        if name in masks:
            w.assign(w.numpy() * masks[name])


def norms(layer):
    kernel = layer.kernel.numpy()
    return np.linalg.norm(kernel.reshape(-1, kernel.shape[-1]), axis=0)


def assert_masked_equals_sliced(model, keep):
    """Slice ``model``, then mask it in place: outputs must agree, and masking must matter."""
    x = inputs_for(model)
    original = predict(model, x)
    sliced = slice_model(model, keep)
    masks = unit_masks(model, keep)
    apply_masks(model, masks)
    masked = predict(model, x)
    assert np.abs(masked - original).max() > 1e-3, "masking removed nothing that matters"
    np.testing.assert_allclose(predict(sliced, x), masked, rtol=0, atol=TOL)
    for name, kept in keep.items():
        layer = sliced.get_layer(name)
        size = layer.units if isinstance(layer, L.Dense) else layer.filters
        assert size == len(kept)
        assert layer.kernel.shape[-1] == len(kept)
    return sliced


# --------------------------------------------------------------------------
# Exactness, size, selection
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SLICEABLE))
def test_masked_model_equals_sliced_model(name):
    model = randomize(SLICEABLE[name]())
    check_sliceable(model)
    keep = select_units(model, 0.5)
    output_layer = model.layers[-1].name
    assert output_layer == "logits" and "logits" not in keep
    assert set(keep) == {
        l.name for l in model.layers if isinstance(l, (L.Dense, L.Conv2D)) and l.name != "logits"
    }
    sliced = assert_masked_equals_sliced(model, keep)
    assert sliced.count_params() < model.count_params()
    assert [l.name for l in sliced.layers] == [l.name for l in model.layers]
    assert sliced.name == model.name
    assert type(sliced) is type(model)
    # The output layer keeps all its units: same classes.
    assert sliced.get_layer("logits").units == model.get_layer("logits").units


@pytest.mark.parametrize("name", ["digits_cnn", "mlp"])
def test_sliced_keras_file_is_smaller_and_reloads(name, tmp_path):
    model = randomize(SLICEABLE[name]())
    keep = select_units(model, 0.5)
    sliced = slice_model(model, keep)
    model.save(tmp_path / "full.keras")
    sliced.save(tmp_path / "sliced.keras")
    full_size = (tmp_path / "full.keras").stat().st_size
    sliced_size = (tmp_path / "sliced.keras").stat().st_size
    assert sliced_size < 0.6 * full_size, (sliced_size, full_size)
    x = inputs_for(model)
    reloaded = keras.models.load_model(tmp_path / "sliced.keras")
    np.testing.assert_allclose(predict(reloaded, x), predict(sliced, x), rtol=0, atol=1e-6)


def test_kept_units_are_the_largest_norm_ones():
    model = randomize(digits(), seed=3)
    keep = select_units(model, 0.5)
    for name, kept in keep.items():
        layer = model.get_layer(name)
        n = norms(layer)
        units = n.size
        assert len(kept) == units - units // 2
        assert np.all(np.diff(kept) > 0), "indices must be sorted and unique"
        removed = np.setdiff1d(np.arange(units), kept)
        assert n[kept].min() >= n[removed].max()
        # Exactly the top-k by norm.
        assert set(kept.tolist()) == set(np.argsort(-n)[: len(kept)].tolist())


def test_training_briefly_then_slicing_is_exact():
    model = digits()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=64)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert_masked_equals_sliced(model, select_units(model, 0.5))


def test_unit_masks_zero_exactly_the_removed_units():
    model = randomize(mlp())
    keep = select_units(model, 0.25)
    masks = unit_masks(model, keep)
    assert set(masks) == {"dense1/kernel", "dense1/bias", "dense2/kernel", "dense2/bias"}
    for name in ("dense1", "dense2"):
        layer = model.get_layer(name)
        kernel_mask, bias_mask = masks[f"{name}/kernel"], masks[f"{name}/bias"]
        assert kernel_mask.shape == tuple(layer.kernel.shape) and kernel_mask.dtype == np.float32
        assert bias_mask.shape == tuple(layer.bias.shape)
        expected = np.zeros(layer.units, np.float32)
        expected[keep[name]] = 1
        np.testing.assert_array_equal(bias_mask, expected)
        np.testing.assert_array_equal(kernel_mask, np.broadcast_to(expected, kernel_mask.shape))
        assert bias_mask.sum() == layer.units - int(0.25 * layer.units)


def test_per_layer_fractions_and_layer_regex():
    model = randomize(digits())
    keep = select_units(model, {"dense1": 0.75, "conv2": 0.25})
    assert set(keep) == {"dense1", "conv2"}
    assert len(keep["dense1"]) == 32 and len(keep["conv2"]) == 48
    sliced = assert_masked_equals_sliced(model, keep)
    assert sliced.get_layer("conv1").filters == 32
    assert sliced.get_layer("conv2").filters == 48
    assert sliced.get_layer("dense1").units == 32
    assert sliced.get_layer("dense1").kernel.shape == (3 * 3 * 48, 32)
    assert sliced.get_layer("logits").kernel.shape == (32, 10)

    regex_keep = select_units(digits(), 0.5, layer_regex="conv.*")
    assert set(regex_keep) == {"conv1", "conv2"}
    # The output layer is never pruned, even if the pattern matches it.
    assert set(select_units(digits(), 0.5, layer_regex=".*")) == {"conv1", "conv2", "dense1"}


def test_at_least_one_unit_is_kept():
    model = randomize(mlp())
    keep = select_units(model, {"dense2": 0.999})
    assert len(keep["dense2"]) == 1
    assert keep["dense2"][0] == np.argmax(norms(model.get_layer("dense2")))
    assert_masked_equals_sliced(model, keep)
    # Even a fraction a hair below 1 keeps one unit.
    assert len(select_units(model, 1 - 1e-12)["dense1"]) == 1


def test_fraction_zero_keeps_everything():
    model = randomize(mlp())
    keep = select_units(model, 0.0)
    assert all(len(v) == model.get_layer(k).units for k, v in keep.items())
    x = inputs_for(model)
    sliced = slice_model(model, keep)
    assert sliced.count_params() == model.count_params()
    np.testing.assert_allclose(predict(sliced, x), predict(model, x), rtol=0, atol=TOL)


def test_output_layer_is_never_pruned():
    model = digits()
    with pytest.raises(UsageError, match="'logits' is the output layer"):
        select_units(model, {"logits": 0.5})
    with pytest.raises(UsageError, match="matches no prunable layer"):
        select_units(model, 0.5, layer_regex="logits")
    with pytest.raises(UsageError, match="'logits' is the output layer"):
        slice_model(model, {"logits": np.arange(5)})
    with pytest.raises(UsageError, match="'logits' is the output layer"):
        unit_masks(model, {"logits": np.arange(5)})


# --------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------


def residual():
    inputs = keras.Input(shape=(6,), name="input")
    x = L.Dense(8, activation="relu", name="dense1")(inputs)
    y = L.Dense(8, activation="relu", name="dense2")(x)
    x = L.Add(name="add")([x, y])
    return keras.Model(inputs, L.Dense(3, name="logits")(x), name="residual")


def lstm_between_dense():
    """proj (Dense on every time step) -> LSTM -> d1 -> Dropout -> d2 (tanh) -> logits.

    proj's units would pass through the LSTM; d1 and d2 only feed Dense layers.
    """
    inputs = keras.Input(shape=(6, 5), name="input")
    x = L.Dense(8, activation="relu", name="proj")(inputs)
    x = L.LSTM(12, name="lstm")(x)
    x = L.Dense(16, activation="relu", name="d1")(x)
    x = L.Dropout(0.3, name="drop")(x)
    x = L.Dense(8, activation="tanh", name="d2")(x)
    return keras.Model(inputs, L.Dense(3, name="logits")(x), name="lstm_between_dense")


def dense_then_lstm():
    """d1 -> d2 -> Reshape -> LSTM -> logits: only d1 can be pruned (d2 feeds the Reshape)."""
    return keras.Sequential(
        [
            keras.Input(shape=(12,)),
            L.Dense(16, activation="relu", name="d1"),
            L.Dense(16, activation="relu", name="d2"),
            L.Reshape((4, 4), name="to_seq"),
            L.LSTM(6, name="lstm"),
            L.Dense(3, name="logits"),
        ],
        name="dense_then_lstm",
    )


def shared_dense():
    """The same Dense layer applied twice: not a chain."""
    shared = L.Dense(6, activation="relu", name="shared")
    inputs = keras.Input(shape=(6,), name="input")
    return keras.Model(inputs, L.Dense(3, name="logits")(shared(shared(inputs))), name="shared_dense")


def with_ops():
    """keras.ops calls are graph nodes that are not layers: tanh before d1 (off every
    pruned path), relu between d2 and logits (on d2's path)."""
    inputs = keras.Input(shape=(6,), name="input")
    x = L.Dense(8, activation="relu", name="d1")(keras.ops.tanh(inputs))
    x = keras.ops.relu(L.Dense(8, name="d2")(x))
    return keras.Model(inputs, L.Dense(3, name="logits")(x), name="with_ops")


def cifar10(input_shape=(32, 32, 3)):
    return build_model("cifar10_cnn", input_shape, 10)


# name -> (factory, layers for check_sliceable, fraction for select_units, keep, culprit).
# layers=None: the default (every prunable layer).
UNSLICEABLE = {
    # conv1's filters would pass through norm1 (LRN mixes channels).
    "cifar10_cnn": (lambda: cifar10((8, 8, 3)), None, 0.5, {"conv1": np.arange(32)}, "'norm1'"),
    "cifar10_cnn_conv2": (
        lambda: cifar10((8, 8, 3)), ["conv2"], {"conv2": 0.5}, {"conv2": np.arange(32)}, "'norm2'",
    ),
    "residual": (residual, None, 0.5, {}, "'add'"),
    # Pruning the recurrent layer itself.
    "lstm": (lambda: build_model("lstm", (8, 8), 10), ["lstm"], {"lstm": 0.5}, {"lstm": [0]}, "'lstm'"),
    # A layer inside the TimeDistributed per-frame CNN.
    "cnn_lstm": (
        lambda: build_model("cnn_lstm", (2, 8, 8, 1), 10),
        ["frame_conv1"], {"frame_conv1": 0.5}, {"frame_conv1": [0]}, "'frame_cnn_td'",
    ),
    # An LSTM on the path of a pruned Dense.
    "lstm_on_pruned_path": (lstm_between_dense, None, 0.5, {"proj": np.arange(4)}, "'lstm'"),
    # A Reshape on the path of a pruned Dense.
    "reshape_on_pruned_path": (dense_then_lstm, ["d2"], {"d2": 0.5}, {"d2": np.arange(8)}, "'to_seq'"),
    "shared_layer": (shared_dense, None, 0.5, {}, "'shared'"),
    # A bare keras.ops operation (auto-named, so named here by its class).
    "op_on_pruned_path": (with_ops, ["d2"], {"d2": 0.5}, {"d2": np.arange(4)}, "(Relu)"),
}


@pytest.mark.parametrize("name", sorted(UNSLICEABLE))
def test_unsupported_layers_are_refused_when_pruned_units_reach_them(name):
    factory, layers, fraction, keep, layer = UNSLICEABLE[name]
    model = factory()
    for call in (
        lambda: check_sliceable(model, layers=layers),
        lambda: select_units(model, fraction),
        lambda: slice_model(model, keep),
        lambda: unit_masks(model, keep),
    ):
        with pytest.raises(UsageError) as info:
            call()
        message = str(info.value)
        assert layer in message and "\n" not in message
        assert "structured pruning supports" in message and "Conv2D/Dense" in message
    if name.startswith("cifar10_cnn"):
        assert "LocalResponseNormalization" in message and "cifar10_cnn" in message
        pruned = next(iter(keep))
        assert f"exclude {pruned!r} from pruning" in message
    if name == "lstm_on_pruned_path":
        assert "'proj'" in message and "recurrent" in message


@pytest.mark.parametrize(
    "factory",
    [lambda: build_model("lstm", (8, 8), 10), lambda: build_model("cnn_lstm", (2, 8, 8, 1), 10)],
    ids=["lstm", "cnn_lstm"],
)
def test_models_without_a_prunable_layer_are_carried_over_whole(factory):
    """lstm/cnn_lstm have no Dense/Conv2D but the output layer on their chain: nothing to prune."""
    model = randomize(factory())
    check_sliceable(model)
    with pytest.raises(UsageError, match="has no prunable layer"):
        select_units(model, 0.5)
    assert unit_masks(model, {}) == {}
    sliced = slice_model(model, {})
    x = inputs_for(model, n=4)
    np.testing.assert_allclose(predict(sliced, x), predict(model, x), rtol=0, atol=1e-6)
    assert [l.name for l in sliced.layers] == [l.name for l in model.layers]
    for a, b in zip(model.weights, sliced.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def bn_before_same_conv():
    return keras.Sequential(
        [
            keras.Input(shape=(6, 6, 1)),
            L.Conv2D(4, 3, padding="same", activation="relu", name="conv1"),
            L.BatchNormalization(name="bn1"),
            L.Conv2D(4, 3, padding="same", activation="relu", name="conv2"),
            L.Flatten(name="flatten"),
            L.Dense(3, name="logits"),
        ]
    )


def sigmoid_before_same_conv():
    return keras.Sequential(
        [
            keras.Input(shape=(6, 6, 1)),
            L.Conv2D(4, 3, padding="same", activation="sigmoid", name="conv1"),
            L.Conv2D(4, 3, padding="same", activation="relu", name="conv2"),
            L.Flatten(name="flatten"),
            L.Dense(3, name="logits"),
        ]
    )


@pytest.mark.parametrize(
    "factory,culprit",
    [(bn_before_same_conv, "layer 'bn1'"), (sigmoid_before_same_conv, "layer 'conv1'")],
)
def test_constant_that_cannot_be_folded_is_refused(factory, culprit):
    model = randomize(factory())
    with pytest.raises(UsageError) as info:
        select_units(model, 0.5)
    message = str(info.value)
    assert culprit in message and "'conv2'" in message and "padding='same'" in message
    with pytest.raises(UsageError, match=culprit):
        check_sliceable(model)
    with pytest.raises(UsageError, match=culprit):
        slice_model(model, {"conv1": np.arange(2)})
    # Keeping every unit of conv1 is fine, and conv2 alone can be pruned exactly.
    check_sliceable(model, layers=["conv2"])
    keep = select_units(model, 0.5, layer_regex="conv2")
    assert set(keep) == {"conv2"}
    assert_masked_equals_sliced(model, keep)


def test_non_elementwise_activation_is_refused():
    model = keras.Sequential(
        [
            keras.Input(shape=(5,)),
            L.Dense(6, activation="softmax", name="dense1"),
            L.Dense(3, name="logits"),
        ]
    )
    with pytest.raises(UsageError, match="'dense1'.*softmax"):
        select_units(model, 0.5)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan"), "0.5", True, None])
def test_bad_fraction_is_refused(fraction):
    with pytest.raises(UsageError, match="fraction"):
        select_units(digits(), fraction)


def test_bad_per_layer_fraction_and_bad_keep_are_refused():
    model = digits()
    with pytest.raises(UsageError, match="fraction for layer 'dense1'"):
        select_units(model, {"dense1": 1.0})
    with pytest.raises(UsageError, match="no prunable layer 'nope'"):
        select_units(model, {"nope": 0.5})
    with pytest.raises(UsageError, match="--layers .*not a regular expression"):
        select_units(model, 0.5, layer_regex="(")
    for keep, match in [
        ({"dense1": []}, "keeps no unit"),
        ({"dense1": [128]}, r"\[0, 128\)"),
        ({"dense1": [1, 1]}, "duplicates"),
        ({"dense1": [0.5]}, "integer"),
        ({"nope": [0]}, "no prunable layer 'nope'"),
    ]:
        with pytest.raises(UsageError, match=match):
            slice_model(model, keep)
        with pytest.raises(UsageError, match=match):
            unit_masks(model, keep)


# --------------------------------------------------------------------------
# Unsupported layers off the pruned paths are carried over
# --------------------------------------------------------------------------


def test_cifar10_cnn_dense_layers_can_be_pruned():
    """local3/local4 at 0.5: LRN layers are upstream of every pruned unit, so slicing is exact."""
    model = randomize(cifar10(), seed=4)
    check_sliceable(model, layers=["local3", "local4"])
    keep = select_units(model, 0.5, layer_regex=r"local.*")
    assert set(keep) == {"local3", "local4"}
    assert len(keep["local3"]) == 192 and len(keep["local4"]) == 96
    for other in (
        select_units(model, {"local3": 0.5, "local4": 0.5}),
        select_units(model, {"local3": 0.5, "local4": 0.5}, layer_regex=r"local.*"),
    ):
        assert set(other) == set(keep)
        for name in keep:
            np.testing.assert_array_equal(other[name], keep[name])

    original = {name: w.numpy() for name, w in keyed(model.weights).items()}
    sliced = assert_masked_equals_sliced(model, keep)
    assert sliced.count_params() < model.count_params()
    assert sliced.get_layer("local3").kernel.shape == (8 * 8 * 64, 192)
    assert sliced.get_layer("local4").kernel.shape == (192, 96)
    assert sliced.get_layer("logits").kernel.shape == (96, 10)
    assert [l.name for l in sliced.layers] == [l.name for l in model.layers]
    # Layers upstream of the pruned ones -- the LRN layers included -- are carried over unchanged.
    for name in ("norm1", "norm2"):
        new, old = sliced.get_layer(name), model.get_layer(name)
        assert type(new).__name__ == "LocalResponseNormalization"
        assert new.get_config() == old.get_config()
    for name in ("conv1", "conv2"):
        assert sliced.get_layer(name).get_config() == model.get_layer(name).get_config()
        for w in sliced.get_layer(name).weights:
            np.testing.assert_array_equal(w.numpy(), original[f"{name}/{w.name}"])


def test_cifar10_cnn_default_layers_are_refused_naming_norm1():
    model = cifar10()
    for call in (
        lambda: check_sliceable(model),
        lambda: select_units(model, 0.5),
        lambda: select_units(model, 0.5, layer_regex=r"conv.*"),
        lambda: select_units(model, {"conv1": 0.5, "local3": 0.5}),
    ):
        with pytest.raises(UsageError, match="'norm1'") as info:
            call()
        assert "'conv1'" in str(info.value)
    with pytest.raises(UsageError, match="'norm2'"):
        select_units(model, {"conv2": 0.5, "local3": 0.5})
    # Keeping every filter of conv1 removes nothing, so nothing reaches norm1.
    slice_model(model, {"conv1": np.arange(64)})


def test_dense_layers_after_an_lstm_can_be_pruned():
    model = randomize(lstm_between_dense(), seed=5)
    with pytest.raises(UsageError, match="'lstm'"):
        check_sliceable(model)  # proj's units would go through the LSTM
    check_sliceable(model, layers=["d1", "d2"])
    keep = select_units(model, 0.5, layer_regex=r"d\d")
    assert set(keep) == {"d1", "d2"}
    assert set(select_units(model, {"d1": 0.5, "d2": 0.5})) == {"d1", "d2"}
    lstm_weights = [w.numpy() for w in model.get_layer("lstm").weights]
    proj_weights = [w.numpy() for w in model.get_layer("proj").weights]
    sliced = assert_masked_equals_sliced(model, keep)
    assert sliced.count_params() < model.count_params()
    assert sliced.get_layer("d1").kernel.shape == (12, 8)
    assert sliced.get_layer("d2").kernel.shape == (8, 4)
    for name, weights in (("lstm", lstm_weights), ("proj", proj_weights)):
        assert sliced.get_layer(name).get_config() == model.get_layer(name).get_config()
        for new, old in zip(sliced.get_layer(name).weights, weights):
            np.testing.assert_array_equal(new.numpy(), old)


def test_unsupported_layers_after_the_next_weighted_layer_are_carried_over():
    """Pruning d1 slices d2's input; the Reshape and LSTM after d2 are left alone."""
    model = randomize(dense_then_lstm(), seed=6)
    with pytest.raises(UsageError, match="'to_seq'.*'d2'"):
        check_sliceable(model)
    keep = select_units(model, {"d1": 0.5})
    sliced = assert_masked_equals_sliced(model, keep)
    assert type(sliced) is keras.Sequential
    assert sliced.get_layer("d2").kernel.shape == (8, 16)
    for new, old in zip(sliced.get_layer("lstm").weights, model.get_layer("lstm").weights):
        np.testing.assert_array_equal(new.numpy(), old.numpy())


def test_keras_ops_off_the_pruned_paths_are_carried_over():
    model = randomize(with_ops(), seed=7)
    check_sliceable(model, layers=["d1"])
    sliced = assert_masked_equals_sliced(model, select_units(model, {"d1": 0.5}))
    assert sliced.get_layer("d2").kernel.shape == (4, 8)


def test_reloaded_sequential_and_a_slice_of_a_slice_are_exact(tmp_path):
    """A Sequential loaded from a .keras file (Keras 3 adds a node to each layer
    whenever it rebuilds one) slices exactly, and so does its slice."""
    model = randomize(seq_conv_bn())
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    sliced = assert_masked_equals_sliced(reloaded, select_units(reloaded, 0.5))
    again = assert_masked_equals_sliced(sliced, select_units(sliced, 0.5))
    assert again.get_layer("conv2").filters == 2 and again.get_layer("dense1").units == 3
    # Every variable of a slice is named as a reload of its file names it (no
    # model-name prefix on some layers and not on others).
    for small in (sliced, again):
        assert keys(small.weights) == [f"{l.name}/{w.name}" for l in small.layers for w in l.weights]
