"""Load a model from whatever a user may point at, and say what it outputs.

Accepted: a ``.keras`` file; a trainer run or init directory (the model is
rebuilt from its manifest and its latest checkpoint restored); one checkpoint
directory ``RUN/checkpoints/ckpt-N/``; a merge output directory (manifest,
``config.json``, ``model.weights.h5``). Nothing is ever unpickled: ``.keras``
files and configs load in Keras safe mode, weights come from HDF5 or TF
checkpoints.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import tensorflow as tf

from trainer.checkpoint import MANIFEST, checkpoint_of, read_manifest
from trainer.errors import UsageError

__all__ = ["load_model", "output_kind", "source_kind", "KINDS"]

KINDS = ("keras", "run", "init", "checkpoint", "merge")

MERGE_CONFIG = "config.json"
MERGE_WEIGHTS = "model.weights.h5"

_HINT = ("give a .keras file, a run or init directory, a checkpoint directory "
         "(RUN/checkpoints/ckpt-N) or a merge output directory")


def _one_line(exc: BaseException, limit: int = 200) -> str:
    # Keras errors often quote the whole model config over many lines.
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        raise UsageError(f"{path}: an HDF5 weights file carries no architecture; "
                         "give the .keras file or run directory it came from")
    if name.endswith(".index") or ".data-" in name:
        raise UsageError(f"{path}: a TF checkpoint file carries no architecture; "
                         "give its checkpoint directory or its run directory instead")
    raise UsageError(f"{path}: not a model this tool reads; {_HINT}")


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


def load_model(path) -> tf.keras.Model:
    """The model ``path`` holds, uncompiled. UsageError, one line, for anything unusable."""
    kind = source_kind(path)
    p = Path(path)
    if kind == "keras":
        model = _load_keras(p, path)
    elif kind == "merge":
        model = _load_merge_dir(p, path)
    elif kind == "checkpoint":
        # RUN/checkpoints/ckpt-N: the manifest describing the model is two levels up.
        run_dir = p.parent.parent
        if not (run_dir / MANIFEST).exists():
            raise UsageError(f"{path}: checkpoint directory outside a run directory "
                             f"(no {run_dir / MANIFEST}); it carries no architecture")
        model = _load_checkpoint(read_manifest(run_dir), str(p / "state"), path)
    else:
        prefix, _ = checkpoint_of(p)
        model = _load_checkpoint(read_manifest(p), prefix, path)
    if not isinstance(model, tf.keras.Model):
        raise UsageError(f"{path}: holds a {type(model).__name__}, not a Keras model")
    return model


def _load_keras(p: Path, path) -> tf.keras.Model:
    import trainer.models  # noqa: F401  (registers LocalResponseNormalization)
    if not p.is_file() or not zipfile.is_zipfile(p):
        raise UsageError(f"{path}: not a .keras archive (corrupt, or not written by "
                         "model.save); save the model again as .keras")
    try:
        return tf.keras.models.load_model(p, compile=False, safe_mode=True)
    except Exception as e:  # a bad archive fails in many ways (zip, json, h5, config)
        raise UsageError(f"{path}: cannot load this .keras file ({_one_line(e)})") from None


def _load_merge_dir(p: Path, path) -> tf.keras.Model:
    import trainer.models  # noqa: F401  (registers LocalResponseNormalization)
    try:
        config = json.loads((p / MERGE_CONFIG).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{p / MERGE_CONFIG}: unreadable model config ({_one_line(e)})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{p / MERGE_CONFIG}: not a Keras model config")
    # As load_model(compile=False) does: an optimizer is not needed to predict or merge.
    config = {**config, "compile_config": None}
    try:
        model = tf.keras.saving.deserialize_keras_object(config, safe_mode=True)
    except Exception as e:
        raise UsageError(f"{p / MERGE_CONFIG}: cannot rebuild the model ({_one_line(e)})") from None
    if not isinstance(model, tf.keras.Model):
        raise UsageError(f"{p / MERGE_CONFIG}: describes a {type(model).__name__}, not a Keras model")
    try:
        model.load_weights(str(p / MERGE_WEIGHTS))
    except Exception as e:
        raise UsageError(f"{p / MERGE_WEIGHTS}: weights do not load into the model of "
                         f"{MERGE_CONFIG} ({_one_line(e)})") from None
    return model


def _load_checkpoint(manifest: dict, prefix: str, path) -> tf.keras.Model:
    from trainer.models import build_model
    cfg = manifest.get("model")
    try:
        name, shape, classes = cfg["name"], tuple(cfg["input_shape"]), int(cfg["num_classes"])
        options = dict(cfg.get("options") or {})
    except (TypeError, KeyError, ValueError):
        raise UsageError(f"{path}: its manifest records no usable model "
                         "(name, input_shape, num_classes); give the run's .keras file") from None
    try:
        model = build_model(name, shape, classes, **options)
    except UsageError as e:
        raise UsageError(f"{path}: cannot rebuild its model: {e}") from None
    try:
        # expect_partial: a run's checkpoint also holds optimizer state and
        # masks, which a merged or evaluated model does not need.
        tf.train.Checkpoint(model=model).read(prefix).expect_partial().assert_existing_objects_matched()
    except Exception as e:  # TF reports missing files and shape mismatches as several types
        raise UsageError(f"{path}: checkpoint does not restore into model {name!r} "
                         f"({_one_line(e)})") from None
    return model


def _output_layer(model):
    """The layer that produces the model's (first) output, inside nested models too."""
    layer = model
    while isinstance(layer, tf.keras.Model):
        outputs = getattr(layer, "outputs", None)
        history = getattr(outputs[0], "_keras_history", None) if outputs else None
        nxt = history.layer if history is not None else (layer.layers[-1] if layer.layers else None)
        if nxt is None or nxt is layer:
            return layer
        layer = nxt
    return layer


def output_kind(model) -> str:
    """``"probs"`` if the model ends in a softmax (or is an ensemble), else ``"logits"``."""
    from .layers import Combine
    layer = _output_layer(model)
    if isinstance(layer, (tf.keras.layers.Softmax, Combine)):
        return "probs"
    activation = getattr(layer, "activation", None)
    if activation is not None and getattr(activation, "__name__", str(activation)) == "softmax":
        return "probs"
    return "logits"
