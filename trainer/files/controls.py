"""SCAFFOLD's control variates on disk: `scaffold.h5` beside a client run or a global.

A client run holds its new control variate c_i (group `control`) and what
it changed by, c_i+ - c_i (group `delta`), which the server sums; a global
written by `merge scaffold` holds the server control c (group `control`).
One dataset per trainable weight, keyed as the weights are (`dense1/kernel`).
Attributes say what the file is: kind (client or server), lineage and round
of the global the client trained from (or that the server wrote).

These files cross machines in the by-hand workflow, so a read goes through
the same HDF5 walk as every weight file (trainer.files.hdf5) and checks
every dataset against the shapes the caller expects before reading it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import UsageError

FILE = "scaffold.h5"
GROUPS = {"client": ("control", "delta"), "server": ("control",)}


def path_of(where) -> Path:
    """The control file of a run or global directory, or the file itself."""
    p = Path(where)
    return p / FILE if p.is_dir() else p


def write(where, kind: str, groups: dict[str, dict[str, np.ndarray]], lineage: str | None,
          round_: int | None, **attrs) -> Path:
    """Write `groups` ({group: {key: array}}) to `where`'s scaffold.h5 under a
    temporary name, renamed into place."""
    import h5py

    from ..checkpoint import shared_mode
    target = path_of(where)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({"kind": kind, "lineage": lineage or "", "round": -1 if round_ is None else round_,
                            **attrs})
            for group, arrays in groups.items():
                g = f.create_group(group)
                for key, value in arrays.items():
                    g.create_dataset(key, data=np.asarray(value, np.float32))
        os.chmod(tmp, shared_mode(0o666))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read(where, kind: str, shapes: dict[str, tuple], what: str) -> tuple[dict, dict]:
    """({group: {key: float32 array}}, attrs) of a `kind` control file, every
    key of `shapes` present with that shape, nothing else, all finite."""
    from .hdf5 import H5_ERRORS, damaged, open_h5
    path = path_of(where)
    if not path.is_file():
        raise UsageError(f"{what} {where}: no {FILE}; it was not written by a SCAFFOLD client "
                         "(`python -m trainer --scaffold`) or by `python -m merge scaffold`")
    f = open_h5(path, f"{what} {path}")
    try:
        attrs = _attrs(f, path, what)
        if attrs["kind"] != kind:
            raise UsageError(f"{what} {path}: holds a {attrs['kind']} control variate, not a {kind} one")
        out = {}
        for group in GROUPS[kind]:
            if group not in f or not hasattr(f[group], "keys"):
                raise UsageError(f"{what} {path}: group {group!r} is missing; the file is incomplete")
            g = f[group]
            found = keys_of(g)
            if set(found) != set(shapes):
                extra = sorted(set(found) - set(shapes))
                missing = sorted(set(shapes) - set(found))
                raise UsageError(f"{what} {path}: its {group} variates do not fit this model "
                                 f"({'missing ' + missing[0] if missing else 'unknown ' + extra[0]})")
            arrays = {}
            for key, shape in shapes.items():
                ds = g[key]
                if tuple(ds.shape) != tuple(shape) or ds.dtype.kind != "f":
                    raise UsageError(f"{what} {path}: {group}/{key} is {ds.dtype} {tuple(ds.shape)}, "
                                     f"the model's weight is float {tuple(shape)}")
                value = np.asarray(ds[()], np.float32)
                if not np.all(np.isfinite(value)):
                    raise UsageError(f"{what} {path}: {group}/{key} holds NaN or Inf")
                arrays[key] = value
            out[group] = arrays
        return out, attrs
    except H5_ERRORS as e:
        raise damaged(f"{what} {path}", e) from None
    finally:
        f.close()


def keys_of(group, prefix: str = "") -> list[str]:
    # Keys hold "/" (dense1/kernel), which h5py stores as nested groups.
    out = []
    for name, obj in group.items():
        if hasattr(obj, "keys"):
            out.extend(keys_of(obj, f"{prefix}{name}/"))
        else:
            out.append(prefix + name)
    return out


def _attrs(f, path, what: str) -> dict:
    def get(name, types):
        value = f.attrs.get(name)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, types) or isinstance(value, bool):
            raise UsageError(f"{what} {path}: attribute {name!r} is missing or not a "
                             f"{'string' if types is str else 'number'}; not a control file of this project")
        return value
    kind = get("kind", str)
    if kind not in GROUPS:
        raise UsageError(f"{what} {path}: kind {kind[:40]!r} is neither client nor server")
    round_ = get("round", int)
    return {"kind": kind, "lineage": get("lineage", str)[:200] or None,
            "round": None if round_ < 0 else round_,
            **{k: get(k, int) for k in ("clients", "steps") if k in f.attrs}}
