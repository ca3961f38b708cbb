"""Shared starting points: `python -m trainer init`, `--init`, and merges as the next round's start.

Two machines that start from the same init directory share a lineage, which
is what later lets `merge fedavg` average their weights.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

from . import checkpoint as ck
from .errors import UsageError


def read_init(path) -> dict:
    """The model config and lineage an init source records, where it has them."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--init {path}: no such file or directory")
    if p.is_dir():
        manifest = ck.read_manifest(p)
        return {"model": manifest.get("model"), "lineage": manifest.get("lineage")}
    if p.suffix == ".keras":
        return _keras_metadata(p)
    if p.suffix == ".h5":
        return {"model": None, "lineage": None}
    raise UsageError(f"--init {path}: expected an init or run directory, a .keras or a .weights.h5 file")


def _keras_metadata(p: Path) -> dict:
    """A .keras written by `merge fedavg` records its model and lineage in the
    archive's metadata.json; one saved by Keras records neither."""
    try:
        with zipfile.ZipFile(p) as zf:
            recorded = json.loads(zf.read("metadata.json")).get("dptoolkit") or {}
    except (zipfile.BadZipFile, KeyError, ValueError, AttributeError, OSError):
        recorded = {}
    return {"model": recorded.get("model"), "lineage": recorded.get("lineage")}


def load_initial_weights(model, path) -> None:
    import tensorflow as tf
    p = Path(path)
    try:
        if p.is_dir() and ck.read_manifest(p).get("kind") == "merge":
            # `merge fedavg -o DIR`: a Keras config and v3 weights file, unzipped.
            source = tf.keras.saving.deserialize_keras_object(json.loads((p / "config.json").read_text()))
            source.load_weights(str(p / "model.weights.h5"))
            _copy_by_name(source, model)
        elif p.is_dir():
            prefix, _ = ck.checkpoint_of(p)
            # A run's checkpoint also holds optimizer state; a new run starts fresh.
            status = tf.train.Checkpoint(model=model).read(prefix).expect_partial()
            status.assert_existing_objects_matched()
        elif p.suffix == ".keras":
            _copy_by_name(tf.keras.models.load_model(p, compile=False), model)
        else:
            model.load_weights(str(p))
    except UsageError:
        raise
    except Exception as e:  # TF reports shape mismatches as several exception types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UsageError(f"--init {path}: its weights do not fit model {model.name!r} ({first})") from None


def _copy_by_name(source, target) -> None:
    values = {w.name: w for w in source.weights}
    for w in target.weights:
        if w.name not in values:
            raise UsageError(f"tensor {w.name} missing from the init file")
        if tuple(values[w.name].shape) != tuple(w.shape):
            raise UsageError(f"tensor {w.name}: shape {tuple(values[w.name].shape)} in the init file, "
                             f"{tuple(w.shape)} in the model")
        w.assign(values[w.name])


def write_init(out, model, model_cfg: dict) -> str:
    """An init directory: one checkpoint of the weights, a manifest, a .keras copy."""
    import tensorflow as tf
    run_dir = ck.RunDir(out, keep=1)
    if run_dir.exists():
        raise UsageError(f"--out {out} already exists; choose another directory")
    lineage = ck.fingerprint(model.weights)
    run_dir.write_manifest({"kind": "init", "model": model_cfg, "lineage": lineage,
                            "versions": ck.package_versions(), "step": 0, "samples_seen": 0})
    run_dir.save(tf.train.Checkpoint(model=model), {"epoch": 0, "offset": 0, "step": 0, "samples_seen": 0},
                 {})
    ck.export_keras(model, run_dir.path / "model.keras")
    return lineage
