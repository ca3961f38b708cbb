"""`merge align` and `merge barrier`: weight matching of independently
trained networks."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import keras

from conftest import ok, run, trainer
from merge.align import align, derive_spec, set_weights, weights_of
from trainer.data import load_dataset
from trainer.models import build_model


def merge(*args, cwd):
    return run([sys.executable, "-m", "merge", *args], cwd=cwd, timeout=300)


def predict(model, x):
    return keras.ops.convert_to_numpy(model(x))


def _trained(name, seed, epochs=3, shape=(8, 8, 1)):
    keras.utils.set_random_seed(seed)
    model = build_model(name, shape, 10) if isinstance(name, str) else name()
    data = load_dataset("digits")
    model.compile(keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(data.x_train, data.y_train, epochs=epochs, batch_size=64, verbose=0)
    return model


def _conv_bn():
    x = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(6, 3, name="c1")(x)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU(name="r1")(h)
    h = keras.layers.Conv2D(5, 3, name="c2", activation="relu")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(7, activation="relu", name="d1")(h)
    return keras.Model(x, keras.layers.Dense(10, name="logits")(h), name="conv_bn")


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
    np.testing.assert_allclose(predict(b, x), predict(a, x), atol=1e-4)  # the test's permutation is right
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
    aligned = keras.models.load_model(tmp_path / "b_aligned.keras", compile=False)
    x = load_dataset("digits").x_test
    np.testing.assert_allclose(predict(aligned, x), predict(b, x), atol=1e-5)
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


def test_a_reloaded_sequential_is_a_chain(tmp_path):
    """Keras 3 adds a node to every layer of a loaded Sequential each time it
    rebuilds it; the chain is the one the output was computed through."""
    keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="relu", name="h"),
                      keras.layers.Dense(3, name="o")], name="q").save(tmp_path / "q.keras")
    model = keras.models.load_model(tmp_path / "q.keras")
    assert max(len(layer._inbound_nodes) for layer in model.layers) > 1  # the case this test is about
    spec = derive_spec(model)
    assert spec.groups == {"h": 7}
    assert spec.params == {"h/kernel": ((5, 7), (None, "h")), "h/bias": ((7,), ("h",)),
                           "o/kernel": ((7, 3), ("h", None)), "o/bias": ((3,), (None,))}


def _residual():
    x = keras.Input((8,))
    h = keras.layers.Dense(8, name="d1")(x)
    h = keras.layers.Add(name="skip")([x, h])
    return keras.Model(x, keras.layers.Dense(3, name="d2")(h))


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


def _accuracy(path) -> float:
    model = keras.models.load_model(path, compile=False)
    data = load_dataset("digits")
    return float((predict(model, data.x_test).argmax(1) == data.y_test).mean())


def test_fedavg_align_makes_independent_models_averageable(tmp_path):
    a, b = _trained("mlp", 5), _trained("mlp", 6)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    ok(merge("fedavg", "a.keras", "b.keras", "-o", "naive.keras", cwd=tmp_path))
    proc = ok(merge("fedavg", "a.keras", "b.keras", "-o", "aligned.keras", "--align", cwd=tmp_path))
    assert "aligned every input to a.keras" in proc.stdout
    members = (_accuracy(tmp_path / "a.keras") + _accuracy(tmp_path / "b.keras")) / 2
    aligned, naive = _accuracy(tmp_path / "aligned.keras"), _accuracy(tmp_path / "naive.keras")
    assert aligned >= 0.9 * members and aligned > naive + 0.05, (aligned, naive, members)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fedavg_align_counts_every_inputs_samples(tmp_path):
    """Two trainer runs of different lengths from different inits: --align
    weights them by their samples and records the sum of both."""
    from trainer.checkpoint import read_record
    for out, epochs, seed in (("a", "1", "1"), ("b", "2", "2")):
        ok(trainer("--model", "mlp", "--epochs", epochs, "--seed", seed, "--out", out, "--quiet", cwd=tmp_path))
    seen = [json.loads((tmp_path / r / "manifest.json").read_text())["samples_seen"] for r in "ab"]
    assert seen[1] == 2 * seen[0]
    proc = ok(merge("fedavg", "a", "b", "-o", "ab.keras", "--align", cwd=tmp_path))
    assert read_record(tmp_path / "ab.keras")["samples_seen"] == sum(seen)
    assert f"samples seen in all: {sum(seen)}" in proc.stdout, proc.stdout


def test_recalibrate_bn_recomputes_statistics_on_the_data(tmp_path):
    a, b = _trained(_conv_bn, 7, epochs=2), _trained(_conv_bn, 8, epochs=2)
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    proc = merge("fedavg", "a.keras", "b.keras", "-o", "m.keras", "--recalibrate-bn", cwd=tmp_path)
    assert proc.returncode == 2 and "--recalibrate-bn needs --data" in proc.stderr
    ok(merge("fedavg", "a.keras", "b.keras", "-o", "plain.keras", "--align", cwd=tmp_path))
    proc = ok(merge("fedavg", "a.keras", "b.keras", "-o", "fixed.keras", "--align", "--recalibrate-bn",
                    "--data", "digits", cwd=tmp_path))
    assert "recomputed on digits in 1 layer" in proc.stdout
    fixed = keras.models.load_model(tmp_path / "fixed.keras", compile=False)
    # The statistics are now those of the merged model's own conv1 outputs on the training data.
    data = load_dataset("digits")
    h = fixed.get_layer("c1")(keras.ops.convert_to_tensor(data.x_train))
    bn = fixed.get_layer("bn1")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean),
                               keras.ops.convert_to_numpy(h).mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
    assert _accuracy(tmp_path / "fixed.keras") >= _accuracy(tmp_path / "plain.keras") - 0.01


def test_auto_averages_models_that_share_a_start(tmp_path):
    base = _trained("mlp", 9, epochs=2)
    data = load_dataset("digits")
    for name, part in (("a", slice(0, 700)), ("b", slice(700, None))):
        model = build_model("mlp", (8, 8, 1), 10)
        model.set_weights(base.get_weights())
        model.compile(keras.optimizers.Adam(1e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(data.x_train[part], data.y_train[part], epochs=1, verbose=0)
        model.save(tmp_path / f"{name}.keras")
    proc = ok(merge("auto", "a.keras", "b.keras", "--data", "digits", "-o", "out.keras", cwd=tmp_path))
    assert proc.stdout.startswith("average -> out.keras")
    assert _accuracy(tmp_path / "out.keras") > 0.8


def test_auto_chooses_by_the_barrier():
    from merge.auto import decide

    def res(naive, aligned, ends=0.2):
        rows = [{"alpha": 0.0, "loss": ends}, {"alpha": 1.0, "loss": ends}]
        return {"curves": {"naive": rows}, "barrier": {"naive": naive, "aligned": aligned}}

    assert decide(res(0.05, 0.02))[0] == "average"
    assert decide(res(1.0, 0.05))[0] == "align"
    choice, why = decide(res(1.0, 0.8))
    assert choice == "ensemble" and "combine their predictions" in why
