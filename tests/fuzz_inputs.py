"""Fuzz inputs for tests/test_fuzz.py: valid seed files, deterministic mutants
of them, and the worker process that runs the CLIs on each mutant in-process.

Families (each case is `family:index`, fully determined by that id):
  keras_bytes   .keras archives truncated, byte-flipped, zeroed, spliced
  keras_zip     .keras zip structure: members renamed, dropped, cut short,
                duplicated, declared larger, other compressions, encryption bit,
                bad CRCs, broken central directory
  keras_config  config.json / metadata.json of a .keras: wrong types, negative
                and huge shapes, deep nesting, modules a config names (os.system)
  weights_h5    Keras v3 .weights.h5: bytes, datasets removed/reshaped/retyped,
                external links, soft-link cycles, external raw storage
  legacy_h5     legacy whole-model .h5: bytes, model_config / layer_names /
                weight_names attributes of wrong types, links
  tfckpt        TF checkpoints: prefix.index / prefix.data-* bytes, missing and
                swapped shards, and trainer checkpoint directories (meta.json)
  manifest      trainer run / init / merge directories: manifest.json fields of
                wrong types, `latest` escaping the run, model names that are
                `package.module:function` (must never be imported or called)
  bombs         zip bombs (real and declared), fill-only HDF5 datasets of huge
                shape, configs and manifests that ask for huge tensors

The worker (`python fuzz_inputs.py worker`) imports TensorFlow once and runs
`merge.cli.main(argv)` / `trainer.cli.main(argv)` in its own process, so a
segfault, abort or C-level hang in a reader costs one case, not the session.
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import struct
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
K2 = REPO / "tests" / "fixtures" / "keras2"
SEED = 20240611
SENTINEL = "FUZZ_SENTINEL"   # a would-be command creates this file in the case directory
PROTO = "@@FUZZ@@ "

FAMILIES = {  # family: number of cases
    "keras_bytes": 70, "keras_zip": 80, "keras_config": 90, "weights_h5": 70,
    "legacy_h5": 70, "tfckpt": 70, "manifest": 90, "bombs": 17,
}
TRAINER_EVERY = 6  # one case in this many also runs `trainer --init X`


# =============================================================================
# Seeds: valid inputs, built once per session by the worker (needs TensorFlow)
# =============================================================================

def build_seeds(root: Path, call) -> dict:
    """Valid inputs under `root`; `call(tool, argv)` runs a CLI in-process and
    returns its exit code. Returns {name: path} (strings)."""
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)
    common = ["--epochs", "1", "--batch-size", "16", "--backend", "single", "--quiet"]
    steps = [
        ("trainer", ["init", "--model", "mlp", "--out", "init"]),
        ("trainer", ["--init", "init", "--max-steps", "2", "--out", "run", *common]),
        ("trainer", ["--init", "init", "--max-steps", "3", "--seed", "1", "--out", "good", *common]),
        ("trainer", ["--init", "init", "--max-steps", "3", "--prune", "--target-sparsity", "0.5",
                     "--prune-every", "1", "--out", "pruned", *common]),
        ("merge", ["fedavg", "run", "good", "-o", "merged.keras", "--quiet"]),
        ("merge", ["fedavg", "run", "good", "-o", "mergedir", "--quiet"]),
    ]
    for tool, argv in steps:
        rc = call(tool, argv)
        if rc != 0:
            raise RuntimeError(f"seed step {tool} {argv} exited {rc}")
    import keras
    import trainer.models  # noqa: F401
    model = keras.models.load_model(root / "run" / "model.keras", compile=False)
    model.save_weights(root / "model.weights.h5")
    model.save(root / "legacy.h5")
    shutil.copytree(K2, root / "k2")
    for d in list(root.glob("*/tb")) + list(root.glob("k2/project/*/tb")):
        shutil.rmtree(d, ignore_errors=True)
    ckpt = next((root / "run" / "checkpoints").iterdir())
    return {k: str(v) for k, v in {
        "root": root, "init": root / "init", "run": root / "run", "good": root / "good",
        "pruned": root / "pruned", "mergedir": root / "mergedir",
        "run_keras": root / "run" / "model.keras", "good_keras": root / "good" / "model.keras",
        "merged_keras": root / "merged.keras", "weights": root / "model.weights.h5",
        "legacy": root / "legacy.h5", "run_ckpt": ckpt,
        "k2": root / "k2"}.items()}


# =============================================================================
# Byte-level mutations
# =============================================================================

def truncate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    n = len(data)
    cut = rng.choice([0, 1, 7, 8, 30, n // 2, n - 1, n - 22, rng.randrange(n), rng.randrange(n), rng.randrange(n)])
    cut = max(0, min(n - 1, cut))
    return data[:cut], f"truncated at {cut}/{n}"


def flip(data: bytes, rng: random.Random, count=None, lo=0, hi=None) -> tuple[bytes, str]:
    b = bytearray(data)
    hi = len(b) if hi is None else min(hi, len(b))
    count = count or rng.choice([1, 1, 2, 4, 16, 64])
    where = sorted(rng.randrange(lo, hi) for _ in range(count))
    for i in where:
        b[i] ^= rng.randrange(1, 256)
    return bytes(b), f"{count} byte(s) flipped in [{lo},{hi}) first at {where[0]}"


def zero_range(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    start = rng.randrange(len(data))
    length = rng.choice([8, 64, 512, 4096])
    b = bytearray(data)
    b[start:start + length] = bytes(len(b[start:start + length]))
    return bytes(b), f"{length} bytes zeroed at {start}"


def splice(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Delete or duplicate a chunk: everything after it moves."""
    start = rng.randrange(len(data))
    length = rng.choice([1, 3, 100, 1000])
    if rng.random() < 0.5:
        return data[:start] + data[start + length:], f"{length} bytes deleted at {start}"
    return data[:start] + data[start:start + length] + data[start:], f"{length} bytes duplicated at {start}"


def byte_mutation(data: bytes, rng: random.Random, regions=()) -> tuple[bytes, str]:
    """One of the byte mutations; `regions` (name, lo, hi) aim flips at a part of the file."""
    k = rng.randrange(6 + len(regions))
    if k in (0, 1):
        return truncate(data, rng)
    if k in (2, 3):
        return flip(data, rng)
    if k == 4:
        return zero_range(data, rng)
    if k == 5:
        return splice(data, rng)
    name, lo, hi = regions[k - 6]
    out, desc = flip(data, rng, count=rng.choice([1, 2, 8]), lo=lo, hi=hi)
    return out, f"{desc} ({name})"


# =============================================================================
# A zip writer that can lie: sizes, CRCs, names, methods, flags
# =============================================================================

def members(path) -> list[dict]:
    """The members of a real zip as entries for `zip_bytes` (uncompressed data)."""
    import zipfile
    with zipfile.ZipFile(path) as zf:
        return [{"name": i.filename, "plain": zf.read(i.filename)} for i in zf.infolist()]


def _encode(e: dict) -> dict:
    """Fill in the stored bytes, CRC and sizes an entry does not override."""
    e = dict(e)
    plain = e.get("plain", b"")
    method = e.get("method", 0)
    if "data" not in e:
        if method == 8:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            e["data"] = c.compress(plain) + c.flush()
        elif method == 12:
            import bz2
            e["data"] = bz2.compress(plain)
        elif method == 14:
            import lzma
            filters = [{"id": lzma.FILTER_LZMA1}]
            raw = lzma.compress(plain, format=lzma.FORMAT_RAW, filters=filters)
            props = lzma._encode_filter_properties(filters[0])
            e["data"] = struct.pack("<BBH", 9, 4, len(props)) + props + raw
        else:
            e["data"] = plain
    e.setdefault("crc", zlib.crc32(plain))
    e.setdefault("size", len(plain))
    e.setdefault("csize", len(e["data"]))
    return e


def zip_bytes(entries: list[dict], *, comment: bytes = b"", eocd_count=None, cd_offset_delta=0,
              cd_cut=0) -> bytes:
    out, central = bytearray(), bytearray()
    for e in map(_encode, entries):
        name = e["name"].encode("utf-8", "surrogateescape") if isinstance(e["name"], str) else e["name"]
        lname = e.get("local_name", name)
        lname = lname.encode() if isinstance(lname, str) else lname
        size, csize, flags, method = e["size"], e["csize"], e.get("flags", 0), e.get("method", 0)
        extra = e.get("extra", b"")
        zip64 = size >= 0xFFFFFFFF or csize >= 0xFFFFFFFF
        if zip64:
            extra = struct.pack("<HHQQ", 1, 16, size, csize) + extra
            s32 = c32 = 0xFFFFFFFF
        else:
            s32, c32 = size, csize
        ver = 45 if zip64 else 20
        offset = len(out)
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", ver, flags, method, 0, 0x21, e["crc"], c32, s32,
                           len(lname), len(extra)) + lname + extra + e["data"]
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", ver, ver, flags, method, 0, 0x21,
                               e["crc"], c32, s32, len(name), len(extra), 0, 0, 0, 0, offset) + name + extra
    cd_offset = len(out)
    if cd_cut:
        central = central[:-cd_cut]
    out += central
    n = len(entries) if eocd_count is None else eocd_count
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(central), cd_offset + cd_offset_delta,
                       len(comment)) + comment
    return bytes(out)


# =============================================================================
# JSON mutations
# =============================================================================

def paths(node, prefix=()):
    """Every path into a JSON tree (dict keys and list indexes), parents first."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, prefix + (i,))


def get(node, path):
    for k in path:
        node = node[k]
    return node


def put(node, path, value):
    if not path:
        return value
    get(node, path[:-1])[path[-1]] = value
    return node


def delete(node, path):
    parent = get(node, path[:-1])
    del parent[path[-1]]
    return node


def nested(depth: int, leaf=0, kind="list"):
    v = leaf
    for _ in range(depth):
        v = [v] if kind == "list" else {"a": v}
    return v


def wrong_values(rng: random.Random, sentinel: str) -> list:
    return ["16", "", "x" * 300, -1, 0, 1.5, -2 ** 63, 2 ** 64, None, True, False, [], {}, [1, 2],
            {"a": 1}, [None], [-1], [[8]], float("nan"), float("inf"), nested(rng.choice([50, 400, 900])),
            {"class_name": "system", "module": "os", "config": f"touch {sentinel}"},
            f"touch {sentinel}"]


def wrong_value(rng: random.Random, sentinel: str):
    return rng.choice(wrong_values(rng, sentinel))


def mutate_json_tree(obj, rng: random.Random, sentinel: str, protect_huge=True):
    """One random structural/type change somewhere in a JSON tree."""
    obj = copy.deepcopy(obj)
    all_paths = [p for p in paths(obj) if p]
    path = rng.choice(all_paths)
    op = rng.randrange(5)
    if op == 0 and path:
        return delete(obj, path), f"deleted {_p(path)}"
    value = get(obj, path)
    if op == 1 and isinstance(value, (int, float)) and not isinstance(value, bool):
        new = rng.choice([-value if value else -1, 0, str(value), value + 0.5, -(10 ** 6)])
        return put(obj, path, new), f"{_p(path)}: {value!r} -> {new!r}"
    if op == 2 and isinstance(value, list):
        new = rng.choice([value + value, value[::-1], value[:1], [], {"0": value}, [value]])
        return put(obj, path, new), f"{_p(path)}: list reshaped"
    new = wrong_value(rng, sentinel)
    return put(obj, path, new), f"{_p(path)} := {_short(new)}"


def _p(path) -> str:
    return "/".join(map(str, path)) or "<root>"


def _short(v) -> str:
    s = json.dumps(v, allow_nan=True) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def dumps(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


# =============================================================================
# HDF5 helpers
# =============================================================================

def datasets(path) -> list[str]:
    import h5py
    out = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.append(n) if isinstance(o, h5py.Dataset) else None)
    return out


def h5_structural(src: Path, dst: Path, rng: random.Random, case_dir: Path, other: Path | None,
                  legacy: bool, sentinel: str) -> str:
    """Copy `src` to `dst` and change its structure with h5py; returns a description."""
    import h5py
    import numpy as np
    shutil.copy(src, dst)
    names = datasets(dst)
    target = rng.choice(names)
    ops = ["delete", "reshape", "retype", "to_group", "extra", "ext_link_other", "ext_link_passwd",
           "ext_link_missing", "ext_link_self", "soft_cycle", "soft_root", "hard_cycle", "ext_storage",
           "ext_storage_missing", "scalar", "empty", "attrs"]
    op = rng.choice(ops)
    with h5py.File(dst, "r+") as f:
        ds = f[target]
        shape, dtype = ds.shape, ds.dtype
        if op == "delete":
            del f[target]
        elif op == "reshape":
            new = rng.choice([shape[::-1], (0,), shape + (1,), (3,), tuple(d + 1 for d in shape) or (2,),
                              (1, 1, 1, 1, 1, 1)])
            del f[target]
            f.create_dataset(target, data=np.zeros(new, dtype))
            return f"{target}: shape {shape} -> {new}"
        elif op == "retype":
            del f[target]
            kind = rng.choice(["str", "vlen", "compound", "int8", "float16", "bool", "complex", "object_ref"])
            n = int(np.prod(shape)) if shape else 1
            if kind == "str":
                f.create_dataset(target, data=np.array([b"touch " + sentinel.encode()] * n).reshape(shape or ()))
            elif kind == "vlen":
                f.create_dataset(target, data=["x"] * max(1, n), dtype=h5py.string_dtype())
            elif kind == "compound":
                f.create_dataset(target, shape=shape, dtype=np.dtype([("a", "f4"), ("b", "i4")]))
            elif kind == "object_ref":
                f.create_dataset(target, shape=(2,), dtype=h5py.ref_dtype)
            else:
                f.create_dataset(target, data=np.zeros(shape, {"int8": "i1", "float16": "f2", "bool": "?",
                                                              "complex": "c8"}[kind]))
            return f"{target}: dtype {dtype} -> {kind}"
        elif op == "to_group":
            del f[target]
            f.create_group(target)
        elif op == "extra":
            parent = target.rsplit("/", 1)[0] if "/" in target else ""
            f.create_dataset(f"{parent}/{'99' if not legacy else 'extra:0'}".lstrip("/"), data=np.ones((2, 2)))
        elif op == "ext_link_other":
            del f[target]
            f[target] = h5py.ExternalLink(str(other), "/" + rng.choice(datasets(other)))
        elif op == "ext_link_passwd":
            del f[target]
            f[target] = h5py.ExternalLink("/etc/passwd", "/x")
        elif op == "ext_link_missing":
            del f[target]
            f[target] = h5py.ExternalLink(str(case_dir / "nowhere.h5"), "/x")
        elif op == "ext_link_self":
            del f[target]
            f[target] = h5py.ExternalLink(str(dst), "/" + target)
        elif op == "soft_cycle":
            del f[target]
            f[target] = h5py.SoftLink("/" + target + "_b")
            f[target + "_b"] = h5py.SoftLink("/" + target)
        elif op == "soft_root":
            del f[target]
            f[target] = h5py.SoftLink("/")
        elif op == "hard_cycle":
            parent = target.rsplit("/", 1)[0] if "/" in target else None
            if parent:
                f[parent + "/loop"] = f[parent]
            else:
                f["loop"] = f["/"]
        elif op in ("ext_storage", "ext_storage_missing"):
            del f[target]
            nbytes = int(np.prod(shape or (1,))) * dtype.itemsize
            where = "/etc/hostname" if op == "ext_storage" else str(case_dir / "missing.bin")
            f.create_dataset(target, shape=shape, dtype=dtype, external=[(where, 0, nbytes)])
            return f"{target}: raw data stored externally in {where}"
        elif op == "scalar":
            del f[target]
            f.create_dataset(target, data=np.float32(1.0))
        elif op == "empty":
            del f[target]
            f.create_dataset(target, data=h5py.Empty("f4"))
        elif op == "attrs":
            f.attrs["keras_version"] = rng.choice([5, b"\xff\xfe", np.arange(3)])
            ds.attrs["name"] = np.zeros((2, 2))
    return f"{op} {target}"


# =============================================================================
# Cases
# =============================================================================

class Case:
    def __init__(self, family, index):
        self.family, self.index = family, index
        self.id = f"{family}:{index}"
        self.rng = random.Random(f"{SEED}:{self.id}")
        self.desc = ""
        self.input = None          # path handed to the commands
        self.kind = None           # keras | weights | legacy | prefix | ckptdir | rundir
        self.good = None           # a valid same-architecture input for fedavg/diff
        self.trainer = index % TRAINER_EVERY == 0
        self.trainer_model = "mlp"  # None: let the input choose (manifest family)
        self.syspath = False       # put the case directory first on sys.path (python -m does so with cwd)
        self.op = family          # the mutation's kind, which names memory failures
        self.only = None          # run only these commands ("inspect", "fedavg", ..., "trainer")

    def spec(self, dir_: Path) -> dict:
        """What the worker runs: commands with their allowed exit codes."""
        x, out = str(self.input), str(dir_ / "out.keras")
        cmds = [("merge", ["inspect", x] + (["--json"] if self.index % 2 else []), (0, 2)),
                ("merge", ["diff", x, self.good], (0, 1, 2)),
                ("merge", ["fedavg", x, self.good, "-o", out, "--quiet"], (0, 2))]
        if self.kind in ("keras", "legacy", "ckptdir", "rundir"):
            cmds.append(("merge", ["evaluate", x, "--data", "digits"], (0, 2)))
        if self.trainer or (self.only and "trainer" in self.only):
            argv = ["--init", x, "--epochs", "1", "--max-steps", "1", "--batch-size", "16", "--backend",
                    "single", "--quiet", "--out", str(dir_ / "trainer-out")]
            if self.trainer_model:
                argv += ["--model", self.trainer_model]
            cmds.append(("trainer", argv, (0, 2)))
        if self.only is not None:
            cmds = [c for c in cmds if (c[0] if c[0] == "trainer" else c[1][0]) in self.only]
        return {"id": self.id, "dir": str(dir_), "desc": self.desc, "syspath": self.syspath,
                "sentinel": str(dir_ / SENTINEL), "op": self.op,
                "cmds": [{"tool": t, "argv": a, "allowed": list(ok)} for t, a, ok in cmds]}


def make_case(family: str, index: int, seeds: dict, dir_: Path) -> Case:
    """Write case `family:index`'s input under `dir_` (created); deterministic."""
    dir_.mkdir(parents=True, exist_ok=True)
    c = Case(family, index)
    globals()["_" + family](c, seeds, dir_)
    return c


def _keras_seeds(seeds):
    """(seed .keras, a good same-architecture input) pairs."""
    k2 = Path(seeds["k2"])
    return [(seeds["run_keras"], seeds["good_keras"]), (seeds["merged_keras"], seeds["good"]),
            (str(k2 / "project" / "global.keras"), seeds["good_keras"]),
            (str(k2 / "plain" / "functional.keras"), str(k2 / "plain" / "functional.h5"))]


def _keras_bytes(c: Case, seeds, d: Path):
    src, c.good = c.rng.choice(_keras_seeds(seeds))
    data = Path(src).read_bytes()
    import zipfile
    with zipfile.ZipFile(src) as zf:
        regions = []
        for i in zf.infolist():
            start = i.header_offset + 30 + len(i.filename)
            regions.append((i.filename, start, start + i.compress_size))
        cd = data.rfind(b"PK\x01\x02", 0, data.rfind(b"PK\x05\x06"))
        first_cd = data.find(b"PK\x01\x02")
        regions += [("central directory", first_cd, len(data)), ("local headers", 0, 30)]
        del cd
    out, desc = byte_mutation(data, c.rng, regions)
    c.input, c.kind = d / "x.keras", "keras"
    c.input.write_bytes(out)
    c.desc = f"{Path(src).name}: {desc}"


def _keras_zip(c: Case, seeds, d: Path):
    src, c.good = c.rng.choice(_keras_seeds(seeds))
    entries = members(src)
    names = [e["name"] for e in entries]
    rng = c.rng
    ops = ["rename", "drop", "duplicate", "cut_short", "cut_short_honest", "declared_larger", "deflate",
           "bzip2", "lzma", "bad_method", "encrypted", "bad_crc", "eocd_count", "cd_offset", "cd_cut",
           "local_name", "directory", "replace_weights", "replace_meta", "empty_zip", "nested_zip",
           "data_descriptor", "comment", "extra_garbage", "declared_smaller"]
    op = ops[c.index % len(ops)]
    kw = {}
    target = rng.choice(names)
    e = next(e for e in entries if e["name"] == target)
    desc = f"{op} {target}"
    if op == "rename":
        new = rng.choice([target + "x", target.upper(), "./" + target, "/" + target, "../" + target,
                          "sub/" + target, target + "\x00.txt", " " + target])
        e["name"] = new
        desc = f"{target} renamed {new!r}"
    elif op == "drop":
        entries.remove(e)
    elif op == "duplicate":
        dup = dict(e)
        dup["plain"] = rng.choice([b"", e["plain"][: len(e["plain"]) // 2], b"{}", e["plain"][::-1]])
        entries.insert(rng.randrange(len(entries) + 1), dup)
    elif op == "cut_short":  # headers still declare the full member
        e.update(_encode(e))
        keep = rng.randrange(len(e["data"]))
        e["data"] = e["data"][:keep]
        desc += f" to {keep} bytes (sizes still say {e['size']})"
    elif op == "cut_short_honest":  # sizes updated, CRC of the whole member
        crc = zlib.crc32(e["plain"])
        e["plain"] = e["plain"][: rng.randrange(len(e["plain"]))]
        e["crc"] = crc
        desc += f" to {len(e['plain'])} bytes, stale CRC"
    elif op == "declared_larger":
        e.update(_encode(e))
        e["size"] = e["csize"] = e["size"] * rng.choice([2, 10]) + 1
        desc += f" declared {e['size']} bytes"
    elif op == "declared_smaller":
        e.update(_encode(e))
        e["size"] = e["csize"] = max(0, e["size"] // rng.choice([2, 10]))
        desc += f" declared {e['size']} bytes"
    elif op in ("deflate", "bzip2", "lzma"):
        for x in entries:
            x["method"] = {"deflate": 8, "bzip2": 12, "lzma": 14}[op]
        desc = f"every member compressed with {op} (a valid archive)"
    elif op == "bad_method":
        e["method"] = rng.choice([99, 6, 97, 98, 9])
        desc += f" method {e['method']}"
    elif op == "encrypted":
        e["flags"] = 1
    elif op == "bad_crc":
        e["crc"] = zlib.crc32(e["plain"]) ^ 0x5A5A5A5A
    elif op == "eocd_count":
        kw["eocd_count"] = rng.choice([0, 1, 2, 1000, 65535])
        desc = f"end record claims {kw['eocd_count']} members"
    elif op == "cd_offset":
        kw["cd_offset_delta"] = rng.choice([-1, 1, -30, 10 ** 6])
        desc = f"central directory offset moved by {kw['cd_offset_delta']}"
    elif op == "cd_cut":
        kw["cd_cut"] = rng.choice([1, 10, 46])
        desc = f"central directory cut by {kw['cd_cut']} bytes"
    elif op == "local_name":
        e["local_name"] = "other.bin"
        desc += ": local header names other.bin"
    elif op == "directory":
        e["name"] = target + "/"
        e["plain"] = b""
    elif op == "replace_weights":
        w = next(x for x in entries if x["name"] == "model.weights.h5")
        w["plain"] = rng.choice([b"", b"\x80\x04K\x01.", Path(seeds["legacy"]).read_bytes(),
                                 Path(src).read_bytes(), b"\x89HDF\r\n\x1a\n" + b"\0" * 100, b"{}"])
        desc = f"model.weights.h5 replaced by {len(w['plain'])} bytes starting {w['plain'][:8]!r}"
    elif op == "replace_meta":
        m = next((x for x in entries if x["name"] == "metadata.json"), None)
        if m is None:
            m = {"name": "metadata.json"}
            entries.append(m)
        m["plain"] = rng.choice([b"\xff\xfe\x00", b"[]", b"null", b'"x"', b"{", b"[" * 5000 + b"]" * 5000,
                                 b'{"dptoolkit": 5}', b'{"dptoolkit": {"samples_seen": "many"}}'])
        desc = f"metadata.json := {m['plain'][:40]!r}"
    elif op == "empty_zip":
        entries = []
        desc = "a zip with no members"
    elif op == "nested_zip":
        w = next(x for x in entries if x["name"] == "model.weights.h5")
        w["plain"] = Path(src).read_bytes()
        desc = "model.weights.h5 is itself a .keras archive"
    elif op == "data_descriptor":
        e["flags"] = 8
    elif op == "comment":
        kw["comment"] = rng.choice([b"PK\x05\x06" + b"\0" * 18, b"\xff" * 1000, b"PK\x01\x02"])
        desc = f"archive comment {kw['comment'][:8]!r}..."
    elif op == "extra_garbage":
        e["extra"] = rng.choice([b"\x01\x00\x08\x00" + b"\xff" * 8, b"\x01\x00", b"\xff\xff\xff\xff"])
        desc += f" extra field {e['extra']!r}"
    c.input, c.kind = d / "x.keras", "keras"
    c.input.write_bytes(zip_bytes(entries, **kw))
    c.desc = f"{Path(src).name}: {desc}"


def _keras_config(c: Case, seeds, d: Path):
    src, c.good = c.rng.choice(_keras_seeds(seeds))
    rng = c.rng
    sentinel = str(d / SENTINEL)
    entries = members(src)
    cfg_e = next(e for e in entries if e["name"] == "config.json")
    meta_e = next(e for e in entries if e["name"] == "metadata.json")
    config = json.loads(cfg_e["plain"])
    layers = config["config"]["layers"]
    dense = [i for i, l in enumerate(layers) if l["class_name"] == "Dense"]
    inp = next(i for i, l in enumerate(layers) if l["class_name"] == "InputLayer")
    shape_key = "batch_shape" if "batch_shape" in layers[inp]["config"] else "batch_input_shape"
    ops = ["tree", "tree", "tree", "batch_shape", "units", "activation", "class_name", "os_system",
           "subprocess", "lambda", "layers_type", "inbound", "dup_names", "top_type", "deep_value",
           "deep_doc", "bad_json", "metadata", "metadata_dptoolkit", "registered", "dtype", "build_config",
           "initializer", "huge_number", "name_type"]
    op = ops[c.index % len(ops)]
    desc = op
    if op == "tree":
        config, desc = mutate_json_tree(config, rng, sentinel)
    elif op == "batch_shape":
        new = rng.choice([[None, -8, 8, 1], [None, 10 ** 12], ["8", 8, 1], [None, 8, 8, 1, 1], None, "abc",
                          [[8]], [None, 0, 8, 1], [None, 8.5, 8, 1], [], [None, 2 ** 63, 1, 1]])
        layers[inp]["config"][shape_key] = new
        desc = f"{shape_key} := {new!r}"
    elif op == "units":
        i = rng.choice(dense)
        new = rng.choice([-1, 0, "256", 10 ** 12, 2.5, True, None, [256], 2 ** 40])
        layers[i]["config"]["units"] = new
        desc = f"{layers[i]['config']['name']}.units := {new!r}"
    elif op == "activation":
        new = rng.choice(["os.system", 123, "no_such_activation",
                          {"module": "os", "class_name": "system", "config": f"touch {sentinel}",
                           "registered_name": None},
                          {"module": "builtins", "class_name": "exec",
                           "config": f"open({sentinel!r}, 'w')"}])
        layers[rng.choice(dense)]["config"]["activation"] = new
        desc = f"activation := {_short(new)}"
    elif op == "class_name":
        i = rng.choice(dense)
        layers[i]["class_name"] = rng.choice(["NoSuchLayer", "Functional", "", "__keras_tensor__", "Model"])
        desc = f"layer {i} class_name := {layers[i]['class_name']!r}"
    elif op in ("os_system", "subprocess"):
        mod, fn = ("os", "system") if op == "os_system" else ("subprocess", "getoutput")
        evil = {"module": mod, "class_name": fn, "config": f"touch {sentinel}", "registered_name": fn}
        where = rng.choice(["layer", "top", "dtype", "initializer"])
        if where == "layer":
            layers[rng.choice(dense)] = {**evil, "name": "dense1", "inbound_nodes": layers[dense[0]]["inbound_nodes"]}
        elif where == "top":
            config = {**evil, "config": {"cmd": f"touch {sentinel}"}}
        elif where == "dtype":
            layers[rng.choice(dense)]["config"]["dtype"] = evil
        else:
            layers[rng.choice(dense)]["config"]["kernel_initializer"] = evil
        desc = f"{mod}.{fn}('touch SENTINEL') as {where}"
    elif op == "lambda":
        import base64
        import marshal
        code = compile(f"open({sentinel!r}, 'w')", "<fuzz>", "exec")
        layers.insert(inp + 1, {"module": "keras.layers", "class_name": "Lambda", "registered_name": None,
                                "name": "lam", "config": {"name": "lam", "function": {
                                    "class_name": "__lambda__", "config": {
                                        "code": base64.b64encode(marshal.dumps(code)).decode(),
                                        "defaults": None, "closure": None}}},
                                "inbound_nodes": layers[inp + 1]["inbound_nodes"]})
        desc = "a Lambda layer whose marshalled code creates the sentinel"
    elif op == "layers_type":
        new = rng.choice([None, {}, "layers", [None], [1, 2], [[]]])
        config["config"]["layers"] = new
        desc = f"layers := {new!r}"
    elif op == "inbound":
        i = rng.choice(dense)
        new = rng.choice([[], None, "x", [{"args": [{"class_name": "__keras_tensor__", "config": {
            "shape": [None, 64], "dtype": "float32", "keras_history": ["nowhere", 0, 0]}}], "kwargs": {}}],
            [{"args": [{"class_name": "__keras_tensor__", "config": {"keras_history": [layers[i]["name"] if "name" in layers[i] else "dense1", 0, 0]}}]}],
            [["dense1", 0, 0, {}]], [{"args": 5}]])
        layers[i]["inbound_nodes"] = new
        desc = f"inbound_nodes of layer {i} := {_short(new)}"
    elif op == "dup_names":
        for i in dense:
            layers[i]["config"]["name"] = "same"
            layers[i]["name"] = "same"
        desc = "every Dense layer named 'same'"
    elif op == "top_type":
        config = rng.choice([[], "Functional", 1, None, {"class_name": "Functional"}, {"config": None},
                             {"class_name": "Sequential", "config": {"layers": "x"}}])
        desc = f"config.json := {_short(config)}"
    elif op == "deep_value":
        layers[rng.choice(dense)]["config"]["units"] = nested(rng.choice([300, 900]), 8,
                                                              rng.choice(["list", "dict"]))
        desc = "units nested hundreds deep"
    elif op == "deep_doc":
        cfg_e["plain"] = ("[" * 100000 + "]" * 100000).encode()
        desc = "config.json nested 100000 deep"
        config = None
    elif op == "bad_json":
        cfg_e["plain"] = rng.choice([cfg_e["plain"][: len(cfg_e["plain"]) // 2], b"\xff\xfe{}",
                                     b"\xef\xbb\xbf" + cfg_e["plain"], b"{'a': 1}", b"",
                                     b'{"a": 1e999999}', b'{"a": ' + b"1" * 5000 + b"}",
                                     b'{"class_name": "Functional", "class_name": "Sequential"}'])
        desc = f"config.json := {cfg_e['plain'][:30]!r}..."
        config = None
    elif op == "metadata":
        meta_e["plain"] = dumps(rng.choice([[], "x", None, 5, {"keras_version": 3}, {"keras_version": "2.0.0"},
                                            {"keras_version": None, "date_saved": []}]))
        desc = f"metadata.json := {meta_e['plain'][:40]!r}"
    elif op == "metadata_dptoolkit":
        rec = rng.choice([[], "x", {"samples_seen": "many"}, {"samples_seen": -5}, {"samples_seen": 1.5},
                          {"samples_seen": [1]}, {"samples_seen": 10 ** 30}, {"samples_seen": float("nan")},
                          {"lineage": 5}, {"lineage": {"a": 1}}, {"model": "os:system"},
                          {"model": {"name": "os:system", "input_shape": [8, 8, 1], "num_classes": 10}},
                          {"model": {"name": "mlp", "input_shape": "x"}}, {"model": [1]},
                          {"masks": "x"}, {"inputs": 5}])
        meta = json.loads(meta_e["plain"])
        meta["dptoolkit"] = rec
        meta_e["plain"] = dumps(meta)
        desc = f"metadata dptoolkit := {_short(rec)}"
    elif op == "registered":
        i = rng.choice(dense)
        layers[i]["registered_name"] = rng.choice(["os>system", "builtins>exec", 5, "Custom>Nothing"])
        layers[i]["module"] = rng.choice([None, "os", "keras.layers", "", "trainer.models"])
        desc = f"registered_name {layers[i]['registered_name']!r}, module {layers[i]['module']!r}"
    elif op == "dtype":
        i = rng.choice(dense)
        layers[i]["config"]["dtype"] = rng.choice(["float99", "string", "object", 5, {"class_name": "DTypePolicy",
                                                                                    "config": {"name": "int8"}}])
        desc = f"dtype := {_short(layers[i]['config']['dtype'])}"
    elif op == "build_config":
        i = rng.choice(dense)
        layers[i]["build_config"] = rng.choice([{"input_shape": [None, -1]}, {"input_shape": "x"},
                                                {"input_shape": [None, 10 ** 9]}, [], {"shapes_dict": 5}])
        desc = f"build_config := {_short(layers[i]['build_config'])}"
    elif op == "initializer":
        i = rng.choice(dense)
        layers[i]["config"]["kernel_initializer"] = rng.choice([
            {"module": "keras.initializers", "class_name": "Constant", "config": {"value": "x"}},
            {"module": "keras.initializers", "class_name": "NoSuch", "config": {}}, "ones_or_not", 7])
        desc = f"kernel_initializer := {_short(layers[i]['config']['kernel_initializer'])}"
    elif op == "huge_number":
        path = rng.choice([p for p in paths(config) if p and isinstance(get(config, p), int)
                           and not isinstance(get(config, p), bool)])
        config = put(config, path, rng.choice([10 ** 12, 2 ** 63, -(10 ** 12)]))
        desc = f"{_p(path)} := huge"
    elif op == "name_type":
        i = rng.choice(dense)
        layers[i]["config"]["name"] = rng.choice([5, None, ["a"], "a/b", "../../x", ""])
        desc = f"layer name := {layers[i]['config']['name']!r}"
    if config is not None:
        cfg_e["plain"] = dumps(config)
    c.input, c.kind = d / "x.keras", "keras"
    c.input.write_bytes(zip_bytes(entries))
    c.desc = f"{Path(src).name}: {desc}"


def _weights_h5(c: Case, seeds, d: Path):
    k2 = Path(seeds["k2"])
    src, c.good = c.rng.choice([(seeds["weights"], seeds["good_keras"]),
                                (str(k2 / "plain" / "functional.weights.h5"),
                                 str(k2 / "plain" / "functional.keras"))])
    c.input, c.kind = d / "x.weights.h5", "weights"
    if c.index % 5 < 2:
        data = Path(src).read_bytes()
        out, desc = byte_mutation(data, c.rng, [("superblock", 0, 96), ("first 4k", 0, 4096)])
        c.input.write_bytes(out)
    else:
        desc = h5_structural(Path(src), c.input, c.rng, d, Path(seeds["legacy"]), False, str(d / SENTINEL))
    c.desc = f"{Path(src).name}: {desc}"


def _legacy_h5(c: Case, seeds, d: Path):
    import h5py
    import numpy as np
    k2 = Path(seeds["k2"])
    src, c.good = c.rng.choice([(seeds["legacy"], seeds["good_keras"]),
                                (str(k2 / "plain" / "functional.h5"), str(k2 / "plain" / "functional.keras"))])
    c.input, c.kind = d / "x.h5", "legacy"
    rng = c.rng
    sentinel = str(d / SENTINEL)
    k = c.index % 6
    if k < 2:
        data = Path(src).read_bytes()
        out, desc = byte_mutation(data, rng, [("superblock", 0, 96)])
        c.input.write_bytes(out)
    elif k in (2, 3):
        shutil.copy(src, c.input)
        with h5py.File(c.input, "r+") as f:
            config = json.loads(f.attrs["model_config"])
            op = rng.choice(["tree", "tree", "bad_json", "type", "evil", "deep", "delete"])
            if op == "tree":
                new, desc = mutate_json_tree(config, rng, sentinel)
                f.attrs["model_config"] = dumps(new)
            elif op == "bad_json":
                f.attrs["model_config"] = rng.choice([b"{", b"\xff\xfe", b"[]", b"null", b"5", b""])
                desc = f"model_config := {f.attrs['model_config']!r}"
            elif op == "type":
                f.attrs["model_config"] = rng.choice([np.arange(4), np.float64(1.5), np.array([b"a", b"b"])])
                desc = "model_config attribute is not a string"
            elif op == "evil":
                config["config"]["layers"][-1] = {"module": "os", "class_name": "system",
                                                  "config": f"touch {sentinel}"}
                f.attrs["model_config"] = dumps(config)
                desc = "last layer := os.system('touch SENTINEL')"
            elif op == "deep":
                f.attrs["model_config"] = dumps({"class_name": "Functional", "config": nested(900, 1, "dict")})
                desc = "model_config nested 900 deep"
            else:
                del f.attrs["model_config"]
                desc = "model_config attribute removed (weights only)"
    elif k == 4:
        shutil.copy(src, c.input)
        with h5py.File(c.input, "r+") as f:
            mw = f["model_weights"]
            layer = rng.choice([n.decode() if isinstance(n, bytes) else n for n in mw.attrs["layer_names"]])
            op = rng.choice(["layer_names_missing", "layer_names_int", "layer_names_empty", "weight_names_bad",
                             "weight_names_int", "weight_names_dup", "layer_names_del", "mw_dataset",
                             "layer_names_long", "training_config"])
            if op == "layer_names_missing":
                mw.attrs["layer_names"] = np.array([b"nope", layer.encode()])
            elif op == "layer_names_int":
                mw.attrs["layer_names"] = np.arange(3)
            elif op == "layer_names_empty":
                mw.attrs["layer_names"] = np.array([], dtype="S1")
            elif op == "weight_names_bad":
                mw[layer].attrs["weight_names"] = np.array([b"../../etc/passwd", b"nope/kernel:0"])
            elif op == "weight_names_int":
                mw[layer].attrs["weight_names"] = np.arange(2)
            elif op == "weight_names_dup":
                wn = list(mw[layer].attrs.get("weight_names", []))
                mw[layer].attrs["weight_names"] = np.array((wn + wn) or [b"x:0", b"x:0"])
            elif op == "layer_names_del":
                del mw.attrs["layer_names"]
            elif op == "mw_dataset":
                del f["model_weights"]
                f.create_dataset("model_weights", data=np.zeros(3))
                f["model_weights"].attrs["layer_names"] = np.array([b"dense1"])
            elif op == "layer_names_long":
                mw.attrs["layer_names"] = np.array([b"x" * 60000])
            else:
                f.attrs["training_config"] = rng.choice([b"{", b'{"optimizer_config": 5}', b"\xff"])
            desc = f"{op} ({layer})"
    else:
        desc = h5_structural(Path(src), c.input, rng, d, Path(seeds["weights"]), True, sentinel)
    c.desc = f"{Path(src).name}: {desc}"


def _tfckpt(c: Case, seeds, d: Path):
    k2 = Path(seeds["k2"])
    rng = c.rng
    form = c.index % 2
    if form == 0:  # a bare prefix
        prefix, good = rng.choice([(Path(seeds["run_ckpt"]) / "state", seeds["good"]),
                                   (k2 / "plain" / "tfckpt" / "model", str(k2 / "plain" / "functional.keras"))])
        for f in prefix.parent.iterdir():
            if f.name.startswith(prefix.name + "."):
                shutil.copy(f, d / f.name.replace(prefix.name, "ck", 1))
        c.input, c.kind, c.good = d / "ck", "prefix", good
        where, name = d, "ck"
        origin = str(prefix)
    else:  # RUN/checkpoints/ckpt-N inside a copied run directory
        run, good = rng.choice([(Path(seeds["run"]), seeds["good"]), (k2 / "project" / "client0", seeds["good"])])
        shutil.copytree(run, d / "run")
        ck = next((d / "run" / "checkpoints").iterdir())
        c.input, c.kind, c.good = ck, "ckptdir", good
        where, name = ck, "state"
        origin = f"{run.name}/checkpoints/{ck.name}"
    index, data = where / f"{name}.index", where / f"{name}.data-00000-of-00001"
    ops = ["index_bytes", "index_bytes", "index_bytes", "data_bytes", "data_bytes", "no_data", "shards",
           "empty_index", "index_other", "swap_data", "index_is", "meta", "meta", "checkpoint_file"]
    op = ops[(c.index // 2) % len(ops)]
    if op == "index_bytes":
        out, desc = byte_mutation(index.read_bytes(), rng)
        index.write_bytes(out)
    elif op == "data_bytes":
        out, desc = byte_mutation(data.read_bytes(), rng)
        data.write_bytes(out)
    elif op == "no_data":
        data.unlink()
        desc = "data shard missing"
    elif op == "shards":
        data.rename(where / f"{name}.data-00000-of-00002")
        desc = "data shard renamed -00000-of-00002 (one of two)"
    elif op == "empty_index":
        index.write_bytes(b"")
        desc = "empty .index"
    elif op == "index_other":  # another checkpoint's index over these data
        other = rng.choice([Path(seeds["run_ckpt"]) / "state.index", k2 / "plain" / "tfckpt" / "model.index",
                            Path(seeds["pruned"]) / "checkpoints"])
        if other.is_dir():
            other = next(other.iterdir()) / "state.index"
        shutil.copy(other, index)
        desc = f"index of {other.parent.name}/{other.name} over these data"
    elif op == "swap_data":
        data.write_bytes(data.read_bytes()[::-1])
        desc = "data shard reversed"
    elif op == "index_is":
        index.write_bytes(rng.choice([Path(seeds["run_keras"]).read_bytes()[:4096], b"\x80\x04K\x01.",
                                      Path(seeds["weights"]).read_bytes()[:4096], b"\0" * 48]))
        desc = f".index replaced by {index.read_bytes()[:8]!r}..."
    elif op == "meta":
        meta = d / "ck" if form == 0 else where / "meta.json"
        if form == 0:  # a prefix has no meta: mutate the index instead
            out, desc = flip(index.read_bytes(), rng, count=1)
            index.write_bytes(out)
        else:
            new = rng.choice([b"{", b"[]", b"null", dumps({"samples_seen": "many", "step": 1}),
                              dumps({"samples_seen": -3}), dumps({"samples_seen": [1]}),
                              dumps({"samples_seen": 10 ** 30}), dumps({"samples_seen": 1e308}), b"\xff"])
            meta.write_bytes(new)
            desc = f"meta.json := {new[:40]!r}"
    else:  # the `checkpoint` text file TF writes beside prefixes
        (where / "checkpoint").write_text(rng.choice(['model_checkpoint_path: "/etc/passwd"\n', "\xff garbage",
                                                      'model_checkpoint_path: "../../../x"\n']))
        out, desc = flip(index.read_bytes(), rng, count=1)
        index.write_bytes(out)
        desc = "checkpoint file garbage; " + desc
    c.desc = f"{origin}: {desc}"


USER_MODELS = ["os:system", "subprocess:getoutput", "subprocess:call", "builtins:exec", "builtins:eval",
               "posix:system", "shutil:rmtree", "fuzzevil:build", "fuzzevil:touch"]


def _manifest(c: Case, seeds, d: Path):
    k2 = Path(seeds["k2"])
    rng = c.rng
    sentinel = str(d / SENTINEL)
    choices = [(seeds["run"], seeds["good"]), (seeds["init"], seeds["good"]), (seeds["pruned"], seeds["good"]),
               (seeds["mergedir"], seeds["good"]), (str(k2 / "project" / "client0"), seeds["good"]),
               (str(k2 / "project" / "pruned"), seeds["good"]), (str(k2 / "project" / "global"), seeds["good"])]
    src, c.good = rng.choice(choices)
    run = d / "run"
    shutil.copytree(src, run)
    c.input, c.kind = run, "rundir"
    path = run / "manifest.json"
    m = json.loads(path.read_text())
    ops = ["tree", "tree", "tree", "user_model", "user_model", "user_model", "latest", "kind", "format",
           "samples", "model_shape", "num_classes", "options", "whole", "checkpoints", "lineage", "final",
           "delete_exported"]
    op = ops[c.index % len(ops)]
    if op == "tree":
        m, desc = mutate_json_tree(m, rng, sentinel)
    elif op == "user_model":
        c.trainer, c.trainer_model, c.syspath = True, None, True
        name = USER_MODELS[(c.index // len(ops)) % len(USER_MODELS)]
        if rng.random() < 0.5:
            name = rng.choice(USER_MODELS)
        (d / "fuzzevil.py").write_text(
            f"open({sentinel!r}, 'w').write('imported')\n"
            f"def build(*a, **k):\n    open({sentinel!r}, 'w').write('called')\n"
            f"def touch(*a, **k):\n    open({sentinel!r}, 'w').write('called')\n")
        m["model"] = {"name": name, "input_shape": rng.choice([[8, 8, 1], f"touch {sentinel}"]),
                      "num_classes": 10, "options": {"command": f"touch {sentinel}", "cmd": f"touch {sentinel}",
                                                     "source": f"open({sentinel!r}, 'w')"}}
        removed = rng.random() < 0.5
        if removed:
            (run / "model.keras").unlink(missing_ok=True)
        desc = f"model name {name!r} (command: touch SENTINEL){', model.keras removed' if removed else ''}"
    elif op == "latest":
        new = rng.choice(["../../../etc", "/etc", "ckpt-99999999", "", 5, [], None, "ckpt-00000002/../..",
                          "../" + Path(seeds["run_ckpt"]).name, "."])
        m["latest"] = new
        desc = f"latest := {new!r}"
    elif op == "kind":
        m["kind"] = rng.choice(["merge", "init", "run", 5, None, "", ["merge"]])
        desc = f"kind := {m['kind']!r}"
    elif op == "format":
        m["format"] = rng.choice(["dptoolkit-run/2", "", None, 1, "DPTOOLKIT-RUN/1"])
        desc = f"format := {m['format']!r}"
    elif op == "samples":
        m["samples_seen"] = rng.choice(["many", -5, 1.5, [1], {}, 10 ** 30, float("nan"), float("inf"), True, 0])
        desc = f"samples_seen := {m['samples_seen']!r}"
    elif op == "model_shape":
        new = rng.choice([[-8, 8, 1], [10 ** 12], ["8", 8, 1], [], None, "x", [[8]], [8.5, 8, 1], [0, 8, 1],
                          [10 ** 5, 10 ** 5, 1]])
        m.setdefault("model", {})
        if isinstance(m["model"], dict):
            m["model"]["input_shape"] = new
        desc = f"model.input_shape := {new!r}"
    elif op == "num_classes":
        new = rng.choice(["10", 0, -1, 10 ** 12, 1.5, True, None, [10], 10 ** 7])
        if isinstance(m.get("model"), dict):
            m["model"]["num_classes"] = new
        desc = f"model.num_classes := {new!r}"
    elif op == "options":
        new = rng.choice([{"units": 10 ** 12}, {"dropout": "x"}, {"dropout": 2.0}, [1], "x",
                          {"recurrent_dropout": -1}, {"__class__": 1}, {"dropout": None}])
        if isinstance(m.get("model"), dict):
            m["model"]["options"] = new
        desc = f"model.options := {new!r}"
    elif op == "whole":
        raw = rng.choice([b"[]", b'"x"', b"null", b"5", b"{", b"\xff\xfe", b"\xef\xbb\xbf{}", b"",
                          b'{"a":' * 5000 + b"1" + b"}" * 5000, ("[" * 100000).encode()])
        path.write_bytes(raw)
        c.desc = f"{Path(src).name}: manifest.json := {raw[:30]!r}"
        return
    elif op == "checkpoints":
        m["checkpoints"] = rng.choice([5, "x", [None], [{"a": 1}], ["../../etc"], None])
        desc = f"checkpoints := {m['checkpoints']!r}"
    elif op == "lineage":
        m["lineage"] = rng.choice([5, [], {"a": 1}, "", None, "sha256:" + "0" * 64, "x" * 100000])
        desc = f"lineage := {_short(m['lineage'])}"
    elif op == "final":
        m["final"] = rng.choice([5, "x", {"keras": "../../etc/passwd"}, {"keras": 5}, {"keras": "/etc/passwd"}])
        desc = f"final := {m['final']!r}"
    else:
        (run / "model.keras").unlink(missing_ok=True)
        m, desc = mutate_json_tree(m, rng, sentinel)
        desc = "model.keras removed; " + desc
    path.write_bytes(dumps(m))
    c.desc = f"{Path(src).name}: {desc}"


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


def _bombs(c: Case, seeds, d: Path):
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
        e.update(_encode(e))
        e["size"] = e["csize"] = 10 ** 12
        desc = f"{e['name']} stored, declared 10**12 bytes (zip64)"
    elif op == "declared_huge_deflate":
        w.update(method=8)
        w.update(_encode(w))
        w["size"] = 10 ** 12
        desc = "model.weights.h5 deflated, declared 10**12 bytes uncompressed"
    elif op == "declared_4g":
        w.update(_encode(w))
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


# =============================================================================
# The worker: runs the CLIs in-process, one case at a time
# =============================================================================

class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a command that ran past its time (BaseException:
    an `except Exception` in the code under test does not swallow it)."""


def _status(field: str) -> int:
    """kB of a /proc/self/status field."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _frames(tb) -> list[list]:
    import traceback
    return [[f.filename, f.lineno, f.name] for f in traceback.extract_tb(tb)]


def run_command(tool: str, argv: list[str], timeout: float) -> dict:
    """One CLI call in this process: exit code, captured fd 1/2 (Python and
    native writes), the exception that escaped main() if any, peak memory."""
    import signal
    import tempfile
    import time
    mod = sys.modules["merge.cli" if tool == "merge" else "trainer.cli"]
    res = {"tool": tool, "argv": argv, "rc": None, "exc": None, "timeout": False}
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)

        def alarm(signum, frame):
            raise CaseTimeout(f"still running after {timeout:.0f}s")

        old = signal.signal(signal.SIGALRM, alarm)
        rss0 = _status("VmRSS")
        peak_ok = _reset_peak()
        t0 = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            try:
                res["rc"] = mod.main(list(argv))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except SystemExit as e:
            res["rc"] = e.code if isinstance(e.code, int) or e.code is None else 1
            if e.code is None:
                res["rc"] = 0
        except CaseTimeout as e:
            res["timeout"] = True
            res["exc"] = {"type": "CaseTimeout", "msg": str(e), "frames": _frames(e.__traceback__)}
        except BaseException as e:  # noqa: BLE001  anything escaping main() is the finding
            res["exc"] = {"type": type(e).__name__, "msg": str(e)[:2000], "frames": _frames(e.__traceback__)}
        finally:
            signal.signal(signal.SIGALRM, old)
            res["seconds"] = round(time.monotonic() - t0, 3)
            res["peak_mb"] = round((_status("VmHWM") - rss0) / 1024, 1) if peak_ok else None
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except Exception:  # noqa: BLE001
                pass
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        res["stdout"] = out.read()[-4000:].decode("utf-8", "replace")
        res["stderr"] = err.read()[-8000:].decode("utf-8", "replace")
    return res


def run_case(spec: dict, timeout: float, trainer_timeout: float) -> list[dict]:
    case_dir = spec["dir"]
    sentinel = Path(spec["sentinel"])
    results = []
    cwd = os.getcwd()
    os.chdir(case_dir)
    if spec.get("syspath"):
        sys.path.insert(0, case_dir)
    try:
        for cmd in spec["cmds"]:
            r = run_command(cmd["tool"], cmd["argv"], trainer_timeout if cmd["tool"] == "trainer" else timeout)
            r["allowed"] = cmd["allowed"]
            r["sentinel"] = sentinel.exists()
            results.append(r)
            if r["sentinel"]:
                break
    finally:
        os.chdir(cwd)
        if spec.get("syspath"):
            sys.path.remove(case_dir)
        for name in [m for m in sys.modules if m.startswith("fuzzevil")]:
            del sys.modules[name]
    return results


def _limit_resources(headroom_mb: int) -> dict:
    import resource
    import signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG instead
    vm = _status("VmSize") * 1024
    limit = vm + headroom_mb * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (512 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return {"vm_mb": vm >> 20, "limit_mb": limit >> 20}


def worker() -> None:
    """Requests on stdin, one JSON object a line; answers on stdout after PROTO."""
    import faulthandler
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray writes outside a command go to the log, not the protocol pipe
    # Its own descriptor of the log: a command's fd 2 is captured, and a crash
    # inside one must still reach the log the parent reads.
    crash_log = os.fdopen(os.dup(2), "w")
    faulthandler.enable(file=crash_log, all_threads=False)
    sys.path.insert(0, str(REPO))
    from trainer.quiet import install
    install()
    import merge.cli  # noqa: F401
    import trainer.cli  # noqa: F401
    import tensorflow  # noqa: F401
    import keras  # noqa: F401
    import h5py  # noqa: F401
    import merge.layers  # noqa: F401
    import trainer.models  # noqa: F401

    def send(obj):
        proto.write(PROTO + json.dumps(obj) + "\n")
        proto.flush()

    def call(tool, argv):
        r = run_command(tool, argv, 300)
        if r["exc"] or r["rc"] != 0:
            sys.stderr.write(json.dumps(r)[:3000] + "\n")
        return r["rc"]

    send({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "seeds":
            seeds = build_seeds(Path(req["root"]), call)
            send({"seeds": seeds})
        elif op == "warm":
            for argv in req["argvs"]:
                call("merge", argv)
            send({"warm": True, **_limit_resources(req["headroom_mb"])})
        elif op == "case":
            sys.stderr.write(f"--- case {req['spec']['id']}\n")
            sys.stderr.flush()
            res = run_case(req["spec"], req["timeout"], req["trainer_timeout"])
            send({"results": res, "vm_mb": _status("VmSize") >> 10})
        elif op == "exit":
            break


if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        worker()
    else:
        sys.exit("usage: fuzz_inputs.py worker")
