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
    """Copy the weights `path` holds into `model`, by name.

    Every format the merge reads is accepted, written by Keras 3 or by Keras 2
    (this project's TF 2.15 runs and merges included), through the same
    reader (trainer.files): a run or init directory, a merge directory, a
    .keras, .weights.h5 or legacy .h5 file, a TF checkpoint prefix. Optimizer
    state is never copied: a new run starts it fresh.
    """
    from .files.sources import open_source
    from .files.weights import read_into
    try:
        src = open_source(path)
    except UsageError as e:
        raise UsageError(f"--init {e}") from None
    try:
        read_into(model, src, f"--init {path}")
    finally:
        src.close()


def write_init(out, model, model_cfg: dict) -> str:
    """An init directory: one checkpoint of the weights, a manifest, a .keras copy."""
    run_dir = ck.RunDir(out, keep=1)
    if run_dir.exists():
        raise UsageError(f"--out {out} already exists; choose another directory")
    lineage = ck.fingerprint(model.weights)
    run_dir.write_manifest({"kind": "init", "model": model_cfg, "lineage": lineage,
                            "versions": ck.package_versions(), "step": 0, "samples_seen": 0})
    run_dir.save(ck.state_checkpoint(model), {"epoch": 0, "offset": 0, "step": 0, "samples_seen": 0}, {})
    ck.export_keras(model, run_dir.path / "model.keras")
    return lineage
