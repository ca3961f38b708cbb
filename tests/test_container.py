"""docker/Dockerfile built for real (buildah, on a debootstrapped stand-in for
python:3.12-slim-bookworm; see tests/container_image.py) and the toolkit run
inside it: its pins, horovodrun with two ranks, merge fedavg, the entrypoint."""
from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest

from conftest import REPO, keras_weights, manifest, requirement_pins
from container_image import BUILD_TIMEOUT, IMAGE, Container, build, locked, missing_tools, remove_dead_containers

# The first build (Debian base, TensorFlow, Horovod compiled) takes longer
# than pytest-timeout's default; it happens in the first test's setup.
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + 900)


@pytest.fixture(scope="module")
def ctr(request, tmp_path_factory):
    missing = missing_tools()
    # ./run setup installs both; in CI this test runs, it does not skip.
    assert missing is None, f"buildah/debootstrap are not installed ({missing}); run ./run setup"
    plugins = request.config.pluginmanager

    def log(msg: str) -> None:  # build times, on the terminal past pytest's capture
        reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"[container] {msg}")

    work = tmp_path_factory.mktemp("image")
    with locked():
        remove_dead_containers()
        build(work, log)
        c = Container(IMAGE, "tests")
    yield c
    c.remove()


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def _pins() -> dict:
    return requirement_pins("3.12")  # the image's Python


VERSIONS = """
import json, sys
from importlib import metadata
import horovod.tensorflow as hvd
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
names = json.loads(sys.argv[1])
print(json.dumps({"python": "%d.%d" % sys.version_info[:2],
                  "versions": {n: version(n) for n in names},
                  "mpi": hvd.mpi_built(), "gloo": hvd.gloo_built()}))
"""


def test_image_has_exactly_the_project_pins(ctr):
    pins = _pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    horovod = dict(d.split("==") for d in project["optional-dependencies"]["horovod"])["horovod"]
    names = [*pins, "horovod", "tensorflow", "dptoolkit"]
    got = json.loads(_ok(ctr.run("python", "-c", VERSIONS, json.dumps(names))).stdout.strip().splitlines()[-1])
    assert got["python"] == "3.12"
    versions = got["versions"]
    assert {n: versions[n] for n in pins} == pins
    assert versions["horovod"] == horovod and got["mpi"] and got["gloo"]
    # One TensorFlow distribution only (a second one breaks the first), and the project itself.
    assert versions["tensorflow"] is None
    assert versions["dptoolkit"] == project["version"]
    _ok(ctr.run("python", "-m", "pip", "check"))


def test_horovodrun_two_ranks_inside_the_image(ctr, tmp_path):
    _ok(ctr.run("horovodrun", "-np", "2", "python", "-m", "trainer", "--model", "mlp", "--epochs", "1",
                "--quiet", "--out", "run", runs=tmp_path))
    m = manifest(tmp_path / "run")
    assert m["world_size"] == 2 and m["backend"].startswith("horovod"), m["backend"]
    # The run records the image's stack: the project's pins.
    pins = _pins()
    recorded = {k: v for k, v in m["versions"].items() if k in pins}
    assert {"keras", "numpy", "h5py"} <= set(recorded) and recorded == {k: pins[k] for k in recorded}, m["versions"]
    prints = m["final"]["replica_fingerprints"]
    assert len(prints) == 2 and len(set(prints)) == 1, prints
    assert (tmp_path / "run" / "checkpoints" / m["latest"] / "state.index").exists()


def test_merge_fedavg_of_two_clients_trained_inside(ctr, tmp_path):
    script = (
        "set -e\n"
        "python -m trainer init --model mlp --out init\n"
        "for c in 0 1; do python -m trainer --init init --epochs 1 --clients 2 --client $c"
        " --seed $c --quiet --out client$c; done\n"
        "python -m merge fedavg client0 client1 --uniform -o avg.keras\n")
    _ok(ctr.run("sh", "-c", script, runs=tmp_path, timeout=900))
    # The average loads on the host (the same Keras) and is the clients' mean.
    avg = keras_weights(tmp_path / "avg.keras")
    a, b = keras_weights(tmp_path / "client0" / "model.keras"), keras_weights(tmp_path / "client1" / "model.keras")
    assert set(avg) == set(a) == set(b) and avg
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    for k in avg:
        np.testing.assert_allclose(avg[k], (a[k] + b[k]) / 2, rtol=1e-6, atol=1e-7)


def test_entrypoint_and_default_command(ctr, tmp_path):
    config = ctr.config()
    assert config["Entrypoint"] == ["dptoolkit-entrypoint"]
    assert config["Cmd"] == ["python", "-m", "trainer", "--help"]
    assert config["WorkingDir"] == "/runs"
    assert config["Labels"]["org.opencontainers.image.title"] == "dptoolkit"
    # What `docker run dptoolkit:cpu` runs (buildah run does not apply ENTRYPOINT itself).
    proc = _ok(ctr.run(*config["Entrypoint"], *config["Cmd"], runs=tmp_path))
    assert proc.stdout.startswith("usage: python -m trainer")
