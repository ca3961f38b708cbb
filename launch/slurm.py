"""`launch slurm`: render an sbatch script, submit it, follow it to its end."""
from __future__ import annotations

import re
import shlex
import shutil
import string
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
# Matched with fullmatch: `$` also matches before a trailing newline. ASCII:
# `\d` alone accepts any Unicode digit, which Slurm does not.
_TIME = re.compile(r"(\d+-)?\d{1,2}(:\d{2}){0,2}", re.ASCII)
# Values that go into #SBATCH lines. sbatch reads those lines itself, not the
# shell, with rules of its own (src/sbatch/opt.c, _get_argument): whitespace
# ends the value, an unquoted `#` makes the rest of the line a comment, quotes
# and backslashes group and escape, and a newline starts a new line of the
# script. Quoting for that parser would be a second shell dialect to get
# right; instead these flags take a set of characters that mean the same to
# sbatch as to the user, and anything else is refused.
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "._+=@:,-")
_DIRECTIVE_CHARS = {
    "job_name": (_NAME_CHARS, "letters, digits and . _ + = @ : , -"),
    "partition": (_NAME_CHARS, "letters, digits and . _ + = @ : , - (a name, or names separated by commas)"),
    "output": (_NAME_CHARS | {"/", "%"}, "letters, digits, / and . _ + = @ : , - % (a path without spaces; "
                                         "%j is the job id, %x the job name)"),
}
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
        for name, (allowed, described) in _DIRECTIVE_CHARS.items():
            check_directive(name, getattr(self, name), allowed, described)
        if self.time is not None and not _TIME.fullmatch(self.time):
            raise UsageError(f"--time {_show(self.time)}: expected Slurm's [D-]HH:MM:SS, e.g. 01:30:00")
        # Not rendered into the script (sbatch runs there), so any directory
        # name will do, but a control character in it is a mistake or a trick.
        if not self.workdir.isprintable():
            raise UsageError(f"--workdir {_show(self.workdir)}: contains a control character; "
                             f"give the directory's plain path")
        if not Path(self.workdir).is_dir():
            raise UsageError(f"--workdir {_show(self.workdir)}: no such directory")
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode}: choose one of {', '.join(MODES)}")

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node


def _show(value: str) -> str:
    """A value as one line of an error message (escapes spelled out)."""
    return shlex.quote(value) if value.isprintable() else repr(value)


def check_directive(name: str, value: str | None, allowed: frozenset, described: str) -> None:
    if value is None:
        return
    flag = f"--{name.replace('_', '-')}"
    if not value:
        raise UsageError(f"{flag}: must not be empty")
    bad = next((c for c in value if c not in allowed), None)
    if bad is None:
        return
    what = f"a control character {bad!r}" if not bad.isprintable() else "a space" if bad.isspace() else repr(bad)
    raise UsageError(f"{flag} {_show(value)}: contains {what}, which an #SBATCH line cannot carry "
                     f"safely; use only {described}")


def launch_line(job: Job) -> str:
    # Every word single-quoted for bash, so `;`, `$(...)` and newlines stay
    # inside their argument. A quoted line that looks like `#SBATCH ...` is
    # inert too: sbatch stops reading directives at the first command
    # (`set -euo pipefail` in the template).
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


# How long `--wait` keeps asking a controller that does not answer (slurmctld
# restarting, a network blip) before it gives up on following the job. The
# job itself runs on regardless; this only bounds how long launch waits blind.
SCONTROL_PATIENCE = 120.0
# Backoff between attempts doubles up to this, so a controller that comes
# back is noticed within this many seconds.
SCONTROL_MAX_BACKOFF = 16.0
# scontrol itself retries a refused connection for a while (18 s at the
# default MessageTimeout of 10); this only catches a controller that accepts
# and never replies.
SCONTROL_CALL_TIMEOUT = 60.0
_PURGED = "Invalid job id specified"


class ControllerUnreachable(RuntimeError):
    """slurmctld did not answer for SCONTROL_PATIENCE seconds: the job's end is unknown."""


def _scontrol_show(job_id: int) -> tuple[int, str, str]:
    """(returncode, stdout, last line of stderr) of one `scontrol show job`."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                              timeout=SCONTROL_CALL_TIMEOUT)
    except subprocess.TimeoutExpired:
        return 1, "", f"scontrol did not answer in {SCONTROL_CALL_TIMEOUT:.0f} s"
    lines = proc.stderr.strip().splitlines()
    return proc.returncode, proc.stdout, lines[-1] if lines else f"scontrol exited with {proc.returncode}"


def job_state(job_id: int, patience: float = SCONTROL_PATIENCE, err=None) -> dict | None:
    """scontrol's view of a job as a dict (JobState, ExitCode, StdOut, ...),
    or None once the controller has purged the job (MinJobAge after its end).
    Polled instead of `sbatch --wait`, which polls slowly.

    Any other failure is taken as the controller being unreachable for now:
    retried with exponential backoff for up to `patience` seconds, with one
    line on `err` when it starts, then ControllerUnreachable."""
    start, delay, warned = time.monotonic(), 1.0, False
    while True:
        code, out, reason = _scontrol_show(job_id)
        if code == 0:
            return dict(field.split("=", 1) for field in out.split() if "=" in field)
        if _PURGED in reason:
            return None
        if not warned:
            print(f"launch: the Slurm controller does not answer ({reason}); still waiting for job {job_id}, "
                  f"retrying for up to {patience:.0f} s", file=err or sys.stderr, flush=True)
            warned = True
        if time.monotonic() - start + delay > patience:
            raise ControllerUnreachable(f"the Slurm controller did not answer for {patience:.0f} s ({reason}); "
                                        f"job {job_id} may still be running: check `squeue -j {job_id}` later")
        time.sleep(delay)
        delay = min(2 * delay, SCONTROL_MAX_BACKOFF)


def accounting_state(job_id: int) -> dict | None:
    """The job's end from sacct (JobState, ExitCode), for a job scontrol has
    already forgotten; None without accounting (no sacct, or no slurmdbd)."""
    if not shutil.which("sacct"):
        return None
    try:
        proc = subprocess.run(["sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", "State,ExitCode"],
                              capture_output=True, text=True, timeout=SCONTROL_CALL_TIMEOUT)
    except subprocess.TimeoutExpired:  # slurmdbd not answering: no better than no accounting
        return None
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.count("|") == 1]
    if proc.returncode != 0 or not rows:
        return None
    state, exit_code = rows[-1]
    # "CANCELLED by 1000": the state is the first word.
    return {"JobState": state.split()[0] if state.strip() else "", "ExitCode": exit_code}


def _stream(log: Path | None, offset: int, out) -> int:
    """Copy what the log gained since `offset` to `out`; the new offset."""
    if log is None or not log.exists():
        return offset
    with open(log, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    if chunk:
        out.write(chunk.decode(errors="replace"))
        out.flush()
    return offset + len(chunk)


def follow(job_id: int, log: Path | None, out=None, poll: float = 1.0,
           patience: float = SCONTROL_PATIENCE, err=None) -> int | None:
    """Stream the job's log until it ends; the job's exit status, or None
    when its end cannot be known (purged from scontrol, no accounting).
    Raises ControllerUnreachable when slurmctld stays silent too long."""
    offset = 0
    while True:
        state = job_state(job_id, patience, err)
        if state is None:  # purged before we saw its end: ask accounting
            state = accounting_state(job_id)
        if log is None and state and state.get("StdOut"):
            log = Path(state["StdOut"])
        offset = _stream(log, offset, out or sys.stdout)
        if state is None or state.get("JobState") in _DONE:
            break
        time.sleep(poll)
    return exit_status(state)


def exit_status(state: dict | None) -> int | None:
    if state is None:
        return None
    if state.get("JobState") == "COMPLETED":
        return 0
    code, _, signal = state.get("ExitCode", "1:0").partition(":")
    if int(signal or 0):
        return 128 + int(signal)
    return int(code) or 1
