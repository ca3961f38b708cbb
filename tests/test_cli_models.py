"""Models through the CLI: sequence data in .npz, a user's own model."""
import textwrap

import numpy as np

from conftest import manifest, ok, trainer


def test_cnn_lstm_trains_on_npz_sequences(cwd):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 96)
    # Sequences of 4 frames of 12x12x1; the class sets the brightness of the frames.
    x = (rng.random((96, 4, 12, 12, 1)) * 0.5 + y[:, None, None, None, None] * 0.25).astype(np.float32)
    np.savez(cwd / "seq.npz", x=x, y=y)
    ok(trainer("--model", "cnn_lstm", "--data", "seq.npz", "--epochs", "6", "--batch-size", "16",
               "--lr", "3e-3", "--out", "run", "--quiet", cwd=cwd))
    m = manifest(cwd / "run")
    assert m["model"]["input_shape"] == [4, 12, 12, 1] and m["model"]["num_classes"] == 3
    assert m["final"]["test_accuracy"] > 0.6  # chance is 1/3


def test_lstm_with_variational_dropout_on_digits(cwd):
    ok(trainer("--model", "lstm", "--dropout", "0.1", "--recurrent-dropout", "0.1", "--epochs", "2",
               "--out", "run", "--quiet", cwd=cwd))
    m = manifest(cwd / "run")
    assert m["model"]["options"]["recurrent_dropout"] == 0.1
    assert m["final"]["test_accuracy"] > 0.5


def test_users_own_model_function(cwd):
    (cwd / "mynets.py").write_text(textwrap.dedent("""
        import tensorflow as tf
        def tiny(input_shape, num_classes):
            inp = tf.keras.Input(shape=input_shape)
            x = tf.keras.layers.Flatten(name="flat")(inp)
            return tf.keras.Model(inp, tf.keras.layers.Dense(num_classes, name="out")(x))
    """))
    ok(trainer("--model", "mynets:tiny", "--epochs", "3", "--lr", "1e-2", "--out", "run", "--quiet", cwd=cwd,
               PYTHONPATH=f"{cwd}:{__import__('conftest').REPO}"))
    m = manifest(cwd / "run")
    assert m["model"]["name"] == "mynets:tiny" and m["final"]["test_accuracy"] > 0.85
