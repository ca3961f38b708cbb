"""Pruning and freezing on tf.distribute, and the cross-replica mask check."""
import json
import subprocess
import sys

import numpy as np

from conftest import cli_env, free_port, keras_weights, manifest, ok, run, trainer


def test_mirrored_prune_and_freeze(cwd):
    ok(trainer("init", "--out", "init", cwd=cwd))
    ok(trainer("--backend", "mirrored", "--devices", "2", "--init", "init", "--epochs", "2", "--prune",
               "--target-sparsity", "0.8", "--prune-end", "30", "--prune-every", "5", "--verify-masks",
               "--freeze", "conv1/kernel[2]", "--out", "run", "--quiet", cwd=cwd))
    m = manifest(cwd / "run")
    p = m["pruning"]
    assert p["verified"] == {"violations": 0, "replica_steps_checked": m["step"]}
    for update in p["updates"]:
        assert all(len(c) == 2 and c[0] == c[1] for c in update["checksums"].values())
    assert all(abs(s - 0.8) <= 0.005 for s in p["sparsity"].values()), p["sparsity"]
    start, end = keras_weights(cwd / "init" / "model.keras"), keras_weights(cwd / "run" / "model.keras")
    assert np.array_equal(start["conv1/kernel"][..., 2], end["conv1/kernel"][..., 2])  # frozen, never pruned
    assert m["final"]["replica_fingerprints"][0] == m["final"]["replica_fingerprints"][1]


def test_multiworker_prune(cwd):
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    procs = []
    for index in (1, 0):
        (cwd / f"w{index}").mkdir()
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "trainer", "--backend", "multiworker", "--epochs", "1", "--prune",
             "--target-sparsity", "0.7", "--prune-end", "15", "--prune-every", "5", "--verify-masks",
             "--out", "run", "--quiet"], cwd=cwd / f"w{index}", env=cli_env(TF_CONFIG=tf_config),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL))
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    m = manifest(cwd / "w0" / "run")
    assert m["pruning"]["verified"] == {"violations": 0, "replica_steps_checked": 2 * m["step"]}
    for update in m["pruning"]["updates"]:
        assert all(len(c) == 2 and c[0] == c[1] for c in update["checksums"].values())


MISMATCH = """
from trainer.backends.tfdistribute import configure_logical_devices, mirrored
configure_logical_devices(2)
import tensorflow as tf
from trainer.models import build_model
from trainer.pruning.masks import MaskSet
backend = mirrored(2)
with backend.scope():
    model = build_model("digits_cnn", (8, 8, 1), 10)
masks = MaskSet({"conv2/kernel": model.get_layer("conv2").kernel}, backend, keep_values=False, name="pruning")
masks.verify()  # identical: passes
copy = masks.masks[0].values[1]           # replica 1's own copy, as a fault would leave it
copy.assign(tf.zeros_like(copy))
masks.verify()
"""


def test_a_mask_that_differs_across_replicas_stops_the_run_naming_the_weight(cwd):
    proc = run([sys.executable, "-c", MISMATCH], cwd=cwd)
    assert proc.returncode != 0
    assert "MaskMismatch" in proc.stderr and "conv2/kernel" in proc.stderr
