"""Keras v3 files name weights by position; merge names them by layer. Check
that naming against Keras's own save for every registry model and the
layer kinds that nest (normalization, LSTM cells, models inside models)."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from trainer.files.naming import VariableLayout
from trainer.files.sources import open_source
from trainer.models import build_model, model_names
from trainer.varnames import keyed


def _sequential_bn():
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(3, 3, name="c1"),
                                keras.layers.BatchNormalization(name="bn1"), keras.layers.Flatten(),
                                keras.layers.Dense(5, name="d1"), keras.layers.Dense(4, name="d2")],
                               name="seq")


def _nested():
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, name="inner_a"),
                                 keras.layers.Dense(3, name="inner_b")], name="inner")
    x = keras.Input((6,))
    h = keras.layers.Dense(6, name="pre")(x)
    return keras.Model(x, keras.layers.Dense(2, name="post")(inner(h)), name="outer")


SHAPES = {"cifar10_cnn": (32, 32, 3), "lstm": (8, 8), "cnn_lstm": (4, 8, 8, 1)}
CASES = {name: (lambda n=name: build_model(n, SHAPES.get(n, (8, 8, 1)), 10)) for name in model_names()}
CASES.update(sequential_bn=_sequential_bn, nested=_nested)


@pytest.mark.parametrize("case", sorted(CASES))
def test_keras_file_names_agree_with_the_model(case, tmp_path):
    model = CASES[case]()
    for i, v in enumerate(model.weights):  # distinct values, so a mix-up cannot go unnoticed
        v.assign(np.random.default_rng(i).normal(size=v.shape).astype(np.dtype(v.dtype)))
    model.save(tmp_path / "m.keras")
    # Keras 3 prefixes a variable's path with the Sequential it was built in
    # when built directly ("seq/bn1/beta"), not when rebuilt from a file
    # ("bn1/beta"): the names to agree with are those of Keras's own load.
    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    for ours, theirs in zip(model.weights, loaded.weights):  # Keras's own load put every value back
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(theirs), keras.ops.convert_to_numpy(ours))
    source = open_source(tmp_path / "m.keras")
    try:
        layout = VariableLayout(source.config)
        by_name = {k: keras.ops.convert_to_numpy(v) for k, v in keyed(loaded.weights).items()}
        assert sorted(layout.var_of.values()) == sorted(by_name)
        assert sorted(source.keys()) == sorted(layout.var_of)
        for key in source.keys():
            var = layout.var_of[key]
            # "dense2/0" belongs to a variable of layer dense2
            assert var.split("/")[0] in key.split("/"), (key, var)
            np.testing.assert_array_equal(source.read(key), by_name[var], err_msg=key)
    finally:
        source.close()
