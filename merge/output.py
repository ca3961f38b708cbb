"""Where a merge goes: a .keras file, or a directory a trainer can start from.

A directory holds manifest.json (lineage, round, summed samples, the inputs), the
Keras config and weights as a .keras file holds them unzipped (config.json,
model.weights.h5: loadable with model.load_weights), and masks.h5 when the
inputs were pruned. Everything is written under a temporary name beside the
output and renamed at the end: a failed merge leaves nothing behind.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np

from trainer.checkpoint import FORMAT, RECORD_KEY, RECORDED, shared_tempdir
from trainer.errors import UsageError

from trainer.files.naming import KerasNames


def _keras_version() -> str:
    # From the package metadata: importing Keras would import TensorFlow,
    # which a merge of .keras files does without.
    from importlib import metadata
    try:
        return metadata.version("keras")
    except metadata.PackageNotFoundError:
        return "3"


def check_output(out, inputs, overwrite: bool) -> Path:
    out = Path(out)
    resolved = out.resolve()
    for path in inputs:
        p = Path(path).resolve()
        if p == resolved:
            raise UsageError(f"-o {out} is also an input; write the merge somewhere else")
        if resolved in p.parents:  # replacing the directory would delete the input
            raise UsageError(f"-o {out} contains the input {path}; write the merge somewhere else")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise UsageError(f"-o {out} already exists; pass --overwrite to replace it or choose another path")
    if not out.parent.exists():
        raise UsageError(f"-o {out}: directory {out.parent} does not exist")
    return out


class WeightsWriter:
    """Streams tensors into a Keras v3 weights file, then commits atomically."""

    def __init__(self, out, config: dict):
        self.out = Path(out)
        self.config = {k: v for k, v in config.items() if k != "compile_config"}  # optimizer dropped
        self.names = KerasNames(self.config)
        self.tmp = shared_tempdir(self.out.parent, self.out.name)
        self.h5 = h5py.File(self.tmp / "model.weights.h5", "w")
        for group in self.names.groups():
            self.h5.require_group(group)
        self.masks = None

    def reserve(self, nbytes: int) -> None:
        """Allocate the weights' disk blocks up front. Writing a new file block
        by block cost ext4 here about 10x the copy itself (400 MB/s against
        4+ GB/s into allocated blocks). Only the tensors' bytes are reserved:
        the file ends up larger by its metadata, so nothing is left over."""
        _preallocate(self.tmp / "model.weights.h5", nbytes)

    def create(self, key: str, shape, dtype):
        try:
            path = self.names.h5_path(key)
        except KeyError:
            raise UsageError(f"tensor {key} has no place in the output's architecture") from None
        return self.h5.create_dataset(path, shape=shape, dtype=dtype)

    def write_mask(self, key: str, keep: np.ndarray, rows=None) -> None:
        if self.masks is None:
            self.masks = h5py.File(self.tmp / "masks.h5", "w")
        name = key.replace("/", "|")
        if name not in self.masks:
            self.masks.create_dataset(name, shape=self._shape_of(key), dtype=np.uint8)
        self.masks[name][() if rows is None else rows] = keep.astype(np.uint8)

    def _shape_of(self, key):
        return self.h5[self.names.h5_path(key)].shape

    def stage(self, manifest: dict) -> Path:
        """Close the weights and complete the temporary directory, which is
        then a merge directory that can be loaded (for --data) but is not yet
        in place."""
        for f in (self.h5, self.masks):
            if f is not None and f.id.valid:
                f.close()
        (self.tmp / "config.json").write_text(json.dumps(self.config))
        (self.tmp / "manifest.json").write_text(json.dumps({**manifest, "format": FORMAT}, indent=2,
                                                            sort_keys=True) + "\n")
        return self.tmp

    def commit(self, manifest: dict, overwrite: bool) -> None:
        self.stage(manifest)
        final = self._zip(manifest) if self.out.suffix == ".keras" else self.tmp
        _replace(final, self.out, overwrite)
        if final != self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def abort(self) -> None:
        for f in (self.h5, self.masks):
            try:
                if f is not None and f.id.valid:
                    f.close()
            except Exception:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _zip(self, manifest: dict) -> Path:
        """The same three members, stored uncompressed, as Keras's own save.
        Keras ignores extra metadata keys; ours carry the lineage and round,
        so that a .keras merge is as good an --init (and merge input) as a
        directory."""
        zipped = self.tmp / "out.keras"
        metadata = {"keras_version": _keras_version(),
                    "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
                    RECORD_KEY: {k: manifest.get(k) for k in RECORDED}}
        with zipfile.ZipFile(zipped, "w", allowZip64=True) as zf:
            _preallocate(zipped, (self.tmp / "model.weights.h5").stat().st_size)
            zf.writestr("metadata.json", json.dumps(metadata))
            zf.writestr("config.json", json.dumps(self.config))
            # zf.write copies in 8 KiB pieces (Python 3.11): 1.6 s per GiB
            # here, against 0.7 s in 1 MiB pieces.
            weights = self.tmp / "model.weights.h5"
            info = zipfile.ZipInfo("model.weights.h5", date_time=time.localtime()[:6])
            info.file_size = weights.stat().st_size
            with open(weights, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        return zipped


def _preallocate(path: Path, nbytes: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError:
        pass  # a file system without fallocate: the same bytes, only slower
    finally:
        os.close(fd)


def _replace(new: Path, out: Path, overwrite: bool) -> None:
    """Rename into place. An existing directory is moved aside first, since a
    rename cannot replace a non-empty directory."""
    if out.is_dir() and not out.is_symlink():
        if not overwrite:
            raise UsageError(f"-o {out} already exists; pass --overwrite to replace it")
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rename(out, aside / out.name)
        os.rename(new, out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(new, out)
