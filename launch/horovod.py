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
# A host that went away, as mpirun (its daemon, or a peer rank) or ssh saw it;
# which of these appears first depends on timing.
_HOST_GONE = (re.compile(r"^\s*Remote daemon\s*:.* on node (\S+)"), re.compile(r"^\s*Peer host:\s+(\S+)"),
              re.compile(r"^Connection to (\S+) closed"))
# A rank's own one-line error (horovodrun tags lines [rank] with Gloo,
# [job,rank] with MPI): that rank has said why it ended.
_RANK_ERROR = re.compile(r"^\[(?:\d+,)?(\d+)\]<stderr>:error: ")
_NOTABLE = (_PROCESS, _CODE, _MPI_SIGNAL, *_HOST_GONE, _RANK_ERROR)


def rank_hosts(hosts, np: int | None = None) -> list[str]:
    """The host of each rank: horovodrun and mpirun fill the hosts' slots in
    the order of the host list (np None: every slot)."""
    return [name for name, slots in hosts for _ in range(slots)][:np]


def _how(code: int | None) -> str:
    if code == 255:
        # ssh's own status: the remote process died of a signal or the host
        # went away, which ssh does not tell apart.
        return "exit code 255: over ssh, the process was killed or its host went away"
    if code is not None and code > 128:
        return f"killed by signal {code - 128}"
    return f"exit code {code}"


def lost_message(lines, hosts_of_ranks: list[str]) -> str | None:
    """One line naming the lost rank and its host, from horovodrun's output.
    A rank that died of a signal (mpirun says which) is the cause; else a host
    that went away; else the first rank horovodrun saw exit (Gloo). A lost
    host takes precedence over ranks elsewhere that failed because of it.
    None when nothing was lost, or the rank that ended first printed its own
    error line (a start-up timeout, a bad file): a second line blaming a lost
    rank and advising --resume would be wrong."""
    rank = code = gone = None
    killed = None
    explained = set()
    for line in lines:
        if m := _RANK_ERROR.match(line):
            explained.add(int(m.group(1)))
        elif m := _PROCESS.match(line):
            rank = int(m.group(1) or m.group(2)) if rank is None else rank
        elif m := _CODE.match(line):
            code = int(m.group(1)) if code is None else code
        elif m := _MPI_SIGNAL.search(line):
            killed = killed or (int(m.group(1)), m.group(2), f"killed by signal {m.group(3)}")
        elif gone is None and (m := next(filter(None, (p.match(line) for p in _HOST_GONE)), None)):
            gone = m.group(1)
    if killed:
        who = f"rank {killed[0]} on {killed[1]} ({killed[2]})"
    elif gone:
        ranks = [r for r, h in enumerate(hosts_of_ranks) if h == gone]
        who = f"host {gone} (rank{'s' if len(ranks) != 1 else ''} {', '.join(map(str, ranks)) or '?'}): " \
              "its processes or its connection ended"
    elif rank is not None and rank not in explained:
        host = hosts_of_ranks[rank] if rank < len(hosts_of_ranks) else "?"
        who = f"rank {rank} on {host} ({_how(code)})"
    else:
        return None
    return (f"error: lost {who}; the other ranks were stopped. Relaunch the same command with --resume to "
            "continue from the last checkpoint")


def run(cmd: list[str], hosts_of_ranks: list[str] = (), out=sys.stdout) -> int:
    """horovodrun, its output passed through. Non-elastic horovodrun stops
    every rank as soon as one exits non-zero, so a lost rank ends the job in
    seconds instead of leaving the others blocked in an allreduce; we name
    the rank and host it reports and say how to continue."""
    from trainer import interrupts
    proc = interrupts.start_child(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    # Only the lines that can name a loss are kept, not the whole log.
    notable = []
    try:
        for line in proc.stdout:
            out.write(line)
            out.flush()
            if any(p.search(line) for p in _NOTABLE):
                notable.append(line)
        status = proc.wait()
    except KeyboardInterrupt as e:  # SIGINT/SIGTERM: horovodrun and its ranks get it too, and end with us
        interrupts.stop_child(proc, getattr(e, "signum", 2))
        raise
    if status and (message := lost_message(notable, list(hosts_of_ranks))):
        print(message, file=sys.stderr, flush=True)
    return status
