"""Shared helpers: run the real CLIs (python -m trainer, horovodrun) as a user would."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PER_RANK_CWD = Path(__file__).with_name("per_rank_cwd.sh")


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID", "TF_CONFIG"):
        env.pop(var, None)
    env.update(extra)
    return env


def run(cmd, cwd, timeout=600, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=cli_env(**env), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def trainer(*args, cwd, timeout=600, **env) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "trainer", *args], cwd=cwd, timeout=timeout, **env)


def horovodrun(np_, controller, *args, cwd, timeout=600) -> subprocess.CompletedProcess:
    """horovodrun -np N --gloo|--mpi, each rank in its own working directory
    (rank0/, rank1/, ...), so a file written by a non-chief rank shows up."""
    return run([BIN / "horovodrun", "-np", np_, f"--{controller}", "sh", PER_RANK_CWD,
                sys.executable, "-m", "trainer", *args], cwd=cwd, timeout=timeout)


def pins(requirements, python: str = f"{sys.version_info[0]}.{sys.version_info[1]}") -> dict:
    """{name: version} of the `==` pins among `requirements` (lines of
    requirements.txt or pyproject's lists) whose markers hold on `python`."""
    from packaging.requirements import Requirement
    out = {}
    for line in requirements:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"python_version": python}):
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: not a pin"
            out[req.name.lower() + (f"[{','.join(sorted(req.extras))}]" if req.extras else "")] = spec.version
    return out


def requirement_pins(python: str = f"{sys.version_info[0]}.{sys.version_info[1]}") -> dict:
    return pins((REPO / "requirements.txt").read_text().splitlines(), python)


def manifest(run_dir) -> dict:
    return json.loads((Path(run_dir) / "manifest.json").read_text())


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keras_weights(path) -> dict:
    """{key (trainer.varnames): value} of a .keras file, loaded as a user would."""
    import keras
    import numpy as np

    import trainer.models  # noqa: F401  (registers custom layers)
    from trainer.varnames import keyed
    model = keras.models.load_model(path, compile=False)
    return {k: np.asarray(w.numpy()) for k, w in keyed(model.weights).items()}


@pytest.fixture
def cwd(tmp_path):
    return tmp_path
