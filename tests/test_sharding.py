"""The per-epoch plan: every sample once, no replica idle, same on every process."""
import numpy as np
import pytest

from trainer import sharding
from trainer.backends import launched_by_horovod_launcher


@pytest.mark.parametrize("n,batch,replicas", [(1438, 32, 2), (1438, 64, 4), (100, 10, 3), (2049, 128, 2), (7, 2, 3)])
def test_every_sample_once_per_epoch_and_no_empty_slice(n, batch, replicas):
    global_batch = batch * replicas
    batches = sharding.epoch_batches(n, global_batch, replicas, seed=5, epoch=3)
    seen = np.concatenate(batches)
    assert np.array_equal(np.sort(seen), np.arange(n))
    for b in batches:
        parts = sharding.replica_slices(b, replicas)
        assert all(len(p) > 0 for p in parts)
        assert np.array_equal(np.concatenate(parts), b)
        assert len(b) < global_batch + replicas


def test_plan_depends_only_on_seed_and_epoch():
    a = sharding.epoch_batches(500, 64, 2, seed=1, epoch=0)
    b = sharding.epoch_batches(500, 64, 2, seed=1, epoch=0)
    c = sharding.epoch_batches(500, 64, 2, seed=1, epoch=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))


def test_resuming_mid_epoch_continues_the_same_permutation():
    full = np.concatenate(sharding.epoch_batches(500, 64, 2, seed=1, epoch=2))
    rest = np.concatenate(sharding.epoch_batches(500, 64, 2, seed=1, epoch=2, start=192))
    assert np.array_equal(full[192:], rest)


@pytest.mark.parametrize("env,expected", [
    ({}, False),
    ({"HOROVOD_RANK": "0"}, True),                       # horovodrun --gloo
    ({"OMPI_COMM_WORLD_RANK": "1"}, True),               # mpirun / horovodrun --mpi
    ({"PMIX_RANK": "0"}, True),                          # srun --mpi=pmix
    ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}, True),  # srun
    ({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "2"}, False),  # the batch script itself, not a step
])
def test_auto_backend_detects_launchers(env, expected):
    assert launched_by_horovod_launcher(env) is expected
