"""`merge align` and `merge barrier`: weight matching of independently
trained networks."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import ok, run
from merge.align import align, derive_spec, set_weights, weights_of
from trainer.data import load_dataset
from trainer.models import build_model


def merge(*args, cwd):
    return run([sys.executable, "-m", "merge", *args], cwd=cwd, timeout=300)


def _trained(name, seed, epochs=3, shape=(8, 8, 1)):
    tf.keras.utils.set_random_seed(seed)
    model = build_model(name, shape, 10) if isinstance(name, str) else name()
    data = load_dataset("digits")
    model.compile(tf.keras.optimizers.Adam(2e-3), tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(data.x_train, data.y_train, epochs=epochs, batch_size=64, verbose=0)
    return model


def _conv_bn():
    x = tf.keras.Input((8, 8, 1))
    h = tf.keras.layers.Conv2D(6, 3, name="c1")(x)
    h = tf.keras.layers.BatchNormalization(name="bn1")(h)
    h = tf.keras.layers.ReLU(name="r1")(h)
    h = tf.keras.layers.Conv2D(5, 3, name="c2", activation="relu")(h)
    h = tf.keras.layers.Flatten(name="flat")(h)
    h = tf.keras.layers.Dense(7, activation="relu", name="d1")(h)
    return tf.keras.Model(x, tf.keras.layers.Dense(10, name="logits")(h), name="conv_bn")


def _permuted_copy(model):
    """The same function with hidden units shuffled, written out by hand."""
    rng = np.random.default_rng(3)
    w = weights_of(model)
    p = {"c1": rng.permutation(6), "c2": rng.permutation(5), "d1": rng.permutation(7)}
    for n in ("c1/kernel", "c1/bias"):
        w[n] = w[n][..., p["c1"]]
    for n in ("bn1/gamma", "bn1/beta", "bn1/moving_mean", "bn1/moving_variance"):
        w[n] = w[n][p["c1"]]
    w["c2/kernel"] = w["c2/kernel"][:, :, p["c1"], :][..., p["c2"]]
    w["c2/bias"] = w["c2/bias"][p["c2"]]
    k = w["d1/kernel"].reshape(16, 5, 7)[:, p["c2"], :][..., p["d1"]]
    w["d1/kernel"], w["d1/bias"] = k.reshape(80, 7), w["d1/bias"][p["d1"]]
    w["logits/kernel"] = w["logits/kernel"][p["d1"]]
    return w


def test_a_known_permutation_is_recovered_exactly():
    a = _trained(_conv_bn, 0, epochs=2)
    b = _conv_bn()
    set_weights(b, _permuted_copy(a))
    x = load_dataset("digits").x_test
    np.testing.assert_allclose(b(x).numpy(), a(x).numpy(), atol=1e-4)  # the test's permutation is right
    aligned, _ = align(a, b)
    for name, value in weights_of(a).items():
        np.testing.assert_array_equal(aligned[name], value, err_msg=name)


@pytest.mark.parametrize("name", ["mlp", "digits_cnn"])
def test_aligned_model_computes_the_same_function(name, tmp_path):
    a, b = _trained(name, 1, epochs=1), _trained(name, 2, epochs=1)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    proc = ok(merge("align", "a.keras", "b.keras", "-o", "b_aligned.keras", cwd=tmp_path))
    assert "units moved per layer" in proc.stdout
    aligned = tf.keras.models.load_model(tmp_path / "b_aligned.keras", compile=False)
    x = load_dataset("digits").x_test
    np.testing.assert_allclose(aligned(x).numpy(), b(x).numpy(), atol=1e-5)
    assert any(not np.array_equal(u, v) for u, v in zip(aligned.get_weights(), b.get_weights()))


def test_alignment_lowers_the_barrier(tmp_path):
    a, b = _trained("mlp", 3), _trained("mlp", 4)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    proc = ok(merge("barrier", "a.keras", "b.keras", "--data", "digits", "--plot", "barrier.png", cwd=tmp_path))
    lines = proc.stdout.splitlines()
    assert len([l for l in lines if l[:5].strip().replace(".", "").isdigit()]) == 11
    heights = dict(part.split() for part in lines[-2].split(": ")[1].split(", "))
    assert float(heights["aligned"]) < 0.5 * float(heights["naive"]), proc.stdout
    assert (tmp_path / "barrier.png").stat().st_size > 1000


def _residual():
    x = tf.keras.Input((8,))
    h = tf.keras.layers.Dense(8, name="d1")(x)
    h = tf.keras.layers.Add(name="skip")([x, h])
    return tf.keras.Model(x, tf.keras.layers.Dense(3, name="d2")(h))


@pytest.mark.parametrize("make, needle", [
    (lambda: build_model("cifar10_cnn", (32, 32, 3), 10), "LocalResponseNormalization"),
    (lambda: build_model("lstm", (8, 8), 10), "LSTM"),
    (_residual, "not a plain chain"),
])
def test_unsupported_topologies_are_refused(make, needle, tmp_path):
    for name in ("a", "b"):
        make().save(tmp_path / f"{name}.keras")
    proc = merge("align", "a.keras", "b.keras", "-o", "c.keras", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "c.keras").exists()
