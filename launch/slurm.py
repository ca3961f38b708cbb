"""`launch slurm`: render an sbatch script, submit it, follow it to its end."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template

from trainer.errors import UsageError

TEMPLATE = Path(__file__).with_name("templates") / "job.sbatch"
# What `EXAMPLE` holds, for users who edit and submit a script by hand.
EXAMPLE = TEMPLATE.with_name("example.sbatch")
EXAMPLE_JOB = dict(command=["python", "-m", "trainer", "--epochs", "8"], nodes=2, tasks_per_node=4,
                   time="01:00:00")
MODES = ("srun", "horovodrun")
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")
_DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE"}


@dataclass
class Job:
    command: list[str]
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    partition: str | None = None
    time: str | None = None
    mode: str = "srun"
    job_name: str = "dptoolkit"
    output: str = "slurm-%j.out"
    workdir: str = "."

    def validate(self) -> None:
        if not self.command:
            raise UsageError("no command after `--`; e.g. python -m launch slurm --nodes 1 --tasks-per-node 2 "
                             "-- python -m trainer")
        for name in ("nodes", "tasks_per_node"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.gpus_per_node < 0:
            raise UsageError(f"--gpus-per-node {self.gpus_per_node}: must be 0 or more")
        if self.time is not None and not _TIME.match(self.time):
            raise UsageError(f"--time {self.time}: expected Slurm's [D-]HH:MM:SS, e.g. 01:30:00")
        if not Path(self.workdir).is_dir():
            raise UsageError(f"--workdir {self.workdir}: no such directory")
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode}: choose one of {', '.join(MODES)}")

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node


def launch_line(job: Job) -> str:
    cmd = shlex.join(job.command)
    if job.mode == "srun":
        # Debian's OpenMPI (and so Horovod over MPI) starts under PMIx only,
        # not pmi2 or none. A trainer run with --backend multiworker starts the
        # same way and builds its TF_CONFIG from the task's Slurm variables.
        return f"srun --mpi=pmix {cmd}"
    # Gloo: one horovodrun on the first node drives every host of the allocation.
    return ('HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | '
            f'sed "s/$/:{job.tasks_per_node}/" | paste -sd, -)\n'
            f'horovodrun --gloo -np {job.tasks} -H "$HOSTS" {cmd}')


def render(job: Job) -> str:
    job.validate()
    extra = []
    if job.gpus_per_node:
        extra.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    if job.partition:
        extra.append(f"#SBATCH --partition={job.partition}")
    if job.time:
        extra.append(f"#SBATCH --time={job.time}")
    return Template(TEMPLATE.read_text()).substitute(
        job_name=job.job_name, nodes=job.nodes, tasks_per_node=job.tasks_per_node, output=job.output,
        extra_directives="\n".join(extra), launch=launch_line(job))


def sbatch_path() -> str:
    path = shutil.which("sbatch")
    if not path:
        raise UsageError("sbatch not found on PATH: run this on a Slurm login node (Debian: apt install "
                         "slurm-client), or use --dry-run to print the script")
    return path


def submit(script: str, workdir: str) -> int:
    proc = subprocess.run([sbatch_path(), "--parsable"], input=script, text=True, capture_output=True,
                          cwd=workdir)
    if proc.returncode != 0:
        raise UsageError(f"sbatch refused the job: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}")
    return int(proc.stdout.strip().split(";")[0])


def job_state(job_id: int) -> dict:
    """scontrol's view of a job as a dict (JobState, ExitCode, StdOut, ...).
    Polled instead of `sbatch --wait`, which polls slowly."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    if out.returncode != 0:
        return {}
    return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)


def follow(job_id: int, log: Path | None, out=sys.stdout, poll: float = 1.0) -> int:
    """Stream the job's log until it ends; the job's exit status."""
    offset = 0
    state: dict = {}
    while True:
        state = job_state(job_id)
        if log is None and state.get("StdOut"):
            log = Path(state["StdOut"])
        if log is not None and log.exists():
            with open(log, "rb") as f:
                f.seek(offset)
                chunk = f.read()
                offset += len(chunk)
            if chunk:
                out.write(chunk.decode(errors="replace"))
                out.flush()
        if not state or state.get("JobState") in _DONE:
            break
        time.sleep(poll)
    return exit_status(state)


def exit_status(state: dict) -> int:
    if not state:
        return 1  # the job left scontrol's memory before we saw its end
    if state.get("JobState") == "COMPLETED":
        return 0
    code, _, signal = state.get("ExitCode", "1:0").partition(":")
    if int(signal or 0):
        return 128 + int(signal)
    return int(code) or 1
