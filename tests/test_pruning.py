"""Pruning and freezing end to end through the CLI, on 2 ranks and 1."""
import json

import numpy as np
import pytest

from conftest import horovodrun, keras_weights, manifest, ok, trainer
from test_cli_errors import assert_usage_error

PRUNED = ("conv1/kernel", "conv2/kernel", "dense1/kernel")  # the default: not the output layer


def _zeros_fraction(weights, names=PRUNED):
    return {n: float(np.mean(weights[n] == 0)) for n in names}


@pytest.mark.parametrize("controller,optimizer", [("gloo", "adam"), ("mpi", "momentum")])
def test_two_ranks_keep_identical_masks_and_exact_zeros(cwd, controller, optimizer):
    ok(horovodrun(2, controller, "--prune", "--target-sparsity", "0.8", "--prune-every", "5", "--epochs", "2",
                  "--prune-end", "30", "--verify-masks", "--optimizer", optimizer, "--lr", "0.01",
                  "--out", "run", "--quiet", cwd=cwd))
    m = manifest(cwd / "rank0" / "run")
    p = m["pruning"]
    assert len(p["updates"]) >= 6
    for update in p["updates"]:  # bitwise-identical masks on both ranks after every update
        for name, per_replica in update["checksums"].items():
            assert len(per_replica) == 2 and per_replica[0] == per_replica[1], (update["step"], name)
    # No masked weight was nonzero after any step, on either rank.
    assert p["verified"] == {"violations": 0, "replica_steps_checked": 2 * m["step"]}
    weights = keras_weights(cwd / "rank0" / "run" / "model.keras")
    for name, fraction in _zeros_fraction(weights).items():
        assert abs(fraction - 0.8) <= 0.005, (name, fraction)
    assert np.mean(weights["logits/kernel"] == 0) < 0.01  # the output layer is not pruned by default
    assert m["final"]["replica_fingerprints"][0] == m["final"]["replica_fingerprints"][1]
    assert not (cwd / "rank1" / "run").exists()


def test_resume_keeps_the_masks(cwd):
    args = ["--prune", "--target-sparsity", "0.7", "--prune-every", "4", "--prune-end", "20", "--epochs", "2",
            "--out", "run", "--quiet"]
    ok(trainer(*args, "--max-steps", "25", cwd=cwd))
    before = manifest(cwd / "run")["pruning"]
    ok(trainer(*args, "--resume", "--verify-masks", cwd=cwd))
    after = manifest(cwd / "run")["pruning"]
    assert after["updates"] == []                        # the schedule ended before the stop
    assert after["final_checksums"] == before["final_checksums"]  # masks restored, not recomputed
    assert after["verified"]["violations"] == 0
    zeros = _zeros_fraction(keras_weights(cwd / "run" / "model.keras"))
    assert all(abs(f - 0.7) <= 0.005 for f in zeros.values()), zeros


def test_80_percent_sparsity_costs_at_most_one_accuracy_point(cwd):
    ok(trainer("--epochs", "10", "--out", "dense", "--quiet", cwd=cwd))
    ok(trainer("--epochs", "10", "--prune", "--target-sparsity", "0.8", "--out", "pruned", "--quiet", cwd=cwd))
    dense = manifest(cwd / "dense")["final"]["test_accuracy"]
    pruned = manifest(cwd / "pruned")["final"]["test_accuracy"]
    assert pruned >= dense - 0.01, (dense, pruned)
    assert (cwd / "pruned" / "sparsity.png").stat().st_size > 1000


def test_freeze_one_conv_kernel(cwd):
    ok(trainer("init", "--out", "init", cwd=cwd))
    ok(trainer("--init", "init", "--epochs", "2", "--optimizer", "momentum", "--lr", "0.05",
               "--freeze", "conv1/kernel[3],dense1", "--out", "run", "--quiet", cwd=cwd))
    start = keras_weights(cwd / "init" / "model.keras")
    end = keras_weights(cwd / "run" / "model.keras")
    assert np.array_equal(end["conv1/kernel"][..., 3], start["conv1/kernel"][..., 3])  # bitwise
    assert np.array_equal(end["dense1/kernel"], start["dense1/kernel"])
    assert np.array_equal(end["dense1/bias"], start["dense1/bias"])
    others = np.delete(end["conv1/kernel"], 3, axis=-1) - np.delete(start["conv1/kernel"], 3, axis=-1)
    assert np.mean(others != 0) > 0.9  # the other filters moved
    assert not np.array_equal(end["conv2/kernel"], start["conv2/kernel"])


def test_sparse_artifact_from_a_run_restores_the_weights_exactly(cwd):
    ok(trainer("--epochs", "1", "--prune", "--target-sparsity", "0.9", "--prune-end", "20", "--out", "run",
               "--quiet", cwd=cwd))
    from trainer.pruning.export import load_sparse
    restored = {w.path: np.asarray(w.numpy()) for w in load_sparse(cwd / "run" / "model.sparse.npz").weights}
    dense = keras_weights(cwd / "run" / "model.keras")
    assert restored.keys() == dense.keys()
    assert not [k for k in dense if "mask" in k]  # the exported .keras is stripped: no mask variables
    assert all(np.array_equal(restored[k], dense[k]) for k in dense)
    assert (cwd / "run" / "model.sparse.npz").stat().st_size < 0.5 * (cwd / "run" / "model.keras").stat().st_size


@pytest.mark.parametrize("args,needle", [
    (["--prune", "--target-sparsity", "1.0"], "--target-sparsity"),
    (["--prune", "--target-sparsity", "-0.1"], "--target-sparsity"),
    (["--prune", "--prune-begin", "50", "--prune-end", "10"], "--prune-end"),
    (["--prune", "--prune-layers", "nosuchlayer"], "nosuchlayer"),
    (["--freeze", "conv9/kernel"], "conv9/kernel"),
    (["--freeze", "conv1/kernel[99]"], "99"),
    (["--structured", "--freeze", "conv1"], "--structured"),
])
def test_bad_pruning_input(cwd, args, needle):
    assert_usage_error(trainer(*args, "--out", "run", cwd=cwd), needle)
    assert not (cwd / "run").exists()


def test_per_layer_targets_from_a_config_file(cwd):
    (cwd / "targets.json").write_text(json.dumps({"conv1/kernel": 0.5, "dense1/kernel": 0.95}))
    ok(trainer("--epochs", "1", "--prune", "--prune-config", "targets.json", "--prune-layers", "conv1/kernel",
               "--prune-end", "20", "--out", "run", "--quiet", cwd=cwd))
    zeros = _zeros_fraction(keras_weights(cwd / "run" / "model.keras"), ("conv1/kernel", "dense1/kernel"))
    assert abs(zeros["conv1/kernel"] - 0.5) <= 0.005 and abs(zeros["dense1/kernel"] - 0.95) <= 0.005


def test_structured_pruning_exports_a_smaller_model_with_equal_outputs(cwd):
    ok(trainer("--epochs", "2", "--structured", "--target-sparsity", "0.5", "--prune-end", "40", "--verify-masks",
               "--out", "run", "--quiet", cwd=cwd))
    m = manifest(cwd / "run")
    sliced = m["pruning"]["sliced"]
    assert sliced["params"][1] < sliced["params"][0] and sliced["max_abs_output_diff"] <= 1e-5
    assert m["pruning"]["verified"]["violations"] == 0
    import tensorflow as tf

    from trainer import models  # noqa: F401  (registers custom layers)
    from trainer.data import load_dataset
    big = tf.keras.models.load_model(cwd / "run" / "model.keras", compile=False)
    small = tf.keras.models.load_model(cwd / "run" / "model.sliced.keras", compile=False)
    x = load_dataset("digits").x_test
    np.testing.assert_allclose(small(x).numpy(), big(x).numpy(), atol=1e-5)
    assert small.get_layer("dense1").units == 64 and small.get_layer("conv2").filters == 32
    assert (cwd / "run" / "model.sliced.keras").stat().st_size < (cwd / "run" / "model.keras").stat().st_size


def test_slice_export_step_and_its_errors(cwd):
    ok(trainer("--epochs", "1", "--out", "run", "--quiet", cwd=cwd))
    proc = ok(trainer("slice", "run/model.keras", "--fraction", "0.5", "-o", "small.keras", cwd=cwd))
    assert "->" in proc.stdout and (cwd / "small.keras").stat().st_size < (cwd / "run" / "model.keras").stat().st_size
    assert_usage_error(trainer("slice", "run/model.keras", "--fraction", "0.5", "-o", "small.keras", cwd=cwd),
                       "small.keras")  # exists: not overwritten
    assert_usage_error(trainer("slice", "run/model.keras", "--fraction", "1.5", "-o", "x.keras", cwd=cwd), "1.5")


@pytest.mark.parametrize("model,needle", [("cifar10_cnn", "norm1"), ("lstm", "lstm")])
def test_structured_pruning_refuses_what_it_cannot_slice(cwd, model, needle):
    assert_usage_error(trainer("--model", model, "--data", "synthetic", "--structured", "--out", "run", cwd=cwd),
                       needle)
    assert not (cwd / "run").exists()
