"""A real Slurm cluster for the tests: munged, slurmctld and slurmd from
Debian's packages, started by hand under a temporary directory (no systemd),
and stopped by the PIDs this module started.

By default one node, this machine, at 127.0.0.1. Given `hosts` (a started
tests/netns_hosts.Hosts), one node per namespace host at its own address:
munged and slurmctld run on the first host (the head node), one slurmd on
each host, all inside that host's namespaces, so a job step gets its node's
host name, /etc/hosts and disk. One munged serves every host: its socket is
a file on the shared filesystem, and a path-named unix socket works across
network namespaces. Clients (sinfo here; sbatch, srun in the tests) run on
the head node, the only place the cluster's addresses are reachable."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


def available() -> str | None:
    """None if the daemons and clients are installed, else what is missing."""
    missing = [p for p in PACKAGES if not shutil.which(p) and not Path(f"/usr/sbin/{p}").exists()]
    return ", ".join(missing) or None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    MEMORY_MB = 1000
    FEATURE = "dpt"

    def __init__(self, root: Path, cpus: int = 2, hosts=None, requeue_delay: int | None = None):
        self.root = Path(root)
        self.cpus = cpus
        # Seconds a requeued job waits before it may start again (Slurm's
        # default is 120, the job credentials' lifetime, which sets it).
        self.requeue_delay = requeue_delay
        self.hosts = hosts
        # {node name: address}; the first is the head node (slurmctld, munged, clients).
        self.addresses = ({name: h.address for name, h in hosts.hosts.items()} if hosts else
                          {socket.gethostname().split(".")[0]: "127.0.0.1"})
        self.node = next(iter(self.addresses))
        self.pids: list[int] = []
        self._procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"

    @property
    def env(self) -> dict:
        return {"SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> "SlurmCluster":
        r = self.root
        for d in ("munge", "state", "spool", "tmp", "log"):
            # An old state directory makes the node look idle before slurmd registers.
            shutil.rmtree(r / d, ignore_errors=True)
            (r / d).mkdir(parents=True)
        for node in self.addresses:
            (r / "spool" / node).mkdir()
            (r / "tmp" / node).mkdir()
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._daemon(["munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
                      f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
                      f"--seed-file={r / 'munge' / 'seed'}", "--force"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged socket")
        self.conf.write_text(self._config())
        self._controller = self._daemon(["slurmctld", "-D", "-c", "-f", str(self.conf)])
        for node in self.addresses:
            if self.hosts:
                self.hosts.mount_cgroups(node)
            self._daemon(["slurmd", "-D", "-f", str(self.conf), "-N", node], node)
        self._wait(self._node_ready, timeout, f"{'the node' if len(self.addresses) == 1 else 'the nodes'} "
                                              f"to register")
        return self

    def _config(self) -> str:
        # Per-node paths (%n: the node's name): the nodes share one filesystem,
        # and each slurmd needs its own spool, PID file and log, and each
        # node its own TmpFS, where the PMIx plugin makes a directory per job
        # step (in /tmp, the second node's would collide with the first's).
        r = self.root
        # Slurm 22.05 has no requeue_delay of its own: a requeued job becomes
        # eligible after the credentials' lifetime, cred_expire (at least 5 s;
        # step credentials are checked within moments of being issued).
        auth_extra = f",cred_expire={self.requeue_delay}" if self.requeue_delay else ""
        # ...and the scheduler then notices it at its next pass over pending
        # jobs, every 60 s by default.
        sched = "SchedulerParameters=sched_interval=2\n" if self.requeue_delay else ""
        # Memory and a feature, so that jobs can ask for --mem and --constraint
        # (without RealMemory a node has 1 MB).
        nodes = "\n".join(f"NodeName={name} NodeAddr={addr} CPUs={self.cpus} RealMemory={self.MEMORY_MB} "
                           f"Features={self.FEATURE} State=UNKNOWN" for name, addr in self.addresses.items())
        return f"""ClusterName=dpt
SlurmctldHost={self.node}({self.addresses[self.node]})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}{auth_extra}
CredType=cred/munge
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool' / '%n'}
SlurmctldPidFile={r / 'state' / 'slurmctld.pid'}
SlurmdPidFile={r / 'spool' / '%n' / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}
TmpFS={r / 'tmp' / '%n'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
{sched}{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def stop_controller(self) -> None:
        """SIGTERM slurmctld only: it writes its state to StateSaveLocation
        on the way out, and jobs run on under slurmd meanwhile."""
        proc = self._controller
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        self._procs.remove(proc)
        self.pids.remove(proc.pid)

    def start_controller(self, timeout: float = 60) -> None:
        """slurmctld again, without -c (which would clear the saved state), so
        it recovers the jobs that ran while it was down."""
        self._controller = self._daemon(["slurmctld", "-D", "-f", str(self.conf)])
        self._wait(self._node_ready, timeout, "the restarted controller")

    def client_env(self, message_timeout: int) -> dict:
        """Environment for clients (sbatch, scontrol, srun) with their own
        MessageTimeout. scontrol retries a refused connection for a time that
        grows with it (18 s at the default 10, 2 s at 2) before it reports
        failure, so a short one makes an outage of a few seconds visible to
        them. The daemons keep the cluster's configuration."""
        conf = self.root / f"client-{message_timeout}.conf"
        conf.write_text(self.conf.read_text() + f"MessageTimeout={message_timeout}\n")
        return {"SLURM_CONF": str(conf)}

    def _daemon(self, cmd, node: str | None = None) -> subprocess.Popen:
        """A daemon on `node` (default: the head node)."""
        env = {**os.environ, **self.env}
        name = Path(cmd[0]).name if len(self.addresses) == 1 else f"{Path(cmd[0]).name}-{node or self.node}"
        log = self.root / "log" / f"{name}.out"
        if self.hosts:
            proc = self.hosts.daemon(node or self.node, cmd, log, env=env)
        else:
            with open(log, "ab") as out:
                proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        proc.name = name
        self.pids.append(proc.pid)
        self._procs.append(proc)
        return proc

    def client(self, cmd, **kw) -> subprocess.CompletedProcess:
        """A Slurm client command on the head node, with this cluster's config."""
        env = {**os.environ, **self.env, **kw.pop("env", {})}
        kw = {"capture_output": True, "text": True, "stdin": subprocess.DEVNULL, **kw}
        if self.hosts:
            return self.hosts.run(self.node, cmd, env=env, **kw)
        return subprocess.run(cmd, env=env, **kw)

    def _node_ready(self) -> bool:
        for p in self._procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.returncode}; see {self.root / 'log'}")
        out = self.client(["sinfo", "-h", "-N", "-o", "%N %T"])
        states = dict(line.split() for line in out.stdout.splitlines() if len(line.split()) == 2)
        return (out.returncode == 0 and set(states) == set(self.addresses)
                and all(s in ("idle", "mixed", "allocated") for s in states.values()))

    @staticmethod
    def _wait(check, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if check():
                return
            time.sleep(0.3)
        raise TimeoutError(f"timed out waiting for {what}")

    def stop(self) -> None:
        """Stop only what this cluster started, by PID (slurmd first)."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
