"""What `python -m merge` prints and records (issue 14, points 4, 7, 8):
--json is one JSON document on stdout and nothing else, evaluate/barrier/auto
default --data to the data set the inputs record, flags that did nothing are
refused, and the plots say what was compared on which data.

The commands run in this process (merge.cli.main, with the file descriptors
captured), on two short trainer runs of one init; one runs as a subprocess."""
from __future__ import annotations

import json
import shutil
import sys

import pytest

from conftest import manifest, ok, run, trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    ok(trainer("init", "--model", "mlp", "--out", "init", cwd=d))
    for name, seed in (("a", "0"), ("b", "1")):
        ok(trainer("--init", "init", "--epochs", "1", "--max-steps", "3", "--seed", seed, "--out", name,
                   "--quiet", cwd=d))
    return d


def merge(capfd, *argv) -> tuple[int, str, str]:
    from merge.cli import main
    code = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def as_json(out: str):
    """The whole of stdout as one document: anything else there fails here."""
    return json.loads(out)


def refused(result, *needles) -> str:
    code, out, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), result
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_every_report_is_one_json_document(runs, capfd, monkeypatch):
    from trainer.checkpoint import read_record
    monkeypatch.chdir(runs)
    code, out, _ = merge(capfd, "fedavg", "a", "b", "-o", "g", "--json")
    doc = as_json(out)
    samples = manifest(runs / "a")["samples_seen"] + manifest(runs / "b")["samples_seen"]
    assert code == 0 and doc["out"] == "g" and doc["samples_seen"] == samples and doc["warnings"] == []
    assert [i["path"] for i in doc["inputs"]] == ["a", "b"]
    assert doc["data"] == manifest(runs / "g")["data"] == {"name": "digits"}
    code, out, _ = merge(capfd, "fedavg", "a", "b", "-o", "g.keras", "--json")
    assert code == 0 and as_json(out)["out"] == "g.keras" and read_record(runs / "g.keras")["data"]["name"] == "digits"

    code, out, _ = merge(capfd, "ensemble", "a", "b", "-o", "ens.keras", "--json")
    doc = as_json(out)
    assert code == 0 and doc["members"] == ["a", "b"] and doc["data"] == "digits" and doc["num_classes"] == 10
    code, out, _ = merge(capfd, "server-step", "init", "g", "-o", "g1", "--state", "s.h5", "--json")
    doc = as_json(out)
    assert code == 0 and doc["server"]["rule"] == "fedavgm" and doc["state"] == "s.h5" and doc["warnings"] == []
    assert manifest(runs / "g1")["data"] == {"name": "digits"}
    code, out, _ = merge(capfd, "align", "a", "b", "-o", "al.keras", "--json")
    doc = as_json(out)
    assert code == 0 and {g: v["units"] for g, v in doc["layers"].items()} == {"dense1": 256, "dense2": 128}

    code, out, _ = merge(capfd, "diff", "a", "b", "--json")
    assert code == 0 and as_json(out) == {"a": "a", "b": "b", "can_average": True, "problems": [], "note": None}
    code, out, _ = merge(capfd, "diff", "a", "al.keras", "--json")  # an aligned copy records no lineage
    doc = as_json(out)
    assert code == 1 and not doc["can_average"] and doc["problems"][0].startswith("lineage: al.keras")

    code, out, _ = merge(capfd, "barrier", "a", "b", "--points", "3", "--no-align", "--json")
    doc = as_json(out)
    assert code == 0 and doc["data"] == "digits" and doc["data_recorded"] and doc["points"] == [0.0, 0.5, 1.0]
    assert list(doc["curves"]) == ["naive"] and len(doc["curves"]["naive"]) == 3
    code, out, _ = merge(capfd, "auto", "a", "b", "-o", "auto.keras", "--json")
    doc = as_json(out)
    assert code == 0 and doc["choice"] in ("average", "align", "ensemble") and doc["out"] == "auto.keras"

    code, out, _ = merge(capfd, "evaluate", "a", "g", "g.keras", "ens.keras", "al.keras", "g1", "--json")
    doc = as_json(out)
    assert code == 0 and doc["data"] == "digits" and doc["data_recorded"] and doc["plot"] is None
    assert [(m["path"], m["kind"]) for m in doc["models"]] == [
        ("a", "run"), ("g", "merge"), ("g.keras", "keras"), ("ens.keras", "keras"), ("al.keras", "keras"),
        ("g1", "merge")]
    assert all(0 <= m["accuracy"] <= 1 for m in doc["models"])


def test_json_stdout_of_a_real_process_holds_only_the_document(runs):
    proc = ok(run([sys.executable, "-m", "merge", "evaluate", "a", "b", "--json"], cwd=runs))
    doc = json.loads(proc.stdout)
    assert [m["path"] for m in doc["models"]] == ["a", "b"] and doc["data"] == "digits"


def test_evaluate_defaults_to_the_recorded_data_set(runs, capfd, monkeypatch, tmp_path):
    monkeypatch.chdir(runs)
    code, given, _ = merge(capfd, "evaluate", "a", "b", "--data", "digits", "--json")
    code2, default, _ = merge(capfd, "evaluate", "a", "b", "--json")
    assert code == code2 == 0 and as_json(given)["models"] == as_json(default)["models"]
    assert not as_json(given)["data_recorded"]
    code, out, _ = merge(capfd, "evaluate", "a", "init")  # an init records none: scored on a's
    assert code == 0 and out.splitlines()[-1] == "scored on the test split of digits, the data set the inputs record"
    code, out, _ = merge(capfd, "evaluate", "a/model.keras", "--json")  # the file alone, copied elsewhere
    assert code == 0 and as_json(out)["data"] == "digits" and as_json(out)["data_recorded"]

    refused(merge(capfd, "evaluate", "init"),
            "--data is needed: init records no data set", "pass --data NAME")
    refused(merge(capfd, "barrier", "init", "init"), "--data is needed")
    other = tmp_path / "other"
    shutil.copytree(runs / "b", other)
    m = manifest(other)
    m["data"]["name"] = "synthetic"
    (other / "manifest.json").write_text(json.dumps(m))
    refused(merge(capfd, "evaluate", "a", str(other)),
            f"the inputs record different data sets (a: digits; {other}: synthetic)", "pass --data NAME")
    m["data"]["name"] = "gone.npz"
    (other / "manifest.json").write_text(json.dumps(m))
    refused(merge(capfd, "evaluate", str(other)), "--data defaults to gone.npz, which the inputs record")


def test_flags_that_did_nothing_are_refused(runs, capfd, monkeypatch):
    monkeypatch.chdir(runs)
    refused(merge(capfd, "fedavg", "a", "b", "-o", "x", "--aggregator", "median", "--uniform"),
            "--uniform", "--aggregator median ignores weights")
    refused(merge(capfd, "fedavg", "a", "b", "-o", "x", "--weights", "1,2", "--aggregator", "krum:0"), "--weights")
    refused(merge(capfd, "fedavg", "a", "b", "-o", "x", "--data-dir", "somewhere"), "--data-dir", "no --data")
    refused(merge(capfd, "fedavg", "a", "b", "-o", "x", "--mask-policy", "union"),
            "--mask-policy union", "no input records masks")
    refused(merge(capfd, "ensemble", "a", "b", "-o", "e.h5"), "-o e.h5", ".keras")
    assert not (runs / "x").exists() and not (runs / "e.h5").exists()


def test_plots_say_what_was_compared():
    import matplotlib.pyplot as plt

    from merge import barrier, evaluate
    rows = [{"path": "a", "kind": "run", "accuracy": 0.9}, {"path": "g", "kind": "merge", "accuracy": 0.95},
            {"path": "b", "kind": "run", "accuracy": 0.8}]
    fig = evaluate.figure(rows, "digits")
    ax = fig.axes[0]
    assert ax.get_title() == "merge evaluate: 3 models on the test split of digits"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["run", "merge"]
    plt.close(fig)

    def res(points):
        alphas = [i / (points - 1) for i in range(points)]
        curve = [{"alpha": t, "loss": 1.0, "accuracy": 0.5} for t in alphas]
        return {"a": "x.keras", "b": "y.keras", "data": "digits", "points": alphas,
                "curves": {"naive": curve, "aligned": curve}, "barrier": {"naive": 0.5, "aligned": 0.1}}

    fig = barrier.figure(res(11))
    assert fig._suptitle.get_text() == "merge barrier: A = x.keras, B = y.keras, test split of digits"
    left = fig.axes[0]
    assert [t.get_text() for t in left.get_legend().get_texts()] == [
        "B as it is (straight line), barrier 0.500", "B aligned to A, barrier 0.100"]
    assert {line.get_marker() for line in left.get_lines()} == {"o"}
    plt.close(fig)
    fig = barrier.figure(res(101))  # markers would hide the curve
    assert {line.get_marker() for line in fig.axes[0].get_lines()} == {"None"}
    plt.close(fig)
