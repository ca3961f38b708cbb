"""FedProx: `python -m trainer --prox-mu MU` pulls a client towards the
weights it started from; MU = 0 is plain FedAvg local training."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import horovodrun, keras_weights, manifest, ok, trainer

COMMON = ["--model", "mlp", "--epochs", "2", "--client", "0", "--clients", "2", "--split", "classes:5", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("prox")
    ok(trainer("init", "--model", "mlp", "--out", "init", cwd=d))
    for name, extra in (("plain", []), ("mu0", ["--prox-mu", "0"]), ("mu1", ["--prox-mu", "1"])):
        ok(trainer("--init", "init", *COMMON, "--out", name, *extra, cwd=d))
    return d


def test_mu_zero_is_fedavg(runs):
    assert manifest(runs / "mu0")["final"]["replica_fingerprints"] == \
        manifest(runs / "plain")["final"]["replica_fingerprints"]
    assert manifest(runs / "mu0")["prox_mu"] == 0


def test_a_proximal_term_keeps_the_client_near_its_start(runs):
    start = keras_weights(runs / "init" / "model.keras")

    def drift(name):
        w = keras_weights(runs / name / "model.keras")
        return sum(float(np.square(w[k] - start[k]).sum()) for k in start)

    assert drift("mu1") < 0.5 * drift("plain")


def test_proximal_clients_stay_identical_across_ranks(runs):
    proc = ok(horovodrun(2, "gloo", "--init", str(runs / "init"), *COMMON, "--prox-mu", "0.5",
                         "--out", str(runs / "hvd"), cwd=runs))
    prints = manifest(runs / "hvd")["final"]["replica_fingerprints"]
    assert len(prints) == 2 and len(set(prints)) == 1, proc.stdout


def test_negative_mu_is_refused(tmp_path):
    proc = trainer("--model", "mlp", "--prox-mu", "-1", "--out", "x", cwd=tmp_path)
    assert proc.returncode == 2 and "--prox-mu must be a finite number >= 0" in proc.stderr


def test_proximal_clients_merge_without_their_anchors(runs):
    """The anchor is training state in the checkpoint, not a model weight."""
    import json
    import sys

    from conftest import run
    ok(run([sys.executable, "-m", "merge", "fedavg", "mu0", "mu1", "-o", "merged"], cwd=runs))
    info = json.loads(ok(run([sys.executable, "-m", "merge", "inspect", "mu1", "--json"], cwd=runs)).stdout)
    names = {t["name"] for t in info["tensors"]}
    assert names == {f"{layer}/{w}" for layer in ("dense1", "dense2", "logits") for w in ("kernel", "bias")}


def test_the_proximal_term_counts_once_across_mirrored_replicas(runs, tmp_path):
    """Two mirrored devices of 16 samples take the single process's steps of 32:
    tf.distribute sums the replicas' gradients after the hook, so each adds
    half of mu (w - w_start); adding all of it on both pulled twice as hard."""
    common = ["--init", str(runs / "init"), *COMMON[:-1], "--epochs", "1", "--optimizer", "sgd", "--lr", "0.05",
              "--no-lr-scaling", "--prox-mu", "1", "--quiet"]
    ok(trainer(*common, "--batch-size", "32", "--out", "one", cwd=tmp_path))
    ok(trainer(*common, "--batch-size", "16", "--backend", "mirrored", "--devices", "2", "--out", "two", cwd=tmp_path))
    one, two = keras_weights(tmp_path / "one" / "model.keras"), keras_weights(tmp_path / "two" / "model.keras")
    for k in one:
        np.testing.assert_allclose(two[k], one[k], atol=1e-6, err_msg=k)
