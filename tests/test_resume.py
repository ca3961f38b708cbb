"""Checkpoints: resume equivalence, atomic saves, keep-last-N, shared inits."""

import numpy as np
import pytest

from conftest import keras_weights, manifest, ok, trainer


def test_stop_then_resume_equals_one_uninterrupted_run(cwd):
    # 1438 digits / 32 = 45 steps an epoch: stopping at 30 stops mid-epoch, so
    # the data position inside the epoch must be restored too.
    ok(trainer("--epochs", "2", "--out", "straight", "--quiet", cwd=cwd))
    ok(trainer("--epochs", "2", "--out", "split", "--max-steps", "30", "--quiet", cwd=cwd))
    stopped = manifest(cwd / "split")
    assert stopped["step"] == 30 and stopped["epoch"] == 0
    ok(trainer("--epochs", "2", "--out", "split", "--resume", "--quiet", cwd=cwd))
    a, b = manifest(cwd / "straight"), manifest(cwd / "split")
    assert (a["step"], a["samples_seen"]) == (b["step"], b["samples_seen"]) == (90, 2 * 1438)
    wa, wb = keras_weights(cwd / "straight" / "model.keras"), keras_weights(cwd / "split" / "model.keras")
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert a["lineage"] == b["lineage"]


def test_keeps_only_the_last_n_checkpoints(cwd):
    ok(trainer("--epochs", "1", "--out", "run", "--save-every-steps", "10", "--keep", "2", "--quiet", cwd=cwd))
    m = manifest(cwd / "run")
    kept = sorted(p.name for p in (cwd / "run" / "checkpoints").iterdir())
    assert kept == m["checkpoints"] == ["ckpt-00000040", "ckpt-00000045"]
    assert m["latest"] == "ckpt-00000045"


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path):
    import tensorflow as tf
    from trainer.checkpoint import RunDir, checkpoint_of
    run = RunDir(tmp_path / "run", keep=3)
    run.write_manifest({"kind": "run"})
    v = tf.Variable([1.0, 2.0])
    run.save(tf.train.Checkpoint(v=v), {"step": 1}, {"step": 1})
    before = (tmp_path / "run" / "manifest.json").read_bytes()

    class Crashing(tf.train.Checkpoint):
        def write(self, prefix, options=None):
            super().write(prefix, options)  # some bytes are on disk...
            raise OSError("disk full")       # ...then the save dies

    v.assign([5.0, 6.0])
    with pytest.raises(OSError):
        run.save(Crashing(v=v), {"step": 2}, {"step": 2})
    assert (tmp_path / "run" / "manifest.json").read_bytes() == before
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["ckpt-00000001"]
    prefix, meta = checkpoint_of(tmp_path / "run")
    restored = tf.Variable([0.0, 0.0])
    tf.train.Checkpoint(v=restored).read(prefix).assert_consumed()
    assert restored.numpy().tolist() == [1.0, 2.0] and meta == {"step": 1}


def test_shared_init_gives_two_runs_one_lineage(cwd):
    ok(trainer("init", "--model", "digits_cnn", "--out", "init", "--seed", "7", cwd=cwd))
    init = manifest(cwd / "init")
    ok(trainer("--init", "init", "--epochs", "1", "--seed", "1", "--out", "a", "--quiet", cwd=cwd))
    ok(trainer("--init", "init", "--epochs", "1", "--seed", "2", "--out", "b", "--quiet",
               "--client", "1", "--clients", "2", "--split", "classes:5", cwd=cwd))
    ok(trainer("--epochs", "1", "--seed", "3", "--out", "c", "--quiet", "--max-steps", "1", cwd=cwd))
    a, b, c = manifest(cwd / "a"), manifest(cwd / "b"), manifest(cwd / "c")
    assert a["lineage"] == b["lineage"] == init["lineage"]
    assert c["lineage"] != init["lineage"]  # another seed, another initialization
    assert a["init"] == "init" and b["data"]["split"] == {"client": 1, "clients": 2, "spec": "classes:5", "seed": 2}
    assert b["data"]["train_samples"] < a["data"]["train_samples"]
    # The init really is the starting point: its weights hash to its lineage.
    from trainer.checkpoint import fingerprint_arrays
    assert fingerprint_arrays(keras_weights(cwd / "init" / "model.keras").items()) == init["lineage"]
