"""`merge server-step`: FedAvgM, FedAdam, FedYogi against NumPy, over two
rounds so that the state file carries momentum from one to the next."""
from __future__ import annotations

import csv
import sys

import numpy as np
import pytest

from conftest import manifest, ok, run


def merge(*args, cwd):
    return run([sys.executable, "-m", "merge", *args], cwd=cwd, timeout=300)


def _save(path, weights):
    import keras
    keras.utils.set_random_seed(0)
    x = keras.Input((4,))
    model = keras.Model(x, keras.layers.Dense(3, name="d")(x))
    model.set_weights(weights)
    model.save(path)


def _load(path):
    import keras
    return keras.models.load_model(path, compile=False).get_weights()


@pytest.mark.parametrize("rule", ["fedavgm", "fedadam", "fedyogi"])
def test_two_server_steps_equal_numpy(tmp_path, rule):
    rng = np.random.default_rng(0)
    x0 = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)]
    averages = [[w + rng.normal(scale=0.1, size=w.shape).astype(np.float32) for w in x0] for _ in range(2)]
    _save(tmp_path / "g0.keras", x0)
    lr, b1, b2, tau = 0.5, 0.9, 0.99, 1e-3
    m = [np.zeros(w.shape) for w in x0]
    v = [np.zeros(w.shape) for w in x0]
    want = [w.astype(np.float64) for w in x0]
    for r, avg in enumerate(averages, 1):
        _save(tmp_path / f"a{r}.keras", avg)
        ok(merge("server-step", f"g{r - 1}.keras", f"a{r}.keras", "-o", f"g{r}.keras", "--optimizer", rule,
                 "--server-lr", str(lr), "--state", "state.h5", cwd=tmp_path))
        prev = [w.astype(np.float64) for w in _load(tmp_path / f"g{r - 1}.keras")]
        for i in range(2):
            d = avg[i].astype(np.float64) - prev[i]
            if rule == "fedavgm":
                m[i] = b1 * m[i] + d
                want[i] = prev[i] + lr * m[i]
            else:
                m[i] = b1 * m[i] + (1 - b1) * d
                v[i] = (b2 * v[i] + (1 - b2) * d * d if rule == "fedadam"
                        else v[i] - (1 - b2) * d * d * np.sign(v[i] - d * d))
                want[i] = prev[i] + lr * m[i] / (np.sqrt(v[i]) + tau)
        for got, exp in zip(_load(tmp_path / f"g{r}.keras"), want):
            np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)


def test_fedavgm_without_momentum_is_fedavg(tmp_path):
    rng = np.random.default_rng(1)
    x0 = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)]
    avg = [w + 0.1 for w in x0]
    _save(tmp_path / "g0.keras", x0)
    _save(tmp_path / "avg.keras", avg)
    ok(merge("server-step", "g0.keras", "avg.keras", "-o", "g1.keras", "--beta1", "0", "--state", "s.h5",
             cwd=tmp_path))
    for got, exp in zip(_load(tmp_path / "g1.keras"), avg):
        np.testing.assert_allclose(got, exp, rtol=1e-6, atol=1e-7)


def test_federated_rounds_with_server_momentum(tmp_path):
    ok(run([sys.executable, "-m", "launch", "federated", "--clients", "2", "--rounds", "2", "--model", "mlp",
            "--server-opt", "fedavgm", "--aggregator", "median", "--out", "fed"], cwd=tmp_path, timeout=600))
    rows = list(csv.DictReader(open(tmp_path / "fed" / "rounds.csv")))
    assert len(rows) == 2 and float(rows[-1]["global_accuracy"]) > 0.3
    assert manifest(tmp_path / "fed" / "round-002" / "global")["server"]["rule"] == "fedavgm"
    assert manifest(tmp_path / "fed" / "round-002" / "average")["aggregator"] == "median"
    assert (tmp_path / "fed" / "round-002" / "server_state.h5").exists()  # each round keeps its own


def _step(capfd, *argv):
    from merge.cli import main
    code = main(["server-step", *map(str, argv)])
    out, err = capfd.readouterr()
    return code, out, err


def _error(result) -> str:
    code, out, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), result
    return lines[0]


def test_state_records_its_rule_and_refuses_another(tmp_path, capfd, monkeypatch):
    """A state file names the rule and hyperparameters that built its moments;
    continuing it with others is refused, the file and the output untouched."""
    import h5py
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(2)
    x0 = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)]
    _save(tmp_path / "g0.keras", x0)
    _save(tmp_path / "avg.keras", [w + 0.1 for w in x0])
    code, _, err = _step(capfd, "g0.keras", "avg.keras", "-o", "g1.keras", "--state", "s.h5", "--server-lr", "0.5")
    assert code == 0 and "warning" not in err
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert dict(f.attrs) == {"rule": "fedavgm", "server_lr": 0.5, "beta1": 0.9}
    before = (tmp_path / "s.h5").read_bytes()
    line = _error(_step(capfd, "g1.keras", "avg.keras", "-o", "g2.keras", "--state", "s.h5", "--optimizer", "fedadam",
                        "--server-lr", "0.5"))
    assert line == ("error: --state s.h5 was written by fedavgm (--server-lr 0.5, --beta1 0.9), but this step is "
                    "fedadam (--server-lr 0.5, --beta1 0.9, --beta2 0.99, --tau 0.001); pass the same --optimizer "
                    "and hyperparameters to continue it, or give a new --state file to start fresh")
    assert "--beta1 0.5)" in _error(_step(capfd, "g1.keras", "avg.keras", "-o", "g2.keras", "--state", "s.h5",
                                          "--server-lr", "0.5", "--beta1", "0.5"))
    assert "--tau applies to fedadam and fedyogi" in _error(
        _step(capfd, "g1.keras", "avg.keras", "-o", "g2.keras", "--state", "s.h5", "--tau", "0.1"))
    assert (tmp_path / "s.h5").read_bytes() == before and not (tmp_path / "g2.keras").exists()

    # A state from before the record: continued when its slots fit the rule, with a warning.
    with h5py.File(tmp_path / "s.h5", "a") as f:
        for k in list(f.attrs):
            del f.attrs[k]
    assert "holds the slots m, not those of fedyogi (m, v)" in _error(
        _step(capfd, "g1.keras", "avg.keras", "-o", "g2.keras", "--state", "s.h5", "--optimizer", "fedyogi"))
    code, _, err = _step(capfd, "g1.keras", "avg.keras", "-o", "g2.keras", "--state", "s.h5", "--server-lr", "0.5")
    assert code == 0 and err.startswith("warning: --state s.h5 does not record which optimizer wrote it")
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f.attrs["rule"] == "fedavgm"


def test_state_carries_over_from_an_init_directory_to_a_merge_directory(tmp_path, capfd, monkeypatch):
    """Round 1 steps from a `trainer init` (tensors named by variable), round 2
    from round 1's merge directory (named by Keras's paths): the momentum must
    carry over, as FedAvgM's second step against NumPy shows."""
    monkeypatch.chdir(tmp_path)
    ok(run([sys.executable, "-m", "trainer", "init", "--model", "mlp", "--out", "init"], cwd=tmp_path))
    from merge.cli import main

    def weights(path):
        from trainer.files.sources import open_source
        src = open_source(str(path))
        try:
            return {k: np.asarray(src.read(k), np.float64) for k in src.keys()}
        finally:
            src.close()

    x0 = weights(tmp_path / "init")
    avg = {k: v + 0.01 for k, v in x0.items()}
    import keras
    model = keras.models.load_model(tmp_path / "init" / "model.keras", compile=False)
    from trainer.varnames import keyed
    for k, var in keyed(model.weights).items():
        var.assign(avg[k].astype(np.float32))
    model.save(tmp_path / "avg.keras")
    assert main(["server-step", "init", "avg.keras", "-o", "g1", "--state", "s.h5"]) == 0
    assert main(["server-step", "g1", "avg.keras", "-o", "g2", "--state", "s.h5"]) == 0
    capfd.readouterr()
    # m1 = d1 = 0.01; g1 = x0 + 0.01; d2 = avg - g1 = 0; m2 = 0.9 m1; g2 = g1 + 0.009
    got = weights(tmp_path / "g2")
    g1 = weights(tmp_path / "g1")
    for name, value in g1.items():
        np.testing.assert_allclose(got[name] - value, 0.009, atol=1e-5, err_msg=name)
