"""`launch slurm`: render an sbatch script, submit it, follow it to its end."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from trainer.errors import UsageError

from . import directives as d

TEMPLATE = Path(__file__).with_name("templates") / "job.sbatch"
# What `EXAMPLE` holds, for users who edit and submit a script by hand.
EXAMPLE = TEMPLATE.with_name("example.sbatch")
EXAMPLE_JOB = dict(command=["python", "-m", "trainer", "--epochs", "8"], nodes=2, tasks_per_node=4,
                   time="01:00:00")
MODES = ("srun", "horovodrun")
DEFAULT_SIGNAL = "USR1@120"
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
    log: str = "slurm-%j.out"
    workdir: str = "."
    account: str | None = None
    qos: str | None = None
    mem: str | None = None
    cpus_per_task: int | None = None
    constraint: str | None = None
    exclusive: bool = False
    sbatch_args: list[str] = field(default_factory=list)
    requeue: bool = False
    signal: str | None = None
    # The spelling the user gave the log's pattern in (--output is its old name).
    log_flag: str = field(default="--log", repr=False)

    def validate(self) -> None:
        if not self.command:
            raise UsageError("no command after `--`; e.g. python -m launch slurm --nodes 1 --tasks-per-node 2 "
                             "-- python -m trainer")
        for name in ("nodes", "tasks_per_node", "cpus_per_task"):
            d.check_count(f"--{name.replace('_', '-')}", getattr(self, name))
        if self.gpus_per_node < 0:
            raise UsageError(f"--gpus-per-node {self.gpus_per_node}: must be 0 or more")
        for flag in ("--job-name", "--partition", "--account", "--qos", "--constraint"):
            d.check_chars(flag, getattr(self, flag[2:].replace("-", "_")))
        try:
            d.check_chars("--log", self.log)
        except UsageError as e:  # named as the user spelled it
            raise UsageError(str(e).replace("--log", self.log_flag, 1)) from None
        d.check_mem(self.mem)
        if self.time is not None and not d.TIME.fullmatch(self.time):
            raise UsageError(f"--time {d.show(self.time)}: expected Slurm's [D-]HH:MM:SS, e.g. 01:30:00")
        if self.signal is not None and not self.requeue:
            raise UsageError(f"--signal {d.show(self.signal)}: only with --requeue (it is when the job checkpoints "
                             f"and requeues itself; without --requeue, Slurm's own SIGTERM at the time limit "
                             f"already stops the trainer at its last checkpoint)")
        if self.requeue:
            d.parse_signal(self.signal or DEFAULT_SIGNAL, self.time)
            if _is_trainer(self.command) and _out_of(self.command) is None:
                raise UsageError("--requeue: the trainer command has no --out, so each requeued run would start "
                                 "a new run directory; give --out RUN_DIR after --")
        d.check_sbatch_args(self.sbatch_args, self.requeue, self.mem)
        # Not rendered into the script (sbatch runs there), so any directory
        # name will do, but a control character in it is a mistake or a trick.
        if not self.workdir.isprintable():
            raise UsageError(f"--workdir {d.show(self.workdir)}: contains a control character; "
                             f"give the directory's plain path")
        if not Path(self.workdir).is_dir():
            raise UsageError(f"--workdir {d.show(self.workdir)}: no such directory")
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode}: choose one of {', '.join(MODES)}")

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node


def _is_trainer(command: list[str]) -> bool:
    return any(a == "-m" and b == "trainer" for a, b in zip(command, command[1:]))


def _out_of(command: list[str]) -> str | None:
    """The trainer's run directory in `command` (-o/--out), if it names one."""
    for i, word in enumerate(command):
        if word in ("-o", "--out") and i + 1 < len(command):
            return command[i + 1]
        if word.startswith("--out="):
            return word[len("--out="):]
        if word.startswith("-o") and len(word) > 2 and not word.startswith("--"):
            return word[2:]
    return None


def resumed_command(command: list[str]) -> list[str]:
    """The trainer command a requeued run executes: the same run, --resume'd.
    --init goes: a resumed run keeps its own start, and the trainer refuses both."""
    out, skip = [], False
    for i, word in enumerate(command):
        if skip:
            skip = False
            continue
        if word == "--init":
            skip = True
            continue
        if word.startswith("--init=") or word == "--resume":
            continue
        out.append(word)
    return out + ["--resume"]


def step_line(job: Job, command: list[str]) -> str:
    # Every word single-quoted for bash, so `;`, `$(...)` and newlines stay
    # inside their argument. A quoted line that looks like `#SBATCH ...` is
    # inert too: sbatch stops reading directives at the first command
    # (`set -euo pipefail` in the template).
    cmd = shlex.join(command)
    if job.mode == "srun":
        # Debian's OpenMPI (and so Horovod over MPI) starts under PMIx only,
        # not pmi2 or none. A trainer run with --backend multiworker starts the
        # same way and builds its TF_CONFIG from the task's Slurm variables.
        return f"srun --mpi=pmix {cmd}"
    return f'horovodrun --gloo -np {job.tasks} -H "$HOSTS" {cmd}'


def launch_line(job: Job) -> str:
    hosts = ""
    if job.mode == "horovodrun":
        # Gloo: one horovodrun on the first node drives every host of the allocation.
        hosts = ('HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | '
                 f'sed "s/$/:{job.tasks_per_node}/" | paste -sd, -)\n')
    if not job.requeue:
        return hosts + step_line(job, job.command)
    name, seconds = d.parse_signal(job.signal or DEFAULT_SIGNAL, job.time)
    again = step_line(job, resumed_command(job.command)) if _is_trainer(job.command) else step_line(job, job.command)
    # srun answers a SIGTERM of its own by SIGKILLing the tasks, so under srun
    # the tasks get it from Slurm; horovodrun passes one on to every rank.
    stop = 'scancel --signal=TERM "$SLURM_JOB_ID"' if job.mode == "srun" else 'kill -TERM "$step"'
    return Template(REQUEUE).substitute(
        signal=name, hosts=hosts, first=step_line(job, job.command), again=again, stop=stop,
        grace=max(1, seconds - 5))


# The step runs in the background: bash runs a trap only between commands,
# so `wait` is what lets the signal in while the step runs.
REQUEUE = """\
# --requeue: Slurm sends SIG${signal} to this script (--signal=B:...) before the
# time limit. The trap stops the step with SIGTERM (the trainer keeps its last
# checkpoint) and requeues the job; the requeued run (SLURM_RESTART_COUNT > 0)
# continues the run with --resume.
echo "launch: job $$SLURM_JOB_ID, run $$(( $${SLURM_RESTART_COUNT:-0} + 1 )), on $$(hostname)"
requeue() {
    echo "launch: SIG${signal} before the time limit: stopping the step, then requeueing job $$SLURM_JOB_ID"
    ${stop} 2>/dev/null || true
    for _ in $$(seq ${grace}); do kill -0 "$$step" 2>/dev/null || break; sleep 1; done
    scontrol requeue "$$SLURM_JOB_ID" || { echo "launch: scontrol requeue $$SLURM_JOB_ID failed"; exit 1; }
    exit 0
}
trap requeue ${signal}
${hosts}if [ "$${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
    ${again} &
else
    ${first} &
fi
step=$$!
wait "$$step"
"""


def render(job: Job) -> str:
    job.validate()
    extra = []
    if job.gpus_per_node:
        extra.append(f"--gpus-per-node={job.gpus_per_node}")
    for name in ("partition", "time", "account", "qos", "mem", "cpus_per_task", "constraint"):
        if getattr(job, name) is not None:
            extra.append(f"--{name.replace('_', '-')}={getattr(job, name)}")
    if job.exclusive:
        extra.append("--exclusive")
    if job.requeue:
        name, seconds = d.parse_signal(job.signal or DEFAULT_SIGNAL, job.time)
        # B: the batch script alone gets it; its trap stops the step.
        # append: each run adds to the log instead of truncating the last one.
        extra += ["--requeue", f"--signal=B:{name}@{seconds}", "--open-mode=append"]
    extra += job.sbatch_args
    return Template(TEMPLATE.read_text()).substitute(
        job_name=job.job_name, nodes=job.nodes, tasks_per_node=job.tasks_per_node, output=job.log,
        extra_directives="\n".join(f"#SBATCH {e}" for e in extra), launch=launch_line(job))


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
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise UsageError(f"sbatch answered {d.show(proc.stdout.strip()[:200])} instead of a job id; "
                         f"see --dry-run for the script it was given")
    return int(job_id)


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
        # A job requeued without --requeue (by an admin, after a node failure)
        # starts its log again unless the cluster appends (JobFileAppend).
        if f.seek(0, 2) < offset:
            offset = 0
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
