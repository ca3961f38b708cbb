"""Every `python -m merge` command on files from elsewhere: the previous
version of this project and plain Keras 2 users (tests/fixtures/keras2,
written on TF 2.15), and plain Keras 3 users (made here, with the layer names
Keras generates). Each command runs as a subprocess, as a user would."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import manifest, ok, run

FIXTURES = Path(__file__).parent / "fixtures" / "keras2"
EXPECTED = {k.replace("|", "/"): v for k, v in np.load(FIXTURES / "expected_logits.npz").items()}
MLP = {f"{layer}/{w}" for layer in ("dense1", "dense2", "logits") for w in ("kernel", "bias")}


def merge(*args, cwd, timeout=300):
    return run([sys.executable, "-m", "merge", *args], cwd=cwd, timeout=timeout)


def error_lines(proc) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def weights_by_position(path) -> list[np.ndarray]:
    """A .keras file's weights in the model's order, loaded by plain Keras."""
    import keras
    return [np.asarray(w) for w in keras.models.load_model(path, compile=False).get_weights()]


def _np(x):
    import keras
    return keras.ops.convert_to_numpy(x)


def _mlp(keras, hidden=(32,)):
    """A plain Keras 3 model on flattened digits; layers keep Keras's own names."""
    x = inputs = keras.Input((64,))
    for units in hidden:
        x = keras.layers.Dense(units, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """k2/: a copy of the Keras 2 fixtures; k3/: plain Keras 3 files;
    flat.npz: digits flattened to 64 values, for the plain models."""
    import keras

    from trainer.data import load_dataset
    d = tmp_path_factory.mktemp("compat")
    shutil.copytree(FIXTURES, d / "k2")
    k3 = d / "k3"
    k3.mkdir()
    digits = load_dataset("digits")
    flat = {k: getattr(digits, k).reshape(len(getattr(digits, k)), -1) if k.startswith("x") else getattr(digits, k)
            for k in ("x_train", "y_train", "x_test", "y_test")}
    np.savez(d / "flat.npz", x=flat["x_train"], y=flat["y_train"], x_test=flat["x_test"], y_test=flat["y_test"])
    keras.utils.set_random_seed(3)
    a, b = _mlp(keras), _mlp(keras)  # one session: b's layers are dense_2, dense_3 where a has dense, dense_1
    assert [l.name for l in a.layers[1:]] != [l.name for l in b.layers[1:]]
    a.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    a.fit(flat["x_train"], flat["y_train"], epochs=3, verbose=0)
    rng = np.random.default_rng(0)
    b.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in a.get_weights()])
    a.save(k3 / "a.keras")
    b.save(k3 / "b.keras")
    b.save_weights(k3 / "b.weights.h5")
    b.save(k3 / "b.h5")
    keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
                      keras.layers.Dense(10)]).save(k3 / "seq.keras")
    _mlp(keras, hidden=(32, 16)).save(k3 / "deep.keras")
    # The Keras 2 functional fixture's architecture, rebuilt in Keras 3 (other
    # names), holding its weights plus noise.
    from merge.models import load_model
    k2fun = load_model(d / "k2" / "plain" / "functional.keras")
    noisy = _mlp(keras, hidden=(32, 16))
    noisy.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in k2fun.get_weights()])
    noisy.save(k3 / "k2fun_noisy.keras")
    return d


# -- loading ----------------------------------------------------------------------

@pytest.mark.parametrize("name, source", [
    (name, name) for name in sorted(EXPECTED) if name != "x"] + [
    ("project/client0/model.keras", "project/client0"),
    ("project/client0/model.keras", "project/client0/checkpoints/ckpt-00000023"),
    ("project/init/model.keras", "project/init"),
    ("project/pruned/model.keras", "project/pruned"),
    ("project/global.keras", "project/global"),
    ("plain/functional.keras", "plain/functional.h5"),
])
def test_keras3_reproduces_tf215_logits(work, name, source):
    """What merge loads from each Keras 2 file computes what TF 2.15 computed."""
    from merge.models import load_model
    x = EXPECTED["x"] if name.startswith("plain") else EXPECTED["x"].reshape(-1, 8, 8, 1)
    model = load_model(work / "k2" / source)
    np.testing.assert_allclose(_np(model(x, training=False)), EXPECTED[name], atol=1e-5)


INSPECTED = ["k2/project/init", "k2/project/client0", "k2/project/client0/checkpoints/ckpt-00000023",
             "k2/project/pruned", "k2/project/global", "k2/project/global.keras", "k2/project/lstm-init",
             "k2/project/lstm-init/model.keras", "k2/plain/sequential.keras", "k2/plain/functional.keras",
             "k2/plain/functional.h5", "k2/plain/functional.weights.h5", "k2/plain/tfckpt/model",
             "k3/a.keras", "k3/b.h5", "k3/b.weights.h5", "k3/seq.keras"]


@pytest.mark.parametrize("path", INSPECTED)
def test_inspect_lists_every_tensor(work, path):
    info = json.loads(ok(merge("inspect", path, "--json", cwd=work)).stdout)
    assert "Traceback" not in ok(merge("inspect", path, cwd=work)).stderr
    if path.startswith("k2/project") and "lstm" not in path:
        assert {t["variable"] for t in info["tensors"]} == MLP
        assert info["lineage"] == manifest(work / "k2" / "project" / "init")["lineage"]
    model_path = {"k2/plain/functional.weights.h5": "k2/plain/functional.keras",
                  "k2/plain/tfckpt/model": "k2/plain/functional.keras", "k3/b.weights.h5": "k3/a.keras"}.get(path, path)
    from merge.models import load_model
    assert info["params"] == load_model(work / model_path).count_params()
    if path.endswith("pruned"):
        assert all(t["pruned"] == pytest.approx(0.5, abs=0.01) for t in info["tensors"] if t["masked"])
        assert sum(t["masked"] for t in info["tensors"]) == 2


# -- fedavg -----------------------------------------------------------------------

def test_fedavg_of_keras2_runs_equals_the_tf215_merge(work):
    """client0 + client1, merged by Keras 2 into project/global, merged again
    now: the same weights, in a .keras that plain Keras 3 loads."""
    ok(merge("fedavg", "k2/project/client0", "k2/project/client1", "-o", "global3.keras", cwd=work))
    from merge.models import load_model
    want = load_model(work / "k2" / "project" / "global").get_weights()
    got = weights_by_position(work / "global3.keras")
    assert len(got) == len(want) == 6
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    import keras
    x = EXPECTED["x"].reshape(-1, 8, 8, 1)
    logits = keras.models.load_model(work / "global3.keras", compile=False)(x, training=False)
    np.testing.assert_allclose(_np(logits), EXPECTED["project/global.keras"], atol=1e-5)
    recorded = manifest(work / "k2" / "project" / "global")
    assert json.loads(ok(merge("inspect", "global3.keras", "--json", cwd=work)).stdout)["lineage"] == recorded["lineage"]


def test_fedavg_mixes_keras2_formats_and_keras3_names(work):
    """Keras 2's .keras, legacy .h5 and TF checkpoint of one model, and a
    Keras 3 rebuild of it (other layer names) holding other weights."""
    inputs = ["k2/plain/functional.keras", "k3/k2fun_noisy.keras", "k2/plain/tfckpt/model", "k2/plain/functional.h5"]
    proc = ok(merge("fedavg", *inputs, "-o", "mixed.keras", cwd=work))
    assert len([line for line in proc.stdout.splitlines() if "paired by their place in the graph" in line]) == 1
    from merge.models import load_model  # plain Keras 3 does not load a Keras 2 functional file
    base = load_model(work / "k2" / "plain" / "functional.keras").get_weights()
    noisy = weights_by_position(work / "k3" / "k2fun_noisy.keras")
    for got, b, n in zip(weights_by_position(work / "mixed.keras"), base, noisy):
        np.testing.assert_allclose(got, (3 * b.astype(np.float64) + n) / 4, rtol=1e-5, atol=1e-6)


def test_same_graph_other_names_is_merged_by_place(work):
    """Two functional models and a Sequential of one session: three sets of names."""
    proc = ok(merge("fedavg", "k3/a.keras", "k3/b.keras", "k3/seq.keras", "-o", "ab.keras", cwd=work))
    notes = [line for line in proc.stdout.splitlines() if "paired by their place in the graph" in line]
    assert len(notes) == 1 and "k3/b.keras" in notes[0] and "k3/seq.keras" in notes[0], proc.stdout
    inputs = [weights_by_position(work / "k3" / name) for name in ("a.keras", "b.keras", "seq.keras")]
    for got, *each in zip(weights_by_position(work / "ab.keras"), *inputs):
        np.testing.assert_allclose(got, np.mean(each, axis=0, dtype=np.float64), rtol=1e-6, atol=1e-7)


def test_crossed_names_are_paired_by_place_not_by_name(work, tmp_path):
    """Two layers of one shape, named in the opposite order: matching by name
    would average each with the other model's other layer."""
    import keras

    def model(first, second):
        x = keras.Input((8,))
        h = keras.layers.Dense(8, name=first)(x)
        return keras.Model(x, keras.layers.Dense(8, name=second)(h))

    keras.utils.set_random_seed(0)
    p, q = model("u", "v"), model("v", "u")
    p.save(tmp_path / "p.keras")
    q.save(tmp_path / "q.keras")
    ok(merge("fedavg", "p.keras", "q.keras", "-o", "pq.keras", cwd=tmp_path))
    for got, x, y in zip(weights_by_position(tmp_path / "pq.keras"), p.get_weights(), q.get_weights()):
        np.testing.assert_allclose(got, (x.astype(np.float64) + y) / 2, rtol=1e-6, atol=1e-7)


def test_nested_models_pair_by_place_in_every_order(tmp_path):
    """A model inside a model, saved twice from one session (other names at
    both levels), as .keras and as legacy .h5 (which Keras 3 writes with the
    inner model's name in every weight's name)."""
    import keras

    def model():
        inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3), keras.layers.Dense(3)])
        x = keras.Input((6,))
        return keras.Model(x, keras.layers.Dense(2)(inner(keras.layers.Dense(6)(x))))

    keras.utils.set_random_seed(0)
    a, b = model(), model()
    b.set_weights([w + 1 for w in a.get_weights()])
    a.save(tmp_path / "a.keras")
    b.save(tmp_path / "b.keras")
    b.save(tmp_path / "b.h5")
    for pair in (("a.keras", "b.keras"), ("a.keras", "b.h5"), ("b.h5", "a.keras")):
        ok(merge("fedavg", *pair, "-o", "out.keras", "--overwrite", cwd=tmp_path))
        for got, x in zip(weights_by_position(tmp_path / "out.keras"), a.get_weights()):
            np.testing.assert_allclose(got, x + 0.5, rtol=1e-6, atol=1e-6, err_msg=str(pair))


@pytest.mark.parametrize("other", ["k3/deep.keras", "k2/plain/functional.keras"])
def test_other_graph_is_refused_in_one_line(work, other):
    proc = merge("fedavg", "k3/a.keras", other, "-o", "refused.keras", cwd=work)
    errors = error_lines(proc)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert other in errors[0] and "not the same architecture" in errors[0]
    assert not (work / "refused.keras").exists()


def test_fedavg_of_keras_files_imports_no_tensorflow(work, tmp_path):
    """Keras 2 and 3 .keras files, a bare .weights.h5 and layers paired by
    place: all without TensorFlow (or Keras, which would import it)."""
    proc = ok(run([sys.executable, "-X", "importtime", "-m", "merge", "fedavg", work / "k3/a.keras",
                   work / "k3/b.keras", work / "k3/b.weights.h5", "-o", tmp_path / "a.keras"], cwd=tmp_path))
    proc2 = ok(run([sys.executable, "-X", "importtime", "-m", "merge", "fedavg", work / "k2/plain/functional.keras",
                    work / "k3/k2fun_noisy.keras", "-o", tmp_path / "b.keras"], cwd=tmp_path))
    for p in (proc, proc2):
        imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time")}
        assert "numpy" in imported and "h5py" in imported  # the listing is real
        assert not {m for m in imported if m.split(".")[0] in ("tensorflow", "keras")}


def test_memory_is_flat_in_the_number_of_inputs(tmp_path):
    """Peak RSS of a merge of 6 inputs of 16 MiB each against one of 2."""
    import keras
    x = keras.Input((2048,))
    model = keras.Model(x, keras.layers.Dense(2048)(x))
    rng = np.random.default_rng(0)
    for i in range(6):
        model.set_weights([rng.normal(size=w.shape).astype(w.dtype) for w in model.get_weights()])
        model.save(tmp_path / f"in{i}.keras")
    code = ("import resource, runpy, sys\n"
            "sys.argv = ['merge', 'fedavg', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('merge', run_name='__main__', alter_sys=True)\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    peak = {}
    for n in (2, 6):
        proc = ok(run([sys.executable, "-c", code, *[f"in{i}.keras" for i in range(n)], "-o", f"out{n}.keras",
                       "--quiet"], cwd=tmp_path))
        peak[n] = int(proc.stdout.strip().splitlines()[-1]) * 1024
    assert peak[6] - peak[2] < 8 << 20, peak  # less than half of one input more


# -- whole models: evaluate, ensemble, diff, server-step ----------------------------

def _table(stdout) -> dict[str, float]:
    return {line.split()[0]: float(line.split()[-2]) for line in stdout.splitlines()[2:] if line.strip()}


def test_evaluate_scores_what_the_model_computes(work):
    from merge.models import load_model
    from trainer.data import load_dataset
    cases = {"digits": ["k2/project/client0", "k2/project/global", "k2/project/global.keras", "k2/project/pruned",
                        "k2/project/lstm-init"],
             "flat.npz": ["k2/plain/functional.keras", "k2/plain/sequential.keras", "k2/plain/functional.h5",
                          "k3/a.keras", "k3/b.h5"]}
    for data, paths in cases.items():
        table = _table(ok(merge("evaluate", *paths, "--data", data, cwd=work)).stdout)
        ds = load_dataset(str(work / data) if data.endswith(".npz") else data)
        for path in paths:
            scores = _np(load_model(work / path)(ds.x_test, training=False))
            assert table[path] == pytest.approx(float(np.mean(scores.argmax(-1) == ds.y_test)), abs=1e-4), path
    assert table["k2/plain/functional.keras"] > 0.8, table  # trained by Keras 2 for 5 epochs


def test_ensemble_of_keras2_and_keras3_members(work):
    members = ["k2/plain/functional.keras", "k2/plain/sequential.keras", "k3/a.keras"]
    ok(merge("ensemble", *members, "-o", "ens.keras", "--method", "mean", cwd=work))
    from merge.models import load_model
    x = EXPECTED["x"]
    logits = [_np(load_model(work / m)(x, training=False)).astype(np.float64) for m in members]
    probs = [np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
             for z in logits]
    np.save(work / "ens_x.npy", x)
    code = ("import numpy as np, keras, merge.layers\n"
            "m = keras.models.load_model('ens.keras')\n"
            "np.save('ens_y.npy', keras.ops.convert_to_numpy(m(np.load('ens_x.npy'), training=False)))\n")
    ok(run([sys.executable, "-c", code], cwd=work))
    np.testing.assert_allclose(np.load(work / "ens_y.npy"), np.mean(probs, axis=0), atol=1e-6)
    assert "ens.keras" in _table(ok(merge("evaluate", "ens.keras", "--data", "flat.npz", cwd=work)).stdout)


def test_diff_on_keras2_inputs(work):
    assert ok(merge("diff", "k2/project/client0", "k2/project/global.keras", cwd=work)).stdout.strip() \
        .endswith("no conflicting lineage")
    proc = merge("diff", "k2/project/client0", "k2/plain/functional.keras", cwd=work)
    assert proc.returncode == 1 and "only in" in proc.stdout and not error_lines(proc)


def test_server_step_from_a_keras2_global(work):
    """FedAvgM without momentum at lr 1 moves the previous global to the average."""
    ok(merge("server-step", "k2/project/init", "k2/project/global", "-o", "next.keras", "--beta1", "0",
             "--state", "state.h5", cwd=work))
    from merge.models import load_model
    for got, want in zip(weights_by_position(work / "next.keras"), load_model(work / "k2/project/global").get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# -- align, barrier, auto -------------------------------------------------------------

def test_align_barrier_and_auto_on_keras2_runs(work):
    from merge.models import load_model
    ok(merge("align", "k2/project/client0", "k2/project/client1", "-o", "aligned.keras", cwd=work))
    x = EXPECTED["x"].reshape(-1, 8, 8, 1)
    np.testing.assert_allclose(_np(load_model(work / "aligned.keras")(x, training=False)),
                               _np(load_model(work / "k2/project/client1")(x, training=False)), atol=1e-5)
    out = ok(merge("barrier", "k2/project/client0", "k2/project/client1", "--data", "digits", "--points", "3",
                   "--no-align", cwd=work)).stdout
    rows = [line.split() for line in out.splitlines()[1:4]]
    assert [float(r[0]) for r in rows] == [0.0, 0.5, 1.0] and "loss barrier" in out
    table = _table(ok(merge("evaluate", "k2/project/client0", "k2/project/client1", "--data", "digits",
                            cwd=work)).stdout)
    assert float(rows[0][2]) == pytest.approx(table["k2/project/client0"], abs=1e-4)
    assert float(rows[2][2]) == pytest.approx(table["k2/project/client1"], abs=1e-4)
    proc = ok(merge("auto", "k2/project/client0", "k2/project/client1", "--data", "digits", "-o", "auto.keras",
                    cwd=work))
    assert proc.stdout.startswith("average ->"), proc.stdout
    a, b = load_model(work / "k2/project/client0").get_weights(), load_model(work / "k2/project/client1").get_weights()
    for got, x0, x1 in zip(weights_by_position(work / "auto.keras"), a, b):
        np.testing.assert_allclose(got, (x0.astype(np.float64) + x1) / 2, rtol=1e-5, atol=1e-6)
