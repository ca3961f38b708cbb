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


# What horovodrun (Gloo) and mpirun print when a rank or a host is lost.
_PROCESS = re.compile(r"^\s*Process name:\s+(?:\[\[\d+,\d+\],(\d+)\]|(\d+))")
_CODE = re.compile(r"^\s*Exit code:\s+(-?\d+)")
_MPI_SIGNAL = re.compile(r"process rank (\d+) with PID \d+ on node (\S+) exited on signal (\d+)")
_MPI_DAEMON = re.compile(r"^\s*Remote daemon\s*:.* on node (\S+)")


def rank_hosts(hosts, np: int) -> list[str]:
    """The host of each rank: horovodrun and mpirun fill the hosts' slots in
    the order of the host list."""
    return [name for name, slots in hosts for _ in range(slots)][:np]


def _how(code: int | None) -> str:
    if code == 255:
        # ssh's own status: the remote process died of a signal or the host
        # went away, which ssh does not tell apart.
        return "its ssh session ended with 255: the process was killed or the host is unreachable"
    if code is not None and code > 128:
        return f"killed by signal {code - 128}"
    return f"exit code {code}"


def lost_message(lines, hosts_of_ranks: list[str]) -> str | None:
    """One line naming the lost rank and its host, from horovodrun's output."""
    rank = code = host = None
    how = None
    for line in lines:
        if m := _PROCESS.match(line):
            rank = int(m.group(1) or m.group(2))
        elif m := _CODE.match(line):
            code = int(m.group(1))
        elif m := _MPI_SIGNAL.search(line):
            rank, host, how = int(m.group(1)), m.group(2), f"killed by signal {m.group(3)}"
        elif m := _MPI_DAEMON.match(line):
            host = m.group(1)
    if rank is None and host is None:
        return None
    if rank is None:
        ranks = [r for r, h in enumerate(hosts_of_ranks) if h == host]
        who = f"host {host} (rank{'s' if len(ranks) != 1 else ''} {', '.join(map(str, ranks)) or '?'}): " \
              "mpirun lost its daemon there"
    else:
        host = host or (hosts_of_ranks[rank] if rank < len(hosts_of_ranks) else "?")
        who = f"rank {rank} on {host} ({how or _how(code)})"
    return (f"error: lost {who}; the other ranks were stopped. Relaunch the same command with --resume to "
            "continue from the last checkpoint")


def run(cmd: list[str], hosts_of_ranks: list[str] = (), out=sys.stdout) -> int:
    """horovodrun, its output passed through. Non-elastic horovodrun stops
    every rank as soon as one exits non-zero, so a lost rank ends the job in
    seconds instead of leaving the others blocked in an allreduce; we name
    the rank and host it reports and say how to continue."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    # Only the lines that can name a loss are kept, not the whole log.
    notable = []
    for line in proc.stdout:
        out.write(line)
        out.flush()
        if "Process name:" in line or "Exit code:" in line or " on node " in line:
            notable.append(line)
    status = proc.wait()
    if status and (message := lost_message(notable, list(hosts_of_ranks))):
        print(message, file=sys.stderr, flush=True)
    return status
