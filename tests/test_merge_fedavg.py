"""`python -m merge fedavg` against NumPy, on trainer runs and plain Keras files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import manifest, ok, run, trainer


def merge(*args, cwd, timeout=300):
    return run([sys.executable, "-m", "merge", *args], cwd=cwd, timeout=timeout)


def checkpoint_weights(run_dir) -> dict:
    """A trainer run's weights by key, restored the way the trainer resumes
    (its own tf.train.Checkpoint), not through merge's reader."""
    import keras

    from trainer.checkpoint import checkpoint_of, state_checkpoint
    from trainer.models import build_model
    from trainer.varnames import keyed
    cfg = manifest(run_dir)["model"]
    model = build_model(cfg["name"], tuple(cfg["input_shape"]), cfg["num_classes"], **cfg["options"])
    prefix, _ = checkpoint_of(run_dir)
    state_checkpoint(model).read(prefix).expect_partial().assert_existing_objects_matched()
    return {k: keras.ops.convert_to_numpy(v) for k, v in keyed(model.weights).items()}


def merged_weights(out) -> dict:
    """A merge output's weights by key, loaded by plain Keras."""
    import keras

    from trainer.varnames import keyed
    out = Path(out)
    if out.suffix == ".keras":
        model = keras.models.load_model(out, compile=False)
    else:
        model = keras.saving.deserialize_keras_object(json.loads((out / "config.json").read_text()))
        model.load_weights(str(out / "model.weights.h5"))
    return {k: keras.ops.convert_to_numpy(v) for k, v in keyed(model.weights).items()}


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    """Two pruned clients of one init, on disjoint classes, and an outsider
    with its own initialization."""
    d = tmp_path_factory.mktemp("clients")
    ok(trainer("init", "--model", "mlp", "--out", "init", cwd=d))
    common = ["--init", "init", "--epochs", "1", "--clients", "2", "--split", "classes:5", "--quiet",
              "--prune", "--target-sparsity", "0.5", "--prune-begin", "0", "--prune-end", "20"]
    ok(trainer(*common, "--client", "0", "--out", "a", cwd=d))
    ok(trainer(*common, "--client", "1", "--out", "b", "--seed", "1", cwd=d))
    ok(trainer("--model", "mlp", "--epochs", "1", "--seed", "7", "--out", "outsider", "--quiet", cwd=d))
    return d


def _sample_weights(d, *names):
    n = np.array([manifest(d / x)["samples_seen"] for x in names], dtype=np.float64)
    return n / n.sum()


def test_union_of_pruned_clients_is_the_numpy_weighted_average(clients):
    d = clients
    ok(merge("fedavg", "a", "b", "-o", "m_union", "--mask-policy", "union", cwd=d))
    wa, wb = _sample_weights(d, "a", "b")
    a, b, m = checkpoint_weights(d / "a"), checkpoint_weights(d / "b"), merged_weights(d / "m_union")
    assert set(m) == set(a)
    for name in a:
        # Pruned entries are 0 in their input, so the union is the plain average.
        np.testing.assert_allclose(m[name], wa * a[name].astype(np.float64) + wb * b[name], rtol=1e-6, atol=1e-7,
                                   err_msg=name)
    got = manifest(d / "m_union")
    assert got["kind"] == "merge" and got["lineage"] == manifest(d / "a")["lineage"]
    assert got["samples_seen"] == manifest(d / "a")["samples_seen"] + manifest(d / "b")["samples_seen"]
    assert [i["path"] for i in got["inputs"]] == ["a", "b"]


def test_intersection_keeps_every_pruned_weight_zero(clients):
    import h5py
    d = clients
    proc = ok(merge("fedavg", "a", "b", "-o", "m_inter", cwd=d))
    a, b, m = checkpoint_weights(d / "a"), checkpoint_weights(d / "b"), merged_weights(d / "m_inter")
    pruned_kernels = [n for n in a if "kernel" in n and not n.startswith("logits")]
    assert pruned_kernels
    with h5py.File(d / "m_inter" / "masks.h5") as f:
        masks = {k.replace("|", "/"): f[k][()] for k in f}
    total = zeros = 0
    for name in pruned_kernels:
        pruned_somewhere = (a[name] == 0) | (b[name] == 0)
        assert pruned_somewhere.mean() > 0.5
        assert np.all(m[name][pruned_somewhere] == 0), name
        assert not np.signbit(m[name][pruned_somewhere]).any(), f"{name}: -0.0 where pruned"
        both = ~pruned_somewhere
        np.testing.assert_allclose(m[name][both], (a[name][both] * 0.5 + b[name][both] * 0.5), rtol=0.02, atol=1e-3)
        key = name.replace("/kernel", "/0")
        np.testing.assert_array_equal(masks[key].astype(bool), both)
        total += both.size
        zeros += pruned_somewhere.sum()
    assert f"sparsity {zeros / total:.2%}" in proc.stdout


def test_renormalize_averages_over_the_inputs_that_keep_a_weight(clients):
    d = clients
    ok(merge("fedavg", "a", "b", "-o", "m_renorm.keras", "--mask-policy", "renormalize", "--uniform", cwd=d))
    a, b, m = checkpoint_weights(d / "a"), checkpoint_weights(d / "b"), merged_weights(d / "m_renorm.keras")
    name = "dense1/kernel"
    only_a = (a[name] != 0) & (b[name] == 0)
    both = (a[name] != 0) & (b[name] != 0)
    assert only_a.any() and both.any()
    np.testing.assert_allclose(m[name][only_a], a[name][only_a], rtol=1e-6)
    np.testing.assert_allclose(m[name][both], (a[name][both] + b[name][both]) / 2, rtol=1e-6, atol=1e-7)
    assert np.all(m[name][(a[name] == 0) & (b[name] == 0)] == 0)


def test_target_sparsity_reprunes_and_never_revives(clients):
    d = clients
    ok(merge("fedavg", "a", "b", "-o", "m_sparse", "--target-sparsity", "0.8", cwd=d))
    a, b, m = checkpoint_weights(d / "a"), checkpoint_weights(d / "b"), merged_weights(d / "m_sparse")
    for name in ("dense1/kernel", "dense2/kernel"):
        assert abs((m[name] == 0).mean() - 0.8) < 0.005, name
        assert np.all(m[name][(a[name] == 0) | (b[name] == 0)] == 0)
    assert manifest(d / "m_sparse")["sparsity"]["overall"] == pytest.approx(0.8, abs=0.005)


def test_explicit_weights_override_the_sample_counts(clients):
    d = clients
    ok(merge("fedavg", "a", "b", "-o", "m_31", "--weights", "3,1", "--mask-policy", "union", cwd=d))
    a, b, m = checkpoint_weights(d / "a"), checkpoint_weights(d / "b"), merged_weights(d / "m_31")
    np.testing.assert_allclose(m["logits/bias"], 0.75 * a["logits/bias"] + 0.25 * b["logits/bias"], rtol=1e-6)
    assert [i["weight"] for i in manifest(d / "m_31")["inputs"]] == [0.75, 0.25]


def test_a_run_that_never_exported_is_merged_from_its_checkpoint(clients):
    """A run stopped before its final export has no model.keras; its
    architecture comes from the manifest, its weights from the checkpoint."""
    import shutil
    d = clients
    shutil.copytree(d / "a", d / "a_unfinished", ignore=shutil.ignore_patterns("model.keras"))
    ok(merge("fedavg", "a_unfinished", "b", "-o", "m_unfinished.keras", cwd=d))
    ok(merge("fedavg", "a", "b", "-o", "m_finished.keras", cwd=d))
    got, want = merged_weights(d / "m_unfinished.keras"), merged_weights(d / "m_finished.keras")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_different_initializations_are_refused_and_pointed_to_ensemble(clients):
    d = clients
    proc = merge("fedavg", "a", "outsider", "-o", "m_bad", cwd=d)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "different initializations" in errors[0] and "merge ensemble" in errors[0]
    assert not (d / "m_bad").exists()
    forced = ok(merge("fedavg", "a", "outsider", "-o", "m_forced", "--force", cwd=d))
    assert "warning: --force" in forced.stderr
    assert manifest(d / "m_forced")["lineage"] is None


def test_inspect_and_diff(clients):
    d = clients
    info = json.loads(ok(merge("inspect", "a", "--json", cwd=d)).stdout)
    assert info["format"] == "trainer run" and info["lineage"] == manifest(d / "a")["lineage"]
    assert info["samples_seen"] == manifest(d / "a")["samples_seen"]
    kernel = next(t for t in info["tensors"] if t["name"] == "dense1/kernel")
    assert kernel["masked"] and kernel["pruned"] == pytest.approx(0.5, abs=0.01)
    assert ok(merge("diff", "a", "b", cwd=d)).stdout.strip().endswith("no conflicting lineage")
    proc = merge("diff", "a", "outsider", cwd=d)
    assert proc.returncode == 1 and "lineage: different initializations" in proc.stdout


# -- plain Keras files ---------------------------------------------------------

def _keras_model(seed):
    import keras
    keras.utils.set_random_seed(seed)
    x = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, name="conv")(x)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="relu", name="hidden")(h)
    return keras.Model(x, keras.layers.Dense(10, name="logits")(h))


def test_mixed_plain_keras_formats_are_matched_by_name(tmp_path):
    """A .keras from model.save (compiled and fitted: optimizer state inside),
    a .weights.h5 and a legacy whole-model .h5 of the same model. (Keras 3
    writes no TF checkpoints; Keras 2's are read in test_merge_compat.py.)"""
    import keras

    from trainer.data import load_dataset
    from trainer.varnames import keys
    data = load_dataset("digits")
    models = []
    for i in range(3):
        model = _keras_model(0)  # the same initialization
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(data.x_train[i * 300:(i + 1) * 300], data.y_train[i * 300:(i + 1) * 300], epochs=1, verbose=0)
        models.append(model)
    models[0].save(tmp_path / "m0.keras")
    models[1].save_weights(tmp_path / "m1.weights.h5")
    models[2].save(tmp_path / "m2.h5")
    proc = ok(merge("fedavg", "m0.keras", "m1.weights.h5", "m2.h5", "-o", "avg.keras", cwd=tmp_path))
    assert "no recorded initialization" in proc.stderr and "weighting them equally" in proc.stderr
    got = merged_weights(tmp_path / "avg.keras")
    want = {k: np.mean([m.get_weights()[i] for m in models], axis=0, dtype=np.float64)
            for i, k in enumerate(keys(models[0].weights))}
    assert set(got) == set(want) and any("moving_mean" in n for n in got)
    for name in want:  # batch-norm statistics are averaged like every other tensor
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_data_check_refuses_an_average_of_unaligned_networks(tmp_path):
    """B computes exactly A's function with its hidden units permuted; averaging
    A and B mixes unrelated units, which --data must catch."""
    import keras

    from trainer.data import load_dataset
    data = load_dataset("digits")
    a = _keras_model(1)
    a.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    a.fit(data.x_train, data.y_train, epochs=4, verbose=0)
    a.save(tmp_path / "a.keras")
    b = _keras_model(1)
    b.set_weights(a.get_weights())
    perm = np.random.default_rng(0).permutation(16)
    hidden, logits = b.get_layer("hidden"), b.get_layer("logits")
    hidden.set_weights([w[..., perm] for w in hidden.get_weights()])
    k, bias = logits.get_weights()
    logits.set_weights([k[perm], bias])
    np.testing.assert_allclose(b.predict(data.x_test, verbose=0), a.predict(data.x_test, verbose=0), atol=1e-4)
    b.save(tmp_path / "b.keras")
    proc = merge("fedavg", "a.keras", "b.keras", "-o", "avg.keras", "--data", "digits", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "clearly below the worst input" in error[0] and "merge ensemble" in error[0]
    assert not (tmp_path / "avg.keras").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- a federated round trip ----------------------------------------------------

def test_two_federated_rounds_through_the_cli(tmp_path):
    d = tmp_path
    ok(trainer("init", "--model", "mlp", "--out", "init", cwd=d))
    lineage = manifest(d / "init")["lineage"]
    start = "init"
    for rnd, out in ((1, "global1"), (2, "global2.keras")):
        for k in (0, 1):
            ok(trainer("--init", start, "--client", str(k), "--clients", "2", "--split", "dirichlet:0.5",
                       "--epochs", "2", "--seed", str(10 * rnd + k), "--out", f"r{rnd}c{k}", "--quiet", cwd=d))
            assert manifest(d / f"r{rnd}c{k}")["lineage"] == lineage
        ok(merge("fedavg", f"r{rnd}c0", f"r{rnd}c1", "-o", out, cwd=d))
        start = out
    # A .keras merge carries model and lineage: no --model needed, same lineage.
    ok(trainer("--init", "global2.keras", "--epochs", "1", "--out", "r3", "--quiet", cwd=d))
    assert manifest(d / "r3")["lineage"] == lineage and manifest(d / "r3")["model"]["name"] == "mlp"
    table = ok(merge("evaluate", "global1", "global2.keras", "--data", "digits", cwd=d)).stdout
    accuracy = [float(line.split()[-2]) for line in table.splitlines() if line.startswith(("global1", "global2"))]
    assert len(accuracy) == 2 and min(accuracy) > 0.6, table
