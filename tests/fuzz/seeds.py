"""Seeds: valid inputs, built once per session by the worker (needs TensorFlow).
Every mutant starts from one of these files or directories."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .settings import REPO

K2 = REPO / "tests" / "fixtures" / "keras2"


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
