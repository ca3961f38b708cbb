"""The environment ./run builds: one TensorFlow, Keras 3, Horovod built from
its sdist with the project's patch, and no trace of the clone that built it."""
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from conftest import BIN, REPO, ok, run


def _installed() -> set:
    return {d.metadata["Name"].lower().replace("_", "-") for d in metadata.distributions()}


def test_one_tensorflow_keras3_and_no_keras2():
    import keras
    import tensorflow as tf
    names = _installed()
    assert tf.__version__ == "2.21.0" and keras.__version__.startswith("3.15.")
    assert keras.backend.backend() == "tensorflow"
    # Two TensorFlow distributions in one environment break each other; Keras 2
    # (tf-keras) and TFMOT, which needs it, live outside this environment.
    assert len(names & {"tensorflow", "tensorflow-cpu", "tensorflow-intel", "tf-nightly"}) == 1, names
    assert not names & {"tf-keras", "tensorflow-model-optimization"}


def test_horovod_is_the_patched_build_with_both_controllers(cwd):
    import horovod
    assert horovod.__version__ == "0.28.1"
    # The patch's second hunk is in the installed code: horovodrun's build checks mute native output.
    util = Path(horovod.__file__).parent / "common" / "util.py"
    assert "os.dup2(devnull, 2)" in util.read_text()
    proc = ok(run([BIN / "horovodrun", "--check-build"], cwd=cwd))
    lines = {line.strip() for line in proc.stdout.splitlines()}
    assert {"[X] TensorFlow", "[X] MPI", "[X] Gloo"} <= lines, proc.stdout


def test_the_shared_venv_points_at_no_clone():
    """CI's clone is deleted after the run; a venv that imported the project
    from the clone that set it up would break every later one."""
    assert "dptoolkit" not in _installed()
    site = Path(metadata.distribution("keras").locate_file(""))
    leftovers = [p for p in site.iterdir() if p.suffix in (".pth", ".egg-link") and "dptoolkit" in p.read_text()]
    assert not leftovers
    import trainer
    assert Path(trainer.__file__).resolve().is_relative_to(REPO.resolve())


def test_a_patch_that_does_not_apply_stops_the_build_loudly(tmp_path):
    """tools/horovod-wheel.sh against the real 0.28.1 sdist, with a patch whose
    context is not in it: exit 1, the patch named, nothing cached."""
    fake = tmp_path / "repo"
    (fake / "tools").mkdir(parents=True)
    (fake / "patches").mkdir()
    shutil.copy(REPO / "tools" / "horovod-wheel.sh", fake / "tools")
    (fake / "patches" / "horovod-0.28.1.patch").write_text(
        "--- a/horovod/tensorflow/CMakeLists.txt\n+++ b/horovod/tensorflow/CMakeLists.txt\n"
        "@@ -1,3 +1,3 @@\n a line that is not there\n-nor this one\n+replaced\n and not this\n")
    cache = tmp_path / "wheels"
    proc = subprocess.run(["bash", fake / "tools" / "horovod-wheel.sh", sys.executable, cache],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "horovod-0.28.1.patch does not apply" in proc.stderr
    assert "CMakeLists.txt" in proc.stderr  # patch's own report of the failed file
    assert not [p for p in cache.iterdir() if p.name.startswith("horovod-")]
    assert proc.stdout == ""  # no wheel path for ./run to install
