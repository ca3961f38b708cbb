"""Pruning costs and savings on cifar10_cnn with synthetic data, in one run.

* step time: our dense training, our masked training (masks applied in the
  compiled step, mask updates every 10 steps counted in), and TensorFlow
  Model Optimization's prune_low_magnitude beside Keras's dense fit as the
  reference; each ratio is taken within its own framework, per repetition,
  and the median reported;
* size at 90% sparsity: our compressed sparse artifact against the dense .keras;
* structured removal of half the dense units: inference time of the sliced
  model against the masked one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .scaling import REPO, _run, write_section


def ours(steps, batch, extra=()):
    """(seconds per step, run directory manifest, sizes) of python -m trainer."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        _run([sys.executable, "-m", "trainer", "--model", "cifar10_cnn", "--data", "synthetic", "--batch-size", batch,
              "--max-steps", steps + 1, "--epochs", 1000, "--out", run, "--quiet", *extra], None)
        m = json.loads((run / "manifest.json").read_text())
        sizes = {p.name: p.stat().st_size for p in run.glob("model.*") if p.is_file()}
        return batch / m["final"]["samples_per_sec"], m, sizes


def tfmot(steps, batch):
    """TFMOT's dense and pruned fit steps, from its own Keras 2 environment
    (DPT_TFMOT_PYTHON, which ./run bench builds); None where there is none."""
    python = os.environ.get("DPT_TFMOT_PYTHON")
    if not python:
        return None
    out = _run([python, REPO / "bench" / "tfmot_reference.py", "--steps", steps, "--batch-size", batch], None)
    return json.loads(out.strip().splitlines()[-1])


def structured_speedup(reps: int = 30) -> dict:
    import numpy as np
    import tensorflow as tf
    from trainer.models import build_model
    from trainer.pruning.structured import select_units, slice_model, unit_masks
    from trainer.varnames import keyed
    model = build_model("cifar10_cnn", (32, 32, 3), 10)
    keep = select_units(model, 0.5, layer_regex=r"local.*")
    masks = unit_masks(model, keep)
    for name, w in keyed(model.weights).items():
        if name in masks:
            w.assign(w * masks[name])
    small = slice_model(model, keep)
    x = tf.constant(np.random.default_rng(0).random((256, 32, 32, 3), dtype=np.float32))

    def timed(mdl):
        f = tf.function(lambda t: mdl(t, training=False))
        f(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f(x).numpy()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    full_t, small_t = timed(model), timed(small)
    diff = float(np.max(np.abs(model(x).numpy() - small(x).numpy())))
    return {"masked_s": full_t, "sliced_s": small_t, "speedup": full_t / small_t, "max_abs_diff": diff,
            "params": (model.count_params(), small.count_params())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench pruning")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--write", default=str(REPO / "docs" / "benchmarks.md"))
    a = p.parse_args(argv)
    S, B = a.steps, a.batch_size
    prune = ("--prune", "--target-sparsity", "0.9", "--prune-end", str(S))
    rows = []
    started = time.time()
    for rep in range(a.reps):
        dense_s, _, _ = ours(S, B)
        masked_s, m, sizes = ours(S, B, prune + ("--prune-every", "10"))
        masked100_s, _, _ = ours(S, B, prune + ("--prune-every", "100"))
        ref = tfmot(S, B) or {"dense_s_per_step": float("nan"), "pruned_s_per_step": float("nan")}
        rows.append({"dense": dense_s, "masked": masked_s, "masked100": masked100_s,
                     "tfmot_dense": ref["dense_s_per_step"],
                     "tfmot_pruned": ref["pruned_s_per_step"], "sizes": sizes,
                     "sparsity": m["pruning"]["sparsity"]})
        print(f"rep {rep + 1}: {rows[-1]}", file=sys.stderr, flush=True)
    st = structured_speedup()
    report = render(rows, st, a, time.time() - started)
    print(report)
    if a.write:
        write_section(Path(a.write), "pruning", report)
    return 0


def render(rows, st, a, seconds) -> str:
    from .scaling import _cpu_name
    import os
    import platform
    med = lambda f: statistics.median(f(r) for r in rows)  # noqa: E731
    ours_ratio = med(lambda r: r["masked"] / r["dense"])
    ref_ratio = med(lambda r: r["tfmot_pruned"] / r["tfmot_dense"])
    size_ratio = med(lambda r: r["sizes"]["model.sparse.npz"] / r["sizes"]["model.keras"])
    sizes = rows[-1]["sizes"]
    return "\n".join([
        "## Pruning (cifar10_cnn, synthetic data)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} with {os.cpu_count()} cores ({_cpu_name()}), "
        f"one process, batch {a.batch_size}, {a.steps} timed steps after one untimed compile step, "
        f"median of {a.reps} interleaved repetitions ({seconds / 60:.1f} min). `python -m bench pruning` reproduces it.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| ours: dense step | {med(lambda r: r['dense']) * 1e3:.1f} ms | |",
        f"| ours: masked step (90% target, updates every 10 steps) | {med(lambda r: r['masked']) * 1e3:.1f} ms | |",
        f"| ours: masked / dense | {ours_ratio:.3f} | <= 1.05 |",
        f"| ours: masked step, updates every 100 steps (TFMOT's default frequency) | "
        f"{med(lambda r: r['masked100']) * 1e3:.1f} ms | |",
        f"| ours: masked (every 100) / dense | {med(lambda r: r['masked100'] / r['dense']):.3f} | <= 1.05 |",
        f"| TFMOT: dense fit step | {med(lambda r: r['tfmot_dense']) * 1e3:.1f} ms | |",
        f"| TFMOT: prune_low_magnitude fit step (updates every 10 steps) | "
        f"{med(lambda r: r['tfmot_pruned']) * 1e3:.1f} ms | |",
        f"| TFMOT: pruned / dense (reference, TF 2.15 / Keras 2 in its own environment) | "
        f"{ref_ratio:.3f} | ours below this |" if ref_ratio == ref_ratio else
        "| TFMOT: pruned / dense (reference) | not run: no Python 3.11 for its Keras 2 environment | |",
        f"| sparse artifact / dense .keras at 90% | {size_ratio:.3f} "
        f"({sizes['model.sparse.npz'] / 1e6:.2f} MB / {sizes['model.keras'] / 1e6:.2f} MB) | <= 0.15 |",
        f"| structured: half of local3/local4 units removed, inference speedup (batch 256) | "
        f"{st['speedup']:.2f}x ({st['masked_s'] * 1e3:.1f} ms -> {st['sliced_s'] * 1e3:.1f} ms; "
        f"params {st['params'][0]:,} -> {st['params'][1]:,}; max output diff {st['max_abs_diff']:.1e}) | reported |",
    ]) + "\n"
