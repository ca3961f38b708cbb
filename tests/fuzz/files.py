"""The file and directory families other than .keras archives (each case is
`family:index`, fully determined by that id):
  weights_h5    Keras v3 .weights.h5: bytes, datasets removed/reshaped/retyped,
                external links, soft-link cycles, external raw storage
  legacy_h5     legacy whole-model .h5: bytes, model_config / layer_names /
                weight_names attributes of wrong types, links
  tfckpt        TF checkpoints: prefix.index / prefix.data-* bytes, missing and
                swapped shards, and trainer checkpoint directories (meta.json)
  manifest      trainer run / init / merge directories: manifest.json fields of
                wrong types, `latest` escaping the run, model names that are
                `package.module:function` (must never be imported or called)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .mutate import byte_mutation, dumps, flip, h5_structural, mutate_json_tree, nested, short_json
from .settings import SENTINEL

if TYPE_CHECKING:
    from .cases import Case


def weights_h5(c: Case, seeds, d: Path):
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


def legacy_h5(c: Case, seeds, d: Path):
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


def tfckpt(c: Case, seeds, d: Path):
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


def manifest(c: Case, seeds, d: Path):
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
        desc = f"lineage := {short_json(m['lineage'])}"
    elif op == "final":
        m["final"] = rng.choice([5, "x", {"keras": "../../etc/passwd"}, {"keras": 5}, {"keras": "/etc/passwd"}])
        desc = f"final := {m['final']!r}"
    else:
        (run / "model.keras").unlink(missing_ok=True)
        m, desc = mutate_json_tree(m, rng, sentinel)
        desc = "model.keras removed; " + desc
    path.write_bytes(dumps(m))
    c.desc = f"{Path(src).name}: {desc}"
