"""`python -m launch federated`, and the two-machine workflow by hand."""
from __future__ import annotations

import csv
import shutil
import sys

from conftest import manifest, ok, run, trainer


def launch(*args, cwd, timeout=600):
    return run([sys.executable, "-m", "launch", *args], cwd=cwd, timeout=timeout)


def test_rounds_with_data_parallel_clients(tmp_path):
    """2 clients, each a 2-rank horovodrun job, 2 rounds of SCAFFOLD: the
    controls come from allreduced gradients and are compared across ranks."""
    proc = ok(launch("federated", "--clients", "2", "--rounds", "2", "--local-epochs", "1", "--split",
                     "dirichlet:0.5", "--np", "2", "--model", "mlp", "--algorithm", "scaffold", "--out", "fed",
                     cwd=tmp_path))
    assert "round 2/2" in proc.stdout
    out = tmp_path / "fed"
    rows = list(csv.DictReader(open(out / "rounds.csv")))
    assert [int(r["round"]) for r in rows] == [1, 2]
    assert float(rows[-1]["global_accuracy"]) > 0.5
    assert (out / "rounds.png").stat().st_size > 1000
    lineage = manifest(out / "init")["lineage"]
    for r in (1, 2):
        for k in (0, 1):
            client = manifest(out / f"round-{r:03d}" / f"client-{k}")
            assert client["world_size"] == 2 and client["lineage"] == lineage
            assert len(set(client["final"]["replica_fingerprints"])) == 1
            previous = client["scaffold"]["previous"]  # the client's own c_i: its run of the round before
            assert previous is None if r == 1 else previous.endswith(f"round-001/client-{k}")
            assert (out / f"round-{r:03d}" / f"client-{k}" / "scaffold.h5").is_file()
        assert (out / f"round-{r:03d}" / "global" / "scaffold.h5").is_file()
        assert manifest(out / f"round-{r:03d}" / "global")["lineage"] == lineage
    # round 2 started from round 1's global model
    assert manifest(out / "round-002" / "client-0")["init"].endswith("round-001/global")


def test_a_split_that_leaves_a_client_without_data_is_refused_up_front(tmp_path):
    proc = launch("federated", "--clients", "20", "--rounds", "1", "--split", "dirichlet:0.01", "--out", "fed",
                  cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "gets no samples" in lines[0]
    assert not (tmp_path / "fed").exists()


def test_two_machines_by_hand(tmp_path):
    """README's workflow: the server writes an init; each machine trains in its
    own directory from a copy of it; the runs are copied back and merged."""
    server, a, b = (tmp_path / n for n in ("server", "machineA", "machineB"))
    for d in (server, a, b):
        d.mkdir()
    ok(trainer("init", "--model", "mlp", "--out", "global0", cwd=server))
    for machine, k in ((a, 0), (b, 1)):
        shutil.copytree(server / "global0", machine / "global0")
        ok(trainer("--init", "global0", "--client", str(k), "--clients", "2", "--split", "classes:5",
                   "--epochs", "1", "--out", f"client{k}", "--quiet", cwd=machine))
        shutil.copytree(machine / f"client{k}", server / f"client{k}")
    ok(run([sys.executable, "-m", "merge", "fedavg", "client0", "client1", "-o", "global1"], cwd=server))
    merged = manifest(server / "global1")
    assert merged["lineage"] == manifest(server / "global0")["lineage"]
    assert merged["samples_seen"] == sum(manifest(server / f"client{k}")["samples_seen"] for k in (0, 1))
