"""Shared starting points: `python -m trainer init`, `--init`, and merges as the next round's start.

Two machines that start from the same init directory share a lineage, which
is what later lets `merge fedavg` average their weights.
"""
from __future__ import annotations

from pathlib import Path

from . import checkpoint as ck
from .errors import UsageError


def read_init(path) -> dict:
    """What an init source records, where it has it: model config, lineage,
    kind (init, run, merge) and round."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--init {path}: no such file or directory")
    if p.is_dir():
        return _recorded(ck.read_manifest(p))
    if p.suffix == ".keras":
        from .files.archive import read_keras
        archive = read_keras(p, weights=False)
        if is_ensemble(archive.config):
            # Its members' weights would be matched to the model by name,
            # and one member's copied: a run from an arbitrary member.
            raise UsageError(f"--init {path}: an ensemble (`python -m merge ensemble`) combines several models "
                             "and cannot be trained from; pass one of its members (a run directory or "
                             ".keras) instead")
        # Written by `trainer` or `merge`, it carries its manifest's record;
        # saved by Keras alone, nothing.
        return _recorded(archive.recorded)
    if p.suffix == ".h5":
        return _recorded({})
    raise UsageError(f"--init {path}: expected an init or run directory, a .keras or a .weights.h5 file")


def is_ensemble(config: dict) -> bool:
    """A .keras config of `merge ensemble`'s model (merge.layers.Ensemble)."""
    return config.get("registered_name") == "merge>Ensemble" or (
        config.get("class_name") == "Ensemble" and str(config.get("module", "")).startswith("merge"))


def _recorded(record: dict) -> dict:
    return {"model": record.get("model"), "lineage": record.get("lineage"), "kind": record.get("kind"),
            "round": ck.round_of(record)}


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
    except UsageError as e:
        hint = _registry_name(path)
        if hint and hint != model.name:
            raise UsageError(f"{e}; it was saved from model {hint}: pass --model {hint}") from None
        raise
    finally:
        src.close()


def _registry_name(path) -> str | None:
    """The registry model a plain Keras .keras was built as (the registry
    names its models so), to suggest as --model; the file decides nothing."""
    from .files.archive import read_keras
    from .models import MODELS
    if Path(path).suffix != ".keras":
        return None
    try:
        name = read_keras(path, weights=False).config.get("config", {}).get("name")
    except (UsageError, AttributeError):
        return None
    return name if name in MODELS else None


def check_lineage(model, path, kind: str | None, lineage: str | None) -> None:
    """Refuse an init whose weights are not those its lineage was taken of.

    Only an init (`trainer init`, kind "init") records the hash of the very
    weights it holds. A run records the lineage of the init it started from,
    and a merge carries its inputs' lineage forward, so that the next round
    can be averaged with the others: their own weights never hash to it, and
    re-hashing them would refuse every federated round. An init whose weights
    were edited but whose manifest was kept would hand every client a lineage
    that vouches for weights nobody hashed: merges of unrelated models would
    pass the lineage check. `kind` and `lineage` are what read_init found."""
    if kind != "init" or not lineage:
        return
    if not ck.lineage_matches(model.weights, lineage):
        raise UsageError(f"--init {path}: its weights do not match the lineage it records "
                         f"({lineage[:19]}...); they were changed after `trainer init` wrote them. "
                         "Start from an unmodified init, or write a new one with `python -m trainer init`")


def write_init(out, model, model_cfg: dict) -> str:
    """An init directory: one checkpoint of the weights, a manifest, a .keras copy."""
    run_dir = ck.RunDir(out, keep=1)
    if run_dir.exists():
        raise UsageError(f"--out {out} already exists; choose another directory")
    lineage = ck.fingerprint(model.weights)
    manifest = {"kind": "init", "model": model_cfg, "lineage": lineage, "round": 0,
                "versions": ck.package_versions(), "step": 0, "samples_seen": 0}
    run_dir.write_manifest(manifest)
    run_dir.save(ck.state_checkpoint(model), {"epoch": 0, "offset": 0, "step": 0, "samples_seen": 0}, {})
    ck.export_keras(model, run_dir.path / "model.keras", record=manifest)
    return lineage
