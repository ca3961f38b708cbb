"""Quiet by default, --verbose or the user's TF_CPP_MIN_LOG_LEVEL to hear
TensorFlow, and a failure reported as one line naming its traceback's file
(issue 14, point 1)."""
from __future__ import annotations

import re
import subprocess
import sys

from conftest import cli_env, manifest, ok

NATIVE = re.compile(r"^[IWEF]\d{4} |oneDNN|absl::InitializeLog", re.M)


def _run(args, cwd, level=None, **env):
    """A CLI run with TF_CPP_MIN_LOG_LEVEL as a user's shell would have it
    (conftest's helpers set it to 3)."""
    e = cli_env(**env)
    e.pop("TF_CPP_MIN_LOG_LEVEL")
    if level is not None:
        e["TF_CPP_MIN_LOG_LEVEL"] = level
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def test_verbose_brings_them_back_and_merge_is_quiet_without_it(tmp_path):
    # The trainer's quiet default is the failure test's below, which trains too.
    train = ok(_run(["-m", "trainer", "--epochs", 1, "--data", "synthetic", "--max-steps", 2, "--out", "run",
                     "--verbose"], tmp_path))
    # An import-time native line: the CPU-feature notice, on every x86 CPU with
    # more than the wheel's AVX (oneDNN's line only where the CPU turns it on).
    assert re.search(r"^I\d{4} [\d:.]+ +\d+ cpu_feature_guard\.cc:\d+\] ", train.stderr, re.M), train.stderr
    inspect = ok(_run(["-m", "merge", "inspect", "run"], tmp_path))
    assert not NATIVE.search(inspect.stderr), inspect.stderr


def test_the_users_level_applies_to_the_import_too():
    from trainer.quiet import filter_native
    data = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            b"I0000 00:00:1796190226.212296   16203 port.cc:153] oneDNN custom operations are on.\n"
            b"I0000 00:00:1796190226.346516   16203 cpu_feature_guard.cc:227] This TensorFlow binary is optimized\n"
            b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the "
            b"appropriate compiler flags.\n"
            b"E0000 00:00:1796190226.4   16203 cuda_dnn.cc:8310] Unable to register cuDNN factory\n"
            b"a line of the user's own\n")
    assert filter_native(data, 3) == b"a line of the user's own\n"
    assert filter_native(data, 2) == (data.splitlines(keepends=True)[0] + data.splitlines(keepends=True)[4]
                                      + b"a line of the user's own\n")
    assert filter_native(data, 0) == data


def test_every_command_accepts_verbose():
    from launch.cli import parser as launch_parser
    from merge.cli import parser as merge_parser
    from trainer.cli import init_parser, slice_parser, train_parser
    assert train_parser().parse_args(["--verbose"]).verbose
    assert init_parser().parse_args(["--out", "x", "--verbose"]).verbose
    assert merge_parser().parse_args(["inspect", "x", "--verbose"]).verbose
    assert merge_parser().parse_args(["--verbose", "inspect", "x"]).verbose  # not reset by the sub-command
    assert launch_parser().parse_args(["horovod", "-H", "a:1", "--verbose"]).verbose


UNSAVEABLE_MODEL = """import keras


class Unsaveable(keras.layers.Dense):
    def get_config(self):
        raise RuntimeError("the user layer cannot be saved")


def build(input_shape, num_classes, **options):
    return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(), Unsaveable(num_classes)])
"""


def test_quiet_training_and_an_unexpected_failure_is_one_line_naming_its_traceback(tmp_path):
    """TensorFlow imported, two steps trained and checkpointed, then the
    user's layer fails to save: stderr holds the one error line and nothing
    of TensorFlow's."""
    (tmp_path / "broken_model.py").write_text(UNSAVEABLE_MODEL)
    proc = _run(["-m", "trainer", "--model", "broken_model:build", "--data", "synthetic", "--epochs", 1,
                 "--max-steps", 2, "--quiet", "--out", "run"], tmp_path,
                PYTHONPATH=f"{cli_env()['PYTHONPATH']}:{tmp_path}")
    log = tmp_path / "run" / "logs" / "rank-0.log"
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: rank 0: RuntimeError: the user layer cannot be saved (traceback in {log.relative_to(tmp_path)})"]
    assert manifest(tmp_path / "run")["latest"] == "ckpt-00000002", "failed before training"
    assert "Traceback (most recent call last)" in log.read_text() and "broken_model.py" in log.read_text()
