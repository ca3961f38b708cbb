"""What the trainer writes loads in plain Keras 3, and what earlier versions
wrote (TF 2.15 / Keras 2) starts a run with --init, weights intact."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import keras_weights, manifest, ok, trainer

FIXTURES = Path(__file__).parent / "fixtures" / "keras2"
EXPECTED = np.load(FIXTURES / "expected_logits.npz")

# registry model -> data that fixes its input shape
MODELS = {"digits_cnn": "digits", "mlp": "digits", "lstm": "digits", "cnn_lstm": "synthetic",
          "cifar10_cnn": "synthetic"}

PLAIN = """
import json, sys
import numpy as np
import keras
{imports}
model = keras.models.load_model(sys.argv[1])
x = np.random.default_rng(0).random((4, *model.input_shape[1:]), dtype=np.float32)
np.save(sys.argv[2], model(x, training=False).numpy())
print(json.dumps(sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("trainer", "merge", "launch"))))
"""


def _plain_keras(model_path, out, cwd, imports="", pythonpath=""):
    """Load in a fresh interpreter, as a user of plain Keras would: the
    project's directory is not importable unless `pythonpath` says so."""
    import os
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=pythonpath)
    return subprocess.run([sys.executable, "-c", PLAIN.format(imports=imports), str(model_path), str(out)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _logits_by_trainer(run_dir, x):
    """The same model rebuilt from the registry and loaded through --init's reader."""
    from trainer.init import load_initial_weights
    from trainer.models import build_model
    cfg = manifest(run_dir)["model"]
    model = build_model(cfg["name"], tuple(cfg["input_shape"]), cfg["num_classes"], **cfg["options"])
    load_initial_weights(model, run_dir)
    return model(x, training=False).numpy()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_keras_loads_in_plain_keras(cwd, name):
    """No custom layer: plain keras.models.load_model in a process that cannot
    import the project. cifar10_cnn's LocalResponseNormalization is
    registered, so `import trainer.models` is all it needs."""
    import trainer.models as registry  # its directory is what the subprocess must not see
    repo = str(Path(registry.__file__).parents[1])
    ok(trainer("init", "--model", name, "--data", MODELS[name], "--out", "init", cwd=cwd))
    path = cwd / "init" / "model.keras"
    plain = _plain_keras(path, cwd / "plain.npy", cwd)
    if name == "cifar10_cnn":
        assert plain.returncode != 0 and "LocalResponseNormalization" in plain.stderr
        plain = _plain_keras(path, cwd / "plain.npy", cwd, imports="import trainer.models", pythonpath=repo)
        assert plain.returncode == 0, plain.stderr[-2000:]
        assert set(json.loads(plain.stdout.splitlines()[-1])) == {"trainer"}
    else:
        assert plain.returncode == 0, plain.stderr[-2000:]
        assert json.loads(plain.stdout.splitlines()[-1]) == []  # nothing of the project was imported
    got = np.load(cwd / "plain.npy")
    x = np.random.default_rng(0).random((4, *manifest(cwd / "init")["model"]["input_shape"]), dtype=np.float32)
    np.testing.assert_allclose(got, _logits_by_trainer(cwd / "init", x), rtol=0, atol=1e-6)


# --init from what TF 2.15 / Keras 2 wrote. Freezing every weight keeps the
# run's weights at the start, so the run's model.keras must compute what TF
# 2.15 computed with the same file.
FROZEN = ("--freeze", "dense1,dense2,logits", "--max-steps", "2", "--epochs", "1", "--quiet")


@pytest.mark.parametrize("source,expected,extra", [
    ("project/init", "project|init|model.keras", ()),          # a TF 2.15 init directory (TF checkpoint)
    ("project/client0", "project|client0|model.keras", ()),    # a TF 2.15 run directory
    ("project/global", "project|global.keras", ()),            # a TF 2.15 merge directory
    ("project/global.keras", "project|global.keras", ()),      # a merged Keras 2 functional .keras
    # a run's exported .keras records no trainer model (Keras wrote it): name it
    ("project/client0/model.keras", "project|client0|model.keras", ("--model", "mlp")),
])
def test_init_from_keras2_files_keeps_their_weights(cwd, source, expected, extra):
    proc = ok(trainer("--init", FIXTURES / source, *extra, *FROZEN, "--out", "run", cwd=cwd))
    assert "Traceback" not in proc.stderr
    m = manifest(cwd / "run")
    assert m["model"]["name"] == "mlp"  # taken from the source, not the default digits_cnn
    if not extra:  # the lineage is inherited, so the run can be averaged with the others
        recorded = json.loads((FIXTURES / "project" / "init" / "manifest.json").read_text())["lineage"]
        assert m["lineage"] == recorded
    import keras
    model = keras.models.load_model(cwd / "run" / "model.keras")
    x = EXPECTED["x"].reshape(-1, 8, 8, 1)
    np.testing.assert_allclose(model(x, training=False).numpy(), EXPECTED[expected], rtol=0, atol=1e-5)


def test_init_from_a_keras2_lstm_init_matches_its_checkpoint_by_name(cwd):
    """Recurrent weights are nested (lstm/lstm_cell/kernel): names must agree across versions."""
    ok(trainer("--init", FIXTURES / "project" / "lstm-init", "--freeze", "lstm,logits", "--max-steps", "1",
               "--epochs", "1", "--quiet", "--out", "run", cwd=cwd))
    from trainer.files.sources import open_source
    src = open_source(FIXTURES / "project" / "lstm-init")
    try:
        start = {k: np.asarray(src.read(k)) for k in src.keys()}
    finally:
        src.close()
    end = keras_weights(cwd / "run" / "model.keras")
    assert sorted(end) == sorted(start) and "lstm/lstm_cell/recurrent_kernel" in end
    for k in end:
        np.testing.assert_array_equal(end[k], start[k], err_msg=k)
