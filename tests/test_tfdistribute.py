"""tf.distribute backends: MirroredStrategy on 2 logical CPUs, and
MultiWorkerMirroredStrategy with 2 workers on loopback."""
import json
import subprocess
import sys

from conftest import cli_env, free_port, manifest, ok, trainer


def test_mirrored_on_two_logical_cpus(cwd):
    ok(trainer("--backend", "mirrored", "--devices", "2", "--epochs", "2", "--out", "run", "--quiet", cwd=cwd))
    m = manifest(cwd / "run")
    prints = m["final"]["replica_fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1]
    assert m["world_size"] == 2 and m["backend"].startswith("mirrored")
    assert m["final"]["test_accuracy"] > 0.85


def test_multiworker_two_workers_on_loopback(cwd):
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    procs = []
    for index in (1, 0):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        (cwd / f"w{index}").mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "trainer", "--backend", "multiworker", "--epochs", "2", "--out", "run", "--quiet"],
            cwd=cwd / f"w{index}", env=cli_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL))
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    m = manifest(cwd / "w0" / "run")
    prints = m["final"]["replica_fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1]
    assert m["backend"].startswith("multiworker") and m["world_size"] == 2
    assert not (cwd / "w1" / "run").exists(), "only the chief writes"
    assert outs[0][0] == "", "only the chief prints"
