"""`merge fedavg --aggregator`: median, trimmed mean and Krum, on a set of
clients of which one sent a poisoned checkpoint."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import ok, run


def merge(*args, cwd):
    return run([sys.executable, "-m", "merge", *args], cwd=cwd, timeout=300)


def _model():
    import keras
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 1))
    h = keras.layers.Dense(32, activation="relu", name="hidden")(keras.layers.Flatten()(x))
    return keras.Model(x, keras.layers.Dense(10, name="logits")(h))


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    """Five clients trained from one init on iid shares; client 4 then sends
    its weights scaled by -10."""
    import keras

    from trainer.data import load_dataset
    d = tmp_path_factory.mktemp("robust")
    data = load_dataset("digits")
    init = _model().get_weights()
    weights = []
    for k in range(5):
        model = _model()
        model.set_weights(init)
        model.compile(keras.optimizers.Adam(3e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(data.x_train[k::5], data.y_train[k::5], epochs=10, batch_size=32, verbose=0)
        weights.append(model.get_weights())
        if k == 4:
            model.save(d / "clean4.keras")
            model.set_weights([-10 * w for w in model.get_weights()])
        model.save(d / f"c{k}.keras")
    return d, weights


def _accuracy(path) -> float:
    import keras

    from trainer.data import load_dataset
    data = load_dataset("digits")
    model = keras.models.load_model(path, compile=False)
    return float((model.predict(data.x_test, verbose=0).argmax(1) == data.y_test).mean())


def test_robust_aggregators_survive_a_poisoned_client(clients):
    d, _ = clients
    poisoned = [f"c{k}.keras" for k in range(5)]
    ok(merge("fedavg", *[f"c{k}.keras" for k in range(4)], "clean4.keras", "-o", "clean.keras", cwd=d))
    for name, extra in (("mean", []), ("median", ["--aggregator", "median"]),
                        ("trimmed", ["--aggregator", "trimmed-mean:0.2"]), ("krum", ["--aggregator", "krum:1"])):
        ok(merge("fedavg", *poisoned, "-o", f"{name}.keras", *extra, cwd=d))
    clean = _accuracy(d / "clean.keras")
    assert clean > 0.85
    assert _accuracy(d / "mean.keras") < 0.5  # one input of five scaled by -10 wrecks the mean
    for name in ("median", "trimmed", "krum"):
        assert _accuracy(d / f"{name}.keras") > clean - 0.05, name


def test_aggregators_equal_numpy(clients):
    import keras
    d, weights = clients
    inputs = [f"c{k}.keras" for k in range(5)]
    stacked = [np.stack([w[i] if k < 4 else -10 * w[i] for k, w in enumerate(weights)]) for i in range(4)]
    ok(merge("fedavg", *inputs, "-o", "m.keras", "--aggregator", "median", cwd=d))
    ok(merge("fedavg", *inputs, "-o", "t.keras", "--aggregator", "trimmed-mean:0.2", cwd=d))
    proc = ok(merge("fedavg", *inputs, "-o", "k.keras", "--aggregator", "krum:1", cwd=d))
    got_m = keras.models.load_model(d / "m.keras", compile=False).get_weights()
    got_t = keras.models.load_model(d / "t.keras", compile=False).get_weights()
    got_k = keras.models.load_model(d / "k.keras", compile=False).get_weights()
    flat = np.concatenate([s.reshape(5, -1) for s in stacked], axis=1).astype(np.float64)
    dist = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    scores = [np.sort(np.delete(dist[i], i))[:2].sum() for i in range(5)]  # n - f - 2 = 2 neighbours
    choice = int(np.argmin(scores))
    assert choice != 4 and f"chose c{choice}.keras" in proc.stdout
    for i, s in enumerate(stacked):
        np.testing.assert_allclose(got_m[i], np.median(s, axis=0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got_t[i], np.sort(s, axis=0)[1:4].mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got_k[i], s[choice])


@pytest.mark.parametrize("spec, needle", [("mode", "expected mean"), ("trimmed-mean:0.5", "expected mean"),
                                          ("krum:1", "Krum tolerates"), ("krum:x", "expected mean")])
def test_bad_aggregator(clients, spec, needle):
    d, _ = clients
    proc = merge("fedavg", "c0.keras", "c1.keras", "c2.keras", "-o", "bad.keras", "--aggregator", spec, cwd=d)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (d / "bad.keras").exists()
