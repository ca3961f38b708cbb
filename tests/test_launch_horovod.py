"""`python -m launch horovod`: horovodrun over a host list, on loopback with
two host names for this one machine (both resolve locally, so no ssh)."""
from __future__ import annotations

import socket
import sys

import pytest

from conftest import manifest, ok, run


def launch(*args, cwd, timeout=300):
    return run([sys.executable, "-m", "launch", *args], cwd=cwd, timeout=timeout)


def test_two_host_names_train_in_sync(tmp_path):
    hosts = f"localhost:1,{socket.gethostname()}:1"
    proc = ok(launch("horovod", "-H", hosts, "--", sys.executable, "-m", "trainer", "--model", "mlp",
                     "--epochs", "1", "--out", "run", "--quiet", cwd=tmp_path))
    assert f"-H {hosts} --gloo" in proc.stdout
    m = manifest(tmp_path / "run")
    assert m["world_size"] == 2 and m["backend"].startswith("horovod/gloo")
    prints = m["final"]["replica_fingerprints"]
    assert len(prints) == 2 and len(set(prints)) == 1


def test_hostfile(tmp_path):
    (tmp_path / "hosts").write_text("# two hosts\nnode1 slots=4\nnode2:2\n")
    proc = ok(launch("horovod", "--hostfile", "hosts", "--print", "--", "python", "-m", "trainer", cwd=tmp_path))
    assert "-np 6 -H node1:4,node2:2 --gloo python -m trainer" in proc.stdout


@pytest.mark.parametrize("args, needle", [
    (["-H", "node1:0", "--", "python"], "node1 has 0 slots"),
    (["-H", "node1:x", "--", "python"], "cannot parse 'node1:x'"),
    (["-H", "node1:2,node1:2", "--", "python"], "listed twice"),
    (["-H", "node1:2"], "no command after `--`"),
    (["-H", "node1:2", "--np", "3", "--", "python"], "--np 3"),
    (["--hostfile", "missing", "--", "python"], "--hostfile missing"),
])
def test_bad_host_lists(tmp_path, args, needle):
    proc = launch("horovod", *args, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], \
        proc.stderr


def test_a_killed_rank_ends_the_job_and_resume_continues(tmp_path):
    """SIGKILL rank 1 after the first checkpoint: the job exits non-zero within
    60 s naming rank 1; the same command with --resume continues from the last
    checkpoint and ends with identical replicas."""
    import json
    import subprocess
    import time

    import psutil

    from conftest import cli_env
    cmd = [sys.executable, "-m", "launch", "horovod", "-H", "localhost:2", "--", sys.executable, "-m", "trainer",
           "--model", "mlp", "--epochs", "6", "--save-every-steps", "10", "--out", "run", "--quiet"]
    job = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    manifest_path = tmp_path / "run" / "manifest.json"
    deadline = time.time() + 240
    while not (manifest_path.exists() and json.loads(manifest_path.read_text()).get("latest")):
        assert job.poll() is None and time.time() < deadline, "no checkpoint before the job ended"
        time.sleep(0.2)
    victims = []
    for p in psutil.Process(job.pid).children(recursive=True):
        try:
            if p.environ().get("HOROVOD_RANK") == "1" and "trainer" in " ".join(p.cmdline()):
                victims.append(p)
        except psutil.Error:
            pass
    assert victims, "rank 1 not found"
    victims[0].kill()
    killed = time.time()
    out, err = job.communicate(timeout=60)
    assert time.time() - killed < 60
    assert job.returncode != 0
    assert "error: lost rank 1 on localhost (killed by signal 9)" in err, err[-2000:]
    latest = json.loads(manifest_path.read_text())["latest"]
    step = int(latest.split("-")[1])
    proc = ok(run(cmd[:-1] + ["--resume", "--quiet"], cwd=tmp_path))
    assert f"resuming at step {step}" in proc.stdout
    m = manifest(tmp_path / "run")
    assert m["epoch"] == 6 and len(set(m["final"]["replica_fingerprints"])) == 1
