"""The three .keras families (each case is `family:index`, fully determined by that id):
  keras_bytes   .keras archives truncated, byte-flipped, zeroed, spliced
  keras_zip     .keras zip structure: members renamed, dropped, cut short,
                duplicated, declared larger, other compressions, encryption bit,
                bad CRCs, broken central directory
  keras_config  config.json / metadata.json of a .keras: wrong types, negative
                and huge shapes, deep nesting, modules a config names (os.system)
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from .mutate import (byte_mutation, dumps, encode_entry, get, members, mutate_json_tree, nested, path_text,
                     paths, put, short_json, zip_bytes)
from .settings import SENTINEL

if TYPE_CHECKING:
    from .cases import Case


def _keras_seeds(seeds):
    """(seed .keras, a good same-architecture input) pairs."""
    k2 = Path(seeds["k2"])
    return [(seeds["run_keras"], seeds["good_keras"]), (seeds["merged_keras"], seeds["good"]),
            (str(k2 / "project" / "global.keras"), seeds["good_keras"]),
            (str(k2 / "plain" / "functional.keras"), str(k2 / "plain" / "functional.h5"))]


def keras_bytes(c: Case, seeds, d: Path):
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


def keras_zip(c: Case, seeds, d: Path):
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
        e.update(encode_entry(e))
        keep = rng.randrange(len(e["data"]))
        e["data"] = e["data"][:keep]
        desc += f" to {keep} bytes (sizes still say {e['size']})"
    elif op == "cut_short_honest":  # sizes updated, CRC of the whole member
        crc = zlib.crc32(e["plain"])
        e["plain"] = e["plain"][: rng.randrange(len(e["plain"]))]
        e["crc"] = crc
        desc += f" to {len(e['plain'])} bytes, stale CRC"
    elif op == "declared_larger":
        e.update(encode_entry(e))
        e["size"] = e["csize"] = e["size"] * rng.choice([2, 10]) + 1
        desc += f" declared {e['size']} bytes"
    elif op == "declared_smaller":
        e.update(encode_entry(e))
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


def keras_config(c: Case, seeds, d: Path):
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
        desc = f"activation := {short_json(new)}"
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
        desc = f"inbound_nodes of layer {i} := {short_json(new)}"
    elif op == "dup_names":
        for i in dense:
            layers[i]["config"]["name"] = "same"
            layers[i]["name"] = "same"
        desc = "every Dense layer named 'same'"
    elif op == "top_type":
        config = rng.choice([[], "Functional", 1, None, {"class_name": "Functional"}, {"config": None},
                             {"class_name": "Sequential", "config": {"layers": "x"}}])
        desc = f"config.json := {short_json(config)}"
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
        desc = f"metadata dptoolkit := {short_json(rec)}"
    elif op == "registered":
        i = rng.choice(dense)
        layers[i]["registered_name"] = rng.choice(["os>system", "builtins>exec", 5, "Custom>Nothing"])
        layers[i]["module"] = rng.choice([None, "os", "keras.layers", "", "trainer.models"])
        desc = f"registered_name {layers[i]['registered_name']!r}, module {layers[i]['module']!r}"
    elif op == "dtype":
        i = rng.choice(dense)
        layers[i]["config"]["dtype"] = rng.choice(["float99", "string", "object", 5, {"class_name": "DTypePolicy",
                                                                                    "config": {"name": "int8"}}])
        desc = f"dtype := {short_json(layers[i]['config']['dtype'])}"
    elif op == "build_config":
        i = rng.choice(dense)
        layers[i]["build_config"] = rng.choice([{"input_shape": [None, -1]}, {"input_shape": "x"},
                                                {"input_shape": [None, 10 ** 9]}, [], {"shapes_dict": 5}])
        desc = f"build_config := {short_json(layers[i]['build_config'])}"
    elif op == "initializer":
        i = rng.choice(dense)
        layers[i]["config"]["kernel_initializer"] = rng.choice([
            {"module": "keras.initializers", "class_name": "Constant", "config": {"value": "x"}},
            {"module": "keras.initializers", "class_name": "NoSuch", "config": {}}, "ones_or_not", 7])
        desc = f"kernel_initializer := {short_json(layers[i]['config']['kernel_initializer'])}"
    elif op == "huge_number":
        path = rng.choice([p for p in paths(config) if p and isinstance(get(config, p), int)
                           and not isinstance(get(config, p), bool)])
        config = put(config, path, rng.choice([10 ** 12, 2 ** 63, -(10 ** 12)]))
        desc = f"{path_text(path)} := huge"
    elif op == "name_type":
        i = rng.choice(dense)
        layers[i]["config"]["name"] = rng.choice([5, None, ["a"], "a/b", "../../x", ""])
        desc = f"layer name := {layers[i]['config']['name']!r}"
    if config is not None:
        cfg_e["plain"] = dumps(config)
    c.input, c.kind = d / "x.keras", "keras"
    c.input.write_bytes(zip_bytes(entries))
    c.desc = f"{Path(src).name}: {desc}"
