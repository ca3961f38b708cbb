"""Load a model from whatever a user may point at, and say what it outputs.

Accepted: a ``.keras`` file (Keras 3, or Keras 2: its config translated by
trainer.files.keras2, its weights read by Keras, whose layout did not
change); a legacy whole-model ``.h5``; a trainer run or init directory and
one checkpoint directory ``RUN/checkpoints/ckpt-N/`` (the registry model its
manifest names, or the run's exported config, with the checkpoint's weights
copied in by name); a merge output directory (manifest, ``config.json``,
``model.weights.h5``). Nothing is ever unpickled and no module a file names
is imported: configs load in Keras safe mode, weights come from HDF5 or TF
checkpoints.
"""
from __future__ import annotations

import json
from pathlib import Path

import keras

from trainer.checkpoint import MANIFEST, read_manifest
from trainer.errors import UsageError, one_line
from trainer.files.archive import check_config, load_keras, read_keras
from trainer.files.hdf5 import H5_ERRORS, damaged, open_h5
from trainer.files.naming import model_from_config, registry_model
from trainer.files.sources import open_source
from trainer.files.weights import read_into

__all__ = ["load_model", "output_kind", "source_kind", "KINDS"]

KINDS = ("keras", "h5", "run", "init", "checkpoint", "merge")

MERGE_CONFIG = "config.json"
MERGE_WEIGHTS = "model.weights.h5"

_HINT = ("give a .keras file, a run or init directory, a checkpoint directory "
         "(RUN/checkpoints/ckpt-N) or a merge output directory")



def source_kind(path) -> str:
    """Which of :data:`KINDS` ``path`` is, without loading it; UsageError if none."""
    p = Path(path)
    if not p.exists():
        if Path(f"{p}.index").exists():
            raise UsageError(f"{path}: a TF checkpoint prefix carries no architecture; "
                             "give its checkpoint directory or its run directory instead")
        raise UsageError(f"{path}: no such file or directory")
    if p.is_dir():
        return _dir_kind(p, path)
    name = p.name.lower()
    if name.endswith(".keras"):
        return "keras"
    if name.endswith((".h5", ".hdf5")):
        if _has_model_config(p):
            return "h5"
        raise UsageError(f"{path}: an HDF5 weights file carries no architecture; "
                         "give the .keras file or run directory it came from")
    if name.endswith(".index") or ".data-" in name:
        raise UsageError(f"{path}: a TF checkpoint file carries no architecture; "
                         "give its checkpoint directory or its run directory instead")
    raise UsageError(f"{path}: not a model this tool reads; {_HINT}")


def _has_model_config(p: Path) -> bool:
    """A legacy whole-model .h5 (model.save("x.h5")), as opposed to weights only."""
    with open_h5(p, str(p)) as f:
        try:
            return "model_config" in f.attrs
        except H5_ERRORS as e:
            raise damaged(str(p), e) from None


def _dir_kind(p: Path, path) -> str:
    if (p / "state.index").exists():
        return "checkpoint"
    if (p / MANIFEST).exists():
        manifest = read_manifest(p)
        if manifest.get("kind") == "merge" or (not manifest.get("latest") and (p / MERGE_CONFIG).exists()):
            missing = [f for f in (MERGE_CONFIG, MERGE_WEIGHTS) if not (p / f).is_file()]
            if missing:
                raise UsageError(f"{path}: merge output directory without {' and '.join(missing)}; "
                                 "write it again")
            return "merge"
        if not manifest.get("latest"):
            raise UsageError(f"{path}: the manifest names no checkpoint yet; "
                             "train it first or give a .keras file")
        return "init" if manifest.get("kind") == "init" else "run"
    if (p / "saved_model.pb").exists():
        raise UsageError(f"{path}: a SavedModel is not read here; "
                         "load it in Keras and save it as a .keras file")
    raise UsageError(f"{path}: a directory without {MANIFEST}; {_HINT}")


def load_model(path) -> keras.Model:
    """The model ``path`` holds, uncompiled. UsageError, one line, for anything unusable."""
    import merge.layers  # noqa: F401  (registers Combine and Ensemble, for saved ensembles)
    import trainer.models  # noqa: F401  (registers LocalResponseNormalization)
    kind = source_kind(path)
    p = Path(path)
    if kind == "keras":
        model = _load_keras(p, path)
    elif kind == "h5":
        model = _load_by_name(_config_of_h5(p, path), p, path)
    elif kind == "merge":
        model = _load_merge_dir(p, path)
    else:
        # RUN/checkpoints/ckpt-N: the manifest describing the model is two levels up.
        run_dir = p.parent.parent if kind == "checkpoint" else p
        if not (run_dir / MANIFEST).exists():
            raise UsageError(f"{path}: checkpoint directory outside a run directory "
                             f"(no {run_dir / MANIFEST}); it carries no architecture")
        model = _load_by_name(_run_architecture(run_dir, path), p, path)
    if not isinstance(model, keras.Model):
        raise UsageError(f"{path}: holds a {type(model).__name__}, not a Keras model")
    return model


def _load_keras(p: Path, path) -> keras.Model:
    return load_keras(p, str(path))


def _config_of_h5(p: Path, path) -> dict:
    src = open_source(p)
    try:
        if src.config is None:
            raise UsageError(f"{path}: its model_config cannot be read; give the model as a .keras file")
        return src.config
    finally:
        src.close()


def _run_architecture(run_dir: Path, path) -> dict | keras.Model:
    """A trainer run's model: its registry model, or (a user model) the config
    of the model.keras it exported; never a user module imported."""
    from trainer.models import MODELS
    cfg = read_manifest(run_dir).get("model")
    exported = run_dir / "model.keras"
    if isinstance(cfg, dict) and cfg.get("name") not in MODELS and exported.is_file():
        return read_keras(exported, weights=False).config
    return registry_model(cfg, str(path))


def _load_by_name(architecture, weights: Path, path) -> keras.Model:
    """A model built from a config (or already built), its weights copied in
    by name from any format trainer.files reads."""
    model = architecture if isinstance(architecture, keras.Model) else model_from_config(architecture, str(path))
    src = open_source(weights)
    try:
        read_into(model, src, str(path))
    finally:
        src.close()
    return model


def _load_merge_dir(p: Path, path) -> keras.Model:
    try:
        config = json.loads((p / MERGE_CONFIG).read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UsageError(f"{p / MERGE_CONFIG}: unreadable model config ({one_line(e)})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{p / MERGE_CONFIG}: not a Keras model config")
    check_config(config, str(p / MERGE_CONFIG))
    open_h5(p / MERGE_WEIGHTS, str(p / MERGE_WEIGHTS)).close()  # checked before Keras reads it
    model = model_from_config(config, str(p / MERGE_CONFIG))
    try:
        model.load_weights(str(p / MERGE_WEIGHTS))
    except Exception as e:
        raise UsageError(f"{p / MERGE_WEIGHTS}: weights do not load into the model of "
                         f"{MERGE_CONFIG} ({one_line(e)})") from None
    return model


def _output_layer(model):
    """The layer that produces the model's (first) output, inside nested models too."""
    layer = model
    while isinstance(layer, keras.Model):
        outputs = getattr(layer, "outputs", None)
        history = getattr(outputs[0], "_keras_history", None) if outputs else None
        nxt = history.operation if history is not None else (layer.layers[-1] if layer.layers else None)
        if nxt is None or nxt is layer:
            return layer
        layer = nxt
    return layer


def output_kind(model) -> str:
    """``"probs"`` if the model ends in a softmax (or is an ensemble), else ``"logits"``."""
    from .layers import Combine
    layer = _output_layer(model)
    if isinstance(layer, (keras.layers.Softmax, Combine)):
        return "probs"
    activation = getattr(layer, "activation", None)
    if activation is not None and getattr(activation, "__name__", str(activation)) == "softmax":
        return "probs"
    return "logits"
