"""`merge inspect` and `merge diff`: what an input holds, and what would stop
two inputs from being averaged."""
from __future__ import annotations

import numpy as np

from trainer.checkpoint import round_of
from trainer.errors import UsageError, one_line
from trainer.files.naming import VariableLayout
from trainer.files.sources import H5Source, open_source

from .inputs import Inputs, tensor_differences


def inspect(path: str) -> dict:
    src = open_source(path)
    try:
        note = None
        if isinstance(src, H5Source) and src.needs_architecture:
            src.bind_paths()
            note = ("names are the file's own paths: a Keras weights file stores tensors by position; "
                    "give its .keras file or run directory to see layer names")
        variables = {}
        if src.family == "keras" and src.config:
            # Keras v3 files name tensors by position inside a layer; the
            # variable names need the model built, which may fail without
            # taking the rest of the listing with it.
            try:
                variables = VariableLayout(src.config).var_of
            except Exception as e:  # noqa: BLE001  any failure to build only costs the names
                note = f"variable names unknown: {e if isinstance(e, UsageError) else one_line(e, typed=False)}"
        tensors = []
        for key in src.keys():
            shape, dtype = src.info(key)
            x = np.asarray(src.read(key))  # one tensor at a time
            zeros = int(x.size - np.count_nonzero(x))
            row = {"name": key, "variable": variables.get(key, key), "shape": list(shape), "dtype": str(dtype),
                   "params": int(x.size), "zeros": zeros / x.size if x.size else 0.0, "masked": src.has_mask(key)}
            if src.has_mask(key):
                row["pruned"] = float(1.0 - (np.asarray(src.read_mask(key)) > 0).mean())
            tensors.append(row)
        return {"path": src.path, "format": src.format, "naming": src.family, "lineage": src.lineage,
                "round": round_of(src.manifest),
                "samples_seen": src.samples, "model": (src.model_cfg or {}).get("name")
                or (src.config or {}).get("config", {}).get("name"),
                "params": sum(t["params"] for t in tensors), "tensors": tensors, "note": note}
    finally:
        src.close()



def format_inspect(info: dict) -> str:
    lines = [f"{info['path']}: {info['format']}, model {info['model'] or 'unknown'}, "
             f"{info['params']:,} parameters in {len(info['tensors'])} tensors",
             f"lineage: {info['lineage'] or 'unknown (no manifest)'}"
             + (f"; round {info['round']}" if info.get("round") is not None else ""),
             f"samples seen: {info['samples_seen'] if info['samples_seen'] is not None else 'unknown'}"]
    if info.get("note"):
        lines.append(f"note: {info['note']}")
    def label(t):
        return t["name"] if t["variable"] == t["name"] else f"{t['name']} ({t['variable']})"

    width = max(len(label(t)) for t in info["tensors"]) if info["tensors"] else 6
    lines.append(f"{'tensor':<{width}}  {'shape':<18} {'dtype':<8} {'zeros':>7}  mask")
    for t in info["tensors"]:
        mask = f"pruned {t['pruned']:.1%}" if t["masked"] else "-"
        lines.append(f"{label(t):<{width}}  {str(tuple(t['shape'])):<18} {t['dtype']:<8} {t['zeros']:>7.1%}  {mask}")
    return "\n".join(lines)


def diff(a: str, b: str) -> tuple[list[str], str | None]:
    """Every blocker, one line each: missing tensors, shapes, dtypes, lineage
    (an empty list means `merge fedavg A B` would average them), and the line
    saying layers were paired by place, if they were."""
    with Inputs([a, b]) as inputs:
        sa, sb = inputs.sources
        problems = [{"missing": f"tensor {k}: only in {a}", "extra": f"tensor {k}: only in {b}",
                     "shape": f"tensor {k}: shape {x} in {a}, {y} in {b}",
                     "dtype": f"tensor {k}: dtype {x} in {a}, {y} in {b}"}[kind]
                    for kind, k, x, y in tensor_differences(sa, sb)]
        if sa.lineage and sb.lineage and sa.lineage != sb.lineage:
            problems.append(f"lineage: different initializations ({sa.lineage[:19]}... vs {sb.lineage[:19]}...); "
                            "average only with --force, or use `merge ensemble`")
        elif bool(sa.lineage) != bool(sb.lineage):
            missing, other = (a, b) if not sa.lineage else (b, a)
            problems.append(f"lineage: {missing} records no initialization, {other} does; "
                            "average only with --force")
        note = inputs.pairing_note()
        reason = inputs.mismatch.get(sb.path) or inputs.mismatch.get(sa.path)
        if reason:
            if problems:
                problems.append(f"structure: {reason}")
            else:  # the same tensors in another graph: fedavg warns, but averages
                note = f"the graphs differ ({reason}); tensors are matched by name"
        return problems, note
