"""Permutation alignment of independently trained networks (weight matching,
as in Ainsworth et al., "Git Re-Basin", 2023).

Hidden units of a network can be permuted without changing its function.
Two networks trained from different starts learn similar units in different
orders, which is why averaging their weights fails. Weight matching finds,
layer by layer, the permutation of B's units that best matches A's (SciPy's
linear_sum_assignment on the summed weight correlations), and iterates until
no permutation changes.

The permutation structure is derived from the Keras graph (trainer.graph.chain,
the walker structured pruning uses too): a single chain of Dense and Conv2D
layers, with normalization, pooling, flatten, dropout and activation layers
between them. Anything else (branches, residual adds,
recurrent layers, layers mixing channels such as LocalResponseNormalization)
is refused, since a permutation would not pass through it unchanged. Weights
are keyed like every variable of the project (trainer.varnames: dense1/kernel).
"""
from __future__ import annotations

import keras
import numpy as np

from trainer import graph
from trainer.errors import UsageError
from trainer.varnames import key_map, keyed

L = keras.layers
_WEIGHTED = (L.Dense, L.Conv2D)
_NORM = (L.BatchNormalization, L.LayerNormalization)
_PASS = (L.Dropout, L.Activation, L.ReLU, L.MaxPooling2D, L.AveragePooling2D, L.SpatialDropout2D,
         L.GaussianNoise)
_FLATTEN = (L.Flatten,)
_GLOBAL = (L.GlobalAveragePooling2D, L.GlobalMaxPooling2D)


class Spec:
    """Which axis of which weight each permutation group moves.

    params: {variable key (trainer.varnames): (view shape, (group or None per view axis))};
    groups: {group: size}."""

    def __init__(self):
        self.params: dict[str, tuple[tuple, tuple]] = {}
        self.groups: dict[str, int] = {}


def _chain(model) -> list:
    """The trainer.graph links (layer, input shape) of a single-input, single-output chain, in order."""
    try:
        return graph.chain(model)
    except graph.NotAChain as e:
        raise UsageError(f"{e}; alignment supports chains of Dense/Conv2D layers") from None


def derive_spec(model) -> Spec:
    spec = Spec()
    links = _chain(model)
    name = key_map(model.weights)
    weighted = [link.layer for link in links if isinstance(link.layer, _WEIGHTED)]
    group = None          # the permutation group of the current features (None: the input, not permuted)
    spatial = 1           # positions per channel, once a Flatten has turned a feature map into a vector
    channels = None
    last = weighted[-1] if weighted else None
    for link in links:
        layer = link.layer
        if isinstance(layer, _WEIGHTED) and (type(layer) not in _WEIGHTED or getattr(layer, "groups", 1) != 1):
            raise UsageError(f"layer {layer.name} ({type(layer).__name__}): grouped, depthwise or subclassed "
                             "Dense/Conv2D layers are not supported by alignment")
        if isinstance(layer, _WEIGHTED):
            kernel, bias = layer.kernel, layer.bias
            out_group = None if layer is last else f"{layer.name}"
            if isinstance(layer, L.Conv2D):
                if spatial != 1:
                    raise UsageError(f"layer {layer.name}: Conv2D after Flatten is not supported")
                axes = (None, None, group, out_group)
                spec.params[name[id(kernel)]] = (tuple(kernel.shape), axes)
            elif spatial > 1:  # Dense after Flatten of a feature map: input index = position * C + channel
                rows, units = kernel.shape
                spec.params[name[id(kernel)]] = ((spatial, channels, units), (None, group, out_group))
            else:
                spec.params[name[id(kernel)]] = (tuple(kernel.shape), (group, out_group))
            if bias is not None:
                spec.params[name[id(bias)]] = (tuple(bias.shape), (out_group,))
            if out_group is not None:
                spec.groups[out_group] = int(kernel.shape[-1])
            group, spatial, channels = out_group, 1, int(kernel.shape[-1])
        elif isinstance(layer, _NORM):
            axis = layer.axis if isinstance(layer.axis, int) else (layer.axis[0] if len(layer.axis) == 1 else None)
            if axis not in (-1, len(link.input_shape) - 1):
                raise UsageError(f"layer {layer.name}: normalization over other than the last axis")
            for v in layer.weights:
                spec.params[name[id(v)]] = (tuple(v.shape), (group,))
        elif isinstance(layer, _FLATTEN):
            shape = link.input_shape[1:]
            if group is not None and len(shape) > 1:  # the model's own input is never permuted
                spatial, channels = int(np.prod(shape[:-1])), int(shape[-1])
        elif isinstance(layer, _PASS) or isinstance(layer, _GLOBAL):
            if layer.weights:
                raise UsageError(f"layer {layer.name}: has weights alignment does not know how to permute")
        else:
            raise UsageError(f"layer {layer.name} ({type(layer).__name__}): a permutation does not pass "
                             "through it unchanged, or alignment does not know it; supported are chains of "
                             "Dense/Conv2D with normalization, pooling, flatten, dropout and activations")
    if len(weighted) < 2:
        raise UsageError(f"model {model.name}: fewer than two Dense/Conv2D layers, nothing to align")
    return spec


def permute(weights: dict, spec: Spec, perms: dict, skip: str | None = None) -> dict:
    """`weights` with every group's permutation applied (except `skip`)."""
    out = dict(weights)
    for pname, (view, axes) in spec.params.items():
        w = weights[pname].reshape(view)
        for axis, g in enumerate(axes):
            if g is not None and g != skip:
                w = np.take(w, perms[g], axis=axis)
        out[pname] = w.reshape(weights[pname].shape)
    return out


def weight_matching(a: dict, b: dict, spec: Spec, max_iter: int = 100, seed: int = 0) -> dict:
    """Permutations of B's groups that maximize the summed inner products
    with A's weights; coordinate ascent over groups until nothing changes."""
    from scipy.optimize import linear_sum_assignment
    perms = {g: np.arange(n) for g, n in spec.groups.items()}
    rng = np.random.default_rng(seed)
    names = list(spec.groups)
    for _ in range(max_iter):
        changed = False
        for g in rng.permutation(names):
            n = spec.groups[g]
            score = np.zeros((n, n))
            pb = permute(b, spec, perms, skip=g)
            for pname, (view, axes) in spec.params.items():
                for axis, grp in enumerate(axes):
                    if grp != g:
                        continue
                    wa = np.moveaxis(a[pname].reshape(view), axis, 0).reshape(n, -1).astype(np.float64)
                    wb = np.moveaxis(pb[pname].reshape(view), axis, 0).reshape(n, -1).astype(np.float64)
                    score += wa @ wb.T
            _, new = linear_sum_assignment(score, maximize=True)
            old_score = score[np.arange(n), perms[g]].sum()
            if score[np.arange(n), new].sum() > old_score + 1e-12:
                perms[g] = new
                changed = True
        if not changed:
            break
    return perms


def weights_of(model) -> dict:
    """{variable key (trainer.varnames): value}."""
    return {k: keras.ops.convert_to_numpy(v) for k, v in keyed(model.weights).items()}


def align(model_a, model_b) -> tuple[dict, dict]:
    """B's weights permuted to match A's (by variable key), and the permutations."""
    spec = derive_spec(model_a)
    spec_b = derive_spec(model_b)
    if spec.params.keys() != spec_b.params.keys() or spec.groups != spec_b.groups:
        raise UsageError(f"models {model_a.name} and {model_b.name} differ in architecture; "
                         "alignment needs the same layers and sizes")
    a, b = weights_of(model_a), weights_of(model_b)
    perms = weight_matching(a, b, spec)
    return permute(b, spec, perms), perms


def set_weights(model, weights: dict) -> None:
    """Assign ``weights`` ({variable key: value}, as from weights_of or align) to ``model``."""
    for k, v in keyed(model.weights).items():
        v.assign(weights[k])
