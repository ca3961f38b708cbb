"""Several trained models as one: a functional model that runs every member on
the same input and combines their class probabilities with ``Combine``.

Unlike weight averaging, members may have different architectures; they need
only the same input shape and the same classes.
"""
from __future__ import annotations

from pathlib import Path

import keras

from trainer.checkpoint import export_keras
from trainer.errors import UsageError

from .layers import METHODS, Combine, Ensemble, normalize_weights
from .models import load_model, output_kind, source_kind
from .records import common_data, recorded_data

__all__ = ["build_ensemble", "write_ensemble", "METHODS"]


def _check_method(method):
    if method not in METHODS:
        raise UsageError(f"--method {method}: choose one of {', '.join(METHODS)}")


def _check_weights(weights, names) -> list[float]:
    try:
        return normalize_weights(weights, len(names))
    except (TypeError, ValueError) as e:
        raise UsageError(f"--weights for {', '.join(names)}: {e}; give one number >= 0 per model, "
                         "not all zero") from None


def _single_io(model, name):
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UsageError(f"{name}: has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                         "ensemble members need exactly one of each")
    out = tuple(model.output_shape)
    if len(out) != 2 or not isinstance(out[1], int):
        raise UsageError(f"{name}: outputs shape {out}; ensemble members must output "
                         "(batch, classes) scores")
    return tuple(model.input_shape), out


def build_ensemble(members: list[keras.Model], method: str = "mean", weights=None, *,
                   names: list[str] | None = None) -> keras.Model:
    """One model: a shared Input, every member called on it, ``Combine`` on top.

    Outputs class probabilities whatever the members output. ``names`` (the
    members' paths) only label error messages. The members are renamed
    ``member_0``, ``member_1``, ... in place: a saved model needs unique layer names.
    """
    names = [str(n) for n in names] if names is not None else [f"member {i}" for i in range(len(members))]
    if len(names) != len(members):
        raise ValueError(f"{len(names)} names for {len(members)} members")
    _check_method(method)
    if len(members) < 2:
        raise UsageError(f"an ensemble needs at least two models, got {len(members)}: {', '.join(names) or 'none'}")
    seen = {}
    for model, name in zip(members, names):
        if id(model) in seen:
            raise UsageError(f"{seen[id(model)]} and {name} are the same model object; give each model once")
        seen[id(model)] = name
    norm = _check_weights(weights, names)
    shapes = [_single_io(m, n) for m, n in zip(members, names)]
    (in0, out0), name0 = shapes[0], names[0]
    for (inp, out), name in zip(shapes[1:], names[1:]):
        if inp != in0:
            raise UsageError(f"{name0} takes inputs of shape {in0[1:]} but {name} takes {inp[1:]}"
                             + (f" (batch {in0[0]} vs {inp[0]})" if inp[1:] == in0[1:] else "")
                             + "; ensemble members must share the input shape")
        if out[1] != out0[1]:
            raise UsageError(f"{name0} has {out0[1]} classes but {name} has {out[1]}; "
                             "ensemble members must predict the same classes")

    for i, model in enumerate(members):
        # A functional model needs unique layer names, and members often share theirs.
        model.name = f"member_{i}"
    inputs = keras.Input(shape=in0[1:], batch_size=in0[0], dtype=members[0].inputs[0].dtype, name="input")
    outputs = [model(inputs) for model in members]
    combined = Combine(method=method, weights=norm,
                       from_logits=[output_kind(m) == "logits" for m in members],
                       name="combine")(outputs)
    return Ensemble(inputs, combined, name="ensemble")


def write_ensemble(paths: list[str], out: str, method: str = "mean", weights=None,
                   overwrite: bool = False) -> dict:
    """Load ``paths``, build their ensemble and save it to ``out`` (.keras), atomically.

    Returns a summary: out, members, kinds, method, weights (normalized),
    num_classes, input_shape, params.
    """
    paths = [str(p) for p in paths]
    _check_method(method)
    if len(paths) < 2:
        raise UsageError(f"an ensemble needs at least two models, got {len(paths)}: {', '.join(paths) or 'none'}")
    _check_weights(weights, paths)
    out_path = Path(out)
    if not str(out).endswith(".keras"):
        raise UsageError(f"-o {out}: an ensemble is saved as one .keras file; name it *.keras")
    resolved = {}
    for p in paths:
        key = Path(p).resolve()
        if key in resolved:
            raise UsageError(f"{resolved[key]} and {p} are the same model; give each model once")
        resolved[key] = p
    target = out_path.resolve()
    for key, p in resolved.items():
        if target == key:
            raise UsageError(f"-o {out} is the input {p}; write the ensemble elsewhere")
        if key.is_dir() and key in target.parents:
            raise UsageError(f"-o {out} is inside the input directory {p}; write the ensemble elsewhere")
    if out_path.is_dir():
        raise UsageError(f"-o {out} is a directory; give a file name ending in .keras")
    if not out_path.parent.is_dir():
        raise UsageError(f"-o {out}: directory {out_path.parent} does not exist")
    if out_path.exists() and not overwrite:
        raise UsageError(f"-o {out} already exists; choose another name or pass --overwrite")
    kinds = [source_kind(p) for p in paths]  # every path checked before any slow load

    model = build_ensemble([load_model(p) for p in paths], method, weights, names=paths)
    data = common_data(recorded_data(p) for p in paths)
    try:
        # recording the data set: `merge evaluate ENSEMBLE` then needs no --data
        export_keras(model, out_path, record={"data": {"name": data}} if data else None)
    except OSError as e:
        raise UsageError(f"-o {out}: cannot write ({e.strerror or e})") from None
    combine = model.get_layer("combine")
    return {
        "out": str(out),
        "members": paths,
        "kinds": kinds,
        "method": method,
        "weights": list(combine.member_weights),
        "num_classes": int(model.output_shape[-1]),
        "input_shape": list(model.input_shape[1:]),
        "params": int(model.count_params()),
        "data": data,
    }
