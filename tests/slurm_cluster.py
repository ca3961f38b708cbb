"""A real single-node Slurm cluster for the tests: munged, slurmctld and
slurmd from Debian's packages, started by hand under a temporary directory
(no systemd), and stopped by the PIDs this module started."""
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
    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.pids: list[int] = []
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"

    @property
    def env(self) -> dict:
        return {"SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> "SlurmCluster":
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            # An old state directory makes the node look idle before slurmd registers.
            shutil.rmtree(r / d, ignore_errors=True)
            (r / d).mkdir(parents=True)
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
        self._daemon(["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(self._node_ready, timeout, "the node to register")
        return self

    def _config(self) -> str:
        r = self.root
        return f"""ClusterName=dpt
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'state' / 'slurmctld.pid'}
SlurmdPidFile={r / 'spool' / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
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
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
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

    def _daemon(self, cmd) -> subprocess.Popen:
        env = {**os.environ, **self.env}
        log = open(self.root / "log" / f"{Path(cmd[0]).name}.out", "ab")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        self.pids.append(proc.pid)
        self._procs = getattr(self, "_procs", []) + [proc]
        return proc

    def _node_ready(self) -> bool:
        for p in getattr(self, "_procs", []):
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; see {self.root / 'log'}")
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env={**os.environ, **self.env},
                             capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated")

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
        for proc in reversed(getattr(self, "_procs", [])):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(getattr(self, "_procs", [])):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
