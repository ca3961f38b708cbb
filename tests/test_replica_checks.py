"""Replicas that disagree stop the run (exit 1) with one line naming the
weight: weights at checkpoints, every N steps and after --resume; masks
before rank 0's are broadcast; --verify-masks violations.

The disagreements are real, made by two horovodrun ranks, not by hooks:
each rank runs in its own working directory (tests/per_rank_cwd.sh), so a
user model module or a --prune-config there can differ between hosts, as
two versions of a file on two machines do. A kernel constraint only rank
1's module has (Keras applies it after each update, on that rank alone)
drives its weights away; different prune targets give different masks.
BatchNorm's moving statistics, which each rank updates from its own
batches, are averaged before every comparison: a BatchNorm model agrees.
"""
import json
import re

import numpy as np
import pytest

from conftest import horovodrun, keras_weights, manifest, ok, trainer
from test_cli_errors import assert_usage_error

MODEL = '''
import keras

def build(input_shape, num_classes):
    x = inputs = keras.Input(input_shape)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dense(32, name="dense1"{constraint})(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation("relu")(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="logits")(x))
'''
BN_MODEL = MODEL.format(constraint="")
CONSTRAINED = MODEL.format(constraint=", kernel_constraint=keras.constraints.NonNeg()")


def _per_rank(cwd, name, texts):
    for rank, text in enumerate(texts):
        (cwd / f"rank{rank}").mkdir(exist_ok=True)
        (cwd / f"rank{rank}" / name).write_text(text)


def assert_stopped(proc, *needles):
    """Exit 1, one `error:` line, from rank 0 only, holding every needle (horovodrun
    exits 1 whenever a rank does)."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    errors = re.findall(r"^\[(\d+)\]<stderr>:(error: .*)$", proc.stderr, re.M)
    assert [rank for rank, _ in errors] == ["0"], proc.stderr[-3000:]
    ranks = "\n".join(re.findall(r"^\[\d+\]<std(?:out|err)>:.*$", proc.stderr + proc.stdout, re.M))
    assert "Traceback" not in ranks, ranks[-3000:]  # horovodrun's own traceback about the exit is not ours
    for needle in needles:
        assert needle in errors[0][1], (needle, errors[0][1])
    return errors[0][1]


@pytest.mark.parametrize("flags,when", [(["--verify-every-steps", "3"], "after step 3"),
                                        ([], "at the checkpoint of step 5")])
def test_weights_that_drift_apart_stop_the_run_naming_the_weight(cwd, flags, when):
    _per_rank(cwd, "net.py", [BN_MODEL, CONSTRAINED])
    proc = horovodrun(2, "gloo", "--model", "net:build", "--epochs", "1", "--save-every-steps", "5",
                      "--out", "run", "--quiet", *flags, cwd=cwd)
    line = assert_stopped(proc, "weight dense1/kernel differs across ranks", when,
                          "rank 1 disagrees with rank 0")
    assert "bn/moving" not in line  # batch statistics are averaged before the comparison
    # Stopped before rank 0 wrote its copy as the run's checkpoint.
    assert not list((cwd / "rank0" / "run" / "checkpoints").glob("ckpt-*"))


def test_batchnorm_statistics_are_averaged_across_ranks(cwd):
    """Each rank's moving statistics follow its own batches; the run's are
    their mean, the same on both ranks, and the run finishes."""
    _per_rank(cwd, "net.py", [BN_MODEL, BN_MODEL])
    ok(horovodrun(2, "gloo", "--model", "net:build", "--epochs", "1", "--max-steps", "8",
                  "--verify-every-steps", "4", "--out", "run", "--quiet", cwd=cwd))
    m = manifest(cwd / "rank0" / "run")
    prints = m["final"]["replica_fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1]
    stats = keras_weights(cwd / "rank0" / "run" / "model.keras")
    assert np.all(np.isfinite(stats["bn/moving_mean"])) and np.any(stats["bn/moving_mean"] != 0)


def test_ranks_computing_different_masks_stop_before_the_broadcast(cwd):
    _per_rank(cwd, "targets.json", [json.dumps({"dense1/kernel": 0.5}), json.dumps({"dense1/kernel": 0.6})])
    proc = horovodrun(2, "gloo", "--prune", "--prune-config", "targets.json", "--prune-schedule", "constant",
                      "--max-steps", "3", "--out", "run", "--quiet", cwd=cwd)
    assert_stopped(proc, "mask of dense1/kernel differs across ranks before rank 0's masks are broadcast",
                   "rank 1 disagrees with rank 0")


def test_agreeing_ranks_checked_every_step_and_after_resume_finish_identical(cwd):
    args = ["--epochs", "2", "--verify-every-steps", "1", "--out", "run", "--quiet"]
    ok(horovodrun(2, "gloo", *args, "--max-steps", "5", cwd=cwd))
    ok(horovodrun(2, "gloo", *args, "--resume", cwd=cwd))
    m = manifest(cwd / "rank0" / "run")
    prints = m["final"]["replica_fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1]
    assert m["step"] > 5 and not (cwd / "rank1" / "run").exists()


def test_negative_verify_every_steps_is_refused(cwd):
    assert_usage_error(trainer("--verify-every-steps", "-1", cwd=cwd), "--verify-every-steps", "-1")
    assert not (cwd / "runs").exists()


def test_a_verify_masks_violation_raises_naming_the_weight():
    import keras

    from trainer.backends.base import Backend
    from trainer.errors import MaskMismatch
    from trainer.job import Options, prune_config
    from trainer.masking import Masking
    from trainer.models import build_model
    o = Options(prune=True, verify_masks=True, target_sparsity=0.5, prune_schedule="constant")
    keras.utils.set_random_seed(0)
    model = build_model("digits_cnn", (8, 8, 1), 10)
    masking = Masking(o, model, Backend(), total_steps=10, prune_cfg=prune_config(o))
    hooks = masking.hooks()
    hooks["before_step"][0](0)
    check = hooks["after_step"][0]
    check(1)  # masks applied: nothing to report
    kernel = model.get_layer("conv2").kernel
    mask = masking.pruner.maskset.masks[masking.pruner.maskset.names.index("conv2/kernel")].numpy()
    kernel.assign(np.where(mask == 0, 1.0, kernel.numpy()))
    with pytest.raises(MaskMismatch, match=r"pruned entries of conv2/kernel are nonzero after step 2 on replica 0"):
        check(2)


def test_batchnorm_statistics_agree_under_mirrored(cwd):
    """MirroredStrategy keeps a copy of the statistics per replica, each
    written from its own slice; they are averaged the same way."""
    (cwd / "net.py").write_text(BN_MODEL)
    ok(trainer("--model", "net:build", "--backend", "mirrored", "--devices", "2", "--max-steps", "6",
               "--verify-every-steps", "3", "--out", "run", "--quiet", cwd=cwd))
    prints = manifest(cwd / "run")["final"]["replica_fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1]
