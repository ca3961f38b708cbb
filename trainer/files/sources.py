"""Open any input a user may hand to merge, and read it one tensor at a time.

Formats: trainer run/init/merge directories and their checkpoint directories,
.keras files, Keras v3 .weights.h5, legacy Keras .h5, and TensorFlow checkpoint
prefixes. Files are recognized by their first bytes, not their suffix, and a
Python pickle is refused unread: unpickling runs whatever code the file holds.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from trainer.errors import UsageError, first_line

from .archive import check_config, read_keras
from .hdf5 import H5_ERRORS, damaged, open_h5
from .keras2 import to_keras3
from .naming import KerasNames

MANIFEST = "manifest.json"
_MODELS = {"Functional", "Sequential", "Model"}
_ZIP, _HDF5 = b"PK\x03\x04", b"\x89HDF\r\n\x1a\n"


class Source:
    """One input. `keys()` are names in the source's `family` (see naming.py)."""

    format = "?"
    family = "keras"
    sliceable = True

    def __init__(self, path):
        self.path = str(path)
        self.manifest: dict = {}
        self.meta: dict = {}
        self.config: dict | None = None
        self._tensors: dict[str, object] = {}   # key -> what _read needs
        self._masks: dict[str, object] = {}

    # -- what a merge asks --------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key) -> tuple[tuple, np.dtype]:
        return self._info(self._tensors[key])

    def read(self, key, rows: slice | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor (or rows of it); into `out` where the format allows,
        which saves the page faults of a fresh array on every read."""
        try:
            return self._read(self._tensors[key], rows, out)
        except (*H5_ERRORS, zipfile.BadZipFile) as e:
            raise damaged(self.path, e, f"tensor {key}: ") from None

    def has_mask(self, key) -> bool:
        return key in self._masks

    def read_mask(self, key, rows: slice | None = None) -> np.ndarray:
        try:
            return self._read(self._masks[key], rows, None)
        except H5_ERRORS as e:
            raise damaged(self.path, e, f"mask of {key}: ") from None

    @property
    def lineage(self) -> str | None:
        value = self.manifest.get("lineage")
        return value if isinstance(value, str) else None

    @property
    def samples(self) -> int | None:
        n = self.meta.get("samples_seen", self.manifest.get("samples_seen"))
        # Files from elsewhere: a count is an int, anything else is unknown.
        from trainer.checkpoint import is_count
        return n if is_count(n) and n > 0 else None

    @property
    def model_cfg(self) -> dict | None:
        value = self.manifest.get("model")
        return value if isinstance(value, dict) else None

    def rename(self, mapping: dict[str, str], family: str) -> None:
        """Re-key into another family; a key without a translation is kept
        so that the merge's name check reports it."""
        self._tensors = {mapping.get(k, k): v for k, v in self._tensors.items()}
        self._masks = {mapping.get(k, k): v for k, v in self._masks.items()}
        self.family = family

    def close(self) -> None:
        pass

    # -- what a format provides ---------------------------------------------
    def _info(self, handle):
        raise NotImplementedError

    def _read(self, handle, rows, out):
        raise NotImplementedError


class H5Source(Source):
    """Keras v3 weights (inside a .keras, or a .weights.h5) or legacy Keras .h5."""

    def __init__(self, path, fileobj=None, config=None, fmt="weights.h5"):
        super().__init__(path)
        self.format = fmt
        self.config = config
        self._fileobj = fileobj
        self.h5 = open_h5(fileobj if fileobj is not None else path, str(path))
        try:
            self._index(config)
        except H5_ERRORS as e:
            self.close()
            raise damaged(str(path), e) from None
        except BaseException:
            self.close()
            raise

    def _index(self, config):
        import h5py
        legacy = self.h5["model_weights"] if "model_weights" in self.h5 else self.h5
        if "layer_names" in legacy.attrs:
            self.family = "variables"
            self.format = "legacy.h5"
            if config is None and "model_config" in self.h5.attrs:  # a whole model, not only weights
                try:
                    config = json.loads(_text(self.h5.attrs["model_config"]))
                    self.config = to_keras3(config, self.path) if isinstance(config, dict) else None
                except (ValueError, TypeError, AttributeError, KeyError, RecursionError):
                    self.config = None  # an unreadable architecture; the weights are still named
                if self.config is not None:
                    check_config(self.config, self.path)
            models = _nested_models(self.config)
            for layer in map(_text, legacy.attrs["layer_names"]):
                group = legacy[layer]
                for wname in map(_text, group.attrs.get("weight_names", [])):
                    key = wname.split(":")[0]
                    if layer in models and key.startswith(layer + "/"):
                        key = key[len(layer) + 1:]
                    self._tensors[key] = group[wname]
        else:
            self._datasets: list[str] = []
            self.h5.visititems(lambda name, obj: self._datasets.append(name)
                               if isinstance(obj, h5py.Dataset) else None)
            if config is not None:
                self.bind(config)

    @property
    def needs_architecture(self) -> bool:
        return self.family == "keras" and self.config is None

    def bind(self, config: dict) -> None:
        """Name a Keras v3 file's positional paths with a model config."""
        self.config = config
        names = KerasNames(config)
        for path in self._datasets:
            key = names.key(path)
            if key is not None:
                self._tensors[key] = self.h5[path]
        self.h5_paths = {k: v.name.lstrip("/") for k, v in self._tensors.items()}

    def bind_paths(self) -> None:
        """Key a Keras v3 file's model tensors by their own dataset paths
        ("layers/dense/vars/0"), for listing a file no architecture names."""
        self._tensors = {p: self.h5[p] for p in self._datasets if p.startswith(("layers/", "vars/"))}

    def _info(self, ds):
        return tuple(ds.shape), ds.dtype

    def _read(self, ds, rows, out):
        if ds.ndim == 0:
            return ds[()]
        if out is not None and out.dtype == ds.dtype:
            ds.read_direct(out, np.s_[:] if rows is None else rows)
            return out
        return ds[()] if rows is None else ds[rows]

    def close(self):
        self.h5.close()
        if getattr(self, "_mask_file", None) is not None:
            self._mask_file.close()
        if self._fileobj is not None:
            self._fileobj.close()


class TFCheckpointSource(Source):
    """A TensorFlow checkpoint prefix, named through its object graph.

    The object graph records each variable's name at save time (full_name),
    so no model has to be built. The trainer's own checkpoints (Keras 3)
    hold each section as a dict {variable key: variable}, and the key is the
    name; Keras 2 checkpoints (this project's on TF 2.15, or
    model.save_weights) are named by full_name, which Keras 2 made
    `dense1/kernel` too. Optimizer slots and counters are not part of the
    model and are left out; the trainer's pruning masks are read beside the
    weights they belong to."""

    format = "tf-checkpoint"
    family = "variables"
    sliceable = False  # the reader returns whole tensors

    def __init__(self, prefix):
        super().__init__(prefix)
        import tensorflow as tf
        from tensorflow.core.protobuf import trackable_object_graph_pb2
        try:
            self.reader = tf.train.load_checkpoint(str(prefix))
            graph = trackable_object_graph_pb2.TrackableObjectGraph()
            graph.ParseFromString(self.reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
        except Exception as e:  # TF raises several types for a damaged bundle
            raise UsageError(f"{prefix}: not a readable TensorFlow checkpoint ({first_line(e)})") from None
        self._shapes = self.reader.get_variable_to_shape_map()
        self._dtypes = self.reader.get_variable_to_dtype_map()
        masks = {}
        found = _variables(graph)
        # A trainer checkpoint (tf.train.Checkpoint(model=..., optimizer=..., pruning=..., proximal=...))
        # keeps the weights under "model"; everything beside it is training state. A checkpoint of
        # model.save_weights has the model at its root.
        sections = {section for section, _, _ in found}
        for section, name, key in found:
            if section == "pruning":
                masks[name] = key
            elif section == "model" if "model" in sections else section not in ("optimizer", "save_counter"):
                self._tensors[name] = key
        # Keras 2 trainer checkpoints named a mask variable after its weight's
        # name, "dense1_kernel_0_mask"; Keras 3 ones key it by the weight's key.
        legacy = {n.replace(":", "_").replace("/", "_") + "_0_mask": n for n in self._tensors}
        self._masks = {legacy.get(m, m): k for m, k in masks.items() if legacy.get(m, m) in self._tensors}

    def _info(self, key):
        return tuple(self._shapes[key]), np.dtype(self._dtypes[key].as_numpy_dtype)

    def _read(self, key, rows, out):
        try:
            a = self.reader.get_tensor(key)
        except Exception as e:  # TF's checkpoint reader raises OpError subclasses and others
            raise UsageError(f"{self.path}: damaged TensorFlow checkpoint (tensor {key}: {first_line(e)}); "
                             "copy it again or pick an earlier checkpoint") from None
        return a if rows is None else a[rows]


def _variables(graph):
    """(top-level child name, variable name, checkpoint key) for every
    variable reachable from the root's children, slots excluded. The name is
    the dict key of a trainer section's `vars` (Keras 3 checkpoints), else
    the variable's full_name."""
    out, seen = [], set()

    def walk(node_id, section, depth, local):
        if node_id in seen:
            return
        seen.add(node_id)
        node = graph.nodes[node_id]
        for attr in node.attributes:
            if attr.name == "VARIABLE_VALUE":
                name = local if depth == 3 and local is not None else attr.full_name
                out.append((section, name, attr.checkpoint_key))
        for child in node.children:
            keyed = depth == 1 and child.local_name == "vars"
            walk(child.node_id, section or child.local_name, depth + 1,
                 "vars" if keyed else (child.local_name if local == "vars" else None))

    walk(0, "", 0, None)
    return out


def open_keras(path) -> H5Source:
    archive = read_keras(path)
    src = H5Source(path, fileobj=archive.open_weights(), config=to_keras3(archive.config, str(path)), fmt="keras")
    if archive.recorded:  # a .keras written by the trainer or by merge
        src.manifest = archive.recorded
    return src


def _nested_models(config) -> set:
    """Names of the models nested in a legacy config: Keras 3 writes a nested
    model's weights as "inner/dense/kernel", Keras 2 as "dense/kernel", and
    the variable's key is the latter."""
    inner = config.get("config") if isinstance(config, dict) else None
    layers = inner.get("layers") if isinstance(inner, dict) else None
    return {layer["config"].get("name") for layer in layers or []
            if isinstance(layer, dict) and layer.get("class_name") in _MODELS
            and isinstance(layer.get("config"), dict)}


def _sniff(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


def open_source(path) -> Source:
    """The Source for a path, or a one-line UsageError naming it."""
    p = Path(path)
    if p.is_dir():
        return _open_dir(p)
    if not p.exists():
        if Path(f"{path}.index").exists():
            return TFCheckpointSource(path)
        raise UsageError(f"{path}: no such file, directory or checkpoint prefix")
    head = _sniff(p)
    if head.startswith(_ZIP):
        return open_keras(p)
    if head.startswith(_HDF5):
        return H5Source(p)  # H5Source tells v3 from legacy
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise UsageError(f"{path}: a Python pickle; merge never unpickles files, since loading one "
                         "runs any code it contains. Save the model with model.save('x.keras')")
    if p.suffix == ".index":
        return TFCheckpointSource(str(p)[:-len(".index")])
    raise UsageError(f"{path}: not a format merge reads (expected a run directory, .keras, "
                     ".weights.h5 or a TensorFlow checkpoint prefix)")


def _open_dir(p: Path) -> Source:
    from trainer.checkpoint import checkpoint_of, read_manifest
    if (p / "state.index").exists():  # RUN/checkpoints/ckpt-N
        src = TFCheckpointSource(str(p / "state"))
        run = p.parent.parent
        src.manifest = read_manifest(run) if (run / MANIFEST).exists() else {}
        meta = _read_json(p / "meta.json")
        src.meta = meta if isinstance(meta, dict) else {}
        src.format = "trainer checkpoint"
        _attach_config(src, run)
        return src
    manifest = read_manifest(p)
    if manifest.get("kind") == "merge":
        config = _read_json(p / "config.json")
        if not isinstance(config, dict):
            raise UsageError(f"{p / 'config.json'}: not a Keras model config")
        check_config(config, str(p / "config.json"))
        src = H5Source(p / "model.weights.h5", config=to_keras3(config, str(p / "config.json")), fmt="merge dir")
        src.path = str(p)
        if (p / "masks.h5").exists():
            src._mask_file = open_h5(p / "masks.h5", str(p / "masks.h5"))
            src._masks = {k: src._mask_file[k.replace("/", "|")] for k in src._tensors
                          if k.replace("/", "|") in src._mask_file}
        src.manifest = manifest
        return src
    prefix, meta = checkpoint_of(p)
    src = TFCheckpointSource(prefix)
    src.path, src.manifest, src.meta, src.format = str(p), manifest, meta, f"trainer {manifest.get('kind', 'run')}"
    _attach_config(src, p)
    return src


def _attach_config(src: Source, run: Path) -> None:
    """The architecture of a trainer run: its exported model's config, or the
    registry model its manifest names when the run has not finished (a user
    model is never imported for it: the run then has no architecture)."""
    exported = run / "model.keras"
    if exported.exists():
        src.config = to_keras3(read_keras(exported, weights=False).config, str(exported))
    elif src.model_cfg:
        from trainer.models import MODELS

        from .naming import config_from_model_cfg
        if src.model_cfg.get("name") in MODELS:
            src.config = config_from_model_cfg(src.model_cfg, str(run))


def _read_json(path: Path):
    from trainer.checkpoint import read_json
    try:
        return read_json(path, "JSON file")
    except FileNotFoundError:
        raise UsageError(f"{path}: missing") from None


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)

