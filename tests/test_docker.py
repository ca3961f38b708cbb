"""The Docker images are not built here (no Docker engine on this machine):
check that they pin the same stack as pyproject.toml and requirements.txt,
and that what they start exists."""
from __future__ import annotations

import os
import re
import tomllib

import yaml

from conftest import REPO

DOCKER = REPO / "docker"


def _pins() -> dict:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _pyproject() -> dict:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    return {d.split("==")[0].lower(): d.split("==")[1] for d in deps}


def test_requirements_and_pyproject_agree():
    pins, declared = _pins(), _pyproject()
    declared.pop("horovod")  # built from source after TensorFlow, by ./run setup and the Dockerfiles
    for name, version in declared.items():
        assert pins.get(name) == version, f"{name}: pyproject {version}, requirements.txt {pins.get(name)}"


def test_images_pin_the_same_stack():
    declared = _pyproject()
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (DOCKER / name).read_text()
        assert "pip install -r requirements.txt" in text, name
        assert f"ARG HOROVOD_VERSION={declared['horovod']}" in text, name
        assert "HOROVOD_WITH_TENSORFLOW=1" in text and "HOROVOD_WITH_GLOO=1" in text, name
    cpu, gpu = (DOCKER / "Dockerfile").read_text(), (DOCKER / "Dockerfile.gpu").read_text()
    assert re.search(r"^FROM python:3\.11-", cpu, re.M)
    assert "python3.11" in gpu and "HOROVOD_GPU_OPERATIONS=NCCL" in gpu and "libnccl-dev" in gpu
    assert f"ARG TENSORFLOW_VERSION={declared['tensorflow']}" in gpu
    assert f"HOROVOD_VERSION={declared['horovod']}" in (REPO / "run").read_text()
    assert '"tensorflow[and-cuda]==${TENSORFLOW_VERSION}"' in gpu


def test_entrypoints_and_copied_paths_exist():
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (DOCKER / name).read_text()
        for src in re.findall(r"^COPY (\S+)", text, re.M):
            assert (REPO / src).exists(), f"{name}: COPY {src} does not exist"
        assert 'ENTRYPOINT ["dptoolkit-entrypoint"]' in text
    assert os.access(DOCKER / "entrypoint.sh", os.X_OK)


def test_compose_runs_two_hosts_with_a_valid_launch_command():
    from launch.hosts import parse_hosts
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"worker0", "worker1"}
    assert all(s["image"] == "dptoolkit:cpu" for s in services.values())
    command = services["worker0"]["command"][-1]
    hosts = re.search(r"python -m launch horovod -H (\S+) --", command).group(1)
    assert [h for h, _ in parse_hosts(hosts)] == ["worker0", "worker1"]
