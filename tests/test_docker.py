"""The Docker images pin the same stack as pyproject.toml, requirements.txt
and ./run, and what they copy and start exists."""
from __future__ import annotations

import os
import re
import tomllib

import pytest
import yaml

from conftest import REPO, pins, requirement_pins

DOCKER = REPO / "docker"


def _pins(python: str = "3.12") -> dict:
    return requirement_pins(python)


def _pyproject(python: str = "3.12") -> dict:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return pins(project["dependencies"] + sum(project["optional-dependencies"].values(), []), python)


@pytest.mark.parametrize("python", ["3.11", "3.12", "3.13"])
def test_requirements_and_pyproject_agree(python):
    required, declared = _pins(python), _pyproject(python)
    declared.pop("horovod")  # built from source after TensorFlow, by tools/horovod-wheel.sh
    # The gpu extra is the CUDA build of the very TensorFlow requirements.txt pins for CPUs.
    assert declared.pop("tensorflow[and-cuda]") == required["tensorflow-cpu"]
    for name, version in declared.items():
        assert required.get(name) == version, f"{name}: pyproject {version}, requirements.txt {required.get(name)}"
    # Every package of the environment that touches TensorFlow is pinned, on every supported Python.
    for name in ("tensorflow-cpu", "keras", "tensorboard", "ml-dtypes", "protobuf", "numpy", "h5py", "scipy"):
        assert name in required, (python, name)


def test_images_pin_the_same_stack():
    declared = _pyproject()
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (DOCKER / name).read_text()
        assert f"ARG HOROVOD_VERSION={declared['horovod']}" in text, name
        # The one Horovod recipe (sdist + the project's patch) that ./run uses too.
        assert "COPY tools/horovod-wheel.sh tools/" in text and "COPY patches patches" in text, name
        assert re.search(r"tools/horovod-wheel\.sh python /tmp/wheels", text), name
    cpu, gpu = (DOCKER / "Dockerfile").read_text(), (DOCKER / "Dockerfile.gpu").read_text()
    assert "pip install --no-cache-dir -r requirements.txt" in cpu
    assert re.search(r"^ARG BASE=python:3\.12-slim-bookworm$", cpu, re.M)
    assert "python3.12" in gpu and "HOROVOD_GPU_OPERATIONS=NCCL" in gpu and "libnccl-dev" in gpu
    # GPU: requirements.txt without tensorflow-cpu, plus tensorflow[and-cuda] at the same version.
    assert "grep -v '^tensorflow-cpu==' requirements.txt" in gpu
    assert f"ARG TENSORFLOW_VERSION={_pins()['tensorflow-cpu']}" in gpu
    assert '"tensorflow[and-cuda]==${TENSORFLOW_VERSION}"' in gpu
    run = (REPO / "run").read_text()
    assert f"HOROVOD_VERSION={declared['horovod']}" in run and f"TF_VERSION={_pins()['tensorflow-cpu']}" in run
    # pip, setuptools and wheel (Horovod builds without build isolation) as ./run pins them.
    tools = re.compile(r'"((?:pip|setuptools|wheel)==[^"]+)"')
    assert len(set(tools.findall(run))) == 3
    for text in (cpu, gpu):
        assert set(tools.findall(text)) == set(tools.findall(run))
    assert f'VERSION={declared["horovod"]}' in (REPO / "tools" / "horovod-wheel.sh").read_text()


def test_entrypoints_and_copied_paths_exist():
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (DOCKER / name).read_text()
        for src in re.findall(r"^COPY (\S+)", text, re.M):
            assert (REPO / src).exists(), f"{name}: COPY {src} does not exist"
        assert 'ENTRYPOINT ["dptoolkit-entrypoint"]' in text
        # tests/container_image.py finds this project's images by this label.
        assert 'LABEL org.opencontainers.image.title="dptoolkit"' in text
        assert "COPY . .\n" in text and "install -m 755 docker/entrypoint.sh /usr/local/bin/dptoolkit-entrypoint" in text
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK)
    assert os.access(DOCKER / "base-debian.sh", os.X_OK)


def test_dockerignore_lets_in_what_the_images_use_and_nothing_else():
    """`COPY . .` takes the checkout through .dockerignore: an allowlist
    (everything out, then the package, its build files and the stack's inputs)."""
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    needed = {"pyproject.toml", "requirements.txt", "trainer", "merge", "launch", "patches",
              "tools/horovod-wheel.sh", "docker/entrypoint.sh"}
    assert allowed == needed
    assert all((REPO / p).exists() for p in allowed)
    # Caches inside the allowed folders stay out too (a later rule wins).
    last_allowed = max(i for i, r in enumerate(rules) if r.startswith("!"))
    assert {"**/__pycache__", "**/*.pyc"} <= set(rules[last_allowed + 1:])


def test_compose_runs_two_hosts_with_a_valid_launch_command():
    from launch.hosts import parse_hosts
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"worker0", "worker1"}
    assert all(s["image"] == "dptoolkit:cpu" for s in services.values())
    command = services["worker0"]["command"][-1]
    hosts = re.search(r"python -m launch horovod -H (\S+) --", command).group(1)
    assert [h for h, _ in parse_hosts(hosts)] == ["worker0", "worker1"]
