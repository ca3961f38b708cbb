"""Which data set a model was trained on, as its files record it, so that
`merge evaluate`, `barrier` and `auto` need no --data for this project's
runs and merges. Reads manifests and .keras metadata only, never weights."""
from __future__ import annotations

from pathlib import Path

from trainer.errors import UsageError

DATA_HINT = "digits, cifar10, synthetic or PATH.npz"


def data_name(entry) -> str | None:
    """The name in a manifest's or record's "data" entry: a run writes
    {"name": ..., "train_samples": ..., "split": ...}, a merge {"name": ...}."""
    if isinstance(entry, dict):
        entry = entry.get("name")
    return entry if isinstance(entry, str) and entry.strip() else None


def common_data(names) -> str | None:
    """The one data set the inputs that record one agree on, else None: a
    merge of clients on different data sets (each its own .npz) records none."""
    found = {n for n in names if n}
    return found.pop() if len(found) == 1 else None


def recorded_data(path) -> str | None:
    """The data set `path` records: a run's or merge's manifest (a
    checkpoint's run directory), or the record of a .keras this project
    wrote. None for files that record none (plain Keras, a `trainer init`)."""
    from trainer.checkpoint import MANIFEST, read_manifest, read_record

    from .models import source_kind
    kind = source_kind(path)
    p = Path(path)
    if kind == "keras":
        record = read_record(p)
    elif kind == "h5":
        return None
    elif kind == "checkpoint":
        run = p.parent.parent
        record = read_manifest(run) if (run / MANIFEST).exists() else {}
    else:
        record = read_manifest(p)
    return data_name(record.get("data"))


def default_data(paths, data: str | None) -> tuple[str, bool]:
    """(data set, whether it came from the inputs' records): `data` when
    given; else the one data set the inputs that record one name. Inputs
    recording none (an init, a plain Keras file) are scored on it too."""
    if data:
        return data, False
    found = {str(p): recorded_data(p) for p in paths}
    names = {d for d in found.values() if d}
    if len(names) == 1:
        return names.pop(), True
    if not names:
        which = ", ".join(found)
        raise UsageError(f"--data is needed: {which} record{'s' if len(found) == 1 else ''} no data set "
                         f"(plain Keras files and `trainer init` directories do not); pass --data NAME "
                         f"({DATA_HINT})")
    listing = "; ".join(f"{p}: {d or 'none'}" for p, d in found.items())
    raise UsageError(f"the inputs record different data sets ({listing}); pass --data NAME to score them "
                     "all on one")


def load_default(name: str, data_dir, recorded: bool):
    """load_dataset, saying where a recorded name came from when it fails
    (a relative .npz path is relative to where the trainer ran)."""
    from trainer.data import load_dataset
    try:
        return load_dataset(name, data_dir)
    except UsageError as e:
        if not recorded:
            raise
        raise UsageError(f"--data defaults to {name}, which the inputs record, but it does not load ({e}); "
                         "pass --data NAME (and --data-dir)") from None
