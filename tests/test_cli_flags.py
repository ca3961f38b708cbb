"""The trainer's command line: every flag documented, flags that would do
nothing refused with one line and exit 2, --json, and the curves picture.

Most cases call trainer.cli.main in this process: each is refused before
any training, so a subprocess (a Python start and a TensorFlow import per
case) would only make them slow.
"""
import argparse
import json
import re

import pytest

from conftest import horovodrun, manifest, ok, trainer
from trainer import cli

PRUNE_HINT = "add --prune (or --structured), or drop"


def refused(capsys, argv, want: str):
    """main(argv) exits 2 with exactly the line `error: want`, nothing on stdout."""
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [f"error: {want}"], err


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.mark.parametrize("argv, want", [
    (["--target-sparsity", "0.5"], f"--target-sparsity only applies with pruning: {PRUNE_HINT} --target-sparsity"),
    (["--prune-every", "5", "--prune-layers", "conv.*"],
     f"--prune-every, --prune-layers only apply with pruning: {PRUNE_HINT} --prune-every, --prune-layers"),
    (["--prune-schedule", "constant", "--prune-begin", "0", "--prune-end", "9", "--prune-config", "t.json"],
     "--prune-schedule, --prune-begin, --prune-end, --prune-config only apply with pruning: "
     f"{PRUNE_HINT} --prune-schedule, --prune-begin, --prune-end, --prune-config"),
    (["--verify-masks"], "--verify-masks checks pruning or freezing masks: add --prune, --structured or --freeze, "
                         "or drop --verify-masks"),
    (["--prune", "--prune-every", "0"], "--prune-every must be at least 1, got 0; omit it for the default "
                                        "(every 10 steps)"),
    (["--max-steps", "0"], "--max-steps must be at least 1, got 0; omit it for the default (no limit)"),
    (["--max-steps", "-3"], "--max-steps must be at least 1, got -3; omit it for the default (no limit)"),
    (["--threads", "0"], "--threads must be at least 1, got 0; omit it for the default (auto)"),
    (["--save-every-steps", "-5"], "--save-every-steps must be 0 (only at epoch ends) or more, got -5"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be a finite number >= 0 (0: no warmup), got -1.0"),
    (["--keep", "0"], "--keep must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--backend", "mirrored", "--devices", "0"],
     "--devices must be at least 1, got 0; omit it for the default (every visible device)"),
    (["--split", "classes:5"], "--split only applies to a federated client: add --client K --clients N, "
                               "or drop --split"),
    (["--split", "iid", "--split-seed", "3"], "--split and --split-seed only apply to a federated client: add "
                                              "--client K --clients N, or drop --split and --split-seed"),
    (["--data-dir", "somewhere"], "--data-dir does not apply to --data digits, which is built in; it is for "
                                  "--data cifar10 or --data PATH.npz: drop --data-dir"),
    (["--startup-timeout", "30"], "--startup-timeout only applies to the Horovod and multiworker backends, which "
                                  "wait for their peers, and this run uses single (--backend auto resolved to single): "
                                  "drop --startup-timeout"),
    (["--backend", "mirrored", "--startup-timeout", "30"], "--startup-timeout only applies to the Horovod and "
     "multiworker backends, which wait for their peers, and this run uses mirrored: drop --startup-timeout"),
    (["--devices", "2"], "--devices only applies to --backend mirrored, and this run uses single (--backend auto "
                         "resolved to single): add --backend mirrored, or drop --devices"),
    (["--backend", "horovod", "--devices", "2"], "--devices only applies to --backend mirrored, and this run uses "
                                                 "horovod: add --backend mirrored, or drop --devices"),
    (["--fp16-allreduce"], "--fp16-allreduce only applies to the Horovod backend, and this run uses single "
                           "(--backend auto resolved to single): launch it with horovodrun, mpirun or srun, or drop "
                           "--fp16-allreduce"),
    (["--backend", "mirrored", "--fp16-allreduce", "--no-pin"],
     "--fp16-allreduce and --no-pin only apply to the Horovod backend, and this run uses mirrored: launch it with "
     "horovodrun, mpirun or srun, or drop --fp16-allreduce and --no-pin"),
])
def test_flag_refused_before_any_work(here, capsys, argv, want):
    refused(capsys, argv, want)
    assert list(here.iterdir()) == []


def test_auto_backend_is_judged_as_the_launcher_sets_it(here, capsys, monkeypatch):
    # horovodrun sets HOROVOD_RANK: auto means horovod, so --devices is wrong
    # there; a rank other than 0 stays silent (rank 0 says it for all).
    monkeypatch.setenv("HOROVOD_RANK", "0")
    refused(capsys, ["--devices", "2"], "--devices only applies to --backend mirrored, and this run uses horovod "
                                        "(--backend auto resolved to horovod): add --backend mirrored, or drop --devices")
    monkeypatch.setenv("HOROVOD_RANK", "1")
    assert cli.main(["--devices", "2"]) == 2
    assert capsys.readouterr() == ("", "")


def test_devices_under_horovodrun_is_one_line_from_rank_0(cwd):
    proc = horovodrun(2, "gloo", "--devices", "2", "--out", "run", cwd=cwd)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error:" in line]
    assert errors == ["[0]<stderr>:error: --devices only applies to --backend mirrored, and this run uses horovod "
                      "(--backend auto resolved to horovod): add --backend mirrored, or drop --devices"], errors
    assert not (cwd / "rank0" / "run").exists()


@pytest.mark.parametrize("argv, want", [
    (["--dropout", "0.2"], "--dropout does not apply to model digits_cnn (it has no dropout); drop --dropout, or "
                           "pick a model that takes it: mlp, lstm, cnn_lstm, or a function of yours with a dropout "
                           "argument"),
    (["--model", "mlp", "--recurrent-dropout", "0.1"],
     "--recurrent-dropout does not apply to model mlp (it has no recurrent dropout); drop --recurrent-dropout, or "
     "pick a model that takes it: lstm, cnn_lstm, or a function of yours with a recurrent_dropout argument"),
    (["--model", "nets:plain", "--dropout", "0.3"],
     "--dropout does not apply to model nets:plain (its function takes no dropout argument); drop --dropout, or "
     "pick a model that takes it: mlp, lstm, cnn_lstm, or a function of yours with a dropout argument"),
    (["--split", "classes:20", "--client", "0", "--clients", "2"],
     "--split classes:20: the data set has 10 classes, so a client cannot hold 20; use classes:C with C <= 10, "
     "or iid"),
    (["--client", "2", "--clients", "2"], "--client must be in 0..1 (--clients 2), got 2"),
    (["--lr", "0"], "--lr must be positive, got 0.0"),
])
def test_flag_refused_once_model_or_data_is_known(here, capsys, monkeypatch, argv, want):
    (here / "nets.py").write_text(
        "import keras\n"
        "def plain(input_shape, num_classes):\n"
        "    inp = keras.Input(shape=input_shape)\n"
        "    return keras.Model(inp, keras.layers.Dense(num_classes)(keras.layers.Flatten()(inp)))\n")
    monkeypatch.syspath_prepend(str(here))
    refused(capsys, [*argv, "--out", "run"], want)
    assert not (here / "run").exists()


def test_dropout_on_a_model_with_dropout_is_kept(here, capsys):
    """The refusal is for models that ignore the rate; one that takes it
    trains with it (and records it), and a resume keeps that rate."""
    assert cli.main(["--model", "mlp", "--dropout", "0.2", "--epochs", "1", "--max-steps", "2", "--quiet",
                     "--out", "run"]) == 0
    assert manifest(here / "run")["model"]["options"]["dropout"] == 0.2
    capsys.readouterr()
    refused(capsys, ["--resume", "--out", "run", "--dropout", "0.3"],
            "--dropout 0.3: --resume run continues with the dropout it started with (0.2); drop --dropout")


def test_init_of_another_model_suggests_the_model(here, capsys):
    assert cli.main(["init", "--model", "mlp", "-o", "init"]) == 0
    capsys.readouterr()
    refused(capsys, ["--init", "init", "--model", "digits_cnn", "--out", "run"],
            "--init init: written for model 'mlp', not 'digits_cnn'; pass --model mlp or drop --model")
    # A .keras that Keras saved alone records no trainer model, but the
    # registry names its models: the error says which --model fits.
    from trainer.models import build_model
    build_model("mlp", (8, 8, 1), 10).save(here / "plain.keras")
    refused(capsys, ["--init", "plain.keras", "--out", "run"],
            "--init plain.keras: tensor conv1/kernel missing; the weights do not fit model 'digits_cnn' (the file "
            "holds dense1/bias, dense1/kernel, dense2/0, dense2/1, logits/bias, logits/kernel); it was saved from "
            "model mlp: pass --model mlp")


def test_init_refuses_an_ensemble(here, capsys):
    from merge.ensemble import build_ensemble
    from trainer.checkpoint import export_keras
    from trainer.models import build_model
    export_keras(build_ensemble([build_model("mlp", (8, 8, 1), 10), build_model("mlp", (8, 8, 1), 10)]),
                 here / "ens.keras")
    refused(capsys, ["--init", "ens.keras", "--out", "run"],
            "--init ens.keras: an ensemble (`python -m merge ensemble`) combines several models and cannot be "
            "trained from; pass one of its members (a run directory or .keras) instead")
    assert not (here / "run").exists()


def test_init_subcommand_flags(here, capsys):
    refused(capsys, ["init", "--data-dir", "x", "-o", "init"],
            "--data-dir does not apply to --data digits, which is built in; it is for --data cifar10 or "
            "--data PATH.npz: drop --data-dir")
    assert cli.main(["init", "--model", "mlp", "--out", "init", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["out"] == "init" and doc["model"]["name"] == "mlp" and doc["lineage"].startswith("sha256:")


def test_slice_takes_a_run_directory_and_the_old_output_flag(here, capsys):
    from trainer.checkpoint import export_keras
    from trainer.models import build_model
    (here / "run").mkdir()
    refused(capsys, ["slice", "run", "--fraction", "0.5", "-o", "small.keras"],
            "run: a directory without model.keras; give a finished run directory or a .keras file")
    export_keras(build_model("mlp", (8, 8, 1), 10), here / "run" / "model.keras")
    refused(capsys, ["slice", "run", "--fraction", "0.5"],
            "-o/--out is required: the smaller .keras to write (see --help)")
    refused(capsys, ["slice", "run", "--fraction", "0.5", "--layers", "(", "-o", "small.keras"],
            "--layers '(': not a regular expression (missing ), unterminated subpattern at position 0)")
    assert cli.main(["slice", "run", "--fraction", "0.5", "--output", "small.keras", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == ["warning: --output is deprecated; use -o/--out"]
    doc = json.loads(out)
    assert doc["out"] == "small.keras" and doc["source"] == "run/model.keras"
    assert doc["params_after"] < doc["params_before"] and doc["max_output_difference"] < 1e-5
    assert (here / "small.keras").is_file()


def _parsers():
    return {"python -m trainer": cli.train_parser(), "python -m trainer init": cli.init_parser(),
            "python -m trainer slice": cli.slice_parser()}


def test_every_flag_has_help_that_states_its_default():
    missing = []
    for prog, parser in _parsers().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            text = parser._get_formatter()._expand_help(action) if action.help else ""
            if not action.option_strings:  # a positional argument: always given, no default
                assert text, (prog, action.dest)
                continue
            if not re.search(r"\b(default|required)\b", text):
                missing.append(f"{prog} {'/'.join(action.option_strings) or action.dest}: {text!r}")
            elif action.default not in (None, False, True, argparse.SUPPRESS) and "%(default)" not in action.help:
                # A default written out by hand must be the one argparse uses.
                shown = re.search(r"default:? ([^\s);,:]+)", text)
                assert shown and shown.group(1) in (str(action.default), f"{action.default:g}"
                                                    if isinstance(action.default, float) else ""), (prog, text)
    assert missing == [], "\n".join(missing)


def test_help_names_the_subcommands_and_one_output_flag(capsys):
    text = " ".join(cli.train_parser().format_help().split())
    assert "python -m trainer init" in text and "python -m trainer slice" in text
    for parser in _parsers().values():
        # Python 3.13's argparse names the metavar once: "-o, --out OUT"
        assert re.search(r"-o( OUT)?, --out OUT", parser.format_help())
        assert "--output" not in parser.format_help()  # slice keeps it only as a hidden, deprecated alias


def test_json_summary_is_all_of_stdout(cwd):
    proc = ok(trainer("--epochs", "1", "--json", "--out", "run", cwd=cwd))
    doc = json.loads(proc.stdout)  # the whole of stdout is one document
    m = manifest(cwd / "run")
    assert doc["run_dir"] == "run" and doc["model"] == "digits_cnn" and doc["data"] == "digits"
    assert doc["test_accuracy"] == m["final"]["test_accuracy"] and doc["test_loss"] == m["final"]["test_loss"]
    assert doc["steps"] == m["step"] == 45 and doc["epoch"] == 1 and doc["samples_seen"] == 1438
    assert doc["replicas"] == 1 and doc["backend"] == m["backend"] and doc["samples_per_sec"] > 0
    assert doc["lineage"] == m["lineage"] and doc["round"] == 0
    assert "training digits_cnn on digits" in proc.stderr and "epoch 1: " in proc.stderr
    # A one-epoch run still draws its curves (the picture itself: test_curves_*).
    assert (cwd / "run" / "curves.png").stat().st_size > 0


def _history(n):
    return [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 1 - 0.5 / e, "test_loss": 1.2 / e,
             "test_accuracy": 1 - 0.6 / e} for e in range(1, n + 1)]


def test_curves_of_one_epoch_are_readable():
    from trainer.report import curves_figure
    fig = curves_figure(_history(1), title="run: digits_cnn on digits")
    assert fig._suptitle.get_text() == "run: digits_cnn on digits"
    loss, acc = fig.axes
    for ax in (loss, acc):
        assert ax.get_xlim() == (0.5, 1.5)
        assert list(ax.get_xticks()) == [1.0]
        assert all(line.get_marker() == "o" for line in ax.get_lines())
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "test"]
    assert loss.get_ylim() == (0.0, pytest.approx(1.2 * 1.1))
    low, high = acc.get_ylim()
    assert high - low >= 0.1 and 0.0 <= low and high <= 1.01


def test_curves_of_many_epochs_have_integer_ticks_and_no_markers():
    from trainer.report import MARKERS_UP_TO, curves_figure
    fig = curves_figure(_history(MARKERS_UP_TO + 7))
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks)
        assert all(line.get_marker() in (None, "None", "") for line in ax.get_lines())
