"""`python -m launch slurm` against a real single-node Slurm cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, cli_env, manifest, ok, run
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


def _job_ids(cluster) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True, check=True,
                         env={**os.environ, **cluster.env})
    return out.stdout.split()


@pytest.mark.parametrize("flag, value", [
    ("--job-name", "x\nrm -rf ~"),
    ("--job-name", "x\rrm -rf ~"),
    ("--job-name", "x\x1b[2J"),
    ("--job-name", "x\u2028y"),
    ("--job-name", "two words"),
    ("--job-name", "a#comment"),
    ("--job-name", ""),
    ("--partition", "debug\n#SBATCH --nodes=99"),
    ("--partition", "debug --nodes=99"),
    ("--output", "out.log\ntouch pwned"),
    ("--output", "my log.out"),
    ("--output", "\"quoted\".out"),
    ("--time", "01:00:00\n"),
    ("--time", "01:00:00\ntouch pwned"),
    ("--workdir", ".\n"),
])
def test_unsafe_values_are_refused_and_nothing_is_submitted(cluster, tmp_path, flag, value):
    before = _job_ids(cluster)
    proc = launch("slurm", flag, value, "--wait", "--", "true", cwd=tmp_path, env=cluster.env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {flag}"), proc.stderr
    assert "submitted" not in proc.stdout and _job_ids(cluster) == before
    assert not list(tmp_path.iterdir())


def test_plain_names_and_patterns_still_work(cluster, tmp_path):
    proc = ok(launch("slurm", "--job-name", "run-1.a_b", "--partition", "debug", "--output", "log-%j.out",
                     "--time", "0-00:05:00", "--wait", "--", "sh", "-c", 'echo "name=$SLURM_JOB_NAME"',
                     cwd=tmp_path, env=cluster.env))
    assert "name=run-1.a_b" in proc.stdout  # streamed from the log, found through its %j path
    assert [p.name for p in tmp_path.glob("log-*.out")] == [f"log-{proc.stdout.split()[2]}.out"]


def test_the_command_is_shell_quoted_in_the_script(cluster, tmp_path):
    args = ["a;b", "$(touch pwned)", "`touch pwned`", "two\nlines", "x\n#SBATCH --partition=nope", "'"]
    script = ok(launch("slurm", "--dry-run", "--", "python", *args, cwd=tmp_path)).stdout
    assert "\n#SBATCH --partition=nope" in script  # inside quotes, after the first command: inert
    proc = ok(launch("slurm", "--wait", "--", sys.executable, "-c", "import sys; print(repr(sys.argv[1:]))",
                     *args, cwd=tmp_path, env=cluster.env))
    assert repr(args) in proc.stdout
    assert not (tmp_path / "pwned").exists()


def test_wait_rides_out_a_controller_restart(cluster, tmp_path):
    # The job outlives the outage: slurmd runs it while slurmctld is down, and
    # the restarted controller recovers it from StateSaveLocation.
    job = "import time; print('started', flush=True); time.sleep(12); print('finished'); raise SystemExit(7)"
    proc = subprocess.Popen([sys.executable, "-m", "launch", "slurm", "--wait", "--", sys.executable, "-c", job],
                            cwd=tmp_path, env=cli_env(**cluster.client_env(message_timeout=2)), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        _wait_for(lambda: any("started" in p.read_text() for p in tmp_path.glob("slurm-*.out")), 60)
        cluster.stop_controller()
        try:
            time.sleep(5)  # scontrol gives up on a refused connection after 2 s here
        finally:
            cluster.start_controller()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    outage = [line for line in err.splitlines() if "controller does not answer" in line]
    assert proc.returncode == 7, (out, err)
    assert len(outage) == 1 and "finished" in out and "exit status 7" in err, err


def test_a_purged_job_without_accounting_has_an_unknown_end(cluster, monkeypatch, capsys):
    from launch.slurm import follow, job_state
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    unknown = 4_000_000  # "Invalid job id specified", as for a job purged after MinJobAge
    assert job_state(unknown) is None
    assert follow(unknown, None) is None  # sacct: "Slurm accounting storage is disabled"
    assert capsys.readouterr().err == ""  # not mistaken for an unreachable controller


def test_wait_gives_up_on_a_controller_that_stays_away(cluster, monkeypatch, capsys):
    from launch.slurm import ControllerUnreachable, job_state
    monkeypatch.setenv("SLURM_CONF", cluster.client_env(message_timeout=1)["SLURM_CONF"])
    cluster.stop_controller()
    try:
        start = time.monotonic()
        with pytest.raises(ControllerUnreachable, match="did not answer for 3 s"):
            job_state(1, patience=3)
        assert time.monotonic() - start < 10
    finally:
        cluster.start_controller()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "Unable to contact slurm controller" in err[0], err


def _wait_for(check, timeout):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_no_sbatch_on_path(tmp_path):
    proc = run([sys.executable, "-m", "launch", "slurm", "--", "python"], cwd=tmp_path,
               PATH=str(Path(sys.executable).parent))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: sbatch not found on PATH")


def test_the_shipped_example_script_is_what_the_launcher_renders():
    from launch.slurm import EXAMPLE, EXAMPLE_JOB, Job, render
    assert EXAMPLE.read_text() == render(Job(**EXAMPLE_JOB))
