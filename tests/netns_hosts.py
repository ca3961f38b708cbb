"""Hosts for the multi-host tests: each one a network namespace with its own
veth link to a shared bridge, its own address (10.213.N.0/24, which exists
only inside these namespaces), its own UTS host name, an /etc/hosts naming
every host, its own disk folder, and an sshd with keys generated here.

A host is a long-lived process holding the namespaces (its sshd); commands
run "on" a host through nsenter into that process's network, UTS and mount
namespaces, so they see what a user logged in there would see. The same
filesystem is shared by all hosts (the venv and the checkout at the same
paths, as on a cluster with a shared home), except `Hosts.disk`, which each
host bind-mounts from its own folder, so a file written there on one host is
absent on the others.

Teardown ends only the processes inside this fixture's namespaces (`ip netns
pids`), then deletes the namespaces."""
from __future__ import annotations

import itertools
import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

TOOLS = ("ip", "unshare", "nsenter", "sshd", "ssh", "ssh-keygen")


def available() -> str | None:
    """None if every tool is installed, else what is missing."""
    missing = [t for t in TOOLS if not shutil.which(t) and not Path(f"/usr/sbin/{t}").exists()]
    return ", ".join(missing) or None


def _sh(*cmd, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True, **kw)


@dataclass
class Host:
    name: str
    address: str
    netns: str
    disk: Path          # this host's own folder, seen at Hosts.disk on this host only
    pid: int = 0        # sshd: holds the host's UTS and mount namespaces

    def enter(self) -> list[str]:
        """Prefix that runs a command on this host."""
        return ["nsenter", "-t", str(self.pid), "-n", "-u", "-m", "--"]


class Hosts:
    """`with Hosts(tmp, ["hosta", "hostb"]) as hosts: hosts.run("hosta", cmd)`."""

    def __init__(self, root: Path, names=("hosta", "hostb")):
        self.root = Path(root)
        # Namespace and link names are per fixture (the PID and a counter), so
        # parallel test workers and leftovers of a killed run never collide.
        n = next(_serial)
        tag = f"dpt{os.getpid() % 100000}{n}"
        self.tag = tag
        subnet = (os.getpid() + 31 * n) % 250 + 1
        self.switch = f"{tag}sw"
        self.hosts = {n: Host(n, f"10.213.{subnet}.{i + 1}", f"{tag}{n}", self.root / "disks" / n)
                      for i, n in enumerate(names)}
        self.disk = self.root / "disk"
        self._procs: list[subprocess.Popen] = []

    def __getitem__(self, name) -> Host:
        return self.hosts[name]

    # -- set-up ------------------------------------------------------------
    def __enter__(self) -> "Hosts":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 30) -> "Hosts":
        r = self.root
        (r / "ssh").mkdir(parents=True, exist_ok=True)
        self.disk.mkdir(exist_ok=True)
        key = r / "ssh" / "id_ed25519"
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
        shutil.copy(f"{key}.pub", r / "ssh" / "authorized_keys")
        hosts_file = r / "etc-hosts"
        hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{h.address} {h.name}\n"
                                                                for h in self.hosts.values()))
        # ssh's system-wide client config, bind-mounted on every host: the
        # fixture's key, no known_hosts prompts (the host keys are new each run).
        ssh_config = r / "ssh" / "ssh_config"
        ssh_config.write_text(f"Host *\n  IdentityFile {key}\n  StrictHostKeyChecking no\n"
                              "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        _sh("ip", "netns", "add", self.switch)
        _sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i, h in enumerate(self.hosts.values()):
            h.disk.mkdir(parents=True, exist_ok=True)
            _sh("ip", "netns", "add", h.netns)
            veth, peer = f"{self.tag}v{i}", f"{self.tag}p{i}"
            _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
            _sh("ip", "link", "set", veth, "netns", h.netns)
            # Every host's link is eth0: horovodrun looks for an interface
            # name that all hosts share.
            _sh("ip", "-n", h.netns, "link", "set", veth, "name", "eth0")
            _sh("ip", "link", "set", peer, "netns", self.switch)
            _sh("ip", "-n", self.switch, "link", "set", peer, "master", "br0")
            _sh("ip", "-n", self.switch, "link", "set", peer, "up")
            _sh("ip", "-n", h.netns, "link", "set", "lo", "up")
            _sh("ip", "-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0")
            _sh("ip", "-n", h.netns, "link", "set", "eth0", "up")
            h.pid = self._start_host(h, hosts_file, ssh_config)
        for h in self.hosts.values():
            self._wait_ssh(h, timeout)
        return self

    def _start_host(self, h: Host, hosts_file: Path, ssh_config: Path) -> int:
        d = self.root / "sshd" / h.name
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "host_key").exists():
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "host_key")
        (d / "sshd_config").write_text(
            f"ListenAddress {h.address}\nPort 22\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.root / 'ssh' / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "PrintMotd no\nMaxStartups 100:30:200\nMaxSessions 100\n")
        # unshare: a UTS name and mounts of this host's own; sshd is the
        # host's first process, and what ssh starts inherits all of it.
        setup = (f"hostname {h.name} && mount --bind {hosts_file} /etc/hosts && "
                 f"mount --bind {ssh_config} /etc/ssh/ssh_config && mount --bind {h.disk} {self.disk} && "
                 f"exec /usr/sbin/sshd -D -e -f {d / 'sshd_config'}")
        log = open(d / "sshd.log", "ab")
        proc = subprocess.Popen(["ip", "netns", "exec", h.netns, "unshare", "--mount", "--uts",
                                 "--propagation", "private", "sh", "-c", setup],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        self._procs.append(proc)
        return proc.pid

    def _wait_ssh(self, h: Host, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            proc = next(p for p in self._procs if p.pid == h.pid)
            if proc.poll() is not None:
                raise RuntimeError(f"{h.name}'s sshd exited with {proc.returncode}; see "
                                   f"{self.root / 'sshd' / h.name / 'sshd.log'}")
            try:
                probe = self.run(h.name, ["ssh", h.name, "hostname"], timeout=10)
                if probe.returncode == 0 and probe.stdout.strip() == h.name:
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"sshd on {h.name} did not answer within {timeout} s")

    # -- use ---------------------------------------------------------------
    def command(self, host: str, cmd) -> list[str]:
        return self.hosts[host].enter() + [str(c) for c in cmd]

    def run(self, host: str, cmd, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.command(host, cmd), **kw)

    def popen(self, host: str, cmd, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(host, cmd), **kw)

    def mount_cgroups(self, host: str) -> None:
        """Give `host` the cgroup file systems this machine has under
        /sys/fs/cgroup. `ip netns exec` mounts a fresh /sys for the namespace
        without them, and slurmd will not start without a cgroup mount."""
        steps = ["mountpoint -q /sys/fs/cgroup && exit 0"]
        for line in Path("/proc/self/mounts").read_text().splitlines():
            dev, point, fstype, opts = line.split()[:4]
            if point == "/sys/fs/cgroup" or point.startswith("/sys/fs/cgroup/"):
                steps.append(f"mkdir -p {shlex.quote(point)} && mount -t {shlex.quote(fstype)} "
                             f"-o {shlex.quote(opts)} {shlex.quote(dev)} {shlex.quote(point)}")
        done = self.run(host, ["sh", "-ec", "\n".join(steps)])
        if done.returncode != 0:
            raise RuntimeError(f"mounting cgroups on {host} failed: {done.stderr.strip()}")

    def daemon(self, host: str, cmd, log: Path, env=None) -> subprocess.Popen:
        """A long-lived process on `host` (a Slurm or munge daemon), output
        appended to `log`. nsenter execs it without forking, so the Popen's
        PID is the daemon's own, for its owner to stop; `stop` ends it anyway
        with the host's other processes and reaps it."""
        with open(log, "ab") as out:
            proc = self.popen(host, cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True)
        self._procs.append(proc)
        return proc

    def pids(self, host: str) -> list[int]:
        """Every process in the host's network namespace."""
        out = _sh("ip", "netns", "pids", self.hosts[host].netns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self, host: str, sig=signal.SIGKILL) -> list[int]:
        """A host that dies: every process in its namespace, sshd included."""
        pids = self.pids(host)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def restart(self, host: str, timeout: float = 30) -> None:
        """Boot a host again after `kill_all`: its network namespace outlived
        its processes; the UTS and mount namespaces are made anew."""
        h = self.hosts[host]
        h.pid = self._start_host(h, self.root / "etc-hosts", self.root / "ssh" / "ssh_config")
        self._wait_ssh(h, timeout)

    # -- teardown ----------------------------------------------------------
    def stop(self) -> None:
        for h in self.hosts.values():
            self.kill_all(h.name, signal.SIGTERM)
        time.sleep(0.5)
        for h in self.hosts.values():
            self.kill_all(h.name, signal.SIGKILL)
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in [h.netns for h in self.hosts.values()] + [self.switch]:
            _sh("ip", "netns", "del", ns, check=False)


_serial = itertools.count()
