"""Run directories: atomic checkpoints, a JSON manifest, and lineage.

Layout of a run directory:
    manifest.json                 what was trained, on what, from which init; latest checkpoint
    checkpoints/ckpt-00000042/    state.index + state.data-* (tf.train.Checkpoint) + meta.json
    model.keras                   the final model
    tb/                           TensorBoard logs
    history.csv, curves.png       per-epoch metrics

Every file is written under a temporary name and renamed, and the manifest
is renamed last, so a crash while saving leaves the previous checkpoint and
the manifest that points at it intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np

from .errors import UsageError, first_line

MANIFEST = "manifest.json"
FORMAT = "dptoolkit-run/1"
# What a .keras file carries of its run's or merge's manifest, in
# metadata.json under RECORD_KEY: a file copied alone to another machine
# still says where it comes from, and merge and --init read it.
RECORD_KEY = "dptoolkit"
RECORDED = ("kind", "lineage", "round", "samples_seen", "model", "data")
JSON_CAP = 16 << 20
_CKPT = re.compile(r"ckpt-\d{1,12}")
META_COUNTS = ("epoch", "offset", "step", "samples_seen")
_PACKAGES = ("tensorflow", "keras", "horovod", "numpy", "scikit-learn", "mpi4py", "h5py")


def package_versions() -> dict:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def fingerprint(variables) -> str:
    """A hash of the weights, by name, independent of their order in the model.

    Taken of the initial weights it is the run's lineage: two runs that share
    it started from the same initialization and may be averaged.
    """
    from .varnames import keyed
    return fingerprint_arrays((k, np.asarray(v.numpy())) for k, v in keyed(variables).items())


def fingerprint_arrays(named_arrays) -> str:
    h = hashlib.sha256()
    for name, value in sorted(named_arrays, key=lambda item: item[0]):
        a = np.ascontiguousarray(value)
        h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def lineage_matches(variables, lineage: str) -> bool:
    """Whether `lineage` is the fingerprint of these very weights. The TF 2.15
    version hashed Keras 2's variable names (`dense1/kernel:0`); its inits are
    still valid --init sources, so its recipe counts too."""
    from .varnames import keyed
    arrays = [(k, np.asarray(v.numpy())) for k, v in keyed(variables).items()]
    return lineage in (fingerprint_arrays(arrays), fingerprint_arrays((k + ":0", a) for k, a in arrays))


def round_of(record: dict) -> int | None:
    """The federated round of a manifest or .keras record: an init is round 0
    (also one written before rounds were recorded), a run has its init's
    round, a merge one more than its newest input. None: not recorded."""
    r = record.get("round")
    if is_count(r):
        return r
    return 0 if record.get("kind") == "init" else None


def shared_mode(mode: int) -> int:
    """`mode` (0o666 for a file, 0o777 for a directory) under this process's
    umask, what open() and mkdir() give: mkstemp and mkdtemp create 0600 and
    0700 whatever the umask, which would hide an output from colleagues."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def shared_tempdir(parent: Path, name: str, suffix: str = ".tmp") -> Path:
    """A new hidden directory in `parent`, to fill and rename into place,
    with the permissions mkdir() would give it (see shared_mode)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=suffix, dir=parent))
    os.chmod(tmp, shared_mode(0o777))
    return tmp


def atomic_write(path: Path, write) -> None:
    """`write(f)` into a temporary file beside `path`, then rename over it:
    readers see the old file or the whole new one, never a part. The file
    gets the permissions open() would give it (see shared_mode)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), shared_mode(0o666))
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path, what: str, cap: int = JSON_CAP):
    """A small JSON file, read at most `cap` bytes: run directories come from
    other machines, and a manifest is never megabytes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(cap + 1)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise UsageError(f"{path}: unreadable {what} ({e.strerror or e})") from None
    if len(raw) > cap:
        raise UsageError(f"{path}: a {what} over {cap >> 20} MiB; refused, it is not one this project wrote")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UsageError(f"{path}: corrupt {what} ({first_line(e)}); restore it or write it again") from None


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST
    try:
        manifest = read_json(path, "manifest")
    except FileNotFoundError:
        raise UsageError(f"{run_dir}: no {MANIFEST}; not a run or init directory") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UsageError(f"{path}: not a {FORMAT} manifest")
    latest = manifest.get("latest")
    # The name is joined to a path: nothing but a checkpoint of this run.
    if latest is not None and not (isinstance(latest, str) and _CKPT.fullmatch(latest)):
        raise UsageError(f"{path}: 'latest' is {str(latest)[:60]!r}, not a checkpoint name like ckpt-00000042")
    for key in ("lineage", "kind", "init"):
        if manifest.get(key) is not None and not isinstance(manifest[key], str):
            raise UsageError(f"{path}: '{key}' is a {type(manifest[key]).__name__}, not a string")
    if manifest.get("model") is not None and not isinstance(manifest["model"], dict):
        raise UsageError(f"{path}: 'model' is a {type(manifest['model']).__name__}, not an object")
    for key in ("step", "samples_seen", "epoch", "round"):
        if manifest.get(key) is not None and not is_count(manifest[key]):
            raise UsageError(f"{path}: '{key}' is {str(manifest[key])[:40]!r}, not a count")
    return manifest


def is_count(v) -> bool:
    """A non-negative int read from a file (JSON's true is no count)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62


class RunDir:
    """The chief's handle on a run directory. Other ranks never create one."""

    def __init__(self, path, keep: int = 3):
        self.path = Path(path)
        self.keep = max(1, keep)
        self.ckpt_root = self.path / "checkpoints"

    def exists(self) -> bool:
        return (self.path / MANIFEST).exists()

    def manifest(self) -> dict:
        return read_manifest(self.path)

    def write_manifest(self, manifest: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / MANIFEST, {**manifest, "format": FORMAT})

    def save(self, checkpoint, meta: dict, manifest_update: dict) -> str:
        """Write one checkpoint, point the manifest at it, drop the oldest."""
        self.ckpt_root.mkdir(parents=True, exist_ok=True)
        name = f"ckpt-{meta['step']:08d}"
        final = self.ckpt_root / name
        tmp = shared_tempdir(self.ckpt_root, name)
        try:
            checkpoint.write(str(tmp / "state"))
            atomic_write_json(tmp / "meta.json", meta)
            if final.exists():  # the same step saved again (e.g. end of epoch == max-steps)
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        manifest = self.manifest() if self.exists() else {}
        kept = [c for c in manifest.get("checkpoints", []) if c != name] + [name]
        manifest.update(manifest_update, latest=name, checkpoints=kept[-self.keep:])
        self.write_manifest(manifest)
        for old in kept[:-self.keep]:
            shutil.rmtree(self.ckpt_root / old, ignore_errors=True)
        return name

    def latest(self) -> tuple[str, dict]:
        """(checkpoint prefix, meta) of the newest complete checkpoint."""
        return checkpoint_of(self.path)

    def clean_partial(self) -> None:
        """Remove temporaries a crashed save left behind."""
        if self.ckpt_root.exists():
            for p in self.ckpt_root.glob(".ckpt-*.tmp"):
                shutil.rmtree(p, ignore_errors=True)


def keyed_module(variables, name: str):
    """A tf.Module holding `variables` under their keys (varnames.keys), or
    under the keys of a {key: variable} dict.


    A Keras 3 model is not a tf.train.Checkpoint dependency graph of its
    layers (it tracks its variables only through the optimizer), so the
    checkpoint names every variable itself: `model/vars/dense1.Skernel`, with
    the object graph's full_name `dense1/kernel`, the same name a Keras 2
    checkpoint gave it. Readers (merge, --init) go by that name.
    """
    import tensorflow as tf

    from .varnames import keyed, tf_variable
    module = tf.Module(name=name)
    named = variables if isinstance(variables, dict) else keyed(variables)
    module.vars = {k: tf_variable(v) for k, v in named.items()}
    return module


def state_checkpoint(model, optimizer=None, **extra):
    """The trainer's tf.train.Checkpoint: model weights, optimizer state
    (slots and step counter) and whatever else the run keeps (`extra`:
    section -> {key of the weight it belongs to: variable}: pruning masks,
    frozen values, FedProx anchors)."""
    import tensorflow as tf
    parts = {"model": keyed_module(model.weights, "model")}
    if optimizer is not None:
        parts["optimizer"] = keyed_module(optimizer.variables, "optimizer")
    for name, variables in extra.items():
        parts[name] = keyed_module(variables, name)
    return tf.train.Checkpoint(**parts)


def checkpoint_of(run_dir) -> tuple[str, dict]:
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    name = manifest.get("latest")
    if not name:
        raise UsageError(f"{run_dir}: the manifest names no checkpoint yet")
    ckpt = run_dir / "checkpoints" / name
    if not (ckpt / "state.index").exists():
        raise UsageError(f"{ckpt}: checkpoint named by the manifest is missing")
    try:
        meta = read_json(ckpt / "meta.json", "checkpoint meta.json")
    except FileNotFoundError:
        meta = None
    if not isinstance(meta, dict) or not all(is_count(meta[k]) for k in META_COUNTS if k in meta):
        raise UsageError(f"{ckpt / 'meta.json'}: missing, or its counts ({', '.join(META_COUNTS)}) are not "
                         "integers; the checkpoint is damaged, restore it or pick an earlier one")
    return str(ckpt / "state"), meta


def export_keras(model, path, record: dict | None = None) -> None:
    """model.save under a temporary .keras name, then rename; `record` (see
    RECORDED) goes into the archive's metadata.json."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
    try:
        model.save(tmp)
        if record is not None:
            _add_record(tmp, {k: record.get(k) for k in RECORDED})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_record(path) -> dict:
    """The RECORD_KEY entry of a .keras file's metadata.json; {} for a file
    Keras wrote alone. The archive's members, sizes and config are checked
    first (trainer.files.archive): a damaged or hostile one is a UsageError.
    Its weights are walked when they are read, not here."""
    from .files.archive import read_keras
    return read_keras(path, weights=False).recorded


def _add_record(archive: Path, record: dict) -> None:
    """Keras offers no way to add a metadata key, and ignores one it does not
    know when loading, so the archive is copied with metadata.json amended;
    every other member keeps its bytes and its compression."""
    amended = archive.with_name(f"{archive.stem}.record.keras")
    try:
        with zipfile.ZipFile(archive) as src, zipfile.ZipFile(amended, "w", allowZip64=True) as dst:
            names = src.namelist()
            for info in src.infolist():
                copy = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                copy.compress_type, copy.external_attr = info.compress_type, info.external_attr
                if info.filename == "metadata.json":
                    dst.writestr(copy, json.dumps({**json.loads(src.read(info)), RECORD_KEY: record}))
                    continue
                copy.file_size = info.file_size  # a member above 2 GiB is written as ZIP64
                with src.open(info) as fin, dst.open(copy, "w") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
            if "metadata.json" not in names:
                dst.writestr("metadata.json", json.dumps({RECORD_KEY: record}))
        os.replace(amended, archive)
    finally:
        amended.unlink(missing_ok=True)
