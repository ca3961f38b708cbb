"""Beyond one host: two hosts, each a network namespace with its own address,
host name, disk and sshd (tests/netns_hosts.py).

* `launch horovod` across them over real ssh, with Gloo and with MPI, a lost
  rank or host, and --resume. The launch runs on hosta, as a user logged in
  there would start it.
* `launch slurm` on a real two-node Slurm cluster: each node a namespace host
  running its own slurmd, with slurmctld and munged on hosta
  (tests/slurm_cluster.py). Jobs are submitted on hosta from a folder of
  hosts.disk: the job's log and the run directory are written by the batch
  host (hosta), the other rank runs on hostb with its own disk."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import cli_env, manifest
from netns_hosts import Hosts, available
from slurm_cluster import SlurmCluster
from slurm_cluster import available as slurm_missing

TRAIN = [sys.executable, "-m", "trainer", "--model", "mlp", "--quiet"]
SLURM_TRAIN = [*TRAIN, "--epochs", "1", "--out", "run"]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    missing = available()
    # ./run setup installs them; in CI these tests run, they do not skip.
    assert missing is None, f"missing {missing}; run ./run setup"
    with Hosts(tmp_path_factory.mktemp("hosts")) as h:
        yield h


def launch(hosts, *args, timeout=300) -> subprocess.CompletedProcess:
    return hosts.run("hosta", ["env", "-C", hosts.disk, sys.executable, "-m", "launch", "horovod", *args],
                     env=cli_env(), timeout=timeout)


def on_disk(hosts, host, *parts):
    """A path as `host` sees it under hosts.disk."""
    return hosts[host].disk.joinpath(*parts)


def check_run(hosts, out, epochs=1) -> dict:
    m = json.loads(on_disk(hosts, "hosta", out, "manifest.json").read_text())
    assert m["world_size"] == 2 and m["epoch"] == epochs
    prints = m["final"]["replica_fingerprints"]
    assert len(prints) == 2 and len(set(prints)) == 1, prints
    # Each rank ran on its own host, and only rank 0's host has the run.
    assert m["final"]["replica_hosts"] == ["hosta", "hostb"]
    assert not on_disk(hosts, "hostb", out).exists()
    return m


def test_hosts_are_separate_and_teardown_ends_only_their_processes(tmp_path):
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        with Hosts(tmp_path) as h:
            a, b = h["hosta"], h["hostb"]
            seen = h.run("hosta", ["ssh", "hostb", "hostname; hostname -i; touch", h.disk / "from-b"])
            assert seen.returncode == 0 and seen.stdout.split() == ["hostb", b.address], seen
            assert h.run("hosta", ["hostname"]).stdout.strip() == "hosta"
            assert (b.disk / "from-b").exists() and not (a.disk / "from-b").exists()
            ours = h.pids("hosta") + h.pids("hostb")
            assert ours and bystander.pid not in ours
        assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in ours)
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert a.netns not in listed and b.netns not in listed and h.switch not in listed
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_two_hosts_over_ssh_train_in_sync(hosts, controller):
    proc = launch(hosts, "-H", "hosta:1,hostb:1", "--controller", controller, "--",
                  *TRAIN, "--epochs", "1", "--out", f"run-{controller}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = check_run(hosts, f"run-{controller}")
    assert m["backend"].startswith(f"horovod/{controller}")


def _rank_on(hosts, host):
    for pid in hosts.pids(host):
        try:
            p = psutil.Process(pid)
            cmd = p.cmdline()
            if cmd[:3] == [sys.executable, "-m", "trainer"]:
                return p
        except psutil.Error:
            pass
    return None


@pytest.mark.parametrize("controller, loss", [("gloo", "rank"), ("mpi", "rank"), ("gloo", "host"), ("mpi", "host")])
def test_a_lost_rank_or_host_ends_the_job_and_resume_continues(hosts, controller, loss):
    """SIGKILL host B's rank (or every process of host B, its sshd included)
    after the first checkpoint: launch exits within 60 s naming rank 1 and
    hostb; once hostb is back, the same command with --resume finishes."""
    out = f"run-lost-{controller}-{loss}"
    cmd = ["env", "-C", hosts.disk, sys.executable, "-m", "launch", "horovod", "-H", "hosta:1,hostb:1",
           "--controller", controller, "--", *TRAIN, "--epochs", "6", "--save-every-steps", "10", "--out", out]
    job = hosts.popen("hosta", cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest = on_disk(hosts, "hosta", out, "manifest.json")
    deadline = time.time() + 240
    while not (manifest.exists() and json.loads(manifest.read_text()).get("latest")):
        assert job.poll() is None and time.time() < deadline, "no checkpoint before the job ended"
        time.sleep(0.2)
    if loss == "rank":
        victim = _rank_on(hosts, "hostb")
        assert victim is not None, "hostb's rank not found"
        victim.send_signal(signal.SIGKILL)
    else:
        assert hosts.kill_all("hostb")
    lost_at = time.time()
    out_text, err = job.communicate(timeout=90)
    assert time.time() - lost_at < 60 and job.returncode != 0
    # Which line names the loss depends on who noticed first (the rank's exit
    # status, mpirun's daemon, ssh); each names rank 1 and hostb.
    assert re.search(r"^error: lost (rank 1 on hostb|host hostb \(rank 1\))", err, re.M), \
        out_text[-3000:] + err[-3000:]
    if loss == "host":
        hosts.restart("hostb")
    step = int(json.loads(manifest.read_text())["latest"].split("-")[1])
    resumed = hosts.run("hosta", cmd + ["--resume"], env=cli_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming at step {step}" in resumed.stdout
    check_run(hosts, out, epochs=6)
    assert os.listdir(on_disk(hosts, "hosta", out, "checkpoints"))


# -- a two-node Slurm cluster ------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = ", ".join(m for m in (available(), slurm_missing()) if m)
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


def submit(cluster, name, *args, timeout=240):
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


def check_slurm_run(cluster, name) -> dict:
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
    submit(cluster, "srun", "--", *SLURM_TRAIN)
    assert check_slurm_run(cluster, "srun")["backend"].startswith("horovod/mpi")


def test_two_nodes_horovodrun_gloo_over_ssh(cluster):
    submit(cluster, "horovodrun", "--mode", "horovodrun", "--", *SLURM_TRAIN)
    assert check_slurm_run(cluster, "horovodrun")["backend"].startswith("horovod/gloo")


def test_two_nodes_multiworker_tf_config_from_slurm(cluster):
    submit(cluster, "multiworker", "--", *SLURM_TRAIN, "--backend", "multiworker")
    assert check_slurm_run(cluster, "multiworker")["backend"].startswith("multiworker")
