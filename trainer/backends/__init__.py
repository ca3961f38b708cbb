"""Pick the backend: the one seam the training loop talks to."""
from __future__ import annotations

import os

from ..errors import UsageError
from .base import Backend, SingleBackend

CHOICES = ("auto", "horovod", "mirrored", "multiworker", "single")

# Set by horovodrun (Gloo), mpirun (OpenMPI / PMIx) and srun respectively.
_LAUNCHER_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


def launched_by_horovod_launcher(env=os.environ) -> bool:
    if any(v in env for v in _LAUNCHER_VARS):
        return True
    return "SLURM_STEP_ID" in env and int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1


def resolve(choice: str) -> str:
    if choice not in CHOICES:
        raise UsageError(f"unknown --backend {choice!r}; choose one of {', '.join(CHOICES)}")
    if choice == "auto":
        return "horovod" if launched_by_horovod_launcher() else "single"
    return choice


def create(choice: str, *, fp16_allreduce: bool = False, devices: int = 0, pin_cores: bool = True,
           startup_timeout: float = 600.0) -> Backend:
    from .startup import check_timeout
    check_timeout(startup_timeout)
    choice = resolve(choice)
    if choice == "horovod":
        try:
            from .horovod_backend import HorovodBackend
        except ImportError as e:
            raise UsageError(f"Horovod is not importable ({e}); build it with ./run setup") from None
        return HorovodBackend(fp16_allreduce=fp16_allreduce, pin_cores=pin_cores, startup_timeout=startup_timeout)
    if choice == "mirrored":
        from .tfdistribute import mirrored
        return mirrored(devices)
    if choice == "multiworker":
        from .tfdistribute import multiworker
        return multiworker(startup_timeout)
    return SingleBackend()
