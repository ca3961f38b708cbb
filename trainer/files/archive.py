"""The one reader of `.keras` archives: checked before anything parses them.

A `.keras` file is a zip of `config.json`, `metadata.json` and
`model.weights.h5` (and `assets/` for layers that keep files). Received from
another machine it is hostile until checked, so before Keras or h5py sees a
byte of it:

- only those member names, no duplicates, no paths that climb out, no
  encryption, only stored or deflated members;
- each member's declared size under a cap, and a deflated member's declared
  size within deflate's real ratio of its compressed size (a zip bomb
  declares gigabytes in kilobytes); reads never go past the declared size;
- `model.weights.npz`, Keras's other weight format, is refused: NumPy's
  loader is the one Keras reader that may unpickle;
- every `module` the config names is Keras's own, and every registered
  class is one this project registers (safe mode refuses lambdas, this
  refuses a config that asks for any other module's classes);
- the weights member is walked as HDF5 (trainer.files.hdf5).

Keras then loads the file in safe mode (`load_keras`).
"""
from __future__ import annotations

import io
import json
import os
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from trainer.errors import UsageError, first_line, one_line

CONFIG, METADATA, WEIGHTS = "config.json", "metadata.json", "model.weights.h5"
# Caps far above any real model's files; a config of a 1000-layer model is ~2 MB.
CAPS = {CONFIG: 64 << 20, METADATA: 1 << 20}
ASSET_CAP = 256 << 20
MAX_MEMBERS = 4096
# A weights member Keras did not store (a re-zipped file) is inflated into
# memory; beyond this it must be re-saved (Keras stores it uncompressed).
INFLATE_CAP = int(os.environ.get("DPT_MAX_INFLATE_BYTES", 512 << 20))
DEFLATE_RATIO = 1032    # deflate's maximum compression ratio
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, KeyError,
               NotImplementedError, RuntimeError, OverflowError, struct.error)
# The packages this project registers its layers under (keras.saving.register_keras_serializable).
PROJECT_PACKAGES = ("trainer", "merge")


@dataclass
class KerasArchive:
    path: str
    config: dict
    metadata: dict = field(default_factory=dict)
    weights_info: zipfile.ZipInfo | None = None

    @property
    def recorded(self) -> dict:
        """What this project wrote into metadata.json (lineage, model, round)."""
        from trainer.checkpoint import RECORD_KEY
        entry = self.metadata.get(RECORD_KEY)
        return entry if isinstance(entry, dict) else {}

    def open_weights(self):
        """A seekable file object over the weights member, for h5py."""
        info = self.weights_info
        try:
            if info.compress_type == zipfile.ZIP_STORED:
                with open(self.path, "rb") as f:
                    f.seek(info.header_offset)
                    head = f.read(30)
                    if len(head) < 30 or head[:4] != b"PK\x03\x04":
                        raise zipfile.BadZipFile("bad local header of model.weights.h5")
                    name_len, extra_len = struct.unpack("<HH", head[26:30])
                return Window(self.path, info.header_offset + 30 + name_len + extra_len, info.file_size)
            with zipfile.ZipFile(self.path) as zf, zf.open(info) as member:
                return io.BytesIO(member.read(info.file_size + 1))
        except MemoryError:
            raise UsageError(f"{self.path}: no memory to inflate its {info.file_size}-byte compressed weights; "
                             "save the model again with Keras, which stores them uncompressed") from None
        except _ZIP_ERRORS as e:
            raise UsageError(f"{self.path}: damaged .keras archive ({first_line(e)}); "
                             "copy it again or save the model again") from None


def read_keras(path, *, weights: bool = True) -> KerasArchive:
    """The checked archive at `path`; UsageError (one line) for anything else.
    `weights=False` skips the HDF5 walk, for callers that want the config only."""
    path = str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            _check_members(path, infos, os.path.getsize(path))
            members = {i.filename: i for i in infos}
            if CONFIG not in members or WEIGHTS not in members:
                raise UsageError(f"{path}: a zip without {CONFIG} and {WEIGHTS}; not a .keras model")
            config = _json(zf, members[CONFIG], path)
            metadata = _json(zf, members[METADATA], path) if METADATA in members else {}
    except UsageError:
        raise
    except RecursionError:
        raise UsageError(f"{path}: JSON nested too deeply; not a Keras config") from None
    except _ZIP_ERRORS as e:
        raise UsageError(f"{path}: not a readable .keras archive ({first_line(e)}); "
                         "it is truncated or corrupt: copy it again") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: {CONFIG} holds a {type(config).__name__}, not a Keras model config")
    if not isinstance(metadata, dict):
        metadata = {}
    check_config(config, path)
    archive = KerasArchive(path, config, metadata, members[WEIGHTS])
    if weights:
        from .hdf5 import open_h5
        open_h5(archive.open_weights(), f"{path} ({WEIGHTS})").close()
    return archive


def _check_members(path, infos, archive_size) -> None:
    if len(infos) > MAX_MEMBERS:
        raise UsageError(f"{path}: {len(infos)} zip members; not a .keras model")
    names = set()
    for i in infos:
        name = i.filename
        if name in names:
            raise UsageError(f"{path}: member {name!r} appears twice; refused (which one would load is undefined)")
        names.add(name)
        if name == "model.weights.npz":
            raise UsageError(f"{path}: weights stored as .npz are refused (NumPy's loader can unpickle); "
                             "save the model with Keras's default .keras format (HDF5 weights)")
        if name not in (CONFIG, METADATA, WEIGHTS) and not _is_asset(name):
            raise UsageError(f"{path}: unexpected member {name!r}; a .keras file holds only "
                             f"{CONFIG}, {METADATA}, {WEIGHTS} and assets/")
        if i.flag_bits & 0x1:
            raise UsageError(f"{path}: member {name!r} is encrypted; refused")
        if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise UsageError(f"{path}: member {name!r} uses zip compression method {i.compress_type}; "
                             "only stored and deflated members are read")
        if i.compress_size > archive_size:
            raise UsageError(f"{path}: member {name!r} claims {i.compress_size} bytes in a "
                             f"{archive_size}-byte file; the archive is truncated or corrupt")
        cap = CAPS.get(name, INFLATE_CAP if name == WEIGHTS else ASSET_CAP)
        stored = i.compress_type == zipfile.ZIP_STORED
        if stored and i.file_size != i.compress_size:
            raise UsageError(f"{path}: member {name!r} is stored with mismatched sizes; the archive is corrupt")
        if not (stored and name == WEIGHTS) and i.file_size > cap:
            raise UsageError(f"{path}: member {name!r} declares {i.file_size} bytes, over the cap of {cap}; "
                             "refused (a zip bomb, or re-save the model with Keras)")
        if not stored and i.file_size > DEFLATE_RATIO * max(i.compress_size, 1) + 1024:
            raise UsageError(f"{path}: member {name!r} declares {i.file_size} bytes from "
                             f"{i.compress_size} compressed; refused as a zip bomb")


def _is_asset(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return (len(parts) >= 2 and parts[0] == "assets" and not name.startswith("/")
            and ".." not in parts and "\\" not in name) or name == "assets/"


def _json(zf, info, path):
    with zf.open(info) as f:
        raw = f.read(info.file_size + 1)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: {info.filename} is not valid JSON ({first_line(e)})") from None


def check_config(config, where: str) -> None:
    """UsageError if the config asks Keras for a class outside Keras and this
    project. Keras imports the module a config entry names to find its class,
    so that name is what matters; a class of ours must also be registered
    under our package, which Keras checks when it deserializes. Plain string
    checks: merging .keras files must not import Keras at all."""
    stack, nodes = [config], 0
    while stack:
        node = stack.pop()
        nodes += 1
        if nodes > 5_000_000:
            raise UsageError(f"{where}: config too large to be a model")
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        module, registered = node.get("module"), node.get("registered_name")
        if module is not None or registered is not None:
            cls = node.get("class_name")
            if not (_keras_own(module, registered, cls) or _ours(module, registered)):
                raise UsageError(f"{where}: the model config asks for {str(cls)[:60]!r} from module "
                                 f"{str(module)[:60]!r}; only Keras's own layers and this project's "
                                 "registered ones are loaded")
        stack.extend(node.values())


def _keras_own(module, registered, cls) -> bool:
    return (isinstance(module, str) and (module == "keras" or module.startswith("keras."))
            and registered in (None, cls))


def _ours(module, registered) -> bool:
    return (isinstance(module, str) and module.split(".")[0] in PROJECT_PACKAGES
            and isinstance(registered, str) and registered.split(">")[0] in PROJECT_PACKAGES)


def load_keras(path, where: str | None = None):
    """The model of a checked `.keras` file, built by Keras in safe mode (a
    Keras 2 config through the project's translation), uncompiled."""
    import keras

    from .keras2 import is_keras2
    from .naming import model_from_config
    where = where or str(path)
    archive = read_keras(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if is_keras2(archive.config):
                # Keras 3 cannot rebuild a Keras 2 functional config as it is; the
                # translated one has the same layers in the same order, so Keras
                # reads the archive's weights into it positionally as usual.
                model = model_from_config(archive.config, where)
                model.load_weights(str(path))
            else:
                model = keras.models.load_model(str(path), compile=False, safe_mode=True)
    except UsageError:
        raise
    except Exception as e:  # a bad config or weights fail in many types
        raise UsageError(f"{where}: cannot load this .keras file ({one_line(e)})") from None
    # Keras only warns when it skips weights the config has and the file lacks:
    # the model would then hold fresh random values where the file's belong.
    skipped = [w for w in caught if str(w.message).startswith("Skipping")]
    if skipped:
        raise UsageError(f"{where}: its weights do not match its config (Keras: {one_line(skipped[0].message)}); "
                         "the file is damaged or was assembled by hand")
    return model


class Window(io.RawIOBase):
    """A read-only, seekable view of a stored (uncompressed) zip member.

    h5py seeks all over a file; zipfile's member objects seek backwards by
    re-reading from the start, which is quadratic on a GiB-sized model."""

    def __init__(self, path, start, size):
        self.f = open(path, "rb")
        self.start, self.size, self.pos = start, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.size - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got

    def close(self):
        self.f.close()
        super().close()


