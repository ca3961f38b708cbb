"""One name per variable, the same in every process, file and Keras version.

Keras 3 calls a variable ``kernel`` (``v.name``) and keeps the layer in
``v.path`` (``dense1/kernel``); Keras 2 and plain ``tf.Variable`` put both in
``v.name`` (``dense1/kernel:0``). Checkpoints, masks, fingerprints and merges
all key variables by ``dense1/kernel``, so a file written by either version
names its tensors the same way.
"""
from __future__ import annotations


def key(variable) -> str:
    """``layer/weight`` of a Keras 3 variable, or a tf.Variable's name without ``:0``."""
    path = getattr(variable, "path", None)
    name = path if isinstance(path, str) and path else variable.name
    return name[:-2] if name.endswith(":0") else name


def keys(variables) -> list[str]:
    """``key`` of each variable, made unique by a ``#i`` suffix where two share one.

    Keras 3 does not prefix the variables of a nested model with the outer
    layer's name, so two nested models with a ``dense`` layer each both hold
    ``dense/kernel``; the suffix follows the order of ``variables``, which is
    the model's own and the same in every process.
    """
    out, seen = [], {}
    for v in variables:
        k = key(v)
        n = seen.get(k, 0)
        seen[k] = n + 1
        out.append(k if n == 0 else f"{k}#{n}")
    return out


def keyed(variables) -> dict:
    """{unique key: variable}."""
    variables = list(variables)
    return dict(zip(keys(variables), variables))


def key_map(variables) -> dict[int, str]:
    """{id(variable): unique key}, for looking up the key of a variable taken
    from a subset (trainable_variables, a layer's kernel) of `variables`."""
    variables = list(variables)
    return {id(v): k for k, v in zip(keys(variables), variables)}


def tf_variable(variable):
    """The ``tf.Variable`` (or distributed variable) under a Keras 3 variable.

    tf.distribute's update and per-replica calls need it; a plain tf.Variable
    is returned as it is.
    """
    import keras
    return variable.value if isinstance(variable, keras.Variable) else variable


def safe(name: str) -> str:
    """A key usable inside a tf.Variable's own name."""
    return name.replace(":", "_").replace("/", "_").replace("#", "_")
