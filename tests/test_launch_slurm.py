"""`python -m launch slurm` against a real single-node Slurm cluster."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from conftest import REPO, manifest, ok, run
from slurm_cluster import SlurmCluster, available

TRAIN = [sys.executable, "-m", "trainer", "--model", "mlp", "--epochs", "1", "--quiet"]


def launch(*args, cwd, env=None, timeout=300):
    return run([sys.executable, "-m", "launch", *args], cwd=cwd, timeout=timeout, **(env or {}))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = available()
    # ./run setup installs the packages; in CI this test runs, it does not skip.
    assert missing is None, f"Slurm is not installed ({missing}); run ./run setup"
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def _identical_replicas(run_dir) -> dict:
    m = manifest(run_dir)
    prints = m["final"]["replica_fingerprints"]
    assert len(prints) == 2 and len(set(prints)) == 1, prints
    assert (Path(run_dir) / "checkpoints" / m["latest"] / "state.index").exists()
    return m


def test_horovod_over_mpi_under_srun(cluster, tmp_path):
    proc = ok(launch("slurm", "--nodes", "1", "--tasks-per-node", "2", "--wait", "--", *TRAIN, "--out", "run",
                     cwd=tmp_path, env=cluster.env))
    assert "submitted job" in proc.stdout and "final: loss=" in proc.stdout  # the job's log, streamed
    m = _identical_replicas(tmp_path / "run")
    assert m["backend"].startswith("horovod/mpi") and m["world_size"] == 2


def test_horovodrun_gloo_over_the_allocation(cluster, tmp_path):
    ok(launch("slurm", "--tasks-per-node", "2", "--mode", "horovodrun", "--wait", "--", *TRAIN, "--out", "run",
              cwd=tmp_path, env=cluster.env))
    m = _identical_replicas(tmp_path / "run")
    assert m["backend"].startswith("horovod/gloo")


def test_multiworker_builds_its_cluster_from_slurm(cluster, tmp_path):
    ok(launch("slurm", "--tasks-per-node", "2", "--wait", "--", *TRAIN, "--backend", "multiworker",
              "--out", "run", cwd=tmp_path, env=cluster.env))
    m = _identical_replicas(tmp_path / "run")
    assert m["backend"].startswith("multiworker")


def test_wait_exits_with_the_jobs_status(cluster, tmp_path):
    proc = launch("slurm", "--wait", "--", sys.executable, "-c", "print('about to fail'); raise SystemExit(3)",
                  cwd=tmp_path, env=cluster.env)
    assert proc.returncode == 3 and "about to fail" in proc.stdout
    assert "exit status 3" in proc.stderr


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path):
    proc = ok(launch("slurm", "--nodes", "2", "--tasks-per-node", "4", "--gpus-per-node", "4", "--partition",
                     "gpu", "--time", "01:00:00", "--dry-run", "--", "python", "-m", "trainer", "--epochs", "3",
                     cwd=tmp_path, env={"PATH": "/nonexistent"}))
    script = proc.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=01:00:00",
                 "srun --mpi=pmix python -m trainer --epochs 3"):
        assert line in script
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, needle", [
    (["--nodes", "0", "--", "python"], "--nodes 0"),
    (["--tasks-per-node", "-1", "--", "python"], "--tasks-per-node -1"),
    (["--nodes", "1"], "no command after `--`"),
    (["--time", "soon", "--", "python"], "--time soon"),
])
def test_bad_input(tmp_path, args, needle):
    proc = launch("slurm", *args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_no_sbatch_on_path(tmp_path):
    proc = run([sys.executable, "-m", "launch", "slurm", "--", "python"], cwd=tmp_path,
               PATH=str(Path(sys.executable).parent))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: sbatch not found on PATH")


def test_the_shipped_example_script_is_what_the_launcher_renders():
    from launch.slurm import EXAMPLE, EXAMPLE_JOB, Job, render
    assert EXAMPLE.read_text() == render(Job(**EXAMPLE_JOB))
