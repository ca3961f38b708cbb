"""What a saved ensemble is made of: the ``Combine`` layer and the ``Ensemble`` model.

``Combine`` is a custom layer because Keras has no built-in layer for
log-softmax, argmax or one-hot, and a Lambda layer would make the saved
ensemble refuse to load in safe mode.

Keras 3 imports no module a saved file names other than its own: a custom
class is found only if it was registered in the loading process. Importing
this module registers ``Combine`` and ``Ensemble`` (and, via trainer.models,
the trainer's LocalResponseNormalization), so a saved ensemble loads with
plain ``keras.models.load_model`` after ``import merge.layers``.
``Ensemble`` is a functional model with no code of its own: its class name
says what the file holds, and an ensemble saved under Keras 2 names it too.
"""
from __future__ import annotations

import math

import keras
from keras import ops

import trainer.models  # noqa: F401  (registers LocalResponseNormalization for members that use it)

__all__ = ["Combine", "Ensemble", "METHODS"]

METHODS = ("mean", "logit-mean", "vote", "max")

# Probabilities are clipped before the log so a member that is certain (p == 0
# for some class) gives a large negative log-probability, not -inf or NaN.
_EPS = 1e-7
# Small enough never to outvote a real vote, large enough to survive float32
# next to a vote share of 1: it only orders classes with equal votes.
_TIE_BREAK = 1e-6


def normalize_weights(weights, count: int) -> list[float]:
    """``weights`` (or equal weights if None) scaled to sum 1; ValueError if unusable."""
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} members")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"weights must not all be zero, got {weights}")
    return [w / total for w in weights]


@keras.saving.register_keras_serializable(package="merge")
class Combine(keras.layers.Layer):
    """Member outputs, a list of (batch, classes) tensors -> class probabilities.

    ``method``: ``mean`` (weighted mean of probabilities), ``logit-mean``
    (softmax of the weighted mean of log-probabilities, i.e. a normalized
    weighted geometric mean), ``vote`` (weighted share of argmax votes) or
    ``max`` (per-class max probability, renormalized). ``from_logits[i]`` says
    whether member i outputs logits (softmax is applied) or probabilities.
    """

    def __init__(self, method="mean", weights=None, from_logits=None, **kwargs):
        # ``weights`` is taken here so it never reaches Layer.__init__, which
        # would read it as initial variable values.
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if from_logits is None:
            raise ValueError("from_logits (one bool per member) is required")
        self.method = method
        self.from_logits = [bool(f) for f in from_logits]
        if not self.from_logits:
            raise ValueError("Combine needs at least one member")
        # Not ``self.weights``: that is Layer's list of variables.
        self.member_weights = normalize_weights(weights, len(self.from_logits))

    def call(self, inputs):
        if not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        if len(inputs) != len(self.from_logits):
            raise ValueError(f"Combine got {len(inputs)} inputs for {len(self.from_logits)} members")
        xs = [ops.cast(x, self.compute_dtype) for x in inputs]
        if self.method == "logit-mean":
            logs = [ops.log_softmax(x, axis=-1) if logit else ops.log(ops.clip(x, _EPS, 1.0))
                    for x, logit in zip(xs, self.from_logits)]
            return ops.softmax(self._weighted_sum(logs), axis=-1)
        probs = [ops.softmax(x, axis=-1) if logit else x for x, logit in zip(xs, self.from_logits)]
        mean = self._weighted_sum(probs)
        if self.method == "mean":
            return mean
        if self.method == "vote":
            depth = probs[0].shape[-1]
            votes = self._weighted_sum(
                [ops.one_hot(ops.argmax(p, axis=-1), depth, dtype=p.dtype) for p in probs])
            out = votes + _TIE_BREAK * mean
        else:  # max
            out = ops.max(ops.stack(probs, axis=0), axis=0)
        return out / ops.sum(out, axis=-1, keepdims=True)

    def _weighted_sum(self, tensors):
        return sum(ops.cast(w, t.dtype) * t for w, t in zip(self.member_weights, tensors))

    def compute_output_shape(self, input_shape):
        # A list of (batch, classes) shapes, all the same: the output has that shape.
        return tuple(input_shape[0])

    def get_config(self):
        config = super().get_config()
        config.update(method=self.method, weights=list(self.member_weights),
                      from_logits=list(self.from_logits))
        return config


@keras.saving.register_keras_serializable(package="merge")
class Ensemble(keras.Model):
    """A functional model, built as ``Ensemble(inputs, outputs, name=...)``.

    No code of its own: Keras makes it a Functional subclass, saves and
    revives it as one, by its registered name (see the module docstring).
    """
