"""The bombs family (each case is `bombs:index`, fully determined by that id):
zip bombs (real and declared), fill-only HDF5 datasets of huge shape, configs
and manifests that ask for huge tensors."""
from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from .mutate import datasets, dumps, encode_entry, members, zip_bytes

if TYPE_CHECKING:
    from .cases import Case


BOMBS = [  # (op, commands): each op once; the expensive ones with the fewest commands
    ("weights_deflate_bomb", ("inspect", "fedavg", "trainer")),
    ("config_bomb", ("inspect", "fedavg", "evaluate")),
    ("meta_bomb", ("inspect", "fedavg")),
    ("declared_huge_stored", ("inspect", "fedavg", "evaluate", "trainer")),
    ("declared_huge_deflate", ("inspect", "fedavg", "evaluate")),
    ("declared_4g", ("inspect", "fedavg", "evaluate")),
    ("config_declared_huge", ("inspect", "fedavg", "evaluate")),
    ("many_members", ("inspect", "fedavg")),
    ("h5_fill_huge", ("inspect", "fedavg", "trainer")),
    ("h5_fill_1g", ("inspect", "fedavg")),
    ("h5_chunk_huge", ("inspect", "fedavg")),
    ("keras_h5_fill_huge", ("inspect", "fedavg", "evaluate")),
    ("config_units_1e12", ("inspect", "evaluate")),
    ("config_units_1e6", ("inspect",)),
    ("config_shape_huge", ("evaluate",)),
    ("manifest_shape_huge", ("inspect", "trainer")),
    ("manifest_classes_huge", ("evaluate",)),
]


def bombs(c: Case, seeds, d: Path):
    import h5py
    rng = c.rng
    src, c.good = seeds["run_keras"], seeds["good_keras"]
    entries = members(src)
    op, c.only = BOMBS[c.index % len(BOMBS)]
    c.op = f"bombs/{op}"
    c.trainer = False
    c.input, c.kind = d / "x.keras", "keras"
    desc = op
    w = next(e for e in entries if e["name"] == "model.weights.h5")
    if op == "weights_deflate_bomb":
        w.update(method=8, data=_repeated_deflated(b"\0", 1 << 30), size=1 << 30, crc=_repeated_crc(b"\0", 1 << 30))
        desc = "model.weights.h5: 1 GiB of zeros deflated to ~1 MB"
    elif op in ("config_bomb", "meta_bomb"):
        name = "config.json" if op == "config_bomb" else "metadata.json"
        m = next(e for e in entries if e["name"] == name)
        n = 600 << 20
        m.update(method=8, data=_repeated_deflated(b" ", n, b"{}"), size=n + 2, crc=_repeated_crc(b" ", n, b"{}"))
        desc = f"{name}: 600 MiB of spaces then {{}}, deflated"
    elif op in ("declared_huge_stored", "config_declared_huge"):
        e = w if op == "declared_huge_stored" else next(e for e in entries if e["name"] == "config.json")
        e.update(encode_entry(e))
        e["size"] = e["csize"] = 10 ** 12
        desc = f"{e['name']} stored, declared 10**12 bytes (zip64)"
    elif op == "declared_huge_deflate":
        w.update(method=8)
        w.update(encode_entry(w))
        w["size"] = 10 ** 12
        desc = "model.weights.h5 deflated, declared 10**12 bytes uncompressed"
    elif op == "declared_4g":
        w.update(encode_entry(w))
        w["size"] = w["csize"] = 0xFFFFFFFE
        desc = "model.weights.h5 declared 4 GiB (no zip64)"
    elif op == "many_members":
        entries += [{"name": f"junk/{i}", "plain": b""} for i in range(60000)]
        desc = "60000 extra members"
    elif op in ("h5_fill_huge", "h5_fill_1g", "h5_chunk_huge"):
        c.input, c.kind = d / "x.weights.h5", "weights"
        shutil.copy(seeds["weights"], c.input)
        with h5py.File(c.input, "r+") as f:
            target = next(n for n in datasets(c.input) if n.endswith("vars/0"))
            del f[target]
            shape = {"h5_fill_huge": (10 ** 6, 10 ** 6), "h5_fill_1g": (64, 1 << 22),
                     "h5_chunk_huge": (1 << 20, 256)}[op]
            chunks = {"h5_fill_huge": (1024, 1024), "h5_fill_1g": (64, 4096),
                      "h5_chunk_huge": (1 << 20, 256)}[op]  # the last: one 1 GiB chunk
            f.create_dataset(target, shape=shape, dtype="f4", chunks=chunks, compression="gzip")
        c.desc = f"{target}: fill-only dataset of shape {shape}, chunks {chunks}"
        return
    elif op == "keras_h5_fill_huge":
        inner = d / "inner.h5"
        inner.write_bytes(w["plain"])
        with h5py.File(inner, "r+") as f:
            target = next(n for n in datasets(inner) if n.endswith("vars/0"))
            del f[target]
            f.create_dataset(target, shape=(64, 1 << 24), dtype="f4", chunks=(64, 4096), compression="gzip")
        w["plain"] = inner.read_bytes()
        inner.unlink()
        desc = f"inside the archive, {target} is a fill-only (64, 2**24) dataset (4 GiB)"
    elif op.startswith("config_"):
        cfg = next(e for e in entries if e["name"] == "config.json")
        config = json.loads(cfg["plain"])
        layers = config["config"]["layers"]
        if op.startswith("config_units"):
            i = next(i for i, l in enumerate(layers) if l["class_name"] == "Dense")
            layers[i]["config"]["units"] = 10 ** 12 if op == "config_units_1e12" else 10 ** 6
            desc = f"Dense units := {layers[i]['config']['units']}"
        else:
            layers[0]["config"]["batch_shape"] = [None, 10 ** 12, 1, 1]
            desc = f"batch_shape := {layers[0]['config']['batch_shape']}"
        cfg["plain"] = dumps(config)
    else:  # manifests asking the registry for huge models
        run = d / "run"
        shutil.copytree(seeds["run"], run)
        (run / "model.keras").unlink()
        m = json.loads((run / "manifest.json").read_text())
        if op == "manifest_shape_huge":
            m["model"]["input_shape"] = [1 << 20, 64, 1]
        else:
            m["model"]["num_classes"] = rng.choice([10 ** 9, 10 ** 12])
        (run / "manifest.json").write_bytes(dumps(m))
        c.input, c.kind, c.good = run, "rundir", seeds["good"]
        c.desc = f"run without model.keras, model {m['model']}"
        return
    c.input.write_bytes(zip_bytes(entries))
    c.desc = desc


_CACHE: dict = {}


def _repeated_deflated(byte: bytes, n: int, tail: bytes = b"") -> bytes:
    """Raw deflate of n copies of `byte` then `tail`, made in milliseconds: a
    1 MiB block ended by a full flush compresses to the same bytes every time."""
    key = (byte, n, tail)
    if key not in _CACHE:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        block = c.compress(byte * (1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
        _CACHE[key] = block * (n >> 20) + c.compress(tail) + c.flush()
    return _CACHE[key]


def _repeated_crc(byte: bytes, n: int, tail: bytes = b"") -> int:
    crc, chunk = 0, byte * (1 << 20)
    for _ in range(n >> 20):
        crc = zlib.crc32(chunk, crc)
    return zlib.crc32(tail, crc)
