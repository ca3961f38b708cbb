"""Output ensembles (merge.ensemble), model loading (merge.models) and evaluation (merge.evaluate).

Real, briefly trained models of different architectures; every combination
method is checked against a NumPy computation of the same rule.
"""
import json
import sys
import zipfile

import keras
import numpy as np
import pytest

from conftest import ok, run
from merge.ensemble import build_ensemble, write_ensemble
from merge.evaluate import evaluate, format_table, plot
from merge.models import load_model, output_kind
from trainer.checkpoint import RunDir, state_checkpoint
from trainer.data import load_dataset
from trainer.errors import UsageError
from trainer.models import build_model


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _train(model, data, epochs, from_logits=True):
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits))
    model.fit(data.x_train, data.y_train, epochs=epochs, batch_size=64, verbose=0, shuffle=True)
    return model


def _softmax_model(input_shape, num_classes):
    """A model that outputs probabilities, unlike the trainer's (logits)."""
    inputs = keras.Input(shape=input_shape, name="input")
    x = keras.layers.Flatten(name="flatten")(inputs)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="softmax_linear")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, digits):
    """Paths of three small trained models: two logit models of different
    architectures, one softmax model; and a 3-class model that does not fit."""
    d = tmp_path_factory.mktemp("models")
    specs = {
        "mlp": (lambda: build_model("mlp", (8, 8, 1), 10), 1, True),
        "cnn": (lambda: build_model("digits_cnn", (8, 8, 1), 10), 2, True),
        "soft": (lambda: _softmax_model((8, 8, 1), 10), 3, False),
    }
    paths = {}
    for name, (make, seed, logits) in specs.items():
        keras.utils.set_random_seed(seed)
        model = _train(make(), digits, epochs=2 if name == "cnn" else 1, from_logits=logits)
        paths[name] = str(d / f"{name}.keras")
        model.save(paths[name])
    keras.utils.set_random_seed(4)
    three = build_model("mlp", (8, 8, 1), 3)
    paths["three"] = str(d / "three.keras")
    three.save(paths["three"])
    return paths


def _member_outputs(paths, x):
    """Each member's raw outputs (float64) and whether they are logits, computed
    outside the ensemble."""
    out = []
    for p in paths:
        model = load_model(p)
        out.append((_np(model(x, training=False)).astype(np.float64), output_kind(model) == "logits"))
    return out


def _member_probs(paths, x):
    return [_softmax(s) if logits else s for s, logits in _member_outputs(paths, x)]


def _log_probs(scores, logits):
    if logits:  # log-softmax, exactly: no clipping needed
        z = scores - scores.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return np.log(np.clip(scores, 1e-7, 1.0))


def _numpy_combine(method, outputs, weights):
    w = np.asarray(weights, np.float64) / np.sum(weights)
    if method == "logit-mean":
        return _softmax(sum(wi * _log_probs(s, logits) for wi, (s, logits) in zip(w, outputs)))
    probs = [_softmax(s) if logits else s for s, logits in outputs]
    mean = sum(wi * p for wi, p in zip(w, probs))
    if method == "mean":
        return mean
    if method == "vote":
        k = probs[0].shape[-1]
        votes = sum(wi * np.eye(k)[p.argmax(axis=-1)] for wi, p in zip(w, probs))
        out = votes + 1e-6 * mean
    else:  # max
        out = np.max(np.stack(probs), axis=0)
    return out / out.sum(axis=-1, keepdims=True)


def test_output_kind(saved):
    assert output_kind(load_model(saved["mlp"])) == "logits"
    assert output_kind(load_model(saved["cnn"])) == "logits"
    assert output_kind(load_model(saved["soft"])) == "probs"


def test_mean_is_mean_of_member_softmax(saved, digits):
    paths = [saved["mlp"], saved["cnn"]]
    x = digits.x_test
    ensemble = build_ensemble([load_model(p) for p in paths], "mean", names=paths)
    assert [layer.name for layer in ensemble.layers] == ["input", "member_0", "member_1", "combine"]
    got = _np(ensemble(x, training=False))
    want = np.mean(_member_probs(paths, x), axis=0)
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("method", ["mean", "logit-mean", "vote", "max"])
def test_methods_match_numpy(saved, digits, method):
    # Three members, one of which outputs probabilities, unequal weights.
    paths = [saved["mlp"], saved["cnn"], saved["soft"]]
    weights = [1.0, 2.0, 1.0]
    x = digits.x_test
    ensemble = build_ensemble([load_model(p) for p in paths], method, weights, names=paths)
    got = _np(ensemble(x, training=False))
    want = _numpy_combine(method, _member_outputs(paths, x), weights)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, atol=1e-6)
    if method == "vote":
        # Every vote share is a sum of member weights (0, .25, .5, .75, 1) up to the tie-break.
        np.testing.assert_allclose(got * 4, np.round(got * 4), atol=1e-4)


def test_saved_ensemble_loads_with_plain_keras_once_merge_layers_is_imported(saved, digits, tmp_path):
    paths = [saved["mlp"], saved["cnn"], saved["soft"]]
    out = tmp_path / "ens.keras"
    summary = write_ensemble(paths, str(out), "logit-mean", [2, 1, 1], overwrite=False)
    assert summary["members"] == paths
    assert summary["method"] == "logit-mean"
    assert summary["num_classes"] == 10
    np.testing.assert_allclose(summary["weights"], [0.5, 0.25, 0.25])
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"

    x = digits.x_test[:64]
    np.save(tmp_path / "x.npy", x)
    # Keras 3 imports no module a file names: merge.layers registers the
    # ensemble's classes, and nothing else of merge is needed.
    code = (
        "import sys, numpy as np, keras\n"
        "import merge.layers\n"
        "assert 'merge.ensemble' not in sys.modules and 'merge.models' not in sys.modules\n"
        f"m = keras.models.load_model({str(out)!r})\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, keras.ops.convert_to_numpy(m(np.load({str(tmp_path / 'x.npy')!r}), training=False)))\n"
        "print(type(m.get_layer('combine')).__module__)\n"
    )
    proc = ok(run([sys.executable, "-c", code], cwd=tmp_path, timeout=120))
    assert proc.stdout.strip().splitlines()[-1] == "merge.layers"
    want = _np(build_ensemble([load_model(p) for p in paths], "logit-mean", [2, 1, 1])(x, training=False))
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, atol=1e-6)
    # Without it Keras cannot find the classes (and imports nothing to find them).
    bare = run([sys.executable, "-c", f"import keras; keras.models.load_model({str(out)!r})"], cwd=tmp_path,
               timeout=120)
    assert bare.returncode != 0 and "Ensemble" in bare.stderr
    # And through merge.models.load_model, as `merge evaluate` reads it.
    reloaded = load_model(str(out))
    assert output_kind(reloaded) == "probs"
    np.testing.assert_allclose(_np(reloaded(x, training=False)), want, atol=1e-6)


def test_different_class_counts_refused(saved, tmp_path):
    with pytest.raises(UsageError) as err:
        write_ensemble([saved["mlp"], saved["three"]], str(tmp_path / "e.keras"), "mean", None, False)
    msg = str(err.value)
    assert saved["mlp"] in msg and saved["three"] in msg and "\n" not in msg
    assert "10" in msg and "3" in msg
    assert not (tmp_path / "e.keras").exists()


def test_different_input_shapes_refused(saved, tmp_path):
    other = tmp_path / "wide.keras"
    build_model("mlp", (16,), 10).save(other)
    with pytest.raises(UsageError) as err:
        write_ensemble([saved["mlp"], str(other)], str(tmp_path / "e.keras"), "mean", None, False)
    assert saved["mlp"] in str(err.value) and str(other) in str(err.value)


def test_write_ensemble_refusals(saved, tmp_path):
    a, b = saved["mlp"], saved["cnn"]
    out = str(tmp_path / "e.keras")
    cases = [
        (([a, b], str(tmp_path / "e.h5"), "mean", None, False), ".keras"),
        (([a, b], out, "median", None, False), "median"),
        (([a, b], out, "mean", [1.0], False), "weights"),
        (([a, b], out, "mean", [1.0, -1.0], False), "weights"),
        (([a, b], out, "mean", [0, 0], False), "weights"),
        (([a, a], out, "mean", None, False), "same model"),
        (([a, str(tmp_path / ".." / tmp_path.name / ".." / "x")], out, "mean", None, False), "no such file"),
        (([a, b], a, "mean", None, True), "is the input"),
        (([a], out, "mean", None, False), "at least two"),
    ]
    for args, needle in cases:
        with pytest.raises(UsageError, match=needle):
            write_ensemble(*args)
    # An existing output is kept unless overwrite is given.
    (tmp_path / "e.keras").write_bytes(b"keep")
    with pytest.raises(UsageError, match="already exists"):
        write_ensemble([a, b], out, "mean", None, False)
    assert (tmp_path / "e.keras").read_bytes() == b"keep"
    write_ensemble([a, b], out, "max", None, True)
    assert zipfile.is_zipfile(out)


def test_unloadable_inputs_refused(saved, tmp_path):
    model = load_model(saved["mlp"])
    model.save_weights(tmp_path / "bare.weights.h5")
    (tmp_path / "noise.keras").write_bytes(np.random.default_rng(0).bytes(2000))
    with zipfile.ZipFile(tmp_path / "empty.keras", "w") as zf:
        zf.writestr("readme.txt", "not a model")
    for name, needle in [("bare.weights.h5", "no architecture"), ("noise.keras", "noise.keras"),
                         ("empty.keras", "empty.keras"), ("missing.keras", "no such file")]:
        with pytest.raises(UsageError, match=needle) as err:
            load_model(str(tmp_path / name))
        assert "\n" not in str(err.value)


def test_run_checkpoint_and_merge_dirs_load(saved, digits, tmp_path):
    """A trainer run directory, one of its checkpoints and a merge output
    directory all give back the model they hold."""
    keras.utils.set_random_seed(5)
    model = build_model("mlp", (8, 8, 1), 10)
    run_dir = RunDir(tmp_path / "run")
    run_dir.write_manifest({"kind": "run", "model": {"name": "mlp", "input_shape": [8, 8, 1],
                                                     "num_classes": 10, "options": {}}})
    name = run_dir.save(state_checkpoint(model), {"step": 7}, {})
    x = digits.x_test[:32]
    want = _np(model(x, training=False))
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints" / name):
        np.testing.assert_allclose(_np(load_model(str(path))(x, training=False)), want, atol=1e-6)

    merged = tmp_path / "merged"
    merged.mkdir()
    with zipfile.ZipFile(saved["cnn"]) as zf:
        (merged / "config.json").write_bytes(zf.read("config.json"))
    cnn = load_model(saved["cnn"])
    cnn.save_weights(merged / "model.weights.h5")
    (merged / "manifest.json").write_text(json.dumps({"format": "dptoolkit-run/1", "kind": "merge"}))
    np.testing.assert_allclose(_np(load_model(str(merged))(x, training=False)),
                               _np(cnn(x, training=False)), atol=1e-6)


def test_evaluate_matches_manual(saved, digits, tmp_path):
    ens = str(tmp_path / "ens.keras")
    write_ensemble([saved["mlp"], saved["cnn"]], ens, "mean", None, False)
    paths = [saved["mlp"], saved["soft"], ens]
    rows = evaluate(paths, "digits", batch_size=100)
    assert [r["path"] for r in rows] == paths
    assert [r["kind"] for r in rows] == ["keras"] * 3
    y = digits.y_test
    for row, probs in zip(rows, _member_probs(paths, digits.x_test)):
        scores = _np(load_model(row["path"])(digits.x_test, training=False))
        assert row["accuracy"] == pytest.approx(np.mean(scores.argmax(axis=-1) == y), abs=1e-12)
        loss = -np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)))
        assert row["loss"] == pytest.approx(loss, abs=1e-4)
        assert row["params"] == load_model(row["path"]).count_params()
    assert rows[2]["params"] == rows[0]["params"] + load_model(saved["cnn"]).count_params()

    table = format_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and all(p in "\n".join(table) for p in paths)
    assert {line.rindex("keras") for line in table[2:]} == {table[0].index("kind")}  # aligned
    plot(rows, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(UsageError, match="3 classes"):
        evaluate([saved["three"]], "digits")
    with pytest.raises(UsageError, match="shape"):
        evaluate([saved["mlp"]], "synthetic")
