"""Tests for trainer.models: registry, logits, names, LRN/.keras, dropout, state, user models."""

import sys
import textwrap

import numpy as np
import pytest
import keras
import tensorflow as tf

from trainer.errors import UsageError
from trainer.models import (
    MODELS,
    LocalResponseNormalization,
    build_model,
    is_stateful,
    model_names,
    reset_stateful,
)

# A suitable input shape for each registry model.
SHAPES = {
    "digits_cnn": (8, 8, 1),
    "cifar10_cnn": (32, 32, 3),
    "mlp": (8, 8, 1),
    "lstm": (8, 8, 1),
    "cnn_lstm": (4, 8, 8, 1),
}


def _weights(model):
    return [w.numpy().copy() for w in model.weights]


def _lstm_states(model):
    return [s.numpy() for s in model.get_layer("lstm").states]


def test_registry_lists_the_five_models():
    assert model_names() == sorted(SHAPES) == sorted(MODELS)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_model_outputs_logits_with_deterministic_names(name):
    shape = SHAPES[name]
    x = np.random.default_rng(0).random((3, *shape), dtype=np.float32)
    first = build_model(name, shape, 7, dropout=0.1, recurrent_dropout=0.1)
    second = build_model(name, shape, 7, dropout=0.1, recurrent_dropout=0.1)

    y = first(x, training=False).numpy()
    assert y.shape == (3, 7)
    assert np.isfinite(y).all()
    last = first.layers[-1]
    assert last.name == "logits" and last.activation is keras.activations.linear
    assert not np.allclose(y.sum(axis=1), 1.0)  # not softmax probabilities
    assert first.layers[0].name == "input"

    names = [w.path for w in first.weights]
    assert len(set(names)) == len(names) > 0
    assert names == [w.path for w in second.weights]
    assert [layer.name for layer in first.layers] == [layer.name for layer in second.layers]
    # Matching weights by name makes the models identical.
    second.set_weights(first.get_weights())
    np.testing.assert_array_equal(second(x, training=False).numpy(), y)


def test_lstm_accepts_plain_sequences():
    model = build_model("lstm", (5, 3), 4)
    assert "to_sequence" not in [layer.name for layer in model.layers]
    assert model(np.zeros((2, 5, 3), np.float32)).shape == (2, 4)


def test_cifar10_cnn_has_the_tutorial_structure():
    model = build_model("cifar10_cnn", (32, 32, 3), 10)
    assert [layer.name for layer in model.layers] == [
        "input", "conv1", "pool1", "norm1", "conv2", "norm2", "pool2",
        "flatten", "local3", "local4", "logits",
    ]
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert [(c.filters, c.kernel_size, c.strides, c.padding) for c in convs] == [
        (64, (5, 5), (1, 1), "same")
    ] * 2
    assert all(c.activation is keras.activations.relu for c in convs)
    pools = [l for l in model.layers if isinstance(l, keras.layers.MaxPooling2D)]
    assert [(p.pool_size, p.strides, p.padding) for p in pools] == [((3, 3), (2, 2), "same")] * 2
    dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    assert [d.units for d in dense] == [384, 192, 10]
    assert [d.activation for d in dense[:2]] == [keras.activations.relu] * 2
    norms = [l for l in model.layers if isinstance(l, LocalResponseNormalization)]
    assert [(n.depth_radius, n.bias, n.alpha, n.beta) for n in norms] == [
        (4, 1.0, 0.001 / 9.0, 0.75)
    ] * 2
    assert model.get_layer("flatten").output.shape == (None, 8 * 8 * 64)
    assert not any(isinstance(l, keras.layers.Lambda) for l in model.layers)
    # Any rank-3 input works.
    assert build_model("cifar10_cnn", (8, 8, 1), 10)(np.zeros((1, 8, 8, 1))).shape == (1, 10)


def test_local_response_normalization_matches_the_formula():
    x = np.random.default_rng(1).normal(size=(2, 3, 3, 16)).astype(np.float32)
    y = LocalResponseNormalization()(x).numpy()
    expected = np.empty_like(x)
    for d in range(16):
        window = x[..., max(0, d - 4): d + 5]
        expected[..., d] = x[..., d] / (1.0 + 0.001 / 9.0 * (window**2).sum(-1)) ** 0.75
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)

    # Non-default parameters survive get_config/from_config (what .keras loading uses).
    layer = LocalResponseNormalization(2, bias=2.0, alpha=0.5, beta=0.5, name="lrn")
    config = layer.get_config()
    assert {k: config[k] for k in ("depth_radius", "bias", "alpha", "beta", "name")} == {
        "depth_radius": 2, "bias": 2.0, "alpha": 0.5, "beta": 0.5, "name": "lrn",
    }
    clone = LocalResponseNormalization.from_config(config)
    np.testing.assert_array_equal(clone(x).numpy(), layer(x).numpy())
    assert not np.allclose(layer(x).numpy(), y)


def test_cifar10_cnn_round_trips_through_keras_file(tmp_path):
    model = build_model("cifar10_cnn", (32, 32, 3), 10)
    x = np.random.default_rng(2).random((4, 32, 32, 3), dtype=np.float32)
    path = tmp_path / "cifar.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # safe mode, no custom_objects
    assert isinstance(loaded.get_layer("norm1"), LocalResponseNormalization)
    assert [w.path for w in loaded.weights] == [w.path for w in model.weights]
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_lstm_dropout_is_off_at_inference_on_in_training_and_changes_no_weight():
    model = build_model("lstm", (8, 8, 1), 10, dropout=0.3, recurrent_dropout=0.3)
    x = np.random.default_rng(3).random((6, 8, 8, 1), dtype=np.float32)
    lstm = model.get_layer("lstm")
    assert (lstm.dropout, lstm.recurrent_dropout) == (0.3, 0.3)
    before = _weights(model)

    p1 = model.predict(x, verbose=0)
    c1 = model(x, training=False).numpy()
    c2 = model(x, training=False).numpy()
    p2 = model.predict(x, verbose=0)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_allclose(p1, c1, rtol=1e-5, atol=1e-6)

    t1 = model(x, training=True).numpy()
    t2 = model(x, training=True).numpy()
    assert not np.allclose(t1, t2)
    assert not np.allclose(t1, c1)

    for b, a in zip(before, _weights(model)):
        np.testing.assert_array_equal(a, b)


def test_lstm_cell_reuses_one_dropout_mask_per_sequence_across_time_steps(monkeypatch):
    """With recurrent_dropout > 0 the cell applies both dropouts itself: record its masks."""
    keras.utils.set_random_seed(4)
    batch, steps, features = 5, 8, 8
    model = build_model("lstm", (steps, features, 1), 10, dropout=0.5, recurrent_dropout=0.5)
    cell = model.get_layer("lstm").cell
    seen = {"input": [], "recurrent": []}
    for kind, attr in (("input", "get_dropout_mask"), ("recurrent", "get_recurrent_dropout_mask")):
        original = getattr(cell, attr)

        def recording(step_input, _original=original, _kind=kind):
            mask = _original(step_input)
            seen[_kind].append(np.asarray(mask))
            return mask

        monkeypatch.setattr(cell, attr, recording)

    x = np.random.default_rng(5).random((batch, steps, features, 1), dtype=np.float32)
    model(x, training=True)
    first_call = {kind: calls[0] for kind, calls in seen.items()}
    for kind, units in (("input", features), ("recurrent", 64)):
        calls = seen[kind]
        assert len(calls) >= steps  # the cell asked for its mask at every step
        mask = calls[0]
        assert mask.shape == (4, batch, units)  # per gate (i, f, c, o): one mask per sequence, not per step
        assert set(np.unique(mask)) == {0.0, 2.0}  # dropped / kept (scaled by 1/(1-0.5))
        assert len({row.tobytes() for row in mask[0]}) > 1  # differs between sequences
        for later in calls[1:]:  # ... and the same mask at every time step
            np.testing.assert_array_equal(mask, later)

    for calls in seen.values():
        calls.clear()
    model(x, training=True)  # a new batch of sequences draws new masks
    assert not np.array_equal(seen["input"][0], first_call["input"])


def test_lstm_input_dropout_without_recurrent_dropout_is_one_mask_per_sequence():
    """recurrent_dropout=0: Keras's fused LSTM would draw a (batch, T, F) mask, so the
    model drops inputs with a Dropout whose mask is broadcast over time instead."""
    keras.utils.set_random_seed(6)
    model = build_model("lstm", (8, 8, 1), 10, dropout=0.5)
    assert model.get_layer("lstm").dropout == 0.0
    dropped = keras.Model(model.input, model.get_layer("lstm_input_dropout").output)
    x = np.ones((5, 8, 8, 1), np.float32)
    out = dropped(x, training=True).numpy()  # (batch, T, F)
    assert set(np.unique(out)) == {0.0, 2.0}
    for t in range(1, 8):
        np.testing.assert_array_equal(out[:, t, :], out[:, 0, :])
    assert len({row.tobytes() for row in out[:, 0, :]}) > 1
    np.testing.assert_array_equal(dropped(x, training=False).numpy(), x.reshape(5, 8, 8))
    # Without dropout the layer is not there at all (weights are the same either way).
    assert "lstm_input_dropout" not in [l.name for l in build_model("lstm", (8, 8, 1), 10).layers]


def test_stateful_lstm_carries_state_until_reset():
    model = build_model("lstm", (8, 8, 1), 10, stateful=True, batch_size=4)
    assert is_stateful(model)
    assert model.input_shape == (4, 8, 8, 1)
    x = np.random.default_rng(7).random((4, 8, 8, 1), dtype=np.float32)

    y1 = model(x).numpy()
    assert any(np.abs(s).max() > 0 for s in _lstm_states(model))
    y2 = model(x).numpy()
    assert not np.allclose(y1, y2)  # second call starts from the first call's state

    reset_stateful(model)
    assert all(np.array_equal(s, np.zeros_like(s)) for s in _lstm_states(model))
    np.testing.assert_allclose(model(x).numpy(), y1, rtol=1e-6, atol=1e-6)

    # Reset also reaches a stateful layer inside a nested model.
    inputs = keras.Input(shape=(8, 8, 1), batch_size=4)
    outer = keras.Model(inputs, model(inputs))
    outer(x)
    assert is_stateful(outer)
    reset_stateful(outer)
    assert all(np.array_equal(s, np.zeros_like(s)) for s in _lstm_states(model))


def test_non_stateful_models():
    model = build_model("lstm", (8, 8, 1), 10)
    assert not is_stateful(model)
    reset_stateful(model)  # no-op, no error
    assert not is_stateful(build_model("cnn_lstm", (3, 8, 8, 1), 10))


def test_cnn_lstm_trains_end_to_end_through_time_distributed():
    keras.utils.set_random_seed(8)
    model = build_model("cnn_lstm", (4, 8, 8, 1), 3)
    td = model.get_layer("frame_cnn_td")
    assert isinstance(td, keras.layers.TimeDistributed)
    cnn_vars = td.trainable_weights
    lstm_vars = model.get_layer("lstm").trainable_weights
    assert cnn_vars and lstm_vars
    x = np.random.default_rng(9).random((6, 4, 8, 8, 1), dtype=np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    for v, g in zip(model.trainable_variables, grads):
        assert g is not None and float(tf.norm(g)) > 0, v.path
    keras.optimizers.SGD(0.1).apply_gradients(zip(grads, model.trainable_variables))

    for v in cnn_vars + lstm_vars:
        assert not np.array_equal(v.numpy(), before[v.path]), v.path


def test_cnn_lstm_rejects_single_images():
    with pytest.raises(UsageError, match=r"cnn_lstm needs \(T, H, W, C\).*synthetic"):
        build_model("cnn_lstm", (8, 8, 1), 10)


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "tm_user_nets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent("""
        import keras

        SEEN = {}

        def tiny(input_shape, num_classes):
            inputs = keras.Input(shape=input_shape)
            x = keras.layers.Flatten()(inputs)
            return keras.Model(inputs, keras.layers.Dense(num_classes, name="out")(x))

        def with_options(input_shape, num_classes, **options):
            SEEN.update(options)
            return tiny(input_shape, num_classes)

        def not_a_model(input_shape, num_classes):
            return "a string"

        NOT_CALLABLE = 3
    """))
    (pkg / "broken.py").write_text("raise RuntimeError('boom\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "tm_user_nets"
    for mod in [m for m in sys.modules if m.split(".")[0] == "tm_user_nets"]:
        monkeypatch.delitem(sys.modules, mod)


def test_user_model_from_package_module_function(user_package):
    model = build_model(f"{user_package}.nets:tiny", (8, 8, 1), 5, dropout=0.2, stateful=False)
    assert isinstance(model, keras.Model)
    assert model.get_layer("out").units == 5
    assert model(np.zeros((2, 8, 8, 1))).shape == (2, 5)

    build_model(f"{user_package}.nets:with_options", (4,), 3, dropout=0.25, batch_size=8)
    assert sys.modules[f"{user_package}.nets"].SEEN == {"dropout": 0.25, "batch_size": 8}


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("no_such_model", r"unknown model 'no_such_model'"),
        ("tm_no_such_module_xyz:build", r"cannot import module 'tm_no_such_module_xyz'"),
        ("{pkg}.broken:build", r"cannot import module .*RuntimeError: boom second line"),
        ("{pkg}.nets:missing", r"has no attribute 'missing'"),
        ("{pkg}.nets:NOT_CALLABLE", r"not callable"),
        ("{pkg}.nets:not_a_model", r"returned str, not a keras.Model"),
        ("{pkg}.nets:", r"expected package.module:function"),
        (":tiny", r"expected package.module:function"),
    ],
)
def test_bad_model_names_raise_usage_error(user_package, name, pattern):
    with pytest.raises(UsageError, match=pattern) as info:
        build_model(name.format(pkg=user_package), (8, 8, 1), 10)
    message = str(info.value)
    assert "\n" not in message
    assert all(n in message for n in model_names())


def test_stateful_without_batch_size_and_bad_options_raise_usage_error():
    with pytest.raises(UsageError, match="batch_size"):
        build_model("lstm", (8, 8, 1), 10, stateful=True)
    with pytest.raises(UsageError, match="batch_size"):
        build_model("cnn_lstm", (3, 8, 8, 1), 10, stateful=True, batch_size=0)
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        with pytest.raises(UsageError, match="tf.distribute"):
            build_model("lstm", (8, 8, 1), 10, stateful=True, batch_size=4)
    with pytest.raises(UsageError, match="dropout"):
        build_model("mlp", (8, 8, 1), 10, dropout=1.5)
    with pytest.raises(UsageError, match="digits_cnn needs"):
        build_model("digits_cnn", (64,), 10)
    # Options that do not apply are ignored.
    assert build_model("digits_cnn", (8, 8, 1), 10, stateful=True, dropout=0.5).output_shape == (
        None, 10,
    )


def test_digits_cnn_reaches_95_percent_on_sklearn_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, stratify=digits.target, random_state=0
    )
    keras.utils.set_random_seed(0)
    model = build_model("digits_cnn", (8, 8, 1), 10)
    assert not any(
        isinstance(l, (keras.layers.BatchNormalization, keras.layers.Dropout))
        for l in model.layers
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=32, epochs=8, verbose=0)
    accuracy = float(np.mean(model.predict(x_test, verbose=0).argmax(axis=1) == y_test))
    assert accuracy >= 0.95
