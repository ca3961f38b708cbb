"""`launch horovod`: horovodrun across hosts, with the host list checked first."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

from trainer.errors import UsageError

from .hosts import format_hosts


def horovodrun_command(hosts, command: list[str], np: int | None = None, controller: str = "gloo",
                       ssh_port: int | None = None) -> list[str]:
    if not command:
        raise UsageError("no command after `--`; e.g. python -m launch horovod -H a:2,b:2 -- python -m trainer")
    slots = sum(n for _, n in hosts)
    np = slots if np is None else np
    if np < 1 or np > slots:
        raise UsageError(f"--np {np}: the hosts offer {slots} slots; pass 1..{slots}")
    binary = shutil.which("horovodrun")
    if not binary:
        raise UsageError("horovodrun not found on PATH; build Horovod with ./run setup")
    cmd = [binary, "-np", str(np), "-H", format_hosts(hosts), f"--{controller}"]
    if ssh_port:
        cmd += ["-p", str(ssh_port)]
    return cmd + list(command)


_LOST = re.compile(r"^Process name: (\S+)")
_CODE = re.compile(r"^Exit code: (-?\d+)")


def run(cmd: list[str], out=sys.stdout) -> int:
    """horovodrun, its output passed through. Non-elastic horovodrun stops
    every rank as soon as one exits non-zero, so a lost rank ends the job in
    seconds instead of leaving the others blocked in an allreduce; we name
    the rank it reports and say how to continue."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lost = code = None
    for line in proc.stdout:
        out.write(line)
        out.flush()
        if m := _LOST.match(line):
            lost = m.group(1)
        elif m := _CODE.match(line):
            code = int(m.group(1))
    status = proc.wait()
    if status and lost is not None:
        how = f"killed by signal {code - 128}" if code and code > 128 else f"exit code {code}"
        print(f"error: lost rank {lost} ({how}); horovodrun stopped the other ranks. Relaunch the same "
              "command with --resume to continue from the last checkpoint", file=sys.stderr, flush=True)
    return status
