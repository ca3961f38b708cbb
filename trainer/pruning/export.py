"""Export a (pruned) model: a compressed sparse artifact, and a SavedModel for serving.

The sparse artifact is ONE ``.npz`` file (``np.savez_compressed``) that holds no
pickled object, so it is loaded with ``np.load(path, allow_pickle=False)``:

``format``          uint8 bytes of ``FORMAT`` ("dptoolkit-sparse/2")
``architecture``    uint8 bytes of ``model.to_json()``
``index``           uint8 bytes of a JSON list, one entry per weight, in
                    ``model.weights`` order::

                        {"name": "conv1/kernel", "shape": [5, 5, 3, 64],
                         "dtype": "float32", "nonzeros": 480, "encoding": "gaps"}

``w0000_values``    the weight's nonzero entries, in row-major (C) order, in the
                    weight's dtype (a dtype numpy does not know natively, such
                    as bfloat16, as the unsigned integer of its bits), stored
                    as byte planes: uint8 of shape (itemsize, nonzeros)

and where the nonzeros are, in one of two encodings, whichever is smaller raw:

``"bitmap"``        ``w0000_bitmap``: ``np.packbits`` of the flat nonzero mask
                    (``ceil(size / 8)`` bytes; padding bits are 0)
``"gaps"``          ``w0000_gaps``: uint8, per nonzero the number of zeros since
                    the previous nonzero (or the start); 255 is an escape whose
                    real gap is the next entry of ``w0000_escapes`` (unsigned)

A bitmap costs one bit per entry; gaps cost about a byte per nonzero, so the
gaps win once fewer than 1 entry in 8 is nonzero, and the file then scales with
the number of nonzeros.

"Nonzero" means "some bit is set": -0.0 and NaNs are kept as values, so a
round trip restores every weight bitwise.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from trainer.checkpoint import atomic_write, shared_tempdir
from trainer.errors import UsageError

__all__ = ["FORMAT", "save_sparse", "load_sparse", "export_savedmodel"]

FORMAT = "dptoolkit-sparse/2"
_ESCAPE = 255
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


# --------------------------------------------------------------------------
# Encoding one tensor
# --------------------------------------------------------------------------


def _bits(flat: np.ndarray) -> np.ndarray:
    """The flat array viewed as unsigned integers of the same width."""
    return flat.view(_UINT[flat.dtype.itemsize])


def _encode(key: str, value: np.ndarray) -> tuple[dict, dict]:
    """(index entry fields, arrays) of one weight."""
    flat = np.ascontiguousarray(value).reshape(-1)
    if flat.dtype.kind not in "biufcV" or flat.dtype.itemsize not in _UINT:
        raise UsageError(f"cannot export a weight of dtype {flat.dtype}: only numeric weights are supported")
    bits = _bits(flat)
    mask = bits != 0
    # A dtype numpy knows (float32, int64, ...) is stored as itself; another
    # one (bfloat16, float8, ...) as its bits, which np.load reads without pickle.
    values = flat[mask] if flat.dtype.isbuiltin == 1 else bits[mask]
    # Byte planes (as HDF5's shuffle filter): the sign/exponent bytes of
    # trained weights repeat a lot, and deflate finds that only when they sit
    # together; about 15% smaller for float32 kernels, and still exact.
    planes = np.ascontiguousarray(values).view(np.uint8).reshape(-1, values.dtype.itemsize).T
    arrays = {f"{key}_values": np.ascontiguousarray(planes)}
    positions = np.flatnonzero(mask)
    gaps = np.diff(positions, prepend=-1) - 1
    escaped = gaps >= _ESCAPE
    escapes = gaps[escaped]
    escape_dtype = np.uint16 if escapes.size == 0 or escapes.max() <= 0xFFFF else (
        np.uint32 if escapes.max() <= 0xFFFFFFFF else np.uint64)
    gap_bytes = positions.size + escapes.size * np.dtype(escape_dtype).itemsize
    if gap_bytes < (flat.size + 7) // 8:
        encoding = "gaps"
        arrays[f"{key}_gaps"] = np.where(escaped, _ESCAPE, gaps).astype(np.uint8)
        arrays[f"{key}_escapes"] = escapes.astype(escape_dtype)
    else:
        encoding = "bitmap"
        arrays[f"{key}_bitmap"] = np.packbits(mask)
    return {"nonzeros": int(positions.size), "encoding": encoding, "values": "byteplanes"}, arrays


def _decode(path, name: str, key: str, entry: dict, data: dict, dtype: np.dtype) -> np.ndarray:
    """The dense weight, exactly as saved; UsageError if the arrays are inconsistent."""

    def bad(problem):
        return UsageError(
            f"{path}: corrupt sparse artifact: tensor {name!r} {problem}; re-export the model"
        )

    def array(suffix):
        try:
            return data[f"{key}_{suffix}"]
        except KeyError:
            raise bad(f"has no {suffix} array") from None

    shape = tuple(entry["shape"])
    size = int(np.prod(shape, dtype=np.int64))
    nonzeros = entry.get("nonzeros")
    if not isinstance(nonzeros, int) or not 0 <= nonzeros <= size:
        raise bad(f"has an invalid nonzero count {nonzeros!r}")
    stored = dtype if dtype.isbuiltin == 1 else np.dtype(_UINT[dtype.itemsize])
    planes = array("values")
    if entry.get("values") != "byteplanes" or planes.dtype != np.uint8 or planes.shape != (stored.itemsize, nonzeros):
        raise bad(f"has values of shape {planes.shape} and dtype {planes.dtype}, expected byte planes "
                  f"({stored.itemsize}, {nonzeros}) of uint8")
    values = np.ascontiguousarray(planes.T).view(stored).reshape(nonzeros)

    encoding = entry.get("encoding")
    if encoding == "bitmap":
        bitmap = array("bitmap")
        if bitmap.dtype != np.uint8 or bitmap.shape != ((size + 7) // 8,):
            raise bad(f"has a bitmap of shape {bitmap.shape}, expected ({(size + 7) // 8},)")
        unpacked = np.unpackbits(bitmap).astype(bool)
        mask = unpacked[:size]
        if unpacked[size:].any() or int(np.count_nonzero(mask)) != nonzeros:
            raise bad("has a bitmap that does not match its nonzero count")
        positions = np.flatnonzero(mask)
    elif encoding == "gaps":
        gaps, escapes = array("gaps"), array("escapes")
        if gaps.dtype != np.uint8 or gaps.shape != (nonzeros,):
            raise bad(f"has gaps of shape {gaps.shape} and dtype {gaps.dtype}, expected ({nonzeros},) uint8")
        escaped = gaps == _ESCAPE
        if escapes.dtype.kind != "u" or escapes.shape != (int(np.count_nonzero(escaped)),):
            raise bad("has escapes that do not match its gaps")
        steps = gaps.astype(np.uint64)
        steps[escaped] = escapes.astype(np.uint64)
        if steps.size and steps.max() >= size:
            raise bad("has a gap past its end")
        positions = np.cumsum(steps + 1, dtype=np.uint64) - 1 if steps.size else steps
        if positions.size and positions[-1] >= size:
            raise bad("has a nonzero past its end")
        positions = positions.astype(np.int64)
    else:
        raise bad(f"has an unknown encoding {encoding!r}")

    flat = np.zeros(size, dtype=stored)
    flat[positions] = values
    return flat.view(dtype).reshape(shape)


# --------------------------------------------------------------------------
# save_sparse / load_sparse
# --------------------------------------------------------------------------


def _text(data: str) -> np.ndarray:
    return np.frombuffer(data.encode("utf-8"), dtype=np.uint8)


def _has_python_lambda(config) -> bool:
    # Keras 2 marks a serialized Python lambda with function_type "lambda",
    # Keras 3 with class_name "__lambda__"; either holds bytecode.
    if isinstance(config, dict):
        if config.get("function_type") == "lambda" or config.get("class_name") == "__lambda__":
            return True
        return any(_has_python_lambda(v) for v in config.values())
    if isinstance(config, list):
        return any(_has_python_lambda(v) for v in config)
    return False


def _named_weights(model) -> dict:
    from trainer.varnames import keyed
    return keyed(model.weights)


def _dtype(variable) -> np.dtype:
    # Keras 3 gives a variable's dtype as a string ("float32", "bfloat16").
    import keras
    return np.dtype(keras.backend.standardize_dtype(variable.dtype))


def save_sparse(model, path) -> dict:
    """Write ``model`` (architecture and weights) as a compressed sparse ``.npz``.

    The file is written under a temporary name in the same directory, then
    renamed. Returns ``{"bytes": file size, "nonzeros": ..., "params": ...}``.
    """
    path = Path(path)
    try:
        architecture = model.to_json()
    except (NotImplementedError, TypeError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise UsageError(
            f"model {model.name!r} cannot be described as JSON ({type(exc).__name__}: {detail}): "
            "export a functional or Sequential model whose custom layers implement get_config"
        ) from None
    if _has_python_lambda(json.loads(architecture)):
        raise UsageError(
            f"model {model.name!r} has a Lambda layer with a Python lambda, which is never "
            "loaded back (it would run stored bytecode): use a registered custom layer instead"
        )
    arrays = {"format": _text(FORMAT), "architecture": _text(architecture)}
    index = []
    params = nonzeros = 0
    for i, (name, weight) in enumerate(_named_weights(model).items()):
        value = np.asarray(weight.numpy())
        key = f"w{i:04d}"
        entry = {"name": name, "shape": list(value.shape), "dtype": value.dtype.name}
        fields, weight_arrays = _encode(key, value)
        entry.update(fields)
        index.append(entry)
        arrays.update(weight_arrays)
        params += int(value.size)
        nonzeros += fields["nonzeros"]
    arrays["index"] = _text(json.dumps(index))

    if not path.parent.is_dir():
        raise UsageError(f"{path}: directory {path.parent} does not exist; create it first")
    # A file object, not a name: np.savez would append ".npz" to a name.
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
    return {"bytes": path.stat().st_size, "nonzeros": nonzeros, "params": params}


_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, MemoryError, zipfile.BadZipFile, zlib.error)


def _read_arrays(path: Path) -> dict:
    """Every array of the .npz, read eagerly and never unpickled."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a plain .npy array
            raise UsageError(f"{path}: an .npy array, not a sparse artifact (.npz); re-export the model")
        with loaded as npz:
            return {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; give the path of a sparse artifact (.npz)") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a sparse artifact (.npz)") from None
    except _READ_ERRORS as exc:
        detail = " ".join(str(exc).split())[:200]
        raise UsageError(
            f"{path}: not a readable sparse artifact (truncated, corrupt or not an .npz: "
            f"{type(exc).__name__}: {detail}); re-export the model"
        ) from None


def _json_text(path: Path, data: dict, key: str):
    try:
        array = data[key]
    except KeyError:
        raise UsageError(f"{path}: not a sparse artifact ({key!r} is missing); re-export the model") from None
    if array.dtype != np.uint8 or array.ndim != 1:
        raise UsageError(f"{path}: corrupt sparse artifact ({key!r} is not a byte array); re-export the model")
    try:
        return array.tobytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: corrupt sparse artifact ({key!r} is not UTF-8); re-export the model") from None


def load_sparse(path):
    """Rebuild the model saved by ``save_sparse`` and restore its weights exactly.

    Raises UsageError naming the file (and the tensor) if the file is missing,
    truncated, corrupt, or does not match its architecture.
    """
    import trainer.models  # noqa: F401  (registers the custom layers)
    from trainer.models import LocalResponseNormalization

    path = Path(path)
    data = _read_arrays(path)
    tag = _json_text(path, data, "format")
    if tag != FORMAT:
        raise UsageError(f"{path}: format {tag[:60]!r}, expected {FORMAT!r}; re-export the model")
    architecture = _json_text(path, data, "architecture")
    try:
        index = json.loads(_json_text(path, data, "index"))
        if not isinstance(index, list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str)
            and isinstance(e.get("shape"), list) and all(isinstance(d, int) and d >= 0 for d in e["shape"])
            for e in index
        ):
            raise ValueError("unexpected structure")
    except ValueError as exc:
        raise UsageError(f"{path}: corrupt sparse artifact (bad weight index: {exc}); re-export the model") from None

    import keras
    from keras.src.saving.serialization_lib import SafeModeScope
    try:
        with SafeModeScope(True):  # never deserialize Lambda bytecode
            model = keras.models.model_from_json(
                architecture,
                custom_objects={"LocalResponseNormalization": LocalResponseNormalization},
            )
    except Exception as exc:  # unknown layer, bad JSON, Lambda bytecode, ...
        detail = " ".join(str(exc).split())[:300]
        raise UsageError(
            f"{path}: cannot rebuild the model from its architecture ({type(exc).__name__}: {detail}); "
            "import the module that registers its custom layers, or re-export the model"
        ) from None

    variables = _named_weights(model)
    stored = {e["name"]: (f"w{i:04d}", e) for i, e in enumerate(index)}
    missing = [name for name in variables if name not in stored]
    if missing:
        raise UsageError(f"{path}: tensor {missing[0]!r} is missing from the artifact; re-export the model")
    extra = [name for name in stored if name not in variables]
    if extra or len(stored) != len(index):
        name = extra[0] if extra else "(duplicate)"
        raise UsageError(
            f"{path}: tensor {name!r} in the artifact is not a weight of the rebuilt model; re-export the model"
        )
    values = []
    for name, variable in variables.items():
        key, entry = stored[name]
        shape = tuple(entry["shape"])
        if shape != tuple(variable.shape):
            raise UsageError(
                f"{path}: tensor {name!r} has shape {shape} but the model needs {tuple(variable.shape)}; "
                "re-export the model"
            )
        if entry.get("dtype") != _dtype(variable).name:
            raise UsageError(
                f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r} but the model needs "
                f"{_dtype(variable).name!r}; re-export the model"
            )
        values.append((variable, _decode(path, name, key, entry, data, _dtype(variable))))
    for variable, value in values:  # assign only once every tensor decoded
        variable.assign(value)
    return model


# --------------------------------------------------------------------------
# SavedModel
# --------------------------------------------------------------------------


def export_savedmodel(model, path) -> None:
    """Write a SavedModel for serving (``model.export``: a ``serving_default``
    signature) to a temporary directory next to ``path``, then rename it to
    ``path``, replacing an existing SavedModel directory there.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path}: exists and is not a directory; remove it or choose another path")
    if not path.parent.is_dir():
        raise UsageError(f"{path}: directory {path.parent} does not exist; create it first")
    tmp = shared_tempdir(path.parent, path.name)
    old = None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # Keras prints the temporary name
            model.export(str(tmp))
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rename(path, old / "previous")
        os.rename(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.rename(old / "previous", path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
