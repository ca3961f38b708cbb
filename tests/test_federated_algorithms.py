"""SCAFFOLD, partial participation and `--simulate` in `launch federated`.

SCAFFOLD is checked against a NumPy reference of the paper's updates
(Karimireddy et al. 2020, option II) over two rounds of 3 clients with 2
sampled per round: the client's new control variate from its start, its
end and its step count, the server control from the clients' controls, the
global as the sample-weighted mean. The clients train with plain SGD at a
constant learning rate, where option II is exact.
"""
from __future__ import annotations

import csv
import shutil
import sys

import h5py
import numpy as np
import pytest

from conftest import horovodrun, keras_weights, manifest, ok, run, trainer

LR = 0.05
DECAY = 0.5  # round 2 trains at LR / 2: the reference sees it through option II's 1 / (K lr)
CLIENTS = ["--clients", "3", "--clients-per-round", "2", "--rounds", "2", "--split", "dirichlet:0.5",
           "--model", "mlp", "--init", "init", "--lr-decay", str(DECAY)]
SGD = ["--", "--optimizer", "sgd", "--lr", str(LR)]


def launch(*args, cwd, timeout=900):
    return run([sys.executable, "-m", "launch", *args], cwd=cwd, timeout=timeout)


def merge(*args, cwd):
    return run([sys.executable, "-m", "merge", *args], cwd=cwd)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    d = tmp_path_factory.mktemp("fed")
    ok(trainer("init", "--model", "mlp", "--out", "init", cwd=d))
    ok(launch("federated", *CLIENTS, "--algorithm", "scaffold", "--out", "proc", *SGD, cwd=d))
    ok(launch("federated", *CLIENTS, "--algorithm", "scaffold", "--out", "sim", "--simulate", *SGD, cwd=d))
    return d


def controls(path, group="control") -> dict:
    from trainer.files.controls import keys_of
    with h5py.File(path / "scaffold.h5", "r") as f:
        return {k: f[group][k][()].astype(np.float64) for k in keys_of(f[group])}


def steps(path) -> int:
    with h5py.File(path / "scaffold.h5", "r") as f:
        return int(f.attrs["steps"])


def sampled(out) -> list[list[int]]:
    return [list(map(int, row["sampled"].split())) for row in csv.DictReader(open(out / "rounds.csv"))]


def trainable(path) -> dict:
    w = keras_weights(path)
    return {k: v.astype(np.float64) for k, v in w.items() if "kernel" in k or "bias" in k}


def test_scaffold_matches_a_numpy_reference_over_two_rounds_with_partial_participation(fed):
    out = fed / "proc"
    rounds = sampled(out)
    assert rounds == [[1, 2], [0, 1]]  # client 1 takes part twice: its c_i carries over
    x = trainable(fed / "init" / "model.keras")
    c = {k: np.zeros_like(v) for k, v in x.items()}
    c_i = {k: {n: np.zeros_like(v) for n, v in x.items()} for k in range(3)}
    for r, ks in enumerate(rounds, 1):
        ys, new_c_i, counts = {}, {}, {}
        for k in ks:
            run_dir = out / f"round-{r:03d}" / f"client-{k}"
            y = trainable(run_dir / "model.keras")
            got = controls(run_dir)
            K = steps(run_dir)
            lr = LR * DECAY ** (r - 1)
            assert manifest(run_dir)["optimizer"]["lr"] == lr
            for n in x:  # option II: c_i+ = c_i - c + (x - y) / (K lr)
                want = c_i[k][n] - c[n] + (x[n] - y[n]) / (K * lr)
                np.testing.assert_allclose(got[n], want, atol=2e-5 * max(1.0, np.abs(want).max()), err_msg=n)
            ys[k], new_c_i[k], counts[k] = y, got, manifest(run_dir)["samples_seen"]
        total = sum(counts.values())
        global_dir = out / f"round-{r:03d}" / "global"
        got_c = controls(global_dir)
        got_x = trainable(global_dir)
        for n in x:
            want_c = c[n] + sum(new_c_i[k][n] - c_i[k][n] for k in ks) / 3  # / N, not / sampled
            np.testing.assert_allclose(got_c[n], want_c, atol=1e-6, err_msg=n)
            want_x = sum(counts[k] / total * ys[k][n] for k in ks)
            np.testing.assert_allclose(got_x[n], want_x, atol=1e-6, err_msg=n)
        c = got_c
        x = got_x
        for k in ks:
            c_i[k] = new_c_i[k]
    assert manifest(out / "round-002" / "global")["round"] == 2


def test_simulate_gives_the_process_path_global_model(fed):
    for r in (1, 2):
        proc = keras_weights(fed / "proc" / f"round-{r:03d}" / "global")
        sim = keras_weights(fed / "sim" / f"round-{r:03d}" / "global")
        assert proc.keys() == sim.keys()
        for k in proc:
            np.testing.assert_allclose(sim[k], proc[k], rtol=0, atol=1e-6, err_msg=k)
        a, b = (controls(fed / p / f"round-{r:03d}" / "global") for p in ("proc", "sim"))
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
    assert open(fed / "sim" / "rounds.csv").read().splitlines()[0] == \
        open(fed / "proc" / "rounds.csv").read().splitlines()[0]
    # the simulated global is a merge directory a process round can start from
    ok(trainer("--init", "sim/round-002/global", "--client", "0", "--clients", "3", "--split", "dirichlet:0.5",
               "--epochs", "1", "--scaffold", "proc/round-002/client-0", "--out", "next", "--quiet",
               "--optimizer", "sgd", "--lr", str(LR), cwd=fed))
    assert manifest(fed / "next")["round"] == 2


def test_fedavg_is_the_by_hand_flow_bit_for_bit_and_scaffolds_first_round(fed):
    """--algorithm fedavg runs what a user runs by hand; SCAFFOLD's first round,
    where every control is zero, is exactly that FedAvg."""
    ok(launch("federated", "--clients", "3", "--clients-per-round", "2", "--rounds", "1", "--split",
              "dirichlet:0.5", "--model", "mlp", "--init", "init", "--algorithm", "fedavg", "--out", "avg", *SGD,
              cwd=fed))
    for k in (1, 2):  # launch's client seed: --seed + 1000 * round + client
        ok(trainer("--init", "init", "--client", str(k), "--clients", "3", "--split", "dirichlet:0.5",
                   "--split-seed", "0", "--seed", str(1000 + k), "--epochs", "1", "--out", f"hand{k}", "--quiet",
                   "--optimizer", "sgd", "--lr", str(LR), cwd=fed))
    ok(merge("fedavg", "hand1", "hand2", "-o", "hand", "--quiet", cwd=fed))
    launched = keras_weights(fed / "avg" / "round-001" / "global")
    for other in (fed / "hand", fed / "proc" / "round-001" / "global"):
        theirs = keras_weights(other)
        assert all(np.array_equal(launched[k], theirs[k]) for k in launched), other


def test_a_horovod_client_computes_the_single_process_control(fed, tmp_path):
    """2 ranks of 16 samples each take the same steps as one process with 32:
    the control variate agrees, and every rank held the same one (the run's
    replica check compares them at every checkpoint)."""
    common = ["--init", str(fed / "proc" / "round-001" / "global"), "--client", "1", "--clients", "3",
              "--split", "dirichlet:0.5", "--split-seed", "0", "--epochs", "1", "--optimizer", "sgd",
              "--lr", str(LR), "--no-lr-scaling", "--scaffold", str(fed / "proc" / "round-001" / "client-1"),
              "--quiet"]
    ok(trainer(*common, "--batch-size", "32", "--out", "one", cwd=tmp_path))
    ok(horovodrun(2, "gloo", *common, "--batch-size", "16", "--out", "two", cwd=tmp_path))
    two_dir = tmp_path / "rank0" / "two"  # each rank ran in its own directory: only rank 0 wrote
    assert not (tmp_path / "rank1" / "two").exists()
    one, two = controls(tmp_path / "one"), controls(two_dir)
    assert steps(tmp_path / "one") == steps(two_dir)
    for k in one:
        np.testing.assert_allclose(two[k], one[k], atol=1e-4 * max(1.0, np.abs(one[k]).max()), err_msg=k)
    assert len(set(manifest(two_dir)["final"]["replica_fingerprints"])) == 1


def one_line_error(proc, *fragments):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["--algorithm", "scafold"], "--algorithm scafold: choose one of fedavg, fedprox, scaffold"),
    (["--clients-per-round", "1"], "--clients-per-round 1: must be between 2 and --clients 3"),
    (["--clients-per-round", "4"], "--clients-per-round 4"),
    (["--prox-mu", "0.1"], "--prox-mu is FedProx's mu; add --algorithm fedprox"),
    (["--algorithm", "fedprox", "--prox-mu", "-1"], "--prox-mu -1.0: must be a finite number >= 0"),
    (["--algorithm", "scaffold", "--aggregator", "median"], "--algorithm scaffold averages with its own server"),
    (["--simulate", "--np", "2"], "--simulate runs every client in this process"),
    (["--simulate", "--aggregator", "krum:0"], "krum is not simulated"),
    (["--algorithm", "fedprox", "--", "--prox-mu", "0.1"], "--prox-mu after --: launch federated sets it"),
    (["--simulate", "--", "--prune"], "--prune/--structured is not supported with --simulate"),
    (["--lr-decay", "0"], "--lr-decay 0.0: must be in (0, 1]"),
    (["--", "--epochs", "3"], "--epochs after --: launch federated sets it for every client"),
])
def test_bad_federated_flags_exit_2_with_one_line(tmp_path, args, fragment):
    one_line_error(launch("federated", "--clients", "3", "--rounds", "1", "--model", "mlp", "--out", "fed", *args,
                          cwd=tmp_path), fragment)
    assert not any((tmp_path / "fed").glob("round-*"))


def test_bad_scaffold_inputs_exit_2_with_one_line(fed, tmp_path):
    g1, c1 = fed / "proc" / "round-001" / "global", fed / "proc" / "round-001" / "client-1"
    one_line_error(trainer("--model", "mlp", "--scaffold", "--out", "x", cwd=tmp_path),
                   "--scaffold trains a client from the round's global: pass --init GLOBAL")
    one_line_error(trainer("--init", str(g1), "--scaffold", "--backend", "mirrored", "--out", "x", cwd=tmp_path),
                   "--scaffold runs on the single and horovod backends, not mirrored")
    # a round-1 global without its server control: nothing to correct with
    shutil.copytree(g1, tmp_path / "g1")
    (tmp_path / "g1" / "scaffold.h5").unlink()
    one_line_error(trainer("--init", "g1", "--scaffold", "--out", "x", cwd=tmp_path),
                   "holds no SCAFFOLD server control (scaffold.h5)")
    # the client's previous control must come from an earlier round
    one_line_error(trainer("--init", str(g1), "--scaffold", str(fed / "proc" / "round-002" / "client-1"),
                           "--out", "x", cwd=tmp_path), "pass the client's previous run")
    # a control file of the wrong shape, and one that reaches outside itself
    shutil.copytree(c1, tmp_path / "c1")
    with h5py.File(tmp_path / "c1" / "scaffold.h5", "r+") as f:
        del f["control/dense1/kernel"]
        f["control/dense1/kernel"] = np.zeros((3, 3), np.float32)
    one_line_error(trainer("--init", str(g1), "--scaffold", "c1", "--out", "x", cwd=tmp_path),
                   "control/dense1/kernel is float32 (3, 3)")
    with h5py.File(tmp_path / "c1" / "scaffold.h5", "r+") as f:
        del f["control/dense1/kernel"]
        f["control/dense1/kernel"] = h5py.ExternalLink("/etc/passwd", "/x")
    one_line_error(trainer("--init", str(g1), "--scaffold", "c1", "--out", "x", cwd=tmp_path), "external link")
    # the server step: clients of another round, a .keras output, too few --clients
    one_line_error(merge("scaffold", str(c1), "--global", str(g1), "-o", "g", cwd=tmp_path),
                   "trained from the global of round 0, not from --global")
    one_line_error(merge("scaffold", str(fed / "proc" / "round-002" / "client-0"), str(c1), "--global", str(g1),
                         "-o", "g", cwd=tmp_path), "trained from the global of round 0")
    one_line_error(merge("scaffold", str(c1), "--global", str(fed / "init"), "-o", "g.keras", cwd=tmp_path),
                   "SCAFFOLD's global is a directory")
    one_line_error(merge("scaffold", str(c1), str(fed / "proc" / "round-001" / "client-2"), "--global",
                         str(fed / "init"), "-o", "g", "--clients", "1", cwd=tmp_path), "--clients 1: fewer than")
    assert not (tmp_path / "g").exists() and not (tmp_path / "x").exists()
