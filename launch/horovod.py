"""`launch horovod`: horovodrun across hosts, with the host list checked first."""
from __future__ import annotations

import shutil
import subprocess

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


def run(cmd: list[str]) -> int:
    # horovodrun already stops every rank when one fails and prints which;
    # its exit status is the job's.
    return subprocess.call(cmd)
