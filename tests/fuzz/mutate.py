"""Mutation helpers for the fuzz families: byte-level changes, a zip writer
that can lie, JSON tree changes and HDF5 structural changes. Every random
choice comes from the `rng` passed in, so a mutant depends only on its case id."""
from __future__ import annotations

import copy
import json
import random
import shutil
import struct
import zlib
from pathlib import Path


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


def encode_entry(e: dict) -> dict:
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
    for e in map(encode_entry, entries):
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
        return delete(obj, path), f"deleted {path_text(path)}"
    value = get(obj, path)
    if op == 1 and isinstance(value, (int, float)) and not isinstance(value, bool):
        new = rng.choice([-value if value else -1, 0, str(value), value + 0.5, -(10 ** 6)])
        return put(obj, path, new), f"{path_text(path)}: {value!r} -> {new!r}"
    if op == 2 and isinstance(value, list):
        new = rng.choice([value + value, value[::-1], value[:1], [], {"0": value}, [value]])
        return put(obj, path, new), f"{path_text(path)}: list reshaped"
    new = wrong_value(rng, sentinel)
    return put(obj, path, new), f"{path_text(path)} := {short_json(new)}"


def path_text(path) -> str:
    return "/".join(map(str, path)) or "<root>"


def short_json(v) -> str:
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
