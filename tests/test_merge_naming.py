"""Keras v3 files name weights by position; merge names them by layer. Check
that naming against Keras's own save for every registry model and the
layer kinds that nest (normalization, LSTM cells, models inside models)."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from trainer.files.naming import VariableLayout
from trainer.files.sources import open_source
from trainer.models import build_model, model_names


def _sequential_bn():
    return tf.keras.Sequential([tf.keras.Input((8, 8, 1)), tf.keras.layers.Conv2D(3, 3, name="c1"),
                                tf.keras.layers.BatchNormalization(name="bn1"), tf.keras.layers.Flatten(),
                                tf.keras.layers.Dense(5, name="d1"), tf.keras.layers.Dense(4, name="d2")],
                               name="seq")


def _nested():
    inner = tf.keras.Sequential([tf.keras.Input((6,)), tf.keras.layers.Dense(3, name="inner_a"),
                                 tf.keras.layers.Dense(3, name="inner_b")], name="inner")
    x = tf.keras.Input((6,))
    h = tf.keras.layers.Dense(6, name="pre")(x)
    return tf.keras.Model(x, tf.keras.layers.Dense(2, name="post")(inner(h)), name="outer")


SHAPES = {"cifar10_cnn": (32, 32, 3), "lstm": (8, 8), "cnn_lstm": (4, 8, 8, 1)}
CASES = {name: (lambda n=name: build_model(n, SHAPES.get(n, (8, 8, 1)), 10)) for name in model_names()}
CASES.update(sequential_bn=_sequential_bn, nested=_nested)


@pytest.mark.parametrize("case", sorted(CASES))
def test_keras_file_names_agree_with_the_model(case, tmp_path):
    model = CASES[case]()
    for v in model.weights:  # distinct values, so a mix-up cannot go unnoticed
        v.assign(np.random.default_rng(abs(hash(v.name)) % 2**32).normal(size=v.shape).astype(v.dtype.as_numpy_dtype))
    model.save(tmp_path / "m.keras")
    source = open_source(tmp_path / "m.keras")
    try:
        layout = VariableLayout(source.config)
        by_name = {v.name.split(":")[0]: v.numpy() for v in model.weights}
        assert sorted(layout.var_of.values()) == sorted(by_name)
        assert sorted(source.keys()) == sorted(layout.var_of)
        for key in source.keys():
            var = layout.var_of[key]
            # "dense2/0" belongs to a variable of layer dense2
            assert var.split("/")[0] in key.split("/"), (key, var)
            np.testing.assert_array_equal(source.read(key), by_name[var], err_msg=key)
    finally:
        source.close()
