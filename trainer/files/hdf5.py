"""Open an HDF5 file from another machine only after walking all of it.

HDF5 can point outside itself: an external link opens another file on this
machine, external storage reads a dataset's bytes from named raw files, a
virtual dataset maps other files in. Each would let a file from elsewhere
read (or, through a later write, touch) files here, so all three are
refused. A chunked dataset may declare a shape far beyond the bytes it
stores (unwritten chunks read as the fill value), a memory bomb for the
reader: the logical size must stay within a ratio of the stored size.

h5py reports a damaged file with OSError, RuntimeError, KeyError or
ValueError, from whichever call first touches the damage; every one of them
becomes the same one-line `damaged HDF5` error naming the file.
"""
from __future__ import annotations

from trainer.errors import UsageError, first_line

# Deflate, HDF5's usual filter, compresses at most ~1000:1; a larger ratio
# is not compression but a declared shape the file never stored.
MAX_RATIO = 1100
SMALL = 1 << 20          # below this, any ratio: a tiny dataset is no bomb
MAX_OBJECTS = 200_000    # far above any model's layer count
H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, OverflowError)


def damaged(where: str, e: BaseException, what: str = "") -> UsageError:
    return UsageError(f"{where}: damaged HDF5 ({what}{first_line(e)}); copy the file again from where it was written")


def open_h5(target, where: str):
    """An open, checked h5py.File for `target` (a path or a file object)."""
    import h5py
    try:
        f = h5py.File(target, "r")
    except H5_ERRORS as e:
        raise damaged(where, e) from None
    try:
        check(f, where)
    except BaseException:
        f.close()
        raise
    return f


def check(f, where: str) -> None:
    """UsageError unless every object of `f` stays inside `f`."""
    import h5py
    seen: set[int] = set()
    pending = [f]
    try:
        while pending:
            group = pending.pop()
            for name in group:
                link = group.get(name, getlink=True)
                if isinstance(link, h5py.ExternalLink):
                    raise UsageError(f"{where}: {group.name.rstrip('/')}/{name} is an external link to "
                                     f"{link.filename}; files that reach outside themselves are refused")
                if isinstance(link, h5py.SoftLink):
                    continue  # a path inside this file, reached by the walk anyway
                obj = group[name]
                addr = h5py.h5o.get_info(obj.id).addr
                if addr in seen:
                    continue
                seen.add(addr)
                if len(seen) > MAX_OBJECTS:
                    raise UsageError(f"{where}: more than {MAX_OBJECTS} HDF5 objects; not a model file")
                if isinstance(obj, h5py.Group):
                    pending.append(obj)
                elif isinstance(obj, h5py.Dataset):
                    _check_dataset(obj, where)
    except UsageError:
        raise
    except H5_ERRORS as e:
        raise damaged(where, e) from None


def _check_dataset(ds, where: str) -> None:
    if ds.external:
        raise UsageError(f"{where}: dataset {ds.name} is stored in external files {ds.external[0][0]!r}...; "
                         "files that reach outside themselves are refused")
    if ds.is_virtual:
        raise UsageError(f"{where}: dataset {ds.name} is a virtual dataset mapping other files; refused")
    logical = ds.size * ds.dtype.itemsize
    if logical > SMALL and logical > MAX_RATIO * ds.id.get_storage_size():
        raise UsageError(f"{where}: dataset {ds.name} declares shape {ds.shape} but stores "
                         f"{ds.id.get_storage_size()} bytes; refused as a memory bomb")
