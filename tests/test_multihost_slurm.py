"""`launch slurm` on a real two-node Slurm cluster: each node a namespace host
(tests/netns_hosts.py) running its own slurmd, with slurmctld and munged on
hosta (tests/slurm_cluster.py). Jobs are submitted on hosta from a folder of
hosts.disk, as a user logged in there would: the job's log and the run
directory are written by the batch host (hosta), the other rank runs on hostb
with its own disk."""
from __future__ import annotations

import sys

import pytest

from conftest import cli_env, manifest
from netns_hosts import Hosts
from netns_hosts import available as hosts_missing
from slurm_cluster import SlurmCluster
from slurm_cluster import available as slurm_missing

TRAIN = [sys.executable, "-m", "trainer", "--model", "mlp", "--epochs", "1", "--quiet", "--out", "run"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = ", ".join(m for m in (hosts_missing(), slurm_missing()) if m)
    # ./run setup installs them; in CI these tests run, they do not skip.
    assert not missing, f"missing {missing}; run ./run setup"
    root = tmp_path_factory.mktemp("multihost-slurm")
    (root / "slurm").mkdir()
    with Hosts(root / "hosts") as hosts:
        c = SlurmCluster(root / "slurm", hosts=hosts)
        try:
            yield c.start()
        finally:
            c.stop()


def launch(cluster, name, *args, timeout=240):
    """`launch slurm --nodes 2 --tasks-per-node 1 --wait` on hosta, in
    hosts.disk/name (made on both hosts: each task starts in the job's
    working directory on its own node)."""
    hosts = cluster.hosts
    for h in hosts.hosts.values():
        (h.disk / name).mkdir()
    proc = cluster.client(["env", "-C", hosts.disk / name, sys.executable, "-m", "launch", "slurm",
                           "--nodes", "2", "--tasks-per-node", "1", "--wait", *args],
                          env=cli_env(**cluster.env), timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "submitted job" in proc.stdout and "final: loss=" in proc.stdout  # the job's log, streamed
    return proc


def check_run(cluster, name) -> dict:
    a, b = cluster.hosts["hosta"].disk / name, cluster.hosts["hostb"].disk / name
    m = manifest(a / "run")
    prints = m["final"]["replica_fingerprints"]
    assert m["world_size"] == 2 and len(prints) == 2 and len(set(prints)) == 1, prints
    # One replica per node: the job really spanned the two hosts.
    assert m["final"]["replica_hosts"] == ["hosta", "hostb"]
    assert (a / "run" / "checkpoints" / m["latest"] / "state.index").exists()
    # The batch host wrote the job's log and rank 0's run; hostb's disk has neither.
    assert len(list(a.glob("slurm-*.out"))) == 1
    assert not list(b.glob("slurm-*.out")) and not (b / "run").exists()
    return m


def test_two_nodes_horovod_over_mpi_under_srun(cluster):
    launch(cluster, "srun", "--", *TRAIN)
    assert check_run(cluster, "srun")["backend"].startswith("horovod/mpi")


def test_two_nodes_horovodrun_gloo_over_ssh(cluster):
    launch(cluster, "horovodrun", "--mode", "horovodrun", "--", *TRAIN)
    assert check_run(cluster, "horovodrun")["backend"].startswith("horovod/gloo")


def test_two_nodes_multiworker_tf_config_from_slurm(cluster):
    launch(cluster, "multiworker", "--", *TRAIN, "--backend", "multiworker")
    assert check_run(cluster, "multiworker")["backend"].startswith("multiworker")
