"""Files from other machines never choose code, never crash a command, and
never reach outside themselves (issue 11, items 1-3).

Every case runs the real CLI in a subprocess on a file made hostile in one
way, and asserts the exit code, the one error line and, where the file asks
for code to run, that the code did not run.
"""
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import ok, run, trainer

pytestmark = pytest.mark.filterwarnings("ignore:non-integer arguments to randrange:DeprecationWarning")

# A module that leaves a mark when imported and when its function is called:
# if a file could make a command import it, the mark shows.
EVIL = """
from pathlib import Path
Path("IMPORTED").touch()

def build(input_shape, num_classes, **options):
    Path("CALLED").touch()
    from trainer.models import build_model
    return build_model("mlp", input_shape, num_classes)
"""


def merge(*args, cwd):
    return run([sys.executable, "-m", "merge", *args], cwd=cwd)


def refused(proc, *needles) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1500:], proc.stderr[-1500:])
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """An init directory of digits_cnn (the trainer's own) and a small plain
    Keras 3 model with its weights file."""
    import keras
    d = tmp_path_factory.mktemp("hostile")
    ok(trainer("init", "--model", "mlp", "--data", "digits", "--out", d / "init", cwd=d))
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="input")
    x = keras.layers.Flatten(name="flatten")(inputs)
    outputs = keras.layers.Dense(10, name="logits")(x)
    model = keras.Model(inputs, outputs)
    model.save(d / "plain.keras")
    model.save_weights(str(d / "plain.weights.h5"))
    return d


def _copy(made, cwd, name):
    src = made / name
    dst = cwd / name
    (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    return dst


def _rewrite_manifest(run_dir: Path, **changes):
    path = run_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key] = {**manifest[key], **value}
        else:
            manifest[key] = value
    path.write_text(json.dumps(manifest))


def _rezip(src: Path, dst: Path, replace=None, add=(), drop=(), compress=None):
    """A copy of the archive `src` with members replaced, added or dropped."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            data = replace.get(info.filename, zin.read(info))
            zout.writestr(info.filename, data, compress_type=compress or info.compress_type)
        for name, data in add:
            zout.writestr(name, data)
    return dst


# -- item 1: nothing read from a file chooses code -----------------------------

@pytest.fixture
def evil_init(made, tmp_path):
    """An init directory whose manifest names a module beside it."""
    (tmp_path / "evil.py").write_text(EVIL)
    init = _copy(made, tmp_path, "init")
    _rewrite_manifest(init, model={"name": "evil:build"})
    return init


def test_init_naming_a_module_is_refused_unless_the_user_names_it(evil_init, tmp_path):
    proc = trainer("--init", "init", "--data", "digits", "--max-steps", "1", "--out", "run", cwd=tmp_path)
    refused(proc, "evil:build", "not in the trainer's registry", "--model evil:build")
    assert not (tmp_path / "IMPORTED").exists() and not (tmp_path / "CALLED").exists()
    assert not (tmp_path / "run").exists()
    # The user names it: then it is their choice, and it runs.
    ok(trainer("--init", "init", "--model", "evil:build", "--data", "digits", "--max-steps", "1",
               "--out", "run", cwd=tmp_path))
    assert (tmp_path / "CALLED").exists()


@pytest.mark.parametrize("command", ["inspect", "fedavg", "evaluate", "diff"])
def test_merge_never_imports_what_a_manifest_names(evil_init, tmp_path, command):
    (evil_init / "model.keras").unlink()  # no exported architecture: only the name is left
    args = {"inspect": ["inspect", "init"], "fedavg": ["fedavg", "init", "init2", "-o", "out.keras"],
            "evaluate": ["evaluate", "init", "--data", "digits"], "diff": ["diff", "init", "init2"]}[command]
    shutil.copytree(evil_init, tmp_path / "init2")
    proc = merge(*args, cwd=tmp_path)
    assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode == 2:
        refused(proc, "init")
    assert not (tmp_path / "IMPORTED").exists() and not (tmp_path / "CALLED").exists()


def test_resume_of_a_run_naming_a_module_is_refused(made, tmp_path):
    (tmp_path / "evil.py").write_text(EVIL)
    ok(trainer("--init", "init", "--data", "digits", "--max-steps", "2", "--out", "run", cwd=made))
    shutil.copytree(made / "run", tmp_path / "run")
    _rewrite_manifest(tmp_path / "run", model={"name": "evil:build"})
    proc = trainer("--resume", "--out", "run", "--epochs", "2", cwd=tmp_path)
    refused(proc, "--resume run", "evil:build")
    assert not (tmp_path / "IMPORTED").exists()


@pytest.mark.parametrize("field, value, needle", [
    ("model", {"input_shape": ["8", 8, 1]}, "input_shape"),
    ("model", {"input_shape": [10 ** 12, 1]}, "input_shape"),
    ("model", {"num_classes": 2.5}, "num_classes"),
    ("model", {"options": {"bad key": 1}}, "options"),
    ("latest", "../../../elsewhere", "not a checkpoint name"),
    ("lineage", ["a"], "lineage"),
    ("step", "12", "step"),
])
def test_manifest_fields_are_checked(made, tmp_path, field, value, needle):
    init = _copy(made, tmp_path, "init")
    _rewrite_manifest(init, **{field: value})
    (init / "model.keras").unlink()  # the manifest is then all there is
    refused(trainer("--init", "init", "--data", "digits", "--max-steps", "1", "--out", "run", cwd=tmp_path),
            needle)
    refused(merge("inspect", "init", cwd=tmp_path), needle)


# -- item 2: the archive is checked before Keras sees it ------------------------

def _config(made):
    with zipfile.ZipFile(made / "plain.keras") as zf:
        return json.loads(zf.read("config.json"))


def _bad_module(made):
    config = _config(made)
    for layer in config["config"]["layers"]:
        if layer["class_name"] == "Dense":
            layer["module"] = "evil"
    return json.dumps(config)


ARCHIVES = {
    "extra member": (lambda made: {"add": [("evil.py", EVIL)]}, "unexpected member 'evil.py'"),
    "npz weights": (lambda made: {"add": [("model.weights.npz", b"x")]}, ".npz are refused"),
    "bomb": (lambda made: {"replace": {"config.json": json.dumps(_config(made)) + " " * (80 << 20)},
                           "compress": zipfile.ZIP_DEFLATED}, "over the cap"),
    "module": (lambda made: {"replace": {"config.json": _bad_module(made)}}, "from module 'evil'"),
    "no weights": (lambda made: {"drop": ["model.weights.h5"]}, "without config.json and model.weights.h5"),
}


@pytest.mark.parametrize("case", sorted(ARCHIVES))
def test_hostile_archive_is_refused_by_every_reader(made, tmp_path, case):
    make, needle = ARCHIVES[case]
    (tmp_path / "evil.py").write_text(EVIL)
    _rezip(made / "plain.keras", tmp_path / "bad.keras", **make(made))
    _copy(made, tmp_path, "plain.keras")
    for args in (["inspect", "bad.keras"], ["fedavg", "bad.keras", "plain.keras", "-o", "out.keras"],
                 ["evaluate", "bad.keras", "--data", "digits"],
                 ["ensemble", "bad.keras", "plain.keras", "-o", "ens.keras"]):
        refused(merge(*args, cwd=tmp_path), "bad.keras", needle)
    refused(trainer("slice", "bad.keras", "--fraction", "0.5", "-o", "small.keras", cwd=tmp_path), needle)
    assert not any((tmp_path / n).exists() for n in ("out.keras", "ens.keras", "small.keras", "IMPORTED"))


def test_duplicate_member_is_refused(made, tmp_path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it is asked to write
        _rezip(made / "plain.keras", tmp_path / "bad.keras", add=[("config.json", "{}")])
    refused(merge("evaluate", "bad.keras", "--data", "digits", cwd=tmp_path), "appears twice")


# -- item 3: HDF5 stays inside itself; damage is one line ----------------------

def _weights_with(made, tmp_path, kind):
    import h5py
    path = _copy(made, tmp_path, "plain.weights.h5")
    secret = tmp_path / "secret.h5"
    with h5py.File(secret, "w") as f:
        f["data"] = np.arange(10.0)
    with h5py.File(path, "a") as f:
        if kind == "external link":
            f["layers/evil"] = h5py.ExternalLink(str(secret), "/data")
        elif kind == "external storage":
            (tmp_path / "raw.bin").write_bytes(b"\0" * 80)
            f.create_dataset("layers/evil", shape=(10,), dtype="f8", external=[(str(tmp_path / "raw.bin"), 0, 80)])
        elif kind == "memory bomb":
            f.create_dataset("layers/evil", shape=(1 << 28,), dtype="f4", chunks=(1 << 16,))
    return path


@pytest.mark.parametrize("kind, needle", [("external link", "external link"),
                                          ("external storage", "external files"),
                                          ("memory bomb", "memory bomb")])
def test_hdf5_reaching_outside_is_refused(made, tmp_path, kind, needle):
    _weights_with(made, tmp_path, kind)
    _copy(made, tmp_path, "plain.keras")
    refused(merge("inspect", "plain.weights.h5", cwd=tmp_path), needle)
    refused(merge("fedavg", "plain.weights.h5", "plain.keras", "-o", "out.keras", cwd=tmp_path), needle)
    # Inside a .keras, the walk comes before Keras opens the weights.
    _rezip(made / "plain.keras", tmp_path / "bad.keras",
           replace={"model.weights.h5": (tmp_path / "plain.weights.h5").read_bytes()})
    refused(merge("evaluate", "bad.keras", "--data", "digits", cwd=tmp_path), needle)


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_damaged_hdf5_is_one_line(made, tmp_path, cut):
    path = _copy(made, tmp_path, "plain.weights.h5")
    data = bytearray(path.read_bytes())
    n = int(len(data) * cut)
    data[n:n + 64] = bytes(64)  # a block of the file zeroed: B-tree nodes, heaps or data
    path.write_bytes(bytes(data))
    _copy(made, tmp_path, "plain.keras")
    proc = merge("fedavg", "plain.weights.h5", "plain.keras", "-o", "out.keras", cwd=tmp_path)
    assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode == 2:
        refused(proc, "plain.weights.h5")
