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
