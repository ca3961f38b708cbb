"""Batch-normalization statistics for a merged model.

Averaging two models' moving means and variances does not give the
statistics of the averaged model's own activations; recomputing them on
training data does (REPAIR-style repair, the simple form). With momentum 0 a
BatchNormalization layer's moving statistics become those of the batch it
just saw, so one forward pass in training mode over a large sample sets
every layer exactly (layers in order, each seeing the already-repaired
layers before it)."""
from __future__ import annotations

import keras
import numpy as np

from trainer.data import load_dataset

SAMPLE = 4096  # enough samples for stable per-channel statistics, one pass in memory


def batchnorm_layers(model) -> list:
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            out.append(layer)
        elif isinstance(layer, keras.Model):
            out += batchnorm_layers(layer)
    return out


def recalibrate(model, data: str, data_dir=None, seed: int = 0) -> int:
    """Recompute every BatchNormalization layer's moving statistics; the
    number of layers repaired (0: nothing to do)."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    ds = load_dataset(data, data_dir)
    idx = np.random.default_rng(seed).permutation(len(ds.x_train))[:SAMPLE]
    x = ds.x_train[idx]
    saved = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0
        model(x, training=True)
    finally:
        for layer, m in zip(layers, saved):
            layer.momentum = m
    return len(layers)
