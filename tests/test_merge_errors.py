"""Bad input to `python -m merge`: exit 2, one "error:" line naming the file
(and tensor), nothing written beside the output, every input left as it was.

Each case runs the real CLI in a subprocess. The Keras models are built once
per module and copied into each test's own directory.
"""
import hashlib
import os
import pickle
import re
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import ok, run

# Keras's set_random_seed passes a float to random.randint (Python 3.11 deprecation); not ours.
pytestmark = pytest.mark.filterwarnings("ignore:non-integer arguments to randrange:DeprecationWarning")

# Lines TensorFlow / absl may print on their own (C++ logging, absl, tf.get_logger);
# only these are ignored, anything else on stderr counts.
_TF_NOISE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] \S+:\d+\]"
                       r"|[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]"
                       r"|WARNING:(absl|tensorflow):)")


def merge(*args, cwd):
    return run([sys.executable, "-m", "merge", *args], cwd=cwd)


def fedavg(*args, cwd):
    return merge("fedavg", *args, cwd=cwd)


# -- what every refusal must look like ----------------------------------------

def _snapshot(root: Path) -> dict:
    """Every entry under root: file bytes (sha256), symlink target or "dir"."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _leftovers(directory: Path) -> list:
    """Temporary names a merge writes beside its output (.NAME.XXXX.tmp, .NAME.XXXX.old, ...)."""
    return sorted(p.name for p in directory.iterdir()
                  if p.name.startswith(".") and (".tmp" in p.name or ".old" in p.name))


def error_line(proc) -> str:
    """The one "error: " line; every other non-empty line must be a "warning: "."""
    lines = [l for l in proc.stderr.splitlines() if l.strip() and not _TF_NOISE.match(l)]
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].strip() != "error:", proc.stderr
    others = [l for l in lines if l is not errors[0]]
    assert all(l.startswith("warning: ") for l in others), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def assert_refused(proc, cwd: Path, before: dict, *needles, out=None, out_existed=False):
    """Exit 2, one error line holding every needle, the output not created (or
    untouched), no temporary file left, and every input byte-identical."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    line = error_line(proc)
    for needle in needles:
        assert needle in line, (needle, line)
    if out is not None:
        out = cwd / out
        assert out.exists() == out_existed, (out, line)
        assert _leftovers(out.parent) == [], _leftovers(out.parent)
    assert _leftovers(cwd) == [], _leftovers(cwd)
    assert _snapshot(cwd) == before, "an input or the output directory changed"
    return line


# -- models -------------------------------------------------------------------

def _model(keras, hidden=16, classes=10, extra=False):
    inputs = keras.Input((8, 8, 1), name="input")
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = keras.layers.Dense(hidden, activation="relu", name="d1")(x)
    if extra:
        x = keras.layers.Dense(hidden, activation="relu", name="d2")(x)
    outputs = keras.layers.Dense(classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="small")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> path: alpha.keras and beta.keras share an initialization (beta
    is alpha plus noise); alpha.weights.h5 is alpha's weights; deep (extra d2),
    wide (d1 of 32 units) and five (5 classes) are other architectures; nan and
    inf are beta with one non-finite value in tensor logits/0."""
    import keras
    d = tmp_path_factory.mktemp("models")
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    alpha = _model(keras)
    alpha.save(d / "alpha.keras")
    alpha.save_weights(str(d / "alpha.weights.h5"))
    base = alpha.get_weights()
    alpha.set_weights([w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in base])
    alpha.save(d / "beta.keras")
    for name, bad in (("nan", np.nan), ("inf", np.inf)):
        ws = alpha.get_weights()
        ws[2][3, 4] = bad  # logits kernel
        alpha.set_weights(ws)
        alpha.save(d / f"{name}.keras")
    keras.utils.set_random_seed(1)
    _model(keras, extra=True).save(d / "deep.keras")
    _model(keras, hidden=32).save(d / "wide.keras")
    _model(keras, classes=5).save(d / "five.keras")
    return {p.name: p for p in d.iterdir()}


def put(models, cwd: Path, name: str, as_: str | None = None) -> Path:
    dst = cwd / (as_ or name)
    shutil.copyfile(models[name], dst)
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


# -- damaged files ------------------------------------------------------------

def test_truncated_keras(models, tmp_path):
    put(models, tmp_path, "alpha.keras")
    _truncate(put(models, tmp_path, "beta.keras", "half.keras"))
    before = _snapshot(tmp_path)
    proc = fedavg("alpha.keras", "half.keras", "-o", "out.keras", cwd=tmp_path)
    assert_refused(proc, tmp_path, before, "half.keras", out="out.keras")


def test_truncated_weights_beside_keras(models, tmp_path):
    put(models, tmp_path, "beta.keras")
    _truncate(put(models, tmp_path, "alpha.weights.h5", "cut.weights.h5"))
    before = _snapshot(tmp_path)
    proc = fedavg("beta.keras", "cut.weights.h5", "-o", "out.keras", cwd=tmp_path)
    assert_refused(proc, tmp_path, before, "cut.weights.h5", out="out.keras")


@pytest.mark.parametrize("name", ["x.keras", "x.weights.h5"])
def test_random_bytes(models, tmp_path, name):
    put(models, tmp_path, "alpha.keras")
    data = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert data[:1] != b"\x80" and data[:2] != b"PK" and data[:1] != b"\x89"  # not sniffed as anything
    (tmp_path / name).write_bytes(data)
    before = _snapshot(tmp_path)
    proc = fedavg("alpha.keras", name, "-o", "out.keras", cwd=tmp_path)
    assert_refused(proc, tmp_path, before, name, out="out.keras")


@pytest.mark.parametrize("data", [
    b"",
    b"\x80",  # a lone pickle opcode
], ids=["empty", "one-byte-0x80"])
def test_tiny_file(models, tmp_path, data):
    put(models, tmp_path, "alpha.keras")
    (tmp_path / "tiny.keras").write_bytes(data)
    before = _snapshot(tmp_path)
    proc = fedavg("alpha.keras", "tiny.keras", "-o", "out.keras", cwd=tmp_path)
    assert_refused(proc, tmp_path, before, "tiny.keras", out="out.keras")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch MARKER",))


@pytest.mark.parametrize("name", ["model.pkl", "model.keras"])
def test_pickle_is_never_unpickled(models, tmp_path, name):
    put(models, tmp_path, "alpha.keras")
    (tmp_path / name).write_bytes(pickle.dumps(_Payload()))
    before = _snapshot(tmp_path)
    proc = fedavg("alpha.keras", name, "-o", "out.keras", cwd=tmp_path)
    line = assert_refused(proc, tmp_path, before, name, out="out.keras")
    assert not (tmp_path / "MARKER").exists(), "the pickle was loaded"
    assert "pickle" in line and "never unpickle" in line, line


# -- inputs that do not fit together ------------------------------------------

def test_missing_tensor(models, tmp_path):
    put(models, tmp_path, "alpha.keras")
    put(models, tmp_path, "deep.keras")
    before = _snapshot(tmp_path)
    proc = fedavg("alpha.keras", "deep.keras", "-o", "out.keras", cwd=tmp_path)
    assert_refused(proc, tmp_path, before, "deep.keras", "d2/", out="out.keras")


def test_shape_mismatch(models, tmp_path):
    put(models, tmp_path, "alpha.keras")
    put(models, tmp_path, "wide.keras")
    before = _snapshot(tmp_path)
    proc = fedavg("alpha.keras", "wide.keras", "-o", "out.keras", cwd=tmp_path)
    assert_refused(proc, tmp_path, before, "wide.keras", "d1/0", "(64, 16)", "(64, 32)", out="out.keras")


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nonfinite_weights(models, tmp_path, bad):
    put(models, tmp_path, "alpha.keras")
    put(models, tmp_path, f"{bad}.keras")
    before = _snapshot(tmp_path)
    args = ("alpha.keras", f"{bad}.keras", "-o", "out.keras", "--quiet")
    assert_refused(fedavg(*args, cwd=tmp_path), tmp_path, before, f"{bad}.keras", "logits/0", out="out.keras")
    ok(fedavg(*args, "--allow-nonfinite", cwd=tmp_path))
    assert zipfile.is_zipfile(tmp_path / "out.keras")
    assert _leftovers(tmp_path) == []


def test_ensemble_of_different_class_counts(models, tmp_path):
    put(models, tmp_path, "alpha.keras")
    put(models, tmp_path, "five.keras")
    before = _snapshot(tmp_path)
    proc = merge("ensemble", "alpha.keras", "five.keras", "-o", "e.keras", cwd=tmp_path)
    assert_refused(proc, tmp_path, before, "alpha.keras", "five.keras", out="e.keras")


@pytest.mark.parametrize("via_symlink", [False, True], ids=["same-path", "symlink"])
def test_same_input_twice(models, tmp_path, via_symlink):
    put(models, tmp_path, "alpha.keras")
    second = "alpha.keras"
    if via_symlink:
        second = "link.keras"
        (tmp_path / second).symlink_to("alpha.keras")
    before = _snapshot(tmp_path)
    proc = fedavg("alpha.keras", second, "-o", "out.keras", cwd=tmp_path)
    assert_refused(proc, tmp_path, before, second, out="out.keras")


# -- the output path ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["file", "dir"])
def test_existing_output(models, tmp_path, kind):
    put(models, tmp_path, "alpha.keras")
    put(models, tmp_path, "beta.keras")
    if kind == "file":
        out = "out.keras"
        (tmp_path / out).write_bytes(b"precious")
    else:
        out = "outdir"
        (tmp_path / out).mkdir()
        (tmp_path / out / "precious.txt").write_text("keep me")
    before = _snapshot(tmp_path)
    args = ("alpha.keras", "beta.keras", "-o", out, "--quiet")
    assert_refused(fedavg(*args, cwd=tmp_path), tmp_path, before, out, "--overwrite", out=out, out_existed=True)

    ok(fedavg(*args, "--overwrite", cwd=tmp_path))
    if kind == "file":
        assert zipfile.is_zipfile(tmp_path / out)
    else:
        assert (tmp_path / out / "manifest.json").is_file()
        assert not (tmp_path / out / "precious.txt").exists()
    assert _leftovers(tmp_path) == []


def test_overwrite_never_deletes_an_input(models, tmp_path):
    (tmp_path / "outdir").mkdir()
    put(models, tmp_path, "alpha.keras", "outdir/alpha.keras")
    put(models, tmp_path, "beta.keras")
    before = _snapshot(tmp_path)
    proc = fedavg("outdir/alpha.keras", "beta.keras", "-o", "outdir", "--overwrite", "--quiet", cwd=tmp_path)
    assert_refused(proc, tmp_path, before, "outdir", out="outdir", out_existed=True)


def test_output_is_an_input(models, tmp_path):
    put(models, tmp_path, "alpha.keras")
    put(models, tmp_path, "beta.keras")
    before = _snapshot(tmp_path)
    proc = fedavg("alpha.keras", "beta.keras", "-o", "beta.keras", "--overwrite", cwd=tmp_path)
    assert_refused(proc, tmp_path, before, "beta.keras")


# -- flags ----------------------------------------------------------------------

@pytest.mark.parametrize("weights,needle", [
    ("1,2,3", "3 values for 2 inputs"),
    ("1,-1", "non-negative"),
    ("1,abc", "1,abc"),
    ("1,nan", "--weights"),
], ids=["count", "negative", "non-numeric", "nan"])
def test_bad_weights(models, tmp_path, weights, needle):
    put(models, tmp_path, "alpha.keras")
    put(models, tmp_path, "beta.keras")
    before = _snapshot(tmp_path)
    proc = fedavg("alpha.keras", "beta.keras", "-o", "out.keras", "--weights", weights, cwd=tmp_path)
    assert_refused(proc, tmp_path, before, "--weights", needle, out="out.keras")


# -- directories ----------------------------------------------------------------

@pytest.mark.parametrize("manifest", [None, '{"format": "dptoolkit-run/1", "latest": '],
                         ids=["no-manifest", "corrupt-manifest"])
def test_directory_that_is_not_a_run(models, tmp_path, manifest):
    put(models, tmp_path, "alpha.keras")
    run_dir = tmp_path / "somerun"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("not a run")
    needle = "somerun"
    if manifest is not None:
        (run_dir / "manifest.json").write_text(manifest)
        needle = str(Path("somerun") / "manifest.json")
    before = _snapshot(tmp_path)
    proc = fedavg("alpha.keras", "somerun", "-o", "out.keras", cwd=tmp_path)
    assert_refused(proc, tmp_path, before, needle, out="out.keras")


@pytest.mark.parametrize("meta", [None, '{"samples_seen": '], ids=["missing-meta", "corrupt-meta"])
def test_run_whose_checkpoint_meta_is_damaged(models, tmp_path, meta):
    put(models, tmp_path, "alpha.keras")
    ckpt = tmp_path / "somerun" / "checkpoints" / "ckpt-1"
    ckpt.mkdir(parents=True)
    (tmp_path / "somerun" / "manifest.json").write_text('{"format": "dptoolkit-run/1", "latest": "ckpt-1"}')
    (ckpt / "state.index").write_bytes(b"")
    if meta is not None:
        (ckpt / "meta.json").write_text(meta)
    before = _snapshot(tmp_path)
    proc = fedavg("alpha.keras", "somerun", "-o", "out.keras", cwd=tmp_path)
    assert_refused(proc, tmp_path, before, "meta.json", out="out.keras")


# -- the command line itself ------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["fedavg", "-o", "out.keras"], "INPUT"),
    (["fedavg", "alpha.keras", "-o", "out.keras"], "at least two"),
    (["frobnicate", "alpha.keras"], "frobnicate"),
], ids=["no-inputs", "one-input", "unknown-command"])
def test_bad_command_line(models, tmp_path, args, needle):
    put(models, tmp_path, "alpha.keras")
    before = _snapshot(tmp_path)
    proc = merge(*args, cwd=tmp_path)
    assert_refused(proc, tmp_path, before, needle, out="out.keras")
