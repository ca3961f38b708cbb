"""Lineage that cannot be fooled by accident: a model.keras carries it alone,
merge refuses known beside unknown, --init re-hashes what `trainer init`
wrote, and merges count rounds. Real trainer runs on digits, through the CLIs."""
from __future__ import annotations

import json
import shutil
import sys
import zipfile

import numpy as np
import pytest

from conftest import manifest, ok, run, trainer


def merge(*args, cwd, timeout=300):
    return run([sys.executable, "-m", "merge", *args], cwd=cwd, timeout=timeout)


def lines(stream: str, prefix: str) -> list[str]:
    return [line for line in stream.splitlines() if line.startswith(prefix)]


def record(path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read("metadata.json"))["dptoolkit"]


def weights(path) -> list[np.ndarray]:
    import keras
    return [np.asarray(w) for w in keras.models.load_model(path, compile=False).get_weights()]


CLIENT = ("--clients", "2", "--split", "classes:5", "--epochs", "1", "--quiet")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """init (round 0), and its two clients c0, c1 (round 0)."""
    d = tmp_path_factory.mktemp("lineage")
    ok(trainer("init", "--model", "mlp", "--out", "init", cwd=d))
    for k in (0, 1):
        ok(trainer("--init", "init", "--client", str(k), *CLIENT, "--seed", str(k), "--out", f"c{k}", cwd=d))
    return d


def test_a_model_keras_copied_alone_keeps_its_lineage(fed):
    d = fed
    lineage = manifest(d / "init")["lineage"]
    elsewhere = d / "elsewhere"
    elsewhere.mkdir()
    for k in (0, 1):
        shutil.copy(d / f"c{k}" / "model.keras", elsewhere / f"c{k}.keras")
        got, m = record(elsewhere / f"c{k}.keras"), manifest(d / f"c{k}")
        assert got["kind"] == "run" and got["lineage"] == lineage and got["round"] == 0
        assert got["samples_seen"] == m["samples_seen"] > 0 and got["model"]["name"] == "mlp"
    proc = ok(merge("fedavg", "elsewhere/c0.keras", "elsewhere/c1.keras", "-o", "alone.keras", cwd=d))
    assert not lines(proc.stderr, "warning:"), proc.stderr
    assert record(d / "alone.keras")["lineage"] == lineage
    # The same merge as of the run directories: lineage and sample counts came along.
    ok(merge("fedavg", "c0", "c1", "-o", "dirs.keras", cwd=d))
    for a, b in zip(weights(d / "alone.keras"), weights(d / "dirs.keras")):
        np.testing.assert_array_equal(a, b)
    assert record(d / "init" / "model.keras")["kind"] == "init"


def test_known_beside_unknown_lineage_is_refused_unless_forced(fed):
    import keras
    d = fed
    keras.models.load_model(d / "c1" / "model.keras", compile=False).save(d / "plain.keras")  # no record
    proc = merge("fedavg", "c0", "plain.keras", "-o", "mixed.keras", "--uniform", cwd=d)
    errors = lines(proc.stderr, "error:")
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "plain.keras: no recorded initialization" in errors[0] and "--force" in errors[0]
    assert not (d / "mixed.keras").exists()
    forced = ok(merge("fedavg", "c0", "plain.keras", "-o", "mixed.keras", "--uniform", "--force", cwd=d))
    warnings = lines(forced.stderr, "warning:")
    assert len(warnings) == 1 and "--force" in warnings[0] and "plain.keras" in warnings[0], forced.stderr
    assert record(d / "mixed.keras")["lineage"] is None
    diff = merge("diff", "c0", "plain.keras", cwd=d)
    assert diff.returncode == 1 and "plain.keras records no initialization" in diff.stdout


def test_a_tampered_init_is_refused(fed):
    d = fed
    ok(trainer("init", "--model", "mlp", "--seed", "1", "--out", "other", cwd=d))
    # Weights replaced, manifest kept: the directory...
    shutil.copytree(d / "init", d / "tampered")
    shutil.rmtree(d / "tampered" / "checkpoints")
    shutil.copytree(d / "other" / "checkpoints", d / "tampered" / "checkpoints")
    # ...and a .keras whose metadata claims init's lineage for other's weights.
    with zipfile.ZipFile(d / "init" / "model.keras") as zf:
        claimed = zf.read("metadata.json")
    with zipfile.ZipFile(d / "other" / "model.keras") as src, zipfile.ZipFile(d / "tampered.keras", "w") as dst:
        for info in src.infolist():
            dst.writestr(info, claimed if info.filename == "metadata.json" else src.read(info))
    for source in ("tampered", "tampered.keras"):
        proc = trainer("--init", source, *CLIENT, "--client", "0", "--out", f"from-{source}", cwd=d)
        errors = lines(proc.stderr, "error:")
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
        assert "do not match the lineage" in errors[0] and source in errors[0]
        assert not (d / f"from-{source}" / "manifest.json").exists()
    # The untouched init, as a directory and as its model.keras, still starts runs.
    ok(trainer("--init", "init/model.keras", "--max-steps", "1", "--epochs", "1", "--quiet", "--out", "fromkeras",
               cwd=d))
    assert manifest(d / "fromkeras")["lineage"] == manifest(d / "init")["lineage"]


def test_rounds_are_counted_and_a_mixed_round_merge_warns(fed):
    """init (0) -> c0, c1 (0) -> g1 (1) -> r1c0, r1c1 (1) -> g2.keras (2) -> a
    run from g2.keras (2): merges carry the init's lineage, never re-hashed."""
    d = fed
    lineage = manifest(d / "init")["lineage"]
    assert manifest(d / "init")["round"] == 0 and manifest(d / "c0")["round"] == 0
    ok(merge("fedavg", "c0", "c1", "-o", "g1", cwd=d))
    assert manifest(d / "g1")["round"] == 1 and manifest(d / "g1")["lineage"] == lineage
    for k in (0, 1):
        ok(trainer("--init", "g1", "--client", str(k), *CLIENT, "--seed", str(10 + k), "--out", f"r1c{k}", cwd=d))
        assert manifest(d / f"r1c{k}")["round"] == 1 and manifest(d / f"r1c{k}")["lineage"] == lineage
    proc = ok(merge("fedavg", "r1c0", "r1c1", "-o", "g2.keras", cwd=d))
    assert record(d / "g2.keras")["round"] == 2 and "round 2" in proc.stdout
    ok(trainer("--init", "g2.keras", "--max-steps", "1", "--epochs", "1", "--quiet", "--out", "r2", cwd=d))
    assert manifest(d / "r2")["round"] == 2 and manifest(d / "r2")["lineage"] == lineage
    info = json.loads(ok(merge("inspect", "g2.keras", "--json", cwd=d)).stdout)
    assert info["round"] == 2 and info["lineage"] == lineage
    # A client of round 0 beside one of round 1: averaged, with one warning line.
    proc = ok(merge("fedavg", "c0", "r1c1", "-o", "stale.keras", cwd=d))
    warnings = lines(proc.stderr, "warning:")
    assert len(warnings) == 1 and "different rounds" in warnings[0], proc.stderr
    assert "round 0: c0" in warnings[0] and "round 1: r1c1" in warnings[0]
    assert record(d / "stale.keras")["round"] == 2
