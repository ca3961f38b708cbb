"""`python -m launch federated`, and the two-machine workflow by hand."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_env, keras_weights, manifest, ok, run, trainer


def launch(*args, cwd, timeout=600):
    return run([sys.executable, "-m", "launch", *args], cwd=cwd, timeout=timeout)


def test_rounds_with_data_parallel_clients(tmp_path):
    """2 clients, each a 2-rank horovodrun job, 2 rounds of SCAFFOLD (the
    second by --resume): the controls come from allreduced gradients and are
    compared across ranks."""
    args = ["federated", "--clients", "2", "--local-epochs", "1", "--split", "dirichlet:0.5", "--np", "2",
            "--model", "mlp", "--algorithm", "scaffold", "--out", "fed"]
    ok(launch(*args, "--rounds", "1", cwd=tmp_path))
    # round 2 by --resume: each client's previous control is found in round 1
    proc = ok(launch(*args, "--rounds", "2", "--resume", cwd=tmp_path))
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


def start_launch(*args, cwd) -> subprocess.Popen:
    """launch in its own process group, so a test can kill it with its children."""
    return subprocess.Popen([sys.executable, "-m", "launch", *args], cwd=cwd, env=cli_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout=300) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"launch ended before {path} appeared: {proc.communicate()}"
        assert time.monotonic() < end, f"no {path} within {timeout} s"
        time.sleep(0.05)


SIM = ["--clients", "3", "--clients-per-round", "2", "--model", "mlp", "--simulate", "--algorithm", "scaffold",
       "--server-opt", "fedadam", "--server-lr", "0.1"]
SGD = ["--", "--optimizer", "sgd", "--lr", "0.05"]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A simulated SCAFFOLD + FedAdam run SIGKILLed in round 2 of 2, resumed
    with --rounds 3 and --json, beside the same 3 rounds uninterrupted."""
    d = tmp_path_factory.mktemp("resume")
    full = start_launch("federated", *SIM, "--rounds", "3", "-o", "full", "--quiet", *SGD, cwd=d)
    cut = start_launch("federated", *SIM, "--rounds", "2", "-o", "cut", *SGD, cwd=d)
    wait_for(d / "cut" / "round-002", cut)
    os.killpg(cut.pid, signal.SIGKILL)
    cut.communicate()
    assert not (d / "cut" / "round-002" / "round.json").exists()
    assert [r["round"] for r in csv.DictReader(open(d / "cut" / "rounds.csv"))] == ["1"]
    again = ok(launch("federated", *SIM, "--rounds", "3", "-o", "cut", "--resume", "--json", *SGD, cwd=d))
    assert full.wait(timeout=600) == 0, full.communicate()
    return d, again


def test_a_killed_run_resumes_to_the_uninterrupted_result(resumed):
    """Weights, SCAFFOLD's controls and FedAdam's moments all come back: the
    resumed rounds equal those of a run never stopped."""
    d, proc = resumed
    for r in (1, 2, 3):
        a, b = (keras_weights(d / run_ / f"round-{r:03d}" / "global") for run_ in ("full", "cut"))
        assert all(np.array_equal(a[k], b[k]) for k in a), r
    assert (d / "full" / "rounds.csv").read_text() == (d / "cut" / "rounds.csv").read_text()
    assert json.loads((d / "cut" / "plan.json").read_text())["rounds"] == 3


def test_json_is_the_only_thing_on_stdout(resumed):
    d, proc = resumed
    doc = json.loads(proc.stdout)
    assert doc["out"] == "cut" and doc["complete"] is True
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3]
    rows = list(csv.DictReader(open(d / "cut" / "rounds.csv")))
    for record, row in zip(doc["rounds"], rows):
        assert record["global_accuracy"] == float(row["global_accuracy"])
        assert [c["client"] for c in record["clients"]] == list(map(int, row["sampled"].split()))
        assert Path(d / record["global"]).is_dir()
    # progress went to stderr: a line per client as it finished, then the round
    assert "resuming cut after round 1 of 3" in proc.stderr
    assert "round 3/3 client 2/2 (client-2): accuracy " in proc.stderr and "round 3/3: clients" in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--rounds", "3", "--resume", "--split", "classes:5"],
     "--resume: --split differs from the run in cut (classes:5 here, iid in plan.json); pass --split iid"),
    (["--rounds", "3", "--resume", "--", "--optimizer", "sgd"], "--resume: the trainer flags after -- differ"),
    (["--rounds", "2", "--resume", *SGD[:1], *SGD[1:]], "--rounds 2: cut already has 3 complete rounds"),
    (["--rounds", "4", *SGD], "--out cut is not empty; pass --resume to continue its rounds"),
])
def test_a_resume_that_does_not_match_the_run_is_refused(resumed, flags, message, capsys, monkeypatch):
    from launch.cli import main
    d, _ = resumed
    monkeypatch.chdir(d)
    before = sorted(p.name for p in (d / "cut").iterdir())
    assert main(["federated", *SIM, "-o", "cut", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert sorted(p.name for p in (d / "cut").iterdir()) == before


def test_resume_of_a_directory_without_a_run_is_refused(tmp_path, capsys, monkeypatch):
    from launch.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["federated", "--clients", "2", "--rounds", "1", "--model", "mlp", "-o", "nothing",
                 "--resume"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --resume: nothing/plan.json does not exist, so --out "
                                               "nothing holds no launch federated run to continue; drop --resume "
                                               "to start one")


def _trainer_pid(marker: str, cwd: Path, proc: subprocess.Popen, timeout=120) -> int:
    """The pid of the trainer started in `cwd` whose command line holds
    `marker` (launch runs each client in a process group of its own)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                here = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if b"trainer" in cmd and any(marker.encode() in a for a in cmd) and here == str(cwd):
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no trainer process for {marker}")


def test_a_failed_client_names_its_log_keeps_the_rounds_before_and_resumes(tmp_path):
    """Processes engine with FedAvgM, 2 clients: round 2's first client is
    killed. The error line names the client and its log; rounds.csv and
    rounds.png hold round 1; --resume redoes round 2 from round 1's global
    and server state."""
    import h5py
    args = ["federated", "--clients", "2", "--rounds", "2", "--model", "mlp", "--server-opt", "fedavgm", "-o", "fed"]
    first, second = 1, 0  # round 1's last client, round 2's first
    proc = start_launch(*args, "--json", cwd=tmp_path)
    out = tmp_path / "fed"
    log = out / "round-002" / f"client-{second}.log"
    wait_for(log, proc)
    os.kill(_trainer_pid(str(Path("round-002") / f"client-{second}"), tmp_path, proc), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: round 2 client {second} failed (killed by SIGKILL): ")
    assert line.endswith(f"; its log: {log.relative_to(tmp_path)}")
    doc = json.loads(stdout)  # the rounds done, and why it stopped
    assert doc["complete"] is False and doc["error"] == line[len("error: "):]
    assert [r["round"] for r in doc["rounds"]] == [1] and doc["rounds"][0]["global"] == "fed/round-001/global"
    assert f"round 1/2 client 2/2 (client-{first}): accuracy " in stderr and "round 1/2: clients" in stderr
    assert [r["round"] for r in csv.DictReader(open(out / "rounds.csv"))] == ["1"]
    assert (out / "rounds.png").stat().st_size > 1000
    assert "final: loss=" in (out / "round-001" / f"client-{first}.log").read_text()  # the client's output, kept

    proc = ok(launch(*args, "--resume", cwd=tmp_path))
    assert "resuming fed after round 1 of 2" in proc.stdout
    assert [r["round"] for r in csv.DictReader(open(out / "rounds.csv"))] == ["1", "2"]
    assert manifest(out / f"round-002/client-{second}")["init"].endswith("round-001/global")
    # round 2's server step continued round 1's momentum: m2 = 0.9 m1 + (average2 - global1)
    from trainer.files.sources import open_source
    g1, avg2 = open_source(out / "round-001" / "global"), open_source(out / "round-002" / "average")
    with h5py.File(out / "round-001" / "server_state.h5") as s1, h5py.File(out / "round-002" / "server_state.h5") as s2:
        keys = []
        s2["m"].visit(lambda k: keys.append(k) if isinstance(s2["m"][k], h5py.Dataset) else None)
        assert keys == ["dense1/0", "dense1/1", "dense2/0", "dense2/1", "logits/0", "logits/1"]
        for k in keys:
            x, avg = (np.asarray(src.read(k), np.float64) for src in (g1, avg2))
            want = 0.9 * s1["m"][k][()] + (avg - x)
            np.testing.assert_allclose(s2["m"][k][()], want, rtol=0, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("extra, message", [
    (["--seed", "3"], "--seed after --: launch federated sets it for every client; use --seed before -- instead"),
    (["--epoch", "2"], "--epochs after --: launch federated sets it for every client; use --local-epochs"),
    (["--data=synthetic"], "--data after --: launch federated sets it"),
    (["--split-seed", "1"], "--split-seed after --: launch federated sets it for every client; use --seed"),
    (["--resume"], "--resume after --: launch federated sets it for every client; use --resume before --"),
    (["--quiet"], "--quiet after --"),
    (["--no-such-flag"], "trainer flags after --: unrecognized arguments: --no-such-flag"),
])
def test_trainer_flags_that_launch_sets_are_refused(tmp_path, capsys, monkeypatch, extra, message):
    from launch.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["federated", "--clients", "2", "--rounds", "1", "-o", "fed", "--", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert not (tmp_path / "fed").exists()


def _plan(tmp_path, **kw):
    from launch.federated import Plan
    kw = {"out": tmp_path / "fed-a", "clients": 2, "rounds": 1, "local_epochs": 2, "model": "mlp", **kw}
    return Plan(**kw)


def test_the_rounds_figure_says_what_was_run(tmp_path):
    import matplotlib.pyplot as plt

    from launch.rounds import csv_row, figure
    plan = _plan(tmp_path, algorithm="fedprox", aggregator="median", server_opt="fedyogi", server_lr=0.5)
    record = {"round": 1, "global_accuracy": 0.5, "global_loss": 1.0,
              "clients": [{"client": 0, "accuracy": 0.4}, {"client": 1, "accuracy": 0.6}]}
    fig = figure(plan, [csv_row(record, True)])
    ax = fig.axes[0]
    assert ax.get_title() == "fed-a: mlp on digits\n2 clients, --split iid, 2 local epochs"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["client 0", "client 1",
                      "global: FedProx mu 0.01, aggregator median, server FedYogi lr 0.5"]
    assert list(ax.get_xticks()) == [1] and all(line.get_marker() not in (None, "None", "") for line in ax.lines)
    plt.close(fig)
    # many rounds of sampled clients: integer ticks, no markers
    plan = _plan(tmp_path, clients=5, clients_per_round=2, rounds=60)
    rows = [csv_row({**record, "round": r}, False) for r in range(1, 61)]
    fig = figure(plan, rows)
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticks() if 0.5 <= t <= 60.5]
    assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks), ticks
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "mean of the 2 sampled clients", "global: FedAvg, aggregator mean, no server optimizer"]
    assert all(line.get_marker() in (None, "None", "") for line in ax.lines)
    assert "5 clients (2 per round)" in ax.get_title()
    plt.close(fig)
