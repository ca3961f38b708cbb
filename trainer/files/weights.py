"""Copy the tensors a Source holds into a live Keras model, by name."""
from __future__ import annotations

import numpy as np

from trainer.errors import UsageError


def read_into(model, src, where: str) -> None:
    """Assign every variable of `model` from `src` (trainer.files.sources), by
    key (trainer.varnames); all-or-nothing: nothing is assigned unless every
    variable was found with its shape. Extra tensors in `src` (training
    state) are ignored."""
    from trainer.varnames import keyed

    from .naming import VariableLayout, serialized_config
    if src.family == "keras":
        layout = VariableLayout(model=model)
        if src.needs_architecture:  # a bare .weights.h5: named by this model's layers
            src.bind(serialized_config(model))
        src.rename(layout.var_of, "variables")
    targets = keyed(model.weights)
    have = set(src.keys())
    values = {}
    for name, variable in targets.items():
        if name not in have:
            held = ", ".join(sorted(have)[:6]) or "no weights"
            raise UsageError(f"{where}: tensor {name} missing; the weights do not fit model {model.name!r} "
                             f"(the file holds {held})")
        shape, dtype = src.info(name)
        if tuple(shape) != tuple(variable.shape):
            raise UsageError(f"{where}: tensor {name} has shape {tuple(shape)}, model {model.name!r} "
                             f"needs {tuple(variable.shape)}")
        # Weights are numbers; a string or compound dataset in their place is a damaged or crafted file.
        if np.dtype(dtype).kind not in "fiub":
            raise UsageError(f"{where}: tensor {name} holds {np.dtype(dtype)} values, not numbers; "
                             "the file is damaged or not a model's weights")
        values[name] = np.asarray(src.read(name))
    for name, variable in targets.items():
        variable.assign(values[name])
