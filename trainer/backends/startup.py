"""Start-up waits for peers end: at most --startup-timeout seconds, saying who is missing.

MultiWorkerMirroredStrategy's constructor waits for every worker of TF_CONFIG
inside TensorFlow, holding the GIL: no Python thread, no signal handler runs
until the last worker arrives, and a worker that never starts keeps the
others silent and unkillable (TensorFlow also takes over SIGTERM there). So
the workers meet first here, in Python: each listens on its own TF_CONFIG
port and connects to the others' until all answered (a peer counts whether
our listener or, a moment later, TensorFlow's server answers), then closes
its listener and lets TensorFlow bind the port. Only then is the strategy
made, with everyone known to be up.

Horovod's hvd.init waits for the other ranks in native code, and under Gloo
it aborts the process after HOROVOD_GLOO_TIMEOUT_SECONDS (30) whatever
--startup-timeout says. Under horovodrun with Gloo every rank knows
horovodrun's HTTP key-value store (the one Gloo's rendezvous uses), so the
ranks meet there first, in Python, where a signal ends the wait: each PUTs a
key of our own scope naming its host, and reads the others' until all are
there (`wait_for_ranks`). Only then hvd.init runs, with every rank up. Under
mpirun or srun there is no such store; hvd.init (a ctypes call, which
releases the GIL) is watched by a timer thread instead: `Deadline` prints
what it waits for after a few seconds and ends the process (exit 1) at the
timeout, knowing only the world size.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

from ..errors import UsageError

SAY_AFTER = 5.0  # seconds before "waiting for ..." is printed: a healthy start is quicker


class StartupTimeout(RuntimeError):
    """A peer did not start within --startup-timeout (exit 1, one line).
    `speak`: False on a rank that leaves the line to a lower rank."""

    def __init__(self, message: str, speak: bool = True):
        super().__init__(message)
        self.speak = speak


def check_timeout(seconds: float) -> float:
    if not seconds > 0 or seconds == float("inf"):
        raise UsageError(f"--startup-timeout must be a number of seconds > 0, got {seconds:g}")
    return seconds


def _address(worker: str) -> tuple[str, int]:
    host, _, port = worker.rpartition(":")
    return host.strip("[]"), int(port)


def _answers(worker: str) -> bool:
    try:
        with socket.create_connection(_address(worker), timeout=1.0):
            return True
    except OSError:
        return False


def _listen(worker: str):
    """A listener on this worker's port, so that peers see it before
    TensorFlow's server exists; None if the port is taken (TensorFlow will say)."""
    _, port = _address(worker)
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind((host, port))
            s.listen(64)  # never accept(): the kernel completes the handshake, close() resets it
            return s
        except OSError:
            s.close()
    return None


def wait_for_workers(workers: list[str], index: int, timeout: float, say=None, rank_name: str = "worker") -> None:
    """Return once every other worker of `workers` answers on its port;
    raise StartupTimeout naming the missing ones after `timeout` seconds."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    listener = _listen(workers[index])
    try:
        missing = [i for i in range(len(workers)) if i != index]
        start, told = time.monotonic(), False
        while True:
            missing = [i for i in missing if not _answers(workers[i])]
            if not missing:
                return
            waited = time.monotonic() - start
            names = ", ".join(f"{rank_name} {i} ({workers[i]})" for i in missing)
            if waited >= timeout:
                raise StartupTimeout(f"{names} did not start within --startup-timeout {timeout:g} s; "
                                     f"start {'it' if len(missing) == 1 else 'them'} (same TF_CONFIG cluster, "
                                     f"own task index) or check the address, then run again")
            if not told and waited >= min(SAY_AFTER, timeout / 2):
                say(f"{rank_name} {index}: waiting for {names} to start (up to --startup-timeout {timeout:g} s)")
                told = True
            time.sleep(min(0.5, max(0.05, timeout - waited)))
    finally:
        if listener is not None:
            listener.close()


class Deadline:
    """A watch on a blocking call that releases the GIL (hvd.init): after a
    few seconds one line saying what it waits for, at `timeout` one error
    line and exit 1. `with Deadline(...):` around the call."""

    def __init__(self, timeout: float, waiting: str, failed: str, speak: bool = True):
        self.timeout, self.waiting, self.failed, self.speak = timeout, waiting, failed, speak
        self.done = threading.Event()

    def __enter__(self):
        threading.Thread(target=self._watch, daemon=True, name="dpt-startup").start()
        return self

    def __exit__(self, *exc):
        self.done.set()

    def _watch(self):
        if self.timeout > SAY_AFTER and not self.done.wait(SAY_AFTER):
            if self.speak:
                _say(self.waiting)
        if not self.done.wait(max(0.0, self.timeout - (SAY_AFTER if self.timeout > SAY_AFTER else 0))):
            _say(f"error: {self.failed}")
            os._exit(1)


def _say(text: str) -> None:
    sys.stderr.flush()
    os.write(2, (text + "\n").encode())


class RendezvousStore:
    """horovodrun's HTTP key-value store (horovod/runner/http/http_server.py):
    GET and PUT of /<scope>/<key>, one scope of our own."""

    SCOPE = "dptoolkit-startup"

    def __init__(self, addr: str, port: int):
        self.base = f"http://{addr}:{port}/{self.SCOPE}/"
        # No proxy: the store is horovodrun's own, and Gloo reaches it directly.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @classmethod
    def from_env(cls, env=os.environ) -> "RendezvousStore | None":
        """The store of a static horovodrun --gloo run, else None (mpirun,
        srun; elastic runs re-initialise with reused ranks, so a key would
        not tell this start from an earlier one)."""
        addr, port = env.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"), env.get("HOROVOD_GLOO_RENDEZVOUS_PORT")
        if not addr or not (port or "").isdigit() or env.get("HOROVOD_ELASTIC") == "1":
            return None
        return cls(addr, int(port))

    def put(self, key: str, value: bytes) -> None:
        self.opener.open(urllib.request.Request(self.base + key, data=value, method="PUT"), timeout=3).close()

    def get(self, key: str) -> bytes | None:
        try:
            with self.opener.open(self.base + key, timeout=3) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise


QUIET_GRACE = 10.0  # extra seconds a rank that leaves the error line to a lower rank waits before exiting


def wait_for_ranks(store: RendezvousStore, rank: int, size: int, timeout: float, host: str,
                   local_rank: int, local_size: int, say=None) -> None:
    """Announce this rank in `store`, return once all `size` ranks have;
    raise StartupTimeout naming the missing ranks (and their hosts, where a
    rank of the same host arrived) after `timeout` seconds. The lowest rank
    that arrived speaks; the others wait QUIET_GRACE longer, silently, so
    that the launcher, seeing the speaker exit, stops them first.
    OSError if the store cannot be reached at all."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    arrived = {rank: {"host": host, "local_rank": local_rank, "local_size": local_size}}
    store.put(str(rank), json.dumps(arrived[rank]).encode())
    start, told = time.monotonic(), False
    while True:
        for r in range(size):
            if r not in arrived:
                try:
                    value = store.get(str(r))
                except OSError:  # horovodrun busy or going away: it stops us if it ends
                    value = None
                if value:
                    arrived[r] = json.loads(value)
        missing = [r for r in range(size) if r not in arrived]
        if not missing:
            return
        waited, speaker = time.monotonic() - start, min(arrived) == rank
        names = describe_ranks(missing, arrived)
        if waited >= timeout + (0 if speaker else QUIET_GRACE):
            raise StartupTimeout(f"{names} did not start within --startup-timeout {timeout:g} s; check that "
                                 f"{'it was' if len(missing) == 1 else 'they were'} started (the host, the "
                                 "command, its environment) and can reach horovodrun, then run again", speak=speaker)
        if speaker and not told and waited >= min(SAY_AFTER, timeout / 2):
            say(f"rank {rank}: waiting for {names} to start (up to --startup-timeout {timeout:g} s)")
            told = True
        time.sleep(min(0.5, max(0.05, timeout - waited)))


def describe_ranks(missing: list[int], arrived: dict) -> str:
    """'rank 1 (on hostb)', 'ranks 4, 5 (on hostc), rank 7': Horovod gives
    each host consecutive ranks, so an arrived rank's local rank and local
    size tell which other ranks share its host."""
    def host_of(r):
        for q, info in arrived.items():
            first = q - int(info["local_rank"])
            if first <= r < first + int(info["local_size"]):
                return info["host"]
        return None

    groups: dict = {}
    for r in missing:
        groups.setdefault(host_of(r), []).append(r)
    parts = []
    for host, ranks in groups.items():
        text = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
        parts.append(text if host is None else f"{text} (on {host})")
    return ", ".join(parts)
